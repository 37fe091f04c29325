//! Live migration.
//!
//! - [`orchestrator`]: the migration state machine, sans I/O: phases, stop-and-copy decision,
//!   escalation when rounds stop shrinking, rollback from any phase.

pub mod orchestrator;

pub use orchestrator::{
    Action, Config, Convergence, Event, Orchestrator, Outcome, Phase, RoundStats, SourceCaps,
};
