//! What the sender knows of the receiver's baseline cache: a summary of fast hashes.
//!
//! The receiver sends the low 64 bits of the fast hash of every page and chunk it holds
//! ([`crate::BaselineCache::summary`]); the sender looks candidates up here and, on a hit,
//! sends the strong hash. A summary is only a hint: a stale or false entry costs one round
//! trip (the receiver reports the page missing and it is sent again), never a wrong page.

use std::collections::HashSet;

use crate::DecodeError;
use crate::buf::{Reader, put_varint};
use crate::hash::MixedBuild;

/// Magic of an encoded summary.
pub const SUMMARY_MAGIC: [u8; 4] = *b"HDEI";
/// Most entries a summary may carry (2^28 pages: 1 TiB of 4 KiB pages, 2 GiB of summary).
pub const MAX_SUMMARY_ENTRIES: u64 = 1 << 28;

/// The receiver's holdings as seen by the sender.
#[derive(Debug, Default, Clone)]
pub struct RemoteIndex {
    set: HashSet<u64, MixedBuild>,
}

impl RemoteIndex {
    /// An index from fast hashes.
    pub fn from_hashes(hashes: impl IntoIterator<Item = u64>) -> Self {
        Self {
            set: hashes.into_iter().collect(),
        }
    }

    /// Whether the receiver probably holds content with this fast hash.
    pub fn contains(&self, fast64: u64) -> bool {
        self.set.contains(&fast64)
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Adds content the receiver has learned since the summary (what this sender sent).
    pub fn insert(&mut self, fast64: u64) {
        self.set.insert(fast64);
    }

    /// Forgets an entry (the receiver turned out not to hold it).
    pub fn remove(&mut self, fast64: u64) {
        self.set.remove(&fast64);
    }

    /// Encodes a summary: magic, version, count, then sorted hashes as varint deltas (a
    /// sorted set of random 64-bit values packs to about 7.3 bytes per entry).
    pub fn encode(hashes: &mut [u64], out: &mut Vec<u8>) {
        hashes.sort_unstable();
        out.extend_from_slice(&SUMMARY_MAGIC);
        out.push(crate::FORMAT_VERSION);
        put_varint(out, hashes.len() as u64);
        let mut prev = 0u64;
        for &h in hashes.iter() {
            put_varint(out, h - prev);
            prev = h;
        }
    }

    /// Decodes a summary, bounded by [`MAX_SUMMARY_ENTRIES`] and by the input length.
    pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(input);
        if r.array::<4>("summary magic")? != SUMMARY_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let v = r.u8("summary version")?;
        if v != crate::FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        // Every entry takes at least one byte, so the input length bounds the count too.
        let max = MAX_SUMMARY_ENTRIES.min(r.remaining() as u64);
        let n = r.bounded(max, "summary entries")?;
        let mut set = HashSet::with_capacity_and_hasher(n, MixedBuild::default());
        let mut prev = 0u64;
        for _ in 0..n {
            let d = r.varint("summary entry")?;
            prev = prev.checked_add(d).ok_or(DecodeError::Malformed {
                what: "summary entry",
                why: "hashes overflow",
            })?;
            set.insert(prev);
        }
        if !r.is_empty() {
            return Err(DecodeError::Malformed {
                what: "summary",
                why: "bytes after the entries",
            });
        }
        Ok(Self { set })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_crafted_to_collide_are_spread_over_the_buckets() {
        use std::hash::BuildHasher;
        // Steps of 2^32: equal low halves, all in one bucket if hashes passed through (each
        // insert of a summary of them would then compare with every entry before it).
        let build = MixedBuild::default();
        let buckets: HashSet<u64> = (1..=50_000u64)
            .map(|i| build.hash_one(i << 32) & 0xFFFF)
            .collect();
        assert!(
            buckets.len() > 30_000,
            "{} buckets of 65,536",
            buckets.len()
        );
        let mut hs: Vec<u64> = (1..=50_000u64).map(|i| i << 32).collect();
        let mut out = Vec::new();
        RemoteIndex::encode(&mut hs, &mut out);
        let idx = RemoteIndex::decode(&out).unwrap();
        assert_eq!(idx.len(), 50_000);
        assert!(idx.contains(7 << 32) && !idx.contains(7));
    }

    #[test]
    fn entries_learned_later_can_be_forgotten() {
        let mut hs = vec![1, 2, 3];
        let mut out = Vec::new();
        RemoteIndex::encode(&mut hs, &mut out);
        let mut idx = RemoteIndex::decode(&out).unwrap();
        idx.insert(9);
        assert!(idx.contains(9) && idx.len() == 4);
        idx.remove(9);
        idx.remove(42);
        assert!(!idx.contains(9) && idx.contains(1) && idx.len() == 3);
    }

    proptest! {
        #[test]
        fn summary_round_trips(mut hs in proptest::collection::vec(any::<u64>(), 0..200)) {
            let mut out = Vec::new();
            RemoteIndex::encode(&mut hs, &mut out);
            let idx = RemoteIndex::decode(&out).unwrap();
            for h in &hs {
                prop_assert!(idx.contains(*h));
            }
            hs.dedup();
            prop_assert_eq!(idx.len(), hs.len());
        }

        #[test]
        fn summary_decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RemoteIndex::decode(&data);
            let mut with_magic = b"HDEI\x01".to_vec();
            with_magic.extend_from_slice(&data);
            let _ = RemoteIndex::decode(&with_magic);
        }
    }
}
