//! A protection group's history: the timeline (wall-clock time to log
//! index) and named snapshots (pins of one index for every volume and
//! bucket of the PG).
//!
//! Both are written only by apply, from the PG's own log, so every replica
//! maps a time to the same index and keeps the same snapshots.
//!
//! Timeline: entry stamps are in milliseconds since the Unix epoch; time is
//! cut into [`TIMELINE_BUCKET_MS`] buckets, and the row of a bucket holds
//! the first index stamped in it. Buckets only go forward: an entry stamped
//! before the newest bucket (a new leader whose clock is behind) counts as
//! stamped in that bucket. "The state at time T" is every entry stamped in a
//! bucket up to T's: one seek to the first bucket after T's.

use crate::db::{Batch, Cf, Db};
use crate::error::{Error, Result};
use crate::keys::{self, MetaKind};
use crate::{LogIndex, PgId};

/// Resolution of the timeline, in milliseconds.
pub const TIMELINE_BUCKET_MS: u64 = 10;

/// The timeline bucket of a stamp.
pub fn timeline_bucket(stamp_ms: u64) -> u64 {
    stamp_ms / TIMELINE_BUCKET_MS
}

/// Records that `first_index` is the first entry stamped in `bucket`.
pub fn stage_timeline(batch: &mut Batch, pg: PgId, bucket: u64, first_index: LogIndex) {
    batch.put(
        Cf::Timeline,
        &keys::timeline_key(pg, bucket),
        &first_index.0.to_be_bytes(),
    );
}

/// Where a wall-clock time falls in a PG's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeIndex {
    /// Before the first entry this replica knows: `oldest_ms` is the oldest
    /// time it can resolve.
    BeforeHistory { oldest_ms: u64 },
    /// The state at that time is the state at this index.
    At(LogIndex),
    /// No entry is stamped after that time: the state then is the newest
    /// state (everything this replica has applied).
    Latest,
}

/// A named snapshot: the PG's state at `index`, kept until deleted (and
/// never deleted before `locked_until_ms` but by an operator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub index: LogIndex,
    /// The moment it stands for, ms since the epoch: the creating entry's
    /// stamp, or the time it was asked for (`--at`).
    pub at_ms: u64,
    /// Stamp of the entry that created it.
    pub created_ms: u64,
    /// 0: not locked.
    pub locked_until_ms: u64,
}

const SNAPSHOT_RECORD_VERSION: u8 = 1;
const SNAPSHOT_RECORD_BYTES: usize = 1 + 8 + 8 + 8 + 8;

impl SnapshotRecord {
    /// `version u8 | index u64 | at_ms u64 | created_ms u64 |
    /// locked_until_ms u64`, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_RECORD_BYTES);
        out.push(SNAPSHOT_RECORD_VERSION);
        out.extend_from_slice(&self.index.0.to_be_bytes());
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.locked_until_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<SnapshotRecord, String> {
        if bytes.len() != SNAPSHOT_RECORD_BYTES {
            return Err(format!("snapshot record of {} bytes", bytes.len()));
        }
        if bytes[0] != SNAPSHOT_RECORD_VERSION {
            return Err(format!("unknown snapshot record version {}", bytes[0]));
        }
        let word = |i: usize| u64::from_be_bytes(bytes[1 + 8 * i..9 + 8 * i].try_into().unwrap());
        Ok(SnapshotRecord {
            index: LogIndex(word(0)),
            at_ms: word(1),
            created_ms: word(2),
            locked_until_ms: word(3),
        })
    }

    /// Whether the lock still holds at `now_ms`.
    pub fn is_locked_at(&self, now_ms: u64) -> bool {
        now_ms < self.locked_until_ms
    }
}

pub fn stage_snapshot(batch: &mut Batch, pg: PgId, name: &str, record: &SnapshotRecord) {
    batch.put(Cf::PgMeta, &keys::snapshot_key(pg, name), &record.encode());
}

pub fn stage_snapshot_removal(batch: &mut Batch, pg: PgId, name: &str) {
    batch.delete(Cf::PgMeta, &keys::snapshot_key(pg, name));
}

/// A PG's snapshot schedule: a snapshot every `interval_ms`, and which of
/// the scheduled ones to keep (restic-style counts; see
/// `lifeboat_snapshot::Retention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScheduleRecord {
    pub interval_ms: u64,
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

const SCHEDULE_RECORD_VERSION: u8 = 1;
const SCHEDULE_RECORD_BYTES: usize = 1 + 8 + 5 * 4;

impl ScheduleRecord {
    /// `version u8 | interval_ms u64 | last, hourly, daily, weekly,
    /// monthly u32`, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SCHEDULE_RECORD_BYTES);
        out.push(SCHEDULE_RECORD_VERSION);
        out.extend_from_slice(&self.interval_ms.to_be_bytes());
        for n in [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<ScheduleRecord, String> {
        if bytes.len() != SCHEDULE_RECORD_BYTES || bytes[0] != SCHEDULE_RECORD_VERSION {
            return Err(format!("schedule record of {} bytes", bytes.len()));
        }
        let n = |i: usize| u32::from_be_bytes(bytes[9 + 4 * i..13 + 4 * i].try_into().unwrap());
        Ok(ScheduleRecord {
            interval_ms: u64::from_be_bytes(bytes[1..9].try_into().unwrap()),
            keep_last: n(0),
            keep_hourly: n(1),
            keep_daily: n(2),
            keep_weekly: n(3),
            keep_monthly: n(4),
        })
    }
}

/// Sets the PG's schedule; `None` removes it.
pub fn stage_schedule(batch: &mut Batch, pg: PgId, schedule: Option<&ScheduleRecord>) {
    let key = keys::pg_meta_kind_prefix(pg, MetaKind::Schedule);
    match schedule {
        Some(s) => batch.put(Cf::PgMeta, &key, &s.encode()),
        None => batch.delete(Cf::PgMeta, &key),
    }
}

/// Reads of the timeline and of snapshots.
#[derive(Clone, Debug)]
pub struct History {
    db: Db,
}

fn decode_timeline_row(key: &[u8], value: &[u8]) -> Result<(u64, LogIndex)> {
    let bucket = keys::decode_timeline_key(key)
        .ok_or_else(|| Error::corrupt_record(Cf::Timeline.name(), key, "malformed key"))?;
    let index: [u8; 8] = value.try_into().map_err(|_| {
        Error::corrupt_record(Cf::Timeline.name(), key, "first index is not 8 bytes")
    })?;
    Ok((bucket, LogIndex(u64::from_be_bytes(index))))
}

impl History {
    pub fn new(db: Db) -> History {
        History { db }
    }

    /// The newest timeline row of a PG: (bucket, first index in it).
    pub fn last_bucket(&self, pg: PgId) -> Result<Option<(u64, LogIndex)>> {
        self.db
            .last_with_prefix(Cf::Timeline, &keys::pg_prefix(pg))?
            .map(|(k, v)| decode_timeline_row(&k, &v))
            .transpose()
    }

    /// The oldest timeline row of a PG: (bucket, first index in it).
    pub fn first_bucket(&self, pg: PgId) -> Result<Option<(u64, LogIndex)>> {
        let prefix = keys::pg_prefix(pg);
        self.db
            .seek(Cf::Timeline, &prefix, &prefix)?
            .map(|(k, v)| decode_timeline_row(&k, &v))
            .transpose()
    }

    /// Oldest time of the PG's history this replica holds, in ms since the
    /// epoch (`None`: no stamped entry yet).
    pub fn oldest_ms(&self, pg: PgId) -> Result<Option<u64>> {
        Ok(self
            .first_bucket(pg)?
            .map(|(bucket, _)| bucket * TIMELINE_BUCKET_MS))
    }

    /// Where `unix_ms` falls in the PG's history: one seek.
    pub fn index_at(&self, pg: PgId, unix_ms: u64) -> Result<TimeIndex> {
        let bucket = timeline_bucket(unix_ms);
        let Some((first_bucket, _)) = self.first_bucket(pg)? else {
            return Ok(TimeIndex::BeforeHistory {
                oldest_ms: u64::MAX,
            });
        };
        if bucket < first_bucket {
            return Ok(TimeIndex::BeforeHistory {
                oldest_ms: first_bucket * TIMELINE_BUCKET_MS,
            });
        }
        let prefix = keys::pg_prefix(pg);
        let after = keys::timeline_key(pg, bucket.saturating_add(1));
        match self.db.seek(Cf::Timeline, &prefix, &after)? {
            // The first entry after that time is never index 0 (entry 0
            // does not exist), and the first bucket is at or before it.
            Some((k, v)) => {
                let (_, first_after) = decode_timeline_row(&k, &v)?;
                Ok(TimeIndex::At(LogIndex(first_after.0 - 1)))
            }
            None => Ok(TimeIndex::Latest),
        }
    }

    pub fn snapshot(&self, pg: PgId, name: &str) -> Result<Option<SnapshotRecord>> {
        let key = keys::snapshot_key(pg, name);
        self.db
            .get(Cf::PgMeta, &key)?
            .map(|v| {
                SnapshotRecord::decode(&v)
                    .map_err(|reason| Error::corrupt_record(Cf::PgMeta.name(), &key, reason))
            })
            .transpose()
    }

    /// The PG's snapshot schedule, if it has one.
    pub fn schedule(&self, pg: PgId) -> Result<Option<ScheduleRecord>> {
        let key = keys::pg_meta_kind_prefix(pg, MetaKind::Schedule);
        self.db
            .get(Cf::PgMeta, &key)?
            .map(|v| {
                ScheduleRecord::decode(&v)
                    .map_err(|reason| Error::corrupt_record(Cf::PgMeta.name(), &key, reason))
            })
            .transpose()
    }

    /// Every snapshot of the PG, by name.
    pub fn snapshots(&self, pg: PgId) -> Result<Vec<(String, SnapshotRecord)>> {
        let prefix = keys::pg_meta_kind_prefix(pg, MetaKind::Snapshot);
        self.db
            .scan(Cf::PgMeta, &prefix, &prefix, usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let name = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| {
                    Error::corrupt_record(Cf::PgMeta.name(), &k, "snapshot name is not UTF-8")
                })?;
                let record = SnapshotRecord::decode(&v)
                    .map_err(|reason| Error::corrupt_record(Cf::PgMeta.name(), &k, reason))?;
                Ok((name.to_owned(), record))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DbOptions, Durability};

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        (dir, db)
    }

    #[test]
    fn times_resolve_to_the_last_index_stamped_at_or_before_them() {
        let (_dir, db) = open();
        let pg = PgId(7);
        let mut batch = db.new_batch();
        // Entries 5..=9 in bucket 100 (1000..1009 ms), 10..=14 in bucket 103.
        stage_timeline(&mut batch, pg, 100, LogIndex(5));
        stage_timeline(&mut batch, pg, 103, LogIndex(10));
        // Another PG's rows never leak in.
        stage_timeline(&mut batch, PgId(8), 101, LogIndex(1));
        stage_timeline(&mut batch, PgId(6), 200, LogIndex(1));
        db.write(batch, Durability::Sync).unwrap();
        let h = History::new(db);
        assert_eq!(
            h.index_at(pg, 999).unwrap(),
            TimeIndex::BeforeHistory { oldest_ms: 1000 }
        );
        assert_eq!(h.index_at(pg, 1000).unwrap(), TimeIndex::At(LogIndex(9)));
        assert_eq!(h.index_at(pg, 1025).unwrap(), TimeIndex::At(LogIndex(9)));
        assert_eq!(h.index_at(pg, 1029).unwrap(), TimeIndex::At(LogIndex(9)));
        assert_eq!(h.index_at(pg, 1030).unwrap(), TimeIndex::Latest);
        assert_eq!(h.index_at(pg, u64::MAX).unwrap(), TimeIndex::Latest);
        assert_eq!(h.oldest_ms(pg).unwrap(), Some(1000));
        assert_eq!(h.last_bucket(pg).unwrap(), Some((103, LogIndex(10))));
        assert_eq!(
            h.index_at(PgId(9), 5).unwrap(),
            TimeIndex::BeforeHistory {
                oldest_ms: u64::MAX
            }
        );
    }

    #[test]
    fn snapshots_round_trip_list_by_name_and_stay_in_their_pg() {
        let (_dir, db) = open();
        let rec = |i| SnapshotRecord {
            index: LogIndex(i),
            at_ms: 1_600_000_000_000 + i,
            created_ms: 1_700_000_000_000 + i,
            locked_until_ms: if i == 2 { 1_800_000_000_000 } else { 0 },
        };
        let mut batch = db.new_batch();
        stage_snapshot(&mut batch, PgId(3), "nightly", &rec(1));
        stage_snapshot(&mut batch, PgId(3), "before-migration", &rec(2));
        stage_snapshot(&mut batch, PgId(4), "other", &rec(3));
        db.write(batch, Durability::Sync).unwrap();
        let h = History::new(db.clone());
        assert_eq!(
            h.snapshots(PgId(3)).unwrap(),
            vec![
                ("before-migration".to_owned(), rec(2)),
                ("nightly".to_owned(), rec(1))
            ]
        );
        assert_eq!(h.snapshot(PgId(3), "other").unwrap(), None);
        assert!(rec(2).is_locked_at(1_799_999_999_999));
        assert!(!rec(2).is_locked_at(1_800_000_000_000));
        assert!(!rec(1).is_locked_at(0));
        let mut batch = db.new_batch();
        stage_snapshot_removal(&mut batch, PgId(3), "nightly");
        db.write(batch, Durability::Sync).unwrap();
        assert_eq!(h.snapshots(PgId(3)).unwrap().len(), 1);
        assert!(SnapshotRecord::decode(&[1, 2, 3]).is_err());
        // The schedule row sits beside the snapshots and is not one.
        let schedule = ScheduleRecord {
            interval_ms: 3_600_000,
            keep_last: 3,
            keep_daily: 7,
            ..Default::default()
        };
        let mut batch = db.new_batch();
        stage_schedule(&mut batch, PgId(3), Some(&schedule));
        db.write(batch, Durability::Sync).unwrap();
        assert_eq!(h.schedule(PgId(3)).unwrap(), Some(schedule));
        assert_eq!(h.schedule(PgId(4)).unwrap(), None);
        assert_eq!(h.snapshots(PgId(3)).unwrap().len(), 1);
        assert!(ScheduleRecord::decode(&schedule.encode()[1..]).is_err());
        let mut bad = rec(1).encode();
        bad[0] = 9;
        assert!(SnapshotRecord::decode(&bad).is_err());
    }
}
