//! Rollback masks: restore in place without copying anything.
//!
//! A restore of a PG to index T, applied at index R, writes one mask: "for
//! reads at R or later, the versions in (T, R) of these volumes and buckets
//! are hidden". What a masked volume or bucket shows at a read point I ≥ R
//! is then: its own versions above R, and below them whatever it showed at
//! T — itself worked out with only the masks written at or before T. An
//! undo is one more mask, back to the index just before the one it undoes,
//! so every restore and undo stays in the history and can be undone again.
//!
//! A read is therefore a short list of [`Span`]s, newest first: look for a
//! version in the first span (at or below its `at`, above its `above`); if
//! there is none, the next span decides. A PG without masks reads one span
//! that is its plain latest (or past) state.
//!
//! Masks are rows of the PG (`pg_meta`, kind [`MetaKind::Mask`], keyed by
//! the index that wrote them, newest first), written only by apply, so
//! every replica masks the same versions. They never delete anything: the
//! masked versions stay in the history (and in every restore point before
//! R) until the history's GC.

use crate::db::{Batch, Cf, Db};
use crate::error::{Error, Result};
use crate::keys::{self, MetaKind};
use crate::{BucketId, LogIndex, PgId, VolumeId};

/// One restore (or undo of one) of a PG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackMask {
    /// R: the entry that wrote the mask. It applies to reads at R or later.
    pub index: LogIndex,
    /// T: versions in (T, R) are hidden; below them, reads see the state
    /// at T.
    pub to: LogIndex,
    /// The moment T stands for, ms since the epoch (what the operator asked
    /// for, or the snapshot's time).
    pub to_ms: u64,
    /// Stamp of the entry that wrote it.
    pub created_ms: u64,
    /// For an undo: the index of the mask it undoes.
    pub undoes: Option<LogIndex>,
    /// The volumes and buckets it covers (those that existed at T), sorted.
    pub volumes: Vec<VolumeId>,
    pub buckets: Vec<BucketId>,
}

const MASK_RECORD_VERSION: u8 = 1;
const MASK_HEADER_BYTES: usize = 1 + 8 * 4 + 4 + 4;

impl RollbackMask {
    /// `version u8 | to u64 | to_ms u64 | created_ms u64 | undoes u64
    /// (0: none) | volume count u32 | bucket count u32 | volume ids u64... |
    /// bucket ids u64...`, big-endian. The index is the row's key.
    pub fn encode(&self) -> Vec<u8> {
        let ids = self.volumes.len() + self.buckets.len();
        let mut out = Vec::with_capacity(MASK_HEADER_BYTES + 8 * ids);
        out.push(MASK_RECORD_VERSION);
        for word in [
            self.to.0,
            self.to_ms,
            self.created_ms,
            self.undoes.map_or(0, |i| i.0),
        ] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(&(self.volumes.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.buckets.len() as u32).to_be_bytes());
        for id in self
            .volumes
            .iter()
            .map(|v| v.0)
            .chain(self.buckets.iter().map(|b| b.0))
        {
            out.extend_from_slice(&id.to_be_bytes());
        }
        out
    }

    pub fn decode(index: LogIndex, bytes: &[u8]) -> std::result::Result<RollbackMask, String> {
        if bytes.len() < MASK_HEADER_BYTES {
            return Err(format!("mask record of {} bytes is too short", bytes.len()));
        }
        if bytes[0] != MASK_RECORD_VERSION {
            return Err(format!("unknown mask record version {}", bytes[0]));
        }
        let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let count =
            |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let (volumes, buckets) = (count(33), count(37));
        if bytes.len() != MASK_HEADER_BYTES + 8 * (volumes + buckets) {
            return Err(format!(
                "mask record of {} bytes does not hold {volumes} volumes and {buckets} buckets",
                bytes.len()
            ));
        }
        let id = |i: usize| word(MASK_HEADER_BYTES + 8 * i);
        let to = LogIndex(word(1));
        if to >= index {
            return Err(format!("mask at {index} restores to {to}, not before it"));
        }
        Ok(RollbackMask {
            index,
            to,
            to_ms: word(9),
            created_ms: word(17),
            undoes: Some(word(25)).filter(|i| *i != 0).map(LogIndex),
            volumes: (0..volumes).map(|i| VolumeId(id(i))).collect(),
            buckets: (volumes..volumes + buckets)
                .map(|i| BucketId(id(i)))
                .collect(),
        })
    }

    pub fn covers_volume(&self, volume: VolumeId) -> bool {
        self.volumes.binary_search(&volume).is_ok()
    }

    pub fn covers_bucket(&self, bucket: BucketId) -> bool {
        self.buckets.binary_search(&bucket).is_ok()
    }
}

/// Stages a mask (its lists sorted first).
pub fn stage_mask(batch: &mut Batch, pg: PgId, mask: &RollbackMask) {
    let mut mask = mask.clone();
    mask.volumes.sort_unstable();
    mask.buckets.sort_unstable();
    batch.put(
        Cf::PgMeta,
        &keys::pg_meta_key(pg, MetaKind::Mask, 0, mask.index),
        &mask.encode(),
    );
}

/// Every mask of a PG, newest first. Masks are few (one per restore), so
/// this is one short scan; a PG that was never restored costs one seek.
pub fn masks(db: &Db, pg: PgId) -> Result<Vec<RollbackMask>> {
    let prefix = keys::pg_meta_prefix(pg, MetaKind::Mask, 0);
    db.scan(Cf::PgMeta, &prefix, &prefix, usize::MAX)?
        .into_iter()
        .map(|(k, v)| decode_row(&k, &v))
        .collect()
}

/// The index of the PG's newest mask: one seek. Reads that cache what a
/// volume shows check it to notice a restore.
pub fn newest_mask(db: &Db, pg: PgId) -> Result<Option<LogIndex>> {
    let prefix = keys::pg_meta_prefix(pg, MetaKind::Mask, 0);
    Ok(db
        .seek(Cf::PgMeta, &prefix, &prefix)?
        .map(|(k, v)| decode_row(&k, &v))
        .transpose()?
        .map(|m| m.index))
}

fn decode_row(key: &[u8], value: &[u8]) -> Result<RollbackMask> {
    let (_, index) = keys::decode_pg_meta_key(key)
        .ok_or_else(|| Error::corrupt_record(Cf::PgMeta.name(), key, "malformed mask key"))?;
    RollbackMask::decode(index, value)
        .map_err(|reason| Error::corrupt_record(Cf::PgMeta.name(), key, reason))
}

/// A range of one volume's or bucket's versions that a read may see: at or
/// below `at` (`None`: the newest) and above `above` (`None`: all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub at: Option<LogIndex>,
    pub above: Option<LogIndex>,
}

impl Span {
    /// Everything up to `at`: what a read sees without masks.
    pub fn plain(at: Option<LogIndex>) -> Span {
        Span { at, above: None }
    }

    /// Whether a version (or an event, such as a removal) at `index` lies
    /// in the span.
    pub fn holds(&self, index: LogIndex) -> bool {
        self.above.is_none_or(|a| index > a) && self.at.is_none_or(|at| index <= at)
    }
}

/// The spans a read at `at` (`None`: the newest) of one volume or bucket
/// goes through, newest first, given the PG's masks (newest first) and
/// which of them cover it.
pub fn spans(
    masks: &[RollbackMask],
    covers: impl Fn(&RollbackMask) -> bool,
    at: Option<LogIndex>,
) -> Vec<Span> {
    let mut out = Vec::new();
    let mut point = at;
    loop {
        let limit = point.unwrap_or(LogIndex(u64::MAX));
        match masks.iter().find(|m| m.index <= limit && covers(m)) {
            Some(m) => {
                out.push(Span {
                    at: point,
                    above: Some(m.index),
                });
                // Each step goes strictly back (T < R), so this ends.
                point = Some(m.to);
            }
            None => {
                out.push(Span::plain(point));
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DbOptions, Durability};

    fn mask(index: u64, to: u64, volumes: &[u64]) -> RollbackMask {
        RollbackMask {
            index: LogIndex(index),
            to: LogIndex(to),
            to_ms: 1_000 + to,
            created_ms: 1_000 + index,
            undoes: None,
            volumes: volumes.iter().map(|v| VolumeId(*v)).collect(),
            buckets: vec![BucketId(40)],
        }
    }

    #[test]
    fn masks_round_trip_newest_first_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(3);
        assert_eq!(newest_mask(&db, pg).unwrap(), None);
        let mut b = db.new_batch();
        let mut undo = mask(20, 14, &[9, 7]);
        undo.undoes = Some(LogIndex(15));
        stage_mask(&mut b, pg, &mask(15, 10, &[7]));
        stage_mask(&mut b, pg, &undo);
        stage_mask(&mut b, PgId(4), &mask(30, 1, &[7]));
        db.write(b, Durability::Buffered).unwrap();
        let found = masks(&db, pg).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].index, LogIndex(20));
        assert_eq!(found[0].undoes, Some(LogIndex(15)));
        assert_eq!(found[0].volumes, vec![VolumeId(7), VolumeId(9)], "sorted");
        assert!(found[0].covers_volume(VolumeId(9)) && !found[1].covers_volume(VolumeId(9)));
        assert!(found[1].covers_bucket(BucketId(40)));
        assert_eq!(found[1], mask(15, 10, &[7]));
        assert_eq!(newest_mask(&db, pg).unwrap(), Some(LogIndex(20)));

        let bytes = mask(15, 10, &[7]).encode();
        assert!(RollbackMask::decode(LogIndex(15), &bytes[..bytes.len() - 1]).is_err());
        assert!(RollbackMask::decode(LogIndex(10), &bytes).is_err(), "T < R");
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert!(RollbackMask::decode(LogIndex(15), &wrong).is_err());
    }

    #[test]
    fn spans_follow_restores_and_undos_back_in_time() {
        let covers = |m: &RollbackMask| m.covers_volume(VolumeId(7));
        let span = |at: Option<u64>, above: Option<u64>| Span {
            at: at.map(LogIndex),
            above: above.map(LogIndex),
        };
        // No masks: one plain span.
        assert_eq!(spans(&[], covers, None), vec![span(None, None)]);
        // Restored at 15 to 10: above 15, else as at 10.
        let restore = mask(15, 10, &[7]);
        assert_eq!(
            spans(std::slice::from_ref(&restore), covers, None),
            vec![span(None, Some(15)), span(Some(10), None)]
        );
        // A read before the restore does not see it.
        assert_eq!(
            spans(std::slice::from_ref(&restore), covers, Some(LogIndex(14))),
            vec![span(Some(14), None)]
        );
        // Undone at 20 (back to 14, just before the restore): above 20,
        // else as at 14, where the restore did not exist yet.
        let undo = mask(20, 14, &[7]);
        assert_eq!(
            spans(&[undo.clone(), restore.clone()], covers, None),
            vec![span(None, Some(20)), span(Some(14), None)]
        );
        // Between the restore and the undo, the restore holds.
        assert_eq!(
            spans(&[undo, restore.clone()], covers, Some(LogIndex(18))),
            vec![span(Some(18), Some(15)), span(Some(10), None)]
        );
        // A restore to a point after an earlier restore chains through it.
        let again = mask(30, 17, &[7]);
        assert_eq!(
            spans(&[again, restore], covers, None),
            vec![
                span(None, Some(30)),
                span(Some(17), Some(15)),
                span(Some(10), None)
            ]
        );
        // A mask that does not cover the volume changes nothing.
        assert_eq!(
            spans(&[mask(15, 10, &[8])], covers, None),
            vec![span(None, None)]
        );
        assert!(span(None, Some(15)).holds(LogIndex(16)));
        assert!(!span(None, Some(15)).holds(LogIndex(15)));
        assert!(!span(Some(10), None).holds(LogIndex(11)));
    }
}
