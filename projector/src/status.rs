//! [`Status`]: which generation serves reads, how far each partition is behind the log,
//! how many events were dead-lettered (`projector status`, `msghash status`).

use msghash_common::{EventLog, Generation, ModelGenerations, ReadModel};

/// Records of a partition not yet applied: `end − 1 − applied` (the whole partition when
/// nothing is applied yet), never negative.
pub fn lag(end: msghash_common::Offset, applied: Option<msghash_common::Offset>) -> i64 {
    (end - 1 - applied.unwrap_or(-1)).max(0)
}

/// Applied vs end offset of every partition, for `model`.
pub async fn partition_statuses(
    log: &dyn EventLog,
    model: &dyn ReadModel,
) -> anyhow::Result<Vec<PartitionStatus>> {
    let mut partitions = Vec::new();
    for partition in 0..log.partitions().get() {
        partitions.push(PartitionStatus {
            partition,
            applied: model.applied_offset(partition).await?,
            end: log.end_offset(partition).await?,
        });
    }
    Ok(partitions)
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
