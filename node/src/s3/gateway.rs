//! The S3 operations: who is asking (credential, tenant, mode), which
//! bucket, and what the object store does for them.

use std::sync::Arc;

use base64::Engine as _;
use lifeboat_proto::objects as rec;
use lifeboat_proto::raft as pb;
use lifeboat_replication::{Error as R, Rejection as J};
use lifeboat_store::LogIndex;
use lifeboat_store::objects::{ListQuery, Listed, ListedVersion, ObjectVersion};
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};

use super::errors::{access_denied, from_node};
use super::objects::{
    BucketRef, Found, ObjectStore, WantedChecksums, WrittenBody, now_ms, timestamp, timestamp_ms,
};
use crate::core::{CredentialInfo, CredentialMode, NodeCore};
use crate::error::NodeError;

/// Keys per listing page at most (S3's own cap).
const LIST_KEYS_MAX: i32 = 1000;

/// Who signed a request.
pub(super) struct Caller {
    pub(super) credential: CredentialInfo,
    pub(super) tenant_id: u64,
}

impl Caller {
    pub(super) fn owner(&self) -> Owner {
        Owner {
            display_name: Some(self.credential.tenant.clone()),
            id: Some(format!("lifeboat-tenant-{}", self.tenant_id)),
        }
    }

    fn may_delete_buckets(&self) -> S3Result<()> {
        match self.credential.mode {
            CredentialMode::Full => Ok(()),
            _ => Err(access_denied(format!(
                "a {} credential may not delete buckets",
                self.credential.mode.as_str()
            ))),
        }
    }

    fn may_create_buckets(&self) -> S3Result<()> {
        match self.credential.mode {
            CredentialMode::ReadOnly => Err(access_denied(
                "a read-only credential may not create buckets",
            )),
            _ => Ok(()),
        }
    }

    /// How a write of `key` must go: `Ok(false)` freely, `Ok(true)` only
    /// if the key has no live version (append-only outside its prefix).
    pub(super) fn may_put(&self, key: &str) -> S3Result<bool> {
        match self.credential.mode {
            CredentialMode::Full => Ok(false),
            CredentialMode::ReadOnly => Err(access_denied(
                "a read-only credential may not write objects",
            )),
            CredentialMode::AppendOnly => Ok(!key.starts_with(&self.credential.writable_prefix)),
        }
    }

    fn may_delete(&self, key: &str) -> S3Result<()> {
        match self.credential.mode {
            CredentialMode::Full => Ok(()),
            CredentialMode::ReadOnly => Err(access_denied(
                "a read-only credential may not delete objects",
            )),
            CredentialMode::AppendOnly if key.starts_with(&self.credential.writable_prefix) => {
                Ok(())
            }
            CredentialMode::AppendOnly => Err(access_denied(format!(
                "an append-only credential may delete only under {:?}",
                self.credential.writable_prefix
            ))),
        }
    }
}

pub struct Gateway {
    pub(super) store: ObjectStore,
}

impl Gateway {
    pub fn new(core: Arc<NodeCore>) -> Gateway {
        Gateway {
            store: ObjectStore::new(core),
        }
    }

    pub(super) fn core(&self) -> &Arc<NodeCore> {
        self.store.core()
    }

    pub(super) fn caller<T>(&self, req: &S3Request<T>) -> S3Result<Caller> {
        let Some(creds) = &req.credentials else {
            return Err(access_denied("anonymous requests are not served"));
        };
        // The signature was checked against the secret already; only the
        // credential's tenant and mode are needed here.
        let credential = self
            .core()
            .credential_info(&creds.access_key)
            .map_err(from_node)?
            .ok_or_else(|| s3_error!(InvalidAccessKeyId, "the access key was revoked"))?;
        let tenant_id = self
            .core()
            .tenant(&credential.tenant)
            .map_err(from_node)?
            .id;
        Ok(Caller {
            credential,
            tenant_id,
        })
    }

    /// The caller's bucket `name`: `NoSuchBucket` if nobody has it,
    /// `AccessDenied` if another tenant does. A bucket this node's replicas
    /// do not show yet (just created, or cloned, through another node) is
    /// looked for again once they have caught up with their leaders, so a
    /// client that created it elsewhere finds it here at once.
    pub(super) async fn bucket(&self, caller: &Caller, name: &str) -> S3Result<BucketRef> {
        let mut bucket = self.bucket_found(caller, name).await?;
        if bucket.base.is_some() {
            self.drill_source_ready(&bucket).await?;
        }
        bucket
            .read_layers(self.core())
            .map_err(|e| from_node(e.into()))?;
        Ok(bucket)
    }

    /// For a clone in a drill's PG: waits until this node's replica of the
    /// drill's source has the restore point its base is read at (a standby
    /// replica may trail the one the point was taken from); for the
    /// drill's own clone, reports its first request (the drill's RTO).
    async fn drill_source_ready(&self, bucket: &BucketRef) -> S3Result<()> {
        let core = self.core();
        let Some((drill, source, index)) = core.drill_of_pg(bucket.pg).map_err(from_node)? else {
            return Ok(());
        };
        core.wait_drill_source(source, index)
            .await
            .map_err(from_node)?;
        if bucket.over_other_pg() {
            core.record_drill_bucket_io(drill, &bucket.name)
                .map_err(from_node)?;
        }
        Ok(())
    }

    /// [`Gateway::bucket`] without its layers.
    async fn bucket_found(&self, caller: &Caller, name: &str) -> S3Result<BucketRef> {
        match self.bucket_here(caller, name) {
            Err(e) if *e.code() == S3ErrorCode::NoSuchBucket => {
                let core = self.core();
                let catalog = core.catalog_group().map_err(from_node)?;
                catalog
                    .read_barrier()
                    .await
                    .map_err(|e| from_node(e.into()))?;
                if let Some(bound) = core.bucket_binding(name).map_err(from_node)? {
                    core.running_group(bound.pg)
                        .map_err(from_node)?
                        .read_barrier()
                        .await
                        .map_err(|e| from_node(e.into()))?;
                }
                self.bucket_here(caller, name)
            }
            found => found,
        }
    }

    /// [`Gateway::bucket`] as this node's replicas show it now, without
    /// its layers.
    fn bucket_here(&self, caller: &Caller, name: &str) -> S3Result<BucketRef> {
        let core = self.core();
        let bound = core
            .bucket_binding(name)
            .map_err(from_node)?
            .ok_or_else(|| no_such_bucket(name))?;
        if bound.tenant_id != caller.tenant_id {
            return Err(access_denied(format!(
                "bucket {name} belongs to another tenant"
            )));
        }
        let group = core.running_group(bound.pg).map_err(from_node)?;
        let info = core
            .bucket_info_of(&caller.credential.tenant, name, &bound)
            .map_err(from_node)?
            .ok_or_else(|| no_such_bucket(name))?;
        Ok(BucketRef {
            tenant: caller.credential.tenant.clone(),
            tenant_id: lifeboat_store::TenantId(caller.tenant_id),
            name: name.to_owned(),
            pg: info.pg,
            id: info.bucket,
            group,
            base: info.base,
            layers: Vec::new(),
        })
    }

    /// A bucket read at a linearizable point.
    async fn bucket_for_read(&self, caller: &Caller, name: &str) -> S3Result<BucketRef> {
        // Every mode may read its tenant's buckets.
        let mut bucket = self.bucket(caller, name).await?;
        self.store.read_point(&bucket).await?;
        // A restore applied up to the read point changes what reads see.
        bucket
            .read_layers(self.core())
            .map_err(|e| from_node(e.into()))?;
        Ok(bucket)
    }

    /// Apply cannot see a drill's base (in its source PG): a create-only
    /// write to a drill's clone is checked against it here, refused as
    /// apply refuses one over an object of the clone's own. The base never
    /// changes, and apply checks the clone's own versions again.
    pub(super) fn absent_over_drill_base(
        &self,
        bucket: &BucketRef,
        key: &str,
        if_absent: bool,
    ) -> S3Result<()> {
        if !if_absent
            || !bucket.over_other_pg()
            || self.store.find(bucket, key.as_bytes(), None)?.is_none()
        {
            return Ok(());
        }
        Err(from_node(
            lifeboat_replication::Error::Rejected {
                pg: bucket.pg.0,
                rejection: lifeboat_replication::Rejection::ObjectExists,
            }
            .into(),
        ))
    }

    /// Names a written body in a new version of `key`; releases its stream
    /// if that fails.
    async fn put_version(
        &self,
        bucket: &BucketRef,
        key: &str,
        body: WrittenBody,
        record: &rec::ObjectRecord,
        if_absent: bool,
    ) -> S3Result<LogIndex> {
        if let Err(e) = self.absent_over_drill_base(bucket, key, if_absent) {
            self.store.release(bucket, body.stream).await;
            return Err(e);
        }
        let sealed = self.store.seal(bucket, record)?;
        let stream = body.stream;
        let kind = pb::command::Kind::PutObject(pb::PutObject {
            bucket: bucket.id.0,
            key: key.as_bytes().to_vec().into(),
            chunks: body.chunk_ids,
            new_chunks: body.inline,
            record: sealed,
            if_absent,
            stream,
        });
        let put = bucket.group.propose(kind).await;
        match put {
            Ok((index, _)) => Ok(index),
            Err(e) => {
                self.store.release(bucket, stream).await;
                Err(from_node(e.into()))
            }
        }
    }
}

fn no_such_bucket(name: &str) -> S3Error {
    S3Error::with_message(
        S3ErrorCode::NoSuchBucket,
        format!("bucket {name} does not exist"),
    )
}

fn no_such_key(key: &str) -> S3Error {
    S3Error::with_message(S3ErrorCode::NoSuchKey, format!("no object {key:?}"))
}

/// A version id as S3 clients send it: our log index in decimal, or
/// `null` (the unversioned id) for the newest.
pub(super) fn parse_version(id: Option<&str>) -> S3Result<Option<LogIndex>> {
    match id {
        None | Some("null") => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|i| *i > 0)
            .map(|i| Some(LogIndex(i)))
            .ok_or_else(|| s3_error!(InvalidArgument, "invalid version id {s:?}")),
    }
}

pub(super) fn version_id(index: LogIndex) -> String {
    index.0.to_string()
}

/// Which checksums to verify: those the client sent as headers and those
/// it announced as trailers.
pub(super) fn wanted_checksums(
    headers: &hyper::HeaderMap,
    sent: &SentChecksums,
) -> WantedChecksums {
    // `x-amz-trailer` lists the trailing headers, comma-separated.
    let trailer = headers
        .get("x-amz-trailer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let announced = |name: &str| {
        trailer
            .split(',')
            .any(|t| t.trim() == format!("x-amz-checksum-{name}"))
    };
    WantedChecksums {
        crc32: sent.crc32.is_some() || announced("crc32"),
        crc32c: sent.crc32c.is_some() || announced("crc32c"),
        sha1: sent.sha1.is_some() || announced("sha1"),
        sha256: sent.sha256.is_some() || announced("sha256"),
        crc64nvme: sent.crc64nvme.is_some() || announced("crc64nvme"),
    }
}

/// Takes the checksum headers out of an upload's input (PutObject and
/// UploadPart name them alike).
macro_rules! sent_checksums {
    ($input:expr) => {
        $crate::s3::gateway::SentChecksums {
            crc32: $input.checksum_crc32.take(),
            crc32c: $input.checksum_crc32c.take(),
            sha1: $input.checksum_sha1.take(),
            sha256: $input.checksum_sha256.take(),
            crc64nvme: $input.checksum_crc64nvme.take(),
        }
    };
}
pub(super) use sent_checksums;

/// Checksums a client sent as headers.
#[derive(Default)]
pub(super) struct SentChecksums {
    pub crc32: Option<String>,
    pub crc32c: Option<String>,
    pub sha1: Option<String>,
    pub sha256: Option<String>,
    pub crc64nvme: Option<String>,
}

/// Checks a written body against Content-MD5 and the checksums the client
/// sent (headers, or trailers now that the body has been read).
pub(super) fn verify_body(
    body: &WrittenBody,
    content_md5: Option<&str>,
    sent: &SentChecksums,
    trailers: Option<&hyper::HeaderMap>,
) -> S3Result<()> {
    if let Some(md5) = content_md5 {
        let expected = base64::engine::general_purpose::STANDARD
            .decode(md5.trim())
            .ok()
            .filter(|d| d.len() == 16)
            .ok_or_else(|| s3_error!(InvalidDigest, "Content-MD5 is not a base64 MD5"))?;
        if expected != body.md5 {
            return Err(s3_error!(
                BadDigest,
                "the Content-MD5 you specified did not match what we received"
            ));
        }
    }
    let trailer = |name: &str| {
        trailers
            .and_then(|t| t.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let c = &body.checksums;
    for (name, sent, computed) in [
        ("crc32", &sent.crc32, &c.crc32),
        ("crc32c", &sent.crc32c, &c.crc32c),
        ("sha1", &sent.sha1, &c.sha1),
        ("sha256", &sent.sha256, &c.sha256),
        ("crc64nvme", &sent.crc64nvme, &c.crc64nvme),
    ] {
        let expected = sent
            .clone()
            .or_else(|| trailer(&format!("x-amz-checksum-{name}")));
        if let Some(expected) = expected
            && expected != *computed
        {
            return Err(s3_error!(
                BadDigest,
                "the x-amz-checksum-{name} you specified did not match what we received"
            ));
        }
    }
    Ok(())
}

/// GET/HEAD preconditions in S3's order: If-Match, then If-Unmodified-Since
/// (only without If-Match) fail with 412; If-None-Match, then
/// If-Modified-Since (only without If-None-Match) answer 304.
pub(super) fn check_preconditions(
    record: &rec::ObjectRecord,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> S3Result<()> {
    let matches = |c: &ETagCondition| match c {
        ETagCondition::Any => true,
        ETagCondition::ETag(tag) => tag.value() == record.etag,
    };
    // HTTP dates have whole seconds.
    let modified_s = record.modified_ms / 1000;
    match if_match {
        Some(c) if !matches(c) => return Err(s3_error!(PreconditionFailed)),
        Some(_) => {}
        None => {
            if let Some(t) = if_unmodified_since
                && modified_s > timestamp_ms(t) / 1000
            {
                return Err(s3_error!(PreconditionFailed));
            }
        }
    }
    match if_none_match {
        Some(c) if matches(c) => return Err(s3_error!(NotModified)),
        Some(_) => {}
        None => {
            if let Some(t) = if_modified_since
                && modified_s <= timestamp_ms(t) / 1000
            {
                return Err(s3_error!(NotModified));
            }
        }
    }
    Ok(())
}

/// The `x-amz-copy-source-if-*` preconditions of a copy (CopyObject and
/// UploadPartCopy name them alike) on the source's record. A copy has no
/// 304: every failed condition is `PreconditionFailed`.
macro_rules! check_copy_preconditions {
    ($record:expr, $input:expr) => {
        $crate::s3::gateway::check_preconditions(
            $record,
            $input.copy_source_if_match.as_ref(),
            $input.copy_source_if_none_match.as_ref(),
            $input.copy_source_if_modified_since.as_ref(),
            $input.copy_source_if_unmodified_since.as_ref(),
        )
        .map_err(|e| match e.code() {
            s3s::S3ErrorCode::NotModified => s3s::s3_error!(PreconditionFailed),
            _ => e,
        })
    };
}
pub(super) use check_copy_preconditions;

fn checksums_out(c: Option<&rec::Checksums>) -> [Option<String>; 5] {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    match c {
        None => Default::default(),
        Some(c) => [
            some(&c.crc32),
            some(&c.crc32c),
            some(&c.sha1),
            some(&c.sha256),
            some(&c.crc64nvme),
        ],
    }
}

/// The record of a new object from its request headers.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_record(
    key: &str,
    content_type: Option<String>,
    metadata: Option<Metadata>,
    content_encoding: Option<String>,
    cache_control: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    expires: Option<&Timestamp>,
) -> rec::ObjectRecord {
    rec::ObjectRecord {
        key: key.as_bytes().to_vec(),
        content_type: content_type.unwrap_or_default(),
        metadata: metadata.unwrap_or_default().into_iter().collect(),
        content_encoding: content_encoding.unwrap_or_default(),
        cache_control: cache_control.unwrap_or_default(),
        content_disposition: content_disposition.unwrap_or_default(),
        content_language: content_language.unwrap_or_default(),
        expires_ms: expires.map(timestamp_ms),
        modified_ms: now_ms(),
        ..Default::default()
    }
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Percent-encodes a key for `EncodingType=url` (everything but RFC 3986
/// unreserved characters and `/`).
pub(super) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Continuation tokens are the listing's resume position after the
/// bucket's 16-byte key prefix, in URL-safe base64.
fn encode_token(resume: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&resume[16.min(resume.len())..])
}

fn decode_token(bucket: &BucketRef, token: &str) -> S3Result<Vec<u8>> {
    let rest = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| s3_error!(InvalidArgument, "invalid continuation token"))?;
    let mut position = lifeboat_store::keys::bucket_prefix(bucket.pg, bucket.read_id()).to_vec();
    position.extend_from_slice(&rest);
    Ok(position)
}

fn max_keys(requested: Option<i32>) -> S3Result<usize> {
    match requested {
        None => Ok(LIST_KEYS_MAX as usize),
        Some(n) if n < 0 => Err(s3_error!(InvalidArgument, "max-keys must not be negative")),
        Some(n) => Ok(n.min(LIST_KEYS_MAX) as usize),
    }
}

/// A listing's text (key or prefix) as the response carries it.
fn listed_text(bytes: &[u8], url: bool) -> String {
    let s = String::from_utf8_lossy(bytes);
    if url { url_encode(&s) } else { s.into_owned() }
}

fn wants_url(e: Option<&EncodingType>) -> S3Result<bool> {
    match e.map(EncodingType::as_str) {
        None => Ok(false),
        Some(EncodingType::URL) => Ok(true),
        Some(other) => Err(s3_error!(
            InvalidArgument,
            "unknown encoding type {other:?}"
        )),
    }
}

/// restic sends `delimiter=` (empty): that is no delimiter.
fn delimiter(d: Option<&String>) -> Option<&[u8]> {
    d.filter(|d| !d.is_empty()).map(|d| d.as_bytes())
}

struct Page {
    objects: Vec<Object>,
    prefixes: Vec<CommonPrefix>,
    resume: Option<Vec<u8>>,
    last_key: Option<String>,
}

impl Gateway {
    /// One page of live objects, with each object's size, ETag and date
    /// from its (sealed) record.
    #[allow(clippy::too_many_arguments)]
    fn list_page(
        &self,
        caller: &Caller,
        bucket: &BucketRef,
        prefix: &str,
        delimiter: Option<&[u8]>,
        start_after: Option<&str>,
        resume: Option<&[u8]>,
        limit: usize,
        url: bool,
        fetch_owner: bool,
    ) -> S3Result<Page> {
        let mut page = Page {
            objects: Vec::new(),
            prefixes: Vec::new(),
            resume: None,
            last_key: None,
        };
        if limit == 0 {
            return Ok(page);
        }
        let query = ListQuery {
            prefix: prefix.as_bytes(),
            delimiter,
            start_after: start_after.map(str::as_bytes),
            resume,
            limit,
        };
        let objects = &self.core().objects;
        let listing = objects
            .list_layered(bucket.pg, &bucket.layers, &query)
            .map_err(|e| from_node(e.into()))?;
        for entry in listing.entries {
            match entry {
                Listed::CommonPrefix(p) => {
                    page.last_key = Some(String::from_utf8_lossy(&p).into_owned());
                    page.prefixes.push(CommonPrefix {
                        prefix: Some(listed_text(&p, url)),
                    });
                }
                Listed::Object { key, .. } => {
                    // Read the version `latest` named (it cannot move
                    // under us in a way that matters: a newer one is as good).
                    let Some(found) = self.store.find(bucket, &key, None)? else {
                        continue;
                    };
                    page.last_key = Some(String::from_utf8_lossy(&key).into_owned());
                    page.objects.push(Object {
                        key: Some(listed_text(&key, url)),
                        size: Some(found.record.size as i64),
                        e_tag: Some(ETag::Strong(found.record.etag.clone())),
                        last_modified: Some(timestamp(found.record.modified_ms)),
                        storage_class: Some(ObjectStorageClass::from_static(
                            ObjectStorageClass::STANDARD,
                        )),
                        owner: fetch_owner.then(|| caller.owner()),
                        ..Default::default()
                    });
                }
            }
        }
        page.resume = listing.resume;
        Ok(page)
    }

    async fn read_object(
        &self,
        caller: &Caller,
        bucket_name: &str,
        key: &str,
        version: Option<&str>,
    ) -> S3Result<(BucketRef, Found)> {
        let bucket = self.bucket_for_read(caller, bucket_name).await?;
        let at = parse_version(version)?;
        let found = self.store.find(&bucket, key.as_bytes(), at)?;
        match (found, at) {
            (Some(found), _) => Ok((bucket, found)),
            (None, None) => Err(no_such_key(key)),
            (None, Some(_)) => Err(S3Error::with_message(
                S3ErrorCode::NoSuchVersion,
                format!("no such version of {key:?}"),
            )),
        }
    }

    /// The source of a copy, read at a linearizable point.
    pub(super) async fn copy_source(
        &self,
        caller: &Caller,
        source: &CopySource,
    ) -> S3Result<(BucketRef, Found)> {
        let CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = source
        else {
            return Err(s3_error!(NotImplemented, "copy sources are bucket/key"));
        };
        self.read_object(caller, bucket, key, version_id.as_deref())
            .await
    }

    /// Copies `range` of `src` into `dest` as a new body: chunks are
    /// shared when the whole object is copied within one PG, and
    /// re-sealed otherwise (the frames' associated data names the PG).
    pub(super) async fn copy_body(
        &self,
        src_bucket: &BucketRef,
        src: &Found,
        dest: &BucketRef,
        range: std::ops::Range<u64>,
    ) -> S3Result<WrittenBody> {
        let whole = range.start == 0 && range.end == src.record.size;
        if whole && src.pg == dest.pg && !src.chunks.is_empty() {
            let md5 = hex_md5(&src.record.etag);
            return Ok(WrittenBody {
                size: src.record.size,
                md5,
                checksums: src.record.checksums.clone().unwrap_or_default(),
                chunk_ids: src.chunks.iter().map(|c| c.0).collect(),
                chunk_sizes: src.record.chunk_sizes.clone(),
                inline: Vec::new(),
                stream: 0,
            });
        }
        let body = self.store.read_range(src_bucket, src, range).await?;
        self.store
            .write_body(dest, Some(body), &WantedChecksums::default())
            .await
    }
}

/// The MD5 an ETag carries (zero for multipart ETags, which are not one).
fn hex_md5(etag: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(bytes) = hex::decode(etag)
        && bytes.len() == 16
    {
        out.copy_from_slice(&bytes);
    }
    out
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let caller = self.caller(&req)?;
        caller.may_create_buckets()?;
        let name = &req.input.bucket;
        if let Some(bound) = self.core().bucket_binding(name).map_err(from_node)? {
            return Err(if bound.tenant_id == caller.tenant_id {
                s3_error!(BucketAlreadyOwnedByYou, "you already own bucket {name}")
            } else {
                s3_error!(BucketAlreadyExists, "bucket name {name} is taken")
            });
        }
        let full = format!("{}/{name}", caller.credential.tenant);
        match self.core().create_bucket(&full, "").await {
            Ok(_) => {}
            Err(NodeError::InvalidName { reason, .. }) => {
                return Err(s3_error!(InvalidBucketName, "{reason}"));
            }
            Err(e) => return Err(from_node(e)),
        }
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{name}")),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let caller = self.caller(&req)?;
        self.bucket(&caller, &req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.core().config.s3.region.clone()),
            ..Default::default()
        }))
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let caller = self.caller(&req)?;
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let buckets = self
            .core()
            .list_buckets(&caller.credential.tenant)
            .map_err(from_node)?
            .into_iter()
            .filter(|b| b.name.starts_with(&prefix))
            .map(|b| Bucket {
                name: Some(b.name),
                creation_date: Some(timestamp(b.created_ms as i64)),
                bucket_region: None,
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(caller.owner()),
            prefix: req.input.prefix,
            continuation_token: None,
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let caller = self.caller(&req)?;
        caller.may_delete_buckets()?;
        let name = &req.input.bucket;
        self.bucket(&caller, name).await?;
        self.core()
            .delete_bucket(&format!("{}/{name}", caller.credential.tenant))
            .await
            .map_err(from_node)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let caller = self.caller(&req)?;
        self.bucket(&caller, &req.input.bucket).await?;
        let region = &self.core().config.s3.region;
        // S3 reports its default region as no constraint.
        let location_constraint =
            (region != "us-east-1").then(|| BucketLocationConstraint::from(region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint,
        }))
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<GetBucketVersioningInput>,
    ) -> S3Result<S3Response<GetBucketVersioningOutput>> {
        let caller = self.caller(&req)?;
        self.bucket(&caller, &req.input.bucket).await?;
        // Every version is kept at its log index: versioning is always on.
        Ok(S3Response::new(GetBucketVersioningOutput {
            status: Some(BucketVersioningStatus::from_static(
                BucketVersioningStatus::ENABLED,
            )),
            mfa_delete: None,
        }))
    }

    async fn put_object(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let caller = self.caller(&req)?;
        let input = &mut req.input;
        let create_only = caller.may_put(&input.key)?;
        let conditional = match &input.if_none_match {
            None => false,
            Some(ETagCondition::Any) => true,
            Some(_) => {
                return Err(s3_error!(
                    NotImplemented,
                    "If-None-Match on PUT takes only *"
                ));
            }
        };
        if input.if_match.is_some() {
            return Err(s3_error!(
                NotImplemented,
                "If-Match on PUT is not supported"
            ));
        }
        let bucket = self.bucket(&caller, &input.bucket).await?;
        let sent = sent_checksums!(input);
        let wanted = wanted_checksums(&req.headers, &sent);
        let body = self
            .store
            .write_body(&bucket, input.body.take(), &wanted)
            .await?;
        let trailers = req.trailing_headers.as_ref().and_then(|t| t.take());
        let checked = verify_body(
            &body,
            input.content_md5.as_deref(),
            &sent,
            trailers.as_ref(),
        )
        .and_then(|()| match input.content_length {
            Some(len) if len as u64 != body.size => Err(s3_error!(
                IncompleteBody,
                "the body has {} bytes, Content-Length said {len}",
                body.size
            )),
            _ => Ok(()),
        });
        if let Err(e) = checked {
            self.store.release(&bucket, body.stream).await;
            return Err(e);
        }
        let mut record = new_record(
            &input.key,
            input.content_type.take(),
            input.metadata.take(),
            input.content_encoding.take(),
            input.cache_control.take(),
            input.content_disposition.take(),
            input.content_language.take(),
            input.expires.as_ref(),
        );
        record.size = body.size;
        record.etag = hex::encode(body.md5);
        record.chunk_sizes = body.chunk_sizes.clone();
        record.checksums = Some(body.checksums.clone());
        let index = self
            .put_version(
                &bucket,
                &input.key,
                body,
                &record,
                create_only || conditional,
            )
            .await
            .map_err(|e| match (e.code(), conditional) {
                (S3ErrorCode::AccessDenied, true) => s3_error!(PreconditionFailed),
                _ => e,
            })?;
        let [crc32, crc32c, sha1, sha256, crc64nvme] = checksums_out(record.checksums.as_ref());
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(record.etag)),
            version_id: Some(version_id(index)),
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            checksum_crc64nvme: crc64nvme,
            size: Some(record.size as i64),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let (bucket, found) = self
            .read_object(
                &caller,
                &input.bucket,
                &input.key,
                input.version_id.as_deref(),
            )
            .await?;
        let r = &found.record;
        check_preconditions(
            r,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        if input.part_number.is_some_and(|p| p != 1 || r.parts > 1) {
            return Err(s3_error!(
                NotImplemented,
                "GetObject by part number is served for part 1 of single-part objects only"
            ));
        }
        let range = match &input.range {
            None => 0..r.size,
            Some(range) => range.check(r.size).map_err(|_| {
                s3_error!(
                    InvalidRange,
                    "the range is not satisfiable for an object of {} bytes",
                    r.size
                )
            })?,
        };
        let content_range = input.range.as_ref().map(|_| {
            format!(
                "bytes {}-{}/{}",
                range.start,
                range.end.saturating_sub(1),
                r.size
            )
        });
        let body = self
            .store
            .read_range(&bucket, &found, range.clone())
            .await?;
        let with_checksums = input.range.is_none();
        let [crc32, crc32c, sha1, sha256, crc64nvme] = if with_checksums {
            checksums_out(r.checksums.as_ref())
        } else {
            Default::default()
        };
        Ok(S3Response::new(GetObjectOutput {
            body: Some(body),
            content_length: Some((range.end - range.start) as i64),
            content_range,
            accept_ranges: Some("bytes".into()),
            e_tag: Some(ETag::Strong(r.etag.clone())),
            last_modified: Some(timestamp(r.modified_ms)),
            content_type: nonempty(&r.content_type),
            content_encoding: input
                .response_content_encoding
                .or_else(|| nonempty(&r.content_encoding)),
            cache_control: input
                .response_cache_control
                .or_else(|| nonempty(&r.cache_control)),
            content_disposition: input
                .response_content_disposition
                .or_else(|| nonempty(&r.content_disposition)),
            content_language: input
                .response_content_language
                .or_else(|| nonempty(&r.content_language)),
            expires: r.expires_ms.map(timestamp),
            metadata: (!r.metadata.is_empty()).then(|| r.metadata.clone().into_iter().collect()),
            version_id: Some(version_id(found.index)),
            parts_count: (r.parts > 1).then_some(r.parts as i32),
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            checksum_crc64nvme: crc64nvme,
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let (_, found) = self
            .read_object(
                &caller,
                &input.bucket,
                &input.key,
                input.version_id.as_deref(),
            )
            .await?;
        let r = &found.record;
        check_preconditions(
            r,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let [crc32, crc32c, sha1, sha256, crc64nvme] = checksums_out(r.checksums.as_ref());
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(r.size as i64),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(ETag::Strong(r.etag.clone())),
            last_modified: Some(timestamp(r.modified_ms)),
            content_type: nonempty(&r.content_type),
            content_encoding: nonempty(&r.content_encoding),
            cache_control: nonempty(&r.cache_control),
            content_disposition: nonempty(&r.content_disposition),
            content_language: nonempty(&r.content_language),
            expires: r.expires_ms.map(timestamp),
            metadata: (!r.metadata.is_empty()).then(|| r.metadata.clone().into_iter().collect()),
            version_id: Some(version_id(found.index)),
            parts_count: (r.parts > 1).then_some(r.parts as i32),
            checksum_crc32: crc32,
            checksum_crc32c: crc32c,
            checksum_sha1: sha1,
            checksum_sha256: sha256,
            checksum_crc64nvme: crc64nvme,
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        caller.may_delete(&input.key)?;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        let deleted = self
            .delete_one(&bucket, &input.key, input.version_id.as_deref())
            .await?;
        Ok(S3Response::new(deleted))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let bucket = self.bucket(&caller, &input.bucket).await?;
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for object in input.delete.objects {
            let outcome = match caller.may_delete(&object.key) {
                Ok(()) => {
                    self.delete_one(&bucket, &object.key, object.version_id.as_deref())
                        .await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(out) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(object.key),
                            version_id: object.version_id,
                            delete_marker: out.delete_marker,
                            delete_marker_version_id: out
                                .delete_marker
                                .filter(|m| *m)
                                .and(out.version_id),
                        });
                    }
                }
                Err(e) => errors.push(Error {
                    code: Some(e.code().as_str().to_owned()),
                    key: Some(object.key),
                    message: e.message().map(str::to_owned),
                    version_id: object.version_id,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            request_charged: None,
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let create_only = caller.may_put(&input.key)?;
        let dest = self.bucket(&caller, &input.bucket).await?;
        let (src_bucket, src) = self.copy_source(&caller, &input.copy_source).await?;
        check_copy_preconditions!(&src.record, input)?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let mut record = if replace {
            new_record(
                &input.key,
                input.content_type,
                input.metadata,
                input.content_encoding,
                input.cache_control,
                input.content_disposition,
                input.content_language,
                input.expires.as_ref(),
            )
        } else {
            rec::ObjectRecord {
                key: input.key.as_bytes().to_vec(),
                modified_ms: now_ms(),
                ..src.record.clone()
            }
        };
        let body = self
            .copy_body(&src_bucket, &src, &dest, 0..src.record.size)
            .await?;
        record.size = body.size;
        record.etag = src.record.etag.clone();
        record.parts = src.record.parts;
        record.chunk_sizes = body.chunk_sizes.clone();
        record.checksums = src.record.checksums.clone();
        let index = self
            .put_version(&dest, &input.key, body, &record, create_only)
            .await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(record.etag.clone())),
                last_modified: Some(timestamp(record.modified_ms)),
                ..Default::default()
            }),
            copy_source_version_id: Some(version_id(src.index)),
            version_id: Some(version_id(index)),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let bucket = self.bucket_for_read(&caller, &input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let limit = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delim = delimiter(input.delimiter.as_ref());
        let page = self.list_page(
            &caller,
            &bucket,
            &prefix,
            delim,
            input.marker.as_deref().filter(|m| !m.is_empty()),
            None,
            limit,
            url,
            true,
        )?;
        let truncated = page.resume.is_some();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            marker: input.marker,
            max_keys: Some(limit as i32),
            is_truncated: Some(truncated),
            // With a delimiter S3 sends NextMarker; clients without one use
            // the last key. Always sending it serves both.
            next_marker: page
                .last_key
                .filter(|_| truncated)
                .map(|k| if url { url_encode(&k) } else { k }),
            contents: Some(page.objects),
            common_prefixes: Some(page.prefixes),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            request_charged: None,
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let bucket = self.bucket_for_read(&caller, &input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let limit = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let resume = input
            .continuation_token
            .as_deref()
            .map(|t| decode_token(&bucket, t))
            .transpose()?;
        let page = self.list_page(
            &caller,
            &bucket,
            &prefix,
            delimiter(input.delimiter.as_ref()),
            input.start_after.as_deref().filter(|s| !s.is_empty()),
            resume.as_deref(),
            limit,
            url,
            input.fetch_owner.unwrap_or(false),
        )?;
        let key_count = (page.objects.len() + page.prefixes.len()) as i32;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            max_keys: Some(limit as i32),
            key_count: Some(key_count),
            continuation_token: input.continuation_token,
            is_truncated: Some(page.resume.is_some()),
            next_continuation_token: page.resume.as_deref().map(encode_token),
            contents: Some(page.objects),
            common_prefixes: Some(page.prefixes),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            start_after: input.start_after,
            request_charged: None,
        }))
    }

    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        let caller = self.caller(&req)?;
        let input = req.input;
        let bucket = self.bucket_for_read(&caller, &input.bucket).await?;
        let url = wants_url(input.encoding_type.as_ref())?;
        let limit = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let key_marker = input.key_marker.as_deref().filter(|k| !k.is_empty());
        let version_after = match key_marker {
            Some(_) => parse_version(input.version_id_marker.as_deref().filter(|v| !v.is_empty()))?,
            None => None,
        };
        let listing = if limit == 0 {
            Default::default()
        } else {
            self.core()
                .objects
                .list_versions(
                    bucket.pg,
                    &bucket.layers,
                    &ListQuery {
                        prefix: prefix.as_bytes(),
                        delimiter: delimiter(input.delimiter.as_ref()),
                        start_after: key_marker.map(str::as_bytes),
                        resume: None,
                        limit,
                    },
                    version_after,
                )
                .map_err(|e| from_node(e.into()))?
        };
        let mut versions = Vec::new();
        let mut markers = Vec::new();
        let mut prefixes = Vec::new();
        let mut next: Option<(String, Option<String>)> = None;
        for entry in listing.entries {
            match entry {
                ListedVersion::CommonPrefix(p) => {
                    next = Some((String::from_utf8_lossy(&p).into_owned(), None));
                    prefixes.push(CommonPrefix {
                        prefix: Some(listed_text(&p, url)),
                    });
                }
                ListedVersion::Version {
                    key,
                    bucket: stored_in,
                    index,
                    version,
                    is_latest,
                } => {
                    next = Some((
                        String::from_utf8_lossy(&key).into_owned(),
                        Some(version_id(index)),
                    ));
                    match version {
                        // The store leaves removed versions out.
                        ObjectVersion::Removed { .. } => {}
                        ObjectVersion::DeleteMarker => markers.push(DeleteMarkerEntry {
                            is_latest: Some(is_latest),
                            key: Some(listed_text(&key, url)),
                            last_modified: None,
                            owner: Some(caller.owner()),
                            version_id: Some(version_id(index)),
                        }),
                        ObjectVersion::Object { record, .. } => {
                            let r: rec::ObjectRecord = self.store.open_from(
                                &bucket,
                                stored_in,
                                &record,
                                &key,
                                |r: &rec::ObjectRecord| &r.key,
                            )?;
                            versions.push(s3s::dto::ObjectVersion {
                                key: Some(listed_text(&key, url)),
                                version_id: Some(version_id(index)),
                                is_latest: Some(is_latest),
                                size: Some(r.size as i64),
                                e_tag: Some(ETag::Strong(r.etag)),
                                last_modified: Some(timestamp(r.modified_ms)),
                                owner: Some(caller.owner()),
                                storage_class: Some(ObjectVersionStorageClass::from_static(
                                    ObjectVersionStorageClass::STANDARD,
                                )),
                                ..Default::default()
                            });
                        }
                    }
                }
            }
        }
        let (next_key, next_version) = match next.filter(|_| listing.truncated) {
            Some((k, v)) => (Some(if url { url_encode(&k) } else { k }), v),
            None => (None, None),
        };
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            key_marker: input.key_marker,
            version_id_marker: input.version_id_marker,
            max_keys: Some(limit as i32),
            is_truncated: Some(listing.truncated),
            next_key_marker: next_key,
            next_version_id_marker: next_version,
            versions: Some(versions),
            delete_markers: Some(markers),
            common_prefixes: Some(prefixes),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            request_charged: None,
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.create_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.put_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.put_part_copy(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.complete_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.abort_upload(req).await
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        self.list_uploads(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.list_upload_parts(req).await
    }
}

impl Gateway {
    /// Deletes `key` (a delete marker) or, with a version id, that one
    /// version.
    async fn delete_one(
        &self,
        bucket: &BucketRef,
        key: &str,
        version: Option<&str>,
    ) -> S3Result<DeleteObjectOutput> {
        if let Some(index) = parse_version(version)? {
            if let Some(base) = bucket.writable_base()
                && index <= base.index
            {
                return Err(access_denied(format!(
                    "version {} of {key:?} is part of the bucket this clone was made from, \
                     which the clone cannot change; delete the key without a version id \
                     to hide it in the clone",
                    version_id(index)
                )));
            }
            let kind = pb::command::Kind::DeleteObjectVersion(pb::DeleteObjectVersion {
                bucket: bucket.id.0,
                key: key.as_bytes().to_vec().into(),
                index: index.0,
            });
            let (_, applied) = bucket.group.propose(kind).await.map_err(|e| match e {
                R::Rejected {
                    rejection: J::VersionNotFound { .. },
                    ..
                } => S3Error::with_message(
                    S3ErrorCode::NoSuchVersion,
                    format!("no such version of {key:?}"),
                ),
                e => from_node(e.into()),
            })?;
            let was_marker = matches!(
                applied,
                lifeboat_replication::Applied::VersionDeleted {
                    delete_marker: true
                }
            );
            return Ok(DeleteObjectOutput {
                delete_marker: was_marker.then_some(true),
                version_id: Some(version_id(index)),
                request_charged: None,
            });
        }
        let kind = pb::command::Kind::DeleteObject(pb::DeleteObject {
            bucket: bucket.id.0,
            key: key.as_bytes().to_vec().into(),
        });
        let index = self.store.propose(bucket, kind).await?;
        Ok(DeleteObjectOutput {
            delete_marker: Some(true),
            version_id: Some(version_id(index)),
            request_charged: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_trailers_name_exactly_their_checksums() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "x-amz-trailer",
            "X-Amz-Checksum-CRC32C, x-amz-checksum-sha256"
                .parse()
                .unwrap(),
        );
        let w = wanted_checksums(&headers, &SentChecksums::default());
        assert!(w.crc32c && w.sha256);
        assert!(!w.crc32 && !w.sha1 && !w.crc64nvme);
        let sent = SentChecksums {
            crc32: Some("AAAAAA==".into()),
            ..Default::default()
        };
        let w = wanted_checksums(&hyper::HeaderMap::new(), &sent);
        assert!(w.crc32 && !w.crc32c);
    }

    #[test]
    fn version_ids_and_url_encoding() {
        assert_eq!(parse_version(None).unwrap(), None);
        assert_eq!(parse_version(Some("null")).unwrap(), None);
        assert_eq!(parse_version(Some("42")).unwrap(), Some(LogIndex(42)));
        for bad in ["0", "-1", "abc", ""] {
            assert!(parse_version(Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(url_encode("a b/ü+~"), "a%20b/%C3%BC%2B~");
    }

    #[test]
    fn preconditions_follow_s3_order() {
        let record = rec::ObjectRecord {
            etag: "abc".into(),
            modified_ms: 10_000_000,
            ..Default::default()
        };
        let tag = |t: &str| ETagCondition::ETag(ETag::Strong(t.into()));
        let at = |s: i64| timestamp(s * 1000);
        let code = |r: S3Result<()>| r.err().map(|e| e.code().as_str().to_owned());
        assert_eq!(
            code(check_preconditions(
                &record,
                Some(&tag("abc")),
                None,
                None,
                None
            )),
            None
        );
        assert_eq!(
            code(check_preconditions(
                &record,
                Some(&tag("x")),
                None,
                None,
                None
            ))
            .as_deref(),
            Some("PreconditionFailed")
        );
        // If-Match true wins over a failing If-Unmodified-Since.
        assert_eq!(
            code(check_preconditions(
                &record,
                Some(&tag("abc")),
                None,
                None,
                Some(&at(1))
            )),
            None
        );
        assert_eq!(
            code(check_preconditions(&record, None, None, None, Some(&at(1)))).as_deref(),
            Some("PreconditionFailed")
        );
        assert_eq!(
            code(check_preconditions(
                &record,
                None,
                Some(&tag("abc")),
                None,
                None
            ))
            .as_deref(),
            Some("NotModified")
        );
        // If-None-Match false wins over If-Modified-Since.
        assert_eq!(
            code(check_preconditions(
                &record,
                None,
                Some(&tag("x")),
                Some(&at(20_000)),
                None
            )),
            None
        );
        assert_eq!(
            code(check_preconditions(
                &record,
                None,
                None,
                Some(&at(20_000)),
                None
            ))
            .as_deref(),
            Some("NotModified")
        );
        assert_eq!(
            code(check_preconditions(&record, None, None, Some(&at(1)), None)),
            None
        );
    }
}
