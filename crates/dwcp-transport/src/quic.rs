//! QUIC (quinn) as a second carrier for DWCP streams.
//!
//! A session over QUIC is one QUIC connection between the two nodes; each of its streams is a
//! bidirectional QUIC stream that runs the same DWCP handshake and carries the same frames as
//! a TLS-over-TCP connection does, so everything above ([`Framed`]) is shared. QUIC's TLS 1.3
//! handshake uses the node's mutual-TLS configurations ([`TlsConfigs`]): the cluster CA, the
//! node certificates and the identity binding work exactly as over TCP.
//!
//! Differences worth knowing: congestion control runs once per QUIC connection (quinn's, in
//! user space: `bbr`, `cubic` or `reno` from `transport.quic_congestion`), so
//! more streams share one congestion window instead of adding windows as TCP connections do;
//! and every packet is encrypted and acknowledged in user space, which costs CPU.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_wire::{Handshake, NodeId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportConfig, VarInt};
use rustls::AlertDescription;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use crate::conn::{ConnError, Endpoint, Framed, Stage, bounded, peer_node_id};
use crate::tls::TlsConfigs;

/// A connection attempt arriving at a [`QuicListener`].
pub type Incoming = quinn::Incoming;

/// The byte stream of one DWCP stream over QUIC.
pub type QuicIo = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// Per-stream flow-control window: a few bandwidth-delay products of a 1 Gbit/s, 40 ms path,
/// so that even one stream is not held back by flow control.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Connection-wide windows: what a receiver may hold unread, across all streams.
const CONN_WINDOW: u32 = 64 * 1024 * 1024;
/// UDP socket buffers asked for (the kernel caps them at `net.core.rmem_max`/`wmem_max`).
const UDP_BUFFER: usize = 8 * 1024 * 1024;
/// Streams a peer may have open on one connection (DWCP's `max_streams` is 512).
const MAX_STREAMS: u32 = 1024;
/// Keep-alives keep NAT bindings and the idle timer fresh between transfers.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(60);

/// quinn's transport settings for DWCP, with the congestion controller named by `congestion`
/// (`bbr`, `cubic`, `reno`/`newreno`; anything else falls back to CUBIC with a warning).
/// `peer_streams`: how many streams the peer may open towards us (a sender opens every
/// stream itself and accepts none: 0 for it).
fn transport_config(congestion: Option<&str>, peer_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONN_WINDOW))
        .send_window(u64::from(CONN_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(peer_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE));
    // 60 s fits in a VarInt of milliseconds; the conversion cannot fail.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE) {
        t.max_idle_timeout(Some(idle));
    }
    match congestion.unwrap_or("cubic") {
        "bbr" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        "reno" | "newreno" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        "cubic" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
        other => {
            warn!(congestion = %other, "QUIC has no congestion control {other:?}; using cubic");
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
    }
    t
}

/// Why QUIC could not be set up from the node's TLS configuration.
fn setup_error(e: impl std::fmt::Display) -> ConnError {
    ConnError::Tls {
        stage: Stage::Connect,
        detail: format!("cannot use the TLS configuration for QUIC: {e}"),
    }
}

fn server_config(
    tls: &TlsConfigs,
    congestion: Option<&str>,
) -> Result<quinn::ServerConfig, ConnError> {
    let crypto = QuicServerConfig::try_from(tls.server.clone()).map_err(setup_error)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(congestion, MAX_STREAMS)));
    Ok(cfg)
}

fn client_config(
    tls: &TlsConfigs,
    congestion: Option<&str>,
) -> Result<quinn::ClientConfig, ConnError> {
    let crypto = QuicClientConfig::try_from(tls.client.clone()).map_err(setup_error)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // Nothing on the dialling side accepts a stream: what a peer sent on one would sit
    // buffered for the connection's life.
    cfg.transport_config(Arc::new(transport_config(congestion, 0)));
    Ok(cfg)
}

/// A UDP socket bound to `addr` with large buffers (a QUIC sender bursts a whole congestion
/// window; the kernel's default 208 KiB drops packets at a few hundred Mbit/s).
fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer only costs speed.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn new_endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Maps a failed QUIC connection attempt to the same errors a TCP + TLS dial gives.
fn connect_error(addr: SocketAddr, timeout: Duration, e: ConnectionError) -> ConnError {
    let alert = |code: quinn::TransportErrorCode| -> Option<AlertDescription> {
        let c = u64::from(code);
        // Crypto errors are 0x100 + the TLS alert (RFC 9001, section 4.8).
        (0x100..0x200)
            .contains(&c)
            .then(|| AlertDescription::from(u8::try_from(c - 0x100).unwrap_or(0)))
    };
    let is_cert = |a: AlertDescription| {
        matches!(
            a,
            AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRequired
                | AlertDescription::AccessDenied
        )
    };
    match e {
        ConnectionError::TimedOut => ConnError::Timeout {
            stage: Stage::Quic,
            after: timeout,
        },
        // The peer closed with a certificate alert: it refused ours.
        ConnectionError::ConnectionClosed(c) if alert(c.error_code).is_some_and(is_cert) => {
            // The peer's words, unauthenticated: printable only (no line breaks in logs).
            ConnError::CertificateRefused(format!(
                "the peer refused our certificate: {}",
                dwcp_wire::msg::printable(&String::from_utf8_lossy(&c.reason), 200)
            ))
        }
        // Our side failed the handshake with a certificate alert: we refused the peer's.
        ConnectionError::TransportError(t) if alert(t.code).is_some_and(is_cert) => {
            ConnError::BadPeerCertificate(format!(
                "the peer's certificate was refused: {}",
                t.reason
            ))
        }
        ConnectionError::TransportError(t) => ConnError::Tls {
            stage: Stage::Tls,
            detail: t.to_string(),
        },
        // Refused before any handshake work (a node at its connection or handshake limit):
        // as a TCP receiver that drops the connection, so that the sender tries again.
        ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            ConnError::Closed(Stage::Tls)
        }
        ConnectionError::ConnectionClosed(c) => ConnError::Tls {
            stage: Stage::Tls,
            detail: dwcp_wire::msg::printable(&c.to_string(), 300),
        },
        other => ConnError::Connect {
            addr,
            source: io::Error::other(dwcp_wire::msg::printable(&other.to_string(), 300)),
        },
    }
}

fn peer_id_of(conn: &quinn::Connection) -> Result<NodeId, ConnError> {
    let certs = conn.peer_identity().and_then(|i| {
        i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    peer_node_id(certs.as_deref().map(Vec::as_slice))
}

/// One QUIC connection to a peer node, from which DWCP streams are opened.
#[derive(Debug, Clone)]
pub struct QuicPeer {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    peer: NodeId,
}

/// Dials `addr` over QUIC (UDP to the same port as the peer's TCP listener) and, if
/// `expected` is given, refuses any node but that one.
pub async fn dial(
    endpoint: &Endpoint,
    addr: SocketAddr,
    expected: Option<&NodeId>,
) -> Result<QuicPeer, ConnError> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io_err = |source| ConnError::Connect { addr, source };
    let quic = new_endpoint(udp_socket(local).map_err(io_err)?, None).map_err(io_err)?;
    let cfg = client_config(&endpoint.tls, Some(&endpoint.quic_congestion))?;
    // Node certificates carry no host names; the verifier checks the chain and the DWCP
    // handshake binds the node id, as over TCP.
    let connecting = quic
        .connect_with(cfg, addr, &addr.ip().to_string())
        .map_err(|e| io_err(io::Error::other(e.to_string())))?;
    let limit = endpoint.connect_timeout + endpoint.tls_timeout;
    let conn = match tokio::time::timeout(limit, connecting).await {
        Err(_) => {
            return Err(ConnError::Timeout {
                stage: Stage::Quic,
                after: limit,
            });
        }
        Ok(Err(e)) => return Err(connect_error(addr, limit, e)),
        Ok(Ok(c)) => c,
    };
    let peer = peer_id_of(&conn)?;
    if let Some(want) = expected
        && *want != peer
    {
        conn.close(VarInt::from_u32(0), b"wrong peer");
        return Err(ConnError::WrongPeer {
            expected: want.clone(),
            found: peer,
        });
    }
    Ok(QuicPeer {
        endpoint: quic,
        conn,
        peer,
    })
}

impl QuicPeer {
    /// The peer's node id (from its certificate).
    pub fn node_id(&self) -> &NodeId {
        &self.peer
    }

    /// quinn's counters for the connection (packets lost, congestion events, ...).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Opens one DWCP stream: a bidirectional QUIC stream, then the DWCP handshake on it.
    pub async fn open(&self, endpoint: &Endpoint) -> Result<Framed<QuicIo>, ConnError> {
        let addr = self.conn.remote_address();
        let opened = tokio::time::timeout(endpoint.handshake_timeout, self.conn.open_bi())
            .await
            .map_err(|_| ConnError::Timeout {
                stage: Stage::Handshake,
                after: endpoint.handshake_timeout,
            })?;
        let limit = endpoint.tls_timeout;
        let (send, recv) = match opened {
            Ok(s) => s,
            Err(e) => return Err(connect_error(addr, limit, e)),
        };
        let hs = Handshake::client(endpoint.local_params(), self.peer.clone(), Instant::now());
        let r = bounded(
            endpoint,
            Framed::finish(tokio::io::join(recv, send), hs, addr),
        )
        .await;
        // In TLS 1.3 the server judges our certificate after our side of the handshake is
        // done: its refusal closes the connection under the first stream. Say so.
        match (r, self.conn.close_reason()) {
            (Err(_), Some(reason)) => Err(connect_error(addr, limit, reason)),
            (r, _) => r,
        }
    }

    /// Completes once the connection is closed (by either side, or idle).
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Closes the QUIC connection (after the streams said goodbye) and, unless the peer closed
    /// it already, waits briefly for the close to reach the peer.
    pub async fn close(&self) {
        let peer_closed = self.conn.close_reason().is_some();
        self.conn.close(VarInt::from_u32(0), b"done");
        if !peer_closed {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
    }
}

/// The accepting side: a QUIC endpoint on a node's listen address (UDP).
#[derive(Debug)]
pub struct QuicListener {
    endpoint: quinn::Endpoint,
}

impl QuicListener {
    /// Binds a QUIC endpoint to `addr` (UDP) with the node's TLS configuration.
    pub fn bind(endpoint: &Endpoint, addr: SocketAddr) -> Result<Self, ConnError> {
        let cfg = server_config(&endpoint.tls, Some(&endpoint.quic_congestion))?;
        let io_err = |source| ConnError::Connect { addr, source };
        let quic = new_endpoint(udp_socket(addr).map_err(io_err)?, Some(cfg)).map_err(io_err)?;
        Ok(Self { endpoint: quic })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next incoming connection attempt; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        self.endpoint.accept().await
    }

    /// Refuses new connections; open ones carry on.
    pub fn refuse_new(&self) {
        self.endpoint.set_server_config(None);
    }

    /// Closes every connection and waits (up to a second) for the peers to hear it.
    pub async fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// An accepted QUIC connection from a peer node, whose streams are accepted one by one.
#[derive(Debug)]
pub struct QuicIncoming {
    conn: quinn::Connection,
    peer: NodeId,
}

/// Completes the QUIC (TLS) handshake of `incoming`, under the endpoint's TLS timeout.
pub async fn accept_connection(
    endpoint: &Endpoint,
    incoming: Incoming,
) -> Result<QuicIncoming, ConnError> {
    let addr = incoming.remote_address();
    let connecting = incoming.accept().map_err(|e| ConnError::Connect {
        addr,
        source: io::Error::other(e.to_string()),
    })?;
    let conn = match tokio::time::timeout(endpoint.tls_timeout, connecting).await {
        Err(_) => {
            return Err(ConnError::Timeout {
                stage: Stage::Quic,
                after: endpoint.tls_timeout,
            });
        }
        Ok(Err(e)) => return Err(connect_error(addr, endpoint.tls_timeout, e)),
        Ok(Ok(c)) => c,
    };
    let peer = peer_id_of(&conn)?;
    Ok(QuicIncoming { conn, peer })
}

impl QuicIncoming {
    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The peer's node id (from its certificate).
    pub fn node_id(&self) -> &NodeId {
        &self.peer
    }

    /// Completes once the connection is closed (by either side, or idle).
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Closes the connection at once (streams and unsent data with it), saying `reason`.
    pub fn close(&self, reason: &str) {
        self.conn.close(VarInt::from_u32(0), reason.as_bytes());
    }

    /// The next stream the peer opens, as a raw byte stream; `None` once the connection is
    /// closed. Run [`accept_stream`] on it (in its own task) for the DWCP handshake.
    pub async fn next_stream(&self) -> Option<QuicIo> {
        let (send, recv) = self.conn.accept_bi().await.ok()?;
        Some(tokio::io::join(recv, send))
    }
}

/// Runs the server side of the DWCP handshake on a stream from [`QuicIncoming::next_stream`].
pub async fn accept_stream<T: AsyncRead + AsyncWrite + Unpin>(
    endpoint: &Endpoint,
    io: T,
    peer: NodeId,
    peer_addr: SocketAddr,
) -> Result<Framed<T>, ConnError> {
    let hs = Handshake::server(endpoint.local_params(), peer, Instant::now());
    bounded(endpoint, Framed::finish(io, hs, peer_addr)).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What a peer says when it closes a handshake reaches the logs without its line breaks
    /// (no forged log lines from an unauthenticated client).
    #[test]
    fn a_peers_close_reason_is_made_printable() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // A certificate alert (bad_certificate, 42), and another error.
        for code in [
            quinn::TransportErrorCode::crypto(42),
            quinn::TransportErrorCode::PROTOCOL_VIOLATION,
        ] {
            let close = quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: bytes::Bytes::from_static(b"bye\nINFO peer connected peer_node=x"),
            };
            let e = connect_error(
                addr,
                Duration::from_secs(1),
                ConnectionError::ConnectionClosed(close),
            );
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text:?}");
            assert!(text.contains("bye?INFO"), "{text:?}");
        }
    }

    /// A node at its limits refuses a QUIC connection before any handshake: the sender
    /// reads that as a TCP receiver's dropped connection, which it tries again.
    #[test]
    fn a_refused_connection_is_a_closed_one_not_a_tls_failure() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let close = quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
            frame_type: None,
            reason: bytes::Bytes::new(),
        };
        let e = connect_error(
            addr,
            Duration::from_secs(1),
            ConnectionError::ConnectionClosed(close),
        );
        assert!(matches!(e, ConnError::Closed(Stage::Tls)), "{e:?}");
    }
}
