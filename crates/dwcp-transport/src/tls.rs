//! Mutual TLS 1.3 between nodes (`docs/PROTOCOL.md`, "Transport security").
//!
//! Both sides present a node certificate issued by the cluster CA, and both verify the other's
//! chain against that CA only (no system roots). Peers are dialled by address, and node
//! certificates carry no host names, so the client does not match a host name: it checks the
//! chain, the validity dates and the server-auth usage, and the DWCP handshake then binds the
//! peer's claimed node id to the `urn:dwcp:node:` name in the verified certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    Error as TlsError, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::pki::{NodeCredentials, node_id_from_cert};

/// ALPN protocol id of DWCP.
pub const ALPN: &[u8] = b"dwcp";

/// Server and client TLS configurations of one node.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    /// For accepting peers.
    pub server: Arc<ServerConfig>,
    /// For dialling peers.
    pub client: Arc<ClientConfig>,
}

/// Why TLS configurations could not be built from the credentials.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS with the certificates from {path}: {detail}")]
pub struct TlsSetupError {
    /// Certificate file involved.
    pub path: String,
    /// What rustls said.
    pub detail: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfigs {
    /// Builds both configurations: TLS 1.3 only, the cluster CA as the only root. Fails if
    /// the node's own certificate does not chain to that CA.
    pub fn new(creds: &NodeCredentials) -> Result<Self, TlsSetupError> {
        Self::build(creds, true)
    }

    /// As [`TlsConfigs::new`], without checking the node's own chain: for tests that play a
    /// peer holding a certificate of another CA (an intruder does not ask).
    #[doc(hidden)]
    pub fn new_unchecked(creds: &NodeCredentials) -> Result<Self, TlsSetupError> {
        Self::build(creds, false)
    }

    fn build(creds: &NodeCredentials, check: bool) -> Result<Self, TlsSetupError> {
        let err = |e: &dyn std::fmt::Display| TlsSetupError {
            path: creds.cert_path.display().to_string(),
            detail: e.to_string(),
        };
        // The certificate and its key together (a key of another certificate, say).
        let with_key = |e: &dyn std::fmt::Display| TlsSetupError {
            path: format!(
                "{} with {}",
                creds.cert_path.display(),
                creds.key_path.display()
            ),
            detail: e.to_string(),
        };
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for ca in &creds.ca_certs {
            roots.add(ca.clone()).map_err(|e| err(&e))?;
        }
        let roots = Arc::new(roots);

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| err(&e))?;
        if check {
            check_own_chain(creds, &roots, &client_verifier, &provider)?;
        }
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(&e))?
            .with_client_cert_verifier(Arc::new(NodeClientVerifier(client_verifier)))
            .with_single_cert(creds.chain.clone(), creds.key.clone_key())
            .map_err(|e| with_key(&e))?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // No session resumption: a resumed session takes the peer's certificate from the
        // first handshake unchecked, so a node whose certificate expired would get in for a
        // day more. A full handshake costs a signature and two checks, well under a
        // millisecond of CPU per stream.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let verifier = Arc::new(NodeCertVerifier {
            roots,
            algs: provider.signature_verification_algorithms,
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
            .map_err(|e| with_key(&e))?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Fails unless the node's own certificate chains to the CA it trusts, for both uses (server
/// and client): otherwise every peer would refuse it, and the node would start regardless. Its
/// dates are left to [`NodeCredentials::check_validity`], which says so more plainly.
fn check_own_chain(
    creds: &NodeCredentials,
    roots: &RootCertStore,
    client_verifier: &Arc<dyn ClientCertVerifier>,
    provider: &CryptoProvider,
) -> Result<(), TlsSetupError> {
    let Some((leaf, rest)) = creds.chain.split_first() else {
        return Err(TlsSetupError {
            path: creds.cert_path.display().to_string(),
            detail: "no certificate in it".into(),
        });
    };
    let now = UnixTime::now();
    let as_server = ParsedCertificate::try_from(leaf).and_then(|cert| {
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            rest,
            now,
            provider.signature_verification_algorithms.all,
        )
    });
    let r = as_server.and_then(|()| {
        client_verifier
            .verify_client_cert(leaf, rest, now)
            .map(|_| ())
    });
    match r {
        Ok(())
        | Err(TlsError::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        )) => Ok(()),
        Err(e) => Err(TlsSetupError {
            path: creds.cert_path.display().to_string(),
            detail: format!(
                "not accepted under the cluster CA in {} ({e}): was the CA made again \
                 (`certs init --force`) without issuing this node again?",
                creds.ca_path.display()
            ),
        }),
    }
}

/// Verifies a server's node certificate: chain to the cluster CA, validity, server-auth usage,
/// and the presence of a well-formed node id. Replaces only the host-name match of the stock
/// verifier; identity is checked in the DWCP handshake against that node id.
#[derive(Debug)]
struct NodeCertVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NodeCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        require_node_id(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Refuses a certificate that names no DWCP node: a chain to the cluster CA is not enough, the
/// handshake needs the node id.
fn require_node_id(cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    node_id_from_cert(cert).map(|_| ()).map_err(|e| {
        TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            NotANodeCert(e),
        ))))
    })
}

/// The stock client verifier (chain, validity, client-auth usage) plus the node-id check, so
/// a client certificate without a node id is refused during TLS, with an alert the client can
/// report, rather than after it.
#[derive(Debug)]
struct NodeClientVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        require_node_id(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct NotANodeCert(String);

impl std::fmt::Display for NotANodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotANodeCert {}

/// How a TLS failure reads to an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The peer refused *our* certificate (it sent a certificate alert).
    RefusedByPeer(String),
    /// We refused the peer's certificate.
    BadPeerCertificate(String),
    /// Anything else (protocol mismatch, not TLS at all, ...).
    Other(String),
}

/// Sorts a rustls error into a [`TlsFailure`] with an explanation.
pub fn classify(err: &TlsError) -> TlsFailure {
    match err {
        TlsError::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::AccessDenied => TlsFailure::RefusedByPeer(format!(
                "the peer refused our certificate (TLS alert {alert:?}); \
                 is it issued by the peer's cluster CA, and still valid?"
            )),
            other => TlsFailure::Other(format!("the peer sent TLS alert {other:?}")),
        },
        TlsError::InvalidCertificate(ce) => TlsFailure::BadPeerCertificate(match ce {
            CertificateError::UnknownIssuer => {
                "the peer's certificate is not issued by our cluster CA (unknown issuer)".into()
            }
            // webpki finds the issuer by name; a CA of the same name but another key shows up
            // as a bad signature.
            CertificateError::BadSignature => {
                "the peer's certificate is not issued by our cluster CA (signature does not \
                 verify with our CA's key)"
                    .into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the peer's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the peer's certificate is not valid yet (check clocks)".into()
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "the peer's certificate is not issued for DWCP nodes (key usage)".into()
            }
            CertificateError::Other(e) => {
                format!("the peer's certificate is not a DWCP node certificate: {e}")
            }
            other => format!("the peer's certificate is invalid: {other:?}"),
        }),
        TlsError::NoCertificatesPresented => {
            TlsFailure::BadPeerCertificate("the peer presented no certificate".into())
        }
        TlsError::InvalidMessage(m) => {
            TlsFailure::Other(format!("the peer does not speak TLS as expected: {m:?}"))
        }
        other => TlsFailure::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pki;
    use dwcp_wire::{ClusterId, NodeId};

    /// Every connection checks the peer's certificate: the second handshake between the
    /// same two nodes is a full one, not a resumption of the first.
    #[test]
    fn no_handshake_resumes_a_session() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path(), &ClusterId::new("c1").unwrap(), 10, false).unwrap();
        let creds = |n: &str| {
            let id = NodeId::new(n).unwrap();
            pki::issue_node(dir.path(), &id, 10, false).unwrap();
            TlsConfigs::new(&NodeCredentials::load(dir.path(), &id).unwrap()).unwrap()
        };
        let (a, b) = (creds("node-a"), creds("node-b"));
        let name = ServerName::try_from("127.0.0.1").unwrap();
        for _ in 0..2 {
            let mut c = rustls::ClientConnection::new(a.client.clone(), name.clone()).unwrap();
            let mut s = rustls::ServerConnection::new(b.server.clone()).unwrap();
            // Bytes back and forth until both are done, then once more for what the server
            // sends after its handshake (a session ticket, if it issued one).
            for _ in 0..10 {
                let mut buf = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut buf).unwrap();
                }
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut buf = Vec::new();
                while s.wants_write() {
                    s.write_tls(&mut buf).unwrap();
                }
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
            assert!(!c.is_handshaking() && !s.is_handshaking());
            assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
            assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Full));
        }
    }
}
