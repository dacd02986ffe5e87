//! The servers of this test run and names that keep tests apart on them.
//!
//! `scripts/test` starts one Kafka broker (KRaft) and one Cassandra node before the tests
//! and exports where they listen in `MSGHASH_TEST_KAFKA` and `MSGHASH_TEST_CQL`. Each test
//! then works in a topic and a keyspace of its own ([`unique_name`]), so tests run in
//! parallel on the same servers without seeing each other's data.

use msghash_common::adapters::kafka::KafkaSettings;
use msghash_common::adapters::scylla::{Keyspace, ScyllaSettings};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the test run's Kafka broker listens (`host:port`).
pub const KAFKA_ENV: &str = "MSGHASH_TEST_KAFKA";
/// Where the test run's Cassandra node serves CQL (`host:port`).
pub const CQL_ENV: &str = "MSGHASH_TEST_CQL";

fn required(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs the {what} that scripts/test starts; run it \
             through scripts/test (e.g. `scripts/test -E 'test(<name>)'`), or start the \
             servers with scripts/test-servers and export what it prints"
        ),
    }
}

/// The test run's Kafka bootstrap address.
pub fn kafka_brokers() -> String {
    required(KAFKA_ENV, "Kafka broker")
}

/// The test run's CQL contact point.
pub fn cql_node() -> String {
    required(CQL_ENV, "Cassandra node")
}

/// A name no other test of this run (or of an earlier run on the same servers) uses:
/// `<prefix>_<pid>_<counter>_<time>`, lower-case ASCII, digits and `_`, at most 48
/// characters, so it is valid as a Kafka topic and as a CQL keyspace alike.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000_000)
        .unwrap_or_default();
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(16)
        .collect();
    let prefix = if prefix.starts_with(|c: char| c.is_ascii_lowercase()) {
        prefix
    } else {
        format!("t{prefix}")
    };
    format!("{prefix}_{:x}_{n}_{micros:x}", std::process::id())
}

/// Settings for a topic of its own on the test run's broker, created (compacted, with its
/// dead-letter topic) by the adapter on connect.
pub fn kafka_settings(prefix: &str, partitions: NonZeroU32) -> KafkaSettings {
    let mut s = KafkaSettings::local(kafka_brokers(), unique_name(prefix), partitions);
    // Short enough that a test of a failure does not wait long, long enough for a busy
    // 2-core machine.
    s.message_timeout = Duration::from_secs(5);
    s.session_timeout = Duration::from_secs(6);
    s
}

/// Settings for a keyspace of its own on the test run's Cassandra node.
pub fn scylla_settings(prefix: &str) -> ScyllaSettings {
    ScyllaSettings::local(cql_node(), unique_keyspace(prefix))
}

/// A keyspace name no other test uses ([`unique_name`]).
pub fn unique_keyspace(prefix: &str) -> Keyspace {
    Keyspace::parse(&unique_name(prefix)).expect("unique names are keyspace names")
}

/// Drops `keyspace` on the test run's Cassandra node: a read model lost in one statement.
pub async fn drop_keyspace(keyspace: &Keyspace) {
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(cql_node())
        .build()
        .await
        .expect("a session on the test run's Cassandra node");
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .expect("DROP KEYSPACE");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_valid_keyspaces_and_differ() {
        let a = unique_name("Conformance-Test!");
        let b = unique_name("Conformance-Test!");
        assert_ne!(a, b);
        for name in [
            a,
            b,
            unique_name("9lives"),
            unique_name("a_very_long_prefix_indeed"),
        ] {
            assert!(Keyspace::parse(&name).is_ok(), "{name}");
        }
    }
}
