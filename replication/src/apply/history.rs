//! Applying the PG's history: the timeline every stamped entry extends, and
//! the snapshots that pin restore points (layout in
//! `lifeboat_store::history`).
//!
//! Restores in place write rollback masks (`lifeboat_store::masks`).
//!
//! Locks are judged at the entry's stamp, never at a replica's clock, so
//! every replica refuses the same deletes.

use std::io;

use lifeboat_proto::raft as pb;
use lifeboat_store::gc;
use lifeboat_store::history::{self, History, ScheduleRecord, SnapshotRecord};
use lifeboat_store::masks::{self, RollbackMask};
use lifeboat_store::objects::{BucketState, Objects};
use lifeboat_store::usage;
use lifeboat_store::volumes::{VolumeState, Volumes};
use lifeboat_store::{BucketId, LogIndex, VolumeId};

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
        // A past index must still be whole: inside the window, or pinned.
        let (pinned, at_ms) = match c.at_index {
            None => (index, stamp_ms),
            Some(at) if (1..=index.0).contains(&at) => {
                if let Some(rejection) = self.check_held(at, index)? {
                    return Ok(Err(rejection));
                }
                (LogIndex(at), c.at_ms)
            }
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

    /// Restores every volume and bucket of the PG that existed at the
    /// restore point to its state then, with one rollback mask; or undoes
    /// the newest mask. Sizes go back too (a new volume record where the
    /// size differs), so a volume grown since shows its old size. The state
    /// machine applies this entry in a batch of its own, so every entry
    /// after it reads through the mask.
    pub(super) fn apply_restore_pg(
        &mut self,
        index: LogIndex,
        r: &pb::RestorePg,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let newest = masks::masks(self.db, self.pg)
            .map_err(io::Error::other)?
            .into_iter()
            .next();
        let (to, to_ms, undoes, volumes, buckets) = if r.undo {
            let Some(last) = newest else {
                return Ok(Err(Rejection::NothingToUndo));
            };
            // The node names the restore it saw as the newest: a retried or
            // concurrent undo must not undo the undo.
            if r.to_index != 0 && r.to_index != last.index.0 - 1 {
                return Ok(Err(Rejection::RestoreChanged {
                    newest: last.index.0,
                }));
            }
            // Back to just before the mask: what reads saw then.
            let to = LogIndex(last.index.0 - 1);
            if let Some(rejection) = self.check_held(to.0, LogIndex(index.0 - 1))? {
                return Ok(Err(rejection));
            }
            (
                to,
                last.created_ms,
                Some(last.index),
                last.volumes,
                last.buckets,
            )
        } else {
            if r.to_index == 0 || r.to_index >= index.0 {
                return Ok(Err(Rejection::IndexOutOfHistory {
                    index: r.to_index,
                    oldest: 1,
                    newest: index.0 - 1,
                }));
            }
            let to = LogIndex(r.to_index);
            if let Some(rejection) = self.check_held(to.0, LogIndex(index.0 - 1))? {
                return Ok(Err(rejection));
            }
            let (volumes, buckets) = self.restorable_at(to)?;
            (to, r.to_ms, None, volumes, buckets)
        };
        // A locked snapshot taken after the restore point is not lost by a
        // restore (it still reads what it pinned), but rolling the live
        // state back past it is what a lock forbids to tenants.
        let locked = self
            .snapshots_staged()?
            .into_iter()
            .filter(|(_, s)| s.index > to && s.is_locked_at(stamp_ms))
            .max_by_key(|(_, s)| s.locked_until_ms);
        if let Some((name, snapshot)) = &locked
            && !r.operator
        {
            return Ok(Err(Rejection::SnapshotLocked {
                name: name.clone(),
                until_ms: snapshot.locked_until_ms,
            }));
        }
        let reader = Volumes::new(self.db.clone());
        for volume in &volumes {
            let then = reader
                .volume_at(self.pg, *volume, to)
                .map_err(io::Error::other)?;
            // A deleted volume keeps its record (and so the index it was
            // deleted at, which GC and undelete go by).
            if let (Some((_, then)), Some(mut now)) = (then, self.volume(*volume)?)
                && then.size_bytes != now.size_bytes
                && now.state == VolumeState::Active
            {
                now.size_bytes = then.size_bytes;
                self.put_volume(*volume, index, now);
            }
        }
        let mask = RollbackMask {
            index,
            to,
            to_ms,
            created_ms: stamp_ms,
            undoes,
            volumes,
            buckets,
        };
        masks::stage_mask(&mut self.batch, self.pg, &mask);
        Ok(Ok(Applied::Restored {
            to_index: to.0,
            volumes: mask.volumes.len() as u32,
            buckets: mask.buckets.len() as u32,
            lock_overridden: locked.is_some(),
        }))
    }

    /// The volumes and buckets a restore to `to` covers: those live then
    /// (read-only bucket clones show one moment and are left alone; a
    /// writable clone's own writes roll back over its unchanging base).
    fn restorable_at(&self, to: LogIndex) -> io::Result<(Vec<VolumeId>, Vec<BucketId>)> {
        let volumes = Volumes::new(self.db.clone());
        let mut live_volumes = Vec::new();
        for (volume, _, _) in volumes.volumes(self.pg).map_err(io::Error::other)? {
            let then = volumes
                .volume_at(self.pg, volume, to)
                .map_err(io::Error::other)?;
            if then.is_some_and(|(_, r)| r.state == VolumeState::Active) {
                live_volumes.push(volume);
            }
        }
        let objects = Objects::new(self.db.clone());
        let mut live_buckets = Vec::new();
        for (bucket, _, _) in objects.buckets(self.pg).map_err(io::Error::other)? {
            let then = objects
                .bucket_at(self.pg, bucket, to)
                .map_err(io::Error::other)?;
            if then.is_some_and(|(_, r)| r.state == BucketState::Active && !r.is_read_only()) {
                live_buckets.push(bucket);
            }
        }
        Ok((live_volumes, live_buckets))
    }

    /// What the PG keeps below its horizon (the store as written: the
    /// commands that need it run in a batch of their own, or check
    /// indexes this batch cannot have changed).
    fn retained(&self) -> io::Result<gc::Retained> {
        // Snapshots this batch made or deleted count as they are staged,
        // so the answer does not depend on where batches split.
        let snapshots = self.snapshots_staged()?;
        gc::Retained::gather_with(
            self.db,
            self.pg,
            snapshots.into_iter().map(|(_, s)| s.index),
        )
        .map_err(io::Error::other)
    }

    /// Every snapshot of the PG, this batch's changes included.
    fn snapshots_staged(&self) -> io::Result<Vec<(String, SnapshotRecord)>> {
        Ok(History::new(self.db.clone())
            .snapshots(self.pg)
            .map_err(io::Error::other)?
            .into_iter()
            .filter(|(name, _)| !self.snapshot_overlay.contains_key(name))
            .chain(
                self.snapshot_overlay
                    .iter()
                    .filter_map(|(n, r)| r.clone().map(|r| (n.clone(), r))),
            )
            .collect())
    }

    /// Refuses a restore point the history no longer holds whole.
    pub(super) fn check_held(&self, index: u64, newest: LogIndex) -> io::Result<Option<Rejection>> {
        let retained = self.retained()?;
        Ok(
            (!retained.holds(LogIndex(index))).then(|| Rejection::IndexOutOfHistory {
                index,
                oldest: retained.horizon.map_or(1, |h| h.0),
                newest: newest.0,
            }),
        )
    }

    pub(super) fn apply_set_window(&mut self, w: &pb::SetWindow) -> io::Result<Outcome> {
        if w.window_ms == 0 {
            return Ok(Err(Rejection::Malformed {
                reason: "a window of 0 ms".into(),
            }));
        }
        if w.only_if_unset && self.window()?.is_some() {
            return Ok(Ok(Applied::Done));
        }
        gc::stage_window(&mut self.batch, self.pg, w.window_ms);
        self.window_overlay = Some(w.window_ms);
        Ok(Ok(Applied::Done))
    }

    /// The PG's window as this batch leaves it so far.
    fn window(&self) -> io::Result<Option<u64>> {
        match self.window_overlay {
            Some(w) => Ok(Some(w)),
            None => gc::window(self.db, self.pg).map_err(io::Error::other),
        }
    }

    /// Moves the horizon to the state at `at_ms` on this PG's timeline:
    /// forward only, and never past the entry itself.
    pub(super) fn apply_advance_horizon(
        &mut self,
        index: LogIndex,
        a: &pb::AdvanceHorizon,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        // Never past the PG's own window, whoever proposes.
        let window_ms = self.window()?.unwrap_or(gc::DEFAULT_WINDOW_MS);
        let at_ms = a.at_ms.min(stamp_ms.saturating_sub(window_ms));
        let target = match History::new(self.db.clone())
            .index_at(self.pg, at_ms)
            .map_err(io::Error::other)?
        {
            history::TimeIndex::At(i) => i,
            history::TimeIndex::Latest => LogIndex(index.0 - 1),
            history::TimeIndex::BeforeHistory { .. } => return Ok(Ok(Applied::Done)),
        };
        let current = gc::horizon(self.db, self.pg).map_err(io::Error::other)?;
        if target.0 == 0 || current.is_some_and(|h| h.index >= target) {
            return Ok(Ok(Applied::Done));
        }
        gc::stage_horizon(
            &mut self.batch,
            self.pg,
            gc::Horizon {
                index: target,
                at_ms,
            },
        );
        Ok(Ok(Applied::HorizonMoved { index: target.0 }))
    }

    pub(super) fn apply_collect_garbage(
        &mut self,
        index: LogIndex,
        c: &pb::CollectGarbage,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let retained = self.retained()?;
        // Every GC step is applied alone in its batch, so the store's row is
        // current; one staged earlier in this context would still win.
        let mut now = match self.usage {
            Some(staged) => staged,
            None => usage::usage(self.db, self.pg).map_err(io::Error::other)?,
        };
        let step = gc::collect_step(
            self.db,
            &mut self.batch,
            self.pg,
            &retained,
            c.max_rows as usize,
            c.new_pass,
            &mut now.counting,
        )
        .map_err(io::Error::other)?;
        now.remove(step.versions_removed, step.bytes_removed);
        if step.finished_pass {
            now.finish_census(index, stamp_ms);
        }
        usage::stage_usage(&mut self.batch, self.pg, &now);
        self.usage = Some(now);
        Ok(Ok(Applied::Collected {
            versions: step.versions_removed,
            bytes: step.bytes_removed,
            done: step.done,
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
