//! [`EmbeddedLog`]: appends and commits go to the [writer](super::writer) thread; reads
//! (end offsets, subscriptions, dead-letter counts) run on blocking tasks against committed
//! state only.

use super::writer::{Request, Writer};
use super::*;
use std::num::NonZeroU32;

/// The embedded event log. Cloning is cheap (one `Arc`); the database closes when the last
/// clone and the last subscription are gone.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<LogInner>,
}

struct LogInner {
    db: Arc<Database>,
    file: PathBuf,
    partitions: NonZeroU32,
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

impl EmbeddedLog {
    /// Opens (or creates) `dir/events.redb` with `partitions` partitions. The count is
    /// recorded on first open; any later open must ask for the same count. Blocking.
    pub fn open(dir: &Path, count: NonZeroU32) -> Result<EmbeddedLog, EmbeddedError> {
        let partitions = count.get();
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
                partitions: count,
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
        if partition < self.inner.partitions.get() {
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

#[async_trait]
impl EventLog for EmbeddedLog {
    fn partitions(&self) -> NonZeroU32 {
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
            let mut next = vec![0; inner.partitions.get() as usize];
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
            if partition >= self.inner.partitions.get() {
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
