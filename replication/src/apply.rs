//! Applying committed commands: deterministic, so every replica of a PG
//! stages the same writes and refuses the same commands.
//!
//! Commands are staged into one batch per `apply` call; reads during apply
//! go through an overlay of what this batch already staged, so a command
//! sees every earlier command of the same call.

use std::collections::{BTreeMap, HashMap};
use std::io;

use lifeboat_proto::raft as pb;
use lifeboat_store::db::{Batch, Cf, Db};
use lifeboat_store::gc;
use lifeboat_store::history::SnapshotRecord;
use lifeboat_store::masks::{self, RollbackMask, Span};
use lifeboat_store::objects::{
    self, BucketBase, BucketRecord, BucketState, ChunkState, ObjectVersion, Objects,
};
use lifeboat_store::uploads::{PartRecord, UploadRecord};
use lifeboat_store::usage::{self, Usage};
use lifeboat_store::volumes::{self, BlockContent, VolumeBase, VolumeRecord, VolumeState, Volumes};
use lifeboat_store::{BLOCK_BYTES, BlockNo, BucketId, ChunkId, LogIndex, PgId, VolumeId};
use prost::Message;

use crate::catalog::{self, Counter};
use crate::types::{Applied, Rejection};

mod drills;
#[cfg(test)]
mod gc_model_test;
mod history;
mod uploads;

pub(crate) struct ApplyContext<'a> {
    db: &'a Db,
    pub(crate) batch: Batch,
    pg: PgId,
    /// Catalog keys staged in this batch: `None` for a staged delete.
    catalog_overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Volume records staged in this batch, with their index.
    volume_overlay: HashMap<VolumeId, (LogIndex, VolumeRecord)>,
    /// Latest index of blocks staged in this batch, by (volume, block).
    block_overlay: HashMap<(u64, u64), u64>,
    /// Bucket records staged in this batch, with their index.
    bucket_overlay: HashMap<BucketId, (LogIndex, BucketRecord)>,
    /// Latest live index of objects staged in this batch, by (bucket, key):
    /// `None` once deleted.
    object_overlay: HashMap<(BucketId, Vec<u8>), Option<u64>>,
    /// Reference counts of chunks staged in this batch.
    chunk_overlay: HashMap<ChunkId, ChunkState>,
    /// Uploads staged in this batch (`None`: removed).
    upload_overlay: HashMap<(BucketId, u64), Option<UploadRecord>>,
    /// Parts staged in this batch, by (upload, part) (`None`: removed).
    part_overlay: HashMap<(u64, u32), Option<PartRecord>>,
    /// The chunks each stream touched in this batch holds now.
    stream_overlay: HashMap<u64, Vec<ChunkId>>,
    /// Object version rows staged in this batch, by (bucket, key), by index.
    version_overlay: HashMap<(BucketId, Vec<u8>), BTreeMap<u64, ObjectVersion>>,
    /// Snapshots staged in this batch (`None`: deleted).
    snapshot_overlay: HashMap<String, Option<SnapshotRecord>>,
    /// The PG's newest timeline bucket once read (`Some(None)`: none yet).
    timeline_newest: Option<Option<u64>>,
    /// The PG's rollback masks, newest first, once read. They cannot
    /// change within one context: a restore is applied in a batch alone.
    masks: std::cell::OnceCell<Vec<RollbackMask>>,
    /// The PG's usage as this batch leaves it, once read.
    usage: Option<Usage>,
    /// The PG's window as staged in this batch.
    window_overlay: Option<u64>,
}

type Outcome = Result<Applied, Rejection>;

impl<'a> ApplyContext<'a> {
    pub(crate) fn new(db: &'a Db, pg: PgId) -> ApplyContext<'a> {
        ApplyContext {
            db,
            batch: db.new_batch(),
            pg,
            catalog_overlay: HashMap::new(),
            volume_overlay: HashMap::new(),
            block_overlay: HashMap::new(),
            bucket_overlay: HashMap::new(),
            object_overlay: HashMap::new(),
            chunk_overlay: HashMap::new(),
            upload_overlay: HashMap::new(),
            part_overlay: HashMap::new(),
            stream_overlay: HashMap::new(),
            version_overlay: HashMap::new(),
            snapshot_overlay: HashMap::new(),
            timeline_newest: None,
            masks: std::cell::OnceCell::new(),
            usage: None,
            window_overlay: None,
        }
    }

    fn catalog_get<T: Message + Default>(&self, key: &[u8]) -> io::Result<Option<T>> {
        self.catalog_raw(key)?
            .map(|b| {
                T::decode(b.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            })
            .transpose()
    }

    fn catalog_raw(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self.catalog_overlay.get(key) {
            Some(staged) => Ok(staged.clone()),
            None => self.db.get(Cf::Catalog, key).map_err(io::Error::other),
        }
    }

    fn catalog_put<T: Message>(&mut self, key: Vec<u8>, record: &T) {
        let bytes = record.encode_to_vec();
        self.batch.put(Cf::Catalog, &key, &bytes);
        self.catalog_overlay.insert(key, Some(bytes));
    }

    fn catalog_delete(&mut self, key: Vec<u8>) {
        self.batch.delete(Cf::Catalog, &key);
        self.catalog_overlay.insert(key, None);
    }

    fn next_id(&mut self, counter: Counter) -> io::Result<u64> {
        let key = counter.key();
        let id = match self.catalog_raw(key)? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "counter is not 8 bytes")
            })?),
            None => 1,
        };
        let next = (id + 1).to_be_bytes().to_vec();
        self.batch.put(Cf::Catalog, key, &next);
        self.catalog_overlay.insert(key.to_vec(), Some(next));
        Ok(id)
    }

    fn volume(&self, volume: VolumeId) -> io::Result<Option<VolumeRecord>> {
        Ok(self.volume_row(volume)?.map(|(_, r)| r))
    }

    /// A volume's newest record and the index it was written at.
    fn volume_row(&self, volume: VolumeId) -> io::Result<Option<(LogIndex, VolumeRecord)>> {
        if let Some(row) = self.volume_overlay.get(&volume) {
            return Ok(Some(row.clone()));
        }
        Volumes::new(self.db.clone())
            .volume(self.pg, volume)
            .map_err(io::Error::other)
    }

    fn put_volume(&mut self, volume: VolumeId, index: LogIndex, record: VolumeRecord) {
        volumes::stage_volume(&mut self.batch, self.pg, volume, index, &record);
        self.volume_overlay.insert(volume, (index, record));
    }

    fn active_volume(&self, volume: u64) -> io::Result<Result<VolumeRecord, Rejection>> {
        Ok(match self.volume(VolumeId(volume))? {
            Some(r) if r.state == VolumeState::Active => Ok(r),
            _ => Err(Rejection::VolumeNotFound { volume }),
        })
    }

    /// Stages one command at `index`. `Err` is a storage failure (the state
    /// machine stops); a refused command is `Ok(Err(rejection))`.
    pub(crate) fn apply_command(
        &mut self,
        index: LogIndex,
        cmd: &pb::Command,
    ) -> io::Result<Outcome> {
        use pb::command::Kind;
        let Some(kind) = &cmd.kind else {
            return Ok(Err(Rejection::Malformed {
                reason: "command without a kind".into(),
            }));
        };
        let is_catalog_command = matches!(
            kind,
            Kind::InitCatalog(_)
                | Kind::CreateTenant(_)
                | Kind::RotateDek(_)
                | Kind::CreateToken(_)
                | Kind::BindVolumeName(_)
                | Kind::UnbindVolumeName(_)
                | Kind::AddNode(_)
                | Kind::RemoveNode(_)
                | Kind::SetPgMembers(_)
                | Kind::CreatePg(_)
                | Kind::SetPgAck(_)
                | Kind::CreateJoinToken(_)
                | Kind::BindBucketName(_)
                | Kind::UnbindBucketName(_)
                | Kind::CreateCredential(_)
                | Kind::RevokeCredential(_)
                | Kind::RevokeToken(_)
                | Kind::SetTenantQuota(_)
                | Kind::ReportPgUsage(_)
                | Kind::SwitchActiveSite(_)
                | Kind::SetCatalogVoters(_)
                | Kind::CompleteForcedFailover(_)
                | Kind::RecordDivergence(_)
                | Kind::PutDrill(_)
                | Kind::RecordDrillIo(_)
                | Kind::RecordDrillLag(_)
                | Kind::StopDrill(_)
                | Kind::RecordProgress(_)
                | Kind::RecordResync(_)
                | Kind::RebuildCluster(_)
        );
        if is_catalog_command != (self.pg == PgId::CATALOG) {
            return Ok(Err(Rejection::WrongGroup { pg: self.pg.0 }));
        }
        if self.pg != PgId::CATALOG {
            // Refused entries too: the timeline maps times to indexes.
            self.note_stamp(index, cmd.stamp_ms)?;
        }
        match kind {
            Kind::WriteBlocks(w) => self.apply_write_blocks(index, w),
            Kind::CreateVolume(c) => self.apply_create_volume(index, c),
            Kind::ResizeVolume(r) => self.apply_resize_volume(index, r),
            Kind::DeleteVolume(d) => self.apply_delete_volume(index, d),
            Kind::UndeleteVolume(u) => self.apply_undelete_volume(index, u),
            Kind::CreateBucket(c) => self.apply_create_bucket(index, c, cmd.stamp_ms),
            Kind::DeleteBucket(d) => self.apply_delete_bucket(index, d),
            Kind::PutObject(p) => self.apply_put_object(index, p),
            Kind::DeleteObject(d) => self.apply_delete_object(index, d),
            Kind::DeleteObjectVersion(d) => self.apply_delete_object_version(index, d),
            Kind::WriteChunks(w) => self.apply_write_chunks(w, cmd.stamp_ms),
            Kind::ReleaseStream(r) => self.apply_release_stream(r),
            Kind::CreateUpload(c) => self.apply_create_upload(c, cmd.stamp_ms),
            Kind::PutPart(p) => self.apply_put_part(p),
            Kind::CompleteUpload(c) => self.apply_complete_upload(index, c),
            Kind::AbortUpload(a) => self.apply_abort_upload(a),
            Kind::CreateSnapshot(c) => self.apply_create_snapshot(index, c, cmd.stamp_ms),
            Kind::DeleteSnapshot(d) => self.apply_delete_snapshot(d, cmd.stamp_ms),
            Kind::LockSnapshot(l) => self.apply_lock_snapshot(l, cmd.stamp_ms),
            Kind::SetSchedule(s) => self.apply_set_schedule(s),
            Kind::RestorePg(r) => self.apply_restore_pg(index, r, cmd.stamp_ms),
            Kind::SetWindow(w) => self.apply_set_window(w),
            Kind::AdvanceHorizon(a) => self.apply_advance_horizon(index, a, cmd.stamp_ms),
            Kind::CollectGarbage(c) => self.apply_collect_garbage(index, c, cmd.stamp_ms),
            Kind::UndeleteBucket(u) => self.apply_undelete_bucket(index, u),
            Kind::SealBucket(b) => self.apply_seal_bucket(index, b),
            Kind::InitCatalog(i) => self.apply_init_catalog(i, cmd.stamp_ms),
            Kind::CreateTenant(t) => self.apply_create_tenant(t, cmd.stamp_ms),
            Kind::RotateDek(r) => self.apply_rotate_dek(r),
            Kind::CreateToken(t) => self.apply_create_token(t, cmd.stamp_ms),
            Kind::BindVolumeName(b) => self.apply_bind_volume_name(b),
            Kind::UnbindVolumeName(u) => self.apply_unbind_volume_name(u),
            Kind::AddNode(a) => self.apply_add_node(a, cmd.stamp_ms),
            Kind::RemoveNode(r) => self.apply_remove_node(r),
            Kind::SetPgMembers(m) => self.apply_set_pg_members(m),
            Kind::CreatePg(c) => self.apply_create_pg(c, cmd.stamp_ms),
            Kind::SetPgAck(a) => self.apply_set_pg_ack(a),
            Kind::CreateJoinToken(t) => self.apply_create_join_token(t, cmd.stamp_ms),
            Kind::BindBucketName(b) => self.apply_bind_bucket_name(b),
            Kind::UnbindBucketName(u) => self.apply_unbind_bucket_name(u),
            Kind::CreateCredential(c) => self.apply_create_credential(c, cmd.stamp_ms),
            Kind::RevokeCredential(r) => self.apply_revoke_credential(r),
            Kind::RevokeToken(r) => self.apply_revoke_token(r),
            Kind::SetTenantQuota(q) => self.apply_set_tenant_quota(q),
            Kind::ReportPgUsage(r) => self.apply_report_pg_usage(r, cmd.stamp_ms),
            Kind::SwitchActiveSite(w) => self.apply_switch_active_site(w),
            Kind::SetCatalogVoters(v) => self.apply_set_catalog_voters(v),
            Kind::CompleteForcedFailover(f) => self.apply_complete_forced_failover(f, cmd.stamp_ms),
            Kind::RecordDivergence(r) => self.apply_record_divergence(r),
            Kind::PutDrill(d) => self.apply_put_drill(d, cmd.stamp_ms),
            Kind::RecordDrillIo(d) => self.apply_record_drill_io(d),
            Kind::RecordDrillLag(d) => self.apply_record_drill_lag(d),
            Kind::StopDrill(d) => self.apply_stop_drill(d, cmd.stamp_ms),
            Kind::RecordProgress(p) => self.apply_record_progress(p),
            Kind::RecordResync(r) => self.apply_record_resync(r),
            Kind::RebuildCluster(r) => self.apply_rebuild_cluster(r, cmd.stamp_ms),
        }
    }

    /// The index of the newest version of a block, 0 if it has none.
    fn latest_index(&self, volume: u64, block: u64) -> io::Result<u64> {
        if let Some(i) = self.block_overlay.get(&(volume, block)) {
            return Ok(*i);
        }
        let stored = Volumes::new(self.db.clone())
            .latest_blocks(self.pg, VolumeId(volume), BlockNo(block), 1)
            .map_err(io::Error::other)?;
        Ok(stored.into_iter().next().flatten().map_or(0, |s| s.index.0))
    }

    fn apply_write_blocks(&mut self, index: LogIndex, w: &pb::WriteBlocks) -> io::Result<Outcome> {
        let record = match self.active_volume(w.volume)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let blocks = record.size_bytes.div_ceil(BLOCK_BYTES as u64);
        if let Some(bad) = w.blocks.iter().find(|b| b.block >= blocks) {
            return Ok(Err(Rejection::BlockOutOfRange {
                volume: w.volume,
                block: bad.block,
                blocks,
            }));
        }
        if let Some(read_through) = w.newest_mask {
            // Masks change only in batches of their own: the store has them.
            let newest = masks::newest_mask(self.db, self.pg).map_err(io::Error::other)?;
            if newest.map_or(0, |i| i.0) != read_through {
                return Ok(Err(Rejection::BlockChanged {
                    volume: w.volume,
                    block: w.blocks.first().map_or(0, |b| b.block),
                }));
            }
        }
        for b in &w.blocks {
            if let Some(expected) = b.expect_latest
                && self.latest_index(w.volume, b.block)? != expected
            {
                return Ok(Err(Rejection::BlockChanged {
                    volume: w.volume,
                    block: b.block,
                }));
            }
        }
        if w.blocks.len() > 1 {
            // One version per block and index: a block named twice would
            // overwrite its own row (and be counted twice).
            let mut seen = std::collections::HashSet::with_capacity(w.blocks.len());
            if let Some(twice) = w.blocks.iter().find(|b| !seen.insert(b.block)) {
                return Ok(Err(Rejection::Malformed {
                    reason: format!("block {} is written twice in one entry", twice.block),
                }));
            }
        }
        let bytes: u64 = w.blocks.iter().map(|b| b.frame.len() as u64).sum();
        let count = w.blocks.len() as u64;
        self.count_usage(|u| {
            u.versions += count;
            u.stored_bytes += bytes;
        })?;
        for b in &w.blocks {
            self.block_overlay.insert((w.volume, b.block), index.0);
            volumes::stage_block(
                &mut self.batch,
                self.pg,
                VolumeId(w.volume),
                BlockNo(b.block),
                index,
                BlockContent::from_stored(&b.frame),
            );
        }
        Ok(Ok(Applied::Done))
    }

    fn apply_create_volume(
        &mut self,
        index: LogIndex,
        c: &pb::CreateVolume,
    ) -> io::Result<Outcome> {
        if self.volume(VolumeId(c.volume))?.is_some() {
            return Ok(Err(Rejection::VolumeExists { volume: c.volume }));
        }
        let base = match &c.base {
            None => None,
            Some(b) => match self.check_clone_base(index, b)? {
                Ok(base) => Some(base),
                Err(rejection) => return Ok(Err(rejection)),
            },
        };
        let record = VolumeRecord {
            name: c.name.clone(),
            size_bytes: c.size_bytes,
            state: VolumeState::Active,
            base,
        };
        self.put_volume(VolumeId(c.volume), index, record);
        Ok(Ok(Applied::Done))
    }

    fn apply_undelete_volume(
        &mut self,
        index: LogIndex,
        u: &pb::UndeleteVolume,
    ) -> io::Result<Outcome> {
        // A deleted volume's newest record is its deletion.
        let (deleted_at, mut record) = match self.volume_row(VolumeId(u.volume))? {
            Some((at, r)) if r.state == VolumeState::Deleted => (at, r),
            _ => return Ok(Err(Rejection::VolumeNotFound { volume: u.volume })),
        };
        if let Some(rejection) = self.check_deleted_in_window(deleted_at, index)? {
            return Ok(Err(rejection));
        }
        record.state = VolumeState::Active;
        self.put_volume(VolumeId(u.volume), index, record);
        Ok(Ok(Applied::Done))
    }

    /// Refuses to bring back what was deleted at or behind the horizon:
    /// its data may be gone (pins keep only moments when it was live).
    fn check_deleted_in_window(
        &self,
        deleted_at: LogIndex,
        index: LogIndex,
    ) -> io::Result<Option<Rejection>> {
        Ok(gc::horizon(self.db, self.pg)
            .map_err(io::Error::other)?
            .filter(|h| deleted_at <= h.index)
            .map(|h| Rejection::IndexOutOfHistory {
                index: deleted_at.0,
                oldest: h.index.0 + 1,
                newest: index.0 - 1,
            }))
    }

    fn apply_undelete_bucket(
        &mut self,
        index: LogIndex,
        u: &pb::UndeleteBucket,
    ) -> io::Result<Outcome> {
        let bucket = BucketId(u.bucket);
        let (deleted_at, mut record) = match self.bucket_row(bucket)? {
            Some((at, r)) if r.state == BucketState::Deleted => (at, r),
            _ => return Ok(Err(Rejection::BucketNotFound { bucket: u.bucket })),
        };
        if let Some(rejection) = self.check_deleted_in_window(deleted_at, index)? {
            return Ok(Err(rejection));
        }
        record.state = BucketState::Active;
        self.put_bucket(bucket, index, record);
        Ok(Ok(Applied::Done))
    }

    /// A clone's base must be a volume of this PG that was live at an
    /// index before this one, in a chain short enough to read.
    fn check_clone_base(
        &self,
        index: LogIndex,
        b: &pb::VolumeBase,
    ) -> io::Result<Result<VolumeBase, Rejection>> {
        if let Some(source) = b.pg {
            // A drill's clone: its base is in the drill's source PG, which
            // this PG's state cannot see (every replica of it sits beside
            // a replica of the source, at its own pace). The proposer
            // checked it, and the drill's pin in the source keeps it.
            if source == self.pg.0 || source == PgId::CATALOG.0 || b.index == 0 {
                return Ok(Err(Rejection::Malformed {
                    reason: format!(
                        "a drill's clone reads another tenant PG at an index, not PG {source} at {}",
                        b.index
                    ),
                }));
            }
            return Ok(Ok(VolumeBase {
                volume: VolumeId(b.volume),
                index: LogIndex(b.index),
                pg: Some(PgId(source)),
            }));
        }
        if b.index == 0 || b.index >= index.0 {
            return Ok(Err(Rejection::IndexOutOfHistory {
                index: b.index,
                oldest: 1,
                newest: index.0 - 1,
            }));
        }
        if let Some(rejection) = self.check_held(b.index, LogIndex(index.0 - 1))? {
            return Ok(Err(rejection));
        }
        let volumes = Volumes::new(self.db.clone());
        let live = volumes
            .volume_at(self.pg, VolumeId(b.volume), LogIndex(b.index))
            .map_err(io::Error::other)?
            .is_some_and(|(_, r)| r.state == VolumeState::Active);
        if !live {
            return Ok(Err(Rejection::VolumeNotFound { volume: b.volume }));
        }
        // Layers repeat a volume once per restore it went through: the
        // depth is the number of volumes in the chain.
        let depth = volumes
            .layers(self.pg, VolumeId(b.volume), Some(LogIndex(b.index)))
            .map_err(io::Error::other)?
            .iter()
            .map(|l| l.volume)
            .collect::<std::collections::HashSet<_>>()
            .len();
        if depth >= volumes::CLONE_DEPTH_MAX {
            return Ok(Err(Rejection::Malformed {
                reason: format!(
                    "clones may be nested at most {} deep",
                    volumes::CLONE_DEPTH_MAX
                ),
            }));
        }
        Ok(Ok(VolumeBase {
            volume: VolumeId(b.volume),
            index: LogIndex(b.index),
            pg: None,
        }))
    }

    fn apply_resize_volume(
        &mut self,
        index: LogIndex,
        r: &pb::ResizeVolume,
    ) -> io::Result<Outcome> {
        let mut record = match self.active_volume(r.volume)? {
            Ok(rec) => rec,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if r.size_bytes < record.size_bytes {
            return Ok(Err(Rejection::VolumeShrink {
                volume: r.volume,
                from_bytes: record.size_bytes,
                to_bytes: r.size_bytes,
            }));
        }
        record.size_bytes = r.size_bytes;
        self.put_volume(VolumeId(r.volume), index, record);
        Ok(Ok(Applied::Done))
    }

    fn apply_delete_volume(
        &mut self,
        index: LogIndex,
        d: &pb::DeleteVolume,
    ) -> io::Result<Outcome> {
        let mut record = match self.active_volume(d.volume)? {
            Ok(rec) => rec,
            Err(rejection) => return Ok(Err(rejection)),
        };
        record.state = VolumeState::Deleted;
        self.put_volume(VolumeId(d.volume), index, record);
        Ok(Ok(Applied::Done))
    }

    fn apply_init_catalog(&mut self, i: &pb::InitCatalog, stamp_ms: u64) -> io::Result<Outcome> {
        if self
            .catalog_get::<pb::ClusterRecord>(catalog::CLUSTER_KEY)?
            .is_some()
        {
            return Ok(Err(Rejection::AlreadyInitialized));
        }
        let record = pb::ClusterRecord {
            cluster_id: i.cluster_id.clone(),
            site: i.site.clone(),
            node_id: i.node_id,
            created_ms: stamp_ms,
            ca_cert_pem: i.ca_cert_pem.clone(),
            ca_key_sealed: i.ca_key_sealed.clone(),
            rebuilds: Vec::new(),
        };
        self.catalog_put(catalog::CLUSTER_KEY.to_vec(), &record);
        self.catalog_put(
            catalog::node_key(i.node_id),
            &pb::NodeRecord {
                id: i.node_id,
                site: i.site.clone(),
                addrs: i.addrs.clone(),
                added_ms: stamp_ms,
                removed: false,
                witness: false,
            },
        );
        // Member 1 is the first node's catalog member (the catalog could not
        // allocate it before it existed); the counter continues at 2.
        let first_member = catalog::FIRST_CATALOG_MEMBER;
        self.put_counter(Counter::Member, first_member + 1);
        self.put_pg_record(&pb::PgRecord {
            id: 0,
            tenant_id: 0,
            name: String::new(),
            generation: 0,
            active_site: i.site.clone(),
            members: vec![pb::PgMember {
                member_id: first_member,
                node_id: i.node_id,
                voter: true,
            }],
            created_ms: stamp_ms,
            ..Default::default()
        });
        self.catalog_put(
            catalog::token_key(&i.operator_token_sha256),
            &pb::TokenRecord {
                role: "operator".into(),
                created_ms: stamp_ms,
            },
        );
        Ok(Ok(Applied::Done))
    }

    fn apply_create_tenant(&mut self, t: &pb::CreateTenant, stamp_ms: u64) -> io::Result<Outcome> {
        // Every check before anything is staged: a refused command leaves
        // no trace in the batch.
        let key = catalog::tenant_key(&t.name);
        if self.catalog_get::<pb::TenantRecord>(&key)?.is_some() {
            return Ok(Err(Rejection::TenantExists {
                tenant: t.name.clone(),
            }));
        }
        let cluster = match self.cluster()? {
            Ok(c) => c,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if let Some(rejection) = self.dead_node_among(&t.members)? {
            return Ok(Err(rejection));
        }
        let tenant_id = self.next_id(Counter::Tenant)?;
        let record = pb::TenantRecord {
            id: tenant_id,
            name: t.name.clone(),
            current_key_id: 1,
            wrapped_deks: [(1, t.wrapped_dek.clone())].into_iter().collect(),
            created_ms: stamp_ms,
            quota_bytes: 0,
        };
        self.catalog_put(key, &record);
        let main_pg = self.stage_new_pg(
            pb::PgRecord {
                tenant_id,
                tenant: t.name.clone(),
                name: catalog::MAIN_PG.into(),
                active_site: cluster.site,
                ack: pb::AckPolicy::AckLocal as i32,
                created_ms: stamp_ms,
                ..Default::default()
            },
            &t.members,
        )?;
        Ok(Ok(Applied::TenantCreated { tenant_id, main_pg }))
    }

    /// Stages a new PG record: its id and its members' ids come from the
    /// catalog's counters. Callers have checked everything before.
    fn stage_new_pg(
        &mut self,
        mut record: pb::PgRecord,
        placed: &[pb::PlacedMember],
    ) -> io::Result<u64> {
        record.id = self.next_id(Counter::Pg)?;
        record.generation = 0;
        record.members.clear();
        for m in placed {
            record.members.push(pb::PgMember {
                member_id: self.next_id(Counter::Member)?,
                node_id: m.node_id,
                voter: m.voter,
            });
        }
        self.put_pg_record(&record);
        Ok(record.id)
    }

    fn apply_create_pg(&mut self, c: &pb::CreatePg, stamp_ms: u64) -> io::Result<Outcome> {
        let Some(tenant) = self.catalog_get::<pb::TenantRecord>(&catalog::tenant_key(&c.tenant))?
        else {
            return Ok(Err(Rejection::TenantNotFound {
                tenant: c.tenant.clone(),
            }));
        };
        if self
            .catalog_get::<pb::PgRecord>(&catalog::pg_key(&c.tenant, &c.name))?
            .is_some()
        {
            return Ok(Err(Rejection::PgExists {
                tenant: c.tenant.clone(),
                pg: c.name.clone(),
            }));
        }
        let cluster = match self.cluster()? {
            Ok(cluster) => cluster,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if let Some(rejection) = self.dead_node_among(&c.members)? {
            return Ok(Err(rejection));
        }
        let active_site = if c.active_site.is_empty() {
            cluster.site
        } else {
            c.active_site.clone()
        };
        if (c.drill == 0) != (c.drill_source == 0) {
            return Ok(Err(Rejection::Malformed {
                reason: "a drill's PG names both its drill and its source".into(),
            }));
        }
        let pg = self.stage_new_pg(
            pb::PgRecord {
                tenant_id: tenant.id,
                tenant: c.tenant.clone(),
                name: c.name.clone(),
                active_site,
                ack: c.ack,
                created_ms: stamp_ms,
                drill: c.drill,
                drill_source: c.drill_source,
                ..Default::default()
            },
            &c.members,
        )?;
        Ok(Ok(Applied::PgCreated { pg }))
    }

    fn apply_set_pg_ack(&mut self, a: &pb::SetPgAck) -> io::Result<Outcome> {
        let Some(mut record) =
            self.catalog_get::<pb::PgRecord>(&catalog::pg_key(&a.tenant, &a.name))?
        else {
            return Ok(Err(Rejection::PgNotFound {
                tenant: a.tenant.clone(),
                pg: a.name.clone(),
            }));
        };
        record.ack = a.ack;
        self.put_pg_record(&record);
        Ok(Ok(Applied::Done))
    }

    /// Makes `to_site` the active site of every PG named: its members there
    /// become the voters, every other member a learner. All or none: a PG
    /// that does not exist, is the catalog, or has no member at `to_site`
    /// refuses the whole command.
    fn apply_switch_active_site(&mut self, w: &pb::SwitchActiveSite) -> io::Result<Outcome> {
        let mut records = Vec::with_capacity(w.pgs.len());
        for &id in &w.pgs {
            if id == 0 {
                return Ok(Err(Rejection::Malformed {
                    reason: "the catalog's placement does not follow a switchover".into(),
                }));
            }
            let Some(pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(id))? else {
                return Ok(Err(Rejection::PgIdNotFound { pg: id }));
            };
            if pg.drill != 0 {
                return Ok(Err(Rejection::Malformed {
                    reason: format!(
                        "protection group {}/{} belongs to drill {} and stays at its site",
                        pg.tenant, pg.name, pg.drill
                    ),
                }));
            }
            records.push(pg);
        }
        for pg in &mut records {
            if pg.active_site == w.to_site {
                continue;
            }
            let mut at_target = 0;
            for m in &mut pg.members {
                let site = self
                    .catalog_get::<pb::NodeRecord>(&catalog::node_key(m.node_id))?
                    .filter(|n| !n.removed)
                    .map(|n| n.site);
                m.voter = site.as_deref() == Some(w.to_site.as_str());
                at_target += usize::from(m.voter);
            }
            if at_target == 0 {
                return Ok(Err(Rejection::NoMembersAtSite {
                    pg: pg.id,
                    site: w.to_site.clone(),
                }));
            }
            pg.active_site = w.to_site.clone();
        }
        for pg in &records {
            self.put_pg_record(pg);
        }
        Ok(Ok(Applied::Done))
    }

    fn apply_set_tenant_quota(&mut self, q: &pb::SetTenantQuota) -> io::Result<Outcome> {
        let key = catalog::tenant_key(&q.tenant);
        let Some(mut record) = self.catalog_get::<pb::TenantRecord>(&key)? else {
            return Ok(Err(Rejection::TenantNotFound {
                tenant: q.tenant.clone(),
            }));
        };
        record.quota_bytes = q.quota_bytes;
        self.catalog_put(key, &record);
        Ok(Ok(Applied::Done))
    }

    fn apply_report_pg_usage(
        &mut self,
        r: &pb::ReportPgUsage,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(mut record) =
            self.catalog_get::<pb::PgRecord>(&catalog::pg_key(&r.tenant, &r.name))?
        else {
            return Ok(Err(Rejection::PgNotFound {
                tenant: r.tenant.clone(),
                pg: r.name.clone(),
            }));
        };
        record.stored_bytes = r.stored_bytes;
        record.usage_ms = stamp_ms;
        self.put_pg_record(&record);
        Ok(Ok(Applied::Done))
    }

    fn apply_rotate_dek(&mut self, r: &pb::RotateDek) -> io::Result<Outcome> {
        let key = catalog::tenant_key(&r.tenant);
        let Some(mut record) = self.catalog_get::<pb::TenantRecord>(&key)? else {
            return Ok(Err(Rejection::TenantNotFound {
                tenant: r.tenant.clone(),
            }));
        };
        let proposed = wrapped_key_id(&r.wrapped_dek);
        let next = record.current_key_id + 1;
        if proposed != Some(next) {
            return Ok(Err(Rejection::KeyIdOutOfOrder {
                tenant: r.tenant.clone(),
                current: record.current_key_id,
                proposed: proposed.unwrap_or(0),
            }));
        }
        record.current_key_id = next;
        record.wrapped_deks.insert(next, r.wrapped_dek.clone());
        self.catalog_put(key, &record);
        Ok(Ok(Applied::KeyRotated { key_id: next }))
    }

    fn apply_create_token(&mut self, t: &pb::CreateToken, stamp_ms: u64) -> io::Result<Outcome> {
        self.catalog_put(
            catalog::token_key(&t.token_sha256),
            &pb::TokenRecord {
                role: t.role.clone(),
                created_ms: stamp_ms,
            },
        );
        Ok(Ok(Applied::Done))
    }

    fn apply_revoke_token(&mut self, r: &pb::RevokeToken) -> io::Result<Outcome> {
        let key = catalog::token_key(&r.token_sha256);
        if self.catalog_get::<pb::TokenRecord>(&key)?.is_none() {
            return Ok(Err(Rejection::TokenNotFound));
        }
        self.catalog_delete(key);
        Ok(Ok(Applied::Done))
    }

    fn apply_bind_volume_name(&mut self, b: &pb::BindVolumeName) -> io::Result<Outcome> {
        let key = catalog::volume_name_key(&b.tenant, &b.volume_name);
        if self.catalog_get::<pb::VolumeNameRecord>(&key)?.is_some() {
            return Ok(Err(Rejection::VolumeNameTaken {
                tenant: b.tenant.clone(),
                volume: b.volume_name.clone(),
            }));
        }
        let Some(pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_key(&b.tenant, &b.pg_name))?
        else {
            return Ok(Err(Rejection::PgNotFound {
                tenant: b.tenant.clone(),
                pg: b.pg_name.clone(),
            }));
        };
        let volume = match b.existing_volume {
            Some(volume) => volume,
            None => self.next_id(Counter::Volume)?,
        };
        self.catalog_put(key, &pb::VolumeNameRecord { pg: pg.id, volume });
        Ok(Ok(Applied::VolumeNameBound { pg: pg.id, volume }))
    }

    fn apply_unbind_volume_name(&mut self, u: &pb::UnbindVolumeName) -> io::Result<Outcome> {
        let key = catalog::volume_name_key(&u.tenant, &u.volume_name);
        if self.catalog_get::<pb::VolumeNameRecord>(&key)?.is_none() {
            return Ok(Err(Rejection::VolumeNameNotFound {
                tenant: u.tenant.clone(),
                volume: u.volume_name.clone(),
            }));
        }
        self.catalog_delete(key);
        Ok(Ok(Applied::Done))
    }
}

/// Buckets and objects (S3).
impl ApplyContext<'_> {
    fn objects(&self) -> Objects {
        Objects::new(self.db.clone())
    }

    fn bucket(&self, bucket: BucketId) -> io::Result<Option<BucketRecord>> {
        Ok(self.bucket_row(bucket)?.map(|(_, r)| r))
    }

    /// A bucket's newest record and the index it was written at.
    fn bucket_row(&self, bucket: BucketId) -> io::Result<Option<(LogIndex, BucketRecord)>> {
        if let Some(row) = self.bucket_overlay.get(&bucket) {
            return Ok(Some(row.clone()));
        }
        self.objects()
            .bucket(self.pg, bucket)
            .map_err(io::Error::other)
    }

    fn active_bucket(&self, bucket: u64) -> io::Result<Result<BucketRecord, Rejection>> {
        Ok(match self.bucket(BucketId(bucket))? {
            Some(r) if r.state == BucketState::Active => Ok(r),
            _ => Err(Rejection::BucketNotFound { bucket }),
        })
    }

    /// A bucket that takes writes: live and not a read-only clone.
    fn writable_bucket(&self, bucket: u64) -> io::Result<Result<BucketRecord, Rejection>> {
        Ok(match self.active_bucket(bucket)? {
            Ok(r) if !r.takes_writes() => Err(Rejection::BucketReadOnly { bucket }),
            other => other,
        })
    }

    fn put_bucket(&mut self, bucket: BucketId, index: LogIndex, record: BucketRecord) {
        objects::stage_bucket(&mut self.batch, self.pg, bucket, index, &record);
        self.bucket_overlay.insert(bucket, (index, record));
    }

    /// The PG's rollback masks, newest first (read once per batch).
    fn pg_masks(&self) -> io::Result<&[masks::RollbackMask]> {
        Ok(match self.masks.get() {
            Some(m) => m,
            None => {
                let loaded = masks::masks(self.db, self.pg).map_err(io::Error::other)?;
                self.masks.get_or_init(|| loaded)
            }
        })
    }

    /// What reads of a bucket at its newest go through: one plain span
    /// unless a restore masked it.
    fn bucket_spans(&self, bucket: BucketId) -> io::Result<Vec<Span>> {
        Ok(masks::spans(
            self.pg_masks()?,
            |m| m.covers_bucket(bucket),
            None,
        ))
    }

    /// The index of the newest live version of an object, as reads see it
    /// (through a restore's mask, and in a writable clone through its own
    /// versions to its base's).
    fn object_latest(&self, bucket: BucketId, key: &[u8]) -> io::Result<Option<u64>> {
        if let Some(base) = self.bucket(bucket)?.and_then(|r| r.base) {
            return self.clone_object_latest(bucket, base, key);
        }
        // Staged in this batch: newer than any mask.
        if let Some(staged) = self.object_overlay.get(&(bucket, key.to_vec())) {
            return Ok(*staged);
        }
        let spans = self.bucket_spans(bucket)?;
        let found = if spans == [Span::plain(None)] {
            // Unmasked: one point read of `latest`, as before restores.
            self.objects().latest_index(self.pg, bucket, key)
        } else {
            self.objects()
                .find(self.pg, bucket, key, &spans)
                .map(|v| v.map(|(i, _)| i))
        };
        Ok(found.map_err(io::Error::other)?.map(|i| i.0))
    }

    /// [`Self::object_latest`] in a clone: its own versions (this batch's
    /// included) decide the key unless none is in reach; then its base at
    /// the cloned index does, which no entry after that index changes. A
    /// drill's base, in another PG, is not read (see `pb::BucketBase::pg`):
    /// the key counts as absent.
    fn clone_object_latest(
        &self,
        bucket: BucketId,
        base: BucketBase,
        key: &[u8],
    ) -> io::Result<Option<u64>> {
        let newest_first: Vec<(LogIndex, ObjectVersion)> = self
            .versions_of(bucket, key)?
            .into_iter()
            .rev()
            .map(|(i, v)| (LogIndex(i), v))
            .collect();
        match objects::seen_version(&newest_first, &self.bucket_spans(bucket)?) {
            objects::Seen::Live(index, _) => return Ok(Some(index.0)),
            objects::Seen::Hidden => return Ok(None),
            objects::Seen::Absent if base.pg.is_some() => return Ok(None),
            objects::Seen::Absent => {}
        }
        let objects = self.objects();
        let layers = objects
            .layers(self.pg, base.bucket, Some(base.index), self.pg_masks()?)
            .map_err(io::Error::other)?;
        Ok(objects
            .find_layered(self.pg, &layers, key)
            .map_err(io::Error::other)?
            .map(|(_, index, _)| index.0))
    }

    fn chunk_refs(&self, chunk: ChunkId) -> io::Result<u64> {
        Ok(self.chunk_state(chunk)?.refs)
    }

    fn chunk_state(&self, chunk: ChunkId) -> io::Result<ChunkState> {
        if let Some(state) = self.chunk_overlay.get(&chunk) {
            return Ok(*state);
        }
        self.objects()
            .chunk_state(self.pg, chunk)
            .map_err(io::Error::other)
    }

    /// Changes the PG's usage row (staged with the batch).
    fn count_usage(&mut self, change: impl FnOnce(&mut Usage)) -> io::Result<()> {
        let mut now = match self.usage {
            Some(u) => u,
            None => usage::usage(self.db, self.pg).map_err(io::Error::other)?,
        };
        change(&mut now);
        usage::stage_usage(&mut self.batch, self.pg, &now);
        self.usage = Some(now);
        Ok(())
    }

    fn bucket_is_empty(&self, bucket: BucketId) -> io::Result<bool> {
        if self
            .object_overlay
            .iter()
            .any(|((b, _), live)| *b == bucket && live.is_some())
        {
            return Ok(false);
        }
        // Live rows of the database, less those this batch deleted.
        let spans = self.bucket_spans(bucket)?;
        let mut resume: Option<Vec<u8>> = None;
        loop {
            let page = self
                .objects()
                .list_view(
                    self.pg,
                    bucket,
                    &spans,
                    &objects::ListQuery {
                        resume: resume.as_deref(),
                        limit: 64,
                        ..Default::default()
                    },
                )
                .map_err(io::Error::other)?;
            for entry in &page.entries {
                if let objects::Listed::Object { key, .. } = entry
                    && self.object_overlay.get(&(bucket, key.clone())) != Some(&None)
                {
                    return Ok(false);
                }
            }
            match page.resume {
                Some(r) => resume = Some(r),
                None => return Ok(true),
            }
        }
    }

    fn apply_create_bucket(
        &mut self,
        index: LogIndex,
        c: &pb::CreateBucket,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let bucket = BucketId(c.bucket);
        if self.bucket(bucket)?.is_some() {
            return Ok(Err(Rejection::BucketExists { bucket: c.bucket }));
        }
        // Buckets and volumes share ids, and with them `latest` key space.
        if self.volume(VolumeId(c.bucket))?.is_some() {
            return Ok(Err(Rejection::VolumeExists { volume: c.bucket }));
        }
        let base = match &c.base {
            None => None,
            Some(b) if b.pg.is_some() => {
                // A drill's clone: as for volumes (`check_clone_base`),
                // the proposer checked the base in the source PG.
                let source = b.pg.unwrap_or_default();
                if source == self.pg.0 || source == PgId::CATALOG.0 || b.index == 0 {
                    return Ok(Err(Rejection::Malformed {
                        reason: format!(
                            "a drill's clone reads another tenant PG at an index, not PG {source} at {}",
                            b.index
                        ),
                    }));
                }
                Some(BucketBase {
                    bucket: BucketId(b.bucket),
                    index: LogIndex(b.index),
                    writable: b.writable,
                    pg: Some(PgId(source)),
                })
            }
            Some(b) => {
                // A clone of a read-only clone names that clone's base
                // (the node does so): only a bucket with data of its own,
                // a plain one or a writable clone, is a base.
                let live_then = self
                    .objects()
                    .bucket_at(self.pg, BucketId(b.bucket), LogIndex(b.index))
                    .map_err(io::Error::other)?
                    .is_some_and(|(_, r)| r.state == BucketState::Active && !r.is_read_only());
                if b.index == 0 || b.index >= index.0 || !live_then {
                    return Ok(Err(Rejection::BucketNotFound { bucket: b.bucket }));
                }
                if let Some(rejection) = self.check_held(b.index, LogIndex(index.0 - 1))? {
                    return Ok(Err(rejection));
                }
                let depth = self
                    .objects()
                    .layers(self.pg, BucketId(b.bucket), Some(LogIndex(b.index)), &[])
                    .map_err(io::Error::other)?
                    .len();
                if depth >= objects::CLONE_DEPTH_MAX {
                    return Ok(Err(Rejection::Malformed {
                        reason: format!(
                            "clones may be nested at most {} deep",
                            objects::CLONE_DEPTH_MAX
                        ),
                    }));
                }
                Some(BucketBase {
                    bucket: BucketId(b.bucket),
                    index: LogIndex(b.index),
                    writable: b.writable,
                    pg: None,
                })
            }
        };
        let record = BucketRecord {
            name: c.name.clone(),
            state: BucketState::Active,
            created_ms: stamp_ms,
            base,
            sealed: false,
        };
        self.put_bucket(bucket, index, record);
        Ok(Ok(Applied::Done))
    }

    /// Seals a bucket: from this index on it takes no writes, and keeps
    /// and shows what it holds.
    fn apply_seal_bucket(&mut self, index: LogIndex, s: &pb::SealBucket) -> io::Result<Outcome> {
        let record = match self.active_bucket(s.bucket)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if !record.sealed {
            let sealed = BucketRecord {
                sealed: true,
                ..record
            };
            self.put_bucket(BucketId(s.bucket), index, sealed);
        }
        Ok(Ok(Applied::Done))
    }

    fn apply_delete_bucket(
        &mut self,
        index: LogIndex,
        d: &pb::DeleteBucket,
    ) -> io::Result<Outcome> {
        let mut record = match self.active_bucket(d.bucket)? {
            Ok(r) => r,
            Err(rejection) => return Ok(Err(rejection)),
        };
        // A sealed bucket (a divergence snapshot) can never be emptied: it
        // goes whole, its data kept for the window like any deleted one's.
        if !record.sealed && !self.bucket_is_empty(BucketId(d.bucket))? {
            return Ok(Err(Rejection::BucketNotEmpty { bucket: d.bucket }));
        }
        // S3 deletes a bucket's unfinished multipart uploads with it.
        self.abort_uploads_of(BucketId(d.bucket))?;
        record.state = BucketState::Deleted;
        self.put_bucket(BucketId(d.bucket), index, record);
        Ok(Ok(Applied::Done))
    }

    fn apply_put_object(&mut self, index: LogIndex, p: &pb::PutObject) -> io::Result<Outcome> {
        let bucket = BucketId(p.bucket);
        if let Err(rejection) = self.writable_bucket(p.bucket)? {
            return Ok(Err(rejection));
        }
        if let Err(rejection) = uploads::check_key(&p.key) {
            return Ok(Err(rejection));
        }
        if p.if_absent && self.object_latest(bucket, &p.key)?.is_some() {
            return Ok(Err(Rejection::ObjectExists));
        }
        // Every check before anything is staged.
        if let Err(rejection) = self.check_chunks(&p.chunks, &p.new_chunks)? {
            return Ok(Err(rejection));
        }
        self.take_chunks(&p.chunks, &p.new_chunks)?;
        let version = ObjectVersion::Object {
            chunks: p.chunks.iter().map(|c| ChunkId(*c)).collect(),
            record: p.record.to_vec(),
        };
        self.stage_version(bucket, &p.key, index, version)?;
        // The stream's references pass to the version staged above.
        self.release_stream(p.stream)?;
        Ok(Ok(Applied::Done))
    }

    fn apply_delete_object(
        &mut self,
        index: LogIndex,
        d: &pb::DeleteObject,
    ) -> io::Result<Outcome> {
        let bucket = BucketId(d.bucket);
        let over_other_pg = match self.writable_bucket(d.bucket)? {
            Err(rejection) => return Ok(Err(rejection)),
            Ok(record) => record.base.is_some_and(|b| b.pg.is_some()),
        };
        // A drill's clone cannot see whether its base has the key: the
        // marker hides it if it does.
        if self.object_latest(bucket, &d.key)?.is_none() && !over_other_pg {
            return Ok(Ok(Applied::Done));
        }
        self.stage_version(bucket, &d.key, index, ObjectVersion::DeleteMarker)?;
        Ok(Ok(Applied::Done))
    }

    /// Stages a new version of `key` (object or delete marker) and moves
    /// `latest` with it.
    fn stage_version(
        &mut self,
        bucket: BucketId,
        key: &[u8],
        index: LogIndex,
        v: ObjectVersion,
    ) -> io::Result<()> {
        let replaces = self
            .version_overlay
            .get(&(bucket, key.to_vec()))
            .is_some_and(|staged| staged.contains_key(&index.0));
        if !replaces {
            // The row's bytes are its chunks', counted as they are written.
            self.count_usage(|u| u.versions += 1)?;
        }
        objects::stage_object_version(&mut self.batch, self.pg, bucket, key, index, &v);
        let live = matches!(v, ObjectVersion::Object { .. }).then_some(index.0);
        self.object_overlay.insert((bucket, key.to_vec()), live);
        self.version_overlay
            .entry((bucket, key.to_vec()))
            .or_default()
            .insert(index.0, v);
        Ok(())
    }

    /// Every version of `key`, this batch's included, by index.
    fn versions_of(
        &self,
        bucket: BucketId,
        key: &[u8],
    ) -> io::Result<BTreeMap<u64, ObjectVersion>> {
        let mut all: BTreeMap<u64, ObjectVersion> = self
            .objects()
            .versions(self.pg, bucket, key)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(i, v)| (i.0, v))
            .collect();
        if let Some(staged) = self.version_overlay.get(&(bucket, key.to_vec())) {
            all.extend(staged.iter().map(|(i, v)| (*i, v.clone())));
        }
        Ok(all)
    }

    /// Removes one version by its id: it leaves listings and plain reads,
    /// and `latest` moves to the newest version still there. Its chunks
    /// stay referenced for reads of the past until the history's GC.
    fn apply_delete_object_version(
        &mut self,
        index: LogIndex,
        d: &pb::DeleteObjectVersion,
    ) -> io::Result<Outcome> {
        let bucket = BucketId(d.bucket);
        if let Err(rejection) = self.writable_bucket(d.bucket)? {
            return Ok(Err(rejection));
        }
        let mut versions = self.versions_of(bucket, &d.key)?;
        let Some(original) = versions
            .get(&d.index)
            .filter(|v| !matches!(v, ObjectVersion::Removed { .. }))
            .cloned()
        else {
            return Ok(Err(Rejection::VersionNotFound { index: d.index }));
        };
        let was_marker = original == ObjectVersion::DeleteMarker;
        versions.insert(
            d.index,
            ObjectVersion::Removed {
                at: index,
                original: Box::new(original.clone()),
            },
        );
        let newest_left = versions
            .iter()
            .rev()
            .find(|(_, v)| !matches!(v, ObjectVersion::Removed { .. }));
        let new_latest = match newest_left {
            Some((i, ObjectVersion::Object { .. })) => Some(LogIndex(*i)),
            _ => None,
        };
        objects::stage_version_removal(
            &mut self.batch,
            self.pg,
            bucket,
            &d.key,
            LogIndex(d.index),
            index,
            original,
            new_latest,
        );
        // What later entries of this batch see: through the bucket's mask.
        let spans = self.bucket_spans(bucket)?;
        let visible = match spans.as_slice() {
            [span] if *span == Span::plain(None) => new_latest,
            spans => {
                let newest_first: Vec<(LogIndex, ObjectVersion)> = versions
                    .iter()
                    .rev()
                    .map(|(i, v)| (LogIndex(*i), v.clone()))
                    .collect();
                objects::visible_version(&newest_first, spans).map(|(i, _)| i)
            }
        };
        self.object_overlay
            .insert((bucket, d.key.to_vec()), visible.map(|i| i.0));
        self.version_overlay
            .insert((bucket, d.key.to_vec()), versions);
        Ok(Ok(Applied::VersionDeleted {
            delete_marker: was_marker,
        }))
    }

    fn apply_bind_bucket_name(&mut self, b: &pb::BindBucketName) -> io::Result<Outcome> {
        let key = catalog::bucket_name_key(&b.bucket_name);
        if self.catalog_get::<pb::BucketNameRecord>(&key)?.is_some() {
            return Ok(Err(Rejection::BucketNameTaken {
                bucket: b.bucket_name.clone(),
            }));
        }
        let Some(pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_key(&b.tenant, &b.pg_name))?
        else {
            return Ok(Err(Rejection::PgNotFound {
                tenant: b.tenant.clone(),
                pg: b.pg_name.clone(),
            }));
        };
        let bucket = match b.existing_bucket {
            Some(bucket) => bucket,
            None => self.next_id(Counter::Volume)?,
        };
        self.catalog_put(
            key,
            &pb::BucketNameRecord {
                tenant_id: pg.tenant_id,
                pg: pg.id,
                bucket,
            },
        );
        Ok(Ok(Applied::BucketNameBound { pg: pg.id, bucket }))
    }

    fn apply_unbind_bucket_name(&mut self, u: &pb::UnbindBucketName) -> io::Result<Outcome> {
        let key = catalog::bucket_name_key(&u.bucket_name);
        let Some(record) = self.catalog_get::<pb::BucketNameRecord>(&key)? else {
            return Ok(Err(Rejection::BucketNameNotFound {
                bucket: u.bucket_name.clone(),
            }));
        };
        // Only the owning tenant may give a name back.
        let owner = self.catalog_get::<pb::TenantRecord>(&catalog::tenant_key(&u.tenant))?;
        if owner.is_none_or(|t| t.id != record.tenant_id) {
            return Ok(Err(Rejection::BucketNameNotFound {
                bucket: u.bucket_name.clone(),
            }));
        }
        self.catalog_delete(key);
        Ok(Ok(Applied::Done))
    }
}

/// S3 credentials (catalog).
impl ApplyContext<'_> {
    fn apply_create_credential(
        &mut self,
        c: &pb::CreateCredential,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(tenant) = self.catalog_get::<pb::TenantRecord>(&catalog::tenant_key(&c.tenant))?
        else {
            return Ok(Err(Rejection::TenantNotFound {
                tenant: c.tenant.clone(),
            }));
        };
        if !matches!(c.mode.as_str(), "full" | "read-only" | "append-only") {
            return Ok(Err(Rejection::Malformed {
                reason: format!("unknown credential mode {:?}", c.mode),
            }));
        }
        let key = catalog::credential_key(&c.access_key);
        if self.catalog_get::<pb::CredentialRecord>(&key)?.is_some() {
            return Ok(Err(Rejection::CredentialExists {
                access_key: c.access_key.clone(),
            }));
        }
        self.catalog_put(
            key,
            &pb::CredentialRecord {
                tenant_id: tenant.id,
                tenant: c.tenant.clone(),
                access_key: c.access_key.clone(),
                secret_sealed: c.secret_sealed.clone(),
                mode: c.mode.clone(),
                writable_prefix: c.writable_prefix.clone(),
                created_ms: stamp_ms,
            },
        );
        Ok(Ok(Applied::Done))
    }

    fn apply_revoke_credential(&mut self, r: &pb::RevokeCredential) -> io::Result<Outcome> {
        let key = catalog::credential_key(&r.access_key);
        if self.catalog_get::<pb::CredentialRecord>(&key)?.is_none() {
            return Ok(Err(Rejection::CredentialNotFound {
                access_key: r.access_key.clone(),
            }));
        }
        self.catalog_delete(key);
        Ok(Ok(Applied::Done))
    }
}

impl ApplyContext<'_> {
    fn put_counter(&mut self, counter: Counter, next: u64) {
        let bytes = next.to_be_bytes().to_vec();
        self.batch.put(Cf::Catalog, counter.key(), &bytes);
        self.catalog_overlay
            .insert(counter.key().to_vec(), Some(bytes));
    }

    /// Writes a PG record under its id key and, for tenant PGs, its name key.
    fn put_pg_record(&mut self, pg: &pb::PgRecord) {
        if pg.id != 0 {
            self.catalog_put(catalog::pg_key(&pg.tenant, &pg.name), pg);
        }
        self.catalog_put(catalog::pg_id_key(pg.id), pg);
    }

    /// The cluster record, or the refusal for a catalog not initialised yet.
    fn cluster(&self) -> io::Result<Result<pb::ClusterRecord, Rejection>> {
        Ok(self
            .catalog_get::<pb::ClusterRecord>(catalog::CLUSTER_KEY)?
            .ok_or_else(|| Rejection::Malformed {
                reason: "the catalog is not initialised".into(),
            }))
    }

    fn node_is_live(&self, node: u64) -> io::Result<bool> {
        Ok(self
            .catalog_get::<pb::NodeRecord>(&catalog::node_key(node))?
            .is_some_and(|n| !n.removed))
    }

    fn apply_create_join_token(
        &mut self,
        t: &pb::CreateJoinToken,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        if t.token_sha256.len() != 32 {
            return Ok(Err(Rejection::Malformed {
                reason: "a join token hash is 32 bytes".into(),
            }));
        }
        self.catalog_put(
            catalog::join_token_key(&t.token_sha256),
            &pb::JoinTokenRecord {
                site: t.site.clone(),
                expires_ms: t.expires_ms,
                used_by_node: 0,
                created_ms: stamp_ms,
                node_key_sha256: Default::default(),
            },
        );
        Ok(Ok(Applied::Done))
    }

    /// The join token `sha256` as node `node` at `site` may spend it at
    /// `stamp_ms` (the entry's stamp, so every replica decides alike).
    fn check_join_token(
        &self,
        sha256: &[u8],
        node: u64,
        site: &str,
        stamp_ms: u64,
    ) -> io::Result<Result<pb::JoinTokenRecord, Rejection>> {
        let refuse = |reason: String| Ok(Err(Rejection::JoinToken { reason }));
        let Some(token) =
            self.catalog_get::<pb::JoinTokenRecord>(&catalog::join_token_key(sha256))?
        else {
            return refuse("unknown join token".into());
        };
        if token.used_by_node != 0 && token.used_by_node != node {
            return refuse(format!(
                "this join token was used by node {}",
                token.used_by_node
            ));
        }
        // Expiry holds for a retry by the same node too: a spent token must
        // not stay a way to get certificates.
        if stamp_ms > token.expires_ms {
            return refuse("this join token has expired".into());
        }
        if !token.site.is_empty() && token.site != site {
            return refuse(format!(
                "this join token is for site {:?}, not {site:?}",
                token.site
            ));
        }
        Ok(Ok(token))
    }

    fn apply_add_node(&mut self, a: &pb::AddNode, stamp_ms: u64) -> io::Result<Outcome> {
        // Every check before anything is staged. A node is added only by
        // spending a join token.
        let mut token =
            match self.check_join_token(&a.join_token_sha256, a.node_id, &a.site, stamp_ms)? {
                Ok(t) => t,
                Err(rejection) => return Ok(Err(rejection)),
            };
        let key = catalog::node_key(a.node_id);
        if a.node_id == 0 || self.catalog_get::<pb::NodeRecord>(&key)?.is_some() {
            return Ok(Err(Rejection::NodeExists { node: a.node_id }));
        }
        let cluster = match self.cluster()? {
            Ok(c) => c,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let Some(mut pg0) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(0))? else {
            return Ok(Err(Rejection::PgIdNotFound { pg: 0 }));
        };
        token.used_by_node = a.node_id;
        token.node_key_sha256 = a.node_key_sha256.clone();
        self.catalog_put(catalog::join_token_key(&a.join_token_sha256), &token);
        self.catalog_put(
            key,
            &pb::NodeRecord {
                id: a.node_id,
                site: a.site.clone(),
                addrs: a.addrs.clone(),
                added_ms: stamp_ms,
                removed: false,
                witness: a.witness,
            },
        );
        // Catalog voters: up to CATALOG_VOTERS, all at the cluster's own
        // site, so that a cut WAN never stops a healthy primary; every
        // other node follows the catalog as a learner. A witness joins as
        // a learner too; the catalog leader's placement then spreads the
        // voters across the sites and the witness (SetCatalogVoters).
        let voters = pg0.members.iter().filter(|m| m.voter).count();
        let voter = !a.witness && a.site == cluster.site && voters < catalog::CATALOG_VOTERS;
        let member = self.next_id(Counter::Member)?;
        pg0.members.push(pb::PgMember {
            member_id: member,
            node_id: a.node_id,
            voter,
        });
        self.put_pg_record(&pg0);
        Ok(Ok(Applied::NodeAdded {
            catalog_member: member,
            catalog_voter: voter,
        }))
    }

    fn apply_remove_node(&mut self, r: &pb::RemoveNode) -> io::Result<Outcome> {
        let key = catalog::node_key(r.node_id);
        let Some(mut node) = self.catalog_get::<pb::NodeRecord>(&key)? else {
            return Ok(Err(Rejection::NodeNotFound { node: r.node_id }));
        };
        node.removed = true;
        self.catalog_put(key, &node);
        let rows = self
            .db
            .scan(Cf::Catalog, b"pgid/", b"pgid/", usize::MAX)
            .map_err(io::Error::other)?;
        for (k, _) in rows {
            let Some(mut pg) = self.catalog_get::<pb::PgRecord>(&k)? else {
                continue;
            };
            let before = pg.members.len();
            pg.members.retain(|m| m.node_id != r.node_id);
            if pg.members.len() != before {
                self.put_pg_record(&pg);
            }
        }
        Ok(Ok(Applied::Done))
    }

    fn apply_complete_forced_failover(
        &mut self,
        f: &pb::CompleteForcedFailover,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(mut pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(f.pg))? else {
            return Ok(Err(Rejection::PgIdNotFound { pg: f.pg }));
        };
        if f.pg == 0 || f.generation != pg.generation + 1 {
            return Ok(Err(Rejection::Malformed {
                reason: format!(
                    "protection group {} is at generation {}, not {}",
                    f.pg,
                    pg.generation,
                    f.generation.saturating_sub(1)
                ),
            }));
        }
        let kept: Vec<pb::PgMember> = pg
            .members
            .iter()
            .filter(|m| f.keep_members.contains(&m.member_id))
            .cloned()
            .collect();
        if kept.is_empty() || kept.len() != f.keep_members.len() {
            return Ok(Err(Rejection::Malformed {
                reason: "the members kept must be members of the PG".into(),
            }));
        }
        pg.members = kept
            .into_iter()
            .map(|m| pb::PgMember { voter: true, ..m })
            .collect();
        pg.generation = f.generation;
        pg.lineage.push(pb::LineageEntry {
            generation: f.generation,
            first_index: f.fork_index + 1,
            started_ms: stamp_ms,
            from_site: f.from_site.clone(),
            to_site: pg.active_site.clone(),
            rpo: f.rpo,
        });
        self.put_pg_record(&pg);
        Ok(Ok(Applied::Done))
    }

    /// Keeps each PG's newest progress report of its current generation
    /// (see `pb::PgProgress`); others change nothing.
    fn apply_record_progress(&mut self, r: &pb::RecordProgress) -> io::Result<Outcome> {
        for p in &r.pgs {
            let Some(pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(p.pg))? else {
                continue;
            };
            let key = catalog::progress_key(p.pg);
            let kept = self.catalog_get::<pb::PgProgress>(&key)?;
            let newer = kept.is_none_or(|k| {
                k.generation < p.generation
                    || (k.generation == p.generation && k.applied_index < p.applied_index)
            });
            if p.generation == pg.generation && newer {
                self.catalog_put(key, p);
            }
        }
        Ok(Ok(Applied::Done))
    }

    /// Keeps a node's newest delta resync of a PG (see `ResyncRecord`).
    fn apply_record_resync(&mut self, r: &pb::RecordResync) -> io::Result<Outcome> {
        let Some(record) = r.record.as_ref() else {
            return Ok(Err(Rejection::Malformed {
                reason: "a resync without its record".into(),
            }));
        };
        if self
            .catalog_get::<pb::PgRecord>(&catalog::pg_id_key(record.pg))?
            .is_none()
        {
            return Ok(Err(Rejection::PgIdNotFound { pg: record.pg }));
        }
        self.catalog_put(catalog::resync_key(record.pg, record.node_id), record);
        Ok(Ok(Applied::Done))
    }

    /// Keeps what an old member had past a forced failover's fork (see
    /// `DivergenceRecord`), once its node has carried it into the PG's new
    /// generation.
    fn apply_record_divergence(&mut self, r: &pb::RecordDivergence) -> io::Result<Outcome> {
        let Some(record) = r.record.as_ref() else {
            return Ok(Err(Rejection::Malformed {
                reason: "a divergence without its record".into(),
            }));
        };
        let Some(pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(record.pg))? else {
            return Ok(Err(Rejection::PgIdNotFound { pg: record.pg }));
        };
        if record.generation >= pg.generation || record.last_index <= record.fork_index {
            return Ok(Err(Rejection::Malformed {
                reason: format!(
                    "no divergence of generation {} past index {} in protection group {} (at generation {})",
                    record.generation, record.fork_index, record.pg, pg.generation
                ),
            }));
        }
        self.catalog_put(
            catalog::divergence_key(record.pg, record.generation, record.node_id),
            record,
        );
        Ok(Ok(Applied::Done))
    }

    fn apply_set_catalog_voters(&mut self, v: &pb::SetCatalogVoters) -> io::Result<Outcome> {
        let Some(mut pg0) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(0))? else {
            return Ok(Err(Rejection::PgIdNotFound { pg: 0 }));
        };
        if v.voters.is_empty() {
            return Ok(Err(Rejection::Malformed {
                reason: "the catalog needs at least one voter".into(),
            }));
        }
        for id in &v.voters {
            let Some(m) = pg0.members.iter().find(|m| m.member_id == *id) else {
                return Ok(Err(Rejection::Malformed {
                    reason: format!("member {id} is not a catalog member"),
                }));
            };
            if !self.node_is_live(m.node_id)? {
                return Ok(Err(Rejection::NodeNotFound { node: m.node_id }));
            }
        }
        for m in &mut pg0.members {
            m.voter = v.voters.contains(&m.member_id);
        }
        self.put_pg_record(&pg0);
        Ok(Ok(Applied::Done))
    }

    /// The catalog rebuilt at a surviving site: the new identity and CA,
    /// the catalog's new generation and site, and only the surviving
    /// members of the catalog (one voter; placement adds more). Refused
    /// unless it follows the record it replaces, so a repeated rebuild
    /// cannot apply twice.
    fn apply_rebuild_cluster(
        &mut self,
        r: &pb::RebuildCluster,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let Some(mut cluster) = self.catalog_get::<pb::ClusterRecord>(catalog::CLUSTER_KEY)? else {
            return Ok(Err(Rejection::Malformed {
                reason: "no cluster to rebuild".into(),
            }));
        };
        let Some(mut pg0) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(0))? else {
            return Ok(Err(Rejection::PgIdNotFound { pg: 0 }));
        };
        let malformed = |reason: String| Ok(Err(Rejection::Malformed { reason }));
        if r.previous_cluster_id != cluster.cluster_id || r.cluster_id == cluster.cluster_id {
            return malformed(format!(
                "the rebuild is of cluster {:?} into {:?}; the catalog is cluster {:?}",
                r.previous_cluster_id, r.cluster_id, cluster.cluster_id
            ));
        }
        if r.generation != pg0.generation + 1 {
            return malformed(format!(
                "the catalog is at generation {}, not {}",
                pg0.generation,
                r.generation.saturating_sub(1)
            ));
        }
        if !r.members.contains(&r.voter) {
            return malformed("the catalog's voter must be one of its members".into());
        }
        for id in &r.members {
            if !pg0.members.iter().any(|m| m.member_id == *id) {
                return malformed(format!("member {id} is not a catalog member"));
            }
        }
        cluster.rebuilds.push(pb::ClusterRebuild {
            generation: r.generation,
            previous_cluster_id: cluster.cluster_id.clone(),
            previous_site: cluster.site.clone(),
            site: r.site.clone(),
            rebuilt_ms: stamp_ms,
        });
        cluster.cluster_id = r.cluster_id.clone();
        cluster.site = r.site.clone();
        cluster.ca_cert_pem = r.ca_cert_pem.clone();
        cluster.ca_key_sealed = r.ca_key_sealed.clone();
        self.catalog_put(catalog::CLUSTER_KEY.to_vec(), &cluster);
        pg0.members.retain(|m| r.members.contains(&m.member_id));
        for m in &mut pg0.members {
            m.voter = m.member_id == r.voter;
        }
        pg0.generation = r.generation;
        pg0.active_site = r.site.clone();
        self.put_pg_record(&pg0);
        Ok(Ok(Applied::Done))
    }

    fn apply_set_pg_members(&mut self, m: &pb::SetPgMembers) -> io::Result<Outcome> {
        let Some(mut pg) = self.catalog_get::<pb::PgRecord>(&catalog::pg_id_key(m.pg))? else {
            return Ok(Err(Rejection::PgIdNotFound { pg: m.pg }));
        };
        if let Some(rejection) = self.dead_node_among(&m.add)? {
            return Ok(Err(rejection));
        }
        pg.members
            .retain(|x| !m.remove_members.contains(&x.member_id));
        for add in &m.add {
            pg.members.push(pb::PgMember {
                member_id: self.next_id(Counter::Member)?,
                node_id: add.node_id,
                voter: add.voter,
            });
        }
        self.put_pg_record(&pg);
        Ok(Ok(Applied::Done))
    }

    /// The refusal for the first placed member on a node that does not
    /// exist or was removed.
    fn dead_node_among(&self, members: &[pb::PlacedMember]) -> io::Result<Option<Rejection>> {
        for m in members {
            if !self.node_is_live(m.node_id)? {
                return Ok(Some(Rejection::NodeNotFound { node: m.node_id }));
            }
        }
        Ok(None)
    }
}

/// The key id a wrapped DEK names: byte 0 is the wrap format version, bytes
/// 1..5 the key id (store::keyring's layout).
fn wrapped_key_id(wrapped: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(wrapped.get(1..5)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use lifeboat_store::db::{DbOptions, Durability};

    use super::*;

    fn member(member_id: u64, node_id: u64, voter: bool) -> pb::PgMember {
        pb::PgMember {
            member_id,
            node_id,
            voter,
        }
    }

    fn cmd(kind: pb::command::Kind) -> pb::Command {
        pb::Command {
            stamp_ms: 1,
            kind: Some(kind),
        }
    }

    fn put(key: &str, chunk: u64, if_absent: bool) -> pb::Command {
        put_in(5, key, chunk, if_absent)
    }

    fn put_in(bucket: u64, key: &str, chunk: u64, if_absent: bool) -> pb::Command {
        cmd(pb::command::Kind::PutObject(pb::PutObject {
            bucket,
            key: key.as_bytes().to_vec().into(),
            chunks: vec![chunk],
            new_chunks: vec![pb::ChunkWrite {
                chunk,
                frame: b"frame".to_vec().into(),
            }],
            record: Default::default(),
            if_absent,
            stream: 0,
        }))
    }

    /// A node's default window (only if unset) never undoes a window set
    /// before it, in an earlier batch or the same one; on a PG without a
    /// window it is set, and a plain set replaces it.
    #[test]
    fn a_default_window_does_not_undo_one_set_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(4);
        let set = |window_ms, only_if_unset| {
            cmd(pb::command::Kind::SetWindow(pb::SetWindow {
                window_ms,
                only_if_unset,
            }))
        };
        let window = || gc::window(&db, pg).unwrap();

        // Same batch: the operator's 1 s, then the default.
        let mut cx = ApplyContext::new(&db, pg);
        for (i, c) in [set(1000, false), set(86_400_000, true)].iter().enumerate() {
            assert_eq!(
                cx.apply_command(LogIndex(i as u64 + 1), c).unwrap(),
                Ok(Applied::Done)
            );
        }
        db.write(cx.batch, Durability::Buffered).unwrap();
        assert_eq!(window(), Some(1000));

        // A later batch: still the operator's.
        let mut cx = ApplyContext::new(&db, pg);
        cx.apply_command(LogIndex(3), &set(86_400_000, true))
            .unwrap()
            .unwrap();
        db.write(cx.batch, Durability::Buffered).unwrap();
        assert_eq!(window(), Some(1000));

        // A PG without one takes the default; a plain set replaces it.
        let other = PgId(5);
        let mut cx = ApplyContext::new(&db, other);
        cx.apply_command(LogIndex(1), &set(86_400_000, true))
            .unwrap()
            .unwrap();
        cx.apply_command(LogIndex(2), &set(2000, false))
            .unwrap()
            .unwrap();
        db.write(cx.batch, Durability::Buffered).unwrap();
        assert_eq!(gc::window(&db, other).unwrap(), Some(2000));
    }

    /// A rebuilt catalog replaces the cluster's identity, site and CA,
    /// keeps the history of what it replaced and leaves the catalog with
    /// the surviving members, one voter, at the next generation; a rebuild
    /// that does not follow the record it replaces (repeated, of another
    /// cluster, skipping a generation, naming a stranger) changes nothing.
    #[test]
    fn a_rebuilt_catalog_replaces_the_identity_and_keeps_the_survivors() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        let init = cmd(pb::command::Kind::InitCatalog(pb::InitCatalog {
            cluster_id: "old".into(),
            site: "primary".into(),
            node_id: 1,
            ca_cert_pem: "old ca".into(),
            ..Default::default()
        }));
        assert_eq!(
            cx.apply_command(LogIndex(1), &init).unwrap(),
            Ok(Applied::Done)
        );
        let mut pg0: pb::PgRecord = cx.catalog_get(&catalog::pg_id_key(0)).unwrap().unwrap();
        pg0.members = vec![
            member(1, 1, true),
            member(2, 2, true),
            member(3, 3, true),
            member(4, 4, false),
            member(5, 5, false),
        ];
        cx.put_pg_record(&pg0);
        db.write(
            std::mem::replace(&mut cx.batch, db.new_batch()),
            Durability::Buffered,
        )
        .unwrap();

        let rebuild = |previous: &str, generation: u64, members: Vec<u64>, voter: u64| {
            cmd(pb::command::Kind::RebuildCluster(pb::RebuildCluster {
                previous_cluster_id: previous.into(),
                cluster_id: "new".into(),
                site: "dr".into(),
                generation,
                ca_cert_pem: "new ca".into(),
                ca_key_sealed: b"sealed".to_vec().into(),
                members,
                voter,
            }))
        };
        for (refused, why) in [
            (rebuild("other", 1, vec![4, 5], 4), "cluster \"other\""),
            (rebuild("old", 2, vec![4, 5], 4), "generation 0, not 1"),
            (rebuild("old", 1, vec![4, 9], 4), "member 9"),
            (rebuild("old", 1, vec![4, 5], 1), "voter"),
        ] {
            let got = cx.apply_command(LogIndex(2), &refused).unwrap();
            assert!(
                matches!(&got, Err(Rejection::Malformed { reason }) if reason.contains(why)),
                "{why}: {got:?}"
            );
        }
        let good = rebuild("old", 1, vec![4, 5], 4);
        assert_eq!(
            cx.apply_command(LogIndex(2), &good).unwrap(),
            Ok(Applied::Done)
        );
        let cluster: pb::ClusterRecord = cx.catalog_get(catalog::CLUSTER_KEY).unwrap().unwrap();
        assert_eq!(
            (
                cluster.cluster_id.as_str(),
                cluster.site.as_str(),
                cluster.ca_cert_pem.as_str()
            ),
            ("new", "dr", "new ca")
        );
        assert_eq!(cluster.rebuilds.len(), 1);
        let r = &cluster.rebuilds[0];
        assert_eq!(
            (
                r.generation,
                r.previous_cluster_id.as_str(),
                r.previous_site.as_str(),
                r.site.as_str()
            ),
            (1, "old", "primary", "dr")
        );
        let pg0: pb::PgRecord = cx.catalog_get(&catalog::pg_id_key(0)).unwrap().unwrap();
        assert_eq!((pg0.generation, pg0.active_site.as_str()), (1, "dr"));
        assert_eq!(pg0.members, vec![member(4, 4, true), member(5, 5, false)]);
        let again = cx.apply_command(LogIndex(3), &good).unwrap();
        assert!(
            matches!(&again, Err(Rejection::Malformed { .. })),
            "a rebuild applies once: {again:?}"
        );
    }

    /// A block named twice in one entry is refused whole: its second frame
    /// would replace the first at the same index (and count twice in the
    /// PG's usage).
    #[test]
    fn a_block_written_twice_in_one_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId(2));
        let create = cmd(pb::command::Kind::CreateVolume(pb::CreateVolume {
            volume: 1,
            name: "v".into(),
            size_bytes: 1 << 20,
            base: None,
        }));
        assert_eq!(
            cx.apply_command(LogIndex(1), &create).unwrap(),
            Ok(Applied::Done)
        );
        let block = |block: u64| pb::BlockWrite {
            block,
            frame: b"frame".to_vec().into(),
            expect_latest: None,
        };
        let write = |blocks: Vec<pb::BlockWrite>| {
            cmd(pb::command::Kind::WriteBlocks(pb::WriteBlocks {
                volume: 1,
                blocks,
                newest_mask: None,
            }))
        };
        let twice = cx
            .apply_command(LogIndex(2), &write(vec![block(3), block(4), block(3)]))
            .unwrap();
        assert!(
            matches!(&twice, Err(Rejection::Malformed { reason }) if reason.contains("block 3")),
            "{twice:?}"
        );
        assert_eq!(
            cx.apply_command(LogIndex(3), &write(vec![block(3), block(4)]))
                .unwrap(),
            Ok(Applied::Done)
        );
        db.write(cx.batch, Durability::Buffered).unwrap();
        let u = usage::usage(&db, PgId(2)).unwrap();
        assert_eq!(
            (u.stored_bytes, u.versions),
            (10, 2),
            "only the second entry counts"
        );
    }

    /// Commands applied in one batch see each other through the overlays,
    /// exactly as if each had been written before the next.
    #[test]
    fn one_batch_sees_its_own_objects_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(2);
        let mut cx = ApplyContext::new(&db, pg);
        let mut at = 0u64;
        let mut apply = |cx: &mut ApplyContext<'_>, c: pb::Command| {
            at += 1;
            cx.apply_command(LogIndex(at), &c).unwrap()
        };
        let create = cmd(pb::command::Kind::CreateBucket(pb::CreateBucket {
            bucket: 5,
            name: "b".into(),
            base: None,
        }));
        assert_eq!(apply(&mut cx, create.clone()), Ok(Applied::Done));
        assert_eq!(
            apply(&mut cx, create),
            Err(Rejection::BucketExists { bucket: 5 })
        );
        assert_eq!(apply(&mut cx, put("k", 1, true)), Ok(Applied::Done));
        assert_eq!(
            apply(&mut cx, put("k", 2, true)),
            Err(Rejection::ObjectExists)
        );
        assert_eq!(
            apply(&mut cx, put("j", 1, false)),
            Err(Rejection::ChunkExists { chunk: 1 })
        );
        let delete_bucket = cmd(pb::command::Kind::DeleteBucket(pb::DeleteBucket {
            bucket: 5,
        }));
        assert_eq!(
            apply(&mut cx, delete_bucket.clone()),
            Err(Rejection::BucketNotEmpty { bucket: 5 })
        );
        let delete_k = cmd(pb::command::Kind::DeleteObject(pb::DeleteObject {
            bucket: 5,
            key: b"k".to_vec().into(),
        }));
        assert_eq!(apply(&mut cx, delete_k), Ok(Applied::Done));
        assert_eq!(apply(&mut cx, put("k", 3, true)), Ok(Applied::Done));
        db.write(
            std::mem::replace(&mut cx.batch, db.new_batch()),
            Durability::Buffered,
        )
        .unwrap();

        // A second batch over the written state: "k" is live (chunk 3),
        // and deleting it empties the bucket within this batch.
        let mut cx = ApplyContext::new(&db, pg);
        let objects = Objects::new(db.clone());
        assert_eq!(objects.chunk_refs(pg, ChunkId(1)).unwrap(), 1);
        assert_eq!(objects.chunk_refs(pg, ChunkId(3)).unwrap(), 1);
        assert_eq!(objects.chunk_refs(pg, ChunkId(2)).unwrap(), 0);
        let delete_k = cmd(pb::command::Kind::DeleteObject(pb::DeleteObject {
            bucket: 5,
            key: b"k".to_vec().into(),
        }));
        assert_eq!(apply(&mut cx, delete_k), Ok(Applied::Done));
        assert_eq!(apply(&mut cx, delete_bucket), Ok(Applied::Done));
        assert_eq!(
            apply(&mut cx, put("late", 4, false)),
            Err(Rejection::BucketNotFound { bucket: 5 })
        );
    }

    /// A writable clone takes writes over its base's moment: `if_absent`
    /// and deletes see the base's objects, the base never changes; a
    /// read-only clone takes none and is no base, and chains are bounded.
    #[test]
    fn writable_bucket_clones_write_over_their_base() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(2);
        let objects = Objects::new(db.clone());
        let at = std::cell::Cell::new(0u64);
        let apply = |cx: &mut ApplyContext<'_>, c: pb::Command| {
            at.set(at.get() + 1);
            let index = LogIndex(at.get());
            (index, cx.apply_command(index, &c).unwrap())
        };
        let create = |bucket: u64, base: Option<(u64, u64, bool)>| {
            cmd(pb::command::Kind::CreateBucket(pb::CreateBucket {
                bucket,
                name: format!("b{bucket}"),
                base: base.map(|(bucket, index, writable)| pb::BucketBase {
                    bucket,
                    index,
                    writable,
                    pg: None,
                }),
            }))
        };
        let delete = |bucket: u64, key: &str| {
            cmd(pb::command::Kind::DeleteObject(pb::DeleteObject {
                bucket,
                key: key.as_bytes().to_vec().into(),
            }))
        };
        let commit = |cx: ApplyContext<'_>| db.write(cx.batch, Durability::Buffered).unwrap();

        let mut cx = ApplyContext::new(&db, pg);
        assert_eq!(apply(&mut cx, create(5, None)).1, Ok(Applied::Done));
        let (k_index, _) = apply(&mut cx, put("k", 1, false));
        let (moment, _) = apply(&mut cx, put("gone", 2, false));
        commit(cx);

        let mut cx = ApplyContext::new(&db, pg);
        assert_eq!(
            apply(&mut cx, create(6, Some((5, moment.0, true)))).1,
            Ok(Applied::Done)
        );
        // The base's "k" is there for if_absent; a new key is not.
        assert_eq!(
            apply(&mut cx, put_in(6, "k", 3, true)).1,
            Err(Rejection::ObjectExists)
        );
        assert_eq!(
            apply(&mut cx, put_in(6, "new", 4, true)).1,
            Ok(Applied::Done)
        );
        // Deleting a key only the base has leaves a marker in the clone,
        // which this batch's next entry already sees.
        let (marker, _) = apply(&mut cx, delete(6, "k"));
        assert_eq!(apply(&mut cx, put_in(6, "k", 5, true)).1, Ok(Applied::Done));
        // The source moves on; the clone's moment does not.
        assert_eq!(apply(&mut cx, delete(5, "gone")).1, Ok(Applied::Done));
        commit(cx);
        assert_eq!(
            objects.latest_index(pg, BucketId(5), b"k").unwrap(),
            Some(k_index),
            "the base is untouched"
        );
        assert_eq!(
            objects.version_at(pg, BucketId(6), b"k", marker).unwrap(),
            Some((marker, ObjectVersion::DeleteMarker))
        );
        let layers = objects.layers(pg, BucketId(6), None, &[]).unwrap();
        let found = |key: &str| {
            objects
                .find_layered(pg, &layers, key.as_bytes())
                .unwrap()
                .map(|(bucket, index, _)| (bucket.0, index))
        };
        assert_eq!(found("k"), Some((6, LogIndex(marker.0 + 1))));
        assert_eq!(
            found("gone"),
            Some((5, moment)),
            "deleted in the source later"
        );

        // A read-only clone of the clone takes no writes, and is no base.
        let mut cx = ApplyContext::new(&db, pg);
        let now = at.get();
        assert_eq!(
            apply(&mut cx, create(7, Some((6, now, false)))).1,
            Ok(Applied::Done)
        );
        commit(cx);
        let mut cx = ApplyContext::new(&db, pg);
        assert_eq!(
            apply(&mut cx, put_in(7, "x", 6, false)).1,
            Err(Rejection::BucketReadOnly { bucket: 7 })
        );
        assert_eq!(
            apply(&mut cx, delete(7, "k")).1,
            Err(Rejection::BucketReadOnly { bucket: 7 })
        );
        let now = at.get();
        assert_eq!(
            apply(&mut cx, create(8, Some((7, now, true)))).1,
            Err(Rejection::BucketNotFound { bucket: 7 })
        );
        commit(cx);

        // A sealed writable clone keeps what it holds and takes no more
        // writes; it stays a base (it has data of its own).
        let mut cx = ApplyContext::new(&db, pg);
        assert_eq!(
            apply(&mut cx, create(9, Some((5, moment.0, true)))).1,
            Ok(Applied::Done)
        );
        assert_eq!(
            apply(&mut cx, put_in(9, "mine", 40, false)).1,
            Ok(Applied::Done)
        );
        let seal = cmd(pb::command::Kind::SealBucket(pb::SealBucket { bucket: 9 }));
        assert_eq!(apply(&mut cx, seal).1, Ok(Applied::Done));
        assert_eq!(
            apply(&mut cx, put_in(9, "more", 41, false)).1,
            Err(Rejection::BucketReadOnly { bucket: 9 })
        );
        assert_eq!(
            apply(&mut cx, delete(9, "mine")).1,
            Err(Rejection::BucketReadOnly { bucket: 9 })
        );
        commit(cx);
        let layers = objects.layers(pg, BucketId(9), None, &[]).unwrap();
        assert!(
            objects
                .find_layered(pg, &layers, b"mine")
                .unwrap()
                .is_some_and(|(bucket, _, _)| bucket == BucketId(9)),
            "a sealed bucket shows its own objects"
        );
        let mut cx = ApplyContext::new(&db, pg);
        let now = at.get();
        assert_eq!(
            apply(&mut cx, create(10, Some((9, now, true)))).1,
            Ok(Applied::Done),
            "a sealed bucket is a base"
        );
        let drop_sealed = cmd(pb::command::Kind::DeleteBucket(pb::DeleteBucket {
            bucket: 9,
        }));
        assert_eq!(
            apply(&mut cx, drop_sealed).1,
            Ok(Applied::Done),
            "a sealed bucket goes whole, objects and all"
        );
        commit(cx);

        // Clones of clones, until the chain is as deep as reads allow.
        let mut base = 6;
        let mut refused = None;
        for bucket in 20..40 {
            let mut cx = ApplyContext::new(&db, pg);
            let now = at.get();
            let (_, outcome) = apply(&mut cx, create(bucket, Some((base, now, true))));
            commit(cx);
            match outcome {
                Ok(Applied::Done) => base = bucket,
                other => {
                    refused = Some((bucket, other));
                    break;
                }
            }
        }
        let (bucket, outcome) = refused.expect("a chain too deep is refused");
        assert!(
            matches!(&outcome, Err(Rejection::Malformed { reason }) if reason.contains("nested")),
            "{outcome:?}"
        );
        // Buckets 5 and 6, then 20.. : the chain holds CLONE_DEPTH_MAX.
        assert_eq!(bucket as usize, 20 + objects::CLONE_DEPTH_MAX - 2);
    }

    /// A drill's bucket clone names its base in the source PG, which apply
    /// does not read: a delete always leaves a marker, a create-only write
    /// is judged on the clone's own versions (the proposer checked the
    /// base), and a base in this PG, the catalog or at index 0 is refused.
    #[test]
    fn a_drill_s_bucket_clone_writes_without_reading_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(3);
        let objects = Objects::new(db.clone());
        let mut at = 0u64;
        let mut apply_alone = |c: pb::Command| {
            at += 1;
            let mut cx = ApplyContext::new(&db, pg);
            let outcome = cx.apply_command(LogIndex(at), &c).unwrap();
            db.write(cx.batch, Durability::Buffered).unwrap();
            (LogIndex(at), outcome)
        };
        let create = |bucket: u64, source: u64, index: u64| {
            cmd(pb::command::Kind::CreateBucket(pb::CreateBucket {
                bucket,
                name: format!("b{bucket}-drill-1"),
                base: Some(pb::BucketBase {
                    bucket: 5,
                    index,
                    writable: true,
                    pg: Some(source),
                }),
            }))
        };
        for (source, index) in [(3, 10), (PgId::CATALOG.0, 10), (2, 0)] {
            assert!(
                matches!(
                    apply_alone(create(6, source, index)).1,
                    Err(Rejection::Malformed { .. })
                ),
                "source {source} at {index}"
            );
        }
        assert_eq!(apply_alone(create(6, 2, 10)).1, Ok(Applied::Done));
        let (_, record) = objects.bucket(pg, BucketId(6)).unwrap().unwrap();
        assert_eq!(record.base.unwrap().pg, Some(PgId(2)));
        let delete = cmd(pb::command::Kind::DeleteObject(pb::DeleteObject {
            bucket: 6,
            key: b"k".to_vec().into(),
        }));
        let (marker, deleted) = apply_alone(delete);
        assert_eq!(deleted, Ok(Applied::Done));
        assert_eq!(
            objects.version_at(pg, BucketId(6), b"k", marker).unwrap(),
            Some((marker, ObjectVersion::DeleteMarker)),
            "a marker, whatever the base holds"
        );
        assert_eq!(
            apply_alone(put_in(6, "k", 1, true)).1,
            Ok(Applied::Done),
            "hidden by the clone's own marker: absent"
        );
        assert_eq!(
            apply_alone(put_in(6, "k", 2, true)).1,
            Err(Rejection::ObjectExists)
        );
        assert_eq!(apply_alone(put_in(6, "new", 3, true)).1, Ok(Applied::Done));
    }

    /// GC keeps a clone's delete marker that has nothing of the clone's
    /// own below it: it hides the base's object (a divergence bucket
    /// carries deletes the old site made after the fork this way).
    #[test]
    fn gc_keeps_a_clone_s_delete_marker_over_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(2);
        let objects = Objects::new(db.clone());
        let mut at = 0u64;
        let mut apply_alone = |c: pb::Command| {
            at += 1;
            let mut cx = ApplyContext::new(&db, pg);
            let outcome = cx.apply_command(LogIndex(at), &c).unwrap();
            db.write(cx.batch, Durability::Buffered).unwrap();
            (LogIndex(at), outcome)
        };
        let create = |bucket: u64, base: Option<pb::BucketBase>| {
            cmd(pb::command::Kind::CreateBucket(pb::CreateBucket {
                bucket,
                name: format!("b{bucket}"),
                base,
            }))
        };
        assert_eq!(apply_alone(create(5, None)).1, Ok(Applied::Done));
        assert_eq!(apply_alone(put("k", 1, false)).1, Ok(Applied::Done));
        let (moment, _) = apply_alone(put("other", 2, false));
        let base = pb::BucketBase {
            bucket: 5,
            index: moment.0,
            writable: true,
            pg: None,
        };
        assert_eq!(apply_alone(create(6, Some(base))).1, Ok(Applied::Done));
        let (marker, deleted) =
            apply_alone(cmd(pb::command::Kind::DeleteObject(pb::DeleteObject {
                bucket: 6,
                key: b"k".to_vec().into(),
            })));
        assert_eq!(deleted, Ok(Applied::Done));
        // One whole pass, as the leader's GC task runs them.
        let mut steps = 0;
        loop {
            let gc = cmd(pb::command::Kind::CollectGarbage(pb::CollectGarbage {
                max_rows: 1000,
                new_pass: steps == 0,
            }));
            match apply_alone(gc).1 {
                Ok(Applied::Collected { done: true, .. }) => break,
                Ok(Applied::Collected { .. }) => steps += 1,
                other => panic!("{other:?}"),
            }
            assert!(steps < 10, "GC never finished");
        }
        assert_eq!(
            objects.version_at(pg, BucketId(6), b"k", marker).unwrap(),
            Some((marker, ObjectVersion::DeleteMarker)),
            "the clone's marker is kept"
        );
        let layers = objects.layers(pg, BucketId(6), None, &[]).unwrap();
        let found = |key: &[u8]| {
            objects
                .find_layered(pg, &layers, key)
                .unwrap()
                .map(|(bucket, index, _)| (bucket.0, index))
        };
        assert_eq!(found(b"k"), None, "the clone still hides the base's k");
        assert_eq!(found(b"other"), Some((5, moment)));
    }

    /// Locks are judged at the entry's stamp; the timeline only moves
    /// forward even when a stamp goes back; snapshots see this batch.
    #[test]
    fn snapshots_obey_their_locks_and_the_timeline_moves_forward() {
        use lifeboat_store::history::{History, TimeIndex};
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(2);
        let mut cx = ApplyContext::new(&db, pg);
        let mut at = 0u64;
        let mut apply = |cx: &mut ApplyContext<'_>, stamp_ms: u64, kind: pb::command::Kind| {
            at += 1;
            let c = pb::Command {
                stamp_ms,
                kind: Some(kind),
            };
            cx.apply_command(LogIndex(at), &c).unwrap()
        };
        use pb::command::Kind;
        let create = |name: &str, at_index: Option<u64>, locked_until_ms: u64| {
            Kind::CreateSnapshot(pb::CreateSnapshot {
                name: name.into(),
                at_index,
                at_ms: 1_000,
                locked_until_ms,
            })
        };
        let delete = |name: &str, operator: bool| {
            Kind::DeleteSnapshot(pb::DeleteSnapshot {
                name: name.into(),
                operator,
            })
        };
        let lock = |name: &str, until_ms: u64, operator: bool| {
            Kind::LockSnapshot(pb::LockSnapshot {
                name: name.into(),
                until_ms,
                operator,
            })
        };
        // Index 1 at 10 s; a new leader's clock is behind (index 2 at 9 s).
        assert_eq!(
            apply(&mut cx, 10_000, create("a", None, 20_000)),
            Ok(Applied::SnapshotCreated { index: 1 })
        );
        assert_eq!(
            apply(&mut cx, 9_000, create("a", None, 0)),
            Err(Rejection::SnapshotExists { name: "a".into() })
        );
        assert_eq!(
            apply(&mut cx, 11_000, create("b", Some(2), 0)),
            Ok(Applied::SnapshotCreated { index: 2 })
        );
        assert_eq!(
            apply(&mut cx, 11_000, create("c", Some(9), 0)),
            Err(Rejection::IndexOutOfHistory {
                index: 9,
                oldest: 1,
                newest: 4
            })
        );
        let locked = Err(Rejection::SnapshotLocked {
            name: "a".into(),
            until_ms: 20_000,
        });
        assert_eq!(apply(&mut cx, 12_000, delete("a", false)), locked);
        assert_eq!(apply(&mut cx, 12_000, lock("a", 15_000, false)), locked);
        let changed = |lock_overridden| Ok(Applied::SnapshotChanged { lock_overridden });
        assert_eq!(
            apply(&mut cx, 12_000, lock("a", 30_000, false)),
            changed(false)
        );
        db.write(
            std::mem::replace(&mut cx.batch, db.new_batch()),
            Durability::Buffered,
        )
        .unwrap();
        let history = History::new(db.clone());
        let a = history.snapshot(pg, "a").unwrap().unwrap();
        assert_eq!((a.index, a.locked_until_ms), (LogIndex(1), 30_000));
        assert_eq!(history.snapshot(pg, "b").unwrap().unwrap().at_ms, 1_000);
        // The entry stamped 9 s joined the 10 s bucket.
        assert_eq!(
            history.index_at(pg, 10_005).unwrap(),
            TimeIndex::At(LogIndex(2))
        );
        assert_eq!(
            history.index_at(pg, 9_999).unwrap(),
            TimeIndex::BeforeHistory { oldest_ms: 10_000 }
        );

        let mut cx = ApplyContext::new(&db, pg);
        // Past the lock a tenant may delete; before it only an operator.
        assert_eq!(
            apply(&mut cx, 29_999, delete("a", false)),
            Err(Rejection::SnapshotLocked {
                name: "a".into(),
                until_ms: 30_000
            })
        );
        assert_eq!(apply(&mut cx, 29_999, delete("a", true)), changed(true));
        assert_eq!(
            apply(&mut cx, 29_999, delete("a", false)),
            Err(Rejection::SnapshotNotFound { name: "a".into() })
        );
        assert_eq!(apply(&mut cx, 30_000, delete("b", false)), changed(false));
    }

    /// A restore masks what came after its point for every volume and
    /// bucket live then (sizes go back too), later commands see objects
    /// through the mask, a lock refuses tenants, and undo undoes.
    #[test]
    fn restores_mask_the_pg_obey_locks_and_undo() {
        use lifeboat_store::masks::{self, Span};
        use pb::command::Kind;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let pg = PgId(2);
        let at = std::cell::Cell::new(0u64);
        let apply = |cx: &mut ApplyContext<'_>, c: pb::Command| {
            at.set(at.get() + 1);
            cx.apply_command(LogIndex(at.get()), &c).unwrap()
        };
        // As the state machine does: a restore in a batch of its own.
        let alone = |c: pb::Command| {
            let mut cx = ApplyContext::new(&db, pg);
            let outcome = apply(&mut cx, c);
            db.write(cx.batch, Durability::Buffered).unwrap();
            outcome
        };
        let restore = |to_index: u64, undo: bool, operator: bool| {
            cmd(Kind::RestorePg(pb::RestorePg {
                to_index,
                to_ms: 7,
                undo,
                operator,
            }))
        };
        assert_eq!(
            alone(restore(0, true, false)),
            Err(Rejection::NothingToUndo)
        );
        let mut cx = ApplyContext::new(&db, pg);
        let create_bucket = Kind::CreateBucket(pb::CreateBucket {
            bucket: 5,
            name: "b".into(),
            base: None,
        });
        let create_volume = Kind::CreateVolume(pb::CreateVolume {
            volume: 6,
            name: "v".into(),
            size_bytes: 4096,
            base: None,
        });
        for c in [
            cmd(create_bucket),
            cmd(create_volume),
            put("k", 1, false),
            put("gone", 2, false),
        ] {
            assert_eq!(apply(&mut cx, c), Ok(Applied::Done));
        }
        // The restore point is index 5 (a refused entry, all the same).
        assert!(apply(&mut cx, put("k", 1, false)).is_err());
        let point = at.get();
        let delete = |key: &str| {
            cmd(Kind::DeleteObject(pb::DeleteObject {
                bucket: 5,
                key: key.as_bytes().to_vec().into(),
            }))
        };
        let grow = cmd(Kind::ResizeVolume(pb::ResizeVolume {
            volume: 6,
            size_bytes: 8192,
        }));
        let snapshot = cmd(Kind::CreateSnapshot(pb::CreateSnapshot {
            name: "locked".into(),
            at_index: None,
            at_ms: 0,
            locked_until_ms: 50_000,
        }));
        for c in [
            put("k", 3, false),
            delete("gone"),
            put("new", 4, false),
            grow,
        ] {
            assert_eq!(apply(&mut cx, c), Ok(Applied::Done));
        }
        assert!(matches!(
            apply(&mut cx, snapshot),
            Ok(Applied::SnapshotCreated { .. })
        ));
        db.write(
            std::mem::replace(&mut cx.batch, db.new_batch()),
            Durability::Buffered,
        )
        .unwrap();

        let locked = Err(Rejection::SnapshotLocked {
            name: "locked".into(),
            until_ms: 50_000,
        });
        assert_eq!(alone(restore(point, false, false)), locked);
        // The entry's own index is no restore point.
        let own = at.get() + 1;
        assert_eq!(
            alone(restore(own, false, true)),
            Err(Rejection::IndexOutOfHistory {
                index: own,
                oldest: 1,
                newest: own - 1
            })
        );
        let restored = Ok(Applied::Restored {
            to_index: point,
            volumes: 1,
            buckets: 1,
            lock_overridden: true,
        });
        assert_eq!(alone(restore(point, false, true)), restored);
        let restore_index = at.get();
        // A merged write read through the masks before this restore: it
        // merges again; one that read through it goes in.
        let merged = |newest_mask: u64| {
            cmd(Kind::WriteBlocks(pb::WriteBlocks {
                volume: 6,
                blocks: vec![pb::BlockWrite {
                    block: 0,
                    frame: b"merged".to_vec().into(),
                    expect_latest: Some(0),
                }],
                newest_mask: Some(newest_mask),
            }))
        };
        assert_eq!(
            alone(merged(0)),
            Err(Rejection::BlockChanged {
                volume: 6,
                block: 0
            })
        );
        assert_eq!(alone(merged(restore_index)), Ok(Applied::Done));

        let objects = Objects::new(db.clone());
        let bucket_spans = || {
            let all = masks::masks(&db, pg).unwrap();
            masks::spans(&all, |m| m.covers_bucket(BucketId(5)), None)
        };
        let spans = bucket_spans();
        let shown = |key: &str, spans: &[Span]| {
            objects
                .find(pg, BucketId(5), key.as_bytes(), spans)
                .unwrap()
                .map(|(_, v)| v.chunks().to_vec())
        };
        assert_eq!(shown("k", &spans), Some(vec![ChunkId(1)]));
        assert_eq!(shown("gone", &spans), Some(vec![ChunkId(2)]));
        assert_eq!(shown("new", &spans), None);
        let volumes = Volumes::new(db.clone());
        assert_eq!(
            volumes
                .volume(pg, VolumeId(6))
                .unwrap()
                .unwrap()
                .1
                .size_bytes,
            4096
        );

        // Later commands see the objects through the mask.
        let mut cx = ApplyContext::new(&db, pg);
        assert_eq!(apply(&mut cx, put("new", 5, true)), Ok(Applied::Done));
        assert_eq!(
            apply(&mut cx, put("gone", 6, true)),
            Err(Rejection::ObjectExists)
        );
        assert_eq!(apply(&mut cx, delete("k")), Ok(Applied::Done));
        db.write(cx.batch, Durability::Buffered).unwrap();
        assert_eq!(
            shown("k", &spans),
            None,
            "a delete after the restore counts"
        );
        assert_eq!(shown("new", &spans), Some(vec![ChunkId(5)]));

        // Undo: back to just before the restore (the writes since are
        // hidden with it), sizes too; undoing again redoes.
        assert_eq!(
            alone(restore(restore_index - 1, true, false)),
            Ok(Applied::Restored {
                to_index: restore_index - 1,
                volumes: 1,
                buckets: 1,
                // The locked snapshot is older than the undo's point.
                lock_overridden: false,
            })
        );
        let spans = bucket_spans();
        assert_eq!(shown("k", &spans), Some(vec![ChunkId(3)]));
        assert_eq!(shown("gone", &spans), None);
        assert_eq!(shown("new", &spans), Some(vec![ChunkId(4)]));
        assert_eq!(
            volumes
                .volume(pg, VolumeId(6))
                .unwrap()
                .unwrap()
                .1
                .size_bytes,
            8192
        );
        // The same undo again (a retry) names a restore that is no longer
        // the newest: refused, so it cannot undo the undo.
        let undo_index = at.get();
        assert_eq!(
            alone(restore(restore_index - 1, true, false)),
            Err(Rejection::RestoreChanged { newest: undo_index })
        );
    }

    /// A clone's base must have existed at an earlier index, and chains
    /// stop at CLONE_DEPTH_MAX.
    #[test]
    fn clone_bases_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId(2));
        let at = std::cell::Cell::new(0u64);
        let apply = |cx: &mut ApplyContext<'_>, volume: u64, base: Option<(u64, u64)>| {
            at.set(at.get() + 1);
            let c = cmd(pb::command::Kind::CreateVolume(pb::CreateVolume {
                volume,
                name: format!("v{volume}"),
                size_bytes: 4096,
                base: base.map(|(volume, index)| pb::VolumeBase {
                    volume,
                    index,
                    pg: None,
                }),
            }));
            cx.apply_command(LogIndex(at.get()), &c).unwrap()
        };
        assert_eq!(apply(&mut cx, 1, None), Ok(Applied::Done));
        // Volume 1 exists from index 1; nothing before it or after now.
        assert_eq!(
            apply(&mut cx, 9, Some((1, 0))),
            Err(Rejection::IndexOutOfHistory {
                index: 0,
                oldest: 1,
                newest: 1
            })
        );
        assert_eq!(
            apply(&mut cx, 9, Some((1, 3))),
            Err(Rejection::IndexOutOfHistory {
                index: 3,
                oldest: 1,
                newest: 2
            })
        );
        assert_eq!(
            apply(&mut cx, 9, Some((7, 1))),
            Err(Rejection::VolumeNotFound { volume: 7 })
        );
        db.write(
            std::mem::replace(&mut cx.batch, db.new_batch()),
            Durability::Buffered,
        )
        .unwrap();
        // A chain: each clone of the one before, each in its own batch
        // (the base is read from the store).
        let mut volume = 1;
        loop {
            let mut cx = ApplyContext::new(&db, PgId(2));
            let base_index = at.get();
            let next = volume + 1;
            let outcome = apply(&mut cx, next, Some((volume, base_index)));
            db.write(cx.batch, Durability::Buffered).unwrap();
            if next as usize <= volumes::CLONE_DEPTH_MAX {
                assert_eq!(outcome, Ok(Applied::Done), "clone {next}");
                volume = next;
            } else {
                assert!(
                    matches!(outcome, Err(Rejection::Malformed { .. })),
                    "{outcome:?}"
                );
                break;
            }
        }
    }

    /// A switchover makes the target site's members the voters and every
    /// other member a learner, refuses a PG with nobody at the target
    /// (without touching the others), and leaves a PG already there alone.
    #[test]
    fn a_switchover_moves_the_voters_to_the_target_site() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        for (id, site) in [(1, "primary"), (2, "primary"), (3, "dr"), (4, "dr")] {
            let node = pb::NodeRecord {
                id,
                site: site.into(),
                ..Default::default()
            };
            cx.catalog_put(catalog::node_key(id), &node);
        }
        let pg = |id, members| pb::PgRecord {
            id,
            tenant: "t".into(),
            name: format!("pg{id}"),
            active_site: "primary".into(),
            members,
            ..Default::default()
        };
        cx.put_pg_record(&pg(
            1,
            vec![
                member(10, 1, true),
                member(11, 2, true),
                member(12, 3, false),
                member(13, 4, false),
            ],
        ));
        cx.put_pg_record(&pg(2, vec![member(20, 1, true), member(21, 2, true)]));
        let switch = |pgs: Vec<u64>| {
            cmd(pb::command::Kind::SwitchActiveSite(pb::SwitchActiveSite {
                pgs,
                to_site: "dr".into(),
            }))
        };
        let voters = |cx: &ApplyContext, id| {
            let r: pb::PgRecord = cx.catalog_get(&catalog::pg_id_key(id)).unwrap().unwrap();
            let v: Vec<(u64, bool)> = r.members.iter().map(|m| (m.member_id, m.voter)).collect();
            (r.active_site, v)
        };
        assert_eq!(
            cx.apply_command(LogIndex(1), &switch(vec![1, 2])).unwrap(),
            Err(Rejection::NoMembersAtSite {
                pg: 2,
                site: "dr".into()
            })
        );
        assert_eq!(voters(&cx, 1).0, "primary", "all or none");
        assert_eq!(
            cx.apply_command(LogIndex(2), &switch(vec![0])).unwrap(),
            Err(Rejection::Malformed {
                reason: "the catalog's placement does not follow a switchover".into()
            })
        );
        assert_eq!(
            cx.apply_command(LogIndex(3), &switch(vec![9])).unwrap(),
            Err(Rejection::PgIdNotFound { pg: 9 })
        );
        assert_eq!(
            cx.apply_command(LogIndex(4), &switch(vec![1])).unwrap(),
            Ok(Applied::Done)
        );
        let moved = (
            "dr".to_owned(),
            vec![(10, false), (11, false), (12, true), (13, true)],
        );
        assert_eq!(voters(&cx, 1), moved);
        let by_name: pb::PgRecord = cx
            .catalog_get(&catalog::pg_key("t", "pg1"))
            .unwrap()
            .unwrap();
        assert_eq!(by_name.active_site, "dr", "both keys of the record move");
        // Again: nothing changes.
        assert_eq!(
            cx.apply_command(LogIndex(5), &switch(vec![1])).unwrap(),
            Ok(Applied::Done)
        );
        assert_eq!(voters(&cx, 1), moved);
    }

    #[test]
    fn a_resync_is_kept_per_pg_and_node_the_newest_winning() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        cx.put_pg_record(&pb::PgRecord {
            id: 3,
            tenant: "t".into(),
            name: "main".into(),
            ..Default::default()
        });
        let resync = |pg, node_id, bytes_received| {
            cmd(pb::command::Kind::RecordResync(pb::RecordResync {
                record: Some(pb::ResyncRecord {
                    pg,
                    node_id,
                    generation: 1,
                    bytes_received,
                    ..Default::default()
                }),
            }))
        };
        for (node, bytes) in [(1, 10), (2, 20), (1, 11)] {
            assert_eq!(
                cx.apply_command(LogIndex(1), &resync(3, node, bytes))
                    .unwrap(),
                Ok(Applied::Done)
            );
        }
        assert_eq!(
            cx.apply_command(LogIndex(2), &resync(9, 1, 5)).unwrap(),
            Err(Rejection::PgIdNotFound { pg: 9 })
        );
        assert!(matches!(
            cx.apply_command(
                LogIndex(3),
                &cmd(pb::command::Kind::RecordResync(pb::RecordResync {
                    record: None
                }))
            )
            .unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        let kept = |node| {
            cx.catalog_get::<pb::ResyncRecord>(&catalog::resync_key(3, node))
                .unwrap()
                .map(|r| r.bytes_received)
        };
        assert_eq!((kept(1), kept(2)), (Some(11), Some(20)));
    }

    /// A forced failover's end: the PG moves to the next generation with
    /// only the members kept, voting, and a lineage entry at F + 1; a
    /// stale or repeated one and members the PG lacks are refused.
    #[test]
    fn a_forced_failover_starts_the_next_generation_on_the_members_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        cx.put_pg_record(&pb::PgRecord {
            id: 3,
            tenant: "t".into(),
            name: "main".into(),
            active_site: "dr".into(),
            members: vec![
                member(10, 1, false),
                member(12, 3, true),
                member(13, 4, false),
            ],
            ..Default::default()
        });
        let complete = |generation, keep_members: Vec<u64>| {
            cmd(pb::command::Kind::CompleteForcedFailover(
                pb::CompleteForcedFailover {
                    pg: 3,
                    generation,
                    fork_index: 41,
                    keep_members,
                    from_site: "primary".into(),
                    rpo: Some(pb::Rpo {
                        lower_entries: 3,
                        lower_bytes: 300,
                        upper_ms: 900,
                    }),
                },
            ))
        };
        // Progress reports: only of the PG's generation, only forward.
        let progress = |generation, applied_index| {
            cmd(pb::command::Kind::RecordProgress(pb::RecordProgress {
                pgs: vec![pb::PgProgress {
                    pg: 3,
                    generation,
                    applied_index,
                    ..Default::default()
                }],
            }))
        };
        let kept = |cx: &ApplyContext| {
            cx.catalog_get::<pb::PgProgress>(&catalog::progress_key(3))
                .unwrap()
                .map(|p| (p.generation, p.applied_index))
        };
        for (generation, applied) in [(0, 40), (0, 44), (0, 43), (1, 50)] {
            assert_eq!(
                cx.apply_command(LogIndex(1), &progress(generation, applied))
                    .unwrap(),
                Ok(Applied::Done)
            );
        }
        assert_eq!(kept(&cx), Some((0, 44)), "the newest of generation 0");
        let refused = |r: Outcome| matches!(r, Err(Rejection::Malformed { .. }));
        assert!(refused(
            cx.apply_command(LogIndex(1), &complete(2, vec![12]))
                .unwrap()
        ));
        assert!(refused(
            cx.apply_command(LogIndex(2), &complete(1, vec![12, 99]))
                .unwrap()
        ));
        assert_eq!(
            cx.apply_command(LogIndex(3), &complete(1, vec![12, 13]))
                .unwrap(),
            Ok(Applied::Done)
        );
        let r: pb::PgRecord = cx.catalog_get(&catalog::pg_id_key(3)).unwrap().unwrap();
        assert_eq!(r.generation, 1);
        let members: Vec<(u64, bool)> = r.members.iter().map(|m| (m.member_id, m.voter)).collect();
        assert_eq!(members, vec![(12, true), (13, true)]);
        assert_eq!(r.lineage.len(), 1);
        let l = &r.lineage[0];
        assert_eq!(
            (
                l.generation,
                l.first_index,
                l.from_site.as_str(),
                l.to_site.as_str()
            ),
            (1, 42, "primary", "dr")
        );
        assert_eq!(
            l.rpo.map(|r| (r.lower_entries, r.lower_bytes, r.upper_ms)),
            Some((3, 300, 900)),
            "the lineage keeps the RPO"
        );
        assert!(
            refused(
                cx.apply_command(LogIndex(4), &complete(1, vec![12]))
                    .unwrap()
            ),
            "a repeat is refused"
        );
        cx.apply_command(LogIndex(5), &progress(1, 60))
            .unwrap()
            .unwrap();
        assert_eq!(kept(&cx), Some((1, 60)), "the new generation's");
        cx.apply_command(LogIndex(6), &progress(0, 99))
            .unwrap()
            .unwrap();
        assert_eq!(kept(&cx), Some((1, 60)), "an old generation's is ignored");
    }

    /// A divergence is kept only for an old generation of a known PG and
    /// past its fork; written again, it replaces the one of the same PG,
    /// generation and node.
    #[test]
    fn divergence_records_are_checked_and_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        cx.put_pg_record(&pb::PgRecord {
            id: 3,
            generation: 1,
            ..Default::default()
        });
        let record = |pg, generation, fork_index, last_index, complete| {
            cmd(pb::command::Kind::RecordDivergence(pb::RecordDivergence {
                record: Some(pb::DivergenceRecord {
                    pg,
                    generation,
                    fork_index,
                    last_index,
                    node_id: 2,
                    complete,
                    ..Default::default()
                }),
            }))
        };
        let refused = |r: Outcome| matches!(r, Err(Rejection::Malformed { .. }));
        let none = cmd(pb::command::Kind::RecordDivergence(pb::RecordDivergence {
            record: None,
        }));
        assert!(refused(cx.apply_command(LogIndex(1), &none).unwrap()));
        assert_eq!(
            cx.apply_command(LogIndex(2), &record(9, 0, 10, 20, false))
                .unwrap(),
            Err(Rejection::PgIdNotFound { pg: 9 })
        );
        assert!(
            refused(
                cx.apply_command(LogIndex(3), &record(3, 1, 10, 20, false))
                    .unwrap()
            ),
            "the PG's current generation has not diverged"
        );
        assert!(
            refused(
                cx.apply_command(LogIndex(4), &record(3, 0, 10, 10, false))
                    .unwrap()
            ),
            "nothing past the fork"
        );
        let key = catalog::divergence_key(3, 0, 2);
        assert!(
            cx.catalog_get::<pb::DivergenceRecord>(&key)
                .unwrap()
                .is_none()
        );
        for (index, complete) in [(5, false), (6, true)] {
            assert_eq!(
                cx.apply_command(LogIndex(index), &record(3, 0, 10, 20, complete))
                    .unwrap(),
                Ok(Applied::Done)
            );
        }
        let kept: pb::DivergenceRecord = cx.catalog_get(&key).unwrap().unwrap();
        assert!(kept.complete, "rewritten under the same key");
    }

    /// Catalog voters are set among the catalog's members on live nodes,
    /// never none; the others become learners.
    #[test]
    fn catalog_voters_are_members_on_live_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut cx = ApplyContext::new(&db, PgId::CATALOG);
        for (id, removed) in [(1, false), (2, false), (3, true)] {
            let node = pb::NodeRecord {
                id,
                removed,
                ..Default::default()
            };
            cx.catalog_put(catalog::node_key(id), &node);
        }
        cx.put_pg_record(&pb::PgRecord {
            id: 0,
            members: vec![member(1, 1, true), member(2, 2, false), member(3, 3, false)],
            ..Default::default()
        });
        let set = |voters: Vec<u64>| {
            cmd(pb::command::Kind::SetCatalogVoters(pb::SetCatalogVoters {
                voters,
            }))
        };
        assert!(matches!(
            cx.apply_command(LogIndex(1), &set(vec![])).unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        assert!(matches!(
            cx.apply_command(LogIndex(2), &set(vec![1, 9])).unwrap(),
            Err(Rejection::Malformed { .. })
        ));
        assert_eq!(
            cx.apply_command(LogIndex(3), &set(vec![3])).unwrap(),
            Err(Rejection::NodeNotFound { node: 3 }),
            "a removed node does not vote"
        );
        assert_eq!(
            cx.apply_command(LogIndex(4), &set(vec![2])).unwrap(),
            Ok(Applied::Done)
        );
        let p0: pb::PgRecord = cx.catalog_get(&catalog::pg_id_key(0)).unwrap().unwrap();
        let voters: Vec<(u64, bool)> = p0.members.iter().map(|m| (m.member_id, m.voter)).collect();
        assert_eq!(voters, vec![(1, false), (2, true), (3, false)]);
    }
}
