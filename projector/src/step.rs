//! One projection step, shared by the live projection and the replay: read a batch from
//! the log and keep what the read model may take ([`Reader`]), turn it into rows and applied offsets ([`build_batch`]), dead-letter
//! what does not decode, apply, commit the group's positions ([`project_batch`]).

use crate::continuity::Continuity;
use crate::ProjectorStats;
use backon::{ExponentialBuilder, Retryable};
use msghash_common::metrics::names;
use msghash_common::ports::{Generation, LogRecord, Offset, Subscription};
use msghash_common::service::release_free_memory;
use msghash_common::shutdown::Shutdown;
use msghash_common::{EventLog, MessageHashed, ProjectionBatch, ReadModel};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub(crate) async fn subscribe(
    log: &dyn EventLog,
    group: &str,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<Box<dyn Subscription>>> {
    let attempt = (|| log.subscribe(group))
        .retry(ExponentialBuilder::default().with_max_times(usize::MAX))
        .notify(|e, after| tracing::warn!(error = %e, ?after, "subscribe failed; retrying"));
    tokio::select! {
        s = attempt => Ok(Some(s?)),
        _ = shutdown.cancelled() => Ok(None),
    }
}

/// Reads the log: the next records of this member's partitions, up to `max`, waiting up to
/// `wait` for the first. A failed poll is logged and counts as an empty batch (after a
/// short pause), so the caller's loop goes round and checks for shutdown.
async fn poll(subscription: &mut dyn Subscription, max: usize, wait: Duration) -> Vec<LogRecord> {
    match subscription.next_batch(max, wait).await {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "polling the log failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
            Vec::new()
        }
    }
}

/// How a projection loop reads the log: its consumer-group subscription and that
/// subscription's [`Continuity`] guard. Both loops, live and replay, start each turn with
/// [`Reader::read`].
pub(crate) struct Reader {
    subscription: Box<dyn Subscription>,
    continuity: Continuity,
    max: usize,
    wait: Duration,
    /// Whether a large batch was projected since the freed memory was last given back.
    trim: bool,
    /// Whether the last poll found records: going idle after a burst gives freed memory
    /// back once too.
    busy: bool,
}

/// A batch of at least this many records leaves enough freed memory behind (its records,
/// rows and the store's buffers) to give back once the projection has caught up.
const TRIM_AFTER: usize = 4096;

impl Reader {
    /// Reads batches of up to `max` records, waiting up to `wait` for the first.
    pub(crate) fn new(subscription: Box<dyn Subscription>, max: usize, wait: Duration) -> Self {
        Reader {
            subscription,
            continuity: Continuity::default(),
            max,
            wait,
            trim: false,
            busy: false,
        }
    }

    /// Reads the log ([`poll`]), then keeps only what `model` may take
    /// ([`Continuity::guard`]: records of a partition the model lost are not applied; the
    /// partition is rewound instead).
    pub(crate) async fn read(
        &mut self,
        log: &dyn EventLog,
        model: &dyn ReadModel,
    ) -> anyhow::Result<Vec<LogRecord>> {
        let subscription = self.subscription.as_mut();
        let records = poll(subscription, self.max, self.wait).await;
        if records.is_empty() {
            // Idle: what the model deferred becomes durable now (`ReadModel::sync`).
            if let Err(e) = model.sync().await {
                tracing::warn!(error = %e, "making the read model durable failed; retrying when idle");
            }
            // And what the burst freed goes back to the system once.
            if std::mem::take(&mut self.busy) {
                self.trim = true;
            }
        } else {
            self.busy = true;
        }
        if records.len() >= TRIM_AFTER {
            self.trim = true;
        } else if self.trim {
            // Caught up after large batches (a start, a backlog, a replay): glibc keeps
            // what they freed, about twice the batch; give it back once, not per batch
            // (trimming per batch made the next ones fault their pages in again).
            self.trim = false;
            let started = Instant::now();
            if let Err(e) = tokio::task::spawn_blocking(release_free_memory).await {
                tracing::warn!(error = %e, "giving freed memory back failed");
            }
            tracing::debug!(took = ?started.elapsed(), "freed memory given back");
        }
        self.continuity
            .guard(records, log, model, subscription)
            .await
    }

    /// The subscription, to commit what was projected.
    pub(crate) fn subscription(&mut self) -> &mut dyn Subscription {
        self.subscription.as_mut()
    }
}

/// Turns records into one batch and the list of those that do not decode (poison, to be
/// dead-lettered); a poison record's offset still counts as applied.
pub fn build_batch<'r>(
    records: impl IntoIterator<Item = &'r LogRecord>,
) -> (ProjectionBatch, Vec<(&'r LogRecord, String)>) {
    let mut batch = ProjectionBatch::default();
    let mut poison = Vec::new();
    for r in records {
        match MessageHashed::decode(r.key.as_deref(), r.value.as_deref()) {
            Ok(event) => batch.push_event(r.partition, r.offset, event),
            Err(e) => {
                tracing::warn!(partition = r.partition, offset = r.offset, error = %e,
                    "dead-lettering an undecodable event");
                batch.advance(r.partition, r.offset);
                poison.push((r, e.to_string()));
            }
        }
    }
    (batch, poison)
}

/// How many times one batch tries to write a dead letter before it holds the poison's
/// partition back (and goes on with the others): the first try and its retries.
const DEAD_LETTER_ATTEMPTS: usize = 5;

fn dead_letter_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        // backon counts the retries, after the first try.
        .with_max_times(DEAD_LETTER_ATTEMPTS - 1)
        .with_jitter()
}

/// The retry policy of the projection's writes: quick at first, then every 2 s, forever.
/// At the end of a projection's turn (a stop, a switch of generation), `model` keeps
/// nothing deferred (`ReadModel::sync`); bounded, so a stuck disk cannot hold up a stop
/// (the embedded model's last handle, when dropped, also writes what it kept in memory,
/// unless a failure closed its file).
pub(crate) async fn sync_at_stop(model: &dyn ReadModel, generation: Generation) {
    match tokio::time::timeout(SYNC_AT_STOP, model.sync()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, generation, "making the read model durable failed")
        }
        Err(_) => tracing::warn!(generation, timeout = ?SYNC_AT_STOP,
            "making the read model durable took too long; leaving it to the close"),
    }
}

/// How long [`sync_at_stop`] waits.
const SYNC_AT_STOP: Duration = Duration::from_secs(10);

pub(crate) fn write_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(usize::MAX)
        .with_jitter()
}

/// Projects one polled batch: dead letters, then rows and applied offsets, then the group
/// commit. Returns `false` when `shutdown` came first (nothing half-done is committed).
pub(crate) async fn project_batch(
    log: &dyn EventLog,
    model: &dyn ReadModel,
    subscription: &mut dyn Subscription,
    records: &[LogRecord],
    stats: &ProjectorStats,
    shutdown: &Shutdown,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let backoff = write_backoff();
    let (batch, poison) = build_batch(records);
    // Dead letters first: once the batch's offsets are applied, they are past them. A dead
    // letter that keeps failing holds its partition back at the poison record (nothing of
    // it from there on is applied or committed; it is read again next turn), so that one
    // partition waits, not all of them.
    let mut held: BTreeMap<u32, Offset> = BTreeMap::new();
    for (record, reason) in &poison {
        if held.contains_key(&record.partition) {
            continue;
        }
        let keep = (|| log.dead_letter(record, reason))
            .retry(dead_letter_backoff())
            .notify(|e, after| tracing::warn!(error = %e, ?after, "dead-letter failed; retrying"));
        let kept = tokio::select! {
            result = keep => result,
            _ = shutdown.cancelled() => return Ok(false),
        };
        match kept {
            Ok(()) => stats.record_dead_lettered(),
            Err(e) => {
                tracing::error!(partition = record.partition, offset = record.offset, error = %e,
                    "the dead letter keeps failing: holding the partition back at this record");
                held.insert(record.partition, record.offset);
            }
        }
    }
    let batch = if held.is_empty() {
        batch
    } else {
        build_batch(records.iter().filter(|r| {
            held.get(&r.partition)
                .is_none_or(|&poison_at| r.offset < poison_at)
        }))
        .0
    };
    let apply = (|| model.apply(&batch))
        .retry(backoff)
        .notify(|e, after| tracing::warn!(error = %e, ?after, "apply failed; retrying"));
    tokio::select! {
        result = apply => result?,
        _ = shutdown.cancelled() => return Ok(false),
    }
    stats.record_applied(batch.messages.len() as u64);
    if let Err(e) = subscription.commit(&batch.applied).await {
        // Not fatal: the rows and offsets are written; a restart replays the batch.
        tracing::warn!(error = %e, "committing consumer offsets failed");
    }
    for (&partition, &poison_at) in &held {
        // Read it again from the poison record; if the partition just moved to another
        // member, that member reads it from the committed position, which is before it.
        if let Err(e) = subscription.rewind(partition, poison_at).await {
            tracing::warn!(partition, error = %e, "cannot rewind a held partition");
        }
    }
    stats.set_held(records.iter().map(|r| r.partition), &held);
    metrics::histogram!(names::PROJECTOR_BATCH_DURATION_SECONDS)
        .record(started.elapsed().as_secs_f64());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Tried 5 times per turn" (docs/operations.md): the first try and four retries.
    #[tokio::test]
    async fn a_failing_dead_letter_is_tried_dead_letter_attempts_times() {
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let result: Result<(), &str> = (|| async {
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err("the dead-letter store refuses")
        })
        // The same policy without its waits.
        .retry(
            dead_letter_backoff()
                .with_min_delay(Duration::ZERO)
                .with_max_delay(Duration::ZERO),
        )
        .await;
        assert!(result.is_err());
        assert_eq!(
            tries.load(std::sync::atomic::Ordering::Relaxed),
            DEAD_LETTER_ATTEMPTS
        );
    }
}
