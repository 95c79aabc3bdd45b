//! placement: where the pages of a collective allocation live, by `GALLOCY_PLACEMENT`.
//!
//! Every rank checks each page's home (`block`: one block of pages per rank, in rank order;
//! otherwise cyclic), then writes its own block and counts the write faults that took: none with
//! `block` (each rank owns its block from the start), one per page with `first-touch` (a local
//! grant, no data), and one per page on every rank but rank 0 with `cyclic` (rank 0's arena holds
//! them). Then every rank reads every page and checks its contents; then rewrites its own block,
//! which it holds read-only now (write upgrades go in runs: at most one fault per 8 pages, plus
//! one), and everybody checks again.

use crate::util::{collective, mix, Args, Outcome};

pub fn placement(args: &Args) -> Outcome {
    let policy = std::env::var("GALLOCY_PLACEMENT").unwrap_or_else(|_| "block".into());
    let (rank, ranks, page) = (gallocy::rank(), gallocy::size(), gallocy::page_size());
    let pages = args.usize_or("--pages", 48 * ranks);
    let buf = collective(pages * page)?.0;
    let block_of = |i: usize| i * ranks / pages;
    for i in 0..pages {
        let addr = buf + i * page;
        let want = if policy == "block" { block_of(i) } else { ((addr - gallocy::heap_base()) / page) % ranks };
        if gallocy::home_of(addr) != want {
            return Err(format!("{policy}: page {i} of {pages}: home {}, expected {want}", gallocy::home_of(addr)));
        }
    }
    gallocy::barrier();
    let mine: Vec<usize> = (0..pages).filter(|i| block_of(*i) == rank).collect();
    let before = gallocy::stats().write_faults;
    for &i in &mine {
        // SAFETY: inside the collective allocation; this rank writes only its own pages until the
        // barrier.
        unsafe { std::ptr::write_volatile((buf + i * page) as *mut u64, mix(i as u64)) };
    }
    let faults = gallocy::stats().write_faults - before;
    let expected = match policy.as_str() {
        "block" => 0,
        "cyclic" if rank == 0 => 0,
        _ => mine.len() as u64,
    };
    if faults != expected {
        return Err(format!(
            "{policy}: writing its {} own pages took {faults} write faults, expected {expected}",
            mine.len()
        ));
    }
    gallocy::barrier();
    verify(&policy, buf, pages, page, 0)?;
    gallocy::barrier();
    // Every rank holds every page read-only now. Rewriting its own block upgrades runs of up to
    // 8 pages per write fault (the data is here; only the other copies go).
    let before = gallocy::stats().write_faults;
    for &i in &mine {
        // SAFETY: inside the collective allocation; this rank writes only its own pages until the
        // barrier.
        unsafe { std::ptr::write_volatile((buf + i * page + 8) as *mut u64, mix(i as u64 + 1)) };
    }
    let upgrades = gallocy::stats().write_faults - before;
    let most = (mine.len() as u64).div_ceil(8) + 1;
    if upgrades > most {
        return Err(format!(
            "{policy}: rewriting its {} own pages took {upgrades} write faults, expected at most {most}",
            mine.len()
        ));
    }
    gallocy::barrier();
    verify(&policy, buf, pages, page, 1)?;
    gallocy::barrier();
    Ok(format!(
        "{policy}: {pages} pages, {} own, {faults} write faults for them, {upgrades} to rewrite them",
        mine.len()
    ))
}

/// Every page holds its pattern: `mix(i)` first, then 0 (`round` 0) or `mix(i + 1)` (`round` 1).
fn verify(policy: &str, buf: usize, pages: usize, page: usize, round: u64) -> Result<(), String> {
    for i in 0..pages {
        // SAFETY: inside the collective allocation; between barriers every rank only reads.
        let (first, second) = unsafe {
            (
                std::ptr::read_volatile((buf + i * page) as *const u64),
                std::ptr::read_volatile((buf + i * page + 8) as *const u64),
            )
        };
        let want = (mix(i as u64), if round == 0 { 0 } else { mix(i as u64 + 1) });
        if (first, second) != want {
            return Err(format!(
                "{policy}: page {i} holds {first:#x} {second:#x}, expected {:#x} {:#x}",
                want.0, want.1
            ));
        }
    }
    Ok(())
}

/// prefetch-fresh: prefetch never asks for pages that a later collective allocation places.
///
/// Rank 0 allocates a 40- or 44-page block (the last pages its arena handed out, ending inside
/// an aligned block of 8 pages) and writes it. Right after a barrier rank 0 makes a collective
/// allocation, whose fresh pages come next in its arena and are placed in blocks (their homes
/// change), while rank 1 first reads the block's last pages, each after a far page: each of its
/// second misses in the last aligned block would block-prefetch the rest of it, fresh pages
/// included, from their homes before placement (it must prefetch the block's pages below the
/// end, which are in use). Then every rank writes its part of the collective allocation and
/// checks all of it.
pub fn prefetch_fresh(_args: &Args) -> Outcome {
    let (rank, page) = (gallocy::rank(), gallocy::page_size());
    if gallocy::size() != 2 {
        return Err("prefetch-fresh needs 2 ranks".into());
    }
    let page_of = |a: usize| (a - gallocy::heap_base()) / page;
    let mut layout = [0u8; 16];
    if rank == 0 {
        let mut pages = 40;
        let mut p = gallocy::malloc(pages * page) as usize;
        if (page_of(p) + pages) % 8 == 0 {
            // SAFETY: allocated just above, unused.
            unsafe { gallocy::free(p as *mut u8) };
            pages = 44;
            p = gallocy::malloc(pages * page) as usize;
        }
        if p == 0 {
            return Err("malloc failed".into());
        }
        for i in 0..pages {
            // SAFETY: inside the block just allocated.
            unsafe { std::ptr::write_volatile((p + i * page) as *mut u64, mix(i as u64)) };
        }
        layout[..8].copy_from_slice(&(p as u64).to_le_bytes());
        layout[8..].copy_from_slice(&(pages as u64).to_le_bytes());
    }
    gallocy::broadcast(&mut layout, 0);
    let p = u64::from_le_bytes(layout[..8].try_into().expect("8 bytes")) as usize;
    let pages = u64::from_le_bytes(layout[8..].try_into().expect("8 bytes")) as usize;
    let end = page_of(p) + pages;
    gallocy::barrier();
    let prefetched_before = gallocy::stats().prefetched;
    if rank == 1 {
        for k in 0..8 {
            for i in [k, pages - 1 - k] {
                // SAFETY: inside rank 0's block, which nobody writes any more.
                let got = unsafe { std::ptr::read_volatile((p + i * page) as *const u64) };
                if got != mix(i as u64) {
                    return Err(format!("page {i} of rank 0's block reads {got:#x}"));
                }
            }
        }
        // No run forms (every miss is far from the one before), so only block prefetch takes
        // the pages below the block's end that were not read.
        if gallocy::stats().prefetched == prefetched_before {
            return Err("the second misses in the block's last aligned block prefetched nothing".into());
        }
    }
    let parts = 16;
    let buf = collective(parts * page)?.0;
    let first = page_of(buf);
    if first >= end.div_ceil(8) * 8 {
        return Err(format!(
            "the collective allocation starts at page {first}, past the aligned block of rank 0's \
             block's end {end}: the test did not test what it is for"
        ));
    }
    let mine = |i: usize| i * 2 / parts == rank;
    for i in (0..parts).filter(|&i| mine(i)) {
        // SAFETY: inside the collective allocation; each rank writes its own part.
        unsafe { std::ptr::write_volatile((buf + i * page) as *mut u64, mix(1000 + i as u64)) };
    }
    gallocy::barrier();
    for i in 0..parts {
        // SAFETY: as above; after the barrier every rank only reads.
        let got = unsafe { std::ptr::read_volatile((buf + i * page) as *const u64) };
        if got != mix(1000 + i as u64) {
            return Err(format!("page {i} of the collective allocation reads {got:#x}"));
        }
    }
    gallocy::barrier();
    Ok(format!("rank 0's block ends at page {end}, the collective allocation starts at page {first}"))
}

/// upgrade-edge: a write upgrade takes back the pages this rank writes, never its neighbour's.
///
/// A collective allocation of 16 pages in blocks: rank 0 owns pages 0-7, rank 1 pages 8-15.
/// Both write their blocks; then rank 0 reads rank 1's first pages (8-11) and rank 1 reads rank
/// 0's last pages (4-7), so each holds the other's read-only and its own read-only too. Rank 0
/// rewrites its pages 4-7: one write upgrade takes them back in a run, and must stop at page 8,
/// which rank 0 only read. Rank 1 then rereads its own pages 8-11: with no read fault, since it
/// still holds them (before the fix the run went on into them, taking them from rank 1, and the
/// halo of a Jacobi sweep came back one page per fault ever after).
pub fn upgrade_edge(_args: &Args) -> Outcome {
    let (rank, page) = (gallocy::rank(), gallocy::page_size());
    if gallocy::size() != 2 {
        return Err("upgrade-edge needs 2 ranks".into());
    }
    let pages = 16;
    let buf = collective(pages * page)?.0;
    let word = |i: usize| (buf + i * page) as *mut u64;
    let (mine, theirs) = if rank == 0 { (0..8, 8..12) } else { (8..16, 4..8) };
    for i in mine.clone() {
        // SAFETY: inside the collective allocation; this rank writes only its own block.
        unsafe { std::ptr::write_volatile(word(i), mix(i as u64)) };
    }
    gallocy::barrier();
    for i in theirs {
        // SAFETY: inside the collective allocation; nobody writes until the next barrier.
        let got = unsafe { std::ptr::read_volatile(word(i)) };
        if got != mix(i as u64) {
            return Err(format!("page {i} reads {got:#x}, expected {:#x}", mix(i as u64)));
        }
    }
    gallocy::barrier();
    let upgrades_before = gallocy::stats().write_faults;
    if rank == 0 {
        for i in 4..8 {
            // SAFETY: rank 0's own pages; nobody else writes them.
            unsafe { std::ptr::write_volatile(word(i), mix(i as u64 + 1)) };
        }
    }
    let upgrades = gallocy::stats().write_faults - upgrades_before;
    gallocy::barrier();
    let reads_before = gallocy::stats().read_faults;
    if rank == 1 {
        for i in 8..12 {
            // SAFETY: rank 1's own pages; nobody writes until the next barrier.
            let got = unsafe { std::ptr::read_volatile(word(i)) };
            if got != mix(i as u64) {
                return Err(format!("page {i} reads {got:#x}, expected {:#x}", mix(i as u64)));
            }
        }
        let faults = gallocy::stats().read_faults - reads_before;
        if faults != 0 {
            return Err(format!(
                "rereading its own pages 8-11 took {faults} read faults: rank 0's write upgrade of \
                 pages 4-7 took pages it only reads"
            ));
        }
    }
    if rank == 0 && upgrades != 1 {
        return Err(format!("rewriting pages 4-7 took {upgrades} write faults, expected one (a run)"));
    }
    gallocy::barrier();
    for i in 4..8 {
        // SAFETY: inside the collective allocation; nobody writes any more.
        let got = unsafe { std::ptr::read_volatile(word(i)) };
        if got != mix(i as u64 + 1) {
            return Err(format!("page {i} reads {got:#x} after the rewrite, expected {:#x}", mix(i as u64 + 1)));
        }
    }
    gallocy::barrier();
    Ok(format!("rank 0 rewrote pages 4-7 in {upgrades} write fault(s); rank 1 kept its own"))
}
