//! The ScyllaDB adapter against the test run's Apache Cassandra node, through the real
//! `scylla` driver, each test in a keyspace of its own.

use msghash_common::adapters::scylla::{Keyspace, ScyllaModel, ScyllaSettings};
use msghash_common::{Digest, ProjectionBatch, ReadModel};
use msghash_testkit::servers;

async fn model() -> ScyllaModel {
    msghash_common::telemetry::init_for_tests();
    let settings = servers::scylla_settings("scylla_adapter");
    ScyllaModel::connect(&settings).await.expect("connect")
}

fn batch(messages: &[&str], applied: &[(u32, i64)]) -> ProjectionBatch {
    ProjectionBatch {
        messages: messages
            .iter()
            .map(|m| (Digest::of(m), m.to_string()))
            .collect(),
        applied: applied.to_vec(),
    }
}

#[tokio::test]
async fn applies_rows_and_offsets_and_reads_them_back() {
    let model = model().await;
    assert_eq!(model.applied_offset(0).await.expect("offset"), None);
    assert_eq!(model.get(&Digest::of("foo")).await.expect("get"), None);

    let unicode = "héllo 🌍 日本 \"quoted\"\n";
    model
        .apply(&batch(&["foo", "", unicode], &[(0, 7), (3, 2)]))
        .await
        .expect("apply");
    for m in ["foo", "", unicode] {
        assert_eq!(
            model.get(&Digest::of(m)).await.expect("get").as_deref(),
            Some(m),
            "byte-exact round trip of {m:?}"
        );
    }
    assert_eq!(model.applied_offset(0).await.expect("offset"), Some(7));
    assert_eq!(model.applied_offset(3).await.expect("offset"), Some(2));
    assert_eq!(model.applied_offset(1).await.expect("offset"), None);
}

#[tokio::test]
async fn applying_a_batch_twice_changes_nothing() {
    let model = model().await;
    let b = batch(&["a", "b"], &[(1, 10)]);
    model.apply(&b).await.expect("apply");
    model.apply(&b).await.expect("apply again");
    assert_eq!(
        model.get(&Digest::of("a")).await.expect("get").as_deref(),
        Some("a")
    );
    assert_eq!(model.applied_offset(1).await.expect("offset"), Some(10));
}

#[tokio::test]
async fn a_second_connect_finds_the_existing_schema_and_data() {
    let settings = servers::scylla_settings("reconnect");
    let first = ScyllaModel::connect(&settings).await.expect("connect");
    first
        .apply(&batch(&["kept"], &[(0, 0)]))
        .await
        .expect("apply");
    let second = ScyllaModel::connect(&settings).await.expect("reconnect");
    assert_eq!(
        second
            .get(&Digest::of("kept"))
            .await
            .expect("get")
            .as_deref(),
        Some("kept")
    );
}

#[tokio::test]
async fn large_batches_are_written_completely() {
    let model = model().await;
    let messages: Vec<String> = (0..1500).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = messages.iter().map(String::as_str).collect();
    model
        .apply(&batch(&refs, &[(2, 1499)]))
        .await
        .expect("apply");
    for m in &messages {
        assert_eq!(
            model.get(&Digest::of(m)).await.expect("get").as_deref(),
            Some(m.as_str())
        );
    }
}

#[tokio::test]
async fn an_unreachable_cluster_is_an_error_not_a_hang() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let keyspace = Keyspace::parse("msghash").expect("keyspace");
    let settings = ScyllaSettings::local(format!("127.0.0.1:{port}"), keyspace);
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        ScyllaModel::connect(&settings),
    )
    .await
    .expect("connect gives up");
    assert!(result.is_err());
}
