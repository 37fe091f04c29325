//! The DWCP control plane: configuration and its validation, the version policy.
//!
//! Pure: this crate reads no files and no environment itself; callers pass file text and
//! environment variables in, which keeps every rule testable.

mod config;

pub use config::{
    AgentConfig, CacheSettings, Config, ConfigError, DEFAULT_TOML, ENV_PREFIX, EncodingConfig,
    FieldError, KNOWN_CODECS, LogConfig, MIN_RATE_LIMIT, NodeConfig, ProtocolConfig, Settings,
    TransportConfig, check_log_level, normalize_log_level, overlap,
};
