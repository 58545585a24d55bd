//! The Raft transport: openraft's messages of every PG between nodes over
//! one tonic channel per peer node, and the server that routes them to this
//! node's members.
//!
//! Every PG message carries a [`pb::Route`] (cluster id, PG, generation,
//! target member); the server refuses a message for another cluster, a PG
//! it does not host, a member it does not have or another generation, with
//! a status that says which — a fenced or wiped node never gets its entries
//! into a group by accident.
//!
//! Wire format: openraft's small records (votes, log ids, responses) as
//! JSON; log entries as `lifeboat.raft.Entry` bytes (the log store's own
//! encoding); Raft snapshots as their file, streamed in 1 MiB chunks, so a
//! group of any size is sent and received in bounded memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use lifeboat_proto::raft as pb;
use lifeboat_proto::raft::raft_transport_client::RaftTransportClient;
use lifeboat_proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use lifeboat_store::{Generation, MemberId, NodeId, PgId};
use openraft::RaftNetworkV2;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::group::ProtectionGroup;
use crate::liveness::Liveness;
use crate::types::{MemberNode, RaftSnapshotData, SnapshotView, TypeConfig};
use crate::wire;

type Vote = openraft::alias::VoteOf<TypeConfig>;
type Snapshot = openraft::alias::SnapshotOf<TypeConfig, RaftSnapshotData>;
type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// Largest gRPC message either side accepts: a replication batch is capped
/// at `log_store::LOG_READ_BATCH_BYTES_MAX` plus one entry of at most about
/// 1 MiB, far below this.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Raft snapshot files travel in chunks of this size.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a question that reads a member's state waits for its answer
/// (connecting included).
const QUICK_CALL: Duration = Duration::from_secs(5);
/// How long a call that commits and applies an entry, or restarts a
/// member, waits for its answer (connecting included).
const APPLY_CALL: Duration = Duration::from_secs(30);

/// The identity this node's messages carry, shared by every group. The
/// cluster id is set once, when the node initialises or joins a cluster.
pub struct Identity {
    node_id: NodeId,
    cluster_id: RwLock<Option<String>>,
}

impl Identity {
    pub fn new(node_id: NodeId, cluster_id: Option<String>) -> Arc<Identity> {
        Arc::new(Identity {
            node_id,
            cluster_id: RwLock::new(cluster_id),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.read().expect("identity lock").clone()
    }

    pub fn set_cluster_id(&self, id: &str) {
        *self.cluster_id.write().expect("identity lock") = Some(id.to_owned());
    }
}

/// One lazily connected channel per peer address, shared by every PG: HTTP/2
/// multiplexes all groups' messages over one connection.
///
/// Channels are keyed by the peer's advertised address; `dial` may map one
/// to the address actually dialled (NAT, a relay between sites, or a test's
/// link proxy).
///
/// The security is the node's choice: [`Peers::new`] speaks plain HTTP/2
/// (in-process tests of this crate); [`Peers::with_tls`] speaks mutual
/// TLS only, and refuses to dial until the node has its certificate.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    dial: HashMap<String, String>,
    security: RwLock<Security>,
}

#[derive(Default, Clone)]
enum Security {
    #[default]
    Plaintext,
    /// Mutual TLS required; `None` until the node is certified.
    Tls(Option<ClientTlsConfig>),
}

impl Peers {
    pub fn new() -> Arc<Peers> {
        Arc::new(Peers::default())
    }

    /// Peers dialled over mutual TLS only (configured later by
    /// [`Peers::set_tls`]), through `dial` (advertised address → dialled
    /// address).
    pub fn with_tls(dial: HashMap<String, String>) -> Arc<Peers> {
        Arc::new(Peers {
            channels: Mutex::default(),
            dial,
            security: RwLock::new(Security::Tls(None)),
        })
    }

    /// This node's certificate and the cluster CA, for every later dial.
    /// Channels made before are dropped.
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        *self.security.write().expect("peers security lock") = Security::Tls(Some(tls));
        self.channels.lock().expect("peers lock").clear();
    }

    /// Runs `call`, a request to the peer at `addr`, for at most
    /// `deadline`. A link that black-holes accepts the TCP connection and
    /// then says nothing: tonic's connect timeout covers the TCP connect
    /// only, and a request's grpc-timeout starts once it is sent, so
    /// without this a TLS handshake that never ends holds the call (and
    /// every later call on the channel) forever. On timeout the channel is
    /// dropped, so that the next call dials afresh.
    pub async fn within<T>(
        &self,
        addr: &str,
        deadline: Duration,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(deadline, call).await {
            Ok(answer) => answer,
            Err(_) => {
                self.channels.lock().expect("peers lock").remove(addr);
                Err(Status::deadline_exceeded(format!(
                    "{addr} did not answer within {} ms",
                    deadline.as_millis()
                )))
            }
        }
    }

    pub fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, Status> {
        let mut channels = self.channels.lock().expect("peers lock");
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let dialled = self.dial.get(addr).map_or(addr, String::as_str);
                let security = self.security.read().expect("peers security lock").clone();
                let (scheme, tls) = match security {
                    Security::Plaintext => ("http", None),
                    Security::Tls(Some(tls)) => ("https", Some(tls)),
                    Security::Tls(None) => {
                        return Err(Status::failed_precondition(
                            "this node has no cluster certificate yet (initialise or join a cluster)",
                        ));
                    }
                };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{dialled}"))
                    .map_err(|e| Status::invalid_argument(format!("peer address {addr}: {e}")))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(10));
                if let Some(tls) = tls {
                    endpoint = endpoint.tls_config(tls).map_err(|e| {
                        Status::failed_precondition(format!("TLS for peer {addr}: {e}"))
                    })?;
                }
                let c = endpoint.connect_lazy();
                channels.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }
}

/// A transport failure as openraft sees it.
#[derive(Debug, thiserror::Error)]
#[error("{peer}: {status}")]
pub struct PeerError {
    peer: String,
    status: String,
}

fn peer_error(node: &MemberNode, status: &Status) -> PeerError {
    PeerError {
        peer: node.to_string(),
        status: format!("{:?}: {}", status.code(), status.message()),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    wire::encode_json(value).map_err(|e| Status::internal(format!("encode: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    wire::decode_json(bytes).map_err(|e| Status::invalid_argument(format!("malformed {what}: {e}")))
}

/// The route every message of one group carries, less the target member.
#[derive(Clone)]
pub struct GroupRoute {
    pub identity: Arc<Identity>,
    pub pg: PgId,
    pub generation: Generation,
}

impl GroupRoute {
    pub fn to(&self, target: MemberId) -> pb::Route {
        pb::Route {
            cluster_id: self.identity.cluster_id().unwrap_or_default(),
            pg: self.pg.0,
            generation: self.generation.0,
            target_member: target.0,
            from_node: self.identity.node_id().0,
        }
    }
}

/// How the member of PG `pg` on the node at `raft_addr` sees its group.
pub async fn group_view(
    peers: &Peers,
    identity: &Arc<Identity>,
    raft_addr: &str,
    pg: PgId,
    generation: Generation,
) -> Result<pb::GroupViewReply, Status> {
    let route = GroupRoute {
        identity: identity.clone(),
        pg,
        generation,
    };
    let req = pb::GroupViewRequest {
        route: Some(route.to(MemberId(0))),
    };
    let call = async { Ok(peers.client(raft_addr)?.group_view(req).await?.into_inner()) };
    peers.within(raft_addr, QUICK_CALL, call).await
}

/// openraft's network factory for one group.
#[derive(Clone)]
pub struct GroupNetwork {
    pub peers: Arc<Peers>,
    pub route: GroupRoute,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &MemberNode) -> PeerLink {
        PeerLink {
            peers: self.peers.clone(),
            route: self.route.to(MemberId(target)),
            node: node.clone(),
        }
    }
}

/// One group's link to one member on a peer node.
pub struct PeerLink {
    peers: Arc<Peers>,
    route: pb::Route,
    node: MemberNode,
}

impl PeerLink {
    fn unreachable(&self, status: &Status) -> Unreachable<TypeConfig> {
        Unreachable::new(&peer_error(&self.node, status))
    }

    fn client(&self) -> Result<RaftTransportClient<Channel>, Status> {
        self.peers.client(&self.node.raft_addr)
    }

    async fn vote_rpc(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        pre_vote: bool,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result = async {
            let mut req = Request::new(pb::VoteRpc {
                route: Some(self.route.clone()),
                pre_vote,
                request_json: json(&rpc)?.into(),
            });
            req.set_timeout(option.hard_ttl());
            let reply = self.client()?.vote(req).await?.into_inner();
            from_json(&reply.response_json, "vote response")
        }
        .await;
        result.map_err(|s| RPCError::Unreachable(self.unreachable(&s)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = RaftSnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result = async {
            let entries = rpc
                .entries
                .iter()
                .map(|e| wire::encode_entry(e).map(Into::into))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Status::internal(format!("encode entry: {e}")))?;
            let mut req = Request::new(pb::AppendRequest {
                route: Some(self.route.clone()),
                vote_json: json(&rpc.vote)?.into(),
                prev_log_id_json: json(&rpc.prev_log_id)?.into(),
                leader_commit_json: json(&rpc.leader_commit)?.into(),
                entries,
            });
            req.set_timeout(option.hard_ttl());
            let reply = self.client()?.append(req).await?.into_inner();
            from_json(&reply.response_json, "append response")
        }
        .await;
        result.map_err(|s| RPCError::Unreachable(self.unreachable(&s)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(rpc, false, option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Implemented, not defaulted: openraft's default grants every pre-vote.
        self.vote_rpc(rpc, true, option).await
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result = async {
            let mut req = Request::new(pb::TransferLeaderRpc {
                route: Some(self.route.clone()),
                request_json: json(&rpc)?.into(),
            });
            req.set_timeout(option.hard_ttl());
            let reply = self.client()?.transfer_leader(req).await?.into_inner();
            from_json(&reply.response_json, "transfer leader response")
        }
        .await;
        result.map_err(|s| RPCError::Unreachable(self.unreachable(&s)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let send = async {
            let first = pb::SnapshotChunk {
                route: Some(self.route.clone()),
                vote_json: json(&vote)?.into(),
                meta_json: json(&snapshot.meta)?.into(),
                data: Default::default(),
            };
            let chunks = match &snapshot.snapshot {
                RaftSnapshotData::File(path) => {
                    let file = tokio::fs::File::open(path)
                        .await
                        .map_err(|e| Status::internal(format!("open raft snapshot: {e}")))?;
                    file_chunks(file).left_stream()
                }
                RaftSnapshotData::View(view) => view_chunks(view.clone()).right_stream(),
            };
            let stream = futures::stream::iter([first]).chain(chunks);
            let reply = self
                .client()?
                .install_snapshot(Request::new(stream))
                .await?
                .into_inner();
            from_json::<SnapshotResponse<TypeConfig>>(&reply.response_json, "snapshot response")
        };
        tokio::select! {
            r = send => r.map_err(|s| StreamingError::Unreachable(self.unreachable(&s))),
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// A file as a stream of snapshot data chunks. A read error ends the
/// stream early; the receiver then refuses the truncated file by its CRC.
fn file_chunks(file: tokio::fs::File) -> impl Stream<Item = pb::SnapshotChunk> + Send {
    futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    tracing::error!(error = %e, "read raft snapshot for sending");
                    return None;
                }
            }
        }
        if filled == 0 {
            return None;
        }
        buf.truncate(filled);
        let chunk = pb::SnapshotChunk {
            data: buf.into(),
            ..Default::default()
        };
        Some((chunk, Some(file)))
    })
}

/// A member's snapshot view as a stream of snapshot data chunks, read out
/// of the replica on a blocking thread no more than a few chunks ahead of
/// the sending. A read error ends the stream early, as in `file_chunks`; a
/// transfer given up drops the stream, which ends the reading and lets the
/// view go.
fn view_chunks(view: Arc<SnapshotView>) -> impl Stream<Item = pb::SnapshotChunk> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
    tokio::task::spawn_blocking(move || {
        let out = ChunkSender {
            tx,
            buf: Vec::with_capacity(SNAPSHOT_CHUNK_BYTES),
        };
        let label = std::path::Path::new("(raft snapshot stream)");
        let written = lifeboat_store::raft_snapshot::write_pg_records(
            view.view.view(),
            view.pg,
            &view.meta_json,
            out,
            label,
        );
        if let Err(e) = written {
            tracing::warn!(pg = view.pg.0, error = %e, "raft snapshot stream ended early");
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).map(|data| pb::SnapshotChunk {
        data,
        ..Default::default()
    })
}

/// Cuts what is written into chunks of `SNAPSHOT_CHUNK_BYTES` and hands
/// them to the sending stream, waiting while it is full.
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(SNAPSHOT_CHUNK_BYTES));
        self.tx.blocking_send(chunk.into()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the snapshot transfer was given up",
            )
        })
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(SNAPSHOT_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == SNAPSHOT_CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.send()
    }
}

/// What this node's Raft server needs from the node: its groups and who it
/// is. Implemented by the node.
pub trait Host: Send + Sync + 'static {
    fn identity(&self) -> &Identity;
    fn group(&self, pg: PgId) -> Option<ProtectionGroup>;
    fn snapshot_dir(&self) -> PathBuf;
    fn hello(&self) -> pb::HelloReply;
    /// The node's liveness state, if it runs [`crate::group::Heartbeats::PerNode`]
    /// groups.
    fn liveness(&self) -> Option<&Liveness> {
        None
    }
    /// Grants node `from_node` its site lease, if this node leads the
    /// catalog, taking note of the progress of the PGs it leads.
    fn grant_lease(
        &self,
        from_node: u64,
        progress: Vec<pb::PgProgress>,
    ) -> HostFuture<'_, pb::LeaseReply>;
    /// Restarts this node's member of a PG at a new generation (a forced
    /// failover), after offline forced membership when asked.
    fn force_generation(
        &self,
        req: pb::ForceGenerationRequest,
    ) -> HostFuture<'_, pb::ForceGenerationReply>;
    /// The catalog is lost: makes this node's key for the rebuilt cluster
    /// and returns its certificate signing request (PEM). A host without
    /// certificates (this crate's tests) cannot.
    fn rebuild_prepare(&self) -> HostFuture<'_, String> {
        Box::pin(async {
            Err(Status::unimplemented(
                "this host has no certificates to rebuild",
            ))
        })
    }
    /// The catalog is lost: adopts the rebuilt cluster's identity, then
    /// restarts this node's catalog member at its new generation.
    fn rebuild_adopt(
        &self,
        _req: pb::RebuildAdoptRequest,
    ) -> HostFuture<'_, pb::ForceGenerationReply> {
        Box::pin(async {
            Err(Status::unimplemented(
                "this host has no certificates to rebuild",
            ))
        })
    }
}

/// An async answer from a [`Host`].
pub type HostFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Status>> + Send + 'a>>;

/// How far the member of `pg` on the node at `raft_addr` has its log.
pub async fn log_tail(
    peers: &Peers,
    identity: &Arc<Identity>,
    raft_addr: &str,
    pg: PgId,
    generation: Generation,
) -> Result<pb::LogTailReply, Status> {
    let route = GroupRoute {
        identity: identity.clone(),
        pg,
        generation,
    };
    let req = pb::LogTailRequest {
        route: Some(route.to(MemberId(0))),
    };
    let call = async { Ok(peers.client(raft_addr)?.log_tail(req).await?.into_inner()) };
    peers.within(raft_addr, QUICK_CALL, call).await
}

/// Asks the node at `raft_addr` to restart its member at a new generation.
pub async fn force_generation(
    peers: &Peers,
    raft_addr: &str,
    req: pb::ForceGenerationRequest,
) -> Result<pb::ForceGenerationReply, Status> {
    let call = async {
        Ok(peers
            .client(raft_addr)?
            .force_generation(req)
            .await?
            .into_inner())
    };
    peers.within(raft_addr, APPLY_CALL, call).await
}

/// Asks the node at `raft_addr` for a signing request for its key in the
/// cluster that replaces a lost catalog's. `route` is to its catalog member.
pub async fn rebuild_prepare(
    peers: &Peers,
    raft_addr: &str,
    route: pb::Route,
) -> Result<String, Status> {
    let req = pb::RebuildPrepareRequest { route: Some(route) };
    let call = async {
        Ok(peers
            .client(raft_addr)?
            .rebuild_prepare(req)
            .await?
            .into_inner()
            .csr_pem)
    };
    peers.within(raft_addr, QUICK_CALL, call).await
}

/// Asks the node at `raft_addr` to adopt the rebuilt cluster's identity
/// and restart its catalog member in it.
pub async fn rebuild_adopt(
    peers: &Peers,
    raft_addr: &str,
    req: pb::RebuildAdoptRequest,
) -> Result<pb::ForceGenerationReply, Status> {
    let call = async {
        Ok(peers
            .client(raft_addr)?
            .rebuild_adopt(req)
            .await?
            .into_inner())
    };
    peers.within(raft_addr, APPLY_CALL, call).await
}

/// Proposes `kind` to the leader of `pg` at `generation` on the node at
/// `raft_addr`, from a node with no member of the PG (a fenced old member
/// carrying its divergence): the applied index and what apply made of it.
/// Unavailable when that member does not lead.
pub async fn propose_at(
    peers: &Peers,
    identity: &Arc<Identity>,
    raft_addr: &str,
    pg: PgId,
    generation: Generation,
    kind: pb::command::Kind,
) -> Result<
    (
        lifeboat_store::LogIndex,
        std::result::Result<crate::Applied, crate::Rejection>,
    ),
    Status,
> {
    let route = GroupRoute {
        identity: identity.clone(),
        pg,
        generation,
    };
    let req = pb::ProposeRequest {
        route: Some(route.to(MemberId(0))),
        command: Some(pb::Command {
            stamp_ms: 0,
            kind: Some(kind),
        }),
    };
    let call = async { Ok(peers.client(raft_addr)?.propose(req).await?.into_inner()) };
    let reply = peers.within(raft_addr, APPLY_CALL, call).await?;
    let outcome = from_json(&reply.outcome_json, "proposal outcome")?;
    Ok((lifeboat_store::LogIndex(reply.index), outcome))
}

/// Asks the catalog leader at `raft_addr` for this node's site lease.
pub async fn request_lease(
    peers: &Peers,
    identity: &Identity,
    raft_addr: &str,
    timeout: Duration,
    progress: Vec<pb::PgProgress>,
) -> Result<pb::LeaseReply, Status> {
    let mut req = Request::new(pb::LeaseRequest {
        cluster_id: identity.cluster_id().unwrap_or_default(),
        from_node: identity.node_id().0,
        progress,
    });
    req.set_timeout(timeout);
    let call = async { Ok(peers.client(raft_addr)?.lease(req).await?.into_inner()) };
    peers.within(raft_addr, timeout, call).await
}

/// The gRPC service on the Raft port.
pub struct TransportService<H: Host> {
    host: Arc<H>,
}

impl<H: Host> TransportService<H> {
    pub fn new(host: Arc<H>) -> RaftTransportServer<TransportService<H>> {
        RaftTransportServer::new(TransportService { host })
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The local member a message is for, or the status refusing it.
    fn route(&self, route: Option<&pb::Route>) -> Result<ProtectionGroup, Status> {
        let route = route.ok_or_else(|| Status::invalid_argument("message without a route"))?;
        check_route(&*self.host, route)
    }
}

/// Checks a message's route against this node; `Ok` is the member it is for.
pub fn check_route(host: &dyn Host, route: &pb::Route) -> Result<ProtectionGroup, Status> {
    let identity = host.identity();
    let me = identity.node_id();
    check_cluster(identity, &route.cluster_id, route.from_node)?;
    let pg = PgId(route.pg);
    let group = host.group(pg).ok_or_else(|| {
        Status::not_found(format!(
            "protection group {pg} is not hosted on node {me} (message from node {})",
            route.from_node
        ))
    })?;
    if route.target_member != 0 && route.target_member != group.member_id().0 {
        return Err(Status::not_found(format!(
            "member {} of protection group {pg} is not on node {me} (its member here is {})",
            route.target_member,
            group.member_id()
        )));
    }
    if route.generation != group.generation().0 {
        return Err(Status::failed_precondition(format!(
            "protection group {pg} is at generation {} on node {me}; the message from node {} carries generation {}",
            group.generation(),
            route.from_node,
            route.generation
        )));
    }
    Ok(group)
}

/// Refuses a message from another cluster, or any before this node is in one.
fn check_cluster(identity: &Identity, cluster_id: &str, from_node: u64) -> Result<(), Status> {
    let me = identity.node_id();
    match identity.cluster_id() {
        None => Err(Status::failed_precondition(format!(
            "node {me} is not in a cluster yet"
        ))),
        Some(c) if c != cluster_id => Err(Status::permission_denied(format!(
            "message for cluster {cluster_id:?} from node {from_node}; node {me} is in cluster {c}"
        ))),
        Some(_) => Ok(()),
    }
}

/// Why a member could not act as the leader. Only a storage failure is
/// internal: a member that is not (or no longer) leading, or whose Raft has
/// stopped, is unavailable, and the caller looks for the leader again.
fn leader_status(e: crate::Error) -> Status {
    match e {
        crate::Error::NotLeader { pg, leader } => Status::unavailable(format!(
            "protection group {pg}: not the leader here (leader member: {leader:?})"
        )),
        crate::Error::Storage { .. } => Status::internal(e.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

fn fatal(pg: PgId, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("protection group {pg}: raft: {e}"))
}

#[tonic::async_trait]
impl<H: Host> RaftTransport for TransportService<H> {
    async fn append(
        &self,
        req: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let req = req.into_inner();
        let group = self.route(req.route.as_ref())?;
        let entries = req
            .entries
            .iter()
            .map(|b| wire::decode_entry(b))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Status::invalid_argument(format!("malformed entry: {e}")))?;
        let rpc = AppendEntriesRequest {
            vote: from_json(&req.vote_json, "vote")?,
            prev_log_id: from_json(&req.prev_log_id_json, "prev log id")?,
            leader_commit: from_json(&req.leader_commit_json, "leader commit")?,
            entries,
        };
        let resp = group
            .raft()
            .append_entries(rpc)
            .await
            .map_err(|e| fatal(group.pg(), e))?;
        Ok(Response::new(pb::RaftReply {
            response_json: json(&resp)?.into(),
        }))
    }

    async fn vote(&self, req: Request<pb::VoteRpc>) -> Result<Response<pb::RaftReply>, Status> {
        let req = req.into_inner();
        let group = self.route(req.route.as_ref())?;
        let rpc: VoteRequest<TypeConfig> = from_json(&req.request_json, "vote request")?;
        if req.pre_vote
            && let Some(liveness) = self.host.liveness()
            && liveness.refuses_pre_vote(&group, self.host.identity().node_id().0, Instant::now())
        {
            tracing::debug!(pg = group.pg().0, candidate = %rpc.vote, "pre-vote refused: the leader is alive");
            let refusal = group
                .pre_vote_refusal()
                .await
                .map_err(|e| fatal(group.pg(), e))?;
            return Ok(Response::new(pb::RaftReply {
                response_json: json(&refusal)?.into(),
            }));
        }
        let resp = if req.pre_vote {
            group.raft().pre_vote(rpc).await
        } else {
            group.raft().vote(rpc).await
        }
        .map_err(|e| fatal(group.pg(), e))?;
        Ok(Response::new(pb::RaftReply {
            response_json: json(&resp)?.into(),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRpc>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let req = req.into_inner();
        let group = self.route(req.route.as_ref())?;
        let rpc: TransferLeaderRequest<TypeConfig> =
            from_json(&req.request_json, "transfer leader request")?;
        let resp = group
            .raft()
            .handle_transfer_leader(rpc)
            .await
            .map_err(|e| fatal(group.pg(), e))?;
        Ok(Response::new(pb::RaftReply {
            response_json: json(&resp)?.into(),
        }))
    }

    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let req = req.into_inner();
        check_cluster(self.host.identity(), &req.cluster_id, req.from_node)?;
        Ok(Response::new(
            self.host.grant_lease(req.from_node, req.progress).await?,
        ))
    }

    async fn log_tail(
        &self,
        req: Request<pb::LogTailRequest>,
    ) -> Result<Response<pb::LogTailReply>, Status> {
        let group = self.route(req.get_ref().route.as_ref())?;
        Ok(Response::new(
            group.log_tail().map_err(|e| fatal(group.pg(), e))?,
        ))
    }

    async fn force_generation(
        &self,
        req: Request<pb::ForceGenerationRequest>,
    ) -> Result<Response<pb::ForceGenerationReply>, Status> {
        let req = req.into_inner();
        self.route(req.route.as_ref())?;
        Ok(Response::new(self.host.force_generation(req).await?))
    }

    async fn rebuild_prepare(
        &self,
        req: Request<pb::RebuildPrepareRequest>,
    ) -> Result<Response<pb::RebuildPrepareReply>, Status> {
        let group = self.route(req.get_ref().route.as_ref())?;
        if group.pg() != PgId::CATALOG {
            return Err(Status::invalid_argument(
                "a rebuild is prepared through the catalog's member",
            ));
        }
        Ok(Response::new(pb::RebuildPrepareReply {
            csr_pem: self.host.rebuild_prepare().await?,
        }))
    }

    async fn rebuild_adopt(
        &self,
        req: Request<pb::RebuildAdoptRequest>,
    ) -> Result<Response<pb::ForceGenerationReply>, Status> {
        let req = req.into_inner();
        let route = req.catalog.as_ref().and_then(|c| c.route.as_ref());
        let group = self.route(route)?;
        if group.pg() != PgId::CATALOG {
            return Err(Status::invalid_argument(
                "a rebuild is adopted through the catalog's member",
            ));
        }
        Ok(Response::new(self.host.rebuild_adopt(req).await?))
    }

    type ResyncStream = crate::resync::DeltaStream;

    async fn resync(
        &self,
        req: Request<pb::ResyncRequest>,
    ) -> Result<Response<Self::ResyncStream>, Status> {
        let req = req.into_inner();
        let group = self.route(req.route.as_ref())?;
        let segments = crate::resync::segments(&req)?;
        lifeboat_store::resync::check_offer(group.pg(), &segments)
            .map_err(|e| Status::invalid_argument(format!("resync offer: {e}")))?;
        tracing::info!(
            pg = group.pg().0,
            from_node = req.route.as_ref().map_or(0, |r| r.from_node),
            segments = segments.len(),
            "serving a delta resync"
        );
        Ok(Response::new(crate::resync::serve(
            group.db().clone(),
            group.pg(),
            segments,
        )))
    }

    async fn group_view(
        &self,
        req: Request<pb::GroupViewRequest>,
    ) -> Result<Response<pb::GroupViewReply>, Status> {
        let group = self.route(req.get_ref().route.as_ref())?;
        Ok(Response::new(group.metrics().view()))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let group = self.route(first.route.as_ref())?;
        let vote: Vote = from_json(&first.vote_json, "vote")?;
        let meta: SnapshotMeta = from_json(&first.meta_json, "snapshot meta")?;
        let dir = self.host.snapshot_dir().join(format!("pg-{}", group.pg()));
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Status::internal(format!("snapshot dir: {e}")))?;
        let path = dir.join(format!("receiving-{}.part", group.member_id()));
        let received = receive_file(&path, first.data, &mut stream).await;
        let result = match received {
            Ok(()) => group
                .raft()
                .install_full_snapshot(
                    vote,
                    Snapshot {
                        meta,
                        snapshot: RaftSnapshotData::File(path.clone()),
                    },
                )
                .await
                .map_err(|e| fatal(group.pg(), e)),
            Err(e) => Err(e),
        };
        // Installed, the state machine has moved the file into place;
        // otherwise it is left here and goes.
        if tokio::fs::try_exists(&path).await.unwrap_or(false)
            && let Err(e) = tokio::fs::remove_file(&path).await
        {
            tracing::warn!(path = %path.display(), error = %e, "remove received snapshot file");
        }
        let resp = result?;
        Ok(Response::new(pb::RaftReply {
            response_json: json(&resp)?.into(),
        }))
    }

    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let req = req.into_inner();
        let group = self.route(req.route.as_ref())?;
        let kind = req
            .command
            .and_then(|c| c.kind)
            .ok_or_else(|| Status::invalid_argument("proposal without a command"))?;
        let (index, outcome) = group.propose_local(kind).await.map_err(leader_status)?;
        Ok(Response::new(pb::ProposeReply {
            index: index.0,
            outcome_json: json(&outcome)?.into(),
        }))
    }

    async fn read_index(
        &self,
        req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        let req = req.into_inner();
        let group = self.route(req.route.as_ref())?;
        let index = group.read_index_local().await.map_err(leader_status)?;
        Ok(Response::new(pb::ReadIndexReply { index: index.0 }))
    }

    async fn hello(
        &self,
        _req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        Ok(Response::new(self.host.hello()))
    }

    async fn beat(&self, req: Request<pb::BeatRequest>) -> Result<Response<pb::BeatReply>, Status> {
        let req = req.into_inner();
        check_cluster(self.host.identity(), &req.cluster_id, req.from_node)?;
        let liveness = self.host.liveness().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} runs no per-node heartbeats",
                self.host.identity().node_id()
            ))
        })?;
        Ok(Response::new(liveness.receive(
            &req,
            |pg| self.host.group(pg),
            Instant::now(),
        )))
    }
}

/// Writes a snapshot stream to `path` and fsyncs it; memory use is one chunk.
async fn receive_file(
    path: &std::path::Path,
    first_data: bytes::Bytes,
    stream: &mut Streaming<pb::SnapshotChunk>,
) -> Result<(), Status> {
    let io = |e: std::io::Error| Status::internal(format!("write received snapshot: {e}"));
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    file.write_all(&first_data).await.map_err(io)?;
    while let Some(chunk) = stream.message().await? {
        file.write_all(&chunk.data).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that takes the connection and never answers (a black-holed
    /// link; a TLS handshake that never ends) fails the call at its
    /// deadline, and its channel is dropped so that the next call dials
    /// afresh.
    #[tokio::test]
    async fn a_peer_that_never_answers_fails_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let peers = Peers::new();
        let deadline = Duration::from_millis(300);
        let started = Instant::now();
        let call = async {
            let req = pb::GroupViewRequest { route: None };
            Ok(peers.client(&addr)?.group_view(req).await?.into_inner())
        };
        let err = peers.within(&addr, deadline, call).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
        assert!(
            err.message()
                .contains(&format!("{addr} did not answer within 300 ms")),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            !peers.channels.lock().unwrap().contains_key(&addr),
            "the channel is dropped"
        );
        hold.abort();
    }
}
