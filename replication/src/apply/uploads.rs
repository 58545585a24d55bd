//! Applying the commands that write object data ahead of the entry naming
//! it: streamed chunks and multipart uploads (layout in
//! `lifeboat_store::uploads`).
//!
//! Reference counting: every chunk has exactly one reference per holder —
//! each object version naming it (once per mention), each part naming it,
//! and the stream that wrote it until that stream is released. At zero the
//! chunk goes. Every handler checks everything before it stages anything,
//! so a refused command changes nothing.

use std::collections::{BTreeMap, HashSet};
use std::io;

use lifeboat_proto::raft as pb;
use lifeboat_store::objects::{self, ChunkState, ObjectVersion};
use lifeboat_store::uploads::{self, PartRecord, UploadRecord, Uploads};
use lifeboat_store::{BucketId, ChunkId, LogIndex};

use super::{ApplyContext, Outcome};
use crate::types::{Applied, Rejection};

impl ApplyContext<'_> {
    fn uploads(&self) -> Uploads {
        Uploads::new(self.db.clone())
    }

    fn upload(&self, bucket: BucketId, upload: u64) -> io::Result<Option<UploadRecord>> {
        if let Some(staged) = self.upload_overlay.get(&(bucket, upload)) {
            return Ok(staged.clone());
        }
        self.uploads()
            .upload(self.pg, bucket, upload)
            .map_err(io::Error::other)
    }

    /// Every part of `upload`, this batch's changes included.
    fn parts_of(&self, upload: u64) -> io::Result<BTreeMap<u32, PartRecord>> {
        let mut parts: BTreeMap<u32, PartRecord> = self
            .uploads()
            .parts(self.pg, upload, 0, usize::MAX)
            .map_err(io::Error::other)?
            .into_iter()
            .collect();
        for ((u, part), staged) in &self.part_overlay {
            if *u != upload {
                continue;
            }
            match staged {
                Some(r) => parts.insert(*part, r.clone()),
                None => parts.remove(part),
            };
        }
        Ok(parts)
    }

    fn part(&self, upload: u64, part: u32) -> io::Result<Option<PartRecord>> {
        if let Some(staged) = self.part_overlay.get(&(upload, part)) {
            return Ok(staged.clone());
        }
        self.uploads()
            .part(self.pg, upload, part)
            .map_err(io::Error::other)
    }

    fn stream_chunks(&self, stream: u64) -> io::Result<Vec<ChunkId>> {
        if let Some(staged) = self.stream_overlay.get(&stream) {
            return Ok(staged.clone());
        }
        self.uploads()
            .stream_chunks(self.pg, stream)
            .map_err(io::Error::other)
    }

    fn add_chunk_ref(&mut self, chunk: ChunkId) -> io::Result<()> {
        let mut state = self.chunk_state(chunk)?;
        state.refs += 1;
        objects::stage_chunk_refs(&mut self.batch, self.pg, chunk, state);
        self.chunk_overlay.insert(chunk, state);
        Ok(())
    }

    fn drop_chunk_ref(&mut self, chunk: ChunkId) -> io::Result<()> {
        let mut state = self.chunk_state(chunk)?;
        state.refs = state.refs.checked_sub(1).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {} lost a reference it did not have", chunk.0),
            )
        })?;
        objects::stage_chunk_refs(&mut self.batch, self.pg, chunk, state);
        self.chunk_overlay.insert(chunk, state);
        if state.refs == 0 {
            self.count_usage(|u| u.remove(0, state.frame_bytes))?;
        }
        Ok(())
    }

    /// Checks chunks an entry writes: each id new to the PG and written
    /// once, and (when the entry also names its chunks) named.
    fn check_new_chunks(
        &self,
        new: &[pb::ChunkWrite],
        named: Option<&[u64]>,
    ) -> io::Result<Result<(), Rejection>> {
        let mut seen = HashSet::new();
        for c in new {
            if named.is_some_and(|named| !named.contains(&c.chunk)) {
                return Ok(Err(Rejection::Malformed {
                    reason: format!("new chunk {} is not in the chunk list", c.chunk),
                }));
            }
            // A chunk's data row exists exactly while its count is above
            // zero: the count says whether the id is in use, without
            // reading the frame.
            if !seen.insert(c.chunk) || self.chunk_refs(ChunkId(c.chunk))? != 0 {
                return Ok(Err(Rejection::ChunkExists { chunk: c.chunk }));
            }
        }
        Ok(Ok(()))
    }

    /// Checks the chunks of an entry that names `named` and writes `new`:
    /// new ones as [`Self::check_new_chunks`], and every chunk named
    /// exists or is written by `new`.
    pub(super) fn check_chunks(
        &self,
        named: &[u64],
        new: &[pb::ChunkWrite],
    ) -> io::Result<Result<(), Rejection>> {
        if let Err(rejection) = self.check_new_chunks(new, Some(named))? {
            return Ok(Err(rejection));
        }
        for &c in named {
            if !new.iter().any(|n| n.chunk == c) && self.chunk_refs(ChunkId(c))? == 0 {
                return Ok(Err(Rejection::ChunkNotFound { chunk: c }));
            }
        }
        Ok(Ok(()))
    }

    /// Stages checked new chunks' frames (their counts start at zero: the
    /// caller adds the references that hold them).
    fn stage_new_chunks(&mut self, new: &[pb::ChunkWrite]) -> io::Result<()> {
        for c in new {
            objects::stage_chunk(&mut self.batch, self.pg, ChunkId(c.chunk), &c.frame);
            // Known to this batch with no references yet: the refs row is
            // written by the first reference taken.
            self.chunk_overlay.insert(
                ChunkId(c.chunk),
                ChunkState {
                    refs: 0,
                    frame_bytes: c.frame.len() as u64,
                },
            );
        }
        let bytes: u64 = new.iter().map(|c| c.frame.len() as u64).sum();
        self.count_usage(|u| u.add_chunk(bytes))
    }

    /// Stages the chunks [`Self::check_chunks`] passed: `new` written and
    /// one reference per mention in `named` (a chunk named twice is counted
    /// twice, and dropped twice when its holder goes).
    pub(super) fn take_chunks(&mut self, named: &[u64], new: &[pb::ChunkWrite]) -> io::Result<()> {
        self.stage_new_chunks(new)?;
        for &c in named {
            self.add_chunk_ref(ChunkId(c))?;
        }
        Ok(())
    }

    /// Drops every reference `stream` holds.
    pub(super) fn release_stream(&mut self, stream: u64) -> io::Result<()> {
        if stream == 0 {
            return Ok(());
        }
        for chunk in self.stream_chunks(stream)? {
            uploads::stage_stream_chunk_removal(&mut self.batch, self.pg, stream, chunk);
            self.drop_chunk_ref(chunk)?;
        }
        self.stream_overlay.insert(stream, Vec::new());
        Ok(())
    }

    pub(super) fn apply_write_chunks(
        &mut self,
        w: &pb::WriteChunks,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        if w.stream == 0 {
            return Ok(Err(Rejection::Malformed {
                reason: "write_chunks without a stream".into(),
            }));
        }
        if let Err(rejection) = self.check_new_chunks(&w.chunks, None)? {
            return Ok(Err(rejection));
        }
        self.stage_new_chunks(&w.chunks)?;
        let mut held = self.stream_chunks(w.stream)?;
        for c in &w.chunks {
            let chunk = ChunkId(c.chunk);
            self.add_chunk_ref(chunk)?;
            uploads::stage_stream_chunk(&mut self.batch, self.pg, w.stream, chunk, stamp_ms);
            held.push(chunk);
        }
        self.stream_overlay.insert(w.stream, held);
        Ok(Ok(Applied::Done))
    }

    pub(super) fn apply_release_stream(&mut self, r: &pb::ReleaseStream) -> io::Result<Outcome> {
        self.release_stream(r.stream)?;
        Ok(Ok(Applied::Done))
    }

    pub(super) fn apply_create_upload(
        &mut self,
        c: &pb::CreateUpload,
        stamp_ms: u64,
    ) -> io::Result<Outcome> {
        let bucket = BucketId(c.bucket);
        if let Err(rejection) = self.writable_bucket(c.bucket)? {
            return Ok(Err(rejection));
        }
        if let Err(rejection) = check_key(&c.key) {
            return Ok(Err(rejection));
        }
        if self.upload(bucket, c.upload)?.is_some() {
            return Ok(Err(Rejection::UploadExists { upload: c.upload }));
        }
        let record = UploadRecord {
            key: c.key.to_vec(),
            created_ms: stamp_ms,
            record: c.record.to_vec(),
        };
        uploads::stage_upload(&mut self.batch, self.pg, bucket, c.upload, &record);
        self.upload_overlay.insert((bucket, c.upload), Some(record));
        Ok(Ok(Applied::Done))
    }

    pub(super) fn apply_put_part(&mut self, p: &pb::PutPart) -> io::Result<Outcome> {
        let bucket = BucketId(p.bucket);
        if let Err(rejection) = self.writable_bucket(p.bucket)? {
            return Ok(Err(rejection));
        }
        if self.upload(bucket, p.upload)?.is_none() {
            return Ok(Err(Rejection::UploadNotFound { upload: p.upload }));
        }
        if let Err(rejection) = self.check_chunks(&p.chunks, &p.new_chunks)? {
            return Ok(Err(rejection));
        }
        self.take_chunks(&p.chunks, &p.new_chunks)?;
        if let Some(old) = self.part(p.upload, p.part)? {
            for c in old.chunks {
                self.drop_chunk_ref(c)?;
            }
        }
        let record = PartRecord {
            chunks: p.chunks.iter().map(|c| ChunkId(*c)).collect(),
            record: p.record.to_vec(),
        };
        uploads::stage_part(&mut self.batch, self.pg, p.upload, p.part, &record);
        self.part_overlay.insert((p.upload, p.part), Some(record));
        self.release_stream(p.stream)?;
        Ok(Ok(Applied::Done))
    }

    pub(super) fn apply_complete_upload(
        &mut self,
        index: LogIndex,
        c: &pb::CompleteUpload,
    ) -> io::Result<Outcome> {
        let bucket = BucketId(c.bucket);
        if let Err(rejection) = self.writable_bucket(c.bucket)? {
            return Ok(Err(rejection));
        }
        let Some(upload) = self.upload(bucket, c.upload)? else {
            return Ok(Err(Rejection::UploadNotFound { upload: c.upload }));
        };
        if c.parts.is_empty() || c.parts.windows(2).any(|w| w[0].part >= w[1].part) {
            return Ok(Err(Rejection::Malformed {
                reason: "parts must be named in ascending order, at least one".into(),
            }));
        }
        if c.if_absent && self.object_latest(bucket, &upload.key)?.is_some() {
            return Ok(Err(Rejection::ObjectExists));
        }
        let parts = self.parts_of(c.upload)?;
        let mut chunks = Vec::new();
        for named in &c.parts {
            let stored = parts.get(&named.part);
            let same = stored.is_some_and(|s| {
                s.chunks.len() == named.chunks.len()
                    && s.chunks.iter().zip(&named.chunks).all(|(a, b)| a.0 == *b)
            });
            if !same {
                return Ok(Err(Rejection::InvalidPart { part: named.part }));
            }
            chunks.extend(named.chunks.iter().map(|c| ChunkId(*c)));
        }
        for &chunk in &chunks {
            self.add_chunk_ref(chunk)?;
        }
        let version = ObjectVersion::Object {
            chunks,
            record: c.record.to_vec(),
        };
        self.stage_version(bucket, &upload.key, index, version)?;
        self.drop_upload(bucket, c.upload, parts)?;
        Ok(Ok(Applied::Done))
    }

    pub(super) fn apply_abort_upload(&mut self, a: &pb::AbortUpload) -> io::Result<Outcome> {
        let bucket = BucketId(a.bucket);
        if self.upload(bucket, a.upload)?.is_none() {
            return Ok(Err(Rejection::UploadNotFound { upload: a.upload }));
        }
        let parts = self.parts_of(a.upload)?;
        self.drop_upload(bucket, a.upload, parts)?;
        Ok(Ok(Applied::Done))
    }

    /// Aborts every upload in progress in `bucket` (the bucket is going).
    pub(super) fn abort_uploads_of(&mut self, bucket: BucketId) -> io::Result<()> {
        let mut ids: Vec<u64> = self
            .uploads()
            .uploads(self.pg, bucket, None, usize::MAX)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for ((b, id), staged) in &self.upload_overlay {
            if *b == bucket {
                ids.retain(|x| x != id);
                if staged.is_some() {
                    ids.push(*id);
                }
            }
        }
        for upload in ids {
            let parts = self.parts_of(upload)?;
            self.drop_upload(bucket, upload, parts)?;
        }
        Ok(())
    }

    fn drop_upload(
        &mut self,
        bucket: BucketId,
        upload: u64,
        parts: BTreeMap<u32, PartRecord>,
    ) -> io::Result<()> {
        for (part, record) in parts {
            for chunk in record.chunks {
                self.drop_chunk_ref(chunk)?;
            }
            uploads::stage_part_removal(&mut self.batch, self.pg, upload, part);
            self.part_overlay.insert((upload, part), None);
        }
        uploads::stage_upload_removal(&mut self.batch, self.pg, bucket, upload);
        self.upload_overlay.insert((bucket, upload), None);
        Ok(())
    }
}

pub(super) fn check_key(key: &[u8]) -> Result<(), Rejection> {
    if key.len() > objects::OBJECT_KEY_BYTES_MAX {
        return Err(Rejection::KeyTooLong {
            bytes: key.len(),
            max: objects::OBJECT_KEY_BYTES_MAX,
        });
    }
    Ok(())
}
