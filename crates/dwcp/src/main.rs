//! `dwcp`: parse arguments, run the command, map the error to an exit code, print the cause
//! chain.

/// `println!` for what a command prints on standard output: a reader gone (`dwcp ping ... |
/// head -1`) or a full disk does not panic the command. Output stops there; the command
/// goes on to its end (removing what it made), and then exits 141 for a closed pipe (as a
/// closed pipe ends other tools), 4 for another error, unless it failed by itself.
macro_rules! outln {
    () => {
        $crate::write_out(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::write_out(format_args!($($t)*))
    };
}

/// Why standard output could not be written, once it could not.
static STDOUT_LOST: std::sync::OnceLock<std::io::ErrorKind> = std::sync::OnceLock::new();

/// See [`outln`].
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if stdout_lost() {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{args}").and_then(|()| o.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            // Standard error may be gone too (a terminal hung up): no panic for that.
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot write to standard output: {e}"
            );
        }
        let _ = STDOUT_LOST.set(e.kind());
    } else {
        STDOUT_USED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a command printed anything on standard output: a `--json` command that failed
/// before its own object says why in one of ours (see [`json_failure`]).
static STDOUT_USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether standard output could not be written (a command printing many lines may stop).
pub(crate) fn stdout_lost() -> bool {
    STDOUT_LOST.get().is_some()
}

mod bench;
mod bench_encoding;
mod bench_guest;
mod bench_qemu;
mod cli;
mod commands;
mod migrate;
mod testbed_cmd;

use std::process::ExitCode;

use clap::Parser;
use dwcp_agent::AgentError;
use dwcp_control::ConfigError;
use dwcp_transport::{ConnError, PkiError, TlsSetupError};
use dwcp_wire::{ErrorCode, Fault, HandshakeError};

use crate::cli::Cli;

/// Exit codes scripts can rely on (also listed in `dwcp --help` and docs/OPERATIONS.md).
pub(crate) mod exit {
    pub(crate) const INTERNAL: u8 = 1;
    // 2 is clap's code for a bad command line.
    pub(crate) const CONFIG: u8 = 3;
    pub(crate) const FILES: u8 = 4;
    pub(crate) const NETWORK: u8 = 5;
    pub(crate) const AUTH: u8 = 6;
    pub(crate) const PROTOCOL: u8 = 7;
    pub(crate) const ROLLED_BACK: u8 = 8;
    pub(crate) const OUTCOME_UNKNOWN: u8 = 9;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A migration that worked says so whatever became of its report: a wrapper taking
    // "not 0" for "not moved" could start the VM at the source again.
    let migrates = matches!(
        cli.command,
        cli::Command::Migrate(_) | cli::Command::Demo(_)
    );
    let json = match &cli.command {
        cli::Command::Ping(a) => a.json,
        cli::Command::Send(a) => a.json,
        cli::Command::Recv(a) => a.json,
        cli::Command::Migrate(a) => a.json,
        cli::Command::Demo(a) => a.json,
        _ => false,
    };
    match commands::run(cli) {
        Ok(()) => match STDOUT_LOST.get() {
            None => ExitCode::SUCCESS,
            Some(_) if migrates => ExitCode::SUCCESS,
            Some(std::io::ErrorKind::BrokenPipe) => ExitCode::from(141),
            Some(_) => ExitCode::from(exit::FILES),
        },
        Err(err) => {
            // Not `eprintln!`, which panics when standard error is gone (a terminal hung
            // up): the exit code must still say why.
            use std::io::Write as _;
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {err}");
            let mut last = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                // Many errors quote their source in their own message; print it once.
                if !last.contains(&text) {
                    let _ = writeln!(stderr, "  caused by: {text}");
                }
                last = text;
            }
            drop(stderr);
            let code = exit_code(&err);
            // A script reading `--json` gets an object either way: a migration's report
            // (printed by the command, rolled back or not), or this.
            if json && !STDOUT_USED.load(std::sync::atomic::Ordering::Relaxed) {
                write_out(format_args!("{}", json_failure(&err, code)));
            }
            ExitCode::from(code)
        }
    }
}

/// What a `--json` command prints when it failed before printing its own object.
fn json_failure(err: &anyhow::Error, code: u8) -> serde_json::Value {
    serde_json::json!({
        "result": "failed",
        "error": err.to_string(),
        "causes": err.chain().skip(1).map(|c| c.to_string()).collect::<Vec<_>>(),
        "exit_code": code,
    })
}

/// The exit code for an error: the first error in the chain of a known kind decides.
fn exit_code(err: &anyhow::Error) -> u8 {
    // A migration that began: however it failed, what matters is where the VM now runs.
    if let Some(e) = err.downcast_ref::<testbed_cmd::TestbedCommandEnded>() {
        return e.code;
    }
    match err.downcast_ref::<migrate::MigrationFailed>() {
        Some(migrate::MigrationFailed::RolledBack) => return exit::ROLLED_BACK,
        Some(
            migrate::MigrationFailed::OutcomeUnknown | migrate::MigrationFailed::PostcopyPaused,
        ) => return exit::OUTCOME_UNKNOWN,
        None => {}
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ConnError>() {
            return conn_code(e);
        }
        if let Some(e) = cause.downcast_ref::<dwcp_transport::session::SendError>() {
            use dwcp_transport::session::SendError;
            return match e {
                SendError::Connect(c) => conn_code(c),
                SendError::Source { .. } => exit::FILES,
                SendError::Interrupted { .. } => exit::NETWORK,
                SendError::Refused { code, .. } => code_exit(*code),
                _ => exit::PROTOCOL,
            };
        }
        if cause.downcast_ref::<ConfigError>().is_some()
            || cause.downcast_ref::<commands::UsageError>().is_some()
        {
            return exit::CONFIG;
        }
        if cause.downcast_ref::<PkiError>().is_some()
            || cause.downcast_ref::<TlsSetupError>().is_some()
            || cause.downcast_ref::<std::io::Error>().is_some()
        {
            return exit::FILES;
        }
        if let Some(AgentError::Bind { .. }) = cause.downcast_ref::<AgentError>() {
            return exit::NETWORK;
        }
        if let Some(e) = cause.downcast_ref::<commands::ObjectFailed>() {
            return code_exit(e.code);
        }
        if cause.downcast_ref::<commands::ResolveError>().is_some()
            || cause.downcast_ref::<commands::SenderGaveUp>().is_some()
            || cause.downcast_ref::<commands::SenderGone>().is_some()
        {
            return exit::NETWORK;
        }
    }
    exit::INTERNAL
}

fn conn_code(e: &ConnError) -> u8 {
    if e.is_auth() {
        return exit::AUTH;
    }
    match e {
        ConnError::Connect { .. }
        | ConnError::Timeout { .. }
        | ConnError::Closed(_)
        | ConnError::Io { .. } => exit::NETWORK,
        ConnError::Handshake(HandshakeError::Timeout(_)) => exit::NETWORK,
        ConnError::Handshake(h) if h.fault() == Fault::Refused => code_exit(h.code()),
        ConnError::GoAway { code, .. } => code_exit(*code),
        _ => exit::PROTOCOL,
    }
}

/// The exit code for a close code the peer sent.
fn code_exit(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::IDENTITY_MISMATCH => exit::AUTH,
        ErrorCode::TIMEOUT | ErrorCode::SHUTTING_DOWN | ErrorCode::OVERLOADED => exit::NETWORK,
        // The receiver cannot store it (no space, a name it refuses, a file in use).
        ErrorCode::STORAGE_ERROR | ErrorCode::BUSY => exit::FILES,
        _ => exit::PROTOCOL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_migration_that_did_not_complete_exits_by_where_it_left_the_vm() {
        let failed = |how| {
            Err::<(), _>(anyhow::anyhow!(
                "QEMU migration of \"vm\" failed in transfer"
            ))
            .context(how)
            .unwrap_err()
        };
        assert_eq!(
            exit_code(&failed(migrate::MigrationFailed::RolledBack)),
            exit::ROLLED_BACK
        );
        assert_eq!(
            exit_code(&failed(migrate::MigrationFailed::OutcomeUnknown)),
            exit::OUTCOME_UNKNOWN
        );
        // Stopped in post-copy: the source stays paused too, and the message says how to
        // resume it.
        let split = failed(migrate::MigrationFailed::PostcopyPaused);
        assert_eq!(exit_code(&split), exit::OUTCOME_UNKNOWN);
        assert!(
            split
                .to_string()
                .contains("run the same `dwcp migrate` again")
        );
        // Also under more context, and ahead of any other kind of error in the chain.
        let io = Err::<(), _>(std::io::Error::other("socket"))
            .context(migrate::MigrationFailed::OutcomeUnknown)
            .context("migrating vm")
            .unwrap_err();
        assert_eq!(exit_code(&io), exit::OUTCOME_UNKNOWN);
        assert_eq!(
            exit_code(&anyhow::Error::new(std::io::Error::other("x"))),
            exit::FILES
        );
        assert_eq!(
            exit_code(&anyhow::anyhow!("something else")),
            exit::INTERNAL
        );
    }
}
