//! DWCP transport: certificates, mutual TLS and connections between nodes.
//!
//! ```text
//!   connect(addr) ─ TCP ─ TLS 1.3 (mutual, cluster CA) ─ DWCP handshake ─> Connection
//!   accept(io)    ─       TLS 1.3 (mutual, cluster CA) ─ DWCP handshake ─> Connection
//! ```
//!
//! Each step has its own timeout. Protocol logic lives in `dwcp-wire`; this crate drives it
//! over tokio. The multi-stream session layer (AMST) will build on [`Connection`].

mod conn;
pub mod net;
pub mod pki;
pub mod qmp;
pub mod quic;
pub mod session;
mod tls;

pub use conn::{
    AnyConnection, AnyReader, AnyWriter, Carrier, ConnError, Connection, Duplex, Endpoint,
    FrameReader, FrameWriter, Framed, Reader, Stage, Writer, accept, connect, connect_to,
};
pub use pki::{NodeCredentials, PkiError};
pub use tls::{ALPN, TlsConfigs, TlsFailure, TlsSetupError, classify};
