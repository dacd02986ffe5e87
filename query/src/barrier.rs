//! Read-your-writes on a miss.
//!
//! A GET that misses cannot tell "never written" from "written, not projected yet". So it
//! reads the end offset of the digest's partition from the log — a read that starts after
//! the GET began covers every POST that got its 201 before — and waits until the read
//! model's applied offset for that partition reaches it. Then a second miss is the truth as
//! of the moment the GET began. If the projector does not catch up within the bound, the
//! caller answers 503, never a 404 that might be a lie.
//!
//! Many GETs miss at once under load, so both reads are coalesced per partition: a caller
//! reuses any read that *started* after the moment it needs, and at most one read per
//! partition is in flight. Hits never come here.

use msghash_common::metrics::names::QUERY_BARRIER_WAITS_TOTAL;
use msghash_common::{EventLog, Offset, ReadModel};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("projector is behind: applied {applied:?}, log end {end}")]
    Behind {
        applied: Option<Offset>,
        end: Offset,
    },
    #[error("{0}")]
    Dependency(String),
}

/// Per partition, the last value read and when that read started.
struct Fresh<T> {
    slots: Vec<Mutex<Option<(Instant, T)>>>,
}

impl<T: Clone> Fresh<T> {
    fn new(partitions: u32) -> Self {
        Fresh {
            slots: (0..partitions).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// A value read by a call that started no earlier than `since`.
    async fn get<F, Fut, E>(&self, slot: u32, since: Instant, read: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(slot) = self.slots.get(slot as usize) else {
            return read().await;
        };
        let mut cached = slot.lock().await;
        if let Some((started, value)) = cached.as_ref() {
            if *started >= since {
                return Ok(value.clone());
            }
        }
        let started = Instant::now();
        let value = read().await?;
        *cached = Some((started, value.clone()));
        Ok(value)
    }
}

pub struct ReadBarrier {
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    timeout: Duration,
    ends: Fresh<Offset>,
    applied: Fresh<Option<Offset>>,
}

/// The `outcome` label values of `msghash_query_barrier_waits_total`.
pub const CAUGHT_UP: &str = "caught_up";
pub const BEHIND: &str = "behind";
pub const ERROR: &str = "error";
const OUTCOMES: [&str; 3] = [CAUGHT_UP, BEHIND, ERROR];

const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(50);

impl ReadBarrier {
    pub fn new(log: Arc<dyn EventLog>, model: Arc<dyn ReadModel>, timeout: Duration) -> Self {
        let partitions = log.partitions().get();
        // Every outcome present (at 0) from the start, so rate() and alerts see them.
        for outcome in OUTCOMES {
            metrics::counter!(QUERY_BARRIER_WAITS_TOTAL, "outcome" => outcome).increment(0);
        }
        ReadBarrier {
            log,
            model,
            timeout,
            ends: Fresh::new(partitions),
            applied: Fresh::new(partitions),
        }
    }

    /// Returns once every event appended to `partition` before `began` is applied, or
    /// fails when that does not happen within the timeout (counted from `began`).
    ///
    /// Each wait counts once in `msghash_query_barrier_waits_total{outcome}`.
    pub async fn wait(&self, partition: u32, began: Instant) -> Result<(), BarrierError> {
        let result = self.wait_uncounted(partition, began).await;
        let outcome = match &result {
            Ok(()) => CAUGHT_UP,
            Err(BarrierError::Behind { .. }) => BEHIND,
            Err(BarrierError::Dependency(_)) => ERROR,
        };
        metrics::counter!(QUERY_BARRIER_WAITS_TOTAL, "outcome" => outcome).increment(1);
        result
    }

    async fn wait_uncounted(&self, partition: u32, began: Instant) -> Result<(), BarrierError> {
        let deadline = began + self.timeout;
        let end = self
            .ends
            .get(partition, began, || self.log.end_offset(partition))
            .await
            .map_err(|e| BarrierError::Dependency(e.to_string()))?;
        if end <= 0 {
            return Ok(());
        }
        let mut pause = FIRST_POLL;
        loop {
            let probe = Instant::now();
            let applied = self
                .applied
                .get(partition, probe, || self.model.applied_offset(partition))
                .await
                .map_err(|e| BarrierError::Dependency(e.to_string()))?;
            if applied.is_some_and(|a| a + 1 >= end) {
                return Ok(());
            }
            if Instant::now() + pause > deadline {
                return Err(BarrierError::Behind { applied, end });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use msghash_common::metrics::install;
    use msghash_common::ports::{LogRecord, Subscription};
    use msghash_common::{LogError, MessageHashed};
    use msghash_testkit::exposition;

    /// A log whose partition 0 ends at `end` (or fails when `end` is `None`).
    struct Log {
        end: Option<Offset>,
    }

    #[async_trait]
    impl EventLog for Log {
        fn partitions(&self) -> std::num::NonZeroU32 {
            std::num::NonZeroU32::MIN
        }
        async fn append(&self, _: u32, _: &MessageHashed) -> Result<Offset, LogError> {
            Err(LogError::Rejected("read-only".into()))
        }
        async fn end_offset(&self, _: u32) -> Result<Offset, LogError> {
            self.end
                .ok_or_else(|| LogError::Unavailable("broker down".into()))
        }
        async fn dead_letter(&self, _: &LogRecord, _: &str) -> Result<(), LogError> {
            Err(LogError::Rejected("read-only".into()))
        }
        async fn dead_letter_count(&self) -> Result<u64, LogError> {
            Ok(0)
        }
        async fn subscribe(&self, _: &str) -> Result<Box<dyn Subscription>, LogError> {
            Err(LogError::Rejected("read-only".into()))
        }
    }

    fn counts() -> [f64; 3] {
        let e = exposition::parse(&install().render()).expect("exposition");
        OUTCOMES.map(|o| e.sum(QUERY_BARRIER_WAITS_TOTAL, &[("outcome", o)]))
    }

    #[tokio::test]
    async fn every_wait_counts_once_under_its_outcome() {
        install();
        let barrier = |end| {
            ReadBarrier::new(
                Arc::new(Log { end }),
                Arc::new(msghash_testkit::fakes::OffsetsOnly::default()),
                Duration::from_millis(20),
            )
        };
        let before = counts();
        assert!(barrier(Some(0)).wait(0, Instant::now()).await.is_ok());
        assert!(matches!(
            barrier(Some(3)).wait(0, Instant::now()).await,
            Err(BarrierError::Behind { .. })
        ));
        assert!(matches!(
            barrier(None).wait(0, Instant::now()).await,
            Err(BarrierError::Dependency(_))
        ));
        let after = counts();
        for i in 0..3 {
            assert!(after[i] >= before[i] + 1.0, "{}", OUTCOMES[i]);
        }
    }
}
