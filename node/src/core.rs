//! The node's state and its operations: opening the store, starting the
//! catalog and protection groups, cluster init, tenants and volumes. The
//! admin API and the NBD server are thin shells over this.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::AckPolicy;
use lifeboat_replication::catalog::{self, Catalog, MAIN_PG};
use lifeboat_replication::log_store::WalSyncer;
use lifeboat_replication::members::{self, LocalMember};
use lifeboat_replication::placement::{self, PlacementPolicy};
use lifeboat_replication::transport::{Identity, Peers};
use lifeboat_replication::{
    Applied, Clock, DesiredMember, GroupStart, MemberNode, ProtectionGroup, RaftTimers, Retention,
    SystemClock,
};
use lifeboat_store::db::{Db, DbOptions};
use lifeboat_store::frame::FrameCodec;
use lifeboat_store::keyring::{Dek, Keyring, MasterKey, TenantKeys};
use lifeboat_store::volumes::{VolumeRecord, VolumeState, Volumes};
use lifeboat_store::{Generation, KeyId, LogIndex, MemberId, NodeId, PgId, TenantId, VolumeId};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::error::{NodeError, NodeResult};
use crate::events::EventLog;
use crate::locks::BlockLocks;
use crate::metrics::Metrics;
use crate::names;

/// How long a freshly started group may take to elect this node.
const LEADERSHIP_WAIT: Duration = Duration::from_secs(30);

/// What a caller is allowed to do, from its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Operator,
    Tenant(String),
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s.strip_prefix("tenant:") {
            Some(t) => Some(Role::Tenant(t.to_owned())),
            None => (s == "operator").then_some(Role::Operator),
        }
    }

    pub fn may_use_tenant(&self, tenant: &str) -> bool {
        match self {
            Role::Operator => true,
            Role::Tenant(t) => t == tenant,
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
    pub catalog: Catalog,
    pub codec: FrameCodec,
    pub keyring: Keyring,
    pub metrics: Metrics,
    pub block_locks: BlockLocks,
    pub identity: Arc<Identity>,
    pub peers: Arc<Peers>,
    syncer: WalSyncer,
    clock: Arc<dyn Clock>,
    master_key: RwLock<Option<Arc<MasterKey>>>,
    groups: RwLock<HashMap<PgId, ProtectionGroup>>,
    /// The addresses this node actually listens on (a config port of 0
    /// picks one), set by the server before it serves.
    addrs: RwLock<pb::NodeAddrs>,
    /// Serialises starting and stopping members.
    membership_changes: tokio::sync::Mutex<()>,
    stopping: CancellationToken,
    pub events: Arc<EventLog>,
    /// The reconciler and the log-retention task.
    background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How often a node compares the catalog's placement with the members it
/// runs, and the PGs it leads with their Raft membership.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(300);

fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

fn random_hex(bytes: usize) -> String {
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
            catalog: Catalog::new(db.clone()),
            codec: FrameCodec::new(config.store.zstd_level),
            keyring: Keyring::new(),
            metrics: Metrics::new(),
            block_locks: BlockLocks::new(),
            identity: Identity::new(NodeId(config.node_id), binding.clone()),
            peers: Peers::with_dial(config.raft.dial.clone().into_iter().collect()),
            syncer: WalSyncer::start(db.clone()),
            clock: Arc::new(SystemClock),
            master_key: RwLock::new(None),
            groups: RwLock::new(HashMap::new()),
            addrs: RwLock::new(default_addrs),
            membership_changes: tokio::sync::Mutex::new(()),
            stopping: CancellationToken::new(),
            background: std::sync::Mutex::new(Vec::new()),
            events: Arc::new(EventLog::new(|| SystemClock.now_ms())),
            config,
            db,
        });
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
        let path = &self.config.master_key_file;
        if !path.exists() {
            tracing::warn!(path = %path.display(), "no master key file: this node replicates but cannot serve volumes until it has one");
            return Ok(());
        }
        let master = MasterKey::load(path)?;
        *self.master_key.write().expect("master key lock") = Some(Arc::new(master));
        Ok(())
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

    fn timers(&self) -> RaftTimers {
        RaftTimers {
            heartbeat_interval_ms: self.config.raft.heartbeat_interval_ms,
            election_timeout_min_ms: self.config.raft.election_timeout_min_ms,
            election_timeout_max_ms: self.config.raft.election_timeout_max_ms,
        }
    }

    /// Starts (or returns the running) member `m`, recording it locally so
    /// that a restart starts it again under the same member id.
    async fn start_member(&self, m: LocalMember) -> NodeResult<ProtectionGroup> {
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
            timers: &self.timers(),
            clock: self.clock.clone(),
            peers: self.peers.clone(),
            identity: self.identity.clone(),
            events: self.events.clone(),
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
        let retention = self.every(
            Duration::from_millis(self.config.raft.log_check_interval_ms),
            |core| async move { core.enforce_log_retention().await },
        );
        self.background
            .lock()
            .expect("background lock")
            .extend([reconciler, retention]);
    }

    /// Runs `pass` every `interval` until the node stops.
    fn every<F, Fut>(self: &Arc<Self>, interval: Duration, pass: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<NodeCore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(self);
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let Some(core) = weak.upgrade() else { return };
                pass(core).await;
            }
        })
    }

    fn follow_ack_policy(&self, group: &ProtectionGroup, record: &pb::PgRecord) {
        group.ack().set(
            AckPolicy::from_pb(record.ack),
            Duration::from_millis(self.config.raft.remote_timeout_ms),
        );
    }

    /// Keeps every member's log within `raft.log_retain_bytes`.
    async fn enforce_log_retention(&self) {
        let max_bytes = self.config.raft.log_retain_bytes;
        for g in self.groups() {
            match g.enforce_log_retention(max_bytes).await {
                Ok(Retention::Within) => {}
                Ok(done) => tracing::debug!(pg = g.pg().0, ?done, "log retention"),
                Err(e) => tracing::warn!(pg = g.pg().0, error = %e, "log retention"),
            }
        }
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
        for rec in &records {
            let pg = PgId(rec.id);
            let mine = rec.members.iter().find(|m| m.node_id == me);
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
            } else if metrics.is_leader
                && let Err(e) = group.sync_membership(&desired).await
            {
                tracing::info!(pg = rec.id, error = %e, "membership change not made yet");
            }
        }
        if self
            .group(PgId::CATALOG)
            .is_some_and(|g| g.metrics().is_leader)
        {
            self.place_missing_members(&records, &nodes).await?;
        }
        Ok(())
    }

    /// On the catalog leader: proposes members for PGs that lack them.
    async fn place_missing_members(
        &self,
        records: &[pb::PgRecord],
        nodes: &[pb::NodeRecord],
    ) -> NodeResult<()> {
        let mut load = placement::load(records);
        for rec in records.iter().filter(|r| r.id != 0) {
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

    /// Stops a member the group no longer has and forgets its log.
    async fn retire_member(&self, g: &ProtectionGroup) {
        tracing::info!(
            pg = g.pg().0,
            member = g.member_id().0,
            "retiring a member the group removed"
        );
        if let Err(e) = g.shutdown().await {
            tracing::warn!(pg = g.pg().0, error = %e, "raft shutdown");
        }
        self.groups.write().expect("groups lock").remove(&g.pg());
        if let Err(e) = members::forget(&self.db, g.pg()) {
            tracing::warn!(pg = g.pg().0, error = %e, "forget retired member");
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.master_key.read().expect("master key lock").is_some()
    }

    fn master_key(&self) -> NodeResult<Arc<MasterKey>> {
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
        *self.master_key.write().expect("master key lock") = Some(Arc::new(master));

        let cluster_id = random_hex(16);
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
            .catalog_group()?
            .propose(pb::command::Kind::CreateTenant(pb::CreateTenant {
                name: name.to_owned(),
                wrapped_dek: wrapped.into(),
                members,
            }))
            .await?;
        let Applied::TenantCreated { main_pg, .. } = applied else {
            return Err(NodeError::Io {
                op: "create tenant".into(),
                source: std::io::Error::other(format!("unexpected apply result {applied:?}")),
            });
        };
        self.wait_pg_ready(PgId(main_pg)).await?;
        let record = self.tenant(name)?;
        self.load_tenant_keys(&record)?;
        tracing::info!(tenant = name, pg = main_pg, "tenant created");
        Ok(record)
    }

    /// Starts a new DEK for new writes; frames sealed with older keys stay
    /// readable.
    pub async fn rotate_dek(&self, name: &str) -> NodeResult<pb::TenantRecord> {
        let record = self.tenant(name)?;
        let master = self.master_key()?;
        let dek = Dek::generate(KeyId(record.current_key_id + 1));
        let wrapped = master.wrap_dek(name, &dek);
        self.catalog_group()?
            .propose(pb::command::Kind::RotateDek(pb::RotateDek {
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
            .catalog_group()?
            .propose(pb::command::Kind::CreatePg(pb::CreatePg {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
                ack: ack.to_pb() as i32,
                members,
            }))
            .await?;
        let Applied::PgCreated { pg } = applied else {
            return Err(NodeError::Io {
                op: "create protection group".into(),
                source: std::io::Error::other(format!("unexpected apply result {applied:?}")),
            });
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
        self.catalog_group()?
            .propose(pb::command::Kind::SetPgAck(pb::SetPgAck {
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
    async fn wait_pg_ready(&self, pg: PgId) -> NodeResult<()> {
        let deadline = std::time::Instant::now() + LEADERSHIP_WAIT;
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
            if let Some(g) = self.group(pg)
                && g.metrics().leader.is_some()
            {
                return Ok(());
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

    fn running_group(&self, pg: u64) -> NodeResult<ProtectionGroup> {
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
        let (tenant, volume_name) = names::split_volume_name(full_name)?;
        names::validate_volume_size(size_bytes)?;
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
            }))
            .await?;
        let Applied::VolumeNameBound { pg, volume } = applied else {
            return Err(NodeError::Io {
                op: "bind volume name".into(),
                source: std::io::Error::other(format!("unexpected apply result {applied:?}")),
            });
        };
        let created = self
            .running_group(pg)?
            .propose(pb::command::Kind::CreateVolume(pb::CreateVolume {
                volume,
                name: volume_name.to_owned(),
                size_bytes,
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

    /// The join handshake, on the joining node: with `catalog_member` 0 it
    /// only says who this node is; otherwise it binds this node to the
    /// cluster (once, for ever) and starts its catalog member, which the
    /// catalog's leader then fills.
    pub async fn handle_join(&self, req: pb::JoinRequest) -> Result<pb::JoinReply, tonic::Status> {
        if req.cluster_id.is_empty() {
            return Err(tonic::Status::invalid_argument("join without a cluster id"));
        }
        if let Some(c) = self.identity.cluster_id()
            && c != req.cluster_id
        {
            return Err(tonic::Status::failed_precondition(format!(
                "node {} already belongs to cluster {c}",
                self.config.node_id
            )));
        }
        if !req.site.is_empty() && req.site != self.config.site {
            return Err(tonic::Status::invalid_argument(format!(
                "node {} is configured for site {:?}, not {:?}",
                self.config.node_id, self.config.site, req.site
            )));
        }
        if req.catalog_member != 0 {
            let _changes = self.membership_changes.lock().await;
            members::bind_cluster(&self.db, &req.cluster_id)
                .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
            self.identity.set_cluster_id(&req.cluster_id);
            if let Some(g) = self.group(PgId::CATALOG)
                && g.member_id().0 != req.catalog_member
            {
                return Err(tonic::Status::already_exists(format!(
                    "node {} already runs catalog member {}",
                    self.config.node_id,
                    g.member_id()
                )));
            }
            self.start_member(LocalMember {
                pg: PgId::CATALOG,
                member: MemberId(req.catalog_member),
                generation: Generation(req.catalog_generation),
            })
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
            self.load_master_key_if_present()
                .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
            tracing::info!(
                cluster_id = req.cluster_id,
                catalog_member = req.catalog_member,
                "joined the cluster"
            );
        }
        Ok(pb::JoinReply {
            node_id: self.config.node_id,
            site: self.config.site.clone(),
            addrs: Some(self.addrs()),
        })
    }

    async fn join_rpc(&self, raft_addr: &str, req: pb::JoinRequest) -> NodeResult<pb::JoinReply> {
        let peer = |reason: String| NodeError::Peer {
            addr: raft_addr.to_owned(),
            reason,
        };
        let mut client = self
            .peers
            .client(raft_addr)
            .map_err(|s| peer(s.message().to_owned()))?;
        client
            .join(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| peer(format!("{:?}: {}", s.code(), s.message())))
    }

    /// Adds the node listening at `raft_addr` (started with `node start`,
    /// not yet in a cluster) to this cluster: asks who it is, records it in
    /// the catalog (which gives it a catalog member), then tells it to join.
    /// Placement then gives it members of the PGs that lack them.
    pub async fn add_node(&self, raft_addr: &str, site: &str) -> NodeResult<pb::NodeRecord> {
        let cluster_id = self
            .identity
            .cluster_id()
            .ok_or(NodeError::NotInitialized)?;
        let probe = pb::JoinRequest {
            cluster_id: cluster_id.clone(),
            site: site.to_owned(),
            catalog_member: 0,
            catalog_generation: 0,
        };
        let who = self.join_rpc(raft_addr, probe).await?;
        let mut addrs = who.addrs.clone().unwrap_or_default();
        // The address the operator reached it at is the one peers use.
        addrs.raft = raft_addr.to_owned();
        let added = self
            .catalog_group()?
            .propose(pb::command::Kind::AddNode(pb::AddNode {
                node_id: who.node_id,
                site: who.site.clone(),
                addrs: Some(addrs),
            }))
            .await;
        let catalog_member = match added {
            Ok((_, Applied::NodeAdded { catalog_member, .. })) => catalog_member,
            Ok((_, other)) => {
                return Err(NodeError::Io {
                    op: "add node".into(),
                    source: std::io::Error::other(format!("unexpected apply result {other:?}")),
                });
            }
            // A retry of an add whose join did not finish: join again.
            Err(
                e @ lifeboat_replication::Error::Rejected {
                    rejection: lifeboat_replication::Rejection::NodeExists { .. },
                    ..
                },
            ) => match self.unfinished_join(who.node_id, raft_addr)? {
                Some(member) => member,
                None => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        let admit = pb::JoinRequest {
            cluster_id,
            site: who.site.clone(),
            catalog_member,
            catalog_generation: 0,
        };
        self.join_rpc(raft_addr, admit).await?;
        tracing::info!(node = who.node_id, site = who.site, raft_addr, "node added");
        self.catalog
            .node(who.node_id)
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::NodeNotFound(who.node_id))
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
        self.catalog_group()?
            .propose(pb::command::Kind::RemoveNode(pb::RemoveNode {
                node_id: node,
            }))
            .await
            .map_err(|e| match e {
                lifeboat_replication::Error::Rejected {
                    rejection: lifeboat_replication::Rejection::NodeNotFound { .. },
                    ..
                } => NodeError::NodeNotFound(node),
                other => other.into(),
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
        let Ok(mut client) = self.peers.client(raft_addr) else {
            return false;
        };
        // An empty join is refused by any live node: an answer is enough.
        let mut req = tonic::Request::new(pb::JoinRequest::default());
        req.set_timeout(Duration::from_secs(1));
        match client.join(req).await {
            Ok(_) => true,
            Err(s) => !matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
        }
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
