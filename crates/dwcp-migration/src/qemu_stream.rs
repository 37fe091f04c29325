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

const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_ZERO: u64 = 0x02;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// Offsets within a RAM block beyond this are not plausible (16 TiB).
const MAX_OFFSET: u64 = 1 << 44;

/// One record found at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// Where the next record starts.
    end: usize,
    /// The page bytes, for a page record.
    page: Option<usize>,
    /// The page's offset in its RAM block.
    offset: u64,
    /// Where the block's name is, unless the record continues the previous block.
    name: Option<Range<usize>>,
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
    let mut name_at = None;
    if flags & FLAG_CONTINUE == 0 {
        let len = *buf.get(p)? as usize;
        let name = buf.get(p + 1..p + 1 + len)?;
        if len == 0 || !name.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        name_at = Some(p + 1..p + 1 + len);
        p += 1 + len;
    }
    if kind == FLAG_PAGE {
        (p + PAGE <= buf.len()).then_some(Record {
            end: p + PAGE,
            page: Some(p),
            offset,
            name: name_at,
        })
    } else {
        // QEMU writes a zero page as its header and one byte, 0.
        (buf.get(p) == Some(&0)).then_some(Record {
            end: p + 1,
            page: None,
            offset,
            name: name_at,
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

/// A RAM block of the stream, as its setup section lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's name for it (`pc.ram`, a memory backend's id, ...).
    pub name: String,
    /// Bytes of RAM in the blocks listed before it: where it starts in QEMU's first pass.
    pub start: u64,
    /// Its size (QEMU's `used_length`).
    pub len: u64,
}

/// The RAM blocks listed by the setup section in `head`, the stream's first bytes, if it is
/// there whole. QEMU's `ram_save_setup` writes a section start (`0x01`, the section id, the
/// name `ram`, instance and version), the total RAM with `RAM_SAVE_FLAG_MEM_SIZE`, each
/// block's name and length, then `RAM_SAVE_FLAG_EOS`. Taken only when the lengths add up to
/// the total and the end marker follows: a stream with more per block (the page size under
/// postcopy with huge pages, the address under `x-ignore-shared`) gives `None`.
pub fn ram_blocks(head: &[u8]) -> Option<Vec<RamBlock>> {
    const SECTION_START: u8 = 0x01;
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(head.get(at..at + 8)?.try_into().ok()?))
    };
    let mut from = 0;
    while let Some(i) = head.get(from..)?.windows(4).position(|w| w == b"\x03ram") {
        let at = from + i;
        from = at + 1;
        if at < 5 || head[at - 5] != SECTION_START {
            continue;
        }
        // The name, then instance and version (4 bytes each).
        let mut p = at + 4 + 8;
        let Some(size) = word(p) else { continue };
        if size & 0xfff != FLAG_MEM_SIZE {
            continue;
        }
        let total = size & !0xfff;
        p += 8;
        let mut blocks = Vec::new();
        let mut start = 0u64;
        while start < total {
            let Some(&len) = head.get(p) else { break };
            let len = len as usize;
            let Some(name) = head.get(p + 1..p + 1 + len) else {
                break;
            };
            if len == 0 || !name.iter().all(|b| b.is_ascii_graphic()) {
                break;
            }
            let Some(size) = word(p + 1 + len) else { break };
            if size == 0 || size > total - start {
                break;
            }
            blocks.push(RamBlock {
                name: String::from_utf8_lossy(name).into_owned(),
                start,
                len: size,
            });
            start += size;
            p += 1 + len + 8;
        }
        // QEMU 8.0 and early 8.1 flush multifd channels here even when there are none.
        let end = match word(p) {
            Some(FLAG_MULTIFD_FLUSH) => word(p + 8),
            w => w,
        };
        if start == total && total > 0 && end == Some(FLAG_EOS) {
            return Some(blocks);
        }
    }
    None
}

/// How far QEMU's first pass over RAM has come, from the page and zero-page records read so
/// far. The pass goes through the RAM blocks in the order of the setup section (biggest
/// first), each in address order, and a record's offset counts from the start of its block:
/// the place in the pass is the block's start plus the offset. The block is named by the
/// first record of it (and whenever the block changes); a named record cut by a piece's edge
/// is missed, so once the last page of a block was seen, records without a name belong to
/// the next one.
///
/// Until the setup section is found (or if it is not, within the first MiB), offsets count
/// as they are: right for a guest whose RAM is one block and a few small ones after it.
#[derive(Debug, Default)]
pub struct FirstPass {
    /// The stream's first bytes, until the setup section is found in them.
    head: Vec<u8>,
    /// The head grew past [`HEAD_LIMIT`] without a setup section: no more looking.
    gave_up: bool,
    blocks: Option<Vec<RamBlock>>,
    /// The block of the last record placed, and that record's offset in it.
    current: Option<(usize, u64)>,
    /// The run of records being read began with one that cannot be in the pass: the rest
    /// of the run continues it.
    foreign: bool,
}

/// How much of the stream's start is searched for its setup section.
const HEAD_LIMIT: usize = 1 << 20;

impl FirstPass {
    /// The RAM blocks, once the setup section was read.
    pub fn blocks(&self) -> Option<&[RamBlock]> {
        self.blocks.as_deref()
    }

    /// The guest's RAM, once the setup section was read.
    pub fn total(&self) -> Option<u64> {
        let b = self.blocks.as_ref()?.last()?;
        Some(b.start + b.len)
    }

    /// Reads `buf`, the next piece of the stream: the furthest place in the first pass (bytes
    /// of RAM before the page) of the page and zero-page records in it. Only runs of two
    /// records or more count (a lone record at the end of `buf` could be guest data that
    /// happens to look like one).
    pub fn advance(&mut self, buf: &[u8]) -> Option<u64> {
        if self.blocks.is_none() && !self.gave_up {
            self.head
                .extend_from_slice(&buf[..buf.len().min(HEAD_LIMIT - self.head.len())]);
            self.blocks = ram_blocks(&self.head);
            if self.blocks.is_some() || self.head.len() >= HEAD_LIMIT {
                self.gave_up = self.blocks.is_none();
                self.head = Vec::new();
            }
        }
        let mut highest = None;
        // The first record of the current run, not placed until a second one follows it.
        let mut first: Option<(Option<Range<usize>>, u64)> = None;
        let mut last_end = usize::MAX;
        records(buf, |r, start| {
            if start != last_end {
                self.foreign = false;
                first = Some((r.name.clone(), r.offset));
            } else {
                if let Some((name, offset)) = first.take() {
                    highest = highest.max(self.place(name.map(|n| &buf[n]), offset));
                }
                highest = highest.max(self.place(r.name.clone().map(|n| &buf[n]), r.offset));
            }
            last_end = r.end;
        });
        highest
    }

    /// The place in the first pass of a record at `offset`, named or continuing. A record
    /// that cannot be in the pass (a name not listed, an offset beyond its block: guest data
    /// that looks like a record), and the rest of its run, are not placed and change nothing.
    fn place(&mut self, name: Option<&[u8]>, offset: u64) -> Option<u64> {
        let Some(blocks) = &self.blocks else {
            return Some(offset);
        };
        if self.foreign && name.is_none() {
            return None;
        }
        let i = match name {
            Some(n) => {
                let i = blocks.iter().position(|b| b.name.as_bytes() == n);
                let Some(i) = i.filter(|&i| offset < blocks[i].len) else {
                    self.foreign = true;
                    return None;
                };
                // A true record ends what guest data began.
                self.foreign = false;
                i
            }
            None => {
                let (i, last) = self.current?;
                // Not on an offset lower than the last one alone: a few bytes of guest data
                // that look like records with low offsets are common enough to move the
                // pass to the next block 400 MB early (`internet`, 2026-12-04).
                let ended = last + PAGE as u64 >= blocks[i].len;
                if ended && blocks.get(i + 1).is_some_and(|b| offset < b.len) {
                    i + 1
                } else {
                    i
                }
            }
        };
        let b = &blocks[i];
        if offset >= b.len {
            return None;
        }
        self.current = Some((i, offset));
        Some(b.start + offset)
    }
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

/// Streams for tests, here and in the tunnel's.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn header(offset: u64, flags: u64, name: Option<&str>) -> Vec<u8> {
        let mut v = (offset << 12 | flags).to_be_bytes().to_vec();
        if let Some(n) = name {
            v.push(n.len() as u8);
            v.extend_from_slice(n.as_bytes());
        }
        v
    }

    pub(crate) fn page(seed: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    /// A stream with a setup section listing `blocks` (name, pages), then every page of
    /// each block in order (page and zero-page records by turns), then more state (`flush`:
    /// with QEMU 8.0's multifd flush in the setup). Returns it and the place in the first
    /// pass of each record's end.
    pub(crate) fn stream_with_setup(
        blocks: &[(&str, u64)],
        flush: bool,
    ) -> (Vec<u8>, Vec<(usize, u64)>) {
        let total: u64 = blocks.iter().map(|b| b.1 * PAGE as u64).sum();
        let mut s = b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0dpc-i440fx-7.2".to_vec();
        s.push(0x01);
        s.extend(2u32.to_be_bytes());
        s.extend(b"\x03ram");
        s.extend(0u32.to_be_bytes());
        s.extend(4u32.to_be_bytes());
        s.extend((total | FLAG_MEM_SIZE).to_be_bytes());
        for (name, pages) in blocks {
            s.push(name.len() as u8);
            s.extend(name.as_bytes());
            s.extend((pages * PAGE as u64).to_be_bytes());
        }
        if flush {
            // QEMU 8.0's multifd flush, written with multifd off too.
            s.extend(FLAG_MULTIFD_FLUSH.to_be_bytes());
        }
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend(b"\x02\x00\x00\x00\x02");
        let mut ends = Vec::new();
        let mut start = 0;
        for (b, (name, pages)) in blocks.iter().enumerate() {
            for i in 0..*pages {
                let named = (i == 0).then_some(*name);
                let cont = if named.is_some() { 0 } else { FLAG_CONTINUE };
                if (i + b as u64).is_multiple_of(2) {
                    s.extend(header(i, FLAG_PAGE | cont, named));
                    s.extend(page((i as u8).wrapping_add(1)));
                } else {
                    s.extend(header(i, FLAG_ZERO | cont, named));
                    s.push(0);
                }
                ends.push((s.len(), start + i * PAGE as u64));
            }
            start += pages * PAGE as u64;
        }
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend(b"\x03\x00\x00\x00\x02 more state");
        (s, ends)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

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
    fn without_a_setup_section_offsets_count_as_they_are() {
        let furthest = |b: &[u8]| FirstPass::default().advance(b);
        let (s, _) = stream();
        // No setup section: offsets as they are.
        assert_eq!(furthest(&s), Some(11 << 12));
        // A run of zero pages only (an untouched tail of RAM).
        let mut z = Vec::new();
        z.extend(header(1000, FLAG_ZERO, Some("pc.ram")));
        z.push(0);
        for i in 1001..1100 {
            z.extend(header(i, FLAG_ZERO | FLAG_CONTINUE, None));
            z.push(0);
        }
        assert_eq!(furthest(&z), Some(1099 << 12));
        assert_eq!(furthest(b"no records here, only device state"), None);
        // A lone record-like word at the end is not taken.
        let mut lone = b"guest data ".to_vec();
        lone.extend(header(900 << 8, FLAG_ZERO | FLAG_CONTINUE, None));
        lone.push(0);
        assert_eq!(page_spans(&lone), Vec::<Range<usize>>::new());
        assert_eq!(furthest(&lone), None);
    }

    #[test]
    fn the_setup_section_lists_the_blocks_or_nothing() {
        let (s, _) = stream_with_setup(&[("pc.ram", 6), ("vga.vram", 3), ("pc.bios", 2)], false);
        let blocks = ram_blocks(&s).unwrap();
        let got: Vec<(&str, u64, u64)> = blocks
            .iter()
            .map(|b| (b.name.as_str(), b.start, b.len))
            .collect();
        assert_eq!(
            got,
            [
                ("pc.ram", 0, 6 << 12),
                ("vga.vram", 6 << 12, 3 << 12),
                ("pc.bios", 9 << 12, 2 << 12)
            ]
        );
        // Cut short, or lengths that do not add up to the total: nothing.
        let end = s.windows(7).position(|w| w == b"pc.bios").unwrap() + 7 + 8;
        assert!(ram_blocks(&s[..end]).is_none());
        assert!(ram_blocks(&s[..end + 8]).is_some());
        let mut bad = s;
        bad[end - 1] ^= 0x10; // pc.bios one page longer
        assert!(ram_blocks(&bad).is_none());
        assert!(ram_blocks(b"QEVM no setup here").is_none());
        assert!(ram_blocks(&[]).is_none());
        // QEMU 8.0's multifd flush before the end marker.
        let (s, _) = stream_with_setup(&[("pc.ram", 6), ("pc.bios", 2)], true);
        assert_eq!(ram_blocks(&s).map(|b| b.len()), Some(2));
    }

    #[test]
    fn the_first_pass_counts_across_blocks_wherever_the_stream_is_cut() {
        let blocks = [("pc.ram", 6), ("vga.vram", 3), ("pc.bios", 2)];
        let (s, ends) = stream_with_setup(&blocks, false);
        let total = 11 * PAGE as u64;
        // Whole: the last page of the last block.
        let mut pass = FirstPass::default();
        assert_eq!(pass.advance(&s), Some(total - PAGE as u64));
        assert_eq!(pass.total(), Some(total));
        // Offsets alone would say 5 pages (the last of pc.ram).
        // Cut in two anywhere, also inside a named record: never further than the records
        // read, and at least to the last page before the last block.
        let last_block = 9 * PAGE as u64;
        for cut in 1..s.len() {
            let mut pass = FirstPass::default();
            let mut furthest = None;
            for (from, to) in [(0, cut), (cut, s.len())] {
                let at = pass.advance(&s[from..to]);
                let done = ends.iter().filter(|e| e.0 <= to).map(|e| e.1).max();
                assert!(at <= done, "cut at {cut}: {at:?} beyond {done:?}");
                furthest = furthest.max(at);
            }
            // Whole when the last two records are both in one piece.
            if cut <= ends[ends.len() - 3].0 {
                assert_eq!(furthest, Some(total - PAGE as u64), "cut at {cut}");
            } else {
                assert!(
                    furthest >= Some(last_block - PAGE as u64),
                    "cut at {cut}: {furthest:?}"
                );
            }
        }
    }

    #[test]
    fn after_a_blocks_last_page_unnamed_records_are_the_next_blocks() {
        let (s, ends) = stream_with_setup(&[("m0", 4), ("m1", 4)], false);
        let total = 8 * PAGE as u64;
        // Cut within m1's first record, which names it: the rest of m1 continues unnamed.
        for cut in ends[3].0 + 1..ends[4].0 {
            let mut pass = FirstPass::default();
            let a = pass.advance(&s[..cut]);
            let b = pass.advance(&s[cut..]);
            assert_eq!(a, Some(3 * PAGE as u64), "cut at {cut}");
            assert_eq!(b, Some(total - PAGE as u64), "cut at {cut}");
        }
    }

    #[test]
    fn records_that_cannot_be_in_the_pass_change_nothing() {
        let (setup, _) = stream_with_setup(&[("m0", 64), ("m1", 64)], false);
        // Zero-page records, named or not, in runs separated by other bytes.
        type Runs<'a> = &'a [&'a [(u64, Option<&'a str>)]];
        let runs = |runs: Runs<'_>| {
            let mut s = Vec::new();
            for run in runs {
                for &(i, name) in *run {
                    let cont = if name.is_some() { 0 } else { FLAG_CONTINUE };
                    s.extend(header(i, FLAG_ZERO | cont, name));
                    s.push(0);
                }
                s.extend(b"guest data");
            }
            s
        };
        let mut pass = FirstPass::default();
        let mut s = setup[..86].to_vec(); // the header, the setup section, a section's start
        s.extend(runs(&[&[(0, Some("m0")), (1, None)]]));
        assert_eq!(pass.advance(&s), Some(PAGE as u64));
        let page = |n: u64| Some(n * PAGE as u64);
        let steps: [(&str, Runs<'_>, Option<u64>); 8] = [
            (
                "guest data like records of a block not listed, then m0 goes on",
                &[
                    &[(5, Some("zz")), (6, None), (7, None)],
                    &[(2, None), (3, None)],
                ],
                page(3),
            ),
            (
                "an offset beyond m0 (named): not placed; m0 goes on",
                &[&[(900, Some("m0")), (901, None)], &[(4, None), (5, None)]],
                page(5),
            ),
            ("further on in m0", &[&[(29, None), (30, None)]], page(30)),
            (
                "lower down but not near a block's start: still m0 (below what was seen)",
                &[&[(20, None), (21, None)]],
                page(21),
            ),
            ("m0 goes on", &[&[(31, None), (32, None)]], page(32)),
            (
                "lower and near a block's start: still m0 (m0's last page was not seen)",
                &[&[(1, None), (2, None)]],
                page(2),
            ),
            ("m0 goes on", &[&[(33, None), (34, None)]], page(34)),
            (
                "a record of m0 right after one of a block not listed: m0 goes on",
                &[&[(5, Some("zz")), (40, Some("m0")), (41, None)]],
                page(41),
            ),
        ];
        for (what, r, want) in steps {
            assert_eq!(pass.advance(&runs(r)), want, "{what}");
        }
        // A zero page's byte is 0: anything else is not a record.
        let mut t = Vec::new();
        for i in 3..6 {
            t.extend(header(i, FLAG_ZERO | FLAG_CONTINUE, None));
            t.push(7);
        }
        assert_eq!(pass.advance(&t), None);
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
            plant in proptest::collection::vec((0usize..20_000, 0u8..3, 0u64..8), 0..6),
        ) {
            // Plant runs of records at random places (named m0, m1 or pc.ram, or continuing,
            // at any offset), so the chain logic and the first pass run on junk too.
            for (at, kind, offset) in plant {
                let mut h = match kind {
                    0 => header(offset, FLAG_ZERO, Some("m0")),
                    1 => header(offset, FLAG_ZERO, Some(if offset % 2 == 0 { "m1" } else { "pc.ram" })),
                    _ => header(offset, FLAG_ZERO | FLAG_CONTINUE, None),
                };
                h.push(0);
                h.extend(header(offset + 1, FLAG_ZERO | FLAG_CONTINUE, None));
                h.push(0);
                if at + h.len() <= bytes.len() {
                    bytes[at..at + h.len()].copy_from_slice(&h);
                }
            }
            // The first pass never places a record beyond RAM, whatever follows the setup.
            let (mut with_setup, _) = stream_with_setup(&[("m0", 3), ("m1", 2)], false);
            with_setup.truncate(86); // the header, the setup section, a section's start
            proptest::prop_assert!(ram_blocks(&with_setup).is_some());
            with_setup.extend_from_slice(&bytes);
            let mut pass = FirstPass::default();
            for piece in with_setup.chunks(4099) {
                if let Some(at) = pass.advance(piece) {
                    proptest::prop_assert!(at < 5 * PAGE as u64);
                }
            }
            proptest::prop_assert_eq!(pass.total(), Some(5 * PAGE as u64));
            let spans = page_spans(&bytes);
            let mut end = 0;
            for r in spans {
                proptest::prop_assert!(r.start >= end && r.end <= bytes.len() && r.len() == PAGE);
                end = r.end;
            }
        }
    }
}
