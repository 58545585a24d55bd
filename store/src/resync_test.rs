//! Delta resync: the receiver ends identical to the sender's view, other
//! PGs untouched, bytes moved follow the changes, a resync cut off
//! half-way is finished by the next one, and bad deltas are refused.

use proptest::prelude::*;

use super::*;
use crate::db::DbOptions;
use crate::raft_snapshot::pg_digest;

const PG: PgId = PgId(7);
const OTHER: PgId = PgId(8);

fn key(pg: PgId, n: u32) -> Vec<u8> {
    [&pg.0.to_be_bytes()[..], &n.to_be_bytes()].concat()
}

fn put(db: &Db, cf: Cf, k: &[u8], v: &[u8]) {
    let mut b = db.new_batch();
    b.put(cf, k, v);
    db.write(b, Durability::Buffered).unwrap();
}

fn delete(db: &Db, cf: Cf, k: &[u8]) {
    let mut b = db.new_batch();
    b.delete(cf, k);
    db.write(b, Durability::Buffered).unwrap();
}

fn open_two() -> (tempfile::TempDir, Db, Db) {
    let dir = tempfile::tempdir().unwrap();
    let src = Db::open(&dir.path().join("src"), &DbOptions::default()).unwrap();
    let dst = Db::open(&dir.path().join("dst"), &DbOptions::default()).unwrap();
    (dir, src, dst)
}

/// Resyncs `dst`'s copy of `PG` from `src`, applying at most `limit` steps
/// (all when `None`): the stats and whether it finished.
fn resync(src: &Db, dst: &Db, limit: Option<usize>) -> (DeltaStats, bool) {
    let offer = offer(dst, PG).unwrap();
    assert_eq!(check_offer(PG, &offer.segments), Ok(()));
    let view = src.read_view();
    let mut ops = Vec::new();
    let stats = delta(&view, PG, &offer.segments, |op| {
        ops.push(op);
        Ok(())
    })
    .unwrap();
    let mut w = DeltaWriter::new(dst.clone(), PG);
    let whole = limit.is_none_or(|l| l >= ops.len());
    for op in ops.into_iter().take(limit.unwrap_or(usize::MAX)) {
        w.apply(op).unwrap();
    }
    if whole {
        w.finish(|_| Ok(())).unwrap();
    } else {
        // Cut off: what was written stays, the marker too.
        let batch = std::mem::replace(&mut w.batch, dst.new_batch());
        dst.write(batch, Durability::Buffered).unwrap();
    }
    (stats, whole)
}

#[test]
fn a_resync_moves_the_changes_not_the_data() {
    let (_dir, src, dst) = open_two();
    let block = vec![0xabu8; 4096];
    // 4000 blocks in common, another PG on the receiver to keep.
    for n in 0..4000 {
        put(&src, Cf::Blocks, &key(PG, n * 2), &block);
        put(&dst, Cf::Blocks, &key(PG, n * 2), &block);
    }
    put(&dst, Cf::Blocks, &key(OTHER, 1), b"keep");
    put(&src, Cf::PgMeta, &key(PG, 1), b"volume v2");
    put(&dst, Cf::PgMeta, &key(PG, 1), b"volume v1");
    // A large chunk both hold, between two reference counts that the
    // sender changed: the chunk itself does not move.
    let chunk = vec![0xcdu8; 512 << 10];
    for db in [&src, &dst] {
        put(db, Cf::Chunks, &key(PG, 10), &chunk);
    }
    for n in [9, 11] {
        put(&src, Cf::Chunks, &key(PG, n), &1u64.to_be_bytes());
        put(&dst, Cf::Chunks, &key(PG, n), &2u64.to_be_bytes());
    }
    // A new chunk between two large ones moves alone.
    for n in [19, 21] {
        for db in [&src, &dst] {
            put(db, Cf::Chunks, &key(PG, n), &chunk);
        }
    }
    let inserted = vec![0xefu8; 300 << 10];
    put(&src, Cf::Chunks, &key(PG, 20), &inserted);
    keep_as_base(&dst, PG, 3).unwrap();
    assert_eq!(base_of(&dst, PG).unwrap(), Some(3));
    assert_eq!(bases(&dst).unwrap(), vec![PG]);
    assert!(bases(&src).unwrap().is_empty());
    // The sender wrote 5 new blocks after the fork; the receiver had
    // written 3 of its own and deleted one.
    for n in [1, 1001, 2001, 3001, 7999] {
        put(&src, Cf::Blocks, &key(PG, n * 2 + 1), &[1u8; 4096]);
    }
    for n in [11, 2011, 3011] {
        put(&dst, Cf::Blocks, &key(PG, n * 2 + 1), &[2u8; 4096]);
    }
    delete(&dst, Cf::Blocks, &key(PG, 500 * 2));

    let before = offer(&dst, PG).unwrap();
    let (stats, _) = resync(&src, &dst, None);
    assert_eq!(pg_digest(&dst, PG).unwrap(), pg_digest(&src, PG).unwrap());
    assert_eq!(
        dst.get(Cf::Blocks, &key(OTHER, 1)).unwrap().unwrap(),
        b"keep"
    );
    assert_eq!(base_of(&dst, PG).unwrap(), None);
    assert!(bases(&dst).unwrap().is_empty());
    // 13 changed places (5 + 3 + 1 + the volume record + two reference
    // counts + the new chunk) of 4000 rows: each costs at most a segment
    // of small rows or the new chunk, far from a full copy.
    assert!(stats.replaced <= 13, "{stats:?}");
    let full = before.bytes;
    assert!(
        stats.bytes_sent <= inserted.len() as u64 + 12 * ROWS_PER_SEGMENT_MIN * 4200,
        "sent {} of {full}",
        stats.bytes_sent
    );
    assert!(stats.bytes_sent >= 5 * 4096, "{stats:?}");
    // A second resync finds nothing to move.
    let (again, _) = resync(&src, &dst, None);
    assert_eq!((again.replaced, again.bytes_sent), (0, 0), "{again:?}");
}

#[test]
fn a_receiver_with_nothing_gets_everything_and_an_empty_sender_empties_it() {
    let (_dir, src, dst) = open_two();
    for cf in PG_RANGES {
        for n in 0..40 {
            put(&src, cf, &key(PG, n), &n.to_be_bytes());
        }
    }
    let (stats, _) = resync(&src, &dst, None);
    assert_eq!(stats.rows_sent, 40 * PG_RANGES.len() as u64);
    assert_eq!(pg_digest(&dst, PG).unwrap(), pg_digest(&src, PG).unwrap());

    let (_dir2, empty, _) = open_two();
    resync(&empty, &dst, None);
    assert_eq!(pg_digest(&dst, PG).unwrap().rows, 0);
}

#[test]
fn a_bad_delta_is_refused() {
    let (_dir, _src, dst) = open_two();
    let mut w = DeltaWriter::new(dst.clone(), PG);
    assert!(
        w.apply(DeltaOp::Put {
            cf: Cf::Blocks,
            key: key(PG, 1),
            value: b"x".to_vec(),
        })
        .is_err(),
        "a row before any range"
    );
    assert!(
        w.apply(DeltaOp::Replace {
            cf: Cf::Blocks,
            from: Some(key(OTHER, 1)),
            to: None,
        })
        .is_err(),
        "another PG's range"
    );
    w.apply(DeltaOp::Replace {
        cf: Cf::Blocks,
        from: Some(key(PG, 2)),
        to: Some(key(PG, 6)),
    })
    .unwrap();
    for (cf, n) in [(Cf::Blocks, 1), (Cf::Blocks, 6), (Cf::Objects, 3)] {
        assert!(
            w.apply(DeltaOp::Put {
                cf,
                key: key(PG, n),
                value: b"x".to_vec(),
            })
            .is_err(),
            "{cf:?} {n} is outside [2, 6) of blocks"
        );
    }
    w.apply(DeltaOp::Put {
        cf: Cf::Blocks,
        key: key(PG, 5),
        value: b"x".to_vec(),
    })
    .unwrap();
    assert_eq!(cf_from_wire(cf_to_wire(Cf::Chunks)), Some(Cf::Chunks));
    assert_eq!(cf_from_wire(cf_to_wire(Cf::RaftLog)), None);
    assert_eq!(cf_from_wire(u32::MAX), None);
}

fn contents() -> impl Strategy<Value = Vec<(u8, u16, u8)>> {
    // (column family index, key, value): small key and value spaces so
    // that the two sides share, change and lack rows.
    prop::collection::vec((0u8..6, 0u16..300, 0u8..4), 0..400)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the two sides hold, a resync (even one cut off and then
    /// run again) leaves the receiver identical to the sender.
    #[test]
    fn the_receiver_ends_identical_to_the_sender(
        src_rows in contents(),
        dst_rows in contents(),
        cut in prop::option::of(0usize..50),
    ) {
        let (_dir, src, dst) = open_two();
        for (db, rows) in [(&src, &src_rows), (&dst, &dst_rows)] {
            for (cf, k, v) in rows {
                put(db, PG_RANGES[*cf as usize], &key(PG, u32::from(*k)), &[*v; 3]);
            }
        }
        put(&dst, Cf::Objects, &key(OTHER, 9), b"other");
        keep_as_base(&dst, PG, 1).unwrap();
        let (_, finished) = resync(&src, &dst, cut);
        if !finished {
            prop_assert_eq!(base_of(&dst, PG).unwrap(), Some(1));
            resync(&src, &dst, None);
        }
        prop_assert_eq!(pg_digest(&dst, PG).unwrap(), pg_digest(&src, PG).unwrap());
        prop_assert_eq!(base_of(&dst, PG).unwrap(), None);
        prop_assert_eq!(dst.get(Cf::Objects, &key(OTHER, 9)).unwrap().unwrap(), b"other".to_vec());
    }
}

#[test]
fn an_offer_out_of_order_or_of_another_pg_is_refused() {
    let (_dir, _src, dst) = open_two();
    for cf in PG_RANGES {
        for n in 0..40 {
            put(&dst, cf, &key(PG, n), &[1; 8]);
        }
    }
    let good = offer(&dst, PG).unwrap().segments;
    assert!(good.len() > PG_RANGES.len());
    assert_eq!(check_offer(PG, &good), Ok(()));
    assert_eq!(
        check_offer(OTHER, &good).map_err(|e| e.contains("outside")),
        Err(true)
    );
    let mut swapped = good.clone();
    swapped.swap(0, 1);
    assert!(check_offer(PG, &swapped).is_err());
    let mut overlapping = good.clone();
    overlapping[1].first_key = overlapping[0].last_key.clone();
    assert!(check_offer(PG, &overlapping).is_err());
    let mut backwards = good.clone();
    let first = std::mem::take(&mut backwards[0].first_key);
    backwards[0].first_key = std::mem::replace(&mut backwards[0].last_key, first);
    assert!(check_offer(PG, &backwards).is_err());
    let mut wrong_cf = good;
    wrong_cf[0].cf = Cf::RaftLog;
    assert!(check_offer(PG, &wrong_cf).is_err());
}
