//! Prometheus metrics and per-request observability, shared by every service.
//!
//! - [`install`] puts one Prometheus recorder (the `metrics` crate's global recorder) in
//!   the process; every `metrics::counter!`/`histogram!`/`gauge!` anywhere in it lands
//!   there. It is idempotent, so the standalone binary, which composes three services in
//!   one process, has one registry: the metric names in [`names`] never collide, and the
//!   `service` label of the HTTP metrics tells the services apart.
//! - [`routes`] serves the registry as Prometheus text at `GET /metrics`.
//!
//! The HTTP metrics are recorded per request by [`crate::http::observe`].

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Every metric msghash exports. Dashboards and alerts depend on these names and labels.
pub mod names {
    /// Counter `{service, route, method, status}`: HTTP requests answered.
    pub const HTTP_REQUESTS_TOTAL: &str = "msghash_http_requests_total";
    /// Histogram `{service, route, method}`: time to the response head, seconds.
    pub const HTTP_REQUEST_DURATION_SECONDS: &str = "msghash_http_request_duration_seconds";
    /// Histogram: time from the first append attempt to the log's acknowledgement.
    pub const INGEST_PRODUCE_DURATION_SECONDS: &str = "msghash_ingest_produce_duration_seconds";
    /// Counter: appends not acknowledged within the request deadline (each one a 503).
    pub const INGEST_PRODUCE_FAILURES_TOTAL: &str = "msghash_ingest_produce_failures_total";
    /// Counter: appends the embedded event log shed because its write queue was full (each
    /// one a 503 with `Retry-After`). Standalone `msghash` only.
    pub const WRITE_SHED_TOTAL: &str = "msghash_write_shed_total";
    /// Counter: events written to the read model.
    pub const PROJECTOR_EVENTS_APPLIED_TOTAL: &str = "msghash_projector_events_applied_total";
    /// Counter: records that did not decode and were skipped.
    pub const PROJECTOR_DEAD_LETTERED_TOTAL: &str = "msghash_projector_dead_lettered_total";
    /// Histogram: one projector step (decode, apply, commit), seconds.
    pub const PROJECTOR_BATCH_DURATION_SECONDS: &str = "msghash_projector_batch_duration_seconds";
    /// Gauge: partitions held back at a poison record whose dead letter cannot be written.
    pub const PROJECTOR_HELD_PARTITIONS: &str = "msghash_projector_held_partitions";
    /// Gauge `{partition}`: records of the partition not yet applied to the read model.
    pub const PROJECTOR_LAG: &str = "msghash_projector_lag";
    /// Gauge: HTTPS connections open now (all of the process's listeners).
    pub const HTTP_OPEN_CONNECTIONS: &str = "msghash_http_open_connections";
    /// Counter: connections closed on accept because `MSGHASH_HTTP_MAX_CONNECTIONS` were open.
    pub const HTTP_REFUSED_CONNECTIONS_TOTAL: &str = "msghash_http_refused_connections_total";
    /// Counter: requests refused with 429 by the per-client rate limit.
    pub const HTTP_RATE_LIMITED_TOTAL: &str = "msghash_http_rate_limited_total";
    /// Counter `{outcome}`: read-your-writes waits of a GET that missed, by outcome
    /// (`caught_up`, `behind`, `error`).
    pub const QUERY_BARRIER_WAITS_TOTAL: &str = "msghash_query_barrier_waits_total";

    /// All of them, in the order above.
    pub const ALL: [&str; 14] = [
        HTTP_REQUESTS_TOTAL,
        HTTP_REQUEST_DURATION_SECONDS,
        HTTP_OPEN_CONNECTIONS,
        HTTP_REFUSED_CONNECTIONS_TOTAL,
        HTTP_RATE_LIMITED_TOTAL,
        INGEST_PRODUCE_DURATION_SECONDS,
        INGEST_PRODUCE_FAILURES_TOTAL,
        WRITE_SHED_TOTAL,
        PROJECTOR_EVENTS_APPLIED_TOTAL,
        PROJECTOR_DEAD_LETTERED_TOTAL,
        PROJECTOR_BATCH_DURATION_SECONDS,
        PROJECTOR_HELD_PARTITIONS,
        PROJECTOR_LAG,
        QUERY_BARRIER_WAITS_TOTAL,
    ];
}

/// Upper bounds (seconds) of every histogram's buckets: Prometheus histograms, so that
/// `histogram_quantile` aggregates across instances.
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often the recorder drains its histogram buffers between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether [`install`] has run: metric handles taken before it count nowhere.
pub fn installed() -> bool {
    HANDLE.get().is_some()
}

/// Installs the process's Prometheus recorder (once; later calls return the same handle).
///
/// If another global recorder was installed first (never in msghash's binaries), the
/// handle renders an empty registry and a warning is logged.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = match PrometheusBuilder::new().set_buckets(&BUCKETS) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "histogram buckets refused; using summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(e) = ::metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "a metrics recorder was already installed");
        }
        describe();
        let upkeep = handle.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP);
                upkeep.run_upkeep();
            })
        {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    use names::*;
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests answered");
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from receiving a request to its response head"
    );
    describe_histogram!(
        INGEST_PRODUCE_DURATION_SECONDS,
        Unit::Seconds,
        "Time from the first append attempt to the event log's acknowledgement"
    );
    describe_counter!(
        INGEST_PRODUCE_FAILURES_TOTAL,
        "Appends not acknowledged within the request deadline"
    );
    describe_counter!(
        WRITE_SHED_TOTAL,
        "Appends shed because the embedded event log's write queue was full"
    );
    describe_counter!(
        PROJECTOR_EVENTS_APPLIED_TOTAL,
        "Events written to the read model"
    );
    describe_counter!(
        PROJECTOR_DEAD_LETTERED_TOTAL,
        "Undecodable records skipped by the projector"
    );
    describe_histogram!(
        PROJECTOR_BATCH_DURATION_SECONDS,
        Unit::Seconds,
        "Time of one projector step: decode, apply, commit"
    );
    describe_gauge!(
        PROJECTOR_HELD_PARTITIONS,
        "Partitions held back at a poison record whose dead letter cannot be written"
    );
    describe_gauge!(
        PROJECTOR_LAG,
        "Records of the partition not yet applied to the read model"
    );
    describe_counter!(
        QUERY_BARRIER_WAITS_TOTAL,
        "Read-your-writes waits of GETs that missed, by outcome"
    );
}

/// The registry as Prometheus text (installing the recorder if needed).
pub fn render() -> String {
    install().render()
}

/// Content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
pub fn routes() -> Router {
    Router::new().route(
        "/metrics",
        get(|| async { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()).into_response() }),
    )
}
