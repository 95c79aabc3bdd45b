//! The process-wide runtime: every part this process's membership of the job needs, each a
//! small type of its own, reached through accessors.

use std::sync::OnceLock;

use gallocy_transport::local::LocalViews;
use gallocy_transport::Transport;

use crate::engine::link::ServiceLink;
use crate::error::Error;
use crate::fault::gate::Gate;
use crate::fault::slots::Slots;
use crate::heap::alloc::Allocator;
use crate::heap::layout::ArenaLayout;
use crate::heap::mappings::Mappings;
use crate::heap::pagetable::PageTable;
use crate::heap::region::{Access, Region};
use crate::job::collectives::Collectives;
use crate::job::config::{Consistency, Identity, Settings};
use crate::job::membership::Membership;
use crate::protocol::locks::LockCache;
use crate::protocol::{wire, Msg, Placement, Rank};
use crate::release::ReleaseState;
use crate::stats::Stats;
use crate::sys::rawio::{exit_now, write_stderr, RawWriter};

/// The one runtime of this process, once `init` succeeded.
pub static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Protocol version every rank must share.
pub const PROTOCOL_VERSION: u32 = 6;

/// Everything the runtime owns.
pub struct Runtime {
    identity: Identity,
    settings: Settings,
    region: Region,
    pt: PageTable,
    /// The application view's kernel mappings (kept under `vm.max_map_count`).
    mappings: Mappings,
    alloc: Allocator,
    layout: ArenaLayout,
    placement: Placement,
    slots: Slots,
    /// Set when the process joins the job.
    transport: OnceLock<Box<dyn Transport>>,
    membership: Membership,
    gate: Gate,
    service: ServiceLink,
    collectives: Collectives,
    /// The global locks this rank holds or keeps (`protocol::locks`).
    lock_cache: std::sync::Mutex<LockCache>,
    /// Release consistency's twins and page sets; `None` under sequential consistency.
    release: Option<ReleaseState>,
    /// The heaps of same-host peers, read directly (set when joining, unless
    /// `GALLOCY_SAME_HOST_READS=0`).
    local_views: OnceLock<LocalViews>,
    stats: Stats,
}

impl Runtime {
    pub fn new(
        identity: Identity,
        settings: Settings,
        region: Region,
        pt: PageTable,
        layout: ArenaLayout,
    ) -> Result<Runtime, Error> {
        let (start, end) = layout.bytes(identity.rank);
        let collectives = Collectives::new(identity.rank, identity.size);
        // One runtime per process: its table of placed ranges lives as long as the process.
        let placement = layout.placement().with_ranges(settings.placement, Box::leak(Box::default()));
        let placement = match settings.consistency {
            Consistency::Release => placement.with_owner_as_home(),
            Consistency::Sequential => placement,
        };
        let alloc = Allocator::new(region.base, region.size, region.page, region.base + start, region.base + end);
        let (own_first, own_end) = layout.pages(identity.rank);
        let mappings = Mappings::new(region.pages(), own_first, own_end)?;
        let release = match settings.consistency {
            Consistency::Release if identity.size > 1 => Some(ReleaseState::new(region.pages(), region.page)?),
            _ => None,
        };
        Ok(Runtime {
            identity,
            settings,
            region,
            pt,
            mappings,
            alloc,
            placement,
            layout,
            slots: Slots::default(),
            transport: OnceLock::new(),
            membership: Membership::default(),
            gate: Gate::default(),
            service: ServiceLink::default(),
            collectives,
            lock_cache: std::sync::Mutex::new(LockCache::default()),
            release,
            local_views: OnceLock::new(),
            stats: Stats::default(),
        })
    }

    /// The heaps of same-host peers this rank may read directly (once joined; `None` with
    /// `GALLOCY_SAME_HOST_READS=0`).
    #[inline]
    pub fn local_views(&self) -> Option<&LocalViews> {
        self.local_views.get()
    }

    /// Installs the same-host views (once, when joining).
    pub fn set_local_views(&self, v: LocalViews) {
        let _ = self.local_views.set(v);
    }

    /// Release consistency's state on this rank; `None` under sequential consistency.
    #[inline]
    pub fn release(&self) -> Option<&ReleaseState> {
        self.release.as_ref()
    }

    #[inline]
    pub fn rank(&self) -> usize {
        self.identity.rank
    }

    #[inline]
    pub fn size(&self) -> usize {
        self.identity.size
    }

    /// Who this process is in the job.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The heap's address range and views.
    #[inline]
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// This process's access to each page.
    #[inline]
    pub fn pt(&self) -> &PageTable {
        &self.pt
    }

    /// The application view's kernel mappings.
    pub fn mappings(&self) -> &Mappings {
        &self.mappings
    }

    /// Gives `count` pages from `page` the access `access`, in the page table and in the
    /// application view (see [`Mappings::set_access`]); the pages' contents are ready for it.
    /// A protection the kernel refuses ends the process. Async-signal-safe.
    pub fn set_access(&self, page: usize, count: usize, access: Access) {
        if let Err(errno) = self.mappings.set_access(&self.region, &self.pt, page, count, access) {
            protect_failed(self, errno);
        }
    }

    /// Reopens `page`, which this process holds, after a fault on it (see [`Mappings::reopen`]).
    /// Returns whether the view had closed it. Async-signal-safe.
    pub fn reopen(&self, page: usize) -> bool {
        match self.mappings.reopen(&self.region, &self.pt, page) {
            Ok(closed) => closed,
            Err(errno) => protect_failed(self, errno),
        }
    }

    /// The allocator of this rank's arena.
    #[inline]
    pub fn alloc(&self) -> &Allocator {
        &self.alloc
    }

    /// Homes and first owners of pages.
    #[inline]
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Whether this process has joined the job.
    #[inline]
    pub fn joined(&self) -> bool {
        self.membership.joined()
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    pub fn service(&self) -> &ServiceLink {
        &self.service
    }

    pub fn collectives(&self) -> &Collectives {
        &self.collectives
    }

    /// The global locks this rank holds or keeps, for one short step (never held across a wait).
    pub fn lock_cache(&self) -> std::sync::MutexGuard<'_, LockCache> {
        self.lock_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
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

    /// Pages `[first, end)` of this rank's arena.
    pub fn arena_pages(&self) -> (usize, usize) {
        self.layout.pages(self.rank())
    }

    /// The rank that keeps the directory entry of `page`.
    #[inline]
    pub fn home(&self, page: usize) -> usize {
        self.placement.home(page as u64)
    }

    /// The rank whose arena holds `page` (its initial owner).
    #[inline]
    pub fn arena_rank(&self, page: usize) -> usize {
        self.layout.rank_of_page(page)
    }

    /// The page holding heap address `addr`.
    #[inline]
    pub fn page_of(&self, addr: usize) -> usize {
        (addr - self.region.base) / self.region.page
    }

    /// Posts a message from an application thread; the service thread handles it.
    pub fn post(&self, to: Rank, msg: Msg) {
        self.service.post(to, msg);
        self.wake_service();
    }

    /// Sends a message from an application thread: straight to a peer, or through the local
    /// engine when `to` is this process. A peer that cannot be reached is fatal.
    pub fn send_from_app(&self, to: Rank, msg: Msg) {
        self.send_with_payload(to, msg, &[]);
    }

    /// Like [`Runtime::send_from_app`], for a broadcast chunk and its payload.
    pub fn send_with_payload(&self, to: Rank, msg: Msg, payload: &[u8]) {
        if to == self.rank() {
            debug_assert!(payload.is_empty(), "a broadcast never goes to its root");
            return self.post(to, msg);
        }
        let transport = self.transport().expect("a peer implies a transport");
        let mut small = [0u8; 128];
        let sent = if payload.is_empty() {
            match wire::encode(&msg, payload, &mut small) {
                Ok(bytes) => transport.send(to, bytes, None),
                Err(e) => fatal(self, &format!("cannot encode a message: {e}")),
            }
        } else {
            let mut big = vec![0u8; wire::LIMIT];
            match wire::encode(&msg, payload, &mut big) {
                Ok(bytes) => transport.send(to, bytes, None),
                Err(e) => fatal(self, &format!("cannot encode a message: {e}")),
            }
        };
        if let Err(e) = sent {
            fatal_with(self, EXIT_PEER_LOST, &format!("lost contact with rank {to}: {e}"));
        }
    }

    /// Sends an encoded message from an application thread to a peer; a peer that cannot be
    /// reached is fatal.
    pub fn send_encoded(&self, to: Rank, bytes: &[u8]) {
        let transport = self.transport().expect("a peer implies a transport");
        if let Err(e) = transport.send(to, bytes, None) {
            fatal_with(self, EXIT_PEER_LOST, &format!("lost contact with rank {to}: {e}"));
        }
    }

    /// The thread `page` was installed for goes on: from now on the page may be taken from this
    /// process again. A revoke or forward the service thread held back for it (see
    /// [`crate::engine`]) goes out now, not at the service thread's next timed look.
    /// Async-signal-safe.
    pub fn page_resumed(&self, page: usize) {
        self.pt.clear_fresh(page);
        // Paired with the service thread, which marks that it holds messages back and that it
        // waits, then looks at their pages again: either it sees this page resumed, or we see
        // both marks and wake it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.service.has_deferred() && (self.service.sleeping() || self.service.deaf()) {
            if let Some(t) = self.transport() {
                self.service.note_resume_wake();
                t.wake();
            }
        }
    }

    /// Wakes the service thread if it sleeps. Async-signal-safe.
    #[inline]
    pub fn wake_service(&self) {
        if self.service.sleeping() {
            if let Some(t) = self.transport() {
                t.wake();
            }
        }
    }
}

/// Formats and writes a fatal error, then ends the process with status 1. Not for the fault
/// path (it allocates).
pub fn fatal(rt: &Runtime, what: &str) -> ! {
    fatal_with(rt, 1, what)
}

/// Exit status of a process that stops because it lost contact with a peer (the peer, not this
/// process, is the likely cause; `gallocy run` reports other failures first).
pub const EXIT_PEER_LOST: i32 = 75;

/// Like [`fatal`], with a chosen exit status.
pub fn fatal_with(rt: &Runtime, status: i32, what: &str) -> ! {
    let msg = format!("gallocy: rank {}: fatal: {what}\n", rt.rank());
    write_stderr(msg.as_bytes());
    exit_now(status)
}

/// Ends the process after mprotect failed. Async-signal-safe.
pub fn protect_failed(rt: &Runtime, errno: i32) -> ! {
    let mut buf = [0u8; 400];
    let mut w = RawWriter::new(&mut buf);
    w.str("gallocy: rank ").num(rt.rank() as u64).str(": fatal: mprotect failed (errno ").num(errno as u64).str(")");
    if errno == libc::ENOMEM {
        w.str(": the process reached vm.max_map_count (")
            .num(crate::heap::region::max_map_count().unwrap_or(0) as u64)
            .str(" mappings) even with the heap's view closed to one mapping: the program's own mappings use them. Raise the limit, e.g. `sysctl -w vm.max_map_count=1048576`");
    }
    w.str("\n");
    write_stderr(w.as_bytes());
    exit_now(1)
}
