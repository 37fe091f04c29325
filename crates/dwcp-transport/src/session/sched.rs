//! Sender side of an object: which chunk each stream sends next, what is in flight, what must
//! be sent again after a stream died or while it seems stuck. Pure: no I/O, no clock (the
//! driver passes the time in).
//!
//! Memory is bounded by the window: new bytes are only read from the source while
//! `read - acked < window`, and in-flight chunks are dropped as soon as the receiver's
//! contiguous acknowledgement passes them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// What a stream should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this chunk again (its first stream died).
    Resend {
        /// Chunk offset.
        offset: u64,
        /// Chunk bytes.
        data: Bytes,
    },
    /// Read `len` new bytes from the source at `offset`, then call [`Scheduler::sent`].
    Read {
        /// Offset of the bytes to read.
        offset: u64,
        /// How many.
        len: usize,
    },
    /// Nothing to do until an acknowledgement arrives (window full, or all sent).
    Wait,
    /// Every byte is acknowledged.
    Done,
}

/// A bad acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("receiver acknowledged offset {offset}, but only {read} bytes were sent")]
pub struct AckError {
    /// Offset acknowledged.
    pub offset: u64,
    /// Bytes sent so far.
    pub read: u64,
}

#[derive(Debug)]
struct Flight {
    data: Bytes,
    stream: u32,
    /// Given back before it went out: its next sending is not a re-send.
    unsent: bool,
    /// When it was last handed to a stream ([`Scheduler::stamp`]).
    sent_at: Option<Instant>,
    /// A second copy went out on this stream while the first seemed stuck, at this time.
    hedge: Option<(u32, Instant)>,
    /// A third copy went out (see [`Scheduler::third_copy`]).
    third: bool,
    /// The receiver listed it among what it holds beyond a hole ([`Scheduler::arrived`]).
    arrived: bool,
}

/// The send schedule of one object.
#[derive(Debug)]
pub struct Scheduler {
    size: u64,
    chunk: usize,
    window: u64,
    read: u64,
    acked: u64,
    in_flight: BTreeMap<u64, Flight>,
    resend: BTreeSet<u64>,
    resent_bytes: u64,
}

impl Scheduler {
    /// An object of `size` bytes of which the receiver already holds `start`, cut into chunks
    /// of `chunk` bytes, with at most `window` bytes unacknowledged.
    pub fn new(start: u64, size: u64, chunk: usize, window: u64) -> Self {
        let start = start.min(size);
        Self {
            size,
            chunk: chunk.max(1),
            window: window.max(chunk as u64),
            read: start,
            acked: start,
            in_flight: BTreeMap::new(),
            resend: BTreeSet::new(),
            resent_bytes: 0,
        }
    }

    /// The next action for `stream`.
    pub fn next(&mut self, stream: u32) -> Next {
        if let Some(offset) = self.resend.pop_first()
            && let Some(f) = self.in_flight.get_mut(&offset)
        {
            f.stream = stream;
            f.hedge = None;
            f.sent_at = None;
            if !std::mem::take(&mut f.unsent) {
                self.resent_bytes += f.data.len() as u64;
            }
            return Next::Resend {
                offset,
                data: f.data.clone(),
            };
        }
        if self.acked == self.size {
            return Next::Done;
        }
        let len = (self.size - self.read).min(self.chunk as u64);
        if len > 0 && self.read - self.acked + len <= self.window {
            let offset = self.read;
            self.read += len;
            return Next::Read {
                offset,
                len: len as usize,
            };
        }
        Next::Wait
    }

    /// Records that `data`, read for a [`Next::Read`] at `offset`, went out on `stream`.
    pub fn sent(&mut self, offset: u64, data: Bytes, stream: u32) {
        if offset + data.len() as u64 > self.acked {
            self.in_flight.insert(
                offset,
                Flight {
                    data,
                    stream,
                    unsent: false,
                    sent_at: None,
                    hedge: None,
                    third: false,
                    arrived: false,
                },
            );
        }
    }

    /// The receiver holds every byte below `offset`.
    pub fn ack(&mut self, offset: u64) -> Result<(), AckError> {
        if offset > self.read {
            return Err(AckError {
                offset,
                read: self.read,
            });
        }
        if offset <= self.acked {
            return Ok(());
        }
        self.acked = offset;
        while let Some((&o, f)) = self.in_flight.first_key_value() {
            if o + f.data.len() as u64 > offset {
                break;
            }
            self.in_flight.remove(&o);
            self.resend.remove(&o);
        }
        Ok(())
    }

    /// The chunk at `offset`, taken by a stream, was not sent after all: another stream sends
    /// it.
    pub fn give_back(&mut self, offset: u64) {
        if let Some(f) = self.in_flight.get_mut(&offset) {
            f.unsent = true;
            self.resend.insert(offset);
        }
    }

    /// `stream` died: everything it had in flight will be sent again on the others (unless
    /// a second copy is on its way on another stream).
    pub fn stream_lost(&mut self, stream: u32) {
        for (o, f) in &mut self.in_flight {
            if f.hedge.is_some_and(|(h, _)| h == stream) {
                // The first copy is still on its way.
                f.hedge = None;
            } else if f.stream == stream {
                match f.hedge.take() {
                    // The second copy is now the only one.
                    Some((h, at)) => {
                        f.stream = h;
                        f.sent_at = Some(at);
                    }
                    // Held by the receiver beyond a hole: nothing to send.
                    None if f.arrived => {}
                    None => {
                        self.resend.insert(*o);
                    }
                }
            }
        }
    }

    /// The chunk at `offset` went out on its stream at `now`.
    pub fn stamp(&mut self, offset: u64, now: Instant) {
        if let Some(f) = self.in_flight.get_mut(&offset) {
            f.sent_at = Some(now);
        }
    }

    /// A chunk for idle `stream` to send a second time: the receiver's prefix waits on the
    /// oldest chunk in flight, and when that chunk's stream has had it for `after` or longer,
    /// that stream seems stuck (a retransmission timeout, a slow path): its chunks go again
    /// here, oldest first, each once. The caller decides when the receiver's report (data
    /// held beyond a hole) makes this worth it. A copy counts as re-sent.
    pub fn hedge(&mut self, stream: u32, now: Instant, after: Duration) -> Option<(u64, Bytes)> {
        let old = |f: &Flight| {
            f.sent_at
                .is_some_and(|t| now.saturating_duration_since(t) >= after)
        };
        let first = self.in_flight.first_key_value()?.1;
        // The prefix waits on this chunk: only when it has been out long is its stream stuck.
        let stuck = first.stream;
        if stuck == stream || !(old(first) || first.hedge.is_some()) {
            return None;
        }
        let resend = &self.resend;
        let (&offset, f) = self.in_flight.iter_mut().find(|(o, f)| {
            f.stream == stuck && f.hedge.is_none() && !f.arrived && !resend.contains(o) && old(f)
        })?;
        f.hedge = Some((stream, now));
        self.resent_bytes += f.data.len() as u64;
        Some((offset, f.data.clone()))
    }

    /// A second copy, for idle `stream`, of the oldest chunk in flight that has gone out once
    /// and on another stream, each chunk once: an object something waits on is sent twice
    /// over different streams, so that a packet lost on one does not hold it for a
    /// retransmission (see `hedge` for how the copies are tracked). A copy counts as re-sent.
    pub fn duplicate(&mut self, stream: u32, now: Instant) -> Option<(u64, Bytes)> {
        let resend = &self.resend;
        let (&offset, f) = self.in_flight.iter_mut().find(|(o, f)| {
            f.stream != stream
                && f.hedge.is_none()
                && f.sent_at.is_some()
                && !f.arrived
                && !resend.contains(o)
        })?;
        f.hedge = Some((stream, now));
        self.resent_bytes += f.data.len() as u64;
        Some((offset, f.data.clone()))
    }

    /// A second copy, for idle `stream`, of a chunk sent once that the receiver holds data
    /// beyond, when it has been out for `after` or longer on another stream: it likely sits
    /// behind a lost packet. Such a chunk is the one the prefix waits on when `beyond_prefix`,
    /// and any below a chunk the receiver listed as held ([`Self::arrived`]); the lowest
    /// first, each once (then [`Self::third_copy`] may send it a third time). For an urgent
    /// object too large to send twice whole. Counts as re-sent.
    pub fn hole_copy(
        &mut self,
        stream: u32,
        now: Instant,
        after: Duration,
        beyond_prefix: bool,
    ) -> Option<(u64, Bytes)> {
        self.copy_behind_hole(
            beyond_prefix,
            |f| {
                f.hedge.is_none()
                    && f.stream != stream
                    && f.sent_at
                        .is_some_and(|t| now.saturating_duration_since(t) >= after)
            },
            |f| f.hedge = Some((stream, now)),
        )
    }

    /// A third copy, for idle `stream`, of a chunk the receiver holds data beyond, when both
    /// its copies (see [`Self::duplicate`]) have been out for `after` or longer and on other
    /// streams: both likely sit behind a lost packet. Such a chunk is the one its prefix
    /// waits on when `beyond_prefix` (the caller saw data held beyond the prefix), and any
    /// below a chunk the receiver listed as held ([`Self::arrived`]). The lowest such chunk
    /// first, each once. Counts as re-sent.
    pub fn third_copy(
        &mut self,
        stream: u32,
        now: Instant,
        after: Duration,
        beyond_prefix: bool,
    ) -> Option<(u64, Bytes)> {
        self.copy_behind_hole(
            beyond_prefix,
            |f| {
                !f.third
                    && f.stream != stream
                    && f.hedge.is_some_and(|(h, at)| {
                        h != stream && now.saturating_duration_since(at) >= after
                    })
            },
            |f| f.third = true,
        )
    }

    /// The lowest chunk the receiver holds data beyond (the one the prefix waits on when
    /// `beyond_prefix`, any below a chunk listed as held) that is not held itself, not due
    /// to be re-sent anyway, and `due`: marked by `mark` and counted as re-sent.
    fn copy_behind_hole(
        &mut self,
        beyond_prefix: bool,
        due: impl Fn(&Flight) -> bool,
        mark: impl FnOnce(&mut Flight),
    ) -> Option<(u64, Bytes)> {
        let first = *self.in_flight.keys().next()?;
        let last_arrived = self
            .in_flight
            .iter()
            .rev()
            .find(|(_, f)| f.arrived)
            .map(|(&o, _)| o);
        let resend = &self.resend;
        let (&offset, f) = self.in_flight.iter_mut().find(|(o, f)| {
            let o = **o;
            let behind_hole = (o == first && beyond_prefix) || last_arrived.is_some_and(|a| o < a);
            behind_hole && !f.arrived && !resend.contains(&o) && due(f)
        })?;
        mark(f);
        self.resent_bytes += f.data.len() as u64;
        Some((offset, f.data.clone()))
    }

    /// The receiver holds these byte ranges beyond its prefix (ascending, as an urgent
    /// object's `ACK` lists them): the chunks they cover need no more copies.
    pub fn arrived(&mut self, ranges: &[(u64, u64)]) {
        // Every ACK passes here; only an urgent object's list anything.
        if ranges.is_empty() {
            return;
        }
        let mut ranges = ranges.iter().peekable();
        for (&o, f) in &mut self.in_flight {
            let end = o + f.data.len() as u64;
            while ranges.next_if(|&&(_, e)| e < end).is_some() {}
            if let Some(&&(s, e)) = ranges.peek()
                && s <= o
                && end <= e
            {
                f.arrived = true;
            }
        }
    }

    /// The receiver reported a gap at `offset` (e.g. a chunk it could not verify): send the
    /// chunk covering it again.
    pub fn resend_from(&mut self, offset: u64) {
        if let Some((&o, _)) = self.in_flight.range(..=offset).next_back() {
            self.resend.insert(o);
        }
    }

    /// Bytes acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The object's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes read from the source so far.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Bytes held for possible re-sending.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.values().map(|f| f.data.len() as u64).sum()
    }

    /// Bytes sent more than once.
    pub fn resent_bytes(&self) -> u64 {
        self.resent_bytes
    }

    /// Whether every byte is acknowledged.
    pub fn is_done(&self) -> bool {
        self.acked == self.size
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::session::reasm::Ranges;

    #[test]
    fn window_bounds_reads() {
        let mut s = Scheduler::new(0, 100, 10, 30);
        let mut reads = Vec::new();
        while let Next::Read { offset, len } = s.next(0) {
            reads.push(offset);
            s.sent(offset, Bytes::from(vec![0u8; len]), 0);
        }
        assert_eq!(reads, [0, 10, 20]);
        assert_eq!(s.next(0), Next::Wait);
        s.ack(10).unwrap();
        assert_eq!(
            s.next(0),
            Next::Read {
                offset: 30,
                len: 10
            }
        );
        assert!(s.ack(1000).is_err());
    }

    #[test]
    fn lost_stream_chunks_are_resent_elsewhere() {
        let mut s = Scheduler::new(0, 30, 10, 100);
        for stream in [0, 1, 0] {
            let Next::Read { offset, len } = s.next(stream) else {
                panic!()
            };
            s.sent(offset, Bytes::from(vec![offset as u8; len]), stream);
        }
        s.stream_lost(0);
        let mut again = Vec::new();
        while let Next::Resend { offset, data } = s.next(1) {
            assert_eq!(data[0], offset as u8);
            again.push(offset);
        }
        assert_eq!(again, [0, 20]);
        s.ack(30).unwrap();
        assert_eq!(s.next(1), Next::Done);
        assert_eq!(s.in_flight_bytes(), 0);
        assert_eq!(s.resent_bytes(), 20);
    }

    #[test]
    fn a_stuck_streams_chunks_go_again_on_an_idle_one_once_each() {
        let t0 = Instant::now();
        let after = Duration::from_millis(200);
        let mut s = Scheduler::new(0, 60, 10, 60);
        // Chunks 0, 20, 40 on stream 0; 10, 30, 50 on stream 1.
        for i in 0..6u64 {
            let Next::Read { offset, len } = s.next((i % 2) as u32) else {
                panic!("read expected")
            };
            s.sent(offset, Bytes::from(vec![i as u8; len]), (i % 2) as u32);
            s.stamp(offset, t0);
        }
        assert_eq!(s.next(1), Next::Wait);
        // Too early, or asked by the stuck stream itself: nothing.
        assert_eq!(s.hedge(1, t0 + Duration::from_millis(100), after), None);
        assert_eq!(s.hedge(0, t0 + after, after), None);
        // Stream 0 holds the prefix: its chunks go on stream 1, oldest first, each once.
        let later = t0 + after;
        assert_eq!(s.hedge(1, later, after).map(|c| c.0), Some(0));
        assert_eq!(s.hedge(2, later, after).map(|c| c.0), Some(20));
        assert_eq!(s.hedge(1, later, after).map(|c| c.0), Some(40));
        assert_eq!(s.hedge(1, later, after), None);
        assert_eq!(s.resent_bytes(), 30);
        // Stream 0 dies: its chunks are on their way elsewhere, nothing is queued again.
        s.stream_lost(0);
        assert_eq!(s.next(1), Next::Wait);
        // Stream 2 dies too: the chunk it carried (20) goes again, and only that one.
        s.stream_lost(2);
        assert_eq!(
            s.next(1),
            Next::Resend {
                offset: 20,
                data: Bytes::from(vec![2u8; 10])
            }
        );
        assert_eq!(s.next(1), Next::Wait);
        s.ack(60).unwrap();
        assert!(s.is_done());
    }

    #[test]
    fn an_urgent_objects_chunks_each_go_once_more_on_another_stream() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(0, 40, 10, 40);
        // Chunks 0 and 20 on stream 0, 10 and 30 on stream 1; 30 not stamped yet.
        for (i, st) in [0u32, 1, 0, 1].into_iter().enumerate() {
            let Next::Read { offset, len } = s.next(st) else {
                panic!("read expected")
            };
            s.sent(offset, Bytes::from(vec![i as u8; len]), st);
            if i < 3 {
                s.stamp(offset, t0);
            }
        }
        assert_eq!(s.next(0), Next::Wait);
        // Each idle stream takes the oldest chunk that went out once, elsewhere.
        assert_eq!(s.duplicate(1, t0).map(|c| c.0), Some(0));
        assert_eq!(s.duplicate(0, t0).map(|c| c.0), Some(10));
        assert_eq!(s.duplicate(1, t0).map(|c| c.0), Some(20));
        // 30 has not gone out yet, and stream 1 carries it.
        assert_eq!(s.duplicate(0, t0), None);
        s.stamp(30, t0);
        assert_eq!(s.duplicate(1, t0), None);
        assert_eq!(s.duplicate(2, t0).map(|c| c.0), Some(30));
        // Once each.
        assert_eq!(s.duplicate(3, t0), None);
        assert_eq!(s.resent_bytes(), 40);
        // The receiver's prefix waits on chunk 0 (the caller sees data held beyond it): once
        // both its copies have been out long enough, a third goes on a stream carrying
        // neither, once.
        let after = Duration::from_millis(150);
        assert_eq!(
            s.third_copy(2, t0 + after, after, true).map(|c| c.0),
            Some(0)
        );
        assert_eq!(s.third_copy(2, t0 + after, after, true), None);
        let mut s2 = Scheduler::new(0, 20, 10, 20);
        for st in [0u32, 1] {
            let Next::Read { offset, len } = s2.next(st) else {
                panic!()
            };
            s2.sent(offset, Bytes::from(vec![0; len]), st);
            s2.stamp(offset, t0);
        }
        // Not before its second copy went, nor too soon after, nor on a stream carrying it.
        assert_eq!(s2.third_copy(2, t0 + after, after, true), None);
        assert_eq!(s2.duplicate(1, t0).map(|c| c.0), Some(0));
        assert_eq!(s2.third_copy(2, t0 + after / 2, after, true), None);
        assert_eq!(s2.third_copy(0, t0 + after, after, true), None);
        assert_eq!(s2.third_copy(1, t0 + after, after, true), None);
        assert_eq!(
            s2.third_copy(3, t0 + after, after, true).map(|c| c.0),
            Some(0)
        );
        assert_eq!(s.resent_bytes(), 50);
        // A copy and its original on different streams: losing either loses nothing.
        s.stream_lost(0);
        assert_eq!(s.next(3), Next::Wait);
        s.ack(40).unwrap();
        assert!(s.is_done());
    }

    #[test]
    fn chunks_below_what_the_receiver_lists_as_held_get_their_third_copies_at_once() {
        let t0 = Instant::now();
        let after = Duration::from_millis(150);
        // Six chunks of 10 over streams 0..3, each copied on the next stream.
        let mut s = Scheduler::new(0, 60, 10, 60);
        for i in 0..6u32 {
            let Next::Read { offset, len } = s.next(i % 3) else {
                panic!("read expected")
            };
            s.sent(offset, Bytes::from(vec![i as u8; len]), i % 3);
            s.stamp(offset, t0);
        }
        for i in 0..6u32 {
            assert!(s.duplicate((i + 1) % 3, t0).is_some());
        }
        // The receiver holds 10..20 and 40..50 (and nothing of 0, 20, 30, 50).
        s.arrived(&[(10, 20), (40, 50)]);
        let late = t0 + after;
        // Without the list only the chunk at the prefix would qualify; with it, 0, 20 and 30
        // (below a held chunk), never 10 and 40 (held) nor 50 (nothing held beyond it).
        let mut thirds = Vec::new();
        for st in [3u32, 4, 5, 6] {
            if let Some((o, _)) = s.third_copy(st, late, after, true) {
                thirds.push(o);
            }
        }
        assert_eq!(thirds, [0, 20, 30]);
        // Held chunks need no second copy either.
        let mut s = Scheduler::new(0, 30, 10, 30);
        for i in 0..3u32 {
            let Next::Read { offset, len } = s.next(0) else {
                panic!("read expected")
            };
            s.sent(offset, Bytes::from(vec![i as u8; len]), 0);
            s.stamp(offset, t0);
        }
        // A range that covers only part of a chunk does not count it held.
        s.arrived(&[(5, 20), (25, 30)]);
        assert_eq!(s.duplicate(1, t0).map(|c| c.0), Some(0));
        assert_eq!(s.duplicate(1, t0).map(|c| c.0), Some(20));
        assert_eq!(s.duplicate(1, t0), None);
        // Too early for a third, and none on the stream that carries a copy.
        assert_eq!(s.third_copy(2, t0 + after / 2, after, true), None);
        assert_eq!(s.third_copy(1, late, after, true), None);
        assert_eq!(s.third_copy(0, late, after, true), None);
    }

    #[test]
    fn an_urgent_object_sent_once_copies_the_chunks_below_what_the_receiver_holds() {
        let t0 = Instant::now();
        let after = Duration::from_millis(150);
        let late = t0 + after;
        // Six chunks of 10 over streams 0..3, once each.
        let mut s = Scheduler::new(0, 60, 10, 60);
        for i in 0..6u32 {
            let Next::Read { offset, len } = s.next(i % 3) else {
                panic!("read expected")
            };
            s.sent(offset, Bytes::from(vec![i as u8; len]), i % 3);
            s.stamp(offset, t0);
        }
        // The receiver holds 10..20 and 40..50: 0, 20 and 30 sit behind a hole, 50 does not.
        s.arrived(&[(10, 20), (40, 50)]);
        // Not before they have been out a round trip and a quarter.
        assert_eq!(s.hole_copy(3, t0 + after / 2, after, true), None);
        // Then each once, lowest first, never on the stream that carries it (30 is on 0).
        let mut copies = Vec::new();
        for st in [0u32, 0, 3, 3, 3, 3] {
            if let Some((o, _)) = s.hole_copy(st, late, after, true) {
                copies.push((st, o));
            }
        }
        assert_eq!(copies, [(0, 20), (3, 0), (3, 30)]);
        assert_eq!(s.resent_bytes(), 30);
        // Both copies out long enough: a third, as for a chunk sent twice from the start.
        assert_eq!(
            s.third_copy(4, late + after, after, true).map(|c| c.0),
            Some(0)
        );
        // Nothing held beyond the prefix and nothing listed: no copy, however long.
        let mut s = Scheduler::new(0, 20, 10, 20);
        for st in [0u32, 1] {
            let Next::Read { offset, len } = s.next(st) else {
                panic!("read expected")
            };
            s.sent(offset, Bytes::from(vec![0; len]), st);
            s.stamp(offset, t0);
        }
        assert_eq!(s.hole_copy(2, late + after * 10, after, false), None);
        // With data held beyond the prefix, the chunk it waits on goes again.
        assert_eq!(s.hole_copy(2, late, after, true).map(|c| c.0), Some(0));
        s.ack(20).unwrap();
        assert!(s.is_done());
    }

    #[test]
    fn a_hedged_chunk_whose_copy_was_lost_is_still_on_its_first_stream() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(0, 20, 10, 20);
        for st in [0u32, 1] {
            let Next::Read { offset, len } = s.next(st) else {
                panic!()
            };
            s.sent(offset, Bytes::from(vec![0; len]), st);
            s.stamp(offset, t0);
        }
        assert!(
            s.hedge(1, t0 + Duration::from_secs(1), Duration::ZERO)
                .is_some()
        );
        // The copy's stream dies: only its own chunk goes again (stream 0 still carries the
        // hedged one), and the hedged one may be hedged again later.
        s.stream_lost(1);
        assert_eq!(
            s.next(2),
            Next::Resend {
                offset: 10,
                data: Bytes::from(vec![0; 10])
            }
        );
        assert_eq!(s.next(2), Next::Wait);
        assert_eq!(
            s.hedge(2, t0 + Duration::from_secs(2), Duration::ZERO)
                .map(|c| c.0),
            Some(0)
        );
        // Unstamped chunks are never hedged.
        let mut s = Scheduler::new(0, 20, 10, 20);
        let Next::Read { offset, len } = s.next(0) else {
            panic!()
        };
        s.sent(offset, Bytes::from(vec![0; len]), 0);
        assert_eq!(
            s.hedge(1, t0 + Duration::from_secs(9), Duration::ZERO),
            None
        );
    }

    #[test]
    fn a_chunk_given_back_goes_out_once_more_and_only_that_one() {
        let mut s = Scheduler::new(0, 30, 10, 100);
        for _ in 0..2 {
            let Next::Read { offset, len } = s.next(0) else {
                panic!()
            };
            s.sent(offset, Bytes::from(vec![offset as u8; len]), 0);
        }
        s.give_back(10);
        // Nothing happens for an offset not in flight (acknowledged, or never read).
        s.give_back(25);
        let Next::Resend { offset, data } = s.next(1) else {
            panic!()
        };
        assert_eq!((offset, data[0]), (10, 10));
        assert_eq!(
            s.next(1),
            Next::Read {
                offset: 20,
                len: 10
            }
        );
        s.ack(10).unwrap();
        s.give_back(0);
        assert_eq!(s.next(1), Next::Wait);
        assert_eq!(s.resent_bytes(), 0, "given back, not sent twice");
    }

    #[test]
    fn resume_starts_at_the_receivers_prefix() {
        let mut s = Scheduler::new(40, 50, 10, 100);
        assert_eq!(
            s.next(0),
            Next::Read {
                offset: 40,
                len: 10
            }
        );
        let mut s = Scheduler::new(50, 50, 10, 100);
        assert_eq!(s.next(0), Next::Done);
    }

    proptest! {
        /// Streams die at random and the receiver sees chunks in any order: the object still
        /// completes, every byte arrives, and memory stays within the window.
        #[test]
        fn completes_despite_lost_streams(
            size in 1u64..5000,
            chunk in 1usize..700,
            window in 1u64..3000,
            events in proptest::collection::vec((0u32..4, 0u8..10), 1..400),
        ) {
            let mut s = Scheduler::new(0, size, chunk, window);
            let mut rx = Ranges::default();
            // Chunks on the wire, per stream, not yet delivered.
            let mut wire: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 4];
            let mut steps = 0;
            // A chaotic phase driven by the random events, then a fair one (every stream sends
            // and delivers in turn) that must finish the object.
            let mut ev = events.into_iter();
            while !s.is_done() {
                steps += 1;
                prop_assert!(steps < 100_000, "no progress");
                let (stream, what) = ev.next().unwrap_or((
                    ((steps / 2) % 4) as u32,
                    if steps % 2 == 0 { 9 } else { 1 },
                ));
                match what {
                    // A stream dies: its undelivered chunks are lost.
                    0 if steps % 7 == 0 => {
                        wire[stream as usize].clear();
                        s.stream_lost(stream);
                    }
                    // Deliver the oldest chunk of a stream, and acknowledge the prefix.
                    1..=4 => {
                        if !wire[stream as usize].is_empty() {
                            let (o, e) = wire[stream as usize].remove(0);
                            rx.insert(o, e);
                            s.ack(rx.contiguous()).unwrap();
                        }
                    }
                    _ => match s.next(stream) {
                        Next::Read { offset, len } => {
                            s.sent(offset, Bytes::from(vec![0u8; len]), stream);
                            wire[stream as usize].push((offset, offset + len as u64));
                        }
                        Next::Resend { offset, data } => {
                            wire[stream as usize].push((offset, offset + data.len() as u64));
                        }
                        Next::Wait | Next::Done => {}
                    },
                }
                prop_assert!(s.read() - s.acked() <= window.max(chunk as u64));
                prop_assert!(s.in_flight_bytes() <= window.max(chunk as u64));
            }
            prop_assert_eq!(rx.contiguous(), size);
        }
    }
}
