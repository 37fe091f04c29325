//! What of a QEMU pre-copy stream the destination keeps back until the source's digest has
//! checked the whole stream.
//!
//! QEMU ends a pre-copy stream with its end-of-state marker (`QEMU_VM_EOF`, a zero byte) and
//! then, unless the machine suppresses it, the VM description: `QEMU_VM_VMDESCRIPTION` (6), a
//! big-endian `u32` length, and that many bytes of JSON, an object (`{...}`; 106 KB for a
//! bare `pc` machine under QEMU 7.2). QEMU loads a stream cut anywhere after the marker as
//! complete: it reads the description only for tools that look at the stream, and does not
//! fail on a short one ("Expected vmdescription section" at most). A destination agent that
//! died there (killed, out of memory) would leave its QEMU to start the guest while the
//! source, whose finish failed, resumes its own: two guests running. So nothing from a place
//! where such an end could begin goes to QEMU until the stream shows that it is not the end
//! (more bytes came than the description there would leave room for) or the source's digest
//! has checked the whole stream; the last [`MARK`] - 1 bytes, where a marker may begin that
//! has not been seen whole, are kept back as well. The stream is only looked at here, not
//! parsed: QEMU's device sections carry no lengths, so the end cannot be found from the front.
//!
//! A guest's pages are in the stream as they are, so the pattern may turn up inside them too.
//! Such a place is ruled out by the next zero byte after its first [`MARK`] (QEMU writes the
//! description's length with `strlen`: it holds no zero byte), which in QEMU's stream comes
//! within a page (every page record's 8-byte header has some), or once the description it
//! would begin is overrun, at most [`DESCRIPTION_MOST`] bytes later. So at most [`MARK`]
//! places are open at once, and the bytes kept back (outside the feed's buffer count) are at
//! most that much plus a block. A stream whose description is that long or longer is kept
//! back by its last bytes only (QEMU's is about 100 KB for a `pc` machine).

use std::collections::VecDeque;

use bytes::Bytes;

/// A possible end: the marker, `QEMU_VM_VMDESCRIPTION`, the length (4 bytes), and the JSON's
/// opening brace.
pub(crate) const MARK: usize = 7;

/// VM descriptions are taken for one when shorter than this (QEMU's for a machine with
/// hundreds of devices is a few MB; the length's first byte is then zero, which the search
/// relies on); a stream whose description is longer is kept back by its last bytes only.
pub(crate) const DESCRIPTION_MOST: u32 = 16 << 20;

/// Whether `m` (at least [`MARK`] bytes) begins a possible end of the stream; its description's
/// length.
fn mark_at(m: &[u8]) -> Option<u32> {
    if m.len() < MARK || m[0] != 0 || m[1] != 6 || m[6] != b'{' {
        return None;
    }
    let len = u32::from_be_bytes([m[2], m[3], m[4], m[5]]);
    // At least "{}".
    (2..DESCRIPTION_MOST).contains(&len).then_some(len)
}

/// Notes a possible end at `offset` with a description of `len` bytes.
fn found(ends: &mut VecDeque<(u64, u64)>, offset: u64, len: u32) {
    // Its first byte is a zero inside the description of every place at least MARK before.
    while ends
        .front()
        .is_some_and(|&(o, _)| o + MARK as u64 <= offset)
    {
        ends.pop_front();
    }
    // Kept even when an earlier one would end later: a zero byte may rule that one out
    // (`00 06` just before QEMU's marker, a section footer's, makes such a place 2 bytes
    // before it) while this one stays open.
    ends.push_back((offset, offset + 6 + u64::from(len)));
}

/// The stream received so far, split into what may go to QEMU and what is kept back.
#[derive(Debug)]
pub(crate) struct EndHold {
    /// Received and not released, in order, from stream offset `start`.
    held: VecDeque<Bytes>,
    start: u64,
    /// Stream bytes received.
    received: u64,
    /// The last bytes received (fewer than [`MARK`]): places not yet looked at, because a
    /// marker there would reach into bytes not received yet.
    pending: Vec<u8>,
    /// Possible ends not ruled out: (offset of the marker, stream length were it the end),
    /// offsets ascending, all within [`MARK`] of each other.
    ends: VecDeque<(u64, u64)>,
    /// Where the last zero byte received is.
    last_zero: Option<u64>,
}

impl Default for EndHold {
    fn default() -> Self {
        Self {
            held: VecDeque::new(),
            start: 0,
            received: 0,
            pending: Vec::with_capacity(2 * MARK),
            ends: VecDeque::new(),
            last_zero: None,
        }
    }
}

impl EndHold {
    /// Takes the stream's next block.
    pub(crate) fn push(&mut self, block: Bytes) {
        if block.is_empty() {
            return;
        }
        let at = self.received;
        // Places in the pending bytes, looked at with the block's first bytes.
        let mut probe = std::mem::take(&mut self.pending);
        let from = at - probe.len() as u64;
        let old = probe.len();
        probe.extend_from_slice(&block[..block.len().min(MARK - 1)]);
        for i in 0..old {
            if let Some(len) = probe.get(i..i + MARK).and_then(mark_at) {
                found(&mut self.ends, from + i as u64, len);
            }
        }
        // Places in the block whose marker it holds whole.
        if block.len() >= MARK {
            // The marker's second byte, rarer in guest pages than its first (zero); the
            // search goes on one place after each (places may overlap: `00 06 00 06 00`).
            let mut i = 1;
            while let Some(j) = memchr::memchr(6, &block[i..=block.len() - (MARK - 1)]) {
                let p = i + j - 1;
                if let Some(len) = mark_at(&block[p..p + MARK]) {
                    found(&mut self.ends, at + p as u64, len);
                }
                i += j + 1;
            }
        }
        // The places not looked at: the stream's last MARK - 1 bytes (or fewer).
        self.pending = if block.len() >= MARK - 1 {
            block[block.len() - (MARK - 1)..].to_vec()
        } else {
            let keep = probe.len().min(MARK - 1);
            probe[probe.len() - keep..].to_vec()
        };
        if let Some(z) = memchr::memrchr(0, &block) {
            self.last_zero = Some(at + z as u64);
        }
        self.received += block.len() as u64;
        self.held.push_back(block);
        // Places whose description the stream has overrun, or that a zero byte follows
        // within it, are not its end.
        let (received, zero) = (self.received, self.last_zero);
        self.ends
            .retain(|&(o, end)| end >= received && zero.is_none_or(|z| z < o + MARK as u64));
    }

    /// Up to where the stream may go to QEMU now.
    fn limit(&self) -> u64 {
        let unseen = self.received - self.pending.len() as u64;
        self.ends.front().map_or(unseen, |&(o, _)| o.min(unseen))
    }

    /// Takes what may go to QEMU now, in order.
    pub(crate) fn release(&mut self) -> Vec<Bytes> {
        self.take_until(self.limit())
    }

    /// Takes everything still kept back (the source's digest matched the whole stream).
    pub(crate) fn rest(&mut self) -> Vec<Bytes> {
        self.take_until(self.received)
    }

    /// Where the bytes kept back begin in the stream.
    pub(crate) fn kept_from(&self) -> u64 {
        self.start
    }

    /// Whether the bytes kept back begin with a possible end-of-state marker (not only the
    /// last few bytes): so for a stream that ends with a VM description shorter than
    /// [`DESCRIPTION_MOST`] bytes.
    pub(crate) fn marker_kept(&self) -> bool {
        self.ends.front().is_some_and(|&(o, _)| o == self.start)
    }

    fn take_until(&mut self, limit: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        while self.start < limit {
            let Some(front) = self.held.front_mut() else {
                break;
            };
            let want = limit - self.start;
            if (front.len() as u64) <= want {
                self.start += front.len() as u64;
                if let Some(b) = self.held.pop_front() {
                    out.push(b);
                }
            } else {
                // `want` < the block's length, a usize.
                let b = front.split_to(want as usize);
                self.start += b.len() as u64;
                out.push(b);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stream of `body` ended the way QEMU ends one: the marker and a description of `desc`
    /// bytes (at least 2). Its marker's offset.
    fn ended(body: &[u8], desc: usize) -> (Vec<u8>, usize) {
        let mut s = body.to_vec();
        let eof = s.len();
        s.push(0);
        s.push(6);
        s.extend_from_slice(&(desc as u32).to_be_bytes());
        s.push(b'{');
        s.extend(std::iter::repeat_n(b' ', desc - 2));
        s.push(b'}');
        (s, eof)
    }

    /// What may go to QEMU once the first `n` bytes of `s` are in, found the slow way.
    fn limit_of(s: &[u8], n: usize) -> usize {
        let mut limit = n - n.min(MARK - 1);
        for q in 0..n.saturating_sub(MARK - 1) {
            if let Some(len) = mark_at(&s[q..q + MARK])
                && q + 6 + len as usize >= n
                && !s[q + MARK..n].contains(&0)
            {
                limit = limit.min(q);
                break;
            }
        }
        limit
    }

    fn cuts(len: usize, raw: &[usize]) -> Vec<usize> {
        let mut c: Vec<usize> = raw.iter().map(|r| r % (len + 1)).collect();
        c.push(0);
        c.push(len);
        c.sort_unstable();
        c.dedup();
        c
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the blocks, nothing from the marker on goes before the end; the released
        /// bytes are the stream's in order, as far as they may go; with the rest, the whole.
        #[test]
        fn the_end_of_state_marker_is_never_released_before_the_end(
            // Bytes from a few values, so that false markers turn up.
            body in proptest::collection::vec(
                prop_oneof![Just(0u8), Just(6u8), Just(b'{'), Just(1u8), any::<u8>()],
                0..600,
            ),
            desc in 2usize..300,
            raw in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let (s, eof) = ended(&body, desc);
            let c = cuts(s.len(), &raw);
            let mut h = EndHold::default();
            let mut out = Vec::new();
            for w in c.windows(2) {
                h.push(Bytes::copy_from_slice(&s[w[0]..w[1]]));
                for b in h.release() {
                    out.extend_from_slice(&b);
                }
                prop_assert!(out.len() <= eof, "released {} bytes, the marker at {eof}", out.len());
                prop_assert_eq!(out.len(), limit_of(&s, w[1]));
                prop_assert_eq!(h.kept_from(), out.len() as u64);
            }
            prop_assert!(h.marker_kept());
            for b in h.rest() {
                out.extend_from_slice(&b);
            }
            prop_assert_eq!(out, s);
        }
    }

    #[test]
    fn false_markers_in_the_pages_hold_back_only_until_overrun() {
        // A marker of a 100-byte description inside the stream, 400 bytes before its end.
        let mut body = vec![0xAAu8; 50];
        body.extend_from_slice(&[0, 6, 0, 0, 0, 100, b'{']);
        body.extend(std::iter::repeat_n(0xBB, 400));
        let (s, eof) = ended(&body, 64);
        let mut h = EndHold::default();
        h.push(Bytes::copy_from_slice(&s[..100]));
        assert_eq!(h.release().iter().map(Bytes::len).sum::<usize>(), 50);
        // Overrun: 50 + 6 + 100 bytes are in, and one more.
        h.push(Bytes::copy_from_slice(&s[100..157]));
        assert_eq!(
            h.release().iter().map(Bytes::len).sum::<usize>(),
            157 - 50 - 6
        );
        h.push(Bytes::copy_from_slice(&s[157..]));
        let n: usize = h.release().iter().map(Bytes::len).sum();
        assert_eq!(h.kept_from(), eof as u64, "{n}");
        assert!(h.marker_kept());
    }

    #[test]
    fn a_zero_byte_after_a_false_marker_rules_it_out() {
        let mut s = vec![0xAAu8; 50];
        s.extend_from_slice(&[0, 6, 0, 0, 0x10, 0, b'{']);
        s.extend_from_slice(b"abc\0defghijklmnop");
        let mut h = EndHold::default();
        h.push(Bytes::copy_from_slice(&s[..60]));
        assert_eq!(h.release().concat(), &s[..50], "held from the place");
        h.push(Bytes::copy_from_slice(&s[60..]));
        assert_eq!(
            h.release().concat(),
            &s[50..s.len() - 6],
            "the zero byte rules it out"
        );
    }

    #[test]
    fn a_guest_full_of_false_markers_does_not_hide_the_real_one() {
        // Thousands of places, each overrun 8 bytes on, in the block with QEMU's end.
        let mut body = Vec::new();
        for _ in 0..10_000 {
            body.extend_from_slice(&[0, 6, 0, 0, 0, 2, b'{', b'}']);
        }
        let (s, eof) = ended(&body, 100_000);
        for block in [64 << 10, s.len()] {
            let mut h = EndHold::default();
            let mut out = 0;
            for c in s.chunks(block) {
                h.push(Bytes::copy_from_slice(c));
                out += h.release().iter().map(Bytes::len).sum::<usize>();
                assert!(h.ends.len() <= MARK, "{} places open", h.ends.len());
            }
            assert_eq!(out, eof);
            assert!(h.marker_kept());
        }
    }

    #[test]
    fn a_place_ruled_out_by_a_zero_does_not_hide_the_marker_two_bytes_on() {
        // A section footer (`7E`, section id 6) just before the marker: `00 06` there reads
        // as a place whose length ends in the marker's and whose brace is the length's third
        // byte (0x7B); the length's last byte, zero, rules it out.
        let mut body = vec![0xAA; 8];
        body.extend_from_slice(&[0x7E, 0, 0, 0, 6]);
        for desc in [0x7B00, 0x01_7B00, 0x05_7B00] {
            let (s, eof) = ended(&body, desc);
            for block in [7, 4096, s.len()] {
                let mut h = EndHold::default();
                for c in s.chunks(block) {
                    h.push(Bytes::copy_from_slice(c));
                    h.release();
                }
                assert_eq!(h.kept_from(), eof as u64, "{desc:#x} in blocks of {block}");
                assert!(h.marker_kept());
            }
        }
    }

    #[test]
    fn a_stream_without_a_description_keeps_its_last_bytes() {
        let mut h = EndHold::default();
        h.push(Bytes::from_static(b"QEVM and all of it"));
        assert_eq!(h.release().concat(), b"QEVM and all");
        assert!(!h.marker_kept());
        h.push(Bytes::from_static(b"!"));
        assert_eq!(h.release().concat(), b" ");
        assert_eq!(h.rest().concat(), b"of it!");
    }

    #[test]
    fn the_real_description_of_a_qemu_7_2_pc_machine_is_found() {
        // Its first bytes (a bare `pc` machine's, 106,470 bytes long).
        let mut s = b"QEVM\x00\x00\x00\x03 pages and devices ...".to_vec();
        let (tail, eof) = ended(&[], 106_470);
        assert_eq!(eof, 0);
        let eof = s.len();
        s.extend_from_slice(&tail);
        let mut h = EndHold::default();
        for c in s.chunks(32 << 10) {
            h.push(Bytes::copy_from_slice(c));
            h.release();
        }
        assert_eq!(h.kept_from(), eof as u64);
        assert!(h.marker_kept());
    }
}
