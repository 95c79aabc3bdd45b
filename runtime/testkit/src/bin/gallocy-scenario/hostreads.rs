//! hostreads: pages change hands between ranks of one host, which copy them out of each other's
//! heaps (`gallocy_transport::local`) instead of receiving them over the transport.
//!
//! The ranks share a collective block of `--pages` pages. In round r, rank r % ranks writes a
//! new value into every page (write faults: every other copy goes), then every rank reads every
//! page and checks it (read faults: the owner, a home or a third rank, gives its copy). The PASS
//! line gives this rank's read faults and the pages it read directly. `--no-direct-rank R` makes
//! rank R read no peer's heap itself (`GALLOCY_SAME_HOST_READS=0` for it alone), though its
//! peers still offer it theirs: it must then get every page another way.

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
    let before = gallocy::stats();
    for round in 0..rounds {
        if round % ranks == rank {
            for i in 0..pages {
                // SAFETY: inside the collective block; between barriers only this rank writes.
                unsafe { vwrite(buf.at(i * page + (i % 7) * 8), value(i, round, pages)) };
            }
        }
        gallocy::barrier();
        for i in 0..pages {
            // SAFETY: inside the collective block; between barriers every rank only reads.
            let got = unsafe { vread(buf.at(i * page + (i % 7) * 8)) };
            if got != value(i, round, pages) {
                return Err(format!(
                    "round {round}: page {i} of {pages} holds {got:#x}, expected {:#x}",
                    value(i, round, pages)
                ));
            }
        }
        gallocy::barrier();
    }
    let s = gallocy::stats();
    Ok(format!(
        "{pages} pages, {rounds} rounds, read faults {}, pages read directly {}",
        s.read_faults - before.read_faults,
        s.pages_read_directly - before.pages_read_directly
    ))
}
