//! The history against a model: random writes, object puts and deletes,
//! snapshots, clones, volume deletes and undeletes, restores, undos,
//! horizon moves and GC runs go through apply; a plain model keeps a full
//! copy of the PG's state after every entry. Every moment inside the
//! window, every snapshot and every clone base must read exactly as the
//! model says, before and after every GC run, and GC must never leave a
//! version nothing can read. The usage kept in apply must match a recount
//! after every entry, and each GC pass's census must sort exactly the
//! stored bytes, live ones as a read now finds them.

use std::collections::BTreeMap;

use lifeboat_proto::raft as pb;
use lifeboat_store::db::{Db, DbOptions, Durability};
use lifeboat_store::masks::{self, Span};
use lifeboat_store::objects::{ObjectVersion, Objects};
use lifeboat_store::volumes::Volumes;
use lifeboat_store::{BlockNo, BucketId, LogIndex, PgId, VolumeId, gc, usage};
use proptest::prelude::*;

use super::ApplyContext;
use crate::types::Applied;

const PG: PgId = PgId(2);
const BLOCKS: u64 = 4;
const KEYS: u8 = 3;
const BUCKET: u64 = 100;
/// Each entry in its own 10 ms timeline bucket.
const STAMP_STEP_MS: u64 = 100;

#[derive(Clone, Debug)]
enum Op {
    Write { volume: u8, block: u8, byte: u8 },
    Put { key: u8, byte: u8 },
    DeleteObject { key: u8 },
    Snapshot,
    DeleteSnapshot { pick: u8 },
    Clone { volume: u8, back: u8 },
    DeleteVolume { volume: u8 },
    UndeleteVolume { volume: u8 },
    Restore { back: u8 },
    Undo,
    Advance { back: u8 },
    Gc { max_rows: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4u8, 0..BLOCKS as u8, 0..4u8).prop_map(|(volume, block, byte)| Op::Write { volume, block, byte }),
        3 => (0..KEYS, 1..4u8).prop_map(|(key, byte)| Op::Put { key, byte }),
        1 => (0..KEYS).prop_map(|key| Op::DeleteObject { key }),
        1 => Just(Op::Snapshot),
        1 => any::<u8>().prop_map(|pick| Op::DeleteSnapshot { pick }),
        1 => (0..4u8, any::<u8>()).prop_map(|(volume, back)| Op::Clone { volume, back }),
        1 => (0..4u8).prop_map(|volume| Op::DeleteVolume { volume }),
        1 => (0..4u8).prop_map(|volume| Op::UndeleteVolume { volume }),
        1 => any::<u8>().prop_map(|back| Op::Restore { back }),
        1 => Just(Op::Undo),
        2 => any::<u8>().prop_map(|back| Op::Advance { back }),
        2 => (1..6u8).prop_map(|max_rows| Op::Gc { max_rows }),
    ]
}

/// The PG's state after one entry, as a reader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    /// Volume id → (deleted, block contents; 0 reads as zeros).
    volumes: BTreeMap<u64, (bool, [u8; BLOCKS as usize])>,
    objects: BTreeMap<u8, u8>,
}

struct Harness {
    _dir: tempfile::TempDir,
    db: Db,
    /// `states[i]`: after entry i (entry 0 is the empty PG).
    states: Vec<State>,
    /// (restore index, restore point, covered volumes) of each mask.
    masks: Vec<(u64, u64, Vec<u64>)>,
    snapshots: Vec<(String, u64)>,
    /// Clone bases: (base volume, index).
    bases: Vec<(u64, u64)>,
    horizon: u64,
    /// Every block version written: (volume, block, index).
    writes: Vec<(u64, u64, u64)>,
    next_id: u64,
    next_chunk: u64,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        let mut h = Harness {
            _dir: dir,
            db,
            states: vec![State::default()],
            masks: Vec::new(),
            snapshots: Vec::new(),
            bases: Vec::new(),
            horizon: 0,
            writes: Vec::new(),
            next_id: 1,
            next_chunk: 1,
        };
        let bucket = pb::command::Kind::CreateBucket(pb::CreateBucket {
            bucket: BUCKET,
            name: "b".into(),
            base: None,
        });
        assert_eq!(h.apply(bucket), Ok(Applied::Done));
        h.states.push(h.now().clone());
        // A window of 1 ms: the horizon may go anywhere the test sends it.
        let window = pb::command::Kind::SetWindow(pb::SetWindow {
            window_ms: 1,
            only_if_unset: false,
        });
        assert_eq!(h.apply(window), Ok(Applied::Done));
        h.states.push(h.now().clone());
        for _ in 0..2 {
            h.create_volume(None);
        }
        h
    }

    fn now(&self) -> &State {
        self.states.last().unwrap()
    }

    fn index(&self) -> u64 {
        self.states.len() as u64 - 1
    }

    /// Applies one entry at the next index, in a batch of its own.
    fn apply(&mut self, kind: pb::command::Kind) -> Result<Applied, crate::Rejection> {
        let index = self.states.len() as u64;
        let mut cx = ApplyContext::new(&self.db, PG);
        let outcome = cx
            .apply_command(
                LogIndex(index),
                &pb::Command {
                    stamp_ms: index * STAMP_STEP_MS,
                    kind: Some(kind),
                },
            )
            .unwrap();
        self.db.write(cx.batch, Durability::Buffered).unwrap();
        outcome
    }

    fn create_volume(&mut self, base: Option<(u64, u64)>) {
        let id = self.next_id;
        self.next_id += 1;
        let outcome = self.apply(pb::command::Kind::CreateVolume(pb::CreateVolume {
            volume: id,
            name: format!("v{id}"),
            size_bytes: BLOCKS * 4096,
            base: base.map(|(volume, index)| pb::VolumeBase {
                volume,
                index,
                pg: None,
            }),
        }));
        assert_eq!(
            outcome,
            Ok(Applied::Done),
            "create volume {id} base {base:?}"
        );
        let blocks = match base {
            Some((volume, index)) => self.states[index as usize].volumes[&volume].1,
            None => [0; BLOCKS as usize],
        };
        let mut next = self.now().clone();
        next.volumes.insert(id, (false, blocks));
        self.states.push(next);
        if let Some(b) = base {
            self.bases.push(b);
        }
    }

    /// Indexes a restore point may name: inside the window, or pinned.
    fn held(&self) -> Vec<u64> {
        let mut held: Vec<u64> = (self.horizon.max(1)..=self.index()).collect();
        held.extend(self.snapshots.iter().map(|(_, i)| *i));
        held.sort_unstable();
        held.dedup();
        held
    }

    fn pick(&self, back: u8) -> u64 {
        let held = self.held();
        held[held.len() - 1 - (back as usize % held.len())]
    }

    fn live_volume(&self, pick: u8) -> Option<u64> {
        let live: Vec<u64> = self
            .now()
            .volumes
            .iter()
            .filter(|(_, (deleted, _))| !deleted)
            .map(|(id, _)| *id)
            .collect();
        (!live.is_empty()).then(|| live[pick as usize % live.len()])
    }

    fn run(&mut self, op: &Op) {
        use pb::command::Kind;
        let mut next = self.now().clone();
        let outcome = match op {
            Op::Write {
                volume,
                block,
                byte,
            } => {
                let Some(id) = self.live_volume(*volume) else {
                    return;
                };
                let frame = if *byte == 0 {
                    Vec::new()
                } else {
                    vec![id as u8, *block, *byte]
                };
                next.volumes.get_mut(&id).unwrap().1[*block as usize] = *byte;
                self.writes.push((id, u64::from(*block), self.index() + 1));
                self.apply(Kind::WriteBlocks(pb::WriteBlocks {
                    volume: id,
                    blocks: vec![pb::BlockWrite {
                        block: u64::from(*block),
                        frame: frame.into(),
                        expect_latest: None,
                    }],
                    newest_mask: None,
                }))
            }
            Op::Put { key, byte } => {
                let chunk = self.next_chunk;
                self.next_chunk += 1;
                next.objects.insert(*key, *byte);
                self.apply(Kind::PutObject(pb::PutObject {
                    bucket: BUCKET,
                    key: vec![b'k', *key].into(),
                    chunks: vec![chunk],
                    new_chunks: vec![pb::ChunkWrite {
                        chunk,
                        frame: vec![*byte; 3].into(),
                    }],
                    record: vec![*key, *byte].into(),
                    if_absent: false,
                    stream: 0,
                }))
            }
            Op::DeleteObject { key } => {
                next.objects.remove(key);
                self.apply(Kind::DeleteObject(pb::DeleteObject {
                    bucket: BUCKET,
                    key: vec![b'k', *key].into(),
                }))
            }
            Op::Snapshot => {
                let name = format!("s{}", self.index() + 1);
                let outcome = self.apply(Kind::CreateSnapshot(pb::CreateSnapshot {
                    name: name.clone(),
                    at_index: None,
                    at_ms: 0,
                    locked_until_ms: 0,
                }));
                self.snapshots.push((name, self.index() + 1));
                outcome.map(|_| Applied::Done)
            }
            Op::DeleteSnapshot { pick } => {
                if self.snapshots.is_empty() {
                    return;
                }
                let (name, _) = self.snapshots.remove(*pick as usize % self.snapshots.len());
                self.apply(Kind::DeleteSnapshot(pb::DeleteSnapshot {
                    name,
                    operator: false,
                }))
                .map(|_| Applied::Done)
            }
            Op::Clone { volume, back } => {
                let at = self.pick(*back);
                let live: Vec<u64> = self.states[at as usize]
                    .volumes
                    .iter()
                    .filter(|(_, (deleted, _))| !deleted)
                    .map(|(id, _)| *id)
                    .collect();
                if live.is_empty() || self.now().volumes.len() >= 8 {
                    return;
                }
                let source = live[*volume as usize % live.len()];
                self.create_volume(Some((source, at)));
                return;
            }
            Op::DeleteVolume { volume } => {
                let Some(id) = self.live_volume(*volume) else {
                    return;
                };
                next.volumes.get_mut(&id).unwrap().0 = true;
                self.apply(Kind::DeleteVolume(pb::DeleteVolume { volume: id }))
            }
            Op::UndeleteVolume { volume } => {
                let deleted: Vec<u64> = self
                    .now()
                    .volumes
                    .iter()
                    .filter(|(_, (deleted, _))| *deleted)
                    .map(|(id, _)| *id)
                    .collect();
                if deleted.is_empty() {
                    return;
                }
                let id = deleted[*volume as usize % deleted.len()];
                // Its deletion: the last entry whose state has it live.
                let deleted_at = (0..self.states.len())
                    .rev()
                    .find(|i| self.states[*i].volumes.get(&id).is_some_and(|v| !v.0))
                    .unwrap() as u64
                    + 1;
                let outcome = self.apply(Kind::UndeleteVolume(pb::UndeleteVolume { volume: id }));
                if deleted_at <= self.horizon {
                    assert!(
                        outcome.is_err(),
                        "undelete of {id} deleted behind the horizon"
                    );
                    self.states.push(next);
                    return;
                }
                next.volumes.get_mut(&id).unwrap().0 = false;
                outcome
            }
            Op::Restore { back } => {
                let to = self.pick(*back);
                self.restore(to, None, next);
                return;
            }
            Op::Undo => {
                let Some((r, _, covered)) = self.masks.last().cloned() else {
                    return;
                };
                if r - 1 < self.horizon && !self.snapshots.iter().any(|(_, i)| *i == r - 1) {
                    return;
                }
                self.restore(r - 1, Some(covered), next);
                return;
            }
            Op::Advance { back } => {
                let span = self.index() - self.horizon.max(1) + 1;
                let to = self.index() - u64::from(*back) % span.max(1);
                let outcome = self.apply(Kind::AdvanceHorizon(pb::AdvanceHorizon {
                    at_ms: to * STAMP_STEP_MS,
                }));
                if to > self.horizon {
                    assert_eq!(outcome, Ok(Applied::HorizonMoved { index: to }));
                    self.horizon = to;
                }
                outcome
            }
            Op::Gc { max_rows } => {
                let mut steps = 0;
                loop {
                    // Each run is a whole pass, which also takes a census.
                    let outcome = self.apply(Kind::CollectGarbage(pb::CollectGarbage {
                        max_rows: u32::from(*max_rows),
                        new_pass: steps == 0,
                    }));
                    self.states.push(next.clone());
                    steps += 1;
                    assert!(steps < 10_000, "GC never finishes");
                    match outcome {
                        Ok(Applied::Collected { done: true, .. }) => break,
                        Ok(Applied::Collected { .. }) => {}
                        other => panic!("GC step: {other:?}"),
                    }
                }
                return;
            }
        };
        assert!(outcome.is_ok(), "{op:?}: {outcome:?}");
        self.states.push(next);
    }

    /// Restores to `to` (an undo passes the mask's volumes).
    fn restore(&mut self, to: u64, covered: Option<Vec<u64>>, mut next: State) {
        let then = self.states[to as usize].clone();
        let undo = covered.is_some();
        let covered = covered.unwrap_or_else(|| {
            then.volumes
                .iter()
                .filter(|(_, (deleted, _))| !deleted)
                .map(|(id, _)| *id)
                .collect()
        });
        for id in &covered {
            let blocks = then.volumes[id].1;
            next.volumes.get_mut(id).unwrap().1 = blocks;
        }
        next.objects = then.objects.clone();
        let outcome = self.apply(pb::command::Kind::RestorePg(pb::RestorePg {
            to_index: if undo { 0 } else { to },
            to_ms: 0,
            undo,
            operator: true,
        }));
        assert!(outcome.is_ok(), "restore to {to}: {outcome:?}");
        self.masks.push((self.index() + 1, to, covered));
        self.states.push(next);
    }

    /// How many block versions the store should hold once GC has run:
    /// those above the horizon of volumes live then, and the newest at or
    /// below the horizon and each pin (snapshot, clone base, restore
    /// point) while the volume was live.
    fn needed_block_versions(&self) -> usize {
        let mut pins: Vec<u64> = self.snapshots.iter().map(|(_, i)| *i).collect();
        pins.extend(self.bases.iter().map(|(_, i)| *i));
        pins.extend(self.masks.iter().map(|(_, to, _)| *to));
        let mut groups: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
        for (volume, block, index) in &self.writes {
            groups.entry((*volume, *block)).or_default().push(*index);
        }
        let mut needed = 0;
        for ((volume, _), indexes) in groups {
            if self.horizon == 0 {
                needed += indexes.len();
                continue;
            }
            // Deleted now: when it was deleted.
            let ended = self.now().volumes[&volume].0.then(|| {
                (0..self.states.len())
                    .rev()
                    .find(|i| self.states[*i].volumes.get(&volume).is_some_and(|v| !v.0))
                    .unwrap() as u64
                    + 1
            });
            let alive = |p: u64| ended.is_none_or(|d| p < d);
            let mut kept: Vec<u64> = indexes
                .iter()
                .copied()
                .filter(|i| alive(self.horizon) && *i > self.horizon)
                .collect();
            for p in pins
                .iter()
                .copied()
                .chain([self.horizon])
                .filter(|p| alive(*p))
            {
                kept.extend(indexes.iter().copied().filter(|i| *i <= p).max());
            }
            kept.sort_unstable();
            kept.dedup();
            needed += kept.len();
        }
        needed
    }

    fn stored_block_versions(&self) -> usize {
        let mut count = 0;
        self.db
            .read_view()
            .for_each_with_prefix(
                lifeboat_store::db::Cf::Blocks,
                &lifeboat_store::keys::pg_prefix(PG),
                |_, _| {
                    count += 1;
                    Ok(())
                },
            )
            .unwrap();
        count
    }

    /// The PG's usage row says what its rows hold, and after a whole GC
    /// pass with no write in it, its census sorts exactly those bytes, with
    /// live ones as a read now finds them.
    fn check_usage(&self, after_gc: bool) {
        let u = usage::usage(&self.db, PG).unwrap();
        assert_eq!(
            (u.stored_bytes, u.versions),
            usage::recount(&self.db, PG).unwrap(),
            "usage kept in apply against a recount"
        );
        if !after_gc {
            return;
        }
        let census = u.census.expect("a whole pass leaves a census");
        assert_eq!(
            census.index,
            LogIndex(self.index()),
            "census of the last GC step"
        );
        assert_eq!(census.total(), u.stored_bytes, "census {census:?}");
        let volumes = Volumes::new(self.db.clone());
        let mut live = 0;
        for (id, (deleted, _)) in &self.now().volumes {
            if *deleted {
                continue;
            }
            let layers = volumes.layers(PG, VolumeId(*id), None).unwrap();
            for b in volumes
                .visible_blocks(PG, &layers, BlockNo(0), BLOCKS)
                .unwrap()
                .into_iter()
                .flatten()
            {
                // A clone's blocks read from its base are the base's.
                if b.volume == VolumeId(*id) {
                    live += b.value.len() as u64;
                }
            }
        }
        // Each put is one chunk of a 3-byte frame.
        live += 3 * self.now().objects.len() as u64;
        assert_eq!(census.live_bytes, live, "live bytes in {census:?}");
    }

    /// Every held moment, every snapshot and every clone base reads as
    /// the model says.
    fn check(&self, when: &str) {
        let volumes = Volumes::new(self.db.clone());
        let objects = Objects::new(self.db.clone());
        let all_masks = masks::masks(&self.db, PG).unwrap();
        let mut points: Vec<u64> = self.held();
        points.extend(self.bases.iter().map(|(_, i)| *i));
        points.sort_unstable();
        points.dedup();
        for at in points {
            let state = &self.states[at as usize];
            for (id, (deleted, blocks)) in &state.volumes {
                if *deleted {
                    continue;
                }
                let layers = volumes
                    .layers(PG, VolumeId(*id), Some(LogIndex(at)))
                    .unwrap();
                let read: Vec<u8> = volumes
                    .visible_blocks(PG, &layers, BlockNo(0), BLOCKS)
                    .unwrap()
                    .into_iter()
                    .map(|b| b.and_then(|b| b.value.get(2).copied()).unwrap_or(0))
                    .collect();
                assert_eq!(
                    read, blocks,
                    "{when}: volume {id} at {at} (horizon {})",
                    self.horizon
                );
            }
            let spans: Vec<Span> = masks::spans(
                &all_masks,
                |m| m.covers_bucket(BucketId(BUCKET)),
                Some(LogIndex(at)),
            );
            for key in 0..KEYS {
                let found = objects
                    .find(PG, BucketId(BUCKET), &[b'k', key], &spans)
                    .unwrap()
                    .map(|(_, v)| match v {
                        ObjectVersion::Object { record, .. } => record[1],
                        other => panic!("find gave {other:?}"),
                    });
                assert_eq!(
                    found,
                    state.objects.get(&key).copied(),
                    "{when}: key {key} at {at} (horizon {})",
                    self.horizon
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn history_reads_as_the_model_says_before_and_after_gc(ops in prop::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in &ops {
            let gc = matches!(op, Op::Gc { .. });
            if gc {
                h.check("before GC");
            }
            h.run(op);
            if gc {
                h.check("after GC");
            }
            h.check_usage(gc);
        }
        // A last horizon move and GC over everything.
        h.run(&Op::Advance { back: 3 });
        h.check("before the last GC");
        h.run(&Op::Gc { max_rows: 4 });
        h.check("after the last GC");
        h.check_usage(true);
        // Exactly what is needed is left.
        prop_assert_eq!(h.stored_block_versions(), h.needed_block_versions());
        prop_assert_eq!(gc::cursor(&h.db, PG).unwrap(), gc::Cursor::Done);
    }
}
