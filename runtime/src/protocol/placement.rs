//! Where pages live: which rank keeps a page's directory entry (its home) and which rank owns it
//! before anybody asked for it.
//!
//! Every page has a cyclic home (`page % N`) and is first owned by the rank whose arena holds it,
//! except the pages of collective allocations placed by the job's [`Policy`] (recorded in
//! [`Ranges`], the same on every rank because collective allocations are made by every rank in
//! the same order):
//! - [`Policy::Block`]: the allocation's pages are split into N consecutive blocks; block `r`'s
//!   home and first owner is rank `r`. Owners that initialise and compute their own rows never
//!   leave their process.
//! - [`Policy::FirstTouch`]: the pages have their cyclic home but no owner: the first rank that
//!   touches one (reads or writes) becomes its writable owner without any data moving (every
//!   copy of a fresh page is zero).
//! - [`Policy::Cyclic`]: nothing special (collective allocations are rank 0's like any block of
//!   its arena).

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::msg::{Page, Rank};

/// How collective allocations are placed (`GALLOCY_PLACEMENT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    Cyclic,
    Block,
    FirstTouch,
}

impl Policy {
    /// The names `GALLOCY_PLACEMENT` accepts.
    pub const NAMES: &'static str = "first-touch, block or cyclic";

    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "cyclic" => Some(Policy::Cyclic),
            "block" => Some(Policy::Block),
            "first-touch" => Some(Policy::FirstTouch),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Policy::Cyclic => "cyclic",
            Policy::Block => "block",
            Policy::FirstTouch => "first-touch",
        }
    }
}

/// Most placed ranges; later collective allocations are placed like any other block.
pub const MAX_RANGES: usize = 256;

/// One placed range: pages `[first, first + pages)`, placed by `policy`.
struct Range {
    first: AtomicU64,
    pages: AtomicU64,
    policy: AtomicU8,
}

/// The placed ranges of collective allocations. Lock-free and allocation-free to read (the fault
/// path asks it for homes); added to by the thread making a collective allocation.
pub struct Ranges {
    ranges: [Range; MAX_RANGES],
    /// Published entries.
    len: AtomicUsize,
    /// Every page of rank 0's arena below this one has been handed out (see
    /// [`Placement::note_in_use`]).
    in_use_below: AtomicU64,
}

impl Default for Ranges {
    fn default() -> Self {
        Ranges {
            ranges: std::array::from_fn(|_| Range {
                first: AtomicU64::new(0),
                pages: AtomicU64::new(0),
                policy: AtomicU8::new(0),
            }),
            len: AtomicUsize::new(0),
            in_use_below: AtomicU64::new(0),
        }
    }
}

impl Ranges {
    /// Records pages `[first, first + pages)` as placed by `policy`; false when the table is full.
    /// Ranges never overlap (they are fresh pages) and are added by one thread at a time (the
    /// collective allocation), before any rank uses them.
    pub fn add(&self, first: Page, pages: u64, policy: Policy) -> bool {
        let i = self.len.load(Ordering::Acquire);
        if i == MAX_RANGES || pages == 0 {
            return false;
        }
        let r = &self.ranges[i];
        r.first.store(first, Ordering::Relaxed);
        r.pages.store(pages, Ordering::Relaxed);
        r.policy.store(policy as u8, Ordering::Relaxed);
        self.len.store(i + 1, Ordering::Release);
        true
    }

    /// The placed range holding `page`: (its first page, its length, its policy).
    fn find(&self, page: Page) -> Option<(Page, u64, Policy)> {
        let n = self.len.load(Ordering::Acquire);
        self.ranges[..n].iter().find_map(|r| {
            let (first, pages) = (r.first.load(Ordering::Relaxed), r.pages.load(Ordering::Relaxed));
            (page >= first && page - first < pages).then(|| {
                let policy = match r.policy.load(Ordering::Relaxed) {
                    x if x == Policy::Block as u8 => Policy::Block,
                    x if x == Policy::FirstTouch as u8 => Policy::FirstTouch,
                    _ => Policy::Cyclic,
                };
                (first, pages, policy)
            })
        })
    }
}

/// The job's page placement. Built from the heap layout (`heap::layout`).
#[derive(Clone, Copy)]
pub struct Placement {
    ranks: usize,
    pages: u64,
    pages_per_arena: u64,
    policy: Policy,
    ranges: Option<&'static Ranges>,
    /// Release consistency: a page's home keeps its master copy, so the home is the page's first
    /// owner (the rank whose arena or block holds it), which has its contents from the start.
    owner_is_home: bool,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("ranks", &self.ranks)
            .field("pages", &self.pages)
            .field("pages_per_arena", &self.pages_per_arena)
            .field("policy", &self.policy)
            .finish()
    }
}

// Placements are compared (the model checker keeps them in its states) by their fixed parts;
// a job has one table of placed ranges.
impl PartialEq for Placement {
    fn eq(&self, o: &Self) -> bool {
        (self.ranks, self.pages, self.pages_per_arena, self.policy, self.owner_is_home)
            == (o.ranks, o.pages, o.pages_per_arena, o.policy, o.owner_is_home)
    }
}

impl Eq for Placement {}

impl std::hash::Hash for Placement {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (self.ranks, self.pages, self.pages_per_arena, self.policy, self.owner_is_home).hash(h);
    }
}

impl Placement {
    /// `ranks` ranks share `pages` pages; rank `r`'s arena starts at page `r * pages_per_arena`
    /// (the last arena runs to the end of the heap). No placed ranges.
    pub fn new(ranks: usize, pages: u64, pages_per_arena: u64) -> Placement {
        assert!(ranks > 0 && pages_per_arena > 0, "a placement needs ranks and arenas");
        Placement { ranks, pages, pages_per_arena, policy: Policy::Cyclic, ranges: None, owner_is_home: false }
    }

    /// This placement with every page's home at its first owner (release consistency, where the
    /// home keeps the master copy); pages with no first owner (first touch) keep cyclic homes.
    pub fn with_owner_as_home(self) -> Placement {
        Placement { owner_is_home: true, ..self }
    }

    /// This placement, placing collective allocations by `policy` in `ranges`.
    pub fn with_ranges(self, policy: Policy, ranges: &'static Ranges) -> Placement {
        Placement { policy, ranges: Some(ranges), ..self }
    }

    /// How collective allocations are placed.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Places pages `[first, first + pages)` of a collective allocation (fresh pages, nobody
    /// asked for them yet) by the job's policy. False when they stay placed like any other page
    /// (policy `cyclic`, or the table is full).
    pub fn place_collective(&self, first: Page, pages: u64) -> bool {
        match self.ranges {
            Some(r) if self.policy != Policy::Cyclic => r.add(first, pages, self.policy),
            _ => false,
        }
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

    fn placed(&self, page: Page) -> Option<(Page, u64, Policy)> {
        self.ranges.and_then(|r| r.find(page))
    }

    /// The rank of the block holding `page` when pages `[first, first + pages)` are split into
    /// one block per rank.
    fn block_rank(&self, first: Page, pages: u64, page: Page) -> Rank {
        (((page - first) as u128 * self.ranks as u128 / pages as u128) as Rank).min(self.ranks - 1)
    }

    /// Whether `page` lies in a first-touch range (nobody held it at first).
    pub fn is_first_touch(&self, page: Page) -> bool {
        matches!(self.placed(page), Some((_, _, Policy::FirstTouch)))
    }

    /// The rank that keeps the directory entry of `page`.
    pub fn home(&self, page: Page) -> Rank {
        match self.placed(page) {
            Some((first, pages, Policy::Block)) => self.block_rank(first, pages, page),
            Some((_, _, Policy::FirstTouch)) => (page % self.ranks as u64) as Rank,
            _ if self.owner_is_home => self.arena_rank(page),
            _ => (page % self.ranks as u64) as Rank,
        }
    }

    /// The rank that owns `page`, writable, until somebody asks for it; `None` for a page that
    /// nobody holds until its first touch.
    pub fn first_owner(&self, page: Page) -> Option<Rank> {
        match self.placed(page) {
            Some((first, pages, Policy::Block)) => Some(self.block_rank(first, pages, page)),
            Some((_, _, Policy::FirstTouch)) => None,
            _ => Some(self.arena_rank(page)),
        }
    }

    /// Checks a message from `from` that rank `me` receives as `page`'s home: the page lies in the
    /// heap and `me` is its home.
    pub fn check_home(&self, me: Rank, from: Rank, page: Page) -> Result<(), super::Violation> {
        if !self.contains(page) {
            return Err(super::Violation::PageOutOfRange { from, page });
        }
        if self.home(page) != me {
            return Err(super::Violation::NotHome { from, page });
        }
        Ok(())
    }

    /// Notes that the application touched `page`, so that it and every page below it in its
    /// arena have been handed out: rank 0's allocator hands out the pages of its arena from the
    /// bottom up, and collective allocations are placed only on pages it never handed out.
    /// Async-signal-safe.
    pub fn note_in_use(&self, page: Page) {
        if let Some(r) = self.ranges {
            // Most faults are below the mark already: no scan of the ranges, no atomic write.
            if self.arena_rank(page) == 0
                && page >= r.in_use_below.load(Ordering::Relaxed)
                && self.placed(page).is_none()
            {
                r.in_use_below.fetch_max(page + 1, Ordering::Relaxed);
            }
        }
    }

    /// Whether `page` may still be placed by a later collective allocation, for all this rank
    /// knows: a page of rank 0's arena, not placed yet, above every page noted in use. Nobody
    /// may ask for such a page before it is placed (its home could change), so prefetch leaves
    /// it alone. Async-signal-safe.
    pub fn may_still_be_placed(&self, page: Page) -> bool {
        match self.ranges {
            Some(r) if self.policy != Policy::Cyclic => {
                self.arena_rank(page) == 0
                    && page >= r.in_use_below.load(Ordering::Relaxed)
                    && self.placed(page).is_none()
            }
            _ => false,
        }
    }

    /// The rank whose arena holds `page` (its allocator hands it out and takes it back).
    pub fn arena_rank(&self, page: Page) -> Rank {
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
        assert_eq!(p.first_owner(0), Some(0));
        assert_eq!(p.first_owner(29), Some(0));
        assert_eq!(p.first_owner(30), Some(1));
        assert_eq!(p.first_owner(99), Some(2), "the last arena runs to the end of the heap");
        assert!(p.contains(99) && !p.contains(100));
    }

    #[test]
    fn placed_ranges_follow_their_policy() {
        let ranges: &'static Ranges = Box::leak(Box::default());
        let p = Placement::new(3, 1000, 300).with_ranges(Policy::Block, ranges);
        assert!(ranges.add(10, 9, Policy::Block));
        assert!(ranges.add(40, 5, Policy::FirstTouch));
        let homes: Vec<Rank> = (10..19).map(|g| p.home(g)).collect();
        assert_eq!(homes, vec![0, 0, 0, 1, 1, 1, 2, 2, 2], "one block per rank");
        assert!((10..19).all(|g| p.first_owner(g) == Some(p.home(g))));
        assert_eq!((p.home(9), p.first_owner(9)), (0, Some(0)), "outside: cyclic, arena");
        assert_eq!((p.home(19), p.first_owner(19)), (1, Some(0)));
        assert_eq!((p.home(41), p.first_owner(41)), (2, None), "first touch: cyclic home, no owner");
        assert_eq!(p.arena_rank(41), 0);
        // Fewer pages than ranks: the blocks are uneven but every page has one rank.
        assert!(ranges.add(100, 2, Policy::Block));
        assert_eq!((p.home(100), p.home(101)), (0, 1));
        assert!(!ranges.add(200, 0, Policy::Block), "an empty range is not recorded");
        let rc = p.with_owner_as_home();
        assert_eq!((rc.home(9), rc.home(19), rc.home(310)), (0, 0, 1), "release: arena pages are homed at their arena");
        assert_eq!((rc.home(12), rc.home(41)), (p.home(12), p.home(41)), "blocks and first touch keep their homes");
        assert_eq!(Policy::parse("first-touch"), Some(Policy::FirstTouch));
        assert_eq!(Policy::parse("Block"), None);
    }

    #[test]
    fn only_pages_of_rank_0s_arena_above_every_page_in_use_may_still_be_placed() {
        let ranges: &'static Ranges = Box::leak(Box::default());
        let p = Placement::new(3, 1000, 300).with_ranges(Policy::Block, ranges);
        assert!(ranges.add(10, 9, Policy::Block));
        assert!(p.may_still_be_placed(0) && p.may_still_be_placed(299), "nothing is known in use yet");
        assert!(!p.may_still_be_placed(12), "placed already");
        assert!(!p.may_still_be_placed(300) && !p.may_still_be_placed(999), "other arenas are never placed");
        p.note_in_use(50);
        assert!(!p.may_still_be_placed(0) && !p.may_still_be_placed(50), "handed out, up to the page in use");
        assert!(p.may_still_be_placed(51), "above it, a page may still be fresh");
        p.note_in_use(20);
        assert!(p.may_still_be_placed(51), "a lower page in use says nothing new");
        p.note_in_use(400);
        assert!(p.may_still_be_placed(51), "a page of another arena says nothing about rank 0's");
        p.note_in_use(14);
        assert!(p.may_still_be_placed(51), "nor does a placed page");
        let cyclic = Placement::new(3, 1000, 300).with_ranges(Policy::Cyclic, ranges);
        assert!(!cyclic.may_still_be_placed(900) && !cyclic.may_still_be_placed(299), "cyclic places nothing");
    }
}
