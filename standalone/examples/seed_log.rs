//! Appends N `MessageHashed` events to a data directory's embedded event log, fast, for
//! `scripts/bench replay --events N`: the projector and `msghash replay` then have N events
//! to work through. Not a server: run it while no msghash uses the directory.
//!
//! `cargo run --release -p msghash --example seed_log -- <data-dir> <events> [partitions]`
//!
//! Prints one JSON line: `{"events":N,"seconds":S,"events_per_s":R}`.

use futures::stream::{self, StreamExt};
use msghash_common::adapters::embedded::EmbeddedLog;
use msghash_common::event::MessageHashed;
use msghash_common::partition::partition_for;
use msghash_common::ports::EventLog;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Instant;

/// Appends in flight at once: the log's writer commits whatever waits as one transaction.
const IN_FLIGHT: usize = 2048;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: seed_log <data-dir> <events> [partitions (8)]";
    let dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let events: u64 = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let partitions = match args.next() {
        Some(p) => p.parse::<NonZeroU32>()?,
        None => NonZeroU32::MIN.saturating_add(7),
    };
    std::fs::create_dir_all(&dir)?;
    let log = tokio::task::spawn_blocking(move || EmbeddedLog::open(&dir, partitions)).await??;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let start = Instant::now();
    let log = &log;
    let nonce = &nonce;
    let mut results = stream::iter(0..events)
        .map(|i| async move {
            let event = MessageHashed::new(format!("replay-{nonce}-{i:012}"));
            log.append(partition_for(&event.digest, log.partitions()), &event)
                .await
        })
        .buffer_unordered(IN_FLIGHT);
    while let Some(result) = results.next().await {
        result?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"events\":{events},\"seconds\":{seconds:.2},\"events_per_s\":{:.1}}}",
        events as f64 / seconds.max(1e-9)
    );
    Ok(())
}
