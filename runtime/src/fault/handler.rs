//! In-process page faults: the SIGSEGV handler and the fault path.
//!
//! The handler is installed with `SA_SIGINFO | SA_ONSTACK` and all signals blocked while it runs.
//! A fault inside the heap's application view is a coherence miss: the faulting thread asks the
//! page's home for access and waits (spin, then futex) until the service thread has installed
//! the page. Everything on this path is async-signal-safe: no allocation, no lock application
//! code can hold, no logging (only a raw `write` right before a fatal `_exit`). Any other fault is
//! handed to the handler that was installed before ours, or to the default action, so a real bug
//! still kills the program with SIGSEGV.

use std::cell::{Cell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::Error;
use crate::fault::access_kind::{reported_write, write_or_infer};
use crate::fault::acquire::{acquire, fatal_raw, wait_for_exit};
use crate::job::membership::{JOINING, LOCAL};
use crate::job::runtime::{Runtime, RUNTIME};

/// The action that was installed before ours: written once by `install` (under its lock, before
/// our handler is installed), then only read.
struct PreviousAction(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: see the type's comment: one write strictly before all reads.
unsafe impl Sync for PreviousAction {}
static PREVIOUS: PreviousAction = PreviousAction(UnsafeCell::new(MaybeUninit::uninit()));
static INSTALLED: AtomicBool = AtomicBool::new(false);
static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// `si_code` of a fault on an address with no mapping (`<asm-generic/siginfo.h>`).
const SEGV_MAPERR: libc::c_int = 1;

/// Size of the alternate signal stack gallocy gives threads.
const ALT_STACK: usize = 64 * 1024;

/// Installs the SIGSEGV handler once per process.
pub fn install() -> Result<(), Error> {
    let _g = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: PREVIOUS is written by the first call, a query that installs nothing, so it holds
    // the previous action before our handler (installed by the second call) can run and read it;
    // nobody else writes PREVIOUS (install runs once, under INSTALL_LOCK). A zeroed sigaction is
    // a valid value to fill in.
    unsafe {
        if libc::sigaction(libc::SIGSEGV, std::ptr::null(), (*PREVIOUS.0.get()).as_mut_ptr()) != 0 {
            return Err(Error::os("reading the SIGSEGV action"));
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigfillset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::os("installing the SIGSEGV handler"));
        }
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// Gives the calling thread an alternate signal stack large enough for the fault path, unless
/// it already has one of at least that size.
pub fn prepare_thread() {
    // SAFETY: querying and setting this thread's alternate stack with valid pointers; the new
    // stack is a fresh mapping that stays mapped for the thread's (and process's) lifetime.
    unsafe {
        let mut old: libc::stack_t = std::mem::zeroed();
        libc::sigaltstack(std::ptr::null(), &mut old);
        if old.ss_flags & libc::SS_DISABLE == 0 && old.ss_size >= ALT_STACK {
            return;
        }
        if old.ss_flags & libc::SS_ONSTACK != 0 {
            return;
        }
        let page = crate::heap::region::page_size();
        let p = libc::mmap(
            std::ptr::null_mut(),
            ALT_STACK + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return;
        }
        libc::mprotect(p, page, libc::PROT_NONE); // guard page below the stack
        let st = libc::stack_t { ss_sp: p.cast::<u8>().add(page).cast(), ss_flags: 0, ss_size: ALT_STACK };
        libc::sigaltstack(&st, std::ptr::null_mut());
    }
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The interrupted code may be between a failing call and its read of errno; our futex and
    // socket calls must not change what it reads.
    // SAFETY: errno is thread-local and always readable.
    let saved_errno = unsafe { *libc::__errno_location() };
    ON_FAULT_PATH.set(true);
    // SAFETY: the kernel passes a valid siginfo_t.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: as above.
    let unmapped = unsafe { (*info).si_code } == SEGV_MAPERR;
    let handled = RUNTIME.get().is_some_and(|rt| {
        let no_alt = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
        // SAFETY: the kernel passes the signal's ucontext_t, whose `uc_stack` it filled (a
        // handler chaining to us may pass none).
        let alt = if ctx.is_null() { &no_alt } else { unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_stack } };
        rt.region().contains(addr)
            && crate::fault::stacks::with_enough_stack(alt, || {
                handle_heap_fault(rt, addr, unmapped, reported_write(ctx))
            })
    });
    ON_FAULT_PATH.set(false);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
    if !handled {
        chain(sig, info, ctx);
    }
}

/// Passes a foreign fault to the previous handler, or restores the default action and returns
/// so that the faulting instruction runs again and the default action ends the process.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: PREVIOUS was written by `install` before our handler was installed.
    let prev = unsafe { (*PREVIOUS.0.get()).assume_init_ref() };
    let action = prev.sa_sigaction;
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: resetting SIGSEGV to its default disposition.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        return;
    }
    // SAFETY: calling the previously installed handler with the arguments it was installed for.
    unsafe {
        if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = std::mem::transmute(action);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(action);
            f(sig);
        }
    }
}

thread_local! {
    /// Whether this thread runs our handler now, up to the point where it hands a foreign fault
    /// on (see [`on_fault_path`]).
    static ON_FAULT_PATH: Cell<bool> = const { Cell::new(false) };
    /// The page of this thread's last fault on a page its process holds, and how many such
    /// faults in a row it took: a foreign fault in disguise (e.g. executing heap memory) if it
    /// keeps happening, whatever reopening the page did.
    static SPURIOUS: Cell<(usize, u32)> = const { Cell::new((usize::MAX, 0)) };
}

/// Whether the calling thread is on the fault path now: inside our SIGSEGV handler, not yet
/// handing a foreign fault to the handler before ours. Nothing may allocate then (see
/// [`refuse_on_fault_path`]). Async-signal-safe.
fn on_fault_path() -> bool {
    ON_FAULT_PATH.get()
}

/// Ends the process with `line` on stderr and SIGABRT (for a core) if the calling thread is on
/// the fault path: for allocators that must never serve it (the shim's own, a test program's).
/// Async-signal-safe.
pub fn refuse_on_fault_path(line: &[u8]) {
    if on_fault_path() {
        crate::sys::rawio::write_stderr(line);
        // SAFETY: abort has no preconditions; it is async-signal-safe.
        unsafe { libc::abort() };
    }
}

/// Faults in a row on one held page after which the fault is taken as foreign.
const SPURIOUS_LIMIT: u32 = 100_000;

/// Resolves a fault at `addr` in the heap (`unmapped`: where this process has no mapping).
/// Returns false if it is not ours to resolve.
fn handle_heap_fault(rt: &Runtime, addr: usize, unmapped: bool, reported_write: Option<bool>) -> bool {
    if rt.size() == 1 {
        return false;
    }
    let page = rt.page_of(addr);
    if unmapped {
        let m = rt.membership();
        if m.joined() && !m.forked() && !m.is_joined_member() {
            // A child of a member that joined, which has no heap until it takes its copy (the
            // shared view is not inherited).
            crate::preload::fault_before_snapshot(rt, page);
            return true;
        }
        // The heap is mapped whole in every other case: the program unmapped part of it.
        return false;
    }
    let write = write_or_infer(reported_write, || rt.pt().permits(page, false));
    match rt.membership().phase() {
        // Not joined: the heap is private memory and the arena is open; any other page is not
        // the program's to touch (a foreign fault).
        LOCAL => return false,
        // The heap is becoming shared: wait, then the access runs again.
        JOINING => {
            if rt.gate().is_closed() {
                // The arena's contents are moving into the shared heap: a write waits for that
                // short moment, then runs again.
                rt.gate().wait_open();
            } else {
                // Another page, while the process connects to its peers: wait until it joined.
                rt.membership().wait_while(JOINING);
            }
            return true;
        }
        _ => {}
    }
    if rt.membership().forked() {
        if rt.pt().access(page) != crate::heap::region::Access::None {
            // The parent held it but its view had closed it: the child's copy is its own.
            crate::preload::open_in_child(rt, page);
            return true;
        }
        fatal_raw(rt, "a forked child touched a shared page its parent did not hold: page ", page);
    }
    if rt.membership().leaving() && !rt.pt().permits(page, write) {
        if rt.membership().exiting() {
            // The process is ending (another thread called exit): this thread waits for that
            // end instead of turning the program's exit status into a failure.
            wait_for_exit(rt);
        }
        fatal_raw(rt, "touched a shared page it does not hold after leaving the job (gallocy_finalize): page ", page);
    }
    if rt.gate().is_closed() {
        // A fork is taking its snapshot: the page may be write-protected for that moment.
        if !crate::preload::fault_while_frozen(rt, page, write) {
            rt.gate().wait_open();
        }
        return true;
    }
    if rt.pt().permits(page, write) {
        // This process holds the page: the view closed it to save mappings (reopened now, no
        // message), or another thread installed it meanwhile, or a change is in progress.
        let n = SPURIOUS.with(|c| {
            let (last, n) = c.get();
            let n = if last == page { n + 1 } else { 1 };
            c.set((page, n));
            n
        });
        if n >= SPURIOUS_LIMIT {
            return false;
        }
        // A fork's snapshot waits for this change of protection like for a fetch.
        rt.gate().begin_fetch();
        rt.reopen(page);
        rt.gate().end_fetch();
        return true;
    }
    SPURIOUS.with(|c| c.set((usize::MAX, 0)));
    acquire(rt, page, write);
    true
}
