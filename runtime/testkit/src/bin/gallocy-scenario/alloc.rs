//! alloc and double-free: the shared-heap allocator.

use crate::util::{collective, init_or_exit, mix, vread, vwrite, Args, Outcome};
use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashSet;
use std::time::Instant;

fn in_heap(p: *mut u8, len: usize) -> bool {
    let (base, size) = (gallocy::heap_base(), gallocy::heap_size());
    let a = p as usize;
    a >= base && a.checked_add(len).is_some_and(|end| end <= base + size)
}

/// Checks every pointer fresh from this rank's allocator must pass.
fn check_block(what: &str, p: *mut u8, len: usize, align: usize) -> Result<(), String> {
    if p.is_null() {
        return Err(format!("{what}: returned null"));
    }
    if (p as usize) % align != 0 {
        return Err(format!("{what}: {p:p} is not {align}-aligned"));
    }
    if !in_heap(p, len) {
        return Err(format!(
            "{what}: {p:p}+{len} lies outside the shared heap {:#x}+{:#x}",
            gallocy::heap_base(),
            gallocy::heap_size()
        ));
    }
    let owner = gallocy::arena_rank_of(p as usize);
    if owner != gallocy::rank() {
        return Err(format!("{what}: {p:p} is in the arena of rank {owner}, not this rank's"));
    }
    // SAFETY: `p` was just returned by the allocator for a live block.
    let usable = unsafe { gallocy::usable_size(p) };
    if usable < len {
        return Err(format!("{what}: usable_size({p:p}) = {usable} < requested {len}"));
    }
    let sane = len.max(16).next_power_of_two() * 2 + gallocy::page_size();
    if usable > sane {
        return Err(format!("{what}: usable_size({p:p}) = {usable}, implausibly large for {len} bytes"));
    }
    Ok(())
}

fn byte(seed: u64, i: usize) -> u8 {
    (mix(seed ^ (i as u64 >> 3)) >> ((i & 7) * 8)) as u8
}

/// Fill `len` bytes at `p` with the pattern of `seed`.
///
/// # Safety
/// `p..p+len` must be a live block owned by the caller.
unsafe fn fill(p: *mut u8, len: usize, seed: u64) {
    // SAFETY: guaranteed by the caller.
    let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = byte(seed, i);
    }
}

/// Check the pattern of `seed` in the first `len` bytes at `p`.
///
/// # Safety
/// `p..p+len` must be a live block.
unsafe fn check(what: &str, p: *const u8, len: usize, seed: u64) -> Result<(), String> {
    // SAFETY: guaranteed by the caller.
    let s = unsafe { std::slice::from_raw_parts(p, len) };
    match (0..len).find(|&i| s[i] != byte(seed, i)) {
        None => Ok(()),
        Some(i) => {
            Err(format!("{what}: byte {i} of the block at {p:p} is {:#04x}, expected {:#04x}", s[i], byte(seed, i)))
        }
    }
}

/// aligned_alloc for every power-of-two alignment 8..=65536 and various sizes; blocks live
/// together, so overlaps show up as corrupted patterns.
fn aligned() -> Result<usize, String> {
    let mut n = 0;
    for shift in 3..=16 {
        let align = 1usize << shift;
        let sizes = [1, 8, 24, align, align + 1, 3 * align, 100_000];
        let mut blocks = Vec::new();
        for (j, &len) in sizes.iter().enumerate() {
            let p = gallocy::aligned_alloc(align, len);
            check_block(&format!("aligned_alloc({align}, {len})"), p, len, align)?;
            let seed = (shift << 8 | j) as u64;
            // SAFETY: fresh block of at least `len` bytes.
            unsafe { fill(p, len, seed) };
            blocks.push((p, len, seed));
            n += 1;
        }
        for &(p, len, seed) in &blocks {
            // SAFETY: the blocks are live until freed below.
            unsafe { check(&format!("aligned_alloc({align}, {len}) block"), p, len, seed)? };
        }
        for (p, _, _) in blocks {
            // SAFETY: each block came from the allocator and is freed once.
            unsafe { gallocy::free(p) };
        }
    }
    Ok(n)
}

/// malloc of many sizes, all live at once.
fn sizes() -> Result<usize, String> {
    let mut lens: Vec<usize> = (1..=64).collect();
    lens.extend([100, 1000, 4095, 4096, 4097, 65536, 65537, 1 << 20, 8 << 20]);
    let mut blocks = Vec::new();
    for (j, &len) in lens.iter().enumerate() {
        let p = gallocy::malloc(len);
        let align = if len >= 16 { 16 } else { 1 };
        check_block(&format!("malloc({len})"), p, len, align)?;
        // SAFETY: fresh block.
        unsafe { fill(p, len, 1000 + j as u64) };
        blocks.push((p, len, 1000 + j as u64));
    }
    let mut sorted: Vec<(usize, usize)> = blocks.iter().map(|&(p, l, _)| (p as usize, l)).collect();
    sorted.sort();
    for w in sorted.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(format!("malloc blocks overlap: {:#x}+{} and {:#x}", w[0].0, w[0].1, w[1].0));
        }
    }
    for &(p, len, seed) in &blocks {
        // SAFETY: live blocks.
        unsafe { check(&format!("malloc({len}) block"), p, len, seed)? };
    }
    for (p, _, _) in blocks {
        // SAFETY: freed once.
        unsafe { gallocy::free(p) };
    }
    Ok(lens.len())
}

/// realloc keeps the contents: small -> large -> huge -> small -> tiny -> small.
fn realloc_chain() -> Result<usize, String> {
    let steps = [10usize, 100_000, 5 << 20, 50, 16, 200, 3000, 1];
    let seed = 77;
    let mut len = steps[0];
    let mut p = gallocy::malloc(len);
    check_block("malloc(10)", p, len, 8)?;
    // SAFETY: fresh block.
    unsafe { fill(p, len, seed) };
    for &next in &steps[1..] {
        // SAFETY: `p` is the live block from the previous step.
        let q = unsafe { gallocy::realloc(p, next) };
        check_block(&format!("realloc({p:p}, {next}) from {len}"), q, next, 8)?;
        let kept = len.min(next);
        // SAFETY: `q` is live with at least `next` >= `kept` bytes.
        unsafe { check(&format!("realloc from {len} to {next}"), q, kept, seed)? };
        // SAFETY: as above.
        unsafe { fill(q, next, seed) };
        p = q;
        len = next;
    }
    // SAFETY: freed once.
    unsafe { gallocy::free(p) };
    Ok(steps.len())
}

/// calloc returns zeroed memory even where a dirty block was just freed; overflow -> null.
fn calloc_zero() -> Result<usize, String> {
    let mut n = 0;
    for &(cnt, sz) in &[(4usize, 4096usize), (1, 24), (100, 3), (1000, 1000), (7, 65536)] {
        let len = cnt * sz;
        let dirty = gallocy::malloc(len);
        check_block(&format!("malloc({len})"), dirty, len, 8)?;
        // SAFETY: fresh block of `len` bytes.
        unsafe { std::ptr::write_bytes(dirty, 0xAB, len) };
        // SAFETY: freed once.
        unsafe { gallocy::free(dirty) };
        let p = gallocy::calloc(cnt, sz);
        check_block(&format!("calloc({cnt}, {sz})"), p, len, 8)?;
        // SAFETY: live block of `len` bytes.
        let s = unsafe { std::slice::from_raw_parts(p, len) };
        if let Some(i) = s.iter().position(|&b| b != 0) {
            return Err(format!("calloc({cnt}, {sz}) = {p:p}: byte {i} is {:#04x}, not zero", s[i]));
        }
        // SAFETY: freed once.
        unsafe { gallocy::free(p) };
        n += 1;
    }
    let huge = gallocy::calloc(usize::MAX / 2 + 1, 2);
    if !huge.is_null() {
        return Err(format!("calloc(usize::MAX/2+1, 2) overflows but returned {huge:p} instead of null"));
    }
    Ok(n + 1)
}

/// The GlobalAlloc implementation, called directly.
fn global_alloc() -> Result<usize, String> {
    let layouts = [(1, 1), (8, 8), (24, 8), (100, 16), (4096, 4096), (10_000, 64), (3, 65536), (1 << 20, 32)];
    for (j, &(size, align)) in layouts.iter().enumerate() {
        let l = Layout::from_size_align(size, align).map_err(|e| e.to_string())?;
        let what = format!("GallocyAlloc.alloc({size}, align {align})");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { gallocy::GallocyAlloc.alloc(l) };
        check_block(&what, p, size, align)?;
        let seed = 500 + j as u64;
        // SAFETY: fresh block of `size` bytes.
        unsafe { fill(p, size, seed) };
        // SAFETY: `p` was allocated with `l`; the new size is non-zero.
        let q = unsafe { gallocy::GallocyAlloc.realloc(p, l, size * 3) };
        check_block(&format!("GallocyAlloc.realloc to {}", size * 3), q, size * 3, align)?;
        // SAFETY: `q` holds at least `size` bytes.
        unsafe { check(&format!("{what} after realloc"), q, size, seed)? };
        let l3 = Layout::from_size_align(size * 3, align).map_err(|e| e.to_string())?;
        // SAFETY: `q` was allocated with layout `l3`.
        unsafe { gallocy::GallocyAlloc.dealloc(q, l3) };

        // SAFETY: non-zero size.
        let z = unsafe { gallocy::GallocyAlloc.alloc_zeroed(l) };
        check_block(&format!("GallocyAlloc.alloc_zeroed({size}, align {align})"), z, size, align)?;
        // SAFETY: live block of `size` bytes.
        if unsafe { std::slice::from_raw_parts(z, size) }.iter().any(|&b| b != 0) {
            return Err(format!("GallocyAlloc.alloc_zeroed({size}, align {align}) is not zeroed"));
        }
        // SAFETY: allocated with `l`.
        unsafe { gallocy::GallocyAlloc.dealloc(z, l) };
    }
    Ok(layouts.len())
}

/// Two threads allocate, fill, verify and free concurrently.
fn threaded(threads: usize, ops: usize) -> Result<usize, String> {
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(), String> {
                    let mut live: Vec<(usize, usize, u64)> = Vec::new();
                    for i in 0..ops {
                        let h = mix(((t as u64) << 40) ^ i as u64);
                        if live.len() >= 64 || (!live.is_empty() && h % 3 == 0) {
                            let (p, len, seed) = live.swap_remove((h >> 8) as usize % live.len());
                            // SAFETY: live block owned by this thread.
                            unsafe { check(&format!("thread {t}"), p as *const u8, len, seed)? };
                            // SAFETY: freed once.
                            unsafe { gallocy::free(p as *mut u8) };
                        } else {
                            let len = if h % 50 == 0 {
                                1 + (h >> 20) as usize % 65536
                            } else {
                                1 + (h >> 20) as usize % 2048
                            };
                            let p = gallocy::malloc(len);
                            check_block(&format!("thread {t}: malloc({len})"), p, len, 1)?;
                            // SAFETY: fresh block.
                            unsafe { fill(p, len, h) };
                            live.push((p as usize, len, h));
                        }
                    }
                    for (p, len, seed) in live {
                        // SAFETY: live block owned by this thread, freed once.
                        unsafe {
                            check(&format!("thread {t}"), p as *const u8, len, seed)?;
                            gallocy::free(p as *mut u8);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
    });
    for r in results {
        r?;
    }
    Ok(threads * ops)
}

const REMOTE_BLOCKS: usize = 1000;

fn remote_len(i: usize) -> usize {
    16 + (i * 37) % 2000
}

/// Every rank mallocs REMOTE_BLOCKS blocks and publishes them in a collective table; rank r then
/// verifies, overwrites and frees the blocks of rank r-1 (remote frees). After a barrier every
/// rank mallocs the same sizes again: the memory must be reused and usable_size sane.
fn remote_free() -> Result<String, String> {
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let table = collective(size * REMOTE_BLOCKS * 8)?;
    let slot = |r: usize, i: usize| table.word(r * REMOTE_BLOCKS + i);
    let mut mine = HashSet::new();
    for i in 0..REMOTE_BLOCKS {
        let len = remote_len(i);
        let p = gallocy::malloc(len);
        check_block(&format!("malloc({len}) for remote free"), p, len, 8)?;
        // SAFETY: fresh block.
        unsafe { fill(p, len, ((rank as u64) << 32) | i as u64) };
        mine.insert(p as usize);
        // SAFETY: the slot is a word of the live collective table; only this rank writes it.
        unsafe { vwrite(slot(rank, i), p as u64) };
    }
    gallocy::barrier();
    let src = (rank + size - 1) % size;
    for i in 0..REMOTE_BLOCKS {
        // SAFETY: as above; rank `src` wrote it before the barrier.
        let p = unsafe { vread(slot(src, i)) } as usize as *mut u8;
        let len = remote_len(i);
        if !in_heap(p, len) {
            return Err(format!("rank {src}'s block {i} is {p:p}, outside the heap"));
        }
        let owner = gallocy::arena_rank_of(p as usize);
        if owner != src {
            return Err(format!("rank {src}'s block {i} at {p:p} is in the arena of rank {owner}"));
        }
        // SAFETY: the block is live (rank `src` allocated it and handed it to us).
        unsafe {
            check(&format!("rank {src}'s block {i} read here"), p, len, ((src as u64) << 32) | i as u64)?;
            fill(p, len, 0xF00D ^ i as u64);
            gallocy::free(p);
        }
    }
    gallocy::barrier();
    // Allocate the same sizes again: some of the blocks freed remotely must come back.
    let mut reused = 0;
    let mut again = Vec::new();
    for attempt in 0..2 {
        for i in 0..REMOTE_BLOCKS {
            let len = remote_len(i);
            let p = gallocy::malloc(len);
            check_block(&format!("malloc({len}) after remote frees"), p, len, 8)?;
            // SAFETY: fresh block.
            unsafe { fill(p, len, i as u64) };
            if mine.contains(&(p as usize)) {
                reused += 1;
            }
            again.push((p, len, i as u64));
        }
        for &(p, len, seed) in &again {
            // SAFETY: live blocks.
            unsafe { check("block allocated after remote frees", p, len, seed)? };
        }
        if reused > 0 || attempt == 1 {
            break;
        }
        // Remote frees may be applied lazily: give them a moment, then try once more.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for (p, _, _) in again {
        // SAFETY: freed once.
        unsafe { gallocy::free(p) };
    }
    gallocy::barrier();
    if reused == 0 {
        return Err(format!(
            "none of the {REMOTE_BLOCKS} blocks freed by rank {} was handed out again by malloc here: remote frees are lost",
            (rank + 1) % size
        ));
    }
    Ok(format!("remote free: {reused} of {REMOTE_BLOCKS} blocks reused"))
}

pub fn alloc(_args: &Args) -> Outcome {
    let t0 = Instant::now();
    let a = aligned()?;
    let s = sizes()?;
    let r = realloc_chain()?;
    let c = calloc_zero()?;
    let g = global_alloc()?;
    let t = threaded(2, 20_000)?;
    gallocy::barrier();
    let remote = remote_free()?;
    Ok(format!(
        "{a} aligned_alloc, {s} malloc sizes, {r} realloc steps, {c} calloc checks, {g} GlobalAlloc layouts, {t} threaded ops, {remote}; {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ))
}

/// Rank 0 frees a block twice (default), or with `--remote` rank 1 frees a block of rank 0
/// twice. The runtime must report it ("double free" / "invalid free") and the job must fail.
/// If the second free returns normally, every rank leaves cleanly and exits 1 with a message
/// that deliberately does not contain those words.
pub fn double_free(args: &Args) -> ! {
    init_or_exit();
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let remote = args.flag("--remote");
    if remote && size < 2 {
        eprintln!("error: double-free --remote needs at least 2 ranks");
        std::process::exit(2);
    }
    let cell = match collective(gallocy::page_size()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: rank {rank}: double-free: {e}");
            std::process::exit(1);
        }
    };
    if rank == 0 {
        let p = gallocy::malloc(64);
        // SAFETY: `cell` is a live collective page; only rank 0 writes it.
        unsafe { vwrite(cell.word(0), p as u64) };
    }
    gallocy::barrier();
    let culprit = if remote { 1 } else { 0 };
    if rank == culprit {
        // SAFETY: rank 0 published the pointer before the barrier.
        let p = unsafe { vread(cell.word(0)) } as usize as *mut u8;
        eprintln!("rank {rank}: double-free: freeing {p:p} (allocated by rank 0) twice");
        // SAFETY: the first free is legitimate; the second is the error under test.
        unsafe {
            gallocy::free(p);
            gallocy::free(p);
        }
    }
    gallocy::barrier();
    // Give an asynchronous report (remote case) a chance to stop the job before we finish.
    std::thread::sleep(std::time::Duration::from_millis(500));
    gallocy::barrier();
    let _ = gallocy::finalize();
    if rank == culprit {
        eprintln!("error: rank {rank}: double-free: the second free() of the same pointer returned normally and the job went on: not detected");
    }
    std::process::exit(1);
}
