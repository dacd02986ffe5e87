use clap::Parser;
use msghash_common::ports::LogError;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = projector::Cli::parse();
    msghash_common::telemetry::init(&cli.log.log_format, &cli.log.log);
    let shutdown = msghash_common::shutdown::on_signals();
    let result = match cli.command {
        Some(projector::Command::Status) => projector::print_status(&cli).await.map(|_| true),
        // A replay that stopped before the switch exits 1; running it again resumes it.
        Some(projector::Command::Replay(ref args)) => projector::run_replay(&cli, args, shutdown)
            .await
            .map(|report| report.is_some()),
        Some(projector::Command::Run) | None => projector::run(cli, shutdown).await.map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("projector: {e:#}");
            ExitCode::from(LogError::exit_code(&e))
        }
    }
}
