//! [`Continuity`]: the guard against a read model that is behind what its consumer group
//! already committed.

use crate::step::write_backoff;
use backon::Retryable;
use msghash_common::ports::{LogRecord, Offset, Subscription};
use msghash_common::{EventLog, ReadModel};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Guards against a read model that is behind its consumer group: a lost keyspace or
/// deleted files, a model restored from an older backup, or a new generation whose group
/// name was used before. The group's committed position is never trusted on its own: the
/// first record seen of each partition (after every change of assignment) is compared with
/// the model's own applied offset, and when the model misses records before it, the
/// partition is rewound to the first record the model lacks. The model is caught up
/// instead of silently missing events (which read-your-writes would then answer 404 for
/// ever).
///
/// A model behind a group that is already at the end of the log receives no records at
/// all, so [`Continuity::audit`] also compares the model with the log's end offsets while
/// idle.
///
/// A rewind can fail when the partition was just handed to another member: that is not an
/// error of the projection. The partition's records are then dropped (never applied past a
/// gap) and the rewind is tried again, until it works or the assignment changes.
#[derive(Default)]
pub(crate) struct Continuity {
    /// Partitions whose model is known to hold everything before the records read now.
    checked: HashSet<u32>,
    /// Partitions rewound: their next record is where the model resumes.
    rewound: HashSet<u32>,
    /// Partitions whose rewind failed, and where it must go.
    unrewound: HashMap<u32, Offset>,
    /// The subscription's assignment epoch the sets above belong to.
    epoch: u64,
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
        self.follow_assignment(subscription);
        let records = self.check(records, model, subscription).await?;
        if records.is_empty() {
            self.audit(log, model, subscription).await;
        }
        Ok(records)
    }

    /// What was checked holds for this member's partitions of the moment only: forgotten
    /// when the assignment changes.
    fn follow_assignment(&mut self, subscription: &dyn Subscription) {
        let epoch = subscription.assignment_epoch();
        if epoch != self.epoch {
            self.checked.clear();
            self.rewound.clear();
            self.unrewound.clear();
            self.epoch = epoch;
        }
    }

    /// While idle, at most every [`AUDIT_INTERVAL`]: every partition not seen yet whose log
    /// has records past the model's applied offset is rewound to the first one the model
    /// lacks. A partition this member does not read (Kafka: assigned to another member, or
    /// not assigned yet) refuses the rewind and is left for the next audit or its owner.
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
            let resume = resume_offset(applied);
            if resume >= end {
                self.checked.insert(partition);
                continue;
            }
            match subscription.rewind(partition, resume).await {
                Ok(()) => {
                    tracing::warn!(
                        partition,
                        end,
                        resume,
                        "the read model is behind the log while this projector is idle: \
                         projecting the partition again from the model's applied offset"
                    );
                    self.unrewound.remove(&partition);
                    self.rewound.insert(partition);
                }
                Err(e) => tracing::debug!(partition, error = %e, "cannot rewind yet"),
            }
        }
    }

    /// The records to apply: all of them, except those of a partition whose model misses
    /// records before them (the partition is rewound instead, and starts over from the
    /// first record the model lacks). Reading the model is retried until it answers.
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
            if let Some(&resume) = self.unrewound.get(&partition) {
                // Never apply past a gap: only a rewind that worked lets this partition on.
                self.rewind(subscription, partition, resume).await;
                dropping.insert(partition);
                continue;
            }
            // The first record after a rewind is where the model resumes.
            if self.checked.contains(&partition) || self.rewound.remove(&partition) {
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
            let resume = resume_offset(applied);
            if record.offset <= resume {
                self.checked.insert(partition);
                keep.push(record);
                continue;
            }
            tracing::warn!(
                partition,
                offset = record.offset,
                resume,
                "the read model is behind its consumer group (restored from a backup, lost, \
                 or a reused group name): projecting the partition again from the model's \
                 applied offset"
            );
            self.rewind(subscription, partition, resume).await;
            dropping.insert(partition);
        }
        Ok(keep)
    }

    /// Rewinds `partition` to `resume`; on failure (e.g. the partition was just handed to
    /// another member) remembers to try again.
    async fn rewind(
        &mut self,
        subscription: &mut dyn Subscription,
        partition: u32,
        resume: Offset,
    ) {
        match subscription.rewind(partition, resume).await {
            Ok(()) => {
                self.unrewound.remove(&partition);
                self.rewound.insert(partition);
            }
            Err(e) => {
                tracing::warn!(partition, resume, error = %e,
                    "cannot rewind the partition (handed to another member?); its records wait");
                self.unrewound.insert(partition, resume);
            }
        }
    }
}

/// The first offset a model with `applied` lacks.
fn resume_offset(applied: Option<Offset>) -> Offset {
    applied.map_or(0, |a| a.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use msghash_common::ports::LogError;
    use msghash_testkit::fakes::OffsetsOnly;

    /// A member's subscription as a test drives it: which partitions it holds, its
    /// assignment epoch, and the rewinds asked of it.
    #[derive(Default)]
    struct Member {
        assigned: HashSet<u32>,
        epoch: u64,
        rewinds: Vec<(u32, Offset)>,
    }

    #[async_trait]
    impl Subscription for Member {
        async fn next_batch(&mut self, _: usize, _: Duration) -> Result<Vec<LogRecord>, LogError> {
            Ok(Vec::new())
        }
        async fn commit(&mut self, _: &[(u32, Offset)]) -> Result<(), LogError> {
            Ok(())
        }
        async fn rewind(&mut self, partition: u32, offset: Offset) -> Result<(), LogError> {
            if !self.assigned.contains(&partition) {
                return Err(LogError::Rejected(format!(
                    "partition {partition} not assigned"
                )));
            }
            self.rewinds.push((partition, offset));
            Ok(())
        }
        fn assignment_epoch(&self) -> u64 {
            self.epoch
        }
    }

    fn records(partition: u32, offsets: std::ops::Range<Offset>) -> Vec<LogRecord> {
        offsets
            .map(|offset| LogRecord {
                partition,
                offset,
                key: None,
                value: None,
            })
            .collect()
    }

    /// A rewind of a partition just handed to another member fails: before, that error
    /// ended the projection loop. Now the partition's records are held back (never applied
    /// past the gap) and the rewind is tried again.
    #[tokio::test]
    async fn a_rewind_refused_after_a_rebalance_holds_the_partition_back_without_failing() {
        let model = OffsetsOnly::default();
        let mut member = Member::default();
        let mut continuity = Continuity::default();
        // The model has nothing of partition 0, the group resumes at 5; partition 0 was
        // revoked in the meantime.
        let kept = continuity
            .check(records(0, 5..8), &model, &mut member)
            .await
            .expect("a refused rewind is not an error");
        assert!(kept.is_empty(), "nothing applied past the gap: {kept:?}");
        let kept = continuity
            .check(records(0, 8..9), &model, &mut member)
            .await
            .expect("still not an error");
        assert!(kept.is_empty());
        // Once the rewind works, the partition starts over from the model's offset.
        member.assigned.insert(0);
        let kept = continuity
            .check(records(0, 9..10), &model, &mut member)
            .await
            .expect("check");
        assert!(kept.is_empty());
        assert_eq!(member.rewinds, vec![(0, 0)]);
        let kept = continuity
            .check(records(0, 0..3), &model, &mut member)
            .await
            .expect("check");
        assert_eq!(kept.len(), 3);
    }

    /// What was checked of a partition holds only while it stays assigned: after a
    /// rebalance its first record is checked against the model again.
    #[tokio::test]
    async fn every_assignment_checks_the_model_again() {
        let model = OffsetsOnly::default();
        model.set(1, 9);
        let mut member = Member {
            assigned: HashSet::from([1]),
            ..Member::default()
        };
        let mut continuity = Continuity::default();
        let kept = continuity
            .guard_records(records(1, 10..12), &model, &mut member)
            .await;
        assert_eq!(kept.len(), 2, "the model holds everything before offset 10");
        // The partition goes to another member and comes back; meanwhile that member's
        // model writes were lost (a restore), so the model is at 9 while the group is at 20.
        member.epoch += 1;
        let kept = continuity
            .guard_records(records(1, 20..22), &model, &mut member)
            .await;
        assert!(kept.is_empty(), "a gap from 10 to 19 is not applied past");
        assert_eq!(member.rewinds, vec![(1, 10)]);
    }

    impl Continuity {
        /// `guard` without the idle audit (these batches are never empty).
        async fn guard_records(
            &mut self,
            records: Vec<LogRecord>,
            model: &dyn ReadModel,
            subscription: &mut dyn Subscription,
        ) -> Vec<LogRecord> {
            self.follow_assignment(subscription);
            self.check(records, model, subscription)
                .await
                .expect("check")
        }
    }
}
