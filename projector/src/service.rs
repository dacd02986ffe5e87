//! The `projector` binary's flags and wiring: the projection, `status` and `replay` on the
//! Kafka and ScyllaDB adapters.

use crate::replay::{self, Progress, ReplayReport, ReplaySettings};
use crate::{app, run_projection, ProjectorSettings, ProjectorStats, Status};
use clap::Parser;
use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::adapters::scylla::ScyllaGenerations;
use msghash_common::config::{parse_listen, HttpArgs, KafkaArgs, LogArgs, ScyllaArgs, TlsArgs};
use msghash_common::generation::{LiveModel, DEFAULT_FOLLOW_INTERVAL};
use msghash_common::http::Server;
use msghash_common::service::{self, connect_tls_and_log};
use msghash_common::shutdown::Shutdown;
use msghash_common::{EventLog, ModelGenerations, ReadModel};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `projector`: the projection as its own service.
#[derive(Parser, Debug)]
#[command(
    name = "projector",
    version,
    about = "msghash projector: event log -> read model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Consumer group of the projectors (all replicas share it).
    #[arg(
        long,
        global = true,
        env = "MSGHASH_CONSUMER_GROUP",
        default_value = "msghash-projector"
    )]
    pub group: String,
    /// Most events applied in one step.
    #[arg(long, global = true, env = "MSGHASH_BATCH_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Address of the HTTPS port serving /health/live, /health/ready and /metrics (port 0:
    /// any free port, logged at start).
    #[arg(long, global = true, env = "MSGHASH_LISTEN", default_value = "0.0.0.0:8083", value_parser = parse_listen)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// What `projector` does; without a subcommand it runs the projection.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the projection and serve health and metrics (the default).
    Run,
    /// Print the active generation, applied vs end offsets per partition and the
    /// dead-lettered count, then exit.
    Status,
    /// Rebuild the read model from offset 0 into a new generation while the services keep
    /// answering, switch readers to it, exit. Resumes a replay that was stopped.
    Replay(ReplayArgs),
}

/// `projector replay`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ReplayArgs {
    /// After the switch, delete every older generation.
    #[arg(long)]
    pub drop_old: bool,
    /// How long, after the switch, to keep projecting while waiting for a live projector
    /// to adopt the new generation (seconds).
    #[arg(long, env = "MSGHASH_HANDOVER_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub handover_timeout_secs: u64,
    /// Most events a second the replay projects until readers switch, so that it leaves
    /// Cassandra (or ScyllaDB) and the broker to the live paths; above the write rate, or
    /// it never catches up. Unset: as fast as they go.
    #[arg(long, env = "MSGHASH_REPLAY_MAX_RATE", value_name = "EVENTS_PER_SEC",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rate: Option<u32>,
}

impl ReplayArgs {
    pub fn settings(&self, group: &str, batch_size: usize) -> ReplaySettings {
        ReplaySettings {
            group: group.to_owned(),
            batch_size,
            handover_timeout: Duration::from_secs(self.handover_timeout_secs),
            drop_old: self.drop_old,
            max_rate: self.max_rate.and_then(std::num::NonZeroU32::new),
            ..ReplaySettings::default()
        }
    }
}

/// `projector status`: connects, prints the status, returns.
pub async fn print_status(cli: &Cli) -> anyhow::Result<Status> {
    let log = KafkaLog::connect(cli.kafka.settings()).await?;
    let generations = ScyllaGenerations::connect(&cli.scylla.settings()).await?;
    let status = Status::read(&log, &generations).await?;
    msghash_common::console::out(format_args!("{status}"))
        .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?;
    Ok(status)
}

/// `projector replay`: rebuilds the read model into a new generation beside the running
/// services, printing progress to stderr and the report's last line to stdout.
pub async fn run_replay(
    cli: &Cli,
    args: &ReplayArgs,
    shutdown: Shutdown,
) -> anyhow::Result<Option<ReplayReport>> {
    let log: Arc<dyn EventLog> = Arc::new(KafkaLog::connect(cli.kafka.settings()).await?);
    let generations: Arc<dyn ModelGenerations> =
        Arc::new(ScyllaGenerations::connect(&cli.scylla.settings()).await?);
    let settings = args.settings(&cli.group, usize::try_from(cli.batch_size)?);
    let mut printer = replay::ProgressPrinter::stderr();
    let report = replay::replay(
        log,
        generations,
        settings,
        &mut |p: &Progress| printer.show(p),
        shutdown,
    )
    .await;
    printer.finish();
    let report = report?;
    match &report {
        Some(r) => msghash_common::console::out(format_args!("{r}"))
            .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?,
        None => msghash_common::console::err(format_args!(
            "replay stopped before the switch; run it again to resume"
        )),
    }
    Ok(report)
}

/// The projector service, connected to the broker and the read model and bound to its
/// health-and-metrics port, not yet projecting.
pub struct Application {
    server: Server,
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    live: Arc<LiveModel>,
    settings: ProjectorSettings,
    stats: Arc<ProjectorStats>,
}

impl service::Application for Application {
    const NAME: &'static str = "projector";
    type Cli = Cli;

    fn log_args(cli: &Cli) -> &LogArgs {
        &cli.log
    }

    /// Connects to the broker (checking the topic) and the read model, binds the port.
    async fn build(cli: Cli) -> anyhow::Result<Application> {
        let guards = cli.http.guards(None)?;
        let (tls, log) = connect_tls_and_log(&cli.tls, cli.kafka.settings()).await?;
        let generations: Arc<dyn ModelGenerations> =
            Arc::new(ScyllaGenerations::connect(&cli.scylla.settings()).await?);
        // Readiness and lag follow the active generation, as the projection does.
        let live = LiveModel::open(generations.clone()).await?;
        let model: Arc<dyn ReadModel> = live.clone();
        let settings = ProjectorSettings {
            group: cli.group,
            batch_size: usize::try_from(cli.batch_size)?,
            ..ProjectorSettings::default()
        };
        let stats = Arc::new(ProjectorStats::default());
        let server = Server::bind(
            cli.listen,
            tls,
            app(log.clone(), model, stats.clone()),
            cli.http.limits(),
        )?
        .guarded(guards);
        tracing::info!(listen = %server.address(), "projector listening");
        Ok(Application {
            server,
            log,
            generations,
            live,
            settings,
            stats,
        })
    }

    fn address(&self) -> SocketAddr {
        self.server.address()
    }

    /// Projects and serves until `shutdown` is cancelled. Either one ending (an error, or
    /// shutdown) stops the other.
    async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let _follow = self.live.follow(DEFAULT_FOLLOW_INTERVAL, shutdown.clone());
        let stop = shutdown.child_token();
        let server = self.server.serve(stop.clone());
        let projection = run_projection(
            self.log,
            self.generations,
            self.settings,
            self.stats,
            stop.clone(),
        );
        let (served, projected) = tokio::join!(
            async {
                let r = server.await;
                stop.cancel();
                r
            },
            async {
                let r = projection.await;
                stop.cancel();
                r
            }
        );
        projected?;
        served?;
        Ok(())
    }
}
