//! A PG's history as operators and tenants use it: restore points resolved
//! to log indexes, snapshots (create, list, show, delete, lock), their
//! schedule, the PG's window, clones of volumes and buckets, and undeletes.
//! Restores in place are in `crate::restore`; the GC that keeps the window
//! in `crate::gc`.
//!
//! Every change goes through the PG's log (`lifeboat_replication` applies
//! it), so every replica, the DR site's included, keeps the same snapshots.
//! Reads wait for a linearizable read point first, so a snapshot just made
//! through one node is seen through any other.

use lifeboat_proto::raft as pb;
use lifeboat_replication::{Applied, ProtectionGroup};
use lifeboat_snapshot::{self as points, RestorePoint, Retention};
use lifeboat_store::history::{ScheduleRecord, SnapshotRecord, TimeIndex};
use lifeboat_store::objects::BucketState;
use lifeboat_store::volumes::VolumeState;
use lifeboat_store::{LogIndex, PgId};
use time::OffsetDateTime;

use crate::core::{BucketInfo, NodeCore, Role, VolumeInfo};
use crate::error::{NodeError, NodeResult};
use crate::names;

/// A snapshot as the admin API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// TENANT/PG
    pub pg: String,
    pub name: String,
    pub record: SnapshotRecord,
}

/// A restore point resolved in one PG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointInTime {
    /// The PG's state at this index is the restore point.
    pub index: LogIndex,
    /// The moment it stands for (ms since the epoch).
    pub at_ms: u64,
}

impl NodeCore {
    /// Now, on the clock that stamps this node's entries.
    pub fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.now_ms()) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// Now on that clock, in ms since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Sets (or with `every` empty, removes) the snapshot schedule of PG
    /// `TENANT/NAME`.
    pub async fn set_schedule(
        &self,
        pg_full_name: &str,
        every: &str,
        retention: Retention,
    ) -> NodeResult<Option<ScheduleRecord>> {
        let (_, group) = self.history_group(pg_full_name)?;
        let interval_ms = if every.is_empty() {
            0
        } else {
            points::parse_every(every)?
        };
        group
            .propose(pb::command::Kind::SetSchedule(pb::SetSchedule {
                interval_ms,
                keep_last: retention.last,
                keep_hourly: retention.hourly,
                keep_daily: retention.daily,
                keep_weekly: retention.weekly,
                keep_monthly: retention.monthly,
            }))
            .await?;
        group.read_barrier().await?;
        Ok(self.history.schedule(group.pg())?)
    }

    /// Sets PG `TENANT/NAME`'s continuous-protection window (like 24h).
    /// A shorter window lets the next GC pass delete more; a longer one
    /// keeps what is still there (what was deleted stays deleted).
    pub async fn set_pg_window(
        &self,
        pg_full_name: &str,
        window: &str,
    ) -> NodeResult<pb::PgRecord> {
        let record = self.pg_named(pg_full_name)?;
        let group = self.running_group(record.id)?;
        let window_ms = points::parse_every(window)?;
        group
            .propose(pb::command::Kind::SetWindow(pb::SetWindow {
                window_ms,
                only_if_unset: false,
            }))
            .await?;
        tracing::info!(pg = pg_full_name, window_ms, "protection window set");
        Ok(record)
    }

    /// The PG `TENANT/NAME` and its member on this node.
    pub(crate) fn history_group(
        &self,
        pg_full_name: &str,
    ) -> NodeResult<(String, ProtectionGroup)> {
        let record = self.pg_named(pg_full_name)?;
        let group = self.running_group(record.id)?;
        Ok((format!("{}/{}", record.tenant, record.name), group))
    }

    /// Resolves a restore point of `group`'s PG to the index it stands for,
    /// after a linearizable read point unless `local` (then this replica
    /// answers as it is: a DR node cut off from the primary still reads
    /// its snapshots). A time before the history held names the oldest.
    pub async fn resolve_point(
        &self,
        group: &ProtectionGroup,
        point: &RestorePoint,
        local: bool,
    ) -> NodeResult<PointInTime> {
        let pg = group.pg();
        let read_index = if local {
            group.metrics().applied_index
        } else {
            group.read_barrier().await?
        };
        match point {
            RestorePoint::Latest => Ok(PointInTime {
                index: read_index,
                at_ms: self.clock.now_ms(),
            }),
            RestorePoint::Snapshot(name) => {
                let record = self.snapshot_record(pg, name)?;
                Ok(PointInTime {
                    index: record.index,
                    at_ms: record.at_ms,
                })
            }
            RestorePoint::Time { unix_ms } => {
                let asked = u64::try_from(*unix_ms).unwrap_or(0);
                let index = match self.history.index_at(pg, asked)? {
                    TimeIndex::At(index) => index,
                    // Nothing stamped after it: the state then is the
                    // state now, as of the read point.
                    TimeIndex::Latest => read_index,
                    TimeIndex::BeforeHistory { oldest_ms } => {
                        return Err(NodeError::BeforeHistory {
                            pg: self.pg_display_name(pg),
                            asked: points::format_ms(asked),
                            oldest: (oldest_ms != u64::MAX).then(|| points::format_ms(oldest_ms)),
                        });
                    }
                };
                // The timeline is trimmed at the end of a GC pass; until
                // then the horizon says what is still whole.
                if let Some(h) = lifeboat_store::gc::horizon(&self.db, pg)?
                    && index < h.index
                {
                    return Err(NodeError::BeforeHistory {
                        pg: self.pg_display_name(pg),
                        asked: points::format_ms(asked),
                        oldest: Some(points::format_ms(h.at_ms)),
                    });
                }
                Ok(PointInTime {
                    index,
                    at_ms: asked,
                })
            }
        }
    }

    fn snapshot_record(&self, pg: PgId, name: &str) -> NodeResult<SnapshotRecord> {
        self.history.snapshot(pg, name)?.ok_or_else(|| {
            NodeError::SnapshotNotFound(format!("{}@{name}", self.pg_display_name(pg)))
        })
    }

    /// Pins a restore point of a whole PG under `name` (empty: one made
    /// from the time). `at` empty or `latest` pins the state when the
    /// snapshot's entry is applied; `lock_until` empty leaves it unlocked.
    pub async fn create_snapshot(
        &self,
        pg_full_name: &str,
        name: &str,
        at: &str,
        lock_until: &str,
    ) -> NodeResult<SnapshotInfo> {
        let (pg_name, group) = self.history_group(pg_full_name)?;
        let now = self.now();
        let name = if name.is_empty() {
            points::default_snapshot_name(now)
        } else {
            name.to_owned()
        };
        points::validate_snapshot_name(&name)?;
        let locked_until_ms = if lock_until.is_empty() {
            0
        } else {
            points::parse_until(lock_until, now)?
        };
        let point = if at.is_empty() {
            RestorePoint::Latest
        } else {
            points::parse_at(at, now)?
        };
        let (at_index, at_ms) = match point {
            RestorePoint::Latest => (None, 0),
            other => {
                let p = self.resolve_point(&group, &other, false).await?;
                (Some(p.index.0), p.at_ms)
            }
        };
        let (_, applied) = group
            .propose(pb::command::Kind::CreateSnapshot(pb::CreateSnapshot {
                name: name.clone(),
                at_index,
                at_ms,
                locked_until_ms,
            }))
            .await?;
        let Applied::SnapshotCreated { index } = applied else {
            return Err(NodeError::unexpected_outcome("create snapshot", &applied));
        };
        tracing::info!(pg = pg_name, snapshot = name, index, "snapshot created");
        Ok(SnapshotInfo {
            record: self.snapshot_record(group.pg(), &name)?,
            pg: pg_name,
            name,
        })
    }

    /// Every snapshot of a PG, by name.
    pub async fn list_snapshots(&self, pg_full_name: &str) -> NodeResult<Vec<SnapshotInfo>> {
        let (pg_name, group) = self.history_group(pg_full_name)?;
        group.read_barrier().await?;
        Ok(self
            .history
            .snapshots(group.pg())?
            .into_iter()
            .map(|(name, record)| SnapshotInfo {
                pg: pg_name.clone(),
                name,
                record,
            })
            .collect())
    }

    pub async fn show_snapshot(&self, pg_full_name: &str, name: &str) -> NodeResult<SnapshotInfo> {
        let (pg_name, group) = self.history_group(pg_full_name)?;
        group.read_barrier().await?;
        Ok(SnapshotInfo {
            record: self.snapshot_record(group.pg(), name)?,
            pg: pg_name,
            name: name.to_owned(),
        })
    }

    /// Deletes a snapshot. A lock that holds refuses everyone but an
    /// operator, and an operator's override is reported as an event.
    pub async fn delete_snapshot(
        &self,
        pg_full_name: &str,
        name: &str,
        role: &Role,
    ) -> NodeResult<()> {
        let (pg_name, group) = self.history_group(pg_full_name)?;
        let (_, applied) = group
            .propose(pb::command::Kind::DeleteSnapshot(pb::DeleteSnapshot {
                name: name.to_owned(),
                operator: *role == Role::Operator,
            }))
            .await
            .map_err(|e| self.snapshot_error(e, &pg_name, name))?;
        let Applied::SnapshotChanged { lock_overridden } = applied else {
            return Err(NodeError::unexpected_outcome("delete snapshot", &applied));
        };
        if lock_overridden {
            self.audit_lock_override(
                group.pg(),
                format!(
                    "an operator token deleted snapshot {pg_name}@{name} before its lock ran out"
                ),
            );
        }
        tracing::info!(pg = pg_name, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Sets a snapshot's lock to `until` (RFC 3339 or `+30d`). Extending
    /// is open to anyone who may use the tenant; shortening a lock that
    /// holds is refused but to an operator, and reported as an event.
    pub async fn lock_snapshot(
        &self,
        pg_full_name: &str,
        name: &str,
        until: &str,
        role: &Role,
    ) -> NodeResult<SnapshotInfo> {
        let (pg_name, group) = self.history_group(pg_full_name)?;
        let until_ms = points::parse_until(until, self.now())?;
        let (_, applied) = group
            .propose(pb::command::Kind::LockSnapshot(pb::LockSnapshot {
                name: name.to_owned(),
                until_ms,
                operator: *role == Role::Operator,
            }))
            .await
            .map_err(|e| self.snapshot_error(e, &pg_name, name))?;
        let Applied::SnapshotChanged { lock_overridden } = applied else {
            return Err(NodeError::unexpected_outcome("lock snapshot", &applied));
        };
        if lock_overridden {
            self.audit_lock_override(
                group.pg(),
                format!(
                    "an operator token shortened the lock of snapshot {pg_name}@{name} to {}",
                    points::format_ms(until_ms)
                ),
            );
        }
        Ok(SnapshotInfo {
            record: self.snapshot_record(group.pg(), name)?,
            pg: pg_name,
            name: name.to_owned(),
        })
    }

    /// Clones volume `source` as `new` (same tenant and PG) at a restore
    /// point: a snapshot name, or `at` (RFC 3339 or relative). O(1): the
    /// clone reads through to the source at that index until it writes.
    pub async fn clone_volume(
        &self,
        source: &str,
        new: &str,
        at: &str,
        snapshot: &str,
    ) -> NodeResult<VolumeInfo> {
        let (source_tenant, _) = names::split_volume_name(source)?;
        let (new_tenant, _) = names::split_volume_name(new)?;
        if source_tenant != new_tenant {
            return Err(NodeError::InvalidName {
                what: "clone",
                name: new.to_owned(),
                reason: format!("a clone stays in its source's tenant, {source_tenant}"),
            });
        }
        let point = restore_point(at, snapshot, self.now())?;
        let loc = self.locate_volume(source)?;
        let p = self.resolve_point(&loc.group, &point, false).await?;
        let record = self
            .volumes
            .volume_at(loc.group.pg(), loc.volume, p.index)?
            .map(|(_, r)| r)
            .filter(|r| r.state == VolumeState::Active)
            .ok_or_else(|| {
                NodeError::VolumeNotFound(format!("{source} at {}", points::format_ms(p.at_ms)))
            })?;
        let pg_name = self
            .catalog
            .pg_by_id(loc.group.pg().0)
            .map_err(NodeError::io("read catalog"))?
            .ok_or_else(|| NodeError::PgNotFound(self.pg_display_name(loc.group.pg())))?
            .name;
        let info = self
            .create_volume_with_base(
                new,
                record.size_bytes,
                &pg_name,
                Some(pb::VolumeBase {
                    volume: loc.volume.0,
                    index: p.index.0,
                    pg: None,
                }),
            )
            .await?;
        tracing::info!(source, clone = new, index = p.index.0, "volume cloned");
        Ok(info)
    }

    /// A clone `new` of bucket `source` (both TENANT/BUCKET, same tenant)
    /// as it was at a restore point, in O(1): S3 reads and lists show the
    /// source's objects of that moment. A read-only clone refuses every
    /// write; a writable one keeps its writes (and delete markers) in its
    /// own key space, over the moment, which no later change to the source
    /// touches (the base is a pin).
    pub async fn clone_bucket(
        &self,
        source: &str,
        new: &str,
        at: &str,
        snapshot: &str,
        read_only: bool,
    ) -> NodeResult<BucketInfo> {
        let (source_tenant, source_name) = names::split_bucket_name(source)?;
        let (new_tenant, _) = names::split_bucket_name(new)?;
        if source_tenant != new_tenant {
            return Err(NodeError::InvalidName {
                what: "clone",
                name: new.to_owned(),
                reason: format!("a clone stays in its source's tenant, {source_tenant}"),
            });
        }
        let point = restore_point(at, snapshot, self.now())?;
        let bound = self
            .bucket_binding(source_name)?
            .filter(|b| {
                self.tenant(source_tenant)
                    .is_ok_and(|t| t.id == b.tenant_id)
            })
            .ok_or_else(|| NodeError::BucketNotFound(source.to_owned()))?;
        let info = self
            .bucket_info_of(source_tenant, source_name, &bound)?
            .ok_or_else(|| NodeError::BucketNotFound(source.to_owned()))?;
        let group = self.running_group(info.pg.0)?;
        let p = self.resolve_point(&group, &point, false).await?;
        // A clone of a read-only clone shows what its source shows; a
        // writable clone, or a plain bucket, is a base as it was then.
        let base = match info.base.filter(|b| !b.writable) {
            Some(view) => pb::BucketBase {
                bucket: view.bucket.0,
                index: view.index.0,
                writable: !read_only,
                pg: view.pg.map(|pg| pg.0),
            },
            None => {
                let existed = self
                    .objects
                    .bucket_at(info.pg, info.bucket, p.index)?
                    .is_some_and(|(_, r)| r.state == BucketState::Active);
                if !existed {
                    return Err(NodeError::BucketNotFound(format!(
                        "{source} at {}",
                        points::format_ms(p.at_ms)
                    )));
                }
                pb::BucketBase {
                    bucket: info.bucket.0,
                    index: p.index.0,
                    writable: !read_only,
                    pg: None,
                }
            }
        };
        let clone = self
            .create_bucket_with_base(new, &info.pg_name, Some(base))
            .await?;
        tracing::info!(
            source,
            clone = new,
            index = base.index,
            read_only,
            "bucket cloned"
        );
        Ok(clone)
    }

    /// Brings back the most recently deleted volume named `full_name`
    /// (TENANT/VOLUME), with its data and history, under that name, while
    /// its name is free and its deletion is inside the PG's window (after
    /// that GC may have taken its data, and apply refuses).
    pub async fn undelete_volume(&self, full_name: &str) -> NodeResult<VolumeInfo> {
        let (tenant, volume_name) = names::split_volume_name(full_name)?;
        let tenant_record = self.tenant(tenant)?;
        if self
            .catalog
            .volume_name(tenant, volume_name)
            .map_err(NodeError::io("read catalog"))?
            .is_some()
        {
            return Err(NodeError::InvalidName {
                what: "volume",
                name: full_name.to_owned(),
                reason: "a live volume has this name: delete or rename it first".into(),
            });
        }
        let found = self.newest_deleted(tenant, |pg| {
            Ok(self
                .volumes
                .volumes(pg)?
                .into_iter()
                .filter(|(_, _, r)| r.name == volume_name && r.state == VolumeState::Deleted)
                .map(|(id, index, _)| (id, index))
                .collect())
        })?;
        let Some((pg, volume)) = found else {
            return Err(NodeError::VolumeNotFound(format!("{full_name} (deleted)")));
        };
        debug_assert_eq!(pg.tenant_id, tenant_record.id);
        self.bring_back(
            pg.id,
            full_name,
            pb::command::Kind::UndeleteVolume(pb::UndeleteVolume { volume: volume.0 }),
            pb::command::Kind::BindVolumeName(pb::BindVolumeName {
                tenant: tenant.to_owned(),
                volume_name: volume_name.to_owned(),
                pg_name: pg.name.clone(),
                existing_volume: Some(volume.0),
            }),
            pb::command::Kind::DeleteVolume(pb::DeleteVolume { volume: volume.0 }),
        )
        .await?;
        self.list_volumes(tenant)?
            .into_iter()
            .find(|v| v.name == volume_name)
            .ok_or_else(|| NodeError::VolumeNotFound(full_name.to_owned()))
    }

    /// Brings back the most recently deleted bucket named `full_name`
    /// (TENANT/BUCKET) under that name, with its history: it is empty, as
    /// S3 deletes only empty buckets, but a clone or restore at a time
    /// before its objects were deleted shows them again.
    pub async fn undelete_bucket(&self, full_name: &str) -> NodeResult<BucketInfo> {
        let (tenant, bucket_name) = names::split_bucket_name(full_name)?;
        self.tenant(tenant)?;
        if self.bucket_binding(bucket_name)?.is_some() {
            return Err(NodeError::InvalidName {
                what: "bucket",
                name: full_name.to_owned(),
                reason: "a live bucket has this name (bucket names are unique in the cluster)"
                    .into(),
            });
        }
        let found = self.newest_deleted(tenant, |pg| {
            Ok(self
                .objects
                .buckets(pg)?
                .into_iter()
                .filter(|(_, _, r)| r.name == bucket_name && r.state == BucketState::Deleted)
                .map(|(id, index, _)| (id, index))
                .collect())
        })?;
        let Some((pg, bucket)) = found else {
            return Err(NodeError::BucketNotFound(format!("{full_name} (deleted)")));
        };
        self.bring_back(
            pg.id,
            full_name,
            pb::command::Kind::UndeleteBucket(pb::UndeleteBucket { bucket: bucket.0 }),
            pb::command::Kind::BindBucketName(pb::BindBucketName {
                tenant: tenant.to_owned(),
                bucket_name: bucket_name.to_owned(),
                pg_name: pg.name.clone(),
                existing_bucket: Some(bucket.0),
            }),
            pb::command::Kind::DeleteBucket(pb::DeleteBucket { bucket: bucket.0 }),
        )
        .await?;
        self.bucket_info(tenant, bucket_name)?
            .ok_or_else(|| NodeError::BucketNotFound(full_name.to_owned()))
    }

    /// Among the tenant's PGs hosted here, the one whose `deleted` (ids
    /// with the index they were deleted at) holds the newest deletion.
    fn newest_deleted<I>(
        &self,
        tenant: &str,
        deleted: impl Fn(PgId) -> NodeResult<Vec<(I, LogIndex)>>,
    ) -> NodeResult<Option<(pb::PgRecord, I)>> {
        let mut found: Option<(LogIndex, pb::PgRecord, I)> = None;
        for pg in self.pg_records(Some(tenant))? {
            if self.group(PgId(pg.id)).is_none() {
                continue;
            }
            for (id, index) in deleted(PgId(pg.id))? {
                if found.as_ref().is_none_or(|(i, _, _)| index > *i) {
                    found = Some((index, pg.clone(), id));
                }
            }
        }
        Ok(found.map(|(_, pg, id)| (pg, id)))
    }

    /// An undelete: `undelete` in the PG, then `bind` of the name in the
    /// catalog; if someone took the name meanwhile, `delete` again so that
    /// nothing lives on without a name.
    async fn bring_back(
        &self,
        pg: u64,
        full_name: &str,
        undelete: pb::command::Kind,
        bind: pb::command::Kind,
        delete: pb::command::Kind,
    ) -> NodeResult<()> {
        let group = self.running_group(pg)?;
        let (index, _) = group.propose(undelete).await?;
        if let Err(e) = self.propose_catalog(bind).await {
            if let Err(undo) = group.propose(delete).await {
                tracing::error!(name = full_name, error = %undo, "could not delete again what an undelete brought back");
            }
            return Err(e);
        }
        group
            .wait_applied_index(index, std::time::Duration::from_secs(30))
            .await?;
        tracing::info!(name = full_name, "undeleted");
        Ok(())
    }

    fn audit_lock_override(&self, pg: PgId, message: String) {
        use lifeboat_replication::ack::EventSink;
        self.events.event(pg, "snapshot_lock_overridden", message);
    }

    /// Names the snapshot in a refusal that only knows its name.
    fn snapshot_error(
        &self,
        e: lifeboat_replication::Error,
        pg_name: &str,
        name: &str,
    ) -> NodeError {
        use lifeboat_replication::{Error as R, Rejection as J};
        match e {
            R::Rejected {
                rejection: J::SnapshotNotFound { .. },
                ..
            } => NodeError::SnapshotNotFound(format!("{pg_name}@{name}")),
            R::Rejected {
                rejection: J::SnapshotLocked { until_ms, .. },
                ..
            } => NodeError::SnapshotLocked {
                snapshot: format!("{pg_name}@{name}"),
                until: points::format_ms(until_ms),
            },
            other => other.into(),
        }
    }
}

/// The restore point of a clone: exactly one of a time and a snapshot.
pub(crate) fn restore_point(
    at: &str,
    snapshot: &str,
    now: OffsetDateTime,
) -> NodeResult<RestorePoint> {
    match (at.is_empty(), snapshot.is_empty()) {
        (true, false) => {
            points::validate_snapshot_name(snapshot)?;
            Ok(RestorePoint::Snapshot(snapshot.to_owned()))
        }
        (false, true) => Ok(points::parse_at(at, now)?),
        _ => Err(NodeError::InvalidName {
            what: "restore point",
            name: format!("at={at:?} snapshot={snapshot:?}"),
            reason: "give exactly one of --at and --snapshot".into(),
        }),
    }
}
