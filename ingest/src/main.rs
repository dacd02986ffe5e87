use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = ingest::Cli::parse();
    msghash_common::telemetry::init(&cli.log.log_format, &cli.log.log);
    ingest::run(cli, msghash_common::shutdown::on_signals()).await
}
