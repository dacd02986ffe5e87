//! The `query` binary's flags and wiring: the read path on the Kafka and ScyllaDB adapters.

use crate::{app, ReadArgs};
use clap::Parser;
use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::adapters::scylla::ScyllaGenerations;
use msghash_common::config::{parse_listen, KafkaArgs, LogArgs, ScyllaArgs, TlsArgs};
use msghash_common::generation::{LiveModel, DEFAULT_FOLLOW_INTERVAL};
use msghash_common::http;
use msghash_common::shutdown::Shutdown;
use msghash_common::EventLog;
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
    /// Address to listen on.
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
    pub log: LogArgs,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: Shutdown) -> anyhow::Result<()> {
    msghash_common::metrics::install();
    let tls = msghash_common::tls::server_config(&cli.tls.source())?;
    let log: Arc<dyn EventLog> = Arc::new(KafkaLog::connect(cli.kafka.settings()).await?);
    let generations = Arc::new(ScyllaGenerations::connect(&cli.scylla.settings()).await?);
    // Reads go to the active generation and move when a replay switches it.
    let live = LiveModel::open(generations).await?;
    let _follow = live.follow(DEFAULT_FOLLOW_INTERVAL, shutdown.clone());
    let app = app(log, live, cli.read.settings());
    let listener = http::bind(cli.listen)?;
    tracing::info!(listen = %listener.local_addr()?, "query listening");
    http::serve_tls(listener, tls, app, shutdown).await?;
    Ok(())
}
