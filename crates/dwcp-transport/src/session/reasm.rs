//! Receiver side of an object: which byte ranges have arrived, and the in-order view of them.
//!
//! Pure: no I/O, no clock. [`Ranges`] tracks coverage for consumers that write chunks at their
//! offsets (files); [`Reorder`] additionally buffers out-of-order chunks, within a byte limit,
//! for consumers that need an in-order stream.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Byte ranges received so far, merged; `contiguous()` is the length of the prefix that has no
/// holes.
#[derive(Debug, Clone, Default)]
pub struct Ranges {
    /// start -> end (exclusive), disjoint and non-adjacent, all starting above `contiguous`.
    islands: BTreeMap<u64, u64>,
    contiguous: u64,
    /// Bytes held: the prefix and the islands.
    held: u64,
}

impl Ranges {
    /// Empty, or starting with a prefix already held (a resumed object).
    pub fn with_prefix(prefix: u64) -> Self {
        Self {
            islands: BTreeMap::new(),
            contiguous: prefix,
            held: prefix,
        }
    }

    /// Bytes held in all, beyond the prefix too.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Length of the hole-free prefix.
    pub fn contiguous(&self) -> u64 {
        self.contiguous
    }

    /// Number of separate ranges beyond the prefix (for bounding bookkeeping).
    pub fn islands(&self) -> usize {
        self.islands.len()
    }

    /// The lowest `max` ranges held beyond the prefix, as `(start, end)`, ascending.
    pub fn lowest_islands(&self, max: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.islands.iter().take(max).map(|(&s, &e)| (s, e))
    }

    /// Records `[start, end)`; returns how many of those bytes were new.
    pub fn insert(&mut self, start: u64, end: u64) -> u64 {
        if end <= start || end <= self.contiguous {
            return 0;
        }
        let (req_start, req_end) = (start.max(self.contiguous), end);
        let (mut start, mut end) = (req_start, req_end);
        let mut new = end - start;
        // Merge with every island that overlaps or touches [start, end].
        let touching: Vec<(u64, u64)> = self
            .islands
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            let overlap = e.min(req_end).saturating_sub(s.max(req_start));
            new -= overlap;
            start = start.min(s);
            end = end.max(e);
            self.islands.remove(&s);
        }
        if start <= self.contiguous {
            self.contiguous = end;
            // The prefix grew: absorb islands that now touch it.
            while let Some((&s, &e)) = self.islands.first_key_value() {
                if s > self.contiguous {
                    break;
                }
                self.contiguous = self.contiguous.max(e);
                self.islands.remove(&s);
            }
        } else {
            self.islands.insert(start, end);
        }
        self.held += new;
        new
    }
}

/// Why a chunk cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReorderError {
    /// Buffering it would exceed the limit: the sender ignored the window.
    #[error(
        "chunk at offset {offset} ({len} bytes) would buffer {would} bytes out of order, \
         the limit is {limit}"
    )]
    Overflow {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: usize,
        /// Bytes that would be buffered.
        would: usize,
        /// The limit.
        limit: usize,
    },
    /// The chunk extends past the object's end.
    #[error("chunk at offset {offset} ({len} bytes) runs past the object's size {size}")]
    PastEnd {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: usize,
        /// Object size.
        size: u64,
    },
}

/// Turns chunks that arrive in any order, possibly duplicated or overlapping, into the object's
/// bytes in order, buffering at most `limit` bytes out of order.
#[derive(Debug)]
pub struct Reorder {
    next: u64,
    size: u64,
    pending: BTreeMap<u64, Bytes>,
    buffered: usize,
    limit: usize,
}

impl Reorder {
    /// For an object of `size` bytes, starting at `start` (resume point).
    pub fn new(start: u64, size: u64, limit: usize) -> Self {
        Self {
            next: start,
            size,
            pending: BTreeMap::new(),
            buffered: 0,
            limit,
        }
    }

    /// The next offset expected in order.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Bytes held out of order.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Whether every byte has been delivered.
    pub fn is_complete(&self) -> bool {
        self.next == self.size
    }

    /// Takes a chunk; returns the chunks that are now deliverable, in order.
    pub fn push(&mut self, offset: u64, chunk: Bytes) -> Result<Vec<Bytes>, ReorderError> {
        let len = chunk.len();
        let end = offset.saturating_add(len as u64);
        if end > self.size {
            return Err(ReorderError::PastEnd {
                offset,
                len,
                size: self.size,
            });
        }
        let mut out = Vec::new();
        if end <= self.next {
            return Ok(out); // a duplicate of delivered bytes
        }
        if offset <= self.next {
            // Deliver at once, minus what was already delivered.
            // `self.next - offset < len` because `end > self.next`.
            let skip = (self.next - offset) as usize;
            self.next = end;
            out.push(chunk.slice(skip..));
            self.drain(&mut out);
            return Ok(out);
        }
        if self.pending.get(&offset).is_some_and(|c| c.len() >= len) {
            return Ok(out); // duplicate of a buffered chunk
        }
        let replaced = self.pending.get(&offset).map_or(0, Bytes::len);
        let would = self.buffered - replaced + len;
        if would > self.limit {
            return Err(ReorderError::Overflow {
                offset,
                len,
                would,
                limit: self.limit,
            });
        }
        self.buffered = would;
        self.pending.insert(offset, chunk);
        Ok(out)
    }

    fn drain(&mut self, out: &mut Vec<Bytes>) {
        while let Some((&off, _)) = self.pending.first_key_value() {
            if off > self.next {
                break;
            }
            let Some((off, chunk)) = self.pending.pop_first() else {
                break;
            };
            self.buffered -= chunk.len();
            let end = off + chunk.len() as u64;
            if end > self.next {
                let skip = (self.next - off) as usize;
                out.push(chunk.slice(skip..));
                self.next = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ranges_merge() {
        let mut r = Ranges::default();
        assert_eq!(r.insert(10, 20), 10);
        assert_eq!(r.contiguous(), 0);
        assert_eq!(r.insert(15, 30), 10);
        assert_eq!(r.islands(), 1);
        assert_eq!(r.insert(0, 10), 10);
        assert_eq!(r.contiguous(), 30);
        assert_eq!(r.islands(), 0);
        assert_eq!(r.insert(5, 25), 0);
        assert_eq!(r.insert(40, 50), 10);
        assert_eq!(r.insert(30, 40), 10);
        assert_eq!(r.contiguous(), 50);
        assert_eq!(r.held(), 50);
        let mut r = Ranges::with_prefix(100);
        assert_eq!(r.insert(0, 100), 0);
        assert_eq!(r.insert(90, 110), 10);
        assert_eq!(r.contiguous(), 110);
        // Beyond a hole: held, not contiguous.
        assert_eq!(r.insert(200, 250), 50);
        assert_eq!((r.contiguous(), r.held()), (110, 160));
        assert_eq!(r.insert(300, 310), 10);
        assert_eq!(r.insert(120, 130), 10);
        assert_eq!(
            r.lowest_islands(8).collect::<Vec<_>>(),
            [(120, 130), (200, 250), (300, 310)]
        );
        assert_eq!(
            r.lowest_islands(2).collect::<Vec<_>>(),
            [(120, 130), (200, 250)]
        );
    }

    #[test]
    fn reorder_limits_buffering() {
        let mut r = Reorder::new(0, 100, 20);
        assert!(r.push(50, Bytes::from(vec![0u8; 20])).unwrap().is_empty());
        assert!(matches!(
            r.push(80, Bytes::from(vec![0u8; 10])),
            Err(ReorderError::Overflow { .. })
        ));
        assert!(matches!(
            r.push(95, Bytes::from(vec![0u8; 10])),
            Err(ReorderError::PastEnd { .. })
        ));
    }

    /// A random object cut into chunks.
    fn object_and_chunks() -> impl Strategy<Value = (Vec<u8>, Vec<(u64, usize)>)> {
        (1usize..3000).prop_flat_map(|size| {
            let data = proptest::collection::vec(any::<u8>(), size);
            let chunks = proptest::collection::vec((0..size as u64, 1usize..400), 1..60);
            (data, chunks)
        })
    }

    proptest! {
        /// Any order, duplicates and overlaps: the in-order output is exactly the object, and
        /// coverage agrees with it.
        #[test]
        fn any_order_same_bytes((data, extra) in object_and_chunks(), seed in any::<u64>()) {
            let size = data.len() as u64;
            // A covering set of chunks (so the object can complete), plus random extra ones
            // (duplicates and overlaps), shuffled by the seed.
            let mut chunks: Vec<(u64, usize)> = (0..data.len())
                .step_by(97)
                .map(|o| (o as u64, 97.min(data.len() - o)))
                .collect();
            chunks.extend(extra.into_iter().map(|(o, l)| (o, l.min(data.len() - o as usize))));
            let mut s = seed;
            for i in (1..chunks.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                chunks.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut reorder = Reorder::new(0, size, usize::MAX);
            let mut ranges = Ranges::default();
            let mut out = Vec::new();
            let mut new_total = 0;
            for (o, l) in chunks {
                let chunk = Bytes::copy_from_slice(&data[o as usize..o as usize + l]);
                for piece in reorder.push(o, chunk).unwrap() {
                    out.extend_from_slice(&piece);
                }
                new_total += ranges.insert(o, o + l as u64);
                prop_assert_eq!(ranges.contiguous(), reorder.next_offset());
                prop_assert_eq!(ranges.held(), new_total);
            }
            prop_assert_eq!(&out, &data);
            prop_assert!(reorder.is_complete());
            prop_assert_eq!(reorder.buffered(), 0);
            prop_assert_eq!(new_total, size);
            prop_assert_eq!(ranges.contiguous(), size);
        }

        /// Dropped chunks: the output is a correct prefix, never wrong bytes, and the gap shows.
        #[test]
        fn drops_leave_a_visible_gap(data in proptest::collection::vec(any::<u8>(), 200..2000),
                                     drop_at in 0usize..10) {
            let size = data.len() as u64;
            let chunks: Vec<(u64, usize)> = (0..data.len())
                .step_by(100)
                .map(|o| (o as u64, 100.min(data.len() - o)))
                .collect();
            let dropped = drop_at % chunks.len();
            let mut reorder = Reorder::new(0, size, usize::MAX);
            let mut out = Vec::new();
            for (i, (o, l)) in chunks.iter().enumerate().rev() {
                if i == dropped {
                    continue;
                }
                let chunk = Bytes::copy_from_slice(&data[*o as usize..*o as usize + l]);
                for piece in reorder.push(*o, chunk).unwrap() {
                    out.extend_from_slice(&piece);
                }
            }
            prop_assert!(!reorder.is_complete());
            prop_assert_eq!(reorder.next_offset(), chunks[dropped].0);
            prop_assert_eq!(&out[..], &data[..out.len()]);
        }
    }
}
