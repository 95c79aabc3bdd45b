//! interleave: more pages in mixed states than `vm.max_map_count` allows mappings.
//!
//! The ranks share a collective block of `--pages` pages (default: 1.5 × `vm.max_map_count`)
//! cyclically: rank r writes the pages i with i % ranks == r. After each write phase every rank
//! holds its own pages and not the others', so its view alternates page by page, one kernel
//! mapping each if nothing is done. Then every rank reads every page and checks it. Each of
//! `--rounds` rounds writes new values. The PASS line gives the view's closes, the pages
//! reopened, and the most mappings the heap used (from /proc/self/maps), against the limit.

use crate::util::{collective, mix, vread, vwrite, Args, Outcome};

/// The kernel's limit on mappings per process.
pub fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

/// Mappings of the heap now, from /proc/self/maps.
fn heap_mappings() -> usize {
    let (base, size) = (gallocy::heap_base(), gallocy::heap_size());
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split('-')
                .next()
                .and_then(|a| usize::from_str_radix(a, 16).ok())
                .is_some_and(|a| (base..base + size).contains(&a))
        })
        .count()
}

fn value(i: usize, round: usize, pages: usize) -> u64 {
    mix((round * pages + i) as u64)
}

pub fn interleave(args: &Args) -> Outcome {
    let (rank, ranks, page) = (gallocy::rank(), gallocy::size(), gallocy::page_size());
    let limit = max_map_count();
    let pages = args.usize_or("--pages", limit + limit / 2);
    let rounds = args.usize_or("--rounds", 2);
    let buf = collective(pages * page)?;
    let mut most = heap_mappings();
    for round in 0..rounds {
        for i in (rank..pages).step_by(ranks) {
            // SAFETY: inside the collective block; between barriers only rank i % ranks writes
            // page i.
            unsafe { vwrite(buf.at(i * page), value(i, round, pages)) };
        }
        most = most.max(heap_mappings());
        gallocy::barrier();
        for i in 0..pages {
            // SAFETY: inside the collective block; between barriers every rank only reads.
            let got = unsafe { vread(buf.at(i * page)) };
            if got != value(i, round, pages) {
                return Err(format!(
                    "round {round}: page {i} of {pages} holds {got:#x}, expected {:#x}",
                    value(i, round, pages)
                ));
            }
        }
        most = most.max(heap_mappings());
        gallocy::barrier();
    }
    let s = gallocy::stats();
    Ok(format!(
        "{pages} pages, {rounds} rounds, vm.max_map_count {limit}, heap mappings at most {most}, view closes {}, pages reopened {}",
        s.view_closes, s.pages_reopened
    ))
}
