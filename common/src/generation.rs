//! The read-model handle readers hold: [`LiveModel`] delegates to the active generation and
//! moves to a new one as soon as the catalog says it is active.
//!
//! A switch is one write of `active` in the catalog ([`ModelGenerations::activate`]); every
//! reader polls the catalog ([`LiveModel::follow`]) and swaps its handle between two calls,
//! never inside one. Generations only move forward, so a handle never goes back.

use crate::ports::{Generation, ModelError, ModelGenerations, Offset, ProjectionBatch, ReadModel};
use crate::shutdown::{Shutdown, Ticker};
use crate::Digest;
use async_trait::async_trait;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often readers ask the catalog for the active generation by default.
pub const DEFAULT_FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// A [`ReadModel`] that reads whichever generation is active.
pub struct LiveModel {
    generations: Arc<dyn ModelGenerations>,
    current: RwLock<(Generation, Arc<dyn ReadModel>)>,
}

impl LiveModel {
    /// Opens the active generation.
    pub async fn open(generations: Arc<dyn ModelGenerations>) -> Result<Arc<Self>, ModelError> {
        let active = generations.state().await?.active;
        let model = generations.open(active).await?;
        Ok(Arc::new(LiveModel {
            generations,
            current: RwLock::new((active, model)),
        }))
    }

    /// The generation and model calls go to now.
    pub fn current(&self) -> (Generation, Arc<dyn ReadModel>) {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Asks the catalog and moves to its active generation if that is newer. Returns the
    /// generation now in use.
    pub async fn refresh(&self) -> Result<Generation, ModelError> {
        let active = self.generations.state().await?.active;
        let (now, _) = self.current();
        if active <= now {
            return Ok(now);
        }
        let model = self.generations.open(active).await?;
        let mut guard = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if active > guard.0 {
            tracing::info!(from = guard.0, to = active, "readers switched generation");
            *guard = (active, model);
        }
        Ok(guard.0)
    }

    /// Refreshes every `interval` until `shutdown`; a failed refresh keeps the current
    /// generation and tries again at the next tick.
    pub fn follow(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let live = self.clone();
        tokio::spawn(async move {
            let mut ticker = Ticker::new(interval, shutdown);
            while ticker.tick().await {
                if let Err(e) = live.refresh().await {
                    tracing::debug!(error = %e, "could not read the active generation");
                }
            }
        })
    }

    fn model(&self) -> Arc<dyn ReadModel> {
        self.current().1
    }
}

#[async_trait]
impl ReadModel for LiveModel {
    async fn apply(&self, batch: &ProjectionBatch) -> Result<(), ModelError> {
        self.model().apply(batch).await
    }

    async fn sync(&self) -> Result<(), ModelError> {
        self.model().sync().await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<String>, ModelError> {
        self.model().get(digest).await
    }

    async fn applied_offset(&self, partition: u32) -> Result<Option<Offset>, ModelError> {
        self.model().applied_offset(partition).await
    }

    async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<Digest>, ModelError> {
        self.model().list(after, limit).await
    }

    fn generation(&self) -> Generation {
        self.current().0
    }
}

/// The consumer group that builds `generation`: `base` itself for generation 0 (so a store
/// from before generations keeps its positions), `<base>-g<N>` after that.
pub fn group_for(base: &str, generation: Generation) -> String {
    if generation == 0 {
        base.to_owned()
    } else {
        format!("{base}-g{generation}")
    }
}

#[cfg(test)]
mod tests {
    use super::group_for;

    #[test]
    fn each_generation_has_its_own_consumer_group() {
        assert_eq!(group_for("msghash-projector", 0), "msghash-projector");
        assert_eq!(group_for("msghash-projector", 3), "msghash-projector-g3");
    }
}
