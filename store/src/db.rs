//! The node's one RocksDB instance. Every `rocksdb::` import of the workspace
//! is in this module; the rest of Lifeboat sees [`Db`], [`Batch`], [`Cf`] and
//! [`ReadView`] only.
//!
//! Durability is explicit: [`Durability::Sync`] fsyncs the WAL before
//! returning; [`Durability::Buffered`] leaves it in the WAL's buffer, to be
//! made durable by the next sync (the WAL is one sequential file, so a later
//! sync covers every earlier write; a crash loses a suffix of whole batches);
//! [`Durability::Replayable`] skips the WAL: the batch is durable only once
//! its memtables are flushed.
//!
//! Invariant: flushes are atomic across column families (`atomic_flush`), so
//! after a crash every WAL-less batch is either wholly present or wholly
//! absent, and the ones present are a prefix of those written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteOptions,
};

use crate::error::{Error, Result};

/// Blob GC turns on for a column family once this share of its blob
/// bytes is garbage, and off below `BLOB_GC_OFF_GARBAGE` (hysteresis, so a
/// level near one threshold does not flip it at every check).
const BLOB_GC_ON_GARBAGE: f64 = 0.25;
const BLOB_GC_OFF_GARBAGE: f64 = 0.10;

/// How long, and how far above the reserve, a free-space measurement is
/// reused: see [`Db::check_reserve`].
const FREE_SEEN_REUSE: Duration = Duration::from_millis(50);
const FREE_SEEN_REUSE_HEADROOM_BYTES: u64 = 1 << 30;

/// A key and its value, as read.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Column families, as in DESIGN.md "Storage layout".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    RaftLog,
    RaftState,
    Catalog,
    PgMeta,
    Latest,
    Blocks,
    Objects,
    Chunks,
    Timeline,
}

impl Cf {
    pub const ALL: [Cf; 9] = [
        Cf::RaftLog,
        Cf::RaftState,
        Cf::Catalog,
        Cf::PgMeta,
        Cf::Latest,
        Cf::Blocks,
        Cf::Objects,
        Cf::Chunks,
        Cf::Timeline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::Catalog => "catalog",
            Cf::PgMeta => "pg_meta",
            Cf::Latest => "latest",
            Cf::Blocks => "blocks",
            Cf::Objects => "objects",
            Cf::Chunks => "chunks",
            Cf::Timeline => "timeline",
        }
    }

    /// Large values (frames, log entries) go to blob files so that compaction
    /// does not rewrite them again and again.
    fn holds_large_values(self) -> bool {
        matches!(self, Cf::RaftLog | Cf::Blocks | Cf::Chunks)
    }
}

/// Whether a write returns before or after the WAL is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the WAL before returning.
    Sync,
    /// Written to the WAL buffer; durable at the next [`Db::sync_wal`] or
    /// sync write.
    Buffered,
    /// Not written to the WAL: durable at the next (atomic) memtable flush.
    /// Only for writes that can be replayed from something already durable
    /// and that carry their own progress marker in the same batch (state
    /// machine apply: the Raft log holds the entries, and `last_applied`
    /// rides in the batch). Halves the bytes written per block.
    Replayable,
}

/// Tuning that has to be chosen when the database is opened.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// Block cache shared by all column families, in bytes.
    pub block_cache_bytes: usize,
    /// Values at least this large go to blob files.
    pub blob_value_bytes_min: u64,
    /// Background flush and compaction threads.
    pub background_jobs: i32,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            block_cache_bytes: 256 << 20,
            blob_value_bytes_min: 1024,
            background_jobs: 2,
        }
    }
}

/// The node's RocksDB instance: cheap to clone, shared by all PGs.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DB>,
    path: Arc<PathBuf>,
    /// Column families whose blob GC `adapt_blob_gc` turned on.
    blob_gc_on: Arc<std::sync::Mutex<Vec<Cf>>>,
    /// The last free-space measurement of [`Db::check_reserve`]: when,
    /// and the bytes free once the memtables are flushed.
    free_seen: Arc<std::sync::Mutex<Option<(Instant, u64)>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

fn write_options(durability: Durability) -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(durability == Durability::Sync);
    opts.disable_wal(durability == Durability::Replayable);
    opts
}

fn rocks(op: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
    move |e| Error::Rocks {
        op,
        reason: e.into_string(),
    }
}

impl Db {
    /// Opens (creating when missing) the database at `path` with every column
    /// family of [`Cf::ALL`].
    pub fn open(path: &Path, options: &DbOptions) -> Result<Db> {
        std::fs::create_dir_all(path).map_err(|source| Error::Io {
            op: "create data dir",
            path: path.to_owned(),
            source,
        })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(options.background_jobs);
        // Our own fsyncs decide durability; RocksDB must never skip one.
        db_opts.set_use_fsync(false);
        // WAL-less (Replayable) batches span column families: they must be
        // flushed together or a crash could keep half of one.
        db_opts.set_atomic_flush(true);
        db_opts.set_manual_wal_flush(false);
        db_opts.set_keep_log_file_num(4);

        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut cf_opts = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            cf_opts.set_block_based_table_factory(&table);
            // Frames are already compressed and encrypted: compressing them
            // again only burns CPU. Keys and small records compress well.
            cf_opts.set_compression_type(if cf.holds_large_values() {
                DBCompressionType::None
            } else {
                DBCompressionType::Lz4
            });
            if cf.holds_large_values() {
                cf_opts.set_enable_blob_files(true);
                cf_opts.set_min_blob_size(options.blob_value_bytes_min);
                // Blob GC (compaction moving the live values out of the
                // oldest quarter of the blob files) starts off: with
                // little garbage it rewrites live values for nothing, and
                // with random chunk ids every compaction touches every
                // blob file (measured: 1.2 bytes moved per byte written
                // under a PUT load). `adapt_blob_gc` turns it on while
                // deleted history makes a column family's garbage worth
                // collecting. The log never needs it: its entries go in
                // order, so its blob files die whole.
                cf_opts.set_enable_blob_gc(false);
                // While on: once half of the oldest quarter is garbage,
                // compaction rewrites it, so the space comes back.
                cf_opts.set_blob_gc_force_threshold(0.5);
            }
            ColumnFamilyDescriptor::new(cf.name(), cf_opts)
        });
        let inner = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(rocks("open"))?;
        Ok(Db {
            inner: Arc::new(inner),
            path: Arc::new(path.to_owned()),
            blob_gc_on: Arc::default(),
            free_seen: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every Cf is created at open: a missing handle is a programmer error.
        self.inner
            .cf_handle(cf.name())
            .expect("column family created at open")
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get_cf(self.cf(cf), key).map_err(rocks("get"))
    }

    /// Point lookups of many keys in one call, results in key order given.
    pub fn multi_get(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let handle = self.cf(cf);
        self.inner
            .multi_get_cf(keys.iter().map(|k| (handle, k.as_slice())))
            .into_iter()
            .map(|r| r.map_err(rocks("multi_get")))
            .collect()
    }

    pub fn write(&self, batch: Batch, durability: Durability) -> Result<()> {
        self.inner
            .write_opt(batch.inner, &write_options(durability))
            .map_err(rocks("write"))
    }

    /// Writes `batch` at once unless RocksDB would first make the writer
    /// wait (a write stall, while flushes or compactions catch up); then it
    /// writes nothing and hands the batch back, for a thread that may wait.
    /// So an async task can write a small batch on its own thread without
    /// risking a stall there. Costs one copy of the batch.
    pub fn write_without_waiting(
        &self,
        batch: Batch,
        durability: Durability,
    ) -> Result<Option<Batch>> {
        let mut opts = write_options(durability);
        opts.set_no_slowdown(true);
        let kept = WriteBatch::from_data(batch.inner.data());
        match self.inner.write_opt(batch.inner, &opts) {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(Some(Batch {
                inner: kept,
                db: batch.db,
            })),
            Err(e) => Err(rocks("write")(e)),
        }
    }

    /// fsyncs the WAL: every write before this call is durable after it.
    pub fn sync_wal(&self) -> Result<()> {
        self.inner.flush_wal(true).map_err(rocks("sync wal"))
    }

    /// The first entry at or after `start` whose key starts with `prefix`.
    pub fn seek(&self, cf: Cf, prefix: &[u8], start: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self.scan(cf, prefix, start, 1)?.pop())
    }

    /// For each `(prefix, start)`, the first entry at or after `start`
    /// whose key starts with `prefix`: [`Db::seek`] many times over one
    /// iterator (reads of many blocks at one index).
    pub fn seek_each(&self, cf: Cf, seeks: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<Option<KeyValue>>> {
        let mut iter = self.inner.raw_iterator_cf(self.cf(cf));
        let mut out = Vec::with_capacity(seeks.len());
        for (prefix, start) in seeks {
            iter.seek(start);
            match (iter.key(), iter.value()) {
                (Some(k), Some(v)) if k.starts_with(prefix) => {
                    out.push(Some((k.to_vec(), v.to_vec())))
                }
                _ => {
                    iter.status().map_err(rocks("seek"))?;
                    out.push(None);
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` entries at or after `start` whose keys start with
    /// `prefix`, in key order.
    pub fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let iter = self
            .inner
            .iterator_cf(self.cf(cf), IteratorMode::From(start, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(rocks("iterate"))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// The last entry whose key starts with `prefix`.
    pub fn last_with_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut ro = ReadOptions::default();
        if let Some(upper) = prefix_successor(prefix) {
            ro.set_iterate_upper_bound(upper);
        }
        let mut iter = self.inner.raw_iterator_cf_opt(self.cf(cf), ro);
        iter.seek_to_last();
        if iter.valid() {
            let (k, v) = (
                iter.key().unwrap_or_default(),
                iter.value().unwrap_or_default(),
            );
            if k.starts_with(prefix) {
                return Ok(Some((k.to_vec(), v.to_vec())));
            }
            return Ok(None);
        }
        iter.status().map_err(rocks("seek last"))?;
        Ok(None)
    }

    /// A consistent read view of the whole database at this moment.
    pub fn read_view(&self) -> ReadView<'_> {
        ReadView {
            db: self,
            snapshot: self.inner.snapshot(),
        }
    }

    /// A read view that owns its handle on the database, so that it can be
    /// kept and moved between threads (a Raft snapshot held until a
    /// follower has been sent it). While it lives, RocksDB keeps what it
    /// sees: hold one only as long as needed.
    pub fn owned_read_view(&self) -> OwnedReadView {
        OwnedReadView(OwnedViewCell::new(self.clone(), |db| db.read_view()))
    }

    /// Compacts a key range of one column family now (tests and tools).
    pub fn compact_range(&self, cf: Cf, from: &[u8], to: &[u8]) {
        self.inner
            .compact_range_cf(self.cf(cf), Some(from), Some(to));
    }

    /// Compacts a column family's range and rewrites every blob file it
    /// references, so that values deleted since are off the disk when it
    /// returns (normal compactions get there too, oldest files first, while
    /// [`Db::adapt_blob_gc`] has blob GC on).
    pub fn compact_reclaiming(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<()> {
        let handle = self.cf(cf);
        if cf.holds_large_values() {
            self.inner
                .set_options_cf(
                    &handle,
                    &[
                        ("enable_blob_garbage_collection", "true"),
                        ("blob_garbage_collection_age_cutoff", "1.0"),
                    ],
                )
                .map_err(rocks("set blob GC"))?;
        }
        // The bottom level too: left alone by default (it has no
        // compaction filter), and where the oldest values are.
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.inner
            .compact_range_cf_opt(&handle, Some(from), Some(to), &opts);
        if cf.holds_large_values() {
            // As `adapt_blob_gc` has it now: the lock is not held across
            // the compaction, which may take minutes.
            let on = self.blob_gc_on.lock().expect("blob gc lock");
            let enabled = if on.contains(&cf) { "true" } else { "false" };
            self.inner
                .set_options_cf(
                    &handle,
                    &[
                        ("enable_blob_garbage_collection", enabled),
                        ("blob_garbage_collection_age_cutoff", "0.25"),
                    ],
                )
                .map_err(rocks("set blob GC"))?;
        }
        Ok(())
    }

    /// Turns blob GC on for a column family of frames (blocks, chunks)
    /// once at least `BLOB_GC_ON_GARBAGE` of its blob bytes are garbage
    /// (values deleted by the history's GC, compacted away from the
    /// tables), and off again below `BLOB_GC_OFF_GARBAGE`, so that
    /// compaction rewrites live values only when that gives space back.
    /// Returns the column families whose setting changed, and to what.
    pub fn adapt_blob_gc(&self) -> Result<Vec<(Cf, bool)>> {
        let mut on = self.blob_gc_on.lock().expect("blob gc lock");
        let mut changed = Vec::new();
        for cf in [Cf::Blocks, Cf::Chunks] {
            let (live, garbage) = self.blob_bytes(cf)?;
            let ratio = garbage as f64 / live.max(1) as f64;
            let was = on.contains(&cf);
            let wanted = if was {
                ratio >= BLOB_GC_OFF_GARBAGE
            } else {
                ratio >= BLOB_GC_ON_GARBAGE
            };
            if wanted == was {
                continue;
            }
            self.inner
                .set_options_cf(
                    &self.cf(cf),
                    &[(
                        "enable_blob_garbage_collection",
                        if wanted { "true" } else { "false" },
                    )],
                )
                .map_err(rocks("set blob GC"))?;
            if wanted {
                on.push(cf);
            } else {
                on.retain(|c| *c != cf);
            }
            tracing::info!(
                cf = cf.name(),
                live_blob_bytes = live,
                garbage_blob_bytes = garbage,
                blob_gc = wanted,
                "blob GC turned {}",
                if wanted { "on" } else { "off" }
            );
            changed.push((cf, wanted));
        }
        Ok(changed)
    }

    /// Bytes in a column family's live blob files, and how many of those
    /// bytes are garbage.
    pub fn blob_bytes(&self, cf: Cf) -> Result<(u64, u64)> {
        let prop = |name| {
            self.inner
                .property_int_value_cf(self.cf(cf), name)
                .map_err(rocks("read blob file sizes"))
                .map(|v| v.unwrap_or(0))
        };
        Ok((
            prop("rocksdb.live-blob-file-size")?,
            prop("rocksdb.live-blob-file-garbage-size")?,
        ))
    }

    /// Writes every memtable to table files, atomically across column
    /// families: afterwards every [`Durability::Replayable`] batch written
    /// before the call is durable.
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<&rocksdb::ColumnFamily> = Cf::ALL.iter().map(|cf| self.cf(*cf)).collect();
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.inner
            .flush_cfs_opt(&cfs, &opts)
            .map_err(rocks("flush"))
    }

    /// A handle that does not keep the database open.
    pub fn downgrade(&self) -> WeakDb {
        WeakDb {
            inner: Arc::downgrade(&self.inner),
            path: self.path.clone(),
            blob_gc_on: self.blob_gc_on.clone(),
            free_seen: self.free_seen.clone(),
        }
    }

    pub fn new_batch(&self) -> Batch {
        Batch {
            inner: WriteBatch::default(),
            db: self.clone(),
        }
    }
}

/// A handle to the database that does not keep it open: for background
/// threads, so that the database closes where the last real handle is
/// dropped and never on a thread racing process exit.
#[derive(Clone)]
pub struct WeakDb {
    inner: std::sync::Weak<DB>,
    path: Arc<PathBuf>,
    blob_gc_on: Arc<std::sync::Mutex<Vec<Cf>>>,
    free_seen: Arc<std::sync::Mutex<Option<(Instant, u64)>>>,
}

impl WeakDb {
    /// The database, if it is still open.
    pub fn upgrade(&self) -> Option<Db> {
        Some(Db {
            inner: self.inner.upgrade()?,
            path: self.path.clone(),
            blob_gc_on: self.blob_gc_on.clone(),
            free_seen: self.free_seen.clone(),
        })
    }
}

/// A RocksDB snapshot: reads through it see the database as it was when it
/// was taken, whatever is written since.
pub struct ReadView<'a> {
    db: &'a Db,
    snapshot: rocksdb::Snapshot<'a>,
}

impl ReadView<'_> {
    /// Calls `visit` for every entry whose key starts with `prefix`, in key
    /// order, without holding more than one entry in memory.
    pub fn for_each_with_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.iterate(cf, prefix, prefix_successor(prefix), visit)
    }

    /// Calls `visit` for every entry with `from <= key < to`, in key
    /// order, without holding more than one entry in memory.
    pub fn for_each_in(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.iterate(cf, from, Some(to.to_vec()), visit)
    }

    /// Whether any entry has `from <= key < to`.
    pub fn any_in(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<bool> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(to.to_vec());
        ro.set_snapshot(&self.snapshot);
        let mut iter = self.db.inner.raw_iterator_cf_opt(self.db.cf(cf), ro);
        iter.seek(from);
        let found = iter.valid();
        iter.status().map_err(rocks("seek in read view"))?;
        Ok(found)
    }

    fn iterate(
        &self,
        cf: Cf,
        from: &[u8],
        to: Option<Vec<u8>>,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut ro = ReadOptions::default();
        if let Some(upper) = to {
            ro.set_iterate_upper_bound(upper);
        }
        ro.set_snapshot(&self.snapshot);
        let mut iter = self.db.inner.raw_iterator_cf_opt(self.db.cf(cf), ro);
        iter.seek(from);
        while iter.valid() {
            if let (Some(k), Some(v)) = (iter.key(), iter.value()) {
                visit(k, v)?;
            }
            iter.next();
        }
        iter.status().map_err(rocks("iterate read view"))
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snapshot
            .get_cf(self.db.cf(cf), key)
            .map_err(rocks("get in read view"))
    }
}

self_cell::self_cell!(
    struct OwnedViewCell {
        owner: Db,
        #[covariant]
        dependent: ReadView,
    }
);

/// A [`ReadView`] with its own handle on the database: see
/// [`Db::owned_read_view`].
pub struct OwnedReadView(OwnedViewCell);

impl OwnedReadView {
    pub fn view(&self) -> &ReadView<'_> {
        self.0.borrow_dependent()
    }
}

impl std::fmt::Debug for OwnedReadView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedReadView")
            .field("db", self.0.borrow_owner())
            .finish_non_exhaustive()
    }
}

/// Writes applied together or not at all.
pub struct Batch {
    inner: WriteBatch,
    db: Db,
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.inner.put_cf(self.db.cf(cf), key, value);
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.inner.delete_cf(self.db.cf(cf), key);
    }

    /// Deletes keys in `[from, to)`.
    pub fn delete_range(&mut self, cf: Cf, from: &[u8], to: &[u8]) {
        self.inner.delete_range_cf(self.db.cf(cf), from, to);
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    pub fn size_bytes(&self) -> usize {
        self.inner.size_in_bytes()
    }
}

/// The smallest byte string greater than every string starting with
/// `prefix`, or `None` when the prefix is all 0xff.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut out = prefix.to_vec();
    while let Some(last) = out.pop() {
        if last < 0xff {
            out.push(last + 1);
            return Some(out);
        }
    }
    None
}

/// Free bytes available to an unprivileged writer on the filesystem holding
/// `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let stat = rustix::fs::statvfs(path).map_err(|e| Error::Io {
        op: "statvfs",
        path: path.to_owned(),
        source: e.into(),
    })?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl Db {
    /// Refuses with [`Error::NoSpace`] when the data directory's filesystem
    /// would have `reserve_bytes` or fewer free once the memtables are
    /// flushed: writes stop well before RocksDB would hit ENOSPC in a flush
    /// and turn read-only.
    ///
    /// Called for every client write, so a measurement (a `statvfs` and a
    /// property read per column family) is reused for
    /// `FREE_SEEN_REUSE` while it showed at least
    /// `FREE_SEEN_REUSE_HEADROOM_BYTES` above the reserve: using up that
    /// headroom within the reuse time would take writes of 20 GB/s. Nearer
    /// the reserve, every call measures.
    pub fn check_reserve(&self, reserve_bytes: u64) -> Result<()> {
        let now = Instant::now();
        let seen = *self.free_seen.lock().expect("free space lock");
        let free = match seen {
            Some((at, free))
                if now.duration_since(at) < FREE_SEEN_REUSE
                    && free >= reserve_bytes.saturating_add(FREE_SEEN_REUSE_HEADROOM_BYTES) =>
            {
                free
            }
            _ => {
                let free = free_bytes(&self.path)?.saturating_sub(self.memtable_bytes()?);
                *self.free_seen.lock().expect("free space lock") = Some((now, free));
                free
            }
        };
        if free <= reserve_bytes {
            return Err(Error::NoSpace {
                free_bytes: free,
                reserve_bytes,
            });
        }
        Ok(())
    }

    /// Bytes held in memtables of every column family: what the next
    /// flushes will write to disk.
    pub fn memtable_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for cf in Cf::ALL {
            let bytes = self
                .inner
                .property_int_value_cf(self.cf(cf), "rocksdb.cur-size-all-mem-tables")
                .map_err(rocks("read memtable size"))?
                .unwrap_or(0);
            total = total.saturating_add(bytes);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_successor_bounds_the_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
    }

    #[test]
    fn batch_is_atomic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut b = db.new_batch();
        b.put(Cf::Blocks, b"k1", b"v1");
        b.put(Cf::Latest, b"k1", b"1");
        db.write(b, Durability::Sync).unwrap();
        assert_eq!(db.get(Cf::Blocks, b"k1").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(db.get(Cf::Latest, b"k1").unwrap(), Some(b"1".to_vec()));
        assert_eq!(db.get(Cf::Chunks, b"k1").unwrap(), None);
        let last = db.last_with_prefix(Cf::Blocks, b"k").unwrap();
        assert_eq!(last, Some((b"k1".to_vec(), b"v1".to_vec())));
        assert!(db.last_with_prefix(Cf::Blocks, b"z").unwrap().is_none());
    }

    #[test]
    fn a_write_that_would_stall_is_handed_back_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut b = db.new_batch();
        b.put(Cf::Blocks, b"a", b"1");
        assert!(
            db.write_without_waiting(b, Durability::Replayable)
                .unwrap()
                .is_none()
        );
        assert_eq!(db.get(Cf::Blocks, b"a").unwrap(), Some(b"1".to_vec()));
        // Writes stop once level 0 holds one file, which is too few to
        // compact.
        let stop = |stop: &str| {
            db.inner
                .set_options_cf(
                    db.cf(Cf::Blocks),
                    &[
                        ("level0_file_num_compaction_trigger", "8"),
                        ("level0_slowdown_writes_trigger", stop),
                        ("level0_stop_writes_trigger", stop),
                    ],
                )
                .unwrap()
        };
        stop("1");
        db.flush().unwrap();
        let mut b = db.new_batch();
        b.put(Cf::Blocks, b"b", b"2");
        b.put(Cf::Latest, b"b", b"3");
        let back = db
            .write_without_waiting(b, Durability::Replayable)
            .unwrap()
            .expect("the stalled write comes back");
        assert_eq!(db.get(Cf::Blocks, b"b").unwrap(), None);
        assert_eq!(back.len(), 2);
        stop("20");
        db.write(back, Durability::Replayable).unwrap();
        assert_eq!(db.get(Cf::Blocks, b"b").unwrap(), Some(b"2".to_vec()));
        assert_eq!(db.get(Cf::Latest, b"b").unwrap(), Some(b"3".to_vec()));
    }

    #[test]
    fn a_reused_free_space_measurement_never_hides_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        db.check_reserve(0).unwrap();
        let measured = db.free_seen.lock().unwrap().expect("measured").1;
        // A reserve above what is free is refused, however recent the
        // measurement (the margin lets other writers on the filesystem
        // free some space meanwhile).
        assert!(matches!(
            db.check_reserve(measured.saturating_add(512 << 20)),
            Err(Error::NoSpace { .. })
        ));
        assert!(matches!(
            db.check_reserve(u64::MAX),
            Err(Error::NoSpace { .. })
        ));
        db.check_reserve(0).unwrap();
    }

    #[test]
    fn read_view_ignores_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut b = db.new_batch();
        b.put(Cf::Blocks, b"a1", b"old");
        db.write(b, Durability::Buffered).unwrap();
        let view = db.read_view();
        let mut b = db.new_batch();
        b.put(Cf::Blocks, b"a1", b"new");
        b.put(Cf::Blocks, b"a2", b"new");
        db.write(b, Durability::Buffered).unwrap();
        let mut seen = Vec::new();
        view.for_each_with_prefix(Cf::Blocks, b"a", |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(b"a1".to_vec(), b"old".to_vec())]);
    }

    #[test]
    fn an_owned_read_view_outlives_its_handle_and_ignores_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut b = db.new_batch();
        b.put(Cf::Chunks, b"c", b"old");
        db.write(b, Durability::Buffered).unwrap();
        // Made from a clone that is gone at once: the view holds its own.
        let view = db.clone().owned_read_view();
        let mut b = db.new_batch();
        b.put(Cf::Chunks, b"c", b"new");
        db.write(b, Durability::Buffered).unwrap();
        db.flush().unwrap();
        let seen = std::thread::spawn(move || view.view().get(Cf::Chunks, b"c").unwrap())
            .join()
            .unwrap();
        assert_eq!(seen, Some(b"old".to_vec()));
        assert_eq!(db.get(Cf::Chunks, b"c").unwrap(), Some(b"new".to_vec()));
    }

    /// Blob GC stays off while there is no garbage (compaction leaves live
    /// values where they are), comes on once deleted values are a quarter
    /// of the blob bytes, and goes off again once they are collected.
    #[test]
    fn blob_gc_comes_on_with_garbage_and_goes_off_without() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let value = vec![7u8; 64 << 10];
        for round in 0..4u8 {
            let mut b = db.new_batch();
            for i in 0..16u8 {
                b.put(Cf::Chunks, &[round, i], &value);
            }
            db.write(b, Durability::Buffered).unwrap();
            db.flush().unwrap();
        }
        let (live, garbage) = db.blob_bytes(Cf::Chunks).unwrap();
        assert!(live >= 64 * (64 << 10), "{live} bytes in blob files");
        assert_eq!(garbage, 0);
        db.compact_range(Cf::Chunks, &[], &[0xff]);
        assert_eq!(
            db.blob_bytes(Cf::Chunks).unwrap(),
            (live, 0),
            "a compaction without garbage moves no value"
        );
        assert!(db.adapt_blob_gc().unwrap().is_empty());

        // Half of every blob file deleted, the tables compacted: garbage.
        let mut b = db.new_batch();
        for round in 0..4u8 {
            for i in 0..8u8 {
                b.delete(Cf::Chunks, &[round, i]);
            }
        }
        db.write(b, Durability::Buffered).unwrap();
        db.flush().unwrap();
        db.compact_range(Cf::Chunks, &[], &[0xff]);
        let (_, garbage) = db.blob_bytes(Cf::Chunks).unwrap();
        assert!(
            garbage >= live / 3,
            "{garbage} of {live} blob bytes are garbage"
        );
        assert_eq!(db.adapt_blob_gc().unwrap(), vec![(Cf::Chunks, true)]);
        assert!(db.adapt_blob_gc().unwrap().is_empty(), "on stays on");

        db.compact_reclaiming(Cf::Chunks, &[], &[0xff]).unwrap();
        let (left, garbage) = db.blob_bytes(Cf::Chunks).unwrap();
        assert_eq!(garbage, 0);
        assert!(
            left <= live / 2 + (64 << 10),
            "{left} of {live} blob bytes left"
        );
        assert_eq!(db.adapt_blob_gc().unwrap(), vec![(Cf::Chunks, false)]);
        for round in 0..4u8 {
            assert_eq!(
                db.get(Cf::Chunks, &[round, 9]).unwrap(),
                Some(value.clone())
            );
            assert_eq!(db.get(Cf::Chunks, &[round, 1]).unwrap(), None);
        }
    }
}
