//! The barrier's coordinator (rank 0): counts each rank's arrival at an epoch once, then
//! releases every rank.
//!
//! A rank numbers its barriers 1, 2, 3, ... Arrivals for a later epoch may come before an
//! earlier epoch is complete (two threads of one process, or the join barrier and a barrier of a
//! thread that found the process joined): each epoch is counted on its own.

use std::collections::{BTreeMap, BTreeSet};

use super::directory::Send;
use super::msg::{Msg, Rank};
use super::ranks::RankSet;
use super::violation::Violation;

/// The rank that coordinates barriers.
pub const COORDINATOR: Rank = 0;

/// The barrier epochs that are over. Epochs may end out of order (see the module comment).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Released {
    /// Every epoch up to this one is released ...
    below: u64,
    /// ... and these above it.
    above: BTreeSet<u64>,
}

impl Released {
    pub fn contains(&self, epoch: u64) -> bool {
        epoch <= self.below || self.above.contains(&epoch)
    }

    pub fn insert(&mut self, epoch: u64) {
        self.above.insert(epoch);
        while self.above.remove(&(self.below + 1)) {
            self.below += 1;
        }
    }
}

/// Arrivals at open barrier epochs, and which epochs are over.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Barriers {
    ranks: usize,
    released: Released,
    arrived: BTreeMap<u64, RankSet>,
    /// Ranks that left the job (`finalize`): they arrive at no barrier any more.
    left: RankSet,
}

impl Barriers {
    pub fn new(ranks: usize) -> Barriers {
        Barriers { ranks, released: Released::default(), arrived: BTreeMap::new(), left: RankSet::empty() }
    }

    /// Rank `from` reached barrier `epoch` (epochs start at 1). Arriving twice at one epoch, or
    /// at an epoch already released, is a violation.
    pub fn arrive(&mut self, from: Rank, epoch: u64, out: &mut Vec<Send>) -> Result<(), Violation> {
        let bad = Violation::UnexpectedBarrier { from, epoch };
        if epoch == 0 || self.released.contains(epoch) {
            return Err(bad);
        }
        let set = self.arrived.entry(epoch).or_default();
        if set.contains(from) {
            return Err(bad);
        }
        *set = set.with(from);
        let arrived = *set;
        if let Some(gone) = self.left.iter().find(|r| !arrived.contains(*r)) {
            return Err(Violation::LeftBeforeBarrier { rank: gone, epoch });
        }
        if set.len() == self.ranks {
            self.arrived.remove(&epoch);
            self.released.insert(epoch);
            out.extend((0..self.ranks).map(|r| Send { to: r, msg: Msg::BarrierRelease { epoch } }));
        }
        Ok(())
    }
}

impl Barriers {
    /// Rank `rank` left the job. Its arrivals came before its goodbye (one FIFO link), so an
    /// open barrier it has not reached can never complete: that is an error, not a wait.
    pub fn left(&mut self, rank: Rank) -> Result<(), Violation> {
        self.left = self.left.with(rank);
        match self.arrived.iter().find(|(_, set)| !set.contains(rank)) {
            Some((epoch, _)) => Err(Violation::LeftBeforeBarrier { rank, epoch: *epoch }),
            None => Ok(()),
        }
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
        assert!(b.arrive(0, 0, &mut out).is_err(), "epochs start at 1");
        b.arrive(1, 1, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().enumerate().all(|(r, s)| s.to == r && s.msg == Msg::BarrierRelease { epoch: 1 }));
        assert!(b.arrive(1, 1, &mut out).is_err(), "epoch 1 is over");
        out.clear();
        b.arrive(1, 2, &mut out).unwrap();
    }

    #[test]
    fn a_later_epoch_may_start_before_an_earlier_one_ends() {
        // Rank 1's second thread reaches barrier 2 while its join barrier (1) is still open.
        let mut b = Barriers::new(2);
        let mut out = Vec::new();
        b.arrive(1, 1, &mut out).unwrap();
        b.arrive(1, 2, &mut out).unwrap();
        b.arrive(0, 2, &mut out).unwrap();
        assert_eq!(out.iter().map(|s| s.msg).collect::<Vec<_>>(), vec![Msg::BarrierRelease { epoch: 2 }; 2]);
        out.clear();
        assert!(b.arrive(1, 2, &mut out).is_err(), "epoch 2 is over");
        b.arrive(0, 1, &mut out).unwrap();
        assert_eq!(out.iter().map(|s| s.msg).collect::<Vec<_>>(), vec![Msg::BarrierRelease { epoch: 1 }; 2]);
        assert!(b.arrive(0, 1, &mut out).is_err() && b.arrive(0, 2, &mut out).is_err());
        out.clear();
        b.arrive(0, 3, &mut out).unwrap();
    }

    #[test]
    fn a_barrier_a_departed_rank_cannot_reach_is_an_error() {
        let mut out = Vec::new();
        // Rank 1 called one barrier more than rank 2, which then left.
        let mut b = Barriers::new(3);
        b.arrive(1, 1, &mut out).unwrap();
        assert_eq!(b.left(2), Err(Violation::LeftBeforeBarrier { rank: 2, epoch: 1 }));
        // The other order: rank 2 left first, then rank 1 arrives.
        let mut b = Barriers::new(3);
        b.left(2).unwrap();
        assert_eq!(b.arrive(1, 1, &mut out), Err(Violation::LeftBeforeBarrier { rank: 2, epoch: 1 }));
        // Leaving after the last barrier is fine.
        let mut b = Barriers::new(2);
        b.arrive(0, 1, &mut out).unwrap();
        b.arrive(1, 1, &mut out).unwrap();
        b.left(1).unwrap();
    }
}
