//! A GET that misses answers within its read-your-writes deadline even when the broker does
//! not answer: the real Kafka adapter, connected to librdkafka's mock cluster whose only
//! broker is then taken down, and 200 concurrent misses on one partition. Every one gets
//! `503` with `Retry-After` and the JSON error body, within the deadline plus a margin.
//!
//! And a miss whose read model hangs on the read after the barrier answers by its deadline
//! too.
//!
//! No test server is needed: the mock cluster runs in this process.

use msghash_common::adapters::kafka::{KafkaLog, KafkaSettings};
use msghash_common::{partition_for, Digest, ModelError, Offset, ProjectionBatch, ReadModel};
use msghash_testkit::fakes::OffsetsOnly;
use msghash_testkit::router::get_message;
use query::QuerySettings;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTITIONS: NonZeroU32 = NonZeroU32::new(4).unwrap();
const TOPIC: &str = "messages";
/// `MSGHASH_RYW_TIMEOUT_MS` of the app under test.
const DEADLINE: Duration = Duration::from_millis(500);
/// What a loaded 2-core machine may add to the deadline before the answer is out. The
/// defects these tests guard against take far longer: GETs queued behind each other's 2 s
/// end-offset reads, or held until the 30 s request timeout.
const MARGIN: Duration = Duration::from_secs(2);
const GETS: usize = 200;

/// `GETS` digests that all live on partition 0 and were never written.
fn misses_on_partition_0() -> Vec<String> {
    (0u64..)
        .map(|i| Digest::of(&format!("never written {i}")))
        .filter(|d| partition_for(d, PARTITIONS) == 0)
        .take(GETS)
        .map(|d| d.to_hex())
        .collect()
}

/// librdkafka's in-process mock cluster with the topic, and the real Kafka adapter on it.
async fn mock_cluster_and_log() -> (MockCluster<'static, DefaultProducerContext>, Arc<KafkaLog>) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(TOPIC, PARTITIONS.get() as i32, 1)
        .expect("topic");
    let mut settings = KafkaSettings::local(cluster.bootstrap_servers(), TOPIC, PARTITIONS);
    // The mock cluster creates topics only through its own API, and cannot describe their
    // configs.
    settings.create_topic = false;
    settings.verify_compaction = false;
    let log = Arc::new(KafkaLog::connect(settings).await.expect("connect"));
    (cluster, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_get_503_within_the_deadline_while_the_broker_is_down() {
    let (cluster, log) = mock_cluster_and_log().await;
    let app = query::app(
        log,
        Arc::new(OffsetsOnly::default()),
        QuerySettings {
            read_your_writes_timeout: DEADLINE,
            ..Default::default()
        },
    );
    cluster.broker_down(1).expect("broker down");

    let mut gets = tokio::task::JoinSet::new();
    for digest in misses_on_partition_0() {
        let app = app.clone();
        gets.spawn(async move {
            let began = Instant::now();
            let answer = get_message(&app, &digest).await;
            (began.elapsed(), answer)
        });
    }
    // Without the fix the GETs queued behind each other's end-offset reads (2 s each against
    // a dead broker): bound the whole test so that it fails instead of running for minutes.
    let answers = tokio::time::timeout(Duration::from_secs(60), gets.join_all())
        .await
        .expect("every GET answered within a minute");
    assert_eq!(answers.len(), GETS);
    let slowest = answers
        .iter()
        .map(|(took, _)| *took)
        .max()
        .unwrap_or_default();
    println!("{GETS} misses, deadline {DEADLINE:?}: the slowest answered after {slowest:?}");
    for (took, (status, headers, body)) in &answers {
        assert_eq!(status.as_u16(), 503, "{body}");
        assert_eq!(
            headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
            "1"
        );
        assert_eq!(
            body,
            &serde_json::json!({"err_msg": "Service temporarily unavailable, retry later"})
        );
        assert!(
            *took <= DEADLINE + MARGIN,
            "a GET took {took:?}, past the deadline of {DEADLINE:?} (+{MARGIN:?}); slowest \
             {slowest:?}"
        );
    }
}

/// A read model that misses every digest once (`misses` reads), then never answers a read
/// again.
#[derive(Default)]
struct MissThenHang {
    misses: usize,
    gets: std::sync::atomic::AtomicUsize,
    offsets: OffsetsOnly,
}

#[async_trait::async_trait]
impl ReadModel for MissThenHang {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError> {
        self.offsets.apply(batch).await
    }
    async fn get(&self, _: &Digest) -> Result<Option<String>, ModelError> {
        if self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < self.misses {
            Ok(None)
        } else {
            std::future::pending().await
        }
    }
    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        self.offsets.applied_offset(partition).await
    }
    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError> {
        self.offsets.list(after, limit).await
    }
}

/// The read after the barrier, and the first read, are bounded by the deadline too. Before,
/// a read model that hung there held the GET until the service's 30 s request timeout.
#[tokio::test]
async fn a_get_gets_503_within_the_deadline_when_the_read_model_hangs() {
    // The log is empty and up: the barrier passes at once.
    let (_cluster, log) = mock_cluster_and_log().await;
    // A miss, then a hang after the barrier; a hang from the first read.
    for misses in [1, 0] {
        let app = query::app(
            log.clone(),
            Arc::new(MissThenHang {
                misses,
                ..MissThenHang::default()
            }),
            QuerySettings {
                read_your_writes_timeout: DEADLINE,
                ..Default::default()
            },
        );
        let digest = Digest::of("never written").to_hex();
        let began = Instant::now();
        let (status, headers, body) =
            tokio::time::timeout(Duration::from_secs(60), get_message(&app, &digest))
                .await
                .expect("the GET answered within a minute");
        let took = began.elapsed();
        assert_eq!(status.as_u16(), 503, "{body}");
        assert_eq!(
            headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_eq!(
            body,
            serde_json::json!({"err_msg": "Service temporarily unavailable, retry later"})
        );
        assert!(
            took <= DEADLINE + MARGIN,
            "misses {misses}: the GET took {took:?}"
        );
    }
}

/// A read model that finds every digest, after 50 ms.
struct SlowHit;

#[async_trait::async_trait]
impl ReadModel for SlowHit {
    async fn apply(&self, _: &ProjectionBatch) -> Result<(), ModelError> {
        Ok(())
    }
    async fn get(&self, _: &Digest) -> Result<Option<String>, ModelError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Some("found".into()))
    }
    async fn applied_offset(&self, _: u32) -> Result<Option<Offset>, ModelError> {
        Ok(None)
    }
    async fn list(&self, _: Option<&Digest>, _: usize) -> Result<Vec<Digest>, ModelError> {
        Ok(Vec::new())
    }
}

/// `MSGHASH_RYW_TIMEOUT_MS=0` means a miss does not wait, not that a hit fails: the first
/// read gets at least a second. Before, a hit that took 50 ms answered 503.
#[tokio::test]
async fn a_zero_read_your_writes_timeout_still_answers_hits() {
    let (_cluster, log) = mock_cluster_and_log().await;
    let app = query::app(
        log,
        Arc::new(SlowHit),
        QuerySettings {
            read_your_writes_timeout: Duration::ZERO,
            ..QuerySettings::default()
        },
    );
    let (status, _, body) = get_message(&app, &Digest::of("found").to_hex()).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body, serde_json::json!({"message": "found"}));
}
