//! The barrier's coordinator (rank 0): counts each rank's arrival at an epoch once, then
//! releases every rank.

use std::collections::BTreeMap;

use super::directory::Send;
use super::msg::{Msg, Rank};
use super::ranks::RankSet;
use super::violation::Violation;

/// The rank that coordinates barriers.
pub const COORDINATOR: Rank = 0;

/// Arrivals at open barrier epochs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Barriers {
    ranks: usize,
    /// The last epoch released.
    released: u64,
    arrived: BTreeMap<u64, RankSet>,
}

impl Barriers {
    pub fn new(ranks: usize) -> Barriers {
        Barriers { ranks, released: 0, arrived: BTreeMap::new() }
    }

    /// Rank `from` reached barrier `epoch`. Epochs are released in order: every rank arrives at
    /// epoch `e` only after it was released from `e - 1`.
    pub fn arrive(&mut self, from: Rank, epoch: u64, out: &mut Vec<Send>) -> Result<(), Violation> {
        let bad = Violation::UnexpectedBarrier { from, epoch };
        if epoch != self.released + 1 {
            return Err(bad);
        }
        let set = self.arrived.entry(epoch).or_default();
        if set.contains(from) {
            return Err(bad);
        }
        *set = set.with(from);
        if set.len() == self.ranks {
            self.arrived.remove(&epoch);
            self.released = epoch;
            out.extend((0..self.ranks).map(|r| Send { to: r, msg: Msg::BarrierRelease { epoch } }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_everybody_once_all_arrived() {
        let mut b = Barriers::new(3);
        let mut out = Vec::new();
        b.arrive(2, 1, &mut out).unwrap();
        b.arrive(0, 1, &mut out).unwrap();
        assert!(out.is_empty());
        assert!(b.arrive(0, 1, &mut out).is_err(), "twice at one epoch");
        assert!(b.arrive(1, 2, &mut out).is_err(), "ahead of the others");
        b.arrive(1, 1, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().enumerate().all(|(r, s)| s.to == r && s.msg == Msg::BarrierRelease { epoch: 1 }));
        assert!(b.arrive(1, 1, &mut out).is_err(), "epoch 1 is over");
        out.clear();
        b.arrive(1, 2, &mut out).unwrap();
    }
}
