//! Joining and leaving a cluster, in process: the refusals an operator can
//! run into, each with an error that says what to do, and a joined node
//! serving a volume written through another node.

use lifeboat_node::error::NodeError;
use lifeboat_node::pki::NodeTls;
use lifeboat_node::server::{self, RunningNode};
use lifeboat_proto::raft::HelloRequest;
use lifeboat_proto::raft::raft_transport_client::RaftTransportClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::test_config;

async fn start(dir: &std::path::Path, node_id: u64, site: &str) -> RunningNode {
    let mut c = test_config(dir);
    c.node_id = node_id;
    c.site = site.into();
    server::start(c).await.expect("start node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_checked_and_a_joined_node_serves() {
    crate::capture_logs();
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

    // Join tokens: one node each, for a site or any, naming the cluster.
    let hour = std::time::Duration::from_secs(3600);
    let (token_any, _) = a.core.create_join_token("", hour).await.unwrap();
    let (token_dr, _) = a.core.create_join_token("dr", hour).await.unwrap();
    assert!(token_any.starts_with("lbj1_"), "{token_any}");
    let e = a
        .core
        .create_join_token("", std::time::Duration::from_secs(8 * 24 * 3600))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 168 hours"), "{e}");

    // A primary node with a DR token is refused by the cluster.
    let e = c.core.join_cluster(&token_dr).await.unwrap_err();
    assert!(e.to_string().contains("for site \"dr\""), "{e}");
    // A mangled token, and one naming an address where nothing listens.
    let e = c.core.join_cluster("lbj1_nope").await.unwrap_err();
    assert!(matches!(e, NodeError::JoinToken { .. }), "{e}");
    let (head, _) = token_dr.rsplit_once('_').unwrap();
    let e = c
        .core
        .join_cluster(&format!("{head}_127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NodeError::Peer { addr, .. } if addr == "127.0.0.1:1"),
        "{e}"
    );
    // A token whose pinned CA is not the cluster's is refused by the node.
    let zeros = "0".repeat(64);
    let (b_only, _) = a.core.create_join_token("dr", hour).await.unwrap();
    let mut forged: Vec<&str> = b_only.split('_').collect();
    forged[2] = &zeros;
    let e = b.core.join_cluster(&forged.join("_")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("not the cluster that made the token"),
        "{e}"
    );
    assert!(b.core.cluster_id().is_none(), "the node did not join");

    // Data nodes share the master key file (operators copy it).
    std::fs::create_dir_all(dirs[1].path().join("keys")).unwrap();
    std::fs::copy(
        dirs[0].path().join("keys/master.key"),
        dirs[1].path().join("keys/master.key"),
    )
    .unwrap();
    let joined = b.core.join_cluster(&token_any).await.unwrap();
    assert_eq!((joined.id, joined.site.as_str()), (2, "dr"));
    assert_eq!(b.core.cluster_id(), a.core.cluster_id());
    // A token serves one node only.
    let e = c.core.join_cluster(&token_any).await.unwrap_err();
    assert!(e.to_string().contains("used by node 2"), "{e}");
    // A node of one cluster cannot be taken by another.
    c.core.cluster_init("primary").await.unwrap();
    let e = c.core.join_cluster(&token_dr).await.unwrap_err();
    assert!(matches!(e, NodeError::AlreadyInitialized { .. }), "{e}");

    // Only nodes of this cluster get through the Raft port's TLS.
    let b_tls = NodeTls::load(&dirs[1].path().join("data"))
        .unwrap()
        .unwrap();
    let c_tls = NodeTls::load(&dirs[2].path().join("data"))
        .unwrap()
        .unwrap();
    a.core.create_tenant("t").await.unwrap();
    let (tenant_key, tenant_csr) = lifeboat_node::pki::new_key_and_csr("t").unwrap();
    let (tenant_cert, _) = a.core.create_tenant_cert("t", &tenant_csr).unwrap();
    let raft = a.raft_addr;
    let hello = |tls: Option<ClientTlsConfig>| async move {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{raft}")).unwrap();
        if let Some(tls) = tls {
            ep = ep.tls_config(tls).unwrap();
        }
        let channel = ep.connect().await.map_err(|e| e.to_string())?;
        RaftTransportClient::new(channel)
            .hello(HelloRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.to_string())
    };
    let with = |ca: &str, identity: Option<(&str, &str)>| {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(lifeboat_node::pki::NODE_SERVER_NAME);
        if let Some((cert, key)) = identity {
            t = t.identity(Identity::from_pem(cert, key));
        }
        t
    };
    let ca = b_tls.ca_pem.clone();
    assert!(hello(None).await.is_err(), "plain HTTP/2 is refused");
    assert!(
        hello(Some(with(&ca, None))).await.is_err(),
        "no client certificate"
    );
    assert!(
        hello(Some(with(&ca, Some((&c_tls.cert_pem, &c_tls.key_pem)))))
            .await
            .is_err(),
        "a node certificate of another cluster"
    );
    assert!(
        hello(Some(with(&ca, Some((&tenant_cert, &tenant_key)))))
            .await
            .is_err(),
        "a tenant certificate of this cluster"
    );
    let ok = hello(Some(with(&ca, Some((&b_tls.cert_pem, &b_tls.key_pem)))))
        .await
        .unwrap();
    assert_eq!((ok.node_id, Some(ok.cluster_id)), (1, a.core.cluster_id()));
    assert!(
        crate::captured_logs().contains("Raft connection refused: no valid node certificate"),
        "refusals are logged"
    );

    // A node cannot remove itself; an unknown node is not found.
    let e = a.core.remove_node(1).await.unwrap_err();
    assert!(e.to_string().contains("cannot remove itself"), "{e}");
    let e = a.core.remove_node(42).await.unwrap_err();
    assert!(matches!(e, NodeError::NodeNotFound(42)), "{e}");

    // The joined DR node gets the tenant's PG as a learner and serves a
    // volume written through node 1.
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

/// A witness never starts a cluster, holds no master key (even with the
/// file present), advertises no NBD address and binds no NBD or S3 port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_starts_no_cluster_and_serves_no_clients() {
    crate::capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.role = lifeboat_node::config::NodeRole::Witness;
    c.site = "witness".into();
    // Real ports (the test config's are 0), free a moment ago: a data node
    // would bind them.
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    (c.nbd.listen, c.s3.listen) = (free(), free());
    let w = server::start(c).await.expect("start witness");
    let e = w.core.cluster_init("witness").await.unwrap_err();
    assert!(matches!(e, NodeError::Witness { .. }), "{e}");
    assert!(e.to_string().contains("this node is a witness"), "{e}");
    assert!(!w.core.is_initialized(), "in no cluster yet");
    assert_eq!(w.core.addrs().nbd, "", "no NBD address advertised");
    assert_ne!(w.nbd_addr.port(), 0);
    assert!(
        std::net::TcpStream::connect(w.nbd_addr).is_err()
            && std::net::TcpStream::connect(w.s3_addr).is_err(),
        "no client port is bound"
    );
    w.stop().await;
}
