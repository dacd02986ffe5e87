//! [`EmbeddedModel`]: the read model of one generation in its own redb file, rows and
//! applied offsets written in one transaction. A failed operation (a commit on a full
//! disk) closes the handle and the next one opens the file again, so the projector's
//! retries go through once the disk takes writes again, without a restart.
//!
//! # Durability
//!
//! The read model is a projection of the log, whose appends are each durable before their
//! 201. So `apply` keeps small batches in memory (their rows in a sorted map that reads
//! and listings look at before the file, their offsets raised at once: visible to readers
//! and the barrier as soon as `apply` returns) and writes them (the rows to fjall, the
//! offsets to the redb file: [`super::rows`]) in one durable commit only when [`DURABLE_EVERY`] has passed since the last one, when
//! [`DURABLE_BYTES`] of rows are pending, for a batch of [`DURABLE_BATCH_ROWS`] rows or
//! more, at [`ReadModel::sync`] (which the projector calls whenever a poll finds nothing
//! for 200 ms and when it, or a replay, stops) and when the last clone of the model is
//! dropped. A second of a busy projector's rows then costs one commit, written in key
//! order, instead of one per batch (docs/performance.md, items 18, 22, 23 and 26).
//!
//! - A crash (kill -9, power) takes back what was applied since the last durable commit
//!   (at most a second of a busy projector's work, which it projects again in a fraction
//!   of a second); the applied offsets go back with the rows (rows persisted without
//!   their offsets may stay: applied again, they change nothing). The projector then applies those records again: its `Continuity` guard
//!   compares each partition's first record with the model's applied offset and rewinds
//!   the group to it (the same guard that catches up a lost Cassandra keyspace, whose
//!   commit log is itself synced only every 10 s by default).
//! - A failed durable commit (an I/O error) closes the handle and leaves the rows and
//!   offsets in memory; the reopen writes them, durably, before anyone reads from the new
//!   handle, and while the file cannot be opened nothing is answered from memory: a
//!   reader never sees an applied offset whose row is missing.

use super::rows::{rows_dir, Rows};
use super::*;
use std::collections::BTreeMap;

/// At most this long between two durable commits of `apply` (see the module doc). While
/// the rows were in the redb file, each commit rewrote every leaf its random digests fell
/// in, and 3 s gave a third more POSTs a second than 1 s on a large model (item 23); in
/// fjall a commit costs about the same per row however often it comes, so a second: a
/// third of the rows in memory under a load, and of what a crash takes back
/// (docs/performance.md, item 26).
pub const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// At most this many bytes of rows (messages, plus [`ROW_OVERHEAD`] each) applied between
/// two durable commits: what the model keeps in memory to write again after a failure is
/// bounded.
pub const DURABLE_BYTES: usize = 4 * 1024 * 1024;
/// What a kept row costs in memory besides its message: the digest and the `String` in a
/// B-tree map's node, and the message's allocation.
const ROW_OVERHEAD: usize = 112;
/// A batch of at least this many rows commits durably: its fsync is shared by all its rows (a replay's or a catching-up projector's batches;
/// live POSTs come in batches of tens to hundreds). Measured: non-durable commits of
/// 65,536-row batches made a 1M-event replay slower and held more memory.
pub const DURABLE_BATCH_ROWS: usize = 4096;

/// The embedded read model. Cloning is cheap (a few `Arc`s).
#[derive(Clone)]
pub struct EmbeddedModel {
    store: Arc<Reopenable>,
    generation: Generation,
    /// The applied offsets as of the last batch `apply` took, per partition: the
    /// read-your-writes barrier asks for them on every miss, so they are answered from
    /// memory while the file is open (after a failure closed it, from the file, which
    /// opens it again or fails). Read from the file at open, raised once a batch's rows
    /// are readable, in memory or in the file (never lowered), so they are never ahead of
    /// what readers see: a durable commit that failed leaves them behind until the
    /// projector's retry goes through, and rows kept in memory are written by the reopen
    /// before a reader gets the new handle.
    applied: Arc<std::sync::RwLock<HashMap<u32, Offset>>>,
    /// What `apply` took since its last durable commit: the offsets, and when to commit.
    pending: Arc<std::sync::Mutex<Pending>>,
    /// The rows of `pending`, not in the file yet.
    unwritten: Arc<Unwritten>,
    /// The rows written (the redb file keeps the applied offsets).
    rows: Arc<Rows>,
    /// Writes what is pending when the last clone is dropped.
    _flush: Arc<FlushOnDrop>,
}

/// Held by every clone of a model: when the last one goes (a clean shutdown, a generation
/// dropped), what is pending is written durably if the file is open. On the thread that
/// drops it: the projector syncs when it stops, so at shutdown there is mostly nothing
/// left to write; `drop_generation` drops its handle on the blocking pool.
struct FlushOnDrop {
    store: Arc<Reopenable>,
    pending: Arc<std::sync::Mutex<Pending>>,
    unwritten: Arc<Unwritten>,
    rows: Arc<Rows>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let Some(db) = self.store.open_now() else {
            let pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !pending.is_empty() {
                tracing::warn!(
                    file = %self.store.file().display(),
                    bytes = pending.bytes,
                    "the read model's file is closed after a failure: its last rows are not \
                     written; the projector applies them again"
                );
            }
            return;
        };
        if let Err(e) = write_kept(&db, &self.pending, &self.unwritten, &self.rows) {
            tracing::warn!(
                file = %self.store.file().display(),
                error = %e,
                "could not write the read model's last rows; the projector applies them again"
            );
        }
    }
}

/// What `apply` took since the last durable commit, besides the rows (in [`Unwritten`]):
/// the applied offsets to commit with them, and what decides when to.
struct Pending {
    since: std::time::Instant,
    /// [`DURABLE_EVERY`], shorter or longer in tests.
    every: Duration,
    /// The rows' bytes (messages, plus [`ROW_OVERHEAD`] each).
    bytes: usize,
    applied: Vec<(u32, Offset)>,
}

/// The rows applied since the last durable commit, not yet in the file: readers look here
/// before the file. Only `apply`, `sync`, the reopen and the last drop write it, each
/// holding the [`Pending`] lock first; they clear it only after the commit that wrote its
/// rows.
type Unwritten = std::sync::RwLock<BTreeMap<Digest, String>>;

/// The message of `digest` if it was applied and is not in the file yet.
fn unwritten_row(unwritten: &Unwritten, digest: &Digest) -> Option<String> {
    unwritten
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(digest)
        .cloned()
}

impl Pending {
    fn new(every: Duration) -> Pending {
        Pending {
            since: std::time::Instant::now(),
            every,
            bytes: 0,
            applied: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0 && self.applied.is_empty()
    }

    /// Whether a batch of `rows` rows and `bytes` bytes is committed durably, with
    /// everything pending (see the module doc).
    fn durable_with(&self, rows: usize, bytes: usize) -> bool {
        rows >= DURABLE_BATCH_ROWS
            || self.since.elapsed() >= self.every
            || self.bytes + bytes >= DURABLE_BYTES
    }

    /// After a durable commit: nothing pending.
    fn clear(&mut self) {
        *self = Pending::new(self.every);
    }
}

/// Raises the applied offsets to `applied` in `txn`.
fn write_applied(txn: &WriteTransaction, applied: &[(u32, Offset)]) -> Result<(), redb::Error> {
    let mut offsets = txn.open_table(PROJECTION_OFFSETS)?;
    for &(partition, offset) in applied {
        let current = offsets.get(partition)?.map(|v| v.value());
        // An applied offset never moves backwards.
        if current.is_none_or(|c| offset > c) {
            offsets.insert(partition, offset)?;
        }
    }
    Ok(())
}

/// Writes the unwritten rows, with `batch`'s after them, to `rows` and persists them, then
/// raises the applied offsets (pending and `batch`'s) in one durable transaction of `db`,
/// then clears what was pending: a durable `apply`, a `sync`, the reopen after a failure
/// and the last drop. The rows stay readable in `unwritten` until the commit has returned,
/// and are in `rows` from then on. A crash between the two commits leaves rows without
/// their offsets (applied again), never an offset without its row.
fn write_durably(
    db: &Database,
    pending: &mut Pending,
    unwritten: &Unwritten,
    rows: &Rows,
    batch: Option<&ProjectionBatch>,
) -> Result<(), redb::Error> {
    if pending.is_empty() && batch.is_none_or(ProjectionBatch::is_empty) {
        return Ok(());
    }
    {
        let kept = unwritten
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let batched = batch
            .into_iter()
            .flat_map(|b| b.messages.iter().map(|(d, m)| (d, m)));
        rows.write(kept.iter().chain(batched))?;
    }
    let txn = begin_durable(db)?;
    write_applied(&txn, &pending.applied)?;
    if let Some(batch) = batch {
        write_applied(&txn, &batch.applied)?;
    }
    txn.commit()?;
    // Freed after the lock is let go: readers wait only for the swap.
    let written = std::mem::take(
        &mut *unwritten
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    drop(written);
    pending.clear();
    Ok(())
}

/// [`write_durably`] of what is kept, taking the lock: a `sync`, the reopen after a
/// failure and the last drop.
fn write_kept(
    db: &Database,
    pending: &std::sync::Mutex<Pending>,
    unwritten: &Unwritten,
    rows: &Rows,
) -> Result<(), redb::Error> {
    let mut pending = pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    write_durably(db, &mut pending, unwritten, rows, None)
}

/// The read model's layout: 2 = the rows in a fjall directory beside the file
/// ([`rows_dir`]), the applied offsets in the file.
const MODEL_LAYOUT_VERSION: u64 = 2;
/// Layout 1: the rows in the file's `messages` table; moved to the rows' directory on open.
const MODEL_LAYOUT_ROWS_IN_FILE: u64 = 1;
/// Rows moved per persist when a layout-1 file is opened.
const MIGRATE_CHUNK_ROWS: usize = 65_536;

/// Checks or records the model's layout in `meta`; a layout-1 file's rows are moved to
/// `rows` first, in `txn`, which the caller commits (see [`migrate_rows`]). Returns
/// whether they were.
fn check_model_layout(
    txn: &WriteTransaction,
    meta: &mut redb::Table<'_, &str, u64>,
    file: &Path,
    rows: &Rows,
) -> Result<bool, EmbeddedError> {
    let storage = |e: redb::Error| EmbeddedError::storage(file, e);
    let found = meta
        .get(META_LAYOUT)
        .map_err(|e| storage(e.into()))?
        .map(|v| v.value());
    match found {
        Some(MODEL_LAYOUT_VERSION) => Ok(false),
        None | Some(MODEL_LAYOUT_ROWS_IN_FILE) => {
            let migrated = found.is_some();
            if migrated {
                migrate_rows(txn, file, rows)?;
            }
            meta.insert(META_LAYOUT, MODEL_LAYOUT_VERSION)
                .map_err(|e| storage(e.into()))?;
            Ok(migrated)
        }
        Some(found) => Err(EmbeddedError::UnsupportedLayout {
            file: file.to_path_buf(),
            found,
            expected: MODEL_LAYOUT_VERSION,
        }),
    }
}

/// Copies the rows of a layout-1 file (its `messages` table) to `rows`, persisted, and
/// deletes the table in `txn`. Until the caller commits `txn` with the new layout the old
/// one stands, so a crash in between only means copying them again (the same rows).
fn migrate_rows(txn: &WriteTransaction, file: &Path, rows: &Rows) -> Result<(), EmbeddedError> {
    let storage = |e: redb::Error| EmbeddedError::storage(file, e);
    let started = std::time::Instant::now();
    let mut moved = 0usize;
    {
        let messages = txn.open_table(MESSAGES).map_err(|e| storage(e.into()))?;
        let mut chunk: Vec<(Digest, String)> = Vec::with_capacity(MIGRATE_CHUNK_ROWS);
        let mut entries = messages.iter().map_err(|e| storage(e.into()))?;
        loop {
            let entry = entries.next().transpose().map_err(|e| storage(e.into()))?;
            let done = entry.is_none();
            if let Some((key, value)) = entry {
                // The key type is 32 bytes wide: this cannot fail on an intact file.
                let digest = Digest::from_bytes(key.value()).ok_or_else(|| {
                    storage(redb::Error::Corrupted(
                        "a stored digest is not 32 bytes".into(),
                    ))
                })?;
                chunk.push((digest, value.value().to_owned()));
            }
            if chunk.len() == MIGRATE_CHUNK_ROWS || (done && !chunk.is_empty()) {
                rows.write(chunk.iter().map(|(d, m)| (d, m)))
                    .map_err(|e| EmbeddedError::storage(rows.dir(), e))?;
                moved += chunk.len();
                chunk.clear();
            }
            if done {
                break;
            }
        }
    }
    txn.delete_table(MESSAGES).map_err(|e| storage(e.into()))?;
    tracing::info!(
        file = %file.display(),
        rows = moved,
        to = %rows.dir().display(),
        took = ?started.elapsed(),
        "read model rows moved out of the file (layout 1 -> 2)"
    );
    Ok(())
}

pub(super) fn model_unavailable(e: impl Into<redb::Error>) -> ModelError {
    ModelError::unavailable("embedded read model", e.into())
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
        let (db, file) = open_database(dir, &model_file(generation), MODEL_CACHE_BYTES)?;
        let storage = |e: redb::Error| EmbeddedError::storage(&file, e);
        let rows = Arc::new(Rows::open(dir.join(rows_dir(generation)))?);
        let txn = begin_durable(&db).map_err(storage)?;
        let migrated = {
            let mut meta = txn.open_table(MODEL_META).map_err(|e| storage(e.into()))?;
            txn.open_table(PROJECTION_OFFSETS)
                .map_err(|e| storage(e.into()))?;
            check_model_layout(&txn, &mut meta, &file, &rows)?
        };
        txn.commit().map_err(|e| storage(e.into()))?;
        let mut db = db;
        if migrated {
            // The rows' pages are free now: give them back, so that the file holds only
            // the offsets (a million rows' 220 MB file becomes a few pages).
            db.compact().map_err(|e| storage(e.into()))?;
        }
        let applied = stored_applied(&db).map_err(storage)?;
        let pending = Arc::new(std::sync::Mutex::new(Pending::new(DURABLE_EVERY)));
        let unwritten = Arc::new(Unwritten::default());
        let (kept, unwritten_rows, written) = (pending.clone(), unwritten.clone(), rows.clone());
        // Runs on a handle opened again after a failure, before anyone else uses it: the
        // rows and offsets a failed commit left unwritten (or took back) go in first.
        let rewrite = move |db: &Database| write_kept(db, &kept, &unwritten_rows, &written);
        let store =
            Arc::new(Reopenable::new(file, MODEL_CACHE_BYTES, db).on_reopen(Box::new(rewrite)));
        Ok(EmbeddedModel {
            _flush: Arc::new(FlushOnDrop {
                store: store.clone(),
                pending: pending.clone(),
                unwritten: unwritten.clone(),
                rows: rows.clone(),
            }),
            store,
            generation,
            applied: Arc::new(std::sync::RwLock::new(applied)),
            pending,
            unwritten,
            rows,
        })
    }

    /// The same model, its commits durable at least every `every` instead of
    /// [`DURABLE_EVERY`].
    pub fn durable_every(self, every: Duration) -> EmbeddedModel {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .every = every;
        self
    }

    /// The database file (the applied offsets).
    pub fn path(&self) -> &Path {
        self.store.file()
    }

    /// The directory of the rows.
    pub fn rows_path(&self) -> &Path {
        self.rows.dir()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<T, ModelError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.with(model_unavailable, f))
            .await
            .map_err(|e| ModelError::unavailable("embedded read model task", e))?
    }

    /// A point read: on the calling thread while the file is open, since it takes a few
    /// microseconds (the pages are in redb's cache or the OS's) and handing it to the
    /// blocking pool costs more than that and a context switch each way
    /// (docs/performance.md); on the blocking pool when the file must be opened again
    /// first, which walks the whole file.
    async fn point_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<T, ModelError> {
        match self.store.open_now() {
            Some(db) => {
                let result = f(&db);
                if result.is_err() {
                    self.store.discard(&db);
                }
                result
            }
            None => self.blocking(f).await,
        }
    }

    /// Takes `batch` into memory: its rows into `unwritten`, its offsets into `pending`.
    fn keep(&self, pending: &mut Pending, batch: &ProjectionBatch, bytes: usize) {
        // Copied before the lock: readers wait only for the inserts.
        let copied = batch.messages.clone();
        let mut rows = self
            .unwritten
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rows.extend(copied);
        drop(rows);
        pending.bytes += bytes;
        pending.applied.extend_from_slice(&batch.applied);
    }

    /// Raises the remembered applied offsets to those of a batch just committed.
    fn remember_applied(&self, applied: &[(u32, Offset)]) {
        let mut known = self
            .applied
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(partition, offset) in applied {
            let current = known.entry(partition).or_insert(offset);
            *current = (*current).max(offset);
        }
    }
}

/// Every partition's applied offset stored in `db`.
fn stored_applied(db: &Database) -> Result<HashMap<u32, Offset>, redb::Error> {
    let txn = db.begin_read()?;
    let offsets = txn.open_table(PROJECTION_OFFSETS)?;
    let mut applied = HashMap::new();
    for entry in offsets.iter()? {
        let (partition, offset) = entry?;
        applied.insert(partition.value(), offset.value());
    }
    Ok(applied)
}

#[async_trait]
impl ReadModel for EmbeddedModel {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError> {
        if batch.is_empty() {
            return Ok(());
        }
        let bytes: usize = batch
            .messages
            .iter()
            .map(|(_, m)| m.len() + ROW_OVERHEAD)
            .sum();
        // Most batches only go to memory: on this thread, unless the file must be opened
        // again or a durable commit holds the lock (then on the blocking pool, below).
        if self.store.open_now().is_some() {
            if let Ok(mut pending) = self.pending.try_lock() {
                if !pending.durable_with(batch.messages.len(), bytes) {
                    self.keep(&mut pending, batch, bytes);
                    drop(pending);
                    self.remember_applied(&batch.applied);
                    return Ok(());
                }
            }
        }
        let mut owned = batch.clone();
        let model = self.clone();
        self.blocking(move |db| {
            let mut pending = model
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if pending.durable_with(owned.messages.len(), bytes) {
                // In key order, each insert descends next to the previous one: the pages
                // it reads and dirties are the ones just used (docs/performance.md).
                owned
                    .messages
                    .sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                write_durably(
                    db,
                    &mut pending,
                    &model.unwritten,
                    &model.rows,
                    Some(&owned),
                )
                .map_err(model_unavailable)
            } else {
                model.keep(&mut pending, &owned, bytes);
                Ok(())
            }
        })
        .await?;
        self.remember_applied(&batch.applied);
        Ok(())
    }

    async fn sync(&self) -> Result<(), ModelError> {
        let pending = self.pending.clone();
        // Never waits on the async worker: when a commit in progress holds the lock, the
        // blocking pool waits for it.
        let nothing_pending = match pending.try_lock() {
            Ok(kept) => kept.is_empty(),
            Err(std::sync::TryLockError::Poisoned(kept)) => kept.into_inner().is_empty(),
            Err(std::sync::TryLockError::WouldBlock) => false,
        };
        if nothing_pending {
            return Ok(());
        }
        // Closed by a failure: the reopen writes what is pending, durably (the
        // `on_reopen` hook); reopening from here would walk the file at every idle poll
        // while the disk still fails.
        let Some(db) = self.store.open_now() else {
            return Ok(());
        };
        let model = self.clone();
        tokio::task::spawn_blocking(move || {
            match write_kept(&db, &model.pending, &model.unwritten, &model.rows) {
                Ok(()) => Ok(()),
                Err(e) => {
                    model.store.discard(&db);
                    Err(model_unavailable(e))
                }
            }
        })
        .await
        .map_err(|e| ModelError::unavailable("embedded read model task", e))?
    }

    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        let digest = *digest;
        let unwritten = self.unwritten.clone();
        let rows = self.rows.clone();
        // Memory first, then the rows written: a row leaves memory only after the commit
        // that wrote it returned. Only with the file open (`point_read` opens it again
        // first if need be, which writes the rows in memory): a model whose file cannot be
        // opened again answers nothing, not a few rows from memory.
        self.point_read(move |_db| {
            if let Some(message) = unwritten_row(&unwritten, &digest) {
                return Ok(Some(message));
            }
            rows.get(&digest)
        })
        .await
    }

    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        if self.store.open_now().is_none() {
            // A failure closed the file: read the offset from it, which opens it again or
            // says why it cannot (readiness and the barrier must hear of that).
            return self
                .blocking(move |db| {
                    let applied = stored_applied(db).map_err(model_unavailable)?;
                    Ok(applied.get(&partition).copied())
                })
                .await;
        }
        Ok(self
            .applied
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&partition)
            .copied())
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.copied();
        let unwritten = self.unwritten.clone();
        let rows = self.rows.clone();
        self.blocking(move |_db| {
            // The rows not in the file yet, looked at first: one written meanwhile is in
            // the file by the time the file is read (cleared only after its commit).
            let unwritten: Vec<Digest> = {
                let rows = unwritten
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let start = after.map_or(Bound::Unbounded, Bound::Excluded);
                rows.range((start, Bound::Unbounded))
                    .map(|(digest, _)| *digest)
                    .take(limit)
                    .collect()
            };
            let mut digests = rows.list(after.as_ref(), limit)?;
            if !unwritten.is_empty() {
                digests.extend(unwritten);
                digests.sort_unstable();
                digests.dedup();
                digests.truncate(limit);
            }
            Ok(digests)
        })
        .await
    }

    fn generation(&self) -> Generation {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(messages: &[&str], applied: (u32, Offset)) -> ProjectionBatch {
        ProjectionBatch {
            messages: messages
                .iter()
                .map(|m| (Digest::of(m), (*m).to_owned()))
                .collect(),
            applied: vec![applied],
        }
    }

    /// What a kill -9 would leave of the model's file and rows right now (their bytes: the
    /// page cache; the durable commits' header points only at pages they wrote, and the
    /// rows' journal is read up to its last whole entry), opened as a model of its own.
    fn crash_image(model: &EmbeddedModel) -> (tempfile::TempDir, EmbeddedModel) {
        let image = tempfile::tempdir().expect("tempdir");
        std::fs::copy(model.path(), image.path().join(MODEL_FILE)).expect("copy the file");
        msghash_testkit::files::copy_tree(model.rows_path(), &image.path().join(rows_dir(0)));
        let opened = EmbeddedModel::open(image.path()).expect("open the crash image");
        (image, opened)
    }

    /// Asserts that `model` holds each of `messages` and has applied partition 0 up to
    /// `applied`.
    async fn holds(model: &EmbeddedModel, messages: &[&str], applied: Option<Offset>) {
        for &message in messages {
            let found = model.get(&Digest::of(message)).await.expect("get");
            assert_eq!(
                found.as_deref(),
                Some(message),
                "{} lacks a row",
                model.path().display()
            );
        }
        let offset = model.applied_offset(0).await.expect("applied");
        assert_eq!(
            offset,
            applied,
            "applied offset of {}",
            model.path().display()
        );
    }

    /// A model whose commits are made durable by size or by `sync` only.
    fn open_untimed(dir: &Path) -> EmbeddedModel {
        let model = EmbeddedModel::open(dir).expect("open model");
        model.durable_every(Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn a_crash_takes_back_rows_and_offsets_together_and_large_batches_are_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = open_untimed(dir.path());
        model.apply(&batch(&["one"], (0, 0))).await.expect("apply");
        holds(&model, &["one"], Some(0)).await;

        // Not durable yet: a crash now leaves neither the row nor its offset, so the
        // projector's continuity guard applies the record again.
        let (_image, crashed) = crash_image(&model);
        assert_eq!(crashed.get(&Digest::of("one")).await.expect("get"), None);
        holds(&crashed, &[], None).await;

        // A batch of DURABLE_BATCH_ROWS rows is durable, with everything before it.
        let many: Vec<String> = (0..DURABLE_BATCH_ROWS).map(|i| format!("m{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        model.apply(&batch(&many, (0, 1))).await.expect("apply");
        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &["one", many[7]], Some(1)).await;

        // So is the batch that brings the rows pending since the last durable commit to
        // DURABLE_BYTES (this one alone stays just under).
        model.apply(&batch(&["two"], (0, 2))).await.expect("apply");
        let large = "x".repeat(DURABLE_BYTES - ROW_OVERHEAD - 1);
        model.apply(&batch(&[&large], (0, 3))).await.expect("apply");
        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &["two", &large], Some(3)).await;

        // And `sync` makes what is pending durable.
        model
            .apply(&batch(&["three"], (0, 4)))
            .await
            .expect("apply");
        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &[], Some(3)).await;
        model.sync().await.expect("sync");
        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &["three"], Some(4)).await;
    }

    /// Rows applied since the last durable commit are in memory only (a kill -9 leaves the
    /// file without them), yet reads, listings and the barrier see them at once, merged
    /// with those of the file; a sync writes them, and they read the same from there.
    #[tokio::test]
    async fn rows_in_memory_are_read_and_listed_with_those_in_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = open_untimed(dir.path());
        let old = ["a", "b", "c", "d"];
        let new = ["e", "f", "g", "h"];
        model.apply(&batch(&old, (0, 0))).await.expect("apply");
        model.sync().await.expect("sync");
        // "a" again, as after a re-applied record: in memory and in the file, listed once.
        model
            .apply(&batch(&["a", "e", "f", "g", "h"], (0, 1)))
            .await
            .expect("apply");

        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &old, Some(0)).await;
        for message in new {
            let found = crashed.get(&Digest::of(message)).await.expect("get");
            assert_eq!(found, None, "{message} reached the file before a sync");
        }

        let mut all: Vec<Digest> = old.iter().chain(&new).map(|m| Digest::of(m)).collect();
        all.sort_unstable();
        for synced in [false, true] {
            if synced {
                model.sync().await.expect("sync");
                let (_image, crashed) = crash_image(&model);
                holds(&crashed, &[old, new].concat(), Some(1)).await;
            }
            holds(&model, &[old, new].concat(), Some(1)).await;
            assert_eq!(model.list(None, 100).await.expect("list"), all);
            // Pages of 3 (the file's and memory's rows interleave): each row once, in order.
            let mut paged = Vec::new();
            loop {
                let page = model.list(paged.last(), 3).await.expect("list");
                if page.is_empty() {
                    break;
                }
                assert!(page.len() <= 3, "a page of {} rows", page.len());
                paged.extend(page);
            }
            assert_eq!(paged, all, "paged listing, synced: {synced}");
        }
    }

    /// A clean close (the last clone of the model dropped) writes what is in memory.
    #[tokio::test]
    async fn the_last_clone_dropped_writes_the_rows_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = open_untimed(dir.path());
        model
            .apply(&batch(&["closed"], (0, 5)))
            .await
            .expect("apply");
        let clone = model.clone();
        drop(model);
        holds(&clone, &["closed"], Some(5)).await;
        drop(clone);
        let reopened = EmbeddedModel::open(dir.path()).expect("open again");
        holds(&reopened, &["closed"], Some(5)).await;
    }

    /// A read model written by a build before layout 2 (its rows in the file's `messages`
    /// table): the first open moves every row to the rows' directory (in more than one
    /// chunk), keeps the applied offsets, and gives the file's pages back.
    #[tokio::test]
    async fn a_layout_1_file_has_its_rows_moved_out_and_keeps_its_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(MODEL_FILE);
        let old: Vec<String> = (0..MIGRATE_CHUNK_ROWS + 1000)
            .map(|i| format!("a row of layout 1, number {i}"))
            .collect();
        {
            let db = Database::create(&file).expect("create a layout-1 file");
            let txn = db.begin_write().expect("begin");
            {
                let mut meta = txn.open_table(MODEL_META).expect("meta");
                meta.insert(META_LAYOUT, MODEL_LAYOUT_ROWS_IN_FILE)
                    .expect("layout");
                let mut messages = txn.open_table(MESSAGES).expect("messages");
                for message in &old {
                    messages
                        .insert(Digest::of(message).as_bytes(), message.as_str())
                        .expect("row");
                }
                let mut offsets = txn.open_table(PROJECTION_OFFSETS).expect("offsets");
                offsets.insert(0, 41).expect("offset");
            }
            txn.commit().expect("commit");
        }
        let before = std::fs::metadata(&file).expect("file").len();

        let model = EmbeddedModel::open(dir.path()).expect("open and move the rows");
        let sample: Vec<&str> = old.iter().step_by(997).map(String::as_str).collect();
        holds(&model, &sample, Some(41)).await;
        let last = old.last().expect("rows");
        holds(&model, &[last.as_str()], Some(41)).await;
        let mut all: Vec<Digest> = old.iter().map(|m| Digest::of(m)).collect();
        all.sort_unstable();
        assert_eq!(model.list(None, old.len() + 10).await.expect("list"), all);
        let after = std::fs::metadata(&file).expect("file").len();
        assert!(
            after * 4 < before,
            "the file kept the rows' pages: {before} bytes before, {after} after"
        );
        drop(model);

        // Layout 2 now, without the table; a second open moves nothing and finds it all.
        {
            let db = Database::open(&file).expect("open the file");
            let txn = db.begin_read().expect("read");
            let meta = txn.open_table(MODEL_META).expect("meta");
            let layout = meta.get(META_LAYOUT).expect("get").map(|v| v.value());
            assert_eq!(layout, Some(MODEL_LAYOUT_VERSION));
            assert!(
                txn.open_table(MESSAGES).is_err(),
                "the rows' table is still in the file"
            );
        }
        let reopened = EmbeddedModel::open(dir.path()).expect("open again");
        holds(&reopened, &sample, Some(41)).await;
    }

    #[tokio::test]
    async fn commits_are_durable_once_their_interval_has_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = EmbeddedModel::open(dir.path())
            .expect("open model")
            .durable_every(Duration::ZERO);
        model
            .apply(&batch(&["at once"], (0, 0)))
            .await
            .expect("apply");
        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &["at once"], Some(0)).await;
    }

    /// A failure closed the handle while rows were kept in memory, and the file is at its
    /// last durable commit: the reopen writes them before anyone reads, so no reader sees
    /// an applied offset whose row is missing, and they are durable from then on.
    #[tokio::test]
    async fn rows_in_memory_when_a_failure_closes_the_handle_are_written_by_the_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = open_untimed(dir.path());
        model.apply(&batch(&["kept"], (0, 0))).await.expect("apply");
        model.sync().await.expect("sync");
        let durable = std::fs::read(model.path()).expect("the durable file");
        model.apply(&batch(&["lost"], (0, 1))).await.expect("apply");
        holds(&model, &["kept", "lost"], Some(1)).await;

        // The handle fails and is closed, and the file is as a failed close leaves it:
        // at the last durable commit.
        let db = model.store.open_now().expect("the file is open");
        model.store.discard(&db);
        drop(db);
        std::fs::write(model.path(), &durable).expect("the file as the failure left it");

        // The first read opens the file again.
        holds(&model, &["kept", "lost"], Some(1)).await;
        let (_image, crashed) = crash_image(&model);
        holds(&crashed, &["kept", "lost"], Some(1)).await;
    }

    #[tokio::test]
    async fn a_model_whose_file_cannot_be_opened_again_answers_no_applied_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = EmbeddedModel::open(dir.path()).expect("open model");
        let batch = ProjectionBatch {
            messages: vec![(Digest::of("foo"), "foo".to_owned())],
            applied: vec![(0, 3)],
        };
        model.apply(&batch).await.expect("apply");
        assert_eq!(model.applied_offset(0).await.expect("applied"), Some(3));

        // A failed operation closed the handle (as after an I/O error), and the file can no
        // longer be opened: readiness and the barrier must hear of it, not read memory.
        let db = model.store.open_now().expect("the file is open");
        model.store.discard(&db);
        drop(db);
        std::fs::write(model.path(), b"not a redb file").expect("overwrite the file");
        assert!(
            model.applied_offset(0).await.is_err(),
            "an applied offset answered from memory while the file cannot be opened"
        );
        assert!(model.get(&Digest::of("foo")).await.is_err());
    }

    /// While the file is being opened again (which walks all of it, holding the handle's
    /// lock), a read must wait where a deadline can end the wait, never on the worker
    /// thread: that would stall every request of the server, `/health/live` included.
    #[tokio::test]
    async fn a_read_during_a_reopen_waits_off_the_worker_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = EmbeddedModel::open(dir.path()).expect("open model");
        let store = model.store.clone();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = released.clone();
        // Stands for a reopen in progress: the handle's lock, held until told (or 20 s).
        let holder = std::thread::spawn(move || {
            let _reopening = store.db.0.write().expect("lock");
            held_tx.send(()).expect("held");
            let _ = release_rx.recv_timeout(Duration::from_secs(20));
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        held_rx.recv().expect("the lock is held");

        let digest = Digest::of("x");
        let get = tokio::time::timeout(Duration::from_millis(100), model.get(&digest)).await;
        let offset =
            tokio::time::timeout(Duration::from_millis(100), model.applied_offset(0)).await;
        let released_meanwhile = released.load(std::sync::atomic::Ordering::SeqCst);
        let _ = release_tx.send(());
        holder.join().expect("holder");
        assert!(
            !released_meanwhile && get.is_err() && offset.is_err(),
            "the reads blocked their thread until the reopen ended: get {get:?}, offset {offset:?}"
        );
    }
}
