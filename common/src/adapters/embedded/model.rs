//! [`EmbeddedModel`]: the read model of one generation in its own redb file, rows and
//! applied offsets written in one durable transaction. A failed operation (a commit on a
//! full disk) closes the handle and the next one opens the file again, so the projector's
//! retries go through once the disk takes writes again, without a restart.

use super::*;

/// The embedded read model. Cloning is cheap (two `Arc`s).
#[derive(Clone)]
pub struct EmbeddedModel {
    store: Arc<Reopenable>,
    generation: Generation,
    /// The applied offsets as of the last commit that returned, per partition: the
    /// read-your-writes barrier asks for them on every miss, so they are answered from
    /// memory while the file is open (after a failure closed it, from the file, which
    /// opens it again or fails). Read from the file at open, raised after each successful commit (never
    /// lowered), so they are never ahead of the file: a commit that failed after reaching
    /// the disk only leaves them behind it until the projector's retry commits again.
    applied: Arc<std::sync::RwLock<HashMap<u32, Offset>>>,
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
        Ok(EmbeddedModel {
            store: Arc::new(Reopenable::new(file, MODEL_CACHE_BYTES, db)),
            generation,
            applied: Arc::new(std::sync::RwLock::new(applied)),
        })
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
        .await?;
        self.remember_applied(&applied);
        Ok(())
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
