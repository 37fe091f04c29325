//! Where the guest pages are in a piece of QEMU's migration stream.
//!
//! QEMU sends RAM as records: a big-endian 64-bit word holding the page's offset in its RAM
//! block and flags in the low 12 bits, the block's name unless the record continues the
//! previous block (`u8` length, then the name), then the 4 KiB page (`RAM_SAVE_FLAG_PAGE`) or
//! one fill byte (`RAM_SAVE_FLAG_ZERO`) (QEMU's `migration/ram.c`, `save_page_header`). The
//! tunnel cuts the stream wherever QEMU's writes fall, and the encoder's content-defined
//! chunks then span a page, its header and its neighbours: a page that changed spoils the
//! chunk around it, and a page held by the destination (from an earlier migration, or a
//! seeded base image) is only found if its neighbours are the same as before. Finding the
//! pages lets the encoder cut exactly at them.
//!
//! This only finds: it never changes a byte. A run of records is accepted once two chain
//! (one ends where the next begins); anything else (device state, a record cut by the
//! segment's edge, a false start) is ordinary input, so a wrong guess costs compression,
//! never correctness.

use std::ops::Range;

/// Guest page size of the records (x86 targets).
pub const PAGE: usize = 4096;

const FLAG_ZERO: u64 = 0x02;
const FLAG_PAGE: u64 = 0x08;
const FLAG_CONTINUE: u64 = 0x20;
/// Offsets within a RAM block beyond this are not plausible (16 TiB).
const MAX_OFFSET: u64 = 1 << 44;

/// One record found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    /// Where the next record starts.
    end: usize,
    /// The page bytes, for a page record.
    page: Option<usize>,
    /// The page's offset in its RAM block.
    offset: u64,
}

/// The record at `at`, if the bytes there look like a page or zero-page record that ends
/// within `buf`.
fn record(buf: &[u8], at: usize) -> Option<Record> {
    let word = buf.get(at..at + 8)?;
    let h = u64::from_be_bytes(word.try_into().ok()?);
    let flags = h & 0xfff;
    let offset = h & !0xfff;
    if offset >= MAX_OFFSET {
        return None;
    }
    let kind = flags & !FLAG_CONTINUE;
    if kind != FLAG_PAGE && kind != FLAG_ZERO {
        return None;
    }
    let mut p = at + 8;
    if flags & FLAG_CONTINUE == 0 {
        let len = *buf.get(p)? as usize;
        let name = buf.get(p + 1..p + 1 + len)?;
        if len == 0 || !name.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        p += 1 + len;
    }
    if kind == FLAG_PAGE {
        (p + PAGE <= buf.len()).then_some(Record {
            end: p + PAGE,
            page: Some(p),
            offset,
        })
    } else {
        (p < buf.len()).then_some(Record {
            end: p + 1,
            page: None,
            offset,
        })
    }
}

/// The byte ranges of whole guest pages in `buf`, in order and not overlapping.
pub fn page_spans(buf: &[u8]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    records(buf, |r, _| {
        if let Some(p) = r.page {
            spans.push(p..p + PAGE);
        }
    });
    spans
}

/// The highest RAM offset of the page and zero-page records in `buf`: during QEMU's first
/// pass over RAM (block by block, biggest block first, each in address order) it says how far
/// the pass has come.
/// Only runs of two records or more count (a lone record at the end of `buf` could be guest
/// data that happens to look like one).
pub fn highest_offset(buf: &[u8]) -> Option<u64> {
    let mut highest = None;
    let mut run: Option<(u64, usize)> = None; // (highest offset, records) of the current run
    let mut last_end = usize::MAX;
    records(buf, |r, start| {
        let (h, n) = match run {
            Some((h, n)) if start == last_end => (h.max(r.offset), n + 1),
            _ => (r.offset, 1),
        };
        run = Some((h, n));
        last_end = r.end;
        if n >= 2 {
            highest = highest.max(Some(h));
        }
    });
    highest
}

/// Calls `f` for each record of the runs found in `buf`, in order, with where it starts.
fn records(buf: &[u8], mut f: impl FnMut(&Record, usize)) {
    let mut at = 0;
    while at + 8 <= buf.len() {
        let Some(first) = record(buf, at) else {
            at += 1;
            continue;
        };
        // A lone match may be chance: accept it when the next record follows it, or when
        // the buffer ends before the next one could.
        let chained = first.end + 8 > buf.len() || record(buf, first.end).is_some();
        if !chained {
            at += 1;
            continue;
        }
        let mut r = first;
        loop {
            f(&r, at);
            at = r.end;
            match record(buf, at) {
                Some(next) => r = next,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offset: u64, flags: u64, name: Option<&str>) -> Vec<u8> {
        let mut v = (offset << 12 | flags).to_be_bytes().to_vec();
        if let Some(n) = name {
            v.push(n.len() as u8);
            v.extend_from_slice(n.as_bytes());
        }
        v
    }

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    /// Device state, a RAM part with named and continued page and zero records, more state.
    fn stream() -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut s = b"QEVM\x00\x00\x00\x03 some device state \x01\x02".to_vec();
        let pages: Vec<Vec<u8>> = (1..=5).map(page).collect();
        s.extend(header(7, FLAG_PAGE, Some("pc.ram")));
        s.extend(&pages[0]);
        s.extend(header(8, FLAG_PAGE | FLAG_CONTINUE, None));
        s.extend(&pages[1]);
        s.extend(header(9, FLAG_ZERO | FLAG_CONTINUE, None));
        s.push(0);
        s.extend(header(10, FLAG_PAGE | FLAG_CONTINUE, None));
        s.extend(&pages[2]);
        s.extend(header(0, FLAG_PAGE, Some("vga.vram")));
        s.extend(&pages[3]);
        s.extend(header(11, FLAG_PAGE | FLAG_CONTINUE, None));
        s.extend(&pages[4]);
        s.extend(0x10u64.to_be_bytes()); // end of section
        s.extend(b"\x03\x00\x00\x00\x02 more state");
        (s, pages)
    }

    #[test]
    fn finds_every_whole_page_and_nothing_else() {
        let (s, pages) = stream();
        let spans = page_spans(&s);
        let found: Vec<&[u8]> = spans.iter().map(|r| &s[r.clone()]).collect();
        let want: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
        assert_eq!(found, want);
    }

    #[test]
    fn the_highest_offset_counts_zero_pages_and_every_block() {
        let (s, _) = stream();
        assert_eq!(highest_offset(&s), Some(11 << 12));
        // A run of zero pages only (an untouched tail of RAM).
        let mut z = Vec::new();
        z.extend(header(1000, FLAG_ZERO, Some("pc.ram")));
        z.push(0);
        for i in 1001..1100 {
            z.extend(header(i, FLAG_ZERO | FLAG_CONTINUE, None));
            z.push(0);
        }
        assert_eq!(highest_offset(&z), Some(1099 << 12));
        assert_eq!(highest_offset(b"no records here, only device state"), None);
        // A lone record-like word at the end is not taken.
        let mut lone = b"guest data ".to_vec();
        lone.extend(header(900 << 8, FLAG_ZERO | FLAG_CONTINUE, None));
        lone.push(0);
        assert_eq!(page_spans(&lone), Vec::<Range<usize>>::new());
        assert_eq!(highest_offset(&lone), None);
    }

    #[test]
    fn a_piece_cut_anywhere_yields_only_true_pages() {
        let (s, pages) = stream();
        for start in (0..s.len()).step_by(97) {
            for end in [start + 5000, start + 9000, s.len()] {
                let piece = &s[start..end.min(s.len())];
                for r in page_spans(piece) {
                    assert!(
                        pages.iter().any(|p| p.as_slice() == &piece[r.clone()]),
                        "a false page at {start}+{r:?}"
                    );
                }
            }
        }
        // Cut in the middle of the first page's header: the others are still found.
        assert_eq!(page_spans(&s[40..]).len(), 4);
    }

    #[test]
    fn random_bytes_and_zeros_hold_no_pages() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(page_spans(&noise).is_empty());
        assert!(page_spans(&vec![0u8; 1 << 20]).is_empty());
        assert!(page_spans(&[]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_give_ordered_in_bounds_pages(
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20_000),
            plant in proptest::collection::vec((0usize..20_000, proptest::prelude::any::<bool>()), 0..6),
        ) {
            // Plant record headers at random places, so the chain logic runs on junk too.
            for (at, cont) in plant {
                let h = if cont { header(3, FLAG_PAGE | FLAG_CONTINUE, None) } else { header(3, FLAG_PAGE, Some("pc.ram")) };
                if at + h.len() <= bytes.len() {
                    bytes[at..at + h.len()].copy_from_slice(&h);
                }
            }
            let spans = page_spans(&bytes);
            let mut end = 0;
            for r in spans {
                proptest::prop_assert!(r.start >= end && r.end <= bytes.len() && r.len() == PAGE);
                end = r.end;
            }
        }
    }
}
