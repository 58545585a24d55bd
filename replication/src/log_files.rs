//! Large Raft log entries in append-only segment files, one directory per
//! PG; the log's index (one `raft_log` row per entry) stays in RocksDB and
//! holds a [`FileRef`] to such an entry instead of the entry itself.
//!
//! Why: an entry in RocksDB is written twice (the WAL, then its memtable
//! flushed to a blob file), and the state machine's frames once more; a
//! segment is written once and deleted whole when the log is purged past
//! it. Small entries stay in RocksDB, where one WAL fsync covers every
//! PG's appends.
//!
//! Invariants, on which recovery rests:
//! - a segment's name holds its sequence number and the index of the first
//!   entry written to it; every entry later written to it has a larger
//!   index (an append below that index starts a new segment), so every
//!   live reference into segment S has an index below the first index of
//!   segment S + 1;
//! - a segment is fdatasynced before the next one is created, and a new
//!   segment's directory entry is fsynced before anything refers to it: so
//!   after a crash only the newest segment can lack bytes that a durable
//!   `raft_log` row refers to, and only rows whose fsync never completed
//!   (entries never reported flushed, hence never acknowledged);
//! - a segment is deleted only once a durable purge covers every entry
//!   that can refer to it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lifeboat_store::PgId;

/// Entries whose encoding is at least this large go to segment files.
pub const FILE_ENTRY_BYTES_MIN: usize = 64 << 10;

/// A segment is closed once it holds this many bytes (the last entry may
/// take it past). Recovery reads at most the newest one.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Where an entry's encoding lies in a PG's segments, and its CRC-32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl FileRef {
    pub const BYTES: usize = 24;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out[20..].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> io::Result<FileRef> {
        let bytes: &[u8; Self::BYTES] = bytes
            .try_into()
            .map_err(|_| invalid("a log file reference must be 24 bytes"))?;
        let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        Ok(FileRef {
            seq: u64_at(0),
            offset: u64_at(8),
            len: u32_at(16),
            crc: u32_at(20),
        })
    }
}

fn invalid(reason: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.into())
}

/// The segment files of every PG on a node. Cheap to share; each PG's
/// files are opened on first use, by [`LogFiles::pg`].
pub struct LogFiles {
    dir: PathBuf,
    entry_bytes_min: usize,
    pgs: Mutex<HashMap<PgId, Arc<PgFiles>>>,
}

impl LogFiles {
    /// Segment files under `dir` (one subdirectory per PG, made when a PG
    /// first writes one), for entries of at least `entry_bytes_min` bytes.
    pub fn new(dir: PathBuf, entry_bytes_min: usize) -> Arc<LogFiles> {
        Arc::new(LogFiles {
            dir,
            entry_bytes_min,
            pgs: Mutex::default(),
        })
    }

    pub fn entry_bytes_min(&self) -> usize {
        self.entry_bytes_min
    }

    /// `pg`'s files. The first call in a process lists them and runs
    /// `recover` on them (the log store's check of the newest segment)
    /// before anyone else can use them.
    pub fn pg(
        &self,
        pg: PgId,
        recover: impl FnOnce(&PgFiles) -> io::Result<()>,
    ) -> io::Result<Arc<PgFiles>> {
        let mut pgs = self.pgs.lock().expect("log files lock");
        if let Some(files) = pgs.get(&pg) {
            return Ok(files.clone());
        }
        let files = Arc::new(PgFiles::open(self.pg_dir(pg), self.entry_bytes_min)?);
        recover(&files)?;
        pgs.insert(pg, files.clone());
        Ok(files)
    }

    /// Deletes every segment of `pg`, once its log rows are gone (a wiped
    /// or forgotten member): nothing refers to them any more.
    pub fn forget(&self, pg: PgId) -> io::Result<()> {
        let removed = self.pgs.lock().expect("log files lock").remove(&pg);
        match removed {
            Some(files) => files.clear(),
            None => PgFiles::open(self.pg_dir(pg), self.entry_bytes_min)?.clear(),
        }
    }

    fn pg_dir(&self, pg: PgId) -> PathBuf {
        self.dir.join(format!("pg-{:016x}", pg.0))
    }
}

struct Segment {
    /// Index of the first entry written to it.
    first: u64,
    file: Arc<File>,
    /// Bytes written to it (in this process; for a segment found at open,
    /// its length then).
    len: u64,
}

struct Inner {
    /// By sequence number.
    segments: BTreeMap<u64, Segment>,
    /// Whether the newest segment takes appends: not one found at open,
    /// whose tail may be torn.
    writable: bool,
    /// The newest segment has bytes written since its last fdatasync.
    dirty: bool,
}

/// One PG's segments.
pub struct PgFiles {
    dir: PathBuf,
    entry_bytes_min: usize,
    inner: Mutex<Inner>,
}

fn segment_name(seq: u64, first: u64) -> String {
    format!("{seq:016x}-{first:016x}.seg")
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 16 || first.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(seq, 16).ok()?,
        u64::from_str_radix(first, 16).ok()?,
    ))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl PgFiles {
    fn open(dir: PathBuf, entry_bytes_min: usize) -> io::Result<PgFiles> {
        let mut segments = BTreeMap::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name();
                    let Some((seq, first)) = name.to_str().and_then(parse_segment_name) else {
                        tracing::warn!(path = %entry.path().display(), "not a log segment; left alone");
                        continue;
                    };
                    let file = File::options().read(true).write(true).open(entry.path())?;
                    let len = file.metadata()?.len();
                    segments.insert(
                        seq,
                        Segment {
                            first,
                            file: Arc::new(file),
                            len,
                        },
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(PgFiles {
            dir,
            entry_bytes_min,
            inner: Mutex::new(Inner {
                segments,
                writable: false,
                dirty: false,
            }),
        })
    }

    /// Entries at least this large go to segment files.
    pub fn entry_bytes_min(&self) -> usize {
        self.entry_bytes_min
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("pg log files lock")
    }

    /// The newest segment's sequence number and first index.
    pub fn newest(&self) -> Option<(u64, u64)> {
        self.lock()
            .segments
            .last_key_value()
            .map(|(seq, s)| (*seq, s.first))
    }

    /// Appends the encoding of the entry at `index`; readable at once,
    /// durable after the next [`PgFiles::sync`].
    pub fn write(&self, index: u64, bytes: &[u8]) -> io::Result<FileRef> {
        let len = u32::try_from(bytes.len()).map_err(|_| invalid("log entry over 4 GiB"))?;
        let mut inner = self.lock();
        let roll = match inner.segments.last_key_value() {
            None => true,
            Some((_, newest)) => {
                !inner.writable
                    || index < newest.first
                    || (newest.len > 0 && newest.len + bytes.len() as u64 > SEGMENT_BYTES)
            }
        };
        if roll {
            self.roll(&mut inner, index)?;
        }
        let (seq, segment) = inner
            .segments
            .last_key_value()
            .map(|(seq, s)| (*seq, s))
            .expect("a segment after rolling");
        let offset = segment.len;
        segment.file.write_all_at(bytes, offset)?;
        let segment = inner.segments.get_mut(&seq).expect("newest segment");
        segment.len += bytes.len() as u64;
        inner.dirty = true;
        Ok(FileRef {
            seq,
            offset,
            len,
            crc: crc32fast::hash(bytes),
        })
    }

    /// Closes the newest segment (fdatasynced: see the module's
    /// invariants) and starts one whose first entry is `first`.
    fn roll(&self, inner: &mut Inner, first: u64) -> io::Result<()> {
        let seq = match inner.segments.last_key_value() {
            Some((seq, newest)) => {
                // Always, not only when dirty: a syncer may have cleared
                // `dirty` and still be in its fdatasync.
                newest.file.sync_data()?;
                inner.dirty = false;
                seq + 1
            }
            None => 1,
        };
        std::fs::create_dir_all(&self.dir)?;
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(segment_name(seq, first)))?;
        sync_dir(&self.dir)?;
        inner.segments.insert(
            seq,
            Segment {
                first,
                file: Arc::new(file),
                len: 0,
            },
        );
        inner.writable = true;
        Ok(())
    }

    /// The entry bytes `r` refers to, checked against its CRC.
    pub fn read(&self, r: &FileRef) -> io::Result<Vec<u8>> {
        let file = self
            .lock()
            .segments
            .get(&r.seq)
            .map(|s| s.file.clone())
            .ok_or_else(|| invalid(format!("log segment {} is missing", r.seq)))?;
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid(format!(
                    "log segment {} ends before {} + {}",
                    r.seq, r.offset, r.len
                ))
            } else {
                e
            }
        })?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(invalid(format!(
                "log entry at segment {} offset {} fails its CRC",
                r.seq, r.offset
            )));
        }
        Ok(buf)
    }

    /// Makes every byte written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        let file = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            inner.segments.last_key_value().map(|(_, s)| s.file.clone())
        };
        match file {
            // Written before `dirty` was cleared is covered: fdatasync
            // covers every write to the file that returned before it.
            Some(file) => file.sync_data().inspect_err(|_| {
                self.lock().dirty = true;
            }),
            None => Ok(()),
        }
    }

    /// Makes the newest segment durable as it is now, whether or not this
    /// process wrote it (recovery: a killed process leaves its writes in
    /// the page cache, not on the disk).
    pub fn sync_newest(&self) -> io::Result<()> {
        let file = self
            .lock()
            .segments
            .last_key_value()
            .map(|(_, s)| s.file.clone());
        match file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Deletes every segment but the newest that only entries at or
    /// below `purged` can refer to. The caller has made the purge durable.
    pub fn delete_purged(&self, purged: u64) -> io::Result<usize> {
        // When a segment is made for index f, the log holds no entry at or
        // above f (openraft truncates before it appends over): so no live
        // entry refers to an older segment at f or above, and the smallest
        // first index of the later segments bounds the older one's.
        let doomed: Vec<u64> = {
            let inner = self.lock();
            let mut later_first = u64::MAX;
            let mut doomed = Vec::new();
            for (i, (seq, s)) in inner.segments.iter().rev().enumerate() {
                if i > 0 && later_first.saturating_sub(1) <= purged {
                    doomed.push(*seq);
                }
                later_first = later_first.min(s.first);
            }
            doomed
        };
        self.delete(&doomed)?;
        Ok(doomed.len())
    }

    /// Deletes every segment (the log refers to none).
    pub fn clear(&self) -> io::Result<()> {
        let all: Vec<u64> = self.lock().segments.keys().copied().collect();
        self.delete(&all)?;
        self.lock().writable = false;
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Something else lives there (left alone when listed): keep it.
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, seqs: &[u64]) -> io::Result<()> {
        for seq in seqs {
            let Some(segment) = self.lock().segments.remove(seq) else {
                continue;
            };
            // Readers holding the file keep reading it; the name goes now.
            match std::fs::remove_file(self.dir.join(segment_name(*seq, segment.first))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Number of segments (tests and status).
    pub fn segment_count(&self) -> usize {
        self.lock().segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Arc<PgFiles> {
        LogFiles::new(dir.to_path_buf(), 0)
            .pg(PgId(1), |_| Ok(()))
            .unwrap()
    }

    #[test]
    fn entries_read_back_and_a_flipped_byte_fails_the_crc() {
        let dir = tempfile::tempdir().unwrap();
        let files = open(dir.path());
        let a = files.write(1, b"first entry").unwrap();
        let b = files.write(2, &[7u8; 1000]).unwrap();
        assert_eq!(files.read(&a).unwrap(), b"first entry");
        assert_eq!(files.read(&b).unwrap(), vec![7u8; 1000]);
        assert_eq!((a.seq, a.offset, b.seq, b.offset), (1, 0, 1, 11));
        files.sync().unwrap();

        let path = dir
            .path()
            .join(format!("pg-{:016x}", 1))
            .join(segment_name(1, 1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = files.read(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("CRC"), "{err}");
        assert_eq!(files.read(&b).unwrap(), vec![7u8; 1000]);

        // A reference past the end is an error, not a short read.
        let past = FileRef { offset: 5000, ..b };
        assert_eq!(
            files.read(&past).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// A new process does not append to a segment it found (its tail may
    /// be torn), an append below a segment's first index starts a new
    /// one, and a purge deletes exactly the segments no entry above it
    /// can refer to.
    #[test]
    fn segments_roll_and_are_deleted_only_past_the_purge() {
        let dir = tempfile::tempdir().unwrap();
        let files = open(dir.path());
        files.write(10, b"ten").unwrap();
        files.write(11, b"eleven").unwrap();
        assert_eq!(files.newest(), Some((1, 10)));

        let files = open(dir.path()); // "restart"
        let r = files.write(12, b"twelve").unwrap();
        assert_eq!((r.seq, r.offset), (2, 0));
        assert_eq!(files.newest(), Some((2, 12)));
        // 12 again (truncated after 11) is not below segment 2's first:
        // same segment. 6 (truncated after 5) is: a new segment.
        assert_eq!(files.write(12, b"twelve again").unwrap().seq, 2);
        assert_eq!(files.write(6, b"six").unwrap().seq, 3);
        assert_eq!(files.segment_count(), 3);

        // Segment 3 was made for index 6, so no live entry of segments 1
        // and 2 is at 6 or above: a purge up to 5 deletes both. The newest
        // segment is never deleted.
        assert_eq!(files.delete_purged(4).unwrap(), 0);
        assert_eq!(files.delete_purged(5).unwrap(), 2);
        assert_eq!(files.newest(), Some((3, 6)));
        assert_eq!(files.segment_count(), 1);
        assert_eq!(files.delete_purged(u64::MAX).unwrap(), 0);
        let names: Vec<_> = std::fs::read_dir(dir.path().join(format!("pg-{:016x}", 1)))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![segment_name(3, 6)]);

        files.clear().unwrap();
        assert!(!dir.path().join(format!("pg-{:016x}", 1)).exists());
    }

    /// `forget` deletes a PG's segments whether or not this process has
    /// opened them, and leaves other PGs' alone.
    #[test]
    fn forget_deletes_a_pgs_segments_opened_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let pg_dir = |pg: u64| dir.path().join(format!("pg-{pg:016x}"));
        let files = LogFiles::new(dir.path().to_path_buf(), 0);
        for pg in [1, 2] {
            files
                .pg(PgId(pg), |_| Ok(()))
                .unwrap()
                .write(1, b"x")
                .unwrap();
        }
        files.forget(PgId(1)).unwrap();
        assert!(!pg_dir(1).exists());
        assert!(pg_dir(2).exists());

        // A new process that never opened PG 2's log.
        let files = LogFiles::new(dir.path().to_path_buf(), 0);
        files.forget(PgId(2)).unwrap();
        assert!(!pg_dir(2).exists());
        // Nothing to forget is no error.
        files.forget(PgId(3)).unwrap();

        // A forgotten PG that writes again starts afresh at segment 1.
        let r = files
            .pg(PgId(1), |_| Ok(()))
            .unwrap()
            .write(7, b"y")
            .unwrap();
        assert_eq!((r.seq, r.offset), (1, 0));
    }

    #[test]
    fn a_full_segment_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let files = open(dir.path());
        let big = vec![1u8; (SEGMENT_BYTES / 2) as usize + 1];
        assert_eq!(files.write(1, &big).unwrap().seq, 1);
        assert_eq!(files.write(2, &big).unwrap().seq, 2);
        // An entry larger than a segment still fits in an empty one.
        let huge = vec![2u8; SEGMENT_BYTES as usize + 1];
        assert_eq!(files.write(3, &huge).unwrap().seq, 3);
        assert_eq!(files.write(4, b"x").unwrap().seq, 4);
        // Segment 1 holds entry 1 only (segment 2 starts at 2).
        assert_eq!(files.delete_purged(0).unwrap(), 0);
        assert_eq!(files.delete_purged(1).unwrap(), 1);
        assert_eq!(files.delete_purged(3).unwrap(), 2);
        assert_eq!(files.newest(), Some((4, 4)));
    }
}
