//! Where pages live: which rank keeps a page's directory entry (its home) and which rank owns it
//! before anybody asked for it (the rank whose arena holds it).

use super::msg::{Page, Rank};

/// The job's page placement. Built from the heap layout (`heap::layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    ranks: usize,
    pages: u64,
    pages_per_arena: u64,
}

impl Placement {
    /// `ranks` ranks share `pages` pages; rank `r`'s arena starts at page `r * pages_per_arena`
    /// (the last arena runs to the end of the heap).
    pub fn new(ranks: usize, pages: u64, pages_per_arena: u64) -> Placement {
        assert!(ranks > 0 && pages_per_arena > 0, "a placement needs ranks and arenas");
        Placement { ranks, pages, pages_per_arena }
    }

    /// Number of ranks in the job.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Number of pages in the heap.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether `page` is a page of the heap.
    pub fn contains(&self, page: Page) -> bool {
        page < self.pages
    }

    /// The rank that keeps the directory entry of `page`.
    pub fn home(&self, page: Page) -> Rank {
        (page % self.ranks as u64) as Rank
    }

    /// The rank whose arena holds `page`: its owner, writable, until somebody asks for it.
    pub fn first_owner(&self, page: Page) -> Rank {
        ((page / self.pages_per_arena) as Rank).min(self.ranks - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_are_cyclic_and_owners_follow_arenas() {
        let p = Placement::new(3, 100, 30);
        assert_eq!((0..6).map(|g| p.home(g)).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.first_owner(0), 0);
        assert_eq!(p.first_owner(29), 0);
        assert_eq!(p.first_owner(30), 1);
        assert_eq!(p.first_owner(99), 2, "the last arena runs to the end of the heap");
        assert!(p.contains(99) && !p.contains(100));
    }
}
