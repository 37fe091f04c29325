//! `dwcp testbed`: the WAN testbed as a tool. Builds the two namespaces and the link emulator
//! for a profile, runs a command on either side (or holds the testbed up for the user's own),
//! and tears everything down, whatever ends it: the command, ctrl-c, SIGTERM or the time
//! limit.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dwcp_testbed::Testbed;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, kill_process_group, waitid};

use crate::cli::TestbedArgs;

/// `eprintln!` that does not panic when standard error is gone (a terminal hung up, which
/// is also what SIGHUP tells): the teardown must still run, and the exit code say why.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// How `dwcp testbed` ended when it was not a success: the exit code it passes on.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub(crate) struct TestbedCommandEnded {
    pub(crate) reason: String,
    pub(crate) code: u8,
}

/// `timeout(1)`'s code for a command stopped at its time limit.
const TIMED_OUT: u8 = 124;

/// The signals that take the testbed down, and the exit status a shell gives for each.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Int,
    Term,
    Hup,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Self::Int => "SIGINT",
            Self::Term => "SIGTERM",
            Self::Hup => "SIGHUP",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Int => 130,
            Self::Term => 143,
            Self::Hup => 129,
        }
    }
}

struct Signals {
    rt: tokio::runtime::Runtime,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the signal handler")?;
        let (int, term, hup) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::hangup())?,
                ))
            })
            .context("cannot watch for SIGINT, SIGTERM and SIGHUP")?;
        Ok(Self { rt, int, term, hup })
    }

    /// A signal that came, waiting at most `wait` for one.
    fn wait(&mut self, wait: Duration) -> Option<Stop> {
        let Self { rt, int, term, hup } = self;
        rt.block_on(async {
            tokio::select! {
                biased;
                _ = int.recv() => Some(Stop::Int),
                _ = term.recv() => Some(Stop::Term),
                _ = hup.recv() => Some(Stop::Hup),
                () = tokio::time::sleep(wait) => None,
            }
        })
    }
}

/// A command in one namespace, in a process group of its own so that what it starts goes
/// with it. Stopped (SIGTERM to the group, SIGKILL to what is left two seconds later) on
/// drop; the testbed's teardown then kills anything still in the namespace.
struct Side {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
}

impl Side {
    fn spawn(tb: &Testbed, name: &'static str, ns_cmd: std::process::Command) -> Result<Self> {
        let mut cmd = ns_cmd;
        cmd.env("DWCP_TB_ADDR_A", tb.addr_a.to_string())
            .env("DWCP_TB_ADDR_B", tb.addr_b.to_string())
            .env("DWCP_TB_NS_A", &tb.ns_a)
            .env("DWCP_TB_NS_B", &tb.ns_b)
            .stdin(Stdio::null())
            .process_group(0);
        // Should this process be killed outright (no teardown), the command goes with it
        // (this thread lives as long as the process); what it started itself is killed by
        // the next testbed, which clears stale namespaces.
        dwcp_sys::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the command in {name}"))?;
        Ok(Self {
            name,
            child,
            status: None,
        })
    }

    /// Its exit status, once it has ended. The leader is left unreaped (a zombie) until
    /// [`Side::stop`]: its PID, the group's id, cannot go to another process meanwhile, so
    /// signalling the group never reaches an unrelated one.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(pid) = Pid::from_raw(self.child.id() as i32)
            && let Ok(Some(st)) = waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
            )
        {
            // As wait(2) encodes it, for `ExitStatus`.
            self.status = match (st.exit_status(), st.terminating_signal()) {
                (Some(code), _) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
                (None, Some(sig)) => Some(ExitStatus::from_raw(sig & 0x7f)),
                _ => None,
            };
        }
        self.status
    }

    /// Stops the whole group, its leader gone or not (background jobs outlive a shell),
    /// then reaps the leader.
    fn stop(&mut self) {
        if let Some(group) = Pid::from_raw(self.child.id() as i32) {
            let _ = kill_process_group(group, Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while group_runs(group) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if group_runs(group) {
                let _ = kill_process_group(group, Signal::KILL);
            }
        }
        // Reaped only now; SIGKILL first in case the leader itself is what still ran.
        if self.poll().is_none() {
            let _ = self.child.kill();
        }
        let reaped = self.child.wait().ok();
        self.status = self.status.or(reaped);
    }
}

/// Whether a process of `group` other than a zombie is left (`/proc/PID/stat`: the state,
/// then the parent, then the group, after the command name in parentheses).
fn group_runs(group: Pid) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        // No /proc to look in: as if it ran, so that SIGKILL follows.
        return true;
    };
    dir.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let f: Vec<&str> = rest.split_whitespace().take(3).collect();
        f.len() == 3 && f[0] != "Z" && f[0] != "X" && f[2] == group.as_raw_nonzero().to_string()
    })
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stop();
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// What `dwcp testbed` returns once A's command has ended with `status`.
fn passed_on(status: ExitStatus) -> Result<()> {
    match status.code() {
        Some(0) => Ok(()),
        code => Err(TestbedCommandEnded {
            reason: format!("the command in A {}", describe(status)),
            // As a shell passes it on: the status, or 128 + the signal.
            code: code
                .or_else(|| status.signal().map(|n| 128 + n))
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        }
        .into()),
    }
}

/// Runs `dwcp testbed`.
pub(crate) fn run(args: &TestbedArgs) -> Result<()> {
    let profile = crate::bench::testbed_profile(&args.profile, "testbed")?;
    let limit = Duration::from_secs(args.seconds);
    let mut signals = Signals::new()?;

    // Built on a thread of its own: it may wait for another testbed of this machine to end,
    // and a signal meanwhile must not go unheard.
    let cancel = Arc::new(AtomicBool::new(false));
    let building = {
        let cancel = cancel.clone();
        let seed = args.seed;
        std::thread::spawn(move || Testbed::up_unless(profile, seed, &cancel))
    };
    let mut stopped: Option<Stop> = None;
    while !building.is_finished() {
        if let Some(sig) = signals.wait(Duration::from_millis(50)) {
            stopped.get_or_insert(sig);
            cancel.store(true, Ordering::SeqCst);
        }
    }
    let built = building
        .join()
        .map_err(|_| anyhow::anyhow!("building the testbed panicked"))?;
    if let Some(sig) = stopped {
        // Built after all (the signal came too late to stop it): down again at once.
        if let Ok(tb) = built {
            tb.down();
        }
        return Err(TestbedCommandEnded {
            reason: format!("{}: stopped before the testbed was up", sig.name()),
            code: sig.code(),
        }
        .into());
    }
    let tb = built.context("cannot build the testbed")?;
    note!("testbed up: {}", tb.profile);
    for (side, addr, ns) in [("A", tb.addr_a, &tb.ns_a), ("B", tb.addr_b, &tb.ns_b)] {
        note!("  {side}: {addr} in namespace {ns}   (a shell there: sudo ip netns exec {ns} bash)");
    }
    note!("  commands get DWCP_TB_ADDR_A, DWCP_TB_ADDR_B, DWCP_TB_NS_A and DWCP_TB_NS_B");

    let shell = |program: std::process::Command, line: &str| {
        let mut c = program;
        c.args(["-c", line]);
        c
    };
    let mut b = match &args.in_b {
        Some(line) => Some(Side::spawn(&tb, "B", shell(tb.cmd_b("sh"), line))?),
        None => None,
    };
    let mut a = match &args.in_a {
        Some(line) => Some(Side::spawn(&tb, "A", shell(tb.cmd_a("sh"), line))?),
        None => None,
    };
    if a.is_none() {
        note!(
            "held up for at most {} s: ctrl-c or SIGTERM takes it down (and whatever still \
             runs in the namespaces)",
            args.seconds
        );
    }

    let started = Instant::now();
    let outcome: Result<()> = loop {
        // A's end first, whatever else happened in the same turn: its status is passed on.
        if let Some(s) = a.as_mut().and_then(Side::poll) {
            break passed_on(s);
        }
        if let Some(side) = b.as_mut()
            && side.status.is_none()
            && let Some(s) = side.poll()
        {
            note!("the command in {} {}", side.name, describe(s));
        }
        let sig = signals.wait(Duration::from_millis(50));
        let a_ended = a.as_mut().and_then(Side::poll);
        if let Some(s) = a_ended {
            break passed_on(s);
        }
        if let Some(sig) = sig {
            note!("{}: taking the testbed down", sig.name());
            break match a {
                Some(_) => Err(TestbedCommandEnded {
                    reason: format!("the command in A was stopped by {}", sig.name()),
                    code: sig.code(),
                }
                .into()),
                None => Ok(()),
            };
        }
        if started.elapsed() >= limit {
            break match a {
                Some(_) => Err(TestbedCommandEnded {
                    reason: format!(
                        "the command in A was still running after {} s (--seconds); stopped",
                        args.seconds
                    ),
                    code: TIMED_OUT,
                }
                .into()),
                None => {
                    note!(
                        "{} s (--seconds) are up: taking the testbed down",
                        args.seconds
                    );
                    Ok(())
                }
            };
        }
    };
    // Commands first (they may hold sockets in the namespaces), then the testbed.
    drop(a);
    drop(b);
    let device = tb.device_drops();
    let dirs = [("A->B", &tb.stats[0]), ("B->A", &tb.stats[1])];
    let line: Vec<String> = dirs
        .iter()
        .zip(device)
        .map(|((dir, s), device)| {
            let packets = s.packets.load(Ordering::Relaxed);
            let dropped = s.dropped.load(Ordering::Relaxed);
            let pct = if packets > 0 {
                dropped as f64 * 100.0 / packets as f64
            } else {
                0.0
            };
            let overflowed = match s.overflowed.load(Ordering::Relaxed) {
                0 => String::new(),
                n => format!(", {n} more dropped with the emulator's queue full"),
            };
            let overflowed = match s.unsent.load(Ordering::Relaxed) {
                0 => overflowed,
                n => format!("{overflowed}, {n} not written to the far side"),
            };
            // Before the emulator: the sending side's TUN device, its queue full.
            let overflowed = match device {
                Some(0) | None => overflowed,
                Some(n) => format!("{overflowed}, {n} dropped by the sending device"),
            };
            format!(
                "{dir} {packets} packets, {dropped} dropped ({pct:.2} %){overflowed}, {:.1} MB \
                 delivered",
                s.bytes.load(Ordering::Relaxed) as f64 / 1e6
            )
        })
        .collect();
    note!("link: {}", line.join("; "));
    tb.down();
    note!("testbed down");
    outcome
}
