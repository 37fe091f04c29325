//! Command-line arguments (raw). `main` turns them into validated settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
Quick start (one machine: an agent and a ping):
  dwcp certs init  --dir ./certs
  dwcp certs issue --dir ./certs --node node-a
  dwcp certs issue --dir ./certs --node node-b
  dwcp agent --certs-dir ./certs --node-id node-a --listen 127.0.0.1:7700 --admin-listen 127.0.0.1:7701 \\
             --spool-dir ./spool-a --cache-dir ./cache-a &
  dwcp ping 127.0.0.1:7700 --certs-dir ./certs --node-id node-b

Exit codes: 0 ok, 1 internal error, 2 bad command line, 3 invalid configuration,
4 certificate or file problem, 5 network (unreachable, timeout, connection lost),
6 authentication (certificate refused, identity mismatch), 7 protocol (peer incompatible or
misbehaving), 8 migration not completed (the VM is at the source as before), 9 migration not
completed and the source left paused (check the destination); 130 or 143 when a second
SIGINT or SIGTERM ends `dwcp migrate` at once (the first one, `dwcp demo`, `dwcp recv`); 141
when standard output was closed by its reader. `dwcp testbed --in-a` passes on
its command's status. Docs: README.md, docs/CONFIG.md, docs/OPERATIONS.md,
docs/PROTOCOL.md.";

/// DWCP moves VM state between hypervisor hosts over mutual TLS, and keeps a cluster of them
/// consistent.
#[derive(Debug, Parser)]
#[command(name = "dwcp", version = long_version(), after_help = AFTER_HELP)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,

    /// Log line format on standard error [default: from the config file, else text].
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<LogFormat>,

    /// Log level or directives, e.g. `debug` or `info,dwcp_agent=debug` [default: from the
    /// config file, else the command's own: see docs/CONFIG.md, `log.level`].
    #[arg(long, global = true, value_parser = parse_log_level)]
    pub(crate) log_level: Option<String>,
}

/// A `--log-level` checked as `log.level` is: a word that is not a level would otherwise
/// be taken for a target's name, and every log line silenced.
fn parse_log_level(s: &str) -> Result<String, String> {
    dwcp_control::check_log_level(s)?;
    Ok(s.to_string())
}

fn long_version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (wire protocol v1, v3, v4, v5, v6)"
    )
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the node agent: accept peers, answer handshakes and pings, serve /healthz, /readyz
    /// and /metrics. Stops cleanly on SIGTERM or ctrl-c.
    Agent(AgentArgs),
    /// Connect to a peer (mutual TLS + handshake), show the negotiated version and
    /// capabilities, and measure the round-trip time over a number of probes.
    Ping(PingArgs),
    /// Send files to a node (an agent's spool or `dwcp recv`) over a multi-stream session:
    /// striped over parallel TLS connections, verified end to end (BLAKE3), resumed after
    /// interruptions.
    Send(SendArgs),
    /// Live-migrate a VM to a destination agent: pre-copy rounds encoded with HDE, stop and
    /// copy within the downtime budget, commit, verify; rolls back on any failure. Backends:
    /// a generated memory image under a dirtying workload, or a running QEMU (--qemu-qmp),
    /// whose migration stream is carried to the destination agent's QEMU.
    Migrate(MigrateArgs),
    /// Receive one transfer session into a directory, then exit.
    Recv(RecvArgs),
    /// Create a cluster CA and node certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Check or print configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Benchmarks on the WAN testbed (root).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build the WAN testbed (two network namespaces joined by a delay, loss and rate
    /// emulator; root), run a command in each, and tear it down when the one in A ends, on
    /// ctrl-c or SIGTERM, or after --seconds. Without --in-a it stays up for commands of your
    /// own: `ip netns exec` into the namespaces it prints.
    Testbed(TestbedArgs),
    /// Start agents on loopback with throwaway certificates (every version, v1-only, and a node
    /// of a foreign CA), connect them, measure, and print a report. Needs no root and no setup.
    Demo(DemoArgs),
}

/// Flags shared by every command that talks to peers.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    /// Configuration file (TOML) [default: built-in defaults; see `dwcp config default`].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Certificate directory made by `dwcp certs` (overrides node.certs_dir).
    #[arg(long, value_name = "DIR")]
    pub(crate) certs_dir: Option<PathBuf>,

    /// This node's id; its certificate is read from DIR/nodes/ID.pem (overrides node.id;
    /// default: the host name).
    #[arg(long, value_name = "ID")]
    pub(crate) node_id: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    pub(crate) node: NodeArgs,

    /// Address peers connect to (overrides agent.listen).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,

    /// Address of the admin HTTP server (overrides agent.admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub(crate) admin_listen: Option<String>,

    /// Where files sent to this node are stored (overrides agent.spool_dir).
    #[arg(long, value_name = "DIR")]
    pub(crate) spool_dir: Option<PathBuf>,

    /// Where the baseline cache persists (overrides encoding.cache_dir).
    #[arg(long, value_name = "DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct PingArgs {
    /// Peer address, HOST:PORT.
    #[arg(value_name = "PEER")]
    pub(crate) peer: String,

    #[command(flatten)]
    pub(crate) node: NodeArgs,

    /// Number of probes.
    #[arg(long, short = 'n', default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) count: u32,

    /// Milliseconds between probes.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub(crate) interval_ms: u64,

    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub(crate) timeout_secs: u64,

    /// Refuse the peer unless its certificate is for this node id (without it, any node of
    /// the cluster may answer at PEER).
    #[arg(long, value_name = "ID")]
    pub(crate) expect_node: Option<String>,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Files to send (regular files; each arrives under its file name).
    #[arg(value_name = "PATH", required = true)]
    pub(crate) paths: Vec<PathBuf>,

    /// Receiver address, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub(crate) to: String,

    #[command(flatten)]
    pub(crate) node: NodeArgs,

    /// Parallel TLS connections: a number (1..=512; the receiver may allow fewer, a v1 peer
    /// only 1), or auto: start from the mode's default (datacenter 64, internet 8) and follow
    /// goodput within transport.min_streams..=transport.max_streams.
    #[arg(long, default_value = "auto", value_parser = parse_streams)]
    pub(crate) streams: StreamsArg,

    /// The path's kind, for --streams auto (its starting count) and --transport auto (quic
    /// only across the internet): datacenter, internet, or auto (datacenter when the first
    /// round trip is under 10 ms). Without either auto it changes nothing.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub(crate) mode: ModeArg,

    /// Cap on the sending rate, e.g. 100M (bytes/s; suffixes K, M, G = 1000^n, Ki, Mi, Gi =
    /// 1024^n; append "bit" for bits/s, e.g. 800Mbit); at least 64Ki; 0 or none: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_cap)]
    pub(crate) rate_limit: Option<u64>,

    /// What the streams ride on: tcp (one TLS connection each), quic (streams of one QUIC
    /// connection, UDP to the same port; the receiver needs transport.quic = true), or auto:
    /// quic on an internet path (round trip >= 10 ms) when this kernel does not let TCP use
    /// BBR and the receiver offers QUIC, tcp otherwise.
    #[arg(long, value_name = "CARRIER", default_value = "auto")]
    pub(crate) transport: dwcp_transport::Carrier,

    /// Seconds to keep reconnecting and resuming after the connection breaks.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub(crate) retry_secs: u64,

    /// Refuse the receiver unless its certificate is for this node id.
    #[arg(long, value_name = "ID")]
    pub(crate) expect_node: Option<String>,

    /// Send files as they are, without delta encoding (HDE).
    #[arg(long)]
    pub(crate) no_delta: bool,

    /// How files are cut for delta encoding: pages (raw disk and memory images), stream
    /// (content-defined chunks), or auto (pages when the size is a whole number of 4 KiB pages).
    #[arg(long, value_enum, default_value_t = LayoutArg::Auto)]
    pub(crate) layout: LayoutArg,

    /// Compressor for what delta encoding leaves: auto (the codec chooser picks the fastest
    /// end to end for --link-rate, measured on a sample of each file on this machine), none,
    /// lz4, zstd:LEVEL (-7..=19).
    #[arg(long, value_name = "CODEC", default_value = "auto", value_parser = parse_codec, conflicts_with = "no_delta")]
    pub(crate) codec: CodecChoice,

    /// The link's bandwidth, for --codec auto [default: --rate-limit if given, else 1Gbit].
    #[arg(long, value_name = "RATE", value_parser = parse_rate, conflicts_with = "no_delta")]
    pub(crate) link_rate: Option<u64>,

    /// Print one JSON summary instead of a progress bar and text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `--streams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamsArg {
    /// Adaptive.
    Auto,
    /// Fixed.
    Fixed(u32),
}

fn parse_streams(s: &str) -> Result<StreamsArg, String> {
    if s == "auto" {
        return Ok(StreamsArg::Auto);
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=512).contains(&n) => Ok(StreamsArg::Fixed(n)),
        _ => Err(format!(
            "{s:?}: expected auto or a number of streams in 1..=512"
        )),
    }
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ModeArg {
    /// From the first round trip.
    Auto,
    /// Many streams.
    Datacenter,
    /// Fewer streams.
    Internet,
}

/// `--throttle-steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ThrottleStepsArg {
    /// From the dirty rate and the stream rate QEMU measured at its last round.
    Paced,
    /// QEMU's own: cpu-throttle-initial, then cpu-throttle-increment a step.
    Qemu,
}

/// `--layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LayoutArg {
    /// Pages when the file is a whole number of pages, else stream.
    Auto,
    /// Page-addressed.
    Pages,
    /// Content-defined chunks.
    Stream,
}

/// `--codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CodecChoice {
    /// The codec chooser decides.
    Auto,
    /// This one.
    Fixed(dwcp_encoding::Codec),
}

fn parse_codec(s: &str) -> Result<CodecChoice, String> {
    if s == "auto" {
        return Ok(CodecChoice::Auto);
    }
    s.parse()
        .map(CodecChoice::Fixed)
        .map_err(|e: dwcp_encoding::ParseCodecError| format!("{e}, or auto"))
}

#[derive(Debug, Args)]
pub(crate) struct RecvArgs {
    /// Address to listen on, IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: String,

    /// Directory to store the files in (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,

    #[command(flatten)]
    pub(crate) node: NodeArgs,

    /// Keep the baseline cache in DIR, so later transfers can refer to what this one brought
    /// [default: in memory, for this run only].
    #[arg(long, value_name = "DIR")]
    pub(crate) cache_dir: Option<PathBuf>,

    /// File or directory (a VM disk, base images) whose pages seed the baseline cache;
    /// repeatable.
    #[arg(long, value_name = "PATH")]
    pub(crate) seed: Vec<PathBuf>,

    /// Refuse delta-encoded transfers (senders then send files as they are).
    #[arg(long)]
    pub(crate) no_delta: bool,

    /// Seconds to wait for a sender whose connections all closed without a goodbye (it may
    /// reconnect and resume: `dwcp send --retry-secs`, 60 by default) before giving up,
    /// exit 5. The wait for a first sender is not bounded.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) wait_secs: u64,

    /// Print one JSON summary instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Parses a rate such as `100M`, `1.5Gi`, `800Mbit` into bytes per second.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    let bytes = parse_amount(s)?;
    if !(1.0..=1e13).contains(&bytes) {
        return Err(format!("{s:?} is out of range (1 byte/s .. 10 TB/s)"));
    }
    Ok(bytes as u64)
}

/// A cap on a rate, as [`parse_rate`], or 0 / `none` for no cap (over one a configuration
/// sets); at least [`dwcp_control::MIN_RATE_LIMIT`], as in the configuration.
pub(crate) fn parse_cap(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t == "0" || t.eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    let r = parse_rate(s)?;
    if r < dwcp_control::MIN_RATE_LIMIT {
        return Err(format!(
            "{s:?} is below the smallest cap, 64 KiB/s (64Ki); 0 or none for no cap"
        ));
    }
    Ok(r)
}

/// A size in bytes (suffixes as for [`parse_rate`]; no "bit"), at most 64 TiB; 0 only with
/// `zero_ok`.
pub(crate) fn parse_size(s: &str, zero_ok: bool) -> Result<u64, String> {
    if s.trim().ends_with("bit") {
        return Err(format!("{s:?} is not a size such as 1Gi or 512Mi"));
    }
    let bytes = parse_amount(s)?;
    let least = if zero_ok { 0.0 } else { 1.0 };
    if !(least..=(64u64 << 40) as f64).contains(&bytes) {
        return Err(format!(
            "{s:?} is out of range ({} .. 64Ti bytes)",
            if zero_ok { 0 } else { 1 }
        ));
    }
    Ok(bytes as u64)
}

/// `s` in bytes (or bytes per second), unchecked but for being a number.
fn parse_amount(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (t, bits) = match t.strip_suffix("bit") {
        Some(r) => (r, true),
        None => (t.strip_suffix('B').unwrap_or(t), false),
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate such as 100M, 1.5Gi or 800Mbit"))?;
    let mult = match unit {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        // In bits also lower case, as `tc` writes them (`50mbit`); not in bytes, where QEMU
        // reads `1g` as 1 GiB.
        "m" if bits => 1e6,
        "g" if bits => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}")),
    };
    Ok(n * mult / if bits { 8.0 } else { 1.0 })
}

#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
    /// Create a cluster CA: DIR/ca.pem (give to every node) and DIR/ca.key (keep safe).
    Init {
        /// Directory to write to (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Cluster id, recorded in the CA's name.
        #[arg(long, default_value = "dwcp")]
        cluster_id: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        /// Replace an existing CA (certificates it issued stop being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA in DIR: DIR/nodes/ID.pem and DIR/nodes/ID.key.
    Issue {
        /// Directory holding the CA (from `dwcp certs init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node id the certificate is for.
        #[arg(long, value_name = "ID")]
        node: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        /// Replace an existing certificate for this node.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate a configuration file (with DWCP_* overrides applied); exit 0 if valid, 3 if
    /// not, 4 if it cannot be read.
    Check {
        /// The file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the default configuration, every field commented.
    Default,
    /// Print the effective configuration: defaults, then FILE, then DWCP_* variables.
    Show {
        /// The file [default: none, defaults only].
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// iperf3 (1 and 8 streams, cubic and bbr) and `dwcp send` (1 stream, default streams;
    /// bbr and cubic) on the same emulated link, in one run; prints a table and writes JSON.
    Transport(BenchTransportArgs),
    /// zstd -3 and lz4 of a generated VM image against HDE cold, warm (previous version held)
    /// and seeded (receiver seeded from the files the image's pages came from); one table.
    Encoding(BenchEncodingArgs),
    /// Live migration between the testbed's two namespaces (an agent in B, `dwcp migrate` in
    /// A): a QEMU guest natively (default and multifd) and through DWCP (cold, seeded, warm),
    /// and generated memory-image VMs at several sizes and dirty rates; table + JSON.
    Migration(BenchMigrationArgs),
    /// Boots the QEMU rows' guest here (no testbed, no root), lets it fill its RAM, and counts
    /// what the RAM holds: zero pages, repeats, random and compressible pages, against the
    /// issue's reference guest; table + JSON.
    Guest(BenchGuestArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BenchGuestArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1Gi")]
    pub(crate) mem: String,

    /// Seconds the guest gets to boot and fill its RAM.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=3600))]
    pub(crate) timeout_secs: u64,

    /// Where to write the JSON report [default: bench-guest.json].
    #[arg(long, value_name = "FILE")]
    pub(crate) json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct TestbedArgs {
    /// Link profile: dc, wan, internet or lossy (docs/BENCHMARKS.md), or settings, alone or
    /// after a name that they change: rtt (round trip), jitter (at most this much more delay
    /// each way), loss (each way), rate (or unlimited). E.g. `rtt=300ms,rate=50mbit,loss=1%`,
    /// `lossy,rtt=250ms`. What no name sets is zero.
    #[arg(long, default_value = "internet")]
    pub(crate) profile: String,

    /// Shell command to run in namespace A (`sh -c`); its exit status becomes dwcp's. The
    /// testbed comes down when it ends.
    #[arg(long, value_name = "COMMAND")]
    pub(crate) in_a: Option<String>,

    /// Shell command to run in namespace B, started first (a server, say); stopped when the
    /// testbed comes down.
    #[arg(long, value_name = "COMMAND")]
    pub(crate) in_b: Option<String>,

    /// Longest the testbed stays up; a command in A still running then is stopped (exit
    /// status 124).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub(crate) seconds: u64,

    /// Seed of the emulator's loss and jitter.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
}

#[derive(Debug, Args)]
pub(crate) struct BenchMigrationArgs {
    /// Link profile: dc, wan, internet, lossy; or settings, alone or after a name:
    /// rtt=300ms,rate=50mbit,loss=1%,jitter=2ms (see `dwcp testbed --help`).
    #[arg(long, default_value = "internet")]
    pub(crate) profile: String,

    /// Cases as SIZE@DIRTY-RATE, comma-separated (dirty rate in bytes/s of page writes).
    #[arg(long, default_value = "1Gi@10M,2Gi@10M,2Gi@50M")]
    pub(crate) cases: String,

    /// TCP congestion control on both sides.
    #[arg(long, default_value = "bbr")]
    pub(crate) congestion: String,

    /// Seconds a migration may take before it is called a failure.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=7200))]
    pub(crate) timeout_secs: u64,

    /// Memory-image migrations run at once per case (each its own `dwcp migrate` and VM, of
    /// the case's size and dirty rate, different contents): how they share the link.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub(crate) concurrent: u32,

    /// Destination agents in namespace B, each a node of its own (bench-b, bench-b2, ...);
    /// the memory-image migrations run at once go to them in turn (at most `--concurrent`).
    /// The QEMU rows use bench-b.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub(crate) destinations: u32,

    /// Guest RAM of the QEMU rows (QEMU native, and through DWCP); 0 skips them.
    #[arg(long, default_value = "1Gi")]
    pub(crate) qemu_mem: String,

    /// QEMU cases, comma-separated: native (default settings, QEMU's 128 MiB/s cap
    /// included), multifd (8 channels, zstd, no bandwidth cap), cold, seeded (the destination's cache seeded with the guest's kernel, initramfs and
    /// disk) and warm (through DWCP); also cold-qemu-steps (cold, with QEMU's own
    /// auto-converge steps: `dwcp migrate --throttle-steps qemu`), cold-no-throttle (cold,
    /// `--no-throttle`), cold-postcopy (`--no-throttle --postcopy`) and cold-outage (cold,
    /// with every connection to B reset from 5 s into the migration for 5 s).
    #[arg(long, default_value = "native,multifd,cold,seeded,warm")]
    pub(crate) qemu_cases: String,

    /// Pages per second the QEMU guest's workload rewrites.
    #[arg(long, default_value_t = 2560)]
    pub(crate) qemu_dirty_pages: u64,

    /// NUMA nodes of the QEMU guest (source and destination), each a RAM block of its own
    /// with an equal share of RAM (1: one block).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub(crate) qemu_numa_nodes: u32,

    /// Start every destination QEMU (native and through DWCP) with its RAM faulted in
    /// (`-mem-prealloc`), so that the kernel zeroes its pages before the migration, not while
    /// QEMU loads them.
    #[arg(long)]
    pub(crate) qemu_dest_prealloc: bool,

    /// `dwcp migrate --codec` of the rows through DWCP: auto, none (no delta encoding either),
    /// lz4, zstd:LEVEL.
    #[arg(long, default_value = "auto", value_parser = parse_codec)]
    pub(crate) qemu_codec: CodecChoice,

    /// Seconds QEMU's native migration gets before it is called unfinished.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=3600))]
    pub(crate) qemu_native_timeout_secs: u64,

    /// Seed of the emulator's loss pattern and of the images.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Where to write the JSON report [default: bench-migration-PROFILE.json].
    #[arg(long, value_name = "FILE")]
    pub(crate) json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct BenchEncodingArgs {
    /// Image size, e.g. 256Mi, 1Gi.
    #[arg(long, default_value = "256Mi")]
    pub(crate) size: String,

    /// Fraction of pages the workload dirties between the two versions (warm row).
    #[arg(long, default_value_t = 0.10)]
    pub(crate) dirty: f64,

    /// Image seed.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Runs per row; the fastest is reported (outputs are identical).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub(crate) repeat: u32,

    /// Synthetic binary and text pages instead of this machine's files.
    #[arg(long)]
    pub(crate) synthetic: bool,

    /// Where to write the JSON report [default: bench-encoding.json].
    #[arg(long, value_name = "FILE")]
    pub(crate) json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct BenchTransportArgs {
    /// Link profile: dc, wan, internet, lossy; or settings, alone or after a name:
    /// rtt=300ms,rate=50mbit,loss=1%,jitter=2ms (see `dwcp testbed --help`).
    #[arg(long, default_value = "internet")]
    pub(crate) profile: String,

    /// Bytes `dwcp send` transfers, e.g. 200M, 1Gi.
    #[arg(long, default_value = "200M")]
    pub(crate) size: String,

    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub(crate) seconds: u32,

    /// Also run dwcp send with this fixed number of streams (beside 1 and auto); 0: not.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=512))]
    pub(crate) streams: u32,

    /// Which dwcp rows to run, comma-separated: tcp (--transport tcp), quic (--transport
    /// quic), auto (the default carrier on a host whose TCP runs CUBIC).
    #[arg(long, value_delimiter = ',', default_value = "tcp,quic,auto", value_parser = ["tcp", "quic", "auto"])]
    pub(crate) carriers: Vec<String>,

    /// Seed of the emulator's loss pattern.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Another dwcp binary (e.g. a previous build) whose `send`/`recv` run each dwcp row too,
    /// alternating with this one on the same link; the table adds their ratio.
    #[arg(long, value_name = "BINARY")]
    pub(crate) baseline: Option<PathBuf>,

    /// How many times each dwcp row runs (alternating with --baseline when given).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub(crate) rounds: u32,

    /// Where to write the JSON report [default: bench-transport-PROFILE.json].
    #[arg(long, value_name = "FILE")]
    pub(crate) json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Destination agent, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub(crate) to: String,

    #[command(flatten)]
    pub(crate) node: NodeArgs,

    /// Refuse the destination unless its certificate is for this node id.
    #[arg(long, value_name = "ID")]
    pub(crate) expect_node: Option<String>,

    #[command(flatten)]
    pub(crate) vm: VmArgs,

    /// Name of the VM's memory image at the destination (in the agent's spool, under this
    /// node's directory).
    #[arg(long, default_value = "vm.mem")]
    pub(crate) name: String,

    /// Longest pause of the guest, milliseconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub(crate) downtime_ms: u64,

    /// Most pre-copy rounds of a memory image, throttled ones included (not with
    /// --qemu-qmp: QEMU counts its own): rounds that stop shrinking before then throttle the
    /// guest; at this many the migration is given up and rolled back.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) max_rounds: u32,

    /// Never throttle the guest (auto-converge): abort instead when rounds stop shrinking
    /// (with --qemu-qmp: after five rounds in a row, and 30 s, each four pause budgets long
    /// or longer, in which the guest dirtied about as much as was sent and no less stayed
    /// dirty).
    #[arg(long)]
    pub(crate) no_throttle: bool,

    /// With --qemu-qmp, how auto-converge raises the throttle. paced: the first step to
    /// what the dirty rate and the stream rate QEMU measured call for, each later one at
    /// least three quarters of the way to the highest; never below QEMU's
    /// cpu-throttle-initial and cpu-throttle-increment as set (20 % and 10 points by
    /// default), which are put back afterwards, nor beyond its max-cpu-throttle. qemu:
    /// QEMU's own steps.
    #[arg(
        long,
        value_enum,
        value_name = "STEPS",
        default_value = "paced",
        requires = "qemu_qmp",
        conflicts_with = "no_throttle"
    )]
    pub(crate) throttle_steps: ThrottleStepsArg,

    /// With --qemu-qmp: where the migration would be given up (auto-converge out of steps,
    /// or --no-throttle, and rounds that do not shrink), switch to QEMU's post-copy instead:
    /// the guest runs at the destination at once and its remaining memory follows, pages it
    /// touches first. Both QEMUs must take it (the destination's needs userfaultfd: root, or
    /// vm.unprivileged_userfaultfd=1); otherwise a warning, and the migration goes on
    /// without. There is no way back once it began: if the link or the destination fails
    /// then, QEMU keeps both sides paused for `migrate-recover`.
    #[arg(long, requires = "qemu_qmp")]
    pub(crate) postcopy: bool,

    /// Parallel TLS connections (per round; with --qemu-qmp, carrying the stream).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub(crate) streams: u32,

    /// Compressor: auto, none, lz4, zstd:LEVEL. Auto: for a memory image, chosen for
    /// --link-rate; with --qemu-qmp, lz4 for a --link-rate of 5 Gbit/s or more, zstd:2 for a
    /// slower one, and without --link-rate lz4 on a datacenter path (round trip under 10 ms),
    /// zstd:2 on a longer one. With --qemu-qmp, none also turns delta encoding off: QEMU's
    /// stream crosses as it is.
    #[arg(long, value_name = "CODEC", default_value = "auto", value_parser = parse_codec)]
    pub(crate) codec: CodecChoice,

    /// The link's bandwidth, for --codec auto [default: --rate-limit if given, else 1Gbit
    /// for a memory image; with --qemu-qmp, none: the round trip decides].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(crate) link_rate: Option<u64>,

    /// Cap on what the migration sends, e.g. 50M (bytes/s of wire bytes, all connections
    /// together; suffixes as for `dwcp send --rate-limit`, "bit" for bits/s). With
    /// --qemu-qmp it caps the tunnel, and QEMU sees the cap through it; at least 64Ki; 0 or
    /// none: no cap, over the configuration's [default: migration.rate_limit_bytes_per_sec,
    /// none unless set].
    #[arg(long, value_name = "RATE", value_parser = parse_cap)]
    pub(crate) rate_limit: Option<u64>,

    /// Seconds to keep reconnecting once every connection to the destination is lost (a link
    /// down, a path rerouted), the migration waiting meanwhile; then it rolls back. With
    /// --postcopy, once post-copy began, the guest runs at the destination and waits for
    /// pages for as long: a migration that gives up then leaves it split between the hosts.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub(crate) retry_secs: u64,

    /// Print one JSON report instead of progress and text.
    #[arg(long)]
    pub(crate) json: bool,

    /// Migrate the running QEMU whose QMP monitor is this Unix socket, instead of a generated
    /// memory image. The destination agent's QEMU for VM --name waits in its
    /// `migration.qemu_dir` (`NAME.incoming`, `NAME.qmp`).
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["vm_size", "dirty_rate", "seed", "synthetic", "vm_dir", "max_rounds"])]
    pub(crate) qemu_qmp: Option<PathBuf>,
}

/// The generated VM of `migrate` and `demo`.
#[derive(Debug, Clone, Args)]
pub(crate) struct VmArgs {
    /// Guest memory size, e.g. 1Gi, 512Mi.
    #[arg(long, default_value = "1Gi")]
    pub(crate) vm_size: String,

    /// Page writes of the guest's workload, bytes per second (4 KiB pages), e.g. 10M.
    #[arg(long, default_value = "10M", value_parser = parse_rate)]
    pub(crate) dirty_rate: u64,

    /// Seed of the image and the workload.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Synthetic binary and text pages instead of this machine's files.
    #[arg(long)]
    pub(crate) synthetic: bool,

    /// Keep the VM's memory in a file in DIR (unnamed, gone when the command ends) rather
    /// than in this process's memory: for a VM bigger than the memory the host can spare.
    /// Its pages that are not zero take disk space there.
    #[arg(long, value_name = "DIR")]
    pub(crate) vm_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Number of ping probes between the two nodes.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) probes: u32,

    #[command(flatten)]
    pub(crate) vm: VmArgs,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("800Mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1Gi"), Ok(1 << 30));
        assert_eq!(parse_rate("1.5K"), Ok(1500));
        assert_eq!(parse_rate("400mbit"), Ok(50_000_000));
        assert_eq!(parse_rate("1gbit"), Ok(125_000_000));
        assert!(
            parse_rate("1g").is_err(),
            "bytes in lower case are ambiguous"
        );
        assert_eq!(parse_rate("42"), Ok(42));
        for bad in ["", "fast", "10X", "0", "-5M", "1e20"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn caps_are_real_or_none() {
        assert_eq!(parse_cap("50M"), Ok(50_000_000));
        assert_eq!(parse_cap("64Ki"), Ok(65_536));
        assert_eq!(parse_cap("0"), Ok(0));
        assert_eq!(parse_cap("none"), Ok(0));
        for bad in ["1", "1000", "100bit", "63Ki", "fast", ""] {
            let e = parse_cap(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        assert!(parse_cap("1000").unwrap_err().contains("64 KiB/s"));
    }

    #[test]
    fn sizes_say_bytes_and_take_zero_only_where_asked() {
        assert_eq!(parse_size("1Gi", false), Ok(1 << 30));
        assert_eq!(parse_size("0", true), Ok(0));
        let e = parse_size("0", false).unwrap_err();
        assert!(e.contains("bytes") && !e.contains("/s"), "{e}");
        assert!(parse_size("8Mbit", true).is_err());
        assert!(parse_size("65Ti", true).is_err());
    }

    #[test]
    fn a_log_level_that_is_not_one_is_refused() {
        for ok in ["info", "debug", "info,dwcp_agent=debug", "warn"] {
            assert_eq!(parse_log_level(ok).as_deref(), Ok(ok));
        }
        for bad in ["degub", "warning", "", "info,dwcp=loud"] {
            assert!(parse_log_level(bad).is_err(), "{bad:?}");
        }
        // Through clap, as a user types it.
        let e = Cli::try_parse_from(["dwcp", "--log-level", "degub", "demo"]).unwrap_err();
        assert!(e.to_string().contains("degub"), "{e}");
    }
}
