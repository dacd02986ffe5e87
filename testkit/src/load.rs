//! Readers and a writer hammering a service while something else happens (a replay, a
//! switch of generations, a kill), recording every failure a client would have seen.

use crate::router;
use async_trait::async_trait;
use axum::http::StatusCode;
use axum::Router;
use msghash_common::Digest;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Something that answers the two calls of the HTTP contract: a router in process, or a
/// running server over HTTPS.
#[async_trait]
pub trait Target: Clone + Send + Sync + 'static {
    /// `GET /messages/{digest}`: the status and the JSON body (`Null` if it was not JSON).
    async fn get(&self, digest: &str) -> (StatusCode, serde_json::Value);
    /// `POST /messages`: the status and the JSON body.
    async fn post(&self, message: &str) -> (StatusCode, serde_json::Value);
}

#[async_trait]
impl Target for Router {
    async fn get(&self, digest: &str) -> (StatusCode, serde_json::Value) {
        let (status, _, body) = router::get_message(self, digest).await;
        (status, body)
    }
    async fn post(&self, message: &str) -> (StatusCode, serde_json::Value) {
        let (status, _, body) = router::post_message(self, message).await;
        (status, body)
    }
}

/// A running server, over HTTPS.
#[derive(Clone)]
pub struct Https {
    pub client: reqwest::Client,
    /// `https://host:port`, no trailing slash.
    pub base: String,
}

async fn json_of(r: Result<reqwest::Response, reqwest::Error>) -> (StatusCode, serde_json::Value) {
    match r {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::IM_A_TEAPOT);
            (status, r.json().await.unwrap_or_default())
        }
        // A connection that failed is a failure the client saw; report it as a 502.
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            serde_json::json!({ "client_error": e.to_string() }),
        ),
    }
}

#[async_trait]
impl Target for Https {
    async fn get(&self, digest: &str) -> (StatusCode, serde_json::Value) {
        json_of(
            self.client
                .get(format!("{}/messages/{digest}", self.base))
                .send()
                .await,
        )
        .await
    }
    async fn post(&self, message: &str) -> (StatusCode, serde_json::Value) {
        let body = serde_json::json!({ "message": message });
        json_of(
            self.client
                .post(format!("{}/messages", self.base))
                .json(&body)
                .send()
                .await,
        )
        .await
    }
}

/// What the hammer saw, once stopped.
#[derive(Debug, Default)]
pub struct Report {
    /// GETs answered.
    pub reads: u64,
    /// Every answer that was not what a client expects: a GET of a known message that was not
    /// `200` with that message, a POST that was not `201`.
    pub failures: Vec<String>,
    /// Every message the writer got a `201` for.
    pub written: BTreeMap<Digest, String>,
}

/// Four readers GET known messages in a loop; one writer POSTs new ones.
pub struct Hammer {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    written: Arc<Mutex<BTreeMap<Digest, String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How many readers run beside the one writer.
pub const READERS: usize = 4;

impl Hammer {
    /// Starts the readers on `known` (which must not be empty) and the writer, whose
    /// messages start with `label`.
    pub fn start<T: Target>(target: &T, known: Arc<Vec<(Digest, String)>>, label: &str) -> Hammer {
        assert!(!known.is_empty(), "the readers need known messages");
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(Mutex::new(BTreeMap::new()));
        let mut tasks = Vec::new();
        for reader in 0..READERS {
            let (target, known, stop, reads, failures) = (
                target.clone(),
                known.clone(),
                stop.clone(),
                reads.clone(),
                failures.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = reader * 7919;
                while !stop.load(Ordering::Relaxed) {
                    let (digest, message) = &known[i % known.len()];
                    i += 13;
                    let (status, body) = target.get(&digest.to_string()).await;
                    reads.fetch_add(1, Ordering::Relaxed);
                    if status != StatusCode::OK || body["message"] != *message.as_str() {
                        let mut f = failures.lock().expect("lock");
                        f.push(format!("GET {digest}: {status} {body}"));
                    }
                    // A client over a socket waits for every answer; an in-process router
                    // may answer a hit without ever waiting, and a loop that never waits
                    // would keep its worker for ever: the replay or switch under test, and
                    // the timers, would never run.
                    tokio::task::yield_now().await;
                }
            }));
        }
        let (target, halt, errors, w) = (
            target.clone(),
            stop.clone(),
            failures.clone(),
            written.clone(),
        );
        let label = label.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !halt.load(Ordering::Relaxed) {
                let message = format!("{label} {i}");
                i += 1;
                let (status, body) = target.post(&message).await;
                // As the readers do: a refusal may come back without any wait.
                tokio::task::yield_now().await;
                if status != StatusCode::CREATED {
                    errors
                        .lock()
                        .expect("lock")
                        .push(format!("POST: {status} {body}"));
                    continue;
                }
                w.lock()
                    .expect("lock")
                    .insert(Digest::of(&message), message);
            }
        }));
        Hammer {
            stop,
            reads,
            failures,
            written,
            tasks,
        }
    }

    /// GETs answered so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Messages written (201) so far.
    pub fn written(&self) -> usize {
        self.written.lock().expect("lock").len()
    }

    /// Waits until the readers answered `reads` more GETs and the writer got `writes` more
    /// 201s than when called: proof that the load went on (say, on a new generation), where
    /// a fixed sleep would prove nothing. Fails the test if that takes longer than `within`.
    pub async fn wait_for_more(&self, reads: u64, writes: usize, within: Duration) {
        let (r0, w0) = (self.reads(), self.written());
        let deadline = Instant::now() + within;
        while self.reads() < r0 + reads || self.written() < w0 + writes {
            assert!(
                Instant::now() < deadline,
                "the load stalled: {} more reads and {} more writes in {within:?}, wanted {reads} and {writes}",
                self.reads() - r0,
                self.written() - w0
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every reader and the writer, waits for them, and reports.
    pub async fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a hammer task panicked");
        }
        let failures = std::mem::take(&mut *self.failures.lock().expect("lock"));
        let written = std::mem::take(&mut *self.written.lock().expect("lock"));
        Report {
            reads: self.reads.load(Ordering::Relaxed),
            failures,
            written,
        }
    }
}
