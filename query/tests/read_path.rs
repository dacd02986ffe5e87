//! The read path's contract and its read-your-writes barrier, through the router, with the
//! Kafka adapter on the test run's Apache Kafka broker and the ScyllaDB adapter on its
//! Apache Cassandra node (a topic and a keyspace of its own per test). No projector runs:
//! the test plays the projector by applying batches itself.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::adapters::scylla::ScyllaModel;
use msghash_common::metrics::names;
use msghash_common::{partition_for, Digest, EventLog, MessageHashed, ProjectionBatch, ReadModel};
use msghash_testkit::exposition;
use msghash_testkit::router::{call_text, get_message, scrape};
use msghash_testkit::servers;
use query::QuerySettings;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

const PARTITIONS: NonZeroU32 = NonZeroU32::new(2).unwrap();

struct Fixture {
    /// Query with a read-your-writes deadline of 500 ms, for the 503 of a miss.
    app: Router,
    /// The same with 30 s, for a GET that must outwait a projection on a busy machine.
    patient: Router,
    log: Arc<KafkaLog>,
    /// The read model itself, for the test playing the projector.
    model: Arc<ScyllaModel>,
    /// The same model as `patient` sees it, telling when that query asks for applied
    /// offsets. Its own: the reads `app`'s barrier may still be making (for a GET that has
    /// already had its 503) must not pass for the patient GET's.
    watched: Arc<Watched>,
    keyspace: msghash_common::adapters::scylla::Keyspace,
}

/// The read model as query sees it. It counts the applied-offset reads, which the
/// read-your-writes barrier makes while a miss waits, so a test can act exactly while a GET
/// waits instead of hoping the timing works out.
struct Watched {
    inner: Arc<ScyllaModel>,
    asked: tokio::sync::watch::Sender<u64>,
}

#[async_trait::async_trait]
impl ReadModel for Watched {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), msghash_common::ModelError> {
        self.inner.apply(batch).await
    }
    async fn get(&self, digest: &Digest) -> Result<Option<String>, msghash_common::ModelError> {
        self.inner.get(digest).await
    }
    async fn applied_offset(
        &self,
        partition: u32,
    ) -> Result<Option<i64>, msghash_common::ModelError> {
        let offset = self.inner.applied_offset(partition).await;
        self.asked.send_modify(|n| *n += 1);
        offset
    }
    async fn list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Digest>, msghash_common::ModelError> {
        self.inner.list(after, limit).await
    }
}

impl Watched {
    /// Waits until query has read applied offsets more than `times` times in all.
    async fn asked_more_than(&self, times: u64) {
        let mut asked = self.asked.subscribe();
        tokio::time::timeout(Duration::from_secs(30), asked.wait_for(|n| *n > times))
            .await
            .expect("query asked the read model while the GET waited")
            .expect("sender alive");
    }
}

async fn fixture() -> Fixture {
    let log = Arc::new(
        KafkaLog::connect(servers::kafka_settings("read_path", PARTITIONS))
            .await
            .expect("kafka"),
    );
    let settings = servers::scylla_settings("read_path");
    let model = Arc::new(ScyllaModel::connect(&settings).await.expect("scylla"));
    let watched_model = || {
        Arc::new(Watched {
            inner: model.clone(),
            asked: tokio::sync::watch::Sender::new(0),
        })
    };
    let watched = watched_model();
    let app_with = |deadline, model: Arc<Watched>| {
        query::app(
            log.clone(),
            model,
            QuerySettings {
                read_your_writes_timeout: deadline,
                ..Default::default()
            },
        )
    };
    let app = app_with(Duration::from_millis(500), watched_model());
    let patient = app_with(Duration::from_secs(30), watched.clone());
    Fixture {
        app,
        patient,
        log,
        model,
        watched,
        keyspace: settings.keyspace,
    }
}

/// `GET /messages/{digest}`: status, `Retry-After`, JSON body.
async fn get(app: &Router, digest: &str) -> (StatusCode, Option<String>, serde_json::Value) {
    let (status, headers, body) = get_message(app, digest).await;
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    (status, retry_after, body)
}

async fn text(app: &Router, path: &str) -> (StatusCode, String) {
    let request = Request::get(path).body(Body::empty()).expect("request");
    let (status, _, text) = call_text(app, request).await;
    (status, text)
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
    let f = fixture().await;
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
    let f = fixture().await;
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

    // The projector catches up while a GET waits: the GET answers 200. The batch is applied
    // once the GET is seen waiting at the barrier, not before. (Its query has a deadline
    // of 30 s: the apply and the barrier's next look must not race 500 ms.)
    let asked = *f.watched.asked.borrow();
    let waiting = tokio::spawn({
        let (app, digest) = (f.patient.clone(), digest.clone());
        async move { get(&app, &digest).await }
    });
    f.watched.asked_more_than(asked).await;
    f.model
        .apply(&projected("pending", p, offset))
        .await
        .expect("apply");
    let (status, _, body) = waiting.await.expect("the GET task");
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
    let f = fixture().await;
    assert_eq!(text(&f.app, "/health/live").await.0, StatusCode::OK);
    assert_eq!(text(&f.app, "/health/ready").await.0, StatusCode::OK);
    // The read model gone (its keyspace dropped): not ready.
    servers::drop_keyspace(&f.keyspace).await;
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
