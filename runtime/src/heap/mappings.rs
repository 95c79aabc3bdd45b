//! The application view's kernel mappings, kept under `vm.max_map_count`.
//!
//! Every page whose protection differs from its neighbour's is a mapping of its own (a VMA), and
//! the kernel refuses a process more than `vm.max_map_count` of them (65530 by default). Ranks
//! that hold interleaved pages reach that after about 32,000 pages. So the application view is a
//! cache of what this process holds: the page table says what it holds, and the view may show
//! less. When the view's mappings pass their budget (or the kernel refuses a change), the whole
//! view is *closed* with one `mprotect`, which makes it a single mapping; the page table keeps
//! every page held. A later fault on a held page *reopens* it locally: no message, one
//! `mprotect`. Contents are never at stake: they live in the memfd, behind both views.
//!
//! Ordering (a reopen must never show a page with access it no longer has):
//! - a change of access stores the new access in the page table first, waits until no thread is
//!   reopening that page, and only then changes the protection;
//! - a reopen announces itself on the page, then reads the access and applies it.
//!
//! With both sequentially consistent, either the reopen reads the new access, or the change waits
//! for the reopen to finish and then applies its own protection last. A reopen never waits for a
//! change (nor for a close), so a change interrupted by a fault that reopens the same page cannot
//! deadlock.
//!
//! The count of mappings is an estimate (1 + the number of protection boundaries, kept from the
//! protections this module applied); closing resets it. Everything here is async-signal-safe:
//! atomics, `mprotect`, spinning.

use std::sync::atomic::{fence, AtomicBool, AtomicIsize, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::error::Error;
use crate::heap::lazy::LazyArray;
use crate::heap::pagetable::PageTable;
use crate::heap::region::{Access, Region};

/// The estimated mappings of the application view, and its closing and reopening.
pub struct Mappings {
    /// Most mappings the view may use before it is closed; `usize::MAX` until the job starts.
    budget: AtomicUsize,
    /// Estimated mappings of the view: 1 + protection boundaries between neighbours.
    count: AtomicIsize,
    /// Bumped by each close: a protection recorded in an older epoch is `None` now.
    epoch: AtomicU32,
    /// Per page: `epoch << 2 | code` of the protection last applied; 0 while as at start-up.
    applied: LazyArray<AtomicU32>,
    /// Per page: threads reopening it now.
    reopening: LazyArray<AtomicU32>,
    /// A close is under way.
    closing: AtomicBool,
    closes: AtomicU64,
    reopened: AtomicU64,
}

/// What the view's mappings have done (for the statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingStats {
    /// Times the whole view was closed to stay under its budget.
    pub closes: u64,
    /// Held pages reopened by a fault after a close.
    pub reopened: u64,
}

fn code(access: Access) -> u32 {
    match access {
        Access::None => 1,
        Access::Read => 2,
        Access::Write => 3,
    }
}

fn decode(code: u32) -> Access {
    match code {
        3 => Access::Write,
        2 => Access::Read,
        _ => Access::None,
    }
}

/// The fewest mappings the view keeps to: a page opened in the middle of a closed view makes
/// three.
const MIN_BUDGET: usize = 8;

/// The part of `vm.max_map_count` kept for everything else the process maps (libraries, thread
/// stacks, the program's own `mmap`s): an eighth, at least 256.
pub fn reserve(max_map_count: usize) -> usize {
    (max_map_count / 8).max(256)
}

/// The default budget: the kernel's limit, less what the process maps besides the heap, less
/// the [`reserve`]; at least 64.
pub fn default_budget(max_map_count: usize, other_mappings: usize) -> usize {
    max_map_count.saturating_sub(other_mappings).saturating_sub(reserve(max_map_count)).max(64)
}

/// Mappings of the process outside `[base, base + size)`, from /proc/self/maps (allocates).
pub fn other_mappings(base: usize, size: usize) -> Result<usize, Error> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| Error::Os { what: "reading /proc/self/maps".into(), source: e })?;
    Ok(maps
        .lines()
        .filter(|l| {
            let start = l.split('-').next().and_then(|a| usize::from_str_radix(a, 16).ok());
            !start.is_some_and(|a| (base..base + size).contains(&a))
        })
        .count())
}

impl Mappings {
    /// The mappings of a view of `pages` pages whose pages `[open_first, open_end)` are open
    /// (this rank's arena) and the rest closed.
    pub fn new(pages: usize, open_first: usize, open_end: usize) -> Result<Mappings, Error> {
        let open = open_first < open_end;
        let boundaries = usize::from(open && open_first > 0) + usize::from(open && open_end < pages);
        Ok(Mappings {
            budget: AtomicUsize::new(usize::MAX),
            count: AtomicIsize::new(1 + boundaries as isize),
            epoch: AtomicU32::new(0),
            applied: LazyArray::new(pages)?,
            reopening: LazyArray::new(pages)?,
            closing: AtomicBool::new(false),
            closes: AtomicU64::new(0),
            reopened: AtomicU64::new(0),
        })
    }

    /// Sets the budget (when the process joins: the limit that matters is the one then).
    pub fn set_budget(&self, budget: usize) {
        self.budget.store(budget.max(MIN_BUDGET), Ordering::Relaxed);
    }

    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// The estimated mappings of the view now.
    pub fn estimate(&self) -> usize {
        self.count.load(Ordering::Relaxed).max(1) as usize
    }

    pub fn stats(&self) -> MappingStats {
        MappingStats { closes: self.closes.load(Ordering::Relaxed), reopened: self.reopened.load(Ordering::Relaxed) }
    }

    /// Whether the view was ever closed (some held pages may show no access).
    pub fn ever_closed(&self) -> bool {
        self.epoch.load(Ordering::SeqCst) != 0
    }

    /// The protection last applied to `page` (as far as this module knows).
    fn applied(&self, pt: &PageTable, page: usize) -> Access {
        let w = self.applied.get(page).load(Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Relaxed);
        if w == 0 {
            return if epoch == 0 { pt.initial_access(page) } else { Access::None };
        }
        if w >> 2 == epoch {
            decode(w & 3)
        } else {
            Access::None
        }
    }

    /// Gives `count` pages from `page` the access `access`: in the page table, then in the view.
    /// The caller has made the pages' contents ready for that access. On failure returns the
    /// errno of `mprotect`.
    pub fn set_access(
        &self,
        region: &Region,
        pt: &PageTable,
        page: usize,
        count: usize,
        access: Access,
    ) -> Result<(), i32> {
        for p in page..page + count {
            pt.set(p, access);
        }
        // Paired with the fence in `reopen`: a reopen that read the old access is seen here.
        fence(Ordering::SeqCst);
        for p in page..page + count {
            let r = self.reopening.get(p);
            let mut spins = 0u32;
            while r.load(Ordering::SeqCst) != 0 {
                spins += 1;
                if spins < 128 {
                    std::hint::spin_loop();
                } else {
                    crate::sys::sched::yield_cpu();
                }
            }
        }
        self.protect(region, pt, page, count, access)
    }

    /// Reopens `page` after a fault on it while the page table says this process holds it
    /// (the view was closed, or a change of its access is under way): applies the access the
    /// page has now. Returns whether the view showed less than that access before.
    pub fn reopen(&self, region: &Region, pt: &PageTable, page: usize) -> Result<bool, i32> {
        let r = self.reopening.get(page);
        r.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let access = pt.access(page);
        let was_closed = access != Access::None && self.applied(pt, page) != access;
        let result = if access == Access::None { Ok(()) } else { self.protect(region, pt, page, 1, access) };
        r.fetch_sub(1, Ordering::SeqCst);
        if was_closed && result.is_ok() {
            self.reopened.fetch_add(1, Ordering::Relaxed);
        }
        result.map(|()| was_closed)
    }

    /// Applies `access` to `count` pages of the view and counts the mappings that makes; closes
    /// the view when the kernel refuses for want of mappings, or when past the budget.
    fn protect(&self, region: &Region, pt: &PageTable, page: usize, count: usize, access: Access) -> Result<(), i32> {
        // A change makes at most two mappings more: close first if that passes the budget, so
        // the page opened now stays open for the thread that waits for it.
        if self.estimate().saturating_add(2) > self.budget() {
            self.close(region)?;
        }
        let (had, epoch) = (self.estimate(), self.epoch.load(Ordering::SeqCst));
        let mut result = region.protect(page, count, access);
        if result == Err(libc::ENOMEM) {
            // The program's own mappings took what the budget counted on: from now on the view
            // keeps to three quarters of what it had (unless another thread's close changed
            // that meanwhile), and never loses more than half its budget at once.
            if self.epoch.load(Ordering::SeqCst) == epoch {
                let budget = self.budget();
                let shrunk = (had - had / 4).max(budget / 2).max(MIN_BUDGET);
                self.budget.fetch_min(shrunk, Ordering::Relaxed);
            }
            // Another thread's close under way makes the room once its mprotect is done: wait
            // for that a little (not for ever: it may be this thread's own, interrupted).
            for _ in 0..1000 {
                self.close(region)?;
                result = region.protect(page, count, access);
                if result != Err(libc::ENOMEM) || !self.closing.load(Ordering::Acquire) {
                    break;
                }
                crate::sys::sched::yield_cpu();
            }
        }
        result?;
        let epoch = self.epoch.load(Ordering::SeqCst);
        let delta = self.record(pt, page, count, access);
        // A change counted across a close belongs to the view before it: the close reset the
        // count to the one mapping it left.
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.count.fetch_add(delta, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Records `access` as applied to `count` pages from `page`; returns the change in the
    /// number of boundaries.
    fn record(&self, pt: &PageTable, page: usize, count: usize, access: Access) -> isize {
        let pages = self.applied.len();
        let lo = page.saturating_sub(1);
        let hi = (page + count).min(pages - 1);
        let boundaries =
            |m: &Mappings| -> isize { (lo..hi).filter(|&p| m.applied(pt, p) != m.applied(pt, p + 1)).count() as isize };
        let before = boundaries(self);
        let w = self.epoch.load(Ordering::Relaxed) << 2 | code(access);
        for p in page..page + count {
            self.applied.get(p).store(w, Ordering::Relaxed);
        }
        boundaries(self) - before
    }

    /// Closes the whole view (one mapping). Held pages stay held and reopen on their next
    /// fault. If another thread is closing, returns at once: that close makes the room (and a
    /// thread never waits for a close it interrupted, e.g. from a signal handler).
    fn close(&self, region: &Region) -> Result<(), i32> {
        if self.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let result = region.protect_range(region.base, region.base + region.size, Access::None);
        self.count.store(1, Ordering::Relaxed);
        self.closes.fetch_add(1, Ordering::Relaxed);
        self.closing.store(false, Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heap's mappings in /proc/self/maps.
    fn heap_mappings(base: usize, size: usize) -> usize {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| {
                let a = usize::from_str_radix(l.split('-').next().unwrap(), 16).unwrap();
                (base..base + size).contains(&a)
            })
            .count()
    }

    #[test]
    fn budgets() {
        assert_eq!(reserve(65530), 8191);
        assert_eq!(default_budget(65530, 300), 65530 - 300 - 8191);
        assert_eq!(default_budget(1000, 900), 64);
    }

    /// A view whose pages alternate between held and not held needs a mapping per page; with a
    /// budget of 100 it stays near that, every held page still reads and writes what the memfd
    /// holds (reopened on its fault), and the estimate follows the kernel's count.
    #[test]
    fn alternating_pages_stay_within_the_budget_and_reopen() {
        let base = 0x3200_0000_0000;
        let pages = 2000;
        let region = Region::reserve_private(base, pages * crate::heap::region::page_size()).unwrap();
        let page = region.page;
        region.share(0, 0).unwrap();
        let pt = PageTable::new(pages, 0, 0).unwrap();
        let m = Mappings::new(pages, 0, 0).unwrap();
        assert_eq!(heap_mappings(base, region.size), 1);
        for p in (0..pages).step_by(2).take(40) {
            m.set_access(&region, &pt, p, 1, Access::Write).unwrap();
        }
        // 40 isolated open pages and the 40 closed runs after them, counted exactly.
        assert_eq!(heap_mappings(base, region.size), 80);
        assert_eq!(m.estimate(), 80);
        m.set_budget(100);
        for p in (0..pages).step_by(2) {
            m.set_access(&region, &pt, p, 1, Access::Write).unwrap();
            // SAFETY: the runtime view is read-write; each page's first word.
            unsafe { *(region.runtime_page(p) as *mut u64) = p as u64 + 1 };
            assert!(heap_mappings(base, region.size) <= 101, "page {p}: {} mappings", heap_mappings(base, region.size));
        }
        assert!(m.stats().closes >= 9, "{:?}", m.stats());
        assert!(m.ever_closed());
        // Every held page reopens and shows its contents; the others stay closed.
        let mut reopened = 0;
        for p in (0..pages).step_by(2) {
            if m.reopen(&region, &pt, p).unwrap() {
                reopened += 1;
            }
            // SAFETY: page p is open for writing now (just reopened, or still open).
            unsafe {
                let at = (base + p * page) as *mut u64;
                assert_eq!(std::ptr::read_volatile(at), p as u64 + 1);
                std::ptr::write_volatile(at, 7);
            }
        }
        assert!(reopened > 0);
        assert!(!m.reopen(&region, &pt, 1).unwrap(), "a page not held stays closed");
        assert!(heap_mappings(base, region.size) <= 101);
        let est = m.estimate() as isize;
        let real = heap_mappings(base, region.size) as isize;
        assert!((est - real).abs() <= 1, "estimate {est}, kernel {real}");
    }

    /// A change of access waits for a reopen of the same page under way, and applies its own
    /// protection last: the view never keeps access the page table no longer gives.
    #[test]
    fn a_change_of_access_waits_for_a_reopen_under_way() {
        let base = 0x3300_0000_0000;
        let pages = 16;
        let region = Region::reserve_private(base, pages * crate::heap::region::page_size()).unwrap();
        region.share(0, 0).unwrap();
        let pt = PageTable::new(pages, 0, 0).unwrap();
        let m = Mappings::new(pages, 0, 0).unwrap();
        m.set_access(&region, &pt, 3, 1, Access::Write).unwrap();
        // A reopen that read "write", then stalls before its mprotect.
        m.reopening.get(3).fetch_add(1, Ordering::SeqCst);
        std::thread::scope(|s| {
            let changer = s.spawn(|| m.set_access(&region, &pt, 3, 1, Access::None).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!changer.is_finished(), "the change must wait for the reopen");
            region.protect(3, 1, Access::Write).unwrap();
            m.reopening.get(3).fetch_sub(1, Ordering::SeqCst);
            changer.join().unwrap();
        });
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let at = base + 3 * region.page;
        let line = maps.lines().find(|l| {
            let (a, b) = l.split(' ').next().unwrap().split_once('-').unwrap();
            (usize::from_str_radix(a, 16).unwrap()..usize::from_str_radix(b, 16).unwrap()).contains(&at)
        });
        assert!(line.unwrap().contains("---s"), "{line:?}");
    }
}
