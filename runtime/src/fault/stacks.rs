//! Stacks for the fault path on threads whose alternate signal stack is small.
//!
//! The handler runs on the faulting thread's alternate stack. Threads the runtime prepares get
//! one of 64 KiB (`handler::prepare_thread`), but a program's own threads keep the one their
//! creator gave them: std gives each thread `max(8 KiB, AT_MINSIGSTKSZ)`. The kernel's signal
//! frame alone takes up to about 3.6 KiB with AVX-512 state, and the fault path, which waits,
//! reads frames and authenticates them itself, needs about 4 KiB more: together, more than 8 KiB
//! leaves room for. So a fault taken with less than [`ENOUGH`] bytes of stack left runs on a
//! stack of our own, from a small pool: mapped on first use with a guard page below it, claimed
//! for the length of one fault, never unmapped (when all are in use, a stack mapped for that
//! fault alone). Async-signal-safe: atomics, `mmap` and a stack switch (`psm`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Stacks in the pool: as many threads at once can fault on a small alternate stack; more wait.
const POOL: usize = 32;
/// Size of each pool stack.
const SIZE: usize = 64 * 1024;
/// Stack left (bytes) below which a fault moves to a pool stack.
const ENOUGH: usize = 32 * 1024;

static BASES: [AtomicUsize; POOL] = [const { AtomicUsize::new(0) }; POOL];
static BUSY: [AtomicBool; POOL] = [const { AtomicBool::new(false) }; POOL];

/// Runs `f`, on a pool stack if the current one has less than [`ENOUGH`] bytes left (on a
/// stack mapped for this call alone when all pool stacks are in use: a fault may wait long, for
/// example at the heap gate while a fork takes its snapshot, and nobody waits for a stack).
/// `alt` is the thread's alternate signal stack as the kernel saved it in the signal's context
/// (`uc_stack`): reading it there costs no system call.
pub fn with_enough_stack<R>(alt: &libc::stack_t, f: impl FnOnce() -> R) -> R {
    if room_left(alt, psm::stack_pointer() as usize) >= ENOUGH {
        return f();
    }
    let (slot, base) = match claim() {
        Some((slot, base)) => (Some(slot), base),
        None => match map_stack() {
            0 => return f(), // no memory for a stack: the current one may still do
            base => (None, base),
        },
    };
    // SAFETY: [base, base + SIZE) is a stack of ours, page-aligned, with a guard page below it,
    // used by this thread alone until the end of this call; `f` does not unwind (the fault path
    // never panics).
    let r = unsafe { psm::on_stack(base as *mut u8, SIZE, f) };
    match slot {
        Some(slot) => BUSY[slot].store(false, Ordering::Release),
        None => unmap_stack(base),
    }
    r
}

/// In a forked child (one thread, which was not in a fault at the fork): every pool stack is
/// free.
pub fn reset_in_child() {
    for b in &BUSY {
        b.store(false, Ordering::Release);
    }
}

/// Bytes left below `sp` on the alternate stack `alt`; `usize::MAX` when `sp` is not on it (the
/// handler runs on the thread's ordinary stack: the thread has no alternate stack).
fn room_left(alt: &libc::stack_t, sp: usize) -> usize {
    let low = alt.ss_sp as usize;
    if alt.ss_flags & libc::SS_DISABLE != 0 || !(low..low.saturating_add(alt.ss_size)).contains(&sp) {
        return usize::MAX;
    }
    sp - low
}

/// Claims a free pool stack (mapping it on first use). `None` if all are in use or a stack
/// cannot be mapped.
fn claim() -> Option<(usize, usize)> {
    for slot in 0..POOL {
        if BUSY[slot].swap(true, Ordering::Acquire) {
            continue;
        }
        let mut base = BASES[slot].load(Ordering::Acquire);
        if base == 0 {
            base = map_stack();
            if base == 0 {
                BUSY[slot].store(false, Ordering::Release);
                return None;
            }
            BASES[slot].store(base, Ordering::Release);
        }
        return Some((slot, base));
    }
    None
}

/// Maps a stack of [`SIZE`] bytes with a guard page below it; returns its low end, or 0.
fn map_stack() -> usize {
    let page = crate::heap::region::page_size();
    // SAFETY: a fresh private anonymous mapping; its lowest page becomes the guard.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return 0;
        }
        libc::mprotect(p, page, libc::PROT_NONE);
        p as usize + page
    }
}

/// Unmaps a stack of [`map_stack`] (its guard page included).
fn unmap_stack(base: usize) {
    let page = crate::heap::region::page_size();
    // SAFETY: unmapping a stack `map_stack` made, no longer in use.
    unsafe { libc::munmap((base - page) as *mut libc::c_void, SIZE + page) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a small alternate stack, the work runs on a pool stack (far from the alternate stack),
    /// which is free again afterwards.
    #[test]
    fn small_alternate_stacks_move_to_a_pool_stack() {
        let none = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
        assert_eq!(room_left(&none, psm::stack_pointer() as usize), usize::MAX, "not on an alternate stack here");
        let sp = with_enough_stack(&none, || psm::stack_pointer() as usize);
        let local = 0u8;
        assert!(sp.abs_diff(&local as *const u8 as usize) < 1 << 20, "ran in place");
        // Inside a signal handler on a 16 KiB alternate stack.
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        extern "C" fn on_usr1(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
            // SAFETY: the kernel passes the signal's ucontext_t.
            let alt = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_stack };
            SEEN.store(with_enough_stack(alt, || psm::stack_pointer() as usize), Ordering::SeqCst);
        }
        let mut alt = vec![0u8; 16 * 1024];
        // SAFETY: this thread's alternate stack is `alt` while the signal runs, then disabled;
        // the handler is async-signal-safe.
        unsafe {
            let st = libc::stack_t { ss_sp: alt.as_mut_ptr().cast(), ss_flags: 0, ss_size: alt.len() };
            assert_eq!(libc::sigaltstack(&st, std::ptr::null_mut()), 0);
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_usr1 as *const () as usize;
            sa.sa_flags = libc::SA_ONSTACK | libc::SA_SIGINFO;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
            libc::pthread_kill(libc::pthread_self(), libc::SIGUSR1);
            let off = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
            libc::sigaltstack(&off, std::ptr::null_mut());
        }
        let sp = SEEN.load(Ordering::SeqCst);
        let alt_range = alt.as_ptr() as usize..alt.as_ptr() as usize + alt.len();
        assert!(sp != 0 && !alt_range.contains(&sp), "ran on the small alternate stack");
        let on_pool = (0..POOL).any(|s| {
            let b = BASES[s].load(Ordering::SeqCst);
            b != 0 && (b..b + SIZE).contains(&sp)
        });
        assert!(on_pool, "ran on a pool stack");
        assert!(BUSY.iter().all(|b| !b.load(Ordering::SeqCst)), "the stack was given back");
    }
}
