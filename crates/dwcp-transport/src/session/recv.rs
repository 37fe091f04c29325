//! Receiving transfer sessions into a directory: the driver around [`Ranges`].
//!
//! Every connection of a session is served by its own task ([`Receiver::serve`]); they share
//! the session's object table. Chunks are written at their offsets as they arrive (no
//! reordering buffer: memory per connection is one frame), the contiguous prefix is
//! acknowledged and recorded in a small state file next to the partial file. The acknowledged
//! prefix is hashed (and synced to disk) on a thread of its own as it grows ([`Digester`]), so
//! at the end only the last bytes are left to hash before the file is compared with the
//! sender's BLAKE3 digest and renamed into place. A sender that reconnects after a failure is
//! told how much is already here and resumes from there.
//!
//! Files in the output directory, for an object named `NAME`:
//!
//! ```text
//! .NAME.dwcp-part    the bytes received so far, at their offsets
//! .NAME.dwcp-state   "dwcp-part 1\n<version tag>\n<size>\n<contiguous bytes>\n"
//! NAME               the verified file (the part file renamed)
//! .NAME.dwcp-decode  an HDE-encoded object being decoded (from NAME, its base, if present)
//! .NAME.dwcp-migrating  a live-migration target: rounds are applied to it in place, and a
//!                    MIGRATION commit renames it to NAME (an abort deletes it)
//! .NAME.TAG.dwcp-round        a migration round (part file and state, one pair per round,
//! .NAME.TAG.dwcp-round-state  TAG 16 hex digits of its version tag's BLAKE3): rounds of one
//!                    target may arrive at once, each in its own session, and are applied in
//!                    the order of their begins (see `turns`)
//! ```
//!
//! An object sent delta-encoded (HDE, `ObjectBegin::encoding`) is received and verified the
//! same way; then it is decoded against what this receiver holds — its previous copy of
//! `NAME` and its baseline cache — and the result is verified against the content's own
//! digest before it replaces `NAME`. Content it refers to but that is not here (evicted, or
//! changed since the sender was told) fails the object with `DELTA_UNRESOLVED`, and the
//! sender sends it again without such references: never a wrong file.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dwcp_encoding::{BaselineCache, ContentSource, PageStore, RemoteIndex};
use dwcp_wire::data::{
    self, Ack, BaseInfo, BaseQuery, Migration, ObjectBegin, ObjectDone, ObjectEnd, ObjectState,
    SessionJoin,
};
use dwcp_wire::msg::{self, Close, Ping};
use dwcp_wire::{ErrorCode, Frame, FrameType, HandshakeError, NodeId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::digest::{Digester, Follower};
use super::reasm::Ranges;
use super::turns::{Ticket, Turns};
use crate::conn::{ConnError, FrameReader, FrameWriter};

/// Acknowledge at least every this many new contiguous bytes.
const ACK_STEP: u64 = 1024 * 1024;
/// An `ACK` also goes out when this much more arrived beyond a hole since the last one.
const HOLE_STEP: u64 = ACK_STEP;

/// While an object arrives, sync its part file to disk every this many bytes, so that the
/// final sync has little left to write.
const SYNC_STEP: u64 = 64 * 1024 * 1024;

/// Most separate byte ranges held beyond the contiguous prefix of one object. A sender keeps
/// at most a window (32 MiB by default, in 256 KiB chunks: ~128 ranges) outstanding; far more
/// means it is not following the protocol, and the bookkeeping must stay bounded.
const MAX_ISLANDS: usize = 16_384;

/// Most objects open at once in one session (senders send them one after another).
const MAX_OBJECTS: usize = 64;

/// What the receiver reports as it works.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecvEvent {
    /// An object was verified and stored.
    Stored {
        /// Sending node.
        peer: NodeId,
        /// Object name.
        name: String,
        /// Final path.
        path: PathBuf,
        /// Size in bytes.
        size: u64,
        /// Bytes that were already here from an earlier, interrupted attempt.
        resumed_from: u64,
        /// For a delta-encoded object: the bytes of the encoded object (what crossed the
        /// network), `size` being the content's.
        encoded_size: Option<u64>,
    },
    /// An object failed (digest mismatch, storage error) or was refused at its begin.
    Failed {
        /// Sending node.
        peer: NodeId,
        /// Object name.
        name: String,
        /// The code the sender was told (`OBJECT_DONE`).
        code: ErrorCode,
        /// Why.
        reason: String,
    },
    /// The sender closed a session in good order (after its last object).
    SessionDone {
        /// Sending node.
        peer: NodeId,
    },
    /// The sender gave a session up (it closed its streams with an error: a file it could
    /// not read, a failure it does not retry). What arrived stays for a later resume.
    SenderGaveUp {
        /// Sending node.
        peer: NodeId,
        /// The code it closed with.
        code: ErrorCode,
        /// Its reason.
        reason: String,
    },
}

/// Why an object name is refused.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "object name must be 1..=200 bytes, got {}",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err(format!("object name {name:?} must not start with '.'"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "object name {:?} must be a plain file name (no '/', '\\\\' or control characters)",
            msg::printable(name, 200)
        ));
    }
    Ok(())
}

#[derive(Debug)]
struct RxObject {
    name: String,
    size: u64,
    file: Arc<File>,
    /// Where the verified file is published.
    path: PathBuf,
    /// What this object holds in the receiver's `active` set: `path`, or for a migration
    /// round its part file (rounds of one target may overlap, see `turns`).
    claim: PathBuf,
    part: PathBuf,
    state: PathBuf,
    tag: String,
    ranges: Ranges,
    acked: u64,
    /// The acknowledged prefix last recorded in the state file.
    saved: u64,
    /// Bytes held when the last `ACK` went out.
    reported: u64,
    resumed_from: u64,
    digest: Option<Vec<u8>>,
    finishing: bool,
    /// Set for an HDE-encoded object: how to decode it and what it must decode to.
    delta: Option<Delta>,
    /// Hashes the acknowledged prefix as it grows; taken when the object finishes.
    digester: Option<Digester>,
    /// Set for a round applied as it arrives: raised when the object goes (see [`Guarded`]).
    abandoned: Option<Arc<AtomicBool>>,
    /// A round resumed from a part file (applied at its end, not as it arrives): its place
    /// among its target's rounds.
    turn: Option<Ticket>,
    /// Something waits on it ([`ObjectBegin::urgent`]): every new chunk is acknowledged,
    /// with the ranges held beyond a hole, and the verdict goes on every stream.
    urgent: bool,
    /// The object is already published at `path` (see [`stored_copy`]): `file` is that copy,
    /// of this many bytes, and only its digest is checked.
    stored: Option<u64>,
}

impl Drop for RxObject {
    fn drop(&mut self) {
        if let Some(a) = &self.abandoned {
            a.store(true, Ordering::Release);
        }
    }
}

/// What an encoded object decodes to.
#[derive(Debug, Clone)]
struct Delta {
    encoding: u32,
    raw_size: u64,
    raw_blake3: Vec<u8>,
    /// An in-place round that commits its target once applied (v6).
    commit: bool,
}

/// Why an object's begin is refused.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    reason: String,
}

impl From<String> for Refusal {
    /// Anything but a busy receiver: the object cannot be stored as asked.
    fn from(reason: String) -> Self {
        Self {
            code: ErrorCode::STORAGE_ERROR,
            reason,
        }
    }
}

/// Largest content an encoded object may decode to (16 TiB).
const MAX_RAW_SIZE: u64 = 1 << 44;

/// Finished object ids a session remembers: a peer sending one refused begin after another
/// must not grow it without end. (A sender numbers its objects upwards; the oldest go.)
const MAX_FINISHED: usize = 1 << 16;

#[derive(Debug)]
struct RxSession {
    objects: HashMap<u64, RxObject>,
    goodbye: bool,
    /// Objects already verified or failed: late duplicates for them are ignored. The latest
    /// [`MAX_FINISHED`] ids (see [`RxSession::finished`]).
    finished: std::collections::BTreeSet<u64>,
    /// Ids below this were finished and have been forgotten (senders number objects upwards).
    forgotten_below: u64,
    /// The latest verdicts (`OBJECT_DONE`), by object: a sender whose copy was lost with its
    /// stream sends the end again on another and is answered from here.
    verdicts: std::collections::VecDeque<(u64, Frame)>,
    /// Connections of the session being served; at 0 the session is forgotten (what it
    /// stored is on disk, and a resuming sender opens a new session).
    conns: usize,
    /// Woken when an object is begun or refused: data that arrived before its begin waits.
    begun: Arc<tokio::sync::Notify>,
    /// Frames every connection of the session sends (an urgent object's verdict), with the
    /// connection that sent its own copy already. Bounded: a connection that lags behind
    /// misses copies, which are redundant.
    shout: broadcast::Sender<(u64, Frame)>,
    /// Numbers the session's connections, for `shout`.
    next_conn: u64,
    /// The session's id.
    id: Vec<u8>,
}

impl RxSession {
    /// Records object `id` as finished; whether it was not already.
    fn finish(&mut self, id: u64) -> bool {
        let first = id >= self.forgotten_below && self.finished.insert(id);
        while self.finished.len() > MAX_FINISHED {
            if let Some(old) = self.finished.pop_first() {
                self.forgotten_below = self.forgotten_below.max(old.saturating_add(1));
            }
        }
        first
    }

    /// Whether object `id`, not open, was finished (a late chunk or END for it is ignored,
    /// not taken for data of an object never begun).
    fn is_finished(&self, id: u64) -> bool {
        id < self.forgotten_below || self.finished.contains(&id)
    }

    /// Keeps `object`'s verdict for a sender that asks again (see `verdicts`).
    fn keep_verdict(&mut self, object: u64, frame: Frame) {
        if self.verdicts.len() >= VERDICTS_KEPT {
            self.verdicts.pop_front();
        }
        self.verdicts.push_back((object, frame));
    }
}

impl Default for RxSession {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            goodbye: false,
            finished: Default::default(),
            forgotten_below: 0,
            verdicts: Default::default(),
            conns: 0,
            begun: Default::default(),
            shout: broadcast::channel(SHOUT_CAPACITY).0,
            next_conn: 0,
            id: Vec::new(),
        }
    }
}

/// Largest object whose `urgent` flag is honoured (senders mark objects of up to this size,
/// and send those of up to 1 MiB twice).
pub(crate) const URGENT_MAX_SIZE: u64 = 16 << 20;

/// Most segments one heartbeat may report: a second at 1 Tbit/s in 1,448-byte segments, with
/// room for a heartbeat held up a few seconds.
const MAX_SEGMENTS_PER_HEARTBEAT: u64 = 1 << 30;

/// Frames queued for a session's connections to send (see `RxSession::shout`).
const SHOUT_CAPACITY: usize = 16;

/// Verdicts kept per session for a sender that asks again (see `RxSession::verdicts`): its
/// objects go one after another, so the last few are enough.
const VERDICTS_KEPT: usize = 16;

/// One connection's place in its session.
struct Conn {
    /// Its number among the session's connections.
    me: u64,
    /// Frames every connection sends.
    shout: broadcast::Receiver<(u64, Frame)>,
    open: bool,
}

/// How long data for an object not yet begun waits for its `OBJECT_BEGIN`, which a v4 sender
/// of a fresh object writes on another connection at the same time: as long as the sender
/// waits for the answer to a begin, after which the data is a violation.
const BEGIN_WAIT: Duration = Duration::from_secs(30);

/// What the receiver knows of the object a chunk belongs to.
enum ChunkFor {
    /// Open: its file and acknowledged prefix.
    Open(Arc<File>, u64),
    /// Finished or refused: a late or ignored chunk.
    Done,
    /// Not begun (yet).
    Unknown,
}

type SessionMap = HashMap<(NodeId, Vec<u8>), Arc<Mutex<RxSession>>>;

/// Receives sessions into a directory.
#[derive(Debug)]
pub struct Receiver {
    dir: PathBuf,
    sessions: Mutex<SessionMap>,
    events: broadcast::Sender<RecvEvent>,
    idle: Duration,
    /// Destination files being received, across all sessions.
    active: Mutex<std::collections::HashSet<PathBuf>>,
    /// Migration rounds begun, per target, in order.
    turns: Turns,
    /// When a round of each migration target last began or ended (by this process's
    /// clock): a round resumed from its part file writes its target only at its end.
    round_activity: Mutex<HashMap<PathBuf, Instant>>,
    /// Store each peer's objects in a subdirectory named after it.
    per_peer: bool,
    /// Whether HDE-encoded objects are accepted.
    delta: bool,
    /// The baseline cache encoded objects are decoded against, and learn into.
    cache: Option<Arc<Mutex<BaselineCache>>>,
    /// Incoming QEMU migrations, when this node accepts them ([`Self::accept_qemu`]).
    qemu: std::sync::OnceLock<super::qemu_feed::Feeds>,
    /// Per sending peer: streams open now, bytes of `DATA` taken.
    peers: Mutex<HashMap<NodeId, Arc<PeerCounters>>>,
}

#[derive(Debug, Default)]
struct PeerCounters {
    streams: std::sync::atomic::AtomicU32,
    data_bytes: std::sync::atomic::AtomicU64,
    /// What its sessions' heartbeats reported of TCP: segments retransmitted, and sent.
    tcp_retransmits: std::sync::atomic::AtomicU64,
    tcp_segments: std::sync::atomic::AtomicU64,
    /// Migrations from this peer that ended here, by [`MIGRATION_OUTCOMES`].
    migrations: [std::sync::atomic::AtomicU64; MIGRATION_OUTCOMES.len()],
    /// Objects stored and failed, the stored ones' bytes, and of the delta-encoded ones the
    /// bytes that came and the content they stood for.
    objects_stored: std::sync::atomic::AtomicU64,
    objects_failed: std::sync::atomic::AtomicU64,
    object_bytes: std::sync::atomic::AtomicU64,
    delta_wire_bytes: std::sync::atomic::AtomicU64,
    delta_content_bytes: std::sync::atomic::AtomicU64,
}

/// How a migration into this node ended, as counted per peer: the backend (`memory`: a
/// memory image published in the spool; `qemu`: a QEMU guest's stream fed to the waiting
/// QEMU) and the result (`committed`: published, or loaded by QEMU; `aborted`: the source
/// rolled it back; `failed`: QEMU's load failed here, or its stream did not check out).
/// A memory image whose commit fails here is rolled back by its source: `aborted`.
pub const MIGRATION_OUTCOMES: [(&str, &str); 5] = [
    ("memory", "committed"),
    ("memory", "aborted"),
    ("qemu", "committed"),
    ("qemu", "aborted"),
    ("qemu", "failed"),
];

/// One stream counted in its peer's `streams` for as long as it lives.
struct OpenStream(Arc<PeerCounters>);

impl OpenStream {
    fn new(c: Arc<PeerCounters>) -> Self {
        c.streams.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a receiver sees of one sending peer ([`Receiver::peer_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer.
    pub peer: NodeId,
    /// Session streams it has open now.
    pub streams: u32,
    /// Chunk bytes taken from it since start (as they arrive, before objects complete):
    /// its rate is the live goodput.
    pub data_bytes: u64,
    /// Its migrations that ended here, counted by [`MIGRATION_OUTCOMES`] (same order).
    pub migrations: [u64; MIGRATION_OUTCOMES.len()],
    /// Its post-copy migrations here whose stream stopped, now: each guest runs here and
    /// waits for pages still at the peer, until the peer resumes the migration.
    pub migrations_paused: u64,
    /// Segments TCP retransmitted on its session streams to this node, as its heartbeats
    /// report them (its kernel counts them; this node's cannot): since start.
    pub tcp_retransmits: u64,
    /// ... and the data segments it sent on them, retransmissions included.
    pub tcp_segments: u64,
    /// Its objects stored here since start, and failed.
    pub objects_stored: u64,
    pub objects_failed: u64,
    /// Bytes of its objects stored (content).
    pub object_bytes: u64,
    /// Of its delta-encoded objects stored: bytes that came, and content they stood for.
    pub delta_wire_bytes: u64,
    pub delta_content_bytes: u64,
}

/// What a served connection ended with.
#[derive(Debug)]
pub enum Served {
    /// The sender closed the connection in good order.
    Goodbye,
    /// The connection ended without a goodbye (the sender may resume later).
    Dropped,
}

impl Receiver {
    /// Receives into `dir` (created if missing), or into `dir/<peer node id>` when
    /// `per_peer`; a connection silent for `idle` is dropped.
    pub fn new(dir: &Path, idle: Duration, per_peer: bool) -> std::io::Result<Arc<Self>> {
        Self::with_delta(dir, idle, per_peer, true, None)
    }

    /// As [`Self::new`], saying whether delta-encoded objects are accepted and which baseline
    /// cache (if any) they are decoded against.
    pub fn with_delta(
        dir: &Path,
        idle: Duration,
        per_peer: bool,
        delta: bool,
        cache: Option<BaselineCache>,
    ) -> std::io::Result<Arc<Self>> {
        fs::create_dir_all(dir)?;
        let (events, _) = broadcast::channel(256);
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            sessions: Mutex::new(HashMap::new()),
            events,
            idle,
            active: Mutex::new(std::collections::HashSet::new()),
            turns: Turns::default(),
            round_activity: Mutex::new(HashMap::new()),
            per_peer,
            delta,
            cache: cache.map(|c| Arc::new(Mutex::new(c))),
            qemu: std::sync::OnceLock::new(),
            peers: Mutex::new(HashMap::new()),
        }))
    }

    /// Each peer that has sent to this receiver: its open streams and the bytes taken.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        use Ordering::Relaxed;
        let paused = self.qemu.get().map(|f| f.paused()).unwrap_or_default();
        if let Some(f) = self.qemu.get() {
            for (peer, n) in f.take_given_up() {
                for _ in 0..n {
                    self.migration_ended(&peer, "qemu", "aborted");
                }
            }
        }
        let mut v: Vec<PeerStats> = lock(&self.peers)
            .iter()
            .map(|(peer, c)| PeerStats {
                peer: peer.clone(),
                streams: c.streams.load(Relaxed),
                data_bytes: c.data_bytes.load(Relaxed),
                migrations: std::array::from_fn(|i| c.migrations[i].load(Relaxed)),
                migrations_paused: paused.get(peer).copied().unwrap_or(0),
                tcp_retransmits: c.tcp_retransmits.load(Relaxed),
                tcp_segments: c.tcp_segments.load(Relaxed),
                objects_stored: c.objects_stored.load(Relaxed),
                objects_failed: c.objects_failed.load(Relaxed),
                object_bytes: c.object_bytes.load(Relaxed),
                delta_wire_bytes: c.delta_wire_bytes.load(Relaxed),
                delta_content_bytes: c.delta_content_bytes.load(Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.peer.as_str().cmp(b.peer.as_str()));
        v
    }

    /// Counts an object stored or failed in its peer's counters (a subscriber to the events
    /// may miss some when it lags; these miss none), then tells the subscribers.
    fn object_event(&self, ev: RecvEvent) {
        use Ordering::Relaxed;
        let counters = |peer: &NodeId| lock(&self.peers).entry(peer.clone()).or_default().clone();
        match &ev {
            RecvEvent::Stored {
                peer,
                size,
                encoded_size,
                ..
            } => {
                let c = counters(peer);
                c.objects_stored.fetch_add(1, Relaxed);
                c.object_bytes.fetch_add(*size, Relaxed);
                if let Some(wire) = encoded_size {
                    c.delta_wire_bytes.fetch_add(*wire, Relaxed);
                    c.delta_content_bytes.fetch_add(*size, Relaxed);
                }
            }
            RecvEvent::Failed { peer, .. } => {
                counters(peer).objects_failed.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        let _ = self.events.send(ev);
    }

    /// Counts a migration of `peer` that ended here (`backend`, `result`: an entry of
    /// [`MIGRATION_OUTCOMES`]).
    fn migration_ended(&self, peer: &NodeId, backend: &str, result: &str) {
        let i = MIGRATION_OUTCOMES
            .iter()
            .position(|&(b, r)| b == backend && r == result);
        debug_assert!(i.is_some(), "no migration outcome {backend} {result}");
        if let Some(i) = i {
            let c = lock(&self.peers).entry(peer.clone()).or_default().clone();
            c.migrations[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Accepts incoming QEMU migrations: the QEMU for VM `NAME` waits in `dir` with
    /// `-incoming unix:DIR/NAME.incoming` and a monitor `-qmp unix:DIR/NAME.qmp,server=on,wait=off`.
    /// Only the first call has an effect.
    pub fn accept_qemu(&self, dir: &Path) {
        let _ = self.qemu.set(super::qemu_feed::Feeds::new(dir));
    }

    /// The baseline cache's counters, if it has one.
    /// Never waits: `None` while a decode holds the cache.
    pub fn cache_stats(&self) -> Option<dwcp_encoding::CacheStats> {
        self.cache.as_ref().and_then(|c| match c.try_lock() {
            Ok(g) => Some(g.stats()),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner().stats()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        })
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Events (objects stored or failed, sessions done).
    pub fn subscribe(&self) -> broadcast::Receiver<RecvEvent> {
        self.events.subscribe()
    }

    fn session(&self, peer: &NodeId, id: &[u8]) -> Arc<Mutex<RxSession>> {
        let mut map = lock(&self.sessions);
        let s = map.entry((peer.clone(), id.to_vec())).or_default().clone();
        let mut g = lock(&s);
        g.conns += 1;
        if g.id.is_empty() {
            g.id = id.to_vec();
        }
        drop(g);
        s
    }

    fn leave(&self, peer: &NodeId, id: &[u8], session: &Mutex<RxSession>) {
        let mut map = lock(&self.sessions);
        let mut s = lock(session);
        s.conns = s.conns.saturating_sub(1);
        if s.conns == 0 {
            map.remove(&(peer.clone(), id.to_vec()));
            // What it had not finished stays on disk for a resuming sender.
            let mut active = lock(&self.active);
            for o in s.objects.values() {
                active.remove(&o.claim);
                if o.claim != o.path {
                    self.touch_round(&o.path);
                }
            }
            s.objects.clear();
        }
    }

    /// Serves one connection of a session, from its `SESSION` frame (`first`) on, until the
    /// peer closes it or it fails.
    /// When `stop` is cancelled (the node is shutting down) the stream is closed with
    /// `SHUTTING_DOWN` after the frame in hand; what was stored is recorded, so the sender can
    /// resume with the next instance.
    pub async fn serve<R, W>(
        &self,
        peer: NodeId,
        first: Frame,
        reader: FrameReader<R>,
        writer: FrameWriter<W>,
        max_streams: u32,
        stop: &CancellationToken,
    ) -> Result<Served, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let join: SessionJoin = msg::decode(&first).map_err(HandshakeError::from)?;
        if join.session_id.len() != data::SESSION_ID_LEN {
            let err = HandshakeError::BadAnswer(format!(
                "session id of {} bytes, {} expected",
                join.session_id.len(),
                data::SESSION_ID_LEN
            ));
            writer
                .close(ErrorCode::PROTOCOL_ERROR, &err.to_string())
                .await;
            return Err(err.into());
        }
        debug!(%peer, stream = join.stream_index, "stream joined session");
        let session = self.session(&peer, &join.session_id);
        let conns = lock(&session).conns;
        // Twice the handshake's limit: a replacement stream may join while the receiver has not
        // yet noticed that its predecessor died.
        if conns > 2 * max_streams as usize {
            self.leave(&peer, &join.session_id, &session);
            let detail =
                format!("session has {conns} connections, the handshake allowed {max_streams}");
            return Err(self.violation(writer, detail).await);
        }
        let counters = lock(&self.peers).entry(peer.clone()).or_default().clone();
        // Counted while this stream is served, however that ends (cancellation included).
        let open = OpenStream::new(counters);
        let (me, shout) = {
            let mut s = lock(&session);
            s.next_conn += 1;
            (s.next_conn, s.shout.subscribe())
        };
        let conn = Conn {
            me,
            shout,
            open: true,
        };
        let result = self
            .serve_stream(peer.clone(), &session, &open.0, conn, reader, writer, stop)
            .await;
        drop(open);
        self.leave(&peer, &join.session_id, &session);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_stream<R, W>(
        &self,
        peer: NodeId,
        session: &Mutex<RxSession>,
        counters: &PeerCounters,
        mut conn: Conn,
        mut reader: FrameReader<R>,
        mut writer: FrameWriter<W>,
        stop: &CancellationToken,
    ) -> Result<Served, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let next = tokio::select! {
                // In this order: a verdict to pass on goes before the next frame is read.
                biased;
                () = stop.cancelled() => {
                    writer.close(ErrorCode::SHUTTING_DOWN, "receiver is shutting down").await;
                    return Ok(Served::Dropped);
                }
                shouted = conn.shout.recv(), if conn.open => {
                    match shouted {
                        Ok((from, f)) if from != conn.me => self.send(&mut writer, &f).await?,
                        // Its own copy went already; copies missed while lagging are
                        // redundant.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => conn.open = false,
                    }
                    continue;
                }
                r = tokio::time::timeout(self.idle, reader.recv()) => r,
            };
            let frame = match next {
                Err(_) => {
                    writer.close(ErrorCode::TIMEOUT, "idle").await;
                    return Ok(Served::Dropped);
                }
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) => return Ok(Served::Dropped),
                Ok(Err(e)) => {
                    if let ConnError::Frame(fe) = &e {
                        writer.close(fe.code(), &fe.to_string()).await;
                    }
                    return Err(e);
                }
            };
            match frame.ty {
                FrameType::DATA => {
                    let (h, chunk) = data::decode_data(&frame).map_err(HandshakeError::from)?;
                    counters
                        .data_bytes
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    let deadline = tokio::time::Instant::now() + BEGIN_WAIT;
                    let checked = loop {
                        let begun = lock(session).begun.clone();
                        let notified = begun.notified();
                        tokio::pin!(notified);
                        // Registered before looking, so a begin in between is not missed.
                        notified.as_mut().enable();
                        let found = {
                            let s = lock(session);
                            match s.objects.get(&h.object) {
                                // A re-sent chunk racing with the object's completion, or data
                                // of a refused fresh object: harmless.
                                None if s.is_finished(h.object) => Ok(ChunkFor::Done),
                                None => Ok(ChunkFor::Unknown),
                                Some(o) if h.offset + chunk.len() as u64 > o.size => Err(format!(
                                    "chunk at {} ({} bytes) runs past the object's size {}",
                                    h.offset,
                                    chunk.len(),
                                    o.size
                                )),
                                Some(o) => Ok(ChunkFor::Open(o.file.clone(), o.acked)),
                            }
                        };
                        match found {
                            Ok(ChunkFor::Unknown) if tokio::time::Instant::now() < deadline => {
                                tokio::select! {
                                    () = stop.cancelled() => {
                                        writer.close(ErrorCode::SHUTTING_DOWN, "receiver is shutting down").await;
                                        return Ok(Served::Dropped);
                                    }
                                    _ = tokio::time::timeout_at(deadline, notified) => {}
                                }
                            }
                            Ok(ChunkFor::Unknown) => {
                                break Err(format!("data for unknown object {}", h.object));
                            }
                            Ok(ChunkFor::Done) => break Ok(None),
                            Ok(ChunkFor::Open(file, acked)) => break Ok(Some((file, acked))),
                            Err(e) => break Err(e),
                        }
                    };
                    let (file, floor) = match checked {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(detail) => return Err(self.violation(writer, detail).await),
                    };
                    let offset = h.offset;
                    let full = chunk.len() as u64;
                    // Bytes below the acknowledged prefix are here and may be hashed already
                    // (the digester): a re-sent chunk must not write them again.
                    let skip = floor.saturating_sub(offset).min(full);
                    let written = if skip == full {
                        Ok(Ok(full))
                    } else {
                        tokio::task::spawn_blocking(move || {
                            // `skip < full = chunk.len()`, so the slice is in bounds.
                            file.write_all_at(&chunk[skip as usize..], offset + skip)
                                .map(|()| full)
                        })
                        .await
                    };
                    let len = match written {
                        Ok(Ok(n)) => n,
                        Ok(Err(e)) => {
                            let reason = format!("cannot write: {e}");
                            if !self.fail_object(
                                &peer,
                                session,
                                h.object,
                                ErrorCode::STORAGE_ERROR,
                                &reason,
                            ) {
                                continue;
                            }
                            let done = ObjectDone {
                                object: h.object,
                                code: ErrorCode::STORAGE_ERROR.0,
                                reason,
                                data: Vec::new(),
                            };
                            self.send_verdict(session, &mut writer, conn.me, &done, false)
                                .await?;
                            continue;
                        }
                        Err(e) => {
                            return Err(ConnError::Io {
                                stage: crate::Stage::Established,
                                source: std::io::Error::other(e),
                            });
                        }
                    };
                    let ack = {
                        let mut s = lock(session);
                        let Some(o) = s.objects.get_mut(&h.object) else {
                            continue;
                        };
                        let new = o.ranges.insert(offset, offset + len);
                        if o.ranges.islands() > MAX_ISLANDS {
                            Err(format!(
                                "more than {MAX_ISLANDS} separate ranges outstanding: the sender \
                                 ignores its window"
                            ))
                        } else {
                            let c = o.ranges.contiguous();
                            let held = o.ranges.held();
                            // A duplicate: the sender re-sent because it did not see our ACK
                            // (lost with a stream) or its stream seemed stuck. Data piling up
                            // beyond a hole: the sender may send the missing chunks again.
                            // Either way, say where we are.
                            // An urgent object: every chunk, so that the sender knows which
                            // copies are missing a round trip sooner.
                            let due = c >= o.acked + ACK_STEP
                                || (c == o.size && o.acked < c)
                                || new == 0
                                || held >= o.reported + HOLE_STEP
                                || o.urgent;
                            if !due {
                                Ok(None)
                            } else {
                                o.reported = held;
                                let islands: Vec<u64> = if o.urgent {
                                    o.ranges
                                        .lowest_islands(data::MAX_ACK_ISLANDS)
                                        .flat_map(|(s, e)| [s, e])
                                        .collect()
                                } else {
                                    Vec::new()
                                };
                                let mut persist = None;
                                if c > o.acked {
                                    o.acked = c;
                                    if let Some(d) = &o.digester {
                                        d.advance(c);
                                    }
                                    // Recorded in steps, however often an urgent
                                    // object is acknowledged.
                                    if c >= o.saved + ACK_STEP || c == o.size {
                                        o.saved = c;
                                        persist = Some((o.state.clone(), o.tag.clone(), o.size));
                                    }
                                }
                                Ok(Some((c, held, islands, persist)))
                            }
                        }
                    };
                    let ack = match ack {
                        Ok(a) => a,
                        Err(detail) => return Err(self.violation(writer, detail).await),
                    };
                    if let Some((offset, received, islands, persist)) = ack {
                        if let Some((path, tag, size)) = persist {
                            save_state(&path, &tag, size, offset);
                        }
                        let a = Ack {
                            object: h.object,
                            offset,
                            received,
                            islands,
                        };
                        self.send(&mut writer, &msg::encode(FrameType::ACK, &a))
                            .await?;
                    }
                    self.maybe_finish(&peer, session, h.object, &mut writer, conn.me)
                        .await?;
                }
                FrameType::OBJECT_BEGIN => {
                    let begin: ObjectBegin = msg::decode(&frame).map_err(HandshakeError::from)?;
                    // An open object begun again as another: the sender is broken, and a
                    // refusal would mark the open object finished.
                    let conflict = lock(session).objects.get(&begin.object).and_then(|o| {
                        (o.name != begin.name || o.size != begin.size).then(|| {
                            format!(
                                "object {} was begun with another name or size",
                                begin.object
                            )
                        })
                    });
                    if let Some(detail) = conflict {
                        return Err(self.violation(writer, detail).await);
                    }
                    let reply = match self.begin(&peer, session, &begin) {
                        Ok(have) => msg::encode(
                            FrameType::OBJECT_STATE,
                            &ObjectState {
                                object: begin.object,
                                have,
                            },
                        ),
                        Err(Refusal { code, reason }) => {
                            let name = msg::printable(&begin.name, 200);
                            warn!(%peer, %name, %code, "refusing object: {reason}");
                            // A sender of a fresh object writes data right behind its begin:
                            // that data is ignored, not a violation that ends the session.
                            let first = {
                                let mut s = lock(session);
                                let first = s.finish(begin.object);
                                s.begun.notify_waiters();
                                first
                            };
                            // The sender gives the object up: reported like any failed object
                            // (a one-shot `dwcp recv` exits on it rather than wait forever).
                            // Once per object, although a begin may come on several streams.
                            // Not when it is told to try again.
                            if first && code != ErrorCode::BUSY {
                                self.object_event(RecvEvent::Failed {
                                    peer: peer.clone(),
                                    name,
                                    code,
                                    reason: reason.clone(),
                                });
                            }
                            msg::encode(
                                FrameType::OBJECT_DONE,
                                &ObjectDone {
                                    object: begin.object,
                                    code: code.0,
                                    reason,
                                    data: Vec::new(),
                                },
                            )
                        }
                    };
                    self.send(&mut writer, &reply).await?;
                }
                FrameType::TUNNEL_DATA => {
                    let (h, block) =
                        data::decode_tunnel_data(&frame).map_err(HandshakeError::from)?;
                    let sid = lock(session).id.clone();
                    let ack = self.tunnel_block(&peer, &h, block, &sid).await;
                    self.send(&mut writer, &msg::encode(FrameType::TUNNEL_ACK, &ack))
                        .await?;
                }
                FrameType::MIGRATION => {
                    let m: Migration = msg::decode(&frame).map_err(HandshakeError::from)?;
                    let done = self.migration(&peer, &m, writer.max_chunk()).await;
                    self.send(&mut writer, &msg::encode(FrameType::OBJECT_DONE, &done))
                        .await?;
                }
                FrameType::BASE_QUERY => {
                    let q: BaseQuery = msg::decode(&frame).map_err(HandshakeError::from)?;
                    self.answer_base_query(&peer, &q, &mut writer).await?;
                }
                FrameType::OBJECT_END => {
                    let end: ObjectEnd = msg::decode(&frame).map_err(HandshakeError::from)?;
                    let mut again = None;
                    let problem = {
                        let mut s = lock(session);
                        let done = s.is_finished(end.object);
                        match s.objects.get_mut(&end.object) {
                            // A repeated end after the verdict: the sender sends it again when
                            // the stream that carried its end died, and with it, perhaps, the
                            // verdict. It gets the verdict again (it ignores a second copy).
                            None if done => {
                                again = s
                                    .verdicts
                                    .iter()
                                    .find(|(o, _)| *o == end.object)
                                    .map(|(_, f)| f.clone());
                                None
                            }
                            Some(o) if o.size == end.size && end.blake3.len() == 32 => {
                                o.digest = Some(end.blake3);
                                None
                            }
                            Some(o) => Some(format!(
                                "object end for {:?} says {} bytes and a {}-byte digest; \
                                 begin said {} bytes",
                                o.name,
                                end.size,
                                end.blake3.len(),
                                o.size
                            )),
                            None => Some(format!("end of unknown object {}", end.object)),
                        }
                    };
                    if let Some(detail) = problem {
                        return Err(self.violation(writer, detail).await);
                    }
                    if let Some(f) = again {
                        self.send(&mut writer, &f).await?;
                        continue;
                    }
                    self.maybe_finish(&peer, session, end.object, &mut writer, conn.me)
                        .await?;
                }
                FrameType::PING => {
                    let p: Ping = msg::decode(&frame).map_err(HandshakeError::from)?;
                    // What TCP counted since the sender's last heartbeat. Only counted: a
                    // report that cannot be (more retransmitted than sent, or more segments
                    // than a second could carry at 1 Tbit/s) is ignored.
                    let (r, n) = (p.sender_tcp_retransmits, p.sender_tcp_segments);
                    if n > 0 && r <= n && n <= MAX_SEGMENTS_PER_HEARTBEAT {
                        counters.tcp_retransmits.fetch_add(r, Ordering::Relaxed);
                        counters.tcp_segments.fetch_add(n, Ordering::Relaxed);
                    }
                    self.send(&mut writer, &msg::encode(FrameType::PONG, &p))
                        .await?;
                }
                FrameType::GOAWAY => {
                    let close: Close = msg::decode(&frame).map_err(HandshakeError::from)?;
                    // Answered, so the sender knows every frame it sent before was read (a
                    // retired stream's chunks need not be sent again).
                    let _ = writer.goodbye(ErrorCode::NO_ERROR, "goodbye").await;
                    if close.error_code() == ErrorCode::NO_ERROR {
                        let first_goodbye = !std::mem::replace(&mut lock(session).goodbye, true);
                        if first_goodbye {
                            let _ = self.events.send(RecvEvent::SessionDone { peer });
                        }
                        return Ok(Served::Goodbye);
                    }
                    debug!(%peer, "sender closed the stream: {}", close.printable_reason());
                    // Closing a stream it retires is not giving up; any other error is,
                    // on every stream of the session: reported once.
                    if close.error_code() != ErrorCode::STREAM_CLOSED
                        && !std::mem::replace(&mut lock(session).goodbye, true)
                    {
                        let _ = self.events.send(RecvEvent::SenderGaveUp {
                            peer,
                            code: close.error_code(),
                            reason: close.printable_reason(),
                        });
                    }
                    return Ok(Served::Dropped);
                }
                FrameType::PONG => {}
                ty if ty.is_extension() => {}
                ty => {
                    let err = HandshakeError::UnexpectedFrame {
                        ty: ty.0,
                        name: ty.name(),
                    };
                    writer.close(err.code(), &err.to_string()).await;
                    return Err(err.into());
                }
            }
        }
    }

    async fn violation<W: AsyncWrite + Unpin>(
        &self,
        writer: FrameWriter<W>,
        detail: String,
    ) -> ConnError {
        writer.close(ErrorCode::PROTOCOL_ERROR, &detail).await;
        HandshakeError::BadAnswer(detail).into()
    }

    /// Opens (or resumes) the part file for an object; returns the bytes already held.
    /// Where objects from `peer` are stored.
    /// Answers a `BASE_QUERY`: the cache summary, then the page hashes of the current copy of
    /// the named object if it has the announced size. A bad name gets empty parts (the object
    /// itself will be refused when it is begun).
    async fn answer_base_query<W: AsyncWrite + Unpin>(
        &self,
        peer: &NodeId,
        q: &BaseQuery,
        writer: &mut FrameWriter<W>,
    ) -> Result<(), ConnError> {
        // The cache lock may be held by a decode for a while: not on an async worker.
        let summary = match (&self.cache, self.delta) {
            (Some(c), true) => {
                let c = c.clone();
                tokio::task::spawn_blocking(move || {
                    let mut hashes = lock(&c).summary();
                    let mut out = Vec::new();
                    RemoteIndex::encode(&mut hashes, &mut out);
                    out
                })
                .await
                .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let ps = q.page_size as usize;
        let mut path = self.dir_for(peer).join(&q.name);
        if q.migration_target {
            path = migration_target(&path);
        }
        let (pages, copy) = if self.delta
            && check_name(&q.name).is_ok()
            && (512..=65536).contains(&ps)
            && ps.is_power_of_two()
            && q.raw_size.is_multiple_of(ps as u64)
        {
            let raw_size = q.raw_size;
            tokio::task::spawn_blocking(move || page_hashes(&path, raw_size, ps))
                .await
                .unwrap_or((Vec::new(), data::BASE_COPY_UNKNOWN))
        } else {
            (Vec::new(), data::BASE_COPY_UNSAID)
        };
        let piece = writer.max_chunk().saturating_sub(64).max(1024);
        for (part, bytes) in [
            (data::BASE_PART_SUMMARY, summary),
            (data::BASE_PART_PAGES, pages),
        ] {
            let total = bytes.len() as u64;
            let mut offset = 0usize;
            loop {
                let end = (offset + piece).min(bytes.len());
                let info = BaseInfo {
                    object: q.object,
                    part,
                    offset: offset as u64,
                    total,
                    data: bytes[offset..end].to_vec(),
                    copy: if part == data::BASE_PART_PAGES {
                        copy
                    } else {
                        data::BASE_COPY_UNSAID
                    },
                };
                self.send(writer, &msg::encode(FrameType::BASE_INFO, &info))
                    .await?;
                offset = end;
                if offset >= bytes.len() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Takes a block of a tunnelled stream: decodes it (against the baseline cache) and queues
    /// it for the incoming QEMU migration it belongs to.
    async fn tunnel_block(
        &self,
        peer: &NodeId,
        h: &data::TunnelHeader,
        block: Bytes,
        session: &[u8],
    ) -> data::TunnelAck {
        let ack = |code: ErrorCode, reason: String| data::TunnelAck {
            name: h.name.clone(),
            seq: h.seq,
            code: code.0,
            reason,
        };
        let Some(feeds) = self.qemu.get() else {
            return ack(
                ErrorCode::STORAGE_ERROR,
                "this node does not accept QEMU migrations (no migration.qemu_dir)".into(),
            );
        };
        if h.raw_len > data::TUNNEL_MAX_RAW {
            // Checked before decoding: the decoder's output is sized from it.
            return ack(
                ErrorCode::PROTOCOL_ERROR,
                format!(
                    "block of {} bytes (at most {})",
                    h.raw_len,
                    data::TUNNEL_MAX_RAW
                ),
            );
        }
        let raw = if h.encoding == data::TUNNEL_RAW {
            block
        } else if !self.delta {
            return ack(
                ErrorCode::PROTOCOL_ERROR,
                "delta encoding is off on this node".into(),
            );
        } else {
            let cache = self.cache.clone();
            let raw_len = u64::from(h.raw_len);
            let r = tokio::task::spawn_blocking(move || {
                decode_block(&block, raw_len, cache.as_deref())
            })
            .await
            .unwrap_or_else(|e| Err((ErrorCode::INTERNAL_ERROR, e.to_string())));
            match r {
                Ok(raw) => raw,
                Err((code, reason)) => return ack(code, reason),
            }
        };
        match feeds.push(peer, &h.name, h.seq, raw, session).await {
            Ok(()) => ack(ErrorCode(0), String::new()),
            Err(reason) => ack(ErrorCode::STORAGE_ERROR, reason),
        }
    }

    /// Commits (publishes) or aborts (deletes) a migration target.
    /// `max`: the most bytes a frame carries on the connection that answers.
    async fn migration(&self, peer: &NodeId, m: &Migration, max: usize) -> ObjectDone {
        let refuse = |reason: String| ObjectDone {
            object: m.object,
            code: ErrorCode::STORAGE_ERROR.0,
            reason,
            data: Vec::new(),
        };
        if let Err(e) = check_name(&m.name) {
            return refuse(e);
        }
        if matches!(
            m.op,
            data::MIGRATION_QEMU_OPEN
                | data::MIGRATION_QEMU_FINISH
                | data::MIGRATION_QEMU_ABORT
                | data::MIGRATION_QEMU_RETURN
                | data::MIGRATION_QEMU_RECOVER
        ) {
            let Some(feeds) = self.qemu.get() else {
                return refuse(
                    "this node does not accept QEMU migrations (no migration.qemu_dir)".into(),
                );
            };
            if m.op == data::MIGRATION_QEMU_RETURN {
                // Room for the answer's other fields within the connection's frame size.
                let most = max.saturating_sub(256).max(64);
                return match feeds
                    .returned(peer, &m.name, m.segments, most, &m.stream_session)
                    .await
                {
                    Ok((bytes, end)) => ObjectDone {
                        object: m.object,
                        code: 0,
                        reason: if end { "end".into() } else { String::new() },
                        data: bytes,
                    },
                    Err(reason) => {
                        warn!(%peer, vm = %m.name, "QEMU return path: {reason}");
                        refuse(reason)
                    }
                };
            }
            let r = match m.op {
                data::MIGRATION_QEMU_OPEN => {
                    // A leftover of an earlier attempt (its source vanished) counts when the
                    // next attempt clears it, as a memory image's target does.
                    if feeds.end_earlier(peer, &m.name).await {
                        self.migration_ended(peer, "qemu", "aborted");
                    }
                    let wait = Duration::from_secs(m.wait_secs);
                    feeds
                        .open(peer, &m.name, m.postcopy, wait, &m.stream_session)
                        .await
                }
                data::MIGRATION_QEMU_RECOVER => {
                    let wait = Duration::from_secs(m.wait_secs);
                    feeds.recover(peer, &m.name, &m.stream_session, wait).await
                }
                data::MIGRATION_QEMU_FINISH => {
                    let (r, ended) = feeds
                        .finish(peer, &m.name, m.segments, &m.blake3, &m.stream_session)
                        .await;
                    // Only a finish that ended the incoming migration itself counts (not one
                    // refused, nor one an abort overtook: that abort counts).
                    if ended {
                        let result = if r.is_ok() { "committed" } else { "failed" };
                        self.migration_ended(peer, "qemu", result);
                    }
                    r
                }
                _ => {
                    // Counted when something was open (not for a migration refused at its
                    // start, nor twice).
                    match feeds.abort(peer, &m.name, &m.stream_session).await {
                        Ok(true) => {
                            self.migration_ended(peer, "qemu", "aborted");
                            Ok(String::new())
                        }
                        Ok(false) => Ok(String::new()),
                        Err(e) => Err(e),
                    }
                }
            };
            return match r {
                Ok(detail) => ObjectDone {
                    object: m.object,
                    code: 0,
                    reason: detail,
                    data: Vec::new(),
                },
                Err(reason) => {
                    warn!(%peer, vm = %m.name, op = m.op, "QEMU migration op failed: {reason}");
                    let mut done = refuse(reason);
                    if done.reason.starts_with(super::qemu_feed::OUTCOME_UNKNOWN) {
                        done.code = ErrorCode::OUTCOME_UNKNOWN.0;
                    }
                    done
                }
            };
        }
        // Not to `settle`, which ends the target's migration (its round files) either way.
        if m.op != data::MIGRATION_COMMIT && m.op != data::MIGRATION_ABORT {
            return refuse(format!("unknown migration op {}", m.op));
        }
        let r = self.settle_target(peer, &m.name, m.op).await;
        match r {
            Ok(()) => {
                info!(%peer, name = %m.name, op = m.op, "migration target {}", if m.op == data::MIGRATION_COMMIT { "committed" } else { "aborted" });
                ObjectDone {
                    object: m.object,
                    code: 0,
                    reason: String::new(),
                    data: Vec::new(),
                }
            }
            Err(reason) => {
                warn!(%peer, name = %m.name, "migration op failed: {reason}");
                refuse(reason)
            }
        }
    }

    /// Commits (publishes) or aborts (deletes) the migration target of `name`: `MIGRATION`,
    /// or a final round that commits (v6) once it is applied. Counted per peer.
    async fn settle_target(&self, peer: &NodeId, name: &str, op: u32) -> Result<(), String> {
        let r = self.settle(peer, name, op).await;
        // A source also asks to abort before it starts, to clear what an earlier attempt may
        // have left: an abort counts only when it ended something. A commit that fails is
        // followed by the source's abort, which counts it.
        if let Ok(true) = r {
            let result = if op == data::MIGRATION_COMMIT {
                "committed"
            } else {
                "aborted"
            };
            self.migration_ended(peer, "memory", result);
        }
        r.map(|_| ())
    }

    /// [`Self::settle_target`], uncounted: whether a migration ended (a target published, or
    /// a target or a round on its way given up).
    async fn settle(&self, peer: &NodeId, name: &str, op: u32) -> Result<bool, String> {
        let dir = self.dir_for(peer);
        let path = dir.join(name);
        let mut round_on_its_way = false;
        {
            // Rounds begin only while `path` is not claimed: checked together.
            let mut active = lock(&self.active);
            if active.contains(&path) {
                return Err(format!("a transfer into {:?} is in progress", name));
            }
            // The migration ends here either way.
            lock(&self.round_activity).remove(&path);
            if self.turns.busy(&path) {
                if op != data::MIGRATION_ABORT {
                    return Err(format!("a round of {:?} is still being received", name));
                }
                // A rollback while a round is on its way (the source gave up on it): that
                // round writes nothing more, and the rounds of a new attempt do not wait
                // behind it.
                self.turns.abandon(&path);
                round_on_its_way = true;
            }
            active.insert(path.clone());
        }
        let target = migration_target(&path);
        let name = name.to_owned();
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            // The migration ends either way: what its rounds left is not resumed any more.
            remove_round_files(&dir, &name);
            match op {
                data::MIGRATION_COMMIT => {
                    // The commit is on the guest's pause path: a rename, no fsync. A VM's
                    // memory does not outlive a host crash anyway; forcing a gigabyte of
                    // page cache to disk here would cost the guest seconds of downtime.
                    if !target.exists() {
                        return Err(format!("no migration target for {name:?}"));
                    }
                    fs::rename(&target, &p)
                        .map(|()| true)
                        .map_err(|e| format!("cannot publish {name:?}: {e}"))
                }
                data::MIGRATION_ABORT => match remove_after_marker(&p, &target) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(round_on_its_way),
                    Err(e) => Err(format!("cannot remove the migration target {name:?}: {e}")),
                },
                other => Err(format!("unknown migration op {other}")),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        lock(&self.active).remove(&path);
        r
    }

    /// Removes the memory-image migration targets that nothing has written for
    /// `older_than`, with their rounds' files: their sources went without rolling back. Each
    /// counts as an aborted migration of its peer. A target with a transfer or a round in
    /// progress stays, as does one written while it was looked at. Returns how many went.
    pub async fn drop_stale_targets(&self, older_than: Duration) -> usize {
        // What is older than that says nothing any more.
        lock(&self.round_activity).retain(|_, t| t.elapsed() < older_than);
        let (root, per_peer) = (self.dir.clone(), self.per_peer);
        let found = tokio::task::spawn_blocking(move || stale_targets(&root, per_peer, older_than))
            .await
            .unwrap_or_default();
        let mut dropped = 0;
        for (peer, dir, name) in found {
            let path = dir.join(&name);
            {
                let mut active = lock(&self.active);
                let recent = lock(&self.round_activity)
                    .get(&path)
                    .is_some_and(|t| t.elapsed() < older_than);
                if recent || active.contains(&path) || self.turns.busy(&path) {
                    continue;
                }
                active.insert(path.clone());
            }
            let target = migration_target(&path);
            let (d, n) = (dir.clone(), name.clone());
            let removed = tokio::task::spawn_blocking(move || {
                if !idle_target(&d, &n, &target, older_than) {
                    return None;
                }
                let size = fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
                remove_round_files(&d, &n);
                // Kept on disk, so that an agent restarted meanwhile refuses them too.
                let _ = File::create(swept_marker(&d.join(&n)));
                fs::remove_file(&target).ok().map(|()| size)
            })
            .await
            .unwrap_or(None);
            if removed.is_some() {
                lock(&self.round_activity).remove(&path);
            }
            lock(&self.active).remove(&path);
            if let Some(size) = removed {
                warn!(
                    peer = peer.as_ref().map_or("", NodeId::as_str),
                    name,
                    size,
                    idle_secs = older_than.as_secs(),
                    "removed an abandoned migration target: its source went without a rollback"
                );
                if let Some(p) = &peer {
                    self.migration_ended(p, "memory", "aborted");
                }
                dropped += 1;
            }
        }
        dropped
    }

    /// A round of the target published at `path` began or ended now.
    fn touch_round(&self, path: &Path) {
        lock(&self.round_activity).insert(path.to_path_buf(), Instant::now());
    }

    fn dir_for(&self, peer: &NodeId) -> PathBuf {
        if self.per_peer {
            self.dir.join(peer.as_str())
        } else {
            self.dir.clone()
        }
    }

    /// Whether an open object holds `claim` for the content `tag` and `size` name.
    fn held_as(&self, claim: &Path, tag: &str, size: u64) -> bool {
        let sessions: Vec<_> = lock(&self.sessions).values().cloned().collect();
        sessions.iter().any(|s| {
            lock(s)
                .objects
                .values()
                .any(|o| o.claim == claim && o.tag == tag && o.size == size)
        })
    }

    /// Opens (or resumes) the part file for an object; returns the bytes already held.
    fn begin(
        &self,
        peer: &NodeId,
        session: &Mutex<RxSession>,
        b: &ObjectBegin,
    ) -> Result<u64, Refusal> {
        check_name(&b.name)?;
        let delta = match b.encoding {
            data::ENCODING_RAW => None,
            _ if !self.delta => {
                return Err(Refusal::from(
                    "delta-encoded objects are turned off on this receiver".to_string(),
                ));
            }
            data::ENCODING_HDE_PAGES_INPLACE => {
                if b.raw_size > MAX_RAW_SIZE || b.raw_size == 0 {
                    return Err(Refusal::from(format!(
                        "migration round for {:?} needs a target size of 1..={MAX_RAW_SIZE} bytes",
                        b.name
                    )));
                }
                Some(Delta {
                    encoding: b.encoding,
                    raw_size: b.raw_size,
                    raw_blake3: Vec::new(),
                    commit: b.commit,
                })
            }
            data::ENCODING_HDE_PAGES | data::ENCODING_HDE_STREAM => {
                if b.raw_blake3.len() != 32 || b.raw_size > MAX_RAW_SIZE {
                    return Err(Refusal::from(format!(
                        "encoded object {:?} needs a 32-byte content digest and a content size \
                         up to {MAX_RAW_SIZE} bytes",
                        b.name
                    )));
                }
                Some(Delta {
                    encoding: b.encoding,
                    raw_size: b.raw_size,
                    raw_blake3: b.raw_blake3.clone(),
                    commit: false,
                })
            }
            other => return Err(Refusal::from(format!("unknown object encoding {other}"))),
        };
        if b.commit && b.encoding != data::ENCODING_HDE_PAGES_INPLACE {
            return Err(Refusal::from(format!(
                "object {:?} asks for a commit, which only an in-place migration round may",
                b.name
            )));
        }
        {
            let s = lock(session);
            if let Some(o) = s.objects.get(&b.object) {
                // A repeated BEGIN (e.g. on a replacement stream): same answer.
                if o.name == b.name && o.size == b.size {
                    return Ok(o.ranges.contiguous());
                }
                return Err(Refusal::from(format!(
                    "object {} was begun with another name or size",
                    b.object
                )));
            }
            if s.objects.len() >= MAX_OBJECTS {
                return Err(Refusal::from(format!(
                    "more than {MAX_OBJECTS} objects open in one session"
                )));
            }
        }
        let dir = self.dir_for(peer);
        let path = dir.join(&b.name);
        // A migration round need not survive a crash (see `maybe_finish`): no syncs.
        let round = delta
            .as_ref()
            .is_some_and(|d| d.encoding == data::ENCODING_HDE_PAGES_INPLACE);
        if b.commit && !migration_target(&path).exists() {
            // Refused before anything is written (`open_target` checks again, should the
            // target go meanwhile).
            return Err(Refusal::from(NO_TARGET_TO_COMMIT.to_string()));
        }
        let (part, state) = part_files(&dir, &b.name, round.then_some(&b.version_tag));
        // One transfer per destination file at a time, whatever session it comes from: two
        // would share the part file. Rounds of a migration target have part files of their
        // own, and may overlap: they are applied in turn.
        let claim = if round { part.clone() } else { path.clone() };
        // A round's place among its target's rounds, in the order of their begins; taken
        // under the same lock as the claim, so that a commit or abort of the target (which
        // claims `path`) sees it.
        let turn = {
            let mut active = lock(&self.active);
            if round && swept_marker(&path).exists() {
                return Err(Refusal::from(format!(
                    "the migration target of {:?} was removed after nothing had written it \
                     for migration.stale_target_secs: start the migration again",
                    b.name
                )));
            }
            // A round's target being committed or aborted.
            let settling = round && active.contains(&path);
            if settling || !active.insert(claim.clone()) {
                let reason = format!(
                    "another transfer of {:?} into {} is in progress",
                    b.name,
                    dir.display()
                );
                drop(active);
                // The same content (name, size and tag; for a round, the same part of the
                // same round) held by another session: most likely this sender's own earlier
                // one, whose streams died without this side noticing yet. It lets go when
                // their connections end, and the sender tries again meanwhile. Other content
                // is another transfer, and a target being settled is its migration's end:
                // refused.
                let tag = msg::printable(&b.version_tag, 200);
                // (A holder that let go meanwhile: the sender's next try finds the way free.)
                let busy = !settling
                    && (self.held_as(&claim, &tag, b.size) || !lock(&self.active).contains(&claim));
                return Err(if busy {
                    Refusal {
                        code: ErrorCode::BUSY,
                        reason,
                    }
                } else {
                    Refusal::from(reason)
                });
            }
            if round {
                self.touch_round(&path);
            }
            // Raised when the object goes, or when the target is aborted.
            round.then(|| {
                let abandoned = Arc::new(AtomicBool::new(false));
                (self.turns.take(&path, abandoned.clone()), abandoned)
            })
        };
        let (turn, abandoned) = turn.unzip();
        // The same object published already (its verdict lost with its session, or sent once
        // more): held whole, once its content is checked (no part file).
        let tag = msg::printable(&b.version_tag, 200);
        let stored = (!round).then(|| stored_copy(&path, &tag, b.size)).flatten();
        let (opened, stored) = match stored {
            Some((file, len)) => (Ok((file, tag, b.size)), Some(len)),
            None => (
                self.open_part(&dir, b, &part, &state, decode_need(b, round)),
                None,
            ),
        };
        let (file, tag, have) = match opened {
            Ok(x) => x,
            Err(e) => {
                lock(&self.active).remove(&claim);
                return Err(Refusal::from(e));
            }
        };
        if stored.is_some() {
            info!(name = %b.name, size = b.size, "object already stored here; checking it");
        } else if have > 0 {
            info!(name = %b.name, have, size = b.size, "resuming object");
        }
        let file = Arc::new(file);
        // A round received from its start is applied while it arrives (see `RoundApply`).
        let (follower, turn): (Option<Box<dyn Follower>>, _) = match (&delta, &abandoned, turn) {
            (Some(d), Some(flag), Some(turn)) if have == 0 => {
                match RoundApply::open(d, &path, self.cache.clone(), flag.clone(), turn) {
                    Ok(a) => (Some(Box::new(a)), None),
                    Err((_, e)) => {
                        lock(&self.active).remove(&claim);
                        return Err(Refusal::from(e));
                    }
                }
            }
            (_, _, turn) => (None, turn),
        };
        let sync = (!round && stored.is_none()).then_some(SYNC_STEP);
        // A stored copy is hashed whole, at once.
        let digester = match Digester::start(file.clone(), stored.unwrap_or(have), sync, follower) {
            Ok(d) => d,
            Err(e) => {
                lock(&self.active).remove(&claim);
                return Err(Refusal::from(format!(
                    "cannot start hashing {:?}: {e}",
                    b.name
                )));
            }
        };
        let o = RxObject {
            name: b.name.clone(),
            size: b.size,
            file,
            path,
            claim,
            part,
            state,
            tag,
            ranges: Ranges::with_prefix(have),
            acked: have,
            saved: have,
            reported: have,
            resumed_from: have,
            digest: None,
            finishing: false,
            delta,
            digester: Some(digester),
            abandoned,
            turn,
            // Per-chunk acknowledgements only for what is small enough to need them.
            urgent: b.urgent && b.size <= URGENT_MAX_SIZE,
            stored,
        };
        if stored.is_none() {
            save_state(&o.state, &o.tag, o.size, o.acked);
        }
        {
            let mut s = lock(session);
            // The same object id begun twice at once on two connections (checked under the
            // lock above, inserted here): the first stays; the second's claim is given back,
            // or it would hold its name for the process's life.
            if s.objects.contains_key(&b.object) {
                drop(s);
                lock(&self.active).remove(&o.claim);
                return Err(Refusal::from(format!(
                    "object {} begun twice at once",
                    b.object
                )));
            }
            s.objects.insert(b.object, o);
            s.begun.notify_waiters();
        }
        Ok(have)
    }

    /// The file work of [`Self::begin`], done without the session lock.
    #[allow(clippy::type_complexity)]
    fn open_part(
        &self,
        dir: &Path,
        b: &ObjectBegin,
        part: &Path,
        state: &Path,
        decoded: u64,
    ) -> Result<(File, String, u64), String> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            // A new directory (a sending node's first file) is in its parent only once that
            // is synced: without, a file reported stored could vanish with it.
            if let Some(parent) = dir.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
            }
        }
        // One line in the state file: control characters cannot split it.
        let tag = msg::printable(&b.version_tag, 200);
        // The state file is written after the data it counts, so after a process restart it
        // never claims more than the part file holds; after a power loss it might, and the
        // digest check catches that (the sender then starts over).
        let have = read_state(state)
            .filter(|(t, size, _)| *t == tag && *size == b.size)
            .map_or(0, |(_, _, have)| have.min(b.size));
        // Refuse now what cannot fit, before creating anything.
        if let Ok(st) = rustix::fs::statvfs(dir) {
            // A part file of another version, emptied when this one begins, frees its room.
            let reclaimed = if have == 0 {
                fs::metadata(part).map_or(0, |m| {
                    std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512)
                })
            } else {
                0
            };
            let free = st
                .f_bavail
                .saturating_mul(st.f_frsize)
                .saturating_add(reclaimed);
            // An encoded object also needs room for what it decodes to.
            let need = (b.size - have).saturating_add(decoded);
            if need > free {
                return Err(format!(
                    "not enough space in {}: {need} bytes needed, {free} available",
                    dir.display()
                ));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(have == 0)
            .open(part)
            .map_err(|e| format!("cannot open {}: {e}", part.display()))?;
        file.set_len(b.size)
            .map_err(|e| format!("cannot size {}: {e}", part.display()))?;
        Ok((file, tag, have))
    }

    fn fail_object(
        &self,
        peer: &NodeId,
        session: &Mutex<RxSession>,
        object: u64,
        code: ErrorCode,
        reason: &str,
    ) -> bool {
        let removed = {
            let mut s = lock(session);
            // Whole and being verified (a late duplicate chunk failed to write): the finish,
            // which reads back what is there, decides. Removed now, its claim would be free
            // while its part file is hashed and renamed.
            if s.objects.get(&object).is_some_and(|o| o.finishing) {
                return false;
            }
            s.finish(object);
            s.objects.remove(&object)
        };
        let name = removed.map_or_else(String::new, |o| {
            lock(&self.active).remove(&o.claim);
            if o.claim != o.path {
                self.touch_round(&o.path);
            }
            o.name.clone()
        });
        warn!(%peer, %name, "object failed: {reason}");
        self.object_event(RecvEvent::Failed {
            peer: peer.clone(),
            name,
            code,
            reason: reason.to_string(),
        });
        true
    }

    /// Verifies and stores the object once every byte and the digest are here.
    async fn maybe_finish<W: AsyncWrite + Unpin>(
        &self,
        peer: &NodeId,
        session: &Mutex<RxSession>,
        object: u64,
        writer: &mut FrameWriter<W>,
        me: u64,
    ) -> Result<(), ConnError> {
        let job = {
            let mut s = lock(session);
            let Some(o) = s.objects.get_mut(&object) else {
                return Ok(());
            };
            if o.finishing || o.ranges.contiguous() < o.size {
                return Ok(());
            }
            let Some(digest) = o.digest.clone() else {
                return Ok(());
            };
            o.finishing = true;
            (
                o.digester.take(),
                o.file.clone(),
                o.part.clone(),
                o.state.clone(),
                o.path.clone(),
                o.claim.clone(),
                o.turn.take(),
                o.abandoned.clone(),
                digest,
                o.name.clone(),
                o.size,
                o.resumed_from,
                o.delta.clone(),
                o.urgent,
                o.stored,
                o.tag.clone(),
            )
        };
        let (
            digester,
            file,
            part,
            state,
            path,
            claim,
            turn,
            abandoned,
            digest,
            name,
            size,
            resumed_from,
            delta,
            urgent,
            stored,
            tag,
        ) = job;
        // Most of the file is hashed (and a round applied) by now; this waits for the rest.
        let (hashed, follower) = match digester {
            Some(d) => match d.finish(stored.unwrap_or(size)).await {
                Ok((h, f)) => (Some(Ok(h)), f),
                Err(e) => (Some(Err(e)), None),
            },
            None => (None, None),
        };
        let encoded_size = delta.as_ref().map(|_| size);
        let size = delta.as_ref().map_or(size, |d| d.raw_size);
        let cache = self.cache.clone();
        let final_path = path.clone();
        let published_at = path.clone();
        let started = Instant::now();
        // A migration round need not survive a crash (the migration rolls back), and the
        // commit, a rename on the guest's pause path, does not sync the target either: a VM's
        // memory does not outlive its host's crash (see `settle`). No fsync on its path.
        let round = delta
            .as_ref()
            .is_some_and(|d| d.encoding == data::ENCODING_HDE_PAGES_INPLACE);
        let commit = delta.as_ref().is_some_and(|d| d.commit);
        let wire_size = encoded_size.unwrap_or(size);
        let verdict = tokio::task::spawn_blocking(move || -> Result<(), (ErrorCode, String)> {
            if stored.is_some() {
                // The copy already published: its content against the sender's digest of
                // the content (for an encoded object, the one its begin carried).
                let want = delta.as_ref().map_or(&digest[..], |d| &d.raw_blake3[..]);
                let got = match hashed.unwrap_or_else(|| hash_file(&final_path)) {
                    Ok(h) if h.as_bytes()[..] == want[..] => {
                        // A part file of the same version left from before (a transfer begun
                        // before the copy was published): not needed any more.
                        if read_state(&state).is_some_and(|(t, n, _)| t == tag && n == wire_size) {
                            let _ = fs::remove_file(&part);
                            let _ = fs::remove_file(&state);
                        }
                        // Published by a run that may have ended before its directory was
                        // synced: durable before it is answered as stored.
                        if let Some(dir) = final_path.parent().filter(|_| !round) {
                            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
                                (
                                    ErrorCode::STORAGE_ERROR,
                                    format!("cannot sync {}: {e}", dir.display()),
                                )
                            })?;
                        }
                        return Ok(());
                    }
                    Ok(h) => h.to_hex().to_string(),
                    Err(e) => format!("unreadable ({e})"),
                };
                // Not what it was sent as (changed in place, its times kept), or unreadable:
                // the sender starts again from nothing, which this copy must not answer a
                // second time.
                unmark_stored(&file, &final_path);
                return Err((
                    ErrorCode::CHECKSUM_MISMATCH,
                    format!(
                        "the copy already stored at {} has BLAKE3 {got}, the sender's {}: \
                         sending it again",
                        final_path.display(),
                        hex(want)
                    ),
                ));
            }
            // A failed sync (here, or one the digester made on the way) may leave what was
            // written clean in the page cache and never on disk: still readable, and its
            // digest matching. A resume must not take it as held: it starts from nothing.
            if !round && let Err(e) = file.sync_data() {
                let _ = fs::remove_file(&state);
                return Err((
                    ErrorCode::STORAGE_ERROR,
                    format!("cannot sync: {e} (a resume sends it whole)"),
                ));
            }
            let got = hashed.unwrap_or_else(|| hash_file(&part)).map_err(|e| {
                let _ = fs::remove_file(&state);
                (
                    ErrorCode::STORAGE_ERROR,
                    format!("cannot sync or read back: {e} (a resume sends it whole)"),
                )
            })?;
            if got.as_bytes()[..] != digest[..] {
                let _ = fs::remove_file(&part);
                let _ = fs::remove_file(&state);
                if follower.is_some() {
                    // What arrived was applied to the migration target as it came: the
                    // target can no longer be trusted, and sending the round again would not
                    // mend pages the bad bytes wrote. The migration has to start over.
                    return Err((
                        ErrorCode::STORAGE_ERROR,
                        format!(
                            "BLAKE3 digest mismatch after the round was applied to the \
                             migration target: received {}, sender has {}",
                            got.to_hex(),
                            hex(&digest)
                        ),
                    ));
                }
                return Err((
                    ErrorCode::CHECKSUM_MISMATCH,
                    format!(
                        "BLAKE3 digest mismatch: received {}, sender has {}",
                        got.to_hex(),
                        hex(&digest)
                    ),
                ));
            }
            if let Some(d) = &delta {
                let r = if d.encoding == data::ENCODING_HDE_PAGES_INPLACE {
                    match follower {
                        Some(applied) => applied.finish(),
                        None => {
                            // After the rounds of this target begun before this one.
                            if let Some(t) = &turn {
                                t.wait(TURN_LIMIT)
                                    .map_err(|e| (ErrorCode::STORAGE_ERROR, e))?;
                            }
                            apply_round(&part, &final_path, d, cache.as_deref(), abandoned)
                        }
                    }
                } else {
                    decode_into(&part, &final_path, d, cache.as_deref()).inspect(|()| {
                        if let Ok(f) = File::open(&final_path) {
                            mark_stored(&f, &tag, wire_size);
                        }
                    })
                };
                let _ = fs::remove_file(&part);
                let _ = fs::remove_file(&state);
                r?;
            } else {
                // Before the rename, so that the mark is there whenever the file is.
                mark_stored(&file, &tag, wire_size);
                fs::rename(&part, &final_path).map_err(|e| {
                    (
                        ErrorCode::STORAGE_ERROR,
                        format!("cannot rename into {}: {e}", final_path.display()),
                    )
                })?;
            }
            let _ = fs::remove_file(&state);
            // The rename is durable only once the directory is (a round renames nothing).
            if let Some(dir) = final_path.parent().filter(|_| !round) {
                File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
                    (
                        ErrorCode::STORAGE_ERROR,
                        format!("cannot sync {}: {e}", dir.display()),
                    )
                })?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err((ErrorCode::INTERNAL_ERROR, e.to_string())));
        {
            let mut s = lock(session);
            s.objects.remove(&object);
            s.finish(object);
        }
        if round {
            self.touch_round(&published_at);
        }
        lock(&self.active).remove(&claim);
        // A final round that commits its target (v6): the answer says it is published. The
        // round's own turn is over by now; a round begun after it makes the commit refused.
        // The commit's time, for the source's measure of the pause (its own clock sees the
        // answer half a round trip later).
        let mut answer = String::new();
        let verdict = match verdict {
            Ok(()) if commit => match self
                .settle_target(peer, &name, data::MIGRATION_COMMIT)
                .await
            {
                Ok(()) => {
                    info!(%peer, %name, "migration target committed with its final round");
                    if let Ok(t) =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
                    {
                        answer = format!("{{\"committed_unix_us\":{}}}", t.as_micros());
                    }
                    Ok(())
                }
                Err(e) => Err((
                    ErrorCode::STORAGE_ERROR,
                    format!("the round was applied, but its target was not committed: {e}"),
                )),
            },
            v => v,
        };
        let done = match verdict {
            Ok(()) => {
                info!(%peer, %name, size, verify_ms = started.elapsed().as_millis() as u64, "object stored");
                self.object_event(RecvEvent::Stored {
                    peer: peer.clone(),
                    name,
                    path,
                    size,
                    resumed_from,
                    encoded_size,
                });
                ObjectDone {
                    object,
                    code: 0,
                    reason: answer,
                    data: Vec::new(),
                }
            }
            Err((code, reason)) => {
                warn!(%peer, %name, "object failed: {reason}");
                self.object_event(RecvEvent::Failed {
                    peer: peer.clone(),
                    name,
                    code,
                    reason: reason.clone(),
                });
                ObjectDone {
                    object,
                    code: code.0,
                    reason,
                    data: Vec::new(),
                }
            }
        };
        self.send_verdict(session, writer, me, &done, urgent).await
    }

    /// Sends an object's verdict on this connection (`me`), kept for a sender that asks
    /// again; an `urgent` one on every stream of the session at once.
    async fn send_verdict<W: AsyncWrite + Unpin>(
        &self,
        session: &Mutex<RxSession>,
        writer: &mut FrameWriter<W>,
        me: u64,
        done: &ObjectDone,
        urgent: bool,
    ) -> Result<(), ConnError> {
        let frame = msg::encode(FrameType::OBJECT_DONE, done);
        lock(session).keep_verdict(done.object, frame.clone());
        if urgent {
            // The sender waits on the first copy that gets through.
            let _ = lock(session).shout.send((me, frame.clone()));
        }
        let r = self.send(writer, &frame).await;
        if r.is_err() && !urgent {
            // This stream died under the verdict (an end the sender sends again meanwhile
            // may have found the object still being verified): the others carry it.
            let _ = lock(session).shout.send((me, frame));
        }
        r
    }

    /// Sends a frame, bounded by the idle timeout: a sender that stops reading must not pin
    /// this task.
    async fn send<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut FrameWriter<W>,
        frame: &Frame,
    ) -> Result<(), ConnError> {
        tokio::time::timeout(self.idle, writer.send(frame))
            .await
            .map_err(|_| ConnError::Timeout {
                stage: crate::Stage::Established,
                after: self.idle,
            })?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; the data (object tables) stays
    // consistent enough to keep serving other sessions, so recover the guard.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Summary hashes of the pages of `path`, little-endian, if it holds exactly `size` bytes;
/// and what the copy is (`BASE_COPY_*`).
fn page_hashes(path: &Path, size: u64, page_size: usize) -> (Vec<u8>, u32) {
    use std::os::unix::fs::OpenOptionsExt;
    // 2^28 pages (1 TiB of 4 KiB pages) is 2 GiB of hashes: the most worth sending.
    const MAX_PAGES: u64 = 1 << 28;
    let unreadable = (Vec::new(), data::BASE_COPY_UNREADABLE);
    // Whether anything is there first (no descriptor needed).
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (Vec::new(), data::BASE_COPY_NONE);
        }
        Err(_) => return (Vec::new(), data::BASE_COPY_UNKNOWN),
    }
    // Without blocking on a FIFO put at the name. Something is there: failing to open it
    // (out of descriptors, a dangling link) says nothing of what it holds, unless it went
    // meanwhile (renamed by a commit).
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && fs::symlink_metadata(path).is_err() =>
        {
            return (Vec::new(), data::BASE_COPY_NONE);
        }
        Err(_) => return unreadable,
    };
    let Ok(meta) = f.metadata() else {
        return unreadable;
    };
    if !meta.is_file() {
        return unreadable;
    }
    if meta.len() != size {
        return (Vec::new(), data::BASE_COPY_NONE);
    }
    if size / page_size as u64 > MAX_PAGES {
        return unreadable;
    }
    let mut out = Vec::with_capacity((size / page_size as u64 * 8) as usize);
    let mut buf = vec![0u8; page_size * 256];
    let mut left = size;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        if f.read_exact(&mut buf[..n]).is_err() {
            return unreadable;
        }
        for p in buf[..n].chunks_exact(page_size) {
            out.extend_from_slice(&dwcp_encoding::fast64(p).to_le_bytes());
        }
        left -= n as u64;
    }
    (out, data::BASE_COPY_HASHED)
}

/// The part and state files of object `name` in `dir`; a migration round's (`round_tag`, its
/// version tag) are its own, so that rounds of one target can arrive at once.
fn part_files(dir: &Path, name: &str, round_tag: Option<&String>) -> (PathBuf, PathBuf) {
    match round_tag {
        None => (
            dir.join(format!(".{name}.dwcp-part")),
            dir.join(format!(".{name}.dwcp-state")),
        ),
        Some(tag) => {
            let h = blake3::hash(tag.as_bytes()).to_hex();
            let h = &h[..ROUND_TAG_HEX];
            (
                dir.join(format!(".{name}.{h}.dwcp-round")),
                dir.join(format!(".{name}.{h}.dwcp-round-state")),
            )
        }
    }
}

/// Hex digits of a round's tag hash in its file names.
const ROUND_TAG_HEX: usize = 16;

/// Whether the migration target `target` of object `name` in `dir` exists and neither it
/// nor any of its rounds' files (a round resumed from its part file writes the target only
/// at its end) was written in the last `age`.
fn idle_target(dir: &Path, name: &str, target: &Path, age: Duration) -> bool {
    let older = |p: &Path| older(p, age);
    if !older(target) {
        return false;
    }
    fs::read_dir(dir).into_iter().flatten().flatten().all(|e| {
        let file = e.file_name();
        let round = file.to_str().is_some_and(|f| is_round_file(f, name));
        !round || older(&e.path())
    })
}

/// Whether `path` exists and was last written `age` ago or more.
fn older(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|e| e >= age)
}

/// Marks, beside it, a migration target removed as abandoned: rounds for it are refused
/// until the migration is aborted (a new attempt's first step). Markers go after a week.
fn swept_marker(path: &Path) -> PathBuf {
    hidden_beside(path, "dwcp-swept")
}

/// An abort's removal of `target`, the target of `path`: its [`swept_marker`] goes first, so
/// that a new attempt may begin.
fn remove_after_marker(path: &Path, target: &Path) -> std::io::Result<()> {
    let _ = fs::remove_file(swept_marker(path));
    fs::remove_file(target)
}

/// How long a [`swept_marker`] stays.
const SWEPT_MARKER_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Whether `file` is a part or state file of a round of object `name`.
fn is_round_file(file: &str, name: &str) -> bool {
    let Some(rest) = file
        .strip_prefix('.')
        .and_then(|f| f.strip_prefix(name))
        .and_then(|f| f.strip_prefix('.'))
    else {
        return false;
    };
    let Some(h) = rest
        .strip_suffix(".dwcp-round")
        .or_else(|| rest.strip_suffix(".dwcp-round-state"))
    else {
        return false;
    };
    // Exactly a tag hash: not the files of an object whose name only starts like this one.
    h.len() == ROUND_TAG_HEX && h.bytes().all(|c| c.is_ascii_hexdigit())
}

/// Migration targets under `root` (in each peer's directory when `per_peer`) last written
/// `age` ago or more: (peer, directory, object name).
fn stale_targets(
    root: &Path,
    per_peer: bool,
    age: Duration,
) -> Vec<(Option<NodeId>, PathBuf, String)> {
    let dirs: Vec<(Option<NodeId>, PathBuf)> = if per_peer {
        fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let peer = NodeId::new(e.file_name().to_str()?).ok()?;
                Some((Some(peer), e.path()))
            })
            .collect()
    } else {
        vec![(None, root.to_path_buf())]
    };
    let mut out = Vec::new();
    for (peer, dir) in dirs {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let file = e.file_name();
            if file.to_str().is_some_and(|f| f.ends_with(".dwcp-swept"))
                && older(&e.path(), SWEPT_MARKER_AGE)
            {
                let _ = fs::remove_file(e.path());
                continue;
            }
            let Some(name) = file
                .to_str()
                .and_then(|f| f.strip_prefix('.'))
                .and_then(|f| f.strip_suffix(".dwcp-migrating"))
            else {
                continue;
            };
            if check_name(name).is_ok() && idle_target(&dir, name, &e.path(), age) {
                out.push((peer.clone(), dir.clone(), name.to_owned()));
            }
        }
    }
    out
}

/// Removes what rounds of `name`'s migrations left in `dir` (a round that failed keeps its
/// part file for a resuming sender until its migration is committed or aborted).
fn remove_round_files(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        if file.to_str().is_some_and(|f| is_round_file(f, name)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Why a round that commits is refused when its target is gone.
const NO_TARGET_TO_COMMIT: &str = "no migration target to commit this round into: the migration was committed or aborted \
     already";

/// Where the migration target of `path` lives until it is committed.
fn migration_target(path: &Path) -> PathBuf {
    hidden_beside(path, "dwcp-migrating")
}

/// `.NAME.SUFFIX` in the directory of `path` (NAME its file name).
fn hidden_beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}

/// Opens the migration target of `final_path` for round `d`, sized to its `raw_size`; what
/// earlier rounds wrote stays. A round that commits never creates the target: with none
/// there, the migration was committed or aborted already (say, the round is a copy sent again
/// after the answer to its commit was lost), and it must not be applied to an empty one.
fn open_target(final_path: &Path, d: &Delta) -> Result<File, (ErrorCode, String)> {
    let storage =
        |what: &str, e: &dyn std::fmt::Display| (ErrorCode::STORAGE_ERROR, format!("{what}: {e}"));
    let target = migration_target(final_path);
    let raw_size = d.raw_size;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!d.commit)
        .truncate(false)
        .open(&target)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound if d.commit => {
                (ErrorCode::STORAGE_ERROR, NO_TARGET_TO_COMMIT.into())
            }
            _ => storage("cannot open the migration target", &e),
        })?;
    if out.metadata().map(|m| m.len()).ok() != Some(raw_size) {
        out.set_len(raw_size)
            .map_err(|e| storage("cannot size the migration target", &e))?;
    }
    Ok(out)
}

/// Bytes of disk what an object decodes to may take beyond its part file, at most: its
/// content's size, or for an in-place migration round what the sender says it writes
/// (rounds rewrite pages of a target that holds the rest, and its zero pages are holes), never
/// more than the content's size.
fn decode_need(b: &ObjectBegin, round: bool) -> u64 {
    if b.encoding == data::ENCODING_RAW {
        return 0;
    }
    match b.writes {
        Some(w) if round => w.min(b.raw_size),
        _ => b.raw_size,
    }
}

/// Applies a verified migration round in `part` to the migration target of `final_path`, in
/// place: pages not in the round keep what earlier rounds wrote. (A round received from its
/// first byte in one go was applied while it arrived, by a [`RoundApply`].)
fn apply_round(
    part: &Path,
    final_path: &Path,
    d: &Delta,
    cache: Option<&Mutex<BaselineCache>>,
    abandoned: Option<Arc<AtomicBool>>,
) -> Result<(), (ErrorCode, String)> {
    let out = open_target(final_path, d)?;
    check_not_abandoned(abandoned.as_deref())?;
    let mut src = EachCall(cache);
    // Not synced here: the commit publishes the target at the end.
    decode_pages(part, out, d.raw_size, &mut src, abandoned).map(drop)
}

/// The receiver's cache, locked for one lookup or one insert at a time: a whole object's
/// decode (a disk image of hundreds of GB) must not hold every other session's decodes,
/// migration blocks and cache summaries behind it.
struct EachCall<'a>(Option<&'a Mutex<BaselineCache>>);

impl ContentSource for EachCall<'_> {
    fn fetch(&mut self, key: &dwcp_encoding::Key, buf: &mut Vec<u8>) -> bool {
        self.0.is_some_and(|c| lock(c).fetch(key, buf))
    }

    fn learn(&mut self, data: &[u8]) {
        if let Some(c) = self.0 {
            lock(c).learn(data);
        }
    }

    fn learn_keyed(&mut self, key: &dwcp_encoding::Key, data: &[u8]) {
        if let Some(c) = self.0 {
            lock(c).learn_keyed(key, data);
        }
    }
}

/// After opening a migration target: an abort raises the flags of its rounds before it
/// deletes the target, so a round whose flag is still down after opening has the target the
/// abort deletes (and writes nothing once the flag is up). One whose flag is up may have
/// created a new, empty target: it writes nothing there (the next migration's abort
/// removes it).
fn check_not_abandoned(abandoned: Option<&AtomicBool>) -> Result<(), (ErrorCode, String)> {
    if abandoned.is_some_and(|a| a.load(Ordering::Acquire)) {
        return Err((ErrorCode::STORAGE_ERROR, "the round was abandoned".into()));
    }
    Ok(())
}

/// Decodes a migration round into its target on the digest thread, as its bytes arrive.
///
/// What it writes is not verified yet when written: the round's digest is checked at the end,
/// and a round that fails it is refused with `STORAGE_ERROR` (not `CHECKSUM_MISMATCH`, which
/// a sender retries): the target is no longer trusted and the migration starts over.
/// Applying part of a round twice (its session broke and it resumed, then was decoded again
/// from the part file) is safe: literal, zero, duplicate and cache pages come out the same,
/// and the pages that depend on what the target held (unchanged runs, XOR deltas) carry a
/// check of that base; a base that no longer matches makes those pages unresolved, and the
/// sender sends the rest of the round again without references. That is the price of a
/// broken session in the middle of a round: the rest of it goes cold.
struct RoundApply {
    sink: PagesSink,
    cache: Option<Arc<Mutex<BaselineCache>>>,
    failed: Option<(ErrorCode, String)>,
    /// Held until the round is applied (or dropped): the next round of the target waits.
    turn: Ticket,
    /// Whether the rounds begun before this one are done.
    turn_came: bool,
}

/// Most a round waits for the rounds of its target begun before it. A round whose object goes
/// (its session ended, or it failed) lets the next one go at once; this bounds the rest.
const TURN_LIMIT: Duration = Duration::from_secs(3600);

impl RoundApply {
    fn open(
        d: &Delta,
        final_path: &Path,
        cache: Option<Arc<Mutex<BaselineCache>>>,
        abandoned: Arc<AtomicBool>,
        turn: Ticket,
    ) -> Result<Self, (ErrorCode, String)> {
        let out = open_target(final_path, d)?;
        check_not_abandoned(Some(&abandoned))?;
        Ok(Self {
            sink: PagesSink::new(out, d.raw_size, Some(abandoned)),
            cache,
            failed: None,
            turn,
            turn_came: false,
        })
    }

    /// Waits (on the digest thread) for the rounds begun before this one, once.
    fn wait_turn(&mut self) {
        if self.turn_came || self.failed.is_some() {
            return;
        }
        match self.turn.wait(TURN_LIMIT) {
            Ok(()) => self.turn_came = true,
            Err(e) => self.failed = Some((ErrorCode::STORAGE_ERROR, e)),
        }
    }
}

impl Follower for RoundApply {
    fn feed(&mut self, bytes: &[u8]) {
        self.wait_turn();
        if self.failed.is_some() {
            return;
        }
        // Other sessions' objects use the cache too.
        let mut src = EachCall(self.cache.as_deref());
        if let Err(e) = self.sink.feed(bytes, &mut src) {
            self.failed = Some(e);
        }
    }

    fn finish(mut self: Box<Self>) -> Result<(), (ErrorCode, String)> {
        self.wait_turn();
        // The ticket goes with `self`, after the sink's last writes.
        match self.failed.take() {
            Some(e) => Err(e),
            None => self.sink.finish().map(drop),
        }
    }
}

/// A page store that refuses writes once its object is gone (its session ended, or it
/// failed): the digest thread notices only after its current step, and a resumed copy of the
/// round, or a later one, may be writing the same pages by then.
struct Guarded {
    store: dwcp_encoding::FileStore,
    abandoned: Option<Arc<AtomicBool>>,
}

impl PageStore for Guarded {
    fn page_count(&self) -> u64 {
        self.store.page_count()
    }

    fn read_page(&mut self, addr: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        self.store.read_page(addr, buf)
    }

    fn write_pages(&mut self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.store.write_pages(addr, data)
    }

    fn write_zero(&mut self, addr: u64, count: u64, page_size: usize) -> std::io::Result<()> {
        self.check()?;
        // The file store's own: holes, not written zeros.
        self.store.write_zero(addr, count, page_size)
    }
}

impl Guarded {
    fn check(&self) -> std::io::Result<()> {
        if self
            .abandoned
            .as_ref()
            .is_some_and(|a| a.load(Ordering::Acquire))
        {
            return Err(std::io::Error::other("the round was abandoned"));
        }
        Ok(())
    }
}

/// Decodes an HDE page object, fed in order, into a file of `raw_size` bytes that holds the
/// base its references assume.
struct PagesSink {
    /// Until the header says the page size.
    out: Option<File>,
    store: Option<Guarded>,
    head: Vec<u8>,
    raw_size: u64,
    dec: dwcp_encoding::PageDecoder,
    abandoned: Option<Arc<AtomicBool>>,
}

/// Bytes of an HDE page object's header; the last one is the page size's shift.
const PAGES_HEADER: usize = 6;

impl PagesSink {
    /// Writes stop once `abandoned` is raised.
    fn new(out: File, raw_size: u64, abandoned: Option<Arc<AtomicBool>>) -> Self {
        Self {
            out: Some(out),
            store: None,
            head: Vec::with_capacity(PAGES_HEADER),
            raw_size,
            dec: dwcp_encoding::PageDecoder::new(),
            abandoned,
        }
    }

    fn feed(
        &mut self,
        mut bytes: &[u8],
        src: &mut dyn ContentSource,
    ) -> Result<(), (ErrorCode, String)> {
        if self.store.is_none() {
            let take = (PAGES_HEADER - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.head.len() < PAGES_HEADER {
                return Ok(());
            }
            let shift = self.head[PAGES_HEADER - 1];
            if !(dwcp_encoding::page::MIN_PAGE_SHIFT..=dwcp_encoding::page::MAX_PAGE_SHIFT)
                .contains(&shift)
                || !self.raw_size.is_multiple_of(1u64 << shift)
            {
                return Err((
                    ErrorCode::PROTOCOL_ERROR,
                    "HDE page object has a bad page size".into(),
                ));
            }
            let Some(out) = self.out.take() else {
                return Err((ErrorCode::INTERNAL_ERROR, "page sink without a file".into()));
            };
            let store = dwcp_encoding::FileStore::new(out, self.raw_size >> shift, 1 << shift)
                .map_err(|e| {
                    (
                        ErrorCode::STORAGE_ERROR,
                        format!("cannot open the destination: {e}"),
                    )
                })?;
            let mut store = Guarded {
                store,
                abandoned: self.abandoned.take(),
            };
            self.dec
                .push(&self.head, &mut store, src)
                .map_err(bad_pages)?;
            self.store = Some(store);
        }
        match self.store.as_mut() {
            Some(store) if !bytes.is_empty() => self.dec.push(bytes, store, src).map_err(bad_pages),
            _ => Ok(()),
        }
    }

    /// The file, once the whole object decoded; pages it could not rebuild fail it with
    /// `DELTA_UNRESOLVED`.
    fn finish(self) -> Result<File, (ErrorCode, String)> {
        let Some(store) = self.store else {
            return Err((
                ErrorCode::PROTOCOL_ERROR,
                "HDE page object shorter than its header".into(),
            ));
        };
        self.dec.finish().map_err(bad_pages)?;
        if !self.dec.missing().is_empty() {
            return Err((
                ErrorCode::DELTA_UNRESOLVED,
                format!(
                    "{} pages referred to content this receiver does not hold",
                    self.dec.missing().len()
                ),
            ));
        }
        Ok(store.store.into_file())
    }
}

fn bad_pages(e: dwcp_encoding::DecodeError) -> (ErrorCode, String) {
    match e {
        dwcp_encoding::DecodeError::Store(e) => (
            ErrorCode::STORAGE_ERROR,
            format!("cannot write the decoded pages: {e}"),
        ),
        e => (
            ErrorCode::PROTOCOL_ERROR,
            format!("undecodable HDE object: {e}"),
        ),
    }
}

/// Decodes the HDE page object in `part` into `out` (a file of `raw_size` bytes, holding the
/// base its references assume); returns the file. Pages it cannot rebuild fail it with
/// `DELTA_UNRESOLVED`.
fn decode_pages(
    part: &Path,
    out: File,
    raw_size: u64,
    src: &mut dyn ContentSource,
    abandoned: Option<Arc<AtomicBool>>,
) -> Result<File, (ErrorCode, String)> {
    let storage =
        |what: &str, e: &dyn std::fmt::Display| (ErrorCode::STORAGE_ERROR, format!("{what}: {e}"));
    let mut input = File::open(part).map_err(|e| storage("cannot read the object", &e))?;
    let mut sink = PagesSink::new(out, raw_size, abandoned);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| storage("cannot read the object", &e))?;
        if n == 0 {
            break;
        }
        sink.feed(&buf[..n], src)?;
    }
    sink.finish()
}

/// Decodes the verified encoded object in `part` into `final_path`: into a scratch copy of
/// the current `final_path` (the base its references assume), verified against the content
/// digest, then renamed over it.
fn decode_into(
    part: &Path,
    final_path: &Path,
    d: &Delta,
    cache: Option<&Mutex<BaselineCache>>,
) -> Result<(), (ErrorCode, String)> {
    let storage =
        |what: &str, e: &dyn std::fmt::Display| (ErrorCode::STORAGE_ERROR, format!("{what}: {e}"));
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = final_path.with_file_name(format!(".{name}.dwcp-decode"));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let base_len = fs::metadata(final_path).map(|m| m.len()).ok();
        if d.encoding == data::ENCODING_HDE_PAGES && base_len == Some(d.raw_size) {
            fs::copy(final_path, &tmp).map_err(|e| storage("cannot copy the base", &e))?;
        }
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(d.encoding != data::ENCODING_HDE_PAGES || base_len != Some(d.raw_size))
            .open(&tmp)
            .map_err(|e| storage("cannot create the decode file", &e))?;
        out.set_len(d.raw_size)
            .map_err(|e| storage("cannot size the decode file", &e))?;
        let mut each = EachCall(cache);
        let src: &mut dyn ContentSource = &mut each;
        let bad = |e: dwcp_encoding::DecodeError| match e {
            dwcp_encoding::DecodeError::Store(e) => storage("cannot write the decoded content", &e),
            e => (
                ErrorCode::PROTOCOL_ERROR,
                format!("undecodable HDE object: {e}"),
            ),
        };
        if d.encoding == data::ENCODING_HDE_PAGES {
            decode_pages(part, out, d.raw_size, src, None)?
                .sync_data()
                .map_err(|e| storage("cannot sync", &e))?;
        } else {
            let mut input = File::open(part).map_err(|e| storage("cannot read the object", &e))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut w = std::io::BufWriter::new(out);
            let mut dec = dwcp_encoding::stream::StreamDecoder::with_limit(d.raw_size);
            loop {
                let n = input
                    .read(&mut buf)
                    .map_err(|e| storage("cannot read the object", &e))?;
                if n == 0 {
                    break;
                }
                if let dwcp_encoding::stream::Progress::Need { key, .. } =
                    dec.push(&buf[..n], &mut w, src).map_err(bad)?
                {
                    return Err((
                        ErrorCode::DELTA_UNRESOLVED,
                        format!("chunk {key} is not held by this receiver"),
                    ));
                }
            }
            dec.finish().map_err(bad)?;
            if dec.bytes_out() != d.raw_size {
                return Err((
                    ErrorCode::PROTOCOL_ERROR,
                    format!(
                        "stream object decodes to {} bytes, not the announced {}",
                        dec.bytes_out(),
                        d.raw_size
                    ),
                ));
            }
            let out = w
                .into_inner()
                .map_err(|e| storage("cannot write", &e.error()))?;
            out.sync_data().map_err(|e| storage("cannot sync", &e))?;
        }
        if let Some(c) = cache
            && let Err(e) = lock(c).flush()
        {
            warn!("baseline cache flush failed: {e}");
        }
        let got = hash_file(&tmp).map_err(|e| storage("cannot read back", &e))?;
        if got.as_bytes()[..] != d.raw_blake3[..] {
            return Err((
                ErrorCode::DELTA_UNRESOLVED,
                "decoded content does not match the sender's digest (this receiver's copy is not \
                 the one the sender assumed)"
                    .into(),
            ));
        }
        fs::rename(&tmp, final_path)
            .map_err(|e| storage(&format!("cannot rename into {}", final_path.display()), &e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Decodes one HDE stream block of a tunnel into its `raw_len` bytes.
fn decode_block(
    block: &[u8],
    raw_len: u64,
    cache: Option<&Mutex<BaselineCache>>,
) -> Result<Bytes, (ErrorCode, String)> {
    let mut src = EachCall(cache);
    let mut out = Vec::with_capacity(raw_len as usize);
    let mut dec = dwcp_encoding::stream::StreamDecoder::with_limit(raw_len);
    let bad = |e: dwcp_encoding::DecodeError| {
        (
            ErrorCode::PROTOCOL_ERROR,
            format!("undecodable HDE block: {e}"),
        )
    };
    if let dwcp_encoding::stream::Progress::Need { key, .. } =
        dec.push(block, &mut out, &mut src).map_err(bad)?
    {
        return Err((
            ErrorCode::DELTA_UNRESOLVED,
            format!("chunk {key} is not held by this receiver"),
        ));
    }
    dec.finish().map_err(bad)?;
    if out.len() as u64 != raw_len {
        return Err((
            ErrorCode::PROTOCOL_ERROR,
            format!(
                "block decodes to {} bytes, not the announced {raw_len}",
                out.len()
            ),
        ));
    }
    Ok(Bytes::from(out))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// The extended attribute that says which sent object a published file is (see
/// [`mark_stored`]).
const STORED_XATTR: &str = "user.dwcp.stored";

/// What a published file was sent as, and the file's identity (`m`, its metadata) when it
/// was published.
fn stored_mark(m: &fs::Metadata, tag: &str, wire_size: u64) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "dwcp-stored 1\n{wire_size}\n{}\n{}.{}\n{}\n{tag}",
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        m.len()
    )
}

/// Marks a published file as the object sent with version `tag` and `wire_size` bytes, so
/// that the same object begun again (its verdict lost with the session, or sent once more) is
/// answered as held whole instead of crossing the network again: see [`stored_copy`]. Best
/// effort: where the file system has no user extended attributes, the object is sent again.
fn mark_stored(file: &File, tag: &str, wire_size: u64) {
    let r = file.metadata().and_then(|m| {
        let v = stored_mark(&m, tag, wire_size);
        rustix::fs::fsetxattr(
            file,
            STORED_XATTR,
            v.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(std::io::Error::from)
    });
    if let Err(e) = r {
        debug!("cannot mark a stored file (it would be sent whole again): {e}");
    }
}

/// The published file at `path`, opened for reading, with its length, if it is the object
/// with version `tag` and `wire_size` bytes and has not changed since (same inode,
/// modification time and length). Its content is still checked against the sender's digest
/// before the object is reported stored.
fn stored_copy(path: &Path, tag: &str, wire_size: u64) -> Option<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    // Only a regular file is opened (a FIFO put there would block the open), and without
    // waiting should one be swapped in between.
    if !fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .ok()?;
    let m = file.metadata().ok()?;
    if !m.is_file() {
        return None;
    }
    let want = stored_mark(&m, tag, wire_size);
    // Room for one byte more than the mark it must equal: a longer one does not fit (ERANGE)
    // and is not it either.
    let mut buf = vec![0u8; want.len() + 1];
    let n = rustix::fs::fgetxattr(&file, STORED_XATTR, &mut buf[..]).ok()?;
    (buf.get(..n)? == want.as_bytes()).then_some((file, m.len()))
}

/// Removes the mark of [`mark_stored`] from the copy open as `file` at `path` (its content
/// did not match what it was sent as, or could not be read).
fn unmark_stored(file: &File, path: &Path) {
    if let Err(e) = rustix::fs::fremovexattr(file, STORED_XATTR) {
        warn!(path = %path.display(), "cannot remove the stored mark: {e}");
    }
}

/// Records the acknowledged prefix so a restarted receiver can resume. Best effort: a state
/// file that claims too much is caught by the final digest check, never silently accepted.
fn save_state(path: &Path, tag: &str, size: u64, acked: u64) {
    let text = format!("dwcp-part 1\n{tag}\n{size}\n{acked}\n");
    if let Err(e) = fs::write(path, text) {
        warn!(path = %path.display(), "cannot record progress: {e}");
    }
}

fn read_state(path: &Path) -> Option<(String, u64, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "dwcp-part 1" {
        return None;
    }
    let tag = lines.next()?.to_string();
    let size = lines.next()?.parse().ok()?;
    let have = lines.next()?.parse().ok()?;
    Some((tag, size, have))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session remembers the latest finished ids only: a peer refused object after
    /// object does not grow it without end.
    #[test]
    fn a_session_remembers_a_bounded_number_of_finished_objects() {
        let mut s = RxSession::default();
        assert!(s.finish(1));
        assert!(!s.finish(1), "once");
        for id in 2..=(MAX_FINISHED as u64 + 10) {
            s.finish(id);
        }
        assert_eq!(s.finished.len(), MAX_FINISHED);
        assert!(!s.finished.contains(&1), "the oldest went");
        assert!(s.finished.contains(&(MAX_FINISHED as u64 + 10)));
        // Still known as finished: a late chunk for it is not data of an unknown object.
        assert!(s.is_finished(1) && s.is_finished(5));
        assert!(!s.finish(5), "finished before");
        assert!(!s.is_finished(MAX_FINISHED as u64 + 11));
    }

    /// A published file is known by its mark while it is unchanged; a FIFO at the name is
    /// not opened (the open would wait for a writer).
    #[test]
    fn a_stored_copy_is_known_by_its_mark_and_a_fifo_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        fs::write(&path, b"content").unwrap();
        mark_stored(&File::open(&path).unwrap(), "tag 1", 7);
        let (_, len) = stored_copy(&path, "tag 1", 7).expect("marked and unchanged");
        assert_eq!(len, 7);
        assert!(stored_copy(&path, "tag 2", 7).is_none(), "another version");
        assert!(stored_copy(&path, "tag 1", 8).is_none(), "another size");
        // Written since (its length changes): not the copy that was marked.
        fs::write(&path, b"content, longer").unwrap();
        assert!(stored_copy(&path, "tag 1", 7).is_none());

        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(stored_copy(&fifo, "tag 1", 7).is_none());
    }

    /// A whole object's decode takes the receiver's cache one lookup or insert at a time:
    /// another session gets it while the decode is half done.
    #[test]
    fn a_decode_lets_other_sessions_at_the_cache_while_it_runs() {
        use dwcp_encoding::stream::{StreamConfig, StreamEncoder};
        let dir = tempfile::tempdir().unwrap();
        let mut raw = vec![0u8; 32 << 20];
        let mut x = 7u64;
        for b in raw.chunks_mut(8) {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let mut enc = StreamEncoder::new(StreamConfig {
            codec: dwcp_encoding::Codec::None,
            ..StreamConfig::default()
        })
        .unwrap();
        let mut encoded = Vec::new();
        enc.push(&raw, None, &mut encoded);
        enc.finish(None, &mut encoded);
        let part = dir.path().join("obj.part");
        fs::write(&part, &encoded).unwrap();
        let d = Delta {
            encoding: data::ENCODING_HDE_STREAM,
            raw_size: raw.len() as u64,
            raw_blake3: blake3::hash(&raw).as_bytes().to_vec(),
            commit: false,
        };
        let cache =
            Mutex::new(BaselineCache::open(dwcp_encoding::CacheConfig::memory(256 << 20)).unwrap());
        let done = AtomicBool::new(false);
        // The cache's entry counts seen while the decode ran.
        let mut seen = Vec::new();
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let r = decode_into(&part, &dir.path().join("obj"), &d, Some(&cache));
                done.store(true, Ordering::SeqCst);
                r
            });
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                let entries = lock(&cache).stats().entries;
                seen.push(entries);
                std::thread::sleep(Duration::from_millis(2));
            }
            h.join().unwrap().unwrap();
        });
        let total = lock(&cache).stats().entries;
        assert!(total > 100, "{total}");
        assert!(
            seen.iter().any(|&e| e > 0 && e < total),
            "the cache was held for the whole decode: {seen:?} of {total}"
        );
        assert_eq!(fs::read(dir.path().join("obj")).unwrap(), raw);
    }

    #[test]
    fn the_space_an_object_needs_is_what_it_decodes_to_or_what_a_round_says_it_writes() {
        let b = |encoding, raw_size, writes| ObjectBegin {
            encoding,
            raw_size,
            writes,
            ..ObjectBegin::default()
        };
        let inplace = data::ENCODING_HDE_PAGES_INPLACE;
        assert_eq!(decode_need(&b(data::ENCODING_RAW, 0, None), false), 0);
        assert_eq!(
            decode_need(&b(data::ENCODING_HDE_PAGES, 1 << 30, Some(5)), false),
            1 << 30
        );
        assert_eq!(decode_need(&b(inplace, 32 << 30, None), true), 32 << 30);
        assert_eq!(decode_need(&b(inplace, 32 << 30, Some(8192)), true), 8192);
        assert_eq!(
            decode_need(&b(inplace, 1 << 20, Some(u64::MAX)), true),
            1 << 20
        );
    }

    #[tokio::test]
    async fn a_target_nothing_wrote_for_long_enough_goes_with_its_rounds_and_counts_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::new(dir.path(), Duration::from_secs(10), true).unwrap();
        let peer_dir = dir.path().join("node-a");
        fs::create_dir_all(&peer_dir).unwrap();
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        let plant = |f: &str, old: bool| {
            let p = peer_dir.join(f);
            let file = File::create(&p).unwrap();
            file.set_len(1 << 20).unwrap();
            if old {
                file.set_modified(two_hours_ago).unwrap();
            }
            p
        };
        let gone = plant(".vm1.dwcp-migrating", true);
        let round = plant(&format!(".vm1.{}.dwcp-round", "0123456789abcdef"), true);
        let fresh = plant(".vm2.dwcp-migrating", false);
        let claimed = plant(".vm3.dwcp-migrating", true);
        let published = plant("vm4", true);
        let odd = plant("..dwcp-migrating", true);
        // A transfer into vm3 is in progress.
        lock(&rx.active).insert(peer_dir.join("vm3"));
        assert_eq!(rx.drop_stale_targets(Duration::from_secs(3600)).await, 1);
        assert!(
            !gone.exists() && !round.exists(),
            "the target and its round went"
        );
        for kept in [&fresh, &claimed, &published, &odd] {
            assert!(kept.exists(), "{} stays", kept.display());
        }
        let stats = rx.peer_stats();
        let aborted = MIGRATION_OUTCOMES
            .iter()
            .position(|o| *o == ("memory", "aborted"))
            .unwrap();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].peer.as_str(), "node-a");
        assert_eq!(stats[0].migrations[aborted], 1);
        // Nothing more to do: nothing counted twice.
        assert_eq!(rx.drop_stale_targets(Duration::from_secs(3600)).await, 0);
        lock(&rx.active).clear();
        assert_eq!(rx.drop_stale_targets(Duration::from_secs(3600)).await, 1);
        assert!(!claimed.exists(), "once its transfer is over");

        // A target whose round resumed from its part file writes only that file until the
        // round's end: the target stays while the round's files are fresh, or while a round
        // of it began or ended lately (this process's clock).
        let resumed = plant(".vm5.dwcp-migrating", true);
        let _part = plant(&format!(".vm5.{}.dwcp-round", "fedcba9876543210"), false);
        let touched = plant(".vm6.dwcp-migrating", true);
        rx.touch_round(&peer_dir.join("vm6"));
        assert_eq!(rx.drop_stale_targets(Duration::from_secs(3600)).await, 0);
        assert!(resumed.exists() && touched.exists());
    }

    #[tokio::test]
    async fn a_round_for_a_target_removed_as_abandoned_is_refused_until_the_migration_starts_again()
    {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::new(dir.path(), Duration::from_secs(10), false).unwrap();
        let peer = NodeId::new("src").unwrap();
        let session = Mutex::new(RxSession::default());
        let target = dir.path().join(".vm.mem.dwcp-migrating");
        let f = File::create(&target).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        drop(f);
        assert_eq!(rx.drop_stale_targets(Duration::from_secs(3600)).await, 1);
        let begin = ObjectBegin {
            object: 1,
            name: "vm.mem".into(),
            size: 1000,
            version_tag: "migration x round 3 part 0".into(),
            encoding: data::ENCODING_HDE_PAGES_INPLACE,
            raw_size: PAGES * PS as u64,
            ..ObjectBegin::default()
        };
        // Its source resumes a later round: applied to a new, empty target, it would publish
        // zeros where the earlier rounds wrote.
        let e = rx.begin(&peer, &session, &begin).unwrap_err().reason;
        assert!(
            e.contains("was removed after nothing had written it"),
            "{e}"
        );
        assert!(!target.exists());
        // An agent restarted meanwhile refuses it too: the mark is on disk.
        let marker = dir.path().join(".vm.mem.dwcp-swept");
        assert!(marker.exists());
        let restarted = Receiver::new(dir.path(), Duration::from_secs(10), false).unwrap();
        let e = restarted
            .begin(&peer, &Mutex::new(RxSession::default()), &begin)
            .unwrap_err()
            .reason;
        assert!(e.contains("was removed"), "{e}");
        // A new attempt aborts first, then begins.
        let abort = Migration {
            object: 9,
            op: data::MIGRATION_ABORT,
            name: "vm.mem".into(),
            ..Migration::default()
        };
        let _ = rx.migration(&peer, &abort, 1 << 20).await;
        assert!(!marker.exists());
        rx.begin(&peer, &session, &begin).unwrap();
    }

    #[test]
    fn round_files_are_told_by_their_object_and_tag_hash() {
        assert!(is_round_file(".vm.0123456789abcdef.dwcp-round", "vm"));
        assert!(is_round_file(".vm.0123456789abcdef.dwcp-round-state", "vm"));
        // Another object whose name starts like this one's.
        assert!(!is_round_file(".vm.mem.0123456789abcdef.dwcp-round", "vm"));
        assert!(is_round_file(
            ".vm.mem.0123456789abcdef.dwcp-round",
            "vm.mem"
        ));
        assert!(!is_round_file(".vm.0123.dwcp-round", "vm"));
        assert!(!is_round_file(".vm.dwcp-migrating", "vm"));
        assert!(!is_round_file("vm.0123456789abcdef.dwcp-round", "vm"));
    }

    #[test]
    fn names() {
        check_name("disk.qcow2").unwrap();
        for bad in ["", ".hidden", "a/b", "..", "a\nb", &"x".repeat(201)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        fs::write(&p, "dwcp-part 1\ntag 1\n100\n40\n").unwrap();
        assert_eq!(read_state(&p), Some(("tag 1".into(), 100, 40)));
        fs::write(&p, "garbage").unwrap();
        assert_eq!(read_state(&p), None);
    }

    const PS: usize = 4096;
    const PAGES: u64 = 512;

    /// A round of every page of `new`, against `base` (what the target holds) unless cold,
    /// in small blocks so that part of it can be applied.
    fn round(new: &[u8], base: Option<&[u8]>) -> Vec<u8> {
        let cfg = dwcp_encoding::EncoderConfig {
            codec: dwcp_encoding::Codec::Zstd(1),
            block_bytes: 8192,
            ..dwcp_encoding::EncoderConfig::new(PAGES)
        };
        let mut enc = dwcp_encoding::PageEncoder::new(cfg).unwrap();
        let mut out = Vec::new();
        for (p, page) in new.chunks_exact(PS).enumerate() {
            let b = base.map(|b| &b[p * PS..(p + 1) * PS]);
            enc.push(p as u64, page, b, None, &mut out).unwrap();
        }
        let stats = enc.finish(&mut out);
        assert_eq!(stats.xor > 0, base.is_some(), "{stats:?}");
        out
    }

    /// Pages of pseudo-random bytes, and the same with a few bytes of each changed.
    fn images() -> (Vec<u8>, Vec<u8>) {
        let mut base = vec![0u8; PAGES as usize * PS];
        blake3::Hasher::new()
            .update(b"round test")
            .finalize_xof()
            .fill(&mut base);
        let mut new = base.clone();
        for p in 0..PAGES as usize {
            new[p * PS + p % 97] ^= 0x5a;
            new[p * PS + 1000 + p % 13] ^= 0xa5;
            if p % 4 == 0 {
                // New content: literal pages, which fill blocks.
                new[p * PS..(p + 1) * PS].reverse();
            }
        }
        (base, new)
    }

    /// A directory with a migration target holding the base image; the base and the new one.
    fn target_holding_base() -> (tempfile::TempDir, PathBuf, Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let final_path = dir.path().join("vm.mem");
        let (base, new) = images();
        fs::write(migration_target(&final_path), &base).unwrap();
        (dir, final_path, base, new)
    }

    /// A round's place in a queue of its own: its turn at once.
    fn ticket() -> Ticket {
        Turns::default().take(Path::new("target"), flag())
    }

    fn flag() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    fn inplace(raw_size: u64) -> Delta {
        Delta {
            encoding: data::ENCODING_HDE_PAGES_INPLACE,
            raw_size,
            raw_blake3: Vec::new(),
            commit: false,
        }
    }

    #[test]
    fn a_round_applied_while_it_arrives_in_pieces_of_any_size_is_exact() {
        let (_dir, final_path, base, new) = target_holding_base();
        let obj = round(&new, Some(&base));
        let mut a = Box::new(
            RoundApply::open(
                &inplace(base.len() as u64),
                &final_path,
                None,
                flag(),
                ticket(),
            )
            .unwrap(),
        );
        // The header split over several pieces, then uneven ones.
        let mut at = 0;
        for n in [1, 2, 4, 7, 100, 5000].into_iter().cycle() {
            if at == obj.len() {
                break;
            }
            let end = (at + n).min(obj.len());
            a.feed(&obj[at..end]);
            at = end;
        }
        a.finish().unwrap();
        assert!(fs::read(migration_target(&final_path)).unwrap() == new);
    }

    #[test]
    fn a_round_applied_in_part_then_again_from_its_start_is_never_wrong() {
        // Its session broke after part of it was applied; resumed, it is decoded again from
        // the part file. The pages that depend on the target's old content must not be
        // applied twice: their base checks fail, and the sender is told to send it cold.
        let (dir, final_path, base, new) = target_holding_base();
        let raw_size = base.len() as u64;
        let obj = round(&new, Some(&base));
        let part = dir.path().join("part");
        fs::write(&part, &obj).unwrap();
        let mut a = Box::new(
            RoundApply::open(&inplace(raw_size), &final_path, None, flag(), ticket()).unwrap(),
        );
        a.feed(&obj[..obj.len() / 2]);
        drop(a);
        let target = fs::read(migration_target(&final_path)).unwrap();
        assert!(target != base && target != new, "half of it applied");
        let e = apply_round(&part, &final_path, &inplace(raw_size), None, None).unwrap_err();
        assert_eq!(e.0, ErrorCode::DELTA_UNRESOLVED, "{e:?}");
        // Sent again without references, it makes the target exact.
        fs::write(&part, round(&new, None)).unwrap();
        apply_round(&part, &final_path, &inplace(raw_size), None, None).unwrap();
        assert!(fs::read(migration_target(&final_path)).unwrap() == new);
    }

    #[test]
    fn a_later_round_of_a_target_waits_for_the_one_begun_before_it() {
        // Two rounds in flight at once (v5): the second's pages are XOR deltas against what
        // the first writes. Its bytes are here first; applied then, its base checks would
        // fail. It waits for its turn instead.
        let (_dir, final_path, base, new) = target_holding_base();
        let raw_size = base.len() as u64;
        let mut newer = new.clone();
        for p in 0..PAGES as usize {
            newer[p * PS + 7] ^= 0x33;
        }
        let first = round(&new, Some(&base));
        let second = round(&newer, Some(&new));
        let turns = Turns::default();
        let (ta, tb) = (
            turns.take(&final_path, flag()),
            turns.take(&final_path, flag()),
        );
        let mut a =
            Box::new(RoundApply::open(&inplace(raw_size), &final_path, None, flag(), ta).unwrap());
        let mut b =
            Box::new(RoundApply::open(&inplace(raw_size), &final_path, None, flag(), tb).unwrap());
        let later = std::thread::spawn(move || {
            b.feed(&second);
            b.finish()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            fs::read(migration_target(&final_path)).unwrap() == base,
            "the later round wrote before its turn"
        );
        a.feed(&first);
        a.finish().unwrap();
        later.join().unwrap().unwrap();
        assert!(fs::read(migration_target(&final_path)).unwrap() == newer);
        assert!(!turns.busy(&final_path));
    }

    #[tokio::test]
    async fn a_commit_is_refused_while_a_round_is_on_its_way_and_an_abort_abandons_it() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::new(dir.path(), Duration::from_secs(10), false).unwrap();
        let peer = NodeId::new("src").unwrap();
        let session = Mutex::new(RxSession::default());
        let begin = |object: u64, part: u32| ObjectBegin {
            object,
            name: "vm.mem".into(),
            size: 1000,
            version_tag: format!("migration x round 0 part {part}"),
            encoding: data::ENCODING_HDE_PAGES_INPLACE,
            raw_size: PAGES * PS as u64,
            raw_blake3: Vec::new(),
            commit: false,
            urgent: false,
            writes: None,
        };
        // Two rounds of one target at once, each in a part file of its own.
        rx.begin(&peer, &session, &begin(1, 0)).unwrap();
        rx.begin(&peer, &session, &begin(2, 1)).unwrap();
        let rounds = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let n = e.as_ref().unwrap().file_name();
                    n.to_string_lossy().ends_with(".dwcp-round")
                })
                .count()
        };
        assert_eq!(rounds(), 2);
        // The same round twice is refused. (Not as busy: the object that holds it is not
        // one of a session this receiver serves; see `t29` in the agent's tests for that.)
        let e = rx.begin(&peer, &session, &begin(3, 1)).unwrap_err();
        assert!(e.reason.contains("in progress"), "{e:?}");
        assert_eq!(e.code, ErrorCode::STORAGE_ERROR);
        let op = |op: u32| Migration {
            object: 9,
            op,
            name: "vm.mem".into(),
            ..Migration::default()
        };
        // An op this node does not know (a newer sender's) is refused and ends nothing.
        let done = rx.migration(&peer, &op(99), 1 << 20).await;
        assert_eq!(done.code, ErrorCode::STORAGE_ERROR.0, "{done:?}");
        assert!(done.reason.contains("unknown migration op 99"), "{done:?}");
        assert_eq!(rounds(), 2);
        let done = rx
            .migration(&peer, &op(data::MIGRATION_COMMIT), 1 << 20)
            .await;
        assert_eq!(done.code, ErrorCode::STORAGE_ERROR.0, "{done:?}");
        assert!(done.reason.contains("still being received"), "{done:?}");
        // A rollback goes through: the rounds write nothing more, and their files go.
        let done = rx
            .migration(&peer, &op(data::MIGRATION_ABORT), 1 << 20)
            .await;
        assert_eq!(done.code, 0, "{done:?}");
        {
            let s = lock(&session);
            for o in s.objects.values() {
                assert!(o.abandoned.as_ref().unwrap().load(Ordering::Acquire));
            }
        }
        assert_eq!(rounds(), 0);
        // A new attempt's rounds do not wait behind the abandoned ones.
        assert!(!rx.turns.busy(&dir.path().join("vm.mem")));
    }

    #[test]
    fn a_resumed_round_whose_target_was_aborted_applies_nothing() {
        let (dir, final_path, base, new) = target_holding_base();
        let part = dir.path().join("part");
        fs::write(&part, round(&new, None)).unwrap();
        let gone = flag();
        gone.store(true, Ordering::Release);
        let raw_size = base.len() as u64;
        let e = apply_round(&part, &final_path, &inplace(raw_size), None, Some(gone)).unwrap_err();
        assert!(e.1.contains("abandoned"), "{e:?}");
        assert!(fs::read(migration_target(&final_path)).unwrap() == base);
    }

    #[test]
    fn a_round_abandoned_while_it_applies_writes_nothing_more() {
        let (_dir, final_path, base, new) = target_holding_base();
        let obj = round(&new, None);
        let gone = flag();
        let mut a = Box::new(
            RoundApply::open(
                &inplace(base.len() as u64),
                &final_path,
                None,
                gone.clone(),
                ticket(),
            )
            .unwrap(),
        );
        a.feed(&obj[..obj.len() / 2]);
        let half = fs::read(migration_target(&final_path)).unwrap();
        assert!(half != base, "half of it applied");
        gone.store(true, Ordering::Release);
        a.feed(&obj[obj.len() / 2..]);
        assert_eq!(fs::read(migration_target(&final_path)).unwrap(), half);
        let e = a.finish().unwrap_err();
        assert!(e.1.contains("abandoned"), "{e:?}");
    }

    #[test]
    fn a_truncated_or_malformed_round_fails_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let final_path = dir.path().join("vm.mem");
        let (base, new) = images();
        let raw_size = base.len() as u64;
        let obj = round(&new, None);
        let mut a = Box::new(
            RoundApply::open(&inplace(raw_size), &final_path, None, flag(), ticket()).unwrap(),
        );
        a.feed(&obj[..3]);
        assert_eq!(a.finish().unwrap_err().0, ErrorCode::PROTOCOL_ERROR);
        let mut bad = obj.clone();
        bad[5] = 40; // page size 2^40
        let mut a = Box::new(
            RoundApply::open(&inplace(raw_size), &final_path, None, flag(), ticket()).unwrap(),
        );
        a.feed(&bad);
        let e = a.finish().unwrap_err();
        assert_eq!(e.0, ErrorCode::PROTOCOL_ERROR);
        assert!(e.1.contains("page size"), "{e:?}");
        let mut a = Box::new(
            RoundApply::open(&inplace(raw_size), &final_path, None, flag(), ticket()).unwrap(),
        );
        a.feed(&obj[..obj.len() - 10]);
        assert_eq!(a.finish().unwrap_err().0, ErrorCode::PROTOCOL_ERROR);
    }
}
