//! Accounting and tenant quotas: a PG's stored bytes are kept exactly in
//! apply and shown in status and the metrics; a tenant at its quota has
//! writes that add data refused (NBD ENOSPC, S3 QuotaExceeded) with a clear
//! message, while trims, deletes and every byte of its history stay.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::nbd_client::NbdErrno;
use lifeboat_node::NodeError;
use lifeboat_node::quota::CHECK_TTL;
use lifeboat_store::{PgId, usage};

use crate::gc::{demo_node_with_bucket, metric};
use crate::history::export_sha256;
use crate::{VOLUME, pseudo_random};

const BUCKET: &str = "q-objects";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_quota_is_refused_new_data_and_keeps_its_history() {
    let (node, core, pg, client, s3) = demo_node_with_bucket(
        |c, _| {
            c.history.gc_interval_ms = 100;
            c.history.census_interval_ms = 200;
            c.history.usage_report_interval_ms = 300;
        },
        BUCKET,
    )
    .await;

    // 4 MiB of incompressible data, then a snapshot of it.
    client
        .write(0, &pseudo_random(1, 4 << 20), true)
        .await
        .unwrap()
        .unwrap();
    core.create_snapshot("demo/main", "before-quota", "", "")
        .await
        .unwrap();
    let pinned = export_sha256(node.nbd(), &format!("{VOLUME}@before-quota")).await;
    let u = usage::usage(&core.db, pg).unwrap();
    assert_eq!(
        (u.stored_bytes, u.versions),
        usage::recount(&core.db, pg).unwrap(),
        "usage kept in apply against a recount"
    );
    assert!(
        u.stored_bytes >= 4 << 20 && u.stored_bytes < 5 << 20,
        "{} bytes stored for 4 MiB of random blocks",
        u.stored_bytes
    );

    // A quota 2 MiB above what is stored: a first 1 MiB write passes, and
    // by the time the verdict is renewed the next ones are refused.
    let quota = u.stored_bytes + (2 << 20);
    let t = core.set_tenant_quota("demo", Some(quota)).await.unwrap();
    assert_eq!(t.quota_bytes, quota);
    assert!(!t.over());
    let mut refused = None;
    for i in 0..12u64 {
        match client
            .write(i << 20, &pseudo_random(100 + i, 1 << 20), true)
            .await
            .unwrap()
        {
            Ok(()) => tokio::time::sleep(CHECK_TTL + Duration::from_millis(100)).await,
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, errno) = refused.expect("writes past the quota are refused");
    assert_eq!(errno, NbdErrno::ENOSPC);
    assert!(at >= 2, "refused after {at} MiB, under the quota");
    let over = core.tenant_usage("demo").unwrap();
    assert!(over.over(), "{over:?}");
    let e = core.check_quota(pg).unwrap_err();
    assert!(
        matches!(e, NodeError::QuotaExceeded { .. })
            && e.to_string().contains("tenant demo is at its quota")
            && e.to_string().contains("history and snapshots all count"),
        "{e}"
    );

    // S3 says so in its own terms, and nothing is stored.
    let before = usage::usage(&core.db, pg).unwrap();
    let put = s3
        .put_object()
        .bucket(BUCKET)
        .key("too-much")
        .body(pseudo_random(7, 1 << 20).into())
        .send()
        .await
        .unwrap_err();
    let service = put.into_service_error();
    let meta = aws_sdk_s3::error::ProvideErrorMetadata::meta(&service);
    assert_eq!(meta.code(), Some("QuotaExceeded"), "{meta:?}");
    assert!(
        meta.message().unwrap_or_default().contains("at its quota"),
        "{meta:?}"
    );
    // Making room is allowed: a trim and zeroes store nothing.
    client.trim(0, 1 << 20).await.unwrap().unwrap();
    client
        .write_zeroes(1 << 20, 1 << 20)
        .await
        .unwrap()
        .unwrap();
    s3.delete_object()
        .bucket(BUCKET)
        .key("absent")
        .send()
        .await
        .unwrap();
    let now = usage::usage(&core.db, pg).unwrap();
    assert_eq!(
        now.stored_bytes, before.stored_bytes,
        "zero markers weigh nothing and the refused body was never stored"
    );
    assert!(
        now.versions > before.versions && now.versions <= before.versions + 512,
        "at most the trim's and the zeroes' 512 markers were added: {before:?} -> {now:?}"
    );
    assert_eq!(
        (now.stored_bytes, now.versions),
        usage::recount(&core.db, pg).unwrap()
    );
    // No history was dropped to make room.
    assert_eq!(
        export_sha256(node.nbd(), &format!("{VOLUME}@before-quota")).await,
        pinned
    );
    assert!(core.metrics.writes_refused_quota.get() >= 2);

    // Status, the catalog's report and the metrics show the bytes.
    let settled = now_index(&core, pg);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reported = core.pg_named("demo/main").unwrap().stored_bytes;
        let census = usage::usage(&core.db, pg).unwrap().census;
        if reported == now.stored_bytes && census.is_some_and(|c| c.index >= settled) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "catalog has {reported}, store {}; census {census:?}",
            now.stored_bytes
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let census = usage::usage(&core.db, pg).unwrap().census.unwrap();
    // A day's window: what was overwritten is history, nothing pinned yet.
    assert_eq!(census.pinned_bytes, 0, "{census:?}");
    assert!(census.history_bytes >= 2 << 20, "{census:?}");
    assert!(census.live_bytes >= 2 << 20, "{census:?}");
    let series = format!(
        "lifeboat_pg_bytes{{pg=\"{}\",name=\"demo/main\",kind=\"stored\"}}",
        pg.0
    );
    assert_eq!(metric(&node, &series), now.stored_bytes);
    assert!(metric(&node, "lifeboat_writes_refused_quota_total") >= 2);

    // Without the quota, data goes in again.
    let t = core.set_tenant_quota("demo", None).await.unwrap();
    assert_eq!(t.quota_bytes, 0);
    client
        .write(0, &pseudo_random(9, 1 << 20), true)
        .await
        .unwrap()
        .unwrap();
    s3.put_object()
        .bucket(BUCKET)
        .key("fits")
        .body(pseudo_random(8, 1 << 20).into())
        .send()
        .await
        .unwrap();
    let e = core.set_tenant_quota("demo", Some(0)).await.unwrap_err();
    assert!(e.to_string().contains("remove the quota instead"), "{e}");
    assert!(matches!(
        core.set_tenant_quota("nobody", Some(1 << 30)).await,
        Err(NodeError::Replication(_) | NodeError::TenantNotFound(_))
    ));
    node.stop().await;
}

/// The PG's applied index now.
fn now_index(core: &lifeboat_node::core::NodeCore, pg: PgId) -> lifeboat_store::LogIndex {
    core.group(pg).unwrap().metrics().applied_index
}
