//! The shared-heap allocator of one rank.
//!
//! Every rank allocates from its own arena (heap_size / size bytes), so allocation never waits on
//! the network. All metadata lives in private runtime memory: object states, span classes and
//! block lengths in lazily touched anonymous tables indexed by heap address, free lists on the
//! runtime's own allocator; nothing is ever stored in the shared heap. Small sizes (up to 64 KiB,
//! 44 classes) come from slabs of one class (64 KiB or more, aligned to their size) through
//! per-thread caches that refill in batches taken from one slab; larger blocks are page-aligned
//! page runs. A state byte per small object and a length per large block catch double and
//! invalid frees. The fast paths touch only the thread's cache and two address-indexed tables.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::heap::lazy::LazyArray;

/// Errors of allocator calls.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// The block was already freed.
    #[error("double free of {0:#x}")]
    DoubleFree(usize),
    /// The pointer was never returned by gallocy's allocator.
    #[error("invalid free of {0:#x}: not a block allocated by gallocy")]
    InvalidPointer(usize),
    /// The arena is exhausted.
    #[error("out of memory: this rank's arena has no room for {0} bytes (raise GALLOCY_HEAP_SIZE)")]
    OutOfMemory(usize),
    /// Alignment must be a power of two.
    #[error("alignment {0} is not a power of two")]
    BadAlignment(usize),
}

const SPAN: usize = 64 * 1024;
const SPAN_SHIFT: u32 = 16;
/// Object states are kept per 16-byte granule.
const GRANULE_SHIFT: u32 = 4;
/// Largest small size.
pub const MAX_SMALL: usize = 64 * 1024;
const CLASSES: usize = 44;
const CLASS_SIZES: [usize; CLASSES] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
    2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384, 20480, 24576, 28672, 32768,
    40960, 49152, 57344, 65536,
];
/// A slab holds at least this many objects.
const MIN_OBJECTS: usize = 8;
/// Index arithmetic: offset * recip >> RECIP_SHIFT == offset / obj_size for every offset in a
/// slab (below 2^20: the error stays below 2^-28, a quotient's fraction is at least 2^-16).
const RECIP_SHIFT: u32 = 48;
/// Objects a thread keeps per class.
const CACHE: usize = 128;
/// Objects moved between a thread and the central lists at a time.
const BATCH: usize = 64;

/// Bytes of a slab of `class`: a power of two, at least a span and MIN_OBJECTS objects; slabs
/// are aligned to their size, so a slab's base follows from any address inside it.
const fn slab_bytes(class: usize) -> usize {
    let want = CLASS_SIZES[class] * MIN_OBJECTS;
    if want <= SPAN {
        SPAN
    } else {
        want.next_power_of_two()
    }
}

/// Per-class constants: slab bytes, objects per slab, reciprocal of the object size.
const fn class_table() -> [(usize, usize, u64); CLASSES] {
    let mut t = [(0, 0, 0); CLASSES];
    let mut c = 0;
    while c < CLASSES {
        let bytes = slab_bytes(c);
        t[c] = (bytes, bytes / CLASS_SIZES[c], (1u64 << RECIP_SHIFT).div_ceil(CLASS_SIZES[c] as u64));
        c += 1;
    }
    t
}
static CLASS_INFO: [(usize, usize, u64); CLASSES] = class_table();

/// Size class of every size up to MAX_SMALL, by (size + 15) / 16.
static CLASS_BY_16: [u8; MAX_SMALL / 16 + 1] = size_table();

const fn size_table() -> [u8; MAX_SMALL / 16 + 1] {
    let mut t = [0u8; MAX_SMALL / 16 + 1];
    let mut i = 0;
    let mut c = 0;
    while i < t.len() {
        while CLASS_SIZES[c] < i * 16 {
            c += 1;
        }
        t[i] = c as u8;
        i += 1;
    }
    t
}

#[inline]
fn class_of(size: usize) -> usize {
    CLASS_BY_16[size.max(1).div_ceil(16)] as usize
}

/// Object states.
const FREE: u8 = 0;
const LIVE: u8 = 1;

/// A slab's free-list bookkeeping (slow paths only).
struct Slab {
    base: usize,
    class: usize,
}

/// A class's free objects outside thread caches, grouped by slab.
#[derive(Default)]
pub struct Central {
    /// Per slab of the class: its free objects (indices).
    slabs: Vec<(&'static Slab, Vec<u16>)>,
    /// Positions (in `slabs`) of slabs with free objects; the last is used first.
    partial: Vec<u32>,
    /// Position of each slab in `slabs`, by slab base.
    position: HashMap<usize, u32>,
}

impl Central {
    /// Takes up to BATCH objects, all from one slab. False if there are none.
    fn take(&mut self, out: &mut Bin) -> bool {
        while let Some(&pos) = self.partial.last() {
            let (slab, free) = &mut self.slabs[pos as usize];
            let size = CLASS_SIZES[slab.class];
            while out.len < BATCH {
                let Some(i) = free.pop() else { break };
                out.items[out.len] = slab.base + i as usize * size;
                out.len += 1;
            }
            if free.is_empty() {
                self.partial.pop();
            }
            if out.len > 0 {
                return true;
            }
        }
        false
    }

    /// Gives one free object back.
    fn give(&mut self, slab: &'static Slab, addr: usize) {
        let pos = *self.position.get(&slab.base).expect("every slab of the class is registered");
        let (_, free) = &mut self.slabs[pos as usize];
        if free.is_empty() {
            self.partial.push(pos);
        }
        free.push(((addr - slab.base) / CLASS_SIZES[slab.class]) as u16);
    }

    fn add_slab(&mut self, slab: &'static Slab) {
        let pos = self.slabs.len() as u32;
        let n = CLASS_INFO[slab.class].1;
        self.slabs.push((slab, (0..n as u16).rev().collect()));
        self.position.insert(slab.base, pos);
        self.partial.push(pos);
    }
}

/// Free page runs of the arena, in page indices from the heap base.
struct PageRuns {
    by_start: BTreeMap<usize, usize>,
    by_len: BTreeSet<(usize, usize)>,
    bump: usize,
    end: usize,
}

impl PageRuns {
    fn insert(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let (mut start, mut len) = (start, len);
        if let Some((&s, &l)) = self.by_start.range(..start).next_back() {
            if s + l == start {
                self.remove(s, l);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = self.by_start.get(&(start + len)) {
            self.remove(start + len, l);
            len += l;
        }
        if start + len == self.bump {
            self.bump = start;
            return;
        }
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove(&mut self, start: usize, len: usize) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    /// `n` pages starting at a multiple of `align` pages.
    fn take(&mut self, n: usize, align: usize) -> Option<usize> {
        let fit = self.by_len.range((n, 0)..).find_map(|&(len, start)| {
            let aligned = start.div_ceil(align) * align;
            (aligned + n <= start + len).then_some((len, start, aligned))
        });
        if let Some((len, start, aligned)) = fit {
            self.remove(start, len);
            self.insert(start, aligned - start);
            self.insert(aligned + n, start + len - aligned - n);
            return Some(aligned);
        }
        let aligned = self.bump.div_ceil(align) * align;
        if aligned + n > self.end {
            return None;
        }
        let gap_start = self.bump;
        self.bump = aligned + n;
        if aligned > gap_start {
            self.by_start.insert(gap_start, aligned - gap_start);
            self.by_len.insert((aligned - gap_start, gap_start));
        }
        Some(aligned)
    }

    /// Takes `n` pages never handed out before (from the bump pointer).
    fn take_fresh(&mut self, n: usize) -> Option<usize> {
        if self.bump + n > self.end {
            return None;
        }
        self.bump += n;
        Some(self.bump - n)
    }
}

/// One class's stack of cached free objects.
#[derive(Clone, Copy)]
struct Bin {
    items: [usize; CACHE],
    len: usize,
}

/// Per-thread state: the runtime-code depth (see `RuntimeScope`) and the object cache. One
/// const-initialized thread-local without a destructor, so each fast path is one plain
/// thread-local access.
pub(crate) struct ThreadState {
    depth: Cell<u32>,
    cache: RefCell<ThreadCache>,
}

struct ThreadCache {
    /// The thread is registered for `flush_thread_cache`.
    registered: bool,
    /// `flush_thread_cache` ran (the thread is exiting): keep nothing cached.
    exited: bool,
    bins: [Bin; CLASSES],
}

thread_local! {
    pub(crate) static THREAD: ThreadState = const {
        ThreadState {
            depth: Cell::new(0),
            cache: RefCell::new(ThreadCache {
                registered: false,
                exited: false,
                bins: [Bin { items: [0; CACHE], len: 0 }; CLASSES],
            }),
        }
    };
}

/// The pthread key whose destructor gives a thread's cache back when the thread exits. A
/// pthread-key destructor, unlike a Rust `thread_local!` destructor (registered through
/// `__cxa_thread_atexit_impl`), takes no dynamic-loader lock, neither when it is registered on
/// a thread's first allocation nor when it runs at thread exit: a thread started inside
/// `dlopen` (a library constructor) can allocate at once.
static CACHE_KEY: AtomicU32 = AtomicU32::new(NO_KEY);
const NO_KEY: u32 = u32::MAX;
static CACHE_KEY_ONCE: std::sync::Once = std::sync::Once::new();

/// Creates [`CACHE_KEY`] (once per process; called when an allocator is set up).
fn create_cache_key() {
    CACHE_KEY_ONCE.call_once(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; the destructor is a plain extern "C" function.
        if unsafe { libc::pthread_key_create(&mut key, Some(flush_thread_cache)) } == 0 {
            CACHE_KEY.store(key, Ordering::Release);
        }
        // Without a key (the process used up its keys) thread caches are not given back at
        // exit: their objects stay unused, nothing breaks.
    });
}

impl ThreadState {
    /// Whether the thread runs gallocy's own code.
    #[inline]
    pub(crate) fn in_runtime(&self) -> bool {
        self.depth.get() > 0
    }

    #[inline]
    pub(crate) fn enter(&self) {
        self.depth.set(self.depth.get() + 1);
    }

    #[inline]
    pub(crate) fn leave(&self) {
        self.depth.set(self.depth.get() - 1);
    }

    /// Runs `f` on the cache (None if the cache is busy: a signal handler allocating inside an
    /// allocation; the caller then uses the central lists).
    #[inline]
    fn with_cache<R>(&self, f: impl FnOnce(&mut ThreadCache) -> R) -> Option<R> {
        let mut c = self.cache.try_borrow_mut().ok()?;
        if !c.registered {
            c.registered = true;
            register_flusher(self);
        }
        Some(f(&mut c))
    }
}

/// Registers the thread for [`flush_thread_cache`]. `pthread_setspecific` may allocate (keys
/// past the first 32): do it as runtime code, so that allocation never re-enters the
/// shared-heap allocator.
#[cold]
fn register_flusher(t: &ThreadState) {
    let key = CACHE_KEY.load(Ordering::Acquire);
    if key == NO_KEY {
        return;
    }
    t.enter();
    // SAFETY: a key we created; any non-null value makes the destructor run at thread exit.
    unsafe { libc::pthread_setspecific(key, std::ptr::NonNull::<u8>::dangling().as_ptr().cast()) };
    t.leave();
}

/// The allocator of this process's arena, once the runtime has one (for the cache destructor).
static PROCESS_ALLOCATOR: std::sync::OnceLock<&'static Allocator> = std::sync::OnceLock::new();

/// Makes `alloc` the allocator exiting threads give their cached objects back to.
pub fn register_process_allocator(alloc: &'static Allocator) {
    let _ = PROCESS_ALLOCATOR.set(alloc);
}

/// The cache key's destructor: gives the exiting thread's cached objects back to the central
/// lists, and keeps nothing cached from then on.
extern "C" fn flush_thread_cache(_value: *mut libc::c_void) {
    let Some(alloc) = PROCESS_ALLOCATOR.get() else { return };
    THREAD.with(|t| {
        t.enter();
        if let Ok(mut c) = t.cache.try_borrow_mut() {
            for (class, bin) in c.bins.iter_mut().enumerate() {
                alloc.give_back(class, &bin.items[..bin.len]);
                bin.len = 0;
            }
            c.exited = true;
        }
        t.leave();
    });
}

/// Marks the current thread as running gallocy's own code for the scope's lifetime: its
/// allocations then go to the system allocator, never to the shared heap.
pub(crate) struct RuntimeScope(());

impl RuntimeScope {
    pub(crate) fn enter() -> RuntimeScope {
        THREAD.with(|t| t.enter());
        RuntimeScope(())
    }
}

impl Drop for RuntimeScope {
    fn drop(&mut self) {
        THREAD.with(|t| t.leave());
    }
}

/// Whether the calling thread runs gallocy's own code (see [`RuntimeScope`]).
#[inline]
pub(crate) fn in_runtime() -> bool {
    THREAD.with(|t| t.in_runtime())
}

/// The allocator of this rank's arena.
pub struct Allocator {
    heap_base: usize,
    page: usize,
    arena_start: usize,
    arena_end: usize,
    /// Per span: the slab's class + 1, or 0.
    span_class: LazyArray<AtomicU8>,
    /// Per span: the slab's bookkeeping (slow paths).
    slabs: LazyArray<AtomicPtr<Slab>>,
    /// Per granule: the state of the small object starting there.
    state: LazyArray<AtomicU8>,
    /// Per page: length in pages of the large block starting there, or 0.
    large: LazyArray<AtomicU32>,
    runs: Mutex<PageRuns>,
    central: Vec<Mutex<Central>>,
    /// Gives the memory of a freed large block's pages back (set when the process joins a job
    /// whose transport allows it; see [`Allocator::release_freed_pages_with`]).
    page_releaser: std::sync::OnceLock<fn(usize, usize)>,
}

/// Freed blocks of at least this many bytes give their memory back (glibc's default mmap
/// threshold: smaller blocks are reused soon).
pub const RELEASE_THRESHOLD: usize = 128 * 1024;

impl Allocator {
    /// The allocator of the arena `[arena_start, arena_end)` of the heap at `heap_base` (see
    /// `heap::layout` for who gets which arena).
    pub fn new(heap_base: usize, heap_size: usize, page: usize, arena_start: usize, arena_end: usize) -> Allocator {
        create_cache_key();
        let runs = PageRuns {
            by_start: BTreeMap::new(),
            by_len: BTreeSet::new(),
            bump: (arena_start - heap_base) / page,
            end: (arena_end - heap_base) / page,
        };
        Allocator {
            heap_base,
            page,
            arena_start,
            arena_end,
            span_class: LazyArray::new(heap_size / SPAN).expect("mapping the span table"),
            slabs: LazyArray::new(heap_size / SPAN).expect("mapping the slab table"),
            state: LazyArray::new(heap_size >> GRANULE_SHIFT).expect("mapping the object states"),
            large: LazyArray::new(heap_size / page).expect("mapping the block table"),
            runs: Mutex::new(runs),
            central: (0..CLASSES).map(|_| Mutex::new(Central::default())).collect(),
            page_releaser: std::sync::OnceLock::new(),
        }
    }

    /// From now on, a freed block of at least [`RELEASE_THRESHOLD`] bytes has `release(first
    /// page, pages)` called on its pages before they can be handed out again.
    pub fn release_freed_pages_with(&self, release: fn(usize, usize)) {
        let _ = self.page_releaser.set(release);
    }

    /// The page (from the heap base) below which every page run handed out so far lies.
    pub fn high_water_page(&self) -> usize {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).bump
    }

    /// Whether `addr` lies in this rank's arena.
    #[inline]
    pub fn is_local(&self, addr: usize) -> bool {
        (self.arena_start..self.arena_end).contains(&addr)
    }

    #[inline]
    fn state_of(&self, addr: usize) -> &AtomicU8 {
        self.state.get((addr - self.heap_base) >> GRANULE_SHIFT)
    }

    /// The class of the small object at `addr`, if `addr` starts one of this arena's slab
    /// objects: Some(Ok(class)); Some(Err) for an address inside a slab that is no object start;
    /// None outside slabs.
    #[inline]
    fn small_class(&self, addr: usize) -> Option<Result<usize, AllocError>> {
        let off = addr - self.heap_base;
        let c = self.span_class.get(off >> SPAN_SHIFT).load(Ordering::Acquire);
        if c == 0 {
            return None;
        }
        let class = c as usize - 1;
        let (bytes, nobj, recip) = CLASS_INFO[class];
        let within = off & (bytes - 1);
        let i = ((within as u64 * recip) >> RECIP_SHIFT) as usize;
        Some(if i * CLASS_SIZES[class] == within && i < nobj {
            Ok(class)
        } else {
            Err(AllocError::InvalidPointer(addr))
        })
    }

    fn take_pages(&self, n: usize, align: usize) -> Result<usize, AllocError> {
        // The run index allocates: from the system allocator, never the shared heap.
        let _g = RuntimeScope::enter();
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.take(n, align).ok_or(AllocError::OutOfMemory(n * self.page))
    }

    /// Carves a new slab for `class` and registers it with the class's central list.
    fn new_slab(&self, class: usize, central: &mut Central) -> Result<(), AllocError> {
        let bytes = CLASS_INFO[class].0;
        let first = self.take_pages(bytes / self.page, bytes / self.page)?;
        let base = self.heap_base + first * self.page;
        let slab: &'static Slab = Box::leak(Box::new(Slab { base, class }));
        for span in 0..bytes / SPAN {
            let s = ((base - self.heap_base) >> SPAN_SHIFT) + span;
            self.slabs.get(s).store(slab as *const Slab as *mut Slab, Ordering::Release);
            self.span_class.get(s).store(class as u8 + 1, Ordering::Release);
        }
        central.add_slab(slab);
        Ok(())
    }

    /// Refills `bin` with a batch of free objects of `class` (slow path).
    #[cold]
    fn refill(&self, class: usize, bin: &mut Bin) -> Result<(), AllocError> {
        // Our own bookkeeping allocates: from the system allocator, never the shared heap.
        let _g = RuntimeScope::enter();
        let mut central = self.central[class].lock().unwrap_or_else(|p| p.into_inner());
        if !central.take(bin) {
            self.new_slab(class, &mut central)?;
            central.take(bin);
        }
        Ok(())
    }

    /// Returns free objects of `class` to the central list (slow path).
    #[cold]
    fn give_back(&self, class: usize, objects: &[usize]) {
        if objects.is_empty() {
            return;
        }
        let _g = RuntimeScope::enter();
        let mut central = self.central[class].lock().unwrap_or_else(|p| p.into_inner());
        for &a in objects {
            let p = self.slabs.get((a - self.heap_base) >> SPAN_SHIFT).load(Ordering::Acquire);
            // SAFETY: slabs are leaked when created and never freed; cached objects belong to one.
            central.give(unsafe { &*p }, a);
        }
    }

    #[inline]
    fn small(&self, t: &ThreadState, class: usize) -> Result<usize, AllocError> {
        let from_cache = t.with_cache(|c| -> Result<usize, AllocError> {
            let bin = &mut c.bins[class];
            if bin.len == 0 {
                self.refill(class, bin)?;
            }
            bin.len -= 1;
            Ok(bin.items[bin.len])
        });
        let addr = match from_cache {
            Some(r) => r?,
            // The cache is busy: go to the central list directly.
            None => {
                let mut batch = Bin { items: [0; CACHE], len: 0 };
                self.refill(class, &mut batch)?;
                let a = batch.items[batch.len - 1];
                self.give_back(class, &batch.items[..batch.len - 1]);
                a
            }
        };
        let s = self.state_of(addr);
        assert!(
            s.load(Ordering::Relaxed) == FREE,
            "gallocy: allocator corruption: a free object at {addr:#x} was live"
        );
        s.store(LIVE, Ordering::Relaxed);
        Ok(addr)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) from this rank's arena.
    #[inline]
    pub fn alloc(&self, size: usize, align: usize) -> Result<usize, AllocError> {
        THREAD.with(|t| self.alloc_in(t, size, align))
    }

    /// `alloc` with the caller's thread state at hand.
    #[inline]
    pub(crate) fn alloc_in(&self, t: &ThreadState, size: usize, align: usize) -> Result<usize, AllocError> {
        if size <= MAX_SMALL && align <= 16 {
            return self.small(t, class_of(size));
        }
        self.alloc_slow(t, size, align)
    }

    #[cold]
    fn alloc_slow(&self, t: &ThreadState, size: usize, align: usize) -> Result<usize, AllocError> {
        if !align.is_power_of_two() {
            return Err(AllocError::BadAlignment(align));
        }
        let size = size.max(1);
        if size <= MAX_SMALL && align <= self.page {
            // Slabs are aligned to at least a span; a class whose size is a multiple of `align`
            // gives aligned objects.
            let first = class_of(size);
            if let Some(class) = (first..CLASSES).find(|c| CLASS_SIZES[*c].is_multiple_of(align)) {
                return self.small(t, class);
            }
        }
        let n = size.div_ceil(self.page);
        let first = self.take_pages(n, (align / self.page).max(1))?;
        self.large.get(first).store(n as u32, Ordering::Release);
        Ok(self.heap_base + first * self.page)
    }

    /// Allocates `size` bytes on pages of this arena that were never handed out before: page
    /// aligned, zero in every process's copy, and never requested by anybody (so their placement
    /// may still be chosen). Freed like any large block.
    pub fn alloc_fresh(&self, size: usize) -> Result<usize, AllocError> {
        let n = size.max(1).div_ceil(self.page);
        let first = {
            // The run index allocates: from the system allocator, never the shared heap.
            let _g = RuntimeScope::enter();
            let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            runs.take_fresh(n).ok_or(AllocError::OutOfMemory(n * self.page))?
        };
        self.large.get(first).store(n as u32, Ordering::Release);
        Ok(self.heap_base + first * self.page)
    }

    /// Usable size of a block of this arena.
    pub fn usable_size(&self, addr: usize) -> Result<usize, AllocError> {
        if !self.is_local(addr) {
            return Err(AllocError::InvalidPointer(addr));
        }
        if let Some(class) = self.small_class(addr) {
            let class = class?;
            return if self.state_of(addr).load(Ordering::Relaxed) == LIVE {
                Ok(CLASS_SIZES[class])
            } else {
                Err(AllocError::InvalidPointer(addr))
            };
        }
        if !(addr - self.heap_base).is_multiple_of(self.page) {
            return Err(AllocError::InvalidPointer(addr));
        }
        match self.large.get((addr - self.heap_base) / self.page).load(Ordering::Acquire) {
            0 => Err(AllocError::InvalidPointer(addr)),
            n => Ok(n as usize * self.page),
        }
    }

    /// Frees a block of this arena.
    #[inline]
    pub fn free(&self, addr: usize) -> Result<(), AllocError> {
        THREAD.with(|t| self.free_in(t, addr))
    }

    /// Marks the small object at `addr` free and returns its class; `None` if `addr` is not a
    /// small object (then it may be a large block).
    #[inline]
    fn release_small(&self, addr: usize) -> Option<Result<usize, AllocError>> {
        if !self.is_local(addr) {
            return Some(Err(AllocError::InvalidPointer(addr)));
        }
        let class = match self.small_class(addr)? {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let s = self.state_of(addr);
        if s.load(Ordering::Relaxed) != LIVE {
            return Some(Err(AllocError::DoubleFree(addr)));
        }
        s.store(FREE, Ordering::Relaxed);
        Some(Ok(class))
    }

    /// Frees a block of this arena on behalf of another rank: straight to the central lists, so
    /// that the block does not sit in the service thread's cache, out of the application's reach.
    pub fn free_remote(&self, addr: usize) -> Result<(), AllocError> {
        match self.release_small(addr) {
            None => self.free_large(addr),
            Some(class) => {
                self.give_back(class?, &[addr]);
                Ok(())
            }
        }
    }

    /// `free` with the caller's thread state at hand.
    #[inline]
    pub(crate) fn free_in(&self, t: &ThreadState, addr: usize) -> Result<(), AllocError> {
        let class = match self.release_small(addr) {
            None => return self.free_large(addr),
            Some(class) => class?,
        };
        let cached = t.with_cache(|c| {
            let exited = c.exited;
            let bin = &mut c.bins[class];
            if bin.len == CACHE {
                self.give_back(class, &bin.items[CACHE - BATCH..]);
                bin.len = CACHE - BATCH;
            }
            bin.items[bin.len] = addr;
            bin.len += 1;
            if exited {
                self.give_back(class, &bin.items[..bin.len]);
                bin.len = 0;
            }
        });
        if cached.is_none() {
            self.give_back(class, &[addr]);
        }
        Ok(())
    }

    #[cold]
    fn free_large(&self, addr: usize) -> Result<(), AllocError> {
        if !(addr - self.heap_base).is_multiple_of(self.page) {
            return Err(AllocError::InvalidPointer(addr));
        }
        let first = (addr - self.heap_base) / self.page;
        match self.large.get(first).swap(0, Ordering::AcqRel) {
            0 => Err(AllocError::DoubleFree(addr)),
            n => {
                // Before the pages can be handed out again: nobody else uses them meanwhile.
                if n as usize * self.page >= RELEASE_THRESHOLD {
                    if let Some(release) = self.page_releaser.get() {
                        release(first, n as usize);
                    }
                }
                let _g = RuntimeScope::enter();
                self.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(first, n as usize);
                Ok(())
            }
        }
    }
}

/// The allocator's locks, held across `fork` (see `preload::before_fork`).
pub struct ForkGuards<'a> {
    _runs: std::sync::MutexGuard<'a, PageRuns>,
    _central: Vec<std::sync::MutexGuard<'a, Central>>,
}

impl Allocator {
    /// Takes every lock of the allocator, in the order `refill` nests them: the size classes,
    /// then the page runs.
    pub fn lock_all(&self) -> ForkGuards<'_> {
        let central = self.central.iter().map(|m| m.lock().unwrap_or_else(|p| p.into_inner())).collect();
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        ForkGuards { _runs: runs, _central: central }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> Allocator {
        // Metadata only: these tests never touch the returned addresses.
        Allocator::new(0x4000_0000_0000, 64 << 20, 4096, 0x4000_0000_0000 + (32 << 20), 0x4000_0000_0000 + (64 << 20))
    }

    #[test]
    fn classes_cover_sizes() {
        for s in 1..=MAX_SMALL {
            let c = class_of(s);
            assert!(CLASS_SIZES[c] >= s && (c == 0 || CLASS_SIZES[c - 1] < s), "size {s}");
        }
    }

    #[test]
    fn small_and_large_blocks_round_trip() {
        let a = arena();
        let p = a.alloc(24, 8).unwrap();
        assert!(a.is_local(p));
        assert_eq!(a.usable_size(p).unwrap(), 32);
        let q = a.alloc(100_000, 8).unwrap();
        assert_eq!(q % 4096, 0);
        assert_eq!(a.usable_size(q).unwrap(), 25 * 4096);
        a.free(p).unwrap();
        assert_eq!(a.free(p), Err(AllocError::DoubleFree(p)));
        a.free(q).unwrap();
        assert_eq!(a.free(q), Err(AllocError::DoubleFree(q)));
        assert_eq!(a.free(p + 8), Err(AllocError::InvalidPointer(p + 8)));
        assert_eq!(a.free(0x10), Err(AllocError::InvalidPointer(0x10)));
    }

    #[test]
    fn alignment_is_honoured() {
        let a = arena();
        for shift in 3..=16 {
            let align = 1usize << shift;
            for size in [1, 24, 700, 5000, 70_000] {
                let p = a.alloc(size, align).unwrap();
                assert_eq!(p % align, 0, "size {size} align {align}");
                assert!(a.usable_size(p).unwrap() >= size);
            }
        }
        assert_eq!(a.alloc(8, 24), Err(AllocError::BadAlignment(24)));
    }

    #[test]
    fn every_class_hands_out_distinct_objects_and_catches_bad_frees() {
        let a = arena();
        for (class, &size) in CLASS_SIZES.iter().enumerate() {
            let n = CLASS_INFO[class].1 * 2 + 3; // more than a slab, so a second slab is carved
            let mut got: Vec<usize> = (0..n).map(|_| a.alloc(size, 16).unwrap()).collect();
            for &p in &got {
                assert_eq!(a.usable_size(p).unwrap(), size, "class {class}");
                assert!(a.is_local(p));
            }
            got.sort_unstable();
            assert!(got.windows(2).all(|w| w[1] - w[0] >= size), "class {class}: overlapping objects");
            if size > 16 {
                assert_eq!(a.free(got[0] + 16), Err(AllocError::InvalidPointer(got[0] + 16)), "class {class}");
            }
            for &p in &got {
                a.free(p).unwrap();
            }
            assert_eq!(a.free(got[1]), Err(AllocError::DoubleFree(got[1])));
            assert!(a.usable_size(got[1]).is_err(), "a freed block has no usable size");
        }
    }

    #[test]
    fn freed_pages_are_reused_and_exhaustion_is_reported() {
        let a = arena();
        let p = a.alloc(1 << 20, 4096).unwrap();
        a.free(p).unwrap();
        assert_eq!(a.alloc(1 << 20, 4096).unwrap(), p);
        assert_eq!(a.alloc(64 << 20, 4096), Err(AllocError::OutOfMemory(64 << 20)));
    }
}
