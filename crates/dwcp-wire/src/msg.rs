//! Control messages: protobuf (proto3) payloads of the control frames, defined with prost
//! derives. `docs/PROTOCOL.md` ("Messages") gives the same schema in `.proto` syntax; field
//! numbers here are the contract. Unknown fields are skipped on decode (proto3 rules), which is
//! how later versions add fields without breaking older peers.

use prost::Message;

use crate::error::ErrorCode;
use crate::frame::{Frame, FrameType};

/// `HELLO` (0x0001), client to server.
#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    /// Protocol versions the client speaks, any order.
    #[prost(uint32, repeated, tag = "1")]
    pub versions: Vec<u32>,
    /// The client's node id; must equal the id in its certificate.
    #[prost(string, tag = "2")]
    pub node_id: String,
    /// The client's cluster id.
    #[prost(string, tag = "3")]
    pub cluster_id: String,
    /// What the client can do.
    #[prost(message, optional, tag = "4")]
    pub capabilities: Option<Capabilities>,
}

/// `HELLO_ACK` (0x0002), server to client.
#[derive(Clone, PartialEq, Message)]
pub struct HelloAck {
    /// The version chosen: the highest both sides speak.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The server's node id; must equal the id in its certificate.
    #[prost(string, tag = "2")]
    pub node_id: String,
    /// The server's cluster id.
    #[prost(string, tag = "3")]
    pub cluster_id: String,
    /// What the server can do.
    #[prost(message, optional, tag = "4")]
    pub capabilities: Option<Capabilities>,
    /// What both will use on this connection (computed by the server, checked by the client).
    #[prost(message, optional, tag = "5")]
    pub negotiated: Option<Capabilities>,
    /// Every version the server accepts, so the client can check that `version` is the
    /// highest common one (no silent downgrade).
    #[prost(uint32, repeated, tag = "6")]
    pub versions: Vec<u32>,
}

/// Capabilities, advertised by each side and negotiated by the server.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Capabilities {
    /// Most parallel data streams this node will run with one peer (1..=512).
    #[prost(uint32, tag = "1")]
    pub max_streams: u32,
    /// Compression codecs, in order of preference (`"zstd"`, `"lz4"`; unknown names ignored).
    #[prost(string, repeated, tag = "2")]
    pub codecs: Vec<String>,
    /// Whether the node accepts QUIC sessions.
    #[prost(bool, tag = "3")]
    pub quic: bool,
    /// Whether the node accepts delta-encoded (HDE) data.
    #[prost(bool, tag = "4")]
    pub delta: bool,
    /// Largest frame payload the node accepts after the handshake (4 KiB..=16 MiB).
    #[prost(uint32, tag = "5")]
    pub max_frame_size: u32,
}

/// `REJECT` (0x0003) and `GOAWAY` (0x0006).
#[derive(Clone, PartialEq, Message)]
pub struct Close {
    /// An [`ErrorCode`] value.
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// Human-readable reason, at most [`MAX_REASON_LEN`] bytes.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// `PING` (0x0004) and `PONG` (0x0005): the answer echoes both fields.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Ping {
    /// Sequence number chosen by the sender.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Opaque to the receiver; the sender puts its send time here.
    #[prost(uint64, tag = "2")]
    pub timestamp_micros: u64,
    /// A session's heartbeat: the segments TCP retransmitted on the sender's streams of the
    /// session since its previous heartbeat, by the sender's kernel (`TCP_INFO`); 0 when
    /// unknown. For the receiver's metrics only, never acted on.
    #[prost(uint64, tag = "3")]
    pub sender_tcp_retransmits: u64,
    /// ... and the data segments they sent meanwhile, retransmissions included.
    #[prost(uint64, tag = "4")]
    pub sender_tcp_segments: u64,
}

/// Longest reason string sent in a `REJECT` or `GOAWAY`; longer ones are cut.
pub const MAX_REASON_LEN: usize = 1024;

/// Text from a peer made safe for logs and terminals: at most `max` bytes, control characters
/// replaced by `?`.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

/// A frame payload that does not decode as the message its type announces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {frame} message: {detail}")]
pub struct MessageError {
    /// Frame type name.
    pub frame: &'static str,
    /// What the decoder said.
    pub detail: String,
}

/// Decodes the payload of `frame` as `M`.
pub fn decode<M: Message + Default>(frame: &Frame) -> Result<M, MessageError> {
    M::decode(frame.payload.clone()).map_err(|e| MessageError {
        frame: frame.ty.name(),
        detail: e.to_string(),
    })
}

/// Encodes `msg` into a frame of type `ty`.
pub fn encode<M: Message>(ty: FrameType, msg: &M) -> Frame {
    Frame::new(ty, msg.encode_to_vec())
}

impl Close {
    /// A close message, with the reason cut to [`MAX_REASON_LEN`] at a character boundary.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON_LEN {
            let mut cut = MAX_REASON_LEN;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Self {
            code: code.0,
            reason,
        }
    }

    /// The reason as safe to print: cut to [`MAX_REASON_LEN`] bytes, control characters
    /// (which could forge log lines or drive a terminal) replaced by `?`.
    pub fn printable_reason(&self) -> String {
        printable(&self.reason, MAX_REASON_LEN)
    }

    /// The code as an [`ErrorCode`].
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip() {
        let hello = Hello {
            versions: vec![3, 1],
            node_id: "a".into(),
            cluster_id: "c".into(),
            capabilities: Some(Capabilities {
                max_streams: 64,
                codecs: vec!["zstd".into()],
                quic: true,
                delta: true,
                max_frame_size: 1 << 20,
            }),
        };
        let frame = encode(FrameType::HELLO, &hello);
        assert_eq!(decode::<Hello>(&frame).unwrap(), hello);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // Field 99 (varint 7) appended to a valid PING: a newer peer's extra field.
        let mut bytes = Ping {
            seq: 5,
            timestamp_micros: 6,
            ..Ping::default()
        }
        .encode_to_vec();
        bytes.extend_from_slice(&[0x98, 0x06, 0x07]);
        let frame = Frame::new(FrameType::PING, bytes);
        assert_eq!(decode::<Ping>(&frame).unwrap().seq, 5);
    }

    #[test]
    fn garbage_is_a_message_error() {
        let frame = Frame::new(FrameType::HELLO, vec![0xff; 10]);
        let err = decode::<Hello>(&frame).unwrap_err();
        assert_eq!(err.frame, "hello");
    }

    #[test]
    fn peer_text_is_made_printable() {
        let close = Close {
            code: 1,
            reason: format!("line\n\u{1b}[31mfake{}", "x".repeat(5000)),
        };
        let p = close.printable_reason();
        assert!(p.starts_with("line??[31mfake"));
        assert!(p.len() <= MAX_REASON_LEN);
        assert!(!p.chars().any(char::is_control));
    }

    #[test]
    fn reason_is_cut_at_a_char_boundary() {
        let close = Close::new(ErrorCode::PROTOCOL_ERROR, "é".repeat(MAX_REASON_LEN));
        assert!(close.reason.len() <= MAX_REASON_LEN);
        assert!(close.reason.chars().all(|c| c == 'é'));
    }
}
