//! [`EmbeddedModel`]: the read model of one generation in its own redb file, rows and
//! applied offsets written in one durable transaction. A failed operation (a commit on a
//! full disk) closes the handle and the next one opens the file again, so the projector's
//! retries go through once the disk takes writes again, without a restart.

use super::*;

/// The embedded read model. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct EmbeddedModel {
    store: Arc<Reopenable>,
    generation: Generation,
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
        Ok(EmbeddedModel {
            store: Arc::new(Reopenable::new(file, MODEL_CACHE_BYTES, db)),
            generation,
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
}

#[async_trait]
impl ReadModel for EmbeddedModel {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError> {
        if batch.is_empty() {
            return Ok(());
        }
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
