//! The projection loop against the test run's real servers (see `msghash_testkit::servers`):
//! an Apache Kafka broker for the log and an Apache Cassandra node for the read model, each
//! test in a topic, a keyspace and consumer groups of its own.

use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::adapters::scylla::ScyllaGenerations;
use msghash_common::ports::{LogError, LogRecord, Subscription};
use msghash_common::shutdown::Shutdown;
use msghash_common::{
    partition_for, Digest, EventLog, MessageHashed, ModelGenerations, ProjectionBatch, ReadModel,
};
use msghash_testkit::process::ServiceProcess;
use msghash_testkit::servers;
use projector::{run_projection, ProjectorSettings, ProjectorStats};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep, Instant};

const PARTITIONS: NonZeroU32 = NonZeroU32::new(2).unwrap();

async fn wait_until_projected(log: &KafkaLog, model: &dyn ReadModel, messages: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for p in 0..PARTITIONS.get() {
            let end = log.end_offset(p).await.expect("end");
            let applied = model.applied_offset(p).await.expect("applied");
            done &= end == 0 || applied == Some(end - 1);
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "projection did not catch up");
        sleep(Duration::from_millis(50)).await;
    }
    for m in messages {
        assert_eq!(
            model.get(&Digest::of(m)).await.expect("get").as_deref(),
            Some(m.as_str())
        );
    }
}

fn start(
    log: &Arc<KafkaLog>,
    generations: &Arc<ScyllaGenerations>,
    group: &str,
) -> (
    Arc<ProjectorStats>,
    Shutdown,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let stats = Arc::new(ProjectorStats::default());
    let shutdown = Shutdown::new();
    let settings = ProjectorSettings {
        group: group.into(),
        batch_size: 7,
        poll_wait: Duration::from_millis(100),
        lag_interval: Duration::from_millis(200),
        generation_check: Duration::from_millis(200),
    };
    let task = tokio::spawn(run_projection(
        log.clone(),
        generations.clone(),
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    (stats, shutdown, task)
}

/// Appends a record that does not decode (not an event) to `partition` of `topic`.
async fn append_poison(topic: &str, partition: i32) {
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers::kafka_brokers())
        .create()
        .expect("producer");
    raw.send(
        FutureRecord::to(topic)
            .partition(partition)
            .key(&b"not a digest"[..])
            .payload(&b"\xff not json"[..]),
        Duration::from_secs(5),
    )
    .await
    .expect("poison appended");
}

async fn append_all(log: &KafkaLog, messages: &[String]) {
    for m in messages {
        let e = MessageHashed::new(m.clone());
        log.append(partition_for(&e.digest, PARTITIONS), &e)
            .await
            .expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_skips_poison_resumes_after_restart_and_replays_from_zero() {
    msghash_common::telemetry::init_for_tests();
    // The adapter creates the topic (and its dead-letter topic) on connect.
    let settings = servers::kafka_settings("projection", PARTITIONS);
    let topic = settings.topic.clone();
    let log = Arc::new(KafkaLog::connect(settings).await.expect("kafka"));
    let generations = Arc::new(
        ScyllaGenerations::connect(&servers::scylla_settings("projection"))
            .await
            .expect("scylla"),
    );
    // Consumer groups are per broker, not per topic: each test has its own.
    let group = servers::unique_name("projector");
    let model = generations.open(0).await.expect("generation 0");

    let first: Vec<String> = (0..40).map(|i| format!("first {i}")).collect();
    append_all(&log, &first[..20]).await;
    // A poison record in the middle of partition 0.
    append_poison(&topic, 0).await;
    append_all(&log, &first[20..]).await;

    let (stats, shutdown, task) = start(&log, &generations, &group);
    wait_until_projected(&log, model.as_ref(), &first).await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    assert_eq!(stats.applied_events.load(Ordering::Relaxed), 40);
    assert_eq!(
        log.dead_letter_count().await.expect("count"),
        1,
        "poison kept in the DLQ"
    );
    let status = projector::Status::read(log.as_ref(), generations.as_ref())
        .await
        .expect("status");
    assert_eq!(status.total_lag(), 0, "{status}");
    assert_eq!(status.dead_lettered, 1);
    assert_eq!(status.partitions.len(), PARTITIONS.get() as usize);
    let text = status.to_string();
    assert!(text.contains("dead-lettered events: 1"), "{text}");
    assert!(text.contains("total lag: 0"), "{text}");
    assert!(text.contains("active generation: 0"), "{text}");
    assert_eq!(status.active_generation, 0);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // Restart: resumes after the committed positions, nothing is applied twice.
    let second: Vec<String> = (0..10).map(|i| format!("second {i}")).collect();
    append_all(&log, &second).await;
    let (stats, shutdown, task) = start(&log, &generations, &group);
    wait_until_projected(&log, model.as_ref(), &second).await;
    assert_eq!(stats.applied_events.load(Ordering::Relaxed), 10);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // A new group replays the whole log from offset 0, poison included.
    let (stats, shutdown, task) = start(&log, &generations, &format!("{group}-replay"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.applied_events.load(Ordering::Relaxed) < 50 {
        assert!(Instant::now() < deadline, "replay did not finish");
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");
}

async fn https_get(client: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_serves_health_and_metrics_over_tls() {
    use msghash_common::metrics::names;
    use msghash_common::tls::CERT_FILE;
    use msghash_testkit::exposition;

    // The projector runs as its own process, so the metrics it serves are its own: no other
    // test of this binary, running beside it, can add to them.
    msghash_common::telemetry::init_for_tests();
    // The service creates the topic on connect; the test's own log below shares it.
    let settings = servers::kafka_settings("projector_http", PARTITIONS);
    let scylla = servers::scylla_settings("projector_http");
    let certs = tempfile::tempdir().expect("tempdir");
    let args = [
        format!("--kafka-brokers={}", settings.brokers),
        format!("--topic={}", settings.topic),
        format!("--partitions={PARTITIONS}"),
        format!(
            "--kafka-session-timeout-ms={}",
            settings.session_timeout.as_millis()
        ),
        format!("--scylla-nodes={}", scylla.nodes.join(",")),
        format!("--keyspace={}", scylla.keyspace),
        format!("--cert-dir={}", certs.path().display()),
        format!("--group={}", servers::unique_name("projector_http")),
    ];
    let service = ServiceProcess::start(
        env!("CARGO_BIN_EXE_projector"),
        &args,
        Duration::from_secs(120),
    )
    .await;
    let base = service.base_url();

    // The certificate is written by build; the port is bound, so it answers at once.
    let pem = std::fs::read(certs.path().join(CERT_FILE)).expect("certificate written");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let (status, _) = https_get(&client, &format!("{base}/health/live"))
        .await
        .expect("live answers");
    assert_eq!(status, 200);
    let (status, body) = https_get(&client, &format!("{base}/health/ready"))
        .await
        .expect("ready answers");
    assert_eq!(status, 200, "{body}");

    // Events go through; the metrics show them applied, timed, and the lag back at 0.
    let log = KafkaLog::connect(settings).await.expect("kafka");
    let messages: Vec<String> = (0..12).map(|i| format!("observed {i}")).collect();
    append_all(&log, &messages).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = https_get(&client, &format!("{base}/metrics"))
            .await
            .expect("metrics answer");
        assert_eq!(status, 200);
        let e = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let applied = e.sum(names::PROJECTOR_EVENTS_APPLIED_TOTAL, &[]);
        let lags: Vec<f64> = (0..PARTITIONS.get())
            .map(|p| {
                e.matching(names::PROJECTOR_LAG, &[("partition", &p.to_string())])
                    .map(|s| s.value)
                    .next()
                    .unwrap_or(f64::NAN)
            })
            .collect();
        if applied >= 12.0 && lags.iter().all(|l| *l == 0.0) {
            assert_eq!(e.type_of(names::PROJECTOR_LAG), Some("gauge"));
            assert_eq!(
                e.type_of(names::PROJECTOR_EVENTS_APPLIED_TOTAL),
                Some("counter")
            );
            assert_eq!(
                e.type_of(names::PROJECTOR_DEAD_LETTERED_TOTAL),
                Some("counter")
            );
            assert_eq!(
                e.type_of(names::PROJECTOR_BATCH_DURATION_SECONDS),
                Some("histogram")
            );
            let batches = format!("{}_count", names::PROJECTOR_BATCH_DURATION_SECONDS);
            assert!(e.sum(&batches, &[]) >= 1.0);
            assert!(e.has(
                names::HTTP_REQUESTS_TOTAL,
                &[
                    ("service", "projector"),
                    ("route", "/health/ready"),
                    ("status", "200")
                ]
            ));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "applied {applied}, lags {lags:?}\n{text}"
        );
        sleep(Duration::from_millis(200)).await;
    }

    let status = service.stop(Duration::from_secs(30)).await;
    assert!(status.success(), "clean stop on SIGTERM: {status}");
}

/// A read model restored from an older backup is behind its consumer group: the group
/// resumes past what the model holds. The projector must catch the model up from the
/// model's own applied offsets instead of trusting the group (before: the events between
/// the backup and the group's position were never applied, and read-your-writes answered
/// 404 for them for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_restored_from_an_older_backup_is_caught_up() {
    msghash_common::telemetry::init_for_tests();
    let log = Arc::new(
        KafkaLog::connect(servers::kafka_settings("restored", PARTITIONS))
            .await
            .expect("kafka"),
    );
    let live = Arc::new(
        ScyllaGenerations::connect(&servers::scylla_settings("restored_live"))
            .await
            .expect("scylla"),
    );
    let group = servers::unique_name("restored");
    let before: Vec<String> = (0..20).map(|i| format!("before the backup {i}")).collect();
    append_all(&log, &before).await;
    let model = live.open(0).await.expect("generation 0");
    let (_, shutdown, task) = start(&log, &live, &group);
    wait_until_projected(&log, model.as_ref(), &before).await;
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // The backup: another keyspace holding exactly what the live one holds now.
    let backup = Arc::new(
        ScyllaGenerations::connect(&servers::scylla_settings("restored_backup"))
            .await
            .expect("scylla"),
    );
    let restored = backup.open(0).await.expect("generation 0");
    let mut batch = ProjectionBatch::default();
    for m in &before {
        let e = MessageHashed::new(m.clone());
        batch.messages.push((e.digest, e.message));
    }
    for p in 0..PARTITIONS.get() {
        if let Some(o) = model.applied_offset(p).await.expect("applied") {
            batch.applied.push((p, o));
        }
    }
    restored.apply(&batch).await.expect("backup written");

    // The live model goes on; the group commits past the backup.
    let after: Vec<String> = (0..20).map(|i| format!("after the backup {i}")).collect();
    append_all(&log, &after).await;
    let (_, shutdown, task) = start(&log, &live, &group);
    wait_until_projected(&log, model.as_ref(), &after).await;
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // The live model is lost; the backup is restored under the same group. Some new events
    // arrive too, so the group both has records to deliver and is past the backup.
    let later: Vec<String> = (0..5).map(|i| format!("after the restore {i}")).collect();
    append_all(&log, &later).await;
    let (_, shutdown, task) = start(&log, &backup, &group);
    let everything: Vec<String> = [before, after, later].concat();
    wait_until_projected(&log, restored.as_ref(), &everything).await;
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");
}

/// The Kafka log, with dead-letter writes that fail while `failing` is set.
struct FlakyDeadLetters {
    log: KafkaLog,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl EventLog for FlakyDeadLetters {
    fn partitions(&self) -> NonZeroU32 {
        self.log.partitions()
    }
    async fn append(&self, p: u32, e: &MessageHashed) -> Result<i64, LogError> {
        self.log.append(p, e).await
    }
    async fn end_offset(&self, p: u32) -> Result<i64, LogError> {
        self.log.end_offset(p).await
    }
    async fn dead_letter(&self, r: &LogRecord, reason: &str) -> Result<(), LogError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(LogError::Unavailable("dead-letter topic unwritable".into()));
        }
        self.log.dead_letter(r, reason).await
    }
    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        self.log.dead_letter_count().await
    }
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError> {
        self.log.subscribe(group).await
    }
}

/// A dead letter that cannot be written holds back only its own partition, at the poison
/// record: the other partitions go on, nothing after the poison is applied or committed,
/// and once the dead letter can be written the partition catches up. Before, the batch
/// retried the dead letter for ever and every partition stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_keeps_failing_holds_back_only_its_partition() {
    msghash_common::telemetry::init_for_tests();
    let settings = servers::kafka_settings("held", PARTITIONS);
    let topic = settings.topic.clone();
    let log = Arc::new(FlakyDeadLetters {
        log: KafkaLog::connect(settings).await.expect("kafka"),
        failing: std::sync::atomic::AtomicBool::new(true),
    });
    let generations = Arc::new(
        ScyllaGenerations::connect(&servers::scylla_settings("held"))
            .await
            .expect("scylla"),
    );
    let on = |p: u32, tag: &str| -> Vec<String> {
        (0..)
            .map(|i| format!("{tag} {i}"))
            .filter(|m| partition_for(&Digest::of(m), PARTITIONS) == p)
            .take(5)
            .collect()
    };
    let (before, after, other) = (on(0, "before"), on(0, "after"), on(1, "other"));
    append_all(&log.log, &before).await;
    append_poison(&topic, 0).await;
    append_all(&log.log, &after).await;
    append_all(&log.log, &other).await;

    let stats = Arc::new(ProjectorStats::default());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(run_projection(
        log.clone(),
        generations.clone(),
        ProjectorSettings {
            group: servers::unique_name("held"),
            batch_size: 7,
            poll_wait: Duration::from_millis(100),
            ..ProjectorSettings::default()
        },
        stats.clone(),
        shutdown.clone(),
    ));
    let model = generations.open(0).await.expect("generation 0");
    let readable = |messages: Vec<String>| {
        let model = model.clone();
        async move {
            for m in &messages {
                if model.get(&Digest::of(m)).await.expect("get").is_none() {
                    return false;
                }
            }
            true
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(readable(other.clone()).await && readable(before.clone()).await) {
        assert!(Instant::now() < deadline, "the other partition stalled");
        sleep(Duration::from_millis(100)).await;
    }
    // Held: partition 0 stops at the poison record (offset 5) while the dead letter fails.
    while stats.held_partitions() != vec![0] {
        assert!(Instant::now() < deadline, "partition 0 not reported held");
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(model.applied_offset(0).await.expect("applied"), Some(4));
    for m in &after {
        assert_eq!(model.get(&Digest::of(m)).await.expect("get"), None, "{m}");
    }

    log.failing.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !readable(after.clone()).await || !stats.held_partitions().is_empty() {
        assert!(Instant::now() < deadline, "partition 0 did not catch up");
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    assert_eq!(log.dead_letter_count().await.expect("count"), 1);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");
}
