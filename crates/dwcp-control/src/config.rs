//! The node configuration: one TOML file, `DWCP_*` environment overrides, validation.
//!
//! Flow: [`Config::from_toml`] (file text + environment) → the caller applies command-line
//! overrides to the public fields → [`Config::validate`] → [`Settings`], typed and in range.
//! Validation always covers every section, also of components that are switched off, and
//! reports every problem at once. `docs/CONFIG.md` documents each field; a test keeps the two
//! in step.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dwcp_wire::{
    Capabilities, ClusterId, HARD_MAX_PAYLOAD, MAX_STREAMS, MIN_MAX_PAYLOAD, NodeId, Version,
};
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides: `DWCP_<SECTION>__<FIELD>=value`.
pub const ENV_PREFIX: &str = "DWCP_";

/// Codec names this build knows.
pub const KNOWN_CODECS: [&str; 2] = ["zstd", "lz4"];

/// The whole configuration, as read from TOML. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity and credentials.
    pub node: NodeConfig,
    /// The agent's listeners and limits.
    pub agent: AgentConfig,
    /// Wire protocol: versions, frame size, timeouts.
    pub protocol: ProtocolConfig,
    /// Transport (AMST) settings advertised in the handshake.
    pub transport: TransportConfig,
    /// Encoding (HDE) settings advertised in the handshake.
    pub encoding: EncodingConfig,
    /// Live migration.
    pub migration: MigrationConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[migration]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationConfig {
    /// Directory where destination QEMUs wait for incoming migrations (`NAME.incoming`,
    /// `NAME.qmp`); "" refuses QEMU migrations.
    pub qemu_dir: PathBuf,
    /// Cap on what each `dwcp migrate` run with this configuration sends, bytes per second
    /// (all its connections together); 0: none. `--rate-limit` overrides it.
    pub rate_limit_bytes_per_sec: u64,
    /// An incoming memory-image migration's target (`.NAME.dwcp-migrating`) that nothing
    /// has written for this long is removed: its source went without rolling back. 0 keeps
    /// it until the next migration of that name.
    pub stale_target_secs: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            qemu_dir: PathBuf::new(),
            rate_limit_bytes_per_sec: 0,
            stale_target_secs: 3600,
        }
    }
}

/// `[node]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id; empty means "the host name".
    pub id: String,
    /// The cluster this node belongs to; peers of other clusters are refused.
    pub cluster_id: String,
    /// Directory holding `ca.pem` and this node's certificate and key (`dwcp certs`).
    pub certs_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            cluster_id: "dwcp".into(),
            certs_dir: PathBuf::from("/etc/dwcp/certs"),
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Address peers connect to.
    pub listen: String,
    /// Address of the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
    pub admin_listen: String,
    /// Most peer connections served at once; more are closed at once, before TLS.
    pub max_connections: u32,
    /// Seconds in-flight work gets to finish after SIGTERM / ctrl-c.
    pub shutdown_grace_secs: u32,
    /// Where files sent to this agent (`dwcp send`) are stored.
    pub spool_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7700".into(),
            // Loopback by default: metrics and health are for the local scraper, not the world.
            admin_listen: "127.0.0.1:7701".into(),
            max_connections: 1024,
            shutdown_grace_secs: 10,
            spool_dir: PathBuf::from("/var/lib/dwcp/spool"),
        }
    }
}

/// `[protocol]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Protocol versions offered and accepted: a subset of `[1, 3, 4, 5, 6]`. `[1]` makes a v1-only
    /// node.
    pub versions: Vec<u32>,
    /// Largest frame payload accepted after the handshake, in bytes.
    pub max_frame_size: u32,
    /// Milliseconds a peer gets to complete the TLS handshake.
    pub tls_timeout_ms: u32,
    /// Milliseconds a peer gets to complete the DWCP handshake after TLS.
    pub handshake_timeout_ms: u32,
    /// Seconds an established connection may stay silent before it is closed.
    pub idle_timeout_secs: u32,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            versions: vec![1, 3, 4, 5, 6],
            // 1 MiB: large enough that per-frame overhead (12 bytes) is noise, small enough that
            // one frame does not monopolise a stream for long on a 100 Mbit/s link (~80 ms).
            max_frame_size: 1024 * 1024,
            // 5 s covers a TLS handshake (2 RTT) on a 500 ms path with loss and retries.
            tls_timeout_ms: 5000,
            handshake_timeout_ms: 5000,
            idle_timeout_secs: 120,
        }
    }
}

/// `[transport]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Fewest parallel streams a session runs.
    pub min_streams: u32,
    /// Most parallel streams a session runs (advertised as `max_streams`).
    pub max_streams: u32,
    /// Offer QUIC sessions to peers.
    pub quic: bool,
    /// TCP congestion control for peer sockets; empty keeps the system default.
    pub congestion: String,
    /// QUIC's congestion control (quinn's, in user space): bbr, cubic or reno.
    pub quic_congestion: String,
    /// Socket send/receive buffer in bytes; 0 leaves the kernel's autotuning on.
    pub socket_buffer_bytes: u32,
    /// Seconds of idleness before TCP keepalive probes; 0 disables keepalive.
    pub keepalive_secs: u32,
    /// Most bytes a peer socket keeps queued but not yet sent (TCP_NOTSENT_LOWAT); 0: no limit.
    pub notsent_lowat_bytes: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            min_streams: 4,
            max_streams: 512,
            quic: true,
            // BBR holds a single stream near the link rate on long lossy paths where CUBIC
            // collapses; the kernel falls back to its default where BBR is not allowed.
            congestion: "bbr".into(),
            // QUIC's controller runs in user space: BBR whatever the kernel offers TCP.
            quic_congestion: "bbr".into(),
            // Linux autotuning (net.ipv4.tcp_rmem/wmem) sizes buffers to the path; a fixed size
            // would switch it off.
            socket_buffer_bytes: 0,
            keepalive_secs: 30,
            // One chunk: a stream keeps its congestion window in flight, and what is not yet
            // sent stays with the session, which gives it to a stream that is moving
            // (docs/BENCHMARKS.md: heartbeats waited 1.4 s behind unsent chunks without it).
            notsent_lowat_bytes: 256 * 1024,
        }
    }
}

/// `[encoding]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncodingConfig {
    /// Accept and use delta encoding (HDE) with v3 peers.
    pub delta: bool,
    /// Compression codecs, in order of preference.
    pub codecs: Vec<String>,
    /// Where the agent keeps its baseline cache ("" = in memory only).
    pub cache_dir: PathBuf,
    /// Baseline cache content kept in memory, MiB.
    pub cache_mem_mib: u32,
    /// Baseline cache packs kept on disk, MiB.
    pub cache_disk_mib: u32,
    /// Files or directories whose pages seed the baseline cache at start.
    pub seed_paths: Vec<PathBuf>,
}

impl Default for EncodingConfig {
    fn default() -> Self {
        Self {
            delta: true,
            codecs: vec!["zstd".into(), "lz4".into()],
            cache_dir: PathBuf::from("/var/lib/dwcp/cache"),
            cache_mem_mib: 256,
            cache_disk_mib: 8192,
            seed_paths: Vec::new(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A level (`info`) or comma-separated `target=level` directives (`info,dwcp_agent=debug`);
    /// empty means the command's own default.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: String::new(),
        }
    }
}

/// One setting that is out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `transport.max_streams`.
    pub field: String,
    /// The value found, as written in TOML.
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.allowed)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML does not parse, or has unknown keys or wrong types.
    #[error("{0}")]
    Parse(String),
    /// An environment override names no setting or has a bad value.
    #[error("environment variable {var}: {detail}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        detail: String,
    },
    /// Values out of range; every one found is listed.
    #[error("{}", render_fields(.0))]
    Invalid(Vec<FieldError>),
}

fn render_fields(errors: &[FieldError]) -> String {
    let mut s = format!("{} invalid setting(s):", errors.len());
    for e in errors {
        s.push_str("\n  ");
        s.push_str(&e.to_string());
    }
    s
}

/// A validated configuration with typed values.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's id, or `None` to use the host name.
    pub node_id: Option<NodeId>,
    /// This node's cluster.
    pub cluster_id: ClusterId,
    /// Certificate directory.
    pub certs_dir: PathBuf,
    /// Peer listener address.
    pub listen: SocketAddr,
    /// Admin HTTP address.
    pub admin_listen: SocketAddr,
    /// Connection limit.
    pub max_connections: u32,
    /// Time in-flight work gets at shutdown.
    pub shutdown_grace: Duration,
    /// Where received files go.
    pub spool_dir: PathBuf,
    /// Versions offered, lowest first.
    pub versions: Vec<Version>,
    /// TLS handshake timeout.
    pub tls_timeout: Duration,
    /// DWCP handshake timeout.
    pub handshake_timeout: Duration,
    /// Idle timeout of established connections.
    pub idle_timeout: Duration,
    /// Capabilities advertised in the handshake.
    pub capabilities: Capabilities,
    /// Fewest streams per session.
    pub min_streams: u32,
    /// Congestion control for peer sockets.
    pub congestion: Option<String>,
    /// QUIC's congestion control.
    pub quic_congestion: String,
    /// Fixed socket buffer size.
    pub socket_buffer: Option<u32>,
    /// TCP keepalive idle time.
    pub keepalive: Option<Duration>,
    /// Unsent-bytes limit of peer sockets.
    pub notsent_lowat: Option<u32>,
    /// Log settings.
    pub log: LogConfig,
    /// Baseline cache of the agent.
    pub cache: CacheSettings,
    /// Where incoming QEMU migrations are fed (`None`: refused).
    pub qemu_dir: Option<PathBuf>,
    /// Cap on what a migration from this node sends, bytes per second (`None`: none).
    pub migration_rate_limit: Option<u64>,
    /// Age after which an abandoned memory-image migration target is removed (`None`: kept).
    pub stale_migration_target: Option<Duration>,
}

/// Where and how large the agent's baseline cache is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// Directory for persisted packs; `None` keeps the cache in memory only.
    pub dir: Option<PathBuf>,
    /// Bytes kept in memory.
    pub mem_bytes: u64,
    /// Bytes kept on disk.
    pub disk_bytes: u64,
    /// Seed files or directories.
    pub seeds: Vec<PathBuf>,
}

impl Config {
    /// Parses TOML text, then applies `DWCP_*` overrides from `env` (pass
    /// `std::env::vars()`; variables without `__` after the prefix are ignored).
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut table, env)?;
        Self::deserialize(table).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks every field and returns typed settings, or every problem found.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let mut errs = Vec::new();
        let mut bad = |field: &str, value: String, allowed: String| {
            errs.push(FieldError {
                field: field.into(),
                value,
                allowed,
            })
        };

        let node_id = if self.node.id.is_empty() {
            None
        } else {
            NodeId::new(self.node.id.as_str())
                .map_err(|e| bad("node.id", quote(&self.node.id), e.to_string()))
                .ok()
        };
        let cluster_id = ClusterId::new(self.node.cluster_id.as_str())
            .map_err(|e| {
                bad(
                    "node.cluster_id",
                    quote(&self.node.cluster_id),
                    e.to_string(),
                )
            })
            .ok();
        if self.node.certs_dir.as_os_str().is_empty() {
            bad("node.certs_dir", "\"\"".into(), "a directory path".into());
        }

        let mut addr = |field: &str, s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|_| {
                    bad(
                        field,
                        quote(s),
                        "an IP:port address such as 0.0.0.0:7700".into(),
                    )
                })
                .ok()
        };
        let listen = addr("agent.listen", &self.agent.listen);
        let admin_listen = addr("agent.admin_listen", &self.agent.admin_listen);
        // The same port on the same address, or on an address the other's wildcard covers
        // (`[::]` takes IPv4 too, as Linux binds it by default).
        let clash = |a: SocketAddr, b: SocketAddr| {
            let covers = |w: SocketAddr, o: SocketAddr| {
                w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4())
            };
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
        };
        if let (Some(a), Some(b)) = (listen, admin_listen)
            && clash(a, b)
        {
            bad(
                "agent.admin_listen",
                quote(&self.agent.admin_listen),
                "must differ from agent.listen".into(),
            );
        }
        range(
            &mut bad,
            "agent.max_connections",
            self.agent.max_connections,
            1,
            65_536,
        );
        if self.agent.spool_dir.as_os_str().is_empty() {
            bad("agent.spool_dir", "\"\"".into(), "a directory path".into());
        }
        // The agent's directories apart: a peer's files land in SPOOL/<peer>/, so a cache in
        // there could have its packs overwritten by a file of that name.
        let dirs = [
            ("agent.spool_dir", &self.agent.spool_dir),
            ("encoding.cache_dir", &self.encoding.cache_dir),
            ("migration.qemu_dir", &self.migration.qemu_dir),
        ];
        for (i, (field, dir)) in dirs.iter().enumerate() {
            for (other, odir) in &dirs[..i] {
                if !dir.as_os_str().is_empty() && !odir.as_os_str().is_empty() && overlap(dir, odir)
                {
                    bad(
                        field,
                        format!("{:?}", dir.display().to_string()),
                        format!(
                            "a directory apart from {other} ({}): not it, in it, nor holding it",
                            odir.display()
                        ),
                    );
                }
            }
        }
        range(
            &mut bad,
            "agent.shutdown_grace_secs",
            self.agent.shutdown_grace_secs,
            0,
            3600,
        );

        let mut versions = Vec::new();
        for &n in &self.protocol.versions {
            match Version::from_number(n) {
                Some(v) if !versions.contains(&v) => versions.push(v),
                Some(_) => bad(
                    "protocol.versions",
                    format!("{:?}", self.protocol.versions),
                    format!("version {n} listed twice"),
                ),
                None => bad(
                    "protocol.versions",
                    format!("{:?}", self.protocol.versions),
                    format!("version {n} is not supported: allowed 1, 3, 4, 5 and 6"),
                ),
            }
        }
        if self.protocol.versions.is_empty() {
            bad(
                "protocol.versions",
                "[]".into(),
                "at least one of 1, 3, 4, 5, 6".into(),
            );
        }
        versions.sort();
        range(
            &mut bad,
            "protocol.max_frame_size",
            self.protocol.max_frame_size,
            MIN_MAX_PAYLOAD,
            HARD_MAX_PAYLOAD,
        );
        range(
            &mut bad,
            "protocol.tls_timeout_ms",
            self.protocol.tls_timeout_ms,
            100,
            120_000,
        );
        range(
            &mut bad,
            "protocol.handshake_timeout_ms",
            self.protocol.handshake_timeout_ms,
            100,
            120_000,
        );
        range(
            &mut bad,
            "protocol.idle_timeout_secs",
            self.protocol.idle_timeout_secs,
            1,
            86_400,
        );

        range(
            &mut bad,
            "transport.min_streams",
            self.transport.min_streams,
            1,
            MAX_STREAMS,
        );
        range(
            &mut bad,
            "transport.max_streams",
            self.transport.max_streams,
            1,
            MAX_STREAMS,
        );
        if self.transport.min_streams > self.transport.max_streams {
            bad(
                "transport.min_streams",
                self.transport.min_streams.to_string(),
                format!(
                    "must be <= transport.max_streams ({})",
                    self.transport.max_streams
                ),
            );
        }

        let cc = &self.transport.congestion;
        // Linux's names are lower case, and matched as they are: "BBR" would fail on every
        // socket, each keeping the system's default.
        if cc.len() > 15
            || !cc
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            bad(
                "transport.congestion",
                quote(cc),
                "an algorithm name such as \"bbr\" or \"cubic\" (at most 15 of a-z 0-9 _), or \"\""
                    .into(),
            );
        }
        let qcc = &self.transport.quic_congestion;
        if !["bbr", "cubic", "reno"].contains(&qcc.as_str()) {
            bad(
                "transport.quic_congestion",
                quote(qcc),
                "\"bbr\", \"cubic\" or \"reno\"".into(),
            );
        }
        let b = self.transport.socket_buffer_bytes;
        if b != 0 && !(64 * 1024..=1 << 30).contains(&b) {
            bad(
                "transport.socket_buffer_bytes",
                b.to_string(),
                "0 (kernel autotuning) or 65536..=1073741824".into(),
            );
        }
        range(
            &mut bad,
            "transport.keepalive_secs",
            self.transport.keepalive_secs,
            0,
            7200,
        );
        let st = self.migration.stale_target_secs;
        if st != 0 && !(60..=604_800).contains(&st) {
            bad(
                "migration.stale_target_secs",
                st.to_string(),
                "0 (kept) or 60..=604800".into(),
            );
        }
        let mr = self.migration.rate_limit_bytes_per_sec;
        if mr != 0 && !(MIN_RATE_LIMIT..=10_000_000_000_000).contains(&mr) {
            bad(
                "migration.rate_limit_bytes_per_sec",
                mr.to_string(),
                "0 (no cap) or 65536..=10000000000000".into(),
            );
        }
        let lw = self.transport.notsent_lowat_bytes;
        if lw != 0 && !(16 * 1024..=1 << 30).contains(&lw) {
            bad(
                "transport.notsent_lowat_bytes",
                lw.to_string(),
                "0 (no limit) or 16384..=1073741824".into(),
            );
        }

        for (i, c) in self.encoding.codecs.iter().enumerate() {
            if !KNOWN_CODECS.contains(&c.as_str()) {
                bad(
                    &format!("encoding.codecs[{i}]"),
                    quote(c),
                    format!("one of {KNOWN_CODECS:?}"),
                );
            } else if self.encoding.codecs[..i].contains(c) {
                bad(
                    &format!("encoding.codecs[{i}]"),
                    quote(c),
                    "listed twice".into(),
                );
            }
        }

        range(
            &mut bad,
            "encoding.cache_mem_mib",
            self.encoding.cache_mem_mib,
            0,
            1 << 20,
        );
        for (i, p) in self.encoding.seed_paths.iter().enumerate() {
            if p.as_os_str().is_empty() {
                bad(
                    &format!("encoding.seed_paths[{i}]"),
                    "\"\"".into(),
                    "a file or directory path".into(),
                );
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bad(
                "log.format",
                quote(&self.log.format),
                "\"text\" or \"json\"".into(),
            );
        }
        if self.log.level.is_empty() {
            // The command's default.
        } else if let Err(e) = check_log_level(&self.log.level) {
            bad("log.level", quote(&self.log.level), e);
        }

        match (errs.is_empty(), cluster_id, listen, admin_listen) {
            (true, Some(cluster_id), Some(listen), Some(admin_listen)) => Ok(Settings {
                node_id,
                cluster_id,
                certs_dir: self.node.certs_dir.clone(),
                listen,
                admin_listen,
                max_connections: self.agent.max_connections,
                shutdown_grace: Duration::from_secs(self.agent.shutdown_grace_secs.into()),
                spool_dir: self.agent.spool_dir.clone(),
                versions,
                tls_timeout: Duration::from_millis(self.protocol.tls_timeout_ms.into()),
                handshake_timeout: Duration::from_millis(self.protocol.handshake_timeout_ms.into()),
                idle_timeout: Duration::from_secs(self.protocol.idle_timeout_secs.into()),
                capabilities: Capabilities {
                    max_streams: self.transport.max_streams,
                    codecs: self.encoding.codecs.clone(),
                    quic: self.transport.quic,
                    delta: self.encoding.delta,
                    max_frame_size: self.protocol.max_frame_size,
                },
                min_streams: self.transport.min_streams,
                congestion: Some(self.transport.congestion.clone()).filter(|c| !c.is_empty()),
                quic_congestion: self.transport.quic_congestion.clone(),
                socket_buffer: Some(self.transport.socket_buffer_bytes).filter(|b| *b > 0),
                keepalive: Some(Duration::from_secs(self.transport.keepalive_secs.into()))
                    .filter(|d| !d.is_zero()),
                notsent_lowat: Some(self.transport.notsent_lowat_bytes).filter(|n| *n > 0),
                log: self.log.clone(),
                cache: CacheSettings {
                    dir: Some(self.encoding.cache_dir.clone())
                        .filter(|d| !d.as_os_str().is_empty()),
                    mem_bytes: u64::from(self.encoding.cache_mem_mib) << 20,
                    disk_bytes: u64::from(self.encoding.cache_disk_mib) << 20,
                    seeds: self.encoding.seed_paths.clone(),
                },
                qemu_dir: Some(self.migration.qemu_dir.clone())
                    .filter(|d| !d.as_os_str().is_empty()),
                migration_rate_limit: Some(self.migration.rate_limit_bytes_per_sec)
                    .filter(|r| *r > 0),
                stale_migration_target: Some(self.migration.stale_target_secs)
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs),
            }),
            _ => Err(ConfigError::Invalid(errs)),
        }
    }

    /// The configuration as TOML (no comments), e.g. to show the effective settings.
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings, integers, booleans and arrays cannot fail.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn range(bad: &mut impl FnMut(&str, String, String), field: &str, v: u32, lo: u32, hi: u32) {
    if !(lo..=hi).contains(&v) {
        bad(field, v.to_string(), format!("allowed {lo}..={hi}"));
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The smallest cap on a rate (bytes/s) taken, here and on the command line: below it a
/// 256 KiB chunk takes seconds, and a typo would look like a hang.
pub const MIN_RATE_LIMIT: u64 = 65_536;

/// Whether directories `a` and `b` are one, or one holds the other: compared as written,
/// made absolute (symbolic links not followed, the directories need not exist yet).
pub fn overlap(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a.starts_with(&b) || b.starts_with(&a),
        _ => false,
    }
}

/// Whether `s` is a log level or a list of directives (`info,dwcp_agent=debug`): what
/// `log.level` and `--log-level` take.
pub fn check_log_level(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("a level such as \"info\"".into());
    }
    // tracing would let the last of several win without a word.
    if s.split(',').filter(|d| !d.contains('=')).count() > 1 {
        return Err(format!(
            "{s:?} has more than one level without a target (\"info,dwcp_agent=debug\" sets \
             one level for all and another for one target)"
        ));
    }
    for directive in s.split(',') {
        let level = match directive.split_once('=') {
            Some((target, level)) => {
                let target = target.trim();
                let ok_target = !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                if !ok_target {
                    return Err(format!("bad target in directive {directive:?}"));
                }
                level
            }
            None => directive,
        };
        // As tracing reads them: `INFO` is `info`.
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(format!(
                "level {:?} in {directive:?} is not one of {LEVELS:?}",
                level.trim()
            ));
        }
    }
    Ok(())
}

/// `s` (checked by [`check_log_level`]) as tracing reads it: spaces around directives and
/// levels dropped (tracing would take `"info "` for a target at every level, and log nothing).
pub fn normalize_log_level(s: &str) -> String {
    s.split(',')
        .map(|d| match d.split_once('=') {
            Some((target, level)) => format!("{}={}", target.trim(), level.trim()),
            None => d.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Applies `DWCP_SECTION__FIELD=value` overrides. The value is read according to the type of
/// the setting it replaces: strings as they are, numbers and booleans parsed, arrays as
/// comma-separated items (or a TOML array such as `[1, 3]`).
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::Parse(format!("internal: default config: {e}")))?;
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k[ENV_PREFIX.len()..].contains("__"))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let env_err = |detail: String| ConfigError::Env {
            var: var.clone(),
            detail,
        };
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let Some((section, field)) = rest.split_once("__") else {
            continue;
        };
        let default = defaults
            .get(section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(field))
            .ok_or_else(|| env_err(format!("there is no setting {section}.{field}")))?;
        let value =
            env_value(default, &raw).map_err(|e| env_err(format!("{section}.{field}: {e}")))?;
        // The value alone, among the defaults: a wrong type or range (an integer the field
        // cannot hold) is this variable's, and said so, not the file's.
        let mut probe = defaults.clone();
        if let Some(toml::Value::Table(t)) = probe.get_mut(section) {
            t.insert(field.to_string(), value.clone());
        }
        if let Err(e) = Config::deserialize(probe) {
            return Err(env_err(format!("{section}.{field}: {}", e.message())));
        }
        let section_table = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = section_table else {
            return Err(env_err(format!("[{section}] in the file is not a table")));
        };
        section_table.insert(field.to_string(), value);
    }
    Ok(())
}

fn env_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    let scalar = |like: &Value, s: &str| -> Result<Value, String> {
        let s = s.trim();
        match like {
            Value::String(_) => Ok(Value::String(s.to_string())),
            Value::Integer(_) => s
                .parse::<i64>()
                .map(Value::Integer)
                .map_err(|_| format!("{s:?} is not an integer")),
            Value::Boolean(_) => s
                .parse::<bool>()
                .map(Value::Boolean)
                .map_err(|_| format!("{s:?} is not true or false")),
            Value::Float(_) => s
                .parse::<f64>()
                .map(Value::Float)
                .map_err(|_| format!("{s:?} is not a number")),
            _ => Err("this setting cannot be set from the environment".into()),
        }
    };
    match default {
        Value::Array(items) => {
            let trimmed = raw.trim();
            if trimmed.starts_with('[') {
                let t: toml::Table =
                    format!("v = {trimmed}")
                        .parse()
                        .map_err(|e: toml::de::Error| {
                            format!("{trimmed:?} is not a TOML array: {e}")
                        })?;
                return t.get("v").cloned().ok_or_else(|| "empty value".to_string());
            }
            let like = items
                .first()
                .cloned()
                .unwrap_or(Value::String(String::new()));
            trimmed
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| scalar(&like, s))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        other => scalar(other, raw),
    }
}

/// The default configuration as TOML, with every field explained: what `dwcp config default`
/// prints. A test checks that it parses to [`Config::default`].
pub const DEFAULT_TOML: &str = r#"# DWCP node configuration. Every field is optional; shown here with its default.
# Environment overrides: DWCP_<SECTION>__<FIELD>, e.g. DWCP_TRANSPORT__MAX_STREAMS=64.
# Command-line flags (--node-id, --certs-dir, --listen, --admin-listen) override both.
# Reference: docs/CONFIG.md.

[node]
# This node's id: 1-256 bytes of A-Z a-z 0-9 . _ - (first a letter or digit).
# Empty means the host name. It must match the node certificate (dwcp certs issue --node ID).
id = ""
# Cluster id; peers of another cluster are refused during the handshake.
cluster_id = "dwcp"
# Directory with ca.pem and nodes/<id>.pem + nodes/<id>.key, as made by `dwcp certs`.
certs_dir = "/etc/dwcp/certs"

[agent]
# Address peers connect to.
listen = "0.0.0.0:7700"
# Admin HTTP (/healthz, /readyz, /metrics). Keep it on loopback or a management network.
admin_listen = "127.0.0.1:7701"
# Authenticated peer connections served at once (1..=65536); more are closed at once,
# before TLS. Clients still in their handshakes take none of these.
max_connections = 1024
# Seconds in-flight work gets to finish after SIGTERM or ctrl-c (0..=3600).
shutdown_grace_secs = 10
# Where files sent to this node with `dwcp send` are stored (created if missing).
spool_dir = "/var/lib/dwcp/spool"

[protocol]
# Versions offered and accepted: 1 (legacy: one stream, no delta), 3, 4 (as 3, and a fresh
# object's data on every stream at once), 5 (as 4, and a migration round's parts in
# flight at once) and 6 (as 5, and a final round that commits its target when applied).
# The highest common version wins; [1] makes a v1-only node.
versions = [1, 3, 4, 5, 6]
# Largest frame payload accepted after the handshake, bytes (4096..=16777216).
max_frame_size = 1048576
# Milliseconds a peer gets to finish the TLS handshake (100..=120000).
tls_timeout_ms = 5000
# Milliseconds a peer gets to finish the DWCP handshake after TLS (100..=120000).
handshake_timeout_ms = 5000
# Seconds an established connection may stay silent before it is closed (1..=86400).
idle_timeout_secs = 120

[transport]
# Fewest parallel streams per session (1..=512, <= max_streams).
min_streams = 4
# Most parallel streams per session (1..=512); advertised to peers.
max_streams = 512
# Offer QUIC sessions to peers.
quic = true
# TCP congestion control for peer sockets ("bbr", "cubic", ...; "" = system default).
# Falls back to the system default, with a warning, where the kernel does not allow it.
congestion = "bbr"
# QUIC's congestion control, quinn's, in user space ("bbr", "cubic", "reno"): independent of
# what the kernel offers TCP.
quic_congestion = "bbr"
# Socket send/receive buffer, bytes: 0 = kernel autotuning (net.ipv4.tcp_rmem/wmem), else
# 65536..=1073741824 (capped by net.core.rmem_max/wmem_max).
socket_buffer_bytes = 0
# Seconds of idleness before TCP keepalive probes (0 = off, ..=7200).
keepalive_secs = 30
# Most bytes a peer socket queues but has not sent yet (TCP_NOTSENT_LOWAT): 0 = no limit, else
# 16384..=1073741824.
notsent_lowat_bytes = 262144

[encoding]
# Use delta encoding (HDE) with v3 peers that allow it.
delta = true
# Compression codecs in order of preference: "zstd", "lz4".
codecs = ["zstd", "lz4"]
# Baseline cache of received pages and chunks (what delta-encoded transfers refer to);
# "" keeps it in memory only. Persisted across restarts, integrity-checked.
cache_dir = "/var/lib/dwcp/cache"
# Cache content kept in memory, MiB (0..=1048576).
cache_mem_mib = 256
# Cache kept on disk, MiB; the least recently useful packs go first.
cache_disk_mib = 8192
# Files or directories (VM disks, base images) whose pages seed the cache at start.
seed_paths = []

[migration]
# Directory where destination QEMUs wait for incoming migrations: the QEMU of VM NAME is
# started with -incoming unix:DIR/NAME.incoming and -qmp unix:DIR/NAME.qmp,server=on,wait=off.
# "" refuses QEMU migrations.
qemu_dir = ""
# Cap on what each `dwcp migrate` run with this file sends, bytes per second, all its
# connections together (0: none; else 65536 or more). `dwcp migrate --rate-limit` overrides it.
rate_limit_bytes_per_sec = 0
# A memory-image migration's target on this node (`.NAME.dwcp-migrating` in the spool) that
# nothing has written for this many seconds is removed: its source went without rolling back
# (0: kept until the next migration of that name; else 60 to 604800).
stale_target_secs = 3600

[log]
# "text" or "json".
format = "text"
# A level (off, error, warn, info, debug, trace) or directives like "info,dwcp_agent=debug".
# Empty: the command's default (info for agent, recv and ping; warn for send; error for demo).
level = ""
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn invalid_fields(text: &str) -> Vec<FieldError> {
        match Config::from_toml(text, no_env()).unwrap().validate() {
            Err(ConfigError::Invalid(f)) => f,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn default_toml_is_the_default() {
        assert_eq!(
            Config::from_toml(DEFAULT_TOML, no_env()).unwrap(),
            Config::default()
        );
        assert_eq!(Config::from_toml("", no_env()).unwrap(), Config::default());
        let s = Config::default().validate().unwrap();
        assert_eq!(
            s.versions,
            vec![
                Version::V1,
                Version::V3,
                Version::V4,
                Version::V5,
                Version::V6
            ]
        );
        assert_eq!(s.capabilities.max_streams, 512);
        assert!(s.node_id.is_none());
    }

    #[test]
    fn rendered_config_round_trips() {
        let mut c = Config::default();
        c.node.id = "n1".into();
        c.protocol.versions = vec![1];
        assert_eq!(Config::from_toml(&c.to_toml(), no_env()).unwrap(), c);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[transport]\nmax_stream = 3\n", no_env()).unwrap_err();
        assert!(err.to_string().contains("max_stream"), "{err}");
        let err = Config::from_toml("[nope]\n", no_env()).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn wrong_type_is_a_parse_error() {
        let err = Config::from_toml("[agent]\nmax_connections = \"many\"\n", no_env()).unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)));
        assert!(err.to_string().contains("max_connections"), "{err}");
    }

    #[test]
    fn range_errors_name_field_value_and_range() {
        let f = invalid_fields("[transport]\nmax_streams = 0\n");
        assert!(f.iter().any(|e| e.field == "transport.max_streams"
            && e.value == "0"
            && e.allowed == "allowed 1..=512"));
        let f = invalid_fields("[transport]\nmax_streams = 513\n");
        assert_eq!(
            f[0].to_string(),
            "transport.max_streams = 513: allowed 1..=512"
        );
    }

    #[test]
    fn the_agents_directories_are_kept_apart() {
        let f = invalid_fields(
            "[agent]\nspool_dir = \"/srv/dwcp\"\n[encoding]\ncache_dir = \"/srv/dwcp/node-a\"\n",
        );
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            f[0].to_string(),
            "encoding.cache_dir = \"/srv/dwcp/node-a\": a directory apart from agent.spool_dir \
             (/srv/dwcp): not it, in it, nor holding it"
        );
        // The same directory spelled another way, and a spool inside QEMU's directory.
        let f = invalid_fields(
            "[agent]\nspool_dir = \"/srv/q/spool\"\n[encoding]\ncache_dir = \"/srv/./q/spool/\"\n\
             [migration]\nqemu_dir = \"/srv/q\"\n",
        );
        let fields: Vec<_> = f.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "encoding.cache_dir",
                "migration.qemu_dir",
                "migration.qemu_dir"
            ]
        );
        // Side by side is fine; an in-memory cache and no QEMU directory are apart from all.
        for ok in [
            "[agent]\nspool_dir = \"/srv/spool\"\n[encoding]\ncache_dir = \"/srv/spool-cache\"\n",
            "[agent]\nspool_dir = \"/srv/spool\"\n[encoding]\ncache_dir = \"\"\n",
        ] {
            Config::from_toml(ok, env(&[])).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn a_migration_rate_limit_is_none_or_a_real_cap() {
        let f = invalid_fields("[migration]\nrate_limit_bytes_per_sec = 1000\n");
        assert_eq!(
            f[0].to_string(),
            "migration.rate_limit_bytes_per_sec = 1000: 0 (no cap) or 65536..=10000000000000"
        );
        let s = Config::from_toml("", env(&[])).unwrap().validate().unwrap();
        assert_eq!(s.migration_rate_limit, None);
        let s = Config::from_toml(
            "",
            env(&[("DWCP_MIGRATION__RATE_LIMIT_BYTES_PER_SEC", "50000000")]),
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(s.migration_rate_limit, Some(50_000_000));
    }

    #[test]
    fn an_abandoned_migration_target_goes_after_an_hour_unless_told_otherwise() {
        let s = Config::from_toml("", env(&[])).unwrap().validate().unwrap();
        assert_eq!(s.stale_migration_target, Some(Duration::from_secs(3600)));
        let s = Config::from_toml("[migration]\nstale_target_secs = 0\n", env(&[]))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(s.stale_migration_target, None);
        let f = invalid_fields("[migration]\nstale_target_secs = 5\n");
        assert_eq!(
            f[0].to_string(),
            "migration.stale_target_secs = 5: 0 (kept) or 60..=604800"
        );
    }

    #[test]
    fn min_streams_must_not_exceed_max() {
        let f = invalid_fields("[transport]\nmin_streams = 64\nmax_streams = 8\n");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].field, "transport.min_streams");
        assert!(f[0].allowed.contains("<= transport.max_streams (8)"));
    }

    #[test]
    fn a_congestion_control_is_named_as_linux_names_it() {
        for bad in ["BBR", "Cubic", "bbr ", "a-b"] {
            let f = invalid_fields(&format!("[transport]\ncongestion = {bad:?}\n"));
            assert_eq!(f[0].field, "transport.congestion", "{bad:?}");
        }
        for ok in ["bbr", "cubic", "", "bbr2", "dctcp"] {
            let c = Config::from_toml(&format!("[transport]\ncongestion = {ok:?}\n"), no_env())
                .unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let f = invalid_fields(
            "[node]\nid = \"bad id\"\ncluster_id = \"\"\n[agent]\nlisten = \"nowhere\"\n\
             [protocol]\nversions = [2]\nmax_frame_size = 1\n[encoding]\ncodecs = [\"gzip\"]\n\
             [log]\nformat = \"xml\"\nlevel = \"loud\"\n",
        );
        let fields: Vec<_> = f.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "node.id",
                "node.cluster_id",
                "agent.listen",
                "protocol.versions",
                "protocol.max_frame_size",
                "encoding.codecs[0]",
                "log.format",
                "log.level"
            ]
        );
    }

    #[test]
    fn versions_rules() {
        let s = Config::from_toml("[protocol]\nversions = [3, 1]\n", no_env())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(s.versions, vec![Version::V1, Version::V3]);
        assert_eq!(
            invalid_fields("[protocol]\nversions = []\n")[0].field,
            "protocol.versions"
        );
        assert!(
            invalid_fields("[protocol]\nversions = [3, 3]\n")[0]
                .allowed
                .contains("twice")
        );
    }

    #[test]
    fn env_overrides() {
        let c = Config::from_toml(
            "[transport]\nmax_streams = 8\n",
            env(&[
                ("DWCP_TRANSPORT__MAX_STREAMS", "64"),
                ("DWCP_NODE__ID", "1234"),
                ("DWCP_PROTOCOL__VERSIONS", "1"),
                ("DWCP_ENCODING__CODECS", "lz4, zstd"),
                ("DWCP_TRANSPORT__QUIC", "true"),
                ("DWCP_CONFIG", "ignored: no double underscore"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.transport.max_streams, 64);
        assert_eq!(c.node.id, "1234");
        assert_eq!(c.protocol.versions, vec![1]);
        assert_eq!(c.encoding.codecs, vec!["lz4", "zstd"]);
        assert!(c.transport.quic);
        let c = Config::from_toml("", env(&[("DWCP_PROTOCOL__VERSIONS", "[1, 3]")])).unwrap();
        assert_eq!(c.protocol.versions, vec![1, 3]);
    }

    #[test]
    fn bad_env_overrides_are_named() {
        let err =
            Config::from_toml("", env(&[("DWCP_TRANSPORT__MAX_STREAMS", "lots")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("DWCP_TRANSPORT__MAX_STREAMS"), "{msg}");
        assert!(msg.contains("not an integer"), "{msg}");
        let err = Config::from_toml("", env(&[("DWCP_TRANSPORT__NOPE", "1")])).unwrap_err();
        assert!(
            err.to_string().contains("no setting transport.nope"),
            "{err}"
        );
        // Parsed, yet not what the field holds: still the variable's error, not the file's.
        for (var, raw) in [
            ("DWCP_TRANSPORT__MAX_STREAMS", "-1"),
            ("DWCP_TRANSPORT__MAX_STREAMS", "99999999999"),
            ("DWCP_PROTOCOL__VERSIONS", "[1, \"x\"]"),
        ] {
            let err = Config::from_toml("", env(&[(var, raw)])).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Env { var: v, .. } if v == var),
                "{err}"
            );
        }
    }

    #[test]
    fn admin_and_peer_listener_must_differ() {
        let f = invalid_fields(
            "[agent]\nlisten = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n",
        );
        assert_eq!(f[0].field, "agent.admin_listen");
        // A wildcard covers the other's address on the same port.
        for (l, a) in [
            ("0.0.0.0:7700", "127.0.0.1:7700"),
            ("127.0.0.1:7700", "0.0.0.0:7700"),
            ("[::]:7700", "127.0.0.1:7700"),
            ("[::1]:7700", "[::]:7700"),
        ] {
            let f = invalid_fields(&format!(
                "[agent]\nlisten = \"{l}\"\nadmin_listen = \"{a}\"\n"
            ));
            assert_eq!(f[0].field, "agent.admin_listen", "{l} {a}");
        }
        // Not on another port, nor across an IPv4 wildcard and an IPv6 address.
        for (l, a) in [
            ("0.0.0.0:7700", "127.0.0.1:7701"),
            ("0.0.0.0:7700", "[::1]:7700"),
            ("127.0.0.1:7700", "127.0.0.2:7700"),
        ] {
            let cfg = Config::from_toml(
                &format!("[node]\nid = \"a\"\ncluster_id = \"c\"\n[agent]\nlisten = \"{l}\"\nadmin_listen = \"{a}\"\n"),
                Vec::new(),
            )
            .unwrap();
            assert!(cfg.validate().is_ok(), "{l} {a}");
        }
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "debug",
            "info,dwcp_agent=debug",
            "off",
            "warn,rustls=off",
            "INFO",
            "Debug,dwcp_agent=TRACE",
        ] {
            check_log_level(ok).unwrap();
        }
        for bad in [
            "",
            "loud",
            "dwcp=",
            "=info",
            "a b=info",
            "warn, debug",
            "info,debug",
        ] {
            assert!(check_log_level(bad).is_err(), "{bad:?}");
        }
        // As tracing reads them.
        for (given, read) in [
            ("info ", "info"),
            (" warn,rustls = off ", "warn,rustls=off"),
            ("dwcp_agent=debug ", "dwcp_agent=debug"),
        ] {
            check_log_level(given).unwrap();
            assert_eq!(normalize_log_level(given), read);
        }
    }

    /// Every setting appears in docs/CONFIG.md as `section.field`.
    #[test]
    fn every_setting_is_documented() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CONFIG.md"))
                .expect("docs/CONFIG.md");
        let table = toml::Table::try_from(Config::default()).unwrap();
        for (section, fields) in &table {
            for field in fields.as_table().unwrap().keys() {
                let key = format!("`{section}.{field}`");
                assert!(doc.contains(&key), "docs/CONFIG.md does not document {key}");
            }
        }
    }

    mod proptests {
        use proptest::prelude::*;

        use super::*;

        const KEYS: [(&str, &str); 23] = [
            ("node", "id"),
            ("node", "cluster_id"),
            ("node", "certs_dir"),
            ("agent", "listen"),
            ("agent", "admin_listen"),
            ("agent", "max_connections"),
            ("agent", "shutdown_grace_secs"),
            ("protocol", "versions"),
            ("protocol", "max_frame_size"),
            ("protocol", "tls_timeout_ms"),
            ("protocol", "handshake_timeout_ms"),
            ("protocol", "idle_timeout_secs"),
            ("transport", "min_streams"),
            ("transport", "max_streams"),
            ("transport", "quic"),
            ("transport", "congestion"),
            ("transport", "quic_congestion"),
            ("transport", "keepalive_secs"),
            ("transport", "notsent_lowat_bytes"),
            ("encoding", "codecs"),
            ("encoding", "cache_mem_mib"),
            ("encoding", "seed_paths"),
            ("log", "level"),
        ];

        proptest! {
            /// Arbitrary text never panics the loader or the validator.
            #[test]
            fn arbitrary_text(text in "\\PC{0,200}") {
                if let Ok(c) = Config::from_toml(&text, Vec::new()) {
                    let _ = c.validate();
                }
            }

            /// Structured TOML: known keys with values of any type. Never a panic; a type
            /// error names the key; a validation error names the field.
            #[test]
            fn known_keys_any_values(
                entries in proptest::collection::vec(
                    (0usize..KEYS.len(), prop_oneof![
                        any::<i64>().prop_map(|v| v.to_string()),
                        any::<bool>().prop_map(|v| v.to_string()),
                        "[a-z0-9 .:_-]{0,12}".prop_map(|v| format!("{v:?}")),
                        proptest::collection::vec(0u32..5, 0..4).prop_map(|v| format!("{v:?}")),
                    ]),
                    0..6,
                ),
            ) {
                let mut by_section: std::collections::BTreeMap<&str, Vec<String>> =
                    Default::default();
                let mut seen = std::collections::BTreeSet::new();
                for (k, v) in &entries {
                    let (section, field) = KEYS[*k];
                    if seen.insert(*k) {
                        by_section.entry(section).or_default().push(format!("{field} = {v}"));
                    }
                }
                let text: String = by_section
                    .iter()
                    .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
                    .collect();
                match Config::from_toml(&text, Vec::new()) {
                    Ok(c) => match c.validate() {
                        Ok(_) => {}
                        Err(ConfigError::Invalid(f)) => {
                            for e in f {
                                let named = KEYS.iter().any(|(s, k)| {
                                    e.field.starts_with(&format!("{s}.{k}"))
                                });
                                prop_assert!(named, "{} names no key", e.field);
                            }
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    Err(ConfigError::Parse(msg)) => {
                        let named = KEYS.iter().any(|(_, k)| msg.contains(k));
                        prop_assert!(named, "parse error names no key: {msg}");
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }

            /// Environment values of any shape never panic the override parser.
            #[test]
            fn env_values(k in 0usize..KEYS.len(), raw in "\\PC{0,30}") {
                let (section, field) = KEYS[k];
                let var = format!("DWCP_{}__{}", section.to_uppercase(), field.to_uppercase());
                if let Ok(c) = Config::from_toml("", vec![(var, raw)]) {
                    let _ = c.validate();
                }
            }

            /// Any in-range stream settings validate; out-of-range ones name the field.
            #[test]
            fn streams(min in 0u32..600, max in 0u32..600) {
                let mut c = Config::default();
                c.transport.min_streams = min;
                c.transport.max_streams = max;
                let ok = (1..=512).contains(&min) && (1..=512).contains(&max) && min <= max;
                match c.validate() {
                    Ok(_) => prop_assert!(ok),
                    Err(ConfigError::Invalid(f)) => {
                        prop_assert!(!ok);
                        prop_assert!(f.iter().all(|e| e.field.starts_with("transport.")));
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }
    }
}
