//! Data-plane frames of a transfer session (`docs/PROTOCOL.md`, "Transfer sessions").
//!
//! A session is a group of connections between the same two nodes, tagged by a random
//! session id. Objects (files, memory regions, streams) are cut into chunks carried by `DATA`
//! frames on any connection of the session; the receiver acknowledges the contiguous prefix it
//! has stored, and verifies a BLAKE3 digest of the whole object at the end.
//!
//! `DATA` has a fixed binary header instead of protobuf: it is the hot path, and its payload
//! should be sliceable without copying.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::frame::{Frame, FrameType};
use crate::msg::MessageError;

impl FrameType {
    /// First frame on every connection of a session: which session, which stream.
    pub const SESSION: Self = Self(0x0010);
    /// Sender announces an object; the receiver answers `OBJECT_STATE`.
    pub const OBJECT_BEGIN: Self = Self(0x0011);
    /// Receiver: how much of the object it already holds (resume point).
    pub const OBJECT_STATE: Self = Self(0x0012);
    /// A chunk of an object.
    pub const DATA: Self = Self(0x0013);
    /// Sender: the object is complete, with its size and digest.
    pub const OBJECT_END: Self = Self(0x0014);
    /// Receiver: the contiguous prefix of an object now stored.
    pub const ACK: Self = Self(0x0015);
    /// Receiver: the object is verified and stored, or failed.
    pub const OBJECT_DONE: Self = Self(0x0016);
    /// Sender, before a delta-encoded object: what does the receiver hold?
    pub const BASE_QUERY: Self = Self(0x0017);
    /// Receiver: a piece of its answer to `BASE_QUERY`.
    pub const BASE_INFO: Self = Self(0x0018);
    /// Sender: commit or abort a migration target; the receiver answers `OBJECT_DONE`.
    pub const MIGRATION: Self = Self(0x0019);
    /// A block of a live byte stream (a QEMU migration stream), see [`TunnelHeader`].
    pub const TUNNEL_DATA: Self = Self(0x001A);
    /// Receiver: a `TUNNEL_DATA` block was taken ([`TunnelAck`]).
    pub const TUNNEL_ACK: Self = Self(0x001B);
}

/// Most bytes one `TUNNEL_DATA` block may stand for (`raw_len`); a receiver refuses more.
pub const TUNNEL_MAX_RAW: u32 = 16 << 20;

/// `TunnelHeader::encoding`: the block is the bytes themselves.
pub const TUNNEL_RAW: u8 = 0;
/// `TunnelHeader::encoding`: the block is an HDE stream object of the bytes.
pub const TUNNEL_HDE_STREAM: u8 = 2;

/// The header of a `TUNNEL_DATA` frame: `seq` u64, `raw_len` u32, `encoding` u8, name length
/// u8, name (UTF-8), all big-endian; the block follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelHeader {
    /// The stream's name (the VM).
    pub name: String,
    /// Block number, from 0, in stream order.
    pub seq: u64,
    /// Bytes the block stands for.
    pub raw_len: u32,
    /// [`TUNNEL_RAW`] or [`TUNNEL_HDE_STREAM`].
    pub encoding: u8,
}

/// Builds a `TUNNEL_DATA` frame.
pub fn encode_tunnel_data(h: &TunnelHeader, block: &[u8]) -> Result<Frame, MessageError> {
    let name = h.name.as_bytes();
    let name_len = u8::try_from(name.len()).map_err(|_| MessageError {
        frame: "tunnel_data",
        detail: format!("stream name of {} bytes (at most 255)", name.len()),
    })?;
    let mut p = BytesMut::with_capacity(14 + name.len() + block.len());
    p.put_u64(h.seq);
    p.put_u32(h.raw_len);
    p.put_u8(h.encoding);
    p.put_u8(name_len);
    p.put_slice(name);
    p.put_slice(block);
    Ok(Frame::new(FrameType::TUNNEL_DATA, p.freeze()))
}

/// Splits a `TUNNEL_DATA` frame into header and block (no copy of the block).
pub fn decode_tunnel_data(frame: &Frame) -> Result<(TunnelHeader, Bytes), MessageError> {
    let bad = |detail: String| MessageError {
        frame: "tunnel_data",
        detail,
    };
    let mut p = frame.payload.clone();
    if p.len() < 14 {
        return Err(bad(format!("{} bytes, shorter than the header", p.len())));
    }
    let seq = p.get_u64();
    let raw_len = p.get_u32();
    let encoding = p.get_u8();
    let name_len = usize::from(p.get_u8());
    if p.len() < name_len {
        return Err(bad(format!("name of {name_len} bytes runs past the frame")));
    }
    let name = String::from_utf8(p.split_to(name_len).to_vec())
        .map_err(|_| bad("name is not UTF-8".into()))?;
    if encoding != TUNNEL_RAW && encoding != TUNNEL_HDE_STREAM {
        return Err(bad(format!("unknown block encoding {encoding}")));
    }
    if encoding == TUNNEL_RAW && p.len() != raw_len as usize {
        return Err(bad(format!(
            "raw block of {} bytes announced as {raw_len}",
            p.len()
        )));
    }
    Ok((
        TunnelHeader {
            name,
            seq,
            raw_len,
            encoding,
        },
        p,
    ))
}

/// `TUNNEL_ACK` (0x001B).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct TunnelAck {
    /// The stream's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The block taken.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// 0: taken. Otherwise an [`crate::ErrorCode`]: `DELTA_UNRESOLVED` asks for the block
    /// again without references; anything else fails the stream.
    #[prost(uint32, tag = "3")]
    pub code: u32,
    /// Why, when `code` is not 0.
    #[prost(string, tag = "4")]
    pub reason: String,
}

/// `ObjectBegin::encoding`: an HDE page object applied in place to the migration target
/// `name` (live-migration rounds; no content digest, the target is published by
/// `MIGRATION` commit).
pub const ENCODING_HDE_PAGES_INPLACE: u32 = 3;

/// `Migration::op`: publish the migration target under its name.
pub const MIGRATION_COMMIT: u32 = 1;
/// `Migration::op`: delete the migration target.
pub const MIGRATION_ABORT: u32 = 2;
/// `Migration::op`: connect to the local QEMU waiting for the incoming migration of the VM
/// `name` and feed it the stream segments that follow (objects `NAME.qemu.SEQ`).
pub const MIGRATION_QEMU_OPEN: u32 = 3;
/// `Migration::op`: the stream of `name` ended after `segments` segments: feed the rest,
/// close, and answer once QEMU has loaded it (the answer's `reason` is a JSON detail).
pub const MIGRATION_QEMU_FINISH: u32 = 4;
/// `Migration::op`: give up the incoming QEMU migration of `name` (close its stream, drop
/// segments not fed yet).
pub const MIGRATION_QEMU_ABORT: u32 = 5;
/// `Migration::op`: the bytes the destination QEMU of `name` wrote back on its migration
/// socket (QEMU's return path, open under post-copy), from stream offset `segments` on: the
/// sender holds everything before it. Answered within a fraction of a second, with
/// [`ObjectDone::data`] empty when nothing came meanwhile, and `reason` `end` once QEMU
/// closed its side and every byte is delivered.
pub const MIGRATION_QEMU_RETURN: u32 = 6;
/// `Migration::op`: resume the post-copy migration of `name` that a broken stream left
/// paused (QEMU's `postcopy-paused`): stop what is left of its earlier stream (keeping the
/// destination QEMU's monitor), have that QEMU listen again (`migrate-recover`), and feed it
/// the segments of a new stream carried by the tunnel session `stream_session` (numbered
/// from 0; QEMU's own resume handshake, then the pages still at the source), connecting to
/// QEMU with its first block, and carrying its return path as under [`MIGRATION_QEMU_OPEN`]
/// with `postcopy`. The answer's `reason` is JSON (`{"postcopy":true,"recovered":true}`).
/// A node that predates it refuses the op.
pub const MIGRATION_QEMU_RECOVER: u32 = 7;

/// `MIGRATION` (0x0019).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Migration {
    /// Id echoed in the `OBJECT_DONE` answer.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// [`MIGRATION_COMMIT`] or [`MIGRATION_ABORT`].
    #[prost(uint32, tag = "2")]
    pub op: u32,
    /// The target's name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// [`MIGRATION_QEMU_FINISH`]: how many segments the stream had.
    #[prost(uint64, tag = "4")]
    pub segments: u64,
    /// [`MIGRATION_QEMU_FINISH`]: the BLAKE3 digest (32 bytes) of the whole stream.
    #[prost(bytes = "vec", tag = "5")]
    pub blake3: Vec<u8>,
    /// [`MIGRATION_QEMU_OPEN`]: turn on QEMU's post-copy (`postcopy-ram`) in the destination
    /// QEMU and carry its return path ([`MIGRATION_QEMU_RETURN`]); every byte of the stream
    /// then goes to QEMU as it comes (the source QEMU ends its stream only once the
    /// destination has loaded it). The answer's `reason` is JSON: `{"postcopy":true}`, or
    /// `false` with a `why`. A node that predates the field answers an empty `reason`.
    #[prost(bool, tag = "6")]
    pub postcopy: bool,
    /// QEMU ops on a stream (3 to 7): the session id of the tunnel that carries it, when the
    /// sender tells. A stream opened ([`MIGRATION_QEMU_OPEN`]) or resumed
    /// ([`MIGRATION_QEMU_RECOVER`]) with it takes blocks only from that session, and refuses
    /// a request naming another: an earlier stream's blocks and requests, still in flight,
    /// must not reach the new one.
    #[prost(bytes = "vec", tag = "7")]
    pub stream_session: Vec<u8>,
    /// [`MIGRATION_QEMU_OPEN`], [`MIGRATION_QEMU_RECOVER`]: how long the source keeps dialling when it loses the link
    /// (its retry period), in seconds. The destination waits that much longer for the
    /// stream's next block before it gives the migration up (0: its own limit alone).
    #[prost(uint64, tag = "8")]
    pub wait_secs: u64,
}

/// `ObjectBegin::encoding`: the object is the content itself.
pub const ENCODING_RAW: u32 = 0;
/// `ObjectBegin::encoding`: the object is an HDE page object of the content.
pub const ENCODING_HDE_PAGES: u32 = 1;
/// `ObjectBegin::encoding`: the object is an HDE stream object of the content.
pub const ENCODING_HDE_STREAM: u32 = 2;

/// `BaseInfo::part`: the receiver's cache summary (an HDE summary).
pub const BASE_PART_SUMMARY: u32 = 0;
/// `BaseInfo::part`: summary hashes (u64 little-endian) of each page of the receiver's current
/// copy of the named object, if it has one of the same size.
pub const BASE_PART_PAGES: u32 = 1;

/// `BaseInfo::copy`: not said (a receiver before this field, or one that gives no page
/// hashes at all).
pub const BASE_COPY_UNSAID: u32 = 0;
/// `BaseInfo::copy`: the page hashes are those of the copy.
pub const BASE_COPY_HASHED: u32 = 1;
/// `BaseInfo::copy`: no copy of that name and size (absent, or of another size).
pub const BASE_COPY_NONE: u32 = 2;
/// `BaseInfo::copy`: something is there under that name, and could not be opened or read
/// (out of descriptors, an I/O error, a dangling link, not a regular file, too many pages):
/// what it holds is not known.
pub const BASE_COPY_UNREADABLE: u32 = 3;
/// `BaseInfo::copy`: the receiver could not look whether anything is there (no permission
/// on the directory, an I/O error): whether it has a copy is not known.
pub const BASE_COPY_UNKNOWN: u32 = 4;

/// Bytes of the `DATA` header: object id and offset, both u64 big-endian.
pub const DATA_HEADER_LEN: usize = 16;

/// Length of a session id.
pub const SESSION_ID_LEN: usize = 16;

/// `SESSION` (0x0010).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SessionJoin {
    /// Random id chosen by the sender, [`SESSION_ID_LEN`] bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub session_id: Vec<u8>,
    /// Index of this connection in the session, from 0.
    #[prost(uint32, tag = "2")]
    pub stream_index: u32,
}

/// `OBJECT_BEGIN` (0x0011).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct ObjectBegin {
    /// Object id, unique within the session.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// Name (a relative file name for files).
    #[prost(string, tag = "2")]
    pub name: String,
    /// Size in bytes.
    #[prost(uint64, tag = "3")]
    pub size: u64,
    /// Identifies this version of the content (e.g. size and modification time), so that a
    /// receiver only resumes a partial copy of the same content.
    #[prost(string, tag = "4")]
    pub version_tag: String,
    /// How the bytes encode the content: [`ENCODING_RAW`] or an HDE object (only when the
    /// handshake negotiated `delta`).
    #[prost(uint32, tag = "5")]
    pub encoding: u32,
    /// For an encoded object: the size of the content it decodes to.
    #[prost(uint64, tag = "6")]
    pub raw_size: u64,
    /// For an encoded object: the BLAKE3 digest of the content it decodes to (32 bytes).
    #[prost(bytes = "vec", tag = "7")]
    pub raw_blake3: Vec<u8>,
    /// For an in-place migration round (v6 and later): once the round is applied, commit its
    /// migration target, as `MIGRATION` commit would, before answering. A success answer then
    /// says the target is published. Such a round never creates the target (the target is
    /// gone once committed, so a copy of the round sent again is refused, never applied to a
    /// new, empty target).
    #[prost(bool, tag = "8")]
    pub commit: bool,
    /// Something waits on this object (a migration's final round, with the guest paused):
    /// the sender sends its chunks twice, over different streams (up to 1 MiB; a larger one
    /// goes once, and a chunk below what the receiver lists as held goes again). The receiver then
    /// acknowledges every chunk, lists what it holds beyond a hole ([`Ack::islands`]), and
    /// sends the object's `OBJECT_DONE` on every stream of the session, so that neither
    /// waits behind a lost packet of one stream. Receivers that do not know the field
    /// ignore it (DWCP's ignore it for objects over 16 MiB); senders ignore repeated
    /// answers.
    #[prost(bool, tag = "9")]
    pub urgent: bool,
    /// For an in-place migration round: at most how many bytes of pages that are not zero
    /// the round writes into its target (zero pages become holes). The receiver checks its
    /// free space against this rather than `raw_size`, which a round of a few dirty pages,
    /// or a first round of a VM whose pages are a third zero, would never need. Absent: the
    /// receiver counts `raw_size`.
    #[prost(uint64, optional, tag = "10")]
    pub writes: Option<u64>,
}

/// `BASE_QUERY` (0x0017).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct BaseQuery {
    /// Id the answer will carry (the id the object will have).
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// Name the object will have.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Size of the content.
    #[prost(uint64, tag = "3")]
    pub raw_size: u64,
    /// Page size for the page hashes (0: no page hashes wanted).
    #[prost(uint32, tag = "4")]
    pub page_size: u32,
    /// Hash the migration target `name` (rounds applied so far) rather than the published file.
    #[prost(bool, tag = "5")]
    pub migration_target: bool,
}

/// `BASE_INFO` (0x0018): one piece of one part of the answer; parts are sent in order, each in
/// pieces at increasing offsets, and every part at least once (possibly empty).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct BaseInfo {
    /// The query's object id.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// [`BASE_PART_SUMMARY`] or [`BASE_PART_PAGES`].
    #[prost(uint32, tag = "2")]
    pub part: u32,
    /// Position of `data` in the part.
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    /// Length of the whole part.
    #[prost(uint64, tag = "4")]
    pub total: u64,
    /// The bytes.
    #[prost(bytes = "vec", tag = "5")]
    pub data: Vec<u8>,
    /// In [`BASE_PART_PAGES`]: what the receiver's copy is (`BASE_COPY_*`), so that an empty
    /// list tells "no copy" from "a copy that cannot be read".
    #[prost(uint32, tag = "6")]
    pub copy: u32,
}

/// `OBJECT_STATE` (0x0012).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct ObjectState {
    /// Object id.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// Bytes from the start the receiver already holds and will keep; the sender starts there.
    #[prost(uint64, tag = "2")]
    pub have: u64,
}

/// `OBJECT_END` (0x0014).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct ObjectEnd {
    /// Object id.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// Size in bytes.
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// BLAKE3 digest of the whole object, 32 bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub blake3: Vec<u8>,
}

/// `ACK` (0x0015).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Ack {
    /// Object id.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// Every byte below this offset is stored.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    /// Bytes of the object stored in all (the prefix and what arrived beyond a hole); 0 from
    /// receivers that do not say.
    #[prost(uint64, tag = "3")]
    pub received: u64,
    /// For an urgent object ([`ObjectBegin::urgent`]): the byte ranges held beyond `offset`,
    /// as start and end (exclusive) pairs in ascending order, at most [`MAX_ACK_ISLANDS`]
    /// of them (the lowest). Empty otherwise.
    #[prost(uint64, repeated, tag = "4")]
    pub islands: Vec<u64>,
}

/// Most ranges an [`Ack`] lists.
pub const MAX_ACK_ISLANDS: usize = 32;

impl Ack {
    /// The listed ranges as `(start, end)` pairs, checked: pairs, each non-empty, above the
    /// prefix, ascending and apart, no more than [`MAX_ACK_ISLANDS`], none past `limit`.
    pub fn ranges(&self, limit: u64) -> Result<Vec<(u64, u64)>, String> {
        if !self.islands.len().is_multiple_of(2) || self.islands.len() > 2 * MAX_ACK_ISLANDS {
            return Err(format!(
                "ACK for object {} lists {} range bounds: pairs, at most {MAX_ACK_ISLANDS} of them",
                self.object,
                self.islands.len()
            ));
        }
        let mut floor = self.offset;
        let mut out = Vec::with_capacity(self.islands.len() / 2);
        for p in self.islands.chunks_exact(2) {
            let (start, end) = (p[0], p[1]);
            if start <= floor || end <= start || end > limit {
                return Err(format!(
                    "ACK for object {} lists the range {start}..{end} (prefix {}, previous end \
                     {floor}, {limit} bytes sent)",
                    self.object, self.offset
                ));
            }
            out.push((start, end));
            floor = end;
        }
        Ok(out)
    }
}

/// `OBJECT_DONE` (0x0016).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct ObjectDone {
    /// Object id.
    #[prost(uint64, tag = "1")]
    pub object: u64,
    /// 0 when stored and verified, else an [`crate::ErrorCode`].
    #[prost(uint32, tag = "2")]
    pub code: u32,
    /// Why it failed.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// [`MIGRATION_QEMU_RETURN`]: the return path's bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub data: Vec<u8>,
}

/// The header of a `DATA` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Object id.
    pub object: u64,
    /// Offset of the first byte of the chunk within the object.
    pub offset: u64,
}

/// Builds a `DATA` frame. The chunk is copied once, into the frame payload.
pub fn encode_data(object: u64, offset: u64, chunk: &[u8]) -> Frame {
    let mut p = BytesMut::with_capacity(DATA_HEADER_LEN + chunk.len());
    p.put_u64(object);
    p.put_u64(offset);
    p.put_slice(chunk);
    Frame::new(FrameType::DATA, p.freeze())
}

/// The bytes around a chunk that make it a whole `DATA` frame on the wire: the frame header
/// with the `DATA` header (24 bytes) before it, the CRC-32C (4 bytes) after it. Lets a writer
/// send the chunk from where it lies, without copying it into a frame buffer.
pub fn data_frame_parts(
    codec: &crate::FrameCodec,
    object: u64,
    offset: u64,
    chunk: &[u8],
) -> Result<([u8; 8 + DATA_HEADER_LEN], [u8; 4]), crate::FrameError> {
    let len = DATA_HEADER_LEN + chunk.len();
    let len32 = u32::try_from(len)
        .ok()
        .filter(|l| *l <= codec.max_payload())
        .ok_or(crate::FrameError::PayloadTooLarge {
            len,
            max: codec.max_payload(),
        })?;
    let mut head = [0u8; 8 + DATA_HEADER_LEN];
    head[..4].copy_from_slice(&len32.to_be_bytes());
    head[4..6].copy_from_slice(&FrameType::DATA.0.to_be_bytes());
    head[8..16].copy_from_slice(&object.to_be_bytes());
    head[16..24].copy_from_slice(&offset.to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), chunk);
    Ok((head, crc.to_be_bytes()))
}

/// Splits a `DATA` frame into header and chunk (no copy).
pub fn decode_data(frame: &Frame) -> Result<(DataHeader, Bytes), MessageError> {
    if frame.payload.len() < DATA_HEADER_LEN {
        return Err(MessageError {
            frame: "data",
            detail: format!(
                "{} bytes, shorter than the {DATA_HEADER_LEN}-byte header",
                frame.payload.len()
            ),
        });
    }
    let mut p = frame.payload.clone();
    let object = p.get_u64();
    let offset = p.get_u64();
    if offset.checked_add(p.len() as u64).is_none() {
        return Err(MessageError {
            frame: "data",
            detail: format!("chunk at offset {offset} overflows 64 bits"),
        });
    }
    Ok((DataHeader { object, offset }, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_islands_are_checked() {
        let ack = |offset: u64, islands: &[u64]| Ack {
            object: 3,
            offset,
            received: 0,
            islands: islands.to_vec(),
        };
        assert_eq!(ack(10, &[]).ranges(100), Ok(vec![]));
        assert_eq!(
            ack(10, &[20, 30, 40, 100]).ranges(100),
            Ok(vec![(20, 30), (40, 100)])
        );
        // Round trip through the wire format.
        let a = ack(10, &[20, 30]);
        let f = crate::msg::encode(FrameType::ACK, &a);
        assert_eq!(crate::msg::decode::<Ack>(&f).unwrap(), a);
        for (offset, bad) in [
            (10, &[20][..]),         // not pairs
            (10, &[10, 30]),         // touches the prefix
            (10, &[5, 30]),          // below it
            (10, &[30, 30]),         // empty
            (10, &[40, 50, 20, 30]), // not ascending
            (10, &[20, 30, 30, 40]), // adjacent
            (10, &[20, 101]),        // past what was sent
        ] {
            let e = ack(offset, bad).ranges(100).unwrap_err();
            assert!(e.contains("ACK for object 3"), "{e}");
        }
        let many: Vec<u64> = (0..2 * MAX_ACK_ISLANDS as u64 + 2)
            .map(|i| 20 + 2 * i)
            .collect();
        assert!(ack(10, &many).ranges(1000).is_err());
        assert!(ack(10, &many[..2 * MAX_ACK_ISLANDS]).ranges(1000).is_ok());
    }

    #[test]
    fn tunnel_data_round_trip_and_bad_input() {
        let h = TunnelHeader {
            name: "vm-1".into(),
            seq: 42,
            raw_len: 3,
            encoding: TUNNEL_RAW,
        };
        let f = encode_tunnel_data(&h, b"abc").unwrap();
        let (h2, block) = decode_tunnel_data(&f).unwrap();
        assert_eq!(h2, h);
        assert_eq!(&block[..], b"abc");
        for cut in 0..f.payload.len() - 3 {
            let short = Frame::new(FrameType::TUNNEL_DATA, f.payload.slice(..cut));
            assert!(decode_tunnel_data(&short).is_err(), "cut at {cut}");
        }
        let mut wrong = f.payload.to_vec();
        wrong[12] = 9;
        assert!(decode_tunnel_data(&Frame::new(FrameType::TUNNEL_DATA, wrong)).is_err());
        let long = TunnelHeader {
            name: "x".repeat(300),
            ..h
        };
        assert!(encode_tunnel_data(&long, b"").is_err());
    }

    #[test]
    fn data_round_trip_and_layout() {
        let f = encode_data(7, 1 << 40, b"abc");
        assert_eq!(&f.payload[..8], &7u64.to_be_bytes());
        assert_eq!(&f.payload[8..16], &(1u64 << 40).to_be_bytes());
        let (h, chunk) = decode_data(&f).unwrap();
        assert_eq!(
            h,
            DataHeader {
                object: 7,
                offset: 1 << 40
            }
        );
        assert_eq!(&chunk[..], b"abc");
    }

    #[test]
    fn frame_parts_equal_the_encoded_frame() {
        let codec = crate::FrameCodec::with_max_payload(1 << 20);
        let chunk = vec![9u8; 1000];
        let (head, tail) = data_frame_parts(&codec, 3, 4096, &chunk).unwrap();
        let mut whole = head.to_vec();
        whole.extend_from_slice(&chunk);
        whole.extend_from_slice(&tail);
        let mut expected = BytesMut::new();
        codec
            .encode(&encode_data(3, 4096, &chunk), &mut expected)
            .unwrap();
        assert_eq!(whole, expected.to_vec());
        let small = crate::FrameCodec::with_max_payload(4096);
        assert!(data_frame_parts(&small, 1, 0, &[0u8; 4096]).is_err());
    }

    #[test]
    fn short_or_overflowing_data_is_rejected() {
        assert!(decode_data(&Frame::new(FrameType::DATA, vec![0u8; 15])).is_err());
        let f = encode_data(1, u64::MAX, b"x");
        assert!(decode_data(&f).is_err());
        let f = encode_data(1, u64::MAX, b"");
        assert!(decode_data(&f).is_ok());
    }
}
