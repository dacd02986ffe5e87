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

const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(50);

impl ReadBarrier {
    pub fn new(log: Arc<dyn EventLog>, model: Arc<dyn ReadModel>, timeout: Duration) -> Self {
        let partitions = log.partitions();
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
    pub async fn wait(&self, partition: u32, began: Instant) -> Result<(), BarrierError> {
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
