//! [`Rows`]: the rows of one read-model generation (digest → message), in a fjall database
//! (an LSM tree) in a directory beside the model's redb file, which keeps the applied
//! offsets. Why not in the redb file: each durable commit of random digests rewrote a
//! B-tree leaf per row, about three times the CPU of fjall's sorted flushes on a model of
//! a million rows (docs/performance.md, items 25-26).
//!
//! The model writes its rows here and persists them (`fsync`) before the durable commit
//! that raises its applied offsets in the redb file: after a crash between the two, the
//! rows are there without their offsets, and the projector applies them again (the same
//! message for the same digest), but never an offset without its row.
//!
//! After a failed write or read, the handle is closed and the next use opens the
//! directory again, which recovers it from its journal at the last persist.

use super::*;

/// fjall's block cache: the point reads of digests that are not in the model's memory.
const ROWS_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// One memtable, flushed to a sorted table when full: what a flush writes at once, and
/// what the rows hold in memory besides the cache.
const ROWS_MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;
/// Rows per fjall write batch: a durable commit of tens of thousands of rows is written
/// in pieces, so that the batch's own copy of them stays small.
const ROWS_PER_BATCH: usize = 8192;

/// The directory of read-model generation `generation`'s rows: `readmodel.rows` for
/// generation 0, `readmodel-g<N>.rows` after that.
pub fn rows_dir(generation: Generation) -> String {
    if generation == 0 {
        "readmodel.rows".to_owned()
    } else {
        format!("readmodel-g{generation}.rows")
    }
}

/// The rows of one model generation, opened again after a failure.
pub(super) struct Rows {
    dir: PathBuf,
    open: Slot<Handle>,
}

struct Handle {
    db: fjall::Database,
    messages: fjall::Keyspace,
}

impl Handle {
    fn open(dir: &Path) -> Result<Handle, fjall::Error> {
        let db = fjall::Database::builder(dir)
            // Persisted by the model's durable commit (`Rows::write`), not per batch.
            .manual_journal_persist(true)
            .cache_size(ROWS_CACHE_BYTES)
            .open()?;
        let messages = db.keyspace("messages", || {
            fjall::KeyspaceCreateOptions::default()
                .max_memtable_size(ROWS_MEMTABLE_BYTES)
                // Every filter and index block in memory: without them a point read
                // loads them again, 50-60 us instead of 5-7 (docs/performance.md, item 25).
                .filter_block_pinning_policy(fjall::config::PinningPolicy::all(true))
                .index_block_pinning_policy(fjall::config::PinningPolicy::all(true))
        })?;
        Ok(Handle { db, messages })
    }
}

fn unavailable(dir: &Path, e: fjall::Error) -> ModelError {
    ModelError::unavailable(
        "embedded read model rows",
        std::io::Error::other(format!("{}: {e}", dir.display())),
    )
}

/// A fjall error as the redb error the model's commit path carries.
pub(super) fn as_redb(dir: &Path, e: fjall::Error) -> redb::Error {
    redb::Error::Io(std::io::Error::other(format!("{}: {e}", dir.display())))
}

impl Rows {
    /// Opens (or creates) the rows in `dir`. Blocking.
    pub(super) fn open(dir: PathBuf) -> Result<Rows, EmbeddedError> {
        let created = !dir.exists();
        let handle = Handle::open(&dir).map_err(|e| match e {
            fjall::Error::Locked => EmbeddedError::InUse {
                dir: dir.parent().map(Path::to_path_buf).unwrap_or_default(),
                file: dir.clone(),
            },
            other => EmbeddedError::storage(&dir, as_redb(&dir, other)),
        })?;
        if created {
            if let Some(parent) = dir.parent() {
                sync_dir(parent);
            }
        }
        Ok(Rows {
            dir,
            open: Slot::new(handle),
        })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open handle, opening the directory again first if a failure closed it. Never
    /// creates it: the rows of a dropped generation stay gone.
    fn handle(&self) -> Result<Arc<Handle>, fjall::Error> {
        let (handle, reopened) = self.open.get_or_open(|| {
            if !self.dir.is_dir() {
                return Err(fjall::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the rows' directory is gone",
                )));
            }
            Handle::open(&self.dir)
        })?;
        if reopened {
            tracing::info!(dir = %self.dir.display(), "rows reopened after a storage failure");
        }
        Ok(handle)
    }

    /// Runs `f` on the open handle, closing it if `f` fails.
    fn with<T>(
        &self,
        f: impl FnOnce(&Handle) -> Result<T, fjall::Error>,
    ) -> Result<T, fjall::Error> {
        let handle = self.handle()?;
        let result = f(&handle);
        if result.is_err() {
            self.open.discard(&handle);
        }
        result
    }

    /// Writes `rows` and persists them (`fsync`): durable when this returns. Blocking.
    pub(super) fn write<'a>(
        &self,
        rows: impl IntoIterator<Item = (&'a Digest, &'a String)>,
    ) -> Result<(), redb::Error> {
        self.with(|h| {
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                let mut batch = h.db.batch();
                for (digest, message) in rows.by_ref().take(ROWS_PER_BATCH) {
                    batch.insert(
                        &h.messages,
                        digest.as_bytes().as_slice(),
                        message.as_bytes(),
                    );
                }
                batch.commit()?;
            }
            h.db.persist(fjall::PersistMode::SyncAll)
        })
        .map_err(|e| as_redb(&self.dir, e))
    }

    /// The message of `digest`, if written.
    pub(super) fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        let value = self
            .with(|h| h.messages.get(digest.as_bytes()))
            .map_err(|e| unavailable(&self.dir, e))?;
        value
            .map(|v| {
                String::from_utf8(v.to_vec()).map_err(|_| {
                    ModelError::Corrupt(format!("the row of {digest} is not UTF-8 text"))
                })
            })
            .transpose()
    }

    /// Up to `limit` digests after `after`, in order. Blocking.
    pub(super) fn list(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<Digest>, ModelError> {
        let start = after.map_or(Bound::Unbounded, |d| Bound::Excluded(d.as_bytes().to_vec()));
        self.with(|h| {
            let mut digests = Vec::with_capacity(limit.min(1024));
            for entry in h
                .messages
                .range::<Vec<u8>, _>((start, Bound::Unbounded))
                .take(limit)
            {
                digests.push(entry.key()?);
            }
            Ok(digests)
        })
        .map_err(|e| unavailable(&self.dir, e))?
        .into_iter()
        .map(|key| {
            Digest::from_bytes(&key)
                .ok_or_else(|| ModelError::Corrupt("a stored digest is not 32 bytes".into()))
        })
        .collect()
    }
}
