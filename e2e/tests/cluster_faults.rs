//! The three-node cluster under faults, as a client meets it: `scripts/dev-stack --cluster`
//! starts 3 Kafka nodes, 3 Cassandra nodes (127.0.0.1-3), 2 ingest, 3 projector and 2 query
//! replicas behind the HAProxy edge. A steady load of POSTs, each followed at once by a GET
//! of its digest, runs through the edge while the test breaks one thing at a time: the
//! leader broker of a busy partition (kill -9), a Cassandra node (kill -9, back by itself),
//! a projector frozen past the group's session timeout and then resumed (a zombie that
//! finishes its old batch), the projectors restarted one by one, a query and an ingest
//! replica (kill -9). After each fault every acknowledged message must still be readable,
//! and the applied offsets, sampled all along, must never move backwards.
//!
//! `scripts/test` runs it after the rest of the suite, once the run's own servers are
//! stopped (the cluster needs the machine); alone: `cargo test -p msghash-e2e --test
//! cluster_faults -- --nocapture`. It prints the table of docs/operations.md.

use msghash_common::adapters::scylla::{ScyllaModel, ScyllaSettings};
use msghash_common::config::ConsistencyArg;
use msghash_common::{Digest, ReadModel};
use msghash_testkit::stack::{signal, DevStack};
use reqwest::StatusCode;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// The partitions of the cluster's topic (deploy/stack.env).
const PARTITIONS: u32 = 8;
/// Writers, each POSTing and then GETting in a loop.
const WORKERS: usize = 4;
/// The longest a fault may disturb clients.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// How long the load must run clean before a fault counts as recovered...
const QUIET: Duration = Duration::from_secs(5);
/// ... with at least this many writes acknowledged since the fault.
const SETTLED: u64 = 20;

/// `scripts/dev-stack --cluster`, and the Kafka brokers and CQL port it uses.
struct Cluster {
    stack: DevStack,
    edge: String,
    brokers: String,
    cql_port: u16,
    client: reqwest::Client,
}

impl Cluster {
    async fn start() -> Cluster {
        let stack = DevStack::start(&["--cluster"], &[], Duration::from_secs(900)).await;
        let brokers = stack
            .value("BROKER_PORTS")
            .split_whitespace()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            edge: stack.edge.clone(),
            brokers,
            cql_port: stack.port("CQL_PORT"),
            client: stack.client.clone(),
            stack,
        }
    }

    fn pid(&self, name: &str) -> u32 {
        self.stack.pid(name)
    }

    async fn restarted(&self, name: &str, old: u32, within: Duration) {
        self.stack.restarted(name, old, within).await
    }

    /// The broker id leading `partition` of the topic, from the cluster's metadata.
    async fn leader_of(&self, partition: u32) -> i32 {
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .expect("metadata client");
            let metadata = consumer
                .fetch_metadata(Some("messages"), Duration::from_secs(10))
                .expect("metadata");
            let topic = metadata.topics().first().expect("the topic");
            topic
                .partitions()
                .iter()
                .find(|p| p.id() == i32::try_from(partition).expect("partition"))
                .expect("the partition")
                .leader()
        })
        .await
        .expect("metadata task")
    }

    async fn read_model(&self) -> ScyllaModel {
        let settings = ScyllaSettings {
            nodes: (1..=3)
                .map(|i| format!("127.0.0.{i}:{}", self.cql_port))
                .collect(),
            keyspace: msghash_common::adapters::scylla::Keyspace::parse("msghash")
                .expect("keyspace"),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 3}".into(),
            consistency: ConsistencyArg::Quorum.into(),
        };
        ScyllaModel::connect(&settings).await.expect("read model")
    }

    async fn stop(self) {
        let everything = [
            "kafka-1",
            "kafka-2",
            "kafka-3",
            "cassandra-1",
            "cassandra-2",
            "cassandra-3",
            "ingest-1",
            "ingest-2",
            "projector-1",
            "projector-2",
            "projector-3",
            "query-1",
            "query-2",
            "edge",
        ];
        self.stack.stop(&everything).await;
    }
}

/// What the load saw during one fault.
#[derive(Debug, Default, Clone)]
struct Tally {
    requests: u64,
    created: u64,
    unavailable: u64,
    /// 503 without Retry-After: counted among the other errors too.
    unavailable_without_retry_after: u64,
    other_errors: u64,
    false_404s: u64,
    /// The last time a request of this phase did not succeed.
    last_failure: Option<Instant>,
    examples: Vec<String>,
}

impl Tally {
    fn failed(&mut self, what: String) {
        self.last_failure = Some(Instant::now());
        if self.examples.len() < 5 {
            self.examples.push(what);
        }
    }
}

/// The steady load: POST a new message, then GET it at once; every 201 is remembered.
struct Load {
    phase: Mutex<String>,
    tallies: Mutex<BTreeMap<String, Tally>>,
    acknowledged: Mutex<Vec<(String, String)>>,
    stop: AtomicBool,
    counter: AtomicU64,
}

impl Load {
    fn new() -> Arc<Load> {
        Arc::new(Load {
            phase: Mutex::new("warm-up".into()),
            tallies: Mutex::default(),
            acknowledged: Mutex::default(),
            stop: AtomicBool::new(false),
            counter: AtomicU64::new(0),
        })
    }

    fn set_phase(&self, phase: &str) {
        *self.phase.lock().expect("phase") = phase.to_owned();
    }

    fn record(&self, update: impl FnOnce(&mut Tally)) {
        let phase = self.phase.lock().expect("phase").clone();
        let mut tallies = self.tallies.lock().expect("tallies");
        update(tallies.entry(phase).or_default());
    }

    fn tally(&self, phase: &str) -> Tally {
        self.tallies
            .lock()
            .expect("tallies")
            .get(phase)
            .cloned()
            .unwrap_or_default()
    }

    async fn worker(self: Arc<Self>, client: reqwest::Client, edge: String, id: usize) {
        while !self.stop.load(Ordering::Relaxed) {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let message = format!("fault load {id} {n}");
            let posted = client
                .post(format!("{edge}/messages"))
                .json(&serde_json::json!({ "message": message }))
                .send()
                .await;
            let created = self.classify("POST", posted, StatusCode::CREATED);
            if !created {
                // Back off like a client told to retry later.
                sleep(Duration::from_millis(200)).await;
                continue;
            }
            let digest = Digest::of(&message).to_hex();
            self.acknowledged
                .lock()
                .expect("acknowledged")
                .push((digest.clone(), message));
            let got = client.get(format!("{edge}/messages/{digest}")).send().await;
            if !self.classify("GET", got, StatusCode::OK) {
                sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Counts one answer; true when it is the success expected.
    fn classify(
        &self,
        what: &str,
        answer: Result<reqwest::Response, reqwest::Error>,
        success: StatusCode,
    ) -> bool {
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                self.record(|t| {
                    t.requests += 1;
                    t.other_errors += 1;
                    t.failed(format!("{what}: {e}"));
                });
                return false;
            }
        };
        let status = response.status();
        let retry_after = response.headers().contains_key("retry-after");
        self.record(|t| {
            t.requests += 1;
            match status {
                s if s == success => {
                    if s == StatusCode::CREATED {
                        t.created += 1;
                    }
                }
                StatusCode::SERVICE_UNAVAILABLE if retry_after => {
                    t.unavailable += 1;
                    t.failed(format!("{what}: 503"));
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    t.unavailable_without_retry_after += 1;
                    t.other_errors += 1;
                    t.failed(format!("{what}: 503 without Retry-After"));
                }
                StatusCode::NOT_FOUND if what == "GET" => {
                    t.false_404s += 1;
                    t.failed(format!("{what}: false 404"));
                }
                other => {
                    t.other_errors += 1;
                    t.failed(format!("{what}: {other}"));
                }
            }
        });
        status == success
    }
}

/// Samples every partition's applied offset and remembers any that moved backwards.
async fn watch_offsets(model: ScyllaModel, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut last = vec![None; PARTITIONS as usize];
    let mut backwards = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for p in 0..PARTITIONS {
            if let Ok(now) = model.applied_offset(p).await {
                let before = last[p as usize];
                if let (Some(b), Some(n)) = (before, now) {
                    if n < b {
                        backwards.push(format!("partition {p}: {b} -> {n}"));
                    }
                }
                if now.is_some() {
                    last[p as usize] = now;
                }
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
    backwards
}

/// Every acknowledged message is readable through the edge (a 503 is retried for a while:
/// it says "not known yet", never "gone"). Returns the lost ones.
async fn lost_messages(cluster: &Cluster, load: &Load) -> Vec<String> {
    use futures::stream::{self, StreamExt};
    let acknowledged = load.acknowledged.lock().expect("acknowledged").clone();
    stream::iter(acknowledged)
        .map(|(digest, message)| read_back(cluster, digest, message))
        .buffer_unordered(16)
        .filter_map(|lost| async move { lost })
        .collect()
        .await
}

/// `None` when `digest` reads back as `message`, else what was read.
async fn read_back(cluster: &Cluster, digest: String, message: String) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = cluster
            .client
            .get(format!("{}/messages/{digest}", cluster.edge))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == StatusCode::OK => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                return (body["message"] != message.as_str()).then(|| format!("{digest}: {body}"));
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => return Some(format!("{digest}: 404")),
            _ if Instant::now() < deadline => sleep(Duration::from_millis(200)).await,
            other => return Some(format!("{digest}: {other:?}")),
        }
    }
}

struct Row {
    fault: String,
    tally: Tally,
    lost: usize,
    recovery: Duration,
}

/// Runs the load through `fault` until it has been clean for [`QUIET`] (at most the
/// recovery bound plus the quiet time), then checks every acknowledged message.
async fn scenario<F, Fut>(cluster: &Cluster, load: &Arc<Load>, fault: &str, inject: F) -> Row
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    eprintln!("fault: {fault}");
    load.set_phase(fault);
    let injected = Instant::now();
    inject().await;
    let deadline = injected + RECOVERY_BOUND + QUIET;
    loop {
        let tally = load.tally(fault);
        let quiet_since = tally.last_failure.unwrap_or(injected).max(injected);
        if quiet_since.elapsed() >= QUIET && tally.created >= SETTLED {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(200)).await;
    }
    let tally = load.tally(fault);
    let recovery = tally
        .last_failure
        .map(|t| t.saturating_duration_since(injected))
        .unwrap_or_default();
    let lost = lost_messages(cluster, load).await;
    for l in lost.iter().take(5) {
        eprintln!("  lost: {l}");
    }
    Row {
        fault: fault.to_owned(),
        tally,
        lost: lost.len(),
        recovery,
    }
}

fn print_table(rows: &[Row]) {
    eprintln!(
        "\n| fault | requests | 201s | 503s | other errors | acknowledged-but-lost | false 404s | seconds to recover |"
    );
    eprintln!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            r.fault,
            r.tally.requests,
            r.tally.created,
            r.tally.unavailable,
            r.tally.other_errors,
            r.lost,
            r.tally.false_404s,
            r.recovery.as_secs_f64()
        );
        for e in &r.tally.examples {
            eprintln!("|   {e} |");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_survives_losing_any_one_machine() {
    let cluster = Cluster::start().await;
    let load = Load::new();
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            tokio::spawn(
                load.clone()
                    .worker(cluster.client.clone(), cluster.edge.clone(), id),
            )
        })
        .collect();
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_offsets(
        cluster.read_model().await,
        stop_watching.clone(),
    ));
    // Some load on every partition before the first fault.
    let warm = Instant::now();
    while load.tally("warm-up").created < 200 && warm.elapsed() < Duration::from_secs(60) {
        sleep(Duration::from_millis(200)).await;
    }

    let mut rows = Vec::new();
    let leader = cluster.leader_of(0).await;
    let broker = format!("kafka-{leader}");
    let old = cluster.pid(&broker);
    rows.push(
        scenario(
            &cluster,
            &load,
            &format!("kill -9 {broker}, leader of partition 0"),
            || async { signal(old, "KILL") },
        )
        .await,
    );
    cluster
        .restarted(&broker, old, Duration::from_secs(30))
        .await;

    let old = cluster.pid("cassandra-2");
    rows.push(
        scenario(&cluster, &load, "kill -9 cassandra-2", || async {
            signal(old, "KILL")
        })
        .await,
    );
    cluster
        .restarted("cassandra-2", old, Duration::from_secs(30))
        .await;

    let frozen = cluster.pid("projector-1");
    rows.push(
        scenario(
            &cluster,
            &load,
            "SIGSTOP projector-1 for 12 s, then SIGCONT",
            || async {
                signal(frozen, "STOP");
                // Past the session timeout (6 s): the group gives its partitions away.
                sleep(Duration::from_secs(12)).await;
                signal(frozen, "CONT");
            },
        )
        .await,
    );

    rows.push(
        scenario(
            &cluster,
            &load,
            "restart the projectors one by one",
            || async {
                for i in 1..=3 {
                    let name = format!("projector-{i}");
                    let old = cluster.pid(&name);
                    signal(old, "TERM");
                    cluster.restarted(&name, old, Duration::from_secs(30)).await;
                    sleep(Duration::from_secs(3)).await;
                }
            },
        )
        .await,
    );

    for service in ["query-1", "ingest-2"] {
        let old = cluster.pid(service);
        rows.push(
            scenario(&cluster, &load, &format!("kill -9 {service}"), || async {
                signal(old, "KILL")
            })
            .await,
        );
        cluster
            .restarted(service, old, Duration::from_secs(30))
            .await;
    }

    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    stop_watching.store(true, Ordering::Relaxed);
    let backwards = watcher.await.expect("offset watcher");
    print_table(&rows);
    let acknowledged = load.acknowledged.lock().expect("acknowledged").len();
    eprintln!("{acknowledged} messages acknowledged in all");

    assert!(
        backwards.is_empty(),
        "applied offsets moved back: {backwards:?}"
    );
    for r in &rows {
        assert_eq!(r.lost, 0, "{}: acknowledged messages lost", r.fault);
        assert_eq!(r.tally.false_404s, 0, "{}: false 404s", r.fault);
        assert_eq!(
            r.tally.other_errors, 0,
            "{}: answers other than 201, 200, 503 + Retry-After: {:?}",
            r.fault, r.tally.examples
        );
        assert!(
            r.recovery <= RECOVERY_BOUND,
            "{}: recovered after {:?}",
            r.fault,
            r.recovery
        );
        assert!(r.tally.created > 0, "{}: no write went through", r.fault);
    }
    cluster.stop().await;
}
