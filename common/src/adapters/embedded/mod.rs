//! `EventLog` and `ReadModel` in the process itself, on [redb]: msghash with nothing to
//! install. The standalone binary uses these by default.
//!
//! # Layout
//!
//! Two database files in the data directory, each held by one process at a time:
//!
//! - `events.redb`, the event log ([`EmbeddedLog`]):
//!   - `records`: `(partition u32, offset u64)` → `(key bytes, value bytes)`, the
//!     `MessageHashed` envelope exactly as the Kafka adapter writes it; offsets of a
//!     partition are contiguous from 0;
//!   - `group_positions`: `(group name, partition u32)` → the next offset the group reads;
//!   - `meta`: the layout version and the partition count, fixed at the first open because
//!     the digest → partition map depends on it.
//! - `readmodel.redb`, the projection ([`EmbeddedModel`]):
//!   - `messages`: digest (32 raw bytes) → message;
//!   - `projection_offsets`: partition u32 → highest applied offset (i64);
//!   - `meta`: the layout version.
//!
//! # Durability
//!
//! Every write transaction commits with [`Durability::Immediate`]: `commit` returns only
//! after redb has fsynced the new state. redb is copy-on-write with two commit slots, so a
//! process killed at any instant (kill -9, OOM; power loss too, as far as the disk honours
//! fsync) reopens at the last committed transaction, never at a torn one. What msghash acknowledges is therefore on disk:
//!
//! - `append` answers with an offset only after the transaction holding the record
//!   committed, so a 201 is never lost;
//! - `end_offset` and subscribers only see committed records, so nothing read can vanish;
//! - `Subscription::commit` and `ReadModel::apply` return after their commit, so a group
//!   position or an applied offset never points past data that a crash could take back.
//!   `apply` writes rows and offsets in one transaction: both or neither survive.
//!
//! Transactions also set redb's quick-repair (two-phase commit plus the allocator state), so
//! reopening after a kill is instant instead of a walk over the whole file.
//!
//! # Group commit
//!
//! One writer thread owns every write to `events.redb`. `append` and `commit` send their
//! request over a channel and wait for the answer. The writer takes the first request, then
//! everything already queued behind it (up to [`MAX_GROUP_REQUESTS`] requests or
//! [`MAX_GROUP_BYTES`] bytes), writes all of it in ONE transaction, commits (one fsync
//! round), publishes the new end offsets, and only then answers every waiter. While one
//! group is being fsynced the next one queues up, so N concurrent appends cost a handful of
//! fsyncs, not N. A failed commit fails every request of its group with
//! [`LogError::Unavailable`] and assigns no offsets.
//!
//! An `append` whose caller stops waiting (a request deadline) may still be written, as with
//! Kafka; the record is a pure function of its key, so a retry only adds a duplicate that the
//! projection absorbs.
//!
//! # Locking
//!
//! redb locks the file (Linux: open-file-description byte-range locks, so the lock also
//! excludes a second handle inside the same process). A second open fails at once with
//! [`EmbeddedError::InUse`] and touches nothing; the kernel drops the lock when its holder
//! dies, kill -9 included.
//!
//! # Why redb
//!
//! Pure Rust (no C toolchain), ACID transactions with fsync-on-commit, one file per
//! database, file-locked against a second process, and a stable, versioned file format.
//! fjall (an LSM tree) would add a write-ahead journal, background compaction threads and a
//! directory of segment files for a workload that is append-only and small; hand-written
//! files would mean re-deriving torn-write detection, atomic multi-key commits and crash
//! recovery that redb already has tested.
//!
//! Opening is blocking (it may repair after a crash); call it at startup. Every other
//! blocking redb call runs on `tokio::task::spawn_blocking` or the writer thread.

//!
//! # Files of this module
//!
//! - [`log`]: [`EmbeddedLog`] and its subscriptions (reading, group positions);
//! - [`writer`]: the single writer thread and its group commit;
//! - [`model`]: [`EmbeddedModel`], one file per read-model generation;
//! - [`generations`]: [`EmbeddedGenerations`], the catalog of generations.
//!
//! This file holds what they share: the file names and table layouts, the error type,
//! opening a database and beginning a durable transaction.

mod generations;
mod log;
mod model;
mod writer;

pub use generations::{EmbeddedGenerations, GENERATIONS_FILE};
pub use log::EmbeddedLog;
pub use model::{model_file, EmbeddedModel};

use crate::ports::{
    EventLog, Generation, GenerationState, LogError, LogRecord, ModelError, ModelGenerations,
    Offset, ProjectionBatch, ReadModel, Subscription,
};
use crate::{Digest, MessageHashed};
use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// The file of the event log inside the data directory.
pub const LOG_FILE: &str = "events.redb";
/// The file of the read model inside the data directory.
pub const MODEL_FILE: &str = "readmodel.redb";

/// The layout this build writes; a file with another one is refused rather than misread.
const LAYOUT_VERSION: u64 = 1;

/// Most requests the writer puts in one transaction.
pub const MAX_GROUP_REQUESTS: usize = 4096;
/// Most record bytes the writer puts in one transaction (one request always fits).
pub const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// redb's page cache per database. Its default is 1 GiB each; msghash reads the log
/// sequentially and the read model by key, so a smaller cache serves both.
const CACHE_BYTES: usize = 256 * 1024 * 1024;

/// `(partition, offset)`.
type RecordKey = (u32, u64);
/// `(key bytes, value bytes)`.
type RecordValue = (&'static [u8], &'static [u8]);
const RECORDS: TableDefinition<RecordKey, RecordValue> = TableDefinition::new("records");
const GROUP_POSITIONS: TableDefinition<(&str, u32), u64> = TableDefinition::new("group_positions");
const LOG_META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Sequence number → (partition, offset, key, value, reason) of a dead-lettered record.
type DeadLetterValue = (u32, u64, &'static [u8], &'static [u8], &'static str);
const DEAD_LETTERS: TableDefinition<u64, DeadLetterValue> = TableDefinition::new("dead_letters");

const MESSAGES: TableDefinition<&[u8; 32], &str> = TableDefinition::new("messages");
const PROJECTION_OFFSETS: TableDefinition<u32, i64> = TableDefinition::new("projection_offsets");
const MODEL_META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_LAYOUT: &str = "layout_version";
const META_PARTITIONS: &str = "partitions";

/// Why an embedded database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "data directory {} is in use by another msghash process (or another handle of this one): \
         {} is locked",
        dir.display(),
        file.display()
    )]
    InUse { dir: PathBuf, file: PathBuf },

    #[error(
        "data directory {} holds an event log of {stored} partitions but {requested} are \
         configured; the partition of a digest depends on the count, so they must match",
        dir.display()
    )]
    PartitionMismatch {
        dir: PathBuf,
        stored: u64,
        requested: u32,
    },

    #[error(
        "{} has storage layout version {found}, this build reads version {LAYOUT_VERSION}",
        file.display()
    )]
    UnsupportedLayout { file: PathBuf, found: u64 },

    #[error("cannot create data directory {}: {source}", dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot start the event log writer thread: {0}")]
    Thread(std::io::Error),

    #[error("{}: {detail}", file.display())]
    Storage { file: PathBuf, detail: String },
}

impl EmbeddedError {
    fn storage(file: &Path, e: impl Into<redb::Error>) -> Self {
        EmbeddedError::Storage {
            file: file.to_path_buf(),
            detail: e.into().to_string(),
        }
    }
}

/// Creates `dir` if needed and opens (or creates) `dir/name`, failing fast when another
/// handle holds it.
fn open_database(dir: &Path, name: &str) -> Result<(Database, PathBuf), EmbeddedError> {
    std::fs::create_dir_all(dir).map_err(|source| EmbeddedError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let file = dir.join(name);
    let created = !file.exists();
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(&file)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => EmbeddedError::InUse {
                dir: dir.to_path_buf(),
                file: file.clone(),
            },
            other => EmbeddedError::storage(&file, other),
        })?;
    if created {
        sync_dir(dir);
    }
    Ok((db, file))
}

/// Makes a new file's directory entry durable, so that a power cut right after the first
/// start cannot lose the whole file (kill -9 cannot lose it either way).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not fsync the data directory");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// A durable write transaction with quick repair (instant reopen after a kill).
fn begin_durable(db: &Database) -> Result<WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(true);
    Ok(txn)
}

/// Checks or records the layout version in a `meta` table.
fn check_layout(meta: &mut redb::Table<'_, &str, u64>, file: &Path) -> Result<(), EmbeddedError> {
    let found = meta
        .get(META_LAYOUT)
        .map_err(|e| EmbeddedError::storage(file, e))?
        .map(|v| v.value());
    match found {
        Some(LAYOUT_VERSION) => Ok(()),
        Some(found) => Err(EmbeddedError::UnsupportedLayout {
            file: file.to_path_buf(),
            found,
        }),
        None => meta
            .insert(META_LAYOUT, LAYOUT_VERSION)
            .map(|_| ())
            .map_err(|e| EmbeddedError::storage(file, e)),
    }
}

fn to_offset(offset: u64) -> Result<Offset, LogError> {
    Offset::try_from(offset)
        .map_err(|_| LogError::Unavailable(format!("offset {offset} overflows")))
}

fn storage_unavailable(e: impl Into<redb::Error>) -> LogError {
    LogError::Unavailable(format!("embedded event log: {}", e.into()))
}
