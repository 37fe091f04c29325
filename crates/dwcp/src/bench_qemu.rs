//! The QEMU rows of `dwcp bench migration`: one guest in namespace A, migrated over the
//! emulated link to a fresh QEMU in namespace B with QEMU's own migration (default settings,
//! its 128 MiB/s cap included, then multifd with 8 channels and zstd and no cap) and through
//! DWCP: cold (the destination's cache
//! empty), seeded (a second agent whose cache holds nothing but the pages of the guest's
//! images: kernel, initramfs and disk) and warm (the first agent again, its cache holding
//! what the cold run sent). After each run the destination is killed and the source guest
//! resumed, so every case moves the same, still-running guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use dwcp_migration::qemu_vm::{GuestImage, Launch, QemuProcess, qemu_binary};
use dwcp_testbed::Testbed;
use dwcp_transport::qmp::{Qmp, capability};
use serde_json::{Value, json};

/// What the QEMU rows need from the bench around them.
pub(crate) struct QemuBench<'a> {
    pub(crate) tb: &'a Testbed,
    pub(crate) work: &'a Path,
    pub(crate) exe: &'a str,
    pub(crate) certs: &'a Path,
    /// The agent in B the cold and warm rows use, its name (`bench::start_agent`), and where
    /// it listens: one that no memory-image case has sent pages to (its cache empty).
    pub(crate) agent: &'a str,
    pub(crate) listen: &'a str,
    pub(crate) congestion: &'a str,
    pub(crate) mem_mib: u64,
    pub(crate) dirty_pages: u64,
    /// NUMA nodes of source and destination guests ([`Launch::numa_nodes`]).
    pub(crate) numa_nodes: u32,
    /// Destination QEMUs (native and through DWCP alike) start with their RAM faulted in
    /// ([`Launch::prealloc`]).
    pub(crate) dest_prealloc: bool,
    /// `--codec` of `dwcp migrate`.
    pub(crate) codec: crate::cli::CodecChoice,
    pub(crate) native_timeout: Duration,
    /// Which of [`CASES`] to run.
    pub(crate) cases: Vec<String>,
}

/// Why the QEMU rows cannot run here, if they cannot.
pub(crate) fn unavailable() -> Option<String> {
    if qemu_binary().is_none() {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    if GuestImage::find().is_none() {
        return Some("no guest image: run scripts/guest-image.sh (or set DWCP_GUEST_DIR)".into());
    }
    None
}

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's default `max-bandwidth` (its `MAX_THROTTLE`), bytes per second.
const QEMU_DEFAULT_CAP: u64 = 128 << 20;
/// A `max-bandwidth` no link here reaches, as `dwcp migrate` sets it.
const NO_CAP: u64 = 100 << 30;

/// The QEMU cases, in the order they run, and their table names.
const CASES: [(&str, &str); 9] = [
    ("native", "native default"),
    ("multifd", "native multifd zstd x8"),
    ("cold", "dwcp cold"),
    // Not in the default list: the cold case with `--throttle-steps qemu`, to compare.
    ("cold-qemu-steps", "dwcp cold, QEMU's steps"),
    // Nor this: the cold case with `--no-throttle` (given up when it cannot converge).
    ("cold-no-throttle", "dwcp cold, no throttle"),
    // Nor this: `--no-throttle --postcopy` (post-copy where it would be given up).
    ("cold-postcopy", "dwcp cold, post-copy"),
    // Nor this: the cold case with every connection to B reset for OUTAGE_FOR from
    // OUTAGE_AT on (see `outage`).
    ("cold-outage", "dwcp cold, link cut 5 s"),
    ("seeded", "dwcp seeded"),
    ("warm", "dwcp warm"),
];

/// `--qemu-cases`: names from [`CASES`], comma-separated (an empty list runs none).
pub(crate) fn parse_cases(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            if CASES.iter().any(|(k, _)| *k == c) {
                Ok(c.to_string())
            } else {
                let known: Vec<&str> = CASES.iter().map(|(k, _)| *k).collect();
                Err(format!("unknown case {c:?} (known: {})", known.join(", ")))
            }
        })
        .collect()
}

fn ns_prefix(ns: &str) -> Vec<String> {
    ["ip", "netns", "exec", ns].map(String::from).to_vec()
}

impl QemuBench<'_> {
    /// Runs every case; one JSON object per case.
    pub(crate) fn run(&self) -> Result<Vec<Value>> {
        let image = GuestImage::find().ok_or_else(|| anyhow!("no guest image"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        // QEMU's own sockets use the namespace's default congestion control.
        for mut c in [self.tb.cmd_a("sysctl"), self.tb.cmd_b("sysctl")] {
            c.args(["-q", "-w"]).arg(format!(
                "net.ipv4.tcp_congestion_control={}",
                self.congestion
            ));
            // Rows labelled with an algorithm they did not run would mislead.
            let status = c.status().context("cannot run sysctl in the testbed")?;
            if !status.success() {
                bail!(
                    "cannot make {:?} the testbed's TCP congestion control for QEMU's own \
                     sockets (sysctl: {status})",
                    self.congestion
                );
            }
        }
        let mut l = Launch::new(self.mem_mib, self.work.join("qemu-src.log"));
        l.qmp = vec![self.work.join("qemu-src.qmp")];
        l.dirty_pages_per_sec = self.dirty_pages;
        l.numa_nodes = self.numa_nodes;
        l.prefix = ns_prefix(&self.tb.ns_a);
        let t = Instant::now();
        eprintln!(
            "QEMU: booting a {} MiB guest in namespace A and filling its RAM ...",
            self.mem_mib
        );
        let mut src = QemuProcess::spawn(&image, &l)?;
        // Ctrl-C during the boot ends the wait (the signal is handled, not fatal, here).
        let console = rt.block_on(async {
            tokio::select! {
                r = src.wait_serial("dwcp-guest ready", Duration::from_secs(600)) => {
                    r.map_err(anyhow::Error::from)
                }
                () = async {
                    while !crate::bench::interrupted() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                } => Err(anyhow!("interrupted")),
            }
        })?;
        // The guest's own account of what it filled (and how much it read from its disk).
        let ready = console
            .lines()
            .find(|l| l.starts_with("dwcp-guest ready"))
            .unwrap_or("");
        eprintln!(
            "QEMU: guest ready after {:.0} s ({ready})",
            t.elapsed().as_secs_f64()
        );
        let mut rows = Vec::new();
        for (i, (key, case)) in CASES.iter().enumerate() {
            if !self.cases.iter().any(|c| c == key) {
                continue;
            }
            if crate::bench::interrupted() {
                bail!("interrupted");
            }
            eprintln!("QEMU: {case} ...");
            let r = if case.starts_with("native") {
                rt.block_on(self.native(&image, i, case.contains("multifd")))
            } else if *key == "seeded" {
                self.seeded(&image, i)
            } else if *key == "cold-qemu-steps" {
                self.through_own_agent(
                    &image,
                    i,
                    "agent-cold-qemu-steps",
                    7904,
                    None,
                    &["--throttle-steps", "qemu"],
                )
            } else if *key == "cold-postcopy" {
                self.through_own_agent(
                    &image,
                    i,
                    "agent-cold-postcopy",
                    7908,
                    None,
                    &["--no-throttle", "--postcopy"],
                )
            } else if *key == "cold-outage" {
                self.through_own_agent(&image, i, "agent-cold-outage", 7910, None, &[])
            } else if *key == "cold-no-throttle" {
                self.through_own_agent(
                    &image,
                    i,
                    "agent-cold-no-throttle",
                    7906,
                    None,
                    &["--no-throttle"],
                )
            } else {
                self.through_dwcp(&image, i, self.listen, self.agent, &[])
            };
            let row = match r {
                Ok(v) => v,
                Err(e) => json!({"result": "failed", "error": format!("{e:#}")}),
            };
            eprintln!("QEMU: {case}: {row}");
            rows.push(json!({"case": case, "report": row}));
            // Resume the source guest for the next case, and let it run a little.
            rt.block_on(async {
                let mut q = Qmp::connect(&self.work.join("qemu-src.qmp"), QMP_TIMEOUT).await?;
                let _ = q.execute("migrate_cancel", None).await;
                if q.status().await? != "running" {
                    q.execute("cont", None).await?;
                }
                anyhow::Ok(())
            })
            .context("cannot resume the source guest")?;
            std::thread::sleep(Duration::from_secs(5));
            if !src.alive() {
                return Err(anyhow!("the source QEMU died"));
            }
        }
        Ok(rows)
    }

    fn dest_launch(&self, i: usize) -> Launch {
        let mut l = Launch::new(self.mem_mib, self.work.join(format!("qemu-dst-{i}.log")));
        l.qmp = vec![self.work.join(format!("qemu-dst-{i}.qmp"))];
        l.prefix = ns_prefix(&self.tb.ns_b);
        l.numa_nodes = self.numa_nodes;
        l.prealloc = self.dest_prealloc;
        l
    }

    /// QEMU's own migration over the link, A -> B.
    async fn native(&self, image: &GuestImage, i: usize, multifd: bool) -> Result<Value> {
        let mut l = self.dest_launch(i);
        l.incoming = Some("defer".into());
        let _dst = QemuProcess::spawn(image, &l)?;
        let mut dq = Qmp::connect(&l.qmp[0], QMP_TIMEOUT).await?;
        let mut sq = Qmp::connect(&self.work.join("qemu-src.qmp"), QMP_TIMEOUT).await?;
        for q in [&mut sq, &mut dq] {
            q.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [capability("multifd", multifd)]})),
            )
            .await?;
            if multifd {
                q.execute(
                    "migrate-set-parameters",
                    Some(json!({"multifd-channels": 8, "multifd-compression": "zstd"})),
                )
                .await?;
            }
        }
        // The default row keeps QEMU's default cap (128 MiB/s); the best native setting has
        // none, as `dwcp migrate` lifts it for the rows through DWCP. Set either way, so that
        // no row depends on what an earlier case left set in the source QEMU.
        let cap: u64 = if multifd { NO_CAP } else { QEMU_DEFAULT_CAP };
        sq.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": cap })),
        )
        .await?;
        let uri = format!("tcp:{}:4444", self.tb.addr_b);
        dq.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await?;
        let _ = sq.poll_events(Duration::from_millis(1)).await;
        while sq.take_event("STOP").is_some() {}
        let t0 = SystemTime::now();
        let started = Instant::now();
        sq.execute("migrate", Some(json!({ "uri": uri }))).await?;
        let info = loop {
            let info = sq.execute("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => break info,
                Some("failed") => {
                    return Ok(json!({"result": "failed", "error": info.to_string()}));
                }
                _ if crate::bench::interrupted() => {
                    let _ = sq.execute("migrate_cancel", None).await;
                    bail!("interrupted");
                }
                _ if started.elapsed() > self.native_timeout => {
                    let _ = sq.execute("migrate_cancel", None).await;
                    let ram = &info["ram"];
                    return Ok(json!({
                        "result": "not finished",
                        "error": format!("not completed within {:?}", self.native_timeout),
                        "wire_bytes": ram["transferred"], "rounds": ram["dirty-sync-count"],
                    }));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let stop = sq.wait_event("STOP", Duration::from_secs(5)).await.ok();
        let resume = dq.wait_event("RESUME", Duration::from_secs(60)).await.ok();
        let ms = |a: SystemTime, b: SystemTime| {
            b.duration_since(a).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let ram = &info["ram"];
        Ok(json!({
            "result": if resume.is_some() { "migrated" } else { "not resumed" },
            "total_seconds": resume.as_ref().map_or(started.elapsed().as_secs_f64(), |r| ms(t0, r.at) / 1e3),
            "downtime_ms": match (&stop, &resume) { (Some(s), Some(r)) => Some(ms(s.at, r.at)), _ => None },
            "qemu_downtime_ms": info["downtime"],
            "wire_bytes": ram["transferred"],
            "rounds": ram["dirty-sync-count"],
            "throttle_percent": info["cpu-throttle-percentage"],
        }))
    }

    /// Through a second agent in B whose cache is seeded with the guest's images (the
    /// directory holding its kernel, initramfs and disk) and holds nothing else.
    fn seeded(&self, image: &GuestImage, i: usize) -> Result<Value> {
        if image.disk.is_none() {
            return Err(anyhow!(
                "the guest image has no disk.img to seed from (see its nodisk file; delete that and run scripts/guest-image.sh)"
            ));
        }
        let dir = image
            .kernel
            .parent()
            .ok_or_else(|| anyhow!("the guest kernel has no directory"))?;
        self.through_own_agent(image, i, "agent-seeded", 7902, Some(dir), &[])
    }

    /// [`Self::through_dwcp`] to an agent of its own in B: `name`, listening on `port` (its
    /// admin endpoint on the next port), its cache seeded with `seeds` when given.
    fn through_own_agent(
        &self,
        image: &GuestImage,
        i: usize,
        name: &str,
        port: u16,
        seeds: Option<&Path>,
        extra: &[&str],
    ) -> Result<Value> {
        let listen = format!("{}:{port}", self.tb.addr_b);
        let admin = format!("127.0.0.1:{}", port + 1);
        let t = Instant::now();
        let _agent = crate::bench::start_agent(
            self.tb,
            self.exe,
            self.work,
            self.certs,
            &crate::bench::AgentSpec {
                name,
                node_id: "bench-b",
                listen: &listen,
                admin: &admin,
                congestion: self.congestion,
                seeds,
            },
        )?;
        eprintln!(
            "QEMU: {name} up{} after {:.1} s",
            seeds.map_or_else(String::new, |d| format!(" ({} seeded)", d.display())),
            t.elapsed().as_secs_f64()
        );
        self.through_dwcp(image, i, &listen, name, extra)
    }

    /// `dwcp migrate --qemu-qmp` from A to the agent `agent` in B, listening on `listen`.
    fn through_dwcp(
        &self,
        image: &GuestImage,
        i: usize,
        listen: &str,
        agent: &str,
        extra: &[&str],
    ) -> Result<Value> {
        let vm = "vmq";
        let qemu_dir = qemu_dir(self.work, agent);
        let mut l = self.dest_launch(i);
        l.incoming = Some(format!(
            "unix:{}",
            qemu_dir.join(format!("{vm}.incoming")).display()
        ));
        l.qmp.push(qemu_dir.join(format!("{vm}.qmp")));
        let _dst = QemuProcess::spawn(image, &l)?;
        let mut m = self.tb.cmd_a(self.exe);
        m.args(["migrate", "--to", listen, "--node-id", "bench-a"])
            .args(["--expect-node", "bench-b", "--json", "--name", vm])
            .arg("--qemu-qmp")
            .arg(self.work.join("qemu-src.qmp"))
            .arg("--certs-dir")
            .arg(self.certs)
            .args(extra)
            .env("DWCP_TRANSPORT__CONGESTION", self.congestion)
            .env(
                "DWCP_LOG__LEVEL",
                "warn,dwcp_migration=debug,dwcp_transport::session::tunnel=debug",
            );
        if let crate::cli::CodecChoice::Fixed(c) = self.codec {
            m.args(["--codec", &c.to_string()]);
        }
        if let Some(r) = self.tb.profile.rate_bps {
            m.args(["--link-rate", &format!("{}", r / 8)]);
        }
        let (mut child, out, err) =
            crate::bench::spawn_logged(m, self.work, &format!("migrate-qemu-{i}"))?;
        let cut = (agent == "agent-cold-outage").then(|| {
            let (ns, to) = (self.tb.ns_a.clone(), self.tb.addr_b.to_string());
            std::thread::spawn(move || outage(&ns, &to))
        });
        let status = crate::bench::wait_bounded(
            &mut child,
            Duration::from_secs(900),
            "dwcp migrate --qemu-qmp",
        )?;
        if let Some(t) = cut {
            let _ = t.join();
        }
        crate::bench::keep_log(&err, &format!("migrate-qemu-{i}.log"));
        let mut report: Value = serde_json::from_slice(&std::fs::read(&out)?).unwrap_or_else(|_| {
            json!({"result": "failed", "error": std::fs::read_to_string(&err).unwrap_or_default().trim().to_string()})
        });
        // The command's own verdict: a report that says migrated from a command that failed
        // is not taken at its word.
        report["exit"] = json!(status.code());
        if report["result"] == "migrated" && !status.success() {
            report["result"] = json!("failed");
            let said = report["error"].as_str().unwrap_or("").to_string();
            report["error"] = json!(format!("dwcp migrate exited with {status}; {said}"));
        }
        // Without a cut (a kernel whose `ss -K` destroys nothing: no
        // CONFIG_INET_DIAG_DESTROY), the case measured nothing of what it is for.
        if agent == "agent-cold-outage"
            && report["result"] == "migrated"
            && report["tunnel_reconnects"].as_u64().unwrap_or(0) == 0
        {
            report["result"] = json!("failed");
            report["error"] = json!(
                "the link was not cut: no tunnel connection was lost (does `ss -K` work here? \
                 it needs CONFIG_INET_DIAG_DESTROY)"
            );
        }
        Ok(report)
    }
}

/// When the `cold-outage` case cuts the link, from the start of `dwcp migrate`, and for how
/// long.
const OUTAGE_AT: Duration = Duration::from_secs(5);
const OUTAGE_FOR: Duration = Duration::from_secs(5);

/// The `cold-outage` case's cut: from [`OUTAGE_AT`] on, for [`OUTAGE_FOR`], every TCP
/// connection from namespace `ns` to `to` is reset (`ss -K`, which sends the peer a reset)
/// every 50 ms, new ones included: a link whose state was lost (a NAT or a firewall that
/// restarted), on which nothing gets through until it is back.
fn outage(ns: &str, to: &str) {
    std::thread::sleep(OUTAGE_AT);
    eprintln!("QEMU: the link is cut for {OUTAGE_FOR:?}");
    let t = Instant::now();
    let mut said = false;
    while t.elapsed() < OUTAGE_FOR {
        match std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-K", "dst", to])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) if !said => {
                said = true;
                eprintln!(
                    "QEMU: ss -K failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Err(e) if !said => {
                said = true;
                eprintln!("QEMU: cannot run ss -K: {e}");
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("QEMU: the link is back");
}

/// Prints the QEMU rows and the ratios to QEMU's best native setting.
pub(crate) fn print_rows(rows: &[Value], mem_mib: u64) {
    outln!("QEMU guest, {mem_mib} MiB (TCG), same link, one run:");
    outln!(
        "{:<24} {:>12} {:>9} {:>13} {:>12} {:>9} {:>7} {:>9} {:>12}",
        "case",
        "result",
        "total s",
        "paused ms*",
        "QEMU says",
        "wire MB",
        "rounds",
        "throttle",
        "vs best nat."
    );
    let best = rows
        .iter()
        .filter(|r| {
            r["case"].as_str().is_some_and(|c| c.starts_with("native"))
                && r["report"]["result"] == "migrated"
        })
        .filter_map(|r| r["report"]["total_seconds"].as_f64())
        .fold(None, |b: Option<f64>, t| Some(b.map_or(t, |b| b.min(t))));
    for r in rows {
        let rep = &r["report"];
        let total = rep["total_seconds"].as_f64();
        let f = |v: &Value, scale: f64, prec: usize| {
            v.as_f64()
                .map_or_else(|| "-".to_string(), |x| format!("{:.prec$}", x / scale))
        };
        outln!(
            "{:<24} {:>12} {:>9} {:>13} {:>12} {:>9} {:>7} {:>9} {:>12}",
            r["case"].as_str().unwrap_or(""),
            rep["result"].as_str().unwrap_or("?"),
            f(&rep["total_seconds"], 1.0, 1),
            f(&rep["downtime_ms"], 1.0, 0),
            f(&rep["qemu_downtime_ms"], 1.0, 0),
            f(&rep["wire_bytes"], 1e6, 1),
            rep["rounds"].as_u64().map_or("-".into(), |x| x.to_string()),
            rep["throttle_percent"]
                .as_u64()
                .map_or("-".into(), |x| format!("{x} %")),
            match (total, best) {
                (Some(t), Some(b)) if rep["result"] == "migrated" => format!("{:.2}x", t / b),
                _ => "-".into(),
            }
        );
        if let Some(e) = rep["error"].as_str() {
            outln!("    why: {}", e.chars().take(300).collect::<String>());
        }
        if rep["tunnel_reconnects"].as_u64().is_some_and(|n| n > 0) {
            outln!(
                "    {} tunnel connections opened again after they were lost",
                rep["tunnel_reconnects"]
            );
        }
        if rep["postcopy"] == true {
            outln!(
                "    post-copy: the guest ran at the destination for {} s before the rest of its memory was in; {} pages asked for out of turn",
                f(&rep["postcopy_seconds"], 1.0, 1),
                rep["postcopy_requests"]
            );
        }
    }
    outln!("  * end to end: source STOP -> destination RESUME (QEMU's timestamps)");
    if rows
        .iter()
        .any(|r| r["case"].as_str().is_some_and(|c| c.contains("multifd")))
    {
        outln!("  native multifd's wire MB is QEMU's count of pages, before zstd");
    }
    // Said by `dwcp migrate` about the source QEMU: they hold for the native cases as well.
    let mut warnings: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["report"]["warnings"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    warnings.sort_unstable();
    warnings.dedup();
    for w in warnings {
        outln!("  warning (every case, native too): {w}");
    }
}

/// Where the QEMUs of the destination agent `agent` wait.
pub(crate) fn qemu_dir(work: &Path, agent: &str) -> PathBuf {
    work.join(format!("{agent}-qemu"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_cases_are_checked() {
        assert_eq!(
            parse_cases(" cold, seeded ,warm").unwrap(),
            ["cold", "seeded", "warm"]
        );
        assert!(parse_cases("").unwrap().is_empty());
        let e = parse_cases("cold,hot").unwrap_err();
        assert!(e.contains("\"hot\"") && e.contains("seeded"), "{e}");
    }
}
