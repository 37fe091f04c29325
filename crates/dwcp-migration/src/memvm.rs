//! The memory-image VM: a guest memory image under a live dirtying workload, with real dirty
//! tracking — the backend for tests, the demo and benchmarks, and the model of what the QEMU
//! backend provides.
//!
//! The workload runs in its own thread, writing pages at a set rate (hot and cold pages,
//! small edits and whole-page rewrites, as [`DirtyModel`] says). Every write marks its page
//! dirty under the same lock, so a round that takes the dirty set and then copies pages can
//! only miss writes that mark pages dirty again: the next round sends them. Pausing stops
//! the workload between two writes; throttling takes a share of its time away
//! (auto-converge).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_encoding::image::{Corpus, Dirtier, DirtyModel};
use dwcp_sys::FileMemory;

/// Where a VM's memory lives.
#[derive(Debug)]
pub enum Backing {
    /// This process's memory.
    Heap(Vec<u8>),
    /// A file of its own, which the kernel pages in and out: a VM bigger than the memory
    /// the host can spare.
    File(FileMemory),
}

impl Backing {
    /// Appends the bytes of `range` (within the memory) to `out`. Memory in a file is read
    /// from the file, with the page cache's read-ahead, rather than faulted in page by page.
    fn copy_into(&self, range: std::ops::Range<usize>, out: &mut Vec<u8>) {
        let Some(src) = self.get(range.clone()) else {
            return;
        };
        if let Self::File(m) = self {
            let at = out.len();
            out.resize(at + range.len(), 0);
            if m.read_at(&mut out[at..], range.start).is_ok() {
                return;
            }
            // The mapping holds the same bytes.
            out.truncate(at);
        }
        out.extend_from_slice(src);
    }
}

impl From<Vec<u8>> for Backing {
    fn from(v: Vec<u8>) -> Self {
        Self::Heap(v)
    }
}

impl From<FileMemory> for Backing {
    fn from(m: FileMemory) -> Self {
        Self::File(m)
    }
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Heap(v) => v,
            Self::File(m) => m,
        }
    }
}

impl DerefMut for Backing {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Heap(v) => v,
            Self::File(m) => m,
        }
    }
}

#[derive(Debug)]
struct Memory {
    data: Backing,
    /// One bit per page written since the dirty set was last taken.
    dirty: Vec<u64>,
}

#[derive(Debug, Default)]
struct Control {
    paused: bool,
    throttle: u8,
    stop: bool,
}

#[derive(Debug)]
struct Inner {
    mem: Mutex<Memory>,
    control: Mutex<Control>,
    wake: Condvar,
    writes: AtomicU64,
    page_size: usize,
    pages: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running memory-image VM.
#[derive(Debug)]
pub struct MemoryVm {
    inner: Arc<Inner>,
    workload: Option<JoinHandle<()>>,
}

impl MemoryVm {
    /// Starts a VM over `image` (a whole number of `page_size` pages) whose workload writes
    /// `writes_per_sec` pages per second as `model` says. Every page starts dirty.
    pub fn start(
        image: impl Into<Backing>,
        page_size: usize,
        model: DirtyModel,
        writes_per_sec: f64,
        seed: u64,
    ) -> Self {
        let image = image.into();
        let pages = (image.len() / page_size) as u64;
        let words = pages.div_ceil(64) as usize;
        let mut dirty = vec![u64::MAX; words];
        if !pages.is_multiple_of(64)
            && let Some(last) = dirty.last_mut()
        {
            *last = (1u64 << (pages % 64)) - 1;
        }
        let inner = Arc::new(Inner {
            mem: Mutex::new(Memory { data: image, dirty }),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
            writes: AtomicU64::new(0),
            page_size,
            pages,
        });
        let workload = (writes_per_sec > 0.0 && pages > 0).then(|| {
            let inner = inner.clone();
            std::thread::spawn(move || run_workload(&inner, model, writes_per_sec, seed))
        });
        Self { inner, workload }
    }

    /// Pages of memory.
    pub fn pages(&self) -> u64 {
        self.inner.pages
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.inner.page_size
    }

    /// Page writes the workload has made.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// Takes the dirty set: the pages written since the last call (all pages at first), in
    /// order, and starts tracking afresh.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut m = lock(&self.inner.mem);
        let mut out = Vec::new();
        for (w, word) in m.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Marks every page dirty: the next [`take_dirty`](Self::take_dirty) takes them all (a
    /// migration's first round, whatever was taken before: an earlier attempt's rounds).
    pub fn mark_all_dirty(&self) {
        let pages = self.inner.pages;
        let mut m = lock(&self.inner.mem);
        m.dirty.fill(u64::MAX);
        if !pages.is_multiple_of(64)
            && let Some(last) = m.dirty.last_mut()
        {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }

    /// How many pages are dirty now.
    pub fn dirty_count(&self) -> u64 {
        lock(&self.inner.mem)
            .dirty
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Copies the pages at `addrs` (in that order) into `out`, a consistent copy of each page.
    pub fn copy_pages(&self, addrs: &[u64], out: &mut Vec<u8>) {
        self.reader().copy_pages(addrs, out);
    }

    /// A handle that copies pages from another thread (an encoder running beside the sender).
    pub fn reader(&self) -> PageReader {
        PageReader {
            inner: self.inner.clone(),
        }
    }

    /// The summary hash (XXH3-64) of every page, for comparing with the destination.
    pub fn page_hashes(&self) -> Vec<u64> {
        let m = lock(&self.inner.mem);
        let ps = self.inner.page_size;
        let step = (8 << 20) / ps * ps;
        let len = self.inner.pages as usize * ps;
        let mut out = Vec::with_capacity(self.inner.pages as usize);
        let mut buf = Vec::with_capacity(step);
        for at in (0..len).step_by(step) {
            buf.clear();
            m.data.copy_into(at..(at + step).min(len), &mut buf);
            out.extend(buf.chunks_exact(ps).map(dwcp_encoding::fast64));
        }
        out
    }

    /// Pauses the guest: no write happens until [`resume`](Self::resume).
    pub fn pause(&self) {
        lock(&self.inner.control).paused = true;
        // Taking the memory lock waits for a write in progress to finish.
        drop(lock(&self.inner.mem));
    }

    /// Lets the guest run again.
    pub fn resume(&self) {
        lock(&self.inner.control).paused = false;
        self.inner.wake.notify_all();
    }

    /// Takes `percent`% of the guest's time away (auto-converge); 0 lifts it.
    pub fn throttle(&self, percent: u8) {
        lock(&self.inner.control).throttle = percent.min(99);
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        lock(&self.inner.control).paused
    }
}

/// Reads a [`MemoryVm`]'s pages; see [`MemoryVm::reader`].
#[derive(Clone)]
pub struct PageReader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageReader")
            .field("pages", &self.inner.pages)
            .field("page_size", &self.inner.page_size)
            .finish()
    }
}

impl PageReader {
    /// Pages of memory.
    pub fn pages(&self) -> u64 {
        self.inner.pages
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.inner.page_size
    }

    /// Copies the pages at `addrs` (in that order) into `out`, a consistent copy of each page.
    pub fn copy_pages(&self, addrs: &[u64], out: &mut Vec<u8>) {
        let ps = self.inner.page_size;
        let m = lock(&self.inner.mem);
        // Runs of neighbouring pages copied as one (memory in a file: read as one).
        let mut i = 0;
        while i < addrs.len() {
            let mut j = i + 1;
            while j < addrs.len() && addrs[j - 1].checked_add(1) == Some(addrs[j]) {
                j += 1;
            }
            let start = addrs[i] as usize * ps;
            m.data.copy_into(start..start + (j - i) * ps, out);
            i = j;
        }
    }
}

impl Drop for MemoryVm {
    fn drop(&mut self) {
        lock(&self.inner.control).stop = true;
        self.inner.wake.notify_all();
        if let Some(h) = self.workload.take() {
            let _ = h.join();
        }
    }
}

/// The workload: every tick, the writes due at the (throttled) rate.
fn run_workload(inner: &Inner, model: DirtyModel, rate: f64, seed: u64) {
    const TICK: Duration = Duration::from_millis(5);
    let mut dirtier = Dirtier::new(model, inner.pages, inner.page_size, seed);
    let mut corpus = Corpus::synthetic();
    let ps = inner.page_size;
    let mut owed = 0.0f64;
    let mut last = Instant::now();
    loop {
        let throttle = {
            let mut c = lock(&inner.control);
            while c.paused && !c.stop {
                c = inner
                    .wake
                    .wait(c)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                last = Instant::now();
            }
            if c.stop {
                return;
            }
            c.throttle
        };
        let now = Instant::now();
        owed += rate * now.duration_since(last).as_secs_f64() * f64::from(100 - throttle) / 100.0;
        last = now;
        // At most 50 ms worth at once, so a stall does not turn into a burst; and at most 256
        // writes per hold of the memory lock, so a round copying pages waits little.
        let mut n = owed.min(rate * 0.05).floor() as u64;
        owed -= n as f64;
        while n > 0 {
            let chunk = n.min(256);
            n -= chunk;
            let mut m = lock(&inner.mem);
            // Re-check under the memory lock: `pause` takes it after setting the flag.
            if lock(&inner.control).paused || lock(&inner.control).stop {
                owed = 0.0;
                break;
            }
            for _ in 0..chunk {
                let a = dirtier.pick();
                let s = a as usize * ps;
                let Memory { data, dirty } = &mut *m;
                if let Some(page) = data.get_mut(s..s + ps) {
                    dirtier.write_page(page, &mut corpus);
                    dirty[(a / 64) as usize] |= 1 << (a % 64);
                }
            }
            // Counted under the memory lock: once `pause` has taken it, the count is final.
            inner.writes.fetch_add(chunk, Ordering::Relaxed);
            drop(m);
        }
        std::thread::sleep(TICK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_tracking_sees_every_write_and_pause_stops_them() {
        let vm = MemoryVm::start(
            vec![0u8; 4096 * 1024],
            4096,
            DirtyModel::default(),
            20_000.0,
            1,
        );
        assert_eq!(vm.take_dirty().len(), 1024, "all pages start dirty");
        let before = vm.page_hashes();
        std::thread::sleep(Duration::from_millis(100));
        vm.pause();
        let dirty = vm.take_dirty();
        let after = vm.page_hashes();
        assert!(vm.writes() > 100, "the workload wrote: {}", vm.writes());
        // Every page that changed is in the dirty set.
        for p in 0..1024u64 {
            if before[p as usize] != after[p as usize] {
                assert!(
                    dirty.binary_search(&p).is_ok(),
                    "page {p} changed but is not dirty"
                );
            }
        }
        // Paused: nothing changes.
        let w = vm.writes();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vm.writes(), w);
        assert_eq!(vm.dirty_count(), 0);
        assert_eq!(vm.page_hashes(), after);
        vm.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert!(vm.writes() > w);
    }

    #[test]
    fn memory_in_a_file_reads_and_hashes_as_memory_in_the_process() {
        // 3 MiB + 4 KiB: a page past the 8 MiB steps is not the point, an uneven end is.
        let pages = 769usize;
        let mut content = vec![0u8; pages * 4096];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / 4096 * 7 + i % 251) as u8;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut mem = FileMemory::create_in(dir.path(), content.len()).unwrap();
        mem.copy_from_slice(&content);
        // No workload: the two must stay equal.
        let heap = MemoryVm::start(content, 4096, DirtyModel::default(), 0.0, 3);
        let file = MemoryVm::start(mem, 4096, DirtyModel::default(), 0.0, 3);
        assert_eq!(heap.page_hashes(), file.page_hashes());
        let addrs = [0u64, 1, 2, 5, 768, 767, 100, 101, 4000];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        heap.copy_pages(&addrs, &mut a);
        file.copy_pages(&addrs, &mut b);
        assert_eq!(a.len(), 8 * 4096, "the page beyond the memory is left out");
        assert!(a == b, "the same pages, in the order asked for");
    }

    #[test]
    fn throttling_slows_the_workload() {
        let vm = MemoryVm::start(
            vec![0u8; 4096 * 256],
            4096,
            DirtyModel::default(),
            50_000.0,
            2,
        );
        std::thread::sleep(Duration::from_millis(100));
        let (w0, t0) = (vm.writes(), Instant::now());
        std::thread::sleep(Duration::from_millis(150));
        let full = (vm.writes() - w0) as f64 / t0.elapsed().as_secs_f64();
        vm.throttle(90);
        std::thread::sleep(Duration::from_millis(30));
        let (w1, t1) = (vm.writes(), Instant::now());
        std::thread::sleep(Duration::from_millis(150));
        let slow = (vm.writes() - w1) as f64 / t1.elapsed().as_secs_f64();
        assert!(slow < full / 3.0, "throttled {slow:.0}/s vs {full:.0}/s");
    }
}
