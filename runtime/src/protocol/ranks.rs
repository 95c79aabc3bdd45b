//! Sets of ranks (a page's copy set, the holders still to acknowledge a revoke).

use super::msg::Rank;

/// A set of ranks. Jobs have at most [`RankSet::CAPACITY`] ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankSet(u64);

impl RankSet {
    /// The most ranks a set can hold.
    pub const CAPACITY: usize = 64;

    pub const fn empty() -> RankSet {
        RankSet(0)
    }

    pub fn only(r: Rank) -> RankSet {
        RankSet(1u64 << r)
    }

    pub fn contains(self, r: Rank) -> bool {
        r < Self::CAPACITY && self.0 & (1u64 << r) != 0
    }

    pub fn with(self, r: Rank) -> RankSet {
        RankSet(self.0 | (1u64 << r))
    }

    pub fn without(self, r: Rank) -> RankSet {
        RankSet(self.0 & !(1u64 << r))
    }

    pub fn union(self, other: RankSet) -> RankSet {
        RankSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The members, in increasing order.
    pub fn iter(self) -> impl Iterator<Item = Rank> {
        (0..Self::CAPACITY).filter(move |r| self.contains(*r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let s = RankSet::only(3).with(0).with(63);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3, 63]);
        assert_eq!(s.len(), 3);
        assert!(s.contains(63) && !s.contains(1) && !s.contains(64));
        assert_eq!(s.without(3).without(0).without(63), RankSet::empty());
        assert!(RankSet::empty().is_empty());
        assert_eq!(RankSet::only(1).union(RankSet::only(2)), RankSet::only(1).with(2));
    }
}
