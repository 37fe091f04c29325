//! Block compressors: none, lz4 and zstd at a level.

use std::fmt;
use std::str::FromStr;

use crate::DecodeError;

/// The compressor applied to a block's literal payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Stored as is.
    None,
    /// LZ4 block format: the datacenter choice, gigabytes per second per core.
    Lz4,
    /// Zstandard at a level (negative levels are zstd's fast modes).
    Zstd(i8),
}

/// Levels accepted for zstd; the ends of what libzstd supports that are worth offering.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i8> = -7..=19;

impl Codec {
    /// The codec for a block's text section. Text loses little at zstd's fastest level while
    /// costing as much CPU per byte as code at the next one (`docs/BENCHMARKS.md`), so at
    /// level 2 — the default — text gets level 1.
    pub fn for_text(self) -> Self {
        match self {
            Self::Zstd(2) => Self::Zstd(1),
            other => other,
        }
    }

    pub(crate) fn wire(self) -> (u8, i8) {
        match self {
            Self::None => (0, 0),
            Self::Lz4 => (1, 0),
            Self::Zstd(l) => (2, l),
        }
    }

    pub(crate) fn from_wire(id: u8, level: i8) -> Result<Self, DecodeError> {
        match id {
            0 => Ok(Self::None),
            1 => Ok(Self::Lz4),
            2 if ZSTD_LEVELS.contains(&level) => Ok(Self::Zstd(level)),
            2 => Err(DecodeError::Malformed {
                what: "codec",
                why: "zstd level out of range",
            }),
            _ => Err(DecodeError::Malformed {
                what: "codec",
                why: "unknown codec id",
            }),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Lz4 => f.write_str("lz4"),
            Self::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// Parse error for a codec name.
#[derive(Debug, thiserror::Error)]
#[error("unknown codec `{0}` (expected none, lz4, zstd or zstd:LEVEL with LEVEL in -7..=19)")]
pub struct ParseCodecError(String);

impl FromStr for Codec {
    type Err = ParseCodecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd(3)),
            _ => {
                let level = s
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i8>().ok())
                    .filter(|l| ZSTD_LEVELS.contains(l));
                level
                    .map(Self::Zstd)
                    .ok_or_else(|| ParseCodecError(s.to_owned()))
            }
        }
    }
}

/// Reusable compression state (zstd contexts are expensive to create).
pub(crate) struct Compressor {
    zstd: Option<(i8, zstd::bulk::Compressor<'static>)>,
    scratch: Vec<u8>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor").finish_non_exhaustive()
    }
}

impl Compressor {
    pub(crate) fn new() -> Self {
        Self {
            zstd: None,
            scratch: Vec::new(),
        }
    }

    /// Compresses `input` with `codec` and appends the result to `out`. Returns the codec
    /// actually used: a block that does not shrink is stored, so incompressible (encrypted)
    /// pages cost their size and no decode time.
    pub(crate) fn compress(&mut self, codec: Codec, input: &[u8], out: &mut Vec<u8>) -> Codec {
        let used = match codec {
            Codec::None => None,
            Codec::Lz4 => {
                self.scratch
                    .resize(lz4_flex::block::get_maximum_output_size(input.len()), 0);
                lz4_flex::block::compress_into(input, &mut self.scratch)
                    .ok()
                    .map(|n| (n, Codec::Lz4))
            }
            Codec::Zstd(level) => {
                let ctx = match &mut self.zstd {
                    Some((l, c)) if *l == level => Some(c),
                    slot => zstd::bulk::Compressor::new(i32::from(level))
                        .ok()
                        .map(|c| &mut slot.insert((level, c)).1),
                };
                ctx.and_then(|c| {
                    self.scratch.clear();
                    self.scratch
                        .reserve(zstd::zstd_safe::compress_bound(input.len()));
                    c.compress_to_buffer(input, &mut self.scratch).ok()
                })
                .map(|n| (n, Codec::Zstd(level)))
            }
        };
        match used {
            Some((n, c)) if n < input.len() => {
                out.extend_from_slice(&self.scratch[..n]);
                c
            }
            _ => {
                out.extend_from_slice(input);
                Codec::None
            }
        }
    }
}

/// Reusable decompression state.
pub(crate) struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor").finish_non_exhaustive()
    }
}

impl Decompressor {
    pub(crate) fn new() -> Self {
        Self { zstd: None }
    }

    /// Decompresses `input` into `out`, which must come out exactly `raw_len` bytes long.
    /// `raw_len` has been bounds-checked by the caller, so the allocation is bounded.
    pub(crate) fn decompress(
        &mut self,
        codec: Codec,
        input: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        out.clear();
        match codec {
            Codec::None => {
                if input.len() != raw_len {
                    return Err(DecodeError::Malformed {
                        what: "stored payload",
                        why: "length differs from the declared size",
                    });
                }
                out.extend_from_slice(input);
            }
            Codec::Lz4 => {
                out.resize(raw_len, 0);
                let n = lz4_flex::block::decompress_into(input, out).map_err(|_| {
                    DecodeError::Malformed {
                        what: "lz4 payload",
                        why: "corrupt lz4 block",
                    }
                })?;
                if n != raw_len {
                    return Err(DecodeError::Malformed {
                        what: "lz4 payload",
                        why: "decompressed size differs from the declared size",
                    });
                }
            }
            Codec::Zstd(_) => {
                if self.zstd.is_none() {
                    self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|_| {
                        DecodeError::Malformed {
                            what: "zstd payload",
                            why: "no zstd context",
                        }
                    })?);
                }
                let Some(d) = self.zstd.as_mut() else {
                    return Err(DecodeError::Malformed {
                        what: "zstd payload",
                        why: "no context",
                    });
                };
                out.reserve(raw_len);
                // decompress_to_buffer writes into the spare capacity only and fails rather
                // than growing the vector: a lying frame cannot allocate more.
                let n = d.decompress_to_buffer(input, &mut *out).map_err(|_| {
                    DecodeError::Malformed {
                        what: "zstd payload",
                        why: "corrupt zstd frame",
                    }
                })?;
                if n != raw_len || out.len() != raw_len {
                    return Err(DecodeError::Malformed {
                        what: "zstd payload",
                        why: "decompressed size differs from the declared size",
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_incompressible_is_stored() {
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(100);
        let mut noise = vec![0u8; 4096];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        for codec in [
            Codec::None,
            Codec::Lz4,
            Codec::Zstd(1),
            Codec::Zstd(-3),
            Codec::Zstd(19),
        ] {
            let mut out = Vec::new();
            let used = c.compress(codec, &text, &mut out);
            assert_eq!(used, codec, "text shrinks under {codec}");
            let mut back = Vec::new();
            d.decompress(used, &out, text.len(), &mut back).unwrap();
            assert_eq!(back, text);

            let mut out = Vec::new();
            assert_eq!(c.compress(codec, &noise, &mut out), Codec::None);
            assert_eq!(out, noise);
        }
    }

    #[test]
    fn lying_sizes_are_errors() {
        let text = b"abcabcabcabcabcabcabcabcabcabc".repeat(10);
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        for codec in [Codec::Lz4, Codec::Zstd(3)] {
            let mut out = Vec::new();
            let used = c.compress(codec, &text, &mut out);
            let mut back = Vec::new();
            assert!(d.decompress(used, &out, text.len() - 1, &mut back).is_err());
            assert!(d.decompress(used, &out, text.len() + 1, &mut back).is_err());
            assert!(
                d.decompress(used, &out[..out.len() / 2], text.len(), &mut back)
                    .is_err()
            );
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!("lz4".parse::<Codec>().unwrap(), Codec::Lz4);
        assert_eq!("zstd:-3".parse::<Codec>().unwrap(), Codec::Zstd(-3));
        assert_eq!("zstd".parse::<Codec>().unwrap(), Codec::Zstd(3));
        assert!("zstd:40".parse::<Codec>().is_err());
        assert!("gzip".parse::<Codec>().is_err());
        assert_eq!(Codec::Zstd(-3).to_string(), "zstd:-3");
    }
}
