//! Command-line flags and `MSGHASH_*` environment variables shared by the services.
//!
//! Each binary flattens the groups it needs into its own `clap` parser, so `--help` lists
//! exactly the settings that binary reads, and a bad value is a one-line error naming the
//! setting, with exit code 2.

#[cfg(feature = "kafka")]
use crate::adapters::kafka::KafkaSettings;
#[cfg(feature = "scylla")]
use crate::adapters::scylla::{valid_replication, Keyspace, ScyllaSettings};
use crate::telemetry::LogFormat;
use crate::tls::CertSource;
use clap::Args;
#[cfg(feature = "scylla")]
use clap::ValueEnum;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
#[cfg(feature = "kafka")]
use std::time::Duration;

#[cfg(feature = "kafka")]
/// The event log (Kafka).
#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(
        long,
        global = true,
        env = "MSGHASH_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_brokers: String,
    /// Topic holding the MessageHashed events.
    #[arg(long, global = true, env = "MSGHASH_TOPIC", default_value = "messages")]
    pub topic: String,
    /// Partition count of the topic; every service must use the same value.
    #[arg(long, global = true, env = "MSGHASH_PARTITIONS", default_value = "8",
          value_parser = parse_partitions::<10_000>)]
    pub partitions: NonZeroU32,
    /// Replication factor used when msghash creates the topic.
    #[arg(long, global = true, env = "MSGHASH_TOPIC_REPLICATION", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=16))]
    pub topic_replication: i32,
    /// `min.insync.replicas` of the topic msghash creates: how many replicas must have an
    /// event before the broker acknowledges it (at most the replication factor). Start-up
    /// refuses a topic whose replication or min ISR is below what is configured.
    #[arg(long, global = true, env = "MSGHASH_TOPIC_MIN_ISR", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=16))]
    pub topic_min_isr: i32,
    /// How long the producer keeps trying to deliver one event (through a leader election)
    /// before giving up, in milliseconds. A POST waits for it only up to its own deadline
    /// (MSGHASH_REQUEST_TIMEOUT_MS).
    #[arg(long, global = true, env = "MSGHASH_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=300_000))]
    pub kafka_message_timeout_ms: u64,
    /// Producer compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, global = true, env = "MSGHASH_KAFKA_COMPRESSION", default_value = "lz4",
          value_parser = ["none", "gzip", "snappy", "lz4", "zstd"])]
    pub kafka_compression: String,
    /// Consumer-group session timeout in milliseconds (how soon a dead projector's
    /// partitions are handed to another).
    #[arg(long, global = true, env = "MSGHASH_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1_000..=300_000))]
    pub kafka_session_timeout_ms: u64,
}

#[cfg(feature = "kafka")]
impl KafkaArgs {
    pub fn settings(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.kafka_brokers.clone(),
            topic: self.topic.clone(),
            partitions: self.partitions,
            replication_factor: self.topic_replication,
            min_insync_replicas: self.topic_min_isr,
            message_timeout: Duration::from_millis(self.kafka_message_timeout_ms),
            max_message_bytes: crate::adapters::kafka::max_message_bytes_for(1024 * 1024),
            compression: self.kafka_compression.clone(),
            session_timeout: Duration::from_millis(self.kafka_session_timeout_ms),
            create_topic: true,
            verify_compaction: true,
        }
    }
}

#[cfg(feature = "scylla")]
/// Consistency levels offered for read-model statements.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConsistencyArg {
    One,
    LocalOne,
    LocalQuorum,
    Quorum,
    All,
}

#[cfg(feature = "scylla")]
impl From<ConsistencyArg> for scylla::statement::Consistency {
    fn from(c: ConsistencyArg) -> Self {
        use scylla::statement::Consistency as C;
        match c {
            ConsistencyArg::One => C::One,
            ConsistencyArg::LocalOne => C::LocalOne,
            ConsistencyArg::LocalQuorum => C::LocalQuorum,
            ConsistencyArg::Quorum => C::Quorum,
            ConsistencyArg::All => C::All,
        }
    }
}

#[cfg(feature = "scylla")]
/// A consistency level that keeps read-your-writes: every read-model statement (the
/// projector's writes and the query's reads) uses the same level, so it must be a quorum
/// or more, so that any read overlaps any acknowledged write on at least one replica.
fn parse_consistency(s: &str) -> Result<ConsistencyArg, String> {
    let level = ConsistencyArg::from_str(s, true)?;
    match level {
        ConsistencyArg::One | ConsistencyArg::LocalOne => Err(format!(
            "{s} breaks read-your-writes: a read at {s} can miss a write that a quorum \
             acknowledged; use LOCAL_QUORUM, QUORUM or ALL"
        )),
        _ => Ok(level),
    }
}

#[cfg(feature = "scylla")]
fn parse_replication(s: &str) -> Result<String, String> {
    if valid_replication(s) {
        Ok(s.to_owned())
    } else {
        Err(
            "one CQL replication map, e.g. {'class': 'SimpleStrategy', 'replication_factor': 1}"
                .into(),
        )
    }
}

#[cfg(feature = "scylla")]
/// The read model (ScyllaDB).
#[derive(Args, Debug, Clone)]
pub struct ScyllaArgs {
    /// ScyllaDB contact points, comma-separated host:port.
    #[arg(
        long,
        global = true,
        env = "MSGHASH_SCYLLA_NODES",
        default_value = "127.0.0.1:9042",
        value_delimiter = ','
    )]
    pub scylla_nodes: Vec<String>,
    /// Keyspace of the read model; created if missing.
    #[arg(
        long,
        global = true,
        env = "MSGHASH_KEYSPACE",
        default_value = "msghash"
    )]
    pub keyspace: Keyspace,
    /// Replication map used when msghash creates the keyspace.
    #[arg(long, global = true, env = "MSGHASH_KEYSPACE_REPLICATION",
          default_value = "{'class': 'SimpleStrategy', 'replication_factor': 1}",
          value_parser = parse_replication)]
    pub keyspace_replication: String,
    /// Consistency level of every read-model statement: LOCAL_QUORUM, QUORUM or ALL (ONE and
    /// LOCAL_ONE are refused: they break read-your-writes).
    #[arg(
        long,
        global = true,
        env = "MSGHASH_SCYLLA_CONSISTENCY",
        default_value = "LOCAL_QUORUM",
        value_parser = parse_consistency
    )]
    pub scylla_consistency: ConsistencyArg,
}

#[cfg(feature = "scylla")]
impl ScyllaArgs {
    pub fn settings(&self) -> ScyllaSettings {
        ScyllaSettings {
            nodes: self.scylla_nodes.clone(),
            keyspace: self.keyspace.clone(),
            replication: self.keyspace_replication.clone(),
            consistency: self.scylla_consistency.into(),
        }
    }
}

/// TLS of the listening socket.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM certificate chain to serve (with --tls-key). Without it a self-signed certificate
    /// is reused from, or generated into, --cert-dir.
    #[arg(long, global = true, env = "MSGHASH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "MSGHASH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Where a generated certificate is written (localhost.crt, localhost.key).
    #[arg(long, global = true, env = "MSGHASH_CERT_DIR", default_value = "certs")]
    pub cert_dir: PathBuf,
}

impl TlsArgs {
    pub fn source(&self) -> CertSource {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => CertSource::Generated {
                dir: self.cert_dir.clone(),
            },
        }
    }
}

/// Limits of the HTTPS port against slow, idle and too many clients (see
/// `msghash_common::http::serve`).
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// How long a client has for the TLS handshake, and then for each request's head
    /// (request line and headers), in milliseconds; an HTTP/1.1 connection waiting for its
    /// next request is closed after it too.
    #[arg(long, global = true, env = "MSGHASH_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub http_header_timeout_ms: u64,
    /// How long a client has to send a request body, from its head, in milliseconds; past it
    /// the answer is 408 and the connection is closed.
    #[arg(long, global = true, env = "MSGHASH_HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub http_body_timeout_ms: u64,
    /// A connection on which no byte moves either way for this long is closed, in
    /// milliseconds (an idle HTTP/2 connection; a client that stops reading its answer).
    #[arg(long, global = true, env = "MSGHASH_HTTP_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1_000..=3_600_000))]
    pub http_idle_timeout_ms: u64,
    /// Most connections open at once; past it a new connection is closed on accept. The
    /// process needs a file-descriptor limit (`ulimit -n`) above it.
    #[arg(long, global = true, env = "MSGHASH_HTTP_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub http_max_connections: u64,
    /// Most concurrent streams (requests) on one HTTP/2 connection.
    #[arg(long, global = true, env = "MSGHASH_HTTP2_MAX_STREAMS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub http2_max_streams: u32,
    /// Requests a second each client address may make on average (429 past it); unset: no
    /// limit. Health checks, /metrics and /openapi.json are never limited.
    #[arg(long, global = true, env = "MSGHASH_RATE_LIMIT_PER_SEC")]
    pub rate_limit_per_sec: Option<NonZeroU32>,
    /// Requests a client may make at once above the rate (default: the rate).
    #[arg(
        long,
        global = true,
        env = "MSGHASH_RATE_LIMIT_BURST",
        requires = "rate_limit_per_sec"
    )]
    pub rate_limit_burst: Option<NonZeroU32>,
    /// Peers (IP addresses or networks, comma-separated, e.g. the edge) whose
    /// X-Forwarded-For names the client for rate limits; anyone else's is ignored.
    #[arg(long, global = true, env = "MSGHASH_TRUSTED_PROXIES", value_delimiter = ',',
          value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// API keys (who may write).
#[derive(Args, Debug, Clone)]
pub struct ApiKeyArgs {
    /// A file of API key hashes, one `sha256:<hex of SHA-256(key)>` per line (`msghash
    /// api-key` makes one), reloaded on SIGHUP. Set: a POST needs `Authorization: Bearer
    /// <key>`, else 401. Unset: no keys.
    #[arg(long, global = true, env = "MSGHASH_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// What needs a key: `writes` (POST) or `all` (every request but health, metrics and
    /// the OpenAPI document).
    #[arg(long, global = true, env = "MSGHASH_API_KEYS_SCOPE", value_enum,
          default_value_t = crate::http::KeyScope::Writes)]
    pub api_keys_scope: crate::http::KeyScope,
}

/// Parses an IP address (a one-address network) or a CIDR network.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.trim()
        .parse::<ipnet::IpNet>()
        .or_else(|_| s.trim().parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or network (e.g. 10.0.0.0/8)"))
}

impl HttpArgs {
    pub fn limits(&self) -> crate::http::ConnectionLimits {
        use std::time::Duration as D;
        crate::http::ConnectionLimits {
            header_timeout: D::from_millis(self.http_header_timeout_ms),
            body_timeout: D::from_millis(self.http_body_timeout_ms),
            idle_timeout: D::from_millis(self.http_idle_timeout_ms),
            max_connections: usize::try_from(self.http_max_connections).unwrap_or(usize::MAX),
            http2_max_streams: self.http2_max_streams,
        }
    }

    /// The guards of the HTTPS port: the rate limit, the trusted proxies and, when `keys`
    /// names a file, the API keys (a file that cannot be used is an error naming it).
    pub fn guards(
        &self,
        keys: Option<&ApiKeyArgs>,
    ) -> Result<crate::http::Guards, crate::http::guard::KeyFileError> {
        let api_keys = match keys {
            Some(ApiKeyArgs {
                api_keys_file: Some(path),
                api_keys_scope,
            }) => Some(crate::http::ApiKeys::load(path, *api_keys_scope)?),
            _ => None,
        };
        Ok(crate::http::Guards {
            trusted_proxies: self.trusted_proxies.clone(),
            rate_limit: self.rate_limit_per_sec.map(|rate| {
                crate::http::RateLimit::new(rate, self.rate_limit_burst.unwrap_or(rate))
            }),
            api_keys,
        })
    }
}

/// Parses a partition count from 1 to `MAX`.
pub fn parse_partitions<const MAX: u32>(s: &str) -> Result<NonZeroU32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|n| *n <= MAX)
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("{s:?} is not a partition count from 1 to {MAX}"))
}

/// Parses a listen address, naming the setting on error.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an ip:port address (e.g. 0.0.0.0:8443)"))
}

/// A log filter that tracing's `EnvFilter` takes, refused at start otherwise rather than
/// read as `info`. A bare word that is not a level is a target to `EnvFilter` (all its
/// events, nothing else's), so a misspelt level (`inof`, `warning`) would silence the log:
/// a word that close to a level is refused too.
fn parse_log_filter(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    const EXAMPLE: &str = "e.g. info or warn,msghash_common=debug";
    tracing_subscriber::EnvFilter::try_new(s)
        .map_err(|e| format!("{s:?} is not a log filter ({e}); {EXAMPLE}"))?;
    for word in s.split(',').map(str::trim) {
        if word.contains(['=', '[', ':']) || LEVELS.iter().any(|l| word.eq_ignore_ascii_case(l)) {
            continue;
        }
        let lower = word.to_ascii_lowercase();
        if let Some(level) = LEVELS
            .iter()
            .find(|l| lower.starts_with(*l) || strsim::levenshtein(&lower, l) <= 2)
        {
            return Err(format!(
                "{word:?} is not a level (did you mean {level}?): a bare word is a target, which \
                 would log only its events (write {word}=trace to mean that); {EXAMPLE}"
            ));
        }
    }
    Ok(s.to_owned())
}

/// Log output.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format on stdout: json (one object per line) or text.
    #[arg(long, global = true, env = "MSGHASH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax (e.g. info,msghash_common=debug).
    #[arg(long, global = true, env = "MSGHASH_LOG", default_value = "info",
          value_parser = parse_log_filter)]
    pub log: String,
    /// Log 1 in N routine `request` lines (2xx, 3xx, 404); other 4xx and 5xx lines are
    /// not sampled, and the HTTP metrics count every request. 1: every line.
    #[arg(long, global = true, env = "MSGHASH_LOG_SAMPLE", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub log_sample: u32,
    /// Most routine `request` lines logged per second, process-wide, after the sampling,
    /// and most lines of client errors (every other 4xx); past a cap they are skipped, and
    /// the next line of their kind logged counts them (`skipped`). Every 5xx line is
    /// always logged. 0: no cap.
    #[arg(long, global = true, env = "MSGHASH_LOG_RATE", default_value_t = DEFAULT_LOG_RATE,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub log_rate: u32,
}

/// The default of `MSGHASH_LOG_RATE`: every request line of a service answering up to a
/// thousand requests per second; above that, a thousand a second, and the metrics for the
/// rest (docs/observability.md).
pub const DEFAULT_LOG_RATE: u32 = 1000;

#[cfg(all(test, feature = "kafka", feature = "scylla"))]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_log_filter_that_would_silence_the_log_by_a_typo_is_refused() {
        for good in [
            "info",
            "WARN",
            "off",
            "warn,msghash_common=debug",
            "fjall",
            "mio",
            "tracing",
            "h2=trace",
            "hyper::proto=debug",
            "warning=trace",
        ] {
            assert_eq!(parse_log_filter(good).as_deref(), Ok(good), "{good}");
        }
        for (bad, named) in [
            ("inof", "info"),
            ("warning", "warn"),
            ("debgu", "debug"),
            ("info,errror", "error"),
            ("[[[bad", "not a log filter"),
        ] {
            let err = parse_log_filter(bad).expect_err(bad);
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        scylla: ScyllaArgs,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        http: HttpArgs,
    }

    #[test]
    fn defaults_are_a_local_stack() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults parse");
        assert_eq!(cli.kafka.partitions.get(), 8);
        assert_eq!(cli.scylla.scylla_nodes, vec!["127.0.0.1:9042"]);
        assert!(matches!(cli.tls.source(), CertSource::Generated { .. }));
        assert_eq!(cli.http.limits(), crate::http::ConnectionLimits::default());
    }

    #[test]
    fn bad_values_are_refused_with_the_setting_named() {
        for args in [
            vec!["x", "--partitions", "0"],
            vec!["x", "--keyspace", "Bad-Name"],
            vec!["x", "--keyspace-replication", "{'a':1}; DROP"],
            vec!["x", "--tls-cert", "only-cert.pem"],
            vec!["x", "--scylla-consistency", "SOMETIMES"],
            vec!["x", "--scylla-consistency", "ONE"],
            vec!["x", "--scylla-consistency", "local_one"],
            vec!["x", "--topic-min-isr", "0"],
            vec!["x", "--http-header-timeout-ms", "0"],
            vec!["x", "--http-max-connections", "0"],
            vec!["x", "--http2-max-streams", "0"],
            vec!["x", "--rate-limit-per-sec", "0"],
            vec!["x", "--rate-limit-burst", "5"],
            vec!["x", "--trusted-proxies", "10.0.0.0/33"],
        ] {
            let err = Cli::try_parse_from(&args).expect_err("must be refused");
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let flag = args[1];
            let text = err.to_string();
            assert!(
                text.contains(flag) || text.contains("--tls-key"),
                "{args:?}: {text}"
            );
        }
    }

    #[test]
    fn a_consistency_below_quorum_is_refused_because_it_breaks_read_your_writes() {
        for level in ["ONE", "LOCAL_ONE"] {
            let err =
                Cli::try_parse_from(["x", "--scylla-consistency", level]).expect_err("refused");
            assert!(err.to_string().contains("breaks read-your-writes"), "{err}");
        }
        for (level, want) in [
            ("LOCAL_QUORUM", ConsistencyArg::LocalQuorum),
            ("quorum", ConsistencyArg::Quorum),
            ("ALL", ConsistencyArg::All),
        ] {
            let cli = Cli::try_parse_from(["x", "--scylla-consistency", level]).expect(level);
            assert_eq!(cli.scylla.scylla_consistency, want);
        }
    }
}
