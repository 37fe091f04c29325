//! Fuzz bodies, shared by the cargo-fuzz targets in `fuzz/` and the proptests below, so that
//! stable CI runs the same checks without nightly.

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    reason = "fuzz bodies report a failed check by panicking, as libFuzzer expects"
)]

use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::frame::{FrameCodec, FrameType};
use crate::handshake::{Handshake, LocalParams, Outcome, Version};
use crate::ids::{ClusterId, NodeId};
use crate::msg::{self, Capabilities, Close, Hello, HelloAck, Ping};

/// Splits arbitrary bytes into frames. Checks: no panic; every accepted frame re-encodes to
/// exactly the bytes it came from; nothing beyond the limit is ever accepted; every message
/// decoder survives every payload.
pub fn frames(data: &[u8]) {
    let codec = FrameCodec::with_max_payload(4096);
    let mut buf = BytesMut::from(data);
    let mut consumed = 0usize;
    // Each decoded frame consumes at least 12 bytes, so this loop is bounded by data.len().
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                let used = before - buf.len();
                assert!(frame.payload.len() <= codec.max_payload() as usize);
                assert_eq!(used, frame.wire_len());
                let mut again = BytesMut::new();
                codec.encode(&frame, &mut again).unwrap_or_else(|e| {
                    panic!("accepted frame does not re-encode: {e}");
                });
                assert_eq!(&again[..], &data[consumed..consumed + used]);
                consumed += used;
                let _ = msg::decode::<Hello>(&frame);
                let _ = msg::decode::<HelloAck>(&frame);
                let _ = msg::decode::<Close>(&frame);
                let _ = msg::decode::<Ping>(&frame);
                data_plane(&frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) must not consume");
                break;
            }
            Err(_) => break,
        }
    }
}

/// Every data-plane decoder on one frame's payload, whatever its type: no panic, and what
/// the hand-written ones accept is consistent with the payload.
fn data_plane(frame: &crate::frame::Frame) {
    use crate::data::{
        Ack, BaseInfo, BaseQuery, Migration, ObjectBegin, ObjectDone, ObjectEnd, ObjectState,
        SessionJoin, TunnelAck, decode_data, decode_tunnel_data,
    };
    let _ = msg::decode::<SessionJoin>(frame);
    let _ = msg::decode::<ObjectBegin>(frame);
    let _ = msg::decode::<BaseQuery>(frame);
    let _ = msg::decode::<BaseInfo>(frame);
    let _ = msg::decode::<ObjectState>(frame);
    let _ = msg::decode::<ObjectEnd>(frame);
    let _ = msg::decode::<Ack>(frame);
    let _ = msg::decode::<ObjectDone>(frame);
    let _ = msg::decode::<Migration>(frame);
    let _ = msg::decode::<TunnelAck>(frame);
    if let Ok((_, chunk)) = decode_data(frame) {
        assert!(
            chunk.len() < frame.payload.len(),
            "a chunk is within its frame"
        );
    }
    if let Ok((h, block)) = decode_tunnel_data(frame) {
        assert!(
            block.len() < frame.payload.len(),
            "a block is within its frame"
        );
        assert!(h.name.len() <= 255);
        if h.encoding == crate::data::TUNNEL_RAW {
            assert_eq!(
                block.len(),
                h.raw_len as usize,
                "a raw block is its announced size"
            );
        }
    }
}

fn local(node: &str) -> LocalParams {
    LocalParams {
        node_id: NodeId::new(node).unwrap_or_else(|e| panic!("{e}")),
        cluster_id: ClusterId::new("fuzz").unwrap_or_else(|e| panic!("{e}")),
        versions: Version::ALL.to_vec(),
        capabilities: Capabilities {
            max_streams: 8,
            codecs: vec!["zstd".into()],
            quic: false,
            delta: true,
            max_frame_size: 4096,
        },
        timeout: Duration::from_secs(1),
    }
}

/// Feeds arbitrary bytes, as frames, to both sides of a handshake. Checks: no panic; the
/// machine settles; a failed machine queues exactly one `REJECT`; a server that succeeds
/// answers with exactly one `HELLO_ACK`.
pub fn handshake(data: &[u8]) {
    // The harness is the driver here: it owns the clock it passes in.
    #[expect(
        clippy::disallowed_methods,
        reason = "a fuzz harness is a driver, not the core"
    )]
    let now = Instant::now();
    let peer = NodeId::new("peer").unwrap_or_else(|e| panic!("{e}"));
    for server in [true, false] {
        let mut hs = if server {
            Handshake::server(local("me"), peer.clone(), now)
        } else {
            let mut c = Handshake::client(local("me"), peer.clone(), now);
            assert_eq!(c.poll_transmit().map(|f| f.ty), Some(FrameType::HELLO));
            c
        };
        let codec = FrameCodec::handshake();
        let mut buf = BytesMut::from(data);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => hs.handle_frame(frame),
                Ok(None) => break,
                Err(e) => {
                    hs.handle_frame_error(e);
                    break;
                }
            }
        }
        hs.handle_timeout(now + Duration::from_secs(2));
        let sent: Vec<_> = std::iter::from_fn(|| hs.poll_transmit()).collect();
        match hs.outcome() {
            Outcome::InProgress => panic!("a handshake past its deadline must be settled"),
            Outcome::Established(_) => {
                let acks = sent.iter().filter(|f| f.ty == FrameType::HELLO_ACK).count();
                assert_eq!(acks, usize::from(server));
            }
            Outcome::Failed(_) => {
                assert!(sent.len() <= 2);
                assert!(
                    sent.iter().filter(|f| f.ty == FrameType::REJECT).count() <= 1,
                    "at most one REJECT"
                );
            }
        }
    }
}

/// Seed inputs for both fuzz targets: every message type, valid and slightly broken. The
/// committed corpus in `fuzz/corpus/` is exactly this list (a test checks it; set
/// `DWCP_BLESS_CORPUS=1` when running that test to rewrite it after a format change).
pub fn seed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let codec = FrameCodec::handshake();
    let frame = |ty: FrameType, payload: Vec<u8>| {
        let mut buf = BytesMut::new();
        // Payloads here are far below the handshake limit.
        let _ = codec.encode(&crate::frame::Frame::new(ty, payload), &mut buf);
        buf.to_vec()
    };
    let local = local("peer");
    let hello = Hello {
        versions: vec![1, 3],
        node_id: "peer".into(),
        cluster_id: "fuzz".into(),
        capabilities: Some(local.capabilities.clone()),
    };
    let ack = HelloAck {
        version: 3,
        node_id: "peer".into(),
        cluster_id: "fuzz".into(),
        capabilities: Some(local.capabilities.clone()),
        negotiated: Some(local.capabilities),
        versions: vec![1, 3],
    };
    let ping = Ping {
        seq: 7,
        timestamp_micros: 1,
        sender_tcp_retransmits: 2,
        sender_tcp_segments: 300,
    };
    let close = Close::new(crate::ErrorCode::PROTOCOL_ERROR, "bad");
    use prost::Message as _;
    let hello_bytes = frame(FrameType::HELLO, hello.encode_to_vec());
    let mut flipped = hello_bytes.clone();
    if let Some(b) = flipped.get_mut(10) {
        *b ^= 0x01;
    }
    let mut two = hello_bytes.clone();
    two.extend(frame(FrameType::PING, ping.encode_to_vec()));
    vec![
        ("hello", hello_bytes.clone()),
        (
            "hello_ack",
            frame(FrameType::HELLO_ACK, ack.encode_to_vec()),
        ),
        ("ping", frame(FrameType::PING, ping.encode_to_vec())),
        ("pong", frame(FrameType::PONG, ping.encode_to_vec())),
        ("reject", frame(FrameType::REJECT, close.encode_to_vec())),
        ("goaway", frame(FrameType::GOAWAY, close.encode_to_vec())),
        ("extension", frame(FrameType(0x8001), b"ext".to_vec())),
        ("hello_then_ping", two),
        ("hello_bad_crc", flipped),
        (
            "hello_truncated",
            hello_bytes[..hello_bytes.len() / 2].to_vec(),
        ),
    ]
}

#[cfg(test)]
mod corpus {
    use std::path::PathBuf;

    use super::*;

    /// The committed seed corpus matches [`seed_corpus`], and every seed passes both bodies.
    #[test]
    fn committed_corpus_is_current() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let bless = std::env::var_os("DWCP_BLESS_CORPUS").is_some();
        for target in ["frame", "handshake"] {
            for (name, bytes) in seed_corpus() {
                frames(&bytes);
                handshake(&bytes);
                let path = root.join(target).join(format!("seed-{name}"));
                if bless {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                }
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (bless with DWCP_BLESS_CORPUS=1)", path.display())
                });
                assert_eq!(on_disk, bytes, "{} is stale", path.display());
            }
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;
    use crate::frame::Frame;

    /// Bytes that are mostly valid frames, so the fuzz bodies reach past the checksum.
    fn framed() -> impl Strategy<Value = Vec<u8>> {
        let frame = (
            prop_oneof![Just(1u16), Just(2), Just(3), Just(4), Just(6), any::<u16>()],
            proptest::collection::vec(any::<u8>(), 0..200),
        );
        (
            proptest::collection::vec(frame, 0..4),
            any::<Option<(usize, u8)>>(),
        )
            .prop_map(|(frames, flip)| {
                let codec = FrameCodec::handshake();
                let mut buf = BytesMut::new();
                for (ty, payload) in frames {
                    codec
                        .encode(&Frame::new(FrameType(ty), payload), &mut buf)
                        .unwrap();
                }
                let mut v = buf.to_vec();
                if let Some((i, x)) = flip
                    && !v.is_empty()
                {
                    let n = v.len();
                    v[i % n] ^= x;
                }
                v
            })
    }

    fn valid_hello() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(0u32..5, 0..5),
            prop_oneof![Just("peer".to_string()), "[a-z]{1,8}"],
            prop_oneof![Just("fuzz".to_string()), "[a-z]{1,5}"],
            0u32..600,
            proptest::collection::vec("[a-z0-9]{0,40}", 0..20),
            1024u32..20_000_000,
        )
            .prop_map(|(versions, node, cluster, streams, codecs, mfs)| {
                let hello = Hello {
                    versions,
                    node_id: node,
                    cluster_id: cluster,
                    capabilities: Some(Capabilities {
                        max_streams: streams,
                        codecs,
                        quic: true,
                        delta: false,
                        max_frame_size: mfs,
                    }),
                };
                let mut buf = BytesMut::new();
                FrameCodec::handshake()
                    .encode(&msg::encode(FrameType::HELLO, &hello), &mut buf)
                    .unwrap();
                buf.to_vec()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn frames_arbitrary(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            frames(&data);
        }

        #[test]
        fn frames_mostly_valid(data in framed()) {
            frames(&data);
        }

        #[test]
        fn handshake_arbitrary(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            handshake(&data);
        }

        #[test]
        fn handshake_mostly_valid(data in framed()) {
            handshake(&data);
        }

        #[test]
        fn handshake_hello_fields(data in valid_hello()) {
            handshake(&data);
        }
    }
}
