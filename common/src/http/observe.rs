//! What wraps every route of every service, built from tower-http's layers, outermost first:
//! - a client's malformed `x-request-id` is dropped, then [`SetRequestIdLayer`] keeps a
//!   valid one or generates a UUID, and [`PropagateRequestIdLayer`] echoes it on the response;
//! - [`TraceLayer`] runs the request inside a `request` span carrying that id, so every event
//!   logged while handling it can be found by it;
//! - [`record`] logs one event per request and counts it in the two HTTP metrics, under the
//!   route template (never the raw path);
//! - a bare error from a layer below (the timeout's 503) gets the JSON `{"err_msg"}` body;
//! - the server's [`super::Guards`] (rate limit, API keys) are enforced, inside all of the
//!   above, so a 401 or 429 is logged, counted and carries the usual headers;
//! - [`TimeoutLayer`] bounds a whole request, so a stalled handler cannot hold a task (the
//!   body's own deadline is [`super::BodyTimeout`], checked where the body is read);
//! - every answer carries `Strict-Transport-Security` and `X-Content-Type-Options: nosniff`,
//!   and `Cache-Control: no-store` unless the handler said otherwise (a found message is
//!   immutable).

use super::ApiError;
use crate::metrics::names;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

/// The request id header, read from the request and always set on the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The `route` label of a request that matched no route (the 404 fallback).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The longest a request may take from its head to its response head, body reading and
/// read-your-writes waits included. Every service's own deadlines are shorter; this is the
/// bound when something below them hangs. Past it: 503 with `Retry-After`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a client may take to send a request body, counted from its head, when the
/// server did not set its own ([`super::BodyTimeout`], `MSGHASH_HTTP_BODY_TIMEOUT_MS`). Past
/// it: 408, and the connection is closed.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// 1 in how many routine `request` lines is logged (see [`set_log_sample`]).
static LOG_SAMPLE: AtomicU32 = AtomicU32::new(1);

/// Logs only 1 in `n` routine `request` lines (2xx, 3xx, 404: `MSGHASH_LOG_SAMPLE`); every
/// other 4xx and every 5xx is always logged, and the HTTP metrics always count every
/// request. 1 (the default) logs every line; 0 is taken as 1. Process-wide.
pub fn set_log_sample(n: u32) {
    LOG_SAMPLE.store(n.max(1), Ordering::Relaxed);
}

/// Whether the `request` line of an answer with `status` is logged.
fn logged(status: u16) -> bool {
    let n = LOG_SAMPLE.load(Ordering::Relaxed);
    if n <= 1 || !(status < 400 || status == 404) {
        return true;
    }
    thread_local! {
        // Per thread, so the workers do not contend on one counter.
        static ROUTINE: Cell<u32> = const { Cell::new(0) };
    }
    ROUTINE.with(|seen| {
        let next = seen.get().wrapping_add(1) % n;
        seen.set(next);
        next == 0
    })
}

/// Wraps every route of `router` (and its fallbacks: add them first) with the layers in the
/// module doc; the HTTP metrics are labelled `service`.
pub fn observe(router: Router, service: &'static str) -> Router {
    router
        .layer(middleware::from_fn(super::guard::enforce))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::map_response(json_error_body))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        ))
        .layer(middleware::from_fn_with_state(service, record))
        // Every request's line (with its status) is logged by `record`; tower-http's own
        // ERROR line per 5xx would flood the log with one more line per shed request under
        // an overload.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::map_request(drop_malformed_request_id))
}

/// A client's `x-request-id` is kept when it is 1–128 visible ASCII characters; any other
/// is removed here, so that the next layer generates one.
async fn drop_malformed_request_id(mut request: Request) -> Request {
    if request
        .headers()
        .get(&REQUEST_ID)
        .is_some_and(|v| !is_valid_request_id(v))
    {
        request.headers_mut().remove(&REQUEST_ID);
    }
    request
}

fn is_valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
}

fn request_id(request: &Request) -> &str {
    request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default()
}

fn request_span(request: &Request) -> tracing::Span {
    tracing::info_span!("request", request_id = %request_id(request))
}

/// One log event and the two HTTP metrics per request.
async fn record(State(service): State<&'static str>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Kept by handle (a reference count), formatted only if the line is logged.
    let id = request.extensions().get::<RequestId>().cloned();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let response = next.run(request).await;
    let elapsed = started.elapsed();
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
    if !logged(status) {
        return response;
    }
    let id = id
        .as_ref()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default();
    let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    // Probes come every few seconds from orchestrators and scrapers: debug, not info.
    if route.starts_with("/health/") || route == "/metrics" {
        tracing::debug!(request_id = %id, service, method, route, status, latency_ms, "request");
    } else {
        tracing::info!(request_id = %id, service, method, route, status, latency_ms, "request");
    }
    response
}

/// A 503 without a body (the timeout layer's) becomes [`ApiError::Unavailable`], so a client
/// sees the same JSON error and `Retry-After` as from any other 503.
async fn json_error_body(response: Response) -> Response {
    if response.status() == StatusCode::SERVICE_UNAVAILABLE
        && !response.headers().contains_key(header::CONTENT_TYPE)
    {
        return ApiError::Unavailable {
            retry_after_secs: 1,
        }
        .into_response();
    }
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keeps_every_error_line_and_one_in_n_routine_lines() {
        set_log_sample(4);
        let routine = (0..40).filter(|_| logged(200)).count();
        let not_found = (0..40).filter(|_| logged(404)).count();
        let errors = (0..40)
            .filter(|_| logged(503) && logged(400) && logged(429))
            .count();
        set_log_sample(1);
        let all = (0..40).filter(|_| logged(200)).count();
        assert_eq!((routine, not_found, errors, all), (10, 10, 40, 40));
    }

    #[test]
    fn method_and_request_id_labels_stay_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        let odd = Method::from_bytes(b"BREW").expect("method");
        assert_eq!(method_label(&odd), "other");
        assert!(is_valid_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!is_valid_request_id(&HeaderValue::from_static("")));
        let long = "x".repeat(129);
        assert!(!is_valid_request_id(
            &HeaderValue::from_str(&long).expect("value")
        ));
    }
}
