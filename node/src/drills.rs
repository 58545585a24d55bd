//! Failover drills (DESIGN.md "Drills"): rehearse a failover to a standby
//! site without touching production.
//!
//! `drill start` runs on a node of the drill's site that holds a replica
//! of each source PG (the CLI finds one). Per source PG it pins a restore
//! point in the source (the only entry production's log sees), creates a
//! drill PG whose voters are the site's nodes holding the source's
//! replicas, and in it one clone per volume, `TENANT/drill-ID-VOLUME`,
//! and one per bucket, `BUCKET-drill-ID`, that reads through to the
//! node's own replica of the source at the pinned index: O(1) whatever
//! the data size, and writable (the drill's writes stay in the drill PG).
//! Replication keeps running.
//!
//! The drill's record in the catalog is its evidence: RPO at start (the
//! source's log when the pin was written against the restore point), when
//! each clone was usable and first served I/O (RTO), and the source's lag
//! to the site while the drill ran (sampled by the source's leader).
//! `drill stop` takes the drill PG and its names out of the catalog (every
//! node then drops its replica) and deletes the pin.

use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::EventSink;
use lifeboat_replication::log_store::LogStore;
use lifeboat_replication::{Applied, ProtectionGroup, transport};
use lifeboat_snapshot::{self as points, RestorePoint};
use lifeboat_store::frame::FrameAad;
use lifeboat_store::objects::{BucketLayer, BucketState, ListQuery, Listed, ObjectVersion};
use lifeboat_store::volumes::{BlockContent, Layer, VolumeState};
use lifeboat_store::{BLOCK_BYTES, BlockNo, BucketId, LogIndex, PgId, TenantId, VolumeId};
use sha2::{Digest, Sha256};

use crate::core::NodeCore;
use crate::error::{NodeError, NodeResult};

/// How often a source PG's leader records its lag to a running drill's
/// site.
pub const DRILL_LAG_SAMPLE: Duration = Duration::from_secs(2);

/// How long a read of a drill's clone waits for this node's replica of
/// the source to reach the restore point (it is a standby replica, which
/// may trail the replica the point was taken from).
const SOURCE_CATCH_UP_WAIT: Duration = Duration::from_secs(15);

/// Blocks read per step when a clone is checksummed.
const DIGEST_STEP_BLOCKS: u64 = 256;

/// Keys listed per step when a bucket clone is checksummed.
const DIGEST_STEP_KEYS: usize = 256;

/// The snapshot pinning a drill's restore point in each source PG.
pub fn drill_pin(drill: u64) -> String {
    format!("drill-{drill}")
}

/// The name of a drill's clone of `volume`, or of its PG for `pg`.
pub fn drill_name(drill: u64, name: &str) -> String {
    format!("drill-{drill}-{name}")
}

/// The name of a drill's clone of bucket `name`: `NAME-drill-ID`, the
/// source's name cut short to keep within S3's 63 characters (and to end
/// in a letter or digit, as bucket names must).
pub fn drill_bucket_name(drill: u64, name: &str) -> String {
    const BUCKET_NAME_MAX: usize = 63;
    let suffix = format!("-drill-{drill}");
    let keep = BUCKET_NAME_MAX.saturating_sub(suffix.len()).min(name.len());
    let stem = name[..keep].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{stem}{suffix}")
}

fn is_stopped(d: &pb::DrillRecord) -> bool {
    d.state == pb::DrillState::DrillStopped as i32
}

/// One clone's checksums against its source at the restore point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneChecksum {
    pub tenant: String,
    /// `drill-ID-VOLUME`.
    pub name: String,
    pub source: String,
    pub index: u64,
    /// SHA-256 of the clone's bytes as it reads now, and of the source's
    /// at the restore point: equal unless the drill wrote to the clone.
    pub clone_sha256: String,
    pub source_sha256: String,
    /// Blocks the drill itself wrote (or trimmed) in a volume's clone.
    pub blocks_written: u64,
    /// A bucket's clone: `name` is the bucket's, and the digest runs over
    /// every live key and its object's bytes, in key order.
    pub bucket: bool,
    /// Keys the drill itself wrote (or deleted) in a bucket's clone.
    pub objects_written: u64,
}

impl NodeCore {
    /// Every drill, running or stopped, oldest first.
    pub fn drills(&self) -> NodeResult<Vec<pb::DrillRecord>> {
        self.catalog.drills().map_err(NodeError::io("read catalog"))
    }

    pub fn drill(&self, id: u64) -> NodeResult<pb::DrillRecord> {
        self.catalog
            .drill(id)
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::DrillNotFound(id))
    }

    /// Starts a drill at `site` of the PGs named (TENANT/NAME; none: every
    /// PG with a standby replica there) at `at` (empty or `latest`: what
    /// the site has applied; else a time). Returns its record once every
    /// clone is usable. A start that fails midway is stopped again.
    pub async fn start_drill(
        &self,
        site: &str,
        names: &[String],
        at: &str,
    ) -> NodeResult<pb::DrillRecord> {
        let started_ms = self.clock.now_ms();
        let sources = self.drill_sources(site, names)?;
        let point = match at {
            "" | "latest" => RestorePoint::Latest,
            at => match points::parse_at(at, self.now())? {
                RestorePoint::Snapshot(_) => {
                    return Err(NodeError::InvalidName {
                        what: "drill restore point",
                        name: at.to_owned(),
                        reason: "give `latest` or a time".into(),
                    });
                }
                point => point,
            },
        };
        let mut record = pb::DrillRecord {
            id: 0,
            site: site.to_owned(),
            at: if at.is_empty() { "latest" } else { at }.to_owned(),
            state: pb::DrillState::DrillStarting as i32,
            started_ms,
            ..Default::default()
        };
        record.id = self.put_drill(&record).await?;
        for source in &sources {
            self.events.event(
                PgId(source.id),
                "drill_started",
                format!(
                    "drill {} of {}/{} at site {site}, restore point {}",
                    record.id, source.tenant, source.name, record.at
                ),
            );
        }
        match self.start_drill_pgs(&mut record, &sources, &point).await {
            Ok(()) => {
                record.state = pb::DrillState::DrillRunning as i32;
                record.ready_ms = self.clock.now_ms();
                self.put_drill(&record).await?;
                for p in &record.pgs {
                    self.events.event(
                        PgId(p.source_pg),
                        "drill_ready",
                        format!(
                            "drill {}: {} clone(s) of {}/{} usable {} ms after the command, restore point index {} ({} entries, {} ms behind the source)",
                            record.id,
                            p.volumes.len() + p.buckets.len(),
                            p.tenant,
                            p.source_name,
                            record.ready_ms.saturating_sub(started_ms),
                            p.index,
                            p.source_index.saturating_sub(p.index + 1),
                            p.source_ms.saturating_sub(p.index_ms)
                        ),
                    );
                }
                self.drill(record.id)
            }
            Err(e) => {
                tracing::warn!(drill = record.id, code = e.code(), error = %e, "drill start failed; stopping it");
                if let Err(undo) = self.stop_drill(record.id).await {
                    tracing::error!(drill = record.id, error = %undo, "could not stop the drill whose start failed; run `lifeboat drill stop {}`", record.id);
                }
                Err(e)
            }
        }
    }

    /// The source PGs of a drill at `site`: each must have a replica on
    /// this node (a standby at `site`) and not be active there.
    fn drill_sources(&self, site: &str, names: &[String]) -> NodeResult<Vec<pb::PgRecord>> {
        let me = self
            .catalog
            .node(self.config.node_id)
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::NodeNotFound(self.config.node_id))?;
        if !self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?
            .iter()
            .any(|n| n.site == site && !n.removed && !n.witness)
        {
            return Err(NodeError::SiteNotFound(site.to_owned()));
        }
        if me.site != site {
            return Err(NodeError::WrongSite {
                action: "start a drill".into(),
                here: me.site,
                wanted: site.to_owned(),
            });
        }
        let named = !names.is_empty();
        let records: Vec<pb::PgRecord> = if named {
            names
                .iter()
                .map(|n| self.pg_named(n))
                .collect::<NodeResult<_>>()?
        } else {
            self.pg_records(None)?
        };
        let mut out = Vec::new();
        for r in records {
            let full = format!("{}/{}", r.tenant, r.name);
            let refuse = |reason: String| NodeError::InvalidName {
                what: "drill source",
                name: full.clone(),
                reason,
            };
            let hosted = r.members.iter().any(|m| m.node_id == me.id);
            let skip = if r.drill != 0 {
                Some(format!("it is drill {}'s own protection group", r.drill))
            } else if r.active_site == site {
                Some(format!(
                    "it is active at {site}: a drill rehearses a failover to a standby site"
                ))
            } else if !hosted {
                Some(format!("this node holds no replica of it at {site}"))
            } else {
                None
            };
            match skip {
                Some(reason) if named => return Err(refuse(reason)),
                Some(_) => continue,
                None => out.push(r),
            }
        }
        if out.is_empty() {
            return Err(NodeError::NoMembersAtSite {
                pg: if named {
                    names.join(", ")
                } else {
                    "any".into()
                },
                site: site.to_owned(),
            });
        }
        Ok(out)
    }

    async fn put_drill(&self, record: &pb::DrillRecord) -> NodeResult<u64> {
        let (_, applied) = self
            .propose_catalog(pb::command::Kind::PutDrill(pb::PutDrill {
                record: Some(record.clone()),
            }))
            .await?;
        match applied {
            Applied::DrillPut { drill } => Ok(drill),
            other => Err(NodeError::unexpected_outcome("write a drill", &other)),
        }
    }

    async fn start_drill_pgs(
        &self,
        record: &mut pb::DrillRecord,
        sources: &[pb::PgRecord],
        point: &RestorePoint,
    ) -> NodeResult<()> {
        for source in sources {
            let group = self.running_group(source.id)?;
            let index = self
                .drill_restore_point(&group, source, &record.site, point)
                .await?;
            let pin = drill_pin(record.id);
            let (pin_entry, applied) = group
                .propose(pb::command::Kind::CreateSnapshot(pb::CreateSnapshot {
                    name: pin.clone(),
                    at_index: Some(index.0),
                    at_ms: 0,
                    locked_until_ms: 0,
                }))
                .await?;
            if !matches!(applied, Applied::SnapshotCreated { .. }) {
                return Err(NodeError::unexpected_outcome(
                    "pin a drill's restore point",
                    &applied,
                ));
            }
            // The pin's entry and the restore point, through this node's
            // replica (a standby: it may trail the leader a little).
            self.wait_applied(&group, pin_entry).await?;
            let (index_ms, source_ms) = self.stamps_at(group.pg(), index, pin_entry).await?;
            let mut pg = pb::DrillPg {
                source_pg: source.id,
                tenant: source.tenant.clone(),
                source_name: source.name.clone(),
                pin,
                index: index.0,
                index_ms,
                source_index: pin_entry.0,
                source_ms,
                ..Default::default()
            };
            self.events.event(
                group.pg(),
                "drill_pinned",
                format!(
                    "drill {}: restore point index {} of {}/{} pinned at index {}",
                    record.id, index.0, source.tenant, source.name, pin_entry.0
                ),
            );
            record.pgs.push(pg.clone());
            self.put_drill(record).await?;
            let drill_pg = self.create_drill_pg(record, source).await?;
            pg.drill_pg = drill_pg.id;
            pg.drill_pg_name = drill_pg.name.clone();
            *record.pgs.last_mut().expect("pushed above") = pg.clone();
            self.put_drill(record).await?;
            for (volume, source_record) in self.volumes_at(group.pg(), index)? {
                let name = drill_name(record.id, &source_record.name);
                let info = self
                    .create_volume_with_base(
                        &format!("{}/{name}", source.tenant),
                        source_record.size_bytes,
                        &drill_pg.name,
                        Some(pb::VolumeBase {
                            volume: volume.0,
                            index: index.0,
                            pg: Some(source.id),
                        }),
                    )
                    .await?;
                pg.volumes.push(pb::DrillVolume {
                    source: source_record.name.clone(),
                    source_volume: volume.0,
                    name,
                    volume: info.volume.0,
                    size_bytes: source_record.size_bytes,
                    usable_ms: self.clock.now_ms(),
                    first_io_ms: 0,
                });
                *record.pgs.last_mut().expect("pushed above") = pg.clone();
                self.put_drill(record).await?;
            }
            for (bucket, source_name) in self.buckets_at(group.pg(), index)? {
                let name = drill_bucket_name(record.id, &source_name);
                let info = self
                    .create_bucket_with_base(
                        &format!("{}/{name}", source.tenant),
                        &drill_pg.name,
                        Some(pb::BucketBase {
                            bucket: bucket.0,
                            index: index.0,
                            writable: true,
                            pg: Some(source.id),
                        }),
                    )
                    .await?;
                pg.buckets.push(pb::DrillBucket {
                    source: source_name,
                    source_bucket: bucket.0,
                    name,
                    bucket: info.bucket.0,
                    usable_ms: self.clock.now_ms(),
                    first_io_ms: 0,
                });
                *record.pgs.last_mut().expect("pushed above") = pg.clone();
                self.put_drill(record).await?;
            }
        }
        Ok(())
    }

    /// Every bucket of `pg` live at `index` that has data of its own
    /// (a read-only clone shows another's), with its name.
    fn buckets_at(&self, pg: PgId, index: LogIndex) -> NodeResult<Vec<(BucketId, String)>> {
        let mut out = Vec::new();
        for (bucket, _, _) in self.objects.buckets(pg)? {
            if let Some((_, record)) = self.objects.bucket_at(pg, bucket, index)?
                && record.state == BucketState::Active
                && !record.is_read_only()
            {
                out.push((bucket, record.name));
            }
        }
        Ok(out)
    }

    /// The index a drill restores `source` to: for `latest`, the newest
    /// index a replica at `site` has applied (so committed); else the
    /// index of the time on this node's replica.
    async fn drill_restore_point(
        &self,
        group: &ProtectionGroup,
        source: &pb::PgRecord,
        site: &str,
        point: &RestorePoint,
    ) -> NodeResult<LogIndex> {
        if !matches!(point, RestorePoint::Latest) {
            return Ok(self.resolve_point(group, point, true).await?.index);
        }
        let nodes = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let mut best = group.metrics().applied_index;
        for m in &source.members {
            let Some(n) = nodes
                .iter()
                .find(|n| n.id == m.node_id && n.site == site && n.id != self.config.node_id)
            else {
                continue;
            };
            let addr = n.addrs.as_ref().map_or("", |a| a.raft.as_str());
            match transport::group_view(
                &self.peers,
                &self.identity,
                addr,
                group.pg(),
                group.metrics().generation,
            )
            .await
            {
                Ok(view) => best = best.max(LogIndex(view.applied_index)),
                Err(e) => {
                    tracing::info!(pg = source.id, node = n.id, error = %e, "drill: a standby did not say what it applied")
                }
            }
        }
        if best.0 == 0 {
            return Err(NodeError::NoStandbyAnswered {
                pg: format!("{}/{}", source.tenant, source.name),
                site: site.to_owned(),
            });
        }
        Ok(best)
    }

    /// Waits until this node's member of `group` has applied `index`.
    async fn wait_applied(&self, group: &ProtectionGroup, index: LogIndex) -> NodeResult<()> {
        let deadline = std::time::Instant::now() + SOURCE_CATCH_UP_WAIT;
        loop {
            let applied = self
                .group(group.pg())
                .unwrap_or_else(|| group.clone())
                .metrics()
                .applied_index;
            if applied >= index {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(NodeError::SourceBehind {
                    pg: self.pg_display_name(group.pg()),
                    applied: applied.0,
                    wanted: index.0,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The leader's stamps of two indexes of `pg` from this node's log
    /// (0 for one the log no longer holds).
    async fn stamps_at(&self, pg: PgId, a: LogIndex, b: LogIndex) -> NodeResult<(u64, u64)> {
        let log = LogStore::new(self.db.clone(), pg, self.syncer.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64)> {
            Ok((
                log.stamp_at(a.0)?.unwrap_or(0),
                log.stamp_at(b.0)?.unwrap_or(0),
            ))
        })
        .await
        .map_err(|e| NodeError::io("read the log's stamps")(std::io::Error::other(e)))?
        .map_err(NodeError::io("read the log's stamps"))
    }

    /// Every volume of `pg` live at `index`, with its record then.
    fn volumes_at(
        &self,
        pg: PgId,
        index: LogIndex,
    ) -> NodeResult<Vec<(VolumeId, lifeboat_store::volumes::VolumeRecord)>> {
        let mut out = Vec::new();
        for (volume, _, _) in self.volumes.volumes(pg)? {
            if let Some((_, record)) = self.volumes.volume_at(pg, volume, index)?
                && record.state == VolumeState::Active
            {
                out.push((volume, record));
            }
        }
        Ok(out)
    }

    /// The drill's PG for `source`: voters on every node of the drill's
    /// site that holds a replica of the source, active there.
    async fn create_drill_pg(
        &self,
        record: &pb::DrillRecord,
        source: &pb::PgRecord,
    ) -> NodeResult<pb::PgRecord> {
        let nodes = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let members: Vec<pb::PlacedMember> = source
            .members
            .iter()
            .filter(|m| {
                nodes
                    .iter()
                    .any(|n| n.id == m.node_id && n.site == record.site && !n.removed)
            })
            .map(|m| pb::PlacedMember {
                node_id: m.node_id,
                voter: true,
            })
            .collect();
        let name = drill_name(record.id, &source.name);
        crate::names::validate_name("protection group", &name)?;
        let (_, applied) = self
            .propose_catalog(pb::command::Kind::CreatePg(pb::CreatePg {
                tenant: source.tenant.clone(),
                name: name.clone(),
                ack: pb::AckPolicy::AckLocal as i32,
                members,
                active_site: record.site.clone(),
                drill: record.id,
                drill_source: source.id,
            }))
            .await?;
        let Applied::PgCreated { pg } = applied else {
            return Err(NodeError::unexpected_outcome(
                "create a drill's PG",
                &applied,
            ));
        };
        self.wait_pg_ready(PgId(pg)).await?;
        self.pg_named(&format!("{}/{name}", source.tenant))
    }

    /// Stops drill `id`: its PGs and their names leave the catalog, then
    /// the pins go from the source PGs. Stopping a stopped drill deletes
    /// any pin a first stop could not reach.
    pub async fn stop_drill(&self, id: u64) -> NodeResult<pb::DrillRecord> {
        let record = self.drill(id)?;
        if !is_stopped(&record) {
            self.propose_catalog(pb::command::Kind::StopDrill(pb::StopDrill { drill: id }))
                .await?;
        }
        let pin = drill_pin(id);
        for p in &record.pgs {
            let group = self.running_group(p.source_pg)?;
            match group
                .propose(pb::command::Kind::DeleteSnapshot(pb::DeleteSnapshot {
                    name: pin.clone(),
                    operator: false,
                }))
                .await
            {
                Ok(_) => {}
                Err(lifeboat_replication::Error::Rejected {
                    rejection: lifeboat_replication::Rejection::SnapshotNotFound { .. },
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
            self.events.event(
                PgId(p.source_pg),
                "drill_stopped",
                format!(
                    "drill {id} of {}/{} stopped: its protection group {} and {} clone(s) removed, pin {pin} deleted",
                    p.tenant,
                    p.source_name,
                    p.drill_pg_name,
                    p.volumes.len() + p.buckets.len()
                ),
            );
        }
        self.drill(id)
    }

    /// Drops this node's replicas of stopped drills' PGs (the catalog no
    /// longer has them). Call from the reconciler, under
    /// `membership_changes`.
    pub(crate) async fn drop_stopped_drill_members(
        &self,
        local: impl Iterator<Item = PgId>,
    ) -> NodeResult<()> {
        let local: Vec<PgId> = local.collect();
        if local.is_empty() {
            return Ok(());
        }
        let gone: Vec<u64> = self
            .drills()?
            .iter()
            .filter(|d| is_stopped(d))
            .flat_map(|d| d.pgs.iter().map(|p| p.drill_pg))
            .filter(|pg| *pg != 0)
            .collect();
        for pg in local.into_iter().filter(|pg| gone.contains(&pg.0)) {
            if self
                .catalog
                .pg_by_id(pg.0)
                .map_err(NodeError::io("read catalog"))?
                .is_some()
            {
                continue;
            }
            if let Some(running) = self.group(pg) {
                self.stop_member(&running).await;
            }
            self.wipe_replica(pg).await?;
            lifeboat_replication::members::forget(&self.db, pg)
                .map_err(NodeError::io("forget a drill's member"))?;
            tracing::info!(pg = pg.0, "a stopped drill's replica dropped");
        }
        Ok(())
    }

    /// On each source PG this node leads: one sample of its lag to each
    /// running drill's site (the slowest replica there).
    pub(crate) async fn sample_drill_lag(&self) {
        let drills = match self.drills() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "drill lag: cannot read drills");
                return;
            }
        };
        for d in drills.iter().filter(|d| !is_stopped(d)) {
            for p in &d.pgs {
                let Some(group) = self.group(PgId(p.source_pg)) else {
                    continue;
                };
                if !group.metrics().is_leader {
                    continue;
                }
                let Some(worst) = group
                    .lag()
                    .into_iter()
                    .filter(|l| l.node.site == d.site)
                    .max_by(|a, b| a.lag.seconds.total_cmp(&b.lag.seconds))
                else {
                    continue;
                };
                let sample = pb::command::Kind::RecordDrillLag(pb::RecordDrillLag {
                    drill: d.id,
                    source_pg: p.source_pg,
                    lag_seconds: worst.lag.seconds,
                    lag_entries: worst.lag.entries,
                });
                if let Err(e) = self.propose_catalog(sample).await {
                    tracing::info!(drill = d.id, error = %e, "drill lag sample not recorded");
                }
            }
        }
    }

    /// The drill a volume of `pg` belongs to, with its restore point's
    /// source and index, if `pg` is a drill's PG.
    pub(crate) fn drill_of_pg(&self, pg: PgId) -> NodeResult<Option<(u64, PgId, LogIndex)>> {
        let Some(rec) = self
            .catalog
            .pg_by_id(pg.0)
            .map_err(NodeError::io("read catalog"))?
            .filter(|r| r.drill != 0)
        else {
            return Ok(None);
        };
        let drill = self.drill(rec.drill)?;
        let index = drill
            .pgs
            .iter()
            .find(|p| p.drill_pg == pg.0)
            .map_or(0, |p| p.index);
        Ok(Some((rec.drill, PgId(rec.drill_source), LogIndex(index))))
    }

    /// Waits until this node's replica of a drill's source has applied the
    /// restore point its clones read at.
    pub(crate) async fn wait_drill_source(&self, source: PgId, index: LogIndex) -> NodeResult<()> {
        let group = self.running_group(source.0)?;
        self.wait_applied(&group, index).await
    }

    /// Records a clone's first I/O (the drill's RTO) once per node; the
    /// catalog keeps the first.
    pub(crate) fn record_drill_io(self: &Arc<Self>, drill: u64, volume: &str) {
        self.report_first_io(drill, volume, false);
    }

    /// Records a bucket clone's first request (the drill's RTO) unless the
    /// catalog has it already (requests have no connection to remember it
    /// by, as an NBD export does).
    pub(crate) fn record_drill_bucket_io(
        self: &Arc<Self>,
        drill: u64,
        bucket: &str,
    ) -> NodeResult<()> {
        let recorded = self
            .drill(drill)?
            .pgs
            .iter()
            .flat_map(|p| &p.buckets)
            .any(|b| b.name == bucket && b.first_io_ms != 0);
        if !recorded {
            self.report_first_io(drill, bucket, true);
        }
        Ok(())
    }

    fn report_first_io(self: &Arc<Self>, drill: u64, volume: &str, bucket: bool) {
        let core = self.clone();
        let volume = volume.to_owned();
        let at_ms = self.clock.now_ms();
        tokio::spawn(async move {
            let io = pb::command::Kind::RecordDrillIo(pb::RecordDrillIo {
                drill,
                volume: volume.clone(),
                at_ms,
                bucket,
            });
            match core.propose_catalog(io).await {
                Ok(_) => core.events.event(
                    PgId::CATALOG,
                    "drill_first_io",
                    format!(
                        "drill {drill}: clone {volume} served its first I/O on node {}",
                        core.config.node_id
                    ),
                ),
                Err(e) => tracing::warn!(drill, volume, error = %e, "drill first I/O not recorded"),
            }
        });
    }

    /// Checksums of every clone of drill `id` against its source at the
    /// restore point, read on this node (which must hold both).
    pub async fn drill_checksums(&self, id: u64) -> NodeResult<Vec<CloneChecksum>> {
        let record = self.drill(id)?;
        if is_stopped(&record) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for p in &record.pgs {
            let source = PgId(p.source_pg);
            let drill_pg = PgId(p.drill_pg);
            self.wait_drill_source(source, LogIndex(p.index)).await?;
            let group = self.running_group(p.drill_pg)?;
            group.read_barrier().await?;
            let tenant = self.tenant(&p.tenant)?;
            for v in &p.volumes {
                let clone_layers = self.volumes.layers(drill_pg, VolumeId(v.volume), None)?;
                let source_layers = self.volumes.layers(
                    source,
                    VolumeId(v.source_volume),
                    Some(LogIndex(p.index)),
                )?;
                let blocks = v.size_bytes.div_ceil(BLOCK_BYTES as u64);
                let clone_sha256 = self
                    .digest_layers(
                        &p.tenant,
                        TenantId(tenant.id),
                        drill_pg,
                        &clone_layers,
                        blocks,
                    )
                    .await?;
                let source_sha256 = self
                    .digest_layers(
                        &p.tenant,
                        TenantId(tenant.id),
                        source,
                        &source_layers,
                        blocks,
                    )
                    .await?;
                out.push(CloneChecksum {
                    tenant: p.tenant.clone(),
                    name: v.name.clone(),
                    source: v.source.clone(),
                    index: p.index,
                    clone_sha256,
                    source_sha256,
                    blocks_written: self.volumes.blocks_written_since(
                        drill_pg,
                        VolumeId(v.volume),
                        LogIndex(0),
                    )?,
                    bucket: false,
                    objects_written: 0,
                });
            }
            for b in &p.buckets {
                let clone_layers = self.objects.layers(
                    drill_pg,
                    BucketId(b.bucket),
                    None,
                    &lifeboat_store::masks::masks(&self.db, drill_pg)?,
                )?;
                let source_layers = self.objects.layers(
                    source,
                    BucketId(b.source_bucket),
                    Some(LogIndex(p.index)),
                    &lifeboat_store::masks::masks(&self.db, source)?,
                )?;
                let tenant_id = TenantId(tenant.id);
                out.push(CloneChecksum {
                    tenant: p.tenant.clone(),
                    name: b.name.clone(),
                    source: b.source.clone(),
                    index: p.index,
                    clone_sha256: self
                        .digest_bucket(&p.tenant, tenant_id, drill_pg, &clone_layers)
                        .await?,
                    source_sha256: self
                        .digest_bucket(&p.tenant, tenant_id, source, &source_layers)
                        .await?,
                    blocks_written: 0,
                    bucket: true,
                    objects_written: self
                        .objects
                        .keys_written_after(drill_pg, BucketId(b.bucket), LogIndex(0))?
                        .len() as u64,
                });
            }
        }
        Ok(out)
    }

    /// SHA-256 over every live key a bucket read through `layers` (of
    /// `pg`) shows, in key order, each with its object's bytes, decrypted:
    /// `key length u32 BE | key | bytes | size u64 BE`, a chunk at a time.
    async fn digest_bucket(
        &self,
        tenant: &str,
        tenant_id: TenantId,
        pg: PgId,
        layers: &[BucketLayer],
    ) -> NodeResult<String> {
        let keys = self.tenant_keys(tenant, None)?;
        let mut hash = Sha256::new();
        let mut resume: Option<Vec<u8>> = None;
        loop {
            let page = self.objects.list_layered(
                pg,
                layers,
                &ListQuery {
                    resume: resume.as_deref(),
                    limit: DIGEST_STEP_KEYS,
                    ..Default::default()
                },
            )?;
            for entry in &page.entries {
                let Listed::Object { key, .. } = entry else {
                    continue;
                };
                let Some((stored_in, _, ObjectVersion::Object { chunks, .. })) =
                    self.objects.find_layered(pg, layers, key)?
                else {
                    continue;
                };
                let stored_pg = layers
                    .iter()
                    .find(|l| l.bucket == stored_in)
                    .map_or(pg, |l| l.pg_in(pg));
                hash.update((key.len() as u32).to_be_bytes());
                hash.update(key);
                let mut size = 0u64;
                for chunk in chunks {
                    let frame = self.objects.chunk(stored_pg, chunk)?.ok_or_else(|| {
                        NodeError::io(format!("read chunk {} in PG {}", chunk.0, stored_pg.0))(
                            std::io::Error::other("missing"),
                        )
                    })?;
                    let aad = FrameAad::Chunk {
                        tenant: tenant_id,
                        pg: stored_pg,
                        chunk: chunk.0,
                    };
                    let plain = self.codec.decode(&keys, &aad, &frame).map_err(|e| {
                        NodeError::io(format!("decode chunk {} in PG {}", chunk.0, stored_pg.0))(
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                    size += plain.len() as u64;
                    hash.update(&plain);
                    tokio::task::yield_now().await;
                }
                hash.update(size.to_be_bytes());
            }
            match page.resume {
                Some(next) => resume = Some(next),
                None => return Ok(hex(&hash.finalize())),
            }
        }
    }

    /// SHA-256 over the first `blocks` blocks a volume with `layers` (of
    /// `pg`) reads, decrypted.
    async fn digest_layers(
        &self,
        tenant: &str,
        tenant_id: TenantId,
        pg: PgId,
        layers: &[Layer],
        blocks: u64,
    ) -> NodeResult<String> {
        let keys = self.tenant_keys(tenant, None)?;
        let mut hash = Sha256::new();
        let mut first = 0;
        while first < blocks {
            let count = DIGEST_STEP_BLOCKS.min(blocks - first);
            let stored = self
                .volumes
                .visible_blocks(pg, layers, BlockNo(first), count)?;
            for (i, s) in stored.iter().enumerate() {
                let block = BlockNo(first + i as u64);
                match s.as_ref().map(|s| (s, s.content())) {
                    None | Some((_, BlockContent::Zero)) => hash.update([0u8; BLOCK_BYTES]),
                    Some((s, BlockContent::Frame(frame))) => {
                        let aad = FrameAad::Block {
                            tenant: tenant_id,
                            pg: s.pg,
                            volume: s.volume,
                            block,
                        };
                        let plain = self.codec.decode(&keys, &aad, frame).map_err(|e| {
                            NodeError::io(format!(
                                "decode block {} of volume {} in PG {}",
                                block.0, s.volume.0, s.pg.0
                            ))(std::io::Error::other(e.to_string()))
                        })?;
                        hash.update(&plain);
                    }
                }
            }
            first += count;
            tokio::task::yield_now().await;
        }
        Ok(hex(&hash.finalize()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drill's bucket names are valid S3 names however long the source's.
    #[test]
    fn drill_bucket_names_fit_and_end_in_a_letter_or_digit() {
        assert_eq!(drill_bucket_name(7, "backups"), "backups-drill-7");
        // Cut to 54 characters, the last a dash, which goes too.
        let long = format!("{}-xyz", "a".repeat(53));
        let name = drill_bucket_name(12, &long);
        assert_eq!(name.len(), 62, "{name}");
        assert!(name.ends_with("a-drill-12"), "{name}");
        crate::names::validate_bucket_name(&drill_bucket_name(123_456, &"b".repeat(63))).unwrap();
    }
}
