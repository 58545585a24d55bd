//! The keyring: the cluster master key, tenant data-encryption keys (DEKs),
//! the wrapping of DEKs under the master key, and the node's in-memory map
//! from tenant to its readable DEKs.
//!
//! Owns key material and nothing else. It must not know where wrapped DEKs
//! are stored (the catalog keeps them, keyed by tenant name) nor how frames use
//! a DEK ([`crate::frame`] derives a per-frame key from it).
//!
//! # Master key file
//!
//! Made once at `cluster init`, never inside a node's data dir; the witness
//! never has it. One line: 64 lowercase hex characters (32 bytes) and `\n`,
//! mode 0600. [`MasterKey::create`] refuses to overwrite an existing file: a
//! lost master key makes every wrapped DEK, and so every frame, unreadable.
//!
//! # Wrapped DEK layout (version 1)
//!
//! ```text
//!  0        1                5                          17                              65
//!  +--------+----------------+--------------------------+-------------------------------+
//!  | version| key_id u32 BE  | nonce [12]               | ciphertext [32] + GCM tag [16]|
//!  +--------+----------------+--------------------------+-------------------------------+
//! ```
//!
//! AES-256-GCM under a wrap key = HKDF-SHA256(ikm = master key, no salt,
//! info = `b"lifeboat dek wrap v1"`), with a random nonce from the OS and
//! associated data `version | key_id u32 BE | tenant name bytes`, so a wrapped
//! DEK cannot be moved to another tenant or renumbered. A random 96-bit nonce
//! under one key is safe for about 2^32 wraps; a cluster wraps a handful of
//! keys per tenant.
//!
//! Changing this layout, the HKDF info or the associated data makes every
//! wrapped DEK in every catalog unreadable: add a new version byte instead and
//! keep reading version 1.
//!
//! # Invariants
//!
//! - Invariant: in a [`TenantKeys`], `current` is the highest key id and is
//!   present in `keys`; key ids only rise (checked by `TenantKeys::validate`).
//! - Key material never appears in `Debug` output, logs or error messages.
//!
//! # Zeroing
//!
//! [`Dek`] and [`MasterKey`] overwrite their bytes on drop. This is best
//! effort without `unsafe` or the `zeroize` crate: the write is followed by
//! `std::hint::black_box` so it is not removed as a dead store, but copies
//! left behind by moves, AES key schedules inside `aes-gcm` and HKDF's
//! internal state are not cleared.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::Sha256;

use crate::ids::KeyId;

/// Bytes in a master key, a DEK and every AES-256 key.
pub const KEY_BYTES: usize = 32;

/// Hex characters in a master key file, before the trailing newline.
pub const MASTER_KEY_HEX_CHARS: usize = 2 * KEY_BYTES;

/// A master key file larger than this is not read into memory at all.
const MASTER_KEY_FILE_BYTES_MAX: u64 = 1024;

/// Mode of a new master key file: owner read/write only.
const MASTER_KEY_FILE_MODE: u32 = 0o600;

/// HKDF info for the key that wraps DEKs.
const WRAP_HKDF_INFO: &[u8] = b"lifeboat dek wrap v1";

/// The only wrapped-DEK layout version written and read.
pub const WRAPPED_DEK_VERSION: u8 = 1;

const WRAPPED_VERSION_BYTES: usize = 1;
const WRAPPED_KEY_ID_BYTES: usize = 4;
const WRAPPED_NONCE_BYTES: usize = 12;
const WRAPPED_TAG_BYTES: usize = 16;
const WRAPPED_HEADER_BYTES: usize =
    WRAPPED_VERSION_BYTES + WRAPPED_KEY_ID_BYTES + WRAPPED_NONCE_BYTES;

/// Bytes in a wrapped DEK: header, encrypted key, GCM tag.
pub const WRAPPED_DEK_BYTES: usize = WRAPPED_HEADER_BYTES + KEY_BYTES + WRAPPED_TAG_BYTES;

const _: () = assert!(WRAPPED_HEADER_BYTES == 17);
const _: () = assert!(WRAPPED_DEK_BYTES == 65);
const _: () = assert!(MASTER_KEY_HEX_CHARS == 64);

/// What can go wrong loading keys or unwrapping a DEK.
#[derive(thiserror::Error, Debug)]
pub enum KeyringError {
    /// Reading or writing a key file failed (including: it does not exist).
    #[error("master key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The master key file exists but does not hold a key.
    #[error("master key file {} is malformed: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    /// `create` found a file already there; it never overwrites a key.
    #[error("master key file {} already exists; refusing to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    /// The wrapped DEK did not authenticate: another master key, another
    /// tenant, or corrupted bytes.
    #[error(
        "unwrap DEK of tenant {tenant:?}: authentication failed (wrong master key, wrong tenant or corrupt)"
    )]
    UnwrapFailed { tenant: String },
    /// The wrapped DEK is not in the version 1 layout.
    #[error("wrapped DEK is malformed: {reason}")]
    WrappedMalformed { reason: String },
}

/// Overwrites `bytes` so that the store is not optimised away (best effort;
/// see the module docs for what this does not clear).
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

/// Fresh key bytes straight from the OS (`getrandom`), not a user-space RNG:
/// key generation is rare, and a cloned VM or forked process must never share
/// key material. Panics only if the OS has no randomness to give.
fn random_key_bytes() -> [u8; KEY_BYTES] {
    let mut bytes = [0u8; KEY_BYTES];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// The cluster master key: wraps every tenant's DEKs.
pub struct MasterKey {
    bytes: [u8; KEY_BYTES],
}

impl MasterKey {
    /// Generates a key and writes it to a new file at `path` (mode 0600, one
    /// line of hex), then fsyncs the file and its parent directory so the key
    /// survives a crash right after `cluster init` reports success.
    ///
    /// Refuses to overwrite an existing file ([`KeyringError::AlreadyExists`]).
    pub fn create(path: &Path) -> Result<MasterKey, KeyringError> {
        let io_error = |source| KeyringError::Io {
            path: path.to_path_buf(),
            source,
        };
        let key = MasterKey {
            bytes: random_key_bytes(),
        };
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MASTER_KEY_FILE_MODE)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(KeyringError::AlreadyExists {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(io_error(e)),
        };
        // The file is ours from here: on any failure remove it, so a retry is
        // not refused by a half-written key.
        let written = key.write_to(&mut file);
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io_error(e));
        }
        drop(file);
        fsync_parent_dir(path).map_err(io_error)?;
        Ok(key)
    }

    /// Writes, sets the mode explicitly (the umask could have cleared owner
    /// bits) and fsyncs.
    fn write_to(&self, file: &mut File) -> io::Result<()> {
        file.set_permissions(Permissions::from_mode(MASTER_KEY_FILE_MODE))?;
        let mut line = [0u8; MASTER_KEY_HEX_CHARS + 1];
        hex::encode_to_slice(self.bytes, &mut line[..MASTER_KEY_HEX_CHARS])
            .expect("hex of 32 bytes fills exactly 64 characters");
        line[MASTER_KEY_HEX_CHARS] = b'\n';
        let written = file.write_all(&line);
        wipe(&mut line);
        written?;
        file.sync_all()
    }

    /// Reads and validates the master key file at `path`. Warns (it does not
    /// fail) when the file's mode lets group or others access it.
    pub fn load(path: &Path) -> Result<MasterKey, KeyringError> {
        let io_error = |source| KeyringError::Io {
            path: path.to_path_buf(),
            source,
        };
        let malformed = |reason: String| KeyringError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io_error)?;
        let metadata = file.metadata().map_err(io_error)?;
        if !metadata.is_file() {
            return Err(malformed("not a regular file".to_string()));
        }
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "master key file is accessible by group or others; it should be mode 600"
            );
        }
        let mut text = Vec::with_capacity(MASTER_KEY_HEX_CHARS + 1);
        file.take(MASTER_KEY_FILE_BYTES_MAX + 1)
            .read_to_end(&mut text)
            .map_err(io_error)?;
        let parsed = Self::parse(&text);
        wipe(&mut text);
        parsed.map_err(malformed)
    }

    /// Parses the file content; the error is a reason that never quotes the
    /// content (it may be key material).
    fn parse(text: &[u8]) -> Result<MasterKey, String> {
        if text.len() as u64 > MASTER_KEY_FILE_BYTES_MAX {
            return Err(format!(
                "file is larger than {MASTER_KEY_FILE_BYTES_MAX} bytes; a key file is \
                 {MASTER_KEY_HEX_CHARS} hex characters and a newline"
            ));
        }
        // Editors add trailing newlines (possibly CRLF) and spaces; tolerate
        // whitespace at the end only.
        let hex_chars = text.trim_ascii_end();
        if hex_chars.len() != MASTER_KEY_HEX_CHARS {
            return Err(format!(
                "expected {MASTER_KEY_HEX_CHARS} hex characters, found {}",
                hex_chars.len()
            ));
        }
        let mut bytes = [0u8; KEY_BYTES];
        match hex::decode_to_slice(hex_chars, &mut bytes) {
            Ok(()) => Ok(MasterKey { bytes }),
            Err(hex::FromHexError::InvalidHexCharacter { index, .. }) => {
                wipe(&mut bytes);
                Err(format!("character at offset {index} is not hexadecimal"))
            }
            Err(e) => {
                wipe(&mut bytes);
                Err(format!("not hexadecimal: {e}"))
            }
        }
    }

    /// A master key from known bytes (tests, and tools that already hold it).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> MasterKey {
        MasterKey { bytes }
    }

    /// The AES-256-GCM cipher that wraps DEKs, derived by HKDF so the master
    /// key itself is never used directly as an AES key.
    fn wrap_cipher(&self) -> Aes256Gcm {
        let mut wrap_key = [0u8; KEY_BYTES];
        Hkdf::<Sha256>::new(None, &self.bytes)
            .expand(WRAP_HKDF_INFO, &mut wrap_key)
            .expect("HKDF-SHA256 can expand to 32 bytes");
        let cipher = Aes256Gcm::new(&wrap_key.into());
        wipe(&mut wrap_key);
        cipher
    }

    /// Wraps `dek` for `tenant` (the catalog's tenant name) in the layout
    /// drawn in the module docs; the result is [`WRAPPED_DEK_BYTES`] long.
    pub fn wrap_dek(&self, tenant: &str, dek: &Dek) -> Vec<u8> {
        let mut nonce = [0u8; WRAPPED_NONCE_BYTES];
        // A fresh OS nonce per wrap; see `random_key_bytes` for why the OS.
        OsRng.fill_bytes(&mut nonce);
        let key_id = dek.key_id.0.to_be_bytes();
        let aad = wrap_aad(tenant, dek.key_id);
        let sealed = self
            .wrap_cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &dek.bytes,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts a 32-byte message");
        let mut wrapped = Vec::with_capacity(WRAPPED_DEK_BYTES);
        wrapped.push(WRAPPED_DEK_VERSION);
        wrapped.extend_from_slice(&key_id);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&sealed);
        assert_eq!(wrapped.len(), WRAPPED_DEK_BYTES);
        wrapped
    }

    /// Unwraps a DEK made by [`MasterKey::wrap_dek`] for the same `tenant`.
    pub fn unwrap_dek(&self, tenant: &str, wrapped: &[u8]) -> Result<Dek, KeyringError> {
        if wrapped.len() != WRAPPED_DEK_BYTES {
            return Err(KeyringError::WrappedMalformed {
                reason: format!(
                    "expected {WRAPPED_DEK_BYTES} bytes, found {}",
                    wrapped.len()
                ),
            });
        }
        let (header, sealed) = wrapped.split_at(WRAPPED_HEADER_BYTES);
        let (version, rest) = header.split_at(WRAPPED_VERSION_BYTES);
        let (key_id, nonce) = rest.split_at(WRAPPED_KEY_ID_BYTES);
        if version[0] != WRAPPED_DEK_VERSION {
            return Err(KeyringError::WrappedMalformed {
                reason: format!("unknown version {}", version[0]),
            });
        }
        let key_id = KeyId(u32::from_be_bytes(
            key_id.try_into().expect("split at WRAPPED_KEY_ID_BYTES"),
        ));
        let aad = wrap_aad(tenant, key_id);
        let mut opened = self
            .wrap_cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| KeyringError::UnwrapFailed {
                tenant: tenant.to_string(),
            })?;
        let bytes: Result<[u8; KEY_BYTES], _> = opened.as_slice().try_into();
        wipe(&mut opened);
        match bytes {
            Ok(bytes) => Ok(Dek { key_id, bytes }),
            // Unreachable with an authentic blob of the right length; kept as
            // an error because the length came from disk.
            Err(_) => Err(KeyringError::WrappedMalformed {
                reason: "decrypted key is not 32 bytes".to_string(),
            }),
        }
    }
}

/// Version byte of a sealed secret (`MasterKey::seal_secret`).
pub const SEALED_SECRET_VERSION: u8 = 2;

impl MasterKey {
    /// Seals a secret other than a DEK (the cluster CA's private key) under
    /// the master key: `version 2 | nonce (12) | AES-256-GCM(secret) | tag`,
    /// with `purpose` bound as associated data so that a blob sealed for
    /// one purpose never opens as another.
    pub fn seal_secret(&self, purpose: &str, secret: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; WRAPPED_NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let aad = secret_aad(purpose);
        let sealed = self
            .wrap_cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts a short secret");
        let mut out = Vec::with_capacity(1 + WRAPPED_NONCE_BYTES + sealed.len());
        out.push(SEALED_SECRET_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a secret sealed by [`MasterKey::seal_secret`] for `purpose`.
    pub fn open_secret(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyringError> {
        if sealed.len() < 1 + WRAPPED_NONCE_BYTES + WRAPPED_TAG_BYTES
            || sealed[0] != SEALED_SECRET_VERSION
        {
            return Err(KeyringError::WrappedMalformed {
                reason: format!("not a sealed secret ({} bytes)", sealed.len()),
            });
        }
        let (nonce, body) = sealed[1..].split_at(WRAPPED_NONCE_BYTES);
        self.wrap_cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &secret_aad(purpose),
                },
            )
            .map_err(|_| KeyringError::UnwrapFailed {
                tenant: format!("(secret {purpose})"),
            })
    }
}

fn secret_aad(purpose: &str) -> Vec<u8> {
    let mut aad = vec![SEALED_SECRET_VERSION];
    aad.extend_from_slice(b"lifeboat-secret:");
    aad.extend_from_slice(purpose.as_bytes());
    aad
}

/// Associated data of a wrapped DEK: `version | key_id u32 BE | tenant`.
/// The tenant name is last, so no length prefix is needed.
fn wrap_aad(tenant: &str, key_id: KeyId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAPPED_VERSION_BYTES + WRAPPED_KEY_ID_BYTES + tenant.len());
    aad.push(WRAPPED_DEK_VERSION);
    aad.extend_from_slice(&key_id.0.to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad
}

/// Fsyncs the directory holding `path`, so a newly created entry is durable.
fn fsync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        wipe(&mut self.bytes);
    }
}

/// A tenant data-encryption key. Frames name the key that sealed them by
/// `key_id`.
#[derive(Clone)]
pub struct Dek {
    key_id: KeyId,
    bytes: [u8; KEY_BYTES],
}

impl Dek {
    /// A new random key (from the OS) numbered `key_id`.
    pub fn generate(key_id: KeyId) -> Dek {
        Dek {
            key_id,
            bytes: random_key_bytes(),
        }
    }

    /// A key from known bytes (tests, and importers that already unwrapped it).
    pub fn from_bytes(key_id: KeyId, bytes: [u8; KEY_BYTES]) -> Dek {
        Dek { key_id, bytes }
    }

    /// The key's number.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The raw key, for the frame codec's key derivation only.
    pub(crate) fn secret_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dek")
            .field("key_id", &self.key_id)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

impl Drop for Dek {
    fn drop(&mut self) {
        wipe(&mut self.bytes);
    }
}

/// Every DEK of one tenant that can still open frames, and the one that seals
/// new frames.
///
/// Invariant: `current` is the highest key id and is in `keys`.
#[derive(Clone, Debug)]
pub struct TenantKeys {
    current: KeyId,
    keys: BTreeMap<KeyId, Dek>,
}

impl TenantKeys {
    /// A tenant's keys with one DEK, which is current.
    pub fn new(first: Dek) -> TenantKeys {
        let current = first.key_id;
        let keys = TenantKeys {
            current,
            keys: BTreeMap::from([(current, first)]),
        };
        keys.validate();
        keys
    }

    /// The DEK that seals new frames.
    pub fn current(&self) -> &Dek {
        self.keys
            .get(&self.current)
            .expect("invariant: the current key is in the map")
    }

    /// The DEK numbered `key_id`, if this tenant has it.
    pub fn get(&self, key_id: KeyId) -> Option<&Dek> {
        self.keys.get(&key_id)
    }

    /// Rotates: `dek` becomes current; older keys stay readable.
    ///
    /// Panics if `dek`'s key id is not above the current one: key ids only
    /// rise, and the caller (the catalog) numbers them.
    pub fn add(&mut self, dek: Dek) {
        assert!(
            dek.key_id > self.current,
            "DEK key ids only rise: adding {} after current {}",
            dek.key_id,
            self.current
        );
        self.current = dek.key_id;
        self.keys.insert(dek.key_id, dek);
        self.validate();
    }

    /// How many keys this tenant has.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a tenant has at least one key. Here for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every key, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Dek> {
        self.keys.values()
    }

    fn validate(&self) {
        debug_assert_eq!(self.keys.keys().next_back(), Some(&self.current));
        debug_assert!(self.keys.iter().all(|(id, dek)| *id == dek.key_id));
    }
}

/// The node's in-memory view of tenant keys, by tenant name.
///
/// The lock is held only for a map lookup or update (there are no awaits in
/// this crate), and a poisoned lock is recovered: every critical section is a
/// single map operation, so a panic elsewhere cannot leave the map half-done.
#[derive(Debug, Default)]
pub struct Keyring {
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
}

impl Keyring {
    /// An empty keyring.
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Sets `tenant`'s keys, replacing any it had (a rotation inserts the
    /// whole new set). Readers holding the old `Arc` keep using it.
    pub fn insert(&self, tenant: &str, keys: TenantKeys) {
        self.write().insert(tenant.to_string(), Arc::new(keys));
    }

    /// `tenant`'s keys, if loaded.
    pub fn get(&self, tenant: &str) -> Option<Arc<TenantKeys>> {
        self.read().get(tenant).cloned()
    }

    /// Forgets `tenant`'s keys, returning them if it had any.
    pub fn remove(&self, tenant: &str) -> Option<Arc<TenantKeys>> {
        self.write().remove(tenant)
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Arc<TenantKeys>>> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Arc<TenantKeys>>> {
        self.tenants.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
#[path = "keyring_test.rs"]
mod tests;
