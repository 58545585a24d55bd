//! Data written ahead of the entry that names it: streamed chunks and
//! multipart uploads, as unversioned pair rows in `pg_meta`.
//!
//! An object larger than one Raft entry is written as a *stream*: each
//! entry carries a few chunks, and every chunk it writes holds one
//! reference for the stream (row `StreamChunk | stream | chunk`). The entry
//! that finally names the chunks (a new object version or an uploaded part)
//! adds its own references and then releases the stream's, so no chunk is
//! ever without a holder. A stream whose writer died is released by a later
//! entry (`ReleaseStream`), and the rows say which chunks it held.
//!
//! A multipart upload is a row `Upload | bucket | upload` (the object key
//! and the sealed record the object will get) and one row per part
//! `UploadPart | upload | part` (the part's chunks, each holding one
//! reference, and its sealed part record: size, ETag). Completing names
//! the parts' chunks in the new object version and drops the parts.
//!
//! Nothing here is versioned: an upload in progress is not part of any
//! restore point.

use crate::db::{Batch, Cf, Db};
use crate::error::{Error, Result};
use crate::keys::{self, MetaKind};
use crate::{BucketId, ChunkId, PgId};

/// A multipart upload in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRecord {
    /// The object key the upload will create.
    pub key: Vec<u8>,
    /// When it was created, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Sealed by the node that created it (content type, user metadata…),
    /// opaque here.
    pub record: Vec<u8>,
}

/// One uploaded part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartRecord {
    pub chunks: Vec<ChunkId>,
    /// Sealed by the node that wrote it (size, ETag, chunk sizes).
    pub record: Vec<u8>,
}

/// Upload layout, version 1:
/// ```text
/// version u8 | created_ms u64 BE | key_len u16 BE | key | sealed record
/// ```
const UPLOAD_RECORD_VERSION: u8 = 1;

/// Part layout, version 1:
/// ```text
/// version u8 | chunk_count u32 BE | chunk ids u64 BE … | sealed record
/// ```
const PART_RECORD_VERSION: u8 = 1;

impl UploadRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 + self.key.len() + self.record.len());
        out.push(UPLOAD_RECORD_VERSION);
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        let key_len = u16::try_from(self.key.len()).expect("object keys are at most 1 KiB");
        out.extend_from_slice(&key_len.to_be_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.record);
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<UploadRecord, String> {
        let [UPLOAD_RECORD_VERSION, rest @ ..] = bytes else {
            return Err(format!("unknown upload layout {:?}", bytes.first()));
        };
        let created: [u8; 8] = rest
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or("upload record without a creation time")?;
        let key_len: [u8; 2] = rest
            .get(8..10)
            .and_then(|b| b.try_into().ok())
            .ok_or("upload record without a key length")?;
        let key_end = 10 + u16::from_be_bytes(key_len) as usize;
        let key = rest
            .get(10..key_end)
            .ok_or("upload record's key runs past its value")?;
        Ok(UploadRecord {
            key: key.to_vec(),
            created_ms: u64::from_be_bytes(created),
            record: rest[key_end..].to_vec(),
        })
    }
}

impl PartRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.chunks.len() * 8 + self.record.len());
        out.push(PART_RECORD_VERSION);
        out.extend_from_slice(&(self.chunks.len() as u32).to_be_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.0.to_be_bytes());
        }
        out.extend_from_slice(&self.record);
        out
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<PartRecord, String> {
        let [PART_RECORD_VERSION, rest @ ..] = bytes else {
            return Err(format!("unknown part layout {:?}", bytes.first()));
        };
        let count: [u8; 4] = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or("part record without a chunk count")?;
        let ids_end = 4 + u32::from_be_bytes(count) as usize * 8;
        let ids = rest
            .get(4..ids_end)
            .ok_or("part record's chunk list runs past its value")?;
        Ok(PartRecord {
            chunks: ids
                .chunks_exact(8)
                .map(|c| ChunkId(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
                .collect(),
            record: rest[ids_end..].to_vec(),
        })
    }
}

pub fn stage_upload(batch: &mut Batch, pg: PgId, bucket: BucketId, upload: u64, r: &UploadRecord) {
    let key = keys::pg_meta_pair_key(pg, MetaKind::Upload, bucket.0, upload);
    batch.put(Cf::PgMeta, &key, &r.encode());
}

pub fn stage_upload_removal(batch: &mut Batch, pg: PgId, bucket: BucketId, upload: u64) {
    let key = keys::pg_meta_pair_key(pg, MetaKind::Upload, bucket.0, upload);
    batch.delete(Cf::PgMeta, &key);
}

pub fn stage_part(batch: &mut Batch, pg: PgId, upload: u64, part: u32, r: &PartRecord) {
    let key = keys::pg_meta_pair_key(pg, MetaKind::UploadPart, upload, u64::from(part));
    batch.put(Cf::PgMeta, &key, &r.encode());
}

pub fn stage_part_removal(batch: &mut Batch, pg: PgId, upload: u64, part: u32) {
    let key = keys::pg_meta_pair_key(pg, MetaKind::UploadPart, upload, u64::from(part));
    batch.delete(Cf::PgMeta, &key);
}

/// Records that `stream` holds one reference to `chunk`, written by the
/// entry stamped `stamp_ms` (what the sweep of abandoned streams ages).
pub fn stage_stream_chunk(batch: &mut Batch, pg: PgId, stream: u64, chunk: ChunkId, stamp_ms: u64) {
    let key = keys::pg_meta_pair_key(pg, MetaKind::StreamChunk, stream, chunk.0);
    batch.put(Cf::PgMeta, &key, &stamp_ms.to_be_bytes());
}

pub fn stage_stream_chunk_removal(batch: &mut Batch, pg: PgId, stream: u64, chunk: ChunkId) {
    let key = keys::pg_meta_pair_key(pg, MetaKind::StreamChunk, stream, chunk.0);
    batch.delete(Cf::PgMeta, &key);
}

/// Reads of streams and uploads.
#[derive(Clone, Debug)]
pub struct Uploads {
    db: Db,
}

impl Uploads {
    pub fn new(db: Db) -> Uploads {
        Uploads { db }
    }

    pub fn upload(&self, pg: PgId, bucket: BucketId, upload: u64) -> Result<Option<UploadRecord>> {
        let key = keys::pg_meta_pair_key(pg, MetaKind::Upload, bucket.0, upload);
        self.db
            .get(Cf::PgMeta, &key)?
            .map(|v| UploadRecord::decode(&v).map_err(|e| corrupt(&key, e)))
            .transpose()
    }

    /// The bucket's uploads in progress, by upload id, from after
    /// `after` (exclusive), at most `limit`.
    pub fn uploads(
        &self,
        pg: PgId,
        bucket: BucketId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, UploadRecord)>> {
        let prefix = keys::pg_meta_prefix(pg, MetaKind::Upload, bucket.0);
        let start = match after {
            Some(u) => match u.checked_add(1) {
                Some(next) => keys::pg_meta_pair_key(pg, MetaKind::Upload, bucket.0, next).to_vec(),
                None => return Ok(Vec::new()),
            },
            None => prefix.to_vec(),
        };
        self.db
            .scan(Cf::PgMeta, &prefix, &start, limit)?
            .into_iter()
            .map(|(k, v)| {
                let (_, upload) =
                    keys::decode_pg_meta_pair_key(&k).ok_or_else(|| corrupt(&k, "bad key"))?;
                Ok((
                    upload,
                    UploadRecord::decode(&v).map_err(|e| corrupt(&k, e))?,
                ))
            })
            .collect()
    }

    pub fn part(&self, pg: PgId, upload: u64, part: u32) -> Result<Option<PartRecord>> {
        let key = keys::pg_meta_pair_key(pg, MetaKind::UploadPart, upload, u64::from(part));
        self.db
            .get(Cf::PgMeta, &key)?
            .map(|v| PartRecord::decode(&v).map_err(|e| corrupt(&key, e)))
            .transpose()
    }

    /// The upload's parts in part-number order, from after `after`
    /// (exclusive), at most `limit`.
    pub fn parts(
        &self,
        pg: PgId,
        upload: u64,
        after: u32,
        limit: usize,
    ) -> Result<Vec<(u32, PartRecord)>> {
        let prefix = keys::pg_meta_prefix(pg, MetaKind::UploadPart, upload);
        let start = keys::pg_meta_pair_key(pg, MetaKind::UploadPart, upload, u64::from(after) + 1);
        self.db
            .scan(Cf::PgMeta, &prefix, &start, limit)?
            .into_iter()
            .map(|(k, v)| {
                let (_, part) =
                    keys::decode_pg_meta_pair_key(&k).ok_or_else(|| corrupt(&k, "bad key"))?;
                let part = u32::try_from(part).map_err(|_| corrupt(&k, "part number over u32"))?;
                Ok((part, PartRecord::decode(&v).map_err(|e| corrupt(&k, e))?))
            })
            .collect()
    }

    /// Every stream of the PG holding chunks, with the stamp of its newest
    /// chunk (milliseconds since the Unix epoch), by stream id.
    pub fn streams(&self, pg: PgId) -> Result<Vec<(u64, u64)>> {
        let prefix = keys::pg_meta_kind_prefix(pg, MetaKind::StreamChunk);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (k, v) in self.db.scan(Cf::PgMeta, &prefix, &prefix, usize::MAX)? {
            let (stream, _) =
                keys::decode_pg_meta_pair_key(&k).ok_or_else(|| corrupt(&k, "bad key"))?;
            let stamp: [u8; 8] = v
                .as_slice()
                .try_into()
                .map_err(|_| corrupt(&k, "stream chunk stamp is not 8 bytes"))?;
            let stamp = u64::from_be_bytes(stamp);
            match out.last_mut() {
                Some((last, newest)) if *last == stream => *newest = (*newest).max(stamp),
                _ => out.push((stream, stamp)),
            }
        }
        Ok(out)
    }

    /// The chunks `stream` holds.
    pub fn stream_chunks(&self, pg: PgId, stream: u64) -> Result<Vec<ChunkId>> {
        let prefix = keys::pg_meta_prefix(pg, MetaKind::StreamChunk, stream);
        self.db
            .scan(Cf::PgMeta, &prefix, &prefix, usize::MAX)?
            .into_iter()
            .map(|(k, _)| {
                keys::decode_pg_meta_pair_key(&k)
                    .map(|(_, chunk)| ChunkId(chunk))
                    .ok_or_else(|| corrupt(&k, "bad key"))
            })
            .collect()
    }
}

fn corrupt(key: &[u8], reason: impl Into<String>) -> Error {
    Error::corrupt_record(Cf::PgMeta.name(), key, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DbOptions, Durability};

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let u = UploadRecord {
            key: b"a/\x00b".to_vec(),
            created_ms: 1_700_000_000_000,
            record: vec![9, 8, 7],
        };
        assert_eq!(UploadRecord::decode(&u.encode()).unwrap(), u);
        let p = PartRecord {
            chunks: vec![ChunkId(3), ChunkId(u64::MAX)],
            record: vec![1],
        };
        assert_eq!(PartRecord::decode(&p.encode()).unwrap(), p);
        for bad in [&[][..], &[2][..], &[1, 0, 0][..]] {
            assert!(UploadRecord::decode(bad).is_err(), "{bad:?}");
            assert!(PartRecord::decode(bad).is_err(), "{bad:?}");
        }
        // A chunk count past the end of the value.
        assert!(PartRecord::decode(&[1, 0, 0, 0, 9, 1, 2]).is_err());
        assert!(UploadRecord::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, b'a']).is_err());
    }

    #[test]
    fn uploads_parts_and_streams_are_listed_in_order_and_by_owner() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let (pg, bucket) = (PgId(4), BucketId(7));
        let mut batch = db.new_batch();
        let record = |k: &str| UploadRecord {
            key: k.as_bytes().to_vec(),
            created_ms: 5,
            record: vec![],
        };
        stage_upload(&mut batch, pg, bucket, 30, &record("x"));
        stage_upload(&mut batch, pg, bucket, 10, &record("y"));
        // Another bucket and another PG stay out of the listing.
        stage_upload(&mut batch, pg, BucketId(8), 20, &record("z"));
        stage_upload(&mut batch, PgId(5), bucket, 20, &record("z"));
        for part in [3u32, 1, 2] {
            let p = PartRecord {
                chunks: vec![ChunkId(u64::from(part) * 100)],
                record: vec![],
            };
            stage_part(&mut batch, pg, 10, part, &p);
        }
        stage_part(
            &mut batch,
            pg,
            11,
            1,
            &PartRecord {
                chunks: vec![],
                record: vec![],
            },
        );
        stage_stream_chunk(&mut batch, pg, 77, ChunkId(2), 500);
        stage_stream_chunk(&mut batch, pg, 77, ChunkId(1), 900);
        stage_stream_chunk(&mut batch, pg, 78, ChunkId(3), 100);
        stage_stream_chunk(&mut batch, PgId(5), 79, ChunkId(3), 100);
        db.write(batch, Durability::Buffered).unwrap();

        let u = Uploads::new(db.clone());
        let ids: Vec<u64> = u
            .uploads(pg, bucket, None, 10)
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(ids, [10, 30]);
        let after: Vec<u64> = u
            .uploads(pg, bucket, Some(10), 10)
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(after, [30]);
        assert!(
            u.uploads(pg, bucket, Some(u64::MAX), 10)
                .unwrap()
                .is_empty()
        );
        assert_eq!(u.upload(pg, bucket, 30).unwrap().unwrap().key, b"x");
        assert!(u.upload(pg, bucket, 20).unwrap().is_none());

        let parts: Vec<u32> = u
            .parts(pg, 10, 0, 10)
            .unwrap()
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(parts, [1, 2, 3]);
        let page: Vec<u32> = u.parts(pg, 10, 1, 1).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(page, [2]);
        assert_eq!(u.part(pg, 10, 3).unwrap().unwrap().chunks, [ChunkId(300)]);
        assert_eq!(u.stream_chunks(pg, 77).unwrap(), [ChunkId(1), ChunkId(2)]);
        assert_eq!(u.streams(pg).unwrap(), [(77, 900), (78, 100)]);

        let mut batch = db.new_batch();
        stage_stream_chunk_removal(&mut batch, pg, 77, ChunkId(1));
        stage_part_removal(&mut batch, pg, 10, 2);
        stage_upload_removal(&mut batch, pg, bucket, 30);
        db.write(batch, Durability::Buffered).unwrap();
        assert_eq!(u.stream_chunks(pg, 77).unwrap(), [ChunkId(2)]);
        assert!(u.part(pg, 10, 2).unwrap().is_none());
        assert!(u.upload(pg, bucket, 30).unwrap().is_none());
    }
}
