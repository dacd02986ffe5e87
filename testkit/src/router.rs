//! Calling an axum router in process, as a client would over HTTP.

use crate::exposition;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Sends `request` to `app` (a router, or a server's whole service: `http::Fronted`) and
/// returns the status, the headers and the body as text.
pub async fn call_text<S>(app: &S, request: Request<Body>) -> (StatusCode, HeaderMap, String)
where
    S: tower::Service<
            Request<Body>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone,
{
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("a UTF-8 body");
    (status, headers, text)
}

/// Sends `request` and returns the status, the headers and the body as JSON; every answer of
/// ours is JSON, so anything else fails the test.
pub async fn call(
    app: &Router,
    request: Request<Body>,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let (status, headers, text) = call_text(app, request).await;
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("every answer is JSON, got {status} {text:?}"));
    (status, headers, json)
}

/// `GET /metrics`, checked as Prometheus text.
pub async fn scrape(app: &Router) -> exposition::Exposition {
    let request = Request::get("/metrics")
        .body(Body::empty())
        .expect("request");
    let (status, _, text) = call_text(app, request).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// `GET /messages/{digest}`: the status and the JSON body.
pub async fn get_message(app: &Router, digest: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
    let request = Request::get(format!("/messages/{digest}"))
        .body(Body::empty())
        .expect("request");
    call(app, request).await
}

/// `POST /messages` with `{"message": message}`.
pub async fn post_message(
    app: &Router,
    message: &str,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let body = serde_json::json!({ "message": message }).to_string();
    let request = Request::post("/messages")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    call(app, request).await
}

/// `GET /openapi.json`, checked as an OpenAPI 3.1 document served as JSON with the headers of
/// every answer; returns the document and its operations as `"METHOD /path"`, sorted.
pub async fn openapi(app: &Router) -> (serde_json::Value, Vec<String>) {
    let request = Request::get("/openapi.json")
        .body(Body::empty())
        .expect("request");
    let (status, headers, doc) = call(app, request).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(doc["openapi"], "3.1.0", "an OpenAPI 3.1 document");
    assert_eq!(doc["servers"][0]["url"], "/");
    let mut operations: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("a path item").keys();
            methods.map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    operations.sort();
    (doc, operations)
}
