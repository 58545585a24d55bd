//! The frame codec: how a block or an object chunk is stored, replicated and
//! logged — zstd (when it pays), then AES-256-GCM, then CRC-32.
//!
//! Owns the frame byte layout, the compression decision, the per-frame key
//! derivation and the associated data ([`FrameAad`]) that binds a frame to
//! its place. Must not know where frames are stored, RocksDB, Raft, or how
//! DEKs are kept ([`crate::keyring`] owns them).
//!
//! # Layout (version 1)
//!
//! ```text
//!  0       1       2               6                   22              34              len-4     len
//!  +-------+-------+---------------+-------------------+---------------+---------------+---------+
//!  |version| flags | key_id u32 BE | salt [16]         | nonce [12]    | ciphertext +  | crc32   |
//!  | (= 1) |       |               |                   |               | GCM tag [16]  | u32 BE  |
//!  +-------+-------+---------------+-------------------+---------------+---------------+---------+
//!  |<---------------------- header: FRAME_HEADER_BYTES = 34 ---------->|
//! ```
//!
//! - `flags` bit 0: the payload is zstd-compressed. Every other bit must be
//!   zero; a frame with an unknown flag is refused, never guessed at.
//! - `key_id`: the tenant DEK that sealed the frame ([`crate::keyring::TenantKeys`]
//!   keeps old DEKs readable after a rotation).
//! - Frame key = HKDF-SHA256(ikm = DEK, salt = the frame's salt,
//!   info = `b"lifeboat frame v1"`), so each frame has its own AES key and no
//!   key approaches AES-GCM's 2^32 random-nonce limit.
//! - Associated data = [`FrameAad`] bytes, then the header bytes: a frame moved
//!   to another block, volume, PG, chunk or tenant fails, and so does any
//!   header edit. It cannot bind the version (log index): a storage operator
//!   could replay an older version of the same block.
//! - `crc32` (crc32fast, IEEE) covers every byte before it. It detects
//!   corruption cheaply and before any key is needed (scrubbers, replicas
//!   without a tenant's keys); the GCM tag is what detects tampering.
//!
//! Changing the layout, the HKDF info, the [`FrameAad`] encoding or the flag
//! meanings makes every stored block, chunk and Raft log entry unreadable, on
//! every node and in every exported archive: add a new version byte and keep
//! decoding version 1 instead.
//!
//! # Invariants
//!
//! - Invariant: a frame decodes to at most [`FRAME_PLAINTEXT_BYTES_MAX`] bytes;
//!   decompression is bounded by that capacity, never streamed unbounded.
//! - Invariant: the compressed flag is set only when the compressed payload is
//!   at least 1/8 smaller than the plaintext, so the stored payload is never
//!   larger than the plaintext.
//! - Decoding never panics on any input; every malformed frame is a
//!   [`FrameError`].

use hkdf::Hkdf;
use rand::RngCore;
use rand::rngs::OsRng;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, MAX_TAG_LEN, NONCE_LEN, Nonce, Tag, UnboundKey};
use sha2::Sha256;

use crate::ids::{BlockNo, KeyId, PgId, TenantId, VolumeId};
use crate::keyring::{Dek, KEY_BYTES, TenantKeys};

/// The only frame layout version written and read.
pub const FRAME_VERSION: u8 = 1;

pub const FRAME_VERSION_BYTES: usize = 1;
pub const FRAME_FLAGS_BYTES: usize = 1;
pub const FRAME_KEY_ID_BYTES: usize = 4;
pub const FRAME_SALT_BYTES: usize = 16;
pub const FRAME_NONCE_BYTES: usize = 12;
/// version, flags, key id, salt, nonce: everything before the ciphertext.
pub const FRAME_HEADER_BYTES: usize = FRAME_VERSION_BYTES
    + FRAME_FLAGS_BYTES
    + FRAME_KEY_ID_BYTES
    + FRAME_SALT_BYTES
    + FRAME_NONCE_BYTES;
pub const FRAME_TAG_BYTES: usize = 16;
pub const FRAME_CRC_BYTES: usize = 4;
/// Bytes a frame adds to its (possibly compressed) payload; also the length
/// of the shortest frame (an empty payload).
pub const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + FRAME_TAG_BYTES + FRAME_CRC_BYTES;

/// The most plaintext one frame holds: an object chunk (at most 1 MiB) plus
/// a 64 KiB margin, so a caller that adds a small header of its own to a full
/// chunk still fits. Decompression is capped here.
pub const FRAME_PLAINTEXT_BYTES_MAX: usize = (1 << 20) + (64 << 10);
/// The longest valid frame: stored payloads are never longer than their
/// plaintext (see the invariants).
pub const FRAME_BYTES_MAX: usize = FRAME_OVERHEAD_BYTES + FRAME_PLAINTEXT_BYTES_MAX;

const OFFSET_FLAGS: usize = FRAME_VERSION_BYTES;
const OFFSET_KEY_ID: usize = OFFSET_FLAGS + FRAME_FLAGS_BYTES;
const OFFSET_SALT: usize = OFFSET_KEY_ID + FRAME_KEY_ID_BYTES;
const OFFSET_NONCE: usize = OFFSET_SALT + FRAME_SALT_BYTES;

const _: () = assert!(FRAME_HEADER_BYTES == 34);
const _: () = assert!(OFFSET_NONCE + FRAME_NONCE_BYTES == FRAME_HEADER_BYTES);
const _: () = assert!(FRAME_OVERHEAD_BYTES == 54);
const _: () = assert!(FRAME_NONCE_BYTES == NONCE_LEN);
const _: () = assert!(FRAME_TAG_BYTES == MAX_TAG_LEN);
const _: () = assert!(FRAME_PLAINTEXT_BYTES_MAX >= (1 << 20) + crate::ids::BLOCK_BYTES);

/// Flag bit 0: the payload is zstd-compressed.
pub const FLAG_COMPRESSED: u8 = 0b0000_0001;
/// Every flag bit this version understands.
const FLAGS_KNOWN: u8 = FLAG_COMPRESSED;

/// HKDF info for per-frame keys.
const FRAME_HKDF_INFO: &[u8] = b"lifeboat frame v1";

/// Inputs shorter than this are compressed whole to decide; longer ones are
/// sampled first: compressing 1 MiB of random data only to throw it away
/// would waste ~3 ms of CPU, and compressing a random 4 KiB block whole was
/// about 40% of its encode (codec benchmark, BENCHMARKS.md, 2026-12-04).
const COMPRESS_SAMPLE_INPUT_BYTES_MIN: usize = 2 << 10;
/// The sample is stripes of this size spread evenly over the input, so a
/// block whose head is random and whose tail is zeros (a file's last block)
/// still samples as compressible.
const COMPRESS_STRIPE_BYTES: usize = 256;
/// Stripes sampled from inputs up to 8 KiB (a 1 KiB sample of a 4 KiB
/// block), and from larger ones (4 KiB of a chunk).
const COMPRESS_STRIPES_SMALL: usize = 4;
const COMPRESS_STRIPES_LARGE: usize = 16;
const COMPRESS_SMALL_INPUT_BYTES_MAX: usize = 8 << 10;

/// FrameAad tag bytes: never reuse or renumber one (see the layout note).
const AAD_TAG_BLOCK: u8 = 1;
const AAD_TAG_CHUNK: u8 = 2;
const AAD_TAG_RECORD: u8 = 3;
/// Longest FrameAad encoding: a block's tag and four u64s.
const FRAME_AAD_BYTES_MAX: usize = 1 + 4 * 8;

/// Where a frame belongs; bound into its associated data so a frame copied
/// or moved elsewhere fails to open.
///
/// Encoding (big-endian, fixed length per tag):
/// - `Block`: `1u8 | tenant u64 | pg u64 | volume u64 | block u64` (33 bytes)
/// - `Chunk`: `2u8 | tenant u64 | pg u64 | chunk u64` (25 bytes)
/// - `Record`: `3u8 | tenant u64 | pg u64 | bucket u64` (25 bytes)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameAad {
    /// A 4 KiB volume block.
    Block {
        tenant: TenantId,
        pg: PgId,
        volume: VolumeId,
        block: BlockNo,
    },
    /// An object data chunk.
    Chunk {
        tenant: TenantId,
        pg: PgId,
        chunk: u64,
    },
    /// A sealed object, upload or part record of a bucket. The record's
    /// plaintext names its object key, which readers check, so a record
    /// moved to another key of the same bucket is refused too.
    Record {
        tenant: TenantId,
        pg: PgId,
        bucket: u64,
    },
}

impl FrameAad {
    /// Appends the tagged big-endian encoding described on the type.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match *self {
            FrameAad::Block {
                tenant,
                pg,
                volume,
                block,
            } => {
                out.push(AAD_TAG_BLOCK);
                for field in [tenant.0, pg.0, volume.0, block.0] {
                    out.extend_from_slice(&field.to_be_bytes());
                }
            }
            FrameAad::Chunk { tenant, pg, chunk } => {
                out.push(AAD_TAG_CHUNK);
                for field in [tenant.0, pg.0, chunk] {
                    out.extend_from_slice(&field.to_be_bytes());
                }
            }
            FrameAad::Record { tenant, pg, bucket } => {
                out.push(AAD_TAG_RECORD);
                for field in [tenant.0, pg.0, bucket] {
                    out.extend_from_slice(&field.to_be_bytes());
                }
            }
        }
    }

    /// The encoding described on the type.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME_AAD_BYTES_MAX);
        self.encode_into(&mut out);
        out
    }
}

/// Why a frame did not decode. Every variant is a fact about the input.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame too short: {len} bytes, a frame has at least {FRAME_OVERHEAD_BYTES}")]
    TooShort { len: usize },
    #[error("frame has unknown version {version} (this build reads version {FRAME_VERSION})")]
    UnknownVersion { version: u8 },
    #[error("frame has unknown flags {flags:#010b}")]
    UnknownFlags { flags: u8 },
    #[error("frame CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("frame sealed with key id {key_id}, which the tenant does not have")]
    UnknownKey { key_id: KeyId },
    #[error("frame failed authentication (wrong key, wrong location or tampered)")]
    AuthenticationFailed,
    #[error("frame payload does not decompress: {reason}")]
    Decompress { reason: String },
    #[error(
        "frame too large: {len} bytes (frames hold at most {FRAME_PLAINTEXT_BYTES_MAX} plaintext bytes)"
    )]
    TooLarge { len: usize },
}

/// A frame's fields, after the length, CRC, version and flag checks.
struct ParsedFrame<'a> {
    flags: u8,
    key_id: KeyId,
    salt: &'a [u8; FRAME_SALT_BYTES],
    nonce: &'a [u8; FRAME_NONCE_BYTES],
    header: &'a [u8; FRAME_HEADER_BYTES],
    ciphertext: &'a [u8],
    tag: &'a [u8; FRAME_TAG_BYTES],
}

/// Checks everything that needs no key: length, CRC, version, flags.
///
/// The CRC is checked before the version so that a flipped bit anywhere,
/// version byte included, is reported as corruption.
fn parse(frame: &[u8]) -> Result<ParsedFrame<'_>, FrameError> {
    let len = frame.len();
    if len < FRAME_OVERHEAD_BYTES {
        return Err(FrameError::TooShort { len });
    }
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { len });
    }
    let (covered, crc) = frame.split_at(len - FRAME_CRC_BYTES);
    let stored = u32::from_be_bytes(array(crc));
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(FrameError::CrcMismatch { stored, computed });
    }
    let (header, sealed) = covered.split_at(FRAME_HEADER_BYTES);
    let header: &[u8; FRAME_HEADER_BYTES] = array_ref(header);
    let version = header[0];
    if version != FRAME_VERSION {
        return Err(FrameError::UnknownVersion { version });
    }
    let flags = header[OFFSET_FLAGS];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(FrameError::UnknownFlags { flags });
    }
    let (ciphertext, tag) = sealed.split_at(sealed.len() - FRAME_TAG_BYTES);
    Ok(ParsedFrame {
        flags,
        key_id: KeyId(u32::from_be_bytes(array(
            &header[OFFSET_KEY_ID..OFFSET_KEY_ID + FRAME_KEY_ID_BYTES],
        ))),
        salt: array_ref(&header[OFFSET_SALT..OFFSET_SALT + FRAME_SALT_BYTES]),
        nonce: array_ref(&header[OFFSET_NONCE..OFFSET_NONCE + FRAME_NONCE_BYTES]),
        header,
        ciphertext,
        tag: array_ref(tag),
    })
}

/// A slice whose length the layout constants fix, as an array. Panics only
/// on a bug in the offsets above, never on input.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    *array_ref(bytes)
}

fn array_ref<const N: usize>(bytes: &[u8]) -> &[u8; N] {
    bytes
        .try_into()
        .expect("slice length fixed by the frame layout constants")
}

/// The key id a frame was sealed with, after its length, CRC, version and
/// flag checks (no key is needed, and nothing is authenticated yet).
pub fn frame_key_id(frame: &[u8]) -> Result<KeyId, FrameError> {
    parse(frame).map(|parsed| parsed.key_id)
}

/// The AES-256-GCM cipher for one frame: its own key from the DEK and salt.
///
/// ring's AES-GCM rather than the `aes-gcm` crate's: the same algorithm and
/// bytes, but with its VAES/AVX2 code it seals several times faster on this
/// hardware (see BENCHMARKS.md "Frame codec"), and frames are the write
/// path's largest CPU cost after the page cache.
fn frame_cipher(dek: &Dek, salt: &[u8; FRAME_SALT_BYTES]) -> LessSafeKey {
    let mut key = [0u8; KEY_BYTES];
    Hkdf::<Sha256>::new(Some(salt), dek.secret_bytes())
        .expand(FRAME_HKDF_INFO, &mut key)
        .expect("HKDF-SHA256 can expand to 32 bytes");
    let cipher = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &key).expect("AES-256-GCM takes a 32-byte key"),
    );
    // Best effort, as in keyring: the key schedule inside `cipher` remains.
    key.fill(0);
    std::hint::black_box(&key);
    cipher
}

/// Associated data: the location, then the header.
fn associated_data(aad: &FrameAad, header: &[u8; FRAME_HEADER_BYTES]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_AAD_BYTES_MAX + FRAME_HEADER_BYTES);
    aad.encode_into(&mut out);
    out.extend_from_slice(header);
    out
}

/// The largest sample: [`COMPRESS_STRIPES_LARGE`] stripes.
const COMPRESS_SAMPLE_BYTES_MAX: usize = COMPRESS_STRIPES_LARGE * COMPRESS_STRIPE_BYTES;

/// Copies into `buf` the stripes of `plaintext` whose compression decides
/// whether the whole is worth compressing, and returns them. `plaintext` is
/// at least [`COMPRESS_SAMPLE_INPUT_BYTES_MIN`] long, so the stripes never
/// overlap. A buffer on the caller's stack: this runs for every frame.
fn compress_sample<'b>(plaintext: &[u8], buf: &'b mut [u8; COMPRESS_SAMPLE_BYTES_MAX]) -> &'b [u8] {
    let stripes = if plaintext.len() <= COMPRESS_SMALL_INPUT_BYTES_MAX {
        COMPRESS_STRIPES_SMALL
    } else {
        COMPRESS_STRIPES_LARGE
    };
    let last_start = plaintext.len() - COMPRESS_STRIPE_BYTES;
    for (i, out) in buf
        .chunks_exact_mut(COMPRESS_STRIPE_BYTES)
        .take(stripes)
        .enumerate()
    {
        let start = last_start * i / (stripes - 1);
        out.copy_from_slice(&plaintext[start..start + COMPRESS_STRIPE_BYTES]);
    }
    &buf[..stripes * COMPRESS_STRIPE_BYTES]
}

/// Whether a compressed form saves at least 1/8 of the original: smaller
/// savings do not pay for the decompression on every read.
fn saves_enough(original_bytes: usize, compressed_bytes: usize) -> bool {
    compressed_bytes <= original_bytes - original_bytes / 8
}

/// Encodes and decodes frames. Cheap to copy; holds only its settings.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    zstd_level: i32,
}

impl FrameCodec {
    /// A codec compressing at `zstd_level` (DESIGN: level 1 by default); 0
    /// means never compress (zstd's own meaning of 0, "default level", is
    /// not used).
    ///
    /// Panics if the level is outside zstd's range: config validation must
    /// have refused it.
    pub fn new(zstd_level: i32) -> FrameCodec {
        assert!(
            zstd::compression_level_range().contains(&zstd_level),
            "zstd level {zstd_level} outside {:?}",
            zstd::compression_level_range()
        );
        FrameCodec { zstd_level }
    }

    /// The configured zstd level (0: compression off).
    pub fn zstd_level(&self) -> i32 {
        self.zstd_level
    }

    /// The compressed form of `plaintext`, if compressing pays (see the
    /// invariants); `None` to store it as is.
    fn compress(&self, plaintext: &[u8]) -> Option<Vec<u8>> {
        if self.zstd_level == 0 {
            return None;
        }
        if plaintext.len() >= COMPRESS_SAMPLE_INPUT_BYTES_MIN {
            let mut buf = [0u8; COMPRESS_SAMPLE_BYTES_MAX];
            let sample = compress_sample(plaintext, &mut buf);
            let compressed = self.zstd(sample)?;
            if !saves_enough(sample.len(), compressed.len()) {
                return None;
            }
        }
        let compressed = self.zstd(plaintext)?;
        saves_enough(plaintext.len(), compressed.len()).then_some(compressed)
    }

    /// zstd's one-shot compression, which records the content size in the
    /// zstd frame header (decode relies on it to size its buffer). An error
    /// here (only an allocation failure inside zstd) just means "store
    /// uncompressed": the frame stays valid.
    ///
    /// Each thread keeps one compression context: making a context per call
    /// cost about 5% of a 1 MiB write in profiles (ZSTD_initCCtx).
    fn zstd(&self, input: &[u8]) -> Option<Vec<u8>> {
        let level = self.zstd_level;
        let result = COMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                *slot = Some((level, zstd::bulk::Compressor::new(level)?));
            }
            let (_, compressor) = slot.as_mut().expect("set just above");
            compressor.compress(input)
        });
        match result {
            Ok(compressed) => Some(compressed),
            Err(error) => {
                tracing::warn!(%error, "zstd compression failed; storing uncompressed");
                None
            }
        }
    }

    /// Seals `plaintext` for the place `aad` names, with `dek` (the tenant's
    /// current key).
    ///
    /// Panics if `plaintext` is longer than [`FRAME_PLAINTEXT_BYTES_MAX`]
    /// (callers split data into blocks and chunks), or if the OS random
    /// source fails.
    pub fn encode(&self, dek: &Dek, aad: &FrameAad, plaintext: &[u8]) -> Vec<u8> {
        assert!(
            plaintext.len() <= FRAME_PLAINTEXT_BYTES_MAX,
            "frame plaintext of {} bytes exceeds {FRAME_PLAINTEXT_BYTES_MAX}",
            plaintext.len()
        );
        match self.compress(plaintext) {
            Some(compressed) => seal(dek, aad, FLAG_COMPRESSED, &compressed),
            None => seal(dek, aad, 0, plaintext),
        }
    }

    /// Checks and opens a frame made by [`FrameCodec::encode`] for the same
    /// `aad`, with the tenant's key named in the frame.
    ///
    /// Any codec decodes any frame: the zstd level matters only to `encode`.
    pub fn decode(
        &self,
        keys: &TenantKeys,
        aad: &FrameAad,
        frame: &[u8],
    ) -> Result<Vec<u8>, FrameError> {
        let parsed = parse(frame)?;
        let dek = keys.get(parsed.key_id).ok_or(FrameError::UnknownKey {
            key_id: parsed.key_id,
        })?;
        let mut payload = parsed.ciphertext.to_vec();
        frame_cipher(dek, parsed.salt)
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*parsed.nonce),
                Aad::from(associated_data(aad, parsed.header)),
                Tag::from(*parsed.tag),
                &mut payload,
                0..,
            )
            .map_err(|_| FrameError::AuthenticationFailed)?;
        if parsed.flags & FLAG_COMPRESSED == 0 {
            return Ok(payload);
        }
        decompress(&payload)
    }
}

/// Builds a frame around `payload` (already compressed or not, as `flags`
/// says). Separate from `encode` so tests can seal payloads `encode` would
/// never produce.
fn seal(dek: &Dek, aad: &FrameAad, flags: u8, payload: &[u8]) -> Vec<u8> {
    // Salt and nonce come from the OS (`getrandom`) rather than rand's
    // user-space `thread_rng`: a node restored from a VM snapshot, or cloned,
    // would replay a user-space generator's state and repeat (salt, nonce)
    // pairs under the same DEK; the kernel reseeds on such events. One 28-byte
    // read per frame is small next to zstd and AES on the same frame.
    let mut frame = Vec::with_capacity(FRAME_OVERHEAD_BYTES + payload.len());
    frame.push(FRAME_VERSION);
    frame.push(flags);
    frame.extend_from_slice(&dek.key_id().0.to_be_bytes());
    // Salt and nonce sit side by side: one read fills both.
    frame.resize(FRAME_HEADER_BYTES, 0);
    OsRng.fill_bytes(&mut frame[OFFSET_SALT..FRAME_HEADER_BYTES]);
    let salt: [u8; FRAME_SALT_BYTES] = array(&frame[OFFSET_SALT..OFFSET_NONCE]);
    let nonce: [u8; FRAME_NONCE_BYTES] = array(&frame[OFFSET_NONCE..FRAME_HEADER_BYTES]);
    let aad_bytes = associated_data(aad, array_ref(&frame[..FRAME_HEADER_BYTES]));
    frame.extend_from_slice(payload);
    let tag = frame_cipher(dek, &salt)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad_bytes),
            &mut frame[FRAME_HEADER_BYTES..],
        )
        .expect("AES-GCM encrypts payloads far below its 64 GiB limit");
    frame.extend_from_slice(tag.as_ref());
    let crc = crc32fast::hash(&frame);
    frame.extend_from_slice(&crc.to_be_bytes());
    frame
}

/// Decompresses a payload, never producing more than
/// [`FRAME_PLAINTEXT_BYTES_MAX`] bytes.
///
/// The buffer is sized from the content size in the zstd frame header when
/// present (so a 4 KiB block does not allocate 1 MiB), else the maximum; the
/// bulk decompressor fails rather than grow past it.
fn decompress(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let capacity = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(content_bytes)) => {
            if content_bytes > FRAME_PLAINTEXT_BYTES_MAX as u64 {
                return Err(FrameError::TooLarge {
                    len: usize::try_from(content_bytes).unwrap_or(usize::MAX),
                });
            }
            content_bytes as usize
        }
        Ok(None) => FRAME_PLAINTEXT_BYTES_MAX,
        Err(_) => {
            return Err(FrameError::Decompress {
                reason: "payload is not a zstd frame".to_string(),
            });
        }
    };
    DECOMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            slot.as_mut()
                .expect("set just above")
                .decompress(payload, capacity)
        })
        .map_err(|e| FrameError::Decompress {
            reason: e.to_string(),
        })
}

thread_local! {
    /// This thread's zstd compression context and the level it is set to.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// This thread's zstd decompression context.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
#[path = "frame_test.rs"]
mod tests;
