//! Live migration.
//!
//! - [`orchestrator`]: the migration state machine, sans I/O: phases, stop-and-copy decision,
//!   escalation when rounds stop shrinking, rollback from any phase.
//! - [`memvm`]: a memory-image VM under a live dirtying workload with dirty tracking.
//! - [`engine`]: the source side of a migration to a destination agent over transfer
//!   sessions, rounds encoded with HDE.
//! - [`qemu`]: the QEMU backend: QEMU's own migration stream carried through DWCP.
//! - [`qemu_throttle`]: QEMU's auto-converge steps chosen from the need.
//! - [`qemu_converge`]: when a QEMU migration cannot converge, and is given up.

pub mod engine;
pub mod memvm;
pub mod orchestrator;
pub mod qemu;
pub mod qemu_converge;
pub mod qemu_stream;
pub mod qemu_throttle;
pub mod qemu_vm;
mod shadow;

pub use engine::{Destination, MigrationReport, MigrationSpec, Progress, RoundReport, migrate};
pub use memvm::{Backing, MemoryVm};
pub use qemu::{QemuError, QemuProgress, QemuReport, QemuSpec, migrate_qemu};

pub use orchestrator::{
    Action, Config, Convergence, Event, Orchestrator, Outcome, Phase, RoundStats, SourceCaps,
};
