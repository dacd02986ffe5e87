//! What the binaries print for people and scripts, never with `println!`: that panics when
//! its stream cannot be written (`msghash status | head -0`, a full disk), and a panic is
//! no way for a command to end.
//!
//! - [`out`]: a command's result on stdout; the caller decides what a failure means
//!   ([`output_failed`] for a command: exit code 1).
//! - [`err`] and [`err_partial`]: progress and messages on stderr; a stderr that cannot be
//!   written is ignored, as there is nowhere left to say so.

use std::fmt::Arguments;
use std::io::Write;
use std::process::ExitCode;

/// Writes `line` and a newline on stdout, and flushes it.
pub fn out(line: Arguments<'_>) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(line)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

/// Writes `line` and a newline on stderr, if it can.
pub fn err(line: Arguments<'_>) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_fmt(line)
        .and_then(|()| stderr.write_all(b"\n"));
}

/// Writes `text` on stderr, without a newline (a status line redrawn in place), if it can.
pub fn err_partial(text: Arguments<'_>) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_fmt(text).and_then(|()| stderr.flush());
}

/// The exit code of `command` when its result could not be written on stdout: 1, with a
/// line on stderr, except when the reader went away (a closed pipe), which asked for no
/// more.
pub fn output_failed(command: &str, e: &std::io::Error) -> ExitCode {
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        err(format_args!("{command}: cannot write to stdout: {e}"));
    }
    ExitCode::FAILURE
}
