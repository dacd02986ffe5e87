//! The single writer of the event log (`events.log` and `events.redb`) and its group
//! commit: it takes the first request, everything already queued behind it (up to
//! [`MAX_GROUP_REQUESTS`] requests or [`MAX_GROUP_BYTES`] bytes), appends the group's
//! records to `events.log` in one write and one `fdatasync`, then writes the group's
//! position commits and dead letters (if any) in one redb transaction, publishes the new
//! end offsets, and only then answers every waiter.
//!
//! An append whose caller stopped waiting before the writer took it is skipped. A failed
//! append fails its whole group (nothing of it is acknowledged, and the file is cut back
//! before the next write); a failed transaction fails its commits and dead letters and
//! closes the database handle. Either marks the log not writable: from then on requests are
//! turned away at once, and a probe with backoff waits for the storage to take writes again
//! (see [`Writer::probe`]); once one works, the log is writable again, without a restart.

use super::*;

pub(super) enum Request {
    Append {
        partition: u32,
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
    Commit {
        group: String,
        /// (partition, next offset to read), one entry per partition.
        positions: Vec<(u32, u64)>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    DeadLetter {
        partition: u32,
        offset: u64,
        key: Vec<u8>,
        value: Vec<u8>,
        reason: String,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

impl Request {
    /// What the request holds in memory while it waits, about: the bytes it will write.
    pub(super) fn size(&self) -> usize {
        match self {
            Request::Append { key, value, .. } => key.len() + value.len() + 12,
            Request::Commit {
                group, positions, ..
            } => group.len() + positions.len() * 12,
            Request::DeadLetter {
                key, value, reason, ..
            } => key.len() + value.len() + reason.len() + 20,
        }
    }

    pub(super) fn fail(self, error: LogError) {
        // A waiter that went away does not need the answer.
        match self {
            Request::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Request::Commit { reply, .. } | Request::DeadLetter { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// What one request of a group came to, known once the group's transaction is written.
pub(super) enum Outcome {
    Appended(u64),
    Committed,
    Rejected(String),
    /// The storage failed: worth a retry once it recovers.
    Failed(String),
}

/// The single writer of the event log.
pub(super) struct Writer {
    pub(super) store: Arc<Reopenable>,
    pub(super) segment: Arc<Segment>,
    /// The durable end of `events.log`: where the next group is written.
    pub(super) end: u64,
    /// The durable end `events.redb` last recorded (see [`MARK_EVERY_BYTES`]).
    pub(super) marked: u64,
    /// The frames of the group being written (kept between groups unless large).
    pub(super) frames: Vec<u8>,
    /// Per partition, the next offset, as durably committed.
    pub(super) next: Vec<u64>,
    pub(super) queue: mpsc::Receiver<Request>,
    pub(super) ends: watch::Sender<Vec<u64>>,
    pub(super) transactions: Arc<AtomicU64>,
    /// Appends sent and not yet taken off the queue (the log sheds past its bound).
    pub(super) queued: Arc<AtomicUsize>,
    /// Their [`Request::size`]s (the log sheds past [`WRITE_QUEUE_BYTES`]).
    pub(super) queued_bytes: Arc<AtomicUsize>,
    /// Whether the last write worked: false from a failed append or commit until a probe
    /// works.
    pub(super) writable: Arc<AtomicBool>,
    /// Tests: the writer waits for this before its first request.
    #[cfg(test)]
    pub(super) gate: Option<mpsc::Receiver<()>>,
}

/// The size of the scratch file a probe writes (and removes) before it tries a commit: a
/// disk with less room than this is still full for msghash's purposes.
const PROBE_BYTES: usize = 1024 * 1024;
/// The name of that file, in the data directory.
const PROBE_FILE: &str = ".write-probe";

/// The backoff between probes of a writer that cannot write.
fn probe_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(usize::MAX)
        .with_jitter()
        .build()
}

impl Writer {
    pub(super) fn run(mut self) {
        #[cfg(test)]
        if let Some(gate) = self.gate.take() {
            let _ = gate.recv();
        }
        loop {
            if self.writable.load(Ordering::Acquire) {
                // `recv` fails once every sender is gone: the log was dropped.
                let Ok(first) = self.queue.recv() else { break };
                self.commit_group(first);
            } else if !self.recover() {
                break;
            }
        }
    }

    /// Takes `first` and what is queued behind it, appends its records in one write and
    /// one `fdatasync`, writes its commits and dead letters in one transaction, and answers
    /// every request. An append whose caller has gone is skipped, not written.
    fn commit_group(&mut self, first: Request) {
        let mut group = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            if self.take(&request) {
                bytes += request.size();
                group.push(request);
            }
            if group.len() < MAX_GROUP_REQUESTS && bytes < MAX_GROUP_BYTES {
                next = self.queue.try_recv().ok();
            }
        }
        if group.is_empty() {
            return;
        }
        let (next, mut outcomes) = match self.append(&group) {
            Ok(appended) => appended,
            Err(e) => {
                // Nothing of the group is acknowledged and no offset is assigned; the file
                // is cut back to its durable end before anything is written again.
                self.writable.store(false, Ordering::Release);
                tracing::error!(
                    file = %self.segment.path().display(), error = %e,
                    "embedded event log append failed; refusing writes until a probe commits"
                );
                for request in group {
                    request.fail(LogError::Unavailable(format!(
                        "embedded event log append failed: {e}"
                    )));
                }
                return;
            }
        };
        self.transactions.fetch_add(1, Ordering::Relaxed);
        // Publish before answering: once `append` returns, `end_offset` and the subscribers
        // already see the record.
        if next != self.next {
            self.next = next;
            self.ends.send_replace(self.next.clone());
        }
        if outcomes.iter().any(Option::is_none) || self.end - self.marked >= MARK_EVERY_BYTES {
            let written = self.store.get().and_then(|db| {
                self.write(&db, &group, &mut outcomes)
                    .inspect_err(|_| self.store.discard(&db))
            });
            if let Err(e) = written {
                // The transaction is aborted: no commit or dead letter of the group is
                // written (its appends are, and are answered). The handle is closed;
                // `recover` opens the file again once it can write.
                self.writable.store(false, Ordering::Release);
                tracing::error!(
                    file = %self.store.file().display(), error = %e,
                    "embedded event log commit failed; refusing writes until a probe commits"
                );
                for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *outcome = Some(Outcome::Failed(format!(
                        "embedded event log commit failed: {e}"
                    )));
                }
            } else {
                self.marked = self.end;
            }
        }
        for (request, outcome) in group.into_iter().zip(outcomes) {
            answer(request, outcome);
        }
    }

    /// Appends the group's records to `events.log` (one write, one `fdatasync`). Returns the
    /// new end offsets and, per request, the outcome of an append (`None` for the others).
    /// On error nothing is indexed or published and the file's end is left to `probe`.
    fn append(&mut self, group: &[Request]) -> std::io::Result<(Vec<u64>, Vec<Option<Outcome>>)> {
        let mut next = self.next.clone();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut placed = Vec::new();
        self.frames.clear();
        for request in group {
            let Request::Append {
                partition,
                key,
                value,
                ..
            } = request
            else {
                outcomes.push(None);
                continue;
            };
            // `append` checked the partition against the same count.
            let Some(slot) = next.get_mut(*partition as usize) else {
                outcomes.push(Some(Outcome::Rejected(format!(
                    "partition {partition} out of range"
                ))));
                continue;
            };
            // `append` also checked that the record fits in a frame.
            placed.push((*partition, self.frames.len()));
            segment::encode(&mut self.frames, *partition, *slot, key, value);
            outcomes.push(Some(Outcome::Appended(*slot)));
            *slot += 1;
        }
        let appended = if placed.is_empty() {
            Ok(self.end)
        } else {
            self.segment.append(self.end, &self.frames, &placed)
        };
        // A large group's buffer is not kept: it would stay resident.
        if self.frames.capacity() > KEEP_FRAMES_BYTES {
            self.frames = Vec::new();
        }
        self.end = appended?;
        Ok((next, outcomes))
    }

    /// Whether `request`, just taken off the queue, is to be written: not an append whose
    /// caller stopped waiting (its client went away or its deadline passed).
    fn take(&self, request: &Request) -> bool {
        match request {
            Request::Append { reply, .. } => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.queued_bytes
                    .fetch_sub(request.size(), Ordering::AcqRel);
                !reply.is_closed()
            }
            _ => true,
        }
    }

    /// While the log cannot write: turns every request away at once and probes with backoff
    /// until a commit works again. Returns `false` when the log was dropped.
    fn recover(&mut self) -> bool {
        let mut backoff = probe_backoff();
        loop {
            let wait = backoff.next().unwrap_or(Duration::from_secs(5));
            let until = std::time::Instant::now() + wait;
            loop {
                let left = until.saturating_duration_since(std::time::Instant::now());
                match self.queue.recv_timeout(left) {
                    Ok(request) => {
                        self.take(&request);
                        request.fail(LogError::Shed(
                            "embedded event log cannot write until its storage recovers".into(),
                        ));
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                }
            }
            match self.probe() {
                Ok(()) => {
                    tracing::info!(
                        file = %self.store.file().display(),
                        "embedded event log can write again"
                    );
                    self.writable.store(true, Ordering::Release);
                    return true;
                }
                Err(e) => tracing::warn!(
                    file = %self.store.file().display(), error = %e, retry_in = ?wait,
                    "embedded event log still cannot write"
                ),
            }
        }
    }

    /// Whether the log can write again: the disk takes [`PROBE_BYTES`] of scratch data,
    /// `events.log` is cut back to its durable end (whatever a failed append left past it
    /// goes), and `events.redb` opens (recovering from a failed commit) and commits a
    /// durable transaction.
    fn probe(&mut self) -> Result<(), String> {
        let dir = self.store.file().parent().unwrap_or(Path::new("."));
        let scratch = dir.join(PROBE_FILE);
        let room = std::fs::File::create(&scratch).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&vec![0u8; PROBE_BYTES])?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&scratch);
        room.map_err(|e| format!("{}: {e}", scratch.display()))?;

        self.segment
            .truncate(self.end)
            .map_err(|e| format!("{}: {e}", self.segment.path().display()))?;

        let db = self.store.get().map_err(|e| e.to_string())?;
        let probed = (|| -> Result<(), redb::Error> {
            let txn = begin_durable(&db)?;
            {
                let mut meta = txn.open_table(LOG_META)?;
                let probes = meta.get(META_PROBES)?.map_or(0, |v| v.value());
                meta.insert(META_PROBES, probes.wrapping_add(1))?;
                meta.insert(META_SYNCED_END, self.end)?;
            }
            txn.commit()?;
            Ok(())
        })();
        probed
            .inspect_err(|_| self.store.discard(&db))
            .map_err(|e| e.to_string())?;
        self.marked = self.end;
        Ok(())
    }

    /// Writes the group's commits and dead letters (the requests whose outcome is still
    /// `None`) and the durable end of `events.log` in one durable transaction and fills in
    /// their outcomes. Nothing of it is visible unless this returns `Ok`.
    fn write(
        &self,
        db: &Database,
        group: &[Request],
        outcomes: &mut [Option<Outcome>],
    ) -> Result<(), redb::Error> {
        let txn = begin_durable(db)?;
        let mut done = Vec::new();
        {
            // Every append before this one is durable: mark how far (see `segment::open`).
            txn.open_table(LOG_META)?
                .insert(META_SYNCED_END, self.end)?;
            let mut positions = txn.open_table(GROUP_POSITIONS)?;
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            for (i, request) in group.iter().enumerate() {
                if outcomes[i].is_some() {
                    continue;
                }
                match request {
                    Request::Append { .. } => {}
                    Request::Commit {
                        group: name,
                        positions: wanted,
                        ..
                    } => {
                        // Validate against what is durably appended, all or nothing.
                        let invalid = wanted.iter().find_map(|&(p, pos)| {
                            match self.next.get(p as usize) {
                                None => Some(format!("partition {p} out of range")),
                                Some(&end) if pos > end => Some(format!(
                                    "cannot commit offset {} of partition {p}: the log ends at {end}",
                                    pos - 1
                                )),
                                Some(_) => None,
                            }
                        });
                        if let Some(reason) = invalid {
                            done.push((i, Outcome::Rejected(reason)));
                            continue;
                        }
                        for &(p, pos) in wanted {
                            let current = positions.get((name.as_str(), p))?.map(|v| v.value());
                            // Positions never move backwards.
                            if current.is_none_or(|c| pos > c) {
                                positions.insert((name.as_str(), p), pos)?;
                            }
                        }
                        done.push((i, Outcome::Committed));
                    }
                    Request::DeadLetter {
                        partition,
                        offset,
                        key,
                        value,
                        reason,
                        ..
                    } => {
                        let seq = dead.last()?.map_or(0, |(k, _)| k.value() + 1);
                        dead.insert(
                            seq,
                            (
                                *partition,
                                *offset,
                                key.as_slice(),
                                value.as_slice(),
                                reason.as_str(),
                            ),
                        )?;
                        done.push((i, Outcome::Committed));
                    }
                }
            }
        }
        txn.commit()?;
        for (i, outcome) in done {
            outcomes[i] = Some(outcome);
        }
        Ok(())
    }
}

/// How far `events.log` may grow past the durable end `events.redb` last recorded before
/// the writer records it again, even with no position commit to write: damage before that
/// mark is refused at the next open rather than cut as an unfinished write.
const MARK_EVERY_BYTES: u64 = 16 * 1024 * 1024;

/// A group buffer larger than this is freed after its write.
const KEEP_FRAMES_BYTES: usize = 1024 * 1024;

fn answer(request: Request, outcome: Option<Outcome>) {
    // A waiter that went away does not need the answer.
    match (request, outcome) {
        (Request::Append { reply, .. }, Some(Outcome::Appended(offset))) => {
            let _ = reply.send(Ok(offset));
        }
        (
            Request::Commit { reply, .. } | Request::DeadLetter { reply, .. },
            Some(Outcome::Committed),
        ) => {
            let _ = reply.send(Ok(()));
        }
        (request, Some(Outcome::Rejected(reason))) => request.fail(LogError::Rejected(reason)),
        (request, Some(Outcome::Failed(reason))) => request.fail(LogError::Unavailable(reason)),
        (request, _) => request.fail(LogError::Unavailable(
            "embedded event log: mismatched writer outcome".into(),
        )),
    }
}
