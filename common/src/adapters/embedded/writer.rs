//! The single writer of `events.redb` and its group commit: it takes the first request,
//! everything already queued behind it (up to [`MAX_GROUP_REQUESTS`] requests or
//! [`MAX_GROUP_BYTES`] bytes), writes all of it in one transaction, commits (one fsync),
//! publishes the new end offsets, and only then answers every waiter.

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
}

/// The single writer of `events.redb`.
pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    /// Per partition, the next offset, as durably committed.
    pub(super) next: Vec<u64>,
    pub(super) queue: mpsc::Receiver<Request>,
    pub(super) ends: watch::Sender<Vec<u64>>,
    pub(super) transactions: Arc<AtomicU64>,
}

impl Writer {
    pub(super) fn run(mut self) {
        // `recv` fails once every sender is gone: the log was dropped.
        while let Ok(first) = self.queue.recv() {
            let mut bytes = first.size();
            let mut group = vec![first];
            while group.len() < MAX_GROUP_REQUESTS && bytes < MAX_GROUP_BYTES {
                match self.queue.try_recv() {
                    Ok(request) => {
                        bytes += request.size();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            match self.write(&group) {
                Ok((next, outcomes)) => {
                    self.transactions.fetch_add(1, Ordering::Relaxed);
                    // Publish before answering: once `append` returns, `end_offset` and the
                    // subscribers already see the record.
                    self.next = next;
                    self.ends.send_replace(self.next.clone());
                    for (request, outcome) in group.into_iter().zip(outcomes) {
                        answer(request, outcome);
                    }
                }
                Err(e) => {
                    let detail = e.to_string();
                    tracing::error!(error = %detail, "embedded event log commit failed");
                    for request in group {
                        request.fail(LogError::Unavailable(format!(
                            "embedded event log: {detail}"
                        )));
                    }
                }
            }
        }
    }

    /// Writes one group in one durable transaction; returns the new end offsets and one
    /// outcome per request, in order. Nothing is visible unless this returns `Ok`.
    fn write(&self, group: &[Request]) -> Result<(Vec<u64>, Vec<Outcome>), redb::Error> {
        let txn = begin_durable(&self.db)?;
        let mut next = self.next.clone();
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut positions = txn.open_table(GROUP_POSITIONS)?;
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            for request in group {
                match request {
                    Request::Append {
                        partition,
                        key,
                        value,
                        ..
                    } => {
                        // `append` checked the partition against the same count.
                        let Some(slot) = next.get_mut(*partition as usize) else {
                            outcomes.push(Outcome::Rejected(format!(
                                "partition {partition} out of range"
                            )));
                            continue;
                        };
                        let offset = *slot;
                        records.insert((*partition, offset), (key.as_slice(), value.as_slice()))?;
                        *slot += 1;
                        outcomes.push(Outcome::Appended(offset));
                    }
                    Request::Commit {
                        group: name,
                        positions: wanted,
                        ..
                    } => {
                        // Validate against what is durably committed, all or nothing.
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
                            outcomes.push(Outcome::Rejected(reason));
                            continue;
                        }
                        for &(p, pos) in wanted {
                            let current = positions.get((name.as_str(), p))?.map(|v| v.value());
                            // Positions never move backwards.
                            if current.is_none_or(|c| pos > c) {
                                positions.insert((name.as_str(), p), pos)?;
                            }
                        }
                        outcomes.push(Outcome::Committed);
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
                        outcomes.push(Outcome::Committed);
                    }
                }
            }
        }
        txn.commit()?;
        Ok((next, outcomes))
    }
}

fn answer(request: Request, outcome: Outcome) {
    // A waiter that went away does not need the answer.
    match (request, outcome) {
        (Request::Append { reply, .. }, Outcome::Appended(offset)) => {
            let _ = reply.send(Ok(offset));
        }
        (Request::Commit { reply, .. } | Request::DeadLetter { reply, .. }, Outcome::Committed) => {
            let _ = reply.send(Ok(()));
        }
        (request, Outcome::Rejected(reason)) => request.fail(LogError::Rejected(reason)),
        (request, _) => request.fail(LogError::Unavailable(
            "embedded event log: mismatched writer outcome".into(),
        )),
    }
}
