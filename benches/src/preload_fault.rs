//! `gallocy-bench preload-fault`: the remote read fault as a preloaded program pays it.
//!
//! Two children of this executable run as a 2-rank job under `LD_PRELOAD=libgallocy.so` (the
//! program itself does not use the runtime it links: it finds gallocy's C API in the preloaded
//! library with `dlsym`, as any C program would). They join with `gallocy_init` and take a
//! collective block; of its pages, `--pages` whose home is rank 0 are used. Each round rank 0
//! writes them (taking them back, which invalidates rank 1's copies), then rank 1 times its first
//! read of each (one sample per page: a fault, a request to the page's home, which owns it, and
//! the contents, by RDMA READ on RDMA), until `--iters` samples are in. The transport is
//! the job's: `GALLOCY_TRANSPORT` reaches the children.
//!
//! Prints a table and, as the last line of stdout, one JSON object (`{"bench":"preload-fault",
//! ...}`). `benches/rxe-latency.sh` runs it next to `ib_read_lat` and the linked program's fault.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::child::{self, Api, Side};
use crate::net::now_ns;
use crate::report::{new_histogram, table, Num, PreloadFaultLine, Summary, SummaryJson};

/// `gallocy-bench preload-fault --help`, after the options.
pub const HELP: &str = "\
--iters: timed read faults in all; --pages: pages per round (rank 0 rewrites them each round).";

/// `gallocy-bench preload-fault` options.
#[derive(Debug, Clone, Args)]
pub struct PreloadFaultArgs {
    /// Timed read faults in all
    #[arg(long, value_name = "N", default_value_t = 1000)]
    iters: usize,
    /// Pages per round (rank 0 rewrites them each round)
    #[arg(long, value_name = "N", default_value_t = 256)]
    pages: usize,
    /// The library to preload [default: libgallocy.so next to this executable]
    #[arg(long, value_name = "PATH")]
    lib: Option<PathBuf>,
    /// Time limit of the job, in seconds
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 600)]
    timeout_s: u64,
}

/// `__preload-fault-child --joined [--iters N] [--pages N]`
#[derive(Debug, Clone, Args)]
pub struct PreloadFaultChildArgs {
    #[arg(long, default_value_t = 1000)]
    iters: usize,
    #[arg(long, default_value_t = 256)]
    pages: usize,
    #[arg(long)]
    joined: bool,
}

fn check_counts(iters: usize, pages: usize) -> Result<()> {
    if iters == 0 || pages == 0 {
        bail!("--iters and --pages must be at least 1");
    }
    Ok(())
}

/// `gallocy-bench preload-fault ...`.
pub fn cmd(o: PreloadFaultArgs) -> Result<()> {
    check_counts(o.iters, o.pages)?;
    let lib = child::check_lib(&o.lib.clone().map_or_else(child::default_lib, Ok)?)?;
    let transport = std::env::var("GALLOCY_TRANSPORT").unwrap_or_else(|_| "default".into());
    let child_args = vec![
        "__preload-fault-child".to_string(),
        "--iters".into(),
        o.iters.to_string(),
        "--pages".into(),
        o.pages.to_string(),
    ];
    let what = "preloaded read fault (2 ranks)";
    let recs = child::run_side(Side::Joined, &child_args, Some(&lib), what, Duration::from_secs(o.timeout_s))?;
    let s = recs
        .iter()
        .find_map(|l| Summary::parse_record(l))
        .with_context(|| format!("{what}: rank 1 reported no result"))?;
    println!("{}", table(std::slice::from_ref(&s)));
    let line = PreloadFaultLine {
        bench: "preload-fault",
        transport,
        lib: lib.display().to_string(),
        iters: o.iters,
        pages: o.pages,
        read_p50_us: Num(s.p50_us()),
        read_p99_us: Num(s.p99_us()),
        read: SummaryJson::from(&s),
    };
    println!("{}", crate::report::to_line(&line));
    Ok(())
}

/// `__preload-fault-child --joined ...`: one rank of the job; rank 1 prints the record.
pub fn child_main(o: PreloadFaultChildArgs) -> Result<()> {
    check_counts(o.iters, o.pages)?;
    if !o.joined {
        bail!("__preload-fault-child runs as a rank of a joined job");
    }
    let page = child::page_size();
    let api = Api::load()?;
    let rank = api.join(2)?;
    // SAFETY: a plain call into the preloaded library; every rank asks for the same size.
    let base = unsafe { (api.alloc_collective)((2 * o.pages + 2) * page) } as usize;
    if base == 0 {
        bail!("gallocy_alloc_collective returned NULL");
    }
    // Only pages whose home is rank 0, the writer (the home of heap page p is p % size, and the
    // heap starts at a multiple of 64 KiB: even absolute page numbers): the same fault as the
    // linked `fault` benchmark's read_home_owner, where the owner is also the page's home.
    let first = child::align_up(base, 2 * page);
    let pages: Vec<*mut u8> = (0..o.pages).map(|i| (first + 2 * i * page) as *mut u8).collect();
    let mut h = new_histogram();
    // Both ranks go through the same rounds (only rank 1 counts samples).
    let rounds = o.iters.div_ceil(o.pages);
    for r in 0..rounds {
        let round = (r % 250 + 1) as u8;
        if rank == 0 {
            for &p in &pages {
                // SAFETY: `p` is a whole page inside the collective block.
                unsafe { p.write_volatile(round) };
            }
        }
        api.barrier();
        if rank == 1 {
            let n = o.pages.min(o.iters - r * o.pages);
            for (i, &p) in pages.iter().enumerate().take(n) {
                let t0 = now_ns();
                // SAFETY: as above; the read faults and fetches the page from rank 0.
                let v = unsafe { p.read_volatile() };
                let dt = now_ns() - t0;
                if v != round {
                    bail!("page {i} of round {round} reads {v}, rank 0 wrote {round}");
                }
                h.record(dt.max(1)).context("histogram")?;
            }
        }
        api.barrier();
    }
    if rank == 1 {
        let s = Summary::from_histogram("preload_read_fault", &h, &format!("pages/round={}", o.pages));
        println!("{}", s.to_record());
    }
    api.finalize()
}
