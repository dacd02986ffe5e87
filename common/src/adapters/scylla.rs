//! `ReadModel` on ScyllaDB, through the `scylla` driver.
//!
//! Two tables in one keyspace:
//! - `messages (digest blob PRIMARY KEY, message text)`: the projection itself;
//! - `projection_offsets (partition int PRIMARY KEY, applied_offset bigint)`: per event-log
//!   partition, the highest offset whose event is in `messages`.
//!
//! Every statement is prepared (so the driver routes it to a replica of its partition key)
//! and marked idempotent: an upsert of the same digest with the same message is a no-op, so
//! the driver may retry it and the projector may replay a batch.

use crate::ports::{ModelError, Offset, ProjectionBatch, ReadModel};
use crate::Digest;
use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use std::time::Duration;

/// How to reach the cluster and how to create the keyspace when it is missing.
#[derive(Debug, Clone)]
pub struct ScyllaSettings {
    /// `host:port` contact points.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The replication map used when msghash creates the keyspace, in CQL, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`.
    pub replication: String,
    pub consistency: Consistency,
}

impl ScyllaSettings {
    /// Settings for a single local node, handy in tests.
    pub fn local(node: impl Into<String>, keyspace: impl Into<String>) -> Self {
        ScyllaSettings {
            nodes: vec![node.into()],
            keyspace: keyspace.into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: Consistency::LocalQuorum,
        }
    }
}

/// Keyspace names are interpolated into CQL, so only plain identifiers are accepted.
pub fn valid_keyspace(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 48
}

/// The replication map is interpolated into CQL: accept one `{...}` map and nothing else.
pub fn valid_replication(map: &str) -> bool {
    let m = map.trim();
    m.starts_with('{') && m.ends_with('}') && !m.contains(';') && m.matches('{').count() == 1
}

pub struct ScyllaModel {
    session: Session,
    insert_message: PreparedStatement,
    select_message: PreparedStatement,
    upsert_offset: PreparedStatement,
    select_offset: PreparedStatement,
    list_first: PreparedStatement,
    list_after: PreparedStatement,
}

/// How many row writes of one batch are in flight at once.
const WRITE_CONCURRENCY: usize = 64;

fn unavailable(e: impl std::fmt::Display) -> ModelError {
    ModelError::Unavailable(e.to_string())
}

impl ScyllaModel {
    /// Connects, creates the keyspace and tables if missing, and prepares the statements.
    pub async fn connect(settings: &ScyllaSettings) -> Result<Self, ModelError> {
        if !valid_keyspace(&settings.keyspace) {
            return Err(ModelError::Corrupt(format!(
                "invalid keyspace name {:?}",
                settings.keyspace
            )));
        }
        if !valid_replication(&settings.replication) {
            return Err(ModelError::Corrupt(format!(
                "invalid replication map {:?}",
                settings.replication
            )));
        }
        let session = SessionBuilder::new()
            .known_nodes(&settings.nodes)
            .connection_timeout(Duration::from_secs(5))
            .build()
            .await
            .map_err(unavailable)?;
        let ks = &settings.keyspace;
        for ddl in [
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
                settings.replication
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.messages (digest blob PRIMARY KEY, message text)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.projection_offsets \
                 (partition int PRIMARY KEY, applied_offset bigint)"
            ),
        ] {
            session.query_unpaged(ddl, ()).await.map_err(unavailable)?;
        }
        let prepare = |cql: String| {
            let session = &session;
            async move {
                let mut p = session.prepare(cql).await.map_err(unavailable)?;
                p.set_consistency(settings.consistency);
                p.set_is_idempotent(true);
                Ok::<_, ModelError>(p)
            }
        };
        Ok(ScyllaModel {
            insert_message: prepare(format!(
                "INSERT INTO {ks}.messages (digest, message) VALUES (?, ?)"
            ))
            .await?,
            select_message: prepare(format!(
                "SELECT message FROM {ks}.messages WHERE digest = ?"
            ))
            .await?,
            upsert_offset: prepare(format!(
                "INSERT INTO {ks}.projection_offsets (partition, applied_offset) VALUES (?, ?)"
            ))
            .await?,
            select_offset: prepare(format!(
                "SELECT applied_offset FROM {ks}.projection_offsets WHERE partition = ?"
            ))
            .await?,
            // Listing walks the token ring: the cursor is the last digest of a page, and
            // the next page starts after its token.
            list_first: prepare(format!("SELECT digest FROM {ks}.messages LIMIT ?")).await?,
            list_after: prepare(format!(
                "SELECT digest FROM {ks}.messages WHERE token(digest) > token(?) LIMIT ?"
            ))
            .await?,
            session,
        })
    }
}

fn partition_key(partition: u32) -> Result<i32, ModelError> {
    i32::try_from(partition).map_err(|_| ModelError::Corrupt(format!("partition {partition}")))
}

#[async_trait]
impl ReadModel for ScyllaModel {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError> {
        // Rows first: once an offset is visible, every row up to it must be readable.
        for chunk in batch.messages.chunks(WRITE_CONCURRENCY) {
            let mut writes = Vec::with_capacity(chunk.len());
            for (digest, message) in chunk {
                writes.push(self.session.execute_unpaged(
                    &self.insert_message,
                    (&digest.as_bytes()[..], message.as_str()),
                ));
            }
            futures::future::try_join_all(writes)
                .await
                .map_err(unavailable)?;
        }
        for &(partition, offset) in &batch.applied {
            self.session
                .execute_unpaged(&self.upsert_offset, (partition_key(partition)?, offset))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        let result = self
            .session
            .execute_unpaged(&self.select_message, (&digest.as_bytes()[..],))
            .await
            .map_err(unavailable)?;
        let rows = result
            .into_rows_result()
            .map_err(|e| ModelError::Corrupt(e.to_string()))?;
        let row = rows
            .maybe_first_row::<(String,)>()
            .map_err(|e| ModelError::Corrupt(e.to_string()))?;
        Ok(row.map(|(m,)| m))
    }

    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        let result = self
            .session
            .execute_unpaged(&self.select_offset, (partition_key(partition)?,))
            .await
            .map_err(unavailable)?;
        let rows = result
            .into_rows_result()
            .map_err(|e| ModelError::Corrupt(e.to_string()))?;
        let row = rows
            .maybe_first_row::<(i64,)>()
            .map_err(|e| ModelError::Corrupt(e.to_string()))?;
        Ok(row.map(|(o,)| o))
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError> {
        let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
        let result = match after {
            None => {
                self.session
                    .execute_unpaged(&self.list_first, (limit,))
                    .await
            }
            Some(d) => {
                self.session
                    .execute_unpaged(&self.list_after, (&d.as_bytes()[..], limit))
                    .await
            }
        }
        .map_err(unavailable)?;
        let rows = result
            .into_rows_result()
            .map_err(|e| ModelError::Corrupt(e.to_string()))?;
        let mut digests = Vec::new();
        for row in rows
            .rows::<(Vec<u8>,)>()
            .map_err(|e| ModelError::Corrupt(e.to_string()))?
        {
            let (bytes,) = row.map_err(|e| ModelError::Corrupt(e.to_string()))?;
            digests.push(
                Digest::from_bytes(&bytes)
                    .ok_or_else(|| ModelError::Corrupt(format!("{}-byte digest", bytes.len())))?,
            );
        }
        Ok(digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_keyspaces() {
        assert!(valid_keyspace("msghash"));
        assert!(valid_keyspace("msghash_test_2"));
        for bad in [
            "",
            "1abc",
            "Msghash",
            "a-b",
            "a;drop",
            "a.b",
            &"a".repeat(49),
        ] {
            assert!(!valid_keyspace(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_one_map_is_a_replication_setting() {
        assert!(valid_replication(
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        ));
        assert!(!valid_replication("{'a': 1}; DROP KEYSPACE x"));
        assert!(!valid_replication("'a'"));
    }
}
