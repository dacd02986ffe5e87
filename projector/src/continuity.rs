//! [`Continuity`]: the guard against a read model that lost what its consumer group
//! already committed.

use crate::step::write_backoff;
use backon::Retryable;
use msghash_common::ports::{LogRecord, Subscription};
use msghash_common::{EventLog, ReadModel};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Guards against a read model that lost what its consumer group already committed: a
/// lost keyspace or deleted files, or a new generation whose group name was used before.
/// The first record seen of each partition is compared with the model. When the model has
/// nothing of that partition but the record is not at offset 0, the partition is rewound to
/// the start of the log, so the model is rebuilt instead of silently missing events.
///
/// A lost model whose group is already at the end of the log receives no records at all,
/// so [`Continuity::audit`] also compares the model with the log's end offsets while idle.
#[derive(Default)]
pub(crate) struct Continuity {
    checked: HashSet<u32>,
    rewound: HashSet<u32>,
    last_audit: Option<Instant>,
}

/// How often an idle projection compares its read model with the log's end offsets.
const AUDIT_INTERVAL: Duration = Duration::from_secs(2);

impl Continuity {
    /// What of `records` (just read from the log) may be applied to `model`:
    /// [`check`](Continuity::check)s them, and [`audit`](Continuity::audit)s while nothing
    /// came.
    pub(crate) async fn guard(
        &mut self,
        records: Vec<LogRecord>,
        log: &dyn EventLog,
        model: &dyn ReadModel,
        subscription: &mut dyn Subscription,
    ) -> anyhow::Result<Vec<LogRecord>> {
        let records = self.check(records, model, subscription).await?;
        if records.is_empty() {
            self.audit(log, model, subscription).await;
        }
        Ok(records)
    }

    /// While idle, at most every [`AUDIT_INTERVAL`]: every partition not seen yet whose log
    /// has records but whose model has none is rewound to the start. A partition this
    /// member does not read (Kafka: assigned to another member, or not assigned yet) is
    /// left for the next audit or for its owner.
    async fn audit(
        &mut self,
        log: &dyn EventLog,
        model: &dyn ReadModel,
        subscription: &mut dyn Subscription,
    ) {
        if self
            .last_audit
            .is_some_and(|t| t.elapsed() < AUDIT_INTERVAL)
        {
            return;
        }
        self.last_audit = Some(Instant::now());
        for partition in 0..log.partitions().get() {
            if self.checked.contains(&partition) || self.rewound.contains(&partition) {
                continue;
            }
            let (Ok(end), Ok(applied)) =
                tokio::join!(log.end_offset(partition), model.applied_offset(partition))
            else {
                continue;
            };
            if applied.is_some() {
                self.checked.insert(partition);
                continue;
            }
            if end == 0 {
                continue;
            }
            match subscription.rewind(partition, 0).await {
                Ok(()) => {
                    tracing::warn!(
                        partition,
                        end,
                        "the read model holds nothing of this partition but the log has \
                         records: rebuilding the partition from the start of the log"
                    );
                    self.rewound.insert(partition);
                }
                Err(e) => tracing::debug!(partition, error = %e, "cannot rewind yet"),
            }
        }
    }

    /// The records to apply: all of them, except a rewound partition's, until it starts
    /// over. Reading the model is retried until it answers; a failed rewind is an error.
    async fn check(
        &mut self,
        records: Vec<LogRecord>,
        model: &dyn ReadModel,
        subscription: &mut dyn Subscription,
    ) -> anyhow::Result<Vec<LogRecord>> {
        let mut keep = Vec::with_capacity(records.len());
        let mut dropping = HashSet::new();
        for record in records {
            let partition = record.partition;
            if dropping.contains(&partition) {
                continue;
            }
            // The first record after a rewind is wherever the log starts now.
            if self.checked.contains(&partition)
                || self.rewound.remove(&partition)
                || record.offset == 0
            {
                self.checked.insert(partition);
                keep.push(record);
                continue;
            }
            let applied = (|| model.applied_offset(partition))
                .retry(write_backoff())
                .notify(|e, after| {
                    tracing::warn!(error = %e, ?after, "reading the applied offset failed; retrying")
                })
                .await?;
            if applied.is_some() {
                self.checked.insert(partition);
                keep.push(record);
                continue;
            }
            tracing::warn!(
                partition,
                offset = record.offset,
                "the read model holds nothing of this partition but its consumer group resumes \
                 past the start: rebuilding the partition from the start of the log"
            );
            subscription.rewind(partition, 0).await?;
            self.rewound.insert(partition);
            dropping.insert(partition);
        }
        Ok(keep)
    }
}
