#![no_main]
// Body: dwcp_encoding::fuzzing::stream_object (also run by proptest in the normal test suite).
libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_encoding::fuzzing::stream_object(data));
