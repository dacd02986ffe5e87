//! [`EmbeddedGenerations`]: the catalog of read-model generations (`generations.redb`),
//! beside one model file per generation.

use super::model::model_unavailable;
use super::*;

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
    catalog: Arc<Reopenable>,
    opened: Arc<std::sync::Mutex<std::collections::HashMap<Generation, EmbeddedModel>>>,
    /// How long the models opened from here defer their fsync at most.
    durable_every: Duration,
}

impl EmbeddedGenerations {
    /// Opens (or creates) the catalog in `dir`; a data directory from before generations
    /// has generation 0 active, which is the file it already has. Blocking.
    pub fn open(dir: &Path) -> Result<EmbeddedGenerations, EmbeddedError> {
        let (db, file) = open_database(dir, GENERATIONS_FILE, CATALOG_CACHE_BYTES)?;
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
            catalog: Arc::new(Reopenable::new(file, CATALOG_CACHE_BYTES, db)),
            opened: Arc::default(),
            durable_every: super::model::DURABLE_EVERY,
        })
    }

    /// The models opened from here make their commits durable at least every `every`
    /// (instead of [`DURABLE_EVERY`](super::model::DURABLE_EVERY)), besides the other
    /// occasions (`EmbeddedModel`'s doc). For tests that need the deferral not to end by
    /// itself.
    pub fn durable_every(mut self, every: Duration) -> EmbeddedGenerations {
        self.durable_every = every;
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedGenerations) -> Result<T, ModelError> + Send + 'static,
    ) -> Result<T, ModelError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| ModelError::unavailable("embedded catalog task", e))?
    }

    fn write(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), ModelError> {
        self.catalog.with(model_unavailable, |db| {
            let txn = begin_durable(db).map_err(model_unavailable)?;
            f(&txn).map_err(model_unavailable)?;
            txn.commit().map_err(model_unavailable)
        })
    }

    fn set(&self, name: &'static str, generation: Generation) -> Result<(), ModelError> {
        self.write(|txn| {
            txn.open_table(GENERATION_STATE)?.insert(name, generation)?;
            Ok(())
        })
    }

    fn read_state(&self) -> Result<GenerationState, ModelError> {
        let db = self.catalog.get().map_err(model_unavailable)?;
        let txn = db.begin_read().map_err(model_unavailable)?;
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
                .map_err(|_| ModelError::unavailable_because("embedded catalog lock poisoned"))?;
            if let Some(model) = opened.get(&generation) {
                return Ok(Arc::new(model.clone()) as Arc<dyn ReadModel>);
            }
            this.write(|txn| {
                txn.open_table(GENERATION_FILES)?.insert(generation, ())?;
                Ok(())
            })?;
            let model = EmbeddedModel::open_generation(&this.dir, generation)
                .map_err(|e| ModelError::unavailable("embedded read model", e))?
                .durable_every(this.durable_every);
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
            let db = this.catalog.get().map_err(model_unavailable)?;
            let txn = db.begin_read().map_err(model_unavailable)?;
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
                return Err(ModelError::Refused(format!(
                    "generation {generation} is active; it cannot be dropped"
                )));
            }
            // Dropped after the lock is let go and the file is gone: the last handle's drop
            // writes the rows it kept in memory (to the unlinked file), which must not hold
            // up `open` of another generation.
            let _removed = this
                .opened
                .lock()
                .ok()
                .and_then(|mut opened| opened.remove(&generation));
            // A handle still open elsewhere keeps reading the unlinked files until it
            // closes. The file first: without it the rows are never opened again.
            let file = this.dir.join(model_file(generation));
            let rows = this.dir.join(rows_dir(generation));
            let mut removed = false;
            for (path, result) in [
                (&file, std::fs::remove_file(&file)),
                (&rows, std::fs::remove_dir_all(&rows)),
            ] {
                match result {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(ModelError::unavailable(
                            format!("cannot delete {}", path.display()),
                            e,
                        ))
                    }
                }
            }
            if removed {
                sync_dir(&this.dir);
            }
            this.write(|txn| {
                txn.open_table(GENERATION_FILES)?.remove(generation)?;
                Ok(())
            })
        })
        .await
    }
}
