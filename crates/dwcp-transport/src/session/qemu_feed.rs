//! The destination side of a QEMU migration through DWCP: feeding the blocks of the stream
//! (`TUNNEL_DATA` frames, decoded by the connection that received them) in order into the
//! local QEMU that waits with `-incoming unix:DIR/VM.incoming`, and watching that QEMU over
//! its monitor `DIR/VM.qmp` to say when (and whether) it has loaded the VM.
//!
//! Memory stays bounded: a block that QEMU could take now waits for room while
//! [`MAX_BUFFERED`] bytes of such blocks are held (and the stream's possible end, at most
//! 16 MiB and a block, see `end_hold`) (the connections stop reading meanwhile, and
//! the sender's window stops it); blocks beyond a gap are taken while that holds, at most
//! [`MAX_AHEAD`] of them. When the gap closes, all of them can be fed at once: up to
//! [`MAX_AHEAD`] bytes then wait for QEMU that the sender counts as acknowledged (and its
//! stop decision does not see).
//!
//! Under post-copy (asked for at OPEN) QEMU talks back on the same socket: its return path
//! (page requests once the guest runs here, and at the end its "done"). Those bytes wait in
//! a [`ReturnPath`] (at most [`RETURN_MAX`]) until the source asks for them
//! (`MIGRATION_QEMU_RETURN`) and writes them into the source QEMU's socket.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dwcp_wire::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::end_hold::EndHold;
use crate::qmp::{Qmp, QmpError};

/// How long QEMU may take to accept a segment, or to load the VM after the last one.
const STALL: Duration = Duration::from_secs(60);

/// Most bytes of one stream held for QEMU from the next block on without a hole (those beyond
/// a gap: [`MAX_AHEAD`]). Small: a block is acknowledged once queued here,
/// so what waits here is outside the sender's window, hidden from QEMU's stop decision at the
/// source; beyond this the connections stop reading and the window sees the wait.
pub(crate) const MAX_BUFFERED: usize = 2 << 20;

/// An open stream with nothing to feed for this long, and no finish, is given up (its QEMU
/// told to quit): the source is gone. The source itself gives up on a QEMU silent for 120 s.
/// A source that says how long it keeps dialling a lost link (its OPEN's `wait_secs`) gets
/// that much more.
const IDLE_LIMIT: Duration = Duration::from_secs(180);

/// The most a source's OPEN adds to [`IDLE_LIMIT`] (a day, `dwcp migrate --retry-secs`'s most).
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// How long a RECOVER waits for the destination QEMU to pause its post-copy (it notices its
/// stream gone) and to listen again.
const RECOVER_WAIT: Duration = Duration::from_secs(30);

/// Most bytes held ahead of a gap (blocks after one not yet received). A sender reads at most
/// 128 MiB beyond its acknowledged prefix (`GAP_LIMIT` in `dwcp-migration`); far more means it
/// ignores that.
pub(crate) const MAX_AHEAD: usize = 256 << 20;

/// Most bytes of QEMU's return path held for the source (beyond this QEMU's writes wait).
/// QEMU's messages there are a few dozen bytes each: a page request, a ping's answer.
const RETURN_MAX: usize = 1 << 20;
/// Most bytes of the return path in one answer.
const RETURN_REPLY: usize = 256 << 10;
/// How long a `MIGRATION_QEMU_RETURN` waits for bytes before it is answered empty: short, so
/// that a page request written just after an answer left waits little for the next ask.
const RETURN_WAIT: Duration = Duration::from_millis(200);

/// What the destination QEMU wrote back on its migration socket, from stream offset `start`.
#[derive(Debug, Default)]
struct ReturnState {
    start: u64,
    bytes: std::collections::VecDeque<u8>,
    /// QEMU closed its side (`Ok`), or reading failed.
    end: Option<Result<(), String>>,
}

/// QEMU's return path under post-copy.
#[derive(Debug, Default)]
struct ReturnPath {
    state: Mutex<ReturnState>,
    /// Wakes an ask waiting for bytes, and the reader waiting for room.
    changed: Notify,
}

impl ReturnPath {
    /// The bytes from `from` on (the asker holds everything before), up to `most` and
    /// [`RETURN_REPLY`], waiting at most [`RETURN_WAIT`] for some; and whether the path has
    /// ended with them.
    async fn from(&self, from: u64, most: usize) -> Result<(Vec<u8>, bool), String> {
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = lock(&self.state);
                let held = s.start + s.bytes.len() as u64;
                if from < s.start || from > held {
                    return Err(format!(
                        "asks for the return path from byte {from}; bytes {}..{held} are held",
                        s.start
                    ));
                }
                let delivered = (from - s.start) as usize;
                s.bytes.drain(..delivered);
                s.start = from;
                if delivered > 0 {
                    self.changed.notify_waiters();
                }
                if !s.bytes.is_empty() {
                    let n = s.bytes.len().min(RETURN_REPLY).min(most.max(1));
                    return Ok((s.bytes.range(..n).copied().collect(), false));
                }
                match &s.end {
                    Some(Ok(())) => return Ok((Vec::new(), true)),
                    Some(Err(e)) => return Err(e.clone()),
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok((Vec::new(), false));
            }
        }
    }
}

/// Reads QEMU's return path into `path` until QEMU closes it.
async fn read_return(path: Arc<ReturnPath>, mut sock: OwnedReadHalf, vm: String) {
    let mut buf = vec![0u8; 64 << 10];
    let end = loop {
        // Room first: a source that stopped asking must not make this grow.
        loop {
            let changed = path.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if lock(&path.state).bytes.len() < RETURN_MAX {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), changed).await;
        }
        match sock.read(&mut buf).await {
            // QEMU closing its socket with bytes of ours unread (the stream's tail after its
            // end) reads as a reset here: an end all the same. Whether the migration
            // succeeded is what QEMU said before on the path.
            Ok(0) => break Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ok(()),
            Ok(n) => {
                debug!(vm, n, "return path: read from the destination QEMU");
                lock(&path.state).bytes.extend(&buf[..n]);
                path.changed.notify_waiters();
            }
            Err(e) => break Err(format!("reading the destination QEMU's return path: {e}")),
        }
    };
    debug!(vm, ?end, "return path of the destination QEMU ended");
    lock(&path.state).end = Some(end);
    path.changed.notify_waiters();
}

#[derive(Debug, Default)]
struct FeedState {
    /// Next segment QEMU gets.
    next: u64,
    /// Blocks received and not fed yet.
    ready: BTreeMap<u64, Bytes>,
    /// Their bytes.
    buffered: usize,
    /// Blocks received and waiting for room (in `push`): present, so the blocks after them
    /// are not after a gap.
    waiting: std::collections::BTreeSet<u64>,
    /// Set by FINISH: the stream has this many segments, and this BLAKE3 digest.
    total: Option<(u64, [u8; 32])>,
    fed_bytes: u64,
    /// The feeder stopped on this.
    error: Option<String>,
    /// Every segment went in and the stream was closed.
    closed: bool,
    /// The stream's end (what was kept back until the digest matched) began to go to QEMU:
    /// from here on QEMU may load the guest and start it, whatever fails after.
    end_sent: bool,
    last_progress: Option<Instant>,
}

#[derive(Debug)]
struct Feed {
    state: Mutex<FeedState>,
    /// Wakes connections waiting for room.
    wake: Notify,
    /// Wakes the feeder.
    kick: Notify,
    /// QEMU's monitor, held while the migration is (QEMU takes one client at a time); with
    /// out-of-band execution under post-copy, for a recovery (see [`Feeds::recover`]).
    qmp: Arc<tokio::sync::Mutex<Qmp>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// See [`IDLE_LIMIT`].
    idle_limit: Duration,
    /// QEMU's return path, under post-copy; its reader.
    ret: Option<Arc<ReturnPath>>,
    ret_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One FINISH at a time: a source whose connection broke while it waited sends it again,
    /// and the second must see what the first did.
    finishing: tokio::sync::Mutex<()>,
    /// The stream's tunnel session, when its source told: blocks and requests from another
    /// (an earlier stream's, still in flight) are refused.
    session: Option<Vec<u8>>,
    /// Its end was counted (see [`Feeds::remove_if`]'s answer).
    ended: AtomicBool,
    /// [`quit`] left its QEMU as it is, in post-copy or not answering: a source may resume it.
    left: AtomicBool,
}

impl Feed {
    /// Whether `session` (a block's, or a request's when it names one) is not this stream's.
    fn foreign(&self, session: &[u8]) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !session.is_empty() && s.as_slice() != session)
    }
}

/// How a feed reaches its QEMU.
enum Conn {
    /// Connected.
    Now(UnixStream),
    /// At this socket, once the stream's first block is in (see [`Feeds::recover`]).
    Lazy(PathBuf),
}

/// The open incoming migrations, by source and VM.
type FeedMap = Mutex<HashMap<(NodeId, String), Arc<Feed>>>;

/// Migrations given up here because their source went silent, by source, not counted yet.
type GivenUp = Mutex<HashMap<NodeId, u64>>;

/// Where a feed is listed, for its task to take it off when its source is gone.
struct Listing {
    feeds: std::sync::Weak<FeedMap>,
    given_up: std::sync::Weak<GivenUp>,
    key: (NodeId, String),
}

/// How long the answer to a FINISH is kept for a source that asks again (its connection
/// broke before the answer came), and for how many migrations at most. At least as long
/// as the stream could wait for its source (its idle limit).
const FINISHED_KEPT: Duration = Duration::from_secs(600);
const FINISHED_MAX: usize = 1024;

/// A FINISH answered: the stream it ended (length in blocks, digest), its answer, and when.
#[derive(Debug, Clone)]
struct Finished {
    at: Instant,
    /// Kept this long from `at`.
    keep: Duration,
    total: u64,
    digest: [u8; 32],
    result: Result<String, String>,
}

/// What a feed's stream is (see [`Feeds::start`]).
#[derive(Debug)]
struct Stream {
    /// QEMU's return path, under post-copy.
    ret: Option<Arc<ReturnPath>>,
    /// The tunnel session it is bound to (see [`Feed::foreign`]).
    session: Option<Vec<u8>>,
    /// How long it may go without a block (see [`IDLE_LIMIT`]).
    idle_limit: Duration,
}

/// The incoming QEMU migrations of one receiver.
#[derive(Debug)]
pub(crate) struct Feeds {
    dir: PathBuf,
    idle_limit: Duration,
    /// See [`STALL`].
    stall: Duration,
    /// How long a QEMU told to quit after having had its whole stream may take to go.
    gone_within: Duration,
    feeds: Arc<FeedMap>,
    /// See [`Feeds::take_given_up`].
    given_up: Arc<GivenUp>,
    /// Recent FINISH answers, by source and VM (see [`FINISHED_KEPT`]).
    finished: Mutex<HashMap<(NodeId, String), Finished>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Feeds {
    /// QEMU sockets are looked for in `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            idle_limit: IDLE_LIMIT,
            stall: STALL,
            gone_within: Duration::from_secs(10),
            feeds: Arc::new(Mutex::new(HashMap::new())),
            given_up: Arc::new(Mutex::new(HashMap::new())),
            finished: Mutex::new(HashMap::new()),
        }
    }

    /// The migrations ended here since the last call because their stream went without a
    /// block for its idle limit (the source went without an ABORT), by source: no request
    /// follows them to count them where requests are answered.
    pub(crate) fn take_given_up(&self) -> HashMap<NodeId, u64> {
        std::mem::take(&mut *lock(&self.given_up))
    }

    /// The answer already given to this FINISH (the same stream), if it is recent.
    fn replay(
        &self,
        key: &(NodeId, String),
        total: u64,
        digest: &[u8; 32],
    ) -> Option<Result<String, String>> {
        lock(&self.finished)
            .get(key)
            .filter(|f| f.at.elapsed() < f.keep && f.total == total && &f.digest == digest)
            .map(|f| f.result.clone())
    }

    /// Keeps a FINISH's answer for a source that asks again.
    fn record(&self, key: (NodeId, String), f: Finished) {
        let mut m = lock(&self.finished);
        m.retain(|_, v| v.at.elapsed() < v.keep);
        if m.len() >= FINISHED_MAX
            && let Some(oldest) = m.iter().min_by_key(|(_, v)| v.at).map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
        m.insert(key, f);
    }

    /// How long a stream whose source keeps dialling a lost link for `wait` may go without a
    /// block (see [`IDLE_LIMIT`]).
    fn idle_for(&self, wait: Duration) -> Duration {
        self.idle_limit + wait.min(MAX_WAIT)
    }

    /// Before an OPEN: an earlier migration of `vm` from `peer` still listed here is over (an
    /// ABORT that never arrived must not block the retry, nor a paused post-copy a fresh
    /// start) and goes, its QEMU told to quit. Whether that ended a migration (see
    /// [`Feeds::remove_if`]).
    pub(crate) async fn end_earlier(&self, peer: &NodeId, vm: &str) -> bool {
        let key = (peer.clone(), vm.to_string());
        // A new migration of this VM: an earlier one's answer is not its answer.
        lock(&self.finished).remove(&key);
        if !lock(&self.feeds).contains_key(&key) {
            return false;
        }
        warn!(%peer, vm, "an earlier incoming migration of this VM was still open; dropped");
        self.remove(peer, vm, false).await
    }

    /// OPEN: connects to the waiting QEMU and starts feeding; with `postcopy`, turns on
    /// QEMU's post-copy and reads its return path. `wait`: how long the source keeps dialling
    /// a lost link; the stream may go that much longer without a block (see [`IDLE_LIMIT`]).
    /// `session`: the tunnel session that carries the stream, when the source tells (its
    /// blocks alone are taken, see [`Feed::foreign`]). Returns the answer's detail (JSON).
    pub(crate) async fn open(
        &self,
        peer: &NodeId,
        vm: &str,
        postcopy: bool,
        wait: Duration,
        session: &[u8],
    ) -> Result<String, String> {
        // The receiver has done so, counting what it ended; this is for other callers.
        self.end_earlier(peer, vm).await;
        let qmp_path = self.dir.join(format!("{vm}.qmp"));
        // Under post-copy QEMU's main thread can block on a page still at the source, and its
        // monitor with it, but for the commands it runs out of band: `migrate-recover`.
        let qmp = if postcopy {
            Qmp::connect_oob(&qmp_path, Duration::from_secs(10)).await
        } else {
            Qmp::connect(&qmp_path, Duration::from_secs(10)).await
        };
        let mut qmp = qmp.map_err(|e| format!("destination QEMU monitor: {e}"))?;
        let status = qmp
            .status()
            .await
            .map_err(|e| format!("destination QEMU monitor: {e}"))?;
        if status != "inmigrate" {
            return Err(format!(
                "the destination QEMU for {vm:?} is {status:?}, not waiting for a migration \
                 (start it with -incoming unix:{})",
                self.dir.join(format!("{vm}.incoming")).display()
            ));
        }
        // Before the connection: QEMU takes capabilities only until the migration starts.
        let (ret, detail) = if postcopy {
            let caps = serde_json::json!({"capabilities": [
                {"capability": "postcopy-ram", "state": true}
            ]});
            let took = match postcopy_memory(&mut qmp).await {
                Ok(()) => qmp
                    .execute("migrate-set-capabilities", Some(caps))
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match took {
                Ok(_) => (
                    Some(Arc::new(ReturnPath::default())),
                    serde_json::json!({"postcopy": true}),
                ),
                Err(e) => {
                    warn!(%peer, vm, "the destination QEMU cannot take post-copy: {e}");
                    let why = format!("the destination QEMU cannot take post-copy: {e}");
                    (None, serde_json::json!({"postcopy": false, "why": why}))
                }
            }
        } else {
            (None, serde_json::json!({}))
        };
        let sock_path = self.dir.join(format!("{vm}.incoming"));
        let sock = tokio::time::timeout(Duration::from_secs(10), UnixStream::connect(&sock_path))
            .await
            .map_err(|_| format!("connecting to {} timed out", sock_path.display()))?
            .map_err(|e| format!("cannot connect to {}: {e}", sock_path.display()))?;
        let qmp = Arc::new(tokio::sync::Mutex::new(qmp));
        let stream = Stream {
            ret,
            session: (!session.is_empty()).then(|| session.to_vec()),
            idle_limit: self.idle_for(wait),
        };
        let feed = self.start(peer, vm, qmp, Conn::Now(sock), stream);
        lock(&self.feeds).insert((peer.clone(), vm.to_string()), feed);
        info!(%peer, vm, postcopy = detail["postcopy"] == true, "incoming QEMU migration opened");
        Ok(detail.to_string())
    }

    /// A feed of `vm`'s `stream` from `peer`, reaching QEMU by `conn`, started and not
    /// listed yet (the caller places it).
    fn start(
        &self,
        peer: &NodeId,
        vm: &str,
        qmp: Arc<tokio::sync::Mutex<Qmp>>,
        conn: Conn,
        stream: Stream,
    ) -> Arc<Feed> {
        let Stream {
            ret,
            session,
            idle_limit,
        } = stream;
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState {
                last_progress: Some(Instant::now()),
                ..FeedState::default()
            }),
            wake: Notify::new(),
            kick: Notify::new(),
            qmp,
            task: Mutex::new(None),
            idle_limit,
            ret,
            ret_task: Mutex::new(None),
            finishing: tokio::sync::Mutex::new(()),
            session,
            ended: AtomicBool::new(false),
            left: AtomicBool::new(false),
        });
        let key = (peer.clone(), vm.to_string());
        let entry = Listing {
            feeds: Arc::downgrade(&self.feeds),
            given_up: Arc::downgrade(&self.given_up),
            key,
        };
        let task = match conn {
            Conn::Now(sock) => {
                let (rd, wr) = sock.into_split();
                if let Some(path) = &feed.ret {
                    let t = tokio::spawn(read_return(path.clone(), rd, vm.to_string()));
                    *lock(&feed.ret_task) = Some(t);
                }
                tokio::spawn(feed_loop(feed.clone(), wr, vm.to_string(), entry))
            }
            Conn::Lazy(path) => {
                tokio::spawn(connect_when_fed(feed.clone(), path, vm.to_string(), entry))
            }
        };
        *lock(&feed.task) = Some(task);
        feed
    }

    /// RECOVER: resumes the post-copy migration of `vm` that its broken stream left paused
    /// (QEMU's `postcopy-paused`), on a new stream carried by the tunnel session `session`.
    /// The earlier stream from `peer` stops (its socket closing pauses a QEMU that had not
    /// noticed yet); the destination QEMU listens again (`migrate-recover` on
    /// `DIR/VM.recover`, out of band); a new feed with a return path takes the new stream,
    /// and connects to QEMU only with its first block. Returns the answer's detail (JSON).
    /// `wait`: as for [`Feeds::open`].
    pub(crate) async fn recover(
        &self,
        peer: &NodeId,
        vm: &str,
        session: &[u8],
        wait: Duration,
    ) -> Result<String, String> {
        let key = (peer.clone(), vm.to_string());
        lock(&self.finished).remove(&key);
        let (old, other) = {
            let m = lock(&self.feeds);
            let other = m
                .keys()
                .find(|(p, v)| v == vm && p != peer)
                .map(|(p, _)| p.clone());
            (m.get(&key).cloned(), other)
        };
        if let Some(other) = other {
            return Err(format!(
                "the incoming migration of {vm:?} is open from node {other}, not from this one"
            ));
        }
        if old.as_ref().is_some_and(|f| f.ret.is_none()) {
            return Err(format!(
                "the incoming migration of {vm:?} is a pre-copy: there is no post-copy to resume"
            ));
        }
        // The earlier stream stops; its feed stays listed, with QEMU's monitor (negotiated
        // before the guest ran here: the one that still answers if QEMU's main thread waits
        // on a missing page), until the new feed takes its place. A recovery that fails
        // leaves it for the next.
        let path = self.dir.join(format!("{vm}.qmp"));
        let fresh = || async {
            let q = Qmp::connect_oob(&path, Duration::from_secs(10))
                .await
                .map_err(|e| {
                    format!(
                        "destination QEMU monitor: {e} (a QEMU whose guest waits on a page still \
                         at the source answers only the monitor this node opened before; was the \
                         agent restarted?)"
                    )
                })?;
            Ok::<_, String>(Arc::new(tokio::sync::Mutex::new(q)))
        };
        let mut qmp = match &old {
            Some(old) => {
                // Left for the recovery: paused, should this one fail.
                old.left.store(true, Ordering::SeqCst);
                stop(
                    old,
                    "the incoming migration is being resumed on a new stream",
                );
                info!(%peer, vm, "the earlier stream of this incoming migration stopped for its recovery");
                old.qmp.clone()
            }
            None => fresh().await?,
        };
        let sock_path = self.dir.join(format!("{vm}.recover"));
        let uri = format!("unix:{}", sock_path.display());
        // QEMU takes it once paused, which it is within moments of its stream going; one
        // that does not within this long is not waiting for a recovery.
        let deadline = Instant::now() + RECOVER_WAIT;
        let (mut warned, mut reconnected) = (false, false);
        loop {
            let asked = {
                let mut q = qmp.lock().await;
                if !q.oob() && !warned {
                    warned = true;
                    warn!(
                        vm,
                        "the destination QEMU's monitor has no out-of-band execution: its recovery waits for its main thread"
                    );
                }
                q.execute_oob("migrate-recover", Some(serde_json::json!({ "uri": uri })))
                    .await
            };
            match asked {
                Ok(_) => break,
                // The kept monitor is gone (QEMU restarted, say): a new one, once.
                Err(QmpError::Io { .. }) if !reconnected => {
                    reconnected = true;
                    qmp = fresh().await?;
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "the destination QEMU for {vm:?} did not take migrate-recover within \
                         {RECOVER_WAIT:?}: {e} (QEMU takes it while its post-copy is paused; \
                         one that began recovering on an earlier stream cannot pause again \
                         before QEMU 8.2)"
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        {
            // The earlier stream's events (its RESUME) are not this one's.
            let mut q = qmp.lock().await;
            let _ = q.poll_events(Duration::from_millis(1)).await;
            while q.take_event("RESUME").is_some() {}
        }
        let stream = Stream {
            ret: Some(Arc::new(ReturnPath::default())),
            session: (!session.is_empty()).then(|| session.to_vec()),
            // This source's wait, or the earlier stream's if longer.
            idle_limit: old
                .as_ref()
                .map_or(Duration::ZERO, |o| o.idle_limit)
                .max(self.idle_for(wait)),
        };
        let feed = self.start(peer, vm, qmp, Conn::Lazy(sock_path), stream);
        let placed = {
            let mut m = lock(&self.feeds);
            let free = match (m.get(&key), &old) {
                (None, _) => true,
                (Some(f), Some(o)) => Arc::ptr_eq(f, o),
                (Some(_), None) => false,
            };
            if free {
                m.insert(key, feed.clone());
            }
            free
        };
        if !placed {
            stop(&feed, "another migration of this VM opened meanwhile");
            return Err(format!(
                "another incoming migration of {vm:?} opened while this one was being resumed"
            ));
        }
        info!(%peer, vm, "incoming QEMU post-copy migration recovering");
        Ok(serde_json::json!({"postcopy": true, "recovered": true}).to_string())
    }

    /// RETURN: what `vm`'s QEMU wrote back from byte `from` on (at most `most` bytes), and
    /// whether that is all.
    pub(crate) async fn returned(
        &self,
        peer: &NodeId,
        vm: &str,
        from: u64,
        most: usize,
        session: &[u8],
    ) -> Result<(Vec<u8>, bool), String> {
        let feed = lock(&self.feeds)
            .get(&(peer.clone(), vm.to_string()))
            .cloned();
        let Some(feed) = feed else {
            return Err(format!("no incoming migration of {vm:?} is open"));
        };
        if feed.foreign(session) {
            return Err(earlier(vm));
        }
        match &feed.ret {
            None => Err(format!(
                "the incoming migration of {vm:?} was opened without post-copy: no return path"
            )),
            Some(p) => p.from(from, most).await,
        }
    }

    /// A block of `vm`'s stream arrived (decoded): queue it for QEMU, waiting while too much
    /// is queued already.
    pub(crate) async fn push(
        &self,
        peer: &NodeId,
        vm: &str,
        seq: u64,
        block: Bytes,
        session: &[u8],
    ) -> Result<(), String> {
        let key = (peer.clone(), vm.to_string());
        let Some(feed) = lock(&self.feeds).get(&key).cloned() else {
            // A block sent again after its acknowledgement was lost with its connection,
            // arriving after the finish it was part of: it was fed.
            let fed = lock(&self.finished)
                .get(&key)
                .is_some_and(|f| f.at.elapsed() < f.keep && f.result.is_ok() && seq < f.total);
            if fed {
                return Ok(());
            }
            return Err(format!("no incoming migration of {vm:?} is open"));
        };
        if feed.foreign(session) {
            return Err(earlier(vm));
        }
        let started = Instant::now();
        let mut block = Some(block);
        // Out of `waiting` however this ends, a cancelled push too: a stale entry would count
        // as present, and the blocks after it would pass for gap-free.
        struct Waiting<'a>(&'a Feed, u64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                lock(&self.0.state).waiting.remove(&self.1);
            }
        }
        let waiting = Waiting(&feed, seq);
        // Since when QEMU has taken nothing, as far as this block knows.
        let mut idle_since = started;
        let r = loop {
            let notified = feed.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = lock(&feed.state);
                if let Some(e) = &s.error {
                    break Err(e.clone());
                }
                if seq < s.next || s.ready.contains_key(&seq) {
                    break Ok(false); // a block sent again after a lost stream, or stuck
                }
                // A block waits for room while what the feeder can write now (the blocks
                // from the next one on, without a hole) fills the buffer: that drains
                // whatever the network does. Otherwise it is taken at once, after a gap (its
                // predecessor was on a connection that died, or is still on its way, perhaps
                // behind this one on this connection; the sender's window bounds those) or
                // not. Blocks held beyond a gap do not count: a block that closes the gap
                // waiting behind them would wait until QEMU reached it, one connection at a
                // time, with the next gap behind it on its connection (on `dc`, 2026-12-04:
                // 60-120 MB beyond a gap, blocks out for a second, and QEMU's final round
                // blocked for 200 ms at a time while the run behind the gap was fed).
                let present =
                    s.ready.range(s.next..seq).count() + s.waiting.range(s.next..seq).count();
                let gap = present as u64 != seq - s.next;
                if gap && s.buffered >= MAX_AHEAD {
                    break Err(format!(
                        "more than {MAX_AHEAD} bytes of blocks ahead of block {} (the sender \
                         ignores its window)",
                        s.next
                    ));
                }
                let (mut run, mut expect) = (0, s.next);
                for (k, b) in s.ready.range(s.next..) {
                    if *k != expect || run >= MAX_BUFFERED {
                        break;
                    }
                    run += b.len();
                    expect += 1;
                }
                if seq == s.next || run < MAX_BUFFERED {
                    if let Some(b) = block.take() {
                        s.buffered += b.len();
                        s.ready.insert(seq, b);
                    }
                    break Ok(true);
                }
                s.waiting.insert(seq);
                // A QEMU that takes data, if slowly, is not stalled: the wait counts from
                // its last progress (a run of 100 MB ahead of this block may take a while).
                if let Some(t) = s.last_progress {
                    idle_since = idle_since.max(t);
                }
            }
            if idle_since.elapsed() > STALL {
                break Err(format!(
                    "the destination QEMU took no data for {STALL:?} (block {seq} waiting)"
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        };
        drop(waiting);
        if r? {
            feed.wake.notify_waiters();
            feed.kick.notify_one();
        }
        Ok(())
    }

    /// FINISH: the stream has `total` segments whose bytes have the BLAKE3 `digest`. Waits
    /// until every segment is in and QEMU has loaded the VM; returns a JSON detail
    /// (`status`, `resumed_unix_us`, `fed_bytes`), and whether this finish ended the incoming
    /// migration (false when it was refused, or an abort came first).
    pub(crate) async fn finish(
        &self,
        peer: &NodeId,
        vm: &str,
        total: u64,
        digest: &[u8],
        session: &[u8],
    ) -> (Result<String, String>, bool) {
        let Ok(digest) = <[u8; 32]>::try_from(digest) else {
            let why = format!(
                "the finish of {vm:?} carries a {}-byte stream digest, not a 32-byte BLAKE3",
                digest.len()
            );
            return (Err(why), false);
        };
        let key = (peer.clone(), vm.to_string());
        let feed = lock(&self.feeds).get(&key).cloned();
        let Some(feed) = feed else {
            // Asked again after the answer was lost on its way: the same answer.
            if let Some(r) = self.replay(&key, total, &digest) {
                return (r, false);
            }
            return (
                Err(format!("no incoming migration of {vm:?} is open")),
                false,
            );
        };
        if feed.foreign(session) {
            return (Err(earlier(vm)), false);
        }
        let _turn = feed.finishing.lock().await;
        if let Some(r) = self.replay(&key, total, &digest) {
            return (r, false); // the FINISH before this one ended it meanwhile
        }
        {
            lock(&feed.state).total = Some((total, digest));
        }
        feed.kick.notify_one();
        let result = match self.finish_inner(&feed, vm).await {
            Ok(detail) => Ok(detail),
            Err((e, false)) => Err(e),
            // QEMU has had the whole stream, its end too: without a load it confirmed, it
            // must be gone before the source may resume its own guest. Under post-copy the
            // guest runs here whatever this says (the source knows it is past the point).
            Err((e, true)) if feed.ret.is_some() || e.starts_with(OUTCOME_UNKNOWN) => Err(e),
            Err((e, true)) => {
                if quit_confirmed(&feed, vm, self.gone_within).await {
                    Err(format!("{e}; its QEMU quit"))
                } else {
                    Err(format!(
                        "{OUTCOME_UNKNOWN}{e}; its QEMU had the whole stream and could not be \
                         made to quit: it may start the guest"
                    ))
                }
            }
        };
        // Recorded before the feed goes, so that a FINISH sent again finds one or the other;
        // not if an OPEN of a new migration of this VM replaced the feed meanwhile.
        let current = lock(&self.feeds)
            .get(&key)
            .is_some_and(|f| Arc::ptr_eq(f, &feed));
        if !current {
            return (result, false);
        }
        self.record(
            key,
            Finished {
                at: Instant::now(),
                keep: FINISHED_KEPT.max(feed.idle_limit),
                total,
                digest,
                result: result.clone(),
            },
        );
        let ended = self
            .remove_if(peer, vm, result.is_ok(), Some(&feed), true)
            .await;
        (result, ended)
    }

    /// The load's report, or why not and whether QEMU had been fed the whole stream.
    async fn finish_inner(&self, feed: &Feed, vm: &str) -> Result<String, (String, bool)> {
        // Wait for the feeder, as long as it makes progress.
        loop {
            {
                let s = lock(&feed.state);
                if let Some(e) = &s.error {
                    return Err((e.clone(), s.end_sent));
                }
                if s.closed {
                    break;
                }
                // QEMU not taking a block it has: STALL. A block not there yet (a link down,
                // its source dialling again): as long as the stream may go without one.
                let limit = if s.ready.contains_key(&s.next) {
                    self.stall
                } else {
                    feed.idle_limit.max(self.stall)
                };
                if s.last_progress.is_some_and(|t| t.elapsed() > limit) {
                    return Err((
                        format!(
                            "the stream of {vm:?} stalled at block {} for {limit:?}",
                            s.next
                        ),
                        s.end_sent,
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // QEMU loads what it got, then closes the stream and starts the VM (or stays paused
        // when started with -S). Poll its state; the RESUME event says exactly when.
        let deadline = Instant::now() + self.stall;
        let mut qmp = feed.qmp.lock().await;
        let fed = |e: String| (e, true);
        let status = loop {
            let status = qmp
                .status()
                .await
                .map_err(|e| fed(format!("destination QEMU for {vm:?} after the stream: {e}")))?;
            match status.as_str() {
                "inmigrate" | "finish-migrate" | "restore-vm" => {}
                "running" | "paused" | "prelaunch" => break status,
                // Past its load (it ran, then stopped: shut down, panicked, an I/O error):
                // not a QEMU that can be said to have left the guest alone.
                other => {
                    return Err((
                        format!(
                            "{OUTCOME_UNKNOWN}destination QEMU for {vm:?} left its load in \
                             state {other:?}: the guest may have run there"
                        ),
                        true,
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(fed(format!(
                    "destination QEMU for {vm:?} still loading after {:?}",
                    self.stall
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if feed.ret.is_some() {
            // Under post-copy the guest runs here from the switchover on, whatever became of
            // the pages still at the source: a stream that ended early (the source paused the
            // post-copy) checks out to its last byte all the same. Only QEMU's own end of the
            // migration says that every page arrived. (A deadline of its own: loading may
            // have taken most of the first.)
            let deadline = Instant::now() + self.stall;
            loop {
                let info = qmp.execute("query-migrate", None).await.map_err(|e| {
                    fed(format!(
                        "destination QEMU for {vm:?} after the post-copy stream: {e}"
                    ))
                })?;
                match info.get("status").and_then(serde_json::Value::as_str) {
                    Some("completed") => break,
                    Some(s @ ("failed" | "cancelled" | "postcopy-paused")) => {
                        return Err(fed(format!(
                            "destination QEMU for {vm:?} did not complete the post-copy ({s})"
                        )));
                    }
                    _ if Instant::now() > deadline => {
                        return Err(fed(format!(
                            "destination QEMU for {vm:?} did not complete the post-copy within \
                             {:?} of its stream's end",
                            self.stall
                        )));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        let _ = qmp.poll_events(Duration::from_millis(1)).await;
        let resumed = qmp
            .take_event("RESUME")
            .map(|e| e.at)
            .or_else(|| (status == "running").then(SystemTime::now));
        let resumed_us = resumed
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_micros() as u64);
        let fed = lock(&feed.state).fed_bytes;
        info!(vm, %status, fed, "incoming QEMU migration loaded");
        Ok(format!(
            "{{\"status\":\"{status}\",\"resumed_unix_us\":{},\"fed_bytes\":{fed}}}",
            resumed_us.map_or("null".to_string(), |v| v.to_string())
        ))
    }

    /// ABORT: stops feeding, and QEMU quits. Whether this ended an incoming migration. A
    /// QEMU left as it is in post-copy (see [`quit`]) stays listed with its monitor, its
    /// stream stopped, for a recovery: that migration has not ended.
    pub(crate) async fn abort(
        &self,
        peer: &NodeId,
        vm: &str,
        session: &[u8],
    ) -> Result<bool, String> {
        let feed = lock(&self.feeds)
            .get(&(peer.clone(), vm.to_string()))
            .cloned();
        let Some(feed) = feed else {
            return Ok(false);
        };
        if feed.foreign(session) {
            return Err(earlier(vm));
        }
        // Only this feed: a resumed one placed meanwhile is not this abort's.
        Ok(self.remove_if(peer, vm, false, Some(&feed), true).await)
    }

    /// Drops the feed of `vm`. Unless QEMU `loaded` the verified stream, QEMU is told to quit
    /// before its socket closes: on a stream cut after its end-of-state marker (in the VM
    /// description QEMU sends last) QEMU 7.2 completes the load and would start the guest.
    async fn remove(&self, peer: &NodeId, vm: &str, loaded: bool) -> bool {
        self.remove_if(peer, vm, loaded, None, false).await
    }

    /// As [`Feeds::remove`], only if the open feed is `only` (when given): a finish that
    /// ends after an OPEN replaced its feed must not remove the new one. With
    /// `keep_postcopy`, a feed whose QEMU is left in post-copy is listed again. Whether this
    /// ended the migration, once per feed (a feed kept listed has not).
    async fn remove_if(
        &self,
        peer: &NodeId,
        vm: &str,
        loaded: bool,
        only: Option<&Arc<Feed>>,
        keep_postcopy: bool,
    ) -> bool {
        let key = (peer.clone(), vm.to_string());
        let feed = {
            let m = lock(&self.feeds);
            if only.is_some_and(|o| !m.get(&key).is_some_and(|f| Arc::ptr_eq(f, o))) {
                return false;
            }
            m.get(&key).cloned()
        };
        let Some(feed) = feed else {
            return false;
        };
        // Stays listed while QEMU is asked: a RECOVER meanwhile finds it (and its monitor,
        // QEMU's one client).
        let left = !loaded && quit(&feed, vm).await;
        let kept = left && keep_postcopy;
        if !kept {
            let mut m = lock(&self.feeds);
            if m.get(&key).is_some_and(|f| Arc::ptr_eq(f, &feed)) {
                m.remove(&key);
            }
        }
        stop(&feed, "the incoming migration was given up");
        // A feed kept listed for a recovery has not ended the migration: the resumed feed
        // will, or a later removal of this one. Either counts once.
        !kept && !feed.ended.swap(true, Ordering::SeqCst)
    }

    /// Post-copy migrations into this node whose stream stopped, by source: each destination
    /// QEMU runs its guest but waits for the pages its source still holds, until that source
    /// resumes the migration (`MIGRATION_QEMU_RECOVER`).
    /// (A source gone without a word counts once the stream has been idle for the limit.)
    pub(crate) fn paused(&self) -> HashMap<NodeId, u64> {
        let mut by_peer = HashMap::new();
        for ((peer, _), feed) in lock(&self.feeds).iter() {
            let stopped = lock(&feed.state).error.is_some();
            if stopped && feed.left.load(Ordering::SeqCst) {
                *by_peer.entry(peer.clone()).or_insert(0) += 1;
            }
        }
        by_peer
    }
}

/// Why a block or request of an earlier stream of `vm` is refused.
fn earlier(vm: &str) -> String {
    format!(
        "the incoming migration of {vm:?} takes its stream from another tunnel session (resumed, or a new attempt): this is for an earlier one"
    )
}

/// Stops `feed`'s tasks (closing its socket to QEMU) and fails what waits on it with `why`,
/// without a word to QEMU.
fn stop(feed: &Feed, why: &str) {
    if let Some(t) = lock(&feed.task).take() {
        t.abort();
    }
    if let Some(t) = lock(&feed.ret_task).take() {
        t.abort();
    }
    let mut s = lock(&feed.state);
    s.ready.clear();
    s.buffered = 0;
    s.error.get_or_insert_with(|| why.to_string());
    drop(s);
    feed.wake.notify_waiters();
}

/// Connects `feed` to its QEMU at `path` once the stream's first block is in, then feeds
/// it. QEMU takes the connection as the start of its recovery (`postcopy-recover`), and
/// QEMU before 8.2 cannot pause again from there: a source that fails before sending
/// anything leaves it paused and listening, for another try.
async fn connect_when_fed(feed: Arc<Feed>, path: PathBuf, vm: String, entry: Listing) {
    // QEMU was not connected: it is left waiting for the recovery, for another try.
    let fail = |why: String| {
        feed.left.store(true, Ordering::SeqCst);
        let mut s = lock(&feed.state);
        s.error.get_or_insert(why);
        s.ready.clear();
        s.buffered = 0;
        drop(s);
        feed.wake.notify_waiters();
    };
    loop {
        let kicked = feed.kick.notified();
        {
            let s = lock(&feed.state);
            if s.error.is_some() {
                return;
            }
            if s.ready.contains_key(&s.next) {
                break;
            }
            if s.last_progress
                .is_some_and(|t| t.elapsed() > feed.idle_limit)
            {
                drop(s);
                return fail(format!(
                    "no block of the resumed stream for {:?}: the source is gone",
                    feed.idle_limit
                ));
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), kicked).await;
    }
    let sock = match tokio::time::timeout(Duration::from_secs(10), UnixStream::connect(&path)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(format!("cannot connect to {}: {e}", path.display())),
        Err(_) => return fail(format!("connecting to {} timed out", path.display())),
    };
    let (rd, wr) = sock.into_split();
    if let Some(p) = &feed.ret {
        let t = tokio::spawn(read_return(p.clone(), rd, vm.clone()));
        *lock(&feed.ret_task) = Some(t);
    }
    // Stopped while connecting: `stop` found no reader to end.
    if lock(&feed.state).error.is_some() {
        if let Some(t) = lock(&feed.ret_task).take() {
            t.abort();
        }
        return;
    }
    debug!(
        vm,
        "connected to the destination QEMU for the resumed stream"
    );
    feed_loop(feed, wr, vm, entry).await;
}

/// Whether QEMU's post-copy can fault in this QEMU's guest memory: `userfaultfd` takes
/// anonymous memory, tmpfs and hugetlbfs, not a file elsewhere (QEMU's own check at
/// `migrate-set-capabilities` tries anonymous memory only, and a file-backed guest would fail
/// once post-copy began, with the guest paused at the source). Memory backends QEMU does not
/// list (an old `-mem-path`) are not checked.
async fn postcopy_memory(qmp: &mut Qmp) -> Result<(), String> {
    let objects = qmp
        .execute("qom-list", Some(serde_json::json!({"path": "/objects"})))
        .await
        .map_err(|e| format!("cannot list its memory backends: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for o in objects.as_array().into_iter().flatten() {
        if o.get("type").and_then(serde_json::Value::as_str) != Some("child<memory-backend-file>") {
            continue;
        }
        let Some(name) = o.get("name").and_then(serde_json::Value::as_str) else {
            continue;
        };
        let get = serde_json::json!({"path": format!("/objects/{name}"), "property": "mem-path"});
        let path = qmp
            .execute("qom-get", Some(get))
            .await
            .map_err(|e| format!("cannot read where memory backend {name} is: {e}"))?;
        let Some(path) = path.as_str() else { continue };
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let fs = filesystem_of(&mounts, &real).unwrap_or("an unknown filesystem");
        if fs != "tmpfs" && fs != "hugetlbfs" {
            return Err(format!(
                "its memory backend {name} is a file on {fs} ({path}): post-copy (userfaultfd) \
                 needs anonymous memory, tmpfs or hugetlbfs"
            ));
        }
    }
    Ok(())
}

/// The type of the filesystem `path` is on, from a mount table (`/proc/self/mounts`): the
/// longest mount point that holds it.
fn filesystem_of<'a>(mounts: &'a str, path: &Path) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fs) = (f.next()?, f.next()?, f.next()?);
            // Spaces and the like in a mount point are octal escapes.
            let at = at.replace("\\040", " ").replace("\\011", "\t");
            path.starts_with(&at).then_some((at.len(), fs))
        })
        .max_by_key(|&(len, _)| len)
        .map(|(_, fs)| fs)
}

/// The start of a finish's refusal that the source must take as "the guest may run at the
/// destination" (answered with `OUTCOME_UNKNOWN`, not as a refusal it may roll back on).
pub(crate) const OUTCOME_UNKNOWN: &str = "outcome unknown: ";

/// Whether a destination QEMU in run state `status` has run its guest (anything but
/// waiting for its stream, loading it, or loaded and held paused with `-S`).
fn guest_ran(status: &str) -> bool {
    !matches!(
        status,
        "inmigrate" | "finish-migrate" | "restore-vm" | "paused" | "prelaunch"
    )
}

/// Whether the destination QEMU says it has run its guest ([`guest_ran`]); said in the log.
/// A QEMU that does not say (no answer in 5 s: its main thread busy, perhaps running the
/// guest) counts as having run it once it may have had its stream's end (`end_sent`).
async fn has_run(qmp: &mut Qmp, vm: &str, end_sent: bool) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), qmp.status()).await {
        Ok(Ok(status)) if guest_ran(&status) => {
            warn!(vm, %status, "the destination QEMU has run the guest: left as it is");
            true
        }
        Ok(Ok(_)) => false,
        // Its monitor closed: gone, whatever it had.
        Ok(Err(QmpError::Io { .. })) => false,
        _ if end_sent => {
            warn!(
                vm,
                "the destination QEMU had its stream's end and does not say what it did: left as it is"
            );
            true
        }
        _ => false,
    }
}

/// Tells the destination QEMU to quit (`why`), 5 s at most.
async fn tell_quit(qmp: &mut Qmp, vm: &str, why: &str) {
    match tokio::time::timeout(Duration::from_secs(5), qmp.execute("quit", None)).await {
        Ok(Ok(_)) => info!(vm, "destination QEMU told to quit: {why}"),
        // Gone already (it failed the load by itself, or died).
        Ok(Err(e)) => debug!(vm, "destination QEMU quit: {e}"),
        Err(_) => warn!(vm, "destination QEMU did not answer quit within 5 s"),
    }
}

/// Why nothing listens at QEMU's monitor socket `path` any more (connection refused, or the
/// socket removed): QEMU is gone. `None` while something does (a running QEMU's monitor
/// takes the connection into its backlog, even with its one client connected).
async fn monitor_gone(path: &Path) -> Option<std::io::Error> {
    match UnixStream::connect(path).await {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            Some(e)
        }
        _ => None,
    }
}

/// After QEMU had the whole stream and did not confirm its load: tells it to quit, and
/// whether it is known to be gone (its monitor socket refuses, or is removed) `within`.
async fn quit_confirmed(feed: &Feed, vm: &str, within: Duration) -> bool {
    let path = {
        let mut qmp = feed.qmp.lock().await;
        // One that has run the guest is not told to quit: the guest stays where it ran.
        if has_run(&mut qmp, vm, true).await {
            return false;
        }
        tell_quit(&mut qmp, vm, "its load was not confirmed").await;
        qmp.path().to_path_buf()
    };
    let deadline = Instant::now() + within;
    loop {
        if monitor_gone(&path).await.is_some() {
            return true;
        }
        if Instant::now() > deadline {
            warn!(
                vm,
                "the destination QEMU had the whole stream and is still there: it may start the guest"
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Tells the destination QEMU of a stream that did not complete to quit (what it does by
/// itself on a stream that ends early, except on one cut in its last section).
///
/// Whether it was left as it is, under post-copy.
async fn quit(feed: &Feed, vm: &str) -> bool {
    let mut qmp = feed.qmp.lock().await;
    // Read once the monitor is ours: the end may have gone in while we waited for it.
    let end_sent = lock(&feed.state).end_sent;
    if feed.ret.is_some() {
        // With post-copy on, QEMU gets every byte as it comes, and may have loaded the guest
        // and run it (after a pre-copy end, or in post-copy, where it holds the only running
        // state while pages are still at the source): only a QEMU still waiting for its
        // guest is told to quit. Any other is left as it is, for its owner (QEMU pauses a
        // post-copy guest while pages are missing; `migrate-recover` can pick it up).
        let status = match tokio::time::timeout(Duration::from_secs(5), qmp.status()).await {
            Ok(Ok(s)) => s,
            // Its monitor closed: QEMU is gone, nothing is left to resume, unless something
            // still listens there (this connection broke, not QEMU).
            Ok(Err(QmpError::Io { path, what })) => {
                if let Some(e) = monitor_gone(&path).await {
                    debug!(vm, "destination QEMU gone ({what}; its monitor: {e})");
                    return false;
                }
                warn!(
                    vm,
                    "the destination QEMU's monitor failed ({what}), and QEMU still listens there: left as it is"
                );
                feed.left.store(true, Ordering::SeqCst);
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            // Its main thread waits (on a page still at the source): no more commands in
            // band, which would queue in QEMU until it stops reading the monitor, out-of-band
            // ones too.
            Err(_) => {
                warn!(vm, "the destination QEMU does not answer: left as it is");
                feed.left.store(true, Ordering::SeqCst);
                return true;
            }
        };
        // Nor one whose post-copy began, before it started the guest: the source has stopped
        // it for good, and a recovery (`MIGRATION_QEMU_RECOVER`) may pick it up.
        let migration =
            match tokio::time::timeout(Duration::from_secs(5), qmp.execute("query-migrate", None))
                .await
            {
                Ok(Ok(m)) => m
                    .get("status")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            };
        if status != "inmigrate" || migration.starts_with("postcopy") {
            warn!(
                vm,
                %status,
                %migration,
                "the incoming migration failed after the guest may have started here: the destination QEMU is left as it is"
            );
            feed.left.store(true, Ordering::SeqCst);
            return true;
        }
    } else if has_run(&mut qmp, vm, end_sent).await {
        // It loaded the guest and started it after all: an abort that came while the
        // finish waited for the load (the source gave the finish up, and stays paused), or
        // a stream that failed while its end was going in (the finish then says the outcome
        // is unknown). Quitting would lose what the guest did since; left to its owner.
        return false;
    }
    tell_quit(&mut qmp, vm, "its stream did not complete").await;
    false
}

/// Writes `bytes` to QEMU's migration socket, failing with `TimedOut` if it takes nothing
/// for `limit`.
async fn write_bounded(
    sock: &mut OwnedWriteHalf,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        // Each write waits for room: a QEMU that reads slowly is not given up, one that
        // reads nothing is.
        match tokio::time::timeout(limit, sock.write(rest)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => rest = &rest[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("it took nothing for {limit:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Feeds `vm`'s QEMU; `entry`: where the feed is listed, to leave the list when its source
/// is gone (nothing else would remove it then).
async fn feed_loop(feed: Arc<Feed>, mut sock: OwnedWriteHalf, vm: String, entry: Listing) {
    let mut gone = false;
    // QEMU's end-of-state marker and what follows it (and the last few bytes, where one may
    // begin) stay here until FINISH's digest matches the whole stream: QEMU cannot complete
    // the load (nor start the guest) on a stream other than the one the source QEMU sent, nor
    // on one this agent cut short by dying (see `end_hold`). Not under post-copy: there the
    // source QEMU ends its stream (and the FINISH comes) only once this QEMU has loaded it
    // and said so on its return path, and the guest may run here before the stream ends
    // anyway. The digest is still checked at the end, and a mismatch fails the migration.
    let hold = feed.ret.is_none();
    let mut held = EndHold::default();
    let mut hasher = blake3::Hasher::new();
    let r = async {
        loop {
            // The block stays in `ready` while it is written: taken out, it would leave a
            // gap before every block that arrives meanwhile, and those are taken at once
            // (see `push`), however slowly QEMU reads.
            let (next, end, finished) = {
                let s = lock(&feed.state);
                let next = s.next;
                // Every announced segment went in: the source's digest to check. Past it
                // nothing more goes to QEMU (nor the held byte before the check).
                let end = s.total.filter(|&(t, _)| next >= t).map(|(_, d)| d);
                let block = s.ready.get(&next).filter(|_| end.is_none()).cloned();
                (block.map(|p| (next, p)), end, s.total.is_some())
            };
            match (next, end) {
                (Some((seq, block)), _) => {
                    hasher.update(&block);
                    let stopped = |e: std::io::Error| {
                        format!(
                            "the destination QEMU stopped reading the stream at block {seq}: {e}"
                        )
                    };
                    // A QEMU that takes nothing for as long as a source may go without a block
                    // is given up: otherwise, its source gone too, nothing would end the feed.
                    let limit = feed.idle_limit.max(STALL);
                    let w = if !hold {
                        write_bounded(&mut sock, &block, limit).await
                    } else {
                        held.push(block.clone());
                        let mut w = Ok(());
                        for part in held.release() {
                            w = write_bounded(&mut sock, &part, limit).await;
                            if w.is_err() {
                                break;
                            }
                        }
                        w
                    };
                    if w.as_ref()
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
                        && !finished
                    {
                        gone = true;
                    }
                    w.map_err(stopped)?;
                    let mut s = lock(&feed.state);
                    s.ready.remove(&seq);
                    s.next = seq + 1;
                    s.buffered = s.buffered.saturating_sub(block.len());
                    s.fed_bytes += block.len() as u64;
                    s.last_progress = Some(Instant::now());
                    drop(s);
                    feed.wake.notify_waiters();
                }
                (None, Some(want)) => {
                    let got = hasher.finalize();
                    if got.as_bytes() != &want {
                        return Err(format!(
                            "the stream's BLAKE3 is {got}, the source's {}: QEMU got other bytes \
                             than the source's QEMU sent, and does not get its end",
                            blake3::Hash::from_bytes(want)
                        ));
                    }
                    if hold {
                        debug!(
                            vm,
                            kept_from = held.kept_from(),
                            marker = held.marker_kept(),
                            "stream verified; its end goes to QEMU"
                        );
                    }
                    {
                        let mut s = lock(&feed.state);
                        s.end_sent = true;
                        // The finish's wait for QEMU counts from here: writing the end (up
                        // to 16 MiB) is progress too.
                        s.last_progress = Some(Instant::now());
                    }
                    for part in held.rest() {
                        write_bounded(&mut sock, &part, STALL).await.map_err(|e| {
                            format!(
                                "the destination QEMU stopped reading the stream at its end: {e}"
                            )
                        })?;
                    }
                    // Under post-copy QEMU may have closed its side already (it loaded the
                    // stream and said so on the return path).
                    if let Err(e) = sock.shutdown().await
                        && hold
                    {
                        return Err(format!("cannot close the stream: {e}"));
                    }
                    debug!(vm, "stream fed, verified and closed");
                    return Ok::<(), String>(());
                }
                (None, None) => {
                    let idle = lock(&feed.state).last_progress.map(|t| t.elapsed());
                    if !finished && idle.is_some_and(|i| i > feed.idle_limit) {
                        gone = true;
                        return Err(format!(
                            "no block of the stream to feed for {:?}, and no finish: the \
                             source is gone",
                            feed.idle_limit
                        ));
                    }
                    // Woken by a block or FINISH; the timeout only re-checks.
                    let _ = tokio::time::timeout(Duration::from_millis(500), feed.kick.notified())
                        .await;
                }
            }
        }
    }
    .await;
    let mut left = false;
    if let Err(e) = &r {
        warn!(vm, "feeding the destination QEMU failed: {e}");
        // Before the socket closes (see `Feeds::remove`).
        left = quit(&feed, &vm).await;
    }
    drop(sock);
    let mut s = lock(&feed.state);
    match r {
        Ok(()) => s.closed = true,
        Err(e) => {
            s.error = Some(e);
            s.ready.clear();
            s.buffered = 0;
        }
    }
    drop(s);
    feed.wake.notify_waiters();
    // No finish or abort will come: the feed goes, and with it its hold on QEMU's monitor
    // (one client at a time) and its reader of QEMU's return path. Not when QEMU was left in
    // post-copy: a source may still come back to resume it (`MIGRATION_QEMU_RECOVER`), and
    // QEMU's main thread, waiting for a page, may answer no monitor but this one.
    if gone {
        if !left && let Some(map) = entry.feeds.upgrade() {
            let mut m = lock(&map);
            let listed = m.get(&entry.key).is_some_and(|f| Arc::ptr_eq(f, &feed));
            if listed {
                m.remove(&entry.key);
            }
            drop(m);
            // Ended here, once (an ABORT or OPEN that removed it first counted it).
            if listed
                && !feed.ended.swap(true, Ordering::SeqCst)
                && let Some(g) = entry.given_up.upgrade()
            {
                *lock(&g).entry(entry.key.0.clone()).or_insert(0) += 1;
            }
        }
        if let Some(t) = lock(&feed.ret_task).take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A destination QEMU waiting for `vm`: a monitor in `inmigrate` that notes `quit`, and
    /// an incoming socket; yields what it got and whether `quit` came before the stream ended.
    fn fake_qemu(dir: &Path, vm: &str) -> tokio::task::JoinHandle<(Vec<u8>, bool)> {
        fake_qemu_gated(dir, vm, None)
    }

    /// As [`fake_qemu`], reading its stream only once `gate` is notified (if given).
    fn fake_qemu_gated(
        dir: &Path,
        vm: &str,
        gate: Option<Arc<Notify>>,
    ) -> tokio::task::JoinHandle<(Vec<u8>, bool)> {
        fake_qemu_full(dir, vm, gate, None, None, None, None)
    }

    /// As [`fake_qemu_gated`]; its guest memory a file at `mem_path` (if given), and writing
    /// `back` on its incoming socket (its return path), closed once the notify comes. Its
    /// monitor connection closes once `die` is notified: QEMU exits, or with `true` only that
    /// connection breaks (QEMU still listens).
    fn fake_qemu_full(
        dir: &Path,
        vm: &str,
        gate: Option<Arc<Notify>>,
        mem_path: Option<String>,
        back: Option<(Vec<u8>, Arc<Notify>)>,
        seen: Option<Arc<Mutex<Vec<u8>>>>,
        die: Option<(Arc<Notify>, bool)>,
    ) -> tokio::task::JoinHandle<(Vec<u8>, bool)> {
        let quit = Arc::new(AtomicBool::new(false));
        let qmp = UnixListener::bind(dir.join(format!("{vm}.qmp"))).unwrap();
        let q2 = quit.clone();
        tokio::spawn(async move {
            let (s, _) = qmp.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            loop {
                let died = async {
                    match &die {
                        Some((d, _)) => d.notified().await,
                        None => std::future::pending().await,
                    }
                };
                let line = tokio::select! {
                    l = lines.next_line() => l,
                    () = died => {
                        if die.as_ref().is_some_and(|(_, listens)| *listens) {
                            drop(lines);
                            drop(w);
                            std::future::pending::<()>().await;
                        }
                        break;
                    }
                };
                let Ok(Some(line)) = line else { break };
                let answer = if line.contains("query-status") {
                    "{\"return\": {\"status\": \"inmigrate\", \"running\": false}}\n".to_string()
                } else if line.contains("qom-list") {
                    let list = match &mem_path {
                        Some(_) => serde_json::json!([
                            {"name": "rng0", "type": "child<rng-random>"},
                            {"name": "ram0", "type": "child<memory-backend-file>"}
                        ]),
                        None => serde_json::json!([]),
                    };
                    format!("{}\n", serde_json::json!({ "return": list }))
                } else if line.contains("qom-get") {
                    format!("{}\n", serde_json::json!({ "return": mem_path }))
                } else {
                    q2.store(line.contains("\"quit\""), Ordering::SeqCst);
                    "{\"return\": {}}\n".to_string()
                };
                if w.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let incoming = UnixListener::bind(dir.join(format!("{vm}.incoming"))).unwrap();
        tokio::spawn(async move {
            let (s, _) = incoming.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            if let Some((bytes, close)) = back {
                w.write_all(&bytes).await.unwrap();
                tokio::spawn(async move {
                    close.notified().await;
                    w.shutdown().await.unwrap();
                });
            }
            if let Some(g) = gate {
                g.notified().await;
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if let Some(seen) = &seen {
                    lock(seen).extend_from_slice(&buf[..n]);
                }
            }
            (got, quit.load(Ordering::SeqCst))
        })
    }

    /// Pushes `seq` and says whether it was taken within `within`.
    async fn taken(
        feeds: &Arc<Feeds>,
        peer: &NodeId,
        seq: u64,
        len: usize,
        within: Duration,
    ) -> bool {
        let (f, p) = (feeds.clone(), peer.clone());
        let mut push = tokio::spawn(async move {
            f.push(&p, "vm", seq, Bytes::from(vec![seq as u8; len]), &[])
                .await
        });
        match tokio::time::timeout(within, &mut push).await {
            Ok(r) => {
                r.unwrap().unwrap();
                true
            }
            Err(_) => {
                push.abort();
                false
            }
        }
    }

    #[test]
    fn the_filesystem_of_a_path_is_its_longest_mount_point() {
        let mounts = "sysfs /sys sysfs rw 0 0\n/dev/sda1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n\
                      none /dev/hugepages hugetlbfs rw 0 0\ntmpfs /mnt/my\\040vm tmpfs rw 0 0\n";
        let fs = |p: &str| filesystem_of(mounts, Path::new(p));
        assert_eq!(fs("/dev/shm/vm.ram"), Some("tmpfs"));
        assert_eq!(fs("/dev/hugepages/x"), Some("hugetlbfs"));
        assert_eq!(fs("/var/lib/vm.ram"), Some("ext4"));
        // A prefix of a name is not a mount point that holds it.
        assert_eq!(fs("/dev/shmem/vm.ram"), Some("ext4"));
        assert_eq!(fs("/mnt/my vm/ram"), Some("tmpfs"));
        assert_eq!(filesystem_of("", Path::new("/x")), None);
    }

    #[tokio::test]
    async fn blocks_beyond_a_gap_do_not_hold_back_the_blocks_that_close_it() {
        const B: usize = 512 << 10;
        let dir = tempfile::tempdir().unwrap();
        // QEMU reads nothing until the gate opens.
        let gate = Arc::new(Notify::new());
        let qemu = fake_qemu_gated(dir.path(), "vm", Some(gate.clone()));
        let (feeds, peer) = opened(dir.path()).await;
        let t = Duration::from_millis(300);
        // Block 0 goes to the feeder, which waits on QEMU; block 1 is still on its way, and
        // 5 MiB after it arrive.
        assert!(taken(&feeds, &peer, 0, B, t).await);
        for seq in 2..12 {
            assert!(
                taken(&feeds, &peer, seq, B, t).await,
                "block {seq} after the gap"
            );
        }
        // Block 1 closes the gap: what QEMU can be fed now is block 0 (512 KiB), so it is
        // taken, although 5 MiB more wait beyond it.
        assert!(
            taken(&feeds, &peer, 1, B, t).await,
            "the block closing the gap waits"
        );
        // Past that the run from block 0 on is far over the bound: the next one waits.
        assert!(
            !taken(&feeds, &peer, 12, B, t).await,
            "the run from the next block is not bounded"
        );
        gate.notify_one();
        assert!(taken(&feeds, &peer, 12, B, Duration::from_secs(3)).await);
        let digest = {
            let mut h = blake3::Hasher::new();
            for seq in 0..13u8 {
                h.update(&vec![seq; B]);
            }
            *h.finalize().as_bytes()
        };
        let (got, _) = finished(&feeds, &peer, 13, digest, qemu, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 13 * B);
        for (i, chunk) in got.chunks(B).enumerate() {
            assert!(
                chunk.iter().all(|&b| b == i as u8),
                "block {i} out of order"
            );
        }
    }

    #[tokio::test]
    async fn under_post_copy_the_return_path_is_carried_and_every_byte_fed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let close = Arc::new(Notify::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let qemu = fake_qemu_full(
            dir.path(),
            "vm",
            None,
            None,
            Some((b"pong-and-page-request".to_vec(), close.clone())),
            Some(seen.clone()),
            None,
        );
        let feeds = Arc::new(Feeds::new(dir.path()));
        let peer = NodeId::new("src").unwrap();
        let detail = feeds
            .open(&peer, "vm", true, Duration::ZERO, &[])
            .await
            .unwrap();
        assert_eq!(detail, r#"{"postcopy":true}"#);
        // From any place the asker holds up to: the rest.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < 21 && Instant::now() < deadline {
            let (b, end) = feeds
                .returned(&peer, "vm", got.len() as u64, 1 << 20, &[])
                .await
                .unwrap();
            assert!(!end);
            got.extend(b);
        }
        assert_eq!(got, b"pong-and-page-request");
        // Nothing new: answered empty within the wait, not held.
        let t = Instant::now();
        let (b, end) = feeds.returned(&peer, "vm", 21, 1 << 20, &[]).await.unwrap();
        assert!(b.is_empty() && !end);
        assert!(t.elapsed() < RETURN_WAIT + Duration::from_secs(1));
        // Asked again from an earlier place: those bytes were dropped when the asker said it
        // holds them. Beyond what came: refused too.
        let e = feeds
            .returned(&peer, "vm", 4, 1 << 20, &[])
            .await
            .unwrap_err();
        assert!(e.contains("bytes 21..21 are held"), "{e}");
        let e = feeds
            .returned(&peer, "vm", 99, 1 << 20, &[])
            .await
            .unwrap_err();
        assert!(e.contains("from byte 99"), "{e}");
        // The stream goes to QEMU whole as it comes, its last byte too, before any FINISH:
        // under post-copy QEMU ends its side only once it has loaded it.
        feeds
            .push(&peer, "vm", 0, Bytes::from_static(b"QEVM and all"), &[])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&seen).len() < 12 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*lock(&seen), b"QEVM and all", "fed whole before the finish");
        close.notify_one();
        let (b, end) = feeds.returned(&peer, "vm", 21, 1 << 20, &[]).await.unwrap();
        let (b, end) = if !end && b.is_empty() {
            feeds.returned(&peer, "vm", 21, 1 << 20, &[]).await.unwrap()
        } else {
            (b, end)
        };
        assert!(
            b.is_empty() && end,
            "the return path ends when QEMU closes it"
        );
        // The FINISH checks the digest and closes the stream.
        let digest = *blake3::hash(b"QEVM and all").as_bytes();
        let (got, quit) = finished(&feeds, &peer, 1, digest, qemu, Duration::from_secs(5)).await;
        assert_eq!(got, b"QEVM and all");
        assert!(!quit);
    }

    #[tokio::test]
    async fn before_the_finish_qemu_has_the_stream_up_to_its_end_of_state_marker() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let qemu = fake_qemu_full(dir.path(), "vm", None, None, None, Some(seen.clone()), None);
        let (feeds, peer) = opened(dir.path()).await;
        // Pages and devices, then QEMU's end: the marker (cut across two blocks here) and a
        // 20 kB VM description.
        let mut stream = b"QEVM".to_vec();
        stream.extend((0..50_000u32).map(|i| (i % 251) as u8));
        let eof = stream.len();
        stream.extend_from_slice(&[0, 6]);
        stream.extend_from_slice(&20_000u32.to_be_bytes());
        stream.push(b'{');
        stream.extend(std::iter::repeat_n(b'x', 20_000 - 2));
        stream.push(b'}');
        let cuts = [0, 30_000, eof + 3, eof + 10_000, stream.len()];
        for (seq, w) in cuts.windows(2).enumerate() {
            let block = Bytes::copy_from_slice(&stream[w[0]..w[1]]);
            feeds
                .push(&peer, "vm", seq as u64, block, &[])
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&seen).len() < eof && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // An agent that died now would leave QEMU a stream that fails to load.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            *lock(&seen) == stream[..eof],
            "{} bytes fed",
            lock(&seen).len()
        );
        // The finish's digest matches: the rest goes.
        let digest = *blake3::hash(&stream).as_bytes();
        let (got, quit) = finished(&feeds, &peer, 4, digest, qemu, Duration::from_secs(5)).await;
        assert!(got == stream, "{} of {} bytes", got.len(), stream.len());
        assert!(!quit);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_qemu_reading_slowly_is_fed_and_one_reading_nothing_is_given_up() {
        let bytes = vec![7u8; 4 << 20];
        let limit = Duration::from_millis(300);
        // Reads 64 KiB every 30 ms: the whole takes far longer than the limit.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_r, mut w) = ours.into_split();
        let reader = tokio::spawn(async move {
            let mut theirs = theirs;
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0usize;
            while got < 4 << 20 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let n = theirs.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got += n;
            }
            got
        });
        let t = Instant::now();
        write_bounded(&mut w, &bytes, limit).await.unwrap();
        assert_eq!(reader.await.unwrap(), 4 << 20);
        assert!(
            t.elapsed() > limit,
            "the reader was not slow: {:?}",
            t.elapsed()
        );
        // Reads nothing: given up once its socket is full and the limit passes.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let (_r, mut w) = ours.into_split();
        let e = write_bounded(&mut w, &bytes, limit).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("took nothing"), "{e}");
    }

    /// Sends the finish of `n` blocks with `digest` (in a task of its own: it waits for QEMU
    /// to say it loaded the VM, which a fake never does), and takes what the fake QEMU got
    /// within `within`, and whether it was told to quit.
    async fn finished(
        feeds: &Arc<Feeds>,
        peer: &NodeId,
        n: u64,
        digest: [u8; 32],
        qemu: tokio::task::JoinHandle<(Vec<u8>, bool)>,
        within: Duration,
    ) -> (Vec<u8>, bool) {
        let fin = {
            let (f, p) = (feeds.clone(), peer.clone());
            tokio::spawn(async move { f.finish(&p, "vm", n, &digest, &[]).await })
        };
        let got = tokio::time::timeout(within, qemu).await.unwrap().unwrap();
        fin.abort();
        got
    }

    /// Feeds in `dir` with a pre-copy stream of VM "vm" from "src" open (its QEMU waiting).
    async fn opened(dir: &Path) -> (Arc<Feeds>, NodeId) {
        let feeds = Arc::new(Feeds::new(dir));
        let peer = NodeId::new("src").unwrap();
        feeds
            .open(&peer, "vm", false, Duration::ZERO, &[])
            .await
            .unwrap();
        (feeds, peer)
    }

    /// `qemu-system-x86_64` on the `PATH`.
    fn qemu_binary() -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    }

    /// A bare QEMU (`pc`, 64 MiB, no guest, paused) with its monitor at `qmp` and, if given,
    /// waiting for a migration at `incoming`.
    fn bare_qemu(qemu: &Path, qmp: &Path, incoming: Option<&Path>) -> std::process::Child {
        let mut c = std::process::Command::new(qemu);
        c.args([
            "-machine",
            "pc,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-m", "64M", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        match incoming {
            Some(i) => c.arg("-incoming").arg(format!("unix:{}", i.display())),
            None => c.arg("-S"),
        };
        c.spawn().unwrap()
    }

    async fn wait_for(paths: &[&Path]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !paths.iter().all(|p| p.exists()) {
            assert!(Instant::now() < deadline, "QEMU made no socket {paths:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits at most `within` for `child` to exit.
    async fn exited(
        child: &mut std::process::Child,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// With a real QEMU: a destination agent that dies (its feed gone without a word to QEMU)
    /// after feeding all it may before the finish leaves its QEMU a load that fails, so QEMU
    /// exits and cannot start the guest while the source resumes its own. Cut inside the VM
    /// description instead (the last byte held back, as before), QEMU completes the load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_qemu_fails_to_load_what_is_fed_before_the_finish() {
        let Some(qemu) = qemu_binary() else {
            eprintln!("skipped: qemu-system-x86_64 is not installed (scripts/test.sh installs it)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // A stream as QEMU sends it.
        let (src_qmp, file) = (dir.path().join("src.qmp"), dir.path().join("stream.bin"));
        let mut src = bare_qemu(&qemu, &src_qmp, None);
        wait_for(&[&src_qmp]).await;
        let mut q = Qmp::connect(&src_qmp, Duration::from_secs(10))
            .await
            .unwrap();
        let uri = format!("exec:cat > {}", file.display());
        q.execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = q.execute("query-migrate", None).await.unwrap();
            match info["status"].as_str() {
                Some("completed") => break,
                Some("failed") => panic!("QEMU's migration failed: {info}"),
                _ => assert!(Instant::now() < deadline, "migration not done: {info}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(q);
        src.kill().unwrap();
        src.wait().unwrap();
        let stream = std::fs::read(&file).unwrap();

        // Through a feed whose task then ends without a word to QEMU.
        let qemu_dir = dir.path().join("qemu");
        std::fs::create_dir(&qemu_dir).unwrap();
        let (qmp, incoming) = (qemu_dir.join("vm.qmp"), qemu_dir.join("vm.incoming"));
        let mut dst = bare_qemu(&qemu, &qmp, Some(&incoming));
        wait_for(&[&qmp, &incoming]).await;
        let feeds = Feeds::new(&qemu_dir);
        let peer = NodeId::new("src").unwrap();
        feeds
            .open(&peer, "vm", false, Duration::ZERO, &[])
            .await
            .unwrap();
        for (seq, block) in stream.chunks(64 << 10).enumerate() {
            let block = Bytes::copy_from_slice(block);
            feeds
                .push(&peer, "vm", seq as u64, block, &[])
                .await
                .unwrap();
        }
        let feed = lock(&feeds.feeds)
            .get(&(peer.clone(), "vm".to_string()))
            .cloned()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while lock(&feed.state).next < stream.len().div_ceil(64 << 10) as u64 {
            assert!(Instant::now() < deadline, "the stream was not fed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let task = lock(&feed.task).take().unwrap();
        task.abort();
        let _ = task.await;
        let st = exited(&mut dst, Duration::from_secs(20)).await;
        assert!(
            st.is_some_and(|st| !st.success()),
            "the destination QEMU did not fail the load: {st:?}"
        );
        drop((feed, feeds));

        // The stream cut inside its VM description: QEMU takes it as loaded.
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&incoming);
        let mut dst = bare_qemu(&qemu, &qmp, Some(&incoming));
        wait_for(&[&qmp, &incoming]).await;
        let mut sock = UnixStream::connect(&incoming).await.unwrap();
        sock.write_all(&stream[..stream.len() - 1]).await.unwrap();
        drop(sock);
        let mut q = Qmp::connect(&qmp, Duration::from_secs(10)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = q.execute("query-migrate", None).await.unwrap();
            if info["status"].as_str() == Some("completed") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no load of the cut stream: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(dst.try_wait().unwrap().is_none(), "QEMU exited");
        dst.kill().unwrap();
        dst.wait().unwrap();
    }

    #[tokio::test]
    async fn post_copy_is_refused_for_guest_memory_in_a_file_off_tmpfs() {
        let dir = tempfile::tempdir().unwrap();
        // A filesystem userfaultfd does not take, whatever this machine's /tmp is.
        let _qemu = fake_qemu_full(
            dir.path(),
            "vm",
            None,
            Some("/proc/self".into()),
            None,
            None,
            None,
        );
        let feeds = Feeds::new(dir.path());
        let peer = NodeId::new("src").unwrap();
        let detail = feeds
            .open(&peer, "vm", true, Duration::ZERO, &[])
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&detail).unwrap();
        assert_eq!(v["postcopy"], false, "{v}");
        let why = v["why"].as_str().unwrap();
        assert!(
            why.contains("ram0") && why.contains("proc") && why.contains("/proc/self"),
            "{why}"
        );
        // Opened all the same, without a return path.
        let e = feeds
            .returned(&peer, "vm", 0, 1 << 20, &[])
            .await
            .unwrap_err();
        assert!(e.contains("without post-copy"), "{e}");
    }

    /// A stream of VM "vm" from "src" into a fake QEMU in `dir`, given up after 300 ms
    /// without a block plus `wait` (its source's), opened and fed its first block.
    async fn fed_once(
        dir: &Path,
        wait: Duration,
    ) -> (Feeds, tokio::task::JoinHandle<(Vec<u8>, bool)>, NodeId) {
        let qemu = fake_qemu(dir, "vm");
        let mut feeds = Feeds::new(dir);
        feeds.idle_limit = Duration::from_millis(300);
        let peer = NodeId::new("src").unwrap();
        feeds.open(&peer, "vm", false, wait, &[]).await.unwrap();
        feeds
            .push(&peer, "vm", 0, Bytes::from_static(b"QEVM and more"), &[])
            .await
            .unwrap();
        (feeds, qemu, peer)
    }

    #[tokio::test]
    async fn a_stream_left_without_blocks_or_finish_is_given_up_and_qemu_quits() {
        let dir = tempfile::tempdir().unwrap();
        let (feeds, qemu, peer) = fed_once(dir.path(), Duration::ZERO).await;
        // The source goes silent: within the limit and one re-check, QEMU is told to quit,
        // then its stream closes without the bytes held back (the last few: no end-of-state
        // marker in this stream).
        let (got, quit) = tokio::time::timeout(Duration::from_secs(5), qemu)
            .await
            .unwrap()
            .unwrap();
        assert!(quit, "QEMU not told to quit before its stream closed");
        assert_eq!(got, b"QEVM an");
        // And the feed is gone (no finish or abort would remove it), its monitor released.
        let e = feeds
            .push(&peer, "vm", 1, Bytes::from_static(b"late"), &[])
            .await
            .unwrap_err();
        assert!(e.contains("no incoming migration"), "{e}");
        assert!(lock(&feeds.feeds).is_empty());
        // Counted once, as a migration that ended here.
        assert_eq!(feeds.take_given_up().get(&peer), Some(&1));
        assert!(feeds.take_given_up().is_empty());
    }

    /// A post-copy feed open on a fake QEMU whose monitor connection then closes: QEMU exits,
    /// or with `listens` only that connection breaks. Its feeds, for the peer "src", VM "vm".
    async fn post_copy_monitor_lost(dir: &Path, listens: bool) -> Feeds {
        let die = Arc::new(Notify::new());
        let close = Arc::new(Notify::new());
        let _qemu = fake_qemu_full(
            dir,
            "vm",
            None,
            None,
            Some((Vec::new(), close)),
            None,
            Some((die.clone(), listens)),
        );
        let feeds = Feeds::new(dir);
        let peer = NodeId::new("src").unwrap();
        let detail = feeds
            .open(&peer, "vm", true, Duration::ZERO, &[])
            .await
            .unwrap();
        assert_eq!(detail, r#"{"postcopy":true}"#);
        die.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
        feeds
    }

    /// A post-copy whose QEMU exited (its monitor closed) is not left for a resume: the
    /// abort ends it (counted), and it is not counted as paused.
    #[tokio::test]
    async fn a_post_copy_whose_qemu_is_gone_ends_on_abort_and_is_not_paused() {
        let dir = tempfile::tempdir().unwrap();
        let feeds = post_copy_monitor_lost(dir.path(), false).await;
        let peer = NodeId::new("src").unwrap();
        assert_eq!(feeds.abort(&peer, "vm", &[]).await, Ok(true));
        assert!(feeds.paused().is_empty());
        assert!(lock(&feeds.feeds).is_empty());
        // Nothing left to end.
        assert_eq!(feeds.abort(&peer, "vm", &[]).await, Ok(false));
    }

    /// A post-copy whose monitor connection broke while QEMU still listens is left as it is
    /// for a resume (not ended, and counted as paused).
    #[tokio::test]
    async fn a_post_copy_whose_monitor_connection_broke_is_left_for_a_resume() {
        let dir = tempfile::tempdir().unwrap();
        let feeds = post_copy_monitor_lost(dir.path(), true).await;
        let peer = NodeId::new("src").unwrap();
        assert_eq!(feeds.abort(&peer, "vm", &[]).await, Ok(false));
        assert_eq!(feeds.paused().get(&peer), Some(&1));
        assert_eq!(lock(&feeds.feeds).len(), 1);
    }

    /// A finish that waits for a block still missing (its source dialling a lost link again)
    /// waits as long as the stream may go without one, not QEMU's stall limit.
    #[tokio::test]
    async fn a_finish_waits_for_a_missing_block_as_long_as_the_source_dials() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "vm");
        let mut feeds = Feeds::new(dir.path());
        feeds.idle_limit = Duration::from_millis(300);
        feeds.stall = Duration::from_millis(200);
        let feeds = Arc::new(feeds);
        let peer = NodeId::new("src").unwrap();
        feeds
            .open(&peer, "vm", false, Duration::from_secs(2), &[])
            .await
            .unwrap();
        let (a, b) = (b"QEVM first ".to_vec(), b"and second".to_vec());
        feeds
            .push(&peer, "vm", 0, Bytes::from(a.clone()), &[])
            .await
            .unwrap();
        let digest = *blake3::hash(&[a.clone(), b.clone()].concat()).as_bytes();
        let fin = {
            let (f, p) = (feeds.clone(), peer.clone());
            tokio::spawn(async move { f.finish(&p, "vm", 2, &digest, &[]).await })
        };
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            !fin.is_finished(),
            "the finish gave up on the missing block"
        );
        feeds
            .push(&peer, "vm", 1, Bytes::from(b.clone()), &[])
            .await
            .unwrap();
        // The whole stream reached QEMU (this fake never says it loaded it).
        let (got, _) = tokio::time::timeout(Duration::from_secs(10), qemu)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, [a, b].concat());
        fin.abort();
    }

    /// Which destination QEMUs are left as they are rather than told to quit: those that
    /// have run the guest; not one waiting, loading, or loaded and held paused (`-S`).
    #[test]
    fn a_qemu_that_ran_the_guest_is_told_apart() {
        for s in ["inmigrate", "finish-migrate", "paused", "prelaunch"] {
            assert!(!guest_ran(s), "{s}");
        }
        for s in [
            "running",
            "shutdown",
            "guest-panicked",
            "io-error",
            "internal-error",
        ] {
            assert!(guest_ran(s), "{s}");
        }
    }

    /// A finish whose QEMU had the whole stream but did not say it loaded it: refused as
    /// such only once QEMU is gone; while it is still there, its answer says the guest may
    /// start there (the source must not resume its own).
    #[tokio::test]
    async fn a_finish_after_the_whole_stream_says_whether_qemu_is_gone() {
        for exits in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let die = Arc::new(Notify::new());
            let _qemu = fake_qemu_full(
                dir.path(),
                "vm",
                None,
                None,
                None,
                None,
                Some((die.clone(), false)),
            );
            let mut feeds = Feeds::new(dir.path());
            feeds.stall = Duration::from_millis(200);
            feeds.gone_within = Duration::from_millis(500);
            let feeds = Arc::new(feeds);
            let peer = NodeId::new("src").unwrap();
            feeds
                .open(&peer, "vm", false, Duration::ZERO, &[])
                .await
                .unwrap();
            let a = b"QEVM the whole stream".to_vec();
            feeds
                .push(&peer, "vm", 0, Bytes::from(a.clone()), &[])
                .await
                .unwrap();
            if exits {
                // QEMU exits once it has it all (its monitor closes, nothing listens).
                tokio::time::sleep(Duration::from_millis(100)).await;
                die.notify_one();
            }
            let digest = *blake3::hash(&a).as_bytes();
            let (r, _) = tokio::time::timeout(
                Duration::from_secs(10),
                feeds.finish(&peer, "vm", 1, &digest, &[]),
            )
            .await
            .unwrap();
            let e = r.unwrap_err();
            assert_eq!(e.starts_with(OUTCOME_UNKNOWN), !exits, "{e}");
            if exits {
                assert!(e.contains("its QEMU quit"), "{e}");
            } else {
                assert!(e.contains("may start the guest"), "{e}");
            }
        }
    }

    /// An earlier migration still listed when its source opens again is ended once.
    #[tokio::test]
    async fn an_open_migration_left_behind_is_ended_once_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "vm");
        let feeds = Feeds::new(dir.path());
        let peer = NodeId::new("src").unwrap();
        assert!(!feeds.end_earlier(&peer, "vm").await, "nothing open yet");
        feeds
            .open(&peer, "vm", false, Duration::ZERO, &[])
            .await
            .unwrap();
        assert!(feeds.end_earlier(&peer, "vm").await);
        assert!(!feeds.end_earlier(&peer, "vm").await);
        let (_, quit) = tokio::time::timeout(Duration::from_secs(5), qemu)
            .await
            .unwrap()
            .unwrap();
        assert!(quit, "the earlier QEMU was not told to quit");
    }

    /// A source that keeps dialling a lost link for a while (its OPEN's wait) is waited for
    /// that much longer than the destination's own limit.
    #[tokio::test]
    async fn a_stream_is_waited_for_as_long_as_its_source_keeps_dialling() {
        let dir = tempfile::tempdir().unwrap();
        let (_feeds, qemu, _peer) = fed_once(dir.path(), Duration::from_secs(2)).await;
        let silent = Instant::now();
        let (got, quit) = tokio::time::timeout(Duration::from_secs(10), qemu)
            .await
            .unwrap()
            .unwrap();
        assert!(
            silent.elapsed() >= Duration::from_millis(2300),
            "given up after {:?}",
            silent.elapsed()
        );
        assert!(quit, "QEMU not told to quit before its stream closed");
        assert_eq!(got, b"QEVM an");
    }
}
