//! What wraps every route of every service: ONE middleware, [`record`], around tower-http's
//! [`TimeoutLayer`]. Per request, in order:
//! - a client's `x-request-id` is kept when valid (1-128 visible ASCII characters), else a
//!   UUID is generated ([`MakeRequestUuidV4`]); it is set on the request (header and
//!   [`RequestId`] extension) and echoed on the response;
//! - the handler runs inside a `request` span carrying that id, so every event logged while
//!   handling it can be found by it;
//! - the server's [`super::Guards`] (rate limit, API keys) may refuse it
//!   ([`super::guard::refusal`]): the 401 or 429 is logged, counted and carries the usual
//!   headers like any answer;
//! - [`TimeoutLayer`] bounds a whole request, so a stalled handler cannot hold a task (the
//!   body's own deadline is [`super::BodyTimeout`], checked where the body is read); its
//!   bare 503 gets the JSON `{"err_msg"}` body and `Retry-After`;
//! - a handler that panics (routed, or a front's) answers 500 with the fixed
//!   `{"err_msg":"Internal server error"}`, never the panic's text, and the connection goes
//!   on; the error line names the service, the panic hook writes the panic to stderr;
//! - every answer carries `Strict-Transport-Security` and `X-Content-Type-Options: nosniff`,
//!   and `Cache-Control: no-store` unless the handler said otherwise (a found message is
//!   immutable);
//! - one `request` event is logged (sampled: [`set_log_sample`]; at most so many per
//!   second: [`set_log_rate`]) and the request is counted
//!   in the two HTTP metrics, under the route template (never the raw path).
//!
//! A [`Front`] may answer a request before routing (the query's cached found messages, and
//! the ingest's `POST /messages`): the request still gets its id, the guards (before the
//! front looks anything up), the headers, the metrics and the `request` line ([`finish`] is
//! the same for both), but neither the routing nor a span (what is logged while answering
//! it carries the id itself); a front's handler gets the same [`REQUEST_TIMEOUT`] (a
//! cached answer needs none).
//!
//! It used to be ten layers (tower-http's request-id, trace and set-header layers and four
//! axum middlewares). axum clones a route's whole layered service for every request, and
//! every axum middleware clones and boxes the stack below it again: about a third of the
//! instructions of a GET hit went to those clones and their frees (docs/performance.md).

use super::ApiError;
use crate::metrics::names;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::future::{BoxFuture, Either, FutureExt};
use metrics::{Counter, Histogram};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::num::NonZeroU32;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tower_http::request_id::{MakeRequestId, RequestId};
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

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

/// Logs only 1 in `n` routine `request` lines (2xx, 3xx, 404: `MSGHASH_LOG_SAMPLE`); client
/// errors (every other 4xx) and server errors (5xx) are not sampled, and the HTTP metrics
/// always count every request. 1 (the default) logs every line; 0 is taken as 1.
/// Process-wide.
pub fn set_log_sample(n: u32) {
    LOG_SAMPLE.store(n.max(1), Ordering::Relaxed);
}

/// The caps on `request` lines per second (see [`set_log_rate`]); `None`: no cap.
static LOG_RATE: RwLock<Option<Caps>> = RwLock::new(None);
/// Lines not logged because of a cap since the last one of their kind was logged: routine
/// lines, client error lines.
static OVER_RATE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

type RateLimiter = governor::DefaultDirectRateLimiter;

/// One cap for the routine lines, one for the client errors' lines.
struct Caps([RateLimiter; 2]);

/// Logs at most `per_second` routine `request` lines (2xx, 3xx, 404) per second, after
/// [`set_log_sample`]'s sampling, and at most `per_second` lines of client errors (every
/// other 4xx), each process-wide (`MSGHASH_LOG_RATE`); 0: no cap. Past a cap a line is
/// skipped and counted, and the next line of its kind logged says how many were skipped
/// before it (`skipped`). So a client sending nothing but refused requests (429, 405, 415,
/// ...) cannot make the log, and a stdout that drains slower than it, its amplifier. Every
/// 5xx is always logged, and the HTTP metrics always count every request.
pub fn set_log_rate(per_second: u32) {
    let caps = NonZeroU32::new(per_second).map(|n| {
        let cap = || governor::RateLimiter::direct(governor::Quota::per_second(n));
        Caps([cap(), cap()])
    });
    *LOG_RATE.write().unwrap_or_else(PoisonError::into_inner) = caps;
    for over in &OVER_RATE {
        over.store(0, Ordering::Relaxed);
    }
}

/// What to do with the `request` line of an answer with `status`.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Not logged (sampled out, or over the rate).
    Skip,
    /// Logged; `skipped` lines of its kind before it were over the rate.
    Log { skipped: u64 },
}

/// Whether the `request` line of an answer with `status` is logged. A `probe`'s line (a
/// health check or a scrape, logged at debug) is sampled but not capped: it would spend
/// the cap, and count as skipped, while the default filter does not even show it.
fn logged(status: u16, probe: bool) -> Line {
    if status >= 500 {
        return Line::Log { skipped: 0 };
    }
    let routine = status < 400 || status == 404;
    let n = LOG_SAMPLE.load(Ordering::Relaxed);
    if routine && n > 1 {
        thread_local! {
            // Per thread, so the workers do not contend on one counter.
            static ROUTINE: Cell<u32> = const { Cell::new(0) };
        }
        let sampled = ROUTINE.with(|seen| {
            let next = seen.get().wrapping_add(1) % n;
            seen.set(next);
            next == 0
        });
        if !sampled {
            return Line::Skip;
        }
    }
    if probe {
        return Line::Log { skipped: 0 };
    }
    let kind = usize::from(!routine);
    let caps = LOG_RATE.read().unwrap_or_else(PoisonError::into_inner);
    match caps.as_ref() {
        None => Line::Log { skipped: 0 },
        Some(Caps(caps)) if caps[kind].check().is_ok() => Line::Log {
            skipped: OVER_RATE[kind].swap(0, Ordering::Relaxed),
        },
        Some(_) => {
            OVER_RATE[kind].fetch_add(1, Ordering::Relaxed);
            Line::Skip
        }
    }
}

/// Wraps every route of `router` (and its fallbacks: add them first) as the module doc
/// says; the HTTP metrics are labelled `service`.
pub fn observe(router: Router, service: &'static str) -> Router {
    router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::from_fn_with_state(service, record))
}

fn is_valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
}

/// The request's id: the client's when valid, else a new one; set on the request as its
/// `x-request-id` header and its [`RequestId`] extension.
fn assign_request_id(request: &mut Request) -> HeaderValue {
    let id = match request.headers().get(&REQUEST_ID) {
        Some(id) if is_valid_request_id(id) => Some(id.clone()),
        _ => MakeRequestUuidV4
            .make_request_id(request)
            .map(|id| id.into_header_value()),
    };
    match id {
        Some(id) => {
            request.headers_mut().insert(REQUEST_ID, id.clone());
            request.extensions_mut().insert(RequestId::new(id.clone()));
            id
        }
        None => {
            request.headers_mut().remove(&REQUEST_ID);
            HeaderValue::from_static("")
        }
    }
}

/// Makes the id of a request that came without a valid one: formatted as a version-4 UUID
/// whose first 60 bits are random (once per process) and whose last 62 are the process's
/// request count put through [`scramble`], a permutation keyed once per process. So ids
/// are unique in a process and, with overwhelming odds, across processes, without a
/// `getrandom` call per request (tower-http's `MakeRequestUuid` makes one each time), and
/// ids do not tell a client how many requests its replica answered. An id
/// identifies a request in the logs; nothing relies on it being secret.
#[derive(Clone, Copy)]
struct MakeRequestUuidV4;

impl MakeRequestId for MakeRequestUuidV4 {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        static PROCESS: OnceLock<([u8; 8], u64)> = OnceLock::new();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let (prefix, key) = PROCESS.get_or_init(|| {
            let random = uuid::Uuid::new_v4().into_bytes();
            let mut prefix = [0; 8];
            prefix.copy_from_slice(&random[..8]);
            let mut key = [0; 8];
            key.copy_from_slice(&random[8..]);
            (prefix, u64::from_le_bytes(key))
        });
        let tail = scramble(COUNT.fetch_add(1, Ordering::Relaxed), *key);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(prefix);
        bytes[8..].copy_from_slice(&tail.to_be_bytes());
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = id.hyphenated().encode_lower(&mut text);
        HeaderValue::from_str(text).ok().map(RequestId::new)
    }
}

/// A keyed permutation of the 62-bit numbers (`n`'s low 62 bits; the result's top two bits
/// are 0, for the UUID's variant bits): four Feistel rounds on two 31-bit halves, each
/// round's function being splitmix64's finaliser of the half and a round key drawn from
/// `key`. A Feistel network is a bijection whatever its round function, so distinct counts
/// give distinct results; without the key they cannot be undone, so two ids do not tell
/// how many requests came between them.
fn scramble(n: u64, key: u64) -> u64 {
    const HALF: u64 = (1 << 31) - 1;
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let (mut left, mut right) = ((n >> 31) & HALF, n & HALF);
    for round in 1..=4u64 {
        let round_key = mix(key.wrapping_add(round.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        (left, right) = (right, left ^ (mix(right ^ round_key) & HALF));
    }
    (left << 31) | right
}

/// The handles of the HTTP metrics of one service, route and method, with the counters of
/// the statuses seen so far.
struct RouteMetrics {
    service: &'static str,
    method: &'static str,
    duration: Histogram,
    requests: Vec<(u16, Counter)>,
}

thread_local! {
    /// Per worker thread, by route template: registering a metric builds and hashes its
    /// label set and takes the registry's lock, which cost about 3 % of a GET hit; a kept
    /// handle is one atomic add. Bounded: routes are templates, methods and statuses few.
    static ROUTE_METRICS: RefCell<HashMap<Box<str>, Vec<RouteMetrics>>> =
        RefCell::new(HashMap::new());
}

/// Counts a request in the two HTTP metrics.
fn count(service: &'static str, route: &str, method: &'static str, status: u16, seconds: f64) {
    let register_counter = || {
        ::metrics::counter!(
            names::HTTP_REQUESTS_TOTAL,
            "service" => service,
            "route" => route.to_owned(),
            "method" => method,
            "status" => status.to_string(),
        )
    };
    let register_histogram = || {
        ::metrics::histogram!(
            names::HTTP_REQUEST_DURATION_SECONDS,
            "service" => service,
            "route" => route.to_owned(),
            "method" => method,
        )
    };
    if !crate::metrics::installed() {
        // A handle taken before the recorder exists would count nowhere for ever.
        register_counter().increment(1);
        register_histogram().record(seconds);
        return;
    }
    ROUTE_METRICS.with_borrow_mut(|routes| {
        if !routes.contains_key(route) {
            routes.insert(route.into(), Vec::new());
        }
        let Some(methods) = routes.get_mut(route) else {
            return;
        };
        let index = match methods
            .iter()
            .position(|m| m.service == service && m.method == method)
        {
            Some(i) => i,
            None => {
                methods.push(RouteMetrics {
                    service,
                    method,
                    duration: register_histogram(),
                    requests: Vec::new(),
                });
                methods.len() - 1
            }
        };
        let metrics = &mut methods[index];
        metrics.duration.record(seconds);
        match metrics.requests.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.increment(1),
            None => {
                let counter = register_counter();
                counter.increment(1);
                metrics.requests.push((status, counter));
            }
        }
    });
}

/// What [`finish`] needs of a request, taken when it came in.
struct Started {
    at: Instant,
    id: HeaderValue,
    method: &'static str,
}

/// Sets the request's id (see [`assign_request_id`]) and notes its method and start.
fn start(request: &mut Request) -> Started {
    Started {
        at: Instant::now(),
        id: assign_request_id(request),
        method: method_label(request.method()),
    }
}

/// The one middleware of every route (see the module doc).
async fn record(State(service): State<&'static str>, mut request: Request, next: Next) -> Response {
    let started = start(&mut request);
    let span =
        tracing::info_span!("request", request_id = %started.id.to_str().unwrap_or_default());
    // A reference count, not a copy of the template.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let response = match super::guard::refusal(&request) {
        Some(refused) => refused,
        None => AssertUnwindSafe(next.run(request).instrument(span.clone()))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| panicked(service)),
    };
    let route = matched
        .as_ref()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    finish(service, route, started, response)
}

/// What every answer gets, routed or given by a [`Front`]: the headers, the count in the
/// HTTP metrics, the `request` line.
fn finish(service: &'static str, route: &str, started: Started, response: Response) -> Response {
    let mut response = json_error_body(response);
    let headers = response.headers_mut();
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    let Started { at, id, method } = started;
    if !headers.contains_key(&REQUEST_ID) && !id.is_empty() {
        headers.insert(REQUEST_ID, id.clone());
    }
    let elapsed = at.elapsed();
    let status = response.status().as_u16();
    count(service, route, method, status, elapsed.as_secs_f64());
    // Probes come every few seconds from orchestrators and scrapers: debug, not info.
    let probe = route.starts_with("/health/") || route == "/metrics";
    let Line::Log { skipped } = logged(status, probe) else {
        return response;
    };
    let id_text = id.to_str().unwrap_or_default();
    let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    // Outside the span: the line carries the request id itself, and formatting the span's
    // context again for every line cost about a tenth of a GET hit (docs/performance.md).
    if probe {
        tracing::debug!(request_id = %id_text, service = %service, method = %method, route = %route, status, latency_ms, "request");
    } else {
        // `None` is not written: the field appears only after skipped lines.
        let skipped = (skipped > 0).then_some(skipped);
        tracing::info!(request_id = %id_text, service = %service, method = %method, route = %route, status, latency_ms, skipped, "request");
    }
    response
}

/// Answers that a service can give before routing, from memory and at once: the query's
/// cached found messages (docs/performance.md, item 16). Routing, the `request` span and
/// the timeout cost about two fifths of such a hit, and none of them is needed for it:
/// nothing is logged while answering it but its `request` line, which carries the id.
///
/// Two steps, with the guards between them, as for a routed request: `route` says, from
/// the request alone, whether the front may answer it and under which route template (the
/// one the router would match: the `route` of the metrics and of the `request` line); the
/// guards then refuse it (401, 429) or let it through, and only then does `answer` look it
/// up. A refused client never reaches what `answer` reads (no timing tells it what is
/// cached). When `answer` has nothing the request is routed, and the guards, having let it
/// through once, are not asked again (a request takes one rate-limit token, not two).
///
/// An answer must be exactly the one the routed handler would give (same status, headers
/// and body). Everything else of [`observe`] still applies: the request id, the headers,
/// the metrics and the `request` line ([`finish`]).
#[derive(Clone)]
pub struct Front {
    service: &'static str,
    answer: Option<(Arc<RouteFn>, Arc<AnswerFn>)>,
    handle: Option<(Arc<RouteFn>, Arc<HandleFn>)>,
}

type RouteFn = dyn Fn(&Request) -> Option<&'static str> + Send + Sync;
type AnswerFn = dyn Fn(&Request) -> Option<Response> + Send + Sync;
type HandleFn = dyn Fn(Request) -> BoxFuture<'static, Response> + Send + Sync;

impl Front {
    /// A front of `service` (the metrics' label). Both functions run on the connection's
    /// task before anything else: they must be cheap and must not block; `route` must not
    /// read what the guards protect.
    pub fn new(
        service: &'static str,
        route: impl Fn(&Request) -> Option<&'static str> + Send + Sync + 'static,
        answer: impl Fn(&Request) -> Option<Response> + Send + Sync + 'static,
    ) -> Front {
        Front {
            service,
            answer: Some((Arc::new(route), Arc::new(answer))),
            handle: None,
        }
    }

    /// A front of `service` that takes every request `route` names (once the guards let it
    /// through) and answers it with `handle`, never routing it: the ingest's `POST
    /// /messages` (docs/performance.md, item 19). `handle` gets the request with its id
    /// set, and must answer exactly as the routed handler would and log with the request's
    /// id (no span is around it). [`REQUEST_TIMEOUT`] bounds it as it bounds a routed
    /// request: past it, 503 with `Retry-After`.
    pub fn handler<F>(
        service: &'static str,
        route: impl Fn(&Request) -> Option<&'static str> + Send + Sync + 'static,
        handle: impl Fn(Request) -> F + Send + Sync + 'static,
    ) -> Front
    where
        F: std::future::Future<Output = Response> + Send + 'static,
    {
        Front {
            service,
            answer: None,
            handle: Some((
                Arc::new(route),
                Arc::new(move |request| Box::pin(handle(request)) as BoxFuture<'static, _>),
            )),
        }
    }

    /// This front with what `other` adds: its answers when this one has none, its handler
    /// when this one has none (the standalone binary's front: query's and ingest's). The
    /// metrics' label stays this one's.
    pub fn with(self, other: Front) -> Front {
        Front {
            service: self.service,
            answer: self.answer.or(other.answer),
            handle: self.handle.or(other.handle),
        }
    }
}

/// `router` behind an optional [`Front`]: the service the server runs.
pub fn fronted(front: Option<Front>, router: Router) -> Fronted {
    Fronted { front, router }
}

/// See [`fronted`].
#[derive(Clone)]
pub struct Fronted {
    front: Option<Front>,
    router: Router,
}

impl<B> tower::Service<axum::http::Request<B>> for Fronted
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Unpin + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        Ready<Result<Response, Infallible>>,
        Either<BoxFuture<'static, Result<Response, Infallible>>, RouterFuture>,
    >;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<Request>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        // Whoever answers without reading the body, the stream still ends as the client
        // sent it (see `FinishOnDrop`), within the body timeout from now (the head); not a
        // body its client sends only after a `100 Continue`.
        let mut request = if request.headers().contains_key(header::EXPECT) {
            request.map(axum::body::Body::new)
        } else {
            let deadline = tokio::time::Instant::now()
                + request
                    .extensions()
                    .get::<super::BodyTimeout>()
                    .map_or(BODY_TIMEOUT, |t| t.0);
            request
                .map(|body| axum::body::Body::new(super::body::FinishOnDrop::new(body, deadline)))
        };
        if let Some(front) = &self.front {
            if let Some((route, handle)) = &front.handle {
                if let Some(route) = route(&request) {
                    let refused = super::guard::refusal(&request);
                    let started = start(&mut request);
                    let service = front.service;
                    if let Some(refused) = refused {
                        return Either::Left(ready(Ok(finish(service, route, started, refused))));
                    }
                    let answer = catch_unwind(AssertUnwindSafe(|| handle(request)));
                    return Either::Right(Either::Left(Box::pin(async move {
                        let Ok(answer) = answer else {
                            return Ok(finish(service, route, started, panicked(service)));
                        };
                        // The same bound as the routed requests' timeout layer, whatever the
                        // handler's own deadlines are set to: past it, the same 503.
                        let answer = tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            AssertUnwindSafe(answer).catch_unwind(),
                        )
                        .await
                        .unwrap_or_else(|_| Ok(StatusCode::SERVICE_UNAVAILABLE.into_response()))
                        .unwrap_or_else(|_| panicked(service));
                        Ok(finish(service, route, started, answer))
                    })));
                }
            }
            if let Some((route, answer)) = &front.answer {
                if let Some(route) = route(&request) {
                    let answer = match super::guard::refusal(&request) {
                        Some(refused) => Some(refused),
                        None => catch_unwind(AssertUnwindSafe(|| answer(&request)))
                            .unwrap_or_else(|_| Some(panicked(front.service))),
                    };
                    if let Some(answer) = answer {
                        let started = start(&mut request);
                        return Either::Left(ready(Ok(finish(
                            front.service,
                            route,
                            started,
                            answer,
                        ))));
                    }
                    // Let through by the guards already (see `Front`).
                    request.extensions_mut().remove::<Arc<super::Guards>>();
                }
            }
        }
        Either::Right(Either::Right(tower::Service::call(
            &mut self.router,
            request,
        )))
    }
}

type RouterFuture = <Router as tower::Service<Request>>::Future;

/// The answer to a request whose handler panicked: 500 with the fixed sentence, never the
/// panic's text (the panic hook has written it to stderr, and the error line says which
/// service). The connection and the server go on.
fn panicked(service: &'static str) -> Response {
    tracing::error!(service, "a request's handler panicked; answered 500");
    ApiError::Internal.into_response()
}

/// A 503 without a body (the timeout layer's) becomes [`ApiError::Unavailable`], so a client
/// sees the same JSON error and `Retry-After` as from any other 503.
fn json_error_body(response: Response) -> Response {
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
    use crate::http::guard::key_file_line;
    use crate::http::{ApiKeys, Guards, KeyScope, RateLimit};
    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use std::net::SocketAddr;
    use tower::ServiceExt;

    /// A front that may answer `/front` and answers when `cached`, counting the answers it
    /// was asked for.
    fn cached_front(cached: bool, asked: Arc<AtomicU32>) -> Front {
        Front::new(
            "unit",
            |request| (request.uri().path() == "/front").then_some("/front"),
            move |_| {
                asked.fetch_add(1, Ordering::Relaxed);
                cached.then(|| "from the front".into_response())
            },
        )
    }

    /// [`cached_front`] around a router whose `/front` says "routed".
    fn front_and_router(cached: bool, asked: Arc<AtomicU32>) -> Fronted {
        let router = observe(
            Router::new().route("/front", get(|| async { "routed" })),
            "unit",
        );
        fronted(Some(cached_front(cached, asked)), router)
    }

    /// Guards that admit only the API key `the-key` (its key file written in `dir`).
    fn keyed_guards(dir: &std::path::Path) -> Arc<Guards> {
        let keys = dir.join("keys");
        std::fs::write(&keys, format!("{}\n", key_file_line("the-key"))).expect("keys");
        Arc::new(Guards {
            api_keys: Some(ApiKeys::load(&keys, KeyScope::All).expect("keys")),
            ..Guards::default()
        })
    }

    fn guarded_get(guards: &Arc<Guards>, key: Option<&str>) -> Request {
        let mut request = Request::builder().uri("/front");
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let mut request = request.body(Body::empty()).expect("request");
        request.extensions_mut().insert(guards.clone());
        let peer: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    }

    async fn body_of(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("body");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    async fn routed_panic() -> &'static str {
        panic!("secret detail of a routed handler")
    }

    async fn front_panic() -> Response {
        panic!("secret detail of a front's handler")
    }

    /// A handler that panics (a bug, or a store that panics on data it cannot read) answers
    /// 500 with the fixed sentence, never the panic's text nor a dropped connection, whether
    /// it was routed or answered by a front; the next request is served as usual.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_without_its_text() {
        let routed = observe(
            Router::new()
                .route("/boom", get(routed_panic))
                .route("/fine", get(|| async { "fine" })),
            "unit",
        );
        let handled = Front::handler(
            "unit",
            |request| (request.uri().path() == "/handled").then_some("/handled"),
            |_| front_panic(),
        );
        let answered = Front::new(
            "unit",
            |request| (request.uri().path() == "/answered").then_some("/answered"),
            |_| -> Option<Response> { panic!("secret detail of a front's answer") },
        );
        let service = fronted(Some(handled.with(answered)), routed);
        for path in ["/boom", "/handled", "/answered"] {
            let request = Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("request");
            let answer = service.clone().oneshot(request).await.expect("answer");
            assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert!(answer.headers().contains_key(&REQUEST_ID), "{path}");
            assert_eq!(
                body_of(answer).await,
                r#"{"err_msg":"Internal server error"}"#,
                "{path}"
            );
        }
        let request = Request::builder()
            .uri("/fine")
            .body(Body::empty())
            .expect("request");
        let answer = service.oneshot(request).await.expect("answer");
        assert_eq!(answer.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_refused_request_never_reaches_the_front_and_an_admitted_one_is_answered() {
        let dir = tempfile::tempdir().expect("dir");
        let guards = keyed_guards(dir.path());
        let asked = Arc::new(AtomicU32::new(0));
        let service = front_and_router(true, asked.clone());
        for key in [None, Some("wrong")] {
            let refused = service
                .clone()
                .oneshot(guarded_get(&guards, key))
                .await
                .expect("answer");
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{key:?}");
            assert!(refused.headers().contains_key(&REQUEST_ID));
        }
        assert_eq!(
            asked.load(Ordering::Relaxed),
            0,
            "the front was asked for a refused request"
        );
        let admitted = service
            .oneshot(guarded_get(&guards, Some("the-key")))
            .await
            .expect("answer");
        assert_eq!(admitted.status(), StatusCode::OK);
        assert_eq!(
            admitted.headers()[header::STRICT_TRANSPORT_SECURITY],
            "max-age=31536000"
        );
        assert_eq!(body_of(admitted).await, "from the front");
        assert_eq!(asked.load(Ordering::Relaxed), 1);
    }

    /// Guards that let a burst of 3 through, then one request a minute.
    fn burst_of_three() -> Arc<Guards> {
        let three = NonZeroU32::new(3).expect("3");
        Arc::new(Guards {
            rate_limit: RateLimit::one_every(Duration::from_secs(60), three),
            ..Guards::default()
        })
    }

    /// Sends four of `request` at once to `service` behind [`burst_of_three`]: the first
    /// three are answered with a body starting with `answered`, the fourth is refused, so
    /// each took exactly one token.
    async fn each_takes_one_rate_token(
        service: Fronted,
        request: impl Fn(&Arc<Guards>) -> Request,
        answered: &str,
    ) {
        let guards = burst_of_three();
        for n in 0..3 {
            let answer = service
                .clone()
                .oneshot(request(&guards))
                .await
                .expect("answer");
            assert!(answer.status().is_success(), "request {n} of a burst of 3");
            let body = body_of(answer).await;
            assert!(body.starts_with(answered), "request {n}: {body}");
        }
        let limited = service.oneshot(request(&guards)).await.expect("answer");
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[tokio::test]
    async fn a_request_the_front_has_no_answer_for_is_routed_and_takes_one_rate_token() {
        let asked = Arc::new(AtomicU32::new(0));
        let service = front_and_router(false, asked.clone());
        each_takes_one_rate_token(service, |guards| guarded_get(guards, None), "routed").await;
        assert_eq!(asked.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_request_a_handler_front_takes_takes_one_rate_token() {
        let handled = Arc::new(AtomicU32::new(0));
        let service = front_with_handler(false, Arc::default(), handled.clone());
        let post = |guards: &Arc<Guards>| {
            let mut request = guarded_get(guards, None);
            *request.method_mut() = Method::POST;
            request
        };
        each_takes_one_rate_token(service, post, "handled").await;
        assert_eq!(handled.load(Ordering::Relaxed), 3);
    }

    /// [`front_and_router`]'s front (answering `GET /front` when `cached`) with a handler
    /// of `POST /front` that echoes the request id it was given, counting its calls.
    fn front_with_handler(cached: bool, asked: Arc<AtomicU32>, handled: Arc<AtomicU32>) -> Fronted {
        let answers = cached_front(cached, asked);
        let handler = Front::handler(
            "unit",
            |request| {
                (request.method() == Method::POST && request.uri().path() == "/front")
                    .then_some("/front")
            },
            move |request| {
                handled.fetch_add(1, Ordering::Relaxed);
                let id = request.headers().get(&REQUEST_ID).cloned();
                async move {
                    let id = id.map(|id| id.to_str().unwrap_or_default().to_owned());
                    (
                        StatusCode::CREATED,
                        format!("handled {}", id.unwrap_or_default()),
                    )
                        .into_response()
                }
            },
        );
        let router = observe(
            Router::new().route(
                "/front",
                get(|| async { "routed" }).post(|| async { "routed" }),
            ),
            "unit",
        );
        fronted(Some(answers.with(handler)), router)
    }

    #[tokio::test]
    async fn a_handler_front_takes_its_requests_after_the_guards_and_never_routes_them() {
        let dir = tempfile::tempdir().expect("dir");
        let guards = keyed_guards(dir.path());
        let (asked, handled) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let service = front_with_handler(true, asked.clone(), handled.clone());
        let post = |key: Option<&str>| {
            let mut request = guarded_get(&guards, key);
            *request.method_mut() = Method::POST;
            request
        };
        let refused = service.clone().oneshot(post(None)).await.expect("answer");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(refused.headers().contains_key(&REQUEST_ID));
        assert_eq!(
            handled.load(Ordering::Relaxed),
            0,
            "a refused request was handled"
        );

        let mut admitted = post(Some("the-key"));
        admitted
            .headers_mut()
            .insert(&REQUEST_ID, HeaderValue::from_static("client-id-1"));
        let admitted = service.clone().oneshot(admitted).await.expect("answer");
        assert_eq!(admitted.status(), StatusCode::CREATED);
        assert_eq!(admitted.headers()[&REQUEST_ID], "client-id-1");
        assert_eq!(admitted.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            admitted.headers()[header::STRICT_TRANSPORT_SECURITY],
            "max-age=31536000"
        );
        assert_eq!(body_of(admitted).await, "handled client-id-1");
        assert_eq!(handled.load(Ordering::Relaxed), 1);

        // The answers of the other front are still given, and what neither takes is routed.
        let cached = service
            .clone()
            .oneshot(guarded_get(&guards, Some("the-key")))
            .await
            .expect("answer");
        assert_eq!(body_of(cached).await, "from the front");
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        let mut elsewhere = post(Some("the-key"));
        *elsewhere.uri_mut() = "/elsewhere".parse().expect("uri");
        let routed = service.oneshot(elsewhere).await.expect("answer");
        assert_eq!(routed.status(), StatusCode::NOT_FOUND);
        assert_eq!(handled.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_front_that_never_answers_gets_the_routed_requests_timeout() {
        let front = Front::handler(
            "unit",
            |_| Some("/front"),
            |_| std::future::pending::<Response>(),
        );
        let service = fronted(Some(front), Router::new());
        let request = Request::post("/front")
            .body(Body::empty())
            .expect("request");
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(2 * REQUEST_TIMEOUT, service.oneshot(request))
            .await
            .expect("no answer within twice the request timeout")
            .expect("answer");
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(answer.headers().contains_key(header::RETRY_AFTER));
        assert!(answer.headers().contains_key(&REQUEST_ID));
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
        assert!(body_of(answer).await.contains("err_msg"));
    }

    fn is_logged(status: u16) -> bool {
        logged(status, false) != Line::Skip
    }

    /// The `skipped` of the next line of `status` that its cap lets through, by `until`.
    fn next_logged(status: u16, until: Instant) -> u64 {
        loop {
            match logged(status, false) {
                Line::Log { skipped } => return skipped,
                Line::Skip => {
                    assert!(Instant::now() < until, "the cap never let a line through");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Sampling and the rate cap are process-wide: one test sets both, in turn.
    #[test]
    fn sampling_and_the_rate_caps_keep_every_server_error_line_and_count_what_they_skip() {
        set_log_rate(0);
        set_log_sample(4);
        let routine = (0..40).filter(|_| is_logged(200)).count();
        let not_found = (0..40).filter(|_| is_logged(404)).count();
        let errors = (0..40)
            .filter(|_| is_logged(503) && is_logged(400) && is_logged(429))
            .count();
        set_log_sample(1);
        let all = (0..40).filter(|_| is_logged(200)).count();
        assert_eq!((routine, not_found, errors, all), (10, 10, 40, 40));

        // A cap of 2 per second: the first 2 routine lines of a burst (governor's quota
        // allows a burst of the rate), then none for 500 ms, but every error line.
        set_log_rate(2);
        let burst: Vec<Line> = (0..2).map(|_| logged(200, false)).collect();
        assert_eq!(
            burst,
            (0..2).map(|_| Line::Log { skipped: 0 }).collect::<Vec<_>>()
        );
        let over = (0..100)
            .filter(|_| is_logged(200) || is_logged(404))
            .count();
        let errors = (0..100).filter(|_| is_logged(500)).count();
        let probes = (0..100).filter(|_| logged(200, true) != Line::Skip).count();
        assert_eq!(probes, 100, "probe lines are not capped");
        assert_eq!(
            (over, errors),
            (0, 100),
            "over the cap: routine lines skipped, server errors all logged"
        );
        // A client's own errors have a cap of their own: a client that sends nothing but
        // refused requests cannot make every one of them a line, nor take the routine
        // lines' share.
        let client_errors: Vec<Line> = (0..100).map(|_| logged(429, false)).collect();
        assert_eq!(
            client_errors[..2],
            [Line::Log { skipped: 0 }, Line::Log { skipped: 0 }],
            "the client errors' own burst"
        );
        assert!(
            client_errors[2..].iter().all(|l| *l == Line::Skip),
            "over their cap: client error lines skipped"
        );
        assert!(
            [400, 405, 413, 415].iter().all(|&s| !is_logged(s)),
            "every 4xx but 404 shares that cap"
        );
        // The next routine line logged says how many were skipped before it. A token
        // comes back every 500 ms; wait for it (bounded), not for a fixed time.
        let until = Instant::now() + Duration::from_secs(5);
        let next = next_logged(200, until);
        assert!(
            next >= 200,
            "the 200 skipped lines (and those while waiting) are counted: {next}"
        );
        let next_client_error = next_logged(400, until);
        assert!(
            next_client_error >= 102,
            "the skipped client error lines are counted apart: {next_client_error}"
        );
        set_log_rate(0);
        assert!(
            (0..1000).all(|_| logged(200, false) == Line::Log { skipped: 0 }),
            "0: no cap"
        );
    }

    fn generated_id() -> String {
        let id = MakeRequestUuidV4
            .make_request_id(&axum::http::Request::new(()))
            .expect("an id")
            .into_header_value();
        id.to_str().expect("ascii").to_owned()
    }

    #[test]
    fn generated_request_ids_are_distinct_v4_uuids() {
        let ids: Vec<String> = (0..3).map(|_| generated_id()).collect();
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 4, "{id}");
        }
        assert!(
            ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
            "{ids:?}"
        );
    }

    #[test]
    fn the_key_of_the_ids_is_not_an_offset_of_the_count() {
        // Were the key only added to the count before a public mixing, two processes'
        // ids would be one sequence shifted by the keys' difference, and that mixing,
        // undone, would give any id's count up to a constant: the number of requests
        // between two ids.
        let (k1, k2) = (0x1234_5678_9abc_def0_u64, 0x0fed_cba9_8765_4321_u64);
        let shift = k1.wrapping_sub(k2);
        let shifted = (0..1000u64)
            .filter(|&n| scramble(n, k1) == scramble(n.wrapping_add(shift), k2))
            .count();
        assert_eq!(shifted, 0);
        // Still a bijection: no two counts share an id (a sample, and a small full range).
        let ids: std::collections::HashSet<u64> =
            (0..100_000u64).map(|n| scramble(n, k1)).collect();
        assert_eq!(ids.len(), 100_000);
        assert!(ids.iter().all(|&id| id >> 62 == 0));
    }

    #[test]
    fn generated_request_ids_do_not_count_the_requests() {
        // Their last 62 bits: distinct, and not a counter a client could read the
        // replica's traffic from (consecutive ids are not a step apart).
        let tails: Vec<u64> = (0..10_000)
            .map(|_| {
                let uuid = uuid::Uuid::parse_str(&generated_id()).expect("a UUID");
                u64::from_be_bytes(uuid.as_bytes()[8..].try_into().expect("8 bytes"))
                    & (u64::MAX >> 2)
            })
            .collect();
        let distinct: std::collections::HashSet<u64> = tails.iter().copied().collect();
        assert_eq!(distinct.len(), tails.len());
        let small_steps = tails
            .windows(2)
            .filter(|w| w[1].abs_diff(w[0]) < 1 << 32)
            .count();
        assert!(small_steps < 10, "{small_steps} of 9,999 steps are small");
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
