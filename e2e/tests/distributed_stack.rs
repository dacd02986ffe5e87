//! The distributed stack end to end, exactly as a client meets it: `scripts/dev-stack`
//! starts a real Apache Kafka broker, ingest, projector, query and the HAProxy edge as
//! separate processes, on the test run's Apache Cassandra node (a keyspace of its own);
//! this test talks HTTPS to the edge and kills processes by pid. The stack has a broker of
//! its own rather than the run's shared one because the test stops it.

use futures::future::join_all;
use futures::stream::{self, StreamExt};
use msghash_common::Digest;
use msghash_testkit::load::{Hammer, Https};
use msghash_testkit::stack::{alive, signal, DevStack};
use reqwest::StatusCode;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;
use tokio::time::{sleep, Instant};

/// The single stack, on the test run's Cassandra node (a keyspace of its own).
struct Stack {
    stack: DevStack,
    edge: String,
    edge_port: u16,
    /// Direct ports of ingest, query and projector (for /metrics).
    service_ports: [(&'static str, u16); 3],
    broker_port: u16,
    /// The stack's keyspace on the test run's Cassandra node.
    keyspace: msghash_common::adapters::scylla::Keyspace,
    cert: PathBuf,
    run_dir: PathBuf,
    client: reqwest::Client,
}

impl Stack {
    async fn start() -> Stack {
        let keyspace = msghash_testkit::servers::unique_keyspace("e2e");
        let stack = DevStack::start(
            &[],
            &[
                (
                    "MSGHASH_DEV_STACK_CQL",
                    msghash_testkit::servers::cql_node(),
                ),
                ("MSGHASH_KEYSPACE", keyspace.to_string()),
            ],
            Duration::from_secs(600),
        )
        .await;
        Stack {
            edge: stack.edge.clone(),
            edge_port: stack.port("EDGE_PORT"),
            service_ports: [
                ("ingest", stack.port("INGEST_PORT")),
                ("query", stack.port("QUERY_PORT")),
                ("projector", stack.port("PROJECTOR_PORT")),
            ],
            broker_port: stack.port("BROKER_PORT"),
            keyspace,
            cert: stack.cert.clone(),
            run_dir: stack.run_dir.clone(),
            client: stack.client.clone(),
            stack,
        }
    }

    fn pid(&self, name: &str) -> u32 {
        self.stack.pid(name)
    }

    async fn post(&self, message: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/messages", self.edge))
            .json(&serde_json::json!({ "message": message }))
            .send()
            .await
            .expect("POST answered")
    }

    async fn get(&self, digest: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/messages/{digest}", self.edge))
            .send()
            .await
            .expect("GET answered")
    }

    /// POSTs and returns the digest from the 201.
    async fn store(&self, message: &str) -> String {
        let r = self.post(message).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let body: serde_json::Value = r.json().await.expect("json");
        body["digest"].as_str().expect("digest").to_owned()
    }

    /// Stops the stack the way a developer does (SIGTERM) and checks nothing is left.
    async fn stop(self) {
        self.stack
            .stop(&["kafka", "ingest", "projector", "query", "edge"])
            .await;
    }
}

const FOO: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

async fn json_of(r: reqwest::Response) -> (StatusCode, serde_json::Value) {
    let status = r.status();
    let body = r.json().await.expect("JSON body");
    (status, body)
}

async fn http_contract(stack: &Stack) {
    let r = stack.post("foo").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["location"], format!("/messages/{FOO}").as_str());
    assert_eq!(json_of(r).await.1, serde_json::json!({ "digest": FOO }));

    let found = stack.get(FOO).await;
    assert_eq!(
        found.status(),
        StatusCode::OK,
        "read-your-writes through the edge: {:?}",
        found.headers()
    );
    assert_eq!(
        found.headers()["cache-control"],
        "public, max-age=31536000, immutable",
        "a message never changes under its digest"
    );
    assert_eq!(found.headers()["x-content-type-options"], "nosniff");
    assert!(found.headers().contains_key("strict-transport-security"));
    let (status, body) = json_of(found).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::json!({"message": "foo"}))
    );
    // The singular path of older clients is an alias.
    let (status, body) = json_of(
        stack
            .client
            .get(format!("{}/message/{FOO}", stack.edge))
            .send()
            .await
            .expect("answered"),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::json!({"message": "foo"}))
    );
    // Metrics are for the scraper on each replica's port, not for the public edge.
    let metrics = stack
        .client
        .get(format!("{}/metrics", stack.edge))
        .send()
        .await
        .expect("answered");
    assert_eq!(metrics.status(), StatusCode::NOT_FOUND);
    let (status, _) = json_of(stack.get(&FOO.to_uppercase()).await).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "upper-case hex names the same message"
    );

    let not_found = serde_json::json!({"err_msg": "Message not found"});
    let unknown = Digest::of("never posted by anyone").to_hex();
    let missing = stack.get(&unknown).await;
    assert_eq!(
        missing.headers()["cache-control"],
        "no-store",
        "a 404 may become a 200"
    );
    for digest in [unknown.as_str(), "not-a-digest", &FOO[..63]] {
        let (status, body) = json_of(stack.get(digest).await).await;
        assert_eq!(
            (status, &body),
            (StatusCode::NOT_FOUND, &not_found),
            "{digest}"
        );
    }

    for message in ["", "héllo 🌍 日本 \"quoted\" \\ \n\t"] {
        let digest = stack.store(message).await;
        assert_eq!(digest, Digest::of(message).to_hex());
        let (status, body) = json_of(stack.get(&digest).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["message"], message, "byte-exact round trip");
    }

    // The listing pages through what is stored (token order on ScyllaDB).
    let mut listed = Vec::new();
    let mut url = format!("{}/messages?limit=2", stack.edge);
    loop {
        let (status, page) = json_of(stack.client.get(&url).send().await.expect("list")).await;
        assert_eq!(status, StatusCode::OK);
        listed.extend(page["digests"].as_array().expect("digests").iter().cloned());
        match page["next"].as_str() {
            Some(next) => url = format!("{}/all-messages?limit=2&after={next}", stack.edge),
            None => break,
        }
    }
    assert_eq!(
        listed.len(),
        3,
        "foo, the empty string and the Unicode message: {listed:?}"
    );
    assert!(listed.contains(&serde_json::json!(FOO)));
    let (status, _) = json_of(
        stack
            .client
            .get(format!("{}/messages?limit=0", stack.edge))
            .send()
            .await
            .expect("answered"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let bad_json = stack
        .client
        .post(format!("{}/messages", stack.edge))
        .header("content-type", "application/json")
        .body("{\"message\":")
        .send()
        .await
        .expect("answered");
    let (status, body) = json_of(bad_json).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["err_msg"].is_string());

    let wrong_type = stack
        .client
        .post(format!("{}/messages", stack.edge))
        .header("content-type", "text/plain")
        .body("{\"message\":\"foo\"}")
        .send()
        .await
        .expect("answered");
    assert_eq!(
        json_of(wrong_type).await.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    // 8 MiB against the 1 MiB limit: the client must read a real 413, not a reset.
    let huge = format!("{{\"message\":\"{}\"}}", "x".repeat(8 * 1024 * 1024));
    let too_large = stack
        .client
        .post(format!("{}/messages", stack.edge))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("an oversized body still gets an answer");
    let (status, body) = json_of(too_large).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["err_msg"]
        .as_str()
        .is_some_and(|m| m.contains("limit")));
}

/// The clients users actually run: curl and Python (strict certificate checks), verifying
/// the generated certificate with `--cacert` / `cafile`.
async fn external_clients(stack: &Stack) {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&stack.cert)
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"message":"foo"}"#,
        ])
        .arg(format!("{}/messages", stack.edge))
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(r#"{{"digest":"{FOO}"}}"#)
    );

    let out = Command::new("python3")
        .arg(msghash_testkit::stack::repo_root().join("scripts/smoke.py"))
        .args([
            "--domain",
            "localhost",
            "--port",
            &stack.edge_port.to_string(),
            "--cert-path",
        ])
        .arg(&stack.cert)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "smoke.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sum of the samples of `name` whose label set contains every `labels` pair.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every service's /metrics, scraped from the running processes: the counters moved, and
/// every metric the Grafana dashboard may use (deploy/metrics.txt) is exported.
async fn metrics_move(stack: &Stack) {
    let mut all = String::new();
    for (name, port) in stack.service_ports {
        let r = stack
            .client
            .get(format!("https://localhost:{port}/metrics"))
            .send()
            .await
            .expect("metrics answered");
        assert_eq!(r.status(), StatusCode::OK, "{name} /metrics");
        let text = r.text().await.expect("text");
        let moved = match name {
            "ingest" => sample_sum(
                &text,
                "msghash_http_requests_total",
                &[
                    r#"service="ingest""#,
                    r#"route="/messages""#,
                    r#"status="201""#,
                ],
            ),
            "query" => sample_sum(
                &text,
                "msghash_http_requests_total",
                &[
                    r#"service="query""#,
                    r#"route="/messages/{digest}""#,
                    r#"status="200""#,
                ],
            ),
            _ => sample_sum(&text, "msghash_projector_events_applied_total", &[]),
        };
        assert!(moved > 0.0, "{name}: counters did not move:\n{text}");
        all.push_str(&text);
    }
    assert!(sample_sum(&all, "msghash_ingest_produce_duration_seconds_count", &[]) > 0.0);
    let names =
        std::fs::read_to_string(msghash_testkit::stack::repo_root().join("deploy/metrics.txt"))
            .expect("deploy/metrics.txt lists the exported metrics");
    // Lines are `name type`; `#` starts a comment.
    for name in names
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(
            all.lines().any(|l| l.starts_with(name)),
            "{name} is used by the dashboard but no service exports it"
        );
    }
}

/// `projector <args>` against the running stack, configured like its services.
fn projector_command(stack: &Stack, args: &[&str]) -> Command {
    // The binary the stack runs, whatever the profile or target directory.
    let mut command = Command::new(stack.run_dir.join("bin/projector"));
    command
        .args(args)
        .env(
            "MSGHASH_KAFKA_BROKERS",
            format!("127.0.0.1:{}", stack.broker_port),
        )
        .env("MSGHASH_SCYLLA_NODES", msghash_testkit::servers::cql_node())
        .env("MSGHASH_KEYSPACE", stack.keyspace.to_string())
        .env("MSGHASH_PARTITIONS", "8")
        .env("MSGHASH_LOG", "warn")
        .env("MSGHASH_LOG_FORMAT", "text");
    command
}

/// `projector status` against the running stack: every partition of `generation` caught
/// up, nothing dead-lettered.
async fn projector_status(stack: &Stack, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = projector_command(stack, &["status"])
            .output()
            .await
            .expect("projector status runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "projector status: {text}");
        assert!(text.contains("dead-lettered events: 0"), "{text}");
        assert!(
            text.contains(&format!("active generation: {generation}\n")),
            "{text}"
        );
        if text.contains("total lag: 0") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projector never caught up: {text}"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

async fn read_your_writes(stack: &Stack, pairs: usize) {
    let not_found = AtomicUsize::new(0);
    let results = join_all((0..pairs).map(|i| {
        let not_found = &not_found;
        async move {
            let message = format!("read-your-writes {i}");
            let digest = stack.store(&message).await;
            let r = stack.get(&digest).await;
            if r.status() == StatusCode::NOT_FOUND {
                not_found.fetch_add(1, Ordering::Relaxed);
            }
            let (status, body) = json_of(r).await;
            (status, body["message"] == message.as_str())
        }
    }))
    .await;
    assert_eq!(
        not_found.load(Ordering::Relaxed),
        0,
        "a GET after a 201 answered 404"
    );
    let ok = results
        .iter()
        .filter(|(s, right)| *s == StatusCode::OK && *right)
        .count();
    assert_eq!(ok, pairs, "every GET after its POST returns the message");
}

async fn projector_killed_mid_load(stack: &Stack, messages: usize) {
    let acked = Arc::new(AtomicUsize::new(0));
    let load = {
        let acked = acked.clone();
        stream::iter(0..messages)
            .map(move |i| {
                let acked = acked.clone();
                async move {
                    let message = format!("survives a crash {i}");
                    let r = stack.post(&message).await;
                    if r.status() == StatusCode::CREATED {
                        acked.fetch_add(1, Ordering::Relaxed);
                        Some(message)
                    } else {
                        None
                    }
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
    };
    let killer = async {
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked.load(Ordering::Relaxed) < messages / 4 && Instant::now() < deadline {
            sleep(Duration::from_millis(20)).await;
        }
        let old = stack.pid("projector");
        signal(old, "KILL");
        old
    };
    let (stored, old) = tokio::join!(load, killer);
    let stored: Vec<String> = stored.into_iter().flatten().collect();
    assert_eq!(
        stored.len(),
        messages,
        "every POST got its 201 while the projector was down"
    );

    // The supervisor restarts the projector.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (stack.pid("projector") == old || !alive(stack.pid("projector")))
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(stack.pid("projector"), old, "projector restarted");

    // Every acknowledged message is readable; 503 (projector catching up) may be retried,
    // 404 may not.
    let lost = stream::iter(&stored)
        .map(|message| async move {
            let digest = Digest::of(message).to_hex();
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let r = stack.get(&digest).await;
                match r.status() {
                    StatusCode::OK => {
                        let (_, body) = json_of(r).await;
                        return body["message"] != message.as_str();
                    }
                    StatusCode::SERVICE_UNAVAILABLE if Instant::now() < deadline => {
                        sleep(Duration::from_millis(200)).await;
                    }
                    _ => return true,
                }
            }
        })
        .buffer_unordered(32)
        .filter(|lost| futures::future::ready(*lost))
        .count()
        .await;
    assert_eq!(lost, 0, "messages lost after kill -9 of the projector");
}

/// `projector replay --drop-old` beside the running stack while readers and a writer go
/// through the edge: no read fails, the query service and the projector move to the new
/// generation, and every message is there afterwards.
async fn replay_beside_the_stack(stack: &Stack) {
    let known: Vec<(String, String)> = join_all((0..300).map(|i| async move {
        let message = format!("before the replay {i}");
        (stack.store(&message).await, message)
    }))
    .await;
    let target = Https {
        client: stack.client.clone(),
        base: stack.edge.clone(),
    };
    let known_messages = Arc::new(
        known
            .iter()
            .map(|(_, message)| (Digest::of(message), message.clone()))
            .collect::<Vec<_>>(),
    );
    let hammer = Hammer::start(&target, known_messages, "during the replay");
    let out = projector_command(stack, &["replay", "--drop-old"])
        .output()
        .await
        .expect("projector replay runs");
    // The load goes on, on the new generation, before it stops.
    hammer.wait_for_more(200, 20, Duration::from_secs(60)).await;
    let report = hammer.stop().await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "projector replay:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("applied ") && last.contains("readers are on generation 1"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("generation 1 building: "),
        "progress: {stderr}"
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed during the replay: {:?}",
        report.failures.len(),
        report.reads,
        &report.failures[..report.failures.len().min(5)]
    );
    projector_status(stack, 1).await;
    assert!(!report.written.is_empty());
    let written = report
        .written
        .iter()
        .map(|(digest, message)| (digest.to_hex(), message.clone()));
    for (digest, message) in known.iter().cloned().chain(written) {
        let (status, body) = json_of(stack.get(&digest).await).await;
        assert_eq!(
            (status, body["message"].as_str()),
            (StatusCode::OK, Some(message.as_str()))
        );
    }
}

async fn broker_stopped_gives_503(stack: &Stack) {
    let broker = stack.pid("kafka");
    signal(broker, "TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(broker) && Instant::now() < deadline {
        sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive(broker), "broker stopped");
    let started = Instant::now();
    let r = stack.post("while the broker is down").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let (_, body) = json_of(r).await;
    assert_eq!(
        body["err_msg"],
        "Service temporarily unavailable, retry later"
    );
    // Request deadline is 5 s: generous slack for a loaded machine, but never a hang.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// The edge serves the whole API's OpenAPI document (the POST of ingest beside the GETs of
/// query), and schemathesis finds nothing against it (`scripts/api-fuzz`: at least 1,000
/// generated cases, every check).
async fn api_fuzz_through_the_edge(stack: &Stack) {
    let doc: serde_json::Value = stack
        .client
        .get(format!("{}/openapi.json", stack.edge))
        .send()
        .await
        .expect("openapi.json through the edge")
        .json()
        .await
        .expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/messages"]["post"].is_object(), "{doc}");
    assert!(
        doc["paths"]["/messages/{digest}"]["get"].is_object(),
        "{doc}"
    );
    let script = msghash_testkit::stack::repo_root().join("scripts/api-fuzz");
    let (edge, cert) = (stack.edge.clone(), stack.cert.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script)
            .args(["--url", &edge, "--ca"])
            .arg(&cert)
            .output()
    })
    .await
    .expect("join")
    .expect("scripts/api-fuzz runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "schemathesis through the edge:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_stack_end_to_end() {
    let stack = Stack::start().await;
    http_contract(&stack).await;
    api_fuzz_through_the_edge(&stack).await;
    external_clients(&stack).await;
    read_your_writes(&stack, 1_000).await;
    metrics_move(&stack).await;
    projector_status(&stack, 0).await;
    projector_killed_mid_load(&stack, 2_000).await;
    replay_beside_the_stack(&stack).await;
    broker_stopped_gives_503(&stack).await;
    stack.stop().await;
}
