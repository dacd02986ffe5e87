//! The `ingest` binary's flags and wiring: the write path on the Kafka adapter.

use crate::{app_and_front, WriteArgs};
use clap::Parser;
use msghash_common::adapters::kafka::{max_message_bytes_for, KafkaSettings};
use msghash_common::config::{parse_listen, ApiKeyArgs, HttpArgs, KafkaArgs, LogArgs, TlsArgs};
use msghash_common::http::Server;
use msghash_common::service::{self, connect_tls_and_log};
use msghash_common::shutdown::Shutdown;
use std::net::SocketAddr;

/// `ingest`: the write path as its own service.
#[derive(Parser, Debug)]
#[command(
    name = "ingest",
    version,
    about = "msghash write path: POST /messages over TLS"
)]
pub struct Cli {
    /// Address to listen on (port 0: any free port, logged at start).
    #[arg(long, env = "MSGHASH_LISTEN", default_value = "0.0.0.0:8081", value_parser = parse_listen)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub write: WriteArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub keys: ApiKeyArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The ingest service, connected to the broker and bound to its port, not yet serving.
pub struct Application {
    server: Server,
}

impl service::Application for Application {
    const NAME: &'static str = "ingest";
    type Cli = Cli;

    fn log_args(cli: &Cli) -> &LogArgs {
        &cli.log
    }

    /// Connects to the broker (checking the topic), binds the port.
    async fn build(cli: Cli) -> anyhow::Result<Application> {
        let guards = cli.http.guards(Some(&cli.keys))?;
        let settings = cli.write.settings();
        // Whatever body ingest accepts must make an event the topic accepts.
        let kafka = KafkaSettings {
            max_message_bytes: max_message_bytes_for(settings.body_limit),
            ..cli.kafka.settings()
        };
        let (tls, log) = connect_tls_and_log(&cli.tls, kafka).await?;
        let (app, front) = app_and_front(log, settings);
        let server = Server::bind(cli.listen, tls, app, cli.http.limits())?
            .guarded(guards)
            .fronted(Some(front));
        tracing::info!(listen = %server.address(), "ingest listening");
        Ok(Application { server })
    }

    fn address(&self) -> SocketAddr {
        self.server.address()
    }

    /// Serves until `shutdown` is cancelled.
    async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        self.server.serve(shutdown).await?;
        Ok(())
    }
}
