//! Cluster certificates: a CA per cluster, one certificate per node (`docs/OPERATIONS.md`,
//! "Certificates").
//!
//! Layout of a certificate directory, as `dwcp certs init` / `dwcp certs issue` make it and
//! `--certs-dir D --node-id ID` reads it:
//!
//! ```text
//! D/ca.pem             cluster CA certificate (copy to every node)
//! D/ca.key             cluster CA private key (keep on the issuing machine only)
//! D/nodes/ID.pem       node certificate
//! D/nodes/ID.key       node private key (mode 0600)
//! ```
//!
//! A node certificate names its node in a URI subject alternative name `urn:dwcp:node:ID`;
//! peers read the node id from there and check it against the id claimed in the handshake.
//! Ids longer than [`MAX_PLAIN_STEM`] bytes would overflow file-name limits, so their files
//! are named by a prefix plus a hash of the whole id.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dwcp_wire::{ClusterId, IdError, NodeId};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::{Duration as TimeDuration, OffsetDateTime};

/// Prefix of the URI SAN that carries the node id.
pub const NODE_URI_PREFIX: &str = "urn:dwcp:node:";
/// Ids up to this many bytes are used as file names as they are.
pub const MAX_PLAIN_STEM: usize = 200;

/// What went wrong with certificates, naming the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("cannot {verb} {path}: {source}")]
    Io {
        /// "read", "create", ...
        verb: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file exists that would be overwritten.
    #[error("{path} already exists (use --force to replace it)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A file does not hold what it should.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The certificate belongs to another node.
    #[error("{path} is the certificate of node {found:?}, not of {expected:?}")]
    WrongNode {
        /// The file.
        path: PathBuf,
        /// Node id found in it.
        found: String,
        /// Node id asked for.
        expected: String,
    },
    /// The certificate is outside its validity period.
    #[error("{path} is not valid now: valid from {not_before} until {not_after}")]
    NotValidNow {
        /// The file.
        path: PathBuf,
        /// Start of validity (RFC 3339).
        not_before: String,
        /// End of validity (RFC 3339).
        not_after: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The cause.
        source: rcgen::Error,
    },
}

/// Path of the CA certificate in `dir`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// Path of the CA key in `dir`.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

fn node_stem(id: &NodeId) -> String {
    let s = id.as_str();
    if s.len() <= MAX_PLAIN_STEM {
        return s.to_string();
    }
    // FNV-1a: a stable, dependency-free name hash; not a security boundary (the certificate
    // inside names its node and is checked on load).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    // Ids are ASCII, so any byte offset is a char boundary.
    format!("{}~{h:016x}", &s[..180])
}

/// Path of node `id`'s certificate in `dir`.
pub fn node_cert_path(dir: &Path, id: &NodeId) -> PathBuf {
    dir.join("nodes").join(format!("{}.pem", node_stem(id)))
}

/// Path of node `id`'s key in `dir`.
pub fn node_key_path(dir: &Path, id: &NodeId) -> PathBuf {
    dir.join("nodes").join(format!("{}.key", node_stem(id)))
}

fn io_err<'a>(verb: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        verb,
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io_err("create", path)(e)
        }
    })?;
    // `mode` only applies to files created now: a replaced key must not keep looser bits.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(io_err("set permissions of", path))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", path))
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err("read", path))
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

/// Validity window for a new certificate: from an hour ago (tolerates clock skew between
/// nodes) to `days` from now.
fn window(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (
        now - TimeDuration::hours(1),
        now + TimeDuration::days(i64::from(days)),
    )
}

/// Creates a cluster CA in `dir` (`ca.pem`, `ca.key`). Refuses to replace an existing one
/// unless `force`.
pub fn init_ca(dir: &Path, cluster: &ClusterId, days: u32, force: bool) -> Result<(), PkiError> {
    let cert_path = ca_cert_path(dir);
    let key_path = ca_key_path(dir);
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(PkiError::Exists { path: p.clone() });
            }
        }
    }
    let key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "DWCP");
    // A tag from the key in the name keeps two CAs of the same cluster id apart, so a
    // certificate from the other one reads as "unknown issuer" rather than a bad signature.
    let tag: String = key
        .public_key_raw()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(
        DnType::CommonName,
        format!("DWCP cluster CA {} {tag}", short(cluster.as_str())),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = window(days);
    let cert = params
        .self_signed(&key)
        .map_err(gen_err("CA certificate"))?;
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.pem(), 0o644, force)?;
    Ok(())
}

/// X.520 caps common names at 64 characters; ids can be longer (the SAN carries the full id).
fn short(s: &str) -> &str {
    &s[..s.len().min(40)]
}

/// Parameters of a node certificate for `id`, valid from `not_before` to `not_after`.
pub fn node_params(
    id: &NodeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "DWCP");
    dn.push(DnType::CommonName, short(id.as_str()));
    params.distinguished_name = dn;
    let uri = format!("{NODE_URI_PREFIX}{id}")
        .try_into()
        .map_err(gen_err("node URI"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node is both a TLS server (accepting peers) and a client (dialling them).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Issues a certificate for node `id`, signed by the CA in `dir`. Returns the certificate and
/// key paths.
pub fn issue_node(
    dir: &Path,
    id: &NodeId,
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let (ca_cert, ca_key) = (ca_cert_path(dir), ca_key_path(dir));
    let ca_key_pem = read_file(&ca_key)?;
    let ca_cert_pem = read_file(&ca_cert)?;
    let ca_keypair = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
        path: ca_key.clone(),
        detail: format!("not a private key: {e}"),
    })?;
    // rcgen signs with whatever key it is given: a `ca.key` from another `certs init` would
    // make certificates that every peer refuses.
    let ca_der = rustls_pemfile::certs(&mut ca_cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| PkiError::Invalid {
            path: ca_cert.clone(),
            detail: "no certificate in it".into(),
        })?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|e| PkiError::Invalid {
            path: ca_cert.clone(),
            detail: format!("not an X.509 certificate: {e}"),
        })?;
    {
        use rcgen::PublicKeyData;
        if parsed.public_key().subject_public_key.data.as_ref() != ca_keypair.der_bytes() {
            return Err(PkiError::Invalid {
                path: ca_key,
                detail: format!("not the key of the CA certificate {}", ca_cert.display()),
            });
        }
    }
    if !parsed.validity().is_valid() {
        return Err(PkiError::Invalid {
            path: ca_cert.clone(),
            detail: format!(
                "the CA certificate is not valid now (valid {} to {}): make a new CA with \
                 `dwcp certs init --force` and issue every node again",
                parsed.validity().not_before,
                parsed.validity().not_after
            ),
        });
    }
    let ca_until = parsed.validity().not_after.timestamp();
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_keypair).map_err(|e| PkiError::Invalid {
            path: ca_cert.clone(),
            detail: format!("not a CA certificate: {e}"),
        })?;
    let (nb, na) = window(days);
    // Past the CA's own end, the certificate would stop being accepted before its date.
    let na = if na.unix_timestamp() > ca_until {
        if na.unix_timestamp() - ca_until > 86_400 {
            tracing::warn!(
                "the node certificate ends with the CA's on {} ({days} days asked)",
                parsed.validity().not_after
            );
        }
        OffsetDateTime::from_unix_timestamp(ca_until).unwrap_or(na)
    } else {
        na
    };
    let key = KeyPair::generate().map_err(gen_err("node key"))?;
    let cert = node_params(id, nb, na)?
        .signed_by(&key, &issuer)
        .map_err(gen_err("node certificate"))?;
    let cert_path = node_cert_path(dir, id);
    let key_path = node_key_path(dir, id);
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(PkiError::Exists { path: p.clone() });
            }
        }
    }
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.pem(), 0o644, force)?;
    Ok((cert_path, key_path))
}

/// Reads the node id out of a node certificate's `urn:dwcp:node:` URI SAN.
pub fn node_id_from_cert(der: &CertificateDer<'_>) -> Result<NodeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?
        .ok_or("no subject alternative names: not a DWCP node certificate")?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(NODE_URI_PREFIX),
        _ => None,
    });
    let id = ids
        .next()
        .ok_or("no urn:dwcp:node: name: not a DWCP node certificate")?;
    if ids.next().is_some() {
        return Err("more than one urn:dwcp:node: name".into());
    }
    NodeId::new(id).map_err(|e: IdError| e.to_string())
}

/// The validity period of a certificate, as Unix seconds.
pub fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// A node's trust roots, certificate chain and key, loaded from a certificate directory.
#[derive(Debug)]
pub struct NodeCredentials {
    /// The node these belong to.
    pub node_id: NodeId,
    /// Trusted CA certificates (the cluster CA).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// The node certificate (first) and any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the node certificate came from (for messages).
    pub cert_path: PathBuf,
    /// Where its key came from (for messages).
    pub key_path: PathBuf,
    /// Where the CA certificates came from (for messages).
    pub ca_path: PathBuf,
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        Self {
            node_id: self.node_id.clone(),
            ca_certs: self.ca_certs.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_path: self.cert_path.clone(),
            key_path: self.key_path.clone(),
            ca_path: self.ca_path.clone(),
        }
    }
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let text = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid {
            path: path.to_path_buf(),
            detail: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Invalid {
            path: path.to_path_buf(),
            detail: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

impl NodeCredentials {
    /// Loads node `id`'s credentials from `dir` and checks that the certificate names that
    /// node. Validity dates are checked separately ([`Self::check_validity`]).
    pub fn load(dir: &Path, id: &NodeId) -> Result<Self, PkiError> {
        let ca_path = ca_cert_path(dir);
        let cert_path = node_cert_path(dir, id);
        let key_path = node_key_path(dir, id);
        let ca_certs = pem_certs(&ca_path)?;
        let chain = pem_certs(&cert_path)?;
        let key_text = read_file(&key_path)?;
        let key = rustls_pemfile::private_key(&mut key_text.as_bytes())
            .map_err(|e| PkiError::Invalid {
                path: key_path.clone(),
                detail: format!("bad PEM: {e}"),
            })?
            .ok_or_else(|| PkiError::Invalid {
                path: key_path.clone(),
                detail: "no private key in it".into(),
            })?;
        let found = node_id_from_cert(&chain[0]).map_err(|detail| PkiError::Invalid {
            path: cert_path.clone(),
            detail,
        })?;
        if &found != id {
            return Err(PkiError::WrongNode {
                path: cert_path,
                found: found.to_string(),
                expected: id.to_string(),
            });
        }
        Ok(Self {
            node_id: found,
            ca_certs,
            chain,
            key,
            cert_path,
            key_path,
            ca_path,
        })
    }

    /// Fails if the node certificate is not valid at `now`: a node with an expired
    /// certificate would be refused by every peer, so it should not start.
    pub fn check_validity(&self, now: UnixTime) -> Result<(), PkiError> {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let ca_path = self
            .cert_path
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| PathBuf::from("ca.pem"), ca_cert_path);
        let certs = self
            .ca_certs
            .iter()
            .map(|c| (c, ca_path.clone()))
            .chain(std::iter::once((&self.chain[0], self.cert_path.clone())));
        for (cert, path) in certs {
            check_window(cert, &path, now)?;
        }
        Ok(())
    }

    /// When the node certificate stops being valid, Unix seconds.
    pub fn not_after(&self) -> Result<i64, PkiError> {
        validity(&self.chain[0])
            .map(|(_, na)| na)
            .map_err(|detail| PkiError::Invalid {
                path: self.cert_path.clone(),
                detail,
            })
    }
}

fn check_window(cert: &CertificateDer<'_>, path: &Path, now: i64) -> Result<(), PkiError> {
    let (nb, na) = validity(cert).map_err(|detail| PkiError::Invalid {
        path: path.to_path_buf(),
        detail,
    })?;
    if now < nb || now > na {
        let fmt = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .ok()
                .and_then(|d| {
                    d.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| t.to_string())
        };
        return Err(PkiError::NotValidNow {
            path: path.to_path_buf(),
            not_before: fmt(nb),
            not_after: fmt(na),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn init_issue_load() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &ClusterId::new("c").unwrap(), 30, false).unwrap();
        let (cert, key) = issue_node(dir.path(), &id("node-1"), 10, false).unwrap();
        assert_eq!(cert, dir.path().join("nodes/node-1.pem"));
        let mode = fs::metadata(&key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let creds = NodeCredentials::load(dir.path(), &id("node-1")).unwrap();
        assert_eq!(creds.node_id, id("node-1"));
        assert_eq!(node_id_from_cert(&creds.chain[0]).unwrap(), id("node-1"));
        creds.check_validity(UnixTime::now()).unwrap();
        let far = UnixTime::since_unix_epoch(std::time::Duration::from_secs(4_000_000_000));
        assert!(matches!(
            creds.check_validity(far),
            Err(PkiError::NotValidNow { .. })
        ));
    }

    #[test]
    fn existing_files_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let c = ClusterId::new("c").unwrap();
        init_ca(dir.path(), &c, 30, false).unwrap();
        assert!(matches!(
            init_ca(dir.path(), &c, 30, false),
            Err(PkiError::Exists { .. })
        ));
        // A replaced key gets 0600 even if the old file was world-readable.
        fs::set_permissions(
            ca_key_path(dir.path()),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        init_ca(dir.path(), &c, 30, true).unwrap();
        let mode = fs::metadata(ca_key_path(dir.path())).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        issue_node(dir.path(), &id("a"), 1, false).unwrap();
        assert!(matches!(
            issue_node(dir.path(), &id("a"), 1, false),
            Err(PkiError::Exists { .. })
        ));
    }

    /// A CA made again (`certs init --force`): a key of the other CA is refused when issuing,
    /// and a node issued under the old CA is refused when loaded, naming both files.
    #[test]
    fn a_ca_made_again_is_noticed_when_issuing_and_when_loading() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let c = ClusterId::new("c").unwrap();
        init_ca(old.path(), &c, 30, false).unwrap();
        init_ca(new.path(), &c, 30, false).unwrap();
        issue_node(old.path(), &id("n1"), 10, false).unwrap();
        // The old CA's certificate with the new CA's key.
        fs::copy(ca_key_path(new.path()), ca_key_path(old.path())).unwrap();
        let err = issue_node(old.path(), &id("n2"), 10, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("not the key of the CA certificate"),
            "{err}"
        );
        assert!(!node_cert_path(old.path(), &id("n2")).exists());
        // The new CA's certificate, the node still the old CA's.
        fs::copy(ca_cert_path(new.path()), ca_cert_path(old.path())).unwrap();
        let creds = NodeCredentials::load(old.path(), &id("n1")).unwrap();
        let err = crate::TlsConfigs::new(&creds).unwrap_err().to_string();
        assert!(
            err.contains("n1.pem") && err.contains("ca.pem") && err.contains("cluster CA"),
            "{err}"
        );
        // Issued again, it loads.
        issue_node(old.path(), &id("n1"), 10, true).unwrap();
        let creds = NodeCredentials::load(old.path(), &id("n1")).unwrap();
        crate::TlsConfigs::new(&creds).unwrap();
    }

    /// A node certificate asked to outlive its CA ends with it.
    #[test]
    fn a_node_certificate_ends_no_later_than_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &ClusterId::new("c").unwrap(), 2, false).unwrap();
        issue_node(dir.path(), &id("n"), 400, false).unwrap();
        let creds = NodeCredentials::load(dir.path(), &id("n")).unwrap();
        let in_3_days = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() + 3 * 86_400,
        ));
        assert!(creds.check_validity(UnixTime::now()).is_ok());
        assert!(creds.check_validity(in_3_days).is_err());
    }

    /// A key that is not the certificate's is reported with both files named.
    #[test]
    fn a_key_of_another_certificate_names_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &ClusterId::new("c").unwrap(), 30, false).unwrap();
        issue_node(dir.path(), &id("a"), 10, false).unwrap();
        issue_node(dir.path(), &id("b"), 10, false).unwrap();
        fs::copy(
            node_key_path(dir.path(), &id("b")),
            node_key_path(dir.path(), &id("a")),
        )
        .unwrap();
        let creds = NodeCredentials::load(dir.path(), &id("a")).unwrap();
        let err = crate::TlsConfigs::new(&creds).unwrap_err().to_string();
        assert!(
            err.contains("a.pem with ") && err.contains("a.key"),
            "{err}"
        );
    }

    #[test]
    fn long_ids_get_hashed_file_names() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &ClusterId::new("c").unwrap(), 30, false).unwrap();
        let long = id(&"n".repeat(256));
        let other = id(&format!("{}x", "n".repeat(255)));
        let (p1, _) = issue_node(dir.path(), &long, 1, false).unwrap();
        let (p2, _) = issue_node(dir.path(), &other, 1, false).unwrap();
        assert_ne!(p1, p2);
        assert!(p1.file_name().unwrap().len() < 255);
        assert_eq!(
            NodeCredentials::load(dir.path(), &long).unwrap().node_id,
            long
        );
    }

    #[test]
    fn load_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = NodeCredentials::load(dir.path(), &id("x")).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        init_ca(dir.path(), &ClusterId::new("c").unwrap(), 30, false).unwrap();
        let err = NodeCredentials::load(dir.path(), &id("x")).unwrap_err();
        assert!(err.to_string().contains("nodes/x.pem"), "{err}");
    }

    #[test]
    fn renamed_certificate_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &ClusterId::new("c").unwrap(), 30, false).unwrap();
        issue_node(dir.path(), &id("a"), 1, false).unwrap();
        let nodes = dir.path().join("nodes");
        fs::copy(nodes.join("a.pem"), nodes.join("b.pem")).unwrap();
        fs::copy(nodes.join("a.key"), nodes.join("b.key")).unwrap();
        assert!(matches!(
            NodeCredentials::load(dir.path(), &id("b")),
            Err(PkiError::WrongNode { .. })
        ));
    }

    proptest::proptest! {
        /// Arbitrary bytes, and real certificates with bytes changed, never panic the
        /// certificate reader.
        #[test]
        fn arbitrary_certificate_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            flips in proptest::collection::vec((0usize..2000, 1u8..=255), 0..8),
        ) {
            let _ = node_id_from_cert(&CertificateDer::from(bytes));
            let _ = validity(&CertificateDer::from(sample_cert()));
            let mut cert = sample_cert();
            for (i, x) in flips {
                let n = cert.len();
                cert[i % n] ^= x;
            }
            let _ = node_id_from_cert(&CertificateDer::from(cert.clone()));
            let _ = validity(&CertificateDer::from(cert));
        }
    }

    fn sample_cert() -> Vec<u8> {
        use std::sync::OnceLock;
        static CERT: OnceLock<Vec<u8>> = OnceLock::new();
        CERT.get_or_init(|| {
            let now = OffsetDateTime::now_utc();
            let params = node_params(&id("sample"), now, now + TimeDuration::days(1)).unwrap();
            params
                .self_signed(&KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .to_vec()
        })
        .clone()
    }

    #[test]
    fn garbage_certificates_are_errors() {
        assert!(node_id_from_cert(&CertificateDer::from(vec![0u8; 10])).is_err());
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ca.pem"), "not pem").unwrap();
        let err = NodeCredentials::load(dir.path(), &id("x")).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
