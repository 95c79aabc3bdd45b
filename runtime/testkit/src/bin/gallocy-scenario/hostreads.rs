//! hostreads: pages change hands between ranks of one host, which copy them out of each other's
//! heaps (`gallocy_transport::local`) instead of receiving them over the transport.
//!
//! The ranks share a collective block of `--pages` pages (placed in one block per rank, each
//! rank home and owner of its block). In round r, rank r % ranks writes a new value into every
//! page of its own block, which takes every other copy away, then every rank reads every page and
//! checks it: each read miss asks the page's home, which holds the page, so a requester on its
//! host reads it out of the home's heap. The PASS line gives this rank's read faults, the pages
//! they asked for beyond the faulting one (prefetch), and the pages it read directly.
//! `--no-direct-rank R` makes rank R read no peer's heap itself (`GALLOCY_SAME_HOST_READS=0` for
//! it alone), though its peers still read its own.

use crate::util::{collective, env_rank, mix, vread, vwrite, Args, Outcome};

fn value(i: usize, round: usize, pages: usize) -> u64 {
    mix((round * pages + i) as u64 ^ 0x5eed)
}

/// Before `init()`: rank `--no-direct-rank` turns its own same-host reads off.
pub fn prepare(args: &Args) {
    if args.opt_usize("--no-direct-rank") == Some(env_rank()) {
        // SAFETY: called before any other thread of this process exists.
        unsafe { std::env::set_var("GALLOCY_SAME_HOST_READS", "0") };
    }
}

pub fn hostreads(args: &Args) -> Outcome {
    let (rank, ranks, page) = (gallocy::rank(), gallocy::size(), gallocy::page_size());
    let pages = args.usize_or("--pages", 256);
    let rounds = args.usize_or("--rounds", 2 * ranks);
    let buf = collective(pages * page)?;
    let slot = |i: usize| buf.at(i * page + (i % 7) * 8);
    let mine: Vec<usize> = (0..pages).filter(|i| gallocy::home_of(slot(*i) as usize) == rank).collect();
    if mine.is_empty() {
        return Err(format!("no page of {pages} has this rank as its home"));
    }
    // Every page's value of the round that last wrote it.
    let mut last = vec![usize::MAX; pages];
    let before = gallocy::stats();
    for round in 0..rounds {
        let writer = round % ranks;
        if writer == rank {
            for &i in &mine {
                // SAFETY: inside the collective block; between barriers only this rank, the
                // page's home, writes it.
                unsafe { vwrite(slot(i), value(i, round, pages)) };
            }
        }
        for i in (0..pages).filter(|i| gallocy::home_of(slot(*i) as usize) == writer) {
            last[i] = round;
        }
        gallocy::barrier();
        for (i, &written) in last.iter().enumerate() {
            // SAFETY: inside the collective block; between barriers every rank only reads.
            let got = unsafe { vread(slot(i)) };
            let want = if written == usize::MAX { 0 } else { value(i, written, pages) };
            if got != want {
                return Err(format!("round {round}: page {i} of {pages} holds {got:#x}, expected {want:#x}"));
            }
        }
        gallocy::barrier();
    }
    let s = gallocy::stats();
    Ok(format!(
        "{pages} pages, {rounds} rounds, read faults {}, prefetched {}, pages read directly {}",
        s.read_faults - before.read_faults,
        s.prefetched - before.prefetched,
        s.pages_read_directly - before.pages_read_directly
    ))
}

/// owner-reads (3 ranks): pages whose home is rank 0 change hands between ranks 1 and 2, and rank
/// 0 reads them from whichever holds them. In round r, rank 1 + r % 2 writes every page (it owns
/// them writable), then the other of the two reads them (the home forwards its request to the
/// writer, which keeps a read-only copy), then rank 0 reads them: its own directory sends it to
/// the owner (`ReadFrom`), which answers the read as the protocol owes it. Every read is
/// checked. With `GALLOCY_SAME_HOST_READS=0` and TCP that read is a request the owner answers;
/// the PASS line gives rank 0's read faults and the pages read by request or directly.
pub fn owner_reads(args: &Args) -> Outcome {
    let (rank, ranks, page) = (gallocy::rank(), gallocy::size(), gallocy::page_size());
    if ranks != 3 {
        return Err("owner-reads runs on 3 ranks".into());
    }
    let pages = args.usize_or("--pages", 16);
    let rounds = args.usize_or("--rounds", 4);
    // Three blocks of `pages` pages: the first has rank 0 as its home (block placement).
    let buf = collective(3 * pages * page)?;
    let slot = |i: usize| buf.at(i * page + (i % 7) * 8);
    if let Some(i) = (0..pages).find(|&i| gallocy::home_of(slot(i) as usize) != 0) {
        return Err(format!("page {i}'s home is not rank 0: run with GALLOCY_PLACEMENT=block"));
    }
    let before = gallocy::stats();
    for round in 0..rounds {
        let writer = 1 + round % 2;
        let want = |i: usize| mix((round * pages + i) as u64 ^ 0x0e4d);
        if rank == writer {
            for i in 0..pages {
                // SAFETY: inside the collective block; between barriers only the writer writes.
                unsafe { vwrite(slot(i), want(i)) };
            }
        }
        gallocy::barrier();
        // The other reader first, then rank 0.
        for turn in [3 - writer, 0] {
            if rank == turn {
                for i in 0..pages {
                    // SAFETY: inside the collective block; between barriers every rank only reads.
                    let got = unsafe { vread(slot(i)) };
                    if got != want(i) {
                        return Err(format!("round {round}: page {i} holds {got:#x}, expected {:#x}", want(i)));
                    }
                }
            }
            gallocy::barrier();
        }
    }
    let s = gallocy::stats();
    Ok(format!(
        "{pages} pages, {rounds} rounds, read faults {}, pages read by request {}, pages read directly {}",
        s.read_faults - before.read_faults,
        s.pages_read_by_request - before.pages_read_by_request,
        s.pages_read_directly - before.pages_read_directly
    ))
}
