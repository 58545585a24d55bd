//! The admin API: tokens are required, bad names and sizes get clear
//! messages, volumes can be created, listed, resized and deleted.

use lifeboat_proto::admin as api;
use lifeboat_proto::admin::admin_client::AdminClient;
use tonic::Code;

use crate::{must_start, with_token};

/// A create request for `name` in the tenant's main protection group.
fn create(name: &str, size_bytes: u64) -> api::CreateVolumeRequest {
    api::CreateVolumeRequest {
        name: name.into(),
        size_bytes,
        pg: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_names_sizes_and_the_volume_lifecycle() {
    let node = must_start().await;
    let endpoint = format!("http://{}", node.running().admin_addr);
    let mut c = AdminClient::connect(endpoint).await.unwrap();
    let t = node.token.clone();

    // No token, a wrong token.
    let e = c
        .list_tenants(api::ListTenantsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .list_tenants(with_token(api::ListTenantsRequest {}, "lbo_wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A second init is refused.
    let e = c
        .cluster_init(api::ClusterInitRequest {
            site: "primary".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // Bad names and sizes.
    for (name, size) in [
        ("demo/Disk", 1u64 << 20),
        ("demo", 1 << 20),
        ("demo/a b", 1 << 20),
        ("nobody/x", 1 << 20),
    ] {
        let e = c
            .create_volume(with_token(create(name, size), &t))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::NotFound),
            "{name}: {e:?}"
        );
        assert!(!e.message().is_empty());
    }
    for size in [0u64, 1000, 1 << 60] {
        let e = c
            .create_volume(with_token(create("demo/x", size), &t))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{size}");
        assert!(e.message().contains("node.invalid_size"), "{}", e.message());
    }
    let e = c
        .create_tenant(with_token(
            api::CreateTenantRequest {
                name: "Bad_Name".into(),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("lowercase"), "{}", e.message());

    // Lifecycle: create, duplicate, list, resize (grow only), delete.
    let v = c
        .create_volume(with_token(create("demo/vol1", 1 << 30), &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.name.as_str(), v.size_bytes, v.pg.as_str()),
        ("demo/vol1", 1 << 30, "demo/main")
    );
    let e = c
        .create_volume(with_token(create("demo/vol1", 1 << 30), &t))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let list = c
        .list_volumes(with_token(
            api::ListVolumesRequest {
                tenant: "demo".into(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["demo/disk0", "demo/vol1"]);
    let grown = c
        .resize_volume(with_token(
            api::ResizeVolumeRequest {
                name: "demo/vol1".into(),
                size_bytes: 2 << 30,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.size_bytes, 2 << 30);
    let e = c
        .resize_volume(with_token(
            api::ResizeVolumeRequest {
                name: "demo/vol1".into(),
                size_bytes: 1 << 30,
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.delete_volume(with_token(
        api::DeleteVolumeRequest {
            name: "demo/vol1".into(),
        },
        &t,
    ))
    .await
    .unwrap();
    let e = c
        .delete_volume(with_token(
            api::DeleteVolumeRequest {
                name: "demo/vol1".into(),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The name is free again.
    c.create_volume(with_token(create("demo/vol1", 1 << 20), &t))
        .await
        .unwrap();

    // Key rotation: new key id, old data still readable.
    let client = node.client().await;
    client.write(0, &[9u8; 4096], true).await.unwrap().unwrap();
    let rotated = c
        .rotate_dek(with_token(
            api::RotateDekRequest {
                tenant: "demo".into(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rotated.current_key_id, rotated.key_count), (2, 2));
    client
        .write(4096, &[8u8; 4096], true)
        .await
        .unwrap()
        .unwrap();
    let back = client.read(0, 8192).await.unwrap().unwrap();
    assert_eq!(&back[..4096], &[9u8; 4096]);
    assert_eq!(&back[4096..], &[8u8; 4096]);
    node.stop().await;
}

/// `failover --force --catalog-lost` is refused, with what to do, while
/// the catalog answers (here its one voter is this node), away from the
/// site it would rebuild at, with PGs named, and without `--force`; the
/// cluster is unchanged after every refusal.
#[tokio::test]
async fn catalog_lost_is_refused_while_the_catalog_answers() {
    let node = must_start().await;
    let endpoint = format!("http://{}", node.running().admin_addr);
    let mut c = AdminClient::connect(endpoint).await.unwrap();
    let t = node.token.clone();
    let before = c
        .status(with_token(api::StatusRequest {}, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.cluster_generation, 0, "{before:?}");
    let rebuild = |to: &str, pgs: &[&str], force: bool| api::SwitchoverRequest {
        to_site: to.into(),
        pgs: pgs.iter().map(|p| p.to_string()).collect(),
        timeout_ms: 5_000,
        force,
        catalog_lost: true,
    };
    for (req, code, says) in [
        (
            rebuild("primary", &[], true),
            Code::FailedPrecondition,
            "the catalog is not lost",
        ),
        (rebuild("dr", &[], true), Code::FailedPrecondition, "site"),
        (
            rebuild("primary", &["demo/main"], true),
            Code::InvalidArgument,
            "moves every PG",
        ),
        (
            rebuild("primary", &[], false),
            Code::InvalidArgument,
            "--force",
        ),
    ] {
        let e = c.switchover(with_token(req, &t)).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(says), "{says}: {}", e.message());
    }
    let after = c
        .status(with_token(api::StatusRequest {}, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.cluster_id, after.cluster_generation),
        (before.cluster_id, 0)
    );
}

/// `failback prepare` refuses what it cannot wait for, and on a PG already
/// at the site answers at once with its members there (none rejoined by a
/// resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_prepare_refuses_what_it_cannot_wait_for() {
    let node = must_start().await;
    let endpoint = format!("http://{}", node.running().admin_addr);
    let mut c = AdminClient::connect(endpoint).await.unwrap();
    let t = node.token.clone();
    let prepare = |site: &str, pgs: &[&str]| api::FailbackPrepareRequest {
        site: site.into(),
        pgs: pgs.iter().map(|p| p.to_string()).collect(),
        timeout_ms: 5_000,
    };
    let e = c
        .failback_prepare(prepare("primary", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .failback_prepare(with_token(prepare("nowhere", &[]), &t))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("nowhere"), "{}", e.message());
    let e = c
        .failback_prepare(with_token(prepare("primary", &["demo/nope"]), &t))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Nothing is active elsewhere: nothing to wait for.
    let r = c
        .failback_prepare(with_token(prepare("primary", &[]), &t))
        .await
        .unwrap()
        .into_inner();
    assert!(r.pgs.is_empty(), "{r:?}");
    // Named, a PG at the site is waited for like any other.
    let r = c
        .failback_prepare(with_token(prepare("primary", &["demo/main"]), &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.pgs.len(), 1, "{r:?}");
    let p = &r.pgs[0];
    assert_eq!(
        (p.name.as_str(), p.active_site.as_str()),
        ("demo/main", "primary")
    );
    assert_eq!(p.members.len(), 1, "{r:?}");
    assert!(p.members[0].applied_index >= p.target_index, "{r:?}");
    assert!(p.members[0].resync.is_none(), "{r:?}");
}
