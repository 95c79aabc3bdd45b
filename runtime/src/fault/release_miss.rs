//! A miss under release consistency (see [`crate::release`]). Async-signal-safe.
//!
//! - No copy here: ask the home for its master (`Request`; for a write, the same request
//!   registers this rank as a writer). A page the home already counts this rank a sharer (and,
//!   for a write, a writer) of is read straight from the home's runtime view when the transport
//!   reads one-sidedly: an RDMA READ and a local fault, no remote CPU.
//! - A write: a rank that is not the page's home takes a twin, then opens the page for writing;
//!   a home writes its master in place.

use gallocy_transport::Span;

use super::acquire::{open_page, request, wait_for, Batch};
use crate::heap::region::Access;
use crate::job::runtime::{protect_failed, Runtime};
use crate::release::ReleaseState;

/// Resolves a miss on `page`, which this thread has claimed; ends the claim.
pub fn resolve(rt: &Runtime, rc: &ReleaseState, page: usize, write: bool) {
    let me = rt.rank();
    let home = rt.home(page);
    if write && home != me && rt.pt().access(page) == Access::Read && !rt.pt().is_writer(page) {
        // Registering as a writer brings the home's current copy: no thread reads this one
        // while it changes.
        set_access(rt, page, Access::None);
    }
    let access = rt.pt().access(page);
    if access == Access::None || (write && !rt.pt().is_writer(page)) {
        let direct = access == Access::None
            && home != me
            && rt.pt().is_sharer(page)
            && (!write || rt.pt().is_writer(page))
            && read_directly(rt, home, page);
        if !direct {
            let waiter = request(rt, page, write);
            let mut batch = Batch::default();
            if !write && access == Access::None {
                batch.prefetch_after(rt, page);
                rt.stats().count(&rt.stats().prefetched, batch.len() as u64);
            }
            wait_for(rt, waiter);
            rt.pt().clear_fresh(page);
            batch.wait(rt);
        }
        if write {
            rt.pt().mark_writer(page);
        }
    }
    if write {
        if home != me {
            rc.take_twin(rt, page);
        }
        set_access(rt, page, Access::Write);
    }
    rt.pt().release(page);
}

/// Reads `page` from the home's runtime view with a one-sided read by this thread, and opens it
/// for reading. False when the transport cannot do that here (the caller asks the home instead).
fn read_directly(rt: &Runtime, home: usize, page: usize) -> bool {
    let Some(t) = rt.transport() else { return false };
    let len = rt.region().page as u32;
    let span = Span { offset: page as u64 * u64::from(len), len };
    if !t.one_sided_reads() || !t.read_inline(home, span) {
        return false;
    }
    rt.stats().count(&rt.stats().bytes_in, u64::from(len));
    open_page(rt, page as u64, false);
    rt.pt().clear_fresh(page);
    true
}

fn set_access(rt: &Runtime, page: usize, access: Access) {
    if rt.pt().access(page) != access {
        if let Err(errno) = rt.region().protect(page, 1, access) {
            protect_failed(rt, errno);
        }
        rt.pt().set(page, access);
    }
}
