//! The QEMU backend: live-migrates a running QEMU to a destination node, carrying QEMU's own
//! migration stream through DWCP (a tunnel of HDE-encoded blocks over one session, decoded
//! against the destination's baseline cache). QEMU's protocol stays the judge of correctness:
//! the source QEMU writes its stream to a local socket of ours, the destination agent feeds it
//! to a QEMU waiting with `-incoming` (see `dwcp_transport::session::qemu_feed`).
//!
//! ```text
//!  QEMU ──unix──> reader ──segments──> encoders (2) ──blocks──> tunnel (N connections) ──> agent ──unix──> QEMU
//!                   ^                                              │
//!                   └────────────── window <──── TUNNEL_ACK ───────┘
//! ```
//!
//! QEMU decides when to stop the guest from the bandwidth it sees on its socket, so the
//! tunnel must not hide a backlog: the reader takes bytes from QEMU only while the bytes read
//! and not yet acknowledged by the destination stay within a window (in stream and in wire
//! bytes, 4–64 MiB; large during QEMU's first pass, the downtime budget's worth afterwards:
//! see `limits`), and QEMU's downtime limit is lowered by what that backlog takes to drain.
//! Downtime is measured end to end, from the source's `STOP` event to the destination's
//! `RESUME` (both QEMU timestamps), besides what QEMU reports.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use dwcp_encoding::stream::{StreamConfig, StreamEncoder};
use dwcp_encoding::{Codec, RemoteIndex};
use dwcp_transport::qmp::{Qmp, QmpError, QmpEvent, capability};
use dwcp_transport::session::adapt::Mode;
use dwcp_transport::session::{
    Block, KeptSession, MigrationRequest, RateLimit, SendError, Tunnel, migration_request_data,
    migration_request_kept, query_base,
};
use dwcp_wire::{ErrorCode, data};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::engine::Destination;
use crate::qemu_converge::{GiveUp, Watch};
use crate::qemu_throttle::{Own, Pacer, Steps};

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
    /// Choose auto-converge's steps from the dirty rate and the stream rate QEMU measured
    /// ([`crate::qemu_throttle`]), never below QEMU's `cpu-throttle-initial` and
    /// `-increment` as they are set (put back afterwards). False: QEMU's own steps.
    pub paced_throttle: bool,
    /// HDE-encode the stream (compression, references to the destination's cache).
    pub delta: bool,
    /// Compressor for HDE literals.
    pub codec: Codec,
    /// The compressor instead when the round trip shows a datacenter path (under 10 ms):
    /// there the CPU, not the link, is the limit.
    pub short_path_codec: Option<Codec>,
    /// Connections carrying the stream.
    pub streams: u32,
    /// Give up (and roll back) after this long.
    pub timeout: Duration,
    /// When a migration that cannot converge (auto-converge off or out of steps, rounds that
    /// do not shrink) is given up and rolled back.
    pub give_up: GiveUp,
    /// A cap on the tunnel's sending rate (wire bytes a second; shared with whatever else
    /// holds a clone of it). QEMU's own cap is lifted either way: the tunnel's window holds
    /// QEMU to what the tunnel sends.
    pub rate_limit: Option<RateLimit>,
    /// Stops the migration from outside (the user interrupted it, say) while that is safe.
    pub cancel: Cancel,
    /// Escalate to QEMU's post-copy where a migration would otherwise be given up (auto-converge
    /// out of steps, rounds that do not shrink): the guest then runs at the destination while
    /// the rest of its memory follows, fetched first where it faults. Needs both QEMUs to
    /// take `postcopy-ram` (the destination's needs `userfaultfd`). Once it began there is no
    /// way back: should the link or the destination fail then, neither side holds the whole
    /// guest, and QEMU keeps both paused for `migrate-recover`.
    pub postcopy: bool,
    /// How long the tunnel keeps dialling the destination once every one of its connections
    /// is lost (a link down, a path rerouted), its blocks waiting meanwhile; and how long the
    /// return path goes unanswered before it fails. Longer than that, the migration rolls
    /// back, or, in post-copy, fails with the guest split between the hosts.
    pub retry_for: Duration,
}

/// Stops a QEMU migration from outside, and says whether it still can: until the whole
/// stream is queued and the finish goes to the destination, the migration stops and rolls
/// back; from then on the destination may be loading the guest, and its answer is awaited.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    stage: std::sync::Mutex<CancelStage>,
    token: CancellationToken,
    /// The source QEMU has written its whole stream: it completed its side, and the guest
    /// stays paused there unless a rollback resumes it.
    source_done: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CancelStage {
    #[default]
    Running,
    Cancelled,
    Finishing,
}

impl Cancel {
    fn stage(&self) -> std::sync::MutexGuard<'_, CancelStage> {
        // The stage is a plain value: a panic elsewhere cannot leave it half-written.
        self.0.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the migration to stop and roll back. False when it is too late: the destination
    /// may be loading the guest, and the migration goes on to its end.
    pub fn cancel(&self) -> bool {
        let mut stage = self.stage();
        match *stage {
            CancelStage::Running => {
                *stage = CancelStage::Cancelled;
                self.0.token.cancel();
                true
            }
            CancelStage::Cancelled => true,
            CancelStage::Finishing => false,
        }
    }

    /// Whether [`Cancel::cancel`] was called in time.
    pub fn is_cancelled(&self) -> bool {
        *self.stage() == CancelStage::Cancelled
    }

    /// Whether it is too late to cancel (the finish went to the destination).
    pub fn is_finishing(&self) -> bool {
        *self.stage() == CancelStage::Finishing
    }

    /// Whether the source QEMU has written its whole stream: were the migration given up
    /// without a rollback now, the guest would stay paused at the source.
    pub fn source_done(&self) -> bool {
        self.0.source_done.load(Ordering::SeqCst)
    }

    async fn cancelled(&self) {
        self.0.token.cancelled().await;
    }

    fn set_source_done(&self) {
        self.0.source_done.store(true, Ordering::SeqCst);
    }

    /// The point of no return, passed unless cancelled first.
    fn finish(&self) -> bool {
        let mut stage = self.stage();
        if *stage == CancelStage::Cancelled {
            return false;
        }
        *stage = CancelStage::Finishing;
        true
    }
}

impl QemuSpec {
    /// Defaults for VM `vm` controlled through `qmp`.
    pub fn new(vm: &str, qmp: PathBuf) -> Self {
        Self {
            vm: vm.to_string(),
            qmp,
            downtime: Duration::from_millis(300),
            auto_converge: true,
            paced_throttle: true,
            delta: true,
            codec: Codec::Zstd(2),
            short_path_codec: None,
            streams: 4,
            timeout: Duration::from_secs(600),
            rate_limit: None,
            give_up: GiveUp::default(),
            cancel: Cancel::default(),
            postcopy: false,
            retry_for: Duration::from_secs(60),
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
    /// The compressor the stream was encoded with.
    pub codec: String,
    /// The source QEMU: version and accelerator (`QEMU 7.2.22, TCG`), when it said.
    pub source_qemu: String,
    /// What the user should know about this migration whatever its result.
    pub warnings: Vec<String>,
    /// What TCP counted under the tunnel, by the kernel (`TCP_INFO`): its own
    /// retransmissions, segments and bytes.
    pub tcp: Option<dwcp_transport::session::TcpCounts>,
    /// Tunnel connections opened in place of lost ones (a link that went down and came back).
    pub tunnel_reconnects: u32,
    /// The migration went to post-copy: the guest ran at the destination before all its
    /// memory had arrived.
    pub postcopy: bool,
    /// Pages the destination asked for out of turn in post-copy (QEMU's count).
    pub postcopy_requests: u64,
    /// Seconds from the request for post-copy (the switch-over included) to the destination's
    /// answer that it has loaded all: about how long the guest ran there with pages to come.
    pub postcopy_seconds: Option<f64>,
    /// This run resumed a post-copy that an earlier one left paused (its stream broke: the
    /// link went down for longer than it retried, or its process died): the figures are this
    /// run's, the pages still at the source.
    pub recovered: bool,
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
    /// Wire bytes acknowledged so far.
    pub wire_bytes: u64,
    /// Acknowledged goodput, stream bytes per second.
    pub rate: f64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: Option<f64>,
    /// Auto-converge's throttle in force, percent (0: none).
    pub throttle: u64,
    /// Rounds in a row that did not shrink with auto-converge out of steps: at
    /// [`QemuSpec::give_up`]'s count (and time) the migration is rolled back, or with
    /// `postcopy` at [`GiveUp::for_postcopy`]'s it moves by post-copy.
    pub stalled_rounds: u32,
    /// Both sides took post-copy: the way out where it would be given up.
    pub postcopy: bool,
    /// Every connection to the destination lost this long ago: the tunnel dials again
    /// (for [`QemuSpec::retry_for`]).
    pub link_down: Option<Duration>,
}

/// Why a QEMU migration failed.
#[derive(Debug, thiserror::Error)]
#[error("QEMU migration of {vm:?} failed in {phase}: {reason}")]
pub struct QemuError {
    /// The VM.
    pub vm: String,
    /// Where.
    pub phase: &'static str,
    /// Why.
    pub reason: String,
    /// The source guest is as it was before (running again, or paused if it was, or never
    /// touched). False when it was left paused because the guest may run at the destination
    /// (see [`UNKNOWN`]), or when it could not be resumed.
    pub source_as_before: bool,
    /// What was measured up to then.
    pub report: Box<QemuReport>,
}

/// The window: bytes read from QEMU and not yet acknowledged by the destination, counted
/// twice: as stream bytes, and as the bytes they take on the wire (what is not encoded yet
/// counts whole).
#[derive(Debug)]
struct Budget {
    /// Bytes read from QEMU (the stream so far).
    read: AtomicU64,
    /// Of those, acknowledged by the destination.
    acked: AtomicU64,
    /// Acknowledged together with every byte before them (see [`GAP_LIMIT`]).
    in_order: AtomicU64,
    /// Stream bytes of the blocks handed to the tunnel, and their size on the wire.
    forwarded: AtomicU64,
    forwarded_wire: AtomicU64,
    /// Wire bytes of the blocks acknowledged.
    wire_acked: AtomicU64,
    /// The window during QEMU's first pass, and once it may stop the guest (see [`limits`]).
    limits: std::sync::Mutex<(Limits, Limits)>,
    /// The late window applies (never unset).
    late: AtomicBool,
    /// QEMU paused the guest: no window but [`GAP_LIMIT`] (see [`Budget::set_paused`]).
    paused: AtomicBool,
    /// Post-copy began: the window stays although the source guest is paused.
    postcopy: AtomicBool,
    /// At most [`HOLD_WINDOW`] is in the tunnel: it drains before post-copy begins, and stays
    /// that low until QEMU stops the guest (the STOP hook unsets it).
    hold: AtomicBool,
    /// Guest RAM, bytes (0 until known): with the furthest place in QEMU's first pass the
    /// reader has seen, it tells when that pass is about to end.
    ram: AtomicU64,
    /// Furthest place in the first pass the reader has taken (RAM before the page, across
    /// all blocks: see [`crate::qemu_stream::FirstPass`]), and the stream bytes read since it
    /// moved (see [`Budget::saw_offset`]).
    offset: AtomicU64,
    unseen: AtomicU64,
    freed: Notify,
    /// Largest segment read from QEMU now (see [`BLOCK`] and [`LATE_BLOCK`]).
    block: AtomicUsize,
}

impl Budget {
    fn new() -> Self {
        const START: Limits = Limits {
            stream: START_WINDOW,
            wire: START_WINDOW,
        };
        Self {
            read: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            in_order: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            forwarded_wire: AtomicU64::new(0),
            wire_acked: AtomicU64::new(0),
            limits: std::sync::Mutex::new((START, START)),
            late: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            postcopy: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            ram: AtomicU64::new(0),
            offset: AtomicU64::new(0),
            unseen: AtomicU64::new(0),
            freed: Notify::new(),
            block: AtomicUsize::new(BLOCK),
        }
    }
    /// The window that applies now.
    fn limits(&self) -> Limits {
        let (first, late) = *self
            .limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.late.load(Ordering::Relaxed) {
            late
        } else {
            first
        }
    }
    fn set_limits(&self, first: Limits, late: Limits) {
        *self
            .limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (first, late);
        self.freed.notify_waiters();
    }
    fn set_late(&self) {
        if !self.late.swap(true, Ordering::Relaxed) {
            debug!(
                read_mb = self.read() as f64 / 1e6,
                place_mb = self.offset.load(Ordering::Relaxed) as f64 / 1e6,
                ram_mb = self.ram.load(Ordering::Relaxed) as f64 / 1e6,
                "late window applies"
            );
        }
    }
    fn is_late(&self) -> bool {
        self.late.load(Ordering::Relaxed)
    }
    /// QEMU paused the guest for its final round: the window bounded the backlog so that
    /// QEMU would not stop the guest with too much still to drain, and it has stopped it now.
    /// What it writes from here on (the rest of the dirty pages, the device state) waits
    /// for nothing but the destination's room beyond a gap: behind the window it would enter
    /// the tunnel only as acknowledgements free it, a round trip or more later, on a path
    /// the window kept below its rate.
    /// (Unset when QEMU's guest runs again: a pause that was not the final round's, an
    /// operator's `stop` and `cont`, say.)
    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
        if paused {
            self.freed.notify_waiters();
        }
    }
    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
    /// The reader saw a page this far into QEMU's first pass over RAM (`offset`: the RAM
    /// before it, in all blocks), in a segment of `len` bytes: when the first pass is about
    /// to end, the late window applies from now on, before QEMU can finish the pass (an
    /// untouched tail of zero pages goes by in a few milliseconds). "About to end": within
    /// [`FIRST_PASS_ENDING`] of the end of RAM, or within what QEMU may have written ahead of
    /// the reader (its socket buffer and a segment, [`LOOKAHEAD`]) at the RAM per stream byte
    /// seen lately (over zero pages, 4 KiB per 9 bytes). The first pass goes up block by
    /// block, each in address order, and the stream holds at most one page per 9 bytes: an offset
    /// further ahead than the bytes read since the last one can reach is guest data that looks
    /// like a record, and is not taken.
    fn saw_offset(&self, offset: u64, len: usize) {
        let seen = self.offset.load(Ordering::Relaxed);
        let bytes = self.unseen.load(Ordering::Relaxed) + len as u64;
        let reach = (bytes / 9 + 1) * crate::qemu_stream::PAGE as u64;
        if offset <= seen || offset > seen.saturating_add(reach) {
            self.unseen.store(bytes, Ordering::Relaxed);
            return;
        }
        self.offset.store(offset, Ordering::Relaxed);
        self.unseen.store(0, Ordering::Relaxed);
        let per_byte = (offset - seen) / bytes.max(1);
        let margin = FIRST_PASS_ENDING.max(per_byte.saturating_mul(LOOKAHEAD));
        let ram = self.ram.load(Ordering::Relaxed);
        if ram > 0 && offset.saturating_add(margin) >= ram {
            self.set_late();
        }
    }
    fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    fn take(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }
    /// A block of `stream` bytes, `wire` on the wire, goes into the tunnel.
    fn forward(&self, stream: u64, wire: u64) {
        self.forwarded_wire.fetch_add(wire, Ordering::Relaxed);
        self.forwarded.fetch_add(stream, Ordering::Relaxed);
    }
    fn set_acked(&self, acked: u64, wire_acked: u64, in_order: u64) {
        self.wire_acked.store(wire_acked, Ordering::Relaxed);
        self.in_order.store(in_order, Ordering::Relaxed);
        if self.acked.swap(acked, Ordering::Relaxed) != acked {
            self.freed.notify_waiters();
        }
    }
    /// Read and not acknowledged.
    fn inflight(&self) -> u64 {
        self.read()
            .saturating_sub(self.acked.load(Ordering::Relaxed))
    }
    /// What is read and not acknowledged takes this much on the wire: the blocks in the
    /// tunnel at their encoded size (the size they were queued with, also when one goes again
    /// raw), what is still being encoded at its full size.
    fn wire_inflight(&self) -> u64 {
        let forwarded = self.forwarded.load(Ordering::Relaxed);
        let in_tunnel = self
            .forwarded_wire
            .load(Ordering::Relaxed)
            .saturating_sub(self.wire_acked.load(Ordering::Relaxed));
        in_tunnel + self.read().saturating_sub(forwarded)
    }
    fn room(&self) -> u64 {
        if self.hold.load(Ordering::Relaxed) {
            return HOLD_WINDOW.saturating_sub(self.inflight());
        }
        let l = self.limits();
        let beyond_gap = self
            .read()
            .saturating_sub(self.in_order.load(Ordering::Relaxed));
        let gap_room = GAP_LIMIT.saturating_sub(beyond_gap);
        // In post-copy the guest runs at the destination, and a page it asks for goes behind
        // whatever waits in the tunnel: the window bounds that wait.
        if self.is_paused() && !self.postcopy.load(Ordering::Relaxed) {
            return gap_room;
        }
        l.stream
            .saturating_sub(self.inflight())
            .min(l.wire.saturating_sub(self.wire_inflight()))
            .min(gap_room)
    }
    fn block(&self) -> usize {
        self.block.load(Ordering::Relaxed)
    }
}

/// Most the window may hold, in stream bytes and in wire bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    stream: u64,
    wire: u64,
}

/// Bytes acknowledged a second: smoothed, and the most seen lately.
///
/// The smoothed rate is what the window lets through, so a window sized from it alone can
/// only shrink: a rate held down by the window (or by a moment without data) makes the next
/// window smaller still. The peak is what the path and the destination have shown they
/// take. It decays by half in 30 s, should the path slow down for good: a migration's late
/// phase may come 10 s after its fastest part (a warm first pass by reference), and with a
/// 7 s half-life the late window was back at its floor by then (`internet`, 2026-12-04).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Rate {
    now: f64,
    peak: f64,
}

impl Rate {
    /// A sample `r` over the last `dt` seconds (about 0.2 s; longer while QEMU's monitor
    /// keeps the loop waiting). The peak decays with time, not with samples.
    fn sample(&mut self, r: f64, dt: f64) {
        self.now = if self.now == 0.0 {
            r
        } else {
            0.6 * self.now + 0.4 * r
        };
        self.peak = (self.peak * 0.5f64.powf(dt / PEAK_HALF_LIFE)).max(self.now);
    }
}

/// The window for where the migration is. `late`: QEMU may stop the guest at the end of any
/// iteration now (it iterates over dirty pages, or its first pass is about to end), or the
/// path is short. `drain`: stream bytes a second the destination takes, as far as known (see
/// [`stream_drain`]); `wire`: wire bytes acknowledged a second (zero until measured).
/// `allow`: how long the backlog may take to drain once QEMU stops.
///
/// During QEMU's first pass over RAM (not `late`) the guest is not stopped, so a backlog
/// costs no pause: the window is large in stream bytes, and pages the destination holds (sent
/// by reference) go through as fast as it lets them; in wire bytes it is half a second of
/// the best goodput seen lately, so that a pass that ends sooner than expected (an idle guest
/// stops at once, and the late window was not applied in time: see `Budget::saw_offset`)
/// leaves little to drain. (A floor of 16 MiB was tried: a warm first pass sends its first
/// hundreds of MB by reference at 3 MB/s of wire, and half a second of that holds the new
/// pages after them to 9-18 MB/s of a 25 MB/s link at first. But a missed late switch would
/// then leave 16 MiB to drain in the pause, 1.3 s on `lossy`, and with the 30 s half-life of
/// [`Rate`] the floor gained nothing on `internet`: cold, seeded and warm within 2 % over
/// three runs each; 2026-12-04.)
///
/// Afterwards whatever waits in the tunnel adds to the pause: it must drain within `allow`
/// on the wire at the wire rate (pages dirtied late are mostly new), and in stream bytes at
/// `drain`. Neither window is below 4 MiB (on a lossy path a smaller one starves the stream,
/// and the guest would then need throttling to converge at all).
fn limits(late: bool, drain: f64, wire: Rate, allow: Duration) -> Limits {
    let of = |rate: f64, time: f64| {
        if rate > 0.0 {
            ((rate * time) as u64).clamp(LATE_WINDOW, FIRST_PASS_WINDOW)
        } else {
            START_WINDOW
        }
    };
    if late {
        Limits {
            stream: of(drain, allow.as_secs_f64()),
            wire: of(wire.now, allow.as_secs_f64()),
        }
    } else {
        Limits {
            stream: FIRST_PASS_WINDOW,
            wire: of(wire.peak, FIRST_PASS_DRAIN.as_secs_f64()),
        }
    }
}

/// How fast a backlog of stream bytes drains at the destination (decoded, handed to its
/// QEMU), from the stream rate. Across a long path, the best seen lately: the current rate is
/// what the window lets through, and sized from it the late stream window sat at its 4 MiB
/// floor with the wire half used (`internet`, 2026-12-04: dirty rounds at 13 MB/s of wire on
/// a 25 MB/s link). On a short path the window does not hold the stream back (the CPUs do),
/// so the current rate is what drains; the peak there, seen while pages went by reference,
/// let a warm migration pause longer (`dc`: 208-309 ms against 136-254 ms).
fn stream_drain(rate: Rate, short_path: bool) -> f64 {
    if short_path { rate.now } else { rate.peak }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    bytes: Vec<u8>,
}

/// The phase of a failure after which the guest may run at the destination: the source is
/// not resumed (that could run it twice).
pub const UNKNOWN: &str = "resume (outcome unknown)";

/// The phase of a failure after post-copy began: the guest ran at the destination, which
/// holds its newest state, while pages were still at the source. Neither side is rolled back
/// nor dropped: QEMU keeps them for `migrate-recover` (`postcopy-paused`).
pub const POSTCOPY: &str = "post-copy (the guest's memory is split between the hosts)";

/// The phase of a failure that leaves the source QEMU in a post-copy it cannot pause for a
/// resume (`postcopy-active` with its stream gone, or `postcopy-recover` whose stream broke:
/// QEMU before 8.2). The guest runs at the destination; running `dwcp migrate` again does not
/// help.
pub const STUCK: &str = "post-copy (the source QEMU cannot pause it for a resume)";

/// The reason of a migration stopped through [`QemuSpec::cancel`].
pub const CANCELLED: &str = "cancelled (interrupted)";
/// The phase after the destination loaded the guest: the source's migration must complete.
const CLEANUP: &str = "cleanup";

/// Most stream bytes read beyond the acknowledged prefix, whatever the window: blocks
/// acknowledged after a gap wait at the destination for the block still on its way, and it
/// holds at most 256 MiB of them (`qemu_feed`). The window counts every acknowledgement, so
/// that one block in a loss recovery does not stall the stream; the tunnel sends a stuck
/// block again on another connection.
const GAP_LIMIT: u64 = 128 << 20;

/// How often the transfer loop reads QEMU's events at most (for STOP).
const EVENT_POLL: Duration = Duration::from_millis(5);

/// Largest block of the stream during QEMU's first pass over RAM.
const BLOCK: usize = 256 << 10;
/// Largest block afterwards, across a long path. The window is small then (it bounds the
/// pause), and a block is acknowledged only once TCP has recovered every packet of it that
/// was lost: smaller blocks free the window sooner (on `internet`, 15 -> 17-22 MB/s of dirty
/// pages through a 4 MiB window).
const LATE_BLOCK: usize = 64 << 10;
/// Smallest window (see [`limits`]).
const LATE_WINDOW: u64 = 4 << 20;
/// Largest window, and the window in stream bytes during QEMU's first pass over RAM.
const FIRST_PASS_WINDOW: u64 = 64 << 20;
/// The window in wire bytes during the first pass: this long at the best wire rate seen lately.
const FIRST_PASS_DRAIN: Duration = Duration::from_millis(500);
/// QEMU's first pass counts as ending (the window as late) once this much RAM is left. The
/// reader sees it in the stream as it reads (and stops reading until the backlog is within
/// the late window), so a little ahead of the end is enough.
const FIRST_PASS_ENDING: u64 = 32 << 20;
/// Stream bytes QEMU may have written past what the reader has seen: its socket's buffer
/// (about 208 KiB by default) and the segment being read.
const LOOKAHEAD: u64 = 512 << 10;
/// The window until a rate is measured.
const START_WINDOW: u64 = 16 << 20;
/// Seconds in which the best rate seen halves (see [`Rate`]).
const PEAK_HALF_LIFE: f64 = 30.0;

/// Migrates the QEMU guest behind `spec.qmp` to `dest`. On failure the source QEMU's
/// migration is cancelled and the guest resumed there; the destination drops the stream.
pub async fn migrate_qemu(
    dest: Destination<'_>,
    spec: &QemuSpec,
    progress: &mut (dyn FnMut(&QemuProgress) + Send),
) -> Result<QemuReport, QemuError> {
    // On the heap: the migration's state machine is large (tens of KiB unoptimised), and a
    // caller holding a few of them on a thread's stack overflowed it in a debug build.
    Box::pin(migrate_qemu_inner(dest, spec, progress)).await
}

async fn migrate_qemu_inner(
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
        source_as_before: true,
        report: Box::new(report.clone()),
    };
    if spec.cancel.is_cancelled() {
        return Err(fail("prepare", CANCELLED.to_string(), &report));
    }
    let mut qmp = Qmp::connect(&spec.qmp, Duration::from_secs(10))
        .await
        .map_err(|e| fail("prepare", e.to_string(), &report))?;
    let migration = qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| fail("prepare", e.to_string(), &report))?;
    match migration.get("status").and_then(Value::as_str) {
        // A post-copy an earlier run left paused (its stream broke): resumed, not started.
        Some("postcopy-paused") => {
            return Box::pin(recover(dest, spec, qmp, progress, started, report)).await;
        }
        None | Some("none" | "completed" | "failed" | "cancelled") => {}
        Some(other) if other.starts_with("postcopy") => {
            // The guest runs at the destination: nothing at the source is as it was.
            let mut e = fail(
                STUCK,
                format!(
                    "the source QEMU is in post-copy already ({other:?}): another `dwcp \
                     migrate` runs it, or its stream broke where QEMU before 8.2 cannot pause \
                     it (after its last page was written, or during a resume)"
                ),
                &report,
            );
            e.source_as_before = false;
            return Err(e);
        }
        Some(other) => {
            return Err(fail(
                "prepare",
                format!("the source QEMU is migrating already (its migration is {other:?})"),
                &report,
            ));
        }
    }
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
    let source_postcopy = spec.postcopy && source_takes_postcopy(&mut qmp, &mut report).await;
    let (source_qemu, warning) = source_qemu(&mut qmp).await;
    report.source_qemu = source_qemu;
    if let Some(w) = warning {
        warn!(vm = %spec.vm, "{w}");
        report.warnings.push(w);
    }

    // Prepare: what the destination's cache holds, and its QEMU waiting for us. Both at once:
    // each is a connection and a few round trips, and starting QEMU takes a while.
    let base = async {
        if !spec.delta {
            return Ok(None);
        }
        let t = Instant::now();
        let r = cache_summary(&dest, spec).await;
        debug!(
            ms = t.elapsed().as_millis() as u64,
            "destination cache summary"
        );
        r
    };
    let mut control = KeptSession::new();
    let stream_id = Tunnel::new_session_id();
    let open = MigrationRequest {
        name: &spec.vm,
        op: data::MIGRATION_QEMU_OPEN,
        segments: 0,
        digest: None,
        postcopy: source_postcopy,
        timeout: Duration::from_secs(30),
        // The stream is bound to its tunnel from the start: a block still in flight from
        // an earlier attempt's tunnel is refused, not fed (under post-copy QEMU would take
        // it before any digest is checked).
        stream_session: Some(stream_id),
        // The destination waits for the stream as long as this side keeps dialling.
        wait: spec.retry_for,
    };
    let opened = async {
        let t = Instant::now();
        let r =
            migration_request_kept(dest.endpoint, dest.addr, dest.expected, &open, &mut control)
                .await;
        debug!(
            ms = t.elapsed().as_millis() as u64,
            "destination QEMU waiting"
        );
        r
    };
    // The tunnel's connections too: their handshakes would otherwise come after the summary,
    // which takes a dozen round trips across a long path (the largest part of preparing).
    let tunnel = async {
        let t = Instant::now();
        let r = open_tunnel(&dest, spec, stream_id).await;
        debug!(ms = t.elapsed().as_millis() as u64, "tunnel open");
        r
    };
    let prepared = {
        let prepared = async { tokio::join!(base, opened, tunnel) };
        tokio::pin!(prepared);
        tokio::select! {
            r = &mut prepared => Some(r),
            () = spec.cancel.cancelled() => {
                // Let the requests already sent finish (each is bounded), so that the abort
                // comes after them and not before an open it would then miss.
                if let Ok((_, _, Ok(t))) =
                    tokio::time::timeout(Duration::from_secs(40), &mut prepared).await
                {
                    t.close();
                }
                None
            }
        }
    };
    let Some((remote, opened, tunnel)) = prepared else {
        // Whatever of the destination was set up goes. Nothing ran at the source.
        abort_destination(&dest, &spec.vm, Some(stream_id)).await;
        control.close().await;
        return Err(fail("prepare", CANCELLED.to_string(), &report));
    };
    let (remote, tunnel, opened) = match (opened, remote, tunnel) {
        (Ok(detail), Ok(r), Ok(t)) => {
            t.retry_within(spec.retry_for);
            (r, t, detail)
        }
        (opened, remote, tunnel) => {
            let why = (opened.err().map(|e| format!("destination: {e}")))
                .or_else(|| remote.err().map(|e| format!("destination: {e}")))
                .or_else(|| tunnel.as_ref().err().map(|e| format!("tunnel: {e}")))
                .unwrap_or_default();
            if let Ok(t) = tunnel {
                t.close();
            }
            // Its QEMU, if it waits, waits for a stream that will not come.
            abort_destination(&dest, &spec.vm, Some(stream_id)).await;
            control.close().await;
            return Err(fail("prepare", why, &report));
        }
    };
    let stream = tunnel.session_id();
    // Post-copy when the destination took it (a node before it answers nothing).
    let postcopy = source_postcopy && {
        let v: Value = serde_json::from_str(&opened).unwrap_or(Value::Null);
        let ok = v.get("postcopy").and_then(Value::as_bool) == Some(true);
        if !ok {
            let why = v
                .get("why")
                .and_then(Value::as_str)
                .unwrap_or("the destination node does not carry post-copy");
            let w = format!("no post-copy: {why}; a migration that cannot converge is given up");
            warn!(vm = %spec.vm, "{w}");
            report.warnings.push(w);
        }
        ok
    };
    // Measured now, not alongside the cache summary: the destination may be busy with that
    // summary then, and one late answer on a short path (2.5 ms seen on `dc`, with 10 ms the
    // line between short and long) would be taken for a long path.
    let rtt = control
        .round_trip()
        .await
        .unwrap_or(Duration::from_millis(1));

    // The settings the migration changes, as they are: put back when it ends. QEMU's
    // throttle steps are also the floor of the paced ones.
    let (saved, params) = read_settings(&mut qmp).await;
    if params.is_none() {
        let w = "QEMU did not tell its migration parameters: they are not put back afterwards";
        warn!(vm = %spec.vm, "{w}");
        report.warnings.push(w.to_string());
    }
    let steps = if spec.auto_converge && spec.paced_throttle {
        let s = params.as_ref().and_then(own_steps);
        if params.is_some() && s.is_none() {
            let w =
                "QEMU did not tell its auto-converge parameters: its own throttle steps were used";
            warn!(vm = %spec.vm, "{w}");
            report.warnings.push(w.to_string());
        }
        s
    } else {
        None
    };
    // With auto-converge on, its steps end at `max-cpu-throttle`.
    let max = params
        .as_ref()
        .and_then(|p| p.get("max-cpu-throttle"))
        .and_then(Value::as_u64)
        .map_or(Own::QEMU.max, |m| m.min(100) as u8);
    let converge = Watch::new(
        if postcopy {
            spec.give_up.for_postcopy()
        } else {
            spec.give_up
        },
        spec.auto_converge.then_some(max),
        spec.downtime,
    );
    // QEMU stopped the guest for the migration (or someone did) at some point.
    let stopped = Arc::new(AtomicBool::new(false));
    let result = run(
        dest,
        spec,
        Start::New,
        postcopy,
        &stopped,
        &mut qmp,
        &mut control,
        remote,
        tunnel,
        rtt,
        steps.map(|(s, _)| Pacer::new(s)),
        converge,
        steps.is_some_and(|(_, t)| t == Some(true)),
        progress,
        &mut report,
    )
    .await;
    report.total_seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            if let Some(w) = restore_settings(&mut qmp, saved, &spec.vm).await {
                report.warnings.push(w);
            }
            control.close().await;
            report.migrated = true;
            info!(vm = %spec.vm, seconds = report.total_seconds, downtime_ms = ?report.downtime_ms, "QEMU migration done");
            Ok(report)
        }
        Err((phase, reason)) => {
            let (phase, reason) = after_the_point(
                (phase, reason),
                report.postcopy,
                // A guest paused before emits no STOP; nothing goes out before `transfer`.
                postcopy
                    && (stopped.load(Ordering::SeqCst)
                        || (!was_running && phase != "prepare" && phase != "start")),
                &report.dest_status,
            );
            // QEMU resumes a guest that ran when its migration fails (its socket closing with
            // the return path open, say), whatever `dwcp migrate` decides: paused again when
            // the destination may run it, or runs it.
            if (phase == UNKNOWN
                || phase == POSTCOPY
                || runs_at_destination(phase, &report.dest_status))
                && let Some(w) = keep_paused(&mut qmp, was_running).await
            {
                warn!(vm = %spec.vm, "{w}");
                report.warnings.push(w);
            }
            let runs_there = runs_at_destination(phase, &report.dest_status) || phase == POSTCOPY;
            let as_before = if phase == UNKNOWN || runs_there {
                // Resuming the source could run the guest twice; leave it paused.
                warn!(vm = %spec.vm, phase, "QEMU migration failed: {reason}; the destination may run the guest: the source stays paused");
                false
            } else {
                warn!(vm = %spec.vm, phase, "QEMU migration failed: {reason}; rolling back");
                rollback(spec, &mut qmp, was_running).await
            };
            // Also after post-copy: the destination agent then only lets go of the stream
            // and its QEMU's monitor (a QEMU that may hold the guest is not told to quit).
            if !runs_there || phase == POSTCOPY {
                abort_destination(&dest, &spec.vm, Some(stream)).await;
            }
            // After the rollback: QEMU takes no capability while a migration is active.
            if let Some(w) = restore_settings(&mut qmp, saved, &spec.vm).await {
                report.warnings.push(w);
            }
            control.close().await;
            report.total_seconds = started.elapsed().as_secs_f64();
            report.error = Some(reason.clone());
            let mut e = fail(phase, reason, &report);
            e.source_as_before = as_before;
            Err(e)
        }
    }
}

/// Resumes the post-copy migration that a broken stream left paused at the source (QEMU's
/// `postcopy-paused`; `qmp` is its monitor): the destination stops what is left of the
/// earlier stream and has its QEMU listen again (`MIGRATION_QEMU_RECOVER`), and the source
/// QEMU's `migrate` with `resume` sends the pages still at the source through a new tunnel.
/// Nothing is rolled back whatever happens. A failure before the new stream starts leaves
/// both QEMUs paused in post-copy, for another try; one after it started leaves QEMU before
/// 8.2 in `postcopy-recover` for good ([`STUCK`]).
async fn recover(
    dest: Destination<'_>,
    spec: &QemuSpec,
    mut qmp: Qmp,
    progress: &mut (dyn FnMut(&QemuProgress) + Send),
    started: Instant,
    mut report: QemuReport,
) -> Result<QemuReport, QemuError> {
    report.recovered = true;
    report.postcopy = true;
    let fail = |phase: &'static str, reason: String, report: &QemuReport| QemuError {
        vm: spec.vm.clone(),
        phase,
        reason,
        source_as_before: false,
        report: Box::new(report.clone()),
    };
    // There is no way back from here: nothing to cancel to.
    if !spec.cancel.finish() {
        return Err(fail(POSTCOPY, CANCELLED.to_string(), &report));
    }
    let (source_qemu, _) = source_qemu(&mut qmp).await;
    report.source_qemu = source_qemu;
    info!(vm = %spec.vm, "the source QEMU's post-copy is paused: resuming it");
    let mut control = KeptSession::new();
    let tunnel = open_tunnel(&dest, spec, Tunnel::new_session_id());
    // What the destination's cache holds: the pages still at the source may be there.
    let base = async {
        if !spec.delta {
            return None;
        }
        cache_summary(&dest, spec)
            .await
            .inspect_err(|e| debug!("no destination cache summary for the recovery: {e}"))
            .ok()
            .flatten()
    };
    // The tunnel first, the recovery after: the destination QEMU may not pause again once
    // its recovery has begun (QEMU before 8.2), so nothing that can still fail comes between.
    let (tunnel, remote) = tokio::join!(tunnel, base);
    let ended = |why: String, mut report: QemuReport| {
        report.total_seconds = started.elapsed().as_secs_f64();
        report.error = Some(why.clone());
        fail(POSTCOPY, why, &report)
    };
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            control.close().await;
            return Err(ended(format!("tunnel: {e}"), report));
        }
    };
    tunnel.retry_within(spec.retry_for);
    let sid = tunnel.session_id();
    let ask = MigrationRequest {
        name: &spec.vm,
        op: data::MIGRATION_QEMU_RECOVER,
        segments: 0,
        digest: None,
        postcopy: true,
        // The destination waits for its QEMU to notice the old stream gone.
        timeout: Duration::from_secs(60),
        stream_session: Some(sid),
        wait: spec.retry_for,
    };
    if let Err(e) =
        migration_request_kept(dest.endpoint, dest.addr, dest.expected, &ask, &mut control).await
    {
        tunnel.close();
        control.close().await;
        return Err(ended(format!("destination: {e}"), report));
    }
    let rtt = control
        .round_trip()
        .await
        .unwrap_or(Duration::from_millis(1));
    let result = run(
        dest,
        spec,
        Start::Resume,
        true,
        &Arc::new(AtomicBool::new(true)),
        &mut qmp,
        &mut control,
        remote,
        tunnel,
        rtt,
        None,
        Watch::new(spec.give_up.for_postcopy(), None, spec.downtime),
        false,
        progress,
        &mut report,
    )
    .await;
    report.total_seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            control.close().await;
            report.migrated = true;
            info!(vm = %spec.vm, seconds = report.total_seconds, "QEMU post-copy resumed and done");
            Ok(report)
        }
        Err((phase, reason)) => {
            let runs_there = runs_at_destination(phase, &report.dest_status);
            // Its QEMU pauses the post-copy again when the new stream goes.
            if !runs_there {
                abort_destination(&dest, &spec.vm, Some(sid)).await;
            }
            control.close().await;
            // QEMU before 8.2 cannot pause a recovery whose stream broke: say so, or the
            // advice to try again would loop.
            let mut reason = reason;
            let mut stuck = false;
            if let Ok(m) = qmp.execute("query-migrate", None).await
                && m.get("status").and_then(Value::as_str) == Some("postcopy-recover")
            {
                stuck = true;
                reason.push_str(
                    "; the source QEMU stays in postcopy-recover: QEMU before 8.2 cannot pause a \
                     recovery whose stream broke, and this one cannot be resumed again",
                );
            }
            warn!(vm = %spec.vm, phase, "resuming the QEMU post-copy failed: {reason}");
            report.error = Some(reason.clone());
            let phase = if phase == UNKNOWN || runs_there {
                phase
            } else if stuck {
                STUCK
            } else {
                POSTCOPY
            };
            Err(fail(phase, reason, &report))
        }
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The destination's cache summary for the VM's stream.
async fn cache_summary(
    dest: &Destination<'_>,
    spec: &QemuSpec,
) -> Result<Option<RemoteIndex>, SendError> {
    query_base(
        dest.endpoint,
        dest.addr,
        dest.expected,
        &spec.vm,
        0,
        0,
        false,
    )
    .await
    .map(|(r, _)| r)
}

/// The tunnel that carries the VM's stream.
async fn open_tunnel(
    dest: &Destination<'_>,
    spec: &QemuSpec,
    id: [u8; 16],
) -> Result<Tunnel, SendError> {
    Tunnel::open_as(
        dest.endpoint,
        dest.addr,
        dest.expected,
        spec.streams,
        &spec.vm,
        spec.rate_limit.clone(),
        id,
    )
    .await
}

/// How [`run`] starts QEMU's migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A new one.
    New,
    /// Resumes a paused post-copy (`migrate` with `resume`).
    Resume,
}

/// After a failure that leaves the source paused: QEMU itself may resume the guest within a
/// moment of its migration failing. Watched for 2 s, and stopped again; a warning says so.
async fn keep_paused(qmp: &mut Qmp, was_running: bool) -> Option<String> {
    if !was_running {
        return None; // QEMU resumes only a guest that ran before
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if let Ok(s) = qmp.status().await
            && s == "running"
        {
            let stopped = qmp.execute("stop", None).await;
            return Some(match stopped {
                Ok(_) => format!(
                    "the source QEMU resumed the guest when its migration failed; paused again \
                     after {} ms",
                    t.elapsed().as_millis()
                ),
                Err(e) => format!(
                    "the source QEMU resumed the guest when its migration failed, and could not \
                     be paused again ({e}): the guest may run on both hosts"
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// The phase a failure is reported in, from what happened before it: after post-copy began
/// (`postcopy_began`) any failure is [`POSTCOPY`]; with post-copy negotiated and the guest
/// stopped at the source once (`exposed`: the destination QEMU takes every byte as it comes,
/// and may have loaded and started the guest), a failure that would roll back is
/// [`UNKNOWN`]: resuming the source could run the guest twice.
fn after_the_point(
    (phase, reason): (&'static str, String),
    postcopy_began: bool,
    exposed: bool,
    dest_status: &str,
) -> (&'static str, String) {
    if phase == UNKNOWN || runs_at_destination(phase, dest_status) {
        (phase, reason)
    } else if postcopy_began {
        (POSTCOPY, reason)
    } else if phase == CLEANUP {
        // The destination answered the finish: its QEMU holds the whole guest, checked (a
        // `-S` one waits to be told to run it), and an abort no longer reaches it. Resuming
        // the source would leave the guest in two places. (So too when its answer named no
        // state: one it could not parse, or an older agent's.)
        let status = if dest_status.is_empty() {
            String::new()
        } else {
            format!(", {dest_status:?}")
        };
        (
            UNKNOWN,
            format!("{reason} (the destination QEMU had loaded the guest{status}, and keeps it)"),
        )
    } else if exposed {
        (
            UNKNOWN,
            format!(
                "{reason} (with post-copy on, the destination QEMU takes the stream as it comes, \
                 and may have started the guest once the source stopped it)"
            ),
        )
    } else {
        (phase, reason)
    }
}

/// A failure in `phase` leaves the guest running at the destination, whose QEMU says
/// `dest_status`: it loaded the whole stream (its digest checked) and runs, and only the
/// source's own end failed. Rolling back then would stop a running guest, and run it twice
/// if the destination could not be told.
fn runs_at_destination(phase: &str, dest_status: &str) -> bool {
    phase == CLEANUP && dest_status == "running"
}

/// Tells the destination to drop the migration (its QEMU and what it holds of the stream).
async fn abort_destination(dest: &Destination<'_>, vm: &str, stream: Option<[u8; 16]>) {
    let abort = MigrationRequest {
        name: vm,
        op: data::MIGRATION_QEMU_ABORT,
        segments: 0,
        digest: None,
        postcopy: false,
        // The destination asks its QEMU's state first (5 s each at most, a QEMU in
        // post-copy may not answer).
        timeout: Duration::from_secs(30),
        stream_session: stream,
        wait: Duration::ZERO,
    };
    let mut fresh = KeptSession::default();
    if let Err(e) =
        migration_request_kept(dest.endpoint, dest.addr, dest.expected, &abort, &mut fresh).await
    {
        warn!(vm = %vm, "cannot tell the destination to drop the stream: {e}");
    }
    fresh.close().await;
}

/// A RAM block that QEMU before 9.0 syncs a word (64 pages) at a time when both its place
/// and its length are whole numbers of this, and then tracks wrongly (see
/// [`tcg_lost_writes`]).
const TCG_FAST_SYNC: u64 = 64 * 4096;

/// Blocks smaller than this are firmware (BIOS, option ROMs, ACPI tables), which the guest
/// does not write.
const TCG_GUEST_BLOCK: u64 = 1 << 20;

/// One of QEMU's RAM blocks, from `info ramblock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// Its name (`pc.ram`, a memory backend's id, `pc.bios`, ...).
    pub name: String,
    /// Its place among all blocks (QEMU's `ram_addr_t`).
    pub offset: u64,
    /// Bytes in use.
    pub used: u64,
}

/// The blocks of HMP's `info ramblock` (QEMU 2.12 and later): a header line, then one line
/// per block of name, page size (`4 KiB`), offset, used and total length in hex. `None` if
/// a line does not read so.
pub fn parse_ramblocks(text: &str) -> Option<Vec<RamBlockInfo>> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if !lines.next()?.starts_with("Block Name") {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let blocks: Option<Vec<_>> = lines
        .map(|l| {
            // The name may hold spaces in principle: the last five fields are fixed.
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = f.len();
            (n >= 6).then_some(())?;
            Some(RamBlockInfo {
                name: f[..n - 5].join(" "),
                offset: hex(f[n - 3])?,
                used: hex(f[n - 2])?,
            })
        })
        .collect();
    blocks.filter(|b| !b.is_empty())
}

/// The source QEMU's version and accelerator, and a warning when its own dirty tracking loses
/// guest writes. Asked over QMP; a QEMU that does not answer gets neither.
pub async fn source_qemu(qmp: &mut Qmp) -> (String, Option<String>) {
    let version = qmp.execute("query-version", None).await.ok();
    let kvm = qmp.execute("query-kvm", None).await.ok();
    let n = |v: &Option<Value>, k: &str| {
        v.as_ref()
            .and_then(|v| v.pointer(k))
            .and_then(Value::as_u64)
    };
    let (Some(major), Some(minor), Some(micro)) = (
        n(&version, "/qemu/major"),
        n(&version, "/qemu/minor"),
        n(&version, "/qemu/micro"),
    ) else {
        return (String::new(), None);
    };
    let kvm = kvm
        .as_ref()
        .and_then(|k| k.get("enabled"))
        .and_then(Value::as_bool);
    let accel = match kvm {
        Some(true) => "KVM",
        Some(false) => "TCG",
        None => "accelerator unknown",
    };
    let warning = if kvm == Some(false) && major < 9 {
        // Each block, where the monitor tells them; else guest RAM as one block.
        let hmp = serde_json::json!({"command-line": "info ramblock"});
        let listed = qmp
            .execute("human-monitor-command", Some(hmp))
            .await
            .ok()
            .and_then(|v| v.as_str().and_then(parse_ramblocks));
        let blocks = match listed {
            Some(b) => b,
            None => {
                let ram = qmp.execute("query-memory-size-summary", None).await.ok();
                n(&ram, "/base-memory")
                    .map(|used| {
                        vec![RamBlockInfo {
                            name: "guest RAM".into(),
                            offset: 0,
                            used,
                        }]
                    })
                    .unwrap_or_default()
            }
        };
        tcg_lost_writes((major, minor), &blocks)
    } else {
        None
    };
    (format!("QEMU {major}.{minor}.{micro}, {accel}"), warning)
}

/// QEMU before 9.0 loses guest writes while it migrates a TCG guest with a RAM block placed
/// at and as long as a whole number of 64 pages: the fast path of its dirty-bitmap sync
/// clears the bits without making the vCPU's TLB trap the next write to those pages, so a
/// page written again after it was sent is never sent again (fixed upstream by commit
/// 03bfc2188f). The destination then runs with some pages older than the source's,
/// whatever carries the stream; DWCP cannot see it (the stream it carries is QEMU's and
/// arrives whole). Each block counts: a guest of two NUMA nodes can have one on the fast
/// path and a total RAM that is not.
fn tcg_lost_writes((major, minor): (u64, u64), blocks: &[RamBlockInfo]) -> Option<String> {
    if major >= 9 {
        return None;
    }
    let fast: Vec<String> = blocks
        .iter()
        .filter(|b| {
            b.used >= TCG_GUEST_BLOCK
                && b.used.is_multiple_of(TCG_FAST_SYNC)
                && b.offset.is_multiple_of(TCG_FAST_SYNC)
        })
        .map(|b| format!("{} ({} KiB)", b.name, b.used >> 10))
        .collect();
    (!fast.is_empty()).then(|| {
        format!(
            "the source QEMU {major}.{minor} runs this guest under TCG with RAM in a whole \
             number of 256 KiB: {}. QEMU before 9.0 can lose guest writes while it migrates \
             such a guest (its bug, fixed by upstream commit 03bfc2188f), and the destination \
             may run with a few pages older than the source's. Use KVM or QEMU 9.0 or later; \
             for a block of guest RAM, 8 KiB more or less (for each NUMA node) also avoids it",
            fast.join(", ")
        )
    })
}

/// Cancels the source's migration and makes sure the guest runs there again (if it ran);
/// returns whether it does.
async fn rollback(spec: &QemuSpec, qmp: &mut Qmp, was_running: bool) -> bool {
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
    if !was_running {
        return true;
    }
    match qmp.status().await {
        Ok(s) if s != "running" => match qmp.execute("cont", None).await {
            Ok(_) => true,
            Err(e) => {
                warn!(vm = %spec.vm, "cannot resume the source guest: {e}");
                false
            }
        },
        Ok(_) => true,
        Err(e) => {
            warn!(vm = %spec.vm, "source QEMU: {e}");
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    dest: Destination<'_>,
    spec: &QemuSpec,
    start: Start,
    postcopy: bool,
    stopped: &Arc<AtomicBool>,
    qmp: &mut Qmp,
    control: &mut KeptSession,
    remote: Option<RemoteIndex>,
    tunnel: Tunnel,
    rtt: Duration,
    pacer: Option<Pacer>,
    converge: Watch,
    tailslow_off: bool,
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

    let q = |e: QmpError| ("prepare", e.to_string());
    let resume = start == Start::Resume;
    // Capabilities are fixed while a migration is (a paused post-copy's were set by the
    // run that began it).
    if !resume {
        // One stream through the tunnel: multifd (several sockets), post-copy and what else
        // needs more than one stream off, whatever an earlier migration of this QEMU left set.
        let mut caps = vec![
            capability("auto-converge", spec.auto_converge),
            capability("multifd", false),
            capability("postcopy-ram", false),
        ];
        let has = match qmp.execute("query-migrate-capabilities", None).await {
            Ok(Value::Array(listed)) => listed
                .iter()
                .filter_map(|c| c.get("capability").and_then(Value::as_str))
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        caps.extend(
            STREAM_BREAKERS
                .iter()
                .filter(|name| has.iter().any(|h| h == *name))
                .map(|name| capability(name, false)),
        );
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
        .map_err(q)?;
    }
    // On its own (it took it a moment ago, in `source_takes_postcopy`): a QEMU that refuses
    // it now still migrates, without post-copy. The destination feeds every byte as it comes
    // all the same (`postcopy` stays true for what that exposes), the source QEMU ends its
    // stream without waiting for a return path, and the finish works as before.
    let source_rp = resume
        || postcopy && {
            let on = json!({"capabilities": [capability("postcopy-ram", true)]});
            match qmp.execute("migrate-set-capabilities", Some(on)).await {
                Ok(_) => true,
                Err(e) => {
                    let w = format!("no post-copy: the source QEMU refused it: {e}");
                    warn!(vm = %spec.vm, "{w}");
                    report.warnings.push(w);
                    false
                }
            }
        };
    let mut params = json!({
        "downtime-limit": spec.downtime.as_millis() as u64,
        // QEMU's default cap is 128 MiB/s; the tunnel's backpressure is the limit here.
        "max-bandwidth": 100u64 << 30,
    });
    if tailslow_off {
        // Its "tail slow" would cap the paced steps by an estimate of its own.
        params["cpu-throttle-tailslow"] = json!(false);
    }
    qmp.execute("migrate-set-parameters", Some(params))
        .await
        .map_err(q)?;
    // Drop events from before the migration (a STOP of an earlier pause must not count).
    let _ = qmp.poll_events(Duration::from_millis(1)).await;
    while qmp.take_event("STOP").is_some() {}
    let mut migrate = json!({"uri": format!("unix:{}", sock_path.display())});
    if resume {
        migrate["resume"] = json!(true);
    }
    qmp.execute("migrate", Some(migrate))
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

    let budget = Arc::new(Budget::new());
    if resume {
        // Before the reader: a resumed stream has no first pass to follow.
        budget.set_late();
    }
    let (tx, rx) = mpsc::channel::<Segment>(2);
    let (sock, back) = sock.into_split();
    let mut reader = tokio::spawn(read_segments(sock, tx, budget.clone(), tunnel.max_block()));
    // QEMU's return path (open under post-copy): the destination QEMU's bytes, asked for on
    // a session of their own (the control session waits on the finish).
    let mut returns = source_rp.then(|| {
        tokio::spawn(carry_return(
            dest.endpoint.clone(),
            dest.addr,
            dest.expected.cloned(),
            spec.vm.clone(),
            back,
            spec.retry_for,
            tunnel.session_id(),
        ))
    });
    // What the destination holds: its summary, then the pages of every block it decoded.
    let remote = Arc::new(remote.map(RwLock::new));
    let tunnel = Arc::new(tunnel);
    let codec = match spec.short_path_codec {
        Some(c) if Mode::for_rtt(rtt) == Mode::Datacenter => c,
        _ => spec.codec,
    };
    debug!(%codec, rtt_ms = rtt.as_secs_f64() * 1e3, "codec of the stream");
    report.codec = codec.to_string();
    let blocks = encode_segments(rx, spec.delta, codec, remote.clone(), tunnel.max_block());
    // Blocks go into the tunnel and acknowledgements free the window in a task of their own:
    // QEMU's monitor does not answer while QEMU finishes the migration (it holds its main
    // lock), and that must not stall the stream QEMU is waiting on.
    let mut forwarder = tokio::spawn(forward(blocks, tunnel.clone(), budget.clone(), remote));
    // Should this future be dropped midway (its caller gave up on it), the tasks go with it:
    // left running they would keep QEMU's socket and the tunnel open.
    let _tasks = AbortOnDrop(
        [reader.abort_handle(), forwarder.abort_handle()]
            .into_iter()
            .chain(returns.as_ref().map(|r| r.abort_handle()))
            .collect(),
    );
    // The window lifts the moment QEMU's STOP is read, also while a monitor command waits for
    // its answer: QEMU holds that answer until its final round is written, and the final round
    // would wait behind the window (see `Budget::set_paused`).
    let hooked = budget.clone();
    let (stop_seen, cancel) = (stopped.clone(), spec.cancel.clone());
    qmp.on_event(Some(Box::new(move |e: &QmpEvent| {
        let paused = match e.name.as_str() {
            "STOP" => true,
            "RESUME" => false,
            _ => return,
        };
        if paused {
            stop_seen.store(true, Ordering::SeqCst);
            if hooked.hold.swap(false, Ordering::Relaxed) {
                hooked.freed.notify_waiters();
            }
            // With post-copy on, the destination QEMU takes every byte as it comes and may
            // start the guest as soon as the source's last round is in: from here the
            // migration cannot be cancelled (see `migrate_qemu`'s phases).
            if postcopy {
                cancel.finish();
            }
        }
        if paused != hooked.is_paused() {
            hooked.set_paused(paused);
            debug!(
                paused,
                inflight_mib = hooked.inflight() as f64 / 1048576.0,
                wire_inflight_mib = hooked.wire_inflight() as f64 / 1048576.0,
                "guest paused or resumed; window lifted while paused"
            );
        }
    })));
    if resume {
        // The guest runs at the destination and waits there for every page it faults on:
        // the post-copy window from the start, and a stuck block goes again soon.
        budget.postcopy.store(true, Ordering::Relaxed);
        budget.set_paused(true);
        stopped.store(true, Ordering::SeqCst);
        spec.cancel.finish();
        tunnel.finishing();
    }
    // A STOP read before the hook was in place (by `migrate`'s own answer, say) still counts.
    if qmp.latest_is("STOP", &["STOP", "RESUME"]) {
        budget.set_paused(true);
        stopped.store(true, Ordering::SeqCst);
        if postcopy {
            spec.cancel.finish();
        }
    }
    let result = pump(
        spec,
        source_rp,
        qmp,
        &tunnel,
        &budget,
        &mut reader,
        &mut forwarder,
        &mut returns,
        rtt,
        pacer,
        converge,
        progress,
        report,
        control,
        dest,
    )
    .await;
    // A STOP not read yet counts too (a cancel, say, can end the transfer between QEMU
    // stopping the guest and the next read of its events).
    if result.is_err() {
        let _ = qmp.poll_events(Duration::from_millis(1)).await;
    }
    qmp.on_event(None);
    if qmp.latest_is("STOP", &["STOP", "RESUME"]) {
        stopped.store(true, Ordering::SeqCst);
    }
    reader.abort();
    forwarder.abort();
    if let Some(r) = &returns {
        r.abort();
    }
    let (_, _, wire, resent) = tunnel.acked();
    report.wire_bytes = wire;
    report.stream_bytes = budget.read();
    report.tcp = tunnel.tcp_counts();
    report.tunnel_reconnects = tunnel.replaced();
    tunnel.close();
    let detail = result?;
    debug!(resent, hedged = tunnel.hedged(), "tunnel done");
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
            .map_err(|e| (CLEANUP, e.to_string()))?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err((
                    CLEANUP,
                    format!("the source QEMU says the migration {info}"),
                ));
            }
            _ if t.elapsed() > Duration::from_secs(30) => {
                return Err((CLEANUP, "the source QEMU did not complete".into()));
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    // (A resumed post-copy stopped the guest in an earlier run.) The pause that lasted: a
    // STOP that a RESUME followed (an operator's `stop` and `cont` during the migration) is
    // not the migration's.
    let stop = match start {
        Start::Resume => None,
        Start::New => {
            let _ = qmp.poll_events(Duration::from_millis(1)).await;
            match qmp.take_latest("STOP", &["STOP", "RESUME"]) {
                Some(e) => Some(e.at),
                None => {
                    // Any STOP queued now came before a RESUME: not this pause.
                    while qmp.take_event("STOP").is_some() {}
                    qmp.wait_event("STOP", Duration::from_secs(2))
                        .await
                        .ok()
                        .map(|e| e.at)
                }
            }
        }
    };
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
    report.postcopy_requests = ram
        .and_then(|r| r.get("postcopy-requests"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    // Unknown, not zero, when the destination's clock is behind the source's.
    report.downtime_ms = match (stop, resumed) {
        (Some(s), Some(r)) => r.duration_since(s).ok().map(|d| d.as_secs_f64() * 1000.0),
        _ => None,
    };
    debug!(?stop, ?resumed, "QEMU migration timestamps");
    Ok(())
}

/// Watches the transfer until the destination has loaded the guest: feeds the tunnel from the
/// encoder, adapts the window and QEMU's downtime limit, reports progress; then FINISH.
#[allow(clippy::too_many_arguments)]
async fn pump(
    spec: &QemuSpec,
    postcopy: bool,
    qmp: &mut Qmp,
    tunnel: &Tunnel,
    budget: &Budget,
    reader: &mut tokio::task::JoinHandle<Result<(u64, blake3::Hash), String>>,
    forwarder: &mut tokio::task::JoinHandle<Result<(u64, u64), String>>,
    returns: &mut Option<tokio::task::JoinHandle<Result<(), String>>>,
    rtt: Duration,
    mut pacer: Option<Pacer>,
    mut converge: Watch,
    progress: &mut (dyn FnMut(&QemuProgress) + Send),
    report: &mut QemuReport,
    control: &mut KeptSession,
    dest: Destination<'_>,
) -> Result<String, (&'static str, String)> {
    let started = Instant::now();
    let deadline = started + spec.timeout;
    let mut last = (Instant::now(), 0u64, 0u64);
    // Acknowledged stream bytes a second, and wire bytes a second.
    let mut rate = Rate::default();
    let mut wire_rate = Rate::default();
    let mut segments: Option<(u64, blake3::Hash)> = None;
    let mut queued: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // A new control session being opened, the old one's connection gone.
    let mut reopening: Option<AbortOnDropHandle<Result<KeptSession, String>>> = None;
    let mut qemu_limit = spec.downtime.as_millis() as u64;
    let mut polls = 0u32;
    let short_path = Mode::for_rtt(rtt) == Mode::Datacenter;
    // When QEMU was asked for post-copy (and went); a resumed one is in it from the start.
    let mut postcopy_since: Option<Instant> = report.postcopy.then(Instant::now);
    // Since when a resumed migration waits for QEMU's state to leave `postcopy-paused`.
    let mut resuming = report.recovered.then(Instant::now);
    // Part of the pause is neither QEMU's final round nor the tunnel's backlog: the
    // destination QEMU loading the device state and resuming, with the two agents and the
    // guests on the same CPUs (on `dc`, 60-90 ms after the last byte; 2026-12-03).
    let switchover = spec.downtime / 4;
    // QEMU's dirty-sync count: 1 during the first pass over RAM; RAM left in this pass.
    let mut qemu_round = 0u64;
    let mut qemu_remaining = u64::MAX;
    let mut events_polled = Instant::now();
    let mut kept_alive = Instant::now();
    // Whether to watch QEMU's events for STOP: while the monitor answers.
    let mut watch = true;
    let stream_digest = loop {
        // QEMU's STOP event, read as soon as it comes (a few milliseconds: this loop wakes on
        // every acknowledgement): the window lifts then (see `Budget::set_paused`). On `dc`
        // too: QEMU's own share of the pause fell from 96-125 to 36-91 ms (2026-12-04, three
        // runs each, cold and warm), totals level.
        if watch && events_polled.elapsed() >= EVENT_POLL {
            events_polled = Instant::now();
            watch = watch_pause(qmp).await;
        }
        tokio::select! {
            r = &mut *reader, if segments.is_none() => {
                match r {
                    Ok(Ok(end)) => {
                        segments = Some(end);
                        spec.cancel.set_source_done();
                    }
                    Ok(Err(e)) => return Err(("transfer", e)),
                    Err(e) => return Err(("transfer", format!("reader task: {e}"))),
                }
            }
            r = async { returns.as_mut()?.await.ok() }, if returns.is_some() => {
                *returns = None;
                match r {
                    Some(Ok(())) => debug!("return path delivered to its end"),
                    Some(Err(e)) => return Err(("transfer", e)),
                    None => return Err(("transfer", "the return path's task failed".into())),
                }
            }
            r = &mut *forwarder, if queued.is_none() => {
                match r {
                    Ok(Ok((n, cached))) => {
                        queued = Some(n);
                        report.cache_bytes = cached;
                    }
                    Ok(Err(e)) => return Err(("transfer", e)),
                    Err(e) => return Err(("transfer", format!("forwarding task: {e}"))),
                }
            }
            () = tunnel.wait_progress(Duration::from_millis(50)) => {
                if let Some(e) = tunnel.error() {
                    return Err(("transfer", e));
                }
            }
            // Until the finish goes, the destination holds back the stream's end from its
            // QEMU: rolling back is safe (the source resumes the guest also from its final
            // round, or from a completed migration).
            () = spec.cancel.cancelled() => return Err(("transfer", CANCELLED.to_string())),
            _ = tick.tick() => {
                // Not once post-copy began: ending it would leave both sides paused, neither
                // whole. Its own failure shows as QEMU's `postcopy-paused`.
                if Instant::now() > deadline && !report.postcopy {
                    return Err(("transfer", format!("not done within {:?}", spec.timeout)));
                }
                // The control session waits for the finish while the tunnel carries the
                // stream: the destination's agent must not close it as idle meanwhile.
                // Should its connection have gone all the same, a new one now: not on the
                // pause path, when the finish goes. Opened aside: dialling through a link
                // that is down takes until it is up again, and meanwhile this loop goes on
                // watching QEMU (and showing the link down).
                if kept_alive.elapsed() >= CONTROL_KEEPALIVE {
                    kept_alive = Instant::now();
                    if let Some(t) = reopening.take_if(|t| t.is_finished()) {
                        match t.await {
                            Ok(Ok(k)) => {
                                debug!("control session to the destination opened again");
                                drop(std::mem::replace(control, k));
                            }
                            Ok(Err(e)) => warn!("{e}"),
                            Err(e) => warn!("opening the control session again: {e}"),
                        }
                    } else if reopening.is_none() && !control.keepalive().await {
                        let (ep, addr) = (dest.endpoint.clone(), dest.addr);
                        let expected = dest.expected.cloned();
                        reopening = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                            let mut k = KeptSession::new();
                            let open = k.ensure_open(&ep, addr, expected.as_ref());
                            match tokio::time::timeout(Duration::from_secs(10), open).await {
                                Ok(Ok(())) => Ok(k),
                                Ok(Err(e)) => {
                                    Err(format!("cannot open the control session again: {e}"))
                                }
                                Err(_) => {
                                    Err("cannot open the control session again within 10 s"
                                        .to_string())
                                }
                            }
                        })));
                    }
                }
                let (_, acked, wire_acked, _) = tunnel.acked();
                let dt = last.0.elapsed().as_secs_f64();
                if dt >= 0.2 {
                    rate.sample((acked - last.1) as f64 / dt, dt);
                    wire_rate.sample((wire_acked - last.2) as f64 / dt, dt);
                    last = (Instant::now(), acked, wire_acked);
                    // The window (see `limits`): too small starves the path; too big hides a
                    // backlog from QEMU, which drains while the guest is paused. Late, the
                    // backlog gets half of what the downtime budget leaves after a round trip
                    // and the switchover's own cost (QEMU's final round gets the other half).
                    // On a short path a window of a few MiB already fills it, so there the late
                    // window holds from the start.
                    if qemu_round >= 2 || short_path || qemu_remaining < FIRST_PASS_ENDING {
                        budget.set_late();
                    }
                    let allow = (spec.downtime.saturating_sub(rtt + switchover)).max(Duration::from_millis(50)) / 2;
                    budget.block.store(
                        if qemu_round >= 2 && !short_path { LATE_BLOCK } else { BLOCK },
                        Ordering::Relaxed,
                    );
                    let drain = stream_drain(rate, short_path);
                    budget.set_limits(
                        limits(false, drain, wire_rate, allow),
                        limits(true, drain, wire_rate, allow),
                    );
                    let l = budget.limits();
                    let late = budget.is_late();
                    debug!(
                        window_mib = l.stream as f64 / 1048576.0,
                        wire_window_mib = l.wire as f64 / 1048576.0,
                        inflight_mib = budget.inflight() as f64 / 1048576.0,
                        wire_inflight_mib = budget.wire_inflight() as f64 / 1048576.0,
                        read_mb = budget.read() as f64 / 1e6,
                        rate_mb_s = rate.now / 1e6,
                        peak_mb_s = rate.peak / 1e6,
                        wire_rate_mb_s = wire_rate.now / 1e6,
                        wire_peak_mb_s = wire_rate.peak / 1e6,
                        late,
                        "tunnel window"
                    );
                    // QEMU stops the guest when what is left fits its downtime limit at the
                    // bandwidth it sees; what waits in the tunnel and the final round trip
                    // come on top, so ask QEMU for that much less. The backlog drains at the
                    // slower of its two measures: stream bytes at `drain` (see `stream_drain`),
                    // wire bytes at the current wire rate. QEMU may also stop the guest at
                    // the end of its first pass, when the window is large: until then the
                    // limit may go down to 1 ms, so that QEMU stops the guest only if nothing
                    // at all was dirtied and otherwise iterates once more, behind the late
                    // window. Later it stays at a fifth of the budget or more, or a backlog
                    // that never drains below the budget would keep QEMU from converging.
                    // Read first: QEMU may hold a command's answer until its final round is
                    // written, and that round would then wait behind the window.
                    if watch {
                        watch = watch_pause(qmp).await;
                    }
                    if drain > 0.0 && wire_rate.now > 0.0 && !budget.is_paused() {
                        let backlog_ms = (budget.inflight() as f64 / drain)
                            .max(budget.wire_inflight() as f64 / wire_rate.now)
                            * 1000.0;
                        let rtt_ms = rtt.as_secs_f64() * 1000.0;
                        let target = spec.downtime.as_millis() as f64;
                        let floor = if qemu_round <= 1 { 1.0 } else { target * 0.2 };
                        let switchover_ms = switchover.as_secs_f64() * 1000.0;
                        let want = (target - backlog_ms - rtt_ms - switchover_ms).max(floor).round() as u64;
                        // Set again while under the floor: a lost update must not leave QEMU
                        // at the first pass's 1 ms (it would not converge).
                        if want.abs_diff(qemu_limit) * 5 > qemu_limit || (qemu_limit as f64) < floor {
                            match qmp.execute("migrate-set-parameters", Some(json!({"downtime-limit": want}))).await {
                                Ok(_) => {
                                    debug!(from = qemu_limit, to = want, backlog_ms, "QEMU downtime limit");
                                    qemu_limit = want;
                                }
                                Err(e) => debug!(want, "cannot set QEMU's downtime limit: {e}"),
                            }
                        }
                    }
                }
                polls += 1;
                if polls.is_multiple_of(3) {
                    if watch {
                        watch = watch_pause(qmp).await;
                    }
                    let info = qmp.execute("query-migrate", None).await.unwrap_or(Value::Null);
                    let ram = info.get("ram");
                    let n = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_u64).unwrap_or(0);
                    let mut p = QemuProgress {
                        phase: info.get("status").and_then(Value::as_str).unwrap_or("").to_string(),
                        round: {
                            // Never back: a failed or mismatched query reads as 0.
                            qemu_round = qemu_round.max(n(ram, "dirty-sync-count"));
                            if let Some(r) = ram.and_then(|r| r.get("remaining")).and_then(Value::as_u64) {
                                qemu_remaining = r;
                            }
                            if let Some(t) = ram.and_then(|r| r.get("total")).and_then(Value::as_u64) {
                                budget.ram.store(t, Ordering::Relaxed);
                            }
                            qemu_round
                        },
                        remaining: n(ram, "remaining"),
                        total: n(ram, "total"),
                        dirty_rate: n(ram, "dirty-pages-rate"),
                        stream_bytes: budget.read(),
                        wire_bytes: wire_acked,
                        rate: rate.now,
                        expected_downtime_ms: info.get("expected-downtime").and_then(Value::as_f64),
                        throttle: n(Some(&info), "cpu-throttle-percentage"),
                        stalled_rounds: 0,
                        postcopy,
                        link_down: tunnel.down_since().map(|t| t.elapsed()),
                    };
                    if p.phase == "failed" {
                        let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                        return Err(("transfer", format!("the source QEMU failed the migration: {why}")));
                    }
                    if matches!(p.phase.as_str(), "postcopy-recover" | "postcopy-active") {
                        resuming = None;
                    }
                    // A resumed migration reads as paused until QEMU has connected (10 s).
                    let connecting = resuming.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
                    if p.phase == "postcopy-paused" && !connecting {
                        return Err(("transfer", "the source QEMU paused the post-copy: it lost the destination (its stream or return path broke)".to_string()));
                    }
                    // So far: a failed migration's report tells how far it got.
                    report.throttle = report.throttle.max(p.throttle);
                    report.rounds = report.rounds.max(p.round);
                    if p.total > 0 {
                        report.ram_bytes = p.total;
                    }
                    let throttle = p.throttle.min(100) as u8;
                    let page = match n(ram, "page-size") {
                        0 => 4096,
                        p => p,
                    };
                    let dirty = p.dirty_rate as f64 * page as f64;
                    // Not once the guest is paused: QEMU's last sync then changes nothing, and
                    // the monitor should not be kept busy. Nor from a failed query.
                    let iterating = p.phase == "active" && !budget.is_paused();
                    if let Some(pacer) = pacer.as_mut().filter(|_| iterating)
                        && let Some(s) = pacer.poll(p.round, throttle, dirty, started.elapsed().as_secs_f64(), budget.read())
                    {
                        // A new sync is when QEMU may stop the guest: read its STOP first,
                        // or the window would hold the final round behind this command.
                        if watch {
                            watch = watch_pause(qmp).await;
                        }
                        let set = json!({"cpu-throttle-initial": s.initial, "cpu-throttle-increment": s.increment});
                        match qmp.execute("migrate-set-parameters", Some(set)).await {
                            Ok(_) => debug!(round = p.round, throttle, dirty_mb_s = dirty / 1e6, initial = s.initial, increment = s.increment, "QEMU throttle steps"),
                            Err(e) => {
                                debug!("cannot set QEMU's throttle steps: {e}");
                                pacer.not_set();
                            }
                        }
                    }
                    let stall = if iterating {
                        converge.poll(p.round, throttle, dirty, p.remaining, started.elapsed().as_secs_f64(), budget.read())
                            .map(|s| s.to_string())
                    } else {
                        None
                    };
                    // With post-copy, also after so many rounds whatever they did: QEMU would
                    // have stopped the guest by then if it could, and a guest whose rounds
                    // are too short (or too uneven) for the rule above would otherwise iterate
                    // until the timeout (`internet`, a guest writing twice the link's rate:
                    // 356 rounds in 600 s, never counted).
                    let stall = stall.or_else(|| {
                        (postcopy && iterating && p.round > POSTCOPY_AFTER_ROUNDS).then(|| {
                            format!(
                                "not converged after {} rounds of QEMU's ({} MB dirty)",
                                p.round - 1,
                                p.remaining / 1_000_000
                            )
                        })
                    });
                    let qemu_mbps = ram.and_then(|r| r.get("mbps")).and_then(Value::as_f64).unwrap_or(0.0);
                    debug!(
                        round = p.round,
                        remaining_mb = p.remaining as f64 / 1e6,
                        dirty_pages_rate = p.dirty_rate,
                        transferred_mb = n(ram, "transferred") as f64 / 1e6,
                        normal = n(ram, "normal"),
                        duplicate = n(ram, "duplicate"),
                        throttle = n(Some(&info), "cpu-throttle-percentage"),
                        qemu_mbps,
                        expected_downtime_ms = p.expected_downtime_ms.unwrap_or(0.0),
                        stalled_rounds = converge.stalls(),
                        "QEMU progress"
                    );
                    p.stalled_rounds = converge.stalls();
                    progress(&p);
                    // A guest that dirties its memory as fast as it goes out, with auto-converge
                    // out of steps, never lets QEMU stop it: given up, rolled back. Unless QEMU
                    // has just stopped it after all (its STOP read since the query, by a
                    // command above or now).
                    // With post-copy the guest moves instead, and its memory follows.
                    if let Some(stall) = stall {
                        if watch {
                            watch = watch_pause(qmp).await;
                        }
                        if !budget.is_paused() && !report.postcopy {
                            if !postcopy {
                                return Err(("transfer", stall));
                            }
                            // The tunnel drains first, while the guest still runs here (QEMU's
                            // writes wait): the device state QEMU sends when it stops the guest
                            // then waits behind nothing, and the pause is its own time on the
                            // wire, not the window's.
                            budget.hold.store(true, Ordering::Relaxed);
                            let drained = drain(qmp, &mut watch, tunnel, budget, POSTCOPY_DRAIN).await;
                            // Held low until QEMU stops the guest: its iteration in progress
                            // goes on (it has to, to see the request), but at most
                            // `HOLD_WINDOW` of it waits ahead of the device state. With the
                            // window back at once, 4 MiB of pages did: paused 1029 and 1051 ms
                            // across 300 ms at 50 Mbit/s, 401 ms with nothing ahead.
                            if let Some(e) = tunnel.error() {
                                return Err(("transfer", e));
                            }
                            if watch {
                                watch = watch_pause(qmp).await;
                            }
                            // The window from the stop on (kept in post-copy). Should QEMU have
                            // begun its own last round meanwhile (it holds its monitor until
                            // that is written), its STOP lifts the hold as well.
                            budget.postcopy.store(true, Ordering::Relaxed);
                            // The point of no return: from here the guest runs there. Unless
                            // QEMU stopped the guest meanwhile for its own last round.
                            if !budget.is_paused() {
                                if !spec.cancel.finish() {
                                    return Err(("transfer", CANCELLED.to_string()));
                                }
                                match qmp.execute("migrate-start-postcopy", None).await {
                                    // No answer in time: QEMU may have taken it all the same
                                    // (it only sets a flag its migration thread acts on):
                                    // what it does decides, as below.
                                    Err(e @ QmpError::Timeout { .. }) => warn!(vm = %spec.vm, "migrate-start-postcopy: {e}; asking QEMU what it did"),
                                    // QEMU said no, or the command never reached it: nothing
                                    // changed, the source runs on in pre-copy.
                                    Err(e) => {
                                        budget.postcopy.store(false, Ordering::Relaxed);
                                        return Err(("transfer", format!("{stall}; post-copy did not start: {e}")));
                                    }
                                    Ok(_) => {}
                                }
                                // QEMU takes the request even when it has just begun a pre-copy
                                // end: what it does says which.
                                let asked = Instant::now();
                                report.postcopy = postcopy_began(qmp).await;
                                postcopy_since = report.postcopy.then_some(asked);
                                budget.hold.store(false, Ordering::Relaxed);
                                budget.freed.notify_waiters();
                                if report.postcopy {
                                    // The guest waits at the destination for the device state,
                                    // then for every page it faults on: a stuck block goes
                                    // again after 1.25 round trips, not four.
                                    tunnel.finishing();
                                } else {
                                    budget.postcopy.store(false, Ordering::Relaxed);
                                    budget.freed.notify_waiters();
                                }
                                info!(vm = %spec.vm, round = p.round, remaining_mb = p.remaining as f64 / 1e6, drained, began = report.postcopy, "post-copy: {stall}");
                            } else {
                                // QEMU's own last round: the window lifts for it as ever.
                                budget.postcopy.store(false, Ordering::Relaxed);
                                budget.hold.store(false, Ordering::Relaxed);
                                budget.freed.notify_waiters();
                            }
                        }
                    }
                }
            }
        }
        if let Some((n, digest)) = segments
            && queued == Some(n)
        {
            report.segments = n;
            break digest;
        }
    };
    // Everything is queued: the destination feeds what it has not yet and answers once QEMU
    // has loaded the guest. Meanwhile the tunnel keeps delivering; a failure there ends it.
    if !spec.cancel.finish() {
        return Err(("transfer", CANCELLED.to_string()));
    }
    let finish = MigrationRequest {
        name: &spec.vm,
        op: data::MIGRATION_QEMU_FINISH,
        segments: report.segments,
        // The destination compares it with what it fed its QEMU before QEMU gets the last
        // byte.
        digest: Some(*stream_digest.as_bytes()),
        postcopy: false,
        // Beyond the destination's longest wait: for a block still missing, as long as this
        // side dials (180 s + the retry period), then 60 s for its QEMU to load.
        timeout: Duration::from_secs(180 + 60 + 30) + spec.retry_for,
        stream_session: Some(tunnel.session_id()),
        wait: Duration::ZERO,
    };
    debug!(
        inflight_mib = budget.inflight() as f64 / 1048576.0,
        "stream ended; finishing"
    );
    // The guest is paused now, waiting for every block: a stuck one goes again sooner.
    tunnel.finishing();
    // A control session opened again meanwhile carries the finish (one still being opened
    // is not waited for: the finish opens its own then).
    if let Some(t) = reopening.take_if(|t| t.is_finished())
        && let Ok(Ok(k)) = t.await
    {
        drop(std::mem::replace(control, k));
    }
    // A connection lost before the answer (a link down) is asked again on a new one, for
    // the retry period: the destination answers a repeated FINISH as it did the first.
    // From here on the finish's answer decides, not the tunnel: the destination may have
    // checked the digest and started its QEMU while acknowledgements were lost with their
    // connections. A tunnel that failed with blocks missing makes the destination refuse
    // the finish (its feeder stalls), which is safe to roll back on.
    let mut lost_since: Option<Instant> = None;
    loop {
        let r =
            migration_request_kept(dest.endpoint, dest.addr, dest.expected, &finish, control).await;
        if let Some(e) = tunnel.error() {
            debug!("tunnel failed while finishing ({e}); the finish's answer decides");
        }
        let e = match r {
            Ok(detail) => {
                report.postcopy_seconds = postcopy_since.map(|t| t.elapsed().as_secs_f64());
                return Ok(detail);
            }
            Err(e) => e,
        };
        let lost = matches!(e, SendError::Interrupted { .. } | SendError::Connect(_));
        if lost && lost_since.get_or_insert_with(Instant::now).elapsed() < spec.retry_for {
            warn!(vm = %spec.vm, "the finish's connection was lost ({e}); asking again");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        report.postcopy_seconds = postcopy_since.map(|t| t.elapsed().as_secs_f64());
        return Err(match e {
            // Asked again, and the destination no longer knows the migration: it may have
            // ended it with the answer that was lost (and forgotten that since).
            SendError::Refused { ref reason, .. }
                if lost_since.is_some() && reason.contains("no incoming migration") =>
            {
                (
                    UNKNOWN,
                    format!(
                        "the destination's answer was lost, and it no longer knows the migration: {e}"
                    ),
                )
            }
            // Its QEMU had the whole stream, and is neither confirmed loaded nor gone.
            SendError::Refused { code, .. } if code == ErrorCode::OUTCOME_UNKNOWN => {
                (UNKNOWN, format!("destination: {e}"))
            }
            // The destination answered: its QEMU did not load the guest (and was told to
            // quit; one that had the whole stream is known gone).
            SendError::Refused { .. } => ("resume", format!("destination: {e}")),
            // No answer: the destination may be running the guest already.
            e => (
                UNKNOWN,
                format!("no answer from the destination after the stream ended: {e}"),
            ),
        });
    }
}

/// Migration parameters `dwcp migrate` sets, and capabilities.
const CHANGED_PARAMETERS: [&str; 5] = [
    "downtime-limit",
    "max-bandwidth",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
];
const CHANGED_CAPABILITIES: [&str; 7] = [
    "auto-converge",
    "multifd",
    "postcopy-ram",
    "return-path",
    "pause-before-switchover",
    "switchover-ack",
    "postcopy-preempt",
];

/// Capabilities that an owner (libvirt, an earlier migration) may have left on and that a
/// single tunnelled stream cannot serve: a return path of its own without post-copy (the
/// source would wait for the destination's end message that nothing carries back, with the
/// guest paused), a pause before the switchover waiting for a `migrate-continue` never sent,
/// an acknowledgement of the switchover, a second channel for post-copy's urgent pages.
/// Turned off, where the QEMU has them, for the migration; put back afterwards.
const STREAM_BREAKERS: [&str; 4] = [
    "return-path",
    "pause-before-switchover",
    "switchover-ack",
    "postcopy-preempt",
];

/// The source QEMU's settings a migration changes, as they were before it.
#[derive(Debug, Default)]
struct Saved {
    /// Arguments of `migrate-set-parameters`.
    parameters: serde_json::Map<String, Value>,
    /// Arguments of `migrate-set-capabilities`.
    capabilities: Vec<Value>,
}

/// What the source QEMU has set of what the migration changes, and all its parameters.
async fn read_settings(qmp: &mut Qmp) -> (Saved, Option<Value>) {
    let mut saved = Saved::default();
    let params = match qmp.execute("query-migrate-parameters", None).await {
        Ok(p) => Some(p),
        Err(e) => {
            debug!("query-migrate-parameters: {e}");
            None
        }
    };
    for k in CHANGED_PARAMETERS {
        if let Some(v) = params.as_ref().and_then(|p| p.get(k)) {
            saved.parameters.insert(k.to_string(), v.clone());
        }
    }
    match qmp.execute("query-migrate-capabilities", None).await {
        Ok(Value::Array(caps)) => {
            saved.capabilities = caps
                .into_iter()
                .filter(|c| {
                    c.get("capability")
                        .and_then(Value::as_str)
                        .is_some_and(|n| CHANGED_CAPABILITIES.contains(&n))
                })
                .collect();
        }
        Ok(other) => debug!("query-migrate-capabilities answered {other}"),
        Err(e) => debug!("query-migrate-capabilities: {e}"),
    }
    (saved, params)
}

/// Puts the settings of [`read_settings`] back.
async fn restore_settings(qmp: &mut Qmp, saved: Saved, vm: &str) -> Option<String> {
    let mut failed = Vec::new();
    if !saved.parameters.is_empty() {
        let names: Vec<String> = saved.parameters.keys().cloned().collect();
        if let Err(e) = qmp
            .execute(
                "migrate-set-parameters",
                Some(Value::Object(saved.parameters)),
            )
            .await
        {
            failed.push(format!("parameters {} ({e})", names.join(", ")));
        }
    }
    if !saved.capabilities.is_empty()
        && let Err(e) = qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": saved.capabilities })),
            )
            .await
    {
        let names: Vec<&str> = saved
            .capabilities
            .iter()
            .filter_map(|c| c.get("capability").and_then(Value::as_str))
            .collect();
        failed.push(format!("capabilities {} ({e})", names.join(", ")));
    }
    if failed.is_empty() {
        return None;
    }
    // Said in the report too: a later migration of this QEMU (by hand, by libvirt) would
    // run with what `dwcp migrate` set.
    let w = format!(
        "the source QEMU's migration settings could not be put back as they were (a migration \
         of it still active?): {}; set them once it has ended",
        failed.join("; ")
    );
    warn!(vm, "{w}");
    Some(w)
}

/// QEMU's auto-converge parameters and "tail slow" (QEMU 5.0 on) in its parameters, when
/// there.
fn own_steps(p: &Value) -> Option<(Own, Option<bool>)> {
    let get = |k: &str| {
        p.get(k)
            .and_then(Value::as_u64)
            .and_then(|v| u8::try_from(v).ok())
    };
    let own = Own {
        steps: Steps {
            initial: get("cpu-throttle-initial")?,
            increment: get("cpu-throttle-increment")?,
        },
        max: get("max-cpu-throttle").unwrap_or(Own::QEMU.max),
        trigger: get("throttle-trigger-threshold").unwrap_or(Own::QEMU.trigger),
    };
    Some((own, p.get("cpu-throttle-tailslow").and_then(Value::as_bool)))
}

/// How often the control session is kept alive while the stream goes through the tunnel:
/// well within an agent's idle timeout (120 s by default; a few seconds at the least for
/// this to hold).
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);

/// Reads the QEMU events that have come (waits for none): the event hook lifts the window at
/// `STOP` (see [`Budget::set_paused`]). False once the monitor failed (the next command says
/// why).
async fn watch_pause(qmp: &mut Qmp) -> bool {
    if let Err(e) = qmp.poll_events(Duration::ZERO).await {
        debug!("reading QEMU's events: {e}");
        return false;
    }
    true
}

/// Reads QEMU's stream into segments of at most `max` bytes while the budget allows; returns
/// the segment count and the stream's BLAKE3 digest.
async fn read_segments(
    mut sock: tokio::net::unix::OwnedReadHalf,
    tx: mpsc::Sender<Segment>,
    budget: Arc<Budget>,
    max: usize,
) -> Result<(u64, blake3::Hash), String> {
    let mut hasher = blake3::Hasher::new();
    // A segment closes when full, or when QEMU pauses writing (2 ms).
    const IDLE: Duration = Duration::from_millis(2);
    const SILENCE: Duration = Duration::from_secs(120);
    // QEMU writes its header at once; silence then means it waits for something else (e.g.
    // more channels).
    const FIRST: Duration = Duration::from_secs(20);
    let mut seq = 0u64;
    let mut pass = crate::qemu_stream::FirstPass::default();
    loop {
        loop {
            // Registered before the check: an acknowledgement in between must wake it.
            let notified = budget.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if budget.room() > 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
        let want = max
            .min(budget.block())
            .min(budget.room().max(64 << 10) as usize);
        let mut buf = Vec::with_capacity(want);
        let mut eof = false;
        while buf.len() < want {
            let wait = match (buf.is_empty(), seq) {
                (true, 0) => FIRST,
                (true, _) => SILENCE,
                (false, _) => IDLE,
            };
            match tokio::time::timeout(wait, sock.read_buf(&mut buf)).await {
                Err(_) if buf.is_empty() => {
                    return Err(format!("QEMU sent nothing for {wait:?}"));
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
            hasher.update(&buf);
            budget.take(buf.len() as u64);
            if !budget.is_late() {
                let at = pass.advance(&buf);
                if let Some(total) = pass.total() {
                    budget.ram.store(total, Ordering::Relaxed);
                }
                if let Some(at) = at {
                    budget.saw_offset(at, buf.len());
                }
            }
            tx.send(Segment { seq, bytes: buf })
                .await
                .map_err(|_| "the encoder stopped".to_string())?;
            seq += 1;
        }
        if eof {
            return Ok((seq, hasher.finalize()));
        }
    }
}

/// Whether QEMU went to post-copy after `migrate-start-postcopy` (it switches at its next
/// iteration): its status within 5 s. Still `active` then counts as begun (it was asked).
async fn postcopy_began(qmp: &mut Qmp) -> bool {
    let t = Instant::now();
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .await
            .unwrap_or(Value::Null);
        match info.get("status").and_then(Value::as_str) {
            Some(s) if s.starts_with("postcopy") => return true,
            Some("active") | None if t.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some("active") | None => return true,
            // `device`, `completed`, `failed`: its own pre-copy end came first.
            Some(_) => return false,
        }
    }
}

/// Whether the source QEMU takes post-copy (`postcopy-ram`, with multifd off as the migration
/// sets it): tried, and both put back as they were (the migration sets them later, once the
/// destination has said whether it takes post-copy too). When it does not, a warning says why.
async fn source_takes_postcopy(qmp: &mut Qmp, report: &mut QemuReport) -> bool {
    let refused = |why: String, report: &mut QemuReport| {
        let w = format!("no post-copy: {why}");
        warn!("{w}");
        report.warnings.push(w);
        false
    };
    let caps = match qmp.execute("query-migrate-capabilities", None).await {
        Ok(c) => c,
        Err(e) => {
            return refused(
                format!("the source QEMU did not list its capabilities: {e}"),
                report,
            );
        }
    };
    let state = |name: &str| {
        caps.as_array()
            .into_iter()
            .flatten()
            .find(|c| c.get("capability").and_then(Value::as_str) == Some(name))
            .and_then(|c| c.get("state"))
            .and_then(Value::as_bool)
    };
    let (Some(postcopy), Some(multifd)) = (state("postcopy-ram"), state("multifd")) else {
        return refused(
            "the source QEMU has no postcopy-ram capability".into(),
            report,
        );
    };
    let on =
        json!({"capabilities": [capability("multifd", false), capability("postcopy-ram", true)]});
    let took = qmp.execute("migrate-set-capabilities", Some(on)).await;
    let back = json!({"capabilities": [capability("postcopy-ram", postcopy), capability("multifd", multifd)]});
    if let Err(e) = qmp.execute("migrate-set-capabilities", Some(back)).await {
        warn!("cannot put the source QEMU's postcopy-ram and multifd back: {e}");
    }
    match took {
        Ok(_) => true,
        Err(e) => refused(format!("the source QEMU refused it: {e}"), report),
    }
}

/// With post-copy, it begins at the latest once QEMU's dirty-sync count passes this: ten
/// rounds over what the guest dirtied after the first pass.
const POSTCOPY_AFTER_ROUNDS: u64 = 11;

/// What may be in the tunnel while it drains before post-copy, and until QEMU stops the guest.
const HOLD_WINDOW: u64 = 256 << 10;

/// Longest wait for the tunnel to drain before post-copy begins.
const POSTCOPY_DRAIN: Duration = Duration::from_secs(15);

/// Waits (at most `limit`) until what was read from QEMU and not acknowledged is down to
/// [`HOLD_WINDOW`] ([`Budget::hold`] keeps it there); whether it got there.
/// QEMU's events are read meanwhile (`watch`: while its monitor answers), so that its STOP
/// ends the wait and lifts the hold: a last round it began by itself must not go through
/// the hold.
async fn drain(
    qmp: &mut Qmp,
    watch: &mut bool,
    tunnel: &Tunnel,
    budget: &Budget,
    limit: Duration,
) -> bool {
    let t = Instant::now();
    loop {
        // The reader takes at least 64 KiB at a time: the hold's bound plus one read.
        if budget.inflight() <= HOLD_WINDOW + (64 << 10) {
            return true;
        }
        if *watch {
            *watch = watch_pause(qmp).await;
        }
        if budget.is_paused() || t.elapsed() >= limit || tunnel.error().is_some() {
            return false;
        }
        tunnel.wait_progress(Duration::from_millis(20)).await;
    }
}

/// Carries the destination QEMU's return path into the source QEMU's socket (`sock`): asks
/// the destination for what its QEMU wrote from the last byte on, until it says the path
/// ended. A lost connection is opened again; `retry_for` (at least 30 s) without an answer
/// fail it.
async fn carry_return(
    endpoint: dwcp_transport::Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<dwcp_wire::NodeId>,
    vm: String,
    mut sock: tokio::net::unix::OwnedWriteHalf,
    retry_for: Duration,
    stream: [u8; 16],
) -> Result<(), String> {
    let silent = retry_for.max(Duration::from_secs(30));
    let mut session = KeptSession::new();
    let mut offset = 0u64;
    let mut answered = Instant::now();
    let r = loop {
        let ask = MigrationRequest {
            name: &vm,
            op: data::MIGRATION_QEMU_RETURN,
            segments: offset,
            digest: None,
            postcopy: false,
            timeout: Duration::from_secs(10),
            stream_session: Some(stream),
            wait: Duration::ZERO,
        };
        match migration_request_data(&endpoint, addr, expected.as_ref(), &ask, &mut session).await {
            Ok((detail, bytes)) => {
                answered = Instant::now();
                if !bytes.is_empty() {
                    debug!(vm, offset, bytes = bytes.len(), "return path bytes");
                    if let Err(e) = sock.write_all(&bytes).await {
                        break Err(format!("the source QEMU's return path: {e}"));
                    }
                    offset += bytes.len() as u64;
                }
                if detail == "end" {
                    debug!(vm, bytes = offset, "return path ended");
                    break Ok(());
                }
            }
            Err(e @ SendError::Refused { .. }) => {
                break Err(format!("the destination's return path: {e}"));
            }
            Err(e) if answered.elapsed() > silent => {
                break Err(format!(
                    "the destination's return path: no answer for {silent:?}: {e}"
                ));
            }
            Err(e) => {
                debug!(vm, "return path: {e}; asking again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    session.close().await;
    r
}

/// Encodes segments, two at a time (one per core), into blocks in stream order. Returns the
/// receiving end of the blocks at once; the blocks follow as they are ready. An encoder that
/// fails (panics) ends them with its error: blocks missing from the stream must not read as
/// its end.
fn encode_segments(
    mut rx: mpsc::Receiver<Segment>,
    delta: bool,
    codec: Codec,
    remote: Arc<Option<RwLock<RemoteIndex>>>,
    max_wire: usize,
) -> mpsc::Receiver<Result<Encoded, String>> {
    let (btx, brx) = mpsc::channel::<Result<Encoded, String>>(4);
    tokio::spawn(async move {
        enum Next {
            Segment(Segment),
            Ended,
            Encoded(Result<Encoded, tokio::task::JoinError>),
        }
        let mut pending = std::collections::VecDeque::new();
        let mut ended = false;
        loop {
            let full = pending.len() >= 2;
            let next = match pending.front_mut() {
                // Both cores busy, or nothing more to come: the oldest goes out when done.
                Some(front) if full || ended => Next::Encoded(front.await),
                None if ended => return, // everything went out
                None => rx.recv().await.map_or(Next::Ended, Next::Segment),
                // One encoding: the next segment joins it if it comes first; if not, this one
                // goes out as soon as it is done. It must not wait for a next segment: under
                // post-copy the source QEMU goes quiet after answering a page request, or
                // after its last page until the destination says it is done.
                Some(front) => tokio::select! {
                    s = rx.recv() => s.map_or(Next::Ended, Next::Segment),
                    r = front => Next::Encoded(r),
                },
            };
            match next {
                Next::Segment(seg) => {
                    let rm = remote.clone();
                    pending.push_back(tokio::task::spawn_blocking(move || {
                        let index = rm
                            .as_ref()
                            .as_ref()
                            .map(|l| l.read().unwrap_or_else(std::sync::PoisonError::into_inner));
                        encode_segment(seg, delta, codec, index.as_deref(), max_wire)
                    }));
                }
                Next::Ended => ended = true,
                Next::Encoded(r) => {
                    // Done: dropped, not polled again.
                    pending.pop_front();
                    let block = r.map_err(|e| format!("encoding the stream failed: {e}"));
                    let failed = block.is_err();
                    if btx.send(block).await.is_err() || failed {
                        return;
                    }
                }
            }
        }
    });
    brx
}

/// Moves encoded blocks into the tunnel, and acknowledgements into the window, until the
/// last block is queued; returns how many were, and the stream bytes they sent by reference
/// to the destination's cache. The pages of each block the destination decoded go into
/// `known`: it has learned them, so later blocks refer to them (a page that occurs twice in
/// guest RAM crosses once), and a reference it cannot resolve after all makes that block go
/// out raw.
async fn forward(
    mut blocks: mpsc::Receiver<Result<Encoded, String>>,
    tunnel: Arc<Tunnel>,
    budget: Arc<Budget>,
    known: Arc<Option<RwLock<RemoteIndex>>>,
) -> Result<(u64, u64), String> {
    let (mut queued, mut cached) = (0u64, 0u64);
    // Pages of blocks not yet acknowledged, by seq (bounded by the window).
    let mut pages: HashMap<u64, Vec<u64>> = HashMap::new();
    // Pages of decoded blocks not yet in `known`.
    let mut learned: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            b = blocks.recv() => match b {
                Some(Err(e)) => return Err(e),
                Some(Ok(e)) => {
                    cached += e.cache_bytes;
                    if known.is_some() && !e.pages.is_empty() {
                        pages.insert(e.block.seq, e.pages);
                    }
                    let wire = e.block.encoded.as_ref().map_or(e.block.raw.len(), |(_, b)| b.len());
                    budget.forward(e.block.raw.len() as u64, wire as u64);
                    tunnel.send(e.block).map_err(|e| e.to_string())?;
                    queued += 1;
                }
                None => return Ok((queued, cached)),
            },
            () = tunnel.wait_progress(Duration::from_millis(50)) => {
                let (acked_raw, wire_acked, in_order) = tunnel.window_acked();
                budget.set_acked(acked_raw, wire_acked, in_order);
                if let Some(e) = tunnel.error() {
                    return Err(e);
                }
                learned.extend(
                    tunnel
                        .take_acked()
                        .into_iter()
                        .filter_map(|(seq, decoded)| pages.remove(&seq).filter(|_| decoded))
                        .flatten(),
                );
                // Not waiting on encoders that read the index on other threads (this is an
                // async task): what cannot go in now goes in at the next acknowledgement.
                if let (Some(k), false) = (known.as_ref(), learned.is_empty())
                    && let Ok(mut k) = k.try_write() {
                        for h in learned.drain(..) {
                            k.insert(h);
                        }
                    }
            }
        }
    }
}

/// A segment ready for the tunnel.
struct Encoded {
    block: Block,
    /// Stream bytes sent as references to the destination's cache.
    cache_bytes: u64,
    /// `fast64` of each guest page in the block, when it went out encoded.
    pages: Vec<u64>,
}

/// A segment goes encoded even when that is up to 1/RAW_SLACK larger than raw (incompressible
/// pages, each with an op and its record header as a literal of its own: about 0.2 %). The
/// destination learns the pages of the blocks it decodes, never those of a raw block: sent
/// raw, a guest's random pages would cross again in full on every later migration.
const RAW_SLACK: usize = 64;

/// One segment as a block: HDE stream-encoded against the destination's cache unless that
/// makes it more than [`RAW_SLACK`] larger, or larger than `max_wire` (what one frame of the
/// tunnel carries), raw otherwise; with the bytes it refers to in the cache. Guest pages
/// found in it are chunks of their own ([`crate::qemu_stream`]).
fn encode_segment(
    seg: Segment,
    hde: bool,
    codec: Codec,
    remote: Option<&RemoteIndex>,
    max_wire: usize,
) -> Encoded {
    let raw = Bytes::from(seg.bytes);
    let mut cache_bytes = 0;
    let mut pages = Vec::new();
    let encoded = hde
        .then(|| {
            let cfg = StreamConfig {
                codec,
                ..StreamConfig::default()
            };
            StreamEncoder::new(cfg).ok().map(|mut enc| {
                let mut out = Vec::with_capacity(raw.len() / 2 + 1024);
                // Guest pages as chunks of their own, the bytes between them cut by content.
                let mut at = 0;
                for page in crate::qemu_stream::page_spans(&raw) {
                    enc.push(&raw[at..page.start], remote, &mut out);
                    enc.push_chunk(&raw[page.clone()], remote, &mut out);
                    pages.push(dwcp_encoding::fast64(&raw[page.clone()]));
                    at = page.end;
                }
                enc.push(&raw[at..], remote, &mut out);
                cache_bytes = enc.finish(remote, &mut out).cache_bytes;
                out
            })
        })
        .flatten()
        .filter(|out| out.len() <= (raw.len() + raw.len() / RAW_SLACK).min(max_wire))
        .map(|out| (data::TUNNEL_HDE_STREAM, Bytes::from(out)));
    if encoded.is_none() {
        cache_bytes = 0;
        pages.clear();
    }
    Encoded {
        block: Block {
            seq: seg.seq,
            raw,
            encoded,
        },
        cache_bytes,
        pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_in_time_stops_the_finish_and_one_too_late_says_so() {
        let c = Cancel::default();
        assert!(!c.is_cancelled() && !c.is_finishing());
        assert!(c.cancel());
        assert!(c.cancel(), "cancelling twice is still cancelled");
        assert!(c.is_cancelled());
        assert!(!c.finish(), "the finish must not go after a cancel");
        assert!(!c.is_finishing());

        let c = Cancel::default();
        assert!(c.finish());
        assert!(!c.cancel(), "too late once the finish went");
        assert!(c.is_finishing() && !c.is_cancelled());
        // A clone is the same cancel (the signal handler holds one).
        let c = Cancel::default();
        let other = c.clone();
        assert!(other.cancel());
        assert!(c.is_cancelled());
        assert!(!c.source_done());
    }

    const MB: f64 = 1e6;

    fn l(stream: u64, wire: u64) -> Limits {
        Limits { stream, wire }
    }

    /// QEMU page records (the first naming its RAM block) holding `n` pages of random bytes.
    fn random_page_records(n: u64, seed: u64) -> Vec<u8> {
        let mut seg = Vec::new();
        let mut x = seed | 1;
        for i in 0..n {
            let flags: u64 = if i == 0 { 0x08 } else { 0x08 | 0x20 };
            seg.extend_from_slice(&((i << 12) | flags).to_be_bytes());
            if i == 0 {
                seg.push(6);
                seg.extend_from_slice(b"pc.ram");
            }
            for _ in 0..crate::qemu_stream::PAGE / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                seg.extend_from_slice(&x.to_le_bytes());
            }
        }
        seg
    }

    fn block(name: &str, offset: u64, used: u64) -> RamBlockInfo {
        RamBlockInfo {
            name: name.into(),
            offset,
            used,
        }
    }

    #[test]
    fn only_a_failure_after_the_destination_runs_the_guest_leaves_it_there() {
        assert!(runs_at_destination(CLEANUP, "running"));
        // With -S the destination waits (not running it, but holding it: see
        // `after_the_point`).
        assert!(!runs_at_destination(CLEANUP, "paused"));
        assert!(!runs_at_destination(CLEANUP, ""));
        for phase in ["prepare", "start", "transfer", "resume", UNKNOWN] {
            assert!(!runs_at_destination(phase, "running"), "{phase}");
        }
    }

    #[test]
    fn with_post_copy_on_no_failure_past_the_point_rolls_back() {
        let at = |phase, began, exposed, status| {
            after_the_point((phase, "why".to_string()), began, exposed, status)
        };
        // Nothing exposed: as it was.
        for phase in ["prepare", "start", "transfer", "resume", UNKNOWN] {
            assert_eq!(at(phase, false, false, "").0, phase);
        }
        // Past a finish the destination answered, even with no state in its answer.
        let (p, why) = at(CLEANUP, false, false, "");
        assert_eq!(p, UNKNOWN);
        assert!(why.contains("had loaded the guest, and keeps it"), "{why}");
        // Post-copy began: whatever failed (a cleanup too, with -S at the destination), both
        // sides stay as QEMU keeps them.
        for phase in ["transfer", "resume", CLEANUP] {
            assert_eq!(at(phase, true, true, "paused").0, POSTCOPY, "{phase}");
        }
        // Negotiated and the guest stopped at the source once: the destination may have
        // started it, so no rollback, and the reason says why.
        for phase in ["transfer", "resume"] {
            let (p, why) = at(phase, false, true, "");
            assert_eq!(p, UNKNOWN, "{phase}");
            assert!(why.starts_with("why (with post-copy on"), "{why}");
        }
        // A guest that runs there already, and an unknown outcome, stay what they are.
        assert_eq!(at(CLEANUP, true, true, "running").0, CLEANUP);
        assert_eq!(at(UNKNOWN, true, true, "").0, UNKNOWN);
        // The destination loaded the guest and waits (`-S`): the source's own end failing
        // afterwards is no reason to run it at the source again.
        for exposed in [false, true] {
            let (p, why) = at(CLEANUP, false, exposed, "prelaunch");
            assert_eq!(p, UNKNOWN);
            assert!(why.contains("had loaded the guest"), "{why}");
        }
    }

    #[test]
    fn tcg_blocks_of_a_whole_number_of_256_kib_are_warned_about_before_qemu_9() {
        let one = |used| vec![block("pc.ram", 0, used)];
        let w = tcg_lost_writes((7, 2), &one(1 << 30)).expect("7.2, 1 GiB");
        assert!(
            w.contains("03bfc2188f") && w.contains("pc.ram (1048576 KiB)"),
            "{w}"
        );
        assert!(tcg_lost_writes((8, 2), &one(256 << 20)).is_some());
        assert!(
            tcg_lost_writes((9, 0), &one(1 << 30)).is_none(),
            "fixed in 9.0"
        );
        assert!(
            tcg_lost_writes((7, 2), &one((256 << 20) + 8192)).is_none(),
            "slow sync path"
        );
        assert!(tcg_lost_writes((7, 2), &one(0)).is_none());
        assert!(tcg_lost_writes((7, 2), &[]).is_none());

        // Two NUMA nodes: the total is no whole number of 256 KiB, the second node is.
        let mib = 1 << 20;
        let nodes = [
            block("m0", 0, 512 * mib + 8192),
            block("m1", 513 * mib, 512 * mib),
            block("pc.bios", 1025 * mib, 256 << 10),
        ];
        let w = tcg_lost_writes((7, 2), &nodes).expect("m1 is on the fast path");
        assert!(w.contains("m1 (524288 KiB)") && !w.contains("m0"), "{w}");
        assert!(!w.contains("pc.bios"), "firmware is not written: {w}");
        // The total is, no node is: the same length in the wrong place.
        let nodes = [
            block("m0", 0, 512 * mib + (128 << 10)),
            block("m1", 512 * mib + (128 << 10), 512 * mib + (128 << 10)),
        ];
        assert!(tcg_lost_writes((7, 2), &nodes).is_none());
    }

    proptest::proptest! {
        /// Whatever a monitor answers, the parse returns or declines; each block it returns
        /// is one line of the answer.
        #[test]
        fn any_monitor_answer_parses_or_is_declined(
            lines in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::string::string_regex("[a-z./@0-9]{0,12}").unwrap(),
                        proptest::string::string_regex("0x[0-9a-f]{0,18}").unwrap(),
                        proptest::prelude::Just("KiB".to_string()),
                        proptest::string::string_regex(".{0,8}").unwrap(),
                    ],
                    0..8,
                ),
                0..6,
            ),
            header in proptest::prelude::any::<bool>(),
        ) {
            let mut text = String::new();
            if header {
                text.push_str("Block Name PSize Offset Used Total\r\n");
            }
            for l in &lines {
                text.push_str(&l.join(" "));
                text.push_str("\r\n");
            }
            if let Some(blocks) = parse_ramblocks(&text) {
                proptest::prop_assert!(!blocks.is_empty() && blocks.len() <= lines.len());
            }
        }
    }

    #[test]
    fn ram_blocks_are_read_from_the_monitor() {
        // QEMU 7.2's answer for a guest of two NUMA nodes, started with -S.
        let text = "              Block Name    PSize              Offset               Used              Total\r\n                      m0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000\r\n                      m1    4 KiB  0x0000000010000000 0x0000000010000000 0x0000000010000000\r\n    /rom@etc/acpi/tables    4 KiB  0x0000000020080000 0x0000000000020000 0x0000000000200000\r\n                 pc.bios    4 KiB  0x0000000020000000 0x0000000000040000 0x0000000000040000\r\n";
        let b = parse_ramblocks(text).expect("read");
        assert_eq!(
            b,
            vec![
                block("m0", 0, 0x1000_0000),
                block("m1", 0x1000_0000, 0x1000_0000),
                block("/rom@etc/acpi/tables", 0x2008_0000, 0x2_0000),
                block("pc.bios", 0x2000_0000, 0x4_0000),
            ]
        );
        assert!(parse_ramblocks("").is_none());
        assert!(parse_ramblocks("unknown command: 'info ramblock'").is_none());
        let header = "Block Name    PSize    Offset    Used    Total\n";
        assert!(parse_ramblocks(header).is_none(), "no blocks");
        assert!(parse_ramblocks(&format!("{header}pc.ram 4 KiB 0xzz 0x10 0x10")).is_none());
        assert!(parse_ramblocks(&format!("{header}pc.ram 0x0 0x10")).is_none());
        assert_eq!(
            parse_ramblocks(&format!("{header}my ram 4 KiB 0x0 0x10 0x10")),
            Some(vec![block("my ram", 0, 0x10)])
        );
    }

    #[test]
    fn incompressible_pages_go_encoded_so_the_destination_learns_them() {
        use dwcp_encoding::stream::{Progress, StreamDecoder};
        use dwcp_encoding::{BaselineCache, CacheConfig};
        let seg = random_page_records(32, 0x9e37_79b9_7f4a_7c15);
        let encode = |remote: Option<&RemoteIndex>, max_wire: usize| {
            let seg = Segment {
                seq: 0,
                bytes: seg.clone(),
            };
            encode_segment(seg, true, Codec::Zstd(2), remote, max_wire)
        };
        let e = encode(None, usize::MAX);
        let (encoding, bytes) = e.block.encoded.clone().expect("sent encoded, not raw");
        assert_eq!(encoding, data::TUNNEL_HDE_STREAM);
        assert!(bytes.len() >= seg.len(), "random pages do not shrink");
        assert!(bytes.len() <= seg.len() + seg.len() / RAW_SLACK);
        assert_eq!(e.pages.len(), 32);

        // The destination decodes the block, and so learns its pages ...
        let mut cache = BaselineCache::open(CacheConfig::memory(16 << 20)).unwrap();
        let mut out = Vec::new();
        let mut dec = StreamDecoder::with_limit(seg.len() as u64);
        assert_eq!(
            dec.push(&bytes, &mut out, &mut cache).unwrap(),
            Progress::Done
        );
        dec.finish().unwrap();
        assert_eq!(out, seg);

        // ... which a later migration of the same pages sends by reference.
        let remote = RemoteIndex::from_hashes(cache.summary());
        let again = encode(Some(&remote), usize::MAX);
        assert_eq!(again.cache_bytes, 32 * 4096);
        let (_, small) = again.block.encoded.expect("encoded");
        assert!(small.len() < seg.len() / 50, "{} bytes", small.len());

        // Where a frame carries no more than the raw segment, it goes raw: larger, it could
        // not be sent at all.
        let capped = encode(None, seg.len());
        assert!(capped.block.encoded.is_none());
        assert!(capped.pages.is_empty() && capped.cache_bytes == 0);
    }

    /// A rate that went `now` lately and `peak` at its best.
    fn rate(now: f64, peak: f64) -> Rate {
        Rate { now, peak }
    }

    #[test]
    fn the_first_pass_holds_much_by_reference_but_half_a_second_of_wire() {
        let allow = Duration::from_millis(100);
        let l = limits(false, 150.0 * MB, rate(50.0 * MB, 50.0 * MB), allow);
        assert_eq!(l.stream, FIRST_PASS_WINDOW);
        assert_eq!(l.wire, 25_000_000);
        // The wire went slower for a moment (the encoder fell behind): the window stays what
        // the path has shown it carries, so that it does not shrink with the rate it holds.
        let l = limits(false, 150.0 * MB, rate(11.0 * MB, 40.0 * MB), allow);
        assert_eq!(l.wire, 20_000_000);
        // Pages went by reference so far, at 3 MB/s of wire: the floor.
        let l = limits(false, 150.0 * MB, rate(3.0 * MB, 3.3 * MB), allow);
        assert_eq!(l.wire, LATE_WINDOW);
        // Nothing measured yet.
        let l = limits(false, 0.0, Rate::default(), allow);
        assert_eq!((l.stream, l.wire), (FIRST_PASS_WINDOW, START_WINDOW));
        // A fast path: capped.
        assert_eq!(
            limits(false, 0.0, rate(1e9, 1e9), allow).wire,
            FIRST_PASS_WINDOW
        );
    }

    #[test]
    fn late_the_backlog_drains_within_the_allowance_at_both_rates() {
        // dc-like: pages by reference went at 300 MB/s, the wire at 100 MB/s.
        let allow = Duration::from_millis(150);
        let l = limits(true, 300.0 * MB, rate(100.0 * MB, 100.0 * MB), allow);
        assert_eq!(l.stream, 45_000_000);
        assert_eq!(l.wire, 15_000_000);
        // internet-like, dirty pages: the window holds the stream to 25 MB/s, but the
        // destination took 170 MB/s of it in the first pass. The stream limit is what it
        // decodes within the allowance; the wire limit what crosses, here under the floor.
        let allow = Duration::from_millis(62);
        let drain = stream_drain(rate(25.0 * MB, 170.0 * MB), false);
        let l = limits(true, drain, rate(13.0 * MB, 24.0 * MB), allow);
        assert_eq!(l.stream, 10_540_000);
        assert_eq!(l.wire, LATE_WINDOW);
        // Both under the floor.
        let l = limits(true, 18.0 * MB, rate(20.0 * MB, 20.0 * MB), allow);
        assert_eq!((l.stream, l.wire), (LATE_WINDOW, LATE_WINDOW));
        // On a short path the CPUs, not the window, hold the stream: it drains at its rate.
        assert_eq!(stream_drain(rate(250.0 * MB, 400.0 * MB), true), 250.0 * MB);
    }

    #[test]
    fn a_rate_keeps_its_peak_for_a_while_and_lets_it_go() {
        let mut r = Rate::default();
        r.sample(100.0, 0.2);
        assert_eq!(r, rate(100.0, 100.0));
        // Held down: the smoothed rate follows within a second, the peak stays near.
        for _ in 0..5 {
            r.sample(10.0, 0.2);
        }
        assert!(r.now < 20.0, "{r:?}");
        assert!(r.peak > 90.0, "{r:?}");
        // Slower for good: the peak halves in 30 s (150 samples of 0.2 s)...
        for _ in 0..145 {
            r.sample(10.0, 0.2);
        }
        assert!((49.0..51.0).contains(&r.peak), "{r:?}");
        // ... with time, however the samples come: 30 s more in 10 samples halves it again.
        let before = r.peak;
        for _ in 0..10 {
            r.sample(10.0, 3.0);
        }
        assert!((0.49..0.51).contains(&(r.peak / before)), "{r:?}");
        // Never below the smoothed rate.
        for _ in 0..2000 {
            r.sample(10.0, 0.2);
        }
        assert!((r.peak - r.now).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn room_is_the_tighter_of_stream_and_wire() {
        let b = Budget::new();
        b.set_limits(l(64 << 20, 4 << 20), l(1 << 20, 1 << 20));
        // 32 MiB read, then sent by reference in 1 MiB on the wire.
        b.take(32 << 20);
        assert_eq!(b.room(), 0, "not encoded yet: counts whole on the wire");
        b.forward(32 << 20, 1 << 20);
        assert_eq!(b.wire_inflight(), 1 << 20);
        assert_eq!(b.room(), 3 << 20);
        b.set_acked(32 << 20, 1 << 20, 32 << 20);
        assert_eq!((b.inflight(), b.wire_inflight()), (0, 0));
        // 3 MiB of new pages in the tunnel, whole on the wire: the wire limit binds.
        b.take(3 << 20);
        b.forward(3 << 20, 3 << 20);
        assert_eq!(b.room(), 1 << 20);
        // A stream limit under what is in flight binds in turn.
        b.set_limits(l(2 << 20, 64 << 20), l(1 << 20, 1 << 20));
        assert_eq!(b.room(), 0);
    }

    #[test]
    fn once_the_guest_is_paused_only_the_gap_bounds_the_reader() {
        let b = Budget::new();
        b.set_limits(l(64 << 20, 64 << 20), l(4 << 20, 4 << 20));
        b.set_late();
        b.take(4 << 20);
        b.forward(4 << 20, 3 << 20);
        assert_eq!(b.room(), 0, "the late window is full");
        // Woken at once: the reader waits on `freed`.
        let woken = b.freed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        b.set_paused(true);
        assert!(futures_ready(woken.as_mut()));
        assert_eq!(b.room(), GAP_LIMIT - (4 << 20));
        // Acknowledged beyond a gap still counts against it: all but the first MiB.
        b.take(GAP_LIMIT - (4 << 20));
        b.set_acked(GAP_LIMIT - (1 << 20), GAP_LIMIT, 1 << 20);
        assert_eq!(b.room(), 1 << 20);
        b.set_acked(GAP_LIMIT, GAP_LIMIT, GAP_LIMIT);
        assert_eq!(b.room(), GAP_LIMIT);
        // Running again: the window is back.
        b.set_paused(false);
        b.take(4 << 20);
        b.forward(GAP_LIMIT + (4 << 20), GAP_LIMIT + (4 << 20));
        assert_eq!(b.room(), 0);
    }

    /// Whether a future is ready at its first poll.
    fn futures_ready<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn what_is_acknowledged_beyond_a_gap_is_bounded_too() {
        let b = Budget::new();
        let big = l(1 << 40, 1 << 40);
        b.set_limits(big, big);
        b.take(200 << 20);
        b.forward(200 << 20, 200 << 20);
        // All but one early block acknowledged: the window is nearly empty, but 100 MiB of
        // it waits at the destination behind that block.
        b.set_acked(199 << 20, 199 << 20, 100 << 20);
        assert_eq!(b.inflight(), 1 << 20);
        assert_eq!(b.room(), GAP_LIMIT - (100 << 20));
        b.take(GAP_LIMIT - (100 << 20));
        assert_eq!(b.room(), 0);
        // The block arrives.
        b.set_acked(200 << 20, 200 << 20, 200 << 20);
        assert_eq!(b.room(), 100 << 20);
    }

    /// The reader takes `n` segments of page data (a page per 4 KiB of stream) from `from`.
    fn pages(b: &Budget, from: u64, n: u64) -> u64 {
        const SEG: u64 = 256 << 10;
        let mut at = from;
        for _ in 0..n {
            at += SEG;
            b.saw_offset(at, SEG as usize);
        }
        at
    }

    #[test]
    fn the_late_window_applies_once_the_reader_nears_the_end_of_ram() {
        let b = Budget::new();
        b.set_limits(l(64 << 20, 16 << 20), l(4 << 20, 4 << 20));
        b.take(8 << 20);
        assert_eq!(b.room(), 8 << 20);
        // RAM size not known yet: no guess.
        let at = pages(&b, 0, 400);
        assert!(!b.is_late());
        b.ram.store(1 << 30, Ordering::Relaxed);
        // Too far ahead for one segment: guest data that looks like a record.
        b.saw_offset(1000 << 20, 256 << 10);
        assert!(!b.is_late());
        // Page data up to 40 MiB before the end, then 8 MiB more.
        let at = pages(&b, at, ((1 << 30) - (40 << 20) - at) / (256 << 10));
        assert!(!b.is_late(), "{} MiB left", ((1 << 30) - at) >> 20);
        pages(&b, at, 32);
        assert!(b.is_late());
        assert_eq!(b.room(), 0, "8 MiB in flight, late window 4 MiB");
        // And it stays late.
        b.saw_offset(0, 1);
        assert!(b.is_late());
    }

    #[test]
    fn on_a_guest_of_two_large_blocks_the_late_window_applies_in_the_second() {
        // Two blocks of 40 MiB (a NUMA guest's nodes, say): offsets restart at the second,
        // and never come within 32 MiB of the 80 MiB of RAM.
        let (s, ends) =
            crate::qemu_stream::testing::stream_with_setup(&[("m0", 10240), ("m1", 10240)], false);
        let b = Budget::new();
        let mut pass = crate::qemu_stream::FirstPass::default();
        let mut late_at = None;
        let mut to = 0;
        for piece in s.chunks(256 << 10) {
            to += piece.len();
            if let Some(at) = pass.advance(piece) {
                b.ram.store(pass.total().unwrap(), Ordering::Relaxed);
                b.saw_offset(at, piece.len());
            }
            if b.is_late() && late_at.is_none() {
                late_at = ends.iter().filter(|e| e.0 <= to).map(|e| e.1).max();
            }
        }
        let late_at = late_at.expect("never late");
        assert!(
            ((48 << 20)..(49 << 20)).contains(&late_at),
            "late at {} KiB of RAM",
            late_at >> 10
        );
    }

    #[test]
    fn over_zero_pages_the_end_of_ram_is_seen_further_ahead() {
        let b = Budget::new();
        b.ram.store(1 << 30, Ordering::Relaxed);
        let mut at = pages(&b, 0, 2800); // 700 MiB
        // Zero-page records, 9 bytes a page, 64 KiB of stream at a time: QEMU may be 227 MiB
        // (512 KiB of such stream) ahead of the reader.
        while !b.is_late() && at < 1 << 30 {
            at += (64 << 10) / 9 * 4096;
            b.saw_offset(at, 64 << 10);
        }
        let left = ((1u64 << 30) - at) >> 20;
        assert!((200..240).contains(&left), "late with {left} MiB left");
    }

    #[test]
    fn an_offset_out_of_reach_is_taken_once_enough_was_read() {
        let b = Budget::new();
        b.ram.store(1 << 30, Ordering::Relaxed);
        // A jump of 200 MiB: out of reach for one 256 KiB segment (113 MiB of zero pages) ...
        b.saw_offset(200 << 20, 256 << 10);
        assert_eq!(b.offset.load(Ordering::Relaxed), 0);
        // ... but not for two.
        b.saw_offset(200 << 20, 256 << 10);
        assert_eq!(b.offset.load(Ordering::Relaxed), 200 << 20);
    }
}
