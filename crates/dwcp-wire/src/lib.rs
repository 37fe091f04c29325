//! The DWCP wire protocol, without I/O.
//!
//! ```text
//!   bytes from TLS ──> FrameCodec::decode ──> Frame ──> msg::decode ──> Hello / Ping / ...
//!                                               │
//!                                               └──> Handshake (sans-IO state machine)
//!   Frame <── msg::encode <── message                    │ poll_transmit
//!   bytes to TLS <── FrameCodec::encode <── Frame <──────┘
//! ```
//!
//! This crate owns no sockets, reads no clock and spawns nothing: drivers in `dwcp-transport`
//! move the bytes and pass `Instant`s in. `docs/PROTOCOL.md` is the specification it
//! implements.

pub mod data;
mod error;
mod frame;
mod handshake;
mod ids;
pub mod msg;

pub use error::ErrorCode;
pub use frame::{
    Frame, FrameCodec, FrameError, FrameType, HANDSHAKE_MAX_PAYLOAD, HARD_MAX_PAYLOAD, HEADER_LEN,
    MIN_MAX_PAYLOAD, TRAILER_LEN,
};
pub use handshake::{
    Established, Fault, Handshake, HandshakeError, LocalParams, MAX_CODEC_NAME, MAX_CODECS,
    MAX_STREAMS, MAX_VERSIONS, Outcome, Version, negotiate, negotiate_version,
    validate_capabilities,
};
pub use ids::{ClusterId, IdError, MAX_ID_LEN, NodeId};
pub use msg::Capabilities;

#[doc(hidden)]
pub mod fuzzing;
