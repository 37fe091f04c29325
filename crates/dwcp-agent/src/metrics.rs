//! The agent's Prometheus metrics (`docs/OPERATIONS.md`, "Metrics"), and a byte-counting I/O
//! wrapper feeding two of them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use dwcp_transport::session::recv::MIGRATION_OUTCOMES;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Labels = Vec<(&'static str, String)>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Peer connections open now (any stage).
    pub connections_active: Gauge,
    /// Peer connections accepted from the listener.
    pub connections_accepted: Counter,
    /// Peer connections closed at once because `agent.max_connections` was reached.
    pub connections_refused: Counter,
    /// Handshakes by `result` (`ok`, `failed`), `reason` and `version`.
    pub handshakes: Family<Labels, Counter>,
    /// Frames received on established connections, by `type`.
    pub frames_received: Family<Labels, Counter>,
    /// Bytes read from peer sockets (TLS records included).
    pub bytes_received: Counter,
    /// Bytes written to peer sockets (TLS records included).
    pub bytes_sent: Counter,
    /// Objects received into the spool, by sending `peer` and `result` (`stored`, `failed`).
    pub objects_received: Family<Labels, Counter>,
    /// Bytes of objects stored in the spool, by sending `peer`.
    pub object_bytes_received: Family<Labels, Counter>,
    /// Delta-encoded (HDE) objects stored: bytes that crossed the network, by `peer`.
    pub delta_wire_bytes: Family<Labels, Counter>,
    /// ... and the bytes of content they rebuilt, by `peer` (the ratio is HDE's saving).
    pub delta_content_bytes: Family<Labels, Counter>,
    /// Session streams open now, by sending `peer`.
    pub session_streams: Family<Labels, Gauge>,
    /// Chunk bytes taken from session streams, by sending `peer`, as they arrive.
    pub session_data_bytes: Family<Labels, Counter>,
    /// Segments TCP retransmitted on session streams to this node, by sending `peer`, as
    /// its heartbeats report them.
    pub session_tcp_retransmits: Family<Labels, Counter>,
    /// Data segments TCP sent on them, retransmissions included, by sending `peer`.
    pub session_tcp_segments: Family<Labels, Counter>,
    /// Migrations into this node that ended, by source `peer`, `backend` (`memory`, `qemu`)
    /// and `result` (`committed`, `aborted`, `failed`).
    pub migrations_received: Family<Labels, Counter>,
    /// Post-copy migrations into this node whose stream stopped, now, by source `peer`: each
    /// guest runs here but waits for pages still at its source until that source resumes.
    pub migrations_paused: Family<Labels, Gauge>,
    /// Baseline cache entries (pages and chunks, seeds included).
    pub cache_entries: Gauge,
    peers_update: std::sync::Mutex<()>,
    /// Baseline cache bytes, by `tier` (`memory`, `disk`).
    pub cache_bytes: Family<Labels, Gauge>,
    /// Baseline cache lookups since start, by `result` (`hit`, `miss`, `corrupt`), and
    /// entries `evicted`.
    pub cache_events: Family<Labels, Gauge>,
    /// 1 while `/readyz` answers 200.
    pub ready: Gauge,
    /// Expiry of this node's certificate, Unix seconds: alert well before it.
    pub certificate_expiry: Gauge,
}

impl Metrics {
    /// Registers all metrics; `node_id` and the protocol versions go into `dwcp_build_info`.
    pub fn new(node_id: &str, versions: &str) -> Self {
        let mut registry = Registry::with_prefix("dwcp");
        let build = Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("node_id", node_id.to_string()),
            ("protocol_versions", versions.to_string()),
        ]);
        registry.register("build", "DWCP build and node information", build);
        let m = Self {
            connections_active: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            handshakes: Family::default(),
            frames_received: Family::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            objects_received: Family::default(),
            object_bytes_received: Family::default(),
            delta_wire_bytes: Family::default(),
            delta_content_bytes: Family::default(),
            session_streams: Family::default(),
            session_data_bytes: Family::default(),
            session_tcp_retransmits: Family::default(),
            session_tcp_segments: Family::default(),
            migrations_received: Family::default(),
            migrations_paused: Family::default(),
            cache_entries: Gauge::default(),
            peers_update: std::sync::Mutex::default(),
            cache_bytes: Family::default(),
            cache_events: Family::default(),
            ready: Gauge::default(),
            certificate_expiry: Gauge::default(),
            registry,
        };
        let mut registry = m.registry;
        registry.register(
            "connections_active",
            "Peer connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "connections_accepted",
            "Peer connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Peer connections refused because agent.max_connections was reached",
            m.connections_refused.clone(),
        );
        registry.register(
            "handshakes",
            "Peer handshakes by result, reason and negotiated version",
            m.handshakes.clone(),
        );
        registry.register(
            "frames_received",
            "Frames the agent read on established connections before a session (transfer, \
             migration) took them over, by type",
            m.frames_received.clone(),
        );
        registry.register(
            "bytes_received",
            "Bytes read from peer TCP sockets, TLS included (over QUIC: stream bytes)",
            m.bytes_received.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes written to peer TCP sockets, TLS included (over QUIC: stream bytes)",
            m.bytes_sent.clone(),
        );
        registry.register(
            "objects_received",
            "Objects received into the spool, by sending peer and result",
            m.objects_received.clone(),
        );
        registry.register(
            "object_bytes_received",
            "Bytes of objects verified and stored in the spool, by sending peer",
            m.object_bytes_received.clone(),
        );
        registry.register(
            "delta_wire_bytes",
            "Bytes of delta-encoded (HDE) objects stored, as they crossed the network, by peer",
            m.delta_wire_bytes.clone(),
        );
        registry.register(
            "delta_content_bytes",
            "Bytes of content rebuilt from delta-encoded (HDE) objects, by peer",
            m.delta_content_bytes.clone(),
        );
        registry.register(
            "session_streams",
            "Transfer-session streams open now (TCP connections or QUIC streams), by sending peer",
            m.session_streams.clone(),
        );
        registry.register(
            "session_data_bytes",
            "Chunk bytes taken from transfer sessions as they arrive (its rate is the live goodput), by sending peer",
            m.session_data_bytes.clone(),
        );
        registry.register(
            "session_tcp_retransmits",
            "Segments TCP retransmitted on transfer-session streams to this node, by sending peer, as the sender's kernel counted them (TCP_INFO) and its heartbeats reported them",
            m.session_tcp_retransmits.clone(),
        );
        registry.register(
            "session_tcp_segments",
            "Data segments TCP sent on transfer-session streams to this node (retransmissions included), by sending peer, as the sender's heartbeats reported them",
            m.session_tcp_segments.clone(),
        );
        registry.register(
            "migrations_received",
            "Migrations into this node that ended, by source peer, backend (memory, qemu) and result (committed, aborted, failed)",
            m.migrations_received.clone(),
        );
        registry.register(
            "migrations_paused",
            "Post-copy migrations into this node whose stream stopped, now, by source peer: each guest runs here but waits for pages its source still holds (run the same `dwcp migrate` again to resume)",
            m.migrations_paused.clone(),
        );
        registry.register(
            "baseline_cache_entries",
            "Pages and chunks the baseline cache holds or indexes",
            m.cache_entries.clone(),
        );
        registry.register(
            "baseline_cache_bytes",
            "Bytes the baseline cache holds, by tier",
            m.cache_bytes.clone(),
        );
        registry.register(
            "baseline_cache_events",
            "Baseline cache lookups by result (hit, miss, corrupt) and evictions since start",
            m.cache_events.clone(),
        );
        registry.register("ready", "1 while the agent is ready", m.ready.clone());
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Expiry of this node's certificate (Unix time)",
            m.certificate_expiry.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one handshake.
    pub fn handshake(&self, result: &'static str, reason: &str, version: &str) {
        self.handshakes
            .get_or_create(&vec![
                ("result", result.to_string()),
                ("reason", reason.to_string()),
                ("version", version.to_string()),
            ])
            .inc();
    }

    /// Counts one received frame.
    pub fn frame(&self, ty: &'static str) {
        self.frames_received
            .get_or_create(&vec![("type", ty.to_string())])
            .inc();
    }

    /// Takes the receiver's per-peer session counters (at scrape time).
    pub fn peers(&self, stats: &[dwcp_transport::session::PeerStats]) {
        // Two scrapes at once must not both add the same difference.
        let _one = self
            .peers_update
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in stats {
            let l = vec![("peer", s.peer.as_str().to_string())];
            self.session_streams
                .get_or_create(&l)
                .set(i64::from(s.streams));
            self.migrations_paused
                .get_or_create(&l)
                .set(i64::try_from(s.migrations_paused).unwrap_or(i64::MAX));
            // The receiver's counts only grow: move the counters up to them.
            for (family, n) in [
                (&self.session_data_bytes, s.data_bytes),
                (&self.session_tcp_retransmits, s.tcp_retransmits),
                (&self.session_tcp_segments, s.tcp_segments),
            ] {
                let c = family.get_or_create(&l);
                c.inc_by(n.saturating_sub(c.get()));
            }
            // Objects and delta bytes: only once there are any (a peer that only migrated
            // shows none).
            for (family, n) in [
                (&self.object_bytes_received, s.object_bytes),
                (&self.delta_wire_bytes, s.delta_wire_bytes),
                (&self.delta_content_bytes, s.delta_content_bytes),
            ] {
                if n > 0 {
                    let c = family.get_or_create(&l);
                    c.inc_by(n.saturating_sub(c.get()));
                }
            }
            for (result, n) in [("stored", s.objects_stored), ("failed", s.objects_failed)] {
                if n > 0 {
                    let c = self.objects_received.get_or_create(&vec![
                        ("peer", s.peer.as_str().to_string()),
                        ("result", result.to_string()),
                    ]);
                    c.inc_by(n.saturating_sub(c.get()));
                }
            }
            for (&(backend, result), &n) in MIGRATION_OUTCOMES.iter().zip(&s.migrations) {
                // Only outcomes seen: a peer that never migrated shows none.
                if n == 0 {
                    continue;
                }
                let c = self.migrations_received.get_or_create(&vec![
                    ("peer", s.peer.as_str().to_string()),
                    ("backend", backend.to_string()),
                    ("result", result.to_string()),
                ]);
                c.inc_by(n.saturating_sub(c.get()));
            }
        }
    }

    /// Takes the baseline cache's counters (at scrape time).
    pub fn cache(&self, s: &dwcp_encoding::CacheStats) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cache_entries.set(g(s.entries));
        for (tier, v) in [("memory", s.mem_bytes), ("disk", s.disk_bytes)] {
            self.cache_bytes
                .get_or_create(&vec![("tier", tier.to_string())])
                .set(g(v));
        }
        for (r, v) in [
            ("hit", s.hits),
            ("miss", s.misses),
            ("corrupt", s.corrupt),
            ("evicted", s.evicted),
        ] {
            self.cache_events
                .get_or_create(&vec![("result", r.to_string())])
                .set(g(v));
        }
    }

    /// The exposition text (OpenMetrics, which Prometheus reads natively).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Wraps a socket, counting the bytes that pass through it.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S> Metered<S> {
    /// Counts reads into `read` and writes into `written`.
    pub fn new(inner: S, read: Counter, written: Counter) -> Self {
        Self {
            inner,
            read,
            written,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.inc_by(n as u64);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.inc_by(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_metric() {
        let m = Metrics::new("n1", "1,3");
        m.handshake("ok", "", "v3");
        m.frame("ping");
        m.bytes_received.inc_by(5);
        let text = m.render().unwrap();
        for needle in [
            "dwcp_build_info{version=",
            "node_id=\"n1\"",
            "dwcp_connections_active 0",
            "dwcp_connections_accepted_total 0",
            "dwcp_connections_refused_total 0",
            "dwcp_handshakes_total{result=\"ok\",reason=\"\",version=\"v3\"} 1",
            "dwcp_frames_received_total{type=\"ping\"} 1",
            "dwcp_bytes_received_total 5",
            "dwcp_bytes_sent_total 0",
            "dwcp_ready 0",
            "dwcp_certificate_expiry_timestamp_seconds 0",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }
}
