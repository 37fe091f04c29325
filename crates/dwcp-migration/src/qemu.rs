//! The QEMU backend: live-migrates a running QEMU to a destination node, carrying QEMU's own
//! migration stream through DWCP (transfer sessions, HDE stream encoding against the
//! destination's baseline cache). QEMU's protocol stays the judge of correctness: the source
//! QEMU writes its stream to a local socket of ours, the destination agent feeds it to a QEMU
//! waiting with `-incoming` (see `dwcp_transport::session::qemu_feed`).
//!
//! ```text
//!  QEMU ──unix──> reader ──segments──> K sessions (HDE stream objects) ──> agent ──unix──> QEMU
//!                   ^                         │
//!                   └── byte budget <── acks ─┘
//! ```
//!
//! QEMU decides when to stop the guest from the bandwidth it sees on its socket, so the
//! tunnel must not hide a backlog: the reader takes bytes from QEMU only while the bytes read
//! and not yet acknowledged by the destination stay under a budget of about four round trips
//! of measured goodput (4–64 MiB). Downtime is measured end to end, from the source's `STOP`
//! event to the destination's `RESUME` (both QEMU timestamps), besides what QEMU reports.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use dwcp_encoding::stream::{StreamConfig, StreamEncoder};
use dwcp_encoding::{Codec, RemoteIndex};
use dwcp_transport::qmp::{Qmp, args, capability};
use dwcp_transport::session::{
    DeltaOptions, KeptSession, MigrationRequest, SendOptions, Source, migration_request_kept,
    query_base, segment_name, send_files_kept,
};
use dwcp_wire::data;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::engine::Destination;

/// How to migrate a QEMU guest.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    /// The VM's name: the destination's QEMU waits at `QEMU_DIR/NAME.incoming`.
    pub vm: String,
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// QEMU's `downtime-limit`.
    pub downtime: Duration,
    /// Let QEMU throttle the guest when rounds stop shrinking (its auto-converge).
    pub auto_converge: bool,
    /// HDE-encode the stream (compression, references to the destination's cache).
    pub delta: bool,
    /// Compressor for HDE literals.
    pub codec: Codec,
    /// Parallel sessions carrying segments (hides each object's round trips).
    pub sessions: u32,
    /// Streams (connections) per session.
    pub streams: u32,
    /// Give up (and roll back) after this long.
    pub timeout: Duration,
}

impl QemuSpec {
    /// Defaults for VM `vm` controlled through `qmp`.
    pub fn new(vm: &str, qmp: PathBuf) -> Self {
        Self {
            vm: vm.to_string(),
            qmp,
            downtime: Duration::from_millis(300),
            auto_converge: true,
            delta: true,
            codec: Codec::Zstd(2),
            sessions: 3,
            streams: 4,
            timeout: Duration::from_secs(600),
        }
    }
}

/// What a QEMU migration did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QemuReport {
    /// Whether the guest now runs (or waits, with `-S`) on the destination.
    pub migrated: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// Seconds from start to the destination's answer (or the end of the rollback).
    pub total_seconds: f64,
    /// Source `STOP` to destination `RESUME`, milliseconds (QEMU's timestamps).
    pub downtime_ms: Option<f64>,
    /// What QEMU itself reports as downtime.
    pub qemu_downtime_ms: Option<f64>,
    /// The destination QEMU's state at the end (`running`, `paused`).
    pub dest_status: String,
    /// Guest RAM.
    pub ram_bytes: u64,
    /// Bytes of QEMU's migration stream.
    pub stream_bytes: u64,
    /// Bytes on the wire (encoded segments).
    pub wire_bytes: u64,
    /// Stream bytes sent as references to the destination's cache.
    pub cache_bytes: u64,
    /// Segments.
    pub segments: u64,
    /// QEMU's dirty-sync count (pre-copy iterations).
    pub rounds: u64,
    /// Highest auto-converge throttle QEMU applied, percent.
    pub throttle: u64,
}

/// Live progress.
#[derive(Debug, Clone, Default)]
pub struct QemuProgress {
    /// `setup`, `active`, `device`, `completed`, ...
    pub phase: String,
    /// QEMU's dirty-sync count.
    pub round: u64,
    /// RAM QEMU still has to send.
    pub remaining: u64,
    /// Guest RAM.
    pub total: u64,
    /// Dirty pages per second (QEMU's figure).
    pub dirty_rate: u64,
    /// Stream bytes so far.
    pub stream_bytes: u64,
    /// Wire bytes so far.
    pub wire_bytes: u64,
    /// Acknowledged goodput, stream bytes per second.
    pub rate: f64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: Option<f64>,
}

/// Why a QEMU migration failed (the source keeps running).
#[derive(Debug, thiserror::Error)]
#[error("QEMU migration of {vm:?} failed in {phase}: {reason}")]
pub struct QemuError {
    /// The VM.
    pub vm: String,
    /// Where.
    pub phase: &'static str,
    /// Why.
    pub reason: String,
    /// What was measured up to then.
    pub report: Box<QemuReport>,
}

/// Bytes read from QEMU and not yet acknowledged by the destination.
#[derive(Debug)]
struct Budget {
    inflight: Mutex<u64>,
    limit: AtomicU64,
    freed: Notify,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
    fn take(&self, n: u64) {
        *self.lock() += n;
    }
    fn free(&self, n: u64) {
        let mut g = self.lock();
        *g = g.saturating_sub(n);
        drop(g);
        self.freed.notify_waiters();
    }
    fn room(&self) -> u64 {
        self.limit().saturating_sub(*self.lock())
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: Vec<u8>,
}

/// Counters shared by the pipeline's tasks.
#[derive(Debug, Default)]
struct Counters {
    stream: AtomicU64,
    acked: AtomicU64,
    wire: AtomicU64,
    cache: AtomicU64,
    failed: AtomicBool,
}

const MIN_BUDGET: u64 = 4 << 20;
const MAX_BUDGET: u64 = 64 << 20;

/// Migrates the QEMU guest behind `spec.qmp` to `dest`. On failure the source QEMU's
/// migration is cancelled and the guest resumed there; the destination drops the stream.
pub async fn migrate_qemu(
    dest: Destination<'_>,
    spec: &QemuSpec,
    progress: &mut (dyn FnMut(&QemuProgress) + Send),
) -> Result<QemuReport, QemuError> {
    let started = Instant::now();
    let mut report = QemuReport::default();
    let fail = |phase: &'static str, reason: String, report: &QemuReport| QemuError {
        vm: spec.vm.clone(),
        phase,
        reason,
        report: Box::new(report.clone()),
    };
    let mut qmp = Qmp::connect(&spec.qmp, Duration::from_secs(10))
        .await
        .map_err(|e| fail("prepare", e.to_string(), &report))?;
    let status = qmp
        .status()
        .await
        .map_err(|e| fail("prepare", e.to_string(), &report))?;
    if status != "running" && status != "paused" {
        return Err(fail(
            "prepare",
            format!("the source QEMU is {status:?}, not running"),
            &report,
        ));
    }
    let was_running = status == "running";

    // Prepare: what the destination's cache holds, and its QEMU waiting for us.
    let remote = if spec.delta {
        match query_base(
            dest.endpoint,
            dest.addr,
            dest.expected,
            &spec.vm,
            0,
            0,
            false,
        )
        .await
        {
            Ok((r, _)) => r,
            Err(e) => return Err(fail("prepare", format!("destination: {e}"), &report)),
        }
    } else {
        None
    };
    let mut control = KeptSession::new();
    let open = MigrationRequest {
        name: &spec.vm,
        op: data::MIGRATION_QEMU_OPEN,
        segments: 0,
        timeout: Duration::from_secs(30),
    };
    migration_request_kept(dest.endpoint, dest.addr, dest.expected, &open, &mut control)
        .await
        .map_err(|e| fail("prepare", format!("destination: {e}"), &report))?;
    let rtt = control
        .round_trip()
        .await
        .unwrap_or(Duration::from_millis(1));

    let result = run(
        dest,
        spec,
        &mut qmp,
        &mut control,
        remote,
        rtt,
        progress,
        &mut report,
    )
    .await;
    report.total_seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            control.close().await;
            report.migrated = true;
            info!(vm = %spec.vm, seconds = report.total_seconds, downtime_ms = ?report.downtime_ms, "QEMU migration done");
            Ok(report)
        }
        Err((phase, reason)) => {
            warn!(vm = %spec.vm, phase, "QEMU migration failed: {reason}; rolling back");
            rollback(dest, spec, &mut qmp, was_running).await;
            let abort = MigrationRequest {
                name: &spec.vm,
                op: data::MIGRATION_QEMU_ABORT,
                segments: 0,
                timeout: Duration::from_secs(10),
            };
            let mut fresh = KeptSession::default();
            if let Err(e) =
                migration_request_kept(dest.endpoint, dest.addr, dest.expected, &abort, &mut fresh)
                    .await
            {
                warn!(vm = %spec.vm, "cannot tell the destination to drop the stream: {e}");
            }
            control.close().await;
            report.total_seconds = started.elapsed().as_secs_f64();
            report.error = Some(reason.clone());
            Err(fail(phase, reason, &report))
        }
    }
}

/// Cancels the source's migration and makes sure the guest runs there again.
async fn rollback(_dest: Destination<'_>, spec: &QemuSpec, qmp: &mut Qmp, was_running: bool) {
    if let Err(e) = qmp.execute("migrate_cancel", None).await {
        warn!(vm = %spec.vm, "migrate_cancel: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match qmp.execute("query-migrate", None).await {
            Ok(v) if matches!(v.get("status").and_then(Value::as_str), Some("cancelling")) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => break,
        }
    }
    if was_running {
        match qmp.status().await {
            Ok(s) if s != "running" => {
                if let Err(e) = qmp.execute("cont", None).await {
                    warn!(vm = %spec.vm, "cannot resume the source guest: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => warn!(vm = %spec.vm, "source QEMU: {e}"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    dest: Destination<'_>,
    spec: &QemuSpec,
    qmp: &mut Qmp,
    control: &mut KeptSession,
    remote: Option<RemoteIndex>,
    rtt: Duration,
    progress: &mut (dyn FnMut(&QemuProgress) + Send),
    report: &mut QemuReport,
) -> Result<(), (&'static str, String)> {
    let tmp = tempfile::Builder::new()
        .prefix("dwcp-qemu-")
        .tempdir()
        .map_err(|e| ("prepare", format!("cannot make a socket directory: {e}")))?;
    let sock_path = tmp.path().join("migrate.sock");
    let listener = UnixListener::bind(&sock_path).map_err(|e| {
        (
            "prepare",
            format!("cannot listen on {}: {e}", sock_path.display()),
        )
    })?;

    let q = |e: dwcp_transport::qmp::QmpError| ("prepare", e.to_string());
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [capability("auto-converge", spec.auto_converge)]})),
    )
    .await
    .map_err(q)?;
    qmp.execute(
        "migrate-set-parameters",
        Some(args(&[
            ("downtime-limit", json!(spec.downtime.as_millis() as u64)),
            // QEMU's default cap is 128 MiB/s; the tunnel's backpressure is the limit here.
            ("max-bandwidth", json!(100u64 << 30)),
        ])),
    )
    .await
    .map_err(q)?;
    // Drop events from before the migration (a STOP of an earlier pause must not count).
    let _ = qmp.poll_events(Duration::from_millis(1)).await;
    while qmp.take_event("STOP").is_some() {}
    qmp.execute(
        "migrate",
        Some(args(&[(
            "uri",
            json!(format!("unix:{}", sock_path.display())),
        )])),
    )
    .await
    .map_err(|e| ("start", e.to_string()))?;
    let (sock, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| {
            (
                "start",
                "QEMU did not connect to the tunnel within 10 s".to_string(),
            )
        })?
        .map_err(|e| ("start", format!("accept: {e}")))?;

    let budget = Arc::new(Budget {
        inflight: Mutex::new(0),
        limit: AtomicU64::new(8 << 20),
        freed: Notify::new(),
    });
    let counters = Arc::new(Counters::default());
    let sessions = spec.sessions.max(1);
    let (tx, rx) = mpsc::channel::<Segment>(1);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let remote = Arc::new(remote);
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..sessions {
        senders.spawn(sender(
            i,
            dest.endpoint.clone(),
            dest.addr,
            dest.expected.cloned(),
            spec.clone(),
            rx.clone(),
            remote.clone(),
            budget.clone(),
            counters.clone(),
        ));
    }
    let mut reader = tokio::spawn(read_segments(
        sock,
        tx,
        budget.clone(),
        counters.clone(),
        sessions as u64,
    ));

    // Watch: QEMU's progress, the budget, failures. Bounded by spec.timeout.
    let deadline = Instant::now() + spec.timeout;
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0f64;
    let mut segments = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            r = &mut reader, if segments.is_none() => {
                match r {
                    Ok(Ok(n)) => segments = Some(n),
                    Ok(Err(e)) => return Err(("transfer", e)),
                    Err(e) => return Err(("transfer", format!("reader task: {e}"))),
                }
            }
            s = senders.join_next(), if !senders.is_empty() => {
                match s {
                    Some(Ok(Ok(()))) | None => {}
                    Some(Ok(Err(e))) => return Err(("transfer", e)),
                    Some(Err(e)) => return Err(("transfer", format!("sender task: {e}"))),
                }
            }
            _ = tick.tick() => {
                if Instant::now() > deadline {
                    return Err(("transfer", format!("not done within {:?}", spec.timeout)));
                }
                let acked = counters.acked.load(Ordering::Relaxed);
                let dt = last.0.elapsed().as_secs_f64();
                if dt > 0.0 {
                    let r = (acked - last.1) as f64 / dt;
                    rate = if rate == 0.0 { r } else { 0.7 * rate + 0.3 * r };
                    last = (Instant::now(), acked);
                    // About four round trips (and 50 ms) of goodput may wait in the tunnel.
                    let want = (rate * (4.0 * rtt.as_secs_f64() + 0.05)) as u64;
                    budget.limit.store(want.clamp(MIN_BUDGET, MAX_BUDGET), Ordering::Relaxed);
                    budget.freed.notify_waiters();
                }
                let info = qmp.execute("query-migrate", None).await.unwrap_or(Value::Null);
                let ram = info.get("ram");
                let n = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_u64).unwrap_or(0);
                let p = QemuProgress {
                    phase: info.get("status").and_then(Value::as_str).unwrap_or("").to_string(),
                    round: n(ram, "dirty-sync-count"),
                    remaining: n(ram, "remaining"),
                    total: n(ram, "total"),
                    dirty_rate: n(ram, "dirty-pages-rate"),
                    stream_bytes: counters.stream.load(Ordering::Relaxed),
                    wire_bytes: counters.wire.load(Ordering::Relaxed),
                    rate,
                    expected_downtime_ms: info.get("expected-downtime").and_then(Value::as_f64),
                };
                if p.phase == "failed" {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(("transfer", format!("the source QEMU failed the migration: {why}")));
                }
                report.throttle = report.throttle.max(info.get("cpu-throttle-percentage").and_then(Value::as_u64).unwrap_or(0));
                progress(&p);
            }
        }
        if segments.is_some() && senders.is_empty() {
            break;
        }
    }
    let segments = segments.unwrap_or(0);
    report.segments = segments;
    report.stream_bytes = counters.stream.load(Ordering::Relaxed);
    report.wire_bytes = counters.wire.load(Ordering::Relaxed);
    report.cache_bytes = counters.cache.load(Ordering::Relaxed);

    // Every segment is stored at the destination: let it finish feeding and load.
    let finish = MigrationRequest {
        name: &spec.vm,
        op: data::MIGRATION_QEMU_FINISH,
        segments,
        timeout: Duration::from_secs(180),
    };
    let detail = migration_request_kept(dest.endpoint, dest.addr, dest.expected, &finish, control)
        .await
        .map_err(|e| ("resume", format!("destination: {e}")))?;
    let detail: Value = serde_json::from_str(&detail).unwrap_or(Value::Null);
    report.dest_status = detail
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let resumed = detail
        .get("resumed_unix_us")
        .and_then(Value::as_u64)
        .map(|us| UNIX_EPOCH + Duration::from_micros(us));

    // The source: completed, paused for good.
    let t = Instant::now();
    let info = loop {
        let info = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| ("cleanup", e.to_string()))?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err((
                    "cleanup",
                    format!("the source QEMU says the migration {info}"),
                ));
            }
            _ if t.elapsed() > Duration::from_secs(30) => {
                return Err(("cleanup", "the source QEMU did not complete".into()));
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let stop = qmp
        .wait_event("STOP", Duration::from_secs(2))
        .await
        .ok()
        .map(|e| e.at);
    let ram = info.get("ram");
    report.ram_bytes = ram
        .and_then(|r| r.get("total"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    report.rounds = ram
        .and_then(|r| r.get("dirty-sync-count"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    report.qemu_downtime_ms = info.get("downtime").and_then(Value::as_f64);
    report.downtime_ms = match (stop, resumed) {
        (Some(s), Some(r)) => Some(
            r.duration_since(s)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        ),
        _ => None,
    };
    debug!(?stop, ?resumed, "QEMU migration timestamps");
    Ok(())
}

/// Reads QEMU's stream into segments while the budget allows; returns the segment count.
async fn read_segments(
    mut sock: UnixStream,
    tx: mpsc::Sender<Segment>,
    budget: Arc<Budget>,
    counters: Arc<Counters>,
    sessions: u64,
) -> Result<u64, String> {
    // A segment closes when full, when QEMU pauses writing (5 ms), or 50 ms after it began.
    const IDLE: Duration = Duration::from_millis(5);
    const SPAN: Duration = Duration::from_millis(50);
    const SILENCE: Duration = Duration::from_secs(120);
    let mut seq = 0u64;
    loop {
        // Wait for room (each sender may hold one segment, plus one being read).
        loop {
            if counters.failed.load(Ordering::Relaxed) {
                return Err("a sender failed".into());
            }
            let notified = budget.freed.notified();
            if budget.room() > 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
        let max = (budget.limit() / (sessions + 1)).clamp(256 << 10, 8 << 20) as usize;
        let want = max.min(budget.room().max(64 << 10) as usize);
        let mut buf = Vec::with_capacity(want);
        let began = Instant::now();
        let mut eof = false;
        while buf.len() < want {
            let wait = if buf.is_empty() {
                SILENCE
            } else {
                IDLE.min(SPAN.saturating_sub(began.elapsed()))
            };
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, sock.read_buf(&mut buf)).await {
                Err(_) if buf.is_empty() => {
                    return Err(format!("QEMU sent nothing for {SILENCE:?}"));
                }
                Err(_) => break,
                Ok(Ok(0)) => {
                    eof = true;
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("reading QEMU's stream: {e}")),
            }
        }
        if !buf.is_empty() {
            budget.take(buf.len() as u64);
            counters
                .stream
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            tx.send(Segment { seq, bytes: buf })
                .await
                .map_err(|_| "the senders stopped".to_string())?;
            seq += 1;
        }
        if eof {
            return Ok(seq);
        }
    }
}

/// Takes segments off the queue and sends each as an object over this task's own session.
#[allow(clippy::too_many_arguments)]
async fn sender(
    index: u32,
    endpoint: dwcp_transport::Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<dwcp_wire::NodeId>,
    spec: QemuSpec,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Segment>>>,
    remote: Arc<Option<RemoteIndex>>,
    budget: Arc<Budget>,
    counters: Arc<Counters>,
) -> Result<(), String> {
    let mut kept = KeptSession::new();
    let opts = SendOptions {
        streams: spec.streams,
        retry_for: Duration::from_secs(30),
        delta: DeltaOptions {
            enabled: false,
            ..DeltaOptions::default()
        },
        ..SendOptions::default()
    };
    let r = async {
        loop {
            let seg = { rx.lock().await.recv().await };
            let Some(seg) = seg else {
                return Ok(());
            };
            let raw_len = seg.bytes.len() as u64;
            let use_hde = spec.delta && remote.is_some();
            let codec = spec.codec;
            let rm = remote.clone();
            let (file, pre, wire, cache) = tokio::task::spawn_blocking(move || {
                encode_segment(&seg.bytes, use_hde, codec, rm.as_ref().as_ref())
            })
            .await
            .map_err(|e| format!("encoder task: {e}"))??;
            let src = Source {
                path: file.path().to_path_buf(),
                name: segment_name(&spec.vm, seg.seq),
                size: wire,
                version_tag: format!("qemu-segment {}", seg.seq),
                pre_encoded: pre,
            };
            send_files_kept(
                &endpoint,
                addr,
                expected.as_ref(),
                &[src],
                &opts,
                &mut |_| {},
                &mut kept,
            )
            .await
            .map_err(|e| format!("segment {} (session {index}): {e}", seg.seq))?;
            counters.wire.fetch_add(wire, Ordering::Relaxed);
            counters.cache.fetch_add(cache, Ordering::Relaxed);
            counters.acked.fetch_add(raw_len, Ordering::Relaxed);
            budget.free(raw_len);
        }
    }
    .await;
    if r.is_err() {
        counters.failed.store(true, Ordering::Relaxed);
        budget.freed.notify_waiters();
    }
    kept.close().await;
    r
}

type EncodedSegment = (
    tempfile::NamedTempFile,
    Option<(u32, u64, Vec<u8>)>,
    u64,
    u64,
);

/// One segment as an object file: HDE stream-encoded against the destination's cache, or raw.
fn encode_segment(
    bytes: &[u8],
    hde: bool,
    codec: Codec,
    remote: Option<&RemoteIndex>,
) -> Result<EncodedSegment, String> {
    use std::io::Write;
    let mut file = tempfile::Builder::new()
        .prefix(".dwcp-qemu-seg-")
        .tempfile()
        .map_err(|e| format!("cannot make a segment file: {e}"))?;
    let (out, pre, cache) = if hde {
        let cfg = StreamConfig {
            codec,
            ..StreamConfig::default()
        };
        let mut enc = StreamEncoder::new(cfg).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(bytes.len() / 2 + 1024);
        enc.push(bytes, remote, &mut out);
        let stats = enc.finish(remote, &mut out);
        let digest = blake3::hash(bytes);
        (
            out,
            Some((
                data::ENCODING_HDE_STREAM,
                bytes.len() as u64,
                digest.as_bytes().to_vec(),
            )),
            stats.cache_bytes,
        )
    } else {
        (bytes.to_vec(), None, 0)
    };
    file.write_all(&out)
        .map_err(|e| format!("cannot write a segment file: {e}"))?;
    Ok((file, pre, out.len() as u64, cache))
}
