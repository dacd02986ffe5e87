//! One conformance suite, run against every adapter pair, so the adapters cannot drift:
//! - embedded: `EmbeddedLog` + `EmbeddedModel` (redb files);
//! - Kafka + ScyllaDB: `KafkaLog` on the test run's Apache Kafka broker + `ScyllaModel` on
//!   its Apache Cassandra node (see `msghash_testkit::servers`), each in a topic and a
//!   keyspace of its own.

use msghash_common::adapters::embedded::{EmbeddedGenerations, EmbeddedLog, EmbeddedModel};
use msghash_common::adapters::kafka::KafkaLog;
use msghash_common::adapters::scylla::{ScyllaGenerations, ScyllaModel};
use msghash_common::generation::LiveModel;
use msghash_common::ports::{LogRecord, Subscription};
use msghash_common::{
    partition_for, Digest, EventLog, MessageHashed, Offset, ProjectionBatch, ReadModel,
};
use msghash_common::{GenerationState, ModelGenerations};
use msghash_testkit::servers;
use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const PARTITIONS: NonZeroU32 = NonZeroU32::new(3).unwrap();

async fn drain(sub: &mut dyn Subscription, want: usize) -> Vec<LogRecord> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < want {
        assert!(
            Instant::now() < deadline,
            "only {} of {want} records arrived",
            got.len()
        );
        got.extend(
            sub.next_batch(50, Duration::from_millis(200))
                .await
                .expect("next_batch"),
        );
    }
    got
}

fn last_per_partition(records: &[LogRecord]) -> Vec<(u32, Offset)> {
    let mut last = BTreeMap::new();
    for r in records {
        let o = last.entry(r.partition).or_insert(r.offset);
        *o = (*o).max(r.offset);
    }
    last.into_iter().collect()
}

async fn append_all(log: &dyn EventLog, messages: &[String]) -> BTreeMap<u32, Vec<Offset>> {
    let mut offsets: BTreeMap<u32, Vec<Offset>> = BTreeMap::new();
    for m in messages {
        let e = MessageHashed::new(m.clone());
        let p = partition_for(&e.digest, PARTITIONS);
        offsets
            .entry(p)
            .or_default()
            .push(log.append(p, &e).await.expect("append"));
    }
    offsets
}

/// append / end offsets / subscribe / commit / resume / replay.
async fn event_log_conforms(log: &dyn EventLog) {
    assert_eq!(log.partitions(), PARTITIONS);
    for p in 0..PARTITIONS.get() {
        assert_eq!(
            log.end_offset(p).await.expect("end"),
            0,
            "a new log is empty"
        );
    }
    let first: Vec<String> = (0..30).map(|i| format!("conformance {i}")).collect();
    let offsets = append_all(log, &first).await;
    for (p, offs) in &offsets {
        let want: Vec<Offset> = (0..offs.len() as Offset).collect();
        assert_eq!(
            offs, &want,
            "offsets of partition {p} are contiguous from 0"
        );
        assert_eq!(log.end_offset(*p).await.expect("end"), offs.len() as Offset);
    }

    let mut sub = log.subscribe("conformance-a").await.expect("subscribe");
    let records = drain(sub.as_mut(), 30).await;
    assert_eq!(records.len(), 30, "no duplicates in one pass");
    let mut seen = HashSet::new();
    let mut previous: BTreeMap<u32, Offset> = BTreeMap::new();
    for r in &records {
        let e = MessageHashed::decode(r.key.as_deref(), r.value.as_deref()).expect("decodes");
        assert_eq!(r.partition, partition_for(&e.digest, PARTITIONS));
        assert!(seen.insert(e.message.clone()));
        if let Some(prev) = previous.insert(r.partition, r.offset) {
            assert!(r.offset > prev, "in order within partition {}", r.partition);
        }
    }
    sub.commit(&last_per_partition(&records))
        .await
        .expect("commit");
    drop(sub);

    let more: Vec<String> = (0..5).map(|i| format!("conformance late {i}")).collect();
    append_all(log, &more).await;
    let mut resumed = log.subscribe("conformance-a").await.expect("resubscribe");
    let records = drain(resumed.as_mut(), 5).await;
    let messages: HashSet<String> = records
        .iter()
        .map(|r| {
            MessageHashed::decode(r.key.as_deref(), r.value.as_deref())
                .expect("decodes")
                .message
        })
        .collect();
    assert_eq!(
        messages,
        more.iter().cloned().collect(),
        "resumes after its commit"
    );
    drop(resumed);

    let mut replay = log.subscribe("conformance-b").await.expect("new group");
    assert_eq!(
        drain(replay.as_mut(), 35).await.len(),
        35,
        "a new group replays from 0"
    );

    // Dead letters: kept outside the main log, counted, and the main log is untouched.
    assert_eq!(log.dead_letter_count().await.expect("count"), 0);
    let poison = LogRecord {
        partition: 1,
        offset: 3,
        key: Some(b"not a digest".to_vec()),
        value: Some(b"\xff not json".to_vec()),
    };
    log.dead_letter(&poison, "malformed envelope")
        .await
        .expect("dead letter");
    let keyless = LogRecord {
        key: None,
        value: None,
        ..poison.clone()
    };
    log.dead_letter(&keyless, "record has no key")
        .await
        .expect("dead letter");
    assert_eq!(log.dead_letter_count().await.expect("count"), 2);
    let mut total = 0;
    for p in 0..PARTITIONS.get() {
        total += log.end_offset(p).await.expect("end");
    }
    assert_eq!(total, 35, "dead letters do not enter the main log");
}

/// Every digest of the listing, paging `page` at a time from the start.
async fn list_all(model: &dyn ReadModel, page: usize) -> Vec<Digest> {
    let mut listed = Vec::new();
    let mut after: Option<Digest> = None;
    loop {
        let got = model.list(after.as_ref(), page).await.expect("list");
        assert!(got.len() <= page);
        listed.extend(got.iter().copied());
        match got.last() {
            Some(last) if got.len() == page => after = Some(*last),
            _ => return listed,
        }
    }
}

/// What a reader can observe of `digests` and partitions 0..3: the rows, the applied
/// offsets, the listing.
async fn observe(
    model: &dyn ReadModel,
    digests: &[Digest],
) -> (Vec<Option<String>>, Vec<Option<Offset>>, Vec<Digest>) {
    let mut rows = Vec::new();
    for d in digests {
        rows.push(model.get(d).await.expect("get"));
    }
    let mut offsets = Vec::new();
    for p in 0..PARTITIONS.get() {
        offsets.push(model.applied_offset(p).await.expect("applied"));
    }
    let mut listed = list_all(model, 7).await;
    listed.sort_unstable();
    (rows, offsets, listed)
}

fn rows_batch(messages: &[String], applied: &[(u32, Offset)]) -> ProjectionBatch {
    ProjectionBatch {
        messages: messages
            .iter()
            .map(|m| (Digest::of(m), m.clone()))
            .collect(),
        applied: applied.to_vec(),
    }
}

/// The `ReadModel` contract: apply / get / applied offsets that never move backwards /
/// idempotent apply / a stable listing cursor.
async fn read_model_conforms(model: &dyn ReadModel) {
    let nothing = Digest::of("nothing");
    assert_eq!(model.get(&nothing).await.expect("get"), None);
    assert_eq!(model.applied_offset(0).await.expect("applied"), None);
    assert!(model.list(None, 10).await.expect("list").is_empty());

    let messages: Vec<String> = std::iter::once(String::new())
        .chain(std::iter::once("héllo 🌍 日本 \"q\"\n".to_owned()))
        .chain((0..98).map(|i| format!("listed {i}")))
        .collect();
    let mut stored: HashSet<Digest> = messages.iter().map(|m| Digest::of(m)).collect();
    let batch = rows_batch(&messages, &[(0, 41), (2, 7)]);
    model.apply(&batch).await.expect("apply");
    for m in &messages {
        assert_eq!(
            model.get(&Digest::of(m)).await.expect("get").as_deref(),
            Some(m.as_str())
        );
    }
    assert_eq!(model.applied_offset(0).await.expect("applied"), Some(41));
    assert_eq!(model.applied_offset(1).await.expect("applied"), None);
    assert_eq!(model.applied_offset(2).await.expect("applied"), Some(7));

    // `apply` is idempotent: the same batch twice leaves what it left once.
    let digests: Vec<Digest> = messages.iter().map(|m| Digest::of(m)).collect();
    let once = observe(model, &digests).await;
    assert_eq!(once.2.len(), messages.len());
    model.apply(&batch).await.expect("apply again");
    assert_eq!(
        observe(model, &digests).await,
        once,
        "applying a batch twice leaves the state of applying it once"
    );

    // Applied offsets never move backwards: a stale batch (a zombie group member finishing
    // an old batch) still writes its rows, which are idempotent upserts, but leaves the
    // recorded offset.
    let stale = vec!["stale row".to_owned()];
    model
        .apply(&rows_batch(&stale, &[(0, 30)]))
        .await
        .expect("apply stale");
    stored.insert(Digest::of(&stale[0]));
    assert_eq!(
        model.applied_offset(0).await.expect("applied"),
        Some(41),
        "a stale batch must not move partition 0's applied offset back from 41 to 30"
    );
    assert_eq!(
        model
            .get(&Digest::of(&stale[0]))
            .await
            .expect("get")
            .as_deref(),
        Some("stale row"),
        "the stale batch's row is readable"
    );
    // Two projectors racing on one partition end at the higher offset, whichever lands last.
    for round in 0..8 {
        let base: Offset = 100 * round;
        let old = vec![format!("race {round} old")];
        let new = vec![format!("race {round} new")];
        let stale = rows_batch(&old, &[(1, base + 10), (0, 20)]);
        let fresh = rows_batch(&new, &[(1, base + 50)]);
        let (a, b) = if round % 2 == 0 {
            tokio::join!(model.apply(&stale), model.apply(&fresh))
        } else {
            tokio::join!(model.apply(&fresh), model.apply(&stale))
        };
        a.expect("racing apply");
        b.expect("racing apply");
        stored.insert(Digest::of(&old[0]));
        stored.insert(Digest::of(&new[0]));
        assert_eq!(
            model.applied_offset(1).await.expect("applied"),
            Some(base + 50),
            "round {round}: racing applies of offsets {} and {} end at the maximum",
            base + 10,
            base + 50
        );
        assert_eq!(model.applied_offset(0).await.expect("applied"), Some(41));
    }

    // The listing is complete, each digest once.
    let listed = list_all(model, 7).await;
    let unique: HashSet<Digest> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "each digest listed once");
    assert_eq!(unique, stored, "the listing is complete");

    // A listing cursor is stable: rows added between pages never make a digest stored
    // before the listing began disappear or appear twice.
    let mut added: HashSet<Digest> = HashSet::new();
    let mut seen: Vec<Digest> = Vec::new();
    let mut after: Option<Digest> = None;
    for page_no in 0.. {
        assert!(page_no < 1000, "the listing does not end");
        let page = model.list(after.as_ref(), 7).await.expect("list");
        assert!(page.len() <= 7);
        seen.extend(page.iter().copied());
        let more: Vec<String> = (0..3).map(|i| format!("added {page_no}.{i}")).collect();
        model
            .apply(&rows_batch(&more, &[(2, 8 + page_no)]))
            .await
            .expect("apply between pages");
        added.extend(more.iter().map(|m| Digest::of(m)));
        match page.last() {
            Some(last) if page.len() == 7 => after = Some(*last),
            _ => break,
        }
    }
    let mut counts: BTreeMap<Digest, usize> = BTreeMap::new();
    for d in &seen {
        *counts.entry(*d).or_default() += 1;
    }
    let twice: Vec<&Digest> = counts
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(d, _)| d)
        .collect();
    assert!(twice.is_empty(), "digests listed twice: {twice:?}");
    let missing = stored.iter().filter(|d| !counts.contains_key(d)).count();
    assert_eq!(
        missing, 0,
        "every digest stored before the listing began is listed"
    );
    assert!(
        counts
            .keys()
            .all(|d| stored.contains(d) || added.contains(d)),
        "only stored digests are listed"
    );
}

/// `rewind` moves a partition's next record back; later records follow on from there.
async fn rewind_conforms(log: &dyn EventLog) {
    for i in 0..4 {
        log.append(0, &MessageHashed::new(format!("rewind {i}")))
            .await
            .expect("append");
    }
    let end = log.end_offset(0).await.expect("end");
    let total: i64 = {
        let mut t = 0;
        for p in 0..PARTITIONS.get() {
            t += log.end_offset(p).await.expect("end");
        }
        t
    };
    let mut sub = log
        .subscribe("conformance-rewind")
        .await
        .expect("subscribe");
    let all = drain(sub.as_mut(), usize::try_from(total).expect("count")).await;
    assert!(all.iter().any(|r| r.partition == 0 && r.offset == end - 1));
    sub.rewind(0, end - 3).await.expect("rewind");
    let again = drain(sub.as_mut(), 3).await;
    let offsets: Vec<(u32, Offset)> = again.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(offsets, vec![(0, end - 3), (0, end - 2), (0, end - 1)]);
    let last =
        MessageHashed::decode(again[2].key.as_deref(), again[2].value.as_deref()).expect("decodes");
    assert_eq!(last.message, "rewind 3");
}

/// The generation catalog: states, separate storage per generation, the switch seen by a
/// `LiveModel`, drop.
async fn generations_conform(generations: Arc<dyn ModelGenerations>) {
    assert_eq!(
        generations.state().await.expect("state"),
        GenerationState::default(),
        "a fresh store has generation 0 active"
    );
    let live = LiveModel::open(generations.clone()).await.expect("live");
    assert_eq!(live.generation(), 0);
    let old = generations.open(0).await.expect("open 0");
    let mut batch = ProjectionBatch::default();
    batch.push_event(0, 0, MessageHashed::new("old".into()));
    old.apply(&batch).await.expect("apply to 0");

    generations.begin(1).await.expect("begin");
    let state = generations.state().await.expect("state");
    assert_eq!((state.active, state.pending), (0, Some(1)));
    let new = generations.open(1).await.expect("open 1");
    assert_eq!(
        new.get(&Digest::of("old")).await.expect("get"),
        None,
        "separate storage"
    );
    assert_eq!(new.applied_offset(0).await.expect("applied"), None);
    let mut batch = ProjectionBatch::default();
    batch.push_event(0, 0, MessageHashed::new("old".into()));
    batch.push_event(0, 1, MessageHashed::new("new".into()));
    new.apply(&batch).await.expect("apply to 1");
    assert_eq!(
        live.refresh().await.expect("refresh"),
        0,
        "not switched yet"
    );
    assert_eq!(live.get(&Digest::of("new")).await.expect("get"), None);

    generations.activate(1).await.expect("activate");
    let state = generations.state().await.expect("state");
    assert_eq!((state.active, state.pending, state.adopted), (1, None, 0));
    assert_eq!(live.refresh().await.expect("refresh"), 1);
    assert_eq!(live.generation(), 1);
    assert_eq!(
        live.get(&Digest::of("new")).await.expect("get").as_deref(),
        Some("new")
    );
    assert_eq!(live.applied_offset(0).await.expect("applied"), Some(1));
    generations.adopt(1).await.expect("adopt");
    assert_eq!(generations.state().await.expect("state").adopted, 1);

    assert_eq!(generations.list().await.expect("list"), vec![0, 1]);
    let refused = generations.drop_generation(1).await;
    assert!(
        matches!(refused, Err(msghash_common::ModelError::Refused(_))),
        "the active generation cannot be dropped: {refused:?}"
    );
    generations.drop_generation(0).await.expect("drop 0");
    assert_eq!(generations.list().await.expect("list"), vec![1]);
    assert_eq!(
        live.get(&Digest::of("old")).await.expect("get").as_deref(),
        Some("old"),
        "the active generation keeps its rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_generations_conform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generations = EmbeddedGenerations::open(dir.path()).expect("generations");
    generations_conform(Arc::new(generations)).await;
    assert!(
        !dir.path().join("readmodel.redb").exists(),
        "dropped file deleted"
    );
    assert!(
        !dir.path().join("readmodel.rows").exists(),
        "dropped rows deleted"
    );
    // The catalog survives a reopen.
    let reopened = EmbeddedGenerations::open(dir.path()).expect("reopen");
    assert_eq!(reopened.state().await.expect("state").active, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_generations_conform() {
    let settings = servers::scylla_settings("generations");
    let generations = ScyllaGenerations::connect(&settings).await.expect("scylla");
    generations_conform(Arc::new(generations)).await;
    // Another process sees the same catalog.
    let other = ScyllaGenerations::connect(&settings)
        .await
        .expect("reconnect");
    assert_eq!(other.state().await.expect("state").active, 1);
    assert_eq!(other.list().await.expect("list"), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_adapters_conform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EmbeddedLog::open(dir.path(), PARTITIONS).expect("log");
    event_log_conforms(&log).await;
    rewind_conforms(&log).await;
    let model = EmbeddedModel::open(dir.path()).expect("model");
    read_model_conforms(&model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_scylla_adapters_conform() {
    let log = KafkaLog::connect(servers::kafka_settings("conformance", PARTITIONS))
        .await
        .expect("kafka");
    event_log_conforms(&log).await;
    rewind_conforms(&log).await;

    let model = ScyllaModel::connect(&servers::scylla_settings("conformance"))
        .await
        .expect("scylla");
    read_model_conforms(&model).await;
}
