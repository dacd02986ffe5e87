//! How a service binary reports the way it ended, so every `main.rs` says it the same way.

use crate::ports::LogError;
use std::process::ExitCode;

/// Success, or the error on stderr (one line with its causes) and the exit code:
/// 2 when the event log is set up wrongly (see [`LogError::exit_code`]), 1 otherwise.
pub fn exit_code(service: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{service} stopped");
            eprintln!("{service}: {e:#}");
            ExitCode::from(LogError::exit_code(&e))
        }
    }
}
