//! Restore in place: a whole PG — volumes and buckets together — back to a
//! moment, with a dry run first, writes going on after it, `--undo` (and
//! an undo of the undo), locks that hold against tenants, and clear errors.

use aws_sdk_s3::Client;
use lifeboat_node::NodeError;
use lifeboat_node::core::Role;
use lifeboat_node::restore::{RestoreAction, RestoreKind};

use crate::history::{export_sha256, moment_between};
use crate::{VOLUME, VOLUME_BYTES, must_start, pseudo_random};

const BUCKET: &str = "r-objects";

/// The bucket's keys and bodies, in key order.
async fn bucket_contents(s3: &Client) -> Vec<(String, Vec<u8>)> {
    contents_of(s3, BUCKET).await
}

async fn contents_of(s3: &Client, bucket: &str) -> Vec<(String, Vec<u8>)> {
    let listed = s3
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("list");
    let mut out = Vec::new();
    for object in listed.contents() {
        let key = object.key().unwrap().to_owned();
        let body = s3
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e:?}"))
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes()
            .to_vec();
        out.push((key, body));
    }
    out
}

async fn put(s3: &Client, key: &str, body: &[u8]) {
    put_in(s3, BUCKET, key, body).await
}

async fn put_in(s3: &Client, bucket: &str, key: &str, body: &[u8]) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
}

/// A node whose bucket holds "a" (a1) and "b" (b1).
async fn node_with_a_and_b() -> (
    crate::TestNode,
    std::sync::Arc<lifeboat_node::core::NodeCore>,
    Client,
) {
    let node = must_start().await;
    let core = node.running().core.clone();
    core.create_bucket(&format!("demo/{BUCKET}"), "")
        .await
        .unwrap();
    let s3 = crate::demo_s3(&node).await;
    put(&s3, "a", b"a1").await;
    put(&s3, "b", b"b1").await;
    (node, core, s3)
}

fn owned(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_rolls_volumes_and_buckets_back_together_and_undo_returns() {
    let node = must_start().await;
    let core = node.running().core.clone();
    let tenant = Role::Tenant("demo".into());
    let addr = node.nbd();
    core.create_bucket(&format!("demo/{BUCKET}"), "")
        .await
        .unwrap();
    let s3 = crate::demo_s3(&node).await;
    // A client that stays connected through the restore.
    let live = node.client().await;

    // State A.
    live.write(0, &pseudo_random(1, 4 << 20), true)
        .await
        .unwrap()
        .unwrap();
    put(&s3, "a", b"a1").await;
    put(&s3, "b", b"b1").await;
    put(&s3, "c", b"c1").await;
    let volume_a = export_sha256(addr, VOLUME).await;
    let bucket_a = bucket_contents(&s3).await;
    let point_a = moment_between().await;

    // State B: overwrites, a partial block, a trim, a grown volume; an
    // overwritten, a deleted and a new object; a volume made since.
    live.write(1 << 20, &pseudo_random(2, 1 << 20), true)
        .await
        .unwrap()
        .unwrap();
    live.write(3 * 4096 + 7, &pseudo_random(3, 100), true)
        .await
        .unwrap()
        .unwrap();
    live.trim(3 << 20, 1 << 20).await.unwrap().unwrap();
    core.resize_volume(VOLUME, 2 * VOLUME_BYTES).await.unwrap();
    put(&s3, "a", b"a2").await;
    s3.delete_object()
        .bucket(BUCKET)
        .key("b")
        .send()
        .await
        .unwrap();
    put(&s3, "d", b"d2").await;
    core.create_volume("demo/later", 1 << 20, "").await.unwrap();
    let volume_b = export_sha256(addr, VOLUME).await;
    let bucket_b = bucket_contents(&s3).await;
    assert_ne!(volume_a, volume_b);
    assert_eq!(bucket_b, owned(&[("a", b"a2"), ("c", b"c1"), ("d", b"d2")]));
    let point_b = moment_between().await;

    // The dry run says what would happen and changes nothing.
    let plan = core
        .restore_pg("demo/main", &point_a, "", false, true, &tenant)
        .await
        .unwrap();
    assert!(!plan.applied);
    let item = |name: &str| {
        plan.items
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("{name} not in {:?}", plan.items))
            .clone()
    };
    let disk = item("disk0");
    assert_eq!(
        (disk.kind, disk.action, disk.size_then, disk.size_now),
        (
            RestoreKind::Volume,
            RestoreAction::Restore,
            VOLUME_BYTES,
            2 * VOLUME_BYTES
        )
    );
    // 256 blocks overwritten, 1 merged (block 3), 256 trimmed.
    assert_eq!(disk.changed, 513);
    assert_eq!(item("later").action, RestoreAction::LeftNew);
    let bucket = item(BUCKET);
    assert_eq!(
        (bucket.kind, bucket.action, bucket.changed),
        (RestoreKind::Bucket, RestoreAction::Restore, 3)
    );
    assert_eq!(export_sha256(addr, VOLUME).await, volume_b);
    assert_eq!(bucket_contents(&s3).await, bucket_b);

    // The restore: volumes and buckets together, sizes too.
    let done = core
        .restore_pg("demo/main", &point_a, "", false, false, &tenant)
        .await
        .unwrap();
    assert!(done.applied && !done.lock_overridden);
    assert_eq!(export_sha256(addr, VOLUME).await, volume_a);
    assert_eq!(bucket_contents(&s3).await, bucket_a);
    let reopened = node.client().await;
    assert_eq!(reopened.size_bytes(), VOLUME_BYTES, "the size then");
    // The client that stayed connected sees the restore too.
    assert!(
        live.read(1 << 20, 1 << 20).await.unwrap().unwrap()
            == pseudo_random(1, 4 << 20)[1 << 20..2 << 20]
    );
    // Made since the restore point, left as it is.
    assert!(
        core.list_volumes("demo")
            .unwrap()
            .iter()
            .any(|v| v.name == "later")
    );
    // The history before the restore is untouched.
    assert_eq!(
        export_sha256(addr, &format!("{VOLUME}@{point_b}")).await,
        volume_b
    );

    // Writes go on from the restored state.
    reopened
        .write(0, &pseudo_random(4, 4096), true)
        .await
        .unwrap()
        .unwrap();
    put(&s3, "e", b"e3").await;
    s3.delete_object()
        .bucket(BUCKET)
        .key("c")
        .send()
        .await
        .unwrap();
    let volume_c = export_sha256(addr, VOLUME).await;
    let bucket_c = bucket_contents(&s3).await;
    assert_eq!(bucket_c, owned(&[("a", b"a1"), ("b", b"b1"), ("e", b"e3")]));

    // Undo: back to just before the restore (what came after it is hidden
    // with it), the size too.
    let undone = core
        .restore_pg("demo/main", "", "", true, false, &tenant)
        .await
        .unwrap();
    assert!(undone.undoes.is_some());
    assert_eq!(export_sha256(addr, VOLUME).await, volume_b);
    assert_eq!(bucket_contents(&s3).await, bucket_b);
    assert_eq!(node.client().await.size_bytes(), 2 * VOLUME_BYTES);
    // And the undo undone: the restored state with the writes after it.
    core.restore_pg("demo/main", "", "", true, false, &tenant)
        .await
        .unwrap();
    assert_eq!(export_sha256(addr, VOLUME).await, volume_c);
    assert_eq!(bucket_contents(&s3).await, bucket_c);
    node.stop().await;
}

/// A restore rolls a writable bucket clone's own writes back, over a base
/// that no restore changes (it is the source at the cloned moment), and
/// `--undo` brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_rolls_a_writable_clone_back_over_its_base() {
    const DRILL: &str = "r-drill";
    let (node, core, s3) = node_with_a_and_b().await;
    let tenant = Role::Tenant("demo".into());
    core.clone_bucket(
        &format!("demo/{BUCKET}"),
        &format!("demo/{DRILL}"),
        "-0s",
        "",
        false,
    )
    .await
    .unwrap();
    put(&s3, "a", b"a2").await;
    put_in(&s3, DRILL, "c", b"c in the clone").await;
    s3.delete_object()
        .bucket(DRILL)
        .key("b")
        .send()
        .await
        .unwrap();
    let point = moment_between().await;
    let at_point = contents_of(&s3, DRILL).await;
    assert_eq!(at_point, owned(&[("a", b"a1"), ("c", b"c in the clone")]));
    put_in(&s3, DRILL, "a", b"a in the clone").await;
    put_in(&s3, DRILL, "d", b"d in the clone").await;
    let latest = contents_of(&s3, DRILL).await;

    let plan = core
        .restore_pg("demo/main", &point, "", false, true, &tenant)
        .await
        .unwrap();
    let drill = plan
        .items
        .iter()
        .find(|i| i.name == DRILL)
        .unwrap_or_else(|| panic!("the clone is not in {:?}", plan.items));
    assert_eq!(
        (drill.action, drill.changed),
        (RestoreAction::Restore, 2),
        "a and d were written in the clone since"
    );
    core.restore_pg("demo/main", &point, "", false, false, &tenant)
        .await
        .unwrap();
    assert_eq!(contents_of(&s3, DRILL).await, at_point);
    assert_eq!(
        bucket_contents(&s3).await,
        owned(&[("a", b"a2"), ("b", b"b1")]),
        "the source at the point"
    );
    core.restore_pg("demo/main", "", "", true, false, &tenant)
        .await
        .unwrap();
    assert_eq!(contents_of(&s3, DRILL).await, latest);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_past_a_lock_are_refused_to_tenants_and_bad_requests_explained() {
    let node = must_start().await;
    let core = node.running().core.clone();
    let tenant = Role::Tenant("demo".into());
    let client = node.client().await;
    client
        .write(0, &pseudo_random(1, 1 << 20), true)
        .await
        .unwrap()
        .unwrap();

    // Nothing to undo yet.
    let e = core
        .restore_pg("demo/main", "", "", true, true, &tenant)
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::NothingToUndo(_)), "{e}");

    let before = moment_between().await;
    client
        .write(0, &pseudo_random(2, 1 << 20), true)
        .await
        .unwrap()
        .unwrap();
    core.create_snapshot("demo/main", "kept", "", "+1d")
        .await
        .unwrap();
    client
        .write(0, &pseudo_random(3, 1 << 20), true)
        .await
        .unwrap()
        .unwrap();
    let latest = export_sha256(node.nbd(), VOLUME).await;

    // Rolling back past the locked snapshot: refused to the tenant (the
    // dry run does not ask the log, so it is not refused)...
    let e = core
        .restore_pg("demo/main", &before, "", false, false, &tenant)
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::RestorePastLock { .. }), "{e}");
    assert!(
        e.to_string().contains("demo/main@kept is locked until"),
        "{e}"
    );
    assert_eq!(export_sha256(node.nbd(), VOLUME).await, latest);
    // ...but back to the snapshot itself is not past it.
    core.restore_pg("demo/main", "", "kept", false, false, &tenant)
        .await
        .unwrap();
    assert!(
        client.read(0, 1 << 20).await.unwrap().unwrap() == pseudo_random(2, 1 << 20),
        "the volume as the snapshot pinned it"
    );
    // An operator may, and that is reported.
    let done = core
        .restore_pg("demo/main", &before, "", false, false, &Role::Operator)
        .await
        .unwrap();
    assert!(done.lock_overridden);
    assert!(client.read(0, 1 << 20).await.unwrap().unwrap() == pseudo_random(1, 1 << 20));
    assert!(
        core.events
            .list()
            .iter()
            .any(|e| e.kind == "snapshot_lock_overridden" && e.message.contains("restored"))
    );

    // Bad requests.
    let e = core
        .restore_pg("demo/main", "", "nope", false, true, &tenant)
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::SnapshotNotFound(_)), "{e}");
    let e = core
        .restore_pg(
            "demo/main",
            "1999-01-01T00:00:00Z",
            "",
            false,
            true,
            &tenant,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::BeforeHistory { .. }), "{e}");
    let e = core
        .restore_pg("demo/main", "yesterday-ish", "", false, true, &tenant)
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::RestorePoint(_)), "{e}");
    let e = core
        .restore_pg("demo/main", &before, "", true, true, &tenant)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--undo takes no"), "{e}");
    let e = core
        .restore_pg("demo/nope", &before, "", false, true, &tenant)
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::PgNotFound(_)), "{e}");
    node.stop().await;
}

/// A deleted bucket comes back under its name, empty as it was deleted,
/// and a read-only clone of a moment before its objects were deleted
/// shows them; a taken name or nothing to bring back is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_buckets_come_back_with_their_history() {
    let (node, core, s3) = node_with_a_and_b().await;
    let before = moment_between().await;
    for key in ["a", "b"] {
        s3.delete_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    s3.delete_bucket().bucket(BUCKET).send().await.unwrap();
    assert!(s3.head_bucket().bucket(BUCKET).send().await.is_err());

    let back = core
        .undelete_bucket(&format!("demo/{BUCKET}"))
        .await
        .unwrap();
    assert_eq!(back.name, BUCKET);
    assert!(
        bucket_contents(&s3).await.is_empty(),
        "empty, as it was deleted"
    );
    put(&s3, "c", b"c1").await;
    core.clone_bucket(&format!("demo/{BUCKET}"), "demo/r-then", &before, "", true)
        .await
        .unwrap();
    let then = s3.list_objects_v2().bucket("r-then").send().await.unwrap();
    let keys: Vec<&str> = then.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["a", "b"]);

    // Nothing deleted by that name any more; a name taken since.
    let e = core
        .undelete_bucket(&format!("demo/{BUCKET}"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("live bucket has this name"), "{e}");
    core.create_bucket("demo/r-other", "").await.unwrap();
    core.delete_bucket("demo/r-other").await.unwrap();
    core.create_bucket("demo/r-other", "").await.unwrap();
    let e = core.undelete_bucket("demo/r-other").await.unwrap_err();
    assert!(e.to_string().contains("live bucket has this name"), "{e}");
    let e = core.undelete_bucket("demo/r-never").await.unwrap_err();
    assert!(matches!(e, NodeError::BucketNotFound(_)), "{e}");
    node.stop().await;
}
