//! A failover drill during heavy writes (DESIGN.md "Drills"): its clone at
//! the DR site reads exactly what the source held at the restore point
//! (checked against the primary's own replica of that point), it takes
//! writes of its own without touching production, production's writers
//! see no error and replication keeps its pace, the report carries RPO,
//! time to first I/O, checksums and lag, and `drill stop` leaves nothing
//! behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::harness::TestNode;
use lifeboat_chaos_tests::ledger::Ledger;
use lifeboat_chaos_tests::nbd_client::NbdClient;

use crate::cluster::{
    Cluster, check_against_ledger, read_all, read_volume, spawn_writers, writers_stopped,
};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `drill report ID --format json` through `node`.
fn report(node: &TestNode, id: u64) -> serde_json::Value {
    json(&node.must_cli(&["drill", "report", &id.to_string(), "--format", "json"]))
}

/// The PG ids `node` runs a member of.
fn running_pgs(node: &TestNode) -> Vec<u64> {
    let s = json(&node.must_cli(&["status", "--output", "json"]));
    s["pgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_during_heavy_writes_matches_its_source_and_leaves_nothing_behind() {
    let mut c = Cluster::start(3, 2);
    let dr = c.nodes.iter().position(|n| n.site == "dr").unwrap();
    let other_dr = c.nodes.iter().rposition(|n| n.site == "dr").unwrap();
    assert_ne!(dr, other_dr);

    // Refusals: a drill rehearses a failover to a standby site.
    let at_primary = c.nodes[0].cli(&["drill", "start", "--site", "primary", "--pg", "t/main"]);
    assert!(!at_primary.status.success());
    let err = String::from_utf8_lossy(&at_primary.stderr);
    assert!(err.contains("active at primary"), "{err}");
    let nowhere = c.nodes[0].cli(&["drill", "start", "--site", "elsewhere"]);
    assert!(!nowhere.status.success());
    let err = String::from_utf8_lossy(&nowhere.stderr);
    assert!(err.contains("site elsewhere has no data node"), "{err}");

    // A drill token runs drills and nothing else; a tenant token no drill.
    let token = json(&c.nodes[0].must_cli(&["drill", "token", "--output", "json"]));
    let drill_token = token["token"].as_str().unwrap().to_owned();
    let refused = c.nodes[0].cli_as(&drill_token, &["volume", "create", "t/x", "--size", "1MiB"]);
    assert!(!refused.status.success(), "a drill token creates no volume");
    let tenant =
        json(&c.nodes[0].must_cli(&["tenant", "token", "create", "t", "--output", "json"]));
    let tenant_token = tenant["token"].as_str().unwrap().to_owned();
    let refused = c.nodes[0].cli_as(&tenant_token, &["drill", "list"]);
    assert!(!refused.status.success(), "a tenant token runs no drill");

    // Heavy writes on the primary for the whole drill.
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(&c.nodes[1], &ledger, &stop, 0xd_1211).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(ledger.acked_blocks() > 0);

    // Started with the drill token through a primary node: the CLI finds
    // a DR node to run it.
    let started = Instant::now();
    let out = c.nodes[0].cli_as(
        &drill_token,
        &["drill", "start", "--site", "dr", "--output", "json"],
    );
    assert!(
        out.status.success(),
        "drill start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drill = json(&String::from_utf8_lossy(&out.stdout))[0].clone();
    eprintln!("drill started in {:?}: {drill}", started.elapsed());
    let id = drill["id"].as_u64().unwrap();
    assert_eq!(drill["state"], "running", "{drill}");
    assert_eq!(drill["site"], "dr");
    let pg = &drill["pgs"][0];
    assert_eq!(pg["source"], "t/main", "{drill}");
    assert_eq!(pg["pin"], format!("drill-{id}"));
    let clone = format!("t/drill-{id}-v");
    assert_eq!(pg["clones"][0]["name"], clone.as_str(), "{drill}");
    assert!(pg["index"].as_u64().unwrap() > 0);
    let acked_at_start = ledger.acked_seqs();

    // The clone at DR reads what the source held at the restore point, as
    // the primary's own replica of that point (the pin) reads it.
    let at_dr = read_volume(&c.nodes[dr], &clone).await;
    let pinned = read_volume(&c.nodes[0], &format!("t/v@drill-{id}")).await;
    assert!(
        at_dr == pinned,
        "the clone is the source at the restore point"
    );
    assert!(
        at_dr.iter().any(|b| b.iter().any(|x| *x != 0)),
        "the restore point holds writes"
    );

    // Replication keeps running: production writes go on and the lag is
    // sampled while the drill runs.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_ne!(
        ledger.acked_seqs(),
        acked_at_start,
        "writes go on during the drill"
    );
    let r = report(&c.nodes[0], id);
    eprintln!("report: {r}");
    let sums = &r["checksums"][0];
    assert_eq!(sums["match"], true, "{r}");
    assert_eq!(sums["blocks_written_by_drill"], 0, "{r}");
    let pg = &r["pgs"][0];
    assert!(
        pg["rpo_ms"].as_u64().is_some() && pg["rpo_entries"].as_u64().is_some(),
        "{r}"
    );
    assert!(
        pg["clones"][0]["first_io_after_ms"].as_u64().is_some(),
        "the first read of the clone is its RTO: {r}"
    );
    assert!(pg["lag_samples"].as_u64().unwrap() >= 1, "{r}");
    let lag = pg["lag_max_seconds"].as_f64().unwrap();
    assert!(lag < 5.0, "the lag stays within its normal bound: {r}");

    // The drill writes to its clone; production does not see it.
    let drill_client = NbdClient::connect(c.nodes[dr].nbd, &clone).await.unwrap();
    let mark = vec![0xd5u8; 4096];
    drill_client.write(0, &mark, true).await.unwrap().unwrap();
    assert_eq!(drill_client.read(0, 4096).await.unwrap().unwrap(), mark);
    drill_client.disconnect().await.unwrap();
    let source_now = read_volume(&c.nodes[0], "t/v").await;
    assert_ne!(
        source_now[0], mark,
        "production does not see the drill's write"
    );
    let r = report(&c.nodes[0], id);
    assert_eq!(r["checksums"][0]["match"], false, "{r}");
    assert_eq!(r["checksums"][0]["blocks_written_by_drill"], 1, "{r}");
    let md = c.nodes[0].must_cli(&["drill", "report", &id.to_string(), "--no-checksums"]);
    assert!(md.starts_with(&format!("# Drill {id}\n")), "{md}");
    let html = c.nodes[0].must_cli(&["drill", "report", &id.to_string(), "--format", "html"]);
    assert!(html.contains("<table"), "{html}");

    // A failover leaves the drill's PG where it is.
    let moved = c.nodes[0].cli(&[
        "failover",
        "--planned",
        "--to",
        "dr",
        "--pg",
        &format!("t/drill-{id}-main"),
    ]);
    assert!(!moved.status.success());
    assert!(
        String::from_utf8_lossy(&moved.stderr).contains("stop the drill"),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );

    // Stop, with the other DR node killed: nothing is left behind, there
    // too once it is back.
    c.nodes[other_dr].kill9();
    // Stop: nothing is left behind.
    let drill_pg = json(&c.nodes[0].must_cli(&[
        "pg",
        "show",
        &format!("t/drill-{id}-main"),
        "--output",
        "json",
    ]));
    let drill_pg_id = drill_pg["id"].as_u64().unwrap();
    let out = c.nodes[0].cli_as(
        &drill_token,
        &["drill", "stop", &id.to_string(), "--output", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(stopped[0]["state"], "stopped", "{stopped}");
    let pgs = c.nodes[0].must_cli(&["pg", "list", "--output", "json"]);
    assert!(!pgs.contains(&format!("drill-{id}")), "{pgs}");
    let snaps = c.nodes[0].must_cli(&["snapshot", "list", "t/main", "--output", "json"]);
    assert!(
        !snaps.contains(&format!("drill-{id}")),
        "the pin is gone: {snaps}"
    );
    assert!(
        NbdClient::connect(c.nodes[dr].nbd, &clone).await.is_err(),
        "the clone's export is gone"
    );
    c.nodes[other_dr].start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &c.nodes {
        while running_pgs(n).contains(&drill_pg_id) {
            assert!(
                Instant::now() < deadline,
                "node {} still runs the drill's PG",
                n.node_id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let listed = json(&c.nodes[0].must_cli(&["drill", "list", "--output", "json"]));
    assert_eq!(listed[0]["state"], "stopped", "the record stays: {listed}");
    let again = report(&c.nodes[0], id);
    assert_eq!(
        again["pgs"][0]["clones"][0]["name"],
        clone.as_str(),
        "{again}"
    );

    stop.store(true, Ordering::Relaxed);
    let total = writers_stopped(tasks).await;
    eprintln!(
        "{} writes acknowledged during the drill test, {} failed",
        total.acked, total.failed
    );
    assert_eq!(total.failed, 0, "production saw no error");
    check_against_ledger(&read_all(&c.nodes[0]).await, &ledger, c.nodes[0].node_id);
}
