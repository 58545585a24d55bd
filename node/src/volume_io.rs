//! The volume backend of the NBD server: reads and writes of `tenant/volume`
//! exports through the frame codec and the volume's protection group.
//!
//! Write path (DESIGN.md "Write path"): whole 4 KiB blocks are encoded here
//! (all-zero blocks become zero markers); a block the write covers only in
//! part is read, merged and encoded under its block lock, held until the
//! entry is applied. Entries carry at most [`ENTRY_BLOCKS_MAX`] blocks. A
//! write returns only after its entries are durable in the log and applied,
//! so FLUSH and FUA have nothing left to do.
//!
//! Reads wait for a linearizable read point, then read `latest` (two batched
//! lookups per request, whatever the history's length) and decode. A
//! clone's blocks it never wrote come from its base at the cloned index
//! (one seek each). Exports of the past (`VOLUME@SNAPSHOT`, `VOLUME@TIME`)
//! are read-only, read at a fixed index and need no read point.

use std::sync::Arc;

use bytes::Bytes;
use lifeboat_proto::raft as pb;
use lifeboat_snapshot::RestorePoint;
use lifeboat_store::frame::{FrameAad, FrameError};
use lifeboat_store::keyring::TenantKeys;
use lifeboat_store::volumes::{self, BlockContent, Layer, VolumeState};
use lifeboat_store::{BLOCK_BYTES, BlockNo, LogIndex, PgId, TenantId, VolumeId};

use crate::core::{NodeCore, VolumeLocation};
use crate::error::NodeError;
use crate::nbd::{Errno, Export, ExportInfo, ExportProvider, OpenError};

/// Blocks per log entry: 1 MiB of data, so replication batches stay bounded.
pub const ENTRY_BLOCKS_MAX: usize = 256;
/// Requests of more blocks than this encode or decode off the async workers.
const INLINE_CODEC_BLOCKS_MAX: usize = 4;
/// Merges of one sub-block write before it gives up on a block that other
/// nodes' writers keep changing.
const MERGE_ATTEMPTS_MAX: u32 = 16;

const BLOCK: u64 = BLOCK_BYTES as u64;

/// Serves every volume of the node as an NBD export.
pub struct VolumeExports {
    core: Arc<NodeCore>,
}

impl VolumeExports {
    pub fn new(core: Arc<NodeCore>) -> VolumeExports {
        VolumeExports { core }
    }
}

impl ExportProvider for VolumeExports {
    type Export = VolumeExport;

    async fn list(&self) -> Vec<ExportInfo> {
        let mut out = Vec::new();
        let tenants = match self.core.tenants() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "NBD LIST: cannot read tenants");
                return out;
            }
        };
        for t in tenants {
            match self.core.list_volumes(&t.name) {
                Ok(vols) => out.extend(vols.into_iter().map(|v| ExportInfo {
                    name: format!("{}/{}", v.tenant, v.name),
                    size_bytes: v.size_bytes,
                    read_only: false,
                    description: format!(
                        "Lifeboat volume in protection group {}/{}",
                        v.tenant, v.pg_name
                    ),
                })),
                Err(e) => {
                    tracing::warn!(tenant = t.name, error = %e, "NBD LIST: cannot list volumes")
                }
            }
        }
        out
    }

    async fn open(&self, name: &str) -> Result<VolumeExport, OpenError> {
        let (volume, stale_reads) = match name.strip_suffix(STALE_READS_SUFFIX) {
            Some(volume) => (volume, true),
            None => (name, false),
        };
        let open_error = |e: NodeError| match e {
            NodeError::VolumeNotFound(_)
            | NodeError::TenantNotFound(_)
            | NodeError::InvalidName { .. } => OpenError::NotFound {
                name: name.to_owned(),
            },
            NodeError::NotInitialized => OpenError::Unavailable {
                name: name.to_owned(),
                reason: "the node is not initialised".into(),
            },
            e => OpenError::Unavailable {
                name: name.to_owned(),
                reason: e.to_string(),
            },
        };
        let (volume, point) = lifeboat_snapshot::parse_export_name(volume, self.core.now())
            .map_err(|e| open_error(e.into()))?;
        let loc = self.core.locate_volume(volume).map_err(open_error)?;
        let pinned = matches!(point, RestorePoint::Snapshot(_));
        let (size_bytes, at) = match point {
            RestorePoint::Latest => (loc.record.size_bytes, None),
            point => {
                let at = self
                    .core
                    .resolve_point(&loc.group, &point, stale_reads)
                    .await
                    .map_err(open_error)?;
                let record = self
                    .core
                    .volumes
                    .volume_at(loc.group.pg(), loc.volume, at.index)
                    .map_err(|e| open_error(e.into()))?
                    .map(|(_, r)| r)
                    .filter(|r| r.state == VolumeState::Active)
                    .ok_or_else(|| OpenError::Unavailable {
                        name: name.to_owned(),
                        reason: format!(
                            "volume {volume} did not exist at {}",
                            lifeboat_snapshot::format_ms(at.at_ms)
                        ),
                    })?;
                (record.size_bytes, Some(at.index))
            }
        };
        let divergence = self
            .core
            .divergence_of(&loc.tenant, &loc.volume_name)
            .map_err(open_error)?;
        let drill = self
            .core
            .drill_of_pg(loc.group.pg())
            .map_err(open_error)?
            .map(|(drill, source, index)| DrillClone {
                drill,
                source,
                index,
                first_io: std::sync::atomic::AtomicBool::new(false),
            });
        let loc_pg = loc.group.pg();
        let layers = self
            .core
            .volumes
            .layers(loc_pg, loc.volume, at)
            .map_err(|e| open_error(e.into()))?;
        Ok(VolumeExport {
            inner: Arc::new(ExportState {
                core: self.core.clone(),
                size_bytes,
                loc,
                stale_reads,
                at,
                pinned,
                divergence,
                drill,
                layers: std::sync::Mutex::new(LayerCache {
                    newest_mask: lifeboat_store::masks::newest_mask(&self.core.db, loc_pg)
                        .map_err(|e| open_error(e.into()))?,
                    layers: Arc::new(layers),
                }),
            }),
        })
    }
}

struct ExportState {
    core: Arc<NodeCore>,
    loc: VolumeLocation,
    /// Fixed for the session: NBD tells the client the size once.
    size_bytes: u64,
    /// The client opened `TENANT/VOLUME:stale`: reads return what this
    /// node has applied, without asking the leader (they keep working on a
    /// DR node cut off from the primary, and may miss the latest writes).
    stale_reads: bool,
    /// A read-only export of the volume at this index (`VOLUME@SNAPSHOT`,
    /// `VOLUME@TIME`); `None`: the live volume.
    at: Option<LogIndex>,
    /// `at` is a snapshot's, which GC keeps; a past time is kept only
    /// while it is inside the PG's window.
    pinned: bool,
    /// The volume is a divergence snapshot (what an old active site wrote
    /// after a forced failover's fork): read-only, whatever the point.
    divergence: bool,
    /// Set for a drill's clone: it reads through to this node's replica
    /// of the drill's source, and its first I/O is the drill's RTO.
    drill: Option<DrillClone>,
    /// What reads see: the volume's own blocks (at `at`), then, for a
    /// clone, each base at the index it was cloned from; after a restore in
    /// place, its own blocks as they were restored to in between.
    layers: std::sync::Mutex<LayerCache>,
}

/// A drill's clone behind an export.
struct DrillClone {
    drill: u64,
    /// The source PG and the restore point the clone reads it at.
    source: PgId,
    index: LogIndex,
    /// Reported (or being reported) by this export.
    first_io: std::sync::atomic::AtomicBool,
}

/// A live export's layers and the PG's newest rollback mask they were
/// worked out under: a restore (a newer mask) makes them stale.
struct LayerCache {
    newest_mask: Option<LogIndex>,
    layers: Arc<Vec<Layer>>,
}

/// Appended to an export name to read this node's replica as it is.
pub const STALE_READS_SUFFIX: &str = ":stale";

#[derive(Clone)]
pub struct VolumeExport {
    inner: Arc<ExportState>,
}

/// A block the request covers only in part.
struct PartialBlock {
    block: BlockNo,
    offset_in_block: usize,
    bytes: Bytes,
}

impl ExportState {
    fn pg(&self) -> PgId {
        self.loc.group.pg()
    }

    /// This node's member of the volume's PG as it runs now: a forced
    /// failover restarts it at a new generation under a connection that
    /// found the old one.
    fn group(&self) -> lifeboat_replication::ProtectionGroup {
        self.core
            .group(self.pg())
            .unwrap_or_else(|| self.loc.group.clone())
    }

    /// What a frame of `block` stored under `volume` of `pg` is bound to
    /// (the export's own volume, or for a clone, the base it reads through
    /// to, which for a drill's clone is in the drill's source PG).
    fn aad(&self, pg: PgId, volume: VolumeId, block: BlockNo) -> FrameAad {
        FrameAad::Block {
            tenant: TenantId(self.loc.tenant_id.0),
            pg,
            volume,
            block,
        }
    }

    fn keys(&self) -> Result<Arc<TenantKeys>, Errno> {
        self.core
            .tenant_keys(&self.loc.tenant, None)
            .map_err(|e| self.fail("load tenant keys", &e))
    }

    /// Logs a failure with its stable code and maps it to an errno.
    fn fail(&self, what: &str, e: &NodeError) -> Errno {
        let errno = crate::nbd::errno::from_node_error(e);
        match errno {
            Errno::NoSpc if matches!(e, NodeError::QuotaExceeded { .. }) => {
                tracing::info!(
                    code = e.code(),
                    volume = self.loc.volume_name,
                    "{what}: {e}"
                );
            }
            Errno::NoSpc => {
                self.core.metrics.writes_refused_no_space.inc();
                tracing::warn!(
                    code = e.code(),
                    volume = self.loc.volume_name,
                    "{what}: {e}"
                );
            }
            _ => tracing::error!(
                code = e.code(),
                tenant = self.loc.tenant,
                volume = self.loc.volume_name,
                "{what}: {e}"
            ),
        }
        errno
    }

    fn decode_block(
        &self,
        keys: &TenantKeys,
        block: BlockNo,
        stored: Option<&volumes::StoredBlock>,
        out: &mut [u8],
    ) -> Result<(), Errno> {
        let Some(stored) = stored else {
            out.fill(0);
            return Ok(());
        };
        match stored.content() {
            BlockContent::Zero => {
                out.fill(0);
                Ok(())
            }
            BlockContent::Frame(frame) => {
                match self.core.codec.decode(
                    keys,
                    &self.aad(stored.pg, stored.volume, block),
                    frame,
                ) {
                    Ok(plain) if plain.len() == BLOCK_BYTES => {
                        out.copy_from_slice(&plain);
                        Ok(())
                    }
                    Ok(plain) => {
                        Err(self.corrupt(block, stored, FrameError::TooLarge { len: plain.len() }))
                    }
                    Err(cause) => Err(self.corrupt(block, stored, cause)),
                }
            }
        }
    }

    fn corrupt(&self, block: BlockNo, stored: &volumes::StoredBlock, cause: FrameError) -> Errno {
        self.core.metrics.corrupt_frames.inc();
        let e = volumes::corrupt_block(self.pg(), stored.volume, block, stored.index, cause);
        tracing::error!(
            code = e.code(),
            tenant = self.loc.tenant,
            volume = self.loc.volume_name,
            "{e}"
        );
        Errno::Io
    }

    fn encode_block(&self, keys: &TenantKeys, block: BlockNo, plain: &[u8]) -> pb::BlockWrite {
        let frame = if plain.iter().all(|b| *b == 0) {
            Bytes::new()
        } else {
            Bytes::from(self.core.codec.encode(
                keys.current(),
                &self.aad(self.pg(), self.loc.volume, block),
                plain,
            ))
        };
        pb::BlockWrite {
            block: block.0,
            frame,
            expect_latest: None,
        }
    }

    /// What reads see now. A past export never changes (a mask is always
    /// newer than the point it was opened at); a live one checks the PG's
    /// newest mask, one seek, and works its layers out again after a
    /// restore.
    fn layers(&self) -> Result<Arc<Vec<Layer>>, Errno> {
        self.layers_and_mask().map(|(layers, _)| layers)
    }

    /// [`ExportState::layers`] and the newest mask they were worked out
    /// under.
    fn layers_and_mask(&self) -> Result<(Arc<Vec<Layer>>, Option<LogIndex>), Errno> {
        let mut cache = self.layers.lock().expect("layer cache lock");
        if self.at.is_some() {
            return Ok((cache.layers.clone(), cache.newest_mask));
        }
        let newest = lifeboat_store::masks::newest_mask(&self.core.db, self.pg())
            .map_err(|e| self.fail("read masks", &e.into()))?;
        if newest != cache.newest_mask {
            let layers = self
                .core
                .volumes
                .layers(self.pg(), self.loc.volume, None)
                .map_err(|e| self.fail("read layers", &e.into()))?;
            *cache = LayerCache {
                newest_mask: newest,
                layers: Arc::new(layers),
            };
        }
        Ok((cache.layers.clone(), cache.newest_mask))
    }

    /// For a drill's clone: waits until this node's replica of the source
    /// has the restore point (a standby replica may trail the one the
    /// point was taken from), and reports the clone's first I/O.
    async fn drill_source_ready(&self) -> Result<(), Errno> {
        let Some(d) = &self.drill else {
            return Ok(());
        };
        self.core
            .wait_drill_source(d.source, d.index)
            .await
            .map_err(|e| self.fail("read a drill's source", &e))?;
        if !d.first_io.swap(true, std::sync::atomic::Ordering::Relaxed) {
            self.core.record_drill_io(d.drill, &self.loc.volume_name);
        }
        Ok(())
    }

    /// Waits for a linearizable read point: at the leader, or on this
    /// member once it has applied the leader's read index.
    async fn read_point(&self) -> Result<(), Errno> {
        if self.stale_reads {
            return Ok(());
        }
        self.group()
            .read_barrier()
            .await
            .map(|_| ())
            .map_err(|e| self.fail("read barrier", &e.into()))
    }

    /// Proposes the blocks in entries of at most ENTRY_BLOCKS_MAX, waiting
    /// for all of them to be applied. Small writes may share an entry with
    /// other writers' (the group's write queue merges them).
    async fn propose_blocks(&self, blocks: Vec<pb::BlockWrite>) -> Result<(), Errno> {
        let group = self.group();
        let mut pending = Vec::new();
        let mut blocks = blocks.into_iter().peekable();
        while blocks.peek().is_some() {
            let chunk: Vec<_> = blocks.by_ref().take(ENTRY_BLOCKS_MAX).collect();
            pending.push(group.write_blocks(self.loc.volume.0, chunk));
        }
        for r in futures::future::join_all(pending).await {
            r.map_err(|e| self.fail("write", &e.into()))?;
        }
        Ok(())
    }

    fn check_space(&self) -> Result<(), Errno> {
        self.core
            .check_reserve()
            .map_err(|e| self.fail("write", &e.into()))
    }

    /// Writes `data` at `offset`; `data` of `None` writes zeros.
    async fn write_range(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
    ) -> Result<(), Errno> {
        self.check_space()?;
        self.drill_source_ready().await?;
        if data.is_some() {
            // Zeros, trims and deletes store nothing: they pass a full
            // quota, so a tenant can always make room.
            self.core
                .check_quota(self.loc.group.pg())
                .map_err(|e| self.fail("write", &e))?;
        }
        let end = offset + len;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut full: Vec<(BlockNo, Option<Bytes>)> = Vec::new();
        let mut partial: Vec<PartialBlock> = Vec::new();
        for b in first..=last {
            let block_start = b * BLOCK;
            let s = offset.max(block_start);
            let e = end.min(block_start + BLOCK);
            let bytes = data
                .as_ref()
                .map(|d| d.slice((s - offset) as usize..(e - offset) as usize));
            if s == block_start && e == block_start + BLOCK {
                full.push((BlockNo(b), bytes));
            } else {
                partial.push(PartialBlock {
                    block: BlockNo(b),
                    offset_in_block: (s - block_start) as usize,
                    bytes: bytes.unwrap_or_else(|| Bytes::from(vec![0u8; (e - s) as usize])),
                });
            }
        }
        let keys = self.keys()?;
        let this = self.clone();
        let encode_full = move |keys: Arc<TenantKeys>| -> Vec<pb::BlockWrite> {
            full.iter()
                .map(|(block, bytes)| match bytes {
                    Some(plain) => this.encode_block(&keys, *block, plain),
                    None => pb::BlockWrite {
                        block: block.0,
                        frame: Bytes::new(),
                        expect_latest: None,
                    },
                })
                .collect()
        };
        let full_count = (last - first + 1) as usize - partial.len();
        let mut writes = if full_count > INLINE_CODEC_BLOCKS_MAX {
            let keys = keys.clone();
            tokio::task::spawn_blocking(move || encode_full(keys))
                .await
                .map_err(|_| Errno::Io)?
        } else {
            encode_full(keys.clone())
        };
        if partial.is_empty() {
            return self.propose_blocks(writes).await;
        }
        // Whole blocks first: they need no merge.
        if !writes.is_empty() {
            self.propose_blocks(std::mem::take(&mut writes)).await?;
        }
        // Read-merge-encode under the block locks, held until applied. The
        // locks keep this node's own writers apart; each merged block also
        // names the version it read, so a writer on another node that got
        // there first makes apply refuse this entry, and it merges again.
        let locked: Vec<BlockNo> = partial.iter().map(|p| p.block).collect();
        let _guards = self
            .core
            .block_locks
            .lock(self.pg(), self.loc.volume, &locked)
            .await;
        for attempt in 1..=MERGE_ATTEMPTS_MAX {
            self.read_point().await?;
            let (layers, newest_mask) = self.layers_and_mask()?;
            let plain = layers.as_slice() == [Layer::latest(self.loc.volume)];
            let mut merged = Vec::with_capacity(partial.len());
            for p in &partial {
                let read_err = |e: lifeboat_store::Error| self.fail("read for merge", &e.into());
                let volumes = &self.core.volumes;
                let own = volumes
                    .latest_blocks(self.pg(), self.loc.volume, p.block, 1)
                    .map_err(read_err)?;
                // A clone's block it never wrote comes from its base; a
                // restored volume's from the state it was restored to.
                let visible = if plain {
                    own.clone()
                } else {
                    volumes
                        .visible_blocks(self.pg(), &layers, p.block, 1)
                        .map_err(read_err)?
                };
                let mut plain = vec![0u8; BLOCK_BYTES];
                self.decode_block(&keys, p.block, visible[0].as_ref(), &mut plain)?;
                plain[p.offset_in_block..p.offset_in_block + p.bytes.len()]
                    .copy_from_slice(&p.bytes);
                let mut write = self.encode_block(&keys, p.block, &plain);
                write.expect_latest = Some(own[0].as_ref().map_or(0, |s| s.index.0));
                merged.push(write);
            }
            let kind = pb::command::Kind::WriteBlocks(pb::WriteBlocks {
                volume: self.loc.volume.0,
                blocks: merged,
                newest_mask: Some(newest_mask.map_or(0, |i| i.0)),
            });
            match self.group().propose(kind).await {
                Ok(_) => return Ok(()),
                Err(lifeboat_replication::Error::Rejected {
                    rejection: lifeboat_replication::Rejection::BlockChanged { block, .. },
                    ..
                }) => {
                    tracing::debug!(
                        volume = self.loc.volume_name,
                        block,
                        attempt,
                        "merged block changed underneath; merging again"
                    );
                }
                Err(e) => return Err(self.fail("write", &e.into())),
            }
        }
        tracing::error!(
            volume = self.loc.volume_name,
            "sub-block write kept losing races to other writers"
        );
        Err(Errno::Io)
    }

    async fn read_range(self: &Arc<Self>, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let end = offset + u64::from(len);
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let count = last - first + 1;
        // History never changes: reads of the past need no read point,
        // only a check that GC has not passed them since the export opened.
        match self.at {
            None => self.read_point().await?,
            Some(at) if !self.pinned => {
                let horizon = lifeboat_store::gc::horizon(&self.core.db, self.pg())
                    .map_err(|e| self.fail("read horizon", &e.into()))?;
                if horizon.is_some_and(|h| at < h.index) {
                    tracing::warn!(
                        volume = self.loc.volume_name,
                        index = at.0,
                        "a past export's moment has left the protection window"
                    );
                    return Err(Errno::Io);
                }
            }
            Some(_) => {}
        }
        self.drill_source_ready().await?;
        let layers = self.layers()?;
        let stored = self
            .core
            .volumes
            .visible_blocks(self.pg(), &layers, BlockNo(first), count)
            .map_err(|e| self.fail("read", &e.into()))?;
        let keys = self.keys()?;
        let this = self.clone();
        let decode_all = move || -> Result<Vec<u8>, Errno> {
            let mut buf = vec![0u8; count as usize * BLOCK_BYTES];
            for (i, s) in stored.iter().enumerate() {
                let out = &mut buf[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
                this.decode_block(&keys, BlockNo(first + i as u64), s.as_ref(), out)?;
            }
            Ok(buf)
        };
        let buf = if count as usize > INLINE_CODEC_BLOCKS_MAX {
            tokio::task::spawn_blocking(decode_all)
                .await
                .map_err(|_| Errno::Io)??
        } else {
            decode_all()?
        };
        let start = (offset - first * BLOCK) as usize;
        Ok(Bytes::from(buf).slice(start..start + len as usize))
    }
}

impl Export for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    fn read_only(&self) -> bool {
        self.inner.at.is_some() || self.inner.divergence
    }

    fn description(&self) -> String {
        let loc = &self.inner.loc;
        match self.inner.at {
            Some(at) => format!(
                "Lifeboat volume {}/{} at index {at} (read-only)",
                loc.tenant, loc.volume_name
            ),
            None if self.inner.divergence => format!(
                "Lifeboat divergence snapshot {}/{} (read-only)",
                loc.tenant, loc.volume_name
            ),
            None => format!("Lifeboat volume {}/{}", loc.tenant, loc.volume_name),
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        self.inner.read_range(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), Errno> {
        // Every write is durable when it returns: FUA is already met.
        let len = data.len() as u64;
        self.inner.write_range(offset, len, Some(data)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), Errno> {
        self.inner.write_range(offset, u64::from(len), None).await
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), Errno> {
        // Only whole blocks are trimmed (to zero markers); the spec lets a
        // server ignore the rest of a TRIM.
        let first = offset.div_ceil(BLOCK);
        let end_block = (offset + u64::from(len)) / BLOCK;
        if first >= end_block {
            return Ok(());
        }
        self.inner
            .write_range(first * BLOCK, (end_block - first) * BLOCK, None)
            .await
    }

    async fn flush(&self) -> Result<(), Errno> {
        // Writes are acknowledged only once durable in the log: nothing to do.
        Ok(())
    }
}
