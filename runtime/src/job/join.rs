//! Setting up this process's rank and joining the job: the heap becomes shared, the transport
//! connects to every peer, the service thread starts.

use std::sync::Mutex;

use gallocy_transport::local::{LocalViews, ViewId, VIEW_ID_LEN};
use gallocy_transport::MemoryView;

use crate::error::Error;
use crate::fault;
use crate::heap::alloc::RuntimeScope;
use crate::heap::layout::ArenaLayout;
use crate::heap::pagetable::PageTable;
use crate::heap::region::{self, Access};
use crate::job::bootstrap;
use crate::job::config::{self, Identity};
use crate::job::membership::{JOINED, JOINING, LOCAL};
use crate::job::runtime::{Runtime, RUNTIME};
use crate::job::{barrier, forklock};

static INIT_LOCK: Mutex<()> = Mutex::new(());
static JOIN_LOCK: Mutex<()> = Mutex::new(());

/// Sets up as `id` and joins the job.
pub(crate) fn init_as(id: Identity) -> Result<(), Error> {
    let rt = prepare(id, true)?;
    join(rt)
}

/// Sets up this process's rank without talking to anybody: the heap (private memory until the
/// process joins), this rank's arena and the allocator. Idempotent. With `report_to_job`, a
/// member whose own configuration is bad still contacts rank 0, so that the whole job stops
/// with one message naming this rank.
pub(crate) fn prepare(id: Identity, report_to_job: bool) -> Result<&'static Runtime, Error> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let _scope = RuntimeScope::enter();
    let _g = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rank = id.rank;
    let settings = config::settings();
    let region = settings.as_ref().ok().map(|s| region::Region::reserve_private(s.heap_base, s.heap_size));
    let problem = match (&settings, &region) {
        (Err(e), _) => Some(e.to_string()),
        (_, Some(Err(e))) => Some(e.to_string()),
        _ => None,
    };
    if problem.is_some() && report_to_job && id.size > 1 {
        let nowhere = MemoryView { base: std::ptr::null_mut(), len: 0 };
        // This always fails; our own problem (below) is the clearest message for this rank.
        let _ = bootstrap::connect(&id, settings.as_ref().ok(), nowhere, None, problem);
    }
    let settings = settings.map_err(|e| e.on_rank(rank))?;
    let region = region.expect("valid settings give a region").map_err(|e| e.on_rank(rank))?;
    let layout = ArenaLayout::new(region.size, region.page, id.size);
    let (first, end) = layout.pages(id.rank);
    region.protect(first, end - first, Access::Write).map_err(|e| {
        Error::Os { what: "opening this rank's arena".into(), source: std::io::Error::from_raw_os_error(e) }
            .on_rank(rank)
    })?;
    let pt = PageTable::new(region.pages(), first, end).map_err(|e| e.on_rank(rank))?;
    let rt = Runtime::new(id, settings, region, pt, layout).map_err(|e| e.on_rank(rank))?;
    if RUNTIME.set(rt).is_err() {
        unreachable!("prepare holds the init lock");
    }
    let rt = RUNTIME.get().expect("just set");
    crate::heap::alloc::register_process_allocator(rt.alloc());
    Ok(rt)
}

/// Joins the job (idempotent; a no-op in a one-process job): makes the heap shared, connects
/// to every peer, starts the service thread, then waits for every rank (barrier).
pub(crate) fn join(rt: &'static Runtime) -> Result<(), Error> {
    if rt.size() == 1 || rt.joined() {
        return Ok(());
    }
    let _scope = RuntimeScope::enter();
    {
        let _g = JOIN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if rt.joined() {
            return Ok(());
        }
        // No fork while the heap changes hands: a child would get neither a private heap nor
        // a snapshot of the shared one (a fork takes the same lock).
        forklock::fork_lock();
        let joined = connect(rt);
        if joined.is_err() {
            // Back to a working local process: the arena stays open, the gate opens.
            let (first, end) = rt.arena_pages();
            let _ = rt.region().protect(first, end - first, Access::Write);
            rt.membership().set_phase(LOCAL);
            rt.gate().open();
        }
        forklock::fork_unlock();
        joined.map_err(|e| e.on_rank(rt.rank()))?;
    }
    barrier::wait_for_all(rt);
    share_view_ids(rt);
    Ok(())
}

/// Rank 0 tells every rank the heap ids it collected at start-up; every rank then reads pages
/// out of the heaps of its same-host peers directly.
fn share_view_ids(rt: &Runtime) {
    let n = rt.size();
    let mut table = vec![0u8; n * VIEW_ID_LEN];
    if rt.rank() == 0 {
        for (r, id) in bootstrap::view_ids().iter().enumerate().take(n) {
            if let Some(id) = id {
                table[r * VIEW_ID_LEN..(r + 1) * VIEW_ID_LEN].copy_from_slice(&id.encode());
            }
        }
    }
    crate::api::sync::broadcast(&mut table, 0);
    let ids: Vec<Option<ViewId>> =
        table.chunks_exact(VIEW_ID_LEN).map(|c| ViewId::decode(c.try_into().expect("chunks of VIEW_ID_LEN"))).collect();
    // Every rank takes part in the broadcast; one that reads no peer's heap itself
    // (`GALLOCY_SAME_HOST_READS=0`) still lets its peers read its own.
    if rt.settings().same_host_reads {
        rt.set_local_views(LocalViews::new(&ids, rt.rank(), rt.region().size));
    }
}

/// Punches a hole for a freed block's pages in the heap's memfd (both views read zeros there
/// afterwards; a block is uninitialised memory). Not in a forked child, which has no share of the
/// heap. Failure only keeps the memory.
///
/// A fork's child copies the heap out of the memfd while the parent's heap is frozen: a punch
/// then would zero a block the child still has. So the punch counts as a fetch at the gate: it
/// waits while a fork is frozen, and a fork waits for a punch under way before it freezes. The
/// thread that froze the heap (freeing from a signal handler meanwhile) keeps the memory.
fn release_freed_pages(first: usize, pages: usize) {
    let Some(rt) = RUNTIME.get() else { return };
    if rt.membership().forked() || crate::preload::freezing_here() {
        return;
    }
    rt.gate().begin_fetch();
    let released = rt.region().release(first, pages).is_ok();
    rt.gate().end_fetch();
    if released {
        rt.stats().count(&rt.stats().pages_released, pages as u64);
    }
}

/// The joining steps of [`join`].
fn connect(rt: &'static Runtime) -> Result<(), Error> {
    let os = |what: &str, e: i32| Error::Os { what: what.into(), source: std::io::Error::from_raw_os_error(e) };
    fault::handler::install()?;
    fault::handler::prepare_thread();
    // Other threads keep running: while the arena's contents move into the memfd, their writes
    // to it fault, and wait at the gate (see `fault::handler`).
    rt.gate().close();
    rt.membership().set_phase(JOINING);
    let (first, end) = rt.arena_pages();
    rt.region().protect(first, end - first, Access::Read).map_err(|e| os("freezing this rank's arena", e))?;
    // Every page handed out so far lies below the allocator's high-water mark.
    let used = rt.alloc().high_water_page().clamp(first, end);
    let view = rt.region().share(first, used)?;
    // The view's mapping budget: what the kernel allows now, less what the process maps
    // besides the heap and a reserve for what it maps later.
    let budget = match rt.settings().heap_mappings {
        Some(b) => b,
        None => crate::heap::mappings::default_budget(
            crate::heap::region::max_map_count().unwrap_or(65530),
            crate::heap::mappings::other_mappings(rt.region().base, rt.region().size)?,
        ),
    };
    rt.mappings().set_budget(budget);
    // Under release consistency this rank is home of its arena's pages: its first write to each
    // registers it as a writer (see `protocol::sharing`), so the arena opens read-only.
    let arena_access = if rt.release().is_some() { Access::Read } else { Access::Write };
    if arena_access == Access::Read {
        rt.pt().set_own_read_only();
    }
    rt.region().protect(first, end - first, arena_access).map_err(|e| os("opening this rank's arena", e))?;
    // Writers to the arena go on now; faults on other pages wait for the end of the join.
    rt.gate().open();
    // Same-host peers read pages straight from our memfd.
    let view_id = rt.region().memfd().and_then(ViewId::of);
    // A panic in one of our threads (a bug of ours; the transports start theirs here) ends the
    // process with one line, instead of leaving it and its peers waiting for a thread that is gone.
    crate::job::panics::install(rt.rank());
    let transport = bootstrap::connect(rt.identity(), Some(rt.settings()), view, view_id, None)?;
    rt.set_transport(transport);
    if rt.rank() == 0 && rt.identity().token_derived {
        eprintln!(
            "gallocy: warning: GALLOCY_TOKEN is not set; using a token derived from the job's identity, \
             which keeps other jobs out but is not a secret"
        );
    }
    let rank = rt.rank();
    std::thread::Builder::new()
        .name("gallocy-service".into())
        .spawn(move || {
            crate::job::panics::guarded(rank, "gallocy-service", || {
                std::mem::forget(RuntimeScope::enter());
                fault::handler::prepare_thread();
                if let Some(slice) = rt.settings().service_slice {
                    crate::sys::sched::request_slice(slice);
                }
                // Asked to, and where the process may (CAP_SYS_NICE, RLIMIT_NICE), the service
                // thread runs at a higher priority than the application's threads: a message that
                // wakes it preempts a thread that computes on its CPU at once.
                if let Some(nice) = rt.settings().service_nice {
                    crate::sys::sched::request_nice(nice);
                }
                crate::engine::Engine::new(rt).run();
            })
        })
        .map_err(|e| Error::Os { what: "starting the service thread".into(), source: e })?;
    // Freed large blocks give their memory back, except where a hole would not reach this
    // process's readers (RDMA registrations that pin the physical pages: peers would go on
    // reading a stale page; with on-demand paging they follow the page tables).
    if rt.transport().is_none_or(|t| t.holes_reach_readers()) {
        rt.alloc().release_freed_pages_with(release_freed_pages);
    }
    rt.membership().record_member_pid();
    rt.membership().set_phase(JOINED);
    Ok(())
}
