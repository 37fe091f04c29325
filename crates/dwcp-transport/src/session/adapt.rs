//! How many streams a session runs: a per-mode starting point, then hill climbing on
//! goodput. Pure: fed samples, answers with a target stream count.
//!
//! Starting point: 64 streams when the peer is in the same datacenter (round-trip time under
//! 10 ms), 8 across the internet, clamped to `[min, max]`. Then, once the streams have
//! settled (two samples after every change are ignored — new connections start slowly):
//!
//! - *up*: add half again (at least one) while each step raises goodput by more than 10 %;
//! - *down*: when going up did not pay, try half the best count, and keep halving while
//!   goodput stays within the same 10 % of the best seen (fewer streams cost less CPU and
//!   are kinder to other traffic; streams are added only for a clear gain, so they are
//!   kept only for one too);
//! - *hold* at the best count found; probe one step up after a cool-down of 20 samples
//!   (doubling, up to 320, each time such a probe finds nothing), or learn again at once if
//!   goodput falls under 70 % of what that count gave for three samples in a row (the path
//!   changed).
//!
//! Every change needs a clear gain over a settled measurement, so the count does not flap on
//! noise.
//!
//! Sessions across the internet turn the down probes off ([`Controller::holding_after_up`]):
//! an up-probe that did not pay keeps its streams and holds if goodput held (within 3 %, on
//! a second sample if the first fell short by less than a fifth), else it goes back to the
//! best count. There, fewer streams save no CPU worth having, and
//! the bandwidth a retired stream leaves takes the others seconds to reclaim (BBR raises its
//! estimate by a quarter every eight round trips): on the `internet` testbed profile, going
//! from 12 streams to 4 halved goodput for about 5 s, and from 12 to 8 cost the last second of
//! a transfer half its rate. Re-probes back off (doubling cool-downs), so the count creeps up
//! by half a step at most once per cool-down.

use std::time::Duration;

/// Where the peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Round trip under 10 ms: many streams, CPU is the limit.
    Datacenter,
    /// Farther away: fewer, longer-lived streams.
    Internet,
}

impl Mode {
    /// The mode for a measured round-trip time.
    pub fn for_rtt(rtt: Duration) -> Self {
        if rtt < Duration::from_millis(10) {
            Self::Datacenter
        } else {
            Self::Internet
        }
    }

    /// Streams to start with.
    pub fn initial_streams(self) -> u32 {
        match self {
            Self::Datacenter => 64,
            Self::Internet => 8,
        }
    }
}

const SETTLE: u32 = 2;
const COOLDOWN: u32 = 20;
const GAIN_UP: f64 = 1.10;
const HOLD_DOWN: f64 = 0.97;
/// A down-probe keeps the fewer streams while goodput is at least this share of the best seen:
/// what a step up would have had to gain, the other way. On a CPU-bound `dc` host samples
/// spread by more than 3 % from one to the next, and a 3 % bar stopped the descent on noise:
/// 64 streams went to 32, then 16, then back to 32 (2026-12-04), while one stream moved more
/// than either.
const KEEP_DOWN: f64 = 1.0 / GAIN_UP;
const DROP: f64 = 0.7;
const DROP_SAMPLES: u32 = 3;
/// Without down probes, an up-step that did not pay keeps its streams when goodput held
/// (within `HOLD_DOWN` of the best). Between that and this share of the best, one more sample
/// decides: a BBR `PROBE_RTT` (200 ms + a round trip at a few packets, every stream at once)
/// inside a 16-round-trip sample costs up to a fifth of it, but passes.
const KEEP: f64 = 0.8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Up,
    Down,
    Hold,
}

/// The controller of one session.
#[derive(Clone, Debug)]
pub struct Controller {
    min: u32,
    max: u32,
    best: Option<(u32, f64)>,
    phase: Phase,
    settle: u32,
    settle_after: u32,
    cooldown: u32,
    low: u32,
    /// Re-probes from hold that found nothing, in a row: each doubles the next cool-down.
    idle_probes: u32,
    /// The current up-step is a re-probe from hold (a miss goes back to hold, not down).
    reprobe: bool,
    /// Without down probes: a re-probe up held goodput without raising it, and its streams
    /// were kept; no more up probes until the path changes (each would keep half again, and
    /// a flat path crept to `max_streams` over an hour's transfer). The goodput then: the
    /// mark a better path must clear (not the held count's average, which dips follow down).
    settled: Option<f64>,
    /// Samples in a row well above the settled goodput, in hold: the path got better.
    high: u32,
    /// Whether to try fewer streams than the best count.
    probe_down: bool,
    /// The last up-step's sample fell short of the best by less than `KEEP`: the next sample
    /// decides whether its streams stay.
    confirming: bool,
}

impl Controller {
    /// A controller for counts in `[min, max]` (min at least 1).
    pub fn new(min: u32, max: u32) -> Self {
        Self::with_settle(min, max, SETTLE)
    }

    /// As [`new`](Self::new), ignoring `settle` samples after each change (fewer where new
    /// connections reach full speed at once, on short round trips).
    pub fn with_settle(min: u32, max: u32, settle: u32) -> Self {
        Self::for_mode(min, max, settle, Mode::Internet)
    }

    /// A controller whose first probe suits the mode's starting point: down in a datacenter
    /// (64 streams is the generous end, and the CPU the likely limit), up across the internet.
    pub fn for_mode(min: u32, max: u32, settle: u32, mode: Mode) -> Self {
        let min = min.max(1);
        Self {
            min,
            max: max.max(min),
            best: None,
            phase: if mode == Mode::Datacenter {
                Phase::Down
            } else {
                Phase::Up
            },
            settle_after: settle,
            settle,
            cooldown: 0,
            low: 0,
            idle_probes: 0,
            reprobe: false,
            settled: None,
            high: 0,
            probe_down: true,
            confirming: false,
        }
    }

    /// The same controller without down probes: a failed up-probe returns to the best count.
    #[must_use]
    pub fn holding_after_up(mut self) -> Self {
        self.probe_down = false;
        self
    }

    /// The best count found so far and its goodput.
    pub fn best(&self) -> Option<(u32, f64)> {
        self.best
    }

    fn up(&self, n: u32) -> u32 {
        (n + (n / 2).max(1)).min(self.max)
    }

    fn down(&self, n: u32) -> u32 {
        (n / 2).max(self.min)
    }

    /// Takes one goodput sample (bytes/s over the last interval) measured with `streams`
    /// streams alive; returns the count to run with next.
    pub fn on_sample(&mut self, goodput: f64, streams: u32) -> u32 {
        let n = streams.clamp(self.min, self.max);
        // Nothing delivered: the receiver or the source stalled (a full window, a disk),
        // which says nothing of the path; learnt from, it would make 0 the best to beat.
        if goodput.is_nan() || goodput <= 0.0 {
            return n;
        }
        if self.settle > 0 {
            self.settle -= 1;
            return n;
        }
        let confirming = self.confirming;
        let target = match (self.phase, self.best) {
            (first, None) => {
                self.best = Some((n, goodput));
                if first == Phase::Down {
                    self.try_down()
                } else {
                    self.step_from(n, Phase::Up)
                }
            }
            (Phase::Up, Some((_, bg))) => {
                if goodput > bg * GAIN_UP {
                    self.best = Some((n, goodput));
                    self.idle_probes = 0;
                    self.reprobe = false;
                    self.settled = None;
                    self.step_from(n, Phase::Up)
                } else if !self.probe_down && goodput >= bg * HOLD_DOWN {
                    // More streams did not pay, but they cost nothing either, and going back
                    // costs more than staying: the streams left take seconds to win back the
                    // share of those retired. After a re-probe from a held count, no more
                    // (see `settled`).
                    self.confirming = false;
                    if self.reprobe {
                        self.idle_probes += 1;
                        self.settled = Some(goodput.max(bg));
                    }
                    self.reprobe = false;
                    self.best = Some((n, goodput.max(bg)));
                    self.hold()
                } else if !self.probe_down && goodput >= bg * KEEP && !self.confirming {
                    // A loss that may be a passing dip (every BBR stream in PROBE_RTT at once
                    // costs up to a fifth of a sample): one more sample at this count decides.
                    self.confirming = true;
                    return n;
                } else if self.reprobe {
                    self.reprobe = false;
                    self.idle_probes += 1;
                    self.hold()
                } else {
                    self.try_down()
                }
            }
            (Phase::Down, Some((_, bg))) => {
                if goodput >= bg * KEEP_DOWN {
                    // Measured against the best seen, not the last step: losses within the
                    // bar do not add up over steps.
                    self.best = Some((n, goodput.max(bg)));
                    self.reprobe = false;
                    self.step_from(n, Phase::Down)
                } else {
                    // A re-probe (down, from a count at max_streams) that lost backs off as
                    // one up would: without, it went down and back every cool-down.
                    if self.reprobe {
                        self.reprobe = false;
                        self.idle_probes += 1;
                    }
                    self.hold()
                }
            }
            (Phase::Hold, Some((bn, bg))) => {
                if n == bn {
                    // Track slow drift of what the best count gives.
                    self.best = Some((bn, bg * 0.8 + goodput * 0.2));
                }
                self.low = if goodput < bg * DROP { self.low + 1 } else { 0 };
                self.high = match self.settled {
                    Some(mark) if goodput > mark * GAIN_UP => self.high + 1,
                    _ => 0,
                };
                self.cooldown = self.cooldown.saturating_sub(1);
                if self.high >= DROP_SAMPLES {
                    // More than the held count gave before (a competing flow ended): up
                    // probes may pay again.
                    self.high = 0;
                    self.settled = None;
                    self.idle_probes = 0;
                    self.best = Some((n, goodput));
                    self.step_from(n, Phase::Up)
                } else if self.low >= DROP_SAMPLES {
                    // The path changed: learn again from here.
                    self.low = 0;
                    self.idle_probes = 0;
                    self.best = Some((n, goodput));
                    if self.probe_down {
                        self.settled = None;
                        self.step_from(n, Phase::Up)
                    } else {
                        // Across the internet more streams seldom win back a drop, and the
                        // recovery from a passing one would read as their gain (a stall of a
                        // few seconds added a step for good): held, re-probed as usual.
                        self.hold()
                    }
                } else if self.cooldown == 0 && self.settled.is_none() {
                    self.reprobe = true;
                    self.step_from(bn, Phase::Up)
                } else {
                    bn
                }
            }
        };
        if confirming {
            // The confirming sample was taken (any branch but a new confirmation ends it).
            self.confirming = false;
        }
        if target != n {
            self.settle = self.settle_after;
        }
        target
    }

    /// Moves one step from `n` in `dir`; at a bound, turns to the next phase.
    fn step_from(&mut self, n: u32, dir: Phase) -> u32 {
        let next = if dir == Phase::Up {
            self.up(n)
        } else {
            self.down(n)
        };
        if next != n {
            self.phase = dir;
            return next;
        }
        if dir == Phase::Up {
            self.try_down()
        } else {
            self.hold()
        }
    }

    fn try_down(&mut self) -> u32 {
        if !self.probe_down {
            return self.hold();
        }
        let (bn, _) = self.best.unwrap_or((self.min, 0.0));
        let next = self.down(bn);
        if next < bn {
            self.phase = Phase::Down;
            next
        } else {
            self.hold()
        }
    }

    fn hold(&mut self) -> u32 {
        self.phase = Phase::Hold;
        self.cooldown = COOLDOWN << self.idle_probes.min(4);
        self.low = 0;
        self.high = 0;
        self.best.map_or(self.min, |(bn, _)| bn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the controller against a goodput curve for `samples` samples; returns the counts.
    fn run(
        c: &mut Controller,
        start: u32,
        samples: usize,
        curve: impl Fn(u32, usize) -> f64,
    ) -> Vec<u32> {
        let mut n = start;
        let mut out = Vec::new();
        for t in 0..samples {
            n = c.on_sample(curve(n, t), n);
            out.push(n);
        }
        out
    }

    #[test]
    fn climbs_to_the_knee_of_a_saturating_link_and_stays() {
        // Each stream gets 10 MB/s until the link's 160 MB/s is full.
        let mut c = Controller::new(4, 512);
        let counts = run(&mut c, 8, 200, |n, _| f64::from(n.min(16)) * 10e6);
        let end = *counts.last().unwrap();
        // Within one step of the knee: at least 90 % of the link, without much excess.
        assert!((15..=21).contains(&end), "{counts:?}");
        // No flapping once settled: few changes over the last 100 samples.
        let changes = counts[100..].windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 10, "{changes} changes: {counts:?}");
    }

    #[test]
    fn comes_down_when_too_many_streams_cost_goodput() {
        // CPU-bound: more streams than 12 lose goodput.
        let mut c = Controller::new(4, 512);
        let curve = |n: u32, _| {
            if n <= 12 {
                f64::from(n) * 10e6
            } else {
                (120e6 - f64::from(n - 12) * 2e6).max(1e6)
            }
        };
        let counts = run(&mut c, 64, 300, curve);
        let end = *counts.last().unwrap();
        assert!((9..=16).contains(&end), "{counts:?}");
    }

    #[test]
    fn stays_in_bounds_and_relearns_when_the_path_changes() {
        let mut c = Controller::new(4, 32);
        // The link shrinks to a quarter at sample 150: per-stream share drops too.
        let curve = |n: u32, t: usize| {
            let cap = if t < 150 { 400e6 } else { 100e6 };
            (f64::from(n) * 10e6).min(cap)
        };
        let counts = run(&mut c, 8, 400, curve);
        assert!(counts.iter().all(|&n| (4..=32).contains(&n)), "{counts:?}");
        assert!(
            counts[..150].contains(&32),
            "climbed to the bound: {counts:?}"
        );
        let end = *counts.last().unwrap();
        assert!(end <= 16, "came back down after the change: {counts:?}");
    }

    #[test]
    fn noise_alone_does_not_move_it() {
        // Flat goodput (one stream fills the link) with +-3 % noise.
        let mut c = Controller::new(4, 512);
        let counts = run(&mut c, 8, 300, |_, t| {
            100e6 * (1.0 + 0.03 * ((t * 7919 % 13) as f64 / 6.0 - 1.0))
        });
        assert!(counts[100..].iter().all(|&n| n <= 8), "{counts:?}");
    }

    #[test]
    fn at_max_streams_a_losing_down_probe_backs_off() {
        // Goodput grows with every stream up to the operator's 32: the probes from there
        // are down, and each loses; they come ever more rarely.
        let mut c = Controller::for_mode(4, 32, 1, Mode::Datacenter);
        let counts = run(&mut c, 32, 600, |n, _| f64::from(n) * 5e6);
        let changes = counts[100..].windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 6, "{changes} changes: {counts:?}");
        assert_eq!(*counts.last().unwrap(), 32, "{counts:?}");
    }

    #[test]
    fn across_the_internet_a_flat_path_does_not_creep_up() {
        // One stream fills the link: the first re-probe up holds goodput, its streams
        // stay, and no more are added.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 3000, |_, _| 180e6);
        assert!(counts.iter().all(|&n| n <= 18), "{counts:?}");
        // Nor with dips now and then (a sample at a tenth, a receiver stalled for a moment):
        // the recovery after one is no better path.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(
            &mut c,
            8,
            3000,
            |_, t| if t % 97 == 50 { 18e6 } else { 180e6 },
        );
        assert!(counts.iter().all(|&n| n <= 18), "{counts:?}");
        // Nor with stalls of three samples (a drop the controller takes for a changed path).
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 3000, |_, t| {
            if (50..53).contains(&(t % 197)) {
                18e6
            } else {
                180e6
            }
        });
        assert!(counts.iter().all(|&n| n <= 18), "{counts:?}");
    }

    #[test]
    fn across_the_internet_a_path_that_gets_better_is_probed_again() {
        // Flat at 100 MB/s until sample 1000; then the link doubles, and it takes 24 streams
        // to fill (fewer get their share of it).
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 1600, |n, t| {
            if t < 1000 {
                100e6 + f64::from(n)
            } else {
                200e6 * (f64::from(n) / 24.0).min(1.0)
            }
        });
        assert!(counts[..1000].iter().all(|&n| n <= 18), "{counts:?}");
        assert!(*counts.last().unwrap() >= 24, "{:?}", &counts[1000..]);
    }

    #[test]
    fn samples_with_nothing_delivered_teach_nothing() {
        // 15 samples of a stalled receiver in the middle of a flat path.
        let mut c = Controller::for_mode(4, 512, 1, Mode::Datacenter);
        let curve = |n: u32, t: usize| {
            if (100..115).contains(&t) {
                0.0
            } else if n >= 8 {
                100e6
            } else {
                f64::from(n) * 12.5e6
            }
        };
        let counts = run(&mut c, 64, 200, curve);
        let before = counts[99];
        assert!(
            counts[100..115].iter().all(|&n| n == before),
            "{:?}",
            &counts[95..120]
        );
        assert!((8..=16).contains(counts.last().unwrap()), "{counts:?}");
    }

    #[test]
    fn in_a_datacenter_it_probes_down_first() {
        // CPU-bound: 8 streams do as well as 64.
        let mut c = Controller::for_mode(4, 512, 1, Mode::Datacenter);
        let counts = run(&mut c, 64, 60, |n, _| {
            if n >= 8 { 100e6 } else { f64::from(n) * 12.5e6 }
        });
        assert_eq!(counts[1], 32, "first move is down: {counts:?}");
        let end = *counts.last().unwrap();
        assert!((8..=16).contains(&end), "{counts:?}");
    }

    #[test]
    fn in_a_datacenter_noisy_samples_do_not_stop_the_descent_but_a_real_loss_does() {
        // CPU-bound: the count makes no difference, samples spread by +-4 % (twice the 3 %
        // bar that used to stop the descent).
        let noisy = |t: usize| 1.0 + 0.04 * ((t * 7919 % 13) as f64 / 6.0 - 1.0);
        let mut c = Controller::for_mode(4, 512, 2, Mode::Datacenter);
        let counts = run(&mut c, 64, 60, |_, t| 150e6 * noisy(t));
        assert_eq!(*counts.last().unwrap(), 4, "{counts:?}");
        // Each halving under 16 streams costs 6 %: the first is kept, and the losses are
        // counted from the best, so the second (12 % in all) is not.
        let mut c = Controller::for_mode(4, 512, 2, Mode::Datacenter);
        let counts = run(&mut c, 64, 60, |n, _| {
            150e6 * 0.94_f64.powf((16.0 / f64::from(n.min(16))).log2())
        });
        assert_eq!(*counts.last().unwrap(), 8, "{counts:?}");
        // Halving that costs a fifth is never kept.
        let mut c = Controller::for_mode(4, 512, 2, Mode::Datacenter);
        let counts = run(&mut c, 64, 60, |n, _| f64::from(n.min(64)) * 5e6);
        assert!(counts[10..].iter().all(|&n| n >= 64), "{counts:?}");
        assert_eq!(*counts.last().unwrap(), 64, "{counts:?}");
    }

    #[test]
    fn without_down_probes_it_keeps_what_it_added_and_never_goes_below_the_start() {
        // BBR across the internet: one stream nearly fills the link, more add nothing.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 300, |n, _| 180e6 + f64::from(n));
        assert!(counts.iter().all(|&n| n >= 8), "{counts:?}");
        // The probe to 12 is kept (no retirement), and re-probes back off: 300 samples go
        // 8 -> 12 -> 18 -> 27 -> 40 at most (cool-downs of 20, 40, 80, 160).
        let first_12 = counts.iter().position(|&n| n == 12).expect("probed up");
        assert!(
            counts[first_12..].iter().all(|&n| n >= 12),
            "went back down: {counts:?}"
        );
        let changes = counts.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 4, "{changes} changes: {counts:?}");
        assert!(*counts.last().unwrap() <= 40, "{counts:?}");
        // An up-step that clearly cost goodput (a receiver that slows with more streams)
        // goes back to the best count.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 300, |n, _| if n > 8 { 120e6 } else { 180e6 });
        assert!(counts.contains(&12), "probed up: {counts:?}");
        assert_eq!(*counts.last().unwrap(), 8, "{counts:?}");
        // A probe whose first sample held a dip of a sixth (every stream in PROBE_RTT) keeps
        // its streams once the next sample shows goodput held.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(
            &mut c,
            8,
            20,
            |n, t| {
                if n > 8 && t == 5 { 150e6 } else { 180e6 }
            },
        );
        assert_eq!(counts[4], 12, "{counts:?}");
        assert_eq!(*counts.last().unwrap(), 12, "{counts:?}");
        // A receiver that loses 15 % with each step up: the loss is confirmed, the count goes
        // back, and it never creeps up over re-probes.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 400, |n, _| {
            180e6 * 0.85_f64.powf((f64::from(n) / 8.0).ln() / 1.5_f64.ln())
        });
        assert_eq!(*counts.last().unwrap(), 8, "{counts:?}");
        assert!(counts.iter().all(|&n| n <= 12), "{counts:?}");
        // Where more streams pay (CUBIC), it still climbs.
        let mut c = Controller::new(4, 512).holding_after_up();
        let counts = run(&mut c, 8, 200, |n, _| f64::from(n.min(40)) * 2e6);
        assert!(*counts.last().unwrap() >= 27, "{counts:?}");
        // And with down probes on, the flat curve is probed downwards.
        let mut c = Controller::new(4, 512);
        let counts = run(&mut c, 8, 300, |n, _| 180e6 + f64::from(n));
        assert!(counts.iter().any(|&n| n < 8), "{counts:?}");
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::for_rtt(Duration::from_micros(300)), Mode::Datacenter);
        assert_eq!(Mode::for_rtt(Duration::from_millis(100)), Mode::Internet);
        assert_eq!(Mode::Datacenter.initial_streams(), 64);
        assert_eq!(Mode::Internet.initial_streams(), 8);
    }
}
