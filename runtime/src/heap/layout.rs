//! How the heap is split into one arena per rank: the one place that says which pages are whose.

use crate::protocol::Placement;

/// Size of a slab span; arenas are multiples of it.
pub const ARENA_ALIGN: usize = 64 * 1024;

/// The heap's arenas: rank `r`'s starts `r * arena_size` bytes into the heap; the last rank's
/// runs to the end of the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    heap_size: usize,
    page: usize,
    ranks: usize,
    arena_size: usize,
}

impl ArenaLayout {
    pub fn new(heap_size: usize, page: usize, ranks: usize) -> ArenaLayout {
        let arena_size = (heap_size / ranks) / ARENA_ALIGN * ARENA_ALIGN;
        assert!(arena_size >= page, "the configuration checks that every rank gets an arena");
        ArenaLayout { heap_size, page, ranks, arena_size }
    }

    /// Byte offsets `[start, end)` of `rank`'s arena from the heap base.
    pub fn bytes(&self, rank: usize) -> (usize, usize) {
        let start = rank * self.arena_size;
        let end = if rank == self.ranks - 1 { self.heap_size } else { start + self.arena_size };
        (start, end)
    }

    /// Pages `[first, end)` of `rank`'s arena.
    pub fn pages(&self, rank: usize) -> (usize, usize) {
        let (start, end) = self.bytes(rank);
        (start / self.page, end / self.page)
    }

    /// The rank whose arena holds `page`.
    pub fn rank_of_page(&self, page: usize) -> usize {
        ((page * self.page) / self.arena_size).min(self.ranks - 1)
    }

    /// The protocol's view: homes and first owners.
    pub fn placement(&self) -> Placement {
        Placement::new(self.ranks, (self.heap_size / self.page) as u64, (self.arena_size / self.page) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arenas_tile_the_heap_and_agree_with_the_placement() {
        let l = ArenaLayout::new(10 * ARENA_ALIGN + 4096 * 3, 4096, 3);
        let mut next = 0;
        for r in 0..3 {
            let (first, end) = l.pages(r);
            assert_eq!(first, next);
            for p in first..end {
                assert_eq!(l.rank_of_page(p), r);
                assert_eq!(l.placement().first_owner(p as u64), Some(r));
            }
            next = end;
        }
        assert_eq!(next * 4096, 10 * ARENA_ALIGN + 4096 * 3, "the last arena runs to the end");
    }
}
