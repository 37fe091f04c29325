//! Page and chunk hashes.
//!
//! Two hashes, two jobs (the collision policy is in `docs/PROTOCOL.md`, "HDE"):
//! - **fast** (XXH3-128, tens of GB/s): finds candidates. The low 64 bits go into the
//!   receiver's cache summary; the full 128 bits identify duplicates inside one transfer, where
//!   the sender holds both pages and the object's BLAKE3 checksum backs the match end to end.
//! - **strong** (BLAKE3 truncated to 128 bits): names content across transfers. A cache
//!   reference carries it, and the receiver re-hashes what it serves from its cache, so a
//!   corrupted or mismatched entry is detected, never delivered.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Strong content identifier of a page or chunk: BLAKE3, first 128 bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 16]);

impl Key {
    /// The strong hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        let h = blake3::hash(data);
        let mut k = [0u8; 16];
        k.copy_from_slice(&h.as_bytes()[..16]);
        Self(k)
    }

    /// The bucket this key falls in for hash maps (the key is already uniformly random).
    pub(crate) fn low64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::hash::Hash for KeyHashed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.low64());
    }
}

/// A [`Key`] wrapper hashed by its own bits (used as a map key without re-hashing).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct KeyHashed(pub(crate) Key);

/// XXH3-128 of `data`.
pub fn fast128(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// The 64-bit fast hash used in cache summaries: the low half of [`fast128`].
pub fn fast64(data: &[u8]) -> u64 {
    fast128(data) as u64
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises; the per-chunk exit keeps non-zero pages cheap.
    data.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// A hasher for keys that are already hashes: passes their bits through.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for key types we do not use; fold so it still works.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

pub(crate) type PassThroughBuild = BuildHasherDefault<PassThrough>;

/// A hasher for 64-bit values another party chose (a peer's cache summary): mixed with a
/// key of this process's, so that values crafted to share their low bits
/// do not pile into one bucket (passed through, each insert would compare with all before).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mixed {
    key: u64,
    state: u64,
}

impl Hasher for Mixed {
    fn finish(&self) -> u64 {
        // SplitMix64's finalizer: every input bit reaches every output bit.
        let mut z = self.state ^ self.key;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state = self.state.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.state = v;
    }
}

/// Builds [`Mixed`] hashers with a random key, one per set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MixedBuild(u64);

impl Default for MixedBuild {
    fn default() -> Self {
        use std::hash::BuildHasher;
        // std's random hasher keys are per process and per instance.
        Self(std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64) | 1)
    }
}

impl std::hash::BuildHasher for MixedBuild {
    type Hasher = Mixed;
    fn build_hasher(&self) -> Mixed {
        Mixed {
            key: self.0,
            state: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero(&p));
    }

    #[test]
    fn keys_differ_and_print_as_hex() {
        let a = Key::of(b"a");
        assert_ne!(a, Key::of(b"b"));
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(fast64(b"x"), fast128(b"x") as u64);
    }
}
