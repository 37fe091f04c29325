//! Frame codec: length-prefixed, typed, checksummed frames (`docs/PROTOCOL.md`, "Frames").
//!
//! ```text
//!  0       4       6   7   8                 8+L      12+L
//!  +-------+-------+---+---+-----------------+--------+
//!  |  len  | type  |flg|rsv| payload (len B) | crc32c |
//!  +-------+-------+---+---+-----------------+--------+
//!  all integers big-endian; crc32c covers bytes [0, 8+L)
//! ```
//!
//! The codec follows the tokio-util decoder contract: `Ok(None)` means "need more bytes",
//! `Err` means the stream is corrupt and must be closed; there is no resynchronisation.
//! The length is checked against the limit *before* any payload is buffered, so a peer cannot
//! make us allocate more than the limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ErrorCode;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;
/// Bytes after the payload (the CRC32C).
pub const TRAILER_LEN: usize = 4;
/// Largest payload any DWCP implementation may send or accept: 16 MiB.
pub const HARD_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Smallest `max_frame_size` a peer may advertise: 4 KiB.
pub const MIN_MAX_PAYLOAD: u32 = 4 * 1024;
/// Payload limit until the handshake has negotiated one: 64 KiB is far above any valid
/// handshake message and small enough that an unauthenticated peer cannot make us buffer much.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 64 * 1024;

/// A frame type. Types with the high bit set (`0x8000..=0xFFFF`) are *extensions*: a receiver
/// that does not know one skips it. Any other unknown type is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameType(pub u16);

impl FrameType {
    /// Client's opening message: versions, identity, capabilities.
    pub const HELLO: Self = Self(0x0001);
    /// Server's answer to `HELLO`: chosen version, identity, negotiated capabilities.
    pub const HELLO_ACK: Self = Self(0x0002);
    /// Handshake refused, with an error code and reason; the sender closes afterwards.
    pub const REJECT: Self = Self(0x0003);
    /// Liveness / RTT probe.
    pub const PING: Self = Self(0x0004);
    /// Answer to `PING`, echoing its fields.
    pub const PONG: Self = Self(0x0005);
    /// The sender is closing the connection, with a code and reason.
    pub const GOAWAY: Self = Self(0x0006);

    /// Bit marking an extension type that unknown receivers skip.
    pub const EXTENSION_BIT: u16 = 0x8000;

    /// Whether a receiver that does not know this type may skip it.
    pub fn is_extension(self) -> bool {
        self.0 & Self::EXTENSION_BIT != 0
    }

    /// Whether this implementation defines this (non-extension) type.
    pub fn is_known(self) -> bool {
        !matches!(self.name(), "unknown" | "extension")
    }

    /// A short name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::HELLO => "hello",
            Self::HELLO_ACK => "hello_ack",
            Self::REJECT => "reject",
            Self::PING => "ping",
            Self::PONG => "pong",
            Self::GOAWAY => "goaway",
            Self::SESSION => "session",
            Self::OBJECT_BEGIN => "object_begin",
            Self::OBJECT_STATE => "object_state",
            Self::DATA => "data",
            Self::OBJECT_END => "object_end",
            Self::ACK => "ack",
            Self::OBJECT_DONE => "object_done",
            Self::BASE_QUERY => "base_query",
            Self::BASE_INFO => "base_info",
            Self::MIGRATION => "migration",
            Self::TUNNEL_DATA => "tunnel_data",
            Self::TUNNEL_ACK => "tunnel_ack",
            t if t.is_extension() => "extension",
            _ => "unknown",
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload holds.
    pub ty: FrameType,
    /// The payload, without header or checksum.
    pub payload: Bytes,
}

impl Frame {
    /// A frame of type `ty` carrying `payload`.
    pub fn new(ty: FrameType, payload: impl Into<Bytes>) -> Self {
        Self {
            ty,
            payload: payload.into(),
        }
    }

    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len() + TRAILER_LEN
    }
}

/// Why a byte stream is not a valid sequence of frames. Every variant is fatal for the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length field exceeds the limit in force.
    #[error("frame of type {ty:#06x} announces {len} payload bytes, the limit is {max}")]
    Oversized {
        /// Type field of the offending frame.
        ty: u16,
        /// Announced payload length.
        len: u32,
        /// Limit in force.
        max: u32,
    },
    /// Flag or reserved bits are set that this version does not define.
    #[error("frame of type {ty:#06x} has undefined flag bits {flags:#04x}/{reserved:#04x} set")]
    ReservedBits {
        /// Type field of the offending frame.
        ty: u16,
        /// Flags byte.
        flags: u8,
        /// Reserved byte.
        reserved: u8,
    },
    /// The CRC32C does not match: the frame was corrupted or the peer is not speaking DWCP.
    #[error(
        "frame of type {ty:#06x} ({len} bytes) fails its checksum: got {actual:#010x}, computed {expected:#010x}"
    )]
    BadChecksum {
        /// Type field of the offending frame.
        ty: u16,
        /// Payload length.
        len: u32,
        /// Checksum carried by the frame.
        actual: u32,
        /// Checksum computed over the received bytes.
        expected: u32,
    },
    /// The payload handed to the encoder is larger than the limit.
    #[error("cannot send a {len}-byte payload: the limit is {max}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// Limit in force.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the incomplete frame that did arrive.
        buffered: usize,
    },
}

impl FrameError {
    /// The wire error code this maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Oversized { .. } | Self::PayloadTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            Self::BadChecksum { .. } => ErrorCode::BAD_CHECKSUM,
            Self::ReservedBits { .. } | Self::Truncated { .. } => ErrorCode::PROTOCOL_ERROR,
        }
    }

    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversized { .. } | Self::PayloadTooLarge { .. } => "frame_too_large",
            Self::BadChecksum { .. } => "bad_checksum",
            Self::ReservedBits { .. } => "reserved_bits",
            Self::Truncated { .. } => "truncated",
        }
    }
}

/// Encoder and decoder for one direction of a connection, holding the payload limit in force.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_payload: u32,
}

impl FrameCodec {
    /// A codec for the handshake phase ([`HANDSHAKE_MAX_PAYLOAD`]).
    pub fn handshake() -> Self {
        Self {
            max_payload: HANDSHAKE_MAX_PAYLOAD,
        }
    }

    /// A codec with the given payload limit, clamped to [`HARD_MAX_PAYLOAD`].
    pub fn with_max_payload(max_payload: u32) -> Self {
        Self {
            max_payload: max_payload.min(HARD_MAX_PAYLOAD),
        }
    }

    /// The payload limit in force.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Appends `frame` to `dst`.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = frame.payload.len();
        let len32 = u32::try_from(len)
            .ok()
            .filter(|l| *l <= self.max_payload)
            .ok_or(FrameError::PayloadTooLarge {
                len,
                max: self.max_payload,
            })?;
        dst.reserve(HEADER_LEN + len + TRAILER_LEN);
        let start = dst.len();
        dst.put_u32(len32);
        dst.put_u16(frame.ty.0);
        dst.put_u8(0);
        dst.put_u8(0);
        dst.put_slice(&frame.payload);
        let crc = crc32c::crc32c(&dst[start..]);
        dst.put_u32(crc);
        Ok(())
    }

    /// Takes one frame off the front of `src`, if it holds a whole one.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let ty = u16::from_be_bytes([src[4], src[5]]);
        let (flags, reserved) = (src[6], src[7]);
        if len > self.max_payload {
            return Err(FrameError::Oversized {
                ty,
                len,
                max: self.max_payload,
            });
        }
        if flags != 0 || reserved != 0 {
            return Err(FrameError::ReservedBits {
                ty,
                flags,
                reserved,
            });
        }
        // `len <= max_payload <= 16 MiB`, so this cannot overflow usize.
        let total = HEADER_LEN + len as usize + TRAILER_LEN;
        if src.len() < total {
            // No reserve for the announced length: memory grows with bytes that actually
            // arrive, not with what a peer claims it will send.
            return Ok(None);
        }
        let body_end = HEADER_LEN + len as usize;
        let expected = crc32c::crc32c(&src[..body_end]);
        let actual = u32::from_be_bytes([
            src[body_end],
            src[body_end + 1],
            src[body_end + 2],
            src[body_end + 3],
        ]);
        if expected != actual {
            return Err(FrameError::BadChecksum {
                ty,
                len,
                actual,
                expected,
            });
        }
        let mut whole = src.split_to(total);
        whole.advance(HEADER_LEN);
        whole.truncate(len as usize);
        Ok(Some(Frame {
            ty: FrameType(ty),
            payload: whole.freeze(),
        }))
    }

    /// Called when the stream has ended: `Ok(())` if nothing is left over, else
    /// [`FrameError::Truncated`].
    pub fn decode_eof(&self, src: &BytesMut) -> Result<(), FrameError> {
        if src.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: src.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::handshake().encode(frame, &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip() {
        let codec = FrameCodec::handshake();
        let frames = [
            Frame::new(FrameType::PING, &b"hello"[..]),
            Frame::new(FrameType::PONG, Bytes::new()),
            Frame::new(FrameType(0x8123), vec![7u8; 1000]),
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut buf).unwrap();
        }
        for f in &frames {
            assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert!(buf.is_empty());
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn layout_is_as_documented() {
        let buf = encoded(&Frame::new(FrameType::PING, &b"ab"[..]));
        assert_eq!(&buf[..8], &[0, 0, 0, 2, 0x00, 0x04, 0, 0]);
        assert_eq!(&buf[8..10], b"ab");
        let crc = crc32c::crc32c(&buf[..10]).to_be_bytes();
        assert_eq!(&buf[10..], &crc);
        assert_eq!(
            buf.len(),
            Frame::new(FrameType::PING, &b"ab"[..]).wire_len()
        );
    }

    #[test]
    fn truncated_frame_waits_then_fails_at_eof() {
        let codec = FrameCodec::handshake();
        let whole = encoded(&Frame::new(FrameType::PING, vec![1u8; 100]));
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(codec.decode(&mut part).unwrap(), None, "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed at cut {cut}");
            if cut > 0 {
                assert_eq!(
                    codec.decode_eof(&part),
                    Err(FrameError::Truncated { buffered: cut })
                );
            }
        }
    }

    #[test]
    fn oversized_is_rejected_from_the_header_alone() {
        let codec = FrameCodec::with_max_payload(4096);
        let mut buf = BytesMut::new();
        buf.put_u32(4097);
        buf.put_u16(FrameType::PING.0);
        buf.put_u16(0);
        assert_eq!(
            codec.decode(&mut buf),
            Err(FrameError::Oversized {
                ty: 4,
                len: 4097,
                max: 4096
            })
        );
        let big = Frame::new(FrameType::PING, vec![0u8; 4097]);
        assert!(matches!(
            codec.encode(&big, &mut BytesMut::new()),
            Err(FrameError::PayloadTooLarge { len: 4097, .. })
        ));
    }

    #[test]
    fn limit_is_clamped_to_hard_max() {
        assert_eq!(
            FrameCodec::with_max_payload(u32::MAX).max_payload(),
            HARD_MAX_PAYLOAD
        );
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let codec = FrameCodec::handshake();
        let whole = encoded(&Frame::new(FrameType::PING, &b"payload"[..]));
        for byte in 0..whole.len() {
            for bit in 0..8 {
                let mut bad = whole.clone();
                bad[byte] ^= 1 << bit;
                match codec.decode(&mut bad) {
                    Err(_) => {}
                    // A flip in the length field that makes the frame longer waits for bytes
                    // that never come: at EOF that is a truncation error.
                    Ok(None) => assert!(byte < 4 && codec.decode_eof(&bad).is_err()),
                    Ok(Some(f)) => panic!("flip of byte {byte} bit {bit} went unnoticed: {f:?}"),
                }
            }
        }
    }

    #[test]
    fn reserved_bits_are_rejected() {
        let codec = FrameCodec::handshake();
        let mut buf = encoded(&Frame::new(FrameType::PING, &b"x"[..]));
        buf[6] = 1;
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::ReservedBits { flags: 1, .. })
        ));
    }

    #[test]
    fn extension_bit() {
        assert!(FrameType(0x8001).is_extension());
        assert!(!FrameType::HELLO.is_extension());
        assert_eq!(FrameType(0x0999).name(), "unknown");
    }
}
