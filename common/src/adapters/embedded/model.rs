//! [`EmbeddedModel`]: the read model of one generation in its own redb file, rows and
//! applied offsets written in one transaction. A failed operation (a commit on a full
//! disk) closes the handle and the next one opens the file again, so the projector's
//! retries go through once the disk takes writes again, without a restart.
//!
//! # Durability
//!
//! The read model is a projection of the log, whose appends are each durable before their
//! 201. So `apply` commits small batches with [`Durability::None`] (visible to readers at
//! once; redb writes the pages later) and makes its commits durable only when
//! [`DURABLE_EVERY`] has passed since the last durable one, when [`DURABLE_BYTES`] of rows
//! are pending, for a batch of [`DURABLE_BATCH_ROWS`] rows or more, and at
//! [`ReadModel::sync`], which the projector calls whenever a poll finds nothing for
//! 200 ms and when it (or a replay) stops. The leaves that many small batches of random
//! digests dirty are then written and fsynced once instead of once per batch
//! (docs/performance.md, item 18).
//!
//! - A crash (kill -9, power) takes back what was applied since the last durable commit
//!   (at most a second of a busy projector's work); rows and applied offsets go back
//!   together. The projector then applies those records again: its `Continuity` guard
//!   compares each partition's first record with the model's applied offset and rewinds
//!   the group to it (the same guard that catches up a lost Cassandra keyspace, whose
//!   commit log is itself synced only every 10 s by default).
//! - Closing the file (a clean shutdown) makes the pending commits durable.
//! - A failure that closes the handle (an I/O error, in `apply` or in a read) may lose
//!   them in a live process, since redb does not write them at a close after an I/O
//!   error. So the model keeps the rows and offsets of its commits since the last durable
//!   one in memory, and the reopen writes them again, durably, before anyone reads from
//!   the new handle: a reader never sees an applied offset whose row is missing.

use super::*;

/// At most this long between two durable commits of `apply` (see the module doc).
pub const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// At most this many bytes of rows (messages, plus [`ROW_OVERHEAD`] each) applied between
/// two durable commits: what the model keeps in memory to write again after a failure is
/// bounded.
pub const DURABLE_BYTES: usize = 4 * 1024 * 1024;
/// What a kept row costs in memory besides its message (digest, `String`, allocation).
const ROW_OVERHEAD: usize = 80;
/// A batch of at least this many rows commits durably: it dirties most leaves anyway and
/// its fsync is shared by all its rows (a replay's or a catching-up projector's batches;
/// live POSTs come in batches of tens to hundreds). Measured: non-durable commits of
/// 65,536-row batches made a 1M-event replay slower and held more memory.
pub const DURABLE_BATCH_ROWS: usize = 4096;

/// The embedded read model. Cloning is cheap (a few `Arc`s).
#[derive(Clone)]
pub struct EmbeddedModel {
    store: Arc<Reopenable>,
    generation: Generation,
    /// The applied offsets as of the last commit that returned, per partition: the
    /// read-your-writes barrier asks for them on every miss, so they are answered from
    /// memory while the file is open (after a failure closed it, from the file, which
    /// opens it again or fails). Read from the file at open, raised after each successful
    /// commit (never lowered), so they are never ahead of what readers see: a commit that
    /// failed after reaching the disk only leaves them behind it until the projector's
    /// retry commits again, and commits that a failure took back are written again by the
    /// reopen before a reader gets the new handle.
    applied: Arc<std::sync::RwLock<HashMap<u32, Offset>>>,
    /// What `apply` committed since its last durable commit.
    pending: Arc<std::sync::Mutex<Pending>>,
}

/// The rows and offsets committed with [`Durability::None`] since the last durable commit:
/// written again, durably, when the handle is opened again after a failure.
struct Pending {
    since: std::time::Instant,
    /// [`DURABLE_EVERY`], shorter or longer in tests.
    every: Duration,
    rows: Vec<(Digest, String)>,
    bytes: usize,
    applied: Vec<(u32, Offset)>,
}

impl Pending {
    fn new(every: Duration) -> Pending {
        Pending {
            since: std::time::Instant::now(),
            every,
            rows: Vec::new(),
            bytes: 0,
            applied: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.applied.is_empty()
    }

    /// After a durable commit: nothing pending.
    fn clear(&mut self) {
        *self = Pending::new(self.every);
    }
}

/// Writes `rows` and raises the applied offsets to `applied` in `txn`: both or neither.
fn write_rows(
    txn: &WriteTransaction,
    rows: &[(Digest, String)],
    applied: &[(u32, Offset)],
) -> Result<(), redb::Error> {
    let mut messages = txn.open_table(MESSAGES)?;
    for (digest, message) in rows {
        messages.insert(digest.as_bytes(), message.as_str())?;
    }
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

/// Writes `pending` again on `db`, a handle just opened again that may lack it, in one
/// durable transaction.
fn write_again(db: &Database, pending: &mut Pending) -> Result<(), redb::Error> {
    if pending.is_empty() {
        return Ok(());
    }
    let txn = begin_durable(db)?;
    write_rows(&txn, &pending.rows, &pending.applied)?;
    txn.commit()?;
    pending.clear();
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
        let txn = begin_durable(&db).map_err(storage)?;
        {
            let mut meta = txn.open_table(MODEL_META).map_err(|e| storage(e.into()))?;
            check_layout(&mut meta, &file)?;
            txn.open_table(MESSAGES).map_err(|e| storage(e.into()))?;
            txn.open_table(PROJECTION_OFFSETS)
                .map_err(|e| storage(e.into()))?;
        }
        txn.commit().map_err(|e| storage(e.into()))?;
        let applied = stored_applied(&db).map_err(storage)?;
        let pending = Arc::new(std::sync::Mutex::new(Pending::new(DURABLE_EVERY)));
        let kept = pending.clone();
        // Runs on a handle opened again after a failure, before anyone else uses it.
        let rewrite = move |db: &Database| {
            let mut kept = kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            write_again(db, &mut kept)
        };
        Ok(EmbeddedModel {
            store: Arc::new(
                Reopenable::new(file, MODEL_CACHE_BYTES, db).on_reopen(Box::new(rewrite)),
            ),
            generation,
            applied: Arc::new(std::sync::RwLock::new(applied)),
            pending,
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

    /// The database file.
    pub fn path(&self) -> &Path {
        self.store.file()
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
        let applied = batch.applied.clone();
        let mut batch = batch.clone();
        // In key order, each insert descends next to the previous one: the pages it
        // reads and dirties are the ones just used (docs/performance.md).
        batch
            .messages
            .sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let pending = self.pending.clone();
        self.blocking(move |db| {
            let mut pending = pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let bytes: usize = batch
                .messages
                .iter()
                .map(|(_, m)| m.len() + ROW_OVERHEAD)
                .sum();
            let durable = batch.messages.len() >= DURABLE_BATCH_ROWS
                || pending.since.elapsed() >= pending.every
                || pending.bytes + bytes >= DURABLE_BYTES;
            let mut txn = db.begin_write().map_err(model_unavailable)?;
            let durability = if durable {
                Durability::Immediate
            } else {
                Durability::None
            };
            txn.set_durability(durability).map_err(model_unavailable)?;
            write_rows(&txn, &batch.messages, &batch.applied).map_err(model_unavailable)?;
            txn.commit().map_err(model_unavailable)?;
            if durable {
                pending.clear();
            } else {
                pending.bytes += bytes;
                pending.applied.extend_from_slice(&batch.applied);
                pending.rows.append(&mut batch.messages);
            }
            Ok(())
        })
        .await?;
        self.remember_applied(&applied);
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
        // Closed by a failure: the reopen writes what is pending again, durably (the
        // `on_reopen` hook); reopening from here would walk the file at every idle poll
        // while the disk still fails.
        let Some(db) = self.store.open_now() else {
            return Ok(());
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut pending = pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if pending.is_empty() {
                return Ok(());
            }
            // On this handle the rows are there: an empty durable commit makes every
            // commit before it durable.
            let synced = begin_durable(&db).and_then(|txn| Ok(txn.commit()?));
            match synced {
                Ok(()) => {
                    pending.clear();
                    Ok(())
                }
                Err(e) => {
                    drop(pending);
                    store.discard(&db);
                    Err(model_unavailable(e))
                }
            }
        })
        .await
        .map_err(|e| ModelError::unavailable("embedded read model task", e))?
    }

    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        let digest = *digest;
        self.point_read(move |db| {
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

    /// What a kill -9 would leave of the model's file right now (its bytes: the page
    /// cache; the durable commits' header points only at pages they wrote), opened as a
    /// model of its own.
    fn crash_image(model: &EmbeddedModel) -> (tempfile::TempDir, EmbeddedModel) {
        let image = tempfile::tempdir().expect("tempdir");
        std::fs::copy(model.path(), image.path().join(MODEL_FILE)).expect("copy the file");
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

    /// A failure closed the handle, and the commits since the last durable one did not
    /// survive it (redb does not write them at a close after an I/O error): the reopen
    /// writes them again before anyone reads, so no reader sees an applied offset whose
    /// row is missing, and they are durable from then on.
    #[tokio::test]
    async fn commits_lost_with_a_failed_handle_are_written_again_by_the_reopen() {
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
            let _reopening = store.db.write().expect("lock");
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
