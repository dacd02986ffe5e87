//! The live projection on the embedded adapters: the read model defers the fsync of small
//! batches (`EmbeddedModel`, docs/embedded-storage.md), and the projector makes them durable
//! as soon as it is idle, and when it stops, so a crash after a burst does not even cost
//! re-applying it.

use msghash_common::adapters::embedded::{EmbeddedGenerations, EmbeddedLog, EmbeddedModel};
use msghash_common::shutdown::Shutdown;
use msghash_common::{partition_for, Digest, EventLog, MessageHashed, ModelGenerations, ReadModel};
use projector::{run_projection, ProjectorSettings, ProjectorStats};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep, Instant};

const PARTITIONS: NonZeroU32 = NonZeroU32::new(2).unwrap();

/// What a kill -9 would leave of the read model in `dir` right now (the bytes of its file
/// and rows: the page cache), opened on its own; `None` when the copy caught a commit half-way (a
/// copy is not one instant, as a kill is).
fn crash_image(dir: &Path) -> Option<(tempfile::TempDir, EmbeddedModel)> {
    let image = tempfile::tempdir().expect("tempdir");
    let file = msghash_common::adapters::embedded::model_file(0);
    std::fs::copy(dir.join(&file), image.path().join(&file)).expect("copy the model");
    let rows = msghash_common::adapters::embedded::rows_dir(0);
    msghash_testkit::files::copy_tree(&dir.join(&rows), &image.path().join(&rows));
    let model = EmbeddedModel::open(image.path()).ok()?;
    Some((image, model))
}

async fn holds_all(model: &dyn ReadModel, messages: &[String]) -> bool {
    for m in messages {
        if model.get(&Digest::of(m)).await.expect("get").as_deref() != Some(m.as_str()) {
            return false;
        }
    }
    true
}

/// A live projection on the embedded adapters in `dir`, with `settings`, whose read model
/// never makes a commit durable by the clock; and a burst of 20 events appended to its log
/// (their messages), applied in small batches without an fsync and with no later batch to
/// make them durable. Returns once the model (held open, as a process that serves reads
/// holds it) shows the burst.
struct Burst {
    log: Arc<dyn EventLog>,
    model: Arc<dyn ReadModel>,
    shutdown: Shutdown,
    projection: tokio::task::JoinHandle<anyhow::Result<()>>,
    messages: Vec<String>,
}

async fn project_a_burst(dir: &Path, settings: ProjectorSettings) -> Burst {
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir, PARTITIONS).expect("log"));
    let generations: Arc<dyn ModelGenerations> = Arc::new(
        EmbeddedGenerations::open(dir)
            .expect("generations")
            .durable_every(Duration::from_secs(3600)),
    );
    let shutdown = Shutdown::new();
    let projection = tokio::spawn(run_projection(
        log.clone(),
        generations.clone(),
        settings,
        Arc::new(ProjectorStats::default()),
        shutdown.clone(),
    ));
    let messages: Vec<String> = (0..20).map(|i| format!("burst {i}")).collect();
    for m in &messages {
        let event = MessageHashed::new(m.clone());
        log.append(partition_for(&event.digest, PARTITIONS), &event)
            .await
            .expect("append");
    }
    let model = generations.open(0).await.expect("model");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holds_all(model.as_ref(), &messages).await {
        assert!(Instant::now() < deadline, "the burst was never applied");
        sleep(Duration::from_millis(20)).await;
    }
    Burst {
        log,
        model,
        shutdown,
        projection,
        messages,
    }
}

impl Burst {
    /// Stops the projection (the model stays open) and checks that it stopped cleanly.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        (&mut self.projection)
            .await
            .expect("projector task")
            .expect("projector stops cleanly");
    }
}

/// The first partition of `crashed` whose applied offset is short of the end of `log`,
/// with both offsets; `None` when every partition is applied to the end.
async fn offsets_missing(
    log: &dyn EventLog,
    crashed: &EmbeddedModel,
) -> Option<(u32, Option<i64>, Option<i64>)> {
    for p in 0..PARTITIONS.get() {
        let end = log.end_offset(p).await.expect("end");
        let applied = crashed.applied_offset(p).await.expect("applied");
        if applied != end.checked_sub(1) {
            return Some((p, applied, end.checked_sub(1)));
        }
    }
    None
}

/// Every partition of `crashed` has its offsets applied up to the end of `log`.
async fn offsets_applied(log: &dyn EventLog, crashed: &EmbeddedModel) {
    let missing = offsets_missing(log, crashed).await;
    assert_eq!(
        missing, None,
        "(partition, applied, end - 1): rows without offsets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_projector_makes_what_it_applied_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Only the idle projector's sync can make the burst durable.
    let mut burst = project_a_burst(dir.path(), ProjectorSettings::default()).await;

    // The projector's next empty poll makes them durable: a crash from then on keeps them,
    // rows and offsets. (The rows are made durable first, then the offsets: an image taken
    // between the two has the rows without their offsets, which the projector would apply
    // again, so only both together end the wait.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((_image, crashed)) = crash_image(dir.path()) {
            if holds_all(&crashed, &burst.messages).await
                && offsets_missing(burst.log.as_ref(), &crashed)
                    .await
                    .is_none()
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "an idle projector left what it applied without an fsync"
        );
        sleep(Duration::from_millis(100)).await;
    }
    burst.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_that_stops_makes_what_it_applied_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No idle sync either (a poll waits a minute for its first record): only the stop can
    // make the burst durable.
    let settings = ProjectorSettings {
        poll_wait: Duration::from_secs(60),
        ..ProjectorSettings::default()
    };
    let mut burst = project_a_burst(dir.path(), settings).await;
    // Applied but not durable yet: a crash now would take the burst back.
    let before = match crash_image(dir.path()) {
        Some((_image, crashed)) => holds_all(&crashed, &burst.messages).await,
        None => false,
    };
    assert!(
        !before,
        "the burst was durable before the stop: nothing left to test"
    );

    burst.stop().await;
    // The model is still open (closing it would make the commits durable by itself).
    let (_image, crashed) = crash_image(dir.path()).expect("a whole image after the stop");
    assert!(
        holds_all(&crashed, &burst.messages).await,
        "a projector that stopped left what it applied without an fsync"
    );
    offsets_applied(burst.log.as_ref(), &crashed).await;
    drop(burst.model);
}
