//! The QEMU stream tunnel against a fake destination QEMU (no QEMU needed): blocks sent out
//! of order, encoded or raw, one connection killed mid-way (its blocks go again, some of them
//! a second time to the destination), one connection stuck (its blocks go again on the
//! others) — QEMU gets exactly the stream, in order, and the destination says when it has
//! loaded it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dwcp_encoding::stream::{StreamConfig, StreamEncoder};
use dwcp_testkit::{Fault, Proxy, RunningAgent, TestCluster, endpoint, metric_value};
use dwcp_transport::session::{
    Block, KeptSession, MigrationRequest, RateLimit, SendError, Tunnel, migration_request_kept,
};
use dwcp_transport::{ConnError, Endpoint};
use dwcp_wire::{NodeId, data};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// A destination QEMU as the agent sees it: an incoming socket that collects the stream, and
/// a monitor that says `inmigrate` until the stream has ended, `running` after.
/// It reads nothing from its stream for `idle` after connecting (a QEMU busy loading what it
/// has). Yields the stream and whether it was told to `quit` before the stream ended.
fn fake_qemu(dir: &Path, vm: &str, idle: Duration) -> tokio::task::JoinHandle<(Vec<u8>, bool)> {
    let loaded = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let qmp = UnixListener::bind(dir.join(format!("{vm}.qmp"))).unwrap();
    let l2 = loaded.clone();
    let q2 = quit.clone();
    tokio::spawn(async move {
        let (s, _) = qmp.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let answer = if line.contains("query-status") {
                let st = if l2.load(Ordering::SeqCst) {
                    "running"
                } else {
                    "inmigrate"
                };
                format!("{{\"return\": {{\"status\": \"{st}\", \"running\": true}}}}\n")
            } else {
                if line.contains("\"quit\"") {
                    q2.store(true, Ordering::SeqCst);
                }
                "{\"return\": {}}\n".to_string()
            };
            if w.write_all(answer.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let incoming = UnixListener::bind(dir.join(format!("{vm}.incoming"))).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = incoming.accept().await.unwrap();
        tokio::time::sleep(idle).await;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let quit = quit.load(Ordering::SeqCst);
        loaded.store(!quit, Ordering::SeqCst);
        (got, quit)
    })
}

fn block_content(seq: u64) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..256 * 1024)
        .map(|i| {
            if seq.is_multiple_of(3) {
                // Compressible text-like content.
                b"the quick brown fox jumps over the lazy dog "[i % 44]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// A request about the test's VM.
fn req(op: u32, segments: u64) -> MigrationRequest<'static> {
    MigrationRequest {
        name: "vm",
        op,
        segments,
        digest: None,
        postcopy: false,
        timeout: Duration::from_secs(30),
        stream_session: None,
        wait: Duration::ZERO,
    }
}

/// A destination agent whose (fake) QEMU waits for VM "vm", with the migration opened.
struct Opened {
    _cluster: TestCluster,
    agent: RunningAgent,
    ep: Endpoint,
    got: tokio::task::JoinHandle<(Vec<u8>, bool)>,
    control: KeptSession,
}

async fn open_vm() -> Opened {
    open_vm_with(Duration::ZERO).await
}

async fn open_vm_with(qemu_idle: Duration) -> Opened {
    open_vm_limited(qemu_idle, 512).await
}

/// A destination whose agent allows at most `max_streams` streams a session.
async fn open_vm_limited(qemu_idle: Duration, max_streams: u32) -> Opened {
    let cluster = TestCluster::new();
    let qemu_dir = cluster.dir().join("qemu");
    std::fs::create_dir_all(&qemu_dir).unwrap();
    let qd = qemu_dir.clone();
    let agent = RunningAgent::start(&cluster, "dest", move |c| {
        c.migration.qemu_dir = qd;
        c.transport.max_streams = max_streams;
        c.transport.min_streams = c.transport.min_streams.min(max_streams);
    })
    .await;
    let ep = endpoint(&cluster, "src", |_| {});
    let got = fake_qemu(&qemu_dir, "vm", qemu_idle);
    let mut control = KeptSession::new();
    migration_request_kept(
        &ep,
        agent.addr,
        None,
        &req(data::MIGRATION_QEMU_OPEN, 0),
        &mut control,
    )
    .await
    .unwrap();
    Opened {
        _cluster: cluster,
        agent,
        ep,
        got,
        control,
    }
}

impl Opened {
    /// Ends the stream `expected` of `n` blocks: the destination's answer, and the bytes its
    /// QEMU got.
    async fn finish(self, tunnel: Tunnel, n: u64, expected: &[u8]) -> (String, Vec<u8>) {
        let digest = *blake3::hash(expected).as_bytes();
        let (detail, got, quit) = self.finish_with(tunnel, n, digest).await;
        assert!(!quit, "QEMU told to quit after a complete stream");
        (detail.unwrap(), got)
    }

    /// Ends the stream `expected` of `n` blocks and checks that the destination's QEMU runs,
    /// having got exactly that stream. Yields the destination's answer.
    async fn finish_whole(self, tunnel: Tunnel, n: u64, expected: &[u8]) -> String {
        let (detail, got) = self.finish(tunnel, n, expected).await;
        assert!(detail.contains("\"status\":\"running\""), "{detail}");
        assert!(
            got == expected,
            "QEMU got {} bytes, not the stream",
            got.len()
        );
        detail
    }

    /// Ends a stream of `n` blocks whose digest the source says is `digest`.
    async fn finish_with(
        mut self,
        tunnel: Tunnel,
        n: u64,
        digest: [u8; 32],
    ) -> (Result<String, SendError>, Vec<u8>, bool) {
        let finish = MigrationRequest {
            digest: Some(digest),
            ..req(data::MIGRATION_QEMU_FINISH, n)
        };
        let detail =
            migration_request_kept(&self.ep, self.agent.addr, None, &finish, &mut self.control)
                .await;
        let (got, quit) = tokio::time::timeout(Duration::from_secs(10), self.got)
            .await
            .unwrap()
            .unwrap();
        tunnel.close();
        self.control.close().await;
        self.agent.stop().await.unwrap();
        (detail, got, quit)
    }
}

/// Queues blocks 0..n of [`block_content`], raw; returns the stream they make.
fn send_raw(tunnel: &Tunnel, n: u64) -> Vec<u8> {
    send_raw_range(tunnel, 0..n)
}

/// Queues blocks `seqs` of [`block_content`], raw; returns the bytes they stand for.
fn send_raw_range(tunnel: &Tunnel, seqs: std::ops::Range<u64>) -> Vec<u8> {
    let mut expected = Vec::new();
    for seq in seqs {
        let raw = Bytes::from(block_content(seq));
        expected.extend_from_slice(&raw);
        tunnel
            .send(Block {
                seq,
                raw,
                encoded: None,
            })
            .unwrap();
    }
    expected
}

/// Waits until `n` blocks are acknowledged (at most 60 s), failing on a tunnel error.
async fn wait_acked(tunnel: &Tunnel, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tunnel.acked().0 < n {
        assert!(Instant::now() < deadline, "acked {:?}", tunnel.acked());
        assert!(tunnel.error().is_none(), "{:?}", tunnel.error());
        tunnel.wait_progress(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_arrives_whole_and_in_order_despite_reordering_and_a_lost_stream() {
    let vm = open_vm().await;

    // The first connection to carry 100 kB dies inside its first random block (each is 256
    // KiB on the wire): what it had in flight goes again on the others. (Connection 1 by
    // number could go without a block under load: the others took them all.)
    let proxy = Proxy::start(vm.agent.addr, Fault::KillFirst { after: 100_000 }).await;
    let tunnel = Tunnel::open(&vm.ep, proxy.addr, None, 4, "vm")
        .await
        .unwrap();
    let n = 40u64;
    let mut order: Vec<u64> = (0..n).collect();
    order.reverse(); // the last block first: the destination must hold it back
    order.swap(5, 30);
    let mut expected = Vec::new();
    for seq in 0..n {
        expected.extend_from_slice(&block_content(seq));
    }
    for &seq in &order {
        let raw = Bytes::from(block_content(seq));
        let encoded = (seq % 2 == 0).then(|| {
            let mut enc = StreamEncoder::new(StreamConfig::default()).unwrap();
            let mut out = Vec::new();
            enc.push(&raw, None, &mut out);
            enc.finish(None, &mut out);
            (data::TUNNEL_HDE_STREAM, Bytes::from(out))
        });
        tunnel.send(Block { seq, raw, encoded }).unwrap();
    }
    wait_acked(&tunnel, n).await;
    let (_, raw, wire, resent) = tunnel.acked();
    assert_eq!(raw, expected.len() as u64);
    assert!(wire < raw, "text blocks compress: {wire} of {raw}");
    assert!(
        resent > 0,
        "the killed connection's blocks went again: {:?}",
        tunnel.acked()
    );

    let detail = vm.finish_whole(tunnel, n, &expected).await;
    assert!(
        detail.contains(&format!("\"fed_bytes\":{}", expected.len())),
        "{detail}"
    );
}

/// How many connections `open` has made to a listener that takes them and never answers, by
/// the time `wait` is over.
async fn dials_before_any_answer(expected: Option<&NodeId>, wait: Duration) -> usize {
    let cluster = TestCluster::new();
    let ep = endpoint(&cluster, "src", |_| {});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let open = Tunnel::open(&ep, addr, expected, 4, "vm");
    assert!(
        tokio::time::timeout(wait, open).await.is_err(),
        "opened against a listener that never answers"
    );
    holder.abort();
    accepted.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_named_node_dials_every_stream_at_once() {
    // Named: all four dials are out before any peer answers. Unnamed: only the first, whose
    // answer names the node the rest must reach.
    let dest = NodeId::new("dest").unwrap();
    assert_eq!(
        dials_before_any_answer(Some(&dest), Duration::from_millis(500)).await,
        4
    );
    assert_eq!(
        dials_before_any_answer(None, Duration::from_millis(500)).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_tunnel_refuses_another_node_and_keeps_to_the_peers_limit() {
    let vm = open_vm_limited(Duration::ZERO, 2).await;
    let other = NodeId::new("src").unwrap();
    match Tunnel::open(&vm.ep, vm.agent.addr, Some(&other), 4, "vm").await {
        Err(SendError::Connect(ConnError::WrongPeer { expected, found })) => {
            assert_eq!((expected.as_str(), found.as_str()), ("src", "dest"));
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a tunnel to the wrong node opened"),
    }
    // Four asked for, dialled at once; the peer allows two, and the stream goes over those.
    let dest = NodeId::new("dest").unwrap();
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, Some(&dest), 4, "vm")
        .await
        .unwrap();
    assert_eq!(tunnel.streams(), 2);
    let n = 12u64;
    let expected = send_raw(&tunnel, n);
    wait_acked(&tunnel, n).await;
    vm.finish_whole(tunnel, n, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_after_blocks_were_fed_makes_the_destination_qemu_quit_first() {
    let mut vm = open_vm().await;
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, None, 2, "vm")
        .await
        .unwrap();
    send_raw(&tunnel, 3);
    wait_acked(&tunnel, 3).await;
    migration_request_kept(
        &vm.ep,
        vm.agent.addr,
        None,
        &req(data::MIGRATION_QEMU_ABORT, 0),
        &mut vm.control,
    )
    .await
    .unwrap();
    let (got, quit) = tokio::time::timeout(Duration::from_secs(10), vm.got)
        .await
        .unwrap()
        .unwrap();
    assert!(quit, "QEMU not told to quit before its stream closed");
    assert!(
        got.len() < 3 * 256 * 1024,
        "the stream's last bytes are held back"
    );
    tunnel.close();
    vm.control.close().await;
    vm.agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_digest_differs_never_completes_at_the_destination() {
    let vm = open_vm().await;
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, None, 2, "vm")
        .await
        .unwrap();
    // Three blocks of pages and devices, then the end of a QEMU pre-copy stream: its
    // end-of-state marker and a 100 kB VM description.
    let n = 4u64;
    let mut expected = send_raw(&tunnel, n - 1);
    let eof = expected.len();
    let mut end = vec![0u8, 6];
    end.extend_from_slice(&100_000u32.to_be_bytes());
    end.push(b'{');
    end.extend(std::iter::repeat_n(b' ', 100_000 - 2));
    end.push(b'}');
    expected.extend_from_slice(&end);
    tunnel
        .send(Block {
            seq: n - 1,
            raw: Bytes::from(end),
            encoded: None,
        })
        .unwrap();
    wait_acked(&tunnel, n).await;
    let mut vm = vm;
    // A finish without the digest is refused, and changes nothing.
    let e = migration_request_kept(
        &vm.ep,
        vm.agent.addr,
        None,
        &req(data::MIGRATION_QEMU_FINISH, n),
        &mut vm.control,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("0-byte stream digest"), "{e}");
    // The source read other bytes from its QEMU than the destination got.
    let mut other = expected.clone();
    other[1000] ^= 1;
    let (r, got, quit) = vm
        .finish_with(tunnel, n, *blake3::hash(&other).as_bytes())
        .await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("BLAKE3"), "{e}");
    // QEMU got everything before the end-of-state marker, and was told to quit before its
    // stream closed: a real QEMU 7.2 completes a load cut anywhere after the marker.
    assert!(quit, "QEMU not told to quit");
    assert_eq!(got.len(), eof);
    assert!(got[..] == expected[..eof]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_stuck_on_one_connection_goes_again_on_another() {
    let vm = open_vm().await;
    // The first connection past 100 kB stops forwarding for a minute inside its first block
    // (as a connection in a retransmission timeout does): its blocks go again on the others,
    // long before that. (Not a connection chosen by its index: the tunnel's writers take
    // blocks as they are free, and under load one of them may get none.)
    let proxy = Proxy::start(
        vm.agent.addr,
        Fault::PauseFirst {
            after: 100_000,
            delay: Duration::from_secs(60),
        },
    )
    .await;
    let tunnel = Tunnel::open(&vm.ep, proxy.addr, None, 4, "vm")
        .await
        .unwrap();
    let n = 40u64;
    let expected = send_raw(&tunnel, n);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tunnel.window_acked().2 < expected.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "stuck behind the paused connection: {:?}, hedged {}",
            tunnel.window_acked(),
            tunnel.hedged()
        );
        assert!(tunnel.error().is_none(), "{:?}", tunnel.error());
        tunnel.wait_progress(Duration::from_millis(100)).await;
    }
    assert!(tunnel.hedged() > 0);
    assert_eq!(tunnel.acked().0, n);
    vm.finish_whole(tunnel, n, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_tunnel_sends_no_faster_than_its_cap_on_all_connections_together() {
    let vm = open_vm().await;
    let cap = RateLimit::new(4_000_000);
    let tunnel = Tunnel::open_with(&vm.ep, vm.agent.addr, None, 4, "vm", Some(cap))
        .await
        .unwrap();
    let started = Instant::now();
    let n = 24u64;
    let expected = send_raw(&tunnel, n);
    wait_acked(&tunnel, n).await;
    let took = started.elapsed();
    // 6 MiB at 4 MB/s is 1.57 s. Each connection pays for a frame after sending it (one
    // block each, 1 MiB in all, may go at once), and the bucket holds 50 ms of rate.
    let least = (n * 256 * 1024 - 4 * 256 * 1024 - 200_000) as f64 / 4e6;
    assert!(
        took.as_secs_f64() >= least,
        "{n} blocks of 256 KiB in {took:?}: faster than the cap allows ({least:.2} s)"
    );
    // Past a second, the tunnel told the receiver what TCP counted under it (its
    // heartbeat rides behind a block), for the per-peer metrics.
    let text = vm.agent.metrics().await;
    let segments = metric_value(&text, "dwcp_session_tcp_segments_total", &[("peer", "src")]);
    let sent = tunnel.tcp_counts().unwrap().segments_sent;
    assert!(
        segments > 0.0 && segments <= (sent + 20) as f64,
        "{sent} sent\n{text}"
    );
    vm.finish_whole(tunnel, n, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_qemu_that_does_not_read_holds_the_acknowledgements_back() {
    // QEMU takes nothing for 3 s: the destination acknowledges what it holds for QEMU (2 MiB,
    // and a block being written), then stops reading, so the sender's window sees the wait.
    let vm = open_vm_with(Duration::from_secs(3)).await;
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, None, 4, "vm")
        .await
        .unwrap();
    let n = 40u64;
    let expected = send_raw(&tunnel, n);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = tunnel.acked().0;
    // What the destination holds for QEMU (2 MiB and a block being written: 9 blocks), and
    // blocks that reached it ahead of one before them: those are taken at once (a gap), and
    // with four connections racing, a few more each time (up to 20 seen).
    assert!(
        held <= 24,
        "{held} blocks of 256 KiB acknowledged with QEMU not reading"
    );
    wait_acked(&tunnel, n).await;
    vm.finish_whole(tunnel, n, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_without_an_open_migration_or_qemu_dir_are_refused() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let mut control = KeptSession::new();
    let open = MigrationRequest {
        name: "vm",
        op: data::MIGRATION_QEMU_OPEN,
        segments: 0,
        digest: None,
        postcopy: false,
        timeout: Duration::from_secs(30),
        stream_session: None,
        wait: Duration::ZERO,
    };
    let e = migration_request_kept(&ep, agent.addr, None, &open, &mut control)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("qemu_dir"), "{e}");

    let tunnel = Tunnel::open(&ep, agent.addr, None, 2, "vm").await.unwrap();
    tunnel
        .send(Block {
            seq: 0,
            raw: Bytes::from_static(b"stream"),
            encoded: None,
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnel.error().is_none() {
        assert!(Instant::now() < deadline, "no error reported");
        tunnel.wait_progress(Duration::from_millis(100)).await;
    }
    assert!(
        tunnel.error().unwrap().contains("qemu_dir"),
        "{:?}",
        tunnel.error()
    );
    tunnel.close();
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_standing_for_more_than_16_mib_is_refused() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let tunnel = Tunnel::open(&ep, agent.addr, None, 1, "vm").await.unwrap();
    // A tiny encoded block claiming to stand for 17 MiB: the receiver would size its output
    // from that, so it is refused before it is sent (and by a receiver, before decoding).
    let e = tunnel
        .send(Block {
            seq: 0,
            raw: Bytes::from(vec![0u8; 17 << 20]),
            encoded: Some((data::TUNNEL_HDE_STREAM, Bytes::from_static(b"tiny"))),
        })
        .unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    assert!(tunnel.error().is_none(), "the tunnel itself goes on");
    tunnel.close();
    agent.stop().await.unwrap();
}

/// Encodes `pieces` as one block, each 4 KiB piece a chunk of its own.
fn encode_pages(
    pieces: &[Vec<u8>],
    remote: Option<&dwcp_encoding::RemoteIndex>,
) -> (Bytes, dwcp_encoding::stream::StreamStats) {
    let mut enc = StreamEncoder::new(StreamConfig::default()).unwrap();
    let mut out = Vec::new();
    for p in pieces {
        if p.len() == 4096 {
            enc.push_chunk(p, remote, &mut out);
        } else {
            enc.push(p, remote, &mut out);
        }
    }
    let s = enc.finish(remote, &mut out);
    (Bytes::from(out), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_a_decoded_block_are_learned_so_later_blocks_refer_to_them() {
    let vm = open_vm().await;
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, None, 2, "vm")
        .await
        .unwrap();
    let page = |seed: u64| block_content(seed)[..4096].to_vec();
    let (p, q, r) = (page(1), page(2), page(4));
    let hdr = |n: u64| (n << 12 | 0x28).to_be_bytes().to_vec();
    let mut expected = Vec::new();

    // Block 0 carries P and Q literally; the destination decodes it and learns them.
    let b0 = vec![hdr(1), p.clone(), hdr(2), q.clone()];
    let (enc, s) = encode_pages(&b0, None);
    assert_eq!(s.cache_bytes, 0);
    expected.extend(b0.concat());
    tunnel
        .send(Block {
            seq: 0,
            raw: Bytes::from(b0.concat()),
            encoded: Some((data::TUNNEL_HDE_STREAM, enc)),
        })
        .unwrap();
    wait_acked(&tunnel, 1).await;
    assert_eq!(tunnel.take_acked(), vec![(0, true)]);

    // Block 1 refers to P by the destination's cache: it resolves, nothing goes again raw.
    let known = dwcp_encoding::RemoteIndex::from_hashes([dwcp_encoding::fast64(&p)]);
    let b1 = vec![hdr(7), p.clone(), hdr(8), r.clone()];
    let (enc, s) = encode_pages(&b1, Some(&known));
    assert_eq!(s.cache_bytes, 4096, "{s:?}");
    expected.extend(b1.concat());
    tunnel
        .send(Block {
            seq: 1,
            raw: Bytes::from(b1.concat()),
            encoded: Some((data::TUNNEL_HDE_STREAM, enc)),
        })
        .unwrap();
    // Block 2 goes raw: the destination does not decode it, so learns nothing from it.
    let b2 = [hdr(9), r.clone()].concat();
    expected.extend(&b2);
    tunnel
        .send(Block {
            seq: 2,
            raw: Bytes::from(b2),
            encoded: None,
        })
        .unwrap();
    wait_acked(&tunnel, 3).await;
    let mut acked = tunnel.take_acked();
    acked.sort_unstable();
    assert_eq!(acked, vec![(1, true), (2, false)]);
    assert!(tunnel.take_acked().is_empty());
    assert_eq!(tunnel.acked().3, 0, "no block went again raw");

    vm.finish_whole(tunnel, 3, &expected).await;
}

/// A tunnel's connections hold little unsent (see `TUNNEL_NOTSENT_LOWAT`), well under what the
/// endpoint gives its other connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_connections_keep_little_unsent() {
    use dwcp_transport::session::tunnel::{TUNNEL_NOTSENT_LOWAT, tune};
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let conn = dwcp_transport::connect_to(&ep, agent.addr, None)
        .await
        .unwrap();
    let before = conn.notsent_lowat().unwrap();
    tune(&conn);
    assert_eq!(conn.notsent_lowat().unwrap(), TUNNEL_NOTSENT_LOWAT);
    assert!(
        before == 0 || before > TUNNEL_NOTSENT_LOWAT,
        "endpoint's own limit {before}"
    );
    drop(conn);
    agent.stop().await.unwrap();
}

/// A tunnel counts what TCP sent under it (the kernel's count), and closing it closes its
/// connections at once even while the tunnel is still held: the descriptors kept to read
/// the counts go with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_counts_tcp_and_its_close_ends_the_connections() {
    let vm = open_vm().await;
    let active = async || metric_value(&vm.agent.metrics().await, "dwcp_connections_active", &[]);
    let before = active().await;
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, None, 4, "vm")
        .await
        .unwrap();
    let n = 8u64;
    let _ = send_raw(&tunnel, n);
    wait_acked(&tunnel, n).await;
    let t = tunnel.tcp_counts().unwrap();
    assert!(
        t.bytes_sent >= n * 256 * 1024 && t.segments_sent > 0,
        "{t:?}"
    );
    assert_eq!(active().await, before + 4.0);
    tunnel.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    while active().await > before {
        assert!(
            Instant::now() < deadline,
            "the tunnel's connections outlived its close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still counted after the close.
    assert!(tunnel.tcp_counts().unwrap().bytes_sent >= t.bytes_sent);
    drop(tunnel);
}

/// A migration opened at the destination, and a tunnel of `streams` connections to it through
/// a proxy that can take the link down, dialling again for `retry` once all are lost.
async fn through_proxy(streams: u32, retry: Duration) -> (Opened, Proxy, Tunnel) {
    let vm = open_vm().await;
    let proxy = Proxy::start(vm.agent.addr, Fault::None).await;
    let tunnel = Tunnel::open(&vm.ep, proxy.addr, None, streams, "vm")
        .await
        .unwrap();
    tunnel.retry_within(retry);
    (vm, proxy, tunnel)
}

/// The link goes down between two halves of the stream and comes back 1.5 s later, the
/// second half queued meanwhile: the tunnel dials again, replaces every lost connection, and
/// the stream arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_rides_out_a_link_outage_on_new_connections() {
    let (vm, proxy, tunnel) = through_proxy(4, Duration::from_secs(20)).await;
    let n = 40u64;
    let mut expected = send_raw_range(&tunnel, 0..n / 2);
    wait_acked(&tunnel, n / 2).await;
    let down = Instant::now();
    proxy.outage(Duration::from_millis(1500));
    expected.extend(send_raw_range(&tunnel, n / 2..n));
    // It says the link is down while it is.
    let deadline = Instant::now() + Duration::from_secs(1);
    while tunnel.down_since().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(tunnel.down_since().is_some(), "{:?}", tunnel.acked());
    wait_acked(&tunnel, n).await;
    assert_eq!(tunnel.down_since(), None);
    assert!(
        down.elapsed() >= Duration::from_millis(1400),
        "the second half went before the link was back: {:?}",
        down.elapsed()
    );
    // The first connection back may carry the rest alone; the others follow (each counts
    // once the receiver answered on it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while (tunnel.streams() < 4 || tunnel.replaced() < 4) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tunnel.streams(), 4);
    assert_eq!(tunnel.replaced(), 4, "every lost connection replaced once");
    let detail = vm.finish_whole(tunnel, n, &expected).await;
    assert!(
        detail.contains(&format!("\"fed_bytes\":{}", expected.len())),
        "{detail}"
    );
}

/// A link down for longer than the tunnel's retry period fails it, with the reason; until
/// then it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_for_longer_than_the_retry_period_fails_the_tunnel() {
    let (vm, proxy, tunnel) = through_proxy(2, Duration::from_secs(1)).await;
    send_raw(&tunnel, 2);
    wait_acked(&tunnel, 2).await;
    let down = Instant::now();
    proxy.outage(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(15);
    while tunnel.error().is_none() {
        assert!(Instant::now() < deadline, "the tunnel never gave up");
        tunnel.wait_progress(Duration::from_millis(100)).await;
    }
    let error = tunnel.error().unwrap();
    assert!(
        down.elapsed() >= Duration::from_millis(900),
        "gave up before its retry period: {:?}, {error}",
        down.elapsed()
    );
    assert!(
        error.contains("every tunnel stream failed") && error.contains("within 1s"),
        "{error}"
    );
    assert_eq!(tunnel.replaced(), 0);
    tunnel.close();
    vm.agent.stop().await.unwrap();
}

/// A FINISH sent again (its connection lost before the answer) gets the answer the first
/// got, whether it comes while the first still waits for QEMU or after; the migration counts
/// once. One for another stream is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_sent_again_gets_the_first_ones_answer() {
    // QEMU reads nothing for 1.5 s: the first FINISH waits for it.
    let mut vm = open_vm_with(Duration::from_millis(1500)).await;
    let tunnel = Tunnel::open(&vm.ep, vm.agent.addr, None, 2, "vm")
        .await
        .unwrap();
    let n = 4u64;
    let expected = send_raw(&tunnel, n);
    wait_acked(&tunnel, n).await;
    let digest = *blake3::hash(&expected).as_bytes();
    let finish = MigrationRequest {
        digest: Some(digest),
        ..req(data::MIGRATION_QEMU_FINISH, n)
    };
    let (ep, addr) = (vm.ep.clone(), vm.agent.addr);
    let ask = |f: MigrationRequest<'static>| {
        let ep = ep.clone();
        tokio::spawn(async move {
            let mut own = KeptSession::new();
            let r = migration_request_kept(&ep, addr, None, &f, &mut own).await;
            own.close().await;
            r
        })
    };
    let first = ask(finish);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = ask(finish);
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert!(first.contains("\"status\":\"running\""), "{first}");
    assert_eq!(second, first);
    let third = migration_request_kept(&vm.ep, addr, None, &finish, &mut vm.control)
        .await
        .unwrap();
    assert_eq!(third, first);
    // A block sent again after the finish (its acknowledgement lost with its connection) was
    // fed: acknowledged, not refused.
    send_raw_range(&tunnel, 1..2);
    wait_acked(&tunnel, n + 1).await;
    // One beyond the stream was not.
    send_raw_range(&tunnel, n..n + 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnel.error().is_none() && Instant::now() < deadline {
        tunnel.wait_progress(Duration::from_millis(100)).await;
    }
    assert!(
        tunnel
            .error()
            .is_some_and(|e| e.contains("no incoming migration")),
        "{:?}",
        tunnel.error()
    );
    let other = MigrationRequest {
        digest: Some([7; 32]),
        ..req(data::MIGRATION_QEMU_FINISH, n)
    };
    let e = migration_request_kept(&vm.ep, addr, None, &other, &mut vm.control)
        .await
        .unwrap_err();
    assert!(
        matches!(e, SendError::Refused { .. }) && e.to_string().contains("no incoming migration"),
        "{e}"
    );
    let (got, quit) = tokio::time::timeout(Duration::from_secs(10), vm.got)
        .await
        .unwrap()
        .unwrap();
    assert!(!quit && got == expected, "QEMU got {} bytes", got.len());
    let m = vm.agent.metrics().await;
    let committed = metric_value(
        &m,
        "dwcp_migrations_received_total",
        &[
            ("peer", "src"),
            ("backend", "qemu"),
            ("result", "committed"),
        ],
    );
    assert_eq!(committed, 1.0, "{m}");
    tunnel.close();
    vm.control.close().await;
    vm.agent.stop().await.unwrap();
}

/// A destination agent "dest" of `cluster` taking QEMU migrations, and its QEMU directory.
async fn qemu_agent(cluster: &TestCluster) -> (RunningAgent, std::path::PathBuf) {
    let qemu_dir = cluster.dir().join("qemu");
    std::fs::create_dir_all(&qemu_dir).unwrap();
    let qd = qemu_dir.clone();
    let agent = RunningAgent::start(cluster, "dest", move |c| c.migration.qemu_dir = qd).await;
    (agent, qemu_dir)
}

/// Waits (30 s at most) for `tunnel` to fail because the destination refused its block as
/// another stream's.
async fn assert_refused_as_earlier(tunnel: &Tunnel) {
    let t = Instant::now();
    while tunnel.error().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "the block was taken");
        tunnel.wait_progress(Duration::from_millis(100)).await;
    }
    let e = tunnel.error().unwrap();
    assert!(e.contains("earlier one"), "{e}");
}

/// What a fake post-copy QEMU got: its first stream, and the resumed one.
type Streams = tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>;

/// A destination QEMU under post-copy as the agent sees it: its monitor offers out-of-band
/// execution, says `postcopy-active` while its first stream is open and `postcopy-paused`
/// once that closed, and takes `migrate-recover` (out of band) only then, listening on the
/// URI it names. Yields the bytes of its first stream and of the resumed one; a flag set
/// when that listener takes a connection; and the count of the first stream's bytes in.
fn fake_postcopy_qemu(
    dir: &Path,
    vm: &str,
) -> (
    Streams,
    Arc<AtomicBool>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    // Bytes of the first stream in so far.
    let first_in = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fi = first_in.clone();
    let accepted = Arc::new(AtomicBool::new(false));
    let acc = accepted.clone();
    // 0: first stream open, 1: paused, 2: recovering, 3: resumed stream ended.
    let state = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let qmp = UnixListener::bind(dir.join(format!("{vm}.qmp"))).unwrap();
    let (recover_tx, recover_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let st = state.clone();
    tokio::spawn(async move {
        let mut recover_tx = Some(recover_tx);
        let (s, _) = qmp.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let now = st.load(Ordering::SeqCst);
            let answer = if v["execute"] == "query-status" {
                let run = if now == 0 { "inmigrate" } else { "running" };
                serde_json::json!({"return": {"status": run, "running": true}, "id": id})
            } else if v["execute"] == "query-migrate" {
                let m = [
                    "postcopy-active",
                    "postcopy-paused",
                    "postcopy-recover",
                    "completed",
                ];
                serde_json::json!({"return": {"status": m[now as usize]}, "id": id})
            } else if v["exec-oob"] == "migrate-recover" {
                if now == 1 {
                    let uri = v["arguments"]["uri"].as_str().unwrap().to_string();
                    let path = uri.strip_prefix("unix:").unwrap().to_string();
                    let _ = std::fs::remove_file(&path);
                    let l = UnixListener::bind(&path).unwrap();
                    st.store(2, Ordering::SeqCst);
                    let tx = recover_tx.take().unwrap();
                    let acc = acc.clone();
                    tokio::spawn(async move {
                        let (mut s, _) = l.accept().await.unwrap();
                        acc.store(true, Ordering::SeqCst);
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).await.unwrap();
                        let _ = tx.send(got);
                    });
                    serde_json::json!({"return": {}, "id": id})
                } else {
                    let desc = "Migrate recover can only be run when postcopy is paused.";
                    serde_json::json!({"error": {"class": "GenericError", "desc": desc}, "id": id})
                }
            } else if v["execute"] == "qom-list" {
                serde_json::json!({"return": [], "id": id})
            } else {
                assert_ne!(v["execute"], "quit", "a QEMU in post-copy told to quit");
                serde_json::json!({"return": {}, "id": id})
            };
            if w.write_all((answer.to_string() + "\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let incoming = UnixListener::bind(dir.join(format!("{vm}.incoming"))).unwrap();
    let got = tokio::spawn(async move {
        let (mut s, _) = incoming.accept().await.unwrap();
        let mut first = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            first.extend_from_slice(&buf[..n]);
            fi.store(first.len(), Ordering::SeqCst);
        }
        state.store(1, Ordering::SeqCst);
        let resumed = tokio::time::timeout(Duration::from_secs(60), recover_rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        state.store(3, Ordering::SeqCst);
        (first, resumed)
    });
    (got, accepted, first_in)
}

/// A post-copy resumed on a new stream (`MIGRATION_QEMU_RECOVER`), after an abort from its
/// source: the abort leaves the QEMU in post-copy as it is (not told to quit) and keeps its
/// monitor (QEMU's one client: a new connection would not get in), the destination has
/// its QEMU listen again (out of band) and connects only with the new stream's first block.
/// Blocks and requests of the first stream's tunnel, still arriving, are refused; the new
/// stream reaches QEMU whole, and its finish is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_post_copy_takes_its_own_stream_and_refuses_the_earlier_one() {
    let cluster = TestCluster::new();
    let (agent, qemu_dir) = qemu_agent(&cluster).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let (got, accepted, first_in) = fake_postcopy_qemu(&qemu_dir, "vm");
    let mut control = KeptSession::new();
    let open = MigrationRequest {
        postcopy: true,
        ..req(data::MIGRATION_QEMU_OPEN, 0)
    };
    let detail = migration_request_kept(&ep, agent.addr, None, &open, &mut control)
        .await
        .unwrap();
    assert!(detail.contains("\"postcopy\":true"), "{detail}");
    let old = Tunnel::open(&ep, agent.addr, None, 2, "vm").await.unwrap();
    let first = send_raw(&old, 2);
    wait_acked(&old, 2).await;
    // Acknowledged once queued there: fed to QEMU before the source gives up (blocks queued
    // and not fed go with the stopped stream; QEMU's own recovery asks for what it lacks).
    let t = Instant::now();
    while first_in.load(Ordering::SeqCst) < first.len() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the first stream not fed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The source gives up (with no stream named): its QEMU in post-copy stays, and so does
    // the agent's monitor of it.
    migration_request_kept(
        &ep,
        agent.addr,
        None,
        &req(data::MIGRATION_QEMU_ABORT, 0),
        &mut control,
    )
    .await
    .unwrap();
    // Paused, not ended: an operator's alert, not an abort.
    let text = agent.metrics().await;
    let paused = metric_value(&text, "dwcp_migrations_paused", &[("peer", "src")]);
    assert_eq!(paused, 1.0, "{text}");
    let ended = metric_value(
        &text,
        "dwcp_migrations_received_total",
        &[("backend", "qemu")],
    );
    assert_eq!(ended, 0.0, "{text}");

    // The new stream's tunnel, then the recovery naming it.
    let new = Tunnel::open(&ep, agent.addr, None, 2, "vm").await.unwrap();
    let recover = MigrationRequest {
        postcopy: true,
        stream_session: Some(new.session_id()),
        ..req(data::MIGRATION_QEMU_RECOVER, 0)
    };
    let detail = migration_request_kept(&ep, agent.addr, None, &recover, &mut control)
        .await
        .unwrap();
    assert!(detail.contains("\"recovered\":true"), "{detail}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !accepted.load(Ordering::SeqCst),
        "connected to QEMU before the new stream's first block"
    );

    // The earlier tunnel's late block, and a request naming it: refused.
    send_raw_range(&old, 2..3);
    assert_refused_as_earlier(&old).await;
    let stale = MigrationRequest {
        stream_session: Some(old.session_id()),
        ..req(data::MIGRATION_QEMU_ABORT, 0)
    };
    let e = migration_request_kept(&ep, agent.addr, None, &stale, &mut control)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("earlier one"), "{e}");
    let stale = MigrationRequest {
        stream_session: Some(old.session_id()),
        ..req(data::MIGRATION_QEMU_RETURN, 0)
    };
    let e = migration_request_kept(&ep, agent.addr, None, &stale, &mut control)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("earlier one"), "{e}");
    old.close();

    // The new stream, numbered from 0, whole.
    let mut expected = Vec::new();
    for seq in 0..3u64 {
        let raw = Bytes::from(block_content(seq + 100));
        expected.extend_from_slice(&raw);
        new.send(Block {
            seq,
            raw,
            encoded: None,
        })
        .unwrap();
    }
    wait_acked(&new, 3).await;
    let finish = MigrationRequest {
        digest: Some(*blake3::hash(&expected).as_bytes()),
        stream_session: Some(new.session_id()),
        ..req(data::MIGRATION_QEMU_FINISH, 3)
    };
    let detail = migration_request_kept(&ep, agent.addr, None, &finish, &mut control)
        .await
        .unwrap();
    assert!(detail.contains("running"), "{detail}");
    new.close();
    let (got_first, got_resumed) = tokio::time::timeout(Duration::from_secs(30), got)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got_first, first, "the first stream");
    assert_eq!(got_resumed, expected, "the resumed stream");
    // One migration, ended once.
    let text = agent.metrics().await;
    let paused = metric_value(&text, "dwcp_migrations_paused", &[("peer", "src")]);
    assert_eq!(paused, 0.0, "{text}");
    for (result, n) in [("committed", 1.0), ("aborted", 0.0), ("failed", 0.0)] {
        let got = metric_value(
            &text,
            "dwcp_migrations_received_total",
            &[("backend", "qemu"), ("result", result)],
        );
        assert_eq!(got, n, "{result}: {text}");
    }
    control.close().await;
    agent.stop().await.unwrap();
}

/// A stream bound to its tunnel at its OPEN takes blocks from that tunnel alone: a block
/// of another tunnel (an earlier attempt's, still in flight) is refused, not fed, and the
/// stream arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_bound_at_its_open_refuses_another_tunnels_blocks() {
    let cluster = TestCluster::new();
    let (agent, qemu_dir) = qemu_agent(&cluster).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let got = fake_qemu(&qemu_dir, "vm", Duration::ZERO);
    let id = Tunnel::new_session_id();
    let mut control = KeptSession::new();
    let open = MigrationRequest {
        stream_session: Some(id),
        ..req(data::MIGRATION_QEMU_OPEN, 0)
    };
    migration_request_kept(&ep, agent.addr, None, &open, &mut control)
        .await
        .unwrap();
    // Another tunnel's block 0, with other bytes: refused.
    let stray = Tunnel::open(&ep, agent.addr, None, 1, "vm").await.unwrap();
    stray
        .send(Block {
            seq: 0,
            raw: Bytes::from_static(b"not this stream's"),
            encoded: None,
        })
        .unwrap();
    assert_refused_as_earlier(&stray).await;
    stray.close();
    // The stream's own tunnel.
    let tunnel = Tunnel::open_as(&ep, agent.addr, None, 2, "vm", None, id)
        .await
        .unwrap();
    let expected = send_raw(&tunnel, 3);
    wait_acked(&tunnel, 3).await;
    let finish = MigrationRequest {
        digest: Some(*blake3::hash(&expected).as_bytes()),
        stream_session: Some(id),
        ..req(data::MIGRATION_QEMU_FINISH, 3)
    };
    let detail = migration_request_kept(&ep, agent.addr, None, &finish, &mut control)
        .await
        .unwrap();
    assert!(detail.contains("running"), "{detail}");
    let (bytes, quit) = tokio::time::timeout(Duration::from_secs(10), got)
        .await
        .unwrap()
        .unwrap();
    assert!(!quit);
    assert_eq!(bytes, expected);
    tunnel.close();
    control.close().await;
    agent.stop().await.unwrap();
}
