//! The fault cases, run by every rank of the job after `gallocy::init()`.
//!
//! Rank 0 is the timing rank: for every case it touches pages it does not hold, one fresh page
//! per iteration, and times that single volatile access. The other ranks set the pages up
//! (owner writes, readers take read copies) in a phase separated by barriers, then wait in the
//! barrier while their runtime threads serve rank 0's faults.
//!
//! Pages are chosen by address near the END of the owner's arena, so they never collide with
//! anything malloc hands out, and every rank computes the same list.

use std::ptr::{read_volatile, write_volatile};
use std::sync::atomic::{compiler_fence, Ordering::SeqCst};

use anyhow::{bail, Result};

use crate::net::now_ns;
use crate::report::{new_histogram, Summary, SKIP_PREFIX};

/// One measured situation.
pub struct Case {
    pub name: &'static str,
    /// Rank whose arena holds the pages: it owns them writable at the start and writes them.
    pub owner: usize,
    /// Required home rank of every page (`gallocy::home_of`).
    pub home: usize,
    /// Ranks that read the pages (taking read copies) before the timed phase.
    pub readers: &'static [usize],
    /// Timed access is a write (else a read).
    pub write: bool,
    /// Release consistency only (`GALLOCY_CONSISTENCY=release`): rank 0 reads every page once
    /// before the timed phase, then a barrier (an acquire) drops those copies, since the owner
    /// writes the pages; the timed read fetches the page again. Over RDMA that is a one-sided READ
    /// of the home's master with no message. Skipped under sequential consistency, and it is the
    /// only read case release consistency runs besides `read_home_owner`.
    pub refetch: bool,
}

impl Case {
    /// Processes the case needs (rank 0 plus every rank it names).
    pub fn min_procs(&self) -> usize {
        let mut m = self.owner.max(self.home);
        for &r in self.readers {
            m = m.max(r);
        }
        m + 1
    }
}

pub const CASES: &[Case] = &[
    Case { name: "read_home_owner", owner: 1, home: 1, readers: &[], write: false, refetch: false },
    Case { name: "read_third_owner", owner: 2, home: 1, readers: &[], write: false, refetch: false },
    Case { name: "write_0", owner: 1, home: 1, readers: &[], write: true, refetch: false },
    Case { name: "write_1", owner: 1, home: 1, readers: &[2], write: true, refetch: false },
    Case { name: "write_3", owner: 1, home: 1, readers: &[2, 3, 4], write: true, refetch: false },
    Case { name: "read_refetch", owner: 1, home: 1, readers: &[0], write: false, refetch: true },
];

/// Whether the ranks run under release consistency (`GALLOCY_CONSISTENCY=release`).
fn release_consistency() -> bool {
    std::env::var("GALLOCY_CONSISTENCY").is_ok_and(|v| v.trim() == "release")
}

/// Value the owner writes at offsets 0 and 8 of page `i` of case `c`.
fn tag(c: usize, i: usize) -> u64 {
    0xA5A5_0000_0000_0000 | ((c as u64) << 32) | i as u64
}
/// Value rank 0 writes at offset 0 in a write case.
fn wtag(c: usize, i: usize) -> u64 {
    !tag(c, i)
}

/// Geometry of the shared heap as the runtime reports it.
#[derive(Clone, Copy, Debug)]
pub struct Heap {
    pub base: usize,
    pub size: usize,
    pub page: usize,
    pub procs: usize,
}

impl Heap {
    pub fn arena_size(&self) -> usize {
        (self.size / self.procs) / self.page * self.page
    }
}

/// Hands out disjoint pages, walking down from the end of each arena.
pub struct Picker<H: Fn(usize) -> usize, A: Fn(usize) -> usize> {
    heap: Heap,
    /// Next candidate address (exclusive upper end) per arena.
    cursor: Vec<usize>,
    home_of: H,
    arena_rank_of: A,
}

impl<H: Fn(usize) -> usize, A: Fn(usize) -> usize> Picker<H, A> {
    pub fn new(heap: Heap, home_of: H, arena_rank_of: A) -> Self {
        let cursor = (0..heap.procs).map(|k| heap.base + (k + 1) * heap.arena_size()).collect();
        Picker { heap, cursor, home_of, arena_rank_of }
    }

    /// `n` page addresses in `owner`'s arena whose home is `home`, never below the middle of
    /// the arena.
    pub fn take(&mut self, owner: usize, home: usize, n: usize) -> Result<Vec<usize>> {
        let lowest = self.heap.base + owner * self.heap.arena_size() + self.heap.arena_size() / 2;
        let mut out = Vec::with_capacity(n);
        let mut a = self.cursor[owner];
        while out.len() < n {
            if a < lowest + self.heap.page {
                bail!("not enough pages in the upper half of arena {owner} for {n} pages");
            }
            a -= self.heap.page;
            if (self.home_of)(a) == home && (self.arena_rank_of)(a) == owner {
                out.push(a);
            }
        }
        self.cursor[owner] = a;
        Ok(out)
    }
}

/// Body of one rank of `gallocy-bench fault`: runs `selected` (in [`CASES`] order; every rank
/// must get the same list). Rank 0 prints one record per case.
pub fn run_rank(selected: &[&Case], iters: usize, warmup: usize) -> Result<()> {
    gallocy::init().map_err(|e| anyhow::anyhow!("gallocy::init: {e}"))?;
    let rank = gallocy::rank();
    let heap = Heap {
        base: gallocy::heap_base(),
        size: gallocy::heap_size(),
        page: gallocy::page_size(),
        procs: gallocy::size(),
    };
    let mut picker = Picker::new(heap, gallocy::home_of, gallocy::arena_rank_of);
    let mut errors = 0usize;
    for (c, case) in CASES.iter().enumerate() {
        if !selected.iter().any(|s| s.name == case.name) {
            continue;
        }
        let release = release_consistency();
        if case.refetch != release && (case.refetch || case.name != "read_home_owner") {
            if rank == 0 {
                let why = if release {
                    "runs under sequential consistency only"
                } else {
                    "needs GALLOCY_CONSISTENCY=release"
                };
                println!("{SKIP_PREFIX}{} {why}", case.name);
            }
            continue;
        }
        if case.min_procs() > heap.procs {
            if rank == 0 {
                println!("{SKIP_PREFIX}{} needs {} processes", case.name, case.min_procs());
            }
            continue;
        }
        let pages = picker.take(case.owner, case.home, warmup + iters)?;
        errors += run_case(rank, c, case, &pages, warmup)?;
    }
    errors += run_sync(rank, iters, warmup);
    gallocy::finalize().map_err(|e| anyhow::anyhow!("gallocy::finalize: {e}"))?;
    if errors > 0 {
        bail!("rank {rank}: {errors} coherence check failures");
    }
    Ok(())
}

/// One case on this rank; returns the number of coherence check failures seen here.
fn run_case(rank: usize, c: usize, case: &Case, pages: &[usize], warmup: usize) -> Result<usize> {
    let mut errors = 0;
    let mut check = |what: &str, i: usize, got: u64, want: u64| {
        if got != want {
            if errors < 5 {
                eprintln!(
                    "rank {rank}: {}: {what} page {i} ({:#x}): got {got:#x}, want {want:#x}",
                    case.name, pages[i]
                );
            }
            errors += 1;
        }
    };

    // Set-up 1: the owner writes every page, so it holds them writable.
    gallocy::barrier();
    if rank == case.owner {
        for (i, &p) in pages.iter().enumerate() {
            // SAFETY: `p` is a page-aligned address inside the shared heap (picked from the
            // owner's arena); the runtime keeps it mapped, and this rank owns it writable.
            unsafe {
                write_volatile(p as *mut u64, tag(c, i));
                write_volatile((p + 8) as *mut u64, tag(c, i));
            }
        }
    }
    // Set-up 2: readers take read copies (under release consistency the barrier that follows
    // drops them again where the owner writes the page: what `refetch` cases time).
    gallocy::barrier();
    if case.readers.contains(&rank) {
        for (i, &p) in pages.iter().enumerate() {
            // SAFETY: shared-heap address; a read of a page not held faults into the runtime,
            // which fetches a read copy and resumes.
            let v = unsafe { read_volatile(p as *const u64) };
            check("reader set-up", i, v, tag(c, i));
        }
    }
    gallocy::barrier();

    // Timed phase: rank 0 only.
    if rank == 0 {
        let before = gallocy::stats();
        let mut h = new_histogram();
        for (i, &p) in pages.iter().enumerate() {
            let t0;
            let t1;
            let mut v = 0;
            if case.write {
                compiler_fence(SeqCst);
                t0 = now_ns();
                compiler_fence(SeqCst);
                // SAFETY: shared-heap address rank 0 does not hold; the write faults into the
                // runtime, which makes this rank the writable owner and resumes.
                unsafe { write_volatile(p as *mut u64, wtag(c, i)) };
                compiler_fence(SeqCst);
                t1 = now_ns();
                compiler_fence(SeqCst);
            } else {
                compiler_fence(SeqCst);
                t0 = now_ns();
                compiler_fence(SeqCst);
                // SAFETY: as above, for a read fault.
                v = unsafe { read_volatile(p as *const u64) };
                compiler_fence(SeqCst);
                t1 = now_ns();
                compiler_fence(SeqCst);
            }
            if !case.write {
                check("timed read", i, v, tag(c, i));
            }
            if i >= warmup {
                h.saturating_record((t1 - t0).max(1));
            }
        }
        let after = gallocy::stats();
        let faults =
            if case.write { after.write_faults - before.write_faults } else { after.read_faults - before.read_faults };
        let note = format!(
            "owner={} home={} copies={} runtime_{}_faults={}",
            case.owner,
            case.home,
            case.readers.len(),
            if case.write { "write" } else { "read" },
            faults
        );
        println!("{}", Summary::from_histogram(case.name, &h, &note).to_record());
    }
    gallocy::barrier();

    // Coherence check (untimed): after rank 0's writes, the old owner and the old readers see
    // rank 0's value at offset 0 and the owner's original data at offset 8.
    if case.write && (rank == case.owner || case.readers.contains(&rank)) {
        let step = (pages.len() / 64).max(1);
        for i in (0..pages.len()).step_by(step) {
            let p = pages[i];
            // SAFETY: shared-heap addresses; reads fault into the runtime as needed.
            let (a, b) = unsafe { (read_volatile(p as *const u64), read_volatile((p + 8) as *const u64)) };
            check("after-write offset 0", i, a, wtag(c, i));
            check("after-write offset 8", i, b, tag(c, i));
        }
    }
    if rank == 0 && case.write {
        for (i, &p) in pages.iter().enumerate().step_by(97) {
            // SAFETY: rank 0 holds these pages writable now.
            let b = unsafe { read_volatile((p + 8) as *const u64) };
            check("write fault data", i, b, tag(c, i));
        }
    }
    gallocy::barrier();
    Ok(errors)
}

/// Lock ids of the synchronization cases: their home is rank 1 (`id % N`), not the timing rank.
const CONTENDED_LOCK: u32 = 1;
const UNCONTENDED_LOCK: u32 = 3;

/// The synchronization cases, timed by rank 0 (every rank takes part): `barrier` (one barrier
/// of all ranks), `lock_contended` (every rank takes one global lock in turn, adds 1 to a shared
/// counter, releases; per lock + unlock) and `lock_uncontended` (rank 0 alone takes and releases
/// a lock whose home is rank 1, again and again). Returns the number of check failures.
fn run_sync(rank: usize, iters: usize, warmup: usize) -> usize {
    let ranks = gallocy::size();
    let counter = gallocy::alloc_collective(8) as *mut u64;
    let mut errors = 0;
    let timed = |name: &str, h: &hdrhistogram::Histogram<u64>, note: &str| {
        if rank == 0 {
            println!("{}", Summary::from_histogram(name, h, note).to_record());
        }
    };

    gallocy::barrier();
    let mut h = new_histogram();
    for i in 0..warmup + iters {
        let t0 = now_ns();
        gallocy::barrier();
        let t1 = now_ns();
        if i >= warmup {
            h.saturating_record((t1 - t0).max(1));
        }
    }
    timed("barrier", &h, &format!("ranks={ranks} dissemination"));

    gallocy::barrier();
    let mut h = new_histogram();
    for i in 0..warmup + iters {
        let t0 = now_ns();
        gallocy::lock(CONTENDED_LOCK);
        // SAFETY: `counter` is a live 8-byte collective allocation; the global lock orders the
        // ranks' increments (sequential consistency makes each see the last one).
        unsafe { write_volatile(counter, read_volatile(counter) + 1) };
        gallocy::unlock(CONTENDED_LOCK);
        let t1 = now_ns();
        if i >= warmup {
            h.saturating_record((t1 - t0).max(1));
        }
    }
    gallocy::barrier();
    // SAFETY: as above; every increment is done.
    let total = unsafe { read_volatile(counter) };
    if total != ((warmup + iters) * ranks) as u64 {
        eprintln!("rank {rank}: lock_contended: counter {total}, want {}", (warmup + iters) * ranks);
        errors += 1;
    }
    timed("lock_contended", &h, &format!("ranks={ranks} home=1 lock+increment+unlock"));

    gallocy::barrier();
    if rank == 0 {
        let mut h = new_histogram();
        for i in 0..warmup + iters {
            let t0 = now_ns();
            gallocy::lock(UNCONTENDED_LOCK);
            gallocy::unlock(UNCONTENDED_LOCK);
            let t1 = now_ns();
            if i >= warmup {
                h.saturating_record((t1 - t0).max(1));
            }
        }
        timed("lock_uncontended", &h, &format!("home={} lock+unlock", UNCONTENDED_LOCK as usize % ranks));
    }
    gallocy::barrier();
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picker_takes_disjoint_pages_with_the_right_home_and_arena() {
        let heap = Heap { base: 0x2000_0000_0000, size: 1 << 30, page: 4096, procs: 5 };
        let a = heap.arena_size();
        let home = move |x: usize| ((x - heap.base) / 4096) % 5;
        let arena = move |x: usize| (x - heap.base) / a;
        let mut p = Picker::new(heap, home, arena);
        let mut all = std::collections::HashSet::new();
        for case in CASES {
            let pages = p.take(case.owner, case.home, 1000).unwrap();
            assert_eq!(pages.len(), 1000);
            for &x in &pages {
                assert_eq!(x % 4096, 0);
                assert_eq!(home(x), case.home);
                assert_eq!(arena(x), case.owner);
                assert!(x >= heap.base + case.owner * a + a / 2);
                assert!(all.insert(x), "page {x:#x} handed out twice");
            }
        }
        assert!(p.take(1, 1, 1 << 20).is_err());
    }

    #[test]
    fn min_procs() {
        let m: Vec<usize> = CASES.iter().map(|c| c.min_procs()).collect();
        assert_eq!(m, [2, 3, 2, 3, 5, 2]);
    }
}
