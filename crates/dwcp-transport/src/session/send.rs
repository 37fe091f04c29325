//! Sending files over a transfer session: the driver around [`Scheduler`].
//!
//! ```text
//!   stream 0 ── writer task ──┐                ┌── reader task ── stream 0
//!   stream 1 ── writer task ──┤  Core (lock):  ├── reader task ── stream 1
//!   ...                       │  scheduler,    │   ...
//!                             │  source, hash  │
//!                             └──── notify ────┴─> events (ACK, OBJECT_DONE, stream lost)
//! ```
//!
//! Writer tasks take the next chunk from the scheduler and from the [`SourceReader`] under the
//! same lock (the reader thread reads and hashes the file in order, ahead of them) and write
//! it out.
//! The main loop feeds acknowledgements back, notices dead streams (their chunks go to the
//! others) and sends `OBJECT_END` once every byte has been read. If every stream dies, the
//! whole session is opened again and the receiver says where to resume.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dwcp_encoding::RemoteIndex;
use dwcp_wire::data::{
    self, Ack, BaseInfo, BaseQuery, Migration, ObjectBegin, ObjectDone, ObjectEnd, ObjectState,
    SessionJoin,
};
use dwcp_wire::msg::{self, Ping};
use dwcp_wire::{ErrorCode, Frame, FrameType, HandshakeError, NodeId, Version};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::adapt::{Controller, Mode};
use super::delta::{self, DeltaOptions, DeltaReport, Encoded};
use super::sched::{Next, Scheduler};
use super::source::SourceReader;
use super::tcp::{TcpCounts, TcpWatch};
use crate::conn::{AnyConnection, AnyWriter, Carrier, ConnError, Endpoint, Stage, connect_to};
use crate::quic::{self, QuicPeer};
use dwcp_sys::TcpProbe;

type Writer = AnyWriter;

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Parallel connections to open (capped by what the peer negotiates; 1 in v1); unused
    /// when `adaptive`.
    pub streams: u32,
    /// Adapt the stream count to the path (`adapt`): start from the mode's default (`mode`,
    /// or detected from the round-trip time) and follow goodput within
    /// `[min_streams, max_streams]`.
    pub adaptive: bool,
    /// Datacenter or internet; `None` detects it from the first round trip.
    pub mode: Option<Mode>,
    /// Fewest streams the adaptive count goes to.
    pub min_streams: u32,
    /// Most streams the adaptive count goes to.
    pub max_streams: u32,
    /// Chunk size in bytes (capped by the negotiated frame size).
    pub chunk: usize,
    /// Most unacknowledged bytes per object: bounds the sender's memory.
    pub window: u64,
    /// How long to keep trying to reconnect after the session broke.
    pub retry_for: Duration,
    /// Cap on the session's sending rate, bytes per second.
    pub rate_limit: Option<u64>,
    /// A cap shared with other sessions (and tunnels); instead of `rate_limit` when set.
    pub limit: Option<RateLimit>,
    /// Delta encoding (HDE), used with receivers that negotiated it.
    pub delta: DeltaOptions,
    /// TCP connections or one QUIC connection.
    pub carrier: Carrier,
    /// The receiver holds none of these files (each has a name and version tag it has never
    /// seen, as a migration round does): the first attempt at each starts writing data on
    /// the stream of its `OBJECT_BEGIN` at once, a round trip sooner, and the other streams
    /// join once the receiver answered. Resumed after a reconnection, a file waits as usual.
    pub fresh: bool,
    /// Something waits on each of these objects (a migration's final round, with the guest
    /// paused): one up to [`URGENT_MAX`] bytes goes in chunks small enough to spread over
    /// every stream, and each chunk goes on a second stream as soon as one is idle, so that
    /// a packet lost on one stream does not hold the object for its retransmission. Costs
    /// the object's size again on the wire. A larger one, up to 16 MiB, goes once, and the
    /// receiver lists what it holds beyond a hole: once every chunk is out, a chunk below
    /// one it holds goes again on another stream after a round trip and a quarter.
    pub urgent: bool,
    /// The receiver was reached before, for the same work (a migration's earlier steps): a
    /// first connection that fails is retried for [`SendOptions::retry_for`] as a lost one
    /// would be, rather than reported at once. A link that went down between a migration's
    /// rounds must not end it sooner than one that went down during a round.
    pub reached: bool,
}

/// Largest object sent twice when [`SendOptions::urgent`]: on a 100 Mbit/s link the copy
/// costs at most about 80 ms, less than the round trip or more a tail loss costs.
pub const URGENT_MAX: u64 = 1 << 20;

/// Smallest chunk of an urgent object.
const URGENT_CHUNK_MIN: usize = 16 * 1024;

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            streams: 8,
            // 256 KiB: big enough that per-frame costs vanish, small enough that a lost stream
            // strands little data and striping stays even.
            chunk: 256 * 1024,
            // 32 MiB: several bandwidth-delay products of a 1 Gbit/s, 40 ms path.
            window: 32 * 1024 * 1024,
            retry_for: Duration::from_secs(60),
            rate_limit: None,
            limit: None,
            delta: DeltaOptions::default(),
            fresh: false,
            urgent: false,
            reached: false,
            adaptive: false,
            mode: None,
            min_streams: 4,
            max_streams: 512,
            carrier: Carrier::Tcp,
        }
    }
}

/// A file to send.
#[derive(Debug, Clone)]
pub struct Source {
    /// Where it is.
    pub path: PathBuf,
    /// Name at the receiver (the file name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Size and modification time, so a changed file is not resumed onto an old copy.
    pub version_tag: String,
    /// Set when the file already is an encoded object (e.g. a migration round): sent as is,
    /// announced with these `ObjectBegin` fields (encoding, content size, content digest).
    pub pre_encoded: Option<(u32, u64, Vec<u8>)>,
    /// For an in-place migration round: the receiver commits the migration target once the
    /// round is applied, and its success answer says so (protocol v6; refused before the
    /// begin goes out with an older receiver).
    pub commit: bool,
    /// For an in-place migration round: at most how many bytes of non-zero pages it writes
    /// at the receiver ([`ObjectBegin::writes`]); `None` lets the receiver count its whole
    /// target.
    pub writes: Option<u64>,
}

impl Source {
    /// Describes the file at `path`.
    pub fn file(path: &Path) -> Result<Self, SendError> {
        let meta = std::fs::metadata(path).map_err(|source| SendError::Source {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(SendError::Source {
                path: path.to_path_buf(),
                source: std::io::Error::other("not a regular file"),
            });
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| SendError::Source {
                path: path.to_path_buf(),
                source: std::io::Error::other("file name is not UTF-8"),
            })?
            .to_string();
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            path: path.to_path_buf(),
            name,
            size: meta.len(),
            version_tag: format!("size={} mtime_ns={mtime}", meta.len()),
            pre_encoded: None,
            commit: false,
            writes: None,
        })
    }
}

/// Where a transfer is.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Current object.
    pub name: String,
    /// Its acknowledged bytes.
    pub object_acked: u64,
    /// Its size.
    pub object_size: u64,
    /// Acknowledged bytes of all objects.
    pub total_acked: u64,
    /// Size of all objects.
    pub total_size: u64,
    /// Streams alive now.
    pub streams: usize,
    /// What the session measures of the path.
    pub link: LinkStats,
}

/// What a session measures of its path while it sends: the round trip of heartbeats
/// (`PING`/`PONG` every second on one of its streams, so under load: it includes what waits
/// in that stream's socket buffer), acknowledged goodput, and what QUIC says it lost. For the
/// mode detector and the bandwidth predictor, and for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkStats {
    /// The latest heartbeat's round trip.
    pub rtt: Option<Duration>,
    /// Shortest heartbeat round trip.
    pub rtt_min: Option<Duration>,
    /// Longest heartbeat round trip.
    pub rtt_max: Option<Duration>,
    /// Mean heartbeat round trip.
    pub rtt_mean: Option<Duration>,
    /// Heartbeats answered.
    pub heartbeats: u32,
    /// Bytes per second acknowledged by the receiver over the last heartbeat interval.
    pub goodput_bps: f64,
    /// Packets QUIC declared lost (QUIC sessions only: TCP's retransmissions are the
    /// kernel's and not counted here).
    pub lost_packets: Option<u64>,
    /// Congestion events QUIC's controller saw (QUIC sessions only).
    pub congestion_events: Option<u64>,
    /// What the kernel counted on the streams (TCP sessions on Linux only): TCP's own
    /// retransmissions, segments and bytes sent, since the transfer began.
    pub tcp: Option<TcpCounts>,
}

impl LinkStats {
    fn sample(&mut self, rtt: Duration) {
        let n = self.heartbeats;
        self.rtt = Some(rtt);
        self.rtt_min = Some(self.rtt_min.map_or(rtt, |m| m.min(rtt)));
        self.rtt_max = Some(self.rtt_max.map_or(rtt, |m| m.max(rtt)));
        self.rtt_mean = Some(self.rtt_mean.map_or(rtt, |m| (m * n + rtt) / (n + 1)));
        self.heartbeats = n.saturating_add(1);
    }
}

/// Heartbeat sequence numbers start here, apart from the probes'.
const HEARTBEAT_SEQ: u64 = 1 << 32;
/// How often a session's streams say they are alive: heartbeats while an object is sent,
/// pings while the next is encoded.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// The sequence number of `Carrier::Auto`'s round-trip probe (the mode probe uses `0x5eed`).
const AUTO_PROBE_SEQ: u64 = 0xa070;

/// One object's outcome.
#[derive(Debug, Clone)]
pub struct ObjectReport {
    /// Name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Bytes the receiver already held when this transfer (last attempt) began, of what
    /// crosses the wire: for a delta-encoded object, of its encoding.
    pub resumed_from: u64,
    /// Seconds from first `OBJECT_BEGIN` to verified.
    pub seconds: f64,
    /// What delta encoding did, when the object was sent encoded.
    pub delta: Option<DeltaReport>,
    /// What the receiver said with its verdict (`OBJECT_DONE`'s reason on success: empty,
    /// or for a migration round that commits, JSON with the commit's time; PROTOCOL.md).
    pub answer: String,
}

/// What a whole transfer did.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    /// Per object.
    pub objects: Vec<ObjectReport>,
    /// Payload bytes written to streams, re-sent chunks included.
    pub bytes_sent: u64,
    /// Bytes sent more than once (chunks of streams that died).
    pub resent_bytes: u64,
    /// Most streams in use at once.
    pub streams: u32,
    /// Streams that died during the transfer.
    pub streams_lost: u32,
    /// Dead streams replaced by new connections.
    pub streams_replaced: u32,
    /// Streams added by the adaptive count.
    pub streams_added: u32,
    /// Streams retired by the adaptive count.
    pub streams_retired: u32,
    /// Streams dropped because they were still stuck in the middle of a chunk after an object
    /// was done (its chunks had gone again on the others); each is dialled again.
    pub streams_stuck: u32,
    /// Streams at the end.
    pub streams_final: u32,
    /// The mode the adaptive count started from, and the round trip it was detected from.
    pub mode: Option<(Mode, Duration)>,
    /// Sessions opened again after the previous one broke.
    pub reconnects: u32,
    /// Protocol version of the last session.
    pub version: Option<Version>,
    /// What the last session's streams rode on (never `Auto`).
    pub carrier: Option<Carrier>,
    /// What the sessions measured of the path.
    pub link: LinkStats,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// A local file could not be read (or encoded: its temporary copy).
    #[error("cannot send {path}: {source}")]
    Source {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No session could be (re-)established in time.
    #[error("cannot reach the receiver: {0}")]
    Connect(#[source] ConnError),
    /// The receiver refused or failed an object.
    #[error("receiver failed {name:?}: {code}: {reason}")]
    Refused {
        /// Object name.
        name: String,
        /// Code it sent.
        code: ErrorCode,
        /// Reason it gave.
        reason: String,
    },
    /// The receiver broke the protocol.
    #[error("receiver misbehaved: {0}")]
    Protocol(String),
    /// Every stream broke and reconnecting did not succeed within the retry period.
    #[error("transfer interrupted and not resumed within {retry_for:?}: {last}")]
    Interrupted {
        /// The retry budget.
        retry_for: Duration,
        /// The last failure.
        last: String,
    },
}

impl SendError {
    /// The code announced to the receiver when the transfer is given up for this reason.
    fn close_code(&self) -> ErrorCode {
        match self {
            Self::Refused { code, .. } => *code,
            Self::Source { .. } => ErrorCode::INTERNAL_ERROR,
            _ => ErrorCode::PROTOCOL_ERROR,
        }
    }

    /// The underlying connection error, if any (for exit codes).
    pub fn conn(&self) -> Option<&ConnError> {
        match self {
            Self::Connect(e) => Some(e),
            _ => None,
        }
    }
}

enum Event {
    Frame(Frame),
    /// Stream `index` of generation `generation` ended, and why.
    Lost(u32, u64, String),
}

/// Sequence number of [`KeptSession::keepalive`]'s pings (their pongs are not waited for).
const KEEPALIVE_SEQ: u64 = 0x6b61_u64;
/// How long a keepalive ping may wait for its stream (it is small and the stream idle: a
/// stream that cannot take it this soon is failing, and its reader says so).
const KEEPALIVE_WRITE: Duration = Duration::from_millis(500);

/// Why a stream ended when the receiver closed it cleanly (after answering our `GOAWAY`, every
/// frame sent before it was read).
const CLOSED_BY_RECEIVER: &str = "closed by the receiver";

/// A stream slot: the generation of the connection in it (a replacement gets a new one, so
/// late news about its predecessor is not mistaken for news about it) and its writer.
type Slot = Option<(u64, Arc<Mutex<Writer>>)>;
/// A stream just opened, with a probe of its socket when it is TCP.
type Dialed = (AnyConnection, Option<TcpProbe>);

/// A session's TCP connection, bounded in how long its data may go unacknowledged (see
/// [`super::tunnel::SILENT_LIMIT`]): with every stream on a path gone silent, no stream
/// would fail (nor the session be resumed) until TCP's own retries ran out, some 15
/// minutes; a receiver's window shut for a while (a slow disk) is not taken for that.
fn tcp_dialed(c: crate::Connection<tokio::net::TcpStream>) -> Dialed {
    if let Err(e) = c.set_user_timeout(super::tunnel::SILENT_LIMIT) {
        debug!("cannot bound unacknowledged time (TCP_USER_TIMEOUT): {e}");
    }
    let probe = c.tcp_probe();
    (c.boxed(), probe)
}

/// How many streams a session opens.
#[derive(Debug, Clone)]
enum StreamPlan {
    Fixed(u32),
    Adaptive {
        min: u32,
        max: u32,
        mode: Option<Mode>,
        /// Bytes left to send, so a small transfer does not open 64 streams.
        bytes: u64,
        chunk: usize,
    },
}

impl StreamPlan {
    /// The streams `opts` asks for, for a transfer of `bytes`.
    fn of(opts: &SendOptions, bytes: u64) -> Self {
        if opts.adaptive {
            Self::Adaptive {
                min: opts.min_streams,
                max: opts.max_streams,
                mode: opts.mode,
                bytes,
                chunk: opts.chunk,
            }
        } else {
            Self::Fixed(opts.streams)
        }
    }
}

/// A cap on sending rate, in bytes a second: a token bucket shared by every stream of every
/// session and tunnel given a clone of it (a migration's sessions and its tunnel share one
/// cap, whatever the number of connections). Sessions take a chunk's payload from it before
/// they write the chunk; a tunnel connection takes a whole frame after writing it.
#[derive(Debug, Clone)]
pub struct RateLimit(Arc<Bucket>);

#[derive(Debug)]
struct Bucket {
    /// Bytes a second; changed by [`RateLimit::set`].
    rate: AtomicU64,
    /// Tokens (negative: debt), and when they were counted (tokio's clock, which tests can
    /// pause).
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimit {
    /// A cap of `rate` bytes a second (at least 1).
    pub fn new(rate: u64) -> Self {
        Self(Arc::new(Bucket {
            rate: AtomicU64::new(rate.max(1)),
            state: Mutex::new((0.0, tokio::time::Instant::now())),
        }))
    }

    /// The cap, bytes a second.
    pub fn rate(&self) -> u64 {
        self.0.rate.load(Ordering::Relaxed)
    }

    /// Changes the cap for every session and tunnel that shares it, from their next bytes on.
    pub fn set(&self, rate: u64) {
        self.0.rate.store(rate.max(1), Ordering::Relaxed);
    }

    /// Takes `n` bytes' worth of tokens, sleeping off any debt. Bursts are capped at 50 ms of
    /// rate so an idle period does not turn into a spike.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.0.state.lock().await;
            let rate = self.rate() as f64;
            let now = tokio::time::Instant::now();
            let burst = rate * 0.05;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / rate))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

/// Opens a session's streams: TCP connections (each with its own TLS session), or streams of
/// one QUIC connection.
#[derive(Debug, Clone)]
enum Dialer {
    Tcp {
        endpoint: Endpoint,
        addr: std::net::SocketAddr,
    },
    Quic {
        endpoint: Endpoint,
        conn: QuicPeer,
    },
}

impl Dialer {
    /// Opens the first stream of a session, and the dialer for the others.
    async fn first(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        carrier: Carrier,
        mode: Option<Mode>,
    ) -> Result<(Self, Dialed), ConnError> {
        let endpoint = endpoint.clone();
        match carrier {
            Carrier::Tcp | Carrier::Auto => {
                let mut c = connect_to(&endpoint, addr, expected).await?;
                let cc = c.congestion();
                // Unknown (not Linux): keep TCP.
                let loss_based = cc.as_deref().is_some_and(|cc| !cc.starts_with("bbr"));
                let offers_quic = c.established().version >= Version::V3
                    && c.established().peer_capabilities.quic;
                if carrier == Carrier::Auto && loss_based && offers_quic {
                    // The path decides: QUIC (user-space BBR) only pays on long, lossy paths.
                    let internet = match mode {
                        Some(m) => m == Mode::Internet,
                        None => match c.ping(AUTO_PROBE_SEQ, Duration::from_secs(2)).await {
                            Ok(r) => Mode::for_rtt(r) == Mode::Internet,
                            // No answer within 2 s: a long path, if anything.
                            Err(ConnError::Timeout { .. }) => true,
                            // The receiver refused the probe: stay on TCP, on a new connection.
                            Err(e) => {
                                debug!("round-trip probe failed ({e}); staying on TCP");
                                c = connect_to(&endpoint, addr, expected).await?;
                                false
                            }
                        },
                    };
                    if internet {
                        let peer = c.established().peer_node_id.clone();
                        match Self::first_quic(endpoint.clone(), addr, Some(&peer)).await {
                            Ok(quic) => {
                                info!(tcp_congestion = ?cc, "internet path, TCP without BBR: using QUIC");
                                c.close(ErrorCode::NO_ERROR, "switching to QUIC").await;
                                return Ok(quic);
                            }
                            Err(e) => warn!("QUIC unavailable ({e}); staying on TCP"),
                        }
                    }
                }
                Ok((Self::Tcp { endpoint, addr }, tcp_dialed(c)))
            }
            Carrier::Quic => Self::first_quic(endpoint, addr, expected).await,
        }
    }

    async fn first_quic(
        endpoint: Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
    ) -> Result<(Self, Dialed), ConnError> {
        let conn = quic::dial(&endpoint, addr, expected).await?;
        let c = conn.open(&endpoint).await?;
        Ok((Self::Quic { endpoint, conn }, (c.boxed(), None)))
    }

    fn carrier(&self) -> Carrier {
        match self {
            Self::Tcp { .. } => Carrier::Tcp,
            Self::Quic { .. } => Carrier::Quic,
        }
    }

    /// Opens one more stream to `peer`.
    async fn dial(&self, peer: &NodeId) -> Result<Dialed, ConnError> {
        match self {
            Self::Tcp { endpoint, addr, .. } => connect_to(endpoint, *addr, Some(peer))
                .await
                .map(tcp_dialed),
            Self::Quic { endpoint, conn } => conn.open(endpoint).await.map(|c| (c.boxed(), None)),
        }
    }

    /// Closes what the streams share (the QUIC connection).
    async fn close(&self) {
        if let Self::Quic { conn, .. } = self {
            conn.close().await;
        }
    }
}

struct Session {
    writers: Vec<Slot>,
    events: mpsc::Receiver<Event>,
    readers: JoinSet<()>,
    version: Version,
    /// Whether the receiver takes delta-encoded objects.
    delta: bool,
    /// The adaptive stream count, when on.
    ctl: Option<Controller>,
    /// Slots retired by it: their writers stop taking chunks.
    retired: Arc<std::sync::Mutex<HashSet<u32>>>,
    /// Round trip measured at open (adaptive sessions).
    rtt: Option<Duration>,
    mode: Option<Mode>,
    /// What is needed to open replacement streams.
    dialer: Dialer,
    /// Streams being opened (at the start, as replacements, or to grow): they join when
    /// ready, while the others already carry data.
    joining: JoinSet<(u32, Result<Dialed, ConnError>)>,
    /// Slots of the streams opened with the session that have not joined yet.
    opening: HashSet<u32>,
    peer: NodeId,
    id: [u8; 16],
    tx: mpsc::Sender<Event>,
    next_gen: u64,
    /// Heartbeat timestamps count from here.
    epoch: Instant,
    next_heartbeat: u64,
    /// The heartbeat being written, if any: one at a time.
    beating: Option<tokio::task::JoinHandle<()>>,
    /// What the kernel counts on the TCP streams.
    tcp: TcpWatch,
}

impl Session {
    async fn open(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        plan: &StreamPlan,
        carrier: Carrier,
        mode: Option<Mode>,
    ) -> Result<Self, ConnError> {
        // A receiver that answered but dropped or stalled the handshake may just be busy (a
        // storm of handshakes on a loaded host): two more tries before giving up.
        let t_open = Instant::now();
        let mut tries = 0u32;
        let (dialer, first) = loop {
            match Dialer::first(endpoint, addr, expected, carrier, mode).await {
                Ok(x) => break x,
                Err(e)
                    if tries < 2
                        && matches!(
                            e,
                            ConnError::Closed(Stage::Tls | Stage::Handshake)
                                | ConnError::Timeout {
                                    stage: Stage::Tls | Stage::Handshake,
                                    ..
                                }
                        ) =>
                {
                    tries += 1;
                    debug!("handshake failed ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(200) * tries).await;
                }
                Err(e) => return Err(e),
            }
        };
        let est = first.0.established().clone();
        // The first stream's handshake exchange is a round trip: enough to choose the mode,
        // without a ping that would hold up the first byte by one more.
        let handshake_rtt = first.0.handshake_time();
        let streams = match plan {
            StreamPlan::Fixed(n) => *n,
            StreamPlan::Adaptive { .. } => 1,
        };
        let n = streams.clamp(1, est.negotiated.max_streams.max(1));
        let id: [u8; 16] = rand_id();
        let (tx, events) = mpsc::channel(1024);
        let mut session = Self {
            writers: Vec::new(),
            events,
            readers: JoinSet::new(),
            version: est.version,
            delta: est.negotiated.delta,
            ctl: None,
            retired: Arc::default(),
            rtt: None,
            mode: None,
            dialer,
            joining: JoinSet::new(),
            opening: HashSet::new(),
            peer: est.peer_node_id.clone(),
            id,
            tx,
            next_gen: 0,
            epoch: Instant::now(),
            next_heartbeat: HEARTBEAT_SEQ,
            beating: None,
            tcp: TcpWatch::default(),
        };
        session.add(0, first).await?;
        let dial = |session: &mut Self, range: std::ops::Range<u32>| {
            for i in range {
                session.dial(i);
                session.opening.insert(i);
            }
        };
        let n = match plan {
            StreamPlan::Fixed(_) => {
                dial(&mut session, 1..n);
                n
            }
            StreamPlan::Adaptive {
                min,
                max,
                mode,
                bytes,
                chunk,
            } => {
                let max = (*max).min(est.negotiated.max_streams.max(1));
                let min = (*min).min(max);
                // No more streams than there are chunks to keep them busy.
                let useful = u32::try_from(bytes / (*chunk as u64).max(1) / 4)
                    .unwrap_or(u32::MAX)
                    .max(1);
                let start = |mode: Mode| mode.initial_streams().min(useful).clamp(min, max);
                // The fewer streams of either mode open while the round trip is measured;
                // a datacenter path gets the rest after.
                let early = start(Mode::Internet).min(start(Mode::Datacenter));
                dial(&mut session, 1..early);
                let rtt = Some(handshake_rtt);
                let mode = mode.unwrap_or_else(|| Mode::for_rtt(handshake_rtt));
                let n = start(mode).max(early);
                dial(&mut session, early..n);
                // Short paths reach speed at once: one settling sample is enough there.
                let settle = if mode == Mode::Datacenter { 1 } else { 2 };
                let ctl = Controller::for_mode(min, max, settle, mode);
                // Across the internet a retired stream's share takes seconds to reclaim
                // (see `adapt`): climb, but never probe below the best count.
                session.ctl = Some(if mode == Mode::Internet {
                    ctl.holding_after_up()
                } else {
                    ctl
                });
                session.rtt = rtt;
                session.mode = Some(mode);
                info!(
                    ?mode,
                    rtt_ms = rtt.map(|r| r.as_secs_f64() * 1e3),
                    streams = n,
                    "adaptive streams"
                );
                n
            }
        };
        // The other streams open in parallel and join as they come, while the first carries
        // data: waiting for them would hold up the first byte by a whole handshake (three
        // round trips, and a lost SYN costs a 1 s retransmit timeout). A stream that cannot
        // be opened is logged and skipped.
        session.writers.resize_with(n as usize, || None);
        debug!(
            opening = session.opening.len(),
            first_ms = t_open.elapsed().as_secs_f64() * 1e3,
            "first stream open; the others join while data flows"
        );
        Ok(session)
    }

    /// Starts opening a stream for slot `i`; it joins through `joining`.
    fn dial(&mut self, i: u32) {
        let (dialer, peer) = (self.dialer.clone(), self.peer.clone());
        self.joining
            .spawn(async move { (i, dialer.dial(&peer).await) });
    }

    /// A one-stream TCP session for requests (base queries, migration control).
    async fn control(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
    ) -> Result<Self, ConnError> {
        Self::open(
            endpoint,
            addr,
            expected,
            &StreamPlan::Fixed(1),
            Carrier::Tcp,
            None,
        )
        .await
    }

    /// Puts `conn` into slot `index`; returns the stream's generation.
    async fn add(&mut self, index: u32, (conn, probe): Dialed) -> Result<u64, ConnError> {
        let (mut reader, mut writer) = conn.split();
        let join = SessionJoin {
            session_id: self.id.to_vec(),
            stream_index: index,
        };
        writer.send(&msg::encode(FrameType::SESSION, &join)).await?;
        if self.writers.len() <= index as usize {
            self.writers.resize_with(index as usize + 1, || None);
        }
        let generation = self.next_gen;
        self.next_gen += 1;
        self.writers[index as usize] = Some((generation, Arc::new(Mutex::new(writer))));
        if let Some(probe) = probe {
            self.tcp.watch(index, generation, probe);
        }
        let tx = self.tx.clone();
        self.readers.spawn(async move {
            let why = loop {
                match reader.recv().await {
                    Ok(Some(f)) => {
                        if tx.send(Event::Frame(f)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break CLOSED_BY_RECEIVER.to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            let _ = tx.send(Event::Lost(index, generation, why)).await;
        });
        Ok(generation)
    }

    /// A PING on every stream (answered, its answer not waited for): the receiver's idle
    /// timer sees the session alive while nothing else goes (a file being encoded).
    async fn ping_streams(&self) {
        let ping = msg::encode(
            FrameType::PING,
            &Ping {
                seq: KEEPALIVE_SEQ,
                ..Ping::default()
            },
        );
        let writers: Vec<Arc<Mutex<Writer>>> = self
            .writers
            .iter()
            .flatten()
            .map(|(_, w)| w.clone())
            .collect();
        for w in writers {
            // Bounded: a stream that cannot take a frame in this time is failing anyway, and
            // its reader reports it.
            let _ =
                tokio::time::timeout(KEEPALIVE_WRITE, async { w.lock().await.send(&ping).await })
                    .await;
        }
    }

    /// Takes the events that came while nothing waited for them (a kept session between
    /// requests): a stream the receiver closed meanwhile (its idle timeout, say) leaves the
    /// session, so that no request goes out on it. Nothing was outstanding on it, so nothing
    /// is lost with it.
    async fn settle(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            if let Event::Lost(i, g, why) = ev {
                on_lost(self, &mut SendReport::default(), i, g, &why, None).await;
            }
        }
    }

    /// One PING/PONG on stream 0, for the mode; `None` if no answer within 2 s.
    async fn round_trip(&mut self) -> Option<Duration> {
        let w = self.any_writer()?;
        let seq = 0x5eed_u64;
        let t = Instant::now();
        w.lock()
            .await
            .send(&msg::encode(
                FrameType::PING,
                &Ping {
                    seq,
                    ..Ping::default()
                },
            ))
            .await
            .ok()?;
        let deadline = t + Duration::from_secs(2);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.events.recv())
                .await
                .ok()??
            {
                Event::Frame(f) if f.ty == FrameType::PONG => {
                    let p: Ping = msg::decode(&f).ok()?;
                    if p.seq == seq {
                        return Some(t.elapsed());
                    }
                }
                Event::Frame(_) => {}
                // Taken off the channel here, so dropped from the session here too (a later
                // `settle` no longer sees it, and no request may go out on that stream).
                Event::Lost(i, g, why) => {
                    on_lost(self, &mut SendReport::default(), i, g, &why, None).await;
                    return None;
                }
            }
        }
    }

    /// Sends a heartbeat on one stream, stamped when it is written (after any chunk that
    /// holds the stream), without waiting for it here.
    fn heartbeat(&mut self) {
        if self.beating.as_ref().is_some_and(|t| !t.is_finished()) {
            return; // the last one is still waiting for its stream: no pile-up
        }
        let Some(w) = self.any_writer() else {
            return;
        };
        let (seq, epoch) = (self.next_heartbeat, self.epoch);
        // What TCP counted since the last heartbeat, for the receiver's metrics.
        let tcp = self.tcp.unreported();
        self.next_heartbeat += 1;
        self.beating = Some(tokio::spawn(async move {
            // Bounded: a stalled stream must not keep this task (and its stream) alive.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let mut w = w.lock().await;
                let ping = Ping {
                    seq,
                    timestamp_micros: u64::try_from(epoch.elapsed().as_micros())
                        .unwrap_or(u64::MAX),
                    sender_tcp_retransmits: tcp.retransmits,
                    sender_tcp_segments: tcp.segments_sent,
                };
                // A failed write shows up as a lost stream in the reader.
                let _ = w.send(&msg::encode(FrameType::PING, &ping)).await;
            })
            .await;
        }));
    }

    /// The round trip of a heartbeat's `PONG`; `None` for other pongs and for stamps that
    /// cannot be ours (the receiver echoes them; it is trusted with nothing more).
    fn heartbeat_rtt(&self, f: &Frame) -> Option<Duration> {
        let p: Ping = msg::decode(f).ok()?;
        if !(HEARTBEAT_SEQ..self.next_heartbeat).contains(&p.seq) {
            return None;
        }
        let now = u64::try_from(self.epoch.elapsed().as_micros()).ok()?;
        now.checked_sub(p.timestamp_micros)
            .map(Duration::from_micros)
    }

    /// What QUIC counted on this session's connection.
    fn quic_counts(&self) -> Option<(u64, u64)> {
        match &self.dialer {
            Dialer::Quic { conn, .. } => {
                let s = conn.stats();
                Some((s.path.lost_packets, s.path.congestion_events))
            }
            Dialer::Tcp { .. } => None,
        }
    }

    /// The generation of the stream in slot `index`, if one is alive there.
    fn generation(&self, index: u32) -> Option<u64> {
        self.writers
            .get(index as usize)
            .and_then(|s| s.as_ref().map(|(g, _)| *g))
    }

    fn alive(&self) -> usize {
        self.writers.iter().flatten().count()
    }

    /// A live stream's slot, generation and writer: a request sent on it is answered on it,
    /// so its loss is the request's.
    fn first_writer(&self) -> Option<(u32, u64, Arc<Mutex<Writer>>)> {
        self.writers
            .iter()
            .enumerate()
            .find_map(|(i, w)| w.as_ref().map(|(g, w)| (i as u32, *g, w.clone())))
    }

    /// Adds the streams that finished opening meanwhile. Only objects poll `joining`; a
    /// stream left there has not introduced itself, and a receiver drops such a connection
    /// after its idle timeout.
    async fn adopt_joined(&mut self) {
        while let Some(r) = self.joining.try_join_next() {
            match r {
                Ok((i, Ok(conn))) => {
                    self.opening.remove(&i);
                    if let Err(e) = self.add(i, conn).await {
                        warn!(stream = i, "stream failed to join: {e}");
                    }
                }
                Ok((i, Err(e))) => {
                    self.opening.remove(&i);
                    warn!(stream = i, "cannot open stream: {e}");
                }
                Err(e) => warn!("stream dial task failed: {e}"),
            }
        }
    }

    fn any_writer(&self) -> Option<Arc<Mutex<Writer>>> {
        self.writers
            .iter()
            .find_map(|w| w.as_ref().map(|(_, w)| w.clone()))
    }

    /// Says goodbye on every stream (`NO_ERROR` only when the transfer is complete) and
    /// waits briefly for the receiver to close.
    async fn close(mut self, code: ErrorCode, reason: &str) {
        // Not aborted: it carries counts already taken from the watch (bounded at 2 s).
        if let Some(t) = self.beating.take() {
            let _ = t.await;
        }
        // TCP's counts since the last heartbeat, ahead of the goodbye on the same stream: a
        // transfer shorter than a heartbeat's second is counted at the receiver too.
        let tcp = self.tcp.unreported();
        if tcp.segments_sent > 0
            && let Some(w) = self.any_writer()
        {
            let ping = Ping {
                seq: self.next_heartbeat,
                sender_tcp_retransmits: tcp.retransmits,
                sender_tcp_segments: tcp.segments_sent,
                ..Ping::default()
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = w
                    .lock()
                    .await
                    .send(&msg::encode(FrameType::PING, &ping))
                    .await;
            })
            .await;
        }
        for (_, w) in self.writers.into_iter().flatten() {
            // The lock too is bounded: a writer stuck in a dead stream must not hold us.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = w.lock().await.goodbye(code, reason).await;
            })
            .await;
        }
        let mut readers = self.readers;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while readers.join_next().await.is_some() {}
        })
        .await;
        readers.abort_all();
        // Only now: closing a QUIC connection drops what its streams have not delivered.
        self.dialer.close().await;
    }
}

pub(crate) fn rand_id() -> [u8; 16] {
    // Session ids only need to be unique between two nodes, not secret: peers are already
    // authenticated and sessions are scoped to the peer's node id.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let h = blake3::hash(&[&t.to_le_bytes()[..], &std::process::id().to_le_bytes()].concat());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.as_bytes()[..16]);
    id
}

struct Core {
    sched: Scheduler,
    source: SourceReader,
    /// Bytes the receiver last said it holds, beyond its prefix too.
    held: u64,
}

/// Bytes delivered, for goodput samples: what the receiver holds, beyond its prefix too. The
/// prefix alone moves in jumps (a chunk late on one stream holds it, then it leaps), and over
/// the 250 ms samples of a short path that spread them by more than the controller's 10 %
/// bars (`dc`, 2026-12-04: 64 streams went to 32 and back to 64 on a host where one stream
/// moved the most).
/// A receiver's claim counts up to what was sent at most: it steers the stream count.
fn delivered(c: &Core) -> u64 {
    c.held.min(c.sched.read()).max(c.sched.acked())
}

/// How long a sender waits before it begins again an object the receiver was busy with
/// ([`ErrorCode::BUSY`]).
const BUSY_RETRY: Duration = Duration::from_secs(2);
/// How long a sender keeps asking a busy receiver at least: longer than a receiver's idle
/// timeout (120 s by default), after which it drops the connections of a sender gone silent.
const BUSY_PATIENCE: Duration = Duration::from_secs(150);

/// Why one object's transfer stopped.
enum ObjectFailure {
    /// The session broke; try again on a new one.
    SessionLost(String),
    /// Final.
    Fatal(SendError),
}

/// Sends `files` to the node at `addr`, one after another over one session, resuming after
/// interruptions. `progress` is called as acknowledgements arrive.
pub async fn send_files(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    files: &[Source],
    opts: &SendOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<SendReport, SendError> {
    // A one-off transfer: the session closes at the end.
    let mut kept = KeptSession::default();
    send_files_kept(endpoint, addr, expected, files, opts, progress, &mut kept).await
}

/// A session kept open between transfers to the same receiver (live-migration rounds), so
/// that each does not pay connection set-up again. Close it with [`KeptSession::close`].
#[derive(Default)]
pub struct KeptSession {
    session: Option<Session>,
    object_id: u64,
    keep: bool,
    /// Told when an object sent here has been begun at the receiver and its end is out (see
    /// [`KeptSession::notify_ended`]).
    ended: Option<Arc<Notify>>,
}

impl std::fmt::Debug for KeptSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptSession")
            .field("open", &self.session.is_some())
            .field("object_id", &self.object_id)
            .finish()
    }
}

impl KeptSession {
    /// Nothing open yet; [`send_files_kept`] opens it and leaves it open.
    pub fn new() -> Self {
        Self {
            keep: true,
            ..Self::default()
        }
    }

    /// Opens now the session that [`send_files_kept`] with `opts` would open for `bytes` of
    /// data, so that its handshakes are out of the way: requests made on `self` meanwhile
    /// ([`query_base_kept`], [`migration_op_kept`]) go on its first stream while the others
    /// connect (and join at the next request or object). Nothing to do when a session is
    /// open already, whatever its streams (a request on an empty `self` opens a one-stream
    /// session and keeps it: open this first).
    pub async fn open(
        &mut self,
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        opts: &SendOptions,
        bytes: u64,
    ) -> Result<(), SendError> {
        if self.session.as_ref().is_some_and(|s| s.alive() > 0) {
            return Ok(());
        }
        let plan = StreamPlan::of(opts, bytes);
        let s = Session::open(endpoint, addr, expected, &plan, opts.carrier, opts.mode)
            .await
            .map_err(SendError::Connect)?;
        info!(streams = s.alive(), version = %s.version, "session open");
        self.session = Some(s);
        Ok(())
    }

    /// The kept session if it is alive (and `true`), else a new one-stream control session.
    async fn take_or_control(
        &mut self,
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
    ) -> Result<(Session, bool), SendError> {
        if let Some(s) = self.session.as_mut() {
            s.settle().await;
        }
        match self.session.take().filter(|s| s.alive() > 0) {
            Some(s) => Ok((s, true)),
            None => Session::control(endpoint, addr, expected)
                .await
                .map(|s| (s, false))
                .map_err(SendError::Connect),
        }
    }

    /// The protocol version of the open session, if one is open.
    pub fn version(&self) -> Option<Version> {
        self.session.as_ref().map(|s| s.version)
    }

    /// A new notifier (replacing the one before, and any permit it holds), woken for each
    /// object sent on this session from now on once the receiver has answered its begin,
    /// its last chunk has been taken by a stream and its end has gone out on one: what is
    /// left is its tail (the last chunks' writes and packets, any of them sent again, and
    /// the receiver's verdict). Woken again for an object resumed after a reconnect. A
    /// caller that keeps a second session can start the next object there meanwhile; with a
    /// v5 receiver, migration rounds of one target may overlap so.
    pub fn notify_ended(&mut self) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        self.ended = Some(n.clone());
        n
    }

    /// Keeps an idle kept session open at the receiver, whose agent closes a connection that
    /// is silent for its idle timeout (`protocol.idle_timeout_secs`, 120 s by default): a
    /// `PING` on each live stream (the `PONG`s are taken at the next call or request).
    /// Streams the receiver closed meanwhile leave the session; the next request opens
    /// another. Call it more often than the receiver's idle timeout while the session waits,
    /// e.g. during a migration stream carried by another session.
    ///
    /// Returns whether a stream of the session is still open (false also when none was).
    pub async fn keepalive(&mut self) -> bool {
        let Some(s) = self.session.as_mut() else {
            return false;
        };
        s.settle().await;
        s.ping_streams().await;
        s.alive() > 0
    }

    /// Opens a one-stream control session unless one of this session's streams is open,
    /// so that the next request does not pay the handshakes (when it is on the pause path).
    pub async fn ensure_open(
        &mut self,
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
    ) -> Result<(), SendError> {
        let (session, _) = self.take_or_control(endpoint, addr, expected).await?;
        self.session = Some(session);
        Ok(())
    }

    /// One round trip on the open session (`None` when none is open or no answer came).
    pub async fn round_trip(&mut self) -> Option<Duration> {
        self.session.as_mut()?.round_trip().await
    }

    /// Says goodbye on every stream.
    pub async fn close(mut self) {
        if let Some(s) = self.session.take() {
            s.close(ErrorCode::NO_ERROR, "done").await;
        }
    }
}

/// As [`send_files`], on `kept`'s session when it is alive (opening one otherwise), and
/// leaving it open afterwards when `kept` was made with [`KeptSession::new`] and used here.
pub async fn send_files_kept(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    files: &[Source],
    opts: &SendOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
    kept: &mut KeptSession,
) -> Result<SendReport, SendError> {
    if let Some(f) = files.iter().find(|f| {
        f.commit
            && f.pre_encoded
                .as_ref()
                .is_none_or(|p| p.0 != data::ENCODING_HDE_PAGES_INPLACE)
    }) {
        return Err(SendError::Protocol(format!(
            "{:?}: only an in-place migration round may ask for a commit",
            f.name
        )));
    }
    let started = Instant::now();
    let mut report = SendReport::default();
    let total_size: u64 = files.iter().map(|f| f.size).sum();
    // A cap shared with other sessions wins over one of this session's own.
    let bucket = opts
        .limit
        .clone()
        .or_else(|| opts.rate_limit.map(RateLimit::new));
    let sent = Arc::new(AtomicU64::new(0));
    let mut done_bytes = 0u64;
    let mut next_file = 0usize;
    let mut failing_since: Option<Instant> = None;
    // Since when the receiver has been busy with the file (see `BUSY_PATIENCE`).
    let mut busy_since: Option<Instant> = None;
    let mut ever_connected = opts.reached;
    // Objects already restarted from zero after a failed verification (once each).
    let mut restarted: Vec<usize> = Vec::new();
    // Files encoded for this transfer (kept across reconnects), and files whose delta could
    // not be resolved (sent again without references, once).
    let mut encoded: HashMap<usize, Encoded> = HashMap::new();
    let mut cold: Vec<usize> = Vec::new();
    // Files begun at least once: the receiver may hold part of them.
    let mut begun: HashSet<usize> = HashSet::new();
    let mut backoff = Duration::from_millis(250);
    'sessions: loop {
        let plan = StreamPlan::of(opts, total_size.saturating_sub(done_bytes));
        if let Some(s) = kept.session.as_mut() {
            s.settle().await;
        }
        let reused = kept.session.take().filter(|s| s.alive() > 0);
        let was_open = reused.is_some();
        let opened = match reused {
            Some(s) => Ok(s),
            None => Session::open(endpoint, addr, expected, &plan, opts.carrier, opts.mode).await,
        };
        let mut session = match opened {
            Ok(s) => s,
            Err(e) => {
                let retryable = matches!(
                    e,
                    ConnError::Connect { .. }
                        | ConnError::Timeout { .. }
                        | ConnError::Closed(_)
                        | ConnError::Io { .. }
                );
                // Reconnecting is for resuming an interrupted transfer; a receiver that cannot be
                // reached at all is reported at once.
                if !retryable || !ever_connected {
                    return Err(SendError::Connect(e));
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.retry_for {
                    return Err(SendError::Interrupted {
                        retry_for: opts.retry_for,
                        last: e.to_string(),
                    });
                }
                debug!("reconnect failed ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'sessions;
            }
        };
        ever_connected = true;
        backoff = Duration::from_millis(250);
        // This transfer's TCP counts: from here on this session, after the lost ones'.
        session.tcp.rebase(report.link.tcp);
        report.version = Some(session.version);
        report.carrier = Some(session.dialer.carrier());
        report.streams = report.streams.max(session.alive() as u32);
        if let (Some(m), Some(r)) = (session.mode, session.rtt) {
            report.mode = Some((m, r));
        }
        if was_open {
            debug!(streams = session.alive(), "session reused");
        } else {
            info!(
                streams = session.alive(),
                version = %session.version,
                "session open"
            );
        }
        while next_file < files.len() {
            let src = &files[next_file];
            let t0 = Instant::now();
            // Delta encoding: ask what the receiver holds, encode once per file (a resumed
            // transfer must send the same bytes), then send the encoded object instead.
            let use_delta =
                opts.delta.enabled && session.delta && src.size > 0 && src.pre_encoded.is_none();
            if use_delta && !encoded.contains_key(&next_file) {
                let cold = cold.contains(&next_file);
                kept.object_id += 1;
                let e = match prepare_delta(
                    &mut session,
                    &mut report,
                    src,
                    kept.object_id,
                    cold,
                    &opts.delta,
                )
                .await
                {
                    Ok(e) => e,
                    Err(ObjectFailure::SessionLost(why)) => {
                        warn!(
                            "session lost while preparing {:?}: {why}; reconnecting",
                            src.name
                        );
                        report.reconnects += 1;
                        report.link.tcp = session.tcp.reported();
                        session.readers.abort_all();
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= opts.retry_for {
                            return Err(SendError::Interrupted {
                                retry_for: opts.retry_for,
                                last: why,
                            });
                        }
                        continue 'sessions;
                    }
                    Err(ObjectFailure::Fatal(e)) => {
                        session.close(e.close_code(), &e.to_string()).await;
                        return Err(e);
                    }
                };
                encoded.insert(next_file, e);
            }
            let enc = if use_delta {
                encoded.get(&next_file)
            } else {
                None
            };
            let wire_src = enc.map(|e| Source {
                path: e.path(),
                name: src.name.clone(),
                size: e.size,
                version_tag: format!("{} hde={}", src.version_tag, &e.digest.to_hex()[..16]),
                pre_encoded: None,
                // Never set here: a commit is refused up front for anything but a round.
                commit: src.commit,
                // A file's delta: its receiver counts the whole content.
                writes: None,
            });
            // The content size is what was encoded (the file may have changed since it was
            // listed).
            let extra = enc
                .map(|e| {
                    (
                        e.encoding,
                        e.report.raw_bytes,
                        e.raw_blake3.as_bytes().to_vec(),
                    )
                })
                .or_else(|| src.pre_encoded.clone());
            let raw_size = enc.map_or(src.size, |e| e.report.raw_bytes);
            kept.object_id += 1;
            let object_id = kept.object_id;
            let fresh = begun.insert(next_file) && opts.fresh;
            let r = send_object(
                &mut session,
                wire_src.as_ref().unwrap_or(src),
                extra,
                object_id,
                fresh,
                kept.ended.as_deref(),
                opts,
                bucket.clone(),
                sent.clone(),
                &mut report,
                &mut failing_since,
                &mut |acked, streams, link| {
                    // Progress is in content bytes, whatever crosses the network.
                    let acked = match &wire_src {
                        Some(w) if w.size > 0 => {
                            (acked as f64 / w.size as f64 * raw_size as f64) as u64
                        }
                        _ => acked,
                    };
                    progress(&Progress {
                        name: src.name.clone(),
                        object_acked: acked,
                        object_size: raw_size,
                        total_acked: done_bytes + acked,
                        total_size,
                        streams,
                        link: *link,
                    });
                },
            )
            .await;
            // Anything but a busy receiver (the begin got through, or another interruption):
            // a receiver busy with the file later is asked for as long again.
            if !matches!(&r, Err(ObjectFailure::Fatal(SendError::Refused { code, .. })) if *code == ErrorCode::BUSY)
            {
                busy_since = None;
            }
            match r {
                Ok((resumed_from, answer)) => {
                    failing_since = None;
                    let delta = encoded.remove(&next_file).map(|e| {
                        let mut r = e.report;
                        r.cold_retry = cold.contains(&next_file);
                        r
                    });
                    report.objects.push(ObjectReport {
                        name: src.name.clone(),
                        size: src.size,
                        resumed_from,
                        seconds: t0.elapsed().as_secs_f64(),
                        delta,
                        answer,
                    });
                    done_bytes += src.size;
                    next_file += 1;
                }
                Err(ObjectFailure::Fatal(SendError::Refused { code, reason, .. }))
                    if code == ErrorCode::BUSY =>
                {
                    // The receiver holds the file for an earlier session of ours (its streams
                    // died without the receiver noticing yet): it lets go when their
                    // connections end, within its idle timeout. Asked again meanwhile, for the
                    // retry period, at least as long as that (unless told not to retry).
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    // A migration's parts (`fresh`) wait no longer than its retry period: its
                    // guest may be paused meanwhile.
                    let patience = if opts.retry_for.is_zero() || opts.fresh {
                        opts.retry_for
                    } else {
                        opts.retry_for.max(BUSY_PATIENCE)
                    };
                    if since.elapsed() >= patience {
                        let e = SendError::Refused {
                            name: src.name.clone(),
                            code,
                            reason,
                        };
                        session.close(e.close_code(), &e.to_string()).await;
                        return Err(e);
                    }
                    warn!(
                        "{:?}: the receiver is busy with it ({reason}); asking again",
                        src.name
                    );
                    tokio::time::sleep(BUSY_RETRY).await;
                }
                Err(ObjectFailure::Fatal(SendError::Refused { code, .. }))
                    if code == ErrorCode::CHECKSUM_MISMATCH && !restarted.contains(&next_file) =>
                {
                    // A resumed prefix that did not survive (e.g. a power loss at the
                    // receiver) shows up as a mismatch; the receiver has dropped its copy, so
                    // one retry from the start settles it.
                    warn!(
                        "{:?} failed verification; sending it again from the start",
                        src.name
                    );
                    restarted.push(next_file);
                }
                Err(ObjectFailure::Fatal(SendError::Refused { code, reason, .. }))
                    if code == ErrorCode::DELTA_UNRESOLVED
                        && !cold.contains(&next_file)
                        && src.pre_encoded.is_none() =>
                {
                    // The receiver lacks something the encoding referred to (evicted, or its
                    // copy changed): encode again without references to its holdings.
                    warn!(
                        "{:?}: receiver could not resolve the delta ({reason}); sending it \
                         again without references",
                        src.name
                    );
                    encoded.remove(&next_file);
                    cold.push(next_file);
                }
                Err(ObjectFailure::Fatal(e)) => {
                    session.close(e.close_code(), &e.to_string()).await;
                    return Err(e);
                }
                Err(ObjectFailure::SessionLost(why)) => {
                    warn!("session lost during {:?}: {why}; reconnecting", src.name);
                    report.reconnects += 1;
                    report.link.tcp = session.tcp.reported();
                    session.readers.abort_all();
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= opts.retry_for {
                        return Err(SendError::Interrupted {
                            retry_for: opts.retry_for,
                            last: why,
                        });
                    }
                    continue 'sessions;
                }
            }
        }
        report.streams_final = session.alive() as u32;
        report.link.tcp = session.tcp.reported();
        if kept.keep {
            // The counts of this transfer to the receiver now, not at the next one's first
            // heartbeat (migration rounds are often shorter than a heartbeat's second).
            session.heartbeat();
            kept.session = Some(session);
        } else {
            session
                .close(ErrorCode::NO_ERROR, "transfer complete")
                .await;
        }
        break;
    }
    report.bytes_sent = sent.load(Ordering::Relaxed);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn send_object(
    session: &mut Session,
    src: &Source,
    encoding: Option<(u32, u64, Vec<u8>)>,
    object: u64,
    fresh: bool,
    ended: Option<&Notify>,
    opts: &SendOptions,
    bucket: Option<RateLimit>,
    sent: Arc<AtomicU64>,
    report: &mut SendReport,
    failing_since: &mut Option<Instant>,
    progress: &mut (dyn FnMut(u64, usize, &LinkStats) + Send),
) -> Result<(u64, String), ObjectFailure> {
    let lost = |why: String| ObjectFailure::SessionLost(why);
    let Some((first, w0)) = session
        .writers
        .iter()
        .enumerate()
        .find_map(|(i, w)| w.as_ref().map(|(_, w)| (i, w.clone())))
    else {
        return Err(lost("no stream left".into()));
    };
    let (encoding, raw_size, raw_blake3) = encoding.unwrap_or((data::ENCODING_RAW, 0, Vec::new()));
    if src.commit && (session.version < Version::V6 || encoding != data::ENCODING_HDE_PAGES_INPLACE)
    {
        // An older receiver would ignore the request and answer as if it had committed.
        return Err(ObjectFailure::Fatal(SendError::Protocol(format!(
            "{:?}: a commit with a round needs an in-place migration round and protocol v6 \
             (the session is {})",
            src.name, session.version
        ))));
    }
    let begin = ObjectBegin {
        object,
        name: src.name.clone(),
        size: src.size,
        version_tag: src.version_tag.clone(),
        encoding,
        raw_size,
        raw_blake3,
        commit: src.commit,
        urgent: opts.urgent && src.size <= super::recv::URGENT_MAX_SIZE,
        writes: src.writes,
    };
    // An urgent object's end goes right behind its begin, its digest taken first (it is
    // small): not at the tail of a stream whose last packets may be lost.
    let early_end = if opts.urgent && src.size <= URGENT_MAX {
        let bytes = tokio::fs::read(&src.path).await.map_err(|e| {
            ObjectFailure::Fatal(SendError::Source {
                path: src.path.clone(),
                source: e,
            })
        })?;
        if bytes.len() as u64 != src.size {
            return Err(ObjectFailure::Fatal(SendError::Source {
                path: src.path.clone(),
                source: std::io::Error::other(format!(
                    "{} bytes, {} expected: changed while being sent",
                    bytes.len(),
                    src.size
                )),
            }));
        }
        Some(blake3::hash(&bytes))
    } else {
        None
    };
    {
        let mut w = w0.lock().await;
        w.send(&msg::encode(FrameType::OBJECT_BEGIN, &begin))
            .await
            .map_err(|e| lost(e.to_string()))?;
        if let Some(digest) = &early_end {
            let end = ObjectEnd {
                object,
                size: src.size,
                blake3: digest.as_bytes().to_vec(),
            };
            w.send(&msg::encode(FrameType::OBJECT_END, &end))
                .await
                .map_err(|e| lost(e.to_string()))?;
        }
    }
    // Wait for the receiver's answer: how much it already has. A fresh object has nothing
    // there: its data follows the begin on the same stream (so the receiver sees the begin
    // first) and the answer is taken in the loop below.
    let begun_at = Instant::now();
    let have = if fresh {
        0
    } else {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), session.events.recv())
                .await
                .map_err(|_| lost("no answer to OBJECT_BEGIN within 30 s".into()))?
                .ok_or_else(|| lost("all streams closed".into()))?;
            match ev {
                Event::Frame(f) if f.ty == FrameType::OBJECT_STATE => {
                    let st: ObjectState = decode(&f)?;
                    if st.object == object {
                        break st.have;
                    }
                }
                Event::Frame(f) if f.ty == FrameType::OBJECT_DONE => {
                    let d: ObjectDone = decode(&f)?;
                    if d.object == object {
                        return Err(refused(src, &d));
                    }
                }
                Event::Frame(_) => {}
                Event::Lost(i, generation, why) => {
                    on_lost(session, report, i, generation, &why, None).await;
                    if session.alive() == 0 {
                        return Err(lost(why));
                    }
                }
            }
        }
    };
    // Until the receiver answered, only the begin's stream carries the object.
    let mut confirmed = !fresh;
    // For the log: when the receiver answered, and when the end went out.
    let mut confirmed_after = begun_at.elapsed();
    let mut ended_after = Duration::ZERO;
    if have > src.size {
        return Err(ObjectFailure::Fatal(SendError::Protocol(format!(
            "receiver claims {have} bytes of a {}-byte object",
            src.size
        ))));
    }

    // Open the source; the reader hashes what the receiver already has too, so the digest
    // covers everything.
    let src_err = |e: std::io::Error| {
        ObjectFailure::Fatal(SendError::Source {
            path: src.path.clone(),
            source: e,
        })
    };
    let file = std::fs::File::open(&src.path).map_err(src_err)?;
    if have > 0 {
        info!(name = %src.name, have, "resuming");
    }
    let chunk = opts.chunk.min(
        session
            .any_writer()
            .ok_or_else(|| lost("no stream left".into()))?
            .lock()
            .await
            .max_chunk(),
    );
    // An urgent object: about two chunks per stream, each sent on two.
    let duplicate = opts.urgent && src.size - have <= URGENT_MAX;
    // Larger, the receiver still lists what it holds beyond a hole (see `SendOptions::urgent`).
    let hole_copies = opts.urgent && !duplicate && src.size <= super::recv::URGENT_MAX_SIZE;
    let chunk = if duplicate {
        let per = (src.size - have) / (2 * session.alive().max(1) as u64);
        (per as usize).clamp(URGENT_CHUNK_MIN.min(chunk), chunk)
    } else {
        chunk
    };
    let source = SourceReader::start(file, have, src.size, chunk).map_err(src_err)?;
    let core = Arc::new(Mutex::new(Core {
        sched: Scheduler::new(have, src.size, chunk, opts.window),
        source,
        held: have,
    }));
    let notify = Arc::new(Notify::new());
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<WriterFailure>();
    // Written by the writer that sent the last chunk read: the end can go out now.
    let all_read = Arc::new(Notify::new());
    let ctx = ObjectCtx {
        object,
        core: core.clone(),
        notify: notify.clone(),
        all_read: all_read.clone(),
        bucket,
        sent,
        fail: fail_tx,
        path: src.path.clone(),
        retired: session.retired.clone(),
        // Not over QUIC: its streams share one connection's loss recovery, and a stream
        // that waits is queued behind the others in quinn, not stuck (sending its chunks
        // again there cost 11 % of a datacenter-speed transfer).
        hedging: session.dialer.carrier() != Carrier::Quic,
        // Well beyond a round trip and a fast retransmission: a timeout, a stalled path.
        stuck_after: session
            .rtt
            .map_or(Duration::from_millis(500), |r| r * 4)
            .max(Duration::from_millis(200)),
        duplicate,
        hole_copies,
        // (Not under 20 ms: on a short path a hole that brief is not a lost packet.)
        third_after: session
            .rtt
            .map_or(Duration::from_millis(200), |r| r + r / 4)
            .max(Duration::from_millis(20)),
    };
    // Goodput samples for the adaptive stream count.
    let mut sample_at = Instant::now();
    let mut sample_acked = have;
    let mut growing: HashSet<u32> = HashSet::new();
    // Its own timer: ACKs may arrive more often than any idle timeout would fire.
    let mut adapt_tick = tokio::time::interval(Duration::from_millis(250));
    adapt_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let every = HEARTBEAT_EVERY;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut beat_at, mut beat_acked) = (Instant::now(), have);
    let mut writers = JoinSet::new();
    let mut writer_tasks: Vec<Option<tokio::task::AbortHandle>> = Vec::new();
    // Before the receiver answered, a fresh object's data goes on the begin's stream only,
    // unless the receiver waits for begins (v4): then on every stream at once, so that a
    // small object is not held to one stream's share of the path.
    let only = (!confirmed && session.version < Version::V4).then_some(first);
    start_writers(session, &ctx, &mut writers, &mut writer_tasks, only);
    // The streams OBJECT_END went out on: two, so that one stuck stream cannot hold it back;
    // if one dies, the end is sent again.
    let mut end_on: Vec<usize> = early_end.iter().map(|_| first).collect();
    // Once every byte is read, goodput samples only measure the tail: the count holds.
    let mut tail = false;
    // Streams being retired (slot -> generation): their chunks are sent again only if the
    // stream does not close cleanly.
    let mut retiring: HashMap<u32, u64> = HashMap::new();
    // Dead streams are replaced (a few times per slot, so a peer that keeps killing them
    // cannot keep us dialling).
    let mut replacements_left = 3 * session.writers.len();
    // Whether `ended` was told about this object.
    let mut told_ended = false;
    let result = loop {
        if !confirmed && begun_at.elapsed() > Duration::from_secs(30) {
            break Err(lost("no answer to OBJECT_BEGIN within 30 s".into()));
        }
        // Once every byte has been read the digest is final: announce the end (before the
        // receiver answered the begin, only behind it on its stream).
        let end_streams = if confirmed { session.alive().min(2) } else { 1 };
        // Set when the end is due but its streams' writers were busy: tried again shortly.
        let mut end_busy = false;
        if end_on.len() < end_streams || (early_end.is_some() && !tail) {
            let mut c = core.lock().await;
            if c.sched.read() == src.size {
                // Ready once the last chunk is taken (at once for a fully resumed file).
                let digest = match c.source.digest().await {
                    Ok(d) => d,
                    Err(e) => break Err(src_err(e)),
                };
                if early_end.is_some_and(|e| e != digest) {
                    break Err(src_err(std::io::Error::other(
                        "changed while being sent (its digest differs from the one sent first)",
                    )));
                }
                if early_end.is_some() && !tail {
                    // Its end went out first; now every byte has too.
                    ended_after = begun_at.elapsed();
                    tail = true;
                }
                let end = ObjectEnd {
                    object,
                    size: src.size,
                    blake3: digest.as_bytes().to_vec(),
                };
                drop(c);
                // Only on streams whose writers are free: one stuck in the middle of a chunk
                // must not hold this loop. What is not sent now is tried at the next event
                // (the receiver ignores a repeated end).
                let frame = msg::encode(FrameType::OBJECT_END, &end);
                let free: Vec<(usize, u64, Arc<Mutex<Writer>>)> = session
                    .writers
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !end_on.contains(i) && (confirmed || *i == first))
                    .filter_map(|(i, w)| w.as_ref().map(|(g, w)| (i, *g, w.clone())))
                    .collect();
                for (i, generation, w) in free {
                    if end_on.len() >= end_streams {
                        break;
                    }
                    let Ok(mut g) = w.try_lock() else {
                        end_busy = true;
                        continue;
                    };
                    // Bounded: a stream whose socket takes no small frame for a second is
                    // stuck, and this loop must go on handling the others.
                    match tokio::time::timeout(Duration::from_secs(1), g.send(&frame)).await {
                        Ok(Ok(())) => {
                            end_on.push(i);
                            if !tail {
                                ended_after = begun_at.elapsed();
                            }
                            tail = true;
                        }
                        Ok(Err(_)) => {}
                        Err(_) => {
                            let _ = ctx.fail.send(WriterFailure::Lost(
                                i as u32,
                                generation,
                                "stuck: the object's end could not be written".into(),
                            ));
                        }
                    }
                }
            }
        }
        if !told_ended && confirmed && tail && !end_on.is_empty() {
            told_ended = true;
            if let Some(n) = ended {
                n.notify_one();
            }
        }
        let ev = tokio::select! {
            ev = session.events.recv() => ev,
            Some(f) = fail_rx.recv() => match f {
                WriterFailure::Lost(i, generation, why) => Some(Event::Lost(i, generation, why)),
                WriterFailure::Fatal(e) => break Err(ObjectFailure::Fatal(e)),
            },
            Some(r) = session.joining.join_next(), if !session.joining.is_empty() => {
                match r {
                    Ok((i, Ok(conn))) => match session.add(i, conn).await {
                        Ok(_) => {
                            if growing.remove(&i) {
                                report.streams_added += 1;
                            } else if !session.opening.remove(&i) {
                                report.streams_replaced += 1;
                                info!(stream = i, "stream replaced");
                            }
                            report.streams = report.streams.max(session.alive() as u32);
                            // Not before the receiver answered the begin (then all at once), but
                            // at once in v4 (see `start_writers` above).
                            if confirmed || session.version >= Version::V4 {
                                start_writers(session, &ctx, &mut writers, &mut writer_tasks, Some(i as usize));
                            }
                        }
                        Err(e) => warn!(stream = i, "replacement stream failed to join: {e}"),
                    },
                    Ok((i, Err(e))) => {
                        growing.remove(&i);
                        session.opening.remove(&i);
                        warn!(stream = i, "cannot open stream: {e}");
                    }
                    Err(e) => warn!("stream dial task failed: {e}"),
                }
                if session.alive() == 0 && session.joining.is_empty() {
                    break Err(lost("every stream failed and none could be replaced".into()));
                }
                continue;
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => continue,
            () = all_read.notified(), if end_on.len() < end_streams || (early_end.is_some() && !tail) => continue,
            // Before the receiver answered, the end may go only behind the begin, on a
            // stream whose writer is still busy with a chunk: a few milliseconds.
            () = tokio::time::sleep(Duration::from_millis(5)), if end_busy && end_on.is_empty() => continue,
            _ = heartbeat.tick() => {
                let acked = core.lock().await.sched.acked();
                let dt = beat_at.elapsed().as_secs_f64();
                if dt > 0.0 {
                    report.link.goodput_bps = acked.saturating_sub(beat_acked) as f64 / dt;
                }
                (beat_at, beat_acked) = (Instant::now(), acked);
                if let Some((lost, events)) = session.quic_counts() {
                    report.link.lost_packets = Some(lost);
                    report.link.congestion_events = Some(events);
                }
                report.link.tcp = session.tcp.reported();
                session.heartbeat();
                continue;
            },
            _ = adapt_tick.tick(), if session.ctl.is_some() && !tail => {
                // A sample spans sixteen round trips, 250 ms to 3 s: loss-driven paths are
                // noisy over shorter ones.
                let every = session
                    .rtt
                    .map_or(Duration::from_secs(1), |r| (r * 16).clamp(Duration::from_millis(250), Duration::from_secs(3)));
                if sample_at.elapsed() >= every {
                    let acked = delivered(&*core.lock().await);
                    let goodput = (acked - sample_acked) as f64 / sample_at.elapsed().as_secs_f64();
                    sample_at = Instant::now();
                    sample_acked = acked;
                    // Not while streams are still opening: the sample would be of fewer
                    // streams than counted, and retiring the open ones for a count that
                    // includes them left the session running on a few (a handshake storm
                    // at a datacenter start). The next sample starts once they are in.
                    if !session.joining.is_empty() {
                        continue;
                    }
                    let alive = session.alive() as u32;
                    let target = session.ctl.as_mut().map_or(alive, |c| c.on_sample(goodput, alive));
                    // Not once lost streams have used up their replacements: a peer that
                    // keeps killing streams would have the controller dial for them.
                    if target > alive && replacements_left > 0 {
                        for _ in alive..target {
                            let i = session.writers.len() as u32;
                            session.writers.push(None);
                            growing.insert(i);
                            session.dial(i);
                        }
                        debug!(from = alive, to = target, goodput_mbit = goodput * 8e-6, "adding streams");
                    } else if target < alive {
                        let mut victims: Vec<u32> = session
                            .writers
                            .iter()
                            .enumerate()
                            .filter(|(_, w)| w.is_some())
                            .map(|(i, _)| i as u32)
                            .collect();
                        victims.reverse();
                        victims.truncate((alive - target) as usize);
                        for i in victims {
                            if session.alive() <= 1 {
                                break;
                            }
                            {
                                // Under the core lock, which writers take before a chunk:
                                // from here on this stream is given none.
                                let _c = core.lock().await;
                                if let Ok(mut r) = session.retired.lock() {
                                    r.insert(i);
                                }
                            }
                            notify.notify_waiters();
                            end_on.retain(|&e| e != i as usize);
                            if let Some(Some((generation, w))) = session.writers.get_mut(i as usize).map(Option::take) {
                                report.streams_retired += 1;
                                retiring.insert(i, generation);
                                let fail = ctx.fail.clone();
                                tokio::spawn(async move {
                                    // After the chunk being written, if any (the lock).
                                    if !w.lock().await.goodbye(ErrorCode::STREAM_CLOSED, "stream retired").await {
                                        let _ = fail.send(WriterFailure::Lost(i, generation, "could not retire the stream cleanly".into()));
                                    }
                                });
                            }
                        }
                        debug!(from = alive, to = target, goodput_mbit = goodput * 8e-6, "retiring streams");
                    }
                }
                continue;
            },
        };
        let Some(ev) = ev else {
            break Err(lost("all streams closed".into()));
        };
        match ev {
            Event::Frame(f) if f.ty == FrameType::ACK => {
                let a: Ack = decode(&f)?;
                if a.object != object {
                    continue;
                }
                let mut c = core.lock().await;
                c.held = c.held.max(a.received);
                let before = c.sched.acked();
                if let Err(e) = c.sched.ack(a.offset) {
                    break Err(ObjectFailure::Fatal(SendError::Protocol(e.to_string())));
                }
                // An urgent object's receiver lists what it holds beyond a hole.
                match a.ranges(c.sched.read()) {
                    Ok(ranges) => c.sched.arrived(&ranges),
                    Err(e) => break Err(ObjectFailure::Fatal(SendError::Protocol(e))),
                }
                let acked = c.sched.acked();
                drop(c);
                if acked > before {
                    *failing_since = None;
                }
                notify.notify_waiters();
                progress(acked, session.alive(), &report.link);
            }
            Event::Frame(f) if f.ty == FrameType::OBJECT_DONE => {
                let d: ObjectDone = decode(&f)?;
                if d.object != object {
                    continue;
                }
                if d.code == 0 {
                    // Verified: every byte is held, whatever ACKs are still on their way
                    // (so the writers see the end now).
                    if let Err(e) = core.lock().await.sched.ack(src.size) {
                        break Err(ObjectFailure::Fatal(SendError::Protocol(e.to_string())));
                    }
                    progress(src.size, session.alive(), &report.link);
                    debug!(
                        name = %src.name,
                        size = src.size,
                        ?confirmed_after,
                        ?ended_after,
                        done_after = ?begun_at.elapsed(),
                        streams = session.alive(),
                        "object sent"
                    );
                    break Ok((have, msg::printable(&d.reason, 4096)));
                }
                break Err(refused(src, &d));
            }
            Event::Frame(f) if f.ty == FrameType::GOAWAY => {
                let close: msg::Close = decode(&f)?;
                debug!("receiver sent GOAWAY: {}", close.printable_reason());
            }
            Event::Frame(f) if f.ty == FrameType::OBJECT_STATE && !confirmed => {
                let st: ObjectState = decode(&f)?;
                if st.object != object {
                    continue;
                }
                if st.have > 0 {
                    // Not fresh after all (a caller's mistake): the receiver acknowledges from
                    // what it holds, which may be beyond what was read here. Start over on a
                    // new session, where the file resumes as any other.
                    break Err(lost(format!(
                        "the receiver already holds {} bytes of an object sent as fresh",
                        st.have
                    )));
                }
                confirmed = true;
                confirmed_after = begun_at.elapsed();
                // Goodput samples start with every stream carrying the object.
                sample_at = Instant::now();
                sample_acked = delivered(&*core.lock().await);
                start_writers(session, &ctx, &mut writers, &mut writer_tasks, None);
            }
            Event::Frame(f) if f.ty == FrameType::PONG => {
                if let Some(rtt) = session.heartbeat_rtt(&f) {
                    report.link.sample(rtt);
                }
            }
            Event::Frame(_) => {}
            Event::Lost(i, generation, why) => {
                if retiring.get(&i) == Some(&generation) {
                    retiring.remove(&i);
                    // Counted up to its end: the chunk it finished and the goodbye.
                    session.tcp.close(i, generation);
                    if why != CLOSED_BY_RECEIVER {
                        debug!(
                            stream = i,
                            "retired stream ended unclean ({why}): its chunks go out again"
                        );
                        core.lock().await.sched.stream_lost(i);
                        notify.notify_waiters();
                    }
                    continue;
                }
                if session.generation(i) != Some(generation) {
                    continue; // news about a stream that was already replaced
                }
                if !confirmed && i as usize == first {
                    // The begin may not have arrived: the object starts over, on a new session.
                    break Err(lost(why));
                }
                if let Some(Some(task)) = writer_tasks.get_mut(i as usize).map(Option::take) {
                    task.abort();
                }
                end_on.retain(|&e| e != i as usize);
                on_lost(session, report, i, generation, &why, Some(&core)).await;
                notify.notify_waiters();
                // The last stream: the receiver forgets a session (and its objects) when its
                // last connection ends, so replacements dialled meanwhile would join one that
                // knows nothing of this object. A new session resumes it.
                if session.alive() == 0 {
                    break Err(lost(why));
                }
                if replacements_left > 0 {
                    replacements_left -= 1;
                    session.dial(i);
                }
            }
        }
    };
    if matches!(result, Err(ObjectFailure::SessionLost(_))) {
        // The session is given up or reopened: nothing it was dialling is wanted. (A refused
        // object leaves it to the next one, which the streams still opening will carry.)
        session.joining.abort_all();
        session.opening.clear();
    }
    if result.is_ok() {
        // Every byte is acknowledged: writers see `Next::Done` and return after the frame
        // they are writing, so no stream is left with half a frame for the next object.
        notify.notify_waiters();
        let grace = session
            .rtt
            .map_or(Duration::from_secs(1), |r| r * 8)
            .max(Duration::from_secs(1));
        let finished = tokio::time::timeout(grace, async {
            while writers.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            // A writer still in the middle of a chunk by now (holding its stream's lock) is on
            // a stuck stream whose chunks went on the others: that stream has half a frame
            // on it, so the session goes on without it, dialling a replacement.
            for (i, t) in writer_tasks.iter().enumerate() {
                let Some(t) = t.as_ref().filter(|t| !t.is_finished()) else {
                    continue;
                };
                // Looked at before the abort, which releases the lock.
                let mid_frame = session
                    .writers
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|(_, w)| w.try_lock().is_err());
                t.abort();
                if mid_frame
                    && let Some(Some((g, _))) = session.writers.get_mut(i).map(Option::take)
                {
                    session.tcp.close(i as u32, g);
                    info!(stream = i, "stream dropped: stuck in the middle of a chunk");
                    report.streams_stuck += 1;
                    session.dial(i as u32);
                }
            }
            writers.abort_all();
        }
    } else {
        writers.abort_all();
    }
    let c = core.lock().await;
    report.resent_bytes += c.sched.resent_bytes();
    result
}

/// Marks stream `i` dead; its in-flight chunks go back to the scheduler.
/// Asks the receiver what it holds for `src` (unless `cold`) and encodes the file against it.
async fn prepare_delta(
    session: &mut Session,
    report: &mut SendReport,
    src: &Source,
    query_id: u64,
    cold: bool,
    opts: &DeltaOptions,
) -> Result<Encoded, ObjectFailure> {
    let lost = |why: String| ObjectFailure::SessionLost(why);
    let encoding = delta::encoding_for(opts.layout, src.size, opts.page_size);
    let (summary, pages) = if cold {
        (Vec::new(), Vec::new())
    } else {
        let Some((at, generation, w0)) = session.first_writer() else {
            return Err(lost("no stream left".into()));
        };
        let q = BaseQuery {
            object: query_id,
            name: src.name.clone(),
            raw_size: src.size,
            page_size: if encoding == data::ENCODING_HDE_PAGES {
                opts.page_size as u32
            } else {
                0
            },
            migration_target: false,
        };
        w0.lock()
            .await
            .send(&msg::encode(FrameType::BASE_QUERY, &q))
            .await
            .map_err(|e| lost(e.to_string()))?;
        let (summary, pages, _) = collect_base_info(session, report, &q, (at, generation)).await?;
        (summary, pages)
    };
    let (path, size) = (src.path.clone(), src.size);
    let opts = opts.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        let remote = summary_of(&summary);
        delta::encode_file(&path, size, encoding, &opts, remote.as_ref(), &pages)
    });
    // A large file takes minutes to encode: the streams are kept alive meanwhile (the
    // receiver would close them as idle, and `dwcp recv` give the sender up).
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let e = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = beat.tick() => {
                // Their answers (and any stream lost) taken meanwhile: nothing else reads
                // the session's events now, and a full queue would hold its readers up.
                session.settle().await;
                session.ping_streams().await;
            }
        }
    }
    .map_err(|e| ObjectFailure::Fatal(SendError::Protocol(format!("encoder task failed: {e}"))))?
    .map_err(|source| {
        ObjectFailure::Fatal(SendError::Source {
            path: src.path.clone(),
            source,
        })
    })?;
    info!(
        name = %src.name,
        raw = e.report.raw_bytes,
        encoded = e.size,
        layout = e.report.layout,
        "delta-encoded"
    );
    Ok(e)
}

/// The receiver's cache summary, if it sent one that reads: a summary is a hint, so one that
/// does not (too large, damaged) costs the pages it names being sent, not the transfer.
fn summary_of(summary: &[u8]) -> Option<RemoteIndex> {
    if summary.is_empty() {
        return None;
    }
    RemoteIndex::decode(summary)
        .inspect_err(|e| warn!("the receiver's cache summary is not used: {e}"))
        .ok()
}

/// Waits for the receiver's answer to `q` (`BASE_INFO` parts) on the session.
/// Reads the answer to `q`, sent on the stream `via` (slot, generation).
async fn collect_base_info(
    session: &mut Session,
    report: &mut SendReport,
    q: &BaseQuery,
    via: (u32, u64),
) -> Result<(Vec<u8>, Vec<u8>, u32), ObjectFailure> {
    let lost = |why: String| ObjectFailure::SessionLost(why);
    let query_id = q.object;
    // The answer: each part in pieces, in order; bounded by what a summary and a page
    // list of this file can be.
    let max_pages = if q.page_size > 0 {
        q.raw_size / u64::from(q.page_size) * 8
    } else {
        0
    };
    let limits = [(dwcp_encoding::MAX_SUMMARY_ENTRIES * 10), max_pages];
    let mut parts: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut complete = [false, false];
    let mut copy = data::BASE_COPY_UNSAID;
    while !(complete[0] && complete[1]) {
        // The receiver reads its whole copy for the page hashes: allow for 100 MB/s.
        let wait = Duration::from_secs(60 + q.raw_size / 100_000_000);
        let ev = tokio::time::timeout(wait, session.events.recv())
            .await
            .map_err(|_| {
                lost(format!(
                    "no answer to BASE_QUERY within {} s",
                    wait.as_secs()
                ))
            })?
            .ok_or_else(|| lost("all streams closed".into()))?;
        match ev {
            Event::Frame(f) if f.ty == FrameType::BASE_INFO => {
                let info: BaseInfo = decode(&f)?;
                if info.object != query_id {
                    continue;
                }
                let i = match info.part {
                    data::BASE_PART_SUMMARY => 0,
                    data::BASE_PART_PAGES => 1,
                    other => {
                        return Err(ObjectFailure::Fatal(SendError::Protocol(format!(
                            "BASE_INFO part {other} is unknown"
                        ))));
                    }
                };
                let part = &mut parts[i];
                if info.total > limits[i]
                    || info.offset != part.len() as u64
                    || info.offset + info.data.len() as u64 > info.total
                {
                    return Err(ObjectFailure::Fatal(SendError::Protocol(format!(
                        "BASE_INFO piece at {} of {} (part {}) does not follow the {} bytes \
                             received, or exceeds the {}-byte limit",
                        info.offset,
                        info.total,
                        info.part,
                        part.len(),
                        limits[i]
                    ))));
                }
                part.extend_from_slice(&info.data);
                complete[i] = part.len() as u64 == info.total;
                if i == 1 {
                    copy = info.copy;
                }
            }
            Event::Frame(_) => {}
            Event::Lost(i, generation, why) => {
                on_lost(session, report, i, generation, &why, None).await;
                // The answer comes on the query's stream or not at all.
                if (i, generation) == via || session.alive() == 0 {
                    return Err(lost(why));
                }
            }
        }
    }
    let [summary, pages] = parts;
    Ok((summary, pages, copy))
}

/// Asks a receiver what it holds for `name`: its cache summary, and the summary hashes of
/// the pages of its copy (or, with `migration_target`, of the migration target) if that
/// is `raw_size` bytes. One short session.
pub async fn query_base(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    name: &str,
    raw_size: u64,
    page_size: u32,
    migration_target: bool,
) -> Result<(Option<RemoteIndex>, Vec<u64>), SendError> {
    let q = BaseRequest {
        name,
        raw_size,
        page_size,
        migration_target,
    };
    query_base_kept(endpoint, addr, expected, &q, &mut KeptSession::default()).await
}

/// What [`query_base_kept`] asks about.
#[derive(Debug, Clone, Copy)]
pub struct BaseRequest<'a> {
    /// The file or migration target.
    pub name: &'a str,
    /// Its expected size; page hashes come only for a copy of this size.
    pub raw_size: u64,
    /// Page size of the hashes (0: no page hashes).
    pub page_size: u32,
    /// Hash the migration target rather than the published file.
    pub migration_target: bool,
}

/// As [`query_base`], on `kept`'s session when it is open (which stays open if `kept` was
/// made with [`KeptSession::new`]); on a short session of its own otherwise.
pub async fn query_base_kept(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    req: &BaseRequest<'_>,
    kept: &mut KeptSession,
) -> Result<(Option<RemoteIndex>, Vec<u64>), SendError> {
    query_kept(endpoint, addr, expected, req, kept)
        .await
        .map(|(remote, pages, _)| (remote, pages))
}

/// What a receiver said of its copy of a name (`BaseInfo::copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// The page hashes are its copy's.
    Hashed,
    /// It has no copy of that name and size.
    None,
    /// It has something there that it could not read: what it holds is not known.
    Unreadable,
    /// It could not look whether anything is there: whether it has a copy is not known.
    Unknown,
    /// Not said (an older receiver, or one that gives no page hashes).
    Unsaid,
}

/// As [`query_base_kept`], for the page hashes of the receiver's copy and what it said of
/// that copy (an empty list alone does not tell "none" from "unreadable").
pub async fn query_copy_kept(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    req: &BaseRequest<'_>,
    kept: &mut KeptSession,
) -> Result<(Vec<u64>, CopyState), SendError> {
    let (_, pages, copy) = query_kept(endpoint, addr, expected, req, kept).await?;
    let state = match copy {
        data::BASE_COPY_HASHED => CopyState::Hashed,
        data::BASE_COPY_NONE => CopyState::None,
        data::BASE_COPY_UNREADABLE => CopyState::Unreadable,
        data::BASE_COPY_UNKNOWN => CopyState::Unknown,
        _ => CopyState::Unsaid,
    };
    Ok((pages, state))
}

async fn query_kept(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    req: &BaseRequest<'_>,
    kept: &mut KeptSession,
) -> Result<(Option<RemoteIndex>, Vec<u64>, u32), SendError> {
    let (mut session, from_kept) = kept.take_or_control(endpoint, addr, expected).await?;
    let mut report = SendReport::default();
    kept.object_id += 1;
    let (name, raw_size, page_size, migration_target) =
        (req.name, req.raw_size, req.page_size, req.migration_target);
    let q = BaseQuery {
        object: kept.object_id,
        name: name.to_string(),
        raw_size,
        page_size,
        migration_target,
    };
    session.adopt_joined().await;
    let r = async {
        let (at, generation, w) = session
            .first_writer()
            .ok_or_else(|| SendError::Protocol("no stream".into()))?;
        w.lock()
            .await
            .send(&msg::encode(FrameType::BASE_QUERY, &q))
            .await
            .map_err(SendError::Connect)?;
        collect_base_info(&mut session, &mut report, &q, (at, generation))
            .await
            .map_err(|f| match f {
                ObjectFailure::Fatal(e) => e,
                ObjectFailure::SessionLost(why) => SendError::Interrupted {
                    retry_for: Duration::ZERO,
                    last: why,
                },
            })
    }
    .await;
    if from_kept && kept.keep && r.is_ok() {
        kept.session = Some(session);
    } else {
        session.close(ErrorCode::NO_ERROR, "query done").await;
    }
    let (summary, pages, copy) = r?;
    // Off the async workers: a large cache's summary takes a while.
    let remote = tokio::task::spawn_blocking(move || summary_of(&summary))
        .await
        .unwrap_or_default();
    let pages = pages
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok((remote, pages, copy))
}

/// Commits or aborts the migration target `name` on a receiver (`MIGRATION`).
pub async fn migration_op(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    name: &str,
    op: u32,
) -> Result<(), SendError> {
    let mut kept = KeptSession::default();
    migration_op_kept(endpoint, addr, expected, name, op, &mut kept).await
}

/// As [`migration_op`], on `kept`'s session when it is alive (the commit is on the guest's
/// pause path: no connection set-up there).
pub async fn migration_op_kept(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    name: &str,
    op: u32,
    kept: &mut KeptSession,
) -> Result<(), SendError> {
    let req = MigrationRequest {
        name,
        op,
        segments: 0,
        digest: None,
        postcopy: false,
        timeout: Duration::from_secs(60),
        stream_session: None,
        wait: Duration::ZERO,
    };
    migration_request_kept(endpoint, addr, expected, &req, kept)
        .await
        .map(|_| ())
}

/// A `MIGRATION` request (see [`migration_request_kept`]).
#[derive(Debug, Clone, Copy)]
pub struct MigrationRequest<'a> {
    /// The target or VM name.
    pub name: &'a str,
    /// `dwcp_wire::data::MIGRATION_*`.
    pub op: u32,
    /// For `MIGRATION_QEMU_FINISH`: the stream's segment count.
    pub segments: u64,
    /// For `MIGRATION_QEMU_FINISH`: the stream's BLAKE3 digest.
    pub digest: Option<[u8; 32]>,
    /// For `MIGRATION_QEMU_OPEN`: ask for QEMU's post-copy and its return path.
    pub postcopy: bool,
    /// How long to wait for the answer.
    pub timeout: Duration,
    /// For the QEMU ops on a stream: the session id of the tunnel that carries it
    /// ([`crate::session::Tunnel::session_id`]).
    pub stream_session: Option<[u8; 16]>,
    /// For `MIGRATION_QEMU_OPEN` and `_RECOVER`: how long the source keeps dialling a lost link (the
    /// destination waits that much longer for the stream); zero says nothing.
    pub wait: Duration,
}

/// Sends one `MIGRATION` request on `kept`'s session (opening one with a single stream when
/// none is alive) and returns the answer's detail (the `reason` of a successful answer).
pub async fn migration_request_kept(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    req: &MigrationRequest<'_>,
    kept: &mut KeptSession,
) -> Result<String, SendError> {
    migration_request_data(endpoint, addr, expected, req, kept)
        .await
        .map(|(detail, _)| detail)
}

/// As [`migration_request_kept`], with the answer's data (`ObjectDone::data`: the bytes of a
/// QEMU return path) besides its detail.
pub async fn migration_request_data(
    endpoint: &Endpoint,
    addr: std::net::SocketAddr,
    expected: Option<&NodeId>,
    req: &MigrationRequest<'_>,
    kept: &mut KeptSession,
) -> Result<(String, Vec<u8>), SendError> {
    let (mut session, _) = kept.take_or_control(endpoint, addr, expected).await?;
    kept.object_id += 1;
    let m = Migration {
        object: kept.object_id,
        op: req.op,
        name: req.name.to_string(),
        segments: req.segments,
        blake3: req.digest.map(|d| d.to_vec()).unwrap_or_default(),
        postcopy: req.postcopy,
        stream_session: req.stream_session.map(|s| s.to_vec()).unwrap_or_default(),
        wait_secs: req.wait.as_secs(),
    };
    let timeout = req.timeout;
    session.adopt_joined().await;
    let r = async {
        let (at, generation, w) = session
            .first_writer()
            .ok_or_else(|| SendError::Protocol("no stream".into()))?;
        w.lock()
            .await
            .send(&msg::encode(FrameType::MIGRATION, &m))
            .await
            .map_err(SendError::Connect)?;
        loop {
            let ev = tokio::time::timeout(timeout, session.events.recv())
                .await
                .map_err(|_| {
                    SendError::Protocol(format!("no answer to MIGRATION within {timeout:?}"))
                })?
                .ok_or_else(|| SendError::Protocol("connection closed before the answer".into()))?;
            match ev {
                Event::Frame(f) if f.ty == FrameType::OBJECT_DONE => {
                    let d: ObjectDone =
                        msg::decode(&f).map_err(|e| SendError::Protocol(e.to_string()))?;
                    if d.object != m.object {
                        continue;
                    }
                    if d.code == 0 {
                        return Ok((msg::printable(&d.reason, 4096), d.data));
                    }
                    return Err(SendError::Refused {
                        name: m.name.clone(),
                        code: ErrorCode(d.code),
                        reason: msg::printable(&d.reason, 500),
                    });
                }
                Event::Frame(_) => {}
                Event::Lost(i, g, why) => {
                    on_lost(&mut session, &mut SendReport::default(), i, g, &why, None).await;
                    // The answer comes on the request's stream or not at all; another
                    // stream of a kept session may go without it.
                    if (i, g) == (at, generation) || session.alive() == 0 {
                        return Err(SendError::Interrupted {
                            retry_for: Duration::ZERO,
                            last: why,
                        });
                    }
                }
            }
        }
    }
    .await;
    if kept.keep && r.is_ok() {
        kept.session = Some(session);
    } else {
        session
            .close(ErrorCode::NO_ERROR, "migration op done")
            .await;
    }
    r
}

async fn on_lost(
    session: &mut Session,
    report: &mut SendReport,
    i: u32,
    generation: u64,
    why: &str,
    core: Option<&Arc<Mutex<Core>>>,
) {
    // Also a stream retired earlier whose end comes now, outside an object's loop; nothing
    // for streams already let go.
    session.tcp.close(i, generation);
    if session.generation(i) != Some(generation) {
        return;
    }
    if let Some(slot) = session.writers.get_mut(i as usize)
        && slot.take().is_some()
    {
        report.streams_lost += 1;
        warn!(stream = i, "stream lost: {why}");
    }
    if let Some(core) = core {
        core.lock().await.sched.stream_lost(i);
    }
}

/// Why a writer task stopped early.
enum WriterFailure {
    /// Its stream (slot, generation) failed; the session goes on without it.
    Lost(u32, u64, String),
    /// The source could not be read: the transfer cannot go on.
    Fatal(SendError),
}

/// What every writer task of one object shares.
#[derive(Clone)]
struct ObjectCtx {
    object: u64,
    core: Arc<Mutex<Core>>,
    notify: Arc<Notify>,
    /// Woken once the last chunk of the object has been written (see `send_object`).
    all_read: Arc<Notify>,
    bucket: Option<RateLimit>,
    sent: Arc<AtomicU64>,
    fail: mpsc::UnboundedSender<WriterFailure>,
    path: PathBuf,
    retired: Arc<std::sync::Mutex<HashSet<u32>>>,
    /// Whether an idle stream sends a stuck stream's chunks again: once the receiver holds
    /// data beyond the chunk its prefix waits on and that chunk has been out `stuck_after`,
    /// or, with every byte read, once it has been out five times that.
    hedging: bool,
    stuck_after: Duration,
    /// An urgent object: once every chunk is out, an idle stream sends a second copy of the
    /// oldest chunk that has only one, on another stream ([`SendOptions::urgent`]).
    duplicate: bool,
    /// An urgent object sent once: once every chunk is out, an idle stream sends a chunk
    /// below what the receiver holds again when it has been out `third_after`.
    hole_copies: bool,
    /// For an urgent object: how long both copies of a chunk are out before a third goes.
    third_after: Duration,
}

/// Data the receiver holds beyond a hole that says the hole is not ordinary striping (it
/// reports in steps of 1 MiB).
const HOLE: u64 = 1024 * 1024;

/// Feeds stream `i` (of `generation`) from the object's scheduler until the object is done or
/// the stream fails.
/// Starts the object's writer on every stream of `session` that has none running (only on
/// stream `only`, if given).
fn start_writers(
    session: &Session,
    ctx: &ObjectCtx,
    writers: &mut JoinSet<()>,
    tasks: &mut Vec<Option<tokio::task::AbortHandle>>,
    only: Option<usize>,
) {
    if tasks.len() < session.writers.len() {
        tasks.resize(session.writers.len(), None);
    }
    for (i, w) in session.writers.iter().enumerate() {
        let Some((generation, w)) = w else { continue };
        if only.is_some_and(|o| o != i) || tasks[i].as_ref().is_some_and(|t| !t.is_finished()) {
            continue;
        }
        tasks[i] =
            Some(writers.spawn(stream_writer(ctx.clone(), i as u32, *generation, w.clone())));
    }
}

async fn stream_writer(ctx: ObjectCtx, i: u32, generation: u64, writer: Arc<Mutex<Writer>>) {
    let ObjectCtx {
        object,
        core,
        notify,
        all_read,
        bucket,
        sent,
        fail,
        path,
        retired,
        hedging,
        stuck_after,
        duplicate,
        hole_copies,
        third_after,
    } = ctx;
    loop {
        let notified = notify.notified();
        let job = {
            let mut c = core.lock().await;
            // Checked under the core lock, which retiring takes too: once retired, this
            // stream is given no chunk.
            if retired.lock().is_ok_and(|r| r.contains(&i)) {
                return;
            }
            // Before the scheduler commits to a read: this wait may be cancelled (the stream
            // lost, its task aborted) without losing a chunk.
            if let Err(source) = c.source.ready().await {
                let _ = fail.send(WriterFailure::Fatal(SendError::Source { path, source }));
                return;
            }
            let now = Instant::now();
            match c.sched.next(i) {
                Next::Done => return,
                Next::Wait if duplicate && c.sched.read() == c.sched.size() => {
                    // Every chunk twice; then a third time, once both copies have been
                    // out a round trip and a quarter, a chunk the receiver holds data
                    // beyond: the one its prefix waits on, or one below a chunk it lists.
                    let beyond = c.held > c.sched.acked();
                    match c.sched.duplicate(i, now) {
                        Some(copy) => Some(copy),
                        None => c.sched.third_copy(i, now, third_after, beyond),
                    }
                }
                Next::Wait => {
                    // An urgent object sent once: a chunk the receiver holds data beyond goes
                    // a second time after a round trip and a quarter, and a third once both
                    // copies are that late.
                    let urgent = if hole_copies && hedging && c.sched.read() == c.sched.size() {
                        let beyond = c.held > c.sched.acked();
                        c.sched
                            .hole_copy(i, now, third_after, beyond)
                            .or_else(|| c.sched.third_copy(i, now, third_after, beyond))
                    } else {
                        None
                    };
                    if let Some((offset, _)) = &urgent {
                        debug!(
                            stream = i,
                            offset, "urgent chunk sent again: the receiver holds data beyond it"
                        );
                    }
                    // Idle: if data piles up at the receiver behind a chunk whose stream
                    // seems stuck, send that stream's chunks again here.
                    let beyond = c.held.saturating_sub(c.sched.acked());
                    let after = if urgent.is_some() {
                        None
                    } else if beyond >= HOLE {
                        Some(stuck_after)
                    } else if c.sched.read() == c.sched.size() {
                        // The receiver may hold too little beyond the hole to say so (the
                        // end of a small object): wait longer, then send it again anyway.
                        Some(stuck_after * 5)
                    } else {
                        None
                    };
                    let hedged = after
                        .filter(|_| hedging)
                        .and_then(|after| c.sched.hedge(i, now, after));
                    if let Some((offset, _)) = &hedged {
                        debug!(
                            stream = i,
                            offset, "chunk sent again: its stream seems stuck"
                        );
                    }
                    urgent.or(hedged)
                }
                Next::Resend { offset, data } => {
                    // Stamped when it goes out: time spent waiting for the rate limit is not
                    // time on the path (a chunk taken long before it goes is not stuck).
                    if bucket.is_none() {
                        c.sched.stamp(offset, now);
                    }
                    Some((offset, data))
                }
                Next::Read { offset, len } => {
                    let data = match c.source.take(offset, len) {
                        Ok(d) => d,
                        Err(source) => {
                            let _ =
                                fail.send(WriterFailure::Fatal(SendError::Source { path, source }));
                            return;
                        }
                    };
                    c.sched.sent(offset, data.clone(), i);
                    if bucket.is_none() {
                        c.sched.stamp(offset, now);
                    }
                    Some((offset, data))
                }
            }
            .map(|(offset, data)| (offset, data, c.sched.read() == c.sched.size()))
        };
        match job {
            None => {
                // Re-check at least every 100 ms in case a wake-up raced with us (an urgent
                // object's third copies are due on a clock: every 10 ms).
                let every = Duration::from_millis(if duplicate || hole_copies { 10 } else { 100 });
                let _ = tokio::time::timeout(every, notified).await;
            }
            Some((offset, data, last)) => {
                if let Some(b) = &bucket {
                    b.take(data.len()).await;
                    core.lock().await.sched.stamp(offset, Instant::now());
                }
                let mut w = writer.lock().await;
                // Retired while this chunk waited (for the rate limit or the lock): its
                // goodbye may be out already, so another stream sends it.
                if retired.lock().is_ok_and(|r| r.contains(&i)) {
                    drop(w);
                    core.lock().await.sched.give_back(offset);
                    notify.notify_waiters();
                    return;
                }
                let r = w.send_data(object, offset, &data).await;
                drop(w);
                match r {
                    Ok(()) => {
                        sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if last {
                            // A permit if the object's loop is busy: it is not missed.
                            all_read.notify_one();
                        }
                    }
                    Err(e) => {
                        let _ = fail.send(WriterFailure::Lost(i, generation, e.to_string()));
                        return;
                    }
                }
            }
        }
    }
}

fn decode<M: prost::Message + Default>(f: &Frame) -> Result<M, ObjectFailure> {
    msg::decode(f)
        .map_err(|e| ObjectFailure::Fatal(SendError::Protocol(HandshakeError::from(e).to_string())))
}

fn refused(src: &Source, d: &ObjectDone) -> ObjectFailure {
    ObjectFailure::Fatal(SendError::Refused {
        name: src.name.clone(),
        code: ErrorCode(d.code),
        reason: msg::printable(&d.reason, msg::MAX_REASON_LEN),
    })
}

#[cfg(test)]
mod rate_limit_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `users` tasks each taking `each` chunks of `chunk` bytes from one cap; how long it took
    /// (tokio's clock, paused: exact).
    async fn drain(cap: &RateLimit, users: usize, each: usize, chunk: usize) -> Duration {
        let t = tokio::time::Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..users {
            let c = cap.clone();
            tasks.spawn(async move {
                for _ in 0..each {
                    c.take(chunk).await;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        t.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn one_cap_holds_its_rate_for_all_its_users_together() {
        let cap = RateLimit::new(1_000_000);
        // 4 users, 5 chunks of 100 kB each: 2 MB at 1 MB/s.
        let took = drain(&cap, 4, 5, 100_000).await;
        assert!(
            (Duration::from_millis(1_900)..=Duration::from_millis(2_100)).contains(&took),
            "{took:?}"
        );
        // A new rate holds from the next bytes on.
        cap.set(4_000_000);
        assert_eq!(cap.rate(), 4_000_000);
        let took = drain(&cap, 4, 5, 100_000).await;
        assert!(
            (Duration::from_millis(450)..=Duration::from_millis(550)).contains(&took),
            "{took:?}"
        );
        // Idle time saves up at most 50 ms of rate: no burst beyond that.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let took = drain(&cap, 1, 10, 100_000).await;
        // (1 MB at 4 MB/s is 250 ms; less 50 ms of it saved up: 200 ms.)
        assert!(took >= Duration::from_millis(190), "{took:?}");
        // A cap of 0 is 1 byte a second, not none.
        let slow = RateLimit::new(0);
        assert_eq!(slow.rate(), 1);
    }
}

#[cfg(test)]
mod summary_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_summary_that_does_not_read_is_not_used_and_fails_nothing() {
        assert!(summary_of(&[]).is_none());
        assert!(summary_of(b"HDEI\x01\xff\xff\xff").is_none(), "damaged");
        // Claims more entries than a sender takes.
        let mut big = b"HDEI".to_vec();
        big.push(dwcp_encoding::FORMAT_VERSION);
        big.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        big.extend(std::iter::repeat_n(1u8, 64));
        assert!(summary_of(&big).is_none(), "too many entries");
        let mut hs = vec![5u64, 9];
        let mut good = Vec::new();
        RemoteIndex::encode(&mut hs, &mut good);
        assert!(summary_of(&good).unwrap().contains(9));
    }
}
