//! What one durable commit of the read model costs, on redb and on fjall, as the model
//! grows: `ROWS_BEFORE` rows are written first (in commits of `ROWS_PER_COMMIT`), then
//! `COMMITS` more commits are timed (wall clock, and the CPU of every thread of the
//! process, so fjall's background flushes and compactions count). Then 100,000 point
//! reads of rows that exist (at most as many as were written) and as many of rows that
//! do not.
//!
//! The shape is msghash's under a POST load (docs/performance.md, items 22-23): rows keyed
//! by random 32-byte digests, 100-byte messages, a durable commit every 3 s of about 75,000
//! rows. redb: one transaction per commit, rows in key order, 8 MiB cache, as
//! `common/src/adapters/embedded/model.rs` does. fjall: the rows in batches of 100 (a
//! projector batch), the journal persisted (`SyncAll`) once per commit.
//!
//! Usage: msghash-storage-bench redb|fjall DIR [ROWS_BEFORE [COMMITS [ROWS_PER_COMMIT]]]
//! DIR must not exist or be empty; defaults: 1,500,000 rows, 30 commits, 75,000 rows.

use redb::ReadableDatabase;
use std::path::Path;
use std::time::{Duration, Instant};

const MESSAGES: redb::TableDefinition<&[u8; 32], &str> = redb::TableDefinition::new("messages");
const CACHE_BYTES: u64 = 8 << 20;
const BATCH_ROWS: usize = 100;
const READS: usize = 100_000;

type Error = Box<dyn std::error::Error>;

/// The CPU time of every thread of the process so far.
fn cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn resident_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Random digests (xorshift: the same sequence in every run and for both engines).
struct Digests(u64);

impl Digests {
    fn next(&mut self) -> [u8; 32] {
        let mut digest = [0u8; 32];
        for chunk in digest.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes());
        }
        digest
    }

    fn sorted(&mut self, n: usize) -> Vec<[u8; 32]> {
        let mut rows: Vec<[u8; 32]> = (0..n).map(|_| self.next()).collect();
        rows.sort_unstable();
        rows
    }
}

/// One engine: a durable commit of rows, and a point read.
trait Store {
    fn commit(&self, digests: &[[u8; 32]], message: &str) -> Result<(), Error>;
    fn get(&self, digest: &[u8; 32]) -> Result<bool, Error>;
    /// Waits for background work (flushes, compactions) to end.
    fn settle(&self) {}
}

struct Redb(redb::Database);

impl Store for Redb {
    fn commit(&self, digests: &[[u8; 32]], message: &str) -> Result<(), Error> {
        let txn = self.0.begin_write()?;
        {
            let mut table = txn.open_table(MESSAGES)?;
            for digest in digests {
                table.insert(digest, message)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn get(&self, digest: &[u8; 32]) -> Result<bool, Error> {
        let txn = self.0.begin_read()?;
        let table = txn.open_table(MESSAGES)?;
        Ok(table.get(digest)?.is_some())
    }
}

struct Fjall {
    db: fjall::Database,
    messages: fjall::Keyspace,
}

impl Store for Fjall {
    fn commit(&self, digests: &[[u8; 32]], message: &str) -> Result<(), Error> {
        for chunk in digests.chunks(BATCH_ROWS) {
            let mut batch = self.db.batch();
            for digest in chunk {
                batch.insert(&self.messages, digest.as_slice(), message.as_bytes());
            }
            batch.commit()?;
        }
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }

    fn get(&self, digest: &[u8; 32]) -> Result<bool, Error> {
        Ok(self.messages.get(digest)?.is_some())
    }

    fn settle(&self) {
        while self.db.outstanding_flushes() > 0 || self.db.active_compactions() > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn open(engine: &str, dir: &Path) -> Result<Box<dyn Store>, Error> {
    std::fs::create_dir_all(dir)?;
    match engine {
        "redb" => Ok(Box::new(Redb(
            redb::Builder::new()
                .set_cache_size(CACHE_BYTES as usize)
                .create(dir.join("readmodel.redb"))?,
        ))),
        "fjall" => {
            let db = fjall::Database::builder(dir)
                .manual_journal_persist(true)
                .cache_size(CACHE_BYTES)
                .open()?;
            // Every filter and index block in memory: without it a point read took
            // 50-60 us (filter and index blocks read again each time), with it 5-7 us.
            let messages = db.keyspace("messages", || {
                fjall::KeyspaceCreateOptions::default()
                    .max_memtable_size(8 << 20)
                    .filter_block_pinning_policy(fjall::config::PinningPolicy::all(true))
                    .index_block_pinning_policy(fjall::config::PinningPolicy::all(true))
            })?;
            Ok(Box::new(Fjall { db, messages }))
        }
        other => Err(format!("unknown engine {other:?}: redb or fjall").into()),
    }
}

fn arg(args: &[String], i: usize, default: usize) -> Result<usize, Error> {
    args.get(i).map_or(Ok(default), |a| {
        a.replace(',', "")
            .parse()
            .map_err(|e| format!("argument {i} ({a:?}): {e}").into())
    })
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(engine), Some(dir)) = (args.get(1), args.get(2)) else {
        return Err(
            "usage: msghash-storage-bench redb|fjall DIR [ROWS_BEFORE [COMMITS [ROWS_PER_COMMIT]]]"
                .into(),
        );
    };
    let rows_before = arg(&args, 3, 1_500_000)?;
    let commits = arg(&args, 4, 30)?.max(1);
    let per_commit = arg(&args, 5, 75_000)?.max(1);
    if !matches!(engine.as_str(), "redb" | "fjall") {
        return Err(format!("unknown engine {engine:?}: redb or fjall").into());
    }
    let dir = Path::new(dir);
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!("{} is not empty", dir.display()).into());
    }
    let store = open(engine, dir)?;
    let message = "x".repeat(100);
    let mut digests = Digests(0x9E37_79B9_7F4A_7C15);

    let start = Instant::now();
    for _ in 0..rows_before / per_commit {
        store.commit(&digests.sorted(per_commit), &message)?;
    }
    store.settle();
    eprintln!(
        "{engine}: {rows_before} rows written in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let (cpu_before, start) = (cpu(), Instant::now());
    let mut slowest = Duration::ZERO;
    for i in 0..commits {
        let rows = digests.sorted(per_commit);
        let commit = Instant::now();
        store.commit(&rows, &message)?;
        slowest = slowest.max(commit.elapsed());
        if (i + 1) % 10 == 0 {
            eprintln!(
                "{engine}: {} commits, {} MiB resident",
                i + 1,
                resident_mib()
            );
        }
    }
    store.settle();
    let (wall, used) = (start.elapsed(), cpu() - cpu_before);

    // The first rows written, again from the start of the sequence: all exist.
    let mut again = Digests(0x9E37_79B9_7F4A_7C15);
    let reads = READS.min(rows_before / per_commit * per_commit + commits * per_commit);
    let hits: Vec<[u8; 32]> = (0..reads).map(|_| again.next()).collect();
    let misses: Vec<[u8; 32]> = (0..reads).map(|_| digests.next()).collect();
    let timed = |keys: &[[u8; 32]]| -> Result<(f64, usize), Error> {
        let start = Instant::now();
        let mut found = 0;
        for key in keys {
            found += usize::from(store.get(key)?);
        }
        Ok((
            start.elapsed().as_secs_f64() * 1e6 / keys.len() as f64,
            found,
        ))
    };
    let (hit_us, found_hits) = timed(&hits)?;
    let (miss_us, found_misses) = timed(&misses)?;
    if found_hits != reads || found_misses != 0 {
        return Err(format!(
            "reads: {found_hits} of {reads} hits found, {found_misses} misses found"
        )
        .into());
    }
    println!(
        "{engine}: {commits} commits of {per_commit} rows after {rows_before}: per commit {:.3} s wall \
         (slowest {:.3}), {:.3} s CPU; point read {hit_us:.2} us (hit), {miss_us:.2} us (miss); \
         {} MiB resident",
        wall.as_secs_f64() / commits as f64,
        slowest.as_secs_f64(),
        used.as_secs_f64() / commits as f64,
        resident_mib()
    );
    Ok(())
}
