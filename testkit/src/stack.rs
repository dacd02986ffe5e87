//! `scripts/dev-stack` (single or `--cluster`) run by a test: started on free ports in a
//! directory of its own, read back from its `ports.env` and pid files, stopped with SIGTERM.
//! If a test fails first, dropping it still takes down everything it started: the stack
//! runs in a process group of its own, killed after the graceful stop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Sends `SIG<sig>` to `pid` (or, for `-<pgid>`, to a process group).
pub fn signal(pid: impl std::fmt::Display, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{sig}"), "--".to_owned(), pid.to_string()])
        .status();
}

pub struct DevStack {
    child: Child,
    pub run_dir: PathBuf,
    /// The edge's certificate (also the services').
    pub cert: PathBuf,
    /// A client that trusts [`DevStack::cert`].
    pub client: reqwest::Client,
    /// `https://localhost:<edge port>`.
    pub edge: String,
    ports: String,
    _tmp: tempfile::TempDir,
}

impl DevStack {
    /// Runs `scripts/dev-stack <args>` with `env` (every port it takes at 0, so free ones)
    /// and waits up to `within` for `ready`.
    pub async fn start(args: &[&str], env: &[(&str, String)], within: Duration) -> DevStack {
        let tmp = tempfile::tempdir().expect("tempdir");
        let run_dir = tmp.path().join("run");
        let cert_dir = tmp.path().join("certs");
        let mut command = Command::new(repo_root().join("scripts/dev-stack"));
        command.args(args);
        for port in [
            "MSGHASH_EDGE_PORT",
            "MSGHASH_BROKER_PORT",
            "MSGHASH_BROKER_CONTROLLER_PORT",
            "MSGHASH_CQL_PORT",
            "MSGHASH_CASSANDRA_STORAGE_PORT",
            "MSGHASH_INGEST_PORT",
            "MSGHASH_QUERY_PORT",
            "MSGHASH_PROJECTOR_PORT",
        ] {
            command.env(port, "0");
        }
        let mut child = command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("MSGHASH_RUN_DIR", &run_dir)
            .env("MSGHASH_CERT_DIR", &cert_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("scripts/dev-stack starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let started = Instant::now();
        let ready = timeout(within, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "ready" {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "dev-stack {args:?} never printed `ready`");
        eprintln!(
            "dev-stack {args:?} ready in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        let ports = std::fs::read_to_string(run_dir.join("ports.env")).expect("ports.env");
        let cert = cert_dir.join("localhost.crt");
        let pem = std::fs::read(&cert).expect("the edge's certificate");
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let mut stack = DevStack {
            child,
            run_dir,
            cert,
            client,
            edge: String::new(),
            ports,
            _tmp: tmp,
        };
        stack.edge = format!("https://localhost:{}", stack.port("EDGE_PORT"));
        stack
    }

    /// A line `NAME=value` of `ports.env`.
    pub fn value(&self, name: &str) -> &str {
        self.ports
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{name} in ports.env: {}", self.ports))
    }

    pub fn port(&self, name: &str) -> u16 {
        self.value(name).parse().expect("a port")
    }

    /// The pid in `pids/<name>.pid` now.
    pub fn pid(&self, name: &str) -> u32 {
        let path = self.run_dir.join("pids").join(format!("{name}.pid"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
    }

    /// Waits until `name` runs under a pid other than `old` (its supervisor restarted it).
    pub async fn restarted(&self, name: &str, old: u32, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let pid = self.pid(name);
            if pid != old && alive(pid) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not restarted in {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the stack the way a developer does (SIGTERM); it must exit cleanly and leave
    /// none of `processes` (names of pid files) running.
    pub async fn stop(mut self, processes: &[&str]) {
        let pids: Vec<u32> = processes.iter().map(|n| self.pid(n)).collect();
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM");
        }
        let status = timeout(Duration::from_secs(120), self.child.wait())
            .await
            .expect("dev-stack exits after SIGTERM")
            .expect("wait");
        assert!(status.success(), "dev-stack exit status {status}");
        for pid in pids {
            assert!(!alive(pid), "process {pid} outlived dev-stack");
        }
    }
}

impl Drop for DevStack {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else { return };
        signal(pid, "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        // Whatever a failed stop left behind: the stack's process group.
        signal(format!("-{pid}"), "KILL");
    }
}

/// The workspace root (scripts are found from there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}
