//! A service binary (`ingest`, `query`, `projector`) run as its own process by a test, on
//! port 0: the port it bound is read back from its JSON log (the `<service> listening`
//! event's `listen` field). Its metrics are then its own, whatever else the test process
//! runs at the same time.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running service process, killed when dropped.
pub struct ServiceProcess {
    pub child: Child,
    /// The address the service bound.
    pub address: SocketAddr,
}

impl ServiceProcess {
    /// Starts `binary` with `args` (plus `--listen=127.0.0.1:0 --log-format=json`) and waits
    /// up to `within` for it to bind. Panics with its log when it exits or never binds.
    pub async fn start(binary: &str, args: &[String], within: Duration) -> ServiceProcess {
        let mut child = Command::new(binary)
            .args(args)
            .args(["--listen=127.0.0.1:0", "--log-format=json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        let address = tokio::time::timeout(within, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = listen_field(&line) {
                    return Some(address);
                }
                seen.push(line);
            }
            None
        })
        .await;
        let Ok(Some(address)) = address else {
            panic!(
                "{binary} did not report its address within {within:?}; its log:\n{}",
                seen.join("\n")
            );
        };
        // Keep reading, so that the service never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServiceProcess { child, address }
    }

    /// `https://localhost:<port>`.
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.address.port())
    }

    /// Sends SIGTERM and waits up to `within` for the exit status.
    pub async fn stop(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM to {pid}");
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("pid {pid} still running {within:?} after SIGTERM"))
            .expect("wait")
    }
}

/// The `listen` field of a JSON log line, when it has one.
fn listen_field(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    value.get("listen")?.as_str()?.parse().ok()
}

/// A replay's progress line while it builds `generation` ("generation <g> building: <n>
/// events applied, <r> events/s, lag <l> [...]"): the events applied and the lag. `None`
/// for any other line.
pub fn replay_building(line: &str, generation: msghash_common::Generation) -> Option<(u64, u64)> {
    let rest = line.strip_prefix(&format!("generation {generation} building: "))?;
    let applied = rest.split(' ').next()?.parse().ok()?;
    let lag = rest
        .split(", lag ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some((applied, lag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_address_comes_from_the_listening_event() {
        let line = r#"{"level":"INFO","message":"projector listening","listen":"127.0.0.1:4321"}"#;
        assert_eq!(
            listen_field(line),
            Some("127.0.0.1:4321".parse().expect("addr"))
        );
        assert_eq!(listen_field(r#"{"message":"other"}"#), None);
        assert_eq!(listen_field("not json"), None);
    }

    #[test]
    fn replay_building_reads_applied_and_lag_of_its_generation_only() {
        let line = "generation 2 building: 1160 events applied, 1155 events/s, lag 23006 \
                    [p0=2859 p1=2899], ETA 19.9s";
        assert_eq!(replay_building(line, 2), Some((1160, 23006)));
        assert_eq!(replay_building(line, 1), None);
        assert_eq!(replay_building("generation 2 switched, handing over: 5 events applied, 1 events/s, lag 0 [], ETA -", 2), None);
        assert_eq!(replay_building("applied 5 events in 0.1s", 2), None);
    }
}
