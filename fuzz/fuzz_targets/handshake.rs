#![no_main]
// Body: dwcp_wire::fuzzing::handshake (also run by proptest in the normal test suite).
libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_wire::fuzzing::handshake(data));
