//! A miss under release consistency (see [`crate::release`]). Async-signal-safe.
//!
//! - No copy here: read the home's master by ourselves when we can: with a one-sided read (RDMA
//!   READ), or from its memfd when it runs on this host (TCP); no remote CPU. The first time, a one-way
//!   `Share` tells the home that we share the page (our next acquire fences it). Otherwise ask the
//!   home for its master (`Request`; for a write, the same request registers this rank as a
//!   writer).
//! - A write: a rank that is not the page's home takes a twin, then opens the page for writing;
//!   a home writes its master in place.
//! - At the home: a read needs nobody; the first write tells the home's own service thread only
//!   if other ranks share the page.

use gallocy_transport::Span;

use super::acquire::{open_page, read_from_host_peer, request, send_raw, wait_for, Batch};
use crate::heap::region::Access;
use crate::job::runtime::Runtime;
use crate::protocol::Msg;
use crate::release::ReleaseState;

/// Resolves a miss on `page`, which this thread has claimed; ends the claim.
pub fn resolve(rt: &Runtime, rc: &ReleaseState, page: usize, write: bool) {
    let me = rt.rank();
    let home = rt.home(page);
    if home == me {
        resolve_at_home(rt, page, write);
        rt.pt().release(page);
        return;
    }
    if write && rt.pt().access(page) == Access::Read && !rt.pt().is_writer(page) {
        // Registering as a writer brings the home's current copy: no thread reads this one
        // while it changes.
        set_access(rt, page, Access::None);
    }
    let access = rt.pt().access(page);
    if access == Access::None || (write && !rt.pt().is_writer(page)) {
        // A read, or a write of a page we are registered to write: the home need not answer.
        let was_sharer = rt.pt().is_sharer(page);
        let direct = access == Access::None && (!write || rt.pt().is_writer(page)) && read_directly(rt, home, page);
        if direct && !was_sharer {
            // The home learns that we share the page; our next acquire fences it before it
            // decides which copies to drop.
            rc.told_share(home);
            send_raw(rt, home, &Msg::Share { page: page as u64 }, "cannot send a share notice to rank ");
            rt.pt().mark_sharer(page);
        }
        if !direct {
            let waiter = request(rt, page, write);
            let mut batch = Batch::default();
            if !write && access == Access::None {
                batch.prefetch_after(rt, page);
                batch.send_requests(rt);
                rt.stats().count(&rt.stats().prefetched, batch.len() as u64);
            }
            wait_for(rt, waiter);
            rt.page_resumed(page);
            batch.wait(rt);
        }
        if write {
            rt.pt().mark_writer(page);
        }
    }
    if write {
        rc.take_twin(rt, page);
        set_access(rt, page, Access::Write);
    }
    rt.pt().release(page);
}

/// A miss at the page's home, which holds the master: a read opens it; the first write registers
/// this rank as a writer, with a message to its own service thread only when other ranks share the
/// page (they must learn that it is volatile before the write), then opens it for good.
fn resolve_at_home(rt: &Runtime, page: usize, write: bool) {
    if write && !rt.pt().is_writer(page) {
        // Paired with the service thread, which marks a page shared before it reads this bit.
        rt.pt().mark_writer(page);
        if rt.pt().has_sharers(page) {
            let waiter = request(rt, page, true);
            wait_for(rt, waiter);
            rt.page_resumed(page);
        }
    }
    set_access(rt, page, if write { Access::Write } else { Access::Read });
}

/// Reads `page` from the home's memory by this thread: with a one-sided read of its runtime view
/// when the transport reads one-sidedly (RDMA READ), else from its memfd when it runs on this
/// host (`gallocy_transport::local`); then opens it for reading. False when neither works here
/// (the caller asks the home instead).
fn read_directly(rt: &Runtime, home: usize, page: usize) -> bool {
    let Some(t) = rt.transport() else { return false };
    let len = rt.region().page as u32;
    let span = Span { offset: page as u64 * u64::from(len), len };
    let read = if t.one_sided_reads() {
        let read = t.read_inline(home, span);
        if read {
            rt.stats().count(&rt.stats().pages_read_directly, 1);
        }
        read
    } else {
        read_from_host_peer(rt, home, page as u64)
    };
    if !read {
        return false;
    }
    rt.stats().count(&rt.stats().bytes_in, u64::from(len));
    open_page(rt, page as u64, false);
    rt.page_resumed(page);
    true
}

fn set_access(rt: &Runtime, page: usize, access: Access) {
    if rt.pt().access(page) != access {
        rt.set_access(page, 1, access);
    }
}
