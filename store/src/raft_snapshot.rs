//! Raft snapshots of one protection group: its key ranges read from one
//! read view, into a file or straight into the stream to a follower, and
//! installed from a file, all in bounded memory whatever the PG's size.
//!
//! File layout (version 1):
//! ```text
//! magic "LBRSNAP1" (8) | meta_len u32 BE | meta (opaque to the store)
//! then records:  cf u8 | key_len u32 BE | key | value_len u32 BE | value
//! then the end:  0xff  | crc32 u32 BE over every byte before it
//! ```
//! A PG's ranges are every key with the PG's 8-byte prefix in `pg_meta`,
//! `latest`, `blocks`, `objects`, `chunks` and `timeline`, plus all of
//! `catalog` for the catalog PG. Never `raft_log` or `raft_state`.
//!
//! Installing is crash-safe: an `Installing` marker naming the file is made
//! durable first, the PG's ranges are deleted and refilled, and the marker is
//! removed in the same batch as the caller's final state (applied index,
//! membership). A node that finds the marker at start installs again.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::PgId;
use crate::db::{Batch, Cf, Db, Durability, ReadView, prefix_successor};
use crate::error::{Error, Result};
use crate::keys::{self, RaftStateKind};

const MAGIC: &[u8; 8] = b"LBRSNAP1";
const END_TAG: u8 = 0xff;
/// Largest key or value a snapshot record may carry (a frame is ≤ ~1 MiB).
const RECORD_BYTES_MAX: u32 = 64 << 20;
/// Install writes batches of about this size.
const INSTALL_BATCH_BYTES: usize = 8 << 20;

/// Column families whose keys start with the PG id.
pub(crate) const PG_RANGES: [Cf; 6] = [
    Cf::PgMeta,
    Cf::Latest,
    Cf::Blocks,
    Cf::Objects,
    Cf::Chunks,
    Cf::Timeline,
];

/// Deletes everything this node holds for `pg` — its key ranges, its Raft
/// log and Raft state (the local member record included) — in one atomic
/// batch: a fenced old member's replica, once what it alone had is safe
/// elsewhere, so that a new member starts from nothing.
pub fn wipe_pg(db: &Db, pg: PgId) -> Result<()> {
    let prefix = keys::pg_prefix(pg);
    let end = prefix_successor(&prefix).expect("a PG prefix has a successor");
    let mut batch = db.new_batch();
    for cf in PG_RANGES.into_iter().chain([Cf::RaftLog, Cf::RaftState]) {
        batch.delete_range(cf, &prefix, &end);
    }
    db.write(batch, Durability::Sync)
}

/// A digest of everything a replica holds for a PG (the key ranges a
/// Raft snapshot carries), read from one view: replicas at the same
/// applied index must have the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgDigest {
    pub rows: u64,
    /// Block and object version rows.
    pub versions: u64,
    pub sha256: [u8; 32],
}

pub fn pg_digest(db: &Db, pg: PgId) -> Result<PgDigest> {
    use sha2::{Digest, Sha256};
    let view = db.read_view();
    let prefix = keys::pg_prefix(pg);
    let mut hash = Sha256::new();
    let (mut rows, mut versions) = (0u64, 0u64);
    for cf in PG_RANGES {
        let tag = cf_tag(cf);
        view.for_each_with_prefix(cf, &prefix, |k, v| {
            hash.update([tag]);
            hash.update((k.len() as u32).to_be_bytes());
            hash.update(k);
            hash.update((v.len() as u32).to_be_bytes());
            hash.update(v);
            rows += 1;
            versions += u64::from(matches!(cf, Cf::Blocks | Cf::Objects));
            Ok(())
        })?;
    }
    Ok(PgDigest {
        rows,
        versions,
        sha256: hash.finalize().into(),
    })
}

pub(crate) fn cf_tag(cf: Cf) -> u8 {
    Cf::ALL.iter().position(|c| *c == cf).expect("cf in ALL") as u8
}

fn cf_from_tag(tag: u8) -> Option<Cf> {
    let cf = *Cf::ALL.get(tag as usize)?;
    (PG_RANGES.contains(&cf) || cf == Cf::Catalog).then_some(cf)
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the PG's key ranges, as seen by one read view, to `path` (fsynced,
/// written under a temporary name and renamed). `meta` computes the file's
/// metadata from the same read view, so that it describes exactly the data.
/// Returns the metadata and the file's size in bytes.
pub fn write_pg_snapshot(
    db: &Db,
    pg: PgId,
    path: &Path,
    meta: impl FnOnce(&ReadView<'_>) -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, u64)> {
    let view = db.read_view();
    let meta = meta(&view)?;
    let size = write_snapshot_file(&view, pg, &meta, path)?;
    Ok((meta, size))
}

/// Writes the PG's key ranges as `view` sees them, with `meta`, to `path`
/// (fsynced, written under a temporary name and renamed). Returns the
/// file's size in bytes.
pub fn write_snapshot_file(view: &ReadView<'_>, pg: PgId, meta: &[u8], path: &Path) -> Result<u64> {
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(io_err("create raft snapshot", &tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write_pg_records(view, pg, meta, &mut out, &tmp)?;
    let file = out.into_inner().map_err(|e| Error::Io {
        op: "flush raft snapshot",
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all()
        .map_err(io_err("fsync raft snapshot", &tmp))?;
    let size = file
        .metadata()
        .map_err(io_err("stat raft snapshot", &tmp))?
        .len();
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err("rename raft snapshot", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync raft snapshot dir", dir))?;
    }
    Ok(size)
}

/// Writes a snapshot of the PG's key ranges as `view` sees them, with
/// `meta`, to `out` in the layout above, CRC included: to a file, or
/// straight to a follower. `label` names the destination in errors.
pub fn write_pg_records(
    view: &ReadView<'_>,
    pg: PgId,
    meta: &[u8],
    out: impl Write,
    label: &Path,
) -> Result<()> {
    let mut w = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
    };
    let mut head = || -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&(meta.len() as u32).to_be_bytes())?;
        w.write_all(meta)
    };
    head().map_err(io_err("write raft snapshot", label))?;
    let prefix = keys::pg_prefix(pg);
    let mut ranges: Vec<(Cf, Vec<u8>)> =
        PG_RANGES.iter().map(|cf| (*cf, prefix.to_vec())).collect();
    if pg == PgId::CATALOG {
        ranges.push((Cf::Catalog, Vec::new()));
    }
    for (cf, prefix) in ranges {
        let tag = cf_tag(cf);
        view.for_each_with_prefix(cf, &prefix, |k, v| {
            let mut rec = || -> std::io::Result<()> {
                w.write_all(&[tag])?;
                w.write_all(&(k.len() as u32).to_be_bytes())?;
                w.write_all(k)?;
                w.write_all(&(v.len() as u32).to_be_bytes())?;
                w.write_all(v)
            };
            rec().map_err(io_err("write raft snapshot", label))
        })?;
    }
    w.write_all(&[END_TAG])
        .map_err(io_err("write raft snapshot", label))?;
    let crc = w.crc.clone().finalize();
    let mut out = w.inner;
    out.write_all(&crc.to_be_bytes())
        .and_then(|()| out.flush())
        .map_err(io_err("write raft snapshot", label))
}

/// Reads the metadata of a snapshot file without reading its records.
pub fn read_snapshot_meta(path: &Path) -> Result<Vec<u8>> {
    let mut r = BufReader::new(File::open(path).map_err(io_err("open raft snapshot", path))?);
    read_header(&mut r, path, &mut crc32fast::Hasher::new())
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptRecord {
        cf: "raft_snapshot",
        key: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_exact_crc(
    r: &mut impl Read,
    buf: &mut [u8],
    crc: &mut crc32fast::Hasher,
    path: &Path,
) -> Result<()> {
    r.read_exact(buf)
        .map_err(|e| corrupt(path, format!("truncated: {e}")))?;
    crc.update(buf);
    Ok(())
}

fn read_u32(r: &mut impl Read, crc: &mut crc32fast::Hasher, path: &Path) -> Result<u32> {
    let mut b = [0u8; 4];
    read_exact_crc(r, &mut b, crc, path)?;
    Ok(u32::from_be_bytes(b))
}

fn read_header(r: &mut impl Read, path: &Path, crc: &mut crc32fast::Hasher) -> Result<Vec<u8>> {
    let mut magic = [0u8; 8];
    read_exact_crc(r, &mut magic, crc, path)?;
    if &magic != MAGIC {
        return Err(corrupt(path, "not a raft snapshot file"));
    }
    let meta_len = read_u32(r, crc, path)?;
    if meta_len > RECORD_BYTES_MAX {
        return Err(corrupt(path, format!("meta of {meta_len} bytes")));
    }
    let mut meta = vec![0u8; meta_len as usize];
    read_exact_crc(r, &mut meta, crc, path)?;
    Ok(meta)
}

/// Marks the install durable, replaces the PG's ranges with the file's
/// records, and commits `finish` (the caller's applied state) in the same
/// batch that removes the marker. Returns the file's metadata.
pub fn install_pg_snapshot(
    db: &Db,
    pg: PgId,
    path: &Path,
    finish: impl FnOnce(&mut Batch, &[u8]) -> Result<()>,
) -> Result<Vec<u8>> {
    // Verify the whole file first: a corrupt snapshot must not wipe the PG.
    verify_snapshot_file(path)?;

    let marker = keys::raft_state_key(pg, RaftStateKind::Installing);
    let mut b = db.new_batch();
    b.put(Cf::RaftState, &marker, path.to_string_lossy().as_bytes());
    db.write(b, Durability::Sync)?;

    let mut b = db.new_batch();
    let prefix = keys::pg_prefix(pg);
    let end = prefix_successor(&prefix).expect("pg prefix is not all 0xff");
    for cf in PG_RANGES {
        b.delete_range(cf, &prefix, &end);
    }
    if pg == PgId::CATALOG {
        b.delete_range(Cf::Catalog, &[], &[0xff; 64]);
    }
    db.write(b, Durability::Buffered)?;

    let mut crc = crc32fast::Hasher::new();
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(path).map_err(io_err("open raft snapshot", path))?,
    );
    let meta = read_header(&mut r, path, &mut crc)?;
    let mut b = db.new_batch();
    loop {
        let mut tag = [0u8; 1];
        read_exact_crc(&mut r, &mut tag, &mut crc, path)?;
        if tag[0] == END_TAG {
            break;
        }
        let cf = cf_from_tag(tag[0])
            .ok_or_else(|| corrupt(path, format!("record for column family tag {}", tag[0])))?;
        let key = read_blob(&mut r, &mut crc, path)?;
        let value = read_blob(&mut r, &mut crc, path)?;
        if cf != Cf::Catalog && !key.starts_with(&prefix) {
            return Err(corrupt(path, "record outside the protection group"));
        }
        b.put(cf, &key, &value);
        if b.size_bytes() >= INSTALL_BATCH_BYTES {
            db.write(
                std::mem::replace(&mut b, db.new_batch()),
                Durability::Buffered,
            )?;
        }
    }
    finish(&mut b, &meta)?;
    b.delete(Cf::RaftState, &marker);
    db.write(b, Durability::Sync)?;
    Ok(meta)
}

fn read_blob(r: &mut impl Read, crc: &mut crc32fast::Hasher, path: &Path) -> Result<Vec<u8>> {
    let len = read_u32(r, crc, path)?;
    if len > RECORD_BYTES_MAX {
        return Err(corrupt(path, format!("record of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    read_exact_crc(r, &mut buf, crc, path)?;
    Ok(buf)
}

/// Reads the whole file and checks its structure and CRC.
pub fn verify_snapshot_file(path: &Path) -> Result<()> {
    let mut crc = crc32fast::Hasher::new();
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(path).map_err(io_err("open raft snapshot", path))?,
    );
    read_header(&mut r, path, &mut crc)?;
    loop {
        let mut tag = [0u8; 1];
        read_exact_crc(&mut r, &mut tag, &mut crc, path)?;
        if tag[0] == END_TAG {
            break;
        }
        cf_from_tag(tag[0])
            .ok_or_else(|| corrupt(path, format!("record for column family tag {}", tag[0])))?;
        read_blob(&mut r, &mut crc, path)?;
        read_blob(&mut r, &mut crc, path)?;
    }
    let computed = crc.finalize();
    let mut stored = [0u8; 4];
    r.read_exact(&mut stored)
        .map_err(|e| corrupt(path, format!("truncated crc: {e}")))?;
    if u32::from_be_bytes(stored) != computed {
        return Err(corrupt(path, "crc mismatch"));
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest)
        .map_err(io_err("read raft snapshot", path))?
        != 0
    {
        return Err(corrupt(path, "bytes after the end"));
    }
    Ok(())
}

/// The snapshot file an interrupted install was reading, if any.
pub fn interrupted_install(db: &Db, pg: PgId) -> Result<Option<std::path::PathBuf>> {
    let marker = keys::raft_state_key(pg, RaftStateKind::Installing);
    Ok(db
        .get(Cf::RaftState, &marker)?
        .map(|v| std::path::PathBuf::from(String::from_utf8_lossy(&v).into_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DbOptions;

    fn must_put(db: &Db, cf: Cf, key: &[u8], value: &[u8]) {
        let mut b = db.new_batch();
        b.put(cf, key, value);
        db.write(b, Durability::Buffered).unwrap();
    }

    #[test]
    fn snapshot_moves_exactly_one_pg() {
        let dir = tempfile::tempdir().unwrap();
        let src = Db::open(&dir.path().join("src"), &DbOptions::default()).unwrap();
        let dst = Db::open(&dir.path().join("dst"), &DbOptions::default()).unwrap();
        let k = |pg: u64, rest: &[u8]| [&pg.to_be_bytes()[..], rest].concat();
        must_put(&src, Cf::Blocks, &k(3, b"a"), b"pg3-block");
        must_put(&src, Cf::PgMeta, &k(3, b"m"), b"pg3-meta");
        must_put(&src, Cf::Blocks, &k(4, b"a"), b"pg4-block");
        must_put(&src, Cf::RaftLog, &k(3, b"l"), b"log");
        // The destination has stale data of pg 3 and data of pg 4 to keep.
        must_put(&dst, Cf::Blocks, &k(3, b"stale"), b"x");
        must_put(&dst, Cf::Blocks, &k(4, b"keep"), b"y");

        let path = dir.path().join("pg3.snap");
        write_pg_snapshot(&src, PgId(3), &path, |_| Ok(b"meta!".to_vec())).unwrap();
        // Writes after the read view are not in the file.
        assert_eq!(read_snapshot_meta(&path).unwrap(), b"meta!");
        let meta = install_pg_snapshot(&dst, PgId(3), &path, |b, meta| {
            b.put(Cf::RaftState, b"applied", meta);
            Ok(())
        })
        .unwrap();
        assert_eq!(meta, b"meta!");
        assert_eq!(
            dst.get(Cf::Blocks, &k(3, b"a")).unwrap().unwrap(),
            b"pg3-block"
        );
        assert_eq!(
            dst.get(Cf::PgMeta, &k(3, b"m")).unwrap().unwrap(),
            b"pg3-meta"
        );
        assert!(dst.get(Cf::Blocks, &k(3, b"stale")).unwrap().is_none());
        assert_eq!(dst.get(Cf::Blocks, &k(4, b"keep")).unwrap().unwrap(), b"y");
        assert!(dst.get(Cf::Blocks, &k(4, b"a")).unwrap().is_none());
        assert!(dst.get(Cf::RaftLog, &k(3, b"l")).unwrap().is_none());
        assert_eq!(
            dst.get(Cf::RaftState, b"applied").unwrap().unwrap(),
            b"meta!"
        );
        assert!(interrupted_install(&dst, PgId(3)).unwrap().is_none());
    }

    #[test]
    fn corrupt_snapshot_is_refused_before_anything_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let src = Db::open(&dir.path().join("src"), &DbOptions::default()).unwrap();
        let dst = Db::open(&dir.path().join("dst"), &DbOptions::default()).unwrap();
        must_put(&src, Cf::Blocks, &[0, 0, 0, 0, 0, 0, 0, 3, 1], b"data");
        must_put(&dst, Cf::Blocks, &[0, 0, 0, 0, 0, 0, 0, 3, 2], b"keep");
        let path = dir.path().join("pg3.snap");
        write_pg_snapshot(&src, PgId(3), &path, |_| Ok(b"m".to_vec())).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for i in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(install_pg_snapshot(&dst, PgId(3), &path, |_, _| Ok(())).is_err());
        }
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(verify_snapshot_file(&path).is_err());
        assert_eq!(
            dst.get(Cf::Blocks, &[0, 0, 0, 0, 0, 0, 0, 3, 2])
                .unwrap()
                .unwrap(),
            b"keep"
        );
    }
}
