use clap::Parser;
use msghash_common::ports::LogError;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ingest::Cli::parse();
    msghash_common::telemetry::init(&cli.log.log_format, &cli.log.log);
    match ingest::run(cli, msghash_common::shutdown::on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingest: {e:#}");
            ExitCode::from(LogError::exit_code(&e))
        }
    }
}
