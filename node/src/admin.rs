//! The admin gRPC service: a thin shell over [`NodeCore`] that checks the
//! caller's token and maps errors to gRPC status codes (`status`, the one
//! place for that mapping).

use std::sync::Arc;

use lifeboat_proto::admin as api;
use lifeboat_proto::admin::admin_server::Admin;
use lifeboat_proto::raft as pb;
use lifeboat_replication::ProtectionGroup;
use lifeboat_replication::ack::AckPolicy;
use tonic::{Request, Response, Status};

use crate::core::{BucketInfo, CredentialInfo, CredentialMode, NodeCore, Role, VolumeInfo};
use crate::error::NodeError;
use crate::history::SnapshotInfo;
use crate::restore::RestorePlan;
use crate::tokens::TokenInfo;
use lifeboat_store::history::ScheduleRecord;

/// Maps a node error to a gRPC status whose message starts with the stable
/// error code, so the CLI can show both.
pub fn status(e: &NodeError) -> Status {
    use lifeboat_replication::Error as R;
    use tonic::Code;
    let code = match e {
        NodeError::NotInitialized => Code::FailedPrecondition,
        NodeError::AlreadyInitialized { .. } => Code::AlreadyExists,
        NodeError::InvalidName { .. }
        | NodeError::InvalidSize { .. }
        | NodeError::RestorePoint(_) => Code::InvalidArgument,
        NodeError::BeforeHistory { .. } => Code::OutOfRange,
        NodeError::SnapshotLocked { .. }
        | NodeError::RestorePastLock { .. }
        | NodeError::NothingToUndo(_) => Code::FailedPrecondition,
        NodeError::TenantNotFound(_)
        | NodeError::VolumeNotFound(_)
        | NodeError::BucketNotFound(_)
        | NodeError::CredentialNotFound(_)
        | NodeError::SnapshotNotFound(_)
        | NodeError::TokenNotFound(_)
        | NodeError::DrillNotFound(_)
        | NodeError::PgNotFound(_) => Code::NotFound,
        NodeError::WrongSite { .. } => Code::FailedPrecondition,
        NodeError::SourceBehind { .. } => Code::Unavailable,
        NodeError::Unauthenticated => Code::Unauthenticated,
        NodeError::PermissionDenied { .. } => Code::PermissionDenied,
        NodeError::MasterKeyInsideDataDir { .. } => Code::FailedPrecondition,
        NodeError::Store(lifeboat_store::Error::NoSpace { .. })
        | NodeError::QuotaExceeded { .. } => Code::ResourceExhausted,
        NodeError::Replication(R::Rejected { rejection, .. }) => {
            use lifeboat_replication::Rejection as J;
            match rejection {
                J::TenantExists { .. }
                | J::VolumeNameTaken { .. }
                | J::VolumeExists { .. }
                | J::AlreadyInitialized => Code::AlreadyExists,
                J::TenantNotFound { .. }
                | J::VolumeNotFound { .. }
                | J::PgNotFound { .. }
                | J::VolumeNameNotFound { .. } => Code::NotFound,
                J::VolumeShrink { .. } | J::BlockOutOfRange { .. } | J::Malformed { .. } => {
                    Code::InvalidArgument
                }
                J::KeyIdOutOfOrder { .. } | J::WrongGroup { .. } | J::BlockChanged { .. } => {
                    Code::Aborted
                }
                J::NodeExists { .. }
                | J::PgExists { .. }
                | J::BucketExists { .. }
                | J::BucketNameTaken { .. }
                | J::ObjectExists
                | J::ChunkExists { .. }
                | J::UploadExists { .. }
                | J::CredentialExists { .. } => Code::AlreadyExists,
                J::JoinToken { .. } | J::BucketReadOnly { .. } => Code::PermissionDenied,
                J::NodeNotFound { .. }
                | J::PgIdNotFound { .. }
                | J::BucketNotFound { .. }
                | J::BucketNameNotFound { .. }
                | J::ChunkNotFound { .. }
                | J::UploadNotFound { .. }
                | J::VersionNotFound { .. }
                | J::CredentialNotFound { .. } => Code::NotFound,
                J::BucketNotEmpty { .. }
                | J::SnapshotLocked { .. }
                | J::NothingToUndo
                | J::RestoreChanged { .. } => Code::FailedPrecondition,
                J::SnapshotExists { .. } => Code::AlreadyExists,
                J::SnapshotNotFound { .. } | J::TokenNotFound | J::DrillNotFound { .. } => {
                    Code::NotFound
                }
                J::DrillStopped { .. } => Code::FailedPrecondition,
                J::IndexOutOfHistory { .. } => Code::OutOfRange,
                J::NoMembersAtSite { .. } => Code::FailedPrecondition,
                J::KeyTooLong { .. } | J::InvalidPart { .. } => Code::InvalidArgument,
            }
        }
        NodeError::Replication(R::NotLeader { .. } | R::NoLeader { .. } | R::NoLease { .. }) => {
            Code::Unavailable
        }
        NodeError::NodeNotFound(_) | NodeError::SiteNotFound(_) => Code::NotFound,
        NodeError::NoMembersAtSite { .. } | NodeError::Witness { .. } => Code::FailedPrecondition,
        NodeError::SwitchoverTimeout { .. } | NodeError::FailbackTimeout { .. } => {
            Code::DeadlineExceeded
        }
        NodeError::OldVotersReachable { .. } => Code::FailedPrecondition,
        NodeError::NoStandbyAnswered { .. } => Code::Unavailable,
        NodeError::CatalogNotLost { .. } | NodeError::CatalogQuorumLost { .. } => {
            Code::FailedPrecondition
        }
        NodeError::Peer { .. } | NodeError::NotHostedHere { .. } => Code::FailedPrecondition,
        NodeError::JoinToken { .. } => Code::PermissionDenied,
        NodeError::PeerRefused { code, .. } => *code,
        _ => Code::Internal,
    };
    Status::new(code, format!("{}: {e}", e.code()))
}

pub struct AdminService {
    core: Arc<NodeCore>,
}

impl AdminService {
    pub fn new(core: Arc<NodeCore>) -> AdminService {
        AdminService { core }
    }

    /// `wanted` if the token may use that tenant, or (when empty) every
    /// tenant it may use.
    fn visible_tenants<T>(
        &self,
        req: &Request<T>,
        wanted: &str,
        action: &str,
    ) -> Result<Vec<String>, Status> {
        let role = self.role(req)?;
        if wanted.is_empty() {
            return Ok(self
                .core
                .tenants()
                .map_err(|e| status(&e))?
                .into_iter()
                .map(|t| t.name)
                .filter(|t| role.may_use_tenant(t))
                .collect());
        }
        if !role.may_use_tenant(wanted) {
            return Err(status(&NodeError::PermissionDenied {
                action: action.into(),
            }));
        }
        self.core.tenant(wanted).map_err(|e| status(&e))?;
        Ok(vec![wanted.to_owned()])
    }

    fn role<T>(&self, req: &Request<T>) -> Result<Role, Status> {
        if !self.core.is_initialized() {
            return Err(status(&NodeError::NotInitialized));
        }
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| status(&NodeError::Unauthenticated))?;
        self.core.authenticate(token.trim()).map_err(|e| status(&e))
    }

    fn require_operator<T>(&self, req: &Request<T>, action: &str) -> Result<(), Status> {
        match self.role(req)? {
            Role::Operator => Ok(()),
            Role::Tenant(_) | Role::Drill => Err(status(&NodeError::PermissionDenied {
                action: action.into(),
            })),
        }
    }

    /// An operator or a drill team.
    fn require_drill<T>(&self, req: &Request<T>, action: &str) -> Result<(), Status> {
        match self.role(req)? {
            Role::Operator | Role::Drill => Ok(()),
            Role::Tenant(_) => Err(status(&NodeError::PermissionDenied {
                action: action.into(),
            })),
        }
    }

    fn require_tenant<T>(
        &self,
        req: &Request<T>,
        tenant: &str,
        action: &str,
    ) -> Result<Role, Status> {
        let role = self.role(req)?;
        if role.may_use_tenant(tenant) {
            Ok(role)
        } else {
            Err(status(&NodeError::PermissionDenied {
                action: action.into(),
            }))
        }
    }

    /// The caller's role, if it may use the tenant of PG `TENANT/NAME`.
    fn require_pg_tenant<T>(
        &self,
        req: &Request<T>,
        pg_full_name: &str,
        action: &str,
    ) -> Result<Role, Status> {
        let (tenant, _) = crate::names::split_pg_name(pg_full_name).map_err(|e| status(&e))?;
        self.require_tenant(req, tenant, action)
    }

    fn tenant_message(
        &self,
        t: &lifeboat_proto::raft::TenantRecord,
    ) -> Result<api::Tenant, Status> {
        Ok(api::Tenant {
            name: t.name.clone(),
            id: t.id,
            current_key_id: t.current_key_id,
            key_count: t.wrapped_deks.len() as u32,
            pgs: self
                .core
                .tenant_pg_names(t.id)
                .map_err(|e| status(&e))?
                .into_iter()
                .map(|p| format!("{}/{p}", t.name))
                .collect(),
            stored_bytes: self
                .core
                .tenant_usage(&t.name)
                .map_err(|e| status(&e))?
                .stored_bytes,
            quota_bytes: t.quota_bytes,
        })
    }
}

/// How long a join token lives unless the operator says otherwise.
const JOIN_TOKEN_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A PG as this node sees it; the lag of every other member when it leads.
pub fn pg_status(core: &NodeCore, g: &ProtectionGroup) -> api::PgStatus {
    let m = g.metrics();
    let record = core.catalog.pg_by_id(g.pg().0).ok().flatten();
    let volumes = core
        .volumes
        .volumes(g.pg())
        .map(|v| v.len() as u64)
        .unwrap_or(0);
    let role = if m.is_leader {
        "leader"
    } else if m.voters.contains(&m.member.0) {
        "voter"
    } else if m.nodes.contains_key(&m.member.0) {
        "learner"
    } else {
        ""
    };
    let lag = g
        .lag()
        .into_iter()
        .map(|l| api::MemberLag {
            member_id: l.member.0,
            node_id: l.node.node_id,
            site: l.node.site,
            voter: l.voter,
            matched_index: l.matched_index.0,
            lag_entries: l.lag.entries,
            lag_bytes: l.lag.bytes,
            lag_seconds: l.lag.seconds,
        })
        .collect();
    let ack = g.ack().status();
    let log = g.log_status().unwrap_or_else(|e| {
        tracing::warn!(pg = g.pg().0, error = %e, "cannot read the log's span");
        lifeboat_replication::LogStatus {
            span: None,
            snapshot_index: None,
            purged_index: None,
            snapshots_installed: 0,
        }
    });
    let usage = lifeboat_store::usage::usage(&core.db, g.pg()).unwrap_or_else(|e| {
        tracing::warn!(pg = g.pg().0, error = %e, "cannot read the PG's usage");
        Default::default()
    });
    let census = usage.census.unwrap_or_default();
    api::PgStatus {
        name: core.pg_display_name(g.pg()),
        id: g.pg().0,
        applied_index: m.applied_index.0,
        last_log_index: m.last_log_index.0,
        leader: m.leader.map(|l| l.to_string()).unwrap_or_default(),
        volumes,
        generation: m.generation.0,
        active_site: record.map(|r| r.active_site).unwrap_or_default(),
        role: role.into(),
        lag,
        leader_node: m.leader_node.unwrap_or(0),
        log_first_index: log.span.map_or(0, |s| s.first),
        log_bytes: log.span.map_or(0, |s| s.bytes),
        snapshot_index: log.snapshot_index.map_or(0, |i| i.0),
        snapshots_installed: log.snapshots_installed,
        stored_bytes: usage.stored_bytes,
        versions: usage.versions,
        live_bytes: census.live_bytes,
        history_bytes: census.history_bytes,
        pinned_bytes: census.pinned_bytes,
        census_ms: census.at_ms,
        ack: ack.policy.as_str().into(),
        ack_degraded: ack.degraded,
        ack_degradations: ack.degradations,
        oldest_restorable_ms: core.history.oldest_ms(g.pg()).ok().flatten().unwrap_or(0),
        snapshots: core.history.snapshots(g.pg()).map_or(0, |s| s.len() as u64),
        schedule: core
            .history
            .schedule(g.pg())
            .ok()
            .flatten()
            .map(schedule_message),
        window_ms: lifeboat_store::gc::window(&core.db, g.pg())
            .ok()
            .flatten()
            .unwrap_or(core.config.history.window_ms),
        horizon_index: lifeboat_store::gc::horizon(&core.db, g.pg())
            .ok()
            .flatten()
            .map_or(0, |h| h.index.0),
    }
}

fn parse_ack(ack: &str) -> Result<AckPolicy, Status> {
    if ack.is_empty() {
        return Ok(AckPolicy::Local);
    }
    AckPolicy::parse(ack).ok_or_else(|| {
        Status::invalid_argument(format!(
            "invalid_argument: ack policy {ack:?} is neither \"local\" nor \"remote\""
        ))
    })
}

/// A PG from the catalog, with this node's status of it when it hosts one.
fn pg_message(core: &NodeCore, r: lifeboat_proto::raft::PgRecord) -> api::Pg {
    let nodes = core.catalog.nodes().unwrap_or_default();
    let site_of = |id: u64| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.site.clone())
            .unwrap_or_default()
    };
    let volumes = core
        .catalog
        .volume_names(&r.tenant)
        .map(|v| v.iter().filter(|(_, rec)| rec.pg == r.id).count() as u64)
        .unwrap_or(0);
    api::Pg {
        name: format!("{}/{}", r.tenant, r.name),
        id: r.id,
        tenant: r.tenant.clone(),
        ack: AckPolicy::from_pb(r.ack).as_str().into(),
        generation: r.generation,
        active_site: r.active_site.clone(),
        members: r
            .members
            .iter()
            .map(|m| api::PgMemberInfo {
                member_id: m.member_id,
                node_id: m.node_id,
                site: site_of(m.node_id),
                voter: m.voter,
            })
            .collect(),
        volumes,
        created_ms: r.created_ms,
        status: core
            .group(lifeboat_store::PgId(r.id))
            .map(|g| pg_status(core, &g)),
        progress: core.catalog.progress(r.id).unwrap_or_default(),
        resyncs: core.catalog.resyncs(r.id).unwrap_or_default(),
        lineage: r.lineage,
    }
}

fn node_role(witness: bool) -> &'static str {
    if witness { "witness" } else { "data" }
}

fn node_message(core: &NodeCore, n: lifeboat_proto::raft::NodeRecord) -> api::Node {
    let placement = core.catalog.catalog_placement().ok().flatten();
    let catalog_role = placement
        .as_ref()
        .and_then(|p| p.members.iter().find(|m| m.node_id == n.id))
        .map_or("", |m| if m.voter { "voter" } else { "learner" });
    let pg_members = core
        .catalog
        .pgs()
        .unwrap_or_default()
        .iter()
        .filter(|p| p.members.iter().any(|m| m.node_id == n.id))
        .count() as u32;
    let addrs = n.addrs.unwrap_or_default();
    api::Node {
        id: n.id,
        site: n.site,
        raft_addr: addrs.raft,
        admin_addr: addrs.admin,
        nbd_addr: addrs.nbd,
        removed: n.removed,
        catalog_role: catalog_role.into(),
        reachable: false,
        pg_members,
        role: node_role(n.witness).into(),
    }
}

fn volume_message(v: VolumeInfo) -> api::Volume {
    api::Volume {
        name: format!("{}/{}", v.tenant, v.name),
        pg: format!("{}/{}", v.tenant, v.pg_name),
        id: v.volume.0,
        size_bytes: v.size_bytes,
        created_index: v.created_index.0,
    }
}

fn credential_message(c: CredentialInfo) -> api::Credential {
    api::Credential {
        tenant: c.tenant,
        access_key: c.access_key,
        mode: c.mode.as_str().to_owned(),
        writable_prefix: c.writable_prefix,
        created_ms: c.created_ms,
    }
}

fn bucket_message(b: BucketInfo) -> api::Bucket {
    api::Bucket {
        name: format!("{}/{}", b.tenant, b.name),
        pg: format!("{}/{}", b.tenant, b.pg_name),
        id: b.bucket.0,
        created_ms: b.created_ms,
        clone_of: b.base.map_or(0, |v| v.bucket.0),
        clone_index: b.base.map_or(0, |v| v.index.0),
        clone_writable: b.base.is_some_and(|v| v.writable),
    }
}

fn schedule_message(s: ScheduleRecord) -> api::SnapshotSchedule {
    api::SnapshotSchedule {
        every_ms: s.interval_ms,
        keep_last: s.keep_last,
        keep_hourly: s.keep_hourly,
        keep_daily: s.keep_daily,
        keep_weekly: s.keep_weekly,
        keep_monthly: s.keep_monthly,
    }
}

fn token_message(t: TokenInfo) -> api::Token {
    api::Token {
        id: t.id,
        role: t.role,
        created_ms: t.created_ms,
    }
}

fn snapshot_message(s: SnapshotInfo) -> api::Snapshot {
    api::Snapshot {
        pg: s.pg,
        name: s.name,
        index: s.record.index.0,
        at_ms: s.record.at_ms,
        created_ms: s.record.created_ms,
        locked_until_ms: s.record.locked_until_ms,
    }
}

fn restore_message(plan: RestorePlan) -> api::RestorePlan {
    use crate::restore::{RestoreAction, RestoreKind};
    api::RestorePlan {
        pg: plan.pg,
        to_index: plan.to.0,
        to_ms: plan.to_ms,
        undoes_index: plan.undoes.map_or(0, |i| i.0),
        items: plan
            .items
            .into_iter()
            .map(|i| api::RestoreItem {
                kind: match i.kind {
                    RestoreKind::Volume => "volume",
                    RestoreKind::Bucket => "bucket",
                }
                .into(),
                name: i.name,
                action: match i.action {
                    RestoreAction::Restore => "restore",
                    RestoreAction::LeftNew => "new",
                }
                .into(),
                state: if i.deleted { "deleted" } else { "live" }.into(),
                size_then: i.size_then,
                size_now: i.size_now,
                changed: i.changed,
            })
            .collect(),
        applied: plan.applied,
        lock_overridden: plan.lock_overridden,
    }
}

fn bucket_tenant_of(full_name: &str) -> Result<&str, Status> {
    crate::names::split_bucket_name(full_name)
        .map(|(t, _)| t)
        .map_err(|e| status(&e))
}

fn tenant_of(full_name: &str) -> Result<&str, Status> {
    crate::names::split_volume_name(full_name)
        .map(|(t, _)| t)
        .map_err(|e| status(&e))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_init(
        &self,
        req: Request<api::ClusterInitRequest>,
    ) -> Result<Response<api::ClusterInitResponse>, Status> {
        let site = req.into_inner().site;
        let site = if site.is_empty() {
            self.core.config.site.clone()
        } else {
            site
        };
        crate::names::validate_name("site", &site).map_err(|e| status(&e))?;
        let (cluster_id, token) = self
            .core
            .cluster_init(&site)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::ClusterInitResponse {
            cluster_id,
            operator_token: token,
            master_key_file: self.core.config.master_key_file.display().to_string(),
        }))
    }

    async fn status(
        &self,
        req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        let initialized = self.core.is_initialized();
        if initialized {
            self.role(&req)?;
        }
        let writes_refused = self.core.writes_refused();
        let free = lifeboat_store::db::free_bytes(self.core.db.path()).unwrap_or(0);
        let reserve = self.core.config.store.reserve_bytes;
        let pgs = self
            .core
            .groups()
            .iter()
            .map(|g| pg_status(&self.core, g))
            .collect();
        Ok(Response::new(api::StatusResponse {
            initialized,
            cluster_id: self.core.cluster_id().unwrap_or_default(),
            cluster_generation: self
                .core
                .catalog
                .cluster()
                .ok()
                .flatten()
                .map_or(0, |c| c.rebuilds.len() as u64),
            node_id: self.core.config.node_id,
            site: self.core.config.site.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pgs,
            data_dir_free_bytes: free,
            reserve_bytes: reserve,
            writes_refused,
            lease_remaining_ms: self
                .core
                .leases
                .remaining(std::time::Instant::now())
                .as_millis() as u64,
            lease_pgs: self.core.leases.pgs().len() as u32,
            log_segment_pool_bytes: self.core.log_segment_pool_bytes(),
        }))
    }

    async fn create_tenant(
        &self,
        req: Request<api::CreateTenantRequest>,
    ) -> Result<Response<api::Tenant>, Status> {
        self.require_operator(&req, "create tenants")?;
        let t = self
            .core
            .create_tenant(&req.get_ref().name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(self.tenant_message(&t)?))
    }

    async fn list_tenants(
        &self,
        req: Request<api::ListTenantsRequest>,
    ) -> Result<Response<api::ListTenantsResponse>, Status> {
        let role = self.role(&req)?;
        let tenants = self
            .core
            .tenants()
            .map_err(|e| status(&e))?
            .into_iter()
            .filter(|t| role.may_use_tenant(&t.name))
            .map(|t| self.tenant_message(&t))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(api::ListTenantsResponse { tenants }))
    }

    async fn rotate_dek(
        &self,
        req: Request<api::RotateDekRequest>,
    ) -> Result<Response<api::Tenant>, Status> {
        self.require_operator(&req, "rotate keys")?;
        let t = self
            .core
            .rotate_dek(&req.get_ref().tenant)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(self.tenant_message(&t)?))
    }

    async fn set_tenant_quota(
        &self,
        req: Request<api::SetTenantQuotaRequest>,
    ) -> Result<Response<api::Tenant>, Status> {
        self.require_operator(&req, "set quotas")?;
        let r = req.get_ref();
        self.core
            .set_tenant_quota(&r.tenant, (r.quota_bytes > 0).then_some(r.quota_bytes))
            .await
            .map_err(|e| status(&e))?;
        let t = self
            .core
            .catalog
            .tenant(&r.tenant)
            .map_err(|e| status(&NodeError::io("read catalog")(e)))?
            .ok_or_else(|| status(&NodeError::TenantNotFound(r.tenant.clone())))?;
        Ok(Response::new(self.tenant_message(&t)?))
    }

    async fn create_volume(
        &self,
        req: Request<api::CreateVolumeRequest>,
    ) -> Result<Response<api::Volume>, Status> {
        let r = req.get_ref();
        self.require_tenant(&req, tenant_of(&r.name)?, "create volumes of this tenant")?;
        let v = self
            .core
            .create_volume(&r.name, r.size_bytes, &r.pg)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(volume_message(v)))
    }

    async fn undelete_volume(
        &self,
        req: Request<api::UndeleteVolumeRequest>,
    ) -> Result<Response<api::Volume>, Status> {
        let r = req.get_ref();
        self.require_tenant(&req, tenant_of(&r.name)?, "undelete volumes of this tenant")?;
        let v = self
            .core
            .undelete_volume(&r.name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(volume_message(v)))
    }

    async fn clone_volume(
        &self,
        req: Request<api::CloneVolumeRequest>,
    ) -> Result<Response<api::Volume>, Status> {
        let r = req.get_ref();
        self.require_tenant(&req, tenant_of(&r.source)?, "clone volumes of this tenant")?;
        let v = self
            .core
            .clone_volume(&r.source, &r.name, &r.at, &r.snapshot)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(volume_message(v)))
    }

    async fn list_volumes(
        &self,
        req: Request<api::ListVolumesRequest>,
    ) -> Result<Response<api::ListVolumesResponse>, Status> {
        let tenants =
            self.visible_tenants(&req, &req.get_ref().tenant, "list volumes of this tenant")?;
        let mut volumes = Vec::new();
        for t in tenants {
            volumes.extend(
                self.core
                    .list_volumes(&t)
                    .map_err(|e| status(&e))?
                    .into_iter()
                    .map(volume_message),
            );
        }
        Ok(Response::new(api::ListVolumesResponse { volumes }))
    }

    async fn resize_volume(
        &self,
        req: Request<api::ResizeVolumeRequest>,
    ) -> Result<Response<api::Volume>, Status> {
        let r = req.get_ref();
        self.require_tenant(&req, tenant_of(&r.name)?, "resize volumes of this tenant")?;
        let v = self
            .core
            .resize_volume(&r.name, r.size_bytes)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(volume_message(v)))
    }

    async fn delete_volume(
        &self,
        req: Request<api::DeleteVolumeRequest>,
    ) -> Result<Response<api::DeleteVolumeResponse>, Status> {
        let r = req.get_ref();
        self.require_tenant(&req, tenant_of(&r.name)?, "delete volumes of this tenant")?;
        self.core
            .delete_volume(&r.name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::DeleteVolumeResponse {}))
    }

    async fn create_credential(
        &self,
        req: Request<api::CreateCredentialRequest>,
    ) -> Result<Response<api::CreateCredentialResponse>, Status> {
        let r = req.get_ref();
        self.require_tenant(&req, &r.tenant, "create S3 credentials of this tenant")?;
        let mode = if r.mode.is_empty() {
            CredentialMode::Full
        } else {
            CredentialMode::parse(&r.mode).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown credential mode {:?}: use full, read-only or append-only",
                    r.mode
                ))
            })?
        };
        let (credential, secret_key) = self
            .core
            .create_credential(&r.tenant, mode, r.writable_prefix.as_deref())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::CreateCredentialResponse {
            credential: Some(credential_message(credential)),
            secret_key,
        }))
    }

    async fn list_credentials(
        &self,
        req: Request<api::ListCredentialsRequest>,
    ) -> Result<Response<api::ListCredentialsResponse>, Status> {
        let tenants = self.visible_tenants(
            &req,
            &req.get_ref().tenant,
            "list S3 credentials of this tenant",
        )?;
        let mut credentials = Vec::new();
        for t in tenants {
            credentials.extend(
                self.core
                    .list_credentials(&t)
                    .map_err(|e| status(&e))?
                    .into_iter()
                    .map(credential_message),
            );
        }
        Ok(Response::new(api::ListCredentialsResponse { credentials }))
    }

    async fn revoke_credential(
        &self,
        req: Request<api::RevokeCredentialRequest>,
    ) -> Result<Response<api::RevokeCredentialResponse>, Status> {
        let access_key = req.get_ref().access_key.clone();
        // A token sees only its tenant's keys: an unknown key and another
        // tenant's key get the same answer.
        let owner = self
            .core
            .catalog
            .credential(&access_key)
            .map_err(|e| status(&NodeError::io("read catalog")(e)))?
            .map(|c| c.tenant);
        let role = self.role(&req)?;
        match owner {
            Some(tenant) if role.may_use_tenant(&tenant) => {}
            _ => return Err(status(&NodeError::CredentialNotFound(access_key))),
        }
        self.core
            .revoke_credential(&access_key)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::RevokeCredentialResponse {}))
    }

    async fn create_tenant_token(
        &self,
        req: Request<api::CreateTenantTokenRequest>,
    ) -> Result<Response<api::CreateTenantTokenResponse>, Status> {
        self.require_operator(&req, "create tokens")?;
        let r = req.get_ref();
        let made = match (r.drill, r.tenant.is_empty()) {
            (true, true) => self.core.create_drill_token().await,
            (false, false) => self.core.create_tenant_token(&r.tenant).await,
            _ => Err(NodeError::InvalidName {
                what: "token",
                name: r.tenant.clone(),
                reason: "a token is for a tenant or for drills, one of the two".into(),
            }),
        };
        let (token, info) = made.map_err(|e| status(&e))?;
        Ok(Response::new(api::CreateTenantTokenResponse {
            token,
            info: Some(token_message(info)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<api::ListTokensRequest>,
    ) -> Result<Response<api::ListTokensResponse>, Status> {
        self.require_operator(&req, "list tokens")?;
        let tenant = req.get_ref().tenant.as_str();
        let tokens = self
            .core
            .list_tokens((!tenant.is_empty()).then_some(tenant))
            .map_err(|e| status(&e))?
            .into_iter()
            .map(token_message)
            .collect();
        Ok(Response::new(api::ListTokensResponse { tokens }))
    }

    async fn revoke_tenant_token(
        &self,
        req: Request<api::RevokeTenantTokenRequest>,
    ) -> Result<Response<api::RevokeTenantTokenResponse>, Status> {
        self.require_operator(&req, "revoke tenant tokens")?;
        self.core
            .revoke_tenant_token(&req.get_ref().id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::RevokeTenantTokenResponse {}))
    }

    async fn undelete_bucket(
        &self,
        req: Request<api::UndeleteBucketRequest>,
    ) -> Result<Response<api::Bucket>, Status> {
        let r = req.get_ref();
        self.require_tenant(
            &req,
            bucket_tenant_of(&r.name)?,
            "undelete buckets of this tenant",
        )?;
        let b = self
            .core
            .undelete_bucket(&r.name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(bucket_message(b)))
    }

    async fn clone_bucket(
        &self,
        req: Request<api::CloneBucketRequest>,
    ) -> Result<Response<api::Bucket>, Status> {
        let r = req.get_ref();
        self.require_tenant(
            &req,
            bucket_tenant_of(&r.source)?,
            "clone buckets of this tenant",
        )?;
        let b = self
            .core
            .clone_bucket(&r.source, &r.name, &r.at, &r.snapshot, r.read_only)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(bucket_message(b)))
    }

    async fn create_bucket(
        &self,
        req: Request<api::CreateBucketRequest>,
    ) -> Result<Response<api::Bucket>, Status> {
        let r = req.get_ref();
        self.require_tenant(
            &req,
            bucket_tenant_of(&r.name)?,
            "create buckets of this tenant",
        )?;
        let b = self
            .core
            .create_bucket(&r.name, &r.pg)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(bucket_message(b)))
    }

    async fn list_buckets(
        &self,
        req: Request<api::ListBucketsRequest>,
    ) -> Result<Response<api::ListBucketsResponse>, Status> {
        let tenants =
            self.visible_tenants(&req, &req.get_ref().tenant, "list buckets of this tenant")?;
        let mut buckets = Vec::new();
        for t in tenants {
            buckets.extend(
                self.core
                    .list_buckets(&t)
                    .map_err(|e| status(&e))?
                    .into_iter()
                    .map(bucket_message),
            );
        }
        Ok(Response::new(api::ListBucketsResponse { buckets }))
    }

    async fn delete_bucket(
        &self,
        req: Request<api::DeleteBucketRequest>,
    ) -> Result<Response<api::DeleteBucketResponse>, Status> {
        let r = req.get_ref();
        self.require_tenant(
            &req,
            bucket_tenant_of(&r.name)?,
            "delete buckets of this tenant",
        )?;
        self.core
            .delete_bucket(&r.name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::DeleteBucketResponse {}))
    }

    async fn create_join_token(
        &self,
        req: Request<api::CreateJoinTokenRequest>,
    ) -> Result<Response<api::CreateJoinTokenResponse>, Status> {
        self.require_operator(&req, "create join tokens")?;
        let r = req.get_ref();
        let ttl = if r.ttl_seconds == 0 {
            JOIN_TOKEN_TTL_DEFAULT
        } else {
            std::time::Duration::from_secs(r.ttl_seconds)
        };
        let (token, expires_ms) = self
            .core
            .create_join_token(&r.site, ttl)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::CreateJoinTokenResponse {
            token,
            expires_ms,
        }))
    }

    /// On a node in no cluster: needs no bearer token (it has none yet),
    /// only the join token, which the cluster checks.
    async fn join_cluster(
        &self,
        req: Request<api::JoinClusterRequest>,
    ) -> Result<Response<api::Node>, Status> {
        let node = self
            .core
            .join_cluster(&req.get_ref().token)
            .await
            .map_err(|e| status(&e))?;
        let addrs = node.addrs.clone().unwrap_or_default();
        Ok(Response::new(api::Node {
            id: node.id,
            site: node.site,
            raft_addr: addrs.raft,
            admin_addr: addrs.admin,
            nbd_addr: addrs.nbd,
            removed: false,
            catalog_role: String::new(),
            reachable: true,
            pg_members: 0,
            role: node_role(node.witness).into(),
        }))
    }

    async fn cluster_ca(
        &self,
        _req: Request<api::ClusterCaRequest>,
    ) -> Result<Response<api::ClusterCaResponse>, Status> {
        let tls = self
            .core
            .node_tls()
            .ok_or_else(|| status(&NodeError::NotInitialized))?;
        Ok(Response::new(api::ClusterCaResponse {
            ca_cert_pem: tls.ca_pem,
        }))
    }

    /// Authenticated by the join token's secret, not a bearer token.
    async fn admit_node(
        &self,
        req: Request<api::AdmitNodeRequest>,
    ) -> Result<Response<api::AdmitNodeResponse>, Status> {
        if !self.core.is_initialized() {
            return Err(status(&NodeError::NotInitialized));
        }
        let admitted = self
            .core
            .admit_node(req.into_inner())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(admitted))
    }

    async fn create_tenant_cert(
        &self,
        req: Request<api::CreateTenantCertRequest>,
    ) -> Result<Response<api::CreateTenantCertResponse>, Status> {
        self.require_operator(&req, "issue tenant certificates")?;
        let r = req.get_ref();
        let (cert_pem, ca_cert_pem) = self
            .core
            .create_tenant_cert(&r.tenant, &r.csr_pem)
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::CreateTenantCertResponse {
            cert_pem,
            ca_cert_pem,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<api::ListNodesRequest>,
    ) -> Result<Response<api::ListNodesResponse>, Status> {
        // A drill team finds the nodes of its drill's site here.
        self.require_drill(&req, "list nodes")?;
        let records = self
            .core
            .catalog
            .nodes()
            .map_err(|e| status(&NodeError::io("read catalog")(e)))?;
        let mut nodes = Vec::new();
        for n in records {
            let raft = n.addrs.as_ref().map(|a| a.raft.clone()).unwrap_or_default();
            let mut msg = node_message(&self.core, n);
            msg.reachable = !msg.removed && self.core.peer_reachable(&raft).await;
            nodes.push(msg);
        }
        Ok(Response::new(api::ListNodesResponse { nodes }))
    }

    async fn remove_node(
        &self,
        req: Request<api::RemoveNodeRequest>,
    ) -> Result<Response<api::Node>, Status> {
        self.require_operator(&req, "remove nodes")?;
        let node = self
            .core
            .remove_node(req.get_ref().node_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(node_message(&self.core, node)))
    }

    async fn create_pg(
        &self,
        req: Request<api::CreatePgRequest>,
    ) -> Result<Response<api::Pg>, Status> {
        self.require_operator(&req, "create protection groups")?;
        let r = req.get_ref();
        let ack = parse_ack(&r.ack)?;
        let record = self
            .core
            .create_pg(&r.name, ack)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pg_message(&self.core, record)))
    }

    async fn list_pgs(
        &self,
        req: Request<api::ListPgsRequest>,
    ) -> Result<Response<api::ListPgsResponse>, Status> {
        let role = self.role(&req)?;
        let tenant = req.get_ref().tenant.as_str();
        if !tenant.is_empty() && !role.may_use_tenant(tenant) {
            return Err(status(&NodeError::PermissionDenied {
                action: format!("list the protection groups of tenant {tenant}"),
            }));
        }
        let records = self
            .core
            .pg_records((!tenant.is_empty()).then_some(tenant))
            .map_err(|e| status(&e))?;
        let pgs = records
            .into_iter()
            .filter(|r| role.may_use_tenant(&r.tenant))
            .map(|r| pg_message(&self.core, r))
            .collect();
        Ok(Response::new(api::ListPgsResponse { pgs }))
    }

    async fn show_pg(&self, req: Request<api::ShowPgRequest>) -> Result<Response<api::Pg>, Status> {
        let name = &req.get_ref().name;
        self.require_pg_tenant(&req, name, "see this protection group")?;
        let record = self.core.pg_named(name).map_err(|e| status(&e))?;
        Ok(Response::new(pg_message(&self.core, record)))
    }

    async fn create_snapshot(
        &self,
        req: Request<api::CreateSnapshotRequest>,
    ) -> Result<Response<api::Snapshot>, Status> {
        self.require_pg_tenant(
            &req,
            &req.get_ref().pg,
            "create snapshots in this protection group",
        )?;
        let r = req.get_ref();
        let info = self
            .core
            .create_snapshot(&r.pg, &r.name, &r.at, &r.lock_until)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(snapshot_message(info)))
    }

    async fn list_snapshots(
        &self,
        req: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<api::ListSnapshotsResponse>, Status> {
        if req.get_ref().divergence {
            let role = self.role(&req)?;
            let wanted = &req.get_ref().pg;
            if !wanted.is_empty() {
                self.require_pg_tenant(&req, wanted, "list divergence snapshots")?;
            }
            let divergences = self
                .core
                .catalog
                .divergences()
                .map_err(|e| status(&NodeError::io("read catalog")(e)))?
                .into_iter()
                .filter(|d| role.may_use_tenant(&d.tenant))
                .map(divergence_message)
                .filter(|d| wanted.is_empty() || &d.pg == wanted)
                .collect();
            return Ok(Response::new(api::ListSnapshotsResponse {
                snapshots: Vec::new(),
                divergences,
            }));
        }
        self.require_pg_tenant(
            &req,
            &req.get_ref().pg,
            "list snapshots of this protection group",
        )?;
        let snapshots = self
            .core
            .list_snapshots(&req.get_ref().pg)
            .await
            .map_err(|e| status(&e))?
            .into_iter()
            .map(snapshot_message)
            .collect();
        Ok(Response::new(api::ListSnapshotsResponse {
            snapshots,
            divergences: Vec::new(),
        }))
    }

    async fn show_snapshot(
        &self,
        req: Request<api::SnapshotRef>,
    ) -> Result<Response<api::Snapshot>, Status> {
        self.require_pg_tenant(
            &req,
            &req.get_ref().pg,
            "see snapshots of this protection group",
        )?;
        let r = req.get_ref();
        let info = self
            .core
            .show_snapshot(&r.pg, &r.name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(snapshot_message(info)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<api::SnapshotRef>,
    ) -> Result<Response<api::DeleteSnapshotResponse>, Status> {
        let role = self.require_pg_tenant(
            &req,
            &req.get_ref().pg,
            "delete snapshots of this protection group",
        )?;
        let r = req.get_ref();
        self.core
            .delete_snapshot(&r.pg, &r.name, &role)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::DeleteSnapshotResponse {}))
    }

    async fn lock_snapshot(
        &self,
        req: Request<api::LockSnapshotRequest>,
    ) -> Result<Response<api::Snapshot>, Status> {
        let role = self.require_pg_tenant(
            &req,
            &req.get_ref().pg,
            "lock snapshots of this protection group",
        )?;
        let r = req.get_ref();
        let info = self
            .core
            .lock_snapshot(&r.pg, &r.name, &r.until, &role)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(snapshot_message(info)))
    }

    async fn restore_pg(
        &self,
        req: Request<api::RestorePgRequest>,
    ) -> Result<Response<api::RestorePlan>, Status> {
        let role =
            self.require_pg_tenant(&req, &req.get_ref().pg, "restore this protection group")?;
        let r = req.get_ref();
        let plan = self
            .core
            .restore_pg(&r.pg, &r.at, &r.snapshot, r.undo, r.dry_run, &role)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(restore_message(plan)))
    }

    async fn set_snapshot_schedule(
        &self,
        req: Request<api::SetSnapshotScheduleRequest>,
    ) -> Result<Response<api::SnapshotSchedule>, Status> {
        self.require_pg_tenant(
            &req,
            &req.get_ref().pg,
            "schedule snapshots of this protection group",
        )?;
        let r = req.get_ref();
        let k = r.retention.unwrap_or_default();
        let retention = lifeboat_snapshot::Retention {
            last: k.keep_last,
            hourly: k.keep_hourly,
            daily: k.keep_daily,
            weekly: k.keep_weekly,
            monthly: k.keep_monthly,
        };
        let schedule = self
            .core
            .set_schedule(&r.pg, &r.every, retention)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(
            schedule.map(schedule_message).unwrap_or_default(),
        ))
    }

    async fn set_pg_ack(
        &self,
        req: Request<api::SetPgAckRequest>,
    ) -> Result<Response<api::Pg>, Status> {
        self.require_operator(&req, "change ack policies")?;
        let r = req.get_ref();
        let ack = parse_ack(&r.ack)?;
        let record = self
            .core
            .set_pg_ack(&r.name, ack)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pg_message(&self.core, record)))
    }

    async fn pg_digest(
        &self,
        req: Request<api::PgDigestRequest>,
    ) -> Result<Response<api::PgDigestResponse>, Status> {
        self.require_operator(&req, "read replica digests")?;
        let record = self
            .core
            .pg_named(&req.get_ref().name)
            .map_err(|e| status(&e))?;
        let group = self.core.running_group(record.id).map_err(|e| status(&e))?;
        let before = group.metrics().applied_index;
        let db = self.core.db.clone();
        let pg = group.pg();
        let digest =
            tokio::task::spawn_blocking(move || lifeboat_store::raft_snapshot::pg_digest(&db, pg))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| status(&e.into()))?;
        let after = group.metrics().applied_index;
        Ok(Response::new(api::PgDigestResponse {
            applied_index: after.0,
            quiet: before == after,
            rows: digest.rows,
            versions: digest.versions,
            sha256: hex::encode(digest.sha256),
        }))
    }

    async fn set_pg_window(
        &self,
        req: Request<api::SetPgWindowRequest>,
    ) -> Result<Response<api::Pg>, Status> {
        self.require_operator(&req, "change protection windows")?;
        let r = req.get_ref();
        let record = self
            .core
            .set_pg_window(&r.name, &r.window)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pg_message(&self.core, record)))
    }

    async fn start_drill(
        &self,
        req: Request<api::StartDrillRequest>,
    ) -> Result<Response<pb::DrillRecord>, Status> {
        self.require_drill(&req, "start drills")?;
        let r = req.get_ref();
        let record = self
            .core
            .start_drill(&r.site, &r.pgs, &r.at)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(record))
    }

    async fn list_drills(
        &self,
        req: Request<api::ListDrillsRequest>,
    ) -> Result<Response<api::ListDrillsResponse>, Status> {
        self.require_drill(&req, "list drills")?;
        let drills = self.core.drills().map_err(|e| status(&e))?;
        Ok(Response::new(api::ListDrillsResponse { drills }))
    }

    async fn drill_report(
        &self,
        req: Request<api::DrillReportRequest>,
    ) -> Result<Response<api::DrillReportResponse>, Status> {
        self.require_drill(&req, "report on drills")?;
        let r = req.get_ref();
        let drill = self.core.drill(r.id).map_err(|e| status(&e))?;
        let checksums = if r.checksums {
            self.core
                .drill_checksums(r.id)
                .await
                .map_err(|e| status(&e))?
                .into_iter()
                .map(|c| api::CloneChecksum {
                    tenant: c.tenant,
                    name: c.name,
                    source: c.source,
                    index: c.index,
                    clone_sha256: c.clone_sha256,
                    source_sha256: c.source_sha256,
                    blocks_written: c.blocks_written,
                    bucket: c.bucket,
                    objects_written: c.objects_written,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(api::DrillReportResponse {
            drill: Some(drill),
            checksums,
            node_id: self.core.config.node_id,
        }))
    }

    async fn stop_drill(
        &self,
        req: Request<api::StopDrillRequest>,
    ) -> Result<Response<pb::DrillRecord>, Status> {
        self.require_drill(&req, "stop drills")?;
        let record = self
            .core
            .stop_drill(req.get_ref().id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(record))
    }

    async fn failback_prepare(
        &self,
        req: Request<api::FailbackPrepareRequest>,
    ) -> Result<Response<api::FailbackPrepareResponse>, Status> {
        self.require_operator(&req, "prepare a failback")?;
        let r = req.get_ref();
        let started = std::time::Instant::now();
        let timeout = match r.timeout_ms {
            0 => crate::failback::PREPARE_WAIT,
            ms => std::time::Duration::from_millis(ms),
        };
        let prepared = self
            .core
            .failback_prepare(&r.site, &r.pgs, timeout)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::FailbackPrepareResponse {
            pgs: prepared
                .into_iter()
                .map(|p| api::FailbackPg {
                    name: p.name,
                    active_site: p.active_site,
                    generation: p.generation,
                    target_index: p.target_index,
                    members: p
                        .members
                        .into_iter()
                        .map(|(node_id, applied_index, resync)| api::FailbackMember {
                            node_id,
                            applied_index,
                            resync,
                        })
                        .collect(),
                    took_ms: p.took.as_millis() as u64,
                })
                .collect(),
            took_ms: started.elapsed().as_millis() as u64,
        }))
    }

    async fn switchover(
        &self,
        req: Request<api::SwitchoverRequest>,
    ) -> Result<Response<api::SwitchoverResponse>, Status> {
        self.require_operator(&req, "move protection groups between sites")?;
        let r = req.get_ref();
        let started = std::time::Instant::now();
        let timeout = match r.timeout_ms {
            0 => crate::failover::SWITCHOVER_WAIT,
            ms => std::time::Duration::from_millis(ms),
        };
        if r.catalog_lost && !r.force {
            return Err(Status::invalid_argument(
                "--catalog-lost is a kind of forced failover: give --force too",
            ));
        }
        if r.catalog_lost && !r.pgs.is_empty() {
            return Err(Status::invalid_argument(
                "--catalog-lost moves every PG (the catalog that decides where each one is active is rebuilt): name none",
            ));
        }
        if r.force {
            let (forced, rebuild) = if r.catalog_lost {
                let done = self
                    .core
                    .force_failover_catalog_lost(&r.to_site, timeout)
                    .await
                    .map_err(|e| status(&e))?;
                let rebuild = api::CatalogRebuild {
                    previous_cluster_id: done.previous_cluster_id,
                    cluster_id: done.cluster_id,
                    generation: done.generation,
                    site: done.site,
                    catalog_node: done.catalog_node,
                    catalog_fork_index: done.catalog_fork_index,
                    survivors: done.survivors,
                    removed: done.removed,
                };
                (done.pgs, Some(rebuild))
            } else {
                let forced = self
                    .core
                    .force_failover(&r.to_site, &r.pgs, timeout)
                    .await
                    .map_err(|e| status(&e))?;
                (forced, None)
            };
            return Ok(Response::new(api::SwitchoverResponse {
                rebuild,
                pgs: forced
                    .into_iter()
                    .map(|f| api::PgSwitch {
                        name: f.name,
                        from_site: f.from_site,
                        to_site: f.to_site,
                        leader_node: f.leader_node,
                        last_index: f.fork_index,
                        took_ms: f.took.as_millis() as u64,
                        already: false,
                        generation: f.generation,
                        fork_index: f.fork_index,
                        rpo_upper_ms: f.rpo_upper.map(|d| d.as_millis() as u64),
                        rpo_lower_entries: f.rpo_lower.entries,
                        rpo_lower_bytes: f.rpo_lower.bytes,
                    })
                    .collect(),
                took_ms: started.elapsed().as_millis() as u64,
            }));
        }
        let switched = self
            .core
            .switchover(&r.to_site, &r.pgs, timeout)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(api::SwitchoverResponse {
            pgs: switched
                .into_iter()
                .map(|s| api::PgSwitch {
                    name: s.name,
                    from_site: s.from_site,
                    to_site: s.to_site,
                    leader_node: s.leader_node,
                    last_index: s.last_index,
                    took_ms: s.took.as_millis() as u64,
                    already: s.already,
                    ..Default::default()
                })
                .collect(),
            took_ms: started.elapsed().as_millis() as u64,
            rebuild: None,
        }))
    }

    async fn list_events(
        &self,
        req: Request<api::ListEventsRequest>,
    ) -> Result<Response<api::ListEventsResponse>, Status> {
        self.require_operator(&req, "list events")?;
        let events = self
            .core
            .events
            .list()
            .into_iter()
            .map(|e| api::Event {
                time_ms: e.time_ms,
                node_id: self.core.config.node_id,
                kind: e.kind.into(),
                pg: e.pg.0,
                pg_name: self.core.pg_display_name(e.pg),
                message: e.message,
            })
            .collect();
        Ok(Response::new(api::ListEventsResponse { events }))
    }
}

fn divergence_message(d: lifeboat_proto::raft::DivergenceRecord) -> api::Divergence {
    api::Divergence {
        pg: format!("{}/{}", d.tenant, d.pg_name),
        generation: d.generation,
        fork_index: d.fork_index,
        last_index: d.last_index,
        node_id: d.node_id,
        fork_ms: d.fork_ms,
        last_ms: d.last_ms,
        recorded_ms: d.recorded_ms,
        complete: d.complete,
        covered_by: d.covered_by,
        volumes: d
            .volumes
            .into_iter()
            .map(|v| api::DivergedVolume {
                clone: if v.clone.is_empty() {
                    String::new()
                } else {
                    format!("{}/{}", d.tenant, v.clone)
                },
                volume: format!("{}/{}", d.tenant, v.volume),
                blocks: v.blocks,
                bytes: v.bytes,
                deleted: v.deleted,
            })
            .collect(),
        buckets: d
            .buckets
            .into_iter()
            .map(|b| api::DivergedBucket {
                bucket: b.bucket,
                clone: b.clone,
                objects: b.objects,
                bytes: b.bytes,
                deleted: b.deleted,
            })
            .collect(),
    }
}
