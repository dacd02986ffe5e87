//! `EventLog` and `ReadModel` in the process itself, on [redb] and one append-only file:
//! msghash with nothing to install. The standalone binary uses these by default.
//!
//! # Layout
//!
//! In the data directory, each held by one process at a time:
//!
//! - `events.log`, the event log's records ([`segment`]): one frame per record, the key and
//!   the `MessageHashed` envelope exactly as the Kafka adapter writes them; offsets of a
//!   partition are contiguous from 0;
//! - `events.redb`, the rest of the event log ([`EmbeddedLog`]):
//!   - `group_positions`: `(group name, partition u32)` → the next offset the group reads;
//!   - `dead_letters`: sequence → the record and the reason;
//!   - `meta`: the layout version (2; layout 1 also held the records, which the first
//!     open moves to `events.log`), the partition count, fixed at the first open because
//!     the digest → partition map depends on it, and how long `events.log` was durable
//!     at the last commit.
//! - `readmodel.redb`, the projection ([`EmbeddedModel`]):
//!   - `messages`: digest (32 raw bytes) → message;
//!   - `projection_offsets`: partition u32 → highest applied offset (i64);
//!   - `meta`: the layout version.
//!
//! # Durability
//!
//! Every write transaction of the log and the catalog commits with
//! [`Durability::Immediate`]: `commit` returns only
//! after redb has fsynced the new state. redb is copy-on-write with two commit slots, so a
//! process killed at any instant (kill -9, OOM; power loss too, as far as the disk honours
//! fsync) reopens at the last committed transaction, never at a torn one. What msghash acknowledges is therefore on disk:
//!
//! - `append` answers with an offset only after the write holding the record was
//!   fsynced (`events.log` has its own crash recovery: [`segment`]), so a 201 is never
//!   lost;
//! - `end_offset` and subscribers only see committed records, so nothing read can vanish;
//! - `Subscription::commit` returns after its commit, so a group position never points
//!   past records that a crash could take back.
//! - The read model is the exception: `ReadModel::apply` keeps small batches in memory
//!   and writes rows and offsets to the file together, in one durable transaction, every
//!   few seconds ([`model`]'s doc says how). A crash takes both back together and the
//!   projector applies those records again; nothing acknowledged is lost, since the log
//!   holds them.
//!
//! Commits do NOT set redb's quick-repair: it serialises the allocator's state into every
//! commit, which was 40 % of the instructions of a POST (callgrind: 440k → 263k per POST
//! without it). The price is paid once, after a crash: the first open walks the file to
//! rebuild the allocator state (measured: a 300 MB log and a 164 MB read model opened in
//! 0.63 s after a kill -9, against 0.14 s with quick-repair; it grows with the files).
//! The same walk happens when a handle closed by a storage failure (a full disk) is
//! reopened ([`Reopenable`]): that reopen holds the handle's lock, so requests of that
//! database wait for it. Without quick-repair redb
//! commits in one phase with checksums (1PC+C), which is as crash-safe: a torn commit fails
//! its checksum and the previous one is used.
//!
//! # Group commit
//!
//! One writer thread owns every write to `events.log` and `events.redb`. `append` and
//! `commit` send their request over a channel and wait for the answer. The writer takes the
//! first request, then everything already queued behind it (up to [`MAX_GROUP_REQUESTS`]
//! requests or [`MAX_GROUP_BYTES`] bytes), appends all its records in ONE write and one
//! `fdatasync`, writes its position commits and dead letters (if any) in ONE transaction,
//! publishes the new end offsets, and only then answers every waiter. While one group is
//! being fsynced the next one queues up, so N concurrent appends cost a handful of fsyncs,
//! not N. A failed append fails every request of its group with [`LogError::Unavailable`]
//! and assigns no offsets.
//!
//! # Overload and disk errors
//!
//! At most `write_queue` appends ([`DEFAULT_WRITE_QUEUE`] by default), and at most
//! [`WRITE_QUEUE_BYTES`] of them, wait for the writer; one more fails at once with
//! [`LogError::Shed`] (counted in `msghash_write_shed_total`),
//! so an overload is turned away instead of queueing without end. An append whose caller
//! stopped waiting (its client went away, its deadline passed) before the writer took it
//! off the queue is skipped; one whose caller goes while its group commits may still be
//! written, as with Kafka (the record is a pure function of its key, so a retry only adds a
//! duplicate that the projection absorbs).
//!
//! After a failed commit (disk full, I/O error) redb refuses the handle until it is closed
//! (`Reopenable`): the writer closes it, the log stops being writable (its `ready` fails,
//! appends are shed at once) and the writer probes with backoff until a commit works again
//! on the reopened file. The read model and the catalog reopen on their next use after a
//! failure. None of it needs a restart.
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
//! directory of segment files for a workload that is append-only and small. The one
//! exception is the log's records: appended in order and read in order, they cost a B-tree
//! copy-on-write per group commit for nothing, so they are in a plain file with its own
//! torn-write check ([`segment`]; docs/embedded-storage.md says why and what it does).
//!
//! Opening is blocking (it may repair after a crash); call it at startup. Every other
//! blocking redb call runs on `tokio::task::spawn_blocking` or the writer thread, except
//! the read model's point reads (`get`), which run inline while the file is open: a
//! lookup of cached pages takes microseconds, less than the hand-off (docs/performance.md).
//! The read model's applied offsets are kept in memory as well as in the file.

//!
//! # Files of this module
//!
//! - [`log`]: [`EmbeddedLog`] and its subscriptions (reading, group positions);
//! - [`writer`]: the single writer thread and its group commit;
//! - [`segment`]: `events.log`, the records' file: its frames, crash recovery and reads;
//! - [`model`]: [`EmbeddedModel`], one file per read-model generation;
//! - [`generations`]: [`EmbeddedGenerations`], the catalog of generations.
//!
//! This file holds what they share: the file names and table layouts, the error type,
//! opening a database and beginning a durable transaction.

mod generations;
mod log;
mod model;
mod rows;
mod segment;
mod writer;

pub use generations::{EmbeddedGenerations, GENERATIONS_FILE};
pub use log::EmbeddedLog;
pub use model::{model_file, EmbeddedModel};
pub use rows::rows_dir;
use segment::Segment;
pub use segment::SEGMENT_FILE;

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
use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// The file of the event log inside the data directory.
pub const LOG_FILE: &str = "events.redb";
/// The file of the read model inside the data directory.
pub const MODEL_FILE: &str = "readmodel.redb";

/// The layout this build writes (read models, the catalog); a file with another one is
/// refused rather than misread.
const LAYOUT_VERSION: u64 = 1;
/// The event log's layout: 2 = records in `events.log`, the rest in `events.redb`.
const LOG_LAYOUT_VERSION: u64 = 2;
/// The event log's first layout, records in `events.redb` too: moved on open.
const LEGACY_LOG_LAYOUT: u64 = 1;

/// Most requests the writer puts in one transaction.
pub const MAX_GROUP_REQUESTS: usize = 4096;
/// Most record bytes the writer puts in one transaction (one request always fits).
pub const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Most record bytes one subscription read returns (one record always fits), whatever
/// the number of records asked for: a projector's batch of large messages stays bounded.
pub const MAX_READ_BYTES: usize = 32 * 1024 * 1024;
/// Most appends waiting for the writer, by default: one full group behind the one being
/// committed. Past the bound an append is shed at once ([`LogError::Shed`]).
pub const DEFAULT_WRITE_QUEUE: usize = MAX_GROUP_REQUESTS;
/// Most bytes of appends (keys and values) waiting for the writer: large messages posted
/// faster than the disk takes them are shed here instead of piling up in memory. One
/// append alone always goes, whatever its size (up to the body limit).
pub const WRITE_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// redb's page cache of the event log. Its default is 1 GiB; the log is appended at its
/// end and read once, in order, by the projector soon after, so a small cache holding the
/// recent pages serves it. A larger one only grows the resident memory: 16 MiB held 8 MiB
/// more after a POST load for the same rate; 4 MiB cost about a tenth of the POST rate
/// (docs/performance.md).
const LOG_CACHE_BYTES: usize = 8 * 1024 * 1024;
/// redb's page cache of a read-model generation's file, which holds only its applied
/// offsets and layout since the rows moved to fjall (docs/performance.md, item 26; it was
/// 8 MiB for the rows before, items 10, 21 and 24).
const MODEL_CACHE_BYTES: usize = 1024 * 1024;
/// redb's page cache of the generations catalog, a handful of rows.
const CATALOG_CACHE_BYTES: usize = 1024 * 1024;

/// `(partition, offset)`.
type RecordKey = (u32, u64);
/// `(key bytes, value bytes)`.
type RecordValue = (&'static [u8], &'static [u8]);
/// Layout 1 only: the records, moved to `events.log` on open.
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
/// The length of `events.log` that was durable when this transaction committed: a damaged
/// frame before it is never an unfinished write.
const META_SYNCED_END: &str = "records_synced_end";
/// How many probe transactions the writer committed while recovering from failed commits.
const META_PROBES: &str = "write_probes";

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
        "{} has storage layout version {found}, this build reads version {expected}",
        file.display()
    )]
    UnsupportedLayout {
        file: PathBuf,
        found: u64,
        expected: u64,
    },

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
fn open_database(
    dir: &Path,
    name: &str,
    cache_bytes: usize,
) -> Result<(Database, PathBuf), EmbeddedError> {
    std::fs::create_dir_all(dir).map_err(|source| EmbeddedError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let file = dir.join(name);
    let created = !file.exists();
    let db = Database::builder()
        .set_cache_size(cache_bytes)
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

/// A durable write transaction (fsynced before `commit` returns; no quick-repair: see the
/// module doc).
fn begin_durable(db: &Database) -> Result<WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
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
            expected: LAYOUT_VERSION,
        }),
        None => meta
            .insert(META_LAYOUT, LAYOUT_VERSION)
            .map(|_| ())
            .map_err(|e| EmbeddedError::storage(file, e)),
    }
}

/// A database handle that a failure can close and the next use opens again.
///
/// After a write fails with an I/O error (disk full, EIO), redb refuses every later
/// operation on that handle (`PreviousIo`) until it is closed; the file itself is intact at
/// its last durable transaction (the failed one is aborted, and the read model writes the
/// rows it still holds in memory at the reopen: `on_reopen`). So the one who saw the
/// failure [`discard`](Reopenable::discard)s the handle, and the next
/// [`get`](Reopenable::get) opens the file again, which recovers it. Opening fails (and is
/// tried again on the next `get`) while an old handle is still held by an operation in
/// flight, or while the disk still refuses the repair's writes.
pub(super) struct Reopenable {
    file: PathBuf,
    cache_bytes: usize,
    db: Slot<Database>,
    /// Run on a handle opened again, before it is handed out (see `on_reopen`).
    on_reopen: Option<Box<ReopenHook>>,
}

type ReopenHook = dyn Fn(&Database) -> Result<(), redb::Error> + Send + Sync;

impl Reopenable {
    pub(super) fn new(file: PathBuf, cache_bytes: usize, db: Database) -> Reopenable {
        Reopenable {
            file,
            cache_bytes,
            db: Slot::new(db),
            on_reopen: None,
        }
    }

    /// `hook` runs on each handle opened again, while the handle's lock is held, before
    /// anyone gets it; if it fails, the handle is closed and the open fails (and is tried
    /// again on the next `get`). The read model writes the rows it holds in memory, which a
    /// failed commit left unwritten.
    pub(super) fn on_reopen(mut self, hook: Box<ReopenHook>) -> Reopenable {
        self.on_reopen = Some(hook);
        self
    }

    pub(super) fn file(&self) -> &Path {
        &self.file
    }

    /// The open handle, opening the file again first if a failure closed it. Blocking.
    pub(super) fn get(&self) -> Result<Arc<Database>, redb::Error> {
        let (db, reopened) = self.db.get_or_open(|| {
            // `open`, never `create`: a file deleted meanwhile (a dropped generation)
            // stays gone.
            let db = Database::builder()
                .set_cache_size(self.cache_bytes)
                .open(&self.file)?;
            if let Some(hook) = &self.on_reopen {
                hook(&db)?;
            }
            Ok::<_, redb::Error>(db)
        })?;
        if reopened {
            tracing::info!(file = %self.file.display(), "reopened after a storage failure");
        }
        Ok(db)
    }

    /// The open handle, or `None` when it must be opened again first or is being opened
    /// again right now. Never waits, neither on the file nor on a reopen in progress
    /// (which holds the lock while it walks the file): callers run on the async workers
    /// and go to the blocking pool on `None`, where a deadline can end their wait.
    pub(super) fn open_now(&self) -> Option<Arc<Database>> {
        self.db.open_now()
    }

    /// Closes `failed`, the handle an operation just failed on (if it is still the open
    /// one), so that the next [`get`](Reopenable::get) opens the file again. The caller
    /// drops its own clone right after.
    pub(super) fn discard(&self, failed: &Arc<Database>) {
        self.db.discard(failed);
    }

    /// Runs `f` on the open handle; if `f` fails, the handle is discarded so that the next
    /// use starts from a fresh open.
    pub(super) fn with<T, E>(
        &self,
        open_failed: impl FnOnce(redb::Error) -> E,
        f: impl FnOnce(&Database) -> Result<T, E>,
    ) -> Result<T, E> {
        let db = self.get().map_err(open_failed)?;
        let result = f(&db);
        if result.is_err() {
            self.discard(&db);
        }
        result
    }
}

/// A shared handle that a failure closes and the next use opens again: the mechanism of
/// [`Reopenable`] (redb files) and of `rows::Rows` (the read model's fjall rows).
pub(super) struct Slot<H>(pub(super) std::sync::RwLock<Option<Arc<H>>>);

impl<H> Slot<H> {
    pub(super) fn new(handle: H) -> Slot<H> {
        Slot(std::sync::RwLock::new(Some(Arc::new(handle))))
    }

    /// The open handle, or the one `open` makes if a failure closed it (under the write
    /// lock: one opener at a time, and no one gets the handle before `open` returned);
    /// `true` with a handle just opened. Blocking.
    pub(super) fn get_or_open<E>(
        &self,
        open: impl FnOnce() -> Result<H, E>,
    ) -> Result<(Arc<H>, bool), E> {
        if let Some(handle) = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            return Ok((handle.clone(), false));
        }
        let mut slot = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(handle) = slot.as_ref() {
            return Ok((handle.clone(), false));
        }
        let handle = Arc::new(open()?);
        *slot = Some(handle.clone());
        Ok((handle, true))
    }

    /// The open handle, or `None` when it must be opened again first or is being opened
    /// again right now: never waits.
    pub(super) fn open_now(&self) -> Option<Arc<H>> {
        match self.0.try_read() {
            Ok(slot) => slot.clone(),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().clone(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Closes `failed` if it is still the open handle.
    pub(super) fn discard(&self, failed: &Arc<H>) {
        let mut slot = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_some_and(|h| Arc::ptr_eq(h, failed)) {
            *slot = None;
        }
    }
}

/// Copies the records of a layout-1 log (the `records` table of `txn`) to a new
/// `events.log`, made durable; the caller checks them and deletes the table in `txn`,
/// which it commits with the new layout. Until that commit the old layout stands, so a
/// crash in between only means doing it again: `events.log` is written from scratch each
/// time. Returns how many were copied.
fn migrate(txn: &WriteTransaction, dir: &Path, file: &Path) -> Result<u64, EmbeddedError> {
    use std::io::Write;
    let storage = |e: redb::Error| EmbeddedError::storage(file, e);
    let target = dir.join(SEGMENT_FILE);
    let io = |e: std::io::Error| EmbeddedError::Storage {
        file: target.clone(),
        detail: e.to_string(),
    };
    let mut moved = 0u64;
    {
        let records = txn.open_table(RECORDS).map_err(|e| storage(e.into()))?;
        let out = std::fs::File::create(&target).map_err(io)?;
        let mut writer = std::io::BufWriter::with_capacity(1024 * 1024, &out);
        let mut frame = Vec::new();
        for entry in records.iter().map_err(|e| storage(e.into()))? {
            let (key, value) = entry.map_err(|e| storage(e.into()))?;
            let (partition, offset) = key.value();
            let (k, v) = value.value();
            if !segment::fits(k, v) {
                return Err(EmbeddedError::Storage {
                    file: file.to_path_buf(),
                    detail: format!(
                        "offset {offset} of partition {partition} ({} bytes) is larger than \
                         {} can take ({} bytes); nothing was moved",
                        k.len() + v.len(),
                        SEGMENT_FILE,
                        segment::MAX_FRAME
                    ),
                });
            }
            frame.clear();
            segment::encode(&mut frame, partition, offset, k, v);
            writer.write_all(&frame).map_err(io)?;
            moved += 1;
        }
        writer.flush().map_err(io)?;
        drop(writer);
        out.sync_all().map_err(io)?;
    }
    sync_dir(dir);
    Ok(moved)
}

fn to_offset(offset: u64) -> Result<Offset, LogError> {
    Offset::try_from(offset)
        .map_err(|_| LogError::Unavailable(format!("offset {offset} overflows")))
}

fn storage_unavailable(e: impl Into<redb::Error>) -> LogError {
    LogError::Unavailable(format!("embedded event log: {}", e.into()))
}
