//! Replay: rebuild the read model from offset 0 of every partition into a new generation
//! while the active one keeps serving, then switch readers to it.
//!
//! 1. The target is the pending generation a killed replay left (resumed from its consumer
//!    group's committed positions), or a new one above every existing generation. It is
//!    recorded as pending; the active generation is not touched.
//! 2. The target's consumer group (`<group>-g<N>`, new, so it starts at offset 0) projects
//!    the log into the target's storage with the same batch step as the live projector.
//! 3. Once the target's lag is at most one batch, the target becomes active: one catalog
//!    write. Readers move on their next poll; a read of a message the target has not
//!    applied yet waits at the read-your-writes barrier like any other.
//! 4. The replay keeps projecting until a live projector records that it has adopted the
//!    target (it joins the same group, so nothing is skipped), or the hand-over timeout
//!    has passed and the target has caught up with the log (no live projector running:
//!    the next one to start adopts it).
//! 5. With `drop_old`, every older generation is deleted, at least `drop_grace` after the
//!    switch so that no reader still uses one.

use crate::status::{lag, partition_statuses, PartitionStatus};
use crate::step::{project_batch, subscribe, Reader};
use crate::ProjectorStats;
use msghash_common::generation::group_for;
use msghash_common::shutdown::Shutdown;
use msghash_common::{EventLog, Generation, ModelGenerations, ReadModel};
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Most events the new generation may lack when readers switch to it (see `switch_lag`).
pub const SWITCH_LAG_MAX: usize = 1_000;

/// Settings of one replay.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    /// The projectors' base consumer group; the replay uses `<group>-g<N>`.
    pub group: String,
    pub batch_size: usize,
    pub poll_wait: Duration,
    /// How often progress is reported.
    pub progress_interval: Duration,
    /// How long, after the switch, the replay waits for a live projector to adopt the new
    /// generation while it keeps projecting itself.
    pub handover_timeout: Duration,
    /// Delete every older generation after the switch.
    pub drop_old: bool,
    /// With `drop_old`, how long after the switch the old generations are kept at least,
    /// so that every reader (query polls the catalog every 500 ms) has moved off them.
    pub drop_grace: Duration,
    /// Most events a second the replay projects while readers are on the old generation
    /// (after a first second's worth at once), so that it leaves the read model's store and
    /// the log to the live paths; `None`: as fast as they go. Batches are at most this many
    /// events. After the switch it goes as fast as it can: the new generation must keep up
    /// with the writes. A rate below the write rate never catches up to switch.
    pub max_rate: Option<NonZeroU32>,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        ReplaySettings {
            group: "msghash-projector".into(),
            batch_size: 500,
            poll_wait: Duration::from_millis(200),
            progress_interval: Duration::from_secs(1),
            handover_timeout: Duration::from_secs(30),
            drop_old: false,
            drop_grace: Duration::from_secs(5),
            max_rate: None,
        }
    }
}

/// Where a replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Projecting into the new generation; readers are on the old one.
    Building,
    /// Readers are on the new generation; waiting for a live projector to take over.
    Switched,
}

/// One progress report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub generation: Generation,
    pub phase: Phase,
    /// Events this run wrote to the new generation.
    pub applied: u64,
    pub elapsed_secs: f64,
    pub partitions: Vec<PartitionStatus>,
}

impl Progress {
    /// Events per second over the whole run.
    pub fn rate(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.applied as f64 / self.elapsed_secs
        } else {
            0.0
        }
    }

    /// Events in the log the new generation does not have yet.
    pub fn total_lag(&self) -> i64 {
        self.partitions.iter().map(|p| lag(p.end, p.applied)).sum()
    }

    /// Time left at the current rate, when there is a rate.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0).then(|| Duration::from_secs_f64(self.total_lag() as f64 / rate))
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match self.phase {
            Phase::Building => "building",
            Phase::Switched => "switched, handing over",
        };
        write!(
            f,
            "generation {} {phase}: {} events applied, {:.0} events/s, lag {}",
            self.generation,
            self.applied,
            self.rate(),
            self.total_lag()
        )?;
        let lags: Vec<String> = self
            .partitions
            .iter()
            .map(|p| format!("p{}={}", p.partition, lag(p.end, p.applied)))
            .collect();
        write!(f, " [{}]", lags.join(" "))?;
        match self.eta() {
            Some(eta) => write!(f, ", ETA {:.1}s", eta.as_secs_f64()),
            None => write!(f, ", ETA -"),
        }
    }
}

/// What a finished replay did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplayReport {
    pub generation: Generation,
    /// Whether it went on from a pending generation a stopped replay left.
    pub resumed: bool,
    pub applied: u64,
    pub dead_lettered: u64,
    pub elapsed_secs: f64,
    /// Whether a live projector adopted the generation before the replay stopped.
    pub adopted: bool,
    pub dropped: Vec<Generation>,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = if self.elapsed_secs > 0.0 {
            self.applied as f64 / self.elapsed_secs
        } else {
            0.0
        };
        write!(
            f,
            "applied {} events in {:.1}s ({rate:.0} events/s); readers are on generation {}",
            self.applied, self.elapsed_secs, self.generation
        )?;
        if self.dead_lettered > 0 {
            write!(f, "; {} events dead-lettered", self.dead_lettered)?;
        }
        if !self.dropped.is_empty() {
            let dropped: Vec<String> = self.dropped.iter().map(|g| g.to_string()).collect();
            write!(f, "; dropped generation {}", dropped.join(", "))?;
        }
        Ok(())
    }
}

async fn progress_of(
    log: &dyn EventLog,
    model: &dyn ReadModel,
    generation: Generation,
    phase: Phase,
    applied: u64,
    started: Instant,
) -> anyhow::Result<Progress> {
    let partitions = partition_statuses(log, model).await?;
    Ok(Progress {
        generation,
        phase,
        applied,
        elapsed_secs: started.elapsed().as_secs_f64(),
        partitions,
    })
}

/// The generation a replay builds: the pending one if a replay stopped half-way, else one
/// above every generation that exists. Returns it and whether it is resumed.
pub async fn target_generation(
    generations: &dyn ModelGenerations,
) -> anyhow::Result<(Generation, bool)> {
    let state = generations.state().await?;
    if let Some(pending) = state.pending {
        return Ok((pending, true));
    }
    let highest = generations
        .list()
        .await?
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(state.active);
    Ok((highest + 1, false))
}

/// Runs one replay to the end (see the module documentation). Returns `None` when
/// `shutdown` stopped it; the pending generation is then resumed by the next replay.
pub async fn replay(
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    settings: ReplaySettings,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
    shutdown: Shutdown,
) -> anyhow::Result<Option<ReplayReport>> {
    let started = Instant::now();
    let (target, resumed) = target_generation(generations.as_ref()).await?;
    generations.begin(target).await?;
    let model = generations.open(target).await?;
    let group = group_for(&settings.group, target);
    tracing::info!(generation = target, %group, resumed, "replay started");
    let Some(subscription) = subscribe(log.as_ref(), &group, &shutdown).await? else {
        return Ok(None);
    };
    let batch_size = match settings.max_rate {
        Some(rate) => settings.batch_size.min(rate.get() as usize),
        None => settings.batch_size,
    };
    // With a max rate, a bucket of `rate` events, full at the start; batches are at most
    // that many (above), so one batch never needs more than the bucket holds.
    let limiter = settings.max_rate.map(|rate| {
        let bucket = governor::RateLimiter::direct(governor::Quota::per_second(rate));
        (bucket, rate)
    });
    let mut reader = Reader::new(subscription, batch_size, settings.poll_wait);
    let stats = ProjectorStats::default();
    let mut phase = Phase::Building;
    let mut switched_at = None;
    let mut adopted = false;
    let mut last_report = Instant::now();
    // Switch once the target is this close to the end of the log: at most one batch (with
    // a max rate, at most a second's worth), and never more than SWITCH_LAG_MAX events, so
    // a large batch size (the standalone's) does not leave readers waiting for the newest
    // messages after the switch.
    let switch_lag = i64::try_from(batch_size.min(SWITCH_LAG_MAX)).unwrap_or(i64::MAX);
    while !shutdown.is_cancelled() {
        let records = reader.read(log.as_ref(), model.as_ref()).await?;
        let idle = records.is_empty();
        // Held to the rate only while readers are on the old generation: after the switch,
        // the replay is what keeps the new one up with the writes until a projector adopts it.
        if let (Phase::Building, Some((bucket, rate)), Some(n)) = (
            phase,
            &limiter,
            NonZeroU32::new(u32::try_from(records.len()).unwrap_or(u32::MAX)),
        ) {
            debug_assert!(n <= *rate, "a batch of {n} above the rate {rate}");
            tokio::select! {
                ready = bucket.until_n_ready(n.min(*rate)) => {
                    if let Err(e) = ready {
                        tracing::warn!(error = %e, "the replay's rate bucket refused a batch");
                    }
                }
                () = shutdown.cancelled() => break,
            }
        }
        if !idle
            && !project_batch(
                log.as_ref(),
                model.as_ref(),
                reader.subscription(),
                &records,
                &stats,
                &shutdown,
            )
            .await?
        {
            return Ok(None);
        }
        if !idle && last_report.elapsed() < settings.progress_interval {
            continue;
        }
        last_report = Instant::now();
        let progress = match progress_of(
            log.as_ref(),
            model.as_ref(),
            target,
            phase,
            stats.applied_events.load(Ordering::Relaxed),
            started,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read replay progress");
                continue;
            }
        };
        on_progress(&progress);
        match phase {
            Phase::Building if progress.total_lag() <= switch_lag => {
                generations.activate(target).await?;
                tracing::info!(
                    generation = target,
                    "readers switched to the new generation"
                );
                phase = Phase::Switched;
                switched_at = Some(Instant::now());
            }
            Phase::Building => {}
            Phase::Switched => {
                if generations.state().await?.adopted >= target {
                    adopted = true;
                    break;
                }
                // Without a live projector, leave the generation caught up at least.
                if progress.total_lag() == 0
                    && switched_at.is_some_and(|t| t.elapsed() >= settings.handover_timeout)
                {
                    tracing::warn!(
                        generation = target,
                        "no live projector adopted the new generation in time; the next one \
                         to start continues it from the replay's committed positions"
                    );
                    break;
                }
            }
        }
    }
    crate::step::sync_at_stop(model.as_ref(), target).await;
    if phase == Phase::Building {
        return Ok(None);
    }
    drop(reader);
    let mut dropped = Vec::new();
    if settings.drop_old {
        if let Some(wait) = switched_at.and_then(|t| settings.drop_grace.checked_sub(t.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        for generation in generations.list().await? {
            if generation < target {
                generations.drop_generation(generation).await?;
                dropped.push(generation);
            }
        }
    }
    Ok(Some(ReplayReport {
        generation: target,
        resumed,
        applied: stats.applied_events.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
        elapsed_secs: started.elapsed().as_secs_f64(),
        adopted,
        dropped,
    }))
}

/// Prints replay progress on stderr: on a terminal one status line rewritten in place,
/// elsewhere (a log file, a pipe) one line per report.
pub struct ProgressPrinter {
    terminal: bool,
    pending_newline: bool,
}

impl ProgressPrinter {
    pub fn stderr() -> Self {
        use std::io::IsTerminal;
        ProgressPrinter {
            terminal: std::io::stderr().is_terminal(),
            pending_newline: false,
        }
    }

    pub fn show(&mut self, progress: &Progress) {
        if self.terminal {
            // Carriage return, then erase the line: the new report replaces the old one.
            msghash_common::console::err_partial(format_args!("\r\x1b[2K{progress}"));
            self.pending_newline = true;
        } else {
            msghash_common::console::err(format_args!("{progress}"));
        }
    }

    /// Ends the status line, so what follows starts on a line of its own.
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.pending_newline) {
            msghash_common::console::err(format_args!(""));
        }
    }
}
