//! The projector: event log → read model.
//!
//! One loop, per consumer-group member: take a batch of records, decode them, write the
//! rows and then the applied offsets to the read model in one `apply`, and only then commit
//! the group's positions. A crash anywhere in between replays the batch, and replaying is
//! harmless: the same digest always carries the same message.
//!
//! A record that does not decode is poison: it is logged, counted and skipped (its offset
//! still counts as applied), so it can never block its partition.

use backon::{ExponentialBuilder, Retryable};
use clap::Parser;
use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::adapters::scylla::ScyllaModel;
use msghash_common::config::{KafkaArgs, LogArgs, ScyllaArgs};
use msghash_common::ports::{LogRecord, Subscription};
use msghash_common::shutdown::Shutdown;
use msghash_common::{EventLog, MessageHashed, ProjectionBatch, ReadModel};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Settings of the projection loop.
#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    /// Consumer group; a new name replays the log from offset 0.
    pub group: String,
    /// Most records applied in one step.
    pub batch_size: usize,
    /// How long one poll waits for the first record (also how often shutdown is checked).
    pub poll_wait: Duration,
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            group: "msghash-projector".into(),
            batch_size: 500,
            poll_wait: Duration::from_millis(200),
        }
    }
}

/// Counters a running projection exposes.
#[derive(Debug, Default)]
pub struct ProjectorStats {
    pub applied_events: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// Turns records into one batch, dead-lettering what does not decode.
pub fn build_batch(records: &[LogRecord], stats: &ProjectorStats) -> ProjectionBatch {
    let mut batch = ProjectionBatch::default();
    for r in records {
        match MessageHashed::decode(r.key.as_deref(), r.value.as_deref()) {
            Ok(event) => batch.push_event(r.partition, r.offset, event),
            Err(e) => {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition = r.partition, offset = r.offset, error = %e,
                    "dead-lettered an undecodable event");
                batch.advance(r.partition, r.offset);
            }
        }
    }
    batch
}

/// Runs the projection until `shutdown` is cancelled. Transient failures of the log or the
/// read model are retried with backoff for as long as it takes: the projector never skips
/// an event it could not write.
pub async fn run_projection(
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    settings: ProjectorSettings,
    stats: Arc<ProjectorStats>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut subscription = subscribe(log.as_ref(), &settings.group, &shutdown).await?;
    let Some(subscription) = subscription.as_mut() else {
        return Ok(());
    };
    tracing::info!(group = %settings.group, "projector subscribed");
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(usize::MAX)
        .with_jitter();
    while !shutdown.is_cancelled() {
        let records = match subscription
            .next_batch(settings.batch_size, settings.poll_wait)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "polling the log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        let batch = build_batch(&records, &stats);
        let apply = (|| model.apply(&batch))
            .retry(backoff)
            .notify(|e, after| tracing::warn!(error = %e, ?after, "apply failed; retrying"));
        tokio::select! {
            result = apply => result?,
            _ = shutdown.cancelled() => break,
        }
        stats
            .applied_events
            .fetch_add(batch.messages.len() as u64, Ordering::Relaxed);
        if let Err(e) = subscription.commit(&batch.applied).await {
            // Not fatal: the rows and offsets are written; a restart replays the batch.
            tracing::warn!(error = %e, "committing consumer offsets failed");
        }
    }
    tracing::info!("projector stopped");
    Ok(())
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

/// `projector`: the projection as its own service.
#[derive(Parser, Debug)]
#[command(
    name = "projector",
    version,
    about = "msghash projector: event log -> read model"
)]
pub struct Cli {
    /// Consumer group of the projectors (all replicas share it).
    #[arg(
        long,
        env = "MSGHASH_CONSUMER_GROUP",
        default_value = "msghash-projector"
    )]
    pub group: String,
    /// Most events applied in one step.
    #[arg(long, env = "MSGHASH_BATCH_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: Shutdown) -> anyhow::Result<()> {
    let log: Arc<dyn EventLog> = Arc::new(KafkaLog::connect(cli.kafka.settings()).await?);
    let model: Arc<dyn ReadModel> = Arc::new(ScyllaModel::connect(&cli.scylla.settings()).await?);
    let settings = ProjectorSettings {
        group: cli.group,
        batch_size: usize::try_from(cli.batch_size)?,
        ..ProjectorSettings::default()
    };
    run_projection(log, model, settings, Arc::default(), shutdown).await
}

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
        let batch = build_batch(&records, &stats);
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
        assert_eq!(
            batch.messages,
            vec![
                (Digest::of("a"), "a".to_owned()),
                (Digest::of("b"), "b".to_owned())
            ]
        );
        assert_eq!(batch.applied, vec![(0, 11), (1, 5)]);
    }
}
