//! The process-wide runtime: configuration, heap, page table, transport, service thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use gallocy_transport::Transport;

use crate::alloc::Allocator;
use crate::config::{Identity, Settings};
use crate::pagetable::PageTable;
use crate::region::Region;
use crate::slots::Slots;
use crate::stats::Stats;
use crate::wire::Msg;

/// The one runtime of this process, once `init` succeeded.
pub static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Protocol version every rank must share.
pub const PROTOCOL_VERSION: u32 = 1;

/// Everything the runtime owns.
pub struct Runtime {
    pub rank: usize,
    pub size: usize,
    identity: Identity,
    /// The process that joined the job (a forked child, even a `vfork` one, has another pid).
    member_pid: std::sync::atomic::AtomicI32,
    pub settings: Settings,
    pub region: Region,
    pub pt: PageTable,
    pub slots: Slots,
    /// Set when the process joins the job.
    transport: OnceLock<Box<dyn Transport>>,
    /// [`LOCAL`], [`JOINING`] or [`JOINED`].
    pub phase: AtomicU32,
    /// Closed (non-zero) while the heap's mappings change under the application (joining, a
    /// fork snapshot): heap faults wait on this futex word until it opens.
    pub gate: AtomicU32,
    /// Threads inside the fault path's fetch (a fork waits for them to finish).
    pub fetching: AtomicU32,
    /// Service thread pause for a fork snapshot: [`RUN`], [`PAUSE`], [`PAUSED`] (futex word).
    pub service_pause: AtomicU32,
    /// The process is ending (`exit`, `_exit`): a thread that touches a page it does not hold
    /// after the job was left waits for the end instead of failing the process.
    pub exiting: AtomicBool,
    pub stats: Stats,
    pub alloc: Allocator,
    /// Bytes of heap each rank allocates from.
    pub arena_size: usize,
    pub sync: SyncState,
    api_queue: Mutex<VecDeque<(usize, Msg)>>,
    api_pending: AtomicBool,
    pub service_sleeping: AtomicBool,
    /// The service thread waits only for a wake call (local threads are reading the sockets).
    pub service_deaf: AtomicBool,
    /// When a local thread last got its answer by reading the sockets itself.
    pub last_wait_end: AtomicU64,
    /// `finalize` started: peers' departures are expected.
    pub leaving: AtomicBool,
    pub all_departed: AtomicBool,
    pub finalized: AtomicBool,
    /// This process is a forked child of a job member (see `preload::after_fork_child`).
    pub forked: AtomicBool,
    pub barrier_epoch: AtomicU64,
    pub broadcast_seq: AtomicU64,
}

impl Runtime {
    #[allow(clippy::too_many_arguments)]
    pub fn new(identity: Identity, settings: Settings, region: Region, pt: PageTable, arena_size: usize) -> Runtime {
        let (rank, size) = (identity.rank, identity.size);
        let alloc = Allocator::new(region.base, region.size, region.page, rank, arena_size);
        Runtime {
            rank,
            size,
            identity,
            member_pid: std::sync::atomic::AtomicI32::new(0),
            settings,
            region,
            pt,
            slots: Slots::default(),
            transport: OnceLock::new(),
            phase: AtomicU32::new(LOCAL),
            gate: AtomicU32::new(0),
            fetching: AtomicU32::new(0),
            service_pause: AtomicU32::new(RUN),
            exiting: AtomicBool::new(false),
            stats: Stats::default(),
            alloc,
            arena_size,
            sync: SyncState::default(),
            api_queue: Mutex::new(VecDeque::new()),
            api_pending: AtomicBool::new(false),
            service_sleeping: AtomicBool::new(false),
            service_deaf: AtomicBool::new(false),
            last_wait_end: AtomicU64::new(0),
            leaving: AtomicBool::new(false),
            all_departed: AtomicBool::new(false),
            finalized: AtomicBool::new(false),
            forked: AtomicBool::new(false),
            barrier_epoch: AtomicU64::new(0),
            broadcast_seq: AtomicU64::new(0),
        }
    }

    /// The transport, once the process joined the job.
    #[inline]
    pub fn transport(&self) -> Option<&dyn Transport> {
        self.transport.get().map(|t| &**t)
    }

    /// Installs the transport (once, when joining).
    pub fn set_transport(&self, t: Box<dyn Transport>) {
        if self.transport.set(t).is_err() {
            unreachable!("the job is joined once");
        }
    }

    /// Who this process is in the job.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Pages `[first, end)` of this rank's arena.
    pub fn arena_pages(&self) -> (usize, usize) {
        let first = (self.alloc.arena_start - self.region.base) / self.region.page;
        let end = (self.alloc.arena_end - self.region.base) / self.region.page;
        (first, end)
    }

    /// Records the calling process as the one that joined.
    pub fn record_member_pid(&self) {
        // SAFETY: getpid has no preconditions.
        self.member_pid.store(unsafe { libc::getpid() }, Ordering::Release);
    }

    /// Whether the calling process is the one that joined the job (not a child of it, not a
    /// process that never joined). Async-signal-safe.
    pub fn is_joined_member(&self) -> bool {
        // SAFETY: getpid has no preconditions (a raw system call, correct in a vfork child).
        self.joined() && self.member_pid.load(Ordering::Acquire) == unsafe { libc::syscall(libc::SYS_getpid) } as i32
    }

    /// Whether this process has joined the job (and so may fault on, and serve, shared pages).
    #[inline]
    pub fn joined(&self) -> bool {
        self.phase.load(Ordering::Acquire) == JOINED
    }

    /// Closes the heap gate: heap faults wait until [`Runtime::open_gate`].
    pub fn close_gate(&self) {
        self.gate.store(1, Ordering::SeqCst);
    }

    /// Opens the heap gate and wakes the threads waiting at it.
    pub fn open_gate(&self) {
        self.gate.store(0, Ordering::SeqCst);
        crate::futex::wake(&self.gate, i32::MAX);
    }

    /// Waits while the heap gate is closed. Async-signal-safe.
    pub fn wait_at_gate(&self) {
        while self.gate.load(Ordering::SeqCst) != 0 {
            crate::futex::wait(&self.gate, 1, None);
        }
    }

    /// The rank that keeps the directory entry of `page`.
    #[inline]
    pub fn home(&self, page: usize) -> usize {
        page % self.size
    }

    /// The rank whose arena holds `page` (its initial owner).
    #[inline]
    pub fn arena_rank(&self, page: usize) -> usize {
        ((page * self.region.page) / self.arena_size).min(self.size - 1)
    }

    /// Posts a message from an application thread; the service thread sends it to `to`.
    pub fn post(&self, to: usize, msg: Msg) {
        self.api_queue.lock().unwrap_or_else(|p| p.into_inner()).push_back((to, msg));
        self.api_pending.store(true, Ordering::Release);
        self.wake_service();
    }

    /// Sends a message from an application thread: straight to a peer, or through the local
    /// engine when `to` is this process. A peer that cannot be reached is fatal.
    pub fn send_from_app(&self, to: usize, msg: Msg) {
        if to == self.rank {
            return self.post(to, msg);
        }
        let transport = self.transport().expect("a peer implies a transport");
        let mut small = [0u8; 256];
        let sent = match crate::wire::encode(&msg, &mut small) {
            Ok(bytes) => transport.send(to, bytes, None),
            Err(_) => {
                let mut big = vec![0u8; crate::wire::LIMIT];
                match crate::wire::encode(&msg, &mut big) {
                    Ok(bytes) => transport.send(to, bytes, None),
                    Err(e) => fatal(self, &format!("cannot encode a message: {e}")),
                }
            }
        };
        if let Err(e) = sent {
            fatal_with(self, EXIT_PEER_LOST, &format!("lost contact with rank {to}: {e}"));
        }
    }

    pub fn has_api_messages(&self) -> bool {
        self.api_pending.load(Ordering::Acquire)
    }

    pub fn take_api_messages(&self) -> Vec<(usize, Msg)> {
        if !self.api_pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        self.api_queue.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    pub fn slots_posted(&self) -> bool {
        self.slots.has_posted()
    }

    /// Wakes the service thread if it sleeps. Async-signal-safe.
    #[inline]
    pub fn wake_service(&self) {
        if self.service_sleeping.load(Ordering::Acquire) {
            if let Some(t) = self.transport() {
                t.wake();
            }
        }
    }
}

/// Phases of a process in its job: not joined yet (the heap is private memory) ...
pub const LOCAL: u32 = 0;
/// ... joining (the heap becomes shared, the transport connects) ...
pub const JOINING: u32 = 1;
/// ... joined.
pub const JOINED: u32 = 2;

/// Service thread pause states.
pub const RUN: u32 = 0;
pub const PAUSE: u32 = 1;
pub const PAUSED: u32 = 2;

/// Ends the process at once with `status`, like `_exit`, without going through the exported
/// `_exit` symbol (the shim interposes that one to leave the job). Async-signal-safe.
pub fn exit_now(status: i32) -> ! {
    loop {
        // SAFETY: exit_group ends every thread of the process; it does not return.
        unsafe { libc::syscall(libc::SYS_exit_group, status as libc::c_long) };
    }
}

/// Formats and writes a fatal error, then ends the process with status 1. Used by the service
/// thread (may allocate).
pub fn fatal(rt: &Runtime, what: &str) -> ! {
    fatal_with(rt, 1, what)
}

/// Exit status of a process that stops because it lost contact with a peer (the peer, not this
/// process, is the likely cause; `gallocy run` reports other failures first).
pub const EXIT_PEER_LOST: i32 = 75;

/// Like [`fatal`], with a chosen exit status.
pub fn fatal_with(rt: &Runtime, status: i32, what: &str) -> ! {
    let msg = format!("gallocy: rank {}: fatal: {what}\n", rt.rank);
    write_stderr(msg.as_bytes());
    exit_now(status)
}

/// Writes bytes to stderr with one raw write (async-signal-safe).
pub fn write_stderr(b: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2.
    unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
}

/// Ends the process after mprotect failed (async-signal-safe: no allocation).
pub fn protect_failed(rt: &Runtime, errno: i32) -> ! {
    let mut buf = [0u8; 400];
    let mut w = crate::fmt::RawWriter::new(&mut buf);
    w.str("gallocy: rank ").num(rt.rank as u64).str(": fatal: mprotect failed (errno ").num(errno as u64).str(")");
    if errno == libc::ENOMEM {
        w.str(": the process reached vm.max_map_count (")
            .num(crate::region::max_map_count().unwrap_or(0) as u64)
            .str(" mappings); every page with its own protection is one mapping. Raise the limit, e.g. `sysctl -w vm.max_map_count=1048576`");
    }
    w.str("\n");
    write_stderr(w.as_bytes());
    exit_now(1)
}

/// State shared between application threads waiting in collective calls and the service thread.
#[derive(Default)]
pub struct SyncState {
    inner: Mutex<SyncInner>,
    cv: Condvar,
}

#[derive(Default)]
struct SyncInner {
    barrier_released: u64,
    broadcasts: HashMap<u64, Incoming>,
}

struct Incoming {
    data: Vec<u8>,
    received: u64,
}

impl SyncState {
    pub fn barrier_released(&self, epoch: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.barrier_released = g.barrier_released.max(epoch);
        self.cv.notify_all();
    }

    pub fn wait_barrier(&self, epoch: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while g.barrier_released < epoch {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn broadcast_chunk(&self, seq: u64, total: u64, offset: u64, data: &[u8]) -> Result<(), String> {
        if total > (1 << 40) || offset.checked_add(data.len() as u64).is_none_or(|e| e > total) {
            return Err(format!("chunk {offset}+{} outside a broadcast of {total} bytes", data.len()));
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inc = g.broadcasts.entry(seq).or_insert_with(|| Incoming { data: vec![0; total as usize], received: 0 });
        if inc.data.len() as u64 != total {
            return Err(format!("broadcast {seq} changed its length"));
        }
        inc.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        inc.received += data.len() as u64;
        self.cv.notify_all();
        Ok(())
    }

    /// Waits for broadcast `seq` to be complete and takes its bytes.
    pub fn take_broadcast(&self, seq: u64) -> Vec<u8> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(inc) = g.broadcasts.get(&seq) {
                if inc.received >= inc.data.len() as u64 {
                    return g.broadcasts.remove(&seq).expect("present").data;
                }
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}
