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
//! A member's own Raft snapshot is a read view of its replica, taken at an
//! applied index ([`RaftSnapshotData::View`]): building one costs a flush,
//! not a copy of the PG, so purging the log behind the applied state stays
//! cheap however large the PG grows (a snapshot that copied the PG, at every
//! purge, wrote the whole PG again for every half of `log_retain_bytes`
//! written). The current snapshot is always a fresh view of the applied
//! state; a follower that needs it is streamed the PG's key ranges from it.
//! A snapshot received from a leader is a file (`store::raft_snapshot`),
//! installed from `SNAPSHOT_DIR/pg-ID/` and deleted once installed.

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
use crate::types::{CommandResponse, RaftSnapshotData, SnapshotView, TypeConfig};
use crate::wire::{self, LogId};

type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
type Snapshot = openraft::alias::SnapshotOf<TypeConfig, RaftSnapshotData>;

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

/// Apply batches up to this size are written on the applying task's own
/// thread (see [`StateMachine::write_applied`]); a 4 KiB block write's
/// batch is about 5 KiB.
const APPLY_IN_PLACE_BYTES_MAX: usize = 256 << 10;

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

/// PG `pg`'s applied log id and membership, read through `get` (of
/// `raft_state`: the database now, or a read view).
fn applied_state_in(
    pg: PgId,
    get: impl Fn(&[u8]) -> lifeboat_store::Result<Option<Vec<u8>>>,
) -> io::Result<(Option<LogId>, StoredMembership)> {
    let read = |kind| -> io::Result<Option<Vec<u8>>> {
        get(&keys::raft_state_key(pg, kind)).map_err(io_other)
    };
    let applied = read(RaftStateKind::LastApplied)?
        .map(|b| wire::decode_json(&b))
        .transpose()?;
    let membership = read(RaftStateKind::Membership)?
        .map(|b| wire::decode_json(&b))
        .transpose()?
        .unwrap_or_default();
    Ok((applied, membership))
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
        // What is left here is done with: installed or never to be (and
        // snapshot files of the PG as it was, from before snapshots were
        // views).
        for entry in std::fs::read_dir(&sm.snapshot_dir)? {
            std::fs::remove_file(entry?.path())?;
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
        applied_state_in(self.pg, |key| self.db.get(Cf::RaftState, key))
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
        // A small batch is written on this task's thread: handing it to a
        // pool thread and waiting for that thread to wake cost more than
        // the write (about 120 µs of a 1.1 ms replicated 4 KiB write at
        // concurrency 1, measured). A large one, or one RocksDB would
        // stall, goes to a pool thread so that this worker's other tasks
        // do not wait behind it.
        let batch = if batch.size_bytes() <= APPLY_IN_PLACE_BYTES_MAX {
            match db
                .write_without_waiting(batch, Durability::Replayable)
                .map_err(io_other)?
            {
                None => return Ok(()),
                Some(stalled) => stalled,
            }
        } else {
            batch
        };
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

    /// This member's snapshot as it is now: a read view of the replica and
    /// the applied log id and membership read through it.
    fn view_snapshot(&self) -> io::Result<Snapshot> {
        let view = self.db.owned_read_view();
        let (last_log_id, last_membership) =
            applied_state_in(self.pg, |key| view.view().get(Cf::RaftState, key))?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        let meta_json = wire::encode_json(&meta)?;
        Ok(Snapshot {
            meta,
            snapshot: RaftSnapshotData::View(Arc::new(SnapshotView {
                pg: self.pg,
                view,
                meta_json,
            })),
        })
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
    type SnapshotData = RaftSnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let this = self.clone();
        blocking(move || {
            let snapshot = this.view_snapshot()?;
            // The log may be purged up to this snapshot once it exists: make
            // the applied state it describes durable first. The flush comes
            // after the read view, not before it: apply goes on meanwhile,
            // and a flush before the view could leave the durable applied
            // index behind the snapshot's, so that a restart after a crash
            // found entries purged that its state had not made durable
            // (seen in CI: a DR node killed and restarted installed its
            // own snapshot).
            this.db.flush().map_err(io_other)?;
            tracing::info!(
                pg = this.pg.0,
                index = snapshot.meta.last_log_id.as_ref().map_or(0, |l| l.index),
                "took raft snapshot"
            );
            Ok(snapshot)
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = RaftSnapshotData;
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
        snapshot: RaftSnapshotData,
    ) -> io::Result<()> {
        let this = self.clone();
        let target = self.snapshot_path(meta);
        let expected = meta.clone();
        blocking(move || {
            match snapshot {
                // The file is handed over: move it into place (one write of
                // a snapshot, not two), copying only across filesystems. The
                // directory is fsynced so the install marker never names a
                // file a crash could take back.
                RaftSnapshotData::File(path) => {
                    if path != target {
                        if std::fs::rename(&path, &target).is_err() {
                            let partial = target.with_extension("incoming");
                            std::fs::copy(&path, &partial)?;
                            std::fs::File::open(&partial)?.sync_all()?;
                            std::fs::rename(&partial, &target)?;
                        }
                        std::fs::File::open(&this.snapshot_dir)?.sync_all()?;
                    }
                }
                // Another member's view, handed over in this process (the
                // storage conformance suite does so): written out first, as
                // a transfer would have.
                RaftSnapshotData::View(v) => {
                    raft_snapshot::write_snapshot_file(v.view.view(), v.pg, &v.meta_json, &target)
                        .map_err(io_other)?;
                }
            }
            let installed = this.install_file(&target);
            // Installed, or refused before the PG was touched: the file
            // goes. Kept only while an install marker names it, for the
            // next start to finish the install from.
            let pending =
                raft_snapshot::interrupted_install(&this.db, this.pg).map_err(io_other)?;
            if pending.as_deref() != Some(target.as_path()) {
                std::fs::remove_file(&target)?;
            }
            if installed? != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "raft snapshot file does not match its metadata",
                ));
            }
            this.installs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        // Nothing applied, nothing to send; else a view of now.
        let snapshot = self.view_snapshot()?;
        Ok(snapshot.meta.last_log_id.is_some().then_some(snapshot))
    }
}
