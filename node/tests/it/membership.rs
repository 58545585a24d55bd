//! Joining and leaving a cluster, in process: the refusals an operator can
//! run into, each with an error that says what to do, and a joined node
//! serving a volume written through another node.

use lifeboat_node::error::NodeError;
use lifeboat_node::server::{self, RunningNode};

use crate::test_config;

async fn start(dir: &std::path::Path, node_id: u64, site: &str) -> RunningNode {
    let mut c = test_config(dir);
    c.node_id = node_id;
    c.site = site.into();
    server::start(c).await.expect("start node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_checked_and_a_joined_node_serves() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), 1, "primary").await;
    let b = start(dirs[1].path(), 2, "dr").await;
    let c = start(dirs[2].path(), 3, "primary").await;

    // cluster init names the node's own site or nothing else.
    let e = a.core.cluster_init("dr").await.unwrap_err();
    assert!(
        matches!(e, NodeError::InvalidName { what: "site", .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("configured for site \"primary\""),
        "{e}"
    );
    a.core.cluster_init("primary").await.unwrap();
    let e = a.core.cluster_init("primary").await.unwrap_err();
    assert!(matches!(e, NodeError::AlreadyInitialized { .. }), "{e}");

    // Adding with the wrong site is refused by the joining node itself.
    let b_addr = b.raft_addr.to_string();
    let e = a.core.add_node(&b_addr, "primary").await.unwrap_err();
    assert!(
        matches!(&e, NodeError::Peer { reason, .. } if reason.contains("configured for site \"dr\"")),
        "{e}"
    );
    // Nothing listens there: a clear error naming the address.
    let e = a.core.add_node("127.0.0.1:1", "").await.unwrap_err();
    assert!(
        matches!(&e, NodeError::Peer { addr, .. } if addr == "127.0.0.1:1"),
        "{e}"
    );

    // Data nodes share the master key file (operators copy it).
    std::fs::create_dir_all(dirs[1].path().join("keys")).unwrap();
    std::fs::copy(
        dirs[0].path().join("keys/master.key"),
        dirs[1].path().join("keys/master.key"),
    )
    .unwrap();
    let added = a.core.add_node(&b_addr, "dr").await.unwrap();
    assert_eq!((added.id, added.site.as_str()), (2, "dr"));

    // A node of one cluster cannot be taken by another.
    c.core.cluster_init("primary").await.unwrap();
    let e = c.core.add_node(&b_addr, "").await.unwrap_err();
    assert!(
        matches!(&e, NodeError::Peer { reason, .. } if reason.contains("already belongs to cluster")),
        "{e}"
    );

    // A node cannot remove itself; an unknown node is not found.
    let e = a.core.remove_node(1).await.unwrap_err();
    assert!(e.to_string().contains("cannot remove itself"), "{e}");
    let e = a.core.remove_node(42).await.unwrap_err();
    assert!(matches!(e, NodeError::NodeNotFound(42)), "{e}");

    // The joined DR node gets the tenant's PG as a learner and serves a
    // volume written through node 1.
    a.core.create_tenant("t").await.unwrap();
    a.core.create_volume("t/v", 1 << 20, "").await.unwrap();
    let data = crate::pseudo_random(9, 8192);
    let writer = lifeboat_chaos_tests::nbd_client::NbdClient::connect(a.nbd_addr, "t/v")
        .await
        .unwrap();
    writer.write(4096, &data, true).await.unwrap().unwrap();
    let started = std::time::Instant::now();
    let reader = loop {
        match lifeboat_chaos_tests::nbd_client::NbdClient::connect(b.nbd_addr, "t/v").await {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    started.elapsed().as_secs() < 30,
                    "node 2 never served t/v: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(reader.read(4096, 8192).await.unwrap().unwrap(), data);

    for n in [a, b, c] {
        n.stop().await;
    }
}
