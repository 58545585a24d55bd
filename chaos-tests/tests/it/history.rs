//! History across a two-site cluster, through the CLI: a department's own
//! token makes and locks snapshots but cannot delete them early, restores
//! its PG in place and undoes it but cannot roll back past a lock; every
//! replica, the DR node's included, reads snapshots and restored volumes
//! byte for byte alike.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::data::pseudo_random;
use lifeboat_chaos_tests::harness::TestNode;
use lifeboat_chaos_tests::nbd_client::NbdClient;

use crate::cluster::Cluster;

const PATTERN_BYTES: usize = 1 << 20;

/// The first PATTERN_BYTES of an export.
async fn head(node: &TestNode, export: &str) -> anyhow::Result<Vec<u8>> {
    let client = NbdClient::connect(node.nbd, export).await?;
    let mut out = Vec::with_capacity(PATTERN_BYTES);
    for i in 0..(PATTERN_BYTES >> 20) as u64 {
        let data = client
            .read(i << 20, 1 << 20)
            .await?
            .map_err(|e| anyhow::anyhow!("read: {e:?}"))?;
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// The CLI as tenant `t`'s token, expecting failure: its stderr.
fn must_fail(node: &TestNode, token: &str, args: &[&str]) -> String {
    let out = node.cli_as(token, args);
    assert!(
        !out.status.success(),
        "lifeboat {args:?} succeeded with a tenant token:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_snapshots_are_locked_and_every_replica_reads_them_alike() {
    let c = Cluster::start(3, 1);
    let primary = &c.nodes[0];
    let created: serde_json::Value = serde_json::from_str(
        &primary.must_cli(&["--output", "json", "tenant", "token", "create", "t"]),
    )
    .unwrap();
    let tenant_token = created["token"].as_str().unwrap().to_owned();
    let token_id = created["id"].as_str().unwrap().to_owned();
    let as_tenant = |args: &[&str]| {
        let out = primary.cli_as(&tenant_token, args);
        assert!(
            out.status.success(),
            "lifeboat {args:?} as tenant failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let client = NbdClient::connect(primary.nbd, "t/v").await.unwrap();
    let pattern = pseudo_random(11, PATTERN_BYTES);
    client.write(0, &pattern, true).await.unwrap().unwrap();
    assert!(head(primary, "t/v").await.unwrap() == pattern);
    // A moment after the pattern and before the snapshot (other 10 ms
    // timeline buckets on both sides).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let before_snapshot = lifeboat_snapshot::format_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    as_tenant(&[
        "snapshot",
        "create",
        "t/main",
        "--name",
        "before",
        "--lock-until",
        "+1d",
    ]);
    client
        .write(0, &pseudo_random(12, PATTERN_BYTES), true)
        .await
        .unwrap()
        .unwrap();
    assert!(head(primary, "t/v").await.unwrap() != pattern);
    let listed = as_tenant(&["snapshot", "list", "t/main"]);
    assert!(listed.contains("t/main@before"), "{listed}");

    // The tenant cannot delete it or shorten its lock; it may extend it.
    let e = must_fail(
        primary,
        &tenant_token,
        &["snapshot", "delete", "t/main@before"],
    );
    assert!(e.contains("locked until"), "{e}");
    let e = must_fail(
        primary,
        &tenant_token,
        &["snapshot", "lock", "t/main@before", "--until", "+1h"],
    );
    assert!(e.contains("locked until"), "{e}");
    as_tenant(&["snapshot", "lock", "t/main@before", "--until", "+2d"]);
    // Tenant tokens manage nothing but their tenant's things.
    let e = must_fail(primary, &tenant_token, &["tenant", "token", "list"]);
    assert!(e.contains("may not"), "{e}");

    // Every replica reads the snapshot alike: voters, and the DR learner
    // from its own copy (`:stale`), once it has applied the snapshot.
    for node in &c.nodes {
        let export = if node.site == "dr" {
            "t/v@before:stale"
        } else {
            "t/v@before"
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let read = loop {
            match head(node, export).await {
                Ok(read) => break read,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("node {} never served {export}: {e:#}", node.node_id),
            }
        };
        assert!(
            read == pattern,
            "node {} ({}) reads another snapshot",
            node.node_id,
            node.site
        );
    }

    // Restore in place, through the tenant's own token. The dry run shows
    // the plan; without a terminal the CLI will not act unasked.
    let plan = as_tenant(&["restore", "t/main", "--snapshot", "before", "--dry-run"]);
    assert!(plan.contains("t/main: restore in place to"), "{plan}");
    assert!(
        plan.contains("goes back") && plan.contains("256 blocks"),
        "{plan}"
    );
    let e = must_fail(
        primary,
        &tenant_token,
        &["restore", "t/main", "--snapshot", "before"],
    );
    assert!(e.contains("without confirmation"), "{e}");
    assert!(head(primary, "t/v").await.unwrap() != pattern);
    as_tenant(&["restore", "t/main", "--snapshot", "before", "--yes"]);
    // Rolling back to before the locked snapshot is refused to the tenant.
    let e = must_fail(
        primary,
        &tenant_token,
        &["restore", "t/main", "--at", &before_snapshot, "--yes"],
    );
    assert!(e.contains("locked until"), "{e}");
    let restored = head(primary, "t/v").await.unwrap();
    assert!(restored == pattern, "the volume is back at the snapshot");
    let after = pseudo_random(13, PATTERN_BYTES);
    client.write(0, &after, true).await.unwrap().unwrap();
    // Every replica agrees: same masks, same versions.
    for node in &c.nodes {
        let export = if node.site == "dr" {
            "t/v:stale"
        } else {
            "t/v"
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let read = head(node, export).await.ok();
            if read.as_deref() == Some(&after[..]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} ({}) never showed the write after the restore",
                node.node_id,
                node.site
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    as_tenant(&["restore", "t/main", "--undo", "--yes"]);
    assert!(
        head(primary, "t/v").await.unwrap() == pseudo_random(12, PATTERN_BYTES),
        "undo is back to just before the restore"
    );

    // The operator can, and the override is reported.
    primary.must_cli(&["snapshot", "delete", "t/main@before"]);
    let events = primary.must_cli(&["events"]);
    assert!(events.contains("snapshot_lock_overridden"), "{events}");

    // A revoked token is refused.
    primary.must_cli(&["tenant", "token", "revoke", &token_id]);
    let e = must_fail(primary, &tenant_token, &["snapshot", "list", "t/main"]);
    assert!(e.contains("token"), "{e}");
}

/// One node's digest of its replica of t/main, if it holds still.
fn digest(node: &TestNode) -> Option<(u64, u64, String)> {
    let out = node.cli(&["--output", "json", "pg", "digest", "t/main"]);
    if !out.status.success() {
        return None;
    }
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    d["quiet"].as_bool()?.then(|| {
        (
            d["applied_index"].as_u64().unwrap(),
            d["versions"].as_u64().unwrap(),
            d["sha256"].as_str().unwrap().to_owned(),
        )
    })
}

/// The history's GC runs in apply, so every replica — voters and the DR
/// learner alike — deletes exactly the same versions and ends up with
/// byte-identical history; what is pinned still reads the same everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_leaves_every_replica_with_the_same_versions() {
    let c = Cluster::start(3, 1);
    let primary = &c.nodes[0];
    let client = NbdClient::connect(primary.nbd, "t/v").await.unwrap();
    for round in 0..4u64 {
        client
            .write(0, &pseudo_random(40 + round, PATTERN_BYTES), true)
            .await
            .unwrap()
            .unwrap();
        if round == 0 {
            primary.must_cli(&["snapshot", "create", "t/main", "--name", "keep"]);
        }
    }
    let before = loop {
        if let Some((_, versions, _)) = digest(primary) {
            break versions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    primary.must_cli(&["pg", "set-window", "t/main", "1s"]);

    // Rounds 1 and 2 leave; round 0 is pinned and round 3 is the latest.
    let blocks = (PATTERN_BYTES / 4096) as u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    let agreed = loop {
        let digests: Vec<Option<(u64, u64, String)>> = c.nodes.iter().map(digest).collect();
        let first = digests[0].clone();
        let all_same = first.is_some() && digests.iter().all(|d| *d == first);
        if let (true, Some((index, versions, sha))) = (all_same, first)
            && versions + 2 * blocks <= before
        {
            break (index, versions, sha);
        }
        assert!(
            Instant::now() < deadline,
            "replicas never agreed after GC ({before} versions before): {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    assert!(
        agreed.1 >= 2 * blocks,
        "the pinned and the latest round stay: {agreed:?}"
    );

    for node in &c.nodes {
        let (pinned, latest) = if node.site == "dr" {
            ("t/v@keep:stale", "t/v:stale")
        } else {
            ("t/v@keep", "t/v")
        };
        assert!(
            head(node, pinned).await.unwrap() == pseudo_random(40, PATTERN_BYTES),
            "node {} reads the snapshot",
            node.node_id
        );
        assert!(
            head(node, latest).await.unwrap() == pseudo_random(43, PATTERN_BYTES),
            "node {} reads the latest",
            node.node_id
        );
    }
}
