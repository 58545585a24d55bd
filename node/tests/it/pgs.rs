//! Protection groups through the admin API: create with an ack policy,
//! list, show, change the policy; refusals with clear codes; a `remote` PG
//! with no standby site degrades to `local` at its first write, with an
//! event and a metric, and keeps acknowledging writes.

use lifeboat_chaos_tests::nbd_client::NbdClient;
use lifeboat_proto::admin as api;
use lifeboat_proto::admin::admin_client::AdminClient;
use tonic::Code;

use crate::{must_start, with_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_create_list_show_set_ack_and_remote_degrades_without_a_standby() {
    let node = must_start().await;
    let endpoint = format!("http://{}", node.running().admin_addr);
    let mut c = AdminClient::connect(endpoint).await.unwrap();
    let t = node.token.clone();
    let create = |name: &str, ack: &str| {
        with_token(
            api::CreatePgRequest {
                name: name.into(),
                ack: ack.into(),
            },
            &t,
        )
    };

    let db = c
        .create_pg(create("demo/db", "remote"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((db.name.as_str(), db.ack.as_str()), ("demo/db", "remote"));
    assert_eq!(db.members.len(), 1, "{db:?}");
    assert!(db.members[0].voter);
    assert_eq!(db.members[0].site, "primary");
    let here = db.status.as_ref().expect("this node hosts demo/db");
    assert_eq!((here.ack.as_str(), here.ack_degraded), ("remote", false));

    for (name, ack, code) in [
        ("demo/db", "local", Code::AlreadyExists),
        ("nobody/db", "local", Code::NotFound),
        ("demo", "local", Code::InvalidArgument),
        ("demo/Bad", "local", Code::InvalidArgument),
        ("demo/other", "quorum", Code::InvalidArgument),
    ] {
        let e = c.create_pg(create(name, ack)).await.unwrap_err();
        assert_eq!(e.code(), code, "{name} {ack}: {e:?}");
        assert!(!e.message().is_empty());
    }
    let e = c
        .create_pg(api::CreatePgRequest {
            name: "demo/x".into(),
            ack: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let list = c
        .list_pgs(with_token(api::ListPgsRequest::default(), &t))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(&str, &str)> = list
        .pgs
        .iter()
        .map(|p| (p.name.as_str(), p.ack.as_str()))
        .collect();
    assert_eq!(names, vec![("demo/main", "local"), ("demo/db", "remote")]);
    let main = &list.pgs[0];
    assert_eq!(main.volumes, 1, "demo/disk0 is in demo/main");

    // A volume in demo/db; its first write waits remote_timeout_ms (300 ms
    // here) for a standby site there is none of, degrades the PG to local
    // with one event, and is acknowledged.
    c.create_volume(with_token(
        api::CreateVolumeRequest {
            name: "demo/dbvol".into(),
            size_bytes: 1 << 20,
            pg: "db".into(),
        },
        &t,
    ))
    .await
    .unwrap();
    let nbd = NbdClient::connect(node.nbd(), "demo/dbvol").await.unwrap();
    for i in 0..4u64 {
        nbd.write(i * 4096, &[7u8; 4096], true)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(nbd.read(0, 4096).await.unwrap().unwrap(), vec![7u8; 4096]);
    let shown = c
        .show_pg(with_token(
            api::ShowPgRequest {
                name: "demo/db".into(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.volumes, 1);
    let here = shown.status.unwrap();
    assert!(here.ack_degraded, "{here:?}");
    assert_eq!(here.ack_degradations, 1);
    let events = c
        .list_events(with_token(api::ListEventsRequest {}, &t))
        .await
        .unwrap()
        .into_inner()
        .events;
    let degraded: Vec<_> = events.iter().filter(|e| e.kind == "ack_degraded").collect();
    assert_eq!(degraded.len(), 1, "{events:?}");
    assert_eq!(degraded[0].pg_name, "demo/db");
    assert!(
        degraded[0].message.contains("no member at a standby site"),
        "{events:?}"
    );
    let (code, metrics) =
        lifeboat_chaos_tests::harness::http_get(node.running().http_addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(&format!("lifeboat_pg_ack_degraded{{pg=\"{}\"}} 1", db.id)),
        "{metrics}"
    );

    // Back to local: the degradation is cleared.
    let local = c
        .set_pg_ack(with_token(
            api::SetPgAckRequest {
                name: "demo/db".into(),
                ack: "local".into(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(local.ack, "local");
    assert!(!local.status.unwrap().ack_degraded);
    let e = c
        .show_pg(with_token(
            api::ShowPgRequest {
                name: "demo/nope".into(),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    drop(nbd);
    node.stop().await;
}
