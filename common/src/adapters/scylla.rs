//! `ReadModel` on ScyllaDB, through the `scylla` driver.
//!
//! Two tables per read-model generation in one keyspace (generation N ≥ 1 adds `_g<N>` to
//! both names, see [`table_names`]):
//! - `messages (digest blob PRIMARY KEY, message text)`: the projection itself;
//! - `applied_offsets (partition int, applied_offset bigint, PRIMARY KEY (partition,
//!   applied_offset)) WITH CLUSTERING ORDER BY (applied_offset DESC)`: per event-log
//!   partition, the offsets whose events are in `messages`; the applied offset is the
//!   first (highest) row. `apply` inserts the row of its offset, then deletes the rows
//!   below it. Both writes are idempotent, and a prune only runs once the row it keeps is
//!   written, so the highest row is never removed: the applied offset is the maximum over
//!   every apply, in any order. It never moves backwards, even when a zombie projector
//!   finishes a stale batch (a plain upsert of one value per partition would let the last
//!   writer win).
//!
//! The earlier layout's `projection_offsets (partition int PRIMARY KEY, applied_offset
//! bigint)` is no longer created, written or read; `drop_generation` still drops it.
//!
//! [`ScyllaGenerations`] keeps the catalog of generations in `generations`.
//!
//! Every statement is prepared (so the driver routes it to a replica of its partition key)
//! and marked idempotent: an upsert of the same digest with the same message, the insert of
//! an offset row and the prune below it are no-ops the second time, so the driver may retry
//! them and the projector may replay a batch.

use crate::ports::{
    Generation, GenerationState, ModelError, ModelGenerations, Offset, ProjectionBatch, ReadModel,
};
use crate::Digest;
use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use std::sync::Arc;
use std::time::Duration;

/// How to reach the cluster and how to create the keyspace when it is missing.
#[derive(Debug, Clone)]
pub struct ScyllaSettings {
    /// `host:port` contact points.
    pub nodes: Vec<String>,
    pub keyspace: Keyspace,
    /// The replication map used when msghash creates the keyspace, in CQL, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`.
    pub replication: String,
    pub consistency: Consistency,
}

impl ScyllaSettings {
    /// Settings for a single local node, handy in tests.
    pub fn local(node: impl Into<String>, keyspace: Keyspace) -> Self {
        ScyllaSettings {
            nodes: vec![node.into()],
            keyspace,
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: Consistency::LocalQuorum,
        }
    }
}

/// A keyspace name. It is interpolated into CQL, so only a plain identifier can be one:
/// a lower-case letter, then lower-case letters, digits and `_`, at most 48 characters.
/// The only way to get one is [`Keyspace::parse`] (or `str::parse`), so every keyspace the
/// adapter meets is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keyspace(String);

/// Why a name is not a keyspace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a keyspace name: a lower-case identifier of at most 48 characters (a-z, 0-9, _), starting with a letter")]
pub struct InvalidKeyspace(pub String);

impl Keyspace {
    pub fn parse(name: &str) -> Result<Keyspace, InvalidKeyspace> {
        let mut chars = name.chars();
        let valid = matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && name.len() <= 48;
        if valid {
            Ok(Keyspace(name.to_owned()))
        } else {
            Err(InvalidKeyspace(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Keyspace {
    type Err = InvalidKeyspace;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Keyspace::parse(s)
    }
}

impl std::fmt::Display for Keyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The replication map is interpolated into CQL: accept one `{...}` map and nothing else.
pub fn valid_replication(map: &str) -> bool {
    let m = map.trim();
    m.starts_with('{') && m.ends_with('}') && !m.contains(';') && m.matches('{').count() == 1
}

pub struct ScyllaModel {
    session: Arc<Session>,
    generation: Generation,
    insert_message: PreparedStatement,
    select_message: PreparedStatement,
    insert_offset: PreparedStatement,
    prune_offsets: PreparedStatement,
    select_offset: PreparedStatement,
    list_first: PreparedStatement,
    list_after: PreparedStatement,
}

/// How many row writes of one batch are in flight at once.
const WRITE_CONCURRENCY: usize = 64;

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> ModelError {
    ModelError::unavailable("scylla", e)
}

/// The tables of one generation: `messages` and `applied_offsets` for generation 0,
/// `messages_g<N>` and `applied_offsets_g<N>` after that.
pub fn table_names(generation: Generation) -> (String, String) {
    (
        generation_table("messages", generation),
        generation_table("applied_offsets", generation),
    )
}

/// The offsets table of the earlier layout (`projection_offsets`, `_g<N>` added), which a
/// keyspace written by an older msghash may still hold: never read, only dropped.
fn legacy_offsets_table(generation: Generation) -> String {
    generation_table("projection_offsets", generation)
}

fn generation_table(base: &str, generation: Generation) -> String {
    if generation == 0 {
        base.to_owned()
    } else {
        format!("{base}_g{generation}")
    }
}

/// Opens a session, checks the settings, creates the keyspace when missing.
async fn connect_session(settings: &ScyllaSettings) -> Result<Session, ModelError> {
    if !valid_replication(&settings.replication) {
        return Err(ModelError::Misconfigured(format!(
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
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
                settings.keyspace, settings.replication
            ),
            (),
        )
        .await
        .map_err(unavailable)?;
    Ok(session)
}

impl ScyllaModel {
    /// Connects, creates the keyspace and the tables of generation 0 if missing, and
    /// prepares the statements.
    pub async fn connect(settings: &ScyllaSettings) -> Result<Self, ModelError> {
        let session = Arc::new(connect_session(settings).await?);
        ScyllaModel::open(session, settings, 0).await
    }

    /// The model of `generation` on an existing session, creating its tables if missing.
    pub async fn open(
        session: Arc<Session>,
        settings: &ScyllaSettings,
        generation: Generation,
    ) -> Result<Self, ModelError> {
        let ks = &settings.keyspace;
        let (messages, offsets) = table_names(generation);
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.{messages} (digest blob PRIMARY KEY, message text)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.{offsets} \
                 (partition int, applied_offset bigint, PRIMARY KEY (partition, applied_offset)) \
                 WITH CLUSTERING ORDER BY (applied_offset DESC)"
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
        let statements = [
            format!("INSERT INTO {ks}.{messages} (digest, message) VALUES (?, ?)"),
            format!("SELECT message FROM {ks}.{messages} WHERE digest = ?"),
            // Max-merge: insert the new offset's row, then prune the rows below it. The
            // highest row is never pruned, so racing applies end at the maximum.
            format!("INSERT INTO {ks}.{offsets} (partition, applied_offset) VALUES (?, ?)"),
            format!("DELETE FROM {ks}.{offsets} WHERE partition = ? AND applied_offset < ?"),
            format!("SELECT applied_offset FROM {ks}.{offsets} WHERE partition = ? LIMIT 1"),
            // Listing walks the token ring: the cursor is the last digest of a page, and
            // the next page starts after its token.
            format!("SELECT digest FROM {ks}.{messages} LIMIT ?"),
            format!("SELECT digest FROM {ks}.{messages} WHERE token(digest) > token(?) LIMIT ?"),
        ];
        let prepared = futures::future::try_join_all(statements.map(prepare)).await?;
        let Ok(
            [insert_message, select_message, insert_offset, prune_offsets, select_offset, list_first, list_after],
        ) = <[PreparedStatement; 7]>::try_from(prepared)
        else {
            return Err(ModelError::Corrupt("a statement was not prepared".into()));
        };
        Ok(ScyllaModel {
            insert_message,
            select_message,
            insert_offset,
            prune_offsets,
            select_offset,
            list_first,
            list_after,
            session,
            generation,
        })
    }
}

/// The generation catalog on ScyllaDB: `<keyspace>.generations (name text PRIMARY KEY,
/// value bigint)` holds the rows `active`, `pending`, `adopted` and one `g<N>` per
/// generation whose tables exist. Every write is one single-row upsert, so the switch is
/// atomic for every reader.
pub struct ScyllaGenerations {
    session: Arc<Session>,
    settings: ScyllaSettings,
    opened: tokio::sync::Mutex<std::collections::HashMap<Generation, Arc<ScyllaModel>>>,
    upsert: PreparedStatement,
    delete: PreparedStatement,
    select_all: PreparedStatement,
}

impl ScyllaGenerations {
    /// Connects, creates the keyspace and the catalog table if missing.
    pub async fn connect(settings: &ScyllaSettings) -> Result<Self, ModelError> {
        let session = Arc::new(connect_session(settings).await?);
        let ks = &settings.keyspace;
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.generations (name text PRIMARY KEY, value bigint)"
                ),
                (),
            )
            .await
            .map_err(unavailable)?;
        let prepare = |cql: String| {
            let session = &session;
            async move {
                let mut p = session.prepare(cql).await.map_err(unavailable)?;
                // The catalog decides what every reader sees: always a quorum.
                p.set_consistency(Consistency::Quorum);
                p.set_is_idempotent(true);
                Ok::<_, ModelError>(p)
            }
        };
        Ok(ScyllaGenerations {
            upsert: prepare(format!(
                "INSERT INTO {ks}.generations (name, value) VALUES (?, ?)"
            ))
            .await?,
            delete: prepare(format!("DELETE FROM {ks}.generations WHERE name = ?")).await?,
            select_all: prepare(format!("SELECT name, value FROM {ks}.generations")).await?,
            opened: Default::default(),
            settings: settings.clone(),
            session,
        })
    }

    async fn rows(&self) -> Result<Vec<(String, i64)>, ModelError> {
        let rows: Vec<(String, Option<i64>)> = rows_of(&self.session, &self.select_all, ()).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?)))
            .collect())
    }

    async fn set(&self, name: &str, value: Generation) -> Result<(), ModelError> {
        let value = i64::try_from(value)
            .map_err(|_| ModelError::Corrupt(format!("generation {value} overflows")))?;
        self.session
            .execute_unpaged(&self.upsert, (name, value))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// The state the catalog's `active`, `pending` and `adopted` rows describe.
fn state_of(rows: &[(String, i64)]) -> Result<GenerationState, ModelError> {
    let mut state = GenerationState::default();
    for (name, value) in rows {
        match name.as_str() {
            "active" => state.active = generation_of(*value)?,
            "pending" => state.pending = Some(generation_of(*value)?),
            "adopted" => state.adopted = generation_of(*value)?,
            _ => {}
        }
    }
    state.pending = state.pending.filter(|&p| p > state.active);
    Ok(state)
}

fn generation_of(value: i64) -> Result<Generation, ModelError> {
    Generation::try_from(value).map_err(|_| ModelError::Corrupt(format!("generation {value}")))
}

#[async_trait]
impl ModelGenerations for ScyllaGenerations {
    async fn state(&self) -> Result<GenerationState, ModelError> {
        state_of(&self.rows().await?)
    }

    async fn open(&self, generation: Generation) -> Result<Arc<dyn ReadModel>, ModelError> {
        let mut opened = self.opened.lock().await;
        if let Some(model) = opened.get(&generation) {
            return Ok(model.clone());
        }
        // Recorded before the tables exist, so a crash in between leaves a name that
        // `drop_generation` can still clean up.
        self.set(&format!("g{generation}"), generation).await?;
        let model =
            Arc::new(ScyllaModel::open(self.session.clone(), &self.settings, generation).await?);
        opened.insert(generation, model.clone());
        Ok(model)
    }

    async fn begin(&self, generation: Generation) -> Result<(), ModelError> {
        self.set("pending", generation).await
    }

    async fn activate(&self, generation: Generation) -> Result<(), ModelError> {
        self.set("active", generation).await
    }

    async fn adopt(&self, generation: Generation) -> Result<(), ModelError> {
        self.set("adopted", generation).await
    }

    async fn list(&self) -> Result<Vec<Generation>, ModelError> {
        let rows = self.rows().await?;
        let mut all: Vec<Generation> = rows
            .iter()
            .filter(|(name, _)| name.starts_with('g'))
            .map(|&(_, value)| generation_of(value))
            .collect::<Result<_, _>>()?;
        // Generation 0 predates the catalog: its tables exist whenever it is in use.
        if state_of(&rows)?.active == 0 && !all.contains(&0) {
            all.push(0);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    async fn drop_generation(&self, generation: Generation) -> Result<(), ModelError> {
        if self.state().await?.active == generation {
            return Err(ModelError::Refused(format!(
                "generation {generation} is active; it cannot be dropped"
            )));
        }
        self.opened.lock().await.remove(&generation);
        let ks = &self.settings.keyspace;
        let (messages, offsets) = table_names(generation);
        for table in [messages, offsets, legacy_offsets_table(generation)] {
            self.session
                .query_unpaged(format!("DROP TABLE IF EXISTS {ks}.{table}"), ())
                .await
                .map_err(unavailable)?;
        }
        self.session
            .execute_unpaged(&self.delete, (format!("g{generation}"),))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn partition_key(partition: u32) -> Result<i32, ModelError> {
    i32::try_from(partition).map_err(|_| ModelError::Corrupt(format!("partition {partition}")))
}

/// Every row `statement` returns for `values` (one unpaged request), as `R`s.
async fn rows_of<R>(
    session: &Session,
    statement: &PreparedStatement,
    values: impl scylla::serialize::row::SerializeRow,
) -> Result<Vec<R>, ModelError>
where
    R: for<'frame> scylla::deserialize::row::DeserializeRow<'frame, 'frame>,
{
    let corrupt = |e: &dyn std::fmt::Display| ModelError::Corrupt(e.to_string());
    let result = session
        .execute_unpaged(statement, values)
        .await
        .map_err(unavailable)?;
    let rows = result.into_rows_result().map_err(|e| corrupt(&e))?;
    let typed = rows.rows::<R>().map_err(|e| corrupt(&e))?;
    typed.map(|row| row.map_err(|e| corrupt(&e))).collect()
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
        // Then the offsets, merged by maximum: the row of this offset first, then the rows
        // below it go. A stale offset adds a row below the highest one (pruned by the next
        // apply) and never removes it.
        for &(partition, offset) in &batch.applied {
            let key = (partition_key(partition)?, offset);
            self.session
                .execute_unpaged(&self.insert_offset, key)
                .await
                .map_err(unavailable)?;
            self.session
                .execute_unpaged(&self.prune_offsets, key)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        let rows: Vec<(String,)> = rows_of(
            &self.session,
            &self.select_message,
            (&digest.as_bytes()[..],),
        )
        .await?;
        Ok(rows.into_iter().next().map(|(m,)| m))
    }

    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        let key = (partition_key(partition)?,);
        let rows: Vec<(i64,)> = rows_of(&self.session, &self.select_offset, key).await?;
        Ok(rows.into_iter().next().map(|(o,)| o))
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError> {
        let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
        let rows: Vec<(Vec<u8>,)> = match after {
            None => rows_of(&self.session, &self.list_first, (limit,)).await?,
            Some(d) => {
                let values = (&d.as_bytes()[..], limit);
                rows_of(&self.session, &self.list_after, values).await?
            }
        };
        let mut digests = Vec::with_capacity(rows.len());
        for (bytes,) in rows {
            digests.push(
                Digest::from_bytes(&bytes)
                    .ok_or_else(|| ModelError::Corrupt(format!("{}-byte digest", bytes.len())))?,
            );
        }
        Ok(digests)
    }

    fn generation(&self) -> Generation {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_keyspaces() {
        assert_eq!(
            Keyspace::parse("msghash").map(|k| k.to_string()),
            Ok("msghash".to_owned())
        );
        assert!(Keyspace::parse("msghash_test_2").is_ok());
        for bad in [
            "",
            "1abc",
            "Msghash",
            "a-b",
            "a;drop",
            "a.b",
            &"a".repeat(49),
        ] {
            assert_eq!(
                Keyspace::parse(bad),
                Err(InvalidKeyspace(bad.to_owned())),
                "{bad:?}"
            );
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
