//! 2,000 slow clients against the real `msghash` binary: half trickle a request head, half a
//! request body, a byte every 500 ms. Each must be closed within its timeout, while a normal
//! client, at the same time, keeps getting its answers quickly.

use futures::stream::{self, StreamExt};
use msghash_testkit::slow::{tls_connector, trickle, Trickle};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

const SLOW_CLIENTS: usize = 2_000;
const TIMEOUT: Duration = Duration::from_secs(5);
/// How much later than its timeout a slow connection may be closed on a loaded 2-core box.
const MARGIN: Duration = Duration::from_secs(3);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_at_their_timeout_while_a_normal_client_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let timeout_ms = TIMEOUT.as_millis().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_msghash"))
        .current_dir(dir.path())
        .env("MSGHASH_LISTEN", "127.0.0.1:0")
        .env("MSGHASH_DATA_DIR", dir.path().join("data"))
        .env("MSGHASH_CERT_DIR", dir.path().join("certs"))
        .env("MSGHASH_HTTP_HEADER_TIMEOUT_MS", &timeout_ms)
        .env("MSGHASH_HTTP_BODY_TIMEOUT_MS", &timeout_ms)
        .env("MSGHASH_LOG", "warn")
        .env_remove("MSGHASH_TLS_CERT")
        .env_remove("MSGHASH_TLS_KEY")
        .env_remove("MSGHASH_LOG_DIR")
        .env_remove("MSGHASH_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("msghash starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("msghash is listening on https://localhost:") {
                return rest.split(' ').next().and_then(|p| p.parse::<u16>().ok());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("msghash printed the port it listens on");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let base = format!("https://localhost:{port}");
    let ca = dir.path().join("certs/localhost.crt");
    let pem = std::fs::read(&ca).expect("certificate written before listening");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .resolve("localhost", address)
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client.get(format!("{base}/health/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "msghash never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The normal client: POST a message, GET it back, again and again.
    let open = Arc::new(AtomicUsize::new(0));
    let most_open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let normal = tokio::spawn({
        let (client, base, open, most_open, stop) = (
            client.clone(),
            base.clone(),
            open.clone(),
            most_open.clone(),
            stop.clone(),
        );
        async move {
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                most_open.fetch_max(open.load(Ordering::SeqCst), Ordering::SeqCst);
                i += 1;
                let message = format!("normal client {i}");
                let started = Instant::now();
                let posted = client
                    .post(format!("{base}/messages"))
                    .json(&serde_json::json!({ "message": message }))
                    .send()
                    .await;
                latencies.push(started.elapsed());
                let digest = match posted {
                    Ok(r) if r.status() == 201 => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["digest"].as_str().map(str::to_owned)),
                    Ok(r) => {
                        failures.push(format!("POST {}", r.status()));
                        None
                    }
                    Err(e) => {
                        failures.push(format!("POST {e}"));
                        None
                    }
                };
                let Some(digest) = digest else { continue };
                let started = Instant::now();
                match client.get(format!("{base}/messages/{digest}")).send().await {
                    Ok(r) if r.status() == 200 => latencies.push(started.elapsed()),
                    Ok(r) => failures.push(format!("GET {}", r.status())),
                    Err(e) => failures.push(format!("GET {e}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (latencies, failures)
        }
    });

    // The slow clients, opened over about 2.5 s.
    let connector = tls_connector(&ca);
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..SLOW_CLIENTS)
        .map(|i| {
            let (connector, open) = (connector.clone(), open.clone());
            let kind = if i % 2 == 0 {
                Trickle::Head
            } else {
                Trickle::Body
            };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(1_250 * i as u64)).await;
                trickle(
                    address,
                    connector,
                    kind,
                    Duration::from_millis(500),
                    Duration::from_secs(60),
                    open,
                )
                .await
            })
        })
        .buffer_unordered(SLOW_CLIENTS)
        .collect()
        .await;
    let slow_elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (mut latencies, failures) = normal.await.expect("normal client");

    let mut closed_after = Vec::new();
    let mut problems = Vec::new();
    for result in results {
        match result.expect("slow client task") {
            Err(e) => problems.push(format!("not set up: {e}")),
            Ok(c) => match c.after {
                None => problems.push(format!("{:?}: still open after 60 s", c.trickle)),
                Some(after) if after > TIMEOUT + MARGIN => {
                    problems.push(format!("{:?}: closed only after {after:?}", c.trickle))
                }
                Some(after) => {
                    if c.trickle == Trickle::Body
                        && c.answer.as_deref() != Some("HTTP/1.1 408 Request Timeout")
                    {
                        problems.push(format!("Body: answered {:?}", c.answer));
                    }
                    closed_after.push(after);
                }
            },
        }
    }
    closed_after.sort();
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", child.id().unwrap_or(0)))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        })
        .unwrap_or_default();
    println!(
        "{SLOW_CLIENTS} slow clients in {slow_elapsed:?}, at most {} open at once; closed \
         after min {:?} / median {:?} / max {:?} (timeout {TIMEOUT:?}); normal client: {} \
         requests, p50 {:?}, p99 {p99:?}, max {:?}, {} failed; msghash RSS {rss} kB",
        most_open.load(Ordering::SeqCst),
        closed_after.first(),
        closed_after.get(closed_after.len() / 2),
        closed_after.last(),
        latencies.len(),
        percentile(&latencies, 0.5),
        latencies.last(),
        failures.len(),
    );
    assert!(
        problems.is_empty(),
        "{} of {SLOW_CLIENTS} slow clients were not cut off in time, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    assert!(failures.is_empty(), "normal client failed: {failures:?}");
    assert!(
        latencies.len() >= 20,
        "normal client made only {} requests",
        latencies.len()
    );
    assert!(p99 < Duration::from_secs(1), "normal client p99 {p99:?}");

    // Every slow connection is gone: the server's open-connection gauge is back to the
    // normal client's own.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let open_now = msghash_testkit::exposition::parse(&metrics)
        .expect("exposition")
        .sum(msghash_common::metrics::names::HTTP_OPEN_CONNECTIONS, &[]);
    assert!(open_now <= 4.0, "{open_now} connections still open");
}
