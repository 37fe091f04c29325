//! TCP socket tuning: congestion control, buffer sizes, keepalive.
//!
//! Congestion control matters most on long, lossy paths: BBR keeps a single stream near the
//! link rate where loss-based CUBIC collapses (one CUBIC stream at 100 ms RTT and 0.5 % loss
//! moves a few Mbit/s). The kernel only lets a socket pick an algorithm listed in
//! `net.ipv4.tcp_allowed_congestion_control`; when the configured one is not available the
//! socket keeps the system default and a warning says so, once.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tracing::warn;

/// How peer sockets are set up.
#[derive(Debug, Clone, Default)]
pub struct SocketOptions {
    /// Congestion control algorithm (`TCP_CONGESTION`), e.g. `bbr`; `None` keeps the system
    /// default.
    pub congestion: Option<String>,
    /// Send and receive buffer size in bytes; `None` leaves the kernel's autotuning on (which
    /// an explicit size would switch off).
    pub buffer: Option<u32>,
    /// Idle time before TCP keepalive probes; `None` disables keepalive.
    pub keepalive: Option<Duration>,
    /// Most bytes a socket holds not yet sent (`TCP_NOTSENT_LOWAT`); `None`: no limit.
    /// Without it Linux lets a stream queue seconds of data locally, which a session would
    /// rather give to a stream that is moving (and which hides a backlog from QEMU).
    pub notsent_lowat: Option<u32>,
}

static CONGESTION_WARNED: AtomicBool = AtomicBool::new(false);
static LOWAT_WARNED: AtomicBool = AtomicBool::new(false);

impl SocketOptions {
    /// Opens a TCP connection to `addr` with these options (buffers are set before connecting,
    /// so that the window scale offered in the SYN fits them).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(b) = self.buffer {
            socket.set_send_buffer_size(b)?;
            socket.set_recv_buffer_size(b)?;
        }
        self.set_congestion(&socket);
        let stream = socket.connect(addr).await?;
        self.after_connect(&stream)?;
        Ok(stream)
    }

    /// Applies the options that can still change on an accepted socket.
    pub fn tune_accepted(&self, stream: &TcpStream) -> io::Result<()> {
        self.set_congestion(stream);
        self.after_connect(stream)
    }

    fn after_connect(&self, stream: &TcpStream) -> io::Result<()> {
        // Frames are written whole; Nagle would only add latency to small control frames.
        stream.set_nodelay(true)?;
        if let Some(n) = self.notsent_lowat {
            // Best effort, like the congestion control: a kernel without it only queues more.
            if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(n)
                && !LOWAT_WARNED.swap(true, Ordering::Relaxed)
            {
                warn!("cannot limit unsent bytes (TCP_NOTSENT_LOWAT): {e}");
            }
        }
        if let Some(idle) = self.keepalive {
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Duration::from_secs(10))
                .with_retries(3);
            socket2::SockRef::from(stream).set_tcp_keepalive(&ka)?;
        }
        Ok(())
    }

    fn set_congestion(&self, fd: &impl std::os::fd::AsFd) {
        let Some(algo) = &self.congestion else {
            return;
        };
        if let Err(e) = rustix::net::sockopt::set_tcp_congestion(fd, algo)
            && !CONGESTION_WARNED.swap(true, Ordering::Relaxed)
        {
            warn!(
                congestion = %algo,
                "cannot use congestion control {algo:?} ({e}); keeping the system default \
                 (see net.ipv4.tcp_allowed_congestion_control)"
            );
        }
    }
}

/// The congestion control algorithm a socket uses.
pub fn congestion_of(stream: &TcpStream) -> Option<String> {
    rustix::net::sockopt::tcp_congestion(stream).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_are_applied() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        let allowed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_default();
        // reno is always built in and always allowed.
        let want = if allowed.split_whitespace().any(|a| a == "bbr") {
            "bbr"
        } else {
            "reno"
        };
        let opts = SocketOptions {
            congestion: Some(want.into()),
            buffer: Some(1 << 20),
            keepalive: Some(Duration::from_secs(30)),
            notsent_lowat: Some(256 * 1024),
        };
        let (client, server) = tokio::join!(opts.connect(addr), listener.accept());
        let client = client.unwrap();
        let (server, _) = server.unwrap();
        opts.tune_accepted(&server).unwrap();
        assert_eq!(
            congestion_of(&client).as_deref(),
            Some(want),
            "available: {available}"
        );
        assert_eq!(congestion_of(&server).as_deref(), Some(want));
        assert!(client.nodelay().unwrap());
        assert_eq!(
            socket2::SockRef::from(&client).tcp_notsent_lowat().unwrap(),
            256 * 1024
        );
        assert!(socket2::SockRef::from(&client).keepalive().unwrap());
        // The kernel caps the request at net.core.rmem_max and doubles it for bookkeeping.
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(usize::MAX);
        let got = socket2::SockRef::from(&client).recv_buffer_size().unwrap();
        assert!(got >= (1usize << 20).min(cap), "{got} (rmem_max {cap})");
    }

    #[tokio::test]
    async fn unknown_algorithm_falls_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = SocketOptions {
            congestion: Some("no-such-cc".into()),
            ..SocketOptions::default()
        };
        let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .unwrap_or_default();
        let (client, _server) = tokio::join!(opts.connect(addr), listener.accept());
        let client = client.unwrap();
        assert_eq!(congestion_of(&client).unwrap_or_default(), default.trim());
    }
}
