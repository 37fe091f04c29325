//! When a QEMU migration cannot converge: give up with the reason, rather than at the timeout.
//!
//! QEMU iterates for as long as it is left to. A guest that dirties its memory as fast as the
//! migration sends it never lets the dirty set shrink to what fits the downtime limit, and
//! QEMU's escalation, auto-converge, can do no more once it is off or at `max-cpu-throttle`.
//! Such a migration used to run until `dwcp migrate`'s timeout (ten minutes), sending the same
//! pages again and again. [`Watch`] tells it from what QEMU reports at each dirty-bitmap sync:
//! once auto-converge has nothing left, a round that took four times the pause budget or
//! longer, in which the guest dirtied about as much as went out (nine tenths or more), and
//! after which no less stays dirty than at the best sync before (nine tenths or more of
//! it), did not shrink;
//! after [`GiveUp::rounds`] such rounds in a row, lasting [`GiveUp::after`] at least, the
//! migration is rolled back with the figures that show why.

use std::time::Duration;

use crate::qemu_throttle::Periods;

/// A round "shrinks" the dirty set when QEMU reports less than this share of the lowest it
/// reported at an earlier sync, or when the guest dirtied less than this share of what went
/// out. (A working set the guest keeps rewriting is dirtied whole in every round: as many
/// pages as were sent, a little less than their bytes in QEMU's stream.)
const SHRINK: f64 = 0.9;

/// How long a migration that cannot converge is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUp {
    /// Rounds in a row that do not shrink, with auto-converge out of steps.
    pub rounds: u32,
    /// And at least this long from the start of the first of them.
    pub after: Duration,
}

impl Default for GiveUp {
    /// Five rounds and 30 s: across a slow link a round takes seconds, and on a fast one the
    /// dirty rate QEMU reports is an average over a second or more.
    fn default() -> Self {
        Self {
            rounds: 5,
            after: Duration::from_secs(30),
        }
    }
}

impl GiveUp {
    /// When post-copy is the way out instead: at most two rounds and 10 s. Moving sooner
    /// loses nothing (what is dirty follows the guest either way), where giving up loses the
    /// whole migration; more rounds only re-send the same pages. Across 300 ms at 50 Mbit/s
    /// a 1 GiB guest writing 10 MB/s took five rounds and 160 s to reach the rule's end
    /// (`docs/BENCHMARKS.md`).
    pub fn for_postcopy(self) -> Self {
        Self {
            rounds: self.rounds.min(2),
            after: self.after.min(Duration::from_secs(10)),
        }
    }
}

/// Why a migration was given up: the stalled rounds' figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    /// Rounds in a row that did not shrink.
    pub rounds: u32,
    /// Seconds they took.
    pub seconds: f64,
    /// The guest's dirty rate in the last of them, bytes a second.
    pub dirty: f64,
    /// What QEMU's stream carried meanwhile, bytes a second.
    pub sent: f64,
    /// Auto-converge's throttle, percent; `None` with auto-converge off.
    pub throttle: Option<u8>,
    /// Bytes QEMU reported dirty at the last sync.
    pub remaining: u64,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: f64| b / 1e6;
        write!(
            f,
            "did not converge: for {} rounds ({:.0} s) the guest dirtied its memory about as fast \
             as the migration sent it ({:.1} MB/s dirtied, {:.1} MB/s of QEMU's stream sent), \
             with auto-converge {}; {:.1} MB stay dirty",
            self.rounds,
            self.seconds,
            mb(self.dirty),
            mb(self.sent),
            match self.throttle {
                None => "off".to_string(),
                Some(t) => format!("at its highest throttle ({t} %)"),
            },
            mb(self.remaining as f64),
        )
    }
}

/// Watches a QEMU migration's rounds: fed each `query-migrate`, it says when to give up.
#[derive(Debug)]
pub struct Watch {
    give_up: GiveUp,
    /// Seconds a round must take to count: four times the pause budget. A dirty set sent
    /// in less is within a few times of what the pause allows, and QEMU may stop the guest
    /// after any round that happens to be small enough (over `lossy`, a guest that was not
    /// throttled kept its dirty set at 1-3 MB in rounds of a fifth of a second for a minute,
    /// then QEMU stopped it: 2026-12-05). Longer, the polls (every 0.3 s) time it well.
    shortest: f64,
    /// `max-cpu-throttle` with auto-converge on; `None` with it off.
    max: Option<u8>,
    periods: Periods,
    /// The least QEMU reported dirty at a sync after its first pass.
    lowest: Option<u64>,
    /// Rounds in a row that did not shrink, when the first of them started, and the least
    /// reported dirty before it: a set that shrinks a little each round must get below nine
    /// tenths of that within the rounds given, or it is too slow to count as shrinking.
    stalls: u32,
    since: f64,
    streak_low: u64,
}

impl Watch {
    /// A watch for a migration whose auto-converge stops at `max` percent (`None`: off) and
    /// whose guest may be paused for `budget`.
    pub fn new(give_up: GiveUp, max: Option<u8>, budget: Duration) -> Self {
        Self {
            give_up,
            shortest: 4.0 * budget.as_secs_f64(),
            max,
            periods: Periods::default(),
            lowest: None,
            stalls: 0,
            since: 0.0,
            streak_low: 0,
        }
    }

    /// Rounds in a row so far that did not shrink, with auto-converge out of steps.
    pub fn stalls(&self) -> u32 {
        self.stalls
    }

    /// One poll: QEMU's dirty-sync count `sync`, its throttle (percent), its dirty rate
    /// `dirty` (bytes a second, over its last sync period), the bytes it reports `remaining`,
    /// at `at` seconds with `read` stream bytes read from QEMU so far. Returns the stall
    /// once the migration should be given up.
    pub fn poll(
        &mut self,
        sync: u64,
        throttle: u8,
        dirty: f64,
        remaining: u64,
        at: f64,
        read: u64,
    ) -> Option<Stall> {
        let p = self.periods.poll(sync, throttle, at, read)?;
        // The first pass (up to sync 2) sends every page once: it says nothing of the dirty set.
        if p.from_sync < 2 || !dirty.is_finite() {
            return None;
        }
        let sent = p.sent;
        let Some(lowest) = self.lowest else {
            // The first round after the first pass: less than all of RAM stays dirty.
            self.lowest = Some(remaining);
            return None;
        };
        self.lowest = Some(lowest.min(remaining));
        let reference = if self.stalls == 0 {
            lowest
        } else {
            self.streak_low
        };
        let shrank = (remaining as f64) < SHRINK * reference as f64;
        // Auto-converge can do no more: off, or at its highest throttle for the whole round.
        // (An owner's `throttle-trigger-threshold` of 90 or more keeps QEMU from stepping
        // while the guest dirties 90 % of what goes out: then nothing is given up.)
        let exhausted = self.max.is_none_or(|m| p.under >= m && throttle >= m);
        // Several syncs since the last poll: rounds of that length on average.
        let round = p.seconds / p.syncs as f64;
        if !exhausted || shrank || dirty < SHRINK * sent || round < self.shortest {
            self.stalls = 0;
            return None;
        }
        if self.stalls == 0 {
            self.since = p.start;
            self.streak_low = lowest;
        }
        self.stalls += u32::try_from(p.syncs).unwrap_or(u32::MAX);
        let seconds = at - self.since;
        (self.stalls >= self.give_up.rounds && seconds >= self.give_up.after.as_secs_f64()).then(
            || Stall {
                rounds: self.stalls,
                seconds,
                dirty,
                sent,
                throttle: self.max.map(|_| throttle),
                remaining,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;
    const BUDGET: Duration = Duration::from_millis(300);

    /// Polls one sync a `round` seconds from sync 1, the stream carrying `sent` MB/s, the
    /// guest dirtying `dirty` MB/s and QEMU reporting `remaining` MB at each; returns the
    /// round at which the watch gave up.
    fn run(
        w: &mut Watch,
        rounds: u64,
        round: f64,
        throttle: impl Fn(u64) -> u8,
        dirty: impl Fn(u64) -> f64,
        remaining: impl Fn(u64) -> f64,
    ) -> Option<(u64, Stall)> {
        let sent = 4.0 * MB;
        for s in 1..=rounds {
            let at = s as f64 * round;
            // A poll inside the round (its throttle), then the one that sees the sync.
            w.poll(
                s - 1,
                throttle(s),
                0.0,
                0,
                at - round / 2.0,
                (sent * (at - round / 2.0)) as u64,
            );
            let r = (remaining(s) * MB) as u64;
            if let Some(stall) = w.poll(s, throttle(s), dirty(s) * MB, r, at, (sent * at) as u64) {
                return Some((s, stall));
            }
        }
        None
    }

    fn quick(rounds: u32) -> GiveUp {
        GiveUp {
            rounds,
            after: Duration::ZERO,
        }
    }

    #[test]
    fn without_auto_converge_a_guest_dirtying_faster_than_the_stream_is_given_up() {
        let mut w = Watch::new(quick(5), None, BUDGET);
        let (at, stall) = run(&mut w, 30, 2.0, |_| 0, |_| 5.0, |_| 20.0).expect("given up");
        // Syncs 1 and 2 bound the first pass; the round ending at sync 3 sets the first low
        // (less than all of RAM), and the five ending at syncs 4-8 leave no less.
        assert_eq!(at, 8);
        assert_eq!(stall.rounds, 5);
        assert_eq!(stall.throttle, None);
        assert!((stall.sent - 4.0 * MB).abs() < 1.0, "{stall:?}");
        let text = stall.to_string();
        assert!(
            text.contains("did not converge") && text.contains("auto-converge off"),
            "{text}"
        );
        assert!(
            text.contains("5.0 MB/s dirtied, 4.0 MB/s of QEMU's stream sent")
                && text.contains("20.0 MB stay dirty"),
            "{text}"
        );
    }

    #[test]
    fn a_guest_dirtying_less_than_the_stream_carries_is_left_to_converge() {
        let mut w = Watch::new(quick(3), None, BUDGET);
        // Dirtying 85 % of what goes out: slowly, the set shrinks; QEMU gets there.
        assert!(run(&mut w, 50, 2.0, |_| 0, |_| 3.4, |_| 20.0).is_none());
        // A working set rewritten whole every round: as many pages dirtied as sent, a
        // little less than their bytes in the stream. It does not shrink.
        let mut w = Watch::new(quick(3), None, BUDGET);
        assert!(run(&mut w, 50, 2.0, |_| 0, |_| 3.99, |_| 20.0).is_some());
    }

    #[test]
    fn a_dirty_set_that_still_shrinks_is_left_to_converge() {
        let mut w = Watch::new(quick(3), None, BUDGET);
        // The dirty rate (an average over QEMU's last second) reads high, but every sync
        // leaves a tenth less dirty than the one before.
        let r = run(
            &mut w,
            20,
            2.0,
            |_| 0,
            |_| 6.0,
            |s| 100.0 * 0.85f64.powi(s as i32),
        );
        assert!(r.is_none(), "{r:?}");
        // 7 % less each round: no round is below nine tenths of the one before, but the
        // rounds together are, within the five given.
        let mut w = Watch::new(quick(5), None, BUDGET);
        let r = run(
            &mut w,
            40,
            2.0,
            |_| 0,
            |_| 6.0,
            |s| 100.0 * 0.93f64.powi(s as i32),
        );
        assert!(r.is_none(), "{r:?}");
        // 1 % less each round: too slow; given up after five rounds.
        let mut w = Watch::new(quick(5), None, BUDGET);
        let (at, _) = run(
            &mut w,
            40,
            2.0,
            |_| 0,
            |_| 6.0,
            |s| 100.0 * 0.99f64.powi(s as i32),
        )
        .expect("given up");
        assert_eq!(at, 8);
    }

    #[test]
    fn while_auto_converge_has_steps_left_nothing_is_given_up() {
        // Throttled to 60 % of a maximum of 99: QEMU will step again.
        let mut w = Watch::new(quick(2), Some(99), BUDGET);
        assert!(run(&mut w, 20, 2.0, |_| 60, |_| 8.0, |_| 20.0).is_none());
        // At its maximum from round 10 on: the rounds from then on count.
        let mut w = Watch::new(quick(3), Some(99), BUDGET);
        let throttle = |s: u64| if s >= 10 { 99 } else { 60 };
        let (at, stall) = run(&mut w, 20, 2.0, throttle, |_| 8.0, |_| 20.0).expect("given up");
        // The rounds ending at syncs 10, 11 and 12 ran at 99 %.
        assert_eq!(at, 12);
        assert_eq!(stall.throttle, Some(99));
        assert!(
            stall.to_string().contains("at its highest throttle (99 %)"),
            "{stall}"
        );
        // An owner's lower maximum is the end of the steps too.
        let mut w = Watch::new(quick(3), Some(50), BUDGET);
        assert!(run(&mut w, 20, 2.0, |_| 50, |_| 8.0, |_| 20.0).is_some());
    }

    #[test]
    fn it_gives_up_only_after_the_rounds_and_the_time_both() {
        let give_up = GiveUp {
            rounds: 3,
            after: Duration::from_secs(30),
        };
        // Rounds of 2 s: three of them are not 30 s; fifteen are (from sync 3 to sync 18).
        let mut w = Watch::new(give_up, None, BUDGET);
        let (at, stall) = run(&mut w, 40, 2.0, |_| 0, |_| 5.0, |_| 20.0).expect("given up");
        assert_eq!(at, 18);
        assert!(stall.seconds >= 30.0 && stall.rounds == 15, "{stall:?}");
        // A round that shrinks starts the count again.
        let mut w = Watch::new(quick(3), None, BUDGET);
        let remaining = |s: u64| if s == 5 { 10.0 } else { 20.0 };
        let (at, _) = run(&mut w, 40, 2.0, |_| 0, |_| 5.0, remaining).expect("given up");
        assert_eq!(at, 8);
    }

    #[test]
    fn rounds_shorter_than_four_pause_budgets_do_not_count() {
        // Rounds of 0.2 s and of 1 s (the budget being 0.3 s): the dirty set is within a few
        // times of what the pause allows, and QEMU may stop the guest after any round.
        let mut w = Watch::new(quick(3), None, BUDGET);
        assert!(run(&mut w, 100, 0.2, |_| 0, |_| 5.0, |_| 1.0).is_none());
        let mut w = Watch::new(quick(3), None, BUDGET);
        assert!(run(&mut w, 100, 1.0, |_| 0, |_| 5.0, |_| 1.0).is_none());
        // Polled every 0.9 s, with four rounds of 0.2 s in between: the same.
        let mut w = Watch::new(quick(3), None, BUDGET);
        let mut given_up = false;
        for k in 1..=40u64 {
            let at = k as f64 * 0.9;
            given_up |= w
                .poll(4 * k, 0, 5.0 * MB, 1_000_000, at, (4.0 * MB * at) as u64)
                .is_some();
        }
        assert!(!given_up);
        // Rounds of 1.5 s do.
        let mut w = Watch::new(quick(3), None, BUDGET);
        assert!(run(&mut w, 100, 1.5, |_| 0, |_| 5.0, |_| 1.0).is_some());
        // Two of them between polls count as two.
        let mut w = Watch::new(quick(4), None, BUDGET);
        let mut at_sync = None;
        for k in 1..=20u64 {
            let at = k as f64 * 3.0;
            if w.poll(2 * k, 0, 5.0 * MB, 1_000_000, at, (4.0 * MB * at) as u64)
                .is_some()
            {
                at_sync = Some(2 * k);
                break;
            }
        }
        // Syncs 2 (the first pass's end), 4 (the first low), then 6 and 8: four rounds.
        assert_eq!(at_sync, Some(8));
    }

    #[test]
    fn polls_without_a_new_sync_or_without_a_rate_change_nothing() {
        let mut w = Watch::new(quick(1), None, BUDGET);
        // The first pass, then a round in which nothing was read (a stalled socket): no
        // figures, no verdict.
        assert_eq!(w.poll(1, 0, 5.0 * MB, 1, 1.0, 100), None);
        assert_eq!(w.poll(2, 0, 5.0 * MB, 1, 2.0, 200), None);
        assert_eq!(w.poll(3, 0, 5.0 * MB, 1, 3.0, 200), None);
        // The same sync polled again changes nothing either.
        assert_eq!(w.poll(3, 0, 5.0 * MB, 1, 3.5, 300), None);
        // Nonsense figures are no verdict.
        assert_eq!(w.poll(4, 0, f64::NAN, 1, 4.0, 400), None);
        assert_eq!(w.poll(5, 0, 5.0 * MB, 1, 4.0, 500), None);
        // A round with figures sets the first low; the next one that leaves no less is a
        // stall: given up at once (one round, no time asked).
        assert_eq!(w.poll(6, 0, 5.0 * MB, 1, 5.0, 600), None);
        assert!(w.poll(7, 0, 5.0 * MB, 1, 7.0, 700).is_some());
    }
}
