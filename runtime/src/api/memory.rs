//! The shared heap's allocator: `malloc` and friends, and a Rust `GlobalAlloc`.

use std::alloc::{GlobalAlloc, Layout, System};

use crate::fault::acquire::wait_for;
use crate::heap::alloc::{in_runtime, AllocError, RuntimeScope};
use crate::job::runtime::{Runtime, RUNTIME};
use crate::protocol::Msg;
use crate::sys::rawio::write_stderr;

use super::rt;

/// Reports an allocator misuse and ends the process like glibc does (SIGABRT).
pub(crate) fn misuse(rt: &Runtime, e: &AllocError) -> ! {
    write_stderr(format!("gallocy: rank {}: error: {e}\n", rt.rank()).as_bytes());
    std::process::abort()
}

/// Allocates `size` bytes aligned to `align` from the shared heap; null when out of memory.
#[inline]
fn allocate(size: usize, align: usize) -> *mut u8 {
    let rt = rt();
    match rt.alloc().alloc(size, align) {
        Ok(a) => a as *mut u8,
        Err(AllocError::OutOfMemory(_)) => std::ptr::null_mut(),
        Err(e) => misuse(rt, &e),
    }
}

/// `malloc` from the shared heap (16-byte aligned).
pub fn malloc(size: usize) -> *mut u8 {
    allocate(size, 16)
}

/// `calloc` from the shared heap: zero-filled.
pub fn calloc(n: usize, size: usize) -> *mut u8 {
    let Some(total) = n.checked_mul(size) else {
        return std::ptr::null_mut();
    };
    let p = malloc(total);
    if !p.is_null() {
        // SAFETY: `p` points at `total` freshly allocated bytes.
        unsafe { std::ptr::write_bytes(p, 0, total) };
    }
    p
}

/// `aligned_alloc` from the shared heap; `align` must be a power of two.
pub fn aligned_alloc(align: usize, size: usize) -> *mut u8 {
    allocate(size, align.max(16))
}

/// Frees a block of the shared heap, wherever it was allocated (blocks of another rank's arena
/// are handed to that rank). A double or invalid free ends the process with a clear message.
///
/// # Safety
/// `p` must be null or a live block from this allocator, not used after this call.
pub unsafe fn free(p: *mut u8) {
    if p.is_null() {
        return;
    }
    let rt = rt();
    let addr = p as usize;
    if !rt.region().contains(addr) {
        misuse(rt, &AllocError::InvalidPointer(addr));
    }
    if rt.alloc().is_local(addr) {
        if let Err(e) = rt.alloc().free(addr) {
            misuse(rt, &e);
        }
    } else if !rt.joined() && !rt.membership().forked() {
        // Before joining, no block of another rank's arena can have reached this process.
        misuse(rt, &AllocError::InvalidPointer(addr));
    } else if !rt.membership().forked() && !rt.membership().leaving() {
        let _s = RuntimeScope::enter();
        rt.send_from_app(rt.arena_rank(rt.page_of(addr)), Msg::Free { addr: addr as u64 });
    }
    // A forked child of a multi-process job is not a member of the job, and a process that left
    // the job has nobody to tell: another rank's block is then simply not reused.
}

/// Usable size of a block of the shared heap (asks the owning rank for another rank's block).
///
/// # Safety
/// `p` must be a live block from this allocator.
pub unsafe fn usable_size(p: *mut u8) -> usize {
    let rt = rt();
    let _s = RuntimeScope::enter();
    let addr = p as usize;
    if !rt.region().contains(addr) {
        misuse(rt, &AllocError::InvalidPointer(addr));
    }
    if rt.alloc().is_local(addr) {
        return rt.alloc().usable_size(addr).unwrap_or_else(|e| misuse(rt, &e));
    }
    if !rt.joined() || rt.membership().forked() {
        // Only a member of the job can ask the owning rank.
        misuse(rt, &AllocError::InvalidPointer(addr));
    }
    let waiter = rt.slots().claim_dependent();
    rt.send_from_app(rt.arena_rank(rt.page_of(addr)), Msg::SizeQuery { addr: addr as u64, waiter });
    match wait_for(rt, waiter) {
        0 => misuse(rt, &AllocError::InvalidPointer(addr)),
        n => n as usize,
    }
}

/// `realloc` within the shared heap: contents are kept up to the smaller size.
///
/// # Safety
/// `p` must be null or a live block from this allocator; after a non-null return it is freed.
pub unsafe fn realloc(p: *mut u8, size: usize) -> *mut u8 {
    if p.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // SAFETY: forwarded caller contract.
        unsafe { free(p) };
        return std::ptr::null_mut();
    }
    // SAFETY: forwarded caller contract.
    let old = unsafe { usable_size(p) };
    if size <= old && rt().alloc().is_local(p as usize) && size >= old / 2 {
        return p;
    }
    let q = malloc(size);
    if !q.is_null() {
        // SAFETY: both blocks are live and at least min(old, size) bytes long; they are distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(p, q, old.min(size));
            free(p);
        }
    }
    q
}

/// A `GlobalAlloc` that puts Rust allocations (`Box`, `Vec`, ...) in the shared heap once
/// `init` has run; before that, and for gallocy's own threads, it uses the system allocator.
/// `dealloc` decides by address, so both kinds of blocks can be freed at any time.
pub struct GallocyAlloc;

// SAFETY: blocks come from either the system allocator or gallocy's allocator, each honouring
// the layout, and every block is returned to the allocator its address belongs to.
unsafe impl GlobalAlloc for GallocyAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match RUNTIME.get() {
            Some(rt) if !in_runtime() && !rt.membership().finalized() => {
                let _s = RuntimeScope::enter();
                rt.alloc().alloc(layout.size(), layout.align().max(16)).map_or(std::ptr::null_mut(), |a| a as *mut u8)
            }
            // SAFETY: forwarded layout contract.
            _ => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match RUNTIME.get() {
            // SAFETY: the block is ours (by address) and live per the caller's contract.
            Some(rt) if rt.region().contains(p as usize) => unsafe { free(p) },
            // SAFETY: forwarded contract: the block came from System.
            _ => unsafe { System.dealloc(p, layout) },
        }
    }
}
