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

mod io;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// Rust allocations inside this library: glibc's internal entry points, which our exported
/// symbols never shadow. Never on the fault path (see [`GlibcInternal::refuse_on_fault_path`]).
struct GlibcInternal;

impl GlibcInternal {
    /// The fault path must not allocate: the signal may have interrupted glibc's allocator,
    /// holding its lock. An allocation there is a bug of ours that could hang the process, so
    /// it ends the process at once with one line (and SIGABRT, for a core) instead.
    fn refuse_on_fault_path() {
        gallocy_rt::refuse_on_fault_path(b"gallocy: fatal: an allocation on the fault path (a bug in gallocy)\n");
    }
}

// SAFETY: forwards to glibc's allocator, which honours size and (via memalign) alignment.
unsafe impl GlobalAlloc for GlibcInternal {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        Self::refuse_on_fault_path();
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
        Self::refuse_on_fault_path();
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
        Self::refuse_on_fault_path();
        // SAFETY: `p` came from glibc.
        unsafe { __libc_free(p.cast()) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        Self::refuse_on_fault_path();
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

#[global_allocator]
static INTERNAL: GlibcInternal = GlibcInternal;

const UNINIT: u8 = 0;
const STARTING: u8 = 1;
const READY: u8 = 2;
const DISABLED: u8 = 3;

/// Where new allocations go: gallocy once READY; glibc before (allocations made before this
/// library's constructor ran), while starting, or if disabled.
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

/// Whether this call should be served by gallocy.
#[inline]
fn use_gallocy() -> bool {
    STATE.load(Ordering::Acquire) == READY && !g::preload::in_runtime()
}

/// This library's ELF constructor. It runs when the process starts (before `main`, and before
/// the program's own constructors), where the dynamic loader's lock is free; glibc passes it
/// argc, argv and envp. It sets gallocy up ([`start`]) without joining the job: nothing that
/// runs inside `malloc` (possibly under the loader's or libc's locks) ever starts anything.
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn(libc::c_int, *const *const libc::c_char, *const *const libc::c_char) = constructor;

extern "C" fn constructor(_argc: libc::c_int, _argv: *const *const libc::c_char, _envp: *const *const libc::c_char) {
    start();
}

/// Sets this process up: decides membership, maps the heap, opens this rank's arena, resolves
/// the system calls it wraps and registers the fork and exit handlers. Talks to nobody and
/// starts no thread. Other threads use glibc meanwhile. Returns whether gallocy is ready.
#[cold]
fn start() -> bool {
    if STATE.compare_exchange(UNINIT, STARTING, Ordering::AcqRel, Ordering::Acquire).is_err() {
        while STATE.load(Ordering::Acquire) == STARTING {
            std::thread::yield_now();
        }
        return STATE.load(Ordering::Acquire) == READY;
    }
    let _n = Nested::enter();
    io::resolve();
    match g::preload::prepare() {
        Ok(_) => {
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
            let in_a_job =
                std::env::var_os("GALLOCY_SIZE").is_some() || std::env::var_os("GALLOCY_COORDINATOR").is_some();
            if in_a_job {
                // A member that cannot start must not run on as if nothing happened.
                g::exit_now(1);
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
    g::preload::at_exit();
}

/// `_exit` and `_Exit` skip `atexit` handlers: a member that joined leaves the job first, then
/// ends with the status it was given.
/// Anything else (a one-process job, a child, even a `vfork` child that shares its parent's
/// memory) ends at once, as with glibc's `_exit`.
fn exit_immediately(status: libc::c_int) -> ! {
    if STATE.load(Ordering::Acquire) == READY && !g::preload::in_runtime() && g::preload::is_joined_member() {
        g::preload::at_exit();
    }
    g::exit_now(status)
}

#[no_mangle]
pub extern "C" fn _exit(status: libc::c_int) -> ! {
    exit_immediately(status)
}

#[no_mangle]
pub extern "C" fn _Exit(status: libc::c_int) -> ! {
    exit_immediately(status)
}

extern "C" fn before_fork() {
    g::preload::before_fork();
}

extern "C" fn after_fork_parent() {
    g::preload::after_fork_parent();
}

extern "C" fn after_fork_child() {
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
    // Like glibc: an alignment that is not a power of two is rounded up to one, and one too
    // large for that is refused.
    match align.max(1).checked_next_power_of_two() {
        Some(a) => aligned(a, size),
        None => {
            set_errno(libc::EINVAL);
            std::ptr::null_mut()
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    aligned(page_size(), size)
}

#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    match size.max(1).div_ceil(page).checked_mul(page) {
        Some(rounded) => aligned(page, rounded),
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
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
    if STATE.load(Ordering::Acquire) != READY && !start() {
        return -libc::EINVAL;
    }
    let _n = Nested::enter();
    match g::preload::join() {
        Ok(()) => 0,
        Err(e @ g::Error::NotMember { .. }) => {
            eprintln!("{e}");
            -libc::EINVAL
        }
        Err(e) => {
            // A member that cannot join its job must not run on as if nothing happened.
            eprintln!("{e}");
            g::exit_now(1)
        }
    }
}

/// This process's rank (known from the start, before joining).
#[no_mangle]
pub extern "C" fn gallocy_rank() -> i32 {
    if STATE.load(Ordering::Acquire) == UNINIT {
        start();
    }
    g::rank() as i32
}

/// Number of processes in the job (known from the start, before joining).
#[no_mangle]
pub extern "C" fn gallocy_size() -> i32 {
    if STATE.load(Ordering::Acquire) == UNINIT {
        start();
    }
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
    if !ready() {
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
