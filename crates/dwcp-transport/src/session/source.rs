//! Reading a file to send ahead of the streams.
//!
//! The sender's digest covers the file in order, and chunks leave in order of reading. The
//! first version read each 256 KiB chunk through `tokio::fs` (a hop to the blocking pool per
//! chunk) and hashed it, all under the lock every stream takes for its next chunk: at
//! datacenter speed (4,000 chunks a second) the streams spent a sixth of the time waiting on
//! that lock. A [`SourceReader`] instead reads on a thread of its own, in blocks of several
//! chunks (one allocation, one system call, one hash update per block; the chunks are slices
//! of it), hashes as it goes, and stays a bounded number of chunks ahead. Taking a chunk
//! under the lock is then a queue pop.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Bytes read from the file per system call (rounded to whole chunks).
const BLOCK: usize = 4 << 20;

/// Chunks the reader may be ahead of the streams (twice a block of 256 KiB chunks).
const AHEAD_CHUNKS: usize = 32;

/// Reads `[have, size)` of a file in chunks, on its own thread, and the BLAKE3 digest of all
/// of `[0, size)`.
#[derive(Debug)]
pub(crate) struct SourceReader {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    digest: Option<oneshot::Receiver<io::Result<blake3::Hash>>>,
    /// The digest once received (the end of an object may be sent more than once).
    hash: Option<blake3::Hash>,
    /// The next chunk, taken off the queue by [`ready`](Self::ready).
    peeked: Option<Bytes>,
    /// Offset of the next chunk to hand out.
    next: u64,
    /// End of the file.
    size: u64,
}

impl SourceReader {
    /// Starts reading `file`: the first `have` bytes are only hashed (the receiver holds
    /// them), the rest is cut into chunks of `chunk` bytes (the last may be shorter).
    pub(crate) fn start(file: File, have: u64, size: u64, chunk: usize) -> io::Result<Self> {
        let chunk = chunk.max(1);
        let (tx, chunks) = mpsc::channel(AHEAD_CHUNKS);
        let (digest_tx, digest) = oneshot::channel();
        std::thread::Builder::new()
            .name("dwcp-source".into())
            .spawn(move || {
                let mut digest_tx = Some(digest_tx);
                if let Err(e) = read(file, have, size, chunk, &tx, &mut digest_tx) {
                    let copy = io::Error::new(e.kind(), e.to_string());
                    if let Some(d) = digest_tx.take() {
                        let _ = d.send(Err(copy));
                    }
                    let _ = tx.blocking_send(Err(e));
                }
            })?;
        Ok(Self {
            chunks,
            digest: Some(digest),
            hash: None,
            peeked: None,
            next: have.min(size),
            size,
        })
    }

    /// Waits until the next chunk is read (at once when every chunk was handed out).
    /// Cancel-safe: a chunk that arrives is kept for [`take`](Self::take), so a caller may
    /// wait here before committing to a read and be cancelled without losing one.
    pub(crate) async fn ready(&mut self) -> io::Result<()> {
        if self.peeked.is_some() || self.next >= self.size {
            return Ok(());
        }
        match self.chunks.recv().await {
            Some(r) => {
                self.peeked = Some(r?);
                Ok(())
            }
            None => Err(io::Error::other("the source reader stopped")),
        }
    }

    /// The chunk at `offset` of `len` bytes, which must be the next one and
    /// [`ready`](Self::ready).
    pub(crate) fn take(&mut self, offset: u64, len: usize) -> io::Result<Bytes> {
        if offset != self.next {
            // The scheduler reads in order; anything else is a bug, not a bad file.
            return Err(io::Error::other(format!(
                "chunk at {offset} asked for, the source is at {}",
                self.next
            )));
        }
        let data = self
            .peeked
            .take()
            .ok_or_else(|| io::Error::other(format!("chunk at {offset} is not read yet")))?;
        if data.len() != len {
            return Err(io::Error::other(format!(
                "chunk at {offset}: {} bytes read, {len} expected",
                data.len()
            )));
        }
        self.next += len as u64;
        Ok(data)
    }

    /// The chunk at `offset` of `len` bytes: the next one in order.
    #[cfg(test)]
    pub(crate) async fn chunk(&mut self, offset: u64, len: usize) -> io::Result<Bytes> {
        if offset != self.next {
            return self.take(offset, len);
        }
        self.ready().await?;
        self.take(offset, len)
    }

    /// The digest of the whole file; ready as soon as the last chunk has been taken.
    pub(crate) async fn digest(&mut self) -> io::Result<blake3::Hash> {
        if let Some(h) = self.hash {
            return Ok(h);
        }
        let rx = self
            .digest
            .as_mut()
            .ok_or_else(|| io::Error::other("the source reader failed earlier"))?;
        let r = rx
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the source reader stopped")));
        self.digest = None;
        self.hash = r.as_ref().ok().copied();
        r
    }
}

/// The reader thread. Returns early (without error) once the [`SourceReader`] is dropped.
fn read(
    mut file: File,
    have: u64,
    size: u64,
    chunk: usize,
    tx: &mpsc::Sender<io::Result<Bytes>>,
    digest_tx: &mut Option<oneshot::Sender<io::Result<blake3::Hash>>>,
) -> io::Result<()> {
    let mut hasher = blake3::Hasher::new();
    let block = (BLOCK / chunk).max(1) * chunk;
    let mut left = have.min(size);
    let mut buf = Vec::new();
    while left > 0 {
        if tx.is_closed() {
            return Ok(());
        }
        let n = left.min(block as u64) as usize;
        fill(&mut file, &mut buf, n)?;
        hasher.update(&buf);
        left -= n as u64;
    }
    file.seek(SeekFrom::Start(have.min(size)))?;
    let mut at = have.min(size);
    if at == size {
        if let Some(d) = digest_tx.take() {
            let _ = d.send(Ok(hasher.finalize()));
        }
        return Ok(());
    }
    while at < size {
        let n = (size - at).min(block as u64) as usize;
        let mut data = Vec::new();
        fill(&mut file, &mut data, n)?;
        hasher.update(&data);
        at += n as u64;
        if at == size {
            // Before the last chunk goes out, so whoever takes it finds the digest ready.
            if let Some(d) = digest_tx.take() {
                let _ = d.send(Ok(hasher.finalize()));
            }
        }
        let mut data = Bytes::from(data);
        while !data.is_empty() {
            let c = data.split_to(chunk.min(data.len()));
            if tx.blocking_send(Ok(c)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Replaces `buf`'s contents with the next `n` bytes of `file`; a file that ends sooner is an
/// error. Reads into spare capacity, so the buffer is not zeroed first.
fn fill(file: &mut File, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    buf.clear();
    buf.reserve_exact(n);
    let got = file.by_ref().take(n as u64).read_to_end(buf)?;
    if got < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the file ended {} bytes early (was it changed?)", n - got),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, bytes).unwrap();
        let f = File::open(&p).unwrap();
        (dir, f)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    async fn read_all(r: &mut SourceReader, have: u64, size: u64, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = have;
        while at < size {
            let len = ((size - at) as usize).min(chunk);
            let c = r.chunk(at, len).await.unwrap();
            out.extend_from_slice(&c);
            at += len as u64;
        }
        out
    }

    #[tokio::test]
    async fn chunks_in_order_and_the_digest_of_the_whole_file() {
        // More than one block, chunks that do not divide it, a short last chunk.
        let bytes = pattern(9 * (1 << 20) + 12_345);
        let (_d, f) = file_with(&bytes);
        let size = bytes.len() as u64;
        let chunk = 300_000;
        let mut r = SourceReader::start(f, 0, size, chunk).unwrap();
        assert_eq!(read_all(&mut r, 0, size, chunk).await, bytes);
        assert_eq!(r.digest().await.unwrap(), blake3::hash(&bytes));
        // Asked again (an end sent again on another stream): the same digest.
        assert_eq!(r.digest().await.unwrap(), blake3::hash(&bytes));
    }

    #[tokio::test]
    async fn a_resumed_file_is_hashed_whole_but_only_the_rest_is_read_out() {
        let bytes = pattern(5 * (1 << 20) + 7);
        let (_d, f) = file_with(&bytes);
        let size = bytes.len() as u64;
        let have = 4 * (1 << 20) + 3;
        let mut r = SourceReader::start(f, have, size, 65_536).unwrap();
        assert_eq!(
            read_all(&mut r, have, size, 65_536).await,
            &bytes[have as usize..]
        );
        assert_eq!(r.digest().await.unwrap(), blake3::hash(&bytes));
    }

    #[tokio::test]
    async fn all_held_already_gives_the_digest_and_no_chunks() {
        let bytes = pattern(100_000);
        let (_d, f) = file_with(&bytes);
        let mut r = SourceReader::start(f, 100_000, 100_000, 4096).unwrap();
        assert_eq!(r.digest().await.unwrap(), blake3::hash(&bytes));
        let (_d, f) = file_with(&[]);
        let mut r = SourceReader::start(f, 0, 0, 4096).unwrap();
        assert_eq!(r.digest().await.unwrap(), blake3::hash(&[]));
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_is_an_error_not_a_hang() {
        let bytes = pattern(10_000);
        let (_d, f) = file_with(&bytes);
        let mut r = SourceReader::start(f, 0, 20_000, 4096).unwrap();
        let mut err = None;
        for i in 0..5u64 {
            let len = (20_000 - i * 4096).min(4096) as usize;
            if let Err(e) = r.chunk(i * 4096, len).await {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("a short file must fail");
        assert!(e.to_string().contains("early"), "{e}");
        assert!(r.digest().await.is_err());
        // A shorter prefix than the receiver claims to hold fails too.
        let (_d, f) = file_with(&bytes);
        let mut r = SourceReader::start(f, 15_000, 20_000, 4096).unwrap();
        assert!(r.chunk(15_000, 4096).await.is_err());
    }

    #[tokio::test]
    async fn waiting_for_a_chunk_can_be_cancelled_without_losing_it() {
        // A stream's task may be aborted while it waits for the reader: the chunk it was
        // waiting for must still be there for the next one.
        let bytes = pattern(3 * (1 << 20) + 999);
        let (_d, f) = file_with(&bytes);
        let size = bytes.len() as u64;
        let chunk = 100_000;
        let mut r = SourceReader::start(f, 0, size, chunk).unwrap();
        let (mut out, mut at, mut cancelled) = (Vec::new(), 0u64, 0);
        while at < size {
            // Cancelled whenever the chunk is not there within a microsecond.
            match tokio::time::timeout(std::time::Duration::from_micros(1), r.ready()).await {
                Err(_) => {
                    cancelled += 1;
                    assert!(cancelled < 1_000_000);
                    continue;
                }
                Ok(ready) => ready.unwrap(),
            }
            let len = ((size - at) as usize).min(chunk);
            out.extend_from_slice(&r.take(at, len).unwrap());
            at += len as u64;
        }
        assert_eq!(out, bytes);
        assert!(r.take(at, 1).is_err(), "nothing past the end");
        assert_eq!(r.digest().await.unwrap(), blake3::hash(&bytes));
    }

    #[tokio::test]
    async fn asking_out_of_order_is_refused() {
        let bytes = pattern(10_000);
        let (_d, f) = file_with(&bytes);
        let mut r = SourceReader::start(f, 0, 10_000, 4096).unwrap();
        assert!(r.chunk(4096, 4096).await.is_err());
        assert_eq!(r.chunk(0, 4096).await.unwrap(), &bytes[..4096]);
    }

    #[test]
    fn dropping_it_ends_the_thread() {
        // A file far bigger than the read-ahead: the thread blocks on the full queue until
        // its receiver is dropped, then returns.
        let bytes = pattern(12 << 20);
        let (_d, f) = file_with(&bytes);
        let (t, mut c) = mpsc::channel(1);
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut d = None;
            let r = read(f, 0, 12 << 20, 4096, &t, &mut d);
            let _ = done_tx.send(r.is_ok());
        });
        let first = c.blocking_recv().unwrap().unwrap();
        assert_eq!(first, &bytes[..4096]);
        assert!(done.try_recv().is_err(), "the thread is waiting, not done");
        drop(c);
        let ended = done.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(ended, Ok(true));
    }
}
