//! The two ports the services depend on. The domain never sees rdkafka or scylla types:
//! each adapter implements these traits, and one conformance suite checks every adapter.

use crate::{Digest, MessageHashed};
use async_trait::async_trait;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// A Kafka-style offset: the position of a record inside its partition.
pub type Offset = i64;

/// One record read from the event log, undecoded, so that the projector can dead-letter a
/// record it cannot read instead of stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub partition: u32,
    pub offset: Offset,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Why the event log could not do what was asked. Callers map them to 503 (a retry later
/// may work), except `TooLarge` (413) and `Misconfigured` (the service does not start);
/// never to 500. `Unavailable` is worth retrying within a request's deadline; `Shed` is
/// not (answer 503 with `Retry-After` at once).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The broker did not acknowledge in time or is unreachable.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// The log turned the request away without trying it: its write queue is full, or it
    /// cannot write until its storage recovers. Retrying at once only adds load: the
    /// client gets 503 with `Retry-After` at once.
    #[error("event log turned the request away: {0}")]
    Shed(String),
    /// The broker refused the request (topic missing, partition out of range, ...).
    #[error("event log rejected the request: {0}")]
    Rejected(String),
    /// The event is larger than the log accepts: no retry helps (413 to the client).
    #[error("event too large for the event log: {0}")]
    TooLarge(String),
    /// The log exists but is not what msghash needs (another partition count, a topic that
    /// is not compacted): no retry fixes it, only an operator. Services refuse to start on
    /// it with exit code 2.
    #[error("event log misconfigured: {0}")]
    Misconfigured(String),
}

impl LogError {
    /// The process exit code for a service that cannot start because of `err`: 2 when
    /// something in the way the log is set up must change, 1 otherwise.
    pub fn exit_code(err: &anyhow::Error) -> u8 {
        match err.downcast_ref::<LogError>() {
            Some(LogError::Misconfigured(_)) => 2,
            _ => 1,
        }
    }
}

/// The append-only, partitioned log of `MessageHashed` events.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// How many partitions the topic has; `partition_for` maps digests onto them.
    fn partitions(&self) -> NonZeroU32;

    /// Appends one event to the given partition and returns its offset once the log has
    /// durably acknowledged it (for Kafka: acks=all).
    async fn append(&self, partition: u32, event: &MessageHashed) -> Result<Offset, LogError>;

    /// Whether the log answers at all, for readiness: Kafka, the cluster's metadata of the
    /// topic (so one partition's leader election does not take every replica out of
    /// rotation) and a producer that is not fatally failed. By default, an end-offset
    /// request of partition 0.
    async fn ready(&self) -> Result<(), LogError> {
        self.end_offset(0).await.map(|_| ())
    }

    /// The offset the next appended record of `partition` will get (Kafka's high watermark).
    async fn end_offset(&self, partition: u32) -> Result<Offset, LogError>;

    /// Sets aside a record the projector cannot decode, with the reason, outside the main
    /// log (Kafka: the `<topic>-dlq` topic; embedded: a table), so it never blocks its
    /// partition and stays inspectable. Durable once it returns.
    async fn dead_letter(&self, record: &LogRecord, reason: &str) -> Result<(), LogError>;

    /// How many records have been dead-lettered.
    async fn dead_letter_count(&self) -> Result<u64, LogError>;

    /// Joins consumer group `group`. A group with no committed positions starts at offset 0
    /// of every partition, so a new group name replays the whole log.
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError>;
}

/// A consumer-group member reading the log in order within each partition.
///
/// Delivery is at least once: after a rebalance, a restart or a [`rewind`](Self::rewind)
/// records come again, and a member that lost its partitions (a zombie) may still be
/// finishing a batch of them while the new owner moves on. The read model absorbs both:
/// [`ReadModel::apply`] is idempotent and its applied offsets never move backwards.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` records; waits at most `max_wait` for the first one and returns an empty
    /// batch if none came.
    async fn next_batch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError>;

    /// Records that every record up to and including `offset` of each listed partition is
    /// done, so a restarted group resumes after it.
    async fn commit(&mut self, done: &[(u32, Offset)]) -> Result<(), LogError>;

    /// Makes the next records of `partition` start at `offset`, or at the first record after
    /// it that the log still has. For a partition this member is currently reading.
    async fn rewind(&mut self, partition: u32, offset: Offset) -> Result<(), LogError>;

    /// A number that changes whenever this member's partitions change (Kafka: every
    /// rebalance). What a member learned about "its" partitions holds until it changes. A
    /// subscription that is the only member of its group keeps 0.
    fn assignment_epoch(&self) -> u64 {
        0
    }
}

/// What one projector step writes: the rows, then the applied offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectionBatch {
    pub messages: Vec<(Digest, String)>,
    /// Per partition, the highest offset whose event (or dead letter) this batch covers.
    pub applied: Vec<(u32, Offset)>,
}

impl ProjectionBatch {
    /// Adds an event and advances its partition's applied offset.
    pub fn push_event(&mut self, partition: u32, offset: Offset, event: MessageHashed) {
        self.messages.push((event.digest, event.message));
        self.advance(partition, offset);
    }

    /// Advances a partition's applied offset without a row (a dead-lettered record).
    pub fn advance(&mut self, partition: u32, offset: Offset) {
        match self.applied.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, o)) => *o = (*o).max(offset),
            None => self.applied.push((partition, offset)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.applied.is_empty()
    }
}

/// The error of a store or driver underneath an adapter, kept as the source of a
/// [`ModelError`].
pub type SourceError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the read model could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The store did not answer (connection lost, timeout, I/O): worth a retry. The store's
    /// own error, when there is one, is part of the message, so that every log line that
    /// prints the error (`error = %e`) has the cause.
    #[error("read model unavailable: {context}{}", cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default())]
    Unavailable {
        context: String,
        cause: Option<SourceError>,
    },
    /// The store answered with data msghash did not write.
    #[error("read model returned unexpected data: {0}")]
    Corrupt(String),
    /// The settings cannot work (an invalid replication map, ...): no retry helps.
    #[error("read model misconfigured: {0}")]
    Misconfigured(String),
    /// The operation is not allowed in the current state (dropping the active generation).
    #[error("refused: {0}")]
    Refused(String),
}

impl ModelError {
    /// [`ModelError::Unavailable`] with the store's error as its source.
    pub fn unavailable(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> ModelError {
        ModelError::Unavailable {
            context: context.into(),
            cause: Some(Box::new(source)),
        }
    }

    /// [`ModelError::Unavailable`] with no error underneath.
    pub fn unavailable_because(context: impl Into<String>) -> ModelError {
        ModelError::Unavailable {
            context: context.into(),
            cause: None,
        }
    }
}

/// The query side's store: digest → message, plus how far each partition is applied.
///
/// The contract every adapter keeps (checked for each one by `common/tests/conformance.rs`):
/// - **Applied offsets never move backwards.** An [`apply`](Self::apply) whose batch carries
///   a lower offset for a partition than the one already recorded leaves the recorded one,
///   also when two projectors race (a zombie group member finishing a stale batch while
///   the new owner applies a later one): the result is the maximum, whatever the order.
/// - **`apply` is idempotent.** Applying the same batch twice leaves the same state as
///   applying it once (rows, applied offsets, listing), so a batch may be replayed after a
///   crash or a driver retry.
/// - **A listing cursor is stable.** See [`list`](Self::list).
#[async_trait]
pub trait ReadModel: Send + Sync + 'static {
    /// Writes the rows first, then the applied offsets, so once an offset is visible every
    /// row up to it is readable.
    ///
    /// Rows are upserts (a digest always names the same message). Each applied offset is
    /// merged with the recorded one by maximum: a batch with a lower offset than the
    /// recorded one still writes its rows but does not move the offset back, even when it
    /// races with a later batch. Applying the same batch twice changes nothing.
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError>;

    /// Makes what `apply` committed durable now, for an adapter that defers it (the
    /// embedded model makes small batches durable every few seconds). The projector
    /// calls it when a poll finds nothing and at the end of each turn (a stop, a switch of
    /// generation), and a replay when it ends. Until then a crash may take
    /// back rows together with their applied offsets, never one without the other.
    async fn sync(&self) -> Result<(), ModelError> {
        Ok(())
    }

    /// The message named by `digest`, if the projection has it.
    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError>;

    /// The highest offset of `partition` whose event is applied; `None` before the first.
    /// It is the maximum over every applied batch and never decreases.
    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError>;

    /// Up to `limit` digests that come after `after` in the adapter's listing order (a
    /// stable order of its choosing: byte order, token order, ...).
    ///
    /// The cursor is stable: paging with the last digest of each page as the next `after`
    /// visits every digest stored before the listing began exactly once, even if rows are
    /// added between pages. Rows added meanwhile may or may not appear, but no digest
    /// appears twice.
    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError>;

    /// The generation this handle reads now. A plain adapter is one generation and says 0;
    /// [`crate::generation::LiveModel`] says which one it currently delegates to, so a
    /// reader can tell that two of its reads went to different generations.
    fn generation(&self) -> Generation {
        0
    }
}

/// A read-model generation: one complete projection of the log, built by one consumer
/// group. Generation 0 is the one msghash creates first; a replay builds the next one.
pub type Generation = u64;

/// Which generation serves reads, which one a replay is building, and which one the live
/// projectors have moved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GenerationState {
    /// The generation readers use and live projectors write.
    pub active: Generation,
    /// A generation a replay has started and not switched to yet (always above `active`).
    pub pending: Option<Generation>,
    /// The highest generation a live projector has acknowledged writing to.
    pub adopted: Generation,
}

/// The catalog of read-model generations (ScyllaDB: per-generation tables plus a
/// `generations` table; embedded: per-generation files plus `generations.redb`).
///
/// The switch is one durable write of `active`; readers and projectors poll
/// [`state`](ModelGenerations::state) and move on their own.
#[async_trait]
pub trait ModelGenerations: Send + Sync + 'static {
    /// The current state; a fresh store says generation 0 is active.
    async fn state(&self) -> Result<GenerationState, ModelError>;

    /// The read model of `generation`, creating its storage when missing.
    async fn open(&self, generation: Generation) -> Result<Arc<dyn ReadModel>, ModelError>;

    /// Records that a replay is building `generation` (above the active one).
    async fn begin(&self, generation: Generation) -> Result<(), ModelError>;

    /// Makes `generation` the active one: from now on readers switch to it.
    async fn activate(&self, generation: Generation) -> Result<(), ModelError>;

    /// Records that a live projector now writes `generation`.
    async fn adopt(&self, generation: Generation) -> Result<(), ModelError>;

    /// Every generation whose storage exists, in ascending order.
    async fn list(&self) -> Result<Vec<Generation>, ModelError>;

    /// Deletes a generation's storage. Refuses the active one.
    async fn drop_generation(&self, generation: Generation) -> Result<(), ModelError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keeps_the_highest_offset_per_partition() {
        let mut b = ProjectionBatch::default();
        b.push_event(3, 10, MessageHashed::new("a".into()));
        b.advance(1, 4);
        b.push_event(3, 12, MessageHashed::new("b".into()));
        b.advance(3, 11);
        assert_eq!(b.applied, vec![(3, 12), (1, 4)]);
        assert_eq!(b.messages.len(), 2);
    }
}
