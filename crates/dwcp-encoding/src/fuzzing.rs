//! Fuzz bodies, shared by the cargo-fuzz targets in `fuzz/` and the proptests below, so that
//! stable CI runs the same checks without nightly.

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "fuzz bodies report a failed check by panicking, as libFuzzer expects"
)]

use crate::image::{Corpus, ImageSpec, generate};
use crate::page::{EncoderConfig, PageDecoder, PageEncoder};
use crate::stream::{Progress, StreamConfig, StreamDecoder, StreamEncoder};
use crate::{Codec, MemStore, NoCache, RemoteIndex};

/// Pages in the destination of [`page_object`].
pub const FUZZ_PAGES: u64 = 64;

/// Decodes arbitrary bytes as a page object into a 64-page store (fed in two pieces split at
/// the first byte's value, to exercise buffering). Checks: no panic.
pub fn page_object(data: &[u8]) {
    let mut store = MemStore::zeroed(FUZZ_PAGES, 512);
    let mut dec = PageDecoder::new();
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    if dec.push(&data[..split], &mut store, &mut NoCache).is_ok() {
        let _ = dec.push(&data[split..], &mut store, &mut NoCache);
    }
    let _ = dec.finish();
}

/// Decodes arbitrary bytes as a stream object. Checks: no panic, output bounded by what the
/// input can describe.
pub fn stream_object(data: &[u8]) {
    let mut dec = StreamDecoder::new();
    let mut out = Vec::new();
    match dec.push(data, &mut out, &mut NoCache) {
        Ok(Progress::Need { .. } | Progress::Ready | Progress::Done) | Err(_) => {}
    }
    let _ = dec.finish();
    assert_eq!(out.len() as u64, dec.bytes_out());
}

/// Decodes arbitrary bytes as a cache summary.
pub fn summary(data: &[u8]) {
    if let Ok(idx) = RemoteIndex::decode(data) {
        assert!(idx.len() <= data.len());
    }
}

/// Uses the bytes as page contents (512-byte pages, the first page as the base of every
/// other) and checks that encoding then decoding gives them back, with every codec.
pub fn page_round_trip(data: &[u8]) {
    let ps = 512;
    let pages = (data.len() / ps).min(FUZZ_PAGES as usize);
    if pages < 2 {
        return;
    }
    let base: Vec<u8> = data[..ps].repeat(pages);
    let image = &data[..pages * ps];
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1)] {
        let cfg = EncoderConfig {
            page_size: ps,
            codec,
            block_bytes: 4 * ps,
            ..EncoderConfig::new(pages as u64)
        };
        let mut enc = PageEncoder::new(cfg).unwrap();
        let mut out = Vec::new();
        for p in 0..pages {
            let r = p * ps..(p + 1) * ps;
            enc.push(p as u64, &image[r.clone()], Some(&base[r]), None, &mut out)
                .unwrap();
        }
        enc.finish(&mut out);
        let mut store = MemStore::from_vec(base.clone(), ps);
        let mut dec = PageDecoder::new();
        dec.push(&out, &mut store, &mut NoCache).unwrap();
        dec.finish().unwrap();
        assert!(dec.missing().is_empty());
        assert_eq!(store.as_slice(), image);
    }
}

/// Valid objects to start fuzzing from: a page object (cold and warm) and a stream object.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let img = generate(
        &ImageSpec {
            page_size: 512,
            ..ImageSpec::new(FUZZ_PAGES * 512)
        },
        &mut Corpus::synthetic(),
    );
    let mut seeds = Vec::new();
    for (name, base) in [
        ("page-cold", None),
        ("page-warm", Some(vec![7u8; img.data.len()])),
    ] {
        let cfg = EncoderConfig {
            page_size: 512,
            block_bytes: 8 * 512,
            codec: Codec::Lz4,
            ..EncoderConfig::new(FUZZ_PAGES)
        };
        let mut enc = PageEncoder::new(cfg).unwrap();
        let mut out = Vec::new();
        for p in 0..FUZZ_PAGES as usize {
            let b = base.as_ref().map(|b| &b[p * 512..(p + 1) * 512]);
            enc.push(
                p as u64,
                &img.data[p * 512..(p + 1) * 512],
                b,
                None,
                &mut out,
            )
            .unwrap();
        }
        enc.finish(&mut out);
        seeds.push((name, out));
    }
    let mut enc = StreamEncoder::new(StreamConfig {
        min_chunk: 64,
        avg_chunk: 256,
        max_chunk: 1024,
        block_bytes: 4096,
        ..StreamConfig::default()
    })
    .unwrap();
    let mut out = Vec::new();
    enc.push(&img.data, None, &mut out);
    enc.push(&img.data[..4096], None, &mut out);
    enc.finish(None, &mut out);
    seeds.push(("stream", out));
    let mut hs = vec![1u64, 99, u64::MAX];
    let mut s = Vec::new();
    RemoteIndex::encode(&mut hs, &mut s);
    seeds.push(("summary", s));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            page_object(&data);
            stream_object(&data);
            summary(&data);
            page_round_trip(&data);
        }

        /// Valid objects with a few bytes changed: deeper paths than random bytes reach.
        #[test]
        fn mutated_seeds(which in 0usize..4, flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let (_, mut obj) = seeds().swap_remove(which);
            for (i, v) in flips {
                let at = i.index(obj.len());
                obj[at] ^= v | 1;
            }
            page_object(&obj);
            stream_object(&obj);
            summary(&obj);
        }
    }

    /// The seeds are also the starting corpus of the cargo-fuzz targets, committed under
    /// `fuzz/corpus/hde_*` (`DWCP_BLESS_CORPUS=1` rewrites them after a format change).
    #[test]
    fn fuzz_corpus_matches_the_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let bless = std::env::var_os("DWCP_BLESS_CORPUS").is_some();
        for target in ["hde_page", "hde_stream", "hde_summary"] {
            for (name, bytes) in seeds() {
                let path = root.join(target).join(format!("seed-{name}"));
                if bless {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                }
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (bless with DWCP_BLESS_CORPUS=1)", path.display())
                });
                assert!(
                    on_disk == bytes,
                    "{} is stale (bless with DWCP_BLESS_CORPUS=1)",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn seeds_decode_cleanly() {
        for (name, obj) in seeds() {
            match name {
                "stream" => {
                    let mut dec = StreamDecoder::new();
                    assert_eq!(
                        dec.push(&obj, &mut Vec::new(), &mut NoCache).unwrap(),
                        Progress::Done
                    );
                }
                "summary" => assert_eq!(RemoteIndex::decode(&obj).unwrap().len(), 3),
                _ => {
                    let mut store = MemStore::from_vec(vec![7u8; FUZZ_PAGES as usize * 512], 512);
                    let mut dec = PageDecoder::new();
                    dec.push(&obj, &mut store, &mut NoCache).unwrap();
                    dec.finish().unwrap();
                }
            }
        }
    }
}
