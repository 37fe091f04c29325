//! Memory that lives in a file of its own: a region bigger than the host's RAM (a generated
//! VM image of 32 GiB on a 24 GiB host), which the kernel writes back and reads in as it
//! needs, instead of killing the process.
//!
//! The file is created without a name (`O_TMPFILE`, or created and unlinked at once), so
//! no other process can open it by path, and it is never truncated while mapped: what the
//! mapping's `unsafe` needs (nothing else changes the bytes under the slice) holds for the
//! life of [`FileMemory`]. The disk space goes back to the filesystem when it is dropped.

use std::io;
use std::ops::{Deref, DerefMut};
use std::path::Path;

/// `len` bytes of zeroed, writable memory backed by an unnamed file. Pages never written
/// take no disk space (the file is sparse) and, once written, no RAM beyond the page cache
/// the kernel lends them.
#[derive(Debug)]
pub struct FileMemory {
    #[cfg(target_os = "linux")]
    map: memmap2::MmapMut,
    /// The same bytes, for reading in bulk through the page cache's own read-ahead.
    #[cfg(target_os = "linux")]
    file: std::fs::File,
}

impl FileMemory {
    /// Creates the file in `dir` and maps it. `len` must be at least one byte.
    #[cfg(target_os = "linux")]
    pub fn create_in(dir: &Path, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "file-backed memory of 0 bytes",
            ));
        }
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(len as u64)?;
        // SAFETY: the file has no name (see the module's documentation): no other process
        // opens it by path (only through this process's `/proc/PID/fd`, as its memory could
        // be), this process maps it once and never truncates it or writes it but through
        // this mapping, so the bytes under the slice change only through it. (A write to a
        // hole when the filesystem is full raises SIGBUS, as for any shared file mapping:
        // callers check the space first.)
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file)? };
        // A fault reads its own page only: the kernel's read-around (up to `read_ahead_kb`,
        // often megabytes) for each of a guest's scattered writes read the file many times
        // over once it no longer fitted in memory. Sequential readers use `read_at`. A
        // hint: without it this is only slower.
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Self { map, file })
    }

    /// Copies `buf.len()` bytes from `offset` into `buf` by reading the file: what the
    /// mapping holds (one page cache), read ahead as a sequential read is, where faulting in
    /// the mapping page by page waits for each page's read in turn.
    pub fn read_at(&self, buf: &mut [u8], offset: usize) -> io::Result<()> {
        if offset.checked_add(buf.len()).is_none_or(|e| e > self.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read beyond file-backed memory",
            ));
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset as u64)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = buf;
            Err(io::ErrorKind::Unsupported.into())
        }
    }

    /// Not supported off Linux.
    #[cfg(not(target_os = "linux"))]
    pub fn create_in(_dir: &Path, _len: usize) -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "file-backed memory is implemented for Linux only",
        ))
    }
}

impl Deref for FileMemory {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        #[cfg(target_os = "linux")]
        {
            &self.map
        }
        #[cfg(not(target_os = "linux"))]
        {
            &[]
        }
    }
}

impl DerefMut for FileMemory {
    fn deref_mut(&mut self) -> &mut [u8] {
        #[cfg(target_os = "linux")]
        {
            &mut self.map
        }
        #[cfg(not(target_os = "linux"))]
        {
            &mut []
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn file_memory_is_zeroed_writable_sparse_and_nameless() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = FileMemory::create_in(dir.path(), 64 << 20).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.iter().step_by(4096).all(|&b| b == 0));
        m[5 << 20..(5 << 20) + 4096].fill(0xAB);
        assert_eq!(m[(5 << 20) + 17], 0xAB);
        assert_eq!(m[(5 << 20) + 4096], 0);
        // Reading the file sees what was written through the mapping.
        let mut buf = vec![1u8; 8192];
        m.read_at(&mut buf, (5 << 20) - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0xAB));
        assert!(
            m.read_at(&mut buf, (64 << 20) - 4096).is_err(),
            "beyond the end"
        );
        // No name left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(FileMemory::create_in(dir.path(), 0).is_err());
        assert!(FileMemory::create_in(&dir.path().join("missing"), 4096).is_err());
    }
}
