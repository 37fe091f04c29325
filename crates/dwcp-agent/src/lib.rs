//! The DWCP node agent: accepts peers (mutual TLS + DWCP handshake), answers them, and serves
//! the admin HTTP port.
//!
//! ```text
//!   peers ──> listener ──> per-connection task: TLS ─ handshake ─ frames (PING -> PONG ...)
//!   peers ──> QUIC (UDP, same port) ──> per-stream task: handshake ─ frames
//!                                  │ metrics, logs
//!   scraper ─> admin HTTP: /healthz /readyz /metrics
//!   SIGTERM ─> stop accepting, GOAWAY to idle peers, wait up to the grace period, exit
//! ```
//!
//! Build with [`Agent::bind`], then drive with [`Agent::run`] and a shutdown future.

mod admin;
mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dwcp_control::Settings;
use dwcp_transport::quic::{self, QuicListener};
use dwcp_transport::session::Receiver;
use dwcp_transport::{ConnError, Endpoint, Framed, Stage, TlsConfigs};
use dwcp_wire::msg::{self, Close, Ping};
use dwcp_wire::{ErrorCode, FrameType, NodeId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

pub use metrics::{Metered, Metrics};

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// "peer listener" or "admin listener".
        what: &'static str,
        /// Address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The spool directory cannot be created.
    #[error("cannot create the spool directory {path}: {source}")]
    Spool {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The baseline cache cannot be opened.
    #[error("cannot open the baseline cache in {path}: {source}")]
    Cache {
        /// Its directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The admin server failed.
    #[error("admin HTTP server failed: {0}")]
    Admin(std::io::Error),
}

/// Longest the admin server gets to finish open requests at shutdown.
const ADMIN_SHUTDOWN: Duration = Duration::from_secs(2);

/// State shared between the accept loop, connection tasks and the admin server.
#[derive(Debug)]
struct Shared {
    endpoint: Endpoint,
    metrics: Metrics,
    ready: AtomicBool,
    /// Unix seconds after which this node's certificate is expired.
    cert_not_after: i64,
    idle_timeout: Duration,
    /// Receives transfer sessions (`dwcp send` to this agent) into `agent.spool_dir`.
    spool: Arc<Receiver>,
    /// Held by a scrape of `/metrics` (see `admin::metrics`).
    scrape: std::sync::Mutex<()>,
}

/// A bound, not yet running agent.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// QUIC sessions on the same port (UDP), when `transport.quic` is on.
    quic: Option<QuicListener>,
    admin: TcpListener,
    max_connections: usize,
    grace: Duration,
    /// Abandoned memory-image migration targets go after this long (`None`: kept).
    stale_target: Option<Duration>,
}

impl Agent {
    /// Binds the peer and admin listeners. `cert_not_after` (Unix seconds) feeds readiness
    /// and the certificate-expiry metric.
    pub async fn bind(
        node_id: NodeId,
        settings: &Settings,
        tls: TlsConfigs,
        cert_not_after: i64,
    ) -> Result<Self, AgentError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| AgentError::Bind {
                    what: "peer listener",
                    addr: settings.listen,
                    source,
                })?;
        let admin = TcpListener::bind(settings.admin_listen)
            .await
            .map_err(|source| AgentError::Bind {
                what: "admin listener",
                addr: settings.admin_listen,
                source,
            })?;
        let versions: Vec<String> = settings
            .versions
            .iter()
            .map(|v| v.number().to_string())
            .collect();
        let cache = if settings.capabilities.delta {
            Some(
                dwcp_transport::session::open_cache(&settings.cache).map_err(|source| {
                    AgentError::Cache {
                        path: settings
                            .cache
                            .dir
                            .as_ref()
                            .map_or_else(|| "memory".into(), |d| d.display().to_string()),
                        source,
                    }
                })?,
            )
        } else {
            None
        };
        let spool = Receiver::with_delta(
            &settings.spool_dir,
            settings.idle_timeout,
            true,
            settings.capabilities.delta,
            cache,
        )
        .map_err(|source| AgentError::Spool {
            path: settings.spool_dir.clone(),
            source,
        })?;
        if let Some(dir) = &settings.qemu_dir {
            spool.accept_qemu(dir);
        }
        let metrics = Metrics::new(node_id.as_str(), &versions.join(","));
        metrics.certificate_expiry.set(cert_not_after);
        let endpoint = Endpoint::new(node_id, settings, tls);
        let quic = if settings.capabilities.quic {
            // The TCP listener's port (it may have been chosen by the system).
            let addr = listener.local_addr().unwrap_or(settings.listen);
            Some(
                QuicListener::bind(&endpoint, addr).map_err(|e| AgentError::Bind {
                    what: "QUIC listener (UDP)",
                    addr,
                    source: std::io::Error::other(e.to_string()),
                })?,
            )
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint,
                metrics,
                ready: AtomicBool::new(false),
                cert_not_after,
                idle_timeout: settings.idle_timeout,
                spool,
                scrape: std::sync::Mutex::new(()),
            }),
            listener,
            quic,
            admin,
            max_connections: settings.max_connections as usize,
            grace: settings.shutdown_grace,
            stale_target: settings.stale_migration_target,
        })
    }

    /// Where peers connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Where the admin HTTP server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` completes, then stops accepting, asks peers to go away, waits
    /// up to the grace period for in-flight connections, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let Self {
            shared,
            listener,
            quic,
            admin,
            max_connections,
            grace,
            stale_target,
        } = self;
        let stop_conns = CancellationToken::new();
        let cut_conns = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(max_connections));
        let pending = Pending::new();

        let admin_task = tokio::spawn(admin::serve(
            admin,
            shared.clone(),
            stop_admin.clone().cancelled_owned(),
        ));
        // Targets of memory-image migrations whose sources went without a rollback (a crash,
        // a kill) would hold their disk space until the next migration of the same name.
        let sweeper = stale_target.map(|age| {
            let spool = shared.spool.clone();
            tokio::spawn(async move {
                let every = (age / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
                let mut tick = tokio::time::interval(every);
                // Removing a big target can take longer than the period.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    spool.drop_stale_targets(age).await;
                }
            })
        });
        shared.ready.store(true, Ordering::SeqCst);
        shared.metrics.ready.set(1);
        info!(
            node_id = %shared.endpoint.node_id,
            listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "agent ready"
        );

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(incoming) = async { quic.as_ref()?.accept().await }, if quic.is_some() => {
                    shared.metrics.connections_accepted.inc();
                    // As for TCP: no handshake work for a node that is full.
                    if limit.available_permits() == 0 {
                        shared.metrics.connections_refused.inc();
                        warn!(peer = %incoming.remote_address(), max_connections, "QUIC connection refused: limit reached");
                        incoming.refuse();
                        continue;
                    }
                    // Under a crowd of handshakes, a client proves its address first (one
                    // more round trip): spoofed sources then cost no handshake.
                    if !incoming.remote_address_validated()
                        && incoming.may_retry()
                        && pending.wants_proof(incoming.remote_address().ip())
                    {
                        let _ = incoming.retry();
                        continue;
                    }
                    let Some(slot) = pending.take(incoming.remote_address().ip()) else {
                        shared.metrics.connections_refused.inc();
                        debug!(peer = %incoming.remote_address(), "QUIC connection refused: too many handshakes in progress");
                        incoming.refuse();
                        continue;
                    };
                    let (shared, tracker2) = (shared.clone(), tracker.clone());
                    let (limit, stop, cut) = (limit.clone(), stop_conns.clone(), cut_conns.clone());
                    let peer = incoming.remote_address();
                    tracker.spawn(
                        async move {
                            tokio::select! {
                                () = serve_quic(shared, incoming, slot, tracker2, limit, stop, cut.clone()) => {}
                                () = cut.cancelled() => {}
                            }
                        }
                        .instrument(info_span!("quic", %peer)),
                    );
                }
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Per-connection accept errors (e.g. EMFILE) must not kill the
                            // listener; back off briefly so a persistent one does not spin.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    shared.metrics.connections_accepted.inc();
                    // No handshake work for a node that is full.
                    if limit.available_permits() == 0 {
                        shared.metrics.connections_refused.inc();
                        warn!(%peer, max_connections, "connection refused: limit reached");
                        drop(tcp);
                        continue;
                    }
                    let Some(slot) = pending.take(peer.ip()) else {
                        shared.metrics.connections_refused.inc();
                        debug!(%peer, "connection refused: too many handshakes in progress");
                        drop(tcp);
                        continue;
                    };
                    let shared = shared.clone();
                    let stop = stop_conns.clone();
                    let cut = cut_conns.clone();
                    let limit = limit.clone();
                    tracker.spawn(
                        async move {
                            tokio::select! {
                                () = serve_peer(&shared, tcp, peer, stop, Admit::After(slot, limit)) => {}
                                () = cut.cancelled() => {
                                    debug!("connection cut at the end of the grace period");
                                }
                            }
                        }
                        .instrument(info_span!("peer", %peer)),
                    );
                }
            }
        }

        shared.ready.store(false, Ordering::SeqCst);
        shared.metrics.ready.set(0);
        drop(listener);
        // New QUIC connections are refused from now on; open ones finish with their streams.
        if let Some(q) = &quic {
            q.refuse_new();
        }
        let open = tracker.len();
        info!(open_connections = open, grace = ?grace, "shutting down: no longer accepting");
        stop_conns.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                remaining = tracker.len(),
                "grace period over; cutting remaining connections"
            );
            cut_conns.cancel();
            // Cut tasks return at their next await point; this wait is short.
            let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        }
        stop_admin.cancel();
        // axum waits for open admin connections to finish; one stuck client must not keep the
        // agent from exiting.
        let admin_abort = admin_task.abort_handle();
        match tokio::time::timeout(ADMIN_SHUTDOWN, admin_task).await {
            Ok(Ok(r)) => r.map_err(AgentError::Admin)?,
            Ok(Err(e)) => warn!(error = %e, "admin server task ended abnormally"),
            Err(_) => {
                warn!("admin connections still open after {ADMIN_SHUTDOWN:?}; closing them");
                admin_abort.abort();
            }
        }
        if let Some(s) = sweeper {
            s.abort();
        }
        if let Some(q) = quic {
            q.close().await;
        }
        info!("agent stopped");
        Ok(())
    }
}

/// Runs one peer connection: handshake, then frames until the peer leaves, errs, idles out,
/// or the agent shuts down.
async fn serve_peer(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
    admit: Admit,
) {
    let m = &shared.metrics;
    m.connections_active.inc();
    // Decrements on every exit, including cancellation when the grace period runs out.
    let _active = scopeguard(|| {
        m.connections_active.dec();
    });
    if let Err(e) = shared.endpoint.socket.tune_accepted(&tcp) {
        debug!("cannot tune the socket: {e}");
    }
    let io = Metered::new(tcp, m.bytes_received.clone(), m.bytes_sent.clone());
    let handshake = dwcp_transport::accept(&shared.endpoint, io, peer);
    handshake_then_serve(shared, handshake, &stop, admit).await;
}

/// How a connection holds its place among `agent.max_connections`.
enum Admit {
    /// Already (a QUIC stream, of a connection authenticated before).
    Held(tokio::sync::OwnedSemaphorePermit),
    /// Once its handshake is done, if a slot is free; until then, among the pending ones.
    After(PendingSlot, Arc<Semaphore>),
}

/// Counts a connection's (or QUIC stream's) DWCP handshake, then serves its frames; stops
/// early when the agent shuts down during the handshake.
async fn handshake_then_serve<T>(
    shared: &Shared,
    handshake: impl Future<Output = Result<Framed<T>, ConnError>>,
    stop: &CancellationToken,
    admit: Admit,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let m = &shared.metrics;
    let accepted = tokio::select! {
        () = stop.cancelled() => None,
        r = handshake => Some(r),
    };
    match accepted {
        None => debug!("shutdown during handshake"),
        Some(Err(e)) => {
            m.handshake("failed", e.reason(), "");
            warn!(reason = e.reason(), "handshake failed: {e}");
        }
        Some(Ok(conn)) => {
            let _permit = match admit {
                Admit::Held(p) => p,
                Admit::After(slot, limit) => {
                    drop(slot);
                    let Ok(p) = limit.try_acquire_owned() else {
                        m.connections_refused.inc();
                        warn!(peer_node = %conn.established().peer_node_id, "connection refused after its handshake: limit reached");
                        conn.close(ErrorCode::OVERLOADED, "connection limit reached")
                            .await;
                        return;
                    };
                    p
                }
            };
            let est = conn.established();
            let version = est.version.to_string();
            m.handshake("ok", "", &version);
            info!(
                peer_node = %est.peer_node_id,
                version = %version,
                max_streams = est.negotiated.max_streams,
                "peer connected"
            );
            if let Err(e) = serve_frames(shared, conn, stop).await {
                warn!(reason = e.reason(), "connection ended: {e}");
            }
        }
    }
}

/// Runs one QUIC connection: its TLS handshake, then each stream the peer opens in its own
/// task (handshake, then frames), every stream counted against `agent.max_connections`.
async fn serve_quic(
    shared: Arc<Shared>,
    incoming: quic::Incoming,
    slot: PendingSlot,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    cut: CancellationToken,
) {
    let m = &shared.metrics;
    let accepted = tokio::select! {
        () = stop.cancelled() => return,
        r = quic::accept_connection(&shared.endpoint, incoming) => r,
    };
    // Authenticated (or not): no longer pending.
    drop(slot);
    let conn = match accepted {
        Ok(c) => c,
        Err(e) => {
            m.handshake("failed", e.reason(), "");
            warn!(reason = e.reason(), "QUIC handshake failed: {e}");
            return;
        }
    };
    let addr = conn.remote_address();
    let peer_id = conn.node_id().clone();
    // Streams of this connection being served.
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let io = tokio::select! {
            () = stop.cancelled() => {
                // Held while its streams say goodbye (dropping it would drop their
                // GOAWAYs), then closed: a sender keeping it for its next transfer (its
                // keep-alives holding it up) would hold it to the grace period's end. Closed
                // at once without streams; with some, half a second after they are done
                // (time for their last bytes). Or the sender closes it, or the grace ends.
                let mut had_streams = false;
                loop {
                    if open.load(Ordering::SeqCst) == 0 {
                        if had_streams {
                            tokio::select! {
                                () = conn.closed() => return,
                                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                        conn.close("shutting down");
                        return;
                    }
                    had_streams = true;
                    tokio::select! {
                        () = conn.closed() => return,
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
            io = conn.next_stream() => match io {
                Some(io) => io,
                None => {
                    debug!("QUIC connection closed");
                    return;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            m.connections_refused.inc();
            warn!(%addr, "QUIC stream refused: connection limit reached");
            drop(io);
            continue;
        };
        let (shared, stop, peer_id) = (shared.clone(), stop.clone(), peer_id.clone());
        open.fetch_add(1, Ordering::SeqCst);
        // Made here, not in the task: a task dropped before it ran counts down too.
        let counted = {
            let open = open.clone();
            scopeguard(move || {
                open.fetch_sub(1, Ordering::SeqCst);
            })
        };
        let serve = async move {
            let _counted = counted;
            let m = &shared.metrics;
            m.connections_active.inc();
            let _active = scopeguard(|| {
                m.connections_active.dec();
            });
            let io = Metered::new(io, m.bytes_received.clone(), m.bytes_sent.clone());
            let handshake = quic::accept_stream(&shared.endpoint, io, peer_id, addr);
            handshake_then_serve(&shared, handshake, &stop, Admit::Held(permit)).await;
        };
        let cut = cut.clone();
        // As TCP connections are: the grace period bounds every stream.
        tracker.spawn(
            async move {
                tokio::select! {
                    () = serve => {}
                    () = cut.cancelled() => {}
                }
            }
            .instrument(info_span!("stream")),
        );
    }
}

/// Connections still in their TLS and DWCP handshakes, at most (TCP, and QUIC connections
/// in their TLS handshake): clients not yet authenticated share these, and take none of the
/// `agent.max_connections` slots, which only authenticated peers hold. A client that
/// connects and sends nothing is dropped at the handshake timeout.
const MAX_HANDSHAKES: usize = 64;
/// Of those, from one address at most: one host cannot take them all.
const MAX_HANDSHAKES_PER_IP: usize = 16;

/// The handshakes in progress (see [`MAX_HANDSHAKES`]).
#[derive(Debug)]
struct Pending {
    all: Arc<Semaphore>,
    per_ip: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake's place among the pending ones, given back when dropped.
#[derive(Debug)]
struct PendingSlot {
    pending: Arc<Pending>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Pending {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            all: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            per_ip: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// A place for a handshake from `ip`, if one is free.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PendingSlot> {
        let mut per_ip = self
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if per_ip.get(&ip).is_some_and(|&n| n >= MAX_HANDSHAKES_PER_IP) {
            return None;
        }
        // First: an address refused for want of places leaves nothing behind.
        let permit = self.all.clone().try_acquire_owned().ok()?;
        *per_ip.entry(ip).or_insert(0) += 1;
        Some(PendingSlot {
            pending: self.clone(),
            ip,
            _permit: permit,
        })
    }

    /// Whether a QUIC client from `ip` should prove its address before its handshake: when
    /// most places are taken, or when that address holds one already (a forged source
    /// could otherwise take a peer's places without ever answering).
    fn wants_proof(&self, ip: IpAddr) -> bool {
        self.all.available_permits() < MAX_HANDSHAKES / 2
            || self
                .per_ip
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(&ip)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut per_ip = self
            .pending
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnMut()>(f: F) -> impl Drop {
    struct Guard<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    Guard(f)
}

async fn serve_frames<T>(
    shared: &Shared,
    conn: Framed<T>,
    stop: &CancellationToken,
) -> Result<(), ConnError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let peer = conn.established().peer_node_id.clone();
    let max_streams = conn.established().negotiated.max_streams;
    let (mut reader, mut writer) = conn.split();
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => {
                writer.close(ErrorCode::SHUTTING_DOWN, "agent is shutting down").await;
                return Ok(());
            }
            r = tokio::time::timeout(shared.idle_timeout, reader.recv()) => r,
        };
        let frame = match next {
            Err(_) => {
                let reason = format!("idle for {:?}", shared.idle_timeout);
                debug!("{reason}; closing");
                writer.close(ErrorCode::TIMEOUT, &reason).await;
                return Ok(());
            }
            Ok(Ok(None)) => {
                debug!("peer closed the connection");
                return Ok(());
            }
            Ok(Err(e)) => {
                if let ConnError::Frame(fe) = &e {
                    writer.close(fe.code(), &fe.to_string()).await;
                }
                return Err(e);
            }
            Ok(Ok(Some(frame))) => frame,
        };
        shared.metrics.frame(frame.ty.name());
        match frame.ty {
            // The connection belongs to a transfer session: the spool receiver takes it over.
            FrameType::SESSION => {
                let served = shared
                    .spool
                    .serve(peer, frame, reader, writer, max_streams, stop)
                    .await?;
                debug!(?served, "session stream ended");
                return Ok(());
            }
            FrameType::PING => match msg::decode::<Ping>(&frame) {
                // Bounded: a peer that pings but never reads must not pin this task.
                Ok(ping) => tokio::time::timeout(
                    shared.idle_timeout,
                    writer.send(&msg::encode(FrameType::PONG, &ping)),
                )
                .await
                .map_err(|_| ConnError::Timeout {
                    stage: Stage::Established,
                    after: shared.idle_timeout,
                })??,
                Err(e) => {
                    writer
                        .close(ErrorCode::PROTOCOL_ERROR, &e.to_string())
                        .await;
                    return Err(dwcp_wire::HandshakeError::from(e).into());
                }
            },
            // REJECT here means the client refused our HELLO_ACK (PROTOCOL.md, "Handshake",
            // step 4); either way the peer is closing and says why.
            FrameType::GOAWAY | FrameType::REJECT => {
                match msg::decode::<Close>(&frame) {
                    Ok(close) if frame.ty == FrameType::REJECT => warn!(
                        code = %close.error_code(),
                        "peer refused the handshake after our HELLO_ACK: {}",
                        close.printable_reason()
                    ),
                    Ok(close) => debug!(
                        code = %close.error_code(),
                        "peer closed: {}",
                        close.printable_reason()
                    ),
                    Err(e) => debug!("peer closed with a malformed {}: {e}", frame.ty.name()),
                }
                return Ok(());
            }
            // Unsolicited answers are harmless: nothing here sends PINGs of its own yet.
            FrameType::PONG => {}
            ty if ty.is_extension() => debug!(ty = ty.0, "skipping unknown extension frame"),
            ty => {
                let err = dwcp_wire::HandshakeError::UnexpectedFrame {
                    ty: ty.0,
                    name: ty.name(),
                };
                writer.close(err.code(), &err.to_string()).await;
                return Err(err.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn handshake_places_are_shared_and_bounded_per_address() {
        let p = Pending::new();
        // One address gets its share, no more.
        let mine: Vec<_> = (0..MAX_HANDSHAKES_PER_IP)
            .map(|_| p.take(ip(1)).unwrap())
            .collect();
        assert!(p.take(ip(1)).is_none());
        // A QUIC client from an address that holds places proves its address first.
        assert!(p.wants_proof(ip(1)));
        assert!(!p.wants_proof(ip(2)));
        // The rest go to others, until none is left.
        let others: Vec<_> = (0..MAX_HANDSHAKES - MAX_HANDSHAKES_PER_IP)
            .map(|i| p.take(ip(100 + i as u32)).unwrap())
            .collect();
        assert!(p.take(ip(9999)).is_none());
        // A refused address leaves nothing behind.
        assert!(!p.per_ip.lock().unwrap().contains_key(&ip(9999)));
        assert!(p.wants_proof(ip(2)), "crowded");
        drop(others);
        drop(mine);
        assert!(p.per_ip.lock().unwrap().is_empty());
        assert_eq!(p.all.available_permits(), MAX_HANDSHAKES);
    }
}
