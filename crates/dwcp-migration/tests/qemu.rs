//! The QEMU backend: a real QEMU guest (TCG) migrated through DWCP between two agents on
//! loopback. Needs `qemu-system-x86_64` and the guest image of `scripts/guest-image.sh`
//! (the test command installs and builds both); skipped with a printed reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use dwcp_migration::qemu_converge::GiveUp;
use dwcp_migration::qemu_vm::{GuestImage, Launch, QemuProcess, qemu_binary};
use dwcp_migration::{Destination, QemuSpec, migrate_qemu};
use dwcp_testkit::{RunningAgent, TestCluster, endpoint};
use dwcp_transport::qmp::Qmp;
use dwcp_transport::session::RateLimit;
use serde_json::json;

fn guest() -> Option<GuestImage> {
    if qemu_binary().is_none() {
        eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/test.sh installs it)");
        return None;
    }
    let img = GuestImage::find();
    if img.is_none() {
        eprintln!("skipped: no guest image (run scripts/guest-image.sh, or set DWCP_GUEST_DIR)");
    }
    img
}

const MEM_MIB: u64 = 256;

/// The source guest, booted and filled.
async fn source(image: &GuestImage, dir: &Path) -> QemuProcess {
    source_of(image, dir, 1).await
}

/// The source guest with its RAM in `nodes` NUMA nodes (RAM blocks), booted and filled.
async fn source_of(image: &GuestImage, dir: &Path, nodes: u32) -> QemuProcess {
    let mut l = Launch::new(MEM_MIB, dir.join("src.log"));
    l.numa_nodes = nodes;
    l.mem_file = Some(dir.join("src.ram"));
    l.qmp = vec![dir.join("src.qmp")];
    l.dirty_pages_per_sec = 500;
    // QEMU 7.2 with TCG would lose some of those writes ([`Launch::exact_dirty_tracking`]).
    l.exact_dirty_tracking = true;
    let mut p = QemuProcess::spawn(image, &l).unwrap();
    p.wait_serial("dwcp-guest ready", Duration::from_secs(180))
        .await
        .unwrap();
    p
}

/// The destination QEMU, waiting in the agent's qemu_dir, paused after loading (-S).
fn destination(image: &GuestImage, dir: &Path, qemu_dir: &Path, vm: &str) -> QemuProcess {
    destination_of(image, dir, qemu_dir, vm, 1)
}

/// As [`destination`], its RAM in `nodes` NUMA nodes.
fn destination_of(
    image: &GuestImage,
    dir: &Path,
    qemu_dir: &Path,
    vm: &str,
    nodes: u32,
) -> QemuProcess {
    let mut l = Launch::new(MEM_MIB, dir.join("dst.log"));
    l.numa_nodes = nodes;
    l.mem_file = Some(dir.join("dst.ram"));
    l.qmp = vec![
        qemu_dir.join(format!("{vm}.qmp")),
        dir.join("dst-harness.qmp"),
    ];
    l.incoming = Some(format!(
        "unix:{}",
        qemu_dir.join(format!("{vm}.incoming")).display()
    ));
    l.stay_paused = true;
    l.exact_dirty_tracking = true;
    QemuProcess::spawn(image, &l).unwrap()
}

/// A destination agent accepting QEMU migrations, and the source's endpoint.
struct Nodes {
    _cluster: TestCluster,
    dir: tempfile::TempDir,
    qemu_dir: std::path::PathBuf,
    agent: RunningAgent,
    ep: dwcp_transport::Endpoint,
}

/// `seeds`: what the destination's baseline cache is seeded with.
async fn nodes(seeds: Vec<std::path::PathBuf>) -> Nodes {
    let cluster = TestCluster::new();
    let dir = tempfile::tempdir().unwrap();
    let qemu_dir = dir.path().join("qemu-b");
    std::fs::create_dir_all(&qemu_dir).unwrap();
    let qd = qemu_dir.clone();
    let agent = RunningAgent::start(&cluster, "dest", move |c| {
        c.migration.qemu_dir = qd;
        c.encoding.seed_paths = seeds;
    })
    .await;
    let ep = endpoint(&cluster, "src", |_| {});
    Nodes {
        _cluster: cluster,
        dir,
        qemu_dir,
        agent,
        ep,
    }
}

impl Nodes {
    /// The destination agent, for `migrate_qemu`.
    fn dest(&self) -> Destination<'_> {
        Destination {
            endpoint: &self.ep,
            addr: self.agent.addr,
            expected: None,
        }
    }
}

/// Lets the destination guest (paused, `-S`) run, and waits for its console to show it
/// running: its heartbeat, and its own check of a 4 MiB file written before the migration.
async fn resume_and_check(harness_qmp: &Path, dst: &mut QemuProcess) {
    let mut dq = Qmp::connect(harness_qmp, Duration::from_secs(5))
        .await
        .unwrap();
    dq.execute("cont", None).await.unwrap();
    dst.wait_serial("dwcp-guest check ", Duration::from_secs(60))
        .await
        .unwrap();
    // The check may come first: the guest can be moved between a tick and the check after
    // it (hashing 4 MiB under TCG takes a while).
    let console = dst
        .wait_serial("dwcp-guest tick", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(!console.contains("check BAD"), "{console}");
}

/// The run state of the QEMU whose monitor is `qmp` (the connection closed again: QEMU's
/// monitor takes one client at a time).
async fn status(qmp: &Path) -> String {
    let mut q = Qmp::connect(qmp, Duration::from_secs(5)).await.unwrap();
    q.status().await.unwrap()
}

/// A source guest that cannot converge through a slow tunnel: 500 pages a second among 512,
/// about 2 MiB rewritten over and over; booted and filled, its RAM in `dir/src.ram`.
async fn hot_source(image: &GuestImage, dir: &Path) -> QemuProcess {
    hot_source_of(image, dir, 500, 512).await
}

/// As [`hot_source`], rewriting `rate` pages a second among `hot`.
async fn hot_source_of(image: &GuestImage, dir: &Path, rate: u64, hot: u64) -> QemuProcess {
    let mut l = Launch::new(MEM_MIB, dir.join("src.log"));
    l.mem_file = Some(dir.join("src.ram"));
    l.qmp = vec![dir.join("src.qmp")];
    l.dirty_pages_per_sec = rate;
    l.hot_pages = Some(hot);
    l.exact_dirty_tracking = true;
    let mut src = QemuProcess::spawn(image, &l).unwrap();
    src.wait_serial("dwcp-guest ready", Duration::from_secs(180))
        .await
        .unwrap();
    src
}

/// The migration of [`hot_source`]'s guest (its monitor in `dir`) that cannot converge: no
/// throttle, a 50 ms pause, given up after two stalled rounds, through a tunnel capped at
/// half a megabyte a second (the working set takes seconds to send, and is all dirty again
/// by then).
fn hot_spec(vm: &str, dir: &Path) -> QemuSpec {
    let mut spec = QemuSpec::new(vm, dir.join("src.qmp"));
    spec.auto_converge = false;
    spec.downtime = Duration::from_millis(50);
    spec.give_up = GiveUp {
        rounds: 2,
        after: Duration::ZERO,
    };
    spec.timeout = Duration::from_secs(150);
    spec.rate_limit = Some(RateLimit::new(500_000));
    spec
}

/// Waits (20 s at most) for a destination QEMU told to drop its incoming migration to exit.
async fn assert_quits(dst: &mut QemuProcess, context: &str) {
    let t = std::time::Instant::now();
    while dst.alive() && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !dst.alive(),
        "{context}the destination QEMU still waits after the abort"
    );
}

fn digest(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut h).unwrap();
    h.finalize()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_guest_migrates_through_dwcp_and_runs_with_the_same_ram() {
    let Some(image) = guest() else { return };
    // The destination holds the guest's disk, whose pages the guest also keeps in RAM: those
    // go by reference, the rest (zero, random, text made in the guest) as data.
    let disk = image.disk.clone();
    if disk.is_none() {
        eprintln!("note: the guest image has no disk.img: pages by reference not checked");
    }
    let n = nodes(disk.iter().cloned().collect()).await;
    let (dir, qemu_dir, dest) = (&n.dir, &n.qemu_dir, n.dest());

    let mut src = source(&image, dir.path()).await;
    assert!(
        disk.is_none() || !src.serial().contains("disk_copies=0"),
        "the guest read nothing from its disk: {}",
        src.serial()
    );
    let mut dst = destination(&image, dir.path(), qemu_dir, "vm1");
    // The source's migration settings as its owner left them: auto-converge's steps (the
    // floor of the paced steps the migration sets), the pause and the bandwidth cap (which it
    // changes), auto-converge itself off (the migration turns it on); all back afterwards.
    let mut sq = Qmp::connect(&dir.path().join("src.qmp"), Duration::from_secs(5))
        .await
        .unwrap();
    let own = json!({"cpu-throttle-initial": 35, "cpu-throttle-increment": 15, "cpu-throttle-tailslow": true, "downtime-limit": 450, "max-bandwidth": 64 << 20});
    sq.execute("migrate-set-parameters", Some(own))
        .await
        .unwrap();
    // A return path and a pause before the switchover, as libvirt may leave them: neither
    // can be served through one tunnelled stream (each would hold the paused guest until the
    // stream timed out), so the migration turns them off and puts them back.
    let caps = json!({"capabilities": [
        {"capability": "auto-converge", "state": false},
        {"capability": "return-path", "state": true},
        {"capability": "pause-before-switchover", "state": true},
    ]});
    sq.execute("migrate-set-capabilities", Some(caps))
        .await
        .unwrap();
    drop(sq);
    let spec = QemuSpec::new("vm1", dir.path().join("src.qmp"));
    let mut phases = Vec::new();
    let mut throttles = Vec::new();
    let r = migrate_qemu(dest, &spec, &mut |p| {
        phases.push(p.phase.clone());
        throttles.push(p.throttle);
    })
    .await
    .unwrap();
    assert!(r.migrated, "{r:?}");
    assert_eq!(r.dest_status, "paused", "started with -S: {r:?}");
    // The report's highest throttle is the highest progress showed (on loopback usually none).
    assert_eq!(
        throttles.iter().max().copied().unwrap_or(0),
        r.throttle,
        "{throttles:?}"
    );
    assert!(
        r.stream_bytes > 0 && r.wire_bytes > 0 && r.segments > 0,
        "{r:?}"
    );
    assert!(
        r.wire_bytes < r.stream_bytes,
        "HDE made the stream smaller: {r:?}"
    );
    // TCP's own count (the kernel's) under the tunnel: every acknowledged wire byte, with
    // framing and TLS on top.
    let tcp = r.tcp.unwrap();
    assert!(
        tcp.bytes_sent >= r.wire_bytes && tcp.segments_sent > 0,
        "{r:?}"
    );
    // What the guest read from its disk (a copy of its code, up to 48 MiB, and copies of its
    // text) went by reference; without the seed the same run sends about 4 MB by reference
    // (pages repeated within the stream).
    assert!(
        disk.is_none() || r.cache_bytes >= 24 << 20,
        "pages of the seeded disk went by reference: {r:?}"
    );
    // Guest RAM plus QEMU's ROMs and device RAM.
    assert!(r.ram_bytes >= MEM_MIB << 20, "{r:?}");
    assert!(r.rounds >= 1, "{r:?}");
    // TCG with 8 KiB over a whole MiB: no warning about QEMU's lost writes.
    assert!(r.source_qemu.contains("TCG"), "{r:?}");
    assert!(r.warnings.is_empty(), "{r:?}");

    // Both sides are frozen now (source: postmigrate, destination: -S): same RAM, byte for byte.
    let mut sq = Qmp::connect(&dir.path().join("src.qmp"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sq.status().await.unwrap(), "postmigrate");
    let params = sq.execute("query-migrate-parameters", None).await.unwrap();
    assert_eq!(params["cpu-throttle-initial"], 35, "{params}");
    assert_eq!(params["cpu-throttle-increment"], 15, "{params}");
    assert_eq!(params["cpu-throttle-tailslow"], true, "{params}");
    assert_eq!(params["downtime-limit"], 450, "{params}");
    assert_eq!(params["max-bandwidth"], 64 << 20, "{params}");
    let caps = sq
        .execute("query-migrate-capabilities", None)
        .await
        .unwrap();
    let auto_converge = caps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["capability"] == "auto-converge")
        .unwrap();
    assert_eq!(auto_converge["state"], false, "{caps}");
    for name in ["return-path", "pause-before-switchover"] {
        let c = caps
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["capability"] == name)
            .unwrap();
        assert_eq!(c["state"], true, "{name} put back: {caps}");
    }
    assert_eq!(
        digest(&dir.path().join("src.ram")),
        digest(&dir.path().join("dst.ram")),
        "destination RAM differs from the source's at the moment it stopped"
    );

    // And the guest runs there: its heartbeat goes on, and its own check of a 4 MiB file
    // written before the migration still holds.
    resume_and_check(&dir.path().join("dst-harness.qmp"), &mut dst).await;
    assert!(
        src.alive(),
        "the source QEMU stays (paused) until cleaned up"
    );
    drop(sq);
    let m = n.agent.metrics().await;
    let loaded = dwcp_testkit::metric_value(
        &m,
        "dwcp_migrations_received_total",
        &[
            ("peer", "src"),
            ("backend", "qemu"),
            ("result", "committed"),
        ],
    );
    assert_eq!(loaded, 1.0, "{m}");
    n.agent.stop().await.unwrap();
}

/// A guest whose RAM is two NUMA nodes, each a RAM block of 128 MiB (and 8 KiB) backed by
/// its own file, arrives whole and runs. (How the tunnel follows QEMU's first pass through
/// such blocks is tested by `the_first_pass_is_followed_through_every_ram_block_of_a_real_stream`;
/// on loopback the late window applies from the start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_of_two_numa_nodes_migrates_through_dwcp_with_the_same_ram() {
    let Some(image) = guest() else { return };
    let n = nodes(Vec::new()).await;
    let (dir, qemu_dir, dest) = (&n.dir, &n.qemu_dir, n.dest());
    let src = source_of(&image, dir.path(), 2).await;
    let mut dst = destination_of(&image, dir.path(), qemu_dir, "vm2", 2);
    let spec = QemuSpec::new("vm2", dir.path().join("src.qmp"));
    let r = migrate_qemu(dest, &spec, &mut |_| {}).await.unwrap();
    assert!(r.migrated, "{r:?}");
    assert!(r.ram_bytes >= MEM_MIB << 20, "{r:?}");
    assert!(r.warnings.is_empty(), "{r:?}");
    let mut sq = Qmp::connect(&dir.path().join("src.qmp"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sq.status().await.unwrap(), "postmigrate");
    for node in 0..2 {
        let (s, d) = (
            dir.path().join(format!("src.ram.{node}")),
            dir.path().join(format!("dst.ram.{node}")),
        );
        assert_eq!(
            std::fs::metadata(&s).unwrap().len(),
            (MEM_MIB << 19) + 8192,
            "node {node}"
        );
        assert_eq!(digest(&s), digest(&d), "node {node}'s RAM differs");
    }
    resume_and_check(&dir.path().join("dst-harness.qmp"), &mut dst).await;
    drop((sq, src));
    n.agent.stop().await.unwrap();
}

/// The link between the hosts goes down for 3 s once QEMU's stream is under way: the
/// tunnel dials again and goes on, and the guest arrives whole and runs. (With 2 s, a
/// loaded host once polled QEMU's progress too seldom to see the link down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_outage_in_pre_copy_is_ridden_out_and_the_guest_arrives_whole() {
    let Some(image) = guest() else { return };
    let n = nodes(Vec::new()).await;
    let (dir, qemu_dir, mut dest) = (&n.dir, &n.qemu_dir, n.dest());
    let proxy = dwcp_testkit::Proxy::start(n.agent.addr, dwcp_testkit::Fault::None).await;
    dest.addr = proxy.addr;
    let src = source(&image, dir.path()).await;
    let mut dst = destination(&image, dir.path(), qemu_dir, "vm4");
    let spec = QemuSpec::new("vm4", dir.path().join("src.qmp"));
    let mut cut = None;
    let mut shown_down = false;
    let r = migrate_qemu(dest, &spec, &mut |p| {
        if cut.is_none() && p.stream_bytes > 16 << 20 {
            proxy.outage(Duration::from_secs(3));
            cut = Some(std::time::Instant::now());
        }
        shown_down |= p.link_down.is_some();
    })
    .await
    .unwrap();
    assert!(r.migrated, "{r:?}");
    assert!(shown_down, "the progress never said the link was down");
    let cut = cut.expect("the stream got under way");
    assert!(cut.elapsed() >= Duration::from_secs(3), "{r:?}");
    assert!(r.tunnel_reconnects >= 1, "{r:?}");
    assert_eq!(
        digest(&dir.path().join("src.ram")),
        digest(&dir.path().join("dst.ram")),
        "the destination's RAM differs"
    );
    resume_and_check(&dir.path().join("dst-harness.qmp"), &mut dst).await;
    drop(src);
    n.agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_leaves_the_source_guest_running() {
    let Some(image) = guest() else { return };
    let n = nodes(Vec::new()).await;
    let (dir, qemu_dir, dest) = (&n.dir, &n.qemu_dir, n.dest());
    let src = source(&image, dir.path()).await;

    // 1. Nobody waits at the destination: refused in prepare, nothing started.
    let spec = QemuSpec::new("vm-nobody", dir.path().join("src.qmp"));
    let e = migrate_qemu(dest, &spec, &mut |_| {}).await.unwrap_err();
    assert_eq!(e.phase, "prepare", "{e}");
    assert!(e.reason.contains("vm-nobody.qmp"), "{e}");
    assert!(e.source_as_before, "{e}");

    // 2. The destination QEMU dies during the transfer: rolled back, source still running.
    let mut dst = Some(destination(&image, dir.path(), qemu_dir, "vm2"));
    let mut spec = QemuSpec::new("vm2", dir.path().join("src.qmp"));
    // A slow compressor keeps the transfer going long enough to kill the destination in it.
    spec.codec = dwcp_encoding::Codec::Zstd(15);
    spec.streams = 1;
    let e = migrate_qemu(dest, &spec, &mut |p| {
        if p.stream_bytes > 0 {
            dst.take(); // killed
        }
    })
    .await
    .unwrap_err();
    assert!(
        dst.is_none(),
        "the migration ended before the destination was killed: {e}"
    );
    assert!(e.report.error.is_some(), "{e}");
    assert!(e.source_as_before, "rolled back, resumed: {e}");
    let mut sq = Qmp::connect(&dir.path().join("src.qmp"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sq.status().await.unwrap(), "running", "after: {e}");
    // The guest still ticks on the source.
    let before = src.serial().matches("dwcp-guest tick").count();
    let after = {
        tokio::time::sleep(Duration::from_secs(3)).await;
        src.serial().matches("dwcp-guest tick").count()
    };
    assert!(
        after > before,
        "the source guest is not running after the rollback"
    );
    assert!(!src.serial().contains("check BAD"));
    drop(sq);

    // 3. Cancelled during the transfer (the user's ctrl-c): rolled back the same way, and the
    // destination told to drop what it had, its QEMU gone with it.
    let mut dst = destination(&image, dir.path(), qemu_dir, "vm3");
    let mut spec = QemuSpec::new("vm3", dir.path().join("src.qmp"));
    spec.codec = dwcp_encoding::Codec::Zstd(15);
    spec.streams = 1;
    let cancel = spec.cancel.clone();
    let e = migrate_qemu(dest, &spec, &mut |p| {
        if p.stream_bytes > 0 {
            cancel.cancel();
        }
    })
    .await
    .unwrap_err();
    assert_eq!(
        (e.phase, e.reason.as_str()),
        ("transfer", dwcp_migration::qemu::CANCELLED),
        "{e}"
    );
    assert!(e.source_as_before, "rolled back, resumed: {e}");
    assert_eq!(
        status(&dir.path().join("src.qmp")).await,
        "running",
        "after: {e}"
    );
    assert_quits(&mut dst, "").await;

    // 4. Cancelled before anything started: refused in prepare, the source untouched.
    let dst4 = destination(&image, dir.path(), qemu_dir, "vm4");
    let spec = QemuSpec::new("vm4", dir.path().join("src.qmp"));
    spec.cancel.cancel();
    let e = migrate_qemu(dest, &spec, &mut |_| {}).await.unwrap_err();
    assert_eq!(
        (e.phase, e.reason.as_str()),
        ("prepare", dwcp_migration::qemu::CANCELLED),
        "{e}"
    );
    assert!(e.source_as_before, "{e}");
    assert_eq!(status(&dir.path().join("src.qmp")).await, "running");

    drop(dst4); // never contacted: killed here

    // 5. Cancelled at moments from during preparation (the destination asked to open, the
    // tunnel dialled, the cache summary on its way) to the transfer's start: each time the
    // destination is told to drop what it opened (its QEMU goes, and the destination counts
    // the abort), the source runs on.
    let counted = |result: &'static str| {
        let agent = &n.agent;
        async move {
            let m = agent.metrics().await;
            let v = dwcp_testkit::metric_value(
                &m,
                "dwcp_migrations_received_total",
                &[("peer", "src"), ("backend", "qemu"), ("result", result)],
            );
            (v, m)
        }
    };
    let (aborted_before, m) = counted("aborted").await;
    // Step 3's at least (step 2's too, if the feed outlived its QEMU), step 4's not.
    assert!(aborted_before >= 1.0, "{m}");
    let mut phases = Vec::new();
    let mut opened = 0.0;
    for (k, delay_ms) in [0u64, 1, 3, 10, 250].into_iter().enumerate() {
        let vm = format!("vm5-{k}");
        let mut dst = destination(&image, dir.path(), qemu_dir, &vm);
        let spec = QemuSpec::new(&vm, dir.path().join("src.qmp"));
        let cancel = spec.cancel.clone();
        let (before, _) = counted("aborted").await;
        let timer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            cancel.cancel()
        });
        let e = migrate_qemu(dest, &spec, &mut |_| {}).await.unwrap_err();
        assert!(timer.await.unwrap(), "cancelled in time ({delay_ms} ms)");
        assert_eq!(
            e.reason,
            dwcp_migration::qemu::CANCELLED,
            "{delay_ms} ms: {e}"
        );
        assert!(e.source_as_before, "{delay_ms} ms: {e}");
        phases.push((delay_ms, e.phase));
        let now = status(&dir.path().join("src.qmp")).await;
        assert_eq!(now, "running", "{delay_ms} ms: {e}");
        let (after, m) = counted("aborted").await;
        if after == before {
            // The cancel came before anything was sent (a loaded machine can hold this task
            // past the timer): nothing opened, the QEMU waits untouched (and is killed here).
            assert_eq!(e.phase, "prepare", "{delay_ms} ms: {e}; {m}");
            continue;
        }
        assert_eq!(after, before + 1.0, "{delay_ms} ms: {m}");
        opened += 1.0;
        assert_quits(&mut dst, &format!("{delay_ms} ms: ")).await;
    }
    eprintln!("cancelled (delay, phase): {phases:?}, {opened} of them after the open");
    assert!(opened >= 2.0, "{phases:?}");
    // Nothing loaded, nothing failed: every attempt ended in an abort, counted once.
    let (aborted, m) = counted("aborted").await;
    assert_eq!(aborted, aborted_before + opened, "{m}");
    assert_eq!(counted("committed").await.0, 0.0, "{m}");
    assert_eq!(counted("failed").await.0, 0.0, "{m}");
    assert!(
        !src.serial().contains("check BAD"),
        "the source guest's own check failed"
    );
    n.agent.stop().await.unwrap();
}

/// A guest that keeps rewriting a working set faster than the migration may send it, with
/// auto-converge off: QEMU would iterate until the timeout. The migration is given up once
/// its rounds stop shrinking, with the figures that show why, and rolled back: the guest runs
/// on at the source, the destination's QEMU goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_cannot_converge_is_given_up_and_rolled_back() {
    let Some(image) = guest() else { return };
    let guest_dir = tempfile::tempdir().unwrap();
    let src = hot_source(&image, guest_dir.path()).await;
    // The destination's cache holds the guest's RAM as it was once filled (a warm
    // destination): the first pass goes by reference, quickly even through the cap below.
    let n = nodes(vec![guest_dir.path().join("src.ram")]).await;
    let (dir, qemu_dir, dest) = (&n.dir, &n.qemu_dir, n.dest());
    let mut dst = destination(&image, dir.path(), qemu_dir, "vm-hot");
    let spec = hot_spec("vm-hot", guest_dir.path());
    let started = std::time::Instant::now();
    let mut stalled = Vec::new();
    let e = migrate_qemu(dest, &spec, &mut |p| {
        assert!(!p.postcopy, "post-copy was not asked for");
        stalled.push(p.stalled_rounds)
    })
    .await
    .unwrap_err();
    assert_eq!(e.phase, "transfer", "{e}");
    assert!(
        e.reason.contains("did not converge") && e.reason.contains("auto-converge off"),
        "{e}"
    );
    assert!(e.source_as_before, "rolled back, resumed: {e}");
    eprintln!("given up after {:?}: {e}", started.elapsed());
    // Progress showed the count coming (it is 0 before it counts), up to the two given.
    assert_eq!(stalled.iter().max(), Some(&2), "{stalled:?}");
    assert_eq!(stalled.last(), Some(&2), "{stalled:?}");
    let now = status(&guest_dir.path().join("src.qmp")).await;
    assert_eq!(now, "running", "after: {e}");
    let before = src.serial().matches("dwcp-guest tick").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        src.serial().matches("dwcp-guest tick").count() > before,
        "the source guest is not running after the rollback"
    );
    assert_quits(&mut dst, "").await;
    n.agent.stop().await.unwrap();
}

/// Whether this process may have QEMU use `userfaultfd` (post-copy's destination): as root,
/// or where unprivileged users may.
fn userfaultfd_allowed() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false);
    let open = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "1");
    root || open
}

/// The guest that cannot converge, with post-copy allowed, moves instead: it runs at the
/// destination while the rest of its memory follows, the pages it touches first (asked for
/// on QEMU's return path, carried back through the destination agent), and keeps running
/// there with its memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_cannot_converge_moves_by_post_copy_and_runs_there() {
    post_copy(Trouble::None).await;
}

/// The same, with the link between the hosts down for 3 s once the guest runs at the
/// destination (with pages still at the source): no way back then, so the tunnel dials
/// again, the return path and the control session too, and the migration completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_outage_in_post_copy_is_ridden_out_and_the_guest_runs_there() {
    post_copy(Trouble::Outage(Duration::from_secs(3))).await;
}

/// The same, with the link down for longer than the source retries: the migration stops in
/// post-copy with both QEMUs paused (nothing rolled back, nothing dropped), and running it
/// again once the link is back resumes it (QEMU's `migrate-recover`, `migrate` with
/// `resume`): the guest runs at the destination with its memory intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_copy_stopped_by_a_long_outage_is_resumed_by_a_second_run() {
    post_copy(Trouble::LongOutage).await;
}

/// The same, with the source's migration dropped midway in post-copy (as when its process
/// dies): its tasks go with it, the source QEMU pauses, and a second run resumes it while
/// the destination agent still holds the first stream (nobody told it to drop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_copy_whose_source_run_is_gone_is_resumed_by_a_second_run() {
    post_copy(Trouble::SourceGone).await;
}

/// What befalls a post-copy migration once it is active.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trouble {
    None,
    /// The link down this long: ridden out.
    Outage(Duration),
    /// The link down for [`LONG_OUTAGE`], the source retrying for 1 s: resumed by a second
    /// run.
    LongOutage,
    /// The source's run dropped: resumed by a second run.
    SourceGone,
}

const LONG_OUTAGE: Duration = Duration::from_secs(5);

/// Waits (20 s at most) for the QEMU behind `qmp` to say its migration is `want`.
async fn wait_migration(qmp: &Path, want: &str) {
    let t = std::time::Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(20) {
        let mut q = Qmp::connect(qmp, Duration::from_secs(5)).await.unwrap();
        let info = q.execute("query-migrate", None).await.unwrap();
        last = info["status"].as_str().unwrap_or("").to_string();
        if last == want {
            return;
        }
        drop(q);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the QEMU at {} is {last:?}, not {want:?}", qmp.display());
}

/// A post-copy migration (see above), through a proxy, with `trouble` once post-copy is
/// active.
async fn post_copy(trouble: Trouble) {
    let outage = match trouble {
        Trouble::Outage(d) => Some(d),
        _ => None,
    };
    let Some(image) = guest() else { return };
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(std::io::stderr)
        .try_init();
    if !userfaultfd_allowed() {
        eprintln!(
            "skipped: QEMU's post-copy needs userfaultfd (root, or vm.unprivileged_userfaultfd=1)"
        );
        return;
    }
    let guest_dir = tempfile::tempdir().unwrap();
    // A second run can resume only while pages wait at the source: QEMU 7.2 cannot pause a
    // post-copy whose last page it has written (its migration thread waits for the return
    // path's thread, which waits for the pause), and with 2 MiB dirty all of it is in the
    // tunnel's window at once. So the guest's random data (about 20 MiB here) rewritten as
    // fast as it goes (about 2 MB/s under TCG), through a tunnel of 1 MB/s: some 10 MB still
    // at the source seconds into post-copy, against a window of 4 MiB.
    let resumed = matches!(trouble, Trouble::LongOutage | Trouble::SourceGone);
    let src = if resumed {
        hot_source_of(&image, guest_dir.path(), 2000, 16384).await
    } else {
        hot_source(&image, guest_dir.path()).await
    };
    let n = nodes(vec![guest_dir.path().join("src.ram")]).await;
    let (dir, qemu_dir, mut dest) = (&n.dir, &n.qemu_dir, n.dest());
    let proxy = dwcp_testkit::Proxy::start(n.agent.addr, dwcp_testkit::Fault::None).await;
    dest.addr = proxy.addr;
    // Not paused after loading (-S): the guest runs there during post-copy and faults in
    // what has not arrived.
    // Its RAM on tmpfs: userfaultfd does not take a file on an ordinary filesystem (the
    // agent checks), and the RAM block's name must be the source's.
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm for the destination guest's RAM");
        return;
    };
    let mut dl = Launch::new(MEM_MIB, dir.path().join("dst.log"));
    dl.mem_file = Some(shm.path().join("dst.ram"));
    dl.qmp = vec![
        qemu_dir.join("vm-pc.qmp"),
        dir.path().join("dst-harness.qmp"),
    ];
    dl.incoming = Some(format!(
        "unix:{}",
        qemu_dir.join("vm-pc.incoming").display()
    ));
    dl.exact_dirty_tracking = true;
    let dst = QemuProcess::spawn(&image, &dl).unwrap();
    let mut spec = hot_spec("vm-pc", guest_dir.path());
    spec.postcopy = true;
    if resumed {
        spec.rate_limit = Some(RateLimit::new(1_000_000));
    }
    if trouble == Trouble::LongOutage {
        spec.retry_for = Duration::from_secs(1);
    }
    let mut phases = Vec::new();
    let mut offered = Vec::new();
    let mut cut = None;
    let active = tokio::sync::Notify::new();
    let mut long_cut = None;
    let first = {
        let mut watch = |p: &dwcp_migration::QemuProgress| {
            phases.push(p.phase.clone());
            offered.push(p.postcopy);
            if p.phase == "postcopy-active" {
                active.notify_one();
                if let Trouble::Outage(period) = trouble
                    && cut.is_none()
                {
                    proxy.outage(period);
                    cut = Some(std::time::Instant::now());
                }
            }
        };
        let run = migrate_qemu(dest, &spec, &mut watch);
        tokio::pin!(run);
        // The trouble that takes a second run comes 2 s into post-copy: the destination has
        // the guest's device state by then (it goes first, behind at most 256 KiB of pages),
        // and pages are still at the source. (Neither the destination's monitor nor its
        // console tells sooner: a guest waiting on a page can block QEMU's main thread.)
        let dest_runs = async {
            active.notified().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        tokio::pin!(dest_runs);
        match trouble {
            // Dropped: its tasks and connections go, as with a process that died.
            Trouble::SourceGone => tokio::select! {
                r = &mut run => Some(r),
                () = &mut dest_runs => None,
            },
            Trouble::LongOutage => tokio::select! {
                r = &mut run => Some(r),
                () = &mut dest_runs => {
                    proxy.outage(LONG_OUTAGE);
                    long_cut = Some(std::time::Instant::now());
                    Some(run.await)
                }
            },
            _ => Some(run.await),
        }
    };
    let first = match (trouble, first) {
        (Trouble::SourceGone, None) => None,
        (Trouble::LongOutage, Some(Err(e))) => {
            assert_eq!(e.phase, dwcp_migration::qemu::POSTCOPY, "{e}");
            assert!(!e.source_as_before, "{e}");
            assert!(e.report.postcopy, "{e}");
            None
        }
        (Trouble::None | Trouble::Outage(_), r) => r,
        (t, r) => panic!(
            "{t:?}: the first run ended before the trouble: {:?}",
            r.map(|r| r.map(|r| r.total_seconds))
        ),
    };
    let second = first.is_none();
    let first = match first {
        Some(r) => r,
        None => {
            // Both QEMUs wait; the source says so at once (its stream is gone). Once the link
            // is back, the same migration again.
            wait_migration(&guest_dir.path().join("src.qmp"), "postcopy-paused").await;
            if let Some(cut) = long_cut {
                tokio::time::sleep(LONG_OUTAGE.saturating_sub(cut.elapsed())).await;
            }
            let mut spec = spec.clone();
            spec.retry_for = Duration::from_secs(60);
            migrate_qemu(dest, &spec, &mut |p| {
                phases.push(p.phase.clone());
                offered.push(p.postcopy);
            })
            .await
        }
    };
    let r = match first {
        Ok(r) => r,
        Err(e) => {
            let mut dq = Qmp::connect(&dir.path().join("dst-harness.qmp"), Duration::from_secs(5))
                .await
                .unwrap();
            eprintln!(
                "destination: {:?} {:?}",
                dq.execute("query-status", None).await,
                dq.execute("query-migrate", None).await
            );
            let log = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
            panic!(
                "{e}\n{:?}\nsource QEMU: {}\ndestination QEMU: {}\ndestination console: {}",
                e.report,
                log(&guest_dir.path().join("src.stderr").display().to_string()),
                log(&dir.path().join("dst.stderr").display().to_string()),
                dst.serial()
            );
        }
    };
    eprintln!("{r:?}");
    assert!(r.migrated && r.postcopy, "{r:?}");
    assert!(r.warnings.is_empty(), "{r:?}");
    assert_eq!(r.recovered, second, "{r:?}");
    // The destination counts one migration, ended once (a paused post-copy had not ended),
    // and none paused now.
    let m = n.agent.metrics().await;
    for (result, want) in [("committed", 1.0), ("aborted", 0.0), ("failed", 0.0)] {
        let got = dwcp_testkit::metric_value(
            &m,
            "dwcp_migrations_received_total",
            &[("peer", "src"), ("backend", "qemu"), ("result", result)],
        );
        assert_eq!(got, want, "{result}: {m}");
    }
    assert_eq!(
        dwcp_testkit::metric_value(&m, "dwcp_migrations_paused", &[]),
        0.0,
        "{m}"
    );
    if second {
        // The second run carried the pages still at the source, and nothing paused anew.
        assert!(r.stream_bytes > 0, "{r:?}");
        assert_eq!(r.downtime_ms, None, "{r:?}");
    } else if let Some(period) = outage {
        let cut = cut.expect("post-copy was active");
        assert!(
            cut.elapsed() >= period,
            "done {:?} into a {period:?} outage",
            cut.elapsed()
        );
        assert!(r.tunnel_reconnects >= 1, "{r:?}");
    } else {
        assert_eq!(r.tunnel_reconnects, 0, "{r:?}");
    }
    assert!(phases.iter().any(|p| p == "postcopy-active"), "{phases:?}");
    // Progress said post-copy was the way out (both sides took it).
    assert!(
        !offered.is_empty() && offered.iter().all(|&o| o),
        "{offered:?}"
    );
    // The running guest touched pages still at the source, and got them.
    assert!(r.postcopy_requests > 0, "{r:?}");
    assert!(
        r.postcopy_seconds
            .is_some_and(|s| s > 0.0 && s <= r.total_seconds),
        "{r:?}"
    );
    assert_eq!(r.dest_status, "running", "{r:?}");
    assert_eq!(r.downtime_ms.is_some(), !second, "{r:?}");
    assert_eq!(
        status(&guest_dir.path().join("src.qmp")).await,
        "postmigrate"
    );
    // It runs there: its heartbeat goes on, and its own check of a 4 MiB file written before
    // the migration holds, after the migration.
    let at = dst.serial().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let console = dst.serial();
        let after = &console[at.min(console.len())..];
        assert!(!after.contains("check BAD"), "{console}");
        if after.contains("dwcp-guest check ok") && after.contains("dwcp-guest tick") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not run at the destination: {console}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(src);
    n.agent.stop().await.unwrap();
}

/// Kills the QEMU it holds when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU's own stream of a guest whose RAM is two blocks (two NUMA nodes, 128 MiB each) and
/// QEMU's small ones: the tunnel's reader finds the blocks in the setup section and follows
/// QEMU's first pass through all of them to the end of RAM. Offsets alone restart in each
/// block and never got past the first 128 MiB, so the late window waited for QEMU's own
/// report of what remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_pass_is_followed_through_every_ram_block_of_a_real_stream() {
    use dwcp_migration::qemu_stream::{FirstPass, PAGE};
    let Some(qemu) = qemu_binary() else {
        eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/test.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("q.qmp");
    let out = dir.path().join("stream.bin");
    let child = std::process::Command::new(qemu)
        .args([
            "-machine",
            "pc,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-m",
            "256M",
            "-object",
            "memory-backend-ram,id=m0,size=128M",
            "-object",
            "memory-backend-ram,id=m1,size=128M",
            "-numa",
            "node,memdev=m0",
            "-numa",
            "node,memdev=m1",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _qemu = Killed(child);
    let start = std::time::Instant::now();
    while !qmp_path.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no QMP socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))
        .await
        .unwrap();
    qmp.execute(
        "migrate",
        Some(serde_json::json!({"uri": format!("exec:cat > {}", out.display())})),
    )
    .await
    .unwrap();
    let mut total = None;
    while total.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "migration not done"
        );
        let info = qmp.execute("query-migrate", None).await.unwrap();
        match info["status"].as_str() {
            Some("completed") => total = info["ram"]["total"].as_u64(),
            Some("failed") => panic!("QEMU's migration failed: {info}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let total = total.unwrap();
    // QEMU says completed before `cat` has necessarily written everything: wait until the
    // file stops growing.
    let mut size = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = std::fs::metadata(&out).unwrap().len();
        if now == size && now > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the stream file keeps growing"
        );
        size = now;
    }
    let stream = std::fs::read(&out).unwrap();
    for segment in [256 << 10, (64 << 10) + 13] {
        let mut pass = FirstPass::default();
        let mut furthest = 0;
        let mut in_second = false;
        for piece in stream.chunks(segment) {
            if let Some(at) = pass.advance(piece) {
                furthest = furthest.max(at);
                in_second |= ((128 << 20)..(256 << 20)).contains(&at);
            }
        }
        let blocks = pass.blocks().unwrap();
        assert_eq!(
            blocks[..2]
                .iter()
                .map(|b| (b.name.as_str(), b.len))
                .collect::<Vec<_>>(),
            [("m0", 128 << 20), ("m1", 128 << 20)],
            "{blocks:?}"
        );
        assert_eq!(pass.total(), Some(total), "{blocks:?}");
        assert!(in_second, "never placed in the second block");
        // To the last MiB: QEMU's small blocks at the end are a page or a few each, and a
        // record cut by a segment's edge, or alone, is not taken.
        assert!(
            furthest <= total - PAGE as u64 && furthest > total - (1 << 20),
            "segments of {segment}: {furthest} of {total}"
        );
    }
}

/// QEMU before 9.0 loses a TCG guest's writes in a RAM block placed at and as long as a whole
/// number of 256 KiB. With two NUMA nodes of 64 MiB + 8 KiB and 64 MiB, the total is no such
/// number but QEMU 7.2 places the second node on the fast path: the warning names that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lost_writes_warning_names_each_ram_block_on_qemus_fast_path() {
    let Some(qemu) = qemu_binary() else {
        eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/test.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (sizes, fast) in [
        ([64 * 1024 + 8, 64 * 1024], Some("m1 (65536 KiB)")),
        ([64 * 1024 + 8, 64 * 1024 + 8], None),
    ] {
        let sock = dir.path().join(format!("{}.qmp", sizes[1]));
        let mut argv: Vec<String> = [
            "-machine",
            "pc,accel=tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-m",
        ]
        .map(String::from)
        .into();
        argv.push(format!("{}K", sizes[0] + sizes[1]));
        for (i, kib) in sizes.iter().enumerate() {
            argv.push("-object".into());
            argv.push(format!("memory-backend-ram,id=m{i},size={kib}K"));
            argv.push("-numa".into());
            argv.push(format!("node,memdev=m{i}"));
        }
        argv.push("-qmp".into());
        argv.push(format!("unix:{},server=on,wait=off", sock.display()));
        let child = std::process::Command::new(&qemu)
            .args(&argv)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed on every way out, a failed assertion too.
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _child = Kill(child);
        let t = std::time::Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
        let (what, warning) = dwcp_migration::qemu::source_qemu(&mut qmp).await;
        assert!(what.contains("TCG"), "{what}");
        let (major, _) = what.trim_start_matches("QEMU ").split_once('.').unwrap();
        if major.parse::<u32>().unwrap() >= 9 {
            assert!(warning.is_none(), "fixed in QEMU 9.0: {warning:?}");
        } else {
            match (fast, &warning) {
                (Some(block), Some(w)) => {
                    assert!(w.contains(block) && !w.contains("m0 "), "{w}")
                }
                (None, None) => {}
                _ => panic!("{sizes:?}: expected a warning naming {fast:?}, got {warning:?}"),
            }
        }
        let _ = qmp.execute("quit", None).await;
    }
}

/// `Launch::prealloc` starts QEMU with all guest RAM faulted in, whatever backs it: one
/// anonymous block, NUMA nodes, a file; without it, none is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prealloc_faults_in_every_ram_block_at_start() {
    let Some(image) = guest() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (nodes, file, prealloc) in [
        (1, false, true),
        (2, false, true),
        (1, true, true),
        (2, true, false),
    ] {
        let mut l = Launch::new(32, dir.path().join("p.log"));
        l.numa_nodes = nodes;
        l.mem_file = file.then(|| dir.path().join("p.ram"));
        l.qmp = vec![dir.path().join("p.qmp")];
        l.stay_paused = true;
        l.prealloc = prealloc;
        let _p = QemuProcess::spawn(&image, &l).unwrap();
        let mut q = Qmp::connect(&l.qmp[0], Duration::from_secs(5))
            .await
            .unwrap();
        let devs = q.execute("query-memdev", None).await.unwrap();
        let devs = devs.as_array().unwrap();
        assert_eq!(devs.len(), nodes as usize, "{devs:?}");
        for d in devs {
            assert_eq!(
                d["prealloc"].as_bool(),
                Some(prealloc),
                "{nodes} nodes, file {file}: {d}"
            );
        }
        let _ = q.execute("quit", None).await;
    }
}
