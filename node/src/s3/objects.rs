//! The object data path under the S3 gateway: bodies cut into chunks of at
//! most 1 MiB, each sealed by the frame codec (bound to tenant, PG and a
//! random chunk id) and replicated through the bucket's PG; records sealed
//! the same way; reads streamed chunk by chunk, so neither direction ever
//! holds more than a few chunks of an object in memory.
//!
//! Writes of one chunk travel in the entry that creates the object (or
//! part). Larger bodies are a *stream*: one `WriteChunks` entry per chunk,
//! up to `s3.chunks_in_flight_max` in flight, then the entry that names
//! them all; a body that fails midway releases its stream.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, stream::FuturesUnordered};
use lifeboat_proto::objects as rec;
use lifeboat_proto::raft as pb;
use lifeboat_replication::ProtectionGroup;
use lifeboat_store::frame::{FrameAad, frame_key_id};
use lifeboat_store::keyring::TenantKeys;
use lifeboat_store::masks;
use lifeboat_store::objects::{BucketBase, BucketLayer, ObjectVersion};
use lifeboat_store::{BucketId, ChunkId, LogIndex, PgId, TenantId};
use prost::Message;
use s3s::S3Error;
use s3s::crypto::{Checksum as _, Md5};
use s3s::dto::StreamingBlob;

use super::errors::{from_node, internal};
use crate::core::NodeCore;

/// Plain bytes per chunk (the last chunk of an object may be shorter).
pub const CHUNK_BYTES: usize = 1 << 20;

/// A bucket resolved for one request: whose it is and where it lives.
#[derive(Clone)]
pub struct BucketRef {
    pub tenant: String,
    pub tenant_id: TenantId,
    pub name: String,
    pub pg: PgId,
    pub id: BucketId,
    pub group: ProtectionGroup,
    /// A clone shows another bucket as it was at an index: a read-only
    /// one nothing else (apply refuses writes to `id`), a writable one
    /// its own writes over it.
    pub base: Option<BucketBase>,
    /// What reads go through: the bucket itself, unmasked, unless it is a
    /// clone or a restore masked it (see [`BucketLayer`]).
    pub layers: Vec<BucketLayer>,
}

impl BucketRef {
    /// Works out [`BucketRef::layers`] from the PG's masks as they are now.
    /// A bucket that is no clone is its own only layer: its record, just
    /// read, is not read again on every request.
    pub fn read_layers(&mut self, core: &NodeCore) -> lifeboat_store::Result<()> {
        let all = masks::masks(&core.db, self.pg)?;
        self.layers = match self.base {
            None => vec![BucketLayer {
                pg: None,
                bucket: self.id,
                spans: masks::spans(&all, |m| m.covers_bucket(self.id), None),
            }],
            Some(_) => core.objects.layers(self.pg, self.id, None, &all)?,
        };
        Ok(())
    }

    /// The bucket whose key space listing positions are in.
    pub fn read_id(&self) -> BucketId {
        self.layers.first().map_or(self.id, |l| l.bucket)
    }

    /// A writable clone's base, whose versions the clone cannot change.
    pub fn writable_base(&self) -> Option<BucketBase> {
        self.base.filter(|b| b.writable)
    }

    /// A drill's clone: its base is in the drill's source PG, which apply
    /// does not read (a create-only write is checked here against it).
    pub fn over_other_pg(&self) -> bool {
        self.base.is_some_and(|b| b.pg.is_some())
    }

    /// The PG that the versions a read found in bucket `stored_in` (one of
    /// its layers; bucket ids are the cluster's) are stored in.
    pub fn pg_of(&self, stored_in: BucketId) -> PgId {
        self.layers
            .iter()
            .find(|l| l.bucket == stored_in)
            .map_or(self.pg, |l| l.pg_in(self.pg))
    }

    /// Records stored in bucket `stored_in` are bound to it and its PG.
    fn record_aad(&self, stored_in: BucketId) -> FrameAad {
        FrameAad::Record {
            tenant: self.tenant_id,
            pg: self.pg_of(stored_in),
            bucket: stored_in.0,
        }
    }

    /// Chunks are bound to the PG they are stored in.
    fn chunk_aad(&self, pg: PgId, chunk: u64) -> FrameAad {
        FrameAad::Chunk {
            tenant: self.tenant_id,
            pg,
            chunk,
        }
    }
}

/// An object version found by a read.
pub struct Found {
    /// The bucket it is stored in (a clone's base, for one from before the
    /// clone), and that bucket's PG (a drill's source, for a drill's base).
    pub bucket: BucketId,
    pub pg: PgId,
    pub index: LogIndex,
    pub chunks: Vec<ChunkId>,
    pub record: rec::ObjectRecord,
}

/// A body written as chunks, not yet named by any entry.
pub struct WrittenBody {
    pub size: u64,
    /// Hex MD5 of the body.
    pub md5: [u8; 16],
    pub checksums: rec::Checksums,
    pub chunk_ids: Vec<u64>,
    pub chunk_sizes: Vec<u64>,
    /// A body of at most one chunk: its frame goes in the naming entry.
    pub inline: Vec<pb::ChunkWrite>,
    /// A larger body: the stream holding its chunks (0 when inline).
    pub stream: u64,
}

/// Which checksums the client asked the gateway to verify (from headers
/// or announced trailers); the rest are not computed.
#[derive(Clone, Debug, Default)]
pub struct WantedChecksums {
    pub crc32: bool,
    pub crc32c: bool,
    pub sha1: bool,
    pub sha256: bool,
    pub crc64nvme: bool,
}

impl WantedChecksums {
    fn hasher(&self) -> s3s::checksum::ChecksumHasher {
        use s3s::crypto::{Crc32, Crc32c, Crc64Nvme, Sha1, Sha256};
        s3s::checksum::ChecksumHasher {
            crc32: self.crc32.then(Crc32::new),
            crc32c: self.crc32c.then(Crc32c::new),
            sha1: self.sha1.then(Sha1::new),
            sha256: self.sha256.then(Sha256::new),
            crc64nvme: self.crc64nvme.then(Crc64Nvme::new),
        }
    }
}

#[derive(Clone)]
pub struct ObjectStore {
    core: Arc<NodeCore>,
}

impl ObjectStore {
    pub fn new(core: Arc<NodeCore>) -> ObjectStore {
        ObjectStore { core }
    }

    pub fn core(&self) -> &Arc<NodeCore> {
        &self.core
    }

    fn keys(&self, bucket: &BucketRef, frame: Option<&[u8]>) -> Result<Arc<TenantKeys>, S3Error> {
        let needed = frame.and_then(|f| frame_key_id(f).ok());
        self.core
            .tenant_keys(&bucket.tenant, needed)
            .map_err(from_node)
    }

    /// Seals a record to be stored in `bucket` (object, upload or part).
    pub fn seal(&self, bucket: &BucketRef, record: &impl Message) -> Result<Bytes, S3Error> {
        let keys = self.keys(bucket, None)?;
        let plain = record.encode_to_vec();
        Ok(Bytes::from(self.core.codec.encode(
            keys.current(),
            &bucket.record_aad(bucket.id),
            &plain,
        )))
    }

    /// Opens a sealed record stored in `bucket` and checks it names `key`.
    pub fn open<M: Message + Default>(
        &self,
        bucket: &BucketRef,
        sealed: &[u8],
        key: &[u8],
        key_of: impl Fn(&M) -> &[u8],
    ) -> Result<M, S3Error> {
        self.open_from(bucket, bucket.id, sealed, key, key_of)
    }

    /// Opens a sealed record that a read of `bucket` found stored in
    /// `stored_in` (itself, or a base of a clone).
    pub fn open_from<M: Message + Default>(
        &self,
        bucket: &BucketRef,
        stored_in: BucketId,
        sealed: &[u8],
        key: &[u8],
        key_of: impl Fn(&M) -> &[u8],
    ) -> Result<M, S3Error> {
        let keys = self.keys(bucket, Some(sealed))?;
        let plain = self
            .core
            .codec
            .decode(&keys, &bucket.record_aad(stored_in), sealed)
            .map_err(|e| {
                self.core.metrics.corrupt_frames.inc();
                internal("a stored object record does not open", e)
            })?;
        let record = M::decode(plain.as_slice())
            .map_err(|e| internal("a stored object record does not decode", e))?;
        if key_of(&record) != key {
            return Err(internal(
                "a stored object record belongs to another key",
                String::from_utf8_lossy(key),
            ));
        }
        Ok(record)
    }

    /// Waits until this node's replica of the bucket's PG has everything
    /// committed when the read began (linearizable reads on any node).
    pub async fn read_point(&self, bucket: &BucketRef) -> Result<(), S3Error> {
        bucket
            .group
            .read_barrier()
            .await
            .map(|_| ())
            .map_err(|e| from_node(e.into()))
    }

    /// The live version of `key` (at `version` when given, which may name
    /// an older version, or in a clone one of its base's; `None` if that
    /// version is a delete marker or does not exist).
    pub fn find(
        &self,
        bucket: &BucketRef,
        key: &[u8],
        version: Option<LogIndex>,
    ) -> Result<Option<Found>, S3Error> {
        let objects = &self.core.objects;
        let found = match version {
            None => objects.find_layered(bucket.pg, &bucket.layers, key),
            Some(wanted) => self.version_by_id(bucket, key, wanted),
        }
        .map_err(|e| from_node(e.into()))?;
        let Some((stored_in, index, ObjectVersion::Object { chunks, record })) = found else {
            return Ok(None);
        };
        let record = self.open_from(bucket, stored_in, &record, key, |r: &rec::ObjectRecord| {
            &r.key
        })?;
        Ok(Some(Found {
            bucket: stored_in,
            pg: bucket.pg_of(stored_in),
            index,
            chunks,
            record,
        }))
    }

    /// The version of `key` whose id is `wanted`, in the layer that holds
    /// it: any version of the bucket's own history, masked or not; in a
    /// base, only those of the cloned moment, as they were then (one
    /// removed by id since is still there).
    fn version_by_id(
        &self,
        bucket: &BucketRef,
        key: &[u8],
        wanted: LogIndex,
    ) -> lifeboat_store::Result<Option<(BucketId, LogIndex, ObjectVersion)>> {
        for layer in &bucket.layers {
            let at = layer.at();
            if at.is_some_and(|at| wanted > at) {
                continue;
            }
            let found = self
                .core
                .objects
                .version_at(layer.pg_in(bucket.pg), layer.bucket, key, wanted)?
                .filter(|(index, _)| *index == wanted);
            if let Some((index, version)) = found {
                let version = match version {
                    ObjectVersion::Removed {
                        at: removed,
                        original,
                    } if at.is_some_and(|at| removed > at) => *original,
                    version => version,
                };
                return Ok(Some((layer.bucket, index, version)));
            }
        }
        Ok(None)
    }

    /// Proposes in the bucket's PG.
    pub async fn propose(
        &self,
        bucket: &BucketRef,
        kind: pb::command::Kind,
    ) -> Result<LogIndex, S3Error> {
        bucket
            .group
            .propose(kind)
            .await
            .map(|(index, _)| index)
            .map_err(|e| from_node(e.into()))
    }

    /// Drops a stream's references after a failed write (best effort: a
    /// stream nobody releases is an orphan for the sweep).
    pub async fn release(&self, bucket: &BucketRef, stream: u64) {
        if stream == 0 {
            return;
        }
        let kind = pb::command::Kind::ReleaseStream(pb::ReleaseStream { stream });
        if let Err(e) = bucket.group.propose(kind).await {
            tracing::warn!(stream, error = %e, "could not release an abandoned upload stream");
        }
    }

    /// Reads `body` to its end, cutting it into sealed chunks and writing
    /// all but a lone chunk ahead as a stream. Returns what the naming
    /// entry needs. On failure nothing stays referenced.
    pub async fn write_body(
        &self,
        bucket: &BucketRef,
        body: Option<StreamingBlob>,
        wanted: &WantedChecksums,
    ) -> Result<WrittenBody, S3Error> {
        self.core.check_reserve().map_err(|e| from_node(e.into()))?;
        self.core
            .check_quota(bucket.group.pg())
            .map_err(from_node)?;
        let stream = rand::random::<u64>() | 1;
        let mut writer = BodyWriter {
            store: self,
            bucket,
            stream,
            keys: self.keys(bucket, None)?,
            md5: Md5::new(),
            hasher: wanted.hasher(),
            sealing: None,
            in_flight: FuturesUnordered::new(),
            streamed: false,
            written: WrittenBody {
                size: 0,
                md5: [0; 16],
                checksums: rec::Checksums::default(),
                chunk_ids: Vec::new(),
                chunk_sizes: Vec::new(),
                inline: Vec::new(),
                stream: 0,
            },
        };
        match writer.run(body).await {
            Ok(()) => Ok(writer.written),
            Err(e) => {
                // Let what is in flight land before releasing, so no
                // chunk is written after its stream was released.
                while writer.in_flight.next().await.is_some() {}
                if writer.streamed {
                    self.release(bucket, stream).await;
                }
                Err(e)
            }
        }
    }

    /// A stream of the plain bytes `range` of an object (within its size).
    ///
    /// The first chunk is read and checked before this returns, so a
    /// corrupt or missing first chunk is an error the client gets as such
    /// (`InternalError`); a later bad chunk can only cut the body short,
    /// which the client sees against the Content-Length it was promised.
    pub async fn read_range(
        &self,
        bucket: &BucketRef,
        found: &Found,
        range: std::ops::Range<u64>,
    ) -> Result<StreamingBlob, S3Error> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        let mut plan = Vec::new();
        let mut chunk_start = 0u64;
        for (id, size) in found.chunks.iter().zip(&found.record.chunk_sizes) {
            let chunk_end = chunk_start + size;
            if chunk_end > range.start && chunk_start < range.end {
                let from = range.start.saturating_sub(chunk_start) as usize;
                let to = (range.end.min(chunk_end) - chunk_start) as usize;
                plan.push((*id, *size, from..to));
            }
            chunk_start = chunk_end;
        }
        let mut plan = plan.into_iter();
        if let Some((id, size, slice)) = plan.next() {
            let first = self.read_chunk(bucket, found.pg, id, size).await?;
            tx.send(Ok(first.slice(slice)))
                .await
                .expect("the receiver is still here");
        }
        let store = self.clone();
        let bucket = bucket.clone();
        let pg = found.pg;
        tokio::spawn(async move {
            for (id, size, slice) in plan {
                let read = store.read_chunk(&bucket, pg, id, size).await;
                let item = read.map(|plain| plain.slice(slice)).map_err(|e| {
                    std::io::Error::other(format!("chunk {} of an object: {e}", id.0))
                });
                let failed = item.is_err();
                // The client went away, or the body has to stop here.
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(StreamingBlob::wrap(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    /// One chunk's plain bytes, checked against the size its record gives
    /// (stored in `pg`: the bucket's, or a drill's source).
    pub async fn read_chunk(
        &self,
        bucket: &BucketRef,
        pg: PgId,
        chunk: ChunkId,
        size: u64,
    ) -> Result<Bytes, S3Error> {
        let frame = self
            .core
            .objects
            .chunk(pg, chunk)
            .map_err(|e| from_node(e.into()))?
            .ok_or_else(|| internal("an object's chunk is missing", chunk.0))?;
        let keys = self.keys(bucket, Some(&frame))?;
        let core = self.core.clone();
        let aad = bucket.chunk_aad(pg, chunk.0);
        let plain = tokio::task::spawn_blocking(move || core.codec.decode(&keys, &aad, &frame))
            .await
            .map_err(|e| internal("decode a chunk", e))?
            .map_err(|e| {
                self.core.metrics.corrupt_frames.inc();
                tracing::error!(
                    code = "store.corrupt_frame",
                    tenant = bucket.tenant,
                    bucket = bucket.name,
                    pg = pg.0,
                    chunk = chunk.0,
                    "an object's chunk does not open: {e}"
                );
                internal("an object's chunk does not open", e)
            })?;
        if plain.len() as u64 != size {
            return Err(internal(
                "an object's chunk has another size than its record says",
                chunk.0,
            ));
        }
        Ok(Bytes::from(plain))
    }
}

/// A chunk being sealed on a blocking thread: its id, and the task that
/// gives back the frame.
type Sealing = (u64, tokio::task::JoinHandle<Vec<u8>>);

struct BodyWriter<'a> {
    store: &'a ObjectStore,
    bucket: &'a BucketRef,
    stream: u64,
    keys: Arc<TenantKeys>,
    /// The body's hashes so far (ETag and the checksums asked for), fed
    /// each piece as it arrives, while it is still in the CPU's cache: at
    /// sixteen uploads at once, hashing whole chunks later read each one
    /// back from memory.
    md5: Md5,
    hasher: s3s::checksum::ChecksumHasher,
    /// The last chunk read, sealing while the next one is read.
    sealing: Option<Sealing>,
    /// Chunk entries being replicated, as tasks: they progress while the
    /// next chunk is read from the client.
    in_flight: FuturesUnordered<tokio::task::JoinHandle<Result<LogIndex, S3Error>>>,
    streamed: bool,
    written: WrittenBody,
}

impl<'a> BodyWriter<'a> {
    async fn run(&mut self, body: Option<StreamingBlob>) -> Result<(), S3Error> {
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
        if let Some(mut body) = body {
            while let Some(piece) = body.next().await {
                let mut piece = piece.map_err(|e| {
                    let mut err = S3Error::with_message(
                        s3s::S3ErrorCode::IncompleteBody,
                        "the request body ended early or did not check out",
                    );
                    err.set_source(e);
                    err
                })?;
                self.md5.update(&piece);
                self.hasher.update(&piece);
                while !piece.is_empty() {
                    let take = (CHUNK_BYTES - buf.len()).min(piece.len());
                    buf.extend_from_slice(&piece.split_to(take));
                    if buf.len() == CHUNK_BYTES {
                        let chunk = buf.split().freeze();
                        buf.reserve(CHUNK_BYTES);
                        self.push(chunk).await?;
                    }
                }
            }
        }
        if !buf.is_empty() {
            self.push(buf.freeze()).await?;
        }
        if let Some(last) = self.sealing.take() {
            self.place(last, false).await?;
        }
        while let Some(done) = self.in_flight.next().await {
            joined(done)?;
        }
        if self.streamed {
            self.written.stream = self.stream;
        }
        self.written.md5 = std::mem::take(&mut self.md5).finalize();
        let sums = std::mem::take(&mut self.hasher).finalize();
        self.written.checksums = rec::Checksums {
            crc32: sums.checksum_crc32.unwrap_or_default(),
            crc32c: sums.checksum_crc32c.unwrap_or_default(),
            sha1: sums.checksum_sha1.unwrap_or_default(),
            sha256: sums.checksum_sha256.unwrap_or_default(),
            crc64nvme: sums.checksum_crc64nvme.unwrap_or_default(),
        };
        Ok(())
    }

    /// Starts sealing one chunk off the async threads, once the chunk
    /// before it is placed; the body's next chunk is read meanwhile.
    async fn push(&mut self, plain: Bytes) -> Result<(), S3Error> {
        if let Some(previous) = self.sealing.take() {
            self.place(previous, true).await?;
        }
        let chunk = loop {
            let id = rand::random::<u64>();
            if id != 0 {
                break id;
            }
        };
        let keys = self.keys.clone();
        let core = self.store.core.clone();
        let aad = self.bucket.chunk_aad(self.bucket.pg, chunk);
        self.written.size += plain.len() as u64;
        self.written.chunk_ids.push(chunk);
        self.written.chunk_sizes.push(plain.len() as u64);
        let task =
            tokio::task::spawn_blocking(move || core.codec.encode(keys.current(), &aad, &plain));
        self.sealing = Some((chunk, task));
        Ok(())
    }

    /// Waits for a chunk's seal, takes the hash states back, and places
    /// the frame: inline in the naming entry when it is the body's only
    /// chunk, else in a stream entry.
    async fn place(&mut self, (chunk, task): Sealing, more_follow: bool) -> Result<(), S3Error> {
        let frame = task.await.map_err(|e| internal("seal a chunk", e))?;
        let write = pb::ChunkWrite {
            chunk,
            frame: Bytes::from(frame),
        };
        if !more_follow && !self.streamed {
            self.written.inline.push(write);
            return Ok(());
        }
        self.send(write).await
    }

    async fn send(&mut self, write: pb::ChunkWrite) -> Result<(), S3Error> {
        while self.in_flight.len() >= self.store.core.config.s3.chunks_in_flight_max {
            if let Some(done) = self.in_flight.next().await {
                joined(done)?;
            }
        }
        self.streamed = true;
        let kind = pb::command::Kind::WriteChunks(pb::WriteChunks {
            stream: self.stream,
            chunks: vec![write],
        });
        let store = self.store.clone();
        let bucket = self.bucket.clone();
        self.in_flight.push(tokio::spawn(
            async move { store.propose(&bucket, kind).await },
        ));
        Ok(())
    }
}

/// A chunk entry's outcome from its task.
fn joined(
    done: Result<Result<LogIndex, S3Error>, tokio::task::JoinError>,
) -> Result<LogIndex, S3Error> {
    done.map_err(|e| internal("a chunk write task failed", e))?
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn timestamp(ms: i64) -> s3s::dto::Timestamp {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    s3s::dto::Timestamp::from(t)
}

pub fn timestamp_ms(t: &s3s::dto::Timestamp) -> i64 {
    let t: time::OffsetDateTime = t.clone().into();
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}
