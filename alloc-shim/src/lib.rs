//! `libgallocy.so`: the malloc family for `LD_PRELOAD`, and gallocy's C API (`gallocy.h`).
//!
//! Preloaded (or linked with `-lgallocy`), this library takes over `malloc`, `free`, `calloc`,
//! `realloc`, `reallocarray`, `posix_memalign`, `aligned_alloc`, `memalign`, `valloc`,
//! `pvalloc`, `malloc_usable_size` and `cfree`, so every heap allocation of an unmodified program
//! lives in gallocy's shared heap. The first call joins the job (`GALLOCY_*`, `mpirun`, PMI or
//! Slurm variables); without any, the process is a one-process job and this is simply a malloc.
//!
//! It never re-enters itself: every Rust allocation inside the library (the runtime's own memory,
//! its threads, its sockets) goes to glibc's internal entry points (`__libc_malloc`, ...), and so
//! does any `malloc` call made while gallocy's own code runs on the calling thread or while this
//! library is already inside one of its entry points. Blocks glibc made before gallocy took over
//! (or while it was starting) are recognised by address and handed back to glibc.

#![allow(clippy::missing_safety_doc)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use gallocy_rt as g;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// Rust allocations inside this library: glibc's internal entry points, which our exported
/// symbols never shadow.
struct GlibcInternal;

// SAFETY: forwards to glibc's allocator, which honours size and (via memalign) alignment.
unsafe impl GlobalAlloc for GlibcInternal {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: plain calls into glibc.
        unsafe {
            if l.align() <= 16 {
                __libc_malloc(l.size()).cast()
            } else {
                __libc_memalign(l.align(), l.size()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.align() <= 16 {
            // SAFETY: plain call into glibc.
            unsafe { __libc_calloc(1, l.size()).cast() }
        } else {
            // SAFETY: the block has `l.size()` bytes.
            unsafe {
                let p = self.alloc(l);
                if !p.is_null() {
                    std::ptr::write_bytes(p, 0, l.size());
                }
                p
            }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, _l: Layout) {
        // SAFETY: `p` came from glibc.
        unsafe { __libc_free(p.cast()) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if l.align() <= 16 {
            // SAFETY: `p` came from glibc with this alignment.
            return unsafe { __libc_realloc(p.cast(), new_size).cast() };
        }
        // SAFETY: allocate, copy the smaller size, free the old block.
        unsafe {
            let q = self.alloc(Layout::from_size_align_unchecked(new_size, l.align()));
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                __libc_free(p.cast());
            }
            q
        }
    }
}

// The RDMA build links libibverbs' loader shim (rdma-mummy-sys), whose constructor loads libibverbs
// from inside this library's initialisation: in a preloaded program that hangs. Until that is
// solved, libgallocy.so is built without RDMA (preloaded programs use TCP); build the RDMA
// transport with `-p gallocy -p gallocy-bench`, not `--workspace`.
const _: () = assert!(
    !g::RDMA_BUILT,
    "libgallocy.so cannot be built with the `rdma` feature yet: build RDMA with -p gallocy -p gallocy-bench"
);

#[global_allocator]
static INTERNAL: GlibcInternal = GlibcInternal;

const UNINIT: u8 = 0;
const STARTING: u8 = 1;
const READY: u8 = 2;
const DISABLED: u8 = 3;

/// Where new allocations go: gallocy once READY; glibc before, while starting, or if disabled.
static STATE: AtomicU8 = AtomicU8::new(UNINIT);
/// glibc's own `malloc_usable_size` (ours shadows it), resolved when gallocy starts.
static GLIBC_USABLE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Marks the thread as running gallocy's own code while this library works in a slow path:
/// allocations nested in it go to glibc.
struct Nested(#[allow(dead_code)] g::preload::Scope);

impl Nested {
    fn enter() -> Nested {
        Nested(g::preload::scope())
    }
}

/// Whether this call should be served by gallocy (starting gallocy on the first call).
#[inline]
fn use_gallocy() -> bool {
    match STATE.load(Ordering::Acquire) {
        READY => !g::preload::in_runtime(),
        UNINIT => !g::preload::in_runtime() && start(),
        _ => false,
    }
}

/// Joins the job. Other threads use glibc meanwhile. Returns whether gallocy is ready.
#[cold]
fn start() -> bool {
    if STATE.compare_exchange(UNINIT, STARTING, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return STATE.load(Ordering::Acquire) == READY;
    }
    let _n = Nested::enter();
    // A process started by a job member (a shell, a subprocess) inherits the member's variables
    // but is not a member: it runs as a one-process job.
    let inherited = std::env::var_os("GALLOCY_JOINED").is_some();
    match g::preload::init(inherited) {
        Ok(()) => {
            if g::size() > 1 {
                std::env::set_var("GALLOCY_JOINED", std::process::id().to_string());
            }
            resolve_glibc_usable_size();
            // SAFETY: registering plain extern "C" functions with libc.
            unsafe {
                libc::atexit(at_exit);
                libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child));
            }
            STATE.store(READY, Ordering::Release);
            true
        }
        Err(e) => {
            eprintln!("{e}");
            let in_a_job = std::env::var_os("GALLOCY_SIZE").is_some()
                || std::env::var_os("GALLOCY_COORDINATOR").is_some()
                || g::size() > 1;
            if in_a_job && !inherited {
                // A member that cannot join must not run on as if nothing happened.
                // SAFETY: ends the process.
                unsafe { libc::_exit(1) };
            }
            eprintln!("gallocy: continuing with the system allocator");
            STATE.store(DISABLED, Ordering::Release);
            false
        }
    }
}

fn resolve_glibc_usable_size() {
    // SAFETY: looking up the next definition of a libc symbol; the name is a valid C string.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) };
    GLIBC_USABLE_SIZE.store(f as usize, Ordering::Release);
}

extern "C" fn at_exit() {
    let _n = Nested::enter();
    // finalize is a no-op in a forked child of a member (it never joined).
    if g::size() > 1 {
        if let Err(e) = g::finalize() {
            eprintln!("{e}");
        }
    } else if g::preload::stats_enabled() {
        g::stats_print();
    }
}

extern "C" fn before_fork() {
    g::preload::before_fork();
}

extern "C" fn after_fork_parent() {
    g::preload::after_fork_parent();
}

extern "C" fn after_fork_child() {
    let _n = Nested::enter();
    g::preload::after_fork_child();
}

fn set_errno(e: i32) {
    // SAFETY: errno is thread-local and always writable.
    unsafe { *libc::__errno_location() = e };
}

fn out_of_memory(p: *mut u8) -> *mut c_void {
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

#[inline]
fn owned(p: *mut c_void) -> bool {
    g::preload::owns(p as usize)
}

fn page_size() -> usize {
    g::page_size()
}

// ----- the malloc family -----

#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    if STATE.load(Ordering::Acquire) == READY {
        if let Some(p) = g::preload::malloc(size) {
            return out_of_memory(p);
        }
    } else if use_gallocy() {
        return out_of_memory(g::malloc(size));
    }
    // SAFETY: plain call into glibc.
    unsafe { __libc_malloc(size) }
}

#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: per the C contract of free, `p` is a live block: ours or glibc's.
    if !unsafe { g::preload::free_if_owned(p.cast()) } {
        // SAFETY: a glibc block.
        unsafe { __libc_free(p) }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: same contract as free.
    unsafe { free(p) }
}

#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    if use_gallocy() {
        if n.checked_mul(size).is_none() {
            set_errno(libc::ENOMEM);
            return std::ptr::null_mut();
        }
        return out_of_memory(g::calloc(n, size));
    }
    // SAFETY: plain call into glibc.
    unsafe { __libc_calloc(n, size) }
}

#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: realloc(NULL, n) is malloc(n).
        return unsafe { malloc(size) };
    }
    if owned(p) {
        if size == 0 {
            // SAFETY: glibc semantics: realloc(p, 0) frees p and returns NULL.
            unsafe { g::free(p.cast()) };
            return std::ptr::null_mut();
        }
        // SAFETY: a live block of the shared heap.
        return out_of_memory(unsafe { g::realloc(p.cast(), size) });
    }
    // A glibc block stays with glibc.
    // SAFETY: plain call into glibc with its own block.
    unsafe { __libc_realloc(p, size) }
}

#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: same contract as realloc.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// Allocates with a power-of-two alignment.
fn aligned(align: usize, size: usize) -> *mut c_void {
    if use_gallocy() {
        return out_of_memory(g::aligned_alloc(align, size));
    }
    // SAFETY: plain call into glibc.
    unsafe { __libc_memalign(align, size) }
}

#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let p = aligned(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a valid pointer to store the result in.
    unsafe { *out = p };
    0
}

#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // Like glibc: an alignment that is not a power of two is rounded up to one.
    aligned(align.max(1).next_power_of_two(), size)
}

#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    aligned(page_size(), size)
}

#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    aligned(page, size.max(1).div_ceil(page) * page)
}

#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if owned(p) {
        // SAFETY: a live block of the shared heap.
        return unsafe { g::usable_size(p.cast()) };
    }
    let mut f = GLIBC_USABLE_SIZE.load(Ordering::Acquire);
    if f == 0 {
        let _n = Nested::enter();
        resolve_glibc_usable_size();
        f = GLIBC_USABLE_SIZE.load(Ordering::Acquire);
    }
    if f == 0 {
        return 0;
    }
    // SAFETY: `f` is glibc's malloc_usable_size, called with a glibc block.
    unsafe {
        let f: unsafe extern "C" fn(*mut c_void) -> usize = std::mem::transmute(f);
        f(p)
    }
}

// ----- the C API (gallocy.h) -----

/// Joins the job (idempotent). 0, or -EINVAL if gallocy could not start.
#[no_mangle]
pub extern "C" fn gallocy_init() -> i32 {
    match STATE.load(Ordering::Acquire) {
        READY => 0,
        UNINIT if start() => 0,
        STARTING => {
            while STATE.load(Ordering::Acquire) == STARTING {
                std::thread::yield_now();
            }
            if STATE.load(Ordering::Acquire) == READY {
                0
            } else {
                -libc::EINVAL
            }
        }
        _ => -libc::EINVAL,
    }
}

/// This process's rank (0 before init).
#[no_mangle]
pub extern "C" fn gallocy_rank() -> i32 {
    g::rank() as i32
}

/// Number of processes in the job (1 before init).
#[no_mangle]
pub extern "C" fn gallocy_size() -> i32 {
    g::size() as i32
}

fn ready() -> bool {
    gallocy_init() == 0
}

#[no_mangle]
pub extern "C" fn gallocy_barrier() {
    if ready() {
        g::barrier();
    }
}

#[no_mangle]
pub extern "C" fn gallocy_lock(id: u32) {
    if ready() {
        g::lock(id);
    }
}

#[no_mangle]
pub extern "C" fn gallocy_unlock(id: u32) {
    if ready() {
        g::unlock(id);
    }
}

#[no_mangle]
pub extern "C" fn gallocy_alloc_collective(size: usize) -> *mut c_void {
    if !ready() {
        return std::ptr::null_mut();
    }
    g::alloc_collective(size).cast()
}

#[no_mangle]
pub unsafe extern "C" fn gallocy_broadcast(buf: *mut c_void, len: usize, root: i32) {
    if !ready() || len == 0 || buf.is_null() {
        return;
    }
    // SAFETY: the caller passes `len` valid bytes at `buf`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
    g::broadcast(bytes, root.max(0) as usize);
}

#[no_mangle]
pub extern "C" fn gallocy_stats_print() {
    g::stats_print();
}

/// Barrier, then leave the job. 0, or -EIO if leaving failed.
#[no_mangle]
pub extern "C" fn gallocy_finalize() -> i32 {
    if STATE.load(Ordering::Acquire) != READY {
        return 0;
    }
    match g::finalize() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            -libc::EIO
        }
    }
}
