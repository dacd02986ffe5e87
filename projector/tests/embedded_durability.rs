//! The live projection on the embedded adapters: the read model defers the fsync of small
//! batches (`EmbeddedModel`, docs/embedded-storage.md), and the projector makes them durable
//! as soon as it is idle, so a crash after a burst does not even cost re-applying it.

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

/// What a kill -9 would leave of the read model in `dir` right now (the bytes of its file:
/// the page cache), opened on its own; `None` when the copy caught a commit half-way (a
/// copy is not one instant, as a kill is).
fn crash_image(dir: &Path) -> Option<(tempfile::TempDir, EmbeddedModel)> {
    let image = tempfile::tempdir().expect("tempdir");
    let file = msghash_common::adapters::embedded::model_file(0);
    std::fs::copy(dir.join(&file), image.path().join(&file)).expect("copy the model");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_projector_makes_what_it_applied_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), PARTITIONS).expect("log"));
    // No durable commit by the clock: only the idle projector's sync can make the burst
    // durable.
    let generations: Arc<dyn ModelGenerations> = Arc::new(
        EmbeddedGenerations::open(dir.path())
            .expect("generations")
            .durable_every(Duration::from_secs(3600)),
    );
    let shutdown = Shutdown::new();
    let projection = tokio::spawn(run_projection(
        log.clone(),
        generations.clone(),
        ProjectorSettings::default(),
        Arc::new(ProjectorStats::default()),
        shutdown.clone(),
    ));

    // A burst of a few events, then nothing: small batches, committed without an fsync,
    // and no later batch to make them durable.
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

    // The projector's next empty poll makes them durable: a crash from then on keeps them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let crashed = loop {
        if let Some((image, crashed)) = crash_image(dir.path()) {
            if holds_all(&crashed, &messages).await {
                break (image, crashed);
            }
        }
        assert!(
            Instant::now() < deadline,
            "an idle projector left what it applied without an fsync"
        );
        sleep(Duration::from_millis(100)).await;
    };
    for p in 0..PARTITIONS.get() {
        let end = log.end_offset(p).await.expect("end");
        let applied = crashed.1.applied_offset(p).await.expect("applied");
        assert_eq!(
            applied,
            end.checked_sub(1),
            "partition {p}: rows without offsets"
        );
    }
    shutdown.cancel();
    projection
        .await
        .expect("projector task")
        .expect("projector stops cleanly");
}
