//! What the kernel counts on a session's TCP streams (`TCP_INFO`): retransmissions, segments
//! and bytes sent, summed over the session's streams, those already closed included.

use std::time::{Duration, Instant};

use dwcp_sys::{TcpInfo, TcpProbe};

/// TCP's own counts over a session's streams, from the kernel (`TCP_INFO`). The
/// retransmissions are TCP's, under the session: chunks the session itself sends again are
/// counted in `SendReport::resent_bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// Segments TCP retransmitted.
    pub retransmits: u64,
    /// Bytes TCP retransmitted (0 on kernels before 4.19, which do not count them).
    pub retransmitted_bytes: u64,
    /// Data segments sent, retransmissions included (0 before Linux 4.6).
    pub segments_sent: u64,
    /// Bytes sent, retransmissions included (0 before Linux 4.19).
    pub bytes_sent: u64,
    /// Stream-time with data outstanding, summed over the streams (the kernel's
    /// `tcpi_busy_time`, limited times included; zero before Linux 4.10). A stream's life
    /// less this is time it waited for the session to give it data.
    pub busy: Duration,
    /// Of it, stream-time the receiver's window held the streams back.
    pub rwnd_limited: Duration,
    /// Of it, stream-time the send buffers held the streams back.
    pub sndbuf_limited: Duration,
    /// Stream-time the streams were open (watched), summed: `busy` is part of it.
    pub open: Duration,
}

impl TcpCounts {
    /// The share of data segments that were retransmissions; `None` before any was sent.
    pub fn retransmit_ratio(&self) -> Option<f64> {
        (self.segments_sent > 0).then(|| self.retransmits as f64 / self.segments_sent as f64)
    }

    /// Both counts together (several transfers' or sessions').
    pub fn plus(self, o: Self) -> Self {
        self.zip(o, u64::saturating_add, Duration::saturating_add)
    }

    fn minus(self, o: Self) -> Self {
        self.zip(o, u64::saturating_sub, Duration::saturating_sub)
    }

    /// Each field of both, combined by `n` (counts) or `d` (times).
    fn zip(self, o: Self, n: fn(u64, u64) -> u64, d: fn(Duration, Duration) -> Duration) -> Self {
        Self {
            retransmits: n(self.retransmits, o.retransmits),
            retransmitted_bytes: n(self.retransmitted_bytes, o.retransmitted_bytes),
            segments_sent: n(self.segments_sent, o.segments_sent),
            bytes_sent: n(self.bytes_sent, o.bytes_sent),
            busy: d(self.busy, o.busy),
            rwnd_limited: d(self.rwnd_limited, o.rwnd_limited),
            sndbuf_limited: d(self.sndbuf_limited, o.sndbuf_limited),
            open: d(self.open, o.open),
        }
    }
}

/// `retransmitted 85 of 11310 segments (0.75 %)`, for reports.
impl std::fmt::Display for TcpCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "retransmitted {} of {} segments ({:.2} %)",
            self.retransmits,
            self.segments_sent,
            self.retransmit_ratio().unwrap_or(0.0) * 100.0
        )
    }
}

/// One stream being watched: its slot and generation, its probe, and what was last read.
#[derive(Debug)]
struct Watched {
    slot: u32,
    generation: u64,
    probe: TcpProbe,
    last: TcpCounts,
    /// The kernel's 32-bit counters as last read (retransmits, data segments): they wrap
    /// (after some 6 TB of segments), so `last` adds their differences.
    raw: (u32, u32),
    /// When it began to be watched (for `TcpCounts::open`).
    since: Instant,
}

impl Watched {
    fn new(slot: u32, generation: u64, probe: TcpProbe) -> Option<Self> {
        let i = probe.info().ok()?;
        let raw = (i.total_retrans, i.data_segs_out.unwrap_or(0));
        Some(Self {
            slot,
            generation,
            probe,
            last: Self::counts(&i, u64::from(raw.0), u64::from(raw.1), Duration::ZERO),
            raw,
            since: Instant::now(),
        })
    }

    /// The counts of one reading: the kernel's own, with the two 32-bit counters as summed
    /// here and the time open.
    fn counts(i: &TcpInfo, retransmits: u64, segments_sent: u64, open: Duration) -> TcpCounts {
        TcpCounts {
            retransmits,
            retransmitted_bytes: i.bytes_retrans.unwrap_or(0),
            segments_sent,
            bytes_sent: i.bytes_sent.unwrap_or(0),
            busy: i.busy_time.unwrap_or_default(),
            rwnd_limited: i.rwnd_limited.unwrap_or_default(),
            sndbuf_limited: i.sndbuf_limited.unwrap_or_default(),
            open,
        }
    }

    /// Reads the kernel's counts again; keeps the last ones if the socket cannot be read.
    fn update(&mut self) {
        let open = self.since.elapsed();
        let Ok(i) = self.probe.info() else {
            self.last.open = open;
            return;
        };
        let raw = (i.total_retrans, i.data_segs_out.unwrap_or(0));
        self.last = Self::counts(
            &i,
            self.last.retransmits + u64::from(raw.0.wrapping_sub(self.raw.0)),
            self.last.segments_sent + u64::from(raw.1.wrapping_sub(self.raw.1)),
            open,
        );
        self.raw = raw;
    }
}

/// The session's streams' probes. A stream leaves when its slot is emptied: its last counts
/// are kept, and its descriptor is closed with it.
#[derive(Debug, Default)]
pub(super) struct TcpWatch {
    open: Vec<Watched>,
    closed: TcpCounts,
    /// Whether any stream could be watched: a QUIC session (or another system) has none.
    any: bool,
    /// Counts reported from here on are over this (a kept session's earlier transfers)...
    base: TcpCounts,
    /// ...plus these (the sessions of this transfer lost before this one).
    carried: TcpCounts,
    /// The session's counts as far as its heartbeats told the receiver.
    told: TcpCounts,
}

impl TcpWatch {
    pub(super) fn watch(&mut self, slot: u32, generation: u64, probe: TcpProbe) {
        // Not a socket TCP_INFO can be read from: nothing to count.
        if let Some(w) = Watched::new(slot, generation, probe) {
            self.any = true;
            self.open.push(w);
        }
    }

    /// The stream in `slot` (of `generation`) is gone: its final counts stay in the totals.
    pub(super) fn close(&mut self, slot: u32, generation: u64) {
        if let Some(at) = self
            .open
            .iter()
            .position(|w| w.slot == slot && w.generation == generation)
        {
            let mut w = self.open.swap_remove(at);
            w.update();
            self.closed = self.closed.plus(w.last);
        }
    }

    fn totals(&mut self) -> TcpCounts {
        let mut t = self.closed;
        for w in &mut self.open {
            w.update();
            t = t.plus(w.last);
        }
        t
    }

    /// Every stream is gone (a tunnel closing): their counts stay, their descriptors close,
    /// so that the sockets close with their connections.
    pub(super) fn close_all(&mut self) {
        for mut w in self.open.drain(..) {
            w.update();
            self.closed = self.closed.plus(w.last);
        }
    }

    /// Counts from now on, added to `carried` (a transfer's earlier sessions).
    pub(super) fn rebase(&mut self, carried: Option<TcpCounts>) {
        self.carried = carried.unwrap_or_default();
        self.base = self.totals();
    }

    /// What the session's streams counted since the last call (for a heartbeat): each count
    /// goes to the receiver once, and one lost with its heartbeat is not sent again.
    pub(super) fn unreported(&mut self) -> TcpCounts {
        let now = self.totals();
        let new = now.minus(self.told);
        self.told = now;
        new
    }

    /// What this transfer's streams counted so far; `None` without TCP streams.
    pub(super) fn reported(&mut self) -> Option<TcpCounts> {
        if !self.any {
            // A transfer whose lost sessions were TCP and whose new one is QUIC.
            return (self.carried != TcpCounts::default()).then_some(self.carried);
        }
        let t = self.totals();
        Some(self.carried.plus(t.minus(self.base)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// New bytes sent: a loaded host's tail-loss probe sends some twice.
    fn data(c: TcpCounts) -> u64 {
        c.bytes_sent.saturating_sub(c.retransmitted_bytes)
    }

    fn send(c: &mut TcpStream, s: &mut TcpStream, n: usize) {
        c.write_all(&vec![1; n]).unwrap();
        let mut got = vec![0; n];
        s.read_exact(&mut got).unwrap();
    }

    /// Counts survive a stream's close, a kept session's next transfer starts from zero, and
    /// a reconnected transfer goes on from what its lost session counted.
    #[test]
    fn counts_add_up_over_streams_closes_and_sessions() {
        let mut w = TcpWatch::default();
        assert_eq!(w.reported(), None, "no stream watched yet");
        let (mut a, mut a_peer) = pair();
        let (mut b, mut b_peer) = pair();
        w.watch(0, 0, TcpProbe::new(&a).unwrap());
        w.watch(1, 1, TcpProbe::new(&b).unwrap());
        w.rebase(None);
        send(&mut a, &mut a_peer, 100_000);
        send(&mut b, &mut b_peer, 50_000);
        let r = w.reported().unwrap();
        assert_eq!(data(r), 150_000, "{r:?}");
        assert!(r.segments_sent >= 3, "{r:?}");
        // Idle streams add open time, not busy time (the kernel's, counted in jiffies).
        std::thread::sleep(Duration::from_millis(300));
        let idle = w.reported().unwrap();
        assert!(
            idle.open >= Duration::from_millis(600),
            "two streams: {idle:?}"
        );
        assert!(idle.busy < idle.open / 2, "{idle:?}");
        // Nothing is lost on loopback; a tail-loss probe on a loaded host at most.
        assert!(r.retransmits <= r.segments_sent / 2, "{r:?}");
        // Stream 1 closes (a wrong generation changes nothing); its bytes stay counted.
        w.close(1, 7);
        assert_eq!(w.open.len(), 2);
        w.close(1, 1);
        drop((b, b_peer));
        send(&mut a, &mut a_peer, 10_000);
        assert_eq!(data(w.reported().unwrap()), 160_000);
        // A kept session's next transfer counts from zero.
        w.rebase(None);
        send(&mut a, &mut a_peer, 1_000);
        let next = w.reported().unwrap();
        assert_eq!(data(next), 1_000);
        // A new session of the same transfer carries the lost one's counts.
        let mut w2 = TcpWatch::default();
        let (mut c, mut c_peer) = pair();
        w2.watch(0, 0, TcpProbe::new(&c).unwrap());
        w2.rebase(Some(next));
        send(&mut c, &mut c_peer, 2_000);
        assert_eq!(data(w2.reported().unwrap()), 3_000);
        assert_eq!(
            TcpCounts {
                retransmits: 1,
                segments_sent: 4,
                ..TcpCounts::default()
            }
            .retransmit_ratio(),
            Some(0.25)
        );
        assert_eq!(TcpCounts::default().retransmit_ratio(), None);
        let shown = TcpCounts {
            retransmits: 85,
            segments_sent: 11_310,
            ..TcpCounts::default()
        };
        assert_eq!(
            shown.to_string(),
            "retransmitted 85 of 11310 segments (0.75 %)"
        );
        // A session without TCP streams (QUIC) keeps what the lost TCP ones counted.
        let mut quic = TcpWatch::default();
        quic.rebase(Some(next));
        assert_eq!(quic.reported(), Some(next));
        quic.rebase(None);
        assert_eq!(quic.reported(), None);
    }

    /// Heartbeats carry each count once: what grew since the last one, closed streams too.
    #[test]
    fn heartbeats_take_what_grew_since_the_last() {
        let mut w = TcpWatch::default();
        let (mut a, mut a_peer) = pair();
        let (mut b, mut b_peer) = pair();
        w.watch(0, 0, TcpProbe::new(&a).unwrap());
        w.watch(1, 0, TcpProbe::new(&b).unwrap());
        send(&mut a, &mut a_peer, 5_000);
        assert_eq!(data(w.unreported()), 5_000);
        assert_eq!(data(w.unreported()), 0);
        send(&mut b, &mut b_peer, 700);
        w.close(1, 0);
        send(&mut a, &mut a_peer, 300);
        assert_eq!(data(w.unreported()), 1_000);
    }

    /// The kernel's 32-bit segment counters wrap; the sums go on.
    #[test]
    fn wrapped_kernel_counters_keep_counting_up() {
        let (c, _s) = pair();
        let mut w = Watched::new(0, 0, TcpProbe::new(&c).unwrap()).unwrap();
        let real = w.raw;
        // As if the kernel had been near the top before this read.
        w.raw = (u32::MAX - 1, u32::MAX - 9);
        w.last.retransmits = 100;
        w.last.segments_sent = 1_000;
        w.update();
        assert_eq!(w.last.retransmits, 100 + 2 + u64::from(real.0));
        assert_eq!(w.last.segments_sent, 1_000 + 10 + u64::from(real.1));
    }

    #[test]
    fn a_socket_that_is_not_tcp_is_not_watched() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut w = TcpWatch::default();
        w.watch(0, 0, TcpProbe::new(&u).unwrap());
        assert_eq!(w.reported(), None);
    }
}
