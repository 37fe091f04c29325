//! Transfer sessions over QUIC: the same objects and checksums as over TCP, on the streams
//! of one QUIC connection to the agent's UDP port (resume: `transfer.rs`, t30q).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dwcp_testkit::{RunningAgent, TestCluster, endpoint, random_file};
use dwcp_transport::Carrier;
use dwcp_transport::session::{DeltaOptions, SendError, SendOptions, Source, send_files};

fn quic_opts(streams: u32) -> SendOptions {
    SendOptions {
        streams,
        retry_for: Duration::from_secs(20),
        carrier: Carrier::Quic,
        delta: DeltaOptions {
            enabled: false,
            ..DeltaOptions::default()
        },
        ..SendOptions::default()
    }
}

fn same_file(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x == y, "{} differs from {}", b.display(), a.display());
}

#[tokio::test]
async fn t60_files_arrive_verified_over_quic_streams() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let files = [
        random_file(src.path(), "a.img", 9 * 1024 * 1024 + 17, 1),
        random_file(src.path(), "b.img", 1000, 2),
        random_file(src.path(), "empty", 0, 3),
    ];
    let sources: Vec<_> = files.iter().map(|p| Source::file(p).unwrap()).collect();
    let ep = endpoint(&cluster, "client", |_| {});
    let report = send_files(&ep, agent.addr, None, &sources, &quic_opts(6), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.objects.len(), 3);
    assert_eq!(report.streams, 6, "{report:?}");
    assert_eq!(report.bytes_sent, 9 * 1024 * 1024 + 17 + 1000);
    assert_eq!(report.resent_bytes, 0);
    let spool = cluster.dir().join("spool/client");
    for f in &files {
        same_file(f, &spool.join(f.file_name().unwrap()));
    }
    // Every stream ran the DWCP handshake: six successful handshakes, counted as connections.
    let text = agent.metrics().await;
    let ok = dwcp_testkit::metric_value(
        &text,
        "dwcp_handshakes_total",
        &[("result", "ok"), ("reason", ""), ("version", "v3")],
    );
    assert_eq!(ok, 6.0, "{text}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t62_quic_refuses_a_foreign_ca_like_tcp() {
    let ours = TestCluster::new();
    let foreign = TestCluster::new();
    let agent = RunningAgent::start(&ours, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "x", 1000, 9);
    let ep = endpoint(&foreign, "client", |_| {});
    let err = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&f).unwrap()],
        &quic_opts(2),
        &mut |_| {},
    )
    .await
    .unwrap_err();
    let SendError::Connect(e) = &err else {
        panic!("{err:?}");
    };
    assert!(e.is_auth(), "{e:?}");
    assert!(!foreign.dir().join("spool/client/x").exists());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t63_a_receiver_without_quic_is_reported_not_waited_for_forever() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.transport.quic = false).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "x", 1000, 10);
    let mut ep = endpoint(&cluster, "client", |_| {});
    ep.connect_timeout = Duration::from_millis(500);
    ep.tls_timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let err = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&f).unwrap()],
        &quic_opts(2),
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    assert!(
        err.to_string().contains("QUIC"),
        "the error says what was tried: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // TCP still works.
    let mut o = quic_opts(2);
    o.carrier = Carrier::Tcp;
    send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&f).unwrap()],
        &o,
        &mut |_| {},
    )
    .await
    .unwrap();
    agent.stop().await.unwrap();
}

/// `Carrier::Auto`: QUIC only for an internet path on which TCP would run a loss-based
/// congestion control (reno is always available, so it stands for a host without BBR).
#[tokio::test]
async fn t64_auto_picks_quic_only_for_internet_paths_without_bbr() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "x", 3 * 1024 * 1024, 11);
    let addr = agent.addr;
    let send = |congestion: &str, mode| {
        let mut ep = endpoint(&cluster, "client", |_| {});
        ep.socket.congestion = Some(congestion.to_string());
        let mut o = quic_opts(2);
        o.carrier = Carrier::Auto;
        o.mode = mode;
        let src = Source::file(&f).unwrap();
        async move {
            send_files(&ep, addr, None, &[src], &o, &mut |_| {})
                .await
                .unwrap()
        }
    };
    use dwcp_transport::session::Mode;
    let r = send("reno", Some(Mode::Internet)).await;
    assert_eq!(r.carrier, Some(Carrier::Quic), "{r:?}");
    // A loopback round trip is a datacenter path: TCP.
    let r = send("reno", None).await;
    assert_eq!(r.carrier, Some(Carrier::Tcp), "{r:?}");
    let r = send("reno", Some(Mode::Datacenter)).await;
    assert_eq!(r.carrier, Some(Carrier::Tcp), "{r:?}");
    same_file(&f, &cluster.dir().join("spool/client/x"));
    agent.stop().await.unwrap();

    // A receiver that does not offer QUIC keeps the sender on TCP.
    let agent = RunningAgent::start(&cluster, "server", |c| c.transport.quic = false).await;
    let mut ep = endpoint(&cluster, "client", |_| {});
    ep.socket.congestion = Some("reno".into());
    let mut o = quic_opts(2);
    o.carrier = Carrier::Auto;
    o.mode = Some(Mode::Internet);
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&f).unwrap()],
        &o,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(r.carrier, Some(Carrier::Tcp), "{r:?}");
    agent.stop().await.unwrap();
}
