//! Live migration of a memory-image VM between two agents on loopback.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dwcp_encoding::image::{Corpus, DirtyModel, ImageSpec, generate};
use dwcp_migration::{Destination, MemoryVm, MigrationReport, MigrationSpec, migrate};
use dwcp_testkit::{RunningAgent, TestCluster, endpoint};
use dwcp_transport::session::RateLimit;

fn vm(mb: u64, writes_per_sec: f64) -> MemoryVm {
    let img = generate(&ImageSpec::new(mb << 20), &mut Corpus::synthetic());
    MemoryVm::start(img.data, 4096, DirtyModel::default(), writes_per_sec, 7)
}

/// The destination agent `agent`, reached with `ep`.
fn to<'a>(ep: &'a dwcp_transport::Endpoint, agent: &RunningAgent) -> Destination<'a> {
    Destination {
        endpoint: ep,
        addr: agent.addr,
        expected: None,
    }
}

/// Memory-image migrations of "src" that ended at the destination whose metrics are `m`:
/// (committed, aborted).
fn ended(m: &str) -> (f64, f64) {
    let n = |result| {
        dwcp_testkit::metric_value(
            m,
            "dwcp_migrations_received_total",
            &[("peer", "src"), ("backend", "memory"), ("result", result)],
        )
    };
    (n("committed"), n("aborted"))
}

/// The page hashes of the image `name` that source node "src" published in `cluster`.
fn published(cluster: &TestCluster, name: &str) -> Vec<u64> {
    let img = std::fs::read(cluster.dir().join("spool/src").join(name)).unwrap();
    img.chunks_exact(4096).map(dwcp_encoding::fast64).collect()
}

/// A migration's first round sends every page, whatever was taken of the VM's dirty set
/// before (an earlier attempt's rounds that rolled back, in the same process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_attempt_sends_every_page_again() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(16, 2000.0);
    // What an earlier attempt's rounds took.
    assert_eq!(v.take_dirty().len() as u64, v.pages());
    // The encoded parts go in a directory of the caller's: one that does not exist fails the
    // first round (so it is where they go); a real one is empty again afterwards.
    let missing = MigrationSpec {
        scratch_dir: Some(cluster.dir().join("no-such-dir")),
        ..MigrationSpec::new("again.mem")
    };
    let r = migrate(&v, to(&ep, &agent), &missing, &mut |_| {}).await;
    assert!(!r.migrated && r.how.contains("encoding"), "{r:?}");
    let scratch = tempfile::tempdir().unwrap();
    let spec = MigrationSpec {
        scratch_dir: Some(scratch.path().to_path_buf()),
        ..MigrationSpec::new("again.mem")
    };
    let r = migrate(&v, to(&ep, &agent), &spec, &mut |_| {}).await;
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    assert!(r.migrated, "{r:?}");
    assert_eq!(r.bit_exact, Some(true), "{r:?}");
    assert_eq!(published(&cluster, "again.mem"), v.page_hashes());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_vm_arrives_bit_exact_and_a_second_migration_is_warm() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let dest = to(&ep, &agent);
    let v = vm(16, 2000.0);
    // One codec for both migrations: the chooser and the pacer follow this machine's load
    // (on loopback they pick anything from none to zstd), and the comparison below is about
    // the cache.
    let spec = |name: &str| MigrationSpec {
        codec: Some(dwcp_encoding::Codec::Zstd(3)),
        ..MigrationSpec::new(name)
    };
    let r = migrate(&v, dest, &spec("vm1.mem"), &mut |_| {}).await;
    assert!(r.migrated, "{r:?}");
    assert_eq!(r.bit_exact, Some(true), "{r:?}");
    assert!(r.downtime_ms.is_some() && !r.rounds.is_empty(), "{r:?}");
    assert!(
        v.is_paused(),
        "the source stays paused: the VM lives on the destination now"
    );
    // The published image is the source's memory at the moment it stopped.
    assert_eq!(published(&cluster, "vm1.mem"), v.page_hashes());
    assert!(
        !cluster
            .dir()
            .join("spool/src/.vm1.mem.dwcp-migrating")
            .exists()
    );

    // The same VM again (as if it had come back): the destination's cache holds its pages.
    let v2 = vm(16, 2000.0);
    let r2 = migrate(&v2, dest, &spec("vm1-again.mem"), &mut |_| {}).await;
    assert!(r2.migrated && r2.bit_exact == Some(true), "{r2:?}");
    // The first pass (the whole of RAM) is what the cache saves; later rounds carry what the
    // workload dirtied meanwhile, which depends on how busy this machine is.
    let first = |r: &MigrationReport| r.rounds[0].wire_bytes;
    assert!(
        first(&r2) < first(&r) / 5,
        "warm first pass {} vs cold {} (whole migrations: {} vs {}); cold {r:?}, warm {r2:?}",
        first(&r2),
        first(&r),
        r2.wire_bytes,
        r.wire_bytes
    );
    assert!(
        r2.levels[3] > 0,
        "pages by cache reference: {:?}",
        r2.levels
    );
    // The destination counts both, by source and result.
    let m = agent.metrics().await;
    assert_eq!(ended(&m), (2.0, 0.0), "{m}");
    // (The abort each source sends before it starts, to clear what an earlier attempt may
    // have left, ended nothing: not counted.)
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_in_a_file_with_a_small_shadow_arrives_bit_exact_and_sparse() {
    // A VM bigger than memory would be: its pages in a file, and the source keeping only
    // 1024 pages of what the destination holds (XOR bases) for a VM of 4096.
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let dir = tempfile::tempdir().unwrap();
    let mut mem = dwcp_sys::FileMemory::create_in(dir.path(), 16 << 20).unwrap();
    dwcp_encoding::image::generate_into(
        &ImageSpec::new(16 << 20),
        &mut Corpus::synthetic(),
        &mut mem,
    );
    let v = MemoryVm::start(mem, 4096, DirtyModel::default(), 2000.0, 7);
    let spec = MigrationSpec {
        codec: Some(dwcp_encoding::Codec::Zstd(3)),
        shadow_bytes: 1024 * 4096,
        ..MigrationSpec::new("in-a-file.mem")
    };
    let r = migrate(&v, to(&ep, &agent), &spec, &mut |_| {}).await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    assert_eq!(published(&cluster, "in-a-file.mem"), v.page_hashes());
    assert!(
        r.shadow_bytes > 0 && r.shadow_bytes <= 1024 * 4096,
        "{} bytes kept",
        r.shadow_bytes
    );
    // The bases kept are the destination's pages: had one been wrong, the destination would
    // have refused its part (an XOR or "unchanged" page that does not check out), and the
    // source sent it again without them.
    assert_eq!(r.cold_resends, 0, "{r:?}");
    let [_, same, _, _, xor, _] = r.levels;
    assert!(
        same + xor > 0,
        "pages sent against a kept base: {:?}",
        r.levels
    );
    // The destination's zero pages (about a third of the image) are holes in its file.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(cluster.dir().join("spool/src/in-a-file.mem")).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    assert!(
        meta.blocks() * 512 < meta.len() * 4 / 5,
        "{} bytes allocated for a file of {}",
        meta.blocks() * 512,
        meta.len()
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_its_source_abandoned_is_removed_and_counted_as_aborted() {
    // What a source killed mid-migration leaves: its target, last written two hours ago.
    let cluster = TestCluster::new();
    let spool = cluster.dir().join("spool/src");
    std::fs::create_dir_all(&spool).unwrap();
    let target = spool.join(".left.mem.dwcp-migrating");
    let f = std::fs::File::create(&target).unwrap();
    f.set_len(1 << 20).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    drop(f);
    let recent = spool.join(".busy.mem.dwcp-migrating");
    std::fs::write(&recent, b"x").unwrap();
    // The agent looks once it is up (`migration.stale_target_secs`, an hour by default).
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let mut waited = 0;
    while target.exists() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(!target.exists(), "the abandoned target is still there");
    assert!(recent.exists(), "a target written lately stays");
    let m = agent.metrics().await;
    assert_eq!(ended(&m), (0.0, 1.0), "{m}");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_rounds_commit_and_check_share_one_session() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(4, 500.0);
    // Parts one at a time (a second session for overlapping parts is the next test's).
    let spec = MigrationSpec {
        streams: 3,
        overlap_parts: false,
        ..MigrationSpec::new("one-session.mem")
    };
    let r = migrate(&v, to(&ep, &agent), &spec, &mut |_| {}).await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    // A v6 destination committed with the final round: no commit of its own on the pause.
    assert!(r.committed_with_final_round, "{r:?}");
    // The pause ends at the commit, as the destination timed it: before its answer reached
    // the source.
    let (paused, heard) = (r.downtime_ms.unwrap(), r.downtime_observed_ms.unwrap());
    assert!(paused < heard && heard - paused < 50.0, "{r:?}");
    // Each handshake costs round trips on a long path: the reservation, the cache query,
    // every round, the commit and the final check all went over the rounds' three streams
    // (they used to open three more sessions of their own: 6 connections). A stream
    // replaced on a loaded machine may add one.
    let m = agent.metrics().await;
    let accepted = dwcp_testkit::metric_value(&m, "dwcp_connections_accepted_total", &[]);
    assert!(
        (3.0..6.0).contains(&accepted),
        "{accepted} connections: {m}"
    );
    agent.stop().await.unwrap();
}

/// The link goes down twice: during round 0 (its session cut mid-part), and again as round
/// 1 begins (no session to reuse, a new one refused). Each time the rounds dial again and
/// resume; the image arrives bit-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_arrives_bit_exact_across_link_outages_during_and_between_rounds() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let proxy = std::sync::Arc::new(
        dwcp_testkit::Proxy::start(agent.addr, dwcp_testkit::Fault::None).await,
    );
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(8, 50.0);
    // Round 0 takes two seconds or more at the cap: long enough to be cut in.
    let spec = MigrationSpec {
        codec: Some(dwcp_encoding::Codec::Lz4),
        rate_limit: Some(RateLimit::new(1_000_000)),
        retry_for: Duration::from_secs(30),
        ..MigrationSpec::new("outage.mem")
    };
    let dest = Destination {
        endpoint: &ep,
        addr: proxy.addr,
        expected: None,
    };
    let (mut during, mut between) = (None, None);
    let r = migrate(&v, dest, &spec, &mut |p| {
        if during.is_none() && p.phase == "PreCopy(0)" {
            let proxy = proxy.clone();
            during = Some(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                proxy.outage(Duration::from_millis(1500));
            }));
        }
        if between.is_none() && p.round >= 1 {
            proxy.outage(Duration::from_millis(1500));
            between = Some(std::time::Instant::now());
        }
    })
    .await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    assert!(
        during.is_some_and(|t| t.is_finished()),
        "cut during round 0"
    );
    assert!(r.reconnects >= 1, "{r:?}");
    assert!(
        between.is_some_and(|t| t.elapsed() >= Duration::from_millis(1500)),
        "the rounds after the second cut waited for the link"
    );
    assert_eq!(published(&cluster, "outage.mem"), v.page_hashes());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_caps_the_migration_on_all_its_sessions_together() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(8, 50.0);
    // Small parts on two sessions at once (overlapping), one cap for both.
    let spec = MigrationSpec {
        streams: 2,
        first_part_pages: 128,
        max_part_pages: 256,
        codec: Some(dwcp_encoding::Codec::Lz4),
        rate_limit: Some(RateLimit::new(1_000_000)),
        ..MigrationSpec::new("capped.mem")
    };
    let r = migrate(&v, to(&ep, &agent), &spec, &mut |_| {}).await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    // What the rounds put on the wire, at 1 MB/s (less the bucket's 50 ms of burst): two
    // seconds or more.
    assert!(r.wire_bytes > 2_000_000, "{r:?}");
    let least = (r.wire_bytes as f64 - 50_000.0) / 1e6;
    assert!(
        r.total_seconds >= least,
        "{} bytes on the wire in {:.2} s: faster than the cap allows ({least:.2} s); {r:?}",
        r.wire_bytes,
        r.total_seconds
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_overlap_on_a_second_session_and_are_applied_in_order() {
    // Many small parts, each with duplicates of pages in the parts before it, which go as
    // references to what the destination learned applying those: applied out of order, they
    // would not resolve (a cold resend). (The receiver's own tests hold the order itself.)
    let spec = |name: &str| MigrationSpec {
        streams: 2,
        first_part_pages: 50,
        max_part_pages: 100,
        codec: Some(dwcp_encoding::Codec::Zstd(3)),
        ..MigrationSpec::new(name)
    };
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(16, 2000.0);
    let r = migrate(&v, to(&ep, &agent), &spec("overlap.mem"), &mut |_| {}).await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    assert!(r.committed_with_final_round, "{r:?}");
    assert_eq!(published(&cluster, "overlap.mem"), v.page_hashes());
    assert!(r.levels[3] > 0, "{r:?}");
    assert_eq!(r.cold_resends, 0, "{r:?}");
    // Parts went while the one before them was still on its way, on the second session's
    // two streams (a stream replaced on a loaded machine may add one or two).
    assert!(r.overlapped_parts > 0, "{r:?}");
    let m = agent.metrics().await;
    let accepted = dwcp_testkit::metric_value(&m, "dwcp_connections_accepted_total", &[]);
    assert!(
        (4.0..7.0).contains(&accepted),
        "{accepted} connections: {m}"
    );
    // The rounds' part files are gone with the commit.
    let leftovers: Vec<_> = std::fs::read_dir(cluster.dir().join("spool/src"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("dwcp-round"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    agent.stop().await.unwrap();

    // A v4 destination takes one part at a time, on one session.
    let cluster = TestCluster::new();
    let agent =
        RunningAgent::start(&cluster, "dest", |c| c.protocol.versions = vec![1, 3, 4]).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(16, 2000.0);
    let r = migrate(&v, to(&ep, &agent), &spec("v4.mem"), &mut |_| {}).await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    assert_eq!(r.overlapped_parts, 0, "{r:?}");
    // And commits after the final round, on its own request: the pause is what the source
    // saw.
    assert!(!r.committed_with_final_round, "{r:?}");
    assert_eq!(r.downtime_ms, r.downtime_observed_ms, "{r:?}");
    let m = agent.metrics().await;
    let accepted = dwcp_testkit::metric_value(&m, "dwcp_connections_accepted_total", &[]);
    assert!(
        (2.0..4.0).contains(&accepted),
        "{accepted} connections: {m}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_sent_in_parts_arrive_bit_exact_and_warm() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let dest = to(&ep, &agent);
    // 4096 pages: the first pass goes as parts of 300 pages, then more each time (at most
    // twice as many, at most 1000), each encoded while the one before it is sent.
    // One codec for both: the pacer's steps follow this machine's load, and the comparison
    // below is about the cache.
    let small_parts = |name: &str| MigrationSpec {
        first_part_pages: 300,
        max_part_pages: 1000,
        codec: Some(dwcp_encoding::Codec::Zstd(3)),
        ..MigrationSpec::new(name)
    };
    let v = vm(16, 2000.0);
    let r = migrate(&v, dest, &small_parts("parts.mem"), &mut |_| {}).await;
    assert!(r.migrated, "{r:?}");
    assert_eq!(r.bit_exact, Some(true), "{r:?}");
    assert_eq!(r.rounds[0].pages, 4096, "{r:?}");
    // Duplicates across parts went as references to what the destination's cache learned
    // from earlier parts, and it held them all.
    assert!(r.levels[3] > 0, "{r:?}");
    assert_eq!(r.cold_resends, 0, "{r:?}");
    assert_eq!(published(&cluster, "parts.mem"), v.page_hashes());
    // Warm again, in parts: the pages of every part went into the destination's cache.
    let v2 = vm(16, 2000.0);
    let r2 = migrate(&v2, dest, &small_parts("parts-again.mem"), &mut |_| {}).await;
    assert!(r2.migrated && r2.bit_exact == Some(true), "{r2:?}");
    assert!(
        r2.rounds[0].wire_bytes < r.rounds[0].wire_bytes / 5,
        "warm first pass {} vs cold {}",
        r2.rounds[0].wire_bytes,
        r.rounds[0].wire_bytes
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_cache_too_small_for_what_it_learned_still_gets_a_bit_exact_image() {
    let cluster = TestCluster::new();
    // A cache of 1 MiB in memory: the literal pages of early parts are evicted before later
    // parts refer to them, the destination cannot resolve those, and the source sends the
    // rest of that round without references and stops counting on learned pages.
    let agent = RunningAgent::start(&cluster, "dest", |c| {
        c.encoding.cache_dir = std::path::PathBuf::new();
        c.encoding.cache_mem_mib = 1;
    })
    .await;
    let ep = endpoint(&cluster, "src", |_| {});
    let dest = to(&ep, &agent);
    let spec = MigrationSpec {
        first_part_pages: 300,
        max_part_pages: 600,
        ..MigrationSpec::new("small-cache.mem")
    };
    let v = vm(16, 2000.0);
    let r = migrate(&v, dest, &spec, &mut |_| {}).await;
    assert!(r.migrated, "{r:?}");
    assert_eq!(r.bit_exact, Some(true), "{r:?}");
    // Once, then the source counts on nothing it sent.
    assert_eq!(r.cold_resends, 1, "{r:?}");
    assert_eq!(published(&cluster, "small-cache.mem"), v.page_hashes());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_never_converges_is_rolled_back_with_the_source_running() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let dest = to(&ep, &agent);
    // A guest rewriting pages far faster than the rounds go, no throttling allowed, and a
    // budget no round can meet.
    let v = vm(8, 200_000.0);
    let mut spec = MigrationSpec::new("busy.mem");
    spec.throttle = false;
    spec.config.downtime_budget = Duration::from_micros(1);
    spec.config.max_rounds = 4;
    let r = migrate(&v, dest, &spec, &mut |_| {}).await;
    assert!(!r.migrated, "{r:?}");
    assert!(r.how.contains("did not converge"), "{}", r.how);
    assert!(!v.is_paused(), "the source keeps running");
    assert!(!r.source_paused, "{r:?}");
    let w = v.writes();
    let mut waited = 0;
    while v.writes() == w && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(v.writes() > w, "and its workload with it");
    let spool = cluster.dir().join("spool/src");
    assert!(
        !spool.join(".busy.mem.dwcp-migrating").exists(),
        "destination cleaned"
    );
    assert!(!spool.join("busy.mem").exists());
    let m = agent.metrics().await;
    assert_eq!(ended(&m), (0.0, 1.0), "{m}");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_goes_away_leaves_the_source_running() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let addr = agent.addr;
    agent.stop().await.unwrap();
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(4, 1000.0);
    let r = migrate(
        &v,
        Destination {
            endpoint: &ep,
            addr,
            expected: None,
        },
        &MigrationSpec::new("gone.mem"),
        &mut |_| {},
    )
    .await;
    assert!(!r.migrated, "{r:?}");
    assert!(r.how.contains("Prepare"), "{}", r.how);
    assert!(!v.is_paused());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_at_once_to_one_destination_each_arrive_with_their_own_report() {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let dest = to(&ep, &agent);
    let (a, b) = (vm(8, 1000.0), vm(8, 3000.0));
    let (sa, sb) = (MigrationSpec::new("a.mem"), MigrationSpec::new("b.mem"));
    let (mut pa, mut pb) = (
        |_: &dwcp_migration::Progress| {},
        |_: &dwcp_migration::Progress| {},
    );
    let (ra, rb) = tokio::join!(
        migrate(&a, dest, &sa, &mut pa),
        migrate(&b, dest, &sb, &mut pb)
    );
    for (r, name, v) in [(&ra, "a.mem", &a), (&rb, "b.mem", &b)] {
        assert!(r.migrated && r.bit_exact == Some(true), "{name}: {r:?}");
        assert_eq!(published(&cluster, name), v.page_hashes(), "{name}");
    }
    agent.stop().await.unwrap();
}

/// A cold in-place round of every page of `img` (4 KiB pages), in a file.
fn encoded_round(img: &[u8]) -> tempfile::NamedTempFile {
    let cfg = dwcp_encoding::EncoderConfig {
        codec: dwcp_encoding::Codec::Zstd(1),
        ..dwcp_encoding::EncoderConfig::new((img.len() / 4096) as u64)
    };
    let mut enc = dwcp_encoding::PageEncoder::new(cfg).unwrap();
    let mut out = Vec::new();
    for (p, page) in img.chunks_exact(4096).enumerate() {
        enc.push(p as u64, page, None, None, &mut out).unwrap();
    }
    enc.finish(&mut out);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, &out).unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_round_commits_its_target_and_a_copy_of_it_sent_later_is_refused() {
    use dwcp_transport::session::{KeptSession, SendError, SendOptions, Source, send_files_kept};
    use dwcp_wire::{ErrorCode, data};

    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let first = vec![7u8; 64 * 4096];
    let mut second = first.clone();
    second[5 * 4096..6 * 4096].fill(9);
    let (f1, f2) = (encoded_round(&first), encoded_round(&second));
    let round = |f: &tempfile::NamedTempFile, tag: &str, commit: bool| Source {
        path: f.path().to_path_buf(),
        name: "c.mem".into(),
        size: f.as_file().metadata().unwrap().len(),
        version_tag: tag.into(),
        pre_encoded: Some((
            data::ENCODING_HDE_PAGES_INPLACE,
            first.len() as u64,
            Vec::new(),
        )),
        commit,
        writes: None,
    };
    let opts = SendOptions {
        streams: 2,
        fresh: true,
        ..SendOptions::default()
    };
    let mut kept = KeptSession::new();
    let send = async |src: Source, kept: &mut KeptSession| {
        send_files_kept(&ep, agent.addr, None, &[src], &opts, &mut |_| {}, kept).await
    };
    let spool = cluster.dir().join("spool/src");
    // Round 0 builds the target; nothing is published yet.
    send(round(&f1, "m round 0", false), &mut kept)
        .await
        .unwrap();
    assert!(spool.join(".c.mem.dwcp-migrating").exists());
    assert!(!spool.join("c.mem").exists());
    // The final round's success answer says the target is published.
    send(round(&f2, "m round 1", true), &mut kept)
        .await
        .unwrap();
    assert_eq!(std::fs::read(spool.join("c.mem")).unwrap(), second);
    assert!(!spool.join(".c.mem.dwcp-migrating").exists());
    // The same round once more (as after a session lost before its answer came): refused,
    // not applied to a new, empty target, and the published copy stays as it was.
    match send(round(&f2, "m round 1", true), &mut kept).await {
        Err(SendError::Refused { code, reason, .. }) => {
            assert_eq!(code, ErrorCode::STORAGE_ERROR);
            assert!(reason.contains("no migration target"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(spool.join("c.mem")).unwrap(), second);
    assert!(!spool.join(".c.mem.dwcp-migrating").exists());
    // Only an in-place round may ask for a commit.
    let raw = Source {
        name: "raw".into(),
        commit: true,
        ..Source::file(f1.path()).unwrap()
    };
    match send(raw, &mut kept).await {
        Err(SendError::Protocol(e)) => assert!(e.contains("in-place migration round"), "{e}"),
        other => panic!("{other:?}"),
    }
    kept.close().await;
    agent.stop().await.unwrap();

    // A v5 receiver would not know the request: the sender does not ask it.
    let cluster = TestCluster::new();
    let agent =
        RunningAgent::start(&cluster, "dest", |c| c.protocol.versions = vec![1, 3, 4, 5]).await;
    let ep = endpoint(&cluster, "src", |_| {});
    let mut kept = KeptSession::new();
    let r = send_files_kept(
        &ep,
        agent.addr,
        None,
        &[round(&f1, "m round 0", true)],
        &opts,
        &mut |_| {},
        &mut kept,
    )
    .await;
    match r {
        Err(SendError::Protocol(e)) => assert!(e.contains("protocol v6"), "{e}"),
        other => panic!("{other:?}"),
    }
    kept.close().await;
    agent.stop().await.unwrap();
}

/// An 8 MiB VM migrated through a proxy whose link goes down for `outage`, `after` the
/// progress first says `phase`, its source dialling again for `retry_for`: the cluster, its
/// agent, the VM, the report, and when the link went down.
async fn cut_at(
    phase: &str,
    after: Duration,
    outage: Duration,
    retry_for: Duration,
) -> (
    TestCluster,
    RunningAgent,
    MemoryVm,
    MigrationReport,
    std::time::Instant,
) {
    let cluster = TestCluster::new();
    let agent = RunningAgent::start(&cluster, "dest", |_| {}).await;
    let proxy = std::sync::Arc::new(
        dwcp_testkit::Proxy::start(agent.addr, dwcp_testkit::Fault::None).await,
    );
    let ep = endpoint(&cluster, "src", |_| {});
    let v = vm(8, 50.0);
    let spec = MigrationSpec {
        codec: Some(dwcp_encoding::Codec::Lz4),
        // Round 0 takes two seconds or more: long enough to be cut in.
        rate_limit: Some(RateLimit::new(1_000_000)),
        retry_for,
        ..MigrationSpec::new("cut.mem")
    };
    let dest = Destination {
        endpoint: &ep,
        addr: proxy.addr,
        expected: None,
    };
    let mut cut = None;
    let r = migrate(&v, dest, &spec, &mut |p| {
        if cut.is_none() && p.phase == phase {
            if after.is_zero() {
                proxy.outage(outage);
            } else {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    proxy.outage(outage);
                });
            }
            cut = Some(std::time::Instant::now() + after);
        }
    })
    .await;
    assert!(cut.is_some(), "no {phase} seen");
    (cluster, agent, v, r, cut.unwrap())
}

/// The link cut while the guest is paused for its final round, for less than the retry
/// period: the final round, which carries the commit, waits for the link and goes again;
/// the guest arrives bit-exact, paused meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_at_the_stop_and_copy_is_waited_out_and_the_vm_arrives_bit_exact() {
    let (cluster, agent, v, r, cut) = cut_at(
        "StopAndCopy",
        Duration::ZERO,
        Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await;
    assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
    // Paused through the outage: the commit came after the link did.
    assert!(cut.elapsed() >= Duration::from_secs(3), "{r:?}");
    assert!(r.downtime_ms.is_some_and(|ms| ms >= 2900.0), "{r:?}");
    assert!(v.is_paused());
    assert_eq!(published(&cluster, "cut.mem"), v.page_hashes());
    let (committed, aborted) = ended(&agent.metrics().await);
    assert_eq!((committed, aborted), (1.0, 0.0));
    agent.stop().await.unwrap();
}

/// The link cut at the stop-and-copy for longer than the retry period: the migration fails
/// with a commit possibly on its way, so the source may resume only once the destination
/// says it holds no copy. It asks again until the link is back (within the retry period
/// again, at least 10 s), and then the guest runs on exactly one side: here at the source,
/// the destination's target gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_after_the_commit_was_asked_waits_for_the_destination_to_settle() {
    let outage = Duration::from_secs(8);
    let (_cluster, agent, v, r, cut) = cut_at(
        "StopAndCopy",
        Duration::ZERO,
        outage,
        Duration::from_secs(2),
    )
    .await;
    assert!(
        cut.elapsed() >= outage,
        "ended {:?} into the outage: {r:?}",
        cut.elapsed()
    );
    // The cut came before the final round went: nothing committed there.
    assert!(!r.migrated, "{r:?}");
    assert!(!r.source_paused, "{}", r.how);
    assert!(!v.is_paused(), "{}", r.how);
    assert_eq!(ended(&agent.metrics().await), (0.0, 1.0), "{}", r.how);
    agent.stop().await.unwrap();
}

/// The link cut during round 0 for longer than the retry period: the migration rolls back,
/// the source runs on at once, and the abort is asked again until the link is back (for the
/// retry period again, at least 10 s): no target is left at the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_while_the_link_is_down_clears_the_destination_once_it_is_back() {
    let outage = Duration::from_secs(6);
    let (cluster, agent, v, r, cut) = cut_at(
        "PreCopy(0)",
        Duration::from_millis(500),
        outage,
        Duration::from_secs(1),
    )
    .await;
    assert!(!r.migrated, "{r:?}");
    assert!(!v.is_paused(), "{}", r.how);
    assert!(!r.how.contains("cannot clean"), "{}", r.how);
    assert!(cut.elapsed() >= outage, "{:?}: {}", cut.elapsed(), r.how);
    assert_eq!(ended(&agent.metrics().await), (0.0, 1.0), "{}", r.how);
    let targets = std::fs::read_dir(cluster.dir().join("spool/src"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(targets, 0, "a target left at the destination");
    agent.stop().await.unwrap();
}
