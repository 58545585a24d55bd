//! openraft's storage conformance suite against our log store and state
//! machine (shared/research/openraft.md §5.10).

use lifeboat_replication::TypeConfig;
use lifeboat_replication::log_store::{LogStore, WalSyncer};
use lifeboat_replication::state_machine::StateMachine;
use lifeboat_store::PgId;
use lifeboat_store::db::{Db, DbOptions};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&dir.path().join("db"), &DbOptions::default()).expect("open db");
        // PG 7: the suite must work for any PG, not only the catalog.
        let pg = PgId(7);
        let log = LogStore::new(db.clone(), pg, WalSyncer::start(db.clone()));
        let sm =
            StateMachine::open(db, pg, &dir.path().join("snapshots")).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_stores_pass_openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
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
    let mut log = LogStore::new(db.clone(), PgId(3), WalSyncer::start(db.clone()));
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
