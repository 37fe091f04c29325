//! Tunnels: a live byte stream of unknown length (a QEMU migration stream) carried as
//! numbered blocks (`TUNNEL_DATA`) over several connections of one session, without the
//! per-object round trips of files. The receiver acknowledges each block once it has taken
//! it (`TUNNEL_ACK`); a block on a connection that dies goes out again on another; a block
//! the receiver cannot resolve against its cache goes out again raw. The caller bounds what
//! is unacknowledged (its window), so memory stays bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dwcp_wire::data::{self, SessionJoin, TunnelAck, TunnelHeader};
use dwcp_wire::msg;
use dwcp_wire::{ErrorCode, FrameType, NodeId};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::send::SendError;
use crate::conn::{Endpoint, connect_to};

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

#[derive(Debug, Default)]
struct State {
    /// Waiting for a connection, by seq (resends go first: lowest seq first).
    queue: BTreeMap<u64, Arc<Block>>,
    /// Sent on connection `.0`, not acknowledged.
    unacked: HashMap<u64, (usize, Arc<Block>)>,
    acked_blocks: u64,
    acked_raw: u64,
    /// Raw bytes of acknowledged blocks sent encoded, and what went on the wire for them.
    wire_bytes: u64,
    /// What blocks sent again raw added over their encoded size.
    raw_growth: u64,
    resent_raw: u64,
    alive: usize,
    /// Blocks acknowledged since the last [`Tunnel::take_acked`]: seq, and whether the
    /// receiver decoded it (it went out encoded) rather than took it raw.
    acked_log: Vec<(u64, bool)>,
    /// Connections known dead.
    dead: std::collections::HashSet<usize>,
    error: Option<String>,
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
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tunnel {
    /// Opens `streams` connections to `addr` for the stream `name`.
    pub async fn open(
        endpoint: &Endpoint,
        addr: std::net::SocketAddr,
        expected: Option<&NodeId>,
        streams: u32,
        name: &str,
    ) -> Result<Self, SendError> {
        let first = connect_to(endpoint, addr, expected)
            .await
            .map_err(SendError::Connect)?;
        let peer = first.established().peer_node_id.clone();
        let n = streams.clamp(1, first.established().negotiated.max_streams.max(1));
        let mut conns = vec![first];
        let mut dials = JoinSet::new();
        for _ in 1..n {
            let endpoint = endpoint.clone();
            let peer = peer.clone();
            dials.spawn(async move { connect_to(&endpoint, addr, Some(&peer)).await });
        }
        while let Some(r) = dials.join_next().await {
            match r {
                Ok(Ok(c)) => conns.push(c),
                Ok(Err(e)) => warn!("tunnel: cannot open a stream: {e}"),
                Err(e) => warn!("tunnel: dial task failed: {e}"),
            }
        }
        let id: [u8; 16] = super::send::rand_id();
        let state = Arc::new(Mutex::new(State {
            alive: conns.len(),
            ..State::default()
        }));
        let work = Arc::new(Notify::new());
        let progress = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();
        let mut max_block = usize::MAX;
        for (i, conn) in conns.into_iter().enumerate() {
            let (mut reader, mut writer) = conn.split();
            let join = SessionJoin {
                session_id: id.to_vec(),
                stream_index: i as u32,
            };
            writer
                .send(&msg::encode(FrameType::SESSION, &join))
                .await
                .map_err(SendError::Connect)?;
            // Room for the TUNNEL_DATA header and the name.
            max_block = max_block.min(writer.max_chunk().saturating_sub(16 + 255));
            let (st, wk, pg, nm) = (
                state.clone(),
                work.clone(),
                progress.clone(),
                name.to_string(),
            );
            tasks.spawn(async move {
                let why = loop {
                    let next = {
                        // Registered before the queue is looked at, so that a block queued
                        // in between wakes it (notify_waiters keeps no permit).
                        let notified = wk.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let b = {
                            let mut s = lock(&st);
                            if s.error.is_some() || s.dead.contains(&i) {
                                return;
                            }
                            let first = s.queue.keys().next().copied();
                            first.and_then(|k| s.queue.remove(&k)).inspect(|b| {
                                s.unacked.insert(b.seq, (i, b.clone()));
                            })
                        };
                        match b {
                            Some(b) => b,
                            None => {
                                let _ = tokio::time::timeout(Duration::from_millis(500), notified)
                                    .await;
                                continue;
                            }
                        }
                    };
                    let (encoding, bytes) = next
                        .encoded
                        .clone()
                        .unwrap_or((data::TUNNEL_RAW, next.raw.clone()));
                    let h = TunnelHeader {
                        name: nm.clone(),
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
                };
                stream_lost(&st, &wk, &pg, i, &why);
            });
            let (st, wk, pg) = (state.clone(), work.clone(), progress.clone());
            tasks.spawn(async move {
                let why = loop {
                    match reader.recv().await {
                        Ok(Some(f)) if f.ty == FrameType::TUNNEL_ACK => {
                            let ack: TunnelAck = match msg::decode(&f) {
                                Ok(a) => a,
                                Err(e) => break e.to_string(),
                            };
                            on_ack(&st, &wk, &pg, &ack);
                        }
                        Ok(Some(f)) if f.ty == FrameType::GOAWAY => {
                            let g: Result<msg::Close, _> = msg::decode(&f);
                            break g.map_or_else(|e| e.to_string(), |g| g.printable_reason());
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break "closed by the receiver".to_string(),
                        Err(e) => break e.to_string(),
                    }
                };
                stream_lost(&st, &wk, &pg, i, &why);
            });
        }
        debug!(name, streams = n, "tunnel open");
        Ok(Self {
            name: name.to_string(),
            state,
            work,
            progress,
            tasks: Mutex::new(tasks),
            max_block,
        })
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

    /// What the blocks sent again raw (the receiver could not resolve their encoding) take on
    /// the wire beyond their encoded size: a caller that counted a block's wire bytes when it
    /// queued the block subtracts this from the acknowledged wire bytes to stay consistent.
    pub fn raw_growth(&self) -> u64 {
        lock(&self.state).raw_growth
    }

    /// The blocks acknowledged since the last call: seq, and whether the receiver decoded it
    /// (so holds the chunks it sent literally in its cache, if it has one) or took it raw.
    /// At most the last 65,536 are kept between calls.
    pub fn take_acked(&self) -> Vec<(u64, bool)> {
        std::mem::take(&mut lock(&self.state).acked_log)
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
    }
}

fn on_ack(st: &Mutex<State>, work: &Notify, progress: &Notify, ack: &TunnelAck) {
    let mut s = lock(st);
    let Some((_, b)) = s.unacked.remove(&ack.seq) else {
        return; // a block acknowledged twice (sent again after a stream loss)
    };
    if ack.code == ErrorCode::DELTA_UNRESOLVED.0 && b.encoded.is_some() {
        // The receiver lacks a chunk the block referred to: send it raw.
        debug!(seq = ack.seq, "tunnel block unresolved; sending it raw");
        s.resent_raw += b.raw.len() as u64;
        let encoded = b.encoded.as_ref().map_or(0, |e| e.1.len());
        s.raw_growth += b.raw.len().saturating_sub(encoded) as u64;
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
        s.acked_raw += b.raw.len() as u64;
        s.wire_bytes += b.encoded.as_ref().map_or(b.raw.len(), |e| e.1.len()) as u64;
        if s.acked_log.len() < MAX_ACKED_LOG {
            s.acked_log.push((b.seq, b.encoded.is_some()));
        }
    }
    drop(s);
    progress.notify_waiters();
    work.notify_waiters();
}

fn stream_lost(st: &Mutex<State>, work: &Notify, progress: &Notify, i: usize, why: &str) {
    let mut s = lock(st);
    if !s.dead.insert(i) {
        return; // its other task noticed first
    }
    s.alive = s.alive.saturating_sub(1);
    // Its unacknowledged blocks go out again on the others.
    let mine: Vec<u64> = s
        .unacked
        .iter()
        .filter(|(_, (c, _))| *c == i)
        .map(|(k, _)| *k)
        .collect();
    for k in mine {
        if let Some((_, b)) = s.unacked.remove(&k) {
            s.resent_raw += b.raw.len() as u64;
            s.queue.insert(k, b);
        }
    }
    if s.error.is_none() {
        warn!(stream = i, "tunnel stream lost: {why}");
        if s.alive == 0 {
            s.error = Some(format!("every tunnel stream failed (last: {why})"));
        }
    }
    drop(s);
    work.notify_waiters();
    progress.notify_waiters();
}
