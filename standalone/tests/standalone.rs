//! The real `msghash` binary, started as a user starts it, driven over HTTPS.

use futures::stream::{self, StreamExt};
use msghash_common::Digest;
use reqwest::StatusCode;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn command(dir: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
    c.current_dir(dir)
        .env("MSGHASH_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("MSGHASH_DATA_DIR")
        .env_remove("MSGHASH_CERT_DIR")
        .env_remove("MSGHASH_TLS_CERT")
        .env_remove("MSGHASH_TLS_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    c
}

/// A running `msghash` in its own working directory, with the defaults a user gets:
/// `./data` and `./certs/localhost.crt`.
struct Msghash {
    child: Child,
    base: String,
}

impl Msghash {
    async fn start(dir: &Path, port: u16) -> (Msghash, reqwest::Client) {
        let child = command(dir, port).spawn().expect("msghash starts");
        let mut m = Msghash {
            child,
            base: format!("https://localhost:{port}"),
        };
        let client = m.wait_ready(dir).await;
        (m, client)
    }

    async fn wait_ready(&mut self, dir: &Path) -> reqwest::Client {
        let cert = dir.join("certs/localhost.crt");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "msghash did not become ready");
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("msghash exited early: {status}");
            }
            if let Ok(pem) = std::fs::read(&cert) {
                let client = client(&pem);
                if let Ok(r) = client
                    .get(format!("{}/health/live", self.base))
                    .send()
                    .await
                {
                    if r.status() == StatusCode::OK {
                        return client;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
    }
}

impl Drop for Msghash {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem).expect("pem"))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn post(client: &reqwest::Client, base: &str, message: &str) -> Option<String> {
    let r = client
        .post(format!("{base}/messages"))
        .json(&serde_json::json!({ "message": message }))
        .send()
        .await
        .ok()?;
    if r.status() != StatusCode::CREATED {
        return None;
    }
    let body: serde_json::Value = r.json().await.ok()?;
    body["digest"].as_str().map(str::to_owned)
}

/// GET with retries on 503 only (the projector catching up after a restart).
async fn get_message(
    client: &reqwest::Client,
    base: &str,
    digest: &str,
) -> (StatusCode, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .get(format!("{base}/messages/{digest}"))
            .send()
            .await
            .expect("GET answered");
        let status = r.status();
        if status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return (status, r.json().await.expect("JSON"));
    }
}

async fn list_all(client: &reqwest::Client, base: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/messages?limit=500");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let page: serde_json::Value = client
            .get(url)
            .send()
            .await
            .expect("list answered")
            .json()
            .await
            .expect("JSON");
        for d in page["digests"].as_array().expect("digests") {
            all.push(d.as_str().expect("hex").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_kill_9_mid_load_and_nothing_else_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (m, client) = Msghash::start(dir.path(), port).await;
    let base = m.base.clone();

    let attempted: Vec<String> = (0..2_000).map(|i| format!("durable {i} 🌍")).collect();
    let acked_count = AtomicUsize::new(0);
    let load = stream::iter(&attempted)
        .map(|message| {
            let (client, base, acked_count) = (&client, &base, &acked_count);
            async move {
                let digest = post(client, base, message).await?;
                acked_count.fetch_add(1, Ordering::Relaxed);
                Some((digest, message.clone()))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let killer = async {
        while acked_count.load(Ordering::Relaxed) < 600 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        m.kill9();
    };
    let (results, ()) = tokio::join!(load, killer);
    let acked: Vec<(String, String)> = results.into_iter().flatten().collect();
    assert!(acked.len() >= 600, "load ran before the kill");
    assert!(acked.len() < attempted.len(), "the kill landed mid-load");

    let (m, client) = Msghash::start(dir.path(), port).await;
    for (digest, message) in &acked {
        let (status, body) = get_message(&client, &m.base, digest).await;
        assert_eq!(status, StatusCode::OK, "acknowledged {digest} lost");
        assert_eq!(body["message"], message.as_str());
    }
    let allowed: HashSet<String> = attempted.iter().map(|m| Digest::of(m).to_hex()).collect();
    let listed = list_all(&client, &m.base).await;
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "listing repeats a digest");
    for d in &listed {
        assert!(allowed.contains(d), "{d} appeared but was never posted");
    }
    for (d, _) in &acked {
        assert!(unique.contains(d), "{d} missing from the listing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_right_after_a_201_never_answers_404() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, client) = Msghash::start(dir.path(), free_port()).await;
    let results = futures::future::join_all((0..1_000).map(|i| {
        let (client, base) = (&client, &m.base);
        async move {
            let message = format!("ryw {i}");
            let digest = post(client, base, &message).await.expect("201");
            let r = client
                .get(format!("{base}/messages/{digest}"))
                .send()
                .await
                .expect("GET answered");
            let status = r.status();
            let body: serde_json::Value = r.json().await.expect("JSON");
            (status, body["message"] == message.as_str())
        }
    }))
    .await;
    let not_found = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::NOT_FOUND)
        .count();
    assert_eq!(not_found, 0, "404 after 201");
    assert!(results.iter().all(|(s, ok)| *s == StatusCode::OK && *ok));
}

fn run_to_end(mut c: Command) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("spawn");
    child.wait_with_output().expect("output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_dir_fails_fast_and_ctrl_c_is_graceful() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (m, client) = Msghash::start(dir.path(), port).await;
    let digest = post(&client, &m.base, "kept").await.expect("201");

    let second = run_to_end(command(dir.path(), free_port()));
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "clear message: {err}");

    // Ctrl-C: exits 0, and the data is there on the next start.
    m.signal("INT");
    let mut m = m;
    let status = m.child.wait().expect("exits");
    assert!(status.success(), "graceful stop: {status}");
    let (m, client) = Msghash::start(dir.path(), port).await;
    let (status, body) = get_message(&client, &m.base, &digest).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (StatusCode::OK, Some("kept"))
    );
}

#[test]
fn bad_configuration_is_one_line_naming_the_setting_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (var, value, named) in [
        ("MSGHASH_LISTEN", "not-an-address", "MSGHASH_LISTEN"),
        ("MSGHASH_PARTITIONS", "0", "MSGHASH_PARTITIONS"),
        ("MSGHASH_BODY_LIMIT", "lots", "MSGHASH_BODY_LIMIT"),
        ("MSGHASH_TLS_CERT", "/nonexistent/cert.pem", "MSGHASH_TLS"),
    ] {
        let mut c = command(dir.path(), free_port());
        c.env(var, value);
        if var == "MSGHASH_TLS_CERT" {
            c.env("MSGHASH_TLS_KEY", "/nonexistent/key.pem");
        }
        let out = run_to_end(c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{var}: one line, got {err:?}"
        );
        assert!(err.contains(named), "{var}: {err}");
    }
    let help = run_to_end({
        let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
        c.arg("--help");
        c
    });
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for var in [
        "MSGHASH_LISTEN",
        "MSGHASH_DATA_DIR",
        "MSGHASH_TLS_CERT",
        "MSGHASH_TLS_KEY",
        "MSGHASH_PARTITIONS",
        "MSGHASH_BODY_LIMIT",
    ] {
        assert!(text.contains(var), "--help documents {var}");
    }
}
