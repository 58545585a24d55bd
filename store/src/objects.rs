//! Versioned buckets and objects: bucket records in `pg_meta`, every
//! version of every object in `objects` at its log index, the newest live
//! version of each key in `latest`, and object data as chunks in `chunks`
//! with reference counts.
//!
//! As in [`crate::volumes`], writes are *staged* into the state machine's
//! batch and reads go straight to the database.
//!
//! Invariants:
//! - for every object with a `latest` row holding index I, the `objects` row
//!   (pg, bucket, key, !I) exists and is an object (not a delete marker);
//!   a key whose newest version is a delete marker has no `latest` row, so
//!   listings never step over deleted keys;
//! - every chunk an object version names has a data row, and its reference
//!   count is the number of stored versions naming it (kept by the state
//!   machine, which stages counts it has already summed over its batch).
//!
//! Object version values say what they are, and name their chunks in the
//! clear (the state machine counts references without any key); the record
//! itself (size, ETag, metadata, chunk sizes) is sealed by the node that
//! encoded it, and this module never looks inside.

use crate::db::{Batch, Cf, Db, prefix_successor};
use crate::error::{Error, Result};
use crate::keys::{self, ChunkPart, MetaKind};
use crate::masks::{self, RollbackMask, Span};
use crate::volumes::{decode_based_record, encode_based_record, follow_clone_chain};
use crate::{BucketId, ChunkId, LogIndex, PgId};

/// The longest object key S3 allows, in bytes.
pub const OBJECT_KEY_BYTES_MAX: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BucketState {
    Active = 1,
    /// Tombstone: the bucket's history stays until the window has passed.
    Deleted = 2,
}

/// A bucket's record at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketRecord {
    /// The bucket's name, unique in the cluster.
    pub name: String,
    pub state: BucketState,
    /// When it was created, in milliseconds since the Unix epoch (the
    /// creating entry's stamp).
    pub created_ms: u64,
    /// `Some` for a clone: it shows `base.bucket` as it was at
    /// `base.index`, under its own writes if it is writable.
    pub base: Option<BucketBase>,
    /// Takes no more writes, but keeps (and shows) the data it has: a
    /// divergence snapshot once it holds what it carries.
    pub sealed: bool,
}

impl BucketRecord {
    /// A read-only clone: it has nothing of its own and takes no writes.
    pub fn is_read_only(&self) -> bool {
        self.base.is_some_and(|b| !b.writable)
    }

    /// Whether writes to it are accepted: neither a read-only clone nor
    /// sealed.
    pub fn takes_writes(&self) -> bool {
        !self.is_read_only() && !self.sealed
    }
}

/// What a bucket clone shows: another bucket of the PG at an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketBase {
    pub bucket: BucketId,
    pub index: LogIndex,
    /// The clone takes writes, kept in its own key space and read over
    /// the base (copy-on-write); otherwise it shows the base and nothing
    /// else.
    pub writable: bool,
    /// `Some` for a drill's clone: the base is in that other PG (the
    /// drill's source), read from this node's replica of it.
    pub pg: Option<PgId>,
}

/// Record layout, version 1 (the volumes' named-record layout):
/// ```text
/// version u8 | state u8 | created_ms u64 BE | name_len u16 BE | name (UTF-8)
/// ```
/// Version 2 (a read-only clone) appends its base, as volumes do; version 3
/// (a writable clone) is laid out as version 2. Sealed: version 4 is a
/// sealed bucket laid out as version 1, version 5 a sealed writable clone
/// laid out as version 3. Version 6, a clone whose base is in another PG,
/// is the record it would otherwise be followed by that record's version
/// u8 and the PG's id u64 BE.
const BUCKET_RECORD_VERSION: u8 = 1;
const WRITABLE_CLONE_RECORD_VERSION: u8 = 3;
const SEALED_RECORD_VERSION: u8 = 4;
const SEALED_CLONE_RECORD_VERSION: u8 = 5;
const OTHER_PG_CLONE_RECORD_VERSION: u8 = 6;

impl BucketRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_in_pg();
        if let Some(pg) = self.base.and_then(|b| b.pg) {
            out.push(out[0]);
            out.extend_from_slice(&pg.0.to_be_bytes());
            out[0] = OTHER_PG_CLONE_RECORD_VERSION;
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<BucketRecord, String> {
        if bytes.first() != Some(&OTHER_PG_CLONE_RECORD_VERSION) {
            return BucketRecord::decode_in_pg(bytes);
        }
        if bytes.len() < 10 {
            return Err("bucket record for another PG's clone is too short".into());
        }
        let (rest, tail) = bytes.split_at(bytes.len() - 9);
        let mut inner = rest.to_vec();
        inner[0] = tail[0];
        if inner[0] == OTHER_PG_CLONE_RECORD_VERSION {
            return Err("bucket record names another PG twice".into());
        }
        let pg = PgId(u64::from_be_bytes(tail[1..].try_into().expect("8 bytes")));
        let mut record = BucketRecord::decode_in_pg(&inner)?;
        match record.base.as_mut() {
            Some(base) => base.pg = Some(pg),
            None => return Err("bucket record names another PG but no base".into()),
        }
        Ok(record)
    }

    /// The record without [`BucketBase::pg`] (versions 1 to 5).
    fn encode_in_pg(&self) -> Vec<u8> {
        let mut out = encode_based_record(
            BUCKET_RECORD_VERSION,
            self.state as u8,
            self.created_ms,
            &self.name,
            self.base.map(|b| (b.bucket.0, b.index.0)),
        );
        match (self.base, self.sealed) {
            (Some(b), false) if b.writable => out[0] = WRITABLE_CLONE_RECORD_VERSION,
            (Some(b), true) if b.writable => out[0] = SEALED_CLONE_RECORD_VERSION,
            (None, true) => out[0] = SEALED_RECORD_VERSION,
            // A read-only clone is read-only already.
            _ => {}
        }
        out
    }

    fn decode_in_pg(bytes: &[u8]) -> std::result::Result<BucketRecord, String> {
        let sealed = matches!(
            bytes.first(),
            Some(&SEALED_RECORD_VERSION | &SEALED_CLONE_RECORD_VERSION)
        );
        let mut unsealed;
        let bytes = match bytes.first() {
            Some(&SEALED_RECORD_VERSION) => {
                unsealed = bytes.to_vec();
                unsealed[0] = BUCKET_RECORD_VERSION;
                unsealed.as_slice()
            }
            Some(&SEALED_CLONE_RECORD_VERSION) => {
                unsealed = bytes.to_vec();
                unsealed[0] = WRITABLE_CLONE_RECORD_VERSION;
                unsealed.as_slice()
            }
            _ => bytes,
        };
        let writable = bytes.first() == Some(&WRITABLE_CLONE_RECORD_VERSION);
        let mut as_read_only;
        let bytes = if writable {
            as_read_only = bytes.to_vec();
            as_read_only[0] = BUCKET_RECORD_VERSION + 1;
            as_read_only.as_slice()
        } else {
            bytes
        };
        let (state, created_ms, name, base) =
            decode_based_record(bytes, BUCKET_RECORD_VERSION, "bucket")?;
        if writable && base.is_none() {
            return Err("writable clone record without its base".into());
        }
        let state = match state {
            1 => BucketState::Active,
            2 => BucketState::Deleted,
            other => return Err(format!("unknown bucket state {other}")),
        };
        Ok(BucketRecord {
            name,
            state,
            created_ms,
            base: base.map(|(bucket, index)| BucketBase {
                bucket: BucketId(bucket),
                index: LogIndex(index),
                writable,
                pg: None,
            }),
            sealed,
        })
    }
}

/// One stored version of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectVersion {
    /// The object's data is `chunks`, in order; `record` is its sealed
    /// record (size, ETag, metadata).
    Object {
        chunks: Vec<ChunkId>,
        record: Vec<u8>,
    },
    /// The key was deleted at this version.
    DeleteMarker,
    /// A version deleted by its id at index `at`: it has left the
    /// listings and plain reads, and stays (with its chunks) for reads of
    /// the past until the history's GC drops it.
    Removed {
        at: LogIndex,
        original: Box<ObjectVersion>,
    },
}

/// Value layout, version 1:
/// ```text
/// version u8 | kind u8 (1 object, 2 delete marker, 3 removed)
/// object: chunk_count u32 BE | chunk ids u64 BE … | sealed record
/// removed: at u64 BE | the original version's value
/// ```
const OBJECT_VERSION_VERSION: u8 = 1;

impl ObjectVersion {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ObjectVersion::Object { chunks, record } => {
                let mut out = Vec::with_capacity(6 + chunks.len() * 8 + record.len());
                out.extend_from_slice(&[OBJECT_VERSION_VERSION, 1]);
                out.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
                for c in chunks {
                    out.extend_from_slice(&c.0.to_be_bytes());
                }
                out.extend_from_slice(record);
                out
            }
            ObjectVersion::DeleteMarker => vec![OBJECT_VERSION_VERSION, 2],
            ObjectVersion::Removed { at, original } => {
                let mut out = vec![OBJECT_VERSION_VERSION, 3];
                out.extend_from_slice(&at.0.to_be_bytes());
                out.extend_from_slice(&original.encode());
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<ObjectVersion, String> {
        match bytes {
            [OBJECT_VERSION_VERSION, 2] => Ok(ObjectVersion::DeleteMarker),
            [OBJECT_VERSION_VERSION, 3, rest @ ..] => {
                let at: [u8; 8] = rest
                    .get(..8)
                    .and_then(|a| a.try_into().ok())
                    .ok_or("removed version without its index")?;
                let original = ObjectVersion::decode(&rest[8..])?;
                if matches!(original, ObjectVersion::Removed { .. }) {
                    return Err("a removed version inside a removed version".into());
                }
                Ok(ObjectVersion::Removed {
                    at: LogIndex(u64::from_be_bytes(at)),
                    original: Box::new(original),
                })
            }
            [OBJECT_VERSION_VERSION, 1, rest @ ..] => {
                let count: [u8; 4] = rest
                    .get(..4)
                    .and_then(|c| c.try_into().ok())
                    .ok_or("object version without a chunk count")?;
                let count = u32::from_be_bytes(count) as usize;
                let ids = rest
                    .get(4..4 + count * 8)
                    .ok_or("object version's chunk list runs past its value")?;
                let chunks = ids
                    .chunks_exact(8)
                    .map(|c| ChunkId(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
                    .collect();
                Ok(ObjectVersion::Object {
                    chunks,
                    record: rest[4 + count * 8..].to_vec(),
                })
            }
            [OBJECT_VERSION_VERSION, kind, ..] => {
                Err(format!("unknown object version kind {kind}"))
            }
            [version, ..] => Err(format!("unknown object version layout {version}")),
            [] => Err("empty object version".into()),
        }
    }

    /// The chunks this version names (none for a delete marker; a
    /// removed version still holds its original's).
    pub fn chunks(&self) -> &[ChunkId] {
        match self {
            ObjectVersion::Object { chunks, .. } => chunks,
            ObjectVersion::DeleteMarker => &[],
            ObjectVersion::Removed { original, .. } => original.chunks(),
        }
    }
}

/// Stages a new version of a bucket's record.
pub fn stage_bucket(
    batch: &mut Batch,
    pg: PgId,
    bucket: BucketId,
    index: LogIndex,
    record: &BucketRecord,
) {
    batch.put(
        Cf::PgMeta,
        &keys::pg_meta_key(pg, MetaKind::Bucket, bucket.0, index),
        &record.encode(),
    );
}

/// Stages one version of an object and moves (or, for a delete marker,
/// removes) its `latest` row. Reference counts of its chunks are the
/// caller's to stage ([`stage_chunk_refs`]).
pub fn stage_object_version(
    batch: &mut Batch,
    pg: PgId,
    bucket: BucketId,
    key: &[u8],
    index: LogIndex,
    version: &ObjectVersion,
) {
    batch.put(
        Cf::Objects,
        &keys::object_version_key(pg, bucket, key, index),
        &version.encode(),
    );
    let latest = keys::object_latest_key(pg, bucket, key);
    match version {
        ObjectVersion::Object { .. } => batch.put(Cf::Latest, &latest, &index.0.to_be_bytes()),
        ObjectVersion::DeleteMarker => batch.delete(Cf::Latest, &latest),
        ObjectVersion::Removed { .. } => {
            panic!("a removed version is staged with stage_version_removal")
        }
    }
}

/// Stages the removal (by version id) of the version of `key` at `index`,
/// at index `at`, and points `latest` at `new_latest` (the newest version
/// still live after it, `None` if that is a delete marker or there is
/// none).
#[allow(clippy::too_many_arguments)]
pub fn stage_version_removal(
    batch: &mut Batch,
    pg: PgId,
    bucket: BucketId,
    key: &[u8],
    index: LogIndex,
    at: LogIndex,
    original: ObjectVersion,
    new_latest: Option<LogIndex>,
) {
    let removed = ObjectVersion::Removed {
        at,
        original: Box::new(original),
    };
    batch.put(
        Cf::Objects,
        &keys::object_version_key(pg, bucket, key, index),
        &removed.encode(),
    );
    let latest = keys::object_latest_key(pg, bucket, key);
    match new_latest {
        Some(i) => batch.put(Cf::Latest, &latest, &i.0.to_be_bytes()),
        None => batch.delete(Cf::Latest, &latest),
    }
}

/// Stages a chunk's frame.
pub fn stage_chunk(batch: &mut Batch, pg: PgId, chunk: ChunkId, frame: &[u8]) {
    batch.put(
        Cf::Chunks,
        &keys::chunk_key(pg, chunk, ChunkPart::Data),
        frame,
    );
}

/// A chunk's reference count and the size of its frame, kept together in
/// its refs row so that freeing a chunk never reads its frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkState {
    /// How many object versions (and streams) name the chunk.
    pub refs: u64,
    pub frame_bytes: u64,
}

/// Stages a chunk's reference count (`refs | frame bytes`, u64 BE each);
/// at zero the chunk goes, data and all.
pub fn stage_chunk_refs(batch: &mut Batch, pg: PgId, chunk: ChunkId, state: ChunkState) {
    let refs_key = keys::chunk_key(pg, chunk, ChunkPart::Refs);
    if state.refs == 0 {
        batch.delete(Cf::Chunks, &refs_key);
        batch.delete(Cf::Chunks, &keys::chunk_key(pg, chunk, ChunkPart::Data));
    } else {
        let mut v = state.refs.to_be_bytes().to_vec();
        v.extend_from_slice(&state.frame_bytes.to_be_bytes());
        batch.put(Cf::Chunks, &refs_key, &v);
    }
}

/// What [`Objects::list`] returns, in key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    /// A live object and the index of its newest version.
    Object { key: Vec<u8>, index: LogIndex },
    /// Keys sharing this prefix up to and including the delimiter, rolled
    /// up into one entry.
    CommonPrefix(Vec<u8>),
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<Listed>,
    /// Where the next page starts when this one is full and more follows
    /// (an opaque position for [`ListQuery::resume`]).
    pub resume: Option<Vec<u8>>,
}

/// What [`Objects::list_versions`] returns, in key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListedVersion {
    Version {
        key: Vec<u8>,
        /// The bucket the version is stored in (a clone's base, for
        /// versions from before the clone): its record is bound to it.
        bucket: BucketId,
        index: LogIndex,
        version: ObjectVersion,
        /// The newest version of its key (possibly a delete marker).
        is_latest: bool,
    },
    CommonPrefix(Vec<u8>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionListing {
    pub entries: Vec<ListedVersion>,
    /// More follows the last entry.
    pub truncated: bool,
}

/// A listing of a bucket's live objects (S3 ListObjects semantics).
#[derive(Clone, Debug, Default)]
pub struct ListQuery<'a> {
    pub prefix: &'a [u8],
    /// Roll keys up to the first occurrence of this after the prefix.
    pub delimiter: Option<&'a [u8]>,
    /// Only keys strictly after this one.
    pub start_after: Option<&'a [u8]>,
    /// A position from an earlier page's [`Listing::resume`]; wins over
    /// `start_after`.
    pub resume: Option<&'a [u8]>,
    /// Entries per page (objects and common prefixes together), at least 1.
    pub limit: usize,
}

/// (object key, index) of an `objects` row's key.
fn version_key_of(k: &[u8]) -> Result<(Vec<u8>, LogIndex)> {
    keys::decode_object_version_key(k)
        .ok_or_else(|| Error::corrupt_record(Cf::Objects.name(), k, "malformed object key"))
}

/// Where a listing's keys lie (the bucket's keys under `q.prefix`) and
/// where its page starts.
fn list_start(pg: PgId, bucket: BucketId, q: &ListQuery<'_>) -> (Vec<u8>, Vec<u8>) {
    let mut range = keys::bucket_prefix(pg, bucket).to_vec();
    range.extend_from_slice(&keys::escape_object_key(q.prefix));
    let position = match (q.resume, q.start_after) {
        (Some(resume), _) => resume.to_vec(),
        (None, Some(after)) => {
            // The smallest key above `after`'s: its `latest` key plus 0x00.
            let mut k = keys::object_latest_key(pg, bucket, after);
            k.push(0);
            k
        }
        (None, None) => range.clone(),
    };
    let position = position.max(range.clone());
    (range, position)
}

/// The common prefix `key` rolls up into under `q`'s delimiter, if any.
fn rolled_up(q: &ListQuery<'_>, key: &[u8]) -> Option<Vec<u8>> {
    let d = q.delimiter.filter(|d| !d.is_empty())?;
    let rest = &key[q.prefix.len()..];
    find(rest, d).map(|at| key[..q.prefix.len() + at + d.len()].to_vec())
}

/// The first position past every key that begins with `common`.
fn past_prefix(bucket_prefix: &[u8], common: &[u8]) -> Vec<u8> {
    let mut escaped = bucket_prefix.to_vec();
    escaped.extend_from_slice(&keys::escape_object_key(common));
    prefix_successor(&escaped).unwrap_or_else(|| {
        let mut end = escaped.clone();
        end.push(0xFF);
        end
    })
}

/// What one bucket's versions of a key say to a read through its spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// No version in reach: the key is not there, or (in a writable
    /// clone) its base decides.
    Absent,
    /// A delete marker hides the key (and, in a clone, its base's).
    Hidden,
    /// The live version and its index.
    Live(LogIndex, ObjectVersion),
}

/// What a read through `spans` (newest first) sees among a key's stored
/// versions (newest first): the newest version in the first span that
/// holds one, unless that is a delete marker, which hides the key. A
/// version removed by id counts as removed only when its removal lies in
/// one of the spans: a removal after a past read point, or one a rollback
/// mask hides, had not happened for that read.
pub fn seen_version(versions: &[(LogIndex, ObjectVersion)], spans: &[Span]) -> Seen {
    let removal_seen = |at: LogIndex| spans.iter().any(|s| s.holds(at));
    for span in spans {
        let in_reach = versions
            .iter()
            .filter(|(index, _)| span.at.is_none_or(|at| *index <= at));
        for (index, version) in in_reach {
            if span.above.is_some_and(|above| *index <= above) {
                break;
            }
            let live = match version {
                ObjectVersion::Removed { at, .. } if removal_seen(*at) => continue,
                ObjectVersion::Removed { original, .. } => original.as_ref(),
                v => v,
            };
            return match live {
                ObjectVersion::Object { .. } => Seen::Live(*index, live.clone()),
                _ => Seen::Hidden,
            };
        }
    }
    Seen::Absent
}

/// The live version a read through `spans` sees (see [`seen_version`]).
pub fn visible_version(
    versions: &[(LogIndex, ObjectVersion)],
    spans: &[Span],
) -> Option<(LogIndex, ObjectVersion)> {
    match seen_version(versions, spans) {
        Seen::Live(index, version) => Some((index, version)),
        Seen::Absent | Seen::Hidden => None,
    }
}

/// One bucket that reads of a bucket go through, and the spans of its
/// versions they see. A plain bucket reads one layer, itself; a writable
/// clone reads itself, then its base at the cloned index (and that base's
/// base, for a clone of a clone); a read-only clone reads only its base.
/// Each key is decided by the first layer with a version of it in reach:
/// a delete marker in a clone hides its base's object. A drill's clone
/// reads its base in the drill's source PG: that layer and those below it
/// name the PG. Bucket ids are the cluster's, so a layer's bucket says
/// which layer a version came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketLayer {
    /// `None`: the PG being read; `Some`: another PG (a drill's source).
    pub pg: Option<PgId>,
    pub bucket: BucketId,
    pub spans: Vec<Span>,
}

impl BucketLayer {
    /// The PG this layer's versions are stored in, when `pg` is read.
    pub fn pg_in(&self, pg: PgId) -> PgId {
        self.pg.unwrap_or(pg)
    }

    /// The newest index the layer shows (`None`: its newest).
    pub fn at(&self) -> Option<LogIndex> {
        self.spans.first().and_then(|s| s.at)
    }

    fn is_plain_newest(&self) -> bool {
        self.spans == [Span::plain(None)]
    }
}

/// How deep clones of clones may nest: every level is one more read for
/// keys the clones above it do not have.
pub const CLONE_DEPTH_MAX: usize = crate::volumes::CLONE_DEPTH_MAX;

/// Reads of buckets and objects.
#[derive(Clone, Debug)]
pub struct Objects {
    db: Db,
}

impl Objects {
    pub fn new(db: Db) -> Objects {
        Objects { db }
    }

    /// The newest record of a bucket at or below `at` (`LogIndex(u64::MAX)`
    /// for the latest).
    pub fn bucket_at(
        &self,
        pg: PgId,
        bucket: BucketId,
        at: LogIndex,
    ) -> Result<Option<(LogIndex, BucketRecord)>> {
        let prefix = keys::pg_meta_prefix(pg, MetaKind::Bucket, bucket.0);
        let start = keys::pg_meta_key(pg, MetaKind::Bucket, bucket.0, at);
        let Some((key, value)) = self.db.seek(Cf::PgMeta, &prefix, &start)? else {
            return Ok(None);
        };
        decode_bucket_row(&key, &value).map(|(_, index, record)| Some((index, record)))
    }

    pub fn bucket(&self, pg: PgId, bucket: BucketId) -> Result<Option<(LogIndex, BucketRecord)>> {
        self.bucket_at(pg, bucket, LogIndex(u64::MAX))
    }

    /// The newest record of every bucket of a PG, deleted ones included.
    pub fn buckets(&self, pg: PgId) -> Result<Vec<(BucketId, LogIndex, BucketRecord)>> {
        let prefix = keys::pg_meta_kind_prefix(pg, MetaKind::Bucket);
        let mut out: Vec<(BucketId, LogIndex, BucketRecord)> = Vec::new();
        for (key, value) in self.db.scan(Cf::PgMeta, &prefix, &prefix, usize::MAX)? {
            let (id, index, record) = decode_bucket_row(&key, &value)?;
            if out.last().is_none_or(|(last, _, _)| *last != id) {
                out.push((id, index, record));
            }
        }
        Ok(out)
    }

    /// The index of the newest live version of `key`, if it has one.
    pub fn latest_index(&self, pg: PgId, bucket: BucketId, key: &[u8]) -> Result<Option<LogIndex>> {
        let latest = keys::object_latest_key(pg, bucket, key);
        self.db
            .get(Cf::Latest, &latest)?
            .map(|v| decode_index(&latest, &v))
            .transpose()
    }

    /// The newest live version of `key`: one point read of `latest` and one
    /// of `objects`, whatever the length of its history.
    pub fn latest(
        &self,
        pg: PgId,
        bucket: BucketId,
        key: &[u8],
    ) -> Result<Option<(LogIndex, ObjectVersion)>> {
        let Some(index) = self.latest_index(pg, bucket, key)? else {
            return Ok(None);
        };
        let version_key = keys::object_version_key(pg, bucket, key, index);
        let value = self.db.get(Cf::Objects, &version_key)?.ok_or_else(|| {
            Error::corrupt_record(
                Cf::Objects.name(),
                &version_key,
                "latest names an object version that is missing",
            )
        })?;
        Ok(Some((index, decode_version(&version_key, &value)?)))
    }

    /// The version of `key` visible at `at`: the newest at or below it,
    /// which may be a delete marker.
    pub fn version_at(
        &self,
        pg: PgId,
        bucket: BucketId,
        key: &[u8],
        at: LogIndex,
    ) -> Result<Option<(LogIndex, ObjectVersion)>> {
        let prefix = keys::object_latest_key(pg, bucket, key);
        let start = keys::object_version_key(pg, bucket, key, at);
        let Some((k, v)) = self.db.seek(Cf::Objects, &prefix, &start)? else {
            return Ok(None);
        };
        let (_, index) = version_key_of(&k)?;
        Ok(Some((index, decode_version(&k, &v)?)))
    }

    /// The layers reads of `bucket` at `at` (`None`: the newest) go
    /// through, given the PG's masks (see [`BucketLayer`]). Empty if the
    /// bucket did not exist then.
    pub fn layers(
        &self,
        pg: PgId,
        bucket: BucketId,
        at: Option<LogIndex>,
        masks: &[RollbackMask],
    ) -> Result<Vec<BucketLayer>> {
        let mut layers = Vec::new();
        let mut other_pg = None;
        let existed = follow_clone_chain(pg, MetaKind::Bucket, bucket.0, at, |b, at| {
            let Some((_, record)) =
                self.bucket_at(pg, BucketId(b), at.unwrap_or(LogIndex(u64::MAX)))?
            else {
                return Ok(None);
            };
            // A read-only clone has nothing of its own to read.
            if !record.is_read_only() {
                layers.push(BucketLayer {
                    pg: None,
                    bucket: BucketId(b),
                    spans: masks::spans(masks, |m| m.covers_bucket(BucketId(b)), at),
                });
            }
            match record.base {
                Some(base) if base.pg.is_some() => {
                    other_pg = Some(base);
                    Ok(Some(None))
                }
                base => Ok(Some(base.map(|base| (base.bucket.0, base.index)))),
            }
        })?;
        if !existed {
            return Ok(Vec::new());
        }
        if let Some(base) = other_pg {
            let source = base.pg.expect("matched above");
            let record_key = || keys::pg_meta_prefix(pg, MetaKind::Bucket, bucket.0);
            if source == pg {
                return Err(Error::corrupt_record(
                    Cf::PgMeta.name(),
                    &record_key(),
                    "a drill's base names its own PG",
                ));
            }
            // The source's masks are the source's: a restore there after
            // the drill's moment does not change what the drill shows,
            // and one before it is read as the source read it then.
            let source_masks = masks::masks(&self.db, source)?;
            let through = self.layers(source, base.bucket, Some(base.index), &source_masks)?;
            if through.is_empty() {
                return Err(Error::corrupt_record(
                    Cf::PgMeta.name(),
                    &record_key(),
                    format!("drill base did not exist at index {}", base.index),
                ));
            }
            layers.extend(through.into_iter().map(|l| BucketLayer {
                pg: Some(l.pg.unwrap_or(source)),
                ..l
            }));
        }
        Ok(layers)
    }

    /// What `layer`'s versions of `key` say (see [`Seen`]). Unmasked and
    /// at the newest, a live key is one point read of `latest` and one of
    /// `objects`; a key without a live version costs a seek more.
    pub fn seen(&self, pg: PgId, layer: &BucketLayer, key: &[u8]) -> Result<Seen> {
        let pg = layer.pg_in(pg);
        if layer.is_plain_newest()
            && let Some((index, version)) = self.latest(pg, layer.bucket, key)?
        {
            return Ok(Seen::Live(index, version));
        }
        let Some(first) = layer.spans.first() else {
            return Ok(Seen::Absent);
        };
        let versions = self.versions_from(pg, layer.bucket, key, first.at)?;
        Ok(seen_version(&versions, &layer.spans))
    }

    /// The live version of `key` a read through `layers` sees, and the
    /// bucket it is stored in (whose id its sealed record is bound to).
    pub fn find_layered(
        &self,
        pg: PgId,
        layers: &[BucketLayer],
        key: &[u8],
    ) -> Result<Option<(BucketId, LogIndex, ObjectVersion)>> {
        if let [layer] = layers {
            return Ok(self
                .find(layer.pg_in(pg), layer.bucket, key, &layer.spans)?
                .map(|(index, version)| (layer.bucket, index, version)));
        }
        for layer in layers {
            match self.seen(pg, layer, key)? {
                Seen::Absent => continue,
                Seen::Hidden => return Ok(None),
                Seen::Live(index, version) => return Ok(Some((layer.bucket, index, version))),
            }
        }
        Ok(None)
    }

    /// The smallest object key at or after `position` under `range` in any
    /// of `layers`' buckets (both relative: what follows a bucket's
    /// 16-byte key prefix), with the key's relative `latest` key.
    fn next_key(
        &self,
        pg: PgId,
        layers: &[BucketLayer],
        range: &[u8],
        position: &[u8],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut best: Option<(Vec<u8>, Vec<u8>)> = None;
        for layer in layers {
            let pg = layer.pg_in(pg);
            let prefix = keys::bucket_prefix(pg, layer.bucket);
            let under = [prefix.as_slice(), range].concat();
            let start = [prefix.as_slice(), position].concat();
            if let Some((k, _)) = self.db.seek(Cf::Objects, &under, &start)? {
                let (key, _) = version_key_of(&k)?;
                let relative =
                    keys::object_latest_key(pg, layer.bucket, &key)[prefix.len()..].to_vec();
                if best.as_ref().is_none_or(|(_, b)| relative < *b) {
                    best = Some((key, relative));
                }
            }
        }
        Ok(best)
    }

    /// The live version of `key` that a read through `spans` sees (see
    /// [`visible_version`]). The newest, unmasked, is one point read of
    /// `latest` and one of `objects`, whatever the length of its history;
    /// other reads walk the key's versions from the first span's index.
    pub fn find(
        &self,
        pg: PgId,
        bucket: BucketId,
        key: &[u8],
        spans: &[Span],
    ) -> Result<Option<(LogIndex, ObjectVersion)>> {
        if let [
            Span {
                at: None,
                above: None,
            },
        ] = spans
        {
            return self.latest(pg, bucket, key);
        }
        let Some(first) = spans.first() else {
            return Ok(None);
        };
        let versions = self.versions_from(pg, bucket, key, first.at)?;
        Ok(visible_version(&versions, spans))
    }

    /// One page of the bucket's live objects as a read through `spans`
    /// sees them (see [`Objects::list_layered`]).
    pub fn list_view(
        &self,
        pg: PgId,
        bucket: BucketId,
        spans: &[Span],
        q: &ListQuery<'_>,
    ) -> Result<Listing> {
        let layer = BucketLayer {
            pg: None,
            bucket,
            spans: spans.to_vec(),
        };
        self.list_layered(pg, std::slice::from_ref(&layer), q)
    }

    /// One page of the live objects a read through `layers` sees, in key
    /// order; positions are in the first layer's key space. One plain
    /// layer is [`Objects::list`]; otherwise (a clone, a restored bucket)
    /// it walks the versions of every layer, so its cost grows with the
    /// history of the keys it passes.
    pub fn list_layered(
        &self,
        pg: PgId,
        layers: &[BucketLayer],
        q: &ListQuery<'_>,
    ) -> Result<Listing> {
        let Some(top) = layers.first() else {
            return Ok(Listing::default());
        };
        if let [layer] = layers
            && layer.is_plain_newest()
        {
            return self.list(layer.pg_in(pg), layer.bucket, q);
        }
        let bucket_prefix = keys::bucket_prefix(pg, top.bucket);
        let skip = bucket_prefix.len();
        let (range, mut position) = list_start(pg, top.bucket, q);
        let limit = q.limit.max(1);
        let mut listing = Listing::default();
        loop {
            let Some((key, _)) = self.next_key(pg, layers, &range[skip..], &position[skip..])?
            else {
                return Ok(listing);
            };
            let key_start = keys::object_latest_key(pg, top.bucket, &key);
            let (entry, next) = match rolled_up(q, &key) {
                Some(common) => {
                    let past = past_prefix(&bucket_prefix, &common);
                    let shown =
                        self.any_key(pg, layers, &key_start[skip..], &past[skip..], |key| {
                            Ok(self.find_layered(pg, layers, key)?.is_some())
                        })?;
                    let entry = shown.then_some(Listed::CommonPrefix(common));
                    (entry, past)
                }
                None => {
                    let past = prefix_successor(&key_start).expect("keys end in 0x00");
                    let entry = self
                        .find_layered(pg, layers, &key)?
                        .map(|(_, index, _)| Listed::Object { key, index });
                    (entry, past)
                }
            };
            if let Some(entry) = entry {
                if listing.entries.len() == limit {
                    listing.resume = Some(position);
                    return Ok(listing);
                }
                listing.entries.push(entry);
            }
            position = next;
        }
    }

    /// Whether `shown` holds for any key from `from` up to `until`
    /// (relative `latest` keys) in `layers`.
    fn any_key(
        &self,
        pg: PgId,
        layers: &[BucketLayer],
        from: &[u8],
        until: &[u8],
        mut shown: impl FnMut(&[u8]) -> Result<bool>,
    ) -> Result<bool> {
        let mut position = from.to_vec();
        while position.as_slice() < until {
            let Some((key, relative)) = self.next_key(pg, layers, &[], &position)? else {
                return Ok(false);
            };
            if relative.as_slice() >= until {
                return Ok(false);
            }
            if shown(&key)? {
                return Ok(true);
            }
            position = prefix_successor(&relative).expect("keys end in 0x00");
        }
        Ok(false)
    }

    /// How many of a bucket's keys have a version (or delete marker) newer
    /// than `index`: one pass over its versions (what a restore's dry run
    /// reports).
    pub fn keys_written_since(&self, pg: PgId, bucket: BucketId, index: LogIndex) -> Result<u64> {
        let mut count = 0;
        let mut last_key: Option<Vec<u8>> = None;
        self.db.read_view().for_each_with_prefix(
            Cf::Objects,
            &keys::bucket_prefix(pg, bucket),
            |k, _| {
                let (key, version) = version_key_of(k)?;
                // Versions of a key sort newest first: its first row decides.
                if last_key.as_deref() != Some(key.as_slice()) {
                    count += u64::from(version > index);
                    last_key = Some(key);
                }
                Ok(())
            },
        )?;
        Ok(count)
    }

    /// The keys of a bucket's own whose newest stored version is after
    /// `index`, in key order: what it wrote or deleted since (a fenced
    /// member's divergence).
    pub fn keys_written_after(
        &self,
        pg: PgId,
        bucket: BucketId,
        index: LogIndex,
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut last_key: Option<Vec<u8>> = None;
        self.db.read_view().for_each_with_prefix(
            Cf::Objects,
            &keys::bucket_prefix(pg, bucket),
            |k, _| {
                let (key, version) = version_key_of(k)?;
                // Versions of a key sort newest first: its first row decides.
                if last_key.as_deref() != Some(key.as_slice()) {
                    if version > index {
                        out.push(key.clone());
                    }
                    last_key = Some(key);
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Every stored version of `key`, newest first.
    pub fn versions(
        &self,
        pg: PgId,
        bucket: BucketId,
        key: &[u8],
    ) -> Result<Vec<(LogIndex, ObjectVersion)>> {
        self.versions_from(pg, bucket, key, None)
    }

    /// The stored versions of `key` at or below `at` (`None`: all),
    /// newest first.
    fn versions_from(
        &self,
        pg: PgId,
        bucket: BucketId,
        key: &[u8],
        at: Option<LogIndex>,
    ) -> Result<Vec<(LogIndex, ObjectVersion)>> {
        let prefix = keys::object_latest_key(pg, bucket, key);
        let start = keys::object_version_key(pg, bucket, key, at.unwrap_or(LogIndex(u64::MAX)));
        self.db
            .scan(Cf::Objects, &prefix, &start, usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let (_, index) = version_key_of(&k)?;
                Ok((index, decode_version(&k, &v)?))
            })
            .collect()
    }

    /// One page of the bucket's live objects in key order. Reads only
    /// `latest`, so its cost follows the page, not the history; a common
    /// prefix costs one seek past all the keys it rolls up.
    pub fn list(&self, pg: PgId, bucket: BucketId, q: &ListQuery<'_>) -> Result<Listing> {
        let bucket_prefix = keys::bucket_prefix(pg, bucket);
        let (range, mut position) = list_start(pg, bucket, q);
        let limit = q.limit.max(1);
        let mut listing = Listing::default();
        loop {
            let Some((k, v)) = self.db.seek(Cf::Latest, &range, &position)? else {
                return Ok(listing);
            };
            let key = keys::decode_object_latest_key(&k).ok_or_else(|| {
                Error::corrupt_record(Cf::Latest.name(), &k, "malformed object key")
            })?;
            if listing.entries.len() == limit {
                listing.resume = Some(position);
                return Ok(listing);
            }
            match rolled_up(q, &key) {
                Some(common) => {
                    position = past_prefix(&bucket_prefix, &common);
                    listing.entries.push(Listed::CommonPrefix(common));
                }
                None => {
                    let index = decode_index(&k, &v)?;
                    let mut next = k;
                    next.push(0);
                    position = next;
                    listing.entries.push(Listed::Object { key, index });
                }
            }
        }
    }

    /// One page of every version (delete markers included) of the keys
    /// under `q.prefix` that a read through `layers` can name, in key order
    /// and newest first within a key: a clone lists its own versions, then
    /// its base's of the cloned moment (a version removed by id after that
    /// moment shows as it was; later ones are not listed). Versions a
    /// restore's mask hides are not listed either (a version id still
    /// reads them, and `restore --undo` lists them again). `q.start_after`
    /// is a key marker (every version of it is skipped) unless
    /// `version_after` names a version of it, when the page starts at the
    /// next older version of that key. `q.resume` is not used.
    pub fn list_versions(
        &self,
        pg: PgId,
        layers: &[BucketLayer],
        q: &ListQuery<'_>,
        version_after: Option<LogIndex>,
    ) -> Result<VersionListing> {
        let Some(top) = layers.first() else {
            return Ok(VersionListing::default());
        };
        let skip = keys::bucket_prefix(pg, top.bucket).len();
        let relative = |key: &[u8]| keys::object_latest_key(pg, top.bucket, key)[skip..].to_vec();
        let range = keys::escape_object_key(q.prefix);
        let past = |relative_start: &[u8]| {
            prefix_successor(relative_start).unwrap_or_else(|| {
                let mut end = relative_start.to_vec();
                end.push(0xFF);
                end
            })
        };
        let mut position = match (q.start_after, version_after) {
            (Some(key), Some(_)) => relative(key),
            (Some(key), None) => past(&relative(key)),
            (None, _) => range.clone(),
        };
        if position < range {
            position = range.clone();
        }
        // Resuming inside a key: its versions from `version_after` down.
        let mut resumed_inside: Option<(Vec<u8>, LogIndex)> = q
            .start_after
            .zip(version_after)
            .map(|(k, v)| (k.to_vec(), v));
        let limit = q.limit.max(1);
        let mut listing = VersionListing::default();
        loop {
            let Some((key, key_start)) = self.next_key(pg, layers, &range, &position)? else {
                return Ok(listing);
            };
            let rolled = q.delimiter.filter(|d| !d.is_empty()).and_then(|d| {
                let rest = &key[q.prefix.len()..];
                find(rest, d).map(|at| key[..q.prefix.len() + at + d.len()].to_vec())
            });
            if let Some(common) = rolled {
                let end = past(&keys::escape_object_key(&common));
                let listed = self.any_key(pg, layers, &key_start, &end, |key| {
                    Ok(!self.listed_versions_of(pg, layers, key)?.is_empty())
                })?;
                if listed {
                    if listing.entries.len() == limit {
                        listing.truncated = true;
                        return Ok(listing);
                    }
                    listing.entries.push(ListedVersion::CommonPrefix(common));
                }
                position = end;
                continue;
            }
            position = past(&key_start);
            let below = resumed_inside
                .take()
                .filter(|(inside, _)| *inside == key)
                .map(|(_, after)| after);
            for (n, (bucket, index, version)) in self
                .listed_versions_of(pg, layers, &key)?
                .into_iter()
                .enumerate()
            {
                if below.is_some_and(|after| index >= after) {
                    continue;
                }
                if listing.entries.len() == limit {
                    listing.truncated = true;
                    return Ok(listing);
                }
                listing.entries.push(ListedVersion::Version {
                    key: key.clone(),
                    bucket,
                    index,
                    version,
                    is_latest: n == 0,
                });
            }
        }
    }

    /// The versions of `key` a version listing through `layers` shows,
    /// newest first, with the bucket each is stored in.
    fn listed_versions_of(
        &self,
        pg: PgId,
        layers: &[BucketLayer],
        key: &[u8],
    ) -> Result<Vec<(BucketId, LogIndex, ObjectVersion)>> {
        let mut out = Vec::new();
        for layer in layers {
            let in_spans = |index: LogIndex| layer.spans.iter().any(|s| s.holds(index));
            let versions = self.versions_from(layer.pg_in(pg), layer.bucket, key, layer.at())?;
            for (index, version) in versions {
                // A version a rollback mask hides is not listed, so the
                // listing agrees with plain reads on which is the latest.
                if !in_spans(index) {
                    continue;
                }
                let version = match version {
                    // A removal the listing's spans do not see (after the
                    // moment listed, or hidden by a mask): as it was then.
                    ObjectVersion::Removed {
                        at: removed,
                        original,
                    } if !in_spans(removed) => *original,
                    ObjectVersion::Removed { .. } => continue,
                    version => version,
                };
                out.push((layer.bucket, index, version));
            }
        }
        Ok(out)
    }

    /// A chunk's frame.
    pub fn chunk(&self, pg: PgId, chunk: ChunkId) -> Result<Option<Vec<u8>>> {
        self.db
            .get(Cf::Chunks, &keys::chunk_key(pg, chunk, ChunkPart::Data))
    }

    /// How many stored object versions name the chunk (0 if it does not
    /// exist).
    pub fn chunk_refs(&self, pg: PgId, chunk: ChunkId) -> Result<u64> {
        Ok(self.chunk_state(pg, chunk)?.refs)
    }

    /// The chunk's count and frame size (all zero if it does not exist).
    pub fn chunk_state(&self, pg: PgId, chunk: ChunkId) -> Result<ChunkState> {
        let key = keys::chunk_key(pg, chunk, ChunkPart::Refs);
        let Some(v) = self.db.get(Cf::Chunks, &key)? else {
            return Ok(ChunkState::default());
        };
        match v.len() {
            16 => Ok(ChunkState {
                refs: decode_index(&key, &v[..8])?.0,
                frame_bytes: decode_index(&key, &v[8..])?.0,
            }),
            // Written before the frame's size was kept beside the count.
            8 => Ok(ChunkState {
                refs: decode_index(&key, &v)?.0,
                frame_bytes: self.chunk(pg, chunk)?.map_or(0, |f| f.len() as u64),
            }),
            _ => Err(Error::corrupt_record(
                Cf::Chunks.name(),
                &key,
                "chunk count is neither 8 nor 16 bytes",
            )),
        }
    }
}

/// The first position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn decode_index(key: &[u8], value: &[u8]) -> Result<LogIndex> {
    let bytes: [u8; 8] = value
        .try_into()
        .map_err(|_| Error::corrupt_record(Cf::Latest.name(), key, "index is not 8 bytes"))?;
    Ok(LogIndex(u64::from_be_bytes(bytes)))
}

fn decode_version(key: &[u8], value: &[u8]) -> Result<ObjectVersion> {
    ObjectVersion::decode(value).map_err(|e| Error::corrupt_record(Cf::Objects.name(), key, e))
}

fn decode_bucket_row(key: &[u8], value: &[u8]) -> Result<(BucketId, LogIndex, BucketRecord)> {
    let (id, index) = keys::decode_pg_meta_key(key)
        .ok_or_else(|| Error::corrupt_record(Cf::PgMeta.name(), key, "malformed pg_meta key"))?;
    let record = BucketRecord::decode(value)
        .map_err(|e| Error::corrupt_record(Cf::PgMeta.name(), key, e))?;
    Ok((BucketId(id), index, record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DbOptions, Durability};

    const PG: PgId = PgId(3);
    const B: BucketId = BucketId(9);

    fn plain_layer(bucket: BucketId) -> BucketLayer {
        BucketLayer {
            pg: None,
            bucket,
            spans: vec![Span::plain(None)],
        }
    }

    fn must_open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        (dir, db)
    }

    fn object(chunks: &[u64], record: &[u8]) -> ObjectVersion {
        ObjectVersion::Object {
            chunks: chunks.iter().map(|c| ChunkId(*c)).collect(),
            record: record.to_vec(),
        }
    }

    fn must_put(db: &Db, key: &str, index: u64, version: &ObjectVersion) {
        let mut b = db.new_batch();
        stage_object_version(&mut b, PG, B, key.as_bytes(), LogIndex(index), version);
        db.write(b, Durability::Buffered).unwrap();
    }

    /// A version listing as `key@[bucket.]index`, `x` for a delete marker
    /// and `*` for the latest.
    fn described(listing: &VersionListing, stored_in: bool) -> Vec<String> {
        listing
            .entries
            .iter()
            .map(|e| match e {
                ListedVersion::Version {
                    key,
                    bucket,
                    index,
                    version,
                    is_latest,
                } => format!(
                    "{}@{}{}{}{}",
                    String::from_utf8_lossy(key),
                    if stored_in {
                        format!("{}.", bucket.0)
                    } else {
                        String::new()
                    },
                    index.0,
                    if *version == ObjectVersion::DeleteMarker {
                        "x"
                    } else {
                        ""
                    },
                    if *is_latest { "*" } else { "" }
                ),
                ListedVersion::CommonPrefix(p) => String::from_utf8_lossy(p).into_owned(),
            })
            .collect()
    }

    fn keys_of(listing: &Listing) -> Vec<String> {
        listing
            .entries
            .iter()
            .map(|e| match e {
                Listed::Object { key, .. } => String::from_utf8(key.clone()).unwrap(),
                Listed::CommonPrefix(p) => format!("{}*", String::from_utf8(p.clone()).unwrap()),
            })
            .collect()
    }

    #[test]
    fn records_and_versions_round_trip_and_bad_bytes_are_refused() {
        let r = BucketRecord {
            name: "payroll-backups".into(),
            state: BucketState::Active,
            created_ms: 1_790_000_000_000,
            base: None,
            sealed: false,
        };
        assert_eq!(BucketRecord::decode(&r.encode()).unwrap(), r);
        for (writable, pg) in [false, true]
            .into_iter()
            .flat_map(|w| [(w, None), (w, Some(PgId(9)))])
        {
            let clone = BucketRecord {
                base: Some(BucketBase {
                    bucket: BucketId(4),
                    index: LogIndex(77),
                    writable,
                    pg,
                }),
                ..r.clone()
            };
            assert_eq!(BucketRecord::decode(&clone.encode()).unwrap(), clone);
            assert_eq!(clone.is_read_only(), !writable);
            assert_eq!(clone.takes_writes(), writable);
            let sealed = BucketRecord {
                sealed: writable,
                ..clone
            };
            assert_eq!(BucketRecord::decode(&sealed.encode()).unwrap(), sealed);
            assert!(!sealed.takes_writes());
        }
        let sealed = BucketRecord {
            sealed: true,
            ..r.clone()
        };
        assert_eq!(BucketRecord::decode(&sealed.encode()).unwrap(), sealed);
        assert!(!sealed.is_read_only() && !sealed.takes_writes());
        assert!(r.takes_writes());
        // A writable clone's layout without its base.
        let mut baseless = r.encode();
        baseless[0] = WRITABLE_CLONE_RECORD_VERSION;
        assert!(BucketRecord::decode(&baseless).is_err());
        // Another PG named for a bucket that is no clone, or twice, or cut.
        let mut other_pg = r.encode();
        other_pg.push(other_pg[0]);
        other_pg.extend_from_slice(&9u64.to_be_bytes());
        other_pg[0] = OTHER_PG_CLONE_RECORD_VERSION;
        assert!(BucketRecord::decode(&other_pg).is_err());
        let mut twice = other_pg.clone();
        twice[other_pg.len() - 9] = OTHER_PG_CLONE_RECORD_VERSION;
        assert!(BucketRecord::decode(&twice).is_err());
        assert!(BucketRecord::decode(&other_pg[..9]).is_err());
        for v in [
            object(&[1, u64::MAX], b"sealed"),
            object(&[], b""),
            ObjectVersion::DeleteMarker,
        ] {
            assert_eq!(ObjectVersion::decode(&v.encode()).unwrap(), v);
        }
        assert!(BucketRecord::decode(&r.encode()[..5]).is_err());
        assert!(ObjectVersion::decode(&[]).is_err());
        assert!(ObjectVersion::decode(&[1, 7]).is_err());
        assert!(ObjectVersion::decode(&[9, 1]).is_err());
        // A chunk count larger than the value.
        assert!(ObjectVersion::decode(&[1, 1, 0, 0, 0, 3, 0, 0]).is_err());
    }

    #[test]
    fn latest_and_past_versions_of_an_object() {
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        must_put(&db, "db/dump.sql", 10, &object(&[1], b"v1"));
        must_put(&db, "db/dump.sql", 20, &object(&[2, 3], b"v2"));
        must_put(&db, "db/dump.sql", 30, &ObjectVersion::DeleteMarker);
        must_put(&db, "db/dump.sql", 40, &object(&[4], b"v4"));
        let key = b"db/dump.sql".as_slice();
        assert_eq!(
            objects.latest(PG, B, key).unwrap(),
            Some((LogIndex(40), object(&[4], b"v4")))
        );
        assert_eq!(
            objects.version_at(PG, B, key, LogIndex(25)).unwrap(),
            Some((LogIndex(20), object(&[2, 3], b"v2")))
        );
        assert_eq!(
            objects.version_at(PG, B, key, LogIndex(35)).unwrap(),
            Some((LogIndex(30), ObjectVersion::DeleteMarker))
        );
        assert_eq!(objects.version_at(PG, B, key, LogIndex(9)).unwrap(), None);
        let indexes: Vec<u64> = objects
            .versions(PG, B, key)
            .unwrap()
            .iter()
            .map(|(i, _)| i.0)
            .collect();
        assert_eq!(indexes, [40, 30, 20, 10]);
        // A key that is a prefix of another has its own history.
        assert!(objects.versions(PG, B, b"db/dump").unwrap().is_empty());
        // Deleted, the key has no latest version but keeps its history.
        must_put(&db, "db/dump.sql", 50, &ObjectVersion::DeleteMarker);
        assert_eq!(objects.latest(PG, B, key).unwrap(), None);
        assert_eq!(objects.versions(PG, B, key).unwrap().len(), 5);
    }

    #[test]
    fn keys_with_zero_bytes_and_prefixes_of_each_other_stay_apart() {
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        let keys: [&[u8]; 5] = [b"a", b"a\0", b"a\0b", b"ab", b"\0"];
        for (i, k) in keys.iter().enumerate() {
            let mut b = db.new_batch();
            let v = object(&[i as u64], k);
            stage_object_version(&mut b, PG, B, k, LogIndex(i as u64 + 1), &v);
            db.write(b, Durability::Buffered).unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            let (_, v) = objects.latest(PG, B, k).unwrap().unwrap();
            assert_eq!(v, object(&[i as u64], k));
            assert_eq!(objects.versions(PG, B, k).unwrap().len(), 1);
        }
        let all = objects
            .list(
                PG,
                B,
                &ListQuery {
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        let listed: Vec<Vec<u8>> = all
            .entries
            .into_iter()
            .map(|e| match e {
                Listed::Object { key, .. } => key,
                Listed::CommonPrefix(p) => panic!("no delimiter, yet prefix {p:?}"),
            })
            .collect();
        let mut sorted: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        sorted.sort();
        assert_eq!(listed, sorted);
        let under_a0 = objects
            .list(
                PG,
                B,
                &ListQuery {
                    prefix: b"a\0",
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(under_a0.entries.len(), 2, "{under_a0:?}");
    }

    #[test]
    fn listing_pages_prefixes_and_delimiters() {
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        let names = [
            "config",
            "data/a",
            "data/b",
            "data/sub/c",
            "index/1",
            "index/2",
            "locks/x",
            "z",
        ];
        for (i, n) in names.iter().enumerate() {
            must_put(&db, n, i as u64 + 1, &object(&[i as u64], b"r"));
        }
        // Deleted keys are not listed (and cost nothing: no latest row).
        must_put(&db, "data/gone", 20, &object(&[99], b"r"));
        must_put(&db, "data/gone", 21, &ObjectVersion::DeleteMarker);
        // Another bucket's keys never show.
        let mut b = db.new_batch();
        stage_object_version(
            &mut b,
            PG,
            BucketId(10),
            b"data/other",
            LogIndex(5),
            &object(&[], b""),
        );
        db.write(b, Durability::Buffered).unwrap();

        let page = |q: ListQuery<'_>| objects.list(PG, B, &q).unwrap();
        let slash = Some(b"/".as_slice());
        let top = page(ListQuery {
            delimiter: slash,
            limit: 100,
            ..Default::default()
        });
        assert_eq!(
            keys_of(&top),
            ["config", "data/*", "index/*", "locks/*", "z"]
        );
        assert_eq!(top.resume, None);
        let data = page(ListQuery {
            prefix: b"data/",
            delimiter: slash,
            limit: 100,
            ..Default::default()
        });
        assert_eq!(keys_of(&data), ["data/a", "data/b", "data/sub/*"]);
        // Pages of two, resumed, cover the listing once, common prefixes
        // included (a page never repeats a prefix the last one ended on).
        let mut seen = Vec::new();
        let mut resume: Option<Vec<u8>> = None;
        loop {
            let p = page(ListQuery {
                delimiter: slash,
                resume: resume.as_deref(),
                limit: 2,
                ..Default::default()
            });
            assert!(p.entries.len() <= 2);
            seen.extend(keys_of(&p));
            match p.resume {
                Some(r) => resume = Some(r),
                None => break,
            }
        }
        assert_eq!(seen, keys_of(&top));
        // start-after is exclusive, and may name a key that does not exist.
        let after = page(ListQuery {
            start_after: Some(b"data/b"),
            limit: 3,
            ..Default::default()
        });
        assert_eq!(keys_of(&after), ["data/sub/c", "index/1", "index/2"]);
        assert!(after.resume.is_some());
        let after = page(ListQuery {
            start_after: Some(b"index/1x"),
            limit: 100,
            ..Default::default()
        });
        assert_eq!(keys_of(&after), ["index/2", "locks/x", "z"]);
        // A full page with nothing after it has no resume point.
        let last = page(ListQuery {
            prefix: b"index/",
            limit: 2,
            ..Default::default()
        });
        assert_eq!(keys_of(&last), ["index/1", "index/2"]);
        assert_eq!(last.resume, None);
        // A multi-byte delimiter, and a prefix nothing has.
        let dash = page(ListQuery {
            delimiter: Some(b"/s"),
            limit: 100,
            ..Default::default()
        });
        assert!(keys_of(&dash).contains(&"data/s*".to_string()), "{dash:?}");
        assert!(
            page(ListQuery {
                prefix: b"nope",
                limit: 5,
                ..Default::default()
            })
            .entries
            .is_empty()
        );
    }

    /// A drill's clone in its own PG over a bucket of the source PG at an
    /// index: the source's versions after it are not seen, the clone's own
    /// (a marker too) decide first, and listings merge both PGs.
    #[test]
    fn a_drill_clone_reads_its_base_in_the_source_pg() {
        const SOURCE: PgId = PG;
        const DRILL: PgId = PgId(PG.0 + 1);
        const CLONE: BucketId = BucketId(40);
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        let put = |pg: PgId, bucket: BucketId, key: &str, index: u64, v: ObjectVersion| {
            let mut b = db.new_batch();
            stage_object_version(&mut b, pg, bucket, key.as_bytes(), LogIndex(index), &v);
            db.write(b, Durability::Buffered).unwrap();
        };
        let bucket = |pg: PgId, id: BucketId, index: u64, base: Option<BucketBase>| {
            let mut b = db.new_batch();
            let record = BucketRecord {
                name: format!("b{}", id.0),
                state: BucketState::Active,
                created_ms: 1,
                base,
                sealed: false,
            };
            stage_bucket(&mut b, pg, id, LogIndex(index), &record);
            db.write(b, Durability::Buffered).unwrap();
        };
        bucket(SOURCE, B, 1, None);
        put(SOURCE, B, "a", 2, object(&[1], b"a2"));
        put(SOURCE, B, "b", 3, object(&[2], b"b3"));
        put(SOURCE, B, "c", 4, object(&[3], b"c4"));
        // After the drill's moment, in production.
        put(SOURCE, B, "a", 9, object(&[4], b"a9"));
        put(SOURCE, B, "late", 9, object(&[5], b"l9"));
        let base = BucketBase {
            bucket: B,
            index: LogIndex(5),
            writable: true,
            pg: Some(SOURCE),
        };
        bucket(DRILL, CLONE, 1, Some(base));
        put(DRILL, CLONE, "b", 2, ObjectVersion::DeleteMarker);
        put(DRILL, CLONE, "mine", 3, object(&[6], b"m3"));
        let layers = objects.layers(DRILL, CLONE, None, &[]).unwrap();
        assert_eq!(
            layers
                .iter()
                .map(|l| (l.pg_in(DRILL), l.bucket, l.at()))
                .collect::<Vec<_>>(),
            [(DRILL, CLONE, None), (SOURCE, B, Some(LogIndex(5)))]
        );
        let find = |key: &str| {
            objects
                .find_layered(DRILL, &layers, key.as_bytes())
                .unwrap()
                .map(|(bucket, index, _)| (bucket, index.0))
        };
        assert_eq!(find("a"), Some((B, 2)), "the source at the drill's moment");
        assert_eq!(find("b"), None, "the drill deleted it");
        assert_eq!(find("c"), Some((B, 4)));
        assert_eq!(find("late"), None);
        assert_eq!(find("mine"), Some((CLONE, 3)));
        let listed = objects
            .list_layered(
                DRILL,
                &layers,
                &ListQuery {
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(keys_of(&listed), ["a", "c", "mine"]);
        // A base that names the clone's own PG, or that was not there.
        bucket(
            DRILL,
            BucketId(41),
            1,
            Some(BucketBase {
                pg: Some(DRILL),
                ..base
            }),
        );
        assert!(objects.layers(DRILL, BucketId(41), None, &[]).is_err());
        bucket(
            DRILL,
            BucketId(42),
            1,
            Some(BucketBase {
                bucket: BucketId(99),
                ..base
            }),
        );
        assert!(objects.layers(DRILL, BucketId(42), None, &[]).is_err());
    }

    /// A writable clone C of B at index 10, and a clone D of C at 20:
    /// each key is decided by the first layer with a version of it.
    #[test]
    fn clones_layer_their_own_versions_over_their_bases_moment() {
        const C: BucketId = BucketId(11);
        const D: BucketId = BucketId(12);
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        let put = |bucket: BucketId, key: &str, index: u64, version: ObjectVersion| {
            let mut b = db.new_batch();
            stage_object_version(
                &mut b,
                PG,
                bucket,
                key.as_bytes(),
                LogIndex(index),
                &version,
            );
            db.write(b, Durability::Buffered).unwrap();
        };
        let bucket = |id: BucketId, index: u64, base: Option<(BucketId, u64, bool)>| {
            let mut b = db.new_batch();
            let record = BucketRecord {
                name: format!("b{}", id.0),
                state: BucketState::Active,
                created_ms: 1,
                base: base.map(|(bucket, index, writable)| BucketBase {
                    bucket,
                    index: LogIndex(index),
                    writable,
                    pg: None,
                }),
                sealed: false,
            };
            stage_bucket(&mut b, PG, id, LogIndex(index), &record);
            db.write(b, Durability::Buffered).unwrap();
        };
        bucket(B, 1, None);
        put(B, "a", 2, object(&[1], b"a2"));
        put(B, "d/x", 3, object(&[2], b"x3"));
        put(B, "d/y", 4, object(&[3], b"y4"));
        put(B, "gone", 5, object(&[4], b"g5"));
        put(B, "gone", 6, ObjectVersion::DeleteMarker);
        // After the clone's moment: not seen through it.
        put(B, "a", 12, object(&[5], b"a12"));
        put(B, "late", 13, object(&[6], b"l13"));
        bucket(C, 11, Some((B, 10, true)));
        put(C, "a", 14, object(&[7], b"a14"));
        put(C, "d/x", 15, ObjectVersion::DeleteMarker);
        put(C, "new", 16, object(&[8], b"n16"));
        // A removal by id of the clone's only version of a key: its base's
        // shows again.
        put(C, "d/y", 17, object(&[9], b"y17"));
        let mut b = db.new_batch();
        stage_version_removal(
            &mut b,
            PG,
            C,
            b"d/y",
            LogIndex(17),
            LogIndex(18),
            object(&[9], b"y17"),
            None,
        );
        db.write(b, Durability::Buffered).unwrap();
        let layers = objects.layers(PG, C, None, &[]).unwrap();
        assert_eq!(
            layers,
            [
                plain_layer(C),
                BucketLayer {
                    pg: None,
                    bucket: B,
                    spans: vec![Span::plain(Some(LogIndex(10)))],
                }
            ]
        );
        let find = |layers: &[BucketLayer], key: &str| {
            objects
                .find_layered(PG, layers, key.as_bytes())
                .unwrap()
                .map(|(bucket, index, _)| (bucket.0, index.0))
        };
        assert_eq!(find(&layers, "a"), Some((C.0, 14)));
        assert_eq!(find(&layers, "d/x"), None, "a marker hides the base's");
        assert_eq!(find(&layers, "d/y"), Some((B.0, 4)));
        assert_eq!(find(&layers, "gone"), None);
        assert_eq!(find(&layers, "late"), None);
        assert_eq!(find(&layers, "new"), Some((C.0, 16)));
        let list = |layers: &[BucketLayer], delimiter: Option<&'static [u8]>, limit: usize| {
            let mut all = Vec::new();
            let mut resume: Option<Vec<u8>> = None;
            loop {
                let page = objects
                    .list_layered(
                        PG,
                        layers,
                        &ListQuery {
                            delimiter,
                            resume: resume.as_deref(),
                            limit,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                all.extend(keys_of(&page));
                match page.resume {
                    Some(r) => resume = Some(r),
                    None => return all,
                }
            }
        };
        for limit in [1, 2, 100] {
            assert_eq!(list(&layers, None, limit), ["a", "d/y", "new"], "{limit}");
            assert_eq!(list(&layers, Some(b"/"), limit), ["a", "d/*", "new"]);
        }
        // The base is as it is now.
        assert_eq!(
            list(&[plain_layer(B)], None, 100),
            ["a", "d/x", "d/y", "late"]
        );

        // D, a clone of C at 17 (before the removal by id at 18), with a
        // write of its own.
        bucket(D, 19, Some((C, 17, true)));
        put(D, "late", 20, object(&[10], b"l20"));
        let deep = objects.layers(PG, D, None, &[]).unwrap();
        assert_eq!(
            deep.iter()
                .map(|l| (l.bucket.0, l.at().map(|i| i.0)))
                .collect::<Vec<_>>(),
            [(D.0, None), (C.0, Some(17)), (B.0, Some(10))]
        );
        assert_eq!(find(&deep, "d/y"), Some((C.0, 17)), "removed only after 17");
        assert_eq!(list(&deep, None, 1), ["a", "d/y", "late", "new"]);
        // A read-only clone of C reads only C and its base.
        bucket(BucketId(13), 21, Some((C, 17, false)));
        let read_only = objects.layers(PG, BucketId(13), None, &[]).unwrap();
        assert_eq!(read_only, deep[1..]);
        // A bucket that does not exist has no layers.
        assert!(
            objects
                .layers(PG, BucketId(99), None, &[])
                .unwrap()
                .is_empty()
        );

        // Versions: the clone's own, then its base's of the moment.
        let versions =
            |layers: &[BucketLayer], start_after: Option<&[u8]>, after: Option<u64>, limit| {
                let listing = objects
                    .list_versions(
                        PG,
                        layers,
                        &ListQuery {
                            start_after,
                            limit,
                            ..Default::default()
                        },
                        after.map(LogIndex),
                    )
                    .unwrap();
                (described(&listing, true), listing.truncated)
            };
        assert_eq!(
            versions(&layers, None, None, 100).0,
            [
                "a@11.14*",
                "a@9.2",
                "d/x@11.15x*",
                "d/x@9.3",
                "d/y@9.4*",
                "gone@9.6x*",
                "gone@9.5",
                "new@11.16*"
            ]
        );
        // Paged inside "a", across the layers.
        assert_eq!(
            versions(&layers, None, None, 1),
            (vec!["a@11.14*".into()], true)
        );
        assert_eq!(
            versions(&layers, Some(b"a"), Some(14), 2),
            (vec!["a@9.2".into(), "d/x@11.15x*".into()], true)
        );
    }

    /// After a restore masked (5, 8], a version listing agrees with reads:
    /// the versions written in the masked span are not listed, and a
    /// removal there has not happened.
    #[test]
    fn version_listing_follows_a_restores_mask() {
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        must_put(&db, "a", 2, &object(&[1], b"a2"));
        must_put(&db, "a", 6, &object(&[2], b"a6"));
        must_put(&db, "b", 3, &object(&[3], b"b3"));
        let mut batch = db.new_batch();
        stage_version_removal(
            &mut batch,
            PG,
            B,
            b"b",
            LogIndex(3),
            LogIndex(7),
            object(&[3], b"b3"),
            None,
        );
        db.write(batch, Durability::Buffered).unwrap();
        must_put(&db, "a", 10, &object(&[4], b"a10"));
        let masked = BucketLayer {
            pg: None,
            bucket: B,
            spans: vec![
                Span {
                    at: None,
                    above: Some(LogIndex(8)),
                },
                Span::plain(Some(LogIndex(5))),
            ],
        };
        let all = ListQuery {
            limit: 100,
            ..Default::default()
        };
        let listed = objects
            .list_versions(PG, std::slice::from_ref(&masked), &all, None)
            .unwrap();
        assert_eq!(described(&listed, false), ["a@10*", "a@2", "b@3*"]);
        let read = |key: &str| {
            objects
                .find_layered(PG, std::slice::from_ref(&masked), key.as_bytes())
                .unwrap()
                .map(|(_, index, _)| index.0)
        };
        assert_eq!((read("a"), read("b")), (Some(10), Some(3)));
        // Unmasked, the same rows list as written.
        let plain = objects
            .list_versions(PG, &[plain_layer(B)], &all, None)
            .unwrap();
        assert_eq!(described(&plain, false), ["a@10*", "a@6", "a@2"]);
    }

    #[test]
    fn version_listing_pages_newest_first_with_markers_and_prefixes() {
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        must_put(&db, "a", 1, &object(&[1], b"a1"));
        must_put(&db, "a", 4, &object(&[2], b"a4"));
        must_put(&db, "a", 6, &ObjectVersion::DeleteMarker);
        must_put(&db, "b/x", 2, &object(&[3], b"bx"));
        must_put(&db, "b/y", 3, &object(&[4], b"by"));
        must_put(&db, "c", 5, &object(&[5], b"c5"));
        let page = |q: &ListQuery<'_>, after: Option<u64>| {
            let listing = objects
                .list_versions(PG, &[plain_layer(B)], q, after.map(LogIndex))
                .unwrap();
            (described(&listing, false), listing.truncated)
        };
        let all = ListQuery {
            limit: 100,
            ..Default::default()
        };
        assert_eq!(
            page(&all, None),
            (
                vec!["a@6x*", "a@4", "a@1", "b/x@2*", "b/y@3*", "c@5*"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                false
            )
        );
        // Two at a time, resuming inside key "a": its older versions are
        // not the latest.
        let two = ListQuery {
            limit: 2,
            ..Default::default()
        };
        assert_eq!(page(&two, None).0, ["a@6x*", "a@4"]);
        assert!(page(&two, None).1);
        let next = ListQuery {
            start_after: Some(b"a"),
            ..two.clone()
        };
        assert_eq!(page(&next, Some(4)).0, ["a@1", "b/x@2*"]);
        // A key marker alone skips every version of that key.
        assert_eq!(page(&next, None).0, ["b/x@2*", "b/y@3*"]);
        let rolled = ListQuery {
            delimiter: Some(b"/"),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(page(&rolled, None).0, ["a@6x*", "a@4", "a@1", "b/", "c@5*"]);
        let under_b = ListQuery {
            prefix: b"b/",
            limit: 100,
            ..Default::default()
        };
        assert_eq!(page(&under_b, None).0, ["b/x@2*", "b/y@3*"]);
    }

    #[test]
    fn visibility_through_spans_follows_masks_and_removals() {
        use crate::masks::Span;
        let obj = |c: u64| object(&[c], b"r");
        let removed = |at: u64, original: ObjectVersion| ObjectVersion::Removed {
            at: LogIndex(at),
            original: Box::new(original),
        };
        let span = |at: Option<u64>, above: Option<u64>| Span {
            at: at.map(LogIndex),
            above: above.map(LogIndex),
        };
        let seen = |versions: &[(u64, ObjectVersion)], spans: &[Span]| {
            let versions: Vec<(LogIndex, ObjectVersion)> = versions
                .iter()
                .map(|(i, v)| (LogIndex(*i), v.clone()))
                .collect();
            visible_version(&versions, spans).map(|(i, _)| i.0)
        };
        let latest = [span(None, None)];
        // Restored at 20 to 10: above 20, else as at 10.
        let restored = [span(None, Some(20)), span(Some(10), None)];
        // Written at 5, overwritten at 15: the restore shows 5.
        let h = [(15, obj(2)), (5, obj(1))];
        assert_eq!(seen(&h, &latest), Some(15));
        assert_eq!(seen(&h, &restored), Some(5));
        // Deleted at 15 (a marker): the restore brings it back.
        let h = [(15, ObjectVersion::DeleteMarker), (5, obj(1))];
        assert_eq!(seen(&h, &latest), None);
        assert_eq!(seen(&h, &restored), Some(5));
        // Created at 15: the restore hides it; written again at 25: shown.
        assert_eq!(seen(&[(15, obj(1))], &restored), None);
        assert_eq!(seen(&[(25, obj(2)), (15, obj(1))], &restored), Some(25));
        // Deleted after the restore: gone.
        let h = [(25, ObjectVersion::DeleteMarker), (5, obj(1))];
        assert_eq!(seen(&h, &restored), None);
        // Version 5 removed by id at 15 (inside the masked stretch): the
        // removal did not happen for the restored state.
        let h = [(5, removed(15, obj(1)))];
        assert_eq!(seen(&h, &latest), None);
        assert_eq!(seen(&h, &restored), Some(5));
        // Removed by id at 25, after the restore: gone.
        assert_eq!(seen(&[(5, removed(25, obj(1)))], &restored), None);
        // Removed at 8, before the restore point: gone both ways, and the
        // older version shows.
        let h = [(6, removed(8, obj(2))), (3, obj(1))];
        assert_eq!(seen(&h, &restored), Some(3));
        // A read of the past (a read-only clone at 7) does not see a
        // removal made after it.
        assert_eq!(seen(&h, &[span(Some(7), None)]), Some(6));
        assert_eq!(seen(&[], &restored), None);
    }

    #[test]
    fn buckets_and_chunks() {
        let (_dir, db) = must_open();
        let objects = Objects::new(db.clone());
        let mut b = db.new_batch();
        let live = BucketRecord {
            name: "b1".into(),
            state: BucketState::Active,
            created_ms: 5,
            base: None,
            sealed: false,
        };
        stage_bucket(&mut b, PG, B, LogIndex(3), &live);
        let gone = BucketRecord {
            state: BucketState::Deleted,
            ..live.clone()
        };
        stage_bucket(&mut b, PG, B, LogIndex(8), &gone);
        let other = BucketRecord {
            name: "b2".into(),
            ..live.clone()
        };
        stage_bucket(&mut b, PG, BucketId(11), LogIndex(4), &other);
        stage_chunk(&mut b, PG, ChunkId(77), b"frame");
        stage_chunk_refs(
            &mut b,
            PG,
            ChunkId(77),
            ChunkState {
                refs: 2,
                frame_bytes: 5,
            },
        );
        db.write(b, Durability::Buffered).unwrap();

        assert_eq!(
            objects.bucket(PG, B).unwrap(),
            Some((LogIndex(8), gone.clone()))
        );
        assert_eq!(
            objects.bucket_at(PG, B, LogIndex(7)).unwrap(),
            Some((LogIndex(3), live))
        );
        assert_eq!(objects.bucket_at(PG, B, LogIndex(2)).unwrap(), None);
        let all: Vec<(u64, String)> = objects
            .buckets(PG)
            .unwrap()
            .into_iter()
            .map(|(id, _, r)| (id.0, r.name))
            .collect();
        assert_eq!(all, [(9, "b1".to_string()), (11, "b2".to_string())]);

        assert_eq!(
            objects.chunk(PG, ChunkId(77)).unwrap().as_deref(),
            Some(&b"frame"[..])
        );
        assert_eq!(objects.chunk_refs(PG, ChunkId(77)).unwrap(), 2);
        assert_eq!(objects.chunk_state(PG, ChunkId(77)).unwrap().frame_bytes, 5);
        assert_eq!(objects.chunk_refs(PG, ChunkId(78)).unwrap(), 0);
        // A count written before the frame's size was kept beside it.
        let mut b = db.new_batch();
        stage_chunk(&mut b, PG, ChunkId(79), b"old-frame");
        b.put(
            Cf::Chunks,
            &keys::chunk_key(PG, ChunkId(79), ChunkPart::Refs),
            &3u64.to_be_bytes(),
        );
        db.write(b, Durability::Buffered).unwrap();
        assert_eq!(
            objects.chunk_state(PG, ChunkId(79)).unwrap(),
            ChunkState {
                refs: 3,
                frame_bytes: 9
            }
        );
        // At zero references the chunk goes.
        let mut b = db.new_batch();
        stage_chunk_refs(&mut b, PG, ChunkId(77), ChunkState::default());
        db.write(b, Durability::Buffered).unwrap();
        assert_eq!(objects.chunk(PG, ChunkId(77)).unwrap(), None);
        assert_eq!(objects.chunk_refs(PG, ChunkId(77)).unwrap(), 0);
    }
}
