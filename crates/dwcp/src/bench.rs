//! `dwcp bench transport`: iperf3 and `dwcp send` on the same emulated link, in one run.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dwcp_testbed::{Profile, Testbed};
use serde_json::{Value, json};

use crate::cli::{BenchMigrationArgs, BenchTransportArgs};
use crate::commands::UsageError;

/// One measured row.
struct Row {
    tool: &'static str,
    label: String,
    congestion: &'static str,
    streams: u32,
    mbit_s: f64,
    /// Segments TCP retransmitted, as the sender's kernel counted them (`None` on QUIC).
    retransmits: Option<u64>,
    detail: Value,
}

/// Set by SIGINT/SIGTERM: runs stop, and the testbed is torn down on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM came (after [`watch_signals`]).
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn watch_signals() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut stop = rt.block_on(async { crate::commands::StopSignals::new() })?;
    std::thread::spawn(move || {
        rt.block_on(stop.next());
        INTERRUPTED.store(true, Ordering::SeqCst);
    });
    Ok(())
}

/// A child process that is killed if it is still running when this goes out of scope, so
/// that no error path leaves a server behind in a namespace.
pub(crate) struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `cmd` with its output going to files (never to pipes that could fill up and stall
/// it); returns the process and the two file paths.
pub(crate) fn spawn_logged(
    mut cmd: std::process::Command,
    dir: &Path,
    name: &str,
) -> Result<(Reaped, PathBuf, PathBuf)> {
    let out = dir.join(format!("{name}.out"));
    let err = dir.join(format!("{name}.err"));
    let child = cmd
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok((Reaped(child), out, err))
}

/// Waits for `child` at most `limit`, killing it after that (or on interruption).
pub(crate) fn wait_bounded(
    child: &mut Reaped,
    limit: Duration,
    what: &str,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        // Before the child's status: the same Ctrl-C may have ended the child, which must
        // not pass for its result.
        if interrupted() {
            bail!("interrupted");
        }
        if let Some(status) = child.0.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A developer's switch: `DWCP_BENCH_KEEP_LOGS=DIR` keeps each `dwcp migrate` log there as
/// `name` (unset or empty: off).
pub(crate) fn keep_log(log: &Path, name: &str) {
    if let Ok(keep) = std::env::var("DWCP_BENCH_KEEP_LOGS")
        && !keep.is_empty()
    {
        let to = Path::new(&keep).join(name);
        if let Err(e) = std::fs::create_dir_all(&keep).and_then(|()| std::fs::copy(log, &to)) {
            eprintln!("DWCP_BENCH_KEEP_LOGS: cannot keep {}: {e}", to.display());
        }
    }
}

/// Average RTT of 20 `ping -U` probes A -> B (user-to-user time, which includes the
/// emulator's delay stage; see TESTBED.md).
fn ping_rtt_ms(tb: &Testbed, work: &Path) -> Result<f64> {
    let mut cmd = tb.cmd_a("ping");
    // Replies may take up to a round trip (2 s at most) after the last probe.
    let wait = 2 + tb.profile.rtt().as_secs_f64().ceil() as u64 * 2;
    cmd.args([
        "-U",
        "-q",
        "-n",
        "-i",
        "0.05",
        "-W",
        &wait.to_string(),
        "-c",
        "20",
    ])
    .arg(tb.addr_b.to_string());
    let (mut child, out, err) = spawn_logged(cmd, work, "ping")
        .context("cannot run ping (apt-get install iputils-ping)")?;
    wait_bounded(&mut child, Duration::from_secs(30), "ping")?;
    let text = std::fs::read_to_string(out)? + &std::fs::read_to_string(err)?;
    text.lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "no RTT in ping output (is iputils-ping installed?): {}",
                text.trim()
            )
        })
}

/// iperf3's goodput (Mbit/s) and the segments its sender retransmitted.
fn iperf3(
    tb: &Testbed,
    work: &Path,
    streams: u32,
    congestion: &str,
    seconds: u32,
) -> Result<(f64, Option<u64>)> {
    let port = "5201";
    let mut server = tb.cmd_b("iperf3");
    server
        .args(["-s", "-1", "-p", port, "-B"])
        .arg(tb.addr_b.to_string());
    let (mut server, _, _) = spawn_logged(server, work, "iperf3-server")
        .context("cannot start iperf3 (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut client = tb.cmd_a("iperf3");
    client
        .args(["-c"])
        .arg(tb.addr_b.to_string())
        .args([
            "-p",
            port,
            "-J",
            "-C",
            congestion,
            "-t",
            &seconds.to_string(),
        ])
        .args(["-P", &streams.to_string()]);
    let (mut client, out, err) = spawn_logged(client, work, "iperf3-client")?;
    wait_bounded(
        &mut client,
        Duration::from_secs(u64::from(seconds) + 30),
        "iperf3",
    )?;
    let _ = wait_bounded(&mut server, Duration::from_secs(5), "iperf3 server");
    let j: Value = serde_json::from_slice(&std::fs::read(&out)?).with_context(|| {
        format!(
            "iperf3 output is not JSON: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    })?;
    if let Some(e) = j.get("error") {
        bail!("iperf3: {e}");
    }
    let mbit = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .ok_or_else(|| anyhow!("iperf3 JSON lacks end.sum_received.bits_per_second"))?;
    Ok((mbit, j["end"]["sum_sent"]["retransmits"].as_u64()))
}

#[allow(clippy::too_many_arguments)]
fn dwcp_send(
    tb: &Testbed,
    work: &Path,
    exe: &Path,
    certs: &Path,
    file: &Path,
    out: &Path,
    streams: &str,
    congestion: &str,
    carrier: &str,
    size: u64,
) -> Result<Value> {
    let exe = exe
        .to_str()
        .ok_or_else(|| anyhow!("binary path is not UTF-8"))?;
    let listen = format!("{}:7800", tb.addr_b);
    let mut recv = tb.cmd_b(exe);
    recv.args([
        "recv",
        "--listen",
        &listen,
        "--node-id",
        "bench-b",
        "--json",
        "--out",
    ])
    .arg(out)
    .arg("--certs-dir")
    .arg(certs)
    .env("DWCP_TRANSPORT__CONGESTION", congestion)
    .env("DWCP_TRANSPORT__QUIC", "true");
    let (mut recv, _, _) = spawn_logged(recv, work, "dwcp-recv")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut send = tb.cmd_a(exe);
    send.arg("send")
        .arg(file)
        .args(["--to", &listen, "--node-id", "bench-a", "--json"])
        // The transport alone: random data gains nothing from delta encoding anyway.
        .arg("--no-delta")
        .args(["--streams", streams])
        .args(["--transport", carrier])
        .arg("--certs-dir")
        .arg(certs)
        .env("DWCP_TRANSPORT__CONGESTION", congestion);
    let (mut send, sout, serr) = spawn_logged(send, work, "dwcp-send")?;
    // Even at 1 Mbit/s the transfer would be done in size*8/1e6 s; give it that plus slack.
    let limit = Duration::from_secs(60 + size * 8 / 1_000_000);
    let status = wait_bounded(&mut send, limit, "dwcp send")?;
    let _ = wait_bounded(&mut recv, Duration::from_secs(10), "dwcp recv");
    let _ = std::fs::remove_dir_all(out);
    if !status.success() {
        bail!(
            "dwcp send failed: {}",
            std::fs::read_to_string(serr).unwrap_or_default().trim()
        );
    }
    serde_json::from_slice(&std::fs::read(sout)?).context("dwcp send --json output")
}

/// `s` in bytes, for the flag `flag`; 0 only with `zero_ok`.
fn parse_size(flag: &str, s: &str, zero_ok: bool) -> Result<u64> {
    crate::cli::parse_size(s, zero_ok).map_err(|e| UsageError(format!("{flag}: {e}")).into())
}

/// The profile `spec` names or describes ([`Profile::parse`]), for a root user (the testbed
/// builds network namespaces).
pub(crate) fn testbed_profile(spec: &str, bench: &str) -> Result<Profile> {
    let profile = Profile::parse(spec).map_err(|e| UsageError(format!("--profile: {e}")))?;
    if !dwcp_testbed::is_root() {
        return Err(UsageError(format!(
            "dwcp {bench} needs root (it builds a network-namespace testbed)"
        ))
        .into());
    }
    Ok(profile)
}

/// An agent in namespace B for `dwcp bench migration`.
pub(crate) struct AgentSpec<'a> {
    /// Names its spool, cache and QEMU directories under the work directory, and its logs.
    pub(crate) name: &'a str,
    /// Its node id (a certificate in the work directory's cluster).
    pub(crate) node_id: &'a str,
    pub(crate) listen: &'a str,
    pub(crate) admin: &'a str,
    pub(crate) congestion: &'a str,
    /// What its baseline cache is seeded with (`encoding.seed_paths`).
    pub(crate) seeds: Option<&'a Path>,
}

/// Starts an agent in namespace B and waits (bounded) until it answers a ping from A.
pub(crate) fn start_agent(
    tb: &Testbed,
    exe: &str,
    work: &Path,
    certs: &Path,
    spec: &AgentSpec<'_>,
) -> Result<Reaped> {
    let qemu_dir = crate::bench_qemu::qemu_dir(work, spec.name);
    std::fs::create_dir_all(&qemu_dir)?;
    let mut agent = tb.cmd_b(exe);
    agent
        .args(["agent", "--node-id", spec.node_id, "--listen", spec.listen])
        .args(["--admin-listen", spec.admin])
        .arg("--spool-dir")
        .arg(work.join(format!("{}-spool", spec.name)))
        .arg("--cache-dir")
        .arg(work.join(format!("{}-cache", spec.name)))
        .arg("--certs-dir")
        .arg(certs)
        .env("DWCP_TRANSPORT__CONGESTION", spec.congestion)
        .env("DWCP_MIGRATION__QEMU_DIR", &qemu_dir);
    if let Some(seeds) = spec.seeds {
        agent.env("DWCP_ENCODING__SEED_PATHS", seeds);
    }
    let (agent, _, agent_err) = spawn_logged(agent, work, spec.name)?;
    // Ready when it answers a ping from the other side (bounded; seeding comes first).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut p = tb.cmd_a(exe);
        p.args(["ping", spec.listen, "--node-id", "bench-a", "-n", "1"])
            .arg("--certs-dir")
            .arg(certs);
        let (mut child, _, _) = spawn_logged(p, work, &format!("ping-{}", spec.name))?;
        if wait_bounded(&mut child, Duration::from_secs(10), "dwcp ping")?.success() {
            return Ok(agent);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent {:?} in namespace B did not come up: {}",
                spec.name,
                std::fs::read_to_string(&agent_err)
                    .unwrap_or_default()
                    .trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A work directory with a throwaway cluster (nodes bench-a, bench-b), the testbed up, and
/// its round trip checked with ping.
fn testbed_up(profile: &Profile, seed: u64) -> Result<(tempfile::TempDir, PathBuf, Testbed, f64)> {
    let work = tempfile::tempdir()?;
    let certs = work.path().join("certs");
    dwcp_transport::pki::init_ca(&certs, &dwcp_wire::ClusterId::new("dwcp")?, 1, false)?;
    for n in ["bench-a", "bench-b"] {
        dwcp_transport::pki::issue_node(&certs, &dwcp_wire::NodeId::new(n)?, 1, false)?;
    }
    eprintln!("building testbed: {profile}");
    // Ctrl-C is watched by now (`watch_signals`): it must also end a wait for another
    // testbed of this machine.
    let tb = Testbed::up_unless(profile.clone(), seed, &INTERRUPTED)?;
    let rtt = ping_rtt_ms(&tb, work.path())?;
    eprintln!(
        "emulator check: ping -U RTT {rtt:.2} ms (profile {:.1} ms)",
        profile.rtt().as_secs_f64() * 1e3
    );
    Ok((work, certs, tb, rtt))
}

pub(crate) fn transport(args: &BenchTransportArgs) -> Result<()> {
    let profile = testbed_profile(&args.profile, "bench transport")?;
    let size = parse_size("--size", &args.size, false)?;
    // An absolute path: the namespaces' `ip netns exec` would look a bare name up in PATH.
    let baseline = match &args.baseline {
        Some(b) if b.is_file() => Some(
            std::fs::canonicalize(b)
                .map_err(|e| UsageError(format!("--baseline: {}: {e}", b.display())))?,
        ),
        Some(b) => {
            return Err(UsageError(format!("--baseline: {} is not a file", b.display())).into());
        }
        None => None,
    };
    watch_signals()?;
    let exe = std::env::current_exe().context("cannot find the dwcp binary")?;
    let (work, certs, tb, rtt) = testbed_up(&profile, args.seed)?;
    let mut rows = Vec::new();
    let secs = args.seconds;
    for (streams, cc) in [(1, "cubic"), (1, "bbr"), (8, "cubic"), (8, "bbr")] {
        eprintln!("iperf3 {streams} stream(s), {cc} ...");
        let (mbit, retransmits) = iperf3(&tb, work.path(), streams, cc, secs)?;
        rows.push(Row {
            tool: "iperf3",
            label: format!("iperf3 -P {streams}"),
            congestion: cc,
            streams,
            mbit_s: mbit,
            retransmits,
            detail: json!({}),
        });
    }
    let fixed = args.streams.to_string();
    // The congestion column is the kernel's (TCP). QUIC runs quinn's BBR in user space
    // (transport.quic_congestion) whatever the kernel offers, so its rows run on a "CUBIC
    // host", where the choice between the carriers matters.
    for (streams, streams_arg, cc, carrier, label) in [
        (1, "1", "bbr", "tcp", "dwcp send --streams 1"),
        (
            args.streams,
            fixed.as_str(),
            "bbr",
            "tcp",
            "dwcp send --streams N",
        ),
        (8, "auto", "bbr", "tcp", "dwcp send tcp"),
        (8, "auto", "cubic", "tcp", "dwcp send tcp"),
        (8, "auto", "cubic", "quic", "dwcp send quic"),
        (8, "auto", "cubic", "auto", "dwcp send (default)"),
    ] {
        let row_kind = if streams_arg == "auto" {
            carrier
        } else {
            "tcp"
        };
        if !args.carriers.iter().any(|c| c == row_kind) {
            continue;
        }
        // The fixed-N row only when asked for (--streams).
        if streams_arg == fixed && args.streams == 0 {
            continue;
        }
        // Bound each transfer to about twice the iperf3 duration at the rate iperf3 reached
        // with the same congestion control and stream count: a CUBIC run over a lossy link
        // would otherwise take many minutes for the same payload.
        // QUIC's BBR is in user space: bound its rows like BBR's.
        let like_cc = if carrier == "tcp" { cc } else { "bbr" };
        // iperf3 ran 1 and 8 streams: a count between takes the 8 streams' rate.
        let like_streams = if streams <= 1 { 1 } else { 8 };
        let like = rows
            .iter()
            .filter(|r| r.congestion == like_cc && r.streams == like_streams)
            .map(|r| r.mbit_s)
            .fold(0.0_f64, f64::max);
        let cap = (like * 1e6 / 8.0 * f64::from(secs) * 2.0) as u64;
        let run_size = size.min(cap.max(4 << 20));
        let file = work.path().join(format!("payload-{run_size}.bin"));
        if !file.exists() {
            write_random(&file, run_size)?;
        }
        // The two builds take turns going first, round by round, so that neither always runs
        // right after the other (an even --rounds evens it out).
        let builds: Vec<(&Path, bool)> = baseline
            .as_deref()
            .map(|b| (b, true))
            .into_iter()
            .chain([(exe.as_path(), false)])
            .collect();
        for round in 1..=args.rounds {
            let order: Vec<(&Path, bool)> = if round % 2 == 0 {
                builds.iter().rev().copied().collect()
            } else {
                builds.clone()
            };
            for &(bin, is_baseline) in &order {
                let which = if is_baseline { " [baseline]" } else { "" };
                eprintln!(
                    "{label}{which}: {streams_arg} stream(s), {cc}, {carrier}, {run_size} bytes, \
                     round {round}/{} ...",
                    args.rounds
                );
                let out = work.path().join("out");
                let j = dwcp_send(
                    &tb,
                    work.path(),
                    bin,
                    &certs,
                    &file,
                    &out,
                    streams_arg,
                    cc,
                    carrier,
                    run_size,
                )?;
                // A run that measured nothing must not count as a slow one.
                let mbit = j["goodput_mbit_s"].as_f64().ok_or_else(|| {
                    anyhow!("{label}{which}: no goodput_mbit_s in dwcp send's report: {j}")
                })?;
                // (After a reconnection within the run a resumed file is expected.)
                if j["reconnects"].as_u64() == Some(0)
                    && j["files"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|f| f["resumed_from"].as_u64() != Some(0)))
                {
                    bail!("{label}{which}: the receiver held part of the payload already: {j}");
                }
                let used = j["transport"].as_str().unwrap_or("?");
                rows.push(Row {
                    tool: if is_baseline { "dwcp-baseline" } else { "dwcp" },
                    label: if carrier == "auto" {
                        format!("{label} -> {used}{which}")
                    } else {
                        format!("{label}{which}")
                    },
                    congestion: cc,
                    streams: j["streams"].as_u64().unwrap_or(0) as u32,
                    mbit_s: mbit,
                    retransmits: j["retransmits"].as_u64(),
                    detail: j,
                });
            }
        }
    }
    let stats: Vec<Value> = tb
        .stats
        .iter()
        .map(|s| {
            json!({
                "packets": s.packets.load(Ordering::Relaxed),
                "dropped": s.dropped.load(Ordering::Relaxed),
            })
        })
        .collect();
    tb.down();

    let base = rows
        .iter()
        .find(|r| r.tool == "iperf3" && r.streams == 1 && r.congestion == "cubic")
        .map_or(1.0, |r| r.mbit_s.max(1e-9));
    let link = profile.rate_bps.map(|r| r as f64 / 1e6);
    outln!("emulator check: ping -U average RTT {rtt:.2} ms");
    outln!(
        "profile {profile}; dwcp payload up to {size} bytes (see JSON for each run); iperf3 \
         runs {secs} s"
    );
    outln!(
        "{:<26} {:>6} {:>7} {:>10} {:>9} {:>10} {:>8}",
        "run",
        "cc",
        "streams",
        "Mbit/s",
        "% link",
        "x iperf3-1",
        "retrans"
    );
    for r in &rows {
        let pct = link.map_or_else(
            || "-".to_string(),
            |l| format!("{:.1}", r.mbit_s / l * 100.0),
        );
        let retrans = r
            .retransmits
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        outln!(
            "{:<26} {:>6} {:>7} {:>10.1} {:>9} {:>10.2} {:>8}",
            r.label,
            r.congestion,
            r.streams,
            r.mbit_s,
            pct,
            r.mbit_s / base,
            retrans
        );
    }
    let compared = compare_to_baseline(&rows);
    for (label, this, baseline) in &compared {
        outln!(
            "{label}: this build {this:.1} Mbit/s, baseline {baseline:.1} (mean of each): {:.3}x",
            this / baseline.max(1e-9)
        );
    }
    let report = json!({
        "baseline": args.baseline.as_ref().map(|b| b.display().to_string()),
        "rounds": args.rounds,
        "compared": compared.iter().map(|(label, this, baseline)| json!({
            "run": label, "mbit_s": this, "baseline_mbit_s": baseline,
            "ratio": this / baseline.max(1e-9),
        })).collect::<Vec<_>>(),
        "profile": {
            "name": profile.name, "rtt_ms": profile.rtt().as_secs_f64() * 1e3,
            "loss": profile.loss, "rate_mbit_s": link,
        },
        "size": size,
        "iperf3_seconds": secs,
        "ping_rtt_ms": rtt,
        "seed": args.seed,
        "emulator": stats,
        "runs": rows.iter().map(|r| json!({
            "tool": r.tool, "label": r.label, "congestion": r.congestion, "streams": r.streams,
            "mbit_s": r.mbit_s, "ratio_to_iperf3_single_cubic": r.mbit_s / base,
            "retransmits": r.retransmits,
            "percent_of_link": link.map(|l| r.mbit_s / l * 100.0), "detail": r.detail,
        })).collect::<Vec<_>>(),
    });
    let path: PathBuf = args
        .json_out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench-transport-{}.json", profile.file_name())));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    outln!("JSON: {}", path.display());
    Ok(())
}

/// For each dwcp row run by both builds: ("label, cc", mean Mbit/s of this build, of the
/// baseline).
fn compare_to_baseline(rows: &[Row]) -> Vec<(String, f64, f64)> {
    const MARK: &str = " [baseline]";
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let pick = |tool: &str, label: &str, cc: &str| -> Vec<f64> {
        rows.iter()
            .filter(|x| x.tool == tool && x.label == label && x.congestion == cc)
            .map(|x| x.mbit_s)
            .collect()
    };
    let mut out: Vec<(String, f64, f64)> = Vec::new();
    for r in rows.iter().filter(|r| r.tool == "dwcp-baseline") {
        let label = r.label.trim_end_matches(MARK);
        let key = format!("{label}, {}", r.congestion);
        if out.iter().any(|(k, _, _)| *k == key) {
            continue;
        }
        let this = pick("dwcp", label, r.congestion);
        if !this.is_empty() {
            let base = mean(&pick("dwcp-baseline", &r.label, r.congestion));
            out.push((key, mean(&this), base));
        }
    }
    out
}

/// Incompressible data (xorshift), so that later compression cannot flatter the transport.
fn write_random(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = size;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// `dwcp bench migration`: the memory-image engine over the testbed.
pub(crate) fn migration(args: &BenchMigrationArgs) -> Result<()> {
    if args.destinations > args.concurrent {
        return Err(UsageError(format!(
            "--destinations {} is more than --concurrent {}: each destination needs a migration",
            args.destinations, args.concurrent
        ))
        .into());
    }
    let profile = testbed_profile(&args.profile, "bench migration")?;
    let mut cases = Vec::new();
    for c in args
        .cases
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        let (size, rate) = c
            .split_once('@')
            .ok_or_else(|| UsageError(format!("--cases: {c:?} is not SIZE@DIRTY-RATE")))?;
        parse_size("--cases", size, false)?;
        crate::cli::parse_rate(rate).map_err(|e| UsageError(format!("--cases: {e}")))?;
        cases.push((size.to_string(), rate.to_string()));
    }
    let qemu_mem_bytes = parse_size("--qemu-mem", &args.qemu_mem, true)?;
    let qemu_mem = qemu_mem_bytes >> 20;
    if qemu_mem_bytes != 0 && qemu_mem < 256 {
        return Err(UsageError(format!(
            "--qemu-mem: {:?} is below the guest's least, 256Mi (0 skips the QEMU rows)",
            args.qemu_mem
        ))
        .into());
    }
    let qemu_cases = crate::bench_qemu::parse_cases(&args.qemu_cases)
        .map_err(|e| UsageError(format!("--qemu-cases: {e}")))?;
    if cases.is_empty() && (qemu_mem == 0 || qemu_cases.is_empty()) {
        return Err(UsageError(
            "--cases: no case given (and no QEMU case: --qemu-mem 0 or --qemu-cases \"\")".into(),
        )
        .into());
    }
    watch_signals()?;
    let exe = std::env::current_exe().context("cannot find the dwcp binary")?;
    let exe = exe
        .to_str()
        .ok_or_else(|| anyhow!("binary path is not UTF-8"))?
        .to_string();
    let (work, certs, tb, rtt) = testbed_up(&profile, args.seed)?;
    let listen = format!("{}:7900", tb.addr_b);
    // The first destination is the agent the QEMU rows use too when no memory-image case
    // runs (else they get one of their own); the others are nodes of their own (ports 7920
    // and up: 7902-7913 are the QEMU rows' agents).
    // (node, listen, name, admin)
    let mut dests = vec![(
        "bench-b".to_string(),
        listen.clone(),
        "agent".to_string(),
        "127.0.0.1:7901".to_string(),
    )];
    for d in 2..=args.destinations {
        let node = format!("bench-b{d}");
        dwcp_transport::pki::issue_node(&certs, &dwcp_wire::NodeId::new(&node)?, 1, false)?;
        // (Below 7920: the QEMU rows' own agents.)
        let port = 7920 + 2 * (d - 2);
        dests.push((
            node,
            format!("{}:{port}", tb.addr_b),
            format!("agent-{d}"),
            format!("127.0.0.1:{}", port + 1),
        ));
    }
    let mut _agents = Vec::new();
    for (node, addr, name, admin) in &dests {
        _agents.push(start_agent(
            &tb,
            &exe,
            work.path(),
            &certs,
            &AgentSpec {
                name,
                node_id: node,
                listen: addr,
                admin,
                congestion: &args.congestion,
                seeds: None,
            },
        )?);
    }
    let link = profile.rate_bps.map(|r| format!("{}", r / 8));
    let mut runs = Vec::new();
    let n = args.concurrent;
    for (i, (size, rate)) in cases.iter().enumerate() {
        if n == 1 {
            eprintln!("migrating a {size} VM writing {rate}B/s ...");
        } else {
            eprintln!(
                "migrating {n} VMs of {size} at once to {} destination(s), each writing {rate}B/s ...",
                dests.len()
            );
        }
        let mut children = Vec::new();
        for k in 0..n {
            let (node, addr, _, _) = &dests[k as usize % dests.len()];
            let mut m = tb.cmd_a(&exe);
            m.args([
                "migrate",
                "--to",
                addr,
                "--node-id",
                "bench-a",
                "--expect-node",
                node,
                "--json",
            ])
            // Each VM its own contents: none finds another's pages at the destination.
            .args([
                "--vm-size",
                size,
                "--dirty-rate",
                rate,
                "--seed",
                &args.seed.wrapping_add(u64::from(k)).to_string(),
            ])
            .args(["--name", &format!("vm-{i}-{k}.mem")])
            .arg("--certs-dir")
            .arg(&certs)
            .env("DWCP_TRANSPORT__CONGESTION", &args.congestion);
            if let Some(l) = &link {
                m.args(["--link-rate", l]);
            }
            children.push(spawn_logged(m, work.path(), &format!("migrate-{i}-{k}"))?);
        }
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        // Every one waited for (and its log kept) before a failure ends the bench: the logs
        // of the others are what tells why.
        let mut waited = Vec::new();
        for (k, (mut child, out, err)) in children.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = wait_bounded(&mut child, left, "dwcp migrate");
            keep_log(&err, &format!("migrate-{i}-{k}.log"));
            waited.push((status, out, err));
        }
        if waited.iter().any(|(s, _, _)| s.is_err()) {
            for (_, _, name, _) in &dests {
                keep_log(
                    &work.path().join(format!("{name}.err")),
                    &format!("{name}.log"),
                );
            }
        }
        let mut group = Vec::new();
        for (k, (status, out, err)) in waited.into_iter().enumerate() {
            let status = status?;
            let report: Value = serde_json::from_slice(&std::fs::read(&out)?).unwrap_or_else(|_| {
                json!({"result": "failed", "how": std::fs::read_to_string(&err).unwrap_or_default().trim().to_string()})
            });
            let destination = &dests[k % dests.len()].0;
            group.push(json!({"vm_size": size, "dirty_rate": rate, "at_once": n, "index": k, "destination": destination, "exit": status.code(), "report": report}));
        }
        runs.extend(group);
    }
    if interrupted() {
        bail!("interrupted: no results written");
    }
    let qemu_rows = if qemu_mem == 0 || qemu_cases.is_empty() {
        None
    } else if let Some(why) = crate::bench_qemu::unavailable() {
        eprintln!("QEMU rows skipped: {why}");
        Some(Err(why))
    } else {
        // The cold row needs a destination whose cache is empty: after memory-image cases
        // (whose images hold this machine's libraries, as the guest does), an agent of its
        // own.
        // (Ports 7912/7913: the QEMU rows' other agents take 7902-7911.)
        let fresh = if cases.is_empty() {
            Ok(("agent", listen, None))
        } else {
            let l = format!("{}:7912", tb.addr_b);
            start_agent(
                &tb,
                &exe,
                work.path(),
                &certs,
                &AgentSpec {
                    name: "agent-qemu",
                    node_id: "bench-b",
                    listen: &l,
                    admin: "127.0.0.1:7913",
                    congestion: &args.congestion,
                    seeds: None,
                },
            )
            .map(|a| ("agent-qemu", l, Some(a)))
        };
        match fresh {
            Err(e) => Some(Err(format!("the QEMU rows' agent did not start: {e:#}"))),
            Ok((qemu_agent, qemu_listen, _fresh)) => {
                let qb = crate::bench_qemu::QemuBench {
                    tb: &tb,
                    work: work.path(),
                    exe: &exe,
                    certs: &certs,
                    agent: qemu_agent,
                    listen: &qemu_listen,
                    congestion: &args.congestion,
                    mem_mib: qemu_mem,
                    dirty_pages: args.qemu_dirty_pages,
                    numa_nodes: args.qemu_numa_nodes,
                    dest_prealloc: args.qemu_dest_prealloc,
                    codec: args.qemu_codec,
                    native_timeout: Duration::from_secs(args.qemu_native_timeout_secs),
                    cases: qemu_cases,
                };
                let rows = qb.run().map_err(|e| format!("{e:#}"));
                keep_log(
                    &work.path().join(format!("{qemu_agent}.err")),
                    &format!("{qemu_agent}.log"),
                );
                Some(rows)
            }
        }
    };
    if interrupted() {
        bail!("interrupted: no results written");
    }
    for (_, _, name, _) in &dests {
        keep_log(
            &work.path().join(format!("{name}.err")),
            &format!("{name}.log"),
        );
    }
    tb.down();
    outln!("emulator check: ping -U average RTT {rtt:.2} ms");
    outln!("profile {profile}; congestion {}", args.congestion);
    match &qemu_rows {
        Some(Ok(rows)) => crate::bench_qemu::print_rows(rows, qemu_mem),
        Some(Err(why)) => outln!("QEMU rows: not run: {why}"),
        None => {}
    }
    outln!("memory-image VMs:");
    // "1Gi#2>bench-b2" names each of several at once and where it went.
    let label = |r: &Value| {
        let size = r["vm_size"].as_str().unwrap_or("");
        let k = r["index"].as_u64().unwrap_or(0) + 1;
        match (n > 1, dests.len() > 1) {
            (true, true) => format!("{size}#{k}>{}", r["destination"].as_str().unwrap_or("")),
            (true, false) => format!("{size}#{k}"),
            _ => size.to_string(),
        }
    };
    let w = runs
        .iter()
        .map(|r| label(r).len())
        .max()
        .unwrap_or(0)
        .max(8);
    outln!(
        "{:<w$} {:>10} {:>12} {:>9} {:>11} {:>9} {:>11} {:>7} {:>10} {:>9} {:>10}",
        "vm",
        "dirty B/s",
        "result",
        "total s",
        "paused ms",
        "heard ms",
        "predicted",
        "rounds",
        "wire MB",
        "throttle",
        "bit-exact"
    );
    for (i, r) in runs.iter().enumerate() {
        let rep = &r["report"];
        let throttle = rep["rounds"].as_array().map_or(0, |a| {
            a.iter()
                .filter_map(|x| x["throttle"].as_u64())
                .max()
                .unwrap_or(0)
        });
        // An unknown figure is "-", not a 0 that reads as measured.
        let ms = |k: &str| {
            rep[k]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{v:.0}"))
        };
        outln!(
            "{:<w$} {:>10} {:>12} {:>9.1} {:>11} {:>9} {:>11} {:>7} {:>10.1} {:>8}% {:>10}",
            label(r),
            r["dirty_rate"].as_str().unwrap_or(""),
            rep["result"].as_str().unwrap_or("?"),
            rep["total_seconds"].as_f64().unwrap_or(0.0),
            ms("downtime_ms"),
            // Until the source heard of the commit: what `predicted` and the bound are on.
            ms("downtime_observed_ms"),
            ms("predicted_downtime_ms"),
            rep["rounds"].as_array().map_or(0, Vec::len),
            rep["wire_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            throttle,
            rep["bit_exact"]
                .as_bool()
                .map_or("-", |b| if b { "yes" } else { "NO" }),
        );
        if rep["result"] != "migrated" {
            outln!("         why: {}", rep["how"].as_str().unwrap_or(""));
        }
        // After the last of a group run at once: how they shared the link.
        if n > 1 && r["index"].as_u64() == Some(u64::from(n) - 1) {
            let group = &runs[i + 1 - n as usize..=i];
            if let Some(s) = sharing(group, profile.rate_bps) {
                outln!("         {n} at once: {s}");
            }
        }
    }
    let path = args
        .json_out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench-migration-{}.json", profile.file_name())));
    let report = json!({
        "profile": profile.name, "ping_rtt_ms": rtt, "congestion": args.congestion, "seed": args.seed,
        "runs": runs, "at_once": n, "destinations": dests.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        "qemu": match &qemu_rows {
            Some(Ok(rows)) => json!({"mem_mib": qemu_mem, "dirty_pages_per_s": args.qemu_dirty_pages, "numa_nodes": args.qemu_numa_nodes, "dest_prealloc": args.qemu_dest_prealloc, "cases": rows}),
            Some(Err(why)) => json!({"not_run": why}),
            None => Value::Null,
        },
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    outln!("JSON: {}", path.display());
    Ok(())
}

/// Migrations run at once (`runs`, as the bench records them): their wire rates (wire bytes
/// over each one's total time), Jain's fairness index over those, and their sum against the
/// link rate (bits/s). `None` unless every one migrated.
fn share_of(runs: &[Value]) -> Option<(Vec<f64>, f64)> {
    let rates = runs
        .iter()
        .map(|r| {
            let rep = &r["report"];
            let secs = rep["total_seconds"].as_f64()?;
            (rep["result"] == "migrated" && secs > 0.0)
                .then(|| rep["wire_bytes"].as_f64().map(|b| b / secs))?
        })
        .collect::<Option<Vec<f64>>>()?;
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|x| x * x).sum();
    (squares > 0.0).then(|| {
        let jain = sum * sum / (rates.len() as f64 * squares);
        (rates, jain)
    })
}

/// One line on how migrations run at once shared the link.
fn sharing(runs: &[Value], link_bps: Option<u64>) -> Option<String> {
    let (rates, jain) = share_of(runs)?;
    let each: Vec<String> = rates.iter().map(|r| format!("{:.1}", r / 1e6)).collect();
    let sum: f64 = rates.iter().sum();
    let of_link = link_bps.map_or(String::new(), |l| {
        format!(" ({:.0} % of the link)", sum * 8.0 / l as f64 * 100.0)
    });
    Some(format!(
        "wire MB/s {} (Jain's fairness {jain:.3}), {:.1} together{of_link}",
        each.join(", "),
        sum / 1e6
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_at_once_are_scored_by_their_wire_rates() {
        use serde_json::json;
        let run = |wire: f64, secs: f64, result: &str| json!({"report": {"result": result, "wire_bytes": wire, "total_seconds": secs}});
        // Equal rates: index 1.
        let (rates, jain) =
            share_of(&[run(100e6, 10.0, "migrated"), run(50e6, 5.0, "migrated")]).unwrap();
        assert_eq!(rates, vec![10e6, 10e6]);
        assert!((jain - 1.0).abs() < 1e-12);
        // One takes everything: 1/n.
        let (_, jain) =
            share_of(&[run(100e6, 10.0, "migrated"), run(0.0, 10.0, "migrated")]).unwrap();
        assert!((jain - 0.5).abs() < 1e-12);
        // A failed one: not scored.
        assert!(share_of(&[run(100e6, 10.0, "migrated"), run(1e6, 1.0, "rolled back")]).is_none());
        let line = sharing(
            &[run(100e6, 10.0, "migrated"), run(75e6, 10.0, "migrated")],
            Some(200_000_000),
        )
        .unwrap();
        assert!(
            line.contains("10.0, 7.5") && line.contains("17.5 together (70 % of the link)"),
            "{line}"
        );
    }

    use super::*;

    fn row(tool: &'static str, label: &str, cc: &'static str, mbit_s: f64) -> Row {
        Row {
            tool,
            label: label.to_string(),
            congestion: cc,
            streams: 8,
            mbit_s,
            retransmits: None,
            detail: json!({}),
        }
    }

    #[test]
    fn baseline_rows_are_compared_per_label_and_congestion_control() {
        let rows = vec![
            row("iperf3", "iperf3 -P 1", "bbr", 150.0),
            row("dwcp-baseline", "dwcp send tcp [baseline]", "bbr", 150.0),
            row("dwcp", "dwcp send tcp", "bbr", 160.0),
            row("dwcp-baseline", "dwcp send tcp [baseline]", "bbr", 170.0),
            row("dwcp", "dwcp send tcp", "bbr", 170.0),
            row("dwcp-baseline", "dwcp send tcp [baseline]", "cubic", 30.0),
            row("dwcp", "dwcp send tcp", "cubic", 36.0),
            // Run by the baseline only: nothing to compare.
            row("dwcp-baseline", "dwcp send quic [baseline]", "cubic", 80.0),
        ];
        let c = compare_to_baseline(&rows);
        assert_eq!(
            c,
            vec![
                ("dwcp send tcp, bbr".to_string(), 165.0, 160.0),
                ("dwcp send tcp, cubic".to_string(), 36.0, 30.0),
            ]
        );
    }
}
