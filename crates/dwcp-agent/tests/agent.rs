//! Agents on loopback: handshakes, version matrix, refused certificates, stalled and
//! misbehaving peers, admin endpoints, shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::BytesMut;
use dwcp_testkit::{
    RunningAgent, TestCluster, dangerous_no_client_cert_config, endpoint, endpoint_with, http_get,
    metric_value, raw_tls, read_until_closed, settings,
};
use dwcp_transport::{ConnError, connect};
use dwcp_wire::msg::{self, Close};
use dwcp_wire::{ErrorCode, Frame, FrameCodec, FrameType, HandshakeError, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PING_TIMEOUT: Duration = Duration::from_secs(5);

async fn failed(agent: &RunningAgent, reason: &str) -> f64 {
    metric_value(
        &agent.metrics().await,
        "dwcp_handshakes_total",
        &[("result", "failed"), ("reason", reason)],
    )
}

/// Waits (bounded) until the agent has counted a failed handshake with `reason`.
async fn wait_failed(agent: &RunningAgent, reason: &str) {
    for _ in 0..100 {
        if failed(agent, reason).await >= 1.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!(
        "no failed handshake with reason {reason}:\n{}",
        agent.metrics().await
    );
}

/// Frames sent back by the agent before it closed, decoded.
fn frames_in(bytes: &[u8]) -> Vec<Frame> {
    let codec = FrameCodec::handshake();
    let mut buf = BytesMut::from(bytes);
    std::iter::from_fn(|| codec.decode(&mut buf).ok().flatten()).collect()
}

fn close_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames
        .iter()
        .find(|f| f.ty == FrameType::REJECT || f.ty == FrameType::GOAWAY)
        .map(|f| msg::decode::<Close>(f).unwrap().error_code())
}

#[tokio::test]
async fn t10_handshake_ping_and_metrics() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let mut conn = connect(&ep, agent.addr).await.unwrap();
    let est = conn.established().clone();
    assert_eq!(est.version, Version::V6);
    assert_eq!(est.peer_node_id.as_str(), "server");
    assert_eq!(est.negotiated.max_streams, 512);
    assert_eq!(est.negotiated.codecs, vec!["zstd", "lz4"]);
    for seq in 0..5 {
        let rtt = conn.ping(seq, PING_TIMEOUT).await.unwrap();
        assert!(rtt < PING_TIMEOUT);
    }
    conn.close(ErrorCode::NO_ERROR, "done").await;

    let text = agent.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "dwcp_handshakes_total",
            &[("result", "ok"), ("version", "v6")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(&text, "dwcp_frames_received_total", &[("type", "ping")]),
        5.0
    );
    assert!(metric_value(&text, "dwcp_bytes_received_total", &[]) > 0.0);
    assert!(metric_value(&text, "dwcp_bytes_sent_total", &[]) > 0.0);
    assert_eq!(metric_value(&text, "dwcp_ready", &[]), 1.0);
    assert!(text.contains("dwcp_build_info{"), "{text}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t11_version_matrix() {
    let cluster = TestCluster::new();
    for (server, client, want) in [
        (vec![1, 3, 4, 5, 6], vec![1, 3, 4, 5, 6], Version::V6),
        (vec![1, 3, 4, 5, 6], vec![1, 3, 4, 5], Version::V5),
        (vec![1, 3, 4, 5], vec![1, 3, 4, 5], Version::V5),
        (vec![1, 3, 4, 5], vec![1, 3, 4], Version::V4),
        (vec![1, 3, 4], vec![1, 3, 4], Version::V4),
        (vec![1, 3, 4], vec![1, 3], Version::V3),
        (vec![1, 3], vec![1, 3, 4], Version::V3),
        (vec![1, 3], vec![1, 3], Version::V3),
        (vec![1, 3], vec![1], Version::V1),
        (vec![1], vec![1, 3], Version::V1),
        (vec![1], vec![1], Version::V1),
    ] {
        let sv = server.clone();
        let agent =
            RunningAgent::start(&cluster, "server", move |c| c.protocol.versions = sv).await;
        let cv = client.clone();
        let ep = endpoint(&cluster, "client", move |c| c.protocol.versions = cv);
        let mut conn = connect(&ep, agent.addr).await.unwrap();
        assert_eq!(conn.established().version, want, "{server:?} x {client:?}");
        if want == Version::V1 {
            assert_eq!(conn.established().negotiated.max_streams, 1);
            assert!(!conn.established().negotiated.delta);
        }
        conn.ping(1, PING_TIMEOUT).await.unwrap();
        conn.close(ErrorCode::NO_ERROR, "").await;
        agent.stop().await.unwrap();
    }
}

#[tokio::test]
async fn t12_no_common_version_is_refused() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.protocol.versions = vec![1]).await;
    let ep = endpoint(&cluster, "client", |c| c.protocol.versions = vec![3]);
    match connect(&ep, agent.addr).await {
        Err(ConnError::Handshake(HandshakeError::Rejected { code, reason })) => {
            assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);
            assert!(reason.contains("no protocol version in common"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    wait_failed(&agent, "unsupported_version").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t20_foreign_ca_is_refused_on_both_sides() {
    let ours = TestCluster::new();
    let foreign = TestCluster::new();
    let agent = RunningAgent::start(&ours, "server", |_| {}).await;

    // A client of another CA: it refuses the agent's certificate.
    let ep = endpoint(&foreign, "client", |_| {});
    let err = connect(&ep, agent.addr).await.unwrap_err();
    assert!(err.is_auth(), "{err:?}");
    assert!(
        err.to_string().contains("not issued by our cluster CA"),
        "{err}"
    );
    wait_failed(&agent, "certificate_refused_by_peer").await;

    // A client that trusts our CA but holds a foreign certificate: the agent refuses it.
    let mut creds = foreign.creds("intruder");
    creds.ca_certs = ours.creds("server").ca_certs;
    let ep = dwcp_testkit::intruder_endpoint(creds, &settings(&ours, |_| {}));
    let err = connect(&ep, agent.addr).await.unwrap_err();
    assert!(matches!(err, ConnError::CertificateRefused(_)), "{err:?}");
    assert!(err.to_string().contains("refused our certificate"), "{err}");
    wait_failed(&agent, "bad_peer_certificate").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t21_expired_certificate_is_refused() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint_with(cluster.expired_creds("old"), &settings(&cluster, |_| {}));
    let err = connect(&ep, agent.addr).await.unwrap_err();
    assert!(matches!(err, ConnError::CertificateRefused(_)), "{err:?}");
    wait_failed(&agent, "bad_peer_certificate").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t22_missing_client_certificate_is_refused() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    // TLS 1.3 lets the client finish before the server has judged its (absent) certificate;
    // the refusal arrives on the first read.
    if let Ok(mut tls) = raw_tls(dangerous_no_client_cert_config(), agent.addr).await {
        let _ = tls.write_all(b"hello?").await;
        read_until_closed(&mut tls, Duration::from_secs(5))
            .await
            .expect("agent must close the connection");
    }
    wait_failed(&agent, "bad_peer_certificate").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t22b_certificate_without_node_id_is_refused_during_tls() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint_with(cluster.anonymous_creds(), &settings(&cluster, |_| {}));
    let err = connect(&ep, agent.addr).await.unwrap_err();
    assert!(matches!(err, ConnError::CertificateRefused(_)), "{err:?}");
    wait_failed(&agent, "bad_peer_certificate").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t22c_expired_server_certificate_is_refused_by_the_dialler() {
    let cluster = TestCluster::new();
    let s = settings(&cluster, |_| {});
    let agent = RunningAgent::start_with(cluster.expired_creds("server"), &s).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let err = connect(&ep, agent.addr).await.unwrap_err();
    assert!(err.is_auth(), "{err:?}");
    assert!(err.to_string().contains("expired"), "{err}");
    wait_failed(&agent, "certificate_refused_by_peer").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t22d_dialler_can_insist_on_a_node() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let want: dwcp_wire::NodeId = "server".parse().unwrap();
    let mut ok = dwcp_transport::connect_to(&ep, agent.addr, Some(&want))
        .await
        .unwrap();
    ok.ping(1, PING_TIMEOUT).await.unwrap();
    ok.close(ErrorCode::NO_ERROR, "").await;
    let other: dwcp_wire::NodeId = "someone-else".parse().unwrap();
    match dwcp_transport::connect_to(&ep, agent.addr, Some(&other)).await {
        Err(e @ ConnError::WrongPeer { .. }) => assert!(e.is_auth()),
        other => panic!("{other:?}"),
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t23_identity_and_cluster_must_match() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;

    let mut ep = endpoint(&cluster, "alice", |_| {});
    ep.node_id = "mallory".parse().unwrap();
    match connect(&ep, agent.addr).await {
        Err(ConnError::Handshake(HandshakeError::Rejected { code, .. })) => {
            assert_eq!(code, ErrorCode::IDENTITY_MISMATCH)
        }
        other => panic!("{other:?}"),
    }
    wait_failed(&agent, "identity_mismatch").await;

    let mut ep = endpoint(&cluster, "alice", |_| {});
    ep.cluster_id = "elsewhere".parse().unwrap();
    match connect(&ep, agent.addr).await {
        Err(ConnError::Handshake(HandshakeError::Rejected { code, reason })) => {
            assert_eq!(code, ErrorCode::CLUSTER_MISMATCH);
            assert!(reason.contains("elsewhere"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t30_stalled_peers_are_timed_out() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| {
        c.protocol.tls_timeout_ms = 300;
        c.protocol.handshake_timeout_ms = 300;
    })
    .await;

    // Silent before TLS.
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(5))
        .await
        .expect("agent must drop a peer that never starts TLS");
    wait_failed(&agent, "tls_timeout").await;

    // Silent after TLS: the agent sends REJECT(TIMEOUT) and closes.
    let ep = endpoint(&cluster, "client", |_| {});
    let mut tls = raw_tls(ep.tls.client.clone(), agent.addr).await.unwrap();
    let got = read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .expect("agent must drop a peer that never sends HELLO");
    assert_eq!(close_code(&frames_in(&got)), Some(ErrorCode::TIMEOUT));
    wait_failed(&agent, "timeout").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t31_idle_connections_are_closed() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.protocol.idle_timeout_secs = 1).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let mut conn = connect(&ep, agent.addr).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), conn.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.ty, FrameType::GOAWAY);
    assert_eq!(
        msg::decode::<Close>(&got).unwrap().error_code(),
        ErrorCode::TIMEOUT
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t40_garbage_never_crashes_the_agent() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let codec = FrameCodec::handshake();

    // Not TLS at all.
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage")
        .await
        .unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(5))
        .await
        .unwrap();

    let mut attacks: Vec<(&str, Vec<u8>, ErrorCode)> = Vec::new();
    // Random bytes inside TLS.
    attacks.push((
        "garbage",
        (0..255u8).rev().collect(),
        ErrorCode::FRAME_TOO_LARGE,
    ));
    // A header announcing a frame beyond the handshake limit.
    let mut oversized = BytesMut::new();
    oversized.extend_from_slice(&(64 * 1024 * 1024u32).to_be_bytes());
    oversized.extend_from_slice(&[0, 1, 0, 0]);
    attacks.push(("oversized", oversized.to_vec(), ErrorCode::FRAME_TOO_LARGE));
    // A valid HELLO with one payload bit flipped.
    let mut good = BytesMut::new();
    codec
        .encode(&Frame::new(FrameType::HELLO, vec![1u8; 40]), &mut good)
        .unwrap();
    good[12] ^= 0x10;
    attacks.push(("corrupted", good.to_vec(), ErrorCode::BAD_CHECKSUM));
    // A well-framed HELLO whose payload is not a HELLO message.
    let mut junk = BytesMut::new();
    codec
        .encode(&Frame::new(FrameType::HELLO, vec![0xffu8; 40]), &mut junk)
        .unwrap();
    attacks.push(("junk hello", junk.to_vec(), ErrorCode::PROTOCOL_ERROR));
    // An unknown critical frame type.
    let mut unknown = BytesMut::new();
    codec
        .encode(&Frame::new(FrameType(0x0777), Vec::new()), &mut unknown)
        .unwrap();
    attacks.push((
        "unknown type",
        unknown.to_vec(),
        ErrorCode::UNKNOWN_FRAME_TYPE,
    ));

    for (name, bytes, want) in attacks {
        let mut tls = raw_tls(ep.tls.client.clone(), agent.addr).await.unwrap();
        tls.write_all(&bytes).await.unwrap();
        tls.flush().await.unwrap();
        let got = read_until_closed(&mut tls, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{name}: agent kept the connection open"));
        assert_eq!(close_code(&frames_in(&got)), Some(want), "{name}");
    }

    // Truncated: half a frame, then the peer goes away.
    let mut tls = raw_tls(ep.tls.client.clone(), agent.addr).await.unwrap();
    tls.write_all(&[0, 0, 0, 50, 0, 1, 0, 0, 1, 2, 3])
        .await
        .unwrap();
    tls.shutdown().await.unwrap();
    read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .unwrap();
    wait_failed(&agent, "truncated").await;

    // Garbage after a successful handshake: the agent answers GOAWAY and closes.
    let mut conn = connect(&ep, agent.addr).await.unwrap();
    conn.send(&Frame::new(FrameType::HELLO, Vec::new()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), conn.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.ty, FrameType::GOAWAY);
    assert_eq!(
        msg::decode::<Close>(&got).unwrap().error_code(),
        ErrorCode::UNEXPECTED_FRAME
    );

    // And the agent still serves everyone else.
    let mut conn = connect(&ep, agent.addr).await.unwrap();
    conn.ping(7, PING_TIMEOUT).await.unwrap();
    assert_eq!(
        metric_value(&agent.metrics().await, "dwcp_connections_active", &[]),
        1.0
    );
    conn.close(ErrorCode::NO_ERROR, "").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t50_admin_endpoints() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    assert_eq!(http_get(agent.admin, "/healthz").await.unwrap().0, 200);
    let (status, body) = http_get(agent.admin, "/readyz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = http_get(agent.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE dwcp_connections_accepted counter"),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(http_get(agent.admin, "/nope").await.unwrap().0, 404);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t51_connection_limit() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.agent.max_connections = 1).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let mut first = connect(&ep, agent.addr).await.unwrap();
    // Closed at once, before TLS.
    match connect(&ep, agent.addr).await {
        Err(ConnError::Closed(dwcp_transport::Stage::Tls) | ConnError::Tls { .. }) => {}
        other => panic!("{other:?}"),
    }
    first.ping(1, PING_TIMEOUT).await.unwrap();
    assert_eq!(
        metric_value(
            &agent.metrics().await,
            "dwcp_connections_refused_total",
            &[]
        ),
        1.0
    );
    first.close(ErrorCode::NO_ERROR, "").await;
    agent.stop().await.unwrap();
}

/// Clients that connect and never authenticate take none of the connection slots: a peer
/// still gets in while they wait. One address may hold 16 handshakes at most.
#[tokio::test]
async fn t53_unauthenticated_clients_take_no_connection_slot() {
    use tokio::io::AsyncReadExt;
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.agent.max_connections = 2).await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(agent.addr).await.unwrap());
    }
    let ep = endpoint(&cluster, "client", |_| {});
    let mut peer = connect(&ep, agent.addr).await.unwrap();
    peer.ping(1, PING_TIMEOUT).await.unwrap();
    // Up to this address's share; the next is closed at once.
    for _ in 10..16 {
        idle.push(TcpStream::connect(agent.addr).await.unwrap());
    }
    // (Accepted in order: the ones before it are counted by now.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(agent.addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(2), over.read(&mut b))
        .await
        .expect("the 17th handshake from one address was not refused")
        .unwrap_or(0);
    assert_eq!(n, 0);
    peer.ping(2, PING_TIMEOUT).await.unwrap();
    drop(idle);
    peer.close(ErrorCode::NO_ERROR, "").await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t60_shutdown_sends_goaway_and_returns() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let mut conn = connect(&ep, agent.addr).await.unwrap();
    let addr = agent.addr;
    let started = std::time::Instant::now();
    agent.stop().await.unwrap();
    // Idle peers are told at once; the agent does not wait out the grace period for them.
    assert!(started.elapsed() < Duration::from_secs(2));
    let got = conn.recv().await.unwrap().unwrap();
    assert_eq!(got.ty, FrameType::GOAWAY);
    assert_eq!(
        msg::decode::<Close>(&got).unwrap().error_code(),
        ErrorCode::SHUTTING_DOWN
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener must be closed"
    );
}

/// A QUIC connection the sender keeps (its session kept for a next transfer, kept up by
/// keep-alives) does not hold the agent's shutdown for the grace period: closed at once
/// without streams, and with one, once its stream was told (GOAWAY).
#[tokio::test]
async fn t60q_a_kept_quic_connection_does_not_hold_shutdown() {
    for with_stream in [false, true] {
        let cluster = TestCluster::new();
        let agent = RunningAgent::start(&cluster, "server", |c| {
            c.agent.shutdown_grace_secs = 10;
        })
        .await;
        let ep = endpoint(&cluster, "client", |_| {});
        let peer = dwcp_transport::quic::dial(&ep, agent.addr, None)
            .await
            .unwrap();
        let mut stream = if with_stream {
            Some(peer.open(&ep).await.unwrap())
        } else {
            // The agent's side of the handshake done, and its connection served.
            tokio::time::sleep(Duration::from_millis(300)).await;
            None
        };
        let started = std::time::Instant::now();
        agent.stop().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stream {with_stream}: shutdown took {:?} (grace 10 s)",
            started.elapsed()
        );
        if let Some(s) = &mut stream {
            let got = tokio::time::timeout(Duration::from_secs(5), s.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(got.ty, FrameType::GOAWAY);
        }
        // Closed by the agent, not left to time out.
        tokio::time::timeout(Duration::from_secs(5), peer.closed())
            .await
            .expect("the agent closed the connection");
    }
}

#[tokio::test]
async fn t52_expired_certificate_makes_the_agent_unready() {
    let cluster = TestCluster::new();
    let creds = cluster.creds("server");
    let s = settings(&cluster, |_| {});
    let tls = dwcp_transport::TlsConfigs::new(&creds).unwrap();
    // Not-after of 1 (1970): the certificate expired while the agent was running.
    let agent = dwcp_agent::Agent::bind(creds.node_id.clone(), &s, tls, 1)
        .await
        .unwrap();
    let admin = agent.admin_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async {
        let _ = rx.await;
    }));
    let mut last = (0, String::new());
    for _ in 0..100 {
        if let Ok(r) = http_get(admin, "/readyz").await {
            last = r;
            if last.0 == 503 && last.1.contains("expired") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last.0, 503, "{last:?}");
    assert!(last.1.contains("certificate has expired"), "{last:?}");
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    // The gauge says the same as /readyz.
    let (code, m) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(m.lines().any(|l| l == "dwcp_ready 0"), "{m}");
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn t61_stuck_admin_client_does_not_block_shutdown() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    // Half a request, never finished.
    let mut stuck = TcpStream::connect(agent.admin).await.unwrap();
    stuck.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    agent.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn t62_reject_after_hello_ack_is_taken_as_a_close() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let codec = FrameCodec::handshake();
    let mut tls = raw_tls(ep.tls.client.clone(), agent.addr).await.unwrap();
    let hello = msg::Hello {
        versions: vec![1, 3],
        node_id: "client".into(),
        cluster_id: cluster.cluster_id.to_string(),
        capabilities: Some(ep.capabilities.clone()),
    };
    let mut out = BytesMut::new();
    codec
        .encode(&msg::encode(FrameType::HELLO, &hello), &mut out)
        .unwrap();
    tls.write_all(&out).await.unwrap();
    // Wait for HELLO_ACK, then refuse it as a client that found fault with it would.
    let mut buf = BytesMut::new();
    let ack = loop {
        if let Some(f) = codec.decode(&mut buf).unwrap() {
            break f;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut tls, &mut chunk)
            .await
            .unwrap();
        assert!(n > 0, "agent closed before HELLO_ACK");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(ack.ty, FrameType::HELLO_ACK);
    let mut out = BytesMut::new();
    codec
        .encode(
            &msg::encode(
                FrameType::REJECT,
                &Close::new(ErrorCode::PROTOCOL_ERROR, "no thanks"),
            ),
            &mut out,
        )
        .unwrap();
    tls.write_all(&out).await.unwrap();
    let rest = read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .expect("agent must close after a REJECT");
    // The agent closes without answering: no GOAWAY(UNEXPECTED_FRAME).
    assert_eq!(close_code(&frames_in(&rest)), None);
    agent.stop().await.unwrap();
}
