use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match msghash::Cli::try_parse_args() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, naming the setting: clap's first line says which flag, and every
            // flag has its MSGHASH_* variable beside it in --help.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid configuration");
            eprintln!(
                "msghash: {}{}",
                first.trim_start_matches("error: "),
                msghash::env_hint(first)
            );
            return ExitCode::from(2);
        }
    };
    msghash_common::telemetry::init(&cli.log.log_format, &cli.log.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("msghash: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match msghash::run(cli, msghash_common::shutdown::on_signals()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(msghash::RunError::Config(e)) => {
                eprintln!("msghash: {e}");
                ExitCode::from(2)
            }
            Err(msghash::RunError::Other(e)) => {
                eprintln!("msghash: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
