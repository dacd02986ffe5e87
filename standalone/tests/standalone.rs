//! The real `msghash` binary, started as a user starts it, driven over HTTPS.

use futures::stream::{self, StreamExt};
use msghash_common::metrics::names;
use msghash_common::Digest;
use msghash_testkit::load::{Hammer, Https};
use msghash_testkit::{exposition, process};
use reqwest::StatusCode;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `msghash` in `dir` on port 0 (any free port: it prints the one it bound), with none of
/// the caller's MSGHASH_* settings leaking in.
fn command(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
    c.current_dir(dir)
        .env("MSGHASH_LISTEN", "127.0.0.1:0")
        .env_remove("MSGHASH_DATA_DIR")
        .env_remove("MSGHASH_CERT_DIR")
        .env_remove("MSGHASH_TLS_CERT")
        .env_remove("MSGHASH_TLS_KEY")
        .env_remove("MSGHASH_LOG_DIR")
        .env_remove("MSGHASH_LOG_RETENTION")
        .env_remove("MSGHASH_LOG_FORMAT")
        .env_remove("MSGHASH_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    c
}

/// A running `msghash` in its own working directory, with the defaults a user gets:
/// `./data` and `./certs/localhost.crt`.
struct Msghash {
    child: Child,
    port: u16,
    base: String,
    /// The thread reading stdout; it returns everything msghash printed once stdout closes.
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Msghash {
    async fn start(dir: &Path) -> (Msghash, reqwest::Client) {
        Msghash::start_with(dir, &[]).await
    }

    async fn start_with(dir: &Path, env: &[(&str, &Path)]) -> (Msghash, reqwest::Client) {
        let mut c = command(dir);
        for (k, v) in env {
            c.env(k, v);
        }
        Msghash::spawn(c, dir).await
    }

    /// Spawns `c`, reads the port from the line msghash prints once it listens (stdout is
    /// drained to the end by a thread, so the child never blocks on it), and waits until it
    /// answers over TLS.
    async fn spawn(mut c: Command, dir: &Path) -> (Msghash, reqwest::Client) {
        c.stdout(Stdio::piped());
        let mut child = c.spawn().expect("msghash starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.strip_prefix("msghash is listening on https://localhost:")
                {
                    let _ = tx.send(rest.split(' ').next().and_then(|p| p.parse::<u16>().ok()));
                }
                // With JSON logs, the `listening` event instead.
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    if event["message"] == "listening" {
                        let _ = tx.send(
                            event["address"]
                                .as_str()
                                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                                .map(|a| a.port()),
                        );
                    }
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let port = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join")
            .expect("msghash printed the address it listens on")
            .expect("a port in that line");
        let mut m = Msghash {
            child,
            port,
            base: format!("https://localhost:{port}"),
            stdout: Some(reader),
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

impl Msghash {
    /// Everything msghash printed on stdout, once it has exited.
    fn stdout_to_end(&mut self) -> String {
        self.stdout
            .take()
            .expect("stdout read once")
            .join()
            .expect("stdout reader")
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

/// POSTs every message, 64 at a time; each must be answered 201. Their digests and messages.
async fn post_all(
    client: &reqwest::Client,
    base: &str,
    messages: &[String],
) -> Vec<(String, String)> {
    stream::iter(messages)
        .map(|message| async move {
            (
                post(client, base, message).await.expect("201"),
                message.clone(),
            )
        })
        .buffer_unordered(64)
        .collect()
        .await
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
    let (m, client) = Msghash::start(dir.path()).await;
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

    let (m, client) = Msghash::start(dir.path()).await;
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
    let (m, client) = Msghash::start(dir.path()).await;
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

/// [`run_to_end`] for a command that should stop on its own: killed after 30 s (a bad
/// setting that was taken would leave a server running), and then a failure.
fn run_to_exit(mut c: Command) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let out = rx.recv().expect("exits").expect("output");
            panic!(
                "still running after 30 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_dir_fails_fast_and_ctrl_c_is_graceful() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, client) = Msghash::start(dir.path()).await;
    let digest = post(&client, &m.base, "kept").await.expect("201");

    let second = run_to_end(command(dir.path()));
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "clear message: {err}");

    // Ctrl-C: exits 0, and the data is there on the next start.
    m.signal("INT");
    let mut m = m;
    let status = m.child.wait().expect("exits");
    assert!(status.success(), "graceful stop: {status}");
    let (m, client) = Msghash::start(dir.path()).await;
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
        let mut c = command(dir.path());
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
    // Flags, a filter, a pair of files that do not match: each error is one line naming
    // its setting, with no Rust debug text.
    let certs = |name: &str| {
        let mut c = command(dir.path());
        c.args(["cert", "--dir", name]);
        assert!(run_to_end(c).status.success());
        dir.path().join(name)
    };
    let (a, b) = (certs("a"), certs("b"));
    let cert_a = a.join(msghash_common::tls::CERT_FILE);
    let key_b = b.join(msghash_common::tls::KEY_FILE);
    for (env, args, named) in [
        (vec![("MSGHASH_LOG", "[[[bad")], vec![], "MSGHASH_LOG"),
        (
            vec![("MSGHASH_TLS_CERT", "/nonexistent/cert.pem")],
            vec![],
            "MSGHASH_TLS_KEY",
        ),
        (vec![], vec!["--cache-bytes", "-1"], "MSGHASH_CACHE_BYTES"),
        (vec![], vec!["--partitions", "-3"], "MSGHASH_PARTITIONS"),
        (
            vec![],
            vec!["replay", "--max-rate", "0"],
            "MSGHASH_REPLAY_MAX_RATE",
        ),
        (
            vec![],
            vec![
                "--tls-cert",
                cert_a.to_str().expect("utf-8"),
                "--tls-key",
                key_b.to_str().expect("utf-8"),
            ],
            "MSGHASH_TLS_KEY",
        ),
    ] {
        let mut c = command(dir.path());
        c.envs(env.iter().copied()).args(&args);
        let out = run_to_exit(c);
        let err = String::from_utf8_lossy(&out.stderr);
        let case = format!("{env:?} {args:?}");
        assert_eq!(out.status.code(), Some(2), "{case}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{case}: one line, got {err:?}"
        );
        assert!(err.contains(named), "{case} names {named}: {err}");
        assert!(!err.contains("Mismatch"), "{case}: no debug text: {err}");
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

async fn scrape(client: &reqwest::Client, base: &str) -> exposition::Exposition {
    let r = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answer");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("text");
    exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_every_family_after_a_post_and_a_get() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, client) = Msghash::start(dir.path()).await;

    let r = client
        .post(format!("{}/messages", m.base))
        .header("x-request-id", "test-post-1")
        .json(&serde_json::json!({ "message": "observed" }))
        .send()
        .await
        .expect("POST answered");
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["x-request-id"], "test-post-1");
    let digest = Digest::of("observed").to_hex();
    let (status, _) = get_message(&client, &m.base, &digest).await;
    assert_eq!(status, StatusCode::OK);
    let unknown = Digest::of("never posted").to_hex();
    let r = client
        .get(format!("{}/messages/{unknown}", m.base))
        .send()
        .await
        .expect("GET answered");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers().contains_key("x-request-id"));

    // The projector's batch metric lands just after its commit: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = scrape(&client, &m.base).await;
        let batches = format!("{}_count", names::PROJECTOR_BATCH_DURATION_SECONDS);
        if e.sum(&batches, &[]) >= 1.0 || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for name in names::ALL {
        assert!(e.type_of(name).is_some(), "# TYPE line of {name}");
    }
    let http = [("service", "msghash")];
    assert!(
        e.sum(
            names::HTTP_REQUESTS_TOTAL,
            &[
                http[0],
                ("route", "/messages"),
                ("method", "POST"),
                ("status", "201")
            ]
        ) >= 1.0
    );
    assert!(
        e.sum(
            names::HTTP_REQUESTS_TOTAL,
            &[
                http[0],
                ("route", "/messages/{digest}"),
                ("method", "GET"),
                ("status", "200")
            ]
        ) >= 1.0
    );
    assert!(
        e.sum(
            &format!("{}_count", names::HTTP_REQUEST_DURATION_SECONDS),
            &[http[0], ("route", "/messages/{digest}"), ("method", "GET")]
        ) >= 2.0
    );
    assert!(
        e.sum(
            &format!("{}_count", names::INGEST_PRODUCE_DURATION_SECONDS),
            &[]
        ) >= 1.0
    );
    assert_eq!(e.sum(names::INGEST_PRODUCE_FAILURES_TOTAL, &[]), 0.0);
    assert!(e.sum(names::PROJECTOR_EVENTS_APPLIED_TOTAL, &[]) >= 1.0);
    assert_eq!(e.sum(names::PROJECTOR_DEAD_LETTERED_TOTAL, &[]), 0.0);
    assert!(
        e.sum(
            &format!("{}_count", names::PROJECTOR_BATCH_DURATION_SECONDS),
            &[]
        ) >= 1.0
    );
    for p in 0..8 {
        assert!(
            e.has(names::PROJECTOR_LAG, &[("partition", &p.to_string())]),
            "lag of partition {p}"
        );
    }
    assert!(
        e.sum(
            names::QUERY_BARRIER_WAITS_TOTAL,
            &[("outcome", "caught_up")]
        ) >= 1.0
    );
    let ready = client
        .get(format!("{}/health/ready", m.base))
        .send()
        .await
        .expect("ready answers");
    assert_eq!(ready.status(), StatusCode::OK);
}

/// After its first read a found message is answered from memory, before routing (query's
/// front, docs/performance.md item 16). A client must not tell the difference: every later
/// answer is the first one's, headers included; the guards still refuse; the metrics count
/// each read under its route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_read_again_is_answered_guarded_and_counted_like_its_first_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        format!(
            "{}\n",
            msghash_common::http::guard::key_file_line("reader-key")
        ),
    )
    .expect("keys file");
    let (m, client) = Msghash::start_with(
        dir.path(),
        &[
            ("MSGHASH_API_KEYS_FILE", &keys),
            ("MSGHASH_API_KEYS_SCOPE", Path::new("all")),
        ],
    )
    .await;
    let base = m.base.clone();
    let created = client
        .post(format!("{base}/messages"))
        .bearer_auth("reader-key")
        .json(&serde_json::json!({ "message": "read again" }))
        .send()
        .await
        .expect("POST answered");
    assert_eq!(created.status(), StatusCode::CREATED);
    let digest = Digest::of("read again").to_hex();
    let read = |path: String, key: Option<&'static str>, id: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut request = client.get(path);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            if let Some(id) = id {
                request = request.header("x-request-id", id);
            }
            let r = request.send().await.expect("GET answered");
            let status = r.status();
            let headers = r.headers().clone();
            (status, headers, r.bytes().await.expect("body"))
        }
    };
    let path = format!("{base}/messages/{digest}");
    let (status, first, body) = read(path.clone(), Some("reader-key"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], br#"{"message":"read again"}"#);
    // What every answer carries, beside the date and its own request id.
    let same = |h: &reqwest::header::HeaderMap| {
        [
            "content-type",
            "content-length",
            "cache-control",
            "strict-transport-security",
            "x-content-type-options",
        ]
        .map(|name| h.get(name).cloned())
    };
    for (n, upper) in [(0, false), (1, false), (2, true)] {
        let path = if upper {
            format!("{base}/messages/{}", digest.to_uppercase())
        } else {
            path.clone()
        };
        let (status, again, body_again) = read(path, Some("reader-key"), Some("again-1")).await;
        assert_eq!(status, StatusCode::OK, "read {n}");
        assert_eq!(same(&again), same(&first), "read {n}");
        assert!(
            same(&again).iter().all(Option::is_some),
            "read {n}: {again:?}"
        );
        assert_eq!(again["x-request-id"], "again-1", "read {n}");
        assert_eq!(body_again, body, "read {n}");
    }
    let (status, generated, _) =
        read(format!("{base}/message/{digest}"), Some("reader-key"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(generated["x-request-id"], first["x-request-id"]);
    for key in [None, Some("wrong-key")] {
        let (status, refused, body) = read(path.clone(), key, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(refused["www-authenticate"], "Bearer");
        assert!(refused.contains_key("x-request-id"));
        assert_eq!(&body[..], br#"{"err_msg":"Missing or invalid API key"}"#);
    }

    let e = scrape(&client, &base).await;
    let counted = |route: &str, status: &str| {
        e.sum(
            names::HTTP_REQUESTS_TOTAL,
            &[
                ("service", "msghash"),
                ("route", route),
                ("method", "GET"),
                ("status", status),
            ],
        )
    };
    assert_eq!(counted("/messages/{digest}", "200"), 4.0);
    assert_eq!(counted("/message/{digest}", "200"), 1.0);
    assert_eq!(counted("/messages/{digest}", "401"), 2.0);
    assert_eq!(
        e.sum(
            &format!("{}_count", names::HTTP_REQUEST_DURATION_SECONDS),
            &[
                ("service", "msghash"),
                ("route", "/messages/{digest}"),
                ("method", "GET")
            ]
        ),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_command_adds_names_and_log_dir_gets_the_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let cert_cmd = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
        c.current_dir(dir.path())
            .env_remove("MSGHASH_CERT_DIR")
            .arg("cert")
            .arg("--dir")
            .arg(&certs)
            .args(extra);
        run_to_end(c)
    };
    let out = cert_cmd(&["--san", "edge", "--san", "query"]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let cert_path = certs.join(msghash_common::tls::CERT_FILE);
    assert_eq!(Path::new(&printed), cert_path);
    let pem = std::fs::read(&cert_path).expect("cert written");
    assert!(certs.join(msghash_common::tls::KEY_FILE).exists());
    // Present: kept as it is.
    let again = cert_cmd(&["--san", "other"]);
    assert!(again.status.success());
    assert_eq!(std::fs::read(&cert_path).expect("cert"), pem);
    // `--cert-dir` (the server's flag) and MSGHASH_CERT_DIR say where, as `--dir` does.
    let other = dir.path().join("other");
    let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
    c.current_dir(dir.path())
        .env_remove("MSGHASH_CERT_DIR")
        .arg("cert")
        .arg("--cert-dir")
        .arg(&other);
    let out = run_to_end(c);
    assert!(out.status.success(), "{out:?}");
    assert!(
        other.join(msghash_common::tls::CERT_FILE).exists(),
        "{out:?}"
    );
    let from_env = dir.path().join("from-env");
    let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
    c.current_dir(dir.path())
        .env("MSGHASH_CERT_DIR", &from_env)
        .arg("cert");
    assert!(run_to_end(c).status.success());
    assert!(from_env.join(msghash_common::tls::CERT_FILE).exists());
    let bad = cert_cmd(&["--san", "not a name"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    // The binary serves that certificate (./certs is its default), and logs to --log-dir.
    let logs = dir.path().join("logs");
    let (m, _) = Msghash::start_with(dir.path(), &[("MSGHASH_LOG_DIR", &logs)]).await;
    let port = m.port;
    let edge = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .resolve("edge", std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let base = format!("https://edge:{port}");
    let digest = post(&edge, &base, "via edge")
        .await
        .expect("201 over the edge name");
    let (status, _) = get_message(&edge, &base, &digest).await;
    assert_eq!(status, StatusCode::OK);

    m.signal("INT");
    let mut m = m;
    let status = m.child.wait().expect("exits");
    assert!(status.success(), "graceful stop: {status}");
    let files: Vec<_> = std::fs::read_dir(&logs)
        .expect("log dir created")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("msghash.") && n.ends_with(".log"))
        })
        .collect();
    assert_eq!(files.len(), 1, "one file for today: {files:?}");
    let text = std::fs::read_to_string(&files[0]).expect("log file");
    assert!(text.contains("latency_ms"), "request events: {text}");
    assert!(
        text.contains("/messages/{digest}"),
        "route templates: {text}"
    );
    assert!(text.contains("stopped"), "flushed on graceful exit: {text}");
    assert!(!text.contains('\u{1b}'), "no colour codes in files");
    // stdout, which a background thread writes in batches, has the same lines, the last
    // ones included.
    let stdout = m.stdout_to_end();
    assert!(stdout.contains("latency_ms"), "request events: {stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains("stopped"),
        "stdout flushed on graceful exit, last line: {last}"
    );
}

/// Over `MSGHASH_LOG_RATE`, routine request lines are skipped and counted on the next
/// line logged; so are client error lines, under a cap of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lines_over_the_rate_are_counted_and_client_errors_capped_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, client) =
        Msghash::start_with(dir.path(), &[("MSGHASH_LOG_RATE", Path::new("3"))]).await;
    let base = m.base.clone();
    let digest = post(&client, &base, "counted").await.expect("201");
    let get = |path: String| {
        let client = client.clone();
        async move { client.get(path).send().await.expect("answered").status() }
    };
    // A burst well over 3 lines a second, then one GET every 100 ms for a second and a
    // half: the cap lets at least 3 more lines through meanwhile, each after skipped ones.
    for _ in 0..30 {
        assert_eq!(
            get(format!("{base}/messages/{digest}")).await,
            StatusCode::OK
        );
    }
    for _ in 0..15 {
        assert_eq!(
            get(format!("{base}/messages/{digest}")).await,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 20 malformed POSTs at once, then one more once the cap has a token again (one
    // every 333 ms): it is logged and counts the ones skipped before it.
    let malformed = || async {
        let answer = client
            .post(format!("{base}/messages"))
            .header("content-type", "application/json")
            .body("{")
            .send()
            .await
            .expect("answered");
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    };
    for _ in 0..20 {
        malformed().await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    malformed().await;
    m.signal("INT");
    let mut m = m;
    assert!(m.child.wait().expect("exits").success());
    let stdout = m.stdout_to_end();
    let lines = |route: &str, status: &str| {
        stdout
            .lines()
            .filter(|l| l.contains(&format!("route={route} status={status} ")))
            .collect::<Vec<_>>()
    };
    let (ok, bad) = (
        lines("/messages/{digest}", "200"),
        lines("/messages", "400"),
    );
    let skipped_on = |lines: &[&str]| -> u64 {
        lines
            .iter()
            .filter_map(|l| l.split("skipped=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let bad_skipped = skipped_on(&bad);
    assert!(
        (3..21).contains(&bad.len()) && bad_skipped > 0,
        "client error lines capped: {} of 21 logged, {bad_skipped} counted as skipped",
        bad.len()
    );
    assert_eq!(
        bad.len() as u64 + bad_skipped,
        21,
        "every client error line logged or counted: {bad:#?}"
    );
    assert!(
        (3..45).contains(&ok.len()),
        "the burst is capped, not every line logged: {} lines of 45",
        ok.len()
    );
    let skipped = skipped_on(&ok);
    // Every GET is either logged or counted on a later line, but for the few skipped after
    // the last line logged (a token comes every 333 ms; a GET every 100 ms).
    let counted = skipped + ok.len() as u64;
    assert!(
        skipped > 0 && (40..=45).contains(&counted),
        "the lines logged and the skipped ones they count: {counted} of 45: {ok:#?}"
    );
}

/// `msghash replay` or `msghash status` beside the server in `dir`.
fn admin_command(dir: &Path, args: &[&str]) -> Command {
    let mut c = command(dir);
    c.args(args);
    c
}

/// Every listed digest with its message, compared with `expected`.
async fn assert_holds_exactly(client: &reqwest::Client, base: &str, expected: &[(String, String)]) {
    // GETs first: each waits (read-your-writes) until the projector has the message, which a
    // listing does not do, so the last 201s before the load stopped are projected by then.
    let wrong = stream::iter(expected)
        .map(|(digest, message)| async move {
            let (status, body) = get_message(client, base, digest).await;
            (status != StatusCode::OK || body["message"] != message.as_str()).then_some(digest)
        })
        .buffer_unordered(32)
        .filter_map(|d| async move { d })
        .collect::<Vec<_>>()
        .await;
    assert!(wrong.is_empty(), "{} digests read wrong", wrong.len());
    let listed: HashSet<String> = list_all(client, base).await.into_iter().collect();
    let want: HashSet<String> = expected.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(listed.len(), want.len(), "listing size");
    assert!(listed == want, "the listing differs from what was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_beside_the_server_under_load_and_after_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Without a server, a clear error.
    let out = run_to_end(admin_command(dir.path(), &["replay"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no msghash server is running"), "{stderr}");

    let (m, client) = Msghash::start(dir.path()).await;
    let base = m.base.clone();
    let messages: Vec<String> = (0..3_000).map(|i| format!("before a replay {i}")).collect();
    let known = post_all(&client, &base, &messages).await;

    // 1. `msghash replay` while readers and a writer hammer the server.
    let target = Https {
        client: client.clone(),
        base: base.clone(),
    };
    let known_messages = Arc::new(
        known
            .iter()
            .map(|(_, message)| (Digest::of(message), message.clone()))
            .collect::<Vec<_>>(),
    );
    let hammer = Hammer::start(&target, known_messages, "written during a replay");
    let out = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || run_to_end(admin_command(&dir, &["replay"])))
            .await
            .expect("join")
    };
    // The load goes on, on the new generation, before it stops.
    hammer.wait_for_more(200, 20, Duration::from_secs(60)).await;
    let report = hammer.stop().await;
    let failures = report.failures;
    let written: Vec<(String, String)> = report
        .written
        .into_iter()
        .map(|(digest, message)| (digest.to_hex(), message))
        .collect();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("applied ") && last.contains("readers are on generation 1"),
        "{stdout}"
    );
    assert!(stderr.contains("generation 1 "), "progress: {stderr}");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(!written.is_empty());
    let mut expected = known.clone();
    expected.extend(written);
    assert_holds_exactly(&client, &base, &expected).await;
    let status = run_to_end(admin_command(dir.path(), &["status"]));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("active generation: 1\n"), "{text}");
    assert!(text.contains("generations stored: 0, 1\n"), "{text}");
    drop(m);

    // 2. The server killed half-way through a replay held to 500 events a second (3,500
    //    events: 6 s; its first report comes a second in): the active generation stays,
    //    the next `msghash replay` resumes and finishes.
    let (m, client) = Msghash::start(dir.path()).await;
    let mut replay = admin_command(dir.path(), &["replay", "--drop-old", "--max-rate", "500"]);
    replay.stderr(Stdio::piped());
    let mut replay = replay.spawn().expect("msghash replay starts");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(
        replay.stderr.take().expect("stderr"),
    ));
    let mut seen = Vec::new();
    for line in lines {
        let line = line.expect("stderr line");
        seen.push(line.clone());
        let Some((applied, lag)) = process::replay_building(&line, 2) else {
            continue;
        };
        assert!(
            lag >= 1_000,
            "the replay is nearly done before the kill: {seen:#?}"
        );
        if applied > 0 {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("generation 2 building: ")),
        "{seen:#?}"
    );
    // A second `msghash replay` meanwhile follows the running one, and says so.
    let mut second = admin_command(dir.path(), &["replay"]);
    second.stderr(Stdio::piped());
    let mut second = second.spawn().expect("a second msghash replay starts");
    let said: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(
        second.stderr.take().expect("stderr"),
    ))
    .map_while(Result::ok)
    .take_while(|l| !l.starts_with("generation 2 "))
    .collect();
    assert!(
        said.iter()
            .any(|l| l.contains("a replay is already running; following it")),
        "{said:#?}"
    );
    m.kill9();
    assert!(
        !second.wait().expect("second client ends").success(),
        "the second client reports the lost server too"
    );
    let code = replay.wait().expect("replay client ends");
    assert!(!code.success(), "the client reports the lost server");
    let (m, client2) = Msghash::start(dir.path()).await;
    drop(client);
    let status = run_to_end(admin_command(dir.path(), &["status"]));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("active generation: 1\n"), "untouched: {text}");
    assert!(text.contains("pending generation: 2"), "{text}");
    let out = run_to_end(admin_command(dir.path(), &["replay", "--drop-old"]));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("applied ")
            && last.contains("readers are on generation 2")
            && last.contains("dropped generation 0, 1"),
        "{stdout}"
    );
    assert_holds_exactly(&client2, &m.base, &expected).await;
    let files: HashSet<String> = std::fs::read_dir(dir.path().join("data"))
        .expect("data dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("readmodel"))
        .collect();
    assert_eq!(
        files,
        HashSet::from([
            "readmodel-g2.redb".to_owned(),
            "readmodel-g2.rows".to_owned()
        ])
    );
}

/// `openssl s_client` offering only `version` (e.g. `-tls1_1`) to the server: its output.
/// The client's own floor is lowered (`@SECLEVEL=0`) so that it really offers the old
/// protocol and the answer is the server's.
fn tls_handshake(port: u16, version: &str) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            version,
        ])
        .args(["-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        text.contains("Cipher is ") && !text.contains("Cipher is (NONE)"),
        text,
    )
}

/// TLS 1.2 and 1.3 only: a TLS 1.1 (or 1.0) client is refused by the server with an
/// alert; 1.2 and 1.3 clients get a cipher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_1_3_are_spoken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, _) = Msghash::start(dir.path()).await;
    for old in ["-tls1_1", "-tls1"] {
        let (agreed, text) = tls_handshake(m.port, old);
        assert!(!agreed, "{old} accepted: {text}");
        assert!(
            // rustls answers a hello without TLS 1.2 or 1.3 with a handshake_failure alert.
            text.contains("alert protocol version") || text.contains("alert handshake failure"),
            "{old}: the server refuses the version: {text}"
        );
    }
    for current in ["-tls1_2", "-tls1_3"] {
        let (agreed, text) = tls_handshake(m.port, current);
        assert!(agreed, "{current} refused: {text}");
    }
}

/// `cmd` with its stdout a pipe whose reader is already gone (`msghash status | head -0`),
/// or `/dev/full` (a full disk): it must fail cleanly, exit 1, never panic (exit 101).
fn run_with_unwritable_stdout(mut make: impl FnMut() -> Command) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    for (name, stdout) in [
        ("a closed pipe", Stdio::from(writer)),
        ("/dev/full", Stdio::from(full)),
    ] {
        let mut c = make();
        c.stdout(stdout).stderr(Stdio::piped());
        let out = c.spawn().expect("spawn").wait_with_output().expect("exits");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        if name == "/dev/full" {
            assert!(err.contains("cannot write"), "{name} is said: {err}");
        }
    }
}

#[test]
fn a_command_whose_output_cannot_be_written_exits_1_without_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_with_unwritable_stdout(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
        c.arg("api-key");
        c
    });
    run_with_unwritable_stdout(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
        c.current_dir(dir.path())
            .env_remove("MSGHASH_CERT_DIR")
            .args(["cert", "--dir", "certs"]);
        c
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_when_its_stdout_is_a_closed_pipe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut c = command(dir.path());
    c.env("MSGHASH_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    // It cannot print its port: `msghash status` answering says it is up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("msghash exited with {status}: {err}");
        }
        let status = run_to_end(admin_command(dir.path(), &["status"]));
        if status.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "msghash never answered status");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exits");
    assert!(status.success(), "graceful stop: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_logs_stdout_is_only_json_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = command(dir.path());
    c.env("MSGHASH_LOG_FORMAT", "json")
        .env("MSGHASH_LOG", "info");
    let (m, client) = Msghash::spawn(c, dir.path()).await;
    post(&client, &m.base, "json").await.expect("201");
    m.signal("INT");
    let mut m = m;
    assert!(m.child.wait().expect("exits").success());
    let stdout = m.stdout_to_end();
    assert!(stdout.contains("\"listening\""), "{stdout}");
    for line in stdout.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON line: {line}"
        );
    }
}

/// A request refused before its body is read (415, 405, 404) reaches curl over HTTP/2 as
/// its status. When the server dropped the unread body, the stream was reset (CANCEL)
/// beside the answer, and curl 7.88 (Debian 12) reported "Stream error in the HTTP/2
/// framing layer" in most tries instead of the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_the_status_of_a_request_refused_before_its_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, _) = Msghash::start(dir.path()).await;
    let cacert = dir.path().join("certs/localhost.crt");
    for (args, path, want) in [
        (
            vec!["-X", "POST", "-H", "Content-Type: text/plain"],
            "/messages",
            "415",
        ),
        (
            vec!["-X", "PUT", "-H", "Content-Type: application/json"],
            "/messages",
            "405",
        ),
        (
            vec!["-X", "POST", "-H", "Content-Type: application/json"],
            "/nowhere",
            "404",
        ),
    ] {
        for attempt in 0..20 {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--http2", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg("--cacert")
                .arg(&cacert)
                .args(&args)
                .args(["-d", r#"{"message":"x"}"#])
                .arg(format!("{}{path}", m.base))
                .output()
                .await
                .expect("curl (scripts/install-test-tools installs it)");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{args:?} {path}, try {attempt}: curl failed: {err}"
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                want,
                "{args:?} {path}"
            );
        }
    }
}
