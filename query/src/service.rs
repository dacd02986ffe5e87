//! The `query` binary's flags and wiring: the read path on the Kafka and ScyllaDB adapters.

use crate::{app_and_front, ReadArgs};
use clap::Parser;
use msghash_common::adapters::scylla::ScyllaGenerations;
use msghash_common::config::{
    parse_listen, ApiKeyArgs, HttpArgs, KafkaArgs, LogArgs, ScyllaArgs, TlsArgs,
};
use msghash_common::generation::{LiveModel, DEFAULT_FOLLOW_INTERVAL};
use msghash_common::http::Server;
use msghash_common::service::{self, connect_tls_and_log};
use msghash_common::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;

/// `query`: the read path as its own service.
#[derive(Parser, Debug)]
#[command(
    name = "query",
    version,
    about = "msghash read path: GET /messages/{digest} over TLS"
)]
pub struct Cli {
    /// Address to listen on (port 0: any free port, logged at start).
    #[arg(long, env = "MSGHASH_LISTEN", default_value = "0.0.0.0:8082", value_parser = parse_listen)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub keys: ApiKeyArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The query service, connected to the broker and the read model and bound to its port,
/// not yet serving.
pub struct Application {
    server: Server,
    live: Arc<LiveModel>,
}

impl service::Application for Application {
    const NAME: &'static str = "query";
    type Cli = Cli;

    fn log_args(cli: &Cli) -> &LogArgs {
        &cli.log
    }

    /// Connects to the broker (checking the topic) and the read model, binds the port.
    async fn build(cli: Cli) -> anyhow::Result<Application> {
        let guards = cli.http.guards(Some(&cli.keys))?;
        let (tls, log) = connect_tls_and_log(&cli.tls, cli.kafka.settings()).await?;
        let generations = Arc::new(ScyllaGenerations::connect(&cli.scylla.settings()).await?);
        // Reads go to the active generation and move when a replay switches it.
        let live = LiveModel::open(generations).await?;
        let (app, front) = app_and_front(log, live.clone(), cli.read.settings());
        let server = Server::bind(cli.listen, tls, app, cli.http.limits())?
            .guarded(guards)
            .fronted(front);
        tracing::info!(listen = %server.address(), "query listening");
        Ok(Application { server, live })
    }

    fn address(&self) -> SocketAddr {
        self.server.address()
    }

    /// Serves, following the active generation, until `shutdown` is cancelled.
    async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let _follow = self.live.follow(DEFAULT_FOLLOW_INTERVAL, shutdown.clone());
        self.server.serve(shutdown).await?;
        Ok(())
    }
}
