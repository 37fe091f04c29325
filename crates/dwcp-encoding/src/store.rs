//! Where decoded pages go and where referenced content comes from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::hash::Key;

/// The receiver's copy of a page-addressed object: a memory image or a disk image. Also
/// the *base* the sender's XOR deltas and "same as base" runs refer to: whatever the store
/// held at an address before this object arrived.
pub trait PageStore {
    /// Number of pages the store can hold.
    fn page_count(&self) -> u64;
    /// Reads the page at `addr` into `buf` (one page long). `Ok(false)` when the store has
    /// no content there (a hole, or a file shorter than the address).
    fn read_page(&mut self, addr: u64, buf: &mut [u8]) -> io::Result<bool>;
    /// Writes `data`, a whole number of pages, starting at page `addr`.
    fn write_pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()>;
    /// Writes `count` zero pages from `addr`.
    fn write_zero(&mut self, addr: u64, count: u64, page_size: usize) -> io::Result<()> {
        zero_by_writing(self, addr, count, page_size)
    }
}

/// Content the receiver can serve by strong hash: its baseline cache.
pub trait ContentSource {
    /// Copies the content named `key` into `buf` if held *and verified* (its strong hash
    /// recomputed); anything else is a miss.
    fn fetch(&mut self, key: &Key, buf: &mut Vec<u8>) -> bool;
    /// Offered every page or chunk that arrived as new content, for later transfers.
    fn learn(&mut self, _data: &[u8]) {}
    /// As [`learn`](Self::learn), for content whose key the caller has computed already
    /// (`key` is `Key::of(data)`), so that the source need not hash it again.
    fn learn_keyed(&mut self, _key: &Key, data: &[u8]) {
        self.learn(data);
    }
}

/// No baseline cache: every reference misses.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCache;

impl ContentSource for NoCache {
    fn fetch(&mut self, _key: &Key, _buf: &mut Vec<u8>) -> bool {
        false
    }
}

/// A page store in memory (tests, benchmarks, the memory-image backend).
#[derive(Debug, Clone)]
pub struct MemStore {
    data: Vec<u8>,
    page_size: usize,
}

impl MemStore {
    /// `pages` zero pages of `page_size` bytes.
    pub fn zeroed(pages: u64, page_size: usize) -> Self {
        Self {
            data: vec![0; pages as usize * page_size],
            page_size,
        }
    }

    /// A store holding `data` (whose length must be a multiple of `page_size`).
    pub fn from_vec(data: Vec<u8>, page_size: usize) -> Self {
        debug_assert_eq!(data.len() % page_size, 0);
        Self { data, page_size }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// Gives the bytes back.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    fn range(&self, addr: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(addr)
            .ok()
            .and_then(|a| a.checked_mul(self.page_size))
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= self.data.len()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page beyond the store"))?;
        Ok(start..start + len)
    }
}

impl PageStore for MemStore {
    fn page_count(&self) -> u64 {
        (self.data.len() / self.page_size) as u64
    }

    fn read_page(&mut self, addr: u64, buf: &mut [u8]) -> io::Result<bool> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(true)
    }

    fn write_pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        let r = self.range(addr, data.len())?;
        self.data[r].copy_from_slice(data);
        Ok(())
    }

    fn write_zero(&mut self, addr: u64, count: u64, page_size: usize) -> io::Result<()> {
        let len = run_len(count, page_size)?;
        let r = self.range(addr, len)?;
        self.data[r].fill(0);
        Ok(())
    }
}

/// A page store over a file of a fixed size (a disk or memory image on the receiver).
/// Reads past the end of the file's current data are holes.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    pages: u64,
    page_size: usize,
    held: u64,
    /// Cleared once the filesystem refused to punch a hole: zeros are written from then on.
    punch: bool,
}

impl FileStore {
    /// Opens `file` as a store of `pages` pages; its current contents are the base.
    pub fn new(file: File, pages: u64, page_size: usize) -> io::Result<Self> {
        let held = file.metadata()?.len();
        Ok(Self {
            file,
            pages,
            page_size,
            held,
            punch: true,
        })
    }

    /// Gives the file back.
    pub fn into_file(self) -> File {
        self.file
    }

    fn offset(&self, addr: u64, len: usize) -> io::Result<u64> {
        let end = addr
            .checked_mul(self.page_size as u64)
            .and_then(|o| o.checked_add(len as u64).map(|e| (o, e)))
            .filter(|&(_, e)| e <= self.pages * self.page_size as u64);
        end.map(|(o, _)| o)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page beyond the store"))
    }
}

impl PageStore for FileStore {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_page(&mut self, addr: u64, buf: &mut [u8]) -> io::Result<bool> {
        let off = self.offset(addr, buf.len())?;
        if off + buf.len() as u64 > self.held {
            return Ok(false);
        }
        self.file.read_exact_at(buf, off)?;
        Ok(true)
    }

    fn write_pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        let off = self.offset(addr, data.len())?;
        self.file.write_all_at(data, off)?;
        self.held = self.held.max(off + data.len() as u64);
        Ok(())
    }

    /// Zero pages become a hole in the file: no disk space and no writing (a third of a
    /// VM's memory is zero pages). Where the filesystem cannot punch holes, zeros are written.
    fn write_zero(&mut self, addr: u64, count: u64, page_size: usize) -> io::Result<()> {
        let len = run_len(count, page_size)?;
        let off = self.offset(addr, len)?;
        let end = off + len as u64;
        // Within the file: punch. Beyond its end: growing it leaves a hole there.
        let within = end.min(self.held).saturating_sub(off);
        if within > 0 && !self.punch {
            return zero_by_writing(self, addr, count, page_size);
        }
        if within > 0 {
            let punched = rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                off,
                within,
            );
            match punched {
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                    self.punch = false;
                    return zero_by_writing(self, addr, count, page_size);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if end > self.held {
            self.file.set_len(end)?;
            self.held = end;
        }
        Ok(())
    }
}

/// Bytes of a run of `count` pages of `page_size`, if that fits in memory's addresses.
fn run_len(count: u64, page_size: usize) -> io::Result<usize> {
    usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(page_size))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "run too long"))
}

/// [`PageStore::write_zero`]'s own way: zeros written, a batch at a time.
fn zero_by_writing<S: PageStore + ?Sized>(
    store: &mut S,
    addr: u64,
    count: u64,
    page_size: usize,
) -> io::Result<()> {
    const BATCH: u64 = 64;
    let zeros = vec![0u8; page_size * BATCH as usize];
    let mut done = 0;
    while done < count {
        let n = (count - done).min(BATCH);
        store.write_pages(addr + done, &zeros[..n as usize * page_size])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn zero_pages_in_a_file_store_are_holes_and_read_back_as_zeros() {
        let ps = 4096;
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 * ps as u64).unwrap();
        let mut store = FileStore::new(file.try_clone().unwrap(), 128, ps).unwrap();
        store.write_pages(0, &vec![0xA5; 64 * ps]).unwrap();
        file.sync_all().unwrap();
        let full = file.metadata().unwrap().blocks();
        // Pages 8..40 zero again; 60..70 runs past the file's end (64 pages).
        store.write_zero(8, 32, ps).unwrap();
        store.write_zero(60, 10, ps).unwrap();
        file.sync_all().unwrap();
        if store.punch {
            assert!(
                file.metadata().unwrap().blocks() < full,
                "no disk space is given back: {} blocks, {full} before",
                file.metadata().unwrap().blocks()
            );
        } else {
            eprintln!("note: this filesystem does not punch holes: zeros were written");
        }
        assert_eq!(file.metadata().unwrap().len(), 70 * ps as u64);
        let mut page = vec![1u8; ps];
        for addr in 0..70 {
            assert!(
                store.read_page(addr, &mut page).unwrap(),
                "page {addr} is held"
            );
            let zero = (8..40).contains(&addr) || addr >= 60;
            let want = if zero { 0 } else { 0xA5 };
            assert!(page.iter().all(|&b| b == want), "page {addr}");
        }
        assert!(store.write_zero(120, 9, ps).is_err(), "beyond the store");
        // The fallback writes the same zeros.
        zero_by_writing(&mut store, 0, 2, ps).unwrap();
        assert!(store.read_page(1, &mut page).unwrap());
        assert!(page.iter().all(|&b| b == 0));
    }
}
