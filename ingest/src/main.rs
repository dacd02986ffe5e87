//! The `ingest` binary: flags, logging and [`ingest::Application`] (see `msghash_common::service`).
fn main() -> std::process::ExitCode {
    msghash_common::service::main::<ingest::Application>("ingest")
}
