//! Multipart uploads: create, upload (and copy) parts, complete, abort,
//! list uploads and parts. Parts are written like objects (chunks sealed
//! and replicated as they arrive); completing names their chunks in one
//! new object version, so nothing is copied.

use lifeboat_proto::objects as rec;
use lifeboat_proto::raft as pb;
use lifeboat_store::uploads::Uploads;
use s3s::dto::*;
use s3s::{S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};

use super::errors::from_node;
use super::gateway::{
    Gateway, check_copy_preconditions, new_record, sent_checksums, url_encode, verify_body,
    wanted_checksums,
};
use super::objects::{BucketRef, WrittenBody, now_ms, timestamp};
use s3s::crypto::{Checksum as _, Md5};

/// S3's limits.
const PART_NUMBER_MAX: i32 = 10_000;
const PART_BYTES_MIN: u64 = 5 << 20;
const UPLOADS_LISTED_MAX: i32 = 1000;
const PARTS_LISTED_MAX: i32 = 1000;

fn parse_upload_id(id: &str) -> S3Result<u64> {
    u64::from_str_radix(id, 16)
        .ok()
        .filter(|_| id.len() == 16)
        .ok_or_else(|| no_such_upload(id))
}

fn upload_id(id: u64) -> String {
    format!("{id:016x}")
}

fn no_such_upload(id: &str) -> S3Error {
    S3Error::with_message(
        S3ErrorCode::NoSuchUpload,
        format!("no upload {id:?} in progress"),
    )
}

fn check_part_number(n: i32) -> S3Result<u32> {
    if !(1..=PART_NUMBER_MAX).contains(&n) {
        return Err(s3_error!(
            InvalidArgument,
            "part numbers are 1 to {PART_NUMBER_MAX}"
        ));
    }
    Ok(n as u32)
}

impl Gateway {
    fn uploads(&self) -> Uploads {
        Uploads::new(self.core().db.clone())
    }

    /// The upload's record, checked to be for `key`.
    fn upload_record(
        &self,
        bucket: &BucketRef,
        id: &str,
        key: &str,
    ) -> S3Result<(u64, rec::ObjectRecord)> {
        let upload = parse_upload_id(id)?;
        let stored = self
            .uploads()
            .upload(bucket.pg, bucket.id, upload)
            .map_err(|e| from_node(e.into()))?
            .filter(|u| u.key == key.as_bytes())
            .ok_or_else(|| no_such_upload(id))?;
        let record = self.store.open(
            bucket,
            &stored.record,
            key.as_bytes(),
            |r: &rec::ObjectRecord| &r.key,
        )?;
        Ok((upload, record))
    }

    pub(super) async fn create_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        // An append-only credential may start one anywhere: completing it
        // is what may not replace an object.
        caller.may_put(&input.key)?;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        let record = new_record(
            &input.key,
            input.content_type,
            input.metadata,
            input.content_encoding,
            input.cache_control,
            input.content_disposition,
            input.content_language,
            input.expires.as_ref(),
        );
        let upload = rand::random::<u64>();
        let kind = pb::command::Kind::CreateUpload(pb::CreateUpload {
            bucket: bucket.id.0,
            upload,
            key: input.key.as_bytes().to_vec().into(),
            record: self.store.seal(&bucket, &record)?,
        });
        self.store.propose(&bucket, kind).await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id(upload)),
            ..Default::default()
        }))
    }

    /// Names a written body as part `part` of `upload`.
    async fn name_part(
        &self,
        bucket: &BucketRef,
        upload: u64,
        part: u32,
        key: &str,
        body: WrittenBody,
    ) -> S3Result<rec::PartRecord> {
        let record = rec::PartRecord {
            key: key.as_bytes().to_vec(),
            part,
            size: body.size,
            etag: hex::encode(body.md5),
            chunk_sizes: body.chunk_sizes.clone(),
            modified_ms: now_ms(),
            checksums: Some(body.checksums.clone()),
        };
        let stream = body.stream;
        let kind = pb::command::Kind::PutPart(pb::PutPart {
            bucket: bucket.id.0,
            upload,
            part,
            chunks: body.chunk_ids,
            new_chunks: body.inline,
            record: self.store.seal(bucket, &record)?,
            stream,
        });
        if let Err(e) = self.store.propose(bucket, kind).await {
            self.store.release(bucket, stream).await;
            return Err(e);
        }
        Ok(record)
    }

    pub(super) async fn put_part(
        &self,
        mut req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let caller = self.caller(&req)?;
        let input = &mut req.input;
        caller.may_put(&input.key)?;
        let part = check_part_number(input.part_number)?;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        self.store.read_point(&bucket).await?;
        let (upload, _) = self.upload_record(&bucket, &input.upload_id, &input.key)?;
        let sent = sent_checksums!(input);
        let wanted = wanted_checksums(&req.headers, &sent);
        let body = self
            .store
            .write_body(&bucket, input.body.take(), &wanted)
            .await?;
        let trailers = req.trailing_headers.as_ref().and_then(|t| t.take());
        if let Err(e) = verify_body(
            &body,
            input.content_md5.as_deref(),
            &sent,
            trailers.as_ref(),
        ) {
            self.store.release(&bucket, body.stream).await;
            return Err(e);
        }
        let record = self
            .name_part(&bucket, upload, part, &input.key, body)
            .await?;
        let c = record.checksums.unwrap_or_default();
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(record.etag)),
            checksum_crc32: some(c.crc32),
            checksum_crc32c: some(c.crc32c),
            checksum_sha1: some(c.sha1),
            checksum_sha256: some(c.sha256),
            checksum_crc64nvme: some(c.crc64nvme),
            ..Default::default()
        }))
    }

    pub(super) async fn put_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        caller.may_put(&input.key)?;
        let part = check_part_number(input.part_number)?;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        let (src_bucket, src) = self.copy_source(&caller, &input.copy_source).await?;
        self.store.read_point(&bucket).await?;
        let (upload, _) = self.upload_record(&bucket, &input.upload_id, &input.key)?;
        check_copy_preconditions!(&src.record, input)?;
        let range = match input.copy_source_range.as_deref() {
            None => 0..src.record.size,
            Some(r) => parse_copy_range(r, src.record.size)?,
        };
        let body = self.copy_body(&src_bucket, &src, &bucket, range).await?;
        let record = self
            .name_part(&bucket, upload, part, &input.key, body)
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(ETag::Strong(record.etag)),
                last_modified: Some(timestamp(record.modified_ms)),
                ..Default::default()
            }),
            copy_source_version_id: Some(super::gateway::version_id(src.index)),
            ..Default::default()
        }))
    }

    pub(super) async fn complete_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let create_only = caller.may_put(&input.key)?;
        let conditional = match &input.if_none_match {
            None => false,
            Some(ETagCondition::Any) => true,
            Some(_) => {
                return Err(s3_error!(
                    NotImplemented,
                    "If-None-Match on complete takes only *"
                ));
            }
        };
        let bucket = self.bucket(&caller, &input.bucket).await?;
        self.store.read_point(&bucket).await?;
        let (upload, mut record) = self.upload_record(&bucket, &input.upload_id, &input.key)?;
        let named = input
            .multipart_upload
            .and_then(|m| m.parts)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| s3_error!(MalformedXML, "name at least one part"))?;
        let mut last = 0;
        let mut md5s = Md5::new();
        let mut completed = Vec::with_capacity(named.len());
        record.size = 0;
        record.chunk_sizes.clear();
        for (i, p) in named.iter().enumerate() {
            let number = check_part_number(p.part_number.unwrap_or(0))?;
            if number <= last {
                return Err(s3_error!(
                    InvalidPartOrder,
                    "parts must be listed in ascending order"
                ));
            }
            last = number;
            let invalid = || {
                S3Error::with_message(
                    S3ErrorCode::InvalidPart,
                    format!("part {number} was not uploaded, or its ETag differs"),
                )
            };
            let stored = self
                .uploads()
                .part(bucket.pg, upload, number)
                .map_err(|e| from_node(e.into()))?
                .ok_or_else(invalid)?;
            let part: rec::PartRecord = self.store.open(
                &bucket,
                &stored.record,
                input.key.as_bytes(),
                |r: &rec::PartRecord| &r.key,
            )?;
            if p.e_tag.as_ref().is_some_and(|t| t.value() != part.etag) || part.part != number {
                return Err(invalid());
            }
            if i + 1 < named.len() && part.size < PART_BYTES_MIN {
                return Err(s3_error!(
                    EntityTooSmall,
                    "part {number} has {} bytes; every part but the last needs at least {PART_BYTES_MIN}",
                    part.size
                ));
            }
            let md5 = hex::decode(&part.etag)
                .map_err(|e| super::errors::internal("a stored part's ETag is not hex", e))?;
            md5s.update(&md5);
            record.size += part.size;
            record.chunk_sizes.extend_from_slice(&part.chunk_sizes);
            completed.push(pb::CompletedPart {
                part: number,
                chunks: stored.chunks.iter().map(|c| c.0).collect(),
            });
        }
        record.etag = format!("{}-{}", hex::encode(md5s.finalize()), named.len());
        record.parts = named.len() as u32;
        record.modified_ms = now_ms();
        let if_absent = create_only || conditional;
        let kind = pb::command::Kind::CompleteUpload(pb::CompleteUpload {
            bucket: bucket.id.0,
            upload,
            parts: completed,
            record: self.store.seal(&bucket, &record)?,
            if_absent,
        });
        let index = async {
            self.absent_over_drill_base(&bucket, &input.key, if_absent)?;
            self.store.propose(&bucket, kind).await
        }
        .await
        .map_err(|e| match (e.code(), conditional) {
            (S3ErrorCode::AccessDenied, true) => s3_error!(PreconditionFailed),
            _ => e,
        })?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            e_tag: Some(ETag::Strong(record.etag)),
            version_id: Some(super::gateway::version_id(index)),
            ..Default::default()
        }))
    }

    pub(super) async fn abort_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        caller.may_put(&input.key)?;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        self.store.read_point(&bucket).await?;
        let (upload, _) = self.upload_record(&bucket, &input.upload_id, &input.key)?;
        let kind = pb::command::Kind::AbortUpload(pb::AbortUpload {
            bucket: bucket.id.0,
            upload,
        });
        self.store.propose(&bucket, kind).await?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    pub(super) async fn list_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        self.store.read_point(&bucket).await?;
        let url = input
            .encoding_type
            .as_ref()
            .is_some_and(|e| e.as_str() == EncodingType::URL);
        let limit = input
            .max_uploads
            .unwrap_or(UPLOADS_LISTED_MAX)
            .clamp(0, UPLOADS_LISTED_MAX) as usize;
        let prefix = input.prefix.clone().unwrap_or_default();
        let key_marker = input.key_marker.clone().unwrap_or_default();
        let id_marker = input.upload_id_marker.clone().unwrap_or_default();
        // Uploads in progress are few: order them as S3 does (key, then
        // upload id) in memory.
        let mut all: Vec<(String, String, i64)> = self
            .uploads()
            .uploads(bucket.pg, bucket.id, None, usize::MAX)
            .map_err(|e| from_node(e.into()))?
            .into_iter()
            .filter_map(|(id, u)| {
                let key = String::from_utf8(u.key).ok()?;
                Some((key, upload_id(id), u.created_ms as i64))
            })
            .filter(|(key, id, _)| {
                key.starts_with(&prefix)
                    && (key.as_str(), id.as_str()) > (key_marker.as_str(), id_marker.as_str())
            })
            .collect();
        all.sort();
        let truncated = all.len() > limit;
        all.truncate(limit);
        let next = all.last().filter(|_| truncated).cloned();
        let uploads = all
            .into_iter()
            .map(|(key, id, created)| MultipartUpload {
                key: Some(if url { url_encode(&key) } else { key }),
                upload_id: Some(id),
                initiated: Some(timestamp(created)),
                owner: Some(caller.owner()),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(limit as i32),
            is_truncated: Some(truncated),
            next_key_marker: next.as_ref().map(|n| n.0.clone()),
            next_upload_id_marker: next.map(|n| n.1),
            uploads: Some(uploads),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    pub(super) async fn list_upload_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        self.store.read_point(&bucket).await?;
        let (upload, _) = self.upload_record(&bucket, &input.upload_id, &input.key)?;
        let limit = input
            .max_parts
            .unwrap_or(PARTS_LISTED_MAX)
            .clamp(0, PARTS_LISTED_MAX) as usize;
        let after = input.part_number_marker.unwrap_or(0).max(0) as u32;
        let mut stored = self
            .uploads()
            .parts(bucket.pg, upload, after, limit + 1)
            .map_err(|e| from_node(e.into()))?;
        let truncated = stored.len() > limit;
        stored.truncate(limit);
        let mut parts = Vec::with_capacity(stored.len());
        for (number, s) in &stored {
            let p: rec::PartRecord = self.store.open(
                &bucket,
                &s.record,
                input.key.as_bytes(),
                |r: &rec::PartRecord| &r.key,
            )?;
            parts.push(Part {
                part_number: Some(*number as i32),
                size: Some(p.size as i64),
                e_tag: Some(ETag::Strong(p.etag)),
                last_modified: Some(timestamp(p.modified_ms)),
                ..Default::default()
            });
        }
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: stored.last().filter(|_| truncated).map(|(n, _)| *n as i32),
            max_parts: Some(limit as i32),
            is_truncated: Some(truncated),
            parts: Some(parts),
            owner: Some(caller.owner()),
            ..Default::default()
        }))
    }
}

/// `bytes=FIRST-LAST` of x-amz-copy-source-range, within `size`.
fn parse_copy_range(header: &str, size: u64) -> S3Result<std::ops::Range<u64>> {
    let bad = || {
        s3_error!(
            InvalidArgument,
            "invalid x-amz-copy-source-range {header:?}"
        )
    };
    let (first, last) = header
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(bad)?;
    let first: u64 = first.parse().map_err(|_| bad())?;
    let last: u64 = last.parse().map_err(|_| bad())?;
    if first > last || last >= size {
        return Err(s3_error!(
            InvalidRange,
            "the copy range is outside the source's {size} bytes"
        ));
    }
    Ok(first..last + 1)
}
