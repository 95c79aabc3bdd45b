//! Hooks for the `LD_PRELOAD` shim (`alloc-shim`, `libgallocy.so`). Not for applications.
//!
//! The shim exports the malloc family; these functions tell it which calls are gallocy's own
//! (to be served by glibc, so the runtime never re-enters itself), which pointers belong to the
//! shared heap, decide which process is a member of the job, keep the heap a true snapshot
//! across `fork`, make heap buffers usable by system calls, and leave the job at exit.
//!
//! How a process starts (see the README, "How the shim starts"):
//! - [`prepare`] runs in the shim's ELF constructor, where the dynamic loader's lock is free, and
//!   talks to nobody: it decides membership, maps the heap as private memory and opens this
//!   rank's arena, so `malloc` serves blocks from then on without ever joining anything.
//! - The process joins the job (shares the heap, connects to its peers, starts the service
//!   thread) at its first call of a job-wide function (`gallocy_init`, `gallocy_barrier`, ...),
//!   in the application's own context, never inside an allocation.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::engine::link::PAUSED;
use crate::heap::region::{Access, Readable};
use crate::job::runtime::{Runtime, RUNTIME};

/// True while the calling thread runs gallocy's own code (its allocations must not come from
/// the shared heap).
#[inline]
pub fn in_runtime() -> bool {
    crate::heap::alloc::in_runtime()
}

/// Marks the calling thread as running gallocy's own code while the value lives.
pub struct Scope(#[allow(dead_code)] crate::heap::alloc::RuntimeScope);

/// Enters a [`Scope`].
#[inline]
pub fn scope() -> Scope {
    Scope(crate::heap::alloc::RuntimeScope::enter())
}

/// Whether `addr` lies in the shared heap (false before `prepare`).
#[inline]
pub fn owns(addr: usize) -> bool {
    RUNTIME.get().is_some_and(|rt| rt.region().contains(addr))
}

/// `malloc` fast path for the shim: `None` when the calling thread runs gallocy's own code
/// (the shim then uses glibc), else the block (null when out of memory). One thread-local access.
#[inline]
pub fn malloc(size: usize) -> Option<*mut u8> {
    let rt = RUNTIME.get()?;
    crate::heap::alloc::THREAD.with(|t| {
        if t.in_runtime() {
            return None;
        }
        Some(match rt.alloc().alloc_in(t, size, 16) {
            Ok(a) => a as *mut u8,
            Err(crate::heap::alloc::AllocError::OutOfMemory(_)) => std::ptr::null_mut(),
            Err(e) => crate::api::memory::misuse(rt, &e),
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
    if !rt.region().contains(addr) {
        return false;
    }
    if rt.alloc().is_local(addr) {
        if let Err(e) = crate::heap::alloc::THREAD.with(|t| rt.alloc().free_in(t, addr)) {
            crate::api::memory::misuse(rt, &e);
        }
    } else {
        // SAFETY: forwarded caller contract.
        unsafe { crate::api::memory::free(p) }
    }
    true
}

/// The environment variable that marks the process that is the job's member: its value is
/// that process's pid. A process that finds another pid there was started by a member (a
/// shell's command, a subprocess) and is not a member; one that finds its own pid is what the
/// member `exec`ed (a wrapper ending in `exec`), and takes the member's place. After the
/// member joined, `:joined` follows the pid: a program it then `exec`s cannot take a rank the
/// job already has.
const MEMBER_MARK: &str = "GALLOCY_JOINED";

/// What [`prepare`] made of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A member of a job of several processes (joins at its first job-wide call).
    Member,
    /// A one-process job: no job variables, or a process started by a member.
    Single,
}

/// Sets up this process from its environment without talking to anybody: decides whether it
/// is a member of a job (see [`MEMBER_MARK`]), maps the heap as private memory and opens its
/// arena. Called by the shim's ELF constructor (or its first C API call, if that comes
/// earlier). On error the process has no heap; a member must not run on.
pub fn prepare() -> Result<Start, crate::error::Error> {
    let _s = scope();
    let id = crate::job::config::identity()?;
    let id = if id.size > 1 && !claim_membership() { crate::job::config::single_identity() } else { id };
    let start = if id.size > 1 { Start::Member } else { Start::Single };
    crate::job::join::prepare(id, false)?;
    Ok(start)
}

/// Decides whether this process is the member its job variables describe, marking it so for
/// the processes it starts. Runs before `main`, so that shells, which copy the environment
/// when they start, pass the mark on.
fn claim_membership() -> bool {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    match std::env::var(MEMBER_MARK) {
        Ok(v) => {
            let (pid, joined) = match v.split_once(':') {
                Some((pid, _)) => (pid, true),
                None => (v.as_str(), false),
            };
            pid.trim().parse::<i32>() == Ok(me) && !joined
        }
        Err(_) => {
            std::env::set_var(MEMBER_MARK, me.to_string());
            true
        }
    }
}

/// Joins the job (idempotent): the shim's C API calls this before any job-wide call.
pub fn join() -> Result<(), crate::error::Error> {
    let rt = RUNTIME.get().expect("prepare ran");
    if rt.size() == 1 || rt.joined() {
        return Ok(());
    }
    if rt.membership().forked() {
        return Err(crate::error::Error::NotMember { rank: rt.rank() });
    }
    crate::job::join::join(rt)?;
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    std::env::set_var(MEMBER_MARK, format!("{me}:joined"));
    Ok(())
}

/// Whether this process is the member that joined its job (not a child of it, not a member
/// that has not joined). Async-signal-safe.
pub fn is_joined_member() -> bool {
    RUNTIME.get().is_some_and(|rt| rt.membership().is_joined_member() && !rt.membership().forked())
}

/// Whether `GALLOCY_STATS=1` is in force.
pub fn stats_enabled() -> bool {
    RUNTIME.get().is_some_and(|rt| rt.settings().stats)
}

/// At process exit (`exit` from any thread, `main` returning, `_exit`, `_Exit`): a member that
/// joined leaves the job (barrier, statistics, goodbye); other threads that touch a page they
/// no longer hold then wait for the end rather than fail the process. Anything else prints its
/// statistics if asked to.
pub fn at_exit() {
    let Some(rt) = RUNTIME.get() else { return };
    let _s = scope();
    if rt.membership().is_joined_member() && !rt.membership().forked() {
        rt.membership().set_exiting();
        if let Err(e) = crate::api::finalize() {
            eprintln!("{e}");
        }
    } else if rt.settings().stats && !FORK_CHILD.load(Ordering::Acquire) && !rt.membership().finalized() {
        crate::api::stats_print();
    }
}

/// This process is a forked child (of a member, or of a one-process job): it prints no
/// statistics of its own at exit (the process it was forked from does).
static FORK_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process has joined a job of several processes (one load after the first).
/// Async-signal-safe.
#[inline]
pub fn joined_job() -> bool {
    RUNTIME.get().is_some_and(|rt| rt.size() > 1 && rt.joined())
}

/// Whether `[addr, addr + len)` overlaps the heap of a process that joined its job (where the
/// kernel may find pages it cannot touch). A few loads. Async-signal-safe.
#[inline]
pub fn shared_range(addr: usize, len: usize) -> bool {
    RUNTIME.get().is_some_and(|rt| {
        len != 0
            && rt.size() > 1
            && rt.joined()
            && addr < rt.region().base + rt.region().size
            && addr.saturating_add(len) > rt.region().base
    })
}

/// Before a system call copies into (`write`) or out of `[addr, addr + len)`: makes the heap
/// pages in that range present with that access, as a user-space access would (the kernel's
/// own accesses do not fault into gallocy). Cheap when nothing needs doing. Async-signal-safe.
#[inline]
pub fn before_kernel_access(addr: usize, len: usize, write: bool) {
    if let Some(rt) = RUNTIME.get() {
        if rt.size() > 1 && rt.joined() {
            crate::fault::acquire::prepare_kernel_access(rt, addr, len, write);
        }
    }
}

/// What a fork in progress needs across its three handlers.
struct ForkState {
    guards: Option<crate::heap::alloc::ForkGuards<'static>>,
    /// The parent's readable heap runs at the fork (write-protected until the child has its copy).
    runs: Vec<Readable>,
    /// The runs of pages the parent holds, when its view has closed some of them to save
    /// mappings (then `runs` misses those); the child copies these.
    held: Vec<Readable>,
    /// Whether the child copies `held` (decided when the heap froze).
    use_held: bool,
    /// The child writes one byte here once it holds its copy; the parent waits for it (or for
    /// the end of file, if the child died first).
    pipe: [libc::c_int; 2],
    /// Whether this fork gives the child a copy (the parent is a member that joined).
    snapshot: bool,
}

impl ForkState {
    /// The runs the child copies.
    fn copied_runs(&self) -> &[Readable] {
        if self.use_held {
            &self.held
        } else {
            &self.runs
        }
    }
}

/// The fork in progress; the fork lock (`job::forklock`) serializes forks, so one thread at a time uses it.
struct ForkCell(UnsafeCell<ForkState>);
// SAFETY: only the thread holding the fork lock (or the single thread of a just-forked child)
// touches the state.
unsafe impl Sync for ForkCell {}
static FORK: ForkCell = ForkCell(UnsafeCell::new(ForkState {
    guards: None,
    runs: Vec::new(),
    held: Vec::new(),
    use_held: false,
    pipe: [-1, -1],
    snapshot: false,
}));
/// The thread that froze the heap for a fork (its tid), or 0.
static FORK_OWNER: AtomicI32 = AtomicI32::new(0);

extern "C" {
    /// glibc's lock of its list of open `FILE`s (exported since glibc 2.2.5), which its `fork`
    /// takes after the fork handlers. Recursive: `fork` takes it again in the thread that holds it.
    fn _IO_list_lock();
    /// Releases one hold of [`_IO_list_lock`].
    fn _IO_list_unlock();
}

/// Whether the calling thread froze the heap for a fork and has not thawed it yet.
/// Async-signal-safe.
pub(crate) fn freezing_here() -> bool {
    let owner = FORK_OWNER.load(Ordering::Acquire);
    owner != 0 && owner == gettid()
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// A heap fault while the heap is frozen for a fork, in the thread that froze it: a signal
/// handler, or a fork handler registered before ours, touched a frozen page. Waiting at the
/// gate would wait for ourselves: the page is opened again with the access the page table
/// gives it (a frozen page is one this process holds). Returns whether the fault was handled
/// so. Async-signal-safe.
pub(crate) fn fault_while_frozen(rt: &Runtime, page: usize, write: bool) -> bool {
    if !freezing_here() || !rt.membership().is_joined_member() {
        return false;
    }
    let access = rt.pt().access(page);
    if access == Access::None || (write && access == Access::Read) {
        // The page cannot be fetched while the service thread is paused for the fork, and the
        // thread that froze the heap cannot wait for itself.
        let mut buf = [0u8; 200];
        let mut w = crate::sys::rawio::RawWriter::new(&mut buf);
        w.str("gallocy: rank ").num(rt.rank() as u64).str(
            ": fatal: the forking thread touched a shared page this process does not hold while the heap was frozen",
        );
        w.str(if write { " for writing" } else { "" }).str(": page ").num(page as u64).str("\n");
        crate::sys::rawio::write_stderr(w.as_bytes());
        crate::sys::rawio::exit_now(1);
    }
    if let Err(e) = rt.region().protect(page, 1, access) {
        crate::job::runtime::protect_failed(rt, e);
    }
    true
}

/// A heap fault where this process has no mapping, in a child of a member that joined (the
/// shared view is not inherited): before its child handler took its copy of the heap (glibc's
/// own child code resets the lock of every open `FILE`, and `FILE`s live on the heap), the copy
/// is taken now; a child made past the fork handlers (a raw `clone`) has none, and ends with a
/// clear message. Async-signal-safe.
pub(crate) fn fault_before_snapshot(rt: &Runtime, page: usize) {
    if take_snapshot_in_child(rt) {
        return;
    }
    let mut buf = [0u8; 200];
    let mut w = crate::sys::rawio::RawWriter::new(&mut buf);
    w.str("gallocy: rank ")
        .num(rt.rank() as u64)
        .str(": fatal: a child process made without fork's handlers touched the shared heap: page ")
        .num(page as u64)
        .str("\n");
    crate::sys::rawio::write_stderr(w.as_bytes());
    crate::sys::rawio::exit_now(1);
}

/// The fork state, for the thread that holds the fork lock (`job::forklock`).
#[allow(clippy::mut_from_ref)]
fn fork_state() -> &'static mut ForkState {
    // SAFETY: see ForkCell: the caller holds the fork lock (or is a just-forked child's only thread).
    unsafe { &mut *FORK.0.get() }
}

/// `pthread_atfork` prepare handler. Holds the allocator's locks across `fork`, so the child
/// never inherits one held by a thread that does not exist there. In a member that joined the
/// job, also freezes the heap until the child has its snapshot (see [`after_fork_child`]):
/// new heap faults wait at the gate, fetches under way finish, the service thread pauses (no
/// page changes hands), and the writable pages become read-only for that moment. First it takes
/// glibc's list of open `FILE`s, which `fork` takes next: a thread that holds it (in
/// `fflush(NULL)`, say) and writes a `FILE` on the heap must not wait at the frozen heap while
/// the fork waits for it.
pub fn before_fork() {
    let Some(rt) = RUNTIME.get() else { return };
    let _s = scope();
    crate::job::forklock::fork_lock();
    let st = fork_state();
    st.snapshot = rt.membership().is_joined_member() && !rt.membership().forked();
    if st.snapshot {
        // SAFETY: glibc's own recursive lock, released in the parent handler (glibc resets it in
        // the child).
        unsafe { _IO_list_lock() };
        freeze_heap(rt, st);
    }
    st.guards = Some(rt.alloc().lock_all());
}

fn freeze_heap(rt: &'static Runtime, st: &mut ForkState) {
    FORK_OWNER.store(gettid(), Ordering::Release);
    rt.gate().close();
    let deadline = crate::sys::clock::now_ns().saturating_add(rt.settings().peer_timeout.as_nanos() as u64);
    let stuck = |what: &str| -> ! {
        crate::job::runtime::fatal(rt, &format!("fork: {what} for longer than the peer timeout"));
    };
    while rt.gate().fetching() {
        if crate::sys::clock::now_ns() > deadline {
            stuck("page fetches of other threads did not finish");
        }
        std::thread::yield_now();
    }
    rt.service().request_pause();
    if let Some(t) = rt.transport() {
        t.wake();
    }
    while rt.service().pause_state() != PAUSED && !rt.membership().all_departed() {
        if crate::sys::clock::now_ns() > deadline {
            stuck("the service thread did not pause");
        }
        rt.service().wait_paused(std::time::Duration::from_millis(10));
    }
    st.runs = match rt.region().readable_runs() {
        Ok(r) => r,
        Err(e) => crate::job::runtime::fatal(rt, &format!("fork: {e}")),
    };
    st.held.clear();
    st.use_held = rt.mappings().ever_closed();
    if st.use_held {
        held_runs(rt, &mut st.held);
    }
    // Read-only runs stay so: one mprotect per span of adjacent runs.
    for (start, end) in crate::heap::region::spans(&st.runs) {
        if let Err(e) = rt.region().protect_range(start, end, Access::Read) {
            crate::job::runtime::protect_failed(rt, e);
        }
    }
    st.pipe = [-1, -1];
    // SAFETY: `pipe` is a valid array of two descriptors.
    if unsafe { libc::pipe2(st.pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        crate::job::runtime::fatal(rt, "fork: cannot create a pipe to wait for the child's heap snapshot");
    }
}

/// `pthread_atfork` parent handler (also after a failed fork): waits until the child holds its
/// snapshot, then lets the heap go on.
pub fn after_fork_parent() {
    let Some(rt) = RUNTIME.get() else { return };
    let _s = scope();
    let st = fork_state();
    st.guards = None;
    if st.snapshot {
        // SAFETY: our own pipe's descriptors; a one-byte buffer on the stack.
        unsafe {
            libc::close(st.pipe[1]);
            let mut b = 0u8;
            while libc::read(st.pipe[0], (&mut b as *mut u8).cast(), 1) < 0 && *libc::__errno_location() == libc::EINTR
            {
            }
            libc::close(st.pipe[0]);
        }
        thaw_heap(rt, st);
        st.snapshot = false;
        // SAFETY: the hold taken in before_fork.
        unsafe { _IO_list_unlock() };
    }
    crate::job::forklock::fork_unlock();
}

/// In a forked child: opens `page`, which the parent held (the child's copy of it is its own)
/// but which the child's view keeps closed: the parent's view had closed it, or the child's
/// copy needed more mappings than the kernel allows. Past that limit, closes the whole view
/// first. Async-signal-safe.
pub fn open_in_child(rt: &Runtime, page: usize) {
    let mut r = rt.region().protect(page, 1, Access::Write);
    if r == Err(libc::ENOMEM) {
        let _ = rt.region().protect(0, rt.region().pages(), Access::None);
        r = rt.region().protect(page, 1, Access::Write);
    }
    if let Err(e) = r {
        crate::job::runtime::protect_failed(rt, e);
    }
}

/// The runs of heap pages this process holds, from its page table (allocates).
fn held_runs(rt: &Runtime, out: &mut Vec<Readable>) {
    let base = rt.region().base;
    let page = rt.region().page;
    let mut p = 0;
    let pages = rt.region().pages();
    while p < pages {
        let access = rt.pt().access(p);
        if access == Access::None {
            p += 1;
            continue;
        }
        let start = p;
        while p < pages && rt.pt().access(p) == access {
            p += 1;
        }
        out.push(Readable { start: base + start * page, end: base + p * page, writable: access == Access::Write });
    }
}

/// Gives the writable runs their access back, resumes the service thread and opens the gate.
fn thaw_heap(rt: &Runtime, st: &mut ForkState) {
    for r in st.runs.iter().filter(|r| r.writable) {
        if let Err(e) = rt.region().protect_range(r.start, r.end, Access::Write) {
            crate::job::runtime::protect_failed(rt, e);
        }
    }
    st.runs.clear();
    st.held.clear();
    rt.service().resume();
    FORK_OWNER.store(0, Ordering::Release);
    rt.gate().open();
}

/// In a child of a member that joined, once (from its child handler, or from the first heap
/// fault before that): takes its copy of the heap, closes the parent's descriptors, and lets
/// the parent go on. False if no fork of such a member made this process. Async-signal-safe.
fn take_snapshot_in_child(rt: &Runtime) -> bool {
    let st = fork_state();
    if !st.snapshot {
        return false;
    }
    st.snapshot = false;
    if let Err(errno) = rt.region().snapshot_in_child(st.copied_runs()) {
        let mut buf = [0u8; 160];
        let mut w = crate::sys::rawio::RawWriter::new(&mut buf);
        w.str("gallocy: rank ").num(rt.rank() as u64).str(": fatal: fork: the child could not copy the heap (errno ");
        w.num(errno as u64).str(")\n");
        crate::sys::rawio::write_stderr(w.as_bytes());
        crate::sys::rawio::exit_now(1);
    }
    if let Some(t) = rt.transport() {
        t.close_in_forked_child();
    }
    // SAFETY: our own pipe's descriptors; a one-byte buffer.
    unsafe {
        libc::write(st.pipe[1], b"1".as_ptr().cast(), 1);
        libc::close(st.pipe[0]);
        libc::close(st.pipe[1]);
    }
    // Forget the parent's fork in progress: it is not ours (clearing frees nothing).
    st.runs.clear();
    st.held.clear();
    st.use_held = false;
    if rt.size() > 1 {
        rt.membership().set_forked();
    }
    rt.service().resume();
    FORK_OWNER.store(0, Ordering::Release);
    rt.gate().open();
    true
}

/// `pthread_atfork` child handler. A process that has not joined (a one-process job, or a
/// member before its first job-wide call) has private memory: the kernel already gave the
/// child a copy-on-write snapshot. The child of a member that joined has no heap mapped (the
/// shared view is not inherited); it copies the pages its parent holds out of the heap's memfd
/// while the parent waits with the heap frozen (see [`before_fork`]), so it sees the heap
/// exactly as it was at the fork; then it lets the parent go on. Either way the child is not a
/// member of the job: it can keep allocating (from the parent's arena, now its own), frees of
/// other ranks' blocks are ignored, and touching a page the parent did not hold is a clear
/// error. Runs in the child's only thread: no locks are needed, and nothing here allocates.
pub fn after_fork_child() {
    let Some(rt) = RUNTIME.get() else { return };
    take_snapshot_in_child(rt);
    let st = fork_state();
    st.guards = None;
    FORK_CHILD.store(true, Ordering::Release);
    if rt.size() > 1 {
        rt.membership().set_forked();
    }
    if rt.membership().phase() == crate::job::membership::JOINING {
        // Forked while another thread was joining: the child is no member; let it run.
        rt.membership().set_phase(crate::job::membership::LOCAL);
        rt.gate().open();
    }
    crate::fault::stacks::reset_in_child();
    crate::job::forklock::reset_in_child();
}
