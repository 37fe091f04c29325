//! `dwcp migrate` and the migration part of `dwcp demo`.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use dwcp_control::Settings;
use dwcp_encoding::image::{Corpus, DirtyModel, ImageSpec, generate, generate_into};
use dwcp_migration::{
    Backing, Destination, MemoryVm, MigrationReport, MigrationSpec, QemuError, QemuProgress,
    QemuReport, QemuSpec, migrate, migrate_qemu,
};
use dwcp_sys::FileMemory;
use dwcp_transport::session::RateLimit;
use serde_json::{Value, json};

use crate::cli::{CodecChoice, MigrateArgs, VmArgs};
use crate::commands::UsageError;

/// A migration that did not complete; where that left the VM sets the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MigrationFailed {
    /// Undone, or never begun: the VM is at the source as it was (running, or paused if it
    /// was paused).
    #[error("the migration did not complete: the VM is at the source as it was before")]
    RolledBack,
    /// The source was left paused: the guest may run at the destination, or the source could
    /// not be resumed.
    #[error(
        "the migration did not complete and the source VM is left paused: the guest may run \
         at the destination; check there before resuming or discarding the source"
    )]
    OutcomeUnknown,
    /// Stopped in post-copy: the guest runs at the destination, pages of it are still at the
    /// source, and both QEMUs wait for the stream to come back.
    #[error(
        "the migration stopped in post-copy: the guest's memory is split between the hosts, \
         and both QEMUs wait paused (QEMU's postcopy-paused); once the destination is \
         reachable, run the same `dwcp migrate` again to resume it"
    )]
    PostcopyPaused,
}

/// A generated VM, and how many bytes of what the destination holds its migration may keep
/// ([`MigrationSpec::shadow_bytes`]).
pub(crate) struct MadeVm {
    pub(crate) vm: MemoryVm,
    pub(crate) shadow_bytes: u64,
}

/// Memory kept free of the VM and the shadow, for the rest of the process (and, in the demo,
/// the destination agent).
const HEADROOM: u64 = 512 << 20;
/// Below this much room for the shadow, a VM is refused rather than migrated with next to no
/// XOR deltas.
const MIN_SHADOW: u64 = 256 << 20;

/// How many bytes of page contents the source may keep as XOR bases, for a VM of `size`
/// bytes of which `image_ram` are in this process's memory, with `avail` bytes available
/// (`None`: unknown). Every page while the image and a full copy fit, as before there was a
/// bound; otherwise half of what is left, so that the page cache keeps the rest.
fn shadow_budget(size: u64, image_ram: u64, avail: Option<u64>) -> Result<u64, u64> {
    let Some(avail) = avail else {
        return Ok(u64::MAX);
    };
    let room = avail.saturating_sub(image_ram + HEADROOM);
    if size <= room {
        Ok(u64::MAX)
    } else if room / 2 >= MIN_SHADOW {
        Ok(room / 2)
    } else {
        // Enough for either: a copy of every page, or half of twice the least copy.
        Err(image_ram + HEADROOM + size.min(2 * MIN_SHADOW))
    }
}

/// Whether `dir` is on a filesystem whose files live in memory (tmpfs, ramfs): a VM kept
/// there takes memory all the same.
fn in_memory_fs(dir: &std::path::Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::statfs(dir).is_ok_and(|s| {
        let t = s.f_type as u64;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// Generates the VM's image and starts its workload.
pub(crate) fn make_vm(args: &VmArgs, chatty: bool) -> Result<MadeVm> {
    let size = crate::cli::parse_size(&args.vm_size, false)
        .map_err(|e| UsageError(format!("--vm-size: {e}")))?;
    if !(1 << 20..=64 << 30).contains(&size) {
        return Err(UsageError("--vm-size must be between 1Mi and 64Gi".into()).into());
    }
    let spec = ImageSpec {
        seed: args.seed,
        ..ImageSpec::new(size)
    };
    let size = size / spec.page_size as u64 * spec.page_size as u64;
    if let Some(dir) = &args.vm_dir {
        // The file holds the pages that are not zero (zero pages stay holes), and the
        // workload's writes add a few.
        // (A write that finds the disk full kills the process with SIGBUS: hence the margin.)
        let need = (size as f64 * (1.0 - spec.mix.zero) * 1.05) as u64 + (256 << 20);
        let st = rustix::fs::statvfs(dir)
            .map_err(|e| UsageError(format!("--vm-dir {}: {e}", dir.display())))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < need {
            return Err(UsageError(format!(
                "--vm-dir {}: a generated VM of {} MiB needs about {} MiB of disk there (its \
                 pages that are not zero), and {} MiB is free",
                dir.display(),
                size >> 20,
                need >> 20,
                free >> 20
            ))
            .into());
        }
    }
    let image_ram = match &args.vm_dir {
        Some(dir) if !in_memory_fs(dir) => 0,
        _ => size,
    };
    let avail = mem_available();
    let shadow_bytes = shadow_budget(size, image_ram, avail).map_err(|need| {
        UsageError(format!(
            "--vm-size {}: a generated VM needs at least {} MiB of memory ({}room for at least \
             {} MiB of the source's copy of what the destination holds), and {} MiB is \
             available here (the host's MemAvailable, or this process's cgroup limit if \
             nearer){}",
            args.vm_size,
            need >> 20,
            if image_ram > 0 { "its image, and " } else { "" },
            (size.min(MIN_SHADOW)) >> 20,
            avail.unwrap_or(0) >> 20,
            if image_ram > 0 {
                "; --vm-dir DIR on a disk keeps the image in a file there instead"
            } else {
                ""
            }
        ))
    })?;
    let t = Instant::now();
    if chatty {
        eprint!(
            "generating a {} MiB VM image (35% zero, 30% binaries, 15% text, 10% duplicate, 10% random pages){}...",
            size >> 20,
            args.vm_dir
                .as_ref()
                .map(|d| format!(" in a file in {}", d.display()))
                .unwrap_or_default()
        );
        let _ = std::io::stderr().flush();
    }
    let mut corpus = if args.synthetic {
        Corpus::synthetic()
    } else {
        Corpus::system()
    };
    let backing: Backing = match &args.vm_dir {
        None => {
            let img = generate(&spec, &mut corpus);
            img.data.into()
        }
        Some(dir) => {
            let len = usize::try_from(size).map_err(|_| UsageError("--vm-size: too big".into()))?;
            let mut mem = FileMemory::create_in(dir, len).with_context(|| {
                format!("--vm-dir {}: a file for the VM's memory", dir.display())
            })?;
            generate_into(&spec, &mut corpus, &mut mem);
            mem.into()
        }
    };
    if chatty {
        eprintln!(" {:.1} s", t.elapsed().as_secs_f64());
        if shadow_bytes != u64::MAX {
            eprintln!(
                "keeping at most {} MiB of what the destination holds for XOR deltas (less memory \
                 than the VM's size is available)",
                shadow_bytes >> 20
            );
        }
    }
    let writes = args.dirty_rate as f64 / 4096.0;
    Ok(MadeVm {
        vm: MemoryVm::start(
            backing,
            spec.page_size,
            DirtyModel::default(),
            writes,
            args.seed,
        ),
        shadow_bytes,
    })
}

/// Memory this process can still have, bytes: the host's `MemAvailable` (`/proc/meminfo`),
/// or less where its cgroup has a limit nearer; `None` where the kernel does not say.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    let host = kib << 10;
    Some(cgroup_room().map_or(host, |c| c.min(host)))
}

/// What this process's cgroup may still use: its limit less its usage, from the cgroup
/// `/proc/self/cgroup` names (v2: `memory.max`, `memory.current`; v1: the memory
/// controller's `memory.limit_in_bytes`, `memory.usage_in_bytes`); `None` without a limit
/// or where it cannot be read.
fn cgroup_room() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |dir: &std::path::Path, f: &str| -> Option<u64> {
        // "max" (v2, no limit) does not parse: None.
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let room = |dir: std::path::PathBuf, max: &str, used: &str| -> Option<u64> {
        Some(read(&dir, max)?.saturating_sub(read(&dir, used)?))
    };
    let under =
        |root: &str, path: &str| std::path::Path::new(root).join(path.trim_start_matches('/'));
    let v2 = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|p| room(under("/sys/fs/cgroup", p), "memory.max", "memory.current"));
    let v1 = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p))
        .and_then(|p| {
            room(
                under("/sys/fs/cgroup/memory", p),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        });
    match (v2, v1) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Runs a migration, with a one-line progress display on standard error when `chatty`.
pub(crate) async fn run_with_progress(
    vm: &MemoryVm,
    dest: Destination<'_>,
    spec: &MigrationSpec,
    chatty: bool,
) -> MigrationReport {
    // A line redrawn in place only on a terminal: in a log it would be clutter.
    let chatty = chatty && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = Instant::now();
    let mut progress = |p: &dwcp_migration::Progress| {
        if !chatty || last.elapsed().as_millis() < 200 && p.phase != "Prepare" {
            return;
        }
        last = Instant::now();
        let rate = p
            .bandwidth
            .map_or_else(|| "-".into(), |b| format!("{:.0} Mbit/s", b * 8.0 / 1e6));
        let pred = p
            .predicted_downtime_ms
            .map_or_else(|| "-".into(), |d| format!("{d:.0} ms"));
        eprint!(
            "\r\x1b[2K{:<12} round {:>2}  dirty {:>8} pages  {}  wire {:>6.1} MB  predicted pause {}{}",
            p.phase,
            p.round,
            p.dirty,
            rate,
            p.wire_bytes as f64 / 1e6,
            pred,
            if p.throttle > 0 {
                format!("  throttle {}%", p.throttle)
            } else {
                String::new()
            }
        );
        let _ = std::io::stderr().flush();
    };
    let r = migrate(vm, dest, spec, &mut progress).await;
    if chatty {
        eprintln!("\r\x1b[2K");
    }
    r
}

/// Milliseconds, or "an unknown time" (not a 0 that reads as measured).
fn ms_or_unknown(ms: Option<f64>) -> String {
    ms.map_or_else(|| "an unknown time".to_string(), |v| format!("{v:.0} ms"))
}

/// The report as JSON.
pub(crate) fn report_json(r: &MigrationReport) -> Value {
    let [zero, same, dup, cache, xor, literal] = r.levels;
    json!({
        "result": match (r.migrated, r.source_paused) {
            (true, _) => "migrated",
            (false, true) => "source paused",
            (false, false) => "rolled back",
        },
        "how": r.how,
        "total_seconds": r.total_seconds,
        "downtime_ms": r.downtime_ms,
        "downtime_observed_ms": r.downtime_observed_ms,
        "predicted_downtime_ms": r.predicted_downtime_ms,
        "guest_bytes": r.guest_bytes,
        "wire_bytes": r.wire_bytes,
        "bit_exact": r.bit_exact,
        "codec": r.codec,
        "cold_resends": r.cold_resends,
        "overlapped_parts": r.overlapped_parts,
        "committed_with_final_round": r.committed_with_final_round,
        "shadow_bytes": r.shadow_bytes,
        "reconnects": r.reconnects,
        "tcp_retransmits": r.tcp.map(|t| t.retransmits),
        "tcp_segments_sent": r.tcp.map(|t| t.segments_sent),
        "tcp_bytes_sent": r.tcp.map(|t| t.bytes_sent),
        "pages": {"zero": zero, "same": same, "dup": dup, "cache": cache, "xor": xor, "literal": literal},
        "rounds": r.rounds.iter().map(|x| json!({
            "round": x.round, "pages": x.pages, "wire_bytes": x.wire_bytes, "seconds": x.seconds,
            "dirty_after": x.dirty_after, "throttle": x.throttle,
        })).collect::<Vec<_>>(),
    })
}

/// The line of what TCP sent again (the kernel's count), if it was counted.
fn print_tcp(tcp: Option<dwcp_transport::session::TcpCounts>, under: &str) {
    if let Some(t) = tcp {
        outln!("  TCP {t}{under}");
    }
}

/// The report as text.
pub(crate) fn print_report(r: &MigrationReport, from: &str, to: &str) {
    outln!(
        "live migration {from} -> {to}: {} MiB guest under a dirtying workload",
        r.guest_bytes >> 20
    );
    outln!("  round     pages   on the wire    seconds   dirtied meanwhile  throttle");
    let last = r.rounds.len().saturating_sub(1);
    for (i, x) in r.rounds.iter().enumerate() {
        outln!(
            "  {:>5}{} {:>8} {:>10.1} MB {:>10.3} {:>19} {:>8}%",
            x.round,
            if i == last && r.downtime_ms.is_some() {
                "*"
            } else {
                " "
            },
            x.pages,
            x.wire_bytes as f64 / 1e6,
            x.seconds,
            x.dirty_after,
            x.throttle
        );
    }
    let [zero, same, dup, cache, xor, literal] = r.levels;
    outln!("  (* the stop-and-copy round, guest paused)");
    outln!(
        "  pages sent as: {zero} zero, {dup} duplicate, {cache} from the destination's cache, {same} unchanged, {xor} XOR delta, {literal} literal ({})",
        r.codec
    );
    print_tcp(r.tcp, "");
    if r.reconnects > 0 {
        outln!(
            "  {} reconnection(s) after every connection to the destination was lost",
            r.reconnects
        );
    }
    if r.cold_resends > 0 {
        outln!(
            "  {} part(s) of rounds sent again without references: the destination's cache \
             no longer held pages it had learned from this migration",
            r.cold_resends
        );
    }
    if r.migrated {
        outln!(
            "result: migrated ({}) in {:.2} s; guest paused {} until the destination committed ({} until this host heard; predicted {}); {:.1} MB on the wire for {} MiB of RAM ({:.1} %); destination {}",
            r.how,
            r.total_seconds,
            ms_or_unknown(r.downtime_ms),
            ms_or_unknown(r.downtime_observed_ms),
            ms_or_unknown(r.predicted_downtime_ms),
            r.wire_bytes as f64 / 1e6,
            r.guest_bytes >> 20,
            r.wire_bytes as f64 / r.guest_bytes.max(1) as f64 * 100.0,
            match r.bit_exact {
                Some(true) => "bit-exact with the source at the moment it stopped",
                Some(false) => "DIFFERS from the source (a bug: please report)",
                None => "not verified",
            }
        );
    } else if r.source_paused {
        outln!(
            "result: not migrated after {:.2} s, the source VM is left PAUSED (check the \
             destination): {}",
            r.total_seconds,
            r.how
        );
    } else {
        outln!(
            "result: rolled back after {:.2} s, the VM runs on at the source: {}",
            r.total_seconds,
            r.how
        );
    }
}

/// `dwcp migrate`.
pub(crate) fn run(settings: &Settings, args: &MigrateArgs) -> Result<()> {
    let expect = crate::commands::expected_node(args.expect_node.as_deref())?;
    let endpoint = crate::commands::peer_endpoint(settings)?;
    if let Some(qmp) = &args.qemu_qmp {
        return run_qemu(settings, args, qmp, &endpoint, expect.as_ref());
    }
    let mut spec = MigrationSpec::new(&args.name);
    spec.config.downtime_budget = std::time::Duration::from_millis(args.downtime_ms);
    spec.config.max_rounds = args.max_rounds;
    spec.throttle = !args.no_throttle;
    spec.streams = args.streams;
    spec.retry_for = std::time::Duration::from_secs(args.retry_secs);
    spec.codec = match args.codec {
        CodecChoice::Auto => None,
        CodecChoice::Fixed(c) => Some(c),
    };
    let cap = rate_limit(settings, args);
    // A cap is the link the migration gets.
    if let Some(r) = args.link_rate.or(cap) {
        spec.link_bps = r;
    }
    spec.rate_limit = cap.map(RateLimit::new);
    // The destination's address first: a typo or an unresolvable name is told before a
    // large VM is generated.
    let runtime = crate::commands::runtime()?;
    let addr = runtime.block_on(crate::commands::resolve(&args.to))?;
    let MadeVm { vm, shadow_bytes } = make_vm(&args.vm, !args.json)?;
    spec.shadow_bytes = shadow_bytes;
    let cancel = tokio_util::sync::CancellationToken::new();
    spec.cancel = Some(cancel.clone());
    // The rounds' encoded parts in a directory of this run's: a second signal exits at once
    // (no destructors), and removes it first.
    let scratch = tempfile::Builder::new()
        .prefix("dwcp-migrate-")
        .tempdir()
        .context("cannot make a directory for the rounds' encoded parts")?;
    spec.scratch_dir = Some(scratch.path().to_path_buf());
    let scratch_path = scratch.path().to_path_buf();
    let report = runtime.block_on(async {
        // SIGINT or SIGTERM: roll back (the guest runs on at the source) unless it is paused
        // for its final round already; a second one ends at once.
        let mut signals = crate::commands::StopSignals::new()?;
        tokio::spawn(async move {
            signals.next().await;
            cancel.cancel();
            eprintln!(
                "\ninterrupted: rolling back, unless the guest is paused for its final round \
                 already (once more to quit at once)"
            );
            let code = signals.next().await;
            eprintln!(
                "interrupted again: quitting; the VM, generated here, goes with this process"
            );
            let _ = std::fs::remove_dir_all(&scratch_path);
            std::process::exit(code);
        });
        let dest = Destination {
            endpoint: &endpoint,
            addr,
            expected: expect.as_ref(),
        };
        anyhow::Ok(run_with_progress(&vm, dest, &spec, !args.json).await)
    })?;
    if args.json {
        outln!("{}", report_json(&report));
    } else {
        let from = settings
            .node_id
            .as_ref()
            .map_or("this node", |n| n.as_str());
        print_report(&report, from, &args.to);
    }
    outcome(&report)
}

/// The command's result for a memory-image migration's report: migrated (and not found to
/// differ), rolled back (8), or the source left paused (9). A destination image found to
/// differ from the source's is a bug (1), whatever else the report says.
pub(crate) fn outcome(report: &MigrationReport) -> Result<()> {
    if report.migrated && report.bit_exact == Some(false) {
        return Err(anyhow::anyhow!(
            "migrated, but the destination's image differs from the source's at the moment it \
             stopped (a bug: please report)"
        ));
    }
    if report.migrated {
        Ok(())
    } else {
        let how = if report.source_paused {
            MigrationFailed::OutcomeUnknown
        } else {
            MigrationFailed::RolledBack
        };
        Err(anyhow::anyhow!("not migrated: {}", report.how)).context(how)
    }
}

/// `--rate-limit`, else the configuration's `migration.rate_limit_bytes_per_sec`.
fn rate_limit(settings: &Settings, args: &MigrateArgs) -> Option<u64> {
    // `--rate-limit 0` (or none): no cap, whatever the configuration says.
    args.rate_limit
        .or(settings.migration_rate_limit)
        .filter(|&r| r > 0)
}

/// The QEMU backend's spec from the command line.
pub(crate) fn qemu_spec(
    settings: &Settings,
    args: &MigrateArgs,
    qmp: &std::path::Path,
) -> QemuSpec {
    let mut spec = QemuSpec::new(&args.name, qmp.to_path_buf());
    spec.downtime = std::time::Duration::from_millis(args.downtime_ms);
    spec.auto_converge = !args.no_throttle;
    spec.postcopy = args.postcopy;
    spec.paced_throttle = args.throttle_steps == crate::cli::ThrottleStepsArg::Paced;
    spec.streams = args.streams;
    spec.retry_for = std::time::Duration::from_secs(args.retry_secs);
    let cap = rate_limit(settings, args);
    spec.rate_limit = cap.map(RateLimit::new);
    // A cap is the link the migration gets.
    let link_rate = args.link_rate.or(cap);
    spec.codec = match args.codec {
        CodecChoice::Fixed(c) => c,
        // zstd level 2 runs at several hundred MB/s a core; on links faster than that, lz4.
        CodecChoice::Auto if link_rate.is_some_and(|r| r >= 625_000_000) => {
            dwcp_encoding::Codec::Lz4
        }
        CodecChoice::Auto => dwcp_encoding::Codec::Zstd(2),
    };
    // Without a link rate, the round trip decides: lz4 on a datacenter path, where zstd's
    // CPU time made migrations slower (docs/BENCHMARKS.md, QEMU on dc).
    if args.codec == CodecChoice::Auto && link_rate.is_none() {
        spec.short_path_codec = Some(dwcp_encoding::Codec::Lz4);
    }
    spec.delta = !matches!(args.codec, CodecChoice::Fixed(dwcp_encoding::Codec::None));
    spec
}

/// `dwcp migrate --qemu-qmp`.
fn run_qemu(
    settings: &Settings,
    args: &MigrateArgs,
    qmp: &std::path::Path,
    endpoint: &dwcp_transport::Endpoint,
    expect: Option<&dwcp_wire::NodeId>,
) -> Result<()> {
    let spec = qemu_spec(settings, args, qmp);
    let chatty = !args.json;
    let result = crate::commands::runtime()?.block_on(async {
        // SIGINT or SIGTERM: roll back (QEMU's guest runs on at the source) unless the finish
        // went to the destination already; a second one ends at once.
        let mut signals = crate::commands::StopSignals::new()?;
        let cancel = spec.cancel.clone();
        tokio::spawn(async move {
            signals.next().await;
            if cancel.cancel() {
                eprintln!(
                    "\ninterrupted: cancelling the migration and rolling back (once more to quit at once)"
                );
            } else {
                eprintln!(
                    "\ninterrupted: too late to cancel: the destination is loading the guest (or runs it in post-copy); waiting for its answer (once more to quit at once)"
                );
            }
            let code = signals.next().await;
            if cancel.is_finishing() {
                eprintln!(
                    "interrupted again: quitting without the destination's answer; the source QEMU stays paused: {}",
                    MigrationFailed::OutcomeUnknown
                );
                std::process::exit(9);
            }
            if cancel.source_done() {
                eprintln!(
                    "interrupted again: quitting; the source QEMU had sent its whole stream and may stay paused (resume it with QMP `cont` once the destination has dropped the migration: without the finish it does not start the guest, and its QEMU is told to quit after 180 s without data plus the retry period (--retry-secs))"
                );
                std::process::exit(9);
            }
            eprintln!(
                "interrupted again: quitting; the source QEMU fails the migration when its socket closes and resumes the guest, and the destination's QEMU is told to quit after 180 s without data plus the retry period (--retry-secs)"
            );
            std::process::exit(code);
        });
        let addr = crate::commands::resolve(&args.to).await?;
        let dest = Destination {
            endpoint,
            addr,
            expected: expect,
        };
        anyhow::Ok(run_qemu_with_progress(dest, &spec, chatty).await)
    })?;
    let from = settings
        .node_id
        .as_ref()
        .map_or("this node", |n| n.as_str());
    match result {
        Ok(r) => {
            if args.json {
                outln!("{}", qemu_report_json(&r, None));
            } else {
                print_qemu_report(&r, from, &args.to);
            }
            Ok(())
        }
        Err(e) => {
            if args.json {
                outln!("{}", qemu_report_json(&e.report, Some(&e)));
            }
            let how = if e.source_as_before {
                MigrationFailed::RolledBack
            } else if e.phase == dwcp_migration::qemu::POSTCOPY {
                MigrationFailed::PostcopyPaused
            } else {
                MigrationFailed::OutcomeUnknown
            };
            Err(anyhow::anyhow!("{e}")).context(how)
        }
    }
}

/// Runs a QEMU migration, with a one-line progress display on standard error when `chatty`.
pub(crate) async fn run_qemu_with_progress(
    dest: Destination<'_>,
    spec: &QemuSpec,
    chatty: bool,
) -> Result<QemuReport, QemuError> {
    // A line redrawn in place only on a terminal: in a log it would be clutter.
    let chatty = chatty && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut progress = |p: &QemuProgress| {
        if !chatty {
            return;
        }
        let left = p.remaining as f64;
        let eta = if p.rate > 0.0 && p.remaining > 0 {
            format!("{:.0} s", left / p.rate)
        } else {
            "-".into()
        };
        eprint!(
            "\r\x1b[2K{:>5.1} s {:<10} round {:>2}  RAM left {:>7.1} MB  dirty {:>6} pages/s{}  {:>6.0} Mbit/s  stream {:>7.1} MB  wire {:>7.1} MB  ETA {}  expected pause {}{}{}",
            started.elapsed().as_secs_f64(),
            p.phase,
            p.round,
            left / 1e6,
            p.dirty_rate,
            if p.throttle > 0 {
                format!(" (throttled {} %)", p.throttle)
            } else {
                String::new()
            },
            p.rate * 8.0 / 1e6,
            p.stream_bytes as f64 / 1e6,
            p.wire_bytes as f64 / 1e6,
            eta,
            p.expected_downtime_ms
                .map_or_else(|| "-".into(), |d| format!("{d:.0} ms")),
            if p.stalled_rounds > 0 {
                // What both sides took, not what was asked for.
                let give_up = if p.postcopy {
                    spec.give_up.for_postcopy()
                } else {
                    spec.give_up
                };
                format!(
                    "  not shrinking for {} round{} ({} at {} and {} s)",
                    p.stalled_rounds,
                    if p.stalled_rounds == 1 { "" } else { "s" },
                    if p.postcopy {
                        "post-copy"
                    } else {
                        "rolled back"
                    },
                    give_up.rounds,
                    give_up.after.as_secs()
                )
            } else {
                String::new()
            },
            p.link_down.map_or_else(String::new, |d| format!(
                "  link down for {:.0} s: reconnecting (for up to {} s)",
                d.as_secs_f64(),
                spec.retry_for.as_secs()
            )),
        );
        let _ = std::io::stderr().flush();
    };
    let r = migrate_qemu(dest, spec, &mut progress).await;
    if chatty {
        eprintln!("\r\x1b[2K");
    }
    r
}

/// A QEMU migration report as JSON.
pub(crate) fn qemu_report_json(r: &QemuReport, err: Option<&QemuError>) -> Value {
    json!({
        "backend": "qemu",
        "result": match (r.migrated, err) {
            (true, _) => "migrated",
            (false, Some(e)) if !e.source_as_before => "source paused",
            _ => "rolled back",
        },
        "error": err.map(|e| e.to_string()),
        "phase_failed": err.map(|e| e.phase),
        "total_seconds": r.total_seconds,
        "downtime_ms": r.downtime_ms,
        "qemu_downtime_ms": r.qemu_downtime_ms,
        "destination_status": r.dest_status,
        "ram_bytes": r.ram_bytes,
        "stream_bytes": r.stream_bytes,
        "wire_bytes": r.wire_bytes,
        "cache_bytes": r.cache_bytes,
        "segments": r.segments,
        "rounds": r.rounds,
        "throttle_percent": r.throttle,
        "codec": r.codec,
        "source_qemu": r.source_qemu,
        "warnings": r.warnings,
        "tcp_retransmits": r.tcp.map(|t| t.retransmits),
        "tcp_segments_sent": r.tcp.map(|t| t.segments_sent),
        "tcp_bytes_sent": r.tcp.map(|t| t.bytes_sent),
        "tunnel_reconnects": r.tunnel_reconnects,
        "postcopy": r.postcopy,
        "postcopy_requests": r.postcopy_requests,
        "postcopy_seconds": r.postcopy_seconds,
        "recovered": r.recovered,
    })
}

/// A QEMU migration report as text.
pub(crate) fn print_qemu_report(r: &QemuReport, from: &str, to: &str) {
    outln!(
        "QEMU live migration {from} -> {to}: {} MiB of guest RAM{}",
        r.ram_bytes >> 20,
        if r.source_qemu.is_empty() {
            String::new()
        } else {
            format!(" ({} at the source)", r.source_qemu)
        }
    );
    for w in &r.warnings {
        outln!("  warning: {w}");
    }
    if r.recovered {
        outln!(
            "  resumed the post-copy an earlier run left paused: the stream, the wire and the time are this run's; QEMU's own counts (iterations, pages asked for) cover the whole migration"
        );
    }
    outln!(
        "  QEMU's stream {:.1} MB in {} segments; {:.1} MB on the wire ({:.1} % of the stream, {:.1} MB by reference to the destination's cache)",
        r.stream_bytes as f64 / 1e6,
        r.segments,
        r.wire_bytes as f64 / 1e6,
        r.wire_bytes as f64 / r.stream_bytes.max(1) as f64 * 100.0,
        r.cache_bytes as f64 / 1e6
    );
    print_tcp(r.tcp, " under the tunnel");
    if r.tunnel_reconnects > 0 {
        outln!(
            "  {} tunnel connections opened again after they were lost",
            r.tunnel_reconnects
        );
    }
    outln!(
        "  {} pre-copy iterations (QEMU's dirty syncs){}",
        r.rounds,
        if r.throttle > 0 {
            format!(", auto-converge throttled the guest up to {} %", r.throttle)
        } else {
            String::new()
        }
    );
    if r.postcopy {
        outln!(
            "  post-copy: the guest ran at the destination before the rest of its memory arrived ({}); it asked for {} pages out of turn",
            r.postcopy_seconds
                .map_or_else(|| "-".into(), |s| format!("{s:.1} s")),
            r.postcopy_requests
        );
    }
    if r.recovered {
        outln!(
            "result: resumed and migrated in {:.2} s (the guest's pause was the earlier run's); destination {}",
            r.total_seconds,
            r.dest_status
        );
        return;
    }
    outln!(
        "result: migrated in {:.2} s; guest paused {} end to end (source STOP -> destination RESUME), QEMU reports {}; destination {}",
        r.total_seconds,
        r.downtime_ms.map_or_else(
            || "- (destination not resumed)".into(),
            |d| format!("{d:.0} ms")
        ),
        r.qemu_downtime_ms
            .map_or_else(|| "-".into(), |d| format!("{d:.0} ms")),
        r.dest_status
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migrated and bit-exact or not verified: success; found to differ: a bug (1), never
    /// success; not migrated: 8, or 9 with the source paused.
    #[test]
    fn the_outcome_follows_the_report_and_a_differing_image_is_an_error() {
        let report = |migrated, bit_exact, source_paused| MigrationReport {
            migrated,
            how: "why".into(),
            bit_exact,
            source_paused,
            ..MigrationReport::new(1 << 20)
        };
        assert!(outcome(&report(true, Some(true), false)).is_ok());
        assert!(outcome(&report(true, None, false)).is_ok());
        let e = outcome(&report(true, Some(false), false)).unwrap_err();
        assert!(e.downcast_ref::<MigrationFailed>().is_none(), "{e:#}");
        assert!(e.to_string().contains("differs"), "{e:#}");
        let e = outcome(&report(false, None, false)).unwrap_err();
        assert!(matches!(
            e.downcast_ref::<MigrationFailed>(),
            Some(MigrationFailed::RolledBack)
        ));
        let e = outcome(&report(false, None, true)).unwrap_err();
        assert!(matches!(
            e.downcast_ref::<MigrationFailed>(),
            Some(MigrationFailed::OutcomeUnknown)
        ));
    }

    #[test]
    fn the_shadow_keeps_every_page_while_that_fits_and_half_the_rest_otherwise() {
        const G: u64 = 1 << 30;
        const M: u64 = 1 << 20;
        // Unknown memory: every page.
        assert_eq!(shadow_budget(32 * G, 0, None), Ok(u64::MAX));
        // 1 GiB in memory with 23 GiB available: every page, as before there was a bound.
        assert_eq!(shadow_budget(G, G, Some(23 * G)), Ok(u64::MAX));
        // 32 GiB in a file: half of what is left after the headroom.
        assert_eq!(
            shadow_budget(32 * G, 0, Some(23 * G)),
            Ok((23 * G - 512 * M) / 2)
        );
        // 16 GiB in memory, 23 available: 6.5 GiB left, 3.25 kept.
        assert_eq!(
            shadow_budget(16 * G, 16 * G, Some(23 * G)),
            Ok((7 * G - 512 * M) / 2)
        );
        // Not even 256 MiB for the copy: refused, with what would do.
        assert_eq!(
            shadow_budget(60 * G, 60 * G, Some(23 * G)),
            Err(60 * G + 1024 * M)
        );
        // A small VM needs only its own size again.
        assert_eq!(
            shadow_budget(100 * M, 100 * M, Some(700 * M)),
            Err(100 * M + 512 * M + 100 * M)
        );
        assert_eq!(shadow_budget(100 * M, 100 * M, Some(712 * M)), Ok(u64::MAX));
    }

    #[test]
    fn tmpfs_counts_as_memory_and_a_disk_does_not() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut seen = 0;
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(at), Some(kind)) = (f.get(1), f.get(2)) else {
                continue;
            };
            let expect = match *kind {
                "tmpfs" | "ramfs" => true,
                "ext4" | "xfs" | "btrfs" => false,
                _ => continue,
            };
            // Mount points with escapes (spaces) are left out.
            if !at.contains('\\') && std::path::Path::new(at).is_dir() {
                assert_eq!(in_memory_fs(std::path::Path::new(at)), expect, "{l}");
                seen += 1;
            }
        }
        if seen == 0 {
            eprintln!("note: no tmpfs or disk filesystem mounted here: nothing checked");
        }
    }
}
