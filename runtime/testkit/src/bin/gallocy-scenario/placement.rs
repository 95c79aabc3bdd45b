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
