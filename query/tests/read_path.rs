//! The read path's contract and its read-your-writes barrier, through the router, with the
//! Kafka adapter on librdkafka's mock cluster and the ScyllaDB adapter on the CQL test
//! server. No projector runs: the test plays the projector by applying batches itself.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use msghash_common::adapters::kafka::{KafkaLog, KafkaSettings};
use msghash_common::adapters::scylla::{ScyllaModel, ScyllaSettings};
use msghash_common::metrics::{exposition, names};
use msghash_common::{partition_for, Digest, EventLog, MessageHashed, ProjectionBatch, ReadModel};
use query::QuerySettings;
use rdkafka::mocking::MockCluster;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const PARTITIONS: u32 = 2;

struct Fixture {
    app: Router,
    log: Arc<KafkaLog>,
    model: Arc<ScyllaModel>,
    _cql: cql_server::Server,
}

async fn fixture(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>) -> Fixture {
    cluster
        .create_topic("messages", PARTITIONS as i32, 1)
        .expect("topic");
    let mut settings = KafkaSettings::local(cluster.bootstrap_servers(), "messages", PARTITIONS);
    settings.create_topic = false;
    let log = Arc::new(KafkaLog::connect(settings).await.expect("kafka"));
    let cql = cql_server::start("127.0.0.1:0").await.expect("cql");
    let model = Arc::new(
        ScyllaModel::connect(&ScyllaSettings::local(
            cql.local_addr().to_string(),
            "msghash",
        ))
        .await
        .expect("scylla"),
    );
    let app = query::app(
        log.clone(),
        model.clone(),
        QuerySettings {
            read_your_writes_timeout: Duration::from_millis(500),
        },
    );
    Fixture {
        app,
        log,
        model,
        _cql: cql,
    }
}

async fn get(app: &Router, digest: &str) -> (StatusCode, Option<String>, serde_json::Value) {
    let request = Request::get(format!("/messages/{digest}"))
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        retry_after,
        serde_json::from_slice(&bytes).expect("JSON body"),
    )
}

async fn text(app: &Router, path: &str) -> (StatusCode, String) {
    let request = Request::get(path).body(Body::empty()).expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// `GET /metrics`, checked as Prometheus text.
async fn scrape(app: &Router) -> exposition::Exposition {
    let (status, text) = text(app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn waits(e: &exposition::Exposition, outcome: &str) -> f64 {
    e.sum(names::QUERY_BARRIER_WAITS_TOTAL, &[("outcome", outcome)])
}

/// Appends like ingest does and returns (partition, offset).
async fn append(log: &KafkaLog, message: &str) -> (u32, i64) {
    let event = MessageHashed::new(message.into());
    let p = partition_for(&event.digest, PARTITIONS);
    (p, log.append(p, &event).await.expect("append"))
}

fn projected(message: &str, partition: u32, offset: i64) -> ProjectionBatch {
    ProjectionBatch {
        messages: vec![(Digest::of(message), message.to_owned())],
        applied: vec![(partition, offset)],
    }
}

#[tokio::test]
async fn unknown_and_malformed_digests_are_404_at_once_on_a_caught_up_model() {
    let cluster = MockCluster::new(1).expect("cluster");
    let f = fixture(&cluster).await;
    let not_found = serde_json::json!({"err_msg": "Message not found"});
    let unknown = Digest::of("nobody").to_hex();
    for digest in [
        unknown.as_str(),
        "abc",
        &"g".repeat(64),
        &"0".repeat(65),
        "%FF%FE",
    ] {
        let (status, _, body) = get(&f.app, digest).await;
        assert_eq!(
            (status, &body),
            (StatusCode::NOT_FOUND, &not_found),
            "{digest}"
        );
    }
}

#[tokio::test]
async fn a_miss_waits_for_the_projector_and_never_answers_a_false_404() {
    let cluster = MockCluster::new(1).expect("cluster");
    let f = fixture(&cluster).await;
    let (p, offset) = append(&f.log, "pending").await;
    let digest = Digest::of("pending").to_hex();
    let before = scrape(&f.app).await;
    for outcome in ["caught_up", "behind", "error"] {
        assert!(
            before.has(names::QUERY_BARRIER_WAITS_TOTAL, &[("outcome", outcome)]),
            "{outcome} is there before any wait"
        );
    }

    // Written but not projected: the truth is unknown within the bound, so 503, not 404.
    let (status, retry_after, body) = get(&f.app, &digest).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(body["err_msg"].is_string());

    // The projector catches up while a GET waits: the GET answers 200.
    let waiting = get(&f.app, &digest);
    let batch = projected("pending", p, offset);
    let projecting = f.model.apply(&batch);
    let ((status, _, body), applied) = tokio::join!(waiting, projecting);
    applied.expect("apply");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"message": "pending"}));

    // Upper-case hex is the same digest; an unknown digest of a caught-up partition is 404.
    let (status, _, _) = get(&f.app, &digest.to_uppercase()).await;
    assert_eq!(status, StatusCode::OK);
    let other = (0..)
        .map(|i| Digest::of(&format!("other {i}")))
        .find(|d| partition_for(d, PARTITIONS) == p)
        .expect("some digest maps to p");
    let (status, _, _) = get(&f.app, &other.to_hex()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let after = scrape(&f.app).await;
    assert!(waits(&after, "behind") >= waits(&before, "behind") + 1.0);
    assert!(waits(&after, "caught_up") >= waits(&before, "caught_up") + 2.0);
    assert!(after.has(
        names::HTTP_REQUESTS_TOTAL,
        &[
            ("service", "query"),
            ("route", "/messages/{digest}"),
            ("method", "GET"),
            ("status", "503")
        ]
    ));
}

#[tokio::test]
async fn ready_when_the_log_and_the_read_model_answer() {
    let cluster = MockCluster::new(1).expect("cluster");
    let f = fixture(&cluster).await;
    assert_eq!(text(&f.app, "/health/live").await.0, StatusCode::OK);
    assert_eq!(text(&f.app, "/health/ready").await.0, StatusCode::OK);
    // The read model gone: not ready.
    f._cql.shutdown().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = text(&f.app, "/health/ready").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(text(&f.app, "/health/live").await.0, StatusCode::OK);
}
