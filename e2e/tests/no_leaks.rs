//! No internal error text in any answer: every way the event log and the read model can
//! fail is provoked under the ingest and query apps (the routers the services and the
//! standalone binary serve), each with a recognisable secret in its error text. Every
//! answer must be one of the fixed JSON sentences, and the log line of the same request id
//! must carry the cause.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Request};
use msghash_common::http::{fronted, Fronted};
use msghash_common::ports::{
    LogError, LogRecord, ModelError, Offset, ProjectionBatch, Subscription,
};
use msghash_common::{Digest, EventLog, MessageHashed, ReadModel};
use msghash_testkit::router::call_text;
use std::io::Write;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The text every provoked error carries, which no answer may contain.
const SECRET: &str = "SECRET-10.9.8.7:9092-internal";

/// The sentences an answer may hold.
const FIXED: [&str; 4] = [
    "Service temporarily unavailable, retry later",
    "Message too large for the event log",
    "Message not found",
    "Not found",
];

#[derive(Clone, Copy, Debug)]
enum LogFault {
    Unavailable,
    Shed,
    Rejected,
    TooLarge,
    Misconfigured,
}

impl LogFault {
    fn error(self) -> LogError {
        let text = format!("{SECRET} ({self:?})");
        match self {
            LogFault::Unavailable => LogError::Unavailable(text),
            LogFault::Shed => LogError::Shed(text),
            LogFault::Rejected => LogError::Rejected(text),
            LogFault::TooLarge => LogError::TooLarge(text),
            LogFault::Misconfigured => LogError::Misconfigured(text),
        }
    }
}

/// An event log on which everything fails with `fault`.
struct BrokenLog(LogFault);

#[async_trait]
impl EventLog for BrokenLog {
    fn partitions(&self) -> NonZeroU32 {
        NonZeroU32::new(4).expect("4")
    }
    async fn append(&self, _: u32, _: &MessageHashed) -> Result<Offset, LogError> {
        Err(self.0.error())
    }
    async fn ready(&self) -> Result<(), LogError> {
        Err(self.0.error())
    }
    async fn end_offset(&self, _: u32) -> Result<Offset, LogError> {
        Err(self.0.error())
    }
    async fn dead_letter(&self, _: &LogRecord, _: &str) -> Result<(), LogError> {
        Err(self.0.error())
    }
    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        Err(self.0.error())
    }
    async fn subscribe(&self, _: &str) -> Result<Box<dyn Subscription>, LogError> {
        Err(self.0.error())
    }
}

/// A read model on which everything fails, with an I/O error underneath, or with data it
/// did not expect.
struct BrokenModel {
    corrupt: bool,
}

impl BrokenModel {
    fn error(&self) -> ModelError {
        if self.corrupt {
            ModelError::Corrupt(format!("{SECRET} (corrupt row)"))
        } else {
            ModelError::unavailable(
                "read",
                std::io::Error::other(format!("{SECRET} (connection reset)")),
            )
        }
    }
}

#[async_trait]
impl ReadModel for BrokenModel {
    async fn apply(&self, _: &ProjectionBatch) -> Result<(), ModelError> {
        Err(self.error())
    }
    async fn get(&self, _: &Digest) -> Result<Option<String>, ModelError> {
        Err(self.error())
    }
    async fn applied_offset(&self, _: u32) -> Result<Option<Offset>, ModelError> {
        Err(self.error())
    }
    async fn list(&self, _: Option<&Digest>, _: usize) -> Result<Vec<Digest>, ModelError> {
        Err(self.error())
    }
}

/// Log output captured for this thread's subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

/// Calls `app` with `request`: the answer must be a fixed JSON sentence without the secret,
/// and some log line with its request id must hold the secret. `app` is what a server
/// serves: a router, with or without the front that answers some requests before it.
async fn assert_no_leak(app: &Fronted, request: Request<Body>, logs: &Captured, what: &str) {
    let (status, headers, text) = call_text(app, request).await;
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{what}: {status}"
    );
    assert_ne!(status, 500, "{what}: a provoked failure is never a 500");
    assert!(
        !text.contains("SECRET"),
        "{what}: leaked in the answer: {text}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
    let sentence = body["err_msg"].as_str().unwrap_or_default();
    assert!(
        FIXED.contains(&sentence),
        "{what}: unexpected answer {text}"
    );
    assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{what}");
    let id = headers["x-request-id"].to_str().expect("request id");
    let logged = logs.text();
    assert!(
        logged
            .lines()
            .any(|line| line.contains(id) && line.contains(SECRET)),
        "{what}: no log line with request id {id} and the cause:\n{logged}"
    );
}

fn post() -> Request<Body> {
    Request::post("/messages")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"message":"hello"}"#))
        .expect("request")
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

#[tokio::test]
async fn no_dependency_failure_reaches_an_answer_and_each_cause_is_logged_with_the_request_id() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let digest = Digest::of("hello").to_hex();
    for fault in [
        LogFault::Unavailable,
        LogFault::Shed,
        LogFault::Rejected,
        LogFault::TooLarge,
        LogFault::Misconfigured,
    ] {
        let log: Arc<dyn EventLog> = Arc::new(BrokenLog(fault));
        let (app, front) = ingest::app_and_front(
            log.clone(),
            ingest::IngestSettings {
                deadline: Duration::from_millis(200),
                ..ingest::IngestSettings::default()
            },
        );
        let ingest = fronted(None, app.clone());
        assert_no_leak(&ingest, post(), &logs, &format!("POST, log {fault:?}")).await;
        // As the server answers it: before routing, without the request's span (no router
        // behind the front, so that the answer can only be the front's).
        let served = fronted(Some(front), axum::Router::new());
        let what = format!("POST answered by the front, log {fault:?}");
        assert_no_leak(&served, post(), &logs, &what).await;
        assert_no_leak(
            &ingest,
            get("/health/ready"),
            &logs,
            &format!("ingest ready, log {fault:?}"),
        )
        .await;
    }
    // A miss whose read-your-writes barrier cannot read the log's end offset.
    let query = fronted(
        None,
        query::app(
            Arc::new(BrokenLog(LogFault::Unavailable)),
            Arc::new(msghash_testkit::fakes::OffsetsOnly::default()),
            query::QuerySettings {
                read_your_writes_timeout: Duration::from_millis(200),
                ..query::QuerySettings::default()
            },
        ),
    );
    for path in [format!("/messages/{digest}"), "/health/ready".to_owned()] {
        assert_no_leak(
            &query,
            get(&path),
            &logs,
            &format!("GET {path}, miss, log down"),
        )
        .await;
    }
    for corrupt in [false, true] {
        let what = if corrupt { "corrupt" } else { "unavailable" };
        let model: Arc<dyn ReadModel> = Arc::new(BrokenModel { corrupt });
        let log: Arc<dyn EventLog> = Arc::new(BrokenLog(LogFault::Unavailable));
        // As the server serves it, behind its front (the hit cache).
        let (app, front) = query::app_and_front(
            log,
            model,
            query::QuerySettings {
                read_your_writes_timeout: Duration::from_millis(200),
                ..query::QuerySettings::default()
            },
        );
        let query = fronted(front, app);
        for path in [
            format!("/messages/{digest}"),
            format!("/message/{digest}"),
            "/messages?limit=10".to_owned(),
            "/health/ready".to_owned(),
        ] {
            assert_no_leak(
                &query,
                get(&path),
                &logs,
                &format!("GET {path}, model {what}"),
            )
            .await;
        }
    }
}
