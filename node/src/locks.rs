//! Per-block locks for sub-block writes (DESIGN.md "Write path", step 3).
//!
//! A write that covers part of a 4 KiB block must read the block, merge and
//! encode it, and have it applied before any other sub-block write of the
//! same block reads it; otherwise two disjoint 512-byte writes into one block
//! erase each other. Locks are striped: blocks that hash to one stripe share
//! a lock, which only costs concurrency, never correctness.
//!
//! Invariant: a holder takes stripes in ascending order, so two holders can
//! never wait on each other.

use std::hash::{Hash, Hasher};

use lifeboat_store::{BlockNo, PgId, VolumeId};
use tokio::sync::{Mutex, MutexGuard};

/// Number of lock stripes; enough that unrelated blocks rarely collide.
pub const BLOCK_LOCK_STRIPES: usize = 4096;

pub struct BlockLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for BlockLocks {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockLocks {
    pub fn new() -> BlockLocks {
        BlockLocks {
            stripes: (0..BLOCK_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    fn stripe(pg: PgId, volume: VolumeId, block: BlockNo) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (pg, volume, block).hash(&mut h);
        (h.finish() % BLOCK_LOCK_STRIPES as u64) as usize
    }

    /// Locks every given block until the returned guards are dropped.
    pub async fn lock(
        &self,
        pg: PgId,
        volume: VolumeId,
        blocks: &[BlockNo],
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = blocks
            .iter()
            .map(|b| Self::stripe(pg, volume, *b))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s].lock().await);
        }
        guards
    }
}
