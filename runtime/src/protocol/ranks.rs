//! Sets of ranks (a page's copy set, the holders still to acknowledge a revoke).

use super::msg::Rank;

/// Words of a [`RankSet`].
const WORDS: usize = 16;

/// A set of ranks: a fixed bitmap of [`RankSet::CAPACITY`] bits, `Copy` and free of heap data
/// like every protocol value. Jobs have at most that many ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankSet([u64; WORDS]);

impl RankSet {
    /// The most ranks a set can hold.
    pub const CAPACITY: usize = WORDS * 64;

    pub const fn empty() -> RankSet {
        RankSet([0; WORDS])
    }

    pub fn only(r: Rank) -> RankSet {
        RankSet::empty().with(r)
    }

    pub fn contains(self, r: Rank) -> bool {
        r < Self::CAPACITY && self.0[r / 64] & (1u64 << (r % 64)) != 0
    }

    /// The set with `r` added. `r` must be below [`RankSet::CAPACITY`] (ranks are checked
    /// against the job size, which is, before they reach the protocol).
    pub fn with(mut self, r: Rank) -> RankSet {
        self.0[r / 64] |= 1u64 << (r % 64);
        self
    }

    pub fn without(mut self, r: Rank) -> RankSet {
        if r < Self::CAPACITY {
            self.0[r / 64] &= !(1u64 << (r % 64));
        }
        self
    }

    pub fn union(mut self, other: RankSet) -> RankSet {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
        self
    }

    pub fn is_empty(self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn len(self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The members, in increasing order.
    pub fn iter(self) -> impl Iterator<Item = Rank> {
        self.0.into_iter().enumerate().flat_map(|(i, word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
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

    #[test]
    fn every_rank_of_the_largest_job_fits() {
        let last = RankSet::CAPACITY - 1;
        let s = RankSet::only(last).with(64).with(65).with(0).with(511);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 65, 511, last]);
        assert_eq!(s.len(), 5);
        assert!(s.contains(last) && s.contains(64) && !s.contains(63) && !s.contains(RankSet::CAPACITY));
        let all = (0..RankSet::CAPACITY).fold(RankSet::empty(), RankSet::with);
        assert_eq!(all.len(), RankSet::CAPACITY);
        assert!(all.iter().eq(0..RankSet::CAPACITY));
        assert_eq!((0..RankSet::CAPACITY).fold(all, RankSet::without), RankSet::empty());
        assert_eq!(RankSet::only(700).union(RankSet::only(3)), RankSet::only(3).with(700));
        assert_eq!(RankSet::empty().without(RankSet::CAPACITY + 5), RankSet::empty());
    }
}
