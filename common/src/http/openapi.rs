//! The OpenAPI 3.1 document every HTTP service serves at `GET /openapi.json`, generated from
//! the handlers' `#[utoipa::path]` annotations (utoipa).
//!
//! A service describes its own routes (ingest: `POST /messages`; query: the GETs) in a
//! `#[derive(utoipa::OpenApi)]` type; [`document`] adds what every service answers the
//! same way: the health routes, `/openapi.json` itself, the error body, the headers every
//! answer carries and `Retry-After` on every 503. `msghash` (and the edge) serve the merge of
//! ingest's and query's. `/metrics` is left out: it is for the scraper, on each service's own
//! port, and the edge answers it 404.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::openapi::{self, InfoBuilder, ServerBuilder};
use utoipa::{OpenApi, ToSchema};

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"err_msg": "Message not found"}))]
pub struct ErrorBody {
    /// What went wrong, in one fixed sentence (never internal error text).
    pub err_msg: String,
}

/// The body of a healthy `/health/live` or `/health/ready`.
#[derive(Serialize, ToSchema)]
pub struct HealthBody {
    /// `live` or `ready`.
    #[schema(pattern = "^(live|ready)$")]
    pub status: String,
}

/// A message's digest as answers give it: SHA-256, 64 lower-case hex characters.
#[derive(ToSchema)]
#[schema(
    value_type = String,
    pattern = "^[0-9a-f]{64}$",
    example = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
)]
pub struct DigestHex(pub String);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this port", body = Object)),
)]
#[allow(dead_code)]
fn openapi_doc() {}

#[derive(OpenApi)]
#[openapi(
    paths(super::health::live, super::health::ready, openapi_doc),
    components(schemas(ErrorBody, HealthBody))
)]
struct Common;

/// Documents `alias` as the same operations as `path` (operation ids get `_alias`), when
/// `path` is in `doc`.
pub fn alias(doc: &mut openapi::OpenApi, path: &str, alias: &str) {
    let Some(mut item) = doc.paths.paths.get(path).cloned() else {
        return;
    };
    for operation in [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
    {
        operation.operation_id = operation
            .operation_id
            .take()
            .map(|id| format!("{id}_alias"));
        operation.summary = Some(format!("Alias of `{path}`"));
    }
    doc.paths.paths.insert(alias.to_owned(), item);
}

/// The headers every answer of every route carries, and `Retry-After` of every 503: their
/// names and definitions (`components.headers`).
fn header_components() -> [(&'static str, Value); 5] {
    [
        (
            "x-request-id",
            json!({
                "description": "The request's own x-request-id when it sent a valid one (1-128 visible ASCII characters), else a generated UUID",
                "required": true,
                "schema": {"type": "string", "pattern": "^[!-~]{1,128}$"}
            }),
        ),
        (
            "Strict-Transport-Security",
            json!({"required": true, "schema": {"type": "string", "const": "max-age=31536000"}}),
        ),
        (
            "X-Content-Type-Options",
            json!({"required": true, "schema": {"type": "string", "const": "nosniff"}}),
        ),
        (
            "Cache-Control",
            json!({
                "description": "`no-store`, except on a found message (`public, max-age=31536000, immutable`)",
                "required": true,
                "schema": {"type": "string", "enum": ["no-store", "public, max-age=31536000, immutable"]}
            }),
        ),
        (
            RETRY_AFTER,
            json!({
                "description": "Seconds to wait before retrying",
                "required": true,
                "schema": {"type": "string", "pattern": "^[0-9]+$"}
            }),
        ),
    ]
}

const RETRY_AFTER: &str = "Retry-After";

/// What the guards (`common::http::guard`) may answer, when configured.
const GUARD_RESPONSES: [(&str, &str); 2] = [
    (
        "401",
        "API keys are configured (MSGHASH_API_KEYS_FILE) and this request needs one: \
         `Authorization: Bearer <key>` missing or not a valid key",
    ),
    (
        "429",
        "A rate limit is configured (MSGHASH_RATE_LIMIT_PER_SEC) and this client is over it",
    ),
];

const DESCRIPTION: &str = "POST a message, get its SHA-256 digest; GET the digest, get the \
message back. Every error answer is `{\"err_msg\": \"...\"}`. Besides the statuses listed per \
operation: a method a path does not list answers 405, a path not listed answers 404, a request \
body not fully sent within the body timeout (MSGHASH_HTTP_BODY_TIMEOUT_MS) answers 408, and any \
request not answered within 30 s answers 503 with `Retry-After`.";

/// A service's document: its own `routes` (a `#[derive(OpenApi)]` type's `openapi()`, or a
/// merge of them) plus health, `/openapi.json`, the headers of every answer and
/// `Retry-After` on every 503, as JSON. `title` names the port that serves it.
pub fn document(title: &str, routes: openapi::OpenApi) -> Value {
    let mut doc = Common::openapi();
    doc.merge(routes);
    doc.info = InfoBuilder::new()
        .title(title)
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(DESCRIPTION))
        .build();
    doc.servers = Some(vec![ServerBuilder::new().url("/").build()]);
    let mut value = serde_json::to_value(&doc).unwrap_or_default();
    add_response_headers(&mut value);
    value
}

/// Every response of every operation: the common headers, required; every 503 also
/// `Retry-After` (seconds), required. Each a reference to `components.headers`.
fn add_response_headers(doc: &mut Value) {
    let components = header_components();
    if let Some(doc) = doc.as_object_mut() {
        let headers = doc
            .entry("components")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|c| c.entry("headers").or_insert_with(|| json!({})));
        if let Some(Value::Object(headers)) = headers {
            headers.extend(components.iter().map(|(n, h)| ((*n).to_owned(), h.clone())));
        }
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    // Every operation the guards see (all but health and this document) can also be refused
    // by them, when configured: the JSON error body of its 503.
    let guarded = paths
        .iter_mut()
        .filter(|(path, _)| !path.starts_with("/health/") && path.as_str() != "/openapi.json")
        .filter_map(|(_, item)| item.as_object_mut())
        .flat_map(|item| item.values_mut().filter_map(Value::as_object_mut))
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut());
    for responses in guarded {
        let Some(unavailable) = responses.get("503").cloned() else {
            continue;
        };
        for (status, description) in GUARD_RESPONSES {
            let mut response = unavailable.clone();
            if let Some(r) = response.as_object_mut() {
                r.insert("description".into(), json!(description));
                r.remove("headers");
            }
            responses.entry(status).or_insert(response);
        }
    }
    let operations = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut().filter_map(Value::as_object_mut));
    for operation in operations {
        let Some(responses) = operation
            .get_mut("responses")
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for (status, response) in responses.iter_mut() {
            let Some(Value::Object(headers)) = response
                .as_object_mut()
                .map(|r| r.entry("headers").or_insert_with(|| json!({})))
            else {
                continue;
            };
            for (name, _) in &components {
                if *name != RETRY_AFTER || status == "503" || status == "429" {
                    let reference = json!({"$ref": format!("#/components/headers/{name}")});
                    headers.entry(*name).or_insert(reference);
                }
            }
        }
    }
}

/// `GET /openapi.json` answering `document` (built once).
pub fn openapi_route(document: &Value) -> Router {
    openapi_route_at("/openapi.json", document)
}

/// `GET <path>` answering `document` (built once).
pub fn openapi_route_at(path: &str, document: &Value) -> Router {
    let body = axum::body::Bytes::from(document.to_string());
    Router::new().route(
        path,
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_response_gets_the_common_headers_and_every_503_retry_after() {
        let doc = document("test", openapi::OpenApi::default());
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["servers"][0]["url"], "/");
        let ready = &doc["paths"]["/health/ready"]["get"]["responses"];
        for status in ["200", "503"] {
            let headers = &ready[status]["headers"];
            for name in ["x-request-id", "Cache-Control", "Strict-Transport-Security"] {
                let reference = format!("#/components/headers/{name}");
                assert_eq!(headers[name]["$ref"], reference.as_str(), "{status}");
                assert_eq!(doc["components"]["headers"][name]["required"], true);
            }
        }
        assert_eq!(
            ready["503"]["headers"]["Retry-After"]["$ref"],
            "#/components/headers/Retry-After"
        );
        assert!(ready["200"]["headers"].get("Retry-After").is_none());
        // Health is never rate-limited nor behind API keys.
        assert!(ready.get("429").is_none() && ready.get("401").is_none());
    }
}
