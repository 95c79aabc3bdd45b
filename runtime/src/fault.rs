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

use crate::clock::now_ns;
use crate::engine;
use crate::error::Error;
use crate::fmt::RawWriter;
use crate::runtime::{write_stderr, Runtime, RUNTIME};
use crate::wire::{self, Msg, Source};

/// The action that was installed before ours: written once by `install` (under its lock, before
/// our handler can run), then only read.
struct PreviousAction(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: see the type's comment: one write strictly before all reads.
unsafe impl Sync for PreviousAction {}
static PREVIOUS: PreviousAction = PreviousAction(UnsafeCell::new(MaybeUninit::uninit()));
static INSTALLED: AtomicBool = AtomicBool::new(false);
static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// Size of the alternate signal stack gallocy gives threads.
const ALT_STACK: usize = 64 * 1024;

/// Installs the SIGSEGV handler once per process.
pub fn install() -> Result<(), Error> {
    let _g = INSTALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid value to fill in; PREVIOUS is written before the
    // handler can run (INSTALLED is published after sigaction returns, and the handler only
    // reads PREVIOUS when chaining).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigfillset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSEGV, &sa, (*PREVIOUS.0.get()).as_mut_ptr()) != 0 {
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
        let page = crate::region::page_size();
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

#[cfg(target_arch = "x86_64")]
fn is_write(ctx: *mut libc::c_void) -> bool {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; on x86-64 the page
    // fault error code is saved in REG_ERR and bit 1 means "write".
    unsafe {
        let uc = ctx as *const libc::ucontext_t;
        (*uc).uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn is_write(_ctx: *mut libc::c_void) -> bool {
    // Unknown: ask for read access; a write will fault again and upgrade.
    false
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The interrupted code may be between a failing call and its read of errno; our futex and
    // socket calls must not change what it reads.
    // SAFETY: errno is thread-local and always readable.
    let saved_errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo_t.
    let addr = unsafe { (*info).si_addr() } as usize;
    let handled =
        RUNTIME.get().is_some_and(|rt| rt.region.contains(addr) && handle_heap_fault(rt, addr, is_write(ctx)));
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
    /// Faults on pages whose access already allowed the access: a foreign fault in disguise
    /// (e.g. executing heap memory) if it keeps happening.
    static SPURIOUS: Cell<u32> = const { Cell::new(0) };
}

/// Resolves a fault at `addr` in the heap. Returns false if it is not ours to resolve.
fn handle_heap_fault(rt: &Runtime, addr: usize, write: bool) -> bool {
    if rt.size == 1 {
        return false;
    }
    let page = (addr - rt.region.base) / rt.region.page;
    match rt.phase.load(Ordering::Acquire) {
        // Not joined: the heap is private memory and the arena is open; any other page is not
        // the program's to touch (a foreign fault).
        crate::runtime::LOCAL => return false,
        // The heap is becoming shared: wait, then the access runs again.
        crate::runtime::JOINING => {
            if rt.gate.load(Ordering::SeqCst) != 0 {
                // The arena's contents are moving into the shared heap: a write waits for that
                // short moment, then runs again.
                rt.wait_at_gate();
            } else {
                // Another page, while the process connects to its peers: wait until it joined.
                crate::futex::wait(&rt.phase, crate::runtime::JOINING, None);
            }
            return true;
        }
        _ => {}
    }
    if rt.forked.load(Ordering::Acquire) {
        fatal_raw(rt, "a forked child touched a shared page its parent did not hold: page ", page);
    }
    if rt.leaving.load(Ordering::Acquire) && !rt.pt.permits(page, write) {
        if rt.exiting.load(Ordering::Acquire) {
            // The process is ending (another thread called exit): this thread waits for that
            // end instead of turning the program's exit status into a failure.
            wait_for_exit(rt);
        }
        fatal_raw(rt, "touched a shared page it does not hold after leaving the job (gallocy_finalize): page ", page);
    }
    if rt.gate.load(Ordering::SeqCst) != 0 {
        // A fork is taking its snapshot: the page may be write-protected for that moment.
        if !crate::preload::fault_while_frozen(rt, page, write) {
            rt.wait_at_gate();
        }
        return true;
    }
    if rt.pt.permits(page, write) {
        // Another thread installed it meanwhile (or a protection change is in progress).
        let n = SPURIOUS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        return n < 100_000;
    }
    SPURIOUS.with(|c| c.set(0));
    acquire(rt, page, write);
    true
}

/// Makes `page` accessible (for writing if `write`) to this process: fetches it from its home
/// unless it already is. Called by the fault handler and before system calls on heap buffers.
/// The process must have joined. Async-signal-safe.
pub fn acquire(rt: &Runtime, page: usize, write: bool) {
    // Announce the fetch before looking at the gate: a fork closes the gate, then waits for
    // every announced fetch to end (see `preload::before_fork`).
    rt.fetching.fetch_add(1, Ordering::SeqCst);
    while rt.gate.load(Ordering::SeqCst) != 0 {
        rt.fetching.fetch_sub(1, Ordering::SeqCst);
        rt.wait_at_gate();
        rt.fetching.fetch_add(1, Ordering::SeqCst);
    }
    let start = now_ns();
    loop {
        if rt.pt.permits(page, write) {
            break;
        }
        if !rt.pt.try_claim(page) {
            rt.pt.wait_unclaimed(page, rt.settings.spin);
            continue;
        }
        if rt.pt.permits(page, write) {
            rt.pt.release(page);
            break;
        }
        fetch(rt, page, write);
        // We are about to resume: the service thread may now let the page go again.
        rt.pt.clear_fresh(page);
        rt.pt.release(page);
        rt.stats.record_fault(now_ns() - start);
        break;
    }
    rt.fetching.fetch_sub(1, Ordering::SeqCst);
}

/// Makes `[addr, addr + len)` accessible to the kernel on this process's behalf (for writing
/// into it if `write`): a system call that copies into or out of heap pages this process does
/// not hold (or holds read-only) would otherwise fail with EFAULT, since the kernel's own
/// accesses do not fault into gallocy. A no-op outside the heap, before joining, in a forked
/// child and after leaving the job. Async-signal-safe.
pub fn prepare_kernel_access(rt: &Runtime, addr: usize, len: usize, write: bool) {
    if len == 0 || !rt.joined() || rt.forked.load(Ordering::Acquire) || rt.leaving.load(Ordering::Acquire) {
        return;
    }
    let heap_end = rt.region.base + rt.region.size;
    let start = addr.max(rt.region.base);
    let end = addr.saturating_add(len).min(heap_end);
    if start >= end {
        return;
    }
    let first = (start - rt.region.base) / rt.region.page;
    let last = (end - 1 - rt.region.base) / rt.region.page;
    for page in first..=last {
        if !rt.pt.permits(page, write) {
            acquire(rt, page, write);
        }
    }
}

/// Parks a thread that touched a page it no longer holds while the process exits; ends the
/// process if the exit does not come within the peer timeout. Async-signal-safe.
fn wait_for_exit(rt: &Runtime) {
    let never = std::sync::atomic::AtomicU32::new(0);
    let deadline = now_ns().saturating_add(rt.settings.peer_timeout.as_nanos() as u64);
    loop {
        let now = now_ns();
        if now >= deadline {
            return;
        }
        crate::futex::wait(&never, 0, Some(std::time::Duration::from_nanos(deadline - now)));
    }
}

/// Asks the home for `page` and waits until the service thread installed it.
fn fetch(rt: &Runtime, page: usize, write: bool) {
    let counter = if write { &rt.stats.write_faults } else { &rt.stats.read_faults };
    rt.stats.count(counter, 1);
    let slot = rt.slots.claim();
    let s = rt.slots.get(slot).expect("claimed slot exists");
    s.page.store(page as u64, Ordering::Release);
    s.write.store(write, Ordering::Release);
    let home = rt.home(page);
    if home == rt.rank {
        rt.slots.post_local(slot);
        if let Some(t) = rt.transport() {
            t.wake();
        }
    } else {
        let mut buf = [0u8; 64];
        let msg = Msg::Request { page: page as u64, write, slot };
        let sent = wire::encode(&msg, &mut buf)
            .ok()
            .map(|bytes| rt.transport().expect("transport").send(home, bytes, None).is_ok());
        if sent != Some(true) {
            fatal_raw(rt, "cannot send a page request to rank ", home);
        }
        // No need to wake the service thread: we read the answer ourselves.
    }
    wait_for(rt, slot);
}

/// Waits for slot `slot`: spins reading incoming answers itself (so no hand-off to the service
/// thread sits on the path), then sleeps. Async-signal-safe.
pub fn wait_for(rt: &Runtime, slot: u32) -> u64 {
    let mut drive = || {
        if let Some(t) = rt.transport() {
            t.poll_inline(&mut |from, bytes, page| take_answer(rt, from, bytes, page));
        }
    };
    // When we stop reading the sockets ourselves without an answer, make sure the service
    // thread does.
    let mut after_spin = |done: bool| {
        if done {
            rt.last_wait_end.store(now_ns(), Ordering::Release);
        } else if rt.service_deaf.load(Ordering::SeqCst) {
            if let Some(t) = rt.transport() {
                t.wake();
            }
        }
    };
    rt.slots.wait_and_release(slot, rt.settings.spin, &mut drive, &mut after_spin)
}

/// Handles an answer read by a waiting thread itself (for any local thread): page grants and lock
/// grants. Declines what only the service thread may handle: every other message, grants that
/// need a read from the owner, and forwarded grants whose home is this process.
/// Async-signal-safe.
fn take_answer(rt: &Runtime, _from: usize, bytes: &[u8], attached: Option<gallocy_transport::Span>) -> bool {
    match bytes.first() {
        Some(&wire::GRANT_TAG) => {}
        Some(&wire::LOCK_GRANTED_TAG) => {
            return match wire::decode(bytes) {
                Ok(Msg::LockGranted { slot, .. }) => rt.slots.complete(slot),
                _ => false,
            };
        }
        _ => return false,
    }
    let Ok(Msg::Grant { page, slot, write, source }) = wire::decode(bytes) else { return false };
    let notify_home = match source {
        Source::Inline | Source::Valid => false,
        Source::Forwarded | Source::ReadFrom(_) => true,
    };
    let home = rt.home(page as usize);
    if (notify_home && home == rt.rank) || !engine::grant_matches(rt, page, slot) {
        return false;
    }
    if let Source::ReadFrom(owner) = source {
        // One-sided read by this thread when the transport can do it without allocating (the
        // service thread does the first read of each chunk, which registers memory).
        let span = gallocy_transport::Span { offset: page * rt.region.page as u64, len: rt.region.page as u32 };
        let transport = rt.transport().expect("transport");
        if owner as usize == rt.rank || owner as usize >= rt.size || !transport.read_inline(owner as usize, span) {
            return false;
        }
        rt.stats.count(&rt.stats.bytes_in, u64::from(span.len));
    }
    if let Some(span) = attached {
        rt.stats.count(&rt.stats.bytes_in, u64::from(span.len));
    }
    engine::open_page(rt, page, write);
    if notify_home {
        let mut buf = [0u8; 32];
        let sent = wire::encode(&Msg::Done { page }, &mut buf)
            .ok()
            .map(|b| rt.transport().expect("transport").send(home, b, None).is_ok());
        if sent != Some(true) {
            fatal_raw(rt, "cannot send a completion to rank ", home);
        }
    }
    rt.slots.complete(slot);
    true
}

/// Writes "gallocy: rank R: fatal: WHAT N" and ends the process. Async-signal-safe.
fn fatal_raw(rt: &Runtime, what: &str, n: usize) -> ! {
    let mut buf = [0u8; 256];
    let mut w = RawWriter::new(&mut buf);
    w.str("gallocy: rank ").num(rt.rank as u64).str(": fatal: ").str(what).num(n as u64).str("\n");
    write_stderr(w.as_bytes());
    crate::runtime::exit_now(crate::runtime::EXIT_PEER_LOST)
}
