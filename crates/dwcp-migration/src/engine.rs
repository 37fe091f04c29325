//! The source side of a live migration of a [`MemoryVm`] to a destination node: drives the
//! [`Orchestrator`], sending each round as an HDE page object over a transfer session.
//!
//! Each round takes the VM's dirty set, copies those pages, and encodes them against what the
//! destination holds: the content it was sent last for that address (the *shadow*, so an
//! edited page travels as an XOR delta), the destination's baseline cache (round 0, from the
//! summary asked for in the prepare phase), duplicates, zero pages. The destination applies
//! rounds in place to a migration target that a `MIGRATION` commit publishes at the end; a
//! rollback aborts it. After the commit, the pages of the paused source and of the
//! destination are compared, hash by hash.

use std::io::Write;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dwcp_encoding::chooser::{Chooser, Pacer};
use dwcp_encoding::{Codec, EncoderConfig, PageEncoder, RemoteIndex};
use dwcp_transport::Endpoint;
use dwcp_transport::session::{
    BaseRequest, CopyState, DeltaOptions, KeptSession, RateLimit, SendError, SendOptions, Source,
    TcpCounts, migration_op_kept, query_base_kept, query_copy_kept, send_files_kept,
};
use dwcp_wire::{ErrorCode, NodeId, Version, data};
use tracing::{debug, info, warn};

use crate::memvm::{MemoryVm, PageReader};
use crate::orchestrator::{
    Action, Config, Event, Orchestrator, Outcome, Phase, RoundStats, SourceCaps,
};
use crate::shadow::Shadow;

/// Where to and how.
#[derive(Debug, Clone)]
pub struct MigrationSpec {
    /// Name of the VM's memory image at the destination.
    pub name: String,
    /// Orchestrator tuning (downtime budget, rounds, throttle steps).
    pub config: Config,
    /// Whether the guest may be throttled (auto-converge).
    pub throttle: bool,
    /// Compressor; `None` lets the chooser pick for `link_bps`.
    pub codec: Option<Codec>,
    /// The link's bandwidth, bytes per second, for the chooser.
    pub link_bps: u64,
    /// Parallel connections per round.
    pub streams: u32,
    /// A big round goes as objects of `first_part_pages` pages, then twice as many each
    /// time up to `max_part_pages`, each encoded while the one before it is sent.
    pub first_part_pages: usize,
    /// See `first_part_pages`.
    pub max_part_pages: usize,
    /// With a destination that speaks v5, send a round's next part on a second session while
    /// the one before it waits for its last packets and its verdict.
    pub overlap_parts: bool,
    /// A cap on the rounds' sending rate, shared by every session of the migration (and by
    /// every migration given a clone of this spec: clone the cap's rate instead for a cap
    /// of their own).
    pub rate_limit: Option<RateLimit>,
    /// Most bytes of page contents kept at the source as the bases of XOR deltas (what the
    /// destination holds); `u64::MAX` keeps every page sent. Pages beyond it are encoded as
    /// new ones when written again.
    pub shadow_bytes: u64,
    /// Cancelled (by the user: SIGINT, SIGTERM), the migration rolls back at once if the
    /// guest is not paused yet; once it is, the final round goes on (the guest stays paused
    /// either way for that long).
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// How long a round keeps reconnecting and resuming once every connection to the
    /// destination is lost, before the migration rolls back.
    pub retry_for: Duration,
    /// Where the rounds' encoded parts are written while they are sent (`None`: the
    /// temporary directory). A caller that may end the process without unwinding removes
    /// this directory first.
    pub scratch_dir: Option<std::path::PathBuf>,
}

impl MigrationSpec {
    /// Defaults for a VM named `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            config: Config::default(),
            throttle: true,
            codec: None,
            link_bps: dwcp_transport::session::DEFAULT_LINK_BPS,
            streams: 8,
            first_part_pages: FIRST_PART_PAGES,
            max_part_pages: MAX_PART_PAGES,
            overlap_parts: true,
            rate_limit: None,
            shadow_bytes: u64::MAX,
            cancel: None,
            retry_for: Duration::from_secs(60),
            scratch_dir: None,
        }
    }
}

/// The destination.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// This node's endpoint (credentials, settings).
    pub endpoint: &'a Endpoint,
    /// The destination agent.
    pub addr: SocketAddr,
    /// Refuse any other node.
    pub expected: Option<&'a NodeId>,
}

/// One round as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    /// Round number (the last one ran with the guest paused).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Seconds (encode and send).
    pub seconds: f64,
    /// Pages dirtied meanwhile.
    pub dirty_after: u64,
    /// Guest throttle in force, percent.
    pub throttle: u8,
}

/// What a migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationReport {
    /// Whether the VM now runs on the destination.
    pub migrated: bool,
    /// How pre-copy ended, or why it was rolled back.
    pub how: String,
    /// Wall-clock seconds from start to commit (or to the end of the rollback).
    pub total_seconds: f64,
    /// Guest paused (source stopped) until the destination committed, milliseconds: by the
    /// commit's time as a destination that sends it tells it (PROTOCOL.md rule 11; its clock
    /// taken as in step with the source's), else as [`Self::downtime_observed_ms`].
    pub downtime_ms: Option<f64>,
    /// Guest paused until the source heard of the commit, milliseconds (the pause plus the
    /// answer's way back).
    pub downtime_observed_ms: Option<f64>,
    /// Rounds, the final one last.
    pub rounds: Vec<RoundReport>,
    /// Guest memory size.
    pub guest_bytes: u64,
    /// Bytes on the wire over all rounds.
    pub wire_bytes: u64,
    /// Whether the destination's pages equal the paused source's, checked after the commit.
    pub bit_exact: Option<bool>,
    /// Compressor used.
    pub codec: String,
    /// Pages sent as zero / same / dup / cache / XOR / literal, over all rounds.
    pub levels: [u64; 6],
    /// Predicted pause when the source was stopped, milliseconds.
    pub predicted_downtime_ms: Option<f64>,
    /// Parts of rounds the destination could not resolve (a page it was expected to hold it
    /// did not), sent again without references; their first sending counts in `wire_bytes`.
    pub cold_resends: u32,
    /// Parts started on a second session while the part before them was still on its way
    /// (a v5 destination; see [`MigrationSpec::overlap_parts`]).
    pub overlapped_parts: u32,
    /// Whether the destination committed the target with the final round, once applied (a v6
    /// destination): the guest's pause then holds no separate commit round trip.
    pub committed_with_final_round: bool,
    /// Not migrated, and the source left paused: whether the destination committed could not
    /// be settled (see `how`), so the VM runs nowhere until someone checks.
    pub source_paused: bool,
    /// What TCP counted under the rounds' parts the destination accepted, by the kernel
    /// (`TCP_INFO`): its own retransmissions, segments and bytes. Parts refused or sent
    /// again without references are not counted (their bytes are in `wire_bytes`), nor
    /// the set-up, commit and check exchanges. `None` without TCP (QUIC, not Linux).
    pub tcp: Option<TcpCounts>,
    /// Bytes of page contents the source held at the end as the bases of XOR deltas (see
    /// [`MigrationSpec::shadow_bytes`]).
    pub shadow_bytes: u64,
    /// Times the rounds' parts that landed reconnected and resumed after every connection
    /// to the destination was lost (a link that went down and came back).
    pub reconnects: u32,
}

impl MigrationReport {
    /// A report of nothing done yet, for a guest of `guest_bytes`.
    pub fn new(guest_bytes: u64) -> Self {
        Self {
            migrated: false,
            how: String::new(),
            total_seconds: 0.0,
            downtime_ms: None,
            downtime_observed_ms: None,
            rounds: Vec::new(),
            guest_bytes,
            wire_bytes: 0,
            bit_exact: None,
            codec: String::new(),
            levels: [0; 6],
            predicted_downtime_ms: None,
            cold_resends: 0,
            overlapped_parts: 0,
            committed_with_final_round: false,
            shadow_bytes: 0,
            source_paused: false,
            tcp: None,
            reconnects: 0,
        }
    }
}

/// Live progress for displays.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Phase name.
    pub phase: String,
    /// Current round.
    pub round: u32,
    /// Dirty pages left.
    pub dirty: u64,
    /// Expected goodput, bytes/s.
    pub bandwidth: Option<f64>,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
    /// Predicted pause if stopped now, ms.
    pub predicted_downtime_ms: Option<f64>,
    /// Guest throttle, percent.
    pub throttle: u8,
}

/// Migrates `vm` to `dest`. Never leaves both sides without the VM: any failure before the
/// commit resumes the source and aborts the destination's target.
pub async fn migrate(
    vm: &MemoryVm,
    dest: Destination<'_>,
    spec: &MigrationSpec,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> MigrationReport {
    let started = Instant::now();
    let ps = vm.page_size();
    let pages = vm.pages();
    let raw_size = pages * ps as u64;
    let caps = SourceCaps {
        throttle: spec.throttle,
    };
    let mut orch = Orchestrator::new(spec.config.clone(), caps);
    let mut action = orch.start();
    // The phase the last event was handled in (a rollback's is `RollingBack` already).
    let mut prior = orch.phase().clone();
    // One session for set-up, every round, the commit and the check: handshakes are paid
    // once, never on the pause path.
    let mut kept = KeptSession::new();
    // With a v5 destination, a second session: a round's next part goes there while the
    // part before it ends on the first.
    let mut spare: Option<KeptSession> = None;
    let mut state = RoundState {
        enc: Encoding {
            shadow: Shadow::new(pages, ps, spec.shadow_bytes),
            remote: None,
            codec: spec.codec.unwrap_or(Codec::Zstd(2)),
            learned: Vec::new(),
            no_learning: false,
            scratch: spec.scratch_dir.clone(),
        },
        pacer: None,
        codecs: Vec::new(),
        encode_time: Duration::ZERO,
        encode_rate: None,
        levels: [0; 6],
        cold_resends: 0,
        overlapped_parts: 0,
        committed: None,
        committed_unix_us: None,
        commit_heard_late: false,
        commit_part_started: None,
        commit_asked: false,
        links: Arc::default(),
        // Names this migration's rounds, so a partial round of another migration of the same
        // name is never resumed onto (the receiver keys partial objects by this tag).
        id: format!(
            "{:x}-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            std::process::id()
        ),
    };
    let mut report = MigrationReport::new(raw_size);
    let mut paused_at: Option<Instant> = None;
    // The same moment by the clock the destination's commit time is in.
    let mut paused_unix: Option<std::time::SystemTime> = None;
    // A rollback found the destination committed after all (its answer had been lost).
    let mut at_destination = false;
    // A cancellation dropped a round on its way (see the second abort below).
    let mut cancelled_mid_round = false;
    // A round failed, its parts' sessions dropped, and the rollback's abort got through (the
    // link is up): a begin written just before may arrive after it, as after a cancellation.
    let mut failed_mid_round = false;
    let mut round_failed = false;
    // Bounded: the orchestrator ends within max_rounds, a round per throttle step, and a
    // fixed number of phases.
    for _ in 0..(spec.config.max_rounds as usize + spec.config.throttle_steps.len() + 64) {
        progress(&Progress {
            phase: format!("{:?}", orch.phase()),
            round: orch.rounds().len() as u32,
            dirty: vm.dirty_count(),
            bandwidth: orch.bandwidth(),
            wire_bytes: report.wire_bytes,
            predicted_downtime_ms: orch
                .predicted_downtime(vm.dirty_count())
                .map(|d| d.as_secs_f64() * 1000.0),
            throttle: orch.throttle(),
        });
        let cancelled = || async {
            match &spec.cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        };
        // What a cancellation cuts short is dropped with its sessions (a round takes `kept`
        // and `spare` while it runs): the rollback's abort goes on a session of its own.
        let mut on_cancel = |kept: &mut KeptSession, spare: &mut Option<KeptSession>| {
            *kept = KeptSession::new();
            *spare = None;
            cancelled_mid_round = true;
            Event::Failed(CANCELLED.into())
        };
        let event = match action.clone() {
            Action::Prepare => {
                let r = tokio::select! {
                    e = prepare(vm, dest, spec, &mut state, &mut kept, &mut spare) => Some(e),
                    () = cancelled() => None,
                };
                r.unwrap_or_else(|| on_cancel(&mut kept, &mut spare))
            }
            Action::SendRound { round, full } => {
                // Every page, whatever an earlier attempt (or anyone) took of the dirty set:
                // the target is new.
                if full {
                    vm.mark_all_dirty();
                }
                let r = send_round(
                    vm, dest, spec, &mut state, round, false, &mut kept, &mut spare,
                );
                let r = tokio::select! {
                    r = r => Some(r),
                    () = cancelled() => None,
                };
                match r {
                    None => on_cancel(&mut kept, &mut spare),
                    Some(Ok(stats)) => {
                        if round == 0
                            && let Some(rtt) = kept.round_trip().await
                        {
                            // The budget is 300 ms + 1 RTT: the final exchange needs one.
                            orch.set_rtt_allowance(rtt);
                        }
                        report.wire_bytes += stats.wire_bytes;
                        report
                            .rounds
                            .push(round_report(round, &stats, orch.throttle()));
                        Event::RoundSent(stats)
                    }
                    Some(Err(e)) => {
                        round_failed = true;
                        Event::Failed(e)
                    }
                }
            }
            Action::Throttle { percent } => {
                vm.throttle(percent);
                info!(percent, "throttling the guest (auto-converge)");
                Event::Throttled
            }
            Action::StopSource if spec.cancel.as_ref().is_some_and(|c| c.is_cancelled()) => {
                Event::Failed(CANCELLED.into())
            }
            Action::StopSource => {
                report.predicted_downtime_ms = orch
                    .predicted_downtime(vm.dirty_count())
                    .map(|d| d.as_secs_f64() * 1000.0);
                // Taken before the pause, so that any gap between the two lengthens it.
                paused_unix = Some(std::time::SystemTime::now());
                vm.pause();
                paused_at = Some(Instant::now());
                Event::SourceStopped
            }
            Action::SendFinal => {
                let round = orch.rounds().len() as u32;
                // With a v6 destination the final round commits the target once applied: the
                // commit's own round trip is off the pause.
                let r = send_round(
                    vm, dest, spec, &mut state, round, true, &mut kept, &mut spare,
                );
                match r.await {
                    Ok(stats) => {
                        report.wire_bytes += stats.wire_bytes;
                        report
                            .rounds
                            .push(round_report(round, &stats, orch.throttle()));
                        Event::FinalSent(stats)
                    }
                    Err(e) => {
                        round_failed = true;
                        Event::Failed(e)
                    }
                }
            }
            Action::ResumeDestination if state.committed.is_some() => {
                let at = state.committed.unwrap_or_else(Instant::now);
                let observed = paused_at.map(|t| (at - t).as_secs_f64() * 1000.0);
                report.downtime_observed_ms = observed;
                // The commit cannot come before its part began to be sent. (Not when its last
                // byte was out: a small urgent part may land before that is told.)
                let sent = match (state.commit_part_started, paused_at) {
                    (Some(start), Some(p)) => {
                        start.saturating_duration_since(p).as_secs_f64() * 1000.0
                    }
                    _ => 0.0,
                };
                // A commit found out by asking: the pause ended at some unknown point before.
                let observed_commit = observed.filter(|_| !state.commit_heard_late);
                report.downtime_ms = observed_commit.map(|o| {
                    match pause_to_commit_ms(paused_unix, state.committed_unix_us, sent, o) {
                        Some(ms) => ms,
                        None => {
                            if state.committed_unix_us.is_some() {
                                warn!(
                                    observed_ms = o,
                                    "the destination's commit time does not fall within the pause by this host's clock (clocks apart?): the pause is taken until its answer came"
                                );
                            }
                            o
                        }
                    }
                });
                report.total_seconds = (at - started).as_secs_f64();
                Event::DestinationResumed
            }
            Action::ResumeDestination => {
                state.commit_asked = true;
                match migration_op_kept(
                    dest.endpoint,
                    dest.addr,
                    dest.expected,
                    &spec.name,
                    data::MIGRATION_COMMIT,
                    &mut kept,
                )
                .await
                {
                    Ok(()) => {
                        report.downtime_ms = paused_at.map(|t| t.elapsed().as_secs_f64() * 1000.0);
                        report.downtime_observed_ms = report.downtime_ms;
                        report.total_seconds = started.elapsed().as_secs_f64();
                        Event::DestinationResumed
                    }
                    // The commit may have happened, its answer lost: ask before rolling back.
                    Err(e) if published_matches(vm, dest, spec).await => {
                        warn!(
                            "the commit's answer was lost ({e}), but the destination has published the paused source's memory"
                        );
                        // When it committed is not known; only when this host found out.
                        report.downtime_ms = None;
                        report.downtime_observed_ms =
                            paused_at.map(|t| t.elapsed().as_secs_f64() * 1000.0);
                        report.total_seconds = started.elapsed().as_secs_f64();
                        Event::DestinationResumed
                    }
                    Err(e) => Event::Failed(format!("commit failed: {e}")),
                }
            }
            Action::CleanupSource => {
                // The source stays paused (it no longer owns the VM); check the copy.
                let req = BaseRequest {
                    name: &spec.name,
                    raw_size,
                    page_size: ps as u32,
                    migration_target: false,
                };
                let mut checked =
                    query_base_kept(dest.endpoint, dest.addr, dest.expected, &req, &mut kept).await;
                if let Err(e) = &checked {
                    // The session may have died after the commit: a short one of its own.
                    debug!("checking on the migration's session failed ({e}); once more");
                    let mut own = KeptSession::default();
                    checked =
                        query_base_kept(dest.endpoint, dest.addr, dest.expected, &req, &mut own)
                            .await;
                }
                report.bit_exact = match checked {
                    Ok((_, dest_pages)) => {
                        let mine = vm.page_hashes();
                        // An empty list: the destination could not hash its copy (gone,
                        // another size, unreadable, too large): not known, not "differs".
                        if dest_pages.is_empty() && !mine.is_empty() {
                            warn!("the destination could not hash its copy: not verified");
                            None
                        } else {
                            Some(dest_pages == mine)
                        }
                    }
                    Err(e) => {
                        warn!("cannot verify the destination: {e}");
                        None
                    }
                };
                Event::CleanedUp
            }
            Action::Rollback { reason } if state.commit_asked => {
                // The destination may have committed, its answer lost: the abort goes first
                // (a round still on its way then fails, a commit under way ends first), and
                // the source runs on only if the destination holds no copy.
                warn!("rolling back after a commit was asked for: {reason}");
                vm.throttle(0);
                // The link may be down still (the retry period ran out): the guest stays
                // paused while the destination is asked again, for another retry period
                // (at least 10 s, and time for one abort and both questions on a large VM),
                // before a person has to settle it.
                let deadline = Instant::now()
                    + spec
                        .retry_for
                        .max(Duration::from_secs(10))
                        .max(ABORT_TRY + 2 * settle_wait(vm));
                // Each question within what is left (2 s at least, so the last is asked).
                let step = |most: Duration| {
                    deadline
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_secs(2), most)
                };
                let (aborted, answer) = loop {
                    let mut aborted = Err(String::new());
                    for _ in 0..30 {
                        aborted = abort_within(dest, spec, &mut kept, step(ABORT_TRY)).await;
                        match &aborted {
                            Err(e)
                                if (e.contains("in progress") || e.contains("being received"))
                                    && Instant::now() < deadline =>
                            {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            _ => break,
                        }
                    }
                    // (`settled` asks two questions.)
                    let answer =
                        tokio::time::timeout(step(2 * settle_wait(vm)), settled(vm, dest, spec))
                            .await
                            .unwrap_or(None);
                    // "No copy" frees the source only with the abort done (a commit on its
                    // way would otherwise still land).
                    let done = answer == Some(true) || (answer == Some(false) && aborted.is_ok());
                    if done || Instant::now() >= deadline {
                        break (aborted, answer);
                    }
                    warn!(
                        "the destination does not answer whether it committed; asking again (the guest stays paused)"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                };
                match (aborted, answer) {
                    (Ok(()), Some(false)) => {
                        vm.resume();
                        Event::RolledBack
                    }
                    (_, Some(true)) => {
                        warn!("the destination committed after all: the VM lives there now");
                        at_destination = true;
                        Event::RolledBack
                    }
                    (aborted, _) => Event::Failed(format!(
                        "the destination did not settle whether it committed ({}): the source \
                         stays paused; check {:?} on the destination, then resume or discard \
                         the source",
                        aborted
                            .err()
                            .unwrap_or_else(|| "no answer to the check".into()),
                        spec.name
                    )),
                }
            }
            Action::Rollback { reason } => {
                warn!("rolling back: {reason}");
                vm.throttle(0);
                if vm.is_paused() {
                    vm.resume();
                }
                // The guest runs on here. The link may be down (why it rolls back): once a
                // round may have made a target there, the abort is asked again for the retry
                // period (10 s at least), so that none is left taking the destination's disk
                // until it expires. (Preparing makes none.)
                let again = if prior == Phase::Prepare {
                    Duration::ZERO
                } else {
                    spec.retry_for.max(Duration::from_secs(10))
                };
                let deadline = Instant::now() + again;
                let aborted = loop {
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_secs(2), ABORT_TRY);
                    match abort_within(dest, spec, &mut kept, wait).await {
                        Err(e) if Instant::now() < deadline => {
                            debug!("the rollback's abort: {e}; asking again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        r => break r,
                    }
                };
                match aborted {
                    Ok(()) => {
                        failed_mid_round = round_failed;
                        Event::RolledBack
                    }
                    // Preparing left nothing there to clean (the destination unreachable or
                    // refusing, most likely why it failed).
                    Err(e) if prior == Phase::Prepare => {
                        debug!("the rollback's abort after preparing: {e}");
                        Event::RolledBack
                    }
                    Err(e) => Event::Failed(format!("cannot clean the destination: {e}")),
                }
            }
            Action::Finished => break,
        };
        prior = orch.phase().clone();
        action = orch.handle(event);
    }
    if (cancelled_mid_round || failed_mid_round) && !at_destination {
        // A begin written on a dropped session may still reach the destination after the
        // rollback's abort, and make a target there again: a second abort clears it (one
        // that finds nothing is harmless).
        tokio::time::sleep(Duration::from_millis(300)).await;
        // One short try: the link may have gone again, and the rollback is done.
        if let Err(e) = abort_within(dest, spec, &mut kept, ABORT_TRY).await {
            debug!("the second abort after the rollback: {e}");
        }
    }
    if let Some(s) = spare.take() {
        s.close().await;
    }
    kept.close().await;
    match orch.outcome() {
        Outcome::Migrated { how } => {
            report.migrated = true;
            report.how = how.to_string();
        }
        Outcome::RolledBack { reason } => {
            report.how = reason.clone();
            report.total_seconds = started.elapsed().as_secs_f64();
        }
        Outcome::Running => report.how = "stopped before the end".into(),
    }
    if at_destination {
        // The destination published the paused source's memory (compared page by page).
        report.migrated = true;
        report.bit_exact = Some(true);
        report.how = format!(
            "committed, though its answer was lost ({}); the source stays paused",
            report.how
        );
        // When it committed is not known; only when this host found out.
        report.downtime_ms = None;
        report.downtime_observed_ms = paused_at.map(|t| t.elapsed().as_secs_f64() * 1000.0);
    }
    report.source_paused = !report.migrated && vm.is_paused();
    report.codec = state
        .codecs
        .iter()
        .map(Codec::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    report.levels = state.levels;
    report.cold_resends = state.cold_resends;
    report.overlapped_parts = state.overlapped_parts;
    report.committed_with_final_round = report.migrated && state.committed.is_some();
    report.shadow_bytes = state.enc.shadow.bytes() as u64;
    report.tcp = *state
        .links
        .tcp
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    report.reconnects = state.links.reconnects.load(Ordering::Relaxed);
    report
}

/// What the parts' sessions counted, added as the parts the destination accepted land.
#[derive(Debug, Default)]
struct PartLinks {
    /// TCP's counts.
    tcp: std::sync::Mutex<Option<TcpCounts>>,
    /// Reconnections after every connection was lost.
    reconnects: std::sync::atomic::AtomicU32,
}

fn round_report(round: u32, s: &RoundStats, throttle: u8) -> RoundReport {
    RoundReport {
        round,
        pages: s.pages,
        wire_bytes: s.wire_bytes,
        seconds: s.seconds,
        dirty_after: s.dirty_after,
        throttle,
    }
}

struct RoundState {
    /// Moved to the encoding thread while a part is encoded.
    enc: Encoding,
    /// Set when the codec was chosen here: keeps the encoder up with the link.
    pacer: Option<Pacer>,
    /// Codecs parts were encoded with, in order of first use.
    codecs: Vec<Codec>,
    /// How long the last part took to encode.
    encode_time: Duration,
    /// Pages per second the encoder managed on the last part big enough to tell.
    encode_rate: Option<f64>,
    levels: [u64; 6],
    cold_resends: u32,
    overlapped_parts: u32,
    id: String,
    /// When the final round's answer said the destination committed the target (v6).
    committed: Option<Instant>,
    /// When the destination says it committed, by its clock (microseconds since 1970), if
    /// it says.
    committed_unix_us: Option<u64>,
    /// The commit was learned by asking the destination after its answer was lost: when it
    /// happened is not known (only when this host found out).
    commit_heard_late: bool,
    /// When the part that committed began to be sent.
    commit_part_started: Option<Instant>,
    /// Set once a commit was asked for (a final round that carries it, or `MIGRATION`
    /// commit): from then on the destination may own the VM whatever became of the answer.
    commit_asked: bool,
    /// What the parts the destination accepted counted (TCP, reconnections).
    links: Arc<PartLinks>,
}

/// What encoding a round needs and updates.
struct Encoding {
    /// What the destination holds, page by page, as far as this source sent it and kept.
    shadow: Shadow,
    remote: Option<RemoteIndex>,
    codec: Codec,
    /// Hashes of pages added to `remote` as learned by the destination (see `encode_pages`).
    learned: Vec<u64>,
    /// Set once the destination could not resolve a round: no more pages are counted on as
    /// learned (its cache may be small, or evict them early).
    no_learning: bool,
    /// Where encoded parts are written ([`MigrationSpec::scratch_dir`]).
    scratch: Option<std::path::PathBuf>,
}

/// Why a cancelled migration rolled back.
const CANCELLED: &str = "cancelled";

/// Pages the destination's cache learns from this migration's literal pages are counted on
/// up to this many bytes: a quarter of an agent's default cache, so that its eviction does
/// not take them back before they are referred to.
const MAX_LEARNED_BYTES: u64 = 2 << 30;

impl Encoding {
    /// The destination could not resolve a round: forget what it was thought to have learned,
    /// and count on nothing more.
    fn unlearn(&mut self) {
        if let Some(r) = self.remote.as_mut() {
            for h in self.learned.drain(..) {
                r.remove(h);
            }
        }
        self.learned.clear();
        self.no_learning = true;
    }
}

impl Encoding {
    /// Left in [`RoundState`] while the real one is away on the encoding thread.
    fn away() -> Self {
        Self {
            shadow: Shadow::empty(),
            remote: None,
            codec: Codec::Zstd(2),
            learned: Vec::new(),
            no_learning: false,
            scratch: None,
        }
    }
}

/// A big round is sent as objects of at most `MAX_PART_PAGES` pages, each encoded while the
/// one before it is sent: the first part of round 0 this small, so that sending starts soon,
/// each next one bigger (see `next_part`), so that few objects pay their exchanges (a begin
/// and an end, a round trip each).
const FIRST_PART_PAGES: usize = 4 * 1024;
const MAX_PART_PAGES: usize = 256 * 1024;
/// The first part of a round after the first is what the encoder did in this long.
const FIRST_PART_SECONDS: f64 = 0.5;

async fn prepare(
    vm: &MemoryVm,
    dest: Destination<'_>,
    spec: &MigrationSpec,
    state: &mut RoundState,
    kept: &mut KeptSession,
    spare: &mut Option<KeptSession>,
) -> Event {
    let raw = vm.pages() * vm.page_size() as u64;
    // The codec calibration (CPU, most of a second) runs while the destination answers.
    let calibration = spec.codec.is_none().then(|| {
        // A sample of non-zero pages spread over the image.
        let step = (vm.pages() / 2048).max(1);
        let addrs: Vec<u64> = (0..vm.pages()).step_by(step as usize).collect();
        let mut sample = Vec::new();
        vm.copy_pages(&addrs, &mut sample);
        let ps = vm.page_size();
        let link_bps = spec.link_bps as f64;
        tokio::task::spawn_blocking(move || {
            let sample: Vec<u8> = sample
                .chunks_exact(ps)
                .filter(|p| !dwcp_encoding::is_zero(p))
                .flatten()
                .copied()
                .collect();
            (sample.len() >= 1 << 20).then(|| Chooser::calibrate(&sample).choose_paced(link_bps))
        })
    });
    // The rounds' session opens first and carries the set-up requests too: one set of
    // handshakes instead of three, and its other streams connect while the requests run.
    if let Err(e) = open_lane(kept, dest, spec, raw).await {
        return Event::Failed(format!("cannot reach the destination: {e}"));
    }
    // The second session connects while the requests below run on the first.
    let overlap = spec.overlap_parts && kept.version().is_some_and(|v| v >= Version::V5);
    let mut second = KeptSession::new();
    let open_second = async {
        if !overlap {
            return false;
        }
        match open_lane(&mut second, dest, spec, raw).await {
            Ok(()) => true,
            Err(e) => {
                warn!("cannot open a second session ({e}): a round's parts go one at a time");
                false
            }
        }
    };
    let (opened, event) = tokio::join!(
        open_second,
        set_up(dest, spec, state, kept, raw, calibration)
    );
    if opened {
        *spare = Some(second);
    }
    event
}

/// Opens a session for the parts of a migration of `raw` bytes.
async fn open_lane(
    lane: &mut KeptSession,
    dest: Destination<'_>,
    spec: &MigrationSpec,
    raw: u64,
) -> Result<(), SendError> {
    let opts = part_options(spec);
    lane.open(dest.endpoint, dest.addr, dest.expected, &opts, raw)
        .await
}

/// The requests of the prepare phase, on the rounds' session.
async fn set_up(
    dest: Destination<'_>,
    spec: &MigrationSpec,
    state: &mut RoundState,
    kept: &mut KeptSession,
    raw: u64,
    calibration: Option<tokio::task::JoinHandle<Option<Codec>>>,
) -> Event {
    // A target left over from an earlier attempt is not trusted: start clean.
    if let Err(e) = abort(dest, spec, kept).await {
        return Event::Failed(format!(
            "destination refused to reserve {:?}: {e}",
            spec.name
        ));
    }
    let req = BaseRequest {
        name: &spec.name,
        raw_size: raw,
        page_size: 0,
        migration_target: false,
    };
    match query_base_kept(dest.endpoint, dest.addr, dest.expected, &req, kept).await {
        Ok((remote, _)) => state.enc.remote = remote,
        Err(e) => return Event::Failed(format!("cannot reach the destination: {e}")),
    }
    if let Some(task) = calibration {
        match task.await {
            Ok(Some(codec)) => state.enc.codec = codec,
            Ok(None) => {}
            Err(e) => return Event::Failed(format!("codec calibration failed: {e}")),
        }
        state.pacer = Pacer::new(state.enc.codec);
    }
    info!(codec = %state.enc.codec, cache_entries = state.enc.remote.as_ref().map_or(0, RemoteIndex::len), "prepared");
    Event::Prepared
}

/// Encodes and sends the pages dirtied since the previous round (all pages the first time).
/// A big round goes as several objects, each encoded on a blocking thread while the one
/// before it is sent. With a second session (`spare`, a v5 destination), a part starts there
/// as soon as the one before it has all its bytes out: its last packets and the
/// destination's verdict, a round trip or more, no longer leave the link idle.
#[allow(clippy::too_many_arguments)]
async fn send_round(
    vm: &MemoryVm,
    dest: Destination<'_>,
    spec: &MigrationSpec,
    state: &mut RoundState,
    round: u32,
    final_round: bool,
    kept: &mut KeptSession,
    spare: &mut Option<KeptSession>,
) -> Result<RoundStats, String> {
    // The sessions go with the parts they carry, and come back (to the end) when those are
    // done; the least recently used goes first, so that neither sits idle for long (an idle
    // one may be closed by the destination). `kept`, which carries the commit, is the one
    // used last.
    let mut free: Vec<KeptSession> = spare.take().into_iter().collect();
    free.push(std::mem::take(kept));
    let lanes = free.len();
    let r = send_parts(vm, dest, spec, state, round, final_round, &mut free).await;
    // A session lost with a failed part leaves a new one to be opened when needed.
    *kept = match free.pop() {
        Some(s) => s,
        // Kept open between rounds (unlike a default one).
        None => KeptSession::new(),
    };
    *spare = free.pop();
    if lanes > 1 && spare.is_none() {
        debug!(
            round,
            "the second session was lost: parts go one at a time from here"
        );
    }
    r
}

/// A part on its way.
struct InFlight<'a> {
    k: usize,
    wire: u64,
    levels: [u64; 6],
    /// Whether the destination commits the target once this part is applied.
    commits: bool,
    started: Instant,
    /// Told when all its bytes are out (see [`KeptSession::notify_ended`]).
    ended: Arc<tokio::sync::Notify>,
    ended_at: Option<Instant>,
    sending: PartFuture<'a>,
}

/// Gives the session back with the outcome: the bytes the transport sent again (copies of an
/// urgent part's chunks, chunks of a lost stream) and what the destination answered, or why
/// the part failed.
type PartFuture<'a> = std::pin::Pin<
    Box<dyn Future<Output = (KeptSession, Result<(u64, String), SendError>)> + Send + 'a>,
>;

/// What became of a part.
enum Landed {
    /// With what the destination said (the commit's time, for a part that commits).
    Ok(String),
    /// The destination could not resolve its references.
    Unresolved,
    /// Refused otherwise: the round failed (its bytes crossed).
    Refused(SendError),
    /// Not sent.
    Failed(SendError),
}

impl Landed {
    /// `DELTA_UNRESOLVED` counts as unresolved unless the part was sent `cold` (without
    /// references: it cannot fail that way, and a second time is a failure).
    /// Also the bytes sent again on the way (0 unless it landed).
    fn of(r: Result<(u64, String), SendError>, cold: bool) -> (Self, u64) {
        match r {
            Ok((resent, answer)) => (Self::Ok(answer), resent),
            Err(SendError::Refused { code, .. })
                if code == ErrorCode::DELTA_UNRESOLVED && !cold =>
            {
                (Self::Unresolved, 0)
            }
            Err(e @ SendError::Refused { .. }) => (Self::Refused(e), 0),
            Err(e) => (Self::Failed(e), 0),
        }
    }
}

/// Parts smaller than this say little about the link's pace while they overlap: most of them
/// fits in the sockets' buffers.
const PACE_MIN_WIRE: u64 = 16 << 20;

/// The `final_round` (the guest paused) goes urgently (`SendOptions::urgent`), and a v6
/// destination commits the target when its last part is applied (`state.committed`); that
/// part goes alone, once every part before it landed, so the commit never publishes a target
/// missing one of them.
async fn send_parts(
    vm: &MemoryVm,
    dest: Destination<'_>,
    spec: &MigrationSpec,
    state: &mut RoundState,
    round: u32,
    final_round: bool,
    free: &mut Vec<KeptSession>,
) -> Result<RoundStats, String> {
    let t0 = Instant::now();
    let lanes = free.len();
    // Shared with the encoding thread, which takes each part as a range of it.
    let dirty: Arc<[u64]> = vm.take_dirty().into();
    let reader = vm.reader();
    let raw_size = vm.pages() * vm.page_size() as u64;
    let max_part = spec.max_part_pages.max(1);
    // Small enough that sending starts soon, and once the encoder's pace is known, as much
    // as it encodes in a fraction of a second: each part costs a round trip.
    let first = match state.encode_rate {
        Some(r) => ((r * FIRST_PART_SECONDS) as usize).max(spec.first_part_pages),
        None => spec.first_part_pages,
    }
    .clamp(1, max_part);
    // Parts are cut as the round goes (see `next_part`); an empty round still goes, as an
    // empty object: the destination sees every round.
    let mut parts: Vec<Range<usize>> = Vec::new();
    parts.push(0..first.min(dirty.len()));
    // Pages per second the last part was sent at; whether the pacer has seen it.
    let mut send_rate = None;
    let mut rate_fresh = false;
    // Pages at each level of the parts that landed (a cold resend replaces some).
    let mut landed: std::collections::BTreeMap<usize, [u64; 6]> = Default::default();
    let mut wire_total = 0u64;
    let mut cold = false;
    // The next part to send, encoded (`ready`) or being encoded.
    let mut k = 0usize;
    let mut ready = Some(encode_part(&reader, state, &dirty, parts[0].clone(), cold, round).await?);
    let mut encoding: Option<EncodeTask> = None;
    // At most two parts in flight, the older one in its tail.
    let mut older: Option<InFlight<'_>> = None;
    let mut newer: Option<InFlight<'_>> = None;
    // Each part passes a few events (encoded, ended, landed); every part but the last has at
    // least `first` pages, and at most one cold retry per round sends them all again.
    for _ in 0..(dirty.len() / first + 2) * 16 {
        // Start the next part once it is encoded, a session is free, and the part before it
        // (if any) has all its bytes out; a part that commits, once the others landed.
        // (`free[0]` is the session the part would take.)
        let commits = final_round
            && parts.get(k).is_some_and(|p| p.end >= dirty.len())
            && free
                .first()
                .and_then(KeptSession::version)
                .is_some_and(|v| v >= Version::V6);
        let may_start = ready.is_some()
            && older.is_none()
            && newer
                .as_ref()
                .is_none_or(|n| n.ended_at.is_some() && !commits)
            && !free.is_empty();
        if may_start && let Some((file, wire, levels)) = ready.take() {
            if parts.len() == k + 1 {
                let encode_rate = rate(parts[k].len(), state.encode_time);
                if let Some(p) = next_part(&parts[k], dirty.len(), max_part, encode_rate, send_rate)
                {
                    parts.push(p);
                }
            }
            if let Some(p) = parts.get(k + 1) {
                encoding = Some(spawn_encode(
                    reader.clone(),
                    state,
                    dirty.clone(),
                    p.clone(),
                    cold,
                ));
            }
            // `free` is not empty (`may_start`).
            let mut lane = free.remove(0);
            let ended = lane.notify_ended();
            // With `commits`, nothing else is on its way (`may_start`): every part before it
            // landed.
            let [_zero, _same, dup, cache, xor, literal] = levels;
            let part = PartSpec {
                round,
                part: k,
                cold,
                commits,
                urgent: final_round,
                // Zero pages are holes and unchanged ones are not written.
                writes: (dup + cache + xor + literal) * reader.page_size() as u64,
            };
            state.commit_asked |= commits;
            let sending = start_part(
                dest,
                spec,
                &state.id,
                lane,
                file,
                wire,
                raw_size,
                part,
                state.links.clone(),
            );
            older = newer.take();
            if older.is_some() {
                state.overlapped_parts += 1;
            }
            newer = Some(InFlight {
                k,
                wire,
                levels,
                commits,
                started: Instant::now(),
                ended,
                ended_at: None,
                sending,
            });
            k += 1;
            continue;
        }
        // Done when nothing is left to send, to encode, or on its way (the newer part may land
        // before the older one).
        if older.is_none() && newer.is_none() && ready.is_none() && encoding.is_none() {
            for levels in landed.values() {
                for (total, v) in state.levels.iter_mut().zip(levels) {
                    *total += v;
                }
            }
            return Ok(RoundStats {
                pages: dirty.len() as u64,
                wire_bytes: wire_total,
                seconds: t0.elapsed().as_secs_f64(),
                dirty_after: vm.dirty_count(),
            });
        }
        // Wait for the next thing to happen (a branch is polled only while its precondition
        // holds; the `pending` fallbacks are never reached).
        let waiting_for_ended = newer.as_ref().is_some_and(|n| n.ended_at.is_none());
        let ended = newer.as_ref().map(|n| n.ended.clone());
        let (part, outcome) = tokio::select! {
            (lane, r) = landing(&mut older), if older.is_some() => {
                free.push(lane);
                (older.take(), r)
            }
            (lane, r) = landing(&mut newer), if newer.is_some() => {
                free.push(lane);
                let mut n = newer.take();
                if let Some(n) = n.as_mut()
                    && n.ended_at.is_none()
                {
                    n.ended_at = Some(Instant::now());
                    if lanes > 1 && let Some(r) = out_rate(n, &parts) {
                        send_rate = Some(r);
                        rate_fresh = true;
                    }
                }
                (n, r)
            }
            () = async {
                match ended.as_deref() {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            }, if waiting_for_ended => {
                if let Some(n) = newer.as_mut() {
                    n.ended_at = Some(Instant::now());
                    // One part at a time, the whole exchange is the pace (taken as it lands).
                    if lanes > 1 && let Some(r) = out_rate(n, &parts) {
                        send_rate = Some(r);
                        rate_fresh = true;
                    }
                }
                continue;
            }
            r = async {
                match encoding.as_mut() {
                    Some(t) => t.await,
                    None => std::future::pending().await,
                }
            }, if encoding.is_some() && ready.is_none() => {
                encoding = None;
                let e = join_encoded(r, state, round)?;
                // Once per new reading of the link's pace.
                if let Some(p) = state.pacer.as_mut()
                    && let Some(link_rate) = send_rate.filter(|_| rate_fresh)
                {
                    rate_fresh = false;
                    let before = p.codec();
                    let encode_rate = rate(parts[k].len(), state.encode_time);
                    state.enc.codec = p.observe(encode_rate, link_rate);
                    if state.enc.codec != before {
                        info!(round, part = k, from = %before, to = %state.enc.codec, encode_rate, link_rate, "codec paced");
                    }
                }
                ready = Some(e);
                continue;
            }
            else => return Err(format!("round {round}: nothing left to wait for")),
        };
        let Some(part) = part else { continue };
        let (outcome, resent) = Landed::of(outcome, cold);
        if !matches!(outcome, Landed::Failed(_)) {
            // It crossed the network either way.
            wire_total += part.wire + resent;
        }
        let took = part.started.elapsed();
        if lanes == 1 && matches!(outcome, Landed::Ok(_)) {
            // One at a time: the part's whole exchange is the link's pace.
            send_rate = Some(rate(parts[part.k].len(), took));
            rate_fresh = true;
        }
        debug!(
            round,
            part = part.k,
            pages = parts[part.k].len(),
            wire = part.wire,
            sending = ?took,
            out = ?part.ended_at.map(|t| t - part.started),
            ok = matches!(outcome, Landed::Ok(_)),
            "part sent"
        );
        match outcome {
            Landed::Ok(answer) => {
                landed.insert(part.k, part.levels);
                if part.commits {
                    state.committed = Some(Instant::now());
                    state.committed_unix_us = committed_unix_us(&answer);
                    state.commit_part_started = Some(part.started);
                }
            }
            Landed::Unresolved => {
                warn!(
                    round,
                    part = part.k,
                    "destination could not resolve the round; sending the rest of it again \
                     without references"
                );
                // The parts after it were encoded (and may have been sent) with references
                // too, and one may have been applied before this one failed: they are all
                // encoded again and sent after it. The other part on its way lands first:
                // if it came before this one and failed too, the resend starts there.
                // Pages counted on as learned may be what was missing: no more of that.
                let mut restart = part.k;
                let rest = [older.take(), newer.take()];
                for p in rest.into_iter().flatten() {
                    let (lane, r) = p.sending.await;
                    free.push(lane);
                    let (outcome, resent) = Landed::of(r, false);
                    if !matches!(outcome, Landed::Failed(_)) {
                        wire_total += p.wire + resent;
                    }
                    match outcome {
                        Landed::Ok(_) => {
                            landed.insert(p.k, p.levels);
                        }
                        Landed::Unresolved => restart = restart.min(p.k),
                        Landed::Refused(e) | Landed::Failed(e) => {
                            return Err(format!("round {round}: {e}"));
                        }
                    }
                }
                // What lands from here on replaces what landed of the parts sent again.
                landed.retain(|&i, _| i < restart);
                cold = true;
                state.cold_resends += 1;
                if let Some(task) = encoding.take() {
                    // Only the encoding state is wanted back: the part is encoded again.
                    let (enc, _, _) = task
                        .await
                        .map_err(|e| format!("encoding round {round}: the encoder failed: {e}"))?;
                    state.enc = enc;
                }
                state.enc.unlearn();
                k = restart;
                ready =
                    Some(encode_part(&reader, state, &dirty, parts[k].clone(), cold, round).await?);
            }
            Landed::Refused(e) | Landed::Failed(e) if part.commits => {
                // The destination may have committed and its answer been lost with the
                // session (the part sent again on a new one is then refused: its target is
                // gone). Rolling back would leave the guest on both hosts: ask.
                if !published_matches(vm, dest, spec).await {
                    return Err(format!("round {round}: {e}"));
                }
                warn!(
                    round,
                    "the final round failed ({e}), but the destination has published the \
                     paused source's memory: the commit went through"
                );
                landed.insert(part.k, part.levels);
                state.committed = Some(Instant::now());
                state.commit_heard_late = true;
            }
            Landed::Refused(e) | Landed::Failed(e) => return Err(format!("round {round}: {e}")),
        }
    }
    Err(format!("round {round}: no progress sending its parts"))
}

/// Pages per second.
fn rate(pages: usize, took: Duration) -> f64 {
    pages as f64 / took.as_secs_f64().max(1e-6)
}

/// The part after `last`: up to twice as many pages, and no more than the encoder, at
/// `encode_rate`, can encode while the link, at `send_rate` (pages per second, unknown for
/// the first part), sends `last` — a part the encoder cannot finish in that time leaves the
/// link idle. `None` once the round is cut.
fn next_part(
    last: &Range<usize>,
    len: usize,
    max_part: usize,
    encode_rate: f64,
    send_rate: Option<f64>,
) -> Option<Range<usize>> {
    if last.end >= len {
        return None;
    }
    let growth = send_rate.map_or(2.0, |s| (encode_rate / s).clamp(1.0, 2.0));
    let pages = ((last.len().max(1) as f64 * growth) as usize).clamp(1, max_part);
    Some(last.end..(last.end + pages).min(len))
}

/// How fast the link took part `p`, in pages per second, from its start until its bytes were
/// out (it started behind the tail of the one before it); `None` for a part too small to tell.
fn out_rate(p: &InFlight<'_>, parts: &[Range<usize>]) -> Option<f64> {
    let out = p.ended_at? - p.started;
    (p.wire >= PACE_MIN_WIRE).then(|| rate(parts[p.k].len(), out))
}

/// Asks the destination to delete the migration target of `spec`'s VM.
async fn abort(
    dest: Destination<'_>,
    spec: &MigrationSpec,
    kept: &mut KeptSession,
) -> Result<(), String> {
    migration_op_kept(
        dest.endpoint,
        dest.addr,
        dest.expected,
        &spec.name,
        data::MIGRATION_ABORT,
        kept,
    )
    .await
    .map_err(|e| e.to_string())
}

/// [`abort`], waiting at most `wait` for its answer.
async fn abort_within(
    dest: Destination<'_>,
    spec: &MigrationSpec,
    kept: &mut KeptSession,
    wait: Duration,
) -> Result<(), String> {
    tokio::time::timeout(wait, abort(dest, spec, kept))
        .await
        .unwrap_or_else(|_| Err(format!("no answer to the abort within {wait:?}")))
}

/// Whether the destination has published the paused `vm`'s memory under its name: asked when
/// the answer to a commit (or to the final round that carries it) was lost, since the commit
/// may have happened before. On a session of its own: the migration's may be gone.
async fn published_matches(vm: &MemoryVm, dest: Destination<'_>, spec: &MigrationSpec) -> bool {
    settled(vm, dest, spec).await == Some(true)
}

/// Whether the destination committed this migration: `Some(true)` when no migration target
/// is left and the image published under the VM's name is the paused `vm`'s memory,
/// `Some(false)` when either is not so, `None` when the destination did not answer (each
/// question bounded by [`settle_wait`]).
async fn settled(vm: &MemoryVm, dest: Destination<'_>, spec: &MigrationSpec) -> Option<bool> {
    // A destination hashes the pages of images up to 2^28 pages (1 TiB of 4 KiB pages), and
    // says nothing of larger ones: "nothing" would read as "not committed" here.
    if vm.pages() > 1 << 28 {
        warn!(
            "a VM this large cannot be compared with the destination's image: whether it committed stays unknown"
        );
        return None;
    }
    let wait = settle_wait(vm);
    let ask = async |migration_target: bool| {
        let req = BaseRequest {
            name: &spec.name,
            raw_size: vm.pages() * vm.page_size() as u64,
            page_size: vm.page_size() as u32,
            migration_target,
        };
        let mut own = KeptSession::default();
        let q = query_copy_kept(dest.endpoint, dest.addr, dest.expected, &req, &mut own);
        match tokio::time::timeout(wait, q).await {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(e)) => {
                warn!("cannot ask the destination whether it committed: {e}");
                None
            }
            Err(_) => {
                warn!("the destination did not say within {wait:?} whether it committed");
                None
            }
        }
    };
    // A target still there, readable or not, was not committed (an older image of the same
    // name could match). One the destination could not look for leaves it unknown.
    let (target, there) = ask(true).await?;
    if !target.is_empty() || there == CopyState::Unreadable {
        return Some(false);
    }
    if there == CopyState::Unknown {
        warn!(
            "the destination cannot look for its migration target: whether it committed stays unknown"
        );
        return None;
    }
    // The published image: compared when the destination gave its page hashes (an older
    // destination says nothing of the copy, only gives them). A copy it cannot read or
    // look at now (out of descriptors, an I/O error) may be the committed one: taken for
    // "none", the source would run on beside it.
    let (published, state) = ask(false).await?;
    match state {
        _ if !published.is_empty() => Some(published == vm.page_hashes()),
        CopyState::None => Some(false),
        CopyState::Hashed | CopyState::Unreadable | CopyState::Unknown | CopyState::Unsaid => {
            warn!(
                "the destination cannot say what its image holds: whether it committed stays unknown"
            );
            None
        }
    }
}

/// Most a question about a commit's outcome waits for its answer.
const SETTLE_WAIT: Duration = Duration::from_secs(15);

/// How long a question about a commit's outcome waits for `vm`: the destination reads and
/// hashes a whole image to answer it (allowing 100 MB/s, as the transport does for the same
/// question).
fn settle_wait(vm: &MemoryVm) -> Duration {
    SETTLE_WAIT + Duration::from_secs(vm.pages() * vm.page_size() as u64 / 100_000_000)
}

/// The longest one try of an abort asked again while the link may be down: a try on a path
/// that went silent must not take the whole retry period (a new connection may get through).
const ABORT_TRY: Duration = Duration::from_secs(5);

/// Which part of which round a part is, and how it goes.
#[derive(Clone, Copy)]
struct PartSpec {
    round: u32,
    part: usize,
    /// Encoded without references (a resend).
    cold: bool,
    /// The destination commits the target once it is applied.
    commits: bool,
    /// The guest is paused: see `SendOptions::urgent`.
    urgent: bool,
    /// Bytes of non-zero pages the part writes at the destination, at most (its space check).
    writes: u64,
}

/// The commit's time in a final round's answer (`{"committed_unix_us": N}`, PROTOCOL.md),
/// if it has one.
fn committed_unix_us(answer: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()?
        .get("committed_unix_us")?
        .as_u64()
}

/// The pause from the source's stop to the destination's commit, milliseconds, when the
/// destination said when it committed and that fits what the source saw: no earlier than
/// the committing part began to be sent (`sent_ms` after the stop), no later
/// than the answer's arrival (`observed_ms`). A clock apart by more than that gives `None`,
/// and the observed pause stands; a smaller offset is not seen (the clocks are taken as in
/// step, NTP or PTP, as for QEMU's `RESUME`).
fn pause_to_commit_ms(
    paused: Option<std::time::SystemTime>,
    committed_unix_us: Option<u64>,
    sent_ms: f64,
    observed_ms: f64,
) -> Option<f64> {
    let paused_us = paused?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_micros();
    let committed_us = u128::from(committed_unix_us?);
    let ms = committed_us.checked_sub(paused_us)? as f64 / 1000.0;
    (sent_ms <= ms && ms <= observed_ms).then_some(ms)
}

/// The outcome of the part in `p`, if any (else never).
async fn landing(p: &mut Option<InFlight<'_>>) -> (KeptSession, Result<(u64, String), SendError>) {
    match p {
        Some(p) => p.sending.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Starts sending one encoded part of a round, as its own object, on `lane`; the future gives
/// the session back with the outcome.
#[allow(clippy::too_many_arguments)]
fn start_part<'a>(
    dest: Destination<'a>,
    spec: &MigrationSpec,
    id: &str,
    mut lane: KeptSession,
    file: tempfile::NamedTempFile,
    wire: u64,
    raw_size: u64,
    p: PartSpec,
    links: Arc<PartLinks>,
) -> PartFuture<'a> {
    let src = Source {
        path: file.path().to_path_buf(),
        name: spec.name.clone(),
        size: wire,
        version_tag: format!(
            "migration {id} round {} part {}{}",
            p.round,
            p.part,
            if p.cold { " cold" } else { "" }
        ),
        pre_encoded: Some((data::ENCODING_HDE_PAGES_INPLACE, raw_size, Vec::new())),
        commit: p.commits,
        writes: Some(p.writes),
    };
    let opts = SendOptions {
        urgent: p.urgent,
        ..part_options(spec)
    };
    Box::pin(async move {
        let r = send_files_kept(
            dest.endpoint,
            dest.addr,
            dest.expected,
            &[src],
            &opts,
            &mut |_| {},
            &mut lane,
        )
        .await
        .map(|r| {
            if let Some(t) = r.link.tcp {
                let mut sum = links
                    .tcp
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *sum = Some(sum.map_or(t, |s| s.plus(t)));
            }
            links.reconnects.fetch_add(r.reconnects, Ordering::Relaxed);
            let answer = r
                .objects
                .last()
                .map(|o| o.answer.clone())
                .unwrap_or_default();
            (r.resent_bytes, answer)
        });
        // The encoded part is deleted once sent (or given up).
        drop(file);
        (lane, r)
    })
}

/// How every part of every round is sent (and so how the rounds' session is opened).
fn part_options(spec: &MigrationSpec) -> SendOptions {
    SendOptions {
        streams: spec.streams,
        retry_for: spec.retry_for,
        // Preparing reached the destination: a link down between rounds is waited out too.
        reached: true,
        // Its tag names this migration, round and part: new to the destination.
        fresh: true,
        delta: DeltaOptions {
            enabled: false,
            ..DeltaOptions::default()
        },
        limit: spec.rate_limit.clone(),
        ..SendOptions::default()
    }
}

/// An encoded part: its file, size, and pages at each level (zero / same / dup / cache /
/// XOR / literal).
type Encoded = (tempfile::NamedTempFile, u64, [u64; 6]);
type EncodeResult = (Encoding, std::io::Result<Encoded>, Duration);
type EncodeTask = tokio::task::JoinHandle<EncodeResult>;

/// Starts encoding the pages `dirty[part]` on a blocking thread, with the encoding state
/// moved there.
fn spawn_encode(
    reader: PageReader,
    state: &mut RoundState,
    dirty: Arc<[u64]>,
    part: Range<usize>,
    cold: bool,
) -> EncodeTask {
    if !state.codecs.contains(&state.enc.codec) {
        state.codecs.push(state.enc.codec);
    }
    let mut enc = std::mem::replace(&mut state.enc, Encoding::away());
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let r = encode_pages(&reader, &mut enc, &dirty[part], cold);
        (enc, r, t.elapsed())
    })
}

/// Waits for [`spawn_encode`]'s work and puts the encoding state back.
async fn join_encode(
    task: EncodeTask,
    state: &mut RoundState,
    round: u32,
) -> Result<Encoded, String> {
    join_encoded(task.await, state, round)
}

/// [`spawn_encode`]'s work, done: puts the encoding state back.
fn join_encoded(
    done: Result<EncodeResult, tokio::task::JoinError>,
    state: &mut RoundState,
    round: u32,
) -> Result<Encoded, String> {
    // The state went with the task: a task that panicked or was cancelled lost it, and the
    // migration cannot go on (it rolls back).
    let (enc, r, took) =
        done.map_err(|e| format!("encoding round {round}: the encoder failed: {e}"))?;
    state.enc = enc;
    state.encode_time = took;
    if let Ok((_, _, levels)) = &r {
        let pages: u64 = levels.iter().sum();
        // Small parts say little about the pace.
        if pages >= 1024 {
            state.encode_rate = Some(pages as f64 / took.as_secs_f64().max(1e-6));
        }
    }
    r.map_err(|e| format!("encoding round {round}: {e}"))
}

/// Encodes the pages `dirty[part]` on a blocking thread and waits for it.
async fn encode_part(
    reader: &PageReader,
    state: &mut RoundState,
    dirty: &Arc<[u64]>,
    part: Range<usize>,
    cold: bool,
    round: u32,
) -> Result<Encoded, String> {
    let task = spawn_encode(reader.clone(), state, dirty.clone(), part, cold);
    join_encode(task, state, round).await
}

/// Writes the HDE page object of `addrs` to a temporary file; returns it, its size and the
/// pages sent at each level.
fn encode_pages(
    reader: &PageReader,
    state: &mut Encoding,
    addrs: &[u64],
    cold: bool,
) -> std::io::Result<Encoded> {
    let ps = reader.page_size();
    let cfg = EncoderConfig {
        page_size: ps,
        codec: state.codec,
        ..EncoderConfig::new(reader.pages())
    };
    let mut enc = PageEncoder::new(cfg).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tmp = match &state.scratch {
        Some(dir) => tempfile::Builder::new()
            .prefix(".dwcp-round-")
            .tempfile_in(dir)?,
        None => tempfile::Builder::new().prefix(".dwcp-round-").tempfile()?,
    };
    let mut out = Vec::with_capacity(8 << 20);
    let mut buf = Vec::with_capacity(1024 * ps);
    // Only with references, and with a destination that has a cache (it sent a summary).
    let learn = !cold && !state.no_learning && state.remote.is_some();
    let max_learned = (MAX_LEARNED_BYTES / ps as u64) as usize;
    for batch in addrs.chunks(1024) {
        buf.clear();
        reader.copy_pages(batch, &mut buf);
        for (&addr, page) in batch.iter().zip(buf.chunks_exact(ps)) {
            let base = if cold { None } else { state.shadow.base(addr) };
            let literal = enc.stats().literal;
            let remote = if cold { None } else { state.remote.as_ref() };
            enc.push(addr, page, base, remote, &mut out)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // The destination's cache learns every literal page it applies, and objects are
            // applied in order: a later part (or round) may refer to this page there. That
            // keeps the duplicates across the parts of a round, which the encoder sees only
            // within one object.
            if learn
                && enc.stats().literal > literal
                && state.learned.len() < max_learned
                && let Some(r) = state.remote.as_mut()
            {
                let h = dwcp_encoding::fast64(page);
                if !r.contains(h) {
                    r.insert(h);
                    state.learned.push(h);
                }
            }
            state.shadow.record(addr, page);
        }
        if out.len() >= 4 << 20 {
            tmp.write_all(&out)?;
            out.clear();
        }
    }
    let s = enc.finish(&mut out);
    tmp.write_all(&out)?;
    tmp.flush()?;
    let levels = [s.zero, s.same, s.dup, s.cache, s.xor, s.literal];
    Ok((tmp, s.bytes_out, levels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_ends_at_the_commit_when_the_destinations_time_fits() {
        use std::time::{Duration, UNIX_EPOCH};
        let paused = UNIX_EPOCH + Duration::from_micros(1_000_000_000_000);
        let at = |ms: u64| Some(1_000_000_000_000 + ms * 1000);
        assert_eq!(
            committed_unix_us(r#"{"committed_unix_us":1000000250000}"#),
            at(250)
        );
        // Another answer (an older destination's, empty) says nothing.
        for a in ["", "done", r#"{"committed_unix_us":-1}"#, r#"{"other":1}"#] {
            assert_eq!(committed_unix_us(a), None, "{a:?}");
        }
        assert_eq!(
            pause_to_commit_ms(Some(paused), at(250), 100.0, 300.0),
            Some(250.0)
        );
        assert_eq!(
            pause_to_commit_ms(Some(paused), at(0), 0.0, 300.0),
            Some(0.0)
        );
        // A commit after the answer came, before its part was out, or before the stop: the
        // clocks are apart.
        assert_eq!(
            pause_to_commit_ms(Some(paused), at(301), 100.0, 300.0),
            None
        );
        assert_eq!(pause_to_commit_ms(Some(paused), at(99), 100.0, 300.0), None);
        assert_eq!(
            pause_to_commit_ms(Some(paused), Some(999_999_999_000), 0.0, 300.0),
            None
        );
        assert_eq!(pause_to_commit_ms(None, at(250), 0.0, 300.0), None);
        assert_eq!(pause_to_commit_ms(Some(paused), None, 0.0, 300.0), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_commit_answer_is_settled_by_the_published_pages() {
        use dwcp_encoding::image::{Corpus, DirtyModel, ImageSpec, generate};
        let cluster = dwcp_testkit::TestCluster::new();
        let agent = dwcp_testkit::RunningAgent::start(&cluster, "dest", |_| {}).await;
        let ep = dwcp_testkit::endpoint(&cluster, "src", |_| {});
        let dest = Destination {
            endpoint: &ep,
            addr: agent.addr,
            expected: None,
        };
        let img = generate(&ImageSpec::new(4 << 20), &mut Corpus::synthetic());
        let vm = MemoryVm::start(img.data, 4096, DirtyModel::default(), 2000.0, 3);
        let spec = MigrationSpec::new("settled.mem");
        // Nothing published yet: not committed.
        assert!(!published_matches(&vm, dest, &spec).await);
        let r = migrate(&vm, dest, &spec, &mut |_| {}).await;
        assert!(r.migrated && r.bit_exact == Some(true), "{r:?}");
        // The paused source's memory is what the destination published.
        assert!(published_matches(&vm, dest, &spec).await);
        // Not while a migration target of that name is left (an older image could match).
        let target = cluster.dir().join("spool/src/.settled.mem.dwcp-migrating");
        std::fs::write(&target, vec![0u8; 4 << 20]).unwrap();
        assert_eq!(settled(&vm, dest, &spec).await, Some(false));
        std::fs::remove_file(&target).unwrap();
        assert_eq!(settled(&vm, dest, &spec).await, Some(true));
        // Not under another name, and not once the source ran on and changed.
        assert!(!published_matches(&vm, dest, &MigrationSpec::new("other.mem")).await);
        vm.resume();
        let w = vm.writes();
        for _ in 0..100 {
            if vm.writes() > w {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        vm.pause();
        assert!(vm.writes() > w);
        assert!(!published_matches(&vm, dest, &spec).await);
        agent.stop().await.unwrap();
        // Nobody to ask: not known.
        assert_eq!(settled(&vm, dest, &spec).await, None);
    }

    #[test]
    fn parts_double_while_the_encoder_outpaces_the_link_and_end_with_the_round() {
        // The first part's pace unknown: twice as many.
        assert_eq!(next_part(&(0..100), 1000, 500, 50.0, None), Some(100..300));
        // An encoder 1.5x as fast as the link: half again as many, so it finishes in time.
        assert_eq!(
            next_part(&(0..100), 1000, 500, 150.0, Some(100.0)),
            Some(100..250)
        );
        // Slower than the link: no smaller than the last; faster than twice: no more than 2x.
        assert_eq!(
            next_part(&(0..100), 1000, 500, 50.0, Some(100.0)),
            Some(100..200)
        );
        assert_eq!(
            next_part(&(0..100), 1000, 500, 900.0, Some(100.0)),
            Some(100..300)
        );
        // Capped, then cut at the end of the round, then none.
        assert_eq!(
            next_part(&(100..400), 1000, 500, 900.0, None),
            Some(400..900)
        );
        assert_eq!(
            next_part(&(400..900), 1000, 500, 900.0, None),
            Some(900..1000)
        );
        assert_eq!(next_part(&(900..1000), 1000, 500, 900.0, None), None);
    }
}
