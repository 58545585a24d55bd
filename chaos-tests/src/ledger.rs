//! The oracle of the write-load tests: for every block, the last write the
//! cluster acknowledged and the writes sent but not acknowledged (lost with
//! a killed node, or refused during a failover), which may or may not have
//! landed. Content is `data::block_content(block, seq)`, so a block read
//! back names the write it came from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::data::block_content;

#[derive(Default, Clone, Debug)]
pub struct BlockState {
    pub acked: Option<u64>,
    /// Sent and not acknowledged.
    pub in_flight: Vec<u64>,
}

/// Shared by every writer task; cheap to clone.
#[derive(Default, Clone)]
pub struct Ledger(Arc<Mutex<HashMap<u64, BlockState>>>);

impl Ledger {
    /// Records that write `seq` of `block` is about to be sent.
    pub fn sending(&self, block: u64, seq: u64) {
        let mut l = self.0.lock().expect("ledger lock");
        l.entry(block).or_default().in_flight.push(seq);
    }

    /// Records that write `seq` of `block` was acknowledged.
    pub fn acked(&self, block: u64, seq: u64) {
        let mut l = self.0.lock().expect("ledger lock");
        let s = l.entry(block).or_default();
        s.in_flight.retain(|x| *x != seq);
        s.acked = Some(seq);
    }

    /// How many blocks have an acknowledged write.
    pub fn acked_blocks(&self) -> usize {
        let l = self.0.lock().expect("ledger lock");
        l.values().filter(|s| s.acked.is_some()).count()
    }

    /// The acknowledged write of every block, in block order.
    pub fn acked_seqs(&self) -> Vec<(u64, u64)> {
        let l = self.0.lock().expect("ledger lock");
        let mut v: Vec<(u64, u64)> = l.iter().filter_map(|(b, s)| Some((*b, s.acked?))).collect();
        v.sort_unstable();
        v
    }

    pub fn blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .0
            .lock()
            .expect("ledger lock")
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Which write `got` (block `block` as read back) is, if it may be
    /// there: the acknowledged one or one sent at or after it. A block never
    /// acknowledged may also still read as zeros (`Ok(None)`).
    pub fn check(&self, block: u64, got: &[u8]) -> Result<Option<u64>, String> {
        let l = self.0.lock().expect("ledger lock");
        let state = l.get(&block).cloned().unwrap_or_default();
        let found = state
            .in_flight
            .iter()
            .chain(&state.acked)
            .filter(|s| state.acked.is_none_or(|a| **s >= a))
            .find(|s| got == block_content(block, **s, got.len()))
            .copied();
        match found {
            Some(seq) => Ok(Some(seq)),
            None if state.acked.is_none() && got.iter().all(|b| *b == 0) => Ok(None),
            None => Err(format!(
                "block {block} is not its last acknowledged write {:?} nor a later one in flight {:?}",
                state.acked, state.in_flight
            )),
        }
    }

    /// Makes what a block was found to hold the truth from now on (the
    /// in-flight writes that did not land never will).
    pub fn settle(&self, block: u64, landed: Option<u64>) {
        let mut l = self.0.lock().expect("ledger lock");
        let s = l.entry(block).or_default();
        if landed.is_some() {
            s.acked = landed;
        }
        s.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_may_hold_its_acked_write_or_a_later_one_in_flight() {
        let l = Ledger::default();
        l.sending(7, 1);
        assert_eq!(l.check(7, &[0; 64]), Ok(None));
        l.acked(7, 1);
        l.sending(7, 2);
        assert_eq!(l.check(7, &block_content(7, 1, 64)), Ok(Some(1)));
        assert_eq!(l.check(7, &block_content(7, 2, 64)), Ok(Some(2)));
        assert!(
            l.check(7, &[0; 64]).is_err(),
            "acked data never reads as zeros"
        );
        assert!(
            l.check(7, &block_content(8, 1, 64)).is_err(),
            "another block's data"
        );
        l.settle(7, Some(2));
        l.sending(7, 3);
        l.acked(7, 4);
        // 3 was sent before 4 was acknowledged: it cannot show up after 4.
        assert!(l.check(7, &block_content(7, 3, 64)).is_err());
        assert_eq!(l.acked_seqs(), vec![(7, 4)]);
        assert_eq!(l.acked_blocks(), 1);
    }
}
