//! The `ingest` binary's flags and wiring: the write path on the Kafka adapter.

use crate::{app, WriteArgs};
use clap::Parser;
use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::config::{parse_listen, KafkaArgs, LogArgs, TlsArgs};
use msghash_common::http;
use msghash_common::shutdown::Shutdown;
use msghash_common::EventLog;
use std::net::SocketAddr;
use std::sync::Arc;

/// `ingest`: the write path as its own service.
#[derive(Parser, Debug)]
#[command(
    name = "ingest",
    version,
    about = "msghash write path: POST /messages over TLS"
)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, env = "MSGHASH_LISTEN", default_value = "0.0.0.0:8081", value_parser = parse_listen)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub write: WriteArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
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
    let app = app(log, cli.write.settings());
    let listener = http::bind(cli.listen)?;
    tracing::info!(listen = %listener.local_addr()?, "ingest listening");
    http::serve_tls(listener, tls, app, shutdown).await?;
    Ok(())
}
