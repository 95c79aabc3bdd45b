//! The public API: joining and leaving the job, the job's shape, statistics, and (in
//! [`sync`] and [`memory`]) synchronization and the shared heap's allocator.

use crate::error::Error;
use crate::heap::alloc::RuntimeScope;
use crate::job::config;
use crate::job::join::{init_as, join};
use crate::job::runtime::{Runtime, RUNTIME};
use crate::stats::StatsSnapshot;

pub mod memory;
pub mod sync;

/// Joins the job described by the environment (`GALLOCY_RANK`/`GALLOCY_SIZE`/`GALLOCY_COORDINATOR`,
/// or the variables `mpirun`, PMI and Slurm set). Without any of them this is a one-process job.
/// Idempotent. Returns once every process of the job has joined.
pub fn init() -> Result<(), Error> {
    if let Some(rt) = RUNTIME.get() {
        return join(rt);
    }
    let _scope = RuntimeScope::enter();
    init_as(config::identity()?)
}

/// The runtime, for a call only members of the job may make (not a forked child of one).
pub(crate) fn member(call: &str) -> &'static Runtime {
    let rt = rt();
    if rt.membership().forked() {
        panic!("gallocy: {call} in a forked child of rank {}: the child is not a member of the job", rt.rank());
    }
    if let Err(e) = join(rt) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    rt
}

pub(crate) fn rt() -> &'static Runtime {
    if let Some(rt) = RUNTIME.get() {
        return rt;
    }
    if let Err(e) = init() {
        eprintln!("{e}");
        std::process::exit(1);
    }
    RUNTIME.get().expect("initialized")
}

/// This process's rank (0 before `init`).
pub fn rank() -> usize {
    RUNTIME.get().map_or(0, |r| r.rank())
}

/// Number of processes in the job (1 before `init`).
pub fn size() -> usize {
    RUNTIME.get().map_or(1, |r| r.size())
}

/// Prints this process's statistics report to stderr now.
pub fn stats_print() {
    if let Some(rt) = RUNTIME.get() {
        let _s = RuntimeScope::enter();
        print_stats(rt);
    }
}

/// The statistics report as one `write` (a launcher that merges the ranks' stderr, like
/// `mpirun`, then never splits the line; `eprintln!` writes the text and its newline apart).
fn print_stats(rt: &Runtime) {
    use std::io::Write;
    let line = format!("{}\n", rt.stats().report(rt.rank(), rt.mappings().stats()));
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A copy of this process's counters.
pub fn stats() -> StatsSnapshot {
    RUNTIME.get().map(|rt| rt.stats().snapshot_with(rt.mappings().stats())).unwrap_or_default()
}

/// Waits for every process (barrier), prints statistics when `GALLOCY_STATS=1`, and leaves the
/// job. Every process must call it before exiting normally: a process that disappears without
/// it is reported as lost by its peers. Afterwards the heap stays mapped with the access this
/// process had; touching a page it did not hold is fatal.
pub fn finalize() -> Result<(), Error> {
    let Some(rt) = RUNTIME.get() else {
        return Ok(());
    };
    if rt.membership().finalized() || rt.membership().leaving() || rt.membership().forked() {
        // A forked child of a member never joined: there is nothing to leave.
        return Ok(());
    }
    if rt.size() > 1 && rt.joined() {
        let _s = RuntimeScope::enter();
        // Nobody waits for a lock this rank keeps after it left.
        sync::give_back_locks(rt);
    }
    sync::barrier();
    let _s = RuntimeScope::enter();
    if rt.settings().stats {
        print_stats(rt);
    }
    if let Some(t) = rt.transport() {
        rt.membership().set_leaving();
        t.say_goodbye().map_err(|e| Error::from(e).on_rank(rt.rank()))?;
        t.wake();
        let deadline = std::time::Instant::now() + rt.settings().peer_timeout;
        while !rt.membership().all_departed() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    rt.membership().set_finalized();
    Ok(())
}

/// First address of the shared heap.
pub fn heap_base() -> usize {
    rt().region().base
}

/// Size of the shared heap in bytes.
pub fn heap_size() -> usize {
    rt().region().size
}

/// The page size (the unit of coherence).
pub fn page_size() -> usize {
    crate::heap::region::page_size()
}

/// The rank that keeps the directory entry of the page holding `addr`.
pub fn home_of(addr: usize) -> usize {
    let rt = rt();
    rt.home(rt.page_of(addr))
}

/// The rank whose arena holds `addr` (that rank allocates there and initially owns its pages).
pub fn arena_rank_of(addr: usize) -> usize {
    let rt = rt();
    rt.arena_rank(rt.page_of(addr))
}
