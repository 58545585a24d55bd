//! Versioned volumes: block versions keyed by log index, the `latest` index,
//! and versioned volume records in `pg_meta`.
//!
//! Writes are *staged* into a caller's [`Batch`] (the state machine commits
//! them with the PG's applied index in one atomic write); reads go straight
//! to the database.
//!
//! Invariant: for every (pg, volume, block) with a `latest` row holding index
//! I, the `blocks` row (pg, volume, block, !I) exists. Both are written in
//! the same batch, and only ever together.
//!
//! A block value is either empty (a zero marker: all-zero block, TRIM,
//! WRITE_ZEROES) or an encoded frame; this module never looks inside frames.

use crate::db::{Batch, Cf, Db};
use crate::error::{Error, Result};
use crate::frame::FrameError;
use crate::keys::{self, MetaKind};
use crate::masks;
use crate::{BlockNo, LogIndex, PgId, VolumeId};

/// What a block holds at one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockContent<'a> {
    /// Reads as 4 KiB of zeros; stores nothing.
    Zero,
    /// An encoded frame.
    Frame(&'a [u8]),
}

impl<'a> BlockContent<'a> {
    /// The stored value: empty for a zero marker (a frame is never empty).
    pub fn from_stored(value: &'a [u8]) -> BlockContent<'a> {
        if value.is_empty() {
            BlockContent::Zero
        } else {
            BlockContent::Frame(value)
        }
    }

    fn stored(&self) -> &'a [u8] {
        match self {
            BlockContent::Zero => &[],
            BlockContent::Frame(f) => f,
        }
    }
}

/// One stored version of a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    /// The PG and volume it is stored under: a clone reads its base's
    /// blocks, whose frames are bound to the base (a drill's clone, to its
    /// source PG).
    pub pg: PgId,
    pub volume: VolumeId,
    pub index: LogIndex,
    /// Empty for a zero marker, else a frame.
    pub value: Vec<u8>,
}

impl StoredBlock {
    pub fn content(&self) -> BlockContent<'_> {
        BlockContent::from_stored(&self.value)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VolumeState {
    Active = 1,
    /// Tombstone: the volume's history stays until the window has passed.
    Deleted = 2,
}

/// Where a clone reads the blocks it has not written: another volume of
/// the same PG at an index. Set at creation and never changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeBase {
    pub volume: VolumeId,
    pub index: LogIndex,
    /// `Some` for a drill's clone: the base is in this other PG (the
    /// drill's source), read from the node's own replica of it. The
    /// source's pin keeps it, not this PG's GC.
    pub pg: Option<PgId>,
}

/// A volume's record at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The name within the tenant (`disk0` of `demo/disk0`).
    pub name: String,
    pub size_bytes: u64,
    pub state: VolumeState,
    /// `Some` for a clone.
    pub base: Option<VolumeBase>,
}

/// Record layout, version 1 (see [`encode_named_record`]):
/// ```text
/// version u8 | state u8 | size_bytes u64 BE | name_len u16 BE | name (UTF-8)
/// ```
/// Version 2 (a clone) appends its base (see [`encode_based_record`]);
/// version 3 (a drill's clone) appends `pg u64 BE` to the version 2 layout.
const VOLUME_RECORD_VERSION: u8 = 1;
const VOLUME_RECORD_OTHER_PG_VERSION: u8 = VOLUME_RECORD_VERSION + 2;

impl VolumeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_based_record(
            VOLUME_RECORD_VERSION,
            self.state as u8,
            self.size_bytes,
            &self.name,
            self.base.map(|b| (b.volume.0, b.index.0)),
        );
        if let Some(pg) = self.base.and_then(|b| b.pg) {
            out[0] = VOLUME_RECORD_OTHER_PG_VERSION;
            out.extend_from_slice(&pg.0.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<VolumeRecord, String> {
        let (bytes, other_pg) = match bytes.first() {
            Some(&VOLUME_RECORD_OTHER_PG_VERSION) if bytes.len() > 8 => {
                let (rest, pg) = bytes.split_at(bytes.len() - 8);
                let mut rest = rest.to_vec();
                rest[0] = VOLUME_RECORD_VERSION + 1;
                let pg = u64::from_be_bytes(pg.try_into().expect("8 bytes"));
                (std::borrow::Cow::Owned(rest), Some(PgId(pg)))
            }
            _ => (std::borrow::Cow::Borrowed(bytes), None),
        };
        let (state, size_bytes, name, base) =
            decode_based_record(&bytes, VOLUME_RECORD_VERSION, "volume")?;
        if other_pg.is_some() && base.is_none() {
            return Err("volume record names another PG but no base".into());
        }
        let state = match state {
            1 => VolumeState::Active,
            2 => VolumeState::Deleted,
            other => return Err(format!("unknown volume state {other}")),
        };
        Ok(VolumeRecord {
            name,
            size_bytes,
            state,
            base: base.map(|(volume, index)| VolumeBase {
                volume: VolumeId(volume),
                index: LogIndex(index),
                pg: other_pg,
            }),
        })
    }
}

/// One layer of what a volume reads: its own blocks (at an index, or the
/// newest; after a restore in place, only those above the restore's mask,
/// then its own as they were restored to), then each base in turn at the
/// index it was cloned from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    /// `None`: the PG being read; `Some`: another PG (a drill's source).
    pub pg: Option<PgId>,
    pub volume: VolumeId,
    /// `None`: the newest versions (through `latest`).
    pub at: Option<LogIndex>,
    /// Only versions above this index count in this layer (a rollback
    /// mask hides those below it); `None`: all.
    pub above: Option<LogIndex>,
}

impl Layer {
    /// The newest versions of a volume, unmasked.
    pub fn latest(volume: VolumeId) -> Layer {
        Layer {
            pg: None,
            volume,
            at: None,
            above: None,
        }
    }
}

/// Clones of clones this deep are refused (and a longer chain in storage
/// is corrupt): every read walks the chain.
pub const CLONE_DEPTH_MAX: usize = 16;

const NAMED_RECORD_HEADER_BYTES: usize = 1 + 1 + 8 + 2;

/// The layout of the small named records in `pg_meta` (volumes, buckets):
/// `version u8 | state u8 | value u64 BE | name_len u16 BE | name (UTF-8)`.
pub(crate) fn encode_named_record(version: u8, state: u8, value: u64, name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    assert!(name.len() <= u16::MAX as usize, "names are validated short");
    let mut out = Vec::with_capacity(NAMED_RECORD_HEADER_BYTES + name.len());
    out.push(version);
    out.push(state);
    out.extend_from_slice(&value.to_be_bytes());
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// A named record that may have a base (a clone of a volume or bucket):
/// version `plain_version` without one, `plain_version + 1` with one,
/// followed by `base id u64 BE | base index u64 BE`.
pub(crate) fn encode_based_record(
    plain_version: u8,
    state: u8,
    value: u64,
    name: &str,
    base: Option<(u64, u64)>,
) -> Vec<u8> {
    let version = plain_version + u8::from(base.is_some());
    let mut out = encode_named_record(version, state, value, name);
    if let Some((id, index)) = base {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&index.to_be_bytes());
    }
    out
}

/// Follows a clone chain (of volumes or buckets, `kind`) from `first` read
/// at `at` (`None`: the newest): `link(id, at)` reads one record, returning
/// `None` if it did not exist then, else its base as (id, index). A base
/// never changes, so each link's newest record names it. `Ok(false)` if
/// `first` did not exist; a missing base, or a chain longer than
/// [`CLONE_DEPTH_MAX`], is a corrupt record.
pub(crate) fn follow_clone_chain(
    pg: PgId,
    kind: MetaKind,
    first: u64,
    at: Option<LogIndex>,
    mut link: impl FnMut(u64, Option<LogIndex>) -> Result<Option<Option<(u64, LogIndex)>>>,
) -> Result<bool> {
    let mut next = Some((first, at));
    let mut depth = 0;
    while let Some((id, at)) = next {
        let Some(base) = link(id, at)? else {
            if id == first {
                return Ok(false);
            }
            return Err(Error::corrupt_record(
                Cf::PgMeta.name(),
                &keys::pg_meta_prefix(pg, kind, id),
                format!(
                    "clone base did not exist at index {}",
                    at.unwrap_or_default()
                ),
            ));
        };
        depth += 1;
        if depth > CLONE_DEPTH_MAX + 1 {
            return Err(Error::corrupt_record(
                Cf::PgMeta.name(),
                &keys::pg_meta_prefix(pg, kind, first),
                format!("clone chain longer than {CLONE_DEPTH_MAX}"),
            ));
        }
        next = base.map(|(id, index)| (id, Some(index)));
    }
    Ok(true)
}

/// (state, value, name, base as (id, index)) of a based record.
pub(crate) type BasedRecord = (u8, u64, String, Option<(u64, u64)>);

/// (state, value, name, base) of a record [`encode_based_record`] made.
pub(crate) fn decode_based_record(
    bytes: &[u8],
    plain_version: u8,
    what: &str,
) -> std::result::Result<BasedRecord, String> {
    let based = bytes.first() == Some(&(plain_version + 1));
    let version = plain_version + u8::from(based);
    let (state, value, name) = decode_named_record(bytes, version, what)?;
    let rest = &bytes[NAMED_RECORD_HEADER_BYTES + name.len()..];
    let base = match (based, rest.len()) {
        (false, 0) => None,
        (true, 16) => Some((
            u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(rest[8..].try_into().expect("8 bytes")),
        )),
        (_, n) => return Err(format!("{what} record has {n} unexpected trailing bytes")),
    };
    Ok((state, value, name, base))
}

/// (state, value, name) of a record [`encode_named_record`] made with
/// `version`; `what` names the record in errors.
pub(crate) fn decode_named_record(
    bytes: &[u8],
    version: u8,
    what: &str,
) -> std::result::Result<(u8, u64, String), String> {
    if bytes.len() < NAMED_RECORD_HEADER_BYTES {
        return Err(format!(
            "{what} record of {} bytes is too short",
            bytes.len()
        ));
    }
    if bytes[0] != version {
        return Err(format!("unknown {what} record version {}", bytes[0]));
    }
    let value = u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes"));
    let name_len = u16::from_be_bytes(bytes[10..12].try_into().expect("2 bytes")) as usize;
    let name = bytes
        .get(12..12 + name_len)
        .ok_or_else(|| format!("{what} name runs past the record"))?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| format!("{what} name is not UTF-8"))?;
    Ok((bytes[1], value, name))
}

/// Stages one block version and moves `latest` to it.
pub fn stage_block(
    batch: &mut Batch,
    pg: PgId,
    volume: VolumeId,
    block: BlockNo,
    index: LogIndex,
    content: BlockContent<'_>,
) {
    batch.put(
        Cf::Blocks,
        &keys::block_key(pg, volume, block, index),
        content.stored(),
    );
    batch.put(
        Cf::Latest,
        &keys::latest_key(pg, volume, block),
        &index.0.to_be_bytes(),
    );
}

/// Stages a new version of a volume's record.
pub fn stage_volume(
    batch: &mut Batch,
    pg: PgId,
    volume: VolumeId,
    index: LogIndex,
    record: &VolumeRecord,
) {
    batch.put(
        Cf::PgMeta,
        &keys::pg_meta_key(pg, MetaKind::Volume, volume.0, index),
        &record.encode(),
    );
}

/// The error for a frame that failed to decode, naming where it is stored.
pub fn corrupt_block(
    pg: PgId,
    volume: VolumeId,
    block: BlockNo,
    index: LogIndex,
    cause: FrameError,
) -> Error {
    Error::CorruptFrame {
        cf: Cf::Blocks.name(),
        key: format!("pg={pg} volume={volume} block={block} index={index}"),
        cause,
    }
}

/// A block version from its `blocks` row.
fn decode_stored(key: &[u8], value: Vec<u8>) -> Result<StoredBlock> {
    let (pg, volume, _, index) = keys::decode_block_key(key)
        .ok_or_else(|| Error::corrupt_record(Cf::Blocks.name(), key, "malformed block key"))?;
    Ok(StoredBlock {
        pg,
        volume,
        index,
        value,
    })
}

/// Reads of versioned volumes.
#[derive(Clone, Debug)]
pub struct Volumes {
    db: Db,
}

impl Volumes {
    pub fn new(db: Db) -> Volumes {
        Volumes { db }
    }

    /// The newest version of `count` consecutive blocks from `first`; `None`
    /// for a block never written. Two batched point lookups, whatever the
    /// length of the history.
    pub fn latest_blocks(
        &self,
        pg: PgId,
        volume: VolumeId,
        first: BlockNo,
        count: u64,
    ) -> Result<Vec<Option<StoredBlock>>> {
        let latest_keys: Vec<Vec<u8>> = (0..count)
            .map(|i| keys::latest_key(pg, volume, BlockNo(first.0 + i)).to_vec())
            .collect();
        let indexes = self.db.multi_get(Cf::Latest, &latest_keys)?;
        let mut block_keys = Vec::new();
        let mut found = Vec::with_capacity(indexes.len());
        for (i, value) in indexes.into_iter().enumerate() {
            let index = match value {
                None => None,
                Some(v) => {
                    let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                        Error::corrupt_record(
                            Cf::Latest.name(),
                            &latest_keys[i],
                            "index is not 8 bytes",
                        )
                    })?;
                    let index = LogIndex(u64::from_be_bytes(bytes));
                    block_keys.push(
                        keys::block_key(pg, volume, BlockNo(first.0 + i as u64), index).to_vec(),
                    );
                    Some(index)
                }
            };
            found.push(index);
        }
        let mut values = self.db.multi_get(Cf::Blocks, &block_keys)?.into_iter();
        let mut keys_iter = block_keys.iter();
        found
            .into_iter()
            .map(|index| {
                let Some(index) = index else { return Ok(None) };
                let key = keys_iter.next().expect("one block key per found index");
                match values.next().flatten() {
                    Some(value) => Ok(Some(StoredBlock {
                        pg,
                        volume,
                        index,
                        value,
                    })),
                    None => Err(Error::corrupt_record(
                        Cf::Blocks.name(),
                        key,
                        "latest names a block version that is missing",
                    )),
                }
            })
            .collect()
    }

    /// The version of a block visible at `at`: the newest at or below it.
    pub fn block_at(
        &self,
        pg: PgId,
        volume: VolumeId,
        block: BlockNo,
        at: LogIndex,
    ) -> Result<Option<StoredBlock>> {
        let prefix = keys::latest_key(pg, volume, block);
        let start = keys::block_key(pg, volume, block, at);
        self.db
            .seek(Cf::Blocks, &prefix, &start)?
            .map(|(key, value)| decode_stored(&key, value))
            .transpose()
    }

    /// The layers `volume` reads at `at` (`None`: the newest), its own
    /// first, through the PG's rollback masks. Empty if the volume does
    /// not exist then. A drill's clone ends in its source PG's layers at
    /// the drill's restore point (this node's replica of the source).
    pub fn layers(&self, pg: PgId, volume: VolumeId, at: Option<LogIndex>) -> Result<Vec<Layer>> {
        let masks = masks::masks(&self.db, pg)?;
        let mut layers = Vec::new();
        let mut other_pg = None;
        let existed = follow_clone_chain(pg, MetaKind::Volume, volume.0, at, |v, at| {
            let Some((_, record)) =
                self.volume_at(pg, VolumeId(v), at.unwrap_or(LogIndex(u64::MAX)))?
            else {
                return Ok(None);
            };
            for span in masks::spans(&masks, |m| m.covers_volume(VolumeId(v)), at) {
                layers.push(Layer {
                    pg: None,
                    volume: VolumeId(v),
                    at: span.at,
                    above: span.above,
                });
            }
            match record.base {
                Some(b) if b.pg.is_some() => {
                    other_pg = Some(b);
                    Ok(Some(None))
                }
                base => Ok(Some(base.map(|b| (b.volume.0, b.index)))),
            }
        })?;
        if !existed {
            return Ok(Vec::new());
        }
        if let Some(base) = other_pg {
            let source = base.pg.expect("matched above");
            if source == pg {
                return Err(Error::corrupt_record(
                    Cf::PgMeta.name(),
                    &keys::pg_meta_prefix(pg, MetaKind::Volume, volume.0),
                    "a drill's base names its own PG",
                ));
            }
            let through = self.layers(source, base.volume, Some(base.index))?;
            if through.is_empty() {
                return Err(Error::corrupt_record(
                    Cf::PgMeta.name(),
                    &keys::pg_meta_prefix(pg, MetaKind::Volume, volume.0),
                    format!("drill base did not exist at index {}", base.index),
                ));
            }
            layers.extend(through.into_iter().map(|l| Layer {
                pg: Some(l.pg.unwrap_or(source)),
                ..l
            }));
        }
        Ok(layers)
    }

    /// The versions of `count` consecutive blocks from `first` that a
    /// volume with these layers reads: each block from the first layer
    /// that has a version of it (a zero marker counts: a trimmed block of
    /// a clone hides its base's data).
    pub fn visible_blocks(
        &self,
        pg: PgId,
        layers: &[Layer],
        first: BlockNo,
        count: u64,
    ) -> Result<Vec<Option<StoredBlock>>> {
        // A volume that is not a clone, read at its newest: `latest` only.
        if let [
            Layer {
                pg: None,
                volume,
                at: None,
                above: None,
            },
        ] = layers
        {
            return self.latest_blocks(pg, *volume, first, count);
        }
        let mut out: Vec<Option<StoredBlock>> = vec![None; count as usize];
        let mut missing: Vec<u64> = (0..count).collect();
        for layer in layers {
            if missing.is_empty() {
                break;
            }
            let pg = layer.pg.unwrap_or(pg);
            let mut found = match layer.at {
                None if missing.len() as u64 == count => {
                    self.latest_blocks(pg, layer.volume, first, count)?
                }
                at => {
                    let at = at.unwrap_or(LogIndex(u64::MAX));
                    let seeks: Vec<(Vec<u8>, Vec<u8>)> = missing
                        .iter()
                        .map(|i| {
                            let b = BlockNo(first.0 + i);
                            (
                                keys::latest_key(pg, layer.volume, b).to_vec(),
                                keys::block_key(pg, layer.volume, b, at).to_vec(),
                            )
                        })
                        .collect();
                    let mut found = vec![None; count as usize];
                    for (i, hit) in missing.iter().zip(self.db.seek_each(Cf::Blocks, &seeks)?) {
                        found[*i as usize] = hit.map(|(k, v)| decode_stored(&k, v)).transpose()?;
                    }
                    found
                }
            };
            // Moved, not copied: a hit is a whole frame. A version the
            // layer's mask hides is no hit: the next layer decides.
            missing.retain(|i| {
                let hit = found[*i as usize]
                    .take()
                    .filter(|b| layer.above.is_none_or(|above| b.index > above));
                let keep = hit.is_none();
                out[*i as usize] = hit;
                keep
            });
        }
        Ok(out)
    }

    /// How many of a volume's own blocks were written (or trimmed) after
    /// `index`: one pass over its `latest` rows (what a restore's dry run
    /// reports).
    pub fn blocks_written_since(&self, pg: PgId, volume: VolumeId, index: LogIndex) -> Result<u64> {
        let mut count = 0;
        self.db.read_view().for_each_with_prefix(
            Cf::Latest,
            &keys::volume_prefix(pg, volume),
            |key, value| {
                let newest: [u8; 8] = value.try_into().map_err(|_| {
                    Error::corrupt_record(Cf::Latest.name(), key, "index is not 8 bytes")
                })?;
                count += u64::from(u64::from_be_bytes(newest) > index.0);
                Ok(())
            },
        )?;
        Ok(count)
    }

    /// A volume's own blocks whose newest version is after `index`, in
    /// block order: what it wrote (or trimmed) since (a fenced member's
    /// divergence).
    pub fn blocks_written_after(
        &self,
        pg: PgId,
        volume: VolumeId,
        index: LogIndex,
    ) -> Result<Vec<BlockNo>> {
        let mut out = Vec::new();
        self.db.read_view().for_each_with_prefix(
            Cf::Latest,
            &keys::volume_prefix(pg, volume),
            |key, value| {
                let newest: [u8; 8] = value.try_into().map_err(|_| {
                    Error::corrupt_record(Cf::Latest.name(), key, "index is not 8 bytes")
                })?;
                if u64::from_be_bytes(newest) > index.0 {
                    let block: [u8; 8] = key
                        .get(16..keys::LATEST_KEY_BYTES)
                        .filter(|_| key.len() == keys::LATEST_KEY_BYTES)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| {
                            Error::corrupt_record(Cf::Latest.name(), key, "not a block's key")
                        })?;
                    out.push(BlockNo(u64::from_be_bytes(block)));
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Every version of a block, newest first (tests and tools).
    pub fn block_history(
        &self,
        pg: PgId,
        volume: VolumeId,
        block: BlockNo,
    ) -> Result<Vec<StoredBlock>> {
        let prefix = keys::latest_key(pg, volume, block);
        self.db
            .scan(Cf::Blocks, &prefix, &prefix, usize::MAX)?
            .into_iter()
            .map(|(key, value)| decode_stored(&key, value))
            .collect()
    }

    /// The newest record of a volume at or below `at` (`LogIndex(u64::MAX)`
    /// for the latest).
    pub fn volume_at(
        &self,
        pg: PgId,
        volume: VolumeId,
        at: LogIndex,
    ) -> Result<Option<(LogIndex, VolumeRecord)>> {
        let prefix = keys::pg_meta_prefix(pg, MetaKind::Volume, volume.0);
        let start = keys::pg_meta_key(pg, MetaKind::Volume, volume.0, at);
        let Some((key, value)) = self.db.seek(Cf::PgMeta, &prefix, &start)? else {
            return Ok(None);
        };
        decode_volume_row(&key, &value).map(|(_, index, record)| Some((index, record)))
    }

    pub fn volume(&self, pg: PgId, volume: VolumeId) -> Result<Option<(LogIndex, VolumeRecord)>> {
        self.volume_at(pg, volume, LogIndex(u64::MAX))
    }

    /// The index of a volume's oldest record (its creation).
    pub fn volume_history_first(&self, pg: PgId, volume: VolumeId) -> Result<Option<LogIndex>> {
        let prefix = keys::pg_meta_prefix(pg, MetaKind::Volume, volume.0);
        let Some((key, value)) = self.db.last_with_prefix(Cf::PgMeta, &prefix)? else {
            return Ok(None);
        };
        decode_volume_row(&key, &value).map(|(_, index, _)| Some(index))
    }

    /// The newest record of every volume of a PG, deleted ones included.
    pub fn volumes(&self, pg: PgId) -> Result<Vec<(VolumeId, LogIndex, VolumeRecord)>> {
        let prefix = keys::pg_meta_kind_prefix(pg, MetaKind::Volume);
        let mut out: Vec<(VolumeId, LogIndex, VolumeRecord)> = Vec::new();
        // Volume records are few and small (one per create, resize, delete):
        // one pass keeping the first (newest) row of each volume is enough.
        for (key, value) in self.db.scan(Cf::PgMeta, &prefix, &prefix, usize::MAX)? {
            let (id, index, record) = decode_volume_row(&key, &value)?;
            if out.last().is_none_or(|(last, _, _)| *last != id) {
                out.push((id, index, record));
            }
        }
        Ok(out)
    }
}

fn decode_volume_row(key: &[u8], value: &[u8]) -> Result<(VolumeId, LogIndex, VolumeRecord)> {
    let (id, index) = keys::decode_pg_meta_key(key)
        .ok_or_else(|| Error::corrupt_record(Cf::PgMeta.name(), key, "malformed pg_meta key"))?;
    let record = VolumeRecord::decode(value)
        .map_err(|reason| Error::corrupt_record(Cf::PgMeta.name(), key, reason))?;
    Ok((VolumeId(id), index, record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DbOptions, Durability};

    fn must_open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        (dir, db)
    }

    fn must_write_block(db: &Db, block: u64, index: u64, value: &[u8]) {
        let mut b = db.new_batch();
        stage_block(
            &mut b,
            PgId(1),
            VolumeId(7),
            BlockNo(block),
            LogIndex(index),
            BlockContent::from_stored(value),
        );
        db.write(b, Durability::Buffered).unwrap();
    }

    #[test]
    fn latest_and_historic_reads_see_the_right_versions() {
        let (_dir, db) = must_open();
        must_write_block(&db, 0, 5, b"v5");
        must_write_block(&db, 0, 9, b"v9");
        must_write_block(&db, 2, 6, b"");
        let v = Volumes::new(db);
        let latest = v
            .latest_blocks(PgId(1), VolumeId(7), BlockNo(0), 3)
            .unwrap();
        assert_eq!(latest[0].as_ref().unwrap().value, b"v9");
        assert_eq!(latest[0].as_ref().unwrap().index, LogIndex(9));
        assert!(latest[1].is_none());
        assert_eq!(latest[2].as_ref().unwrap().content(), BlockContent::Zero);

        let at = |i| {
            v.block_at(PgId(1), VolumeId(7), BlockNo(0), LogIndex(i))
                .unwrap()
        };
        assert!(at(4).is_none());
        assert_eq!(at(5).unwrap().value, b"v5");
        assert_eq!(at(8).unwrap().value, b"v5");
        assert_eq!(at(9).unwrap().value, b"v9");
        assert_eq!(at(u64::MAX).unwrap().value, b"v9");
        // Another volume's or block's versions never leak in.
        assert!(
            v.block_at(PgId(1), VolumeId(8), BlockNo(0), LogIndex(9))
                .unwrap()
                .is_none()
        );
        assert!(
            v.block_at(PgId(1), VolumeId(7), BlockNo(1), LogIndex(9))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            v.block_history(PgId(1), VolumeId(7), BlockNo(0))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn volume_records_are_versioned() {
        let (_dir, db) = must_open();
        let rec = |size, state| VolumeRecord {
            name: "disk0".into(),
            size_bytes: size,
            state,
            base: None,
        };
        for (index, size, state) in [
            (3, 10, VolumeState::Active),
            (8, 20, VolumeState::Active),
            (12, 20, VolumeState::Deleted),
        ] {
            let mut b = db.new_batch();
            stage_volume(
                &mut b,
                PgId(1),
                VolumeId(7),
                LogIndex(index),
                &rec(size, state),
            );
            db.write(b, Durability::Buffered).unwrap();
        }
        let mut b = db.new_batch();
        stage_volume(
            &mut b,
            PgId(1),
            VolumeId(9),
            LogIndex(4),
            &rec(1, VolumeState::Active),
        );
        db.write(b, Durability::Buffered).unwrap();

        let v = Volumes::new(db);
        assert_eq!(
            v.volume_at(PgId(1), VolumeId(7), LogIndex(2)).unwrap(),
            None
        );
        assert_eq!(
            v.volume_at(PgId(1), VolumeId(7), LogIndex(9))
                .unwrap()
                .unwrap()
                .1
                .size_bytes,
            20
        );
        assert_eq!(
            v.volume_at(PgId(1), VolumeId(7), LogIndex(7))
                .unwrap()
                .unwrap()
                .1
                .size_bytes,
            10
        );
        assert_eq!(
            v.volume(PgId(1), VolumeId(7)).unwrap().unwrap().1.state,
            VolumeState::Deleted
        );
        let all = v.volumes(PgId(1)).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, VolumeId(7));
        assert_eq!(all[0].1, LogIndex(12));
        assert!(v.volumes(PgId(2)).unwrap().is_empty());
    }

    /// A clone reads its own blocks first (zero markers included), then its
    /// base at the base's index, then the base's base.
    #[test]
    fn clones_read_through_their_bases_at_the_cloned_index() {
        let (_dir, db) = must_open();
        let pg = PgId(1);
        let active = |size, base| VolumeRecord {
            name: "v".into(),
            size_bytes: size,
            state: VolumeState::Active,
            base,
        };
        let mut b = db.new_batch();
        let block = |b: &mut Batch, vol: u64, block: u64, index: u64, byte: u8| {
            stage_block(
                b,
                pg,
                VolumeId(vol),
                BlockNo(block),
                LogIndex(index),
                BlockContent::Frame(&[byte]),
            );
        };
        stage_volume(&mut b, pg, VolumeId(1), LogIndex(1), &active(16384, None));
        block(&mut b, 1, 0, 2, b'a');
        block(&mut b, 1, 1, 2, b'a');
        block(&mut b, 1, 2, 2, b'a');
        // Volume 2 is cloned from 1 at index 3; 1 moves on at index 4.
        let base1 = VolumeBase {
            volume: VolumeId(1),
            index: LogIndex(3),
            pg: None,
        };
        stage_volume(
            &mut b,
            pg,
            VolumeId(2),
            LogIndex(3),
            &active(16384, Some(base1)),
        );
        block(&mut b, 1, 0, 4, b'b');
        block(&mut b, 2, 1, 5, b'c');
        // Volume 3 is cloned from 2 at index 6 and trims block 2.
        let base2 = VolumeBase {
            volume: VolumeId(2),
            index: LogIndex(6),
            pg: None,
        };
        stage_volume(
            &mut b,
            pg,
            VolumeId(3),
            LogIndex(6),
            &active(16384, Some(base2)),
        );
        stage_block(
            &mut b,
            pg,
            VolumeId(3),
            BlockNo(2),
            LogIndex(7),
            BlockContent::Zero,
        );
        db.write(b, Durability::Buffered).unwrap();

        let v = Volumes::new(db);
        let read = |vol: u64, at: Option<u64>| -> Vec<Option<(u64, Vec<u8>)>> {
            let layers = v.layers(pg, VolumeId(vol), at.map(LogIndex)).unwrap();
            v.visible_blocks(pg, &layers, BlockNo(0), 4)
                .unwrap()
                .into_iter()
                .map(|s| s.map(|s| (s.index.0, s.value)))
                .collect()
        };
        let f = |i: u64, byte: u8| Some((i, vec![byte]));
        assert_eq!(
            read(1, None),
            vec![f(4, b'b'), f(2, b'a'), f(2, b'a'), None]
        );
        assert_eq!(
            read(2, None),
            vec![f(2, b'a'), f(5, b'c'), f(2, b'a'), None]
        );
        assert_eq!(
            read(2, Some(4)),
            vec![f(2, b'a'), f(2, b'a'), f(2, b'a'), None]
        );
        let three = read(3, None);
        assert_eq!(three[..2], [f(2, b'a'), f(5, b'c')]);
        assert_eq!(
            three[2].as_ref().map(|s| s.0),
            Some(7),
            "the trim hides the base"
        );
        assert_eq!(v.layers(pg, VolumeId(3), None).unwrap().len(), 3);
        assert!(
            v.layers(pg, VolumeId(3), Some(LogIndex(5)))
                .unwrap()
                .is_empty()
        );

        // A drill's clone in PG 2 of volume 2 of PG 1 at index 4: its own
        // write first, then PG 1's layers at 4, each block tagged with the
        // PG it is stored in (its frame is bound to that PG).
        let drill_pg = PgId(2);
        let drill = VolumeRecord {
            name: "drill-1-v".into(),
            size_bytes: 16384,
            state: VolumeState::Active,
            base: Some(VolumeBase {
                volume: VolumeId(2),
                index: LogIndex(4),
                pg: Some(pg),
            }),
        };
        let mut b = v.db.new_batch();
        stage_volume(&mut b, drill_pg, VolumeId(10), LogIndex(1), &drill);
        stage_block(
            &mut b,
            drill_pg,
            VolumeId(10),
            BlockNo(3),
            LogIndex(2),
            BlockContent::Frame(b"d"),
        );
        v.db.write(b, Durability::Buffered).unwrap();
        let layers = v.layers(drill_pg, VolumeId(10), None).unwrap();
        assert_eq!(layers[0], Layer::latest(VolumeId(10)));
        assert!(layers[1..].iter().all(|l| l.pg == Some(pg)), "{layers:?}");
        let seen: Vec<Option<(u64, u64, Vec<u8>)>> = v
            .visible_blocks(drill_pg, &layers, BlockNo(0), 4)
            .unwrap()
            .into_iter()
            .map(|s| s.map(|s| (s.pg.0, s.index.0, s.value)))
            .collect();
        assert_eq!(
            seen,
            vec![
                Some((1, 2, b"a".to_vec())),
                Some((1, 2, b"a".to_vec())),
                Some((1, 2, b"a".to_vec())),
                Some((2, 2, b"d".to_vec())),
            ],
            "volume 2 at 4 had not yet written block 1; volume 1 at 3 had not yet written block 0"
        );
    }

    #[test]
    fn masks_roll_volumes_back_and_undo_brings_them_forward() {
        use crate::masks::{RollbackMask, stage_mask};
        let (_dir, db) = must_open();
        let pg = PgId(1);
        let rec = |base| VolumeRecord {
            name: "v".into(),
            size_bytes: 16384,
            state: VolumeState::Active,
            base,
        };
        let block = |b: &mut Batch, vol: u64, block: u64, index: u64, byte: u8| {
            stage_block(
                b,
                pg,
                VolumeId(vol),
                BlockNo(block),
                LogIndex(index),
                BlockContent::Frame(&[byte]),
            );
        };
        let mask = |index: u64, to: u64, undoes: Option<u64>| RollbackMask {
            index: LogIndex(index),
            to: LogIndex(to),
            to_ms: 0,
            created_ms: 0,
            undoes: undoes.map(LogIndex),
            volumes: vec![VolumeId(1), VolumeId(2)],
            buckets: vec![],
        };
        let mut b = db.new_batch();
        stage_volume(&mut b, pg, VolumeId(1), LogIndex(1), &rec(None));
        block(&mut b, 1, 0, 2, b'a');
        block(&mut b, 1, 1, 3, b'a');
        // The restore point: index 3. Then block 0 is overwritten, block 2
        // written for the first time, and a clone taken at 6.
        block(&mut b, 1, 0, 4, b'x');
        block(&mut b, 1, 2, 5, b'x');
        let base = VolumeBase {
            volume: VolumeId(1),
            index: LogIndex(6),
            pg: None,
        };
        stage_volume(&mut b, pg, VolumeId(9), LogIndex(6), &rec(Some(base)));
        // Restored at 10 to 3; then block 1 is written.
        stage_mask(&mut b, pg, &mask(10, 3, None));
        block(&mut b, 1, 1, 11, b'n');
        db.write(b, Durability::Buffered).unwrap();

        let v = Volumes::new(db.clone());
        let read = |vol: u64, at: Option<u64>| -> Vec<Option<(u64, Vec<u8>)>> {
            let layers = v.layers(pg, VolumeId(vol), at.map(LogIndex)).unwrap();
            v.visible_blocks(pg, &layers, BlockNo(0), 3)
                .unwrap()
                .into_iter()
                .map(|s| s.map(|s| (s.index.0, s.value)))
                .collect()
        };
        let f = |i: u64, byte: u8| Some((i, vec![byte]));
        // Now: block 0 as at 3, block 1 written after the restore, block 2
        // (first written after 3) gone.
        assert_eq!(read(1, None), vec![f(2, b'a'), f(11, b'n'), None]);
        // The past before the restore is untouched, and so is the clone.
        assert_eq!(read(1, Some(9)), vec![f(4, b'x'), f(3, b'a'), f(5, b'x')]);
        assert_eq!(read(9, None), vec![f(4, b'x'), f(3, b'a'), f(5, b'x')]);
        assert_eq!(read(1, Some(10)), vec![f(2, b'a'), f(3, b'a'), None]);
        assert_eq!(
            v.blocks_written_since(pg, VolumeId(1), LogIndex(3))
                .unwrap(),
            3
        );

        // Undo at 12 (back to 9): as before the restore; the write at 11
        // was made after it and is hidden with it.
        let mut b = db.new_batch();
        stage_mask(&mut b, pg, &mask(12, 9, Some(10)));
        db.write(b, Durability::Buffered).unwrap();
        assert_eq!(read(1, None), vec![f(4, b'x'), f(3, b'a'), f(5, b'x')]);
        // Undoing the undo: the restored state with the write at 11.
        let mut b = db.new_batch();
        stage_mask(&mut b, pg, &mask(13, 11, Some(12)));
        db.write(b, Durability::Buffered).unwrap();
        assert_eq!(read(1, None), vec![f(2, b'a'), f(11, b'n'), None]);
        // A volume no mask covers reads plainly.
        assert_eq!(
            v.layers(pg, VolumeId(9), None).unwrap()[0],
            Layer::latest(VolumeId(9))
        );
    }

    #[test]
    fn volume_record_decode_rejects_garbage() {
        let good = VolumeRecord {
            name: "x".into(),
            size_bytes: 4096,
            state: VolumeState::Active,
            base: Some(VolumeBase {
                volume: VolumeId(3),
                index: LogIndex(77),
                pg: None,
            }),
        }
        .encode();
        assert!(VolumeRecord::decode(&good).is_ok());
        for len in 0..good.len() {
            assert!(VolumeRecord::decode(&good[..len]).is_err());
        }
        // A drill's clone: its base in another PG survives the round trip,
        // and a cut record is refused.
        let drill = VolumeRecord {
            name: "drill-1-x".into(),
            size_bytes: 8192,
            state: VolumeState::Active,
            base: Some(VolumeBase {
                volume: VolumeId(3),
                index: LogIndex(77),
                pg: Some(PgId(5)),
            }),
        };
        let bytes = drill.encode();
        assert_eq!(bytes[0], 3);
        assert_eq!(VolumeRecord::decode(&bytes).unwrap(), drill);
        for len in 0..bytes.len() {
            assert!(VolumeRecord::decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut bad = good.clone();
        bad[0] = 9;
        assert!(VolumeRecord::decode(&bad).is_err());
        let mut bad = good;
        bad[1] = 7;
        assert!(VolumeRecord::decode(&bad).is_err());
    }
}
