//! What a PG's data occupies.
//!
//! Two kinds of figures, both kept in apply so that every replica holds the
//! same ones:
//! - **exact, always current**: `stored_bytes` (the bytes of every stored
//!   block version and chunk frame, as encoded: compressed, encrypted, with
//!   their headers; zero markers weigh nothing) and `versions` (block and
//!   object version rows). Each write adds to them in its own batch and each
//!   GC step takes away what it deletes. A tenant's quota is checked against
//!   `stored_bytes`: history counts, so a full quota refuses writes rather
//!   than dropping history.
//! - **a census** by the GC scanner: each pass sorts the versions it keeps
//!   into *live* (what a read now lands on, rollback masks included),
//!   *pinned* (kept below the horizon only for a snapshot, clone base or
//!   restore point) and *history* (the rest: moments inside the window).
//!   An object version weighs its chunks' frames, once per version that
//!   names them, so a census can exceed `stored_bytes` when copies share
//!   chunks. A census is as of the pass that made it, and passes run while
//!   writes go on: it is a measurement, not a ledger.
//!
//! Byte counts leave out keys, record rows and RocksDB's own overhead.

use crate::db::{Batch, Cf, Db};
use crate::error::{Error, Result};
use crate::keys::{self, MetaKind};
use crate::{LogIndex, PgId};

/// One pass's sorting of the kept versions' bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub live_bytes: u64,
    pub history_bytes: u64,
    pub pinned_bytes: u64,
    /// The index of the entry that finished the pass, and its stamp (ms
    /// since the epoch); 0 while the pass is under way.
    pub index: LogIndex,
    pub at_ms: u64,
}

impl Census {
    pub fn total(&self) -> u64 {
        self.live_bytes + self.history_bytes + self.pinned_bytes
    }
}

/// A PG's usage row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub stored_bytes: u64,
    pub versions: u64,
    /// The last finished census, if a pass has finished.
    pub census: Option<Census>,
    /// The pass under way, so far.
    pub counting: Census,
}

/// How a kept version is counted by a census.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    Live,
    History,
    Pinned,
}

impl Census {
    pub fn add(&mut self, kept: Kept, bytes: u64) {
        match kept {
            Kept::Live => self.live_bytes += bytes,
            Kept::History => self.history_bytes += bytes,
            Kept::Pinned => self.pinned_bytes += bytes,
        }
    }
}

const WORDS: usize = 12;

impl Usage {
    /// `stored versions | has-census | census (5 words) | counting (5
    /// words)`, u64 big-endian each.
    pub fn encode(&self) -> Vec<u8> {
        let census = self.census.unwrap_or_default();
        let words: [u64; WORDS] = [
            self.stored_bytes,
            self.versions,
            u64::from(self.census.is_some()),
            census.live_bytes,
            census.history_bytes,
            census.pinned_bytes,
            census.index.0,
            census.at_ms,
            self.counting.live_bytes,
            self.counting.history_bytes,
            self.counting.pinned_bytes,
            // The counting census has no index or stamp yet: one word says
            // so, keeping the layout a fixed 12 words.
            0,
        ];
        words.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Usage, String> {
        if bytes.len() != WORDS * 8 {
            return Err(format!(
                "usage row is {} bytes, not {}",
                bytes.len(),
                WORDS * 8
            ));
        }
        let w = |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"));
        let census = match w(2) {
            0 => None,
            1 => Some(Census {
                live_bytes: w(3),
                history_bytes: w(4),
                pinned_bytes: w(5),
                index: LogIndex(w(6)),
                at_ms: w(7),
            }),
            other => return Err(format!("usage row has census flag {other}")),
        };
        Ok(Usage {
            stored_bytes: w(0),
            versions: w(1),
            census,
            counting: Census {
                live_bytes: w(8),
                history_bytes: w(9),
                pinned_bytes: w(10),
                index: LogIndex(0),
                at_ms: 0,
            },
        })
    }

    /// Counts a new version row of `bytes` (a block version or an object
    /// version; for objects the chunks are counted by [`Usage::add_chunk`]).
    pub fn add_version(&mut self, bytes: u64) {
        self.versions += 1;
        self.stored_bytes += bytes;
    }

    pub fn add_chunk(&mut self, frame_bytes: u64) {
        self.stored_bytes += frame_bytes;
    }

    /// Takes away what a deletion freed. Saturating: a data directory
    /// written before usage was kept starts its figures at zero.
    pub fn remove(&mut self, versions: u64, bytes: u64) {
        self.versions = self.versions.saturating_sub(versions);
        self.stored_bytes = self.stored_bytes.saturating_sub(bytes);
    }

    /// Ends the pass under way as the census of the entry at `index`.
    pub fn finish_census(&mut self, index: LogIndex, at_ms: u64) {
        self.census = Some(Census {
            index,
            at_ms,
            ..self.counting
        });
        self.counting = Census::default();
    }
}

fn usage_key(pg: PgId) -> [u8; 9] {
    keys::pg_meta_kind_prefix(pg, MetaKind::Usage)
}

/// The PG's usage (all zero before its first write).
pub fn usage(db: &Db, pg: PgId) -> Result<Usage> {
    let key = usage_key(pg);
    match db.get(Cf::PgMeta, &key)? {
        None => Ok(Usage::default()),
        Some(v) => Usage::decode(&v)
            .map_err(|reason| Error::corrupt_record(Cf::PgMeta.name(), &key, reason)),
    }
}

pub fn stage_usage(batch: &mut Batch, pg: PgId, usage: &Usage) {
    batch.put(Cf::PgMeta, &usage_key(pg), &usage.encode());
}

/// What the PG's rows hold, counted from scratch: (stored bytes, version
/// rows). Reads every block version and chunk of the PG, so it is for
/// tests and checks, not for serving.
pub fn recount(db: &Db, pg: PgId) -> Result<(u64, u64)> {
    let view = db.read_view();
    let prefix = keys::pg_prefix(pg);
    let (mut bytes, mut versions) = (0u64, 0u64);
    view.for_each_with_prefix(Cf::Blocks, &prefix, |_, v| {
        bytes += v.len() as u64;
        versions += 1;
        Ok(())
    })?;
    view.for_each_with_prefix(Cf::Objects, &prefix, |_, _| {
        versions += 1;
        Ok(())
    })?;
    view.for_each_with_prefix(Cf::Chunks, &prefix, |k, v| {
        if k.last() == Some(&(keys::ChunkPart::Data as u8)) {
            bytes += v.len() as u64;
        }
        Ok(())
    })?;
    Ok((bytes, versions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DbOptions;

    #[test]
    fn usage_round_trips_and_garbage_is_refused() {
        let mut u = Usage::default();
        u.add_version(4096);
        u.add_chunk(1 << 20);
        u.counting.add(Kept::Live, 10);
        u.counting.add(Kept::Pinned, 3);
        u.finish_census(LogIndex(77), 1_700);
        u.counting.add(Kept::History, 5);
        let back = Usage::decode(&u.encode()).unwrap();
        assert_eq!(back, u);
        assert_eq!(back.census.unwrap().total(), 13);
        assert_eq!(back.census.unwrap().index, LogIndex(77));
        assert_eq!(back.counting.history_bytes, 5);
        assert!(Usage::decode(&u.encode()[..40]).is_err());
        let mut bad = u.encode();
        bad[23] = 2;
        assert!(Usage::decode(&bad).is_err());

        u.remove(5, 1 << 30);
        assert_eq!((u.versions, u.stored_bytes), (0, 0), "saturates at zero");
    }

    #[test]
    fn usage_is_stored_per_pg() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        assert_eq!(usage(&db, PgId(3)).unwrap(), Usage::default());
        let mut u = Usage::default();
        u.add_version(12);
        let mut b = db.new_batch();
        stage_usage(&mut b, PgId(3), &u);
        db.write(b, crate::db::Durability::Buffered).unwrap();
        assert_eq!(usage(&db, PgId(3)).unwrap(), u);
        assert_eq!(usage(&db, PgId(4)).unwrap(), Usage::default());
    }
}
