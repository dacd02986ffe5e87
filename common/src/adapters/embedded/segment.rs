//! `events.log`: the records of the embedded event log, appended to one file.
//!
//! # Format
//!
//! The file is a sequence of frames, one per record, in the order they were committed
//! (the partitions interleaved):
//!
//! ```text
//! length   u32 LE   bytes of the payload (at least MIN_PAYLOAD)
//! crc      u32 LE   CRC-32 (IEEE) of the payload
//! payload:
//!   partition  u32 LE
//!   offset     u64 LE   contiguous from 0 within the partition
//!   key length u32 LE
//!   key        bytes    the `MessageHashed` key (the digest)
//!   value      bytes    the `MessageHashed` envelope, as the Kafka adapter writes it
//! ```
//!
//! # Durability
//!
//! The writer appends a whole group with one positional write at the durable end and then
//! `fdatasync`s the file (which also makes its new length durable); only then are the
//! records published and acknowledged. So after a crash only the last, unacknowledged
//! group can be incomplete: opening scans the file, checks every frame (length, CRC,
//! partition, the next offset of its partition) and cuts the file at the first frame that
//! fails, as long as what is cut could be one group's write ([`TORN_TAIL_LIMIT`]) and lies
//! past the length `events.redb` last recorded as durable (every transaction of the writer
//! records it). Otherwise it is not a torn write but a damaged file: the open fails and
//! names it, rather than drop acknowledged records.
//!
//! After a failed write or `fdatasync` the writer cuts the file back to its durable end
//! before it writes again ([`Segment::truncate`]): nothing of a failed group survives, and
//! no page the kernel may have dropped after a failed `fdatasync` is trusted.
//!
//! # Index
//!
//! Opening builds, per partition, the file position of every [`MARK_EVERY`]-th record
//! (records 0, 32, 64, ...: 8 bytes per 32 records in memory, so the index stays small
//! however long the log grows). A read of a partition's range starts at the mark at or
//! before its first record (or where the partition's last read stopped, when it goes on
//! from there, as a subscription does) and reads on with positional reads, in chunks,
//! passing over the frames of the other partitions and the few of its own before the
//! first one wanted; so reads never block the writer and need no lock on the file. Why a file and
//! not a B-tree: docs/performance.md, item 17; why marks and not every position: item 21.

use super::{EmbeddedError, MAX_GROUP_BYTES, MAX_GROUP_REQUESTS};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// The records file inside the data directory.
pub const SEGMENT_FILE: &str = "events.log";

/// length + crc.
const HEADER: usize = 8;
/// partition + offset + key length.
const MIN_PAYLOAD: usize = 16;
/// The most a crash can leave half-written at the end of the file: one group's write (a
/// group takes requests while it holds less than [`MAX_GROUP_BYTES`], so the last one it
/// took may add a whole [`MAX_FRAME`]; each record adds its frame's fields). A longer
/// damaged end is refused, never cut.
pub(super) const TORN_TAIL_LIMIT: u64 =
    (MAX_GROUP_BYTES + MAX_FRAME + MAX_GROUP_REQUESTS * (HEADER + MIN_PAYLOAD)) as u64;
/// The largest frame this build writes or reads: a record larger than a whole group is
/// rejected by the writer, and a length field above it is damage, never an allocation.
pub(super) const MAX_FRAME: usize = 2 * MAX_GROUP_BYTES;
/// The bytes read at a time while scanning or serving a read.
const CHUNK: usize = 256 * 1024;
/// The index keeps the position of every this-many-th record of a partition. A read
/// passes over at most `MARK_EVERY - 1` of the partition's records before its first one,
/// with the other partitions' frames in between: tens of KiB of short messages at the
/// default 8 partitions, more with more partitions.
pub(super) const MARK_EVERY: u64 = 32;
/// What a read expects a frame to take, to size its positional reads: a frame of a short
/// message (what lies beyond the estimate is read in further chunks).
const TYPICAL_FRAME: usize = 256;
/// The least a read takes in at a time.
const MIN_READ: usize = 16 * 1024;

/// How [`Segment::open`] finds the file.
pub(super) enum Opening {
    /// A new log: the file may be missing, and must not hold records.
    New,
    /// Just written by the move from layout 1: all of it is durable, nothing may be cut.
    Moved,
    /// A log with records: the file must be there.
    Existing,
}

/// One record, as read back.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) offset: u64,
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
}

/// The records file and its index. Shared by the writer (appends, truncation) and the
/// readers (positional reads of committed frames only).
pub(super) struct Segment {
    file: File,
    path: PathBuf,
    index: RwLock<Index>,
    /// Per partition, where its last read stopped: the next offset and the position to
    /// read on from (record `next` is the first of the partition at or after it). A read
    /// that starts there skips nothing; any other starts at a mark. (0, 0) holds for
    /// every partition of any file.
    resume: Mutex<Vec<(u64, u64)>>,
}

/// Where the committed records are: per partition, how many there are and where every
/// [`MARK_EVERY`]-th one starts, and where the last committed frame ends.
struct Index {
    /// Per partition, the file positions of records 0, `MARK_EVERY`, 2 × `MARK_EVERY`, ...
    marks: Vec<Vec<u64>>,
    /// Per partition, the number of committed records (its next offset).
    lens: Vec<u64>,
    /// The end of the last committed frame: reads never go past it.
    end: u64,
}

impl Index {
    fn new(partitions: u32) -> Index {
        Index {
            marks: vec![Vec::new(); partitions as usize],
            lens: vec![0; partitions as usize],
            end: 0,
        }
    }

    /// Records that the next record of `partition` starts at `pos` (nothing for a
    /// partition out of range).
    fn push(&mut self, partition: u32, pos: u64) {
        let p = partition as usize;
        if let (Some(marks), Some(len)) = (self.marks.get_mut(p), self.lens.get_mut(p)) {
            if *len % MARK_EVERY == 0 {
                marks.push(pos);
            }
            *len += 1;
        }
    }
}

/// Why a damaged frame ends the scan.
enum Damage {
    /// Fewer bytes left than the frame needs.
    Short,
    BadLength(u32),
    BadChecksum,
    /// A valid frame that does not continue its partition.
    OutOfOrder {
        partition: u32,
        offset: u64,
    },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Short => write!(f, "an incomplete frame"),
            Damage::BadLength(n) => write!(f, "a frame of impossible length {n}"),
            Damage::BadChecksum => write!(f, "a frame whose checksum does not match"),
            Damage::OutOfOrder { partition, offset } => {
                write!(
                    f,
                    "offset {offset} of partition {partition} out of sequence"
                )
            }
        }
    }
}

/// Appends the frame of one record to `buf`.
pub(super) fn encode(buf: &mut Vec<u8>, partition: u32, offset: u64, key: &[u8], value: &[u8]) {
    let payload = MIN_PAYLOAD + key.len() + value.len();
    let start = buf.len();
    // The length is checked by the caller (a request is far below 4 GiB: the body limit).
    buf.extend_from_slice(&u32::try_from(payload).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&partition.to_le_bytes());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The payload length of a frame whose header starts `head`, if it is plausible.
fn payload_len(head: &[u8]) -> Result<usize, Damage> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let n = len as usize;
    if !(MIN_PAYLOAD..=MAX_FRAME).contains(&n) {
        return Err(Damage::BadLength(len));
    }
    Ok(n)
}

/// A checked frame: partition, offset, key, value.
type Frame<'a> = (u32, u64, &'a [u8], &'a [u8]);

/// Checks a whole frame (`HEADER` + payload) and returns its fields.
fn decode(frame: &[u8]) -> Result<Frame<'_>, Damage> {
    let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let payload = &frame[HEADER..];
    if crc32fast::hash(payload) != crc {
        return Err(Damage::BadChecksum);
    }
    let partition = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&payload[4..12]);
    let offset = u64::from_le_bytes(offset);
    let key_len = u32::from_le_bytes([payload[12], payload[13], payload[14], payload[15]]);
    let rest = &payload[MIN_PAYLOAD..];
    let key_len = key_len as usize;
    if key_len > rest.len() {
        // The checksum matched, so the writer wrote this: not a torn write.
        return Err(Damage::BadLength(key_len as u32));
    }
    let (key, value) = rest.split_at(key_len);
    Ok((partition, offset, key, value))
}

impl Segment {
    /// Opens (or creates) `dir/events.log`, locks it, scans it, cuts a torn end, makes what
    /// it keeps durable and returns the file with its index and, per partition, the next
    /// offset. `synced`: the length `events.redb` last recorded as durable; a file shorter
    /// than that, or damaged before it, is refused. Blocking.
    pub(super) fn open(
        dir: &Path,
        partitions: u32,
        opening: Opening,
        synced: u64,
    ) -> Result<(Segment, Vec<u64>), EmbeddedError> {
        Segment::open_with_limit(dir, partitions, opening, synced, TORN_TAIL_LIMIT)
    }

    /// [`open`](Segment::open), cutting at most `limit` bytes of an unfinished write.
    fn open_with_limit(
        dir: &Path,
        partitions: u32,
        opening: Opening,
        synced: u64,
        limit: u64,
    ) -> Result<(Segment, Vec<u64>), EmbeddedError> {
        let path = dir.join(SEGMENT_FILE);
        let storage = |detail: String| EmbeddedError::Storage {
            file: path.clone(),
            detail,
        };
        if matches!(opening, Opening::Existing) && !path.exists() {
            return Err(storage(
                "the event log's records file is missing (events.redb still holds its \
                 group positions): restore the file or start from an empty data directory"
                    .into(),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| storage(e.to_string()))?;
        // events.redb's lock already keeps a second process out; this one also holds while
        // that handle is closed and reopened after a storage failure.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(EmbeddedError::InUse {
                    dir: dir.to_path_buf(),
                    file: path,
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(storage(format!("locking: {e}"))),
        }
        let file_len = file.metadata().map_err(|e| storage(e.to_string()))?.len();
        if matches!(opening, Opening::New) && file_len > 0 {
            return Err(storage(
                "holds records, but events.redb records no event log: they belong to another \
                 log; move the file away or restore its events.redb"
                    .into(),
            ));
        }
        let synced = match opening {
            Opening::Moved => file_len,
            Opening::New | Opening::Existing => synced,
        };
        let segment = Segment {
            file,
            path: path.clone(),
            index: RwLock::new(Index::new(partitions)),
            resume: Mutex::new(vec![(0, 0); partitions as usize]),
        };
        let (end, damage) = segment.scan(file_len).map_err(|e| storage(e.to_string()))?;
        if damage.is_none() && end < synced {
            return Err(storage(format!(
                "ends at byte {end}, before byte {synced}, which was durable: records that \
                 were acknowledged are missing; restore the file"
            )));
        }
        if let Some(damage) = damage {
            let cut = file_len - end;
            if end < synced {
                return Err(storage(format!(
                    "{damage} at byte {end}, before byte {synced}, which was durable: the file \
                     is damaged (not an unfinished write); refusing to cut it"
                )));
            }
            if cut > limit {
                return Err(storage(format!(
                    "{damage} at byte {end}, {cut} bytes before the end: more than one \
                     unfinished write can leave, so the file is damaged; refusing to cut it"
                )));
            }
            tracing::warn!(
                file = %path.display(), at = end, bytes = cut, reason = %damage,
                "event log ends in an unfinished write (a crash during a commit); cutting it: \
                 none of it was acknowledged"
            );
            segment
                .truncate(end)
                .map_err(|e| storage(format!("cutting the unfinished write: {e}")))?;
        }
        // What was read may still be only in the page cache (the process died between a
        // group's write and its fdatasync): make it durable before anyone reads it.
        segment
            .file
            .sync_all()
            .map_err(|e| storage(format!("syncing: {e}")))?;
        let ends = segment.ends();
        Ok((segment, ends))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length: right after [`open`](Segment::open), the end of its last frame,
    /// where the writer appends next.
    pub(super) fn durable_end(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Per partition, the next offset.
    pub(super) fn ends(&self) -> Vec<u64> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lens
            .clone()
    }

    /// The bytes the index holds in memory (its marks' allocations).
    #[cfg(test)]
    fn index_bytes(&self) -> usize {
        let index = self
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        index.marks.iter().map(|m| m.capacity() * 8).sum()
    }

    /// Reads every frame from the start, indexing the good ones. Returns the end of the
    /// last good frame and, if the file goes on past it, why it stopped there.
    fn scan(&self, file_len: u64) -> std::io::Result<(u64, Option<Damage>)> {
        let mut index = self
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
        // `buf` holds the file from `buf_at`.
        let mut buf_at = 0u64;
        let mut pos = 0u64;
        while pos < file_len {
            let frame = match self.load_frame(&mut buf, &mut buf_at, pos, CHUNK)? {
                Ok(frame) => frame,
                Err(damage) => return Ok((pos, Some(damage))),
            };
            let size = frame.len() as u64;
            let (partition, offset, _, _) = match decode(&buf[frame]) {
                Ok(record) => record,
                Err(damage) => return Ok((pos, Some(damage))),
            };
            if index.lens.get(partition as usize) != Some(&offset) {
                return Ok((pos, Some(Damage::OutOfOrder { partition, offset })));
            }
            index.push(partition, pos);
            pos += size;
            index.end = pos;
        }
        Ok((pos, None))
    }

    /// Makes `buf` hold the whole frame at `pos` and returns where it is in `buf`, or why
    /// there is no frame there. A read takes in about `hint` bytes (at most [`CHUNK`]), so
    /// the frames after this one come with it.
    fn load_frame(
        &self,
        buf: &mut Vec<u8>,
        buf_at: &mut u64,
        pos: u64,
        hint: usize,
    ) -> std::io::Result<Result<std::ops::Range<usize>, Damage>> {
        if !self.fill(buf, buf_at, pos, HEADER, hint)? {
            return Ok(Err(Damage::Short));
        }
        let frame = match payload_len(&buf[(pos - *buf_at) as usize..]) {
            Ok(n) => HEADER + n,
            Err(damage) => return Ok(Err(damage)),
        };
        if !self.fill(buf, buf_at, pos, frame, hint)? {
            return Ok(Err(Damage::Short));
        }
        let at = (pos - *buf_at) as usize;
        Ok(Ok(at..at + frame))
    }

    /// Makes `buf` hold the `need` bytes at `pos`, reading a new chunk from `pos` if it
    /// does not. False if the file ends first.
    fn fill(
        &self,
        buf: &mut Vec<u8>,
        buf_at: &mut u64,
        pos: u64,
        need: usize,
        hint: usize,
    ) -> std::io::Result<bool> {
        let held = *buf_at + buf.len() as u64;
        if pos >= *buf_at && pos + need as u64 <= held {
            return Ok(true);
        }
        let want = need.max(hint.min(CHUNK));
        buf.resize(want, 0);
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut buf[got..], pos + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.clear();
                    return Err(e);
                }
            }
        }
        buf.truncate(got);
        *buf_at = pos;
        Ok(got >= need)
    }

    /// Writes `frames` (whole frames; `placed` gives each one's partition and where it
    /// starts in `frames`, in order) at `at`, the durable end, and makes them durable; only
    /// then are they indexed.
    /// Returns the new durable end. On error nothing is indexed, and the caller must
    /// [`truncate`](Segment::truncate) back to `at` before writing again.
    pub(super) fn append(
        &self,
        at: u64,
        frames: &[u8],
        placed: &[(u32, usize)],
    ) -> std::io::Result<u64> {
        self.file.write_all_at(frames, at)?;
        self.file.sync_data()?;
        let mut index = self
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(partition, start) in placed {
            index.push(partition, at + start as u64);
        }
        index.end = at + frames.len() as u64;
        Ok(index.end)
    }

    /// Cuts the file at `len` and makes that durable.
    pub(super) fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    /// Reads records `first..first + count` of `partition`, stopping (after at least one)
    /// once they hold `max_bytes` of key and value. Every one of them must be committed
    /// (below the published end); records past the partition's end are not returned.
    /// Blocking.
    pub(super) fn read(
        &self,
        partition: u32,
        first: u64,
        count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, String> {
        let (mark_at, mark_next, count, end, partitions) = {
            let index = self
                .index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let p = partition as usize;
            let (Some(marks), Some(&len)) = (index.marks.get(p), index.lens.get(p)) else {
                return Err(format!("partition {partition} out of range"));
            };
            let first = first.min(len);
            let count = usize::try_from(len - first).map_or(count, |left| left.min(count));
            if count == 0 {
                return Ok(Vec::new());
            }
            // `first < len`, so its mark exists.
            let mark = usize::try_from(first / MARK_EVERY).unwrap_or(usize::MAX);
            let Some(&at) = marks.get(mark) else {
                return Err(format!(
                    "partition {partition} has no mark for offset {first}"
                ));
            };
            (
                at,
                first - first % MARK_EVERY,
                count,
                index.end,
                index.lens.len(),
            )
        };
        let resume = self
            .resume
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(partition as usize)
            .copied();
        let (mut pos, mut next) = match resume {
            Some((next, at)) if next == first => (at, next),
            _ => (mark_at, mark_next),
        };
        // About the frames from the start to the last record wanted, all partitions'.
        let frames = usize::try_from(first - next)
            .unwrap_or(usize::MAX)
            .saturating_add(count);
        let hint = frames
            .saturating_mul(partitions)
            .saturating_mul(TYPICAL_FRAME)
            .clamp(MIN_READ, CHUNK);
        let damaged = |what: String| format!("{}: {what}", self.path.display());
        let mut records = Vec::with_capacity(count.min(4096));
        let mut bytes = 0usize;
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = 0u64;
        // At least one record, whatever its size.
        while records.len() < count && (records.is_empty() || bytes < max_bytes) {
            if pos >= end {
                return Err(damaged(format!(
                    "the committed records end before offset {next} of partition {partition}"
                )));
            }
            let hint = usize::try_from(end - pos).map_or(hint, |left| left.min(hint));
            let here = pos;
            let at = |d: Damage| {
                damaged(format!(
                    "at byte {here}, reading partition {partition} (the frames on the way are \
                     of any partition): {d}"
                ))
            };
            let frame = self
                .load_frame(&mut buf, &mut buf_at, pos, hint)
                .map_err(|e| damaged(e.to_string()))?
                .map_err(at)?;
            pos += frame.len() as u64;
            if pos > end {
                // A length field damaged since the open: bytes past the end are not trusted.
                return Err(at(Damage::Short));
            }
            let head = &buf[frame.start + HEADER..frame.start + HEADER + 12];
            let p = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            if p != partition {
                continue;
            }
            let (_, o, key, value) = decode(&buf[frame]).map_err(at)?;
            if o != next {
                return Err(damaged(format!(
                    "partition {partition} has offset {o} where offset {next} should be"
                )));
            }
            next += 1;
            if o < first {
                continue;
            }
            bytes += key.len() + value.len();
            records.push(Record {
                offset: o,
                key: key.to_vec(),
                value: value.to_vec(),
            });
        }
        if let Some(stopped) = self
            .resume
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(partition as usize)
        {
            *stopped = (next, pos);
        }
        Ok(records)
    }
}

/// Whether a record of this key and value fits in one frame.
pub(super) fn fits(key: &[u8], value: &[u8]) -> bool {
    MIN_PAYLOAD
        .saturating_add(key.len())
        .saturating_add(value.len())
        <= MAX_FRAME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_end_longer_than_one_write_is_refused_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = Vec::new();
        for offset in 0..100 {
            encode(&mut bytes, 0, offset, b"key", &[b'm'; 100]);
        }
        // The fifth frame's checksum is damaged: 95 frames lie after it.
        let frame = bytes.len() / 100;
        bytes[4 * frame + 5] ^= 1;
        std::fs::write(dir.path().join(SEGMENT_FILE), &bytes).expect("write");

        let limit = 10 * frame as u64;
        match Segment::open_with_limit(dir.path(), 1, Opening::Existing, 0, limit) {
            Err(EmbeddedError::Storage { detail, .. }) => {
                assert!(detail.contains("damaged"), "{detail}");
                assert!(detail.contains("checksum"), "{detail}");
            }
            Err(other) => panic!("expected a storage error, got {other}"),
            Ok(_) => panic!("a damaged file opened"),
        }
        let kept = std::fs::metadata(dir.path().join(SEGMENT_FILE))
            .expect("file")
            .len();
        assert_eq!(kept, bytes.len() as u64, "nothing was cut");

        // The same damage in the last ten frames is an unfinished write: cut.
        bytes[4 * frame + 5] ^= 1;
        bytes[95 * frame + 5] ^= 1;
        std::fs::write(dir.path().join(SEGMENT_FILE), &bytes).expect("write");
        let (segment, ends) =
            Segment::open_with_limit(dir.path(), 1, Opening::Existing, 0, limit).expect("cut");
        assert_eq!(ends, vec![95]);
        let records = segment.read(0, 90, 10, usize::MAX).expect("read");
        assert_eq!(records.len(), 5);
        assert_eq!(records[4].offset, 94);
        assert_eq!(records[4].value, vec![b'm'; 100]);
    }

    /// Frames of `partitions` partitions, interleaved unevenly (as random digests
    /// spread them), `n` in all; returns the bytes and each partition's values in order.
    fn interleaved(partitions: u32, n: u64) -> (Vec<u8>, Vec<Vec<Vec<u8>>>) {
        let mut bytes = Vec::new();
        let mut values = vec![Vec::new(); partitions as usize];
        for i in 0..n {
            let p = ((i * 7 + i / 3) % u64::from(partitions)) as u32;
            let offset = values[p as usize].len() as u64;
            let value = format!("record {i} of the log, offset {offset} of partition {p}");
            encode(&mut bytes, p, offset, b"key", value.as_bytes());
            values[p as usize].push(value.into_bytes());
        }
        (bytes, values)
    }

    /// A segment opened on [`interleaved`]`(3, 1000)`'s file (in the returned directory),
    /// its per-partition ends, and each partition's values.
    fn open_interleaved() -> (tempfile::TempDir, Segment, Vec<u64>, Vec<Vec<Vec<u8>>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bytes, values) = interleaved(3, 1000);
        std::fs::write(dir.path().join(SEGMENT_FILE), &bytes).expect("write");
        let (segment, ends) = Segment::open(dir.path(), 3, Opening::Existing, 0).expect("open");
        (dir, segment, ends, values)
    }

    #[test]
    fn a_read_returns_the_records_asked_for_from_any_offset_across_marks() {
        let (_dir, segment, ends, values) = open_interleaved();
        let lens: Vec<u64> = values.iter().map(|v| v.len() as u64).collect();
        assert_eq!(ends, lens);
        for (p, expected) in values.iter().enumerate() {
            let p = p as u32;
            let len = expected.len() as u64;
            let mark = MARK_EVERY;
            for first in [
                0,
                1,
                mark - 1,
                mark,
                mark + 1,
                2 * mark - 1,
                len - 1,
                len,
                len + 5,
            ] {
                for count in [1, 2, mark as usize, 100, 10_000] {
                    let got = segment.read(p, first, count, usize::MAX).expect("read");
                    let want = len.saturating_sub(first).min(count as u64);
                    assert_eq!(
                        got.len() as u64,
                        want,
                        "partition {p} from {first}, {count}"
                    );
                    for (k, record) in got.iter().enumerate() {
                        let offset = first + k as u64;
                        assert_eq!(record.offset, offset);
                        assert_eq!(record.key, b"key");
                        assert_eq!(record.value, expected[offset as usize], "{p}/{offset}");
                    }
                }
            }
            // The byte bound stops a read after the record that reaches it.
            let one = expected[5].len() + 3;
            let got = segment.read(p, 5, 100, one + 1).expect("read");
            assert_eq!(got.len(), 2);
            assert_eq!(got[1].offset, 6);
        }
        assert!(segment.read(3, 0, 1, usize::MAX).is_err(), "no partition 3");
    }

    #[test]
    fn a_reader_that_goes_on_where_it_stopped_gets_every_record_once() {
        let (_dir, segment, _, values) = open_interleaved();
        for (p, expected) in values.iter().enumerate() {
            let p = p as u32;
            let mut got = Vec::new();
            // Steps of 7, some cut short by the byte bound, with reads elsewhere in
            // between (which move the partition's resume point away).
            for step in 0.. {
                let first = got.len() as u64;
                let max_bytes = if step % 3 == 0 { 1 } else { usize::MAX };
                let records = segment.read(p, first, 7, max_bytes).expect("read");
                if records.is_empty() {
                    break;
                }
                got.extend(records.into_iter().map(|r| (r.offset, r.value)));
                if step % 5 == 0 {
                    segment
                        .read(p, first / 2, 3, usize::MAX)
                        .expect("read elsewhere");
                }
            }
            let want: Vec<(u64, Vec<u8>)> = expected
                .iter()
                .cloned()
                .enumerate()
                .map(|(o, v)| (o as u64, v))
                .collect();
            assert_eq!(got, want, "partition {p}");
        }
    }

    #[test]
    fn appended_records_are_read_back_and_the_index_stays_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (segment, _) = Segment::open(dir.path(), 2, Opening::New, 0).expect("open");
        let mut end = 0;
        let mut next = [0u64; 2];
        // 20,000 records in groups of 50, as the writer appends them.
        for group in 0..400u64 {
            let mut frames = Vec::new();
            let mut placed = Vec::new();
            for i in 0..50u64 {
                let p = ((group + i) % 2) as u32;
                placed.push((p, frames.len()));
                let value = format!("g{group} r{i}");
                encode(&mut frames, p, next[p as usize], b"k", value.as_bytes());
                next[p as usize] += 1;
            }
            end = segment.append(end, &frames, &placed).expect("append");
        }
        assert_eq!(segment.ends(), next.to_vec());
        // Partition 1's records 9,990..: groups 399's and 398's last ones.
        let got = segment.read(1, 9_990, 20, usize::MAX).expect("read");
        assert_eq!(got.len(), 10);
        assert_eq!(got[9].value, b"g399 r48");
        // A position per 32 records, not one per record (8 bytes each: 160,000 bytes).
        let bytes = segment.index_bytes();
        assert!(
            bytes <= 20_000 / MARK_EVERY as usize * 8 * 2,
            "{bytes} bytes of index"
        );
    }

    #[test]
    fn damage_after_the_open_fails_a_read_and_never_returns_wrong_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SEGMENT_FILE);
        let value = |i: u64| format!("value {i:>14}").into_bytes();
        // Frame i is offset i / 2 of partition i % 2; all frames the same size.
        let mut bytes = Vec::new();
        for i in 0..200u64 {
            encode(&mut bytes, (i % 2) as u32, i / 2, b"key", &value(i));
        }
        let frame = (bytes.len() / 200) as u64;
        std::fs::write(&path, &bytes).expect("write");
        let (segment, _) = Segment::open(dir.path(), 2, Opening::Existing, 0).expect("open");
        let file = OpenOptions::new().write(true).open(&path).expect("file");

        // A checksum byte of frame 101 (offset 50 of partition 1) changes on disk.
        file.write_all_at(&[bytes[101 * frame as usize + 4] ^ 1], 101 * frame + 4)
            .expect("damage");
        let err = segment.read(1, 40, 20, usize::MAX).expect_err("damaged");
        assert!(err.contains("checksum"), "{err}");
        // Partition 0's reads pass over that frame: its own records are whole.
        let got = segment.read(0, 40, 20, usize::MAX).expect("read");
        assert_eq!(got.len(), 20);
        assert_eq!((got[10].offset, got[10].value.clone()), (50, value(100)));

        // The length field of frame 103 claims more than the file holds: a read that
        // passes it fails, whatever its partition.
        let len = u32::try_from(bytes.len()).expect("small");
        file.write_all_at(&len.to_le_bytes(), 103 * frame)
            .expect("damage");
        let err = segment.read(0, 40, 20, usize::MAX).expect_err("damaged");
        assert!(err.contains("byte") && err.contains("partition 0"), "{err}");
        // Records before it still read.
        assert_eq!(segment.read(0, 40, 5, usize::MAX).expect("read").len(), 5);
    }

    #[test]
    fn a_zeroed_end_is_not_taken_for_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = Vec::new();
        encode(&mut bytes, 0, 0, b"key", b"value");
        // A crash after the file grew but before its pages were written reads as zeros.
        bytes.extend_from_slice(&[0; 64]);
        std::fs::write(dir.path().join(SEGMENT_FILE), &bytes).expect("write");
        let (_, ends) = Segment::open(dir.path(), 1, Opening::Existing, 0).expect("open");
        assert_eq!(ends, vec![1]);
        assert_eq!(
            std::fs::metadata(dir.path().join(SEGMENT_FILE))
                .expect("file")
                .len(),
            (bytes.len() - 64) as u64
        );
    }

    #[test]
    fn a_second_handle_on_the_records_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, _) = Segment::open(dir.path(), 1, Opening::New, 0).expect("open");
        match Segment::open(dir.path(), 1, Opening::Existing, 0) {
            Err(EmbeddedError::InUse { file, .. }) => {
                assert_eq!(file, dir.path().join(SEGMENT_FILE));
            }
            Err(other) => panic!("expected InUse, got {other}"),
            Ok(_) => panic!("two handles on one records file"),
        }
        drop(first);
        assert!(Segment::open(dir.path(), 1, Opening::Existing, 0).is_ok());
    }
}
