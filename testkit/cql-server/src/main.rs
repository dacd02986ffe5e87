//! `cql-server --listen 127.0.0.1:9042`: runs the test CQL server until
//! SIGINT / SIGTERM. Prints `listening on <addr>` once it accepts connections.

use std::{io::Write, process::ExitCode};

const USAGE: &str = "usage: cql-server [--listen 127.0.0.1:9042]";

fn parse_args() -> Result<String, String> {
    let mut listen = "127.0.0.1:9042".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if let Some(v) = arg.strip_prefix("--listen=") {
            listen = v.to_owned();
        } else if arg == "--listen" {
            listen = args.next().ok_or("--listen needs an address")?;
        } else if arg == "-h" || arg == "--help" {
            return Err(USAGE.to_owned());
        } else {
            return Err(format!("unknown argument '{arg}'\n{USAGE}"));
        }
    }
    Ok(listen)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let listen = match parse_args() {
        Ok(l) => l,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let server = match cql_server::start(&listen).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cql-server: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {}", server.local_addr());
    let _ = stdout.flush();
    wait_for_signal().await;
    server.shutdown().await;
    ExitCode::SUCCESS
}
