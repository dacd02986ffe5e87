//! The standalone `msghash` binary: see [`msghash::Cli`] for its commands.
use std::process::ExitCode;

fn main() -> ExitCode {
    msghash_common::service::limit_malloc_arenas();
    msghash_common::service::map_large_allocations_apart();
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
    match &cli.command {
        Some(msghash::Command::Cert(args)) => return cert(args),
        Some(msghash::Command::Replay(args)) => return replay(&cli.data_dir, args),
        Some(msghash::Command::Status) => return status(&cli.data_dir),
        Some(msghash::Command::ApiKey) => {
            let (key, line) = msghash::new_api_key();
            println!("key:  {key}");
            println!("line: {line}");
            eprintln!(
                "Give the key to the client (Authorization: Bearer <key>); append the line to \
                 the MSGHASH_API_KEYS_FILE, then send the server SIGHUP."
            );
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    // Kept to the end of main: dropping it flushes the log files.
    let _log_guard = match msghash_common::telemetry::init_with_files(
        cli.log.log_format,
        &cli.log.log,
        cli.log_files().as_ref(),
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("msghash: MSGHASH_LOG_DIR: {e}");
            return ExitCode::from(2);
        }
    };
    msghash_common::http::observe::set_log_sample(cli.log.log_sample);
    msghash_common::http::observe::set_log_rate(cli.log.log_rate);
    msghash_common::service::block_on("msghash", async {
        let result = match msghash::Application::build(cli).await {
            Ok(app) => {
                app.run_until_stopped(msghash_common::shutdown::on_signals())
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
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

/// `msghash cert`: the certificate's path on stdout (nothing else there, for scripts), what
/// happened on stderr.
fn cert(args: &msghash::CertArgs) -> ExitCode {
    let existed = args.dir.join(msghash_common::tls::CERT_FILE).exists()
        && args.dir.join(msghash_common::tls::KEY_FILE).exists();
    match msghash::cert(args) {
        Ok(path) => {
            if existed {
                eprintln!("msghash: kept the existing certificate (delete it to generate another)");
            } else {
                eprintln!("msghash: generated a self-signed certificate and its key");
            }
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("msghash cert: {e}");
            ExitCode::FAILURE
        }
    }
}

fn client_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("msghash: cannot start the async runtime: {e}");
            None
        }
    }
}

/// `msghash replay`: progress on stderr, one line a second; the report on stdout, last.
fn replay(dir: &std::path::Path, args: &msghash::ReplayArgs) -> ExitCode {
    let Some(runtime) = client_runtime() else {
        return ExitCode::FAILURE;
    };
    eprintln!(
        "msghash replay: asking the msghash serving {} to rebuild its read model",
        dir.display()
    );
    let mut printer = projector::replay::ProgressPrinter::stderr();
    let result = runtime.block_on(msghash::admin::run_replay(
        dir,
        args,
        &mut |event| match event {
            msghash::admin::ReplayEvent::Progress(p) => printer.show(p),
            msghash::admin::ReplayEvent::Attached => eprintln!(
                "msghash replay: a replay is already running; following it (its own \
                 --drop-old and --max-rate stay)"
            ),
            _ => {}
        },
    ));
    printer.finish();
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("msghash replay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `msghash status`.
fn status(dir: &std::path::Path) -> ExitCode {
    let Some(runtime) = client_runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(msghash::admin::fetch_status(dir)) {
        Ok(status) => {
            println!("{status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("msghash status: {e}");
            ExitCode::FAILURE
        }
    }
}
