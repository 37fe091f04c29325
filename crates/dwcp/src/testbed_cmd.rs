//! `dwcp testbed`: the WAN testbed as a tool. Builds the two namespaces and the link emulator
//! for a profile, runs a command on either side (or holds the testbed up for the user's own),
//! and tears everything down, whatever ends it: the command, ctrl-c, SIGTERM or the time
//! limit.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dwcp_testbed::Testbed;
use rustix::process::{Pid, Signal, kill_process_group};

use crate::cli::TestbedArgs;

/// How `dwcp testbed` ended when it was not a success: the exit code it passes on.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub(crate) struct TestbedCommandEnded {
    pub(crate) reason: String,
    pub(crate) code: u8,
}

/// `timeout(1)`'s code for a command stopped at its time limit.
const TIMED_OUT: u8 = 124;
/// The shell's code for a command ended by SIGINT.
const INTERRUPTED: u8 = 130;

/// A command in one namespace, in a process group of its own so that everything it started
/// goes with it. Stopped (SIGTERM to the group, SIGKILL two seconds later) on drop.
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
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the command in {name}"))?;
        Ok(Self {
            name,
            child,
            status: None,
        })
    }

    /// Its exit status, once it has ended.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
        }
        self.status
    }

    fn stop(&mut self) {
        if self.poll().is_some() {
            return;
        }
        let group = Pid::from_raw(self.child.id() as i32);
        if let Some(g) = group {
            let _ = kill_process_group(g, Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.poll().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(g) = group {
            // The group may outlive its leader; SIGKILL whatever is left of it.
            let _ = kill_process_group(g, Signal::KILL);
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
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

/// Runs `dwcp testbed`.
pub(crate) fn run(args: &TestbedArgs) -> Result<()> {
    let profile = crate::bench::testbed_profile(&args.profile, "testbed")?;
    let limit = Duration::from_secs(args.seconds);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal handler")?;
    let (mut term, mut int) =
        crate::bench::stop_signals(&rt).context("cannot watch for SIGTERM and SIGINT")?;
    let tb = Testbed::up(profile, args.seed).context("cannot build the testbed")?;
    eprintln!("testbed up: {}", tb.profile);
    for (side, addr, ns) in [("A", tb.addr_a, &tb.ns_a), ("B", tb.addr_b, &tb.ns_b)] {
        eprintln!(
            "  {side}: {addr} in namespace {ns}   (a shell there: sudo ip netns exec {ns} bash)"
        );
    }
    eprintln!("  commands get DWCP_TB_ADDR_A, DWCP_TB_ADDR_B, DWCP_TB_NS_A and DWCP_TB_NS_B");

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
        eprintln!(
            "held up for at most {} s: ctrl-c or SIGTERM takes it down",
            args.seconds
        );
    }

    let started = Instant::now();
    let outcome: Result<()> = loop {
        let signalled = rt.block_on(async {
            tokio::select! {
                _ = term.recv() => Some("SIGTERM"),
                _ = int.recv() => Some("SIGINT"),
                () = tokio::time::sleep(Duration::from_millis(50)) => None,
            }
        });
        if let Some(sig) = signalled {
            eprintln!("{sig}: taking the testbed down");
            break match a.as_mut().map(Side::poll) {
                Some(None) => Err(TestbedCommandEnded {
                    reason: format!("the command in A was stopped by {sig}"),
                    code: INTERRUPTED,
                }
                .into()),
                _ => Ok(()),
            };
        }
        if let Some(side) = b.as_mut()
            && side.status.is_none()
            && let Some(s) = side.poll()
        {
            eprintln!("the command in {} {}", side.name, describe(s));
        }
        if let Some(side) = a.as_mut()
            && let Some(s) = side.poll()
        {
            break match s.code() {
                Some(0) => Ok(()),
                code => Err(TestbedCommandEnded {
                    reason: format!("the command in A {}", describe(s)),
                    // As a shell passes it on: the status, or 128 + the signal.
                    code: code
                        .or_else(|| s.signal().map(|n| 128 + n))
                        .and_then(|c| u8::try_from(c).ok())
                        .unwrap_or(1),
                }
                .into()),
            };
        }
        if started.elapsed() >= limit {
            break match a.as_mut().map(Side::poll) {
                Some(None) => Err(TestbedCommandEnded {
                    reason: format!(
                        "the command in A was still running after {} s (--seconds); stopped",
                        args.seconds
                    ),
                    code: TIMED_OUT,
                }
                .into()),
                _ => {
                    eprintln!(
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
    let dirs = [("A->B", &tb.stats[0]), ("B->A", &tb.stats[1])];
    let line: Vec<String> = dirs
        .iter()
        .map(|(dir, s)| {
            let packets = s.packets.load(Ordering::Relaxed);
            let dropped = s.dropped.load(Ordering::Relaxed);
            let pct = if packets > 0 {
                dropped as f64 * 100.0 / packets as f64
            } else {
                0.0
            };
            format!(
                "{dir} {packets} packets, {dropped} dropped ({pct:.2} %), {:.1} MB delivered",
                s.bytes.load(Ordering::Relaxed) as f64 / 1e6
            )
        })
        .collect();
    eprintln!("link: {}", line.join("; "));
    tb.down();
    eprintln!("testbed down");
    outcome
}
