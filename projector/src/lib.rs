//! The projector: event log → read model.
//!
//! One loop, per consumer-group member: take a batch of records, decode them, write the
//! rows and then the applied offsets to the read model in one `apply`, and only then commit
//! the group's positions. A crash anywhere in between replays the batch, and replaying is
//! harmless: the same digest always carries the same message.
//!
//! A record that does not decode is poison: it is logged, counted and skipped (its offset
//! still counts as applied), so it can never block its partition.
//!
//! The `projector` service also serves `/health/live`, `/health/ready` (the log and the
//! read model answer) and `/metrics` over TLS ([`app`]); the projection refreshes
//! `msghash_projector_lag{partition}` every [`ProjectorSettings::lag_interval`].

use axum::Router;
use backon::{ExponentialBuilder, Retryable};
use msghash_common::generation::{group_for, LiveModel};
use msghash_common::http;
use msghash_common::metrics::names;
use msghash_common::ports::{LogRecord, Subscription};
use msghash_common::shutdown::Shutdown;
use msghash_common::{
    EventLog, Generation, MessageHashed, ModelGenerations, ProjectionBatch, ReadModel,
};
pub use replay::{Phase, Progress, ReplayReport, ReplaySettings};

pub mod replay;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

impl ProjectorStats {
    /// Counts `n` events written to the read model.
    pub fn record_applied(&self, n: u64) {
        self.applied_events.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(names::PROJECTOR_EVENTS_APPLIED_TOTAL).increment(n);
    }

    /// Counts one record skipped because it does not decode.
    pub fn record_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::PROJECTOR_DEAD_LETTERED_TOTAL).increment(1);
    }
}

/// Turns records into one batch, dead-lettering what does not decode.
pub fn build_batch<'r>(
    records: &'r [LogRecord],
    stats: &ProjectorStats,
) -> (ProjectionBatch, Vec<(&'r LogRecord, String)>) {
    let mut batch = ProjectionBatch::default();
    let mut poison = Vec::new();
    for r in records {
        match MessageHashed::decode(r.key.as_deref(), r.value.as_deref()) {
            Ok(event) => batch.push_event(r.partition, r.offset, event),
            Err(e) => {
                stats.record_dead_lettered();
                tracing::warn!(partition = r.partition, offset = r.offset, error = %e,
                    "dead-lettering an undecodable event");
                batch.advance(r.partition, r.offset);
                poison.push((r, e.to_string()));
            }
        }
    }
    (batch, poison)
}

/// The retry policy of the projection's writes: quick at first, then every 2 s, forever.
pub(crate) fn write_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(usize::MAX)
        .with_jitter()
}

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
    /// The next records to apply for `model`: polls, [`check`](Continuity::check)s, and
    /// [`audit`](Continuity::audit)s when nothing came. A failed poll is logged and counts
    /// as an empty batch (after a short pause), so the caller's loop goes round and checks
    /// for shutdown.
    pub(crate) async fn next_batch(
        &mut self,
        log: &dyn EventLog,
        model: &dyn ReadModel,
        subscription: &mut dyn Subscription,
        max: usize,
        wait: Duration,
    ) -> anyhow::Result<Vec<LogRecord>> {
        let records = match subscription.next_batch(max, wait).await {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "polling the log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                Vec::new()
            }
        };
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
        for partition in 0..log.partitions() {
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

/// Applied vs end offset of every partition, for `model`.
pub async fn partition_statuses(
    log: &dyn EventLog,
    model: &dyn ReadModel,
) -> anyhow::Result<Vec<PartitionStatus>> {
    let mut partitions = Vec::new();
    for partition in 0..log.partitions() {
        partitions.push(PartitionStatus {
            partition,
            applied: model.applied_offset(partition).await?,
            end: log.end_offset(partition).await?,
        });
    }
    Ok(partitions)
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
    let (batch, poison) = build_batch(records, stats);
    // Dead letters first: once the batch's offsets are applied, they are past them.
    for (record, reason) in &poison {
        let keep = (|| log.dead_letter(record, reason))
            .retry(backoff)
            .notify(|e, after| tracing::warn!(error = %e, ?after, "dead-letter failed; retrying"));
        tokio::select! {
            result = keep => result?,
            _ = shutdown.cancelled() => return Ok(false),
        }
    }
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
    metrics::histogram!(names::PROJECTOR_BATCH_DURATION_SECONDS)
        .record(started.elapsed().as_secs_f64());
    Ok(true)
}

/// Runs the projection until `shutdown` is cancelled. Transient failures of the log or the
/// read model are retried with backoff for as long as it takes: the projector never skips
/// an event it could not write.
///
/// It writes the active generation with that generation's consumer group
/// ([`group_for`]). When a replay makes a newer generation active, it finishes its batch,
/// leaves the old group, joins the new generation's group (which resumes where the replay
/// committed) and records the adoption in the catalog.
pub async fn run_projection(
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    settings: ProjectorSettings,
    stats: Arc<ProjectorStats>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Present (at 0) from the start, so rate() and alerts see the series.
    metrics::counter!(names::PROJECTOR_EVENTS_APPLIED_TOTAL).increment(0);
    metrics::counter!(names::PROJECTOR_DEAD_LETTERED_TOTAL).increment(0);
    let open = (|| LiveModel::open(generations.clone()))
        .retry(ExponentialBuilder::default().with_max_times(usize::MAX))
        .notify(|e, after| tracing::warn!(error = %e, ?after, "opening the read model failed; retrying"));
    let live = tokio::select! {
        live = open => live?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let _lag = AbortOnDrop(tokio::spawn(refresh_lag(
        log.clone(),
        live.clone(),
        settings.lag_interval,
        shutdown.clone(),
    )));
    loop {
        let (generation, model) = live.current();
        let adopt = (|| async {
            if generations.state().await?.adopted < generation {
                generations.adopt(generation).await?;
            }
            Ok::<_, msghash_common::ModelError>(())
        })
        .retry(write_backoff())
        .notify(
            |e, after| tracing::warn!(error = %e, ?after, "recording adoption failed; retrying"),
        );
        tokio::select! {
            result = adopt => result?,
            _ = shutdown.cancelled() => break,
        }
        let group = group_for(&settings.group, generation);
        let Some(mut subscription) = subscribe(log.as_ref(), &group, &shutdown).await? else {
            break;
        };
        tracing::info!(%group, generation, "projector subscribed");
        let mut continuity = Continuity::default();
        let mut checked = Instant::now();
        while !shutdown.is_cancelled() {
            if checked.elapsed() >= settings.generation_check {
                checked = Instant::now();
                match live.refresh().await {
                    Ok(now) if now != generation => break,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "could not read the active generation"),
                }
            }
            let records = continuity
                .next_batch(
                    log.as_ref(),
                    model.as_ref(),
                    subscription.as_mut(),
                    settings.batch_size,
                    settings.poll_wait,
                )
                .await?;
            if records.is_empty() {
                continue;
            }
            let done = project_batch(
                log.as_ref(),
                model.as_ref(),
                subscription.as_mut(),
                &records,
                &stats,
                &shutdown,
            )
            .await?;
            if !done {
                break;
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        tracing::info!(
            from = generation,
            to = live.current().0,
            "projector moves to the new generation"
        );
    }
    tracing::info!("projector stopped");
    Ok(())
}

/// Aborts the task when dropped, whichever way the projection ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records of a partition not yet applied: `end − 1 − applied` (the whole partition when
/// nothing is applied yet), never negative.
pub fn lag(end: msghash_common::Offset, applied: Option<msghash_common::Offset>) -> i64 {
    (end - 1 - applied.unwrap_or(-1)).max(0)
}

/// Sets `msghash_projector_lag{partition}` for every partition now, then every `interval`,
/// until `shutdown`. A partition whose offsets cannot be read keeps its last value.
async fn refresh_lag(
    log: Arc<dyn EventLog>,
    model: Arc<LiveModel>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for partition in 0..log.partitions() {
            let offsets = tokio::join!(log.end_offset(partition), model.applied_offset(partition));
            match offsets {
                (Ok(end), Ok(applied)) => {
                    metrics::gauge!(names::PROJECTOR_LAG, "partition" => partition.to_string())
                        .set(lag(end, applied) as f64);
                }
                (Err(e), _) => tracing::debug!(partition, error = %e, "lag: no end offset"),
                (_, Err(e)) => tracing::debug!(partition, error = %e, "lag: no applied offset"),
            }
        }
    }
}

async fn subscribe(
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

/// One partition's progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// Highest applied offset; `None` before the first.
    pub applied: Option<msghash_common::Offset>,
    /// The log's end offset (next offset to be written).
    pub end: msghash_common::Offset,
}

/// Which generation serves reads, how far it is behind the log, and how many events were
/// dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub active_generation: Generation,
    /// A generation a replay is building (or a stopped replay left).
    pub pending_generation: Option<Generation>,
    /// Every generation whose storage exists.
    pub generations: Vec<Generation>,
    /// The active generation's applied offsets.
    pub partitions: Vec<PartitionStatus>,
    pub dead_lettered: u64,
}

impl Status {
    /// Reads the status from any adapter pair.
    pub async fn read(
        log: &dyn EventLog,
        generations: &dyn ModelGenerations,
    ) -> anyhow::Result<Status> {
        let state = generations.state().await?;
        let model = generations.open(state.active).await?;
        let partitions = partition_statuses(log, model.as_ref()).await?;
        Ok(Status {
            active_generation: state.active,
            pending_generation: state.pending,
            generations: generations.list().await?,
            partitions,
            dead_lettered: log.dead_letter_count().await?,
        })
    }

    /// Events in the log that the read model does not have yet.
    pub fn total_lag(&self) -> i64 {
        self.partitions.iter().map(|p| lag(p.end, p.applied)).sum()
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "active generation: {}", self.active_generation)?;
        if let Some(pending) = self.pending_generation {
            writeln!(
                f,
                "pending generation: {pending} (a replay is building it, or stopped; \
                 `replay` resumes it)"
            )?;
        }
        let all: Vec<String> = self.generations.iter().map(|g| g.to_string()).collect();
        writeln!(f, "generations stored: {}", all.join(", "))?;
        writeln!(
            f,
            "{:>9}  {:>12}  {:>12}  {:>8}",
            "partition", "applied", "end", "lag"
        )?;
        for p in &self.partitions {
            let applied = p.applied.map_or_else(|| "-".to_owned(), |a| a.to_string());
            writeln!(
                f,
                "{:>9}  {:>12}  {:>12}  {:>8}",
                p.partition,
                applied,
                p.end,
                lag(p.end, p.applied)
            )?;
        }
        writeln!(f, "total lag: {}", self.total_lag())?;
        write!(f, "dead-lettered events: {}", self.dead_lettered)
    }
}

/// What the `projector` service serves on its port: `/health/live`, `/health/ready` (the
/// log and the read model answer), `/metrics`, observed like every other service.
pub fn app(log: Arc<dyn EventLog>, model: Arc<dyn ReadModel>) -> Router {
    msghash_common::metrics::install();
    http::service_app(
        "projector",
        Router::new(),
        http::log_and_model_ready(log, model),
    )
}

#[cfg(feature = "service")]
mod service;
#[cfg(feature = "service")]
pub use service::{print_status, run_replay, Application, Cli, Command, ReplayArgs};

#[cfg(test)]
mod tests {
    use super::*;
    use msghash_common::Digest;

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
        let stats = ProjectorStats::default();
        let (batch, poison) = build_batch(&records, &stats);
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
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
