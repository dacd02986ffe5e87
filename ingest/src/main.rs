use clap::Parser;
use msghash_common::shutdown::on_signals;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = ingest::Cli::parse();
    msghash_common::telemetry::init(cli.log.log_format, &cli.log.log);
    let result = async {
        let app = ingest::Application::build(cli).await?;
        app.run_until_stopped(on_signals()).await
    };
    msghash_common::exit::exit_code("ingest", result.await)
}
