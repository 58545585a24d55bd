//! The openraft type configuration shared by every protection group, and the
//! command and response types it carries.

use std::fmt;
use std::sync::Arc;

use lifeboat_proto::raft as pb;
use lifeboat_store::PgId;
use prost::Message;
use serde::{Deserialize, Serialize};

/// A member as Raft sees it: the node hosting it, where to reach that node
/// and which site it is in. Raft's own id for it is the member id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    pub node_id: u64,
    /// Raft transport address of the node (`host:port`).
    pub raft_addr: String,
    pub site: String,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} at {} ({})",
            self.node_id, self.raft_addr, self.site
        )
    }
}

/// A state machine command: the prost message, carried by openraft as-is.
///
/// openraft's `serde` feature requires `Serialize`; the encoding is the
/// prost bytes, so a command is encoded one way everywhere.
#[derive(Clone, Debug, PartialEq)]
pub struct Command(pub pb::Command);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use pb::command::Kind;
        let name = match &self.0.kind {
            Some(Kind::WriteBlocks(w)) => {
                return write!(
                    f,
                    "write_blocks(volume={}, blocks={})",
                    w.volume,
                    w.blocks.len()
                );
            }
            Some(Kind::PutObject(p)) => {
                return write!(
                    f,
                    "put_object(bucket={}, key_bytes={}, chunks={}, new_chunks={})",
                    p.bucket,
                    p.key.len(),
                    p.chunks.len(),
                    p.new_chunks.len()
                );
            }
            Some(Kind::CreateVolume(_)) => "create_volume",
            Some(Kind::CreateSnapshot(_)) => "create_snapshot",
            Some(Kind::DeleteSnapshot(_)) => "delete_snapshot",
            Some(Kind::LockSnapshot(_)) => "lock_snapshot",
            Some(Kind::RevokeToken(_)) => "revoke_token",
            Some(Kind::SetSchedule(_)) => "set_schedule",
            Some(Kind::UndeleteVolume(_)) => "undelete_volume",
            Some(Kind::RestorePg(_)) => "restore_pg",
            Some(Kind::SetWindow(_)) => "set_window",
            Some(Kind::AdvanceHorizon(_)) => "advance_horizon",
            Some(Kind::CollectGarbage(_)) => "collect_garbage",
            Some(Kind::UndeleteBucket(_)) => "undelete_bucket",
            Some(Kind::SetTenantQuota(_)) => "set_tenant_quota",
            Some(Kind::ReportPgUsage(_)) => "report_pg_usage",
            Some(Kind::CreateBucket(_)) => "create_bucket",
            Some(Kind::DeleteBucket(_)) => "delete_bucket",
            Some(Kind::DeleteObject(_)) => "delete_object",
            Some(Kind::WriteChunks(w)) => {
                return write!(
                    f,
                    "write_chunks(stream={}, chunks={})",
                    w.stream,
                    w.chunks.len()
                );
            }
            Some(Kind::PutPart(p)) => {
                return write!(
                    f,
                    "put_part(upload={}, part={}, chunks={}, new_chunks={})",
                    p.upload,
                    p.part,
                    p.chunks.len(),
                    p.new_chunks.len()
                );
            }
            Some(Kind::ReleaseStream(_)) => "release_stream",
            Some(Kind::CreateUpload(_)) => "create_upload",
            Some(Kind::CompleteUpload(_)) => "complete_upload",
            Some(Kind::AbortUpload(_)) => "abort_upload",
            Some(Kind::DeleteObjectVersion(_)) => "delete_object_version",
            Some(Kind::BindBucketName(_)) => "bind_bucket_name",
            Some(Kind::UnbindBucketName(_)) => "unbind_bucket_name",
            Some(Kind::CreateCredential(_)) => "create_credential",
            Some(Kind::RevokeCredential(_)) => "revoke_credential",
            Some(Kind::ResizeVolume(_)) => "resize_volume",
            Some(Kind::DeleteVolume(_)) => "delete_volume",
            Some(Kind::InitCatalog(_)) => "init_catalog",
            Some(Kind::CreateTenant(_)) => "create_tenant",
            Some(Kind::RotateDek(_)) => "rotate_dek",
            Some(Kind::CreateToken(_)) => "create_token",
            Some(Kind::BindVolumeName(_)) => "bind_volume_name",
            Some(Kind::UnbindVolumeName(_)) => "unbind_volume_name",
            Some(Kind::AddNode(_)) => "add_node",
            Some(Kind::RemoveNode(_)) => "remove_node",
            Some(Kind::SetPgMembers(_)) => "set_pg_members",
            Some(Kind::CreatePg(_)) => "create_pg",
            Some(Kind::PutDrill(_)) => "put_drill",
            Some(Kind::RecordDrillIo(_)) => "record_drill_io",
            Some(Kind::RecordDrillLag(_)) => "record_drill_lag",
            Some(Kind::StopDrill(_)) => "stop_drill",
            Some(Kind::RecordProgress(_)) => "record_progress",
            Some(Kind::RecordResync(_)) => "record_resync",
            Some(Kind::SetPgAck(_)) => "set_pg_ack",
            Some(Kind::SwitchActiveSite(_)) => "switch_active_site",
            Some(Kind::SetCatalogVoters(_)) => "set_catalog_voters",
            Some(Kind::CompleteForcedFailover(_)) => "complete_forced_failover",
            Some(Kind::RecordDivergence(_)) => "record_divergence",
            Some(Kind::SealBucket(_)) => "seal_bucket",
            Some(Kind::CreateJoinToken(_)) => "create_join_token",
            Some(Kind::RebuildCluster(_)) => "rebuild_cluster",
            None => "empty",
        };
        f.write_str(name)
    }
}

impl Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes_compat::Bytes = Deserialize::deserialize(d)?;
        pb::Command::decode(bytes.0.as_slice())
            .map(Command)
            .map_err(serde::de::Error::custom)
    }
}

/// Accepts bytes however a serde format chose to write them (a byte string,
/// or a sequence of numbers as JSON does).
mod serde_bytes_compat {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    pub struct Bytes(pub Vec<u8>);

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                    let mut out = Vec::new();
                    while let Some(b) = seq.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(Bytes(out))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

/// Why apply refused a command. Apply is deterministic: every replica
/// refuses the same commands for the same reasons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("volume {volume} does not exist")]
    VolumeNotFound { volume: u64 },
    #[error("volume {volume} already exists")]
    VolumeExists { volume: u64 },
    #[error("block {block} is past the end of volume {volume} ({blocks} blocks)")]
    BlockOutOfRange {
        volume: u64,
        block: u64,
        blocks: u64,
    },
    #[error("volume {volume} cannot shrink from {from_bytes} to {to_bytes} bytes")]
    VolumeShrink {
        volume: u64,
        from_bytes: u64,
        to_bytes: u64,
    },
    #[error("tenant {tenant} already exists")]
    TenantExists { tenant: String },
    #[error("tenant {tenant} does not exist")]
    TenantNotFound { tenant: String },
    #[error("protection group {tenant}/{pg} does not exist")]
    PgNotFound { tenant: String, pg: String },
    #[error("volume name {tenant}/{volume} is taken")]
    VolumeNameTaken { tenant: String, volume: String },
    #[error("volume name {tenant}/{volume} is not bound")]
    VolumeNameNotFound { tenant: String, volume: String },
    #[error("key id {proposed} is not the next key id of tenant {tenant} (current {current})")]
    KeyIdOutOfOrder {
        tenant: String,
        current: u32,
        proposed: u32,
    },
    #[error("the cluster is already initialised")]
    AlreadyInitialized,
    #[error("this command does not belong in protection group {pg}")]
    WrongGroup { pg: u64 },
    #[error("block {block} of volume {volume} changed while a sub-block write merged it")]
    BlockChanged { volume: u64, block: u64 },
    #[error("node {node} already exists or existed")]
    NodeExists { node: u64 },
    #[error("node {node} does not exist")]
    NodeNotFound { node: u64 },
    #[error("protection group {pg} does not exist")]
    PgIdNotFound { pg: u64 },
    #[error("protection group {tenant}/{pg} already exists")]
    PgExists { tenant: String, pg: String },
    #[error("{reason}")]
    JoinToken { reason: String },
    #[error("malformed command: {reason}")]
    Malformed { reason: String },
    #[error("bucket {bucket} does not exist")]
    BucketNotFound { bucket: u64 },
    #[error("bucket {bucket} already exists")]
    BucketExists { bucket: u64 },
    #[error("bucket {bucket} is a read-only clone")]
    BucketReadOnly { bucket: u64 },
    #[error("bucket {bucket} is not empty")]
    BucketNotEmpty { bucket: u64 },
    #[error("bucket name {bucket} is taken")]
    BucketNameTaken { bucket: String },
    #[error("bucket name {bucket} is not bound")]
    BucketNameNotFound { bucket: String },
    #[error("object key of {bytes} bytes is longer than {max} bytes")]
    KeyTooLong { bytes: usize, max: usize },
    #[error("the object already exists")]
    ObjectExists,
    #[error("chunk {chunk} is already in use")]
    ChunkExists { chunk: u64 },
    #[error("chunk {chunk} does not exist")]
    ChunkNotFound { chunk: u64 },
    #[error("no version at index {index}")]
    VersionNotFound { index: u64 },
    #[error("upload {upload} does not exist")]
    UploadNotFound { upload: u64 },
    #[error("upload {upload} already exists")]
    UploadExists { upload: u64 },
    #[error("part {part} was not uploaded, or has been replaced since it was read")]
    InvalidPart { part: u32 },
    #[error("access key {access_key} already exists")]
    CredentialExists { access_key: String },
    #[error("access key {access_key} does not exist")]
    CredentialNotFound { access_key: String },
    #[error("no such token")]
    TokenNotFound,
    #[error("snapshot {name} already exists")]
    SnapshotExists { name: String },
    #[error("snapshot {name} does not exist")]
    SnapshotNotFound { name: String },
    #[error("snapshot {name} is locked until {until_ms} ms since the epoch")]
    SnapshotLocked { name: String, until_ms: u64 },
    #[error("nothing to undo: the group was never restored")]
    NothingToUndo,
    #[error("the newest restore is now the one at index {newest}: look again before undoing")]
    RestoreChanged { newest: u64 },
    #[error("protection group {pg} has no member at site {site}")]
    NoMembersAtSite { pg: u64, site: String },
    #[error("drill {drill} does not exist")]
    DrillNotFound { drill: u64 },
    #[error("drill {drill} has stopped")]
    DrillStopped { drill: u64 },
    #[error("index {index} is outside the history this group holds ({oldest}..={newest})")]
    IndexOutOfHistory {
        index: u64,
        oldest: u64,
        newest: u64,
    },
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Done,
    TenantCreated {
        tenant_id: u64,
        main_pg: u64,
    },
    VolumeNameBound {
        pg: u64,
        volume: u64,
    },
    KeyRotated {
        key_id: u32,
    },
    NodeAdded {
        catalog_member: u64,
        catalog_voter: bool,
    },
    PgCreated {
        pg: u64,
    },
    BucketNameBound {
        pg: u64,
        bucket: u64,
    },
    /// A snapshot was deleted or its lock changed; an operator's token
    /// overrode a lock that held (the node audits that).
    SnapshotChanged {
        lock_overridden: bool,
    },
    /// A snapshot now pins `index`.
    SnapshotCreated {
        index: u64,
    },
    /// A restore in place (or its undo) masked everything after
    /// `to_index` for this many volumes and buckets; an operator's token
    /// rolled back past a locked snapshot (the node audits that).
    Restored {
        to_index: u64,
        volumes: u32,
        buckets: u32,
        lock_overridden: bool,
    },
    /// One step of the history's GC; `done` once its pass is over.
    Collected {
        versions: u64,
        bytes: u64,
        done: bool,
    },
    /// The horizon is now the state at this index.
    HorizonMoved {
        index: u64,
    },
    /// A version was removed by its id; it was a delete marker or not.
    VersionDeleted {
        delete_marker: bool,
    },
    /// A drill's record was written (its id, allocated if it was new).
    DrillPut {
        drill: u64,
    },
}

/// The state machine's answer to one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CommandResponse {
    /// `None` for blank and membership entries.
    pub outcome: Option<Result<Applied, Rejection>>,
}

openraft::declare_raft_types!(
    /// The type configuration of every Lifeboat Raft group (catalog and PGs).
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        Node = MemberNode,
);

/// A Raft snapshot's data as the state machine and the transport pass it.
///
/// A member's own snapshot is a read view of its replica (`View`): taking
/// one costs nothing whatever the PG's size, so the log can be purged
/// behind the applied state as often as retention asks, and the PG's key
/// ranges are read out only when a follower needs them, streamed straight
/// to it. A snapshot received from a leader is a file (`File`, layout in
/// `store::raft_snapshot`), installed from there. Both are read and written
/// in bounded memory whatever the PG's size.
#[derive(Debug, Clone)]
pub enum RaftSnapshotData {
    File(std::path::PathBuf),
    View(Arc<SnapshotView>),
}

/// The state of one PG frozen at an applied index, and the snapshot
/// metadata (JSON) that describes it, read from the same view.
#[derive(Debug)]
pub struct SnapshotView {
    pub pg: PgId,
    pub view: lifeboat_store::db::OwnedReadView,
    pub meta_json: Vec<u8>,
}
