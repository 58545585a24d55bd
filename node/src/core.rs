//! The node's state and its operations: opening the store, starting the
//! catalog and protection groups, cluster init, tenants and volumes. The
//! admin API and the NBD server are thin shells over this.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::catalog::{Catalog, MAIN_PG};
use lifeboat_replication::log_store::{WalSyncer, group_has_state};
use lifeboat_replication::{Applied, Clock, MemberNode, ProtectionGroup, RaftTimers, SystemClock};
use lifeboat_store::db::{Db, DbOptions};
use lifeboat_store::frame::FrameCodec;
use lifeboat_store::keyring::{Dek, Keyring, MasterKey, TenantKeys};
use lifeboat_store::volumes::{VolumeRecord, VolumeState, Volumes};
use lifeboat_store::{KeyId, LogIndex, NodeId, PgId, TenantId, VolumeId};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::NodeConfig;
use crate::error::{NodeError, NodeResult};
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
    syncer: WalSyncer,
    clock: Arc<dyn Clock>,
    master_key: RwLock<Option<Arc<MasterKey>>>,
    groups: RwLock<HashMap<PgId, ProtectionGroup>>,
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

impl NodeCore {
    /// Opens the data directory and starts every group this node holds.
    pub async fn open(config: NodeConfig) -> NodeResult<Arc<NodeCore>> {
        let db_options = DbOptions {
            block_cache_bytes: config.store.block_cache_bytes,
            ..DbOptions::default()
        };
        let db = Db::open(&config.data_dir.join("db"), &db_options)?;
        let core = Arc::new(NodeCore {
            volumes: Volumes::new(db.clone()),
            catalog: Catalog::new(db.clone()),
            codec: FrameCodec::new(config.store.zstd_level),
            keyring: Keyring::new(),
            metrics: Metrics::new(),
            block_locks: BlockLocks::new(),
            syncer: WalSyncer::start(db.clone()),
            clock: Arc::new(SystemClock),
            master_key: RwLock::new(None),
            groups: RwLock::new(HashMap::new()),
            config,
            db,
        });
        if group_has_state(&core.db, PgId::CATALOG).map_err(NodeError::io("read catalog state"))? {
            core.resume().await?;
        }
        Ok(core)
    }

    fn node_id(&self) -> NodeId {
        NodeId(self.config.node_id)
    }

    fn member(&self) -> MemberNode {
        MemberNode {
            raft_addr: String::new(),
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

    /// Starts (or returns the running) member of `pg`, making this node its
    /// single voter when the group is new.
    async fn start_group(&self, pg: PgId) -> NodeResult<ProtectionGroup> {
        if let Some(g) = self.groups.read().expect("groups lock").get(&pg) {
            return Ok(g.clone());
        }
        let group = ProtectionGroup::start(
            self.node_id(),
            pg,
            self.db.clone(),
            self.syncer.clone(),
            &self.config.data_dir.join("raft-snapshots"),
            &self.timers(),
            self.clock.clone(),
        )
        .await?;
        group.bootstrap_single_voter(self.member()).await?;
        group.campaign().await;
        group.wait_for_leadership(LEADERSHIP_WAIT).await?;
        let mut groups = self.groups.write().expect("groups lock");
        Ok(groups.entry(pg).or_insert(group).clone())
    }

    /// Restart path: catalog first, then the master key and every PG.
    async fn resume(&self) -> NodeResult<()> {
        self.start_group(PgId::CATALOG).await?;
        let master = MasterKey::load(&self.config.master_key_file)?;
        *self.master_key.write().expect("master key lock") = Some(Arc::new(master));
        for pg in self.catalog.pgs().map_err(NodeError::io("read catalog"))? {
            self.start_group(PgId(pg.id)).await?;
        }
        for tenant in self
            .catalog
            .tenants()
            .map_err(NodeError::io("read catalog"))?
        {
            self.load_tenant_keys(&tenant)?;
        }
        Ok(())
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
        self.catalog.cluster().ok().flatten().map(|c| c.cluster_id)
    }

    /// Makes this node a new cluster: the master key file, the catalog and
    /// an operator token, which is returned and never stored in clear.
    pub async fn cluster_init(&self, site: &str) -> NodeResult<(String, String)> {
        if let Some(cluster_id) = self.cluster_id() {
            return Err(NodeError::AlreadyInitialized { cluster_id });
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

        let catalog = self.start_group(PgId::CATALOG).await?;
        let cluster_id = random_hex(16);
        let token = format!("lbo_{}", random_hex(32));
        catalog
            .propose(pb::command::Kind::InitCatalog(pb::InitCatalog {
                cluster_id: cluster_id.clone(),
                site: site.to_owned(),
                node_id: self.config.node_id,
                operator_token_sha256: sha256(token.as_bytes()).into(),
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
        let (_, applied) = self
            .catalog_group()?
            .propose(pb::command::Kind::CreateTenant(pb::CreateTenant {
                name: name.to_owned(),
                wrapped_dek: wrapped.into(),
            }))
            .await?;
        let Applied::TenantCreated { main_pg, .. } = applied else {
            return Err(NodeError::Io {
                op: "create tenant".into(),
                source: std::io::Error::other(format!("unexpected apply result {applied:?}")),
            });
        };
        self.start_group(PgId(main_pg)).await?;
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

    fn running_group(&self, pg: u64) -> NodeResult<ProtectionGroup> {
        self.group(PgId(pg)).ok_or(NodeError::Replication(
            lifeboat_replication::Error::UnknownGroup { pg },
        ))
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

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Stops every group, then the WAL syncer: after this returns no
    /// thread of ours touches the database, so dropping the last handle
    /// closes RocksDB cleanly.
    pub async fn shutdown(&self) {
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
