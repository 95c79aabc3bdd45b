//! gallocy: a distributed shared memory runtime.
//!
//! Every process of a job maps one heap at the same virtual addresses, so a pointer made in one
//! process is valid in all of them. Pages a process does not hold are mapped with no access;
//! touching one faults inside the process, and the runtime fetches the latest contents from the
//! page's owner and resumes the thread (sequential consistency, one writer or many readers per
//! page). See the README for the protocol and the environment variables.
//!
//! ```no_run
//! gallocy::init().expect("join the job");
//! let counter = gallocy::alloc_collective(8) as *mut u64; // same pointer on every rank
//! gallocy::lock(1);
//! unsafe { *counter += 1 };
//! gallocy::unlock(1);
//! gallocy::barrier();
//! gallocy::finalize().unwrap();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

mod alloc;
mod bootstrap;
mod clock;
mod config;
mod engine;
mod error;
mod fault;
mod fmt;
mod futex;
pub mod jacobi;
pub mod launch;
mod lazy;
mod pagetable;
pub mod preload;
mod region;
mod runtime;
mod slots;
mod stats;
mod wire;

pub use alloc::AllocError;
pub use config::{DEFAULT_HEAP_BASE, DEFAULT_HEAP_SIZE, DEFAULT_SPIN_US, MAX_PROCESSES};
pub use error::Error;
pub use fault::prepare_thread;
pub use runtime::{exit_now, EXIT_PEER_LOST};

/// This build has the RDMA transport (cargo feature `rdma`).
pub const RDMA_BUILT: bool = cfg!(feature = "rdma");
pub use stats::StatsSnapshot;

use gallocy_transport::MemoryView;
use runtime::{Runtime, RUNTIME};
use wire::Msg;

/// Marks the current thread as running gallocy's own code for the scope's lifetime: its
/// allocations then go to the system allocator, never to the shared heap.
pub(crate) struct RuntimeScope(());

impl RuntimeScope {
    pub(crate) fn enter() -> RuntimeScope {
        alloc::THREAD.with(|t| t.enter());
        RuntimeScope(())
    }
}

impl Drop for RuntimeScope {
    fn drop(&mut self) {
        alloc::THREAD.with(|t| t.leave());
    }
}

#[inline]
fn in_runtime() -> bool {
    alloc::THREAD.with(|t| t.in_runtime())
}

static INIT_LOCK: Mutex<()> = Mutex::new(());
/// Size of a slab span; arenas are multiples of it.
const ARENA_ALIGN: usize = 64 * 1024;

/// Joins the job described by the environment (`GALLOCY_RANK`/`GALLOCY_SIZE`/`GALLOCY_COORDINATOR`,
/// or the variables `mpirun`, PMI and Slurm set). Without any of them this is a one-process job.
/// Idempotent. Returns once every process of the job has joined.
pub fn init() -> Result<(), Error> {
    if let Some(rt) = RUNTIME.get() {
        return join(rt);
    }
    let _scope = RuntimeScope::enter();
    init_as(config::identity()?)
}

/// Sets up as `id` and joins the job.
pub(crate) fn init_as(id: config::Identity) -> Result<(), Error> {
    let rt = prepare(id, true)?;
    join(rt)
}

/// Sets up this process's rank without talking to anybody: the heap (private memory until the
/// process joins), this rank's arena and the allocator. Idempotent. With `report_to_job`, a
/// member whose own configuration is bad still contacts rank 0, so that the whole job stops
/// with one message naming this rank.
pub(crate) fn prepare(id: config::Identity, report_to_job: bool) -> Result<&'static Runtime, Error> {
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
        let _ = bootstrap::connect(&id, settings.as_ref().ok(), nowhere, problem);
    }
    let settings = settings.map_err(|e| e.on_rank(rank))?;
    let region = region.expect("valid settings give a region").map_err(|e| e.on_rank(rank))?;
    let layout = ArenaLayout::new(region.size, region.page, id.size);
    let (first, end) = layout.pages(id.rank);
    region.protect(first, end - first, region::Access::Write).map_err(|e| {
        Error::Os { what: "opening this rank's arena".into(), source: std::io::Error::from_raw_os_error(e) }
            .on_rank(rank)
    })?;
    let pt = pagetable::PageTable::new(region.pages(), first, end).map_err(|e| e.on_rank(rank))?;
    let rt = Runtime::new(id, settings, region, pt, layout.arena_size);
    if RUNTIME.set(rt).is_err() {
        unreachable!("prepare holds the init lock");
    }
    Ok(RUNTIME.get().expect("just set"))
}

/// How the heap is split into one arena per rank.
struct ArenaLayout {
    arena_size: usize,
    page: usize,
    pages: usize,
    ranks: usize,
}

impl ArenaLayout {
    fn new(heap_size: usize, page: usize, ranks: usize) -> ArenaLayout {
        ArenaLayout {
            arena_size: (heap_size / ranks) / ARENA_ALIGN * ARENA_ALIGN,
            page,
            pages: heap_size / page,
            ranks,
        }
    }

    /// Pages `[first, end)` of `rank`'s arena (the last rank's runs to the end of the heap).
    fn pages(&self, rank: usize) -> (usize, usize) {
        let first = rank * self.arena_size / self.page;
        let end = if rank == self.ranks - 1 { self.pages } else { first + self.arena_size / self.page };
        (first, end)
    }
}

static JOIN_LOCK: Mutex<()> = Mutex::new(());

/// Joins the job (idempotent; a no-op in a one-process job): makes the heap shared, connects
/// to every peer, starts the service thread, then waits for every rank (barrier).
pub(crate) fn join(rt: &'static Runtime) -> Result<(), Error> {
    if rt.size == 1 || rt.joined() {
        return Ok(());
    }
    let _scope = RuntimeScope::enter();
    {
        let _g = JOIN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if rt.joined() {
            return Ok(());
        }
        // No fork while the heap changes hands: a child would get neither a private heap nor
        // a snapshot of the shared one (`preload::before_fork` takes the same lock).
        preload::fork_lock();
        let joined = connect(rt);
        if joined.is_err() {
            // Back to a working local process: the arena stays open, the gate opens.
            let (first, end) = rt.arena_pages();
            let _ = rt.region.protect(first, end - first, region::Access::Write);
            rt.phase.store(runtime::LOCAL, Ordering::SeqCst);
            futex::wake(&rt.phase, i32::MAX);
            rt.open_gate();
        }
        preload::fork_unlock();
        joined.map_err(|e| e.on_rank(rt.rank))?;
    }
    barrier();
    Ok(())
}

/// The joining steps of [`join`].
fn connect(rt: &'static Runtime) -> Result<(), Error> {
    let os = |what: &str, e: i32| Error::Os { what: what.into(), source: std::io::Error::from_raw_os_error(e) };
    fault::install()?;
    fault::prepare_thread();
    // Other threads keep running: while the arena's contents move into the memfd, their writes
    // to it fault, and wait at the gate (see `fault::handle_heap_fault`).
    rt.close_gate();
    rt.phase.store(runtime::JOINING, Ordering::SeqCst);
    let (first, end) = rt.arena_pages();
    rt.region.protect(first, end - first, region::Access::Read).map_err(|e| os("freezing this rank's arena", e))?;
    // Every page handed out so far lies below the allocator's high-water mark.
    let used = rt.alloc.high_water_page().clamp(first, end);
    let view = rt.region.share(first, used)?;
    rt.region.protect(first, end - first, region::Access::Write).map_err(|e| os("opening this rank's arena", e))?;
    // Writers to the arena go on now; faults on other pages wait for the end of the join.
    rt.open_gate();
    let transport = bootstrap::connect(rt.identity(), Some(&rt.settings), view, None)?;
    rt.set_transport(transport);
    if rt.rank == 0 && rt.identity().token_derived {
        eprintln!(
            "gallocy: warning: GALLOCY_TOKEN is not set; using a token derived from the job's identity, \
             which keeps other jobs out but is not a secret"
        );
    }
    std::thread::Builder::new()
        .name("gallocy-service".into())
        .spawn(move || {
            std::mem::forget(RuntimeScope::enter());
            fault::prepare_thread();
            engine::Engine::new(rt).run();
        })
        .map_err(|e| Error::Os { what: "starting the service thread".into(), source: e })?;
    rt.record_member_pid();
    rt.phase.store(runtime::JOINED, Ordering::SeqCst);
    futex::wake(&rt.phase, i32::MAX);
    Ok(())
}

/// The runtime, for a call only members of the job may make (not a forked child of one).
fn member(call: &str) -> &'static Runtime {
    let rt = rt();
    if rt.forked.load(Ordering::Acquire) {
        panic!("gallocy: {call} in a forked child of rank {}: the child is not a member of the job", rt.rank);
    }
    if let Err(e) = join(rt) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    rt
}

fn rt() -> &'static Runtime {
    if let Some(rt) = RUNTIME.get() {
        return rt;
    }
    if let Err(e) = init() {
        eprintln!("{e}");
        std::process::exit(1);
    }
    RUNTIME.get().expect("initialized")
}

/// This process's rank (0 before `init`).
pub fn rank() -> usize {
    RUNTIME.get().map_or(0, |r| r.rank)
}

/// Number of processes in the job (1 before `init`).
pub fn size() -> usize {
    RUNTIME.get().map_or(1, |r| r.size)
}

/// Waits until every process of the job has called `barrier` (one thread per process calls it).
pub fn barrier() {
    let rt = member("gallocy::barrier");
    if rt.size == 1 {
        return;
    }
    let _s = RuntimeScope::enter();
    let epoch = rt.barrier_epoch.fetch_add(1, Ordering::AcqRel) + 1;
    rt.send_from_app(0, Msg::BarrierArrive { epoch });
    rt.sync.wait_barrier(epoch);
}

static HELD_LOCKS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Acquires global lock `id`: at most one thread in the whole job holds it; waiters are served
/// in arrival order at the lock's home.
pub fn lock(id: u32) {
    let rt = member("gallocy::lock");
    let _s = RuntimeScope::enter();
    if rt.size > 1 {
        let slot = rt.slots.claim();
        rt.send_from_app(id as usize % rt.size, Msg::LockAcquire { id, slot });
        fault::wait_for(rt, slot);
    } else {
        while HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner()).contains(&id) {
            std::thread::yield_now();
        }
    }
    HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner()).push(id);
}

/// Releases global lock `id`. Panics if this process does not hold it.
pub fn unlock(id: u32) {
    let rt = member("gallocy::unlock");
    let _s = RuntimeScope::enter();
    {
        let mut held = HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
        match held.iter().position(|h| *h == id) {
            Some(i) => {
                held.swap_remove(i);
            }
            None => panic!("gallocy: rank {}: unlock({id}) but this process does not hold global lock {id}", rt.rank),
        }
    }
    if rt.size > 1 {
        rt.send_from_app(id as usize % rt.size, Msg::LockRelease { id });
    }
}

/// Every rank calls this with the same `size`; every rank gets the same pointer to `size`
/// zero-filled bytes of the shared heap (allocated in rank 0's arena).
pub fn alloc_collective(size: usize) -> *mut u8 {
    let rt = member("gallocy::alloc_collective");
    let mut p = if rt.rank == 0 { calloc(1, size) as u64 } else { 0 };
    let mut bytes = p.to_le_bytes();
    broadcast(&mut bytes, 0);
    p = u64::from_le_bytes(bytes);
    p as *mut u8
}

/// Copies `buf` of rank `root` into `buf` of every other rank. Every rank calls it, in the same
/// order, with buffers of the same length.
pub fn broadcast(buf: &mut [u8], root: usize) {
    let rt = member("gallocy::broadcast");
    assert!(root < rt.size, "gallocy: broadcast root {root} is not a rank of a {}-process job", rt.size);
    if rt.size == 1 {
        return;
    }
    let _s = RuntimeScope::enter();
    let seq = rt.broadcast_seq.fetch_add(1, Ordering::AcqRel) + 1;
    if rt.rank == root {
        let total = buf.len() as u64;
        for to in (0..rt.size).filter(|r| *r != root) {
            let mut offset = 0;
            loop {
                let end = (offset + wire::BROADCAST_CHUNK).min(buf.len());
                let data = buf[offset..end].to_vec();
                rt.send_from_app(to, Msg::Broadcast { seq, total, offset: offset as u64, data });
                offset = end;
                if offset >= buf.len() {
                    break;
                }
            }
        }
    } else {
        let data = rt.sync.take_broadcast(seq);
        assert_eq!(
            data.len(),
            buf.len(),
            "gallocy: rank {}: broadcast length mismatch: root {root} sent {} bytes, this rank passed a buffer of {}",
            rt.rank,
            data.len(),
            buf.len()
        );
        buf.copy_from_slice(&data);
    }
}

/// Prints this process's statistics report to stderr now.
pub fn stats_print() {
    if let Some(rt) = RUNTIME.get() {
        let _s = RuntimeScope::enter();
        print_stats(rt);
    }
}

/// The statistics report as one `write` (a launcher that merges the ranks' stderr, like
/// `mpirun`, then never splits the line; `eprintln!` writes the text and its newline apart).
fn print_stats(rt: &Runtime) {
    use std::io::Write;
    let line = format!("{}\n", rt.stats.report(rt.rank));
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A copy of this process's counters.
pub fn stats() -> StatsSnapshot {
    RUNTIME.get().map(|rt| rt.stats.snapshot()).unwrap_or_default()
}

/// Waits for every process (barrier), prints statistics when `GALLOCY_STATS=1`, and leaves the
/// job. Every process must call it before exiting normally: a process that disappears without
/// it is reported as lost by its peers. Afterwards the heap stays mapped with the access this
/// process had; touching a page it did not hold is fatal.
pub fn finalize() -> Result<(), Error> {
    let Some(rt) = RUNTIME.get() else {
        return Ok(());
    };
    if rt.finalized.load(Ordering::Acquire) || rt.leaving.load(Ordering::Acquire) || rt.forked.load(Ordering::Acquire) {
        // A forked child of a member never joined: there is nothing to leave.
        return Ok(());
    }
    barrier();
    let _s = RuntimeScope::enter();
    if rt.settings.stats {
        print_stats(rt);
    }
    if let Some(t) = rt.transport() {
        rt.leaving.store(true, Ordering::Release);
        t.say_goodbye().map_err(|e| Error::from(e).on_rank(rt.rank))?;
        t.wake();
        let deadline = std::time::Instant::now() + rt.settings.peer_timeout;
        while !rt.all_departed.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    rt.finalized.store(true, Ordering::Release);
    Ok(())
}

/// First address of the shared heap.
pub fn heap_base() -> usize {
    rt().region.base
}

/// Size of the shared heap in bytes.
pub fn heap_size() -> usize {
    rt().region.size
}

/// The page size (the unit of coherence).
pub fn page_size() -> usize {
    region::page_size()
}

/// The rank that keeps the directory entry of the page holding `addr`.
pub fn home_of(addr: usize) -> usize {
    let rt = rt();
    rt.home((addr - rt.region.base) / rt.region.page)
}

/// The rank whose arena holds `addr` (that rank allocates there and initially owns its pages).
pub fn arena_rank_of(addr: usize) -> usize {
    let rt = rt();
    rt.arena_rank((addr - rt.region.base) / rt.region.page)
}

/// Reports an allocator misuse and ends the process like glibc does (SIGABRT).
pub(crate) fn misuse(rt: &Runtime, e: &AllocError) -> ! {
    runtime::write_stderr(format!("gallocy: rank {}: error: {e}\n", rt.rank).as_bytes());
    std::process::abort()
}

/// Allocates `size` bytes aligned to `align` from the shared heap; null when out of memory.
#[inline]
fn allocate(size: usize, align: usize) -> *mut u8 {
    let rt = rt();
    match rt.alloc.alloc(size, align) {
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
    if !rt.region.contains(addr) {
        misuse(rt, &AllocError::InvalidPointer(addr));
    }
    if rt.alloc.is_local(addr) {
        if let Err(e) = rt.alloc.free(addr) {
            misuse(rt, &e);
        }
    } else if !rt.joined() && !rt.forked.load(Ordering::Acquire) {
        // Before joining, no block of another rank's arena can have reached this process.
        misuse(rt, &AllocError::InvalidPointer(addr));
    } else if !rt.forked.load(Ordering::Acquire) && !rt.leaving.load(Ordering::Acquire) {
        let _s = RuntimeScope::enter();
        rt.send_from_app(rt.arena_rank((addr - rt.region.base) / rt.region.page), Msg::Free { addr: addr as u64 });
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
    if !rt.region.contains(addr) {
        misuse(rt, &AllocError::InvalidPointer(addr));
    }
    if rt.alloc.is_local(addr) {
        return rt.alloc.usable_size(addr).unwrap_or_else(|e| misuse(rt, &e));
    }
    if !rt.joined() || rt.forked.load(Ordering::Acquire) {
        // Only a member of the job can ask the owning rank.
        misuse(rt, &AllocError::InvalidPointer(addr));
    }
    let slot = rt.slots.claim();
    rt.send_from_app(
        rt.arena_rank((addr - rt.region.base) / rt.region.page),
        Msg::SizeQuery { addr: addr as u64, slot },
    );
    match fault::wait_for(rt, slot) {
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
    if size <= old && rt().alloc.is_local(p as usize) && size >= old / 2 {
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
            Some(rt) if !in_runtime() && !rt.finalized.load(Ordering::Acquire) => {
                let _s = RuntimeScope::enter();
                rt.alloc.alloc(layout.size(), layout.align().max(16)).map_or(std::ptr::null_mut(), |a| a as *mut u8)
            }
            // SAFETY: forwarded layout contract.
            _ => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match RUNTIME.get() {
            // SAFETY: the block is ours (by address) and live per the caller's contract.
            Some(rt) if rt.region.contains(p as usize) => unsafe { free(p) },
            // SAFETY: forwarded contract: the block came from System.
            _ => unsafe { System.dealloc(p, layout) },
        }
    }
}
