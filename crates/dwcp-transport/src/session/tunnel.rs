//! Tunnels: a live byte stream of unknown length (a QEMU migration stream) carried as
//! numbered blocks (`TUNNEL_DATA`) over several connections of one session, without the
//! per-object round trips of files. The receiver acknowledges each block once it has taken
//! it (`TUNNEL_ACK`); a block on a connection that dies goes out again on another, and so
//! does one stuck on its connection while later blocks are acknowledged; a block the receiver
//! cannot resolve against its cache goes out again raw. The caller bounds what is beyond the
//! acknowledged prefix (its window, [`Tunnel::window_acked`]), so memory stays bounded at
//! both ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dwcp_wire::data::{self, SessionJoin, TunnelAck, TunnelHeader};
use dwcp_wire::msg;
use dwcp_wire::{ErrorCode, FrameType, NodeId};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::send::{RateLimit, SendError};
use super::tcp::{TcpCounts, TcpWatch};
use crate::conn::{ConnError, Connection, Endpoint, Stage, connect_to};

/// Bytes a tunnel connection's socket may hold not yet sent (`TCP_NOTSENT_LOWAT`) across a
/// long path (a handshake of 10 ms or more), well under the sessions' default: a writer takes
/// the next block only once its socket has sent nearly all it was given, so blocks go to the
/// connections that are moving, not into the queue of one whose congestion window a loss has
/// just cut. Across `lossy` with the endpoint's 256 KiB, the tunnel's connections held 20-240
/// KB each unsent during QEMU's last iterations (`ss -tin`, 2026-12-04): about half of the
/// window waited in local buffers, its blocks acknowledged after two round trips rather than
/// one, and what the guest's pause waits for queued there too. On `dc` the same limit made
/// the pause longer (blocks held for a second behind a destination that stopped reading while
/// its QEMU caught up), so short paths keep the endpoint's setting.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 32 << 10;

/// Sets a tunnel connection's socket up (see [`TUNNEL_NOTSENT_LOWAT`]). Best effort: a kernel
/// without the option only queues more.
pub fn tune(conn: &Connection<tokio::net::TcpStream>) {
    if let Err(e) = conn.set_notsent_lowat(TUNNEL_NOTSENT_LOWAT) {
        debug!("tunnel: cannot limit unsent bytes (TCP_NOTSENT_LOWAT): {e}");
    }
}

/// Acknowledgements kept for [`Tunnel::take_acked`] when nobody takes them.
const MAX_ACKED_LOG: usize = 1 << 16;

/// One block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Number, from 0, in stream order.
    pub seq: u64,
    /// The bytes it stands for (kept until acknowledged, to resend raw if asked).
    pub raw: Bytes,
    /// What goes on the wire: `(encoding, bytes)`, or `None` to send `raw`.
    pub encoded: Option<(u8, Bytes)>,
}

impl Block {
    /// The bytes that go on the wire for it.
    fn wire_len(&self) -> u64 {
        self.encoded.as_ref().map_or(self.raw.len(), |e| e.1.len()) as u64
    }
}

#[derive(Debug, Default)]
struct State {
    /// Waiting for a connection, by seq (resends go first: lowest seq first).
    queue: BTreeMap<u64, Arc<Block>>,
    /// Sent, not acknowledged.
    unacked: HashMap<u64, Unacked>,
    /// Blocks queued again because their connection died (a copy of one may be answered
    /// while it waits in `queue`).
    requeued: std::collections::HashSet<u64>,
    acked_blocks: u64,
    acked_raw: u64,
    /// Raw bytes of acknowledged blocks, and what went on the wire for them (copies of stuck
    /// blocks included).
    wire_bytes: u64,
    resent_raw: u64,
    /// Copies of blocks: sent again while the first was stuck, or at the tail.
    hedged: u64,
    /// Every block is queued and the receiver waits for them all (see [`Tunnel::finishing`]).
    finishing: bool,
    /// Wire bytes of the acknowledged blocks at the size they were queued with.
    queued_wire: u64,
    /// The acknowledged prefix: the first seq not in it, and the raw bytes before it.
    prefix: (u64, u64),
    /// Blocks acknowledged beyond the prefix: seq and raw bytes.
    beyond: BTreeMap<u64, u64>,
    /// Blocks sent again raw: the encoded size they were queued with.
    first_wire: HashMap<u64, u64>,
    /// Highest seq acknowledged.
    max_acked: Option<u64>,
    /// Shortest time from a block's send to its acknowledgement: a round trip, about.
    min_ack: Option<Duration>,
    /// Smoothed time to an acknowledgement (weight 1/8), which includes the receiver's own
    /// waits (its QEMU taking data slowly).
    avg_ack: Option<Duration>,
    alive: usize,
    /// Blocks acknowledged since the last [`Tunnel::take_acked`]: seq, and whether the
    /// receiver decoded it (it went out encoded) rather than took it raw.
    acked_log: Vec<(u64, bool)>,
    /// Connections known dead.
    dead: std::collections::HashSet<usize>,
    error: Option<String>,
    /// How long the tunnel keeps dialling once every connection is lost (see
    /// [`Tunnel::retry_within`]); since when none is open, and why the last one was lost.
    retry_for: Duration,
    down_since: Option<Instant>,
    last_loss: String,
    /// Why the last dial for a replacement failed.
    last_dial: String,
    /// Connections the receiver has answered on (a replacement counts as up from then on:
    /// a receiver may refuse a stream that joins).
    heard: std::collections::HashSet<usize>,
    /// Connections opened in place of lost ones, and answered on.
    replaced: u32,
}

/// A block on its way.
#[derive(Debug)]
struct Unacked {
    /// The connection it went out on.
    conn: usize,
    block: Arc<Block>,
    sent: Instant,
    /// Sent a second time, on another connection (see [`State::stuck`]).
    hedged: bool,
    /// The second copy's connection and when (a tail copy, [`State::tail_copy`], or one of
    /// the stuck rule, [`State::stuck`]).
    copy: Option<(usize, Instant)>,
    /// A third copy went (a tail copy's both copies late).
    third: bool,
}

/// A block unacknowledged while later ones are goes again on another connection after this
/// many shortest acknowledgement times, and twice the usual one (at least [`MIN_HEDGE`]);
/// once the tunnel is finishing, after [`finishing_wait`]. The floors are no shorter than
/// Linux's shortest retransmission timeout (200 ms): on a short path TCP's own timeout comes
/// first, and a copy would only cost CPU.
const HEDGE_AFTER: u32 = 4;
const MIN_HEDGE: Duration = Duration::from_millis(300);
const MIN_HEDGE_FINISHING: Duration = Duration::from_millis(200);

/// Finishing (the guest paused until the last block is in), a block still out this long
/// after it went is held by a loss: 1.25 shortest acknowledgement times, at least
/// [`MIN_HEDGE_FINISHING`]. TCP's own recovery of a lost packet takes a round trip more at
/// best, and a tail-loss probe twice the smoothed round trip; a copy sent now arrives a one-way
/// trip later. (At two shortest times, `lossy` traces of 2026-12-04 showed blocks sent 0.3 s
/// before the guest paused still out 0.2 s after, their copies then on the pause's critical
/// path.)
fn finishing_wait(min_ack: Duration) -> Duration {
    (min_ack + min_ack / 4).max(MIN_HEDGE_FINISHING)
}

/// Once the tunnel is finishing across a long path (a shortest acknowledgement time of at
/// least [`TAIL_COPY_MIN_RTT`]) and at most [`TAIL_COPY_MAX`] wire bytes are out without a
/// copy (not counting blocks out for [`finishing_wait`] already: those go again one by one,
/// oldest first, once a later block is acknowledged, see [`State::stuck`]), each block still
/// out, and not that long, goes a second time on another connection at once: the guest
/// is paused until the last one is in, and a packet lost at the tail of a connection costs
/// a tail-loss probe or a retransmission timeout, a round trip or more. On a short path TCP
/// recovers sooner than a copy would help.
const TAIL_COPY_MAX: u64 = 1 << 20;
const TAIL_COPY_MIN_RTT: Duration = Duration::from_millis(10);

impl State {
    /// Connection `i` is gone: its unacknowledged blocks go out again on the others, and
    /// blocks whose copy went on it count as never copied, so that they may go again (the
    /// stuck rule copies each once, and the oldest, held up, would hold all behind it until
    /// its own connection recovered).
    fn requeue(&mut self, i: usize) {
        let mine: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.conn == i)
            .map(|(k, _)| *k)
            .collect();
        for k in mine {
            if let Some(u) = self.unacked.remove(&k) {
                self.resent_raw += u.block.raw.len() as u64;
                self.queue.insert(k, u.block);
                self.requeued.insert(k);
            }
        }
        for u in self.unacked.values_mut() {
            if u.copy.is_some_and(|(c, _)| c == i) {
                u.hedged = false;
                u.copy = None;
                u.third = false;
            }
        }
    }

    /// See [`Link::heard`]; whether connection `i` is a replacement answering for the first
    /// time (the initial ones are numbered below `initial`).
    fn heard_on(&mut self, i: usize, ack: bool, initial: usize) -> bool {
        // A frame still read from a connection given up says nothing of the link now.
        if self.dead.contains(&i) {
            return false;
        }
        if ack || (self.unacked.is_empty() && self.queue.is_empty()) {
            self.down_since = None;
        }
        let replaced = self.heard.insert(i) && i >= initial;
        if replaced {
            self.replaced += 1;
        }
        replaced
    }

    /// With no connection left, what remains of the retry period. With connections open
    /// again but no block answered on them since (a path that carries the handshake and a
    /// PONG but drops large packets), [`UNANSWERED_GRACE`] more: then that ends too.
    fn left(&self) -> Option<Duration> {
        let t = self.down_since?;
        let period = if self.alive == 0 {
            self.retry_for
        } else {
            self.retry_for + UNANSWERED_GRACE
        };
        Some(period.saturating_sub(t.elapsed()))
    }

    /// Finishing across a long path, with little out: a second copy, for idle connection
    /// `conn`, of the oldest block out once on another connection (see [`TAIL_COPY_MAX`]);
    /// once every such block has two, a third of the oldest whose two copies have both been
    /// out [`finishing_wait`], on a connection carrying neither.
    fn tail_copy(&mut self, conn: usize, now: Instant) -> Option<Arc<Block>> {
        if !self.finishing {
            return None;
        }
        let min = self.min_ack.filter(|m| *m >= TAIL_COPY_MIN_RTT)?;
        let late = finishing_wait(min);
        // Out once, and not long enough to be left to the stuck rule.
        let fresh = |u: &Unacked| !u.hedged && now.saturating_duration_since(u.sent) < late;
        let open: u64 = self
            .unacked
            .values()
            .filter(|u| fresh(u))
            .map(|u| u.block.wire_len())
            .sum();
        let second = (open <= TAIL_COPY_MAX)
            .then(|| {
                self.unacked
                    .iter()
                    .filter(|(_, u)| fresh(u) && u.conn != conn)
                    .map(|(k, _)| *k)
                    .min()
            })
            .flatten();
        let third = || {
            self.unacked
                .iter()
                .filter(|(_, u)| {
                    !u.third
                        && u.conn != conn
                        && u.copy.is_some_and(|(c, at)| {
                            c != conn && now.saturating_duration_since(at) >= late
                        })
                })
                .map(|(k, _)| *k)
                .min()
        };
        let seq = second.or_else(third)?;
        let u = self.unacked.get_mut(&seq)?;
        if u.hedged {
            u.third = true;
        } else {
            u.hedged = true;
            u.copy = Some((conn, now));
        }
        let b = u.block.clone();
        self.hedged += 1;
        self.wire_bytes += b.wire_len();
        Some(b)
    }

    /// A block to send again on connection `conn`, which has nothing else to send: the
    /// oldest one unacknowledged, when blocks sent after it have been acknowledged and it has
    /// been out for [`HEDGE_AFTER`] round trips and twice the usual time. Its connection is
    /// likely stuck in a retransmission timeout (after a tail loss, with little data behind
    /// it, TCP has no duplicate acknowledgements to recover sooner), and everything behind it
    /// waits: the receiver feeds QEMU in order, and holds only so much beyond a gap. Each
    /// block goes again at most once this way; the receiver ignores a copy.
    fn stuck(&mut self, conn: usize, now: Instant) -> Option<Arc<Block>> {
        if let Some(b) = self.tail_copy(conn, now) {
            return Some(b);
        }
        let wait = match (self.min_ack, self.avg_ack) {
            (Some(min), _) if self.finishing => finishing_wait(min),
            (Some(min), Some(avg)) => (min * HEDGE_AFTER).max(avg * 2).max(MIN_HEDGE),
            _ => return None,
        };
        let max_acked = self.max_acked?;
        // The oldest one; finishing, the oldest not sent again yet (every block counts).
        let (_, u) = self
            .unacked
            .iter_mut()
            .filter(|(_, u)| !(self.finishing && u.hedged))
            .min_by_key(|(k, _)| **k)?;
        if u.hedged || u.conn == conn || u.block.seq > max_acked || now - u.sent < wait {
            return None;
        }
        u.hedged = true;
        // Where the copy went: should that connection die, the block may go again. (Marked
        // as if a third had gone: the tail's third copies are for tail copies only.)
        u.copy = Some((conn, now));
        u.third = true;
        self.hedged += 1;
        debug!(
            seq = u.block.seq,
            out_ms = (now - u.sent).as_millis() as u64,
            wait_ms = wait.as_millis() as u64,
            behind = max_acked - u.block.seq,
            "tunnel block stuck; sent again"
        );
        // The copy crosses too.
        self.wire_bytes += u.block.wire_len();
        Some(u.block.clone())
    }
}

/// The sending end of a tunnel.
#[derive(Debug)]
pub struct Tunnel {
    name: String,
    state: Arc<Mutex<State>>,
    /// New work for the writers.
    work: Arc<Notify>,
    /// Acknowledgements, failures.
    progress: Arc<Notify>,
    tasks: Mutex<JoinSet<()>>,
    max_block: usize,
    /// What the kernel counts on the tunnel's connections, and the heartbeats that tell the
    /// receiver.
    beat: Arc<Beat>,
    /// The session every connection joins.
    id: [u8; 16],
}

/// How often a tunnel tells the receiver what TCP counted, as sessions' heartbeats do.
const BEAT_EVERY: Duration = Duration::from_secs(1);

/// What TCP counts on a tunnel's connections (a connection that died stays counted, its
/// probe closed with it), and when the receiver is told next. Once a second, the connection
/// that has just written a block adds a `PING` with the counts since the last one, for the
/// receiver's per-peer metrics.
#[derive(Debug)]
struct Beat {
    tcp: Mutex<TcpWatch>,
    next: Mutex<Instant>,
}

impl Beat {
    fn tcp(&self) -> std::sync::MutexGuard<'_, TcpWatch> {
        self.tcp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The heartbeat to send now, if one is due and TCP counted anything since the last.
    fn due(&self) -> Option<msg::Ping> {
        let now = Instant::now();
        {
            let mut next = self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now < *next {
                return None;
            }
            *next = now + BEAT_EVERY;
        }
        let c = self.tcp().unreported();
        (c.segments_sent > 0).then(|| msg::Ping {
            sender_tcp_retransmits: c.retransmits,
            sender_tcp_segments: c.segments_sent,
            ..msg::Ping::default()
        })
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a tunnel keeps dialling after losing every connection, unless told otherwise
/// ([`Tunnel::retry_within`]).
pub const DEFAULT_RETRY: Duration = Duration::from_secs(30);

/// A replacement dial's own limit, and the pauses between failed ones.
const DIAL_LIMIT: Duration = Duration::from_secs(10);
/// After every connection was lost and new ones opened, how much longer than the retry
/// period the first answer to a block may take before the tunnel fails: a destination
/// whose QEMU is slow stops reading (and answering) for up to its 60 s stall limit.
const UNANSWERED_GRACE: Duration = Duration::from_secs(60);
/// How long a replacement may take to be answered before the next dial goes anyway.
const CONFIRM_LIMIT: Duration = Duration::from_secs(5);

/// How long a tunnel connection's data may stay unacknowledged by TCP before the kernel
/// drops it (`TCP_USER_TIMEOUT`): a path gone silent (a link down, packets dropped rather
/// than refused) shows as a lost connection then, and the retry period starts, rather
/// than after TCP's own retries of about 15 minutes. Longer than a destination may hold its
/// window shut while its QEMU takes nothing (60 s): Linux counts a zero window's answered
/// probes against this limit too (since 5.11).
pub const SILENT_LIMIT: Duration = Duration::from_secs(90);
const REDIAL_FIRST: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(1);

/// What a tunnel's connections share, and what a replacement needs to join them.
#[derive(Debug)]
struct Link {
    state: Arc<Mutex<State>>,
    /// New work for the writers.
    work: Arc<Notify>,
    /// Acknowledgements, failures.
    progress: Arc<Notify>,
    /// A connection lost (wakes [`Link::keep_up`]).
    lost: Notify,
    beat: Arc<Beat>,
    name: String,
    limit: Option<RateLimit>,
    id: [u8; 16],
    /// Connections opened with the tunnel (stream indices below it); those from it on are
    /// replacements.
    initial: usize,
}

/// Where [`Link::keep_up`] dials, and how many connections it keeps.
struct Redial {
    want: usize,
    endpoint: Endpoint,
    addr: std::net::SocketAddr,
    peer: NodeId,
    /// The tunnel's block size, which a replacement must carry.
    max_block: usize,
    long_path: bool,
}

impl Link {
    /// Joins `conn` to the session as its stream `i` and starts its writer and reader (in
    /// `tasks`); returns the largest block it carries. One that carries less than `at_least`
    /// is closed instead.
    async fn attach(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        i: usize,
        conn: Connection<tokio::net::TcpStream>,
        at_least: usize,
    ) -> Result<usize, ConnError> {
        if let Err(e) = conn.set_user_timeout(SILENT_LIMIT) {
            debug!("tunnel: cannot bound unacknowledged time (TCP_USER_TIMEOUT): {e}");
        }
        let probe = conn.tcp_probe();
        let (mut reader, mut writer) = conn.split();
        // Room for the TUNNEL_DATA header and the name.
        let most = writer.max_chunk().saturating_sub(16 + 255);
        if most < at_least {
            writer
                .close(
                    ErrorCode::NO_ERROR,
                    "frames too small for the tunnel's blocks",
                )
                .await;
            return Err(ConnError::Io {
                stage: Stage::Handshake,
                source: std::io::Error::other(format!(
                    "the peer takes frames for blocks of {most} bytes, the tunnel's are {at_least}"
                )),
            });
        }
        let join = SessionJoin {
            session_id: self.id.to_vec(),
            stream_index: i as u32,
        };
        writer.send(&msg::encode(FrameType::SESSION, &join)).await?;
        if i >= self.initial {
            // A replacement is up once the receiver answers on it: its PONG, if there is
            // nothing to acknowledge. A receiver that refuses the stream says GOAWAY instead.
            writer
                .send(&msg::encode(FrameType::PING, &msg::Ping::default()))
                .await?;
        }
        {
            let mut s = lock(&self.state);
            if s.error.is_some() {
                // Closed meanwhile: its probe would outlive the tunnel's `close_all`.
                return Err(ConnError::Io {
                    stage: Stage::Handshake,
                    source: std::io::Error::other("the tunnel closed"),
                });
            }
            if let Some(probe) = probe {
                self.beat.tcp().watch(i as u32, 0, probe);
            }
            s.alive += 1;
        }
        let link = self.clone();
        tasks.spawn(async move {
            let (st, wk) = (&link.state, &link.work);
            let why = loop {
                let next = {
                    // Registered before the queue is looked at, so that a block queued in
                    // between wakes it (notify_waiters keeps no permit).
                    let notified = wk.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let b = {
                        let mut s = lock(st);
                        if s.error.is_some() || s.dead.contains(&i) {
                            return;
                        }
                        let first = s.queue.keys().next().copied();
                        let now = Instant::now();
                        match first.and_then(|k| s.queue.remove(&k)) {
                            Some(b) => {
                                let u = Unacked {
                                    conn: i,
                                    block: b.clone(),
                                    sent: now,
                                    hedged: false,
                                    copy: None,
                                    third: false,
                                };
                                s.unacked.insert(b.seq, u);
                                Ok(b)
                            }
                            None => s.stuck(i, now).ok_or(s.unacked.is_empty()),
                        }
                    };
                    match b {
                        Ok(b) => b,
                        Err(idle) => {
                            // With blocks out, look for a stuck one now and then.
                            let wait = if idle { 500 } else { 50 };
                            let _ =
                                tokio::time::timeout(Duration::from_millis(wait), notified).await;
                            continue;
                        }
                    }
                };
                let (encoding, bytes) = next
                    .encoded
                    .clone()
                    .unwrap_or((data::TUNNEL_RAW, next.raw.clone()));
                let h = TunnelHeader {
                    name: link.name.clone(),
                    seq: next.seq,
                    raw_len: next.raw.len() as u32,
                    encoding,
                };
                let frame = match data::encode_tunnel_data(&h, &bytes) {
                    Ok(f) => f,
                    Err(e) => break e.to_string(),
                };
                if let Err(e) = writer.send(&frame).await {
                    break e.to_string();
                }
                if let Some(ping) = link.beat.due()
                    && let Err(e) = writer.send(&msg::encode(FrameType::PING, &ping)).await
                {
                    break e.to_string();
                }
                // Paid after the frame went, so that a block is never stamped as sent while
                // it waits for tokens (it would look stuck): the next one waits.
                if let Some(l) = &link.limit {
                    l.take(frame.wire_len()).await;
                }
            };
            link.stream_lost(i, &why);
        });
        let link = self.clone();
        tasks.spawn(async move {
            let mut heard = false;
            let why = loop {
                match reader.recv().await {
                    Ok(Some(f)) if f.ty == FrameType::GOAWAY => {
                        let g: Result<msg::Close, _> = msg::decode(&f);
                        break g.map_or_else(|e| e.to_string(), |g| g.printable_reason());
                    }
                    Ok(Some(f)) => {
                        if !heard || f.ty == FrameType::TUNNEL_ACK {
                            heard = true;
                            link.heard(i, f.ty == FrameType::TUNNEL_ACK);
                        }
                        if f.ty == FrameType::TUNNEL_ACK {
                            let ack: TunnelAck = match msg::decode(&f) {
                                Ok(a) => a,
                                Err(e) => break e.to_string(),
                            };
                            on_ack(&link.state, &link.work, &link.progress, &ack);
                        }
                    }
                    Ok(None) => break "closed by the receiver".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            link.stream_lost(i, &why);
        });
        Ok(most)
    }

    /// The receiver answered on connection `i`, acknowledging a block (`ack`) or its PONG.
    /// The link is up once blocks get through, or with none to send: a path that carries
    /// a PONG but not a block (one that drops large packets) keeps the retry period going.
    fn heard(&self, i: usize, ack: bool) {
        if lock(&self.state).heard_on(i, ack, self.initial) {
            info!(stream = i, name = %self.name, "tunnel stream replaced");
        }
    }

    /// Connection `i` is gone: what it had out goes again on the others, and
    /// [`Link::keep_up`] dials a replacement.
    fn stream_lost(&self, i: usize, why: &str) {
        let mut s = lock(&self.state);
        if !s.dead.insert(i) {
            return; // its other task noticed first
        }
        s.alive = s.alive.saturating_sub(1);
        s.heard.remove(&i);
        s.requeue(i);
        if s.error.is_none() {
            // One lost stream is replaced as a matter of course; all of them is the warning.
            info!(stream = i, "tunnel stream lost: {why}");
            s.last_loss = why.to_string();
            if s.alive == 0 {
                if s.retry_for.is_zero() {
                    s.error = Some(format!("every tunnel stream failed (last: {why})"));
                } else {
                    warn!(
                        "every tunnel stream lost; dialling again for up to {:?}",
                        s.retry_for
                    );
                    // From the first loss: a replacement lost before the receiver answered
                    // on it (refused) does not start the period again.
                    s.down_since.get_or_insert_with(Instant::now);
                }
            }
        }
        drop(s);
        // Its final counts stay in the totals; its descriptor closes.
        self.beat.tcp().close(i as u32, 0);
        self.lost.notify_one();
        self.work.notify_waiters();
        self.progress.notify_waiters();
    }

    /// Keeps `to.want` connections open: dials one in place of each that is lost (pausing
    /// between failed dials, 0.1 s doubling to 1 s), for as long as the tunnel lasts. Once
    /// none is left, the tunnel fails if no new one is open within its retry period; what was
    /// out goes again on the new ones, and the receiver, which keys blocks by the stream's
    /// name and number rather than by connection, takes them as before.
    async fn keep_up(self: Arc<Self>, to: Redial) {
        let mut conns = JoinSet::new();
        let mut next = to.want;
        let mut pause = REDIAL_FIRST;
        loop {
            while conns.try_join_next().is_some() {}
            let lost = self.lost.notified();
            tokio::pin!(lost);
            lost.as_mut().enable();
            let (alive, left) = {
                let mut s = lock(&self.state);
                if s.error.is_some() {
                    return;
                }
                let left = s.left();
                if left.is_some_and(|l| l.is_zero()) {
                    s.error = Some(if s.alive == 0 {
                        format!(
                            "every tunnel stream failed (last: {}), and no new one could be \
                             opened within {:?} (last attempt: {})",
                            s.last_loss,
                            s.retry_for,
                            if s.last_dial.is_empty() {
                                "none"
                            } else {
                                &s.last_dial
                            }
                        )
                    } else {
                        format!(
                            "every tunnel stream failed (last: {}); new ones opened, but no \
                             block was answered on them within {:?}",
                            s.last_loss,
                            s.retry_for + UNANSWERED_GRACE
                        )
                    });
                    drop(s);
                    self.work.notify_waiters();
                    self.progress.notify_waiters();
                    return;
                }
                (s.alive, left)
            };
            if alive >= to.want {
                pause = REDIAL_FIRST;
                let _ = tokio::time::timeout(Duration::from_secs(1), lost).await;
                continue;
            }
            let limit = left.map_or(DIAL_LIMIT, |l| l.min(DIAL_LIMIT));
            let dialled =
                tokio::time::timeout(limit, connect_to(&to.endpoint, to.addr, Some(&to.peer)))
                    .await;
            let why = match dialled {
                Ok(Ok(conn)) => {
                    if to.long_path {
                        tune(&conn);
                    }
                    match self.attach(&mut conns, next, conn, to.max_block).await {
                        Ok(_) => {
                            let i = next;
                            next += 1;
                            self.work.notify_waiters();
                            // Up once answered; lost before that, it was refused: the next
                            // dial waits as after a failed one.
                            let t = Instant::now();
                            let up = loop {
                                {
                                    let s = lock(&self.state);
                                    if s.heard.contains(&i) || s.error.is_some() {
                                        break true;
                                    }
                                    if s.dead.contains(&i) {
                                        break false;
                                    }
                                }
                                if t.elapsed() >= CONFIRM_LIMIT {
                                    break true; // slow, not refused: the next dial goes
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            };
                            if up {
                                continue;
                            }
                            format!("stream {i} was closed before it was answered")
                        }
                        Err(e) => e.to_string(),
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {limit:?}"),
            };
            debug!(name = %self.name, "tunnel: cannot replace a lost stream yet: {why}");
            let left = {
                let mut s = lock(&self.state);
                s.last_dial = why;
                s.left()
            };
            tokio::time::sleep(left.map_or(pause, |l| pause.min(l))).await;
            pause = (pause * 2).min(REDIAL_MAX);
        }
    }
}

impl Tunnel {
    /// Opens up to `streams` connections to `addr` for the stream `name` (fewer if the peer
    /// allows fewer, or if some cannot be dialled; at least one, or an error).
    pub async fn open(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        streams: u32,
        name: &str,
    ) -> Result<Self, SendError> {
        Self::open_with(endpoint, addr, expected, streams, name, None).await
    }

    /// As [`Tunnel::open`], every frame it sends taken from `limit` (a cap it may share with
    /// other sessions). Each connection pays for a frame once it is written, so that no block
    /// waits for tokens after it was stamped as sent: beyond the cap's 50 ms, the burst may be
    /// one block on each connection.
    pub async fn open_with(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        streams: u32,
        name: &str,
        limit: Option<RateLimit>,
    ) -> Result<Self, SendError> {
        let id = Self::new_session_id();
        Self::open_as(endpoint, addr, expected, streams, name, limit, id).await
    }

    /// A fresh session id for [`Tunnel::open_as`].
    pub fn new_session_id() -> [u8; 16] {
        super::send::rand_id()
    }

    /// As [`Tunnel::open_with`], its session id `id` (from [`Tunnel::new_session_id`]): told
    /// to the peer before the tunnel is open, so that it takes the stream from this tunnel
    /// alone.
    pub async fn open_as(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        streams: u32,
        name: &str,
        limit: Option<RateLimit>,
        id: [u8; 16],
    ) -> Result<Self, SendError> {
        // With the peer named, every connection is dialled at once: on a long path each dial
        // is several round trips (TCP, TLS, handshake). Dialled one first and then the rest,
        // the tunnel took 1.4 s to open on `internet`; at once, 0.3 s. Without a name, the
        // first one's node is the one the others must reach, and it tells the peer's limit.
        let mut conns = Vec::new();
        let mut dials = JoinSet::new();
        let (peer, want) = match expected {
            Some(peer) => (peer.clone(), streams.max(1)),
            None => {
                let first = connect_to(endpoint, addr, None)
                    .await
                    .map_err(SendError::Connect)?;
                let peer = first.established().peer_node_id.clone();
                let want = streams.clamp(1, first.established().negotiated.max_streams.max(1));
                conns.push(first);
                (peer, want)
            }
        };
        for _ in conns.len()..want as usize {
            let endpoint = endpoint.clone();
            let peer = peer.clone();
            dials.spawn(async move { connect_to(&endpoint, addr, Some(&peer)).await });
        }
        let mut first_error = None;
        while let Some(r) = dials.join_next().await {
            match r {
                Ok(Ok(c)) => conns.push(c),
                Ok(Err(e)) => {
                    warn!("tunnel: cannot open a stream: {e}");
                    first_error.get_or_insert(e);
                }
                Err(e) => warn!("tunnel: dial task failed: {e}"),
            }
        }
        let Some(max) = conns
            .iter()
            .map(|c| c.established().negotiated.max_streams.max(1))
            .min()
        else {
            return Err(SendError::Connect(first_error.unwrap_or_else(|| {
                ConnError::Io {
                    stage: Stage::Connect,
                    source: std::io::Error::other("every tunnel dial task failed"),
                }
            })));
        };
        // The peer's limit, which a dial learns only once it has answered: those beyond it
        // say goodbye (they joined no session, so the peer has nothing to undo).
        let extra: Vec<_> = conns.drain((max as usize).min(conns.len())..).collect();
        for c in extra {
            c.close(ErrorCode::NO_ERROR, "beyond the peer's max_streams")
                .await;
        }
        let n = conns.len();
        // The handshake is a round trip and the peer's handling of it.
        let rtt = conns.iter().map(|c| c.handshake_time()).min();
        let link = Arc::new(Link {
            state: Arc::new(Mutex::new(State {
                retry_for: DEFAULT_RETRY,
                ..State::default()
            })),
            work: Arc::new(Notify::new()),
            progress: Arc::new(Notify::new()),
            lost: Notify::new(),
            beat: Arc::new(Beat {
                tcp: Mutex::default(),
                next: Mutex::new(Instant::now() + BEAT_EVERY),
            }),
            name: name.to_string(),
            limit,
            id,
            initial: n,
        });
        let mut tasks = JoinSet::new();
        let mut max_block = usize::MAX;
        let long_path = rtt.is_some_and(|r| super::Mode::for_rtt(r) == super::Mode::Internet);
        // A connection that dialled but cannot join (its SESSION lost, say) is left to the
        // redialling below, as a lost one would be: the tunnel opens with the others.
        let mut failed = None;
        for (i, conn) in conns.into_iter().enumerate() {
            if long_path {
                tune(&conn);
            }
            match link.attach(&mut tasks, i, conn, 0).await {
                Ok(most) => max_block = max_block.min(most),
                Err(e) => {
                    debug!(name, stream = i, "tunnel stream not joined: {e}");
                    failed = Some(e);
                }
            }
        }
        if max_block == usize::MAX {
            tasks.abort_all();
            link.beat.tcp().close_all();
            return Err(SendError::Connect(failed.unwrap_or(ConnError::Io {
                stage: Stage::Handshake,
                source: std::io::Error::other("no connection to open the tunnel on"),
            })));
        }
        tasks.spawn(link.clone().keep_up(Redial {
            want: n,
            endpoint: endpoint.clone(),
            addr,
            peer,
            max_block,
            long_path,
        }));
        debug!(name, streams = n, "tunnel open");
        // From the stream's first block: the handshakes are not the stream's.
        link.beat.tcp().rebase(None);
        Ok(Self {
            name: name.to_string(),
            state: link.state.clone(),
            work: link.work.clone(),
            progress: link.progress.clone(),
            tasks: Mutex::new(tasks),
            max_block,
            beat: link.beat.clone(),
            id,
        })
    }

    /// The session id every connection of the tunnel joins (also its replacements).
    pub fn session_id(&self) -> [u8; 16] {
        self.id
    }

    /// Connections open and not lost.
    pub fn streams(&self) -> usize {
        lock(&self.state).alive
    }

    /// Largest block the connections carry.
    pub fn max_block(&self) -> usize {
        self.max_block
    }

    /// Queues a block (returns at once; the caller's window bounds what is queued). A block
    /// stands for at most [`data::TUNNEL_MAX_RAW`] bytes.
    pub fn send(&self, block: Block) -> Result<(), SendError> {
        if block.raw.len() > data::TUNNEL_MAX_RAW as usize {
            return Err(SendError::Protocol(format!(
                "a tunnel block stands for at most {} bytes, not {}",
                data::TUNNEL_MAX_RAW,
                block.raw.len()
            )));
        }
        let mut s = lock(&self.state);
        if let Some(e) = &s.error {
            return Err(SendError::Protocol(e.clone()));
        }
        s.queue.insert(block.seq, Arc::new(block));
        drop(s);
        self.work.notify_waiters();
        Ok(())
    }

    /// Blocks and raw bytes acknowledged so far; bytes on the wire for them; raw bytes sent
    /// twice.
    pub fn acked(&self) -> (u64, u64, u64, u64) {
        let s = lock(&self.state);
        (s.acked_blocks, s.acked_raw, s.wire_bytes, s.resent_raw)
    }

    /// For a caller's window: raw bytes acknowledged; the wire bytes of those blocks at the
    /// size they were queued with (one sent again raw counts at its encoded size); and the raw
    /// bytes acknowledged together with every block before them. Blocks acknowledged beyond a
    /// gap are at the receiver, but wait there for the one still on its way, and it holds only
    /// so much of them: a window bounds what is beyond that prefix too.
    pub fn window_acked(&self) -> (u64, u64, u64) {
        let s = lock(&self.state);
        (s.acked_raw, s.queued_wire, s.prefix.1)
    }

    /// Every block is queued, and the receiver needs them all before anything more happens
    /// (a QEMU guest paused until its stream is in): from now on a stuck block goes again
    /// after 1.25 round trips rather than four (see [`finishing_wait`]), and across a long
    /// path the last MiB out goes twice at once (see [`TAIL_COPY_MAX`]).
    pub fn finishing(&self) {
        lock(&self.state).finishing = true;
        self.work.notify_waiters();
    }

    /// Copies of blocks sent while the first was stuck, or at the stream's tail (see
    /// [`State::stuck`]).
    pub fn hedged(&self) -> u64 {
        lock(&self.state).hedged
    }

    /// What TCP counted on the tunnel's connections since it opened, by the kernel
    /// (`TCP_INFO`): its own retransmissions, segments and bytes. `None` off Linux.
    pub fn tcp_counts(&self) -> Option<TcpCounts> {
        self.beat.tcp().reported()
    }

    /// The blocks acknowledged since the last call: seq, and whether the receiver decoded it
    /// (so holds the chunks it sent literally in its cache, if it has one) or took it raw.
    /// At most the first 65,536 since the last call are kept (later ones are dropped):
    /// call at least that often.
    pub fn take_acked(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut lock(&self.state).acked_log)
    }

    /// How long to keep dialling once every connection is lost (default [`DEFAULT_RETRY`]).
    /// Blocks wait meanwhile; zero fails the tunnel as soon as the last connection goes.
    pub fn retry_within(&self, period: Duration) {
        lock(&self.state).retry_for = period;
    }

    /// Since when no connection has been open, while the tunnel dials again (`None` with one
    /// open, or once it failed).
    pub fn down_since(&self) -> Option<Instant> {
        let s = lock(&self.state);
        s.down_since.filter(|_| s.alive == 0 && s.error.is_none())
    }

    /// Connections opened in place of lost ones.
    pub fn replaced(&self) -> u32 {
        lock(&self.state).replaced
    }

    /// The error that stopped the tunnel, if one did.
    pub fn error(&self) -> Option<String> {
        lock(&self.state).error.clone()
    }

    /// Waits until something is acknowledged or fails (at most `timeout`).
    pub async fn wait_progress(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.progress.notified()).await;
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the tunnel's tasks (dropping the connections).
    pub fn close(&self) {
        {
            let mut s = lock(&self.state);
            s.error.get_or_insert_with(|| "closed".into());
        }
        self.work.notify_waiters();
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .abort_all();
        // The probes' descriptors too, or the sockets would outlive their connections.
        self.beat.tcp().close_all();
    }
}

fn on_ack(st: &Mutex<State>, work: &Notify, progress: &Notify, ack: &TunnelAck) {
    let mut s = lock(st);
    let unresolved = ack.code == ErrorCode::DELTA_UNRESOLVED.0;
    if unresolved
        && s.first_wire.contains_key(&ack.seq)
        && s.unacked
            .get(&ack.seq)
            .is_some_and(|u| u.block.encoded.is_none())
    {
        // The answer to a second encoded copy (one sent while the first was stuck) after the
        // first's answer made the block go raw: the raw one is on its way.
        return;
    }
    let requeued = s.requeued.remove(&ack.seq);
    let u = match s.unacked.remove(&ack.seq) {
        Some(u) => u,
        // The answer to a copy whose original's connection died meanwhile, the block queued
        // to go again: taken, not sent a third time; an unresolved one goes raw at once, a
        // refusal fails the tunnel as it would have. (Only such a block: one queued and
        // never sent is not answered.)
        None if requeued => match s.queue.remove(&ack.seq) {
            Some(block) => Unacked {
                conn: usize::MAX,
                block,
                sent: Instant::now(),
                hedged: true,
                copy: None,
                third: false,
            },
            None => return, // a block acknowledged twice (sent again after a loss, or stuck)
        },
        None => return,
    };
    let b = u.block;
    // A round trip only from a block sent once: one sent again (its connection lost, or raw
    // after an unresolved answer) may be answered for its earlier copy, moments after the
    // new one went, and the least round trip would never recover from that.
    let sent_again = requeued || s.first_wire.contains_key(&ack.seq);
    if !u.hedged && !sent_again && ack.code == 0 {
        let took = u.sent.elapsed();
        s.min_ack = Some(s.min_ack.map_or(took, |m| m.min(took)));
        s.avg_ack = Some(s.avg_ack.map_or(took, |a| (a * 7 + took) / 8));
        s.max_acked = s.max_acked.max(Some(ack.seq));
    }
    if unresolved && b.encoded.is_some() {
        // The receiver lacks a chunk the block referred to: send it raw.
        debug!(seq = ack.seq, "tunnel block unresolved; sending it raw");
        s.resent_raw += b.raw.len() as u64;
        let encoded = b.encoded.as_ref().map_or(0, |e| e.1.len());
        s.first_wire.insert(b.seq, encoded as u64);
        let raw = Block {
            seq: b.seq,
            raw: b.raw.clone(),
            encoded: None,
        };
        s.queue.insert(b.seq, Arc::new(raw));
        drop(s);
        work.notify_waiters();
        return;
    }
    if ack.code != 0 {
        s.error = Some(format!(
            "the receiver refused block {} ({}): {}",
            ack.seq,
            ErrorCode(ack.code),
            msg::printable(&ack.reason, 500)
        ));
    } else {
        s.acked_blocks += 1;
        let wire = b.wire_len();
        s.acked_raw += b.raw.len() as u64;
        s.wire_bytes += wire;
        s.queued_wire += s.first_wire.remove(&b.seq).unwrap_or(wire);
        s.beyond.insert(b.seq, b.raw.len() as u64);
        loop {
            let next = s.prefix.0;
            let Some(raw) = s.beyond.remove(&next) else {
                break;
            };
            s.prefix.0 += 1;
            s.prefix.1 += raw;
        }
        if s.acked_log.len() < MAX_ACKED_LOG {
            s.acked_log.push((b.seq, b.encoded.is_some()));
        }
    }
    drop(s);
    progress.notify_waiters();
    work.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seq: u64, raw: usize, encoded: Option<usize>) -> Arc<Block> {
        Arc::new(Block {
            seq,
            raw: Bytes::from(vec![0u8; raw]),
            encoded: encoded.map(|n| (data::TUNNEL_HDE_STREAM, Bytes::from(vec![1u8; n]))),
        })
    }

    fn unacked(conn: usize, block: Arc<Block>) -> Unacked {
        Unacked {
            conn,
            block,
            sent: Instant::now(),
            hedged: false,
            copy: None,
            third: false,
        }
    }

    /// Blocks 0, 1 and 2 of 100 bytes out at `t0`, each on the connection of its number.
    fn three_out(t0: Instant) -> Mutex<State> {
        let st = Mutex::new(State::default());
        for seq in 0..3 {
            let mut u = unacked(seq as usize, block(seq, 100, None));
            u.sent = t0;
            lock(&st).unacked.insert(seq, u);
        }
        st
    }

    /// Every connection lost: the retry period runs, and goes on running (longer by
    /// [`UNANSWERED_GRACE`]) with new connections open that no block was answered on. An
    /// answer read late from a connection already given up stops none of it.
    #[test]
    fn the_retry_period_ends_unless_a_live_connection_answers() {
        let mut s = State {
            retry_for: Duration::from_secs(30),
            ..State::default()
        };
        assert_eq!(s.left(), None, "nothing lost");
        s.down_since = Some(Instant::now() - Duration::from_secs(40));
        s.alive = 0;
        assert_eq!(
            s.left(),
            Some(Duration::ZERO),
            "30 s gone with no connection"
        );
        s.queue.insert(7, block(7, 100, None));
        // A replacement open and answering PONGs, blocks queued and none answered.
        s.alive = 1;
        assert!(s.heard_on(3, false, 1), "a replacement, answering at last");
        let left = s.left().expect("still counting");
        assert!(
            left > Duration::from_secs(45) && left <= Duration::from_secs(50),
            "{left:?}"
        );
        s.down_since = Some(Instant::now() - Duration::from_secs(95));
        assert_eq!(
            s.left(),
            Some(Duration::ZERO),
            "90 s gone, nothing answered"
        );
        // A block's answer on a connection given up: no change.
        s.dead.insert(2);
        assert!(!s.heard_on(2, true, 1));
        assert!(s.down_since.is_some());
        assert!(!s.heard.contains(&2));
        // On a live one: the link is up.
        s.heard_on(3, true, 1);
        assert_eq!(s.left(), None);
    }

    #[test]
    fn a_stuck_block_goes_again_once_on_another_connection() {
        let t0 = Instant::now();
        let st = three_out(t0);
        let later = t0 + Duration::from_secs(5);
        // Nothing acknowledged yet: nothing is known to be stuck.
        assert!(lock(&st).stuck(1, later).is_none());
        ack(&st, 1, ErrorCode(0));
        let mut s = lock(&st);
        let wait = (s.min_ack.unwrap() * HEDGE_AFTER)
            .max(s.avg_ack.unwrap() * 2)
            .max(MIN_HEDGE);
        let soon = t0 + wait / 2;
        assert!(s.stuck(1, soon).is_none(), "not out long enough");
        assert!(s.stuck(0, later).is_none(), "not on its own connection");
        let b = s.stuck(1, later).expect("block 0 goes again");
        assert_eq!(b.seq, 0);
        assert!(s.stuck(2, later).is_none(), "only once");
        drop(s);
        // Either copy's acknowledgement completes it; the other is ignored.
        ack(&st, 0, ErrorCode(0));
        ack(&st, 0, ErrorCode(0));
        let s = lock(&st);
        assert_eq!(s.prefix, (2, 200));
        assert_eq!(s.acked_blocks, 2);
        assert_eq!(s.wire_bytes, 300, "two blocks and a copy crossed");
        assert_eq!(s.hedged, 1);
    }

    /// A stuck block's copy lost with its connection: the block may go again. And the copy's
    /// answer after the original's connection died takes the block off the queue instead of
    /// sending it a third time.
    #[test]
    fn a_copy_lost_with_its_connection_goes_again_and_an_answer_to_a_copy_counts() {
        let t0 = Instant::now();
        let st = three_out(t0);
        ack(&st, 1, ErrorCode(0));
        let later = t0 + Duration::from_secs(5);
        let mut s = lock(&st);
        assert_eq!(s.stuck(1, later).map(|b| b.seq), Some(0));
        assert!(s.stuck(2, later).is_none(), "once");
        // Connection 1, which carried the copy, dies: block 0 (on connection 0) may go again.
        s.requeue(1);
        assert_eq!(s.stuck(2, later).map(|b| b.seq), Some(0));
        // Now connection 0, the original's, dies: block 0 is queued to go again; the copy on
        // 2 is answered.
        s.requeue(0);
        assert!(s.queue.contains_key(&0));
        drop(s);
        ack(&st, 0, ErrorCode(0));
        let mut s = lock(&st);
        assert!(!s.queue.contains_key(&0), "not sent a third time");
        assert_eq!(s.acked_blocks, 2);
        assert_eq!(s.prefix, (2, 200));
        // An answer for a block queued but never sent is not taken for one.
        s.queue.insert(7, block(7, 100, None));
        drop(s);
        ack(&st, 7, ErrorCode(0));
        let s = lock(&st);
        assert!(s.queue.contains_key(&7));
        assert_eq!(s.acked_blocks, 2);
    }

    #[test]
    fn finishing_every_stuck_block_goes_again_after_a_round_trip_and_a_quarter() {
        let st = Mutex::new(State::default());
        let t0 = Instant::now();
        for seq in 0..4 {
            let mut u = unacked(seq as usize % 2, block(seq, 100, None));
            u.sent = t0;
            lock(&st).unacked.insert(seq, u);
        }
        ack(&st, 3, ErrorCode(0));
        let mut s = lock(&st);
        s.min_ack = Some(Duration::from_millis(100));
        s.avg_ack = Some(Duration::from_millis(300));
        let at = t0 + Duration::from_millis(250);
        assert!(s.stuck(1, at).is_none(), "not yet: 600 ms before finishing");
        s.finishing = true;
        // Blocks 0 and 2 went on connection 0, block 1 on connection 1.
        assert_eq!(s.stuck(1, at).map(|b| b.seq), Some(0));
        assert_eq!(s.stuck(0, at).map(|b| b.seq), Some(1));
        assert_eq!(s.stuck(1, at).map(|b| b.seq), Some(2));
        assert!(s.stuck(1, at).is_none(), "each once");
        drop(s);

        // Across a long path the wait is 1.25 shortest acknowledgement times: 250 ms here
        // (more than 1 MiB out: no tail copies meanwhile).
        let st = Mutex::new(State::default());
        for (seq, size) in [(0, 600_000), (1, 600_000), (2, 100)] {
            let mut u = unacked(seq as usize % 2, block(seq, size, None));
            u.sent = t0;
            lock(&st).unacked.insert(seq, u);
        }
        ack(&st, 2, ErrorCode(0));
        let mut s = lock(&st);
        (s.finishing, s.min_ack) = (true, Some(Duration::from_millis(200)));
        assert!(s.stuck(1, t0 + Duration::from_millis(249)).is_none());
        let at = t0 + Duration::from_millis(251);
        assert_eq!(s.stuck(1, at).map(|b| b.seq), Some(0));
    }

    #[test]
    fn finishing_across_a_long_path_the_tail_goes_twice_at_once() {
        let st = Mutex::new(State::default());
        let t0 = Instant::now();
        // Blocks 0..4 of 400 KB on connections 0 and 1; block 4 acknowledged.
        for seq in 0..5 {
            let mut u = unacked(seq as usize % 2, block(seq, 400_000, None));
            u.sent = t0;
            lock(&st).unacked.insert(seq, u);
        }
        ack(&st, 4, ErrorCode(0));
        let mut s = lock(&st);
        s.min_ack = Some(Duration::from_millis(100));
        s.avg_ack = Some(Duration::from_millis(100));
        // Not before the stream's end is queued.
        assert!(s.stuck(2, t0).is_none());
        s.finishing = true;
        // 1.6 MB out: too much to copy yet.
        assert!(s.stuck(2, t0).is_none());
        drop(s);
        ack(&st, 0, ErrorCode(0));
        ack(&st, 1, ErrorCode(0));
        let mut s = lock(&st);
        // (Acknowledged at once here: the path's round trip as it was.)
        s.min_ack = Some(Duration::from_millis(100));
        // 800 KB out: blocks 2 (connection 0) and 3 (connection 1) go again at once, each
        // on a connection that does not carry it, each once.
        assert!(s.stuck(0, t0).is_some_and(|b| b.seq == 3));
        assert!(s.stuck(0, t0).is_none());
        assert!(s.stuck(1, t0).is_some_and(|b| b.seq == 2));
        assert!(s.stuck(2, t0).is_none());
        assert_eq!(s.hedged, 2);
        // Both copies of each late: a third, on a connection carrying neither, once.
        let late = t0 + Duration::from_millis(200);
        assert!(
            s.stuck(2, t0 + Duration::from_millis(150)).is_none(),
            "not yet"
        );
        assert!(s.stuck(0, late).is_none(), "connection 0 carries both");
        assert_eq!(s.stuck(2, late).map(|b| b.seq), Some(2));
        assert_eq!(s.stuck(2, late).map(|b| b.seq), Some(3));
        assert!(s.stuck(3, late).is_none(), "each once");
        assert_eq!(s.hedged, 4);
        let wire = s.wire_bytes;
        drop(s);
        // The first answer counts the block; the copies' answers count nothing more.
        for _ in 0..3 {
            ack(&st, 2, ErrorCode(0));
        }
        let s = lock(&st);
        assert_eq!(s.acked_blocks, 4);
        assert_eq!(
            s.wire_bytes,
            wire + 400_000,
            "block 2 once, its copies when they went"
        );
        drop(s);
        // Blocks out since before the wait count no more against the MiB: 1.6 MB out, but
        // 1.2 MB of it past the wait, the rest goes twice at once; the blocks past the wait go
        // again by the stuck rule (one by one, once a later block is acknowledged), not all at
        // once as tail copies.
        let st = Mutex::new(State::default());
        for seq in 0..4 {
            let mut u = unacked(seq as usize % 2, block(seq, 400_000, None));
            u.sent = if seq < 3 { t0 } else { late };
            lock(&st).unacked.insert(seq, u);
        }
        let mut s = lock(&st);
        (s.finishing, s.min_ack) = (true, Some(Duration::from_millis(100)));
        let just = t0 + Duration::from_millis(199);
        assert!(s.stuck(0, just).is_none(), "1.6 MB out, none past the wait");
        let at = late + Duration::from_millis(1);
        assert_eq!(s.stuck(0, at).map(|b| b.seq), Some(3));
        assert!(s.stuck(0, at).is_none(), "nothing acknowledged after 0..3");
        drop(s);
        // (An answer to a block sent twice tells nothing of the path: block 2's.)
        ack(&st, 2, ErrorCode(0));
        let mut s = lock(&st);
        assert!(s.stuck(0, at).is_none(), "block 0 is on connection 0");
        assert_eq!(s.stuck(1, at).map(|b| b.seq), Some(0));
        assert_eq!(s.stuck(0, at).map(|b| b.seq), Some(1));
        assert_eq!(s.hedged, 3);
        drop(s);
        // Across a short path, no copies: TCP recovers sooner.
        let st = Mutex::new(State::default());
        lock(&st).unacked.insert(0, unacked(0, block(0, 100, None)));
        let mut s = lock(&st);
        s.finishing = true;
        s.min_ack = Some(Duration::from_millis(1));
        assert!(s.stuck(1, t0).is_none());
    }

    fn ack(st: &Mutex<State>, seq: u64, code: ErrorCode) {
        let a = TunnelAck {
            name: "vm".into(),
            seq,
            code: code.0,
            reason: String::new(),
        };
        on_ack(st, &Notify::new(), &Notify::new(), &a);
    }

    /// A block queued again when its connection died is answered for its earlier copy:
    /// a refusal is not lost, and an unresolved one goes raw without another round trip.
    #[test]
    fn an_answer_to_a_queued_block_is_heeded() {
        for (code, refused) in [
            (ErrorCode::STORAGE_ERROR, true),
            (ErrorCode::DELTA_UNRESOLVED, false),
        ] {
            let st = Mutex::new(State::default());
            lock(&st)
                .unacked
                .insert(0, unacked(0, block(0, 100, Some(10))));
            lock(&st).requeue(0);
            ack(&st, 0, code);
            let s = lock(&st);
            assert_eq!(s.error.is_some(), refused, "{code}: {:?}", s.error);
            if !refused {
                let b = s.queue.get(&0).expect("queued again");
                assert!(b.encoded.is_none(), "raw now");
            }
        }
    }

    /// A block queued again when its connection died, sent again, then answered (for
    /// its first copy, moments later): not a round trip.
    #[test]
    fn an_answer_to_a_block_sent_again_is_no_round_trip() {
        let st = Mutex::new(State::default());
        let mut u = unacked(0, block(0, 100, None));
        u.sent = Instant::now() - Duration::from_millis(500);
        lock(&st).unacked.insert(0, u);
        lock(&st).requeue(0);
        let b = lock(&st).queue.remove(&0).expect("queued again");
        lock(&st).unacked.insert(0, unacked(1, b));
        ack(&st, 0, ErrorCode(0));
        let s = lock(&st);
        assert_eq!(s.prefix, (1, 100));
        assert_eq!(s.min_ack, None, "no sample from it");
    }

    #[test]
    fn both_copies_of_a_stuck_block_unresolved_make_it_go_raw_once() {
        let st = Mutex::new(State::default());
        let mut u = unacked(0, block(0, 100, Some(10)));
        u.hedged = true; // a second copy went on another connection
        lock(&st).unacked.insert(0, u);
        ack(&st, 0, ErrorCode::DELTA_UNRESOLVED);
        let raw = lock(&st).queue.remove(&0).expect("queued again raw");
        assert!(raw.encoded.is_none());
        lock(&st).unacked.insert(0, unacked(1, raw));
        // The second encoded copy's answer comes after: the raw block is still awaited.
        ack(&st, 0, ErrorCode::DELTA_UNRESOLVED);
        {
            let s = lock(&st);
            assert!(s.error.is_none(), "{:?}", s.error);
            assert!(s.unacked.contains_key(&0) && s.queue.is_empty());
        }
        ack(&st, 0, ErrorCode(0));
        let s = lock(&st);
        assert_eq!((s.prefix, s.acked_blocks, s.queued_wire), ((1, 100), 1, 10));
        // A raw block never sent encoded cannot be unresolved: that answer fails the stream.
        drop(s);
        lock(&st).unacked.insert(1, unacked(0, block(1, 100, None)));
        ack(&st, 1, ErrorCode::DELTA_UNRESOLVED);
        assert!(lock(&st).error.is_some());
    }

    #[test]
    fn the_in_order_prefix_waits_for_a_gap_and_counts_first_sizes() {
        let st = Mutex::new(State::default());
        for seq in 0..4 {
            lock(&st)
                .unacked
                .insert(seq, unacked(0, block(seq, 100, Some(10))));
        }
        ack(&st, 0, ErrorCode(0));
        ack(&st, 2, ErrorCode(0));
        ack(&st, 3, ErrorCode(0));
        let s = lock(&st);
        assert_eq!((s.acked_raw, s.wire_bytes), (300, 30));
        assert_eq!(s.prefix, (1, 100), "block 1 is missing");
        assert_eq!(s.queued_wire, 30);
        drop(s);
        // Block 1 cannot be resolved: it goes again raw, and counts at its encoded size.
        ack(&st, 1, ErrorCode::DELTA_UNRESOLVED);
        let raw = lock(&st).queue.remove(&1).expect("queued again");
        assert!(raw.encoded.is_none());
        lock(&st).unacked.insert(1, unacked(0, raw));
        ack(&st, 1, ErrorCode(0));
        let s = lock(&st);
        assert_eq!(s.prefix, (4, 400));
        assert_eq!(s.queued_wire, 40, "block 1 counted as queued");
        assert!(s.beyond.is_empty() && s.first_wire.is_empty());
        assert_eq!(s.wire_bytes, 130, "what crossed: block 1 raw");
    }
}
