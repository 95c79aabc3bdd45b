//! Hooks for the `LD_PRELOAD` shim (`alloc-shim`, `libgallocy.so`). Not for applications.
//!
//! The shim exports the malloc family; these functions tell it which calls are gallocy's own
//! (to be served by glibc, so the runtime never re-enters itself), which pointers belong to the
//! shared heap, and keep the allocator consistent across `fork`.

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use crate::runtime::RUNTIME;

/// True while the calling thread runs gallocy's own code (its allocations must not come from
/// the shared heap).
#[inline]
pub fn in_runtime() -> bool {
    crate::in_runtime()
}

/// Marks the calling thread as running gallocy's own code while the value lives.
pub struct Scope(#[allow(dead_code)] crate::RuntimeScope);

/// Enters a [`Scope`].
#[inline]
pub fn scope() -> Scope {
    Scope(crate::RuntimeScope::enter())
}

/// Whether `addr` lies in the shared heap (false before `init`).
#[inline]
pub fn owns(addr: usize) -> bool {
    RUNTIME.get().is_some_and(|rt| rt.region.contains(addr))
}

/// `malloc` fast path for the shim: `None` when the calling thread runs gallocy's own code
/// (the shim then uses glibc), else the block (null when out of memory). One thread-local access.
#[inline]
pub fn malloc(size: usize) -> Option<*mut u8> {
    let rt = RUNTIME.get()?;
    crate::alloc::THREAD.with(|t| {
        if t.in_runtime() {
            return None;
        }
        Some(match rt.alloc.alloc_in(t, size, 16) {
            Ok(a) => a as *mut u8,
            Err(crate::AllocError::OutOfMemory(_)) => std::ptr::null_mut(),
            Err(e) => crate::misuse(rt, &e),
        })
    })
}

/// `free` fast path: frees `p` if it lies in the shared heap and returns true; returns false
/// for any other pointer (the shim hands those to glibc).
///
/// # Safety
/// If `p` lies in the shared heap it must be a live block of it.
#[inline]
pub unsafe fn free_if_owned(p: *mut u8) -> bool {
    let Some(rt) = RUNTIME.get() else { return false };
    let addr = p as usize;
    if !rt.region.contains(addr) {
        return false;
    }
    if rt.alloc.is_local(addr) {
        if let Err(e) = crate::alloc::THREAD.with(|t| rt.alloc.free_in(t, addr)) {
            crate::misuse(rt, &e);
        }
    } else {
        // SAFETY: forwarded caller contract.
        unsafe { crate::free(p) }
    }
    true
}

/// Whether `init` has completed in this process.
#[inline]
pub fn initialized() -> bool {
    RUNTIME.get().is_some()
}

/// Joins the job described by the environment, or, when `single` is true, runs this process as
/// a one-process job whatever the environment says (a process started by a job member inherits
/// the member's variables but is not a member itself).
pub fn init(single: bool) -> Result<(), crate::Error> {
    if !single {
        return crate::init();
    }
    let mut id = crate::config::identity().unwrap_or_else(|_| crate::config::single_identity());
    if id.size > 1 {
        id = crate::config::single_identity();
    }
    crate::init_as(id)
}

/// Whether `GALLOCY_STATS=1` is in force.
pub fn stats_enabled() -> bool {
    RUNTIME.get().is_some_and(|rt| rt.settings.stats)
}

thread_local! {
    static FORK_GUARDS: RefCell<Option<crate::alloc::ForkGuards<'static>>> = const { RefCell::new(None) };
}

/// `pthread_atfork` prepare handler: holds the allocator's locks across `fork`, so the child
/// never inherits one held by a thread that does not exist there.
pub fn before_fork() {
    if let Some(rt) = RUNTIME.get() {
        // The slot's first use registers a destructor, which allocates: do that as runtime code
        // and before taking the locks that allocation could need.
        let _s = scope();
        FORK_GUARDS.with(|_| ());
        let guards = rt.alloc.lock_all();
        FORK_GUARDS.with(|g| *g.borrow_mut() = Some(guards));
    }
}

/// `pthread_atfork` parent handler.
pub fn after_fork_parent() {
    FORK_GUARDS.with(|g| g.borrow_mut().take());
}

/// `pthread_atfork` child handler. A one-process job's heap is private memory, so the child
/// simply goes on with a copy-on-write snapshot. In a multi-process job the child is not a
/// member of the job: its heap mappings become private copies (its writes never reach the
/// parent), its allocations still work (from the parent's arena, now private), frees of other
/// ranks' blocks are ignored, and touching a page the parent did not hold is a clear error.
pub fn after_fork_child() {
    FORK_GUARDS.with(|g| g.borrow_mut().take());
    if let Some(rt) = RUNTIME.get() {
        if rt.size > 1 {
            rt.forked.store(true, Ordering::Release);
            let _s = scope();
            rt.region.privatize();
        }
    }
}
