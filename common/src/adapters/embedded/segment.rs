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
//! Opening builds, per partition, the file position of every record (8 bytes a record, in
//! memory); a read of a partition's range looks its positions up and reads the frames with
//! positional reads, in chunks, so reads never block the writer and need no lock on the
//! file. Why a file and not a B-tree: docs/performance.md, item 17.

use super::{EmbeddedError, MAX_GROUP_BYTES, MAX_GROUP_REQUESTS};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

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
/// What a read takes in past the start of the last frame it wants: a frame of a short
/// message (a longer one is read on its own).
const TYPICAL_FRAME: usize = 512;
/// The bytes read at a time while scanning or serving a read.
const CHUNK: usize = 256 * 1024;

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
    /// Per partition, the file position of each committed record's frame.
    index: RwLock<Vec<Vec<u64>>>,
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
            index: RwLock::new(vec![Vec::new(); partitions as usize]),
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
            .iter()
            .map(|positions| positions.len() as u64)
            .collect()
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
            match index.get_mut(partition as usize) {
                Some(positions) if positions.len() as u64 == offset => positions.push(pos),
                _ => return Ok((pos, Some(Damage::OutOfOrder { partition, offset }))),
            }
            pos += size;
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
            if let Some(positions) = index.get_mut(partition as usize) {
                positions.push(at + start as u64);
            }
        }
        Ok(at + frames.len() as u64)
    }

    /// Cuts the file at `len` and makes that durable.
    pub(super) fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    /// Reads records `first..first + count` of `partition`, stopping (after at least one)
    /// once they hold `max_bytes` of key and value. Every one of them must be committed
    /// (below the published end). Blocking.
    pub(super) fn read(
        &self,
        partition: u32,
        first: u64,
        count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, String> {
        let positions: Vec<u64> = {
            let index = self
                .index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let all = index
                .get(partition as usize)
                .ok_or_else(|| format!("partition {partition} out of range"))?;
            let from = usize::try_from(first).unwrap_or(usize::MAX).min(all.len());
            let to = from.saturating_add(count).min(all.len());
            all[from..to].to_vec()
        };
        let mut records = Vec::with_capacity(positions.len());
        let mut bytes = 0usize;
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = 0u64;
        let damaged = |what: String| format!("{}: {what}", self.path.display());
        let last = positions.last().copied().unwrap_or(0);
        for (i, &pos) in positions.iter().enumerate() {
            if bytes >= max_bytes && !records.is_empty() {
                break;
            }
            let offset = first + i as u64;
            // Up to the last record wanted and a typical frame past it: the other
            // partitions' frames in between come along, nothing much beyond.
            let hint = usize::try_from(last - pos).unwrap_or(CHUNK) + TYPICAL_FRAME;
            let at = |d: Damage| damaged(format!("offset {offset} of partition {partition}: {d}"));
            let frame = self
                .load_frame(&mut buf, &mut buf_at, pos, hint)
                .map_err(|e| damaged(e.to_string()))?
                .map_err(at)?;
            let (p, o, key, value) = decode(&buf[frame]).map_err(at)?;
            if p != partition || o != offset {
                return Err(damaged(format!(
                    "the index points offset {offset} of partition {partition} at a frame of \
                     offset {o} of partition {p}"
                )));
            }
            bytes += key.len() + value.len();
            records.push(Record {
                offset,
                key: key.to_vec(),
                value: value.to_vec(),
            });
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
