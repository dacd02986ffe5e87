//! [`EmbeddedLog`]: appends and commits go to the [writer](super::writer) thread; reads
//! (end offsets, subscriptions, dead-letter counts) run on blocking tasks against committed
//! state only.

use super::segment::{self, Opening};
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
    store: Arc<Reopenable>,
    segment: Arc<Segment>,
    partitions: NonZeroU32,
    /// Most appends waiting for the writer; past it an append is shed at once.
    bound: usize,
    /// Appends sent to the writer and not yet taken off the queue.
    queued: Arc<AtomicUsize>,
    /// Their bytes ([`Request::size`]: keys, values and their fields); past
    /// [`WRITE_QUEUE_BYTES`] an append is shed at once unless nothing waits.
    queued_bytes: Arc<AtomicUsize>,
    /// False from a failed append or commit until a probe of the writer works.
    writable: Arc<AtomicBool>,
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
                tracing::error!(file = %self.store.file().display(), "event log writer thread panicked");
            }
        }
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir` (`events.log` and `events.redb`) with
    /// `partitions` partitions. The count is recorded on first open; any later open must
    /// ask for the same count. A log of the earlier layout (records in `events.redb`) has
    /// its records moved to `events.log` first. At most
    /// [`DEFAULT_WRITE_QUEUE`] appends wait for the writer. Blocking.
    pub fn open(dir: &Path, count: NonZeroU32) -> Result<EmbeddedLog, EmbeddedError> {
        EmbeddedLog::open_with_queue(dir, count, DEFAULT_WRITE_QUEUE)
    }

    /// [`open`](EmbeddedLog::open) with at most `write_queue` appends waiting for the
    /// writer (at least 1): one more is shed at once with [`LogError::Shed`].
    pub fn open_with_queue(
        dir: &Path,
        count: NonZeroU32,
        write_queue: usize,
    ) -> Result<EmbeddedLog, EmbeddedError> {
        EmbeddedLog::start(dir, count, write_queue, |_| {})
    }

    fn start(
        dir: &Path,
        count: NonZeroU32,
        write_queue: usize,
        #[cfg_attr(not(test), allow(unused_variables))] setup: impl FnOnce(&mut Writer),
    ) -> Result<EmbeddedLog, EmbeddedError> {
        let partitions = count.get();
        let (mut db, file) = open_database(dir, LOG_FILE, LOG_CACHE_BYTES)?;
        let storage = |e: redb::Error| EmbeddedError::storage(&file, e);

        let txn = begin_durable(&db).map_err(storage)?;
        let (layout, stored, synced) = {
            let meta = txn.open_table(LOG_META).map_err(|e| storage(e.into()))?;
            let get = |key| -> Result<Option<u64>, EmbeddedError> {
                Ok(meta
                    .get(key)
                    .map_err(|e| storage(e.into()))?
                    .map(|v| v.value()))
            };
            (
                get(META_LAYOUT)?,
                get(META_PARTITIONS)?,
                get(META_SYNCED_END)?,
            )
        };
        if let Some(found) = layout.filter(|&v| v != LOG_LAYOUT_VERSION && v != LEGACY_LOG_LAYOUT) {
            return Err(EmbeddedError::UnsupportedLayout {
                file,
                found,
                expected: LOG_LAYOUT_VERSION,
            });
        }
        if let Some(stored) = stored.filter(|&stored| stored != u64::from(partitions)) {
            return Err(EmbeddedError::PartitionMismatch {
                dir: dir.to_path_buf(),
                stored,
                requested: partitions,
            });
        }
        let migrated = match layout {
            Some(LEGACY_LOG_LAYOUT) => Some(migrate(&txn, dir, &file)?),
            _ => None,
        };
        // A log without a layout is new: its records file may not exist yet (and must not
        // hold records). Once the layout is committed, the file must be there.
        let opening = match (layout, migrated) {
            (None, _) => Opening::New,
            (_, Some(_)) => Opening::Moved,
            _ => Opening::Existing,
        };
        // A moved log opens only if every record copied continues its partition's offsets
        // (nothing may be cut from it): then, and only then, the old table goes.
        let (segment, ends) = Segment::open(dir, partitions, opening, synced.unwrap_or(0))?;
        let end = segment.durable_end().map_err(|e| EmbeddedError::Storage {
            file: segment.path().to_path_buf(),
            detail: e.to_string(),
        })?;
        if migrated.is_some() {
            txn.delete_table(RECORDS).map_err(|e| storage(e.into()))?;
        }
        if layout.is_none() {
            sync_dir(dir);
        }
        {
            let mut meta = txn.open_table(LOG_META).map_err(|e| storage(e.into()))?;
            meta.insert(META_LAYOUT, LOG_LAYOUT_VERSION)
                .map_err(|e| storage(e.into()))?;
            meta.insert(META_PARTITIONS, u64::from(partitions))
                .map_err(|e| storage(e.into()))?;
            meta.insert(META_SYNCED_END, end)
                .map_err(|e| storage(e.into()))?;
        }
        txn.open_table(GROUP_POSITIONS)
            .map_err(|e| storage(e.into()))?;
        txn.open_table(DEAD_LETTERS)
            .map_err(|e| storage(e.into()))?;
        txn.commit().map_err(|e| storage(e.into()))?;
        if let Some(moved) = migrated {
            // The records' pages are free now; give them back to the file system. The move
            // is committed either way: a failure here only leaves the file larger.
            if let Err(e) = db.compact() {
                tracing::warn!(file = %file.display(), error = %e, "could not compact after moving the records");
            }
            tracing::info!(
                records = moved, from = %file.display(), to = %segment.path().display(),
                "moved the event log's records to their own file (layout 1 to 2)"
            );
        }
        let segment = Arc::new(segment);

        let store = Arc::new(Reopenable::new(file, LOG_CACHE_BYTES, db));
        let (ends_tx, ends_rx) = watch::channel(ends.clone());
        let (requests, queue) = mpsc::channel();
        let transactions = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writable = Arc::new(AtomicBool::new(true));
        #[cfg_attr(not(test), allow(unused_mut))]
        let mut writer = Writer {
            store: store.clone(),
            segment: segment.clone(),
            end,
            marked: end,
            frames: Vec::new(),
            next: ends,
            queue,
            ends: ends_tx,
            transactions: transactions.clone(),
            queued: queued.clone(),
            queued_bytes: queued_bytes.clone(),
            writable: writable.clone(),
            #[cfg(test)]
            gate: None,
        };
        #[cfg(test)]
        setup(&mut writer);
        let writer = std::thread::Builder::new()
            .name("msghash-log-writer".into())
            .spawn(move || writer.run())
            .map_err(EmbeddedError::Thread)?;
        // Present (at 0) from the start, so rate() and alerts see the series before a shed.
        metrics::counter!(crate::metrics::names::WRITE_SHED_TOTAL).increment(0);
        Ok(EmbeddedLog {
            inner: Arc::new(LogInner {
                store,
                segment,
                partitions: count,
                bound: write_queue.max(1),
                queued,
                queued_bytes,
                writable,
                requests: Some(requests),
                writer: Some(writer),
                ends: ends_rx,
                transactions,
            }),
        })
    }

    /// The database file (group positions, dead letters; the records are in
    /// [`records_path`](EmbeddedLog::records_path)).
    pub fn path(&self) -> &Path {
        self.inner.store.file()
    }

    /// The records file, `events.log`.
    pub fn records_path(&self) -> &Path {
        self.inner.segment.path()
    }

    /// Whether the log can write: false from a failed append or commit (disk full, I/O
    /// error) until the writer can write again, which it probes for with backoff.
    pub fn writable(&self) -> bool {
        self.inner.writable.load(Ordering::Acquire)
    }

    /// How many groups the writer wrote since open (each one write and one `fdatasync` of
    /// `events.log`, plus a transaction of `events.redb` if it held position commits or
    /// dead letters): with group commit, usually far fewer than the appends.
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
    /// Sends an append unless the log cannot take it now: it cannot write,
    /// [`bound`](LogInner::bound) appends are already waiting, or it would take the bytes
    /// waiting past [`WRITE_QUEUE_BYTES`] (one append alone always goes). Either way the
    /// caller is turned away at once ([`LogError::Shed`]), so an overload never queues
    /// without end, in count or in memory.
    fn send_append(&self, request: Request) -> Result<(), LogError> {
        if !self.writable.load(Ordering::Acquire) {
            return Err(LogError::Shed(
                "embedded event log cannot write until its storage recovers".into(),
            ));
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.bound {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(crate::metrics::names::WRITE_SHED_TOTAL).increment(1);
            return Err(LogError::Shed(format!(
                "embedded event log write queue is full ({} appends waiting)",
                self.bound
            )));
        }
        let size = request.size();
        let before = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > WRITE_QUEUE_BYTES {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.queued.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(crate::metrics::names::WRITE_SHED_TOTAL).increment(1);
            return Err(LogError::Shed(format!(
                "embedded event log write queue is full ({} MiB of appends waiting)",
                WRITE_QUEUE_BYTES >> 20
            )));
        }
        self.send(request).inspect_err(|_| {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.queued.fetch_sub(1, Ordering::AcqRel);
        })
    }

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
        let (key, value) = (event.key().to_vec(), event.encode());
        if !segment::fits(&key, &value) {
            return Err(LogError::TooLarge(format!(
                "an event of {} bytes is larger than the embedded event log takes ({} bytes)",
                key.len() + value.len(),
                segment::MAX_FRAME
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.inner.send_append(Request::Append {
            partition,
            key,
            value,
            reply,
        })?;
        let offset = answer.await.map_err(|_| {
            LogError::Unavailable("embedded event log writer stopped before answering".into())
        })??;
        to_offset(offset)
    }

    /// Ready while the log can write (see [`EmbeddedLog::writable`]).
    async fn ready(&self) -> Result<(), LogError> {
        if self.writable() {
            Ok(())
        } else {
            Err(LogError::Unavailable(
                "embedded event log cannot write until its storage recovers".into(),
            ))
        }
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
            inner.store.with(storage_unavailable, |db| {
                let txn = db.begin_read().map_err(storage_unavailable)?;
                let table = txn.open_table(DEAD_LETTERS).map_err(storage_unavailable)?;
                table.len().map_err(storage_unavailable)
            })
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
            let db = inner.store.get().map_err(storage_unavailable)?;
            let txn = db.begin_read().map_err(storage_unavailable)?;
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
    /// Reads up to `quotas[p]` records of each partition `p` from its next position,
    /// partitions in turn from `start` (as the quotas were shared), but stops (after at
    /// least one record) once the records hold [`MAX_READ_BYTES`], so a batch of large
    /// messages stays bounded in memory and the partition read first changes from call to
    /// call. Returns the records and how many of each partition were read.
    async fn read(
        &self,
        quotas: Vec<usize>,
        start: usize,
    ) -> Result<(Vec<LogRecord>, Vec<usize>), LogError> {
        let inner = self.inner.clone();
        let from = self.next.clone();
        tokio::task::spawn_blocking(move || {
            let n = quotas.len();
            let mut batch = Vec::with_capacity(quotas.iter().sum::<usize>().min(64 * 1024));
            let mut counts = vec![0; n];
            let mut bytes = 0usize;
            for i in (0..n).map(|i| (start + i) % n) {
                let (first, quota) = (from[i], quotas[i]);
                if quota == 0 || bytes >= MAX_READ_BYTES {
                    continue;
                }
                let p = u32::try_from(i).map_err(|_| {
                    LogError::Unavailable(format!("embedded event log: partition {i} overflows"))
                })?;
                // Each read returns at least one record, so the batch has one even if that
                // one alone is past the byte bound.
                let records = inner
                    .segment
                    .read(p, first, quota, MAX_READ_BYTES - bytes)
                    .map_err(|e| LogError::Unavailable(format!("embedded event log: {e}")))?;
                // Published offsets are in the index: fewer records than asked for, short
                // of the byte bound, means a damaged log, never records to skip.
                let read: usize = records.len();
                for record in records {
                    bytes += record.key.len() + record.value.len();
                    batch.push(LogRecord {
                        partition: p,
                        offset: to_offset(record.offset)?,
                        key: Some(record.key),
                        value: Some(record.value),
                    });
                }
                counts[i] = read;
                if read != quota && bytes < MAX_READ_BYTES {
                    return Err(LogError::Unavailable(format!(
                        "embedded event log: partition {p} is missing records in {}..{}",
                        first + read as u64,
                        first + quota as u64
                    )));
                }
            }
            Ok((batch, counts))
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
                let (batch, counts) = self.read(quotas, self.start).await?;
                for (next, count) in self.next.iter_mut().zip(&counts) {
                    *next += *count as u64;
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
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;

    /// A log whose writer waits until the returned sender is dropped (or sends).
    fn paused_log(dir: &Path, write_queue: usize) -> (EmbeddedLog, mpsc::Sender<()>) {
        let (open, gate) = mpsc::channel();
        let count = NonZeroU32::new(1).expect("one");
        let log = EmbeddedLog::start(dir, count, write_queue, |writer| writer.gate = Some(gate))
            .expect("open log");
        (log, open)
    }

    /// Polls `future` once (an append sends its request on the first poll) and drops it,
    /// as a server does with the handler of a client that went away.
    async fn poll_once_and_drop<F: Future>(future: F) {
        let mut future = pin!(future);
        std::future::poll_fn(|cx| {
            assert!(
                future.as_mut().poll(cx).is_pending(),
                "the writer is paused"
            );
            Poll::Ready(())
        })
        .await;
    }

    fn event(i: usize) -> MessageHashed {
        MessageHashed::new(format!("message {i}"))
    }

    #[tokio::test]
    async fn appends_whose_caller_went_away_are_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, open) = paused_log(dir.path(), 100);
        for i in 0..10 {
            poll_once_and_drop(log.append(0, &event(i))).await;
        }
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.append(0, &event(10)).await }
        });
        // The waiting append is queued behind the ten abandoned ones once the queue holds
        // eleven.
        while log.inner.queued.load(Ordering::Acquire) < 11 {
            tokio::task::yield_now().await;
        }
        drop(open);
        let offset = waiting.await.expect("join").expect("appended");
        assert_eq!(offset, 0, "the ten abandoned appends took no offsets");
        assert_eq!(log.end_offset(0).await.expect("end"), 1);
        let mut sub = log.subscribe("g").await.expect("subscribe");
        let records = sub
            .next_batch(100, Duration::from_secs(5))
            .await
            .expect("batch");
        assert_eq!(records.len(), 1);
        let stored = MessageHashed::decode(records[0].key.as_deref(), records[0].value.as_deref())
            .expect("decodes");
        assert_eq!(stored.message, "message 10");
    }

    #[tokio::test]
    async fn a_full_write_queue_sheds_at_once_and_takes_appends_again_once_drained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, open) = paused_log(dir.path(), 2);
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(0, &event(i)).await })
            })
            .collect();
        while log.inner.queued.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        // The writer is paused: an answer now can only be the shed.
        match log.append(0, &event(2)).await {
            Err(LogError::Shed(_)) => {}
            other => panic!("expected a shed, got {other:?}"),
        }
        drop(open);
        let mut offsets = Vec::new();
        for append in queued {
            offsets.push(append.await.expect("join").expect("appended"));
        }
        offsets.sort_unstable();
        assert_eq!(offsets, vec![0, 1]);
        assert_eq!(log.append(0, &event(3)).await.expect("room again"), 2);
        assert!(log.ready().await.is_ok());
    }

    /// Large appends fill the queue by their bytes long before its count: past
    /// [`WRITE_QUEUE_BYTES`] waiting, the next is shed, so large messages posted faster
    /// than the disk takes them do not pile up in memory. One append larger than the bound
    /// still goes through when nothing waits.
    #[tokio::test]
    async fn a_write_queue_full_of_bytes_sheds_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, open) = paused_log(dir.path(), 4096);
        let quarter = MessageHashed::new("q".repeat(WRITE_QUEUE_BYTES / 4));
        let queued: Vec<_> = (0..3)
            .map(|_| {
                let (log, event) = (log.clone(), quarter.clone());
                tokio::spawn(async move { log.append(0, &event).await })
            })
            .collect();
        while log.inner.queued.load(Ordering::Acquire) < 3 {
            tokio::task::yield_now().await;
        }
        // The writer is paused: an answer now can only be the shed.
        let fourth = tokio::time::timeout(Duration::from_secs(10), log.append(0, &quarter));
        match fourth.await.expect("shed at once, not queued") {
            Err(LogError::Shed(e)) => assert!(e.contains("MiB"), "{e}"),
            other => panic!("expected a shed, got {other:?}"),
        }
        drop(open);
        for append in queued {
            append.await.expect("join").expect("appended");
        }
        let whole = MessageHashed::new("w".repeat(WRITE_QUEUE_BYTES + 1));
        assert_eq!(log.append(0, &whole).await.expect("alone, it fits"), 3);
        assert_eq!(log.append(0, &event(0)).await.expect("room again"), 4);
    }

    fn two_partitions() -> NonZeroU32 {
        NonZeroU32::new(2).expect("two")
    }

    /// A layout-1 log as earlier builds wrote it, records in `events.redb`: `event(i)` at
    /// the i-th (partition, offset), and the given (group, partition, next) positions.
    fn write_first_layout(dir: &Path, at: &[(u32, u64)], positions: &[(&str, u32, u64)]) {
        let (db, _) = open_database(dir, LOG_FILE, LOG_CACHE_BYTES).expect("create");
        let txn = begin_durable(&db).expect("txn");
        {
            let mut meta = txn.open_table(LOG_META).expect("meta");
            meta.insert(META_LAYOUT, LEGACY_LOG_LAYOUT).expect("layout");
            meta.insert(META_PARTITIONS, 2).expect("partitions");
            let mut records = txn.open_table(RECORDS).expect("records");
            for (i, &(p, o)) in at.iter().enumerate() {
                let e = event(i);
                records
                    .insert((p, o), (e.key(), e.encode().as_slice()))
                    .expect("record");
            }
            let mut table = txn.open_table(GROUP_POSITIONS).expect("positions");
            for &(group, p, next) in positions {
                table.insert((group, p), next).expect("position");
            }
        }
        txn.commit().expect("commit");
    }

    /// The storage error that opening the log in `dir` fails with; `opened` says what
    /// went wrong if it opens.
    fn refused(dir: &Path, opened: &str) -> (PathBuf, String) {
        match EmbeddedLog::open(dir, two_partitions()) {
            Err(EmbeddedError::Storage { file, detail }) => (file, detail),
            Err(other) => panic!("expected a storage error, got {other}"),
            Ok(_) => panic!("{opened}"),
        }
    }

    /// Every record of `log`, by partition, decoded back to its message.
    async fn messages(log: &EmbeddedLog) -> Vec<Vec<String>> {
        let mut sub = log.subscribe("check").await.expect("subscribe");
        let ends: Vec<u64> = log.inner.ends.borrow().clone();
        let total: u64 = ends.iter().sum();
        let mut out = vec![Vec::new(); ends.len()];
        let mut seen = 0;
        while seen < total {
            let batch = sub
                .next_batch(1000, Duration::from_secs(5))
                .await
                .expect("batch");
            assert!(!batch.is_empty(), "a committed record could not be read");
            for record in batch {
                let event = MessageHashed::decode(record.key.as_deref(), record.value.as_deref())
                    .expect("decodes");
                let list = &mut out[record.partition as usize];
                assert_eq!(record.offset as usize, list.len(), "offsets in order");
                list.push(event.message);
                seen += 1;
            }
        }
        out
    }

    #[tokio::test]
    async fn an_unfinished_write_at_the_end_is_cut_and_appends_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("open");
        for i in 0..5 {
            log.append((i % 2) as u32, &event(i)).await.expect("append");
        }
        let records = log.records_path().to_path_buf();
        drop(log);
        let good = std::fs::metadata(&records).expect("file").len();
        // What a crash in the middle of the next group's write leaves: one whole frame and
        // the start of another, neither acknowledged.
        let (whole, cut) = (event(100), event(101));
        let mut torn = Vec::new();
        segment::encode(&mut torn, 1, 2, whole.key(), &whole.encode());
        let kept = good + torn.len() as u64;
        segment::encode(&mut torn, 0, 3, cut.key(), &cut.encode());
        torn.truncate(torn.len() - 7);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&records)
            .expect("open records");
        std::io::Write::write_all(&mut file, &torn).expect("write");
        drop(file);

        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("reopen cuts the end");
        // The whole frame is a record (as with Kafka, a write whose caller got no answer may
        // survive); the cut one is gone.
        assert_eq!(std::fs::metadata(&records).expect("file").len(), kept);
        assert_eq!(
            messages(&log).await,
            vec![
                vec![
                    "message 0".to_owned(),
                    "message 2".into(),
                    "message 4".into()
                ],
                vec![
                    "message 1".to_owned(),
                    "message 3".into(),
                    "message 100".into()
                ],
            ]
        );
        assert_eq!(log.append(0, &event(5)).await.expect("append"), 3);
        drop(log);
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("reopen");
        assert_eq!(messages(&log).await[0].len(), 4);
    }

    #[tokio::test]
    async fn a_damaged_record_before_the_durable_end_is_refused_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("open");
        for i in 0..4 {
            log.append(0, &event(i)).await.expect("append");
        }
        // A position commit records how far the file was durable.
        let mut sub = log.subscribe("g").await.expect("subscribe");
        sub.commit(&[(0, 0)]).await.expect("commit");
        drop(sub);
        let records = log.records_path().to_path_buf();
        drop(log);
        let mut bytes = std::fs::read(&records).expect("read");
        let len = bytes.len();
        // A byte of the second record's message.
        bytes[len / 4 + len / 8] ^= 0x55;
        std::fs::write(&records, &bytes).expect("write");

        let (file, detail) = refused(dir.path(), "a damaged log opened");
        assert_eq!(file, records);
        assert!(detail.contains("damaged"), "{detail}");
        assert_eq!(
            std::fs::read(&records).expect("read").len(),
            len,
            "nothing was cut"
        );
    }

    #[tokio::test]
    async fn a_log_of_the_first_layout_has_its_records_moved_to_their_own_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_first_layout(dir.path(), &[(0, 0), (1, 0), (0, 1)], &[("g", 0, 1)]);
        // An earlier move that a crash interrupted left a partial file: it is redone.
        std::fs::write(dir.path().join(SEGMENT_FILE), b"half a move").expect("write");

        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("open moves");
        assert_eq!(
            messages(&log).await,
            vec![
                vec!["message 0".to_owned(), "message 2".into()],
                vec!["message 1".to_owned()],
            ]
        );
        let mut sub = log.subscribe("g").await.expect("subscribe");
        let resumed = sub
            .next_batch(10, Duration::from_secs(5))
            .await
            .expect("batch");
        let at: Vec<(u32, Offset)> = resumed.iter().map(|r| (r.partition, r.offset)).collect();
        assert_eq!(at, vec![(0, 1), (1, 0)], "the group resumes where it was");
        drop(sub);
        assert_eq!(log.append(0, &event(3)).await.expect("append"), 2);
        drop(log);

        let (db, _) = open_database(dir.path(), LOG_FILE, LOG_CACHE_BYTES).expect("open");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(LOG_META).expect("meta");
        assert_eq!(
            meta.get(META_LAYOUT).expect("get").map(|v| v.value()),
            Some(LOG_LAYOUT_VERSION)
        );
        assert!(
            txn.open_table(RECORDS).is_err(),
            "the old records table is gone"
        );
        drop((meta, txn, db));
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("reopen");
        assert_eq!(messages(&log).await[0].len(), 3);
    }

    #[tokio::test]
    async fn a_records_file_shorter_than_its_durable_end_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("open");
        for i in 0..3 {
            log.append(0, &event(i)).await.expect("append");
        }
        let records = log.records_path().to_path_buf();
        drop(log);
        // Reopening records the whole file as durable; then the last record goes missing.
        drop(EmbeddedLog::open(dir.path(), two_partitions()).expect("reopen"));
        let mut frame = Vec::new();
        let last = event(2);
        segment::encode(&mut frame, 0, 2, last.key(), &last.encode());
        let len = std::fs::metadata(&records).expect("file").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&records)
            .expect("open");
        file.set_len(len - frame.len() as u64).expect("cut");
        drop(file);
        let (file, detail) = refused(dir.path(), "a log missing acknowledged records opened");
        assert_eq!(file, records);
        assert!(detail.contains("were acknowledged are missing"), "{detail}");
    }

    #[tokio::test]
    async fn a_new_log_does_not_adopt_the_records_of_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("open");
        log.append(1, &event(0)).await.expect("append");
        let db = log.path().to_path_buf();
        drop(log);
        std::fs::remove_file(&db).expect("remove events.redb");
        let (_, detail) = refused(dir.path(), "a new log took over another log's records");
        assert!(detail.contains("records no event log"), "{detail}");
    }

    #[tokio::test]
    async fn an_event_larger_than_a_frame_is_too_large_not_a_storage_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(dir.path(), two_partitions()).expect("open");
        let huge = MessageHashed::new("x".repeat(segment::MAX_FRAME));
        match log.append(0, &huge).await {
            Err(LogError::TooLarge(reason)) => assert!(reason.contains("larger"), "{reason}"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        drop(huge);
        assert_eq!(log.append(0, &event(1)).await.expect("append"), 0);
        assert!(log.ready().await.is_ok());
    }

    #[tokio::test]
    async fn a_first_layout_log_with_a_gap_is_not_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Offset 1 of partition 0 is missing.
        write_first_layout(dir.path(), &[(0, 0), (0, 2)], &[]);
        let (_, detail) = refused(dir.path(), "a log with a gap was moved");
        assert!(
            detail.contains("offset 2 of partition 0 out of sequence"),
            "{detail}"
        );
        let (db, _) = open_database(dir.path(), LOG_FILE, LOG_CACHE_BYTES).expect("open");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(LOG_META).expect("meta");
        assert_eq!(
            meta.get(META_LAYOUT).expect("get").map(|v| v.value()),
            Some(LEGACY_LOG_LAYOUT),
            "still the old layout"
        );
        let records = txn
            .open_table(RECORDS)
            .expect("the records are still there");
        assert_eq!(records.len().expect("len"), 2);
    }

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
