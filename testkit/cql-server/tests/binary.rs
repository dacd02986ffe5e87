//! The `cql-server` binary: prints `listening on <addr>`, serves the driver,
//! exits cleanly on SIGTERM.

use std::process::Stdio;

use scylla::client::session_builder::SessionBuilder;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

#[tokio::test]
async fn binary_prints_address_serves_and_stops_on_sigterm(
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cql-server"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next_line().await?.ok_or("no output")?;
    let addr = line
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("unexpected first line: {line}"))?
        .to_owned();
    assert!(addr.starts_with("127.0.0.1:"));

    let session = SessionBuilder::new().known_node(&addr).build().await?;
    session
        .query_unpaged(
            "CREATE KEYSPACE IF NOT EXISTS msghash WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 1}",
            (),
        )
        .await?;
    drop(session);

    let pid = child.id().ok_or("no pid")?;
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(kill.success());
    let status = child.wait().await?;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(lines.next_line().await?, None, "exactly one line of output");
    Ok(())
}
