//! The `projector` binary: flags, logging and [`projector::Application`] (see `msghash_common::service`).
use clap::Parser;
use msghash_common::service::{exit_code, run};
use msghash_common::shutdown::on_signals;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = projector::Cli::parse();
    // Kept until the runtime is gone, so the lines logged while it shuts down are written
    // too: dropping it flushes the lines still queued.
    let _log_guard = msghash_common::telemetry::init(cli.log.log_format, &cli.log.log);
    msghash_common::http::observe::set_log_sample(cli.log.log_sample);
    msghash_common::http::observe::set_log_rate(cli.log.log_rate);
    msghash_common::service::block_on("projector", projector_main(cli))
}

async fn projector_main(cli: projector::Cli) -> ExitCode {
    let result = match cli.command {
        Some(projector::Command::Status) => projector::print_status(&cli).await.map(|_| ()),
        Some(projector::Command::Replay(ref args)) => {
            match projector::run_replay(&cli, args, on_signals()).await {
                // Stopped before the switch: running it again resumes it.
                Ok(None) => return ExitCode::from(1),
                r => r.map(|_| ()),
            }
        }
        Some(projector::Command::Run) | None => return run::<projector::Application>(cli).await,
    };
    exit_code("projector", result)
}
