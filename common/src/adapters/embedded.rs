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

    #[error("the partition count must be at least 1, got {0}")]
    NoPartitions(u32),

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

// ---------------------------------------------------------------------------------------
// Event log
// ---------------------------------------------------------------------------------------

/// The embedded event log. Cloning is cheap (one `Arc`); the database closes when the last
/// clone and the last subscription are gone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<LogInner>,
}

struct LogInner {
    db: Arc<Database>,
    file: PathBuf,
    partitions: u32,
    /// `None` only while dropping, so that the writer sees the channel close.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    /// Per partition, the next offset: only durably committed records count.
    ends: watch::Receiver<Vec<u64>>,
    transactions: Arc<AtomicU64>,
}

impl Drop for LogInner {
    fn drop(&mut self) {
        // Closing the channel stops the writer after the group it is committing, if any;
        // joining it releases its database handle before ours, so the file is unlocked when
        // the last handle is gone.
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(file = %self.file.display(), "event log writer thread panicked");
            }
        }
    }
}

enum Request {
    Append {
        partition: u32,
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
    Commit {
        group: String,
        /// (partition, next offset to read), one entry per partition.
        positions: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    DeadLetter {
        partition: u32,
        offset: u64,
        key: Vec<u8>,
        value: Vec<u8>,
        reason: String,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

impl Request {
    fn size(&self) -> usize {
        match self {
            Request::Append { key, value, .. } => key.len() + value.len() + 12,
            Request::Commit {
                group, positions, ..
            } => group.len() + positions.len() * 12,
            Request::DeadLetter {
                key, value, reason, ..
            } => key.len() + value.len() + reason.len() + 20,
        }
    }

    fn fail(self, error: LogError) {
        // A waiter that went away does not need the answer.
        match self {
            Request::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Commit { reply, .. } | Request::DeadLetter { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// What one request of a group came to, known once the group's transaction is written.
enum Outcome {
    Appended(u64),
    Committed,
    Rejected(String),
}

impl EmbeddedLog {
    /// Opens (or creates) `dir/events.redb` with `partitions` partitions. The count is
    /// recorded on first open; any later open must ask for the same count. Blocking.
    pub fn open(dir: &Path, partitions: u32) -> Result<EmbeddedLog, EmbeddedError> {
        if partitions == 0 {
            return Err(EmbeddedError::NoPartitions(partitions));
        }
        let (db, file) = open_database(dir, LOG_FILE)?;
        let storage = |e: redb::Error| EmbeddedError::storage(&file, e);

        let txn = begin_durable(&db).map_err(storage)?;
        let mut ends = Vec::with_capacity(partitions as usize);
        {
            let mut meta = txn.open_table(LOG_META).map_err(|e| storage(e.into()))?;
            check_layout(&mut meta, &file)?;
            let stored = meta
                .get(META_PARTITIONS)
                .map_err(|e| storage(e.into()))?
                .map(|v| v.value());
            match stored {
                Some(stored) if stored != u64::from(partitions) => {
                    return Err(EmbeddedError::PartitionMismatch {
                        dir: dir.to_path_buf(),
                        stored,
                        requested: partitions,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert(META_PARTITIONS, u64::from(partitions))
                        .map_err(|e| storage(e.into()))?;
                }
            }
            txn.open_table(GROUP_POSITIONS)
                .map_err(|e| storage(e.into()))?;
            txn.open_table(DEAD_LETTERS)
                .map_err(|e| storage(e.into()))?;
            let records = txn.open_table(RECORDS).map_err(|e| storage(e.into()))?;
            for p in 0..partitions {
                let last = records
                    .range((p, 0)..=(p, u64::MAX))
                    .map_err(|e| storage(e.into()))?
                    .next_back()
                    .transpose()
                    .map_err(|e| storage(e.into()))?
                    .map(|(k, _)| k.value().1);
                ends.push(last.map_or(0, |o| o + 1));
            }
        }
        txn.commit().map_err(|e| storage(e.into()))?;

        let db = Arc::new(db);
        let (ends_tx, ends_rx) = watch::channel(ends.clone());
        let (requests, queue) = mpsc::channel();
        let transactions = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            db: db.clone(),
            next: ends,
            queue,
            ends: ends_tx,
            transactions: transactions.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("msghash-log-writer".into())
            .spawn(move || writer.run())
            .map_err(EmbeddedError::Thread)?;
        Ok(EmbeddedLog {
            inner: Arc::new(LogInner {
                db,
                file,
                partitions,
                requests: Some(requests),
                writer: Some(writer),
                ends: ends_rx,
                transactions,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.file
    }

    /// How many write transactions the writer committed since open: with group commit,
    /// usually far fewer than the appends.
    pub fn committed_transactions(&self) -> u64 {
        self.inner.transactions.load(Ordering::Relaxed)
    }

    fn check_partition(&self, partition: u32) -> Result<(), LogError> {
        if partition < self.inner.partitions {
            Ok(())
        } else {
            Err(LogError::Rejected(format!(
                "partition {partition} out of range: the log has {} partitions",
                self.inner.partitions
            )))
        }
    }
}

impl LogInner {
    fn send(&self, request: Request) -> Result<(), LogError> {
        let stopped = || LogError::Unavailable("embedded event log writer has stopped".into());
        match &self.requests {
            Some(requests) => requests.send(request).map_err(|_| stopped()),
            None => Err(stopped()),
        }
    }
}

/// The single writer of `events.redb`.
struct Writer {
    db: Arc<Database>,
    /// Per partition, the next offset, as durably committed.
    next: Vec<u64>,
    queue: mpsc::Receiver<Request>,
    ends: watch::Sender<Vec<u64>>,
    transactions: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self) {
        // `recv` fails once every sender is gone: the log was dropped.
        while let Ok(first) = self.queue.recv() {
            let mut bytes = first.size();
            let mut group = vec![first];
            while group.len() < MAX_GROUP_REQUESTS && bytes < MAX_GROUP_BYTES {
                match self.queue.try_recv() {
                    Ok(request) => {
                        bytes += request.size();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            match self.write(&group) {
                Ok((next, outcomes)) => {
                    self.transactions.fetch_add(1, Ordering::Relaxed);
                    // Publish before answering: once `append` returns, `end_offset` and the
                    // subscribers already see the record.
                    self.next = next;
                    self.ends.send_replace(self.next.clone());
                    for (request, outcome) in group.into_iter().zip(outcomes) {
                        answer(request, outcome);
                    }
                }
                Err(e) => {
                    let detail = e.to_string();
                    tracing::error!(error = %detail, "embedded event log commit failed");
                    for request in group {
                        request.fail(LogError::Unavailable(format!(
                            "embedded event log: {detail}"
                        )));
                    }
                }
            }
        }
    }

    /// Writes one group in one durable transaction; returns the new end offsets and one
    /// outcome per request, in order. Nothing is visible unless this returns `Ok`.
    fn write(&self, group: &[Request]) -> Result<(Vec<u64>, Vec<Outcome>), redb::Error> {
        let txn = begin_durable(&self.db)?;
        let mut next = self.next.clone();
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut positions = txn.open_table(GROUP_POSITIONS)?;
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            for request in group {
                match request {
                    Request::Append {
                        partition,
                        key,
                        value,
                        ..
                    } => {
                        // `append` checked the partition against the same count.
                        let Some(slot) = next.get_mut(*partition as usize) else {
                            outcomes.push(Outcome::Rejected(format!(
                                "partition {partition} out of range"
                            )));
                            continue;
                        };
                        let offset = *slot;
                        records.insert((*partition, offset), (key.as_slice(), value.as_slice()))?;
                        *slot += 1;
                        outcomes.push(Outcome::Appended(offset));
                    }
                    Request::Commit {
                        group: name,
                        positions: wanted,
                        ..
                    } => {
                        // Validate against what is durably committed, all or nothing.
                        let invalid = wanted.iter().find_map(|&(p, pos)| {
                            match self.next.get(p as usize) {
                                None => Some(format!("partition {p} out of range")),
                                Some(&end) if pos > end => Some(format!(
                                    "cannot commit offset {} of partition {p}: the log ends at {end}",
                                    pos - 1
                                )),
                                Some(_) => None,
                            }
                        });
                        if let Some(reason) = invalid {
                            outcomes.push(Outcome::Rejected(reason));
                            continue;
                        }
                        for &(p, pos) in wanted {
                            let current = positions.get((name.as_str(), p))?.map(|v| v.value());
                            // Positions never move backwards.
                            if current.is_none_or(|c| pos > c) {
                                positions.insert((name.as_str(), p), pos)?;
                            }
                        }
                        outcomes.push(Outcome::Committed);
                    }
                    Request::DeadLetter {
                        partition,
                        offset,
                        key,
                        value,
                        reason,
                        ..
                    } => {
                        let seq = dead.last()?.map_or(0, |(k, _)| k.value() + 1);
                        dead.insert(
                            seq,
                            (
                                *partition,
                                *offset,
                                key.as_slice(),
                                value.as_slice(),
                                reason.as_str(),
                            ),
                        )?;
                        outcomes.push(Outcome::Committed);
                    }
                }
            }
        }
        txn.commit()?;
        Ok((next, outcomes))
    }
}

fn answer(request: Request, outcome: Outcome) {
    // A waiter that went away does not need the answer.
    match (request, outcome) {
        (Request::Append { reply, .. }, Outcome::Appended(offset)) => {
            let _ = reply.send(Ok(offset));
        }
        (Request::Commit { reply, .. } | Request::DeadLetter { reply, .. }, Outcome::Committed) => {
            let _ = reply.send(Ok(()));
        }
        (request, Outcome::Rejected(reason)) => request.fail(LogError::Rejected(reason)),
        (request, _) => request.fail(LogError::Unavailable(
            "embedded event log: mismatched writer outcome".into(),
        )),
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    async fn append(&self, partition: u32, event: &MessageHashed) -> Result<Offset, LogError> {
        self.check_partition(partition)?;
        let (reply, answer) = oneshot::channel();
        self.inner.send(Request::Append {
            partition,
            key: event.key().to_vec(),
            value: event.encode(),
            reply,
        })?;
        let offset = answer.await.map_err(|_| {
            LogError::Unavailable("embedded event log writer stopped before answering".into())
        })??;
        to_offset(offset)
    }

    async fn end_offset(&self, partition: u32) -> Result<Offset, LogError> {
        self.check_partition(partition)?;
        let end = self
            .inner
            .ends
            .borrow()
            .get(partition as usize)
            .copied()
            .unwrap_or(0);
        to_offset(end)
    }

    async fn dead_letter(&self, record: &LogRecord, reason: &str) -> Result<(), LogError> {
        let (reply, answer) = oneshot::channel();
        self.inner.send(Request::DeadLetter {
            partition: record.partition,
            offset: u64::try_from(record.offset).unwrap_or_default(),
            key: record.key.clone().unwrap_or_default(),
            value: record.value.clone().unwrap_or_default(),
            reason: reason.to_owned(),
            reply,
        })?;
        answer.await.map_err(|_| {
            LogError::Unavailable("embedded event log writer stopped before answering".into())
        })?
    }

    async fn dead_letter_count(&self) -> Result<u64, LogError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, LogError> {
            let txn = inner.db.begin_read().map_err(storage_unavailable)?;
            let table = txn.open_table(DEAD_LETTERS).map_err(storage_unavailable)?;
            table.len().map_err(storage_unavailable)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("dead-letter count task: {e}")))?
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError> {
        if group.is_empty() {
            return Err(LogError::Rejected("consumer group name is empty".into()));
        }
        let inner = self.inner.clone();
        let name = group.to_owned();
        let committed = tokio::task::spawn_blocking(move || -> Result<Vec<u64>, LogError> {
            let txn = inner.db.begin_read().map_err(storage_unavailable)?;
            let table = txn
                .open_table(GROUP_POSITIONS)
                .map_err(storage_unavailable)?;
            let mut next = vec![0; inner.partitions as usize];
            for entry in table
                .range((name.as_str(), 0)..=(name.as_str(), u32::MAX))
                .map_err(storage_unavailable)?
            {
                let (key, value) = entry.map_err(storage_unavailable)?;
                if let Some(slot) = next.get_mut(key.value().1 as usize) {
                    *slot = value.value();
                }
            }
            Ok(next)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("subscribe task: {e}")))??;
        let mut ends = self.inner.ends.clone();
        let current = ends.borrow_and_update().clone();
        // A position is never past the end (commits are checked), but stay safe.
        let next = committed
            .into_iter()
            .zip(current.iter())
            .map(|(pos, &end)| pos.min(end))
            .collect();
        Ok(Box::new(EmbeddedSubscription {
            inner: self.inner.clone(),
            group: group.to_owned(),
            next,
            ends,
            start: 0,
        }))
    }
}

/// A consumer-group member: its read position lives in memory and advances as batches are
/// handed out; `commit` stores the group's position durably.
struct EmbeddedSubscription {
    inner: Arc<LogInner>,
    group: String,
    next: Vec<u64>,
    ends: watch::Receiver<Vec<u64>>,
    /// The partition served first, rotated every batch for fairness.
    start: usize,
}

/// Splits `max` records over the partitions with records available, round-robin from
/// `start`, so that a busy partition cannot starve the others.
fn fair_quotas(next: &[u64], ends: &[u64], max: usize, start: usize) -> Vec<usize> {
    let n = next.len();
    let available: Vec<usize> = next
        .iter()
        .zip(ends)
        .map(|(&n, &e)| usize::try_from(e.saturating_sub(n)).unwrap_or(usize::MAX))
        .collect();
    let mut quotas = vec![0usize; n];
    let mut remaining = max;
    while remaining > 0 {
        let open: Vec<usize> = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&p| available[p] > quotas[p])
            .collect();
        if open.is_empty() {
            break;
        }
        // An equal share for every open partition (at least one), capped by what it has.
        let share = (remaining / open.len()).max(1);
        for p in open {
            if remaining == 0 {
                break;
            }
            let take = share.min(available[p] - quotas[p]).min(remaining);
            quotas[p] += take;
            remaining -= take;
        }
    }
    quotas
}

impl EmbeddedSubscription {
    async fn read(&self, quotas: Vec<usize>) -> Result<Vec<LogRecord>, LogError> {
        let inner = self.inner.clone();
        let from = self.next.clone();
        tokio::task::spawn_blocking(move || {
            let txn = inner.db.begin_read().map_err(storage_unavailable)?;
            let table = txn.open_table(RECORDS).map_err(storage_unavailable)?;
            let mut batch = Vec::with_capacity(quotas.iter().sum());
            for (p, (&first, &quota)) in (0u32..).zip(from.iter().zip(&quotas)) {
                if quota == 0 {
                    continue;
                }
                let before = batch.len();
                let last = first + quota as u64 - 1;
                for entry in table
                    .range((p, first)..=(p, last))
                    .map_err(storage_unavailable)?
                {
                    let (key, value) = entry.map_err(storage_unavailable)?;
                    let (_, offset) = key.value();
                    let (k, v) = value.value();
                    batch.push(LogRecord {
                        partition: p,
                        offset: to_offset(offset)?,
                        key: Some(k.to_vec()),
                        value: Some(v.to_vec()),
                    });
                }
                // Committed offsets are contiguous and keys unique, so fewer records than
                // asked for means a damaged file.
                if batch.len() - before != quota {
                    return Err(LogError::Unavailable(format!(
                        "embedded event log: partition {p} is missing records in {first}..={last}"
                    )));
                }
            }
            Ok(batch)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("read task: {e}")))?
    }
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next_batch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // `None`: a wait too long to represent, i.e. until something arrives.
        let deadline = Instant::now().checked_add(max_wait);
        loop {
            // Marking the value seen before looking at it means an append that commits
            // after this line wakes `changed` below: no lost wake-ups, no polling.
            let ends = self.ends.borrow_and_update().clone();
            let quotas = fair_quotas(&self.next, &ends, max, self.start);
            if quotas.iter().any(|&q| q > 0) {
                // Positions advance only once the records are in hand, so a cancelled call
                // loses nothing.
                let batch = self.read(quotas.clone()).await?;
                for (next, quota) in self.next.iter_mut().zip(&quotas) {
                    *next += *quota as u64;
                }
                self.start = (self.start + 1) % self.next.len().max(1);
                return Ok(batch);
            }
            let changed = match deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.ends.changed()).await {
                        Ok(changed) => changed,
                        Err(_) => return Ok(Vec::new()),
                    }
                }
                None => self.ends.changed().await,
            };
            if changed.is_err() {
                return Err(LogError::Unavailable(
                    "embedded event log writer has stopped".into(),
                ));
            }
        }
    }

    async fn commit(&mut self, done: &[(u32, Offset)]) -> Result<(), LogError> {
        let mut positions: Vec<(u32, u64)> = Vec::with_capacity(done.len());
        for &(partition, offset) in done {
            if partition >= self.inner.partitions {
                return Err(LogError::Rejected(format!(
                    "partition {partition} out of range: the log has {} partitions",
                    self.inner.partitions
                )));
            }
            let next = u64::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(1))
                .ok_or_else(|| {
                    LogError::Rejected(format!(
                        "cannot commit offset {offset} of partition {partition}"
                    ))
                })?;
            match positions.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, pos)) => *pos = (*pos).max(next),
                None => positions.push((partition, next)),
            }
        }
        if positions.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.inner.send(Request::Commit {
            group: self.group.clone(),
            positions,
            reply,
        })?;
        answer.await.map_err(|_| {
            LogError::Unavailable("embedded event log writer stopped before answering".into())
        })?
    }

    async fn rewind(&mut self, partition: u32, offset: Offset) -> Result<(), LogError> {
        let next = self.next.get_mut(partition as usize).ok_or_else(|| {
            LogError::Rejected(format!(
                "partition {partition} out of range: the log has {} partitions",
                self.inner.partitions
            ))
        })?;
        *next = u64::try_from(offset).unwrap_or(0);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Read model
// ---------------------------------------------------------------------------------------

/// The embedded read model. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct EmbeddedModel {
    db: Arc<Database>,
    file: Arc<PathBuf>,
    generation: Generation,
}

fn model_unavailable(e: impl Into<redb::Error>) -> ModelError {
    ModelError::Unavailable(format!("embedded read model: {}", e.into()))
}

/// The file of read-model generation `generation`: `readmodel.redb` for generation 0,
/// `readmodel-g<N>.redb` after that.
pub fn model_file(generation: Generation) -> String {
    if generation == 0 {
        MODEL_FILE.to_owned()
    } else {
        format!("readmodel-g{generation}.redb")
    }
}

impl EmbeddedModel {
    /// Opens (or creates) `dir/readmodel.redb`, generation 0. Blocking.
    pub fn open(dir: &Path) -> Result<EmbeddedModel, EmbeddedError> {
        EmbeddedModel::open_generation(dir, 0)
    }

    /// Opens (or creates) the file of `generation` in `dir`. Blocking.
    pub fn open_generation(
        dir: &Path,
        generation: Generation,
    ) -> Result<EmbeddedModel, EmbeddedError> {
        let (db, file) = open_database(dir, &model_file(generation))?;
        let storage = |e: redb::Error| EmbeddedError::storage(&file, e);
        let txn = begin_durable(&db).map_err(storage)?;
        {
            let mut meta = txn.open_table(MODEL_META).map_err(|e| storage(e.into()))?;
            check_layout(&mut meta, &file)?;
            txn.open_table(MESSAGES).map_err(|e| storage(e.into()))?;
            txn.open_table(PROJECTION_OFFSETS)
                .map_err(|e| storage(e.into()))?;
        }
        txn.commit().map_err(|e| storage(e.into()))?;
        Ok(EmbeddedModel {
            db: Arc::new(db),
            file: Arc::new(file),
            generation,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.file
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<T, ModelError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| ModelError::Unavailable(format!("embedded read model task: {e}")))?
    }
}

#[async_trait]
impl ReadModel for EmbeddedModel {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = batch.clone();
        self.blocking(move |db| {
            // Rows and offsets in one durable transaction: both or neither.
            let txn = begin_durable(db).map_err(model_unavailable)?;
            {
                let mut messages = txn.open_table(MESSAGES).map_err(model_unavailable)?;
                for (digest, message) in &batch.messages {
                    messages
                        .insert(digest.as_bytes(), message.as_str())
                        .map_err(model_unavailable)?;
                }
                let mut offsets = txn
                    .open_table(PROJECTION_OFFSETS)
                    .map_err(model_unavailable)?;
                for &(partition, offset) in &batch.applied {
                    let current = offsets
                        .get(partition)
                        .map_err(model_unavailable)?
                        .map(|v| v.value());
                    // An applied offset never moves backwards.
                    if current.is_none_or(|c| offset > c) {
                        offsets
                            .insert(partition, offset)
                            .map_err(model_unavailable)?;
                    }
                }
            }
            txn.commit().map_err(model_unavailable)
        })
        .await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        let digest = *digest;
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(model_unavailable)?;
            let messages = txn.open_table(MESSAGES).map_err(model_unavailable)?;
            let message = messages
                .get(digest.as_bytes())
                .map_err(model_unavailable)?
                .map(|v| v.value().to_owned());
            Ok(message)
        })
        .await
    }

    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(model_unavailable)?;
            let offsets = txn
                .open_table(PROJECTION_OFFSETS)
                .map_err(model_unavailable)?;
            let offset = offsets
                .get(partition)
                .map_err(model_unavailable)?
                .map(|v| v.value());
            Ok(offset)
        })
        .await
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.copied();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(model_unavailable)?;
            let messages = txn.open_table(MESSAGES).map_err(model_unavailable)?;
            let start = after
                .as_ref()
                .map_or(Bound::Unbounded, |d| Bound::Excluded(d.as_bytes()));
            let mut digests = Vec::with_capacity(limit.min(1024));
            for entry in messages
                .range::<&[u8; 32]>((start, Bound::Unbounded))
                .map_err(model_unavailable)?
                .take(limit)
            {
                let (key, _) = entry.map_err(model_unavailable)?;
                // The key type is 32 bytes wide, so this cannot fail on an intact file.
                let digest = Digest::from_bytes(key.value())
                    .ok_or_else(|| ModelError::Corrupt("stored digest is not 32 bytes".into()))?;
                digests.push(digest);
            }
            Ok(digests)
        })
        .await
    }

    fn generation(&self) -> Generation {
        self.generation
    }
}

// ---------------------------------------------------------------------------------------
// Generations
// ---------------------------------------------------------------------------------------

/// The file of the generation catalog inside the data directory.
pub const GENERATIONS_FILE: &str = "generations.redb";

/// `active`, `pending`, `adopted` → generation.
const GENERATION_STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
/// Every generation whose file exists (or is being created).
const GENERATION_FILES: TableDefinition<u64, ()> = TableDefinition::new("files");

/// The embedded generation catalog: `generations.redb` beside one model file per
/// generation ([`model_file`]). Each change is one durable transaction.
#[derive(Clone)]
pub struct EmbeddedGenerations {
    dir: Arc<PathBuf>,
    catalog: Arc<Database>,
    opened: Arc<std::sync::Mutex<std::collections::HashMap<Generation, EmbeddedModel>>>,
}

impl EmbeddedGenerations {
    /// Opens (or creates) the catalog in `dir`; a data directory from before generations
    /// has generation 0 active, which is the file it already has. Blocking.
    pub fn open(dir: &Path) -> Result<EmbeddedGenerations, EmbeddedError> {
        let (db, file) = open_database(dir, GENERATIONS_FILE)?;
        let storage = |e: redb::Error| EmbeddedError::storage(&file, e);
        let txn = begin_durable(&db).map_err(storage)?;
        {
            let mut meta = txn.open_table(MODEL_META).map_err(|e| storage(e.into()))?;
            check_layout(&mut meta, &file)?;
            let mut state = txn
                .open_table(GENERATION_STATE)
                .map_err(|e| storage(e.into()))?;
            if state
                .get("active")
                .map_err(|e| storage(e.into()))?
                .is_none()
            {
                state.insert("active", 0).map_err(|e| storage(e.into()))?;
                let mut files = txn
                    .open_table(GENERATION_FILES)
                    .map_err(|e| storage(e.into()))?;
                files.insert(0, ()).map_err(|e| storage(e.into()))?;
            }
        }
        txn.commit().map_err(|e| storage(e.into()))?;
        Ok(EmbeddedGenerations {
            dir: Arc::new(dir.to_path_buf()),
            catalog: Arc::new(db),
            opened: Arc::default(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedGenerations) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<T, ModelError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| ModelError::Unavailable(format!("embedded catalog task: {e}")))?
    }

    fn write(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), ModelError> {
        let txn = begin_durable(&self.catalog).map_err(model_unavailable)?;
        f(&txn).map_err(model_unavailable)?;
        txn.commit().map_err(model_unavailable)
    }

    fn set(&self, name: &'static str, generation: Generation) -> Result<(), ModelError> {
        self.write(|txn| {
            txn.open_table(GENERATION_STATE)?.insert(name, generation)?;
            Ok(())
        })
    }

    fn read_state(&self) -> Result<GenerationState, ModelError> {
        let txn = self.catalog.begin_read().map_err(model_unavailable)?;
        let table = txn
            .open_table(GENERATION_STATE)
            .map_err(model_unavailable)?;
        let get = |name: &str| -> Result<Option<u64>, ModelError> {
            Ok(table
                .get(name)
                .map_err(model_unavailable)?
                .map(|v| v.value()))
        };
        let active = get("active")?.unwrap_or(0);
        Ok(GenerationState {
            active,
            pending: get("pending")?.filter(|&p| p > active),
            adopted: get("adopted")?.unwrap_or(0),
        })
    }
}

#[async_trait]
impl ModelGenerations for EmbeddedGenerations {
    async fn state(&self) -> Result<GenerationState, ModelError> {
        self.blocking(|this| this.read_state()).await
    }

    async fn open(&self, generation: Generation) -> Result<Arc<dyn ReadModel>, ModelError> {
        self.blocking(move |this| {
            let mut opened = this
                .opened
                .lock()
                .map_err(|_| ModelError::Unavailable("embedded catalog lock poisoned".into()))?;
            if let Some(model) = opened.get(&generation) {
                return Ok(Arc::new(model.clone()) as Arc<dyn ReadModel>);
            }
            this.write(|txn| {
                txn.open_table(GENERATION_FILES)?.insert(generation, ())?;
                Ok(())
            })?;
            let model = EmbeddedModel::open_generation(&this.dir, generation)
                .map_err(|e| ModelError::Unavailable(e.to_string()))?;
            opened.insert(generation, model.clone());
            Ok(Arc::new(model) as Arc<dyn ReadModel>)
        })
        .await
    }

    async fn begin(&self, generation: Generation) -> Result<(), ModelError> {
        self.blocking(move |this| this.set("pending", generation))
            .await
    }

    async fn activate(&self, generation: Generation) -> Result<(), ModelError> {
        self.blocking(move |this| this.set("active", generation))
            .await
    }

    async fn adopt(&self, generation: Generation) -> Result<(), ModelError> {
        self.blocking(move |this| this.set("adopted", generation))
            .await
    }

    async fn list(&self) -> Result<Vec<Generation>, ModelError> {
        self.blocking(|this| {
            let txn = this.catalog.begin_read().map_err(model_unavailable)?;
            let files = txn
                .open_table(GENERATION_FILES)
                .map_err(model_unavailable)?;
            let mut all = Vec::new();
            for entry in files.iter().map_err(model_unavailable)? {
                all.push(entry.map_err(model_unavailable)?.0.value());
            }
            Ok(all)
        })
        .await
    }

    async fn drop_generation(&self, generation: Generation) -> Result<(), ModelError> {
        self.blocking(move |this| {
            if this.read_state()?.active == generation {
                return Err(ModelError::Corrupt(format!(
                    "generation {generation} is active; it cannot be dropped"
                )));
            }
            if let Ok(mut opened) = this.opened.lock() {
                opened.remove(&generation);
            }
            // A handle still open elsewhere keeps reading the unlinked file until it closes.
            let file = this.dir.join(model_file(generation));
            match std::fs::remove_file(&file) {
                Ok(()) => sync_dir(&this.dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ModelError::Unavailable(format!(
                        "cannot delete {}: {e}",
                        file.display()
                    )))
                }
            }
            this.write(|txn| {
                txn.open_table(GENERATION_FILES)?.remove(generation)?;
                Ok(())
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::fair_quotas;

    #[test]
    fn quotas_share_max_across_partitions() {
        // Partition 0 has 100, partition 1 has 2, partition 2 has none.
        let q = fair_quotas(&[0, 5, 7], &[100, 7, 7], 10, 0);
        assert_eq!(q, vec![8, 2, 0]);
        let q = fair_quotas(&[0, 0, 0], &[100, 100, 100], 10, 1);
        assert_eq!(q.iter().sum::<usize>(), 10);
        assert!(q.iter().all(|&x| (3..=4).contains(&x)), "{q:?}");
        assert_eq!(fair_quotas(&[3, 3], &[3, 3], 10, 0), vec![0, 0]);
        assert_eq!(fair_quotas(&[0, 0], &[1, 1], usize::MAX, 0), vec![1, 1]);
        // Fewer records wanted than partitions: the rotating start decides who goes first.
        assert_eq!(fair_quotas(&[0, 0, 0], &[5, 5, 5], 1, 2), vec![0, 0, 1]);
    }
}
