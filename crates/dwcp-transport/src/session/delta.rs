//! Delta encoding on the sending side: asking the receiver what it holds, and encoding a file
//! into an HDE object against that (`docs/PROTOCOL.md`, "Transfer sessions", rule 10).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use dwcp_encoding::chooser::Chooser;
use dwcp_encoding::stream::{StreamConfig, StreamEncoder};
use dwcp_encoding::{Codec, EncoderConfig, PageEncoder, RemoteIndex};
use dwcp_wire::data;

/// How a file is cut for delta encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Pages for a file whose size is a whole number of pages, a stream otherwise.
    Auto,
    /// Page-addressed (raw disk and memory images).
    Pages,
    /// Content-defined chunks (anything else).
    Stream,
}

/// Delta encoding settings of a sender.
#[derive(Debug, Clone)]
pub struct DeltaOptions {
    /// Use HDE with receivers that negotiated it.
    pub enabled: bool,
    /// How to cut files.
    pub layout: Layout,
    /// Compressor for literals; `None` lets the codec chooser pick for `link_bps`.
    pub codec: Option<Codec>,
    /// The link's bandwidth, bytes per second, for the chooser.
    pub link_bps: u64,
    /// Page size of the page layout.
    pub page_size: usize,
}

/// The link rate the chooser assumes when none is known: 1 Gbit/s.
pub const DEFAULT_LINK_BPS: u64 = 125_000_000;

impl Default for DeltaOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            layout: Layout::Auto,
            codec: None,
            link_bps: DEFAULT_LINK_BPS,
            page_size: 4096,
        }
    }
}

/// A file that ends before the size it had when its transfer began was changed meanwhile.
fn changed(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::new(
            e.kind(),
            "the file ended before the size it had when the transfer began (was it changed?)",
        )
    } else {
        e
    }
}

/// Picks the codec for a file from a sample of it (up to 32 pieces of 256 KiB spread over
/// the file, zero pages left out, as the encoder leaves them out), calibrated on this
/// machine. Small files get zstd level 2 without the calibration cost.
fn choose_codec(
    input: &File,
    size: u64,
    link_bps: u64,
) -> std::io::Result<(Codec, Option<Chooser>)> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 256 << 10;
    let mut sample = Vec::new();
    if size >= 4 << 20 {
        let mut buf = vec![0u8; PIECE as usize];
        for i in 0..32 {
            let at = (size - PIECE) / 31 * i / 4096 * 4096;
            input.read_exact_at(&mut buf, at).map_err(changed)?;
            for p in buf.chunks(4096).filter(|p| !dwcp_encoding::is_zero(p)) {
                sample.extend_from_slice(p);
            }
        }
    }
    if sample.len() < 1 << 20 {
        return Ok((Codec::Zstd(2), None));
    }
    let chooser = Chooser::calibrate(&sample);
    Ok((chooser.choose(link_bps as f64), Some(chooser)))
}

/// What delta encoding did to one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaReport {
    /// `pages` or `stream`.
    pub layout: &'static str,
    /// Size of the file.
    pub raw_bytes: u64,
    /// Size of the encoded object (what crossed the network, once).
    pub encoded_bytes: u64,
    /// Bytes not sent because they were zero pages.
    pub saved_zero: u64,
    /// ... equal to the receiver's current copy.
    pub saved_same: u64,
    /// ... duplicates within the file.
    pub saved_dup: u64,
    /// ... held by the receiver's baseline cache.
    pub saved_cache: u64,
    /// ... by XOR deltas.
    pub saved_delta: u64,
    /// ... by compressing literals.
    pub saved_compression: u64,
    /// Entries of the receiver's cache summary the encoder saw.
    pub receiver_cache_entries: u64,
    /// Whether this is a second attempt without references (the first could not be resolved).
    pub cold_retry: bool,
    /// The compressor used last (the chooser may change it as it learns the data).
    pub codec: String,
    /// How often the chooser changed the compressor during the file.
    pub codec_changes: u32,
}

/// A file encoded into a temporary object.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// Without a name (nothing is left behind when the process is killed); read through
    /// [`Encoded::path`].
    pub(crate) file: File,
    pub(crate) size: u64,
    pub(crate) digest: blake3::Hash,
    pub(crate) encoding: u32,
    pub(crate) raw_blake3: blake3::Hash,
    pub(crate) report: DeltaReport,
}

impl Encoded {
    /// A path that opens the encoded copy, for as long as this lives (Linux's `/proc`).
    pub(crate) fn path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.file.as_raw_fd()).into()
    }
}

/// Opens the baseline cache a receiver decodes against (persisted in `s.dir`, or in memory)
/// and indexes the seed files. Seed files that cannot be read are logged and skipped.
pub fn open_cache(
    s: &dwcp_control::CacheSettings,
) -> std::io::Result<dwcp_encoding::BaselineCache> {
    let cfg = match &s.dir {
        Some(d) => dwcp_encoding::CacheConfig::persistent(d, s.mem_bytes, s.disk_bytes),
        None => dwcp_encoding::CacheConfig::memory(s.mem_bytes),
    };
    let mut cache = dwcp_encoding::BaselineCache::open(cfg)?;
    for p in &s.seeds {
        match cache.seed_path(p, 4096) {
            Ok(n) => tracing::info!(path = %p.display(), pages = n, "baseline cache seeded"),
            Err(e) => tracing::warn!(path = %p.display(), "cannot seed the baseline cache: {e}"),
        }
    }
    Ok(cache)
}

/// The encoding a file gets.
pub(crate) fn encoding_for(layout: Layout, size: u64, page_size: usize) -> u32 {
    match layout {
        Layout::Pages => data::ENCODING_HDE_PAGES,
        Layout::Stream => data::ENCODING_HDE_STREAM,
        Layout::Auto if size.is_multiple_of(page_size as u64) => data::ENCODING_HDE_PAGES,
        Layout::Auto => data::ENCODING_HDE_STREAM,
    }
}

/// Encodes `path`, of `size` bytes when its transfer began, into a temporary file in the
/// system's temporary directory. `remote` is the receiver's cache summary, `base` the summary
/// hashes of its pages of this file (8 bytes per page, empty when it has no copy of this
/// size). Blocking: run it off the runtime.
pub(crate) fn encode_file(
    path: &Path,
    size: u64,
    encoding: u32,
    opts: &DeltaOptions,
    remote: Option<&RemoteIndex>,
    base: &[u8],
) -> std::io::Result<Encoded> {
    let input = File::open(path)?;
    let now = input.metadata()?.len();
    if now != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("its size changed from {size} to {now} bytes since the transfer began"),
        ));
    }
    encode(input, size, encoding, opts, remote, base, path)
}

/// [`encode_file`] on an open file of `raw_size` bytes.
fn encode(
    mut input: File,
    raw_size: u64,
    encoding: u32,
    opts: &DeltaOptions,
    remote: Option<&RemoteIndex>,
    base: &[u8],
    path: &Path,
) -> std::io::Result<Encoded> {
    let mut tmp = tempfile::tempfile().map_err(|e| {
        let dir = std::env::temp_dir();
        std::io::Error::new(
            e.kind(),
            format!("cannot create its encoded copy in {}: {e}", dir.display()),
        )
    })?;
    let mut hasher = blake3::Hasher::new();
    let mut raw_hasher = blake3::Hasher::new();
    let mut out = Vec::with_capacity(8 << 20);
    let mut flush = |out: &mut Vec<u8>, tmp: &mut File, force: bool| {
        if force || out.len() >= 4 << 20 {
            hasher.update(out);
            let r = tmp.write_all(out).map_err(|e| {
                // Not the file's fault: say so (tempfile's error names the copy's path,
                // in TMPDIR).
                std::io::Error::new(e.kind(), format!("cannot write its encoded copy: {e}"))
            });
            out.clear();
            r
        } else {
            Ok(())
        }
    };
    let mut report = DeltaReport {
        raw_bytes: raw_size,
        receiver_cache_entries: remote.map_or(0, |r| r.len() as u64),
        ..DeltaReport::default()
    };
    let ps = opts.page_size;
    let (mut codec, mut chooser) = match opts.codec {
        Some(c) => (c, None),
        None => choose_codec(&input, raw_size, opts.link_bps)?,
    };
    let mut buf = vec![0u8; ps * 256];
    let invalid = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
    };
    if encoding == data::ENCODING_HDE_PAGES {
        if !raw_size.is_multiple_of(ps as u64) {
            return Err(invalid(&format!(
                "{} is not a whole number of {ps}-byte pages (use the stream layout)",
                path.display()
            )));
        }
        let pages = raw_size / ps as u64;
        let cfg = EncoderConfig {
            page_size: ps,
            codec,
            ..EncoderConfig::new(pages)
        };
        let mut enc = PageEncoder::new(cfg).map_err(|e| invalid(&e))?;
        let base_hash = |addr: u64| -> Option<u64> {
            let at = usize::try_from(addr).ok()?.checked_mul(8)?;
            let b: [u8; 8] = base.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        };
        let mut addr = 0u64;
        let mut left = raw_size;
        let mut seen = (0u64, 0u64);
        while left > 0 {
            let n = (left as usize).min(buf.len());
            input.read_exact(&mut buf[..n]).map_err(changed)?;
            raw_hasher.update(&buf[..n]);
            for page in buf[..n].chunks_exact(ps) {
                enc.push_with_base_hash(addr, page, base_hash(addr), remote, &mut out)
                    .map_err(|e| invalid(&e))?;
                addr += 1;
            }
            flush(&mut out, &mut tmp, false)?;
            left -= n as u64;
            // Learn the ratio the data actually gets, and change codec if another now wins.
            if let Some(ch) = chooser.as_mut() {
                let s = enc.stats();
                let (raw, comp) = (s.payload_raw - seen.0, s.payload_compressed - seen.1);
                if raw >= 8 << 20 {
                    ch.observe(codec, raw, comp);
                    seen = (s.payload_raw, s.payload_compressed);
                    let next = ch.choose(opts.link_bps as f64);
                    if next != codec {
                        tracing::debug!(from = %codec, to = %next, "codec chooser changed its mind");
                        codec = next;
                        enc.set_codec(next);
                        report.codec_changes += 1;
                    }
                }
            }
        }
        let s = enc.finish(&mut out);
        let psz = ps as u64;
        report.layout = "pages";
        report.saved_zero = s.zero * psz;
        report.saved_same = s.same * psz;
        report.saved_dup = s.dup * psz;
        report.saved_cache = s.cache * psz;
        report.saved_delta = (s.xor * psz).saturating_sub(s.xor_bytes);
        report.saved_compression = s.payload_raw.saturating_sub(s.payload_compressed);
    } else {
        let cfg = StreamConfig {
            codec,
            ..StreamConfig::default()
        };
        let mut enc = StreamEncoder::new(cfg).map_err(|e| invalid(&e))?;
        let mut read = 0u64;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            read += n as u64;
            if read > raw_size {
                return Err(invalid(&format!(
                    "the file grew beyond the {raw_size} bytes it had when the transfer began"
                )));
            }
            raw_hasher.update(&buf[..n]);
            enc.push(&buf[..n], remote, &mut out);
            flush(&mut out, &mut tmp, false)?;
        }
        if read < raw_size {
            return Err(changed(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let s = enc.finish(remote, &mut out);
        report.layout = "stream";
        report.saved_dup = s.dup_bytes;
        report.saved_cache = s.cache_bytes;
        report.saved_compression = s.payload_raw.saturating_sub(s.payload_compressed);
    }
    flush(&mut out, &mut tmp, true)?;
    let size = tmp.metadata()?.len();
    report.encoded_bytes = size;
    report.codec = codec.to_string();
    Ok(Encoded {
        file: tmp,
        size,
        digest: hasher.finalize(),
        encoding,
        raw_blake3: raw_hasher.finalize(),
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, bytes).unwrap();
        (dir, p)
    }

    /// A file whose size is not the one its transfer began with is refused by name, in
    /// either layout and either direction, and never encoded as something else.
    #[test]
    fn a_file_changed_since_its_transfer_began_is_refused_with_a_reason() {
        let opts = DeltaOptions {
            codec: Some(Codec::Zstd(2)),
            ..DeltaOptions::default()
        };
        let (_d, p) = file_of(&vec![7u8; 8 * 4096]);
        for enc in [data::ENCODING_HDE_PAGES, data::ENCODING_HDE_STREAM] {
            // Sized once, then changed before the encoder opened it.
            let Err(e) = encode_file(&p, 4 * 4096, enc, &opts, None, &[]) else {
                panic!("{enc}: a changed size was encoded");
            };
            assert!(
                e.to_string().contains("size changed from 16384 to 32768"),
                "{e}"
            );
            // Shorter or longer than its size while being read.
            for (claimed, says) in [(16 * 4096, "ended before"), (4 * 4096, "grew beyond")] {
                let input = File::open(&p).unwrap();
                let r = encode(input, claimed, enc, &opts, None, &[], &p);
                if enc == data::ENCODING_HDE_PAGES && claimed < 8 * 4096 {
                    // The page layout reads what the size says and no further.
                    assert!(r.is_ok());
                    continue;
                }
                let Err(e) = r else {
                    panic!("{enc} {claimed}: encoded");
                };
                assert!(e.to_string().contains(says), "{enc} {claimed}: {e}");
            }
            // Unchanged: encoded.
            let ok = encode_file(&p, 8 * 4096, enc, &opts, None, &[]).unwrap();
            assert_eq!(ok.report.raw_bytes, 8 * 4096);
        }
    }
}
