//! The commands: raw arguments → validated settings → library calls.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use dwcp_agent::Agent;
use dwcp_control::{Config, DEFAULT_TOML, Settings};
use dwcp_transport::pki::{self, NodeCredentials};
use dwcp_transport::{Connection, Endpoint, TlsConfigs, connect, connect_to};
use dwcp_wire::{Capabilities, ClusterId, ErrorCode, NodeId};
use rustls::pki_types::UnixTime;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{
    CertsCommand, Cli, Command, ConfigCommand, DemoArgs, LogFormat, NodeArgs, PingArgs, RecvArgs,
    SendArgs,
};

/// A problem with what the user asked for that clap cannot see (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

pub(crate) fn run(cli: Cli) -> Result<()> {
    let Cli {
        command,
        log_format,
        log_level,
    } = cli;
    let logs = |cfg: Option<&Config>, default_level: &str| -> Result<()> {
        let format = match (log_format, cfg.map(|c| c.log.format.as_str())) {
            (Some(f), _) => f,
            (None, Some("json")) => LogFormat::Json,
            _ => LogFormat::Text,
        };
        let level = log_level
            .clone()
            .or_else(|| cfg.map(|c| c.log.level.clone()).filter(|l| !l.is_empty()))
            .unwrap_or_else(|| default_level.into());
        init_logging(format, &level)
    };
    // Validate first, so that a bad log.level is reported with every other bad setting.
    let settings_and_logs = |cfg: &Config, default_level: &str| -> Result<Settings> {
        let settings = validate(cfg)?;
        logs(Some(cfg), default_level)?;
        Ok(settings)
    };
    match command {
        Command::Agent(args) => {
            let cfg = node_config(&args.node, |c| {
                if let Some(l) = &args.listen {
                    c.agent.listen.clone_from(l);
                }
                if let Some(l) = &args.admin_listen {
                    c.agent.admin_listen.clone_from(l);
                }
                if let Some(d) = &args.spool_dir {
                    c.agent.spool_dir.clone_from(d);
                }
                if let Some(d) = &args.cache_dir {
                    c.encoding.cache_dir.clone_from(d);
                }
            })?;
            agent(&settings_and_logs(&cfg, "info")?)
        }
        Command::Ping(args) => {
            let cfg = node_config(&args.node, |_| {})?;
            ping(&settings_and_logs(&cfg, "info")?, &args)
        }
        Command::Send(args) => {
            let cfg = node_config(&args.node, |_| {})?;
            // Progress bar or JSON on the terminal: only trouble is logged by default.
            send(&settings_and_logs(&cfg, "warn")?, &args)
        }
        Command::Recv(args) => {
            let cfg = node_config(&args.node, |c| {
                if args.no_delta {
                    c.encoding.delta = false;
                }
            })?;
            recv(&settings_and_logs(&cfg, "info")?, &args)
        }
        Command::Certs(c) => {
            logs(None, "info")?;
            certs(c)
        }
        Command::Config(c) => config(c),
        Command::Bench(crate::cli::BenchCommand::Transport(args)) => {
            logs(None, "warn")?;
            crate::bench::transport(&args)
        }
        Command::Bench(crate::cli::BenchCommand::Migration(args)) => {
            logs(None, "warn")?;
            crate::bench::migration(&args)
        }
        Command::Bench(crate::cli::BenchCommand::Guest(args)) => {
            logs(None, "warn")?;
            crate::bench_guest::run(&args)
        }
        Command::Bench(crate::cli::BenchCommand::Encoding(args)) => {
            logs(None, "warn")?;
            crate::bench_encoding::run(&args)
        }
        Command::Testbed(args) => {
            logs(None, "warn")?;
            crate::testbed_cmd::run(&args)
        }
        Command::Migrate(args) => {
            let cfg = node_config(&args.node, |_| {})?;
            let settings = settings_and_logs(&cfg, "warn")?;
            crate::migrate::run(&settings, &args)
        }
        Command::Demo(args) => {
            // The demo prints its own report; agent chatter would drown it.
            logs(None, "error")?;
            demo(&args)
        }
    }
}

fn init_logging(format: LogFormat, level: &str) -> Result<()> {
    let filter: Targets = dwcp_control::normalize_log_level(level)
        .parse()
        .map_err(|e| UsageError(format!("bad log level {level:?}: {e}")))?;
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json()).try_init(),
    }
    .map_err(|e| anyhow!("cannot install the logger: {e}"))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs `fut` on a new runtime, then leaves at most 2 s to what is still on its blocking
/// pool (an object being verified, a VM being generated after a signal): a runtime dropped
/// waits for it, for minutes.
fn block_on_bounded<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = runtime()?;
    let r = rt.block_on(fut);
    rt.shutdown_timeout(Duration::from_secs(2));
    r
}

/// Longest configuration file read (the default one is about 4 KB).
const CONFIG_MOST: u64 = 1 << 20;

/// `path`'s text, refused beyond [`CONFIG_MOST`] (`--config /dev/zero` must not fill memory).
fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(CONFIG_MOST + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > CONFIG_MOST {
        return Err(std::io::Error::other(format!(
            "longer than {CONFIG_MOST} bytes: not a configuration file"
        )));
    }
    Ok(text)
}

/// Defaults, then the file, then `DWCP_*` variables.
fn load_config(path: Option<&Path>) -> Result<Config> {
    let text = match path {
        Some(p) => read_config_file(p)
            .with_context(|| format!("cannot read configuration file {}", p.display()))?,
        None => String::new(),
    };
    let name = path.map_or_else(|| "configuration".into(), |p| p.display().to_string());
    Config::from_toml(&text, dwcp_env()?).with_context(|| format!("{name} is invalid"))
}

/// The `DWCP_*` environment variables. `std::env::vars` would panic on a variable that is not
/// UTF-8; ours must be UTF-8, anybody else's is none of our business.
fn dwcp_env() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in std::env::vars_os() {
        // Settings only (`DWCP_SECTION__KEY`): others, such as DWCP_GUEST_DIR, may be any
        // path.
        let Some(k) = k.to_str().filter(|k| {
            k.strip_prefix(dwcp_control::ENV_PREFIX)
                .is_some_and(|rest| rest.contains("__"))
        }) else {
            continue;
        };
        let v = v
            .into_string()
            .map_err(|_| UsageError(format!("environment variable {k} is not valid UTF-8")))?;
        out.push((k.to_string(), v));
    }
    Ok(out)
}

/// Loads the configuration and applies the node flags and `extra` overrides.
fn node_config(args: &NodeArgs, extra: impl FnOnce(&mut Config)) -> Result<Config> {
    let mut cfg = load_config(args.config.as_deref())?;
    if let Some(d) = &args.certs_dir {
        cfg.node.certs_dir.clone_from(d);
    }
    if let Some(id) = &args.node_id {
        cfg.node.id.clone_from(id);
    }
    extra(&mut cfg);
    Ok(cfg)
}

fn validate(cfg: &Config) -> Result<Settings> {
    cfg.validate().context("invalid configuration")
}

/// The node id: from flags/config, else the host name.
fn node_id(settings: &Settings) -> Result<NodeId> {
    if let Some(id) = &settings.node_id {
        return Ok(id.clone());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    NodeId::new(host.as_str()).map_err(|e| {
        UsageError(format!(
            "no node id given and the host name {host:?} is not usable as one ({e}); \
             pass --node-id or set node.id"
        ))
        .into()
    })
}

/// Loads and checks this node's certificates, returning them with TLS configurations.
fn credentials(settings: &Settings, id: &NodeId) -> Result<(NodeCredentials, TlsConfigs)> {
    let creds = NodeCredentials::load(&settings.certs_dir, id).with_context(|| {
        format!(
            "cannot load the certificates of node {id} from {} (made by `dwcp certs issue --dir {} --node {id}`)",
            settings.certs_dir.display(),
            settings.certs_dir.display()
        )
    })?;
    creds.check_validity(UnixTime::now())?;
    let tls = TlsConfigs::new(&creds)?;
    Ok((creds, tls))
}

/// This node's endpoint for talking to peers: id, checked certificates, TLS, protocol settings.
pub(crate) fn peer_endpoint(settings: &Settings) -> Result<Endpoint> {
    let id = node_id(settings)?;
    let (_creds, tls) = credentials(settings, &id)?;
    Ok(Endpoint::new(id, settings, tls))
}

/// The `--expect-node` flag, validated.
pub(crate) fn expected_node(flag: Option<&str>) -> Result<Option<NodeId>> {
    flag.map(NodeId::new)
        .transpose()
        .map_err(|e| UsageError(format!("--expect-node: {e}")).into())
}

/// Raises this process's limit on open files to the most it may have: an agent holds a
/// descriptor per connection and per pack of its baseline cache (a 200 GiB cache is some
/// 3,200 packs, over the usual soft limit of 1,024).
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    // No hard limit: a million is plenty.
    let most = l.maximum.unwrap_or(1 << 20);
    if l.current.is_some_and(|c| c < most) {
        let new = Rlimit {
            current: Some(most),
            maximum: l.maximum,
        };
        match setrlimit(Resource::Nofile, new) {
            Ok(()) => debug!(from = ?l.current, to = most, "open file limit raised"),
            Err(e) => warn!(limit = ?l.current, "cannot raise the open file limit: {e}"),
        }
    }
}

fn agent(settings: &Settings) -> Result<()> {
    raise_open_file_limit();
    let id = node_id(settings)?;
    let (creds, tls) = credentials(settings, &id)?;
    let not_after = creds.not_after()?;
    block_on_bounded(async {
        // Signal handlers go in before the agent reports ready, so that a SIGTERM arriving
        // right after /readyz turns 200 is a clean shutdown, not a kill.
        let shutdown = shutdown_signal()?;
        let agent = Agent::bind(id.clone(), settings, tls, not_after).await?;
        info!(
            node_id = %id,
            cluster_id = %settings.cluster_id,
            listen = %agent.local_addr(),
            admin = %agent.admin_addr(),
            versions = ?settings.versions.iter().map(|v| v.number()).collect::<Vec<_>>(),
            "starting agent"
        );
        agent.run(shutdown).await?;
        Ok(())
    })
}

/// Installs SIGTERM and SIGINT handlers now; the returned future completes on either.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    let mut stop = StopSignals::new()?;
    Ok(async move {
        match stop.next().await {
            130 => info!("SIGINT (ctrl-c) received"),
            _ => info!("SIGTERM received"),
        }
    })
}

/// SIGINT and SIGTERM, handled from creation on (they no longer end the process). Made
/// inside a Tokio runtime; polled on it.
pub(crate) struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// The next of either; the exit status a shell gives for it (130, 143).
    pub(crate) async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => 130,
            _ = self.term.recv() => 143,
        }
    }
}

/// An object `dwcp recv` failed or refused, and its sender does not send again; the exit code
/// follows the code its sender was told (no space, a refused name: 4; a second digest
/// mismatch: 7).
#[derive(Debug, thiserror::Error)]
#[error("receiving {name:?} failed: {reason}")]
pub(crate) struct ObjectFailed {
    name: String,
    pub(crate) code: ErrorCode,
    reason: String,
}

/// The sender of `dwcp recv`'s session gave it up (exit code 5, as a connection lost).
#[derive(Debug, thiserror::Error)]
#[error(
    "the sender gave the transfer up: {0} (what arrived is kept: the same `dwcp send` resumes it)"
)]
pub(crate) struct SenderGaveUp(String);

/// `dwcp recv`: the sender's connections all closed without a goodbye, and none came back
/// within `--wait-secs`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the sender went away: its connections closed without a goodbye and none came back \
     within {0} s (--wait-secs)"
)]
pub(crate) struct SenderGone(pub(crate) u64);

/// A peer name that does not resolve (exit code 5, like any unreachable peer).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ResolveError(String);

pub(crate) async fn resolve(peer: &str) -> Result<SocketAddr> {
    // A port missing or out of range is the command line's fault, not the network's:
    // `[::1]` and `host:99999` have a colon too.
    let port = peer
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && (!host.starts_with('[') || host.ends_with(']')))
        .map(|(_, p)| p);
    if port.is_none_or(|p| p.parse::<u16>().is_err()) {
        return Err(UsageError(format!(
            "peer {peer:?} has no port, or not one from 0 to 65535: expected HOST:PORT \
             ([IPv6]:PORT for an IPv6 address)"
        ))
        .into());
    }
    let mut addrs = tokio::net::lookup_host(peer)
        .await
        .map_err(|e| ResolveError(format!("cannot resolve peer {peer:?}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| ResolveError(format!("peer {peer:?} resolves to no address")).into())
}

fn caps_text(c: &Capabilities) -> String {
    format!(
        "max_streams {}, codecs [{}], quic {}, delta {}, max_frame_size {}",
        c.max_streams,
        c.codecs.join(","),
        if c.quic { "on" } else { "off" },
        if c.delta { "on" } else { "off" },
        c.max_frame_size
    )
}

fn caps_json(c: &Capabilities) -> serde_json::Value {
    json!({
        "max_streams": c.max_streams,
        "codecs": c.codecs,
        "quic": c.quic,
        "delta": c.delta,
        "max_frame_size": c.max_frame_size,
    })
}

/// Round-trip statistics in milliseconds.
#[derive(Debug)]
struct RttStats {
    min: f64,
    avg: f64,
    max: f64,
    mdev: f64,
    p50: f64,
    p99: f64,
}

fn stats(samples: &[Duration]) -> Option<RttStats> {
    if samples.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len() as f64;
    let avg = ms.iter().sum::<f64>() / n;
    let mdev = (ms.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n).sqrt();
    let pct = |p: f64| ms[(((ms.len() - 1) as f64) * p).round() as usize];
    Some(RttStats {
        min: ms[0],
        avg,
        max: ms[ms.len() - 1],
        mdev,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

fn ping(settings: &Settings, args: &PingArgs) -> Result<()> {
    let expect = expected_node(args.expect_node.as_deref())?;
    let endpoint = peer_endpoint(settings)?;
    runtime()?.block_on(async {
        let addr = resolve(&args.peer).await?;
        let started = Instant::now();
        let mut conn = connect_to(&endpoint, addr, expect.as_ref())
            .await
            .with_context(|| format!("cannot establish a DWCP session with {addr}"))?;
        let handshake = started.elapsed();
        let est = conn.established().clone();
        if !args.json {
            outln!(
                "connected to {} at {addr}: protocol {}, handshake (TCP + TLS 1.3 + DWCP) {:.2} ms",
                est.peer_node_id,
                est.version,
                handshake.as_secs_f64() * 1e3
            );
            outln!("  negotiated: {}", caps_text(&est.negotiated));
            outln!("  peer offers: {}", caps_text(&est.peer_capabilities));
        }
        let timeout = Duration::from_secs(args.timeout_secs);
        let mut rtts = Vec::new();
        for seq in 0..u64::from(args.count) {
            // Nobody reads what follows.
            if seq > 0 && crate::stdout_lost() {
                break;
            }
            if seq > 0 {
                tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
            }
            let rtt = conn
                .ping(seq, timeout)
                .await
                .with_context(|| format!("probe {seq} to {addr} failed"))?;
            if !args.json {
                outln!("  seq={seq} rtt={:.3} ms", rtt.as_secs_f64() * 1e3);
            }
            rtts.push(rtt);
        }
        conn.close(ErrorCode::NO_ERROR, "ping done").await;
        let s = stats(&rtts).ok_or_else(|| anyhow!("no probes sent"))?;
        if args.json {
            let out = json!({
                "peer": args.peer,
                "address": addr.to_string(),
                "peer_node_id": est.peer_node_id.to_string(),
                "version": est.version.number(),
                "handshake_ms": handshake.as_secs_f64() * 1e3,
                "negotiated": caps_json(&est.negotiated),
                "peer_capabilities": caps_json(&est.peer_capabilities),
                "probes": rtts.len(),
                "rtt_ms": {
                    "min": s.min, "avg": s.avg, "max": s.max, "mdev": s.mdev,
                    "samples": rtts.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                },
            });
            outln!("{out}");
        } else {
            outln!(
                "--- {}: {} probes, rtt min/avg/max/mdev = {:.3}/{:.3}/{:.3}/{:.3} ms",
                est.peer_node_id,
                rtts.len(),
                s.min,
                s.avg,
                s.max,
                s.mdev
            );
        }
        Ok(())
    })
}

fn send(settings: &Settings, args: &SendArgs) -> Result<()> {
    use dwcp_transport::session::{SendOptions, Source, send_files};
    let expect = expected_node(args.expect_node.as_deref())?;
    let sources = args
        .paths
        .iter()
        .map(|p| Source::file(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = std::collections::HashSet::new();
    for s in &sources {
        if !names.insert(s.name.as_str()) {
            return Err(UsageError(format!(
                "two files are named {:?}: names must differ",
                s.name
            ))
            .into());
        }
    }
    let endpoint = peer_endpoint(settings)?;
    let opts = SendOptions {
        streams: match args.streams {
            crate::cli::StreamsArg::Fixed(n) => n,
            crate::cli::StreamsArg::Auto => 8,
        },
        adaptive: args.streams == crate::cli::StreamsArg::Auto,
        mode: match args.mode {
            crate::cli::ModeArg::Auto => None,
            crate::cli::ModeArg::Datacenter => Some(dwcp_transport::session::Mode::Datacenter),
            crate::cli::ModeArg::Internet => Some(dwcp_transport::session::Mode::Internet),
        },
        min_streams: settings.min_streams,
        max_streams: settings.capabilities.max_streams,
        retry_for: Duration::from_secs(args.retry_secs),
        // 0: no cap.
        rate_limit: args.rate_limit.filter(|&r| r > 0),
        carrier: args.transport,
        delta: dwcp_transport::session::DeltaOptions {
            enabled: !args.no_delta,
            layout: match args.layout {
                crate::cli::LayoutArg::Auto => dwcp_transport::session::Layout::Auto,
                crate::cli::LayoutArg::Pages => dwcp_transport::session::Layout::Pages,
                crate::cli::LayoutArg::Stream => dwcp_transport::session::Layout::Stream,
            },
            codec: match args.codec {
                crate::cli::CodecChoice::Auto => None,
                crate::cli::CodecChoice::Fixed(c) => Some(c),
            },
            link_bps: args
                .link_rate
                .or(args.rate_limit.filter(|&r| r > 0))
                .unwrap_or(dwcp_transport::session::DEFAULT_LINK_BPS),
            ..Default::default()
        },
        ..SendOptions::default()
    };
    if args.layout == crate::cli::LayoutArg::Pages
        && let Some(s) = sources.iter().find(|s| s.size % 4096 != 0)
    {
        return Err(UsageError(format!(
            "--layout pages: {} is {} bytes, not a whole number of 4096-byte pages",
            s.path.display(),
            s.size
        ))
        .into());
    }
    let total: u64 = sources.iter().map(|s| s.size).sum();
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:24!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .map_err(|e| anyhow!("progress bar template: {e}"))?
            .progress_chars("=> "),
        );
        bar
    };
    let report = runtime()?.block_on(async {
        let addr = resolve(&args.to).await?;
        let mut progress = |p: &dwcp_transport::session::Progress| {
            bar.set_position(p.total_acked);
            let rtt = p.link.rtt.map_or_else(String::new, |r| {
                format!(", RTT {:.0} ms", r.as_secs_f64() * 1e3)
            });
            let retrans = p
                .link
                .tcp
                .and_then(|t| t.retransmit_ratio())
                .map_or_else(String::new, |r| format!(", {:.2} % retrans", r * 100.0));
            bar.set_message(format!("{} ({} streams{rtt}{retrans})", p.name, p.streams));
        };
        send_files(
            &endpoint,
            addr,
            expect.as_ref(),
            &sources,
            &opts,
            &mut progress,
        )
        .await
        .with_context(|| format!("transfer to {addr} failed"))
    })?;
    bar.finish_and_clear();
    let goodput = total as f64 * 8.0 / report.seconds.max(1e-9) / 1e6;
    let tcp = report.link.tcp;
    // What TCP sent again below the session, by the kernel's count. Not quinn's lost
    // packets on QUIC: on the testbed they ran about nine times the packets really dropped.
    let retransmits = tcp.map(|t| t.retransmits);
    let delta_json = |d: &dwcp_transport::session::DeltaReport| {
        json!({
            "layout": d.layout, "bytes": d.raw_bytes, "bytes_on_wire": d.encoded_bytes,
            "saved": {
                "zero": d.saved_zero, "same": d.saved_same, "dup": d.saved_dup,
                "cache": d.saved_cache, "delta": d.saved_delta, "compression": d.saved_compression,
            },
            "receiver_cache_entries": d.receiver_cache_entries, "cold_retry": d.cold_retry,
            "codec": d.codec, "codec_changes": d.codec_changes,
        })
    };
    let on_wire: u64 = report
        .objects
        .iter()
        .map(|o| o.delta.as_ref().map_or(o.size, |d| d.encoded_bytes))
        .sum();
    if args.json {
        let out = json!({
            "bytes": total,
            "bytes_on_wire": on_wire,
            "bytes_sent": report.bytes_sent,
            "resent_bytes": report.resent_bytes,
            "seconds": report.seconds,
            "goodput_mbit_s": goodput,
            "retransmits": retransmits,
            "transport": report.carrier.map(|c| c.to_string()),
            "link": {
                "heartbeats": report.link.heartbeats,
                "rtt_ms_min": report.link.rtt_min.map(|r| r.as_secs_f64() * 1e3),
                "rtt_ms_mean": report.link.rtt_mean.map(|r| r.as_secs_f64() * 1e3),
                "rtt_ms_max": report.link.rtt_max.map(|r| r.as_secs_f64() * 1e3),
                "rtt_ms_last": report.link.rtt.map(|r| r.as_secs_f64() * 1e3),
                "goodput_mbit_s_last": report.link.goodput_bps * 8e-6,
                "quic_lost_packets": report.link.lost_packets,
                "quic_congestion_events": report.link.congestion_events,
                "tcp_retransmits": tcp.map(|t| t.retransmits),
                "tcp_retransmitted_bytes": tcp.map(|t| t.retransmitted_bytes),
                "tcp_segments_sent": tcp.map(|t| t.segments_sent),
                "tcp_bytes_sent": tcp.map(|t| t.bytes_sent),
                "tcp_retransmit_percent": tcp.and_then(|t| t.retransmit_ratio()).map(|r| r * 100.0),
                "tcp_stream_seconds": tcp.map(|t| t.open.as_secs_f64()),
                "tcp_busy_stream_seconds": tcp.map(|t| t.busy.as_secs_f64()),
                "tcp_rwnd_limited_stream_seconds": tcp.map(|t| t.rwnd_limited.as_secs_f64()),
                "tcp_sndbuf_limited_stream_seconds": tcp.map(|t| t.sndbuf_limited.as_secs_f64()),
            },
            "streams": report.streams,
            "streams_final": report.streams_final,
            "streams_added": report.streams_added,
            "streams_retired": report.streams_retired,
            "streams_stuck": report.streams_stuck,
            "mode": report.mode.map(|(m, _)| format!("{m:?}").to_lowercase()),
            "rtt_ms": report.mode.map(|(_, r)| r.as_secs_f64() * 1e3),
            "streams_lost": report.streams_lost,
            "streams_replaced": report.streams_replaced,
            "reconnects": report.reconnects,
            "version": report.version.map(|v| v.number()),
            "files": report.objects.iter().map(|o| json!({
                "name": o.name, "size": o.size, "resumed_from": o.resumed_from,
                "seconds": o.seconds, "delta": o.delta.as_ref().map(delta_json),
            })).collect::<Vec<_>>(),
        });
        outln!("{out}");
    } else {
        for o in &report.objects {
            // Where the receiver's copy stood: in bytes of what crosses the wire, which for
            // a delta-encoded file is its encoding, not the file.
            let wire = o.delta.as_ref().map_or(o.size, |d| d.encoded_bytes);
            let resumed = match (&o.delta, o.resumed_from) {
                (_, 0) => String::new(),
                // Stored before (its verdict lost, or sent once more): only checked there.
                (_, r) if r == wire => ", already held whole by the receiver".to_string(),
                (Some(d), r) => format!(", resumed at {r} of {} encoded bytes", d.encoded_bytes),
                (None, r) => format!(", resumed at {r} bytes"),
            };
            let delta = o.delta.as_ref().map_or_else(String::new, |d| {
                format!(
                    ", {} on the wire ({:.1} %, HDE {}, {}{})",
                    d.encoded_bytes,
                    d.encoded_bytes as f64 / d.raw_bytes.max(1) as f64 * 100.0,
                    d.layout,
                    d.codec,
                    if d.cold_retry {
                        ", sent again without references"
                    } else {
                        ""
                    }
                )
            });
            outln!(
                "sent {} ({} bytes{delta}, verified{resumed})",
                o.name,
                o.size
            );
        }
        let below = match (tcp, report.link.lost_packets) {
            (Some(t), _) => format!(", TCP {t}"),
            (None, Some(lost)) => format!(", quinn declared {lost} packets lost"),
            (None, None) => String::new(),
        };
        outln!(
            "{} bytes in {:.2} s: {:.1} Mbit/s over {} {} streams ({} re-sent bytes, {} streams \
             lost and {} replaced, {} reconnects{below})",
            total,
            report.seconds,
            goodput,
            report.streams,
            report
                .carrier
                .map_or_else(|| "-".to_string(), |c| c.to_string().to_uppercase()),
            report.resent_bytes,
            report.streams_lost,
            report.streams_replaced,
            report.reconnects
        );
    }
    Ok(())
}

fn recv(settings: &Settings, args: &RecvArgs) -> Result<()> {
    raise_open_file_limit();
    use dwcp_transport::session::{Receiver, RecvEvent};
    let listen: SocketAddr = args
        .listen
        .parse()
        .map_err(|_| UsageError(format!("--listen {:?}: expected IP:PORT", args.listen)))?;
    // Apart, as the agent's spool and cache must be: a received file named like a pack
    // would replace it.
    if let Some(cache) = &args.cache_dir
        && dwcp_control::overlap(cache, &args.out)
    {
        return Err(UsageError(format!(
            "--cache-dir {} and --out {}: a directory apart from the other, not in it nor \
             holding it",
            cache.display(),
            args.out.display()
        ))
        .into());
    }
    let endpoint = std::sync::Arc::new(peer_endpoint(settings)?);
    let cache = if settings.capabilities.delta {
        let s = dwcp_control::CacheSettings {
            dir: args.cache_dir.clone(),
            seeds: args.seed.clone(),
            ..settings.cache.clone()
        };
        Some(dwcp_transport::session::open_cache(&s).with_context(|| {
            format!(
                "cannot open the baseline cache{}",
                args.cache_dir
                    .as_ref()
                    .map_or_else(String::new, |d| format!(" in {}", d.display()))
            )
        })?)
    } else {
        None
    };
    let receiver = Receiver::with_delta(
        &args.out,
        settings.idle_timeout,
        false,
        settings.capabilities.delta,
        cache,
    )
    .with_context(|| format!("cannot use {} as the output directory", args.out.display()))?;
    let stored = block_on_bounded(async {
        let mut signals = StopSignals::new()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| ResolveError(format!("cannot listen on {listen}: {e}")))?;
        // QUIC sessions on the same port (UDP), when transport.quic is on.
        let quic = if settings.capabilities.quic {
            let addr = listener.local_addr()?;
            Some(
                dwcp_transport::quic::QuicListener::bind(&endpoint, addr).map_err(|e| {
                    ResolveError(format!("cannot listen on {addr} (UDP, QUIC): {e}"))
                })?,
            )
        } else {
            None
        };
        info!(listen = %listener.local_addr()?, out = %args.out.display(), "waiting for a sender");
        let mut events = receiver.subscribe();
        let mut stored = Vec::new();
        let mut retried = std::collections::HashSet::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let _stop_on_exit = stop.clone().drop_guard();
        // A sender whose streams all closed without a goodbye (killed, its host down, the
        // link down longer than it retries) is waited for `--wait-secs`, then given up.
        let wait = Duration::from_secs(args.wait_secs);
        let mut quiet_since: Option<Instant> = None;
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        let outcome = async { loop {
            tokio::select! {
                code = signals.next() => {
                    return Err(crate::testbed_cmd::TestbedCommandEnded {
                        reason: "interrupted before a transfer completed".into(),
                        code: u8::try_from(code).unwrap_or(130),
                    }
                    .into());
                }
                _ = watch.tick() => {
                    let peers = receiver.peer_stats();
                    let open: u32 = peers.iter().map(|p| p.streams).sum();
                    if open > 0 || peers.is_empty() {
                        quiet_since = None;
                    } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= wait {
                        return Err(SenderGone(args.wait_secs).into());
                    }
                }
                ev = events.recv() => match ev {
                    Ok(RecvEvent::Stored { name, size, path, resumed_from, .. }) => {
                        stored.push((name, size, path, resumed_from));
                    }
                    Ok(RecvEvent::Failed { name, code, reason, .. }) => {
                        if sender_retries(code, &name, &mut retried) {
                            tracing::warn!(%name, "{reason}: the sender sends it again");
                            continue;
                        }
                        return Err(ObjectFailed { name, code, reason }.into());
                    }
                    Ok(RecvEvent::SessionDone { .. }) => return Ok(stored),
                    Ok(RecvEvent::SenderGaveUp { reason, .. }) => {
                        return Err(SenderGaveUp(reason).into());
                    }
                    Ok(_) => {}
                    // Events are per object: one missed is only a line less in the summary.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("{n} receiver events missed: the summary may lack files");
                    }
                    Err(e) => return Err(anyhow!("receiver event stream: {e}")),
                },
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        // Out of descriptors, say: the listener stays readable, so not at once.
                        Err(e) => {
                            tracing::warn!("cannot accept a connection: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = endpoint.socket.tune_accepted(&tcp);
                    let endpoint = endpoint.clone();
                    let receiver = receiver.clone();
                    let stop = stop.clone();
                    let idle = settings.idle_timeout;
                    tokio::spawn(async move {
                        match dwcp_transport::accept(&endpoint, tcp, peer).await {
                            Ok(conn) => recv_stream(conn, &receiver, &stop, idle).await,
                            Err(e) => tracing::warn!(%peer, "handshake failed: {e}"),
                        }
                    });
                }
                Some(incoming) = async { quic.as_ref()?.accept().await }, if quic.is_some() => {
                    let endpoint = endpoint.clone();
                    let receiver = receiver.clone();
                    let stop = stop.clone();
                    let idle = settings.idle_timeout;
                    tokio::spawn(async move {
                        let peer = incoming.remote_address();
                        let conn = match dwcp_transport::quic::accept_connection(&endpoint, incoming).await {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(%peer, "QUIC handshake failed: {e}");
                                return;
                            }
                        };
                        while let Some(io) = conn.next_stream().await {
                            let (endpoint, receiver, stop) = (endpoint.clone(), receiver.clone(), stop.clone());
                            let id = conn.node_id().clone();
                            tokio::spawn(async move {
                                match dwcp_transport::quic::accept_stream(&endpoint, io, id, peer).await {
                                    Ok(c) => recv_stream(c, &receiver, &stop, idle).await,
                                    Err(e) => tracing::warn!(%peer, "handshake failed: {e}"),
                                }
                            });
                        }
                    });
                }
            }
        } }
        .await;
        // Tell QUIC senders at once (CONNECTION_CLOSE): a process that just exits leaves them
        // waiting for their idle timeout.
        if let Some(q) = &quic {
            q.close().await;
        }
        outcome
    })?;
    if args.json {
        let files: Vec<_> = stored
            .iter()
            .map(|(n, s, p, r)| {
                json!({"name": n, "size": s, "path": p.to_string_lossy(), "resumed_from": r})
            })
            .collect();
        outln!("{}", json!({ "files": files }));
    } else {
        for (name, size, path, _) in &stored {
            outln!(
                "received {name} ({size} bytes, verified) -> {}",
                path.display()
            );
        }
    }
    Ok(())
}

/// Whether the sender of `name` sends it again after a failure with `code`, as `dwcp send`
/// does once: from the start after a digest mismatch (a resumed prefix that did not
/// survive), without references after one the receiver could not resolve.
fn sender_retries(
    code: ErrorCode,
    name: &str,
    retried: &mut std::collections::HashSet<(String, ErrorCode)>,
) -> bool {
    matches!(
        code,
        ErrorCode::CHECKSUM_MISMATCH | ErrorCode::DELTA_UNRESOLVED
    ) && retried.insert((name.to_string(), code))
}

/// Serves one stream of `dwcp recv`: its first frame must open a transfer session.
async fn recv_stream<T>(
    conn: dwcp_transport::Framed<T>,
    receiver: &dwcp_transport::session::Receiver,
    stop: &tokio_util::sync::CancellationToken,
    idle: Duration,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let peer = conn.peer_addr();
    let peer_id = conn.established().peer_node_id.clone();
    let max_streams = conn.established().negotiated.max_streams;
    let (mut reader, mut writer) = conn.split();
    // A sender may probe the round trip before its session (a few PINGs at most).
    for _ in 0..8 {
        match tokio::time::timeout(idle, reader.recv()).await {
            Err(_) => return writer.close(ErrorCode::TIMEOUT, "no SESSION frame").await,
            Ok(Ok(Some(f))) if f.ty == dwcp_wire::FrameType::SESSION => {
                let served = receiver
                    .serve(peer_id, f, reader, writer, max_streams, stop)
                    .await;
                if let Err(e) = served {
                    tracing::warn!(%peer, "stream ended: {e}");
                }
                return;
            }
            Ok(Ok(Some(f))) if f.ty == dwcp_wire::FrameType::PING => {
                let pong = dwcp_wire::Frame {
                    ty: dwcp_wire::FrameType::PONG,
                    ..f
                };
                let sent = tokio::time::timeout(idle, writer.send(&pong)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return;
                }
            }
            Ok(Ok(Some(f))) if f.ty == dwcp_wire::FrameType::PONG || f.ty.is_extension() => {}
            Ok(Ok(None)) => return,
            Ok(Ok(Some(_))) => break,
            // Before its session a stream carries nothing to lose: a sender that gave up
            // drops its other streams here, and the session's outcome is reported anyway.
            Ok(Err(e)) => return tracing::debug!(%peer, "stream closed before its session: {e}"),
        }
    }
    writer
        .close(
            ErrorCode::UNEXPECTED_FRAME,
            "dwcp recv only takes transfer sessions",
        )
        .await;
}

fn certs(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init {
            dir,
            cluster_id,
            days,
            force,
        } => {
            let cluster = ClusterId::new(cluster_id.as_str())
                .map_err(|e| UsageError(format!("--cluster-id: {e}")))?;
            pki::init_ca(&dir, &cluster, days, force)?;
            outln!("created cluster CA for {cluster} (valid {days} days):");
            outln!(
                "  {}  certificate: copy to every node",
                pki::ca_cert_path(&dir).display()
            );
            outln!(
                "  {}  private key: keep it here, off the nodes",
                pki::ca_key_path(&dir).display()
            );
            outln!(
                "next: dwcp certs issue --dir {} --node NODE_ID",
                dir.display()
            );
            Ok(())
        }
        CertsCommand::Issue {
            dir,
            node,
            days,
            force,
        } => {
            let id = NodeId::new(node.as_str()).map_err(|e| UsageError(format!("--node: {e}")))?;
            let (cert, key) = pki::issue_node(&dir, &id, days, force)?;
            outln!("issued certificate for node {id} (valid {days} days):");
            outln!("  {}", cert.display());
            outln!("  {}", key.display());
            outln!(
                "run it with: dwcp agent --certs-dir {} --node-id {id}   (the node needs ca.pem and \
                 these two files in the same layout)",
                dir.display()
            );
            Ok(())
        }
    }
}

fn config(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Check { file } => {
            let cfg = load_config(Some(&file))?;
            cfg.validate()
                .with_context(|| format!("{} is invalid", file.display()))?;
            outln!("{}: ok", file.display());
            Ok(())
        }
        ConfigCommand::Default => {
            outln!("{}", DEFAULT_TOML.trim_end_matches('\n'));
            Ok(())
        }
        ConfigCommand::Show { file } => {
            let cfg = load_config(file.as_deref())?;
            outln!("{}", cfg.to_toml().trim_end_matches('\n'));
            cfg.validate()
                .context("(the configuration above is invalid)")?;
            Ok(())
        }
    }
}

/// A minimal HTTP/1.1 GET against our own admin port, bounded to 5 s.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).to_string())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| anyhow!("GET {path} on {addr} timed out"))??;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .ok_or_else(|| anyhow!("malformed HTTP answer from {addr}"))?;
    Ok(body)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        // Not `.sum()`: an empty f64 sum is -0.0, which would print as "-0".
        .fold(0.0, |a, b| a + b)
}

struct DemoNode {
    addr: SocketAddr,
    admin: SocketAddr,
    endpoint: Endpoint,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::result::Result<(), dwcp_agent::AgentError>>,
}

async fn demo_node(dir: &Path, name: &str, versions: Vec<u32>) -> Result<DemoNode> {
    let mut cfg = Config::default();
    cfg.node.id = name.into();
    cfg.node.cluster_id = "demo".into();
    cfg.node.certs_dir = PathBuf::from(dir);
    cfg.agent.listen = "127.0.0.1:0".into();
    cfg.agent.admin_listen = "127.0.0.1:0".into();
    cfg.agent.shutdown_grace_secs = 2;
    cfg.agent.spool_dir = dir.join(format!("spool-{name}"));
    cfg.encoding.cache_dir = dir.join(format!("cache-{name}"));
    cfg.protocol.versions = versions;
    let settings = validate(&cfg)?;
    let id = node_id(&settings)?;
    pki::issue_node(dir, &id, 1, false)?;
    let (_, tls) = credentials(&settings, &id)?;
    let agent = Agent::bind(id.clone(), &settings, tls.clone(), i64::MAX).await?;
    let (addr, admin) = (agent.local_addr(), agent.admin_addr());
    let (stop, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(agent.run(async {
        let _ = rx.await;
    }));
    Ok(DemoNode {
        addr,
        admin,
        endpoint: Endpoint::new(id, &settings, tls),
        stop,
        task,
    })
}

async fn probe(conn: &mut Connection<TcpStream>, n: u32) -> Result<Vec<Duration>> {
    let mut v = Vec::new();
    for seq in 0..u64::from(n) {
        v.push(conn.ping(seq, Duration::from_secs(5)).await?);
    }
    Ok(v)
}

fn demo(args: &DemoArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    pki::init_ca(dir.path(), &ClusterId::new("demo")?, 1, false)?;
    let body = async {
        let all: Vec<u32> = dwcp_wire::Version::ALL.iter().map(|v| v.number()).collect();
        let a = demo_node(dir.path(), "node-a", all.clone()).await?;
        let b = demo_node(dir.path(), "node-b", all).await?;
        let legacy = demo_node(dir.path(), "node-legacy", vec![1]).await?;

        let t = Instant::now();
        let mut ab = connect(&a.endpoint, b.addr)
            .await
            .context("node-a -> node-b")?;
        let handshake = t.elapsed();
        let est = ab.established().clone();
        let rtts = probe(&mut ab, args.probes).await?;
        ab.close(ErrorCode::NO_ERROR, "demo done").await;

        let mut al = connect(&a.endpoint, legacy.addr)
            .await
            .context("node-a -> node-legacy")?;
        let legacy_version = al.established().version;
        probe(&mut al, 1).await?;
        al.close(ErrorCode::NO_ERROR, "demo done").await;

        // A node with a certificate from another CA must be turned away.
        let foreign_dir = tempfile::tempdir()?;
        pki::init_ca(foreign_dir.path(), &ClusterId::new("demo")?, 1, false)?;
        let mut fcfg = Config::default();
        fcfg.node.id = "intruder".into();
        fcfg.node.cluster_id = "demo".into();
        fcfg.node.certs_dir = foreign_dir.path().to_path_buf();
        let fset = validate(&fcfg)?;
        let fid = node_id(&fset)?;
        pki::issue_node(foreign_dir.path(), &fid, 1, false)?;
        let (_, ftls) = credentials(&fset, &fid)?;
        let refused = match connect(&Endpoint::new(fid, &fset, ftls), b.addr).await {
            Ok(_) => return Err(anyhow!("a foreign-CA node was accepted: this is a bug")),
            Err(e) => e.to_string(),
        };

        // The refused node's side returns as soon as it rejects; node-b counts its side of the
        // failure a moment later (on the TLS alert). Give it up to 2 s to show up.
        let mut metrics_b = http_get(b.admin, "/metrics").await?;
        for _ in 0..40 {
            if metric(&metrics_b, "dwcp_handshakes_total{result=\"failed\"") >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            metrics_b = http_get(b.admin, "/metrics").await?;
        }
        let ready_b = http_get(b.admin, "/readyz").await?;

        // The main job: live-migrate a generated VM from node-a to node-b.
        // Generated aside, so that a signal meanwhile is answered (a large VM takes minutes).
        let (vm_args, chatty) = (args.vm.clone(), !args.json);
        let crate::migrate::MadeVm { vm, shadow_bytes } =
            tokio::task::spawn_blocking(move || crate::migrate::make_vm(&vm_args, chatty))
                .await
                .context("generating the VM")??;
        let mut spec = dwcp_migration::MigrationSpec::new("demo-vm.mem");
        spec.shadow_bytes = shadow_bytes;
        // Its encoded parts in the demo's directory too, removed with it whatever happens.
        spec.scratch_dir = Some(dir.path().to_path_buf());
        let dest = dwcp_migration::Destination {
            endpoint: &a.endpoint,
            addr: b.addr,
            expected: None,
        };
        let migration = crate::migrate::run_with_progress(&vm, dest, &spec, !args.json).await;
        drop(vm);
        let metrics_b = http_get(b.admin, "/metrics").await?;

        let s = stats(&rtts).ok_or_else(|| anyhow!("no probes"))?;
        let ok = metric(&metrics_b, "dwcp_handshakes_total{result=\"ok\"");
        let failed = metric(&metrics_b, "dwcp_handshakes_total{result=\"failed\"");
        let bytes_in = metric(&metrics_b, "dwcp_bytes_received_total");
        let bytes_out = metric(&metrics_b, "dwcp_bytes_sent_total");
        if args.json {
            outln!(
                "{}",
                json!({
                    "handshake_ms": handshake.as_secs_f64() * 1e3,
                    "version": est.version.number(),
                    "negotiated": caps_json(&est.negotiated),
                    "probes": rtts.len(),
                    "rtt_ms": {"min": s.min, "avg": s.avg, "p50": s.p50, "p99": s.p99, "max": s.max},
                    "legacy_version": legacy_version.number(),
                    "foreign_ca_refused": refused,
                    "node_b": {"handshakes_ok": ok, "handshakes_failed": failed,
                               "bytes_received": bytes_in, "bytes_sent": bytes_out,
                               "readyz": ready_b.trim()},
                    "migration": crate::migrate::report_json(&migration),
                })
            );
        } else {
            outln!("DWCP demo: three agents on loopback, one throwaway cluster CA");
            outln!();
            outln!(
                "node-a -> node-b   protocol {}, handshake (TCP + mutual TLS 1.3 + DWCP) {:.2} ms",
                est.version,
                handshake.as_secs_f64() * 1e3
            );
            outln!(
                "                   negotiated: {}",
                caps_text(&est.negotiated)
            );
            outln!(
                "                   rtt over {} probes: min {:.3} / p50 {:.3} / avg {:.3} / p99 {:.3} / max {:.3} ms",
                rtts.len(),
                s.min,
                s.p50,
                s.avg,
                s.p99,
                s.max
            );
            outln!("node-a -> node-legacy (v1 only)   protocol {legacy_version}");
            outln!("foreign CA -> node-b   refused: {refused}");
            outln!(
                "node-b /readyz: {}; /metrics: {ok} handshakes ok, {failed} failed, {bytes_in} bytes in, {bytes_out} bytes out",
                ready_b.trim()
            );
            outln!();
            crate::migrate::print_report(&migration, "node-a", "node-b");
        }
        // After the report: an agent slow to stop does not take it with it.
        for n in [a, b, legacy] {
            let _ = n.stop.send(());
            match tokio::time::timeout(Duration::from_secs(10), n.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("a demo agent stopped with an error: {e:#}"),
                Ok(Err(e)) => tracing::warn!("a demo agent's task failed: {e}"),
                Err(_) => tracing::warn!("a demo agent did not stop within 10 s"),
            }
        }
        crate::migrate::outcome(&migration)
    };
    block_on_bounded(async {
        // Ctrl-C or SIGTERM: the nodes stop and the demo's directory (keys, the VM's 1 GiB
        // copy at the destination, caches) is removed on the way out, not left in TMPDIR.
        let mut signals = StopSignals::new()?;
        tokio::select! {
            r = body => r,
            code = signals.next() => {
                eprintln!("\ninterrupted: stopping the demo and removing its files");
                Err(crate::testbed_cmd::TestbedCommandEnded {
                    reason: "the demo was interrupted".into(),
                    code: u8::try_from(code).unwrap_or(130),
                }
                .into())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_with_spaces_log_as_written() {
        let t: Targets = dwcp_control::normalize_log_level("info ").parse().unwrap();
        assert_eq!(
            t.default_level(),
            Some(tracing_subscriber::filter::LevelFilter::INFO)
        );
        let t: Targets = dwcp_control::normalize_log_level("dwcp_agent=debug ")
            .parse()
            .unwrap();
        assert_eq!(t.default_level(), None);
    }

    #[test]
    fn recv_waits_for_the_one_retry_a_sender_makes() {
        let mut seen = std::collections::HashSet::new();
        for code in [ErrorCode::CHECKSUM_MISMATCH, ErrorCode::DELTA_UNRESOLVED] {
            assert!(sender_retries(code, "a", &mut seen), "{code:?}: first");
            assert!(!sender_retries(code, "a", &mut seen), "{code:?}: second");
            assert!(
                sender_retries(code, "b", &mut seen),
                "{code:?}: another file"
            );
        }
        assert!(!sender_retries(ErrorCode::STORAGE_ERROR, "c", &mut seen));
    }

    #[test]
    fn stats_of_samples() {
        let s = stats(&[
            Duration::from_millis(1),
            Duration::from_millis(3),
            Duration::from_millis(2),
        ])
        .unwrap();
        assert_eq!((s.min, s.p50, s.max), (1.0, 2.0, 3.0));
        assert!((s.avg - 2.0).abs() < 1e-9);
        assert!(stats(&[]).is_none());
    }

    #[test]
    fn metric_sums_matching_series() {
        let text = "# HELP x\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\ny 9\n";
        assert_eq!(metric(text, "x_total{"), 5.0);
        assert_eq!(metric(text, "y"), 9.0);
    }
}
