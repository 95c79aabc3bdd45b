//! The shared-heap allocator of one rank.
//!
//! Every rank allocates from its own arena (heap_size / size bytes), so allocation never waits on
//! the network. All metadata lives in private runtime memory: slab descriptors and free lists
//! on the runtime's own allocator, span and block tables in lazily touched anonymous mappings;
//! nothing is ever stored in the shared heap. Small sizes (up to 16 KiB) come from 64 KiB slabs
//! of one size class, through per-thread caches that refill in batches taken from one slab (so
//! two threads rarely share a cache line of metadata); larger blocks are page-aligned page runs.
//! A state byte per small object and a length per large block catch double and invalid frees.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::lazy::LazyArray;

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
/// Largest small size.
pub const MAX_SMALL: usize = 64 * 1024;
const CLASS_SIZES: [usize; 44] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
    2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384, 20480, 24576, 28672, 32768,
    40960, 49152, 57344, 65536,
];
/// A slab holds at least this many objects (larger classes get slabs of several spans).
const MIN_OBJECTS: usize = 8;
/// Index arithmetic: offset * recip >> RECIP_SHIFT == offset / obj_size for offsets below 2^20.
const RECIP_SHIFT: u32 = 48;

/// Bytes of a slab of objects of `obj_size`: whole spans, at least MIN_OBJECTS objects.
const fn slab_bytes(obj_size: usize) -> usize {
    let want = obj_size * MIN_OBJECTS;
    if want <= SPAN { SPAN } else { want.div_ceil(SPAN) * SPAN }
}
/// Objects a thread keeps per class.
const CACHE: usize = 64;
/// Objects moved between a thread and the central lists at a time.
const BATCH: usize = 32;
/// Size class of every size up to MAX_SMALL, by (size + 15) / 16.
static CLASS_BY_16: [u8; MAX_SMALL / 16 + 1] = class_table();

const fn class_table() -> [u8; MAX_SMALL / 16 + 1] {
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

/// One slab: a 64 KiB span cut into objects of one class.
struct Slab {
    base: usize,
    obj_size: usize,
    /// ceil(2^48 / obj_size): offset * recip >> 48 equals offset / obj_size for every offset
    /// in a slab (below 2^20: the error stays below 2^-28, a quotient's fraction is at least
    /// 1 / obj_size >= 2^-16).
    recip: u64,
    /// Bytes of the slab.
    bytes: usize,
    nobj: usize,
    class: usize,
    /// FREE or LIVE per object. Plain loads and stores: a double free by one thread is always
    /// caught; two threads freeing the same block at the same time is a race in the program.
    state: Box<[AtomicU8]>,
}

impl Slab {
    #[inline]
    fn index(&self, addr: usize) -> Option<usize> {
        let off = addr.wrapping_sub(self.base);
        let i = ((off as u64 * self.recip) >> RECIP_SHIFT) as usize;
        (off < self.bytes && i * self.obj_size == off && i < self.nobj).then_some(i)
    }

    /// Marks object `i` live; false if it already was.
    #[inline]
    fn mark_live(&self, i: usize) -> bool {
        let s = &self.state[i];
        let was = s.load(Ordering::Relaxed);
        s.store(LIVE, Ordering::Relaxed);
        was == FREE
    }

    /// Marks object `i` free; false if it was not live.
    #[inline]
    fn mark_free(&self, i: usize) -> bool {
        let s = &self.state[i];
        if s.load(Ordering::Relaxed) != LIVE {
            return false;
        }
        s.store(FREE, Ordering::Relaxed);
        true
    }
}

/// A class's free objects outside thread caches, grouped by slab.
#[derive(Default)]
pub struct Central {
    /// Per slab of the class: its free objects.
    slabs: Vec<(&'static Slab, Vec<u16>)>,
    /// Positions (in `slabs`) of slabs with free objects; the last is used first.
    partial: Vec<u32>,
    /// Position of each slab in `slabs`, by slab base.
    position: std::collections::HashMap<usize, u32>,
}

impl Central {
    /// Takes up to BATCH objects, all from one slab. False if there are none.
    fn take(&mut self, out: &mut ([usize; CACHE], usize)) -> bool {
        while let Some(&pos) = self.partial.last() {
            let (slab, free) = &mut self.slabs[pos as usize];
            while out.1 < BATCH {
                let Some(i) = free.pop() else { break };
                out.0[out.1] = slab.base + i as usize * slab.obj_size;
                out.1 += 1;
            }
            if free.is_empty() {
                self.partial.pop();
            }
            if out.1 > 0 {
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
        free.push(((addr - slab.base) / slab.obj_size) as u16);
    }

    fn add_slab(&mut self, slab: &'static Slab) {
        let pos = self.slabs.len() as u32;
        self.slabs.push((slab, (0..slab.nobj as u16).rev().collect()));
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
}

/// The allocator of this rank's arena.
pub struct Allocator {
    heap_base: usize,
    page: usize,
    pub arena_start: usize,
    pub arena_end: usize,
    slabs: LazyArray<AtomicPtr<Slab>>,
    large: LazyArray<AtomicU32>,
    runs: Mutex<PageRuns>,
    central: Vec<Mutex<Central>>,
}

thread_local! {
    /// This thread's cache: const-initialized and without a destructor, so the fast path is one
    /// plain thread-local access.
    static THREAD_CACHE: RefCell<ThreadCache> = const { RefCell::new(ThreadCache::new()) };
    /// Gives the cache back when the thread exits (registered on the cache's first use).
    static FLUSHER: Flusher = const { Flusher };
}

/// Per-thread stacks of free small objects, one per class.
struct ThreadCache {
    /// FLUSHER is registered for this thread.
    registered: bool,
    /// FLUSHER ran (the thread is exiting): keep nothing cached.
    exited: bool,
    bins: [([usize; CACHE], usize); CLASS_SIZES.len()],
}

impl ThreadCache {
    const fn new() -> ThreadCache {
        ThreadCache { registered: false, exited: false, bins: [([0; CACHE], 0); CLASS_SIZES.len()] }
    }
}

/// Runs `f` on this thread's cache (None if the cache is busy: a signal handler allocating
/// inside an allocation; the caller then uses the central lists).
#[inline]
fn with_cache<R>(f: impl FnOnce(&mut ThreadCache) -> R) -> Option<R> {
    THREAD_CACHE.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if !c.registered {
            c.registered = true;
            register_flusher();
        }
        Some(f(&mut c))
    })
}

/// The flusher's registration allocates (glibc's `__cxa_thread_atexit_impl` calls `calloc`):
/// do it as runtime code, so that allocation never re-enters the shared-heap allocator.
#[cold]
fn register_flusher() {
    let _g = crate::RuntimeScope::enter();
    FLUSHER.with(|_| ());
}

struct Flusher;

impl Drop for Flusher {
    fn drop(&mut self) {
        let Some(rt) = crate::runtime::RUNTIME.get() else { return };
        let _g = crate::RuntimeScope::enter();
        THREAD_CACHE.with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                for (class, bin) in c.bins.iter_mut().enumerate() {
                    rt.alloc.give_back(class, &bin.0[..bin.1]);
                    bin.1 = 0;
                }
                // Later frees on this thread go straight back to the central lists.
                c.exited = true;
            }
        });
    }
}

impl Allocator {
    pub fn new(heap_base: usize, heap_size: usize, page: usize, rank: usize, arena_size: usize) -> Allocator {
        let arena_start = heap_base + rank * arena_size;
        let arena_end = if (heap_size / arena_size).saturating_sub(1) <= rank {
            heap_base + heap_size
        } else {
            arena_start + arena_size
        };
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
            slabs: LazyArray::new(heap_size / SPAN).expect("mapping the slab table"),
            large: LazyArray::new(heap_size / page).expect("mapping the block table"),
            runs: Mutex::new(runs),
            central: (0..CLASS_SIZES.len()).map(|_| Mutex::new(Central::default())).collect(),
        }
    }

    /// Whether `addr` lies in this rank's arena.
    pub fn is_local(&self, addr: usize) -> bool {
        (self.arena_start..self.arena_end).contains(&addr)
    }

    fn slab_at(&self, addr: usize) -> Option<&'static Slab> {
        let p = self.slabs.get((addr - self.heap_base) >> SPAN_SHIFT).load(Ordering::Acquire);
        // SAFETY: slabs are leaked when created and never freed.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    fn take_pages(&self, n: usize, align: usize) -> Result<usize, AllocError> {
        // The run index allocates: from the system allocator, never the shared heap.
        let _g = crate::RuntimeScope::enter();
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.take(n, align).ok_or(AllocError::OutOfMemory(n * self.page))
    }

    /// Carves a new slab for `class` and registers it with the class's central list.
    fn new_slab(&self, class: usize, central: &mut Central) -> Result<(), AllocError> {
        let obj_size = CLASS_SIZES[class];
        let bytes = slab_bytes(obj_size);
        let first = self.take_pages(bytes / self.page, SPAN / self.page)?;
        let base = self.heap_base + first * self.page;
        let nobj = bytes / obj_size;
        let slab: &'static Slab = Box::leak(Box::new(Slab {
            base,
            obj_size,
            recip: (1u64 << RECIP_SHIFT).div_ceil(obj_size as u64),
            bytes,
            nobj,
            class,
            state: (0..nobj).map(|_| AtomicU8::new(FREE)).collect(),
        }));
        for span in 0..bytes / SPAN {
            let entry = self.slabs.get(((base - self.heap_base) >> SPAN_SHIFT) + span);
            entry.store(slab as *const Slab as *mut Slab, Ordering::Release);
        }
        central.add_slab(slab);
        Ok(())
    }

    /// Refills `out` with a batch of free objects of `class` (slow path).
    #[cold]
    fn refill(&self, class: usize, out: &mut ([usize; CACHE], usize)) -> Result<(), AllocError> {
        // Our own bookkeeping allocates: from the system allocator, never the shared heap.
        let _g = crate::RuntimeScope::enter();
        let mut central = self.central[class].lock().unwrap_or_else(|p| p.into_inner());
        if !central.take(out) {
            self.new_slab(class, &mut central)?;
            central.take(out);
        }
        Ok(())
    }

    /// Returns free objects of `class` to the central list (slow path).
    #[cold]
    fn give_back(&self, class: usize, objects: &[usize]) {
        if objects.is_empty() {
            return;
        }
        let _g = crate::RuntimeScope::enter();
        let mut central = self.central[class].lock().unwrap_or_else(|p| p.into_inner());
        for &a in objects {
            let slab = self.slab_at(a).expect("cached objects belong to slabs");
            central.give(slab, a);
        }
    }

    #[inline]
    fn small(&self, class: usize) -> Result<usize, AllocError> {
        let from_cache = with_cache(|c| -> Result<usize, AllocError> {
            let bin = &mut c.bins[class];
            if bin.1 == 0 {
                self.refill(class, bin)?;
            }
            bin.1 -= 1;
            Ok(bin.0[bin.1])
        });
        let addr = match from_cache {
            Some(r) => r?,
            // The cache is busy: go to the central list directly.
            None => {
                let mut batch = ([0usize; CACHE], 0usize);
                self.refill(class, &mut batch)?;
                let a = batch.0[batch.1 - 1];
                self.give_back(class, &batch.0[..batch.1 - 1]);
                a
            }
        };
        let slab = self.slab_at(addr).expect("cached objects belong to slabs");
        let i = slab.index(addr).expect("cached objects are slab objects");
        assert!(slab.mark_live(i), "gallocy: allocator corruption: a free object at {addr:#x} was live");
        Ok(addr)
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) from this rank's arena.
    pub fn alloc(&self, size: usize, align: usize) -> Result<usize, AllocError> {
        if !align.is_power_of_two() {
            return Err(AllocError::BadAlignment(align));
        }
        let size = size.max(1);
        if size <= MAX_SMALL {
            let first = class_of(size);
            if align <= 16 {
                return self.small(first);
            }
            if align <= self.page {
                if let Some(class) = (first..CLASS_SIZES.len()).find(|c| CLASS_SIZES[*c].is_multiple_of(align)) {
                    return self.small(class);
                }
            }
        }
        let n = size.div_ceil(self.page);
        let first = self.take_pages(n, (align / self.page).max(1))?;
        self.large.get(first).store(n as u32, Ordering::Release);
        Ok(self.heap_base + first * self.page)
    }

    /// Usable size of a block of this arena.
    pub fn usable_size(&self, addr: usize) -> Result<usize, AllocError> {
        if !self.is_local(addr) {
            return Err(AllocError::InvalidPointer(addr));
        }
        if let Some(slab) = self.slab_at(addr) {
            return match slab.index(addr) {
                Some(_) => Ok(slab.obj_size),
                None => Err(AllocError::InvalidPointer(addr)),
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
    pub fn free(&self, addr: usize) -> Result<(), AllocError> {
        if !self.is_local(addr) {
            return Err(AllocError::InvalidPointer(addr));
        }
        if let Some(slab) = self.slab_at(addr) {
            let i = slab.index(addr).ok_or(AllocError::InvalidPointer(addr))?;
            if !slab.mark_free(i) {
                return Err(AllocError::DoubleFree(addr));
            }
            let class = slab.class;
            let cached = with_cache(|c| {
                let bin = &mut c.bins[class];
                if bin.1 == CACHE {
                    self.give_back(class, &bin.0[CACHE - BATCH..]);
                    bin.1 = CACHE - BATCH;
                }
                bin.0[bin.1] = addr;
                bin.1 += 1;
                if c.exited {
                    self.give_back(class, &bin.0[..bin.1]);
                    bin.1 = 0;
                }
            });
            if cached.is_none() {
                self.give_back(class, &[addr]);
            }
            return Ok(());
        }
        if !(addr - self.heap_base).is_multiple_of(self.page) {
            return Err(AllocError::InvalidPointer(addr));
        }
        let first = (addr - self.heap_base) / self.page;
        match self.large.get(first).swap(0, Ordering::AcqRel) {
            0 => Err(AllocError::DoubleFree(addr)),
            n => {
                let _g = crate::RuntimeScope::enter();
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

/// Frees a block of this rank's arena on behalf of a peer (called by the service thread).
pub fn free_local(rt: &crate::runtime::Runtime, addr: usize) -> Result<(), AllocError> {
    rt.alloc.free(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> Allocator {
        // Metadata only: these tests never touch the returned addresses.
        Allocator::new(0x4000_0000_0000, 64 << 20, 4096, 1, 32 << 20)
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
    fn freed_pages_are_reused_and_exhaustion_is_reported() {
        let a = arena();
        let p = a.alloc(1 << 20, 4096).unwrap();
        a.free(p).unwrap();
        assert_eq!(a.alloc(1 << 20, 4096).unwrap(), p);
        assert_eq!(a.alloc(64 << 20, 4096), Err(AllocError::OutOfMemory(64 << 20)));
    }
}
