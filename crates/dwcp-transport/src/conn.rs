//! Connections between nodes: TCP, then mutual TLS, then the DWCP handshake, each step under
//! its own timeout; afterwards a framed, checksummed message channel.
//!
//! This is the tokio driver around the sans-IO [`Handshake`] and [`FrameCodec`] of
//! `dwcp-wire`: it moves bytes and passes time in, and holds no protocol logic of its own.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dwcp_control::Settings;
use dwcp_wire::msg::{self, Close};
use dwcp_wire::{
    Capabilities, ClusterId, ErrorCode, Established, Frame, FrameCodec, FrameError, FrameType,
    Handshake, HandshakeError, LocalParams, NodeId, Outcome, Version,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::net::SocketOptions;
use crate::pki::node_id_from_cert;
use crate::tls::{TlsConfigs, TlsFailure, classify};

/// Everything a node needs to open or accept connections.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// This node.
    pub node_id: NodeId,
    /// Its cluster.
    pub cluster_id: ClusterId,
    /// Versions offered / accepted.
    pub versions: Vec<Version>,
    /// Capabilities advertised.
    pub capabilities: Capabilities,
    /// TLS configurations (from the node's credentials).
    pub tls: TlsConfigs,
    /// TCP connect timeout (dialling only).
    pub connect_timeout: Duration,
    /// TLS handshake timeout.
    pub tls_timeout: Duration,
    /// DWCP handshake timeout.
    pub handshake_timeout: Duration,
    /// How peer sockets are tuned.
    pub socket: SocketOptions,
    /// QUIC's congestion control (`bbr`, `cubic`, `reno`).
    pub quic_congestion: String,
}

impl Endpoint {
    /// An endpoint for `node_id` with the protocol settings of `settings`.
    pub fn new(node_id: NodeId, settings: &Settings, tls: TlsConfigs) -> Self {
        Self {
            node_id,
            cluster_id: settings.cluster_id.clone(),
            versions: settings.versions.clone(),
            capabilities: settings.capabilities.clone(),
            tls,
            connect_timeout: settings.tls_timeout,
            tls_timeout: settings.tls_timeout,
            handshake_timeout: settings.handshake_timeout,
            socket: SocketOptions {
                congestion: settings.congestion.clone(),
                buffer: settings.socket_buffer,
                keepalive: settings.keepalive,
                notsent_lowat: settings.notsent_lowat,
            },
            quic_congestion: settings.quic_congestion.clone(),
        }
    }

    pub(crate) fn local_params(&self) -> LocalParams {
        LocalParams {
            node_id: self.node_id.clone(),
            cluster_id: self.cluster_id.clone(),
            versions: self.versions.clone(),
            capabilities: self.capabilities.clone(),
            timeout: self.handshake_timeout,
        }
    }
}

/// What a session's streams ride on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Carrier {
    /// One TCP connection per stream, each with its own TLS session and congestion window.
    #[default]
    Tcp,
    /// One QUIC connection (UDP) whose streams share one TLS session and congestion window.
    Quic,
    /// QUIC on internet paths when TCP would run a loss-based congestion control (the kernel
    /// does not let sockets use BBR) and the receiver offers QUIC; TCP otherwise
    /// (`docs/BENCHMARKS.md`, "TCP or QUIC").
    Auto,
}

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Quic => "quic",
            Self::Auto => "auto",
        })
    }
}

impl std::str::FromStr for Carrier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "quic" => Ok(Self::Quic),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown transport {other:?}: expected tcp, quic or auto"
            )),
        }
    }
}

/// Longest a [`Connection::close`] waits for the peer to take the `GOAWAY`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The stage a connection failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect,
    /// The TLS handshake.
    Tls,
    /// The QUIC handshake (UDP, with TLS inside).
    Quic,
    /// The DWCP handshake.
    Handshake,
    /// After the handshake.
    Established,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "TCP connect",
            Self::Tls => "TLS handshake",
            Self::Quic => "QUIC handshake (is UDP open and transport.quic on at the peer?)",
            Self::Handshake => "DWCP handshake",
            Self::Established => "established connection",
        })
    }
}

/// Why a connection failed or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address dialled.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// A step did not finish in time.
    #[error("{stage} timed out after {after:?}")]
    Timeout {
        /// Which step.
        stage: Stage,
        /// The timeout.
        after: Duration,
    },
    /// The peer refused our certificate.
    #[error("{0}")]
    CertificateRefused(String),
    /// We refused the peer's certificate.
    #[error("{0}")]
    BadPeerCertificate(String),
    /// Another TLS failure.
    #[error("TLS failed during {stage}: {detail}")]
    Tls {
        /// Which step.
        stage: Stage,
        /// What went wrong.
        detail: String,
    },
    /// The peer is a valid node of the cluster, but not the one expected.
    #[error("expected node {expected}, but the peer's certificate is for node {found}")]
    WrongPeer {
        /// Node asked for.
        expected: NodeId,
        /// Node that answered.
        found: NodeId,
    },
    /// The DWCP handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The peer sent bytes that are not valid frames.
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the connection with a `GOAWAY`.
    #[error("peer closed the connection: {code}: {reason}")]
    GoAway {
        /// Code sent.
        code: ErrorCode,
        /// Reason given.
        reason: String,
    },
    /// The connection ended without a `GOAWAY`.
    #[error("connection closed by the peer during the {0}")]
    Closed(Stage),
    /// An I/O error.
    #[error("I/O error during the {stage}: {source}")]
    Io {
        /// Which step.
        stage: Stage,
        /// The cause.
        source: io::Error,
    },
}

impl ConnError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect_failed",
            Self::Timeout {
                stage: Stage::Tls, ..
            } => "tls_timeout",
            Self::Timeout { .. } => "timeout",
            Self::CertificateRefused(_) => "certificate_refused_by_peer",
            Self::BadPeerCertificate(_) => "bad_peer_certificate",
            Self::WrongPeer { .. } => "wrong_peer",
            Self::Tls { .. } => "tls_error",
            Self::Handshake(e) => e.reason(),
            Self::Frame(e) => e.reason(),
            Self::GoAway { .. } => "goaway",
            Self::Closed(_) => "closed",
            Self::Io { .. } => "io_error",
        }
    }

    /// Whether this is an authentication failure (certificates) on either side.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Self::CertificateRefused(_) | Self::BadPeerCertificate(_) | Self::WrongPeer { .. }
        ) || matches!(
            self,
            Self::Handshake(HandshakeError::IdentityMismatch { .. })
        )
    }

    fn from_io(stage: Stage, e: io::Error) -> Self {
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Self::from_tls(stage, tls);
        }
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => Self::Closed(stage),
            _ => Self::Io { stage, source: e },
        }
    }

    fn from_tls(stage: Stage, e: &rustls::Error) -> Self {
        match classify(e) {
            TlsFailure::RefusedByPeer(s) => Self::CertificateRefused(s),
            TlsFailure::BadPeerCertificate(s) => Self::BadPeerCertificate(s),
            TlsFailure::Other(detail) => Self::Tls { stage, detail },
        }
    }
}

/// An established connection: framed messages over a secured byte stream (mutual TLS over
/// TCP, or a QUIC stream).
#[derive(Debug)]
pub struct Framed<T> {
    io: T,
    codec: FrameCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    established: Established,
    peer_addr: SocketAddr,
    /// From our first handshake frame written to the handshake's end.
    handshake_time: Duration,
}

/// An established connection over mutual TLS on `S` (TCP).
pub type Connection<S> = Framed<TlsStream<S>>;

/// A byte stream a [`Framed`] connection can run on, boxed so that TCP and QUIC streams can
/// share one session.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A connection over either carrier.
pub type AnyConnection = Framed<Box<dyn Duplex>>;
/// The receiving half of an [`AnyConnection`].
pub type AnyReader = FrameReader<ReadHalf<Box<dyn Duplex>>>;
/// The sending half of an [`AnyConnection`].
pub type AnyWriter = FrameWriter<WriteHalf<Box<dyn Duplex>>>;

/// Dials `addr`: TCP, TLS, handshake. Any node of the cluster may answer; use
/// [`connect_to`] when a particular node is expected.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
) -> Result<Connection<TcpStream>, ConnError> {
    connect_to(endpoint, addr, None).await
}

/// Dials `addr` and, if `expected` is given, refuses any node but that one (checked against
/// its certificate, before the DWCP handshake).
pub async fn connect_to(
    endpoint: &Endpoint,
    addr: SocketAddr,
    expected: Option<&NodeId>,
) -> Result<Connection<TcpStream>, ConnError> {
    let tcp = tokio::time::timeout(endpoint.connect_timeout, endpoint.socket.connect(addr))
        .await
        .map_err(|_| ConnError::Timeout {
            stage: Stage::Connect,
            after: endpoint.connect_timeout,
        })?
        .map_err(|source| ConnError::Connect { addr, source })?;
    let connector = TlsConnector::from(endpoint.tls.client.clone());
    let tls = tls_step(
        endpoint,
        connector.connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await?;
    let peer_id = peer_node_id(tls.get_ref().1.peer_certificates())?;
    if let Some(want) = expected
        && *want != peer_id
    {
        return Err(ConnError::WrongPeer {
            expected: want.clone(),
            found: peer_id,
        });
    }
    let hs = Handshake::client(endpoint.local_params(), peer_id, Instant::now());
    bounded(endpoint, Framed::finish(TlsStream::Client(tls), hs, addr)).await
}

/// Accepts a peer on `io` (already accepted from a listener): TLS, then handshake.
pub async fn accept<S>(
    endpoint: &Endpoint,
    io: S,
    peer_addr: SocketAddr,
) -> Result<Connection<S>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = TlsAcceptor::from(endpoint.tls.server.clone());
    let tls = tls_step(endpoint, acceptor.accept(io)).await?;
    let peer_id = peer_node_id(tls.get_ref().1.peer_certificates())?;
    let hs = Handshake::server(endpoint.local_params(), peer_id, Instant::now());
    bounded(
        endpoint,
        Framed::finish(TlsStream::Server(tls), hs, peer_addr),
    )
    .await
}

/// Runs a TLS handshake under the endpoint's TLS timeout, classifying its failure.
async fn tls_step<T>(
    endpoint: &Endpoint,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, ConnError> {
    tokio::time::timeout(endpoint.tls_timeout, fut)
        .await
        .map_err(|_| ConnError::Timeout {
            stage: Stage::Tls,
            after: endpoint.tls_timeout,
        })?
        .map_err(|e| ConnError::from_io(Stage::Tls, e))
}

/// Bounds the whole DWCP handshake, writes included. The sans-IO machine's deadline covers
/// waiting for the peer; this also covers a peer that stops reading while we write.
pub(crate) async fn bounded<T>(
    endpoint: &Endpoint,
    fut: impl Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    // A little past the machine's own deadline, so that its TIMEOUT reject wins when it can.
    let limit = endpoint.handshake_timeout + Duration::from_millis(500);
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ConnError::Timeout {
            stage: Stage::Handshake,
            after: limit,
        })?
}

pub(crate) fn peer_node_id(
    certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<NodeId, ConnError> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or_else(|| ConnError::BadPeerCertificate("the peer presented no certificate".into()))?;
    node_id_from_cert(cert).map_err(|e| {
        ConnError::BadPeerCertificate(format!("the peer's certificate names no node: {e}"))
    })
}

impl<T: AsyncRead + AsyncWrite + Unpin> Framed<T> {
    pub(crate) async fn finish(
        mut io: T,
        mut hs: Handshake,
        peer_addr: SocketAddr,
    ) -> Result<Self, ConnError> {
        let codec = FrameCodec::handshake();
        let mut rbuf = BytesMut::with_capacity(4096);
        let mut wbuf = BytesMut::with_capacity(4096);
        let started = Instant::now();
        loop {
            while let Some(frame) = hs.poll_transmit() {
                codec.encode(&frame, &mut wbuf)?;
            }
            if !wbuf.is_empty() {
                let flushed = async {
                    io.write_all(&wbuf).await?;
                    io.flush().await
                }
                .await;
                wbuf.clear();
                if let Err(e) = flushed {
                    // A refusal is more useful to report than the write error it causes.
                    if let Outcome::Failed(err) = hs.outcome() {
                        return Err(err.clone().into());
                    }
                    return Err(ConnError::from_io(Stage::Handshake, e));
                }
            }
            match hs.outcome() {
                Outcome::Established(_) => break,
                Outcome::Failed(e) => {
                    let e = e.clone();
                    let _ = io.shutdown().await;
                    return Err(e.into());
                }
                Outcome::InProgress => {}
            }
            let Some(deadline) = hs.poll_timeout() else {
                return Err(ConnError::Closed(Stage::Handshake));
            };
            let read = tokio::time::timeout_at(deadline.into(), io.read_buf(&mut rbuf)).await;
            match read {
                Err(_elapsed) => hs.handle_timeout(Instant::now()),
                Ok(Ok(0)) => {
                    return Err(match codec.decode_eof(&rbuf) {
                        Ok(()) => ConnError::Closed(Stage::Handshake),
                        Err(e) => e.into(),
                    });
                }
                Ok(Ok(_)) => loop {
                    match codec.decode(&mut rbuf) {
                        Ok(Some(frame)) => hs.handle_frame(frame),
                        Ok(None) => break,
                        Err(e) => {
                            hs.handle_frame_error(e);
                            break;
                        }
                    }
                    if !matches!(hs.outcome(), Outcome::InProgress) {
                        break;
                    }
                },
                Ok(Err(e)) => return Err(ConnError::from_io(Stage::Handshake, e)),
            }
        }
        let established = match hs.into_result() {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ConnError::Closed(Stage::Handshake)),
        };
        Ok(Self {
            codec: FrameCodec::with_max_payload(established.negotiated.max_frame_size),
            io,
            rbuf,
            wbuf,
            established,
            peer_addr,
            handshake_time: started.elapsed(),
        })
    }

    /// The same connection with its byte stream boxed ([`AnyConnection`]).
    pub fn boxed(self) -> AnyConnection
    where
        T: Send + 'static,
    {
        Framed {
            io: Box::new(self.io),
            codec: self.codec,
            rbuf: self.rbuf,
            wbuf: self.wbuf,
            established: self.established,
            peer_addr: self.peer_addr,
            handshake_time: self.handshake_time,
        }
    }

    /// What the handshake settled.
    pub fn established(&self) -> &Established {
        &self.established
    }

    /// How long the protocol handshake took (after TLS). For the dialling side this is one
    /// round trip (its `HELLO`, the peer's answer) plus the peer's handling of it: a first
    /// round-trip sample that costs no extra exchange.
    pub fn handshake_time(&self) -> Duration {
        self.handshake_time
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Sends one frame and flushes it.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        write_frame(&mut self.io, &self.codec, &mut self.wbuf, frame).await
    }

    /// Receives the next frame; `Ok(None)` when the peer closed cleanly between frames.
    /// Cancel-safe: a frame is only taken off the buffer once complete.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ConnError> {
        read_frame(&mut self.io, &self.codec, &mut self.rbuf).await
    }

    /// Splits the connection into a receiving and a sending half, for a reader task and a
    /// writer task.
    pub fn split(self) -> (FrameReader<ReadHalf<T>>, FrameWriter<WriteHalf<T>>) {
        let (r, w) = tokio::io::split(self.io);
        (
            FrameReader {
                io: r,
                codec: self.codec.clone(),
                buf: self.rbuf,
            },
            FrameWriter {
                io: w,
                codec: self.codec,
                buf: self.wbuf,
            },
        )
    }

    /// Sends a `GOAWAY` with `code` and `reason`, then closes the TLS session. Errors are
    /// ignored: the peer may already be gone.
    pub async fn close(self, code: ErrorCode, reason: &str) {
        let (_, writer) = self.split();
        writer.close(code, reason).await;
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    codec: &FrameCodec,
    buf: &mut BytesMut,
    frame: &Frame,
) -> Result<(), ConnError> {
    // A write cancelled half-way (its task aborted) may have left bytes here: start clean.
    buf.clear();
    codec.encode(frame, buf)?;
    let r = async {
        io.write_all(buf).await?;
        io.flush().await
    }
    .await;
    buf.clear();
    r.map_err(|e| ConnError::from_io(Stage::Established, e))
}

async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    codec: &FrameCodec,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, ConnError> {
    loop {
        if let Some(frame) = codec.decode(buf)? {
            return Ok(Some(frame));
        }
        let n = io
            .read_buf(buf)
            .await
            .map_err(|e| ConnError::from_io(Stage::Established, e))?;
        if n == 0 {
            codec.decode_eof(buf)?;
            return Ok(None);
        }
    }
}

/// The receiving half of a TLS [`Connection`].
pub type Reader<S> = FrameReader<ReadHalf<TlsStream<S>>>;
/// The sending half of a TLS [`Connection`].
pub type Writer<S> = FrameWriter<WriteHalf<TlsStream<S>>>;

/// The receiving half of a [`Connection`].
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    codec: FrameCodec,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Receives the next frame; `Ok(None)` on a clean close between frames. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ConnError> {
        read_frame(&mut self.io, &self.codec, &mut self.buf).await
    }
}

/// The sending half of a [`Connection`].
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    codec: FrameCodec,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Sends one frame and flushes it.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        write_frame(&mut self.io, &self.codec, &mut self.buf, frame).await
    }

    /// Sends a `DATA` frame for `chunk` without copying the chunk into a frame buffer.
    pub async fn send_data(
        &mut self,
        object: u64,
        offset: u64,
        chunk: &[u8],
    ) -> Result<(), ConnError> {
        let (head, tail) = dwcp_wire::data::data_frame_parts(&self.codec, object, offset, chunk)?;
        let r = async {
            self.io.write_all(&head).await?;
            self.io.write_all(chunk).await?;
            self.io.write_all(&tail).await?;
            self.io.flush().await
        }
        .await;
        r.map_err(|e| ConnError::from_io(Stage::Established, e))
    }

    /// Largest chunk a `DATA` frame can carry on this connection.
    pub fn max_chunk(&self) -> usize {
        self.codec.max_payload() as usize - dwcp_wire::data::DATA_HEADER_LEN
    }

    /// Like [`Self::close`], through a shared reference (the half stays in place, unusable).
    ///
    /// Returns whether the `GOAWAY` was written and the sending side shut down in time: only
    /// then does the peer see every frame sent before it.
    pub async fn goodbye(&mut self, code: ErrorCode, reason: &str) -> bool {
        let frame = msg::encode(FrameType::GOAWAY, &Close::new(code, reason));
        tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.send(&frame).await.is_ok() && self.io.shutdown().await.is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Sends a `GOAWAY` and shuts the sending side down, bounded in time (a peer that stopped
    /// reading must not pin the caller); errors are ignored.
    pub async fn close(mut self, code: ErrorCode, reason: &str) {
        let _ = self.goodbye(code, reason).await;
    }
}

impl Connection<TcpStream> {
    /// The congestion control the kernel runs on this connection's socket.
    pub fn congestion(&self) -> Option<String> {
        crate::net::congestion_of(self.io.get_ref().0)
    }

    /// Sets how many bytes this connection's socket may hold not yet sent
    /// (`TCP_NOTSENT_LOWAT`), over the endpoint's setting.
    pub fn set_notsent_lowat(&self, bytes: u32) -> io::Result<()> {
        socket2::SockRef::from(self.io.get_ref().0).set_tcp_notsent_lowat(bytes)
    }

    /// Sets how long data sent on this connection may stay unacknowledged before the kernel
    /// drops the connection (`TCP_USER_TIMEOUT`): a path that went silent then shows as a
    /// lost connection within that time, rather than after TCP's own retries (about 15
    /// minutes).
    pub fn set_user_timeout(&self, timeout: Duration) -> io::Result<()> {
        socket2::SockRef::from(self.io.get_ref().0).set_tcp_user_timeout(Some(timeout))
    }

    /// This connection's `TCP_NOTSENT_LOWAT`.
    pub fn notsent_lowat(&self) -> io::Result<u32> {
        socket2::SockRef::from(self.io.get_ref().0).tcp_notsent_lowat()
    }

    /// A second descriptor of this connection's socket, to read what the kernel counts on
    /// it (`TCP_INFO`) once the connection is boxed and split; `None` if the process is out
    /// of descriptors. Drop it with the connection.
    pub fn tcp_probe(&self) -> Option<dwcp_sys::TcpProbe> {
        dwcp_sys::TcpProbe::new(self.io.get_ref().0).ok()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Framed<T> {
    /// Sends a `PING` and waits for its `PONG`, returning the round-trip time. Extension frames
    /// in between are skipped; a `GOAWAY` ends the wait with [`ConnError::GoAway`].
    pub async fn ping(&mut self, seq: u64, timeout: Duration) -> Result<Duration, ConnError> {
        let start = Instant::now();
        let probe = msg::Ping {
            seq,
            ..msg::Ping::default()
        };
        self.send(&msg::encode(FrameType::PING, &probe)).await?;
        let wait = async {
            loop {
                let Some(frame) = self.recv().await? else {
                    return Err(ConnError::Closed(Stage::Established));
                };
                match frame.ty {
                    FrameType::PONG => {
                        let pong: msg::Ping = msg::decode(&frame).map_err(HandshakeError::from)?;
                        if pong.seq == seq {
                            return Ok(start.elapsed());
                        }
                    }
                    FrameType::GOAWAY => {
                        let close: Close = msg::decode(&frame).map_err(HandshakeError::from)?;
                        return Err(ConnError::GoAway {
                            code: close.error_code(),
                            reason: close.printable_reason(),
                        });
                    }
                    ty if ty.is_extension() => {}
                    ty => {
                        return Err(HandshakeError::UnexpectedFrame {
                            ty: ty.0,
                            name: ty.name(),
                        }
                        .into());
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ConnError::Timeout {
                stage: Stage::Established,
                after: timeout,
            })?
    }
}
