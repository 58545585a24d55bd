//! Order-preserving key encoding.
//!
//! Every integer is big-endian so that byte order equals numeric order, and
//! log indexes in versioned keys are stored inverted (`!index`) so that the
//! newest version of a thing sorts first: "the version visible at index I"
//! is one seek to `(..., !I)`.
//!
//! ```text
//! raft_log    pg u64 | index u64                                   16 bytes
//! raft_state  pg u64 | kind u8                                      9 bytes
//! latest      pg u64 | volume u64 | block u64                      24 bytes
//! blocks      pg u64 | volume u64 | block u64 | !index u64         32 bytes
//! pg_meta     pg u64 | kind u8 | id u64 | !index u64               25 bytes
//! pg_meta     pg u64 | kind u8 | a u64 | b u64   (unversioned pairs) 25 bytes
//! latest      pg u64 | bucket u64 | escaped object key             (objects)
//! objects     pg u64 | bucket u64 | escaped object key | !index u64
//! chunks      pg u64 | chunk u64 | part u8                          17 bytes
//! timeline    pg u64 | time bucket u64 (10 ms since the epoch)     16 bytes
//! pg_meta     pg u64 | kind u8 (snapshot) | name (UTF-8)
//! ```
//!
//! An escaped object key is the key with every 0x00 byte written as 0x00
//! 0xFF, then 0x00 0x00: byte order of escaped keys is byte order of keys,
//! no escaped key is a prefix of another one's, and the escaped form of a
//! prefix of a key is a prefix of the key's escaped form (without the
//! terminator), so listing by prefix is one range.
//!
//! Changing any layout breaks every data directory: add a new kind or column
//! family instead.

use crate::{BlockNo, BucketId, ChunkId, LogIndex, PgId, VolumeId};

pub const RAFT_LOG_KEY_BYTES: usize = 16;
pub const RAFT_STATE_KEY_BYTES: usize = 9;
pub const LATEST_KEY_BYTES: usize = 24;
pub const BLOCK_KEY_BYTES: usize = 32;
pub const PG_META_KEY_BYTES: usize = 25;
const _: () = assert!(BLOCK_KEY_BYTES == LATEST_KEY_BYTES + 8);
const _: () = assert!(PG_META_KEY_BYTES == 8 + 1 + 8 + 8);

/// What a `raft_state` row of a PG holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftStateKind {
    Vote = 1,
    Committed = 2,
    LastPurged = 3,
    /// The state machine's last applied log id: written in the same batch as
    /// the data it covers.
    LastApplied = 4,
    /// The state machine's last membership: same batch as the data.
    Membership = 5,
    /// The current Raft snapshot's metadata.
    SnapshotMeta = 6,
    /// Present while a Raft snapshot is being installed: names its file.
    Installing = 7,
    /// This node's member of the PG: member id and generation (u64 BE each).
    /// Local, never replicated: a Raft snapshot install keeps it.
    LocalMember = 8,
    /// (Catalog PG only) the cluster id this node belongs to, bound once at
    /// `cluster init` or on join.
    ClusterBinding = 9,
    /// A fenced old member's data kept as the base of a delta resync
    /// (`crate::resync`): the generation it ran (u64 BE). Local; while it
    /// is present the PG's Raft log and state are empty and no member of
    /// the PG may start here.
    ResyncBase = 10,
}

/// What a `pg_meta` row describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MetaKind {
    Volume = 1,
    Bucket = 2,
    /// Unversioned pair `bucket | upload id`: a multipart upload in progress.
    Upload = 3,
    /// Unversioned pair `upload id | part number`: one uploaded part.
    UploadPart = 4,
    /// Unversioned pair `stream id | chunk id`: a chunk written ahead of the
    /// object or part that will name it, holding one reference until then.
    StreamChunk = 5,
    /// A named snapshot of the PG: `pg | kind | name`, unversioned.
    Snapshot = 6,
    /// The PG's snapshot schedule: `pg | kind`, one row, unversioned.
    Schedule = 7,
    /// A rollback mask: `pg | kind | 0 | !index`, newest first (see
    /// `crate::masks`).
    Mask = 8,
    /// The PG's GC horizon: `pg | kind`, one row (see `crate::gc`).
    Horizon = 9,
    /// Where the GC scanner is: `pg | kind`, one row.
    GcCursor = 10,
    /// The PG's continuous-protection window: `pg | kind`, one row.
    Window = 11,
    /// What the PG's data occupies: `pg | kind`, one row (see
    /// `crate::usage`).
    Usage = 12,
}

/// The two rows of a chunk in `chunks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkPart {
    /// The chunk's frame.
    Data = 0,
    /// How many object versions name the chunk (u64 BE).
    Refs = 1,
}

/// Ends an escaped object key.
const OBJECT_KEY_END: [u8; 2] = [0x00, 0x00];

/// `key` escaped (see the module docs), without the terminator.
pub fn escape_object_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 2);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out
}

/// The object key at the start of `escaped` and the bytes after its
/// terminator, or `None` if `escaped` is not an escaped key.
pub fn unescape_object_key(escaped: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut key = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        let b = escaped[i];
        if b != 0 {
            key.push(b);
            i += 1;
            continue;
        }
        match escaped.get(i + 1)? {
            0xFF => key.push(0),
            0x00 => return Some((key, &escaped[i + 2..])),
            _ => return None,
        }
        i += 2;
    }
    None
}

/// `pg | bucket`: the start of every `latest` and `objects` key of a bucket.
pub fn bucket_prefix(pg: PgId, bucket: BucketId) -> [u8; 16] {
    volume_prefix(pg, VolumeId(bucket.0))
}

/// The `latest` key of an object.
pub fn object_latest_key(pg: PgId, bucket: BucketId, key: &[u8]) -> Vec<u8> {
    let mut k = bucket_prefix(pg, bucket).to_vec();
    k.extend_from_slice(&escape_object_key(key));
    k.extend_from_slice(&OBJECT_KEY_END);
    k
}

/// The `objects` key of one version of an object.
pub fn object_version_key(pg: PgId, bucket: BucketId, key: &[u8], index: LogIndex) -> Vec<u8> {
    let mut k = object_latest_key(pg, bucket, key);
    k.extend_from_slice(&(!index.0).to_be_bytes());
    k
}

/// The object key of a `latest` key of a bucket (after its 16-byte prefix).
pub fn decode_object_latest_key(key: &[u8]) -> Option<Vec<u8>> {
    let (object, rest) = unescape_object_key(key.get(16..)?)?;
    rest.is_empty().then_some(object)
}

/// The object key and index of an `objects` key.
pub fn decode_object_version_key(key: &[u8]) -> Option<(Vec<u8>, LogIndex)> {
    let (object, rest) = unescape_object_key(key.get(16..)?)?;
    let index: [u8; 8] = rest.try_into().ok()?;
    Some((object, LogIndex(!u64::from_be_bytes(index))))
}

pub fn chunk_key(pg: PgId, chunk: ChunkId, part: ChunkPart) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8..16].copy_from_slice(&chunk.0.to_be_bytes());
    k[16] = part as u8;
    k
}

pub fn raft_log_key(pg: PgId, index: LogIndex) -> [u8; RAFT_LOG_KEY_BYTES] {
    let mut k = [0u8; RAFT_LOG_KEY_BYTES];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8..].copy_from_slice(&index.0.to_be_bytes());
    k
}

/// The log index of a `raft_log` key, or `None` if it is not one.
pub fn raft_log_index(key: &[u8]) -> Option<LogIndex> {
    let bytes: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    (key.len() == RAFT_LOG_KEY_BYTES).then_some(LogIndex(u64::from_be_bytes(bytes)))
}

pub fn raft_state_key(pg: PgId, kind: RaftStateKind) -> [u8; RAFT_STATE_KEY_BYTES] {
    let mut k = [0u8; RAFT_STATE_KEY_BYTES];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8] = kind as u8;
    k
}

/// The 8-byte prefix every per-PG key starts with.
pub fn pg_prefix(pg: PgId) -> [u8; 8] {
    pg.0.to_be_bytes()
}

pub fn latest_key(pg: PgId, volume: VolumeId, block: BlockNo) -> [u8; LATEST_KEY_BYTES] {
    let mut k = [0u8; LATEST_KEY_BYTES];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8..16].copy_from_slice(&volume.0.to_be_bytes());
    k[16..24].copy_from_slice(&block.0.to_be_bytes());
    k
}

pub fn volume_prefix(pg: PgId, volume: VolumeId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8..].copy_from_slice(&volume.0.to_be_bytes());
    k
}

pub fn block_key(
    pg: PgId,
    volume: VolumeId,
    block: BlockNo,
    index: LogIndex,
) -> [u8; BLOCK_KEY_BYTES] {
    let mut k = [0u8; BLOCK_KEY_BYTES];
    k[..LATEST_KEY_BYTES].copy_from_slice(&latest_key(pg, volume, block));
    k[LATEST_KEY_BYTES..].copy_from_slice(&(!index.0).to_be_bytes());
    k
}

/// The parts of a `blocks` key, or `None` if it is not one.
pub fn decode_block_key(key: &[u8]) -> Option<(PgId, VolumeId, BlockNo, LogIndex)> {
    if key.len() != BLOCK_KEY_BYTES {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(key[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some((
        PgId(word(0)),
        VolumeId(word(1)),
        BlockNo(word(2)),
        LogIndex(!word(3)),
    ))
}

pub fn pg_meta_prefix(pg: PgId, kind: MetaKind, id: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8] = kind as u8;
    k[9..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn pg_meta_key(pg: PgId, kind: MetaKind, id: u64, index: LogIndex) -> [u8; PG_META_KEY_BYTES] {
    let mut k = [0u8; PG_META_KEY_BYTES];
    k[..17].copy_from_slice(&pg_meta_prefix(pg, kind, id));
    k[17..].copy_from_slice(&(!index.0).to_be_bytes());
    k
}

/// The timeline row of a PG's 10 ms time bucket.
pub fn timeline_key(pg: PgId, bucket: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8..].copy_from_slice(&bucket.to_be_bytes());
    k
}

/// The time bucket of a timeline key, or `None` if it is not one.
pub fn decode_timeline_key(key: &[u8]) -> Option<u64> {
    (key.len() == 16).then(|| u64::from_be_bytes(key[8..16].try_into().expect("8 bytes")))
}

/// Where the rows of one PG's `kind` begin (variable-length kinds: snapshots).
pub fn pg_meta_kind_prefix(pg: PgId, kind: MetaKind) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&pg.0.to_be_bytes());
    k[8] = kind as u8;
    k
}

/// The row of snapshot `name` of a PG.
pub fn snapshot_key(pg: PgId, name: &str) -> Vec<u8> {
    let mut k = pg_meta_kind_prefix(pg, MetaKind::Snapshot).to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// An unversioned `pg_meta` row of a pair kind (uploads, parts, stream
/// chunks): same shape as a versioned key, with `b` where the inverted
/// index would be, so rows of one `a` sort by `b`.
pub fn pg_meta_pair_key(pg: PgId, kind: MetaKind, a: u64, b: u64) -> [u8; PG_META_KEY_BYTES] {
    let mut k = [0u8; PG_META_KEY_BYTES];
    k[..17].copy_from_slice(&pg_meta_prefix(pg, kind, a));
    k[17..].copy_from_slice(&b.to_be_bytes());
    k
}

/// `(a, b)` of a pair key, or `None` if it is not one.
pub fn decode_pg_meta_pair_key(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != PG_META_KEY_BYTES {
        return None;
    }
    let a = u64::from_be_bytes(key[9..17].try_into().ok()?);
    let b = u64::from_be_bytes(key[17..25].try_into().ok()?);
    Some((a, b))
}

/// The id and index of a `pg_meta` key, or `None` if it is not one.
pub fn decode_pg_meta_key(key: &[u8]) -> Option<(u64, LogIndex)> {
    if key.len() != PG_META_KEY_BYTES {
        return None;
    }
    let id = u64::from_be_bytes(key[9..17].try_into().ok()?);
    let index = !u64::from_be_bytes(key[17..25].try_into().ok()?);
    Some((id, LogIndex(index)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn object_version_keys_order_as_object_keys_then_newest_first(
            a in (proptest::collection::vec(0u8..4, 0..6), any::<u64>()),
            b in (proptest::collection::vec(0u8..4, 0..6), any::<u64>()),
        ) {
            let ka = object_version_key(PgId(1), BucketId(2), &a.0, LogIndex(a.1));
            let kb = object_version_key(PgId(1), BucketId(2), &b.0, LogIndex(b.1));
            let expected = a.0.cmp(&b.0).then(b.1.cmp(&a.1));
            prop_assert_eq!(ka.cmp(&kb), expected);
            prop_assert_eq!(decode_object_version_key(&ka), Some((a.0.clone(), LogIndex(a.1))));
            let la = object_latest_key(PgId(1), BucketId(2), &a.0);
            prop_assert_eq!(decode_object_latest_key(&la), Some(a.0.clone()));
        }

        #[test]
        fn an_escaped_prefix_is_a_prefix_of_exactly_the_keys_it_begins(
            key in proptest::collection::vec(0u8..3, 0..8),
            prefix in proptest::collection::vec(0u8..3, 0..4),
        ) {
            let mut start = bucket_prefix(PgId(1), BucketId(2)).to_vec();
            start.extend_from_slice(&escape_object_key(&prefix));
            let latest = object_latest_key(PgId(1), BucketId(2), &key);
            prop_assert_eq!(latest.starts_with(&start), key.starts_with(&prefix));
        }

        #[test]
        fn block_keys_order_as_tuples_with_newest_first(
            a in (0u64..4, 0u64..4, any::<u64>(), any::<u64>()),
            b in (0u64..4, 0u64..4, any::<u64>(), any::<u64>()),
        ) {
            let ka = block_key(PgId(a.0), VolumeId(a.1), BlockNo(a.2), LogIndex(a.3));
            let kb = block_key(PgId(b.0), VolumeId(b.1), BlockNo(b.2), LogIndex(b.3));
            // Newest first: a larger index sorts earlier.
            let ta = (a.0, a.1, a.2, std::cmp::Reverse(a.3));
            let tb = (b.0, b.1, b.2, std::cmp::Reverse(b.3));
            prop_assert_eq!(ka.cmp(&kb), ta.cmp(&tb));
            prop_assert_eq!(
                decode_block_key(&ka),
                Some((PgId(a.0), VolumeId(a.1), BlockNo(a.2), LogIndex(a.3)))
            );
        }

        #[test]
        fn raft_log_keys_order_by_pg_then_index(a in (any::<u64>(), any::<u64>()), b in (any::<u64>(), any::<u64>())) {
            let ka = raft_log_key(PgId(a.0), LogIndex(a.1));
            let kb = raft_log_key(PgId(b.0), LogIndex(b.1));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(raft_log_index(&ka), Some(LogIndex(a.1)));
        }

        #[test]
        fn pg_meta_keys_order_newest_first(id in any::<u64>(), i in any::<u64>(), j in any::<u64>()) {
            let ki = pg_meta_key(PgId(1), MetaKind::Volume, id, LogIndex(i));
            let kj = pg_meta_key(PgId(1), MetaKind::Volume, id, LogIndex(j));
            prop_assert_eq!(ki.cmp(&kj), j.cmp(&i));
            prop_assert_eq!(decode_pg_meta_key(&ki), Some((id, LogIndex(i))));
        }
    }

    #[test]
    fn the_version_visible_at_an_index_is_the_first_key_at_or_after_it() {
        let k = |i| block_key(PgId(1), VolumeId(2), BlockNo(3), LogIndex(i));
        // versions at 5 and 9; reading at 7 seeks to !7 and lands on 5.
        let mut keys = [k(5), k(9)];
        keys.sort();
        let seek = k(7);
        let found = keys.iter().find(|key| **key >= seek).unwrap();
        assert_eq!(decode_block_key(found).unwrap().3, LogIndex(5));
    }
}
