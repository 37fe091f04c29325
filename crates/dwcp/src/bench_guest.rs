//! `dwcp bench guest`: boots the QEMU rows' guest on this host with its RAM in a file, lets
//! it fill its RAM, and counts what that RAM holds, page by page, against the reference
//! guest of the migration issue (about 35 % zero pages, 10 % duplicates, 10 % random, 45 %
//! code and text). The QEMU rows' figures depend on this mix, so it is measured, not assumed.

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use dwcp_migration::qemu_vm::{GuestImage, Launch, QemuProcess, qemu_binary};
use dwcp_transport::qmp::Qmp;
use serde_json::json;

use crate::cli::BenchGuestArgs;

const PAGE: usize = 4096;
/// A page is counted incompressible (random) when zstd level 1 leaves it at this size or
/// more: it saves under 2.4 %.
const INCOMPRESSIBLE: usize = 4000;

/// What a RAM image holds, in 4 KiB pages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Census {
    pub(crate) pages: u64,
    /// All bytes zero.
    pub(crate) zero: u64,
    /// Not zero, and the same as a page seen before (the first copy is counted by its kind).
    pub(crate) repeat: u64,
    /// Not zero, first of its content, and zstd level 1 cannot shrink it to [`INCOMPRESSIBLE`].
    pub(crate) incompressible: u64,
    /// The rest: first of its content and compressible (code, text, data).
    pub(crate) compressible: u64,
    /// The compressible pages' size at zstd level 1, each page compressed alone.
    pub(crate) compressible_zstd_bytes: u64,
}

impl Census {
    /// Counts the pages of `r` (a trailing partial page is counted as a page).
    pub(crate) fn of(mut r: impl Read) -> Result<Self> {
        let mut c = Self::default();
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        let mut zstd = zstd::bulk::Compressor::new(1).context("zstd")?;
        let mut out = vec![0u8; zstd::zstd_safe::compress_bound(PAGE)];
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = read_full(&mut r, &mut buf)?;
            if n == 0 {
                break;
            }
            for page in buf[..n].chunks(PAGE) {
                c.pages += 1;
                if page.iter().all(|&b| b == 0) {
                    c.zero += 1;
                    continue;
                }
                let mut key = [0u8; 16];
                key.copy_from_slice(&blake3::hash(page).as_bytes()[..16]);
                if !seen.insert(key) {
                    c.repeat += 1;
                    continue;
                }
                let z = zstd
                    .compress_to_buffer(page, &mut out)
                    .context("zstd of one page")?;
                if z >= INCOMPRESSIBLE {
                    c.incompressible += 1;
                } else {
                    c.compressible += 1;
                    c.compressible_zstd_bytes += z as u64;
                }
            }
            if n < buf.len() {
                break;
            }
        }
        Ok(c)
    }

    fn share(&self, n: u64) -> f64 {
        if self.pages == 0 {
            0.0
        } else {
            n as f64 / self.pages as f64
        }
    }
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where the guest's RAM file goes: a directory under `/dev/shm` when that has room for it
/// (and a margin), else one under the temp directory.
fn ram_dir(mem_mib: u64) -> Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    let fits = rustix::fs::statvfs(shm)
        .is_ok_and(|v| v.f_bavail.saturating_mul(v.f_frsize) >> 20 >= mem_mib + 256);
    let b = {
        let mut b = tempfile::Builder::new();
        b.prefix("dwcp-guest");
        b
    };
    if fits {
        b.tempdir_in(shm)
            .with_context(|| format!("a directory in {}", shm.display()))
    } else {
        b.tempdir()
            .with_context(|| format!("a directory in {}", std::env::temp_dir().display()))
    }
}

pub(crate) fn run(args: &BenchGuestArgs) -> Result<()> {
    let mem_mib = crate::cli::parse_size(&args.mem, false)
        .map_err(|e| crate::commands::UsageError(format!("--mem: {e}")))?
        >> 20;
    // The guest's kernel and initramfs (with its 60 MiB payload) need about 200 MiB; /init
    // reaches the reference mix up to about 16 GiB (its copy counts are bounded).
    if !(256..=16384).contains(&mem_mib) {
        return Err(crate::commands::UsageError(format!(
            "--mem: {} is outside 256Mi..16Gi (the guest needs 256 MiB to boot and fill)",
            args.mem
        ))
        .into());
    }
    qemu_binary().ok_or_else(|| anyhow!("qemu-system-x86_64 is not installed"))?;
    let image = GuestImage::find()
        .ok_or_else(|| anyhow!("no guest image: run scripts/guest-image.sh first"))?;
    let dir = ram_dir(mem_mib)?;
    let mut l = Launch::new(mem_mib, dir.path().join("serial.log"));
    l.mem_file = Some(dir.path().join("ram"));
    // No workload: what is counted is what the guest filled.
    l.dirty_pages_per_sec = 0;
    l.qmp = vec![dir.path().join("qmp")];
    let t = Instant::now();
    eprintln!(
        "booting a {mem_mib} MiB guest (RAM in {}) and filling its RAM ...",
        dir.path().display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Ctrl-C or SIGTERM ends the wait so that QEMU is killed and its RAM file removed (both
    // on drop) rather than left behind.
    let mut stop = rt.block_on(async { crate::commands::StopSignals::new() })?;
    let mut guest = QemuProcess::spawn(&image, &l)?;
    let waited = rt.block_on(async {
        tokio::select! {
            r = guest.wait_serial("dwcp-guest ready", Duration::from_secs(args.timeout_secs)) => r.map_err(anyhow::Error::from),
            _ = stop.next() => Err(anyhow!("interrupted")),
        }
    });
    let console = match waited {
        Ok(c) => c,
        Err(e) => {
            let stderr =
                std::fs::read_to_string(l.serial_log.with_extension("stderr")).unwrap_or_default();
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            return Err(if tail.is_empty() {
                e
            } else {
                e.context(format!("QEMU said: {}", tail.join(" | ")))
            });
        }
    };
    let booted = t.elapsed().as_secs_f64();
    let ready = console
        .lines()
        .find(|l| l.starts_with("dwcp-guest ready"))
        .unwrap_or("")
        .to_string();
    eprintln!("guest ready after {booted:.0} s ({ready})");
    // Paused, so that the count is of one moment (its heartbeat keeps running otherwise).
    rt.block_on(async {
        let mut q = Qmp::connect(&l.qmp[0], Duration::from_secs(10)).await?;
        q.execute("stop", None).await.map(|_| ())
    })
    .context("pausing the guest over QMP")?;
    let file = std::fs::File::open(dir.path().join("ram")).context("the guest's RAM file")?;
    let c = Census::of(std::io::BufReader::new(file))?;
    drop(guest);

    let mb = |pages: u64| pages as f64 * PAGE as f64 / 1e6;
    outln!(
        "guest RAM: {mem_mib} MiB, {} pages (`dwcp-guest ready` after {booted:.0} s; counted paused)",
        c.pages
    );
    outln!();
    outln!("| pages | count | share | MB | reference guest |");
    outln!("|---|---|---|---|---|");
    for (what, n, reference) in [
        ("zero", c.zero, "~35 %"),
        ("repeat another page", c.repeat, "~10 %"),
        ("incompressible (random)", c.incompressible, "~10 %"),
        ("compressible (code, text)", c.compressible, "~45 %"),
    ] {
        outln!(
            "| {what} | {n} | {:.1} % | {:.1} | {reference} |",
            c.share(n) * 100.0,
            mb(n)
        );
    }
    outln!();
    outln!(
        "The compressible pages at zstd level 1, each page alone: {:.1} MB.",
        c.compressible_zstd_bytes as f64 / 1e6
    );
    let out = args
        .json_out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-guest.json"));
    let v = json!({
        "mem_mib": mem_mib,
        "ready": ready,
        "ready_seconds": booted,
        "pages": c.pages,
        "zero": c.zero,
        "repeat": c.repeat,
        "incompressible": c.incompressible,
        "compressible": c.compressible,
        "compressible_zstd1_bytes": c.compressible_zstd_bytes,
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("JSON written to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator for incompressible bytes (xorshift64*).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    fn text(i: usize) -> Vec<u8> {
        format!("line {i} of some text that compresses well\n")
            .repeat(PAGE)
            .into_bytes()[..PAGE]
            .to_vec()
    }

    #[test]
    fn each_page_is_counted_by_its_kind_and_repeats_once_seen() {
        let mut ram = Vec::new();
        ram.extend(vec![0u8; 3 * PAGE]); // 3 zero
        ram.extend(noise(1, PAGE)); // incompressible
        ram.extend(text(1)); // compressible
        ram.extend(noise(1, PAGE)); // repeat of the random page
        ram.extend(text(1)); // repeat of the text page
        ram.extend(text(2)); // compressible
        ram.extend(noise(2, PAGE)); // incompressible
        // A last page cut short, zero: still a page.
        ram.extend(vec![0u8; 100]);
        let c = Census::of(&ram[..]).unwrap();
        assert_eq!(
            (c.pages, c.zero, c.repeat, c.incompressible, c.compressible),
            (10, 4, 2, 2, 2),
            "{c:?}"
        );
        assert!(
            c.compressible_zstd_bytes > 0 && c.compressible_zstd_bytes < 2 * 400,
            "{c:?}"
        );
    }

    #[test]
    fn pages_across_read_boundaries_are_whole() {
        // A reader that returns 1000 bytes at a time must give the same census as one slice.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(1000).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut ram = Vec::new();
        for i in 0..300 {
            ram.extend(if i % 3 == 0 {
                noise(i as u64, PAGE)
            } else {
                text(i % 7)
            });
        }
        let whole = Census::of(&ram[..]).unwrap();
        assert_eq!(Census::of(Dribble(&ram)).unwrap(), whole);
        assert_eq!(
            (whole.pages, whole.incompressible, whole.compressible),
            (300, 100, 7)
        );
    }
}
