//! The projector: event log → read model.
//!
//! One loop, per consumer-group member: take a batch of records, decode them, write the
//! rows and then the applied offsets to the read model in one `apply`, and only then commit
//! the group's positions. A crash anywhere in between replays the batch, and replaying is
//! harmless: the same digest always carries the same message.
//!
//! A record that does not decode is poison: it is logged, counted, written to the dead-letter
//! store and skipped (its offset still counts as applied). If the dead letter cannot be
//! written (a few tries, about 10 s), its partition is held back at the poison record and
//! read again next turn, while the other partitions go on: no good event is skipped, and
//! `msghash_projector_held_partitions` and readiness say that one waits.
//!
//! The `projector` service also serves `/health/live`, `/health/ready` (the log and the
//! read model answer) and `/metrics` over TLS ([`app`]); the projection refreshes
//! `msghash_projector_lag{partition}` every [`ProjectorSettings::lag_interval`].

//!
//! Files: [`step`] (one step: read, build, apply, commit), [`continuity`] (the lost-read-model
//! guard), [`live`] (the live loop), [`status`], [`replay`].

use axum::Router;
use msghash_common::http;
use msghash_common::metrics::names;
use msghash_common::{EventLog, ReadModel};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod continuity;
pub mod live;
pub mod replay;
pub mod status;
pub mod step;

pub use live::run_projection;
pub use replay::{Phase, Progress, ReplayReport, ReplaySettings};
pub use status::{lag, partition_statuses, PartitionStatus, Status};
pub use step::build_batch;

/// Settings of the projection loop.
#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    /// Consumer group; a new name replays the log from offset 0.
    pub group: String,
    /// Most records applied in one step.
    pub batch_size: usize,
    /// How long one poll waits for the first record (also how often shutdown is checked).
    pub poll_wait: Duration,
    /// How often `msghash_projector_lag` is refreshed from the log and the read model.
    pub lag_interval: Duration,
    /// How often the catalog is asked whether a replay switched the active generation.
    pub generation_check: Duration,
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            group: "msghash-projector".into(),
            batch_size: 500,
            poll_wait: Duration::from_millis(200),
            lag_interval: Duration::from_secs(2),
            generation_check: Duration::from_millis(500),
        }
    }
}

/// Counters a running projection exposes. Each count also goes to the process's metrics
/// (`msghash_projector_events_applied_total`, `msghash_projector_dead_lettered_total`),
/// which add up every projection of the process.
#[derive(Debug, Default)]
pub struct ProjectorStats {
    pub applied_events: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Partitions held back at a poison record whose dead letter could not be written.
    held: std::sync::Mutex<std::collections::BTreeSet<u32>>,
}

impl ProjectorStats {
    /// Counts `n` events written to the read model.
    pub fn record_applied(&self, n: u64) {
        self.applied_events.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(names::PROJECTOR_EVENTS_APPLIED_TOTAL).increment(n);
    }

    /// Counts one record skipped because it does not decode (its dead letter is written).
    pub fn record_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::PROJECTOR_DEAD_LETTERED_TOTAL).increment(1);
    }

    /// After a batch over `seen` partitions: those in `held` are held back, the others of
    /// `seen` went on.
    pub fn set_held(
        &self,
        seen: impl Iterator<Item = u32>,
        held: &std::collections::BTreeMap<u32, i64>,
    ) {
        let mut set = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for partition in seen {
            if !held.contains_key(&partition) {
                set.remove(&partition);
            }
        }
        set.extend(held.keys().copied());
        metrics::gauge!(names::PROJECTOR_HELD_PARTITIONS).set(set.len() as f64);
    }

    /// The partitions held back now.
    pub fn held_partitions(&self) -> Vec<u32> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

/// What the `projector` service serves on its port: `/health/live`, `/health/ready` (the
/// log and the read model answer, and no partition is held back at a poison record whose
/// dead letter cannot be written), `/metrics`, observed like every other service.
pub fn app(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    stats: Arc<ProjectorStats>,
) -> Router {
    msghash_common::metrics::install();
    let answer = http::log_and_model_ready(log, model);
    let ready = move || {
        let (answer, stats) = (answer.clone(), stats.clone());
        async move { stats.held_partitions().is_empty() && answer().await }
    };
    http::service_app("projector", Router::new(), ready)
}

#[cfg(feature = "service")]
mod service;
#[cfg(feature = "service")]
pub use service::{print_status, run_replay, Application, Cli, Command, ReplayArgs};

#[cfg(test)]
mod tests {
    use super::*;
    use msghash_common::ports::LogRecord;
    use msghash_common::{Digest, MessageHashed};

    fn record(partition: u32, offset: i64, event: &MessageHashed) -> LogRecord {
        LogRecord {
            partition,
            offset,
            key: Some(event.key().to_vec()),
            value: Some(event.encode()),
        }
    }

    #[test]
    fn poison_records_are_counted_and_do_not_hold_back_their_partition() {
        let a = MessageHashed::new("a".into());
        let b = MessageHashed::new("b".into());
        let records = vec![
            record(0, 10, &a),
            LogRecord {
                partition: 0,
                offset: 11,
                key: Some(vec![1, 2, 3]),
                value: Some(b"garbage".to_vec()),
            },
            record(1, 5, &b),
        ];
        let (batch, poison) = build_batch(&records);
        assert_eq!(poison.len(), 1);
        assert_eq!(poison[0].0.offset, 11);
        assert_eq!(
            batch.messages,
            vec![
                (Digest::of("a"), "a".to_owned()),
                (Digest::of("b"), "b".to_owned())
            ]
        );
        assert_eq!(batch.applied, vec![(0, 11), (1, 5)]);
    }

    #[test]
    fn lag_counts_the_records_not_yet_applied() {
        assert_eq!(lag(0, None), 0, "empty partition");
        assert_eq!(lag(5, None), 5, "nothing applied");
        assert_eq!(lag(5, Some(4)), 0, "caught up");
        assert_eq!(lag(10, Some(6)), 3);
        assert_eq!(lag(3, Some(7)), 0, "never negative");
    }
}
