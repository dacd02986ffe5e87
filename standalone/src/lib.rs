//! `msghash`: the whole service in one process, with nothing to install.
//!
//! It composes the real service libraries — `ingest::router`, `query::router` and
//! `projector::run_projection` — over the embedded adapters (`EventLog` and `ReadModel`
//! on redb files in the data directory), on one TLS port. The handlers, the projection
//! loop and the read-your-writes barrier are the same code the distributed services run.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use msghash_common::adapters::embedded::{EmbeddedGenerations, EmbeddedLog};
use msghash_common::config::{parse_listen, ApiKeyArgs, HttpArgs, LogArgs, TlsArgs};
use msghash_common::generation::LiveModel;
use msghash_common::http;
use msghash_common::shutdown::Shutdown;
use msghash_common::{EventLog, ModelGenerations, ReadModel};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub mod admin;

/// `msghash`: flags and `MSGHASH_*` variables.
#[derive(Parser, Debug)]
#[command(
    name = "msghash",
    version,
    about = "msghash: POST a message, get its SHA-256; GET the digest, get the message. \
             One process, one TLS port, embedded storage."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address of the HTTPS port.
    #[arg(long, global = true, env = "MSGHASH_LISTEN", default_value = "0.0.0.0:5000", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Directory of the event log and the read model (created if missing; one process at a
    /// time).
    #[arg(long, global = true, env = "MSGHASH_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Partitions of the event log; fixed when the data directory is created.
    #[arg(long, global = true, env = "MSGHASH_PARTITIONS", default_value = "8",
          value_parser = msghash_common::config::parse_partitions::<1024>)]
    pub partitions: std::num::NonZeroU32,
    /// Most events the projector (and a replay) applies in one transaction. A caught-up
    /// projector applies what is there (a few events); a large maximum only matters while
    /// it catches up or replays, where each commit rewrites the read model's pages that
    /// the batch's (random) digests touch, so fewer, larger commits go faster
    /// (docs/performance.md). Each pending event holds its message in memory.
    #[arg(long, global = true, env = "MSGHASH_BATCH_SIZE", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Most appends waiting for the event log's writer (and at most 16 MiB of them; one
    /// alone always goes); past it a POST is answered 503 with Retry-After at once (shed)
    /// instead of queueing.
    #[arg(long, global = true, env = "MSGHASH_WRITE_QUEUE",
          default_value_t = msghash_common::adapters::embedded::DEFAULT_WRITE_QUEUE as u64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub write_queue: u64,
    #[command(flatten)]
    pub write: ingest::WriteArgs,
    #[command(flatten)]
    pub read: query::ReadArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub keys: ApiKeyArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Also write the logs to daily-rotated files <dir>/msghash.YYYY-MM-DD.log (unset:
    /// stdout only).
    #[arg(long, global = true, env = "MSGHASH_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// How many daily log files --log-dir keeps.
    #[arg(long, global = true, env = "MSGHASH_LOG_RETENTION", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub log_retention: u64,
}

/// Subcommands; without one, `msghash` serves.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a self-signed certificate (localhost.crt, localhost.key) into --dir, or keep
    /// the pair already there, and print the certificate's path.
    Cert(CertArgs),
    /// Rebuild the read model of the running msghash (same MSGHASH_DATA_DIR) from its event
    /// log into a new generation while it keeps answering, switch its readers to it, print
    /// progress; exits 0 once readers are on the new generation. Resumes a replay that was
    /// stopped.
    Replay(ReplayArgs),
    /// Print a new random API key and the line to add for it to MSGHASH_API_KEYS_FILE (its
    /// SHA-256; the key itself is stored nowhere). Then send msghash (or ingest) SIGHUP.
    ApiKey,
    /// Print the running msghash's active generation, applied vs end offsets per partition
    /// and dead-lettered event count.
    Status,
}

/// `msghash replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// After the switch, delete the older generations' files.
    #[arg(long)]
    pub drop_old: bool,
    /// Most events a second the replay projects until readers switch, so that it leaves
    /// the disk and the cores to the requests; above the write rate, or it never catches
    /// up. Unset: as fast as it goes. A replay already running keeps its own.
    #[arg(long, env = "MSGHASH_REPLAY_MAX_RATE", value_name = "EVENTS_PER_SEC",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rate: Option<u32>,
}

/// `msghash cert`.
#[derive(clap::Args, Debug)]
pub struct CertArgs {
    /// Directory of localhost.crt and localhost.key (created if missing); the same as
    /// --cert-dir (MSGHASH_CERT_DIR, default certs), which it overrides.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A name the certificate is also valid for, besides localhost, 127.0.0.1 and ::1: a
    /// DNS name or an IP address. Repeatable. Only used when the certificate is generated.
    #[arg(long = "san", value_name = "NAME", value_parser = parse_san)]
    pub sans: Vec<String>,
}

fn parse_san(s: &str) -> Result<String, String> {
    if msghash_common::tls::valid_san(s) {
        Ok(s.to_owned())
    } else {
        Err("a DNS name (letters, digits, '-', dot-separated) or an IP address".into())
    }
}

/// `msghash api-key`: a new key (two random UUIDs: 244 random bits, 64 hex digits) and its key-file line.
pub fn new_api_key() -> (String, String) {
    let key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let line = msghash_common::http::guard::key_file_line(&key);
    (key, line)
}

impl CertArgs {
    /// Where `msghash cert` writes: `--dir`, or else the server's `--cert-dir`, so that
    /// the certificate it makes is the one `msghash` serves with the same settings.
    pub fn dir<'a>(&'a self, cli: &'a Cli) -> &'a std::path::Path {
        self.dir.as_deref().unwrap_or(&cli.tls.cert_dir)
    }
}

/// `msghash cert`: the certificate's path, once it is in place in `dir`.
pub fn cert(
    dir: &std::path::Path,
    args: &CertArgs,
) -> Result<PathBuf, msghash_common::tls::TlsError> {
    let (cert, _key) = msghash_common::tls::ensure_generated_with(dir, &args.sans)?;
    Ok(cert)
}

impl Cli {
    /// The log files `--log-dir` asks for.
    pub fn log_files(&self) -> Option<msghash_common::telemetry::LogFiles> {
        self.log_dir
            .as_ref()
            .map(|dir| msghash_common::telemetry::LogFiles {
                dir: dir.clone(),
                prefix: "msghash".into(),
                retention: usize::try_from(self.log_retention).unwrap_or(usize::MAX),
            })
    }

    /// Parses the command line; a new user reads text logs, so that is the default here.
    pub fn try_parse_args() -> Result<Cli, clap::Error> {
        Cli::from_arg_matches(&Cli::parser().try_get_matches()?)
    }

    /// The parser [`Cli::try_parse_args`] uses: text logs by default, and `-1` read as a
    /// flag's value (which its parser then refuses, naming the flag), not as a flag.
    pub fn parser() -> clap::Command {
        fn negative_values(a: clap::Arg) -> clap::Arg {
            let takes = a.get_action().takes_values();
            a.allow_negative_numbers(takes)
        }
        Cli::command()
            .mut_arg("log_format", |a| a.default_value("text"))
            .mut_args(negative_values)
            .mut_subcommands(|c| c.mut_args(negative_values))
    }
}

/// clap's error `text` as one line: its first, and when that ends in a colon ("the
/// following required arguments were not provided:"), the indented lines it introduces.
pub fn error_line(text: &str) -> String {
    let mut lines = text.lines();
    let first = lines
        .next()
        .unwrap_or("invalid configuration")
        .trim_start_matches("error: ");
    if !first.ends_with(':') {
        return first.to_owned();
    }
    let listed: Vec<&str> = lines
        .take_while(|l| l.starts_with(' '))
        .map(str::trim)
        .collect();
    format!("{first} {}", listed.join(", "))
}

/// ` (environment: MSGHASH_X)` when a clap error line names a flag, of `msghash` or of one
/// of its commands, that has an environment variable.
pub fn env_hint(error_line: &str) -> String {
    let command = Cli::parser();
    let hint = command
        .get_arguments()
        .chain(command.get_subcommands().flat_map(|c| c.get_arguments()))
        .filter_map(|a| Some((a.get_long()?, a.get_env()?)))
        .find(|(long, _)| {
            error_line.contains(&format!("--{long} ")) || error_line.contains(&format!("--{long}'"))
        })
        .map(|(_, env)| format!(" (environment: {})", env.to_string_lossy()));
    hint.unwrap_or_default()
}

/// Everything `msghash` serves on its port: ingest's and query's routes over `log` and
/// `model`, `/openapi.json` (the whole API: [`query::full_openapi`], the same document the
/// edge of the distributed stack serves), health, `/metrics`, request observation.
pub fn app(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    write: ingest::IngestSettings,
    read: query::QuerySettings,
) -> axum::Router {
    app_and_front(log, model, write, read).0
}

/// [`app`], and the front for the server: query's cached answers
/// ([`query::router_and_front`]) with ingest's `POST /messages` ([`ingest::router_and_front`]).
pub fn app_and_front(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    write: ingest::IngestSettings,
    read: query::QuerySettings,
) -> (axum::Router, Option<http::Front>) {
    msghash_common::metrics::install();
    let (reads, read_front) = query::router_and_front(log.clone(), model.clone(), read, SERVICE);
    let (writes, write_front) = ingest::router_and_front(log.clone(), write, SERVICE);
    let front = match read_front {
        Some(read_front) => read_front.with(write_front),
        None => write_front,
    };
    let app = http::service_app(
        SERVICE,
        writes
            .merge(reads)
            .merge(http::openapi_route(&query::full_openapi())),
        http::log_and_model_ready(log, model),
    );
    (app, Some(front))
}

/// Why `msghash` could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting is wrong or a resource it names is unusable: exit code 2.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// How often the readers and the projector of the standalone ask for the active generation.
const FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The `service` label of the standalone's HTTP metrics.
pub const SERVICE: &str = "msghash";

/// msghash with its stores open, its admin socket and its TLS port bound, not yet serving.
pub struct Application {
    server: http::Server,
    data: PathBuf,
    tls_source: msghash_common::tls::CertSource,
    /// Text logs: print the banner a person reads (its first line says the port) before
    /// the `listening` event. JSON logs: only the event, so that stdout stays JSON lines.
    banner: bool,
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    live: Arc<LiveModel>,
    projector_settings: projector::ProjectorSettings,
    admin: tokio::task::JoinHandle<()>,
    /// Stops the admin socket (started in `build`, so its path is taken at once) and
    /// everything `run_until_stopped` starts; cancelled when the application ends or is
    /// dropped unrun.
    stop: tokio_util::sync::DropGuard,
}

impl Application {
    /// Opens the data directory (locking it), binds the admin socket and the port. Every
    /// error here is a setting or a resource it names: [`RunError::Config`].
    pub async fn build(cli: Cli) -> Result<Application, RunError> {
        let tls_source = cli.tls.source();
        let banner = cli.log.log_format == msghash_common::telemetry::LogFormat::Text;
        let tls = msghash_common::tls::server_config(&tls_source).map_err(|e| {
            RunError::Config(format!(
                "TLS (MSGHASH_TLS_CERT/MSGHASH_TLS_KEY/MSGHASH_CERT_DIR): {e}"
            ))
        })?;
        let data = cli.data_dir.clone();
        let config = |e: &dyn std::fmt::Display| RunError::Config(format!("MSGHASH_DATA_DIR: {e}"));
        // Before the stores open, so that their metrics are present from the start.
        msghash_common::metrics::install();
        let write_queue = usize::try_from(cli.write_queue).unwrap_or(usize::MAX);
        let log: Arc<dyn EventLog> = Arc::new(
            EmbeddedLog::open_with_queue(&data, cli.partitions, write_queue)
                .map_err(|e| config(&e))?,
        );
        let generations: Arc<dyn ModelGenerations> =
            Arc::new(EmbeddedGenerations::open(&data).map_err(|e| config(&e))?);
        let live = LiveModel::open(generations.clone())
            .await
            .map_err(|e| config(&e))?;
        let model: Arc<dyn ReadModel> = live.clone();

        let (app, front) = app_and_front(
            log.clone(),
            model,
            cli.write.settings(),
            cli.read.settings(),
        );
        let guards = cli
            .http
            .guards(Some(&cli.keys))
            .map_err(|e| RunError::Config(e.to_string()))?;
        let server = http::Server::bind(cli.listen, tls, app, cli.http.limits())
            .map_err(|e| RunError::Config(format!("MSGHASH_LISTEN {}: {e}", cli.listen)))?
            .guarded(guards)
            .fronted(front);

        let batch_size = usize::try_from(cli.batch_size).map_err(anyhow::Error::from)?;
        let projector_settings = projector::ProjectorSettings {
            generation_check: FOLLOW_INTERVAL,
            batch_size,
            ..projector::ProjectorSettings::default()
        };
        let replay_settings = projector::ReplaySettings {
            group: projector_settings.group.clone(),
            batch_size,
            handover_timeout: std::time::Duration::from_secs(10),
            // Readers here poll the catalog every 100 ms.
            drop_grace: std::time::Duration::from_secs(1),
            ..projector::ReplaySettings::default()
        };
        let stop = Shutdown::new();
        let admin = admin::serve(
            &data,
            log.clone(),
            generations.clone(),
            replay_settings,
            stop.clone(),
        )
        .map_err(|e| {
            RunError::Config(format!(
                "MSGHASH_DATA_DIR: cannot serve {}: {e}",
                data.join(admin::SOCKET_FILE).display()
            ))
        })?;
        Ok(Application {
            server,
            data,
            tls_source,
            banner,
            log,
            generations,
            live,
            projector_settings,
            admin,
            stop: stop.drop_guard(),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.server.address()
    }

    pub fn port(&self) -> u16 {
        self.address().port()
    }

    /// Serves until `shutdown` is cancelled, then stops gracefully: in-flight requests
    /// finish, the projector stops after its current batch, the stores are closed.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<(), RunError> {
        let stop = self.stop.disarm();
        let on_shutdown = {
            let stop = stop.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.cancel();
            })
        };
        // The catalog is a local file: asking it often costs nothing and makes the switch
        // after `msghash replay` quick.
        let _follow = self.live.follow(FOLLOW_INTERVAL, stop.clone());
        let projection = tokio::spawn(projector::run_projection(
            self.log,
            self.generations,
            self.projector_settings,
            Arc::default(),
            stop.clone(),
        ));
        let address = self.server.address();
        if self.banner {
            announce(address.port(), &self.data, &self.tls_source);
        }
        tracing::info!(%address, data_dir = %self.data.display(), "listening");
        let served = self.server.serve(stop.clone()).await;
        stop.cancel();
        on_shutdown.abort();
        match projection.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "projector failed"),
            Err(e) => tracing::error!(error = %e, "projector task failed"),
        }
        if let Err(e) = self.admin.await {
            tracing::error!(error = %e, "admin task failed");
        }
        served.map_err(anyhow::Error::from)?;
        tracing::info!("stopped; data is in {}", self.data.display());
        Ok(())
    }
}

fn announce(port: u16, data: &std::path::Path, tls: &msghash_common::tls::CertSource) {
    let cacert = match tls {
        msghash_common::tls::CertSource::Files { cert, .. } => cert.clone(),
        msghash_common::tls::CertSource::Generated { dir } => {
            dir.join(msghash_common::tls::CERT_FILE)
        }
    };
    let base = format!("https://localhost:{port}");
    let c = cacert.display();
    // A stdout that cannot be written (a closed pipe) stops neither the server nor its
    // logs, where the `listening` event has the address.
    let _ = msghash_common::console::out(format_args!(
        "msghash is listening on {base} (data in {})\n  \
         curl --cacert {c} -X POST {base}/messages -H 'Content-Type: application/json' -d '{{\"message\":\"foo\"}}'\n  \
         curl --cacert {c} {base}/messages/2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n  \
         curl --cacert {c} '{base}/messages?limit=10'\n  \
         curl --cacert {c} {base}/metrics\n\
         Stop with Ctrl-C.",
        data.display()
    ));
}
