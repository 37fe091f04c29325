//! Realistic VM memory images, deterministic from a seed, and a dirtying workload.
//!
//! A guest's RAM is mostly zero pages, pages of the files it has loaded (binaries, libraries,
//! text in the page cache), duplicates, and a tail of high-entropy data (encrypted or
//! compressed buffers). The generator lays such pages out in runs, taking file-backed pages
//! from the real files of this machine at page-aligned offsets — just what a guest page cache
//! holds, and what a receiver can seed its baseline cache from. The same seed on the same
//! machine gives the same image; a machine without such files falls back to synthetic
//! binary-like and text-like pages (reported in [`Image::synthetic`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Proportions of page kinds in an image (normalised when used).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    /// Never-touched or freed pages.
    pub zero: f64,
    /// Pages of executables and shared libraries.
    pub binary: f64,
    /// Pages of text files (sources, docs, configuration).
    pub text: f64,
    /// Copies of another page of the image.
    pub dup: f64,
    /// High-entropy pages.
    pub random: f64,
}

impl Default for Mix {
    /// The mix of the migration targets: 35% zero, 30% binary, 15% text, 10% duplicate,
    /// 10% random.
    fn default() -> Self {
        Self {
            zero: 0.35,
            binary: 0.30,
            text: 0.15,
            dup: 0.10,
            random: 0.10,
        }
    }
}

impl Mix {
    fn weights(&self) -> [f64; 5] {
        let w = [self.zero, self.binary, self.text, self.dup, self.random].map(|x| x.max(0.0));
        let sum: f64 = w.iter().sum();
        if sum <= 0.0 {
            [1.0, 0.0, 0.0, 0.0, 0.0]
        } else {
            w.map(|x| x / sum)
        }
    }
}

/// What a page of a generated image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageKind {
    /// All zero.
    Zero,
    /// From a binary or library.
    Binary,
    /// From a text file.
    Text,
    /// A copy of another page.
    Dup,
    /// Random bytes.
    Random,
}

const KINDS: [PageKind; 5] = [
    PageKind::Zero,
    PageKind::Binary,
    PageKind::Text,
    PageKind::Dup,
    PageKind::Random,
];

/// Parameters of an image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// Size in bytes (rounded down to whole pages).
    pub size: u64,
    /// Page size.
    pub page_size: usize,
    /// Page kinds.
    pub mix: Mix,
    /// Seed: the same seed and corpus give the same image.
    pub seed: u64,
}

impl ImageSpec {
    /// An image of `size` bytes with 4 KiB pages, the default mix and seed 1.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            page_size: 4096,
            mix: Mix::default(),
            seed: 1,
        }
    }
}

/// A generated image.
#[derive(Debug)]
pub struct Image {
    /// The bytes.
    pub data: Vec<u8>,
    /// Page size.
    pub page_size: usize,
    /// Kind of every page.
    pub kinds: Vec<PageKind>,
    /// Files the file-backed pages came from (what a receiver can seed its cache with).
    pub sources: Vec<PathBuf>,
    /// Whether file-backed pages had to be synthesised (no usable files on this machine).
    pub synthetic: bool,
}

impl Image {
    /// Pages in the image.
    pub fn pages(&self) -> u64 {
        (self.data.len() / self.page_size) as u64
    }

    /// The page at `addr`.
    pub fn page(&self, addr: u64) -> &[u8] {
        let s = addr as usize * self.page_size;
        &self.data[s..s + self.page_size]
    }

    /// How many pages are of `kind`.
    pub fn count(&self, kind: PageKind) -> u64 {
        self.kinds.iter().filter(|k| **k == kind).count() as u64
    }
}

/// A sequence of page-aligned, non-zero pages read from a list of files in turn.
#[derive(Debug)]
struct FileStream {
    files: Vec<(PathBuf, u64)>,
    file: usize,
    offset: u64,
    open: Option<File>,
    used: Vec<PathBuf>,
    wrapped: bool,
}

impl FileStream {
    fn new(files: Vec<(PathBuf, u64)>) -> Self {
        Self {
            files,
            file: 0,
            offset: 0,
            open: None,
            used: Vec::new(),
            wrapped: false,
        }
    }

    /// Fills `page` with the next non-zero page; `false` when there are no usable files.
    fn next_page(&mut self, page: &mut [u8]) -> bool {
        let ps = page.len() as u64;
        // Bounded: every file is visited at most twice before giving up.
        let mut budget = self.files.len() * 2 + 2;
        while budget > 0 {
            let Some((path, size)) = self.files.get(self.file).cloned() else {
                if self.files.is_empty() {
                    return false;
                }
                self.file = 0;
                self.wrapped = true;
                budget -= 1;
                continue;
            };
            if self.offset + ps > size {
                self.file += 1;
                self.offset = 0;
                self.open = None;
                budget -= 1;
                continue;
            }
            if self.open.is_none() {
                match File::open(&path) {
                    Ok(f) => {
                        self.open = Some(f);
                        if !self.used.contains(&path) {
                            self.used.push(path.clone());
                        }
                    }
                    Err(_) => {
                        self.offset = u64::MAX / 2;
                        continue;
                    }
                }
            }
            let off = self.offset;
            self.offset += ps;
            let ok = self
                .open
                .as_ref()
                .is_some_and(|f| f.read_exact_at(page, off).is_ok());
            if ok && !crate::is_zero(page) {
                return true;
            }
        }
        false
    }
}

/// Where file-backed pages come from.
#[derive(Debug)]
pub struct Corpus {
    binaries: FileStream,
    texts: FileStream,
    synth: ChaCha8Rng,
    synthetic: bool,
}

impl Corpus {
    /// Binaries and libraries from `/usr/lib` and `/usr/bin`, text from `/usr/include`,
    /// `/usr/share/doc` and the Python library, in a fixed order (sorted by path). Falls
    /// back to synthetic pages where none are found.
    pub fn system() -> Self {
        let bins = list_files(
            &[
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu",
                "/usr/bin",
                "/usr/lib",
            ],
            |head| head.starts_with(b"\x7fELF"),
        );
        let texts = list_files(
            &[
                "/usr/include",
                "/usr/share/doc",
                "/usr/lib/python3",
                "/usr/share/perl",
            ],
            |head| {
                !head.is_empty()
                    && head
                        .iter()
                        .all(|&b| b == b'\n' || b == b'\t' || (32..127).contains(&b))
            },
        );
        Self::from_files(bins, texts)
    }

    /// A corpus from explicit lists of (binary-like, text-like) files.
    pub fn from_paths(binaries: &[PathBuf], texts: &[PathBuf]) -> Self {
        let sized = |v: &[PathBuf]| {
            v.iter()
                .filter_map(|p| std::fs::metadata(p).ok().map(|m| (p.clone(), m.len())))
                .collect::<Vec<_>>()
        };
        Self::from_files(sized(binaries), sized(texts))
    }

    /// Synthetic pages only (no file reads): for tests that must not depend on the machine.
    pub fn synthetic() -> Self {
        Self::from_files(Vec::new(), Vec::new())
    }

    fn from_files(bins: Vec<(PathBuf, u64)>, texts: Vec<(PathBuf, u64)>) -> Self {
        Self {
            binaries: FileStream::new(bins),
            texts: FileStream::new(texts),
            synth: ChaCha8Rng::seed_from_u64(0x5eed),
            synthetic: false,
        }
    }

    fn fill(&mut self, kind: PageKind, page: &mut [u8]) {
        let got = match kind {
            PageKind::Binary => self.binaries.next_page(page),
            PageKind::Text => self.texts.next_page(page),
            _ => false,
        };
        if !got {
            self.synthetic = true;
            synth_page(kind, &mut self.synth, page);
        }
    }
}

/// Binary-like pages: tokens from a small vocabulary (compresses ~2-3x, like code); text-like:
/// words and spaces.
fn synth_page(kind: PageKind, rng: &mut ChaCha8Rng, page: &mut [u8]) {
    const WORDS: [&[u8]; 16] = [
        b"the ",
        b"page ",
        b"memory ",
        b"of ",
        b"virtual ",
        b"machine ",
        b"and ",
        b"to ",
        b"migration ",
        b"\n",
        b"state ",
        b"host ",
        b"a ",
        b"is ",
        b"network ",
        b"data ",
    ];
    let mut i = 0;
    while i < page.len() {
        let r = rng.next_u32();
        if kind == PageKind::Text {
            let w = WORDS[(r & 15) as usize];
            let n = w.len().min(page.len() - i);
            page[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        } else {
            // 8-byte "instructions": a few opcodes with varying operands.
            let op = [0x48, 0x89, 0x8b, 0xe8, 0x0f, 0xff, 0x83, 0xc3][(r & 7) as usize];
            let tok = [
                op,
                (r >> 8) as u8 & 0x3f,
                0x45,
                (r >> 16) as u8 & 0x0f,
                0,
                0,
                0x90,
                0x90,
            ];
            let n = 8.min(page.len() - i);
            page[i..i + n].copy_from_slice(&tok[..n]);
            i += n;
        }
    }
}

/// Regular files (no symlinks) under `roots`, whose first bytes pass `accept`, sorted by path.
/// The walk is bounded in depth and in number of files.
fn list_files(roots: &[&str], accept: impl Fn(&[u8]) -> bool) -> Vec<(PathBuf, u64)> {
    const MAX_FILES: usize = 200_000;
    const MAX_DEPTH: usize = 6;
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = roots.iter().map(|r| (PathBuf::from(r), 0)).collect();
    let mut seen_dirs = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        seen_dirs += 1;
        if seen_dirs > MAX_FILES || out.len() >= MAX_FILES {
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() && depth < MAX_DEPTH {
                stack.push((path, depth + 1));
            } else if ft.is_file() {
                let Ok(meta) = e.metadata() else { continue };
                if meta.len() < 4096 || has_compressed_suffix(&path) {
                    continue;
                }
                let mut head = [0u8; 64];
                let ok = File::open(&path)
                    .and_then(|f| f.read_exact_at(&mut head, 0))
                    .is_ok();
                if ok && accept(&head) {
                    out.push((path, meta.len()));
                }
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

fn has_compressed_suffix(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("gz" | "xz" | "bz2" | "zst" | "lz4" | "zip" | "png" | "jpg")
    )
}

/// Generates an image. Pages come in runs of one kind (1 to 32 pages) chosen so that the
/// proportions of the mix are met within a run's length.
pub fn generate(spec: &ImageSpec, corpus: &mut Corpus) -> Image {
    let ps = spec.page_size;
    let pages = (spec.size / ps as u64) as usize;
    let mut data = vec![0u8; pages * ps];
    let layout = generate_into(spec, corpus, &mut data);
    Image {
        data,
        page_size: ps,
        kinds: layout.kinds,
        sources: layout.sources,
        synthetic: layout.synthetic,
    }
}

/// What [`generate_into`] made: an [`Image`] without its bytes.
#[derive(Debug)]
pub struct Layout {
    /// Kind of every page.
    pub kinds: Vec<PageKind>,
    /// Files the file-backed pages came from.
    pub sources: Vec<PathBuf>,
    /// Whether file-backed pages had to be synthesised.
    pub synthetic: bool,
}

/// Generates an image into `data`, which must be zeroed: zero pages are not written, so
/// that memory backed by a sparse file keeps them as holes. Its size is `data`'s whole
/// pages (`spec.size` is not looked at); the same seed and corpus give the same bytes as
/// [`generate`].
pub fn generate_into(spec: &ImageSpec, corpus: &mut Corpus, data: &mut [u8]) -> Layout {
    let ps = spec.page_size;
    let pages = data.len() / ps;
    let mut kinds = Vec::with_capacity(pages);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let weights = spec.mix.weights();
    let mut placed = [0usize; 5];
    let mut nonzero: Vec<u32> = Vec::new();
    while kinds.len() < pages {
        let done = kinds.len();
        // The kind furthest below its quota (ties broken at random) gets the next run.
        let want = |i: usize| weights[i] * (done + 1) as f64 - placed[i] as f64;
        let mut k = 0;
        let mut best = f64::MIN;
        for (i, &wi) in weights.iter().enumerate() {
            let w = want(i) + (rng.next_u32() % 1000) as f64 * 1e-6;
            if wi > 0.0 && w > best {
                best = w;
                k = i;
            }
        }
        let kind = if KINDS[k] == PageKind::Dup && nonzero.is_empty() {
            PageKind::Random
        } else {
            KINDS[k]
        };
        let run = (1 + rng.next_u32() % 32) as usize;
        let run = run.min(pages - done);
        for _ in 0..run {
            let addr = kinds.len();
            let (page, before) = {
                let (before, rest) = data.split_at_mut(addr * ps);
                (&mut rest[..ps], before)
            };
            match kind {
                PageKind::Zero => {}
                PageKind::Random => rng.fill_bytes(page),
                PageKind::Binary | PageKind::Text => corpus.fill(kind, page),
                PageKind::Dup => {
                    let src = nonzero[(rng.next_u64() % nonzero.len() as u64) as usize] as usize;
                    page.copy_from_slice(&before[src * ps..(src + 1) * ps]);
                }
            }
            if kind != PageKind::Zero && kind != PageKind::Dup {
                nonzero.push(addr as u32);
            }
            kinds.push(kind);
            placed[KINDS.iter().position(|x| *x == kind).unwrap_or(0)] += 1;
        }
    }
    let mut sources = corpus.binaries.used.clone();
    sources.extend(corpus.texts.used.iter().cloned());
    Layout {
        kinds,
        sources,
        synthetic: corpus.synthetic,
    }
}

/// How a workload writes to memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirtyModel {
    /// Fraction of pages that are hot.
    pub hot_fraction: f64,
    /// Fraction of writes that hit the hot pages.
    pub hot_share: f64,
    /// Fraction of page writes that are small edits (a few fields) rather than whole-page
    /// rewrites.
    pub small_edit_share: f64,
}

impl Default for DirtyModel {
    /// 10% hot pages taking 80% of writes; 70% of writes are small edits.
    fn default() -> Self {
        Self {
            hot_fraction: 0.10,
            hot_share: 0.80,
            small_edit_share: 0.70,
        }
    }
}

/// Applies a [`DirtyModel`] to an image, page write by page write.
#[derive(Debug)]
pub struct Dirtier {
    model: DirtyModel,
    rng: ChaCha8Rng,
    hot: Vec<u64>,
    pages: u64,
    page_size: usize,
}

impl Dirtier {
    /// A workload over an image of `pages` pages; `seed` picks the hot set and the writes.
    pub fn new(model: DirtyModel, pages: u64, page_size: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd1b5_4a32_d192_ed03);
        let threshold = (model.hot_fraction.clamp(0.0, 1.0) * u32::MAX as f64) as u32;
        let hot = (0..pages).filter(|_| rng.next_u32() < threshold).collect();
        Self {
            model,
            rng,
            hot,
            pages,
            page_size,
        }
    }

    /// The next page to write.
    pub fn pick(&mut self) -> u64 {
        let hot_roll = (self.rng.next_u32() as f64) < self.model.hot_share * u32::MAX as f64;
        if hot_roll && !self.hot.is_empty() {
            self.hot[(self.rng.next_u64() % self.hot.len() as u64) as usize]
        } else {
            self.rng.next_u64() % self.pages.max(1)
        }
    }

    /// Writes one page (`page` is its current content) as the model says: a small edit of a
    /// few fields, or a whole-page rewrite with fresh content of a kind the corpus provides.
    pub fn write_page(&mut self, page: &mut [u8], corpus: &mut Corpus) {
        let small = (self.rng.next_u32() as f64) < self.model.small_edit_share * u32::MAX as f64;
        if small {
            // One to four fields of 8 to 64 bytes: counters, pointers, a short string.
            let spans = 1 + self.rng.next_u32() % 4;
            for _ in 0..spans {
                let len = 8 + (self.rng.next_u32() % 57) as usize;
                let len = len.min(page.len());
                let at = (self.rng.next_u64() % (page.len() - len + 1) as u64) as usize;
                self.rng.fill_bytes(&mut page[at..at + len]);
            }
        } else {
            match self.rng.next_u32() % 10 {
                0..=3 => page.fill(0),
                4..=6 => corpus.fill(PageKind::Binary, page),
                7..=8 => corpus.fill(PageKind::Text, page),
                _ => self.rng.fill_bytes(page),
            }
        }
    }

    /// Dirties `fraction` of the image's pages (distinct pages), returning them sorted.
    pub fn dirty_fraction(
        &mut self,
        image: &mut [u8],
        fraction: f64,
        corpus: &mut Corpus,
    ) -> Vec<u64> {
        let ps = self.page_size;
        let target = ((self.pages as f64) * fraction.clamp(0.0, 1.0)) as usize;
        let mut dirty = vec![false; self.pages as usize];
        let mut out = Vec::with_capacity(target);
        // Bounded: hot pages saturate quickly, after which writes must land on cold ones.
        let mut attempts = self.pages.saturating_mul(64).max(1024);
        while out.len() < target && attempts > 0 {
            attempts -= 1;
            let a = self.pick();
            let s = a as usize * ps;
            self.write_page(&mut image[s..s + ps], corpus);
            if !dirty[a as usize] {
                dirty[a as usize] = true;
                out.push(a);
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_follows_the_mix() {
        let spec = ImageSpec::new(8 << 20);
        let a = generate(&spec, &mut Corpus::synthetic());
        let b = generate(&spec, &mut Corpus::synthetic());
        assert_eq!(a.data, b.data);
        assert!(a.synthetic);
        let n = a.pages() as f64;
        for (kind, want) in [
            (PageKind::Zero, 0.35),
            (PageKind::Binary, 0.30),
            (PageKind::Random, 0.10),
        ] {
            let got = a.count(kind) as f64 / n;
            assert!((got - want).abs() < 0.03, "{kind:?}: {got} vs {want}");
        }
        let zeros = (0..a.pages())
            .filter(|&p| crate::is_zero(a.page(p)))
            .count() as f64
            / n;
        assert!((zeros - 0.35).abs() < 0.03, "zero pages {zeros}");
        let other = generate(&ImageSpec { seed: 2, ..spec }, &mut Corpus::synthetic());
        assert_ne!(a.data, other.data);
    }

    #[test]
    fn file_backed_pages_come_from_real_files_page_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("lib.so");
        let content: Vec<u8> = (0..64 * 4096u32).map(|i| (i / 7 % 251) as u8 | 1).collect();
        std::fs::write(&bin, &content).unwrap();
        let mut corpus = Corpus::from_paths(std::slice::from_ref(&bin), &[]);
        let img = generate(
            &ImageSpec {
                mix: Mix {
                    binary: 1.0,
                    zero: 0.0,
                    text: 0.0,
                    dup: 0.0,
                    random: 0.0,
                },
                ..ImageSpec::new(16 * 4096)
            },
            &mut corpus,
        );
        assert!(!img.synthetic);
        assert_eq!(img.sources, vec![bin]);
        for p in 0..img.pages() {
            let page = img.page(p);
            assert!(
                content.chunks(4096).any(|c| c == page),
                "page {p} is a file page"
            );
        }
    }

    #[test]
    fn dirtying_hits_the_requested_fraction_with_mostly_small_edits() {
        let spec = ImageSpec::new(4 << 20);
        let mut corpus = Corpus::synthetic();
        let img = generate(&spec, &mut corpus);
        let mut next = img.data.clone();
        let mut d = Dirtier::new(DirtyModel::default(), img.pages(), 4096, 7);
        let dirty = d.dirty_fraction(&mut next, 0.10, &mut corpus);
        assert_eq!(dirty.len(), (img.pages() as f64 * 0.10) as usize);
        let changed: Vec<u64> = (0..img.pages())
            .filter(|&p| img.page(p) != &next[p as usize * 4096..][..4096])
            .collect();
        // A rewrite can leave a page as it was (zero over zero), so changed <= dirtied.
        assert!(changed.len() <= dirty.len() && changed.len() * 10 >= dirty.len() * 8);
        assert!(changed.iter().all(|p| dirty.binary_search(p).is_ok()));
    }
}
