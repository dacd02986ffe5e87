//! The read path of msghash.
//!
//! `GET /messages/{digest}` answers `200 {"message"}` from the read model. On a miss it
//! passes the read-your-writes [`barrier`] before answering `404 {"err_msg": "Message not
//! found"}`; a malformed digest names no message and gets the 404 at once.
//!
//! [`router`] is what the standalone binary composes; [`app`] adds health, `/metrics` and
//! request observation; [`Application`] is the service on its own. A found message that
//! the hit cache holds is answered before routing, by the router's [`Front`]
//! ([`router_and_front`]), with the same answer the route gives.

pub mod barrier;
mod cache;

use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use barrier::{BarrierError, ReadBarrier};
use cache::HitCache;
use msghash_common::http::openapi::DigestHex;
use msghash_common::http::{self, ApiError, ErrorBody, Front};
use msghash_common::{partition_for, Digest, EventLog, ReadModel};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use utoipa::{OpenApi, ToSchema};

/// Settings of the read path itself.
#[derive(Debug, Clone)]
pub struct QuerySettings {
    /// How long a miss may take, reads and wait for the projector included, before it
    /// answers 503.
    pub read_your_writes_timeout: Duration,
    /// Most bytes of found messages' answers kept in memory (0: none). A found message
    /// never changes, so a kept answer is served without reading the model again; a miss
    /// is never kept.
    pub cache_bytes: u64,
}

/// [`QuerySettings::cache_bytes`] by default (`MSGHASH_CACHE_BYTES`).
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl Default for QuerySettings {
    fn default() -> Self {
        QuerySettings {
            read_your_writes_timeout: Duration::from_secs(2),
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

#[derive(Clone)]
struct AppState {
    model: Arc<dyn ReadModel>,
    partitions: std::num::NonZeroU32,
    barrier: Arc<ReadBarrier>,
    /// Found messages' 200 bodies by digest; `None` when `cache_bytes` is 0.
    hits: Option<Arc<HitCache>>,
}

/// The route of a message, and its older singular alias.
const MESSAGE_ROUTE: &str = "/messages/{digest}";
const MESSAGE_ALIAS_ROUTE: &str = "/message/{digest}";

/// The read-path routes: `GET /messages/{digest}`.
pub fn router(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    settings: QuerySettings,
) -> Router {
    router_and_front(log, model, settings, "query").0
}

/// [`router`], and its [`Front`] (counted under `service`): a `GET` of a found message that
/// the hit cache holds, answered before routing with the same answer as the route's. No
/// front when the cache is off (`cache_bytes` 0).
pub fn router_and_front(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    settings: QuerySettings,
    service: &'static str,
) -> (Router, Option<Front>) {
    let state = AppState {
        partitions: log.partitions(),
        barrier: Arc::new(ReadBarrier::new(
            log,
            model.clone(),
            settings.read_your_writes_timeout,
        )),
        model,
        hits: HitCache::new(settings.cache_bytes).map(Arc::new),
    };
    let front = state.hits.clone().map(|hits| {
        Front::new(
            service,
            |request| front_route(request).map(|(route, _)| route),
            move |request| cached(&hits, request),
        )
    });
    let router = Router::new()
        .route(MESSAGE_ROUTE, get(get_message))
        // Older clients look messages up in the singular.
        .route(MESSAGE_ALIAS_ROUTE, get(get_message))
        .route("/messages", get(list_messages))
        .route("/all-messages", get(list_messages))
        .with_state(state);
    (router, front)
}

/// Whether the front may answer `request`, and under which route: a `GET` of a digest, 64
/// hex characters as they came (either case). Anything else, however unusual (a HEAD, a
/// percent-encoded or malformed digest), is routed. Reads nothing but the request.
fn front_route(request: &Request) -> Option<(&'static str, Digest)> {
    if request.method() != Method::GET {
        return None;
    }
    let path = request.uri().path();
    let (route, digest) = match path.strip_prefix("/messages/") {
        Some(digest) => (MESSAGE_ROUTE, digest),
        None => (MESSAGE_ALIAS_ROUTE, path.strip_prefix("/message/")?),
    };
    Some((route, Digest::parse(digest)?))
}

/// The front's answer to `request`, once the guards let it through: the message when
/// `hits` holds it; else the request is routed (and read from the model).
fn cached(hits: &HitCache, request: &Request) -> Option<Response> {
    let (_, digest) = front_route(request)?;
    hits.get(&digest).map(found)
}

/// The OpenAPI description of [`router`]'s routes alone (no health, no headers).
#[derive(OpenApi)]
#[openapi(
    paths(get_message, list_messages),
    components(schemas(Found, Listing, DigestHex, ErrorBody))
)]
struct QueryApi;

/// [`router`]'s routes, aliases included, for [`openapi`] and the whole API's document.
pub fn openapi_paths() -> utoipa::openapi::OpenApi {
    let mut doc = QueryApi::openapi();
    http::openapi::alias(&mut doc, "/messages/{digest}", "/message/{digest}");
    http::openapi::alias(&mut doc, "/messages", "/all-messages");
    doc
}

/// Where query also serves [`full_openapi`]: the edge sends its `GET /openapi.json` here
/// (`deploy/haproxy.cfg`), so that a client of the edge reads the whole API it serves.
pub const EDGE_OPENAPI_PATH: &str = "/openapi/edge.json";

/// The `query` service's OpenAPI 3.1 document, as it serves it at `/openapi.json`: its GETs,
/// health, `/openapi.json` and [`EDGE_OPENAPI_PATH`].
pub fn openapi() -> serde_json::Value {
    let mut doc = http::openapi::document("msghash query", openapi_paths());
    let mut edge = doc["paths"]["/openapi.json"].clone();
    edge["get"]["operationId"] = "openapi_edge".into();
    edge["get"]["summary"] =
        "The document of the whole API (POST and GETs) as the edge serves it".into();
    doc["paths"][EDGE_OPENAPI_PATH] = edge;
    doc
}

/// The OpenAPI 3.1 document of the whole API, ingest's `POST /messages` and query's GETs: what
/// `msghash` serves, and what the edge serves at `/openapi.json` (from [`EDGE_OPENAPI_PATH`]).
pub fn full_openapi() -> serde_json::Value {
    let mut doc = http::openapi::document(
        "msghash",
        ingest::IngestApi::openapi().merge_from(openapi_paths()),
    );
    // A 201's digest is what both GETs of a message take.
    let digest = serde_json::json!({"digest": "$response.body#/digest"});
    doc["paths"]["/messages"]["post"]["responses"]["201"]["links"] = serde_json::json!({
        "GetMessage": {"operationId": "get_message", "parameters": digest},
        "GetMessageAlias": {"operationId": "get_message_alias", "parameters": digest},
    });
    doc
}

/// The read path as the `query` service serves it: [`router`], `/openapi.json` (and the whole
/// API's at [`EDGE_OPENAPI_PATH`]), health (ready when the log and the read model answer),
/// `/metrics`, JSON fallbacks, request observation.
pub fn app(log: Arc<dyn EventLog>, model: Arc<dyn ReadModel>, settings: QuerySettings) -> Router {
    app_and_front(log, model, settings).0
}

/// [`app`], and the front of its router ([`router_and_front`]) for the server.
pub fn app_and_front(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    settings: QuerySettings,
) -> (Router, Option<Front>) {
    msghash_common::metrics::install();
    let (routes, front) = router_and_front(log.clone(), model.clone(), settings, "query");
    let app = http::service_app(
        "query",
        routes
            .merge(http::openapi_route(&openapi()))
            .merge(http::openapi::openapi_route_at(
                EDGE_OPENAPI_PATH,
                &full_openapi(),
            )),
        http::log_and_model_ready(log, model),
    );
    (app, front)
}

/// The `{digest}` of a path. Text that is not 64 hex characters names no message: 404.
struct DigestPath(Digest);

impl<S: Send + Sync> FromRequestParts<S> for DigestPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::MessageNotFound)?;
        Digest::parse(&text)
            .map(DigestPath)
            .ok_or(ApiError::MessageNotFound)
    }
}

/// The body of a 200 to `GET /messages/{digest}`.
#[derive(Serialize, ToSchema)]
struct Found {
    /// The message, exactly as it was posted.
    message: String,
}

/// A found message never changes (its address is its digest): caches may keep it.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// `GET /messages/{digest}` (and `/message/{digest}`).
#[utoipa::path(
    get,
    path = "/messages/{digest}",
    tag = "messages",
    operation_id = "get_message",
    params(
        ("digest" = String, Path, pattern = "^[0-9a-fA-F]{64}$",
         description = "The message's digest: 64 hex characters, either case. Anything else \
                        names no message: 404"),
    ),
    responses(
        (status = 200, description = "The message. Immutable: `Cache-Control: public, \
                                      max-age=31536000, immutable`", body = Found),
        (status = 404, description = "No message has this digest (also after waiting for the \
                                      projector), or the digest is malformed", body = ErrorBody),
        (status = 503, description = "The read model does not answer, or the projector is too \
                                      far behind for a read-your-writes answer", body = ErrorBody),
    ),
)]
async fn get_message(
    State(state): State<AppState>,
    DigestPath(digest): DigestPath,
) -> Result<Response, ApiError> {
    if let Some(body) = state.hits.as_ref().and_then(|hits| hits.get(&digest)) {
        return Ok(found(body));
    }
    let message = lookup_across_switch(&state, &digest).await?;
    let body = found_body(message)?;
    // Only a found message is kept: a miss may be found by the next read.
    if let Some(hits) = &state.hits {
        hits.insert(digest, body.clone());
    }
    Ok(found(body))
}

/// The 200 of a found message, whether routed or from the [`Front`]: one function, so the
/// two cannot differ.
fn found(body: Bytes) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "application/json"),
        (header::CACHE_CONTROL, IMMUTABLE),
    ];
    (headers, body).into_response()
}

/// The JSON body of a 200: `{"message": ...}`, written once into a buffer of about its size.
fn found_body(message: String) -> Result<Bytes, ApiError> {
    let mut body = Vec::with_capacity(message.len() + 16);
    serde_json::to_writer(&mut body, &Found { message }).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a found message");
        ApiError::Internal
    })?;
    Ok(Bytes::from(body))
}

/// Page size of `GET /messages` when the client gives none, and the most it may ask for.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// `?limit=&after=` of a listing, checked: 400 with what is wrong otherwise.
struct Page {
    limit: usize,
    after: Option<Digest>,
}

#[derive(Deserialize)]
struct PageParams {
    limit: Option<String>,
    after: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Page {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(params) = Query::<PageParams>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::BadRequest("Query must be ?limit=<1..1000>&after=<digest>"))?;
        let limit = match params.limit.as_deref().map(str::parse::<usize>) {
            None => DEFAULT_PAGE,
            Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "limit must be an integer from 1 to 1000",
                ))
            }
        };
        let after = match params.after.as_deref() {
            None | Some("") => None,
            Some(text) => Some(Digest::parse(text).ok_or(ApiError::BadRequest(
                "after must be a digest (64 hex characters)",
            ))?),
        };
        Ok(Page { limit, after })
    }
}

/// The body of a 200 to `GET /messages`: one page and the cursor of the next (`null` on the
/// last page).
#[derive(Serialize, ToSchema)]
struct Listing {
    /// Up to `limit` digests, in the store's order.
    #[schema(value_type = Vec<DigestHex>)]
    digests: Vec<String>,
    /// Pass it as `after` for the next page; `null` on the last page.
    #[schema(value_type = Option<DigestHex>)]
    next: Option<String>,
}

/// `GET /messages?limit=&after=`.
#[utoipa::path(
    get,
    path = "/messages",
    tag = "messages",
    operation_id = "list_messages",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000,
         description = "Page size, 1 to 1000; 100 when not given"),
        ("after" = Option<String>, Query, pattern = "^([0-9a-fA-F]{64})?$",
         description = "The cursor: the `next` of the previous page (64 hex characters); \
                        empty or not given: the first page"),
    ),
    responses(
        (status = 200, description = "One page of digests", body = Listing),
        (status = 400, description = "`limit` or `after` malformed or out of range",
         body = ErrorBody),
        (status = 503, description = "The read model does not answer", body = ErrorBody),
    ),
)]
async fn list_messages(
    State(state): State<AppState>,
    page: Page,
) -> Result<Json<Listing>, ApiError> {
    let digests = state
        .model
        .list(page.after.as_ref(), page.limit)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "listing failed");
            ApiError::Unavailable {
                retry_after_secs: 1,
            }
        })?;
    let next = (digests.len() == page.limit)
        .then(|| digests.last().map(Digest::to_hex))
        .flatten();
    Ok(Json(Listing {
        digests: digests.iter().map(Digest::to_hex).collect(),
        next,
    }))
}

/// [`lookup`], once more if the read model switched generation during it: the barrier's
/// offsets and the second read must come from one generation for a miss to be the truth.
/// A miss answers by the deadline the GET's first lookup set, however often it reads again.
async fn lookup_across_switch(state: &AppState, digest: &Digest) -> Result<String, ApiError> {
    let mut deadline = None;
    let mut tries = 0;
    loop {
        // Read before `began`: every read that starts after `began` sees this generation or
        // a newer one.
        let generation = state.model.generation();
        let began = Instant::now();
        let deadline = *deadline.get_or_insert_with(|| state.barrier.deadline(began));
        let result = lookup(state, digest, began, deadline).await;
        tries += 1;
        match result {
            Err(ApiError::MessageNotFound)
                if state.model.generation() != generation && tries < 3 =>
            {
                tracing::debug!(%digest, "generation switched during a miss; reading again");
            }
            other => return other,
        }
    }
}

/// The least time the first read of a GET gets, whatever the read-your-writes timeout: a
/// short or zero timeout (a miss does not wait) must not turn hits into 503s.
const FIRST_READ_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(1);

/// One lookup: a read, and on a miss the barrier and a second read, all by `deadline` (the
/// first read by [`FIRST_READ_AT_LEAST`] at the earliest), so a read model that hangs
/// answers 503 by then too.
async fn lookup(
    state: &AppState,
    digest: &Digest,
    began: Instant,
    deadline: Instant,
) -> Result<String, ApiError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(%digest, error = %e, "{what}");
        ApiError::Unavailable {
            retry_after_secs: 1,
        }
    };
    let read = |by: Instant| async move {
        tokio::time::timeout_at(by, state.model.get(digest))
            .await
            .map_err(|_| unavailable("read failed", &"no answer by the deadline"))?
            .map_err(|e| unavailable("read failed", &e))
    };
    if let Some(m) = read(deadline.max(began + FIRST_READ_AT_LEAST)).await? {
        return Ok(m);
    }
    let partition = partition_for(digest, state.partitions);
    match state.barrier.wait(partition, began, deadline).await {
        Ok(()) => {}
        Err(e @ BarrierError::Behind { .. }) => return Err(unavailable("projector behind", &e)),
        Err(e) => return Err(unavailable("barrier failed", &e)),
    }
    read(deadline).await?.ok_or(ApiError::MessageNotFound)
}

/// The read path's own settings, shared by `query` and the standalone `msghash`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReadArgs {
    /// The deadline of a GET that misses (ms): it answers by then, 503 if the projector has
    /// not caught up or the log or the read model has not answered.
    #[arg(long, env = "MSGHASH_RYW_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub ryw_timeout_ms: u64,
    /// Most bytes of found messages kept in memory to answer the next GETs of them without a
    /// read (0: no cache). Misses are never kept.
    #[arg(long, env = "MSGHASH_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub cache_bytes: u64,
}

impl ReadArgs {
    pub fn settings(&self) -> QuerySettings {
        QuerySettings {
            read_your_writes_timeout: Duration::from_millis(self.ryw_timeout_ms),
            cache_bytes: self.cache_bytes,
        }
    }
}

#[cfg(feature = "service")]
mod service;
#[cfg(feature = "service")]
pub use service::{Application, Cli};

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(method: Method, path: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request")
    }

    #[test]
    fn the_front_answers_only_a_get_of_a_cached_digest_as_the_route_would() {
        let hits = HitCache::new(1024 * 1024).expect("a cache");
        let kept = Digest::of("kept");
        let body = found_body("kept".to_owned()).expect("body");
        hits.insert(kept, body.clone());
        let hex = kept.to_hex();
        for (path, route) in [
            (format!("/messages/{hex}"), MESSAGE_ROUTE),
            (format!("/messages/{}", hex.to_uppercase()), MESSAGE_ROUTE),
            (format!("/messages/{hex}?pretty=1"), MESSAGE_ROUTE),
            (format!("/message/{hex}"), MESSAGE_ALIAS_ROUTE),
        ] {
            let request = request(Method::GET, &path);
            assert_eq!(front_route(&request), Some((route, kept)), "{path}");
            let response = cached(&hits, &request).expect(&path);
            let expected = found(body.clone());
            assert_eq!(response.status(), expected.status(), "{path}");
            assert_eq!(response.headers(), expected.headers(), "{path}");
        }
        // The front's, but not cached: the guards are asked, then the router answers.
        let not_cached = Digest::of("not kept");
        let uncached = request(Method::GET, &format!("/messages/{}", not_cached.to_hex()));
        assert_eq!(front_route(&uncached), Some((MESSAGE_ROUTE, not_cached)));
        assert!(cached(&hits, &uncached).is_none());
        for (method, path) in [
            (Method::HEAD, format!("/messages/{hex}")),
            (Method::POST, format!("/messages/{hex}")),
            (Method::GET, format!("/messages/{hex}/")),
            (Method::GET, format!("/messages//{hex}")),
            (Method::GET, format!("/messages/%{}", &hex[1..])),
            (Method::GET, format!("/messages/{}", &hex[..63])),
            (Method::GET, format!("/other/{hex}")),
            (Method::GET, "/messages".to_owned()),
        ] {
            let request = request(method.clone(), &path);
            assert!(
                front_route(&request).is_none(),
                "{method} {path} goes to the router"
            );
            assert!(cached(&hits, &request).is_none(), "{method} {path}");
        }
    }
}
