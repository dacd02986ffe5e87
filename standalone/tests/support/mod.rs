//! Starting the real `msghash` binary for the hardening tests (overload, disk errors) and
//! talking to it over HTTPS.

#![allow(dead_code)]

use reqwest::StatusCode;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The fixed sentence of every 503: nothing internal reaches a client.
pub const UNAVAILABLE: &str = "Service temporarily unavailable, retry later";

/// A running `msghash` with its working directory `cwd` (certificates in `cwd/certs`).
pub struct Msghash {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Msghash {
    /// Starts `msghash` in `cwd` on a free port with `env` on top of a clean environment and
    /// waits until `/health/live` answers over TLS.
    pub async fn start(cwd: &Path, env: &[(&str, &str)]) -> Msghash {
        let mut c = Command::new(env!("CARGO_BIN_EXE_msghash"));
        c.current_dir(cwd)
            .env("MSGHASH_LISTEN", "127.0.0.1:0")
            .env_remove("MSGHASH_DATA_DIR")
            .env_remove("MSGHASH_CERT_DIR")
            .env_remove("MSGHASH_TLS_CERT")
            .env_remove("MSGHASH_TLS_KEY")
            .env_remove("MSGHASH_LOG_DIR")
            .env_remove("MSGHASH_LOG_FORMAT")
            .env_remove("MSGHASH_WRITE_QUEUE")
            .env_remove("MSGHASH_REQUEST_TIMEOUT_MS")
            .env("MSGHASH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("msghash starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.strip_prefix("msghash is listening on https://localhost:")
                {
                    let _ = tx.send(rest.split(' ').next().and_then(|p| p.parse::<u16>().ok()));
                } else if !line.starts_with("  curl") {
                    // Its warnings and errors, for whoever reads a failed test's output.
                    eprintln!("[msghash] {line}");
                }
            }
        });
        let port = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join")
            .expect("msghash printed the address it listens on")
            .expect("a port in that line");
        let base = format!("https://localhost:{port}");
        let pem = std::fs::read(cwd.join("certs/localhost.crt")).expect("generated certificate");
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let mut m = Msghash {
            child,
            base,
            client,
        };
        m.await_status("/health/live", StatusCode::OK, Duration::from_secs(60))
            .await;
        m
    }

    /// Polls `path` until it answers `want`; panics after `within`.
    pub async fn await_status(&mut self, path: &str, want: StatusCode, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("msghash exited: {status}");
            }
            if let Ok(r) = self.client.get(format!("{}{path}", self.base)).send().await {
                if r.status() == want {
                    return;
                }
                last = Some(r.status());
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {want} within {within:?} (last: {last:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status_of(&self, path: &str) -> StatusCode {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("answered")
            .status()
    }

    /// `POST /messages`.
    pub async fn post(&self, message: &str) -> Answer {
        post(&self.client, &self.base, message).await
    }

    /// `GET /messages/{digest}`, retried on 503 until `within` (a read model catching up).
    pub async fn get_message(&self, digest: &str, within: Duration) -> (StatusCode, String) {
        let deadline = Instant::now() + within;
        loop {
            let r = self
                .client
                .get(format!("{}/messages/{digest}", self.base))
                .send()
                .await
                .expect("GET answered");
            let status = r.status();
            let body: serde_json::Value = r.json().await.expect("JSON");
            if status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let message = body["message"].as_str().unwrap_or_default().to_owned();
            return (status, message);
        }
    }

    /// The resident set of the process, from /proc/<pid>/status, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }
}

impl Drop for Msghash {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client saw of one POST.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    pub body: serde_json::Value,
    pub elapsed: Duration,
}

impl Answer {
    pub fn digest(&self) -> Option<&str> {
        self.body["digest"].as_str()
    }

    /// A 503 as the contract says: `Retry-After` and the fixed sentence, nothing internal.
    pub fn assert_clean_503(&self) {
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE, "{self:?}");
        assert!(
            self.retry_after
                .as_deref()
                .is_some_and(|v| v.parse::<u32>().is_ok()),
            "503 without a Retry-After in seconds: {self:?}"
        );
        assert_eq!(
            self.body,
            serde_json::json!({ "err_msg": UNAVAILABLE }),
            "a 503 says the fixed sentence only"
        );
    }
}

pub async fn post(client: &reqwest::Client, base: &str, message: &str) -> Answer {
    let started = Instant::now();
    let r = client
        .post(format!("{base}/messages"))
        .json(&serde_json::json!({ "message": message }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST answered: {e}"));
    let status = r.status();
    let retry_after = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = r.json().await.unwrap_or_default();
    Answer {
        status,
        retry_after,
        body,
        elapsed: started.elapsed(),
    }
}
