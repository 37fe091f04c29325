//! The page path: page-addressed objects (memory regions, disk images) encoded in levels.
//!
//! Each page becomes the cheapest of: a zero run, a "same as the receiver's copy" run, a
//! reference to a page already sent in this object, a reference by strong hash to the
//! receiver's baseline cache, a sparse XOR delta against the receiver's copy of the same
//! address, or a literal. Literals and deltas of a block are compressed together. The format
//! is specified in `docs/PROTOCOL.md` ("HDE page objects").

use std::collections::HashMap;

use crate::buf::{Reader, put_varint, unzigzag, zigzag};
use crate::codec::{Codec, Compressor, Decompressor};
use crate::hash::{Key, PassThroughBuild, fast128, is_zero};
use crate::remote::RemoteIndex;
use crate::store::{ContentSource, PageStore};
use crate::{DecodeError, FORMAT_VERSION};

/// Magic of a page object.
pub const PAGE_MAGIC: [u8; 4] = *b"HDEP";
/// Smallest page size (512 B).
pub const MIN_PAGE_SHIFT: u8 = 9;
/// Largest page size (64 KiB).
pub const MAX_PAGE_SHIFT: u8 = 16;
/// Most operations one block may hold.
pub const MAX_BLOCK_OPS: usize = 8192;
/// Largest decompressed payload of one section of a block.
pub const MAX_BLOCK_RAW: usize = 8 << 20;
/// Payload sections of a block: structured (binary pages, deltas), text, stored.
pub const SECTIONS: usize = 3;
pub(crate) const SECT_BINARY: u8 = 0;
pub(crate) const SECT_TEXT: u8 = 1;
pub(crate) const SECT_STORED: u8 = 2;
/// Largest operations section of one block (no op encodes in more than 32 bytes).
pub const MAX_OPS_BYTES: usize = MAX_BLOCK_OPS * 32;
/// A partial unit can never exceed one maximal block; more bytes without a whole unit in
/// them are garbage, not a block still arriving.
pub(crate) const MAX_UNIT: usize = SECTIONS * MAX_BLOCK_RAW + MAX_OPS_BYTES + 64;
/// Most pages one object may address (2^40 pages: 4 PiB at 4 KiB).
pub const MAX_PAGES: u64 = 1 << 40;

pub(crate) const TAG_END: u8 = 0;
pub(crate) const TAG_BLOCK: u8 = 1;

const OP_ZERO: u8 = 0;
const OP_SAME: u8 = 1;
const OP_DUP: u8 = 2;
const OP_CACHE: u8 = 3;
const OP_XOR: u8 = 4;
const OP_LIT: u8 = 5;

/// How to encode a page object.
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    /// Page size in bytes, a power of two from 512 to 64 KiB.
    pub page_size: usize,
    /// Pages in the object (addresses are `0..pages`).
    pub pages: u64,
    /// Compressor for literals and deltas.
    pub codec: Codec,
    /// Target uncompressed size of a block's largest section.
    pub block_bytes: usize,
}

impl EncoderConfig {
    /// 4 KiB pages, zstd level 2, 2 MiB sections.
    pub fn new(pages: u64) -> Self {
        Self {
            page_size: 4096,
            pages,
            codec: Codec::Zstd(2),
            block_bytes: 2 << 20,
        }
    }

    fn page_shift(&self) -> Result<u8, ConfigError> {
        let ps = self.page_size;
        if !ps.is_power_of_two() {
            return Err(ConfigError("page size must be a power of two"));
        }
        let shift = ps.trailing_zeros() as u8;
        if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&shift) {
            return Err(ConfigError("page size must be between 512 B and 64 KiB"));
        }
        if self.pages > MAX_PAGES {
            return Err(ConfigError("object has more than 2^40 pages"));
        }
        if self.block_bytes < ps || self.block_bytes > MAX_BLOCK_RAW - 2 * ps {
            return Err(ConfigError("block size must be between one page and 8 MiB"));
        }
        Ok(shift)
    }
}

/// An invalid [`EncoderConfig`].
#[derive(Debug, thiserror::Error)]
#[error("invalid HDE encoder configuration: {0}")]
pub struct ConfigError(&'static str);

impl ConfigError {
    pub(crate) fn new(why: &'static str) -> Self {
        Self(why)
    }
}

/// Misuse of the encoder by its caller.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A page of the wrong length.
    #[error("page {addr} is {len} bytes, expected {expected}")]
    PageLength {
        /// Address.
        addr: u64,
        /// Its length.
        len: usize,
        /// The page size.
        expected: usize,
    },
    /// An address outside the object.
    #[error("page {addr} is outside the object of {pages} pages")]
    OutOfRange {
        /// Address.
        addr: u64,
        /// Object size in pages.
        pages: u64,
    },
    /// The same address twice in one object.
    #[error("page {0} was already encoded in this object")]
    Repeated(u64),
    /// A base page of the wrong length.
    #[error("base page {0} has the wrong length")]
    BaseLength(u64),
}

/// Pages and bytes per level, for reports and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages pushed.
    pub pages: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages equal to the receiver's copy.
    pub same: u64,
    /// Pages equal to one sent earlier in this object.
    pub dup: u64,
    /// Pages found in the receiver's baseline cache.
    pub cache: u64,
    /// Pages sent as XOR deltas.
    pub xor: u64,
    /// Delta bytes of those pages before compression.
    pub xor_bytes: u64,
    /// Pages sent literally.
    pub literal: u64,
    /// Of those, pages that looked incompressible and were stored without trying.
    pub stored: u64,
    /// Payload bytes (literals + deltas) before compression.
    pub payload_raw: u64,
    /// Payload bytes after compression.
    pub payload_compressed: u64,
    /// Bytes written in total (headers, operations, payload).
    pub bytes_out: u64,
}

impl EncodeStats {
    /// Bytes of input represented.
    pub fn bytes_in(&self, page_size: usize) -> u64 {
        self.pages * page_size as u64
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RunKind {
    Zero,
    Same,
    Lit(u8),
}

#[allow(missing_debug_implementations)]
struct Run {
    kind: RunKind,
    start: u64,
    count: u64,
    check: xxhash_rust::xxh3::Xxh3Default,
}

/// Encodes one page object. Push pages in any order, each address at most once, then
/// [`finish`](Self::finish). Output is appended to the caller's buffer block by block, so it
/// can be handed to the transport as it grows.
pub struct PageEncoder {
    cfg: EncoderConfig,
    shift: u8,
    comp: Compressor,
    /// Fast hash of each distinct page sent in this object -> its address.
    sent: HashMap<u128, u64, PassThroughBuild>,
    /// Addresses already pushed (one bit per page).
    pushed: Vec<u64>,
    ops: Vec<u8>,
    n_ops: usize,
    /// Address the previous op ended at (ops carry deltas from it).
    next: u64,
    sections: [Vec<u8>; SECTIONS],
    run: Option<Run>,
    scratch: Vec<u8>,
    stats: EncodeStats,
    started: bool,
}

impl std::fmt::Debug for PageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageEncoder")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PageEncoder {
    /// An encoder for one object.
    pub fn new(cfg: EncoderConfig) -> Result<Self, ConfigError> {
        let shift = cfg.page_shift()?;
        let words = usize::try_from(cfg.pages.div_ceil(64))
            .map_err(|_| ConfigError("object too large for this machine"))?;
        Ok(Self {
            shift,
            comp: Compressor::new(),
            sent: HashMap::default(),
            pushed: vec![0; words],
            ops: Vec::with_capacity(4096),
            n_ops: 0,
            next: 0,
            sections: std::array::from_fn(|_| Vec::with_capacity(cfg.block_bytes + cfg.page_size)),
            run: None,
            scratch: Vec::new(),
            stats: EncodeStats::default(),
            started: false,
            cfg,
        })
    }

    /// What has been encoded so far.
    pub fn stats(&self) -> &EncodeStats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Changes the compressor from the next block on (the codec chooser's hook).
    pub fn set_codec(&mut self, codec: Codec) {
        self.cfg.codec = codec;
    }

    fn header(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            let start = out.len();
            out.extend_from_slice(&PAGE_MAGIC);
            out.push(FORMAT_VERSION);
            out.push(self.shift);
            put_varint(out, self.cfg.pages);
            self.stats.bytes_out += (out.len() - start) as u64;
            self.started = true;
        }
    }

    /// Encodes the page at `addr`. `base` is the sender's copy of what the receiver holds at
    /// that address (the previous version it was sent), if any; `remote` what the receiver's
    /// baseline cache holds.
    pub fn push(
        &mut self,
        addr: u64,
        page: &[u8],
        base: Option<&[u8]>,
        remote: Option<&RemoteIndex>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.push_inner(addr, page, base, None, remote, out)
    }

    /// Like [`push`](Self::push) when the sender knows only the summary hash of the
    /// receiver's page at `addr` (from its `BASE_INFO`), not the page: an equal page becomes a
    /// "same" run; there is nothing to delta against.
    pub fn push_with_base_hash(
        &mut self,
        addr: u64,
        page: &[u8],
        base_hash: Option<u64>,
        remote: Option<&RemoteIndex>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.push_inner(addr, page, None, base_hash, remote, out)
    }

    fn push_inner(
        &mut self,
        addr: u64,
        page: &[u8],
        base: Option<&[u8]>,
        base_hash: Option<u64>,
        remote: Option<&RemoteIndex>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let ps = self.cfg.page_size;
        if page.len() != ps {
            return Err(EncodeError::PageLength {
                addr,
                len: page.len(),
                expected: ps,
            });
        }
        if addr >= self.cfg.pages {
            return Err(EncodeError::OutOfRange {
                addr,
                pages: self.cfg.pages,
            });
        }
        if base.is_some_and(|b| b.len() != ps) {
            return Err(EncodeError::BaseLength(addr));
        }
        let (w, bit) = ((addr / 64) as usize, 1u64 << (addr % 64));
        if self.pushed[w] & bit != 0 {
            return Err(EncodeError::Repeated(addr));
        }
        self.pushed[w] |= bit;
        self.header(out);
        self.stats.pages += 1;

        if is_zero(page) {
            self.stats.zero += 1;
            self.extend_run(RunKind::Zero, addr, 0, out);
            return self.maybe_flush(out);
        }
        let h = fast128(page);
        if base.is_some_and(|b| b == page) || base_hash == Some(h as u64) {
            self.stats.same += 1;
            self.sent.entry(h).or_insert(addr);
            self.extend_run(RunKind::Same, addr, h as u64, out);
            return self.maybe_flush(out);
        }
        if let Some(&src) = self.sent.get(&h) {
            self.stats.dup += 1;
            self.op_start(OP_DUP, addr, out);
            put_varint(&mut self.ops, src);
            self.next = addr + 1;
            return self.maybe_flush(out);
        }
        self.sent.insert(h, addr);
        if remote.is_some_and(|r| r.contains(h as u64)) {
            self.stats.cache += 1;
            let key = Key::of(page);
            self.op_start(OP_CACHE, addr, out);
            self.ops.extend_from_slice(&key.0);
            self.next = addr + 1;
            return self.maybe_flush(out);
        }
        if let Some(b) = base {
            self.scratch.clear();
            sparse_xor(page, b, &mut self.scratch);
            if self.scratch.len() < ps / 2 {
                self.stats.xor += 1;
                self.stats.xor_bytes += self.scratch.len() as u64;
                self.op_start(OP_XOR, addr, out);
                let base_check = fast128(b) as u64;
                self.ops.extend_from_slice(&base_check.to_le_bytes());
                put_varint(&mut self.ops, self.scratch.len() as u64);
                self.sections[SECT_BINARY as usize].extend_from_slice(&self.scratch);
                self.next = addr + 1;
                return self.maybe_flush(out);
            }
        }
        self.stats.literal += 1;
        let sect = classify(page);
        if sect == SECT_STORED {
            self.stats.stored += 1;
        }
        self.extend_run(RunKind::Lit(sect), addr, 0, out);
        self.sections[sect as usize].extend_from_slice(page);
        self.maybe_flush(out)
    }

    /// Flushes the last block and ends the object.
    pub fn finish(mut self, out: &mut Vec<u8>) -> EncodeStats {
        self.header(out);
        self.flush(out);
        out.push(TAG_END);
        self.stats.bytes_out += 1;
        self.stats
    }

    fn op_start(&mut self, code: u8, addr: u64, out: &mut Vec<u8>) {
        self.end_run(out);
        self.ops.push(code);
        put_varint(&mut self.ops, zigzag(addr as i64 - self.next as i64));
        self.n_ops += 1;
    }

    fn extend_run(&mut self, kind: RunKind, addr: u64, fast: u64, out: &mut Vec<u8>) {
        if let Some(r) = &mut self.run
            && r.kind == kind
            && r.start + r.count == addr
        {
            r.count += 1;
            r.check.update(&fast.to_le_bytes());
            return;
        }
        self.end_run(out);
        let mut check = xxhash_rust::xxh3::Xxh3Default::new();
        check.update(&fast.to_le_bytes());
        self.run = Some(Run {
            kind,
            start: addr,
            count: 1,
            check,
        });
    }

    fn end_run(&mut self, _out: &mut Vec<u8>) {
        let Some(r) = self.run.take() else { return };
        let code = match r.kind {
            RunKind::Zero => OP_ZERO,
            RunKind::Same => OP_SAME,
            RunKind::Lit(_) => OP_LIT,
        };
        self.ops.push(code);
        put_varint(&mut self.ops, zigzag(r.start as i64 - self.next as i64));
        put_varint(&mut self.ops, r.count);
        match r.kind {
            RunKind::Same => self.ops.extend_from_slice(&r.check.digest().to_le_bytes()),
            RunKind::Lit(sect) => self.ops.push(sect),
            RunKind::Zero => {}
        }
        self.n_ops += 1;
        self.next = r.start + r.count;
    }

    fn maybe_flush(&mut self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        // One more op may still be added by the open run: keep a margin of two.
        let largest = self.sections.iter().map(Vec::len).max().unwrap_or(0);
        if largest >= self.cfg.block_bytes || self.n_ops + 2 >= MAX_BLOCK_OPS {
            self.flush(out);
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        self.end_run(out);
        if self.n_ops == 0 {
            return;
        }
        let start = out.len();
        let mut compressed = std::mem::take(&mut self.scratch);
        let (raw, comp) = write_block(
            &mut self.comp,
            self.cfg.codec,
            &self.ops,
            self.n_ops,
            &self.sections,
            &mut compressed,
            out,
        );
        self.stats.payload_raw += raw;
        self.stats.payload_compressed += comp;
        self.stats.bytes_out += (out.len() - start) as u64;
        self.scratch = compressed;
        self.ops.clear();
        self.sections.iter_mut().for_each(Vec::clear);
        self.n_ops = 0;
        self.next = 0;
    }
}

/// Writes one block: tag, op count, ops length, each section's codec and lengths, the ops,
/// then the compressed sections. Returns (raw, compressed) payload bytes.
pub(crate) fn write_block(
    comp: &mut Compressor,
    codec: Codec,
    ops: &[u8],
    n_ops: usize,
    sections: &[Vec<u8>; SECTIONS],
    compressed: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> (u64, u64) {
    compressed.clear();
    let mut lens = [(0usize, 0usize); SECTIONS];
    let mut codecs = [Codec::None; SECTIONS];
    for (i, sect) in sections.iter().enumerate() {
        let before = compressed.len();
        let c = match i as u8 {
            SECT_STORED => Codec::None,
            SECT_TEXT => codec.for_text(),
            _ => codec,
        };
        codecs[i] = comp.compress(c, sect, compressed);
        lens[i] = (sect.len(), compressed.len() - before);
    }
    out.push(TAG_BLOCK);
    put_varint(out, n_ops as u64);
    put_varint(out, ops.len() as u64);
    let (mut raw_total, mut comp_total) = (0, 0);
    for (c, (raw, cl)) in codecs.iter().zip(lens) {
        let (id, level) = c.wire();
        out.push(id);
        out.push(level as u8);
        put_varint(out, raw as u64);
        put_varint(out, cl as u64);
        raw_total += raw as u64;
        comp_total += cl as u64;
    }
    out.extend_from_slice(ops);
    out.extend_from_slice(compressed);
    (raw_total, comp_total)
}

/// Reads a block's header and sections (after its tag) and decompresses the sections into
/// `raw`. Returns the ops and their count. Nothing is decompressed until the whole block is
/// present, so a block still arriving costs only this parse.
pub(crate) fn read_block<'a>(
    r: &mut Reader<'a>,
    decomp: &mut Decompressor,
    raw: &mut [Vec<u8>; SECTIONS],
) -> Result<(usize, &'a [u8]), DecodeError> {
    let n_ops = r.bounded(MAX_BLOCK_OPS as u64, "op count")?;
    let ops_len = r.bounded(MAX_OPS_BYTES as u64, "ops length")?;
    let mut sects = [(Codec::None, 0usize, 0usize); SECTIONS];
    for s in &mut sects {
        let codec = Codec::from_wire(r.u8("codec")?, r.u8("codec level")? as i8)?;
        let raw_len = r.bounded(MAX_BLOCK_RAW as u64, "section length")?;
        // A compressor that does not shrink a section stores it instead.
        let comp_len = r.bounded(raw_len as u64, "compressed section length")?;
        *s = (codec, raw_len, comp_len);
    }
    let ops = r.bytes(ops_len, "ops")?;
    let mut payloads: [&[u8]; SECTIONS] = [&[]; SECTIONS];
    for (p, &(_, _, comp_len)) in payloads.iter_mut().zip(&sects) {
        *p = r.bytes(comp_len, "section")?;
    }
    for (i, (&(codec, raw_len, _), p)) in sects.iter().zip(payloads).enumerate() {
        decomp.decompress(codec, p, raw_len, &mut raw[i])?;
    }
    Ok((n_ops, ops))
}

/// Which section a literal page goes to: text compresses best with text, and high-entropy
/// pages (encrypted, already compressed) are stored without spending time on them. Decided
/// from a sample of one byte in sixteen.
pub(crate) fn classify(page: &[u8]) -> u8 {
    const TEXT: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut i = 32;
        while i < 127 {
            t[i] = 1;
            i += 1;
        }
        t[b'\n' as usize] = 1;
        t[b'\t' as usize] = 1;
        t
    };
    let mut seen = [0u64; 4];
    let mut text = 0usize;
    let mut n = 0usize;
    // About 256 samples whatever the length (pages, or chunks of the stream path).
    let step = (page.len() / 256).max(1);
    for c in page.chunks_exact(step) {
        let b = c[0];
        seen[(b >> 6) as usize] |= 1 << (b & 63);
        text += usize::from(TEXT[b as usize]);
        n += 1;
    }
    let distinct: u32 = seen.iter().map(|w| w.count_ones()).sum();
    // Uniform bytes show ~162 distinct values in 256 samples of a 4 KiB page; code and data
    // far fewer. Scaled for other page sizes.
    let threshold = match n {
        0..=63 => u32::MAX,
        64..=255 => (n as u32) * 55 / 100,
        _ => 145,
    };
    if distinct > threshold {
        SECT_STORED
    } else if text * 10 >= n * 9 {
        SECT_TEXT
    } else {
        SECT_BINARY
    }
}

/// Appends the XOR of `page` and `base` as (zero-gap, length, bytes) spans. Gaps shorter than
/// a few bytes are folded into the spans: a varint pair costs more than they save.
fn sparse_xor(page: &[u8], base: &[u8], out: &mut Vec<u8>) {
    const MIN_GAP: usize = 4;
    let n = page.len();
    let mut pos = 0; // end of the previous span
    let mut i = 0;
    while i < n {
        if page[i] == base[i] {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i + 1; // exclusive end of non-zero bytes
        let mut j = end;
        while j < n {
            if page[j] != base[j] {
                end = j + 1;
                j += 1;
            } else if j - end >= MIN_GAP {
                break;
            } else {
                j += 1;
            }
        }
        put_varint(out, (start - pos) as u64);
        put_varint(out, (end - start) as u64);
        out.extend(
            page[start..end]
                .iter()
                .zip(&base[start..end])
                .map(|(a, b)| a ^ b),
        );
        pos = end;
        i = end;
    }
}

/// Applies spans written by [`sparse_xor`] to `page` (which holds the base).
fn apply_xor(page: &mut [u8], delta: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(delta);
    let mut pos = 0usize;
    while !r.is_empty() {
        let gap = r.bounded(page.len() as u64, "xor gap")?;
        let len = r.bounded(page.len() as u64, "xor span")?;
        let start = pos + gap;
        let end = start + len;
        if end > page.len() || len == 0 {
            return Err(DecodeError::Malformed {
                what: "xor delta",
                why: "span outside the page",
            });
        }
        let bytes = r.bytes(len, "xor span bytes")?;
        for (p, d) in page[start..end].iter_mut().zip(bytes) {
            *p ^= d;
        }
        pos = end;
    }
    Ok(())
}

/// What decoding produced so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Pages written or verified.
    pub pages: u64,
    /// Input bytes consumed.
    pub bytes_in: u64,
    /// Pages that could not be reconstructed (see [`PageDecoder::missing`]).
    pub missing: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum DecState {
    Header,
    Blocks,
    Done,
}

/// Decodes one page object from its bytes, in order, as they arrive.
///
/// Pages whose reference cannot be resolved — a cache entry the receiver no longer holds or
/// that fails verification, a base page that differs from what the sender assumed — are not
/// written: they are listed in [`missing`](Self::missing) for the caller to request again.
/// Nothing is ever written from content that did not verify.
pub struct PageDecoder {
    state: DecState,
    buf: Vec<u8>,
    page_size: usize,
    pages: u64,
    /// One bit per page this object has addressed (produced or missing).
    claimed: Vec<u64>,
    /// One bit per page that could not be reconstructed.
    lost: Vec<u64>,
    missing: Vec<u64>,
    decomp: Decompressor,
    raw: [Vec<u8>; SECTIONS],
    page: Vec<u8>,
    fetched: Vec<u8>,
    stats: DecodeStats,
}

impl std::fmt::Debug for PageDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageDecoder")
            .field("state", &self.state)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for PageDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl PageDecoder {
    /// A decoder waiting for an object header.
    pub fn new() -> Self {
        Self {
            state: DecState::Header,
            buf: Vec::new(),
            page_size: 0,
            pages: 0,
            claimed: Vec::new(),
            lost: Vec::new(),
            missing: Vec::new(),
            decomp: Decompressor::new(),
            raw: Default::default(),
            page: Vec::new(),
            fetched: Vec::new(),
            stats: DecodeStats::default(),
        }
    }

    /// Whether the end of the object has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == DecState::Done
    }

    /// Page size from the header (0 before it).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Addresses that could not be reconstructed, in the order met.
    pub fn missing(&self) -> &[u64] {
        &self.missing
    }

    /// Progress so far.
    pub fn stats(&self) -> &DecodeStats {
        &self.stats
    }

    /// Feeds the next bytes of the object. Complete blocks are decoded into `store`; a partial
    /// block is kept (at most one block's worth) until the rest arrives.
    pub fn push(
        &mut self,
        input: &[u8],
        store: &mut dyn PageStore,
        cache: &mut dyn ContentSource,
    ) -> Result<(), DecodeError> {
        if self.state == DecState::Done {
            if input.is_empty() {
                return Ok(());
            }
            return Err(DecodeError::Malformed {
                what: "object",
                why: "bytes after the end",
            });
        }
        if self.buf.is_empty() {
            // Decode straight from the caller's bytes; keep only a trailing partial unit.
            let (used, result) = self.units(input, store, cache);
            if result.is_ok() {
                self.buf.extend_from_slice(&input[used..]);
            }
            return result;
        }
        self.buf.extend_from_slice(input);
        let buf = std::mem::take(&mut self.buf);
        let (used, result) = self.units(&buf, store, cache);
        self.buf = buf;
        self.buf.drain(..used);
        result
    }

    /// Decodes as many whole units from `data` as it holds; returns the bytes used.
    fn units(
        &mut self,
        data: &[u8],
        store: &mut dyn PageStore,
        cache: &mut dyn ContentSource,
    ) -> (usize, Result<(), DecodeError>) {
        let mut at = 0;
        let result = loop {
            if self.state == DecState::Done {
                if at != data.len() {
                    break Err(DecodeError::Malformed {
                        what: "object",
                        why: "bytes after the end",
                    });
                }
                break Ok(());
            }
            if at == data.len() {
                break Ok(());
            }
            match self.step_in(&data[at..], store, cache) {
                Ok(Some(n)) => at += n,
                Ok(None) => break Ok(()),
                Err(DecodeError::Truncated { .. }) if data.len() - at <= MAX_UNIT => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.stats.bytes_in += at as u64;
        (at, result)
    }

    /// Declares the input complete: an object cut short is an error.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.state == DecState::Done {
            Ok(())
        } else if self.buf.is_empty() {
            Err(DecodeError::Truncated {
                what: "object (no end marker)",
            })
        } else {
            Err(DecodeError::Truncated {
                what: "object (partial block at the end)",
            })
        }
    }

    fn step_in(
        &mut self,
        input: &[u8],
        store: &mut dyn PageStore,
        cache: &mut dyn ContentSource,
    ) -> Result<Option<usize>, DecodeError> {
        let mut r = Reader::new(input);
        match self.state {
            DecState::Header => {
                let magic = r.array::<4>("magic")?;
                if magic != PAGE_MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let version = r.u8("version")?;
                if version != FORMAT_VERSION {
                    return Err(DecodeError::UnsupportedVersion(version));
                }
                let shift = r.u8("page size")?;
                if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&shift) {
                    return Err(DecodeError::Malformed {
                        what: "page size",
                        why: "out of range",
                    });
                }
                let pages = r.varint("page count")?;
                if pages > MAX_PAGES {
                    return Err(DecodeError::Limit {
                        what: "page count",
                        value: pages,
                        max: MAX_PAGES,
                    });
                }
                if pages != store.page_count() {
                    return Err(DecodeError::StoreSize {
                        object: pages,
                        store: store.page_count(),
                    });
                }
                self.page_size = 1 << shift;
                self.pages = pages;
                let words =
                    usize::try_from(pages.div_ceil(64)).map_err(|_| DecodeError::Limit {
                        what: "page count",
                        value: pages,
                        max: MAX_PAGES,
                    })?;
                self.claimed = vec![0; words];
                self.lost = vec![0; words];
                self.page = vec![0; self.page_size];
                self.state = DecState::Blocks;
                Ok(Some(r.position()))
            }
            DecState::Blocks => {
                match r.u8("block tag")? {
                    TAG_END => {
                        self.state = DecState::Done;
                        return Ok(Some(r.position()));
                    }
                    TAG_BLOCK => {}
                    _ => {
                        return Err(DecodeError::Malformed {
                            what: "block tag",
                            why: "unknown tag",
                        });
                    }
                }
                let (n_ops, ops) = read_block(&mut r, &mut self.decomp, &mut self.raw)?;
                self.block(n_ops, ops, store, cache)?;
                Ok(Some(r.position()))
            }
            DecState::Done => Ok(None),
        }
    }

    fn block(
        &mut self,
        n_ops: usize,
        ops: &[u8],
        store: &mut dyn PageStore,
        cache: &mut dyn ContentSource,
    ) -> Result<(), DecodeError> {
        let ps = self.page_size;
        let raw = std::mem::take(&mut self.raw);
        let mut sections = [
            Reader::new(&raw[0]),
            Reader::new(&raw[1]),
            Reader::new(&raw[2]),
        ];
        let mut r = Reader::new(ops);
        let mut next: u64 = 0;
        let result = (|| {
            for _ in 0..n_ops {
                let code = r.u8("op")?;
                let delta = unzigzag(r.varint("op address")?);
                let addr = (next as i64)
                    .checked_add(delta)
                    .and_then(|a| u64::try_from(a).ok())
                    .ok_or(DecodeError::Malformed {
                        what: "op address",
                        why: "negative",
                    })?;
                match code {
                    OP_ZERO | OP_SAME | OP_LIT => {
                        let count = r.varint("run length")?;
                        let end = self.claim_run(addr, count)?;
                        match code {
                            OP_ZERO => {
                                store.write_zero(addr, count, ps)?;
                                self.produce_run(addr, count);
                            }
                            OP_SAME => {
                                let want = r.u64_le("run check")?;
                                self.same_run(addr, count, want, store)?;
                            }
                            _ => {
                                let sect = r.u8("literal section")?;
                                let payload = sections.get_mut(sect as usize).ok_or(
                                    DecodeError::Malformed {
                                        what: "literal section",
                                        why: "unknown section",
                                    },
                                )?;
                                let len = usize::try_from(count)
                                    .ok()
                                    .and_then(|c| c.checked_mul(ps))
                                    .ok_or(DecodeError::Malformed {
                                        what: "literal run",
                                        why: "too long",
                                    })?;
                                let data = payload.bytes(len, "literal pages")?;
                                store.write_pages(addr, data)?;
                                for p in data.chunks_exact(ps) {
                                    cache.learn(p);
                                }
                                self.produce_run(addr, count);
                            }
                        }
                        next = end;
                    }
                    OP_DUP => {
                        let src = r.varint("dup source")?;
                        if src >= self.pages || !bit(&self.claimed, src) {
                            return Err(DecodeError::Malformed {
                                what: "dup reference",
                                why: "source page not sent earlier in this object",
                            });
                        }
                        self.claim_run(addr, 1)?;
                        if bit(&self.lost, src) {
                            self.miss(addr);
                        } else {
                            let mut page = std::mem::take(&mut self.page);
                            let held = store.read_page(src, &mut page)?;
                            let w = if held {
                                store.write_pages(addr, &page)
                            } else {
                                Ok(())
                            };
                            self.page = page;
                            w?;
                            if held {
                                self.produce(addr)
                            } else {
                                self.miss(addr)
                            }
                        }
                        next = addr + 1;
                    }
                    OP_CACHE => {
                        let key = Key(r.array::<16>("cache key")?);
                        self.claim_run(addr, 1)?;
                        let mut f = std::mem::take(&mut self.fetched);
                        f.clear();
                        if cache.fetch(&key, &mut f) && f.len() == ps {
                            store.write_pages(addr, &f)?;
                            self.produce(addr);
                        } else {
                            self.miss(addr);
                        }
                        self.fetched = f;
                        next = addr + 1;
                    }
                    OP_XOR => {
                        let base_check = r.u64_le("xor base check")?;
                        let len = r.bounded(ps as u64 * 2, "xor length")?;
                        self.claim_run(addr, 1)?;
                        let delta = sections[SECT_BINARY as usize].bytes(len, "xor delta")?;
                        let mut page = std::mem::take(&mut self.page);
                        let held = store.read_page(addr, &mut page)?;
                        let ok = held && fast128(&page) as u64 == base_check;
                        let res = if ok {
                            apply_xor(&mut page, delta).and_then(|()| {
                                store.write_pages(addr, &page).map_err(DecodeError::from)
                            })
                        } else {
                            Ok(())
                        };
                        if ok && res.is_ok() {
                            cache.learn(&page);
                        }
                        self.page = page;
                        res?;
                        if ok {
                            self.produce(addr)
                        } else {
                            self.miss(addr)
                        }
                        next = addr + 1;
                    }
                    _ => {
                        return Err(DecodeError::Malformed {
                            what: "op",
                            why: "unknown op code",
                        });
                    }
                }
            }
            if !r.is_empty() {
                return Err(DecodeError::Malformed {
                    what: "ops",
                    why: "bytes after the last op",
                });
            }
            if sections.iter().any(|s| !s.is_empty()) {
                return Err(DecodeError::Malformed {
                    what: "payload",
                    why: "bytes left unused",
                });
            }
            Ok(())
        })();
        self.raw = raw;
        result
    }

    /// Checks that `addr..addr+count` is inside the object and not addressed before, and
    /// claims it. A repeated address is refused: a dup could otherwise read content that was
    /// overwritten since.
    fn claim_run(&mut self, addr: u64, count: u64) -> Result<u64, DecodeError> {
        let end = addr
            .checked_add(count)
            .filter(|&e| count > 0 && e <= self.pages)
            .ok_or(DecodeError::AddressOutOfRange {
                addr,
                pages: self.pages,
            })?;
        for a in addr..end {
            if bit(&self.claimed, a) {
                return Err(DecodeError::Malformed {
                    what: "op address",
                    why: "page sent twice",
                });
            }
        }
        for a in addr..end {
            set_bit(&mut self.claimed, a);
        }
        Ok(end)
    }

    fn same_run(
        &mut self,
        addr: u64,
        count: u64,
        want: u64,
        store: &mut dyn PageStore,
    ) -> Result<(), DecodeError> {
        let mut check = xxhash_rust::xxh3::Xxh3Default::new();
        let mut page = std::mem::take(&mut self.page);
        let mut all_held = true;
        for a in addr..addr + count {
            match store.read_page(a, &mut page) {
                Ok(true) => check.update(&(fast128(&page) as u64).to_le_bytes()),
                Ok(false) => all_held = false,
                Err(e) => {
                    self.page = page;
                    return Err(e.into());
                }
            }
        }
        self.page = page;
        if all_held && check.digest() == want {
            self.produce_run(addr, count);
        } else {
            for a in addr..addr + count {
                self.miss(a);
            }
        }
        Ok(())
    }

    fn produce(&mut self, _a: u64) {
        self.stats.pages += 1;
    }

    fn produce_run(&mut self, _addr: u64, count: u64) {
        self.stats.pages += count;
    }

    fn miss(&mut self, a: u64) {
        set_bit(&mut self.lost, a);
        self.missing.push(a);
        self.stats.missing += 1;
    }
}

// Callers have checked `a < pages`, and the bitmaps hold `pages` bits.
fn bit(map: &[u64], a: u64) -> bool {
    map[(a / 64) as usize] & (1 << (a % 64)) != 0
}

fn set_bit(map: &mut [u64], a: u64) {
    map[(a / 64) as usize] |= 1 << (a % 64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Corpus, Dirtier, DirtyModel, ImageSpec, generate};
    use crate::store::{MemStore, NoCache};
    use proptest::prelude::*;
    use std::collections::HashMap as Map;

    /// A content source backed by a map (a cache that holds exactly what it was given).
    #[derive(Default)]
    struct MapCache(Map<Key, Vec<u8>>);
    impl ContentSource for MapCache {
        fn fetch(&mut self, key: &Key, buf: &mut Vec<u8>) -> bool {
            match self.0.get(key) {
                Some(v) if Key::of(v) == *key => {
                    buf.extend_from_slice(v);
                    true
                }
                _ => false,
            }
        }
    }

    fn encode(
        data: &[u8],
        base: Option<&[u8]>,
        remote: Option<&RemoteIndex>,
        codec: Codec,
    ) -> (Vec<u8>, EncodeStats) {
        let pages = (data.len() / 4096) as u64;
        let mut enc = PageEncoder::new(EncoderConfig {
            codec,
            ..EncoderConfig::new(pages)
        })
        .unwrap();
        let mut out = Vec::new();
        for p in 0..pages {
            let r = p as usize * 4096..(p as usize + 1) * 4096;
            enc.push(p, &data[r.clone()], base.map(|b| &b[r]), remote, &mut out)
                .unwrap();
        }
        let stats = enc.finish(&mut out);
        assert_eq!(stats.bytes_out, out.len() as u64);
        (out, stats)
    }

    fn decode_into(
        bytes: &[u8],
        store: &mut MemStore,
        cache: &mut dyn ContentSource,
        piece: usize,
    ) -> PageDecoder {
        let mut dec = PageDecoder::new();
        for c in bytes.chunks(piece.max(1)) {
            dec.push(c, store, cache).unwrap();
        }
        dec.finish().unwrap();
        dec
    }

    #[test]
    fn cold_round_trip_with_every_codec_and_any_input_split() {
        let img = generate(&ImageSpec::new(2 << 20), &mut Corpus::synthetic());
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(-5)] {
            let (bytes, stats) = encode(&img.data, None, None, codec);
            assert!(stats.zero > 0 && stats.dup > 0 && stats.literal > 0);
            assert_eq!(stats.same + stats.cache + stats.xor, 0);
            for piece in [1usize, 777, bytes.len()] {
                let mut store = MemStore::zeroed(img.pages(), 4096);
                let dec = decode_into(&bytes, &mut store, &mut NoCache, piece);
                assert!(dec.missing().is_empty());
                assert_eq!(
                    store.as_slice(),
                    &img.data[..],
                    "codec {codec} piece {piece}"
                );
            }
            // Zero pages must not be left to chance: decode over garbage.
            let mut store = MemStore::from_vec(vec![0xaa; img.data.len()], 4096);
            decode_into(&bytes, &mut store, &mut NoCache, 1 << 20);
            assert_eq!(store.as_slice(), &img.data[..]);
        }
    }

    #[test]
    fn warm_round_trip_uses_same_runs_and_xor_deltas() {
        let mut corpus = Corpus::synthetic();
        let img = generate(&ImageSpec::new(4 << 20), &mut corpus);
        let mut next = img.data.clone();
        Dirtier::new(DirtyModel::default(), img.pages(), 4096, 3).dirty_fraction(
            &mut next,
            0.1,
            &mut corpus,
        );
        let (bytes, stats) = encode(&next, Some(&img.data), None, Codec::Zstd(1));
        assert!(stats.same + stats.zero > img.pages() * 8 / 10, "{stats:?}");
        assert!(stats.xor > 0, "{stats:?}");
        assert!(
            (bytes.len() as f64) < next.len() as f64 * 0.05,
            "{} bytes",
            bytes.len()
        );
        let mut store = MemStore::from_vec(img.data, 4096);
        let dec = decode_into(&bytes, &mut store, &mut NoCache, 4096);
        assert!(dec.missing().is_empty());
        assert_eq!(store.as_slice(), &next[..]);
    }

    #[test]
    fn cache_references_resolve_and_a_missing_entry_is_reported_not_corrupted() {
        let img = generate(&ImageSpec::new(1 << 20), &mut Corpus::synthetic());
        let mut cache = MapCache::default();
        for p in 0..img.pages() {
            let page = img.page(p);
            if !is_zero(page) {
                cache.0.insert(Key::of(page), page.to_vec());
            }
        }
        let remote = RemoteIndex::from_hashes(cache.0.values().map(|v| crate::fast64(v)));
        let (bytes, stats) = encode(&img.data, None, Some(&remote), Codec::Lz4);
        assert!(stats.cache > 0 && stats.literal == 0, "{stats:?}");
        assert!(bytes.len() < img.data.len() / 20);

        let mut store = MemStore::zeroed(img.pages(), 4096);
        let dec = decode_into(&bytes, &mut store, &mut cache, 10_000);
        assert!(dec.missing().is_empty());
        assert_eq!(store.as_slice(), &img.data[..]);

        // The receiver lost some entries and one is corrupted: those pages (and dups of
        // them) come back as missing; every other page is right; nothing wrong is written.
        let mut damaged = MapCache::default();
        let mut victims = Vec::new();
        for (i, (k, v)) in cache.0.iter().enumerate() {
            match i % 5 {
                0 => victims.push(v.clone()),
                1 => {
                    let mut bad = v.clone();
                    bad[100] ^= 1;
                    victims.push(v.clone());
                    damaged.0.insert(*k, bad);
                }
                _ => {
                    damaged.0.insert(*k, v.clone());
                }
            }
        }
        let mut store = MemStore::from_vec(vec![0x55; img.data.len()], 4096);
        let dec = decode_into(&bytes, &mut store, &mut damaged, 10_000);
        let missing: std::collections::HashSet<u64> = dec.missing().iter().copied().collect();
        assert!(!missing.is_empty());
        for p in 0..img.pages() {
            let got = &store.as_slice()[p as usize * 4096..][..4096];
            if missing.contains(&p) {
                assert!(
                    victims.iter().any(|v| v == img.page(p)),
                    "page {p} missing but was held"
                );
                assert!(
                    got.iter().all(|&b| b == 0x55),
                    "missing page {p} was written"
                );
            } else {
                assert_eq!(got, img.page(p), "page {p}");
            }
        }
        // Recovery: the sender sends the missing pages literally, in a repair object.
        let mut enc = PageEncoder::new(EncoderConfig::new(img.pages())).unwrap();
        let mut repair = Vec::new();
        for &p in dec.missing() {
            enc.push(p, img.page(p), None, None, &mut repair).unwrap();
        }
        enc.finish(&mut repair);
        let mut dec2 = PageDecoder::new();
        dec2.push(&repair, &mut store, &mut NoCache).unwrap();
        dec2.finish().unwrap();
        assert_eq!(store.as_slice(), &img.data[..]);
    }

    #[test]
    fn a_base_that_differs_from_the_senders_is_detected() {
        let mut corpus = Corpus::synthetic();
        let img = generate(&ImageSpec::new(1 << 20), &mut corpus);
        let mut next = img.data.clone();
        Dirtier::new(DirtyModel::default(), img.pages(), 4096, 9).dirty_fraction(
            &mut next,
            0.2,
            &mut corpus,
        );
        let (bytes, _) = encode(&next, Some(&img.data), None, Codec::Lz4);
        // The receiver's copy is not the base the sender assumed.
        let mut wrong_base = img.data.clone();
        for b in wrong_base.iter_mut().step_by(4096 * 3) {
            *b ^= 0xff;
        }
        let mut store = MemStore::from_vec(wrong_base.clone(), 4096);
        let dec = decode_into(&bytes, &mut store, &mut NoCache, 1 << 16);
        assert!(!dec.missing().is_empty());
        for p in 0..img.pages() {
            let got = &store.as_slice()[p as usize * 4096..][..4096];
            if !dec.missing().contains(&p) {
                assert_eq!(got, &next[p as usize * 4096..][..4096], "page {p}");
            }
        }
    }

    #[test]
    fn encoder_refuses_misuse() {
        let mut enc = PageEncoder::new(EncoderConfig::new(4)).unwrap();
        let mut out = Vec::new();
        let page = [1u8; 4096];
        assert!(matches!(
            enc.push(4, &page, None, None, &mut out),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            enc.push(0, &page[..10], None, None, &mut out),
            Err(EncodeError::PageLength { .. })
        ));
        enc.push(1, &page, None, None, &mut out).unwrap();
        assert!(matches!(
            enc.push(1, &page, None, None, &mut out),
            Err(EncodeError::Repeated(1))
        ));
        assert!(
            PageEncoder::new(EncoderConfig {
                page_size: 1000,
                ..EncoderConfig::new(4)
            })
            .is_err()
        );
        assert!(
            PageEncoder::new(EncoderConfig {
                block_bytes: 1 << 30,
                ..EncoderConfig::new(4)
            })
            .is_err()
        );
    }

    #[test]
    fn decoder_refuses_bad_objects_with_clear_errors() {
        let img = generate(&ImageSpec::new(64 * 4096), &mut Corpus::synthetic());
        let (bytes, _) = encode(&img.data, None, None, Codec::Lz4);
        let run = |b: &[u8], pages: u64| {
            let mut store = MemStore::zeroed(pages, 4096);
            let mut dec = PageDecoder::new();
            dec.push(b, &mut store, &mut NoCache)
                .and_then(|()| dec.finish())
        };
        assert!(run(&bytes, 64).is_ok());
        assert!(matches!(
            run(&bytes, 63),
            Err(DecodeError::StoreSize { .. })
        ));
        assert!(matches!(
            run(b"NOPE\x01\x0c\x01", 1),
            Err(DecodeError::BadMagic)
        ));
        assert!(matches!(
            run(b"HDEP\x07\x0c\x01", 1),
            Err(DecodeError::UnsupportedVersion(7))
        ));
        assert!(matches!(
            run(&bytes[..bytes.len() - 1], 64),
            Err(DecodeError::Truncated { .. })
        ));
        let mut extra = bytes;
        extra.push(0);
        assert!(run(&extra, 64).is_err());
        // A dup pointing forward, and a page sent twice.
        let mut obj = b"HDEP\x01\x0c\x04".to_vec();
        obj.extend_from_slice(&[
            TAG_BLOCK, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, OP_DUP, 0, 2, TAG_END,
        ]);
        assert!(matches!(
            run(&obj, 4),
            Err(DecodeError::Malformed {
                what: "dup reference",
                ..
            })
        ));
        let mut obj = b"HDEP\x01\x0c\x04".to_vec();
        obj.extend_from_slice(&[
            TAG_BLOCK, 2, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, OP_ZERO, 0, 2, OP_ZERO, 1, 1,
            TAG_END,
        ]);
        assert!(matches!(
            run(&obj, 4),
            Err(DecodeError::Malformed {
                why: "page sent twice",
                ..
            })
        ));
        let mut obj = b"HDEP\x01\x0c\x04".to_vec();
        obj.extend_from_slice(&[
            TAG_BLOCK, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, OP_ZERO, 8, 1, TAG_END,
        ]);
        assert!(matches!(
            run(&obj, 4),
            Err(DecodeError::AddressOutOfRange { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        /// Mixed levels from arbitrary page recipes, pushed in arbitrary order.
        #[test]
        fn any_mix_in_any_order_round_trips(
            recipe in proptest::collection::vec((0u8..6, any::<u8>(), 0usize..16), 1..48),
            order_seed in any::<u64>(),
            codec in prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd(3))],
        ) {
            let n = recipe.len();
            let ps = 4096;
            let mut base = vec![0u8; n * ps];
            let mut data = vec![0u8; n * ps];
            for (i, &(kind, v, other)) in recipe.iter().enumerate() {
                let b = &mut base[i * ps..(i + 1) * ps];
                b.iter_mut().enumerate().for_each(|(j, x)| *x = (j as u8).wrapping_mul(v) ^ v);
                let d = &mut data[i * ps..(i + 1) * ps];
                match kind {
                    0 => d.fill(0),
                    1 => d.copy_from_slice(&base[i * ps..(i + 1) * ps]),
                    2 => { d.copy_from_slice(&base[i * ps..(i + 1) * ps]); d[v as usize * 3] ^= 0x5a; }
                    3 => d.fill(v | 1),
                    4 => { let src = other % n; let (lo, hi) = (src.min(i), src.max(i)); if lo != hi { let c = data[lo * ps..(lo + 1) * ps].to_vec(); data[hi * ps..(hi + 1) * ps].copy_from_slice(&c); } }
                    _ => d.iter_mut().enumerate().for_each(|(j, x)| *x = (j * 31 + v as usize) as u8),
                }
            }
            let mut order: Vec<u64> = (0..n as u64).collect();
            let mut s = order_seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut enc = PageEncoder::new(EncoderConfig { codec, block_bytes: 3 * ps, ..EncoderConfig::new(n as u64) }).unwrap();
            let mut out = Vec::new();
            for &p in &order {
                let r = p as usize * ps..(p as usize + 1) * ps;
                enc.push(p, &data[r.clone()], Some(&base[r]), None, &mut out).unwrap();
            }
            enc.finish(&mut out);
            let mut store = MemStore::from_vec(base.clone(), ps);
            let mut dec = PageDecoder::new();
            dec.push(&out, &mut store, &mut NoCache).unwrap();
            dec.finish().unwrap();
            prop_assert!(dec.missing().is_empty());
            prop_assert_eq!(store.as_slice(), &data[..]);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            pages in 1u64..16,
        ) {
            let mut input = b"HDEP\x01\x0c".to_vec();
            input.push(pages as u8);
            input.extend_from_slice(&body);
            let mut store = MemStore::zeroed(pages, 4096);
            let mut dec = PageDecoder::new();
            let _ = dec.push(&input, &mut store, &mut NoCache);
            let mut dec = PageDecoder::new();
            let _ = dec.push(&body, &mut store, &mut NoCache);
        }

        #[test]
        fn sparse_xor_round_trips(a in proptest::collection::vec(any::<u8>(), 512), edits in proptest::collection::vec((0usize..512, any::<u8>()), 0..40)) {
            let mut b = a.clone();
            for (i, v) in edits { b[i] = v; }
            let mut d = Vec::new();
            sparse_xor(&b, &a, &mut d);
            let mut back = a.clone();
            apply_xor(&mut back, &d).unwrap();
            prop_assert_eq!(back, b);
        }
    }
}
