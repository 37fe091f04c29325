//! Receiving transfer sessions into a directory: the driver around [`Ranges`].
//!
//! Every connection of a session is served by its own task ([`Receiver::serve`]); they share
//! the session's object table. Chunks are written at their offsets as they arrive (no
//! reordering buffer: memory per connection is one frame), the contiguous prefix is
//! acknowledged and recorded in a small state file next to the partial file, and at the end the
//! whole file is hashed and compared with the sender's BLAKE3 digest before it is renamed into
//! place. A sender that reconnects after a failure is told how much is already here and resumes
//! from there.
//!
//! Files in the output directory, for an object named `NAME`:
//!
//! ```text
//! .NAME.dwcp-part    the bytes received so far, at their offsets
//! .NAME.dwcp-state   "dwcp-part 1\n<version tag>\n<size>\n<contiguous bytes>\n"
//! NAME               the verified file (the part file renamed)
//! ```

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dwcp_wire::data::{self, Ack, ObjectBegin, ObjectDone, ObjectEnd, ObjectState, SessionJoin};
use dwcp_wire::msg::{self, Close, Ping};
use dwcp_wire::{ErrorCode, Frame, FrameType, HandshakeError, NodeId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::reasm::Ranges;
use crate::conn::{ConnError, FrameReader, FrameWriter};

/// Acknowledge at least every this many new contiguous bytes.
const ACK_STEP: u64 = 1024 * 1024;

/// Most separate byte ranges held beyond the contiguous prefix of one object. A sender keeps
/// at most a window (32 MiB by default, in 256 KiB chunks: ~128 ranges) outstanding; far more
/// means it is not following the protocol, and the bookkeeping must stay bounded.
const MAX_ISLANDS: usize = 16_384;

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
    },
    /// An object failed (digest mismatch, storage error).
    Failed {
        /// Sending node.
        peer: NodeId,
        /// Object name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The sender closed a session in good order (after its last object).
    SessionDone {
        /// Sending node.
        peer: NodeId,
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
    part: PathBuf,
    state: PathBuf,
    tag: String,
    ranges: Ranges,
    acked: u64,
    resumed_from: u64,
    digest: Option<Vec<u8>>,
    finishing: bool,
}

#[derive(Debug, Default)]
struct RxSession {
    objects: HashMap<u64, RxObject>,
    goodbye: bool,
    /// Connections of the session being served; at 0 the session is forgotten (what it
    /// stored is on disk, and a resuming sender opens a new session).
    conns: usize,
}

type SessionMap = HashMap<(NodeId, Vec<u8>), Arc<Mutex<RxSession>>>;

/// Receives sessions into a directory.
#[derive(Debug)]
pub struct Receiver {
    dir: PathBuf,
    sessions: Mutex<SessionMap>,
    events: broadcast::Sender<RecvEvent>,
    idle: Duration,
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
    /// Receives into `dir` (created if missing); a connection silent for `idle` is dropped.
    pub fn new(dir: &Path, idle: Duration) -> std::io::Result<Arc<Self>> {
        fs::create_dir_all(dir)?;
        let (events, _) = broadcast::channel(256);
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            sessions: Mutex::new(HashMap::new()),
            events,
            idle,
        }))
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
        lock(&s).conns += 1;
        s
    }

    fn leave(&self, peer: &NodeId, id: &[u8], session: &Mutex<RxSession>) {
        let mut map = lock(&self.sessions);
        let mut s = lock(session);
        s.conns = s.conns.saturating_sub(1);
        if s.conns == 0 {
            map.remove(&(peer.clone(), id.to_vec()));
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
        let result = self
            .serve_stream(peer.clone(), &session, reader, writer, stop)
            .await;
        self.leave(&peer, &join.session_id, &session);
        result
    }

    async fn serve_stream<R, W>(
        &self,
        peer: NodeId,
        session: &Mutex<RxSession>,
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
                () = stop.cancelled() => {
                    writer.close(ErrorCode::SHUTTING_DOWN, "receiver is shutting down").await;
                    return Ok(Served::Dropped);
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
                    let checked = {
                        let s = lock(session);
                        match s.objects.get(&h.object) {
                            None => Err(format!("data for unknown object {}", h.object)),
                            Some(o) if h.offset + chunk.len() as u64 > o.size => Err(format!(
                                "chunk at {} ({} bytes) runs past the object's size {}",
                                h.offset,
                                chunk.len(),
                                o.size
                            )),
                            Some(o) => Ok(o.file.clone()),
                        }
                    };
                    let file = match checked {
                        Ok(f) => f,
                        Err(detail) => return Err(self.violation(writer, detail).await),
                    };
                    let offset = h.offset;
                    let written = tokio::task::spawn_blocking(move || {
                        file.write_all_at(&chunk, offset)
                            .map(|()| chunk.len() as u64)
                    })
                    .await;
                    let len = match written {
                        Ok(Ok(n)) => n,
                        Ok(Err(e)) => {
                            let reason = format!("cannot write: {e}");
                            self.fail_object(&peer, session, h.object, &reason);
                            let done = ObjectDone {
                                object: h.object,
                                code: ErrorCode::STORAGE_ERROR.0,
                                reason,
                            };
                            writer
                                .send(&msg::encode(FrameType::OBJECT_DONE, &done))
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
                        o.ranges.insert(offset, offset + len);
                        if o.ranges.islands() > MAX_ISLANDS {
                            Err(format!(
                                "more than {MAX_ISLANDS} separate ranges outstanding: the sender \
                                 ignores its window"
                            ))
                        } else {
                            let c = o.ranges.contiguous();
                            if c >= o.acked + ACK_STEP || (c == o.size && o.acked < c) {
                                o.acked = c;
                                save_state(o);
                                Ok(Some(c))
                            } else {
                                Ok(None)
                            }
                        }
                    };
                    let ack = match ack {
                        Ok(a) => a,
                        Err(detail) => return Err(self.violation(writer, detail).await),
                    };
                    if let Some(offset) = ack {
                        let a = Ack {
                            object: h.object,
                            offset,
                        };
                        writer.send(&msg::encode(FrameType::ACK, &a)).await?;
                    }
                    self.maybe_finish(&peer, session, h.object, &mut writer)
                        .await?;
                }
                FrameType::OBJECT_BEGIN => {
                    let begin: ObjectBegin = msg::decode(&frame).map_err(HandshakeError::from)?;
                    let reply = match self.begin(session, &begin) {
                        Ok(have) => msg::encode(
                            FrameType::OBJECT_STATE,
                            &ObjectState {
                                object: begin.object,
                                have,
                            },
                        ),
                        Err(reason) => {
                            warn!(%peer, name = %msg::printable(&begin.name, 200), "refusing object: {reason}");
                            msg::encode(
                                FrameType::OBJECT_DONE,
                                &ObjectDone {
                                    object: begin.object,
                                    code: ErrorCode::STORAGE_ERROR.0,
                                    reason,
                                },
                            )
                        }
                    };
                    writer.send(&reply).await?;
                }
                FrameType::OBJECT_END => {
                    let end: ObjectEnd = msg::decode(&frame).map_err(HandshakeError::from)?;
                    let problem = {
                        let mut s = lock(session);
                        match s.objects.get_mut(&end.object) {
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
                    self.maybe_finish(&peer, session, end.object, &mut writer)
                        .await?;
                }
                FrameType::PING => {
                    let p: Ping = msg::decode(&frame).map_err(HandshakeError::from)?;
                    writer.send(&msg::encode(FrameType::PONG, &p)).await?;
                }
                FrameType::GOAWAY => {
                    let close: Close = msg::decode(&frame).map_err(HandshakeError::from)?;
                    if close.error_code() == ErrorCode::NO_ERROR {
                        let first_goodbye = !std::mem::replace(&mut lock(session).goodbye, true);
                        if first_goodbye {
                            let _ = self.events.send(RecvEvent::SessionDone { peer });
                        }
                        return Ok(Served::Goodbye);
                    }
                    debug!(%peer, "sender closed the stream: {}", close.printable_reason());
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
    fn begin(&self, session: &Mutex<RxSession>, b: &ObjectBegin) -> Result<u64, String> {
        check_name(&b.name)?;
        let mut s = lock(session);
        if let Some(o) = s.objects.get(&b.object) {
            // A repeated BEGIN (e.g. on a replacement stream): same answer.
            if o.name == b.name && o.size == b.size {
                return Ok(o.ranges.contiguous());
            }
            return Err(format!(
                "object {} was begun with another name or size",
                b.object
            ));
        }
        let part = self.dir.join(format!(".{}.dwcp-part", b.name));
        let state = self.dir.join(format!(".{}.dwcp-state", b.name));
        // One line in the state file: control characters cannot split it.
        let tag = msg::printable(&b.version_tag, 200);
        let have = read_state(&state)
            .filter(|(t, size, _)| *t == tag && *size == b.size)
            .map_or(0, |(_, _, have)| have);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(have == 0)
            .open(&part)
            .map_err(|e| format!("cannot open {}: {e}", part.display()))?;
        // Never trust the state beyond what the part file holds.
        let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
        let have = have.min(on_disk).min(b.size);
        // Refuse now what cannot fit, rather than fail with a full disk halfway through.
        if let Ok(st) = rustix::fs::fstatvfs(&file) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let need = b.size - have;
            if need > free {
                return Err(format!(
                    "not enough space in {}: {need} bytes needed, {free} available",
                    self.dir.display()
                ));
            }
        }
        file.set_len(b.size)
            .map_err(|e| format!("cannot size {}: {e}", part.display()))?;
        if have > 0 {
            info!(name = %b.name, have, size = b.size, "resuming object");
        }
        let mut o = RxObject {
            name: b.name.clone(),
            size: b.size,
            file: Arc::new(file),
            part,
            state,
            tag,
            ranges: Ranges::with_prefix(have),
            acked: have,
            resumed_from: have,
            digest: None,
            finishing: false,
        };
        save_state(&mut o);
        s.objects.insert(b.object, o);
        Ok(have)
    }

    fn fail_object(&self, peer: &NodeId, session: &Mutex<RxSession>, object: u64, reason: &str) {
        let name = lock(session)
            .objects
            .remove(&object)
            .map(|o| o.name)
            .unwrap_or_default();
        warn!(%peer, %name, "object failed: {reason}");
        let _ = self.events.send(RecvEvent::Failed {
            peer: peer.clone(),
            name,
            reason: reason.to_string(),
        });
    }

    /// Verifies and stores the object once every byte and the digest are here.
    async fn maybe_finish<W: AsyncWrite + Unpin>(
        &self,
        peer: &NodeId,
        session: &Mutex<RxSession>,
        object: u64,
        writer: &mut FrameWriter<W>,
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
                o.file.clone(),
                o.part.clone(),
                o.state.clone(),
                self.dir.join(&o.name),
                digest,
                o.name.clone(),
                o.size,
                o.resumed_from,
            )
        };
        let (file, part, state, path, digest, name, size, resumed_from) = job;
        let final_path = path.clone();
        let started = Instant::now();
        let verdict = tokio::task::spawn_blocking(move || -> Result<(), (ErrorCode, String)> {
            file.sync_data()
                .map_err(|e| (ErrorCode::STORAGE_ERROR, format!("cannot sync: {e}")))?;
            let got = hash_file(&part)
                .map_err(|e| (ErrorCode::STORAGE_ERROR, format!("cannot read back: {e}")))?;
            if got.as_bytes()[..] != digest[..] {
                let _ = fs::remove_file(&part);
                let _ = fs::remove_file(&state);
                return Err((
                    ErrorCode::CHECKSUM_MISMATCH,
                    format!(
                        "BLAKE3 digest mismatch: received {}, sender has {}",
                        got.to_hex(),
                        hex(&digest)
                    ),
                ));
            }
            fs::rename(&part, &final_path).map_err(|e| {
                (
                    ErrorCode::STORAGE_ERROR,
                    format!("cannot rename into {}: {e}", final_path.display()),
                )
            })?;
            let _ = fs::remove_file(&state);
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err((ErrorCode::INTERNAL_ERROR, e.to_string())));
        lock(session).objects.remove(&object);
        let done = match verdict {
            Ok(()) => {
                info!(%peer, %name, size, verify_ms = started.elapsed().as_millis() as u64, "object stored");
                let _ = self.events.send(RecvEvent::Stored {
                    peer: peer.clone(),
                    name,
                    path,
                    size,
                    resumed_from,
                });
                ObjectDone {
                    object,
                    code: 0,
                    reason: String::new(),
                }
            }
            Err((code, reason)) => {
                warn!(%peer, %name, "object failed: {reason}");
                let _ = self.events.send(RecvEvent::Failed {
                    peer: peer.clone(),
                    name,
                    reason: reason.clone(),
                });
                ObjectDone {
                    object,
                    code: code.0,
                    reason,
                }
            }
        };
        writer
            .send(&msg::encode(FrameType::OBJECT_DONE, &done))
            .await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; the data (object tables) stays
    // consistent enough to keep serving other sessions, so recover the guard.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Records the acknowledged prefix so a restarted receiver can resume. Best effort: a state
/// file that claims too much is caught by the final digest check, never silently accepted.
fn save_state(o: &mut RxObject) {
    let text = format!("dwcp-part 1\n{}\n{}\n{}\n", o.tag, o.size, o.acked);
    if let Err(e) = fs::write(&o.state, text) {
        warn!(path = %o.state.display(), "cannot record progress: {e}");
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
}
