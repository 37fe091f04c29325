//! The stream path: byte streams whose layout is unknown (QEMU's migration stream, files),
//! cut by content-defined chunking (FastCDC) so that an insertion shifts only the chunks
//! around it, with the same dedup and baseline levels as pages.
//!
//! Each chunk becomes a reference by strong hash — to a chunk earlier in this stream (the
//! decoder keeps a window of recent chunks, which the encoder mirrors exactly, so such a
//! reference always resolves) or to the receiver's baseline cache — or a literal, compressed
//! per block in sections as on the page path. A cache reference that the receiver cannot
//! resolve stalls the decoder at that point ([`Progress::Need`]) until the caller supplies the
//! chunk: the output is a stream and must not skip. Format: `docs/PROTOCOL.md`
//! ("HDE stream objects").

use std::collections::{HashMap, VecDeque};
use std::io::Write;

use crate::buf::{Reader, put_varint};
use crate::codec::{Codec, Compressor, Decompressor};
use crate::hash::{Key, KeyHashed, PassThroughBuild, fast64};
use crate::page::{
    MAX_BLOCK_OPS, MAX_UNIT, SECT_BINARY, SECT_STORED, SECTIONS, TAG_BLOCK, TAG_END, classify,
    read_block, write_block,
};
use crate::remote::RemoteIndex;
use crate::store::ContentSource;
use crate::{DecodeError, FORMAT_VERSION};

/// Magic of a stream object.
pub const STREAM_MAGIC: [u8; 4] = *b"HDES";
/// Largest chunk.
pub const MAX_CHUNK: usize = 256 << 10;
/// Largest in-stream window a decoder accepts (2^28 bytes).
pub const MAX_WINDOW_LOG: u8 = 28;

/// Chunks shorter than this are always sent literally (a reference is 18 bytes or more), and
/// receivers do not keep them in their cache: the short pieces between a QEMU stream's
/// pages, for instance.
const MIN_REF: usize = 64;
const OP_LIT: u8 = 0;
const OP_REF: u8 = 1;

/// How to cut and encode a stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Smallest chunk.
    pub min_chunk: u32,
    /// Average chunk.
    pub avg_chunk: u32,
    /// Largest chunk (at most [`MAX_CHUNK`]).
    pub max_chunk: u32,
    /// Compressor for literal chunks.
    pub codec: Codec,
    /// Target size of a block's largest section.
    pub block_bytes: usize,
    /// log2 of the in-stream dedup window (bytes of recent chunks both sides remember).
    pub window_log: u8,
}

impl Default for StreamConfig {
    /// 4/16/64 KiB chunks, zstd level 2, 2 MiB sections, 64 MiB window.
    fn default() -> Self {
        Self {
            min_chunk: 4 << 10,
            avg_chunk: 16 << 10,
            max_chunk: 64 << 10,
            codec: Codec::Zstd(2),
            block_bytes: 2 << 20,
            window_log: 26,
        }
    }
}

impl StreamConfig {
    fn validate(&self) -> Result<(), crate::page::ConfigError> {
        let ok = fastcdc::v2020::MINIMUM_MIN <= self.min_chunk
            && self.min_chunk <= self.avg_chunk
            && self.avg_chunk <= self.max_chunk
            && self.max_chunk as usize <= MAX_CHUNK
            && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX)
                .contains(&self.avg_chunk)
            && self.window_log <= MAX_WINDOW_LOG
            && (self.max_chunk as usize..=crate::page::MAX_BLOCK_RAW / 2)
                .contains(&self.block_bytes);
        if ok {
            Ok(())
        } else {
            Err(crate::page::ConfigError::new(
                "chunk sizes, window or block size out of range",
            ))
        }
    }
}

/// Chunks and bytes per level.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes of input.
    pub bytes_in: u64,
    /// Chunks cut.
    pub chunks: u64,
    /// Chunks found earlier in this stream.
    pub dup: u64,
    /// Bytes of those.
    pub dup_bytes: u64,
    /// Chunks found in the receiver's cache.
    pub cache: u64,
    /// Bytes of those.
    pub cache_bytes: u64,
    /// Chunks sent literally.
    pub literal: u64,
    /// Literal bytes before compression.
    pub payload_raw: u64,
    /// After compression.
    pub payload_compressed: u64,
    /// Bytes written in total.
    pub bytes_out: u64,
}

/// The window of recent chunks, identical on both sides: FIFO by bytes.
#[derive(Debug, Default)]
struct Window {
    order: VecDeque<(Key, u32)>,
    held: HashMap<KeyHashed, u32, PassThroughBuild>,
    bytes: u64,
    budget: u64,
}

impl Window {
    fn new(window_log: u8) -> Self {
        Self {
            budget: 1 << window_log,
            ..Self::default()
        }
    }

    fn contains(&self, k: &Key) -> bool {
        self.held.contains_key(&KeyHashed(*k))
    }

    /// Adds a chunk and returns the keys that fell out.
    fn add(&mut self, k: Key, len: u32, mut evicted: impl FnMut(Key)) {
        let e = self.held.entry(KeyHashed(k)).or_insert(0);
        *e += 1;
        self.order.push_back((k, len));
        self.bytes += u64::from(len);
        while self.bytes > self.budget {
            let Some((old, l)) = self.order.pop_front() else {
                break;
            };
            self.bytes -= u64::from(l);
            if let Some(c) = self.held.get_mut(&KeyHashed(old)) {
                *c -= 1;
                if *c == 0 {
                    self.held.remove(&KeyHashed(old));
                    evicted(old);
                }
            }
        }
    }
}

/// Encodes a byte stream pushed in pieces of any size.
pub struct StreamEncoder {
    cfg: StreamConfig,
    comp: Compressor,
    pending: Vec<u8>,
    window: Window,
    ops: Vec<u8>,
    n_ops: usize,
    sections: [Vec<u8>; SECTIONS],
    scratch: Vec<u8>,
    stats: StreamStats,
    started: bool,
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncoder")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl StreamEncoder {
    /// An encoder for one stream.
    pub fn new(cfg: StreamConfig) -> Result<Self, crate::page::ConfigError> {
        cfg.validate()?;
        Ok(Self {
            window: Window::new(cfg.window_log),
            comp: Compressor::new(),
            pending: Vec::new(),
            ops: Vec::new(),
            n_ops: 0,
            sections: Default::default(),
            scratch: Vec::new(),
            stats: StreamStats::default(),
            started: false,
            cfg,
        })
    }

    /// Progress so far.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Encodes the next bytes. Chunks whose end is settled are emitted; the undecided tail
    /// (less than two chunks) waits for more input or [`finish`](Self::finish).
    pub fn push(&mut self, data: &[u8], remote: Option<&RemoteIndex>, out: &mut Vec<u8>) {
        self.header(out);
        self.stats.bytes_in += data.len() as u64;
        self.pending.extend_from_slice(data);
        let max = self.cfg.max_chunk as usize;
        if self.pending.len() < 2 * max {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let mut used = 0;
        for c in fastcdc::v2020::FastCDC::new(
            &pending,
            self.cfg.min_chunk,
            self.cfg.avg_chunk,
            self.cfg.max_chunk,
        ) {
            // A chunk that reaches the end of what we have may be cut short by it.
            if c.offset + c.length + max > pending.len() {
                break;
            }
            self.chunk(&pending[c.offset..c.offset + c.length], remote, out);
            used = c.offset + c.length;
        }
        self.pending = pending;
        self.pending.drain(..used);
    }

    /// Encodes `chunk` as one chunk of its own, after cutting what is pending up to it. For
    /// callers that know where content starts and ends, e.g. the pages of a QEMU migration
    /// stream: a page cut on its own boundaries matches the same page in the receiver's cache
    /// wherever it lies, which content-defined cuts spanning a page and its neighbours do not.
    /// A chunk longer than the configured largest is pushed as ordinary input instead.
    pub fn push_chunk(&mut self, chunk: &[u8], remote: Option<&RemoteIndex>, out: &mut Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        if chunk.len() > self.cfg.max_chunk as usize {
            self.push(chunk, remote, out);
            return;
        }
        self.header(out);
        self.cut_pending(remote, out);
        self.stats.bytes_in += chunk.len() as u64;
        self.chunk(chunk, remote, out);
    }

    /// Encodes what is left and ends the stream.
    pub fn finish(mut self, remote: Option<&RemoteIndex>, out: &mut Vec<u8>) -> StreamStats {
        self.header(out);
        self.cut_pending(remote, out);
        self.flush(out);
        out.push(TAG_END);
        self.stats.bytes_out += 1;
        self.stats
    }

    /// Cuts every pending byte into chunks, the last ending where the input does.
    fn cut_pending(&mut self, remote: Option<&RemoteIndex>, out: &mut Vec<u8>) {
        let pending = std::mem::take(&mut self.pending);
        for c in fastcdc::v2020::FastCDC::new(
            &pending,
            self.cfg.min_chunk,
            self.cfg.avg_chunk,
            self.cfg.max_chunk,
        ) {
            self.chunk(&pending[c.offset..c.offset + c.length], remote, out);
        }
        self.pending = pending;
        self.pending.clear();
    }

    fn header(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            out.extend_from_slice(&STREAM_MAGIC);
            out.push(FORMAT_VERSION);
            out.push(self.cfg.window_log);
            self.stats.bytes_out += 6;
            self.started = true;
        }
    }

    fn chunk(&mut self, chunk: &[u8], remote: Option<&RemoteIndex>, out: &mut Vec<u8>) {
        self.stats.chunks += 1;
        let key = Key::of(chunk);
        let len = chunk.len() as u32;
        if chunk.len() < MIN_REF {
            // A reference (key and length) would cost more than the bytes: literal.
            self.literal(chunk);
        } else if self.window.contains(&key) {
            self.stats.dup += 1;
            self.stats.dup_bytes += u64::from(len);
            self.op_ref(key, len);
        } else if remote.is_some_and(|r| r.contains(fast64(chunk))) {
            self.stats.cache += 1;
            self.stats.cache_bytes += u64::from(len);
            self.op_ref(key, len);
        } else {
            self.literal(chunk);
        }
        // Both sides add every chunk, whatever its op, in stream order.
        self.window.add(key, len, |_| {});
        let largest = self.sections.iter().map(Vec::len).max().unwrap_or(0);
        if largest + self.cfg.max_chunk as usize > self.cfg.block_bytes
            || self.n_ops + 1 >= MAX_BLOCK_OPS
        {
            self.flush(out);
        }
    }

    fn literal(&mut self, chunk: &[u8]) {
        self.stats.literal += 1;
        let sect = classify(chunk);
        self.ops.push(OP_LIT);
        put_varint(&mut self.ops, chunk.len() as u64);
        self.ops.push(sect);
        self.n_ops += 1;
        self.sections[sect as usize].extend_from_slice(chunk);
    }

    fn op_ref(&mut self, key: Key, len: u32) {
        self.ops.push(OP_REF);
        self.ops.extend_from_slice(&key.0);
        put_varint(&mut self.ops, u64::from(len));
        self.n_ops += 1;
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        if self.n_ops == 0 {
            return;
        }
        let start = out.len();
        let mut scratch = std::mem::take(&mut self.scratch);
        let (raw, comp) = write_block(
            &mut self.comp,
            self.cfg.codec,
            &self.ops,
            self.n_ops,
            &self.sections,
            &mut scratch,
            out,
        );
        self.scratch = scratch;
        self.stats.payload_raw += raw;
        self.stats.payload_compressed += comp;
        self.stats.bytes_out += (out.len() - start) as u64;
        self.ops.clear();
        self.n_ops = 0;
        self.sections.iter_mut().for_each(Vec::clear);
    }
}

/// Where decoding stands after a [`StreamDecoder::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All input so far is decoded (or waiting for the rest of a block).
    Ready,
    /// Stalled at a reference the receiver could not resolve: supply the chunk with
    /// [`StreamDecoder::resolve`] (ask the sender for it), then push again.
    Need {
        /// The chunk's key.
        key: Key,
        /// Its length.
        len: u32,
    },
    /// The end of the stream was decoded.
    Done,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Header,
    Blocks,
    Done,
}

/// A block being applied, kept across a stall.
#[derive(Debug, Default)]
struct Current {
    raw: [Vec<u8>; SECTIONS],
    ops: Vec<u8>,
    n_ops: usize,
    done_ops: usize,
    ops_at: usize,
    sect_at: [usize; SECTIONS],
    active: bool,
}

/// Decodes a stream object into a writer, in order.
pub struct StreamDecoder {
    state: State,
    buf: Vec<u8>,
    decomp: Decompressor,
    window: Window,
    /// Content of the chunks in the window.
    recent: HashMap<KeyHashed, Vec<u8>, PassThroughBuild>,
    cur: Current,
    supplied: Option<(Key, Vec<u8>)>,
    fetched: Vec<u8>,
    bytes_out: u64,
    limit: u64,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("state", &self.state)
            .field("bytes_out", &self.bytes_out)
            .finish_non_exhaustive()
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// A decoder waiting for a stream header.
    pub fn new() -> Self {
        Self {
            state: State::Header,
            buf: Vec::new(),
            decomp: Decompressor::new(),
            window: Window::default(),
            recent: HashMap::default(),
            cur: Current::default(),
            supplied: None,
            fetched: Vec::new(),
            bytes_out: 0,
            limit: u64::MAX,
        }
    }

    /// A decoder that refuses to produce more than `limit` bytes: references repeat content
    /// cheaply, so an untrusted object must not decide how much it writes.
    pub fn with_limit(limit: u64) -> Self {
        Self {
            limit,
            ..Self::new()
        }
    }

    /// Bytes written to the output so far.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// Supplies the chunk a [`Progress::Need`] asked for. It is checked against the key.
    pub fn resolve(&mut self, key: Key, data: Vec<u8>) -> Result<(), DecodeError> {
        if Key::of(&data) != key {
            return Err(DecodeError::Malformed {
                what: "resolved chunk",
                why: "content does not match its key",
            });
        }
        self.supplied = Some((key, data));
        Ok(())
    }

    /// Feeds the next bytes and writes what can be decoded to `out`.
    pub fn push(
        &mut self,
        input: &[u8],
        out: &mut dyn Write,
        cache: &mut dyn ContentSource,
    ) -> Result<Progress, DecodeError> {
        self.buf.extend_from_slice(input);
        let buf = std::mem::take(&mut self.buf);
        let mut at = 0;
        let result = loop {
            if self.cur.active {
                match self.apply(out, cache)? {
                    Progress::Ready => {}
                    other => break Ok(other),
                }
            }
            if self.state == State::Done {
                if at != buf.len() {
                    break Err(DecodeError::Malformed {
                        what: "stream",
                        why: "bytes after the end",
                    });
                }
                break Ok(Progress::Done);
            }
            if at == buf.len() {
                break Ok(Progress::Ready);
            }
            match self.unit(&buf[at..]) {
                Ok(n) => at += n,
                Err(DecodeError::Truncated { .. }) if buf.len() - at <= MAX_UNIT => {
                    break Ok(Progress::Ready);
                }
                Err(e) => break Err(e),
            }
        };
        self.buf = buf;
        self.buf.drain(..at);
        result
    }

    /// Declares the input complete.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.state == State::Done && !self.cur.active {
            Ok(())
        } else {
            Err(DecodeError::Truncated {
                what: "stream (no end marker)",
            })
        }
    }

    fn unit(&mut self, input: &[u8]) -> Result<usize, DecodeError> {
        let mut r = Reader::new(input);
        match self.state {
            State::Header => {
                if r.array::<4>("magic")? != STREAM_MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let v = r.u8("version")?;
                if v != FORMAT_VERSION {
                    return Err(DecodeError::UnsupportedVersion(v));
                }
                let wl = r.u8("window")?;
                if wl > MAX_WINDOW_LOG {
                    return Err(DecodeError::Limit {
                        what: "window log",
                        value: u64::from(wl),
                        max: u64::from(MAX_WINDOW_LOG),
                    });
                }
                self.window = Window::new(wl);
                self.state = State::Blocks;
            }
            State::Blocks => match r.u8("block tag")? {
                TAG_END => self.state = State::Done,
                TAG_BLOCK => {
                    let (n_ops, ops) = read_block(&mut r, &mut self.decomp, &mut self.cur.raw)?;
                    self.cur.ops.clear();
                    self.cur.ops.extend_from_slice(ops);
                    self.cur.n_ops = n_ops;
                    self.cur.done_ops = 0;
                    self.cur.ops_at = 0;
                    self.cur.sect_at = [0; SECTIONS];
                    self.cur.active = true;
                }
                _ => {
                    return Err(DecodeError::Malformed {
                        what: "block tag",
                        why: "unknown tag",
                    });
                }
            },
            State::Done => {}
        }
        Ok(r.position())
    }

    /// Applies the current block's ops from where it stopped.
    fn apply(
        &mut self,
        out: &mut dyn Write,
        cache: &mut dyn ContentSource,
    ) -> Result<Progress, DecodeError> {
        while self.cur.done_ops < self.cur.n_ops {
            let ops = std::mem::take(&mut self.cur.ops);
            let mut r = Reader::new(&ops[self.cur.ops_at..]);
            let step = self.op(&mut r, out, cache);
            let used = r.position();
            self.cur.ops = ops;
            match step? {
                Progress::Ready => {
                    self.cur.ops_at += used;
                    self.cur.done_ops += 1;
                }
                other => return Ok(other),
            }
        }
        if self.cur.ops_at != self.cur.ops.len() {
            return Err(DecodeError::Malformed {
                what: "ops",
                why: "bytes after the last op",
            });
        }
        if self
            .cur
            .sect_at
            .iter()
            .zip(&self.cur.raw)
            .any(|(&a, r)| a != r.len())
        {
            return Err(DecodeError::Malformed {
                what: "payload",
                why: "bytes left unused",
            });
        }
        self.cur.active = false;
        Ok(Progress::Ready)
    }

    fn op(
        &mut self,
        r: &mut Reader<'_>,
        out: &mut dyn Write,
        cache: &mut dyn ContentSource,
    ) -> Result<Progress, DecodeError> {
        match r.u8("op")? {
            OP_LIT => {
                let len = r.bounded(MAX_CHUNK as u64, "chunk length")?;
                let sect = r.u8("section")? as usize;
                if sect >= SECTIONS || len == 0 {
                    return Err(DecodeError::Malformed {
                        what: "literal chunk",
                        why: "bad section or length",
                    });
                }
                self.check_limit(len)?;
                let at = self.cur.sect_at[sect];
                let data = self.cur.raw[sect]
                    .get(at..at + len)
                    .ok_or(DecodeError::Truncated {
                        what: "literal chunk",
                    })?;
                out.write_all(data)?;
                // One hash for the cache and the decoder's own window (a page's BLAKE3 was
                // 8 % of a `dc` destination's CPU, computed twice).
                let key = Key::of(data);
                if data.len() >= MIN_REF {
                    cache.learn_keyed(&key, data);
                }
                let chunk = data.to_vec();
                self.cur.sect_at[sect] += len;
                self.bytes_out += len as u64;
                self.remember(key, chunk);
            }
            OP_REF => {
                let key = Key(r.array::<16>("chunk key")?);
                let len = r.bounded(MAX_CHUNK as u64, "chunk length")?;
                self.check_limit(len)?;
                let data = if let Some(d) = self.recent.get(&KeyHashed(key)) {
                    d.clone()
                } else if let Some((k, d)) = self.supplied.take_if(|(k, _)| *k == key) {
                    debug_assert_eq!(k, key);
                    d
                } else {
                    let mut f = std::mem::take(&mut self.fetched);
                    f.clear();
                    let hit = cache.fetch(&key, &mut f);
                    let d = f.clone();
                    self.fetched = f;
                    if !hit {
                        return Ok(Progress::Need {
                            key,
                            len: len as u32,
                        });
                    }
                    d
                };
                if data.len() != len {
                    return Err(DecodeError::Malformed {
                        what: "chunk reference",
                        why: "length differs",
                    });
                }
                out.write_all(&data)?;
                self.bytes_out += len as u64;
                self.remember(key, data);
            }
            _ => {
                return Err(DecodeError::Malformed {
                    what: "op",
                    why: "unknown op code",
                });
            }
        }
        Ok(Progress::Ready)
    }

    fn check_limit(&self, len: usize) -> Result<(), DecodeError> {
        if self.bytes_out.saturating_add(len as u64) > self.limit {
            return Err(DecodeError::Limit {
                what: "decoded stream length",
                value: self.bytes_out.saturating_add(len as u64),
                max: self.limit,
            });
        }
        Ok(())
    }

    fn remember(&mut self, key: Key, data: Vec<u8>) {
        let len = data.len() as u32;
        self.recent.entry(KeyHashed(key)).or_insert(data);
        let recent = &mut self.recent;
        self.window.add(key, len, |old| {
            recent.remove(&KeyHashed(old));
        });
    }
}

// Sections other than these two are only written by `classify`.
const _: () = assert!(SECT_BINARY != SECT_STORED);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoCache;
    use crate::image::{Corpus, ImageSpec, generate};
    use proptest::prelude::*;

    struct MapCache(HashMap<Key, Vec<u8>>);
    impl ContentSource for MapCache {
        fn fetch(&mut self, key: &Key, buf: &mut Vec<u8>) -> bool {
            self.0.get(key).is_some_and(|v| {
                buf.extend_from_slice(v);
                true
            })
        }
        fn learn(&mut self, data: &[u8]) {
            self.0.insert(Key::of(data), data.to_vec());
        }
    }

    fn encode(data: &[u8], piece: usize, remote: Option<&RemoteIndex>) -> (Vec<u8>, StreamStats) {
        let mut enc = StreamEncoder::new(StreamConfig::default()).unwrap();
        let mut out = Vec::new();
        for c in data.chunks(piece.max(1)) {
            enc.push(c, remote, &mut out);
        }
        let s = enc.finish(remote, &mut out);
        assert_eq!(s.bytes_out, out.len() as u64);
        (out, s)
    }

    fn decode(bytes: &[u8], cache: &mut dyn ContentSource) -> Vec<u8> {
        let mut dec = StreamDecoder::new();
        let mut out = Vec::new();
        assert_eq!(dec.push(bytes, &mut out, cache).unwrap(), Progress::Done);
        dec.finish().unwrap();
        out
    }

    #[test]
    fn round_trip_finds_repeats_and_shifted_content() {
        let img = generate(&ImageSpec::new(2 << 20), &mut Corpus::synthetic());
        // A stream that repeats a region after an insertion: CDC realigns.
        let mut data = img.data.clone();
        data.extend_from_slice(b"a few inserted bytes");
        data.extend_from_slice(&img.data[..1 << 20]);
        for piece in [1000, 1 << 16, data.len()] {
            let (bytes, s) = encode(&data, piece, None);
            assert!(s.dup_bytes > 900 << 10, "{s:?}");
            assert_eq!(decode(&bytes, &mut NoCache), data);
        }
    }

    #[test]
    fn cache_references_resolve_and_a_miss_stalls_until_supplied() {
        let img = generate(&ImageSpec::new(1 << 20), &mut Corpus::synthetic());
        let mut cache = MapCache(HashMap::new());
        let (first, _) = encode(&img.data, 1 << 16, None);
        assert_eq!(decode(&first, &mut cache), img.data);
        // Second transfer of the same content: everything is a cache reference.
        let remote = RemoteIndex::from_hashes(cache.0.values().map(|v| fast64(v)));
        let (second, s) = encode(&img.data, 1 << 16, Some(&remote));
        assert_eq!(s.literal, 0, "{s:?}");
        assert!(second.len() < 4096);
        assert_eq!(decode(&second, &mut cache), img.data);
        // The receiver lost its cache: each reference stalls; the caller fetches the chunk
        // from the sender and the stream continues, in order.
        let mut dec = StreamDecoder::new();
        let mut out = Vec::new();
        let mut progress = dec.push(&second, &mut out, &mut NoCache).unwrap();
        let mut rounds = 0;
        while let Progress::Need { key, .. } = progress {
            rounds += 1;
            assert!(rounds < 1000);
            dec.resolve(key, cache.0[&key].clone()).unwrap();
            progress = dec.push(&[], &mut out, &mut NoCache).unwrap();
        }
        assert_eq!(progress, Progress::Done);
        assert_eq!(out, img.data);
        // Wrong content for a key is refused.
        let k = *cache.0.keys().next().unwrap();
        assert!(dec.resolve(k, vec![1, 2, 3]).is_err());
    }

    #[test]
    fn pages_pushed_as_chunks_match_the_cache_wherever_they_lie() {
        // Records shaped like a QEMU migration stream's: an 8-byte header, then a 4 KiB page.
        let img = generate(&ImageSpec::new(1 << 20), &mut Corpus::synthetic());
        let pages: Vec<&[u8]> = img.data.chunks(4096).collect();
        let n = pages.len();
        let records = |order: &[usize], tag: u64| -> Vec<Vec<u8>> {
            order
                .iter()
                .flat_map(|&i| {
                    [
                        ((i as u64) << 12 | tag).to_be_bytes().to_vec(),
                        pages[i].to_vec(),
                    ]
                })
                .collect()
        };
        let encode_pieces = |pieces: &[Vec<u8>], as_chunks: bool, remote: Option<&RemoteIndex>| {
            let mut enc = StreamEncoder::new(StreamConfig::default()).unwrap();
            let mut out = Vec::new();
            for p in pieces {
                if as_chunks && p.len() == 4096 {
                    enc.push_chunk(p, remote, &mut out);
                } else {
                    enc.push(p, remote, &mut out);
                }
            }
            let s = enc.finish(remote, &mut out);
            assert_eq!(s.bytes_out, out.len() as u64);
            (out, s)
        };
        let first = records(&(0..n).collect::<Vec<_>>(), 0x08);
        let mut cache = MapCache(HashMap::new());
        let (bytes, _) = encode_pieces(&first, true, None);
        assert_eq!(decode(&bytes, &mut cache), first.concat());
        // Headers are not kept in the cache; pages are.
        assert!(cache.0.values().all(|v| v.len() >= MIN_REF));
        assert!(cache.0.values().any(|v| v.len() == 4096));
        // The same pages in reverse order under other headers: every page is a reference.
        let remote = RemoteIndex::from_hashes(cache.0.values().map(|v| fast64(v)));
        let second = records(&(0..n).rev().collect::<Vec<_>>(), 0x28);
        let (bytes, s) = encode_pieces(&second, true, Some(&remote));
        assert_eq!(s.cache_bytes + s.dup_bytes, (n * 4096) as u64, "{s:?}");
        assert_eq!(s.payload_raw, (n * 8) as u64, "{s:?}");
        assert_eq!(decode(&bytes, &mut cache), second.concat());
        // Content-defined cuts across headers and pages find far less.
        let (_, cdc) = encode_pieces(&second, false, Some(&remote));
        assert!(
            cdc.cache_bytes + cdc.dup_bytes < s.cache_bytes / 2,
            "{cdc:?}"
        );
        // A chunk over the largest size is ordinary input.
        let mut enc = StreamEncoder::new(StreamConfig::default()).unwrap();
        let mut out = Vec::new();
        enc.push_chunk(&img.data, None, &mut out);
        enc.push_chunk(&[], None, &mut out);
        enc.finish(None, &mut out);
        assert_eq!(decode(&out, &mut NoCache), img.data);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
        #[test]
        fn any_stream_round_trips(parts in proptest::collection::vec((0u8..3, 1usize..40_000, any::<u8>()), 1..12), piece in 1usize..100_000) {
            let mut data = Vec::new();
            for (kind, len, v) in parts {
                match kind {
                    0 => data.extend(std::iter::repeat_n(v, len)),
                    1 => data.extend((0..len).map(|i| (i as u8).wrapping_mul(v) ^ (i >> 7) as u8)),
                    _ => { let start = data.len().saturating_sub(len); let c = data[start..].to_vec(); data.extend(c); }
                }
            }
            let (bytes, _) = encode(&data, piece, None);
            prop_assert_eq!(decode(&bytes, &mut NoCache), data);
        }

        #[test]
        fn the_output_limit_holds(n in 1usize..200_000) {
            let data = vec![7u8; 300_000];
            let (bytes, _) = encode(&data, 1 << 16, None);
            let mut dec = StreamDecoder::with_limit(n as u64);
            let mut out = Vec::new();
            let r = dec.push(&bytes, &mut out, &mut NoCache);
            prop_assert!(r.is_err());
            prop_assert!(out.len() <= n);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut input = b"HDES\x01\x10".to_vec();
            input.extend_from_slice(&body);
            let _ = StreamDecoder::new().push(&input, &mut Vec::new(), &mut NoCache);
            let _ = StreamDecoder::new().push(&body, &mut Vec::new(), &mut NoCache);
        }
    }
}
