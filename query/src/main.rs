use clap::Parser;
use msghash_common::shutdown::on_signals;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = query::Cli::parse();
    msghash_common::telemetry::init(cli.log.log_format, &cli.log.log);
    let result = async {
        let app = query::Application::build(cli).await?;
        app.run_until_stopped(on_signals()).await
    };
    msghash_common::exit::exit_code("query", result.await)
}
