//! The WAN testbed: two network namespaces joined through a link emulator.
//!
//! ```text
//!   netns A                                                     netns B
//!   10.213.N.1  --dwcp0 (TUN)--> [ emulator A->B ] --dwcp0 (TUN)-->  10.213.N.2
//!               <--------------- [ emulator B->A ] <--------------
//!   tc: HTB rate limit + byte-limited FIFO on each TUN's egress (the bottleneck queue)
//! ```
//!
//! The kernels this project runs on have no `sch_netem`, so one-way delay, jitter and random
//! loss are applied in user space: each TUN device is created inside its namespace, and one
//! thread per direction reads packets leaving A, drops a seeded random fraction, and writes the
//! rest into B once their delay has passed (in order: jitter never reorders). The rate limit
//! stays in the kernel (HTB), where it is exact. TUN devices without offloads hand over
//! wire-sized packets, so loss hits individual packets, never GSO super-packets.
//!
//! Only addresses inside the two namespaces are used (10.213.N.0/30, where N is derived from
//! the process id). Everything is torn down on [`Testbed::down`] or drop: the emulator threads
//! stop, which removes the TUN devices, and the namespaces are deleted. Root is required.

use std::fmt;
use std::fs::File;
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// A link profile: what the emulated path does to packets, per direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Name: `dc`, `wan`, `internet`, `lossy`, or the specification [`Profile::parse`] read.
    pub name: String,
    /// One-way delay (RTT is twice this).
    pub delay: Duration,
    /// Uniform jitter added to the delay, 0 up to this much per packet. It never reorders: a
    /// packet drawn earlier than the one before it leaves with that one, so under load the
    /// added delay tends towards this much and packets leave in bursts.
    pub jitter: Duration,
    /// Probability that a packet is dropped, 0..1.
    pub loss: f64,
    /// Link rate in bits per second; `None` for no limit.
    pub rate_bps: Option<u64>,
}

impl Profile {
    /// The profiles of the architecture page.
    pub fn named(name: &str) -> Option<Self> {
        let p = |delay_us: u64, jitter_us: u64, loss: f64, rate: Option<u64>| Self {
            name: name.to_string(),
            delay: Duration::from_micros(delay_us),
            jitter: Duration::from_micros(jitter_us),
            loss,
            rate_bps: rate,
        };
        Some(match name {
            // 0.2 ms RTT, no rate limit (CPU-bound), no loss.
            "dc" => p(100, 0, 0.0, None),
            // 40 ms RTT, 1 Gbit/s, 0.01 % loss.
            "wan" => p(20_000, 500, 0.0001, Some(1_000_000_000)),
            // 100 ms RTT, 200 Mbit/s, 0.5 % loss.
            "internet" => p(50_000, 1_000, 0.005, Some(200_000_000)),
            // 150 ms RTT, 100 Mbit/s, 2 % loss.
            "lossy" => p(75_000, 2_000, 0.02, Some(100_000_000)),
            _ => return None,
        })
    }

    /// Names of the built-in profiles.
    pub const NAMES: [&'static str; 4] = ["dc", "wan", "internet", "lossy"];

    /// A profile from a specification: a built-in name (`internet`), settings
    /// (`rtt=300ms,rate=50mbit,loss=1%`), or a name and settings that change it
    /// (`lossy,rtt=300ms`). Settings: `rtt` (round trip, e.g. `80ms`, `0.2ms`, `1s`),
    /// `jitter` (at most this much more delay each way), `loss` (each way, a percentage),
    /// `rate` (`500kbit`, `50mbit`, `1gbit`, or `unlimited`). What a name does not set is
    /// zero: no delay, no jitter, no loss, no rate limit. The profile is named after the
    /// specification.
    pub fn parse(spec: &str) -> Result<Self, String> {
        // Spaces around the commas and the `=` are allowed; not inside a value.
        let spec: String = spec
            .split(',')
            .map(|part| match part.split_once('=') {
                Some((k, v)) => format!("{}={}", k.trim(), v.trim()),
                None => part.trim().to_string(),
            })
            .collect::<Vec<_>>()
            .join(",");
        if spec.is_empty() {
            return Err(format!(
                "an empty link profile: one of {:?}, or {SETTINGS_EXAMPLE}",
                Self::NAMES
            ));
        }
        let mut settings: Vec<&str> = spec.split(',').collect();
        // A name first, unless the specification is settings alone (nothing set is zero).
        // `split` yields at least one piece, so `settings[0]` exists.
        let mut p = if settings[0].contains('=') {
            Self {
                name: String::new(),
                delay: Duration::ZERO,
                jitter: Duration::ZERO,
                loss: 0.0,
                rate_bps: None,
            }
        } else {
            let name = settings.remove(0);
            Self::named(name).ok_or_else(|| {
                format!(
                    "unknown link profile {name:?}: one of {:?}, or {SETTINGS_EXAMPLE}",
                    Self::NAMES
                )
            })?
        };
        let mut seen: Vec<&str> = Vec::new();
        for setting in settings {
            let (key, value) = setting.split_once('=').ok_or_else(|| {
                format!(
                    "link profile setting {setting:?}: expected KEY=VALUE (rtt, jitter, loss, rate)"
                )
            })?;
            if seen.contains(&key) {
                return Err(format!("link profile: {key} is set twice"));
            }
            seen.push(key);
            let bad = |why: String| format!("link profile setting {setting:?}: {why}");
            match key {
                "rtt" => {
                    let rtt = parse_duration(value).map_err(bad)?;
                    if rtt > MAX_RTT {
                        return Err(bad(format!("at most {} ms", MAX_RTT.as_millis())));
                    }
                    p.delay = rtt / 2;
                }
                "jitter" => {
                    let j = parse_duration(value).map_err(bad)?;
                    if j > MAX_JITTER {
                        return Err(bad(format!("at most {} ms", MAX_JITTER.as_millis())));
                    }
                    p.jitter = j;
                }
                "loss" => {
                    let pct = value
                        .strip_suffix('%')
                        .and_then(|v| v.parse::<f64>().ok())
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| bad("a percentage, e.g. 0.5%".into()))?;
                    if !(0.0..=MAX_LOSS_PERCENT).contains(&pct) {
                        return Err(bad(format!("between 0% and {MAX_LOSS_PERCENT}%")));
                    }
                    p.loss = pct / 100.0;
                }
                "rate" => p.rate_bps = parse_link_rate(value).map_err(bad)?,
                _ => {
                    return Err(format!(
                        "link profile setting {setting:?}: unknown key {key:?} (rtt, jitter, \
                         loss, rate)"
                    ));
                }
            }
        }
        p.name = spec;
        p.check()?;
        Ok(p)
    }

    /// Whether the emulator can run this profile: every setting within the bounds
    /// [`Profile::parse`] takes, and what a direction holds in flight at full rate (rate ×
    /// (delay + jitter)) within [`MAX_HELD_PACKETS`] full-sized packets, beyond which it
    /// would drop packets of its own.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.name;
        if self.delay > MAX_RTT / 2 {
            return Err(format!(
                "link profile {name:?}: a round trip of at most {} ms",
                MAX_RTT.as_millis()
            ));
        }
        if self.jitter > MAX_JITTER {
            return Err(format!(
                "link profile {name:?}: a jitter of at most {} ms",
                MAX_JITTER.as_millis()
            ));
        }
        if !(0.0..=MAX_LOSS_PERCENT / 100.0).contains(&self.loss) {
            return Err(format!(
                "link profile {name:?}: a loss between 0% and {MAX_LOSS_PERCENT}%"
            ));
        }
        if let Some(rate) = self.rate_bps {
            if !RATE_RANGE.contains(&rate) {
                return Err(format!(
                    "link profile {name:?}: a rate between 100kbit and 100gbit"
                ));
            }
            let held = rate as f64 / 8.0 * (self.delay + self.jitter).as_secs_f64();
            let most = (MAX_HELD_PACKETS * 1500) as f64;
            if held > most {
                return Err(format!(
                    "link profile {name:?}: at its rate, its one-way delay and jitter hold {:.0} MB \
                     in flight each way; the emulator holds at most {:.0} MB (a lower rate or \
                     a shorter round trip)",
                    held / 1e6,
                    most / 1e6
                ));
            }
        }
        Ok(())
    }

    /// The profile's name with every character that is not a letter, digit, `.`, `-` or `_`
    /// replaced by `_`: for file names.
    pub fn file_name(&self) -> String {
        self.name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Round-trip time without queueing.
    pub fn rtt(&self) -> Duration {
        self.delay * 2
    }

    /// Bytes in flight on the path at full rate (bandwidth-delay product), if rate-limited.
    pub fn bdp_bytes(&self) -> Option<u64> {
        self.rate_bps
            .map(|r| (r as f64 / 8.0 * self.rtt().as_secs_f64()) as u64)
    }
}

/// What error messages offer as an example of settings.
const SETTINGS_EXAMPLE: &str = "settings such as rtt=80ms,rate=100mbit,loss=0.5%";

/// Longest round trip a profile may ask for (a geostationary satellite hop is about 0.6 s).
const MAX_RTT: Duration = Duration::from_secs(2);
/// Largest jitter, each way.
const MAX_JITTER: Duration = Duration::from_secs(1);
/// Largest loss, each way, in percent.
const MAX_LOSS_PERCENT: f64 = 50.0;
/// Link rates a profile may ask for, bits per second.
const RATE_RANGE: std::ops::RangeInclusive<u64> = 100_000..=100_000_000_000;

/// `80ms`, `0.2ms`, `1.5s`, `500us`.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| format!("{value:?} is not a duration such as 80ms, 0.2ms or 1s"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => {
            return Err(format!(
                "{value:?}: the unit must be s, ms or us (e.g. 80ms)"
            ));
        }
    };
    // Bounded by the callers' maxima; this only keeps the conversion from overflowing.
    if secs > 3600.0 {
        return Err(format!("{value:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `500kbit`, `50mbit`, `1gbit`, `2000000bit`, or `unlimited` (`None`).
fn parse_link_rate(value: &str) -> Result<Option<u64>, String> {
    let lower = value.to_ascii_lowercase();
    if lower == "unlimited" {
        return Ok(None);
    }
    let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .into_iter()
        .find_map(|(unit, m)| lower.strip_suffix(unit).map(|n| (n, m)))
        .ok_or_else(|| {
            format!("{value:?}: a rate in bit, kbit, mbit or gbit (e.g. 100mbit), or unlimited")
        })?;
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| format!("{value:?} is not a rate such as 100mbit"))?;
    let bps = n * mult;
    if !(*RATE_RANGE.start() as f64..=*RATE_RANGE.end() as f64).contains(&bps) {
        return Err(format!("{value:?}: between 100kbit and 100gbit"));
    }
    Ok(Some(bps.round() as u64))
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self.rate_bps.map_or_else(
            || "unlimited".to_string(),
            |r| {
                if r % 1_000_000 == 0 {
                    format!("{} Mbit/s", r / 1_000_000)
                } else {
                    format!("{:.3} Mbit/s", r as f64 / 1e6)
                }
            },
        );
        write!(
            f,
            "{}: RTT {:.1} ms (jitter +0..{:.1} ms each way), {rate}, loss {:.2} % each way",
            self.name,
            self.rtt().as_secs_f64() * 1e3,
            self.jitter.as_secs_f64() * 1e3,
            self.loss * 100.0
        )
    }
}

/// What went wrong building or running the testbed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestbedError {
    /// Not running as root.
    #[error("the testbed needs root (network namespaces, TUN devices, tc)")]
    NotRoot,
    /// A command failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its error output or the spawn error.
        detail: String,
    },
    /// A profile the emulator cannot run ([`Profile::check`]).
    #[error("{0}")]
    Profile(String),
    /// Told to give up ([`Testbed::up_unless`]) before it was built.
    #[error("interrupted before the testbed was built")]
    Interrupted,
    /// A system call failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Whether this process can build a testbed.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// How long one `ip`, `tc` or `sysctl` command may take before it is killed and reported.
const COMMAND_LIMIT: Duration = Duration::from_secs(20);

fn run(args: &[&str]) -> Result<Output, TestbedError> {
    use std::io::Read;
    let failed = |detail: String| TestbedError::Command {
        cmd: args.join(" "),
        detail,
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    // Its output read on threads of their own (a full pipe would stall it); the wait bounded,
    // the child killed at the deadline while it is still unreaped (its pid cannot have gone
    // to another process).
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!(
                    "no answer within {} s; killed",
                    COMMAND_LIMIT.as_secs()
                )));
            }
            Err(e) => return Err(failed(e.to_string())),
        }
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Packets counted by the emulator, per direction.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Packets read from the sending side.
    pub packets: AtomicU64,
    /// Packets dropped on purpose.
    pub dropped: AtomicU64,
    /// Bytes delivered.
    pub bytes: AtomicU64,
    /// Packets dropped because the emulator already held [`MAX_HELD_PACKETS`] in flight (a
    /// path without a rate limit and a long delay; [`Profile::check`] refuses rate-limited
    /// profiles that would get there): a router's tail drop.
    pub overflowed: AtomicU64,
    /// Packets the emulator could not write to the receiving TUN device.
    pub unsent: AtomicU64,
}

/// Packets one direction of the emulator holds at most while they wait out their delay
/// (about 256 MiB of full-sized packets). It holds every packet for the whole delay, so a
/// rate-limited direction holds rate × (delay + jitter): [`Profile::check`] refuses a profile
/// that needs more. Only a path without a rate limit can get there.
pub const MAX_HELD_PACKETS: usize = 180_000;

/// A running testbed. Dropping it tears everything down.
#[derive(Debug)]
pub struct Testbed {
    /// The profile in force.
    pub profile: Profile,
    /// Name of namespace A.
    pub ns_a: String,
    /// Name of namespace B.
    pub ns_b: String,
    /// Address of A (inside its namespace).
    pub addr_a: std::net::Ipv4Addr,
    /// Address of B.
    pub addr_b: std::net::Ipv4Addr,
    /// A→B and B→A counters.
    pub stats: [Arc<LinkStats>; 2],
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sysctls: Vec<(String, String)>,
    up: bool,
    /// Held while the testbed exists: one testbed per machine at a time, so global sysctls are
    /// saved and restored in order and benchmarks do not share the CPU.
    _lock: File,
}

/// Path of the machine-wide testbed lock.
const LOCK_PATH: &str = "/run/dwcp-testbed.lock";

fn machine_lock(cancel: &AtomicBool) -> Result<File, TestbedError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .map_err(|source| TestbedError::Io {
            what: format!("open {LOCK_PATH}"),
            source,
        })?;
    // Bounded wait: another testbed (a benchmark, a test) may hold it for a few minutes.
    let start = Instant::now();
    let deadline = start + Duration::from_secs(900);
    let mut said = false;
    loop {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                // Who holds it, for anyone waiting (best effort).
                use std::os::unix::fs::FileExt;
                let pid = std::process::id().to_string();
                let _ = f
                    .set_len(0)
                    .and_then(|()| f.write_all_at(pid.as_bytes(), 0));
                return Ok(f);
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && Instant::now() < deadline => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(TestbedError::Interrupted);
                }
                if !said && start.elapsed() >= Duration::from_secs(1) {
                    said = true;
                    let holder = std::fs::read_to_string(LOCK_PATH).unwrap_or_default();
                    warn!(
                        "waiting (up to 15 min) for another testbed on this machine to end \
                         (process {}, {LOCK_PATH})",
                        holder.trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(TestbedError::Io {
                    what: format!("lock {LOCK_PATH} (another testbed still running after 15 min?)"),
                    source: e.into(),
                });
            }
        }
    }
}

/// Where the original values of the global sysctls are kept while a testbed runs, so that a
/// testbed killed before its teardown is repaired by the next one.
const SAVED_SYSCTLS: &str = "/run/dwcp-testbed.sysctls";

fn restore_saved_sysctls() {
    let Ok(text) = std::fs::read_to_string(SAVED_SYSCTLS) else {
        return;
    };
    for line in text.lines() {
        if let Some((path, value)) = line.split_once('=')
            && let Err(e) = std::fs::write(path, value)
        {
            warn!("cannot restore {path} from an interrupted testbed: {e}");
        }
    }
    let _ = std::fs::remove_file(SAVED_SYSCTLS);
}

/// Global sysctls raised for the duration of a testbed (restored on teardown): buffer limits
/// large enough for one stream to fill a long fat pipe, and cubic allowed next to bbr so that
/// benchmarks can compare them. They are machine-wide: a limit already higher is kept, and the
/// allowed algorithms are added to, never taken away (see [`raised`]).
const GLOBAL_SYSCTLS: [(&str, &str); 3] = [
    ("net/core/rmem_max", "268435456"),
    ("net/core/wmem_max", "268435456"),
    ("net/ipv4/tcp_allowed_congestion_control", "reno bbr cubic"),
];

/// The value of global sysctl `key` while a testbed runs, given its value `old`: the larger of
/// the two for a number, and for the allowed congestion controls the old list with ours added
/// (those among `available`; a missing one is logged, and its benchmark rows fail).
fn raised(key: &str, old: &str, want: &str, available: &str) -> String {
    if let (Ok(o), Ok(w)) = (old.trim().parse::<u64>(), want.parse::<u64>()) {
        return o.max(w).to_string();
    }
    let mut list: Vec<&str> = old.split_whitespace().collect();
    for name in want.split_whitespace() {
        if list.contains(&name) {
            continue;
        }
        if available.split_whitespace().any(|a| a == name) {
            list.push(name);
        } else {
            warn!(
                "{key}: this kernel has no {name} (tcp_available_congestion_control: {available})"
            );
        }
    }
    list.join(" ")
}

impl Testbed {
    /// Builds the namespaces and starts the emulator for `profile`; `seed` fixes the loss
    /// pattern.
    pub fn up(profile: Profile, seed: u64) -> Result<Self, TestbedError> {
        Self::up_unless(profile, seed, &AtomicBool::new(false))
    }

    /// As [`up`](Self::up), but gives up ([`TestbedError::Interrupted`]) once `cancel` is set
    /// while it waits for another testbed of this machine to end.
    pub fn up_unless(
        profile: Profile,
        seed: u64,
        cancel: &AtomicBool,
    ) -> Result<Self, TestbedError> {
        profile.check().map_err(TestbedError::Profile)?;
        if !is_root() {
            return Err(TestbedError::NotRoot);
        }
        let lock = machine_lock(cancel)?;
        if cancel.load(Ordering::SeqCst) {
            return Err(TestbedError::Interrupted);
        }
        let pid = std::process::id();
        // Testbeds are exclusive per machine (the lock), so the subnet only has to differ from
        // leftovers of a crashed run; it is only ever used inside our namespaces.
        let n = (pid % 250) as u8 + 1;
        let mut tb = Self {
            ns_a: format!("dwcp-tb{pid}-a"),
            ns_b: format!("dwcp-tb{pid}-b"),
            _lock: lock,
            addr_a: std::net::Ipv4Addr::new(10, 213, n, 1),
            addr_b: std::net::Ipv4Addr::new(10, 213, n, 2),
            stats: [Arc::default(), Arc::default()],
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            sysctls: Vec::new(),
            up: true,
            profile,
        };
        // Tear down on any failure below (Drop does it).
        tb.build(seed)?;
        Ok(tb)
    }

    fn build(&mut self, seed: u64) -> Result<(), TestbedError> {
        remove_stale_namespaces();
        restore_saved_sysctls();
        let mut saved = String::new();
        for (key, _) in GLOBAL_SYSCTLS {
            let path = format!("/proc/sys/{key}");
            let old = std::fs::read_to_string(&path).map_err(|source| TestbedError::Io {
                what: format!("read {path}"),
                source,
            })?;
            saved.push_str(&format!("{path}={}\n", old.trim()));
        }
        std::fs::write(SAVED_SYSCTLS, saved).map_err(|source| TestbedError::Io {
            what: format!("write {SAVED_SYSCTLS}"),
            source,
        })?;
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        for (key, want) in GLOBAL_SYSCTLS {
            let path = format!("/proc/sys/{key}");
            let old = std::fs::read_to_string(&path).map_err(|source| TestbedError::Io {
                what: format!("read {path}"),
                source,
            })?;
            self.sysctls.push((path.clone(), old.trim().to_string()));
            let value = raised(key, &old, want, available.trim());
            std::fs::write(&path, &value).map_err(|source| TestbedError::Io {
                what: format!("write {path}"),
                source,
            })?;
        }
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = run(&["ip", "netns", "del", ns]);
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            // Per-namespace TCP buffer ceilings (the defaults cap a stream at ~4 MiB in
            // flight); each namespace gets the same, so iperf3 and dwcp see the same host.
            for (k, v) in [
                ("net.ipv4.tcp_rmem", "4096 131072 134217728"),
                ("net.ipv4.tcp_wmem", "4096 16384 134217728"),
            ] {
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("{k}={v}"),
                ])?;
            }
        }
        let tun_a = open_tun_in(&self.ns_a)?;
        let tun_b = open_tun_in(&self.ns_b)?;
        for (ns, me, peer) in [
            (&self.ns_a, self.addr_a, self.addr_b),
            (&self.ns_b, self.addr_b, self.addr_a),
        ] {
            run(&["ip", "-n", ns, "link", "set", "dwcp0", "mtu", "1500", "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &me.to_string(),
                "peer",
                &format!("{peer}/32"),
                "dev",
                "dwcp0",
            ])?;
            if let (Some(rate), Some(bdp)) = (self.profile.rate_bps, self.profile.bdp_bytes()) {
                let rate = format!("{rate}bit");
                // The bottleneck queue: one bandwidth-delay product, at least 64 KiB and at
                // most 256 MiB (bfifo's limit is 32 bits).
                let limit = bdp.clamp(64 * 1024, 256 << 20).to_string();
                run(&[
                    "tc", "-n", ns, "qdisc", "add", "dev", "dwcp0", "root", "handle", "1:", "htb",
                    "default", "1",
                ])?;
                run(&[
                    "tc", "-n", ns, "class", "add", "dev", "dwcp0", "parent", "1:", "classid",
                    "1:1", "htb", "rate", &rate, "ceil", &rate,
                ])?;
                run(&[
                    "tc", "-n", ns, "qdisc", "add", "dev", "dwcp0", "parent", "1:1", "bfifo",
                    "limit", &limit,
                ])?;
            } else {
                run(&[
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "set",
                    "dwcp0",
                    "txqueuelen",
                    "10000",
                ])?;
            }
        }
        let tun_a = Arc::new(tun_a);
        let tun_b = Arc::new(tun_b);
        self.spawn_direction(tun_a.clone(), tun_b.clone(), 0, seed)?;
        self.spawn_direction(tun_b, tun_a, 1, seed)?;
        debug!(profile = %self.profile, "testbed up");
        Ok(())
    }

    fn spawn_direction(
        &mut self,
        from: Arc<tun_rs::SyncDevice>,
        to: Arc<tun_rs::SyncDevice>,
        dir: usize,
        seed: u64,
    ) -> Result<(), TestbedError> {
        let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(MAX_HELD_PACKETS);
        let stop = self.stop.clone();
        let stats = self.stats[dir].clone();
        let profile = self.profile.clone();
        let reader = std::thread::Builder::new()
            .name(format!("tb-read-{dir}"))
            .spawn(move || read_loop(&from, &tx, &stop, &stats, &profile, seed, dir))
            .map_err(|source| TestbedError::Io {
                what: "start the emulator".into(),
                source,
            })?;
        // Joined at teardown whatever follows: it holds a TUN device, which would keep a
        // deleted namespace alive.
        self.threads.push(reader);
        let stats = self.stats[dir].clone();
        let writer = std::thread::Builder::new()
            .name(format!("tb-write-{dir}"))
            .spawn(move || write_loop(&to, &rx, &stats))
            .map_err(|source| TestbedError::Io {
                what: "start the emulator".into(),
                source,
            })?;
        self.threads.push(writer);
        Ok(())
    }

    /// Packets each side's TUN device dropped on its way into the emulator (A→B, B→A):
    /// a device whose queue is full drops rather than making its qdisc wait (kernels before
    /// 7.3), and these never reach the emulator's own counts. `None` where it cannot be read.
    pub fn device_drops(&self) -> [Option<u64>; 2] {
        [&self.ns_a, &self.ns_b].map(|ns| {
            let out = run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "cat",
                "/sys/class/net/dwcp0/statistics/tx_dropped",
            ])
            .ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        })
    }

    /// A command to run inside namespace A.
    pub fn cmd_a(&self, program: &str) -> Command {
        in_ns(&self.ns_a, program)
    }

    /// A command to run inside namespace B.
    pub fn cmd_b(&self, program: &str) -> Command {
        in_ns(&self.ns_b, program)
    }

    /// Stops the emulator, deletes the namespaces and restores the sysctls.
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if !self.up {
            return;
        }
        self.up = false;
        // Whatever still runs in the namespaces (a server started there, a shell someone
        // opened with `ip netns exec`) goes with them: nothing is left running on a link
        // that no longer exists.
        for ns in [&self.ns_a, &self.ns_b] {
            kill_all_in(ns);
        }
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.ns_a, &self.ns_b] {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                warn!("testbed teardown: {e}");
            }
        }
        for (path, old) in self.sysctls.drain(..).rev() {
            if let Err(e) = std::fs::write(&path, &old) {
                warn!("cannot restore {path} to {old:?}: {e}");
            }
        }
        let _ = std::fs::remove_file(SAVED_SYSCTLS);
        debug!("testbed down");
    }
}

/// SIGKILLs every process in namespace `ns` (`ip netns pids`), and waits (bounded) until
/// none is left.
fn kill_all_in(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<i32> = match run(&["ip", "netns", "pids", ns]) {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect(),
            Err(_) => return,
        };
        let me = std::process::id() as i32;
        let pids: Vec<i32> = pids.into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            warn!("testbed teardown: processes {pids:?} still in namespace {ns}");
            return;
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Deletes namespaces left by testbed processes that died without tearing down (killed, or a
/// test runner's timeout). Called with the machine lock held: no other testbed is up, in
/// this process or another, so every testbed namespace is stale. (Not judged by whether
/// the process its name holds still runs: that process id may have gone to another.)
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name
            .strip_prefix("dwcp-tb")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some()
        {
            warn!("removing stale testbed namespace {name}");
            // `ip netns del` only removes the name: processes left running there (a server
            // the dead testbed had started) would keep the namespace, unseen, for good.
            kill_all_in(&name);
            let _ = run(&["ip", "netns", "del", &name]);
        }
    }
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Creates the TUN device `dwcp0` inside namespace `ns`: a helper thread enters the namespace,
/// creates the device there, and exits; the file descriptor keeps working from any thread.
fn open_tun_in(ns: &str) -> Result<tun_rs::SyncDevice, TestbedError> {
    let path = format!("/var/run/netns/{ns}");
    let ns_file = File::open(&path).map_err(|source| TestbedError::Io {
        what: format!("open {path}"),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::move_into_link_name_space(
                ns_file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| TestbedError::Io {
                what: format!("enter namespace {ns}"),
                source: e.into(),
            })?;
            tun_rs::DeviceBuilder::new()
                .name("dwcp0")
                .build_sync()
                .map_err(|source| TestbedError::Io {
                    what: format!("create a TUN device in {ns}"),
                    source,
                })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(TestbedError::Io {
                what: "create a TUN device".into(),
                source: std::io::Error::other("helper thread panicked"),
            })
        })
    })
}

/// xorshift64*: a small seeded generator, so a run's loss pattern can be repeated.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` of `seed`: every seed and stream its own sequence
    /// (splitmix64 of both; xorshift's state must not be zero).
    fn new(seed: u64, stream: u64) -> Self {
        let mut z = seed
            .wrapping_add(stream.wrapping_mul(0xd1b5_4a32_d192_ed03))
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self(if z == 0 { 1 } else { z })
    }

    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn read_loop(
    from: &tun_rs::SyncDevice,
    tx: &mpsc::SyncSender<(Instant, Vec<u8>)>,
    stop: &AtomicBool,
    stats: &LinkStats,
    profile: &Profile,
    seed: u64,
    dir: usize,
) {
    // Loss and jitter draw from streams of their own: a profile's jitter does not change
    // which packets it drops.
    let mut losses = Rng::new(seed, 2 * dir as u64);
    let mut jitters = Rng::new(seed, 2 * dir as u64 + 1);
    let mut last_release = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // Wake up every 100 ms to notice `stop`.
        let mut fds = [rustix::event::PollFd::new(
            from,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                warn!("testbed link {dir}: cannot poll its TUN device ({e}); the link is down");
                return;
            }
        }
        let n = match from.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                warn!("testbed link {dir}: cannot read its TUN device ({e}); the link is down");
                return;
            }
        };
        stats.packets.fetch_add(1, Ordering::Relaxed);
        if profile.loss > 0.0 && losses.next_f64() < profile.loss {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let jitter = profile.jitter.mul_f64(jitters.next_f64());
        // Never release before the previous packet: jitter must not reorder.
        let release = (Instant::now() + profile.delay + jitter).max(last_release);
        last_release = release;
        match tx.try_send((release, buf[..n].to_vec())) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                stats.overflowed.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return,
        }
    }
}

fn write_loop(to: &tun_rs::SyncDevice, rx: &mpsc::Receiver<(Instant, Vec<u8>)>, stats: &LinkStats) {
    // Ends when the reader stops (channel closed).
    while let Ok((release, packet)) = rx.recv() {
        let now = Instant::now();
        if release > now {
            std::thread::sleep(release - now);
        }
        match to.send(&packet) {
            Ok(_) => {
                stats
                    .bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // Lost like a packet on a wire; counted, and said once.
                if stats.unsent.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("testbed link: cannot write a packet to its TUN device: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_name_alone_is_the_built_in_profile() {
        for name in Profile::NAMES {
            assert_eq!(Profile::parse(name).unwrap(), Profile::named(name).unwrap());
        }
        assert_eq!(Profile::parse(" lossy ").unwrap().name, "lossy");
    }

    #[test]
    fn settings_make_a_profile_and_change_a_named_one() {
        let p = Profile::parse("rtt=300ms, rate=50mbit, loss=1%, jitter=2ms").unwrap();
        assert_eq!(p.delay, Duration::from_millis(150));
        assert_eq!(p.jitter, Duration::from_millis(2));
        assert!((p.loss - 0.01).abs() < 1e-12);
        assert_eq!(p.rate_bps, Some(50_000_000));
        assert_eq!(p.name, "rtt=300ms,rate=50mbit,loss=1%,jitter=2ms");
        assert_eq!(p.file_name(), "rtt_300ms_rate_50mbit_loss_1__jitter_2ms");
        assert_eq!(
            p.to_string(),
            "rtt=300ms,rate=50mbit,loss=1%,jitter=2ms: RTT 300.0 ms (jitter +0..2.0 ms each way), \
             50 Mbit/s, loss 1.00 % each way"
        );

        // What a name does not change stays the name's.
        let p = Profile::parse("lossy, rtt = 0.4ms ,rate=Unlimited").unwrap();
        assert_eq!(p.name, "lossy,rtt=0.4ms,rate=Unlimited");
        let lossy = Profile::named("lossy").unwrap();
        assert_eq!(p.delay, Duration::from_micros(200));
        assert_eq!(
            (p.jitter, p.loss, p.rate_bps),
            (lossy.jitter, lossy.loss, None)
        );

        // What settings alone do not set is zero.
        let p = Profile::parse("rate=500kbit").unwrap();
        assert_eq!(
            (p.delay, p.jitter, p.loss),
            (Duration::ZERO, Duration::ZERO, 0.0)
        );
        assert_eq!(p.rate_bps, Some(500_000));
        assert!(p.to_string().contains("0.500 Mbit/s"), "{p}");
        assert_eq!(
            Profile::parse("rate=1.5gbit").unwrap().rate_bps,
            Some(1_500_000_000)
        );
        assert_eq!(
            Profile::parse("rtt=1s").unwrap().delay,
            Duration::from_millis(500)
        );
        assert_eq!(
            Profile::parse("rtt=900us").unwrap().delay,
            Duration::from_micros(450)
        );
    }

    /// Machine-wide limits are raised, never lowered; allowed algorithms are added to,
    /// never taken away, and only ones the kernel has.
    #[test]
    fn global_settings_are_raised_and_added_to() {
        assert_eq!(raised("k", "1000\n", "268435456", ""), "268435456");
        assert_eq!(raised("k", "1073741824", "268435456", ""), "1073741824");
        assert_eq!(
            raised(
                "k",
                "reno cubic htcp\n",
                "reno bbr cubic",
                "reno cubic htcp bbr"
            ),
            "reno cubic htcp bbr"
        );
        assert_eq!(
            raised("k", "reno cubic", "reno bbr cubic", "reno cubic"),
            "reno cubic"
        );
    }

    /// A profile built directly is held to the parser's bounds before a testbed runs it.
    #[test]
    fn a_profile_is_checked_however_it_was_made() {
        let mut p = Profile::named("internet").unwrap();
        p.check().unwrap();
        p.delay = Duration::from_secs(3600);
        assert!(p.check().unwrap_err().contains("round trip"));
        let mut p = Profile::named("internet").unwrap();
        p.loss = f64::NAN;
        assert!(p.check().unwrap_err().contains("loss"));
        let mut p = Profile::named("internet").unwrap();
        p.rate_bps = Some(10);
        assert!(p.check().unwrap_err().contains("rate"));
        // Unlimited: the emulator's tail drop is the limit, not refused.
        let p = Profile::parse("rtt=2s,rate=unlimited").unwrap();
        p.check().unwrap();
    }

    /// Neighbouring seeds, and the two streams of one seed, draw different sequences.
    #[test]
    fn every_seed_and_stream_has_its_own_sequence() {
        let first = |seed, stream| {
            let mut r = Rng::new(seed, stream);
            (0..4).map(|_| r.next_f64().to_bits()).collect::<Vec<_>>()
        };
        assert_ne!(first(2, 0), first(3, 0));
        assert_ne!(first(2, 0), first(2, 1));
        assert_eq!(first(7, 1), first(7, 1));
    }

    #[test]
    fn a_bad_specification_names_what_is_wrong() {
        for (spec, want) in [
            ("", "empty"),
            ("satellite", "unknown link profile \"satellite\""),
            ("internet,fast", "expected KEY=VALUE"),
            ("rtt=80ms,rtt=90ms", "rtt is set twice"),
            ("rtt=80", "unit must be s, ms or us"),
            ("rtt=-5ms", "not a duration"),
            ("rtt=5s", "at most 2000 ms"),
            ("rtt=3 00ms", "unit must be"),
            ("rtt=1e400ms", "unit must be"),
            ("rtt=1.2.3ms", "not a duration"),
            ("rtt=99999999s", "too long"),
            ("jitter=2s", "at most 1000 ms"),
            ("loss=1", "a percentage"),
            ("loss=NaN%", "a percentage"),
            ("loss=60%", "between 0% and 50%"),
            ("rate=100", "a rate in bit"),
            ("rate=0mbit", "not a rate"),
            ("rate=10bit", "between 100kbit and 100gbit"),
            ("rate=1000gbit", "between 100kbit and 100gbit"),
            ("delay=5ms", "unknown key \"delay\""),
            ("internet,dc", "expected KEY=VALUE"),
            ("rtt=2s,rate=5gbit", "the emulator holds at most 270 MB"),
        ] {
            let err = Profile::parse(spec).unwrap_err();
            assert!(err.contains(want), "{spec:?}: {err}");
        }
    }
}
