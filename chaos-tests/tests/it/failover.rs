//! Moving a PG between sites under a write load (DESIGN.md "Failover"):
//! a planned switchover to the DR site and back loses no acknowledged write
//! (the ledger is the recorded history), the writers see a pause and no
//! error, and every replica at both sites ends identical.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::harness::http_get;
use lifeboat_chaos_tests::ledger::Ledger;
use lifeboat_chaos_tests::nbd_client::NbdClient;

use crate::cluster::{
    Cluster, check_against_ledger, pg_named, pg_status_of, read_all, spawn_writers, wait_pg_status,
    writers_stopped,
};

/// `lifeboat failover --planned --to SITE` through `node`, as JSON.
fn switch_over(c: &Cluster, via: usize, site: &str) -> serde_json::Value {
    let out = c.nodes[via].must_cli(&["failover", "--planned", "--to", site, "--output", "json"]);
    serde_json::from_str(&out).unwrap()
}

/// The node ids at `site`.
fn nodes_at(c: &Cluster, site: &str) -> Vec<u64> {
    c.nodes
        .iter()
        .filter(|n| n.site == site)
        .map(|n| n.node_id)
        .collect()
}

/// Checks that PG `t/main` is led from `site`, with voters only there, as
/// its leader reports it.
async fn assert_led_from(c: &Cluster, site: &str) {
    let here = nodes_at(c, site);
    let probe = c.nodes.iter().position(|n| n.site == site).unwrap();
    let status = wait_pg_status(&c.nodes[probe], "t/main", "a leader at the site", |s| {
        s["leader_node"].as_u64().is_some_and(|l| here.contains(&l))
    })
    .await;
    let leader = status["leader_node"].as_u64().unwrap();
    let leader_idx = c.nodes.iter().position(|n| n.node_id == leader).unwrap();
    let at_leader = wait_pg_status(&c.nodes[leader_idx], "t/main", "lag of every member", |s| {
        s["lag"]
            .as_array()
            .is_some_and(|l| l.len() == c.nodes.len() - 1)
    })
    .await;
    for l in at_leader["lag"].as_array().unwrap() {
        let voter = l["voter"].as_bool().unwrap();
        assert_eq!(
            voter,
            l["site"] == site,
            "after the switchover to {site}, only members there vote: {l}"
        );
    }
    let show = c.nodes[0].must_cli(&["pg", "show", "t/main", "--output", "json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["active_site"], site, "{show}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_under_load_loses_nothing_and_goes_back() {
    let c = Cluster::start(3, 2);
    // Refusals first: a site with no node, a PG that does not exist.
    let nowhere = c.nodes[0].cli(&["failover", "--planned", "--to", "elsewhere"]);
    assert!(!nowhere.status.success());
    let err = String::from_utf8_lossy(&nowhere.stderr);
    assert!(err.contains("site elsewhere has no node"), "{err}");
    let no_pg = c.nodes[0].cli(&["failover", "--planned", "--to", "dr", "--pg", "t/nope"]);
    assert!(!no_pg.status.success());
    let err = String::from_utf8_lossy(&no_pg.stderr);
    assert!(err.contains("t/nope"), "{err}");

    // Node 0 runs the switchover to DR: its steps are its events, which
    // an operator follows as they happen.
    let follower = c.nodes[0].spawn_cli(&["events", "--follow", "--output", "json"]);
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Through a primary node: its writes are forwarded to whichever node
    // leads, first at the primary site, then at DR, then back.
    let tasks = spawn_writers(&c.nodes[1], &ledger, &stop, 0x5_1c40).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = ledger.acked_blocks();
    assert!(before > 0, "writes were acknowledged before the switchover");

    let to_dr = switch_over(&c, 0, "dr");
    let pgs = to_dr["pgs"].as_array().unwrap();
    assert_eq!(pgs.len(), 1, "{to_dr}");
    assert_eq!(pgs[0]["name"], "t/main");
    assert_eq!(pgs[0]["from_site"], "primary");
    assert_eq!(pgs[0]["already"], false);
    let dr_nodes = nodes_at(&c, "dr");
    assert!(
        dr_nodes.contains(&pgs[0]["leader_node"].as_u64().unwrap()),
        "{to_dr}"
    );
    assert_led_from(&c, "dr").await;
    // Writes go on at the new site.
    let acked_after_switch = ledger.acked_seqs();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_ne!(
        ledger.acked_seqs(),
        acked_after_switch,
        "writes are acknowledged while DR leads"
    );
    // Again: nothing to do, and it says so.
    let again = switch_over(&c, 3, "dr");
    assert_eq!(again["pgs"][0]["already"], true, "{again}");

    let back = switch_over(&c, 4, "primary");
    assert_eq!(back["pgs"][0]["from_site"], "dr", "{back}");
    assert_led_from(&c, "primary").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let total = writers_stopped(tasks).await;
    eprintln!(
        "switchover to dr: {} ms, back: {} ms; {} writes acknowledged, {} failed, longest write {:?}",
        to_dr["took_ms"], back["took_ms"], total.acked, total.failed, total.longest
    );
    assert_eq!(
        total.failed, 0,
        "clients see a pause, not errors, during a planned switchover"
    );

    // Nothing acknowledged is lost, and every replica agrees once the
    // last writes have reached every member.
    let leader = pg_status_of(&c.nodes[0], "t/main").unwrap()["leader_node"]
        .as_u64()
        .unwrap();
    let leader_idx = c.nodes.iter().position(|n| n.node_id == leader).unwrap();
    let last = pg_status_of(&c.nodes[leader_idx], "t/main").unwrap()["last_log_index"]
        .as_u64()
        .unwrap();
    for n in &c.nodes {
        wait_pg_status(n, "t/main", "catch-up", |s| {
            s["applied_index"].as_u64() >= Some(last)
        })
        .await;
    }
    let reference = read_all(&c.nodes[0]).await;
    check_against_ledger(&reference, &ledger, c.nodes[0].node_id);
    for n in &c.nodes[1..] {
        assert!(read_all(n).await == reference, "node {} differs", n.node_id);
    }
    let followed = stop_and_read(follower);
    let kinds: Vec<String> = followed
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            e["kind"].as_str().unwrap().to_owned()
        })
        .collect();
    let position = |k: &str| kinds.iter().position(|x| x == k);
    assert!(
        position("switchover_started").is_some()
            && position("switchover_started") < position("switchover_done"),
        "{followed}"
    );
}

/// With a witness the catalog's voters are two primary nodes, two DR nodes
/// and the witness, so that it keeps a quorum when the whole primary site
/// is lost; the witness is never placed in a PG and holds no keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_keeps_the_catalog_when_the_primary_site_is_lost() {
    let mut c = Cluster::start_with_witness(3, 2);
    let witness = c.nodes.len() - 1;
    wait_catalog_spread(&c).await;
    let show = c.nodes[0].must_cli(&["pg", "show", "t/main", "--output", "json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let witness_id = c.nodes[witness].node_id;
    assert!(
        show["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["node"] != witness_id),
        "a witness holds no PG: {show}"
    );
    let refused = c.nodes[witness].cli(&["tenant", "create", "x"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("this node is a witness"), "{err}");

    // The primary site is lost; the catalog answers at DR.
    for n in &mut c.nodes[..3] {
        n.kill9();
    }
    let lost = Instant::now();
    loop {
        let out = c.nodes[3].cli(&["node", "join-token", "--site", "dr"]);
        if out.status.success() {
            break;
        }
        assert!(
            lost.elapsed() < Duration::from_secs(30),
            "the catalog never answered at DR: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "catalog write at DR {:?} after losing the primary site",
        lost.elapsed()
    );
    let list = c.nodes[4].must_cli(&["node", "list", "--output", "json"]);
    let nodes: serde_json::Value = serde_json::from_str(&list).unwrap();
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["reachable"], n["site"] != "primary", "{n}");
    }
    for n in &mut c.nodes[3..] {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}

/// Waits until the catalog's voters are two primary nodes, two DR nodes
/// and the witness (the last node), in the catalog and in the witness's
/// own Raft view.
async fn wait_catalog_spread(c: &Cluster) {
    let witness = c.nodes.len() - 1;
    let started = Instant::now();
    loop {
        let list = c.nodes[0].must_cli(&["node", "list", "--output", "json"]);
        let nodes: serde_json::Value = serde_json::from_str(&list).unwrap();
        let voters_at = |site: &str| {
            nodes
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["site"] == site && n["catalog_role"] == "voter")
                .count()
        };
        // The witness's own replica must have become a Raft voter too.
        let status = c.nodes[witness].must_cli(&["status", "--output", "json"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let pgs = status["pgs"].as_array().unwrap();
        let witness_votes = pgs.len() == 1 && pgs[0]["id"] == 0 && pgs[0]["role"] == "voter";
        if (voters_at("primary"), voters_at("dr"), voters_at("witness")) == (2, 2, 1)
            && witness_votes
        {
            assert!(
                nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n["site"] == "witness" && n["role"] == "witness"),
                "{nodes}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "catalog voters never spread: {nodes}\nwitness status: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The primary site cut off from the DR site and the witness while its
/// clients keep writing: the catalog's quorum is on the other side, so the
/// primary's lease is not renewed and its PG leader stops acknowledging
/// when it runs out (its own Raft quorum would go on committing). When the
/// cut heals the lease comes back and so do the acknowledgements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_catalog_stops_acknowledging_when_its_lease_runs_out() {
    const LEASE_MS: u64 = 1000;
    let (c, links) =
        Cluster::start_linked_with_witness(3, 2, &format!("[raft]\nlease_ms = {LEASE_MS}\n")).await;
    wait_catalog_spread(&c).await;
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[1], &ledger, &stop, 0x5b_1a1d).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        ledger.acked_blocks() > 0,
        "writes acknowledged before the cut"
    );

    links.cut_between("primary", "dr");
    links.cut_between("primary", "witness");
    let cut = Instant::now();
    let mut seen = ledger.acked_seqs();
    let mut last_ack = None;
    while cut.elapsed() < Duration::from_millis(LEASE_MS * 4) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = ledger.acked_seqs();
        if now != seen {
            seen = now;
            last_ack = Some(cut.elapsed());
        }
    }
    eprintln!("after the cut, writes were acknowledged for {last_ack:?} (lease {LEASE_MS} ms)");
    // The last grant may come after the cut: a catalog leader on the
    // primary side serves reads (grants) under its Raft leader lease until
    // it learns it lost its quorum, at most an election timeout (400 ms
    // with FAST_RAFT); no other catalog leader, hence no failover, can
    // exist meanwhile. Then the lease itself, then 300 ms of slack.
    let bound = Duration::from_millis(LEASE_MS + 400 + 300);
    assert!(
        last_ack.is_none_or(|t| t <= bound),
        "the cut-off primary acknowledged a write {last_ack:?} after the cut, past its {LEASE_MS} ms lease"
    );
    let (code, metrics) = http_get(c.nodes[1].http, "/metrics").unwrap();
    assert_eq!(code, 200);
    let remaining = metrics
        .lines()
        .find(|l| l.starts_with("lifeboat_lease_remaining_seconds "))
        .unwrap_or_else(|| panic!("no lease gauge:\n{metrics}"));
    assert_eq!(remaining.rsplit(' ').next(), Some("0.0"), "{remaining}");
    let events = c.nodes[1].must_cli(&["events", "--output", "json"]);
    assert!(events.contains("lease_expired"), "{events}");

    links.heal_all();
    let healed = Instant::now();
    let before = ledger.acked_seqs();
    wait_new_acks(
        &ledger,
        &before,
        healed,
        Duration::from_secs(30),
        "writes never resumed after the cut healed",
    )
    .await;
    eprintln!("writes resumed {:?} after the heal", healed.elapsed());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Node 1 (not necessarily the PG's leader, whose lease let the writes
    // resume) renews within a quarter of the lease.
    let regained = Instant::now();
    loop {
        let events = c.nodes[1].must_cli(&["events", "--output", "json"]);
        if events.contains("lease_regained") {
            break;
        }
        assert!(
            regained.elapsed() < Duration::from_secs(10),
            "node 1 never reported its lease back: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was acknowledged is there; what was refused may or may not be.
    check_against_ledger(&read_all(&c.nodes[0]).await, &ledger, c.nodes[0].node_id);
}

/// SIGINT to a running CLI command, then everything it printed.
fn stop_and_read(mut child: std::process::Child) -> String {
    use std::io::Read;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{out}");
    out
}

/// Waits until the ledger has an acknowledgement it did not have in
/// `before`, for at most `limit` from `since`; panics saying `what` did
/// not happen.
async fn wait_new_acks(
    ledger: &Ledger,
    before: &[(u64, u64)],
    since: Instant,
    limit: Duration,
    what: &str,
) {
    while ledger.acked_seqs() == before {
        assert!(since.elapsed() < limit, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The writers get new acknowledgements (at DR) within 30 s, write on
/// for half a second, then stop.
async fn resume_then_stop(
    ledger: &Ledger,
    acked_at_loss: &[(u64, u64)],
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<crate::cluster::WriterStats>>,
) {
    wait_new_acks(
        ledger,
        acked_at_loss,
        Instant::now(),
        Duration::from_secs(30),
        "writes never resumed at DR",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Every acknowledged write is on each of `nodes` once t/main's last entry
/// (as its `leader` has it) has reached them, and they hold the same
/// blocks; returns those blocks.
async fn holding_the_ledger(
    c: &Cluster,
    leader: u64,
    nodes: &[lifeboat_chaos_tests::harness::TestNode],
    ledger: &Ledger,
) -> Vec<Vec<u8>> {
    let leader_idx = c.nodes.iter().position(|n| n.node_id == leader).unwrap();
    let last = pg_status_of(&c.nodes[leader_idx], "t/main").unwrap()["last_log_index"]
        .as_u64()
        .unwrap();
    for n in nodes {
        wait_pg_status(n, "t/main", "catch-up", |s| {
            s["applied_index"].as_u64() >= Some(last)
        })
        .await;
    }
    let reference = read_all(&nodes[0]).await;
    check_against_ledger(&reference, ledger, nodes[0].node_id);
    for n in &nodes[1..] {
        assert!(
            read_all(n).await == reference,
            "node {} differs from node {}",
            n.node_id,
            nodes[0].node_id
        );
    }
    reference
}

/// With `auto_failover_after_ms` set, a healthy site is never failed
/// over, and a lost one is by the catalog's leader on its own: the whole
/// primary site killed under a write load (`remote` ack), the PG is led
/// from DR at generation 1 with no command, the writers go on there, and
/// every acknowledged write is at DR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_site_fails_over_by_itself_when_configured() {
    const AFTER_MS: u64 = 2000;
    let mut c = Cluster::start_with_witness_and(
        3,
        2,
        &format!("[raft]\nlease_ms = 1000\nauto_failover_after_ms = {AFTER_MS}\n"),
    );
    wait_catalog_spread(&c).await;
    c.nodes[0].must_cli(&["pg", "set-ack", "t/main", "remote"]);
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[3], &ledger, &stop, 0xa0_70f).await;
    // Longer than the configured silence: a site that renews its lease
    // stays where it is.
    tokio::time::sleep(Duration::from_millis(AFTER_MS + 1500)).await;
    let generation = |n: &lifeboat_chaos_tests::harness::TestNode| {
        let show = n.must_cli(&["pg", "show", "t/main", "--output", "json"]);
        let show: serde_json::Value = serde_json::from_str(&show).unwrap();
        (
            show["generation"].as_u64().unwrap(),
            show["active_site"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(generation(&c.nodes[3]), (0, "primary".to_owned()));
    assert!(ledger.acked_blocks() > 0);
    for n in &mut c.nodes[..3] {
        n.kill9();
    }
    let lost = Instant::now();
    let acked_at_loss = ledger.acked_seqs();
    while generation(&c.nodes[3]) != (1, "dr".to_owned()) {
        assert!(
            lost.elapsed() < Duration::from_secs(40),
            "no automatic failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "led from DR at generation 1 {:?} after the loss (silence {AFTER_MS} ms, lease 1000 ms)",
        lost.elapsed()
    );
    wait_new_acks(
        &ledger,
        &acked_at_loss,
        lost,
        Duration::from_secs(60),
        "writes never resumed at DR",
    )
    .await;
    eprintln!("writes resumed at DR {:?} after the loss", lost.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let leader = pg_status_of(&c.nodes[3], "t/main").unwrap()["leader_node"]
        .as_u64()
        .unwrap();
    holding_the_ledger(&c, leader, &c.nodes[3..4], &ledger).await;
    // On the catalog's leader, wherever it is now.
    let events: String = c.nodes[3..]
        .iter()
        .map(|n| n.must_cli(&["events", "--output", "json"]))
        .collect();
    for kind in [
        "auto_failover_started",
        "failover_lease_wait",
        "failover_done",
        "auto_failover_done",
    ] {
        assert!(events.contains(kind), "{kind} missing: {events}");
    }
}

/// The whole primary site is lost under a write load (SIGKILL of every
/// primary node) with the `remote` ack policy: `failover --force` is
/// refused while the primary answers; once it is gone, the forced failover
/// waits out the old lease, starts generation 1 at DR from the standby
/// that holds the most, and the writers (connected to a DR node) go on.
/// Every write acknowledged before the loss is at DR, on both DR nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_primary_site_then_forced_failover_keeps_every_acknowledged_write() {
    let mut c = Cluster::start_with_witness(3, 2);
    wait_catalog_spread(&c).await;
    c.nodes[0].must_cli(&["pg", "set-ack", "t/main", "remote"]);
    let refused = c.nodes[3].cli(&["failover", "--force", "--to", "dr"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("the active site is not lost"), "{err}");

    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Through a DR node: forwarded to the primary leader, then served at
    // DR after the failover, on the same connections.
    let tasks = spawn_writers(&c.nodes[3], &ledger, &stop, 0xf0_4ce).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        ledger.acked_blocks() > 0,
        "writes acknowledged before the loss"
    );
    for n in &mut c.nodes[..3] {
        n.kill9();
    }
    let acked_at_loss = ledger.acked_seqs();

    let out = c.nodes[3].must_cli(&["failover", "--force", "--to", "dr", "--output", "json"]);
    let forced: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pg = &forced["pgs"][0];
    assert_eq!(pg["name"], "t/main", "{forced}");
    assert_eq!(pg["generation"], 1, "{forced}");
    assert!(
        nodes_at(&c, "dr").contains(&pg["leader_node"].as_u64().unwrap()),
        "{forced}"
    );
    eprintln!(
        "forced failover: {} ms from the command (lease 4000 ms waited), fork index {}, RPO at most {} ms",
        forced["took_ms"], pg["fork_index"], pg["rpo_upper_ms"]
    );
    // The writers go on at DR.
    resume_then_stop(&ledger, &acked_at_loss, &stop, tasks).await;
    let show = c.nodes[4].must_cli(&["pg", "show", "t/main", "--output", "json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(
        (show["generation"].as_u64(), show["active_site"].as_str()),
        (Some(1), Some("dr")),
        "{show}"
    );
    // Every acknowledged write, before the loss and after, is at DR, and
    // both DR nodes agree once the last write has reached both.
    let leader = pg["leader_node"].as_u64().unwrap();
    holding_the_ledger(&c, leader, &c.nodes[3..5], &ledger).await;
    let events = c.nodes[3].must_cli(&["events", "--output", "json"]);
    for kind in [
        "failover_started",
        "failover_lease_wait",
        "failover_forked",
        "failover_done",
    ] {
        assert!(events.contains(kind), "{kind} missing: {events}");
    }
    for n in &mut c.nodes[3..] {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}

/// No witness: the catalog's three voters are at the primary, so losing
/// the primary site loses the catalog's quorum too. A plain forced
/// failover then says so (instead of hanging on a catalog that cannot
/// commit) and `--catalog-lost` is refused while the catalog answers. Once
/// the primary is gone, `--catalog-lost` on a DR node rebuilds the catalog
/// there as a new cluster (new id, new CA, generation 1), fails the PG over
/// and removes the old nodes; the writers go on at DR, every write
/// acknowledged before the loss is there, NBD and S3 serve, the catalog
/// takes commands again, and the old primary nodes, restarted, are refused
/// by the rebuilt cluster and change nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_catalog_with_the_primary_rebuilds_it_at_dr() {
    use aws_sdk_s3::primitives::ByteStream;
    let mut c = Cluster::start(3, 2);
    c.nodes[0].must_cli(&["bucket", "create", "t/cat"]);
    let (key, secret) = c.nodes[0].must_create_credential("t");
    let s3_at = |n: &lifeboat_chaos_tests::harness::TestNode| {
        lifeboat_chaos_tests::s3_client::client(&format!("http://{}", n.s3), &key, &secret)
    };
    s3_at(&c.nodes[0])
        .put_object()
        .bucket("cat")
        .key("before")
        .body(ByteStream::from(b"kept across the rebuild".to_vec()))
        .send()
        .await
        .unwrap();
    let refused = c.nodes[3].cli(&["failover", "--force", "--catalog-lost", "--to", "dr"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("the catalog is not lost"), "{err}");
    let refused = c.nodes[3].cli(&[
        "failover",
        "--force",
        "--catalog-lost",
        "--to",
        "dr",
        "--pg",
        "t/main",
    ]);
    assert!(!refused.status.success(), "--catalog-lost moves every PG");

    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[3], &ledger, &stop, 0xca7_a109).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        ledger.acked_blocks() > 0,
        "writes acknowledged before the loss"
    );
    for n in &mut c.nodes[..3] {
        n.kill9();
    }
    let acked_at_loss = ledger.acked_seqs();

    let refused = c.nodes[3].cli(&["failover", "--force", "--to", "dr"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("the catalog has lost its quorum"), "{err}");

    let out = c.nodes[3].cli(&[
        "failover",
        "--force",
        "--catalog-lost",
        "--to",
        "dr",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}\nnode 4:\n{}\nnode 5:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.nodes[3].log_tail(),
        c.nodes[4].log_tail()
    );
    let out = String::from_utf8(out.stdout).unwrap();
    let forced: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rebuild = &forced["rebuild"];
    let dr = nodes_at(&c, "dr");
    let primary = nodes_at(&c, "primary");
    assert_eq!(rebuild["generation"], 1, "{forced}");
    assert_ne!(
        rebuild["cluster_id"], rebuild["previous_cluster_id"],
        "{forced}"
    );
    assert_eq!(rebuild["survivors"], serde_json::json!(dr), "{forced}");
    assert_eq!(rebuild["removed"], serde_json::json!(primary), "{forced}");
    let pg = &forced["pgs"][0];
    assert_eq!(
        (pg["name"].as_str(), pg["generation"].as_u64()),
        (Some("t/main"), Some(1)),
        "{forced}"
    );
    assert!(
        dr.contains(&pg["leader_node"].as_u64().unwrap()),
        "{forced}"
    );
    eprintln!(
        "catalog rebuilt and t/main failed over: {} ms from the command, catalog fork index {}",
        forced["took_ms"], rebuild["catalog_fork_index"]
    );

    resume_then_stop(&ledger, &acked_at_loss, &stop, tasks).await;

    // The rebuilt catalog takes commands, on either DR node, and knows the
    // cluster by its new identity.
    c.nodes[4].must_cli(&["volume", "create", "t/after", "--size", "1MiB"]);
    let status = c.nodes[4].must_cli(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["cluster_id"], rebuild["cluster_id"], "{status}");
    assert_eq!(status["cluster_generation"], 1, "{status}");
    let list = c.nodes[3].must_cli(&["node", "list", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&list).unwrap();
    for n in listed.as_array().unwrap() {
        assert_eq!(n["removed"], n["site"] == "primary", "{n}");
    }
    let object = s3_at(&c.nodes[4])
        .get_object()
        .bucket("cat")
        .key("before")
        .send()
        .await
        .unwrap();
    assert_eq!(
        object.body.collect().await.unwrap().into_bytes().as_ref(),
        b"kept across the rebuild"
    );

    // The old primary comes back: its nodes are refused by the rebuilt
    // cluster (another CA) and change nothing at DR.
    let leader = pg["leader_node"].as_u64().unwrap();
    let reference = holding_the_ledger(&c, leader, &c.nodes[3..5], &ledger).await;
    // Not waited for: an old node is healthy only once its old catalog
    // has a quorum again, which its site alone gives it.
    for n in &mut c.nodes[..3] {
        n.spawn().unwrap();
    }
    let back = Instant::now();
    while !c.nodes[3..5]
        .iter()
        .any(|n| n.log().contains("Raft connection refused"))
    {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "no old node was refused at DR:\n{}",
            c.nodes[3].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        read_all(&c.nodes[3]).await == reference,
        "the old site changed DR"
    );
    let show = c.nodes[4].must_cli(&["pg", "show", "t/main", "--output", "json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(
        (show["generation"].as_u64(), show["active_site"].as_str()),
        (Some(1), Some("dr")),
        "{show}"
    );
    // A new node joins the rebuilt cluster: its catalog member starts at
    // the catalog's generation (1), so it receives the catalog and serves
    // the cluster's commands.
    let mut new = c.start_new_node(7, "dr");
    c.nodes[3].must_cli(&["node", "add", &new.endpoint(), "--site", "dr"]);
    let joined = Instant::now();
    loop {
        let out = new.cli(&["volume", "list", "--output", "json"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("t/after") {
            break;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "the new node never served the rebuilt catalog: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            new.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.nodes[4].must_cli(&["volume", "create", "t/after-join", "--size", "1MiB"]);
    assert!(new.stop().unwrap(), "the new node exits cleanly");
    let events = c.nodes[3].must_cli(&["events", "--output", "json"]);
    for kind in [
        "catalog_rebuild_started",
        "cluster_adopted",
        "catalog_rebuilt",
        "failover_done",
        "node_removed",
    ] {
        assert!(events.contains(kind), "{kind} missing: {events}");
    }
    for n in &mut c.nodes[3..] {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
    for n in &mut c.nodes[..3] {
        n.kill9();
    }
}

/// Waits until `n` serves t/main at `generation` (90 s from `since`).
async fn wait_generation(
    n: &lifeboat_chaos_tests::harness::TestNode,
    generation: u64,
    since: Instant,
) {
    while pg_status_of(n, "t/main").is_none_or(|s| s["generation"] != generation) {
        assert!(
            since.elapsed() < Duration::from_secs(90),
            "node {} never served t/main at generation {generation}:\n{}",
            n.node_id,
            n.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The old primary comes back after a forced failover. The primary was
/// cut off from DR first (it kept its lease through the witness), so it
/// acknowledged writes that DR never received; then every primary node was
/// killed and the PG forced over to DR. Coming back, each old node finds
/// its member a generation behind the catalog: it stops it, carries what
/// it alone applied after the fork into the new generation as a
/// read-only divergence snapshot (`t/v-div-g0-nN`; a node whose log is a
/// prefix of one carried before only points at it), keeps its data as
/// the base of a delta resync and rejoins as a new member. Every acknowledged write is in the divergence
/// snapshot, the DR volume is untouched by the old site, and the old
/// nodes then serve the new generation only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_primary_returning_is_fenced_and_keeps_what_only_it_acknowledged() {
    use aws_sdk_s3::primitives::ByteStream;
    const LEASE_MS: u64 = 1000;
    let (mut c, links) =
        Cluster::start_linked_with_witness(3, 2, &format!("[raft]\nlease_ms = {LEASE_MS}\n")).await;
    wait_catalog_spread(&c).await;
    c.nodes[0].must_cli(&["bucket", "create", "t/bkt"]);
    let (key, secret) = c.nodes[0].must_create_credential("t");
    let s3_at = |n: &lifeboat_chaos_tests::harness::TestNode| {
        lifeboat_chaos_tests::s3_client::client(&format!("http://{}", n.s3), &key, &secret)
    };
    let primary_s3 = s3_at(&c.nodes[1]);
    for (k, body) in [("kept", &b"at the fork"[..]), ("replaced", &b"old"[..])] {
        primary_s3
            .put_object()
            .bucket("bkt")
            .key(k)
            .body(ByteStream::from(body.to_vec()))
            .send()
            .await
            .unwrap();
    }
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[1], &ledger, &stop, 0xd1_7e9e).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        ledger.acked_blocks() > 0,
        "writes acknowledged before the cut"
    );

    // DR has the objects before the cut.
    let primary_last = last_log_index_at_site(&c, "primary");
    wait_pg_status(&c.nodes[3], "t/main", "catch up before the cut", |s| {
        s["applied_index"].as_u64() >= Some(primary_last)
    })
    .await;
    // The catalog (here, its DR replica) records what the primary's
    // leader applied, from its lease renewals.
    let recorded = || {
        let shown = c.nodes[3].must_cli(&["pg", "show", "t/main", "--output", "json"]);
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        shown["progress"]["applied_index"].as_u64().unwrap_or(0)
    };
    let waited = Instant::now();
    while recorded() < primary_last {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the catalog recorded no progress up to {primary_last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("[returning] cutting primary from dr");
    // From here on only the primary gets what is written.
    links.cut_between("primary", "dr");
    // Objects only the primary acknowledges: a new one of three chunks
    // (a stream), a replaced one, a deleted one.
    let big: Vec<u8> = (0..(2 << 20) + 12_345)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    primary_s3
        .put_object()
        .bucket("bkt")
        .key("after-cut")
        .body(ByteStream::from(big.clone()))
        .send()
        .await
        .unwrap();
    primary_s3
        .put_object()
        .bucket("bkt")
        .key("replaced")
        .body(ByteStream::from(b"new".to_vec()))
        .send()
        .await
        .unwrap();
    primary_s3
        .delete_object()
        .bucket("bkt")
        .key("kept")
        .send()
        .await
        .unwrap();
    eprintln!("[returning] objects written after the cut");
    let at_cut = ledger.acked_seqs();
    let cut = Instant::now();
    wait_new_acks(
        &ledger,
        &at_cut,
        cut,
        Duration::from_secs(20),
        "the primary acknowledged nothing after the cut",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The writers stop (their connections are to a primary node, which is
    // about to go), then the whole primary site is lost.
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for n in &mut c.nodes[..3] {
        n.kill9();
    }

    eprintln!("[returning] primary killed; forcing");
    let out = c.nodes[3].must_cli(&["failover", "--force", "--to", "dr", "--output", "json"]);
    let forced: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fork = forced["pgs"][0]["fork_index"].as_u64().unwrap();
    let at_fork = read_all(&c.nodes[3]).await;

    eprintln!("[returning] forced: {forced}");
    links.heal_all();
    // The old nodes come back one after the other. Each fences its
    // member, carries what it alone has (unless a node back before it
    // already carried a log its own is a prefix of), and rejoins with a
    // new member at generation 1 (its record complete before its replica
    // goes).
    let mut took = Vec::new();
    for n in &mut c.nodes[..3] {
        let returned = Instant::now();
        n.start().unwrap();
        wait_generation(n, 1, returned).await;
        took.push(returned.elapsed());
    }
    eprintln!("the old nodes rejoined, one after the other, {took:?} after their restarts");
    let listed = c.nodes[3].must_cli(&["snapshot", "list", "--divergence", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let divergences = listed.as_array().unwrap();
    eprintln!(
        "fork index {fork}; divergences: {}",
        divergences
            .iter()
            .map(|d| format!(
                "node {} to {} (covered by {})",
                d["node"], d["last_index"], d["covered_by"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // One complete record per old node, in the order they came back: a
    // node is covered exactly when one back before it carried at least
    // as far (one leader wrote the whole cut, in one term).
    let by_node = |id: u64| {
        divergences
            .iter()
            .find(|d| d["node"] == id)
            .unwrap_or_else(|| panic!("no divergence from node {id}: {listed}"))
    };
    let mut carried: Vec<&serde_json::Value> = Vec::new();
    for n in &c.nodes[..3] {
        let d = by_node(n.node_id);
        assert_eq!(d["complete"], true, "{listed}");
        let last = d["last_index"].as_u64().unwrap();
        match carried
            .iter()
            .filter(|e| e["last_index"].as_u64() >= Some(last))
            .max_by_key(|e| e["last_index"].as_u64())
        {
            Some(by) => {
                assert_eq!(d["covered_by"], by["node"], "{listed}");
                assert_eq!(d["volumes"], serde_json::json!([]), "{listed}");
                assert_eq!(d["buckets"], serde_json::json!([]), "{listed}");
            }
            None => {
                assert!(d["covered_by"].is_null(), "{listed}");
                carried.push(d);
            }
        }
    }
    // The old leader applied every write it acknowledged, and every old
    // log is a prefix of the longest: the carried divergence with the
    // highest last index holds them all.
    let newest = *carried
        .iter()
        .max_by_key(|d| d["last_index"].as_u64())
        .unwrap();
    assert_eq!(newest["pg"], "t/main", "{listed}");
    assert_eq!(newest["generation"], 0, "{listed}");
    assert_eq!(newest["fork_index"].as_u64(), Some(fork), "{listed}");
    assert!(newest["last_index"].as_u64().unwrap() > fork, "{listed}");
    // The failover's reported bound on the time of lost writes is not
    // below what the old site really wrote after the fork.
    let lost_ms = newest["lost_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no stamps in {listed}"));
    let upper_ms = forced["pgs"][0]["rpo_upper_ms"].as_u64().unwrap();
    eprintln!("lost {lost_ms} ms of writes; the failover reported at most {upper_ms} ms");
    assert!(
        upper_ms >= lost_ms,
        "reported {upper_ms} ms, lost {lost_ms} ms"
    );
    // And its lower bound in entries is not above what the old site
    // really applied past the fork; the lineage keeps both.
    let lower = forced["pgs"][0]["rpo_lower_entries"].as_u64().unwrap();
    let lost_entries = newest["last_index"].as_u64().unwrap() - fork;
    eprintln!(
        "lost {lost_entries} entries; the failover reported at least {lower} ({} bytes)",
        forced["pgs"][0]["rpo_lower_bytes"]
    );
    assert!(
        lower <= lost_entries,
        "reported at least {lower} entries, lost {lost_entries}"
    );
    let shown = c.nodes[3].must_cli(&["pg", "show", "t/main", "--output", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let rpo = &shown["lineage"][0]["rpo"];
    assert_eq!(rpo["lower_entries"].as_u64(), Some(lower), "{shown}");
    assert_eq!(rpo["upper_ms"].as_u64(), Some(upper_ms), "{shown}");
    let volume = &newest["volumes"][0];
    assert_eq!(volume["volume"], "t/v", "{listed}");
    let clone = volume["clone"].as_str().unwrap();
    assert!(volume["blocks"].as_u64().unwrap() > 0, "{listed}");

    // Every acknowledged write is in the divergence snapshot, read at DR.
    let diverged = crate::cluster::read_volume(&c.nodes[3], clone).await;
    check_against_ledger(&diverged, &ledger, c.nodes[3].node_id);
    assert!(
        diverged != at_fork,
        "the divergence snapshot holds nothing new"
    );
    // It is read-only.
    let client = NbdClient::connect(c.nodes[3].nbd, clone).await.unwrap();
    assert!(
        client.write(0, &[7u8; 4096], false).await.unwrap().is_err(),
        "a divergence snapshot took a write"
    );
    // The objects only the old primary acknowledged are in the sealed
    // divergence bucket, over the bucket as it was at the fork.
    let bucket = &newest["buckets"][0];
    assert_eq!(bucket["bucket"], "bkt", "{listed}");
    assert_eq!(bucket["objects"], 3, "{listed}");
    let diverged_bucket = bucket["clone"].as_str().unwrap();
    let dr_s3 = s3_at(&c.nodes[3]);
    let get = |b: &str, k: &str| {
        let (b, k, s3) = (b.to_owned(), k.to_owned(), dr_s3.clone());
        async move {
            match s3.get_object().bucket(b).key(k).send().await {
                Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
                Err(e) => {
                    let e = e.into_service_error();
                    assert!(e.is_no_such_key(), "{e:?}");
                    None
                }
            }
        }
    };
    assert_eq!(get(diverged_bucket, "after-cut").await, Some(big));
    assert_eq!(
        get(diverged_bucket, "replaced").await,
        Some(b"new".to_vec())
    );
    assert_eq!(
        get(diverged_bucket, "kept").await,
        None,
        "deleted by the old site"
    );
    // The bucket itself is as it was at the fork.
    assert_eq!(get("bkt", "kept").await, Some(b"at the fork".to_vec()));
    assert_eq!(get("bkt", "replaced").await, Some(b"old".to_vec()));
    assert_eq!(get("bkt", "after-cut").await, None);
    let refused = dr_s3
        .put_object()
        .bucket(diverged_bucket)
        .key("x")
        .body(ByteStream::from(b"x".to_vec()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        refused.into_service_error().meta().code(),
        Some("AccessDenied"),
        "a divergence bucket took a write"
    );
    // The old site changed nothing at DR.
    assert!(
        read_all(&c.nodes[3]).await == at_fork,
        "the DR volume changed"
    );
    // The old nodes now serve the new generation, and only it.
    let dr_last = pg_status_of(&c.nodes[3], "t/main").unwrap()["last_log_index"]
        .as_u64()
        .unwrap();
    for n in &c.nodes[..3] {
        wait_pg_status(n, "t/main", "catch up at generation 1", |s| {
            s["applied_index"].as_u64() >= Some(dr_last)
        })
        .await;
        assert!(
            read_all(n).await == at_fork,
            "node {} serves something else than generation 1",
            n.node_id
        );
        let events = n.must_cli(&["events", "--output", "json"]);
        assert!(events.contains("\"fenced\""), "{events}");
    }
}

/// The furthest `t/main` log among the nodes of `site`: its leader's when
/// the leader is there. A follower's own log may lack what the leader has
/// acknowledged (a write sent to a follower is forwarded and acknowledged
/// once the leader applied it), so waiting for a follower's index can let
/// a test cut a link before the standbys have everything acknowledged
/// (seen under load: a failback test's object missing at DR's fork).
fn last_log_index_at_site(c: &Cluster, site: &str) -> u64 {
    c.nodes
        .iter()
        .filter(|n| n.site == site)
        .filter_map(|n| pg_status_of(n, "t/main")?["last_log_index"].as_u64())
        .max()
        .unwrap_or_else(|| panic!("no node at {site} reports t/main"))
}

/// One node's digest of its replica of t/main, while it holds still.
fn quiet_digest(n: &lifeboat_chaos_tests::harness::TestNode) -> Option<(u64, String)> {
    let out = n.cli(&["--output", "json", "pg", "digest", "t/main"]);
    if !out.status.success() {
        return None;
    }
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    d["quiet"].as_bool()?.then(|| {
        (
            d["applied_index"].as_u64().unwrap(),
            d["sha256"].as_str().unwrap().to_owned(),
        )
    })
}

/// Failback after a forced failover. The primary holds a data set, writes
/// a little more that DR never gets (cut off), and is lost; DR takes over
/// and changes a little, and keeps writing while the old nodes return.
/// They fence their members, and each rejoins the new generation by a
/// delta resync:
/// `failback prepare` waits for them and shows that each received about
/// what changed since the fork, not the data set. A planned failover then
/// goes back, and every replica at both sites is identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_moves_what_changed_and_leaves_both_sites_identical() {
    use aws_sdk_s3::primitives::ByteStream;
    use lifeboat_chaos_tests::data::pseudo_random;
    const LEASE_MS: u64 = 1000;
    const BASE_BYTES: usize = 8 << 20;
    const DR_BLOCKS_BYTES: usize = 256 << 10;
    const DR_OBJECT_BYTES: usize = 512 << 10;
    let (mut c, links) =
        Cluster::start_linked_with_witness(3, 2, &format!("[raft]\nlease_ms = {LEASE_MS}\n")).await;
    wait_catalog_spread(&c).await;
    c.nodes[0].must_cli(&["volume", "create", "t/base", "--size", "16MiB"]);
    c.nodes[0].must_cli(&["bucket", "create", "t/fbk"]);
    let (key, secret) = c.nodes[0].must_create_credential("t");
    let s3_at = |n: &lifeboat_chaos_tests::harness::TestNode| {
        lifeboat_chaos_tests::s3_client::client(&format!("http://{}", n.s3), &key, &secret)
    };
    // The data set, at the primary.
    let base = NbdClient::connect(c.nodes[1].nbd, "t/base").await.unwrap();
    for (i, chunk) in pseudo_random(0xba5e, BASE_BYTES)
        .chunks(1 << 20)
        .enumerate()
    {
        base.write((i << 20) as u64, chunk, true)
            .await
            .unwrap()
            .unwrap();
    }
    let primary_s3 = s3_at(&c.nodes[1]);
    for (k, seed) in [("one", 11), ("two", 12)] {
        primary_s3
            .put_object()
            .bucket("fbk")
            .key(k)
            .body(ByteStream::from(pseudo_random(seed, 1 << 20)))
            .send()
            .await
            .unwrap();
    }
    let primary_last = last_log_index_at_site(&c, "primary");
    // Every data node holds the data set (each old node's kept replica
    // is then the data set, and what it receives is the change).
    for n in c.nodes.iter().filter(|n| n.site != "witness") {
        wait_pg_status(n, "t/main", "catch up before the cut", |s| {
            s["applied_index"].as_u64() >= Some(primary_last)
        })
        .await;
    }
    // What only the old site acknowledges: 16 blocks.
    links.cut_between("primary", "dr");
    base.write(4 << 20, &pseudo_random(0xd1f, 16 * 4096), true)
        .await
        .unwrap()
        .unwrap();
    drop(base);
    for n in &mut c.nodes[..3] {
        n.kill9();
    }
    eprintln!("[failback] primary lost; forcing");
    let forced = c.nodes[3].must_cli(&["failover", "--force", "--to", "dr", "--output", "json"]);
    let forced: serde_json::Value = serde_json::from_str(&forced).unwrap();
    let fork = pg_named(&forced, "t/main").and_then(|p| p["fork_index"].as_u64());
    assert!(
        fork >= Some(primary_last),
        "DR forks after the data set it holds: {forced}"
    );

    // DR changes a little: 64 blocks, one new object, one deleted.
    let at_dr = NbdClient::connect(c.nodes[3].nbd, "t/base").await.unwrap();
    at_dr
        .write(1 << 20, &pseudo_random(0xd2, DR_BLOCKS_BYTES), true)
        .await
        .unwrap()
        .unwrap();
    drop(at_dr);
    let dr_s3 = s3_at(&c.nodes[3]);
    dr_s3
        .put_object()
        .bucket("fbk")
        .key("three")
        .body(ByteStream::from(pseudo_random(13, DR_OBJECT_BYTES)))
        .send()
        .await
        .unwrap();
    dr_s3
        .delete_object()
        .bucket("fbk")
        .key("one")
        .send()
        .await
        .unwrap();

    // The old site returns while DR's clients keep writing: each resync
    // reads one view, and the log carries the member on from there.
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&c.nodes[3], &ledger, &stop, 0xfb).await;
    links.heal_all();
    for n in &mut c.nodes[..3] {
        n.start().unwrap();
    }
    let out = c.nodes[3].must_cli(&[
        "failback",
        "prepare",
        "--site",
        "primary",
        "--timeout",
        "120",
        "--output",
        "json",
    ]);
    stop.store(true, Ordering::Relaxed);
    let written = writers_stopped(writers).await;
    eprintln!("[failback] writes at DR during the resyncs: {written:?}");
    assert!(written.acked > 0 && written.failed == 0, "{written:?}");
    let prepared: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("[failback] prepared: {prepared}");
    let main = pg_named(&prepared, "t/main").unwrap();
    assert_eq!(main["generation"], 1, "{prepared}");
    let members = main["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "a member on each old node: {prepared}");
    let changed = (DR_BLOCKS_BYTES + DR_OBJECT_BYTES) as u64 + written.acked * 4096;
    for m in members {
        assert!(
            m["applied_index"].as_u64() >= main["target_index"].as_u64(),
            "{prepared}"
        );
        let resync = &m["resync"];
        let held = resync["held_bytes"].as_u64().unwrap_or_else(|| {
            panic!(
                "node {} rejoined without a delta resync: {prepared}",
                m["node"]
            )
        });
        let received = resync["bytes_received"].as_u64().unwrap();
        eprintln!(
            "[failback] node {}: held {held} bytes, received {received} ({:.1}%), changed at DR {changed}",
            m["node"],
            received as f64 * 100.0 / held as f64
        );
        // At least what DR wrote before the writers (random data: it does
        // not compress) and at most a small multiple of all it wrote (a
        // rewritten block moves with its older version beside it): it
        // follows the changes. Its share of what the node held depends on
        // the writers' pace, each write being a new version.
        assert!(
            received >= (DR_BLOCKS_BYTES + DR_OBJECT_BYTES) as u64,
            "{prepared}"
        );
        assert!(received <= 3 * changed, "{prepared}");
        assert!(held >= BASE_BYTES as u64, "{prepared}");
        // Not a full copy: most of the node's segments were kept. (Its
        // bytes received may pass its bytes held: a node that resyncs
        // late receives every version DR wrote meanwhile. One did, at
        // 101% of held with 41 of 523 segments replaced.)
        let replaced = resync["replaced"].as_u64().unwrap();
        let segments = resync["segments"].as_u64().unwrap();
        assert!(replaced * 2 < segments, "{prepared}");
    }

    // The catalog keeps each node's resync for `pg show`.
    let shown = c.nodes[4].must_cli(&["pg", "show", "t/main", "--output", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let mut resynced: Vec<u64> = shown["resyncs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["node"].as_u64().unwrap())
        .collect();
    resynced.sort();
    assert_eq!(resynced, nodes_at(&c, "primary"), "{shown}");
    // Back to the primary, with nothing lost.
    let back = switch_over(&c, 3, "primary");
    eprintln!("[failback] back: {back}");
    let home_nodes = nodes_at(&c, "primary");
    assert!(
        back["pgs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["leader_node"]
                .as_u64()
                .is_some_and(|l| home_nodes.contains(&l))),
        "{back}"
    );
    // Every replica at both sites holds exactly the same.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let digests: Vec<Option<(u64, String)>> = c
            .nodes
            .iter()
            .filter(|n| n.site != "witness")
            .map(quiet_digest)
            .collect();
        if digests[0].is_some() && digests.iter().all(|d| *d == digests[0]) {
            eprintln!("[failback] every replica at {:?}", digests[0]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas differ after failback: {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let home = s3_at(&c.nodes[0]);
    let get = |k: &'static str| {
        let s3 = home.clone();
        async move {
            match s3.get_object().bucket("fbk").key(k).send().await {
                Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
                Err(e) => {
                    assert!(e.into_service_error().is_no_such_key());
                    None
                }
            }
        }
    };
    assert_eq!(get("one").await, None, "deleted at DR");
    assert_eq!(get("two").await, Some(pseudo_random(12, 1 << 20)));
    assert_eq!(get("three").await, Some(pseudo_random(13, DR_OBJECT_BYTES)));
    let home_base = NbdClient::connect(c.nodes[0].nbd, "t/base").await.unwrap();
    assert_eq!(
        home_base
            .read(1 << 20, DR_BLOCKS_BYTES as u32)
            .await
            .unwrap()
            .unwrap(),
        pseudo_random(0xd2, DR_BLOCKS_BYTES),
        "DR's writes are home"
    );
    assert_eq!(
        home_base.read(4 << 20, 4096).await.unwrap().unwrap(),
        pseudo_random(0xba5e, BASE_BYTES)[4 << 20..(4 << 20) + 4096],
        "the old site's write past the fork is only in its divergence snapshot"
    );
    check_against_ledger(&read_all(&c.nodes[0]).await, &ledger, c.nodes[0].node_id);
    for n in &c.nodes[..3] {
        let events = n.must_cli(&["events", "--output", "json"]);
        assert!(events.contains("\"resynced\""), "{events}");
        assert!(!events.contains("resync_abandoned"), "{events}");
    }
}
