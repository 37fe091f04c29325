//! HDE, hierarchical delta encoding: what crosses the WAN is only what the receiver cannot
//! already reconstruct.
//!
//! ```text
//!  page-addressed object (memory, disk image)      byte stream (QEMU migration, files)
//!          │ PageEncoder                                   │ StreamEncoder (FastCDC)
//!          ▼                                               ▼
//!  zero run │ same-as-base run │ dup in transfer │ cache ref (BLAKE3) │ XOR delta │ literal
//!                       literals and deltas compressed per block (lz4 / zstd)
//!          ▼                                               ▼
//!      PageDecoder ──> PageStore                  StreamDecoder ──> io::Write
//!                 ╰── ContentSource (BaselineCache, persisted, seeded from local files)
//! ```
//!
//! The codecs are pure: no sockets, no clocks. The [`BaselineCache`] does file I/O and the
//! [`chooser`] takes its measurements from the caller. The generator in [`image`] makes
//! realistic VM memory images for tests, demos and benchmarks.

mod buf;
pub mod cache;
pub mod chooser;
mod codec;
mod hash;
pub mod image;
pub mod page;
mod remote;
mod store;
pub mod stream;

#[doc(hidden)]
pub mod fuzzing;

pub use cache::{BaselineCache, CacheConfig, CacheStats};
pub use codec::{Codec, ParseCodecError, ZSTD_LEVELS};
pub use hash::{Key, fast64, fast128, is_zero};
pub use page::{EncodeStats, EncoderConfig, PageDecoder, PageEncoder};
pub use remote::{MAX_SUMMARY_ENTRIES, RemoteIndex, SUMMARY_MAGIC};
pub use store::{ContentSource, FileStore, MemStore, NoCache, PageStore};

/// Version of every HDE format in this crate (page objects, stream objects, summaries,
/// cache packs).
pub const FORMAT_VERSION: u8 = 1;

/// Why untrusted HDE input was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input ends inside a field.
    #[error("HDE input truncated in {what}")]
    Truncated {
        /// The field.
        what: &'static str,
    },
    /// A field holds an impossible value.
    #[error("malformed HDE {what}: {why}")]
    Malformed {
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A length or count above its limit.
    #[error("HDE {what} is {value}, above the limit of {max}")]
    Limit {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// Not an HDE object of the expected kind.
    #[error("not an HDE object (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("HDE format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u8),
    /// The object's size differs from the receiving store's.
    #[error("HDE object has {object} pages but the destination holds {store}")]
    StoreSize {
        /// Pages in the object.
        object: u64,
        /// Pages in the store.
        store: u64,
    },
    /// An address beyond the object.
    #[error("HDE page {addr} is outside the object of {pages} pages")]
    AddressOutOfRange {
        /// The address.
        addr: u64,
        /// Object size.
        pages: u64,
    },
    /// Writing to or reading from the destination failed.
    #[error("HDE destination: {0}")]
    Store(#[from] std::io::Error),
}
