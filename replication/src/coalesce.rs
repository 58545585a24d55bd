//! Group commit of small whole-block writes.
//!
//! Every Raft entry costs the same fixed work on each member, whatever it
//! carries: a proposal through openraft's core, a log record (memtable
//! insert, WAL write, flush), its share of a replication message, an apply
//! and a responder. Merging the small writes that are in flight together
//! pays that once for many: with three voters and a DR learner, 4 KiB
//! writes at queue depth 32 went from about 4,300 to 5,000 IOPS
//! (BENCHMARKS.md, "Group commit of small block writes").
//!
//! So a node lets at most [`IN_FLIGHT_MAX`] small writes of one group be
//! in flight from it at once. A write that arrives while all of them are
//! taken waits in the group's queue, and each slot, when its write is
//! answered, proposes as many waiting writes as fit in one entry. With
//! fewer writes in flight than that (a single writer) nothing waits, so
//! latency is unchanged.
//!
//! Invariants:
//! - a merged entry is of one volume (a `WriteBlocks` names one) and names
//!   each block at most once (apply refuses an entry that names one twice):
//!   a write that shares a block with the batch waits for a later one;
//! - only whole-block writes that read nothing merge: a merged sub-block
//!   write carries the version it read, and apply refuses the whole entry
//!   when that changed;
//! - a merged entry stays below the size at which the log store moves an
//!   entry to a segment file (an extra fsync per append);
//! - every waiter gets an answer: the entry's, or, when apply refused the
//!   entry (all or nothing), its own from proposing its write again alone,
//!   so one bad write never fails its neighbours.

use std::collections::{HashSet, VecDeque};

use lifeboat_proto::raft as pb;

use crate::log_files::FILE_ENTRY_BYTES_MIN;

/// Small writes of one group this node keeps in flight before merging the
/// rest: enough to keep openraft's pipeline busy, few enough that writes
/// queue and merge at concurrency 32 (2 to 16 measured the same there;
/// BENCHMARKS.md, "Group commit of small block writes").
pub const IN_FLIGHT_MAX: usize = 4;

/// Blocks in one merged entry.
pub const MERGED_BLOCKS_MAX: usize = 64;

/// Bytes of one merged entry as estimated by [`entry_bytes`]: under the
/// size at which the log store writes an entry to a segment file.
pub const MERGED_BYTES_MAX: usize = FILE_ENTRY_BYTES_MIN - 4096;

/// An upper bound on an entry's encoded size per block beyond its frame
/// (field tags, the block number, the length prefix, expect_latest).
const BLOCK_OVERHEAD_BYTES: usize = 24;

/// The encoded size of a `WriteBlocks` of these blocks, near enough to
/// keep merged entries under [`MERGED_BYTES_MAX`].
pub fn entry_bytes(blocks: &[pb::BlockWrite]) -> usize {
    blocks
        .iter()
        .map(|b| b.frame.len() + BLOCK_OVERHEAD_BYTES)
        .sum()
}

/// Whether a write may wait to be merged with others: whole blocks that
/// read nothing, small enough to share an entry.
pub fn mergeable(blocks: &[pb::BlockWrite]) -> bool {
    !blocks.is_empty()
        && blocks.len() <= MERGED_BLOCKS_MAX
        && blocks.iter().all(|b| b.expect_latest.is_none())
        && entry_bytes(blocks) <= MERGED_BYTES_MAX
}

/// One write waiting for a slot; `answer` is how it is told the outcome.
pub struct Waiting<A> {
    pub volume: u64,
    pub blocks: Vec<pb::BlockWrite>,
    pub answer: A,
}

/// The writes of one group waiting to be merged, and its slots.
pub struct WriteQueue<A> {
    /// Slots taken: writes (merged or not) in flight from this node.
    in_flight: usize,
    waiting: VecDeque<Waiting<A>>,
}

impl<A> Default for WriteQueue<A> {
    fn default() -> Self {
        WriteQueue {
            in_flight: 0,
            waiting: VecDeque::new(),
        }
    }
}

/// What [`WriteQueue::enter`] decided.
pub enum Entered<A> {
    /// A slot was free and is now this write's: propose it, then call
    /// [`WriteQueue::release`].
    Slot(Waiting<A>),
    /// Every slot is taken: the write waits and is answered through its
    /// `answer`.
    Queued,
}

impl<A> WriteQueue<A> {
    pub fn enter(&mut self, write: Waiting<A>) -> Entered<A> {
        if self.in_flight < IN_FLIGHT_MAX {
            self.in_flight += 1;
            Entered::Slot(write)
        } else {
            self.waiting.push_back(write);
            Entered::Queued
        }
    }

    /// A slot's write was answered. Returns the next batch, which keeps
    /// the slot (propose it, then release again), or frees the slot when
    /// nothing waits.
    pub fn release(&mut self) -> Option<Vec<Waiting<A>>> {
        let batch = self.take_batch();
        if batch.is_none() {
            self.in_flight -= 1;
        }
        batch
    }

    /// Gives up a slot without taking a batch (there is no runtime left to
    /// propose one on); the waiters are dropped with their answers.
    pub fn abandon(&mut self) -> Vec<Waiting<A>> {
        self.in_flight -= 1;
        if self.in_flight == 0 {
            self.waiting.drain(..).collect()
        } else {
            Vec::new()
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The oldest waiting write and, in arrival order, every later one of
    /// the same volume that fits beside it and names none of its blocks.
    fn take_batch(&mut self) -> Option<Vec<Waiting<A>>> {
        let first = self.waiting.pop_front()?;
        let volume = first.volume;
        let mut blocks = first.blocks.len();
        let mut bytes = entry_bytes(&first.blocks);
        let mut named: HashSet<u64> = first.blocks.iter().map(|b| b.block).collect();
        let mut batch = vec![first];
        let mut i = 0;
        while i < self.waiting.len() && blocks < MERGED_BLOCKS_MAX && bytes < MERGED_BYTES_MAX {
            let w = &self.waiting[i];
            let fits = w.volume == volume
                && blocks + w.blocks.len() <= MERGED_BLOCKS_MAX
                && bytes + entry_bytes(&w.blocks) <= MERGED_BYTES_MAX
                && w.blocks.iter().all(|b| !named.contains(&b.block));
            if fits {
                let w = self.waiting.remove(i).expect("index checked");
                blocks += w.blocks.len();
                bytes += entry_bytes(&w.blocks);
                named.extend(w.blocks.iter().map(|b| b.block));
                batch.push(w);
            } else {
                i += 1;
            }
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn block(block: u64, bytes: usize) -> pb::BlockWrite {
        pb::BlockWrite {
            block,
            frame: Bytes::from(vec![7u8; bytes]),
            expect_latest: None,
        }
    }

    fn write(volume: u64, blocks: &[u64], id: u32) -> Waiting<u32> {
        Waiting {
            volume,
            blocks: blocks.iter().map(|&b| block(b, 4096)).collect(),
            answer: id,
        }
    }

    fn ids(batch: &[Waiting<u32>]) -> Vec<u32> {
        batch.iter().map(|w| w.answer).collect()
    }

    /// Fills every slot, so that what enters next waits.
    fn full_queue() -> WriteQueue<u32> {
        let mut q = WriteQueue::default();
        for n in 0..IN_FLIGHT_MAX {
            assert!(matches!(
                q.enter(write(1, &[1000 + n as u64], 0)),
                Entered::Slot(_)
            ));
        }
        q
    }

    #[test]
    fn writes_wait_only_once_every_slot_is_taken() {
        let mut q = WriteQueue::default();
        for n in 0..IN_FLIGHT_MAX {
            assert!(matches!(
                q.enter(write(1, &[n as u64], 0)),
                Entered::Slot(_)
            ));
        }
        assert!(matches!(q.enter(write(1, &[99], 1)), Entered::Queued));
        assert_eq!((q.in_flight(), q.waiting()), (IN_FLIGHT_MAX, 1));
        // The first answered slot carries the waiter on; the next frees.
        assert_eq!(ids(&q.release().unwrap()), vec![1]);
        assert_eq!(q.in_flight(), IN_FLIGHT_MAX);
        assert!(q.release().is_none());
        assert_eq!(q.in_flight(), IN_FLIGHT_MAX - 1);
        assert!(matches!(q.enter(write(1, &[5], 2)), Entered::Slot(_)));
    }

    #[test]
    fn a_batch_is_of_one_volume_and_names_each_block_once() {
        let mut q = full_queue();
        for (volume, blocks, id) in [
            (1, &[1, 2][..], 1),
            (2, &[1][..], 2),
            (1, &[2, 3][..], 3),
            (1, &[4][..], 4),
            (1, &[3][..], 5),
        ] {
            assert!(matches!(
                q.enter(write(volume, blocks, id)),
                Entered::Queued
            ));
        }
        // 3 shares block 2 with 1 and waits; 5 does not share with 1 or 4.
        assert_eq!(ids(&q.release().unwrap()), vec![1, 4, 5]);
        // Arrival order is kept among those left.
        assert_eq!(ids(&q.release().unwrap()), vec![2]);
        assert_eq!(ids(&q.release().unwrap()), vec![3]);
        assert!(q.release().is_none());
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_batch_stays_under_the_segment_file_size() {
        let mut q = full_queue();
        let writes = 2 * MERGED_BYTES_MAX / 4096;
        for n in 0..writes {
            assert!(matches!(
                q.enter(write(1, &[n as u64], n as u32)),
                Entered::Queued
            ));
        }
        let mut batches = Vec::new();
        while q.waiting() > 0 {
            batches.push(q.release().unwrap());
        }
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), writes);
        // Each merged entry, encoded as the log store encodes it (every
        // header field at its widest), stays under the segment-file size.
        let sizes: Vec<usize> = batches
            .iter()
            .map(|batch| {
                let blocks: Vec<_> = batch.iter().flat_map(|w| w.blocks.clone()).collect();
                let estimate = entry_bytes(&blocks);
                let cmd = crate::types::Command(pb::Command {
                    stamp_ms: u64::MAX,
                    kind: Some(pb::command::Kind::WriteBlocks(pb::WriteBlocks {
                        volume: u64::MAX,
                        blocks,
                        newest_mask: None,
                    })),
                });
                let entry = crate::wire::Entry {
                    log_id: crate::wire::make_log_id(u64::MAX, u64::MAX, u64::MAX),
                    payload: openraft::EntryPayload::Normal(cmd),
                };
                let encoded = crate::wire::encode_entry(&entry).unwrap().len();
                assert!(encoded < FILE_ENTRY_BYTES_MIN, "{encoded} bytes");
                estimate
            })
            .collect();
        assert!(sizes.iter().all(|&s| s <= MERGED_BYTES_MAX));
        // Every batch but the last is full: one more block would not fit.
        let one_more = 4096 + BLOCK_OVERHEAD_BYTES;
        assert!(
            sizes[..sizes.len() - 1]
                .iter()
                .all(|&s| s + one_more > MERGED_BYTES_MAX)
        );
    }

    #[test]
    fn only_small_whole_block_writes_merge() {
        assert!(mergeable(&[block(1, 4096)]));
        assert!(!mergeable(&[]));
        let mut merged = block(1, 4096);
        merged.expect_latest = Some(3);
        assert!(!mergeable(&[merged]));
        let big: Vec<_> = (0..16).map(|b| block(b, 4096)).collect();
        assert!(!mergeable(&big));
        let zeros: Vec<_> = (0..=MERGED_BLOCKS_MAX as u64)
            .map(|b| block(b, 0))
            .collect();
        assert!(!mergeable(&zeros));
        assert!(mergeable(&zeros[..MERGED_BLOCKS_MAX]));
    }

    #[test]
    fn the_last_slot_abandoned_drops_the_waiters() {
        let mut q = full_queue();
        assert!(matches!(q.enter(write(1, &[1], 1)), Entered::Queued));
        for _ in 1..IN_FLIGHT_MAX {
            assert!(q.abandon().is_empty());
        }
        assert_eq!(ids(&q.abandon()), vec![1]);
        assert_eq!((q.in_flight(), q.waiting()), (0, 0));
    }
}
