//! Several members of one PG on several "nodes" in this process, each with
//! its own RocksDB and its own gRPC transport server on a loopback port:
//! replication, forwarding, learners, leader loss and route refusals over
//! the real transport.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::liveness::Liveness;
use lifeboat_replication::log_files::{FILE_ENTRY_BYTES_MIN, LogFiles};
use lifeboat_replication::log_store::WalSyncer;
use lifeboat_replication::transport::{Host, Identity, Peers, TransportService};
use lifeboat_replication::{
    DesiredMember, GroupStart, Heartbeats, MemberNode, ProtectionGroup, RaftTimers, SystemClock,
};
use lifeboat_store::db::{Db, DbOptions};
use lifeboat_store::volumes::Volumes;
use lifeboat_store::{BlockNo, Generation, LogIndex, MemberId, NodeId, PgId, VolumeId};
use tokio::sync::oneshot;

const PG: PgId = PgId(7);
const CLUSTER: &str = "cluster-a";

struct TestHost {
    identity: Arc<Identity>,
    groups: RwLock<HashMap<PgId, ProtectionGroup>>,
    dir: PathBuf,
    liveness: Option<Arc<Liveness>>,
}

impl Host for TestHost {
    fn identity(&self) -> &Identity {
        &self.identity
    }
    fn group(&self, pg: PgId) -> Option<ProtectionGroup> {
        self.groups.read().unwrap().get(&pg).cloned()
    }
    fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
    fn hello(&self) -> pb::HelloReply {
        pb::HelloReply {
            node_id: self.identity.node_id().0,
            cluster_id: self.identity.cluster_id().unwrap_or_default(),
            ..Default::default()
        }
    }
    fn liveness(&self) -> Option<&Liveness> {
        self.liveness.as_deref()
    }
    fn grant_lease(
        &self,
        _from_node: u64,
        _progress: Vec<pb::PgProgress>,
    ) -> lifeboat_replication::transport::HostFuture<'_, pb::LeaseReply> {
        Box::pin(async {
            Err(tonic::Status::unimplemented(
                "these groups run without a catalog: no leases",
            ))
        })
    }
    fn force_generation(
        &self,
        _req: pb::ForceGenerationRequest,
    ) -> lifeboat_replication::transport::HostFuture<'_, pb::ForceGenerationReply> {
        Box::pin(async {
            Err(tonic::Status::unimplemented(
                "these tests force membership in process",
            ))
        })
    }
}

struct TestNode {
    id: NodeId,
    site: &'static str,
    addr: String,
    db: Db,
    peers: Arc<Peers>,
    host: Arc<TestHost>,
    group: ProtectionGroup,
    stop: Option<oneshot::Sender<()>>,
    liveness_task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    fn member_node(&self) -> MemberNode {
        MemberNode {
            node_id: self.id.0,
            raft_addr: self.addr.clone(),
            site: self.site.into(),
        }
    }

    async fn stop(&mut self) {
        if let Some(task) = self.liveness_task.take() {
            task.abort();
        }
        self.group.shutdown().await.unwrap();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn timers() -> RaftTimers {
    RaftTimers {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
    }
}

async fn start_node(id: u64, member: u64, site: &'static str, generation: u64) -> TestNode {
    start_node_with(id, member, site, generation, Heartbeats::PerGroup).await
}

/// A node whose group is kept alive `heartbeats`; with `PerNode`, the node
/// runs a liveness round every heartbeat interval until it stops.
async fn start_node_with(
    id: u64,
    member: u64,
    site: &'static str,
    generation: u64,
    heartbeats: Heartbeats,
) -> TestNode {
    let peers = Peers::new();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
    let identity = Identity::new(NodeId(id), Some(CLUSTER.into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let group = start_group(
        &db,
        dir.path(),
        member,
        generation,
        heartbeats,
        &peers,
        &identity,
    )
    .await;
    let host = Arc::new(TestHost {
        identity,
        groups: RwLock::new(HashMap::from([(PG, group.clone())])),
        dir: dir.path().to_owned(),
        liveness: (heartbeats == Heartbeats::PerNode).then(|| Liveness::new(timers())),
    });
    let (tx, rx) = oneshot::channel::<()>();
    let liveness_task = host.liveness.clone().map(|liveness| {
        let host = host.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(liveness.interval()).await;
                let groups: Vec<ProtectionGroup> =
                    host.groups.read().unwrap().values().cloned().collect();
                liveness.round(&groups, &peers, &host.identity).await;
            }
        })
    });
    let service = TransportService::new(host.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .unwrap();
    });
    TestNode {
        id: NodeId(id),
        site,
        addr,
        db,
        peers,
        host,
        group,
        stop: Some(tx),
        liveness_task,
        _dir: dir,
    }
}

/// Starts member `member` of PG at `generation` over `db`.
async fn start_group(
    db: &Db,
    dir: &std::path::Path,
    member: u64,
    generation: u64,
    heartbeats: Heartbeats,
    peers: &Arc<Peers>,
    identity: &Arc<Identity>,
) -> ProtectionGroup {
    ProtectionGroup::start(GroupStart {
        pg: PG,
        member: MemberId(member),
        generation: Generation(generation),
        db: db.clone(),
        syncer: WalSyncer::start(
            db.clone(),
            LogFiles::new(dir.join("raft-log"), FILE_ENTRY_BYTES_MIN),
        ),
        snapshot_root: &dir.join("snapshots"),
        timers: &timers(),
        heartbeats,
        clock: Arc::new(SystemClock),
        peers: peers.clone(),
        identity: identity.clone(),
        events: Arc::new(lifeboat_replication::ack::LogEvents),
        // These groups run without a catalog to grant site leases.
        leases: Arc::new(lifeboat_replication::lease::LeaseTable::unenforced()),
    })
    .await
    .unwrap()
}

impl TestNode {
    /// Stops this node's member and starts it again over the same data at
    /// `generation`; `surgery` runs on its data while it is stopped.
    async fn restart_member(&mut self, generation: u64, surgery: impl FnOnce(&Db)) {
        let member = self.group.member_id().0;
        self.group.shutdown().await.unwrap();
        surgery(&self.db);
        let group = start_group(
            &self.db,
            self._dir.path(),
            member,
            generation,
            self.group.heartbeats(),
            &self.peers,
            &self.host.identity,
        )
        .await;
        self.host.groups.write().unwrap().insert(PG, group.clone());
        self.group = group;
    }
}

/// Moves the group's membership to `desired` through its leader, step by
/// step, until every node agrees there is nothing left to change and the
/// leader's view has `members` members.
async fn sync_until(nodes: &[TestNode], desired: &[DesiredMember], members: usize) {
    for _ in 0..100 {
        let mut changed = false;
        for n in nodes.iter().filter(|n| n.stop.is_some()) {
            changed |= n.group.sync_membership(desired).await.unwrap_or(true);
        }
        let leader = nodes
            .iter()
            .find(|n| n.stop.is_some() && n.group.metrics().is_leader);
        if !changed && leader.is_some_and(|l| l.group.metrics().nodes.len() == members) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("membership never reached {desired:?}");
}

fn desired_members(nodes: &[&TestNode], voter: impl Fn(&TestNode) -> bool) -> Vec<DesiredMember> {
    nodes
        .iter()
        .map(|n| DesiredMember {
            member: n.group.member_id(),
            node: n.member_node(),
            voter: voter(n),
        })
        .collect()
}

/// Makes `voters` the group's first membership and waits for a leader.
async fn initialize_voters(voters: &[TestNode]) {
    let members: BTreeMap<u64, MemberNode> = voters
        .iter()
        .map(|n| (n.group.member_id().0, n.member_node()))
        .collect();
    voters[0].group.initialize(members).await.unwrap();
    voters[0]
        .group
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
}

/// Volume 1 ("disk0", 64 blocks), which `write` writes to.
fn create_disk0() -> pb::command::Kind {
    pb::command::Kind::CreateVolume(pb::CreateVolume {
        volume: 1,
        name: "disk0".into(),
        size_bytes: 64 * 4096,
        base: None,
    })
}

fn write(block: u64, frame: &[u8]) -> pb::command::Kind {
    pb::command::Kind::WriteBlocks(pb::WriteBlocks {
        volume: 1,
        blocks: vec![pb::BlockWrite {
            block,
            frame: frame.to_vec().into(),
            expect_latest: None,
        }],
        newest_mask: None,
    })
}

fn latest(node: &TestNode, block: u64) -> Option<Vec<u8>> {
    Volumes::new(node.db.clone())
        .latest_blocks(PG, VolumeId(1), BlockNo(block), 1)
        .unwrap()
        .remove(0)
        .map(|b| b.value)
}

async fn wait_applied(node: &TestNode, index: LogIndex) {
    for _ in 0..200 {
        if node.group.metrics().applied_index >= index {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "node {} did not apply {index}: {:?}",
        node.id,
        node.group.metrics()
    );
}

/// Three voters kept alive by per-node beats instead of openraft's own
/// heartbeats: an idle group keeps its leader and term however long it is
/// idle, a follower's campaign against a live leader is refused at
/// pre-vote, and when the leader's node stops another voter takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_live_on_node_beats() {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node_with(id, 10 + id, "primary", 0, Heartbeats::PerNode).await);
    }
    initialize_voters(&nodes).await;
    nodes[0].group.propose(create_disk0()).await.unwrap();
    let (index, _) = nodes[0].group.propose(write(1, b"one")).await.unwrap();
    for n in &nodes {
        wait_applied(n, index).await;
    }
    let before = nodes[0].group.leadership();
    let leader = nodes
        .iter()
        .position(|n| n.group.leadership().is_leader)
        .expect("a leader");

    // Idle for more than three election timeouts (300–600 ms): openraft's
    // ticker is off, so only the beats keep the followers from campaigning.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for n in &nodes {
        let l = n.group.leadership();
        assert_eq!(
            (l.leader, l.term),
            (before.leader, before.term),
            "node {} changed leader or term while idle",
            n.id
        );
    }

    // The leader's quorum lease lapsed while idle (no heartbeats renew
    // it); the first write renews it and goes through, on the leader and
    // forwarded from a follower.
    let (index, _) = nodes[leader]
        .group
        .propose(write(3, b"idle"))
        .await
        .unwrap();
    let (index, _) = nodes[(leader + 2) % 3]
        .group
        .propose(write(3, b"after"))
        .await
        .map(|(i, a)| (i.max(index), a))
        .unwrap();
    for n in &nodes {
        wait_applied(n, index).await;
        assert_eq!(latest(n, 3).as_deref(), Some(&b"after"[..]));
    }
    let before = nodes[leader].group.leadership();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // A follower that campaigns anyway gets no pre-vote: the other
    // follower heard the leader's beat, and the leader's beats are answered.
    let follower = (leader + 1) % 3;
    nodes[follower].group.campaign().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for n in &nodes {
        let l = n.group.leadership();
        assert_eq!(
            (l.leader, l.term),
            (before.leader, before.term),
            "node {} changed leader or term after a refused campaign",
            n.id
        );
    }

    // The leader's node stops: its beats stop, and another voter campaigns.
    nodes[leader].stop().await;
    let survivor = &nodes[follower];
    survivor
        .group
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let (index, _) = survivor.group.propose(write(2, b"two")).await.unwrap();
    let after = survivor.group.leadership();
    assert!(after.term > before.term, "{after:?} after {before:?}");
    assert_ne!(after.leader, before.leader);
    for (i, n) in nodes.iter().enumerate() {
        if i != leader {
            wait_applied(n, index).await;
            assert_eq!(latest(n, 2).as_deref(), Some(&b"two"[..]));
        }
    }
    for n in &mut nodes {
        if n.stop.is_some() {
            n.stop().await;
        }
    }
}

/// Three voters at "primary" and a learner at "dr": the learner gets every
/// entry, followers forward proposals and serve linearizable reads, and a
/// new leader takes over when the leader's node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_and_a_learner_replicate_and_survive_the_leader() {
    let mut nodes = vec![
        start_node(1, 11, "primary", 0).await,
        start_node(2, 12, "primary", 0).await,
        start_node(3, 13, "primary", 0).await,
        start_node(4, 14, "dr", 0).await,
    ];
    initialize_voters(&nodes[..3]).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    let desired = desired_members(&all, |n| n.site == "primary");
    // The leader adds the learner; the others do nothing.
    sync_until(&nodes, &desired, 4).await;
    let m = nodes[0].group.metrics();
    assert_eq!(m.nodes.len(), 4, "{m:?}");
    assert_eq!(m.voters.len(), 3, "{m:?}");

    // Proposed on the learner's node: forwarded to the leader.
    let (created, _) = nodes[3].group.propose(create_disk0()).await.unwrap();
    let mut last = created;
    for i in 0..20u64 {
        let proposer = &nodes[(i % 4) as usize];
        let (index, _) = proposer
            .group
            .propose(write(i % 8, format!("v{i}").as_bytes()))
            .await
            .unwrap();
        assert!(index > last);
        last = index;
    }
    // A linearizable read on the learner sees the last write.
    let read = nodes[3].group.read_barrier().await.unwrap();
    assert!(read >= last, "read index {read} < {last}");
    assert_eq!(latest(&nodes[3], 19 % 8).unwrap(), b"v19");

    // The leader reports the lag of every other member, the learner included.
    let leader = nodes
        .iter()
        .position(|n| n.group.metrics().is_leader)
        .unwrap();
    let lag = nodes[leader].group.lag();
    assert_eq!(lag.len(), 3, "{lag:?}");
    assert!(lag.iter().any(|l| !l.voter && l.node.site == "dr"));

    // Stop the leader: another voter takes over and writes go on.
    nodes[leader].stop().await;
    let survivor = (leader + 1) % 3;
    let (after, _) = nodes[survivor]
        .group
        .propose(write(0, b"after-failover"))
        .await
        .unwrap();
    assert!(after > last);
    for (i, n) in nodes.iter().enumerate() {
        if i != leader {
            wait_applied(n, after).await;
            assert_eq!(latest(n, 0).unwrap(), b"after-failover", "node {}", n.id);
        }
    }
    let new_leader = nodes[survivor].group.metrics().leader_node.unwrap();
    assert_ne!(new_leader, nodes[leader].id.0);
    for n in &mut nodes {
        if n.stop.is_some() {
            n.stop().await;
        }
    }
}

/// A message for another generation, another cluster, an unknown PG or a
/// member the node does not have is refused before it reaches Raft.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_a_wrong_route_are_refused() {
    let mut node = start_node(1, 21, "primary", 3).await;
    node.group
        .initialize([(21, node.member_node())].into_iter().collect())
        .await
        .unwrap();
    let peers = Peers::new();
    let good = pb::Route {
        cluster_id: CLUSTER.into(),
        pg: PG.0,
        generation: 3,
        target_member: 21,
        from_node: 9,
    };
    let read = |route: pb::Route| {
        let mut client = peers.client(&node.addr).unwrap();
        async move {
            client
                .read_index(pb::ReadIndexRequest { route: Some(route) })
                .await
        }
    };
    node.group
        .wait_for_leadership(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(read(good.clone()).await.is_ok());

    let cases = [
        (
            pb::Route {
                generation: 2,
                ..good.clone()
            },
            tonic::Code::FailedPrecondition,
            "generation 3",
        ),
        (
            pb::Route {
                cluster_id: "cluster-b".into(),
                ..good.clone()
            },
            tonic::Code::PermissionDenied,
            "cluster-a",
        ),
        (
            pb::Route {
                pg: 99,
                ..good.clone()
            },
            tonic::Code::NotFound,
            "protection group 99 is not hosted",
        ),
        (
            pb::Route {
                target_member: 22,
                ..good.clone()
            },
            tonic::Code::NotFound,
            "member 22",
        ),
    ];
    for (route, code, says) in cases {
        let status = read(route.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{route:?}: {status:?}");
        assert!(status.message().contains(says), "{status:?}");
    }
    // An append with a wrong generation never reaches the log.
    let before = node.group.metrics().last_log_index;
    let mut client = peers.client(&node.addr).unwrap();
    let status = client
        .append(pb::AppendRequest {
            route: Some(pb::Route {
                generation: 4,
                ..good.clone()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(node.group.metrics().last_log_index, before);

    // Beats are refused from another cluster, and by a node that keeps its
    // groups alive with per-group heartbeats (it has no use for them).
    let beat = |cluster_id: &str| pb::BeatRequest {
        cluster_id: cluster_id.into(),
        from_node: 9,
        leads: vec![pb::LeaderBeat {
            pg: PG.0,
            generation: 0,
            term: 1,
            leader_member: 99,
        }],
    };
    let status = client.beat(beat("cluster-b")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = client.beat(beat(CLUSTER)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("per-node heartbeats"),
        "{status:?}"
    );
    assert!(Arc::strong_count(&node.host) >= 1);
    node.stop().await;
}

/// The whole active site is lost (every voter stopped): offline forced
/// membership on the DR learner with the highest last log id makes it the
/// only voter of generation 1. Elected, it commits everything it holds —
/// every write acknowledged before the loss is there — serves new writes,
/// replicates them to the other DR member (restarted at generation 1), and
/// can make it a voter. The old generation's members are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_membership_on_the_best_standby_after_losing_every_voter() {
    let mut nodes = vec![
        start_node(1, 11, "primary", 0).await,
        start_node(2, 12, "primary", 0).await,
        start_node(3, 13, "primary", 0).await,
        start_node(4, 14, "dr", 0).await,
        start_node(5, 15, "dr", 0).await,
    ];
    initialize_voters(&nodes[..3]).await;
    let all: Vec<&TestNode> = nodes.iter().collect();
    sync_until(&nodes, &desired_members(&all, |n| n.site == "primary"), 5).await;
    let (mut last, _) = nodes[0].group.propose(create_disk0()).await.unwrap();
    for i in 0..20u64 {
        last = nodes[0]
            .group
            .propose(write(i % 8, format!("v{i}").as_bytes()))
            .await
            .unwrap()
            .0;
    }
    for n in &nodes[3..] {
        wait_applied(n, last).await;
    }
    for n in &mut nodes[..3] {
        n.stop().await;
    }

    // The best standby: the highest last log index (both hold all here).
    let best = (3..5)
        .max_by_key(|i| nodes[*i].group.metrics().last_log_index)
        .unwrap();
    let other = if best == 3 { 4 } else { 3 };
    let voters = BTreeMap::from([(nodes[best].group.member_id().0, nodes[best].member_node())]);
    let learners = BTreeMap::from([(nodes[other].group.member_id().0, nodes[other].member_node())]);
    let me = nodes[best].group.member_id().0;
    let mut forced = None;
    nodes[best]
        .restart_member(1, |db| {
            forced = Some(
                lifeboat_replication::log_store::force_membership(db, PG, me, &voters, &learners)
                    .unwrap(),
            );
        })
        .await;
    let forced = forced.unwrap();
    assert!(
        forced.fork_index >= last.0,
        "the fork is after every acknowledged write: {forced:?}, last {last}"
    );
    nodes[other].restart_member(1, |_| {}).await;
    nodes[best].group.campaign().await;
    nodes[best]
        .group
        .wait_for_leadership(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(nodes[best].group.generation(), Generation(1));
    for b in 0..8u64 {
        let newest = (0..20u64).filter(|i| i % 8 == b).max().unwrap();
        let want = format!("v{newest}");
        assert_eq!(
            latest(&nodes[best], b).unwrap(),
            want.as_bytes(),
            "block {b}"
        );
    }
    // New writes, at the new leader and forwarded from the other DR node.
    let (after, _) = nodes[other]
        .group
        .propose(write(0, b"after-forced-failover"))
        .await
        .unwrap();
    assert!(after.0 > forced.fork_index + 1);
    wait_applied(&nodes[other], after).await;
    assert_eq!(latest(&nodes[other], 0).unwrap(), b"after-forced-failover");
    // The other DR member becomes a voter of the new generation.
    let dr: Vec<&TestNode> = nodes[3..].iter().collect();
    sync_until(&nodes, &desired_members(&dr, |_| true), 2).await;
    assert_eq!(nodes[best].group.metrics().voters.len(), 2);

    // A member of the old generation is refused by the new one.
    let old_route = pb::Route {
        cluster_id: CLUSTER.into(),
        pg: PG.0,
        generation: 0,
        target_member: me,
        from_node: 1,
    };
    let refused = lifeboat_replication::transport::check_route(&*nodes[best].host, &old_route)
        .err()
        .expect("generation 0 refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    for n in &mut nodes[3..] {
        n.stop().await;
    }
}
