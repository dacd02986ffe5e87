//! Disk errors: `msghash` with its data directory on a small tmpfs that is filled until a
//! commit fails, then freed. While it cannot write, POSTs get 503 with Retry-After and
//! `/health/ready` is 503; once space is back it recovers by itself, without a restart, and
//! nothing it acknowledged is lost.
//!
//! Needs root (it mounts a tmpfs): without it the test fails, saying so.

mod support;

use msghash_testkit::tmpfs::{fill, Tmpfs};
use reqwest::StatusCode;
use std::time::Duration;
use support::Msghash;

/// Long enough that a test hitting it has failed; results are asserted, not durations.
const GENEROUS: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_not_ready_then_recovers_without_a_restart() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let data = cwd.path().join("data");
    // Declared before msghash, so dropped after it: the process is gone before the umount.
    let tmpfs = Tmpfs::mount(&data, "24m");
    let data_dir = tmpfs.dir().to_string_lossy().into_owned();
    let mut m = Msghash::start(
        cwd.path(),
        &[
            ("MSGHASH_DATA_DIR", data_dir.as_str()),
            ("MSGHASH_REQUEST_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    m.await_status("/health/ready", StatusCode::OK, GENEROUS)
        .await;

    // Acknowledged before the disk fills: these must survive.
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for i in 0..20 {
        let message = format!("before the disk filled {i}");
        let answer = m.post(&message).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        acknowledged.push((answer.digest().expect("digest").to_owned(), message));
    }

    let filler = tmpfs.dir().join("filler");
    let filled = fill(&filler);
    eprintln!("filled the tmpfs with {filled} bytes");

    // POST (4 KiB messages, so the log needs new pages soon) until one fails.
    let padding = "x".repeat(4096);
    let mut failed = None;
    for i in 0..5_000 {
        let message = format!("while the disk fills {i} {padding}");
        let answer = m.post(&message).await;
        if answer.status == StatusCode::CREATED {
            acknowledged.push((answer.digest().expect("digest").to_owned(), message));
        } else {
            failed = Some(answer);
            break;
        }
    }
    let failed = failed.expect("a POST fails once the disk is full");
    eprintln!(
        "first failed POST after {} acknowledged: {failed:?}",
        acknowledged.len()
    );
    failed.assert_clean_503();
    // /health/ready says it cannot write: at once, or after the last probe's check, which
    // answers the probes of the next 250 ms.
    m.await_status(
        "/health/ready",
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(2),
    )
    .await;
    // Still full: a POST now is turned away, cleanly, and readiness stays 503.
    let again = m.post("while the disk is full").await;
    again.assert_clean_503();
    assert_eq!(
        m.status_of("/health/ready").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        m.child.try_wait().expect("try_wait").is_none(),
        "msghash is still running"
    );

    // Space comes back: msghash recovers by itself.
    std::fs::remove_file(&filler).expect("free the tmpfs");
    m.await_status("/health/ready", StatusCode::OK, GENEROUS)
        .await;
    let after = "after the disk was freed";
    let answer = m.post(after).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let digest = answer.digest().expect("digest").to_owned();
    assert_eq!(
        m.get_message(&digest, GENEROUS).await,
        (StatusCode::OK, after.to_owned()),
        "a POST and a GET round-trip after the recovery"
    );

    // Nothing acknowledged was lost.
    for (digest, message) in &acknowledged {
        let (status, stored) = m.get_message(digest, GENEROUS).await;
        assert_eq!(status, StatusCode::OK, "acknowledged {digest} is readable");
        assert_eq!(&stored, message);
    }
    assert!(
        m.child.try_wait().expect("try_wait").is_none(),
        "msghash never restarted"
    );
    drop(m);
    drop(tmpfs);
}
