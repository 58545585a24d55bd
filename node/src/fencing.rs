//! A returning old member of a PG that failed over without it (DESIGN.md
//! "Failover", fencing and divergence).
//!
//! A forced failover starts generation g+1 at fork index F with the
//! standby members only. The old site's members, when they come back, are
//! still at generation g: every message of the new generation is refused
//! by them and theirs by it, and the catalog grants no lease for g, so
//! they can neither vote in g+1 nor acknowledge a write. What they may
//! hold is what the old site applied after F — writes it acknowledged
//! that the failover could not carry. Those are never silently destroyed.
//!
//! The reconciler, finding this node's member of a PG at a generation
//! below the catalog's, fences it:
//! 1. stops it (it serves nothing from then on);
//! 2. if its state was applied past F, carries every volume it changed
//!    after F into the new generation as a clone of the volume at F named
//!    `VOLUME-div-gG-nN`, with the blocks it wrote after F, as they were
//!    at its last applied index — the divergence snapshot, replicated at
//!    every site like any volume and read-only over NBD — and records the
//!    divergence in the catalog (`lifeboat snapshot list --divergence`),
//!    marked complete once everything is carried. When another old node's
//!    complete divergence already holds this member's log as a prefix
//!    (the same last term, at least the same last index), it carries
//!    nothing and records only that it is covered by that one;
//! 3. deletes the old member's Raft log and state and keeps its data as
//!    the base of a delta resync (`crate::failback`): the member the
//!    catalog places on this node in the new generation starts from the
//!    delta between that data and a current replica, not from nothing.
//!
//! A crash anywhere in between starts the old member again at restart and
//! the next pass fences it again: binding the clone's name, creating it and
//! writing its blocks are all done so that doing them twice is harmless,
//! and the record is rewritten under the same key.

use std::time::Duration;

use bytes::Bytes;
use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::EventSink;
use lifeboat_replication::log_store::LogStore;
use lifeboat_replication::members::LocalMember;
use lifeboat_replication::state_machine::applied_log_id;
use lifeboat_replication::{Applied, Rejection, transport};
use lifeboat_store::frame::FrameAad;
use lifeboat_store::keyring::TenantKeys;
use lifeboat_store::objects::{BucketState, ObjectVersion};
use lifeboat_store::volumes::{BlockContent, VolumeState};
use lifeboat_store::{BLOCK_BYTES, BucketId, Generation, LogIndex, PgId, TenantId, VolumeId};

use crate::core::NodeCore;
use crate::error::{NodeError, NodeResult};

/// Blocks per `WriteBlocks` entry carrying a divergence (256 KiB of
/// plaintext, well under the Raft payload caps).
const CARRY_BLOCKS_PER_ENTRY: usize = 64;
/// How long carrying one entry into the new generation keeps trying to
/// find its leader.
const CARRY_WAIT: Duration = Duration::from_secs(60);
/// Names are at most 63 characters (`names::validate_name`).
const NAME_MAX: usize = 63;

/// The fork index of the first generation after `generation` in `rec`'s
/// lineage: every index at or below it is the same in both.
pub fn fork_after(rec: &pb::PgRecord, generation: u64) -> Option<LogIndex> {
    rec.lineage
        .iter()
        .filter(|l| l.generation > generation)
        .min_by_key(|l| l.generation)
        .map(|l| LogIndex(l.first_index.saturating_sub(1)))
}

/// A stored frame of an object that does not open: the object cannot be
/// carried, and the divergence is not recorded as whole.
fn corrupt_chunk(
    pg: PgId,
    bucket: BucketId,
    key: &[u8],
    cause: impl std::fmt::Display,
) -> NodeError {
    NodeError::Io {
        op: format!(
            "carry object {:?} of bucket {} in PG {pg}",
            String::from_utf8_lossy(key),
            bucket.0
        ),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, cause.to_string()),
    }
}

/// Whether `e` is a refusal by apply that `what` accepts (an earlier
/// attempt's work found done).
/// `e` says that bucket `id` takes no writes (sealed).
fn is_read_only(e: &NodeError, id: u64) -> bool {
    is_rejected(
        e,
        |r| matches!(r, Rejection::BucketReadOnly { bucket } if *bucket == id),
    )
}

fn is_rejected(e: &NodeError, what: impl Fn(&Rejection) -> bool) -> bool {
    matches!(e, NodeError::Replication(lifeboat_replication::Error::Rejected { rejection, .. }) if what(rejection))
}

/// `NAME-div-gG-nN`, the name part cut so that the whole fits.
fn divergence_name(name: &str, generation: u64, node: u64) -> String {
    let suffix = format!("-div-g{generation}-n{node}");
    let keep = NAME_MAX.saturating_sub(suffix.len()).min(name.len());
    format!("{}{suffix}", name[..keep].trim_end_matches('-'))
}

impl NodeCore {
    /// Whether `TENANT/volume` is the clone of a divergence snapshot (which
    /// is read-only).
    pub fn divergence_of(&self, tenant: &str, volume: &str) -> NodeResult<bool> {
        Ok(self
            .catalog
            .divergences()
            .map_err(NodeError::io("read catalog"))?
            .iter()
            .any(|d| d.tenant == tenant && d.volumes.iter().any(|v| v.clone == volume)))
    }

    /// Fences this node's member `local` of `rec`'s PG, recorded at a
    /// generation older than the catalog's, and stops it if it runs (see
    /// the module doc). Until this has succeeded, the member's replica
    /// stays as it is and the reconciler starts no other member of the PG
    /// here. Call under `membership_changes`.
    pub(crate) async fn fence_member(
        &self,
        local: LocalMember,
        rec: &pb::PgRecord,
    ) -> NodeResult<()> {
        let pg = local.pg;
        let old_generation = local.generation.0;
        let Some(fork) = fork_after(rec, old_generation) else {
            tracing::error!(
                pg = pg.0,
                generation = old_generation,
                catalog_generation = rec.generation,
                "the PG's lineage has no generation after this member's: not fencing"
            );
            return Ok(());
        };
        let name = self.pg_display_name(pg);
        if let Some(running) = self.group(pg) {
            self.stop_member(&running).await;
        }
        let applied = {
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || applied_log_id(&db, pg))
                .await
                .map_err(|e| NodeError::io("read the applied index")(std::io::Error::other(e)))?
                .map_err(NodeError::io("read the applied index"))?
        };
        let (last_index, last_term) = applied.map_or((0, 0), |a| (a.index, a.leader_id.term));
        self.events.event(
            pg,
            "fenced",
            format!(
                "this node's member {} of {name} ran generation {old_generation}, the catalog's is {}: stopped; applied to {last_index}, fork index {}",
                local.member,
                rec.generation,
                fork.0
            ),
        );
        // Another old node's divergence may be committed and not yet
        // applied here (this node has just restarted): read the catalog at
        // a linearizable point, so that a log it covers is not carried
        // twice. Without one, carrying is only redundant.
        match self.catalog_group() {
            Ok(catalog) => {
                if let Err(e) = catalog.read_barrier().await {
                    tracing::info!(pg = pg.0, error = %e, "fencing without a catalog read barrier");
                }
            }
            Err(e) => tracing::info!(pg = pg.0, error = %e, "fencing without the catalog"),
        }
        let own = self
            .catalog
            .divergences()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .find(|d| {
                d.pg == pg.0 && d.generation == old_generation && d.node_id == self.config.node_id
            });
        if let Some(done) = own.as_ref().filter(|d| d.complete) {
            // An earlier pass recorded everything and stopped before the
            // end: carrying again would write into sealed clones.
            tracing::info!(
                pg = pg.0,
                generation = old_generation,
                last_index = done.last_index,
                "divergence already recorded complete; keeping the data for a resync"
            );
        } else if last_index > fork.0 {
            // A fencing that crashed while carrying finishes carrying: its
            // clones are named in its own record, which a `covered_by`
            // record would replace, leaving them writable and unlisted.
            let started_carrying =
                own.is_some_and(|d| !d.volumes.is_empty() || !d.buckets.is_empty());
            let covering = if started_carrying {
                None
            } else {
                self.divergence_covering(pg, old_generation, last_index, last_term)?
            };
            let mut record = self
                .divergence_record(rec, local, fork, LogIndex(last_index), last_term)
                .await?;
            match covering {
                Some(by) => record.covered_by = by.node_id,
                None => self.carry_divergence(rec, &mut record).await?,
            }
            record.complete = true;
            let kept: Vec<String> = record
                .volumes
                .iter()
                .map(|v| &v.clone)
                .chain(record.buckets.iter().map(|b| &b.clone))
                .filter(|c| !c.is_empty())
                .cloned()
                .collect();
            let covered_by = record.covered_by;
            self.propose_catalog(pb::command::Kind::RecordDivergence(pb::RecordDivergence {
                record: Some(record),
            }))
            .await?;
            self.events.event(
                pg,
                "divergence_recorded",
                format!(
                    "{name}: entries {}..={last_index} of generation {old_generation} kept as {}",
                    fork.0 + 1,
                    if covered_by != 0 {
                        format!("node {covered_by}'s divergence snapshot, which holds this node's log as a prefix")
                    } else if kept.is_empty() {
                        "a record (no volume or bucket changed)".to_owned()
                    } else {
                        kept.join(", ")
                    }
                ),
            );
        }
        // What it held is now the same as the new generation up to F,
        // plus what it alone wrote (carried above): the base of a delta
        // resync when the catalog places a member here again.
        self.keep_for_resync(pg, old_generation).await?;
        tracing::info!(
            pg = pg.0,
            generation = old_generation,
            "fenced old member stopped; its data is kept for a delta resync"
        );
        Ok(())
    }

    /// Another node's complete divergence of the same PG and generation
    /// whose log has this member's as a prefix: the same last term (one
    /// leader wrote every entry of a term, in order, so two logs that end
    /// in the same term agree up to the shorter one's end) and at least
    /// this member's last index. Its clones then hold every write this
    /// member applied, at the same or a later version.
    fn divergence_covering(
        &self,
        pg: PgId,
        generation: u64,
        last_index: u64,
        last_term: u64,
    ) -> NodeResult<Option<pb::DivergenceRecord>> {
        Ok(self
            .catalog
            .divergences()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .filter(|d| {
                d.pg == pg.0
                    && d.generation == generation
                    && d.node_id != self.config.node_id
                    && d.complete
                    && d.covered_by == 0
                    && d.last_term == last_term
                    && d.last_index >= last_index
            })
            .max_by_key(|d| d.last_index))
    }

    /// The record of what the stopped old member of `rec`'s PG applied
    /// after `fork`, with nothing carried yet.
    async fn divergence_record(
        &self,
        rec: &pb::PgRecord,
        local: LocalMember,
        fork: LogIndex,
        last: LogIndex,
        last_term: u64,
    ) -> NodeResult<pb::DivergenceRecord> {
        let pg = local.pg;
        let (fork_ms, last_ms) = {
            let log = LogStore::new(self.db.clone(), pg, self.syncer.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64)> {
                Ok((
                    log.stamp_at(fork.0)?.unwrap_or(0),
                    log.stamp_at(last.0)?.unwrap_or(0),
                ))
            })
            .await
            .map_err(|e| NodeError::io("read the old log's stamps")(std::io::Error::other(e)))?
            .map_err(NodeError::io("read the old log's stamps"))?
        };
        Ok(pb::DivergenceRecord {
            pg: pg.0,
            tenant: rec.tenant.clone(),
            pg_name: rec.name.clone(),
            generation: local.generation.0,
            fork_index: fork.0,
            last_index: last.0,
            last_term,
            node_id: self.config.node_id,
            member_id: local.member.0,
            recorded_ms: self.now_ms(),
            volumes: Vec::new(),
            buckets: Vec::new(),
            fork_ms,
            last_ms,
            complete: false,
            covered_by: 0,
        })
    }

    /// Carries what the stopped old member of `rec`'s PG applied after
    /// the fork into the new generation (see the module doc), listing what
    /// it carries in `record` (from [`Self::divergence_record`]).
    async fn carry_divergence(
        &self,
        rec: &pb::PgRecord,
        record: &mut pb::DivergenceRecord,
    ) -> NodeResult<()> {
        let pg = PgId(record.pg);
        let (generation, node) = (record.generation, record.node_id);
        let (fork, last) = (LogIndex(record.fork_index), LogIndex(record.last_index));
        let tenant = self.tenant(&rec.tenant)?;
        let keys = self.tenant_keys(&rec.tenant, None)?;
        for (volume, _, now) in self.volumes.volumes(pg)? {
            let then = self.volumes.volume_at(pg, volume, fork)?;
            let changed = self.volumes.blocks_written_after(pg, volume, fork)?;
            let record_changed = match &then {
                None => true,
                Some((_, then)) => then != &now,
            };
            if changed.is_empty() && !record_changed {
                continue;
            }
            if now.state == VolumeState::Deleted {
                record.volumes.push(pb::DivergedVolume {
                    volume: now.name.clone(),
                    deleted: true,
                    ..Default::default()
                });
                continue;
            }
            let clone = divergence_name(&now.name, generation, node);
            let base = then
                .filter(|(_, r)| r.state == VolumeState::Active)
                .map(|_| pb::VolumeBase {
                    volume: volume.0,
                    index: fork.0,
                    pg: None,
                });
            let clone_id = self
                .carry_volume_record(rec, &clone, now.size_bytes, base)
                .await?;
            // Recorded before its blocks are written: from here on the
            // clone is known as a divergence snapshot, read-only to NBD.
            record.volumes.push(pb::DivergedVolume {
                volume: now.name.clone(),
                clone: clone.clone(),
                blocks: changed.len() as u64,
                bytes: 0,
                deleted: false,
            });
            self.propose_catalog(pb::command::Kind::RecordDivergence(pb::RecordDivergence {
                record: Some(record.clone()),
            }))
            .await?;
            let mut bytes = 0u64;
            for run in changed.chunks(CARRY_BLOCKS_PER_ENTRY) {
                let mut writes = Vec::with_capacity(run.len());
                for &block in run {
                    let stored = self
                        .volumes
                        .latest_blocks(pg, volume, block, 1)?
                        .pop()
                        .flatten();
                    let frame = match stored.as_ref().map(|s| s.content()) {
                        None | Some(BlockContent::Zero) => Bytes::new(),
                        Some(BlockContent::Frame(frame)) => {
                            let aad = |volume| FrameAad::Block {
                                tenant: TenantId(tenant.id),
                                pg,
                                volume,
                                block,
                            };
                            let plain =
                                self.codec
                                    .decode(&keys, &aad(volume), frame)
                                    .map_err(|cause| {
                                        lifeboat_store::volumes::corrupt_block(
                                            pg, volume, block, last, cause,
                                        )
                                    })?;
                            bytes += BLOCK_BYTES as u64;
                            Bytes::from(self.codec.encode(
                                keys.current(),
                                &aad(VolumeId(clone_id)),
                                &plain,
                            ))
                        }
                    };
                    writes.push(pb::BlockWrite {
                        block: block.0,
                        frame,
                        expect_latest: None,
                    });
                }
                self.propose_in_new_generation(
                    rec,
                    pb::command::Kind::WriteBlocks(pb::WriteBlocks {
                        volume: clone_id,
                        blocks: writes,
                        newest_mask: None,
                    }),
                )
                .await?;
            }
            if let Some(carried) = record.volumes.last_mut() {
                carried.bytes = bytes;
            }
            tracing::info!(
                pg = pg.0,
                volume = now.name,
                clone,
                blocks = changed.len(),
                "divergence carried"
            );
        }
        for (bucket, _, now) in self.objects.buckets(pg)? {
            let then = self.objects.bucket_at(pg, bucket, fork)?;
            let changed = self.objects.keys_written_after(pg, bucket, fork)?;
            let record_changed = match &then {
                None => true,
                Some((_, then)) => then != &now,
            };
            // A read-only clone holds nothing of its own.
            if now.is_read_only() || (changed.is_empty() && !record_changed) {
                continue;
            }
            if now.state == BucketState::Deleted {
                record.buckets.push(pb::DivergedBucket {
                    bucket: now.name.clone(),
                    deleted: true,
                    ..Default::default()
                });
                continue;
            }
            let clone = divergence_name(&now.name, generation, node);
            let base = then
                .filter(|(_, r)| r.state == BucketState::Active)
                .map(|_| pb::BucketBase {
                    bucket: bucket.0,
                    index: fork.0,
                    writable: true,
                    pg: None,
                });
            let clone_id = self.carry_bucket_record(rec, &clone, base).await?;
            record.buckets.push(pb::DivergedBucket {
                bucket: now.name.clone(),
                clone: clone.clone(),
                objects: changed.len() as u64,
                bytes: 0,
                deleted: false,
            });
            self.propose_catalog(pb::command::Kind::RecordDivergence(pb::RecordDivergence {
                record: Some(record.clone()),
            }))
            .await?;
            let (mut bytes, mut sealed) = (0u64, false);
            for key in &changed {
                let to = BucketId(clone_id);
                let carried = match self
                    .carry_object(rec, tenant.id, &keys, bucket, to, key, !sealed)
                    .await
                {
                    // An earlier pass sealed the clone, which it does
                    // only once every key is in: the rest is counted.
                    Err(e) if !sealed && is_read_only(&e, clone_id) => {
                        sealed = true;
                        self.carry_object(rec, tenant.id, &keys, bucket, to, key, false)
                            .await
                    }
                    other => other,
                };
                bytes += carried?;
            }
            if !sealed {
                self.propose_in_new_generation(
                    rec,
                    pb::command::Kind::SealBucket(pb::SealBucket { bucket: clone_id }),
                )
                .await?;
            }
            if let Some(carried) = record.buckets.last_mut() {
                carried.bytes = bytes;
            }
            tracing::info!(
                pg = pg.0,
                bucket = now.name,
                clone,
                objects = changed.len(),
                "divergence carried"
            );
        }
        Ok(())
    }

    /// Carries `key` of `bucket` as this node's replica last had it into
    /// the clone: its object (chunks sealed again under new ids, record
    /// sealed again for the clone), or a delete marker when it had none.
    /// Returns the plaintext bytes carried. With `write` false it only
    /// counts them (decrypting, so a corrupt chunk is still found).
    #[allow(clippy::too_many_arguments)]
    async fn carry_object(
        &self,
        rec: &pb::PgRecord,
        tenant_id: u64,
        keys: &TenantKeys,
        bucket: BucketId,
        clone: BucketId,
        key: &[u8],
        write: bool,
    ) -> NodeResult<u64> {
        let pg = PgId(rec.id);
        let tenant = TenantId(tenant_id);
        let (chunks, sealed_record) = match self.objects.latest(pg, bucket, key)? {
            Some((_, ObjectVersion::Object { chunks, record })) => (chunks, record),
            _ if !write => return Ok(0),
            // Deleted after the fork: the clone hides the key too.
            _ => {
                self.propose_in_new_generation(
                    rec,
                    pb::command::Kind::DeleteObject(pb::DeleteObject {
                        bucket: clone.0,
                        key: key.to_vec().into(),
                    }),
                )
                .await?;
                return Ok(0);
            }
        };
        let record_aad = |bucket: BucketId| FrameAad::Record {
            tenant,
            pg,
            bucket: bucket.0,
        };
        let plain_record = self
            .codec
            .decode(keys, &record_aad(bucket), &sealed_record)
            .map_err(|cause| corrupt_chunk(pg, bucket, key, cause))?;
        let record = Bytes::from(self.codec.encode(
            keys.current(),
            &record_aad(clone),
            &plain_record,
        ));
        let stream = if chunks.len() > 1 {
            rand::random::<u64>() | 1
        } else {
            0
        };
        let (mut ids, mut inline, mut bytes) = (Vec::with_capacity(chunks.len()), Vec::new(), 0);
        for chunk in chunks {
            let chunk_aad = |chunk: u64| FrameAad::Chunk { tenant, pg, chunk };
            let frame = self.objects.chunk(pg, chunk)?.ok_or_else(|| {
                corrupt_chunk(pg, bucket, key, format!("chunk {} is missing", chunk.0))
            })?;
            let plain = self
                .codec
                .decode(keys, &chunk_aad(chunk.0), &frame)
                .map_err(|cause| corrupt_chunk(pg, bucket, key, cause))?;
            bytes += plain.len() as u64;
            if !write {
                continue;
            }
            let id = rand::random::<u64>();
            let write = pb::ChunkWrite {
                chunk: id,
                frame: Bytes::from(self.codec.encode(keys.current(), &chunk_aad(id), &plain)),
            };
            ids.push(id);
            if stream == 0 {
                inline.push(write);
            } else {
                self.propose_in_new_generation(
                    rec,
                    pb::command::Kind::WriteChunks(pb::WriteChunks {
                        stream,
                        chunks: vec![write],
                    }),
                )
                .await?;
            }
        }
        if !write {
            return Ok(bytes);
        }
        self.propose_in_new_generation(
            rec,
            pb::command::Kind::PutObject(pb::PutObject {
                bucket: clone.0,
                key: key.to_vec().into(),
                chunks: ids,
                new_chunks: inline,
                record,
                if_absent: false,
                stream,
            }),
        )
        .await?;
        Ok(bytes)
    }

    /// Binds bucket name `clone` to the PG and creates the bucket in the
    /// new generation (a writable clone of `base` when set); an earlier
    /// attempt's binding and bucket are taken as they are. Returns the
    /// bucket id.
    async fn carry_bucket_record(
        &self,
        rec: &pb::PgRecord,
        clone: &str,
        base: Option<pb::BucketBase>,
    ) -> NodeResult<u64> {
        let bound = self
            .catalog
            .bucket_name(clone)
            .map_err(NodeError::io("read catalog"))?;
        let bucket = match bound {
            Some(b) if b.pg == rec.id => b.bucket,
            Some(_) => {
                return Err(NodeError::InvalidName {
                    what: "divergence bucket",
                    name: clone.to_owned(),
                    reason: "the name is taken".into(),
                });
            }
            None => {
                let (_, applied) = self
                    .propose_catalog(pb::command::Kind::BindBucketName(pb::BindBucketName {
                        tenant: rec.tenant.clone(),
                        bucket_name: clone.to_owned(),
                        pg_name: rec.name.clone(),
                        existing_bucket: None,
                    }))
                    .await?;
                let Applied::BucketNameBound { bucket, .. } = applied else {
                    return Err(NodeError::unexpected_outcome("bind bucket name", &applied));
                };
                bucket
            }
        };
        match self
            .propose_in_new_generation(
                rec,
                pb::command::Kind::CreateBucket(pb::CreateBucket {
                    bucket,
                    name: clone.to_owned(),
                    base,
                }),
            )
            .await
        {
            Err(e) if !is_rejected(&e, |r| matches!(r, Rejection::BucketExists { .. })) => Err(e),
            _ => Ok(bucket),
        }
    }

    /// Binds `TENANT/clone` to the PG and creates the volume in the new
    /// generation (a clone of `base` when set); an earlier attempt's binding
    /// and volume are taken as they are. Returns the volume id.
    async fn carry_volume_record(
        &self,
        rec: &pb::PgRecord,
        clone: &str,
        size_bytes: u64,
        base: Option<pb::VolumeBase>,
    ) -> NodeResult<u64> {
        let bound = self
            .catalog
            .volume_name(&rec.tenant, clone)
            .map_err(NodeError::io("read catalog"))?;
        let volume = match bound {
            Some(b) if b.pg == rec.id => b.volume,
            Some(_) => {
                return Err(NodeError::InvalidName {
                    what: "divergence volume",
                    name: format!("{}/{clone}", rec.tenant),
                    reason: "the name is taken in another protection group".into(),
                });
            }
            None => {
                let (_, applied) = self
                    .propose_catalog(pb::command::Kind::BindVolumeName(pb::BindVolumeName {
                        tenant: rec.tenant.clone(),
                        volume_name: clone.to_owned(),
                        pg_name: rec.name.clone(),
                        existing_volume: None,
                    }))
                    .await?;
                let Applied::VolumeNameBound { volume, .. } = applied else {
                    return Err(NodeError::unexpected_outcome("bind volume name", &applied));
                };
                volume
            }
        };
        match self
            .propose_in_new_generation(
                rec,
                pb::command::Kind::CreateVolume(pb::CreateVolume {
                    volume,
                    name: clone.to_owned(),
                    size_bytes,
                    base,
                }),
            )
            .await
        {
            Err(e) if !is_rejected(&e, |r| matches!(r, Rejection::VolumeExists { .. })) => Err(e),
            _ => Ok(volume),
        }
    }

    /// Proposes `kind` to the leader of `rec`'s PG in the catalog's
    /// generation, from this node that has no member of it: asks the
    /// voters' nodes who leads, and tries again while none does.
    async fn propose_in_new_generation(
        &self,
        rec: &pb::PgRecord,
        kind: pb::command::Kind,
    ) -> NodeResult<(LogIndex, Applied)> {
        let pg = PgId(rec.id);
        let generation = Generation(rec.generation);
        let nodes = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let addr = |id: u64| {
            nodes
                .iter()
                .find(|n| n.id == id)
                .and_then(|n| n.addrs.as_ref())
                .map(|a| a.raft.clone())
        };
        let started = std::time::Instant::now();
        let mut why = String::from("no voter answered");
        while started.elapsed() < CARRY_WAIT {
            for voter in rec.members.iter().filter(|m| m.voter) {
                let Some(voter_addr) = addr(voter.node_id) else {
                    continue;
                };
                let view = match transport::group_view(
                    &self.peers,
                    &self.identity,
                    &voter_addr,
                    pg,
                    generation,
                )
                .await
                {
                    Ok(v) => v,
                    Err(s) => {
                        why = format!("node {}: {}", voter.node_id, s.message());
                        continue;
                    }
                };
                let Some(leader_addr) = addr(view.leader_node).filter(|_| view.leader_node != 0)
                else {
                    why = format!("node {} knows no leader", voter.node_id);
                    continue;
                };
                match transport::propose_at(
                    &self.peers,
                    &self.identity,
                    &leader_addr,
                    pg,
                    generation,
                    kind.clone(),
                )
                .await
                {
                    Ok((index, Ok(applied))) => return Ok((index, applied)),
                    Ok((_, Err(rejection))) => {
                        return Err(lifeboat_replication::Error::Rejected {
                            pg: pg.0,
                            rejection,
                        }
                        .into());
                    }
                    Err(s) => why = format!("leader node {}: {}", view.leader_node, s.message()),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(NodeError::Peer {
            addr: format!(
                "the leader of {} at generation {}",
                self.pg_display_name(pg),
                rec.generation
            ),
            reason: why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_names_fit_and_say_where_they_come_from() {
        assert_eq!(divergence_name("disk0", 1, 2), "disk0-div-g1-n2");
        let long = "a".repeat(63);
        let name = divergence_name(&long, 12, 345);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("-div-g12-n345"), "{name}");
        assert!(crate::names::validate_name("volume", &name).is_ok());
        // A cut that ends in '-' would leave "--": trimmed.
        let dashed = format!("{}-{}", "b".repeat(48), "c".repeat(20));
        assert!(!divergence_name(&dashed, 1, 1).contains("--"));
    }

    #[test]
    fn the_fork_is_the_first_later_generation_s() {
        let rec = pb::PgRecord {
            generation: 3,
            lineage: vec![
                pb::LineageEntry {
                    generation: 2,
                    first_index: 41,
                    ..Default::default()
                },
                pb::LineageEntry {
                    generation: 3,
                    first_index: 90,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(fork_after(&rec, 1), Some(LogIndex(40)));
        assert_eq!(fork_after(&rec, 2), Some(LogIndex(89)));
        assert_eq!(fork_after(&rec, 3), None);
    }
}
