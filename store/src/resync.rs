//! A delta resync of one protection group's replica (DESIGN.md "Failover",
//! re-protect and failback): a node that holds an older copy of a PG — a
//! fenced old member, whose state ran to some index past the fork — is
//! made identical to a current member's read view by moving only the key
//! ranges in which the two differ.
//!
//! 1. The receiver describes what it holds as an [`Offer`]: its rows cut
//!    into segments of a few rows (a large row alone), each named by its
//!    first and last key and a SHA-256 of its rows.
//! 2. The sender walks the same segments over one read view of its own
//!    ranges. Where its digest matches, nothing moves. Where it differs,
//!    it sends [`DeltaOp::Replace`] for the segment's key range followed
//!    by a [`DeltaOp::Put`] for each of its rows in it. Between two
//!    segments, and before the first and after the last, the receiver
//!    holds nothing: the sender's rows there move the same way.
//! 3. The receiver deletes each replaced range and writes the rows.
//!
//! Bytes moved are the offer (tens of bytes per segment) plus the rows of
//! the segments that changed on either side, so they follow the changes
//! since the two copies parted, not the PG's size. Applying is idempotent:
//! a resync cut off half-way leaves a mix that the next offer describes
//! as it is, and the next resync finishes the job.
//!
//! The catalog PG is never resynced this way (its `catalog` column family
//! has no PG prefix).

use sha2::{Digest, Sha256};

use crate::PgId;
use crate::db::{Batch, Cf, Db, Durability, ReadView, prefix_successor};
use crate::error::{Error, Result};
use crate::keys::{self, RaftStateKind};
use crate::raft_snapshot::{PG_RANGES, cf_tag};

/// About this many segments at most in an offer, whatever the PG's size:
/// an offer of ~80-byte segments stays well under the transport's message
/// cap.
pub const OFFER_SEGMENTS_MAX: u64 = 200_000;
/// A segment ends after this many rows, or once its rows hold
/// [`SEGMENT_BYTES_MIN`]: a changed row costs at most a segment moved
/// (32 KiB of 4 KiB blocks; an object chunk of up to 1 MiB alone), for an
/// offer of about 10 bytes per row held. Both grow for a PG so large that
/// the offer would pass [`OFFER_SEGMENTS_MAX`].
pub const ROWS_PER_SEGMENT_MIN: u64 = 8;
pub const SEGMENT_BYTES_MIN: u64 = 64 << 10;

/// One segment of the receiver's rows: in column family `cf`, those from
/// `first_key` through `last_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub cf: Cf,
    pub first_key: Vec<u8>,
    pub last_key: Vec<u8>,
    pub digest: [u8; 32],
}

/// What a receiver holds of a PG, in column family order then key order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    pub segments: Vec<Segment>,
    /// Rows and key+value bytes the receiver holds.
    pub rows: u64,
    pub bytes: u64,
}

/// A step of a delta, in the order the receiver applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaOp {
    /// Delete every row of `cf` in the PG with `from <= key < to` (from
    /// the PG's first key when `from` is `None`, to its last when `to` is).
    Replace {
        cf: Cf,
        from: Option<Vec<u8>>,
        to: Option<Vec<u8>>,
    },
    /// A row of the last replaced range.
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

impl DeltaOp {
    /// Key and value bytes a put carries.
    pub fn payload_bytes(&self) -> u64 {
        match self {
            DeltaOp::Put { key, value, .. } => (key.len() + value.len()) as u64,
            DeltaOp::Replace { .. } => 0,
        }
    }
}

/// What a sender found: segments compared and replaced, rows and bytes sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub segments: u64,
    pub replaced: u64,
    pub rows_sent: u64,
    pub bytes_sent: u64,
}

/// The column family a wire tag names, if a PG range.
pub fn cf_from_wire(tag: u32) -> Option<Cf> {
    let cf = *Cf::ALL.get(usize::try_from(tag).ok()?)?;
    PG_RANGES.contains(&cf).then_some(cf)
}

pub fn cf_to_wire(cf: Cf) -> u32 {
    u32::from(cf_tag(cf))
}

fn row_hash(hash: &mut Sha256, k: &[u8], v: &[u8]) {
    hash.update((k.len() as u32).to_be_bytes());
    hash.update(k);
    hash.update((v.len() as u32).to_be_bytes());
    hash.update(v);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The smallest key after `key`.
fn after(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// `[from, to)` of `pg`'s rows, its first and last when open.
fn bounds(pg: PgId, from: Option<&[u8]>, to: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
    let prefix = keys::pg_prefix(pg);
    (
        from.map_or_else(|| prefix.to_vec(), <[u8]>::to_vec),
        to.map_or_else(
            || prefix_successor(&prefix).expect("a PG prefix has a successor"),
            <[u8]>::to_vec,
        ),
    )
}

/// Describes what this node holds of `pg`, read from one view.
pub fn offer(db: &Db, pg: PgId) -> Result<Offer> {
    let view = db.read_view();
    let prefix = keys::pg_prefix(pg);
    let (mut rows, mut bytes) = (0u64, 0u64);
    for cf in PG_RANGES {
        view.for_each_with_prefix(cf, &prefix, |k, v| {
            rows += 1;
            bytes += (k.len() + v.len()) as u64;
            Ok(())
        })?;
    }
    // A third of the cap for segments closed by rows, two thirds for
    // those closed by bytes (before and after a large row).
    let per_segment = rows
        .div_ceil(OFFER_SEGMENTS_MAX / 3)
        .max(ROWS_PER_SEGMENT_MIN);
    let segment_bytes = bytes
        .div_ceil(OFFER_SEGMENTS_MAX / 3)
        .max(SEGMENT_BYTES_MIN);
    let mut out = Offer::default();
    for cf in PG_RANGES {
        let mut open: Option<OpenSegment> = None;
        view.for_each_with_prefix(cf, &prefix, |k, v| {
            let row_bytes = (k.len() + v.len()) as u64;
            out.rows += 1;
            out.bytes += row_bytes;
            // A large row (an object chunk) gets a segment of its own, so
            // that a small change next to it does not move it.
            if open
                .as_ref()
                .is_some_and(|o| o.bytes + row_bytes > segment_bytes)
            {
                out.segments.extend(open.take().map(|o| o.close(cf)));
            }
            let o = open.get_or_insert_with(|| OpenSegment::starting(k));
            o.add(k, v);
            if o.rows >= per_segment || o.bytes >= segment_bytes {
                out.segments.extend(open.take().map(|o| o.close(cf)));
            }
            Ok(())
        })?;
        out.segments.extend(open.map(|o| o.close(cf)));
    }
    Ok(out)
}

/// A segment of an offer being filled.
struct OpenSegment {
    first_key: Vec<u8>,
    last_key: Vec<u8>,
    hash: Sha256,
    rows: u64,
    bytes: u64,
}

impl OpenSegment {
    fn starting(first_key: &[u8]) -> OpenSegment {
        OpenSegment {
            first_key: first_key.to_vec(),
            last_key: Vec::new(),
            hash: Sha256::new(),
            rows: 0,
            bytes: 0,
        }
    }

    fn add(&mut self, k: &[u8], v: &[u8]) {
        row_hash(&mut self.hash, k, v);
        self.last_key.clear();
        self.last_key.extend_from_slice(k);
        self.rows += 1;
        self.bytes += (k.len() + v.len()) as u64;
    }

    fn close(self, cf: Cf) -> Segment {
        Segment {
            cf,
            first_key: self.first_key,
            last_key: self.last_key,
            digest: self.hash.finalize().into(),
        }
    }
}

/// Why `offer` cannot be an offer of `pg` as [`offer`] makes them (keys
/// of another PG, a segment ending before it starts, segments out of
/// order or overlapping): walking it would leave rows unreplaced.
pub fn check_offer(pg: PgId, offer: &[Segment]) -> std::result::Result<(), String> {
    let prefix = keys::pg_prefix(pg);
    let order = |cf: Cf| PG_RANGES.iter().position(|c| *c == cf);
    let mut previous: Option<&Segment> = None;
    for (i, seg) in offer.iter().enumerate() {
        if order(seg.cf).is_none() {
            return Err(format!("segment {i} is in column family {}", seg.cf.name()));
        }
        if !seg.first_key.starts_with(&prefix) || !seg.last_key.starts_with(&prefix) {
            return Err(format!(
                "segment {i} has keys outside protection group {pg}"
            ));
        }
        if seg.first_key > seg.last_key {
            return Err(format!("segment {i} ends before it starts"));
        }
        if let Some(p) = previous {
            let in_order = match order(p.cf).cmp(&order(seg.cf)) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Equal => p.last_key < seg.first_key,
                std::cmp::Ordering::Greater => false,
            };
            if !in_order {
                return Err(format!(
                    "segment {i} is out of order or overlaps the one before"
                ));
            }
        }
        previous = Some(seg);
    }
    Ok(())
}

/// Walks `offer` over `view`'s rows of `pg`, calling `emit` with what the
/// receiver must do to hold exactly those rows. Reads a changed segment
/// twice (once to compare, once to send) so that memory stays one row.
pub fn delta(
    view: &ReadView<'_>,
    pg: PgId,
    offer: &[Segment],
    mut emit: impl FnMut(DeltaOp) -> Result<()>,
) -> Result<DeltaStats> {
    let mut stats = DeltaStats::default();
    let mut send_range =
        |cf: Cf, from: Option<&[u8]>, to: Option<&[u8]>, stats: &mut DeltaStats| -> Result<()> {
            stats.replaced += 1;
            emit(DeltaOp::Replace {
                cf,
                from: from.map(<[u8]>::to_vec),
                to: to.map(<[u8]>::to_vec),
            })?;
            let (lo, hi) = bounds(pg, from, to);
            let (rows, bytes) = (stats.rows_sent, stats.bytes_sent);
            view.for_each_in(cf, &lo, &hi, |k, v| {
                stats.rows_sent += 1;
                stats.bytes_sent += (k.len() + v.len()) as u64;
                emit(DeltaOp::Put {
                    cf,
                    key: k.to_vec(),
                    value: v.to_vec(),
                })
            })?;
            tracing::debug!(
                pg = pg.0,
                cf = cf.name(),
                from = %hex(&lo),
                rows = stats.rows_sent - rows,
                bytes = stats.bytes_sent - bytes,
                "resync: replaced a range"
            );
            Ok(())
        };
    for cf in PG_RANGES {
        // Where the receiver's next gap starts (the PG's first key: None).
        let mut gap_from: Option<Vec<u8>> = None;
        for seg in offer.iter().filter(|s| s.cf == cf) {
            stats.segments += 1;
            let (lo, hi) = bounds(pg, gap_from.as_deref(), Some(&seg.first_key));
            if lo < hi && view.any_in(cf, &lo, &hi)? {
                send_range(cf, gap_from.as_deref(), Some(&seg.first_key), &mut stats)?;
            }
            let end = after(&seg.last_key);
            let mut hash = Sha256::new();
            view.for_each_in(cf, &seg.first_key, &end, |k, v| {
                row_hash(&mut hash, k, v);
                Ok(())
            })?;
            if <[u8; 32]>::from(hash.finalize()) != seg.digest {
                send_range(cf, Some(&seg.first_key), Some(&end), &mut stats)?;
            }
            gap_from = Some(end);
        }
        let (lo, hi) = bounds(pg, gap_from.as_deref(), None);
        if view.any_in(cf, &lo, &hi)? {
            send_range(cf, gap_from.as_deref(), None, &mut stats)?;
        }
    }
    Ok(stats)
}

/// Applies a delta's steps to this node's replica of `pg` in batches,
/// checking that every key is the PG's and every row lies in the range
/// replaced before it.
pub struct DeltaWriter {
    db: Db,
    pg: PgId,
    batch: Batch,
    /// The range the last `Replace` opened, as `[from, to)`.
    open: Option<(Cf, Vec<u8>, Vec<u8>)>,
}

/// Write a batch once it holds about this much.
const BATCH_BYTES: usize = 8 << 20;

impl DeltaWriter {
    pub fn new(db: Db, pg: PgId) -> DeltaWriter {
        let batch = db.new_batch();
        DeltaWriter {
            db,
            pg,
            batch,
            open: None,
        }
    }

    fn refuse(&self, reason: impl Into<String>) -> Error {
        Error::CorruptRecord {
            cf: "resync",
            key: format!("pg {}", self.pg),
            reason: reason.into(),
        }
    }

    pub fn apply(&mut self, op: DeltaOp) -> Result<()> {
        let prefix = keys::pg_prefix(self.pg);
        match op {
            DeltaOp::Replace { cf, from, to } => {
                if [&from, &to]
                    .into_iter()
                    .flatten()
                    .any(|k| !k.starts_with(&prefix))
                {
                    return Err(self.refuse("a replaced range outside the protection group"));
                }
                let (from, to) = bounds(self.pg, from.as_deref(), to.as_deref());
                self.batch.delete_range(cf, &from, &to);
                self.open = Some((cf, from, to));
            }
            DeltaOp::Put { cf, key, value } => {
                let inside = self.open.as_ref().is_some_and(|(c, from, to)| {
                    *c == cf && key.as_slice() >= from.as_slice() && key.as_slice() < to.as_slice()
                });
                if !inside {
                    return Err(self.refuse("a row outside the range replaced before it"));
                }
                self.batch.put(cf, &key, &value);
            }
        }
        if self.batch.size_bytes() >= BATCH_BYTES {
            let full = std::mem::replace(&mut self.batch, self.db.new_batch());
            self.db.write(full, Durability::Buffered)?;
        }
        Ok(())
    }

    /// Commits what is left with `finish` (the caller's Raft state) and
    /// the removal of the resync marker, in one synced batch.
    pub fn finish(mut self, finish: impl FnOnce(&mut Batch) -> Result<()>) -> Result<()> {
        finish(&mut self.batch)?;
        self.batch.delete(
            Cf::RaftState,
            &keys::raft_state_key(self.pg, RaftStateKind::ResyncBase),
        );
        self.db.write(self.batch, Durability::Sync)
    }
}

/// Keeps this node's data of `pg` as the base of a delta resync: deletes
/// its Raft log and Raft state (the local member record with them) and
/// marks the PG, in one synced batch. The member must be stopped.
pub fn keep_as_base(db: &Db, pg: PgId, old_generation: u64) -> Result<()> {
    let prefix = keys::pg_prefix(pg);
    let end = prefix_successor(&prefix).expect("a PG prefix has a successor");
    let mut batch = db.new_batch();
    batch.delete_range(Cf::RaftLog, &prefix, &end);
    batch.delete_range(Cf::RaftState, &prefix, &end);
    batch.put(
        Cf::RaftState,
        &keys::raft_state_key(pg, RaftStateKind::ResyncBase),
        &old_generation.to_be_bytes(),
    );
    db.write(batch, Durability::Sync)
}

/// The generation of the old member whose data this node keeps as the
/// base of a resync of `pg`, if any.
pub fn base_of(db: &Db, pg: PgId) -> Result<Option<u64>> {
    Ok(db
        .get(
            Cf::RaftState,
            &keys::raft_state_key(pg, RaftStateKind::ResyncBase),
        )?
        .and_then(|v| Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))))
}

/// Every PG whose data this node keeps as the base of a resync, whether
/// or not the catalog still has the PG (one read of the Raft state rows,
/// a few per PG).
pub fn bases(db: &Db) -> Result<Vec<PgId>> {
    let kind = RaftStateKind::ResyncBase as u8;
    let mut out = Vec::new();
    db.read_view()
        .for_each_with_prefix(Cf::RaftState, &[], |k, _| {
            if k.len() == keys::RAFT_STATE_KEY_BYTES && k[8] == kind {
                out.push(PgId(u64::from_be_bytes(
                    k[..8].try_into().expect("8 bytes"),
                )));
            }
            Ok(())
        })?;
    Ok(out)
}

#[cfg(test)]
#[path = "resync_test.rs"]
mod tests;
