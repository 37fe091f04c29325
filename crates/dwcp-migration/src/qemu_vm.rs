//! Starting the test guest under QEMU (TCG), for the QEMU backend's tests, `dwcp bench
//! migration` and `dwcp migrate --qemu-demo`: the kernel and initramfs built by
//! `scripts/guest-image.sh`, RAM optionally backed by a file (so that source and destination
//! memory can be compared byte for byte), the serial console to a log file, QMP monitors on
//! Unix sockets. The process is killed when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz`.
    pub initrd: PathBuf,
    /// `disk.img`, attached read-only when present: the guest reads part of what it keeps
    /// in RAM from it, as a VM's page cache holds its disk's files.
    pub disk: Option<PathBuf>,
}

impl GuestImage {
    /// The image in `dir` (`vmlinuz`, `initramfs.cpio.gz`, and `disk.img` if there), if the
    /// first two are there.
    pub fn in_dir(dir: &Path) -> Option<Self> {
        let disk = dir.join("disk.img");
        let img = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
            disk: disk.is_file().then_some(disk),
        };
        (img.kernel.is_file() && img.initrd.is_file()).then_some(img)
    }

    /// `$DWCP_GUEST_DIR`, else `target/guest` under the current directory or an ancestor.
    pub fn find() -> Option<Self> {
        if let Some(d) = std::env::var_os("DWCP_GUEST_DIR") {
            return Self::in_dir(Path::new(&d));
        }
        let mut dir = std::env::current_dir().ok();
        while let Some(d) = dir {
            if let Some(img) = Self::in_dir(&d.join("target/guest")) {
                return Some(img);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        None
    }
}

/// The QEMU binary, if installed.
pub fn qemu_binary() -> Option<PathBuf> {
    let name = "qemu-system-x86_64";
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// How to start one QEMU.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Back RAM with this file (shared mapping), or anonymous memory when `None`.
    pub mem_file: Option<PathBuf>,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// QMP monitors to open (`server=on,wait=off`).
    pub qmp: Vec<PathBuf>,
    /// `-incoming` URI (a destination).
    pub incoming: Option<String>,
    /// Stay paused after an incoming migration (`-S`), e.g. to compare memory first.
    pub stay_paused: bool,
    /// Pages per second the guest's workload rewrites.
    pub dirty_pages_per_sec: u64,
    /// Rewrite only pages among the first this many of the guest's random data (a working
    /// set it keeps rewriting); `None`: anywhere in it.
    pub hot_pages: Option<u64>,
    /// Command prefix, e.g. `ip netns exec NS`.
    pub prefix: Vec<String>,
    /// Give the guest 8 KiB more than `mem_mib`, so that a TCG guest's dirty pages are all
    /// seen by QEMU before 9.0. Those QEMUs lose guest writes during a migration: the fast
    /// path of their dirty-bitmap sync (RAM a whole number of 256 KiB) clears bits without
    /// making the vCPU's TLB trap the next write to those pages, so a page written again
    /// after it was sent is never sent again (fixed upstream by commit 03bfc2188f, "physmem:
    /// Fix migration dirty bitmap coherency with TCG memory access"; not in 7.2.x). The slow
    /// path does it right. KVM guests track dirty pages in the kernel and are not affected.
    pub exact_dirty_tracking: bool,
    /// NUMA nodes, each with an equal share of RAM (rounded down to 8 KiB, so a guest may
    /// get a little less than `mem_mib`) in a RAM block of its own (0 or 1: one block, no
    /// NUMA). With `mem_file`, node `i` is backed by that path with `.i` appended.
    pub numa_nodes: u32,
    /// Fault in (and so zero) all guest RAM when QEMU starts (`prealloc=on`, or
    /// `-mem-prealloc`), as a destination waiting for an incoming migration may be started:
    /// the kernel then zeroes the fresh pages before the migration rather than while QEMU
    /// loads them during it.
    pub prealloc: bool,
}

impl Launch {
    /// A guest of `mem_mib` logging its console to `serial_log`.
    pub fn new(mem_mib: u64, serial_log: PathBuf) -> Self {
        Self {
            mem_mib,
            mem_file: None,
            serial_log,
            qmp: Vec::new(),
            incoming: None,
            stay_paused: false,
            dirty_pages_per_sec: 256,
            hot_pages: None,
            prefix: Vec::new(),
            exact_dirty_tracking: false,
            numa_nodes: 1,
            prealloc: false,
        }
    }
}

/// A running QEMU; killed on drop.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    serial: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU and waits (at most 10 s) for its monitors to appear.
    pub fn spawn(image: &GuestImage, launch: &Launch) -> std::io::Result<Self> {
        let qemu = qemu_binary()
            .ok_or_else(|| std::io::Error::other("qemu-system-x86_64 is not installed"))?;
        let mut argv: Vec<String> = launch.prefix.clone();
        argv.push(qemu.display().to_string());
        // KiB: QEMU rounds RAM sizes up to 8 KiB. With NUMA, each node's block gets the 8 KiB.
        let nodes = u64::from(launch.numa_nodes.max(1));
        let share = ((launch.mem_mib << 10) / nodes) & !7;
        let node = share + if launch.exact_dirty_tracking { 8 } else { 0 };
        let m = node * nodes;
        argv.extend(
            [
                "-machine",
                "pc,accel=tcg",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-m",
                &format!("{m}K"),
                "-kernel",
                &image.kernel.display().to_string(),
                "-initrd",
                &image.initrd.display().to_string(),
                "-append",
                &format!(
                    "console=ttyS0 quiet panic=-1 dwcp.dirty={}{}",
                    launch.dirty_pages_per_sec,
                    launch
                        .hot_pages
                        .map_or_else(String::new, |h| format!(" dwcp.hot={h}"))
                ),
                "-serial",
                &format!("file:{}", launch.serial_log.display()),
            ]
            .map(String::from),
        );
        if let Some(d) = &image.disk {
            // Read-only: source and destination QEMU open it at once during a migration.
            argv.push("-drive".into());
            argv.push(format!(
                "file={},if=virtio,format=raw,readonly=on",
                // QEMU's option syntax: a comma in a value is written twice.
                d.display().to_string().replace(',', ",,")
            ));
        }
        let prealloc = if launch.prealloc { ",prealloc=on" } else { "" };
        if nodes > 1 {
            for i in 0..nodes {
                argv.push("-object".into());
                argv.push(match &launch.mem_file {
                    Some(f) => format!(
                        "memory-backend-file,id=m{i},size={node}K,mem-path={}.{i},share=on{prealloc}",
                        f.display()
                    ),
                    None => format!("memory-backend-ram,id=m{i},size={node}K{prealloc}"),
                });
                argv.push("-numa".into());
                argv.push(format!("node,memdev=m{i}"));
            }
        } else if let Some(f) = &launch.mem_file {
            argv.push("-object".into());
            argv.push(format!(
                "memory-backend-file,id=ram0,size={m}K,mem-path={},share=on{prealloc}",
                f.display()
            ));
            argv.push("-machine".into());
            argv.push("memory-backend=ram0".into());
        } else if launch.prealloc {
            argv.push("-mem-prealloc".into());
        }
        for q in &launch.qmp {
            let _ = std::fs::remove_file(q);
            argv.push("-qmp".into());
            argv.push(format!("unix:{},server=on,wait=off", q.display()));
        }
        if let Some(i) = &launch.incoming {
            argv.push("-incoming".into());
            argv.push(i.clone());
        }
        if launch.stay_paused {
            argv.push("-S".into());
        }
        let _ = std::fs::remove_file(&launch.serial_log);
        let log = std::fs::File::create(launch.serial_log.with_extension("stderr"))?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut p = Self {
            child,
            serial: launch.serial_log.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !launch.qmp.iter().all(|q| q.exists()) {
            if let Some(status) = p.child.try_wait()? {
                let err = std::fs::read_to_string(launch.serial_log.with_extension("stderr"))
                    .unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "QEMU exited at start ({status}): {}",
                    err.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "QEMU's monitors did not appear in 10 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `needle` (at most `timeout`); returns the console.
    pub async fn wait_serial(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> std::io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.serial();
            if s.contains(needle) {
                return Ok(s);
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "QEMU exited ({status}) before the console showed {needle:?}"
                )));
            }
            if Instant::now() > deadline {
                let tail: String = s.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(std::io::Error::other(format!(
                    "the console did not show {needle:?} within {timeout:?} (last lines: {tail})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
