//! A two-site cluster of real node processes (three at `primary`, two at
//! `dr`): nodes join with `node add`, a PG gets voters at primary and
//! learners at dr, NBD works on any node, and SIGKILL of the PG's leader
//! under a write load loses nothing acknowledged and leaves every replica
//! identical.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::harness::{self, TestNode};
use lifeboat_chaos_tests::ledger::Ledger;
use lifeboat_chaos_tests::nbd_client::NbdClient;
use lifeboat_chaos_tests::proxy::LinkProxy;
use rand::{Rng, SeedableRng};

use crate::{FAST_RAFT, block_content};

pub(crate) const BLOCKS: u64 = 64;
pub(crate) const WRITERS: u64 = 4;

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<TestNode>,
    dir: tempfile::TempDir,
    /// TOML every node's config ends with.
    extra: String,
}

impl Cluster {
    /// Starts `primary` + `dr` nodes, initialises the cluster on node 0,
    /// adds the others with `node add`, then makes tenant `t` and `t/v`.
    pub(crate) fn start(primary: u64, dr: u64) -> Cluster {
        Cluster::start_with(primary, dr, "")
    }

    /// Like [`Cluster::start`], with `extra` TOML in every node's config.
    fn start_with(primary: u64, dr: u64, extra: &str) -> Cluster {
        let c = Cluster::processes(primary, dr, extra);
        c.form()
    }

    /// Like [`Cluster::start_with`], but every node dials every other
    /// through its own [`LinkProxy`], so that a test can cut links.
    pub(crate) async fn start_linked(primary: u64, dr: u64, extra: &str) -> (Cluster, Links) {
        Cluster::link(Cluster::processes(primary, dr, extra)).await
    }

    /// Like [`Cluster::start_linked`], and last a witness (site `witness`).
    pub(crate) async fn start_linked_with_witness(
        primary: u64,
        dr: u64,
        extra: &str,
    ) -> (Cluster, Links) {
        let mut c = Cluster::processes(primary, dr, extra);
        c.add_witness_process();
        Cluster::link(c).await
    }

    /// Restarts every node of `c` dialling every other through a proxy,
    /// then forms the cluster.
    async fn link(mut c: Cluster) -> (Cluster, Links) {
        // The nodes have run once, so their ports are final: build the
        // proxies to them, then restart every node dialling through them.
        let mut links = Links {
            proxies: Vec::new(),
        };
        // Proxies first, while the nodes still hold their ports: a proxy's
        // port then cannot be one a node is about to bind again.
        let mut dials = Vec::new();
        for i in 0..c.nodes.len() {
            let mut dial = String::from("[raft.dial]\n");
            for j in (0..c.nodes.len()).filter(|j| *j != i) {
                let proxy = LinkProxy::start(c.nodes[j].raft).await.unwrap();
                dial.push_str(&format!("\"{}\" = \"{}\"\n", c.nodes[j].raft, proxy.addr()));
                links.proxies.push(Link {
                    from: i,
                    to: j,
                    from_site: c.nodes[i].site.clone(),
                    to_site: c.nodes[j].site.clone(),
                    proxy,
                });
            }
            dials.push(dial);
        }
        for (n, dial) in c.nodes.iter_mut().zip(&dials) {
            assert!(n.stop().unwrap());
            n.add_config(dial).unwrap();
        }
        for n in &mut c.nodes {
            n.start().unwrap();
        }
        (c.form(), links)
    }

    /// Like [`Cluster::start`], and last a witness (site `witness`).
    pub(crate) fn start_with_witness(primary: u64, dr: u64) -> Cluster {
        Cluster::start_with_witness_and(primary, dr, "")
    }

    /// [`Cluster::start_with_witness`] with `extra` in every node's config.
    pub(crate) fn start_with_witness_and(primary: u64, dr: u64, extra: &str) -> Cluster {
        let mut c = Cluster::processes(primary, dr, extra);
        c.add_witness_process();
        c.form()
    }

    /// Starts a witness process (site `witness`) after the others.
    fn add_witness_process(&mut self) {
        let dir = self.dir.path().join(format!("n{}", self.nodes.len()));
        let mut witness = TestNode::member(
            &dir,
            &dir.join("data"),
            self.nodes.len() as u64 + 1,
            "witness",
            &self.dir.path().join("keys/master.key"),
            &self.extra,
        )
        .unwrap();
        witness.start().unwrap();
        self.nodes.push(witness);
    }

    /// Starts the node processes, in no cluster yet.
    fn processes(primary: u64, dr: u64, extra: &str) -> Cluster {
        let extra = format!("{FAST_RAFT}{extra}");
        let dir = tempfile::tempdir().unwrap();
        let sites: Vec<&str> = (0..primary + dr)
            .map(|i| if i < primary { "primary" } else { "dr" })
            .collect();
        let nodes = harness::start_nodes(dir.path(), &sites, &extra).unwrap();
        Cluster { nodes, dir, extra }
    }

    /// `cluster init` on node 0, `node add` of the others, tenant `t` and
    /// volume `t/v`.
    fn form(mut self) -> Cluster {
        harness::form_cluster(&mut self.nodes);
        self.nodes[0].must_cli(&["tenant", "create", "t"]);
        self.nodes[0].must_cli(&["volume", "create", "t/v", "--size", "1MiB"]);
        self
    }

    /// Starts a new node that is in no cluster yet.
    pub(crate) fn start_new_node(&self, node_id: u64, site: &str) -> TestNode {
        let node_dir = self.dir.path().join(format!("new{node_id}"));
        let mut n = TestNode::member(
            &node_dir,
            &node_dir.join("data"),
            node_id,
            site,
            &self.dir.path().join("keys/master.key"),
            &self.extra,
        )
        .unwrap();
        n.start().unwrap();
        n.token = self.nodes[0].token.clone();
        n
    }

    /// The node id leading PG `t/main`, from node `via`'s status.
    fn leader_of_main(&self, via: usize) -> Option<u64> {
        self.main_status(via)?["leader_node"]
            .as_u64()
            .filter(|l| *l != 0)
    }

    /// PG `t/main` as node `via`'s status shows it.
    fn main_status(&self, via: usize) -> Option<serde_json::Value> {
        main_status_of(&self.nodes[via])
    }

    fn index_of(&self, node_id: u64) -> usize {
        self.nodes
            .iter()
            .position(|n| n.node_id == node_id)
            .unwrap()
    }
}

/// PG `t/main` as `node`'s status shows it, if the node hosts it.
fn main_status_of(node: &TestNode) -> Option<serde_json::Value> {
    pg_status_of(node, "t/main")
}

/// PG `name` as `node`'s status shows it, if the node hosts it.
pub(crate) fn pg_status_of(node: &TestNode, name: &str) -> Option<serde_json::Value> {
    let out = node.cli(&["status", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    pg_named(&v, name).cloned()
}

/// The entry of PG `name` in a CLI answer's `pgs` list (status, failover,
/// failback).
pub(crate) fn pg_named<'a>(
    answer: &'a serde_json::Value,
    name: &str,
) -> Option<&'a serde_json::Value> {
    answer["pgs"].as_array()?.iter().find(|p| p["name"] == name)
}

/// The proxies of every directed link of a linked cluster.
pub(crate) struct Links {
    proxies: Vec<Link>,
}

/// The proxy of the link from node `from` to node `to` (indexes in the
/// cluster), with their sites.
struct Link {
    from: usize,
    to: usize,
    from_site: String,
    to_site: String,
    proxy: LinkProxy,
}

impl Links {
    /// Cuts every link between sites `a` and `b`, both ways.
    pub(crate) fn cut_between(&self, a: &str, b: &str) {
        for l in &self.proxies {
            if (l.from_site == a && l.to_site == b) || (l.from_site == b && l.to_site == a) {
                l.proxy.cut();
            }
        }
    }

    /// Cuts the links between nodes `a` and `b` (cluster indexes), both ways.
    pub(crate) fn cut_between_nodes(&self, a: usize, b: usize) {
        for l in &self.proxies {
            if (l.from, l.to) == (a, b) || (l.from, l.to) == (b, a) {
                l.proxy.cut();
            }
        }
    }

    pub(crate) fn heal_all(&self) {
        for l in &self.proxies {
            l.proxy.heal();
        }
    }
}

/// WRITERS concurrent [`writer`]s on `t/v` through `node`, seeded from `seed`.
pub(crate) async fn spawn_writers(
    node: &TestNode,
    ledger: &Ledger,
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<WriterStats>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tasks = Vec::new();
    for id in 0..WRITERS {
        // A node starts its PG members within a reconcile pass of the
        // volume's creation elsewhere.
        let client = connect_when_served(node).await;
        tasks.push(tokio::spawn(writer(
            client,
            id,
            ledger.clone(),
            stop.clone(),
            rng.r#gen(),
        )));
    }
    tasks
}

/// Waits for writers told to stop; what they saw together.
pub(crate) async fn writers_stopped(
    tasks: Vec<tokio::task::JoinHandle<WriterStats>>,
) -> WriterStats {
    let mut total = WriterStats::default();
    for t in tasks {
        let s = t.await.unwrap();
        total.acked += s.acked;
        total.failed += s.failed;
        total.longest = total.longest.max(s.longest);
    }
    total
}

/// What one [`writer`] saw.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WriterStats {
    pub(crate) acked: u64,
    /// Writes answered with an error.
    pub(crate) failed: u64,
    /// The longest any one write took to be answered: the pause a client
    /// saw.
    pub(crate) longest: Duration,
}

pub(crate) async fn writer(
    client: NbdClient,
    id: u64,
    ledger: Ledger,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> WriterStats {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut stats = WriterStats::default();
    let mut seq = id << 40;
    while !stop.load(Ordering::Relaxed) {
        let block = id * (BLOCKS / WRITERS) + rng.gen_range(0..BLOCKS / WRITERS);
        ledger.sending(block, seq);
        let sent = Instant::now();
        let answer = client
            .write(block * 4096, &block_content(block, seq, 4096), false)
            .await;
        stats.longest = stats.longest.max(sent.elapsed());
        match answer {
            Ok(Ok(())) => {
                ledger.acked(block, seq);
                stats.acked += 1;
            }
            // An error reply is not an acknowledgement; the write may or
            // may not have landed, so it stays in flight.
            Ok(Err(_)) => stats.failed += 1,
            Err(e) => panic!("writer {id}: NBD connection lost: {e}"),
        }
        seq += 1;
    }
    stats
}

/// Reads every block of the ledger through `node`'s NBD server.
pub(crate) async fn read_all(node: &TestNode) -> Vec<Vec<u8>> {
    read_volume(node, "t/v").await
}

/// Reads the first BLOCKS blocks of `volume` through `node`'s NBD server.
pub(crate) async fn read_volume(node: &TestNode, volume: &str) -> Vec<Vec<u8>> {
    let client = NbdClient::connect(node.nbd, volume).await.unwrap();
    let mut out = Vec::new();
    for b in 0..BLOCKS {
        out.push(client.read(b * 4096, 4096).await.unwrap().unwrap());
    }
    out
}

pub(crate) fn check_against_ledger(blocks: &[Vec<u8>], ledger: &Ledger, node: u64) {
    for (b, got) in blocks.iter().enumerate() {
        if let Err(e) = ledger.check(b as u64, got) {
            panic!("node {node}: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_loses_nothing_and_replicas_agree() {
    let mut c = Cluster::start(3, 2);
    let leader = c.leader_of_main(0).expect("t/main has a leader");
    let leader_idx = c.index_of(leader);
    // Write through a primary node that does not lead: its writes are
    // forwarded, and it stays up when the leader dies.
    let via = (0..3).find(|i| *i != leader_idx).unwrap();

    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[via], &ledger, &stop, 0xc1a5_7e12).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        ledger.acked_blocks() > 0,
        "writes were acknowledged before the kill"
    );
    c.nodes[leader_idx].kill9();
    let killed_at = Instant::now();

    // A new leader serves within seconds: acknowledgements resume.
    let at_kill = ledger.acked_seqs();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if ledger.acked_seqs() != at_kill {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no write acknowledged within 20 s of killing the leader"
        );
    }
    let resumed_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap().acked;
    }
    assert!(acked > 0 && ledger.acked_blocks() > 0);
    eprintln!("writes acknowledged: {acked}; writes resumed {resumed_after:?} after the kill");

    let new_leader = c.leader_of_main(via).expect("a new leader");
    assert_ne!(new_leader, leader);

    // Every surviving replica, DR learners included, returns the last
    // acknowledged data, and they are identical block for block.
    let mut first: Option<Vec<Vec<u8>>> = None;
    for i in (0..c.nodes.len()).filter(|i| *i != leader_idx) {
        let blocks = read_all(&c.nodes[i]).await;
        check_against_ledger(&blocks, &ledger, c.nodes[i].node_id);
        match &first {
            None => first = Some(blocks),
            Some(f) => assert!(*f == blocks, "node {} differs", c.nodes[i].node_id),
        }
    }

    // The killed node comes back, catches up from the log and agrees.
    c.nodes[leader_idx].start().unwrap();
    let back = read_all(&c.nodes[leader_idx]).await;
    assert!(
        first.as_ref().unwrap() == &back,
        "restarted ex-leader differs"
    );

    // The leader reports the DR learners' lag (the live RPO) in status and
    // in /metrics.
    let leader_idx = c.index_of(new_leader);
    let status = c.nodes[leader_idx].must_cli(&["status", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let main = pg_named(&v, "t/main").unwrap().clone();
    let lag = main["lag"].as_array().unwrap();
    assert!(
        lag.iter()
            .filter(|l| l["site"] == "dr" && l["voter"] == false)
            .count()
            == 2,
        "{main}"
    );
    let (code, metrics) =
        lifeboat_chaos_tests::harness::http_get(c.nodes[leader_idx].http, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("lifeboat_replication_lag_seconds{") && metrics.contains("site=\"dr\""),
        "{metrics}"
    );
    for n in &mut c.nodes {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}

/// Opens `t/v` on `node`, waiting while the node does not host it yet.
/// Writes `block` with content `seq` through `client`, recording it in
/// `ledger` as in flight, then as acknowledged; returns how long it took.
pub(crate) async fn ledgered_write(
    client: &NbdClient,
    ledger: &Ledger,
    block: u64,
    seq: u64,
) -> Duration {
    ledger.sending(block, seq);
    let started = Instant::now();
    client
        .write(block * 4096, &block_content(block, seq, 4096), false)
        .await
        .unwrap()
        .unwrap();
    ledger.acked(block, seq);
    started.elapsed()
}

pub(crate) async fn connect_when_served(node: &TestNode) -> NbdClient {
    let started = Instant::now();
    loop {
        match NbdClient::connect(node.nbd, "t/v").await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "node {} never served t/v: {e}\n{}",
                    node.node_id,
                    node.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// SIGKILL of every node at once loses nothing acknowledged; then a dead DR
/// node is removed and a new one added, which receives the PG and serves
/// the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_sigkill_then_a_dr_node_is_replaced() {
    let mut c = Cluster::start(3, 2);
    // `node add` again for a member is refused by the member itself.
    let again = c.nodes[0].cli(&["node", "add", &c.nodes[1].endpoint()]);
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    let ledger = Ledger::default();
    let client = NbdClient::connect(c.nodes[0].nbd, "t/v").await.unwrap();
    for b in 0..BLOCKS {
        let seq = 1000 + b;
        client
            .write(b * 4096, &block_content(b, seq, 4096), false)
            .await
            .unwrap()
            .unwrap();
        ledger.acked(b, seq);
    }
    drop(client);

    for n in &mut c.nodes {
        n.kill9();
    }
    for n in &mut c.nodes {
        n.spawn().unwrap();
    }
    for n in &mut c.nodes {
        n.wait_healthy().unwrap();
    }
    for n in &c.nodes {
        let client = connect_when_served(n).await;
        let mut blocks = Vec::new();
        for b in 0..BLOCKS {
            blocks.push(client.read(b * 4096, 4096).await.unwrap().unwrap());
        }
        check_against_ledger(&blocks, &ledger, n.node_id);
    }

    // DR node 5 dies for good: remove it, add node 6 at dr in its place.
    c.nodes[4].kill9();
    c.nodes[0].must_cli(&["node", "remove", "5"]);
    let new = c.start_new_node(6, "dr");
    c.nodes[0].must_cli(&["node", "add", &new.endpoint(), "--site", "dr"]);
    let client = connect_when_served(&new).await;
    let mut blocks = Vec::new();
    for b in 0..BLOCKS {
        blocks.push(client.read(b * 4096, 4096).await.unwrap().unwrap());
    }
    check_against_ledger(&blocks, &ledger, 6);

    let list = c.nodes[0].must_cli(&["node", "list", "--output", "json"]);
    let nodes: serde_json::Value = serde_json::from_str(&list).unwrap();
    let by_id = |id: u64| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(5)["removed"], true, "{nodes}");
    assert_eq!(by_id(6)["reachable"], true, "{nodes}");
    assert_eq!(by_id(6)["catalog_role"], "learner", "{nodes}");
    // A removed node's id is never reused: node 5 coming back wiped, under
    // the same id, is refused.
    c.nodes[4].start_wiped().unwrap();
    let started = Instant::now();
    loop {
        let again = c.nodes[0].cli(&["node", "add", &c.nodes[4].endpoint()]);
        let err = String::from_utf8_lossy(&again.stderr).into_owned();
        if err.contains("node 5 already exists or existed") {
            assert_eq!(again.status.code(), Some(4), "{err}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "re-adding node 5: {:?} {err}\nits log:\n{}",
            again.status,
            c.nodes[4].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.nodes[4].kill9();
    let mut new = new;
    assert!(new.stop().unwrap());
    for n in &mut c.nodes[..4] {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}

/// Writes `blocks` whole blocks through `client`, recording each in `ledger`
/// with sequence numbers from `seq`.
async fn write_blocks(client: &NbdClient, ledger: &Ledger, blocks: std::ops::Range<u64>, seq: u64) {
    for b in blocks {
        let seq = seq + b;
        ledger.sending(b % BLOCKS, seq);
        client
            .write(
                (b % BLOCKS) * 4096,
                &block_content(b % BLOCKS, seq, 4096),
                false,
            )
            .await
            .unwrap()
            .unwrap();
        ledger.acked(b % BLOCKS, seq);
    }
}

/// The lines of `node`'s log about snapshots and purges (for a failure's
/// message).
fn log_lines_about_snapshots(node: &TestNode) -> String {
    node.log()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("snapshot") || l.contains("purg") || l.contains("conflict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The matched index the leader's `t/main` status reports for `node`.
pub(crate) fn matched_index_of(leader_status: &serde_json::Value, node: u64) -> u64 {
    leader_status["lag"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node"] == node)
        .and_then(|l| l["matched_index"].as_u64())
        .unwrap_or_else(|| panic!("no lag for node {node} in {leader_status}"))
}

/// Polls `node`'s status of `t/main` until `ready` holds, up to 30 s.
pub(crate) async fn wait_main_status(
    node: &TestNode,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_pg_status(node, "t/main", what, ready).await
}

/// Polls `node`'s status of PG `pg` until `ready` holds, up to 30 s.
pub(crate) async fn wait_pg_status(
    node: &TestNode,
    pg: &str,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let status = pg_status_of(node, pg);
        if let Some(s) = status.as_ref().filter(|s| ready(s)) {
            return s.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node {}: {what} never happened; last status of {pg}: {status:?}",
            node.node_id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The log is purged behind the slowest standby within its size limit: a
/// DR node that was down while less than half the limit was written catches
/// up from the log (it installs no snapshot); a DR node whose data is lost
/// is replaced after the log was purged past everything it had, and the new
/// node rebuilds through a Raft snapshot. All replicas end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_catches_up_from_the_log_and_a_lost_one_through_a_snapshot() {
    // 256 KiB of log: about 60 block writes.
    let mut c = Cluster::start_with(
        1,
        2,
        "[raft]\nlog_retain_bytes = 262144\nlog_check_interval_ms = 100\n",
    );
    let ledger = Ledger::default();
    let client = NbdClient::connect(c.nodes[0].nbd, "t/v").await.unwrap();

    // More than the limit with everyone up: the leader snapshots and purges.
    write_blocks(&client, &ledger, 0..96, 1_000).await;
    let purged = wait_main_status(&c.nodes[0], "a purge", |s| {
        s["snapshot_index"].as_u64() > Some(0) && s["log_first_index"].as_u64() > Some(1)
    })
    .await;
    assert!(
        purged["log_bytes"].as_u64().unwrap() <= 262_144,
        "the purge keeps the log within its limit: {purged}"
    );

    // DR node 2 is down while what fits in the leader's log is written:
    // a log past its limit is cut to half whoever lags (the snapshot path
    // below), so keep to half the room the log has left (the average
    // entry is smaller than a block write's: small commands are in it too;
    // two thirds once overran the limit on a loaded CI machine).
    let mut nudge = 200;
    let (room, per_entry) = loop {
        let within = wait_main_status(&c.nodes[0], "the leader's log within its limit", |s| {
            s["log_bytes"].as_u64().is_some_and(|b| b <= 262_144)
        })
        .await;
        let bytes = within["log_bytes"].as_u64().unwrap();
        let entries = within["last_log_index"].as_u64().unwrap() + 1
            - within["log_first_index"].as_u64().unwrap();
        let per_entry = (bytes / entries.max(1)).max(1);
        if 262_144 - bytes >= 3 * per_entry {
            break (262_144 - bytes, per_entry);
        }
        // Too little room: one more write takes the log past its limit,
        // and the leader cuts it to half (node 2 is up and keeps up).
        write_blocks(&client, &ledger, nudge..nudge + 1, 5_000).await;
        nudge += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let down_blocks = (room / 2 / per_entry).clamp(1, 16);
    let leader_applied = main_status_of(&c.nodes[0]).unwrap()["applied_index"].as_u64();
    wait_main_status(&c.nodes[1], "dr node 2 applies", |s| {
        s["applied_index"].as_u64() >= leader_applied
    })
    .await;
    c.nodes[1].kill9();
    write_blocks(&client, &ledger, 0..down_blocks, 10_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = main_status_of(&c.nodes[0]).unwrap();
    let matched2 = matched_index_of(&leader, 2);
    assert!(
        leader["log_first_index"].as_u64().unwrap() <= matched2 + 1,
        "the log keeps what the down standby lacks: {leader}"
    );
    c.nodes[1].start().unwrap();
    let dr2 = wait_main_status(&c.nodes[1], "dr node 2 catches up", |s| {
        s["applied_index"].as_u64() >= leader["applied_index"].as_u64()
    })
    .await;
    // Node 2 may build a snapshot of its own to keep its log short; it
    // must not have needed one from the leader.
    assert_eq!(
        dr2["snapshots_installed"].as_u64(),
        Some(0),
        "dr node 2 caught up from the log, not through a snapshot: {dr2}\n\
         leader before the restart: {leader}\nleader's log:\n{}\nnode 2's log:\n{}",
        log_lines_about_snapshots(&c.nodes[0]),
        log_lines_about_snapshots(&c.nodes[1]),
    );

    // DR node 3 loses its data; meanwhile more than the limit is written,
    // so the leader purges past everything node 3 had.
    let matched3 = matched_index_of(&leader, 3);
    c.nodes[2].kill9();
    write_blocks(&client, &ledger, 0..96, 20_000).await;
    wait_main_status(&c.nodes[0], "a purge past node 3", |s| {
        s["log_first_index"].as_u64() > Some(matched3 + 1)
    })
    .await;
    c.nodes[0].must_cli(&["node", "remove", "3"]);
    let mut new = c.start_new_node(4, "dr");
    c.nodes[0].must_cli(&["node", "add", &new.endpoint(), "--site", "dr"]);
    let leader_blocks = read_all(&c.nodes[0]).await;
    check_against_ledger(&leader_blocks, &ledger, 1);
    let new_client = connect_when_served(&new).await;
    drop(new_client);
    let rebuilt = read_all(&new).await;
    check_against_ledger(&rebuilt, &ledger, 4);
    assert!(rebuilt == leader_blocks, "the rebuilt node differs");
    let status4 = main_status_of(&new).unwrap();
    eprintln!("after the first purge: {purged}\nnode 2 back: {dr2}\nnode 4 rebuilt: {status4}");
    assert!(
        status4["snapshot_index"].as_u64() > Some(matched3)
            && status4["snapshots_installed"].as_u64() >= Some(1),
        "node 4 was built from a raft snapshot: {status4}"
    );
    assert!(
        read_all(&c.nodes[1]).await == leader_blocks,
        "node 2 differs"
    );

    assert!(new.stop().unwrap());
    for i in [0, 1] {
        assert!(c.nodes[i].stop().unwrap(), "node {} exits cleanly", i + 1);
    }
}
