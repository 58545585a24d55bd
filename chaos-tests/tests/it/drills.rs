//! A failover drill during heavy writes (DESIGN.md "Drills"): its clones
//! at the DR site, of a volume and of a bucket, read exactly what the
//! source held at the restore point (checked against the primary's own
//! replica of that point), they take writes of their own without touching
//! production, production's writers
//! see no error and replication keeps its pace, the report carries RPO,
//! time to first I/O, checksums and lag, and `drill stop` leaves nothing
//! behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
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

/// The object `key` of `bucket`, or `None` if S3 says NoSuchKey.
async fn get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Option<Vec<u8>> {
    match s3.get_object().bucket(bucket).key(key).send().await {
        Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
        Err(e) => {
            let e = e.into_service_error();
            assert!(e.is_no_such_key(), "{e:?}");
            None
        }
    }
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, body: &[u8]) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
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

    // A bucket in the same PG: one small object, one of three chunks, and
    // one the drill will delete.
    c.nodes[0].must_cli(&["bucket", "create", "t/bkt"]);
    let (key, secret) = c.nodes[0].must_create_credential("t");
    let s3_at = |n: &TestNode| {
        lifeboat_chaos_tests::s3_client::client(&format!("http://{}", n.s3), &key, &secret)
    };
    let (primary_s3, dr_s3) = (s3_at(&c.nodes[1]), s3_at(&c.nodes[dr]));
    let big: Vec<u8> = (0..(2 << 20) + 777).map(|i| (i * 13 % 251) as u8).collect();
    put(&primary_s3, "bkt", "a", b"before the drill").await;
    put(&primary_s3, "bkt", "big", &big).await;
    put(&primary_s3, "bkt", "gone", b"deleted by the drill").await;

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
    let drill_bucket = format!("bkt-drill-{id}");
    assert_eq!(pg["clones"][1]["kind"], "bucket", "{drill}");
    assert_eq!(pg["clones"][1]["name"], drill_bucket.as_str(), "{drill}");
    let acked_at_start = ledger.acked_seqs();

    // The bucket's clone at DR shows the source's objects at the restore
    // point; production's later writes are not in it.
    put(&primary_s3, "bkt", "a", b"after the drill started").await;
    assert_eq!(
        get(&dr_s3, &drill_bucket, "a").await.as_deref(),
        Some(&b"before the drill"[..])
    );
    assert_eq!(get(&dr_s3, &drill_bucket, "big").await, Some(big.clone()));

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
    let bucket_sums = &r["checksums"][1];
    assert_eq!(bucket_sums["kind"], "bucket", "{r}");
    assert_eq!(bucket_sums["match"], true, "{r}");
    assert_eq!(bucket_sums["objects_written_by_drill"], 0, "{r}");
    let pg = &r["pgs"][0];
    assert!(
        pg["rpo_ms"].as_u64().is_some() && pg["rpo_entries"].as_u64().is_some(),
        "{r}"
    );
    assert!(
        pg["clones"][0]["first_io_after_ms"].as_u64().is_some(),
        "the first read of the clone is its RTO: {r}"
    );
    assert!(
        pg["clones"][1]["first_io_after_ms"].as_u64().is_some(),
        "and of the bucket's: {r}"
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
    // And to its bucket: a new object, a delete of one only the source
    // has (a marker over the source's), a create-only write refused over
    // one only the source has.
    put(&dr_s3, &drill_bucket, "mine", b"the drill's").await;
    dr_s3
        .delete_object()
        .bucket(&drill_bucket)
        .key("gone")
        .send()
        .await
        .unwrap();
    assert_eq!(get(&dr_s3, &drill_bucket, "gone").await, None);
    let appended: serde_json::Value = json(&c.nodes[0].must_cli(&[
        "--output",
        "json",
        "tenant",
        "credential",
        "create",
        "t",
        "--append-only",
    ]));
    let append_only = lifeboat_chaos_tests::s3_client::client(
        &format!("http://{}", c.nodes[dr].s3),
        appended["access_key"].as_str().unwrap(),
        appended["secret_key"].as_str().unwrap(),
    );
    let refused = append_only
        .put_object()
        .bucket(&drill_bucket)
        .key("a")
        .body(ByteStream::from(b"over the source's".to_vec()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        refused.into_service_error().meta().code(),
        Some("AccessDenied"),
        "an append-only credential cannot replace what the source had"
    );
    let listed = dr_s3
        .list_objects_v2()
        .bucket(&drill_bucket)
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["a", "big", "mine"]);
    assert_eq!(
        get(&primary_s3, "bkt", "gone").await.as_deref(),
        Some(&b"deleted by the drill"[..]),
        "production keeps what the drill deleted"
    );
    assert_eq!(get(&primary_s3, "bkt", "mine").await, None);
    let r = report(&c.nodes[0], id);
    assert_eq!(r["checksums"][0]["match"], false, "{r}");
    assert_eq!(r["checksums"][0]["blocks_written_by_drill"], 1, "{r}");
    assert_eq!(r["checksums"][1]["match"], false, "{r}");
    assert_eq!(r["checksums"][1]["objects_written_by_drill"], 2, "{r}");
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
    // And so does a failback prepare, at once rather than at its timeout.
    let prepared = c.nodes[0].cli(&[
        "failback",
        "prepare",
        "--site",
        "primary",
        "--pg",
        &format!("t/drill-{id}-main"),
    ]);
    assert!(!prepared.status.success());
    assert!(
        String::from_utf8_lossy(&prepared.stderr).contains("stop the drill"),
        "{}",
        String::from_utf8_lossy(&prepared.stderr)
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
    let gone = dr_s3
        .head_bucket()
        .bucket(&drill_bucket)
        .send()
        .await
        .unwrap_err();
    assert!(
        gone.into_service_error().is_not_found(),
        "the bucket's clone is gone"
    );
    assert_eq!(
        get(&primary_s3, "bkt", "a").await.as_deref(),
        Some(&b"after the drill started"[..])
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
