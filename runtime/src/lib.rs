//! gallocy: a distributed shared memory runtime.
//!
//! Every process of a job maps one heap at the same virtual addresses, so a pointer made in one
//! process is valid in all of them. Pages a process does not hold are mapped with no access;
//! touching one faults inside the process, and the runtime fetches the latest contents from the
//! page's owner and resumes the thread (sequential consistency, one writer or many readers per
//! page). See the README for the environment variables and `docs/protocol.md` for the protocol.
//!
//! ```no_run
//! gallocy::init().expect("join the job");
//! let counter = gallocy::alloc_collective(8) as *mut u64; // same pointer on every rank
//! gallocy::lock(1);
//! unsafe { *counter += 1 };
//! gallocy::unlock(1);
//! gallocy::barrier();
//! gallocy::finalize().unwrap();
//! ```
//!
//! The parts, each in one place:
//! - [`protocol`]: the coherence protocol as pure state machines, and its wire format;
//! - `engine`: the service thread that drives the protocol;
//! - `fault`: the fault path (the SIGSEGV handler and everything it may run);
//! - `heap`: the heap's mappings, page table, arena layout and allocator;
//! - `job`: configuration, joining, membership, the runtime that holds every part;
//! - `api`: the public functions re-exported here; [`preload`]: hooks for the `LD_PRELOAD` shim.

mod api;
mod engine;
mod error;
mod fault;
mod heap;
mod job;
pub mod preload;
pub mod protocol;
mod release;
mod stats;
mod sys;

pub use api::memory::{aligned_alloc, calloc, free, malloc, realloc, usable_size, GallocyAlloc};
pub use api::sync::{alloc_collective, barrier, broadcast, lock, unlock};
pub use api::{
    arena_rank_of, finalize, heap_base, heap_size, home_of, init, page_size, rank, size, stats, stats_print,
};
pub use error::Error;
pub use fault::handler::prepare_thread;
pub use heap::alloc::AllocError;
pub use job::config::{DEFAULT_HEAP_BASE, DEFAULT_HEAP_SIZE, DEFAULT_SPIN_US, MAX_PROCESSES};
pub use job::runtime::EXIT_PEER_LOST;
pub use stats::StatsSnapshot;
pub use sys::rawio::exit_now;

/// The start-up report's decoder (rank 0's judgement of the peers' hellos), for the fuzz targets
/// in `runtime/fuzz`: not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::job::bootstrap::{judge, Hello};
}

/// Whether the calling thread is inside gallocy's SIGSEGV handler resolving a heap fault, and
/// an end to the process if so: for allocators that refuse to serve the fault path (which must
/// never allocate), the shim's and test programs': not part of the API.
#[doc(hidden)]
pub use fault::handler::refuse_on_fault_path;

/// A peer that knows the job's token but breaks the protocol, for the malicious-peer tests
/// (`gallocy-scenario hostile`): not part of the API.
#[doc(hidden)]
pub mod hostile {
    use crate::protocol::{wire, Msg, Page};

    /// The heap page that holds `addr`, and its home rank.
    pub fn page_of(addr: usize) -> (Page, usize) {
        let rt = crate::api::rt();
        let page = (addr - rt.region().base) / rt.region().page;
        (page as Page, rt.home(page))
    }

    /// Sends `msg` to rank `to` through this process's transport, authenticated like every frame,
    /// with the contents of the page it names attached if `with_page`.
    pub fn send(to: usize, msg: &Msg, with_page: bool) -> Result<(), String> {
        let rt = crate::api::rt();
        let transport = rt.transport().ok_or("a one-process job has no peers")?;
        let mut buf = [0u8; 64];
        let bytes = wire::encode(msg, &[], &mut buf).map_err(|e| e.to_string())?;
        let len = rt.region().page as u32;
        let span = with_page.then(|| gallocy_transport::Span { offset: msg.page().unwrap_or(0) * u64::from(len), len });
        transport.send(to, bytes, span).map_err(|e| e.to_string())
    }

    /// Reads heap page `page` of rank `to` into this process's runtime view, as a `ReadFrom`
    /// grant would make it (over TCP a read request that rank answers, over RDMA a one-sided
    /// READ), though no grant asked for it.
    pub fn read(to: usize, page: Page) -> Result<(), String> {
        let rt = crate::api::rt();
        let transport = rt.transport().ok_or("a one-process job has no peers")?;
        let len = rt.region().page as u32;
        let span = gallocy_transport::Span { offset: page * u64::from(len), len };
        transport.start_read(to, span, page).map_err(|e| e.to_string())
    }

    /// Sends `msg` with `payload` (a broadcast chunk or a diff) to rank `to`, authenticated.
    pub fn send_with_payload(to: usize, msg: &Msg, payload: &[u8]) -> Result<(), String> {
        let rt = crate::api::rt();
        let transport = rt.transport().ok_or("a one-process job has no peers")?;
        let mut buf = vec![0u8; wire::LIMIT];
        let bytes = wire::encode(msg, payload, &mut buf).map_err(|e| e.to_string())?;
        transport.send(to, bytes, None).map_err(|e| e.to_string())
    }
}

/// This build has the RDMA transport (cargo feature `rdma`).
pub const RDMA_BUILT: bool = cfg!(feature = "rdma");
