//! ingest's front (`ingest::router_and_front`): the server answers `POST /messages` before
//! routing, and must answer every request exactly as the routed handler does.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use ingest::IngestSettings;
use msghash_common::http::{fronted, Fronted, REQUEST_ID};
use msghash_common::metrics::names;
use msghash_common::ports::{LogError, LogRecord, Offset, Subscription};
use msghash_common::{EventLog, MessageHashed};
use msghash_testkit::router::{call_text, scrape};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A log that acknowledges every event, except those whose message names a failure.
struct ScriptedLog {
    appended: AtomicI64,
}

#[async_trait]
impl EventLog for ScriptedLog {
    fn partitions(&self) -> NonZeroU32 {
        NonZeroU32::new(4).expect("4")
    }
    async fn append(&self, _: u32, event: &MessageHashed) -> Result<Offset, LogError> {
        match event.message.as_str() {
            "down" => Err(LogError::Unavailable("the broker is down".into())),
            "shed" => Err(LogError::Shed("the queue is full".into())),
            "too large" => Err(LogError::TooLarge("over the topic's limit".into())),
            _ => Ok(self.appended.fetch_add(1, Ordering::Relaxed)),
        }
    }
    async fn end_offset(&self, _: u32) -> Result<Offset, LogError> {
        Ok(self.appended.load(Ordering::Relaxed))
    }
    async fn dead_letter(&self, _: &LogRecord, _: &str) -> Result<(), LogError> {
        Ok(())
    }
    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        Ok(0)
    }
    async fn subscribe(&self, _: &str) -> Result<Box<dyn Subscription>, LogError> {
        Err(LogError::Misconfigured("not in this test".into()))
    }
}

fn scripted_log() -> Arc<ScriptedLog> {
    Arc::new(ScriptedLog {
        appended: AtomicI64::new(0),
    })
}

fn settings() -> IngestSettings {
    IngestSettings {
        body_limit: 256,
        deadline: Duration::from_millis(300),
    }
}

/// The routed app (served without a front), and its front alone (over a router without
/// routes, so that whatever the front did not answer would be a 404), on one log.
fn routed_and_front_only() -> (Fronted, Fronted) {
    let log = scripted_log();
    let (app, front) = ingest::app_and_front(log, settings());
    (fronted(None, app), fronted(Some(front), Router::new()))
}

fn post(path: &str, content_type: Option<&str>, body: &str) -> Request<Body> {
    let mut request = Request::post(path).header(REQUEST_ID, "front-test");
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    request.body(Body::from(body.to_owned())).expect("request")
}

/// testkit's `call_text`, without `Content-Length`: the router sets it from the body; for
/// the front's answers hyper writes the same one from the body's exact size when it sends
/// them.
async fn answer(service: &Fronted, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let (status, mut headers, text) = call_text(service, request).await;
    headers.remove(header::CONTENT_LENGTH);
    (status, headers, text)
}

#[tokio::test]
async fn the_front_answers_every_post_exactly_as_the_router() {
    let (routed, front_only) = routed_and_front_only();
    let json = Some("application/json");
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(300));
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("/messages", json, r#"{"message":"hello"}"#),
        ("/messages", json, r#"{"message":""}"#),
        (
            "/messages?from=test",
            json,
            r#"{"message":"a query string"}"#,
        ),
        (
            "/messages",
            Some("application/json; charset=utf-8"),
            r#"{"message":"cs"}"#,
        ),
        (
            "/messages",
            Some("application/problem+json"),
            r#"{"message":"plus"}"#,
        ),
        ("/messages", json, r#"{"message":"hello","other":1}"#),
        ("/messages", Some("text/plain"), r#"{"message":"hello"}"#),
        ("/messages", None, r#"{"message":"hello"}"#),
        ("/messages", json, "not json"),
        ("/messages", json, "[]"),
        ("/messages", json, r#"{"message":42}"#),
        ("/messages", json, r#"{"message":"a","message":"b"}"#),
        ("/messages", json, r#"{"other":"no message"}"#),
        ("/messages", json, ""),
        ("/messages", json, &big),
        ("/messages", json, r#"{"message":"down"}"#),
        ("/messages", json, r#"{"message":"shed"}"#),
        ("/messages", json, r#"{"message":"too large"}"#),
    ];
    let mut statuses = Vec::new();
    for (path, content_type, body) in cases {
        let (status, headers, text) = answer(&routed, post(path, content_type, body)).await;
        let (f_status, f_headers, f_text) =
            answer(&front_only, post(path, content_type, body)).await;
        let case = format!("POST {path} {content_type:?} {body:.40}");
        assert_eq!(f_status, status, "{case}");
        assert_eq!(f_text, text, "{case}");
        assert_eq!(f_headers, headers, "{case}");
        assert_eq!(f_headers[&REQUEST_ID], "front-test", "{case}");
        statuses.push(status.as_u16());
    }
    // Every kind of answer was compared, not only the happy path.
    for expected in [201, 400, 413, 415, 503] {
        assert!(
            statuses.contains(&expected),
            "no {expected} in {statuses:?}"
        );
    }
}

#[tokio::test]
async fn the_front_counts_its_posts_under_the_route() {
    // A service label of its own: the metrics are process-wide, and other tests of this
    // binary count POSTs of "ingest".
    const SERVICE: &str = "ingest-front-count";
    let log = scripted_log();
    let (routes, front) = ingest::router_and_front(log.clone(), settings(), SERVICE);
    let app = msghash_common::http::service_app(SERVICE, routes, || async { true });
    let labels = [
        ("service", SERVICE),
        ("route", "/messages"),
        ("method", "POST"),
        ("status", "201"),
    ];
    let before = scrape(&app).await.sum(names::HTTP_REQUESTS_TOTAL, &labels);
    let (status, headers, body) = answer(
        &fronted(Some(front), Router::new()),
        post(
            "/messages",
            Some("application/json"),
            r#"{"message":"hello"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        headers[header::LOCATION],
        "/messages/2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert_eq!(log.appended.load(Ordering::Relaxed), 1);
    let after = scrape(&app).await.sum(names::HTTP_REQUESTS_TOTAL, &labels);
    assert_eq!(after - before, 1.0);
}
