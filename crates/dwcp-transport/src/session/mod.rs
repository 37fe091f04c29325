//! Transfer sessions (AMST): objects cut into chunks, striped over several connections,
//! reassembled and verified at the receiver.
//!
//! The pure parts, [`sched`] (sender) and [`reasm`] (receiver), import neither tokio nor
//! sockets; the drivers beside them move the bytes.

pub mod adapt;
pub mod delta;
mod digest;
mod end_hold;
pub mod qemu_feed;
pub mod reasm;
pub mod recv;
pub mod sched;
pub mod send;
mod source;
mod tcp;
pub mod tunnel;
mod turns;

pub use adapt::Mode;
pub use delta::{DEFAULT_LINK_BPS, DeltaOptions, DeltaReport, Layout, open_cache};
pub use recv::{PeerStats, Receiver, RecvEvent, Served};
pub use send::{
    BaseRequest, CopyState, KeptSession, LinkStats, MigrationRequest, ObjectReport, Progress,
    RateLimit, SendError, SendOptions, SendReport, Source, migration_op, migration_op_kept,
    migration_request_data, migration_request_kept, query_base, query_base_kept, query_copy_kept,
    send_files, send_files_kept,
};
pub use tcp::TcpCounts;
pub use tunnel::{Block, Tunnel};
