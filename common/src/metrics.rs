//! Prometheus metrics and per-request observability, shared by every service.
//!
//! - [`install`] puts one Prometheus recorder (the `metrics` crate's global recorder) in
//!   the process; every `metrics::counter!`/`histogram!`/`gauge!` anywhere in it lands
//!   there. It is idempotent, so the standalone binary, which composes three services in
//!   one process, has one registry: the metric names in [`names`] never collide, and the
//!   `service` label of the HTTP metrics tells the services apart.
//! - [`routes`] serves the registry as Prometheus text at `GET /metrics`.
//! - [`observe`] wraps a router: request id (`x-request-id`, honoured or generated, always
//!   echoed), one log event per request, and the two HTTP metrics.
//! - [`exposition`] checks and reads the text format (tests, diagnostics).

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tracing::Instrument;

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
    /// Counter: events written to the read model.
    pub const PROJECTOR_EVENTS_APPLIED_TOTAL: &str = "msghash_projector_events_applied_total";
    /// Counter: records that did not decode and were skipped.
    pub const PROJECTOR_DEAD_LETTERED_TOTAL: &str = "msghash_projector_dead_lettered_total";
    /// Histogram: one projector step (decode, apply, commit), seconds.
    pub const PROJECTOR_BATCH_DURATION_SECONDS: &str = "msghash_projector_batch_duration_seconds";
    /// Gauge `{partition}`: records of the partition not yet applied to the read model.
    pub const PROJECTOR_LAG: &str = "msghash_projector_lag";
    /// Counter `{outcome}`: read-your-writes waits of a GET that missed, by outcome
    /// (`caught_up`, `behind`, `error`).
    pub const QUERY_BARRIER_WAITS_TOTAL: &str = "msghash_query_barrier_waits_total";

    /// All of them, in the order above.
    pub const ALL: [&str; 9] = [
        HTTP_REQUESTS_TOTAL,
        HTTP_REQUEST_DURATION_SECONDS,
        INGEST_PRODUCE_DURATION_SECONDS,
        INGEST_PRODUCE_FAILURES_TOTAL,
        PROJECTOR_EVENTS_APPLIED_TOTAL,
        PROJECTOR_DEAD_LETTERED_TOTAL,
        PROJECTOR_BATCH_DURATION_SECONDS,
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

/// The request id header, read from the request and always set on the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being served, in the request's extensions for handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The `route` label of a request that matched no route (the 404 fallback).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Wraps every route of `router` (and its fallbacks: add them first) with the request
/// observer: request id, one log event per request, the HTTP metrics labelled `service`.
pub fn observe(router: Router, service: &'static str) -> Router {
    router.layer(axum::middleware::from_fn_with_state(service, track))
}

async fn track(State(service): State<&'static str>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(client_request_id)
        .unwrap_or_else(new_request_id);
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = next.run(request).instrument(span).await;
    let elapsed = started.elapsed();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    let status = response.status().as_u16();
    ::metrics::counter!(
        names::HTTP_REQUESTS_TOTAL,
        "service" => service,
        "route" => route.clone(),
        "method" => method,
        "status" => status.to_string(),
    )
    .increment(1);
    ::metrics::histogram!(
        names::HTTP_REQUEST_DURATION_SECONDS,
        "service" => service,
        "route" => route.clone(),
        "method" => method,
    )
    .record(elapsed.as_secs_f64());
    let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    // Probes come every few seconds from orchestrators and scrapers: debug, not info.
    if route.starts_with("/health/") || route == "/metrics" {
        tracing::debug!(request_id = %id, service, method, route, status, latency_ms, "request");
    } else {
        tracing::info!(request_id = %id, service, method, route, status, latency_ms, "request");
    }
    response
}

/// A client's `x-request-id` is kept when it is 1–128 visible ASCII characters.
fn client_request_id(value: &HeaderValue) -> Option<String> {
    let bytes = value.as_bytes();
    let ok = (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic);
    ok.then(|| String::from_utf8_lossy(bytes).into_owned())
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The standard methods by name; anything else is `other`, so a client cannot grow the
/// label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Reading the Prometheus text exposition format (version 0.0.4) strictly: every sample
/// must belong to a family declared by a `# TYPE` line before it, names and labels must be
/// well-formed, values must be numbers, histogram buckets must carry `le`.
pub mod exposition {
    use std::collections::BTreeMap;

    /// One sample line.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// A parsed exposition: the declared families (name → type) and the samples.
    #[derive(Debug, Clone, Default)]
    pub struct Exposition {
        pub types: BTreeMap<String, String>,
        pub samples: Vec<Sample>,
    }

    impl Exposition {
        /// The type of family `name` (`counter`, `gauge`, `histogram`, ...), if declared.
        pub fn type_of(&self, name: &str) -> Option<&str> {
            self.types.get(name).map(String::as_str)
        }

        /// The sum of the samples named `name` whose labels include every pair of `labels`
        /// (0 when there is none).
        pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            self.matching(name, labels).map(|s| s.value).sum()
        }

        /// Whether a sample named `name` with these labels exists.
        pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
            self.matching(name, labels).next().is_some()
        }

        /// The samples named `name` whose labels include every pair of `labels`.
        pub fn matching<'a>(
            &'a self,
            name: &'a str,
            labels: &'a [(&'a str, &'a str)],
        ) -> impl Iterator<Item = &'a Sample> + 'a {
            self.samples.iter().filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
        }
    }

    const TYPES: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];

    fn valid_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn valid_label_name(s: &str) -> bool {
        valid_name(s) && !s.contains(':')
    }

    fn parse_value(s: &str) -> Option<f64> {
        match s {
            "+Inf" | "Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => s.parse().ok(),
        }
    }

    /// The family a sample name belongs to.
    fn family<'a>(types: &BTreeMap<String, String>, name: &'a str) -> Option<&'a str> {
        if types.contains_key(name) {
            return Some(name);
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if matches!(
                    types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                ) {
                    return Some(base);
                }
            }
        }
        None
    }

    fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        let mut rest = text;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let name = rest[..eq].trim();
            if !valid_label_name(name) {
                return Err(format!("bad label name {name:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => return Err("bad escape in label value".into()),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(name.to_owned(), value).is_some() {
                return Err(format!("label {name} repeated"));
            }
            rest = &rest[end + 1..];
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("labels not separated by ','".into());
            }
        }
    }

    /// Parses `text`, naming the first offending line on error.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                match words.next() {
                    Some("TYPE") => {
                        let name = words.next().ok_or_else(|| at("TYPE without name".into()))?;
                        let kind = words.next().ok_or_else(|| at("TYPE without type".into()))?;
                        if !valid_name(name) || !TYPES.contains(&kind) || words.next().is_some() {
                            return Err(at("malformed TYPE".into()));
                        }
                        if out.types.insert(name.into(), kind.into()).is_some() {
                            return Err(at(format!("{name} declared twice")));
                        }
                    }
                    Some("HELP") => {
                        let name = words.next().ok_or_else(|| at("HELP without name".into()))?;
                        if !valid_name(name) {
                            return Err(at("malformed HELP".into()));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !valid_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = match line[name_end..].strip_prefix('{') {
                Some(after) => parse_labels(after).map_err(at)?,
                None => (Default::default(), &line[name_end..]),
            };
            let mut fields = rest.split_whitespace();
            let value = fields
                .next()
                .and_then(parse_value)
                .ok_or_else(|| at("bad value".into()))?;
            if let Some(ts) = fields.next() {
                ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
            }
            if fields.next().is_some() {
                return Err(at("trailing text".into()));
            }
            let family = family(&out.types, name)
                .ok_or_else(|| at(format!("{name} has no # TYPE line before it")))?;
            if name.ends_with("_bucket")
                && out.type_of(family) == Some("histogram")
                && !labels.contains_key("le")
            {
                return Err(at("histogram bucket without le".into()));
            }
            out.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_well_formed_text_and_refuses_the_rest() {
            let text = "# HELP a_total A.\n# TYPE a_total counter\n\
                        a_total{x=\"1\",y=\"q\\\"uo\\\\te\"} 3\n\
                        # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                        h_sum 0.7\nh_count 2\n";
            let e = parse(text).expect("valid");
            assert_eq!(e.type_of("a_total"), Some("counter"));
            assert_eq!(e.sum("a_total", &[("x", "1")]), 3.0);
            assert_eq!(e.samples[0].labels["y"], "q\"uo\\te");
            assert_eq!(e.sum("h_count", &[]), 2.0);
            for bad in [
                "a_total 1\n",
                "# TYPE a counter\na{x=1} 1\n",
                "# TYPE a counter\na{x=\"1\"} one\n",
                "# TYPE a wrong\n",
                "# TYPE h histogram\nh_bucket 1\n",
                "# TYPE 1a counter\n",
            ] {
                assert!(parse(bad).is_err(), "{bad:?} must be refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> Router {
        install();
        let routes = Router::new()
            .route("/things/{id}", get(|| async { "thing" }))
            .merge(routes());
        observe(crate::http::with_error_fallbacks(routes), "unit")
    }

    async fn call(app: &Router, request: axum::http::Request<Body>) -> Response {
        app.clone().oneshot(request).await.expect("infallible")
    }

    async fn scrape(app: &Router) -> exposition::Exposition {
        let response = call(
            app,
            axum::http::Request::get("/metrics")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
        exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[tokio::test]
    async fn requests_get_an_id_and_count_under_their_route_template() {
        let app = app();
        let labels = [
            ("service", "unit"),
            ("route", "/things/{id}"),
            ("method", "GET"),
            ("status", "200"),
        ];
        let before = scrape(&app).await.sum(names::HTTP_REQUESTS_TOTAL, &labels);

        let response = call(
            &app,
            axum::http::Request::get("/things/42")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        let id = response.headers()[&REQUEST_ID].to_str().expect("ascii");
        assert_eq!(id.len(), 36, "a generated uuid: {id}");

        // A client's id is echoed; a malformed one is replaced.
        let response = call(
            &app,
            axum::http::Request::get("/things/7")
                .header(&REQUEST_ID, "client-id-1")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(response.headers()[&REQUEST_ID], "client-id-1");
        let response = call(
            &app,
            axum::http::Request::get("/nowhere")
                .header(&REQUEST_ID, "has space")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(response.status(), 404);
        assert_ne!(response.headers()[&REQUEST_ID], "has space");
        let response = call(
            &app,
            axum::http::Request::delete("/things/1")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(response.status(), 405);

        let after = scrape(&app).await;
        assert!(
            after.sum(names::HTTP_REQUESTS_TOTAL, &labels) >= before + 2.0,
            "two GETs counted under the template"
        );
        assert!(
            !after.has(names::HTTP_REQUESTS_TOTAL, &[("route", "/things/42")]),
            "never the raw path"
        );
        assert!(after.has(
            names::HTTP_REQUESTS_TOTAL,
            &[("route", UNMATCHED_ROUTE), ("status", "404")]
        ));
        assert!(after.has(
            names::HTTP_REQUESTS_TOTAL,
            &[("method", "DELETE"), ("status", "405")]
        ));
        assert_eq!(after.type_of(names::HTTP_REQUESTS_TOTAL), Some("counter"));
        assert_eq!(
            after.type_of(names::HTTP_REQUEST_DURATION_SECONDS),
            Some("histogram")
        );
        let bucket = format!("{}_bucket", names::HTTP_REQUEST_DURATION_SECONDS);
        for le in ["0.001", "10", "+Inf"] {
            assert!(
                after.has(
                    &bucket,
                    &[("service", "unit"), ("route", "/things/{id}"), ("le", le)]
                ),
                "bucket le={le}"
            );
        }
    }

    #[test]
    fn method_and_request_id_labels_stay_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        let odd = Method::from_bytes(b"BREW").expect("method");
        assert_eq!(method_label(&odd), "other");
        assert!(client_request_id(&HeaderValue::from_static("abc-123")).is_some());
        assert!(client_request_id(&HeaderValue::from_static("")).is_none());
        let long = "x".repeat(129);
        assert!(client_request_id(&HeaderValue::from_str(&long).expect("value")).is_none());
    }
}
