//! A protection group as the node sees it: one openraft instance over the
//! PG's log store and state machine, and the operations the node needs —
//! propose a command, wait for a linearizable read point, report progress.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lifeboat_proto::raft as pb;
use lifeboat_store::db::Db;
use lifeboat_store::{LogIndex, NodeId, PgId};
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ReadPolicy;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{Config, SnapshotPolicy};

use crate::error::{Error, Result};
use crate::log_store::{LogStore, WalSyncer};
use crate::network::LocalOnlyNetwork;
use crate::state_machine::StateMachine;
use crate::types::{Applied, Command, MemberNode, TypeConfig};

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// A source of wall-clock time in milliseconds since the Unix epoch.
/// Injectable so that tests control the timeline.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// Raft timers of every group on this node, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftTimers {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for RaftTimers {
    fn default() -> Self {
        RaftTimers {
            heartbeat_interval_ms: 500,
            election_timeout_min_ms: 2000,
            election_timeout_max_ms: 4000,
        }
    }
}

/// Log entries per replication message; a byte cap is applied on top by
/// `LogStore::limited_get_log_entries` (block writes are large).
const REPLICATION_ENTRIES_MAX: u64 = 16;

fn raft_config(pg: PgId, timers: &RaftTimers) -> Result<Config> {
    Config {
        cluster_name: format!("pg-{}", pg.0),
        heartbeat_interval: timers.heartbeat_interval_ms,
        election_timeout_min: timers.election_timeout_min_ms,
        election_timeout_max: timers.election_timeout_max_ms,
        // A partitioned node must not inflate terms on its return.
        enable_pre_vote: Some(true),
        // A restarted ex-leader must win an election again before serving
        // (openraft #1511: stale state after leader restore).
        enable_leader_restore: Some(false),
        max_payload_entries: REPLICATION_ENTRIES_MAX,
        // Snapshots are taken by the node when it decides to purge the log
        // (behind the slowest standby), never on a count of entries.
        snapshot_policy: SnapshotPolicy::Never,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Raft {
        pg: pg.0,
        reason: format!("invalid raft config: {e}"),
    })
}

/// Progress of a group as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMetrics {
    pub pg: PgId,
    pub applied_index: LogIndex,
    pub last_log_index: LogIndex,
    pub leader: Option<u64>,
    pub term: u64,
    pub is_leader: bool,
}

/// One protection group member on this node. Cheap to clone.
#[derive(Clone)]
pub struct ProtectionGroup {
    pg: PgId,
    node_id: NodeId,
    raft: Raft,
    clock: Arc<dyn Clock>,
    /// The last stamp this node gave an entry of this PG, so that stamps
    /// never run backwards while it leads.
    last_stamp_ms: Arc<AtomicU64>,
}

impl ProtectionGroup {
    /// Opens the PG's stores and starts its Raft member.
    pub async fn start(
        node_id: NodeId,
        pg: PgId,
        db: Db,
        syncer: WalSyncer,
        snapshot_root: &Path,
        timers: &RaftTimers,
        clock: Arc<dyn Clock>,
    ) -> Result<ProtectionGroup> {
        let config = Arc::new(raft_config(pg, timers)?);
        let log = LogStore::new(db.clone(), pg, syncer);
        let sm = StateMachine::open(db, pg, snapshot_root)
            .map_err(|source| Error::Storage { pg: pg.0, source })?;
        let raft = Raft::new(node_id.0, config, LocalOnlyNetwork, log, sm)
            .await
            .map_err(|e| Error::Raft {
                pg: pg.0,
                reason: e.to_string(),
            })?;
        Ok(ProtectionGroup {
            pg,
            node_id,
            raft,
            clock,
            last_stamp_ms: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn pg(&self) -> PgId {
        self.pg
    }

    /// Makes this node the group's only voter if the group has never been
    /// initialised. Never re-initialises (openraft #1535).
    pub async fn bootstrap_single_voter(&self, node: MemberNode) -> Result<()> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| self.raft_err(e))?;
        if initialized {
            return Ok(());
        }
        let members = BTreeMap::from([(self.node_id.0, node)]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| self.raft_err(e))
    }

    /// Starts an election now instead of after the election timeout: a
    /// single-voter group restarted with leader restore off would otherwise
    /// sit leaderless for seconds.
    pub async fn campaign(&self) {
        if let Err(e) = self.raft.trigger().elect(true).await {
            tracing::debug!(pg = self.pg.0, error = %e, "could not trigger an election");
        }
    }

    fn raft_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Raft {
            pg: self.pg.0,
            reason: e.to_string(),
        }
    }

    /// A timestamp for a new entry: `max(previous, now)`.
    fn next_stamp_ms(&self) -> u64 {
        let now = self.clock.now_ms();
        let prev = self.last_stamp_ms.fetch_max(now, Ordering::AcqRel);
        prev.max(now)
    }

    /// Proposes a command and waits until it is committed and applied.
    /// Returns the entry's index and what apply produced; a command that
    /// apply refused is [`Error::Rejected`].
    pub async fn propose(&self, kind: pb::command::Kind) -> Result<(LogIndex, Applied)> {
        let cmd = Command(pb::Command {
            stamp_ms: self.next_stamp_ms(),
            kind: Some(kind),
        });
        let resp = self.raft.client_write(cmd).await.map_err(|e| match e {
            RaftError::APIError(
                ClientWriteError::ForwardToLeader(f) | ClientWriteError::LogEntryDiscarded(f),
            ) => Error::NotLeader {
                pg: self.pg.0,
                leader: f.leader_id,
            },
            other => self.raft_err(other),
        })?;
        let index = LogIndex(resp.log_id.index);
        match resp.data.outcome {
            Some(Ok(applied)) => Ok((index, applied)),
            Some(Err(rejection)) => Err(Error::Rejected {
                pg: self.pg.0,
                rejection,
            }),
            None => Err(self.raft_err("a command entry was applied without an outcome")),
        }
    }

    /// Waits until this node may serve a linearizable read: it is the
    /// leader, a quorum confirmed it, and everything committed before the
    /// call is applied. Returns the read index.
    pub async fn read_barrier(&self) -> Result<LogIndex> {
        let read = self
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| match e {
                RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(f)) => {
                    Error::NotLeader {
                        pg: self.pg.0,
                        leader: f.leader_id,
                    }
                }
                other => self.raft_err(other),
            })?;
        Ok(LogIndex(read.index()))
    }

    /// Waits until this member leads the group, up to `timeout`.
    pub async fn wait_for_leadership(&self, timeout: std::time::Duration) -> Result<()> {
        let me = self.node_id.0;
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader == Some(me), "this node leads")
            .await
            .map(|_| ())
            .map_err(|e| self.raft_err(e))
    }

    pub fn metrics(&self) -> GroupMetrics {
        let m = self.raft.metrics().borrow_watched().clone();
        GroupMetrics {
            pg: self.pg,
            applied_index: LogIndex(m.last_applied.as_ref().map_or(0, |l| l.index)),
            last_log_index: LogIndex(m.last_log_index.unwrap_or(0)),
            leader: m.current_leader,
            term: m.current_term,
            is_leader: m.current_leader == Some(self.node_id.0),
        }
    }

    pub async fn shutdown(&self) -> Result<()> {
        self.raft.shutdown().await.map_err(|e| self.raft_err(e))
    }
}
