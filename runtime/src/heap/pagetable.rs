//! The local page table: this process's access to each heap page, in private runtime memory.
//!
//! Entries live in anonymous mappings that are touched lazily, so a large heap costs address
//! space, not memory. The state byte is written by the service thread (which also changes the
//! page protections); the in-flight word lets one local thread fetch a page while others wait.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::error::Error;
use crate::heap::lazy::LazyArray;
use crate::heap::region::Access;

const DEFAULT: u8 = 0;
const INVALID: u8 = 1;
const READ: u8 = 2;
const WRITE: u8 = 3;

/// Release consistency: the home knows this rank holds or held a copy.
const SHARER: u8 = 1;
/// Release consistency: the home knows this rank writes the page.
const WRITER: u8 = 2;
/// Release consistency: another rank writes the page (the copy goes at each acquire).
const VOLATILE: u8 = 4;
/// Release consistency, at the page's home: another rank holds or held a copy.
const HAS_SHARERS: u8 = 8;
/// This process was granted write access to the page (either consistency model).
const WRITTEN_HERE: u8 = 16;

/// Per-page local state.
pub struct PageTable {
    state: LazyArray<AtomicU8>,
    inflight: LazyArray<AtomicU32>,
    /// Installed for a local thread that has not resumed yet.
    fresh: LazyArray<AtomicU8>,
    /// When each page was last installed (CLOCK_MONOTONIC ns).
    installed_at: LazyArray<AtomicU64>,
    /// When another rank's write last invalidated each page here (revoke or forward).
    lost_at: LazyArray<AtomicU64>,
    /// Release consistency: what the home knows of this rank and the page ([`SHARER`], ...).
    sharing: LazyArray<AtomicU8>,
    /// Pages [own_first, own_end) start out owned and writable here ...
    own_first: usize,
    own_end: usize,
    /// ... or, under release consistency once joined, readable (a home's first write to a page
    /// registers it as a writer).
    own_read_only: AtomicBool,
}

impl PageTable {
    pub fn new(pages: usize, own_first: usize, own_end: usize) -> Result<PageTable, Error> {
        Ok(PageTable {
            state: LazyArray::new(pages)?,
            inflight: LazyArray::new(pages)?,
            fresh: LazyArray::new(pages)?,
            installed_at: LazyArray::new(pages)?,
            lost_at: LazyArray::new(pages)?,
            sharing: LazyArray::new(pages)?,
            own_first,
            own_end,
            own_read_only: AtomicBool::new(false),
        })
    }

    /// This process's current access to `page`.
    #[inline]
    pub fn access(&self, page: usize) -> Access {
        match self.state.get(page).load(Ordering::Acquire) {
            DEFAULT => self.initial_access(page),
            INVALID => Access::None,
            READ => Access::Read,
            _ => Access::Write,
        }
    }

    /// The access `page` has until it is set otherwise: this rank's arena is open (read-write, or
    /// read-only under release consistency once joined), every other page closed.
    pub fn initial_access(&self, page: usize) -> Access {
        if !(self.own_first..self.own_end).contains(&page) {
            Access::None
        } else if self.own_read_only.load(Ordering::Relaxed) {
            Access::Read
        } else {
            Access::Write
        }
    }

    /// From now on, pages of this rank's arena not set otherwise are readable, not writable (the
    /// caller changes their protection accordingly).
    pub fn set_own_read_only(&self) {
        self.own_read_only.store(true, Ordering::Relaxed);
    }

    // Sequentially consistent: a home's fault path sets WRITER then reads HAS_SHARERS while its
    // service thread sets HAS_SHARERS then reads WRITER; at least one of them sees the other's.
    fn sharing_bit(&self, page: usize, bit: u8) -> bool {
        self.sharing.get(page).load(Ordering::SeqCst) & bit != 0
    }

    fn set_sharing_bit(&self, page: usize, bit: u8) {
        self.sharing.get(page).fetch_or(bit, Ordering::SeqCst);
    }

    /// Release consistency, at the page's home: whether another rank holds or held a copy.
    pub fn has_sharers(&self, page: usize) -> bool {
        self.sharing_bit(page, HAS_SHARERS)
    }

    pub fn mark_has_sharers(&self, page: usize) {
        self.set_sharing_bit(page, HAS_SHARERS);
    }

    /// Release consistency: whether the page's home knows that this rank shares the page.
    pub fn is_sharer(&self, page: usize) -> bool {
        self.sharing_bit(page, SHARER)
    }

    pub fn mark_sharer(&self, page: usize) {
        self.set_sharing_bit(page, SHARER);
    }

    /// Release consistency: whether the page's home knows that this rank writes the page.
    pub fn is_writer(&self, page: usize) -> bool {
        self.sharing_bit(page, WRITER)
    }

    pub fn mark_writer(&self, page: usize) {
        self.set_sharing_bit(page, WRITER | SHARER);
    }

    /// Whether this process writes `page`, not only reads it: marked by [`PageTable::set`] when
    /// write access is granted (a fault, a collective allocation's placement) and when a page
    /// held for writing, its own arena's included, goes down to read-only. A page of its arena
    /// it still holds as at the start, or lost straight from write to no access, is not marked.
    /// Async-signal-safe.
    pub fn written_here(&self, page: usize) -> bool {
        self.sharing_bit(page, WRITTEN_HERE)
    }

    fn mark_written_here(&self, page: usize) {
        if !self.written_here(page) {
            self.set_sharing_bit(page, WRITTEN_HERE);
        }
    }

    /// Release consistency: whether another rank writes the page (a copy here is dropped at
    /// every acquire).
    pub fn is_volatile(&self, page: usize) -> bool {
        self.sharing_bit(page, VOLATILE)
    }

    pub fn mark_volatile(&self, page: usize) {
        self.set_sharing_bit(page, VOLATILE);
    }

    /// Records a new access (the caller changes the protection accordingly). A page given write
    /// access, or taken from write down to read-only (a reader came for what this process
    /// wrote), counts as [`PageTable::written_here`]; not one closed from write access, which
    /// is how a collective allocation moves pages of this rank's arena to the ranks it places
    /// them on.
    pub fn set(&self, page: usize, access: Access) {
        let v = match access {
            Access::None => INVALID,
            Access::Read => READ,
            Access::Write => WRITE,
        };
        let old = self.state.get(page).swap(v, Ordering::AcqRel);
        let held_write = match old {
            DEFAULT => self.initial_access(page) == Access::Write,
            o => o == WRITE,
        };
        if access == Access::Write || (held_write && access == Access::Read) {
            self.mark_written_here(page);
        }
    }

    /// Whether the current access allows the faulting access.
    #[inline]
    pub fn permits(&self, page: usize, write: bool) -> bool {
        match self.access(page) {
            Access::Write => true,
            Access::Read => !write,
            Access::None => false,
        }
    }

    /// Marks `page` as just installed (at `now`) for a waiting local thread.
    pub fn mark_installed(&self, page: usize, now: u64) {
        self.installed_at.get(page).store(now, Ordering::Release);
        self.fresh.get(page).store(1, Ordering::Release);
    }

    /// Another rank's write invalidated `page` here (at `now`).
    pub fn mark_lost(&self, page: usize, now: u64) {
        self.lost_at.get(page).store(now, Ordering::Relaxed);
    }

    /// When another rank's write last invalidated `page` here (0: never).
    pub fn lost_at(&self, page: usize) -> u64 {
        self.lost_at.get(page).load(Ordering::Relaxed)
    }

    /// When `page` was last installed.
    pub fn installed_at(&self, page: usize) -> u64 {
        self.installed_at.get(page).load(Ordering::Acquire)
    }

    /// The waiting thread is about to resume and use the page.
    pub fn clear_fresh(&self, page: usize) {
        self.fresh.get(page).store(0, Ordering::Release);
    }

    /// Whether the thread the page was installed for has not resumed yet.
    pub fn is_fresh(&self, page: usize) -> bool {
        self.fresh.get(page).load(Ordering::Acquire) != 0
    }

    /// Tries to become the one local thread fetching `page`.
    #[inline]
    pub fn try_claim(&self, page: usize) -> bool {
        self.inflight.get(page).compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Waits (spin, then futex) until no local thread is fetching `page`.
    pub fn wait_unclaimed(&self, page: usize, spin: std::time::Duration) {
        let w = self.inflight.get(page);
        if crate::sys::futex::spin_until(spin, || w.load(Ordering::Acquire) == 0) {
            return;
        }
        loop {
            match w.compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) | Err(2) => crate::sys::futex::wait(w, 2, None),
                Err(_) => {}
            }
            if w.load(Ordering::Acquire) == 0 {
                return;
            }
        }
    }

    /// Ends this thread's fetch of `page`, waking local waiters.
    pub fn release(&self, page: usize) {
        let w = self.inflight.get(page);
        if w.swap(0, Ordering::AcqRel) == 2 {
            crate::sys::futex::wake(w, i32::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_arena() {
        let pt = PageTable::new(100, 10, 20).unwrap();
        assert_eq!(pt.access(5), Access::None);
        assert_eq!(pt.access(15), Access::Write);
        pt.set(15, Access::Read);
        assert!(pt.permits(15, false) && !pt.permits(15, true));
        pt.set(5, Access::Write);
        assert!(pt.permits(5, true));
        assert!(pt.try_claim(3) && !pt.try_claim(3));
        pt.release(3);
        assert!(pt.try_claim(3));
    }

    #[test]
    fn pages_that_held_write_access_count_as_written_here() {
        let pt = PageTable::new(100, 10, 20).unwrap();
        // An arena page (write access from the start) taken down to read-only.
        pt.set(15, Access::Read);
        assert!(pt.written_here(15));
        // A page granted write access.
        pt.set(30, Access::Write);
        assert!(pt.written_here(30));
        // Pages only ever read here, or taken away unread, do not; nor arena pages closed
        // (placed elsewhere by a collective allocation).
        pt.set(40, Access::Read);
        pt.set(40, Access::None);
        pt.set(41, Access::None);
        pt.set(17, Access::None);
        assert!(!pt.written_here(40) && !pt.written_here(41) && !pt.written_here(17));
        // An arena page that opens read-only (release consistency) is not written until granted.
        let ro = PageTable::new(100, 10, 20).unwrap();
        ro.set_own_read_only();
        ro.set(16, Access::None);
        assert!(!ro.written_here(16));
    }
}
