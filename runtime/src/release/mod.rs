//! Release consistency on this rank (`GALLOCY_CONSISTENCY=release`): twins, diffs and
//! self-invalidation, after ArgoDSM. The home side lives in [`crate::protocol::sharing`]; the
//! fault path's part (taking twins, reading copies) in [`crate::fault::release_miss`].
//!
//! - A rank that is not a page's home writes its own copy: the first write after a release
//!   takes a *twin* (a private copy of the page as it was) and opens the page for writing.
//! - **Release** (`gallocy_unlock`, `gallocy_barrier`, `gallocy_finalize`): every written page is
//!   closed for writing again, its changes against the twin go to the home as a diff, and the
//!   release ends when every home confirmed (`Fence`) that they are applied.
//! - **Acquire** (`gallocy_lock` of a lock last held elsewhere, `gallocy_barrier`): every copy of
//!   a page that another rank writes (*volatile*) is dropped, so the next access fetches the
//!   home's master. Copies of pages nobody else writes (private or only read) stay.
//! - A home writes its master copy in place (no twin, no diff); its first write to a page
//!   registers it as a writer, so that the page's sharers learn that it is volatile.
//!
//! Correct for data-race-free programs: every conflicting access pair is ordered by a lock or a
//! barrier. Racy programs are undefined in this mode.

mod pageset;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::Error;
use crate::fault::acquire::wait_for;
use crate::heap::lazy::LazyArray;
use crate::heap::region::Access;
use crate::job::runtime::{fatal, Runtime};
use crate::protocol::ranks::RankSet;
use crate::protocol::{diff, wire, Msg, Waiter};
pub use pageset::PageSet;

/// Fences waited for at once.
const FENCES_IN_FLIGHT: usize = 32;

/// This rank's release-consistency state.
pub struct ReleaseState {
    /// Pages written since the last release (each has a twin), of which this rank is not home.
    dirty: PageSet,
    /// Copies this rank holds of volatile pages: dropped at the next acquire.
    volatile_held: PageSet,
    /// One twin per page, at the page's index.
    twins: LazyArray<u8>,
    page: usize,
    /// One release or acquire at a time; the buffer a diff is encoded into.
    sync: Mutex<Vec<u8>>,
    /// Homes told `Share` since the last acquire: the acquire fences them first, so that it knows
    /// every page those copies may have to drop.
    unfenced: [AtomicU64; RANK_WORDS],
}

/// Words of [`ReleaseState::unfenced`] (one bit per rank).
const RANK_WORDS: usize = RankSet::CAPACITY / 64;

impl ReleaseState {
    pub fn new(pages: usize, page: usize) -> Result<ReleaseState, Error> {
        Ok(ReleaseState {
            dirty: PageSet::new(pages)?,
            volatile_held: PageSet::new(pages)?,
            twins: LazyArray::new(pages * page)?,
            page,
            sync: Mutex::new(Vec::new()),
            unfenced: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// This rank told `home` that it read a copy by itself. Async-signal-safe.
    pub fn told_share(&self, home: usize) {
        self.unfenced[home / 64].fetch_or(1 << (home % 64), Ordering::AcqRel);
    }

    /// The homes told `Share` since the last call.
    fn take_unfenced(&self) -> RankSet {
        let mut set = RankSet::empty();
        for (i, w) in self.unfenced.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                set = set.with(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        set
    }

    /// Takes the twin of `page` (its runtime view) and records the page as written. The caller
    /// holds the page's in-flight claim and opens it for writing next. Async-signal-safe.
    pub fn take_twin(&self, rt: &Runtime, page: usize) {
        // SAFETY: both are `self.page` bytes inside their mappings (the twin area has one slot per
        // heap page); the claim keeps every other thread of this process from writing the page
        // (it is not writable) or its twin meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(rt.region().runtime_page(page), self.twin(page), self.page);
        }
        self.dirty.insert(page);
    }

    /// A copy of `page` was just installed here. Async-signal-safe.
    pub fn installed(&self, rt: &Runtime, page: usize) {
        if rt.home(page) != rt.rank() {
            rt.pt().mark_sharer(page);
            if rt.pt().is_volatile(page) {
                self.volatile_held.insert(page);
            }
        }
    }

    /// The home told us that others write `page`.
    pub fn became_volatile(&self, rt: &Runtime, page: usize) {
        rt.pt().mark_volatile(page);
        if rt.pt().access(page) != Access::None {
            self.volatile_held.insert(page);
        }
    }

    fn twin(&self, page: usize) -> *mut u8 {
        self.twins.run_ptr(page * self.page, self.page)
    }
}

/// Claims `page` for this thread (no fault of this process fetches or writes it meanwhile).
fn claim(rt: &Runtime, page: usize) {
    while !rt.pt().try_claim(page) {
        rt.pt().wait_unclaimed(page, rt.settings().spin);
    }
}

/// Sets the access of `page` (claimed) and its protection.
fn set_access(rt: &Runtime, page: usize, access: Access) {
    if rt.pt().access(page) != access {
        rt.set_access(page, 1, access);
    }
}

/// Sends the changes of written page `page` (claimed, closed for writing by the caller) to its
/// home; records the home in `homes`.
fn send_diff(rt: &Runtime, rc: &ReleaseState, page: usize, buf: &mut Vec<u8>, homes: &mut RankSet) {
    let need = diff::max_encoded(rc.page);
    if buf.len() < 2 * need + 64 {
        buf.resize(2 * need + 64, 0);
    }
    let (head, body) = buf.split_at_mut(need);
    // SAFETY: the runtime view and the twin each hold `rc.page` readable bytes; the page is closed
    // for writing and claimed, so neither changes meanwhile (peers never write our copy).
    let (now, twin) = unsafe {
        (
            std::slice::from_raw_parts(rt.region().runtime_page(page), rc.page),
            std::slice::from_raw_parts(rc.twin(page), rc.page),
        )
    };
    let n = diff::encode(now, twin, head);
    if n == 0 {
        return;
    }
    let home = rt.home(page);
    let bytes = match wire::encode(&Msg::Diff { page: page as u64 }, &head[..n], body) {
        Ok(b) => b,
        Err(e) => fatal(rt, &format!("cannot encode a diff: {e}")),
    };
    rt.stats().count(&rt.stats().diffs_sent, 1);
    rt.stats().count(&rt.stats().bytes_out, n as u64);
    rt.send_encoded(home, bytes);
    *homes = homes.with(home);
}

/// Waits until every home in `homes` applied the diffs this rank sent it.
fn fence(rt: &Runtime, homes: RankSet) {
    let homes: Vec<usize> = homes.iter().collect();
    for chunk in homes.chunks(FENCES_IN_FLIGHT) {
        let mut waiters: [Option<Waiter>; FENCES_IN_FLIGHT] = [None; FENCES_IN_FLIGHT];
        for (i, home) in chunk.iter().enumerate() {
            let waiter = rt.slots().claim_dependent();
            rt.send_from_app(*home, Msg::Fence { waiter });
            waiters[i] = Some(waiter);
        }
        for w in waiters.into_iter().flatten() {
            wait_for(rt, w);
        }
    }
}

/// Release: every page this rank wrote since its last release goes back to its home, and the
/// homes confirm. Afterwards any rank that acquires after us sees our writes.
pub fn release(rt: &Runtime) {
    let Some(rc) = rt.release() else { return };
    let mut buf = rc.sync.lock().unwrap_or_else(|p| p.into_inner());
    let mut homes = RankSet::empty();
    rc.dirty.drain(|page| {
        claim(rt, page);
        if rt.pt().access(page) == Access::Write {
            set_access(rt, page, Access::Read);
            send_diff(rt, rc, page, &mut buf, &mut homes);
        }
        rt.pt().release(page);
    });
    fence(rt, homes);
}

/// Acquire: drops this rank's copies of pages that other ranks write (sending our own changes
/// to them first), so that our next access sees every write released before this acquire.
pub fn acquire(rt: &Runtime) {
    let Some(rc) = rt.release() else { return };
    let mut buf = rc.sync.lock().unwrap_or_else(|p| p.into_inner());
    // Copies read by ourselves: their homes' answers (which of those pages others write) come
    // before the answer to the fence.
    fence(rt, rc.take_unfenced());
    let mut homes = RankSet::empty();
    let mut dropped = 0;
    rc.volatile_held.drain(|page| {
        claim(rt, page);
        let access = rt.pt().access(page);
        if access != Access::None {
            // Closed in one step (the diff reads the runtime view, which stays as it is).
            set_access(rt, page, Access::None);
            dropped += 1;
        }
        if access == Access::Write {
            send_diff(rt, rc, page, &mut buf, &mut homes);
        }
        rt.pt().release(page);
    });
    rt.stats().count(&rt.stats().self_invalidations, dropped);
    fence(rt, homes);
}
