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
//!   that can refer to it;
//! - bytes of a segment past those written since it was made may be a
//!   recycled file's old bytes (see below): only a `raft_log` row's
//!   reference, checked against its CRC, says what a segment holds.
//!
//! Deleted segments are recycled: up to a node-wide number of them wait in
//! `DIR/free/`, and a segment started because the one before it is full is
//! one of them, renamed and overwritten from its start (cut to a segment's
//! size first, if one huge entry made it longer). Only then: a PG that
//! filled one segment is likely to fill the next, so a reused file does not
//! end as an idle PG's newest segment holding a segment's disk for a few
//! entries (a segment closed early is cut to what was written to it).
//!
//! Why: a new file's pages are new page-cache memory and new disk blocks,
//! and on a virtual machine whose free memory is handed back to the host
//! (virtio-balloon free page reporting) a write into new memory costs a
//! host page fault per page. Measured on this project's machine: `dd` of 2
//! GiB into a new file 461 MB/s, all of it system time, over the same
//! file's cached pages 11.6 GB/s. Writes over allocated blocks also spare
//! `fdatasync` the file system's metadata. A file waiting in the pool is
//! handed out only when no reader still holds it, so a read that raced the
//! purge reads the old entry, not another PG's new one.
//!
//! The moves in and out of the pool rest on a rename being atomic across
//! directories in the file system's journal (ext4, XFS): after a crash a
//! file has one name, the old or the new. Into the pool, the rename need
//! not be durable (lost, the segment is back under its own name and its
//! PG's recovery deletes it again, its purge being durable); out of it,
//! the PG's directory is synced before any row refers to the segment.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lifeboat_store::PgId;

/// Entries whose encoding is at least this large go to segment files.
pub const FILE_ENTRY_BYTES_MIN: usize = 64 << 10;

/// A segment is closed once it holds this many bytes (the last entry may
/// take it past). Recovery reads at most the newest one.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Deleted segments a node keeps for reuse unless told otherwise (1 GiB):
/// a PG's log is cut to half of `log_retain_bytes` (1 GiB by default) once
/// a periodic check finds it over, and under a sequential write it has
/// grown to about 2 GiB by then, so a cut frees about 16 segments at once.
pub const POOL_SEGMENTS_DEFAULT: usize = 16;

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
    segment_bytes: u64,
    pool: Arc<Pool>,
    pgs: Mutex<HashMap<PgId, Arc<PgFiles>>>,
}

impl LogFiles {
    /// Segment files under `dir` (one subdirectory per PG, made when a PG
    /// first writes one), for entries of at least `entry_bytes_min` bytes,
    /// keeping up to [`POOL_SEGMENTS_DEFAULT`] deleted segments for reuse.
    pub fn new(dir: PathBuf, entry_bytes_min: usize) -> Arc<LogFiles> {
        Self::with_pool(dir, entry_bytes_min, POOL_SEGMENTS_DEFAULT)
    }

    /// As [`LogFiles::new`], keeping up to `pool_segments` deleted segments
    /// (0: none) in `dir/free/` for reuse. Files a previous process left
    /// there are taken up; a pool that cannot be read starts empty.
    pub fn with_pool(dir: PathBuf, entry_bytes_min: usize, pool_segments: usize) -> Arc<LogFiles> {
        Self::with_limits(dir, entry_bytes_min, SEGMENT_BYTES, pool_segments)
    }

    /// As [`LogFiles::with_pool`], with segments closed once they hold
    /// `segment_bytes` instead of [`SEGMENT_BYTES`] (tests).
    pub fn with_limits(
        dir: PathBuf,
        entry_bytes_min: usize,
        segment_bytes: u64,
        pool_segments: usize,
    ) -> Arc<LogFiles> {
        let pool = Pool::load(dir.join("free"), pool_segments, segment_bytes);
        Arc::new(LogFiles {
            dir,
            entry_bytes_min,
            segment_bytes,
            pool: Arc::new(pool),
            pgs: Mutex::default(),
        })
    }

    /// Deletes every segment waiting for reuse and, until
    /// [`LogFiles::resume_pool`], deletes deleted segments outright (disk
    /// space is short). Returns how many bytes that freed.
    pub fn release_pool(&self) -> u64 {
        self.pool.release()
    }

    /// Keeps deleted segments for reuse again (disk space recovered).
    pub fn resume_pool(&self) {
        self.pool.lock().paused = false;
    }

    /// Segments waiting for reuse (tests and status).
    pub fn pooled(&self) -> usize {
        self.pool.lock().files.len()
    }

    /// Bytes of the segments waiting for reuse.
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.lock().files.iter().map(|p| p.len).sum()
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
        let files = Arc::new(self.open_pg(pg)?);
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
            None => self.open_pg(pg)?.clear(),
        }
    }

    fn open_pg(&self, pg: PgId) -> io::Result<PgFiles> {
        PgFiles::open(
            self.pg_dir(pg),
            self.entry_bytes_min,
            self.segment_bytes,
            self.pool.clone(),
        )
    }

    fn pg_dir(&self, pg: PgId) -> PathBuf {
        self.dir.join(format!("pg-{:016x}", pg.0))
    }
}

/// A deleted segment waiting for reuse.
struct Pooled {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

/// Deleted segments of every PG, kept for reuse (module documentation).
struct Pool {
    dir: PathBuf,
    max: usize,
    /// A file longer than this is cut to it as it is reused (or found at
    /// start).
    file_bytes: u64,
    state: Mutex<PoolState>,
    /// Names files as they enter: `{next:016x}.seg`.
    next: AtomicU64,
}

#[derive(Default)]
struct PoolState {
    files: Vec<Pooled>,
    /// Set while disk space is short: deleted segments are deleted.
    paused: bool,
}

impl Pool {
    fn load(dir: PathBuf, max: usize, file_bytes: u64) -> Pool {
        let pool = Pool {
            dir,
            max,
            file_bytes,
            state: Mutex::default(),
            next: AtomicU64::new(1),
        };
        let entries = match std::fs::read_dir(&pool.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return pool,
            Err(e) => {
                tracing::warn!(dir = %pool.dir.display(), error = %e, "log segment pool unreadable; starting empty");
                return pool;
            }
        };
        let mut state = pool.lock();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_suffix(".seg"))
                .and_then(|stem| u64::from_str_radix(stem, 16).ok())
            else {
                continue;
            };
            pool.next.fetch_max(n + 1, Ordering::Relaxed);
            let opened = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .and_then(|file| Ok((pool.cut(&file)?, file)));
            match opened {
                Ok((len, file)) if state.files.len() < max => state.files.push(Pooled {
                    path,
                    file: Arc::new(file),
                    len,
                }),
                _ => remove_if_present(&path).unwrap_or_else(|e| {
                    tracing::warn!(path = %path.display(), error = %e, "could not delete a pooled log segment");
                }),
            }
        }
        drop(state);
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().expect("log segment pool lock")
    }

    /// Cuts `file` to a segment's size (one huge entry can make a segment
    /// longer); returns its length.
    fn cut(&self, file: &File) -> io::Result<u64> {
        let len = file.metadata()?.len();
        if len <= self.file_bytes {
            return Ok(len);
        }
        file.set_len(self.file_bytes)?;
        Ok(self.file_bytes)
    }

    /// Takes a deleted segment at `path` into the pool, or deletes it when
    /// the pool is off (size 0), full or paused, or the move fails. The
    /// rename happens under the pool's lock (a metadata operation, once per
    /// deleted segment), so that a release cannot miss a file on its way in.
    fn give(&self, path: &Path, file: Arc<File>) -> io::Result<()> {
        if self.max > 0 {
            let mut state = self.lock();
            if !state.paused && state.files.len() < self.max {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let pooled = self.dir.join(format!(
                    "{:016x}.seg",
                    self.next.fetch_add(1, Ordering::Relaxed)
                ));
                // The rename need not be durable: lost in a crash, the
                // segment is back under its own name, and the recovery of
                // its PG deletes it again (its purge was durable).
                let moved = std::fs::create_dir_all(&self.dir)
                    .and_then(|()| std::fs::rename(path, &pooled));
                match moved {
                    Ok(()) => {
                        state.files.push(Pooled {
                            path: pooled,
                            file,
                            len,
                        });
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not keep a log segment for reuse; deleting it")
                    }
                }
            }
        }
        remove_if_present(path)
    }

    /// A pooled file no reader holds any more (none can get it anew: it is
    /// in no PG's map), renamed to `path`, which must not exist. `None`
    /// when there is none, or on any error (the caller makes a new file).
    fn take(&self, path: &Path) -> Option<Arc<File>> {
        let mut state = self.lock();
        let i = state
            .files
            .iter()
            .position(|p| Arc::strong_count(&p.file) == 1)?;
        // The last reader's drop happened before the count we saw.
        std::sync::atomic::fence(Ordering::Acquire);
        let pooled = state.files.swap_remove(i);
        // Cut here, not on the way in: a reader may still have been
        // reading the segment's last entry then.
        let moved = self.cut(&pooled.file).and_then(|_| {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &pooled.path,
                rustix::fs::CWD,
                path,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(io::Error::from)
        });
        match moved {
            Ok(()) => Some(pooled.file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Never replace a file: the caller's `create_new` reports it.
                tracing::error!(path = %path.display(), "a new log segment's name is taken");
                state.files.push(pooled);
                None
            }
            Err(e) => {
                tracing::warn!(path = %pooled.path.display(), error = %e, "could not reuse a pooled log segment; deleting it");
                let _ = remove_if_present(&pooled.path);
                None
            }
        }
    }

    /// Deletes every pooled file and keeps no more until resumed.
    fn release(&self) -> u64 {
        let drained: Vec<Pooled> = {
            let mut state = self.lock();
            state.paused = true;
            std::mem::take(&mut state.files)
        };
        let mut freed = 0;
        for p in drained {
            match remove_if_present(&p.path) {
                Ok(()) => freed += p.len,
                Err(e) => {
                    tracing::warn!(path = %p.path.display(), error = %e, "could not delete a pooled log segment")
                }
            }
        }
        freed
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
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
    segment_bytes: u64,
    pool: Arc<Pool>,
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
    fn open(
        dir: PathBuf,
        entry_bytes_min: usize,
        segment_bytes: u64,
        pool: Arc<Pool>,
    ) -> io::Result<PgFiles> {
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
            segment_bytes,
            pool,
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
        let (roll, full) = match inner.segments.last_key_value() {
            None => (true, false),
            Some((_, newest)) => {
                let full = newest.len > 0 && newest.len + bytes.len() as u64 > self.segment_bytes;
                let roll = !inner.writable || index < newest.first || full;
                (roll, full && inner.writable && index >= newest.first)
            }
        };
        if roll {
            self.roll(&mut inner, index, full)?;
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
    /// invariants) and starts one whose first entry is `first`: a pooled
    /// file when the newest is `full` (module documentation).
    fn roll(&self, inner: &mut Inner, first: u64, full: bool) -> io::Result<()> {
        let seq = match inner.segments.last_key_value() {
            Some((seq, newest)) => {
                // Always, not only when dirty: a syncer may have cleared
                // `dirty` and still be in its fdatasync.
                newest.file.sync_data()?;
                inner.dirty = false;
                // A reused file closed early gives back its old tail. Only
                // for a segment written in this process: `len` is then
                // every byte a row can refer to.
                if inner.writable && newest.file.metadata()?.len() > newest.len {
                    newest.file.set_len(newest.len)?;
                }
                seq + 1
            }
            None => 1,
        };
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(segment_name(seq, first));
        // `seq` is past every segment listed or made: nothing has the name.
        let reused = if full { self.pool.take(&path) } else { None };
        let file = match reused {
            Some(file) => file,
            None => Arc::new(
                File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?,
            ),
        };
        sync_dir(&self.dir)?;
        inner.segments.insert(
            seq,
            Segment {
                first,
                file,
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
            // Readers holding the file keep reading it; the name goes now,
            // and the file is reused only once they let go of it.
            self.pool.give(
                &self.dir.join(segment_name(*seq, segment.first)),
                segment.file,
            )?;
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

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// Deleted segments wait in `free/` (up to the pool's size; past it
    /// they are deleted). A PG's first segment is a new file, and so is
    /// one after a restart; one started because the one before is full is
    /// a pooled file, written from its start. A new process takes the pool
    /// up, and releasing it deletes it.
    #[test]
    fn deleted_segments_are_reused_by_any_pg() {
        let dir = tempfile::tempdir().unwrap();
        let pg_dir = |pg: u64| dir.path().join(format!("pg-{pg:016x}"));
        let free = dir.path().join("free");
        // Segments of 4096 bytes: one entry of 3000 fills one.
        let files = LogFiles::with_limits(dir.path().to_path_buf(), 0, 4096, 2);
        let a = files.pg(PgId(1), |_| Ok(())).unwrap();
        for index in 1..=4 {
            assert_eq!(a.write(index, &[index as u8; 3000]).unwrap().seq, index);
        }
        let inodes: Vec<u64> = names_in(&pg_dir(1))
            .iter()
            .map(|n| inode(&pg_dir(1).join(n)))
            .collect();
        assert_eq!(a.delete_purged(3).unwrap(), 3);
        assert_eq!(files.pooled(), 2, "the pool keeps two");
        assert_eq!(files.pooled_bytes(), 6000);
        assert_eq!(names_in(&free).len(), 2);
        assert_eq!(names_in(&pg_dir(1)), vec![segment_name(4, 4)]);
        let pooled: Vec<u64> = names_in(&free)
            .iter()
            .map(|n| inode(&free.join(n)))
            .collect();
        assert!(
            pooled.iter().all(|i| inodes[..3].contains(i)),
            "{pooled:?} {inodes:?}"
        );

        // Another PG: its first segment is new; the next, started because
        // the first is full, is a pooled file. 2000 bytes over 3000 old
        // ones read back as written.
        let b = files.pg(PgId(2), |_| Ok(())).unwrap();
        b.write(1, &[9u8; 3000]).unwrap();
        assert!(!pooled.contains(&inode(&pg_dir(2).join(segment_name(1, 1)))));
        assert_eq!(files.pooled(), 2);
        let r = b.write(2, &[8u8; 2000]).unwrap();
        assert_eq!((r.seq, r.offset), (2, 0));
        assert_eq!(b.read(&r).unwrap(), vec![8u8; 2000]);
        let reused = pg_dir(2).join(segment_name(2, 2));
        assert!(pooled.contains(&inode(&reused)));
        assert_eq!(files.pooled(), 1);
        assert_eq!(std::fs::metadata(&reused).unwrap().len(), 3000);
        // Closed early (an append below its first index), the reused file
        // gives back the old bytes past what was written to it.
        b.write(1, b"one again").unwrap();
        assert_eq!(std::fs::metadata(&reused).unwrap().len(), 2000);
        assert_eq!(b.read(&r).unwrap(), vec![8u8; 2000]);

        // A new process finds the pool; releasing it deletes the files.
        drop((a, b, files));
        let files = LogFiles::with_limits(dir.path().to_path_buf(), 0, 4096, 2);
        assert_eq!(files.pooled(), 1);
        assert_eq!(files.release_pool(), 3000);
        assert_eq!(files.pooled(), 0);
        assert!(names_in(&free).is_empty());
        // Until resumed, deleted segments are deleted, not kept.
        let a = files.pg(PgId(1), |_| Ok(())).unwrap();
        a.write(5, &[5u8; 3000]).unwrap();
        a.write(6, &[6u8; 3000]).unwrap();
        assert_eq!(a.delete_purged(5).unwrap(), 2);
        assert_eq!(files.pooled(), 0);
        files.resume_pool();
        a.write(7, &[7u8; 3000]).unwrap();
        assert_eq!(a.delete_purged(6).unwrap(), 1);
        assert_eq!(files.pooled(), 1);

        // A pool of size 0 keeps nothing.
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::with_limits(dir.path().to_path_buf(), 0, 4096, 0);
        let a = files.pg(PgId(1), |_| Ok(())).unwrap();
        a.write(1, &[1u8; 3000]).unwrap();
        a.write(2, &[2u8; 3000]).unwrap();
        assert_eq!(a.delete_purged(1).unwrap(), 1);
        assert_eq!(files.pooled(), 0);
        assert!(!dir.path().join("free").exists());
    }

    /// A file longer than a segment (one huge entry) is cut to a
    /// segment's size when it is reused.
    #[test]
    fn a_long_segment_is_cut_when_reused() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::with_limits(dir.path().to_path_buf(), 0, 4096, 2);
        let a = files.pg(PgId(1), |_| Ok(())).unwrap();
        a.write(1, &[1u8; 10_000]).unwrap();
        a.write(2, &[2u8; 100]).unwrap();
        assert_eq!(a.delete_purged(1).unwrap(), 1);
        assert_eq!(files.pooled_bytes(), 10_000);

        let b = files.pg(PgId(2), |_| Ok(())).unwrap();
        b.write(1, &[3u8; 3000]).unwrap();
        let r = b.write(2, &[4u8; 3000]).unwrap();
        assert_eq!(files.pooled(), 0);
        let reused = dir
            .path()
            .join(format!("pg-{:016x}", 2))
            .join(segment_name(r.seq, 2));
        assert_eq!(std::fs::metadata(&reused).unwrap().len(), 4096);
        assert_eq!(b.read(&r).unwrap(), vec![4u8; 3000]);
    }

    /// A reader that took a segment's file before the purge deleted it
    /// reads the old entry: the file is not reused while it is held.
    #[test]
    fn a_pooled_file_is_not_reused_while_a_reader_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::with_limits(dir.path().to_path_buf(), 0, 4096, 4);
        let a = files.pg(PgId(1), |_| Ok(())).unwrap();
        let old = a.write(1, &[1u8; 3000]).unwrap();
        let held = a.lock().segments[&old.seq].file.clone();
        a.write(2, &[2u8; 3000]).unwrap();
        assert_eq!(a.delete_purged(1).unwrap(), 1);
        assert_eq!(files.pooled(), 1);

        let b = files.pg(PgId(2), |_| Ok(())).unwrap();
        b.write(1, &[7u8; 3000]).unwrap();
        b.write(2, &[8u8; 3000]).unwrap();
        assert_eq!(files.pooled(), 1, "the held file stays in the pool");
        let mut buf = vec![0u8; old.len as usize];
        held.read_exact_at(&mut buf, old.offset).unwrap();
        assert_eq!(buf, vec![1u8; 3000]);

        drop(held);
        b.write(3, &[9u8; 3000]).unwrap();
        assert_eq!(files.pooled(), 0, "let go of, it is reused");
    }
}
