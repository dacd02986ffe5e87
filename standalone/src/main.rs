//! The standalone `msghash` binary: see [`msghash::Cli`] for its commands.
use msghash_common::console::{err, out, output_failed};
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
            let line = msghash::error_line(&e.to_string());
            err(format_args!("msghash: {line}{}", msghash::env_hint(&line)));
            return ExitCode::from(2);
        }
    };
    match &cli.command {
        Some(msghash::Command::Cert(args)) => return cert(args.dir(&cli), args),
        Some(msghash::Command::Replay(args)) => return replay(&cli.data_dir, args),
        Some(msghash::Command::Status) => return status(&cli.data_dir),
        Some(msghash::Command::ApiKey) => {
            let (key, line) = msghash::new_api_key();
            if let Err(e) = out(format_args!("key:  {key}\nline: {line}")) {
                return output_failed("msghash api-key", &e);
            }
            err(format_args!(
                "Give the key to the client (Authorization: Bearer <key>); append the line to \
                 the MSGHASH_API_KEYS_FILE, then send the server SIGHUP."
            ));
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
            err(format_args!("msghash: MSGHASH_LOG_DIR: {e}"));
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
                err(format_args!("msghash: {e}"));
                ExitCode::from(2)
            }
            Err(msghash::RunError::Other(e)) => {
                err(format_args!("msghash: {e:#}"));
                ExitCode::FAILURE
            }
        }
    })
}

/// `msghash cert`: the certificate's path on stdout (nothing else there, for scripts), what
/// happened on stderr.
fn cert(dir: &std::path::Path, args: &msghash::CertArgs) -> ExitCode {
    let existed = dir.join(msghash_common::tls::CERT_FILE).exists()
        && dir.join(msghash_common::tls::KEY_FILE).exists();
    match msghash::cert(dir, args) {
        Ok(path) => {
            if existed {
                err(format_args!(
                    "msghash: kept the existing certificate (delete it to generate another)"
                ));
            } else {
                err(format_args!(
                    "msghash: generated a self-signed certificate and its key"
                ));
            }
            match out(format_args!("{}", path.display())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => output_failed("msghash cert", &e),
            }
        }
        Err(e) => {
            err(format_args!("msghash cert: {e}"));
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
            err(format_args!("msghash: cannot start the async runtime: {e}"));
            None
        }
    }
}

/// `msghash replay`: progress on stderr, one line a second; the report on stdout, last.
fn replay(dir: &std::path::Path, args: &msghash::ReplayArgs) -> ExitCode {
    let Some(runtime) = client_runtime() else {
        return ExitCode::FAILURE;
    };
    err(format_args!(
        "msghash replay: asking the msghash serving {} to rebuild its read model",
        dir.display()
    ));
    let mut printer = projector::replay::ProgressPrinter::stderr();
    let result = runtime.block_on(msghash::admin::run_replay(
        dir,
        args,
        &mut |event| match event {
            msghash::admin::ReplayEvent::Progress(p) => printer.show(p),
            msghash::admin::ReplayEvent::Attached => err(format_args!(
                "msghash replay: a replay is already running; following it (its own \
                 --drop-old and --max-rate stay)"
            )),
            _ => {}
        },
    ));
    printer.finish();
    match result {
        Ok(report) => match out(format_args!("{report}")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => output_failed("msghash replay", &e),
        },
        Err(e) => {
            err(format_args!("msghash replay: {e}"));
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
        Ok(status) => match out(format_args!("{status}")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => output_failed("msghash status", &e),
        },
        Err(e) => {
            err(format_args!("msghash status: {e}"));
            ExitCode::FAILURE
        }
    }
}
