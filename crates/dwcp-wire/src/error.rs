//! Error codes carried in `REJECT` and `GOAWAY` frames (`docs/PROTOCOL.md`, "Error codes").

use std::fmt;

/// A wire error code. Unknown codes from a peer are kept as they are and shown as numbers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Orderly close, nothing wrong.
    pub const NO_ERROR: Self = Self(0);
    /// Malformed frame or message.
    pub const PROTOCOL_ERROR: Self = Self(1);
    /// No protocol version in common.
    pub const UNSUPPORTED_VERSION: Self = Self(2);
    /// The peers belong to different clusters.
    pub const CLUSTER_MISMATCH: Self = Self(3);
    /// A node id breaks the identifier rules.
    pub const INVALID_NODE_ID: Self = Self(4);
    /// The node id claimed in the handshake is not the one in the peer's certificate.
    pub const IDENTITY_MISMATCH: Self = Self(5);
    /// A frame arrived that is not allowed in the current state.
    pub const UNEXPECTED_FRAME: Self = Self(6);
    /// A frame exceeded the size limit.
    pub const FRAME_TOO_LARGE: Self = Self(7);
    /// A frame failed its checksum.
    pub const BAD_CHECKSUM: Self = Self(8);
    /// A non-extension frame type the receiver does not know.
    pub const UNKNOWN_FRAME_TYPE: Self = Self(9);
    /// The peer took too long.
    pub const TIMEOUT: Self = Self(10);
    /// The sender is shutting down.
    pub const SHUTTING_DOWN: Self = Self(11);
    /// The sender hit a bug or resource failure of its own.
    pub const INTERNAL_ERROR: Self = Self(12);
    /// Capabilities out of the allowed ranges.
    pub const INVALID_CAPABILITIES: Self = Self(13);
    /// The sender has too many connections.
    pub const OVERLOADED: Self = Self(14);
    /// A transferred object does not match its digest.
    pub const CHECKSUM_MISMATCH: Self = Self(15);
    /// The receiver cannot store an object (bad name, disk error).
    pub const STORAGE_ERROR: Self = Self(16);
    /// A delta-encoded object referred to content the receiver does not hold (or no longer
    /// holds as the sender assumed); the sender sends it again without such references.
    pub const DELTA_UNRESOLVED: Self = Self(17);
    /// `GOAWAY` on one stream of a session that goes on (the sender retires a stream); not
    /// the end of the session.
    pub const STREAM_CLOSED: Self = Self(18);
    /// An object's begin refused for now: the receiver holds that object for another of
    /// the sender's sessions (an earlier one whose streams died unnoticed); try again.
    pub const BUSY: Self = Self(19);
    /// A QEMU migration's finish refused after the destination QEMU had the whole stream
    /// and neither confirmed its load nor could be made to quit: it may start the guest, so
    /// the source must not resume its own.
    pub const OUTCOME_UNKNOWN: Self = Self(20);

    /// The documented name, or `None` for a code this version does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::NO_ERROR => "NO_ERROR",
            Self::PROTOCOL_ERROR => "PROTOCOL_ERROR",
            Self::UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION",
            Self::CLUSTER_MISMATCH => "CLUSTER_MISMATCH",
            Self::INVALID_NODE_ID => "INVALID_NODE_ID",
            Self::IDENTITY_MISMATCH => "IDENTITY_MISMATCH",
            Self::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
            Self::FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
            Self::BAD_CHECKSUM => "BAD_CHECKSUM",
            Self::UNKNOWN_FRAME_TYPE => "UNKNOWN_FRAME_TYPE",
            Self::TIMEOUT => "TIMEOUT",
            Self::SHUTTING_DOWN => "SHUTTING_DOWN",
            Self::INTERNAL_ERROR => "INTERNAL_ERROR",
            Self::INVALID_CAPABILITIES => "INVALID_CAPABILITIES",
            Self::OVERLOADED => "OVERLOADED",
            Self::CHECKSUM_MISMATCH => "CHECKSUM_MISMATCH",
            Self::STORAGE_ERROR => "STORAGE_ERROR",
            Self::DELTA_UNRESOLVED => "DELTA_UNRESOLVED",
            Self::STREAM_CLOSED => "STREAM_CLOSED",
            Self::BUSY => "BUSY",
            Self::OUTCOME_UNKNOWN => "OUTCOME_UNKNOWN",
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "code {}", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorCode({self})")
    }
}
