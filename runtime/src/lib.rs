//! gallocy: a distributed shared memory runtime (API skeleton; bodies being written).
#![allow(clippy::missing_safety_doc)]

use std::alloc::{GlobalAlloc, Layout};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
}

/// Join the job described by GALLOCY_* (or mpirun/PMI/Slurm) variables. Idempotent.
pub fn init() -> Result<(), Error> { unimplemented!() }
/// This process's rank (0 before init).
pub fn rank() -> usize { unimplemented!() }
/// Number of processes in the job (1 before init).
pub fn size() -> usize { unimplemented!() }
/// Barrier across all processes (one thread per process calls it).
pub fn barrier() { unimplemented!() }
/// Acquire global lock `id` (FIFO across the job).
pub fn lock(_id: u32) { unimplemented!() }
/// Release global lock `id`.
pub fn unlock(_id: u32) { unimplemented!() }
/// Every rank calls with the same size; every rank gets the same zero-filled pointer.
pub fn alloc_collective(_size: usize) -> *mut u8 { unimplemented!() }
/// Copy `buf` of rank `root` into `buf` of every rank (same length everywhere).
pub fn broadcast(_buf: &mut [u8], _root: usize) { unimplemented!() }
/// Print the statistics report now (to stderr).
pub fn stats_print() { unimplemented!() }
/// Barrier, then leave the job (prints statistics when GALLOCY_STATS=1).
pub fn finalize() -> Result<(), Error> { unimplemented!() }
/// Snapshot of this process's counters.
pub fn stats() -> StatsSnapshot { unimplemented!() }
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot { pub read_faults: u64, pub write_faults: u64, pub invalidations_sent: u64, pub invalidations_received: u64, pub bytes_moved: u64, pub fault_p50_us: f64, pub fault_p99_us: f64 }
pub fn heap_base() -> usize { unimplemented!() }
pub fn heap_size() -> usize { unimplemented!() }
pub fn page_size() -> usize { unimplemented!() }
/// Home rank of the page holding `addr`.
pub fn home_of(_addr: usize) -> usize { unimplemented!() }
/// Rank whose arena (allocation region, initial owner) holds `addr`.
pub fn arena_rank_of(_addr: usize) -> usize { unimplemented!() }
pub fn malloc(_size: usize) -> *mut u8 { unimplemented!() }
pub fn calloc(_n: usize, _size: usize) -> *mut u8 { unimplemented!() }
pub unsafe fn realloc(_p: *mut u8, _size: usize) -> *mut u8 { unimplemented!() }
pub fn aligned_alloc(_align: usize, _size: usize) -> *mut u8 { unimplemented!() }
pub unsafe fn free(_p: *mut u8) { unimplemented!() }
pub unsafe fn usable_size(_p: *mut u8) -> usize { unimplemented!() }
pub struct GallocyAlloc;
unsafe impl GlobalAlloc for GallocyAlloc {
    unsafe fn alloc(&self, _l: Layout) -> *mut u8 { unimplemented!() }
    unsafe fn dealloc(&self, _p: *mut u8, _l: Layout) { unimplemented!() }
}
pub mod jacobi;
pub mod launch;
/// Default heap base (see config.rs for the reasoning).
pub const DEFAULT_HEAP_BASE: usize = 0x2000_0000_0000;
/// Default heap size: 16 GiB of address space (memory is committed only when touched).
pub const DEFAULT_HEAP_SIZE: usize = 16 << 30;
