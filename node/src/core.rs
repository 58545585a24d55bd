//! The node's state and its operations: opening the store, starting the
//! catalog and protection groups, cluster init, tenants and volumes. The
//! admin API and the NBD server are thin shells over this.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lifeboat_proto::admin as api;
use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::AckPolicy;
use lifeboat_replication::catalog::{self, Catalog, MAIN_PG};
use lifeboat_replication::lease::LeaseTable;
use lifeboat_replication::liveness::Liveness;
use lifeboat_replication::log_files::{FILE_ENTRY_BYTES_MIN, LogFiles};
use lifeboat_replication::log_store::WalSyncer;
use lifeboat_replication::members::{self, LocalMember};
use lifeboat_replication::placement::{self, PlacementPolicy};
use lifeboat_replication::transport::{Identity, Peers};
use lifeboat_replication::{
    Applied, Clock, DesiredMember, GroupStart, Heartbeats, MemberNode, ProtectionGroup, RaftTimers,
    Retention, SystemClock,
};
use lifeboat_store::db::{Db, DbOptions};
use lifeboat_store::frame::FrameCodec;
use lifeboat_store::history::History;
use lifeboat_store::keyring::{Dek, Keyring, MasterKey, TenantKeys};
use lifeboat_store::objects::{BucketState, Objects};
use lifeboat_store::volumes::{VolumeRecord, VolumeState, Volumes};
use lifeboat_store::{
    BucketId, Generation, KeyId, LogIndex, MemberId, NodeId, PgId, TenantId, VolumeId,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::error::{NodeError, NodeResult};
use crate::events::EventLog;
use crate::locks::BlockLocks;
use crate::metrics::Metrics;
use crate::names;
use crate::pki::{self, ClusterCa, NodeTls};

/// How long a freshly started group may take to elect this node.
const LEADERSHIP_WAIT: Duration = Duration::from_secs(30);

/// What a caller is allowed to do, from its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Operator,
    Tenant(String),
    /// Runs drills (start, list, report, stop) and nothing else.
    Drill,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s.strip_prefix("tenant:") {
            Some(t) => Some(Role::Tenant(t.to_owned())),
            None if s == "operator" => Some(Role::Operator),
            None if s == "drill" => Some(Role::Drill),
            None => None,
        }
    }

    pub fn may_use_tenant(&self, tenant: &str) -> bool {
        match self {
            Role::Operator => true,
            Role::Tenant(t) => t == tenant,
            Role::Drill => false,
        }
    }
}

/// A volume as the admin API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub tenant: String,
    pub name: String,
    pub pg_name: String,
    pub pg: PgId,
    pub volume: VolumeId,
    pub size_bytes: u64,
    pub created_index: LogIndex,
}

/// A bucket as the admin API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketInfo {
    pub tenant: String,
    pub name: String,
    pub pg_name: String,
    pub pg: PgId,
    pub bucket: BucketId,
    pub created_ms: u64,
    /// `Some` for a clone: what it shows (under its own writes if writable).
    pub base: Option<lifeboat_store::objects::BucketBase>,
}

/// What an S3 credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialMode {
    /// Everything in the tenant's buckets.
    Full,
    /// Read and list only.
    ReadOnly,
    /// Read, list and create objects; overwrite and delete only under the
    /// credential's writable prefix (`locks/` by default): a backup client
    /// cannot destroy its own history.
    AppendOnly,
}

impl CredentialMode {
    pub fn parse(s: &str) -> Option<CredentialMode> {
        match s {
            "full" => Some(CredentialMode::Full),
            "read-only" => Some(CredentialMode::ReadOnly),
            "append-only" => Some(CredentialMode::AppendOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialMode::Full => "full",
            CredentialMode::ReadOnly => "read-only",
            CredentialMode::AppendOnly => "append-only",
        }
    }
}

/// An S3 credential as the admin API lists it (never with its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialInfo {
    pub tenant: String,
    pub access_key: String,
    pub mode: CredentialMode,
    pub writable_prefix: String,
    pub created_ms: u64,
}

/// What an append-only credential may overwrite and delete under, unless
/// its creator names another prefix.
pub const DEFAULT_WRITABLE_PREFIX: &str = "locks/";

/// The purpose a credential's secret is sealed for: bound to its access
/// key, so a sealed secret moved to another record does not open.
fn credential_purpose(access_key: &str) -> String {
    format!("s3-credential/{access_key}")
}

fn credential_info(record: &pb::CredentialRecord) -> NodeResult<CredentialInfo> {
    let mode = CredentialMode::parse(&record.mode).ok_or_else(|| NodeError::Io {
        op: format!("read credential {}", record.access_key),
        source: std::io::Error::other(format!("unknown mode {:?}", record.mode)),
    })?;
    Ok(CredentialInfo {
        tenant: record.tenant.clone(),
        access_key: record.access_key.clone(),
        mode,
        writable_prefix: record.writable_prefix.clone(),
        created_ms: record.created_ms,
    })
}

/// `n` characters drawn uniformly from `alphabet`.
fn random_string(alphabet: &[u8], n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}

/// Where a volume lives, resolved from its `tenant/volume` name.
#[derive(Clone)]
pub struct VolumeLocation {
    pub tenant: String,
    pub tenant_id: TenantId,
    pub volume_name: String,
    pub group: ProtectionGroup,
    pub volume: VolumeId,
    pub record: VolumeRecord,
}

pub struct NodeCore {
    pub config: NodeConfig,
    pub db: Db,
    pub volumes: Volumes,
    pub objects: Objects,
    pub history: History,
    pub catalog: Catalog,
    pub codec: FrameCodec,
    pub keyring: Keyring,
    pub metrics: Metrics,
    pub block_locks: BlockLocks,
    pub identity: Arc<Identity>,
    pub peers: Arc<Peers>,
    /// Beats and election timers of the PGs (not the catalog) when
    /// `raft.node_heartbeats` is on.
    pub liveness: Option<Arc<Liveness>>,
    pub(crate) syncer: WalSyncer,
    pub(crate) clock: Arc<dyn Clock>,
    master_key: RwLock<Option<Arc<MasterKey>>>,
    groups: RwLock<HashMap<PgId, ProtectionGroup>>,
    /// The addresses this node actually listens on (a config port of 0
    /// picks one), set by the server before it serves.
    addrs: RwLock<pb::NodeAddrs>,
    /// Serialises starting and stopping members.
    pub(crate) membership_changes: tokio::sync::Mutex<()>,
    pub(crate) stopping: CancellationToken,
    pub events: Arc<EventLog>,
    /// This node's site lease (see `crate::leases`).
    pub leases: Arc<LeaseTable>,
    /// A lapse of the lease was reported and its return not yet.
    pub(crate) lease_lapsed: std::sync::atomic::AtomicBool,
    /// On the catalog's leader: the newest progress each PG's leader
    /// reported with its lease, not yet recorded (see `crate::leases`).
    pub(crate) progress_reports: Mutex<HashMap<u64, pb::PgProgress>>,
    /// On the catalog's leader: who renewed leases when (see
    /// `crate::auto_failover`).
    pub(crate) auto_failover: Mutex<crate::auto_failover::AutoFailover>,
    /// Kept replicas waiting for a delta resync (see `crate::failback`).
    pub(crate) resync_tries: Mutex<crate::failback::ResyncTries>,
    /// The key this node made for the cluster that rebuilds a lost
    /// catalog, and its signing request, until it adopts that cluster (see
    /// `crate::catalog_lost`).
    pub(crate) rebuild_key: Mutex<Option<crate::catalog_lost::PendingKey>>,
    /// Free space was short at the last check (see `crate::gc`).
    pub space_short: std::sync::atomic::AtomicBool,
    /// When windows were last shrunk for space.
    pub last_window_shrink: Mutex<Option<std::time::Instant>>,
    /// Recent quota verdicts per PG (see `crate::quota`).
    pub quotas: crate::quota::Quotas,
    /// This node's certificate, and the Raft port's TLS built from it;
    /// `None` until the node initialises or joins a cluster.
    tls: RwLock<Option<ActiveTls>>,
    /// The reconciler and the log-retention task.
    background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn timers(raft: &crate::config::RaftConfig) -> RaftTimers {
    RaftTimers {
        heartbeat_interval_ms: raft.heartbeat_interval_ms,
        election_timeout_min_ms: raft.election_timeout_min_ms,
        election_timeout_max_ms: raft.election_timeout_max_ms,
    }
}

/// How often a node creating a PG campaigns while the PG has no leader.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(250);

/// How often a node compares the catalog's placement with the members it
/// runs, and the PGs it leads with their Raft membership.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(300);

/// How soon the log retention check runs again while a purge waits for
/// the Raft snapshot it asked for (a flush: well under a second).
const RETENTION_RECHECK: Duration = Duration::from_millis(500);

/// The least time between two retention checks that appends woke: with a
/// small `log_retain_bytes` and a fast writer they would otherwise run
/// back to back.
const RETENTION_WAKE_GAP: Duration = Duration::from_millis(100);

/// Membership steps one reconcile pass may take in one PG (add learners,
/// change voters, transfer leadership, remove members).
const MEMBERSHIP_STEPS_PER_PASS: usize = 4;

/// This node's certificate and the server TLS configurations made from it.
struct ActiveTls {
    node: NodeTls,
    raft: Arc<rustls::ServerConfig>,
    nbd: Arc<rustls::ServerConfig>,
}

/// The longest a join token may live.
const JOIN_TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the cluster CA's private key is sealed for (`MasterKey::seal_secret`).
pub(crate) const CA_KEY_PURPOSE: &str = "cluster-ca";

/// A join token: `lbj1_SECRET_CAFINGERPRINT_ADMINADDR`. The secret
/// authenticates the joining node to the cluster; the fingerprint lets the
/// node check that it is talking to the cluster that made the token.
struct JoinToken {
    secret: String,
    ca_fingerprint: String,
    admin_addr: String,
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lbj1_{}_{}_{}",
            self.secret, self.ca_fingerprint, self.admin_addr
        )
    }
}

impl std::str::FromStr for JoinToken {
    type Err = NodeError;

    fn from_str(s: &str) -> NodeResult<JoinToken> {
        let bad = |why: &str| NodeError::JoinToken {
            reason: format!(
                "malformed token ({why}); paste it whole as `node join-token create` printed it"
            ),
        };
        let mut parts = s.trim().splitn(4, '_');
        if parts.next() != Some("lbj1") {
            return Err(bad("it does not start with lbj1_"));
        }
        let secret = parts
            .next()
            .filter(|p| p.len() == 64)
            .ok_or_else(|| bad("secret"))?;
        let fp = parts
            .next()
            .filter(|p| p.len() == 64)
            .ok_or_else(|| bad("CA fingerprint"))?;
        let addr = parts
            .next()
            .filter(|a| a.parse::<std::net::SocketAddr>().is_ok() || a.contains(':'))
            .ok_or_else(|| bad("address"))?;
        Ok(JoinToken {
            secret: secret.to_owned(),
            ca_fingerprint: fp.to_owned(),
            admin_addr: addr.to_owned(),
        })
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

impl NodeCore {
    /// Opens the data directory and starts every member this node hosts.
    /// Call [`NodeCore::set_addrs`] and [`NodeCore::start_reconciler`] once
    /// the listeners are bound.
    pub async fn open(config: NodeConfig) -> NodeResult<Arc<NodeCore>> {
        let db_options = DbOptions {
            block_cache_bytes: config.store.block_cache_bytes,
            ..DbOptions::default()
        };
        let db = Db::open(&config.data_dir.join("db"), &db_options)?;
        let binding =
            members::cluster_binding(&db).map_err(NodeError::io("read cluster binding"))?;
        let default_addrs = pb::NodeAddrs {
            raft: config.raft.listen.to_string(),
            admin: config.admin.listen.to_string(),
            nbd: config.nbd.listen.to_string(),
            http: config.http.listen.to_string(),
        };
        let core = Arc::new(NodeCore {
            volumes: Volumes::new(db.clone()),
            objects: Objects::new(db.clone()),
            history: History::new(db.clone()),
            catalog: Catalog::new(db.clone()),
            codec: FrameCodec::new(config.store.zstd_level),
            keyring: Keyring::new(),
            metrics: Metrics::new(),
            block_locks: BlockLocks::new(),
            identity: Identity::new(NodeId(config.node_id), binding.clone()),
            peers: Peers::with_tls(config.raft.dial.clone().into_iter().collect()),
            liveness: config
                .raft
                .node_heartbeats
                .then(|| Liveness::new(timers(&config.raft))),
            syncer: WalSyncer::start(
                db.clone(),
                LogFiles::with_pool(
                    config.data_dir.join("raft-log"),
                    FILE_ENTRY_BYTES_MIN,
                    config.raft.log_segment_pool,
                ),
            ),
            clock: Arc::new(SystemClock),
            master_key: RwLock::new(None),
            groups: RwLock::new(HashMap::new()),
            addrs: RwLock::new(default_addrs),
            membership_changes: tokio::sync::Mutex::new(()),
            stopping: CancellationToken::new(),
            background: std::sync::Mutex::new(Vec::new()),
            events: Arc::new(EventLog::new(|| SystemClock.now_ms())),
            leases: Arc::new(LeaseTable::enforced()),
            lease_lapsed: std::sync::atomic::AtomicBool::new(false),
            progress_reports: Mutex::new(HashMap::new()),
            auto_failover: Mutex::default(),
            resync_tries: Mutex::default(),
            rebuild_key: Mutex::default(),
            space_short: std::sync::atomic::AtomicBool::new(false),
            last_window_shrink: Mutex::new(None),
            quotas: Default::default(),
            tls: RwLock::new(None),
            config,
            db,
        });
        if let Some(tls) = NodeTls::load(&core.config.data_dir)? {
            core.use_tls(tls)?;
        }
        if binding.is_some() {
            core.load_master_key_if_present()?;
        }
        let local = members::all(&core.db).map_err(NodeError::io("read local members"))?;
        for m in local {
            core.start_member(m).await?;
        }
        Ok(core)
    }

    /// Loads the master key if its file exists; a data node without it
    /// replicates but cannot serve volumes.
    fn load_master_key_if_present(&self) -> NodeResult<()> {
        if self.config.role.is_witness() {
            // A witness holds no keys: it could not open a tenant's data
            // even if its disk were taken.
            return Ok(());
        }
        let path = &self.config.master_key_file;
        if !path.exists() {
            tracing::warn!(path = %path.display(), "no master key file: this node replicates but cannot serve volumes until it has one");
            return Ok(());
        }
        let master = MasterKey::load(path)?;
        *self.master_key.write().expect("master key lock") = Some(Arc::new(master));
        Ok(())
    }

    /// Makes `tls` this node's identity on the Raft port, both ways.
    fn use_tls(&self, tls: NodeTls) -> NodeResult<()> {
        let raft = tls.raft_server_config()?;
        let nbd = tls.nbd_server_config()?;
        self.peers.set_tls(tls.raft_client_config());
        *self.tls.write().expect("tls lock") = Some(ActiveTls {
            node: tls,
            raft,
            nbd,
        });
        Ok(())
    }

    /// NBD's TLS, once this node has a certificate.
    pub fn nbd_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls
            .read()
            .expect("tls lock")
            .as_ref()
            .map(|t| t.nbd.clone())
    }

    /// Saves and uses this node's certificate.
    pub(crate) fn install_tls(&self, tls: NodeTls) -> NodeResult<()> {
        tls.save(&self.config.data_dir)?;
        self.use_tls(tls)
    }

    /// The Raft port's TLS, once this node has a certificate.
    pub fn raft_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls
            .read()
            .expect("tls lock")
            .as_ref()
            .map(|t| t.raft.clone())
    }

    /// This node's TLS material, once it has a certificate.
    pub fn node_tls(&self) -> Option<NodeTls> {
        self.tls
            .read()
            .expect("tls lock")
            .as_ref()
            .map(|t| t.node.clone())
    }

    /// The IP addresses a certificate for a node reached at `addrs` names.
    pub(crate) fn cert_ips(addrs: &pb::NodeAddrs) -> Vec<std::net::IpAddr> {
        let mut ips: Vec<std::net::IpAddr> = [&addrs.raft, &addrs.nbd, &addrs.admin]
            .iter()
            .filter_map(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// The cluster CA with its private key, opened with the master key.
    fn cluster_ca(&self) -> NodeResult<ClusterCa> {
        let cluster = self
            .catalog
            .cluster()
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::NotInitialized)?;
        let key = self
            .master_key()?
            .open_secret(CA_KEY_PURPOSE, &cluster.ca_key_sealed)?;
        let key = String::from_utf8(key).map_err(|_| NodeError::Pki {
            reason: "the sealed CA key is not PEM".into(),
        })?;
        ClusterCa::from_pem(&cluster.ca_cert_pem, &key)
    }

    pub fn set_addrs(&self, addrs: pb::NodeAddrs) {
        *self.addrs.write().expect("addrs lock") = addrs;
    }

    pub fn addrs(&self) -> pb::NodeAddrs {
        self.addrs.read().expect("addrs lock").clone()
    }

    fn member_node(&self) -> MemberNode {
        MemberNode {
            node_id: self.config.node_id,
            raft_addr: self.addrs().raft,
            site: self.config.site.clone(),
        }
    }

    /// How member `pg` is kept alive: the catalog by its own heartbeats,
    /// whatever the node's liveness task does; PGs per node when configured.
    fn heartbeats(&self, pg: PgId) -> Heartbeats {
        if self.liveness.is_some() && pg != PgId::CATALOG {
            Heartbeats::PerNode
        } else {
            Heartbeats::PerGroup
        }
    }

    /// Starts (or returns the running) member `m`, recording it locally so
    /// that a restart starts it again under the same member id.
    pub(crate) async fn start_member(&self, m: LocalMember) -> NodeResult<ProtectionGroup> {
        if let Some(g) = self.group(m.pg) {
            return Ok(g);
        }
        members::save(&self.db, &m).map_err(NodeError::io("record local member"))?;
        let group = ProtectionGroup::start(GroupStart {
            pg: m.pg,
            member: m.member,
            generation: m.generation,
            db: self.db.clone(),
            syncer: self.syncer.clone(),
            snapshot_root: &self.config.data_dir.join("raft-snapshots"),
            timers: &timers(&self.config.raft),
            heartbeats: self.heartbeats(m.pg),
            clock: self.clock.clone(),
            peers: self.peers.clone(),
            identity: self.identity.clone(),
            events: self.events.clone(),
            leases: self.leases.clone(),
        })
        .await?;
        if let Some(record) = self
            .catalog
            .pg_by_id(m.pg.0)
            .map_err(NodeError::io("read catalog"))?
        {
            self.follow_ack_policy(&group, &record);
        }
        tracing::info!(
            pg = m.pg.0,
            member = m.member.0,
            generation = m.generation.0,
            "started protection group member"
        );
        let group = {
            let mut groups = self.groups.write().expect("groups lock");
            groups.entry(m.pg).or_insert(group).clone()
        };
        // A single-voter group restarted with leader restore off would sit
        // leaderless for an election timeout: campaign at once.
        let metrics = group.metrics();
        if metrics.voters.len() == 1 && metrics.voters.contains(&m.member.0) {
            group.campaign().await;
        }
        Ok(group)
    }

    /// Starts the background task that keeps this node's members in line
    /// with the catalog (see [`NodeCore::reconcile_once`]).
    pub fn start_reconciler(self: &Arc<Self>) {
        let reconciler = self.every(RECONCILE_INTERVAL, |core| async move {
            if let Err(e) = core.reconcile_once().await {
                tracing::warn!(code = e.code(), error = %e, "reconcile");
            }
        });
        let retention = self.start_log_retention();
        let sweep = self.every(
            Duration::from_millis(self.config.s3.sweep_interval_ms),
            |core| async move { crate::s3::sweep::sweep_once(&core).await },
        );
        let schedules = self.every(
            Duration::from_millis(crate::schedules::SCHEDULE_CHECK_MS),
            |core| async move { crate::schedules::run_once(&core).await },
        );
        let drill_lag = self.every(crate::drills::DRILL_LAG_SAMPLE, |core| async move {
            core.sample_drill_lag().await
        });
        let progress = self.every(crate::leases::PROGRESS_RECORD_EVERY, |core| async move {
            core.record_progress().await
        });
        let auto_failover = self.every(
            crate::auto_failover::AUTO_FAILOVER_CHECK,
            |core| async move { core.auto_failover_check().await },
        );
        let resyncs = self.every(crate::failback::RESYNC_CHECK, |core| async move {
            core.resync_pass().await
        });
        let history_gc = self.every(
            Duration::from_millis(self.config.history.gc_interval_ms),
            |core| async move {
                crate::gc::run_once(&core).await;
                // On every replica, leader or not: each collects the same
                // history and holds the same garbage.
                if let Err(e) = core.db.adapt_blob_gc() {
                    tracing::warn!(error = %e, "adapt blob GC");
                }
            },
        );
        let leases = self.start_lease_task();
        let mut background = self.background.lock().expect("background lock");
        background.extend([
            reconciler,
            retention,
            sweep,
            schedules,
            history_gc,
            drill_lag,
            progress,
            auto_failover,
            resyncs,
        ]);
        background.extend(leases);
        if let Some(liveness) = self.liveness.clone() {
            background.push(self.every(liveness.interval(), move |core| {
                let liveness = liveness.clone();
                async move {
                    liveness
                        .round(&core.groups(), &core.peers, &core.identity)
                        .await
                }
            }));
        }
    }

    /// Checks every member's log against `raft.log_retain_bytes`: every
    /// `raft.log_check_interval_ms`, and also each time this node's logs
    /// have grown by a quarter of the limit, so that a fast writer takes a
    /// log little past it (on the timer alone, a 5 s check under 250 MB/s
    /// of writes let a 1 GiB log reach 2.2 GiB), but not more often than
    /// every [`RETENTION_WAKE_GAP`]. While a purge waits for a Raft
    /// snapshot, checks again within [`RETENTION_RECHECK`].
    fn start_log_retention(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let interval = Duration::from_millis(self.config.raft.log_check_interval_ms);
        let appends = self.syncer.appends().clone();
        appends.wake_every((self.config.raft.log_retain_bytes / 4).max(1));
        self.repeat(
            interval,
            move || {
                let appends = appends.clone();
                async move {
                    tokio::time::sleep(RETENTION_WAKE_GAP).await;
                    appends.crossed().await
                }
            },
            move |core| async move {
                if core.enforce_log_retention().await {
                    interval.min(RETENTION_RECHECK)
                } else {
                    interval
                }
            },
        )
    }

    /// Runs `pass` every `interval` until the node stops.
    fn every<F, Fut>(self: &Arc<Self>, interval: Duration, pass: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<NodeCore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        self.repeat(interval, std::future::pending::<()>, move |core| {
            let pass = pass(core);
            async move {
                pass.await;
                interval
            }
        })
    }

    /// Runs `pass` until the node stops: first after `first_wait`, then
    /// after the wait each pass returns, or sooner when `wake` resolves.
    fn repeat<W, WFut, F, Fut>(
        self: &Arc<Self>,
        first_wait: Duration,
        wake: W,
        pass: F,
    ) -> tokio::task::JoinHandle<()>
    where
        W: Fn() -> WFut + Send + 'static,
        WFut: std::future::Future<Output = ()> + Send,
        F: Fn(Arc<NodeCore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Duration> + Send,
    {
        let weak = Arc::downgrade(self);
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut wait = first_wait;
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake() => {}
                }
                let Some(core) = weak.upgrade() else { return };
                // A pass may wait on a quorum that is gone (a membership
                // change, a proposal): stopping must not wait for it.
                // Dropped mid-way, a pass leaves nothing half done that
                // the next start does not redo.
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    next = pass(core) => wait = next,
                }
            }
        })
    }

    fn follow_ack_policy(&self, group: &ProtectionGroup, record: &pb::PgRecord) {
        group.ack().set(
            AckPolicy::from_pb(record.ack),
            Duration::from_millis(self.config.raft.remote_timeout_ms),
        );
    }

    /// Keeps every member's log within `raft.log_retain_bytes`. Returns
    /// whether a purge waits for a Raft snapshot that was asked for.
    async fn enforce_log_retention(&self) -> bool {
        let max_bytes = self.config.raft.log_retain_bytes;
        let mut snapshot_requested = false;
        for g in self.groups() {
            match g.enforce_log_retention(max_bytes).await {
                Ok(Retention::Within) => {}
                Ok(done) => {
                    tracing::debug!(pg = g.pg().0, ?done, "log retention");
                    snapshot_requested |= done.snapshot_requested();
                }
                Err(e) => tracing::warn!(pg = g.pg().0, error = %e, "log retention"),
            }
        }
        snapshot_requested
    }

    /// One pass of keeping this node in line with the catalog:
    /// - start the members the catalog places here;
    /// - initialise a new PG if this node holds its first voter;
    /// - in every PG this node leads, move Raft's membership towards the
    ///   catalog's placement;
    /// - on the catalog's leader, place members a PG lacks (new nodes,
    ///   removed nodes), balanced across nodes.
    pub async fn reconcile_once(&self) -> NodeResult<()> {
        if self.identity.cluster_id().is_none() {
            return Ok(());
        }
        let _changes = self.membership_changes.lock().await;
        let io = NodeError::io("read catalog");
        let mut records = self.catalog.pgs().map_err(io)?;
        if let Some(p0) = self
            .catalog
            .catalog_placement()
            .map_err(NodeError::io("read catalog"))?
        {
            records.push(p0);
        }
        let nodes = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let node_map: HashMap<u64, &pb::NodeRecord> = nodes.iter().map(|n| (n.id, n)).collect();
        let me = self.config.node_id;
        let local: HashMap<PgId, LocalMember> = members::all(&self.db)
            .map_err(NodeError::io("read local members"))?
            .into_iter()
            .map(|m| (m.pg, m))
            .collect();
        // A stopped drill's PGs are gone from the catalog: their replicas
        // here go too.
        let unplaced = local
            .keys()
            .filter(|pg| **pg != PgId::CATALOG && !records.iter().any(|r| r.id == pg.0))
            .copied();
        if let Err(e) = self.drop_stopped_drill_members(unplaced).await {
            tracing::warn!(code = e.code(), error = %e, "dropping a stopped drill's replica");
        }
        for rec in &records {
            let pg = PgId(rec.id);
            // A member of an older generation here: the PG failed over
            // without it. It serves nothing more, and what it alone holds
            // is carried into the new generation before its replica goes.
            if let Some(&old) = local
                .get(&pg)
                .filter(|m| pg != PgId::CATALOG && m.generation.0 < rec.generation)
            {
                if let Err(e) = self.fence_member(old, rec).await {
                    tracing::warn!(pg = rec.id, code = e.code(), error = %e, "fencing an old member; trying again next pass");
                }
                continue;
            }
            let mine = rec.members.iter().find(|m| m.node_id == me);
            // A kept old replica becomes this member by a delta resync
            // first (`crate::failback`): starting it now would apply the
            // new generation's log over the old site's data.
            if mine.is_some()
                && self.group(pg).is_none()
                && lifeboat_store::resync::base_of(&self.db, pg)?.is_some()
            {
                continue;
            }
            let group = match (mine, self.group(pg)) {
                (Some(m), None) => Some(
                    self.start_member(LocalMember {
                        pg,
                        member: MemberId(m.member_id),
                        generation: Generation(rec.generation),
                    })
                    .await?,
                ),
                (Some(m), Some(g)) if g.member_id().0 != m.member_id => {
                    tracing::warn!(
                        pg = rec.id,
                        here = g.member_id().0,
                        catalog = m.member_id,
                        "this node's member of a PG was replaced; keeping the running one"
                    );
                    Some(g)
                }
                (None, Some(g)) if pg != PgId::CATALOG => {
                    if !g.metrics().nodes.contains_key(&g.member_id().0) {
                        self.retire_member(&g).await;
                    }
                    None
                }
                (_, g) => g,
            };
            let Some(group) = group else { continue };
            self.follow_ack_policy(&group, rec);
            if group.restore_ack_if_caught_up() {
                tracing::info!(pg = rec.id, "ack policy back to remote");
            }
            // A member already running a generation its record has not
            // reached (the catalog rebuilt by `--catalog-lost`, before its
            // `RebuildCluster` entry applies) takes no membership from the
            // record: it names the lost generation's voters, and making
            // them voters again would stall the new generation for good.
            if group.generation().0 != rec.generation {
                continue;
            }
            let desired: Vec<DesiredMember> = rec
                .members
                .iter()
                .filter_map(|m| {
                    let n = node_map.get(&m.node_id)?;
                    Some(DesiredMember {
                        member: MemberId(m.member_id),
                        node: MemberNode {
                            node_id: n.id,
                            raft_addr: n.addrs.as_ref().map(|a| a.raft.clone()).unwrap_or_default(),
                            site: n.site.clone(),
                        },
                        voter: m.voter,
                    })
                })
                .collect();
            let metrics = group.metrics();
            let first_voter = rec
                .members
                .iter()
                .filter(|m| m.voter)
                .map(|m| m.member_id)
                .min();
            if metrics.nodes.is_empty() && first_voter == Some(group.member_id().0) {
                let voters: std::collections::BTreeMap<u64, MemberNode> = desired
                    .iter()
                    .filter(|d| d.voter)
                    .map(|d| (d.member.0, d.node.clone()))
                    .collect();
                tracing::info!(pg = rec.id, voters = ?voters.keys().collect::<Vec<_>>(), "initialising protection group");
                group.initialize(voters).await?;
                // Campaign now rather than after an election timeout (2–4 s
                // with production timers): `pg create` and `tenant create`
                // wait for the new group's leader.
                group.campaign().await;
            } else if metrics.is_leader {
                // Step by step (learners, voters, leadership, removals),
                // without waiting a pass between steps: a switchover is
                // learners → voters → leadership in one pass.
                for _ in 0..MEMBERSHIP_STEPS_PER_PASS {
                    match group.sync_membership(&desired).await {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            tracing::info!(pg = rec.id, error = %e, "membership change not made yet");
                            break;
                        }
                    }
                }
            }
        }
        let catalog_generation = records
            .iter()
            .find(|r| r.id == PgId::CATALOG.0)
            .map(|r| r.generation);
        if self
            .group(PgId::CATALOG)
            .is_some_and(|g| g.metrics().is_leader && Some(g.generation().0) == catalog_generation)
        {
            self.place_catalog_voters(&records, &nodes).await?;
            self.place_missing_members(&records, &nodes).await?;
        }
        Ok(())
    }

    /// On the catalog leader: proposes the catalog's voters when they are
    /// not where [`placement::catalog_voters`] wants them (a witness joined
    /// or left, a voter's node was removed).
    async fn place_catalog_voters(
        &self,
        records: &[pb::PgRecord],
        nodes: &[pb::NodeRecord],
    ) -> NodeResult<()> {
        let Some(p0) = records.iter().find(|r| r.id == 0) else {
            return Ok(());
        };
        let Some(cluster) = self
            .catalog
            .cluster()
            .map_err(NodeError::io("read catalog"))?
        else {
            return Ok(());
        };
        let want = placement::catalog_voters(&cluster.site, &p0.members, nodes);
        let have: std::collections::BTreeSet<u64> = p0
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.member_id)
            .collect();
        if want.is_empty() || want == have {
            return Ok(());
        }
        tracing::info!(voters = ?want, was = ?have, "placing catalog voters");
        self.catalog_group()?
            .propose(pb::command::Kind::SetCatalogVoters(pb::SetCatalogVoters {
                voters: want.into_iter().collect(),
            }))
            .await?;
        Ok(())
    }

    /// On the catalog leader: proposes members for PGs that lack them.
    async fn place_missing_members(
        &self,
        records: &[pb::PgRecord],
        nodes: &[pb::NodeRecord],
    ) -> NodeResult<()> {
        let mut load = placement::load(records);
        // A drill's PG keeps the members it was placed on: the nodes of
        // its site that hold its source's replicas.
        for rec in records.iter().filter(|r| r.id != 0 && r.drill == 0) {
            let add = placement::missing_members(
                self.placement_policy(),
                &rec.active_site,
                &rec.members,
                nodes,
                &mut load,
            );
            if add.is_empty() {
                continue;
            }
            tracing::info!(pg = rec.id, add = ?add.iter().map(|m| (m.node_id, m.voter)).collect::<Vec<_>>(), "placing members");
            self.catalog_group()?
                .propose(pb::command::Kind::SetPgMembers(pb::SetPgMembers {
                    pg: rec.id,
                    add,
                    remove_members: Vec::new(),
                }))
                .await?;
        }
        Ok(())
    }

    fn placement_policy(&self) -> PlacementPolicy {
        PlacementPolicy {
            voters: self.config.raft.pg_voters,
            learners_per_site: self.config.raft.pg_learners_per_site,
        }
    }

    /// Stops this node's member of `pg` and takes it out of the running
    /// groups, keeping its data and its local record (a forced failover
    /// starts it again at a new generation). Call under
    /// `membership_changes`.
    pub(crate) async fn stop_member(&self, g: &ProtectionGroup) {
        if let Err(e) = g.shutdown().await {
            tracing::warn!(pg = g.pg().0, error = %e, "raft shutdown");
        }
        self.groups.write().expect("groups lock").remove(&g.pg());
    }

    /// Deletes this node's replica of `pg` (its key ranges, Raft log and
    /// state, in one synced batch), its log segment files and its Raft
    /// snapshot files. The member must be stopped.
    pub(crate) async fn wipe_replica(&self, pg: PgId) -> NodeResult<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || lifeboat_store::raft_snapshot::wipe_pg(&db, pg))
            .await
            .map_err(|e| NodeError::io("wipe a replica")(std::io::Error::other(e)))??;
        self.remove_replica_files(pg);
        Ok(())
    }

    /// Keeps this node's data of `pg` as the base of a delta resync
    /// (`crate::failback`), deleting its Raft log and state (the local
    /// member record with them), its log segment files and its Raft
    /// snapshot files. The member must be stopped.
    pub(crate) async fn keep_for_resync(&self, pg: PgId, old_generation: u64) -> NodeResult<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            lifeboat_store::resync::keep_as_base(&db, pg, old_generation)
        })
        .await
        .map_err(|e| NodeError::io("keep a replica for resync")(std::io::Error::other(e)))??;
        self.remove_replica_files(pg);
        Ok(())
    }

    /// Deletes the files beside the database that a replica's Raft log and
    /// state named: its log segments and its Raft snapshot files.
    fn remove_replica_files(&self, pg: PgId) {
        self.forget_log_files(pg);
        let snapshots = self
            .config
            .data_dir
            .join("raft-snapshots")
            .join(format!("pg-{}", pg.0));
        match std::fs::remove_dir_all(&snapshots) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %snapshots.display(), error = %e, "remove a wiped replica's raft snapshots")
            }
        }
    }

    /// Stops a member the group no longer has and forgets its log.
    async fn retire_member(&self, g: &ProtectionGroup) {
        tracing::info!(
            pg = g.pg().0,
            member = g.member_id().0,
            "retiring a member the group removed"
        );
        self.stop_member(g).await;
        if let Err(e) = members::forget(&self.db, g.pg()) {
            tracing::warn!(pg = g.pg().0, error = %e, "forget retired member");
        }
        self.forget_log_files(g.pg());
    }

    /// Refuses a write when the data dir's free space is at the reserve
    /// (`store.reserve_bytes`). Before refusing, deletes the log segments
    /// kept for reuse, which are disk the node can give back at once.
    pub fn check_reserve(&self) -> lifeboat_store::Result<()> {
        let reserve = self.config.store.reserve_bytes;
        match self.db.check_reserve(reserve) {
            Err(lifeboat_store::Error::NoSpace { .. })
                if self.release_log_segment_pool("writes at the disk reserve") > 0 =>
            {
                self.db.check_reserve(reserve)
            }
            other => other,
        }
    }

    /// Whether a write now would be refused at the reserve, counting the
    /// pooled log segments [`NodeCore::check_reserve`] would delete first
    /// (a read: nothing is deleted).
    pub fn writes_refused(&self) -> bool {
        match self.db.check_reserve(self.config.store.reserve_bytes) {
            Ok(()) => false,
            Err(lifeboat_store::Error::NoSpace {
                free_bytes,
                reserve_bytes,
            }) => free_bytes.saturating_add(self.log_segment_pool_bytes()) <= reserve_bytes,
            Err(_) => true,
        }
    }

    /// Bytes appended to this node's Raft logs since it started.
    pub fn log_bytes_appended(&self) -> u64 {
        self.syncer.appends().bytes()
    }

    /// Bytes of deleted log segments kept for reuse: disk the node gives
    /// back before it refuses a write at the reserve.
    pub fn log_segment_pool_bytes(&self) -> u64 {
        self.syncer.files().pooled_bytes()
    }

    /// Deletes the log segments kept for reuse, and keeps no more until
    /// [`NodeCore::resume_log_segment_pool`]. Returns the bytes freed.
    pub fn release_log_segment_pool(&self, why: &str) -> u64 {
        let files = self.syncer.files();
        let pooled = files.pooled();
        let freed = files.release_pool();
        if pooled > 0 {
            tracing::info!(
                segments = pooled,
                freed_bytes = freed,
                "{why}: deleted the log segments kept for reuse"
            );
        }
        freed
    }

    /// Keeps deleted log segments for reuse again (space recovered).
    pub fn resume_log_segment_pool(&self) {
        self.syncer.files().resume_pool();
    }

    /// Deletes the segment files of a log whose rows are gone. (Left
    /// behind, they would go when the node next opens the PG's log.)
    fn forget_log_files(&self, pg: PgId) {
        if let Err(e) = self.syncer.files().forget(pg) {
            tracing::warn!(pg = pg.0, error = %e, "remove a forgotten log's segment files");
        }
    }

    /// Whether this node can take admin requests: it has the master key
    /// (a witness, which never has one, once it is in a cluster).
    pub fn is_initialized(&self) -> bool {
        if self.config.role.is_witness() {
            return self.identity.cluster_id().is_some();
        }
        self.master_key.read().expect("master key lock").is_some()
    }

    pub(crate) fn master_key(&self) -> NodeResult<Arc<MasterKey>> {
        if self.config.role.is_witness() {
            return Err(NodeError::Witness {
                action: "use tenant keys or the cluster CA".into(),
            });
        }
        self.master_key
            .read()
            .expect("master key lock")
            .clone()
            .ok_or(NodeError::NotInitialized)
    }

    pub fn catalog_group(&self) -> NodeResult<ProtectionGroup> {
        self.group(PgId::CATALOG).ok_or(NodeError::NotInitialized)
    }

    pub fn group(&self, pg: PgId) -> Option<ProtectionGroup> {
        self.groups.read().expect("groups lock").get(&pg).cloned()
    }

    pub fn groups(&self) -> Vec<ProtectionGroup> {
        let mut v: Vec<_> = self
            .groups
            .read()
            .expect("groups lock")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|g| g.pg());
        v
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.identity.cluster_id()
    }

    /// Makes this node a new cluster: the master key file, the catalog and
    /// an operator token, which is returned and never stored in clear.
    pub async fn cluster_init(&self, site: &str) -> NodeResult<(String, String)> {
        if let Some(cluster_id) = self.identity.cluster_id() {
            return Err(NodeError::AlreadyInitialized { cluster_id });
        }
        if self.config.role.is_witness() {
            return Err(NodeError::Witness {
                action: "start a cluster (start it on a data node, then `node add` the witness)"
                    .into(),
            });
        }
        if site != self.config.site {
            return Err(NodeError::InvalidName {
                what: "site",
                name: site.to_owned(),
                reason: format!("this node is configured for site {:?}", self.config.site),
            });
        }
        let key_path = &self.config.master_key_file;
        let data_dir = std::fs::canonicalize(&self.config.data_dir)
            .map_err(NodeError::io("resolve data dir"))?;
        let key_dir = key_path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(key_dir)
            .map_err(NodeError::io(format!("create {}", key_dir.display())))?;
        let key_dir_abs =
            std::fs::canonicalize(key_dir).map_err(NodeError::io("resolve key dir"))?;
        if key_dir_abs.starts_with(&data_dir) {
            return Err(NodeError::MasterKeyInsideDataDir {
                path: key_path.clone(),
                data_dir,
            });
        }
        // A key file left by an init that crashed before the catalog
        // committed is reused: it has never protected anything else.
        let master = if key_path.exists() {
            tracing::warn!(path = %key_path.display(), "reusing the master key file of an unfinished init");
            MasterKey::load(key_path)?
        } else {
            MasterKey::create(key_path)?
        };
        let cluster_id = random_hex(16);
        let ca = ClusterCa::generate(&cluster_id)?;
        let (node_key, csr) = pki::new_key_and_csr(&format!("node-{}", self.config.node_id))?;
        let cert_pem = ca.sign_node(&csr, self.config.node_id, &Self::cert_ips(&self.addrs()))?;
        let ca_key_sealed = master.seal_secret(CA_KEY_PURPOSE, ca.key_pem().as_bytes());
        *self.master_key.write().expect("master key lock") = Some(Arc::new(master));
        self.install_tls(NodeTls {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem,
            key_pem: node_key,
        })?;

        members::bind_cluster(&self.db, &cluster_id).map_err(NodeError::io("bind cluster"))?;
        self.identity.set_cluster_id(&cluster_id);
        let catalog = self
            .start_member(LocalMember {
                pg: PgId::CATALOG,
                member: MemberId(catalog::FIRST_CATALOG_MEMBER),
                generation: Generation(0),
            })
            .await?;
        catalog
            .initialize(
                [(catalog::FIRST_CATALOG_MEMBER, self.member_node())]
                    .into_iter()
                    .collect(),
            )
            .await?;
        catalog.campaign().await;
        catalog.wait_for_leadership(LEADERSHIP_WAIT).await?;
        let token = format!("lbo_{}", random_hex(32));
        catalog
            .propose(pb::command::Kind::InitCatalog(pb::InitCatalog {
                cluster_id: cluster_id.clone(),
                site: site.to_owned(),
                node_id: self.config.node_id,
                operator_token_sha256: sha256(token.as_bytes()).into(),
                addrs: Some(self.addrs()),
                ca_cert_pem: ca.cert_pem().to_owned(),
                ca_key_sealed: ca_key_sealed.into(),
            }))
            .await?;
        tracing::info!(cluster_id, site, "cluster initialised");
        Ok((cluster_id, token))
    }

    /// The role of a bearer token, or `Unauthenticated`.
    pub fn authenticate(&self, token: &str) -> NodeResult<Role> {
        let record = self
            .catalog
            .token(&sha256(token.as_bytes()))
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::Unauthenticated)?;
        Role::parse(&record.role).ok_or(NodeError::Unauthenticated)
    }

    fn load_tenant_keys(&self, tenant: &pb::TenantRecord) -> NodeResult<Arc<TenantKeys>> {
        let master = self.master_key()?;
        let mut keys: Option<TenantKeys> = None;
        let mut ids: Vec<_> = tenant.wrapped_deks.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let dek = master.unwrap_dek(&tenant.name, &tenant.wrapped_deks[&id])?;
            match keys.as_mut() {
                None => keys = Some(TenantKeys::new(dek)),
                Some(k) => k.add(dek),
            }
        }
        let keys = keys.ok_or_else(|| NodeError::TenantNotFound(tenant.name.clone()))?;
        self.keyring.insert(&tenant.name, keys);
        self.keyring
            .get(&tenant.name)
            .ok_or_else(|| NodeError::TenantNotFound(tenant.name.clone()))
    }

    /// The tenant's keys, reloaded from the catalog when the keyring lacks
    /// them or lacks `needed` (a key another node's rotation added).
    pub fn tenant_keys(&self, tenant: &str, needed: Option<KeyId>) -> NodeResult<Arc<TenantKeys>> {
        if let Some(keys) = self.keyring.get(tenant)
            && needed.is_none_or(|id| keys.get(id).is_some())
        {
            return Ok(keys);
        }
        let record = self
            .catalog
            .tenant(tenant)
            .map_err(NodeError::io("read catalog"))?
            .ok_or_else(|| NodeError::TenantNotFound(tenant.to_owned()))?;
        self.load_tenant_keys(&record)
    }

    pub fn tenant(&self, name: &str) -> NodeResult<pb::TenantRecord> {
        self.catalog
            .tenant(name)
            .map_err(NodeError::io("read catalog"))?
            .ok_or_else(|| NodeError::TenantNotFound(name.to_owned()))
    }

    pub fn tenants(&self) -> NodeResult<Vec<pb::TenantRecord>> {
        self.catalog
            .tenants()
            .map_err(NodeError::io("read catalog"))
    }

    pub async fn create_tenant(&self, name: &str) -> NodeResult<pb::TenantRecord> {
        names::validate_name("tenant", name)?;
        let master = self.master_key()?;
        let dek = Dek::generate(KeyId(1));
        let wrapped = master.wrap_dek(name, &dek);
        let members = self.new_pg_placement()?;
        let (_, applied) = self
            .propose_catalog(pb::command::Kind::CreateTenant(pb::CreateTenant {
                name: name.to_owned(),
                wrapped_dek: wrapped.into(),
                members,
            }))
            .await?;
        let Applied::TenantCreated { main_pg, .. } = applied else {
            return Err(NodeError::unexpected_outcome("create tenant", &applied));
        };
        self.wait_pg_ready(PgId(main_pg)).await?;
        let record = self.tenant(name)?;
        self.load_tenant_keys(&record)?;
        tracing::info!(tenant = name, pg = main_pg, "tenant created");
        Ok(record)
    }

    /// Signs a client certificate for `tenant` from its signing request:
    /// with it, NBD over TLS shows and opens only that tenant's volumes.
    /// Returns the certificate and the cluster CA, as PEM.
    pub fn create_tenant_cert(&self, tenant: &str, csr_pem: &str) -> NodeResult<(String, String)> {
        self.tenant(tenant)?;
        let ca = self.cluster_ca()?;
        let cert = ca.sign_tenant(csr_pem, tenant)?;
        tracing::info!(tenant, "tenant certificate issued");
        Ok((cert, ca.cert_pem().to_owned()))
    }

    /// Starts a new DEK for new writes; frames sealed with older keys stay
    /// readable.
    pub async fn rotate_dek(&self, name: &str) -> NodeResult<pb::TenantRecord> {
        let record = self.tenant(name)?;
        let master = self.master_key()?;
        let dek = Dek::generate(KeyId(record.current_key_id + 1));
        let wrapped = master.wrap_dek(name, &dek);
        self.propose_catalog(pb::command::Kind::RotateDek(pb::RotateDek {
            tenant: name.to_owned(),
            wrapped_dek: wrapped.into(),
        }))
        .await?;
        let record = self.tenant(name)?;
        self.load_tenant_keys(&record)?;
        tracing::info!(
            tenant = name,
            key_id = record.current_key_id,
            "tenant DEK rotated"
        );
        Ok(record)
    }

    /// Creates protection group `TENANT/NAME`, placed like a tenant's main
    /// PG, and waits until it has a leader.
    pub async fn create_pg(&self, full_name: &str, ack: AckPolicy) -> NodeResult<pb::PgRecord> {
        let (tenant, name) = names::split_pg_name(full_name)?;
        self.tenant(tenant)?;
        let members = self.new_pg_placement()?;
        let (_, applied) = self
            .propose_catalog(pb::command::Kind::CreatePg(pb::CreatePg {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                ack: ack.to_pb() as i32,
                members,
                ..Default::default()
            }))
            .await?;
        let Applied::PgCreated { pg } = applied else {
            return Err(NodeError::unexpected_outcome(
                "create protection group",
                &applied,
            ));
        };
        self.wait_pg_ready(PgId(pg)).await?;
        tracing::info!(
            pg,
            name = full_name,
            ack = ack.as_str(),
            "protection group created"
        );
        self.pg_record(tenant, name)
    }

    pub async fn set_pg_ack(&self, full_name: &str, ack: AckPolicy) -> NodeResult<pb::PgRecord> {
        let (tenant, name) = names::split_pg_name(full_name)?;
        self.propose_catalog(pb::command::Kind::SetPgAck(pb::SetPgAck {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            ack: ack.to_pb() as i32,
        }))
        .await?;
        let record = self.pg_record(tenant, name)?;
        if let Some(g) = self.group(PgId(record.id)) {
            self.follow_ack_policy(&g, &record);
        }
        Ok(record)
    }

    /// Protection group `TENANT/NAME` from the catalog.
    pub fn pg_named(&self, full_name: &str) -> NodeResult<pb::PgRecord> {
        let (tenant, name) = names::split_pg_name(full_name)?;
        self.pg_record(tenant, name)
    }

    /// Every tenant PG in the catalog, of `tenant` only when it is given.
    pub fn pg_records(&self, tenant: Option<&str>) -> NodeResult<Vec<pb::PgRecord>> {
        Ok(self
            .catalog
            .pgs()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .filter(|p| tenant.is_none_or(|t| p.tenant == t))
            .collect())
    }

    fn pg_record(&self, tenant: &str, pg_name: &str) -> NodeResult<pb::PgRecord> {
        self.catalog
            .pg(tenant, pg_name)
            .map_err(NodeError::io("read catalog"))?
            .ok_or_else(|| NodeError::PgNotFound(format!("{tenant}/{pg_name}")))
    }

    pub fn tenant_pg_names(&self, tenant_id: u64) -> NodeResult<Vec<String>> {
        Ok(self
            .catalog
            .pgs()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .filter(|p| p.tenant_id == tenant_id)
            .map(|p| p.name)
            .collect())
    }

    /// Where a new PG's members go, from the catalog's live nodes.
    fn new_pg_placement(&self) -> NodeResult<Vec<pb::PlacedMember>> {
        let io = || NodeError::io("read catalog");
        let cluster = self
            .catalog
            .cluster()
            .map_err(io())?
            .ok_or(NodeError::NotInitialized)?;
        let nodes = self.catalog.nodes().map_err(io())?;
        let mut records = self.catalog.pgs().map_err(io())?;
        records.extend(self.catalog.catalog_placement().map_err(io())?);
        let mut load = placement::load(&records);
        Ok(placement::missing_members(
            self.placement_policy(),
            &cluster.site,
            &[],
            &nodes,
            &mut load,
        ))
    }

    /// Waits until a new PG has a leader, as far as this node can tell: it
    /// runs a member that knows the leader, or it hosts no member at all.
    pub(crate) async fn wait_pg_ready(&self, pg: PgId) -> NodeResult<()> {
        let deadline = std::time::Instant::now() + LEADERSHIP_WAIT;
        let mut campaigned = std::time::Instant::now();
        loop {
            let record = self
                .catalog
                .pg_by_id(pg.0)
                .map_err(NodeError::io("read catalog"))?;
            let hosted_here = record
                .as_ref()
                .is_some_and(|r| r.members.iter().any(|m| m.node_id == self.config.node_id));
            if !hosted_here {
                return Ok(());
            }
            if let Some(g) = self.group(pg) {
                let m = g.metrics();
                if m.leader.is_some() {
                    return Ok(());
                }
                // The other voters start within a reconcile pass of their
                // nodes; a voter here campaigns again rather than waiting
                // out an election timeout (pre-vote makes this harmless).
                if m.voters.contains(&m.member.0) && campaigned.elapsed() > CAMPAIGN_RETRY {
                    g.campaign().await;
                    campaigned = std::time::Instant::now();
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(lifeboat_replication::Error::NoLeader {
                    pg: pg.0,
                    waited_ms: LEADERSHIP_WAIT.as_millis() as u64,
                    last: "the new protection group elected no leader".into(),
                }
                .into());
            }
            // The reconciler starts and initialises the member.
            self.reconcile_once().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn running_group(&self, pg: u64) -> NodeResult<ProtectionGroup> {
        if let Some(g) = self.group(PgId(pg)) {
            return Ok(g);
        }
        let nodes = self
            .catalog
            .pg_by_id(pg)
            .map_err(NodeError::io("read catalog"))?
            .map(|r| r.members.iter().map(|m| m.node_id).collect())
            .unwrap_or_default();
        Err(NodeError::NotHostedHere { pg, nodes })
    }

    pub async fn create_volume(
        &self,
        full_name: &str,
        size_bytes: u64,
        pg_name: &str,
    ) -> NodeResult<VolumeInfo> {
        names::validate_volume_size(size_bytes)?;
        self.create_volume_with_base(full_name, size_bytes, pg_name, None)
            .await
    }

    /// Creates a volume, or with `base` a clone reading through to it.
    pub(crate) async fn create_volume_with_base(
        &self,
        full_name: &str,
        size_bytes: u64,
        pg_name: &str,
        base: Option<pb::VolumeBase>,
    ) -> NodeResult<VolumeInfo> {
        let (tenant, volume_name) = names::split_volume_name(full_name)?;
        let pg_name = if pg_name.is_empty() { MAIN_PG } else { pg_name };
        names::validate_name("protection group", pg_name)?;
        self.tenant(tenant)?;
        self.pg_record(tenant, pg_name)?;
        let (_, applied) = self
            .catalog_group()?
            .propose(pb::command::Kind::BindVolumeName(pb::BindVolumeName {
                tenant: tenant.to_owned(),
                volume_name: volume_name.to_owned(),
                pg_name: pg_name.to_owned(),
                existing_volume: None,
            }))
            .await?;
        let Applied::VolumeNameBound { pg, volume } = applied else {
            return Err(NodeError::unexpected_outcome("bind volume name", &applied));
        };
        let created = self
            .running_group(pg)?
            .propose(pb::command::Kind::CreateVolume(pb::CreateVolume {
                volume,
                name: volume_name.to_owned(),
                size_bytes,
                base,
            }))
            .await;
        let (index, _) = match created {
            Ok(ok) => ok,
            Err(e) => {
                // Give the name back so that a retry can bind it again.
                let unbind = pb::command::Kind::UnbindVolumeName(pb::UnbindVolumeName {
                    tenant: tenant.to_owned(),
                    volume_name: volume_name.to_owned(),
                });
                if let Err(undo) = self.catalog_group()?.propose(unbind).await {
                    tracing::error!(volume = full_name, error = %undo, "could not unbind the name of a volume whose creation failed");
                }
                return Err(e.into());
            }
        };
        tracing::info!(volume = full_name, size_bytes, pg, "volume created");
        Ok(VolumeInfo {
            tenant: tenant.to_owned(),
            name: volume_name.to_owned(),
            pg_name: pg_name.to_owned(),
            pg: PgId(pg),
            volume: VolumeId(volume),
            size_bytes,
            created_index: index,
        })
    }

    /// Resolves `tenant/volume` to its group and current record.
    pub fn locate_volume(&self, full_name: &str) -> NodeResult<VolumeLocation> {
        let (tenant, volume_name) = names::split_volume_name(full_name)?;
        let tenant_record = self.tenant(tenant)?;
        let bound = self
            .catalog
            .volume_name(tenant, volume_name)
            .map_err(NodeError::io("read catalog"))?
            .ok_or_else(|| NodeError::VolumeNotFound(full_name.to_owned()))?;
        let group = self.running_group(bound.pg)?;
        let (_, record) = self
            .volumes
            .volume(PgId(bound.pg), VolumeId(bound.volume))?
            .filter(|(_, r)| r.state == VolumeState::Active)
            .ok_or_else(|| NodeError::VolumeNotFound(full_name.to_owned()))?;
        Ok(VolumeLocation {
            tenant: tenant.to_owned(),
            tenant_id: TenantId(tenant_record.id),
            volume_name: volume_name.to_owned(),
            group,
            volume: VolumeId(bound.volume),
            record,
        })
    }

    pub fn list_volumes(&self, tenant: &str) -> NodeResult<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for (name, bound) in self
            .catalog
            .volume_names(tenant)
            .map_err(NodeError::io("read catalog"))?
        {
            let Some((_, record)) = self
                .volumes
                .volume(PgId(bound.pg), VolumeId(bound.volume))?
            else {
                continue;
            };
            if record.state != VolumeState::Active {
                continue;
            }
            let created_index = self
                .volumes
                .volume_history_first(PgId(bound.pg), VolumeId(bound.volume))?
                .unwrap_or(LogIndex(0));
            let pg_name = self
                .catalog
                .pg_by_id(bound.pg)
                .map_err(NodeError::io("read catalog"))?
                .map_or_else(|| bound.pg.to_string(), |p| p.name);
            out.push(VolumeInfo {
                tenant: tenant.to_owned(),
                name,
                pg_name,
                pg: PgId(bound.pg),
                volume: VolumeId(bound.volume),
                size_bytes: record.size_bytes,
                created_index,
            });
        }
        Ok(out)
    }

    /// Creates an S3 credential for `tenant` and returns it with its secret,
    /// which is shown this once: the catalog keeps it sealed by the master
    /// key. Access keys look like AWS's (20 characters, `LB` first) and
    /// secrets are 40 characters, so every S3 client takes them.
    pub async fn create_credential(
        &self,
        tenant: &str,
        mode: CredentialMode,
        writable_prefix: Option<&str>,
    ) -> NodeResult<(CredentialInfo, String)> {
        self.tenant(tenant)?;
        let writable_prefix = match (mode, writable_prefix) {
            (CredentialMode::AppendOnly, None) => DEFAULT_WRITABLE_PREFIX.to_owned(),
            (CredentialMode::AppendOnly, Some(p)) => p.to_owned(),
            (_, Some(_)) => {
                return Err(NodeError::InvalidName {
                    what: "writable prefix",
                    name: writable_prefix.unwrap_or_default().to_owned(),
                    reason: "only append-only credentials have one".into(),
                });
            }
            (_, None) => String::new(),
        };
        if writable_prefix.len() > lifeboat_store::objects::OBJECT_KEY_BYTES_MAX {
            return Err(NodeError::InvalidName {
                what: "writable prefix",
                name: writable_prefix,
                reason: "it is longer than an object key may be".into(),
            });
        }
        let access_key = format!(
            "LB{}",
            random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 18)
        );
        let secret = random_string(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
            40,
        );
        let secret_sealed = self
            .master_key()?
            .seal_secret(&credential_purpose(&access_key), secret.as_bytes());
        self.propose_catalog(pb::command::Kind::CreateCredential(pb::CreateCredential {
            tenant: tenant.to_owned(),
            access_key: access_key.clone(),
            secret_sealed: secret_sealed.into(),
            mode: mode.as_str().to_owned(),
            writable_prefix,
        }))
        .await?;
        tracing::info!(
            tenant,
            access_key,
            mode = mode.as_str(),
            "S3 credential created"
        );
        let info = self
            .credential(&access_key)?
            .ok_or_else(|| NodeError::CredentialNotFound(access_key.clone()))?
            .0;
        Ok((info, secret))
    }

    /// A credential and its secret (opened with the master key), for
    /// checking a request's signature.
    pub fn credential(&self, access_key: &str) -> NodeResult<Option<(CredentialInfo, String)>> {
        let Some(record) = self
            .catalog
            .credential(access_key)
            .map_err(NodeError::io("read catalog"))?
        else {
            return Ok(None);
        };
        let secret = self
            .master_key()?
            .open_secret(&credential_purpose(access_key), &record.secret_sealed)?;
        let secret = String::from_utf8(secret).map_err(|_| NodeError::Io {
            op: format!("open the secret of access key {access_key}"),
            source: std::io::Error::other("not UTF-8"),
        })?;
        Ok(Some((credential_info(&record)?, secret)))
    }

    /// A credential without its secret (what it may do, for whom).
    pub fn credential_info(&self, access_key: &str) -> NodeResult<Option<CredentialInfo>> {
        self.catalog
            .credential(access_key)
            .map_err(NodeError::io("read catalog"))?
            .as_ref()
            .map(credential_info)
            .transpose()
    }

    pub fn list_credentials(&self, tenant: &str) -> NodeResult<Vec<CredentialInfo>> {
        let tenant_record = self.tenant(tenant)?;
        self.catalog
            .credentials(tenant_record.id)
            .map_err(NodeError::io("read catalog"))?
            .iter()
            .map(credential_info)
            .collect()
    }

    /// Revokes a credential: the next request signed with it is refused.
    pub async fn revoke_credential(&self, access_key: &str) -> NodeResult<()> {
        self.propose_catalog(pb::command::Kind::RevokeCredential(pb::RevokeCredential {
            access_key: access_key.to_owned(),
        }))
        .await?;
        tracing::info!(access_key, "S3 credential revoked");
        Ok(())
    }

    /// Creates bucket `TENANT/BUCKET` in the tenant's PG `pg_name` (`main`
    /// when empty). The name is bound in the catalog first (bucket names
    /// are unique in the cluster), then the bucket is created in its PG; a
    /// failure of the second step gives the name back.
    pub async fn create_bucket(&self, full_name: &str, pg_name: &str) -> NodeResult<BucketInfo> {
        self.create_bucket_with_base(full_name, pg_name, None).await
    }

    /// Creates a bucket, or with `base` a clone showing it.
    pub(crate) async fn create_bucket_with_base(
        &self,
        full_name: &str,
        pg_name: &str,
        base: Option<pb::BucketBase>,
    ) -> NodeResult<BucketInfo> {
        let (tenant, bucket_name) = names::split_bucket_name(full_name)?;
        let pg_name = if pg_name.is_empty() { MAIN_PG } else { pg_name };
        names::validate_name("protection group", pg_name)?;
        self.tenant(tenant)?;
        self.pg_record(tenant, pg_name)?;
        let (_, applied) = self
            .propose_catalog(pb::command::Kind::BindBucketName(pb::BindBucketName {
                tenant: tenant.to_owned(),
                bucket_name: bucket_name.to_owned(),
                pg_name: pg_name.to_owned(),
                existing_bucket: None,
            }))
            .await?;
        let Applied::BucketNameBound { pg, bucket } = applied else {
            return Err(NodeError::unexpected_outcome("bind bucket name", &applied));
        };
        let group = self.running_group(pg)?;
        let created = group
            .propose(pb::command::Kind::CreateBucket(pb::CreateBucket {
                bucket,
                name: bucket_name.to_owned(),
                base,
            }))
            .await;
        // Read back from this node's replica, which may apply the entry a
        // round trip after the leader that answered the proposal.
        let created = match created {
            Ok((index, _)) => group
                .wait_applied_index(index, LEADERSHIP_WAIT)
                .await
                .map_err(NodeError::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = created {
            let unbind = pb::command::Kind::UnbindBucketName(pb::UnbindBucketName {
                tenant: tenant.to_owned(),
                bucket_name: bucket_name.to_owned(),
            });
            if let Err(undo) = self.propose_catalog(unbind).await {
                tracing::error!(bucket = full_name, error = %undo, "could not unbind the name of a bucket whose creation failed");
            }
            return Err(e);
        }
        tracing::info!(bucket = full_name, pg, "bucket created");
        self.bucket_info(tenant, bucket_name)?
            .ok_or_else(|| NodeError::BucketNotFound(full_name.to_owned()))
    }

    /// The bucket named `bucket_name`, if `tenant` owns it and it is live;
    /// `NotHostedHere` (naming the nodes that do) when this node has no
    /// replica of its PG to tell.
    pub(crate) fn bucket_info(
        &self,
        tenant: &str,
        bucket_name: &str,
    ) -> NodeResult<Option<BucketInfo>> {
        let tenant_record = self.tenant(tenant)?;
        let Some(bound) = self
            .catalog
            .bucket_name(bucket_name)
            .map_err(NodeError::io("read catalog"))?
            .filter(|b| b.tenant_id == tenant_record.id)
        else {
            return Ok(None);
        };
        self.running_group(bound.pg)?;
        self.bucket_info_of(tenant, bucket_name, &bound)
    }

    /// The catalog's binding of bucket name `name` (which tenant owns it,
    /// in which PG), whoever owns it.
    pub fn bucket_binding(&self, name: &str) -> NodeResult<Option<pb::BucketNameRecord>> {
        self.catalog
            .bucket_name(name)
            .map_err(NodeError::io("read catalog"))
    }

    /// The live bucket `bound` names, as this node's replica of its PG has
    /// it (`None` if it has none yet, or the bucket is deleted).
    pub fn bucket_info_of(
        &self,
        tenant: &str,
        bucket_name: &str,
        bound: &pb::BucketNameRecord,
    ) -> NodeResult<Option<BucketInfo>> {
        let Some((_, record)) = self
            .objects
            .bucket(PgId(bound.pg), BucketId(bound.bucket))?
        else {
            return Ok(None);
        };
        if record.state != BucketState::Active {
            return Ok(None);
        }
        let pg_name = self
            .catalog
            .pg_by_id(bound.pg)
            .map_err(NodeError::io("read catalog"))?
            .map_or_else(|| bound.pg.to_string(), |p| p.name);
        Ok(Some(BucketInfo {
            tenant: tenant.to_owned(),
            name: bucket_name.to_owned(),
            pg_name,
            pg: PgId(bound.pg),
            bucket: BucketId(bound.bucket),
            created_ms: record.created_ms,
            base: record.base,
        }))
    }

    /// The tenant's live buckets, by name. A bucket whose PG has no member
    /// on this node is listed once this node's replica of it exists.
    pub fn list_buckets(&self, tenant: &str) -> NodeResult<Vec<BucketInfo>> {
        let tenant_record = self.tenant(tenant)?;
        let mut out = Vec::new();
        for (name, bound) in self
            .catalog
            .bucket_names(tenant_record.id)
            .map_err(NodeError::io("read catalog"))?
        {
            if let Some(info) = self.bucket_info_of(tenant, &name, &bound)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Deletes an empty bucket (refused while it holds a live object) and
    /// gives its name back.
    pub async fn delete_bucket(&self, full_name: &str) -> NodeResult<()> {
        let (tenant, bucket_name) = names::split_bucket_name(full_name)?;
        let info = self
            .bucket_info(tenant, bucket_name)?
            .ok_or_else(|| NodeError::BucketNotFound(full_name.to_owned()))?;
        self.running_group(info.pg.0)?
            .propose(pb::command::Kind::DeleteBucket(pb::DeleteBucket {
                bucket: info.bucket.0,
            }))
            .await?;
        self.propose_catalog(pb::command::Kind::UnbindBucketName(pb::UnbindBucketName {
            tenant: tenant.to_owned(),
            bucket_name: bucket_name.to_owned(),
        }))
        .await?;
        tracing::info!(bucket = full_name, "bucket deleted");
        Ok(())
    }

    pub async fn resize_volume(&self, full_name: &str, size_bytes: u64) -> NodeResult<VolumeInfo> {
        names::validate_volume_size(size_bytes)?;
        let loc = self.locate_volume(full_name)?;
        loc.group
            .propose(pb::command::Kind::ResizeVolume(pb::ResizeVolume {
                volume: loc.volume.0,
                size_bytes,
            }))
            .await?;
        self.list_volumes(&loc.tenant)?
            .into_iter()
            .find(|v| v.volume == loc.volume)
            .ok_or_else(|| NodeError::VolumeNotFound(full_name.to_owned()))
    }

    pub async fn delete_volume(&self, full_name: &str) -> NodeResult<()> {
        let loc = self.locate_volume(full_name)?;
        loc.group
            .propose(pb::command::Kind::DeleteVolume(pb::DeleteVolume {
                volume: loc.volume.0,
            }))
            .await?;
        self.catalog_group()?
            .propose(pb::command::Kind::UnbindVolumeName(pb::UnbindVolumeName {
                tenant: loc.tenant.clone(),
                volume_name: loc.volume_name.clone(),
            }))
            .await?;
        tracing::info!(volume = full_name, "volume deleted");
        Ok(())
    }

    /// Proposes a catalog command and waits until this node's own catalog
    /// replica has applied it, so that what the caller reads next from the
    /// local catalog includes it (a follower learns the commit a round trip
    /// after the leader).
    pub(crate) async fn propose_catalog(
        &self,
        kind: pb::command::Kind,
    ) -> NodeResult<(LogIndex, Applied)> {
        let catalog = self.catalog_group()?;
        let (index, applied) = catalog.propose(kind).await?;
        catalog.wait_applied_index(index, LEADERSHIP_WAIT).await?;
        Ok((index, applied))
    }

    /// Makes a one-time join token for a node at `site` (any site when
    /// empty), valid for `ttl`. The token names this node's admin address
    /// and pins the cluster CA; only its hash is stored.
    pub async fn create_join_token(&self, site: &str, ttl: Duration) -> NodeResult<(String, u64)> {
        if !site.is_empty() {
            names::validate_name("site", site)?;
        }
        let tls = self.node_tls().ok_or(NodeError::NotInitialized)?;
        let secret = random_hex(32);
        if ttl > JOIN_TOKEN_TTL_MAX {
            return Err(NodeError::InvalidSize {
                reason: format!(
                    "a join token lives at most {} hours",
                    JOIN_TOKEN_TTL_MAX.as_secs() / 3600
                ),
            });
        }
        let expires_ms = SystemClock.now_ms() + ttl.as_millis() as u64;
        self.catalog_group()?
            .propose(pb::command::Kind::CreateJoinToken(pb::CreateJoinToken {
                token_sha256: sha256(secret.as_bytes()).into(),
                site: site.to_owned(),
                expires_ms,
            }))
            .await?;
        let token = JoinToken {
            secret,
            ca_fingerprint: pki::fingerprint(&tls.ca_pem)?,
            admin_addr: self.addrs().admin,
        };
        Ok((token.to_string(), expires_ms))
    }

    /// On a member, for a joining node: spends its token, records it in the
    /// catalog (which gives it a catalog member) and signs its certificate.
    /// A node whose join was recorded but whose reply was lost may ask
    /// again with the same token.
    pub async fn admit_node(
        &self,
        req: api::AdmitNodeRequest,
    ) -> NodeResult<api::AdmitNodeResponse> {
        let cluster_id = self
            .identity
            .cluster_id()
            .ok_or(NodeError::NotInitialized)?;
        names::validate_name("site", &req.site)?;
        let token_sha256 = sha256(req.secret.as_bytes());
        let addrs = req.addrs.clone().unwrap_or_default();
        if addrs.raft.parse::<std::net::SocketAddr>().is_err() {
            return Err(NodeError::InvalidName {
                what: "raft address",
                name: addrs.raft.clone(),
                reason: "the joining node must give its Raft host:port".into(),
            });
        }
        // Sign first: a request that is not a CSR spends no token.
        let cert_pem =
            self.cluster_ca()?
                .sign_node(&req.csr_pem, req.node_id, &Self::cert_ips(&addrs))?;
        let node_key_sha256 = pki::csr_key_sha256(&req.csr_pem)?;
        let added = self
            .catalog_group()?
            .propose(pb::command::Kind::AddNode(pb::AddNode {
                node_id: req.node_id,
                site: req.site.clone(),
                addrs: Some(addrs.clone()),
                join_token_sha256: token_sha256.clone().into(),
                node_key_sha256: node_key_sha256.clone().into(),
                witness: req.witness,
            }))
            .await;
        let catalog_member = match added {
            Ok((_, Applied::NodeAdded { catalog_member, .. })) => catalog_member,
            Ok((_, other)) => {
                return Err(NodeError::unexpected_outcome("add node", &other));
            }
            Err(lifeboat_replication::Error::Rejected {
                rejection: lifeboat_replication::Rejection::JoinToken { reason },
                ..
            }) => return Err(NodeError::JoinToken { reason }),
            // The same node with the same token again: its join was
            // recorded; answer again.
            Err(
                e @ lifeboat_replication::Error::Rejected {
                    rejection: lifeboat_replication::Rejection::NodeExists { .. },
                    ..
                },
            ) => {
                // The same node, the same key, within the token's life.
                let now = SystemClock.now_ms();
                let spent_by_it = self
                    .catalog
                    .join_token(&token_sha256)
                    .map_err(NodeError::io("read catalog"))?
                    .is_some_and(|t| {
                        t.used_by_node == req.node_id
                            && t.node_key_sha256.as_ref() == node_key_sha256.as_slice()
                            && now <= t.expires_ms
                    });
                match self.unfinished_join(req.node_id, &addrs.raft)? {
                    Some(member) if spent_by_it => member,
                    _ => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(
            node = req.node_id,
            site = req.site,
            raft = addrs.raft,
            "node admitted"
        );
        Ok(api::AdmitNodeResponse {
            cluster_id,
            ca_cert_pem: self
                .node_tls()
                .map(|t| t.ca_pem)
                .ok_or(NodeError::NotInitialized)?,
            cert_pem,
            catalog_member,
            // After a rebuild (`--catalog-lost`) the catalog is at a later
            // generation: a member started at 0 would be refused by every
            // other, and as a voter would cost the catalog its quorum.
            catalog_generation: self.catalog_group()?.generation().0,
        })
    }

    /// On a new node: joins the cluster a token names. Makes this node's
    /// key, has a member admit it and sign its certificate, checks the
    /// cluster's CA against the token, then binds this node to the cluster
    /// (once, for ever) and starts its catalog member, which the catalog's
    /// leader then fills. Placement then gives it PG members.
    pub async fn join_cluster(&self, token: &str) -> NodeResult<pb::NodeRecord> {
        // One join at a time: a second one finds the first one's cluster.
        let _changes = self.membership_changes.lock().await;
        if let Some(cluster_id) = self.identity.cluster_id() {
            return Err(NodeError::AlreadyInitialized { cluster_id });
        }
        let token: JoinToken = token.parse()?;
        let (key_pem, csr_pem) = pki::new_key_and_csr(&format!("node-{}", self.config.node_id))?;
        let endpoint = format!("http://{}", token.admin_addr);
        let peer = |reason: String| NodeError::Peer {
            addr: token.admin_addr.clone(),
            reason,
        };
        let mut client = lifeboat_proto::admin::admin_client::AdminClient::connect(endpoint)
            .await
            .map_err(|e| peer(format!("connect: {e}")))?;
        // Check the cluster before giving it the token's secret.
        let ca = client
            .cluster_ca(api::ClusterCaRequest {})
            .await
            .map_err(|s| peer(s.message().to_owned()))?
            .into_inner()
            .ca_cert_pem;
        let presented = pki::fingerprint(&ca)?;
        if presented != token.ca_fingerprint {
            return Err(NodeError::JoinToken {
                reason: format!(
                    "the node at {} presented CA {presented}, but the token pins {}: not the cluster that made the token",
                    token.admin_addr, token.ca_fingerprint
                ),
            });
        }
        let admitted = client
            .admit_node(api::AdmitNodeRequest {
                secret: token.secret.clone(),
                node_id: self.config.node_id,
                site: self.config.site.clone(),
                addrs: Some(self.addrs()),
                csr_pem,
                witness: self.config.role.is_witness(),
            })
            .await
            .map_err(|s| match s.code() {
                // It answered with a decision: keep its code (exit codes).
                tonic::Code::AlreadyExists
                | tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::NotFound => NodeError::PeerRefused {
                    addr: token.admin_addr.clone(),
                    code: s.code(),
                    message: s.message().to_owned(),
                },
                _ => peer(s.message().to_owned()),
            })?
            .into_inner();
        if admitted.ca_cert_pem != ca {
            return Err(NodeError::JoinToken {
                reason: format!("the node at {} changed its CA mid-join", token.admin_addr),
            });
        }
        members::bind_cluster(&self.db, &admitted.cluster_id)
            .map_err(NodeError::io("bind cluster"))?;
        self.identity.set_cluster_id(&admitted.cluster_id);
        self.install_tls(NodeTls {
            ca_pem: admitted.ca_cert_pem,
            cert_pem: admitted.cert_pem,
            key_pem,
        })?;
        self.start_member(LocalMember {
            pg: PgId::CATALOG,
            member: MemberId(admitted.catalog_member),
            generation: Generation(admitted.catalog_generation),
        })
        .await?;
        self.load_master_key_if_present()?;
        tracing::info!(
            cluster_id = admitted.cluster_id,
            catalog_member = admitted.catalog_member,
            "joined the cluster"
        );
        Ok(pb::NodeRecord {
            id: self.config.node_id,
            site: self.config.site.clone(),
            addrs: Some(self.addrs()),
            added_ms: SystemClock.now_ms(),
            removed: false,
            witness: self.config.role.is_witness(),
        })
    }

    /// The catalog member of a node that is recorded at `raft_addr` but may
    /// not have completed its join.
    fn unfinished_join(&self, node: u64, raft_addr: &str) -> NodeResult<Option<u64>> {
        let io = || NodeError::io("read catalog");
        let Some(rec) = self.catalog.node(node).map_err(io())? else {
            return Ok(None);
        };
        if rec.removed || rec.addrs.as_ref().is_none_or(|a| a.raft != raft_addr) {
            return Ok(None);
        }
        Ok(self
            .catalog
            .catalog_placement()
            .map_err(io())?
            .and_then(|p| p.members.into_iter().find(|m| m.node_id == node))
            .map(|m| m.member_id))
    }

    /// Retires a node for ever: its members leave every PG and placement
    /// puts replacements on other nodes. Its id is never reused.
    pub async fn remove_node(&self, node: u64) -> NodeResult<pb::NodeRecord> {
        if node == self.config.node_id {
            return Err(NodeError::InvalidName {
                what: "node",
                name: node.to_string(),
                reason: "a node cannot remove itself; ask another node".into(),
            });
        }
        self.propose_catalog(pb::command::Kind::RemoveNode(pb::RemoveNode {
            node_id: node,
        }))
        .await
        .map_err(|e| match e {
            NodeError::Replication(lifeboat_replication::Error::Rejected {
                rejection: lifeboat_replication::Rejection::NodeNotFound { .. },
                ..
            }) => NodeError::NodeNotFound(node),
            other => other,
        })?;
        tracing::info!(node, "node removed");
        self.catalog
            .node(node)
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::NodeNotFound(node))
    }

    /// `TENANT/NAME` of a PG, `catalog` for PG 0, else its number.
    pub fn pg_display_name(&self, pg: PgId) -> String {
        if pg == PgId::CATALOG {
            return "catalog".into();
        }
        match self.catalog.pg_by_id(pg.0) {
            Ok(Some(p)) => format!("{}/{}", p.tenant, p.name),
            _ => pg.0.to_string(),
        }
    }

    /// Whether the node at `raft_addr` answers on its Raft port now.
    pub async fn peer_reachable(&self, raft_addr: &str) -> bool {
        if raft_addr == self.addrs().raft {
            return true;
        }
        let deadline = Duration::from_secs(1);
        let call = async {
            let mut req = tonic::Request::new(pb::HelloRequest {});
            req.set_timeout(deadline);
            self.peers.client(raft_addr)?.hello(req).await
        };
        self.peers.within(raft_addr, deadline, call).await.is_ok()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Stops every group, then the WAL syncer: after this returns no
    /// thread of ours touches the database, so dropping the last handle
    /// closes RocksDB cleanly.
    pub async fn shutdown(&self) {
        self.stopping.cancel();
        let tasks: Vec<_> = self
            .background
            .lock()
            .expect("background lock")
            .drain(..)
            .collect();
        for task in tasks {
            let _ = task.await;
        }
        let _changes = self.membership_changes.lock().await;
        let groups: Vec<ProtectionGroup> = self
            .groups
            .write()
            .expect("groups lock")
            .drain()
            .map(|(_, g)| g)
            .collect();
        for g in groups {
            if let Err(e) = g.shutdown().await {
                tracing::warn!(pg = g.pg().0, error = %e, "raft shutdown");
            }
        }
        let syncer = self.syncer.clone();
        if tokio::task::spawn_blocking(move || syncer.stop())
            .await
            .is_err()
        {
            tracing::error!("stopping the wal syncer panicked");
        }
    }
}
