use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = projector::Cli::parse();
    msghash_common::telemetry::init(&cli.log.log_format, &cli.log.log);
    match cli.command {
        Some(projector::Command::Status) => projector::print_status(&cli).await.map(|_| ()),
        Some(projector::Command::Replay(ref args)) => {
            match projector::run_replay(&cli, args, msghash_common::shutdown::on_signals()).await? {
                Some(_) => Ok(()),
                None => std::process::exit(1),
            }
        }
        Some(projector::Command::Run) | None => {
            projector::run(cli, msghash_common::shutdown::on_signals()).await
        }
    }
}
