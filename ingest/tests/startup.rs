//! The `ingest` binary refuses to start on a topic that would lose or misplace events, with
//! a clear error and exit code 2, against the test run's real Kafka broker.

use msghash_testkit::servers;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::process::{Command, Output};
use std::time::Duration;

/// Creates `topic` by hand, as an operator might, with the given cleanup policy.
async fn create_topic(topic: &str, partitions: i32, cleanup_policy: &str) {
    create_topic_with(topic, partitions, &[("cleanup.policy", cleanup_policy)]).await;
}

/// Creates `topic` by hand with the given topic configs.
async fn create_topic_with(topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", servers::kafka_brokers())
        .create()
        .expect("admin client");
    let new = configs.iter().fold(
        NewTopic::new(topic, partitions, TopicReplication::Fixed(1)),
        |new, (name, value)| new.set(name, value),
    );
    let created = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topics");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}

/// Runs `ingest` on `topic` with `partitions` (and `env`) configured, until it exits by
/// itself.
async fn ingest_on(topic: &str, partitions: u32, env: &[(&str, &str)]) -> Output {
    let certs = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command
        .env("MSGHASH_KAFKA_BROKERS", servers::kafka_brokers())
        .env("MSGHASH_TOPIC", topic)
        .env("MSGHASH_PARTITIONS", partitions.to_string())
        .env("MSGHASH_LISTEN", "127.0.0.1:0")
        .env("MSGHASH_CERT_DIR", certs.path())
        .env("MSGHASH_LOG", "error")
        .envs(env.iter().copied());
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("ingest exits by itself instead of serving")
    .expect("join")
    .expect("ingest runs");
    drop(certs);
    output
}

/// Runs `ingest` on `topic` and expects it to refuse to start: exit code 2 and `says` on
/// stderr.
async fn expect_refusal(topic: &str, partitions: u32, env: &[(&str, &str)], says: &str) {
    let output = ingest_on(topic, partitions, env).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(says), "{says:?} not in: {stderr}");
}

#[tokio::test]
async fn refuses_a_topic_that_is_not_compacted_with_exit_code_2() {
    let topic = servers::unique_name("not_compacted");
    create_topic(&topic, 4, "delete").await;
    let says =
        format!("topic {topic} has cleanup.policy=delete but msghash needs cleanup.policy=compact");
    expect_refusal(&topic, 4, &[], &says).await;
}

#[tokio::test]
async fn refuses_a_topic_with_another_partition_count_with_exit_code_2() {
    let topic = servers::unique_name("partitions");
    create_topic(&topic, 3, "compact").await;
    expect_refusal(&topic, 4, &[], "has 3 partitions but 4 are configured").await;
}

#[tokio::test]
async fn refuses_a_topic_with_fewer_replicas_than_configured_with_exit_code_2() {
    let topic = servers::unique_name("replicas");
    create_topic(&topic, 4, "compact").await;
    let says =
        format!("topic {topic} has a partition with 1 replicas but MSGHASH_TOPIC_REPLICATION is 3");
    expect_refusal(&topic, 4, &[("MSGHASH_TOPIC_REPLICATION", "3")], &says).await;
}

#[tokio::test]
async fn refuses_a_min_isr_above_the_replication_with_exit_code_2() {
    let topic = servers::unique_name("min_isr");
    let says = "MSGHASH_TOPIC_MIN_ISR (2) is above MSGHASH_TOPIC_REPLICATION (1)";
    expect_refusal(&topic, 4, &[("MSGHASH_TOPIC_MIN_ISR", "2")], says).await;
}

/// The topic's own limits must be at least msghash's (here `max.message.bytes`, checked with
/// `min.insync.replicas` in one loop): below, the broker would refuse or under-replicate
/// events ingest acknowledges.
#[tokio::test]
async fn refuses_a_topic_whose_message_size_limit_is_below_the_body_limit_with_exit_code_2() {
    let topic = servers::unique_name("max_bytes");
    let configs = [("cleanup.policy", "compact"), ("max.message.bytes", "1000")];
    create_topic_with(&topic, 4, &configs).await;
    let says = format!("topic {topic} has max.message.bytes=1000, below 1114112");
    expect_refusal(&topic, 4, &[], &says).await;
}
