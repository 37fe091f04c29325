//! The `dwcp` binary as a user runs it: help, certificates, agent + ping, exit codes,
//! configuration checks, signals, demo.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn dwcp() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dwcp"));
    // The caller's DWCP_* settings must not leak into the tests.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DWCP_") {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    dwcp().args(args).output().unwrap()
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An agent process, killed on drop if still running.
struct AgentProc {
    child: Child,
    addr: String,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn readyz(admin: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

fn start_agent(certs: &Path, node: &str, env: &[(&str, &str)]) -> AgentProc {
    let addr = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = dwcp();
    cmd.args([
        "agent",
        "--node-id",
        node,
        "--listen",
        &addr,
        "--admin-listen",
        &admin,
    ])
    .arg("--certs-dir")
    .arg(certs)
    // Each agent its own spool and cache: tests run in parallel.
    .arg("--spool-dir")
    .arg(certs.join(format!("spool-{node}")))
    .arg("--cache-dir")
    .arg(certs.join(format!("cache-{node}")))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let mut agent = AgentProc { child, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !readyz(&admin) {
        if let Some(status) = agent.child.try_wait().unwrap() {
            panic!("agent exited early: {status}");
        }
        assert!(Instant::now() < deadline, "agent not ready within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

fn cluster(dir: &Path, nodes: &[&str]) {
    let d = dir.to_str().unwrap();
    assert!(run(&["certs", "init", "--dir", d]).status.success());
    for n in nodes {
        let o = run(&["certs", "issue", "--dir", d, "--node", n]);
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
}

#[test]
fn help_lists_the_commands() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let help = text(&o.stdout);
    // The subcommand list proper: lines of the "Commands:" section that start with a name.
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for cmd in ["agent", "ping", "certs", "config", "demo"] {
        assert!(commands.contains(&cmd), "--help lacks {cmd}: {commands:?}");
    }
    assert!(help.contains("Exit codes"), "{help}");
    let v = text(&run(&["--version"]).stdout);
    assert!(
        v.starts_with("dwcp ") && v.contains("v1, v3, v4, v5, v6"),
        "{v}"
    );
    let o = run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn certs_refuse_to_overwrite_and_reject_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(run(&["certs", "init", "--dir", d]).status.success());
    let o = run(&["certs", "init", "--dir", d]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        text(&o.stderr).contains("already exists"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["certs", "issue", "--dir", d, "--node", "bad id"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("node id"), "{}", text(&o.stderr));
}

#[test]
fn agent_and_ping() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let agent = start_agent(dir.path(), "node-a", &[]);
    let certs = dir.path().to_str().unwrap();

    let o = run(&[
        "ping",
        &agent.addr,
        "--certs-dir",
        certs,
        "--node-id",
        "node-b",
        "-n",
        "3",
        "--interval-ms",
        "10",
    ]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", text(&o.stderr));
    assert!(out.contains("connected to node-a"), "{out}");
    assert!(out.contains("protocol v6"), "{out}");
    assert!(out.contains("rtt min/avg/max/mdev"), "{out}");

    // A peer without a usable port is the command line's fault (3); one that does not
    // answer, the network's (5).
    for (peer, code) in [
        ("[::1]", 3),
        ("127.0.0.1:99999", 3),
        ("localhost", 3),
        (":7700", 3),
        ("127.0.0.1:1", 5),
    ] {
        let o = run(&[
            "ping",
            peer,
            "--certs-dir",
            certs,
            "--node-id",
            "node-b",
            "-n",
            "1",
        ]);
        assert_eq!(o.status.code(), Some(code), "{peer}: {}", text(&o.stderr));
    }

    // A reader gone: ended as a closed pipe ends other tools, not by a panic.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} ping {} --certs-dir {certs} --node-id node-b -n 50 --interval-ms 20 | head -1; \
             echo status=${{PIPESTATUS[0]}}",
            env!("CARGO_BIN_EXE_dwcp"),
            agent.addr
        ))
        .output()
        .unwrap();
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(out.contains("status=141"), "{out}\n{err}");
    assert!(!err.contains("panicked"), "{err}");

    let o = run(&[
        "ping",
        &agent.addr,
        "--certs-dir",
        certs,
        "--node-id",
        "node-b",
        "-n",
        "2",
        "--json",
    ]);
    assert!(o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["version"], 6);
    assert_eq!(j["peer_node_id"], "node-a");
    assert_eq!(j["rtt_ms"]["samples"].as_array().unwrap().len(), 2);
    assert!(j["rtt_ms"]["avg"].as_f64().unwrap() > 0.0);

    // A v1-only client (configured through the environment) still gets in, at v1.
    let o = dwcp()
        .args([
            "ping",
            &agent.addr,
            "--node-id",
            "node-b",
            "-n",
            "1",
            "--json",
        ])
        .arg("--certs-dir")
        .arg(certs)
        .env("DWCP_PROTOCOL__VERSIONS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["version"], 1);
    assert_eq!(j["negotiated"]["max_streams"], 1);
}

#[test]
fn foreign_ca_fails_with_auth_exit_code() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    cluster(ours.path(), &["node-a"]);
    cluster(theirs.path(), &["node-b"]);
    let agent = start_agent(ours.path(), "node-a", &[]);
    let o = run(&[
        "ping",
        &agent.addr,
        "--certs-dir",
        theirs.path().to_str().unwrap(),
        "--node-id",
        "node-b",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("not issued by our cluster CA"), "{err}");
}

#[test]
fn expect_node_refuses_another_node() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let agent = start_agent(dir.path(), "node-a", &[]);
    let certs = dir.path().to_str().unwrap();
    let base = [
        "ping",
        &agent.addr,
        "--certs-dir",
        certs,
        "--node-id",
        "node-b",
        "-n",
        "1",
    ];
    let o = dwcp()
        .args(base)
        .args(["--expect-node", "node-a"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = dwcp()
        .args(base)
        .args(["--expect-node", "node-c"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(6), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("expected node node-c"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn unresolvable_peer_is_a_network_error() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-b"]);
    let certs = dir.path().to_str().unwrap();
    let o = run(&[
        "ping",
        "no-such-host.invalid:7700",
        "--certs-dir",
        certs,
        "--node-id",
        "node-b",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    let o = run(&[
        "ping",
        "127.0.0.1",
        "--certs-dir",
        certs,
        "--node-id",
        "node-b",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("HOST:PORT"), "{}", text(&o.stderr));
}

#[test]
fn bad_log_level_in_config_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[log]\nlevel = \"loud\"\n").unwrap();
    let o = run(&["ping", "127.0.0.1:1", "--config", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("log.level = \"loud\""),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn unreachable_peer_is_a_network_error() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-b"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let o = run(&[
        "ping",
        &addr,
        "--certs-dir",
        dir.path().to_str().unwrap(),
        "--node-id",
        "node-b",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("cannot connect"),
        "{}",
        text(&o.stderr)
    );
}

/// A benchmark whose reader went away ends as a closed pipe ends other tools (it panicked),
/// and still writes its JSON report.
#[test]
fn a_bench_with_its_reader_gone_exits_141() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("be.json");
    // A pipe whose reader is gone before the first line: every write fails, no race.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = dwcp()
        .args(["bench", "encoding", "--size", "1Mi", "--json-out"])
        .arg(&json)
        .stdout(writer)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(j.is_object(), "{j}");
}

/// `--json` commands that fail before their own object print one saying so, with the exit
/// code, so that a script reading standard output always gets JSON.
#[test]
fn json_commands_that_fail_print_a_failure_object() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a"]);
    let file = dir.path().join("f.raw");
    std::fs::write(&file, b"abc").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let certs = dir.path().to_str().unwrap();
    for args in [
        vec!["ping", &addr, "--json"],
        vec!["send", file.to_str().unwrap(), "--to", &addr, "--json"],
    ] {
        let mut args = args.clone();
        args.extend(["--certs-dir", certs, "--node-id", "node-a"]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", text(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {:?}", text(&o.stdout)));
        assert_eq!(j["result"], "failed", "{j}");
        assert_eq!(j["exit_code"], 5, "{j}");
        let all = format!("{} {}", j["error"], j["causes"]);
        assert!(all.contains(&addr), "{args:?}: {j}");
    }
    // Without --json, standard output stays empty.
    let o = run(&["ping", &addr, "--certs-dir", certs, "--node-id", "node-a"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
}

/// The agent takes as many open files as it may (a descriptor per connection and per
/// cache pack): started with a soft limit of 256, it runs with its hard limit.
#[test]
fn the_agent_raises_its_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a"]);
    let (addr, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -S -n 256 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_dwcp"))
        .args(["agent", "--node-id", "node-a", "--listen", &addr])
        .args(["--admin-listen", &admin, "--certs-dir"])
        .arg(dir.path())
        .arg("--spool-dir")
        .arg(dir.path().join("spool"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = AgentProc { child, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !readyz(&admin) {
        assert!(agent.child.try_wait().unwrap().is_none(), "agent exited");
        assert!(Instant::now() < deadline, "agent not ready within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    // "Max open files  SOFT  HARD  files"
    let (soft, hard) = (f[3], f[4]);
    assert_ne!(soft, "256", "{line}");
    assert_eq!(soft, hard, "{line}");
    let _ = agent.child.kill();
}

#[test]
fn sigterm_stops_the_agent_with_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a"]);
    let mut agent = start_agent(dir.path(), "node-a", &[]);
    let pid = agent.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "agent exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "agent did not stop within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_without_certificates_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&[
        "agent",
        "--certs-dir",
        dir.path().to_str().unwrap(),
        "--node-id",
        "n1",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(4));
    assert!(text(&o.stderr).contains("ca.pem"), "{}", text(&o.stderr));
}

#[test]
fn config_check_and_default() {
    let dir = tempfile::tempdir().unwrap();
    let default = run(&["config", "default"]);
    assert!(default.status.success());
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &default.stdout).unwrap();
    let o = run(&["config", "check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[transport]\nmin_streams = 64\nmax_streams = 8\n[protocol]\nversions = [2]\n",
    )
    .unwrap();
    let o = run(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    let err = text(&o.stderr);
    assert!(err.contains("transport.min_streams = 64"), "{err}");
    assert!(err.contains("protocol.versions = [2]"), "{err}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[transport]\nmax_stream = 8\n").unwrap();
    let o = run(&["config", "check", typo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        text(&o.stderr).contains("max_stream"),
        "{}",
        text(&o.stderr)
    );

    let o = run(&["config", "check", "/nonexistent/dwcp.toml"]);
    assert_eq!(o.status.code(), Some(4));
    // Not read whole: an endless file is refused, not taken into memory.
    let o = run(&["config", "check", "/dev/zero"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        text(&o.stderr).contains("longer than"),
        "{}",
        text(&o.stderr)
    );

    let o = dwcp()
        .args(["config", "show"])
        .env("DWCP_TRANSPORT__MAX_STREAMS", "64")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        text(&o.stdout).contains("max_streams = 64"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn demo_runs_without_setup() {
    let o = run(&[
        "demo",
        "--probes",
        "5",
        "--json",
        "--vm-size",
        "16Mi",
        "--synthetic",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["version"], 6);
    assert_eq!(j["legacy_version"], 1);
    assert_eq!(j["probes"], 5);
    assert!(
        j["foreign_ca_refused"]
            .as_str()
            .unwrap()
            .contains("cluster CA"),
        "{j}"
    );
    let m = &j["migration"];
    assert_eq!(m["result"], "migrated", "{m}");
    assert_eq!(m["bit_exact"], true, "{m}");
    assert_eq!(m["guest_bytes"], 16 << 20, "{m}");
    assert!(m["rounds"].as_array().unwrap().len() >= 2, "{m}");
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert!(
        m["downtime_observed_ms"].as_f64() >= m["downtime_ms"].as_f64(),
        "{m}"
    );
    assert_eq!(j["node_b"]["handshakes_failed"], 1.0);
}

#[test]
fn internet_profile_transfer_in_namespaces() {
    if !dwcp_testbed::is_root() {
        eprintln!("SKIPPED: needs root to build the network-namespace testbed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let certs = dir.path().to_str().unwrap().to_string();
    // Incompressible (xorshift), so that all of it crosses the lossy link.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..4_000_000u32)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let file = dir.path().join("img.raw");
    std::fs::write(&file, &data).unwrap();
    let out = dir.path().join("out");
    let profile = dwcp_testbed::Profile::named("internet").unwrap();
    let tb = dwcp_testbed::Testbed::up(profile, 3).unwrap();
    let listen = format!("{}:7800", tb.addr_b);
    let exe = env!("CARGO_BIN_EXE_dwcp");
    let mut recv = tb
        .cmd_b(exe)
        .args([
            "recv",
            "--listen",
            &listen,
            "--node-id",
            "node-b",
            "--certs-dir",
            &certs,
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let send = tb
        .cmd_a(exe)
        .arg("send")
        .arg(&file)
        .args(["--to", &listen, "--certs-dir", &certs])
        .args(["--node-id", "node-a", "--streams", "4", "--json"])
        .args(["--transport", "tcp"])
        .output()
        .unwrap();
    let recv_status = exit_within(&mut recv, Duration::from_secs(30));
    tb.down();
    assert!(send.status.success(), "{}", text(&send.stderr));
    assert!(recv_status.success());
    let j: serde_json::Value = serde_json::from_slice(&send.stdout).unwrap();
    assert_eq!(j["streams"], 4, "{j}");
    assert!(std::fs::read(out.join("img.raw")).unwrap() == data);
    // 0.5 % of ~2,800 segments lost each way: TCP's retransmissions show (no loss at all
    // has odds below one in a million).
    kernel_counts_agree(&j);
    assert_eq!(j["transport"], "tcp", "{j}");
    assert!(j["retransmits"].as_u64().unwrap() > 0, "{j}");
}

/// One `dwcp recv` run on loopback receiving one `dwcp send`; returns send's JSON.
fn recv_and_send(certs: &Path, out: &Path, cache: &Path, file: &Path) -> serde_json::Value {
    recv_and_send_with(certs, out, cache, file, &[], &[])
}

/// As [`recv_and_send`], with more arguments and environment for `dwcp send`.
fn recv_and_send_with(
    certs: &Path,
    out: &Path,
    cache: &Path,
    file: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let (send, status, recv_log) = recv_and_send_status(certs, out, cache, file, args, env);
    assert!(send.status.success(), "{}", text(&send.stderr));
    assert!(status.success(), "{recv_log}");
    let j: serde_json::Value = serde_json::from_slice(&send.stdout).unwrap();
    kernel_counts_agree(&j);
    j
}

/// `dwcp send --json`'s TCP counts (from the kernel) agree with what the session sent: TCP
/// sent at least the chunk bytes (framing and TLS come on top). QUIC sessions have none.
fn kernel_counts_agree(j: &serde_json::Value) {
    let link = &j["link"];
    match j["transport"].as_str() {
        Some("tcp") => {
            let tcp_bytes = link["tcp_bytes_sent"].as_u64().unwrap();
            assert!(tcp_bytes >= j["bytes_sent"].as_u64().unwrap(), "{j}");
            assert!(link["tcp_segments_sent"].as_u64().unwrap() > 0, "{j}");
            assert_eq!(j["retransmits"], link["tcp_retransmits"], "{j}");
            assert!(
                link["tcp_retransmit_percent"].as_f64().unwrap() < 100.0,
                "{j}"
            );
        }
        Some("quic") => {
            assert!(link["tcp_bytes_sent"].is_null(), "{j}");
            assert!(j["retransmits"].is_null(), "{j}");
        }
        other => panic!("transport {other:?}: {j}"),
    }
}

/// One `dwcp recv` and one `dwcp send` as they end: send's output, recv's exit status and
/// its standard error.
fn recv_and_send_status(
    certs: &Path,
    out: &Path,
    cache: &Path,
    file: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Output, std::process::ExitStatus, String) {
    // A file, not a pipe: nothing to drain while recv runs.
    let log = tempfile::NamedTempFile::new().unwrap();
    let cache = cache.to_str().unwrap();
    let (mut recv, listen) = recv_listening(certs, out, &["--cache-dir", cache], &log);
    let send = dwcp()
        .arg("send")
        .arg(file)
        .args([
            "--to",
            &listen,
            "--node-id",
            "node-a",
            "--json",
            "--certs-dir",
        ])
        .arg(certs)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = recv.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = recv.kill();
            panic!("recv did not finish: {}", text(&send.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (send, status, std::fs::read_to_string(log.path()).unwrap())
}

/// A sender that gives up mid-transfer (its file was cut short under it) says so to `dwcp
/// recv`, which exits (5) instead of waiting for a resume that will not come, and keeps what
/// arrived.
#[test]
fn recv_exits_when_its_sender_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let file = dir.path().join("cut.raw");
    // 64 MiB at 8 MB/s: beyond the sender's 32 MiB window when the file is cut after 1 s.
    std::fs::write(&file, vec![3u8; 64 << 20]).unwrap();
    let cut = {
        let file = file.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        })
    };
    let (out, cache) = (dir.path().join("out"), dir.path().join("cache"));
    let (send, status, recv_log) = recv_and_send_status(
        dir.path(),
        &out,
        &cache,
        &file,
        &["--no-delta", "--rate-limit", "8M", "--streams", "2"],
        &[],
    );
    cut.join().unwrap();
    let send_err = text(&send.stderr);
    assert_eq!(send.status.code(), Some(4), "{send_err}");
    assert!(send_err.contains("was it changed?"), "{send_err}");
    assert_eq!(status.code(), Some(5), "{recv_log}");
    assert!(
        recv_log.contains("the sender gave the transfer up"),
        "{recv_log}"
    );
    assert!(out.join(".cut.raw.dwcp-part").exists(), "kept for a resume");
}

/// An object `dwcp recv` refuses (here: its part file cannot be made) ends both sides, each
/// saying why, with the file-problem exit code: recv does not wait for a sender that gave up.
#[test]
fn recv_and_send_both_exit_when_recv_refuses_the_object() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let file = dir.path().join("img.raw");
    std::fs::write(&file, vec![5u8; 1 << 20]).unwrap();
    let out = dir.path().join("out");
    // A directory where the part file must go: refused at the object's begin (also as root).
    std::fs::create_dir_all(out.join(".img.raw.dwcp-part")).unwrap();
    let cache = dir.path().join("cache");
    let (send, status, recv_log) = recv_and_send_status(dir.path(), &out, &cache, &file, &[], &[]);
    let send_err = text(&send.stderr);
    assert_eq!(send.status.code(), Some(4), "{send_err}");
    assert!(send_err.contains("STORAGE_ERROR"), "{send_err}");
    assert_eq!(status.code(), Some(4), "{recv_log}");
    assert!(
        recv_log.contains("receiving \"img.raw\" failed"),
        "{recv_log}"
    );
    assert!(!out.join("img.raw").exists());
}

/// `dwcp recv` takes sessions over QUIC as well, and answers the round-trip probe that
/// `--transport auto` sends before its session; the JSON says which carrier ran.
#[test]
fn recv_takes_quic_and_auto_probes() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let file = dir.path().join("q.raw");
    std::fs::write(&file, &data).unwrap();
    for (i, (args, env, want)) in [
        (&["--transport", "quic"][..], &[][..], "quic"),
        // A host whose TCP cannot use BBR (reno), on a path measured as a datacenter one:
        // the probe is answered and the session stays on TCP.
        (
            &["--transport", "auto"][..],
            &[("DWCP_TRANSPORT__CONGESTION", "reno")][..],
            "tcp",
        ),
        // ... and on a path declared internet: QUIC.
        (
            &["--transport", "auto", "--mode", "internet"][..],
            &[("DWCP_TRANSPORT__CONGESTION", "reno")][..],
            "quic",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}"));
        let cache = dir.path().join(format!("cache{i}"));
        let j = recv_and_send_with(dir.path(), &out, &cache, &file, args, env);
        assert_eq!(j["transport"], want, "{args:?}: {j}");
        assert!(
            std::fs::read(out.join("q.raw")).unwrap() == data,
            "{args:?}"
        );
    }
}

#[test]
fn recv_cache_persists_so_a_second_run_receives_known_pages_by_reference() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let (out, cache) = (dir.path().join("out"), dir.path().join("cache"));
    // 1024 distinct, compressible pages.
    let data: Vec<u8> = (0..4096u32 * 1024)
        .map(|i| ((i / 4096).wrapping_mul(31) ^ (i % 251)) as u8)
        .collect();
    let a = dir.path().join("a.img");
    std::fs::write(&a, &data).unwrap();
    let j = recv_and_send(dir.path(), &out, &cache, &a);
    assert_eq!(j["files"][0]["delta"]["layout"], "pages", "{j}");
    assert!(std::fs::read(out.join("a.img")).unwrap() == data);

    // A new recv process, the same cache directory: the same pages under another name cost
    // a reference each.
    let b = dir.path().join("b.img");
    std::fs::write(&b, &data).unwrap();
    let j = recv_and_send(dir.path(), &out, &cache, &b);
    let on_wire = j["bytes_on_wire"].as_u64().unwrap();
    assert!(on_wire < data.len() as u64 / 100, "{j}");
    assert_eq!(
        j["files"][0]["delta"]["saved"]["cache"],
        data.len() as u64,
        "{j}"
    );
    assert!(std::fs::read(out.join("b.img")).unwrap() == data);

    // --layout pages refuses a file that is not whole pages, before connecting.
    let odd = dir.path().join("odd.bin");
    std::fs::write(&odd, b"not a page").unwrap();
    let o = dwcp()
        .arg("send")
        .arg(&odd)
        .args([
            "--to",
            "127.0.0.1:9",
            "--layout",
            "pages",
            "--node-id",
            "node-a",
            "--certs-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("whole number of 4096-byte pages"),
        "{}",
        text(&o.stderr)
    );
}

/// `dwcp migrate --json` succeeded, sending no faster than 2 MB/s (less 50 ms of burst and
/// the set-up): its wire bytes took that long at least.
fn capped_to_2mb_s(o: &Output) {
    let (wire, secs, j) = wire_and_seconds(o);
    assert!(secs >= (wire - 100_000.0) / 2e6, "faster than the cap: {j}");
}

/// A migration that succeeded: its bytes on the wire (over 1 MB), its seconds, its report.
fn wire_and_seconds(o: &Output) -> (f64, f64, serde_json::Value) {
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (wire, secs) = (
        j["wire_bytes"].as_f64().unwrap(),
        j["total_seconds"].as_f64().unwrap(),
    );
    assert!(wire > 1e6, "{j}");
    (wire, secs, j)
}

#[test]
fn migrate_a_memory_image_vm_to_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    let agent = start_agent(dir.path(), "node-b", &[]);
    let migrate = |args: &[&str]| {
        dwcp()
            .args(["migrate", "--to", &agent.addr, "--node-id", "node-a"])
            .args(args)
            .arg("--certs-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let o = migrate(&[
        "--expect-node",
        "node-b",
        "--vm-size",
        "8Mi",
        "--synthetic",
        "--dirty-rate",
        "4M",
        "--name",
        "web1.mem",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["result"], "migrated", "{j}");
    assert_eq!(j["bit_exact"], true, "{j}");
    // TCP's own count (the kernel's) under the rounds: every byte of them, framing and TLS
    // on top (a part refused and sent again would count in the wire bytes only).
    assert_eq!(j["cold_resends"], 0, "{j}");
    assert!(
        j["tcp_bytes_sent"].as_u64().unwrap() >= j["wire_bytes"].as_u64().unwrap(),
        "{j}"
    );
    assert!(j["tcp_segments_sent"].as_u64().unwrap() > 0, "{j}");
    let img = std::fs::read(dir.path().join("spool-node-b/node-a/web1.mem")).unwrap();
    assert_eq!(img.len(), 8 << 20);

    // Capped at 2 MB/s: the rounds' bytes take that long at least (less 50 ms of burst).
    let o = migrate(&[
        "--vm-size",
        "8Mi",
        "--synthetic",
        "--dirty-rate",
        "1M",
        "--rate-limit",
        "16Mbit",
        "--seed",
        "2",
        "--name",
        "capped.mem",
        "--json",
    ]);
    // Another seed: not pages the destination holds from the VM before.
    capped_to_2mb_s(&o);
    // The configuration's cap, when --rate-limit is not given.
    let o = dwcp()
        .args(["migrate", "--to", &agent.addr, "--node-id", "node-a"])
        .args([
            "--vm-size",
            "8Mi",
            "--synthetic",
            "--dirty-rate",
            "1M",
            "--seed",
            "3",
        ])
        .args(["--name", "capped2.mem", "--json", "--certs-dir"])
        .arg(dir.path())
        .env("DWCP_MIGRATION__RATE_LIMIT_BYTES_PER_SEC", "2000000")
        .output()
        .unwrap();
    capped_to_2mb_s(&o);
    // Below a real cap: refused, naming the flag.
    let o = migrate(&["--rate-limit", "1000"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--rate-limit"),
        "{}",
        text(&o.stderr)
    );
    // `--rate-limit none` lifts the configuration's cap: at 64 KiB/s these rounds would
    // take a quarter of a minute at least.
    let o = dwcp()
        .args(["migrate", "--to", &agent.addr, "--node-id", "node-a"])
        .args(["--vm-size", "8Mi", "--synthetic", "--dirty-rate", "1M"])
        .args(["--seed", "5", "--rate-limit", "none"])
        .args(["--name", "uncapped.mem", "--json", "--certs-dir"])
        .arg(dir.path())
        .env("DWCP_MIGRATION__RATE_LIMIT_BYTES_PER_SEC", "65536")
        .output()
        .unwrap();
    let (wire, secs, j) = wire_and_seconds(&o);
    assert!(
        secs < wire / 65536.0 / 2.0,
        "held to the configuration's cap: {j}"
    );

    // The VM's memory in a file: the same migration, and the file is gone afterwards. (After
    // the capped runs: the destination's cache learns its pages.)
    let vm_dir = tempfile::tempdir().unwrap();
    let o = migrate(&[
        "--vm-size",
        "8Mi",
        "--synthetic",
        "--seed",
        "3",
        "--vm-dir",
        vm_dir.path().to_str().unwrap(),
        "--name",
        "in-a-file.mem",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["result"], "migrated", "{j}");
    assert_eq!(j["bit_exact"], true, "{j}");
    assert!(j["shadow_bytes"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(
        std::fs::read_dir(vm_dir.path()).unwrap().count(),
        0,
        "the VM's file has no name and goes with the process"
    );
    // Ctrl-C during the rounds rolls back: exit 8, the destination keeps nothing.
    let mut child = dwcp()
        .args(["migrate", "--to", &agent.addr, "--node-id", "node-a"])
        .args([
            "--vm-size",
            "32Mi",
            "--synthetic",
            "--seed",
            "4",
            "--rate-limit",
            "1M",
            "--name",
            "cancelled.mem",
            "--json",
        ])
        .arg("--certs-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once its first round has begun at the destination (its rounds at 1 MB/s take seconds).
    let spool = dir.path().join("spool-node-b/node-a");
    let target = spool.join(".cancelled.mem.dwcp-migrating");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !target.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(target.exists(), "no round began within 30 s");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    // Bounded: a rollback that hangs fails here rather than holding the suite.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        panic!("dwcp migrate did not end within 30 s of SIGINT");
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(8), "{}", text(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["result"], "rolled back", "{j}");
    assert!(j["how"].as_str().unwrap().contains("cancelled"), "{j}");
    assert!(
        text(&o.stderr).contains("interrupted: rolling back"),
        "{}",
        text(&o.stderr)
    );
    assert!(!target.exists());
    assert!(!spool.join("cancelled.mem").exists());

    // Bad input is refused before anything starts.
    let o = migrate(&["--vm-size", "10"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--vm-size"), "{}", text(&o.stderr));
    // So is a VM the host has no memory for (its image, and room for some of what the
    // destination holds), where the host says so; the refusal names the way out.
    let avail_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    });
    match avail_kib {
        Some(k) if k < 60 << 20 => {
            let o = migrate(&["--vm-size", "60Gi"]);
            assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
            assert!(
                text(&o.stderr).contains("--vm-size 60Gi: a generated VM needs at least 62464 MiB")
                    && text(&o.stderr).contains("--vm-dir DIR on a disk keeps the image"),
                "{}",
                text(&o.stderr)
            );
        }
        _ => eprintln!("note: 60 GiB available or unknown: the memory refusal is not checked"),
    }
    // A directory for the VM's memory that is not there, or without the disk space for it.
    let o = migrate(&["--vm-size", "8Mi", "--vm-dir", "/nonexistent/dwcp-vm"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--vm-dir /nonexistent/dwcp-vm:"),
        "{}",
        text(&o.stderr)
    );
    // (Only where the refusal is certain: 64 GiB needs about 44 GiB there.)
    let shm_free = rustix::fs::statvfs("/dev/shm")
        .map(|s| s.f_bavail * s.f_frsize)
        .unwrap_or(u64::MAX);
    if shm_free < 40 << 30 {
        let o = migrate(&["--vm-size", "64Gi", "--vm-dir", "/dev/shm"]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("--vm-dir /dev/shm: a generated VM of 65536 MiB needs about"),
            "{}",
            text(&o.stderr)
        );
    }

    // A guest that rewrites all of its memory every few milliseconds, with no throttling and
    // a 1 ms pause allowed, cannot converge: rolled back, exit code 8, the report says why.
    let o = migrate(&[
        "--vm-size",
        "8Mi",
        "--synthetic",
        "--dirty-rate",
        "2G",
        "--downtime-ms",
        "1",
        "--max-rounds",
        "2",
        "--no-throttle",
        "--name",
        "web2.mem",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("did not converge")
            && text(&o.stderr).contains("at the source as it was before"),
        "{}",
        text(&o.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["result"], "rolled back", "{j}");
}

/// `dwcp ARGS` refused as a bad command line (2); its standard error.
fn refused(args: &[&str]) -> String {
    let o = run(args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    err
}

/// `dwcp migrate` of a QEMU guest (whose monitor is not there) with `extra`, refused (2).
fn qemu_migrate_refused(extra: &[&str]) -> String {
    let mut args = vec![
        "migrate",
        "--to",
        "127.0.0.1:9",
        "--qemu-qmp",
        "/nonexistent/qmp",
    ];
    args.extend_from_slice(extra);
    refused(&args)
}

#[test]
fn flags_that_would_be_ignored_are_refused() {
    // Without delta encoding there is no compressor to pick.
    for flag in [["--codec", "lz4"], ["--link-rate", "1Gbit"]] {
        let args = ["send", "/etc/hostname", "--to", "127.0.0.1:9", "--no-delta"];
        let e = refused(&[&args[..], &flag[..]].concat());
        assert!(e.contains("cannot be used with"), "{e}");
    }
    // QEMU counts its own rounds.
    qemu_migrate_refused(&["--max-rounds", "5"]);
    // A cache inside the output directory: a received file could replace a pack.
    let o = run(&[
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--out",
        "/tmp/dwcp-x",
        "--cache-dir",
        "/tmp/dwcp-x/c",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--cache-dir"),
        "{}",
        text(&o.stderr)
    );
    assert!(!Path::new("/tmp/dwcp-x").exists());
}

#[test]
fn throttle_steps_are_for_a_qemu_guest_and_named() {
    // For a memory image they would mean nothing: refused, not ignored.
    let e = refused(&["migrate", "--to", "127.0.0.1:9", "--throttle-steps", "qemu"]);
    assert!(e.contains("--qemu-qmp"), "{e}");
    let e = qemu_migrate_refused(&["--throttle-steps", "fast"]);
    assert!(e.contains("'fast'") && e.contains("paced, qemu"), "{e}");
    // Steps for a throttle that is forbidden: a contradiction, refused.
    let e = qemu_migrate_refused(&["--no-throttle", "--throttle-steps", "paced"]);
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn postcopy_is_for_a_qemu_guest() {
    // A memory image has no post-copy: refused, not ignored.
    let o = run(&["migrate", "--to", "127.0.0.1:9", "--postcopy"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--qemu-qmp"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn migrate_retry_secs_is_bounded_and_named() {
    // A day at most: a wait on a link that is down must end.
    let o = run(&["migrate", "--to", "127.0.0.1:9", "--retry-secs", "90000"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--retry-secs"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["migrate", "--to", "127.0.0.1:9", "--retry-secs", "soon"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
}

#[test]
fn bench_migration_refuses_bad_cases_before_building_anything() {
    let o = run(&["bench", "migration", "--cases", "1Gi-at-10M"]);
    // Not root: refused for that; root: refused for the case. Either way before any testbed.
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(
        e.contains("SIZE@DIRTY-RATE") || e.contains("needs root"),
        "{e}"
    );
}

#[test]
fn bench_migration_refuses_more_destinations_than_migrations_before_building_anything() {
    let o = run(&[
        "bench",
        "migration",
        "--cases",
        "1Gi@10M",
        "--concurrent",
        "2",
        "--destinations",
        "3",
        "--qemu-cases",
        "",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(
        e.contains("--destinations 3 is more than --concurrent 2"),
        "{e}"
    );
}

#[test]
fn bench_guest_refuses_a_guest_too_small_to_boot() {
    let o = run(&["bench", "guest", "--mem", "128Mi"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("--mem: 128Mi is outside 256Mi..16Gi"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn testbed_and_benches_refuse_a_bad_link_profile_before_building_anything() {
    for args in [
        &["testbed", "--profile", "rtt=80ms,loss=2"][..],
        &["bench", "transport", "--profile", "rtt=80ms,loss=2"][..],
        &["bench", "migration", "--profile", "rtt=80ms,loss=2"][..],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", text(&o.stderr));
        let e = text(&o.stderr);
        assert!(
            e.contains(r#"--profile: link profile setting "loss=2": a percentage"#),
            "{args:?}: {e}"
        );
    }
}

/// Whether a process whose command line starts with `marker` runs (anywhere on the machine:
/// markers carry this test process's pid).
fn running(marker: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("^{marker}")])
        .output()
        .unwrap()
        .status
        .success()
}

/// The namespaces a `dwcp testbed` run printed are gone (other tests' testbeds may come and
/// go meanwhile, so only these are looked for).
fn testbed_namespaces_gone(err: &str) {
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = text(&list.stdout);
    let ours: Vec<&str> = err
        .split_whitespace()
        .filter(|w| w.starts_with("dwcp-tb"))
        .collect();
    assert!(!ours.is_empty(), "{err}");
    for ns in ours {
        assert!(!list.contains(ns), "{ns} still there: {list}");
    }
}

/// A `dwcp testbed` child, killed on drop if still running (a failed assert must not leave
/// a testbed up, holding the machine's testbed lock).
struct TestbedProc(Child);

impl Drop for TestbedProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl TestbedProc {
    fn start(args: &[&str], marker: &str) -> Self {
        let child = dwcp()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = Self(child);
        // Up once the marker runs (the testbed lock may first wait for another test's).
        let deadline = Instant::now() + Duration::from_secs(120);
        while !running(marker) {
            assert!(
                p.0.try_wait().unwrap().is_none(),
                "dwcp testbed ended early: {}",
                p.stderr()
            );
            assert!(Instant::now() < deadline, "the testbed did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "not down 20 s after the signal");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        err
    }
}

#[test]
fn testbed_runs_a_command_on_each_side_passes_its_status_on_and_takes_everything_down() {
    if !dwcp_testbed::is_root() {
        eprintln!("SKIPPED: needs root to build the network-namespace testbed");
        return;
    }
    let pid = std::process::id();
    // Markers that must not outlive the testbed: a job B's shell leaves behind as it exits,
    // and one A's shell leaves behind; A then pings B's address.
    let (mark_b, mark_a) = (format!("sleep 47.{pid}"), format!("sleep 46.{pid}"));
    let o = run(&[
        "testbed",
        "--profile",
        "rtt=20ms,rate=100mbit",
        "--in-b",
        &format!("{mark_b} & exit 0"),
        "--in-a",
        &format!("{mark_a} & ping -U -q -n -c 10 -i 0.05 -W 2 $DWCP_TB_ADDR_B"),
    ]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("RTT 20.0 ms") && err.contains("testbed down"),
        "{err}"
    );
    // rtt min/avg/max/mdev = a/b/c/d ms
    let line = out.lines().find(|l| l.contains("min/avg/max")).unwrap();
    let min: f64 = line
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19.5..26.0).contains(&min), "{line}");
    assert!(!running(&mark_b), "B's job outlived the testbed");
    assert!(!running(&mark_a), "A's job outlived the testbed");
    testbed_namespaces_gone(&err);

    // A's exit status is dwcp's, a signal's as a shell gives it; a command past --seconds is
    // stopped with timeout's 124.
    let o = run(&["testbed", "--profile", "dc", "--in-a", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    testbed_namespaces_gone(&text(&o.stderr));
    let o = run(&["testbed", "--profile", "dc", "--in-a", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o.stderr));
    let o = run(&[
        "testbed",
        "--profile",
        "dc",
        "--seconds",
        "1",
        "--in-a",
        "sleep 30",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("still running after 1 s"),
        "{}",
        text(&o.stderr)
    );
    testbed_namespaces_gone(&text(&o.stderr));
}

/// Starts `dwcp testbed` with `sleep MARK` as the command in one side (`side`: `--in-a` or
/// `--in-b`), sends it `sig` once that runs, and returns how it ended and what it said; the
/// command and the namespaces are gone by then (asserted).
fn testbed_stopped_by(
    side: &str,
    mark: &str,
    sig: rustix::process::Signal,
) -> (std::process::ExitStatus, String) {
    let args = ["testbed", "--profile", "dc", "--seconds", "120", side, mark];
    let mut tb = TestbedProc::start(&args, mark);
    tb.signal(sig);
    let status = tb.wait();
    let err = tb.stderr();
    assert!(!running(mark), "the command outlived the testbed: {err}");
    testbed_namespaces_gone(&err);
    (status, err)
}

#[test]
fn testbed_held_up_comes_down_on_sigterm() {
    if !dwcp_testbed::is_root() {
        eprintln!("SKIPPED: needs root to build the network-namespace testbed");
        return;
    }
    let mark = format!("sleep 48.{}", std::process::id());
    let (status, err) = testbed_stopped_by("--in-b", &mark, rustix::process::Signal::TERM);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("SIGTERM: taking the testbed down") && err.contains("testbed down"),
        "{err}"
    );
}

#[test]
fn testbed_stops_a_running_command_on_sigint_with_the_shells_status() {
    if !dwcp_testbed::is_root() {
        eprintln!("SKIPPED: needs root to build the network-namespace testbed");
        return;
    }
    let mark = format!("sleep 49.{}", std::process::id());
    let (status, err) = testbed_stopped_by("--in-a", &mark, rustix::process::Signal::INT);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("stopped by SIGINT"), "{err}");
}

/// `dwcp recv` with a listener up, its standard error in `log`.
fn recv_listening(
    certs: &Path,
    out: &Path,
    extra: &[&str],
    log: &tempfile::NamedTempFile,
) -> (Child, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let recv = dwcp()
        .args([
            "recv",
            "--listen",
            &listen,
            "--node-id",
            "node-b",
            "--certs-dir",
        ])
        .arg(certs)
        .arg("--out")
        .arg(out)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "recv did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (recv, listen)
}

/// Waits at most `within` for `child` to exit.
fn exit_within(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A sender killed mid-transfer says nothing: `dwcp recv` waits `--wait-secs` for it to come
/// back, then exits 5 keeping what arrived. SIGINT ends a recv waiting for its first sender
/// with 130.
#[test]
fn recv_gives_up_a_sender_gone_without_a_word_and_ends_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["node-a", "node-b"]);
    // Incompressible: the encoded copy is as large, and takes seconds at the capped rate.
    let file = dwcp_testkit::random_file(dir.path(), "big.raw", 64 << 20, 9);
    let out = dir.path().join("out");
    let log = tempfile::NamedTempFile::new().unwrap();
    let (mut recv, listen) = recv_listening(dir.path(), &out, &["--wait-secs", "2"], &log);
    // Delta-encoded: its encoded copy, in TMPDIR while it is sent, has no name to leave.
    let tmp = tempfile::tempdir().unwrap();
    let mut send = dwcp()
        .arg("send")
        .arg(&file)
        .args(["--to", &listen, "--node-id", "node-a", "--rate-limit", "8M"])
        .args(["--certs-dir"])
        .arg(dir.path())
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once data is flowing (its encoding done, the first chunks stored).
    let part = out.join(".big.raw.dwcp-part");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&part).map_or(true, |m| m.len() == 0) {
        assert!(Instant::now() < deadline, "no data arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    send.kill().unwrap();
    send.wait().unwrap();
    let killed = Instant::now();
    let status = exit_within(&mut recv, Duration::from_secs(30));
    let err = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(err.contains("the sender went away"), "{err}");
    assert!(killed.elapsed() >= Duration::from_secs(2), "{err}");
    assert!(out.join(".big.raw.dwcp-part").exists(), "kept for a resume");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");

    let log = tempfile::NamedTempFile::new().unwrap();
    let (mut recv, _) = recv_listening(dir.path(), &out, &[], &log);
    let k = Command::new("kill")
        .args(["-INT", &recv.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let status = exit_within(&mut recv, Duration::from_secs(10));
    let err = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
}
