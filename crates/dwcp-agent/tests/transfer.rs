//! Transfer sessions into an agent's spool: striping, verification, lost and corrupted streams,
//! resume after a receiver restart; over TCP and over QUIC.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dwcp_testkit::{Fault, Proxy, RunningAgent, TestCluster, endpoint, random_file, settings};
use dwcp_transport::Carrier;
use dwcp_transport::session::{
    DeltaOptions, SendError, SendOptions, SendReport, Source, send_files,
};

/// The transport alone: these tests count the bytes of the files themselves.
fn opts(streams: u32) -> SendOptions {
    SendOptions {
        streams,
        retry_for: Duration::from_secs(20),
        delta: DeltaOptions {
            enabled: false,
            ..DeltaOptions::default()
        },
        ..SendOptions::default()
    }
}

fn delta_opts() -> SendOptions {
    SendOptions {
        retry_for: Duration::from_secs(20),
        ..SendOptions::default()
    }
}

/// A generated VM image (synthetic pages, so the test does not depend on the machine).
fn image(mb: u64, seed: u64) -> dwcp_encoding::image::Image {
    use dwcp_encoding::image::{Corpus, ImageSpec, generate};
    generate(
        &ImageSpec {
            seed,
            ..ImageSpec::new(mb << 20)
        },
        &mut Corpus::synthetic(),
    )
}

/// A stream of client's to `agent` that opened the transfer session `id` (frames by hand).
async fn raw_session(
    cluster: &TestCluster,
    agent: &RunningAgent,
    id: u8,
) -> dwcp_transport::Connection<tokio::net::TcpStream> {
    raw_streams(cluster, agent, id, 1).await.remove(0)
}

/// `n` connections joined as the streams of session `id` (the bytes of its id), in order.
async fn raw_streams(
    cluster: &TestCluster,
    agent: &RunningAgent,
    id: u8,
    n: u32,
) -> Vec<dwcp_transport::Connection<tokio::net::TcpStream>> {
    use dwcp_wire::{FrameType, data::SessionJoin, msg};
    let ep = endpoint(cluster, "client", |_| {});
    let mut streams = Vec::new();
    for stream_index in 0..n {
        let mut c = dwcp_transport::connect_to(&ep, agent.addr, None)
            .await
            .unwrap();
        let join = SessionJoin {
            session_id: vec![id; 16],
            stream_index,
        };
        c.send(&msg::encode(FrameType::SESSION, &join))
            .await
            .unwrap();
        streams.push(c);
    }
    streams
}

/// The agent's metrics once `dwcp_objects_received_total` for the client with `result` is
/// `want` (given two seconds); asserted.
async fn objects_counted(agent: &RunningAgent, result: &str, want: f64) -> String {
    let count = |t: &str| {
        dwcp_testkit::metric_value(
            t,
            "dwcp_objects_received_total",
            &[("peer", "client"), ("result", result)],
        )
    };
    let mut text = agent.metrics().await;
    for _ in 0..40 {
        if count(&text) >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = agent.metrics().await;
    }
    assert_eq!(count(&text), want, "{text}");
    text
}

/// The next frame of type `ty` on `c`, skipping others.
async fn next(
    c: &mut dwcp_transport::Connection<tokio::net::TcpStream>,
    ty: dwcp_wire::FrameType,
) -> dwcp_wire::Frame {
    next_of(c, &[ty]).await
}

/// The next frame of any of the types `tys` on `c`, skipping others.
async fn next_of(
    c: &mut dwcp_transport::Connection<tokio::net::TcpStream>,
    tys: &[dwcp_wire::FrameType],
) -> dwcp_wire::Frame {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let f = c.recv().await.unwrap().expect("receiver closed the stream");
            if tys.contains(&f.ty) {
                return f;
            }
        }
    })
    .await
    .expect("no answer within 20 s")
}

fn same_file(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x == y, "{} differs from {}", b.display(), a.display());
}

#[tokio::test]
async fn t10_files_arrive_verified_over_many_streams() {
    files_arrive_verified(Carrier::Tcp, 8).await;
}

/// Every object is counted, however many come at once: the counts are the receiver's own,
/// not a listener's that may fall behind (its channel holds 256 events).
#[tokio::test]
async fn t10b_every_object_of_a_burst_is_counted() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..600u64)
        .map(|i| random_file(src.path(), &format!("f{i}"), 64, i))
        .collect();
    let sources: Vec<_> = files.iter().map(|p| Source::file(p).unwrap()).collect();
    let ep = endpoint(&cluster, "client", |_| {});
    let report = send_files(&ep, agent.addr, None, &sources, &opts(4), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(report.objects.len(), 600);
    let text = agent.metrics().await;
    let stored = dwcp_testkit::metric_value(
        &text,
        "dwcp_objects_received_total",
        &[("peer", "client"), ("result", "stored")],
    );
    assert_eq!(stored, 600.0, "{text}");
    assert_eq!(
        dwcp_testkit::metric_value(
            &text,
            "dwcp_object_bytes_received_total",
            &[("peer", "client")]
        ),
        600.0 * 64.0
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t60_files_arrive_verified_over_quic_streams() {
    files_arrive_verified(Carrier::Quic, 6).await;
}

async fn files_arrive_verified(carrier: Carrier, streams: u32) {
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
    let mut calls = 0;
    let o = SendOptions {
        carrier,
        ..opts(streams)
    };
    let report = send_files(&ep, agent.addr, None, &sources, &o, &mut |_| calls += 1)
        .await
        .unwrap();
    assert_eq!(report.objects.len(), 3);
    assert_eq!(report.streams, streams);
    assert_eq!(report.carrier, Some(carrier));
    assert_eq!(report.bytes_sent, 9 * 1024 * 1024 + 17 + 1000);
    assert_eq!(report.resent_bytes, 0);
    assert!(calls > 0);
    let spool = cluster.dir().join("spool/client");
    for f in &files {
        same_file(f, &spool.join(f.file_name().unwrap()));
    }
    // No partial or state files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let text = objects_counted(&agent, "stored", 3.0).await;
    assert_eq!(
        dwcp_testkit::metric_value(
            &text,
            "dwcp_object_bytes_received_total",
            &[("peer", "client")]
        ),
        (9 * 1024 * 1024 + 17 + 1000) as f64
    );
    // Every chunk counted as it arrived; no stream is open any more.
    assert_eq!(
        dwcp_testkit::metric_value(
            &text,
            "dwcp_session_data_bytes_total",
            &[("peer", "client")]
        ),
        (9 * 1024 * 1024 + 17 + 1000) as f64
    );
    assert_eq!(
        dwcp_testkit::metric_value(&text, "dwcp_session_streams", &[("peer", "client")]),
        0.0
    );
    // Every stream (a TCP connection or a QUIC stream) ran the DWCP handshake.
    assert_eq!(
        dwcp_testkit::metric_value(
            &text,
            "dwcp_handshakes_total",
            &[("result", "ok"), ("reason", ""), ("version", "v6")],
        ),
        f64::from(streams),
        "{text}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t11_v1_peer_gets_one_stream() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.protocol.versions = vec![1]).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "x", 2 * 1024 * 1024, 4);
    let ep = endpoint(&cluster, "client", |_| {});
    let report = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&f).unwrap()],
        &opts(8),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.streams, 1);
    assert_eq!(report.version, Some(dwcp_wire::Version::V1));
    same_file(&f, &cluster.dir().join("spool/client/x"));
    agent.stop().await.unwrap();
}

/// Sends a random file of `size` bytes over 4 streams through a proxy with `fault`, checks that
/// it arrived intact, and returns the report. Bounded: a transfer that hangs fails the test.
async fn send_through(fault: Fault, name: &str, size: usize, seed: u64) -> SendReport {
    send_all_through(fault, &[(name, size, seed)]).await
}

/// Sends files (name, size, seed) in one session through a proxy with `fault`, bounded in
/// time, and checks each arrived whole.
async fn send_all_through(fault: Fault, files: &[(&str, usize, u64)]) -> SendReport {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let proxy = Proxy::start(agent.addr, fault).await;
    let src = tempfile::tempdir().unwrap();
    let paths: Vec<_> = files
        .iter()
        .map(|(name, size, seed)| random_file(src.path(), name, *size, *seed))
        .collect();
    let sources: Vec<Source> = paths.iter().map(|p| Source::file(p).unwrap()).collect();
    let ep = endpoint(&cluster, "client", |_| {});
    let report = tokio::time::timeout(
        Duration::from_secs(45),
        send_files(&ep, proxy.addr, None, &sources, &opts(4), &mut |_| {}),
    )
    .await
    .expect("the transfer did not finish within 45 s")
    .unwrap();
    for (p, (name, _, _)) in paths.iter().zip(files) {
        same_file(p, &cluster.dir().join("spool/client").join(name));
    }
    // Before the agent stops: a connection the proxy holds up would keep it draining.
    drop(proxy);
    agent.stop().await.unwrap();
    report
}

#[tokio::test]
async fn t20_transfer_survives_a_killed_stream() {
    // Connection 2 (a data stream) is cut after 3 MB have gone through it.
    let fault = Fault::Kill {
        conn: 2,
        after: 3_000_000,
    };
    let report = send_through(fault, "big", 32 * 1024 * 1024, 5).await;
    assert_eq!(report.streams_lost, 1, "{report:?}");
    assert_eq!(
        report.streams_replaced, 1,
        "the dead stream is replaced: {report:?}"
    );
    assert_eq!(report.reconnects, 0, "{report:?}");
}

#[tokio::test]
async fn t21_corrupted_chunk_is_detected_and_resent() {
    // One bit flipped in the middle of stream 1's data: TLS (and behind it the frame CRC)
    // refuses it, the stream dies, and its chunks go out again on the others.
    let fault = Fault::Corrupt {
        conn: 1,
        after: 2_000_000,
    };
    let report = send_through(fault, "c", 16 * 1024 * 1024, 6).await;
    assert_eq!(report.streams_lost, 1, "{report:?}");
    assert!(report.resent_bytes > 0, "{report:?}");
}

/// A chunk sent again with other bytes after the receiver acknowledged the first copy (so
/// its digest thread may have hashed it) does not change the file: what is published is what
/// was verified.
#[tokio::test]
async fn t22_a_chunk_resent_below_the_acknowledged_prefix_is_not_written_again() {
    use dwcp_wire::data::{self, Ack, ObjectBegin, ObjectDone, ObjectEnd};
    use dwcp_wire::{FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let mut c = raw_session(&cluster, &agent, 7).await;
    const HALF: usize = 512 * 1024;
    let content: Vec<u8> = (0..4 * HALF).map(|i| (i % 251) as u8).collect();
    let begin = ObjectBegin {
        object: 1,
        name: "dup".into(),
        size: content.len() as u64,
        version_tag: "t22".into(),
        ..ObjectBegin::default()
    };
    c.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut c, FrameType::OBJECT_STATE).await;
    for i in 0..2 {
        let chunk = &content[i * HALF..(i + 1) * HALF];
        c.send(&data::encode_data(1, (i * HALF) as u64, chunk))
            .await
            .unwrap();
    }
    let a: Ack = msg::decode(&next(&mut c, FrameType::ACK).await).unwrap();
    assert_eq!(a.offset, 2 * HALF as u64);
    // The first half again, with other bytes: acknowledged as a duplicate, not written.
    c.send(&data::encode_data(1, 0, &vec![0xff; HALF]))
        .await
        .unwrap();
    let a: Ack = msg::decode(&next(&mut c, FrameType::ACK).await).unwrap();
    assert_eq!(a.offset, 2 * HALF as u64);
    // Straddling the prefix: only the bytes beyond it count.
    let mut straddle = vec![0xee; HALF];
    straddle[HALF / 2..].copy_from_slice(&content[2 * HALF..2 * HALF + HALF / 2]);
    c.send(&data::encode_data(
        1,
        (2 * HALF - HALF / 2) as u64,
        &straddle,
    ))
    .await
    .unwrap();
    c.send(&data::encode_data(
        1,
        (2 * HALF + HALF / 2) as u64,
        &content[2 * HALF + HALF / 2..],
    ))
    .await
    .unwrap();
    let end = ObjectEnd {
        object: 1,
        size: content.len() as u64,
        blake3: blake3::hash(&content).as_bytes().to_vec(),
    };
    c.send(&msg::encode(FrameType::OBJECT_END, &end))
        .await
        .unwrap();
    let d: ObjectDone = msg::decode(&next(&mut c, FrameType::OBJECT_DONE).await).unwrap();
    assert_eq!(d.code, 0, "{}", d.reason);
    let got = std::fs::read(cluster.dir().join("spool/client/dup")).unwrap();
    assert!(
        got == content,
        "the published file is not what was verified"
    );
    agent.stop().await.unwrap();
}

/// A sender whose verdict was lost with the stream that carried it (it cannot tell) sends
/// the object's end again on another stream of the session, and is answered there.
#[tokio::test]
async fn t28_an_end_sent_again_after_the_verdict_gets_the_verdict_again() {
    use dwcp_wire::data::{self, ObjectBegin, ObjectDone, ObjectEnd};
    use dwcp_wire::{FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let mut c = raw_streams(&cluster, &agent, 11, 2).await;
    let content: Vec<u8> = (0..300_000).map(|i| (i % 241) as u8).collect();
    let begin = ObjectBegin {
        object: 1,
        name: "again".into(),
        size: content.len() as u64,
        version_tag: "t28".into(),
        ..ObjectBegin::default()
    };
    c[0].send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut c[0], FrameType::OBJECT_STATE).await;
    c[0].send(&data::encode_data(1, 0, &content)).await.unwrap();
    let end = ObjectEnd {
        object: 1,
        size: content.len() as u64,
        blake3: blake3::hash(&content).as_bytes().to_vec(),
    };
    c[0].send(&msg::encode(FrameType::OBJECT_END, &end))
        .await
        .unwrap();
    let d: ObjectDone = msg::decode(&next(&mut c[0], FrameType::OBJECT_DONE).await).unwrap();
    assert_eq!((d.object, d.code), (1, 0), "{}", d.reason);
    // The stream that carried the verdict goes; the end again on the other.
    drop(c.remove(0));
    c[0].send(&msg::encode(FrameType::OBJECT_END, &end))
        .await
        .unwrap();
    let d: ObjectDone = msg::decode(&next(&mut c[0], FrameType::OBJECT_DONE).await).unwrap();
    assert_eq!((d.object, d.code), (1, 0), "{}", d.reason);
    assert_eq!(
        std::fs::read(cluster.dir().join("spool/client/again")).unwrap(),
        content
    );
    agent.stop().await.unwrap();
}

/// The verdict of a stored file lost with its session: the object begun again on a new
/// session is answered as held whole, and its end gets the verdict once the stored copy is
/// checked; nothing is sent twice.
#[tokio::test]
async fn t28b_a_file_stored_before_its_session_broke_is_held_whole_on_the_next() {
    use dwcp_wire::data::{self, ObjectBegin, ObjectDone, ObjectEnd, ObjectState};
    use dwcp_wire::{FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let content: Vec<u8> = (0..300_000).map(|i| (i % 239) as u8).collect();
    let begin = ObjectBegin {
        object: 1,
        name: "kept".into(),
        size: content.len() as u64,
        version_tag: "t28b".into(),
        ..ObjectBegin::default()
    };
    let end = ObjectEnd {
        object: 1,
        size: content.len() as u64,
        blake3: blake3::hash(&content).as_bytes().to_vec(),
    };
    let mut c = raw_session(&cluster, &agent, 21).await;
    c.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut c, FrameType::OBJECT_STATE).await;
    c.send(&data::encode_data(1, 0, &content)).await.unwrap();
    c.send(&msg::encode(FrameType::OBJECT_END, &end))
        .await
        .unwrap();
    // Stored; the sender never sees the verdict.
    let path = cluster.dir().join("spool/client/kept");
    objects_counted(&agent, "stored", 1.0).await;
    drop(c);

    let mut c = raw_session(&cluster, &agent, 22).await;
    c.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    let st: ObjectState = msg::decode(&next(&mut c, FrameType::OBJECT_STATE).await).unwrap();
    assert_eq!(st.have, content.len() as u64);
    c.send(&msg::encode(FrameType::OBJECT_END, &end))
        .await
        .unwrap();
    let d: ObjectDone = msg::decode(&next(&mut c, FrameType::OBJECT_DONE).await).unwrap();
    assert_eq!((d.object, d.code), (1, 0), "{}", d.reason);
    assert_eq!(std::fs::read(&path).unwrap(), content);
    drop(c);

    // Another version under the same name is not taken for it.
    let mut c = raw_session(&cluster, &agent, 23).await;
    let other = ObjectBegin {
        version_tag: "t28b, changed".into(),
        ..begin.clone()
    };
    c.send(&msg::encode(FrameType::OBJECT_BEGIN, &other))
        .await
        .unwrap();
    let st: ObjectState = msg::decode(&next(&mut c, FrameType::OBJECT_STATE).await).unwrap();
    assert_eq!(st.have, 0);
    agent.stop().await.unwrap();
}

/// A file sent again unchanged is not sent again: the receiver checks its copy. A copy
/// changed in place behind the receiver's back (its times kept) fails that check, and the
/// sender then sends it whole.
#[tokio::test]
async fn t38_a_file_sent_again_unchanged_is_checked_not_resent() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let src = tempfile::tempdir().unwrap();
    let size = 3 * 1024 * 1024 + 5;
    let file = random_file(src.path(), "disk.img", size, 38);
    let sources = [Source::file(&file).unwrap()];
    let o = opts(4);
    let send = || async { send_files(&ep, agent.addr, None, &sources, &o, &mut |_| {}).await };
    let r = send().await.unwrap();
    assert_eq!((r.bytes_sent, r.objects[0].resumed_from), (size as u64, 0));
    let stored = cluster.dir().join("spool/client/disk.img");
    same_file(&file, &stored);

    let r = send().await.unwrap();
    assert_eq!(r.bytes_sent, 0);
    assert_eq!(r.objects[0].resumed_from, size as u64);
    same_file(&file, &stored);

    // One byte changed in place, the modification time put back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 1];
        std::fs::File::open(&stored)
            .unwrap()
            .read_exact_at(&mut b, 1000)
            .unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], 1000).unwrap();
    }
    f.set_modified(mtime).unwrap();
    drop(f);
    let r = send().await.unwrap();
    assert_eq!(r.bytes_sent, size as u64);
    assert_eq!(r.objects[0].resumed_from, 0);
    same_file(&file, &stored);
    // The copy sent whole is marked again: the next send checks it.
    let r = send().await.unwrap();
    assert_eq!(r.bytes_sent, 0);
    agent.stop().await.unwrap();
}

/// A file the receiver still holds for an earlier session of the sender (its streams died
/// unnoticed) is refused as busy, and the sender asks again until that session lets go.
#[tokio::test]
async fn t29_a_file_held_by_an_earlier_session_is_sent_once_that_session_goes() {
    use dwcp_wire::data::ObjectBegin;
    use dwcp_wire::{FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let file = random_file(src.path(), "held.img", 3 * 1024 * 1024, 29);
    let sources = [Source::file(&file).unwrap()];
    // The earlier session (the same file, as the sender names it): begun, then silent.
    let mut old = raw_session(&cluster, &agent, 29).await;
    let begin = ObjectBegin {
        object: 1,
        name: "held.img".into(),
        size: 3 * 1024 * 1024,
        version_tag: sources[0].version_tag.clone(),
        ..ObjectBegin::default()
    };
    old.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut old, FrameType::OBJECT_STATE).await;
    // It goes (its last stream closes) while the new sender is being refused.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(old);
    });
    let ep = endpoint(&cluster, "client", |_| {});
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        send_files(&ep, agent.addr, None, &sources, &opts(2), &mut |_| {}),
    )
    .await
    .unwrap()
    .unwrap();
    release.await.unwrap();
    assert_eq!(report.objects.len(), 1);
    same_file(&file, &cluster.dir().join("spool/client/held.img"));
    agent.stop().await.unwrap();
}

/// The same part of a migration round begun on a new session while an earlier one (its
/// connections dead unnoticed) holds it: busy, then taken once that session is gone.
#[tokio::test]
async fn t29b_a_round_part_held_by_an_earlier_session_is_busy_until_it_goes() {
    use dwcp_wire::data::{self, ObjectBegin, ObjectDone};
    use dwcp_wire::{ErrorCode, FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let begin = ObjectBegin {
        object: 1,
        name: "vm.mem".into(),
        size: 1000,
        version_tag: "migration t29b round 0 part 0".into(),
        encoding: data::ENCODING_HDE_PAGES_INPLACE,
        raw_size: 16 * 4096,
        ..ObjectBegin::default()
    };
    let mut old = raw_session(&cluster, &agent, 41).await;
    old.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut old, FrameType::OBJECT_STATE).await;
    let mut new = raw_session(&cluster, &agent, 42).await;
    new.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    let d: ObjectDone = msg::decode(&next(&mut new, FrameType::OBJECT_DONE).await).unwrap();
    assert_eq!(ErrorCode(d.code), ErrorCode::BUSY, "{}", d.reason);
    // The earlier session goes; the part is taken (asked again until then).
    drop(old);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut id = 2;
    loop {
        let b = ObjectBegin {
            object: id,
            ..begin.clone()
        };
        new.send(&msg::encode(FrameType::OBJECT_BEGIN, &b))
            .await
            .unwrap();
        let f = next_of(&mut new, &[FrameType::OBJECT_STATE, FrameType::OBJECT_DONE]).await;
        if f.ty == FrameType::OBJECT_STATE {
            break;
        }
        let d: ObjectDone = msg::decode(&f).unwrap();
        assert_eq!(ErrorCode(d.code), ErrorCode::BUSY, "{}", d.reason);
        assert!(std::time::Instant::now() < deadline, "still busy");
        tokio::time::sleep(Duration::from_millis(100)).await;
        id += 1;
    }
    agent.stop().await.unwrap();
}

/// An open object begun again as another (name or size) is a broken sender: the stream is
/// closed with `PROTOCOL_ERROR`, not answered with a refusal that would count the open
/// object as failed.
#[tokio::test]
async fn t27_an_open_object_begun_again_as_another_closes_the_stream() {
    use dwcp_wire::data::ObjectBegin;
    use dwcp_wire::msg::Close;
    use dwcp_wire::{ErrorCode, FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let mut c = raw_session(&cluster, &agent, 9).await;
    let mut begin = ObjectBegin {
        object: 1,
        name: "first".into(),
        size: 1000,
        version_tag: "t27".into(),
        ..ObjectBegin::default()
    };
    c.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut c, FrameType::OBJECT_STATE).await;
    begin.name = "second".into();
    c.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    let f = next_of(&mut c, &[FrameType::GOAWAY, FrameType::OBJECT_DONE]).await;
    assert_eq!(f.ty, FrameType::GOAWAY, "{f:?}");
    let close: Close = msg::decode(&f).unwrap();
    assert_eq!(close.error_code(), ErrorCode::PROTOCOL_ERROR);
    assert!(
        close.printable_reason().contains("another name or size"),
        "{}",
        close.printable_reason()
    );
    agent.stop().await.unwrap();
}

/// A stream whose handshake is slow (its SYN lost, say) does not hold up the transfer: the
/// others start, and it would join when ready.
#[tokio::test]
async fn t23_a_slow_stream_does_not_hold_up_the_others() {
    // Stalled for longer than the transfer may take: it never joins.
    let fault = Fault::Stall {
        conn: 2,
        delay: Duration::from_secs(60),
    };
    let report = send_through(fault, "s", 8 * 1024 * 1024, 9).await;
    assert_eq!(report.streams, 3, "{report:?}");
    assert_eq!(report.resent_bytes, 0, "{report:?}");
}

#[tokio::test]
async fn t24_a_stream_stuck_mid_transfer_has_its_chunks_sent_on_the_others() {
    // Connection 2 stops forwarding after 1 MB and stays stuck for longer than the test's
    // bound: the transfer only ends if its chunks go again on the other streams.
    let fault = Fault::Pause {
        conn: 2,
        after: 1_000_000,
        delay: Duration::from_secs(120),
    };
    // A second file in the same session: the stuck stream, dropped once the first was
    // done (half a chunk on it), is replaced, and the second goes over the others.
    let report = send_all_through(
        fault,
        &[
            ("stuck", 16 * 1024 * 1024, 13),
            ("after", 4 * 1024 * 1024, 14),
        ],
    )
    .await;
    assert_eq!(
        report.streams_lost, 0,
        "the stream was not given up: {report:?}"
    );
    // Dropped at the first file's end, and counted as that (a fixed count retires none).
    assert_eq!(report.streams_stuck, 1, "{report:?}");
    assert!(report.resent_bytes > 0, "{report:?}");
    // What a stuck stream holds, not the file: at most the window.
    assert!(report.resent_bytes <= 32 * 1024 * 1024, "{report:?}");
}

/// An urgent object's chunks go a second time on other streams, so one arrives although the
/// stream that carried its begin and first chunks stops forwarding for longer than the
/// test's bound; an ordinary object is sent once. An urgent object too large to go twice
/// goes once, and what the stuck stream holds below what the receiver lists goes again.
#[tokio::test]
async fn t25_an_urgent_object_goes_twice_over_different_streams_and_arrives_once() {
    const SIZE: usize = 256 * 1024;
    const LARGE: usize = 4 * 1024 * 1024;
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let ep = endpoint(&cluster, "client", |_| {});
    let spool = cluster.dir().join("spool/client");
    for (urgent, name, size) in [
        (false, "calm", SIZE),
        (true, "urgent", SIZE),
        (true, "urgent-large", LARGE),
    ] {
        let fault = if urgent {
            Fault::Pause {
                conn: 0,
                after: 20_000,
                delay: Duration::from_secs(120),
            }
        } else {
            Fault::None
        };
        let proxy = Proxy::start(agent.addr, fault).await;
        let path = random_file(src.path(), name, size, 25);
        let sources = [Source::file(&path).unwrap()];
        let o = SendOptions { urgent, ..opts(4) };
        let report = tokio::time::timeout(
            Duration::from_secs(45),
            send_files(&ep, proxy.addr, None, &sources, &o, &mut |_| {}),
        )
        .await
        .expect("the transfer did not finish within 45 s")
        .unwrap();
        same_file(&path, &spool.join(name));
        if urgent {
            // What the stuck stream held went again elsewhere; nothing more than twice
            // over, and at most one chunk a third time (sent once: what the stuck stream
            // held, at most twice more).
            assert!(report.resent_bytes > 0, "{report:?}");
            assert!(report.resent_bytes <= 2 * size as u64, "{report:?}");
        } else {
            assert_eq!(report.resent_bytes, 0, "{report:?}");
        }
        drop(proxy);
    }
    agent.stop().await.unwrap();
}

/// An urgent object's receiver acknowledges every chunk with the ranges it holds beyond a
/// hole, and sends its verdict on every stream of the session.
#[tokio::test]
async fn t26_an_urgent_objects_receiver_lists_what_it_holds_and_answers_on_every_stream() {
    use dwcp_wire::data::{self, Ack, ObjectBegin, ObjectDone, ObjectEnd};
    use dwcp_wire::{FrameType, msg};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let mut c = raw_streams(&cluster, &agent, 9, 2).await;
    const CHUNK: usize = 16 * 1024;
    let content: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 253) as u8).collect();
    let chunk =
        |i: usize| data::encode_data(1, (i * CHUNK) as u64, &content[i * CHUNK..(i + 1) * CHUNK]);
    let begin = ObjectBegin {
        object: 1,
        name: "urgent".into(),
        size: content.len() as u64,
        version_tag: "t26".into(),
        urgent: true,
        ..ObjectBegin::default()
    };
    c[0].send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
        .await
        .unwrap();
    next(&mut c[0], FrameType::OBJECT_STATE).await;
    let end = ObjectEnd {
        object: 1,
        size: content.len() as u64,
        blake3: blake3::hash(&content).as_bytes().to_vec(),
    };
    c[0].send(&msg::encode(FrameType::OBJECT_END, &end))
        .await
        .unwrap();
    // Chunks 1 and 3 first: each acknowledged, listing what is held beyond the hole at 0.
    c[1].send(&chunk(1)).await.unwrap();
    let a: Ack = msg::decode(&next(&mut c[1], FrameType::ACK).await).unwrap();
    assert_eq!(
        (a.offset, &a.islands[..]),
        (0, &[CHUNK as u64, 2 * CHUNK as u64][..])
    );
    c[1].send(&chunk(3)).await.unwrap();
    let a: Ack = msg::decode(&next(&mut c[1], FrameType::ACK).await).unwrap();
    let c64 = CHUNK as u64;
    assert_eq!(
        (a.offset, a.received, &a.islands[..]),
        (0, 2 * c64, &[c64, 2 * c64, 3 * c64, 4 * c64][..])
    );
    c[0].send(&chunk(0)).await.unwrap();
    let a: Ack = msg::decode(&next(&mut c[0], FrameType::ACK).await).unwrap();
    assert_eq!(
        (a.offset, &a.islands[..]),
        (2 * c64, &[3 * c64, 4 * c64][..])
    );
    // The last chunk completes it: the verdict comes on both streams.
    c[1].send(&chunk(2)).await.unwrap();
    for conn in &mut c {
        let d: ObjectDone = msg::decode(&next(conn, FrameType::OBJECT_DONE).await).unwrap();
        assert_eq!((d.object, d.code), (1, 0), "{}", d.reason);
        // Once per connection: what comes before the answer to a ping is no second verdict.
        let ping = msg::Ping {
            seq: 1,
            ..Default::default()
        };
        conn.send(&msg::encode(FrameType::PING, &ping))
            .await
            .unwrap();
        let f = next_of(conn, &[FrameType::PONG, FrameType::OBJECT_DONE]).await;
        assert_eq!(f.ty, FrameType::PONG, "a second verdict on one connection");
    }
    let got = std::fs::read(cluster.dir().join("spool/client/urgent")).unwrap();
    assert!(
        got == content,
        "the published file differs from what was sent"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t30_resume_after_receiver_restart() {
    resume_after_receiver_restart(Carrier::Tcp).await;
}

#[tokio::test]
async fn t30q_resume_after_receiver_restart_over_quic() {
    resume_after_receiver_restart(Carrier::Quic).await;
}

async fn resume_after_receiver_restart(carrier: Carrier) {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let addr = agent.addr;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "vm.raw", 24 * 1024 * 1024, 7);
    let ep = endpoint(&cluster, "client", |_| {});
    let source = Source::file(&f).unwrap();
    let mut o = opts(4);
    o.carrier = carrier;
    // ~8 MB/s: the transfer takes ~3 s, so the restart lands in the middle of it.
    o.rate_limit = Some(8_000_000);
    let sender =
        tokio::spawn(async move { send_files(&ep, addr, None, &[source], &o, &mut |_| {}).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    agent.stop().await.unwrap();
    let part = cluster.dir().join("spool/client/.vm.raw.dwcp-part");
    assert!(part.exists(), "partial file kept for resuming");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = settings(&cluster, |c| c.agent.listen = addr.to_string());
    let agent = RunningAgent::start_with(cluster.creds("server"), &s).await;
    let report = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(report.reconnects >= 1, "{report:?}");
    assert_eq!(report.carrier, Some(carrier));
    let resumed = report.objects[0].resumed_from;
    assert!(resumed > 0, "nothing resumed: {report:?}");
    // Nothing that had arrived was sent again after the restart: the total sent is at most
    // the file plus what was in flight (one window) when the receiver went away.
    assert!(
        report.bytes_sent <= 24 * 1024 * 1024 + SendOptions::default().window,
        "{report:?}"
    );
    same_file(&f, &cluster.dir().join("spool/client/vm.raw"));
    assert!(!part.exists());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t31_unreachable_receiver_fails_fast() {
    let cluster = TestCluster::new();
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "x", 10, 8);
    let ep = endpoint(&cluster, "client", |_| {});
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    match send_files(
        &ep,
        free,
        None,
        &[Source::file(&f).unwrap()],
        &opts(2),
        &mut |_| {},
    )
    .await
    {
        Err(SendError::Connect(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Sends `file` under the name "../escape" with `o`: refused, and nothing written outside.
async fn escape_is_refused(
    cluster: &TestCluster,
    agent: &RunningAgent,
    file: &std::path::Path,
    o: &SendOptions,
) {
    let mut source = Source::file(file).unwrap();
    source.name = "../escape".into();
    let ep = endpoint(cluster, "client", |_| {});
    match send_files(&ep, agent.addr, None, &[source], o, &mut |_| {}).await {
        Err(SendError::Refused { code, .. }) => {
            assert_eq!(code, dwcp_wire::ErrorCode::STORAGE_ERROR)
        }
        other => panic!("{other:?}"),
    }
    assert!(!cluster.dir().join("escape").exists());
}

#[tokio::test]
async fn t32_bad_object_name_is_refused() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "x", 10, 9);
    escape_is_refused(&cluster, &agent, &f, &opts(2)).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t36_fresh_objects_start_behind_their_begin_and_a_refused_one_is_reported() {
    // v4: the data goes on every stream at once, and may arrive before its begin; v3: on the
    // begin's stream until the receiver answered.
    for versions in [vec![1, 3, 4], vec![1, 3]] {
        let cluster = TestCluster::new();
        let v = versions.clone();
        let agent = RunningAgent::start(&cluster, "server", move |c| c.protocol.versions = v).await;
        let src = tempfile::tempdir().unwrap();
        let files = [
            random_file(src.path(), "f1.img", 5 * 1024 * 1024 + 3, 21),
            random_file(src.path(), "f2.img", 700, 22),
            random_file(src.path(), "f3.img", 0, 23),
        ];
        let sources: Vec<_> = files.iter().map(|p| Source::file(p).unwrap()).collect();
        let ep = endpoint(&cluster, "client", |_| {});
        let fresh = SendOptions {
            fresh: true,
            ..opts(4)
        };
        let report = send_files(&ep, agent.addr, None, &sources, &fresh, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(
            report.version.map(|v| v.number()),
            versions.last().copied(),
            "{versions:?}"
        );
        assert_eq!(report.objects.len(), 3);
        assert_eq!(report.resent_bytes, 0, "{versions:?}");
        assert_eq!(report.bytes_sent, 5 * 1024 * 1024 + 3 + 700);
        let spool = cluster.dir().join("spool/client");
        for f in &files {
            same_file(f, &spool.join(f.file_name().unwrap()));
        }
        // Refused at its begin, with more than a chunk already written behind it: the sender
        // gets the refusal (the data that followed is ignored, not a protocol violation).
        let big = random_file(src.path(), "big", 3 * 1024 * 1024, 24);
        escape_is_refused(&cluster, &agent, &big, &fresh).await;
        agent.stop().await.unwrap();
    }
}

#[tokio::test]
async fn t37_a_fresh_object_the_receiver_partly_holds_is_resumed_not_resent() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let addr = agent.addr;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "held.img", 24 * 1024 * 1024, 25);
    let ep = endpoint(&cluster, "client", |_| {});
    // A first sender is cut off halfway (its receiver stops) and gives up.
    let mut slow = opts(4);
    slow.rate_limit = Some(8_000_000);
    let (ep1, source) = (ep.clone(), Source::file(&f).unwrap());
    let first =
        tokio::spawn(
            async move { send_files(&ep1, addr, None, &[source], &slow, &mut |_| {}).await },
        );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    agent.stop().await.unwrap();
    first.abort();
    let part = cluster.dir().join("spool/client/.held.img.dwcp-part");
    assert!(part.exists(), "partial file kept for resuming");
    let s = settings(&cluster, |c| c.agent.listen = addr.to_string());
    let agent = RunningAgent::start_with(cluster.creds("server"), &s).await;
    // Sent again, wrongly marked fresh: the receiver's answer shows it holds part of it, and
    // the sender starts over on a new session that resumes.
    let fresh = SendOptions {
        fresh: true,
        ..opts(4)
    };
    let report = send_files(
        &ep,
        addr,
        None,
        &[Source::file(&f).unwrap()],
        &fresh,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(report.objects[0].resumed_from > 0, "{report:?}");
    same_file(&f, &cluster.dir().join("spool/client/held.img"));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t33_object_larger_than_the_free_space_is_refused_up_front() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "huge", 10, 10);
    let mut source = Source::file(&f).unwrap();
    source.size = 1 << 60;
    let ep = endpoint(&cluster, "client", |_| {});
    match send_files(&ep, agent.addr, None, &[source], &opts(2), &mut |_| {}).await {
        Err(SendError::Refused { code, reason, .. }) => {
            assert_eq!(code, dwcp_wire::ErrorCode::STORAGE_ERROR);
            assert!(reason.contains("not enough space"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Refused before anything was created.
    assert!(!cluster.dir().join("spool/client/.huge.dwcp-part").exists());
    // ... and counted as a failed object.
    objects_counted(&agent, "failed", 1.0).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t34_one_transfer_per_destination_file() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "same.img", 8 * 1024 * 1024, 11);
    let g = random_file(src.path(), "other-content", 8 * 1024 * 1024, 12);
    let mut second = Source::file(&g).unwrap();
    second.name = "same.img".into();
    let ep = endpoint(&cluster, "client", |_| {});
    let ep2 = ep.clone();
    let addr = agent.addr;
    let mut slow = opts(2);
    slow.rate_limit = Some(4_000_000);
    let first = Source::file(&f).unwrap();
    let t1 =
        tokio::spawn(
            async move { send_files(&ep, addr, None, &[first], &slow, &mut |_| {}).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Same destination name while the first transfer runs: refused, the first one unharmed.
    match send_files(&ep2, addr, None, &[second], &opts(2), &mut |_| {}).await {
        Err(SendError::Refused { reason, .. }) => {
            assert!(reason.contains("in progress"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    t1.await.unwrap().unwrap();
    same_file(&f, &cluster.dir().join("spool/client/same.img"));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t35_sender_gives_up_after_its_retry_period() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let addr = agent.addr;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "gone", 16 * 1024 * 1024, 13);
    let ep = endpoint(&cluster, "client", |_| {});
    let source = Source::file(&f).unwrap();
    let mut o = opts(2);
    o.rate_limit = Some(4_000_000);
    o.retry_for = Duration::from_secs(2);
    let sender =
        tokio::spawn(async move { send_files(&ep, addr, None, &[source], &o, &mut |_| {}).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The receiver goes away for good.
    agent.stop().await.unwrap();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the sender must give up, not hang")
        .unwrap();
    match r {
        Err(SendError::Interrupted { retry_for, .. }) => {
            assert_eq!(retry_for, Duration::from_secs(2))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn t14_delta_sends_what_the_receiver_lacks_and_rebuilds_the_file_exactly() {
    use dwcp_encoding::image::{Corpus, Dirtier, DirtyModel};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let src = tempfile::tempdir().unwrap();
    let spool = cluster.dir().join("spool/client");
    let v1 = image(8, 1);
    let path = src.path().join("vm.img");
    std::fs::write(&path, &v1.data).unwrap();

    // First transfer: nothing at the receiver; zero pages and duplicates still vanish.
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&path).unwrap()],
        &delta_opts(),
        &mut |_| {},
    )
    .await
    .unwrap();
    let d = r.objects[0].delta.clone().expect("sent delta-encoded");
    assert_eq!(d.layout, "pages");
    // The codec chooser picked one (for the default 1 Gbit/s link) from a sample of the file.
    assert!(
        d.codec.starts_with("zstd") || d.codec == "lz4" || d.codec == "none",
        "{d:?}"
    );
    assert!(d.encoded_bytes < v1.data.len() as u64 * 7 / 10, "{d:?}");
    assert!(d.saved_zero > 0 && d.saved_dup > 0, "{d:?}");
    same_file(&path, &spool.join("vm.img"));

    // Second version, 10% of pages dirtied: unchanged pages are "same as yours".
    let mut v2 = v1.data.clone();
    Dirtier::new(DirtyModel::default(), v1.pages(), 4096, 5).dirty_fraction(
        &mut v2,
        0.10,
        &mut Corpus::synthetic(),
    );
    std::fs::write(&path, &v2).unwrap();
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&path).unwrap()],
        &delta_opts(),
        &mut |_| {},
    )
    .await
    .unwrap();
    let d = r.objects[0].delta.clone().unwrap();
    assert!(d.saved_same > v1.data.len() as u64 / 2, "{d:?}");
    assert!(d.encoded_bytes < v1.data.len() as u64 / 10, "{d:?}");
    same_file(&path, &spool.join("vm.img"));

    // The same first version under another name: every page is in the receiver's cache.
    let other = src.path().join("clone.img");
    std::fs::write(&other, &v1.data).unwrap();
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&other).unwrap()],
        &delta_opts(),
        &mut |_| {},
    )
    .await
    .unwrap();
    let d = r.objects[0].delta.clone().unwrap();
    assert!(d.saved_cache > v1.data.len() as u64 / 3, "{d:?}");
    assert!(d.encoded_bytes < v1.data.len() as u64 / 50, "{d:?}");
    same_file(&other, &spool.join("clone.img"));

    // A file that is not a whole number of pages goes the stream way.
    let odd = src.path().join("odd.bin");
    let mut bytes = v1.data[..3 << 20].to_vec();
    bytes.extend_from_slice(b"tail");
    std::fs::write(&odd, &bytes).unwrap();
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&odd).unwrap()],
        &delta_opts(),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(r.objects[0].delta.as_ref().unwrap().layout, "stream");
    same_file(&odd, &spool.join("odd.bin"));

    // What HDE saved, and what the cache holds, are scraped per peer.
    let mut text = agent.metrics().await;
    let content = |t: &str| {
        dwcp_testkit::metric_value(t, "dwcp_delta_content_bytes_total", &[("peer", "client")])
    };
    for _ in 0..40 {
        if content(&text) >= (3 * (8 << 20) + (3 << 20) + 4) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = agent.metrics().await;
    }
    assert_eq!(
        content(&text),
        (3 * (8 << 20) + (3 << 20) + 4) as f64,
        "{text}"
    );
    let wire =
        dwcp_testkit::metric_value(&text, "dwcp_delta_wire_bytes_total", &[("peer", "client")]);
    assert!(wire > 0.0 && wire < content(&text) / 2.0, "{text}");
    assert!(
        dwcp_testkit::metric_value(&text, "dwcp_baseline_cache_entries", &[]) > 1000.0,
        "{text}"
    );
    assert!(
        dwcp_testkit::metric_value(&text, "dwcp_baseline_cache_events", &[("result", "hit")]) > 0.0,
        "{text}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t15_a_reference_the_receiver_cannot_resolve_is_sent_again_not_corrupted() {
    let cluster = TestCluster::new();
    let seeds = tempfile::tempdir().unwrap();
    let base = image(4, 2);
    let seed_file = seeds.path().join("base.img");
    std::fs::write(&seed_file, &base.data).unwrap();
    let seed_path = seed_file.clone();
    let agent = RunningAgent::start(&cluster, "server", move |c| {
        c.encoding.seed_paths = vec![seed_path];
    })
    .await;
    // The seed file changes after the receiver indexed it: what it advertises is stale.
    let mut changed = base.data.clone();
    for p in 0..base.pages() as usize {
        changed[p * 4096 + 100] ^= 0x5a;
    }
    std::fs::write(&seed_file, &changed).unwrap();

    let src = tempfile::tempdir().unwrap();
    let path = src.path().join("vm.img");
    std::fs::write(&path, &base.data).unwrap();
    let ep = endpoint(&cluster, "client", |_| {});
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&path).unwrap()],
        &delta_opts(),
        &mut |_| {},
    )
    .await
    .unwrap();
    let d = r.objects[0].delta.clone().unwrap();
    assert!(
        d.cold_retry,
        "the first attempt referred to stale seeds: {d:?}"
    );
    assert_eq!(d.saved_cache, 0, "{d:?}");
    same_file(&path, &cluster.dir().join("spool/client/vm.img"));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t16_a_receiver_that_turned_delta_off_gets_plain_files() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.encoding.delta = false).await;
    let src = tempfile::tempdir().unwrap();
    let img = image(2, 3);
    let path = src.path().join("vm.img");
    std::fs::write(&path, &img.data).unwrap();
    let ep = endpoint(&cluster, "client", |_| {});
    let r = send_files(
        &ep,
        agent.addr,
        None,
        &[Source::file(&path).unwrap()],
        &delta_opts(),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(r.objects[0].delta.is_none());
    assert_eq!(r.bytes_sent, img.data.len() as u64);
    same_file(&path, &cluster.dir().join("spool/client/vm.img"));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t17_a_delta_encoded_transfer_resumes_after_a_receiver_restart() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let addr = agent.addr;
    let src = tempfile::tempdir().unwrap();
    // Random pages: the encoded object is about as large as the file, long enough to cut.
    let f = random_file(src.path(), "vm.raw", 24 * 1024 * 1024, 9);
    let ep = endpoint(&cluster, "client", |_| {});
    let source = Source::file(&f).unwrap();
    let mut o = delta_opts();
    o.rate_limit = Some(8_000_000);
    let sender =
        tokio::spawn(async move { send_files(&ep, addr, None, &[source], &o, &mut |_| {}).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = settings(&cluster, |c| c.agent.listen = addr.to_string());
    let agent = RunningAgent::start_with(cluster.creds("server"), &s).await;
    let report = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(report.reconnects >= 1, "{report:?}");
    let o = &report.objects[0];
    assert!(
        o.resumed_from > 0,
        "the encoded object resumed where it stopped: {report:?}"
    );
    let d = o.delta.as_ref().unwrap();
    assert!(!d.cold_retry, "{d:?}");
    assert!(
        report.bytes_sent <= d.encoded_bytes + SendOptions::default().window,
        "{report:?}"
    );
    same_file(&f, &cluster.dir().join("spool/client/vm.raw"));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn t18_adaptive_streams_start_from_the_mode_and_retire_what_does_not_pay() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let f = random_file(src.path(), "big.raw", 32 * 1024 * 1024, 11);
    let ep = endpoint(&cluster, "client", |_| {});
    let mut o = opts(1);
    o.adaptive = true;
    o.min_streams = 2;
    o.max_streams = 16;
    // The rate cap is the bottleneck: more streams cannot help, so the controller goes down.
    o.rate_limit = Some(6_000_000);
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
    let (mode, rtt) = r.mode.expect("mode detected");
    assert_eq!(
        mode,
        dwcp_transport::session::Mode::Datacenter,
        "loopback rtt {rtt:?}"
    );
    assert_eq!(
        r.streams, 16,
        "started from the datacenter default, capped at max: {r:?}"
    );
    // It probed down (a datacenter start): streams were retired; where it ends depends on
    // the machine's noise, but always within bounds.
    assert!(r.streams_retired > 0, "{r:?}");
    assert!((2..=16).contains(&r.streams_final), "{r:?}");
    // A retired stream closes cleanly after its last chunk: nothing on it is sent again.
    assert_eq!(r.resent_bytes, 0, "{r:?}");
    same_file(&f, &cluster.dir().join("spool/client/big.raw"));
    agent.stop().await.unwrap();
}

// QUIC: the same sessions on the streams of one QUIC connection to the agent's UDP port.

fn quic_opts(streams: u32) -> SendOptions {
    SendOptions {
        carrier: Carrier::Quic,
        ..opts(streams)
    }
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

/// Sessions measure their path while they send: heartbeat round trips, goodput, and (QUIC)
/// losses, in the progress callbacks and the report.
#[tokio::test]
async fn t65_sessions_measure_round_trips_and_goodput_while_sending() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let src = tempfile::tempdir().unwrap();
    let ep = endpoint(&cluster, "client", |_| {});
    let mut tcp_counts = None;
    for carrier in [Carrier::Tcp, Carrier::Quic] {
        // A file of its own for each: the same one again would be held whole already.
        let f = random_file(src.path(), &format!("m-{carrier}"), 12 * 1024 * 1024, 12);
        let mut o = opts(2);
        o.carrier = carrier;
        // ~4 MB/s: three seconds, three heartbeats or so.
        o.rate_limit = Some(4_000_000);
        let mut seen_goodput = 0.0_f64;
        let mut seen_rtt = None;
        let report = send_files(
            &ep,
            agent.addr,
            None,
            &[Source::file(&f).unwrap()],
            &o,
            &mut |p| {
                seen_goodput = seen_goodput.max(p.link.goodput_bps);
                seen_rtt = seen_rtt.or(p.link.rtt);
            },
        )
        .await
        .unwrap();
        let link = report.link;
        assert!(link.heartbeats >= 1, "{carrier}: {link:?}");
        let (min, mean, max) = (
            link.rtt_min.unwrap(),
            link.rtt_mean.unwrap(),
            link.rtt_max.unwrap(),
        );
        assert!(min <= mean && mean <= max, "{carrier}: {link:?}");
        // Loopback: far below a second even behind a chunk in the socket buffer.
        assert!(max < Duration::from_secs(1), "{carrier}: {link:?}");
        assert!(
            seen_rtt.is_some(),
            "{carrier}: progress carries the round trip"
        );
        // The rate cap is 4 MB/s: what was acknowledged per second is near it, not above
        // the cap by much (bursts of 50 ms are allowed) and not nothing.
        assert!(
            seen_goodput > 1e6 && link.goodput_bps < 8e6,
            "{carrier}: {seen_goodput} / {link:?}"
        );
        assert_eq!(
            link.lost_packets.is_some(),
            carrier == Carrier::Quic,
            "{carrier}: {link:?}"
        );
        // TCP's own counts, from the kernel: every chunk byte went out once at least, with
        // little more than TLS and framing on top (the first stream's handshake precedes the
        // count). Loopback loses nothing, but a loaded host may see a spurious probe or two.
        assert_eq!(link.tcp.is_some(), carrier == Carrier::Tcp, "{link:?}");
        if let Some(t) = link.tcp {
            let size = 12 * 1024 * 1024;
            assert!((size..size + size / 50).contains(&t.bytes_sent), "{t:?}");
            assert!(t.segments_sent >= size / 65536, "{t:?}");
            assert!(t.retransmits <= t.segments_sent / 10, "{t:?}");
            tcp_counts = Some(t);
        }
    }
    // The receiver's metrics take what the TCP session's heartbeats reported: some of its
    // segments (its last heartbeat came before the end), never more than it sent.
    let t = tcp_counts.unwrap();
    let text = agent.metrics().await;
    let peer = [("peer", "client")];
    let segments = dwcp_testkit::metric_value(&text, "dwcp_session_tcp_segments_total", &peer);
    let retrans = dwcp_testkit::metric_value(&text, "dwcp_session_tcp_retransmits_total", &peer);
    assert!(
        segments > 0.0 && segments <= (t.segments_sent + 20) as f64,
        "{t:?}\n{text}"
    );
    assert!(retrans <= segments, "{text}");
    // A transfer shorter than a heartbeat's second still reaches the metrics: its counts go
    // in a last heartbeat before the goodbye.
    let small = random_file(src.path(), "small", 1024 * 1024, 13);
    let ep2 = endpoint(&cluster, "client2", |_| {});
    let mut o = opts(2);
    o.carrier = Carrier::Tcp;
    let r = send_files(
        &ep2,
        agent.addr,
        None,
        &[Source::file(&small).unwrap()],
        &o,
        &mut |_| {},
    )
    .await
    .unwrap();
    let t = r.link.tcp.unwrap();
    let text = agent.metrics().await;
    let segments = dwcp_testkit::metric_value(
        &text,
        "dwcp_session_tcp_segments_total",
        &[("peer", "client2")],
    );
    assert!(
        segments >= (t.segments_sent / 2) as f64 && segments <= (t.segments_sent + 20) as f64,
        "{t:?} ({} heartbeats)\n{text}",
        r.link.heartbeats
    );
    // The receiver's side, per peer, while a session runs: its streams.
    let mut o = opts(3);
    o.rate_limit = Some(4_000_000);
    let f = random_file(src.path(), "m-later", 12 * 1024 * 1024, 14);
    let (addr, source) = (agent.addr, Source::file(&f).unwrap());
    let sender =
        tokio::spawn(async move { send_files(&ep, addr, None, &[source], &o, &mut |_| {}).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let text = agent.metrics().await;
    assert_eq!(
        dwcp_testkit::metric_value(&text, "dwcp_session_streams", &[("peer", "client")]),
        3.0,
        "{text}"
    );
    sender.await.unwrap().unwrap();
    agent.stop().await.unwrap();
}

/// The receiver says what its copy of a name is, so that an empty list of page hashes is not
/// taken for "no copy" when the copy is there and cannot be read (a source deciding whether a
/// migration committed would resume its VM beside the committed one).
#[tokio::test]
async fn t66b_a_copy_that_cannot_be_read_is_told_from_no_copy() {
    use dwcp_transport::session::{BaseRequest, CopyState, KeptSession, query_copy_kept};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let spool = cluster.dir().join("spool/client");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("vm.img"), vec![7u8; 8192]).unwrap();
    let fifo = spool.join("fifo.img");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let ask = async |name: &str, raw_size: u64| {
        let req = BaseRequest {
            name,
            raw_size,
            page_size: 4096,
            migration_target: false,
        };
        let mut own = KeptSession::default();
        let q = query_copy_kept(&ep, agent.addr, None, &req, &mut own);
        tokio::time::timeout(Duration::from_secs(20), q)
            .await
            .expect("no answer within 20 s")
            .unwrap()
    };
    let (pages, state) = ask("vm.img", 8192).await;
    assert_eq!((pages.len(), state), (2, CopyState::Hashed));
    assert_eq!(ask("vm.img", 4096).await, (Vec::new(), CopyState::None));
    assert_eq!(ask("absent.img", 4096).await, (Vec::new(), CopyState::None));
    // Not a regular file: answered at once (a FIFO's open would block), as unreadable.
    assert_eq!(
        ask("fifo.img", 0).await,
        (Vec::new(), CopyState::Unreadable)
    );
    agent.stop().await.unwrap();
}

/// A kept session waits between requests (a QEMU migration's control session waits for the
/// stream's end, minutes on a slow path): one the receiver closed as idle meanwhile is
/// replaced before the next request goes out, and one kept alive stays the same connection.
#[tokio::test]
async fn t66_a_kept_session_closed_as_idle_is_replaced_and_one_kept_alive_stays_open() {
    use dwcp_transport::session::{BaseRequest, KeptSession, query_base_kept};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |c| c.protocol.idle_timeout_secs = 2).await;
    let ep = endpoint(&cluster, "client", |_| {});
    let req = BaseRequest {
        name: "nothing-here.img",
        raw_size: 0,
        page_size: 0,
        migration_target: false,
    };
    let accepted = async || {
        dwcp_testkit::metric_value(
            &agent.metrics().await,
            "dwcp_connections_accepted_total",
            &[],
        )
    };

    let one = SendOptions {
        streams: 1,
        ..SendOptions::default()
    };

    // Idle past the receiver's timeout: the request still gets its answer, on a new session.
    let mut kept = KeptSession::new();
    kept.open(&ep, agent.addr, None, &one, 0).await.unwrap();
    let before = accepted().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    query_base_kept(&ep, agent.addr, None, &req, &mut kept)
        .await
        .expect("a request after the receiver closed the kept session as idle");
    assert_eq!(accepted().await, before + 1.0);

    // Kept alive for as long: the same connection answers.
    let mut kept = KeptSession::new();
    kept.open(&ep, agent.addr, None, &one, 0).await.unwrap();
    let before = accepted().await;
    let until = tokio::time::Instant::now() + Duration::from_millis(4000);
    while tokio::time::Instant::now() < until {
        assert!(kept.keepalive().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    query_base_kept(&ep, agent.addr, None, &req, &mut kept)
        .await
        .unwrap();
    assert_eq!(
        accepted().await,
        before,
        "the kept session was not kept alive"
    );
    kept.close().await;
    agent.stop().await.unwrap();
}

/// Every stream cut at once mid-transfer, the link up again at once (the receiver forgets
/// a session whose last connection ends): the sender starts a new session and resumes, rather
/// than send the object's chunks on replacements that join a session the receiver no longer
/// knows (each would wait 30 s for a begin that never comes).
#[tokio::test]
async fn every_stream_cut_at_once_resumes_on_a_new_session() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let proxy = Proxy::start(agent.addr, Fault::None).await;
    let src = tempfile::tempdir().unwrap();
    let path = random_file(src.path(), "cut", 8 << 20, 31);
    let sources = vec![Source::file(&path).unwrap()];
    let ep = endpoint(&cluster, "client", |_| {});
    let o = SendOptions {
        rate_limit: Some(4_000_000),
        ..opts(4)
    };
    let cut = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        proxy.outage(Duration::from_millis(1));
    };
    let mut quiet = |_: &_| {};
    let send = tokio::time::timeout(
        Duration::from_secs(25),
        send_files(&ep, proxy.addr, None, &sources, &o, &mut quiet),
    );
    let (report, ()) = tokio::join!(send, cut);
    let report = report
        .expect("stalled: replacements joined a forgotten session")
        .unwrap();
    assert!(report.reconnects >= 1, "{report:?}");
    same_file(&path, &cluster.dir().join("spool/client/cut"));
    drop(proxy);
    agent.stop().await.unwrap();
}

/// A transfer to a receiver reached before (a migration's later round): a link down at its
/// first dial is waited out for the retry period, where one to a receiver never reached fails
/// at once.
#[tokio::test]
async fn a_receiver_reached_before_is_dialled_again_while_the_link_is_down() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "server", |_| {}).await;
    let proxy = Proxy::start(agent.addr, Fault::None).await;
    let src = tempfile::tempdir().unwrap();
    let path = random_file(src.path(), "later", 1 << 20, 9);
    let sources = vec![Source::file(&path).unwrap()];
    let ep = endpoint(&cluster, "client", |_| {});

    proxy.outage(Duration::from_secs(30));
    let t = std::time::Instant::now();
    let first = send_files(&ep, proxy.addr, None, &sources, &opts(2), &mut |_| {}).await;
    assert!(matches!(first, Err(SendError::Connect(_))), "{first:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    proxy.outage(Duration::from_millis(1500));
    let t = std::time::Instant::now();
    let reached = SendOptions {
        reached: true,
        ..opts(2)
    };
    let report = send_files(&ep, proxy.addr, None, &sources, &reached, &mut |_| {})
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(report.objects.len(), 1, "{report:?}");
    same_file(&path, &cluster.dir().join("spool/client/later"));
    drop(proxy);
    agent.stop().await.unwrap();
}
