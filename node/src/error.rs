//! The daemon's error type: what an admin call, an NBD request or startup
//! can fail with. Protocol mappings live in `admin::status` (gRPC) and
//! `nbd::errno` (NBD).

use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum NodeError {
    #[error("this node is not initialised: run `lifeboat cluster init` first")]
    NotInitialized,
    #[error("this node is already initialised as cluster {cluster_id}")]
    AlreadyInitialized { cluster_id: String },
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("invalid size: {reason}")]
    InvalidSize { reason: String },
    #[error("tenant {0} does not exist")]
    TenantNotFound(String),
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("bucket {0} does not exist")]
    BucketNotFound(String),
    #[error("access key {0} does not exist")]
    CredentialNotFound(String),
    #[error("protection group {0} does not exist")]
    PgNotFound(String),
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    #[error("no tenant token has id {0}")]
    TokenNotFound(String),
    #[error("snapshot {snapshot} is locked until {until}")]
    SnapshotLocked { snapshot: String, until: String },
    #[error(
        "snapshot {snapshot} is locked until {until}: restoring to before it is refused but to an operator token"
    )]
    RestorePastLock { snapshot: String, until: String },
    #[error("nothing to undo: {0} was never restored")]
    NothingToUndo(String),
    #[error(
        "tenant {tenant} is at its quota: {stored} stored of {quota} (live data, history and snapshots all count); writes that add data are refused until snapshots are deleted, the window is shortened or the quota is raised"
    )]
    QuotaExceeded {
        tenant: String,
        stored: String,
        quota: String,
    },
    #[error(transparent)]
    RestorePoint(#[from] lifeboat_snapshot::RestorePointError),
    #[error("{asked} is before the oldest restorable time of {pg}{}", match oldest {
        Some(t) => format!(", {t}"),
        None => ": nothing has been written to it yet".into(),
    })]
    BeforeHistory {
        pg: String,
        asked: String,
        oldest: Option<String>,
    },
    #[error("missing or unknown token")]
    Unauthenticated,
    #[error("this token may not {action}")]
    PermissionDenied { action: String },
    #[error("the master key file {path} must not be inside the data directory {data_dir}")]
    MasterKeyInsideDataDir { path: PathBuf, data_dir: PathBuf },
    #[error(transparent)]
    Store(#[from] lifeboat_store::Error),
    #[error(transparent)]
    Replication(#[from] lifeboat_replication::Error),
    #[error(transparent)]
    Keyring(#[from] lifeboat_store::keyring::KeyringError),
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    #[error("node at {addr}: {reason}")]
    Peer { addr: String, reason: String },
    #[error("node {0} does not exist")]
    NodeNotFound(u64),
    #[error("this node is a witness: it cannot {action}")]
    Witness { action: String },
    #[error(
        "protection group {pg}: this node still reaches {reachable} of its {voters} voters, a majority: the active site is not lost (use --planned to move it without loss)"
    )]
    OldVotersReachable {
        pg: String,
        reachable: usize,
        voters: usize,
    },
    #[error(
        "this node still reaches {reachable} of the catalog's {voters} voters, a majority: the catalog is not lost (run `failover --force` without --catalog-lost)"
    )]
    CatalogNotLost { reachable: usize, voters: usize },
    #[error(
        "this node reaches only {reachable} of the catalog's {voters} voters: the catalog has lost its quorum and cannot order a failover. If the active site (and the witness) are lost for good, `lifeboat failover --force --catalog-lost --to SITE` on a node of SITE rebuilds the catalog there; the old site's nodes must then be kept down or wiped"
    )]
    CatalogQuorumLost { reachable: usize, voters: usize },
    #[error("protection group {pg}: no member at site {site} answered")]
    NoStandbyAnswered { pg: String, site: String },
    #[error("site {0} has no node")]
    SiteNotFound(String),
    #[error("protection group {pg} has no member at site {site} to take it over")]
    NoMembersAtSite { pg: String, site: String },
    #[error("protection group {pg} is not led from site {site} after {waited_ms} ms ({seen})")]
    SwitchoverTimeout {
        pg: String,
        site: String,
        waited_ms: u64,
        seen: String,
    },
    #[error(
        "protection group {pg} has no caught-up member at site {site} after {waited_ms} ms ({seen})"
    )]
    FailbackTimeout {
        pg: String,
        site: String,
        waited_ms: u64,
        seen: String,
    },
    #[error("drill {0} does not exist")]
    DrillNotFound(u64),
    #[error("this node is at site {here}: {action} on a node of site {wanted}")]
    WrongSite {
        action: String,
        here: String,
        wanted: String,
    },
    #[error(
        "protection group {pg}: this node's replica has applied index {applied}, not yet {wanted}; try again when it has caught up"
    )]
    SourceBehind {
        pg: String,
        applied: u64,
        wanted: u64,
    },
    #[error("protection group {pg} is not hosted on this node; its members are on nodes {nodes:?}")]
    NotHostedHere { pg: u64, nodes: Vec<u64> },
    #[error("certificates: {reason}")]
    Pki { reason: String },
    #[error("join token: {reason}")]
    JoinToken { reason: String },
    /// Another node answered and said no; `code` is its gRPC status.
    #[error("node at {addr} refused: {message}")]
    PeerRefused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
}

impl NodeError {
    pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
        let op = op.into();
        move |source| NodeError::Io { op, source }
    }

    /// Stable code for logs, CLI output and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            NodeError::NotInitialized => "node.not_initialized",
            NodeError::AlreadyInitialized { .. } => "node.already_initialized",
            NodeError::InvalidName { .. } => "node.invalid_name",
            NodeError::InvalidSize { .. } => "node.invalid_size",
            NodeError::TenantNotFound(_) => "node.tenant_not_found",
            NodeError::VolumeNotFound(_) => "node.volume_not_found",
            NodeError::BucketNotFound(_) => "node.bucket_not_found",
            NodeError::CredentialNotFound(_) => "node.credential_not_found",
            NodeError::PgNotFound(_) => "node.pg_not_found",
            NodeError::SnapshotNotFound(_) => "node.snapshot_not_found",
            NodeError::TokenNotFound(_) => "node.token_not_found",
            NodeError::SnapshotLocked { .. } | NodeError::RestorePastLock { .. } => {
                "node.snapshot_locked"
            }
            NodeError::NothingToUndo(_) => "node.nothing_to_undo",
            NodeError::QuotaExceeded { .. } => "node.quota_exceeded",
            NodeError::RestorePoint(_) => "node.bad_restore_point",
            NodeError::BeforeHistory { .. } => "node.before_history",
            NodeError::Unauthenticated => "node.unauthenticated",
            NodeError::PermissionDenied { .. } => "node.permission_denied",
            NodeError::MasterKeyInsideDataDir { .. } => "node.master_key_inside_data_dir",
            NodeError::Store(e) => e.code(),
            NodeError::Replication(e) => e.code(),
            NodeError::Keyring(_) => "store.keyring",
            NodeError::Io { .. } => "node.io",
            NodeError::Peer { .. } => "node.peer",
            NodeError::NodeNotFound(_) => "node.node_not_found",
            NodeError::SiteNotFound(_) => "node.site_not_found",
            NodeError::OldVotersReachable { .. } => "node.old_voters_reachable",
            NodeError::NoStandbyAnswered { .. } => "node.no_standby_answered",
            NodeError::CatalogNotLost { .. } => "node.catalog_not_lost",
            NodeError::CatalogQuorumLost { .. } => "node.catalog_quorum_lost",
            NodeError::Witness { .. } => "node.witness",
            NodeError::NoMembersAtSite { .. } => "node.no_members_at_site",
            NodeError::SwitchoverTimeout { .. } => "node.switchover_timeout",
            NodeError::FailbackTimeout { .. } => "node.failback_timeout",
            NodeError::NotHostedHere { .. } => "node.not_hosted_here",
            NodeError::Pki { .. } => "node.pki",
            NodeError::JoinToken { .. } => "node.join_token",
            NodeError::PeerRefused { .. } => "node.peer_refused",
            NodeError::DrillNotFound(_) => "node.drill_not_found",
            NodeError::WrongSite { .. } => "node.wrong_site",
            NodeError::SourceBehind { .. } => "node.source_behind",
        }
    }
}

impl NodeError {
    /// Apply answered a command with a result that is not the command's.
    pub fn unexpected_outcome(op: &str, applied: &lifeboat_replication::Applied) -> NodeError {
        NodeError::Io {
            op: op.into(),
            source: std::io::Error::other(format!("unexpected apply result {applied:?}")),
        }
    }
}

pub type NodeResult<T> = Result<T, NodeError>;
