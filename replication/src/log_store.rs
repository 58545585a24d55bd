//! The Raft log of one protection group in the node's shared RocksDB
//! (`raft_log` and `raft_state` column families, keys prefixed by the PG),
//! large entries in the PG's segment files ([`crate::log_files`]).
//!
//! Durability (shared/research/openraft.md §5.1):
//! - `save_vote` returns only after the vote is fsynced;
//! - `append` makes entries readable before it returns and reports them
//!   flushed only after a WAL fsync, done by the [`WalSyncer`] thread, which
//!   covers every PG's appends with one fsync (group commit), after an
//!   fdatasync of the segment files those appends wrote to;
//! - a crash can leave a durable `raft_log` row whose segment bytes are not
//!   (the WAL may reach the disk before the segment): such rows were never
//!   reported flushed, and recovery cuts the log before the first of them;
//! - vote and log writes of one PG are issued in order by openraft and land
//!   in the one WAL in that order.
//!
//! Reads of the newest entries (replication's, then apply's) are answered
//! from memory ([`RecentEntries`]) when they can be.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use lifeboat_store::db::{Cf, Db, Durability};
use lifeboat_store::keys::{self, RaftStateKind};
use lifeboat_store::{LogIndex, PgId};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};

use crate::log_files::{FileRef, LogFiles, PgFiles};
use crate::types::{MemberNode, TypeConfig};
use crate::wire::{self, Entry, LogId};

type Vote = openraft::alias::VoteOf<TypeConfig>;

/// Replication reads of the log stop adding entries once a batch holds this
/// many bytes (always at least one entry): openraft batches by count only.
pub const LOG_READ_BATCH_BYTES_MAX: usize = 8 << 20;

/// A stored log value is the entry's end position (u64 big-endian: bytes of
/// entry encodings in this log up to and including it), then either the
/// entry's encoding or, for an entry kept in a segment file
/// ([`crate::log_files`]; the position's top bit set), a [`FileRef`] and the
/// entry's log id (term, leader node), so that the log's ends are known
/// without reading a segment. Positions make "how many bytes does the log
/// hold" and "where must it be cut to keep N bytes" exact after a restart,
/// with a few point reads.
const POSITION_BYTES: usize = 8;
const IN_FILE: u64 = 1 << 63;
const FILE_VALUE_BYTES: usize = POSITION_BYTES + FileRef::BYTES + 16;

/// Where a stored entry's encoding is.
enum Body<'a> {
    Inline(&'a [u8]),
    File {
        at: FileRef,
        term: u64,
        leader_node: u64,
    },
}

impl Body<'_> {
    /// The entry's encoded length.
    fn len(&self) -> u64 {
        match self {
            Body::Inline(bytes) => bytes.len() as u64,
            Body::File { at, .. } => u64::from(at.len),
        }
    }
}

/// A stored value: the entry's end position and where its encoding is.
fn split_stored(value: &[u8]) -> io::Result<(u64, Body<'_>)> {
    if value.len() < POSITION_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "raft_log value shorter than its position",
        ));
    }
    let (pos, rest) = value.split_at(POSITION_BYTES);
    let pos = u64::from_be_bytes(pos.try_into().expect("8 bytes"));
    if pos & IN_FILE == 0 {
        return Ok((pos, Body::Inline(rest)));
    }
    if value.len() != FILE_VALUE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "raft_log file reference of the wrong length",
        ));
    }
    let (at, ids) = rest.split_at(FileRef::BYTES);
    Ok((
        pos & !IN_FILE,
        Body::File {
            at: FileRef::decode(at)?,
            term: u64::from_be_bytes(ids[..8].try_into().expect("8 bytes")),
            leader_node: u64::from_be_bytes(ids[8..].try_into().expect("8 bytes")),
        },
    ))
}

/// The log id of the entry stored as `value` under index `index`,
/// without reading a segment file.
fn stored_log_id(index: u64, value: &[u8]) -> io::Result<LogId> {
    match split_stored(value)?.1 {
        Body::Inline(bytes) => Ok(wire::decode_entry(bytes)?.log_id),
        Body::File {
            term, leader_node, ..
        } => Ok(wire::make_log_id(term, leader_node, index)),
    }
}

/// The stored value of `entry` when the log before it ends at byte
/// `start`: its end position, then its encoding (one buffer, the entry
/// encoded once) or, when `files` takes entries this large, a reference
/// to the encoding appended to them. Returns the value, the entry's
/// encoded length, and whether the encoding went to a segment file.
fn stored_value(
    entry: &Entry,
    start: u64,
    files: Option<&PgFiles>,
) -> io::Result<(Vec<u8>, u64, bool)> {
    let mut value = wire::encode_entry_after(entry, POSITION_BYTES)?;
    let len = (value.len() - POSITION_BYTES) as u64;
    let end = start + len;
    if end & IN_FILE != 0 {
        return Err(io::Error::other("raft_log position overflow"));
    }
    if let Some(files) = files
        && value.len() - POSITION_BYTES >= files.entry_bytes_min()
    {
        let at = files.write(entry.log_id.index, &value[POSITION_BYTES..])?;
        value.clear();
        value.extend_from_slice(&(end | IN_FILE).to_be_bytes());
        value.extend_from_slice(&at.encode());
        value.extend_from_slice(&entry.log_id.leader_id.term.to_be_bytes());
        value.extend_from_slice(&entry.log_id.leader_id.node_id.to_be_bytes());
        return Ok((value, len, true));
    }
    value[..POSITION_BYTES].copy_from_slice(&end.to_be_bytes());
    Ok((value, len, false))
}

/// The retained part of a log: first and last index, and the bytes of the
/// entries between them (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSpan {
    pub first: u64,
    pub last: u64,
    pub bytes: u64,
    /// The last entry's end position.
    pub end: u64,
}

fn io_other(e: lifeboat_store::Error) -> io::Error {
    io::Error::other(e)
}

/// Makes appended log entries durable with as few fsyncs as possible: each
/// fsync completes every append that was written before it, across all PGs.
///
/// Invariant: the syncer thread holds the database only while it syncs (a
/// weak handle otherwise), and after [`WalSyncer::stop`] returns it has
/// exited; so the database closes on the thread that drops the last real
/// handle, never concurrently with process exit (RocksDB aborts when closed
/// while static destructors run).
#[derive(Clone)]
pub struct WalSyncer {
    tx: mpsc::Sender<SyncRequest>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    files: Arc<LogFiles>,
    appends: Arc<AppendMeter>,
}

/// Counts the bytes appended to a node's logs, and wakes a waiter each time
/// another `every` of them have been appended. The node's log retention
/// check runs on this as well as on its timer, so that a fast writer does
/// not take a log far past its limit between two timed checks.
#[derive(Debug, Default)]
pub struct AppendMeter {
    bytes: AtomicU64,
    /// 0: never wake.
    every: AtomicU64,
    crossed: tokio::sync::Notify,
}

impl AppendMeter {
    fn add(&self, bytes: u64) {
        let every = self.every.load(Ordering::Relaxed);
        let before = self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if every > 0 && before / every != before.wrapping_add(bytes) / every {
            self.crossed.notify_one();
        }
    }

    /// Wake [`AppendMeter::crossed`] once per `every` bytes appended (0:
    /// never).
    pub fn wake_every(&self, every: u64) {
        self.every.store(every, Ordering::Relaxed);
    }

    /// Bytes appended since the node started.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Returns once another `every` bytes have been appended. A crossing
    /// while nobody waited is kept for the next call (one, however many
    /// crossings).
    pub async fn crossed(&self) {
        self.crossed.notified().await
    }
}

enum SyncRequest {
    /// Complete the callback once the WAL and, if any, these segment files
    /// are durable.
    Flushed(IOFlushed<TypeConfig>, Option<Arc<PgFiles>>),
    Stop,
}

impl WalSyncer {
    /// Starts the syncer thread for the database and the segment files of
    /// its logs.
    pub fn start(db: Db, files: Arc<LogFiles>) -> WalSyncer {
        let db = db.downgrade();
        let (tx, rx) = mpsc::channel::<SyncRequest>();
        let thread = std::thread::Builder::new()
            .name("wal-syncer".into())
            .spawn(move || {
                let mut stopping = false;
                while !stopping {
                    let Ok(first) = rx.recv() else { break };
                    // Everything queued now was written before this fsync.
                    let mut waiting = Vec::new();
                    let mut segments: Vec<Arc<PgFiles>> = Vec::new();
                    for req in std::iter::once(first).chain(rx.try_iter()) {
                        match req {
                            SyncRequest::Flushed(cb, files) => {
                                waiting.push(cb);
                                if let Some(f) = files
                                    && !segments.iter().any(|s| Arc::ptr_eq(s, &f))
                                {
                                    segments.push(f);
                                }
                            }
                            SyncRequest::Stop => stopping = true,
                        }
                    }
                    if waiting.is_empty() {
                        continue;
                    }
                    // Segments first: a row is durable only with its bytes.
                    let result = segments
                        .iter()
                        .try_for_each(|f| f.sync())
                        .map_err(|e| format!("log segment fdatasync: {e}"))
                        .and_then(|()| match db.upgrade() {
                            Some(db) => db.sync_wal().map_err(|e| e.to_string()),
                            None => Err("the database is closed".to_string()),
                        });
                    for cb in waiting {
                        cb.io_completed(result.clone().map_err(io::Error::other));
                    }
                }
            })
            .expect("spawn wal syncer thread");
        WalSyncer {
            tx,
            thread: Arc::new(Mutex::new(Some(thread))),
            files,
            appends: Arc::default(),
        }
    }

    /// The segment files of this node's logs.
    pub fn files(&self) -> &Arc<LogFiles> {
        &self.files
    }

    /// The bytes appended to this node's logs.
    pub fn appends(&self) -> &Arc<AppendMeter> {
        &self.appends
    }

    fn submit(&self, cb: IOFlushed<TypeConfig>, files: Option<Arc<PgFiles>>) -> io::Result<()> {
        self.tx
            .send(SyncRequest::Flushed(cb, files))
            .map_err(|_| io::Error::other("wal syncer has stopped"))
    }

    /// Syncs what is queued, stops the thread and waits for it. Appends
    /// after this fail with an error.
    pub fn stop(&self) {
        let _ = self.tx.send(SyncRequest::Stop);
        let handle = self.thread.lock().expect("syncer thread lock").take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("wal syncer thread panicked");
        }
    }
}

/// Entries the in-memory [`LogStats`] remembers per PG (24 bytes each).
const LOG_STATS_ENTRIES_MAX: usize = 1 << 16;

/// Size and stamp of the most recent entries this member appended, so that
/// the leader reports a standby's lag in bytes and seconds without reading
/// the log. Memory only: after a restart it fills again as entries come.
#[derive(Default)]
pub struct LogStats {
    /// (index, encoded bytes, stamp in ms), in index order.
    recent: std::collections::VecDeque<(u64, u64, u64)>,
}

/// A member's lag behind this log's last entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    pub entries: u64,
    /// Encoded bytes of the entries it lacks; for entries older than the
    /// remembered window, estimated from the window's average entry size.
    pub bytes: u64,
    /// Age of the oldest entry it lacks, in seconds (0 when it lacks none).
    pub seconds: f64,
}

impl LogStats {
    fn record(&mut self, index: u64, bytes: u64, stamp_ms: u64) {
        let prev_stamp = self.recent.back().map_or(0, |&(_, _, s)| s);
        // Blank and membership entries have no stamp: they inherit one.
        let stamp = if stamp_ms == 0 { prev_stamp } else { stamp_ms };
        self.recent.push_back((index, bytes, stamp));
        if self.recent.len() > LOG_STATS_ENTRIES_MAX {
            self.recent.pop_front();
        }
    }

    /// See [`LogStore::newest_sizes`].
    fn newest_sizes(&self, after: u64, last: u64, max: usize) -> (u64, Vec<u64>) {
        let mut sizes = Vec::new();
        let mut expect = last;
        for &(i, b, _) in self.recent.iter().rev() {
            if i > last {
                continue;
            }
            if i != expect || i <= after || sizes.len() == max {
                break;
            }
            sizes.push(b);
            match expect.checked_sub(1) {
                Some(next) => expect = next,
                None => break,
            }
        }
        sizes.reverse();
        (last + 1 - sizes.len() as u64, sizes)
    }

    fn truncate_after(&mut self, last_kept: u64) {
        while self.recent.back().is_some_and(|&(i, _, _)| i > last_kept) {
            self.recent.pop_back();
        }
    }
}

/// Bytes of entry encodings [`RecentEntries`] holds at most per PG.
const RECENT_ENTRIES_BYTES_MAX: u64 = 4 << 20;

/// The newest entries this log store appended, in memory: replication
/// reads an entry within milliseconds of its append and apply soon after,
/// and reading each back from RocksDB (a seek through the memtable and the
/// level-0 files, and a decode) was about 7% of a PG leader's CPU under
/// 4 KiB writes.
///
/// Invariant: the entries are a contiguous run that ends at the log's last
/// entry (appends extend it, a truncation cuts it, only the oldest are
/// dropped), so a read starting at or after the first of them finds every
/// entry it may return here. Entries go once applied (apply is the last of
/// their readers on every member; a standby further behind reads the log)
/// or when the run holds more than [`RECENT_ENTRIES_BYTES_MAX`].
#[derive(Default)]
struct RecentEntries {
    /// (entry, its encoded length), in index order.
    entries: std::collections::VecDeque<(Entry, u64)>,
    bytes: u64,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry, len: u64) {
        let index = entry.log_id.index;
        self.truncate_from(index);
        if let Some((last, _)) = self.entries.back()
            && last.log_id.index + 1 != index
        {
            self.clear();
        }
        self.entries.push_back((entry, len));
        self.bytes += len;
        while self.bytes > RECENT_ENTRIES_BYTES_MAX && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, len)) = self.entries.pop_front() {
            self.bytes -= len;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops entries with indexes at or above `index`.
    fn truncate_from(&mut self, index: u64) {
        while let Some((e, len)) = self.entries.back() {
            if e.log_id.index < index {
                break;
            }
            self.bytes -= len;
            self.entries.pop_back();
        }
    }

    /// Drops entries with indexes at or below `index`.
    fn forget_upto(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= index)
        {
            self.pop_front();
        }
    }

    /// Entries in `[start, end)`, stopping once `bytes_max` is reached
    /// (never before the first), if `start` is within this run; `None`
    /// when the log must be read.
    fn read(&self, start: u64, end: u64, bytes_max: usize) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (entry, len) in self.entries.iter().skip((start - first) as usize) {
            if entry.log_id.index >= end {
                break;
            }
            out.push(entry.clone());
            bytes += len;
            if bytes >= bytes_max as u64 {
                break;
            }
        }
        Some(out)
    }
}

/// One PG's log store. Cheap to clone; every clone reads the same log.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    pg: PgId,
    syncer: WalSyncer,
    stats: Arc<Mutex<LogStats>>,
    recent: Arc<Mutex<RecentEntries>>,
}

impl LogStore {
    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn new(db: Db, pg: PgId, syncer: WalSyncer) -> LogStore {
        LogStore {
            db,
            pg,
            syncer,
            stats: Arc::default(),
            recent: Arc::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.recent.lock().expect("recent log entries lock")
    }

    /// How far a member whose log matches up to `matched` is behind `last`.
    pub fn lag(&self, matched: u64, last: u64, now_ms: u64) -> io::Result<Lag> {
        let entries = last.saturating_sub(matched);
        if entries == 0 {
            return Ok(Lag {
                entries: 0,
                bytes: 0,
                seconds: 0.0,
            });
        }
        let oldest_missing = matched + 1;
        let (bytes, stamp) = {
            let stats = self.stats.lock().expect("log stats lock");
            // The window is in index order: visit only the missing entries
            // (O(lag), not O(window)), and average only when some are older
            // than the window.
            let start = stats.recent.partition_point(|&(i, _, _)| i <= matched);
            let mut found = 0u64;
            let mut bytes = 0u64;
            let mut stamp = None;
            for &(i, b, s) in stats
                .recent
                .range(start..)
                .take_while(|(i, _, _)| *i <= last)
            {
                if i == oldest_missing {
                    stamp = Some(s);
                }
                found += 1;
                bytes += b;
            }
            let older = entries - found.min(entries);
            if older > 0 {
                let total: u64 = stats.recent.iter().map(|&(_, b, _)| b).sum();
                bytes += older * (total / (stats.recent.len() as u64).max(1));
            }
            (bytes, stamp)
        };
        let stamp = match stamp {
            Some(s) if s > 0 => Some(s),
            _ => self.first_stamp_from(oldest_missing, last)?,
        };
        let seconds = stamp.map_or(0.0, |s| now_ms.saturating_sub(s) as f64 / 1000.0);
        Ok(Lag {
            entries,
            bytes,
            seconds,
        })
    }

    /// The encoded bytes of the newest entries in `(after, last]`, at most
    /// `max`, newest last, with the index of the first: a contiguous run
    /// that ends at `last`, as far as this log remembers sizes (none when
    /// it does not remember `last`'s).
    pub fn newest_sizes(&self, after: u64, last: u64, max: usize) -> (u64, Vec<u64>) {
        self.stats
            .lock()
            .expect("log stats lock")
            .newest_sizes(after, last, max)
    }

    /// The stamp of the first command entry in `[from, to]`, read from the log.
    fn first_stamp_from(&self, from: u64, to: u64) -> io::Result<Option<u64>> {
        const LOOK_AHEAD: u64 = 16;
        for e in self.read_range(from, to.min(from + LOOK_AHEAD) + 1, 4 << 20)? {
            if let openraft::EntryPayload::Normal(cmd) = &e.payload {
                return Ok(Some(cmd.0.stamp_ms));
            }
        }
        Ok(None)
    }

    /// The leader's stamp of the last command entry at or a few before
    /// `index` (when the log still holds them): when that point of the
    /// timeline was written.
    pub fn stamp_at(&self, index: u64) -> io::Result<Option<u64>> {
        const LOOK_BACK: u64 = 16;
        Ok(self
            .read_range(index.saturating_sub(LOOK_BACK), index + 1, 8 << 20)?
            .iter()
            .rev()
            .find_map(|e| match &e.payload {
                openraft::EntryPayload::Normal(cmd) if cmd.0.stamp_ms > 0 => Some(cmd.0.stamp_ms),
                _ => None,
            }))
    }

    /// The last entry's log id, and the leader's stamp of the last command
    /// entry among the few before it (0: none there); `None` for a log that
    /// holds no entry.
    pub fn tail(&self) -> io::Result<Option<(LogId, u64)>> {
        const LOOK_BACK: u64 = 16;
        let Some((key, value)) = self
            .db
            .last_with_prefix(Cf::RaftLog, &keys::pg_prefix(self.pg))
            .map_err(io_other)?
        else {
            return Ok(None);
        };
        let last = stored_log_id(row_index(&key)?, &value)?;
        let stamp = self
            .read_range(
                last.index.saturating_sub(LOOK_BACK),
                last.index + 1,
                8 << 20,
            )?
            .iter()
            .rev()
            .find_map(|e| match &e.payload {
                openraft::EntryPayload::Normal(cmd) => Some(cmd.0.stamp_ms),
                _ => None,
            })
            .unwrap_or(0);
        Ok(Some((last, stamp)))
    }

    /// End position of the entry at `index`, if the log holds it.
    fn end_position(&self, index: u64) -> io::Result<Option<u64>> {
        self.db
            .get(Cf::RaftLog, &keys::raft_log_key(self.pg, LogIndex(index)))
            .map_err(io_other)?
            .map(|v| split_stored(&v).map(|(pos, _)| pos))
            .transpose()
    }

    /// The entries this log holds now, or `None` when it holds none.
    pub fn span(&self) -> io::Result<Option<LogSpan>> {
        let prefix = keys::pg_prefix(self.pg);
        let first = self
            .db
            .scan(
                Cf::RaftLog,
                &prefix,
                &keys::raft_log_key(self.pg, LogIndex(0)),
                1,
            )
            .map_err(io_other)?;
        let Some((first_key, first_value)) = first.into_iter().next() else {
            return Ok(None);
        };
        let Some((last_key, last_value)) = self
            .db
            .last_with_prefix(Cf::RaftLog, &prefix)
            .map_err(io_other)?
        else {
            return Ok(None);
        };
        let (first_end, first_entry) = split_stored(&first_value)?;
        let (last_end, _) = split_stored(&last_value)?;
        let first_start = first_end.saturating_sub(first_entry.len());
        Ok(Some(LogSpan {
            first: row_index(&first_key)?,
            last: row_index(&last_key)?,
            bytes: last_end.saturating_sub(first_start),
            end: last_end,
        }))
    }

    /// The smallest index up to which (inclusive) the log `span` (from
    /// [`LogStore::span`]) must be purged so that it holds at most
    /// `keep_bytes` (binary search over positions: O(log n) point reads).
    /// `None` when it already does.
    pub fn purge_point_keeping(&self, span: &LogSpan, keep_bytes: u64) -> io::Result<Option<u64>> {
        if span.bytes <= keep_bytes {
            return Ok(None);
        }
        let wanted = span.end.saturating_sub(keep_bytes);
        // Invariant: end(lo - 1) < wanted (or lo is first), end(hi) >= wanted.
        let (mut lo, mut hi) = (span.first, span.last);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.end_position(mid)? {
                Some(end) if end >= wanted => hi = mid,
                Some(_) => lo = mid + 1,
                // Purged under us: everything up to mid is gone already.
                None => lo = mid + 1,
            }
        }
        Ok(Some(lo))
    }

    fn state_key(&self, kind: RaftStateKind) -> [u8; keys::RAFT_STATE_KEY_BYTES] {
        keys::raft_state_key(self.pg, kind)
    }

    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        kind: RaftStateKind,
    ) -> io::Result<Option<T>> {
        get_state_in(&self.db, self.pg, kind)
    }

    /// This PG's segment files, recovered on their first use in this
    /// process (before openraft reads the log's state).
    fn files(&self) -> io::Result<Arc<PgFiles>> {
        self.syncer
            .files()
            .pg(self.pg, |files| recover_files(&self.db, self.pg, files))
    }

    /// Entries with indexes in `[start, end)`, stopping early after
    /// `bytes_max` bytes (never before the first entry).
    fn read_range(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        if start >= end {
            return Ok(Vec::new());
        }
        if let Some(entries) = self.recent().read(start, end, bytes_max) {
            return Ok(entries);
        }
        self.read_range_stored(start, end, bytes_max)
    }

    /// [`LogStore::read_range`] from the database and segment files.
    fn read_range_stored(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let prefix = keys::pg_prefix(self.pg);
        let mut from = keys::raft_log_key(self.pg, LogIndex(start));
        let mut bytes = 0usize;
        let files = self.files()?;
        // Scan in pages so that a huge range never sits in memory at once.
        const PAGE: usize = 64;
        loop {
            let page = self
                .db
                .scan(Cf::RaftLog, &prefix, &from, PAGE)
                .map_err(io_other)?;
            let page_len = page.len();
            for (key, value) in page {
                let index = row_index(&key)?;
                if index >= end {
                    return Ok(out);
                }
                let (_, body) = split_stored(&value)?;
                bytes += body.len() as usize;
                let entry = match body {
                    Body::Inline(encoded) => wire::decode_entry(encoded)?,
                    Body::File { at, .. } => wire::decode_entry(&files.read(&at)?)?,
                };
                if entry.log_id.index != index {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("raft_log key {} holds entry {}", index, entry.log_id.index),
                    ));
                }
                out.push(entry);
                if bytes >= bytes_max {
                    return Ok(out);
                }
                from = keys::raft_log_key(self.pg, LogIndex(index + 1));
            }
            if page_len < PAGE {
                return Ok(out);
            }
        }
    }
}

fn range_to_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let (start, end) = range_to_bounds(&range);
        self.read_range(start, end, usize::MAX)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_state(RaftStateKind::Vote)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.read_range(start, end, LOG_READ_BATCH_BYTES_MAX)
    }

    /// Apply's read (openraft's only caller): the entries it reads are
    /// applied next, so they leave [`RecentEntries`].
    async fn entries_stream<RB>(
        &mut self,
        range: RB,
    ) -> impl futures::Stream<Item = io::Result<Entry>> + OptionalSend
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        let (start, end) = range_to_bounds(&range);
        let read = self.read_range(start, end, usize::MAX);
        if let Ok(Some(last)) = read.as_ref().map(|e| e.last()) {
            self.recent().forget_upto(last.log_id.index);
        }
        futures::stream::iter(match read {
            Ok(entries) => entries.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        })
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        // Recovery first: it may cut a torn tail.
        self.files()?;
        let last_purged: Option<LogId> = self.get_state(RaftStateKind::LastPurged)?;
        let last = self
            .db
            .last_with_prefix(Cf::RaftLog, &keys::pg_prefix(self.pg))
            .map_err(io_other)?;
        let last_log_id = match last {
            Some((key, value)) => Some(stored_log_id(row_index(&key)?, &value)?),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let mut b = self.db.new_batch();
        b.put(
            Cf::RaftState,
            &self.state_key(RaftStateKind::Vote),
            &wire::encode_json(vote)?,
        );
        let db = self.db.clone();
        // Durable before returning: a vote forgotten after a crash can elect
        // two leaders in one term.
        tokio::task::spawn_blocking(move || db.write(b, Durability::Sync))
            .await
            .map_err(io::Error::other)?
            .map_err(io_other)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let key = self.state_key(RaftStateKind::Committed);
        let mut b = self.db.new_batch();
        match committed {
            Some(c) => b.put(Cf::RaftState, &key, &wire::encode_json(&c)?),
            None => b.delete(Cf::RaftState, &key),
        }
        // Only a hint for faster restart: it may lag, never lead.
        self.db.write(b, Durability::Buffered).map_err(io_other)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        self.get_state(RaftStateKind::Committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        let files = self.files()?;
        let mut wrote_files = false;
        let mut b = self.db.new_batch();
        let mut appended = Vec::new();
        let mut recent = Vec::new();
        // Position continues from the entry before the first appended one;
        // when that one is purged (or the log is empty) no retained entry
        // precedes this batch, so positions may start again from 0.
        let mut position: Option<u64> = None;
        let mut bytes = 0u64;
        for entry in entries {
            let index = entry.log_id.index;
            let pos = match position {
                Some(p) => p,
                None => match index.checked_sub(1) {
                    Some(prev) => self.end_position(prev)?.unwrap_or(0),
                    None => 0,
                },
            };
            let key = keys::raft_log_key(self.pg, LogIndex(index));
            let (value, len, in_file) = stored_value(&entry, pos, Some(&files))?;
            wrote_files |= in_file;
            position = Some(pos + len);
            bytes += len;
            let stamp = match &entry.payload {
                openraft::EntryPayload::Normal(cmd) => cmd.0.stamp_ms,
                _ => 0,
            };
            appended.push((index, len, stamp));
            b.put(Cf::RaftLog, &key, &value);
            recent.push((entry, len));
        }
        {
            let mut stats = self.stats.lock().expect("log stats lock");
            if let Some(&(first, _, _)) = appended.first() {
                stats.truncate_after(first.saturating_sub(1));
            }
            for (index, bytes, stamp) in appended {
                stats.record(index, bytes, stamp);
            }
        }
        // Readable on return (openraft reads what it appended); durable when
        // the syncer's next fsync completes the callback.
        self.db.write(b, Durability::Buffered).map_err(io_other)?;
        self.syncer.appends.add(bytes);
        {
            let mut cache = self.recent();
            for (entry, len) in recent {
                cache.push(entry, len);
            }
        }
        self.syncer.submit(callback, wrote_files.then_some(files))
    }

    async fn truncate_after(&mut self, last_kept: Option<LogId>) -> io::Result<()> {
        let from = last_kept.map_or(0, |l| l.index + 1);
        self.stats
            .lock()
            .expect("log stats lock")
            .truncate_after(from.saturating_sub(1));
        self.recent().truncate_from(from);
        let mut b = self.db.new_batch();
        b.delete_range(
            Cf::RaftLog,
            &keys::raft_log_key(self.pg, LogIndex(from)),
            &keys::pg_prefix(PgId(self.pg.0 + 1)),
        );
        // Not fsynced here: entries past the last kept one are uncommitted, and
        // the next append's fsync covers this delete (one sequential WAL).
        self.db.write(b, Durability::Buffered).map_err(io_other)
    }

    async fn purge(&mut self, upto: LogId) -> io::Result<()> {
        self.recent().forget_upto(upto.index);
        let mut b = self.db.new_batch();
        // last_purged first, in the same batch: entries at or below it are
        // ignored by openraft whether or not their deletion survived.
        b.put(
            Cf::RaftState,
            &self.state_key(RaftStateKind::LastPurged),
            &wire::encode_json(&upto)?,
        );
        b.delete_range(
            Cf::RaftLog,
            &keys::raft_log_key(self.pg, LogIndex(0)),
            &keys::raft_log_key(self.pg, LogIndex(upto.index + 1)),
        );
        let files = self.files()?;
        let db = self.db.clone();
        // Synced before any segment goes: a segment is deleted only once
        // no row that can survive a crash refers to it.
        tokio::task::spawn_blocking(move || {
            db.write(b, Durability::Sync).map_err(io_other)?;
            files.delete_purged(upto.index).map(drop)
        })
        .await
        .map_err(io::Error::other)?
    }
}

fn row_index(key: &[u8]) -> io::Result<u64> {
    keys::raft_log_index(key)
        .map(|i| i.0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed raft_log key"))
}

fn get_state_in<T: serde::de::DeserializeOwned>(
    db: &Db,
    pg: PgId,
    kind: RaftStateKind,
) -> io::Result<Option<T>> {
    match db
        .get(Cf::RaftState, &keys::raft_state_key(pg, kind))
        .map_err(io_other)?
    {
        None => Ok(None),
        Some(bytes) => wire::decode_json(&bytes).map(Some),
    }
}

/// Brings `pg`'s segment files in line with its log rows, once per
/// process, before the log is used:
/// - no rows: no row refers to any segment; they all go;
/// - segments that only purged entries can refer to go;
/// - the rows that refer to the newest segment, the only one whose bytes
///   may not all have reached the disk (module invariants of
///   [`crate::log_files`]), are checked against their CRC; the log is cut
///   before the first that fails. Those entries were never reported
///   flushed, so never acknowledged by this member; one at or below the
///   committed index is corruption, not a torn write, and is refused;
/// - the newest segment is made durable as it is (a killed process leaves
///   its writes in the page cache).
fn recover_files(db: &Db, pg: PgId, files: &PgFiles) -> io::Result<()> {
    let prefix = keys::pg_prefix(pg);
    if db
        .last_with_prefix(Cf::RaftLog, &prefix)
        .map_err(io_other)?
        .is_none()
    {
        return files.clear();
    }
    let purged: Option<LogId> = get_state_in(db, pg, RaftStateKind::LastPurged)?;
    if let Some(purged) = purged {
        files.delete_purged(purged.index)?;
    }
    let Some((newest, first)) = files.newest() else {
        return Ok(());
    };
    // Every live row referring to the newest segment is at or above the
    // index it was made for.
    let mut from = keys::raft_log_key(pg, LogIndex(first));
    let mut cut = None;
    const PAGE: usize = 64;
    'scan: loop {
        let page = db
            .scan(Cf::RaftLog, &prefix, &from, PAGE)
            .map_err(io_other)?;
        for (key, value) in &page {
            let index = row_index(key)?;
            if let (_, Body::File { at, .. }) = split_stored(value)?
                && at.seq >= newest
            {
                match files.read(&at) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        cut = Some((index, e));
                        break 'scan;
                    }
                    Err(e) => return Err(e),
                }
            }
            from = keys::raft_log_key(pg, LogIndex(index + 1));
        }
        if page.len() < PAGE {
            break;
        }
    }
    if let Some((index, error)) = cut {
        let committed: Option<LogId> = get_state_in(db, pg, RaftStateKind::Committed)?;
        if committed.is_some_and(|c| c.index >= index) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "committed log entry {index} of PG {} is corrupt: {error}",
                    pg.0
                ),
            ));
        }
        tracing::warn!(
            pg = pg.0,
            from = index,
            %error,
            "cutting the log before an entry whose segment bytes did not survive a crash"
        );
        let mut b = db.new_batch();
        b.delete_range(
            Cf::RaftLog,
            &keys::raft_log_key(pg, LogIndex(index)),
            &keys::pg_prefix(PgId(pg.0 + 1)),
        );
        db.write(b, Durability::Sync).map_err(io_other)?;
    }
    files.sync_newest()
}

/// What [`force_membership`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForcedMembership {
    /// The fork index F: the last entry of the old lineage this member
    /// holds. The forced entry is at F + 1.
    pub fork_index: u64,
    /// The term of the forced entry and of the member's vote.
    pub term: u64,
}

/// Offline forced membership, for a forced failover (openraft has no
/// force-new-cluster; `research/openraft.md` §3.1, where this recipe was
/// validated). While member `me`'s Raft is stopped, appends to its log one
/// membership entry at last + 1, in term T = max(its vote's term, its last
/// entry's term) + 1, naming `voters` as the only voters and `learners` as
/// learners, and saves an uncommitted vote for `me` in T: it must still win
/// an election among the new voters. Once elected it commits that entry
/// and with it every entry before it, committed or not (etcd's
/// force-new-cluster rule). One fsynced batch: a crash leaves the log as it
/// was or with the entry and the vote.
pub fn force_membership(
    db: &Db,
    pg: PgId,
    me: u64,
    voters: &BTreeMap<u64, MemberNode>,
    learners: &BTreeMap<u64, MemberNode>,
) -> io::Result<ForcedMembership> {
    use openraft::vote::RaftLeaderId;
    if !voters.contains_key(&me) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("member {me} must be one of the forced voters"),
        ));
    }
    let state = |kind| keys::raft_state_key(pg, kind);
    let read_json = |kind| -> io::Result<Option<Vec<u8>>> {
        db.get(Cf::RaftState, &state(kind)).map_err(io_other)
    };
    let last = db
        .last_with_prefix(Cf::RaftLog, &keys::pg_prefix(pg))
        .map_err(io_other)?;
    let (last_log_id, end): (Option<LogId>, u64) = match &last {
        Some((key, value)) => (
            Some(stored_log_id(row_index(key)?, value)?),
            split_stored(value)?.0,
        ),
        None => (
            read_json(RaftStateKind::LastPurged)?
                .map(|b| wire::decode_json(&b))
                .transpose()?,
            0,
        ),
    };
    let vote: Option<Vote> = read_json(RaftStateKind::Vote)?
        .map(|b| wire::decode_json(&b))
        .transpose()?;
    let term = vote
        .map_or(0, |v| v.leader_id.term())
        .max(last_log_id.map_or(0, |l| l.leader_id.term))
        + 1;
    let fork_index = last_log_id.map_or(0, |l| l.index);
    let mut nodes = voters.clone();
    nodes.extend(learners.iter().map(|(id, n)| (*id, n.clone())));
    let membership = openraft::Membership::new(vec![voters.keys().copied().collect()], nodes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let entry = Entry {
        log_id: wire::make_log_id(term, me, fork_index + 1),
        payload: openraft::EntryPayload::Membership(membership),
    };
    // Small: kept in the row, whatever the segment files' threshold.
    let (value, _, _) = stored_value(&entry, end, None)?;
    let mut b = db.new_batch();
    b.put(
        Cf::RaftLog,
        &keys::raft_log_key(pg, LogIndex(fork_index + 1)),
        &value,
    );
    b.put(
        Cf::RaftState,
        &state(RaftStateKind::Vote),
        &wire::encode_json(&Vote::new(term, me))?,
    );
    db.write(b, Durability::Sync).map_err(io_other)?;
    Ok(ForcedMembership { fork_index, term })
}

/// Whether this node has ever held Raft state for `pg` (a vote is saved
/// before a member takes part in anything).
pub fn group_has_state(db: &Db, pg: PgId) -> io::Result<bool> {
    Ok(db
        .get(
            Cf::RaftState,
            &keys::raft_state_key(pg, RaftStateKind::Vote),
        )
        .map_err(io_other)?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest sizes are a contiguous run ending at `last`, after
    /// `after`, at most `max` of them.
    #[test]
    fn newest_sizes_are_the_contiguous_run_up_to_last() {
        let mut stats = LogStats::default();
        for i in 1..=10 {
            stats.record(i, i * 100, 0);
        }
        assert_eq!(stats.newest_sizes(7, 10, 64), (8, vec![800, 900, 1000]));
        assert_eq!(stats.newest_sizes(0, 9, 2), (8, vec![800, 900]));
        assert_eq!(stats.newest_sizes(9, 9, 64), (10, vec![]), "none after");
        assert_eq!(stats.newest_sizes(0, 20, 64), (21, vec![]), "20 unknown");
        // A gap (entries not remembered) ends the run.
        stats.record(12, 1200, 0);
        assert_eq!(stats.newest_sizes(0, 12, 64), (12, vec![1200]));
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|e| e.iter().map(|e| e.log_id.index).collect())
    }

    fn blank(term: u64, index: u64) -> Entry {
        use openraft::entry::RaftEntry;
        Entry::new_blank(wire::make_log_id(term, 1, index))
    }

    /// The recent entries stay a contiguous run ending at the log's last
    /// entry, and answer only reads that start within them.
    #[test]
    fn recent_entries_are_the_log_tail() {
        let mut recent = RecentEntries::default();
        assert_eq!(indexes(recent.read(1, 5, usize::MAX)), None, "empty");
        for i in 5..=9 {
            recent.push(blank(1, i), 100);
        }
        assert_eq!(indexes(recent.read(4, 8, usize::MAX)), None, "4 is older");
        assert_eq!(indexes(recent.read(6, 8, usize::MAX)), Some(vec![6, 7]));
        // Past the last entry there is nothing, in the log either.
        assert_eq!(indexes(recent.read(8, 20, usize::MAX)), Some(vec![8, 9]));
        assert_eq!(indexes(recent.read(10, 20, usize::MAX)), Some(vec![]));
        // A byte limit stops after the entry that reaches it.
        assert_eq!(indexes(recent.read(5, 20, 150)), Some(vec![5, 6]));
        // Truncation and a conflicting append cut the tail.
        recent.truncate_from(9);
        assert_eq!(
            indexes(recent.read(5, 20, usize::MAX)),
            Some(vec![5, 6, 7, 8])
        );
        recent.push(blank(2, 7), 100);
        assert_eq!(indexes(recent.read(5, 20, usize::MAX)), Some(vec![5, 6, 7]));
        assert_eq!(
            recent.read(7, 8, usize::MAX).unwrap()[0]
                .log_id
                .leader_id
                .term,
            2
        );
        assert_eq!(recent.bytes, 300);
        // A gap starts a new run.
        recent.push(blank(2, 9), 100);
        assert_eq!(indexes(recent.read(5, 20, usize::MAX)), None);
        assert_eq!(indexes(recent.read(9, 20, usize::MAX)), Some(vec![9]));
        // Applied or purged entries go.
        recent.push(blank(2, 10), 100);
        recent.forget_upto(9);
        assert_eq!(indexes(recent.read(9, 20, usize::MAX)), None);
        assert_eq!(indexes(recent.read(10, 20, usize::MAX)), Some(vec![10]));
        assert_eq!(recent.bytes, 100);
    }

    /// The run holds at most `RECENT_ENTRIES_BYTES_MAX`, but always the
    /// last entry.
    #[test]
    fn recent_entries_keep_within_their_bytes() {
        let mut recent = RecentEntries::default();
        let third = RECENT_ENTRIES_BYTES_MAX / 3;
        for i in 1..=4 {
            recent.push(blank(1, i), third);
        }
        assert_eq!(indexes(recent.read(2, 20, usize::MAX)), Some(vec![2, 3, 4]));
        assert_eq!(indexes(recent.read(1, 20, usize::MAX)), None);
        recent.push(blank(1, 5), RECENT_ENTRIES_BYTES_MAX * 2);
        assert_eq!(indexes(recent.read(5, 20, usize::MAX)), Some(vec![5]));
        assert_eq!(recent.bytes, RECENT_ENTRIES_BYTES_MAX * 2);
    }
}
