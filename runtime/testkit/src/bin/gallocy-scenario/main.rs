//! `gallocy-scenario NAME [ARGS]`: end-to-end scenarios for the gallocy runtime.
//!
//! Each scenario joins the job with `gallocy::init()`, does its work on the shared heap, verifies
//! the result, prints a PASS line `rank R: NAME ok (...)` on stdout and leaves with
//! `gallocy::finalize()`. On a verification failure it prints `error: rank R: NAME: ...` on stderr
//! and exits 1 without finalizing (so its peers see it as lost and fail too). A configuration
//! error from `init()` is printed as `error: {e}` and exits 1. Bad usage exits 2.
//!
//! The scenarios are run by the integration tests in `runtime/testkit/tests/`, either through the
//! launcher (`gallocy run -n N -- gallocy-scenario NAME`) or with ranks started directly.

// `x % n == 0` instead of `is_multiple_of`: the workspace supports Rust 1.80.
#![allow(clippy::manual_is_multiple_of)]

mod alloc;
mod faults;
mod fill;
mod hostile;
mod hostreads;
mod interleave;
mod jacobi;
mod litmus;
mod misuse;
mod placement;
mod relaxed;
mod release;
mod scale;
mod soak;
mod stack;
mod sync;
mod util;

use std::alloc::{GlobalAlloc, Layout, System};

use util::{Args, Outcome};

/// Every scenario's allocator: the system's, which refuses to serve gallocy's fault path. The
/// fault path must never allocate (it runs in a signal handler that may have interrupted
/// `malloc`); an allocation there ends the process with one line and SIGABRT, so every scenario
/// the suite runs checks it, whatever misses, prefetches, grants and errors it takes.
struct FaultPathAllocates;

impl FaultPathAllocates {
    fn check() {
        gallocy::refuse_on_fault_path(
            b"gallocy-scenario: an allocation on gallocy's fault path (inside its SIGSEGV handler)\n",
        );
    }
}

// SAFETY: every call is passed on unchanged to the system allocator (after a check that either
// returns or aborts).
unsafe impl GlobalAlloc for FaultPathAllocates {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check();
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::check();
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: FaultPathAllocates = FaultPathAllocates;

const USAGE: &str = "usage: gallocy-scenario NAME [ARGS]

scenarios (all ranks run the same NAME):
  fill64      [--mib M]                      rank 0 fills M MiB (default 64), every rank verifies
  counter     [--total N] [--threads T]      shared counter under gallocy::lock(1)
  relock      [--times N]                    rank 0 re-takes lock 1 locally; then all ranks share it
  lockbatch   [--times N] [--work W] [--min-local-pct P]
                                             all ranks take lock 1 in turn; most takes are local
  pingpong    [--rounds N]                   two ranks write one page alternately
  disjoint    [--rounds N] [--words W]       ranks write disjoint words of one page
  contend     [--ms M] [--threads T] [--changes K] [--cap-ms C]
                                             all threads of all ranks fight over one page
  litmus-mp   [--rounds N]                   message passing litmus test
  litmus-sb   [--rounds N]                   store buffering litmus test
  litmus-iriw [--rounds N]                   independent reads of independent writes (4+ ranks)
  jacobi      [--n N] [--iters I] [--threads T] [--progress] [--slow-ms M] [--report-faults]
  nullderef   [--rank R] [--own-handler]     rank R (default: last) reads address 0 (with the
                                             program's own SIGSEGV handler installed first)
  map-count                                  rank 1 takes all but 64 mappings, then reads 4096
                                             scattered pages: the runtime keeps working
  interleave  [--pages P] [--rounds R]       ranks write interleaved pages of one block (default
                                             1.5 x vm.max_map_count pages), all read and check
  alloc                                      allocator checks (local, threaded, remote free)
  placement   [--pages P]                    homes and first owners of a collective allocation (GALLOCY_PLACEMENT)
  prefetch-fresh                             prefetch never asks for pages a later collective
                                             allocation places (2 ranks)
  upgrade-edge                               a write upgrade's run stops at the neighbour's pages
                                             (2 ranks)
  double-free [--remote]                     frees a pointer twice: must be reported
  misuse      --what W [--rank R]            API misuse on rank R: a clear error, no hang
  release     [--mib M] [--expect]           dropped copies give their memory back (2 ranks)
  freed       [--mib M] [--expect]           a freed large block gives its memory back
  contended-release [--pages P] [--rounds R]  copies going back and forth keep their memory (2 ranks)
  rc-drf      [--rounds N] [--pages P]       data-race-free writers, locks and quiet pages under
                                             GALLOCY_CONSISTENCY=release, checked bit for bit
  rc-random   [--epochs E] [--pages P] [--threads T] [--seed S]
                                             a randomized data-race-free program under
                                             GALLOCY_CONSISTENCY=release, every byte checked
  stack       [--pages P]                    alternate signal stack use of remote faults (2 ranks)
  hostreads   [--pages P] [--rounds R] [--no-direct-rank R]
                                             pages change hands between same-host ranks, which
                                             copy them out of each other's heaps; every read checked
  owner-reads [--pages P] [--rounds R]       rank 0 reads pages it is home of from the rank that
                                             owns them read-only (3 ranks); every read checked
  service-slice                              prints the service thread's nice value and time slice (se.slice)
  scale                                      every kind of traffic once, on a large job (128 ranks)
  hostile     --what W                       rank 1 sends rank 0 an authenticated message the
                                             protocol forbids: a clear error, no hang
  soak        [--secs S] [--window-secs W] [--mib M] [--pages-per-round P]
                                             S s (default 180) of locks, barriers, page traffic
                                             and malloc/free churn; a line per W s window (default
                                             10) with ops, VmRSS and open fds; exact counters
  occupy                                     maps a page inside the heap before init on rank
                                             $SCENARIO_OCCUPY_RANK: init must fail everywhere";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = argv.first().cloned() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let args = match Args::parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) => util::usage_error(&e),
    };
    println!("pid={}", std::process::id());

    // Scenarios with their own flow around init().
    match name.as_str() {
        "occupy" => faults::occupy(&args),
        "nullderef" => faults::nullderef(&args),
        "double-free" => alloc::double_free(&args),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return;
        }
        _ => {}
    }

    let run: fn(&Args) -> Outcome = match name.as_str() {
        "fill64" => fill::fill64,
        "counter" => sync::counter,
        "service-slice" => sync::service_slice,
        "relock" => sync::relock,
        "lockbatch" => sync::lockbatch,
        "pingpong" => sync::pingpong,
        "disjoint" => sync::disjoint,
        "contend" => sync::contend,
        "litmus-mp" => litmus::mp,
        "litmus-sb" => litmus::sb,
        "litmus-iriw" => litmus::iriw,
        "jacobi" => jacobi::jacobi,
        "alloc" => alloc::alloc,
        "placement" => placement::placement,
        "prefetch-fresh" => placement::prefetch_fresh,
        "upgrade-edge" => placement::upgrade_edge,
        "interleave" => interleave::interleave,
        "map-count" => faults::map_count,
        "misuse" => misuse::misuse,
        "soak" => soak::soak,
        "hostile" => hostile::hostile,
        "scale" => scale::scale,
        "release" => release::release,
        "freed" => release::freed,
        "contended-release" => release::contended_release,
        "rc-drf" => relaxed::rc_drf,
        "rc-random" => relaxed::rc_random,
        "stack" => stack::stack,
        "hostreads" => hostreads::hostreads,
        "owner-reads" => hostreads::owner_reads,
        other => util::usage_error(&format!("unknown scenario {other:?}")),
    };

    if name == "hostreads" {
        hostreads::prepare(&args);
    }
    util::init_or_exit();
    let outcome = run(&args);
    util::finish(&name, outcome);
}
