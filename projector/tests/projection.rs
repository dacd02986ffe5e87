//! The projection loop against the real-protocol stand-ins: librdkafka's mock cluster for
//! the log and the CQL test server for the read model.

use msghash_common::adapters::kafka::{KafkaLog, KafkaSettings};
use msghash_common::adapters::scylla::{ScyllaModel, ScyllaSettings};
use msghash_common::shutdown::Shutdown;
use msghash_common::{partition_for, Digest, EventLog, MessageHashed, ReadModel};
use projector::{run_projection, ProjectorSettings, ProjectorStats};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep, Instant};

const PARTITIONS: u32 = 2;

async fn wait_until_projected(log: &KafkaLog, model: &ScyllaModel, messages: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for p in 0..PARTITIONS {
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
    model: &Arc<ScyllaModel>,
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
    };
    let task = tokio::spawn(run_projection(
        log.clone(),
        model.clone(),
        settings,
        stats.clone(),
        shutdown.clone(),
    ));
    (stats, shutdown, task)
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
    let cluster = MockCluster::new(1).expect("cluster");
    cluster
        .create_topic("messages", PARTITIONS as i32, 1)
        .expect("topic");
    let mut settings = KafkaSettings::local(cluster.bootstrap_servers(), "messages", PARTITIONS);
    settings.create_topic = false;
    settings.session_timeout = Duration::from_secs(3);
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

    let first: Vec<String> = (0..40).map(|i| format!("first {i}")).collect();
    append_all(&log, &first[..20]).await;
    // A poison record in the middle of partition 0.
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .expect("producer");
    raw.send(
        FutureRecord::to("messages")
            .partition(0)
            .key(&b"not a digest"[..])
            .payload(&b"\xff not json"[..]),
        Duration::from_secs(5),
    )
    .await
    .expect("poison appended");
    append_all(&log, &first[20..]).await;

    let (stats, shutdown, task) = start(&log, &model, "projector");
    wait_until_projected(&log, &model, &first).await;
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    assert_eq!(stats.applied_events.load(Ordering::Relaxed), 40);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // Restart: resumes after the committed positions, nothing is applied twice.
    let second: Vec<String> = (0..10).map(|i| format!("second {i}")).collect();
    append_all(&log, &second).await;
    let (stats, shutdown, task) = start(&log, &model, "projector");
    wait_until_projected(&log, &model, &second).await;
    assert_eq!(stats.applied_events.load(Ordering::Relaxed), 10);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");

    // A new group replays the whole log from offset 0, poison included.
    let (stats, shutdown, task) = start(&log, &model, "projector-replay");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.applied_events.load(Ordering::Relaxed) < 50 {
        assert!(Instant::now() < deadline, "replay did not finish");
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");
}
