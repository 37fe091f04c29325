//! QEMU's auto-converge steps, chosen from the need.
//!
//! QEMU throttles a guest that dirties memory faster than the migration sends it: at the
//! second bitmap sync since its last step at which the guest had dirtied more than half of
//! what went out meanwhile (`throttle-trigger-threshold`), it starts the throttle at
//! `cpu-throttle-initial` (20 %) or raises it by `cpu-throttle-increment` (10 points),
//! up to `max-cpu-throttle` (99 %). A step so takes two rounds at least, and
//! getting from 20 % to 99 % takes eight steps: sixteen rounds. Across a slow link a round
//! takes many seconds, and until the throttle is high enough every round sends again what
//! the guest rewrote (300 ms, 50 Mbit/s, a guest writing 10 MB/s: 157-172 s and 760-880 MB
//! on the wire for a 1 GiB guest; 2026-12-05).
//!
//! [`Pacer`] sets both parameters after each sync from what QEMU measured: the first step
//! goes straight to the throttle at which a guest whose dirtying scales with its CPU time
//! would dirty a third of what the stream carries, and a later step (QEMU takes one only
//! when the last fell short, so the guest's writes did not scale down as assumed) goes at
//! least three quarters of the way to the highest throttle. The values QEMU had are the floor of both, and
//! no paced step goes beyond its `max-cpu-throttle`.

/// QEMU's highest throttle (`max-cpu-throttle` can only lower it), percent.
const MAX: u8 = 99;

/// QEMU's `cpu-throttle-initial` and `cpu-throttle-increment`, percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    /// The throttle QEMU starts at.
    pub initial: u8,
    /// What QEMU adds at each later step.
    pub increment: u8,
}

/// QEMU's auto-converge parameters as the source's owner left them: the floor of the paced
/// steps, and their bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Own {
    /// The steps; paced ones are never smaller.
    pub steps: Steps,
    /// `max-cpu-throttle`: no paced step goes beyond it.
    pub max: u8,
    /// `throttle-trigger-threshold`: QEMU steps when the guest dirtied more than this
    /// percentage of what was sent.
    pub trigger: u8,
}

impl Own {
    /// QEMU's defaults.
    pub const QEMU: Self = Self {
        steps: Steps {
            initial: 20,
            increment: 10,
        },
        max: MAX,
        trigger: 50,
    };
}

/// The steps for a throttle `now` (0: none yet), the guest having dirtied `dirty` bytes a
/// second under the throttle `under` while the stream took `sent` bytes a second.
pub fn steps_for(own: Own, under: u8, now: u8, dirty: f64, sent: f64) -> Steps {
    let max = own.max.clamp(1, MAX);
    // The share of the stream rate the guest may dirty at the throttle aimed at: two thirds
    // of QEMU's trigger (a third by default), so that one step is enough for a guest whose
    // writes scale with its CPU time, and rounds then shrink to a third each.
    let aim = f64::from(own.trigger.clamp(1, 100)) / 100.0 * 2.0 / 3.0;
    // Percent of CPU time at which the guest would dirty that much, if its writes scale with
    // the CPU time it gets (they did `100 - under` percent of it meanwhile).
    let cpu = f64::from(100 - under.min(MAX)) * aim * sent / dirty;
    let need = if cpu.is_finite() {
        // (Less a hair, so that float error does not round an exact need up.)
        (100.0 - cpu - 1e-6).ceil().clamp(0.0, f64::from(max)) as u8
    } else {
        0
    };
    // The owner's initial stands even beyond the highest (QEMU does not cap it).
    let initial = need.max(own.steps.initial).clamp(1, MAX);
    // QEMU steps again only when the last step fell short (the guest's writes did not scale
    // down as reckoned): three quarters of the gap to the highest at least. While no
    // throttle runs yet, the next step is counted from the initial one.
    let from = if now == 0 { initial } else { now.min(MAX) };
    let gap = max.saturating_sub(from);
    Steps {
        initial,
        increment: need
            .saturating_sub(from)
            .max(gap - gap / 4)
            .max(own.steps.increment)
            .clamp(1, MAX),
    }
}

/// QEMU's stream between the dirty-bitmap syncs a poller sees (several may pass between two
/// polls): what [`Pacer`] and [`crate::qemu_converge::Watch`] measure rounds by.
#[derive(Debug, Default)]
pub struct Periods {
    /// The dirty-sync count last seen.
    sync: u64,
    /// The sync count, seconds and stream bytes read from QEMU at the last new sync seen.
    mark: Option<(u64, f64, u64)>,
    /// The throttle at the previous poll: in force while QEMU measured the dirty rate it
    /// reports at a new sync (a step QEMU takes at that sync is already in the new figure).
    seen: u8,
}

/// The stream from one sync seen to the next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Period {
    /// The sync it started at.
    pub from_sync: u64,
    /// Syncs (QEMU's rounds) it spans.
    pub syncs: u64,
    /// When it started, seconds.
    pub start: f64,
    /// How long it took, seconds.
    pub seconds: f64,
    /// Stream bytes read from QEMU a second.
    pub sent: f64,
    /// The throttle in force meanwhile, percent.
    pub under: u8,
}

impl Periods {
    /// One poll: QEMU's dirty-sync count `sync` and throttle (percent), at `at` seconds with
    /// `read` stream bytes read from QEMU so far. The period that ended when this poll sees a
    /// new sync after an earlier one, and the stream moved in it.
    pub fn poll(&mut self, sync: u64, throttle: u8, at: f64, read: u64) -> Option<Period> {
        let under = self.seen;
        self.seen = throttle;
        if sync <= self.sync {
            return None;
        }
        self.sync = sync;
        let (from_sync, start, r0) = self.mark.replace((sync, at, read))?;
        let seconds = at - start;
        let sent = read.saturating_sub(r0) as f64 / seconds;
        (seconds > 0.0 && sent > 0.0 && sent.is_finite()).then_some(Period {
            from_sync,
            syncs: sync - from_sync,
            start,
            seconds,
            sent,
            under,
        })
    }
}

/// Chooses QEMU's throttle steps while a migration runs: fed each `query-migrate`, it says
/// when to set new ones.
#[derive(Debug)]
pub struct Pacer {
    own: Own,
    periods: Periods,
    /// The steps last set.
    set: Option<Steps>,
}

impl Pacer {
    /// A pacer for QEMU's parameters as they were set.
    pub fn new(own: Own) -> Self {
        Self {
            own,
            periods: Periods::default(),
            set: None,
        }
    }

    /// One poll: QEMU's dirty-sync count `sync`, its throttle `throttle` (percent), its dirty
    /// rate `dirty` (bytes a second, over the period up to its last sync), at `at` seconds
    /// with `read` stream bytes read from QEMU so far. Returns the steps to set, when they
    /// change.
    pub fn poll(
        &mut self,
        sync: u64,
        throttle: u8,
        dirty: f64,
        at: f64,
        read: u64,
    ) -> Option<Steps> {
        let p = self.periods.poll(sync, throttle, at, read)?;
        if dirty <= 0.0 {
            return None;
        }
        let steps = steps_for(self.own, p.under, throttle, dirty, p.sent);
        if self.set == Some(steps) {
            return None;
        }
        self.set = Some(steps);
        Some(steps)
    }

    /// The steps returned last were not set: the next poll that has them returns them again.
    pub fn not_set(&mut self) {
        self.set = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;
    const QEMU: Own = Own::QEMU;

    #[test]
    fn a_guest_dirtying_little_starts_at_qemus_initial_step() {
        // 2 MB/s against 6 MB/s: a third; the throttle that meets the aim is none.
        let s = steps_for(QEMU, 0, 0, 2.0 * MB, 6.0 * MB);
        assert_eq!(s.initial, 20);
        // A later step (should QEMU take one) goes three quarters of the way from 20 to 99.
        assert_eq!(s.increment, 60);
    }

    #[test]
    fn the_first_step_goes_to_the_throttle_the_dirty_rate_needs() {
        // 10 MB/s dirtied, 6 MB/s sent: a third of 6 is 2 MB/s, a fifth of 10: 80 %.
        let s = steps_for(QEMU, 0, 0, 10.0 * MB, 6.0 * MB);
        assert_eq!(s.initial, 80);
        // Measured under 50 % already: a fifth of the half the guest got then, 90 %.
        let s = steps_for(QEMU, 50, 50, 10.0 * MB, 6.0 * MB);
        assert_eq!(s.increment, 40);
        // Far beyond the stream: QEMU's highest.
        let s = steps_for(QEMU, 0, 0, 1000.0 * MB, 1.0 * MB);
        assert_eq!(s.initial, 99);
        // A lower trigger aims lower: at a sixth of 6 MB/s, 90 %.
        let own = Own {
            trigger: 25,
            ..QEMU
        };
        assert_eq!(steps_for(own, 0, 0, 10.0 * MB, 6.0 * MB).initial, 90);
    }

    #[test]
    fn a_step_that_fell_short_goes_most_of_the_way_and_the_throttle_ends_at_99() {
        // Dirtying that did not scale down (a rate-limited writer): the need reads lower
        // than the throttle in force, and the steps still climb.
        let mut now = 20u8;
        let mut seen = vec![now];
        while now < MAX {
            let s = steps_for(QEMU, now, now, 3.0 * MB, 6.0 * MB);
            assert!(s.increment >= 10, "{s:?} at {now}");
            now = (now + s.increment).min(MAX);
            seen.push(now);
        }
        assert_eq!(seen, [20, 80, 95, 99]);
    }

    #[test]
    fn qemus_values_as_set_are_the_floor_and_its_highest_the_ceiling() {
        let own = Own {
            steps: Steps {
                initial: 50,
                increment: 30,
            },
            ..QEMU
        };
        let s = steps_for(own, 0, 0, 1.0 * MB, 6.0 * MB);
        assert_eq!(s.initial, 50);
        let s = steps_for(own, 90, 90, 1.0 * MB, 6.0 * MB);
        assert_eq!(s.increment, 30);
        // An owner's highest of 60: the need (99) is cut there, and steps beyond it are
        // QEMU's to cut (it caps every increment at its highest).
        let own = Own { max: 60, ..QEMU };
        let s = steps_for(own, 0, 0, 1000.0 * MB, 1.0 * MB);
        assert_eq!(
            s,
            Steps {
                initial: 60,
                increment: 10
            }
        );
    }

    #[test]
    fn nonsense_figures_give_bounded_steps() {
        for (under, now, dirty, sent) in [
            (0, 0, f64::MIN_POSITIVE, 1e12),
            (200, 200, 1.0, 1.0),
            (99, 99, 1e12, f64::MIN_POSITIVE),
            (0, 0, 1.0, f64::INFINITY),
        ] {
            for own in [
                QEMU,
                Own {
                    max: 0,
                    trigger: 0,
                    steps: Steps {
                        initial: 0,
                        increment: 0,
                    },
                },
                Own {
                    max: 255,
                    trigger: 255,
                    steps: Steps {
                        initial: 255,
                        increment: 255,
                    },
                },
            ] {
                let s = steps_for(own, under, now, dirty, sent);
                assert!((1..=MAX).contains(&s.initial), "{s:?}");
                assert!((1..=MAX).contains(&s.increment), "{s:?}");
            }
        }
        // A throttle reported beyond QEMU's highest counts as the highest (no overflow).
        assert_eq!(
            steps_for(QEMU, 200, 200, 1.0, 1.0),
            Steps {
                initial: 99,
                increment: 10
            }
        );
    }

    #[test]
    fn the_pacer_measures_between_syncs_and_sets_only_changes() {
        let mut p = Pacer::new(QEMU);
        // The first sync (QEMU's setup) only marks where the stream stood.
        assert_eq!(p.poll(1, 0, 0.0, 0.0, 0), None);
        // Polls within a round change nothing.
        assert_eq!(p.poll(1, 0, 0.0, 5.0, 30_000_000), None);
        // The first pass ends: 60 MB in 10 s sent, 10 MB/s dirtied.
        let s = p.poll(2, 0, 10.0 * MB, 10.0, 60_000_000).unwrap();
        assert_eq!(
            s,
            Steps {
                initial: 80,
                increment: 15
            }
        );
        // The same figures at the next sync: nothing to set.
        assert_eq!(p.poll(3, 0, 10.0 * MB, 20.0, 120_000_000), None);
        // QEMU started the throttle at that sync; the next figures were measured under it
        // (the previous poll saw it), and the writes did not scale down.
        assert_eq!(p.poll(3, 80, 10.0 * MB, 20.5, 121_000_000), None);
        let s = p.poll(4, 80, 10.0 * MB, 30.0, 180_000_000).unwrap();
        // 80 % measured: the need is 96 %.
        assert_eq!(s.increment, 16);
        // Not set (the command failed): the same steps come again at the next sync.
        p.not_set();
        assert_eq!(p.poll(5, 80, 10.0 * MB, 40.0, 240_000_000), Some(s));
    }

    #[test]
    fn the_pacer_ignores_periods_without_figures() {
        let mut p = Pacer::new(QEMU);
        assert_eq!(p.poll(1, 0, 0.0, 0.0, 0), None);
        // No dirty rate reported, nothing read, or no time passed.
        assert_eq!(p.poll(2, 0, 0.0, 1.0, 1000), None);
        assert_eq!(p.poll(3, 0, 1.0 * MB, 2.0, 1000), None);
        assert_eq!(p.poll(4, 0, 1.0 * MB, 2.0, 5000), None);
        // A stream count that went back (a restarted reader) is no negative rate.
        assert_eq!(p.poll(5, 0, 1.0 * MB, 3.0, 10), None);
    }
}
