//! The live projection: [`run_projection`] reads the log, guards and applies each batch to
//! the active generation, follows a replay's switch to a new one, and keeps
//! `msghash_projector_lag` fresh.

use crate::status::lag;
use crate::step::{project_batch, subscribe, write_backoff, Reader};
use crate::{ProjectorSettings, ProjectorStats};
use backon::{ExponentialBuilder, Retryable};
use msghash_common::generation::{group_for, LiveModel};
use msghash_common::metrics::names;
use msghash_common::shutdown::{Shutdown, Ticker};
use msghash_common::{EventLog, Generation, ModelGenerations, ReadModel};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

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
    metrics::gauge!(names::PROJECTOR_HELD_PARTITIONS).set(0.0);
    let open = (|| LiveModel::open(generations.clone()))
        .retry(ExponentialBuilder::default().with_max_times(usize::MAX))
        .notify(|e, after| tracing::warn!(error = %e, ?after, "opening the read model failed; retrying"));
    let live = tokio::select! {
        live = open => live?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let _lag = AbortOnDropHandle::new(tokio::spawn(refresh_lag(
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
        // This generation's turn ends at shutdown or at a switch to another generation,
        // also while a write is being retried that can no longer succeed (to a generation
        // `replay --drop-old` dropped): the batch is left uncommitted and the new
        // generation's group projects it.
        let turn = shutdown.child_token();
        let _watch = AbortOnDropHandle::new(tokio::spawn(watch_switch(
            live.clone(),
            generation,
            settings.generation_check,
            turn.clone(),
        )));
        let group = group_for(&settings.group, generation);
        let Some(subscription) = subscribe(log.as_ref(), &group, &turn).await? else {
            continue;
        };
        tracing::info!(%group, generation, "projector subscribed");
        let mut reader = Reader::new(subscription, settings.batch_size, settings.poll_wait);
        while !turn.is_cancelled() {
            let records = tokio::select! {
                records = reader.read(log.as_ref(), model.as_ref()) => records?,
                _ = turn.cancelled() => break,
            };
            if records.is_empty() {
                continue;
            }
            let done = project_batch(
                log.as_ref(),
                model.as_ref(),
                reader.subscription(),
                &records,
                &stats,
                &turn,
            )
            .await?;
            if !done {
                break;
            }
        }
        crate::step::sync_at_stop(model.as_ref(), generation).await;
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

/// Cancels `turn` once the active generation is no longer `generation` (checked every
/// `every`).
async fn watch_switch(
    live: Arc<LiveModel>,
    generation: Generation,
    every: Duration,
    turn: Shutdown,
) {
    let mut ticker = Ticker::new(every, turn.clone());
    while ticker.tick().await {
        match live.refresh().await {
            Ok(now) if now != generation => {
                turn.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "could not read the active generation"),
        }
    }
}

/// Sets `msghash_projector_lag{partition}` for every partition now, then every `interval`,
/// until `shutdown`. A partition whose offsets cannot be read keeps its last value.
async fn refresh_lag(
    log: Arc<dyn EventLog>,
    model: Arc<LiveModel>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut ticker = Ticker::new(interval, shutdown);
    while ticker.tick().await {
        for partition in 0..log.partitions().get() {
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
