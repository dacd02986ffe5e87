//! Read-your-writes on a miss.
//!
//! A GET that misses cannot tell "never written" from "written, not projected yet". So it
//! reads the end offset of the digest's partition from the log — a read that starts after
//! the GET began covers every POST that got its 201 before — and waits until the read
//! model's applied offset for that partition reaches it. Then a second miss is the truth as
//! of the moment the GET began. If the projector does not catch up within the bound, the
//! caller answers 503, never a 404 that might be a lie.
//!
//! **Deadline.** The whole wait is bounded by the GET's deadline (`MSGHASH_RYW_TIMEOUT_MS`
//! from when it began): every read the barrier makes, of the log's end offset and of the
//! model's applied offset, is abandoned at the deadline, so a broker or read model that
//! hangs costs a GET its deadline and no more (the caller then answers 503 with
//! `Retry-After`). Each read itself is also bounded by the timeout from when it started, so
//! one that never answers cannot hold up the reads queued behind it for longer.
//!
//! **Shared reads.** Many GETs miss at once under load, so both reads are shared per
//! partition through [`Reads`]: a caller joins the read in flight if it started no earlier
//! than the moment the caller needs, else the one read queued behind it (which starts when
//! the one in flight ends), and takes its outcome, success or failure. So at most one read
//! per partition runs, one more waits, and a failure reaches every caller of that read at
//! once; a caller that comes after a failure starts a new read. A caller whose deadline
//! comes first stops waiting; the read goes on for the others. Hits never come here.

use futures::future::{BoxFuture, FutureExt, Shared};
use msghash_common::metrics::names::QUERY_BARRIER_WAITS_TOTAL;
use msghash_common::{EventLog, Offset, ReadModel};
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
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

/// The outcome of one read, for every caller that waits on it (an error as its text).
type Outcome<T> = Shared<BoxFuture<'static, Result<T, String>>>;

/// One read of a value, shared by the callers that can use it.
struct Read<T> {
    /// When the read itself started; unset while it waits for the read before it.
    started: Arc<OnceLock<Instant>>,
    outcome: Outcome<T>,
}

/// Per partition, the latest read of one value: in flight, queued, or done.
struct Reads<T> {
    latest: Vec<Mutex<Option<Read<T>>>>,
    /// The most a read may take (from when it starts). No caller can use a later answer:
    /// every caller of a read needed it since a moment no later than its start, and gives
    /// up this long after that moment.
    bound: Duration,
}

impl<T: Clone + Send + Sync + 'static> Reads<T> {
    fn new(partitions: u32, bound: Duration) -> Self {
        Reads {
            latest: (0..partitions).map(|_| Mutex::new(None)).collect(),
            bound,
        }
    }

    /// The outcome of a read of `partition` that starts no earlier than `since`: the
    /// partition's latest read if it qualifies (not started yet, or started since `since`,
    /// and not failed), else a new one (`read`), queued behind the latest.
    fn since<F, Fut>(&self, partition: u32, since: Instant, read: F) -> Outcome<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let Some(latest) = self.latest.get(partition as usize) else {
            return self.start(None, read).outcome;
        };
        let mut latest = latest.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = latest.as_ref() {
            let recent = current
                .started
                .get()
                .is_none_or(|started| *started >= since);
            let failed = matches!(current.outcome.peek(), Some(Err(_)));
            if recent && !failed {
                return current.outcome.clone();
            }
        }
        let next = self.start(latest.take().map(|before| before.outcome), read);
        let outcome = next.outcome.clone();
        *latest = Some(next);
        outcome
    }

    /// A read that starts once `before` has ended, in a task of its own: it goes on when
    /// every caller stopped waiting, and a panic in it is a failure, not a poisoned outcome.
    fn start<F, Fut>(&self, before: Option<Outcome<T>>, read: F) -> Read<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let started = Arc::new(OnceLock::new());
        let mark = started.clone();
        let bound = self.bound;
        let task = tokio::spawn(async move {
            if let Some(before) = before {
                // Its outcome is its own callers'; this read only waits for it to end.
                let _ = before.await;
            }
            let _ = mark.set(Instant::now());
            tokio::time::timeout(bound, read())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {bound:?}")))
        });
        let outcome = async move {
            task.await
                .unwrap_or_else(|e| Err(format!("read task failed: {e}")))
        }
        .boxed()
        .shared();
        Read { started, outcome }
    }
}

pub struct ReadBarrier {
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    timeout: Duration,
    ends: Reads<Offset>,
    applied: Reads<Option<Offset>>,
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
            ends: Reads::new(partitions, timeout),
            applied: Reads::new(partitions, timeout),
        }
    }

    /// The deadline of a GET that began at `began`.
    pub fn deadline(&self, began: Instant) -> Instant {
        began + self.timeout
    }

    /// Returns once every event appended to `partition` before `began` is applied, or
    /// fails when that does not happen by `deadline` (normally [`Self::deadline`] of
    /// `began`; earlier when the GET began before `began`). Returns by `deadline` whatever
    /// the log and the read model do.
    ///
    /// Each wait counts once in `msghash_query_barrier_waits_total{outcome}`.
    pub async fn wait(
        &self,
        partition: u32,
        began: Instant,
        deadline: Instant,
    ) -> Result<(), BarrierError> {
        let result = self.wait_uncounted(partition, began, deadline).await;
        let outcome = match &result {
            Ok(()) => CAUGHT_UP,
            Err(BarrierError::Behind { .. }) => BEHIND,
            Err(BarrierError::Dependency(_)) => ERROR,
        };
        metrics::counter!(QUERY_BARRIER_WAITS_TOTAL, "outcome" => outcome).increment(1);
        result
    }

    async fn wait_uncounted(
        &self,
        partition: u32,
        began: Instant,
        deadline: Instant,
    ) -> Result<(), BarrierError> {
        let log = self.log.clone();
        let end = self.ends.since(partition, began, move || async move {
            log.end_offset(partition).await.map_err(|e| e.to_string())
        });
        let end = by(deadline, "log end offset", end).await?;
        if end <= 0 {
            return Ok(());
        }
        let mut pause = FIRST_POLL;
        // The last applied offset read in this wait: once the model has answered, a read
        // still running when the deadline comes means the projector is behind, not that
        // the model failed (under load a poll can start just before the deadline).
        let mut last: Option<Option<Offset>> = None;
        loop {
            let model = self.model.clone();
            let applied = self
                .applied
                .since(partition, Instant::now(), move || async move {
                    model
                        .applied_offset(partition)
                        .await
                        .map_err(|e| e.to_string())
                });
            let applied = match (by(deadline, "applied offset", applied).await, last) {
                (Ok(applied), _) => applied,
                (Err(BarrierError::Dependency(_)), Some(applied)) if Instant::now() >= deadline => {
                    return Err(BarrierError::Behind { applied, end });
                }
                (Err(e), _) => return Err(e),
            };
            last = Some(applied);
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

/// The outcome of a shared read, or a failure once `deadline` passes.
async fn by<T: Clone>(
    deadline: Instant,
    what: &str,
    outcome: Outcome<T>,
) -> Result<T, BarrierError> {
    match tokio::time::timeout_at(deadline, outcome).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BarrierError::Dependency(format!("{what}: {e}"))),
        Err(_) => Err(BarrierError::Dependency(format!(
            "{what}: no answer by the deadline"
        ))),
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
    use msghash_testkit::fakes::OffsetsOnly;

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
                Arc::new(OffsetsOnly::default()),
                Duration::from_millis(20),
            )
        };
        let before = counts();
        assert!(barrier(Some(0))
            .wait(
                0,
                Instant::now(),
                Instant::now() + Duration::from_millis(20)
            )
            .await
            .is_ok());
        assert!(matches!(
            barrier(Some(3))
                .wait(
                    0,
                    Instant::now(),
                    Instant::now() + Duration::from_millis(20)
                )
                .await,
            Err(BarrierError::Behind { .. })
        ));
        assert!(matches!(
            barrier(None)
                .wait(
                    0,
                    Instant::now(),
                    Instant::now() + Duration::from_millis(20)
                )
                .await,
            Err(BarrierError::Dependency(_))
        ));
        let after = counts();
        for i in 0..3 {
            assert!(after[i] >= before[i] + 1.0, "{}", OUTCOMES[i]);
        }
    }

    /// A read model whose first applied-offset read answers at once (nothing applied) and
    /// every later one only after 10 s: a projector that is behind, on a loaded model.
    #[derive(Default)]
    struct SlowAfterFirst {
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl ReadModel for SlowAfterFirst {
        async fn apply(
            &self,
            _: &msghash_common::ProjectionBatch,
        ) -> Result<(), msghash_common::ports::ModelError> {
            Ok(())
        }
        async fn get(
            &self,
            _: &msghash_common::Digest,
        ) -> Result<Option<String>, msghash_common::ports::ModelError> {
            Ok(None)
        }
        async fn applied_offset(
            &self,
            _: u32,
        ) -> Result<Option<Offset>, msghash_common::ports::ModelError> {
            if self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok(None)
        }
        async fn list(
            &self,
            _: Option<&msghash_common::Digest>,
            _: usize,
        ) -> Result<Vec<msghash_common::Digest>, msghash_common::ports::ModelError> {
            Ok(Vec::new())
        }
    }

    /// Once the model has answered, a poll still running at the deadline means the
    /// projector is behind: `behind`, not `error`. Before, it counted as an error (CI:
    /// read_path.rs "waits(after, behind) >= waits(before, behind) + 1" failed under load).
    #[tokio::test(start_paused = true)]
    async fn a_poll_cut_off_by_the_deadline_after_an_answer_is_behind_not_an_error() {
        let barrier = ReadBarrier::new(
            Arc::new(Log { end: Some(3) }),
            Arc::new(SlowAfterFirst::default()),
            Duration::from_millis(500),
        );
        let began = Instant::now();
        let outcome = barrier.wait(0, began, barrier.deadline(began)).await;
        assert!(
            matches!(
                outcome,
                Err(BarrierError::Behind {
                    applied: None,
                    end: 3
                })
            ),
            "{outcome:?}"
        );
        assert!(
            began.elapsed() <= Duration::from_millis(501),
            "{:?}",
            began.elapsed()
        );
    }

    const TIMEOUT: Duration = Duration::from_millis(500);
    /// What the paused clock may add to a deadline: timers fire on whole milliseconds.
    const TICK: Duration = Duration::from_millis(1);

    /// What one end-offset read of [`Scripted`] does.
    enum Step {
        /// Never answers.
        Hang,
        /// Fails after a while.
        Fail(Duration),
        /// Answers this end offset after a while.
        Answer(Duration, Offset),
    }

    /// A log of one partition whose end-offset reads follow a script (then answer 0 at
    /// once), counting them.
    struct Scripted {
        steps: std::sync::Mutex<std::collections::VecDeque<Step>>,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl Scripted {
        fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
            Arc::new(Scripted {
                steps: std::sync::Mutex::new(steps.into_iter().collect()),
                reads: Default::default(),
            })
        }

        fn reads(&self) -> usize {
            self.reads.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl EventLog for Scripted {
        fn partitions(&self) -> std::num::NonZeroU32 {
            std::num::NonZeroU32::MIN
        }
        async fn append(&self, _: u32, _: &MessageHashed) -> Result<Offset, LogError> {
            Err(LogError::Rejected("read-only".into()))
        }
        async fn end_offset(&self, _: u32) -> Result<Offset, LogError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let step = self.steps.lock().expect("steps").pop_front();
            match step {
                Some(Step::Hang) => std::future::pending().await,
                Some(Step::Fail(after)) => {
                    tokio::time::sleep(after).await;
                    Err(LogError::Unavailable("broker down".into()))
                }
                Some(Step::Answer(after, end)) => {
                    tokio::time::sleep(after).await;
                    Ok(end)
                }
                None => Ok(0),
            }
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

    /// A read model whose applied-offset reads never answer, counting them.
    #[derive(Default)]
    struct HangingModel {
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl ReadModel for HangingModel {
        async fn apply(
            &self,
            _: &msghash_common::ProjectionBatch,
        ) -> Result<(), msghash_common::ModelError> {
            Ok(())
        }
        async fn get(
            &self,
            _: &msghash_common::Digest,
        ) -> Result<Option<String>, msghash_common::ModelError> {
            Ok(None)
        }
        async fn applied_offset(
            &self,
            _: u32,
        ) -> Result<Option<Offset>, msghash_common::ModelError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending().await
        }
        async fn list(
            &self,
            _: Option<&msghash_common::Digest>,
            _: usize,
        ) -> Result<Vec<msghash_common::Digest>, msghash_common::ModelError> {
            Ok(Vec::new())
        }
    }

    fn barrier_on(log: Arc<dyn EventLog>, model: Arc<dyn ReadModel>) -> Arc<ReadBarrier> {
        Arc::new(ReadBarrier::new(log, model, TIMEOUT))
    }

    /// One miss on partition 0 beginning now: its outcome and how long it took.
    async fn miss(barrier: Arc<ReadBarrier>) -> (Result<(), BarrierError>, Duration) {
        let began = Instant::now();
        let outcome = barrier.wait(0, began, barrier.deadline(began)).await;
        (outcome, began.elapsed())
    }

    /// `n` misses on partition 0 beginning at once, each in a task of its own.
    async fn misses(
        barrier: &Arc<ReadBarrier>,
        n: usize,
    ) -> Vec<(Result<(), BarrierError>, Duration)> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            set.spawn(miss(barrier.clone()));
        }
        // On the paused clock a hang would never end: a minute of it fails the test instead.
        tokio::time::timeout(Duration::from_secs(60), set.join_all())
            .await
            .expect("every miss answered")
    }

    /// Before: each miss read the end offset itself, one after the other behind a lock, so
    /// with a hanging broker the first never answered and no other got its turn.
    #[tokio::test(start_paused = true)]
    async fn misses_on_a_hanging_log_answer_by_their_deadline_on_one_read() {
        let log = Scripted::new([Step::Hang]);
        let barrier = barrier_on(log.clone(), Arc::new(OffsetsOnly::default()));
        let answers = misses(&barrier, 200).await;
        assert_eq!(answers.len(), 200);
        for (outcome, took) in &answers {
            assert!(
                matches!(outcome, Err(BarrierError::Dependency(_))),
                "{outcome:?}"
            );
            assert!(*took >= TIMEOUT && *took <= TIMEOUT + TICK, "{took:?}");
        }
        assert_eq!(log.reads(), 1, "one shared read");
        // The hung read was given up at the deadline: the next miss reads afresh, and this
        // time the log answers.
        let (outcome, _) = miss(barrier.clone()).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(log.reads(), 2);
    }

    /// Before: the failure reached only the caller whose read it was; each of the others
    /// then read again in turn, 200 reads in all.
    #[tokio::test(start_paused = true)]
    async fn a_failed_read_fails_its_callers_at_once_and_the_next_miss_reads_again() {
        let failing = Duration::from_millis(100);
        let log = Scripted::new([Step::Fail(failing)]);
        let barrier = barrier_on(log.clone(), Arc::new(OffsetsOnly::default()));
        let answers = misses(&barrier, 200).await;
        for (outcome, took) in &answers {
            assert!(
                matches!(outcome, Err(BarrierError::Dependency(_))),
                "{outcome:?}"
            );
            assert!(*took >= failing && *took <= failing + TICK, "{took:?}");
        }
        assert_eq!(log.reads(), 1, "one shared read");
        let (outcome, _) = miss(barrier.clone()).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(log.reads(), 2, "a fresh read after the failure");
    }

    /// A read that started before a miss began may not answer it (it might not cover a POST
    /// acknowledged just before the miss): the misses that come while a read runs all share
    /// the one read queued behind it.
    #[tokio::test(start_paused = true)]
    async fn misses_that_come_during_a_read_share_the_next_one() {
        let running = Duration::from_millis(200);
        let log = Scripted::new([Step::Fail(running), Step::Answer(running, 0)]);
        let barrier = barrier_on(log.clone(), Arc::new(OffsetsOnly::default()));
        let first = tokio::spawn(miss(barrier.clone()));
        let mut later = tokio::task::JoinSet::new();
        for _ in 1..200 {
            tokio::time::sleep(TICK).await;
            later.spawn(miss(barrier.clone()));
        }
        let (outcome, _) = first.await.expect("first miss");
        assert!(
            matches!(outcome, Err(BarrierError::Dependency(_))),
            "{outcome:?}"
        );
        for (outcome, _) in later.join_all().await {
            assert!(outcome.is_ok(), "{outcome:?}");
        }
        assert_eq!(log.reads(), 2, "the running read and the one after it");
    }

    /// A caller whose deadline comes first stops waiting; the read goes on for the others.
    #[tokio::test(start_paused = true)]
    async fn a_caller_stops_waiting_at_its_deadline_and_the_read_goes_on() {
        let running = Duration::from_millis(300);
        let log = Scripted::new([Step::Answer(running, 0)]);
        let barrier = barrier_on(log.clone(), Arc::new(OffsetsOnly::default()));
        let began = Instant::now();
        let short = began + Duration::from_millis(100);
        let (hurried, patient) = tokio::join!(
            barrier.wait(0, began, short),
            barrier.wait(0, began, barrier.deadline(began)),
        );
        assert!(
            matches!(hurried, Err(BarrierError::Dependency(_))),
            "{hurried:?}"
        );
        assert!(patient.is_ok(), "{patient:?}");
        assert!(began.elapsed() >= running && began.elapsed() <= running + TICK);
        assert_eq!(log.reads(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn misses_on_a_hanging_read_model_answer_by_their_deadline_on_one_read() {
        let log = Scripted::new([Step::Answer(Duration::ZERO, 5)]);
        let model = Arc::new(HangingModel::default());
        let barrier = barrier_on(log.clone(), model.clone());
        for (outcome, took) in misses(&barrier, 200).await {
            assert!(
                matches!(outcome, Err(BarrierError::Dependency(_))),
                "{outcome:?}"
            );
            assert!(took >= TIMEOUT && took <= TIMEOUT + TICK, "{took:?}");
        }
        assert_eq!(log.reads(), 1);
        assert_eq!(
            model.reads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one shared applied-offset read"
        );
    }
}
