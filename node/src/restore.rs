//! Restore in place: a whole PG back to a restore point, and undo.
//!
//! The restore itself is one entry in the PG's log (`RestorePg`), applied as
//! one rollback mask (`lifeboat_store::masks`): O(1) whatever the data
//! size, the same on every replica, and nothing is deleted, so it can be
//! undone (`--undo` is one more mask, back to just before the newest one).
//! The plan — which volumes and buckets go back, their sizes then and now,
//! how much was written since — is worked out from this node's replica
//! after a linearizable read point; a dry run stops there.

use lifeboat_proto::raft as pb;
use lifeboat_replication::Applied;
use lifeboat_snapshot as points;
use lifeboat_store::objects::BucketState;
use lifeboat_store::volumes::VolumeState;
use lifeboat_store::{LogIndex, PgId, masks};

use crate::core::{NodeCore, Role};
use crate::error::{NodeError, NodeResult};

/// What a restore does (or, for a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// TENANT/PG
    pub pg: String,
    /// After the restore, the PG shows its state at this index.
    pub to: LogIndex,
    /// The moment `to` stands for, ms since the epoch.
    pub to_ms: u64,
    /// For an undo, the restore it undoes.
    pub undoes: Option<LogIndex>,
    pub items: Vec<RestoreItem>,
    /// False for a dry run.
    pub applied: bool,
    /// An operator's token rolled back past a locked snapshot.
    pub lock_overridden: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreAction {
    /// Goes back to its state at the restore point.
    Restore,
    /// Created after the restore point: left as it is.
    LeftNew,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreKind {
    Volume,
    Bucket,
}

/// One volume or bucket of a restore plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreItem {
    pub kind: RestoreKind,
    /// Its name within the tenant.
    pub name: String,
    pub action: RestoreAction,
    /// Deleted now (an undelete brings it back as restored).
    pub deleted: bool,
    /// Volume sizes in bytes (0 for buckets, and for a volume that did not
    /// exist then).
    pub size_then: u64,
    pub size_now: u64,
    /// Blocks (volumes) or keys (buckets) written since the restore point.
    pub changed: u64,
}

impl NodeCore {
    /// Restores PG `TENANT/NAME` in place to `at` (RFC 3339 or relative)
    /// or `snapshot`, or with `undo` undoes its newest restore. A dry run
    /// only reports the plan. Rolling back past a locked snapshot is
    /// refused but to an operator, whose override is an audited event.
    pub async fn restore_pg(
        &self,
        pg_full_name: &str,
        at: &str,
        snapshot: &str,
        undo: bool,
        dry_run: bool,
        role: &Role,
    ) -> NodeResult<RestorePlan> {
        let (pg_name, group) = self.history_group(pg_full_name)?;
        let pg = group.pg();
        let (to, to_ms, undoes, covered) = if undo {
            if !at.is_empty() || !snapshot.is_empty() {
                return Err(NodeError::InvalidName {
                    what: "restore point",
                    name: pg_name,
                    reason: "--undo takes no --at or --snapshot: it undoes the newest restore"
                        .into(),
                });
            }
            group.read_barrier().await?;
            let newest = masks::masks(&self.db, pg)?
                .into_iter()
                .next()
                .ok_or_else(|| NodeError::NothingToUndo(pg_name.clone()))?;
            (
                LogIndex(newest.index.0 - 1),
                newest.created_ms,
                Some(newest.index),
                Some((newest.volumes, newest.buckets)),
            )
        } else {
            let point = crate::history::restore_point(at, snapshot, self.now())?;
            let p = self.resolve_point(&group, &point, false).await?;
            (p.index, p.at_ms, None, None)
        };
        let mut plan = RestorePlan {
            items: self.restore_items(pg, to, covered.as_ref())?,
            pg: pg_name.clone(),
            to,
            to_ms,
            undoes,
            applied: false,
            lock_overridden: false,
        };
        if dry_run {
            return Ok(plan);
        }
        let (_, applied) = group
            .propose(pb::command::Kind::RestorePg(pb::RestorePg {
                to_index: to.0,
                to_ms,
                undo,
                operator: *role == Role::Operator,
            }))
            .await
            .map_err(|e| restore_error(e, &pg_name))?;
        let Applied::Restored {
            to_index,
            lock_overridden,
            ..
        } = applied
        else {
            return Err(NodeError::unexpected_outcome("restore", &applied));
        };
        plan.to = LogIndex(to_index);
        plan.applied = true;
        plan.lock_overridden = lock_overridden;
        if lock_overridden {
            use lifeboat_replication::ack::EventSink;
            self.events.event(
                pg,
                "snapshot_lock_overridden",
                format!(
                    "an operator token restored {pg_name} to {}, before a locked snapshot",
                    points::format_ms(to_ms)
                ),
            );
        }
        tracing::info!(
            pg = pg_name,
            to = to_index,
            undo,
            "protection group restored in place"
        );
        Ok(plan)
    }

    /// The volumes and buckets of a restore to `to`: those a restore covers
    /// (`covered`, for an undo; else those live at `to`, as apply decides)
    /// and those created since, which it leaves alone.
    fn restore_items(
        &self,
        pg: PgId,
        to: LogIndex,
        covered: Option<&(Vec<lifeboat_store::VolumeId>, Vec<lifeboat_store::BucketId>)>,
    ) -> NodeResult<Vec<RestoreItem>> {
        let mut items = Vec::new();
        for (volume, _, now) in self.volumes.volumes(pg)? {
            let then = self
                .volumes
                .volume_at(pg, volume, to)?
                .map(|(_, r)| r)
                .filter(|r| r.state == VolumeState::Active);
            let restored = match covered {
                Some((volumes, _)) => volumes.contains(&volume),
                None => then.is_some(),
            };
            let action = match (restored, then.is_none(), now.state) {
                (true, _, _) => RestoreAction::Restore,
                (false, true, VolumeState::Active) => RestoreAction::LeftNew,
                _ => continue,
            };
            items.push(RestoreItem {
                kind: RestoreKind::Volume,
                name: now.name,
                action,
                deleted: now.state == VolumeState::Deleted,
                size_then: then.map_or(0, |r| r.size_bytes),
                size_now: now.size_bytes,
                changed: if restored {
                    self.volumes.blocks_written_since(pg, volume, to)?
                } else {
                    0
                },
            });
        }
        for (bucket, _, now) in self.objects.buckets(pg)? {
            // A read-only clone shows one moment: nothing to restore.
            if now.is_read_only() {
                continue;
            }
            let then = self
                .objects
                .bucket_at(pg, bucket, to)?
                .filter(|(_, r)| r.state == BucketState::Active);
            let restored = match covered {
                Some((_, buckets)) => buckets.contains(&bucket),
                None => then.is_some(),
            };
            let action = match (restored, then.is_none(), now.state) {
                (true, _, _) => RestoreAction::Restore,
                (false, true, BucketState::Active) => RestoreAction::LeftNew,
                _ => continue,
            };
            items.push(RestoreItem {
                kind: RestoreKind::Bucket,
                name: now.name,
                action,
                deleted: now.state == BucketState::Deleted,
                size_then: 0,
                size_now: 0,
                changed: if restored {
                    self.objects.keys_written_since(pg, bucket, to)?
                } else {
                    0
                },
            });
        }
        Ok(items)
    }
}

/// Names the snapshot a restore would roll back past.
fn restore_error(e: lifeboat_replication::Error, pg_name: &str) -> NodeError {
    use lifeboat_replication::{Error as R, Rejection as J};
    match e {
        R::Rejected {
            rejection: J::SnapshotLocked { name, until_ms },
            ..
        } => NodeError::RestorePastLock {
            snapshot: format!("{pg_name}@{name}"),
            until: points::format_ms(until_ms),
        },
        R::Rejected {
            rejection: J::NothingToUndo,
            ..
        } => NodeError::NothingToUndo(pg_name.to_owned()),
        other => other.into(),
    }
}
