//! The shared-heap allocator of one rank.
//!
//! Every rank allocates from its own arena (heap_size / size bytes), so allocation never waits on
//! the network. All metadata lives in private runtime memory: slab descriptors and free lists
//! on the runtime's own allocator, span and block tables in lazily touched anonymous mappings;
//! nothing is ever stored in the shared heap. Small sizes (up to 16 KiB) come from 64 KiB slabs
//! of one size class, through per-thread caches; larger blocks are page-aligned page runs.
//! A live bit per small object and a length per large block catch double and invalid frees.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
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
pub const MAX_SMALL: usize = 16 * 1024;
const CLASS_SIZES: [usize; 36] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
    2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384,
];
const CACHE: usize = 32;

fn class_of(size: usize) -> usize {
    let s = size.max(1);
    if s <= 128 {
        return s.div_ceil(16) - 1;
    }
    CLASS_SIZES.iter().position(|c| *c >= s).expect("size is small")
}

/// One slab: a 64 KiB span cut into objects of one class.
struct Slab {
    base: usize,
    obj_size: usize,
    nobj: usize,
    class: usize,
    live: [AtomicU64; SPAN / 16 / 64],
}

impl Slab {
    fn index(&self, addr: usize) -> Option<usize> {
        let off = addr.checked_sub(self.base)?;
        (off % self.obj_size == 0 && off / self.obj_size < self.nobj).then_some(off / self.obj_size)
    }

    /// Sets the live bit; returns false if it was already set.
    fn mark_live(&self, i: usize) -> bool {
        let bit = 1u64 << (i % 64);
        self.live[i / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Clears the live bit; returns false if it was not set.
    fn mark_free(&self, i: usize) -> bool {
        let bit = 1u64 << (i % 64);
        self.live[i / 64].fetch_and(!bit, Ordering::AcqRel) & bit != 0
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
    central: Vec<Mutex<Vec<usize>>>,
}

thread_local! {
    static THREAD_CACHE: RefCell<ThreadCache> = const { RefCell::new(ThreadCache::new()) };
}

/// Per-thread stacks of free small objects, one per class.
struct ThreadCache {
    bins: [([usize; CACHE], usize); CLASS_SIZES.len()],
}

impl ThreadCache {
    const fn new() -> ThreadCache {
        ThreadCache { bins: [([0; CACHE], 0); CLASS_SIZES.len()] }
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        if let Some(rt) = crate::runtime::RUNTIME.get() {
            let _g = crate::RuntimeScope::enter();
            for (class, (items, n)) in self.bins.iter_mut().enumerate() {
                rt.alloc.central[class].lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&items[..*n]);
                *n = 0;
            }
        }
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
            central: (0..CLASS_SIZES.len()).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Whether `addr` lies in this rank's arena.
    pub fn is_local(&self, addr: usize) -> bool {
        (self.arena_start..self.arena_end).contains(&addr)
    }

    fn slab_at(&self, addr: usize) -> Option<&Slab> {
        let p = self.slabs.get((addr - self.heap_base) >> SPAN_SHIFT).load(Ordering::Acquire);
        // SAFETY: slabs are created once and never freed while the runtime lives.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    fn take_pages(&self, n: usize, align: usize) -> Result<usize, AllocError> {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.take(n, align).ok_or(AllocError::OutOfMemory(n * self.page))
    }

    /// Carves a new slab for `class` and returns its objects.
    fn new_slab(&self, class: usize) -> Result<Vec<usize>, AllocError> {
        let pages = SPAN / self.page;
        let first = self.take_pages(pages, pages)?;
        let base = self.heap_base + first * self.page;
        let obj_size = CLASS_SIZES[class];
        let nobj = SPAN / obj_size;
        let slab = Box::new(Slab { base, obj_size, nobj, class, live: std::array::from_fn(|_| AtomicU64::new(0)) });
        self.slabs.get((base - self.heap_base) >> SPAN_SHIFT).store(Box::into_raw(slab), Ordering::Release);
        Ok((0..nobj).rev().map(|i| base + i * obj_size).collect())
    }

    /// Refills `out` with up to CACHE/2 free objects of `class`.
    fn refill(&self, class: usize, out: &mut ([usize; CACHE], usize)) -> Result<(), AllocError> {
        let mut central = self.central[class].lock().unwrap_or_else(|p| p.into_inner());
        if central.is_empty() {
            let fresh = self.new_slab(class)?;
            central.extend(fresh);
        }
        while out.1 < CACHE / 2 {
            let Some(a) = central.pop() else { break };
            out.0[out.1] = a;
            out.1 += 1;
        }
        Ok(())
    }

    fn small(&self, class: usize) -> Result<usize, AllocError> {
        let from_cache = THREAD_CACHE.try_with(|c| -> Result<usize, AllocError> {
            let mut c = c.borrow_mut();
            let bin = &mut c.bins[class];
            if bin.1 == 0 {
                self.refill(class, bin)?;
            }
            bin.1 -= 1;
            Ok(bin.0[bin.1])
        });
        let addr = match from_cache {
            Ok(r) => r?,
            // The thread is exiting: go to the central list directly.
            Err(_) => {
                let mut one = ([0usize; CACHE], 0usize);
                self.refill(class, &mut one)?;
                let a = one.0[one.1 - 1];
                self.central[class].lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&one.0[..one.1 - 1]);
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
        if align <= self.page && size <= MAX_SMALL {
            let first = class_of(size);
            if let Some(class) = (first..CLASS_SIZES.len()).find(|c| CLASS_SIZES[*c].is_multiple_of(align)) {
                return self.small(class);
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
            let cached = THREAD_CACHE.try_with(|c| {
                let mut c = c.borrow_mut();
                let bin = &mut c.bins[class];
                if bin.1 == CACHE {
                    let mut central = self.central[class].lock().unwrap_or_else(|p| p.into_inner());
                    central.extend_from_slice(&bin.0[CACHE / 2..]);
                    bin.1 = CACHE / 2;
                }
                bin.0[bin.1] = addr;
                bin.1 += 1;
            });
            if cached.is_err() {
                self.central[class].lock().unwrap_or_else(|p| p.into_inner()).push(addr);
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
                self.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(first, n as usize);
                Ok(())
            }
        }
    }
}

/// The allocator's locks, held across `fork` (see `preload::before_fork`).
pub struct ForkGuards<'a> {
    _runs: std::sync::MutexGuard<'a, PageRuns>,
    _central: Vec<std::sync::MutexGuard<'a, Vec<usize>>>,
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
