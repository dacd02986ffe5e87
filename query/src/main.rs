//! The `query` binary: flags, logging and [`query::Application`] (see `msghash_common::service`).
fn main() -> std::process::ExitCode {
    msghash_common::service::main::<query::Application>("query")
}
