//! Codec chooser: the compressor that maximises end-to-end throughput on a given link.
//!
//! For each candidate, the throughput of input bytes is
//! `min(link / ratio, encode speed, decode speed)` — the link carries `ratio` bytes per input
//! byte, and neither end may fall behind. On a datacenter link the CPU bounds it and the
//! fast codecs win; on an internet link the link bounds it and the strong ones do. Speeds
//! come from a calibration on this machine ([`Chooser::calibrate`]); ratios start from the
//! calibration sample and are then learned from the data actually sent
//! ([`Chooser::observe`]).

use std::time::Instant;

use crate::codec::{Codec, Compressor, Decompressor};

/// What is known of one codec.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The codec.
    pub codec: Codec,
    /// Output bytes per input byte (learned).
    pub ratio: f64,
    /// Input bytes per second per core, compressing.
    pub encode_bps: f64,
    /// Output bytes per second per core, decompressing.
    pub decode_bps: f64,
}

impl Candidate {
    /// Input bytes per second this codec sustains on a link of `link_bps` bytes per second.
    pub fn throughput(&self, link_bps: f64) -> f64 {
        (link_bps / self.ratio.max(1e-6))
            .min(self.encode_bps)
            .min(self.decode_bps)
    }
}

/// The chooser.
#[derive(Clone, Debug)]
pub struct Chooser {
    candidates: Vec<Candidate>,
    /// Weight of a new observation in the learned ratio.
    alpha: f64,
}

/// The codecs considered, fastest first.
pub const CANDIDATES: [Codec; 8] = [
    Codec::None,
    Codec::Lz4,
    Codec::Zstd(-1),
    Codec::Zstd(1),
    Codec::Zstd(2),
    Codec::Zstd(3),
    Codec::Zstd(6),
    Codec::Zstd(9),
];

impl Chooser {
    /// A chooser from known figures.
    pub fn new(candidates: Vec<Candidate>) -> Self {
        Self {
            candidates,
            alpha: 0.2,
        }
    }

    /// Measures every candidate on `sample` (typically a few MiB of the data to send, as
    /// compressible as it is: zero and duplicate pages removed) on this machine's clock.
    pub fn calibrate(sample: &[u8]) -> Self {
        let mut comp = Compressor::new();
        let mut decomp = Decompressor::new();
        let mut out = Vec::with_capacity(sample.len() + 1024);
        let mut back = Vec::with_capacity(sample.len());
        let piece = 1 << 20;
        let candidates = CANDIDATES
            .iter()
            .map(|&codec| {
                let (mut raw, mut packed) = (0usize, 0usize);
                let (mut enc_s, mut dec_s) = (0f64, 0f64);
                for p in sample.chunks(piece) {
                    out.clear();
                    let t = Instant::now();
                    let used = comp.compress(codec, p, &mut out);
                    enc_s += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    // Decoding our own output cannot fail; if it did, the codec is unusable.
                    if decomp.decompress(used, &out, p.len(), &mut back).is_err() {
                        dec_s = f64::INFINITY;
                    }
                    dec_s += t.elapsed().as_secs_f64();
                    raw += p.len();
                    packed += out.len();
                }
                let raw_f = raw.max(1) as f64;
                Candidate {
                    codec,
                    ratio: packed.max(1) as f64 / raw_f,
                    encode_bps: raw_f / enc_s.max(1e-9),
                    decode_bps: raw_f / dec_s.max(1e-9),
                }
            })
            .collect();
        Self::new(candidates)
    }

    /// The candidates and what is known of them.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The best codec for a link of `link_bps` bytes per second. Ties (within 2%) go to the
    /// better ratio: it leaves the link to others.
    pub fn choose(&self, link_bps: f64) -> Codec {
        let best = self
            .candidates
            .iter()
            .map(|c| c.throughput(link_bps))
            .fold(0.0, f64::max);
        self.candidates
            .iter()
            .filter(|c| c.throughput(link_bps) >= best * 0.98)
            .min_by(|a, b| a.ratio.total_cmp(&b.ratio))
            .map_or(Codec::Lz4, |c| c.codec)
    }

    /// The codec a [`Pacer`] starts from: the best if the encoder ran at 1 / [`PACE_HEADROOM`]
    /// of its calibrated speed (which is what choosing for a link that much faster
    /// computes). The calibration ran on an idle core; the best codec for the link alone
    /// only just keeps up there, and falls behind as soon as the encoder shares the
    /// machine. Where the CPU is the limit whatever the codec, this still maximises
    /// throughput (a datacenter link keeps a fast compressor rather than none).
    pub fn choose_paced(&self, link_bps: f64) -> Codec {
        self.choose(link_bps * PACE_HEADROOM)
    }

    /// Learns the ratio a codec achieved on real data.
    pub fn observe(&mut self, codec: Codec, raw: u64, compressed: u64) {
        if raw == 0 {
            return;
        }
        let r = compressed as f64 / raw as f64;
        if let Some(c) = self.candidates.iter_mut().find(|c| c.codec == codec) {
            c.ratio = c.ratio * (1.0 - self.alpha) + r * self.alpha;
        }
    }
}

/// Keeps a pipelined encoder ahead of the link: steps the codec down one candidate when the
/// encoder is not half again as fast as the link, and back up (never above the chooser's pick) when the
/// encoder is far ahead. The chooser's speeds come from a calibration on an idle core; a
/// migration's encoder shares the machine with the guest, the network and, on a test
/// machine, the receiver.
#[derive(Clone, Debug, PartialEq)]
pub struct Pacer {
    at: usize,
    cap: usize,
}

/// How much faster than the link a paced encoder is kept: parts grow only as fast as the
/// encoder outpaces the link.
pub const PACE_HEADROOM: f64 = 1.5;

/// Slowest codec the pacer steps down to (index in [`CANDIDATES`]): lz4. Sending as is would
/// not be faster on a link slow enough for the encoder to fall behind.
const PACER_FLOOR: usize = 1;

impl Pacer {
    /// A pacer starting at `codec`, the strongest it goes back up to; `None` for a codec that
    /// is not one of the candidates (a fixed choice is left alone).
    pub fn new(codec: Codec) -> Option<Self> {
        let at = CANDIDATES.iter().position(|c| *c == codec)?;
        Some(Self { at, cap: at })
    }

    /// The codec for the next piece.
    pub fn codec(&self) -> Codec {
        CANDIDATES[self.at]
    }

    /// The encoder encoded the last piece at `encode_rate` while the link took the one
    /// before it at `link_rate` (in the same unit, e.g. pages per second). Returns the codec
    /// for the pieces to come.
    pub fn observe(&mut self, encode_rate: f64, link_rate: f64) -> Codec {
        if encode_rate < link_rate * PACE_HEADROOM {
            if self.at > PACER_FLOOR.min(self.cap) {
                self.at -= 1;
            }
        } else if encode_rate > link_rate * 3.0 && self.at < self.cap {
            // A stronger codec is commonly 1.5-3x slower: only well ahead is there room.
            self.at += 1;
        }
        self.codec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> Chooser {
        let c = |codec, ratio, e: f64, d: f64| Candidate {
            codec,
            ratio,
            encode_bps: e * 1e6,
            decode_bps: d * 1e6,
        };
        Chooser::new(vec![
            c(Codec::None, 1.0, 20_000.0, 20_000.0),
            c(Codec::Lz4, 0.55, 1000.0, 3000.0),
            c(Codec::Zstd(1), 0.45, 500.0, 1000.0),
            c(Codec::Zstd(9), 0.38, 60.0, 1000.0),
        ])
    }

    #[test]
    fn fast_links_get_fast_codecs_and_slow_links_strong_ones() {
        let ch = fixed();
        // 100 and 10 Gbit/s: no compressor keeps up with the link; sending as is wins.
        assert_eq!(ch.choose(12.5e9), Codec::None);
        assert_eq!(ch.choose(1.25e9), Codec::None);
        // 4 Gbit/s: lz4 moves 500/0.55 = 909 MB/s, more than the 500 MB/s of no compression.
        assert_eq!(ch.choose(500e6), Codec::Lz4);
        // 1 Gbit/s: zstd:1 moves 125/0.45 = 278 MB/s > lz4's 227.
        assert_eq!(ch.choose(125e6), Codec::Zstd(1));
        // 100 Mbit/s: the strongest that keeps up.
        assert_eq!(ch.choose(12.5e6), Codec::Zstd(9));
    }

    #[test]
    fn the_paced_pick_leaves_the_pacers_headroom() {
        let ch = fixed();
        // 20 MB/s: zstd:9 (60 MB/s of input) keeps up with the link's 20 / 0.38 = 53 MB/s,
        // but not with half again as much: the pacer would step it down at once.
        assert_eq!(ch.choose(20e6), Codec::Zstd(9));
        assert_eq!(ch.choose_paced(20e6), Codec::Zstd(1));
        // With room to spare, the same.
        assert_eq!(ch.choose_paced(12.5e6), Codec::Zstd(9));
        // Where the CPU is the limit: lz4 moves 909 MB/s of a 4 Gbit/s link's worth, sending
        // as is 500; at two thirds of its speed lz4 still moves more (667).
        assert_eq!(ch.choose_paced(500e6), Codec::Lz4);
    }

    #[test]
    fn the_pacer_steps_down_when_the_encoder_is_slower_than_the_link_and_back_up_to_the_pick() {
        let mut p = Pacer::new(Codec::Zstd(6)).unwrap();
        // Keeping up with room: no change.
        assert_eq!(p.observe(160.0, 100.0), Codec::Zstd(6));
        assert_eq!(p.observe(250.0, 100.0), Codec::Zstd(6));
        // Behind, or without room: one step at a time, down to lz4 and no further.
        assert_eq!(p.observe(140.0, 100.0), Codec::Zstd(3));
        for _ in 0..10 {
            p.observe(90.0, 100.0);
        }
        assert_eq!(p.codec(), Codec::Lz4);
        // Far ahead: back up, one step at a time, to the chooser's pick and no further.
        assert_eq!(p.observe(400.0, 100.0), Codec::Zstd(-1));
        for _ in 0..10 {
            p.observe(400.0, 100.0);
        }
        assert_eq!(p.codec(), Codec::Zstd(6));
        // Between the two: stays.
        p.observe(90.0, 100.0);
        assert_eq!(p.observe(200.0, 100.0), Codec::Zstd(3));
        // A pick that is not a candidate, and one below the floor, are left alone.
        assert!(Pacer::new(Codec::Zstd(19)).is_none());
        let mut none = Pacer::new(Codec::None).unwrap();
        assert_eq!(none.observe(10.0, 100.0), Codec::None);
    }

    #[test]
    fn learned_ratios_change_the_choice() {
        let mut ch = fixed();
        assert_eq!(ch.choose(12.5e6), Codec::Zstd(9));
        // The data turns out incompressible: every codec's gains vanish as they are observed.
        for _ in 0..50 {
            ch.observe(Codec::Zstd(9), 1000, 1000);
        }
        assert_ne!(ch.choose(12.5e6), Codec::Zstd(9));
    }

    #[test]
    fn calibration_measures_every_candidate() {
        let sample: Vec<u8> = (0..(2u32 << 20)).map(|i| (i / 13 % 200) as u8).collect();
        let ch = Chooser::calibrate(&sample);
        assert_eq!(ch.candidates().len(), CANDIDATES.len());
        for c in ch.candidates() {
            assert!(
                c.encode_bps > 0.0 && c.decode_bps > 0.0 && c.ratio > 0.0,
                "{c:?}"
            );
        }
        let none = &ch.candidates()[0];
        let zstd9 = ch
            .candidates()
            .iter()
            .find(|c| c.codec == Codec::Zstd(9))
            .unwrap();
        assert!(zstd9.ratio < none.ratio / 10.0);
    }
}
