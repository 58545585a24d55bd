//! The WAN between the sites is cut (a proxy per directed link, all of them
//! cut between primary and DR) under a write load:
//! - with the `local` ack policy the primary keeps acknowledging, the DR
//!   lag grows in status and /metrics, and after heal the DR site catches
//!   up and every replica is identical;
//! - with `remote`, a write waits for the standby, the PG degrades to
//!   `local` after remote_timeout_ms with an event and a metric, writes go
//!   on, and after heal the PG returns to `remote` by itself.
//!
//! And one link inside the active site is cut, between a PG's leader and
//! one follower: the PG keeps serving, and after heal the replicas agree.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::harness::http_get;
use lifeboat_chaos_tests::ledger::Ledger;
use lifeboat_chaos_tests::nbd_client::{NbdClient, NbdErrno};

use crate::cluster::{
    BLOCKS, Cluster, check_against_ledger, connect_when_served, ledgered_write, matched_index_of,
    pg_status_of, read_all, read_volume, spawn_writers, wait_pg_status,
};

/// The node leading `pg`, from node 0's status (node 0 is a primary voter).
fn leader_index(c: &Cluster, pg: &str) -> usize {
    let status = pg_status_of(&c.nodes[0], pg).expect("node 0 hosts the PG");
    let leader = status["leader_node"].as_u64().expect("a leader");
    c.nodes.iter().position(|n| n.node_id == leader).unwrap()
}

fn dr_lag_entries(leader_status: &serde_json::Value, dr_node: u64) -> u64 {
    leader_status["lag"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["node"] == dr_node)
        .and_then(|l| l["entries"].as_u64())
        .unwrap_or_else(|| panic!("no lag for node {dr_node}: {leader_status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_partition_under_load_with_local_ack_then_catch_up() {
    let (mut c, links) = Cluster::start_linked(3, 1, "").await;
    let dr = 3;
    let sites = c.nodes[0].must_cli(&["site", "list", "--output", "json"]);
    let sites: serde_json::Value = serde_json::from_str(&sites).unwrap();
    assert_eq!(
        sites,
        serde_json::json!([
            {"site": "dr", "nodes": 1, "reachable": 1, "catalog_voters": 0, "active_pgs": 0, "standby_pgs": 1},
            {"site": "primary", "nodes": 3, "reachable": 3, "catalog_voters": 3, "active_pgs": 1, "standby_pgs": 0},
        ])
    );
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[0], &ledger, &stop, 0xd1_5c0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    links.cut_between("primary", "dr");
    let acked_at_cut = ledger.acked_seqs();

    // The primary keeps acknowledging, and the DR node's lag grows.
    let leader = leader_index(&c, "t/main");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let lag1 = dr_lag_entries(&pg_status_of(&c.nodes[leader], "t/main").unwrap(), 4);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = pg_status_of(&c.nodes[leader], "t/main").unwrap();
    let lag2 = dr_lag_entries(&during, 4);
    assert!(
        ledger.acked_seqs() != acked_at_cut,
        "the primary acknowledged writes while the WAN was cut"
    );
    assert!(lag1 > 0 && lag2 > lag1, "DR lag grows: {lag1} then {lag2}");
    // Cut off, the DR node still serves reads of its replica as it is to a
    // client that opts in (`:stale`), at once.
    // A linearizable read there must reach the leader, so it cannot finish.
    let linearizable = NbdClient::connect(c.nodes[dr].nbd, "t/v").await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(2), linearizable.read(0, 4096)).await;
    assert!(
        waited.is_err(),
        "a linearizable read on a cut-off DR node waits"
    );
    let started = Instant::now();
    let stale = read_volume(&c.nodes[dr], "t/v:stale").await;
    assert_eq!(stale.len() as u64, BLOCKS);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stale reads do not wait for the leader ({:?})",
        started.elapsed()
    );
    // A write there is forwarded to the leader, and a linearizable read
    // asks it for a read index, over a link that now accepts connections
    // and never answers: both fail once the leader wait (15 s) is over,
    // rather than hang for as long as the cut lasts, with ESHUTDOWN, the
    // answer for a group whose leader cannot be reached (a client
    // reconnects).
    drop(linearizable);
    let dr_client = NbdClient::connect(c.nodes[dr].nbd, "t/v").await.unwrap();
    let started = Instant::now();
    let (write, read) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(45),
            dr_client.write(0, &[0x5a; 4096], true)
        ),
        tokio::time::timeout(Duration::from_secs(45), dr_client.read(0, 4096)),
    );
    let write = write.expect("a write on the cut-off DR node ends");
    assert_eq!(write.unwrap(), Err(NbdErrno::ESHUTDOWN));
    let read = read.expect("a linearizable read on the cut-off DR node ends");
    assert_eq!(read.unwrap().map(|_| ()), Err(NbdErrno::ESHUTDOWN));
    eprintln!(
        "forwarded write and read on the cut-off DR node failed after {:?}",
        started.elapsed()
    );
    drop(dr_client);
    let (code, metrics) = http_get(c.nodes[leader].http, "/metrics").unwrap();
    assert_eq!(code, 200);
    let series = format!("pg=\"{}\",node=\"4\"", during["id"]);
    let lag_line = metrics
        .lines()
        .find(|l| l.starts_with("lifeboat_replication_lag_entries{") && l.contains(&series))
        .unwrap_or_else(|| panic!("no lag series {series}:\n{metrics}"))
        .to_owned();
    let metric_lag: u64 = lag_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(metric_lag > 0, "{lag_line}");

    links.heal_all();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // The DR node catches up: it applies the leader's last index and reads
    // back exactly what every primary node returns.
    let last = pg_status_of(&c.nodes[leader], "t/main").unwrap()["last_log_index"].clone();
    wait_pg_status(&c.nodes[dr], "t/main", "DR catch-up", |s| {
        s["applied_index"].as_u64() >= last.as_u64()
    })
    .await;
    let after = wait_pg_status(&c.nodes[leader], "t/main", "DR lag back to 0", |s| {
        matched_index_of(s, 4) >= last.as_u64().unwrap()
    })
    .await;
    eprintln!(
        "DR lag during the cut: {lag1} then {lag2} entries; {} writes acknowledged; after heal: {}",
        ledger.acked_blocks(),
        after["lag"]
    );
    let reference = read_all(&c.nodes[0]).await;
    check_against_ledger(&reference, &ledger, 1);
    for n in &c.nodes[1..] {
        let blocks = read_all(n).await;
        assert!(blocks == reference, "node {} differs", n.node_id);
    }
    for n in &mut c.nodes {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_partition_with_remote_ack_degrades_then_returns() {
    const TIMEOUT_MS: u64 = 1500;
    let (mut c, links) =
        Cluster::start_linked(3, 1, &format!("[raft]\nremote_timeout_ms = {TIMEOUT_MS}\n")).await;
    c.nodes[0].must_cli(&["pg", "create", "t/db", "--ack", "remote"]);
    c.nodes[0].must_cli(&["volume", "create", "t/dbv", "--size", "1MiB", "--pg", "db"]);
    let shown = c.nodes[0].must_cli(&["pg", "show", "t/db", "--output", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["ack"], "remote", "{shown}");
    let pg_id = shown["id"].as_u64().unwrap();
    let leader = leader_index(&c, "t/db");

    let ledger = Ledger::default();
    let client = NbdClient::connect(c.nodes[0].nbd, "t/dbv").await.unwrap();
    let mut seq = 0u64;
    let mut write = async |block: u64| {
        seq += 1;
        ledgered_write(&client, &ledger, block, seq).await
    };
    for b in 0..8 {
        write(b).await;
    }
    // With the WAN up the PG is (or, once the DR learner has joined and
    // caught up, is again) `remote`.
    wait_pg_status(&c.nodes[leader], "t/db", "remote with the WAN up", |s| {
        s["ack_degraded"] == false && s["lag"].as_array().is_some_and(|l| l.len() == 3)
    })
    .await;
    let kinds_of = |node: &lifeboat_chaos_tests::harness::TestNode| {
        let events = node.must_cli(&["events", "--output", "json"]);
        let events: serde_json::Value = serde_json::from_str(&events).unwrap();
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["pg"] == pg_id)
            .filter_map(|e| e["kind"].as_str().map(str::to_owned))
            .collect::<Vec<String>>()
    };
    let events_before = kinds_of(&c.nodes[leader]).len();

    // Cut: the next write waits out the timeout for the standby, then the
    // PG degrades to local and the write is acknowledged.
    links.cut_between("primary", "dr");
    let waited = write(8).await;
    assert!(
        waited >= Duration::from_millis(TIMEOUT_MS - 100),
        "a remote write waited for the standby ({waited:?})"
    );
    for b in 9..BLOCKS {
        write(b).await;
    }
    let degraded = pg_status_of(&c.nodes[leader], "t/db").unwrap();
    assert_eq!(degraded["ack_degraded"], true, "{degraded}");
    let kinds = kinds_of(&c.nodes[leader]);
    assert_eq!(kinds[events_before..], ["ack_degraded"], "{kinds:?}");
    let (_, metrics) = http_get(c.nodes[leader].http, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("lifeboat_pg_ack_degraded{{pg=\"{pg_id}\"}} 1")),
        "{metrics}"
    );

    // Heal: once the standby has caught up the PG is `remote` again.
    links.heal_all();
    wait_pg_status(&c.nodes[leader], "t/db", "the return to remote", |s| {
        s["ack_degraded"] == false
    })
    .await;
    let kinds = kinds_of(&c.nodes[leader]);
    assert_eq!(
        kinds[events_before..],
        ["ack_degraded", "ack_restored"],
        "{kinds:?}"
    );
    assert!(
        c.nodes[leader]
            .must_cli(&["events"])
            .contains("ack_restored")
    );
    for b in 0..8 {
        write(b).await;
    }
    let (_, metrics) = http_get(c.nodes[leader].http, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("lifeboat_pg_ack_degraded{{pg=\"{pg_id}\"}} 0")),
        "{metrics}"
    );
    drop(client);
    // After catch-up a read on the DR node returns the latest data.
    let dr_blocks = read_volume(&c.nodes[3], "t/dbv").await;
    check_against_ledger(&dr_blocks, &ledger, 4);
    for n in &mut c.nodes {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}

/// One link cut inside the active site, between the leader of `t/main` and
/// one follower, both ways, while the PG is quiet and then written: the PG
/// keeps acknowledging writes through the third node (the cut-off follower
/// may campaign, but the node that still hears the leader refuses its
/// pre-vote), and after the heal all three serve the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_between_the_leader_and_one_follower_keeps_the_pg_serving() {
    let (mut c, links) = Cluster::start_linked(3, 0, "").await;
    let leader = leader_index(&c, "t/main");
    let cut_off = (0..3).find(|i| *i != leader).unwrap();
    let third = (0..3).find(|i| *i != leader && *i != cut_off).unwrap();
    let ledger = Ledger::default();
    // Every node serves `t/v` once its member of `t/main` runs; the cut
    // must fall between running members, so wait for all three.
    for n in &c.nodes {
        connect_when_served(n).await;
    }
    let client = connect_when_served(&c.nodes[third]).await;
    let mut seq = 0u64;
    let mut write = async |block: u64| {
        seq += 1;
        ledgered_write(&client, &ledger, block, seq).await
    };
    for b in 0..8 {
        write(b).await;
    }

    links.cut_between_nodes(leader, cut_off);
    // Quiet for several election timeouts (200–400 ms), then written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    for b in 0..BLOCKS {
        write(b).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "writes through the third node took {:?}",
        started.elapsed()
    );

    links.heal_all();
    let reference = read_all(&c.nodes[third]).await;
    check_against_ledger(&reference, &ledger, c.nodes[third].node_id);
    for n in &c.nodes {
        // Linearizable reads: each node's reads wait for its replica to
        // apply what the leader had committed when they were asked.
        connect_when_served(n).await;
        let blocks = read_all(n).await;
        assert!(
            blocks == reference,
            "node {} differs after the heal",
            n.node_id
        );
    }
    for n in &mut c.nodes {
        assert!(n.stop().unwrap(), "node {} exits cleanly", n.node_id);
    }
}
