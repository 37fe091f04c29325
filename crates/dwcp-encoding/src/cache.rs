//! The baseline cache: content the receiver already holds, addressed by strong hash.
//!
//! Three places content can live, one index over them:
//! - **memory**: recently used entries, within `mem_budget` (least recently used go first);
//! - **packs**: append-only files in `dir`, within `disk_budget`. The oldest pack is deleted
//!   when the budget is exceeded; an entry used from an old pack is first copied forward into
//!   the newest one, so what survives is what was recently *useful*, not merely recent;
//! - **seeds**: pages of local files (a VM's disk, base images) registered by
//!   [`BaselineCache::seed_path`]; only their location is kept, never a copy.
//!
//! Whatever the place, content is re-hashed before it is served: a pack corrupted on disk
//! or a seed file changed since it was indexed is a miss (counted in
//! [`CacheStats::corrupt`]), never a wrong page. Packs survive restarts: the index is rebuilt
//! from their entry headers, and a torn tail left by a crash is cut off.
//!
//! Pack format (`pack-NNNNNNNN.hdec`): `"HDEC" version 0 0 0`, then entries of
//! `key[16] fast:u64 len:u32 check:u32 data[len]`, where `check` is the low 32 bits of the
//! XXH3 of the 28 header bytes before it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::hash::{Key, KeyHashed, PassThroughBuild, fast64, is_zero};
use crate::store::ContentSource;

const PACK_MAGIC: [u8; 4] = *b"HDEC";
const PACK_HEADER: u64 = 8;
const ENTRY_HEADER: usize = 32;
/// Largest entry a pack may hold (a page or a chunk).
pub const MAX_ENTRY: u32 = 1 << 20;

/// The active pack's write buffer: room for the largest entry with its header (see
/// [`BaselineCache::append`]).
const WRITE_BUFFER: usize = 2 << 20;

/// Where and how much.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Directory for packs; `None` keeps the cache in memory only (lost on exit).
    pub dir: Option<PathBuf>,
    /// Bytes of content kept in memory.
    pub mem_budget: u64,
    /// Bytes of packs kept on disk.
    pub disk_budget: u64,
    /// Size at which a pack is sealed and a new one started.
    pub pack_bytes: u64,
}

impl CacheConfig {
    /// In memory only, with `mem_budget` bytes.
    pub fn memory(mem_budget: u64) -> Self {
        Self {
            dir: None,
            mem_budget,
            disk_budget: 0,
            pack_bytes: 64 << 20,
        }
    }

    /// Persisted in `dir`.
    pub fn persistent(dir: impl Into<PathBuf>, mem_budget: u64, disk_budget: u64) -> Self {
        let pack_bytes = (disk_budget / 8).clamp(1 << 20, 64 << 20);
        Self {
            dir: Some(dir.into()),
            mem_budget,
            disk_budget,
            pack_bytes,
        }
    }
}

/// Counters for reports and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries indexed (all places).
    pub entries: u64,
    /// Of which, pages of seed files.
    pub seeded: u64,
    /// Bytes held in memory.
    pub mem_bytes: u64,
    /// Bytes of packs on disk.
    pub disk_bytes: u64,
    /// Lookups served.
    pub hits: u64,
    /// Lookups not held.
    pub misses: u64,
    /// Entries that failed verification and were dropped.
    pub corrupt: u64,
    /// Entries dropped to keep a budget.
    pub evicted: u64,
    /// Entries added.
    pub inserted: u64,
}

#[derive(Clone, Copy, Debug)]
enum Loc {
    Mem,
    Pack { pack: u32, offset: u64 },
    Seed { file: u32, offset: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    loc: Loc,
    fast: u64,
    len: u32,
}

#[derive(Debug)]
struct Pack {
    path: PathBuf,
    file: File,
    bytes: u64,
    keys: Vec<Key>,
}

#[derive(Debug)]
struct Active {
    id: u32,
    writer: BufWriter<File>,
    bytes: u64,
}

/// A content-addressed store of pages and chunks. See the module documentation.
#[derive(Debug)]
pub struct BaselineCache {
    cfg: CacheConfig,
    index: HashMap<KeyHashed, Entry, PassThroughBuild>,
    mem: HashMap<KeyHashed, (Box<[u8]>, u64), PassThroughBuild>,
    lru: BTreeMap<u64, Key>,
    tick: u64,
    packs: BTreeMap<u32, Pack>,
    /// Packs numbered below this are next in line for eviction (see [`Self::update_old`]).
    old_before: u32,
    active: Option<Active>,
    /// Seed files, opened when read (a seed directory may hold more files than a process
    /// may keep open).
    seeds: Vec<PathBuf>,
    stats: CacheStats,
    /// Holds an exclusive lock on the directory while open: two processes appending to the
    /// same packs would interleave their entries.
    _lock: Option<File>,
}

impl BaselineCache {
    /// Opens (or creates) a cache. With a directory, existing packs are indexed; entries whose
    /// headers do not verify end the scan of their pack, and a torn tail of the newest pack is
    /// truncated.
    pub fn open(cfg: CacheConfig) -> io::Result<Self> {
        let mut c = Self {
            cfg,
            index: HashMap::default(),
            mem: HashMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
            packs: BTreeMap::new(),
            active: None,
            seeds: Vec::new(),
            stats: CacheStats::default(),
            old_before: 0,
            _lock: None,
        };
        if let Some(dir) = c.cfg.dir.clone() {
            std::fs::create_dir_all(&dir)?;
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join("LOCK"))?;
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("{} is in use by another process", dir.display()),
                    )
                })?;
            c._lock = Some(lock);
            let mut ids = Vec::new();
            for e in std::fs::read_dir(&dir)? {
                let name = e?.file_name();
                let name = name.to_string_lossy();
                // Only names as the cache writes them: `pack-5.hdec` would be read as
                // `pack-00000005.hdec`, and a pack with both names counted twice.
                if let Some(id) = name
                    .strip_prefix("pack-")
                    .and_then(|n| n.strip_suffix(".hdec"))
                    .filter(|n| n.len() >= 8 && n.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|&id| format!("pack-{id:08}.hdec") == name)
                {
                    ids.push(id);
                }
            }
            ids.sort_unstable();
            // Packs beyond the disk budget (it was lowered, or many starts each began one)
            // would be evicted right after loading, oldest first: they go before, unopened
            // (loading every one first took a descriptor and an index entry per page each).
            let mut total: u64 = ids
                .iter()
                .map(|&id| std::fs::metadata(Self::pack_path(&dir, id)).map_or(0, |m| m.len()))
                .sum();
            while total > c.cfg.disk_budget && ids.len() > 1 {
                let id = ids.remove(0);
                let path = Self::pack_path(&dir, id);
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                if std::fs::remove_file(&path).is_ok() {
                    tracing::debug!(path = %path.display(), "cache pack over the disk budget removed");
                }
                total = total.saturating_sub(len);
            }
            let last = ids.last().copied();
            for id in ids {
                // The cache is a copy of what went by: a pack whose content cannot be read
                // (a bad sector, not a file) goes, not a reason to refuse to start. Anything
                // else (no descriptor left, no permission) is the host's to fix, and the
                // packs are kept for then.
                if let Err(e) = c.load_pack(&dir, id, Some(id) == last) {
                    if !unreadable(&e) {
                        return Err(e);
                    }
                    let path = Self::pack_path(&dir, id);
                    tracing::warn!(path = %path.display(), error = %e, "cannot read a cache pack; removing it");
                    c.unload_pack(id);
                    if std::fs::remove_file(&path).is_err() {
                        // Not a file: out of the way, so that no new pack takes its name.
                        std::fs::rename(&path, path.with_extension("hdec.bad"))?;
                    }
                }
            }
            c.enforce_disk_budget()?;
        }
        Ok(c)
    }

    fn pack_path(dir: &Path, id: u32) -> PathBuf {
        dir.join(format!("pack-{id:08}.hdec"))
    }

    fn load_pack(&mut self, dir: &Path, id: u32, newest: bool) -> io::Result<()> {
        let path = Self::pack_path(dir, id);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        let mut head = [0u8; PACK_HEADER as usize];
        if len < PACK_HEADER || file.read_exact_at(&mut head, 0).is_err() || head[..4] != PACK_MAGIC
        {
            tracing::warn!(path = %path.display(), "not a cache pack; removing it");
            drop(file);
            std::fs::remove_file(&path)?;
            return Ok(());
        }
        let mut offset = PACK_HEADER;
        let mut keys = Vec::new();
        let mut h = [0u8; ENTRY_HEADER];
        while offset + ENTRY_HEADER as u64 <= len {
            file.read_exact_at(&mut h, offset)?;
            let Some((key, fast, elen)) = parse_entry_header(&h) else {
                break;
            };
            let data_at = offset + ENTRY_HEADER as u64;
            if data_at + u64::from(elen) > len {
                break;
            }
            // Packs load oldest first: a later copy (an entry copied forward before its pack
            // is evicted) is the one that lasts, and the one to index.
            self.index.insert(
                KeyHashed(key),
                Entry {
                    loc: Loc::Pack {
                        pack: id,
                        offset: data_at,
                    },
                    fast,
                    len: elen,
                },
            );
            keys.push(key);
            offset = data_at + u64::from(elen);
        }
        if offset < len {
            tracing::warn!(path = %path.display(), valid = offset, len, "cache pack has a damaged tail; cutting it off");
            if newest {
                file.set_len(offset)?;
            }
        }
        self.stats.disk_bytes += offset;
        self.stats.entries = self.index.len() as u64;
        self.packs.insert(
            id,
            Pack {
                path,
                file,
                bytes: offset,
                keys,
            },
        );
        self.update_old();
        Ok(())
    }

    /// Forgets what a pack that failed to load indexed (it is listed among the packs, and
    /// counted, only once loaded whole).
    fn unload_pack(&mut self, id: u32) {
        self.index
            .retain(|_, e| !matches!(e.loc, Loc::Pack { pack, .. } if pack == id));
        self.stats.entries = self.index.len() as u64;
    }

    /// What the cache holds, as fast hashes: the summary a sender builds its
    /// [`RemoteIndex`](crate::RemoteIndex) from.
    pub fn summary(&self) -> Vec<u64> {
        // A sender takes no more (a summary is a hint: what it leaves out is sent again).
        let most = usize::try_from(crate::remote::MAX_SUMMARY_ENTRIES).unwrap_or(usize::MAX);
        self.index.values().take(most).map(|e| e.fast).collect()
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let mut s = self.stats.clone();
        s.entries = self.index.len() as u64;
        s
    }

    /// Whether `key` is indexed (not verified).
    pub fn contains(&self, key: &Key) -> bool {
        self.index.contains_key(&KeyHashed(*key))
    }

    /// Registers the pages of `path` (a file, or every regular file under a directory, a few
    /// levels deep) as seeds: page-aligned, non-zero pages of `page_size` bytes. Returns the
    /// number of pages newly indexed.
    pub fn seed_path(&mut self, path: &Path, page_size: usize) -> io::Result<u64> {
        let mut files = Vec::new();
        collect_files(path, 0, &mut files)?;
        files.sort();
        let mut added = 0;
        let mut buf = vec![0u8; page_size * 256];
        for f in files {
            let Ok(file) = File::open(&f) else {
                tracing::warn!(path = %f.display(), "cannot open a seed file; skipped");
                continue;
            };
            let len = file.metadata()?.len();
            let id = u32::try_from(self.seeds.len())
                .map_err(|_| io::Error::other("too many seed files"))?;
            // Registered first: entries indexed before a read error below still name it.
            self.seeds.push(f.clone());
            let mut off = 0u64;
            while off + page_size as u64 <= len {
                let n = ((len - off) as usize / page_size * page_size).min(buf.len());
                file.read_exact_at(&mut buf[..n], off)?;
                for (i, page) in buf[..n].chunks_exact(page_size).enumerate() {
                    if is_zero(page) {
                        continue;
                    }
                    let kh = KeyHashed(Key::of(page));
                    if self.index.contains_key(&kh) {
                        continue;
                    }
                    let loc = Loc::Seed {
                        file: id,
                        offset: off + (i * page_size) as u64,
                    };
                    self.index.insert(
                        kh,
                        Entry {
                            loc,
                            fast: fast64(page),
                            len: page_size as u32,
                        },
                    );
                    added += 1;
                }
                off += n as u64;
            }
        }
        self.stats.seeded += added;
        self.stats.entries = self.index.len() as u64;
        Ok(added)
    }

    /// Adds content (a page or a chunk that arrived). Returns its key.
    pub fn insert(&mut self, data: &[u8]) -> io::Result<Key> {
        self.insert_keyed(Key::of(data), data)
    }

    /// As [`insert`](Self::insert), with the key computed by the caller (`Key::of(data)`):
    /// a decoder that needs the key anyway hashes each page once. The key must be right:
    /// [`get`](Self::get) verifies what it reads back from disk against the key, but not the
    /// copy it keeps in memory (checked in debug builds only).
    pub fn insert_keyed(&mut self, key: Key, data: &[u8]) -> io::Result<Key> {
        debug_assert_eq!(key, Key::of(data));
        let kh = KeyHashed(key);
        if data.len() > MAX_ENTRY as usize || data.is_empty() {
            return Ok(key);
        }
        // A seed's page may have changed in its file since it was indexed (a VM's own disk):
        // content that arrived is this key's by construction, and takes the place of a seed
        // that no longer holds it. One that does stays (a seed costs no budget, and is never
        // evicted). Any other copy is kept (a pack's is checked when read).
        if let Some(e) = self.index.get(&kh).copied() {
            let stale = match e.loc {
                Loc::Seed { file, offset } => {
                    !self.mem.contains_key(&kh) && !self.seed_holds(file, offset, e.len, &key)
                }
                Loc::Mem | Loc::Pack { .. } => false,
            };
            if !stale {
                return Ok(key);
            }
        }
        // Memory is the only place a memory-only cache has: what does not fit is not kept
        // (and so never advertised).
        if self.cfg.dir.is_none() && data.len() as u64 > self.cfg.mem_budget {
            return Ok(key);
        }
        let fast = fast64(data);
        let loc = if self.cfg.dir.is_some() {
            let (pack, offset) = self.append(&key, fast, data)?;
            Loc::Pack { pack, offset }
        } else {
            Loc::Mem
        };
        let replaced = self.index.insert(
            kh,
            Entry {
                loc,
                fast,
                len: data.len() as u32,
            },
        );
        if replaced.is_some_and(|e| matches!(e.loc, Loc::Seed { .. })) {
            self.stats.seeded = self.stats.seeded.saturating_sub(1);
        }
        self.stats.inserted += 1;
        self.remember(key, data.into());
        self.enforce_disk_budget()?;
        Ok(key)
    }

    /// Whether seed file `file` still holds `key`'s `len` bytes at `offset`.
    fn seed_holds(&self, file: u32, offset: u64, len: u32, key: &Key) -> bool {
        let mut buf = vec![0u8; len as usize];
        self.seeds
            .get(file as usize)
            .and_then(|p| File::open(p).ok())
            .is_some_and(|f| f.read_exact_at(&mut buf, offset).is_ok() && Key::of(&buf) == *key)
    }

    /// Copies the content named `key` into `buf` if held and verified.
    pub fn get(&mut self, key: &Key, buf: &mut Vec<u8>) -> io::Result<bool> {
        let kh = KeyHashed(*key);
        let Some(entry) = self.index.get(&kh).copied() else {
            self.stats.misses += 1;
            return Ok(false);
        };
        let start = buf.len();
        if let Some((data, tick)) = self.mem.get_mut(&kh) {
            buf.extend_from_slice(data);
            self.tick += 1;
            self.lru.remove(tick);
            *tick = self.tick;
            self.lru.insert(self.tick, *key);
            self.stats.hits += 1;
            // The most used entries are those served from memory: they too move forward
            // before their pack goes, or they would go with it.
            if let Loc::Pack { pack, .. } = entry.loc
                && self.is_old(pack)
            {
                let data: Box<[u8]> = buf[start..].into();
                self.copy_forward(key, entry.fast, &data);
            }
            return Ok(true);
        }
        buf.resize(start + entry.len as usize, 0);
        let read = match entry.loc {
            Loc::Mem => Ok(false),
            Loc::Pack { pack, offset } => {
                // What is still buffered must reach the file before it is read back; a
                // sync is not needed for that (the read sees the page cache).
                if let Some(a) = self.active.as_mut().filter(|a| a.id == pack) {
                    a.writer.flush()?;
                }
                match self.packs.get(&pack) {
                    Some(p) => p
                        .file
                        .read_exact_at(&mut buf[start..], offset)
                        .map(|()| true),
                    None => Ok(false),
                }
            }
            Loc::Seed { file, offset } => match self.seeds.get(file as usize).map(File::open) {
                Some(Ok(f)) => f.read_exact_at(&mut buf[start..], offset).map(|()| true),
                Some(Err(_)) | None => Ok(false),
            },
        };
        let ok = match read {
            Ok(ok) => ok,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            // A bad sector: the entry goes (kept, it would be advertised and missed for good).
            Err(e) => {
                tracing::warn!(%key, "cannot read a baseline cache entry: {e}");
                false
            }
        };
        if !ok || Key::of(&buf[start..]) != *key {
            buf.truncate(start);
            self.index.remove(&kh);
            if matches!(entry.loc, Loc::Seed { .. }) {
                self.stats.seeded = self.stats.seeded.saturating_sub(1);
            }
            self.stats.corrupt += 1;
            self.stats.misses += 1;
            tracing::warn!(%key, "baseline cache entry failed verification; dropped");
            return Ok(false);
        }
        self.stats.hits += 1;
        let data: Box<[u8]> = buf[start..].into();
        // Keep what is used: an entry read from a pack that is next in line for eviction
        // moves forward.
        if let Loc::Pack { pack, .. } = entry.loc
            && self.is_old(pack)
        {
            self.copy_forward(key, entry.fast, &data);
        }
        self.remember(*key, data);
        Ok(true)
    }

    /// Appends a verified entry of an old pack to the active one and indexes it there. A
    /// failure (a full disk) leaves it where it was: the hit stands.
    fn copy_forward(&mut self, key: &Key, fast: u64, data: &[u8]) {
        match self.append(key, fast, data) {
            Ok((pack, offset)) => {
                if let Some(e) = self.index.get_mut(&KeyHashed(*key)) {
                    e.loc = Loc::Pack { pack, offset };
                }
                if let Err(e) = self.enforce_disk_budget() {
                    tracing::warn!(error = %e, "baseline cache: cannot evict a pack");
                }
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "baseline cache: cannot copy an entry forward")
            }
        }
    }

    /// Writes buffered pack data to disk and syncs it.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(a) = &mut self.active {
            a.writer.flush()?;
            a.writer.get_ref().sync_data()?;
        }
        Ok(())
    }

    /// Whether `pack` goes within the next half of the disk budget written.
    fn is_old(&self, pack: u32) -> bool {
        pack < self.old_before
    }

    /// The oldest packs go first, so the ones next in line are those with at least half the
    /// disk budget in newer packs, never the newest (a budget of 0 would make every pack
    /// old). Copying forward from any older pack than that would rewrite every entry a warm
    /// migration uses (most of a guest) while the cache is far from full. Worked out when a
    /// pack is added, not on every hit: the newest pack's growth since then is not counted
    /// (at most one pack's worth fewer copies). Evicting the oldest packs leaves it right.
    fn update_old(&mut self) {
        let mut newer = 0u64;
        self.old_before = 0;
        for (&id, p) in self.packs.iter().rev() {
            if newer > 0 && newer >= self.cfg.disk_budget / 2 {
                self.old_before = id + 1;
                break;
            }
            newer += p.bytes;
        }
    }

    fn remember(&mut self, key: Key, data: Box<[u8]>) {
        let len = data.len() as u64;
        if len > self.cfg.mem_budget {
            return;
        }
        self.tick += 1;
        if let Some((_, old)) = self.mem.insert(KeyHashed(key), (data, self.tick)) {
            self.lru.remove(&old);
            self.stats.mem_bytes -= len;
        }
        self.lru.insert(self.tick, key);
        self.stats.mem_bytes += len;
        while self.stats.mem_bytes > self.cfg.mem_budget {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            let vh = KeyHashed(victim);
            if let Some((d, _)) = self.mem.remove(&vh) {
                self.stats.mem_bytes -= d.len() as u64;
            }
            // Memory-only entries have nowhere else to live.
            if matches!(self.index.get(&vh), Some(Entry { loc: Loc::Mem, .. })) {
                self.index.remove(&vh);
                self.stats.evicted += 1;
            }
        }
    }

    fn append(&mut self, key: &Key, fast: u64, data: &[u8]) -> io::Result<(u32, u64)> {
        let Some(dir) = self.cfg.dir.clone() else {
            return Err(io::Error::other("cache has no directory"));
        };
        let need_new = self
            .active
            .as_ref()
            .is_none_or(|a| a.bytes >= self.cfg.pack_bytes);
        if need_new {
            self.seal()?;
            let id = match self.packs.keys().next_back() {
                None => 0,
                Some(&i) => i.checked_add(1).ok_or_else(|| {
                    io::Error::other(format!(
                        "pack numbers used up (pack-{i:08}.hdec in {}): clear the cache \
                         directory",
                        dir.display()
                    ))
                })?,
            };
            let path = Self::pack_path(&dir, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            let begun = file.try_clone().and_then(|f| {
                let mut writer = BufWriter::with_capacity(WRITE_BUFFER, f);
                writer.write_all(&PACK_MAGIC)?;
                writer.write_all(&[crate::FORMAT_VERSION, 0, 0, 0])?;
                Ok(writer)
            });
            // Not left behind empty: the next pack would be given its number, and refused.
            let writer = begun.inspect_err(|_| {
                let _ = std::fs::remove_file(&path);
            })?;
            self.packs.insert(
                id,
                Pack {
                    path,
                    file,
                    bytes: PACK_HEADER,
                    keys: Vec::new(),
                },
            );
            self.stats.disk_bytes += PACK_HEADER;
            self.update_old();
            self.active = Some(Active {
                id,
                writer,
                bytes: PACK_HEADER,
            });
        }
        let Some(a) = self.active.as_mut() else {
            return Err(io::Error::other("no active pack"));
        };
        let mut h = [0u8; ENTRY_HEADER];
        h[..16].copy_from_slice(&key.0);
        h[16..24].copy_from_slice(&fast.to_le_bytes());
        h[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
        let check = xxhash_rust::xxh3::xxh3_64(&h[..28]) as u32;
        h[28..].copy_from_slice(&check.to_le_bytes());
        // The whole entry goes into the buffer or none of it: room is made first (a flush
        // that fails, a full disk, leaves what it did not write buffered, in order). Written
        // in two steps into a full buffer, a header could reach the file without its data,
        // and every later entry of the pack would be indexed where it is not.
        if a.writer.capacity() - a.writer.buffer().len() < ENTRY_HEADER + data.len() {
            a.writer.flush()?;
        }
        a.writer.write_all(&h)?;
        a.writer.write_all(data)?;
        let offset = a.bytes + ENTRY_HEADER as u64;
        let added = (ENTRY_HEADER + data.len()) as u64;
        a.bytes += added;
        let id = a.id;
        if let Some(p) = self.packs.get_mut(&id) {
            p.bytes += added;
            p.keys.push(*key);
        }
        self.stats.disk_bytes += added;
        Ok((id, offset))
    }

    fn seal(&mut self) -> io::Result<()> {
        self.flush()?;
        self.active = None;
        Ok(())
    }

    fn enforce_disk_budget(&mut self) -> io::Result<()> {
        // The active pack is never evicted, so this ends.
        while self.stats.disk_bytes > self.cfg.disk_budget && self.packs.len() > 1 {
            let Some((&id, _)) = self.packs.iter().next() else {
                break;
            };
            if self.active.as_ref().is_some_and(|a| a.id == id) {
                break;
            }
            let Some(p) = self.packs.remove(&id) else {
                break;
            };
            for k in &p.keys {
                let kh = KeyHashed(*k);
                if matches!(self.index.get(&kh), Some(Entry { loc: Loc::Pack { pack, .. }, .. }) if *pack == id)
                {
                    self.index.remove(&kh);
                    if let Some((d, t)) = self.mem.remove(&kh) {
                        self.lru.remove(&t);
                        self.stats.mem_bytes -= d.len() as u64;
                    }
                    self.stats.evicted += 1;
                }
            }
            self.stats.disk_bytes -= p.bytes;
            drop(p.file);
            std::fs::remove_file(&p.path)?;
        }
        Ok(())
    }
}

impl Drop for BaselineCache {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "baseline cache: final flush failed");
        }
    }
}

impl ContentSource for BaselineCache {
    fn fetch(&mut self, key: &Key, buf: &mut Vec<u8>) -> bool {
        match self.get(key, buf) {
            Ok(hit) => hit,
            Err(e) => {
                tracing::warn!(error = %e, "baseline cache read failed; treating as a miss");
                false
            }
        }
    }

    fn learn(&mut self, data: &[u8]) {
        if let Err(e) = self.insert(data) {
            tracing::warn!(error = %e, "baseline cache write failed; entry not kept");
        }
    }

    fn learn_keyed(&mut self, key: &Key, data: &[u8]) {
        if let Err(e) = self.insert_keyed(*key, data) {
            tracing::warn!(error = %e, "baseline cache write failed; entry not kept");
        }
    }
}

/// Whether loading a pack failed on what is in it or where it is (an I/O error, not a file),
/// rather than on this process's resources or rights.
fn unreadable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::IsADirectory
    ) || e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error())
}

fn parse_entry_header(h: &[u8; ENTRY_HEADER]) -> Option<(Key, u64, u32)> {
    let check = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if xxhash_rust::xxh3::xxh3_64(&h[..28]) as u32 != check {
        return None;
    }
    let mut key = [0u8; 16];
    key.copy_from_slice(&h[..16]);
    let mut f = [0u8; 8];
    f.copy_from_slice(&h[16..24]);
    let len = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    (len > 0 && len <= MAX_ENTRY).then_some((Key(key), u64::from_le_bytes(f), len))
}

fn collect_files(path: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    const MAX_DEPTH: usize = 4;
    const MAX_FILES: usize = 100_000;
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        out.push(path.to_path_buf());
    } else if meta.is_dir() && depth <= MAX_DEPTH {
        for e in std::fs::read_dir(path)? {
            if out.len() >= MAX_FILES {
                break;
            }
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_file() || ft.is_dir() {
                collect_files(&e.path(), depth + 1, out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u32) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8 ^ seed as u8)
            .collect()
    }

    #[test]
    fn memory_cache_keeps_its_budget_and_evicts_least_recently_used() {
        let mut c = BaselineCache::open(CacheConfig::memory(10 * 4096)).unwrap();
        let keys: Vec<Key> = (1..=10).map(|i| c.insert(&page(i)).unwrap()).collect();
        let mut buf = Vec::new();
        assert!(c.get(&keys[0], &mut buf).unwrap()); // 1 is now recent
        assert_eq!(buf, page(1));
        c.insert(&page(11)).unwrap();
        assert!(c.stats().mem_bytes <= 10 * 4096);
        assert!(c.contains(&keys[0]), "recently used entry kept");
        assert!(!c.contains(&keys[1]), "least recently used entry evicted");
        assert_eq!(c.stats().evicted, 1);
    }

    #[test]
    fn persisted_cache_survives_restart_and_keeps_the_disk_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            pack_bytes: 32 * 1024,
            ..CacheConfig::persistent(dir.path(), 8 * 4096, 128 * 1024)
        };
        let keys: Vec<Key> = {
            let mut c = BaselineCache::open(cfg.clone()).unwrap();
            (1..=40).map(|i| c.insert(&page(i)).unwrap()).collect()
        };
        let mut c = BaselineCache::open(cfg).unwrap();
        let s = c.stats();
        assert!(s.disk_bytes <= 128 * 1024, "{s:?}");
        assert!(
            s.entries > 20 && s.entries < 40,
            "old packs were evicted: {s:?}"
        );
        let mut buf = Vec::new();
        assert!(c.get(&keys[39], &mut buf).unwrap());
        assert_eq!(buf, page(40));
        assert!(
            !c.get(&keys[0], &mut Vec::new()).unwrap(),
            "evicted with the oldest pack"
        );
        let summary = c.summary();
        assert!(summary.contains(&fast64(&page(40))));
    }

    #[test]
    fn packs_over_a_lowered_budget_go_at_start_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let packs = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".hdec"))
                .collect();
            v.sort();
            v
        };
        let keys: Vec<Key> = {
            let cfg = CacheConfig {
                pack_bytes: 32 * 1024,
                ..CacheConfig::persistent(dir.path(), 0, 1 << 20)
            };
            let mut c = BaselineCache::open(cfg).unwrap();
            (1..=40).map(|i| c.insert(&page(i)).unwrap()).collect()
        };
        let before = packs(dir.path());
        assert!(before.len() >= 5, "{before:?}");
        let cfg = CacheConfig {
            pack_bytes: 32 * 1024,
            ..CacheConfig::persistent(dir.path(), 0, 70 * 1024)
        };
        let mut c = BaselineCache::open(cfg).unwrap();
        let after = packs(dir.path());
        assert!(after.len() <= 3, "{after:?}");
        assert_eq!(after.last(), before.last(), "the newest is kept");
        assert!(c.stats().disk_bytes <= 70 * 1024, "{:?}", c.stats());
        assert!(c.get(&keys[39], &mut Vec::new()).unwrap());
        assert!(!c.get(&keys[0], &mut Vec::new()).unwrap());
    }

    #[test]
    fn an_entry_used_is_copied_forward_only_when_its_pack_is_next_to_go() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            pack_bytes: 32 * 1024,
            // Nothing held in memory: every hit reads its pack.
            ..CacheConfig::persistent(dir.path(), 0, 256 * 1024)
        };
        let mut c = BaselineCache::open(cfg).unwrap();
        let keys: Vec<Key> = (1..=16).map(|i| c.insert(&page(i)).unwrap()).collect();
        // Far from the budget: a hit in the first pack reads it, and writes nothing.
        let disk = c.stats().disk_bytes;
        let mut buf = Vec::new();
        assert!(c.get(&keys[0], &mut buf).unwrap());
        assert_eq!(buf, page(1));
        assert_eq!(c.stats().disk_bytes, disk, "not copied while far from full");
        // Half the budget written after it: the first pack is next in line.
        let more: Vec<Key> = (17..=48).map(|i| c.insert(&page(i)).unwrap()).collect();
        let disk = c.stats().disk_bytes;
        assert!(c.get(&keys[0], &mut Vec::new()).unwrap());
        // (Perhaps into a new pack, with its header.)
        let grown = c.stats().disk_bytes - disk;
        assert!(
            grown == 32 + 4096 || grown == 32 + 4096 + PACK_HEADER,
            "copied forward: {grown}"
        );
        // Enough written for the first packs to go: the entry used survives, its neighbour
        // not used since does not.
        for i in 49..=64 {
            c.insert(&page(i)).unwrap();
        }
        assert!(c.stats().disk_bytes <= 256 * 1024);
        buf.clear();
        assert!(c.get(&keys[0], &mut buf).unwrap(), "kept: it was used");
        assert_eq!(buf, page(1));
        assert!(!c.get(&keys[1], &mut Vec::new()).unwrap(), "evicted");
        assert!(c.contains(&more[31]));
    }

    /// Writes 16 pages, then 32 more: the first pack is next in line to go. Returns the
    /// first 16 keys.
    fn fill_to_half(c: &mut BaselineCache) -> Vec<Key> {
        let keys: Vec<Key> = (1..=16).map(|i| c.insert(&page(i)).unwrap()).collect();
        for i in 17..=48 {
            c.insert(&page(i)).unwrap();
        }
        keys
    }

    #[test]
    fn an_entry_served_from_memory_is_copied_forward_too() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            pack_bytes: 32 * 1024,
            // Everything held in memory as well: hits never read a pack.
            ..CacheConfig::persistent(dir.path(), 1 << 20, 256 * 1024)
        };
        let mut c = BaselineCache::open(cfg).unwrap();
        let keys = fill_to_half(&mut c);
        let disk = c.stats().disk_bytes;
        assert!(c.get(&keys[0], &mut Vec::new()).unwrap());
        assert!(c.stats().disk_bytes > disk, "copied forward");
        for i in 49..=64 {
            c.insert(&page(i)).unwrap();
        }
        let mut buf = Vec::new();
        assert!(c.get(&keys[0], &mut buf).unwrap(), "kept: it was used");
        assert_eq!(buf, page(1));
        assert!(!c.contains(&keys[1]), "its neighbour went with the pack");
    }

    #[test]
    fn after_a_restart_an_entry_copied_forward_is_indexed_where_it_lasts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            pack_bytes: 32 * 1024,
            ..CacheConfig::persistent(dir.path(), 0, 256 * 1024)
        };
        let mut c = BaselineCache::open(cfg.clone()).unwrap();
        let keys = fill_to_half(&mut c);
        assert!(c.get(&keys[0], &mut Vec::new()).unwrap());
        drop(c);
        let mut c = BaselineCache::open(cfg).unwrap();
        for i in 49..=64 {
            c.insert(&page(i)).unwrap();
        }
        let mut buf = Vec::new();
        assert!(
            c.get(&keys[0], &mut buf).unwrap(),
            "the copy in the newer pack was not the one indexed"
        );
        assert_eq!(buf, page(1));
    }

    #[test]
    fn a_pack_that_cannot_be_read_is_put_out_of_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig::persistent(dir.path(), 0, 1 << 20);
        let mut c = BaselineCache::open(cfg.clone()).unwrap();
        let k = c.insert(&page(1)).unwrap();
        drop(c);
        // Named as a pack, and not a file.
        let bad = dir.path().join("pack-00000007.hdec");
        std::fs::create_dir(&bad).unwrap();
        let mut c = BaselineCache::open(cfg).unwrap();
        assert!(c.get(&k, &mut Vec::new()).unwrap());
        assert!(!bad.exists());
        assert!(dir.path().join("pack-00000007.hdec.bad").exists());
        // New entries go to a pack of their own.
        let k2 = c.insert(&page(2)).unwrap();
        assert!(c.get(&k2, &mut Vec::new()).unwrap());
    }

    #[test]
    fn packs_are_known_by_their_written_names_and_numbers_do_not_wrap() {
        let dir = tempfile::tempdir().unwrap();
        // A pack full with one page: every insert after that begins a new one.
        let cfg = CacheConfig {
            pack_bytes: 4096,
            ..CacheConfig::persistent(dir.path(), 0, 1 << 20)
        };
        let mut c = BaselineCache::open(cfg.clone()).unwrap();
        let k = c.insert(&page(1)).unwrap();
        drop(c);
        let pack = dir.path().join("pack-00000000.hdec");
        // Other names for the same number: not loaded a second time.
        for other in ["pack-0.hdec", "pack-+0.hdec", "pack-000000000.hdec"] {
            std::fs::copy(&pack, dir.path().join(other)).unwrap();
        }
        let c = BaselineCache::open(cfg.clone()).unwrap();
        let once = c.stats();
        assert_eq!(once.entries, 1, "{once:?}");
        assert_eq!(
            once.disk_bytes,
            std::fs::metadata(&pack).unwrap().len(),
            "{once:?}"
        );
        drop(c);
        // The last number: the next pack would wrap to the first; refused instead.
        let last = dir.path().join(format!("pack-{:08}.hdec", u32::MAX));
        std::fs::rename(&pack, &last).unwrap();
        let mut c = BaselineCache::open(cfg).unwrap();
        assert!(c.get(&k, &mut Vec::new()).unwrap());
        let _ = c.insert(&page(2));
        assert!(!pack.exists(), "a new pack took number 0");
    }

    #[test]
    fn an_entry_in_the_newest_pack_is_never_copied_forward() {
        // A disk budget of 0 makes half of it 0: every older pack is next in line, but the
        // newest is where copies go.
        let dir = tempfile::tempdir().unwrap();
        let mut c = BaselineCache::open(CacheConfig::persistent(dir.path(), 0, 0)).unwrap();
        let k = c.insert(&page(1)).unwrap();
        let disk = c.stats().disk_bytes;
        for _ in 0..3 {
            assert!(c.get(&k, &mut Vec::new()).unwrap());
        }
        assert_eq!(c.stats().disk_bytes, disk);
    }

    #[test]
    fn a_memory_cache_does_not_advertise_what_it_cannot_keep() {
        let mut c = BaselineCache::open(CacheConfig::memory(1000)).unwrap();
        let k = c.insert(&page(1)).unwrap();
        assert!(!c.contains(&k));
        assert!(c.summary().is_empty());
    }

    #[test]
    fn a_directory_is_used_by_one_cache_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig::persistent(dir.path(), 0, 1 << 20);
        let first = BaselineCache::open(cfg.clone()).unwrap();
        let err = BaselineCache::open(cfg.clone()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        BaselineCache::open(cfg).unwrap();
    }

    #[test]
    fn content_learned_with_its_key_is_kept_and_served() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig::persistent(dir.path(), 0, 1 << 30);
        let key = Key::of(&page(7));
        {
            let mut c = BaselineCache::open(cfg.clone()).unwrap();
            ContentSource::learn_keyed(&mut c, &key, &page(7));
            // Learned twice: kept once.
            ContentSource::learn_keyed(&mut c, &key, &page(7));
            assert_eq!(c.stats().inserted, 1);
        }
        // On disk under that key, as `insert` would have put it.
        let mut c = BaselineCache::open(cfg).unwrap();
        let mut buf = Vec::new();
        assert!(ContentSource::fetch(&mut c, &key, &mut buf));
        assert_eq!(buf, page(7));
    }

    #[test]
    fn a_corrupted_entry_is_detected_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig::persistent(dir.path(), 0, 1 << 30);
        let k = {
            let mut c = BaselineCache::open(cfg.clone()).unwrap();
            c.insert(&page(1)).unwrap();
            c.insert(&page(2)).unwrap()
        };
        // Flip a byte inside the second entry's data.
        let pack = BaselineCache::pack_path(dir.path(), 0);
        let mut bytes = std::fs::read(&pack).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        std::fs::write(&pack, &bytes).unwrap();
        let mut c = BaselineCache::open(cfg).unwrap();
        let mut buf = Vec::new();
        assert!(!c.get(&k, &mut buf).unwrap());
        assert!(buf.is_empty());
        assert_eq!(c.stats().corrupt, 1);
        assert!(!c.contains(&k));
        assert!(c.get(&Key::of(&page(1)), &mut buf).unwrap());
    }

    #[test]
    fn a_torn_tail_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig::persistent(dir.path(), 0, 1 << 30);
        {
            let mut c = BaselineCache::open(cfg.clone()).unwrap();
            for i in 1..=3 {
                c.insert(&page(i)).unwrap();
            }
        }
        let pack = BaselineCache::pack_path(dir.path(), 0);
        let len = std::fs::metadata(&pack).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&pack)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let mut c = BaselineCache::open(cfg.clone()).unwrap();
        assert_eq!(c.stats().entries, 2);
        c.insert(&page(4)).unwrap();
        drop(c);
        let mut c = BaselineCache::open(cfg).unwrap();
        assert_eq!(c.stats().entries, 3);
        let mut buf = Vec::new();
        assert!(c.get(&Key::of(&page(4)), &mut buf).unwrap());
        assert_eq!(buf, page(4));
    }

    #[test]
    fn seeds_serve_file_pages_and_a_changed_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("base.img");
        let mut data = Vec::new();
        for i in 1..=8 {
            data.extend_from_slice(&page(i));
        }
        data.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&img, &data).unwrap();
        let mut c = BaselineCache::open(CacheConfig::memory(1 << 20)).unwrap();
        assert_eq!(
            c.seed_path(dir.path(), 4096).unwrap(),
            8,
            "zero page not indexed"
        );
        let mut buf = Vec::new();
        assert!(c.get(&Key::of(&page(3)), &mut buf).unwrap());
        assert_eq!(buf, page(3));
        // The file changes under the cache: served content would be wrong, so it is a miss.
        let mut changed = data.clone();
        changed[4096 * 4 + 7] ^= 1;
        std::fs::write(&img, &changed).unwrap();
        assert!(!c.get(&Key::of(&page(5)), &mut Vec::new()).unwrap());
        assert_eq!(c.stats().corrupt, 1);
        // Page 6 changed as well, unread yet: its old content arriving takes its place.
        changed[4096 * 5 + 9] ^= 1;
        std::fs::write(&img, &changed).unwrap();
        let k6 = c.insert(&page(6)).unwrap();
        let mut buf = Vec::new();
        assert!(c.get(&k6, &mut buf).unwrap(), "the arrived copy is served");
        assert_eq!(buf, page(6));
        assert_eq!(c.stats().corrupt, 1);
        // An unchanged seed's page arriving stays a seed's (not copied, never evicted).
        let before = c.stats();
        let k2 = c.insert(&page(2)).unwrap();
        let after = c.stats();
        assert_eq!(
            (after.inserted, after.mem_bytes),
            (before.inserted, before.mem_bytes)
        );
        assert!(c.get(&k2, &mut Vec::new()).unwrap());
        // Seeds counted: 8, less page 5 (dropped as corrupt) and page 6 (replaced).
        assert_eq!(c.stats().seeded, 6);
    }
}
