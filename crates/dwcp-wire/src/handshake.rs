//! The DWCP handshake as a sans-IO state machine (`docs/PROTOCOL.md`, "Handshake").
//!
//! It runs inside an established mutual-TLS session, after each side has verified the other's
//! certificate chain and read the node id out of it. One round trip:
//!
//! ```text
//!   client                                   server
//!     | HELLO {versions, node, cluster, caps} -->|  validate, pick highest common version,
//!     |                                          |  negotiate capabilities
//!     |<-- HELLO_ACK {version, node, cluster,    |
//!     |               caps, negotiated}          |    (or REJECT {code, reason}, then close)
//!   validate, recompute `negotiated`
//! ```
//!
//! The machine performs no I/O and reads no clock. Use it like this:
//!
//! 1. build it with [`Handshake::client`] or [`Handshake::server`], passing `now`;
//! 2. send every frame [`Handshake::poll_transmit`] returns;
//! 3. feed received frames to [`Handshake::handle_frame`] (and a framing error to
//!    [`Handshake::handle_frame_error`]); call [`Handshake::handle_timeout`] when the instant of
//!    [`Handshake::poll_timeout`] has passed;
//! 4. repeat 2-3 until [`Handshake::outcome`] is no longer [`Outcome::InProgress`], then send
//!    what `poll_transmit` still returns (a `REJECT` after a failure) and act on the outcome.
//!
//! The first error is sticky: once failed, the machine stays failed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::ErrorCode;
use crate::frame::{Frame, FrameError, FrameType, HARD_MAX_PAYLOAD, MIN_MAX_PAYLOAD};
use crate::ids::{ClusterId, IdError, NodeId};
use crate::msg::{self, Capabilities, Close, Hello, HelloAck, MessageError};

/// Protocol versions this implementation speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// Legacy mode: one stream, no delta encoding, no QUIC.
    V1,
    /// Full protocol: multi-stream, delta encoding, QUIC.
    V3,
    /// As v3; the data of an object sent fresh may arrive on any connection before its
    /// begin has been read (the receiver waits for the begin).
    V4,
    /// As v4; the in-place migration rounds of one target may be in flight at once (each in
    /// a session of its own): the receiver applies them in the order it read their begins.
    V5,
    /// As v5; a migration round may ask to commit its target once it is applied (its
    /// success answer then says the target is published).
    V6,
}

impl Version {
    /// Every version this implementation speaks, lowest first.
    pub const ALL: [Self; 5] = [Self::V1, Self::V3, Self::V4, Self::V5, Self::V6];

    /// The number on the wire.
    pub fn number(self) -> u32 {
        match self {
            Self::V1 => 1,
            Self::V3 => 3,
            Self::V4 => 4,
            Self::V5 => 5,
            Self::V6 => 6,
        }
    }

    /// The version with wire number `n`, if this implementation speaks it.
    pub fn from_number(n: u32) -> Option<Self> {
        match n {
            1 => Some(Self::V1),
            3 => Some(Self::V3),
            4 => Some(Self::V4),
            5 => Some(Self::V5),
            6 => Some(Self::V6),
            _ => None,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.number())
    }
}

/// Most entries accepted in a peer's version list.
pub const MAX_VERSIONS: usize = 16;
/// Most codec names accepted in a peer's capabilities.
pub const MAX_CODECS: usize = 16;
/// Longest codec name accepted.
pub const MAX_CODEC_NAME: usize = 32;
/// Most streams a node may advertise.
pub const MAX_STREAMS: u32 = 512;

/// What this node brings to a handshake.
#[derive(Debug, Clone)]
pub struct LocalParams {
    /// This node's id (the one in its certificate).
    pub node_id: NodeId,
    /// The cluster this node belongs to.
    pub cluster_id: ClusterId,
    /// Versions this node offers or accepts; must not be empty.
    pub versions: Vec<Version>,
    /// What this node can do; must pass [`validate_capabilities`].
    pub capabilities: Capabilities,
    /// How long the peer has, from the start of the handshake, to complete it.
    pub timeout: Duration,
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// Version in use on this connection.
    pub version: Version,
    /// The peer's node id, checked against its certificate.
    pub peer_node_id: NodeId,
    /// What the peer advertised.
    pub peer_capabilities: Capabilities,
    /// What this connection uses: see [`negotiate`].
    pub negotiated: Capabilities,
}

/// Why a handshake failed. Each variant maps to a wire [`ErrorCode`] (see [`Self::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The byte stream was not valid frames.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// A frame's payload was not the message its type announces.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// A frame not allowed at this point.
    #[error("unexpected {name} frame (type {ty:#06x}) during the handshake")]
    UnexpectedFrame {
        /// Frame type.
        ty: u16,
        /// Its name.
        name: &'static str,
    },
    /// No version in common.
    #[error("no protocol version in common: we speak {ours:?}, the peer {theirs:?}")]
    UnsupportedVersion {
        /// Our versions.
        ours: Vec<u32>,
        /// The peer's.
        theirs: Vec<u32>,
    },
    /// The peer belongs to another cluster.
    #[error("peer is in cluster {theirs:?}, we are in cluster {ours:?}")]
    ClusterMismatch {
        /// Our cluster.
        ours: String,
        /// The peer's.
        theirs: String,
    },
    /// The peer's node id breaks the identifier rules.
    #[error("peer sent an invalid node id: {0}")]
    InvalidNodeId(IdError),
    /// The peer claims a node id other than the one its certificate was issued for.
    #[error("peer claims node id {claimed:?} but its certificate is for {certificate:?}")]
    IdentityMismatch {
        /// What the peer claimed.
        claimed: String,
        /// What its certificate says.
        certificate: String,
    },
    /// The peer's capabilities are missing or out of range.
    #[error("peer sent invalid capabilities: {0}")]
    InvalidCapabilities(String),
    /// The server's answer is inconsistent with what we offered.
    #[error("peer's handshake answer is inconsistent: {0}")]
    BadAnswer(String),
    /// The peer refused the handshake.
    #[error("peer refused the handshake: {code}: {reason}")]
    Rejected {
        /// Code the peer sent.
        code: ErrorCode,
        /// Reason the peer gave.
        reason: String,
    },
    /// The peer did not complete the handshake in time.
    #[error("peer did not complete the handshake within {0:?}")]
    Timeout(Duration),
}

/// Who is at fault, for logs, metrics and (later) the reputation scorer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The peer sent bytes that do not parse.
    Malformed,
    /// The peer sent well-formed messages that break the protocol.
    Misbehaved,
    /// Both sides are well-behaved but cannot work together (version, cluster).
    Incompatible,
    /// The peer was too slow.
    Timeout,
    /// The peer refused us.
    Refused,
}

impl HandshakeError {
    /// The code sent to the peer when we fail for this reason.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Frame(e) => e.code(),
            Self::Message(_) | Self::BadAnswer(_) => ErrorCode::PROTOCOL_ERROR,
            Self::UnexpectedFrame { ty, .. } => {
                if FrameType(*ty).is_known() {
                    ErrorCode::UNEXPECTED_FRAME
                } else {
                    ErrorCode::UNKNOWN_FRAME_TYPE
                }
            }
            Self::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            Self::ClusterMismatch { .. } => ErrorCode::CLUSTER_MISMATCH,
            Self::InvalidNodeId(_) => ErrorCode::INVALID_NODE_ID,
            Self::IdentityMismatch { .. } => ErrorCode::IDENTITY_MISMATCH,
            Self::InvalidCapabilities(_) => ErrorCode::INVALID_CAPABILITIES,
            Self::Rejected { code, .. } => *code,
            Self::Timeout(_) => ErrorCode::TIMEOUT,
        }
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Self::Frame(_) | Self::Message(_) => Fault::Malformed,
            Self::UnexpectedFrame { .. }
            | Self::InvalidNodeId(_)
            | Self::IdentityMismatch { .. }
            | Self::InvalidCapabilities(_)
            | Self::BadAnswer(_) => Fault::Misbehaved,
            Self::UnsupportedVersion { .. } | Self::ClusterMismatch { .. } => Fault::Incompatible,
            Self::Timeout(_) => Fault::Timeout,
            Self::Rejected { .. } => Fault::Refused,
        }
    }

    /// A short, stable label for metrics (`reason` label of `dwcp_handshakes_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Frame(e) => e.reason(),
            Self::Message(_) => "malformed_message",
            Self::UnexpectedFrame { .. } => "unexpected_frame",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::ClusterMismatch { .. } => "cluster_mismatch",
            Self::InvalidNodeId(_) => "invalid_node_id",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::InvalidCapabilities(_) => "invalid_capabilities",
            Self::BadAnswer(_) => "bad_answer",
            Self::Rejected { .. } => "refused_by_peer",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// Checks that advertised capabilities are within the documented ranges.
pub fn validate_capabilities(c: &Capabilities) -> Result<(), String> {
    if !(1..=MAX_STREAMS).contains(&c.max_streams) {
        return Err(format!(
            "max_streams is {}, allowed 1..={MAX_STREAMS}",
            c.max_streams
        ));
    }
    if !(MIN_MAX_PAYLOAD..=HARD_MAX_PAYLOAD).contains(&c.max_frame_size) {
        return Err(format!(
            "max_frame_size is {}, allowed {MIN_MAX_PAYLOAD}..={HARD_MAX_PAYLOAD}",
            c.max_frame_size
        ));
    }
    if c.codecs.len() > MAX_CODECS {
        return Err(format!(
            "{} codecs listed, at most {MAX_CODECS} allowed",
            c.codecs.len()
        ));
    }
    if let Some(bad) = c
        .codecs
        .iter()
        .find(|n| n.is_empty() || n.len() > MAX_CODEC_NAME)
    {
        return Err(format!(
            "codec name {bad:?} must be 1..={MAX_CODEC_NAME} bytes"
        ));
    }
    Ok(())
}

/// Picks the highest version both lists contain. Numbers this implementation does not know are
/// ignored, so a newer peer offering `[1, 3, 4, 5, 6, 7]` still meets us at 6.
pub fn negotiate_version(ours: &[Version], theirs: &[u32]) -> Option<Version> {
    ours.iter()
        .copied()
        .filter(|v| theirs.contains(&v.number()))
        .max()
}

/// What a connection at `version` uses, given both sides' capabilities. Symmetric except for
/// codec order, which follows the client. In v1 everything beyond one stream is off.
pub fn negotiate(version: Version, client: &Capabilities, server: &Capabilities) -> Capabilities {
    let max_frame_size = client.max_frame_size.min(server.max_frame_size);
    match version {
        Version::V1 => Capabilities {
            max_streams: 1,
            codecs: Vec::new(),
            quic: false,
            delta: false,
            max_frame_size,
        },
        Version::V3 | Version::V4 | Version::V5 | Version::V6 => Capabilities {
            max_streams: client.max_streams.min(server.max_streams),
            codecs: client
                .codecs
                .iter()
                .filter(|c| server.codecs.contains(c))
                .cloned()
                .collect(),
            quic: client.quic && server.quic,
            delta: client.delta && server.delta,
            max_frame_size,
        },
    }
}

/// How far a handshake has got.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Still waiting for the peer.
    InProgress,
    /// Done; the connection may carry traffic.
    Established(&'a Established),
    /// Failed; send what `poll_transmit` returns, then close.
    Failed(&'a HandshakeError),
}

#[derive(Debug)]
enum Role {
    Client,
    Server,
}

/// One side of a handshake. See the module docs for the call order.
#[derive(Debug)]
pub struct Handshake {
    role: Role,
    local: LocalParams,
    /// Node id from the peer's verified certificate.
    peer_cert_id: NodeId,
    deadline: Instant,
    state: Result<Option<Established>, HandshakeError>,
    transmit: VecDeque<Frame>,
}

impl Handshake {
    /// The client side: queues `HELLO` at once.
    pub fn client(local: LocalParams, peer_cert_id: NodeId, now: Instant) -> Self {
        let hello = Hello {
            versions: local.versions.iter().map(|v| v.number()).collect(),
            node_id: local.node_id.to_string(),
            cluster_id: local.cluster_id.to_string(),
            capabilities: Some(local.capabilities.clone()),
        };
        let mut transmit = VecDeque::new();
        transmit.push_back(msg::encode(FrameType::HELLO, &hello));
        Self {
            role: Role::Client,
            deadline: now + local.timeout,
            local,
            peer_cert_id,
            state: Ok(None),
            transmit,
        }
    }

    /// The server side: waits for `HELLO`.
    pub fn server(local: LocalParams, peer_cert_id: NodeId, now: Instant) -> Self {
        Self {
            role: Role::Server,
            deadline: now + local.timeout,
            local,
            peer_cert_id,
            state: Ok(None),
            transmit: VecDeque::new(),
        }
    }

    /// The next frame to send, if any.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called, while the handshake is in progress.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        matches!(self.state, Ok(None)).then_some(self.deadline)
    }

    /// How far the handshake has got.
    pub fn outcome(&self) -> Outcome<'_> {
        match &self.state {
            Ok(None) => Outcome::InProgress,
            Ok(Some(e)) => Outcome::Established(e),
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Consumes the machine, returning the final result; `None` while still in progress.
    pub fn into_result(self) -> Option<Result<Established, HandshakeError>> {
        self.state.transpose()
    }

    /// Feeds the deadline check.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.state, Ok(None)) && now >= self.deadline {
            self.fail(HandshakeError::Timeout(self.local.timeout));
        }
    }

    /// Reports that the byte stream could not be split into frames.
    pub fn handle_frame_error(&mut self, err: FrameError) {
        if matches!(self.state, Ok(None)) {
            self.fail(err.into());
        }
    }

    /// Feeds one received frame.
    pub fn handle_frame(&mut self, frame: Frame) {
        if !matches!(self.state, Ok(None)) {
            return;
        }
        let result = match (&self.role, frame.ty) {
            (Role::Server, FrameType::HELLO) => self.on_hello(&frame),
            (Role::Client, FrameType::HELLO_ACK) => self.on_hello_ack(&frame),
            (_, FrameType::REJECT | FrameType::GOAWAY) => match msg::decode::<Close>(&frame) {
                Ok(close) => {
                    // The peer has already given up: record why, and send nothing back.
                    self.state = Err(HandshakeError::Rejected {
                        code: close.error_code(),
                        reason: close.printable_reason(),
                    });
                    return;
                }
                Err(e) => Err(e.into()),
            },
            (_, ty) if ty.is_extension() => return,
            (_, ty) => Err(HandshakeError::UnexpectedFrame {
                ty: ty.0,
                name: ty.name(),
            }),
        };
        match result {
            Ok(established) => self.state = Ok(Some(established)),
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, err: HandshakeError) {
        let reject = Close::new(err.code(), err.to_string());
        self.transmit
            .push_back(msg::encode(FrameType::REJECT, &reject));
        self.state = Err(err);
    }

    /// Checks identity fields common to `HELLO` and `HELLO_ACK`.
    fn check_peer(
        &self,
        node_id: &str,
        cluster_id: &str,
        caps: Option<&Capabilities>,
    ) -> Result<(NodeId, Capabilities), HandshakeError> {
        let node = NodeId::new(node_id).map_err(HandshakeError::InvalidNodeId)?;
        if node != self.peer_cert_id {
            return Err(HandshakeError::IdentityMismatch {
                claimed: node.to_string(),
                certificate: self.peer_cert_id.to_string(),
            });
        }
        if cluster_id != self.local.cluster_id.as_str() {
            return Err(HandshakeError::ClusterMismatch {
                ours: self.local.cluster_id.to_string(),
                theirs: msg::printable(cluster_id, 300),
            });
        }
        let caps =
            caps.ok_or_else(|| HandshakeError::InvalidCapabilities("capabilities missing".into()))?;
        validate_capabilities(caps).map_err(HandshakeError::InvalidCapabilities)?;
        Ok((node, caps.clone()))
    }

    fn our_versions(&self) -> Vec<u32> {
        self.local.versions.iter().map(|v| v.number()).collect()
    }

    fn on_hello(&mut self, frame: &Frame) -> Result<Established, HandshakeError> {
        let hello: Hello = msg::decode(frame)?;
        if hello.versions.is_empty() || hello.versions.len() > MAX_VERSIONS {
            return Err(MessageError {
                frame: "hello",
                detail: format!(
                    "{} versions listed, 1..={MAX_VERSIONS} allowed",
                    hello.versions.len()
                ),
            }
            .into());
        }
        let version =
            negotiate_version(&self.local.versions, &hello.versions).ok_or_else(|| {
                HandshakeError::UnsupportedVersion {
                    ours: self.our_versions(),
                    theirs: hello.versions.clone(),
                }
            })?;
        let (peer_node_id, peer_caps) = self.check_peer(
            &hello.node_id,
            &hello.cluster_id,
            hello.capabilities.as_ref(),
        )?;
        let negotiated = negotiate(version, &peer_caps, &self.local.capabilities);
        let ack = HelloAck {
            version: version.number(),
            node_id: self.local.node_id.to_string(),
            cluster_id: self.local.cluster_id.to_string(),
            capabilities: Some(self.local.capabilities.clone()),
            negotiated: Some(negotiated.clone()),
            versions: self.our_versions(),
        };
        self.transmit
            .push_back(msg::encode(FrameType::HELLO_ACK, &ack));
        Ok(Established {
            version,
            peer_node_id,
            peer_capabilities: peer_caps,
            negotiated,
        })
    }

    fn on_hello_ack(&mut self, frame: &Frame) -> Result<Established, HandshakeError> {
        let ack: HelloAck = msg::decode(frame)?;
        let version = Version::from_number(ack.version)
            .filter(|v| self.local.versions.contains(v))
            .ok_or_else(|| {
                HandshakeError::BadAnswer(format!(
                    "server chose version {}, we offered {:?}",
                    ack.version,
                    self.our_versions()
                ))
            })?;
        if ack.versions.len() > MAX_VERSIONS
            || negotiate_version(&self.local.versions, &ack.versions) != Some(version)
        {
            return Err(HandshakeError::BadAnswer(format!(
                "server chose version {} but lists {:?}; the highest common version with ours \
                 ({:?}) is another",
                ack.version,
                ack.versions,
                self.our_versions()
            )));
        }
        let (peer_node_id, peer_caps) =
            self.check_peer(&ack.node_id, &ack.cluster_id, ack.capabilities.as_ref())?;
        let expected = negotiate(version, &self.local.capabilities, &peer_caps);
        if ack.negotiated.as_ref() != Some(&expected) {
            return Err(HandshakeError::BadAnswer(format!(
                "negotiated capabilities {:?} differ from what both sides advertised ({expected:?})",
                ack.negotiated
            )));
        }
        Ok(Established {
            version,
            peer_node_id,
            peer_capabilities: peer_caps,
            negotiated: expected,
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests are drivers: they own the clock"
)]
mod tests {
    use super::*;

    fn caps(max_streams: u32, codecs: &[&str], quic: bool, delta: bool) -> Capabilities {
        Capabilities {
            max_streams,
            codecs: codecs.iter().map(|s| s.to_string()).collect(),
            quic,
            delta,
            max_frame_size: 1 << 20,
        }
    }

    fn params(node: &str, versions: &[Version], c: Capabilities) -> LocalParams {
        LocalParams {
            node_id: NodeId::new(node).unwrap(),
            cluster_id: ClusterId::new("c1").unwrap(),
            versions: versions.to_vec(),
            capabilities: c,
            timeout: Duration::from_secs(5),
        }
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// Runs both machines against each other until neither has anything to send.
    fn drive(client: &mut Handshake, server: &mut Handshake) {
        for _ in 0..10 {
            let mut moved = false;
            while let Some(f) = client.poll_transmit() {
                server.handle_frame(f);
                moved = true;
            }
            while let Some(f) = server.poll_transmit() {
                client.handle_frame(f);
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("handshake did not settle in 10 rounds");
    }

    type Settled = Option<Result<Established, HandshakeError>>;

    fn run(cv: &[Version], sv: &[Version]) -> (Settled, Settled) {
        let now = Instant::now();
        let mut c = Handshake::client(
            params("a", cv, caps(64, &["zstd", "lz4"], true, true)),
            id("b"),
            now,
        );
        let mut s = Handshake::server(
            params("b", sv, caps(16, &["lz4"], false, true)),
            id("a"),
            now,
        );
        drive(&mut c, &mut s);
        (c.into_result(), s.into_result())
    }

    #[test]
    fn version_matrix() {
        use Version::*;
        for (cv, sv, want) in [
            (&[V1, V3, V4][..], &[V1, V3, V4][..], V4),
            (&[V1, V3, V4][..], &[V1, V3][..], V3),
            (&[V1, V3][..], &[V1, V3, V4][..], V3),
            (&[V1, V3][..], &[V1, V3][..], V3),
            (&[V1][..], &[V1, V3, V4][..], V1),
            (&[V1, V3, V4][..], &[V1][..], V1),
            (&[V1][..], &[V1][..], V1),
            (&[V3][..], &[V3][..], V3),
            (&[V4][..], &[V3, V4][..], V4),
            (&[V1, V3, V4, V5][..], &[V1, V3, V4, V5][..], V5),
            (&[V1, V3, V4, V5][..], &[V1, V3, V4][..], V4),
            (&[V1, V3, V4][..], &[V1, V3, V4, V5][..], V4),
            (&[V1, V3, V4, V5, V6][..], &[V1, V3, V4, V5, V6][..], V6),
            (&[V1, V3, V4, V5, V6][..], &[V1, V3, V4, V5][..], V5),
            (&[V1, V3, V4, V5][..], &[V1, V3, V4, V5, V6][..], V5),
        ] {
            let (c, s) = run(cv, sv);
            let (c, s) = (c.unwrap().unwrap(), s.unwrap().unwrap());
            assert_eq!(c.version, want, "{cv:?} x {sv:?}");
            assert_eq!(s.version, want);
            assert_eq!(c.negotiated, s.negotiated);
            assert_eq!(c.peer_node_id, id("b"));
            assert_eq!(s.peer_node_id, id("a"));
        }
    }

    #[test]
    fn v3_and_v4_negotiate_capabilities() {
        let (c, _) = run(&Version::ALL, &Version::ALL);
        let n = c.unwrap().unwrap().negotiated;
        assert_eq!(n, caps(16, &["lz4"], false, true));
        let (c, _) = run(&[Version::V3], &Version::ALL);
        assert_eq!(c.unwrap().unwrap().negotiated, n);
    }

    #[test]
    fn v1_turns_everything_off() {
        let (c, _) = run(&[Version::V1], &Version::ALL);
        let n = c.unwrap().unwrap().negotiated;
        assert_eq!(n.max_streams, 1);
        assert!(!n.delta && !n.quic && n.codecs.is_empty());
    }

    #[test]
    fn no_common_version_fails_on_both_sides() {
        let (c, s) = run(&[Version::V3], &[Version::V1]);
        assert!(matches!(
            s.unwrap(),
            Err(HandshakeError::UnsupportedVersion { .. })
        ));
        match c.unwrap() {
            Err(HandshakeError::Rejected { code, reason }) => {
                assert_eq!(code, ErrorCode::UNSUPPORTED_VERSION);
                assert!(reason.contains("no protocol version in common"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn newer_peer_versions_are_ignored() {
        assert_eq!(
            negotiate_version(&Version::ALL, &[1, 3, 4, 5, 6, 7, 99]),
            Some(Version::V6)
        );
        assert_eq!(
            negotiate_version(&Version::ALL, &[1, 3, 7]),
            Some(Version::V3)
        );
        assert_eq!(negotiate_version(&Version::ALL, &[2, 7]), None);
    }

    #[test]
    fn identity_must_match_certificate() {
        let now = Instant::now();
        let mut c = Handshake::client(
            params("mallory", &Version::ALL, caps(8, &[], false, false)),
            id("b"),
            now,
        );
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &[], false, false)),
            id("alice"),
            now,
        );
        drive(&mut c, &mut s);
        assert!(matches!(
            s.outcome(),
            Outcome::Failed(HandshakeError::IdentityMismatch { .. })
        ));
        assert!(matches!(
            c.outcome(),
            Outcome::Failed(HandshakeError::Rejected {
                code: ErrorCode::IDENTITY_MISMATCH,
                ..
            })
        ));
    }

    #[test]
    fn cluster_must_match() {
        let now = Instant::now();
        let mut other = params("a", &Version::ALL, caps(8, &[], false, false));
        other.cluster_id = ClusterId::new("c2").unwrap();
        let mut c = Handshake::client(other, id("b"), now);
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &[], false, false)),
            id("a"),
            now,
        );
        drive(&mut c, &mut s);
        assert!(matches!(
            s.outcome(),
            Outcome::Failed(HandshakeError::ClusterMismatch { .. })
        ));
    }

    #[test]
    fn invalid_capabilities_are_refused() {
        let now = Instant::now();
        let mut c = Handshake::client(
            params("a", &Version::ALL, caps(0, &[], false, false)),
            id("b"),
            now,
        );
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &[], false, false)),
            id("a"),
            now,
        );
        drive(&mut c, &mut s);
        match s.outcome() {
            Outcome::Failed(e @ HandshakeError::InvalidCapabilities(_)) => {
                assert_eq!(e.code(), ErrorCode::INVALID_CAPABILITIES)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timeout_fires_only_after_the_deadline() {
        let now = Instant::now();
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &[], false, false)),
            id("a"),
            now,
        );
        let deadline = s.poll_timeout().unwrap();
        assert_eq!(deadline, now + Duration::from_secs(5));
        s.handle_timeout(deadline - Duration::from_millis(1));
        assert!(matches!(s.outcome(), Outcome::InProgress));
        s.handle_timeout(deadline);
        assert!(matches!(
            s.outcome(),
            Outcome::Failed(HandshakeError::Timeout(_))
        ));
        assert_eq!(s.poll_timeout(), None);
        let reject: Close = msg::decode(&s.poll_transmit().unwrap()).unwrap();
        assert_eq!(reject.error_code(), ErrorCode::TIMEOUT);
    }

    #[test]
    fn unexpected_and_unknown_frames() {
        let now = Instant::now();
        let p = || params("b", &Version::ALL, caps(8, &[], false, false));
        let mut s = Handshake::server(p(), id("a"), now);
        s.handle_frame(Frame::new(FrameType(0x9999), &b"skip me"[..]));
        assert!(matches!(s.outcome(), Outcome::InProgress));
        s.handle_frame(Frame::new(FrameType::PING, Vec::new()));
        match s.outcome() {
            Outcome::Failed(e) => assert_eq!(e.code(), ErrorCode::UNEXPECTED_FRAME),
            other => panic!("{other:?}"),
        }
        let mut s = Handshake::server(p(), id("a"), now);
        s.handle_frame(Frame::new(FrameType(0x0777), Vec::new()));
        match s.outcome() {
            Outcome::Failed(e) => assert_eq!(e.code(), ErrorCode::UNKNOWN_FRAME_TYPE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_is_sticky() {
        let now = Instant::now();
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &[], false, false)),
            id("a"),
            now,
        );
        s.handle_frame(Frame::new(FrameType::HELLO, vec![0xff; 3]));
        assert!(matches!(
            s.outcome(),
            Outcome::Failed(HandshakeError::Message(_))
        ));
        let mut c = Handshake::client(
            params("a", &Version::ALL, caps(8, &[], false, false)),
            id("b"),
            now,
        );
        // A valid HELLO afterwards changes nothing.
        s.handle_frame(c.poll_transmit().unwrap());
        assert!(matches!(
            s.outcome(),
            Outcome::Failed(HandshakeError::Message(_))
        ));
        assert_eq!(s.poll_transmit().map(|f| f.ty), Some(FrameType::REJECT));
        assert_eq!(s.poll_transmit(), None);
    }

    #[test]
    fn silent_downgrade_is_detected_by_the_client() {
        let now = Instant::now();
        let mut c = Handshake::client(
            params("a", &Version::ALL, caps(8, &["zstd"], false, true)),
            id("b"),
            now,
        );
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &["zstd"], false, true)),
            id("a"),
            now,
        );
        s.handle_frame(c.poll_transmit().unwrap());
        let mut ack: HelloAck = msg::decode(&s.poll_transmit().unwrap()).unwrap();
        // A tampering or buggy server picks v1 although both speak v3.
        ack.version = 1;
        ack.negotiated = Some(negotiate(
            Version::V1,
            &caps(8, &["zstd"], false, true),
            &caps(8, &["zstd"], false, true),
        ));
        c.handle_frame(msg::encode(FrameType::HELLO_ACK, &ack));
        assert!(matches!(
            c.outcome(),
            Outcome::Failed(HandshakeError::BadAnswer(_))
        ));
    }

    #[test]
    fn empty_version_list_is_a_protocol_error() {
        let now = Instant::now();
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &[], false, false)),
            id("a"),
            now,
        );
        let hello = Hello {
            versions: vec![],
            node_id: "a".into(),
            cluster_id: "c1".into(),
            capabilities: Some(caps(8, &[], false, false)),
        };
        s.handle_frame(msg::encode(FrameType::HELLO, &hello));
        match s.outcome() {
            Outcome::Failed(e) => assert_eq!(e.code(), ErrorCode::PROTOCOL_ERROR),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tampered_answer_is_detected_by_the_client() {
        let now = Instant::now();
        let mut c = Handshake::client(
            params("a", &Version::ALL, caps(8, &["zstd"], false, true)),
            id("b"),
            now,
        );
        let mut s = Handshake::server(
            params("b", &Version::ALL, caps(8, &["zstd"], false, true)),
            id("a"),
            now,
        );
        s.handle_frame(c.poll_transmit().unwrap());
        let ack_frame = s.poll_transmit().unwrap();
        let mut ack: HelloAck = msg::decode(&ack_frame).unwrap();
        ack.negotiated.as_mut().unwrap().max_streams = 512;
        c.handle_frame(msg::encode(FrameType::HELLO_ACK, &ack));
        assert!(matches!(
            c.outcome(),
            Outcome::Failed(HandshakeError::BadAnswer(_))
        ));
    }
}
