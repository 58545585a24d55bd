//! The history's GC: the continuous-protection window, its horizon, and the
//! scanner that deletes the versions nothing can read any more.
//!
//! A PG keeps every moment from its horizon H on (the window), and every
//! pinned moment before it. A version is *needed* when it is newer than H
//! (a moment inside the window may read it), or when it is the version a
//! read at H or at a pin lands on: the newest at or below that index (for
//! an object, also the rows below it that a read may step past: versions
//! removed by id, down to the first one that is not). Everything else is
//! garbage. Pins are the PG's snapshots (locked or not), clone bases and
//! the restore points of its rollback masks.
//!
//! A volume or bucket deleted at D keeps nothing for moments at or after
//! D: once D is behind the horizon, only pins before D hold its versions,
//! and with none its data is gone for good (and `undelete` is refused).
//!
//! The horizon and every pin are entries of the PG's log, and the scanner
//! runs in apply, one bounded step per `CollectGarbage` entry that the
//! leader proposes at its own pace, on a batch of its own: every replica
//! deletes exactly the same versions, reference counts of chunks are kept
//! with no race against writers, and an open read view (a Raft snapshot
//! being streamed) still sees what it started with, as RocksDB views do.

use std::collections::{HashMap, HashSet};

use crate::db::{Batch, Cf, Db, prefix_successor};
use crate::error::{Error, Result};
use crate::history::{self, History};
use crate::keys::{self, MetaKind};
use crate::masks::{self, Span};
use crate::objects::{self, ChunkState, ObjectVersion, Objects};
use crate::usage::{Census, Kept};
use crate::volumes::{VolumeState, Volumes};
use crate::{ChunkId, LogIndex, PgId};

/// The window when a PG has not set one: 24 hours.
pub const DEFAULT_WINDOW_MS: u64 = 24 * 3600 * 1000;

/// The oldest moment a PG keeps whole: the state at `index`, standing for
/// `at_ms` (ms since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    pub index: LogIndex,
    pub at_ms: u64,
}

/// Where the scanner is in its pass over a PG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Block versions, from this key on.
    Blocks(Vec<u8>),
    /// Object versions, from this key on.
    Objects(Vec<u8>),
    /// The timeline rows before the horizon.
    Timeline,
    /// Nothing left until the horizon moves.
    Done,
}

/// What one step of the scanner did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub rows_scanned: u64,
    pub versions_removed: u64,
    /// Stored bytes freed (as `crate::usage` counts them): removed block
    /// versions and chunks no version names any more.
    pub bytes_removed: u64,
    /// Nothing is left of the pass.
    pub done: bool,
    /// This step ended a pass (so its census is whole).
    pub finished_pass: bool,
}

fn horizon_key(pg: PgId) -> [u8; 9] {
    keys::pg_meta_kind_prefix(pg, MetaKind::Horizon)
}

fn cursor_key(pg: PgId) -> [u8; 9] {
    keys::pg_meta_kind_prefix(pg, MetaKind::GcCursor)
}

fn window_key(pg: PgId) -> [u8; 9] {
    keys::pg_meta_kind_prefix(pg, MetaKind::Window)
}

fn word(key: &[u8], bytes: &[u8], at: usize) -> Result<u64> {
    bytes
        .get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| Error::corrupt_record(Cf::PgMeta.name(), key, "record too short"))
}

/// The PG's horizon (`None`: it keeps everything from its first entry).
pub fn horizon(db: &Db, pg: PgId) -> Result<Option<Horizon>> {
    let key = horizon_key(pg);
    db.get(Cf::PgMeta, &key)?
        .map(|v| {
            Ok(Horizon {
                index: LogIndex(word(&key, &v, 0)?),
                at_ms: word(&key, &v, 8)?,
            })
        })
        .transpose()
}

/// Stages a new horizon and starts a new pass of the scanner.
pub fn stage_horizon(batch: &mut Batch, pg: PgId, h: Horizon) {
    let mut v = h.index.0.to_be_bytes().to_vec();
    v.extend_from_slice(&h.at_ms.to_be_bytes());
    batch.put(Cf::PgMeta, &horizon_key(pg), &v);
    stage_cursor(batch, pg, &Cursor::Blocks(keys::pg_prefix(pg).to_vec()));
}

/// The PG's window in ms, if it set one.
pub fn window(db: &Db, pg: PgId) -> Result<Option<u64>> {
    let key = window_key(pg);
    db.get(Cf::PgMeta, &key)?
        .map(|v| word(&key, &v, 0))
        .transpose()
}

pub fn stage_window(batch: &mut Batch, pg: PgId, window_ms: u64) {
    batch.put(Cf::PgMeta, &window_key(pg), &window_ms.to_be_bytes());
}

/// `phase u8 | position`.
pub fn cursor(db: &Db, pg: PgId) -> Result<Cursor> {
    let key = cursor_key(pg);
    let Some(v) = db.get(Cf::PgMeta, &key)? else {
        return Ok(Cursor::Done);
    };
    match v.split_first() {
        Some((1, rest)) => Ok(Cursor::Blocks(rest.to_vec())),
        Some((2, rest)) => Ok(Cursor::Objects(rest.to_vec())),
        Some((3, _)) => Ok(Cursor::Timeline),
        Some((4, _)) => Ok(Cursor::Done),
        _ => Err(Error::corrupt_record(
            Cf::PgMeta.name(),
            &key,
            "unknown GC cursor",
        )),
    }
}

fn stage_cursor(batch: &mut Batch, pg: PgId, cursor: &Cursor) {
    let v = match cursor {
        Cursor::Blocks(p) => [&[1u8][..], p].concat(),
        Cursor::Objects(p) => [&[2u8][..], p].concat(),
        Cursor::Timeline => vec![3],
        Cursor::Done => vec![4],
    };
    batch.put(Cf::PgMeta, &cursor_key(pg), &v);
}

/// What the PG must keep below its horizon: its pins, and when its
/// deleted volumes and buckets ended.
#[derive(Clone, Debug, Default)]
pub struct Retained {
    pub horizon: Option<LogIndex>,
    /// Every pinned index, newest first, once each.
    pub pins: Vec<LogIndex>,
    /// Volume and bucket ids (they share one id space) deleted at an
    /// index, and not back.
    pub ended: HashMap<u64, LogIndex>,
    /// The PG's rollback masks, newest first: what a read now sees.
    pub masks: Vec<masks::RollbackMask>,
    /// Buckets cloned from a base: a delete marker in one hides the
    /// base's object even with nothing of its own below it.
    pub clones: HashSet<u64>,
}

impl Retained {
    /// Reads the pins and the ends of a PG.
    pub fn gather(db: &Db, pg: PgId) -> Result<Retained> {
        let snapshots = History::new(db.clone()).snapshots(pg)?;
        Retained::gather_with(db, pg, snapshots.iter().map(|(_, s)| s.index))
    }

    /// As [`Retained::gather`], with the snapshots' indexes given (apply
    /// passes those its batch has staged over those of the store).
    pub fn gather_with(
        db: &Db,
        pg: PgId,
        snapshots: impl IntoIterator<Item = LogIndex>,
    ) -> Result<Retained> {
        let mut pins: Vec<LogIndex> = snapshots.into_iter().collect();
        let masks = masks::masks(db, pg)?;
        pins.extend(masks.iter().map(|m| m.to));
        let mut ended = HashMap::new();
        let mut clones = HashSet::new();
        for (id, index, record) in Volumes::new(db.clone()).volumes(pg)? {
            // A drill's base is in its source PG, which pins it.
            pins.extend(record.base.filter(|b| b.pg.is_none()).map(|b| b.index));
            if record.state == VolumeState::Deleted {
                ended.insert(id.0, index);
            }
        }
        for (id, index, record) in Objects::new(db.clone()).buckets(pg)? {
            if let Some(base) = record.base {
                // A drill's base is in its source PG, which pins it.
                if base.pg.is_none() {
                    pins.push(base.index);
                }
                clones.insert(id.0);
            }
            if record.state == objects::BucketState::Deleted {
                ended.insert(id.0, index);
            }
        }
        pins.sort_unstable_by(|a, b| b.cmp(a));
        pins.dedup();
        Ok(Retained {
            horizon: horizon(db, pg)?.map(|h| h.index),
            pins,
            ended,
            masks,
            clones,
        })
    }

    /// Whether a restore point at `index` can still be read whole.
    pub fn holds(&self, index: LogIndex) -> bool {
        self.horizon.is_none_or(|h| index >= h) || self.pins.contains(&index)
    }

    /// The spans a read now of a volume or bucket goes through; none when
    /// it is deleted (nothing of it is live).
    fn now_spans(&self, id: u64) -> Vec<Span> {
        if self.ended.contains_key(&id) {
            return Vec::new();
        }
        masks::spans(
            &self.masks,
            |m| m.volumes.iter().any(|v| v.0 == id) || m.buckets.iter().any(|b| b.0 == id),
            None,
        )
    }

    /// For one volume or bucket: versions above this index are kept
    /// (`None`: none are kept for being recent), and the read points below
    /// it that keep the version they land on (newest first).
    fn reads_of(&self, id: u64) -> (Option<LogIndex>, Vec<LogIndex>) {
        let Some(h) = self.horizon else {
            // No horizon yet: everything is inside the window.
            return (Some(LogIndex(0)), Vec::new());
        };
        let end = self.ended.get(&id).copied();
        let alive_at = |p: LogIndex| end.is_none_or(|d| p < d);
        let mut points: Vec<LogIndex> =
            self.pins.iter().copied().filter(|p| alive_at(*p)).collect();
        let recent = alive_at(h).then_some(h);
        if let Some(h) = recent {
            points.push(h);
            points.sort_unstable_by(|a, b| b.cmp(a));
            points.dedup();
        }
        (recent, points)
    }
}

/// Which of one block's versions (newest first) are needed: those above
/// `recent`, and the newest at or below each point.
pub fn needed_versions(
    indexes: &[LogIndex],
    recent: Option<LogIndex>,
    points: &[LogIndex],
) -> Vec<bool> {
    let mut keep: Vec<bool> = indexes
        .iter()
        .map(|i| recent.is_some_and(|r| *i > r))
        .collect();
    for p in points {
        if let Some(at) = indexes.iter().position(|i| i <= p) {
            keep[at] = true;
        }
    }
    keep
}

/// Which of one object key's rows (newest first) are needed: as for
/// blocks, and below each row a read lands on, the rows it may step past
/// (versions removed by id) down to the first that is not one. A delete
/// marker with nothing kept below it hides nothing, so it goes too —
/// unless the key's rows are a clone's (`over_base`), where it hides the
/// base's object.
pub fn needed_object_rows(
    rows: &[(LogIndex, &ObjectVersion)],
    recent: Option<LogIndex>,
    points: &[LogIndex],
    over_base: bool,
) -> Vec<bool> {
    let mut keep: Vec<bool> = rows
        .iter()
        .map(|(i, _)| recent.is_some_and(|r| *i > r))
        .collect();
    let mut landings: Vec<usize> = points
        .iter()
        .filter_map(|p| rows.iter().position(|(i, _)| i <= p))
        .collect();
    landings.extend(
        keep.iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(at, _)| at),
    );
    for mut at in landings {
        keep[at] = true;
        while matches!(rows[at].1, ObjectVersion::Removed { .. }) && at + 1 < rows.len() {
            at += 1;
            keep[at] = true;
        }
    }
    while let Some(lowest) = keep.iter().rposition(|k| *k) {
        if over_base || *rows[lowest].1 != ObjectVersion::DeleteMarker {
            break;
        }
        keep[lowest] = false;
    }
    keep
}

/// Which of one block's versions (newest first) a read through `spans`
/// lands on.
pub fn visible_block(indexes: &[LogIndex], spans: &[Span]) -> Option<usize> {
    for span in spans {
        let Some(at) = indexes
            .iter()
            .position(|i| span.at.is_none_or(|limit| *i <= limit))
        else {
            continue;
        };
        if span.above.is_none_or(|above| indexes[at] > above) {
            return Some(at);
        }
    }
    None
}

/// How a census counts each of a group's rows that GC keeps: live if a
/// read now lands on it, history if the window keeps it, pinned if only a
/// pin does. `None` for rows GC removes.
fn census_of(keep: &[bool], by_window: &[bool], live: Option<usize>) -> Vec<Option<Kept>> {
    keep.iter()
        .zip(by_window)
        .enumerate()
        .map(|(at, (kept, windowed))| {
            kept.then_some(if live == Some(at) {
                Kept::Live
            } else if *windowed {
                Kept::History
            } else {
                Kept::Pinned
            })
        })
        .collect()
}

/// One bounded step of the scanner: about `max_rows` version rows from
/// where the last step stopped, their garbage staged for deletion in
/// `batch` (with the cursor), and the bytes of the rows kept counted into
/// `census` (reset when a pass starts). With `new_pass`, a finished pass
/// starts over (a census, or garbage that a deleted snapshot left, without
/// the horizon moving). Reads the database as it is: the caller (apply)
/// runs it on a batch of its own.
pub fn collect_step(
    db: &Db,
    batch: &mut Batch,
    pg: PgId,
    retained: &Retained,
    max_rows: usize,
    new_pass: bool,
    census: &mut Census,
) -> Result<Step> {
    let mut step = Step::default();
    let max_rows = max_rows.max(1);
    let start = keys::pg_prefix(pg).to_vec();
    let cursor = match cursor(db, pg)? {
        Cursor::Done if new_pass => Cursor::Blocks(start.clone()),
        c => c,
    };
    if cursor == Cursor::Blocks(start) {
        *census = Census::default();
    }
    let next = match cursor {
        Cursor::Done => {
            step.done = true;
            return Ok(step);
        }
        Cursor::Blocks(position) => {
            match scan_groups(
                db,
                Cf::Blocks,
                pg,
                &position,
                max_rows,
                keys::LATEST_KEY_BYTES,
            )? {
                (groups, Some(next)) => {
                    collect_blocks(batch, retained, &groups, &mut step, census)?;
                    Cursor::Blocks(next)
                }
                (groups, None) => {
                    collect_blocks(batch, retained, &groups, &mut step, census)?;
                    Cursor::Objects(keys::pg_prefix(pg).to_vec())
                }
            }
        }
        Cursor::Objects(position) => {
            let (groups, next) = scan_groups(db, Cf::Objects, pg, &position, max_rows, 0)?;
            collect_objects(db, batch, pg, retained, &groups, &mut step, census)?;
            match next {
                Some(next) => Cursor::Objects(next),
                None => Cursor::Timeline,
            }
        }
        Cursor::Timeline => {
            trim_timeline(db, batch, pg)?;
            step.done = true;
            step.finished_pass = true;
            Cursor::Done
        }
    };
    stage_cursor(batch, pg, &next);
    Ok(step)
}

/// Rows of one block or one object key: (key, value), newest first.
type Group = Vec<(Vec<u8>, Vec<u8>)>;

/// Whole groups of rows from `position`, about `max_rows` of them, and
/// where the next step starts (`None`: the PG's rows are done). A group's
/// prefix is its rows' key less the 8-byte index (`fixed`, when every key
/// has that length, else found per key).
fn scan_groups(
    db: &Db,
    cf: Cf,
    pg: PgId,
    position: &[u8],
    max_rows: usize,
    fixed: usize,
) -> Result<(Vec<Group>, Option<Vec<u8>>)> {
    let range = keys::pg_prefix(pg);
    let rows = db.scan(cf, &range, position, max_rows + 1)?;
    let truncated = rows.len() > max_rows;
    let prefix_of = |k: &[u8]| -> Vec<u8> {
        let len = if fixed > 0 {
            fixed
        } else {
            k.len().saturating_sub(8)
        };
        k[..len.min(k.len())].to_vec()
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    for (k, v) in rows {
        let p = prefix_of(&k);
        if last.as_deref() != Some(p.as_slice()) {
            groups.push(Vec::new());
            last = Some(p);
        }
        groups.last_mut().expect("pushed").push((k, v));
    }
    if !truncated {
        return Ok((groups, None));
    }
    // The last group may go on past the scan: leave it to the next step,
    // unless it is the only one (then read it whole now).
    let tail = groups.pop().expect("a truncated scan has rows");
    let tail_prefix = prefix_of(&tail[0].0);
    if groups.is_empty() {
        groups.push(db.scan(cf, &tail_prefix, &tail_prefix, usize::MAX)?);
        let next = prefix_successor(&tail_prefix).unwrap_or_else(|| range.to_vec());
        return Ok((groups, Some(next)));
    }
    Ok((groups, Some(tail_prefix)))
}

fn id_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[8..16].try_into().expect("keys hold pg and id"))
}

fn index_of(cf: Cf, key: &[u8]) -> Result<LogIndex> {
    let tail: [u8; 8] = key
        .get(key.len().saturating_sub(8)..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| Error::corrupt_record(cf.name(), key, "key too short"))?;
    Ok(LogIndex(!u64::from_be_bytes(tail)))
}

fn collect_blocks(
    batch: &mut Batch,
    retained: &Retained,
    groups: &[Group],
    step: &mut Step,
    census: &mut Census,
) -> Result<()> {
    let mut spans_of: HashMap<u64, Vec<Span>> = HashMap::new();
    for rows in groups {
        step.rows_scanned += rows.len() as u64;
        let id = id_of(&rows[0].0);
        let (recent, points) = retained.reads_of(id);
        let indexes = rows
            .iter()
            .map(|(k, _)| index_of(Cf::Blocks, k))
            .collect::<Result<Vec<_>>>()?;
        let keep = needed_versions(&indexes, recent, &points);
        let by_window = needed_versions(&indexes, recent, recent.as_slice());
        let spans = spans_of.entry(id).or_insert_with(|| retained.now_spans(id));
        let counted = census_of(&keep, &by_window, visible_block(&indexes, spans));
        for ((k, v), counted) in rows.iter().zip(counted) {
            match counted {
                Some(kept) => census.add(kept, v.len() as u64),
                None => {
                    batch.delete(Cf::Blocks, k);
                    step.versions_removed += 1;
                    step.bytes_removed += v.len() as u64;
                }
            }
        }
        // `latest` names the newest version: with it gone (a volume
        // deleted behind the horizon), so is the block.
        if !keep[0] {
            batch.delete(Cf::Latest, &rows[0].0[..keys::LATEST_KEY_BYTES]);
        }
    }
    Ok(())
}

fn collect_objects(
    db: &Db,
    batch: &mut Batch,
    pg: PgId,
    retained: &Retained,
    groups: &[Group],
    step: &mut Step,
    census: &mut Census,
) -> Result<()> {
    let objects = Objects::new(db.clone());
    // Counts as this step leaves them. A chunk's frame size never changes.
    let mut chunks: HashMap<ChunkId, ChunkState> = HashMap::new();
    let state_of = |chunks: &mut HashMap<ChunkId, ChunkState>, chunk: ChunkId| {
        if let Some(s) = chunks.get(&chunk) {
            return Ok::<_, Error>(*s);
        }
        let s = objects.chunk_state(pg, chunk)?;
        chunks.insert(chunk, s);
        Ok(s)
    };
    let mut spans_of: HashMap<u64, Vec<Span>> = HashMap::new();
    for rows in groups {
        step.rows_scanned += rows.len() as u64;
        let id = id_of(&rows[0].0);
        let (recent, points) = retained.reads_of(id);
        let decoded = rows
            .iter()
            .map(|(k, v)| {
                let version = ObjectVersion::decode(v)
                    .map_err(|reason| Error::corrupt_record(Cf::Objects.name(), k, reason))?;
                Ok((index_of(Cf::Objects, k)?, version))
            })
            .collect::<Result<Vec<_>>>()?;
        let view: Vec<(LogIndex, &ObjectVersion)> = decoded.iter().map(|(i, v)| (*i, v)).collect();
        let over_base = retained.clones.contains(&id);
        let keep = needed_object_rows(&view, recent, &points, over_base);
        let by_window = needed_object_rows(&view, recent, recent.as_slice(), over_base);
        let spans = spans_of.entry(id).or_insert_with(|| retained.now_spans(id));
        let live = objects::visible_version(&decoded, spans)
            .and_then(|(index, _)| decoded.iter().position(|(i, _)| *i == index));
        let counted = census_of(&keep, &by_window, live);
        for (((k, _), (_, version)), counted) in rows.iter().zip(&decoded).zip(counted) {
            if let Some(kept) = counted {
                let mut bytes = 0;
                for chunk in version.chunks() {
                    bytes += state_of(&mut chunks, *chunk)?.frame_bytes;
                }
                census.add(kept, bytes);
                continue;
            }
            batch.delete(Cf::Objects, k);
            step.versions_removed += 1;
            for chunk in version.chunks() {
                let mut state = state_of(&mut chunks, *chunk)?;
                state.refs = state.refs.saturating_sub(1);
                chunks.insert(*chunk, state);
                if state.refs == 0 {
                    step.bytes_removed += state.frame_bytes;
                }
                objects::stage_chunk_refs(batch, pg, *chunk, state);
            }
        }
        // `latest` names the newest row not removed by id, when that is an
        // object: kept while the bucket lives, but with it gone (a bucket
        // deleted behind the horizon) the key has no `latest` row.
        let named = decoded
            .iter()
            .position(|(_, v)| !matches!(v, ObjectVersion::Removed { .. }));
        if let Some(at) = named
            && matches!(decoded[at].1, ObjectVersion::Object { .. })
            && !keep[at]
        {
            let prefix = &rows[0].0[..rows[0].0.len() - 8];
            batch.delete(Cf::Latest, prefix);
        }
    }
    Ok(())
}

/// Drops the timeline rows before the horizon's bucket, and keeps one row
/// at that bucket so that the oldest restorable time is the horizon's.
fn trim_timeline(db: &Db, batch: &mut Batch, pg: PgId) -> Result<()> {
    let Some(h) = horizon(db, pg)? else {
        return Ok(());
    };
    let bucket = history::timeline_bucket(h.at_ms);
    let first = History::new(db.clone()).first_bucket(pg)?;
    if first.is_none_or(|(b, _)| b >= bucket) {
        return Ok(());
    }
    let at_bucket = db.get(Cf::Timeline, &keys::timeline_key(pg, bucket))?;
    batch.delete_range(
        Cf::Timeline,
        &keys::timeline_key(pg, 0),
        &keys::timeline_key(pg, bucket),
    );
    if at_bucket.is_none() {
        history::stage_timeline(batch, pg, bucket, LogIndex(h.index.0 + 1));
    }
    Ok(())
}
