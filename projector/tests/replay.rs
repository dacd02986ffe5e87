//! Replay into a new read-model generation on both adapter pairs (embedded; the test run's
//! real Apache Kafka broker + Apache Cassandra node, see `msghash_testkit::servers`), through
//! the real ingest and query routers while a writer and readers hammer them; a replay
//! stopped half-way and resumed; `--drop-old`; and `projector replay` killed with SIGKILL
//! and run again. On the real servers each test has a topic, a keyspace and consumer groups
//! of its own.

use axum::http::StatusCode;
use futures::StreamExt;
use msghash_common::adapters::embedded::{EmbeddedGenerations, EmbeddedLog};
use msghash_common::adapters::kafka::{KafkaLog, KafkaSettings};
use msghash_common::adapters::scylla::{ScyllaGenerations, ScyllaSettings};
use msghash_common::generation::LiveModel;
use msghash_common::shutdown::Shutdown;
use msghash_common::{partition_for, Digest, EventLog, MessageHashed, ModelGenerations, ReadModel};
use msghash_testkit::load::Hammer;
use msghash_testkit::router::get_message;
use msghash_testkit::{process, servers};
use projector::{Phase, Progress, ProjectorSettings, ReplaySettings};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

const PARTITIONS: NonZeroU32 = NonZeroU32::new(4).unwrap();
const GROUP: &str = "msghash-projector";

/// Appends `messages` straight to the log, 64 at a time.
async fn load(log: &Arc<dyn EventLog>, messages: impl Iterator<Item = String>) {
    futures::stream::iter(messages)
        .map(|m| {
            let log = log.clone();
            async move {
                let e = MessageHashed::new(m);
                log.append(partition_for(&e.digest, PARTITIONS), &e)
                    .await
                    .expect("append");
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

/// Waits until `model` has applied every record the log has now.
async fn wait_caught_up(log: &dyn EventLog, model: &dyn ReadModel) {
    let deadline = Instant::now() + Duration::from_secs(180);
    'outer: loop {
        assert!(Instant::now() < deadline, "projection did not catch up");
        for p in 0..PARTITIONS.get() {
            let end = log.end_offset(p).await.expect("end");
            let applied = model.applied_offset(p).await.expect("applied");
            if end > 0 && applied != Some(end - 1) {
                sleep(Duration::from_millis(50)).await;
                continue 'outer;
            }
        }
        return;
    }
}

/// Every digest → message pair of a model, through its listing.
async fn contents(model: &Arc<dyn ReadModel>) -> BTreeMap<Digest, String> {
    let mut digests = Vec::new();
    let mut after = None;
    loop {
        let page = model.list(after.as_ref(), 1000).await.expect("list");
        digests.extend(page.iter().copied());
        match page.last() {
            Some(last) if page.len() == 1000 => after = Some(*last),
            _ => break,
        }
    }
    futures::stream::iter(digests)
        .map(|d| {
            let model = model.clone();
            async move {
                let m = model.get(&d).await.expect("get").expect("listed digest");
                (d, m)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// Waits (10 s at most) until `live` serves `generation`.
async fn readers_move_to(live: &LiveModel, generation: msghash_common::Generation) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.generation() != generation {
        assert!(
            Instant::now() < deadline,
            "readers did not move to generation {generation}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The whole replay story on one adapter pair, with `group` as the projectors' base
/// consumer group.
async fn replay_story(
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    group: &str,
    n: usize,
) {
    let shutdown = Shutdown::new();
    let settings = ProjectorSettings {
        group: group.into(),
        generation_check: Duration::from_millis(100),
        ..ProjectorSettings::default()
    };
    let projector = tokio::spawn(projector::run_projection(
        log.clone(),
        generations.clone(),
        settings,
        Arc::default(),
        shutdown.clone(),
    ));
    let live = LiveModel::open(generations.clone()).await.expect("live");
    let _follow = live.follow(Duration::from_millis(100), shutdown.clone());
    let app = ingest::router(log.clone(), ingest::IngestSettings::default()).merge(query::router(
        log.clone(),
        live.clone(),
        query::QuerySettings {
            read_your_writes_timeout: Duration::from_secs(10),
            ..Default::default()
        },
    ));

    let initial: Vec<String> = (0..n)
        .map(|i| format!("loaded before the replay {i}"))
        .collect();
    load(&log, initial.iter().cloned()).await;
    let gen0 = generations.open(0).await.expect("generation 0");
    wait_caught_up(log.as_ref(), gen0.as_ref()).await;
    let known: Arc<Vec<(Digest, String)>> =
        Arc::new(initial.iter().map(|m| (Digest::of(m), m.clone())).collect());

    // 1. A replay stopped half-way leaves the active generation alone and resumes later.
    let stop = Shutdown::new();
    let stopper = stop.clone();
    let half = (n / 4) as u64;
    let stopped = projector::replay::replay(
        log.clone(),
        generations.clone(),
        ReplaySettings {
            group: group.into(),
            batch_size: 50,
            progress_interval: Duration::from_millis(10),
            ..ReplaySettings::default()
        },
        &mut |p: &Progress| {
            if p.applied >= half {
                stopper.cancel();
            }
        },
        stop,
    )
    .await
    .expect("stopped replay");
    assert!(stopped.is_none(), "a stopped replay does not switch");
    let state = generations.state().await.expect("state");
    assert_eq!(state.active, 0, "{state:?}");
    assert_eq!(state.pending, Some(1), "{state:?}");
    assert_eq!(live.generation(), 0);
    let partial = generations.open(1).await.expect("generation 1");
    let partial_count = contents(&partial).await.len();
    assert!(
        partial_count > 0 && partial_count < n,
        "half-way: {partial_count} of {n}"
    );

    // 2. Resumed under load: readers never fail, the writer never fails.
    let hammer = Hammer::start(&app, known.clone(), "written during the replay");
    let progress = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let seen = progress.clone();
    let report = projector::replay::replay(
        log.clone(),
        generations.clone(),
        ReplaySettings {
            group: group.into(),
            progress_interval: Duration::from_millis(200),
            handover_timeout: Duration::from_secs(60),
            ..ReplaySettings::default()
        },
        &mut move |p: &Progress| seen.lock().expect("lock").push(p.clone()),
        shutdown.clone(),
    )
    .await
    .expect("replay")
    .expect("replay finished");
    assert_eq!(report.generation, 1);
    assert!(report.resumed, "{report:?}");
    assert!(report.adopted, "the live projector took over: {report:?}");
    assert!(report.to_string().starts_with("applied "), "{report}");
    // Readers move on their next look at the catalog; the load goes on there.
    readers_move_to(&live, 1).await;
    hammer.wait_for_more(200, 20, Duration::from_secs(60)).await;
    let hammered = hammer.stop().await;
    let failures = &hammered.failures;
    assert!(
        failures.is_empty(),
        "{} failed of {} reads: {:?}",
        failures.len(),
        hammered.reads,
        &failures[..failures.len().min(5)]
    );
    let written = hammered.written;
    assert!(!written.is_empty());
    let progress = progress.lock().expect("lock").clone();
    assert!(progress.iter().any(|p| p.phase == Phase::Building));
    assert!(progress.iter().any(|p| p.phase == Phase::Switched));
    assert!(progress.windows(2).all(|w| w[0].applied <= w[1].applied));
    let line = progress[0].to_string();
    assert!(
        line.contains("events/s") && line.contains("ETA") && line.contains("p0="),
        "{line}"
    );

    // 3. The new generation holds exactly the old pairs plus what was written meanwhile.
    let gen1 = generations.open(1).await.expect("generation 1");
    wait_caught_up(log.as_ref(), gen1.as_ref()).await;
    let mut expected: BTreeMap<Digest, String> = known.iter().cloned().collect();
    expected.extend(written.clone());
    let new = contents(&gen1).await;
    assert_eq!(new.len(), expected.len());
    assert!(
        new == expected,
        "generation 1 differs from what was written"
    );
    let old = contents(&gen0).await;
    assert!(old.len() >= n);
    assert!(
        old.iter().all(|(d, m)| new.get(d) == Some(m)),
        "every pair of the old generation is in the new one"
    );
    let status = projector::Status::read(log.as_ref(), generations.as_ref())
        .await
        .expect("status");
    assert_eq!(status.active_generation, 1);
    assert_eq!(status.pending_generation, None);
    assert_eq!(status.total_lag(), 0, "{status}");

    // 4. Another replay with drop_old leaves only the newest generation.
    let report = projector::replay::replay(
        log.clone(),
        generations.clone(),
        ReplaySettings {
            group: group.into(),
            drop_old: true,
            handover_timeout: Duration::from_secs(60),
            ..ReplaySettings::default()
        },
        &mut |_: &Progress| {},
        shutdown.clone(),
    )
    .await
    .expect("replay")
    .expect("replay finished");
    assert_eq!(report.generation, 2);
    assert_eq!(report.dropped, vec![0, 1]);
    assert_eq!(generations.list().await.expect("list"), vec![2]);
    let gen2 = generations.open(2).await.expect("generation 2");
    assert!(contents(&gen2).await == expected);
    readers_move_to(&live, 2).await;
    let (digest, message) = &known[0];
    let (status, _, body) = get_message(&app, &digest.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["message"], *message.as_str());

    shutdown.cancel();
    projector
        .await
        .expect("projector task")
        .expect("projector stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_replay_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), PARTITIONS).expect("log"));
    let generations: Arc<dyn ModelGenerations> =
        Arc::new(EmbeddedGenerations::open(dir.path()).expect("generations"));
    replay_story(log, generations, GROUP, 20_000).await;
    // Dropped generations leave no files behind.
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("readmodel"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            "readmodel-g2.redb".to_owned(),
            "readmodel-g2.rows".to_owned()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_held_to_its_max_rate_until_readers_switch() {
    const RATE: u32 = 1_000;
    const BATCH: usize = 500;
    const EVENTS: usize = 3_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), PARTITIONS).expect("log"));
    let generations: Arc<dyn ModelGenerations> =
        Arc::new(EmbeddedGenerations::open(dir.path()).expect("generations"));
    load(&log, (0..EVENTS).map(|i| format!("held back {i}"))).await;
    let mut reports: Vec<Progress> = Vec::new();
    let report = projector::replay::replay(
        log.clone(),
        generations.clone(),
        ReplaySettings {
            group: GROUP.into(),
            batch_size: BATCH,
            progress_interval: Duration::from_millis(50),
            handover_timeout: Duration::ZERO,
            max_rate: NonZeroU32::new(RATE),
            ..ReplaySettings::default()
        },
        &mut |p: &Progress| reports.push(p.clone()),
        Shutdown::new(),
    )
    .await
    .expect("replay")
    .expect("replay finished");
    // While building: a second's worth at once, then RATE a second, never more, however
    // fast the machine. (A report follows a batch: one every half second here.)
    let building: Vec<(u64, f64)> = reports
        .iter()
        .filter(|p| p.phase == Phase::Building)
        .map(|p| (p.applied, p.elapsed_secs))
        .collect();
    assert!(building.len() >= 3, "{building:?}");
    for &(applied, elapsed) in &building {
        let allowed = f64::from(RATE) * (1.0 + elapsed * 1.01);
        assert!(
            applied as f64 <= allowed,
            "{applied} events applied after {elapsed:.3} s: {building:?}"
        );
    }
    // Readers switch once the lag is at most a batch: 2,500 events held to the rate, 1,000
    // of them at once.
    assert_eq!(report.applied, EVENTS as u64, "{report:?}");
    let held = (EVENTS as f64 - BATCH as f64 - f64::from(RATE)) / f64::from(RATE);
    assert!(
        report.elapsed_secs >= held * 0.99,
        "{EVENTS} events at {RATE}/s in {:.3} s",
        report.elapsed_secs
    );
    let model = generations
        .open(report.generation)
        .await
        .expect("generation");
    assert_eq!(contents(&model).await.len(), EVENTS);
}

/// A topic, a keyspace and a base consumer group of one test's own on the test run's real
/// servers (consumer groups live on the broker, not in a topic, so they are unique too).
struct Stand {
    kafka: KafkaSettings,
    scylla: ScyllaSettings,
    group: String,
}

impl Stand {
    fn new(prefix: &str) -> Stand {
        msghash_common::telemetry::init_for_tests();
        Stand {
            kafka: servers::kafka_settings(prefix, PARTITIONS),
            scylla: servers::scylla_settings(prefix),
            group: servers::unique_name(prefix),
        }
    }

    /// The log; the adapter creates the topic and its dead-letter topic.
    async fn log(&self) -> Arc<dyn EventLog> {
        Arc::new(KafkaLog::connect(self.kafka.clone()).await.expect("kafka"))
    }

    async fn generations(&self) -> Arc<dyn ModelGenerations> {
        Arc::new(
            ScyllaGenerations::connect(&self.scylla)
                .await
                .expect("scylla"),
        )
    }

    /// The `projector` binary's flags for the same topic, keyspace and group.
    fn flags(&self) -> Vec<String> {
        vec![
            format!("--kafka-brokers={}", self.kafka.brokers),
            format!("--topic={}", self.kafka.topic),
            format!("--partitions={PARTITIONS}"),
            format!(
                "--kafka-session-timeout-ms={}",
                self.kafka.session_timeout.as_millis()
            ),
            format!("--scylla-nodes={}", self.scylla.nodes.join(",")),
            format!("--keyspace={}", self.scylla.keyspace),
            format!("--group={}", self.group),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_and_scylla_replay_under_load() {
    let stand = Stand::new("replay_load");
    let log = stand.log().await;
    let generations = stand.generations().await;
    replay_story(log, generations, &stand.group, 20_000).await;
}

/// `projector replay` killed with SIGKILL half-way, then run again to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_replay_survives_sigkill() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let stand = Stand::new("replay_sigkill");
    let log = stand.log().await;
    let generations = stand.generations().await;
    let messages: Vec<String> = (0..2_000).map(|i| format!("before the kill {i}")).collect();
    load(&log, messages.iter().cloned()).await;
    let expected: BTreeMap<Digest, String> = messages
        .iter()
        .map(|m| (Digest::of(m), m.clone()))
        .collect();
    // A poison record in partition 1: dead-lettered live and again by the replay, never
    // blocking its partition.
    let raw: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", servers::kafka_brokers())
        .create()
        .expect("producer");
    raw.send(
        rdkafka::producer::FutureRecord::to(&stand.kafka.topic)
            .partition(1)
            .key(&b"not a digest"[..])
            .payload(&b"\xff not json"[..]),
        Duration::from_secs(5),
    )
    .await
    .expect("poison appended");
    // Generation 0 as the live projector leaves it.
    project_everything(&log, &generations, &stand.group).await;
    let gen0 = generations.open(0).await.expect("generation 0");

    let replay = |batch: &str| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"));
        command
            .args([
                "replay",
                "--handover-timeout-secs=0",
                &format!("--batch-size={batch}"),
                "--log-format=text",
                "--log=warn",
            ])
            .args(stand.flags())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };
    // Held to 200 events a second, it is far from its end at its first report, a second in.
    let mut first = replay("1")
        .arg("--max-rate=200")
        .spawn()
        .expect("spawn projector replay");
    let mut stderr = BufReader::new(first.stderr.take().expect("stderr")).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout_at(deadline, stderr.next_line())
            .await
            .expect("progress in time")
            .expect("read stderr")
            .unwrap_or_else(|| panic!("replay ended before enough progress: {seen:#?}"));
        seen.push(line.clone());
        let Some((applied, lag)) = process::replay_building(&line, 1) else {
            continue;
        };
        assert!(
            lag >= 200,
            "the replay is nearly done before the kill: {seen:#?}"
        );
        if applied > 0 {
            break;
        }
    }
    first.start_kill().expect("SIGKILL");
    let status = first.wait().await.expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let state = generations.state().await.expect("state");
    assert_eq!(state.active, 0, "untouched until the switch: {state:?}");
    assert_eq!(state.pending, Some(1), "{state:?}");
    let gen1 = generations.open(1).await.expect("generation 1");
    let partial = contents(&gen1).await.len();
    assert!(partial > 0 && partial < messages.len(), "{partial}");
    assert!(contents(&gen0).await == expected, "generation 0 untouched");

    let second = replay("500").output().await.expect("run projector replay");
    let stdout = String::from_utf8_lossy(&second.stdout);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("applied ") && last.contains("readers are on generation 1"),
        "{last}"
    );
    let state = generations.state().await.expect("state");
    assert_eq!((state.active, state.pending), (1, None));
    assert!(contents(&gen1).await == expected, "generation 1 complete");
    let dead = log.dead_letter_count().await.expect("dead letters");
    assert!(dead >= 2, "dead-lettered live and by the replay: {dead}");
    let status = projector_command_status(&stand).await;
    assert!(status.contains("active generation: 1\n"), "{status}");
    assert!(
        status.contains(&format!("dead-lettered events: {dead}")),
        "{status}"
    );
    assert!(status.contains("total lag: 0"), "{status}");
}

async fn projector_command_status(stand: &Stand) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["status", "--log=warn"])
        .args(stand.flags())
        .output()
        .await
        .expect("projector status runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the live projector (consumer group `group`) on `generations` until it has applied
/// the whole log, then stops.
async fn project_everything(
    log: &Arc<dyn EventLog>,
    generations: &Arc<dyn ModelGenerations>,
    group: &str,
) {
    let shutdown = Shutdown::new();
    let live = tokio::spawn(projector::run_projection(
        log.clone(),
        generations.clone(),
        ProjectorSettings {
            group: group.into(),
            ..ProjectorSettings::default()
        },
        Arc::default(),
        shutdown.clone(),
    ));
    let model = generations.open(0).await.expect("generation 0");
    wait_caught_up(log.as_ref(), model.as_ref()).await;
    shutdown.cancel();
    live.await.expect("join").expect("live projector");
}

/// A read model lost while the consumer group kept its positions (a lost keyspace, deleted
/// files) is rebuilt from the start of the log, not silently left without the old events.
async fn lost_read_model_is_rebuilt(
    log: Arc<dyn EventLog>,
    group: &str,
    before: Arc<dyn ModelGenerations>,
    after: impl std::future::Future<Output = Arc<dyn ModelGenerations>>,
) {
    let messages: Vec<String> = (0..300).map(|i| format!("kept by the log {i}")).collect();
    load(&log, messages.iter().cloned()).await;
    project_everything(&log, &before, group).await;
    drop(before);
    let generations = after.await;
    assert_eq!(
        generations
            .open(0)
            .await
            .expect("open")
            .applied_offset(0)
            .await
            .expect("applied"),
        None,
        "the read model starts empty"
    );
    project_everything(&log, &generations, group).await;
    let expected: BTreeMap<Digest, String> = messages
        .iter()
        .map(|m| (Digest::of(m), m.clone()))
        .collect();
    let model = generations.open(0).await.expect("generation 0");
    assert!(contents(&model).await == expected, "every event is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lost_read_model_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path(), PARTITIONS).expect("log"));
    let before: Arc<dyn ModelGenerations> =
        Arc::new(EmbeddedGenerations::open(dir.path()).expect("generations"));
    let path = dir.path().to_path_buf();
    lost_read_model_is_rebuilt(log, GROUP, before, async move {
        for file in ["readmodel.redb", "generations.redb"] {
            std::fs::remove_file(path.join(file)).expect("delete the read model");
        }
        std::fs::remove_dir_all(path.join("readmodel.rows")).expect("delete its rows");
        Arc::new(EmbeddedGenerations::open(&path).expect("generations"))
            as Arc<dyn ModelGenerations>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_scylla_lost_keyspace_is_rebuilt() {
    let stand = Stand::new("lost_keyspace");
    let log = stand.log().await;
    let before = stand.generations().await;
    // A fresh keyspace on the same node plays the keyspace that was lost.
    lost_read_model_is_rebuilt(log, &stand.group, before, async move {
        Arc::new(
            ScyllaGenerations::connect(&servers::scylla_settings("lost_restored"))
                .await
                .expect("scylla"),
        ) as Arc<dyn ModelGenerations>
    })
    .await;
}

/// `replay --drop-old` drops the old generation once readers switched. A live projector
/// that is in the middle of a batch for the old generation then retries a write that can
/// never succeed. Before, it retried for ever and never adopted the new generation, so
/// nothing new was projected anywhere; now the switch ends its turn and it moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_writing_to_a_dropped_generation_moves_to_the_active_one() {
    let stand = Stand::new("dropped_generation");
    let log = stand.log().await;
    let generations = stand.generations().await;
    let first: Vec<String> = (0..50).map(|i| format!("before the switch {i}")).collect();
    load(&log, first.iter().cloned()).await;
    let shutdown = Shutdown::new();
    let live = tokio::spawn(projector::run_projection(
        log.clone(),
        generations.clone(),
        ProjectorSettings {
            group: stand.group.clone(),
            poll_wait: Duration::from_millis(100),
            // Long enough that the projector is surely mid-batch on generation 0 when it
            // is dropped; the switch is still seen within this.
            generation_check: Duration::from_secs(3),
            ..ProjectorSettings::default()
        },
        Arc::default(),
        shutdown.clone(),
    ));
    let old = generations.open(0).await.expect("generation 0");
    wait_caught_up(log.as_ref(), old.as_ref()).await;

    // What a replay's switch and --drop-old do to the catalog, then new events at once.
    generations.begin(1).await.expect("begin");
    let new = generations.open(1).await.expect("generation 1");
    generations.activate(1).await.expect("activate");
    generations
        .drop_generation(0)
        .await
        .expect("drop the old one");
    let second: Vec<String> = (0..50).map(|i| format!("after the switch {i}")).collect();
    load(&log, second.iter().cloned()).await;

    // The projector adopts generation 1, whose group projects the whole log into it.
    wait_caught_up(log.as_ref(), new.as_ref()).await;
    let expected: BTreeMap<Digest, String> = first
        .iter()
        .chain(&second)
        .map(|m| (Digest::of(m), m.clone()))
        .collect();
    assert!(
        contents(&new).await == expected,
        "every event in generation 1"
    );
    assert!(generations.state().await.expect("state").adopted >= 1);
    shutdown.cancel();
    live.await.expect("join").expect("live projector");
}
