//! Registered message buffers, sized by use: a peer gets a few when its connection is made (on
//! first use, see [`super::links`]), and a peer that turns out to be busy gets the full set once,
//! from the service thread.
//!
//! A job of N ranks used to pin `N × (256 + 128)` KiB per process, whether or not two ranks
//! ever spoke: 384 MiB at 1024 ranks. Now every connected peer costs [`RECV_FIRST`] receive and
//! [`SEND_FIRST`] send buffers (24 KiB), and at most a bounded number of busy peers
//! ([`BUSY_PEERS`] by default, `GALLOCY_RDMA_BUSY_PEERS`) get [`BUSY_AREA`] more each. A peer
//! that is not busy still gets every message through; it only waits sooner for room.

use std::sync::{Arc, OnceLock};

use sideway::ibverbs::memory_region::{MemoryRegion, RegisterMemoryRegionErrorKind};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;

use super::device::RdmaError;

/// Bytes of one send or receive buffer (one fragment). Control messages are small (pages travel by
/// READ), so small buffers let many be posted: a peer can run far ahead before it has to wait.
pub(super) const BUF: usize = 1024;
/// Receive buffers posted for every peer from the start.
pub(super) const RECV_FIRST: usize = 16;
/// Receive buffers posted for a busy peer. Twice the send depth: the send queue of a peer whose
/// receiver is busy fills (and its sender waits) long before the receiver runs out of buffers.
pub(super) const RECV_DEPTH: usize = 256;
/// Sends and READs in flight to a peer that is not busy (on either side). At most the receive
/// buffers it has from the start: a burst waits here rather than in the peer's RNR retries.
pub(super) const SEND_FIRST: usize = 8;
/// Send-queue entries per peer: sends and READs in flight to a busy peer.
pub(super) const SEND_DEPTH: usize = 128;
/// Peers that may become busy, unless configured otherwise.
pub const BUSY_PEERS: usize = 64;
/// Bytes a busy peer adds: the rest of its receive buffers and a full set of send buffers.
pub(super) const BUSY_AREA: usize = (RECV_DEPTH - RECV_FIRST + SEND_DEPTH) * BUF;

/// One registered, shared, anonymous mapping of buffers.
struct Area {
    base: *mut u8,
    len: usize,
    lkey: u32,
    _mr: Arc<MemoryRegion>,
}

impl Area {
    /// Maps and registers `len` bytes for local writes only. Allocates: not on the fault path.
    fn new(pd: &Arc<ProtectionDomain>, len: usize, what: &'static str) -> Result<Area, RdmaError> {
        // Shared, not private, and not inherited by children: `fork` then never makes a
        // registered page copy-on-write, whether or not the kernel copies pinned pages at fork
        // time (see the module documentation of `rdma`).
        // SAFETY: a fresh shared anonymous mapping; checked for failure below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(RdmaError::verbs(what, std::io::Error::last_os_error()));
        }
        // SAFETY: advice on the mapping made above.
        if unsafe { libc::madvise(base, len, libc::MADV_DONTFORK) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping the mapping made above, which nothing else uses yet.
            unsafe { libc::munmap(base, len) };
            return Err(RdmaError::verbs(what, e));
        }
        let base = base.cast::<u8>();
        // SAFETY: the mapping lives until the Area is dropped, and the region with it.
        let mr = unsafe { pd.reg_mr(base as usize, len, AccessFlags::LocalWrite) }.map_err(|e| {
            // SAFETY: unmapping the mapping made above, which nothing else uses yet.
            unsafe { libc::munmap(base.cast(), len) };
            let io = match e.0 {
                RegisterMemoryRegionErrorKind::Ibverbs(io) => io,
                other => std::io::Error::other(other.to_string()),
            };
            RdmaError::registration(what, io, len)
        })?;
        Ok(Area { base, len, lkey: mr.lkey(), _mr: mr })
    }

    /// Buffer `i` and the key that covers it.
    fn buf(&self, i: usize) -> Option<(*mut u8, u32)> {
        ((i + 1) * BUF <= self.len).then(|| {
            // SAFETY: checked just above: buffer `i` lies inside the mapping.
            (unsafe { self.base.add(i * BUF) }, self.lkey)
        })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: we own this anonymous mapping; the region goes right after (deregistration
        // only unpins, so the order does not matter).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Every peer's message buffers.
pub(super) struct Buffers {
    size: usize,
    /// Per peer, once connected: `[recv: RECV_FIRST][send: SEND_FIRST]`. Set only by the thread
    /// that makes connections; read anywhere.
    first: Box<[OnceLock<Area>]>,
    /// Per peer, once it is busy: `[recv: RECV_DEPTH - RECV_FIRST][send: SEND_DEPTH]`. Set only by
    /// the service thread; read anywhere (`OnceLock::get` is one atomic load).
    busy: Box<[OnceLock<Area>]>,
}

// SAFETY: the raw pointers refer to mappings owned by the areas, which live as long as `self`;
// the buffers' contents are handed out by index under the transport's own rules.
unsafe impl Send for Buffers {}
// SAFETY: as above; `busy` is set once and then only read.
unsafe impl Sync for Buffers {}

impl Buffers {
    /// No buffers yet, for a job of `size` ranks.
    pub(super) fn new(size: usize) -> Buffers {
        Buffers {
            size,
            first: (0..size).map(|_| OnceLock::new()).collect(),
            busy: (0..size).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Bytes the first buffers of one peer take.
    pub(super) const FIRST_LEN: usize = (RECV_FIRST + SEND_FIRST) * BUF;

    /// Gives `peer` its first buffers. Allocates and registers: the connecting thread only.
    pub(super) fn make_first(&self, pd: &Arc<ProtectionDomain>, peer: usize) -> Result<(), RdmaError> {
        if peer >= self.size || self.first[peer].get().is_some() {
            return Ok(());
        }
        let area = Area::new(pd, Self::FIRST_LEN, "registering message buffers")?;
        // Only the connecting thread sets these, so the cell is still empty.
        let _ = self.first[peer].set(area);
        Ok(())
    }

    /// Gives `peer` the full set of buffers. Allocates and registers: service thread only. The
    /// caller posts receive buffers `RECV_FIRST..RECV_DEPTH` afterwards.
    pub(super) fn make_busy(&self, pd: &Arc<ProtectionDomain>, peer: usize) -> Result<(), RdmaError> {
        if self.is_busy(peer) {
            return Ok(());
        }
        let area = Area::new(pd, BUSY_AREA, "registering a busy peer's message buffers")?;
        // Only the service thread sets these, so the cell is still empty.
        let _ = self.busy[peer].set(area);
        Ok(())
    }

    /// `peer` has its full set of buffers. Async-signal-safe.
    pub(super) fn is_busy(&self, peer: usize) -> bool {
        self.busy.get(peer).is_some_and(|b| b.get().is_some())
    }

    /// Receive buffer `i` of `peer` and its key; `None` for a buffer that does not exist.
    /// Async-signal-safe.
    pub(super) fn recv(&self, peer: usize, i: usize) -> Option<(*mut u8, u32)> {
        if peer >= self.size {
            return None;
        }
        if i < RECV_FIRST {
            return self.first[peer].get()?.buf(i);
        }
        (i < RECV_DEPTH).then_some(())?;
        self.busy[peer].get()?.buf(i - RECV_FIRST)
    }

    /// The send buffer of send slot `i` to `peer` and its key: among the first buffers while the
    /// window is `SEND_FIRST` wide (`wide` false), else among the busy buffers. Slots in flight are
    /// consecutive, at most as many as the window, so no two share a buffer; and the first buffers
    /// and the busy ones never overlap when the window widens. Async-signal-safe.
    pub(super) fn send(&self, peer: usize, i: usize, wide: bool) -> Option<(*mut u8, u32)> {
        if peer >= self.size {
            return None;
        }
        if !wide {
            return self.first[peer].get()?.buf(RECV_FIRST + i % SEND_FIRST);
        }
        (i < SEND_DEPTH).then_some(())?;
        self.busy[peer].get()?.buf(RECV_DEPTH - RECV_FIRST + i)
    }

    /// Peers with the full set of buffers.
    pub(super) fn busy_peers(&self) -> Vec<usize> {
        (0..self.size).filter(|p| self.is_busy(*p)).collect()
    }

    /// Bytes registered (pinned) for messages.
    pub(super) fn pinned(&self) -> usize {
        self.first.iter().chain(self.busy.iter()).filter_map(|b| b.get()).map(|a| a.len).sum::<usize>()
    }
}
