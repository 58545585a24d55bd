//! A PG's history: snapshots and times read back exactly what was there,
//! through read-only NBD exports `VOLUME@SNAPSHOT` and `VOLUME@TIME`;
//! locks hold against tenants; bad restore points get clear errors.

use std::time::Duration;

use lifeboat_chaos_tests::nbd_client::{NbdClient, NbdErrno};
use lifeboat_node::NodeError;
use lifeboat_node::core::Role;
use sha2::{Digest, Sha256};

use crate::{VOLUME, VOLUME_BYTES, must_run, must_start, pseudo_random};

const READ_BYTES: u32 = 1 << 20;

/// SHA-256 of a whole export, read in 1 MiB requests.
async fn whole_export_sha256(client: &NbdClient) -> String {
    let mut hash = Sha256::new();
    let mut offset = 0;
    while offset < client.size_bytes() {
        let len = READ_BYTES.min((client.size_bytes() - offset) as u32);
        hash.update(client.read(offset, len).await.unwrap().unwrap());
        offset += u64::from(len);
    }
    hex::encode(hash.finalize())
}

pub async fn export_sha256(addr: std::net::SocketAddr, export: &str) -> String {
    let client = NbdClient::connect(addr, export)
        .await
        .unwrap_or_else(|e| panic!("open {export}: {e:#}"));
    whole_export_sha256(&client).await
}

/// A moment strictly between two writes, as RFC 3339 with milliseconds:
/// waits so that the writes before and after it land in other 10 ms
/// timeline buckets.
pub async fn moment_between() -> String {
    tokio::time::sleep(Duration::from_millis(30)).await;
    let now = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(30)).await;
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_times_read_back_exactly_what_was_there() {
    let node = must_start().await;
    let core = node.running().core.clone();
    let client = node.client().await;
    let addr = node.nbd();

    // State A: a pattern over the first 8 MiB.
    client
        .write(0, &pseudo_random(1, 8 << 20), true)
        .await
        .unwrap()
        .unwrap();
    let state_a = whole_export_sha256(&client).await;
    let snap = core
        .create_snapshot("demo/main", "pattern", "", "")
        .await
        .unwrap();
    assert_eq!(snap.name, "pattern");
    let between_a_and_b = moment_between().await;

    // State B: overwrite whole blocks, part of a block, and trim.
    client
        .write(1 << 20, &pseudo_random(2, 2 << 20), true)
        .await
        .unwrap()
        .unwrap();
    client
        .write(5 * 4096 + 100, &pseudo_random(3, 999), true)
        .await
        .unwrap()
        .unwrap();
    client.trim(6 << 20, 1 << 20).await.unwrap().unwrap();
    let state_b = whole_export_sha256(&client).await;
    let between_b_and_c = moment_between().await;

    // State C: more writes after both moments.
    client
        .write(0, &pseudo_random(4, 4 << 20), true)
        .await
        .unwrap()
        .unwrap();
    let state_c = whole_export_sha256(&client).await;
    assert!(state_a != state_b && state_b != state_c);

    let at = |point: &str| format!("{VOLUME}@{point}");
    assert_eq!(export_sha256(addr, &at("pattern")).await, state_a);
    assert_eq!(export_sha256(addr, &at(&between_a_and_b)).await, state_a);
    assert_eq!(export_sha256(addr, &at(&between_b_and_c)).await, state_b);
    assert_eq!(export_sha256(addr, VOLUME).await, state_c);

    // A snapshot of a past moment pins that moment, not now.
    let past = core
        .create_snapshot("demo/main", "", &between_b_and_c, "")
        .await
        .unwrap();
    assert!(past.name.starts_with("snap-"), "{}", past.name);
    assert_eq!(export_sha256(addr, &at(&past.name)).await, state_b);

    // Exports of the past are read-only, and the size is the one then.
    let old = NbdClient::connect(addr, &at("pattern")).await.unwrap();
    assert_eq!(old.size_bytes(), VOLUME_BYTES);
    assert_eq!(
        old.write(0, &[1u8; 4096], true).await.unwrap(),
        Err(NbdErrno::EPERM)
    );
    core.resize_volume(VOLUME, 2 * VOLUME_BYTES).await.unwrap();
    let old = NbdClient::connect(addr, &at("pattern")).await.unwrap();
    assert_eq!(old.size_bytes(), VOLUME_BYTES, "the size at the snapshot");

    // A real client reads the snapshot too (qemu-img over the NBD URI).
    let copy = node.dir.path().join("pattern.raw");
    let uri = format!("nbd://{addr}/{}", at("pattern"));
    must_run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            copy.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), state_a);

    // Deleting the snapshot leaves times inside the history readable.
    core.delete_snapshot("demo/main", "pattern", &Role::Tenant("demo".into()))
        .await
        .unwrap();
    assert!(NbdClient::connect(addr, &at("pattern")).await.is_err());
    assert_eq!(export_sha256(addr, &at(&between_a_and_b)).await, state_a);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_hold_against_tenants_and_bad_points_are_explained() {
    let node = must_start().await;
    let core = node.running().core.clone();
    let tenant = Role::Tenant("demo".into());
    let snap = core
        .create_snapshot("demo/main", "kept", "", "+1d")
        .await
        .unwrap();
    assert!(snap.record.locked_until_ms > snap.record.created_ms + 86_000_000);

    let locked = |r: Result<_, NodeError>| {
        let e = r.expect_err("refused");
        assert!(matches!(e, NodeError::SnapshotLocked { .. }), "{e}");
        assert!(
            e.to_string().contains("demo/main@kept is locked until"),
            "{e}"
        );
    };
    locked(core.delete_snapshot("demo/main", "kept", &tenant).await);
    locked(
        core.lock_snapshot("demo/main", "kept", "+1h", &tenant)
            .await
            .map(|_| ()),
    );
    // Extending is allowed; the snapshot stays.
    let extended = core
        .lock_snapshot("demo/main", "kept", "+2d", &tenant)
        .await
        .unwrap();
    assert!(extended.record.locked_until_ms > snap.record.locked_until_ms);
    assert_eq!(core.list_snapshots("demo/main").await.unwrap().len(), 1);
    // An operator may, and it is reported.
    core.delete_snapshot("demo/main", "kept", &Role::Operator)
        .await
        .unwrap();
    assert!(
        core.events
            .list()
            .iter()
            .any(|e| e.kind == "snapshot_lock_overridden" && e.message.contains("demo/main@kept")),
        "override audited: {:?}",
        core.events.list()
    );
    assert!(core.list_snapshots("demo/main").await.unwrap().is_empty());

    // Bad input, each with its own clear error.
    fn err<T>(r: Result<T, NodeError>) -> String {
        r.map(|_| ()).expect_err("refused").to_string()
    }
    let e = err(core
        .create_snapshot("demo/main", "old", "2020-01-01T00:00:00Z", "")
        .await);
    assert!(
        e.contains("before the oldest restorable time of demo/main, 20"),
        "{e}"
    );
    let e = err(core
        .create_snapshot("demo/main", "x", "2999-01-01T00:00:00Z", "")
        .await);
    assert!(e.contains("is in the future"), "{e}");
    let e = err(core
        .create_snapshot("demo/main", "x", "yesterday", "")
        .await);
    assert!(e.contains("is not a time"), "{e}");
    let e = err(core.create_snapshot("demo/main", "a:b", "", "").await);
    assert!(e.contains("is not a snapshot name"), "{e}");
    let e = err(core.create_snapshot("demo/main", "x", "", "-1d").await);
    assert!(e.contains("is not a time"), "{e}");
    let e = err(core
        .create_snapshot("demo/main", "x", "", "2020-01-01T00:00:00Z")
        .await);
    assert!(e.contains("is not in the future"), "{e}");
    let e = err(core.show_snapshot("demo/main", "nope").await);
    assert!(e.contains("snapshot demo/main@nope does not exist"), "{e}");
    let e = err(core.delete_snapshot("demo/main", "nope", &tenant).await);
    assert!(e.contains("snapshot demo/main@nope does not exist"), "{e}");
    let e = err(core.revoke_tenant_token("0123456789ab").await);
    assert!(e.contains("no tenant token has id 0123456789ab"), "{e}");
    core.create_snapshot("demo/main", "twice", "", "")
        .await
        .unwrap();
    let e = err(core.create_snapshot("demo/main", "twice", "", "").await);
    assert!(e.contains("snapshot twice already exists"), "{e}");

    // Over NBD: unknown snapshot, malformed and future times are refused
    // at open, and the volume itself still opens.
    for bad in [
        "nope",
        "2026-13-01T00:00:00Z",
        "2999-01-01T00:00:00Z",
        "a b",
    ] {
        let name = format!("{VOLUME}@{bad}");
        assert!(
            NbdClient::connect(node.nbd(), &name).await.is_err(),
            "{name} refused"
        );
    }
    NbdClient::connect(node.nbd(), VOLUME).await.unwrap();
    node.stop().await;
}

/// Crash consistency across a PG: Y (on another volume, and as an object
/// in a bucket) is written only after X is acknowledged, so no restore
/// point — any time, any snapshot taken while writes run — shows Y
/// without X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_restore_point_shows_a_write_without_the_one_before_it() {
    const ROUNDS: u64 = 40;
    let node = must_start().await;
    let core = node.running().core.clone();
    core.create_volume("demo/disk1", VOLUME_BYTES, "")
        .await
        .unwrap();
    core.create_bucket("demo/y-objects", "").await.unwrap();
    let s3 = crate::demo_s3(&node).await;
    let addr = node.nbd();
    let x_volume = node.client().await;
    let y_volume = NbdClient::connect(addr, "demo/disk1").await.unwrap();
    let block = |tag: u8, round: u64| {
        let mut b = vec![tag; 4096];
        b[..8].copy_from_slice(&round.to_be_bytes());
        b
    };

    // Snapshots taken while the writes run, at whatever moment they land.
    let snapshotter = {
        let core = core.clone();
        tokio::spawn(async move {
            for i in 0..8 {
                core.create_snapshot("demo/main", &format!("during-{i}"), "", "")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let mut moments = Vec::new();
    for round in 0..ROUNDS {
        let offset = round * 4096;
        x_volume
            .write(offset, &block(b'X', round), true)
            .await
            .unwrap()
            .unwrap();
        y_volume
            .write(offset, &block(b'Y', round), true)
            .await
            .unwrap()
            .unwrap();
        s3.put_object()
            .bucket("y-objects")
            .key(format!("y/{round:03}"))
            .body(block(b'Y', round).into())
            .send()
            .await
            .unwrap();
        moments.push(
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    snapshotter.await.unwrap();

    let mut points: Vec<String> = moments;
    points.extend((0..8).map(|i| format!("during-{i}")));
    let len = (ROUNDS * 4096) as u32;
    let mut progress = Vec::new();
    for (i, point) in points.iter().enumerate() {
        // The bucket as it was then, through a read-only clone.
        let (at, snapshot) = match point.strip_prefix("during-") {
            Some(_) => ("", point.as_str()),
            None => (point.as_str(), ""),
        };
        let then = format!("y-then-{i}");
        core.clone_bucket(
            "demo/y-objects",
            &format!("demo/{then}"),
            at,
            snapshot,
            true,
        )
        .await
        .unwrap();
        let listed = s3.list_objects_v2().bucket(&then).send().await.unwrap();
        let objects: Vec<u64> = listed
            .contents()
            .iter()
            .map(|o| o.key().unwrap()[2..].parse().unwrap())
            .collect();
        if i < ROUNDS as usize {
            assert!(
                objects.len() > i,
                "moment after round {i} lists {} objects",
                objects.len()
            );
        }
        let x = NbdClient::connect(addr, &format!("{VOLUME}@{point}"))
            .await
            .unwrap();
        let y = NbdClient::connect(addr, &format!("demo/disk1@{point}"))
            .await
            .unwrap();
        let xs = x.read(0, len).await.unwrap().unwrap();
        let ys = y.read(0, len).await.unwrap().unwrap();
        let mut ys_seen = 0;
        for round in 0..ROUNDS {
            let r = (round * 4096) as usize..((round + 1) * 4096) as usize;
            let has_x = xs[r.clone()] == block(b'X', round)[..];
            let has_y = ys[r.clone()] == block(b'Y', round)[..];
            assert!(!has_y || has_x, "{point}: round {round} shows Y without X");
            let has_object = objects.contains(&round);
            assert!(
                !has_object || has_y,
                "{point}: round {round} shows its object without Y"
            );
            ys_seen += u64::from(has_y);
        }
        progress.push(ys_seen);
    }
    // Each moment was taken after its round's Y was acknowledged, so it
    // shows at least that many rounds; and the points are not all alike.
    for (round, seen) in progress.iter().take(ROUNDS as usize).enumerate() {
        assert!(
            *seen > round as u64,
            "moment after round {round} shows {seen} rounds"
        );
    }
    assert!(
        progress.iter().any(|p| *p < ROUNDS),
        "some restore point is before the last round: {progress:?}"
    );
    node.stop().await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Clones: writable, copy-on-write, isolated both ways, nested, and
/// readable whatever later happens to their source or its snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_are_isolated_and_outlive_their_source() {
    let node = must_start().await;
    let core = node.running().core.clone();
    let addr = node.nbd();
    let source = node.client().await;
    let mut at_snapshot = vec![0u8; VOLUME_BYTES as usize];
    let a = pseudo_random(21, 2 << 20);
    at_snapshot[..a.len()].copy_from_slice(&a);
    source.write(0, &a, true).await.unwrap().unwrap();
    core.create_snapshot("demo/main", "s", "", "")
        .await
        .unwrap();
    let mut source_model = at_snapshot.clone();
    let b = pseudo_random(22, 1 << 20);
    source_model[..b.len()].copy_from_slice(&b);
    source.write(0, &b, true).await.unwrap().unwrap();

    let info = core.clone_volume(VOLUME, "demo/c1", "", "s").await.unwrap();
    assert_eq!(info.size_bytes, VOLUME_BYTES);
    assert_eq!(
        export_sha256(addr, "demo/c1").await,
        sha256_hex(&at_snapshot)
    );
    let before_clone_writes = moment_between().await;

    // Writes to the clone: whole blocks, a sub-block write over a block
    // only the base has, and a trim of base data.
    let c1 = NbdClient::connect(addr, "demo/c1").await.unwrap();
    let mut c1_model = at_snapshot.clone();
    let c = pseudo_random(23, 1 << 20);
    c1_model[512 << 10..(512 << 10) + c.len()].copy_from_slice(&c);
    c1.write(512 << 10, &c, true).await.unwrap().unwrap();
    let small = pseudo_random(24, 100);
    let off = (1600 << 10) + 7;
    c1_model[off..off + small.len()].copy_from_slice(&small);
    c1.write(off as u64, &small, true).await.unwrap().unwrap();
    c1_model[1800 << 10..1900 << 10].fill(0);
    c1.trim(1800 << 10, 100 << 10).await.unwrap().unwrap();
    assert_eq!(whole_export_sha256(&c1).await, sha256_hex(&c1_model));
    // Neither the source nor its snapshot moved; the clone's past did not
    // either.
    assert_eq!(export_sha256(addr, VOLUME).await, sha256_hex(&source_model));
    assert_eq!(
        export_sha256(addr, &format!("{VOLUME}@s")).await,
        sha256_hex(&at_snapshot)
    );
    assert_eq!(
        export_sha256(addr, &format!("demo/c1@{before_clone_writes}")).await,
        sha256_hex(&at_snapshot)
    );

    // A clone of the clone, now; its writes stay its own.
    core.clone_volume("demo/c1", "demo/c2", "-0s", "")
        .await
        .unwrap();
    let c2 = NbdClient::connect(addr, "demo/c2").await.unwrap();
    assert_eq!(whole_export_sha256(&c2).await, sha256_hex(&c1_model));
    let mut c2_model = c1_model.clone();
    c2_model[..4096].fill(0xee);
    c2.write(0, &[0xee; 4096], true).await.unwrap().unwrap();
    assert_eq!(whole_export_sha256(&c2).await, sha256_hex(&c2_model));
    assert_eq!(whole_export_sha256(&c1).await, sha256_hex(&c1_model));

    // The source and its snapshot go; the clones read on.
    core.delete_snapshot("demo/main", "s", &Role::Operator)
        .await
        .unwrap();
    core.delete_volume(VOLUME).await.unwrap();
    assert_eq!(export_sha256(addr, "demo/c1").await, sha256_hex(&c1_model));
    assert_eq!(export_sha256(addr, "demo/c2").await, sha256_hex(&c2_model));

    // The source comes back whole, under its name, beside its clones.
    let back = core.undelete_volume(VOLUME).await.unwrap();
    assert_eq!(back.size_bytes, VOLUME_BYTES);
    assert_eq!(export_sha256(addr, VOLUME).await, sha256_hex(&source_model));
    assert_eq!(export_sha256(addr, "demo/c1").await, sha256_hex(&c1_model));

    // Bad requests.
    fn err<T>(r: Result<T, NodeError>) -> String {
        r.map(|_| ()).expect_err("refused").to_string()
    }
    let e = err(core.undelete_volume(VOLUME).await);
    assert!(e.contains("a live volume has this name"), "{e}");
    let e = err(core.undelete_volume("demo/never").await);
    assert!(
        e.contains("volume demo/never (deleted) does not exist"),
        "{e}"
    );
    let e = err(core.clone_volume("demo/c1", "demo/c3", "-1s", "s").await);
    assert!(e.contains("exactly one of --at and --snapshot"), "{e}");
    let e = err(core.clone_volume("demo/c1", "demo/c3", "", "").await);
    assert!(e.contains("exactly one of --at and --snapshot"), "{e}");
    let e = err(core.clone_volume("demo/c1", "demo/c3", "", "gone").await);
    assert!(e.contains("snapshot demo/main@gone does not exist"), "{e}");
    let e = err(core.clone_volume("demo/c1", "other/c3", "-0s", "").await);
    assert!(e.contains("stays in its source's tenant"), "{e}");
    let e = err(core.clone_volume("demo/c1", "demo/c2", "-0s", "").await);
    assert!(e.contains("taken"), "{e}");
    node.stop().await;
}

/// A schedule makes snapshots on the PG's leader every period and prunes
/// the scheduled ones by its retention, leaving people's snapshots and
/// locked ones alone; removing it stops both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_snapshot_and_prune_only_their_own() {
    use lifeboat_snapshot::Retention;
    let node = must_start().await;
    let core = node.running().core.clone();
    core.create_snapshot("demo/main", "mine", "", "")
        .await
        .unwrap();
    let keep_two = Retention {
        last: 2,
        ..Default::default()
    };
    let set = core
        .set_schedule("demo/main", "1s", keep_two)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((set.interval_ms, set.keep_last), (1000, 2));
    let scheduled = || async {
        core.list_snapshots("demo/main")
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.name.starts_with("auto-"))
            .collect::<Vec<_>>()
    };
    // Wait for the first, lock it, then let more come and go.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(s) = scheduled().await.first() {
            break s.name.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled snapshot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    core.lock_snapshot("demo/main", &first, "+1h", &Role::Operator)
        .await
        .unwrap();
    while core.metrics.scheduled_snapshots_pruned.get() < 2 {
        assert!(std::time::Instant::now() < deadline, "nothing pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = scheduled().await;
    let names: Vec<&str> = now.iter().map(|s| s.name.as_str()).collect();
    // The two newest, plus the locked first one.
    assert!(
        names.len() <= 3 && names.contains(&first.as_str()),
        "{names:?}"
    );
    assert!(core.show_snapshot("demo/main", "mine").await.is_ok());

    assert_eq!(
        core.set_schedule("demo/main", "", Retention::default())
            .await
            .unwrap(),
        None
    );
    let made = core.metrics.scheduled_snapshots.get();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(core.metrics.scheduled_snapshots.get(), made, "schedule off");
    let e = core
        .set_schedule("demo/main", "10ms", keep_two)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a period"), "{e}");
    node.stop().await;
}
