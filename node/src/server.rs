//! Runs a node: opens its data directory, binds the admin, NBD and HTTP
//! listeners (failing fast with the address when one is taken), serves
//! until shutdown, then stops the listeners and the Raft groups.

use std::net::SocketAddr;
use std::sync::Arc;

use std::path::PathBuf;

use lifeboat_proto::admin::admin_server::AdminServer;
use lifeboat_proto::raft::HelloReply;
use lifeboat_replication::ProtectionGroup;
use lifeboat_replication::liveness::Liveness;
use lifeboat_replication::transport::{Host, Identity, TransportService};
use lifeboat_store::PgId;
use tokio::net::TcpListener;

use crate::admin::AdminService;
use crate::config::NodeConfig;
use crate::core::NodeCore;
use crate::error::{NodeError, NodeResult};
use crate::nbd::{self, NbdServerConfig, NbdStats};
use crate::volume_io::VolumeExports;

/// Cancelled to stop a running node.
pub use tokio_util::sync::CancellationToken as Shutdown;

/// Largest admin request or response (volume lists can be long).
const ADMIN_MESSAGE_BYTES_MAX: usize = 16 << 20;

async fn bind(what: &str, addr: std::net::SocketAddr) -> NodeResult<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(NodeError::io(format!("bind {what} listener on {addr}")))
}

/// A running node: its state, the addresses it actually bound (a config
/// port of 0 picks a free one) and the handle that stops it.
pub struct RunningNode {
    pub core: Arc<NodeCore>,
    pub raft_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub nbd_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub s3_addr: SocketAddr,
    pub nbd_stats: Arc<NbdStats>,
    shutdown: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stops accepting, lets in-flight requests finish, stops the groups.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.core.shutdown().await;
    }

    pub fn shutdown_token(&self) -> Shutdown {
        self.shutdown.clone()
    }
}

/// Opens the node and starts serving; returns once every listener is bound.
pub async fn start(config: NodeConfig) -> NodeResult<RunningNode> {
    // A witness serves no clients: it binds no NBD or S3 port.
    let serves_clients = !config.role.is_witness();
    let raft_listener = bind("Raft", config.raft.listen).await?;
    let admin_listener = bind("admin", config.admin.listen).await?;
    let nbd_listener = match serves_clients {
        true => Some(bind("NBD", config.nbd.listen).await?),
        false => None,
    };
    let http_listener = bind("HTTP", config.http.listen).await?;
    let s3_listener = match serves_clients {
        true => Some(bind("S3", config.s3.listen).await?),
        false => None,
    };
    let local = |l: &TcpListener| l.local_addr().map_err(NodeError::io("read bound address"));
    let local_or = |l: &Option<TcpListener>, configured: SocketAddr| match l {
        Some(l) => local(l),
        None => Ok(configured),
    };
    let (raft_addr, admin_addr, nbd_addr, http_addr, s3_addr) = (
        local(&raft_listener)?,
        local(&admin_listener)?,
        local_or(&nbd_listener, config.nbd.listen)?,
        local(&http_listener)?,
        local_or(&s3_listener, config.s3.listen)?,
    );

    let core = NodeCore::open(config.clone()).await?;
    core.set_addrs(lifeboat_proto::raft::NodeAddrs {
        raft: raft_addr.to_string(),
        admin: admin_addr.to_string(),
        nbd: match serves_clients {
            true => nbd_addr.to_string(),
            false => String::new(),
        },
        http: http_addr.to_string(),
    });
    let nbd_stats = Arc::new(NbdStats::default());
    let shutdown = Shutdown::new();

    let raft_task = tokio::spawn({
        let shutdown = shutdown.clone();
        let service = TransportService::new(Arc::new(RaftHost(core.clone())));
        let core_for_tls = core.clone();
        async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    raft_tls_incoming(raft_listener, core_for_tls, shutdown.clone()),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "Raft transport server stopped");
            }
        }
    });
    core.start_reconciler();

    let admin = AdminServer::new(AdminService::new(core.clone()))
        .max_decoding_message_size(ADMIN_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(ADMIN_MESSAGE_BYTES_MAX);
    let admin_task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let served = tonic::transport::Server::builder()
                .add_service(admin)
                .serve_with_incoming_shutdown(
                    no_delay(tokio_stream::wrappers::TcpListenerStream::new(
                        admin_listener,
                    )),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin server stopped");
            }
        }
    });

    let nbd_config = NbdServerConfig {
        requests_in_flight_max: config.nbd.requests_in_flight_max,
        request_bytes_max: config.nbd.request_bytes_max,
        ..NbdServerConfig::default()
    };
    let mut tasks = vec![raft_task, admin_task];
    if let Some(nbd_listener) = nbd_listener {
        tasks.push(tokio::spawn({
            let tls_core = core.clone();
            let required = match config.nbd.tls_required {
                crate::config::NbdTlsRequired::OffLoopback => nbd::TlsRequired::OffLoopback,
                crate::config::NbdTlsRequired::Always => nbd::TlsRequired::Always,
            };
            let served = nbd::serve_with_tls(
                nbd_listener,
                Arc::new(VolumeExports::new(core.clone())),
                nbd_config,
                nbd::NbdTls::new(move || tls_core.nbd_tls(), required),
                nbd_stats.clone(),
                shutdown.clone(),
            );
            async move {
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "NBD server stopped");
                }
            }
        }));
    }

    tasks.push(tokio::spawn({
        let shutdown = shutdown.clone();
        let router = crate::metrics::router(core.clone(), nbd_stats.clone());
        async move {
            let served = axum::serve(http_listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }
    }));

    let s3_tls = match (&config.s3.tls_cert_file, &config.s3.tls_key_file) {
        (Some(cert), Some(key)) => Some(crate::pki::public_server_config(cert, key)?),
        _ => None,
    };
    if let Some(s3_listener) = s3_listener {
        tasks.push(tokio::spawn(crate::s3::serve(
            s3_listener,
            core.clone(),
            s3_tls,
            shutdown.clone(),
        )));
    }

    tracing::info!(
        node_id = config.node_id,
        site = config.site,
        role = ?config.role,
        raft = %raft_addr,
        admin = %admin_addr,
        nbd = %nbd_addr,
        http = %http_addr,
        s3 = %s3_addr,
        initialized = core.is_initialized(),
        "lifeboat node serving"
    );
    Ok(RunningNode {
        core,
        raft_addr,
        admin_addr,
        nbd_addr,
        http_addr,
        s3_addr,
        nbd_stats,
        shutdown,
        tasks,
    })
}

/// Raft-port TLS handshakes in progress at once.
const TLS_HANDSHAKES_MAX: usize = 64;

/// How long a peer may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Raft port's connections after mutual TLS: a peer without a node
/// certificate of this cluster's CA fails the handshake and is dropped
/// before gRPC reads a byte; a node without a certificate yet (not
/// initialised, not joined) takes no connections at all.
fn raft_tls_incoming(
    listener: TcpListener,
    core: Arc<NodeCore>,
    shutdown: Shutdown,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handshakes in progress at once: a flood of half-open connections
    // waits here instead of holding unbounded tasks and sockets.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(TLS_HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "Raft accept failed");
                        // Out of descriptors, say: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(config) = core.raft_tls() else {
                tracing::debug!(%peer, "Raft connection refused: this node has no certificate yet");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                let _permit = permit;
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "Raft connection refused: no valid node certificate of this cluster");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "Raft connection refused: TLS handshake timed out")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The node as its Raft transport server sees it.
struct RaftHost(Arc<NodeCore>);

impl Host for RaftHost {
    fn identity(&self) -> &Identity {
        &self.0.identity
    }

    fn group(&self, pg: PgId) -> Option<ProtectionGroup> {
        self.0.group(pg)
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.0.data_dir().join("raft-snapshots")
    }

    fn hello(&self) -> HelloReply {
        HelloReply {
            node_id: self.0.config.node_id,
            site: self.0.config.site.clone(),
            addrs: Some(self.0.addrs()),
            cluster_id: self.0.cluster_id().unwrap_or_default(),
        }
    }

    fn liveness(&self) -> Option<&Liveness> {
        self.0.liveness.as_deref()
    }

    fn grant_lease(
        &self,
        from_node: u64,
        progress: Vec<lifeboat_proto::raft::PgProgress>,
    ) -> lifeboat_replication::transport::HostFuture<'_, lifeboat_proto::raft::LeaseReply> {
        Box::pin(self.0.grant_lease(from_node, progress))
    }

    fn force_generation(
        &self,
        req: lifeboat_proto::raft::ForceGenerationRequest,
    ) -> lifeboat_replication::transport::HostFuture<'_, lifeboat_proto::raft::ForceGenerationReply>
    {
        Box::pin(self.0.force_generation(req))
    }

    fn rebuild_prepare(&self) -> lifeboat_replication::transport::HostFuture<'_, String> {
        Box::pin(async { self.0.rebuild_prepare() })
    }

    fn rebuild_adopt(
        &self,
        req: lifeboat_proto::raft::RebuildAdoptRequest,
    ) -> lifeboat_replication::transport::HostFuture<'_, lifeboat_proto::raft::ForceGenerationReply>
    {
        Box::pin(self.0.rebuild_adopt(req))
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn run(config: NodeConfig, shutdown: Shutdown) -> NodeResult<()> {
    let node = start(config).await?;
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    node.stop().await;
    Ok(())
}

/// Admin connections with Nagle's algorithm off: HTTP/2 writes a reply's
/// headers, data and trailers separately, and a small reply would wait for
/// the client's delayed ACK (~40 ms on Linux) between them.
fn no_delay(
    incoming: tokio_stream::wrappers::TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    incoming.map(|accepted| {
        if let Ok(tcp) = &accepted
            && let Err(e) = tcp.set_nodelay(true)
        {
            tracing::debug!(error = %e, "admin: TCP_NODELAY not set");
        }
        accepted
    })
}
