//! Buckets through the admin API: create in a tenant's PG, names unique in
//! the whole cluster and checked against S3's rules, list per tenant,
//! delete (giving the name back); refusals with clear codes.

use lifeboat_proto::admin as api;
use lifeboat_proto::admin::admin_client::AdminClient;
use tonic::Code;

use crate::{must_start, with_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_create_list_delete_and_refusals() {
    let node = must_start().await;
    let endpoint = format!("http://{}", node.running().admin_addr);
    let mut c = AdminClient::connect(endpoint).await.unwrap();
    let t = node.token.clone();
    let create = |name: &str, pg: &str| {
        with_token(
            api::CreateBucketRequest {
                name: name.into(),
                pg: pg.into(),
            },
            &t,
        )
    };
    let list = |tenant: &str| {
        with_token(
            api::ListBucketsRequest {
                tenant: tenant.into(),
            },
            &t,
        )
    };
    let delete = |name: &str| with_token(api::DeleteBucketRequest { name: name.into() }, &t);
    c.create_tenant(with_token(
        api::CreateTenantRequest {
            name: "health".into(),
        },
        &t,
    ))
    .await
    .unwrap();
    c.create_pg(with_token(
        api::CreatePgRequest {
            name: "demo/archive".into(),
            ack: String::new(),
        },
        &t,
    ))
    .await
    .unwrap();

    let b = c
        .create_bucket(create("demo/demo-backups", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (b.name.as_str(), b.pg.as_str()),
        ("demo/demo-backups", "demo/main")
    );
    assert!(b.created_ms > 0);
    let archive = c
        .create_bucket(create("demo/old.dumps", "archive"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(archive.pg, "demo/archive");
    assert_ne!(archive.id, b.id);

    for (name, pg, code) in [
        // Bucket names are unique in the cluster, across tenants.
        ("demo/demo-backups", "", Code::AlreadyExists),
        ("health/demo-backups", "", Code::AlreadyExists),
        ("demo/Backups", "", Code::InvalidArgument),
        ("demo/ab", "", Code::InvalidArgument),
        ("demo/10.0.0.1", "", Code::InvalidArgument),
        ("demo-backups", "", Code::InvalidArgument),
        ("nobody/some-bucket", "", Code::NotFound),
        ("demo/some-bucket", "no-such-pg", Code::NotFound),
    ] {
        let e = c.create_bucket(create(name, pg)).await.unwrap_err();
        assert_eq!(e.code(), code, "{name} {pg}: {e:?}");
        assert!(!e.message().is_empty());
    }
    let e = c
        .create_bucket(api::CreateBucketRequest {
            name: "demo/anonymous".into(),
            pg: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let names = |r: api::ListBucketsResponse| -> Vec<String> {
        r.buckets.into_iter().map(|b| b.name).collect()
    };
    let demo = names(c.list_buckets(list("demo")).await.unwrap().into_inner());
    assert_eq!(demo, ["demo/demo-backups", "demo/old.dumps"]);
    assert!(names(c.list_buckets(list("health")).await.unwrap().into_inner()).is_empty());
    let all = names(c.list_buckets(list("")).await.unwrap().into_inner());
    assert_eq!(all.len(), 2, "{all:?}");

    // Deleting gives the name back, to any tenant.
    c.delete_bucket(delete("demo/demo-backups")).await.unwrap();
    let e = c
        .delete_bucket(delete("demo/demo-backups"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let demo = names(c.list_buckets(list("demo")).await.unwrap().into_inner());
    assert_eq!(demo, ["demo/old.dumps"]);
    let taken = c
        .create_bucket(create("health/demo-backups", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(taken.pg, "health/main");
    // Another tenant cannot delete it by naming it as its own.
    let e = c
        .delete_bucket(delete("demo/demo-backups"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    node.stop().await;
}
