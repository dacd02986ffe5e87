//! The embedded (redb) adapters: offsets, group commit, reopen, subscriptions and their
//! wake-ups, file locking across handles and processes, kill -9, and the read model.

use msghash_common::adapters::embedded::{rows_dir, EmbeddedError, EmbeddedLog, EmbeddedModel};
use msghash_common::ports::{LogError, LogRecord, Subscription};
use msghash_common::{
    partition_for, Digest, EventLog, MessageHashed, Offset, ProjectionBatch, ReadModel,
};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::num::NonZeroU32;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Long enough that a test hitting it has failed; results are asserted, not durations.
const GENEROUS: Duration = Duration::from_secs(30);

fn event(i: usize) -> MessageHashed {
    MessageHashed::new(format!("message {i}"))
}

fn n(count: u32) -> NonZeroU32 {
    NonZeroU32::new(count).expect("a partition count")
}

fn open_log(dir: &Path, partitions: u32) -> EmbeddedLog {
    EmbeddedLog::open(dir, n(partitions)).expect("open log")
}

/// Reads until `want` records arrived; every call waits for data, so an empty batch means
/// the records never came.
async fn collect(sub: &mut dyn Subscription, want: usize) -> Vec<LogRecord> {
    let mut got = Vec::new();
    while got.len() < want {
        let batch = sub.next_batch(7, GENEROUS).await.expect("next batch");
        assert!(
            !batch.is_empty(),
            "only {} of {want} records came",
            got.len()
        );
        got.extend(batch);
    }
    got
}

/// Per partition, the offsets in the order they were handed out.
fn offsets_by_partition(records: &[LogRecord]) -> BTreeMap<u32, Vec<Offset>> {
    let mut by = BTreeMap::<u32, Vec<Offset>>::new();
    for r in records {
        by.entry(r.partition).or_default().push(r.offset);
    }
    by
}

#[tokio::test]
async fn appends_get_contiguous_offsets_per_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 3);
    assert_eq!(log.partitions(), n(3));
    for p in 0..3 {
        assert_eq!(log.end_offset(p).await.expect("end"), 0);
    }
    for i in 0..12 {
        let p = (i % 3) as u32;
        let offset = log.append(p, &event(i)).await.expect("append");
        assert_eq!(offset, (i / 3) as Offset, "append {i} to partition {p}");
        assert_eq!(log.end_offset(p).await.expect("end"), offset + 1);
    }
    for p in 0..3 {
        assert_eq!(log.end_offset(p).await.expect("end"), 4);
    }
}

#[tokio::test]
async fn out_of_range_partitions_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 2);
    assert!(matches!(
        log.append(2, &event(0)).await,
        Err(LogError::Rejected(_))
    ));
    assert!(matches!(
        log.end_offset(7).await,
        Err(LogError::Rejected(_))
    ));
    let mut sub = log.subscribe("g").await.expect("subscribe");
    assert!(matches!(
        sub.commit(&[(5, 0)]).await,
        Err(LogError::Rejected(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_distinct_offsets_in_few_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(open_log(dir.path(), 4));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                let e = event(i);
                let p = partition_for(&e.digest, n(4));
                (p, log.append(p, &e).await.expect("append"))
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in tasks {
        let (p, offset) = t.await.expect("task");
        assert!(
            seen.insert((p, offset)),
            "offset {offset} of {p} given twice"
        );
    }
    let mut total = 0;
    for p in 0..4 {
        let end = log.end_offset(p).await.expect("end");
        // Distinct offsets below the end, as many as the end: exactly 0..end.
        assert_eq!(seen.iter().filter(|(q, _)| *q == p).count() as Offset, end);
        assert!(seen.iter().all(|&(q, o)| q != p || o < end));
        total += end;
    }
    assert_eq!(total, 1000);
    let transactions = log.committed_transactions();
    println!("1000 concurrent appends committed in {transactions} transactions");
    assert!(
        transactions < 1000,
        "group commit must share transactions, got {transactions}"
    );
}

#[tokio::test]
async fn reopen_keeps_records_and_end_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events: Vec<_> = (0..10).map(event).collect();
    {
        let log = open_log(dir.path(), 2);
        for (i, e) in events.iter().enumerate() {
            log.append((i % 2) as u32, e).await.expect("append");
        }
    }
    let log = open_log(dir.path(), 2);
    assert_eq!(log.end_offset(0).await.expect("end"), 5);
    assert_eq!(log.end_offset(1).await.expect("end"), 5);
    let mut sub = log.subscribe("reader").await.expect("subscribe");
    let got = collect(sub.as_mut(), 10).await;
    for r in &got {
        let e = &events[r.offset as usize * 2 + r.partition as usize];
        assert_eq!(r.key.as_deref(), Some(e.key()));
        assert_eq!(r.value.as_deref(), Some(&e.encode()[..]));
        let decoded = MessageHashed::decode(r.key.as_deref(), r.value.as_deref()).expect("decode");
        assert_eq!(decoded.message, e.message);
    }
    // Appending continues where the log ended.
    assert_eq!(log.append(1, &event(99)).await.expect("append"), 5);
}

#[tokio::test]
async fn reopening_with_another_partition_count_fails_naming_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open_log(dir.path(), 8));
    let err = match EmbeddedLog::open(dir.path(), n(3)) {
        Ok(_) => panic!("another partition count must be refused"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        text.contains('8') && text.contains('3'),
        "names both counts: {text}"
    );
    assert!(matches!(
        err,
        EmbeddedError::PartitionMismatch {
            stored: 8,
            requested: 3,
            ..
        }
    ));
    // The refused open changed nothing.
    drop(open_log(dir.path(), 8));
}

#[tokio::test]
async fn next_batch_returns_everything_in_partition_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 4);
    for i in 0..40 {
        let e = event(i);
        log.append(partition_for(&e.digest, n(4)), &e)
            .await
            .expect("append");
    }
    let mut sub = log.subscribe("all").await.expect("subscribe");
    let got = collect(sub.as_mut(), 40).await;
    assert_eq!(got.len(), 40);
    let mut total = 0;
    for (p, offsets) in offsets_by_partition(&got) {
        let end = log.end_offset(p).await.expect("end");
        assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "partition {p}");
        total += offsets.len();
    }
    assert_eq!(total, 40);
    // Nothing more: a short wait returns an empty batch.
    let rest = sub
        .next_batch(10, Duration::from_millis(20))
        .await
        .expect("batch");
    assert!(rest.is_empty());
}

#[tokio::test]
async fn a_batch_of_large_messages_stops_at_the_byte_bound_and_loses_nothing() {
    use msghash_common::adapters::embedded::MAX_READ_BYTES;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 2);
    // 4 MiB each: the byte bound holds 8 of them, far fewer than the 1,000 asked for.
    let per_message = 4 * 1024 * 1024;
    let count = MAX_READ_BYTES / per_message + 4;
    for i in 0..count {
        let e = MessageHashed::new(format!("{i} {}", "x".repeat(per_message)));
        log.append(u32::try_from(i % 2).expect("partition"), &e)
            .await
            .expect("append");
    }
    let mut sub = log.subscribe("large").await.expect("subscribe");
    let first = sub.next_batch(1_000, GENEROUS).await.expect("batch");
    let bytes: usize = first
        .iter()
        .map(|r| r.value.as_ref().map_or(0, Vec::len))
        .sum();
    assert!(
        !first.is_empty() && first.len() < count,
        "{} records in one batch",
        first.len()
    );
    assert!(
        bytes < MAX_READ_BYTES + 2 * per_message,
        "{bytes} bytes in one batch"
    );
    // The rest comes next, each record once, in order per partition.
    let mut got = first;
    let rest = count - got.len();
    got.extend(collect(sub.as_mut(), rest).await);
    assert_eq!(got.len(), count);
    for (p, offsets) in offsets_by_partition(&got) {
        let end = log.end_offset(p).await.expect("end");
        assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "partition {p}");
    }
}

#[tokio::test]
async fn large_messages_in_one_partition_do_not_starve_the_others() {
    use msghash_common::adapters::embedded::MAX_READ_BYTES;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 2);
    // Each partition holds more than two byte-bounded batches.
    let per_message = 4 * 1024 * 1024;
    let per_partition = 2 * MAX_READ_BYTES / per_message + 4;
    for i in 0..2 * per_partition {
        let e = MessageHashed::new(format!("{i} {}", "y".repeat(per_message)));
        log.append(u32::try_from(i % 2).expect("partition"), &e)
            .await
            .expect("append");
    }
    let mut sub = log.subscribe("fair-bytes").await.expect("subscribe");
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let batch = sub.next_batch(100_000, GENEROUS).await.expect("batch");
        seen.extend(batch.iter().map(|r| r.partition));
    }
    assert_eq!(
        seen,
        HashSet::from([0, 1]),
        "two batches read only {seen:?}"
    );
}

#[tokio::test]
async fn a_busy_partition_does_not_starve_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 3);
    for i in 0..50 {
        log.append(0, &event(i)).await.expect("append");
    }
    log.append(2, &event(50)).await.expect("append");
    let mut sub = log.subscribe("fair").await.expect("subscribe");
    let batch = sub.next_batch(10, GENEROUS).await.expect("batch");
    assert_eq!(batch.len(), 10);
    assert!(batch.iter().any(|r| r.partition == 2), "{batch:?}");
}

#[tokio::test]
async fn a_waiting_next_batch_wakes_when_an_append_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 2);
    let mut sub = log.subscribe("waiter").await.expect("subscribe");
    let e = event(7);
    // On this single-threaded runtime `join!` polls `next_batch` first: it finds nothing and
    // parks; only then does the append start. With no wake-up it would wait 30 s and return
    // an empty batch, which fails below.
    let (batch, offset) = tokio::join!(sub.next_batch(10, GENEROUS), log.append(1, &e));
    assert_eq!(offset.expect("append"), 0);
    let batch = batch.expect("batch");
    assert_eq!(batch.len(), 1, "{batch:?}");
    assert_eq!(batch[0].partition, 1);
    assert_eq!(batch[0].offset, 0);
    assert_eq!(batch[0].key.as_deref(), Some(e.key()));

    // The same from another task on a pool thread: a spawned append also wakes the waiter.
    let log = Arc::new(log);
    let appender = {
        let log = log.clone();
        tokio::spawn(async move { log.append(0, &event(8)).await.expect("append") })
    };
    let batch = sub.next_batch(10, GENEROUS).await.expect("batch");
    assert_eq!(appender.await.expect("appender"), 0);
    assert_eq!(batch.len(), 1, "{batch:?}");
    assert_eq!((batch[0].partition, batch[0].offset), (0, 0));
}

#[tokio::test]
async fn commits_resume_groups_and_new_groups_replay_from_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 2);
    for i in 0..10 {
        log.append((i % 2) as u32, &event(i)).await.expect("append");
    }
    let mut sub = log.subscribe("g1").await.expect("subscribe");
    let got = collect(sub.as_mut(), 10).await;
    assert_eq!(got.len(), 10);
    // Done: offsets 0..=2 of partition 0 and 0..=3 of partition 1.
    sub.commit(&[(0, 2), (1, 3)]).await.expect("commit");
    // Committing less later never moves a position back.
    sub.commit(&[(0, 0)]).await.expect("commit");
    // A commit past the end of the log is refused.
    assert!(matches!(
        sub.commit(&[(0, 5)]).await,
        Err(LogError::Rejected(_))
    ));
    drop(sub);

    let mut again = log.subscribe("g1").await.expect("subscribe");
    let rest = collect(again.as_mut(), 3).await;
    assert_eq!(
        offsets_by_partition(&rest),
        BTreeMap::from([(0, vec![3, 4]), (1, vec![4])])
    );

    let mut fresh = log.subscribe("g2").await.expect("subscribe");
    assert_eq!(collect(fresh.as_mut(), 10).await.len(), 10);

    // Committed positions survive a reopen.
    drop((again, fresh, log));
    let log = open_log(dir.path(), 2);
    let mut after = log.subscribe("g1").await.expect("subscribe");
    let rest = collect(after.as_mut(), 3).await;
    assert_eq!(
        offsets_by_partition(&rest),
        BTreeMap::from([(0, vec![3, 4]), (1, vec![4])])
    );
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), 2);
    log.append(0, &event(0)).await.expect("append");
    let model = EmbeddedModel::open(dir.path()).expect("open model");

    let err = match EmbeddedLog::open(dir.path(), n(2)) {
        Ok(_) => panic!("a second handle must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, EmbeddedError::InUse { .. }), "{err:?}");
    let text = err.to_string();
    let expected = format!(
        "data directory {} is in use by another msghash process",
        dir.path().display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(matches!(
        EmbeddedModel::open(dir.path()),
        Err(EmbeddedError::InUse { .. })
    ));

    // The refused opens left the holders working and the files intact.
    assert_eq!(log.append(0, &event(1)).await.expect("append"), 1);
    drop((log, model));
    let log = open_log(dir.path(), 2);
    assert_eq!(log.end_offset(0).await.expect("end"), 2);
    drop(EmbeddedModel::open(dir.path()).expect("reopen model"));
}

const CHILD_DIR: &str = "MSGHASH_EMBEDDED_TEST_CHILD_DIR";
/// Acknowledged appends the child has before it says it holds the directory.
const CHILD_ACKS_BEFORE_HOLDING: usize = 200;
const CHILD_WRITERS: usize = 16;

/// The child's side of `another_process_is_refused_and_kill_9_loses_nothing`, which runs
/// this test binary again with `CHILD_DIR` set: it opens the log and the read model like a
/// running msghash, appends without end from several tasks, prints every acknowledged
/// offset, and says when it holds the directory; the parent kills it mid-append.
async fn hold_the_directory_and_append(dir: &Path) {
    let log = Arc::new(open_log(dir, 4));
    let _model = EmbeddedModel::open(dir).expect("the child opens the read model");
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    for writer in 0..CHILD_WRITERS {
        let (log, acks, enough) = (log.clone(), acks.clone(), enough.clone());
        tokio::spawn(async move {
            for i in (writer..).step_by(CHILD_WRITERS) {
                let e = event(i);
                let p = partition_for(&e.digest, n(4));
                let offset = log.append(p, &e).await.expect("append");
                println!("acked {i} {p} {offset}");
                let n = acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if n == CHILD_ACKS_BEFORE_HOLDING {
                    enough.notify_one();
                }
            }
        });
    }
    enough.notified().await;
    println!("holding");
    // Appends go on until the kill; a closed stdin (the parent died) ends the wait too.
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
}

/// `(message index, partition, offset)` from a child's "acked" line. libtest may have
/// started the line with "test <name> ... ".
fn parse_ack(line: &str) -> Option<(usize, u32, Offset)> {
    let (_, rest) = line.split_once("acked ")?;
    let mut fields = rest.split(' ');
    let ack = (
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
    );
    fields.next().is_none().then_some(ack)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_is_refused_and_kill_9_loses_nothing() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        return hold_the_directory_and_append(Path::new(&dir)).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "another_process_is_refused_and_kill_9_loses_nothing",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let mut acked = Vec::new();
    let mut holding = false;
    for line in lines.by_ref() {
        let line = line.expect("child output");
        if let Some(ack) = parse_ack(&line) {
            acked.push(ack);
        } else if line.ends_with("holding") {
            holding = true;
            break;
        }
    }
    assert!(holding, "the child never opened the directory");
    assert!(acked.len() >= CHILD_ACKS_BEFORE_HOLDING);

    let err = match EmbeddedLog::open(dir.path(), n(4)) {
        Ok(_) => panic!("another process holds the directory"),
        Err(e) => e,
    };
    assert!(matches!(err, EmbeddedError::InUse { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("is in use by another msghash process"),
        "{err}"
    );
    assert!(
        matches!(
            EmbeddedModel::open(dir.path()),
            Err(EmbeddedError::InUse { .. })
        ),
        "the read model is refused too"
    );

    // SIGKILL in the middle of the appends: no destructor, no flush, no unlock of its own.
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    // Everything the child printed before it died was acknowledged before it died.
    for line in lines {
        let Ok(line) = line else { break };
        acked.extend(parse_ack(&line));
    }

    let log = open_log(dir.path(), 4);
    let mut total = 0;
    for p in 0..4 {
        total += log.end_offset(p).await.expect("end") as usize;
    }
    assert!(
        total >= acked.len(),
        "{total} records, {} acked",
        acked.len()
    );
    let mut sub = log.subscribe("after-kill").await.expect("subscribe");
    // Reading everything also checks that offsets are contiguous (the adapter refuses gaps).
    let got = collect(sub.as_mut(), total).await;
    let stored: BTreeMap<(u32, Offset), &LogRecord> =
        got.iter().map(|r| ((r.partition, r.offset), r)).collect();
    for &(i, p, offset) in &acked {
        let record = stored
            .get(&(p, offset))
            .unwrap_or_else(|| panic!("acknowledged append {i} at {p}/{offset} lost"));
        let decoded =
            MessageHashed::decode(record.key.as_deref(), record.value.as_deref()).expect("decode");
        assert_eq!(decoded.message, event(i).message);
    }
    println!(
        "{} acknowledged appends, {total} records after kill -9",
        acked.len()
    );
    // The log goes on where it ended.
    let end = log.end_offset(0).await.expect("end");
    assert_eq!(
        log.append(0, &event(usize::MAX)).await.expect("append"),
        end
    );
}

// ---------------------------------------------------------------------------------------
// Read model
// ---------------------------------------------------------------------------------------

fn batch(messages: &[&str], applied: &[(u32, Offset)]) -> ProjectionBatch {
    ProjectionBatch {
        messages: messages
            .iter()
            .map(|m| (Digest::of(m), (*m).to_owned()))
            .collect(),
        applied: applied.to_vec(),
    }
}

#[tokio::test]
async fn model_applies_idempotently_and_offsets_never_go_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = EmbeddedModel::open(dir.path()).expect("open model");
    assert_eq!(model.get(&Digest::of("foo")).await.expect("get"), None);
    assert_eq!(model.applied_offset(0).await.expect("offset"), None);

    let b = batch(&["foo", "bar"], &[(0, 4), (3, 9)]);
    model.apply(&b).await.expect("apply");
    model.apply(&b).await.expect("apply again");
    assert_eq!(
        model.get(&Digest::of("foo")).await.expect("get").as_deref(),
        Some("foo")
    );
    assert_eq!(
        model.get(&Digest::of("bar")).await.expect("get").as_deref(),
        Some("bar")
    );
    assert_eq!(model.applied_offset(0).await.expect("offset"), Some(4));
    assert_eq!(model.applied_offset(3).await.expect("offset"), Some(9));
    assert_eq!(model.applied_offset(1).await.expect("offset"), None);
    assert_eq!(model.list(None, 100).await.expect("list").len(), 2);

    // A replayed older batch does not move an offset back.
    model
        .apply(&batch(&["foo"], &[(0, 1), (3, 12)]))
        .await
        .expect("apply");
    assert_eq!(model.applied_offset(0).await.expect("offset"), Some(4));
    assert_eq!(model.applied_offset(3).await.expect("offset"), Some(12));

    // An offset-only batch (dead letters) advances without rows.
    model.apply(&batch(&[], &[(1, 0)])).await.expect("apply");
    assert_eq!(model.applied_offset(1).await.expect("offset"), Some(0));
    model
        .apply(&ProjectionBatch::default())
        .await
        .expect("empty");

    drop(model);
    let model = EmbeddedModel::open(dir.path()).expect("reopen model");
    assert_eq!(
        model.get(&Digest::of("bar")).await.expect("get").as_deref(),
        Some("bar")
    );
    assert_eq!(model.applied_offset(0).await.expect("offset"), Some(4));
    assert_eq!(model.applied_offset(3).await.expect("offset"), Some(12));
    assert_eq!(model.applied_offset(1).await.expect("offset"), Some(0));
}

#[tokio::test]
async fn model_lists_every_digest_once_in_byte_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = EmbeddedModel::open(dir.path()).expect("open model");
    let messages: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    let mut b = ProjectionBatch::default();
    for (i, m) in messages.iter().enumerate() {
        b.push_event(0, i as Offset, MessageHashed::new(m.clone()));
    }
    model.apply(&b).await.expect("apply");

    let mut visited = Vec::new();
    let mut after = None;
    loop {
        let page = model.list(after.as_ref(), 7).await.expect("list");
        assert!(page.len() <= 7);
        match page.last() {
            Some(last) => after = Some(*last),
            None => break,
        }
        visited.extend(page);
    }
    let mut expected: Vec<Digest> = messages.iter().map(|m| Digest::of(m)).collect();
    expected.sort();
    assert_eq!(visited, expected, "each digest once, ascending byte order");
    assert!(model.list(None, 0).await.expect("list").is_empty());
}

#[tokio::test]
async fn model_round_trips_empty_and_unicode_messages_byte_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let samples = [
        "",
        "héllo wörld",
        "日本語のメッセージ",
        "emoji 🦀👩‍👩‍👧 and combining e\u{301}",
        "nul \u{0} and newline\r\n",
    ];
    {
        let model = EmbeddedModel::open(dir.path()).expect("open model");
        model
            .apply(&batch(&samples, &[(0, 0)]))
            .await
            .expect("apply");
        for s in samples {
            let got = model.get(&Digest::of(s)).await.expect("get");
            assert_eq!(got.as_deref().map(str::as_bytes), Some(s.as_bytes()));
        }
    }
    let model = EmbeddedModel::open(dir.path()).expect("reopen model");
    for s in samples {
        let got = model.get(&Digest::of(s)).await.expect("get");
        assert_eq!(got.as_deref().map(str::as_bytes), Some(s.as_bytes()));
    }
}

/// The read model's durable commit fails (its disk is full) while rows applied since the
/// last one are kept in memory: the failure is an error worth a retry, no reader sees an
/// applied offset whose row is missing, and once the disk takes writes again the rows are
/// read back and are durable (in what a kill -9 would leave), without a new handle.
///
/// Needs root: it mounts a small tmpfs and fills it.
#[tokio::test]
async fn a_failed_durable_commit_keeps_the_rows_in_memory_until_the_disk_takes_writes() {
    use msghash_common::adapters::embedded::MODEL_FILE;
    use msghash_common::ports::ModelError;
    use msghash_testkit::tmpfs::{fill, Tmpfs};

    let root = tempfile::tempdir().expect("tempdir");
    let tmpfs = Tmpfs::mount(&root.path().join("model"), "8m");
    // Durable by size or by `sync` only, so that the test says when the commit happens.
    let model = EmbeddedModel::open(tmpfs.dir())
        .expect("open model")
        .durable_every(Duration::from_secs(3600));
    let row = |i: usize| format!("kept {i} {}", "x".repeat(4096));
    let durable = row(0);
    let first = ProjectionBatch {
        messages: vec![(Digest::of(&durable), durable.clone())],
        applied: vec![(0, 0)],
    };
    model.apply(&first).await.expect("apply");
    model.sync().await.expect("sync");

    // Ten small batches, 400 rows of 4 KiB in all: kept in memory, the file untouched.
    let kept: Vec<String> = (1..=400).map(row).collect();
    for (i, rows) in kept.chunks(40).enumerate() {
        let batch = ProjectionBatch {
            messages: rows.iter().map(|m| (Digest::of(m), m.clone())).collect(),
            applied: vec![(0, i as Offset + 1)],
        };
        model.apply(&batch).await.expect("apply, in memory");
    }
    assert_eq!(model.applied_offset(0).await.expect("applied"), Some(10));

    let filler = tmpfs.dir().join("filler");
    let filled = fill(&filler);
    eprintln!("filled the tmpfs with {filled} bytes");
    match model.sync().await {
        Err(ModelError::Unavailable { .. }) => {}
        other => panic!("a durable commit on a full disk must fail as unavailable: {other:?}"),
    }

    // While the disk is full: an error (the file is being opened again, which must write
    // the kept rows first) or the row, never an applied offset without its row.
    for message in [&durable, &kept[0], &kept[399]] {
        let found = model.get(&Digest::of(message)).await;
        assert!(
            !matches!(found, Ok(None)),
            "a row applied before the failure read as missing"
        );
    }
    if let Ok(offset) = model.applied_offset(0).await {
        assert_eq!(offset, Some(10), "the applied offset went back");
        for message in &kept {
            let found = model.get(&Digest::of(message)).await.expect("get");
            assert_eq!(found.as_deref(), Some(message.as_str()));
        }
    }

    // Space again: the next read opens the file again, which writes the kept rows durably
    // first (no sync here), and every row is read back.
    std::fs::remove_file(&filler).expect("free the tmpfs");
    assert_eq!(model.applied_offset(0).await.expect("applied"), Some(10));
    for message in std::iter::once(&durable).chain(&kept) {
        let found = model.get(&Digest::of(message)).await.expect("get");
        assert_eq!(
            found.as_deref(),
            Some(message.as_str()),
            "a kept row was lost"
        );
    }
    let image = tempfile::tempdir().expect("tempdir");
    std::fs::copy(model.path(), image.path().join(MODEL_FILE)).expect("copy the file");
    msghash_testkit::files::copy_tree(model.rows_path(), &image.path().join(rows_dir(0)));
    let crashed = EmbeddedModel::open(image.path()).expect("open the crash image");
    assert_eq!(crashed.applied_offset(0).await.expect("applied"), Some(10));
    for message in [&durable, &kept[0], &kept[399]] {
        let found = crashed.get(&Digest::of(message)).await.expect("get");
        assert_eq!(found.as_deref(), Some(message.as_str()), "not durable");
    }
    drop(model);
}
