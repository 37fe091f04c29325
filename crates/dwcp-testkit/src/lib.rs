//! Test helpers: throwaway clusters of certificates, agents on loopback, a tiny HTTP client.
//! Never used by the shipped binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dwcp_agent::Agent;
use dwcp_control::{Config, Settings};
use dwcp_transport::pki::{self, NodeCredentials};
use dwcp_transport::{Endpoint, TlsConfigs};
use dwcp_wire::{ClusterId, NodeId};
use rcgen::{Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A cluster CA in a temporary directory, issuing node certificates on demand.
#[derive(Debug)]
pub struct TestCluster {
    dir: tempfile::TempDir,
    /// The cluster id of the CA.
    pub cluster_id: ClusterId,
}

impl TestCluster {
    /// A fresh CA for cluster `test`.
    pub fn new() -> Self {
        Self::named("test")
    }

    /// A fresh CA for cluster `cluster`.
    pub fn named(cluster: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster_id = ClusterId::new(cluster).unwrap();
        pki::init_ca(dir.path(), &cluster_id, 30, false).unwrap();
        Self { dir, cluster_id }
    }

    /// The certificate directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues (once) and loads credentials for `node`.
    pub fn creds(&self, node: &str) -> NodeCredentials {
        let id = NodeId::new(node).unwrap();
        if !pki::node_cert_path(self.dir(), &id).exists() {
            pki::issue_node(self.dir(), &id, 10, false).unwrap();
        }
        NodeCredentials::load(self.dir(), &id).unwrap()
    }

    /// The CA as an rcgen issuer, for certificates `dwcp certs` would not make.
    fn issuer(&self) -> Issuer<'static, KeyPair> {
        let ca_pem = std::fs::read_to_string(pki::ca_cert_path(self.dir())).unwrap();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(pki::ca_key_path(self.dir())).unwrap())
                .unwrap();
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap()
    }

    /// Credentials signed by this CA whose certificate names no DWCP node (no
    /// `urn:dwcp:node:` name): a valid chain that must still be refused.
    pub fn anonymous_creds(&self) -> NodeCredentials {
        let issuer = self.issuer();
        let now = time::OffsetDateTime::now_utc();
        let mut params = pki::node_params(
            &NodeId::new("anon").unwrap(),
            now,
            now + time::Duration::days(1),
        )
        .unwrap();
        params.subject_alt_names =
            vec![rcgen::SanType::DnsName("anon.example".try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut creds = self.creds("template-node");
        creds.chain = vec![cert.der().clone()];
        creds.key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        creds
    }

    /// Credentials for `node` whose certificate expired yesterday (signed by this CA).
    pub fn expired_creds(&self, node: &str) -> NodeCredentials {
        let id = NodeId::new(node).unwrap();
        let issuer = self.issuer();
        let now = time::OffsetDateTime::now_utc();
        let params = pki::node_params(
            &id,
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut creds = self.creds("template-node");
        creds.node_id = id;
        creds.chain = vec![cert.der().clone()];
        creds.key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        creds
    }
}

impl Default for TestCluster {
    fn default() -> Self {
        Self::new()
    }
}

/// Default settings for tests: loopback, ephemeral ports, short timeouts; `tweak` edits the
/// config before validation.
pub fn settings(cluster: &TestCluster, tweak: impl FnOnce(&mut Config)) -> Settings {
    let mut c = Config::default();
    c.node.cluster_id = cluster.cluster_id.to_string();
    c.node.certs_dir = cluster.dir().to_path_buf();
    c.agent.listen = "127.0.0.1:0".into();
    c.agent.admin_listen = "127.0.0.1:0".into();
    c.agent.shutdown_grace_secs = 2;
    c.agent.spool_dir = cluster.dir().join("spool");
    c.encoding.cache_dir = cluster.dir().join("cache");
    c.protocol.tls_timeout_ms = 1000;
    c.protocol.handshake_timeout_ms = 1000;
    tweak(&mut c);
    c.validate().unwrap()
}

/// A client endpoint for `node` in `cluster`.
pub fn endpoint(cluster: &TestCluster, node: &str, tweak: impl FnOnce(&mut Config)) -> Endpoint {
    endpoint_with(cluster.creds(node), &settings(cluster, tweak))
}

/// A client endpoint with the given credentials.
pub fn endpoint_with(creds: NodeCredentials, settings: &Settings) -> Endpoint {
    let tls = TlsConfigs::new(&creds).unwrap();
    Endpoint::new(creds.node_id, settings, tls)
}

/// A client endpoint with credentials that need not chain to the CA they trust (a peer of
/// another CA that trusts ours: an intruder).
pub fn intruder_endpoint(creds: NodeCredentials, settings: &Settings) -> Endpoint {
    let tls = TlsConfigs::new_unchecked(&creds).unwrap();
    Endpoint::new(creds.node_id, settings, tls)
}

/// An agent running on loopback in the current runtime.
#[derive(Debug)]
pub struct RunningAgent {
    /// Peer address.
    pub addr: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), dwcp_agent::AgentError>>,
}

impl RunningAgent {
    /// Starts agent `node` of `cluster`.
    pub async fn start(cluster: &TestCluster, node: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(cluster.creds(node), &settings(cluster, tweak)).await
    }

    /// Starts an agent with the given credentials and settings.
    pub async fn start_with(creds: NodeCredentials, settings: &Settings) -> Self {
        let settings = settings.clone();
        let tls = TlsConfigs::new(&creds).unwrap();
        let agent = Agent::bind(creds.node_id.clone(), &settings, tls, i64::MAX)
            .await
            .unwrap();
        let (addr, admin) = (agent.local_addr(), agent.admin_addr());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(agent.run(async {
            let _ = rx.await;
        }));
        wait_ready(admin).await.unwrap();
        Self {
            addr,
            admin,
            stop: Some(tx),
            task,
        }
    }

    /// Signals shutdown and waits (bounded) for the agent to return.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .context("agent did not stop within 10 s")???;
        Ok(())
    }

    /// The agent's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        body
    }
}

/// Polls `/readyz` until it answers 200, for at most 5 s.
pub async fn wait_ready(admin: SocketAddr) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("agent at {admin} not ready within 5 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 GET (bounded to 5 s), returning status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .context("no status line")?
            .parse()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        Ok::<_, anyhow::Error>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await?
}

/// Sum of the samples of `name` in a metrics text whose labels contain every `labels` pair.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A TLS client configuration that presents no client certificate and accepts any server
/// certificate: for testing that agents refuse certificate-less peers. Never use elsewhere.
pub fn dangerous_no_client_cert_config() -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Debug)]
    struct AcceptAny(rustls::crypto::WebPkiSupportedAlgorithms);
    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAny(algs)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![dwcp_transport::ALPN.to_vec()];
    std::sync::Arc::new(cfg)
}

/// Opens a TLS session to an agent with `endpoint`'s client configuration but does not run the
/// DWCP handshake: for sending raw frames or nothing at all.
pub async fn raw_tls(
    config: std::sync::Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
}

/// Reads from `io` until EOF or error, for at most `limit`; returns what arrived, or `None` if
/// the peer kept the connection open past the limit.
pub async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    limit: Duration,
) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let r = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    r.ok().map(|()| buf)
}

/// What a [`Proxy`] does to the connection with a given index (0 = first accepted).
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward faithfully.
    None,
    /// Cut connection `conn` once `after` bytes went from client to server.
    Kill {
        /// Connection index.
        conn: usize,
        /// Client-to-server bytes before the cut.
        after: u64,
    },
    /// As `Kill`, for the first connection whose client-to-server bytes reach `after`,
    /// whichever it is: for clients that choose themselves which connection carries what.
    KillFirst {
        /// Client-to-server bytes before the cut.
        after: u64,
    },
    /// Flip one bit of the client-to-server byte at offset `after` of connection `conn`.
    Corrupt {
        /// Connection index.
        conn: usize,
        /// Offset of the byte to corrupt.
        after: u64,
    },
    /// Hold connection `conn` for `delay` before connecting it to the server (a handshake
    /// that is slow to complete, like one whose SYN was lost).
    Stall {
        /// Connection index.
        conn: usize,
        /// How long.
        delay: Duration,
    },
    /// Stop forwarding connection `conn`'s client-to-server bytes for `delay` once `after`
    /// of them went through (a stream stuck mid-transfer, as in a retransmission timeout).
    Pause {
        /// Connection index.
        conn: usize,
        /// Client-to-server bytes before the pause.
        after: u64,
        /// How long.
        delay: Duration,
    },
    /// As `Pause`, for the first connection whose client-to-server bytes reach `after`,
    /// whichever it is: for clients that choose themselves which connection carries what.
    PauseFirst {
        /// Client-to-server bytes before the pause.
        after: u64,
        /// How long.
        delay: Duration,
    },
}

/// A TCP proxy on loopback that can break one connection on purpose, or all of them for a
/// while ([`Proxy::outage`]).
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
    /// Until when the link is down (new connections are closed at once), and the cut of the
    /// open ones (its value counts outages).
    down_until: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// The link goes down for `period`: every connection through the proxy is cut at once
    /// (both sockets closed), and those made meanwhile are closed as soon as accepted.
    pub fn outage(&self, period: Duration) {
        *self.down_until.lock().unwrap() = Some(std::time::Instant::now() + period);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Forwards connections to `target`, applying `fault`.
    pub async fn start(target: SocketAddr, fault: Fault) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first_taken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let down_until = std::sync::Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let down = down_until.clone();
        let task = tokio::spawn(async move {
            let mut index = 0usize;
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while pipes.try_join_next().is_some() {}
                if down
                    .lock()
                    .unwrap()
                    .is_some_and(|t| std::time::Instant::now() < t)
                {
                    drop(client); // the link is down
                    continue;
                }
                let i = index;
                index += 1;
                let first_taken = first_taken.clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                pipes.spawn(async move {
                    if let Fault::Stall { conn, delay } = fault
                        && conn == i
                    {
                        tokio::time::sleep(delay).await;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut total = 0u64;
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            match fault {
                                Fault::Kill { conn, after }
                                    if conn == i && total + n as u64 >= after =>
                                {
                                    return;
                                }
                                Fault::KillFirst { after }
                                    if total + n as u64 >= after
                                        && !first_taken
                                            .swap(true, std::sync::atomic::Ordering::SeqCst) =>
                                {
                                    return;
                                }
                                Fault::Corrupt { conn, after }
                                    if conn == i && total <= after && after < total + n as u64 =>
                                {
                                    buf[(after - total) as usize] ^= 0x40;
                                }
                                _ => {}
                            }
                            let before = total;
                            total += n as u64;
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            let pause = match fault {
                                Fault::Pause { conn, after, delay } if conn == i => {
                                    Some((after, delay))
                                }
                                Fault::PauseFirst { after, delay } => Some((after, delay)),
                                _ => None,
                            };
                            if let Some((after, delay)) = pause
                                && before < after
                                && after <= total
                                && !(matches!(fault, Fault::PauseFirst { .. })
                                    && first_taken.swap(true, std::sync::atomic::Ordering::SeqCst))
                            {
                                tokio::time::sleep(delay).await;
                            }
                        }
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    };
                    // Whichever direction ends first ends the connection (both sockets drop),
                    // as does an outage.
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            task,
            down_until,
            cut,
        }
    }
}

/// A file of `size` pseudo-random bytes (deterministic from `seed`) in `dir`.
pub fn random_file(dir: &Path, name: &str, size: usize, seed: u64) -> std::path::PathBuf {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        // xorshift64*: cheap, and incompressible enough for transport tests.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        data.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    data.truncate(size);
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}
