//! Overload: `msghash` with a small write queue under many more concurrent POSTs than it
//! queues. The excess is shed at once with 503 + Retry-After (never queued without end, never
//! another 5xx), everything acknowledged is readable, and memory stays flat.

mod support;

use futures::stream::{self, StreamExt};
use msghash_testkit::exposition;
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Answer, Msghash};

const CLIENTS: usize = 256;
const LOAD_FOR: Duration = Duration::from_secs(10);
/// How long a POST may wait for the log: a shed answer comes long before it.
const REQUEST_TIMEOUT_MS: u64 = 60_000;
/// Memory may grow by this much under the overload and still count as flat.
const FLAT_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_is_shed_with_503_and_retry_after_and_memory_stays_flat() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data = cwd.path().join("data");
    let data_dir = data.to_string_lossy().into_owned();
    let timeout = REQUEST_TIMEOUT_MS.to_string();
    let mut m = Msghash::start(
        cwd.path(),
        &[
            ("MSGHASH_DATA_DIR", data_dir.as_str()),
            ("MSGHASH_WRITE_QUEUE", "16"),
            ("MSGHASH_REQUEST_TIMEOUT_MS", timeout.as_str()),
        ],
    )
    .await;
    m.await_status("/health/ready", StatusCode::OK, Duration::from_secs(60))
        .await;
    // Warm up (connections, caches, the first transactions) before the first measure.
    for i in 0..50 {
        assert_eq!(
            m.post(&format!("warm-up {i}")).await.status,
            StatusCode::CREATED
        );
    }
    let rss_before = m.rss_kib();

    let started = Instant::now();
    let client = m.client.clone();
    let base = Arc::new(m.base.clone());
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = client.clone();
            let base = base.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0;
                while started.elapsed() < LOAD_FOR {
                    let message = format!("overload {c} {i}");
                    let answer = support::post(&client, &base, &message).await;
                    seen.push((message, answer));
                    i += 1;
                }
                seen
            })
        })
        .collect();
    let mut answers: Vec<(String, Answer)> = Vec::new();
    for w in workers {
        answers.extend(w.await.expect("client task"));
    }
    let rss_after = m.rss_kib();

    let created: Vec<&(String, Answer)> = answers
        .iter()
        .filter(|(_, a)| a.status == StatusCode::CREATED)
        .collect();
    let shed: Vec<&Answer> = answers
        .iter()
        .map(|(_, a)| a)
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    let mut shed_ms: Vec<u128> = shed.iter().map(|a| a.elapsed.as_millis()).collect();
    shed_ms.sort_unstable();
    eprintln!(
        "{} POSTs from {CLIENTS} clients in {LOAD_FOR:?}: {} created, {} shed (503; latency \
         median {} ms, max {} ms); VmRSS before {rss_before} KiB, after {rss_after} KiB \
         ({:+} KiB)",
        answers.len(),
        created.len(),
        shed.len(),
        shed_ms.get(shed_ms.len() / 2).copied().unwrap_or(0),
        shed_ms.last().copied().unwrap_or(0),
        rss_after as i64 - rss_before as i64,
    );

    // Only 201 and the clean 503 of a shed: no other status, no other 5xx.
    for (message, answer) in &answers {
        assert!(
            matches!(
                answer.status,
                StatusCode::CREATED | StatusCode::SERVICE_UNAVAILABLE
            ),
            "{message}: {answer:?}"
        );
    }
    assert!(
        !shed.is_empty(),
        "a queue of 16 under {CLIENTS} clients sheds"
    );
    for answer in &shed {
        answer.assert_clean_503();
        // Answered at once, not after waiting out the request deadline.
        assert!(
            answer.elapsed < Duration::from_millis(REQUEST_TIMEOUT_MS / 2),
            "a shed is answered at once, not at the deadline: {answer:?}"
        );
    }
    assert!(
        !created.is_empty(),
        "the writer kept committing under overload"
    );

    let metrics = m
        .client
        .get(format!("{}/metrics", m.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let metrics = exposition::parse(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    let counted = metrics.sum("msghash_write_shed_total", &[]);
    assert!(
        counted >= shed.len() as f64,
        "msghash_write_shed_total {counted} counts every shed ({})",
        shed.len()
    );

    // Every acknowledged message is readable.
    let m = &m;
    let missing: Vec<String> = stream::iter(created)
        .map(|(message, answer)| async move {
            let digest = answer.digest().expect("a 201 names the digest");
            let (status, stored) = m.get_message(digest, Duration::from_secs(60)).await;
            (status == StatusCode::OK && &stored == message)
                .then_some(())
                .map_or(Some(format!("{digest}: {status}")), |()| None)
        })
        .buffer_unordered(32)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(
        missing.is_empty(),
        "acknowledged but not readable: {missing:?}"
    );

    assert!(
        rss_after < rss_before + FLAT_KIB,
        "memory grew from {rss_before} KiB to {rss_after} KiB under the overload"
    );
}
