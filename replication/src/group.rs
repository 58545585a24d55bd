//! A protection group as the node sees it: one openraft instance over the
//! PG's log store and state machine, and the operations the node needs —
//! propose a command, wait for a linearizable read point, report progress.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_store::db::Db;
use lifeboat_store::{Generation, LogIndex, MemberId, PgId};
use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};
use openraft::errors::ForwardReason;
use openraft::raft::ReadPolicy;
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::{Config, SnapshotPolicy};
use tonic::{Code, Request, Status};

use crate::ack::{AckState, EventSink};
use crate::coalesce::{self, Entered, Waiting, WriteQueue};
use crate::error::{Error, Result};
use crate::lease::LeaseTable;
use crate::log_store::{Lag, LogSpan, LogStore, WalSyncer};
use crate::state_machine::StateMachine;
use crate::transport::{GroupNetwork, GroupRoute, Identity, Peers};
use crate::types::{Applied, Command, MemberNode, Rejection, TypeConfig};

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

/// Who keeps a group alive while it has nothing to replicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeats {
    /// openraft's own ticker: each leader heartbeats each follower every
    /// heartbeat interval and each follower runs its election timer. For
    /// the catalog, which must stay alive whatever the node's liveness task
    /// does.
    PerGroup,
    /// openraft's ticker off; the node's [`crate::liveness::Liveness`] sends
    /// one beat per node pair for every group and runs the election timers.
    /// Hundreds of idle groups then cost next to nothing.
    PerNode,
}

/// Log entries per replication message; a byte cap is applied on top by
/// `LogStore::limited_get_log_entries` (block writes are large).
const REPLICATION_ENTRIES_MAX: u64 = 16;

fn raft_config(pg: PgId, timers: &RaftTimers, heartbeats: Heartbeats) -> Result<Config> {
    Config {
        enable_tick: heartbeats == Heartbeats::PerGroup,
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
        // `add_learner(blocking)` then means really caught up.
        replication_lag_threshold: 64,
        // Snapshots are taken, and the log purged, only by
        // `enforce_log_retention` (behind the slowest standby, within a size
        // limit), never on a count of entries: openraft's own purge after a
        // snapshot would cut entries a lagging standby still needs.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Raft {
        pg: pg.0,
        reason: format!("invalid raft config: {e}"),
    })
}

/// A degraded `remote` PG returns to `remote` once a standby is within this
/// many entries of the leader: under steady writes over a WAN a standby is
/// always a round trip behind, so "every entry" would never be seen; the
/// writes that follow wait for it again anyway.
const ACK_RESTORE_LAG_ENTRIES: u64 = 64;

/// How long a proposal or a read barrier keeps looking for a leader (an
/// election, a leader change, a forwarded request in flight) before failing.
pub const LEADER_WAIT: Duration = Duration::from_secs(15);

/// How long a leader without a site lease waits for its node to get one
/// before it refuses a proposal or a read.
pub const LEASE_WAIT: Duration = Duration::from_secs(1);

/// Progress of a group as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMetrics {
    pub pg: PgId,
    pub member: MemberId,
    pub generation: Generation,
    pub applied_index: LogIndex,
    pub last_log_index: LogIndex,
    /// The leader's member id.
    pub leader: Option<u64>,
    /// The node hosting the leader.
    pub leader_node: Option<u64>,
    pub term: u64,
    pub is_leader: bool,
    pub voters: BTreeSet<u64>,
    /// Every member (voters and learners) and its node.
    pub nodes: BTreeMap<u64, MemberNode>,
}

impl GroupMetrics {
    /// Who leads and where, as this member sees it (the transport's
    /// `GroupView` answer).
    pub fn view(&self) -> pb::GroupViewReply {
        let leader = self.leader.and_then(|l| self.nodes.get(&l));
        pb::GroupViewReply {
            leader_node: leader.map_or(0, |n| n.node_id),
            leader_site: leader.map(|n| n.site.clone()).unwrap_or_default(),
            voter_sites: self
                .voters
                .iter()
                .filter_map(|v| self.nodes.get(v))
                .map(|n| n.site.clone())
                .collect(),
            last_log_index: self.last_log_index.0,
            term: self.term,
            applied_index: self.applied_index.0,
        }
    }
}

/// How far one member is behind the leader (reported by the leader).
#[derive(Clone, Debug, PartialEq)]
pub struct MemberLag {
    pub member: MemberId,
    pub node: MemberNode,
    pub voter: bool,
    pub matched_index: LogIndex,
    pub lag: Lag,
}

/// What one call of [`ProtectionGroup::enforce_log_retention`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// The log is within its limit, or there is nothing it may purge.
    Within,
    /// A Raft snapshot was asked for; the purge up to `upto` comes later.
    SnapshotRequested { upto: u64 },
    /// The log is being purged up to `upto` (inclusive); when
    /// `snapshot_requested`, that is what the last snapshot covers, and a
    /// new one was asked for so that a later call purges the rest.
    Purging { upto: u64, snapshot_requested: bool },
}

impl Retention {
    /// Whether a Raft snapshot was asked for, so that a later call can
    /// purge (more).
    pub fn snapshot_requested(&self) -> bool {
        match self {
            Retention::Within => false,
            Retention::SnapshotRequested { .. } => true,
            Retention::Purging {
                snapshot_requested, ..
            } => *snapshot_requested,
        }
    }
}

/// A member's log and snapshot, for status and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStatus {
    pub span: Option<LogSpan>,
    pub snapshot_index: Option<LogIndex>,
    pub purged_index: Option<LogIndex>,
    /// Raft snapshots received from a leader and installed since start.
    pub snapshots_installed: u64,
}

/// As the leader `me` sees it: the member at another site than its own
/// with the highest matched index, as (its node, that index); `None` when
/// the group has no member at another site (or `me` does not lead).
fn best_standby(m: &openraft::RaftMetrics<TypeConfig>, me: u64) -> Option<(u64, u64)> {
    let membership = m.membership_config.membership();
    let here = &membership.get_node(&me)?.site;
    m.replication
        .as_ref()?
        .iter()
        .filter_map(|(id, matched)| {
            let node = membership.get_node(id)?;
            (node.site != *here).then(|| (node.node_id, matched.as_ref().map_or(0, |l| l.index)))
        })
        .max_by_key(|&(_, matched)| matched)
}

/// A member the catalog wants in a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredMember {
    pub member: MemberId,
    pub node: MemberNode,
    pub voter: bool,
}

/// Everything a member needs to start.
pub struct GroupStart<'a> {
    pub pg: PgId,
    pub member: MemberId,
    pub generation: Generation,
    pub db: Db,
    pub syncer: WalSyncer,
    pub snapshot_root: &'a Path,
    pub timers: &'a RaftTimers,
    pub heartbeats: Heartbeats,
    pub clock: Arc<dyn Clock>,
    pub peers: Arc<Peers>,
    pub identity: Arc<Identity>,
    pub events: Arc<dyn EventSink>,
    /// This node's site lease: the leader proposes and acknowledges only
    /// while it covers the PG at this generation.
    pub leases: Arc<LeaseTable>,
}

/// One protection group member on this node. Cheap to clone.
#[derive(Clone)]
pub struct ProtectionGroup {
    pg: PgId,
    member: MemberId,
    generation: Generation,
    raft: Raft,
    log: LogStore,
    clock: Arc<dyn Clock>,
    peers: Arc<Peers>,
    route: GroupRoute,
    /// The last stamp this node gave an entry of this PG, so that stamps
    /// never run backwards while it leads.
    last_stamp_ms: Arc<AtomicU64>,
    ack: AckState,
    heartbeats: Heartbeats,
    /// Raft snapshots installed from a leader since start.
    snapshot_installs: Arc<AtomicU64>,
    leases: Arc<LeaseTable>,
    /// Small block writes waiting to be merged into one entry.
    writes: Arc<Mutex<WriteQueue<WriteAnswer>>>,
}

/// How a waiting block write is told its log index or error.
type WriteAnswer = tokio::sync::oneshot::Sender<Result<LogIndex>>;

/// A slot of the group's [`WriteQueue`], handed on when dropped (also when
/// the write's future is dropped mid-flight): to the next batch of waiting
/// writes, or back to the queue when none wait.
struct WriteSlot(ProtectionGroup);

impl Drop for WriteSlot {
    fn drop(&mut self) {
        let group = &self.0;
        let Some(batch) = group.write_queue().release() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let group = group.clone();
                runtime.spawn(async move {
                    let _slot = WriteSlot(group.clone());
                    group.propose_merged(batch).await;
                });
            }
            // No runtime to propose on (shutting down): the waiters' answers
            // are dropped, and they see their writes fail.
            Err(_) => {
                drop(batch);
                drop(group.write_queue().abandon());
            }
        }
    }
}

/// Who leads a group as one member sees it, read without copying the
/// group's metrics (the liveness task reads it for every group twice per
/// heartbeat interval).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// The leader's member id, if known.
    pub leader: Option<u64>,
    pub term: u64,
    pub is_leader: bool,
    /// Whether this member is a voter (learners never campaign).
    pub voter: bool,
    /// This member's last log index and the commit index it knows: only a
    /// leader moves them, so a change is a sign of its life.
    pub progress: (u64, u64),
}

/// What a forwarded request came back with.
enum Forwarded<T> {
    Done(T),
    /// The leader moved or is not reachable: look again and retry.
    Retry(String),
}

/// Backoff while a request looks for the group's leader, up to LEADER_WAIT.
struct LeaderRetry {
    deadline: Instant,
    pause: Duration,
}

impl LeaderRetry {
    fn new() -> LeaderRetry {
        LeaderRetry {
            deadline: Instant::now() + LEADER_WAIT,
            pause: Duration::from_millis(20),
        }
    }

    /// Sleeps before the next attempt, or fails with `why` the last one did
    /// not reach a leader once the deadline has passed.
    async fn pause(&mut self, pg: PgId, why: String) -> Result<()> {
        if Instant::now() + self.pause > self.deadline {
            return Err(Error::NoLeader {
                pg: pg.0,
                waited_ms: LEADER_WAIT.as_millis() as u64,
                last: why,
            });
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

/// Whether a forwarded request may be tried again (at the same or a new
/// leader). Only refusals that another attempt cannot change are final;
/// everything else — the leader moved, its node died mid-request, the
/// connection broke (h2 errors arrive as `Internal` or `Unknown`) — is
/// retried until LEADER_WAIT runs out.
fn retryable(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::Unauthenticated
    )
}

impl ProtectionGroup {
    /// Opens the PG's stores and starts its Raft member.
    pub async fn start(args: GroupStart<'_>) -> Result<ProtectionGroup> {
        let pg = args.pg;
        let config = Arc::new(raft_config(pg, args.timers, args.heartbeats)?);
        let log = LogStore::new(args.db.clone(), pg, args.syncer);
        let sm = StateMachine::open(args.db, pg, args.snapshot_root)
            .map_err(|source| Error::Storage { pg: pg.0, source })?;
        let snapshot_installs = sm.installs();
        let route = GroupRoute {
            identity: args.identity,
            pg,
            generation: args.generation,
        };
        let network = GroupNetwork {
            peers: args.peers.clone(),
            route: route.clone(),
        };
        let raft = Raft::new(args.member.0, config, network, log.clone(), sm)
            .await
            .map_err(|e| Error::Raft {
                pg: pg.0,
                reason: e.to_string(),
            })?;
        Ok(ProtectionGroup {
            pg,
            member: args.member,
            generation: args.generation,
            raft,
            log,
            clock: args.clock,
            peers: args.peers,
            route,
            last_stamp_ms: Arc::new(AtomicU64::new(0)),
            ack: AckState::new(args.events),
            heartbeats: args.heartbeats,
            snapshot_installs,
            leases: args.leases,
            writes: Arc::default(),
        })
    }

    pub fn pg(&self) -> PgId {
        self.pg
    }

    pub fn member_id(&self) -> MemberId {
        self.member
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn heartbeats(&self) -> Heartbeats {
        self.heartbeats
    }

    pub fn leadership(&self) -> Leadership {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        Leadership {
            leader: m.current_leader,
            term: m.current_term,
            is_leader: m.current_leader == Some(self.member.0)
                && m.state == openraft::ServerState::Leader,
            voter: m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.member.0),
            progress: (
                m.last_log_index.unwrap_or(0),
                m.local_committed.as_ref().map_or(0, |l| l.index),
            ),
        }
    }

    /// If this member leads: its term and every other member's node
    /// (voters and learners).
    pub fn led_nodes(&self) -> Option<(u64, Vec<MemberNode>)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.current_leader != Some(self.member.0) || m.state != openraft::ServerState::Leader {
            return None;
        }
        let nodes = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.member.0)
            .map(|(_, node)| node.clone())
            .collect();
        Some((m.current_term, nodes))
    }

    /// The nodes of this group's voters.
    pub fn voter_nodes(&self) -> Vec<u64> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| n.node_id))
            .collect()
    }

    /// The answer refusing a pre-vote, as openraft's own refusal while a
    /// leader's lease lives: this member's vote and last log id, not granted.
    pub async fn pre_vote_refusal(&self) -> Result<openraft::raft::VoteResponse<TypeConfig>> {
        use openraft::storage::RaftLogStorage;
        let last_log_id = self
            .log
            .clone()
            .get_log_state()
            .await
            .map_err(|source| Error::Storage {
                pg: self.pg.0,
                source,
            })?
            .last_log_id;
        let vote = self.raft.metrics().borrow_watched().vote;
        Ok(openraft::raft::VoteResponse::new(vote, last_log_id, false))
    }

    /// Makes a leader send one Raft heartbeat to every member now (a member
    /// that does not know its leader learns it from one).
    pub async fn heartbeat(&self) {
        if let Err(e) = self.raft.trigger().heartbeat().await {
            tracing::debug!(pg = self.pg.0, error = %e, "could not trigger a heartbeat");
        }
    }

    /// The Raft handle, for the transport's server side.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Makes `voters` the group's first membership if the group has never
    /// been initialised anywhere this member knows of. Never re-initialises
    /// (openraft #1535): a member that has a log or a vote is left alone.
    pub async fn initialize(&self, voters: BTreeMap<u64, MemberNode>) -> Result<()> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| self.raft_err(e))?;
        if initialized {
            return Ok(());
        }
        match self.raft.initialize(voters).await {
            Ok(()) => Ok(()),
            // Another voter initialised first and this member has heard of it.
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(self.raft_err(e)),
        }
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

    /// Writes whole blocks of a volume (frames, or empty for zeros) and
    /// returns the entry's index once it is applied. Small writes that
    /// arrive while [`coalesce::IN_FLIGHT_MAX`] others are in flight from
    /// this node wait and are merged into one entry (see [`coalesce`]).
    pub async fn write_blocks(&self, volume: u64, blocks: Vec<pb::BlockWrite>) -> Result<LogIndex> {
        if !coalesce::mergeable(&blocks) {
            return self.propose_write(volume, blocks).await;
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        let write = Waiting {
            volume,
            blocks,
            answer,
        };
        let entered = self.write_queue().enter(write);
        match entered {
            Entered::Slot(write) => {
                let _slot = WriteSlot(self.clone());
                self.propose_write(volume, write.blocks).await
            }
            Entered::Queued => answered.await.unwrap_or_else(|_| {
                Err(Error::Raft {
                    pg: self.pg.0,
                    reason: "a merged block write was abandoned (the node is stopping)".into(),
                })
            }),
        }
    }

    fn write_queue(&self) -> std::sync::MutexGuard<'_, WriteQueue<WriteAnswer>> {
        // The queue is left consistent at every step: a panic elsewhere
        // while it was held does not make it wrong.
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn propose_write(&self, volume: u64, blocks: Vec<pb::BlockWrite>) -> Result<LogIndex> {
        let kind = pb::command::Kind::WriteBlocks(pb::WriteBlocks {
            volume,
            blocks,
            newest_mask: None,
        });
        self.propose(kind).await.map(|(index, _)| index)
    }

    /// Proposes waiting writes as one entry and answers each. A refused
    /// entry is refused whole, so each write is then proposed again alone
    /// and gets its own answer.
    async fn propose_merged(&self, batch: Vec<Waiting<WriteAnswer>>) {
        let volume = batch[0].volume;
        if batch.len() == 1 {
            let Waiting { blocks, answer, .. } = batch.into_iter().next().expect("one write");
            let _ = answer.send(self.propose_write(volume, blocks).await);
            return;
        }
        let blocks: Vec<pb::BlockWrite> = batch
            .iter()
            .flat_map(|w| w.blocks.iter().cloned())
            .collect();
        match self.propose_write(volume, blocks).await {
            Ok(index) => {
                for w in batch {
                    let _ = w.answer.send(Ok(index));
                }
            }
            Err(Error::Rejected { .. }) => {
                futures::future::join_all(batch.into_iter().map(|w| async move {
                    let _ = w.answer.send(self.propose_write(volume, w.blocks).await);
                }))
                .await;
            }
            Err(e) => {
                for w in batch {
                    let _ = w.answer.send(Err(e.duplicate()));
                }
            }
        }
    }

    /// Proposes a command at whichever member leads the group — here, or
    /// forwarded to the leader's node — and waits until it is committed and
    /// applied. Returns the entry's index and what apply produced; a
    /// command that apply refused is [`Error::Rejected`].
    pub async fn propose(&self, kind: pb::command::Kind) -> Result<(LogIndex, Applied)> {
        let mut retry = LeaderRetry::new();
        loop {
            let why = match self.propose_local(kind.clone()).await {
                Ok((index, outcome)) => return self.outcome(index, outcome),
                Err(Error::NotLeader { .. }) => match self.leader_elsewhere() {
                    Some((leader, node)) => {
                        match self.forward_propose(leader, &node, kind.clone()).await? {
                            Forwarded::Done((index, outcome)) => {
                                return self.outcome(index, outcome);
                            }
                            Forwarded::Retry(why) => why,
                        }
                    }
                    None => "no leader known".to_owned(),
                },
                // This node leads but holds no site lease for the PG (yet,
                // or any more: the PG is moving to another site, or this
                // site is cut off from the catalog). Look again: the
                // leader may move, or the lease come.
                Err(e @ Error::NoLease { .. }) => e.to_string(),
                Err(e) => return Err(e),
            };
            retry.pause(self.pg, why).await?;
        }
    }

    fn outcome(
        &self,
        index: LogIndex,
        outcome: std::result::Result<Applied, Rejection>,
    ) -> Result<(LogIndex, Applied)> {
        match outcome {
            Ok(applied) => Ok((index, applied)),
            Err(rejection) => Err(Error::Rejected {
                pg: self.pg.0,
                rejection,
            }),
        }
    }

    /// The leader's member id and node, when it is known and not this member.
    fn leader_elsewhere(&self) -> Option<(u64, MemberNode)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader?;
        if leader == self.member.0 {
            return None;
        }
        let node = m.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node))
    }

    async fn forward_propose(
        &self,
        leader: u64,
        node: &MemberNode,
        kind: pb::command::Kind,
    ) -> Result<Forwarded<(LogIndex, std::result::Result<Applied, Rejection>)>> {
        let req = pb::ProposeRequest {
            route: Some(self.route.to(MemberId(leader))),
            command: Some(pb::Command {
                stamp_ms: 0,
                kind: Some(kind),
            }),
        };
        let mut client = match self.peers.client(&node.raft_addr) {
            Ok(c) => c,
            Err(s) => return Ok(Forwarded::Retry(s.message().to_owned())),
        };
        // Bounded: a link that black-holes new connections would hold a
        // TLS handshake, and this write, forever. Past the deadline the
        // outcome is unknown (the leader may have applied the command), so
        // the caller gets "no leader" rather than a second proposal.
        let call = client.propose(Request::new(req));
        match self.peers.within(&node.raft_addr, LEADER_WAIT, call).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                let outcome = crate::wire::decode_json(&reply.outcome_json)
                    .map_err(|e| self.raft_err(format!("malformed forwarded outcome: {e}")))?;
                Ok(Forwarded::Done((LogIndex(reply.index), outcome)))
            }
            Err(s) if s.code() == Code::DeadlineExceeded => Err(Error::NoLeader {
                pg: self.pg.0,
                waited_ms: LEADER_WAIT.as_millis() as u64,
                last: format!(
                    "forwarded to {node}: {}; the command may or may not have been applied",
                    s.message()
                ),
            }),
            Err(s) if retryable(&s) => Ok(Forwarded::Retry(format!("{node}: {}", s.message()))),
            Err(s) => Err(self.raft_err(format!("forwarded to {node}: {}", s.message()))),
        }
    }

    /// Proposes a command to this member, which must be the leader.
    /// `Ok` carries apply's outcome, a refusal included.
    pub async fn propose_local(
        &self,
        kind: pb::command::Kind,
    ) -> Result<(LogIndex, std::result::Result<Applied, Rejection>)> {
        // Only a leader proposes, and only a leader needs a lease: a
        // follower answers "not the leader" without waiting for one.
        if self.raft.metrics().borrow_watched().current_leader == Some(self.member.0) {
            self.ensure_lease().await?;
        }
        let cmd = Command(pb::Command {
            stamp_ms: self.next_stamp_ms(),
            kind: Some(kind),
        });
        let resp = self
            .with_quorum_lease(|| self.raft.client_write(cmd.clone()))
            .await
            .map_err(|e| match e {
                RaftError::APIError(
                    ClientWriteError::ForwardToLeader(f) | ClientWriteError::LogEntryDiscarded(f),
                ) => Error::NotLeader {
                    pg: self.pg.0,
                    leader: f.leader_id,
                },
                other => self.raft_err(other),
            })?;
        let index = LogIndex(resp.log_id.index);
        if self.ack.waits_for_remote() {
            self.wait_for_standby(index).await;
        }
        // Checked again before the acknowledgement: a site cut off from
        // the catalog stops acknowledging when its lease runs out, even a
        // write that its own quorum committed (it is then not
        // acknowledged, and after a forced failover it is in the old
        // site's divergence, never silently kept or lost).
        self.check_lease()?;
        match resp.data.outcome {
            Some(outcome) => Ok((index, outcome)),
            None => Err(self.raft_err("a command entry was applied without an outcome")),
        }
    }

    /// Runs a write `op` (a proposal or a membership change) at this leader,
    /// renewing the leader's quorum lease once if `op` was refused for
    /// want of it. openraft refuses writes from a leader whose voters have
    /// not acknowledged it within the leader lease; per-group heartbeats keep
    /// that lease fresh, but a quiet group under per-node beats lets it
    /// lapse, so its first write after a quiet spell costs one ReadIndex
    /// round (a Raft heartbeat to every voter) first.
    async fn with_quorum_lease<T, F, Fut>(
        &self,
        op: F,
    ) -> std::result::Result<T, RaftError<TypeConfig, ClientWriteError<TypeConfig>>>
    where
        F: Fn() -> Fut,
        Fut: Future<
            Output = std::result::Result<T, RaftError<TypeConfig, ClientWriteError<TypeConfig>>>,
        >,
    {
        match op().await {
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                if f.reason == ForwardReason::LeaseExpired =>
            {
                // Raft's own quorum lease, not the site lease: a leader
                // must still change membership (a switchover moving the PG
                // away) after its site stopped holding the PG's lease.
                match self.raft_read_index().await {
                    Ok(_) => op().await,
                    Err(e) => {
                        tracing::debug!(pg = self.pg.0, error = %e, "could not renew the quorum lease");
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    }
                }
            }
            other => other,
        }
    }

    /// The ack policy and whether it is degraded.
    pub fn ack(&self) -> &AckState {
        &self.ack
    }

    /// Under `remote`: waits until a member at another site than this
    /// leader's has `index` durably (a follower reports an entry matched
    /// only after its fsync), or degrades the PG to `local` after the remote
    /// timeout. Other writers waiting at that moment stop waiting too.
    async fn wait_for_standby(&self, index: LogIndex) {
        let me = self.member.0;
        let ack = self.ack.clone();
        let standby_has_it = move |m: &openraft::RaftMetrics<TypeConfig>| {
            ack.is_degraded() || best_standby(m, me).is_some_and(|(_, matched)| matched >= index.0)
        };
        // A PG that has no standby member yet (a learner being added) waits
        // like one whose standby is cut off: it may get one in time.
        let timeout = self.ack.remote_timeout();
        if self
            .raft
            .wait(Some(timeout))
            .metrics(standby_has_it, "a standby site has the entry")
            .await
            .is_err()
        {
            let best = best_standby(&self.raft.metrics().borrow_watched(), me);
            let why = match best {
                Some(_) => format!(
                    "no standby site confirmed entry {index} within {} ms",
                    timeout.as_millis()
                ),
                None => format!(
                    "the PG has no member at a standby site (waited {} ms)",
                    timeout.as_millis()
                ),
            };
            self.ack
                .degrade(self.pg, best.map_or(0, |(_, matched)| matched), why);
        }
    }

    /// On the leader of a degraded `remote` PG: returns to `remote` once a
    /// standby member has been heard from since the degradation (its
    /// matched index moved past the one then) and is within
    /// ACK_RESTORE_LAG_ENTRIES of the last entry. Returns whether it did.
    pub fn restore_ack_if_caught_up(&self) -> bool {
        if !self.ack.is_degraded() {
            return false;
        }
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(self.member.0) {
            return false;
        }
        let last = m.last_log_index.unwrap_or(0);
        let degraded_at = self.ack.degraded_at();
        match best_standby(&m, self.member.0) {
            Some((node, matched))
                if matched > degraded_at && matched + ACK_RESTORE_LAG_ENTRIES >= last =>
            {
                self.ack.restore(
                    self.pg,
                    format!("standby node {node} has caught up to entry {matched} of {last}"),
                );
                true
            }
            _ => false,
        }
    }

    /// Waits until this node may serve a linearizable read: the leader (this
    /// member, or asked over the transport) confirmed with a quorum that it
    /// still leads, and everything committed before the call is applied
    /// here. Returns the read index.
    pub async fn read_barrier(&self) -> Result<LogIndex> {
        let mut retry = LeaderRetry::new();
        loop {
            let why = match self.read_index_local().await {
                Ok(index) => return Ok(index),
                Err(Error::NotLeader { .. }) => match self.leader_elsewhere() {
                    Some((leader, node)) => match self
                        .forward_read_index(leader, &node, retry.deadline)
                        .await?
                    {
                        Forwarded::Done(index) => {
                            self.wait_applied(index, retry.deadline).await?;
                            return Ok(index);
                        }
                        Forwarded::Retry(why) => why,
                    },
                    None => "no leader known".to_owned(),
                },
                // This node leads but holds no site lease for the PG (yet,
                // or any more: the PG is moving to another site, or this
                // site is cut off from the catalog). Look again: the
                // leader may move, or the lease come.
                Err(e @ Error::NoLease { .. }) => e.to_string(),
                Err(e) => return Err(e),
            };
            retry.pause(self.pg, why).await?;
        }
    }

    /// Asks the leader's node for a read index, waiting no later than
    /// `deadline` (a black-holed link would otherwise hold the read).
    async fn forward_read_index(
        &self,
        leader: u64,
        node: &MemberNode,
        deadline: Instant,
    ) -> Result<Forwarded<LogIndex>> {
        let req = pb::ReadIndexRequest {
            route: Some(self.route.to(MemberId(leader))),
        };
        let mut client = match self.peers.client(&node.raft_addr) {
            Ok(c) => c,
            Err(s) => return Ok(Forwarded::Retry(s.message().to_owned())),
        };
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let call = client.read_index(Request::new(req));
        match self.peers.within(&node.raft_addr, wait, call).await {
            Ok(reply) => Ok(Forwarded::Done(LogIndex(reply.into_inner().index))),
            Err(s) if retryable(&s) => Ok(Forwarded::Retry(format!("{node}: {}", s.message()))),
            Err(s) => Err(self.raft_err(format!("read index from {node}: {}", s.message()))),
        }
    }

    /// Waits until this member has applied `index`.
    async fn wait_applied(&self, index: LogIndex, deadline: Instant) -> Result<()> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index.0), "read index applied")
            .await
            .map(|_| ())
            .map_err(|e| self.raft_err(format!("waiting to apply read index {index}: {e}")))
    }

    /// Waits until this member has applied `index`, up to `timeout`.
    pub async fn wait_applied_index(&self, index: LogIndex, timeout: Duration) -> Result<()> {
        self.wait_applied(index, Instant::now() + timeout).await
    }

    /// The read index, if this member leads the group: under its leader
    /// lease when the lease is valid (no round trip: a quorum acknowledged
    /// this leader within the lease, and no other can be elected before it
    /// runs out), else by confirming leadership with a quorum (ReadIndex).
    pub async fn read_index_local(&self) -> Result<LogIndex> {
        let index = self.raft_read_index().await?;
        // A leader without a site lease serves no reads either: after a
        // failover another site serves newer data.
        self.ensure_lease().await?;
        Ok(index)
    }

    /// Waits up to LEASE_WAIT for this node's lease to cover the PG,
    /// asking the node's lease task for one at once.
    async fn ensure_lease(&self) -> Result<()> {
        match self
            .leases
            .wait_covered(self.pg, self.generation, LEASE_WAIT)
            .await
        {
            true => Ok(()),
            false => Err(self.no_lease()),
        }
    }

    fn check_lease(&self) -> Result<()> {
        match self.leases.covers(self.pg, self.generation, Instant::now()) {
            true => Ok(()),
            false => Err(self.no_lease()),
        }
    }

    fn no_lease(&self) -> Error {
        Error::NoLease {
            pg: self.pg.0,
            generation: self.generation.0,
        }
    }

    async fn raft_read_index(&self) -> Result<LogIndex> {
        match self.raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
            Ok(read) => return Ok(LogIndex(read.index())),
            Err(RaftError::APIError(openraft::error::LinearizableReadError::QuorumNotEnough(
                _,
            ))) => {}
            Err(RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(
                f,
            ))) => {
                return Err(Error::NotLeader {
                    pg: self.pg.0,
                    leader: f.leader_id,
                });
            }
            Err(other) => return Err(self.raft_err(other)),
        }
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
    pub async fn wait_for_leadership(&self, timeout: Duration) -> Result<()> {
        let me = self.member.0;
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader == Some(me), "this member leads")
            .await
            .map(|_| ())
            .map_err(|e| self.raft_err(e))
    }

    /// Waits until some member leads the group, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<()> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map(|_| ())
            .map_err(|e| self.raft_err(e))
    }

    pub fn metrics(&self) -> GroupMetrics {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let nodes: BTreeMap<u64, MemberNode> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let leader_node = m
            .current_leader
            .and_then(|l| nodes.get(&l))
            .map(|n| n.node_id);
        GroupMetrics {
            pg: self.pg,
            member: self.member,
            generation: self.generation,
            applied_index: LogIndex(m.last_applied.as_ref().map_or(0, |l| l.index)),
            last_log_index: LogIndex(m.last_log_index.unwrap_or(0)),
            leader: m.current_leader,
            leader_node,
            term: m.current_term,
            is_leader: m.current_leader == Some(self.member.0),
            voters: membership.voter_ids().collect(),
            nodes,
        }
    }

    /// If this member leads: its applied index, and the encoded bytes of
    /// each of the newest entries up to it that no member at another site
    /// than `site` has matched (at most `max`, newest last), with the
    /// index of the first (see [`LogStore::newest_sizes`]).
    pub fn progress(&self, site: &str, max: usize) -> Option<(LogIndex, u64, Vec<u64>)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let replication = m.replication.as_ref()?;
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        let membership = m.membership_config.membership();
        let elsewhere = replication
            .iter()
            .filter(|(id, _)| {
                membership
                    .get_node(id)
                    .is_some_and(|n| n.site.as_str() != site)
            })
            .map(|(_, matched)| matched.as_ref().map_or(0, |l| l.index))
            .max()
            .unwrap_or(0);
        let (first, sizes) = self.log.newest_sizes(elsewhere, applied, max);
        Some((LogIndex(applied), first, sizes))
    }

    /// Every other member's lag, if this member leads; empty otherwise.
    pub fn lag(&self) -> Vec<MemberLag> {
        let m = self.raft.metrics().borrow_watched().clone();
        let Some(replication) = m.replication.as_ref() else {
            return Vec::new();
        };
        let last = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let now = self.clock.now_ms();
        let mut out = Vec::new();
        for (id, matched) in replication {
            if *id == self.member.0 {
                continue;
            }
            let Some(node) = membership.get_node(id) else {
                continue;
            };
            let matched = matched.as_ref().map_or(0, |l| l.index);
            let lag = self.log.lag(matched, last, now).unwrap_or_else(|e| {
                tracing::warn!(pg = self.pg.0, error = %e, "cannot read the log for lag");
                Lag {
                    entries: last.saturating_sub(matched),
                    bytes: 0,
                    seconds: 0.0,
                }
            });
            out.push(MemberLag {
                member: MemberId(*id),
                node: node.clone(),
                voter: voters.contains(id),
                matched_index: LogIndex(matched),
                lag,
            });
        }
        out
    }

    /// Moves the group's membership one step towards `desired`, if this
    /// member leads: first adds missing members as learners, then sets the
    /// voters, then (a leader that is no longer a voter) hands leadership
    /// to a voter, then removes members no longer wanted. One step per call
    /// (each is a committed membership change); call again until it returns
    /// `Ok(false)`. Returns whether it changed anything.
    pub async fn sync_membership(&self, desired: &[DesiredMember]) -> Result<bool> {
        let m = self.metrics();
        if !m.is_leader || desired.is_empty() {
            return Ok(false);
        }
        for d in desired {
            if !m.nodes.contains_key(&d.member.0) {
                tracing::info!(pg = self.pg.0, member = d.member.0, node = %d.node, "adding learner");
                self.with_quorum_lease(|| self.raft.add_learner(d.member.0, d.node.clone(), false))
                    .await
                    .map_err(|e| self.raft_err(e))?;
                return Ok(true);
            }
        }
        let want_voters: BTreeSet<u64> = desired
            .iter()
            .filter(|d| d.voter)
            .map(|d| d.member.0)
            .collect();
        if !want_voters.is_empty() && want_voters != m.voters {
            tracing::info!(pg = self.pg.0, voters = ?want_voters, "changing voters");
            self.with_quorum_lease(|| {
                self.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(want_voters.clone()), true)
            })
            .await
            .map_err(|e| self.raft_err(e))?;
            return Ok(true);
        }
        if !m.voters.contains(&self.member.0)
            && let Some(to) = self.most_caught_up_voter()
        {
            // A leader kept as a learner (a switchover to another site)
            // goes on leading: openraft steps down only a leader removed
            // altogether. Hand over to the new voter that needs the least
            // catching up; openraft's TransferLeader makes it campaign at
            // once, and the others grant it their vote.
            tracing::info!(
                pg = self.pg.0,
                to,
                "no longer a voter: transferring leadership"
            );
            self.raft
                .trigger()
                .transfer_leader(to)
                .await
                .map_err(|e| self.raft_err(e))?;
            return Ok(true);
        }
        let wanted: BTreeSet<u64> = desired.iter().map(|d| d.member.0).collect();
        let unwanted: BTreeSet<u64> = m
            .nodes
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        if !unwanted.is_empty() {
            tracing::info!(pg = self.pg.0, members = ?unwanted, "removing members");
            self.with_quorum_lease(|| {
                self.raft
                    .change_membership(ChangeMembers::RemoveNodes(unwanted.clone()), false)
            })
            .await
            .map_err(|e| self.raft_err(e))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// As the leader sees it: the voter with the highest matched log id.
    fn most_caught_up_voter(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow_watched().clone();
        let replication = m.replication.as_ref()?;
        m.membership_config
            .membership()
            .voter_ids()
            .max_by_key(|id| replication.get(id).cloned().flatten())
    }

    /// Keeps the log within `max_bytes`: once it holds more, purges it
    /// behind the slowest member this leader replicates to, but at least
    /// down to `max_bytes / 2` (a member further behind then catches up
    /// through a Raft snapshot). The halving keeps purges (and the flush
    /// each snapshot costs) to one per half of the limit written. Purging
    /// needs a snapshot that covers the purge point: when the current one
    /// does not, this asks for one, purges what the current one covers, and
    /// the rest on a later call. Returns what it did.
    pub async fn enforce_log_retention(&self, max_bytes: u64) -> Result<Retention> {
        let log = self.log.clone();
        let pg = self.pg;
        let found = tokio::task::spawn_blocking(move || {
            let Some(span) = log.span()? else {
                return Ok(None);
            };
            if span.bytes <= max_bytes {
                return Ok(None);
            }
            Ok::<_, std::io::Error>(
                log.purge_point_keeping(&span, max_bytes / 2)?
                    .map(|cut| (span, cut)),
            )
        })
        .await
        .map_err(|e| self.raft_err(e))?
        .map_err(|source| Error::Storage { pg: pg.0, source })?;
        let Some((span, cut)) = found else {
            return Ok(Retention::Within);
        };
        let m = self.raft.metrics().borrow_watched().clone();
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        let slowest = m.replication.as_ref().and_then(|r| {
            r.iter()
                .filter(|(id, _)| **id != self.member.0)
                .map(|(_, matched)| matched.as_ref().map_or(0, |l| l.index))
                .min()
        });
        let mut target = slowest.map_or(cut, |s| s.max(cut)).min(applied);
        if target < span.first {
            return Ok(Retention::Within);
        }
        // openraft purges only what a snapshot covers. Taking one costs a
        // flush (a snapshot is a view of the replica): ask for a new one,
        // and meanwhile purge what the last one covers, so a log written
        // faster than it is checked does not wait a round for it.
        let snapshot = m.snapshot.as_ref().map_or(0, |l| l.index);
        let snapshot_requested = snapshot < target;
        if snapshot_requested {
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(|e| self.raft_err(e))?;
            if snapshot < span.first {
                return Ok(Retention::SnapshotRequested { upto: target });
            }
            target = snapshot;
        }
        tracing::info!(
            pg = self.pg.0,
            upto = target,
            log_bytes = span.bytes,
            max_bytes,
            "purging the log"
        );
        self.raft
            .trigger()
            .purge_log(target)
            .await
            .map_err(|e| self.raft_err(e))?;
        Ok(Retention::Purging {
            upto: target,
            snapshot_requested,
        })
    }

    /// How far this member's log goes (for a forced failover's choice of
    /// the best standby): its last log id and a recent command's stamp.
    /// The node's database this member's replica lives in.
    pub fn db(&self) -> &lifeboat_store::db::Db {
        self.log.db()
    }

    pub fn log_tail(&self) -> Result<pb::LogTailReply> {
        let tail = self.log.tail().map_err(|source| Error::Storage {
            pg: self.pg.0,
            source,
        })?;
        Ok(match tail {
            Some((last, stamp_ms)) => pb::LogTailReply {
                term: last.leader_id.term,
                index: last.index,
                stamp_ms,
            },
            None => pb::LogTailReply::default(),
        })
    }

    /// The log this member holds and its latest Raft snapshot (two point
    /// reads of the log).
    pub fn log_status(&self) -> Result<LogStatus> {
        let span = self.log.span().map_err(|source| Error::Storage {
            pg: self.pg.0,
            source,
        })?;
        let m = self.raft.metrics().borrow_watched().clone();
        Ok(LogStatus {
            span,
            snapshot_index: m.snapshot.as_ref().map(|l| LogIndex(l.index)),
            purged_index: m.purged.as_ref().map(|l| LogIndex(l.index)),
            snapshots_installed: self.snapshot_installs.load(Ordering::Relaxed),
        })
    }

    pub async fn shutdown(&self) -> Result<()> {
        self.raft.shutdown().await.map_err(|e| self.raft_err(e))
    }
}
