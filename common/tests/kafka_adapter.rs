//! The Kafka adapter against the test run's Apache Kafka broker (KRaft), each test in a
//! topic of its own; and, for the one fault a shared broker cannot be made to show (the
//! broker going away mid-test), against librdkafka's in-process mock cluster.

use msghash_common::adapters::kafka::{KafkaLog, KafkaSettings};
use msghash_common::ports::{LogError, LogRecord, Subscription};
use msghash_common::{partition_for, EventLog, MessageHashed};
use msghash_testkit::servers;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use std::num::NonZeroU32;
use std::time::Duration;
use tokio::time::Instant;

const TWO: NonZeroU32 = NonZeroU32::new(2).unwrap();
const FOUR: NonZeroU32 = NonZeroU32::new(4).unwrap();

/// The topic on the mock cluster, which is this test's own.
const TOPIC: &str = "messages";

/// Settings for the mock cluster, which cannot create topics through the admin API (the
/// test does) nor describe their configs.
fn mock_settings(brokers: String, partitions: NonZeroU32) -> KafkaSettings {
    let mut s = KafkaSettings::local(brokers, TOPIC, partitions);
    s.message_timeout = Duration::from_millis(1_500);
    s.create_topic = false;
    s.verify_compaction = false;
    s
}

/// Polls until `want` records arrived or `within` passed.
async fn collect(sub: &mut dyn Subscription, want: usize, within: Duration) -> Vec<LogRecord> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let batch = sub
            .next_batch(100, Duration::from_millis(200))
            .await
            .expect("poll");
        got.extend(batch);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_resumes_from_commits_and_replays_from_zero() {
    msghash_common::telemetry::init_for_tests();
    let log = KafkaLog::connect(servers::kafka_settings("adapter", FOUR))
        .await
        .expect("connect");

    let events: Vec<_> = (0..20)
        .map(|i| MessageHashed::new(format!("message {i}")))
        .collect();
    for e in &events {
        let p = partition_for(&e.digest, FOUR);
        let before = log.end_offset(p).await.expect("end offset");
        let offset = log.append(p, e).await.expect("append");
        assert_eq!(
            offset, before,
            "an append lands at the end of its partition"
        );
        assert_eq!(log.end_offset(p).await.expect("end offset"), before + 1);
    }

    let mut sub = log.subscribe("g1").await.expect("subscribe");
    let got = collect(sub.as_mut(), 20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20);
    for r in &got {
        let e = MessageHashed::decode(r.key.as_deref(), r.value.as_deref()).expect("decodes");
        assert_eq!(
            r.partition,
            partition_for(&e.digest, FOUR),
            "explicit partition kept"
        );
        assert!(events
            .iter()
            .any(|x| x.digest == e.digest && x.message == e.message));
    }
    let mut done: Vec<(u32, i64)> = Vec::new();
    for r in &got {
        match done.iter_mut().find(|(p, _)| *p == r.partition) {
            Some((_, o)) => *o = (*o).max(r.offset),
            None => done.push((r.partition, r.offset)),
        }
    }
    sub.commit(&done).await.expect("commit");
    drop(sub);

    let late = MessageHashed::new("late".into());
    log.append(partition_for(&late.digest, FOUR), &late)
        .await
        .expect("append");

    // Same group: resumes after its commits, so only the new event comes.
    let mut again = log.subscribe("g1").await.expect("subscribe");
    let resumed = collect(again.as_mut(), 1, Duration::from_secs(30)).await;
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].key.as_deref(), Some(late.key()));
    drop(again);

    // A new group replays the whole log from offset 0.
    let mut replay = log.subscribe("g2").await.expect("subscribe");
    let all = collect(replay.as_mut(), 21, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 21);
}

#[tokio::test]
async fn refuses_a_topic_with_another_partition_count() {
    let settings = servers::kafka_settings("partitions", FOUR);
    KafkaLog::connect(settings.clone())
        .await
        .expect("creates the topic with 4 partitions");
    let err = KafkaLog::connect(KafkaSettings {
        partitions: NonZeroU32::new(8).expect("8"),
        ..settings
    })
    .await
    .err()
    .expect("must refuse");
    assert!(matches!(err, LogError::Misconfigured(_)), "{err}");
    assert!(err.to_string().contains("4 partitions"), "{err}");
    let code = LogError::exit_code(&anyhow::Error::new(err));
    assert_eq!(code, 2, "a service refuses to start with exit code 2");
}

/// A topic somebody created by hand with the default `cleanup.policy=delete` would lose
/// events to retention; the adapter finds it with DescribeConfigs and refuses it.
#[tokio::test]
async fn refuses_a_topic_that_is_not_compacted() {
    let mut settings = servers::kafka_settings("not_compacted", TWO);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", servers::kafka_brokers())
        .create()
        .expect("admin client");
    let topic = NewTopic::new(&settings.topic, 2, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete");
    let created = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    settings.create_topic = false;
    let err = KafkaLog::connect(settings.clone())
        .await
        .err()
        .expect("must refuse a topic with cleanup.policy=delete");
    assert!(matches!(err, LogError::Misconfigured(_)), "{err}");
    assert!(err.to_string().contains("cleanup.policy=delete"), "{err}");
    // With create_topic on, an existing topic is left as it is and still refused.
    settings.create_topic = true;
    let err = KafkaLog::connect(settings)
        .await
        .err()
        .expect("still refused");
    assert!(matches!(err, LogError::Misconfigured(_)), "{err}");
}

#[tokio::test]
async fn a_broker_that_is_down_fails_appends_instead_of_hanging() {
    // The shared broker cannot be stopped under the other tests: MockCluster takes it down.
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 2, 1).expect("topic");
    let log = KafkaLog::connect(mock_settings(cluster.bootstrap_servers(), TWO))
        .await
        .expect("connect");
    let e = MessageHashed::new("x".into());
    log.append(0, &e).await.expect("append while up");
    cluster.broker_down(1).expect("broker down");
    let result = tokio::time::timeout(Duration::from_secs(20), log.append(0, &e))
        .await
        .expect("append must give up, not hang");
    assert!(
        matches!(result, Err(LogError::Unavailable(_))),
        "{result:?}"
    );
}

/// The largest message a 1 MiB body can carry is an event the topic and the producer take
/// (before: librdkafka refused it, above its 1,000,000-byte default, and every retry too).
/// Past the limit, the error says no retry helps.
#[tokio::test]
async fn a_message_as_large_as_the_body_limit_allows_is_appended() {
    let log = KafkaLog::connect(servers::kafka_settings("large", TWO))
        .await
        .expect("connect");
    let big = MessageHashed::new("x".repeat(1024 * 1024 - 20));
    let p = partition_for(&big.digest, TWO);
    log.append(p, &big)
        .await
        .expect("a 1 MiB message is appended");

    let huge = MessageHashed::new("x".repeat(log.settings().max_message_bytes + 1));
    let p = partition_for(&huge.digest, TWO);
    match log.append(p, &huge).await {
        Err(LogError::TooLarge(_)) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// After a fatal error of the idempotent producer (which then refuses every event), the
/// adapter replaces it: the next append goes through, and readiness recovers. Before, every
/// later append failed until the process restarted.
#[tokio::test]
async fn a_fatal_producer_error_is_followed_by_a_new_producer() {
    let log = KafkaLog::connect(servers::kafka_settings("fatal", TWO))
        .await
        .expect("connect");
    let first = MessageHashed::new("before".into());
    log.append(partition_for(&first.digest, TWO), &first)
        .await
        .expect("append");
    log.raise_fatal_error_for_tests();
    assert!(
        log.ready().await.is_err(),
        "not ready while the producer is fatally failed"
    );
    let during = MessageHashed::new("during".into());
    let failed = log
        .append(partition_for(&during.digest, TWO), &during)
        .await;
    assert!(
        matches!(failed, Err(LogError::Unavailable(_))),
        "{failed:?}"
    );
    let after = MessageHashed::new("after".into());
    log.append(partition_for(&after.digest, TWO), &after)
        .await
        .expect("a new producer appends");
    log.ready().await.expect("ready again");
}

/// A leader election takes a few seconds (the dead broker's session must expire). An
/// append in that window waits for the new leader instead of failing: the producer keeps
/// delivering for `message_timeout` (30 s by default), and only the caller's own deadline
/// (ingest's 5 s) bounds the wait. Before, the default was 2 s, and an append that met a
/// 3 s election failed with a delivery timeout.
#[tokio::test]
async fn an_append_waits_through_a_leader_election() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 2, 1).expect("topic");
    let mut settings = KafkaSettings::local(cluster.bootstrap_servers(), TOPIC, TWO);
    settings.create_topic = false;
    settings.verify_compaction = false;
    let log = KafkaLog::connect(settings).await.expect("connect");
    let e = MessageHashed::new("through the election".into());
    log.append(0, &e).await.expect("append while up");
    cluster.broker_down(1).expect("broker down");
    let restore = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.broker_up(1).expect("broker up");
    };
    let (appended, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), log.append(0, &e)),
        restore
    );
    appended
        .expect("no hang")
        .expect("the append waits for the broker instead of timing out");
}
