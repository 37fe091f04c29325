//! Admin HTTP: `/healthz` (the process is alive), `/readyz` (listeners bound, certificate
//! loaded and valid, not shutting down) and `/metrics` (Prometheus).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Shared;

/// Content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let listener = Bounded {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
        lifetime: ADMIN_CONNECTION_LIFETIME,
        idle: ADMIN_IDLE,
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Admin connections open at once, at most: more wait to be accepted (in the kernel's
/// backlog, holding no descriptor of ours).
const MAX_ADMIN_CONNECTIONS: usize = 32;
/// How long an admin connection may stay open: a scrape takes milliseconds, and a client that
/// sends its request a byte at a time (or keeps a connection for later) must not hold a
/// place for good. A scraper keeping its connection alive reconnects.
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long an admin connection may go without a byte from its client: a scraper between
/// scrapes reconnects, and 32 silent clients hold no place for long.
const ADMIN_IDLE: Duration = Duration::from_secs(10);

/// The admin listener, bounded in connections and in how long each lasts.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    lifetime: Duration,
    idle: Duration,
}

impl axum::serve::Listener for Bounded {
    type Io = BoundedIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Only fails once closed, which this one never is.
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let io = BoundedIo {
                        io,
                        _permit: permit,
                        ends: Box::pin(tokio::time::sleep(self.lifetime)),
                        idle: self.idle,
                        quiet: Box::pin(tokio::time::sleep(self.idle)),
                    };
                    return (io, addr);
                }
                Err(e) => {
                    // E.g. out of descriptors: not the end of the listener.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An admin connection: its place among [`MAX_ADMIN_CONNECTIONS`], and its end.
struct BoundedIo {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    ends: Pin<Box<tokio::time::Sleep>>,
    /// How long it may go without a byte read, and when that runs out.
    idle: Duration,
    quiet: Pin<Box<tokio::time::Sleep>>,
}

impl BoundedIo {
    /// An error once the connection has lived its time (the server then closes it).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let over = self.ends.as_mut().poll(cx).is_ready();
        let quiet = self.quiet.as_mut().poll(cx).is_ready();
        (over || quiet).then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                if over {
                    "admin connection open for too long"
                } else {
                    "admin connection idle for too long"
                },
            )
        })
    }
}

impl AsyncRead for BoundedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let next = tokio::time::Instant::now() + self.idle;
            self.quiet.as_mut().reset(next);
        }
        r
    }
}

impl AsyncWrite for BoundedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Whether the agent is ready, or why not.
fn readiness(shared: &Shared) -> Result<(), &'static str> {
    if !shared.ready.load(Ordering::SeqCst) {
        return Err("not ready: starting or shutting down\n");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    if now > shared.cert_not_after {
        return Err("not ready: node certificate has expired\n");
    }
    Ok(())
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match readiness(&shared) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    // One scrape at a time from reading the counts to rendering them: two scrapers at once
    // could otherwise set an older reading over a newer one, and a count would go back.
    let text = {
        let _one = shared
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // `dwcp_ready` says what `/readyz` would (a certificate expires while it runs).
        shared
            .metrics
            .ready
            .set(i64::from(readiness(&shared).is_ok()));
        if let Some(s) = shared.spool.cache_stats() {
            shared.metrics.cache(&s);
        }
        shared.metrics.peers(&shared.spool.peer_stats());
        shared.metrics.render()
    };
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::serve::Listener;
    use tokio::io::AsyncReadExt;

    /// A listener on loopback for one connection at a time, with these limits.
    async fn bounded(lifetime: Duration, idle: Duration) -> (Bounded, std::net::SocketAddr) {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let l = Bounded {
            inner,
            slots: Arc::new(Semaphore::new(1)),
            lifetime,
            idle,
        };
        (l, addr)
    }

    /// An admin connection holds its place until it ends, and ends after its lifetime even
    /// when its client sends nothing.
    #[tokio::test]
    async fn admin_connections_are_bounded_in_number_and_time() {
        let (mut l, addr) = bounded(Duration::from_millis(300), Duration::from_secs(60)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let (mut first, _) = l.accept().await;
        // The second waits for the first's place.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), l.accept())
                .await
                .is_err()
        );
        let mut buf = [0u8; 8];
        let e = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .unwrap();
    }

    /// A client that keeps sending stays within its lifetime; one that stops is closed once
    /// it has been quiet for the idle limit.
    #[tokio::test]
    async fn a_quiet_admin_connection_is_closed() {
        use tokio::io::AsyncWriteExt;
        let (mut l, addr) = bounded(Duration::from_secs(60), Duration::from_millis(400)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = l.accept().await;
        let mut buf = [0u8; 8];
        // A byte every 100 ms for a second: more than twice the idle limit, never quiet.
        for _ in 0..10 {
            client.write_all(b"x").await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("idle"), "{e}");
    }
}
