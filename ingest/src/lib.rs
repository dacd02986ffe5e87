//! The write path of msghash.
//!
//! `POST /messages {"message": "..."}` hashes the message, appends a `MessageHashed` event
//! to the partition its digest maps to, and answers `201 {"digest": "..."}` only once the
//! log acknowledged the event. A log that does not acknowledge within the request deadline
//! (after retries with backoff) yields `503` with `Retry-After`, never a hang or a 500; one
//! that sheds the append (its queue is full) yields that `503` at once.
//!
//! [`router_and_front`] is what the standalone binary composes (the routes, and the front
//! that answers the same POSTs before routing); [`app`] adds health, `/metrics` and request
//! observation; [`Application`] is the service on its own.

use axum::extract::{FromRef, FromRequest, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use backon::{ExponentialBuilder, Retryable};
use msghash_common::http::{self, ApiError, BodyLimit, ErrorBody, Front, JsonBody, RequestBody};
use msghash_common::metrics::names;
use msghash_common::{partition_for, EventLog, LogError, MessageHashed, Offset};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use utoipa::{OpenApi, ToSchema};

/// Settings of the write path itself, whatever the log behind it.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// How long a POST may wait for the log's acknowledgement, retries included.
    pub deadline: Duration,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            body_limit: 1024 * 1024,
            deadline: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
struct AppState {
    log: Arc<dyn EventLog>,
    settings: Arc<IngestSettings>,
}

impl FromRef<AppState> for BodyLimit {
    fn from_ref(state: &AppState) -> BodyLimit {
        BodyLimit(state.settings.body_limit)
    }
}

/// The write-path routes: `POST /messages`.
pub fn router(log: Arc<dyn EventLog>, settings: IngestSettings) -> Router {
    router_and_front(log, settings, "ingest").0
}

/// [`router`], and a [`Front`] (counted under `service`) that answers the same `POST
/// /messages` before routing, with the same answers: routing, the `request` span and the
/// timeout layer cost a POST about a tenth of its CPU (docs/performance.md, item 19).
pub fn router_and_front(
    log: Arc<dyn EventLog>,
    settings: IngestSettings,
    service: &'static str,
) -> (Router, Front) {
    // Present (at 0) from the start, so rate() and alerts see the series before a failure.
    metrics::counter!(names::INGEST_PRODUCE_FAILURES_TOTAL).increment(0);
    let state = AppState {
        log,
        settings: Arc::new(settings),
    };
    let front = {
        let state = state.clone();
        Front::handler(service, front_route, move |request| {
            fronted_post(state.clone(), request)
        })
    };
    let router = Router::new()
        .route("/messages", post(post_message))
        .with_state(state);
    (router, front)
}

/// Whether the front takes `request`: a `POST` of exactly `/messages` (the router's route;
/// a query string does not change it).
fn front_route(request: &Request) -> Option<&'static str> {
    (request.method() == Method::POST && request.uri().path() == "/messages").then_some("/messages")
}

/// The front's `POST /messages`: what [`post_message`] answers, its lines carrying the
/// request's id (no span is around it).
async fn fronted_post(state: AppState, request: Request) -> Response {
    // A reference-counted handle on the id's bytes, not a copy.
    let id = request.headers().get(http::REQUEST_ID).cloned();
    match JsonBody::<PostMessage>::from_request(request, &state).await {
        Ok(JsonBody(body)) => accept(
            &state,
            body.message,
            id.as_ref().and_then(|id| id.to_str().ok()),
        )
        .await
        .into_response(),
        Err(rejection) => rejection.into_response(),
    }
}

/// The body of `POST /messages`. Other fields are ignored; `message` given twice is a 400.
/// Public for the fuzz target of request bodies, which decodes arbitrary bytes with
/// [`RequestBody::decode`] exactly as the route does.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PostMessage {
    /// Any string, the empty one included; its UTF-8 bytes are hashed.
    pub message: String,
}

impl RequestBody for PostMessage {
    const INVALID: &'static str =
        "Request body must be a JSON object with a string field \"message\"";
}

/// The body of the 201.
#[derive(Serialize, ToSchema)]
struct Accepted {
    /// SHA-256 of the message's UTF-8 bytes, 64 lower-case hex characters.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    digest: String,
}

/// What a client is told to wait before retrying when the log is down.
const RETRY_AFTER_SECS: u32 = 1;

/// `POST /messages`: hash, append, and answer 201 once the log acknowledged.
#[utoipa::path(
    post,
    path = "/messages",
    tag = "messages",
    operation_id = "post_message",
    request_body(
        content = PostMessage,
        content_type = "application/json",
        description = "A JSON object (`application/json` or `application/*+json`) of at most \
                       MSGHASH_BODY_LIMIT bytes (1 MiB by default)",
    ),
    responses(
        (status = 201, description = "The event is on the log; the message's digest",
         body = Accepted,
         headers(("Location" = String, description = "`/messages/<digest>`"))),
        (status = 400, description = "Not a JSON object, `message` missing, not a string or \
                                      given twice", body = ErrorBody),
        (status = 408, description = "The body was not received within the body timeout",
         body = ErrorBody),
        (status = 413, description = "The body is over the limit, or the message too large \
                                      for the event log", body = ErrorBody),
        (status = 415, description = "The content type is not JSON", body = ErrorBody),
        (status = 503, description = "The event log did not acknowledge within the request \
                                      deadline", body = ErrorBody),
    ),
)]
async fn post_message(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<PostMessage>,
) -> Result<Created, ApiError> {
    // Inside the `request` span, which carries the id.
    accept(&state, body.message, None).await
}

/// The 201 of `POST /messages`.
type Created = (
    StatusCode,
    [(header::HeaderName, String); 1],
    Json<Accepted>,
);

/// Hashes `message`, appends its event and answers once the log acknowledged it; the lines
/// logged carry `request_id` when given.
async fn accept(
    state: &AppState,
    message: String,
    request_id: Option<&str>,
) -> Result<Created, ApiError> {
    let event = MessageHashed::new(message);
    let partition = partition_for(&event.digest, state.log.partitions());
    let offset = append_within(
        state.log.as_ref(),
        partition,
        &event,
        state.settings.deadline,
        request_id,
    )
    .await
    .map_err(|e| {
        match &e {
            // An overload sheds many requests a second: the metric counts them, the log
            // would only flood.
            LogError::Shed(_) => {
                tracing::debug!(request_id, digest = %event.digest, partition, error = %e,
                    "event shed")
            }
            _ => tracing::warn!(request_id, digest = %event.digest, partition, error = %e,
                "event not acknowledged"),
        }
        match e {
            // No retry can help: say so at once, not with a 503 a client retries for ever.
            LogError::TooLarge(_) => ApiError::EventTooLarge,
            _ => ApiError::Unavailable {
                retry_after_secs: RETRY_AFTER_SECS,
            },
        }
    })?;
    let digest = event.digest.to_hex();
    tracing::debug!(request_id, %digest, partition, offset, "message accepted");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/messages/{digest}"))],
        Json(Accepted { digest }),
    ))
}

/// The OpenAPI description of [`router`]'s routes alone (no health, no headers): what
/// [`openapi`] and the whole API's document are built from.
#[derive(OpenApi)]
#[openapi(
    paths(post_message),
    components(schemas(PostMessage, Accepted, ErrorBody))
)]
pub struct IngestApi;

/// The `ingest` service's OpenAPI 3.1 document, as it serves it at `/openapi.json`.
pub fn openapi() -> serde_json::Value {
    http::openapi::document("msghash ingest", IngestApi::openapi())
}

/// The write path as the `ingest` service serves it: [`router`], `/openapi.json`, health
/// (ready when the log answers), `/metrics`, JSON fallbacks, request observation.
pub fn app(log: Arc<dyn EventLog>, settings: IngestSettings) -> Router {
    app_and_front(log, settings).0
}

/// [`app`], and the front of its router ([`router_and_front`]) for the server.
pub fn app_and_front(log: Arc<dyn EventLog>, settings: IngestSettings) -> (Router, Front) {
    msghash_common::metrics::install();
    let (routes, front) = router_and_front(log.clone(), settings, "ingest");
    let app = http::service_app(
        "ingest",
        routes.merge(http::openapi_route(&openapi())),
        http::log_ready(log),
    );
    (app, front)
}

/// Appends with exponential backoff on `Unavailable`, all within `deadline`. A
/// [`LogError::Shed`] is returned at once: the log said retrying now only adds load. Each
/// retry is logged at debug with `request_id` when given (a request answered before
/// routing has no span to carry it), and an append that runs out of time fails with the
/// last cause in its text.
///
/// Metrics: one `msghash_ingest_produce_duration_seconds` observation per acknowledged
/// append (first attempt to acknowledgement, retries included), one
/// `msghash_ingest_produce_failures_total` per append that is not acknowledged.
pub async fn append_within(
    log: &dyn EventLog,
    partition: u32,
    event: &MessageHashed,
    deadline: Duration,
    request_id: Option<&str>,
) -> Result<Offset, LogError> {
    let mut last: Option<String> = None;
    let attempts = (|| log.append(partition, event))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(1))
                .with_max_times(usize::MAX)
                .with_jitter(),
        )
        .when(|e| matches!(e, LogError::Unavailable(_)))
        .notify(|e, after| {
            tracing::debug!(request_id, error = %e, ?after, "retrying append");
            if let LogError::Unavailable(cause) = e {
                last = Some(cause.clone());
            }
        });
    let started = std::time::Instant::now();
    let result = match tokio::time::timeout(deadline, attempts).await {
        Ok(result) => result,
        Err(_) => Err(LogError::Unavailable(match last {
            Some(cause) => format!("no acknowledgement within {deadline:?}; last: {cause}"),
            None => format!("no acknowledgement within {deadline:?}"),
        })),
    };
    match &result {
        Ok(_) => metrics::histogram!(names::INGEST_PRODUCE_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64()),
        Err(_) => metrics::counter!(names::INGEST_PRODUCE_FAILURES_TOTAL).increment(1),
    }
    result
}

/// The write path's own settings, shared by `ingest` and the standalone `msghash`.
#[derive(clap::Args, Debug, Clone)]
pub struct WriteArgs {
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MSGHASH_BODY_LIMIT", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=64 * 1024 * 1024))]
    pub body_limit: u64,
    /// How long a POST waits for the event log's acknowledgement, retries included (ms).
    #[arg(long, env = "MSGHASH_REQUEST_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub request_timeout_ms: u64,
}

impl WriteArgs {
    pub fn settings(&self) -> IngestSettings {
        IngestSettings {
            body_limit: usize::try_from(self.body_limit).unwrap_or(usize::MAX),
            deadline: Duration::from_millis(self.request_timeout_ms),
        }
    }
}

#[cfg(feature = "service")]
mod service;
#[cfg(feature = "service")]
pub use service::{Application, Cli};
