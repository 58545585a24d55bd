//! openraft's storage conformance suite against our log store and state
//! machine (shared/research/openraft.md §5.10).

use lifeboat_replication::TypeConfig;
use lifeboat_replication::log_files::LogFiles;
use lifeboat_replication::log_store::{LogStore, WalSyncer};
use lifeboat_replication::state_machine::StateMachine;
use lifeboat_store::PgId;
use lifeboat_store::db::{Db, DbOptions};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

/// A syncer whose segment files live under `dir` and take entries of at
/// least `entry_bytes_min` bytes (0: every entry; `usize::MAX`: none).
fn syncer(db: &Db, dir: &std::path::Path, entry_bytes_min: usize) -> WalSyncer {
    WalSyncer::start(
        db.clone(),
        LogFiles::new(dir.join("raft-log"), entry_bytes_min),
    )
}

/// Builds stores whose log keeps entries of at least `entry_bytes_min`
/// bytes in segment files.
struct Builder {
    entry_bytes_min: usize,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).expect("open db");
        // PG 7: the suite must work for any PG, not only the catalog.
        let pg = PgId(7);
        let log = LogStore::new(
            db.clone(),
            pg,
            syncer(&db, dir.path(), self.entry_bytes_min),
        );
        let sm =
            StateMachine::open(db, pg, &dir.path().join("snapshots")).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_stores_pass_openraft_storage_suite() {
    Suite::test_all(Builder {
        entry_bytes_min: usize::MAX,
    })
    .await
    .expect("openraft storage suite");
}

/// The same suite with every entry in segment files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_file_log_passes_openraft_storage_suite() {
    Suite::test_all(Builder { entry_bytes_min: 0 })
        .await
        .expect("openraft storage suite, entries in segment files");
}

/// The log's span and the purge point that keeps N bytes, across appends,
/// a purge and a truncation: positions stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_span_and_purge_point_follow_appends_purges_and_truncation() {
    use lifeboat_proto::raft as pb;
    use lifeboat_replication::Command;
    use lifeboat_replication::wire::{Entry, make_log_id};
    use openraft::storage::{IOFlushed, RaftLogStorage};

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
    let mut log = LogStore::new(db.clone(), PgId(3), syncer(&db, dir.path(), usize::MAX));
    assert_eq!(log.span().unwrap(), None);

    let entry = |index: u64, len: usize| Entry {
        log_id: make_log_id(1, 1, index),
        payload: openraft::EntryPayload::Normal(Command(pb::Command {
            stamp_ms: index,
            kind: Some(pb::command::Kind::InitCatalog(pb::InitCatalog {
                cluster_id: "x".repeat(len),
                ..Default::default()
            })),
        })),
    };
    let sizes: Vec<u64> = (1..=10)
        .map(|i| {
            lifeboat_replication::wire::encode_entry(&entry(i, 1000))
                .unwrap()
                .len() as u64
        })
        .collect();
    log.append((1..=10).map(|i| entry(i, 1000)), IOFlushed::noop())
        .await
        .unwrap();
    let span = log.span().unwrap().unwrap();
    assert_eq!((span.first, span.last), (1, 10));
    assert_eq!(span.bytes, sizes.iter().sum::<u64>());
    // Keeping 3 entries' worth purges up to entry 7.
    let three: u64 = sizes[7..].iter().sum();
    assert_eq!(log.purge_point_keeping(&span, three).unwrap(), Some(7));
    assert_eq!(log.purge_point_keeping(&span, three - 1).unwrap(), Some(8));
    assert_eq!(log.purge_point_keeping(&span, span.bytes).unwrap(), None);

    log.purge(make_log_id(1, 1, 4)).await.unwrap();
    let span = log.span().unwrap().unwrap();
    assert_eq!((span.first, span.last), (5, 10));
    assert_eq!(span.bytes, sizes[4..].iter().sum::<u64>());

    // Truncate after 8 and append two larger entries: positions continue.
    log.truncate_after(Some(make_log_id(1, 1, 8)))
        .await
        .unwrap();
    log.append([entry(9, 5000), entry(10, 5000)], IOFlushed::noop())
        .await
        .unwrap();
    let big = lifeboat_replication::wire::encode_entry(&entry(9, 5000))
        .unwrap()
        .len() as u64;
    let span = log.span().unwrap().unwrap();
    assert_eq!(span.bytes, sizes[4..8].iter().sum::<u64>() + 2 * big);
    assert_eq!(log.purge_point_keeping(&span, big).unwrap(), Some(9));

    // Purged entirely, the next append starts positions afresh.
    log.purge(make_log_id(1, 1, 10)).await.unwrap();
    assert_eq!(log.span().unwrap(), None);
    log.append([entry(11, 10)], IOFlushed::noop())
        .await
        .unwrap();
    let span = log.span().unwrap().unwrap();
    let small = lifeboat_replication::wire::encode_entry(&entry(11, 10))
        .unwrap()
        .len() as u64;
    assert_eq!((span.first, span.last, span.bytes), (11, 11, small));
}

/// A member's snapshot is a view of its replica: taking one writes no
/// file, and what it hands over is the state at its index, whatever was
/// applied after it was taken. Installed elsewhere, it leaves no file
/// behind either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_a_view_frozen_at_its_index() {
    use lifeboat_proto::raft as pb;
    use lifeboat_replication::Command;
    use lifeboat_replication::wire::{Entry, make_log_id};
    use lifeboat_store::raft_snapshot::pg_digest;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    async fn apply(sm: &mut StateMachine, commands: Vec<(u64, pb::command::Kind)>) {
        let entries = commands.into_iter().map(|(index, kind)| {
            Ok((
                Entry {
                    log_id: make_log_id(1, 1, index),
                    payload: openraft::EntryPayload::Normal(Command(pb::Command {
                        stamp_ms: index,
                        kind: Some(kind),
                    })),
                },
                None,
            ))
        });
        sm.apply(futures::stream::iter(entries)).await.unwrap();
    }
    let write = |block: u64, frame: &'static [u8]| {
        pb::command::Kind::WriteBlocks(pb::WriteBlocks {
            volume: 9,
            blocks: vec![pb::BlockWrite {
                block,
                frame: frame.to_vec().into(),
                expect_latest: None,
            }],
            newest_mask: None,
        })
    };
    let files_in = |dir: &std::path::Path| std::fs::read_dir(dir).unwrap().count();

    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(7);
    let db_a = Db::open(&dir.path().join("a/db"), &DbOptions::default()).unwrap();
    let snaps_a = dir.path().join("a/snapshots");
    let mut sm_a = StateMachine::open(db_a.clone(), pg, &snaps_a).unwrap();
    apply(
        &mut sm_a,
        vec![
            (
                1,
                pb::command::Kind::CreateVolume(pb::CreateVolume {
                    volume: 9,
                    name: "disk0".into(),
                    size_bytes: 8 * 4096,
                    base: None,
                }),
            ),
            (2, write(0, b"frame-at-2")),
        ],
    )
    .await;
    let at_2 = pg_digest(&db_a, pg).unwrap();
    let taken = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(taken.meta.last_log_id, Some(make_log_id(1, 1, 2)));
    assert_eq!(
        files_in(&snaps_a.join("pg-7")),
        0,
        "a snapshot copies nothing"
    );

    apply(
        &mut sm_a,
        vec![(3, write(0, b"frame-at-3")), (4, write(1, b"frame-at-4"))],
    )
    .await;
    assert_ne!(pg_digest(&db_a, pg).unwrap(), at_2);
    let current = sm_a.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(
        current.meta.last_log_id,
        Some(make_log_id(1, 1, 4)),
        "the current snapshot is the applied state"
    );

    let db_b = Db::open(&dir.path().join("b/db"), &DbOptions::default()).unwrap();
    let snaps_b = dir.path().join("b/snapshots");
    let mut sm_b = StateMachine::open(db_b.clone(), pg, &snaps_b).unwrap();
    sm_b.install_snapshot(&taken.meta, taken.snapshot)
        .await
        .unwrap();
    assert_eq!(
        sm_b.applied_state().await.unwrap().0,
        Some(make_log_id(1, 1, 2))
    );
    assert_eq!(
        pg_digest(&db_b, pg).unwrap(),
        at_2,
        "the snapshot holds the state it was taken at, not what came after"
    );
    assert_eq!(
        files_in(&snaps_b.join("pg-7")),
        0,
        "installed, its file is gone"
    );
}

/// A crash can leave log rows durable whose segment bytes are not (the
/// WAL reached the disk first). The next open cuts the log before the
/// first such entry, keeps every entry before it, appends after it into a
/// new segment, and a purge past the old segment deletes its file. An
/// entry at or below the committed index that fails its check is
/// corruption: the log refuses to open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_segment_tail_cuts_the_log_before_it() {
    use lifeboat_proto::raft as pb;
    use lifeboat_replication::Command;
    use lifeboat_replication::wire::{Entry, make_log_id};
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

    let entry = |index: u64, fill: u8| Entry {
        log_id: make_log_id(1, 1, index),
        payload: openraft::EntryPayload::Normal(Command(pb::Command {
            stamp_ms: index,
            kind: Some(pb::command::Kind::InitCatalog(pb::InitCatalog {
                cluster_id: String::from_utf8(vec![b'a' + fill % 26; 10_000]).unwrap(),
                ..Default::default()
            })),
        })),
    };
    let segments = |dir: &std::path::Path| -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.join("raft-log").join(format!("pg-{:016x}", 3)))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let size = lifeboat_replication::wire::encode_entry(&entry(1, 0))
        .unwrap()
        .len() as u64;

    for committed in [None, Some(4)] {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
        let mut log = LogStore::new(db.clone(), PgId(3), syncer(&db, dir.path(), 1000));
        log.append((1..=5).map(|i| entry(i, i as u8)), IOFlushed::noop())
            .await
            .unwrap();
        if let Some(c) = committed {
            log.save_committed(Some(make_log_id(1, 1, c)))
                .await
                .unwrap();
        }
        drop(log);
        // The crash: the segment lost entry 4's last byte and entry 5.
        let files = segments(dir.path());
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].1, 5 * size);
        let path = dir
            .path()
            .join("raft-log")
            .join(format!("pg-{:016x}", 3))
            .join(&files[0].0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4 * size - 1)
            .unwrap();

        // The restart: a new registry of segment files over the same rows.
        let mut log = LogStore::new(db.clone(), PgId(3), syncer(&db, dir.path(), 1000));
        if committed.is_some() {
            let err = log.get_log_state().await.unwrap_err();
            assert!(err.to_string().contains("committed log entry 4"), "{err}");
            continue;
        }
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(make_log_id(1, 1, 3)));
        let kept = log.try_get_log_entries(1..10).await.unwrap();
        assert_eq!(kept, (1..=3).map(|i| entry(i, i as u8)).collect::<Vec<_>>());

        // Appends go on in a new segment made for entry 4.
        log.append([entry(4, 40)], IOFlushed::noop()).await.unwrap();
        assert_eq!(
            log.try_get_log_entries(4..5).await.unwrap(),
            vec![entry(4, 40)]
        );
        let files = segments(dir.path());
        assert_eq!(files.len(), 2);
        assert!(
            files[1].0.ends_with(&format!("-{:016x}.seg", 4)),
            "{files:?}"
        );

        // Purged up to 2, the old segment may still hold entry 3; up to 3
        // it holds nothing live and goes.
        log.purge(make_log_id(1, 1, 2)).await.unwrap();
        assert_eq!(segments(dir.path()).len(), 2);
        log.purge(make_log_id(1, 1, 3)).await.unwrap();
        assert_eq!(segments(dir.path()), vec![files[1].clone()]);
        assert_eq!(
            log.try_get_log_entries(4..5).await.unwrap(),
            vec![entry(4, 40)]
        );
    }
}

/// A segment reused from the pool still holds its old entries' bytes past
/// what has been written to it since. A crash that loses new writes there
/// leaves old bytes, not zeros or a short file, under the rows that refer
/// to them: the next open still finds them by their CRC and cuts the log
/// before the first, and entries written before it read back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_write_into_a_reused_segment_cuts_the_log_before_it() {
    use std::os::unix::fs::MetadataExt;

    use lifeboat_proto::raft as pb;
    use lifeboat_replication::Command;
    use lifeboat_replication::wire::{Entry, encode_entry, make_log_id};
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

    // Every entry the same size, so new entries lie exactly over old ones.
    let entry = |index: u64| Entry {
        log_id: make_log_id(1, 1, index),
        payload: openraft::EntryPayload::Normal(Command(pb::Command {
            stamp_ms: index,
            kind: Some(pb::command::Kind::InitCatalog(pb::InitCatalog {
                cluster_id: String::from_utf8(vec![b'a' + (index % 26) as u8; 10_000]).unwrap(),
                ..Default::default()
            })),
        })),
    };
    let size = encode_entry(&entry(1)).unwrap().len();
    for i in 2..=10 {
        assert_eq!(encode_entry(&entry(i)).unwrap().len(), size);
    }
    let dir = tempfile::tempdir().unwrap();
    let pg_dir = dir.path().join("raft-log").join(format!("pg-{:016x}", 3));
    let free = dir.path().join("raft-log").join("free");
    let db = Db::open(&dir.path().join("db"), &DbOptions::default()).unwrap();
    // Each open is a new process. Segments hold two entries.
    let open = || {
        let files = LogFiles::with_limits(dir.path().join("raft-log"), 1000, 2 * size as u64, 16);
        LogStore::new(db.clone(), PgId(3), WalSyncer::start(db.clone(), files))
    };

    // Entries 1-6 in segments 1-3; a purge past 4 sends segments 1 and 2
    // to the pool.
    let mut log = open();
    log.append((1..=6).map(entry), IOFlushed::noop())
        .await
        .unwrap();
    log.purge(make_log_id(1, 1, 4)).await.unwrap();
    let pooled: std::collections::HashMap<u64, Vec<u8>> = std::fs::read_dir(&free)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                std::fs::metadata(&path).unwrap().ino(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    assert_eq!(pooled.len(), 2, "segments 1 and 2 wait for reuse");

    // Entries 7-8 start a segment because segment 3 is full: a pooled
    // file, overwritten in place.
    log.append((7..=8).map(entry), IOFlushed::noop())
        .await
        .unwrap();
    drop(log);
    let reused = pg_dir.join(format!("{:016x}-{:016x}.seg", 4, 7));
    let old_bytes = &pooled[&std::fs::metadata(&reused).unwrap().ino()];
    let new_bytes = std::fs::read(&reused).unwrap();
    assert_eq!(new_bytes.len(), 2 * size);
    assert_ne!(&new_bytes, old_bytes);

    // The crash: the write of entry 8 never reached the disk, so the file
    // holds an old entry there.
    let mut torn = new_bytes[..size].to_vec();
    torn.extend_from_slice(&old_bytes[size..]);
    std::fs::write(&reused, &torn).unwrap();

    let mut log = open();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(make_log_id(1, 1, 7)));
    assert_eq!(
        log.try_get_log_entries(5..20).await.unwrap(),
        (5..=7).map(entry).collect::<Vec<_>>()
    );
}
