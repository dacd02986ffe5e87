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
    store: Arc<Reopenable>,
    partitions: NonZeroU32,
    /// Most appends waiting for the writer; past it an append is shed at once.
    bound: usize,
    /// Appends sent to the writer and not yet taken off the queue.
    queued: Arc<AtomicUsize>,
    /// False from a failed commit until the writer commits again.
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
    /// Opens (or creates) `dir/events.redb` with `partitions` partitions. The count is
    /// recorded on first open; any later open must ask for the same count. At most
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
        let (db, file) = open_database(dir, LOG_FILE, LOG_CACHE_BYTES)?;
        let storage = |e: redb::Error| EmbeddedError::storage(&file, e);

        let txn = begin_durable(&db).map_err(storage)?;
        let ends = {
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
            stored_ends(&records, partitions).map_err(|e| storage(e.into()))?
        };
        txn.commit().map_err(|e| storage(e.into()))?;

        let store = Arc::new(Reopenable::new(file, LOG_CACHE_BYTES, db));
        let (ends_tx, ends_rx) = watch::channel(ends.clone());
        let (requests, queue) = mpsc::channel();
        let transactions = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let writable = Arc::new(AtomicBool::new(true));
        #[cfg_attr(not(test), allow(unused_mut))]
        let mut writer = Writer {
            store: store.clone(),
            partitions,
            next: ends,
            queue,
            ends: ends_tx,
            transactions: transactions.clone(),
            queued: queued.clone(),
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
                partitions: count,
                bound: write_queue.max(1),
                queued,
                writable,
                requests: Some(requests),
                writer: Some(writer),
                ends: ends_rx,
                transactions,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.inner.store.file()
    }

    /// Whether the log can write: false from a failed commit (disk full, I/O error) until
    /// the writer commits again, which it probes for with backoff.
    pub fn writable(&self) -> bool {
        self.inner.writable.load(Ordering::Acquire)
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
    /// Sends an append unless the log cannot take it now: it cannot write, or
    /// [`bound`](LogInner::bound) appends are already waiting. Either way the caller is
    /// turned away at once ([`LogError::Shed`]), so an overload never queues without end.
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
        self.send(request).inspect_err(|_| {
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
        let (reply, answer) = oneshot::channel();
        self.inner.send_append(Request::Append {
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
            let db = inner.store.get().map_err(storage_unavailable)?;
            let txn = db.begin_read().map_err(storage_unavailable)?;
            let table = txn.open_table(RECORDS).map_err(storage_unavailable)?;
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
                let last = first + quota as u64 - 1;
                let mut read = 0u64;
                for entry in table
                    .range((p, first)..=(p, last))
                    .map_err(storage_unavailable)?
                {
                    if bytes >= MAX_READ_BYTES {
                        break;
                    }
                    let (key, value) = entry.map_err(storage_unavailable)?;
                    let (_, offset) = key.value();
                    // Committed offsets are contiguous from 0: anything else is a damaged
                    // file, never a record to skip.
                    if offset != first + read {
                        return Err(LogError::Unavailable(format!(
                            "embedded event log: partition {p} is missing offset {} (found {offset})",
                            first + read
                        )));
                    }
                    let (k, v) = value.value();
                    bytes += k.len() + v.len();
                    batch.push(LogRecord {
                        partition: p,
                        offset: to_offset(offset)?,
                        key: Some(k.to_vec()),
                        value: Some(v.to_vec()),
                    });
                    read += 1;
                }
                counts[i] = usize::try_from(read).unwrap_or(usize::MAX);
                // Fewer records than asked for (short of the byte bound) means the end of
                // the partition is missing: a damaged file too.
                if counts[i] != quota && bytes < MAX_READ_BYTES {
                    return Err(LogError::Unavailable(format!(
                        "embedded event log: partition {p} is missing records in {}..={last}",
                        first + read
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
