//! Identifier and unit newtypes shared by every layer.
//!
//! Each is a `u64` (or `u32` for key ids) on disk, big-endian in keys so that
//! byte order equals numeric order.

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_newtype!(
    /// A tenant (hosted department), numbered by the catalog.
    TenantId(u64)
);
id_newtype!(
    /// A protection group; PG 0 is the catalog.
    PgId(u64)
);
id_newtype!(
    /// A volume, unique within the cluster (allocated by the catalog).
    VolumeId(u64)
);
id_newtype!(
    /// A bucket, unique within the cluster. Allocated by the catalog from the
    /// same numbers as volumes, so a bucket's keys in `latest` never meet a
    /// volume's.
    BucketId(u64)
);
id_newtype!(
    /// A chunk of object data (at most 1 MiB), unique within its PG. Chosen
    /// at random by the node that encodes it, before the chunk has a log
    /// index, because the frame's associated data binds it.
    ChunkId(u64)
);
id_newtype!(
    /// A 4 KiB block number within a volume (not a byte offset, not a log index).
    BlockNo(u64)
);
id_newtype!(
    /// A Raft log index within a PG's current lineage.
    LogIndex(u64)
);
id_newtype!(
    /// A tenant data-encryption key's number; frames name the key that sealed them.
    KeyId(u32)
);
id_newtype!(
    /// A node process of the cluster; never reused.
    NodeId(u64)
);
id_newtype!(
    /// One Raft member of one PG on one node (Raft's own node id), allocated
    /// by the catalog and never reused: a wiped node rejoins under a new one.
    MemberId(u64)
);
id_newtype!(
    /// A PG's failover counter: raised by every forced failover and carried
    /// by every Raft message (never Raft's term).
    Generation(u64)
);

impl PgId {
    /// The catalog protection group.
    pub const CATALOG: PgId = PgId(0);
}

/// Bytes in a volume block: the unit of versioning and encryption.
pub const BLOCK_BYTES: usize = 4096;
const _: () = assert!(BLOCK_BYTES.is_power_of_two());
