//! Applying the PG's history: the timeline every stamped entry extends, and
//! the snapshots that pin restore points (layout in
//! `lifeboat_store::history`).
//!
//! Locks are judged at the entry's stamp, never at a replica's clock, so
//! every replica refuses the same deletes.

use std::io;

use lifeboat_proto::raft as pb;
use lifeboat_store::LogIndex;
use lifeboat_store::history::{self, History, ScheduleRecord, SnapshotRecord};

use super::{ApplyContext, Outcome};
use crate::types::{Applied, Rejection};

/// Longest snapshot name apply accepts (nodes validate names before they
/// propose; this bounds what a malformed entry can store).
const SNAPSHOT_NAME_BYTES_MAX: usize = 128;

impl ApplyContext<'_> {
    /// Extends the timeline with an entry stamped `stamp_ms` at `index`.
    /// Buckets only move forward, so an entry stamped behind the newest
    /// bucket (a new leader's clock behind the old one's) joins it.
    pub(super) fn note_stamp(&mut self, index: LogIndex, stamp_ms: u64) -> io::Result<()> {
        let newest = match self.timeline_newest {
            Some(newest) => newest,
            None => History::new(self.db.clone())
                .last_bucket(self.pg)
                .map_err(io::Error::other)?
                .map(|(bucket, _)| bucket),
        };
        let bucket = history::timeline_bucket(stamp_ms);
        if newest.is_none_or(|n| bucket > n) {
            history::stage_timeline(&mut self.batch, self.pg, bucket, index);
            self.timeline_newest = Some(Some(bucket));
        } else {
            self.timeline_newest = Some(newest);
        }
        Ok(())
    }

    fn snapshot(&self, name: &str) -> io::Result<Option<SnapshotRecord>> {
        if let Some(staged) = self.snapshot_overlay.get(name) {
            return Ok(staged.clone());
        }
        History::new(self.db.clone())
            .snapshot(self.pg, name)
            .map_err(io::Error::other)
    }

    fn put_snapshot(&mut self, name: &str, record: SnapshotRecord) {
        history::stage_snapshot(&mut self.batch, self.pg, name, &record);
        self.snapshot_overlay.insert(name.to_owned(), Some(record));
    }

    pub(super) fn apply_create_snapshot(
        &mut self,
        index: LogIndex,
        c: &pb::CreateSnapshot,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        if c.name.is_empty() || c.name.len() > SNAPSHOT_NAME_BYTES_MAX {
            return Ok(Err(Rejection::Malformed {
                reason: format!("snapshot name of {} bytes", c.name.len()),
            }));
        }
        if self.snapshot(&c.name)?.is_some() {
            return Ok(Err(Rejection::SnapshotExists {
                name: c.name.clone(),
            }));
        }
        // No version is reclaimed yet (the history GC is to come), so every
        // index from the first is still whole.
        let (pinned, at_ms) = match c.at_index {
            None => (index, stamp_ms),
            Some(at) if (1..=index.0).contains(&at) => (LogIndex(at), c.at_ms),
            Some(at) => {
                return Ok(Err(Rejection::IndexOutOfHistory {
                    index: at,
                    oldest: 1,
                    newest: index.0,
                }));
            }
        };
        self.put_snapshot(
            &c.name,
            SnapshotRecord {
                index: pinned,
                at_ms,
                created_ms: stamp_ms,
                locked_until_ms: c.locked_until_ms,
            },
        );
        Ok(Ok(Applied::SnapshotCreated { index: pinned.0 }))
    }

    pub(super) fn apply_delete_snapshot(
        &mut self,
        d: &pb::DeleteSnapshot,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(record) = self.snapshot(&d.name)? else {
            return Ok(Err(Rejection::SnapshotNotFound {
                name: d.name.clone(),
            }));
        };
        let locked = record.is_locked_at(stamp_ms);
        if locked && !d.operator {
            return Ok(Err(Rejection::SnapshotLocked {
                name: d.name.clone(),
                until_ms: record.locked_until_ms,
            }));
        }
        history::stage_snapshot_removal(&mut self.batch, self.pg, &d.name);
        self.snapshot_overlay.insert(d.name.clone(), None);
        Ok(Ok(Applied::SnapshotChanged {
            lock_overridden: locked,
        }))
    }

    pub(super) fn apply_lock_snapshot(
        &mut self,
        l: &pb::LockSnapshot,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(mut record) = self.snapshot(&l.name)? else {
            return Ok(Err(Rejection::SnapshotNotFound {
                name: l.name.clone(),
            }));
        };
        let overrides = l.until_ms < record.locked_until_ms && record.is_locked_at(stamp_ms);
        if overrides && !l.operator {
            return Ok(Err(Rejection::SnapshotLocked {
                name: l.name.clone(),
                until_ms: record.locked_until_ms,
            }));
        }
        record.locked_until_ms = l.until_ms;
        self.put_snapshot(&l.name, record);
        Ok(Ok(Applied::SnapshotChanged {
            lock_overridden: overrides,
        }))
    }

    pub(super) fn apply_set_schedule(&mut self, s: &pb::SetSchedule) -> io::Result<Outcome> {
        let record = (s.interval_ms > 0).then_some(ScheduleRecord {
            interval_ms: s.interval_ms,
            keep_last: s.keep_last,
            keep_hourly: s.keep_hourly,
            keep_daily: s.keep_daily,
            keep_weekly: s.keep_weekly,
            keep_monthly: s.keep_monthly,
        });
        history::stage_schedule(&mut self.batch, self.pg, record.as_ref());
        Ok(Ok(Applied::Done))
    }
}
