//! release [--mib M] [--expect]: copies dropped by an invalidation give their memory back.
//!
//! On 2 ranks: rank 0 writes the first M MiB of a collective allocation (block placement: it is
//! their home and owner), rank 1 reads them (read copies), then rank 0 writes them again, which
//! drops rank 1's copies. Rank 1 reports its shared-memory RSS (`RssShmem`) before and after, and
//! the pages the runtime released; with `--expect` it fails unless most of the M MiB went back.
//! Then rank 1 reads the new contents (fetched again into the released pages): they must be exact.

use crate::util::{collective, vread, vwrite, Args, Outcome};

fn rss_shmem_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no RssShmem in /proc/self/status".to_string())
}

pub fn release(args: &Args) -> Outcome {
    let mib = args.usize_or("--mib", 32);
    let expect = args.flag("--expect");
    let (rank, size) = (gallocy::rank(), gallocy::size());
    if size != 2 {
        return Err("release runs on 2 ranks".into());
    }
    let len = mib << 20;
    let page = gallocy::page_size();
    let buf = collective(2 * len)?;
    let word = |p: usize| buf.at(p * page);
    let pages = len / page;
    let fill = |round: u64| {
        for p in 0..pages {
            // SAFETY: the first word of page p of the first half; only rank 0 writes, between
            // barriers.
            unsafe { vwrite(word(p), round << 32 | p as u64) };
        }
    };
    let check = |round: u64| -> Result<(), String> {
        for p in 0..pages {
            // SAFETY: as above; nobody writes meanwhile.
            let got = unsafe { vread(word(p)) };
            if got != round << 32 | p as u64 {
                return Err(format!("page {p}: {got:#x} in round {round}"));
            }
        }
        Ok(())
    };
    if rank == 0 {
        fill(1);
    }
    gallocy::barrier();
    if rank == 1 {
        check(1)?;
    }
    let held = rss_shmem_kib()?;
    let released_before = gallocy::stats().pages_released;
    gallocy::barrier();
    if rank == 0 {
        fill(2);
    }
    gallocy::barrier();
    let dropped = rss_shmem_kib()?;
    let released = gallocy::stats().pages_released - released_before;
    let summary = format!("RssShmem {held} KiB with the copies, {dropped} KiB after; {released} pages released");
    if rank == 1 && expect {
        let back_kib = held.saturating_sub(dropped);
        if (released as usize) < pages * 9 / 10 || (back_kib as usize) < mib * 1024 * 3 / 4 {
            return Err(format!("{summary}: expected most of {pages} pages ({mib} MiB) back"));
        }
    }
    if rank == 1 {
        check(2)?;
    }
    gallocy::barrier();
    Ok(summary)
}

/// contended-release [--pages P] [--rounds R]: copies that go back and forth between writers keep
/// their memory. On 2 ranks, P pages of a collective allocation (block placement: rank 0 is the
/// home of the first half, rank 1 of the second); in every round one rank writes all of them
/// (rank 0 in even rounds, rank 1 in odd ones) and, after a barrier, the other reads and checks
/// them. Each write drops the other rank's copies of the pages it is not the home of, every few
/// ms. Only a copy's first drop gives its memory back (a later one comes within
/// `CONTENDED_NS`): each rank fails if it released more than a tenth of its drops.
pub fn contended_release(args: &Args) -> Outcome {
    let pages = args.usize_or("--pages", 16);
    let rounds = args.usize_or("--rounds", 200) as u64;
    let (rank, size) = (gallocy::rank(), gallocy::size());
    if size != 2 {
        return Err("contended-release runs on 2 ranks".into());
    }
    let page = gallocy::page_size();
    let buf = collective(pages * page)?;
    let word = |p: usize| buf.at(p * page);
    gallocy::barrier();
    let released_before = gallocy::stats().pages_released;
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let writer = (round % 2) as usize;
        if rank == writer {
            for p in 0..pages {
                // SAFETY: the first word of page p; only this round's writer writes, between
                // barriers.
                unsafe { vwrite(word(p), round << 32 | p as u64) };
            }
        }
        gallocy::barrier();
        if rank != writer {
            for p in 0..pages {
                // SAFETY: as above; nobody writes meanwhile.
                let got = unsafe { vread(word(p)) };
                if got != round << 32 | p as u64 {
                    return Err(format!("page {p}: {got:#x} in round {round}"));
                }
            }
        }
        gallocy::barrier();
    }
    let released = gallocy::stats().pages_released - released_before;
    // This rank's copies of the other half are dropped in every round the other rank writes.
    let drops = rounds / 2 * (pages / 2) as u64;
    let per_round = started.elapsed().as_secs_f64() * 1e3 / rounds.max(1) as f64;
    let summary = format!("{released} pages released in {drops} drops of a copy, {per_round:.1} ms per round");
    if released * 10 > drops {
        return Err(format!("{summary}: a copy that comes back within ms should keep its memory"));
    }
    Ok(summary)
}

/// freed [--mib M] [--expect]: a freed large block gives its memory back. Every rank mallocs M
/// MiB of its own arena, writes every page, and frees it; it reports its `RssShmem` with the
/// block and after the free, and the pages released. With `--expect` it fails unless most of the
/// M MiB went back. A second block of the same size, written again, reads back exactly.
pub fn freed(args: &Args) -> Outcome {
    let mib = args.usize_or("--mib", 32);
    let expect = args.flag("--expect");
    gallocy::barrier();
    let len = mib << 20;
    let page = gallocy::page_size();
    let rank = gallocy::rank() as u64;
    let fill = |p: *mut u8, tag: u64| {
        for i in (0..len).step_by(page) {
            // SAFETY: inside the live block of `len` bytes at `p`, aligned for u64.
            unsafe { vwrite(p.add(i).cast(), tag << 40 | rank << 32 | i as u64) };
        }
    };
    let block = gallocy::malloc(len);
    if block.is_null() {
        return Err(format!("malloc({len}) returned null"));
    }
    fill(block, 1);
    let held = rss_shmem_kib()?;
    let released_before = gallocy::stats().pages_released;
    // SAFETY: `block` came from gallocy::malloc and is not used afterwards.
    unsafe { gallocy::free(block) };
    let after = rss_shmem_kib()?;
    let released = gallocy::stats().pages_released - released_before;
    let summary = format!("RssShmem {held} KiB with the block, {after} KiB after free; {released} pages released");
    if expect {
        let back_kib = held.saturating_sub(after);
        if (released as usize) < len / page * 9 / 10 || (back_kib as usize) < mib * 1024 * 3 / 4 {
            return Err(format!("{summary}: expected most of {mib} MiB back"));
        }
    }
    let again = gallocy::malloc(len);
    if again.is_null() {
        return Err(format!("malloc({len}) returned null after the free"));
    }
    fill(again, 2);
    for i in (0..len).step_by(page) {
        // SAFETY: as above.
        let got = unsafe { vread(again.add(i).cast()) };
        if got != 2 << 40 | rank << 32 | i as u64 {
            return Err(format!("offset {i} of a block reused after a release reads {got:#x}"));
        }
    }
    // SAFETY: as above.
    unsafe { gallocy::free(again) };
    gallocy::barrier();
    Ok(summary)
}
