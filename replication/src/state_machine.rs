//! The state machine of one protection group over the node's store.
//!
//! Invariant: the data an entry writes, the PG's last applied log id and its
//! last membership are committed in one RocksDB batch, so after a crash the
//! state machine is exactly "everything up to last applied" and openraft
//! re-applies the rest from the log. The batch skips the WAL
//! (`Durability::Replayable`): the log it replays from is already durable,
//! and flushes are atomic across column families, so a crash keeps a prefix
//! of whole batches. Anything that lets the log be purged (a Raft snapshot)
//! flushes once its read view is taken, so the state it stands for is
//! durable before the entries that could rebuild it go, and a restart never
//! finds its applied index behind its own snapshot.
//!
//! Raft snapshots are files of the PG's key ranges (`store::raft_snapshot`)
//! in `SNAPSHOT_DIR/pg-ID/`, named by index so that the greatest name is the
//! newest.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{Stream, TryStreamExt};
use lifeboat_proto::raft as pb;
use lifeboat_store::db::{Batch, Cf, Db, Durability};
use lifeboat_store::keys::{self, RaftStateKind};
use lifeboat_store::{LogIndex, PgId, raft_snapshot};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};

use crate::apply::ApplyContext;
use crate::types::{CommandResponse, RaftSnapshotFile, TypeConfig};
use crate::wire::{self, LogId};

type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
type Snapshot = openraft::alias::SnapshotOf<TypeConfig, RaftSnapshotFile>;

fn io_other(e: lifeboat_store::Error) -> io::Error {
    io::Error::other(e)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

#[derive(Clone)]
pub struct StateMachine {
    db: Db,
    pg: PgId,
    snapshot_dir: PathBuf,
    /// Raft snapshots received from a leader and installed since this
    /// process started (a member's own snapshots, built to keep its log
    /// short, are not counted).
    installs: Arc<AtomicU64>,
}

/// Stages `pg`'s applied log id and membership (each when given) in
/// `batch`, which also holds the data they describe.
pub(crate) fn stage_applied(
    batch: &mut Batch,
    pg: PgId,
    applied: Option<&LogId>,
    membership: Option<&StoredMembership>,
) -> io::Result<()> {
    if let Some(a) = applied {
        batch.put(
            Cf::RaftState,
            &keys::raft_state_key(pg, RaftStateKind::LastApplied),
            &wire::encode_json(a)?,
        );
    }
    if let Some(m) = membership {
        batch.put(
            Cf::RaftState,
            &keys::raft_state_key(pg, RaftStateKind::Membership),
            &wire::encode_json(m)?,
        );
    }
    Ok(())
}

/// The last log id PG `pg`'s state on this node has applied, whether or
/// not its member runs.
pub fn applied_log_id(db: &Db, pg: PgId) -> io::Result<Option<LogId>> {
    db.get(
        Cf::RaftState,
        &keys::raft_state_key(pg, RaftStateKind::LastApplied),
    )
    .map_err(io_other)?
    .map(|b| wire::decode_json(&b))
    .transpose()
}

impl StateMachine {
    /// Opens the state machine of `pg`, finishing a Raft snapshot install
    /// that a crash interrupted.
    pub fn open(db: Db, pg: PgId, snapshot_root: &Path) -> io::Result<StateMachine> {
        let snapshot_dir = snapshot_root.join(format!("pg-{}", pg.0));
        std::fs::create_dir_all(&snapshot_dir)?;
        let sm = StateMachine {
            db,
            pg,
            snapshot_dir,
            installs: Arc::new(AtomicU64::new(0)),
        };
        if let Some(path) = raft_snapshot::interrupted_install(&sm.db, pg).map_err(io_other)? {
            tracing::warn!(pg = pg.0, path = %path.display(), "finishing an interrupted raft snapshot install");
            sm.install_file(&path)?;
        }
        Ok(sm)
    }

    pub fn pg(&self) -> PgId {
        self.pg
    }

    /// The count of installed snapshots, shared with whoever reports it.
    pub fn installs(&self) -> Arc<AtomicU64> {
        self.installs.clone()
    }

    fn read_applied(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied = applied_log_id(&self.db, self.pg)?;
        let membership = self
            .db
            .get(
                Cf::RaftState,
                &keys::raft_state_key(self.pg, RaftStateKind::Membership),
            )
            .map_err(io_other)?
            .map(|b| wire::decode_json(&b))
            .transpose()?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    fn stage_applied(
        &self,
        batch: &mut Batch,
        applied: Option<&LogId>,
        membership: Option<&StoredMembership>,
    ) -> io::Result<()> {
        stage_applied(batch, self.pg, applied, membership)
    }

    /// Writes what `ctx` staged (with the applied log id and a changed
    /// membership) and leaves it fresh for the entries after.
    async fn flush_apply<'a>(
        &'a self,
        ctx: &mut ApplyContext<'a>,
        applied: Option<&LogId>,
        membership: &mut Option<StoredMembership>,
    ) -> io::Result<()> {
        let done = std::mem::replace(ctx, ApplyContext::new(&self.db, self.pg));
        self.write_applied(done.batch, applied, membership.take().as_ref())
            .await
    }

    /// Writes an apply batch with the applied log id (and membership, if
    /// it changed) that it brings the PG to.
    async fn write_applied(
        &self,
        mut batch: Batch,
        applied: Option<&LogId>,
        membership: Option<&StoredMembership>,
    ) -> io::Result<()> {
        self.stage_applied(&mut batch, applied, membership)?;
        let db = self.db.clone();
        // No WAL: the log these entries came from is already fsynced, and
        // last_applied rides in the same batch, so a lost batch is re-applied.
        blocking(move || db.write(batch, Durability::Replayable).map_err(io_other)).await
    }

    fn snapshot_path(&self, meta: &SnapshotMeta) -> PathBuf {
        let (index, term) = meta
            .last_log_id
            .as_ref()
            .map_or((0, 0), |l| (l.index, l.leader_id.term));
        self.snapshot_dir
            .join(format!("{index:020}-{term:020}.snap"))
    }

    /// Deletes every snapshot file but `keep`.
    fn remove_other_snapshots(&self, keep: &Path) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let path = entry?.path();
            if path != keep {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn install_file(&self, path: &Path) -> io::Result<SnapshotMeta> {
        let this = self.clone();
        let meta =
            raft_snapshot::install_pg_snapshot(&self.db, self.pg, path, |batch, meta_bytes| {
                let meta: SnapshotMeta = wire::decode_json(meta_bytes).map_err(|e| {
                    lifeboat_store::Error::CorruptRecord {
                        cf: "raft_snapshot",
                        key: path.display().to_string(),
                        reason: e.to_string(),
                    }
                })?;
                this.stage_applied(
                    batch,
                    meta.last_log_id.as_ref(),
                    Some(&meta.last_membership),
                )
                .map_err(|e| lifeboat_store::Error::Io {
                    op: "stage snapshot state",
                    path: path.to_owned(),
                    source: e,
                })
            })
            .map_err(io_other)?;
        wire::decode_json(&meta)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = RaftSnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let this = self.clone();
        blocking(move || {
            let tmp_meta_path = this.snapshot_dir.join("building.snap");
            let (meta_bytes, size) = raft_snapshot::write_pg_snapshot(&this.db, this.pg, &tmp_meta_path, |view| {
                let get = |kind| view.get(Cf::RaftState, &keys::raft_state_key(this.pg, kind));
                let decode_err = |e: io::Error| lifeboat_store::Error::Io {
                    op: "decode applied state",
                    path: this.snapshot_dir.clone(),
                    source: e,
                };
                let last_log_id: Option<LogId> = get(RaftStateKind::LastApplied)?
                    .map(|b| wire::decode_json(&b))
                    .transpose()
                    .map_err(decode_err)?;
                let last_membership: StoredMembership = get(RaftStateKind::Membership)?
                    .map(|b| wire::decode_json(&b))
                    .transpose()
                    .map_err(decode_err)?
                    .unwrap_or_default();
                let meta = SnapshotMeta {
                    last_log_id,
                    last_membership,
                };
                wire::encode_json(&meta).map_err(decode_err)
            })
            .map_err(io_other)?;
            let meta: SnapshotMeta = wire::decode_json(&meta_bytes)?;
            // The log may be purged up to this snapshot once it exists: make
            // the applied state it describes durable first. The flush comes
            // after the read view, not before it: apply goes on while the
            // file is written, and a flush before the view left the durable
            // applied index behind the snapshot's, so that a restart after
            // a crash restored the whole PG from this file (seen in CI:
            // a DR node killed and restarted installed its own snapshot).
            this.db.flush().map_err(io_other)?;
            let path = this.snapshot_path(&meta);
            std::fs::rename(&tmp_meta_path, &path)?;
            this.remove_other_snapshots(&path)?;
            tracing::info!(pg = this.pg.0, size_bytes = size, path = %path.display(), "built raft snapshot");
            Ok(Snapshot {
                meta,
                snapshot: RaftSnapshotFile { path },
            })
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = RaftSnapshotFile;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        self.read_applied()
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut ctx = ApplyContext::new(&self.db, self.pg);
        let mut last_applied = None;
        let mut last_membership = None;
        let mut responses = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = LogIndex(entry.log_id.index);
            // A restore changes what every later read sees, and the apply
            // overlays do not know masks; the horizon and the GC read the
            // store as it is, which must not depend on where batches
            // split: each goes in a batch of its own.
            let alone = matches!(
                &entry.payload,
                EntryPayload::Normal(cmd) if matches!(
                    cmd.0.kind,
                    Some(
                        pb::command::Kind::RestorePg(_)
                            | pb::command::Kind::AdvanceHorizon(_)
                            | pb::command::Kind::CollectGarbage(_)
                    )
                )
            );
            if alone && last_applied.is_some() {
                self.flush_apply(&mut ctx, last_applied.as_ref(), &mut last_membership)
                    .await?;
            }
            let outcome = match &entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(cmd) => Some(ctx.apply_command(index, &cmd.0)?),
                EntryPayload::Membership(m) => {
                    last_membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    None
                }
            };
            last_applied = Some(entry.log_id);
            if let Some(r) = responder {
                responses.push((r, CommandResponse { outcome }));
            }
            if alone {
                self.flush_apply(&mut ctx, last_applied.as_ref(), &mut last_membership)
                    .await?;
            }
        }
        self.write_applied(ctx.batch, last_applied.as_ref(), last_membership.as_ref())
            .await?;
        for (responder, response) in responses {
            responder.send(response);
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.clone())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: RaftSnapshotFile,
    ) -> io::Result<()> {
        let this = self.clone();
        let target = self.snapshot_path(meta);
        let expected = meta.clone();
        blocking(move || {
            // The file is handed over: move it into place (one write of a
            // snapshot, not two), copying only across filesystems. The
            // directory is fsynced so the install marker never names a
            // file a crash could take back.
            if snapshot.path != target {
                if std::fs::rename(&snapshot.path, &target).is_err() {
                    let partial = target.with_extension("incoming");
                    std::fs::copy(&snapshot.path, &partial)?;
                    std::fs::File::open(&partial)?.sync_all()?;
                    std::fs::rename(&partial, &target)?;
                }
                std::fs::File::open(&this.snapshot_dir)?.sync_all()?;
            }
            let installed = this.install_file(&target)?;
            if installed != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "raft snapshot file does not match its metadata",
                ));
            }
            this.remove_other_snapshots(&target)?;
            this.installs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let mut newest: Option<PathBuf> = None;
        for entry in std::fs::read_dir(&self.snapshot_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "snap")
                && path.file_name().is_some_and(|n| n != "building.snap")
                && newest.as_ref().is_none_or(|n| path > *n)
            {
                newest = Some(path);
            }
        }
        let Some(path) = newest else { return Ok(None) };
        let meta_bytes = raft_snapshot::read_snapshot_meta(&path).map_err(io_other)?;
        Ok(Some(Snapshot {
            meta: wire::decode_json(&meta_bytes)?,
            snapshot: RaftSnapshotFile { path },
        }))
    }
}
