//! The write path's HTTP contract, driven through the router against the Kafka adapter on
//! the test run's Apache Kafka broker (a topic of its own per test); the broker going down
//! is shown on librdkafka's mock cluster, since the shared broker cannot be stopped.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use ingest::IngestSettings;
use msghash_common::adapters::kafka::{KafkaLog, KafkaSettings};
use msghash_common::http::REQUEST_ID;
use msghash_common::metrics::names;
use msghash_common::{partition_for, EventLog, MessageHashed};
use msghash_testkit::exposition;
use msghash_testkit::router::{call, scrape};
use msghash_testkit::servers;
use rdkafka::mocking::MockCluster;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

const PARTITIONS: NonZeroU32 = NonZeroU32::new(4).unwrap();

async fn app_on(settings: KafkaSettings) -> (Router, Arc<KafkaLog>) {
    let log = Arc::new(KafkaLog::connect(settings).await.expect("connect"));
    let router = ingest::app(
        log.clone(),
        IngestSettings {
            body_limit: 1024,
            deadline: Duration::from_secs(3),
        },
    );
    (router, log)
}

/// The router on a topic of its own on the test run's broker.
async fn app() -> (Router, Arc<KafkaLog>) {
    app_on(servers::kafka_settings("ingest", PARTITIONS)).await
}

fn post(body: impl Into<Body>, content_type: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/messages");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(body.into()).expect("request")
}

#[tokio::test]
async fn post_answers_201_with_digest_and_location_after_the_event_is_on_the_log() {
    let (app, log) = app().await;
    let foo = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
    let p = partition_for(&msghash_common::Digest::of("foo"), PARTITIONS);
    let before = log.end_offset(p).await.expect("end");

    let (status, headers, body) =
        call(&app, post(r#"{"message":"foo"}"#, Some("application/json"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, serde_json::json!({ "digest": foo }));
    assert_eq!(
        headers[header::LOCATION],
        format!("/messages/{foo}").as_str()
    );
    assert_eq!(
        log.end_offset(p).await.expect("end"),
        before + 1,
        "event appended to partition {p}"
    );

    // The empty string is a message; charset parameters are fine.
    let (status, _, body) = call(
        &app,
        post(r#"{"message":""}"#, Some("application/json; charset=utf-8")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        body["digest"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let unicode = "héllo 🌍 日本";
    let (status, _, body) = call(
        &app,
        post(
            serde_json::json!({ "message": unicode }).to_string(),
            Some("application/json"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        body["digest"],
        MessageHashed::new(unicode.into()).digest.to_hex()
    );
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_nothing_is_appended() {
    let (app, log) = app().await;
    let cases: Vec<(Request<Body>, StatusCode)> = vec![
        (
            post("{not json", Some("application/json")),
            StatusCode::BAD_REQUEST,
        ),
        (
            post("{}", Some("application/json")),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(r#"{"message": 42}"#, Some("application/json")),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(r#"{"message": null}"#, Some("application/json")),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(r#"["foo"]"#, Some("application/json")),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(r#"{"message":"\ud800"}"#, Some("application/json")),
            StatusCode::BAD_REQUEST,
        ),
        (
            post(r#"{"message":"foo"}"#, Some("text/plain")),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            post(r#"{"message":"foo"}"#, None),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            post(
                format!(r#"{{"message":"{}"}}"#, "x".repeat(2000)),
                Some("application/json"),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Request::get("/messages")
                .body(Body::empty())
                .expect("request"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Request::get("/nowhere")
                .body(Body::empty())
                .expect("request"),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (request, want) in cases {
        let (status, _, body) = call(&app, request).await;
        assert_eq!(status, want, "want {want}: {body}");
        assert!(
            body["err_msg"].is_string(),
            "err_msg on every error: {body}"
        );
    }
    for p in 0..PARTITIONS.get() {
        assert_eq!(log.end_offset(p).await.expect("end"), 0, "nothing appended");
    }
}

#[tokio::test]
async fn a_broker_that_is_down_gets_503_with_retry_after_within_the_deadline() {
    let cluster = MockCluster::new(1).expect("cluster");
    cluster
        .create_topic("messages", PARTITIONS.get() as i32, 1)
        .expect("topic");
    let mut settings = KafkaSettings::local(cluster.bootstrap_servers(), "messages", PARTITIONS);
    // The mock cluster creates topics only through its own API, and cannot describe their
    // configs.
    settings.create_topic = false;
    settings.verify_compaction = false;
    // librdkafka gives up on a message to the downed broker after this, well within the
    // request's deadline. Only here: on the real broker a loaded machine may take longer
    // than this to acknowledge, and the deadline bounds those POSTs anyway.
    settings.message_timeout = Duration::from_millis(800);
    let (app, _log) = app_on(settings).await;
    let before = scrape(&app).await;
    let failures = |e: &exposition::Exposition| e.sum(names::INGEST_PRODUCE_FAILURES_TOTAL, &[]);
    let acked = |e: &exposition::Exposition| {
        e.sum(
            &format!("{}_count", names::INGEST_PRODUCE_DURATION_SECONDS),
            &[],
        )
    };
    assert_eq!(
        before.type_of(names::INGEST_PRODUCE_FAILURES_TOTAL),
        Some("counter"),
        "the failure counter is there before any failure"
    );
    let (status, headers, _) =
        call(&app, post(r#"{"message":"up"}"#, Some("application/json"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.contains_key(REQUEST_ID));
    let after_up = scrape(&app).await;
    assert_eq!(
        after_up.type_of(names::INGEST_PRODUCE_DURATION_SECONDS),
        Some("histogram")
    );
    assert!(acked(&after_up) >= acked(&before) + 1.0);
    assert!(after_up.has(
        names::HTTP_REQUESTS_TOTAL,
        &[
            ("service", "ingest"),
            ("route", "/messages"),
            ("method", "POST"),
            ("status", "201")
        ]
    ));

    cluster.broker_down(1).expect("down");
    let started = std::time::Instant::now();
    let (status, headers, body) = call(
        &app,
        post(r#"{"message":"down"}"#, Some("application/json")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(
        body["err_msg"],
        "Service temporarily unavailable, retry later"
    );
    // The deadline is 3 s; allow generous slack for a loaded machine, but no hang.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let after_down = scrape(&app).await;
    assert!(failures(&after_down) >= failures(&after_up) + 1.0);
    assert!(after_down.has(
        names::HTTP_REQUESTS_TOTAL,
        &[("service", "ingest"), ("status", "503")]
    ));
}
