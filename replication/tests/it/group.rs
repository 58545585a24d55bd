//! A single-voter protection group over the real store.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::log_files::{FILE_ENTRY_BYTES_MIN, LogFiles};
use lifeboat_replication::log_store::WalSyncer;
use lifeboat_replication::transport::{Identity, Peers};
use lifeboat_replication::{
    Applied, Clock, Error, GroupStart, Heartbeats, MemberNode, ProtectionGroup, RaftTimers,
    Rejection, SystemClock,
};
use lifeboat_store::db::{Db, DbOptions};
use lifeboat_store::volumes::{VolumeState, Volumes};
use lifeboat_store::{BlockNo, Generation, LogIndex, MemberId, NodeId, PgId, VolumeId};

fn timers() -> RaftTimers {
    RaftTimers {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: 400,
    }
}

/// Opens the db, waiting for a previous in-process instance to let go of
/// RocksDB's lock (its background tasks drop their handles shortly after
/// shutdown returns).
async fn must_open(dir: &std::path::Path) -> Db {
    let started = std::time::Instant::now();
    loop {
        match Db::open(&dir.join("db"), &DbOptions::default()) {
            Ok(db) => return db,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open db: {e}"),
        }
    }
}

async fn must_start(dir: &std::path::Path, pg: PgId) -> (Db, ProtectionGroup) {
    let db = must_open(dir).await;
    let g = ProtectionGroup::start(GroupStart {
        pg,
        member: MemberId(1),
        generation: Generation(0),
        db: db.clone(),
        syncer: WalSyncer::start(
            db.clone(),
            LogFiles::new(dir.join("raft-log"), FILE_ENTRY_BYTES_MIN),
        ),
        snapshot_root: &dir.join("snapshots"),
        timers: &timers(),
        heartbeats: Heartbeats::PerGroup,
        clock: Arc::new(SystemClock),
        peers: Peers::new(),
        identity: Identity::new(NodeId(1), Some("test-cluster".into())),
        events: Arc::new(lifeboat_replication::ack::LogEvents),
        // These groups run without a catalog to grant site leases.
        leases: Arc::new(lifeboat_replication::lease::LeaseTable::unenforced()),
    })
    .await
    .unwrap();
    g.initialize([(1, MemberNode::default())].into_iter().collect())
        .await
        .unwrap();
    g.campaign().await;
    g.wait_for_leadership(Duration::from_secs(10))
        .await
        .unwrap();
    (db, g)
}

fn write(volume: u64, block: u64, frame: &[u8]) -> pb::command::Kind {
    pb::command::Kind::WriteBlocks(pb::WriteBlocks {
        volume,
        blocks: vec![pb::BlockWrite {
            block,
            frame: frame.to_vec().into(),
            expect_latest: None,
        }],
        newest_mask: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_apply_at_their_index_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(3);
    let (db, g) = must_start(dir.path(), pg).await;
    let (created, applied) = g
        .propose(pb::command::Kind::CreateVolume(pb::CreateVolume {
            volume: 9,
            name: "disk0".into(),
            size_bytes: 8 * 4096,
            base: None,
        }))
        .await
        .unwrap();
    assert_eq!(applied, Applied::Done);
    let (i1, _) = g.propose(write(9, 2, b"first-frame")).await.unwrap();
    let (i2, _) = g.propose(write(9, 2, b"second-frame")).await.unwrap();
    assert!(created < i1 && i1 < i2);

    // Refusals are deterministic and carry facts.
    let e = g.propose(write(9, 8, b"past-the-end")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                rejection: Rejection::BlockOutOfRange {
                    block: 8,
                    blocks: 8,
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    let e = g
        .propose(write(10, 0, b"no-such-volume"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                rejection: Rejection::VolumeNotFound { volume: 10 },
                ..
            }
        ),
        "{e:?}"
    );
    let e = g
        .propose(pb::command::Kind::CreateTenant(pb::CreateTenant {
            name: "t".into(),
            wrapped_dek: vec![1, 0, 0, 0, 1].into(),
            members: Vec::new(),
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                rejection: Rejection::WrongGroup { .. },
                ..
            }
        ),
        "{e:?}"
    );

    let v = Volumes::new(db.clone());
    let at = |i: LogIndex| {
        v.block_at(pg, VolumeId(9), BlockNo(2), i)
            .unwrap()
            .map(|b| b.value)
    };
    assert_eq!(at(i1).unwrap(), b"first-frame");
    assert_eq!(at(i2).unwrap(), b"second-frame");
    assert_eq!(at(LogIndex(i1.0 - 1)), None);
    let read_index = g.read_barrier().await.unwrap();
    assert!(read_index >= i2);

    g.shutdown().await.unwrap();
    drop(g);
    drop(v);
    drop(db);

    // Restart: the log and the state machine come back; new writes go on.
    let (db, g) = must_start(dir.path(), pg).await;
    let m = g.metrics();
    assert!(m.applied_index >= i2, "{m:?}");
    let v = Volumes::new(db);
    let latest = v.latest_blocks(pg, VolumeId(9), BlockNo(2), 1).unwrap();
    assert_eq!(latest[0].as_ref().unwrap().value, b"second-frame");
    let (i3, _) = g.propose(write(9, 2, b"third-frame")).await.unwrap();
    assert!(i3 > i2);
    let (_, rec) = v.volume(pg, VolumeId(9)).unwrap().unwrap();
    assert_eq!(rec.state, VolumeState::Active);
    g.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_allocates_ids_and_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (db, g) = must_start(dir.path(), PgId::CATALOG).await;
    let wrapped = |key_id: u32| {
        let mut w = vec![1u8];
        w.extend_from_slice(&key_id.to_be_bytes());
        w.extend_from_slice(&[0u8; 40]);
        w
    };
    let tenant = |name: &str| {
        pb::command::Kind::CreateTenant(pb::CreateTenant {
            name: name.into(),
            wrapped_dek: wrapped(1).into(),
            members: vec![pb::PlacedMember {
                node_id: 1,
                voter: true,
            }],
        })
    };
    // Nothing but init is accepted before init.
    let e = g.propose(tenant("early")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                rejection: Rejection::Malformed { .. },
                ..
            }
        ),
        "{e:?}"
    );
    g.propose(pb::command::Kind::InitCatalog(pb::InitCatalog {
        cluster_id: "c1".into(),
        site: "primary".into(),
        node_id: 1,
        operator_token_sha256: vec![7; 32].into(),
        addrs: None,
        ..Default::default()
    }))
    .await
    .unwrap();
    let (_, a) = g.propose(tenant("alpha")).await.unwrap();
    let (_, b) = g.propose(tenant("beta")).await.unwrap();
    assert_eq!(
        a,
        Applied::TenantCreated {
            tenant_id: 1,
            main_pg: 1
        }
    );
    assert_eq!(
        b,
        Applied::TenantCreated {
            tenant_id: 2,
            main_pg: 2
        }
    );
    let e = g.propose(tenant("alpha")).await.unwrap_err();
    assert!(matches!(
        e,
        Error::Rejected {
            rejection: Rejection::TenantExists { .. },
            ..
        }
    ));

    let bind = |name: &str| {
        pb::command::Kind::BindVolumeName(pb::BindVolumeName {
            tenant: "alpha".into(),
            volume_name: name.into(),
            pg_name: "main".into(),
            existing_volume: None,
        })
    };
    let (_, v1) = g.propose(bind("disk0")).await.unwrap();
    assert_eq!(v1, Applied::VolumeNameBound { pg: 1, volume: 1 });
    let e = g.propose(bind("disk0")).await.unwrap_err();
    assert!(matches!(
        e,
        Error::Rejected {
            rejection: Rejection::VolumeNameTaken { .. },
            ..
        }
    ));

    // Rotation must name the next key id.
    let rotate = |key_id| {
        pb::command::Kind::RotateDek(pb::RotateDek {
            tenant: "alpha".into(),
            wrapped_dek: wrapped(key_id).into(),
        })
    };
    let e = g.propose(rotate(3)).await.unwrap_err();
    assert!(matches!(
        e,
        Error::Rejected {
            rejection: Rejection::KeyIdOutOfOrder {
                current: 1,
                proposed: 3,
                ..
            },
            ..
        }
    ));
    let (_, r) = g.propose(rotate(2)).await.unwrap();
    assert_eq!(r, Applied::KeyRotated { key_id: 2 });

    let catalog = lifeboat_replication::catalog::Catalog::new(db);
    let alpha = catalog.tenant("alpha").unwrap().unwrap();
    assert_eq!(alpha.current_key_id, 2);
    assert_eq!(alpha.wrapped_deks.len(), 2);
    assert_eq!(
        catalog
            .volume_name("alpha", "disk0")
            .unwrap()
            .unwrap()
            .volume,
        1
    );
    assert_eq!(catalog.pgs().unwrap().len(), 2);
    // Member ids: 1 is the first node's catalog member, PGs take the next.
    let pgs = catalog.pgs().unwrap();
    let member_ids: Vec<u64> = pgs.iter().map(|p| p.members[0].member_id).collect();
    assert_eq!(member_ids, vec![2, 3]);

    // Nodes join by spending a one-time join token: unknown, expired, used
    // by another node or for another site, it is refused.
    let token = |n: u8, site: &str, expires_ms: u64| {
        pb::command::Kind::CreateJoinToken(pb::CreateJoinToken {
            token_sha256: vec![n; 32].into(),
            site: site.into(),
            expires_ms,
        })
    };
    let later = SystemClock.now_ms() + 3_600_000;
    for (n, site, expires) in [(1, "", later), (2, "dr", later), (3, "", 1), (4, "", later)] {
        g.propose(token(n, site, expires)).await.unwrap();
    }
    let add_with = |id: u64, site: &str, token: u8| {
        pb::command::Kind::AddNode(pb::AddNode {
            node_id: id,
            site: site.into(),
            addrs: None,
            join_token_sha256: vec![token; 32].into(),
            node_key_sha256: vec![id as u8; 32].into(),
            witness: false,
        })
    };
    let refused = async |cmd| match g.propose(cmd).await.unwrap_err() {
        Error::Rejected {
            rejection: Rejection::JoinToken { reason },
            ..
        } => reason,
        other => panic!("{other:?}"),
    };
    assert!(refused(add_with(2, "primary", 9)).await.contains("unknown"));
    assert!(refused(add_with(2, "primary", 3)).await.contains("expired"));
    assert!(
        refused(add_with(2, "primary", 2))
            .await
            .contains("for site \"dr\"")
    );

    // The catalog gets voters at the cluster's site up to three, learners
    // elsewhere; a node id is never reused, even after removal.
    let (_, n2) = g.propose(add_with(2, "primary", 1)).await.unwrap();
    assert_eq!(
        n2,
        Applied::NodeAdded {
            catalog_member: 4,
            catalog_voter: true
        }
    );
    assert!(
        refused(add_with(5, "primary", 1))
            .await
            .contains("used by node 2")
    );
    let (_, n3) = g.propose(add_with(3, "dr", 2)).await.unwrap();
    assert_eq!(
        n3,
        Applied::NodeAdded {
            catalog_member: 5,
            catalog_voter: false
        }
    );
    g.propose(pb::command::Kind::RemoveNode(pb::RemoveNode { node_id: 2 }))
        .await
        .unwrap();
    let e = g.propose(add_with(2, "primary", 4)).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                rejection: Rejection::NodeExists { node: 2 },
                ..
            }
        ),
        "{e:?}"
    );
    let placement = catalog.catalog_placement().unwrap().unwrap();
    let on: Vec<(u64, bool)> = placement
        .members
        .iter()
        .map(|m| (m.node_id, m.voter))
        .collect();
    assert_eq!(on, vec![(1, true), (3, false)]);
    assert!(catalog.node(2).unwrap().unwrap().removed);
    g.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_block_is_refused_when_its_block_changed() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(4);
    let (db, g) = must_start(dir.path(), pg).await;
    g.propose(pb::command::Kind::CreateVolume(pb::CreateVolume {
        volume: 1,
        name: "d".into(),
        size_bytes: 4 * 4096,
        base: None,
    }))
    .await
    .unwrap();
    let merged = |expect: u64, frame: &[u8]| {
        pb::command::Kind::WriteBlocks(pb::WriteBlocks {
            volume: 1,
            blocks: vec![pb::BlockWrite {
                block: 0,
                frame: frame.to_vec().into(),
                expect_latest: Some(expect),
            }],
            newest_mask: None,
        })
    };
    // Never written: the merge read "nothing" (0).
    let (i1, _) = g.propose(merged(0, b"a")).await.unwrap();
    // A second merge that also read "nothing" lost the race: refused whole.
    let e = g.propose(merged(0, b"b")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rejected {
                rejection: Rejection::BlockChanged {
                    volume: 1,
                    block: 0
                },
                ..
            }
        ),
        "{e:?}"
    );
    g.propose(merged(i1.0, b"c")).await.unwrap();
    let latest = Volumes::new(db)
        .latest_blocks(pg, VolumeId(1), BlockNo(0), 1)
        .unwrap();
    assert_eq!(latest[0].as_ref().unwrap().value, b"c");
    g.shutdown().await.unwrap();
}

fn put_object(
    key: &str,
    chunks: &[u64],
    new: &[(u64, &[u8])],
    if_absent: bool,
) -> pb::command::Kind {
    pb::command::Kind::PutObject(pb::PutObject {
        bucket: 21,
        key: key.as_bytes().to_vec().into(),
        chunks: chunks.to_vec(),
        new_chunks: new
            .iter()
            .map(|(chunk, frame)| pb::ChunkWrite {
                chunk: *chunk,
                frame: frame.to_vec().into(),
            })
            .collect(),
        record: format!("record of {key}").into_bytes().into(),
        if_absent,
        stream: 0,
    })
}

fn rejection(e: Error) -> Rejection {
    match e {
        Error::Rejected { rejection, .. } => rejection,
        other => panic!("not a rejection: {other:?}"),
    }
}

/// Buckets and objects through Raft: versions at their index, chunks
/// stored once and counted per version, create-only puts, delete markers,
/// and every refusal, with concurrent create-only puts racing in one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_and_objects_apply_at_their_index() {
    use lifeboat_store::objects::{ListQuery, Listed, ObjectVersion, Objects};
    use lifeboat_store::{BucketId, ChunkId};
    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(4);
    let (db, g) = must_start(dir.path(), pg).await;
    let objects = Objects::new(db.clone());
    let bucket = BucketId(21);
    let create = pb::command::Kind::CreateBucket(pb::CreateBucket {
        bucket: 21,
        name: "payroll-backups".into(),
        base: None,
    });
    g.propose(create.clone()).await.unwrap();
    assert_eq!(
        rejection(g.propose(create).await.unwrap_err()),
        Rejection::BucketExists { bucket: 21 }
    );

    let (v1, _) = g
        .propose(put_object(
            "a/one",
            &[100, 101],
            &[(100, b"f100"), (101, b"f101")],
            false,
        ))
        .await
        .unwrap();
    // A copy shares chunk 101 and adds one of its own.
    let (v2, _) = g
        .propose(put_object("b/copy", &[101, 102], &[(102, b"f102")], false))
        .await
        .unwrap();
    assert_eq!(objects.chunk_refs(pg, ChunkId(101)).unwrap(), 2);
    assert_eq!(objects.chunk_refs(pg, ChunkId(100)).unwrap(), 1);
    assert_eq!(
        objects.chunk(pg, ChunkId(102)).unwrap().as_deref(),
        Some(&b"f102"[..])
    );
    // Overwriting keeps the old version (and its chunks) in the history.
    let (v3, _) = g
        .propose(put_object("a/one", &[103], &[(103, b"f103")], false))
        .await
        .unwrap();
    assert!(v1 < v2 && v2 < v3);
    assert_eq!(objects.latest(pg, bucket, b"a/one").unwrap().unwrap().0, v3);
    let (at, old) = objects
        .version_at(pg, bucket, b"a/one", v2)
        .unwrap()
        .unwrap();
    assert_eq!(at, v1);
    assert_eq!(old.chunks(), [ChunkId(100), ChunkId(101)]);
    assert_eq!(objects.chunk_refs(pg, ChunkId(100)).unwrap(), 1);

    // Refusals, none of which leaves a trace.
    let cases = [
        (
            put_object("x", &[100], &[(100, b"again")], false),
            Rejection::ChunkExists { chunk: 100 },
        ),
        (
            put_object("x", &[999], &[], false),
            Rejection::ChunkNotFound { chunk: 999 },
        ),
        (
            put_object("x", &[104], &[(105, b"f")], false),
            Rejection::Malformed {
                reason: "new chunk 105 is not in the chunk list".into(),
            },
        ),
        (put_object("a/one", &[], &[], true), Rejection::ObjectExists),
        (
            put_object(&"k".repeat(1025), &[], &[], false),
            Rejection::KeyTooLong {
                bytes: 1025,
                max: 1024,
            },
        ),
        (
            pb::command::Kind::DeleteBucket(pb::DeleteBucket { bucket: 21 }),
            Rejection::BucketNotEmpty { bucket: 21 },
        ),
        (
            pb::command::Kind::PutObject(pb::PutObject {
                bucket: 22,
                ..Default::default()
            }),
            Rejection::BucketNotFound { bucket: 22 },
        ),
    ];
    for (kind, expected) in cases {
        assert_eq!(rejection(g.propose(kind).await.unwrap_err()), expected);
    }
    assert_eq!(objects.chunk(pg, ChunkId(105)).unwrap(), None);
    assert_eq!(objects.versions(pg, bucket, b"x").unwrap(), []);

    // Create-only puts racing for one key: exactly one wins, however the
    // entries are batched into applies.
    let racers = (0..8u64).map(|i| {
        let g = g.clone();
        async move {
            g.propose(put_object("race", &[200 + i], &[(200 + i, b"r")], true))
                .await
        }
    });
    let results = futures::future::join_all(racers).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for r in results.into_iter().filter(|r| r.is_err()) {
        assert_eq!(rejection(r.unwrap_err()), Rejection::ObjectExists);
    }

    // Delete markers hide keys from latest reads and listings; deleting a
    // key without a live version writes nothing.
    for key in ["a/one", "b/copy", "race"] {
        g.propose(pb::command::Kind::DeleteObject(pb::DeleteObject {
            bucket: 21,
            key: key.as_bytes().to_vec().into(),
        }))
        .await
        .unwrap();
    }
    g.propose(pb::command::Kind::DeleteObject(pb::DeleteObject {
        bucket: 21,
        key: b"never".to_vec().into(),
    }))
    .await
    .unwrap();
    assert_eq!(objects.versions(pg, bucket, b"never").unwrap(), []);
    assert_eq!(objects.latest(pg, bucket, b"a/one").unwrap(), None);
    assert!(matches!(
        objects.versions(pg, bucket, b"a/one").unwrap()[0].1,
        ObjectVersion::DeleteMarker
    ));
    let listing = objects
        .list(
            pg,
            bucket,
            &ListQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        !listing
            .entries
            .iter()
            .any(|e| matches!(e, Listed::Object { .. })),
        "{listing:?}"
    );
    // Empty now, the bucket can go.
    g.propose(pb::command::Kind::DeleteBucket(pb::DeleteBucket {
        bucket: 21,
    }))
    .await
    .unwrap();
    assert_eq!(
        rejection(
            g.propose(put_object("late", &[], &[], false))
                .await
                .unwrap_err()
        ),
        Rejection::BucketNotFound { bucket: 21 }
    );
    g.shutdown().await.unwrap();
}

fn chunk_writes(new: &[(u64, &[u8])]) -> Vec<pb::ChunkWrite> {
    new.iter()
        .map(|(chunk, frame)| pb::ChunkWrite {
            chunk: *chunk,
            frame: frame.to_vec().into(),
        })
        .collect()
}

/// Data written ahead of the entry naming it: a stream's chunks pass to
/// the object that names them (and unnamed ones go), a released stream
/// leaves nothing; multipart parts are replaced, completed in order into
/// one version, checked against what the completer read, aborted, and
/// dropped with their bucket. Every chunk's count ends where its holders
/// say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_multipart_uploads_keep_chunk_counts_exact() {
    use lifeboat_store::objects::Objects;
    use lifeboat_store::uploads::Uploads;
    use lifeboat_store::{BucketId, ChunkId};
    use pb::command::Kind;
    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(4);
    let (db, g) = must_start(dir.path(), pg).await;
    let objects = Objects::new(db.clone());
    let uploads = Uploads::new(db.clone());
    let bucket = BucketId(21);
    let refs = |c: u64| objects.chunk_refs(pg, ChunkId(c)).unwrap();
    g.propose(Kind::CreateBucket(pb::CreateBucket {
        bucket: 21,
        name: "b".into(),
        base: None,
    }))
    .await
    .unwrap();

    // A stream of two entries; the object names three of its four chunks.
    for new in [[(1, &b"c1"[..]), (2, b"c2")], [(3, b"c3"), (4, b"c4")]] {
        g.propose(Kind::WriteChunks(pb::WriteChunks {
            stream: 7,
            chunks: chunk_writes(&new),
        }))
        .await
        .unwrap();
    }
    assert_eq!((refs(1), refs(4)), (1, 1));
    assert_eq!(uploads.stream_chunks(pg, 7).unwrap().len(), 4);
    g.propose(Kind::PutObject(pb::PutObject {
        bucket: 21,
        key: b"big".to_vec().into(),
        chunks: vec![1, 2, 3],
        stream: 7,
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!((refs(1), refs(2), refs(3), refs(4)), (1, 1, 1, 0));
    assert_eq!(objects.chunk(pg, ChunkId(4)).unwrap(), None);
    assert!(uploads.stream_chunks(pg, 7).unwrap().is_empty());

    // A writer that gave up: its stream is released and its chunks go.
    g.propose(Kind::WriteChunks(pb::WriteChunks {
        stream: 8,
        chunks: chunk_writes(&[(5, b"c5")]),
    }))
    .await
    .unwrap();
    // Chunk ids are never reused while in use, whoever holds them.
    assert_eq!(
        rejection(
            g.propose(Kind::WriteChunks(pb::WriteChunks {
                stream: 9,
                chunks: chunk_writes(&[(5, b"again")]),
            }))
            .await
            .unwrap_err()
        ),
        Rejection::ChunkExists { chunk: 5 }
    );
    g.propose(Kind::ReleaseStream(pb::ReleaseStream { stream: 8 }))
        .await
        .unwrap();
    assert_eq!(refs(5), 0);

    // Multipart: part 1 from a stream, part 2 inline and then replaced.
    g.propose(Kind::CreateUpload(pb::CreateUpload {
        bucket: 21,
        upload: 50,
        key: b"multi".to_vec().into(),
        record: b"sealed".to_vec().into(),
    }))
    .await
    .unwrap();
    g.propose(Kind::WriteChunks(pb::WriteChunks {
        stream: 10,
        chunks: chunk_writes(&[(11, b"p1a"), (12, b"p1b")]),
    }))
    .await
    .unwrap();
    let part = |n: u32, chunks: &[u64], new: &[(u64, &[u8])], stream: u64| {
        Kind::PutPart(pb::PutPart {
            bucket: 21,
            upload: 50,
            part: n,
            chunks: chunks.to_vec(),
            new_chunks: chunk_writes(new),
            record: vec![n as u8].into(),
            stream,
        })
    };
    g.propose(part(1, &[11, 12], &[], 10)).await.unwrap();
    g.propose(part(2, &[21], &[(21, b"p2")], 0)).await.unwrap();
    g.propose(part(2, &[22], &[(22, b"p2 again")], 0))
        .await
        .unwrap();
    g.propose(part(3, &[31], &[(31, b"p3")], 0)).await.unwrap();
    assert_eq!((refs(11), refs(21), refs(22)), (1, 0, 1));
    let listed: Vec<u32> = uploads
        .parts(pg, 50, 0, 10)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(listed, [1, 2, 3]);
    let completed = |parts: &[(u32, &[u64])]| {
        Kind::CompleteUpload(pb::CompleteUpload {
            bucket: 21,
            upload: 50,
            parts: parts
                .iter()
                .map(|(part, chunks)| pb::CompletedPart {
                    part: *part,
                    chunks: chunks.to_vec(),
                })
                .collect(),
            record: b"object".to_vec().into(),
            if_absent: false,
        })
    };
    // The completer read part 2 before it was replaced: refused.
    assert_eq!(
        rejection(
            g.propose(completed(&[(1, &[11, 12]), (2, &[21])]))
                .await
                .unwrap_err()
        ),
        Rejection::InvalidPart { part: 2 }
    );
    assert!(matches!(
        rejection(
            g.propose(completed(&[(2, &[22]), (1, &[11, 12])]))
                .await
                .unwrap_err()
        ),
        Rejection::Malformed { .. }
    ));
    // Parts 1 and 2 make the object; part 3, not named, goes.
    let (index, _) = g
        .propose(completed(&[(1, &[11, 12]), (2, &[22])]))
        .await
        .unwrap();
    let (at, version) = objects.latest(pg, bucket, b"multi").unwrap().unwrap();
    assert_eq!(at, index);
    assert_eq!(version.chunks(), [ChunkId(11), ChunkId(12), ChunkId(22)]);
    assert_eq!((refs(11), refs(22), refs(31)), (1, 1, 0));
    assert!(uploads.upload(pg, bucket, 50).unwrap().is_none());
    assert!(uploads.parts(pg, 50, 0, 10).unwrap().is_empty());
    assert_eq!(
        rejection(g.propose(completed(&[(1, &[11, 12])])).await.unwrap_err()),
        Rejection::UploadNotFound { upload: 50 }
    );

    // Abort drops the parts; a bucket delete drops its uploads too.
    for upload in [60, 61] {
        g.propose(Kind::CreateUpload(pb::CreateUpload {
            bucket: 21,
            upload,
            key: b"k".to_vec().into(),
            record: Default::default(),
        }))
        .await
        .unwrap();
        g.propose(Kind::PutPart(pb::PutPart {
            bucket: 21,
            upload,
            part: 1,
            chunks: vec![upload],
            new_chunks: chunk_writes(&[(upload, b"x")]),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    g.propose(Kind::AbortUpload(pb::AbortUpload {
        bucket: 21,
        upload: 60,
    }))
    .await
    .unwrap();
    assert_eq!((refs(60), refs(61)), (0, 1));
    for key in ["big", "multi"] {
        g.propose(Kind::DeleteObject(pb::DeleteObject {
            bucket: 21,
            key: key.as_bytes().to_vec().into(),
        }))
        .await
        .unwrap();
    }
    g.propose(Kind::DeleteBucket(pb::DeleteBucket { bucket: 21 }))
        .await
        .unwrap();
    assert_eq!(refs(61), 0);
    assert!(uploads.uploads(pg, bucket, None, 10).unwrap().is_empty());
    // Object versions keep their chunks in the history (GC is the
    // history's job).
    assert_eq!((refs(1), refs(11)), (1, 1));
}

/// Whole-block writes in flight together: those beyond the group's slots
/// wait and share entries, a block is never named twice in one entry, and
/// the newest entry naming a block is its latest version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_block_writes_in_flight_together_share_entries() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(5);
    let (db, g) = must_start(dir.path(), pg).await;
    let blocks = 32u64;
    create_volume(&g, 1, blocks).await;
    // Every block once, then blocks 0..16 again.
    let writes: Vec<(u64, Vec<u8>)> = (0..blocks + 16)
        .map(|n| (n % blocks, format!("frame {n}").into_bytes()))
        .collect();
    let mut entries: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (answer, (block, _)) in write_all_at_once(&g, &writes)
        .await
        .into_iter()
        .zip(&writes)
    {
        entries.entry(answer.unwrap().0).or_default().push(*block);
    }
    assert!(
        entries.len() < writes.len() / 2,
        "{} writes in {} entries: the waiting ones were not merged",
        writes.len(),
        entries.len()
    );
    for (index, named) in &entries {
        let distinct: HashSet<_> = named.iter().collect();
        assert_eq!(distinct.len(), named.len(), "entry {index} names {named:?}");
    }
    // Each block's latest version is the newest entry that wrote it, and
    // holds the frame of the write answered with that entry.
    let volumes = Volumes::new(db);
    for block in 0..blocks {
        let (newest, _) = entries
            .iter()
            .filter(|(_, named)| named.contains(&block))
            .max()
            .unwrap();
        let latest = volumes
            .latest_blocks(pg, VolumeId(1), BlockNo(block), 1)
            .unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(latest.index, LogIndex(*newest), "block {block}");
        assert!(
            writes
                .iter()
                .any(|(b, frame)| *b == block && *frame == latest.value),
            "block {block}"
        );
    }
    g.shutdown().await.unwrap();
}

/// A write that apply refuses, merged with others, fails alone: the
/// others are proposed again and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_does_not_fail_the_writes_merged_with_it() {
    use lifeboat_replication::coalesce::IN_FLIGHT_MAX;

    let dir = tempfile::tempdir().unwrap();
    let pg = PgId(6);
    let (db, g) = must_start(dir.path(), pg).await;
    let blocks = 16u64;
    create_volume(&g, 1, blocks).await;
    let mut writes: Vec<(u64, Vec<u8>)> = (0..blocks)
        .map(|b| (b, format!("frame of {b}").into_bytes()))
        .collect();
    // Among the waiting writes, so it is merged with its neighbours.
    let bad = IN_FLIGHT_MAX + 2;
    writes.insert(bad, (blocks, b"past the end".to_vec()));
    let answers = write_all_at_once(&g, &writes).await;
    let volumes = Volumes::new(db);
    for (n, (answer, (block, frame))) in answers.into_iter().zip(&writes).enumerate() {
        if n == bad {
            assert!(
                matches!(
                    answer,
                    Err(Error::Rejected {
                        rejection: Rejection::BlockOutOfRange { block: 16, .. },
                        ..
                    })
                ),
                "{answer:?}"
            );
            continue;
        }
        let index = answer.unwrap();
        let latest = volumes
            .latest_blocks(pg, VolumeId(1), BlockNo(*block), 1)
            .unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!((latest.index, &latest.value), (index, frame));
    }
    g.shutdown().await.unwrap();
}

async fn create_volume(g: &ProtectionGroup, volume: u64, blocks: u64) {
    g.propose(pb::command::Kind::CreateVolume(pb::CreateVolume {
        volume,
        name: format!("v{volume}"),
        size_bytes: blocks * 4096,
        base: None,
    }))
    .await
    .unwrap();
}

/// One-block writes of volume 1, all in flight at once: `join_all` polls
/// each once before any is answered, so the first
/// `coalesce::IN_FLIGHT_MAX` take the group's slots and the rest wait.
async fn write_all_at_once(
    g: &ProtectionGroup,
    writes: &[(u64, Vec<u8>)],
) -> Vec<Result<LogIndex, Error>> {
    futures::future::join_all(writes.iter().map(|(block, frame)| {
        g.write_blocks(
            1,
            vec![pb::BlockWrite {
                block: *block,
                frame: frame.clone().into(),
                expect_latest: None,
            }],
        )
    }))
    .await
}
