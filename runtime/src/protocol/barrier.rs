//! The barrier: a dissemination barrier, with no coordinator and nobody sleeping on a central
//! counter. In round `k` of barrier `epoch` (rounds `0 .. ceil(log2 N)`), rank `r` tells rank
//! `r + 2^k` (mod N) that it got there, and waits for the word of rank `r - 2^k`. After the last
//! round every rank has heard, directly or through others, from every rank. A barrier on N ranks
//! costs each rank `ceil(log2 N)` one-way messages and nothing on any other rank's CPU.
//!
//! A rank numbers its barriers 1, 2, 3, ... Notices for a later epoch may arrive before an
//! earlier epoch is over on this rank (a faster partner already moved on, or two threads of one
//! process are in two barriers), but never [`WINDOW`] epochs ahead: a rank in barrier `e` has
//! finished `e - 1`, which needed every rank to start it. Each (round, epoch modulo `WINDOW`)
//! therefore needs only the last epoch heard, and receivers check that every notice is the next
//! one expected there from the one rank that may send it.

use super::msg::Rank;
use super::violation::Violation;

/// How many barrier epochs may be in progress at once, from this rank's view.
pub const WINDOW: u64 = 64;

/// Who tells whom in each round of the dissemination barrier, for one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dissemination {
    me: Rank,
    ranks: usize,
}

impl Dissemination {
    pub fn new(me: Rank, ranks: usize) -> Dissemination {
        assert!(me < ranks, "rank {me} is not a rank of a {ranks}-rank job");
        Dissemination { me, ranks }
    }

    /// Number of rounds: `ceil(log2 N)` (none in a one-rank job).
    pub fn rounds(&self) -> u32 {
        usize::BITS - (self.ranks - 1).leading_zeros()
    }

    fn distance(&self, round: u32) -> usize {
        (1usize << round) % self.ranks
    }

    /// The rank this rank tells in `round`.
    pub fn to(&self, round: u32) -> Rank {
        (self.me + self.distance(round)) % self.ranks
    }

    /// The rank this rank waits for in `round`.
    pub fn from(&self, round: u32) -> Rank {
        (self.me + self.ranks - self.distance(round)) % self.ranks
    }

    /// The rounds in which this rank waits for `rank`.
    pub fn rounds_waiting_for(&self, rank: Rank) -> impl Iterator<Item = u32> + '_ {
        (0..self.rounds()).filter(move |k| self.from(*k) == rank)
    }

    /// Where notices of (`round`, `epoch`) are recorded: `round * WINDOW + epoch % WINDOW`.
    pub fn cell(&self, round: u32, epoch: u64) -> usize {
        round as usize * WINDOW as usize + (epoch % WINDOW) as usize
    }

    /// Number of cells ([`Dissemination::cell`]).
    pub fn cells(&self) -> usize {
        self.rounds() as usize * WINDOW as usize
    }

    /// Checks a notice from `from` for (`round`, `epoch`), where the last epoch heard in its cell
    /// is `last` (0: none yet): it must come from this round's sender, and be the next epoch of
    /// its cell (once per epoch, none skipped).
    pub fn check(&self, from: Rank, round: u32, epoch: u64, last: u64) -> Result<(), Violation> {
        let bad = Violation::UnexpectedBarrier { from, epoch, round };
        if round >= self.rounds() || from != self.from(round) || epoch == 0 {
            return Err(bad);
        }
        if epoch <= last || epoch > last + WINDOW || epoch % WINDOW != last % WINDOW && last != 0 {
            return Err(bad);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_hears_from_every_rank() {
        for n in 1..=40usize {
            let rounds = Dissemination::new(0, n).rounds();
            assert!(1usize << rounds >= n && (rounds == 0 || 1usize << (rounds - 1) < n), "{n} ranks: {rounds}");
            // heard[r] = the ranks whose arrival r knows of, after each round.
            let mut heard: Vec<Vec<bool>> = (0..n).map(|r| (0..n).map(|s| s == r).collect()).collect();
            for k in 0..rounds {
                let before = heard.clone();
                for (r, knows) in heard.iter_mut().enumerate() {
                    let d = Dissemination::new(r, n);
                    assert_eq!(Dissemination::new(d.from(k), n).to(k), r, "{n} ranks, round {k}");
                    assert_ne!(d.to(k), r, "nobody tells itself");
                    for (s, k2) in knows.iter_mut().enumerate() {
                        *k2 |= before[d.from(k)][s];
                    }
                }
            }
            assert!(heard.iter().all(|k| k.iter().all(|b| *b)), "{n} ranks: someone missed someone");
        }
    }

    #[test]
    fn notices_come_once_in_order_from_the_round_sender() {
        let d = Dissemination::new(1, 5); // rounds 0, 1, 2 from ranks 0, 4, 2
        assert_eq!((d.rounds(), d.from(0), d.from(1), d.from(2)), (3, 0, 4, 2));
        assert_eq!(d.rounds_waiting_for(4).collect::<Vec<_>>(), vec![1]);
        assert!(d.check(0, 0, 1, 0).is_ok());
        assert!(d.check(0, 0, 2, 0).is_ok(), "a notice may be for a later epoch");
        assert!(d.check(4, 0, 1, 0).is_err(), "rank 4 does not tell rank 1 in round 0");
        assert!(d.check(0, 3, 1, 0).is_err(), "no round 3 in a 5-rank job");
        assert!(d.check(0, 0, 0, 0).is_err(), "epochs start at 1");
        assert!(d.check(0, 0, 5, 5).is_err(), "twice the same epoch");
        assert!(d.check(0, 0, 5 + WINDOW, 5).is_ok());
        assert!(d.check(0, 0, 5 + 2 * WINDOW, 5).is_err(), "too far ahead");
        assert!(d.check(0, 0, WINDOW + 1, 0).is_err(), "too far ahead of the first");
        assert_eq!(d.cell(2, 3), 2 * WINDOW as usize + 3);
        assert_eq!(d.cells(), 3 * WINDOW as usize);
        assert_eq!(Dissemination::new(0, 1).rounds(), 0);
    }
}
