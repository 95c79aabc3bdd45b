//! RDMA transport: reliable-connected queue pairs between the pairs of processes that speak,
//! made on first use ([`links`]).
//!
//! - **Page data** moves by one-sided RDMA READ from the owner's registered runtime view straight
//!   into ours ([`Transport::start_read`]); the owner's CPU does nothing.
//! - **Control messages** go by RDMA SEND into receive buffers pre-posted per peer (a message longer
//!   than one buffer is split into fragments; RC keeps them in order). SEND/RECV rather than WRITE
//!   into mailboxes: the receiver learns of a message from its completion queue, which a waiting
//!   thread polls anyway, instead of scanning one mailbox per peer; and an RC queue pair with
//!   infinite RNR retry gives flow control for free (a sender whose receiver has no buffer posted
//!   waits in the hardware, nothing is lost). Buffers follow use ([`buffers`]): a few for every
//!   peer, the full set for a bounded number of busy ones.
//! - **Registration** pins memory, so the runtime view is registered in [`CHUNK`]-sized pieces when
//!   a chunk is first read into or read from. A reader learns the owner's key for a chunk once, by
//!   asking the owner's transport (`RkeyQuery`), and caches it. Registration allocates and may
//!   block in the kernel, so only the service thread registers (the message buffers are registered
//!   on the joining thread): never a faulting thread, never `malloc`. A registration that the
//!   locked-memory limit refuses ends the process with [`RdmaError::Memlock`], which names the
//!   limit; its peers then see it leave.
//! - **fork**: everything registered lives in shared mappings marked `MADV_DONTFORK` (the message
//!   buffers here, the heap's runtime view in the runtime), so `fork` never turns a registered page
//!   of the parent copy-on-write, with or without the kernel's copy-on-fork for pinned pages, and
//!   a child sees none of it. `ibv_fork_init` runs before any verbs object exists (it protects the
//!   providers' queue memory on kernels without copy-on-fork, and does nothing on others). A child
//!   inherits the verbs file descriptor, but never uses or destroys a verbs object.
//! - **Completions** are polled by whoever waits: the faulting thread spins on the completion
//!   queues through [`Transport::poll_inline`]; the service thread blocks on the completion channel.
//! - The TCP connections of start-up stay open, unused for data: their closing tells us that a peer
//!   died, exactly as with the TCP transport.

mod buffers;
mod device;
mod links;
mod queues;
mod receivers;
mod setup;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_poll_cq, ibv_post_recv, ibv_post_send, ibv_qp, ibv_recv_wr,
    ibv_req_notify_cq, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wr_opcode,
};
use sideway::ibverbs::completion::{CompletionChannel, CompletionQueue};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair};
use sideway::ibverbs::AccessFlags;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use buffers::BUSY_PEERS;
pub use device::{can_lock_unlimited, check_memlock, memlock_limit, open, OnDemand, Port, RdmaConfig, RdmaError};
pub use setup::{connect, Connected};

use receivers::{Assembly, Held, Receivers, RecvPeer};

use crate::frame::FrameError;
use crate::seal::{Opener, Sealer, Tag, TAG_LEN};
use crate::tcp::TcpTransport;
use crate::{Accept, Event, LostReason, MemoryView, Span, Transport, TransportError};

/// Fragment header ([`WireHead`]): kind, flags, 2 spare, payload length (u32), argument (u64).
const HDR: usize = 16;
/// Payload bytes per fragment: a fragment is its header, its payload and its tag
/// ([`crate::seal`], under keys from the TCP connection's handshake).
const PAYLOAD: usize = BUF - HDR - TAG_LEN;
/// The runtime view is registered in pieces of this size.
pub const CHUNK: usize = 2 << 20;
/// How long a sender waits for a free send-queue entry before it calls the peer lost.
const SEND_STALL: Duration = Duration::from_secs(60);
const NO_TOKEN: u64 = u64::MAX;
/// `Link::lost` markers (stored + 1) besides work-completion statuses: the peer's TCP connection
/// closed without a goodbye; reposting a receive buffer failed.
const LOST_CLOSED: u32 = u32::MAX - 2;
const LOST_POST: u32 = u32::MAX - 3;

/// How often a busy service thread reads the TCP connections too.
const TCP_CHECK_NS: u64 = 1_000_000;

/// Fragment kinds.
const K_MSG: u8 = 1;
const K_PAGE: u8 = 2;
const K_RKEY_QUERY: u8 = 3;
const K_RKEY_REPLY: u8 = 4;
const K_GOODBYE: u8 = 5;
/// This side gave the peer its full set of receive buffers: the peer may widen its window.
const K_BUSY: u8 = 6;
/// Flag: last fragment of a message.
const F_LAST: u8 = 1;

/// A remote key is known (the low 32 bits are the key).
const RKEY_VALID: u64 = 1 << 32;

use buffers::{Buffers, BUF, RECV_DEPTH, RECV_FIRST, SEND_DEPTH, SEND_FIRST};

/// A peer counts as busy once this many of its fragments wait here to be consumed.
const BUSY_BACKLOG: usize = RECV_FIRST / 2;

/// A fragment's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    kind: u8,
    flags: u8,
    arg: u64,
}

/// A fragment header's layout in a send or receive buffer, the same for every kind.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct WireHead {
    kind: u8,
    flags: u8,
    spare: [u8; 2],
    /// Payload bytes after the header.
    len: U32,
    arg: U64,
}

const _: () = assert!(std::mem::size_of::<WireHead>() == HDR);

impl Head {
    /// The header of a fragment carrying `len` payload bytes.
    fn wire(self, len: usize) -> WireHead {
        debug_assert!(len <= PAYLOAD);
        WireHead {
            kind: self.kind,
            flags: self.flags,
            spare: [0; 2],
            len: U32::new(len as u32),
            arg: U64::new(self.arg),
        }
    }

    /// Splits a received fragment into its header and payload, checking that the header is
    /// complete, its spare bytes are zero and its length is the payload's. The kind is not
    /// checked here.
    fn parse(frag: &[u8]) -> Result<(Head, &[u8]), &'static str> {
        let (w, payload) = WireHead::ref_from_prefix(frag).map_err(|_| "fragment shorter than its header")?;
        if w.spare != [0; 2] {
            return Err("fragment header's spare bytes are not zero");
        }
        if usize::try_from(w.len.get()).ok() != Some(payload.len()) {
            return Err("fragment length disagrees with its header");
        }
        Ok((Head { kind: w.kind, flags: w.flags, arg: w.arg.get() }, payload))
    }
}

/// The fragment codec for the fuzz targets in `runtime/fuzz`: not part of the API (re-exported by
/// `crate::fuzzing`).
#[doc(hidden)]
pub mod fuzzing {
    /// `Head::parse`, then the header of what it parsed in its wire form followed by the payload:
    /// the bytes an accepted fragment stands for.
    pub fn fragment_round_trip(frag: &[u8]) -> Result<Vec<u8>, &'static str> {
        use zerocopy::IntoBytes;
        if frag.len() > FRAGMENT_MAX {
            return Err("fragment longer than a receive buffer");
        }
        let (head, payload) = super::Head::parse(frag)?;
        Ok([head.wire(payload.len()).as_bytes(), payload].concat())
    }

    /// The largest fragment (without its tag) a receive buffer holds.
    pub const FRAGMENT_MAX: usize = super::BUF - super::TAG_LEN;

    pub use super::setup::fuzzing::endpoint_round_trip;
}

/// Send side of one peer's queue pair.
struct SendRing {
    /// Entries posted so far.
    posted: u64,
    /// Tags each fragment, in the order they are posted (which is the order they arrive).
    sealer: Option<Sealer>,
    /// The window is SEND_DEPTH wide: both sides gave each other their full set of buffers.
    wide: bool,
}

/// One peer's queue pair and what goes with it.
struct Link {
    qp: BasicQueuePair,
    send: Mutex<SendRing>,
    /// Entries completed so far (completions of one RC send queue arrive in order).
    completed: AtomicU64,
    /// The token of the READ in each send slot, or NO_TOKEN.
    tokens: Box<[AtomicU64]>,
    /// Where the peer's runtime view starts in its address space (set when connected).
    remote_base: AtomicU64,
    /// Per chunk of the peer's view: its key | RKEY_VALID once the peer told us, else 0.
    rkeys: Box<[AtomicU64]>,
    /// The peer said goodbye: errors on its queue pair are expected.
    left: AtomicBool,
    /// A failed work completion on this queue pair (status + 1), 0 if none.
    lost: AtomicU32,
    /// Traffic with this peer outgrew the first buffers: the service thread should make it busy.
    wants_busy: AtomicBool,
    /// The peer gave us its full set of receive buffers (it sent K_BUSY).
    peer_busy: AtomicBool,
    /// The send window is SEND_DEPTH wide (`SendRing::wide`, readable without the lock).
    widened: AtomicBool,
}

impl Link {
    fn raw_qp(&self) -> *mut ibv_qp {
        // SAFETY: the pointer lives as long as `self.qp`, which outlives every use here.
        unsafe { self.qp.qp().as_ptr() }
    }
}

/// Who takes complete messages.
enum Sink<'a, 'b> {
    Service(&'a mut dyn FnMut(Event<'_>)),
    Inline(&'a mut Accept<'b>),
}

/// What happened to one fragment.
enum Step {
    /// Consumed; go on.
    Next,
    /// Consumed, but stop reading this peer (a declined message waits).
    StopAfter,
    /// Not consumed: it waits for the service thread.
    StopBefore,
}

struct Completions {
    /// READs that completed: (peer, token), for the service thread.
    reads_done: VecDeque<(usize, u64)>,
}

/// Registration of the runtime view, chunk by chunk.
struct Chunks {
    /// Per chunk: `lkey << 32 | rkey` once registered, else 0 (keys are never both 0).
    local: Box<[AtomicU64]>,
    count: usize,
    regions: Mutex<Vec<Arc<MemoryRegion>>>,
    /// Reads waiting for a peer's key: (peer, span, token).
    waiting: Mutex<Vec<(usize, Span, u64)>>,
    /// (peer, chunk) whose key we asked for.
    asked: Mutex<HashSet<(usize, u64)>>,
}

/// The RDMA transport's state, shared by its handle ([`RdmaTransport`]) and its connector thread.
pub(crate) struct Shared {
    rank: usize,
    size: usize,
    view: MemoryView,
    tcp: TcpTransport,
    port: Port,
    pd: Arc<ProtectionDomain>,
    channel: Arc<CompletionChannel>,
    cqs: queues::CompletionQueues,
    /// The connections, made on first use.
    conn: links::Connector,
    bufs: Buffers,
    /// Which page contents this process is owed (see [`crate::tcp::PageCheck`]).
    owed: Option<crate::tcp::PageCheck>,
    /// What arrives from each peer, behind the receive lock.
    recv: Receivers,
    /// Bytes of the staging buffer of a peer's receive state (see [`Assembly::staged`]).
    staging: usize,
    completions: Mutex<Completions>,
    /// READs the service thread posted (with a token) whose completion nobody has reaped yet.
    /// Only while there are some does the service thread ask for an event on the send queue's
    /// completions: a READ of the fault path (`read_inline`) is polled by its own thread, and
    /// a wake-up of the service thread for each would only take the CPU from it.
    service_reads: AtomicU64,
    chunks: Chunks,
    /// Some link wants to be busy (see [`Link::wants_busy`]).
    busy_wanted: AtomicBool,
    /// Peers that may become busy, and how many are.
    busy_limit: usize,
    busy_count: AtomicUsize,
    /// Registering a busy peer's buffers failed once: no more tries (the first buffers carry on).
    busy_refused: AtomicBool,
    /// When the service thread last read the TCP connections while busy (ns since the
    /// connector's epoch; see [`RdmaTransport::poll`]).
    tcp_checked: AtomicU64,
}

// SAFETY: the raw pointers (buffers, view) refer to mappings that live as long as the transport;
// all shared mutable state is behind atomics and mutexes, and verbs objects are thread-safe.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// The fragment `frag` from `peer` without its tag, if the tag is right for the next fragment
/// from that peer. Does not move on: a fragment that is not consumed now is checked again later.
/// A wrong tag (or none) loses the peer. Allocation-free.
fn authentic<'f>(peer: usize, opener: Option<&Opener>, frag: &'f [u8]) -> Result<&'f [u8], TransportError> {
    let bad = || lost(peer, LostReason::Protocol(FrameError::BadTag));
    let split = frag.len().checked_sub(TAG_LEN).ok_or_else(bad)?;
    let (body, tag) = frag.split_at(split);
    let tag: &Tag = tag.try_into().map_err(|_| bad())?;
    match opener {
        Some(o) if o.check(&[body], tag) => Ok(body),
        _ => Err(bad()),
    }
}

/// Posts receive buffer `i` of `peer` on `qp`; returns the verbs error code on failure.
/// Async-signal-safe.
fn post_recv_raw(qp: *mut ibv_qp, bufs: &Buffers, peer: usize, i: usize) -> Result<(), i32> {
    let Some((addr, lkey)) = bufs.recv(peer, i) else { return Err(libc::EINVAL) };
    let mut sge = ibv_sge { addr: addr as u64, length: BUF as u32, lkey };
    let mut wr = ibv_recv_wr {
        wr_id: ((peer as u64) << 32) | i as u64,
        next: std::ptr::null_mut(),
        sg_list: &mut sge,
        num_sge: 1,
    };
    let mut bad = std::ptr::null_mut();
    // SAFETY: the QP is live, the work request and its SGE are valid for the call, and the buffer
    // is registered and used by nobody else until its completion.
    match unsafe { ibv_post_recv(qp, &mut wr, &mut bad) } {
        0 => Ok(()),
        rc => Err(rc),
    }
}

fn lost(rank: usize, reason: LostReason) -> TransportError {
    TransportError::PeerLost { rank, reason }
}

fn status_reason(status: u32) -> LostReason {
    LostReason::Completion(status)
}

impl Shared {
    /// The connection to `peer` for sending, made now if there is none. Async-signal-safe.
    fn link(&self, peer: usize) -> Result<&Link, TransportError> {
        self.ready_link(peer)
    }

    /// The connected queue pair to `peer`, if any (for what arrives on it). Async-signal-safe.
    fn made(&self, peer: usize) -> Option<&Link> {
        self.conn.slot(peer).and_then(links::Slot::link)
    }

    fn check_span(&self, span: Span) -> Result<(), TransportError> {
        self.view.check(span, u32::MAX)
    }

    fn check_link(&self, peer: usize, link: &Link) -> Result<(), TransportError> {
        match link.lost.load(Ordering::Acquire) {
            0 => Ok(()),
            s if s - 1 == LOST_CLOSED => Err(lost(peer, LostReason::Closed)),
            s if s - 1 == LOST_POST => Err(lost(peer, LostReason::Verbs("ibv_post_recv failed"))),
            s => Err(lost(peer, status_reason(s - 1))),
        }
    }

    /// Posts one receive buffer for `peer`. Async-signal-safe.
    fn post_recv(&self, peer: usize, link: &Link, i: usize) -> Result<(), TransportError> {
        post_recv_raw(link.raw_qp(), &self.bufs, peer, i)
            .map_err(|_| lost(peer, LostReason::Verbs("ibv_post_recv failed")))
    }

    /// Waits for a free send slot of `link`; returns its index. Async-signal-safe.
    fn slot(&self, peer: usize, link: &Link, ring: &SendRing) -> Result<usize, TransportError> {
        let mut since: Option<Instant> = None;
        let window = if ring.wide { SEND_DEPTH } else { SEND_FIRST } as u64;
        if !ring.wide && ring.posted - link.completed.load(Ordering::Acquire) >= window {
            self.want_busy(peer, link);
        }
        while ring.posted - link.completed.load(Ordering::Acquire) >= window {
            self.reap_sends();
            self.check_link(peer, link)?;
            // The peer may be waiting to send to us just as we wait for it: free our receive
            // buffers so that it can go on (and then take ours).
            self.spill_receives();
            if ring.posted - link.completed.load(Ordering::Acquire) < window {
                break;
            }
            // Instant::now is a vDSO clock read: fine in a signal handler.
            let start = *since.get_or_insert_with(Instant::now);
            if start.elapsed() > SEND_STALL {
                return Err(lost(peer, LostReason::Verbs("send queue stalled (the peer takes no messages)")));
            }
            std::hint::spin_loop();
        }
        Ok((ring.posted % SEND_DEPTH as u64) as usize)
    }

    /// Posts one work request on `link` (the caller holds its send lock). Async-signal-safe.
    fn post(&self, peer: usize, link: &Link, ring: &mut SendRing, wr: &mut ibv_send_wr) -> Result<(), TransportError> {
        wr.wr_id = ((peer as u64) << 48) | (ring.posted & ((1 << 48) - 1));
        wr.send_flags = rdma_mummy_sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and its SGE list are valid for the call; the buffers it
        // names are registered and stay untouched until the completion.
        let rc = unsafe { ibv_post_send(link.raw_qp(), wr, &mut bad) };
        if rc != 0 {
            return Err(lost(peer, LostReason::Verbs("ibv_post_send failed")));
        }
        ring.posted += 1;
        Ok(())
    }

    /// Sends one fragment: header plus `payload` (from any memory; it is copied). Async-signal-safe.
    fn send_fragment(
        &self,
        peer: usize,
        link: &Link,
        ring: &mut SendRing,
        head: Head,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        debug_assert!(payload.len() <= PAYLOAD);
        let wire = head.wire(payload.len());
        let head = wire.as_bytes();
        if ring.sealer.is_none() {
            return Err(lost(peer, LostReason::Verbs("no keys for this queue pair")));
        }
        let i = self.slot(peer, link, ring)?;
        link.tokens[i].store(NO_TOKEN, Ordering::Relaxed);
        let Some((buf, lkey)) = self.bufs.send(peer, i, ring.wide) else {
            return Err(lost(peer, LostReason::Verbs("no send buffer for this slot")));
        };
        // SAFETY: the slot's buffer has BUF bytes and is ours until its completion (slot() saw
        // it completed); header, payload (at most PAYLOAD) and tag fill at most BUF. The tag
        // covers the fragment as it lies in the buffer, as the receiver checks it.
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), buf, HDR);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), buf.add(HDR), payload.len());
            let fragment = std::slice::from_raw_parts(buf, HDR + payload.len());
            let tag = ring.sealer.as_mut().map_or([0; TAG_LEN], |sealer| sealer.seal(&[fragment]));
            std::ptr::copy_nonoverlapping(tag.as_ptr(), buf.add(HDR + payload.len()), TAG_LEN);
        }
        let len = HDR + payload.len() + TAG_LEN;
        let mut sge = ibv_sge { addr: buf as u64, length: len as u32, lkey };
        // SAFETY: an all-zero ibv_send_wr is a valid "nothing set" request.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        self.post(peer, link, ring, &mut wr)
    }

    /// Sends a transport-level fragment on its own.
    fn send_control(&self, peer: usize, kind: u8, arg: u64, payload: &[u8]) -> Result<(), TransportError> {
        let link = self.link(peer)?;
        self.check_link(peer, link)?;
        let mut ring = link.send.lock().unwrap_or_else(|p| p.into_inner());
        self.send_fragment(peer, link, &mut ring, Head { kind, flags: F_LAST, arg }, payload)
    }

    /// Takes send-queue completions: frees slots, records finished READs and failures.
    /// Async-signal-safe; does nothing if another thread is at it.
    fn reap_sends(&self) -> usize {
        let Ok(mut c) = self.completions.try_lock() else { return 0 };
        let mut n = 0;
        loop {
            // SAFETY: an all-zero ibv_wc is a valid value to be overwritten.
            let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
            // SAFETY: the CQ is live and `wcs` has room for 16 entries.
            let got = unsafe { ibv_poll_cq(self.send_cq_raw(), 16, wcs.as_mut_ptr()) };
            if got <= 0 {
                return n;
            }
            for wc in &wcs[..got as usize] {
                let peer = (wc.wr_id >> 48) as usize;
                let seq = wc.wr_id & ((1 << 48) - 1);
                let Some(link) = self.made(peer) else { continue };
                let token = link.tokens[(seq % SEND_DEPTH as u64) as usize].load(Ordering::Relaxed);
                if token != NO_TOKEN {
                    self.service_reads.fetch_sub(1, Ordering::AcqRel);
                }
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    if !link.left.load(Ordering::Acquire) {
                        let _ = link.lost.compare_exchange(0, wc.status + 1, Ordering::AcqRel, Ordering::Acquire);
                    }
                } else if token != NO_TOKEN {
                    // post_read made room for every READ in flight: this never reallocates.
                    debug_assert!(c.reads_done.len() < c.reads_done.capacity());
                    c.reads_done.push_back((peer, token));
                }
                link.completed.fetch_max(seq + 1, Ordering::AcqRel);
                n += 1;
            }
        }
    }

    fn send_cq_raw(&self) -> *mut ibv_cq {
        // SAFETY: the CQ lives as long as the transport.
        unsafe { self.cqs.send().cq().as_ptr() }
    }

    fn recv_cq_raw(&self) -> *mut ibv_cq {
        // SAFETY: the CQ lives as long as the transport.
        unsafe { self.cqs.recv().cq().as_ptr() }
    }

    /// Moves receive completions into the per-peer queues. Async-signal-safe.
    fn take_receives(&self, rx: &mut Held<'_>) {
        loop {
            // SAFETY: an all-zero ibv_wc is a valid value to be overwritten.
            let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
            // SAFETY: the CQ is live and `wcs` has room for 16 entries.
            let got = unsafe { ibv_poll_cq(self.recv_cq_raw(), 16, wcs.as_mut_ptr()) };
            if got <= 0 {
                return;
            }
            for wc in &wcs[..got as usize] {
                let peer = (wc.wr_id >> 32) as usize;
                let i = (wc.wr_id & 0xffff_ffff) as u32;
                let Some(link) = self.made(peer) else { continue };
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    if !link.left.load(Ordering::Acquire) {
                        let _ = link.lost.compare_exchange(0, wc.status + 1, Ordering::AcqRel, Ordering::Acquire);
                    }
                    continue;
                }
                let Some(rp) = rx.get_mut(peer) else {
                    // Made with the queue pair, before it could receive: never missing.
                    let _ = link.lost.compare_exchange(0, LOST_POST + 1, Ordering::AcqRel, Ordering::Acquire);
                    continue;
                };
                // At most RECV_DEPTH buffers are posted per peer: this never reallocates.
                rp.queue.push_back((i, wc.byte_len));
                if rp.queue.len() >= BUSY_BACKLOG && !self.bufs.is_busy(peer) {
                    self.want_busy(peer, link);
                }
            }
        }
    }

    /// Moves every received fragment into its peer's spill area and posts the buffers again.
    /// Async-signal-safe; does nothing if another thread is receiving.
    fn spill_receives(&self) {
        let Some(mut rx) = self.recv.try_lock() else { return };
        self.take_receives(&mut rx);
        for k in 0..rx.len() {
            let Some((peer, rp)) = rx.nth(k) else { continue };
            let Some(link) = self.made(peer) else { continue };
            while let Some(&(i, len)) = rp.queue.front() {
                let Some((buf, _)) = self.bufs.recv(peer, i as usize) else {
                    let _ = link.lost.compare_exchange(0, LOST_POST + 1, Ordering::AcqRel, Ordering::Acquire);
                    break;
                };
                // SAFETY: as in drain_peer: a completed receive's bytes, not yet reposted.
                let frag = unsafe { std::slice::from_raw_parts(buf, (len as usize).min(BUF)) };
                if !rp.spill.push(frag) {
                    break;
                }
                rp.queue.pop_front();
                if post_recv_raw(link.raw_qp(), &self.bufs, peer, i as usize).is_err() {
                    let _ = link.lost.compare_exchange(0, LOST_POST + 1, Ordering::AcqRel, Ordering::Acquire);
                    break;
                }
            }
        }
    }

    /// Consumes the queued fragments of `peer` in order.
    fn drain_peer(&self, peer: usize, rp: &mut RecvPeer, sink: &mut Sink<'_, '_>) -> Result<usize, TransportError> {
        let link = self.made(peer).ok_or(TransportError::NoSuchPeer(peer))?;
        let mut delivered = 0;
        if rp.asm.complete {
            match sink {
                Sink::Inline(_) => return Ok(0),
                Sink::Service(handler) => {
                    handler(Event::Message { from: peer, bytes: &rp.asm.msg, page: rp.asm.page });
                    rp.asm.reset();
                    delivered += 1;
                }
            }
        }
        while let Some(frag) = rp.spill.front() {
            let body = authentic(peer, rp.opener.as_ref(), frag)?;
            let step = self.consume(peer, link, &mut rp.asm, body, sink, &mut delivered)?;
            if matches!(step, Step::StopBefore) {
                return Ok(delivered);
            }
            rp.spill.pop();
            if let Some(o) = rp.opener.as_mut() {
                o.advance();
            }
            if matches!(step, Step::StopAfter) {
                return Ok(delivered);
            }
        }
        while let Some(&(i, len)) = rp.queue.front() {
            let Some((buf, _)) = self.bufs.recv(peer, i as usize) else {
                return Err(lost(peer, LostReason::Verbs("a receive completed in a buffer that does not exist")));
            };
            // SAFETY: the buffer was filled by a completed receive of `len` ≤ BUF bytes and is not
            // reposted before we are done with it.
            let frag = unsafe { std::slice::from_raw_parts(buf, (len as usize).min(BUF)) };
            let body = authentic(peer, rp.opener.as_ref(), frag)?;
            let step = self.consume(peer, link, &mut rp.asm, body, sink, &mut delivered)?;
            if matches!(step, Step::StopBefore) {
                return Ok(delivered);
            }
            rp.queue.pop_front();
            if let Some(o) = rp.opener.as_mut() {
                o.advance();
            }
            self.post_recv(peer, link, i as usize)?;
            if matches!(step, Step::StopAfter) {
                return Ok(delivered);
            }
        }
        Ok(delivered)
    }

    /// Handles one fragment.
    fn consume(
        &self,
        peer: usize,
        link: &Link,
        rp: &mut Assembly,
        frag: &[u8],
        sink: &mut Sink<'_, '_>,
        delivered: &mut usize,
    ) -> Result<Step, TransportError> {
        let bad = |what: &'static str| lost(peer, LostReason::Verbs(what));
        let (Head { kind, flags, arg }, payload) = Head::parse(frag).map_err(bad)?;
        let len = payload.len();
        match kind {
            K_PAGE => {
                let span = Span { offset: arg, len: len as u32 };
                if self.check_span(span).is_err() {
                    return Err(bad("page fragment outside the heap"));
                }
                match &mut rp.page {
                    None => rp.page = Some(span),
                    Some(p)
                        if p.offset + u64::from(p.len) == arg
                            && p.len as usize + len <= crate::frame::MAX_SPAN as usize =>
                    {
                        p.len += len as u32
                    }
                    Some(_) => return Err(bad("page fragments out of order")),
                }
                if self.owed.is_some() {
                    // Staged until the message says the contents are owed.
                    if rp.staged.len() + len > rp.staged.capacity() {
                        return Err(bad("page contents longer than one page"));
                    }
                    rp.staged.extend_from_slice(payload);
                    return Ok(Step::Next);
                }
                // SAFETY: the span lies inside the view (checked); the coherence protocol gives
                // this page to nobody else while it is in flight to us.
                unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), self.view.base.add(arg as usize), len) };
                Ok(Step::Next)
            }
            K_MSG => {
                if rp.msg.len() + len > crate::MAX_MESSAGE {
                    return Err(bad("message longer than the limit"));
                }
                rp.msg.extend_from_slice(payload);
                if flags & F_LAST == 0 {
                    return Ok(Step::Next);
                }
                if let (Some(owed), Some(span), false) = (self.owed, rp.page, rp.landed) {
                    if !owed(peer, &rp.msg, span) {
                        // The fragment stays unconsumed: whoever reads this peer next fails too.
                        rp.msg.truncate(rp.msg.len() - len);
                        return Err(lost(peer, LostReason::Protocol(FrameError::NotOwed(span.offset, span.len))));
                    }
                    // SAFETY: the span lies inside the view (checked when its fragments came), and
                    // the staged bytes are exactly its contents; the protocol gives this page to
                    // nobody else while it is in flight to us.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            rp.staged.as_ptr(),
                            self.view.base.add(span.offset as usize),
                            rp.staged.len(),
                        )
                    };
                    rp.landed = true;
                }
                match sink {
                    Sink::Service(handler) => {
                        handler(Event::Message { from: peer, bytes: &rp.msg, page: rp.page });
                        rp.reset();
                        *delivered += 1;
                        Ok(Step::Next)
                    }
                    Sink::Inline(accept) => {
                        if accept(peer, &rp.msg, rp.page) {
                            rp.reset();
                            *delivered += 1;
                            Ok(Step::Next)
                        } else {
                            rp.complete = true;
                            self.tcp.wake();
                            Ok(Step::StopAfter)
                        }
                    }
                }
            }
            K_BUSY => {
                // Widening the window takes the send lock, which a waiting thread may hold:
                // only flags here; the service thread acts on them.
                link.peer_busy.store(true, Ordering::Release);
                self.want_busy(peer, link);
                Ok(Step::Next)
            }
            K_RKEY_QUERY | K_RKEY_REPLY | K_GOODBYE => {
                let Sink::Service(handler) = sink else {
                    // Registration allocates: only the service thread does it.
                    self.tcp.wake();
                    return Ok(Step::StopBefore);
                };
                match kind {
                    K_RKEY_QUERY => {
                        if arg as usize >= self.chunks.count {
                            return Err(bad("key query for a chunk outside the heap"));
                        }
                        // A refused registration is this process's failure (typically the
                        // memlock limit), not the peer's: it ends with its own error.
                        let keys = self.local_keys(arg)?;
                        let rkey = U32::new((keys & 0xffff_ffff) as u32);
                        self.send_control(peer, K_RKEY_REPLY, arg, rkey.as_bytes())?;
                    }
                    K_RKEY_REPLY => {
                        let rkey = match U32::read_from_bytes(payload) {
                            Ok(rkey) if (arg as usize) < self.chunks.count => rkey.get(),
                            _ => return Err(bad("malformed key reply")),
                        };
                        link.rkeys[arg as usize].store(u64::from(rkey) | RKEY_VALID, Ordering::Release);
                        self.chunks.asked.lock().unwrap_or_else(|p| p.into_inner()).remove(&(peer, arg));
                        self.post_waiting_reads(peer, arg)?;
                    }
                    _ => {
                        link.left.store(true, Ordering::Release);
                        handler(Event::PeerLeft { rank: peer });
                        *delivered += 1;
                    }
                }
                Ok(Step::Next)
            }
            _ => Err(bad("unknown fragment kind")),
        }
    }

    /// The local keys (`lkey << 32 | rkey`) of `chunk`, registering it first if needed.
    /// Allocates: never from a signal handler.
    fn local_keys(&self, chunk: u64) -> Result<u64, TransportError> {
        let c = chunk as usize;
        if c >= self.chunks.count {
            return Err(TransportError::BadSpan { offset: chunk * CHUNK as u64, len: 0 });
        }
        let keys = self.chunks.local[c].load(Ordering::Acquire);
        if keys != 0 {
            return Ok(keys);
        }
        let mut regions = self.chunks.regions.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.chunks.local[c].load(Ordering::Acquire);
        if keys != 0 {
            return Ok(keys);
        }
        let start = c * CHUNK;
        let len = CHUNK.min(self.view.len - start);
        // Peers only ever READ the heap (one-sided reads of pages the protocol grants them): no
        // remote write access. With on-demand paging the registration follows the page tables,
        // so a hole punched in the memfd gives the memory back and a later READ sees the new page.
        let mut access = AccessFlags::LocalWrite | AccessFlags::RemoteRead;
        if self.port.on_demand {
            access |= AccessFlags::OnDemand;
        }
        // SAFETY: the range lies inside the runtime view, which stays mapped as long as the
        // transport (and so the region) lives.
        let mr = unsafe { self.pd.reg_mr(self.view.base as usize + start, len, access) }.map_err(|e| {
            let io = match e.0 {
                sideway::ibverbs::memory_region::RegisterMemoryRegionErrorKind::Ibverbs(io) => io,
                other => std::io::Error::other(other.to_string()),
            };
            // What this process would have pinned: its buffers, the chunks so far, and this one
            // (none of the heap with on-demand paging).
            let heap = if self.port.on_demand { 0 } else { regions.len() * CHUNK + len };
            let pinned = self.bufs.pinned() + heap;
            TransportError::Rdma(RdmaError::registration("registering the heap's runtime view", io, pinned))
        })?;
        let keys = (u64::from(mr.lkey()) << 32) | u64::from(mr.rkey());
        regions.push(mr);
        self.chunks.local[c].store(keys.max(1), Ordering::Release);
        Ok(keys)
    }

    /// Posts the READ of `span` from `peer` whose key for the chunk is known.
    fn post_read(&self, peer: usize, span: Span, token: u64, rkey: u32) -> Result<(), TransportError> {
        let chunk = span.offset / CHUNK as u64;
        let lkey = (self.local_keys(chunk)? >> 32) as u32;
        {
            // Room for every READ that can be in flight, so that no completion is ever dropped
            // (reap_sends, which may run in a signal handler, cannot grow the queue).
            let mut c = self.completions.lock().unwrap_or_else(|p| p.into_inner());
            let room = self.cqs.send_capacity();
            if c.reads_done.capacity() - c.reads_done.len() < room {
                c.reads_done.reserve(room);
            }
        }
        self.service_reads.fetch_add(1, Ordering::AcqRel);
        self.post_read_keys(peer, span, token, lkey, rkey).map(drop).inspect_err(|_| {
            self.service_reads.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Posts the READ of `span` from `peer` with known keys; returns its send sequence number.
    /// Async-signal-safe.
    fn post_read_keys(&self, peer: usize, span: Span, token: u64, lkey: u32, rkey: u32) -> Result<u64, TransportError> {
        self.post_one_sided(ibv_wr_opcode::IBV_WR_RDMA_READ, peer, span, token, lkey, rkey)
    }

    /// Posts a one-sided `opcode` between `span` of our view and the same place of `peer`'s, with
    /// known keys; returns its send sequence number. Async-signal-safe.
    fn post_one_sided(
        &self,
        opcode: ibv_wr_opcode::Type,
        peer: usize,
        span: Span,
        token: u64,
        lkey: u32,
        rkey: u32,
    ) -> Result<u64, TransportError> {
        let link = self.link(peer)?;
        self.check_link(peer, link)?;
        let mut ring = link.send.lock().unwrap_or_else(|p| p.into_inner());
        let i = self.slot(peer, link, &ring)?;
        link.tokens[i].store(token, Ordering::Relaxed);
        // SAFETY: the span lies inside the view (checked by the caller).
        let local = unsafe { self.view.base.add(span.offset as usize) } as u64;
        let mut sge = ibv_sge { addr: local, length: span.len, lkey };
        // SAFETY: an all-zero ibv_send_wr is a valid "nothing set" request.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = opcode;
        wr.wr.rdma.remote_addr = link.remote_base.load(Ordering::Acquire) + span.offset;
        wr.wr.rdma.rkey = rkey;
        self.post(peer, link, &mut ring, &mut wr)?;
        Ok(ring.posted - 1)
    }

    /// Posts an RDMA WRITE of `span` of our view to the same place in `peer`'s, with the peer's
    /// key for the chunk (known from an earlier read). See [`RdmaTransport::post_write_for_test`].
    fn post_write_for_test(&self, peer: usize, span: Span) -> Result<(), TransportError> {
        let chunk = self.chunk_of(span)?;
        let link = self.link(peer)?;
        let rkey = link.rkeys[chunk as usize].load(Ordering::Acquire);
        if rkey & RKEY_VALID == 0 {
            return Err(TransportError::BadSpan { offset: span.offset, len: span.len });
        }
        let lkey = (self.local_keys(chunk)? >> 32) as u32;
        let rkey = (rkey & 0xffff_ffff) as u32;
        self.post_one_sided(ibv_wr_opcode::IBV_WR_RDMA_WRITE, peer, span, NO_TOKEN, lkey, rkey).map(drop)
    }

    /// The chunk of a span that lies within one chunk.
    fn chunk_of(&self, span: Span) -> Result<u64, TransportError> {
        self.check_span(span)?;
        let chunk = span.offset / CHUNK as u64;
        if (span.offset + u64::from(span.len) - 1) / CHUNK as u64 != chunk {
            return Err(TransportError::BadSpan { offset: span.offset, len: span.len });
        }
        Ok(chunk)
    }

    fn post_waiting_reads(&self, peer: usize, chunk: u64) -> Result<(), TransportError> {
        let ready: Vec<(usize, Span, u64)> = {
            let mut w = self.chunks.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let (ready, rest): (Vec<_>, Vec<_>) =
                w.drain(..).partition(|(p, s, _)| *p == peer && s.offset / CHUNK as u64 == chunk);
            *w = rest;
            ready
        };
        let link = self.link(peer)?;
        let rkey = (link.rkeys[chunk as usize].load(Ordering::Acquire) & 0xffff_ffff) as u32;
        for (p, span, token) in ready {
            self.post_read(p, span, token, rkey)?;
        }
        Ok(())
    }

    /// Hands finished READs to `handler`.
    fn report_reads(&self, handler: &mut dyn FnMut(Event<'_>)) -> usize {
        let mut batch = [(0usize, 0u64); 32];
        let mut total = 0;
        loop {
            let n = {
                let mut c = self.completions.lock().unwrap_or_else(|p| p.into_inner());
                let n = c.reads_done.len().min(batch.len());
                for slot in batch.iter_mut().take(n) {
                    *slot = c.reads_done.pop_front().expect("counted");
                }
                n
            };
            if n == 0 {
                return total;
            }
            for &(from, token) in &batch[..n] {
                handler(Event::ReadDone { from, token });
            }
            total += n;
        }
    }

    fn first_loss(&self) -> Result<(), TransportError> {
        for (peer, link) in self.conn.links() {
            if !link.left.load(Ordering::Acquire) {
                self.check_link(peer, link)?;
            }
        }
        Ok(())
    }

    /// Asks the service thread to give `peer` its full set of buffers, or to widen the window to
    /// it, if either can still happen. Async-signal-safe.
    fn want_busy(&self, peer: usize, link: &Link) {
        let more = if self.bufs.is_busy(peer) {
            link.peer_busy.load(Ordering::Acquire) && !link.widened.load(Ordering::Acquire)
        } else {
            self.busy_count.load(Ordering::Acquire) < self.busy_limit && !self.busy_refused.load(Ordering::Acquire)
        };
        if more && !link.wants_busy.swap(true, Ordering::AcqRel) {
            self.busy_wanted.store(true, Ordering::Release);
            self.tcp.wake();
        }
    }

    /// Makes busy the peers that asked for it, as far as the limit allows: registers their
    /// buffers, posts the extra receives, tells the peer (K_BUSY), and widens the window to a
    /// peer that said the same. Allocates: service thread only, holding no transport lock.
    fn make_busy_peers(&self) -> Result<(), TransportError> {
        if !self.busy_wanted.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        for (peer, link) in self.conn.links() {
            if !link.wants_busy.swap(false, Ordering::AcqRel) {
                continue;
            }
            if !self.bufs.is_busy(peer) {
                if self.busy_count.load(Ordering::Acquire) >= self.busy_limit
                    || self.busy_refused.load(Ordering::Acquire)
                {
                    continue;
                }
                if self.bufs.make_busy(&self.pd, peer).is_err() {
                    // Typically the locked-memory limit: the first buffers carry on.
                    self.busy_refused.store(true, Ordering::Release);
                    continue;
                }
                self.busy_count.fetch_add(1, Ordering::AcqRel);
                {
                    // Receives are posted under the receive lock, as everywhere.
                    let _rx = self.recv.lock();
                    for i in RECV_FIRST..RECV_DEPTH {
                        self.post_recv(peer, link, i)?;
                    }
                }
                self.send_control(peer, K_BUSY, 0, &[])?;
            }
            if link.peer_busy.load(Ordering::Acquire) && !link.widened.load(Ordering::Acquire) {
                link.send.lock().unwrap_or_else(|p| p.into_inner()).wide = true;
                link.widened.store(true, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Peers that have their full set of message buffers here.
    pub fn busy_peers(&self) -> Vec<usize> {
        self.bufs.busy_peers()
    }

    /// Bytes of message buffers registered (pinned) here.
    pub fn pinned_buffer_bytes(&self) -> usize {
        self.bufs.pinned()
    }

    /// Everything that can be done without waiting.
    fn progress(&self, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError> {
        self.first_loss()?;
        self.make_busy_peers()?;
        self.reap_sends();
        let mut n = self.report_reads(handler);
        let mut rx = self.recv.lock();
        self.take_receives(&mut rx);
        let mut sink = Sink::Service(handler);
        for k in 0..rx.len() {
            let Some((peer, rp)) = rx.nth(k) else { continue };
            if rp.has_work() {
                n += self.drain_peer(peer, rp, &mut sink)?;
            }
        }
        drop(rx);
        self.make_busy_peers()?;
        self.first_loss()?;
        Ok(n)
    }

    /// Asks for a completion event before the service thread sleeps: always for receives; for
    /// the send queue only while READs of the service thread are in flight (see
    /// [`RdmaTransport::service_reads`]). Only the service thread posts those, so none can start
    /// while it sleeps. Other send completions (slots coming free, the fault path's READs) are
    /// reaped by the threads that wait for them, and a failed one also by the next poll.
    fn arm(&self) {
        // SAFETY: live CQs; a failure only costs a wake-up, which the poll timeout bounds.
        unsafe {
            if self.service_reads.load(Ordering::Acquire) > 0 {
                ibv_req_notify_cq(self.send_cq_raw(), 0);
            }
            ibv_req_notify_cq(self.recv_cq_raw(), 0);
        }
    }

    /// Consumes pending completion events (the channel is non-blocking).
    fn drain_channel(&self) {
        loop {
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut libc::c_void = std::ptr::null_mut();
            // SAFETY: a live, non-blocking channel; out-pointers are valid.
            let rc = unsafe { ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut cq, &mut ctx) };
            if rc != 0 {
                return;
            }
            // SAFETY: `cq` is the CQ the event was for; one event taken, one acknowledged.
            unsafe { ibv_ack_cq_events(cq, 1) };
        }
    }

    /// Reads the TCP connections, waiting up to `timeout` (or for a completion event or a
    /// wake-up): connection messages go to the connector; a goodbye that comes only by TCP is
    /// delivered; a connection that closes loses its peer, and threads waiting on its queue pair
    /// (for room to send, for a READ) stop now.
    fn read_tcp(&self, timeout: Option<Duration>, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError> {
        let mut n = 0;
        let waited = self.tcp.poll(timeout, &mut |ev| match ev {
            Event::PeerLeft { rank } => {
                if self.goodbye_by_tcp(rank) {
                    handler(Event::PeerLeft { rank });
                    n += 1;
                }
            }
            Event::Message { from, bytes, .. } => {
                // Anything else on TCP is not ours to take.
                self.take_setup(from, bytes);
            }
            Event::ReadDone { .. } => {}
        });
        if let Err(TransportError::PeerLost { rank, .. }) = &waited {
            self.tcp_closed(*rank);
            if let Some(link) = self.made(*rank) {
                let _ = link.lost.compare_exchange(0, LOST_CLOSED + 1, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        waited?;
        Ok(n)
    }

    /// Device, port and GID in use, for the start-up message.
    pub fn describe(&self) -> String {
        self.port.describe()
    }
}

/// What [`RdmaTransport`]'s [`Transport`] methods do.
impl Shared {
    fn close_in_forked_child(&self) {
        // The queue pairs and registrations stay as the child inherited them, untouched: the
        // child never uses them.
        self.tcp.close_in_forked_child();
    }

    fn send(&self, peer: usize, msg: &[u8], page: Option<Span>) -> Result<(), TransportError> {
        if msg.len() > crate::MAX_MESSAGE {
            return Err(TransportError::MessageTooLong(msg.len()));
        }
        if let Some(span) = page {
            self.view.check(span, crate::frame::MAX_SPAN)?;
        }
        let link = self.link(peer)?;
        self.check_link(peer, link)?;
        let mut ring = link.send.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(span) = page {
            let mut done = 0usize;
            while done < span.len as usize {
                let n = PAYLOAD.min(span.len as usize - done);
                let off = span.offset + done as u64;
                // SAFETY: the span lies inside the view (checked above).
                let bytes = unsafe { std::slice::from_raw_parts(self.view.base.add(off as usize), n) };
                self.send_fragment(peer, link, &mut ring, Head { kind: K_PAGE, flags: 0, arg: off }, bytes)?;
                done += n;
            }
        }
        let mut chunks = msg.chunks(PAYLOAD).peekable();
        if chunks.peek().is_none() {
            return self.send_fragment(peer, link, &mut ring, Head { kind: K_MSG, flags: F_LAST, arg: 0 }, &[]);
        }
        while let Some(part) = chunks.next() {
            let flags = if chunks.peek().is_none() { F_LAST } else { 0 };
            self.send_fragment(peer, link, &mut ring, Head { kind: K_MSG, flags, arg: 0 }, part)?;
        }
        Ok(())
    }

    /// Registers the chunk on first use and may ask the peer for its key: service thread only.
    fn start_read(&self, peer: usize, span: Span, token: u64) -> Result<(), TransportError> {
        let chunk = self.chunk_of(span)?;
        let link = self.link(peer)?;
        self.local_keys(chunk)?;
        let remote = link.rkeys[chunk as usize].load(Ordering::Acquire);
        if remote & RKEY_VALID != 0 {
            return self.post_read(peer, span, token, (remote & 0xffff_ffff) as u32);
        }
        self.chunks.waiting.lock().unwrap_or_else(|p| p.into_inner()).push((peer, span, token));
        if self.chunks.asked.lock().unwrap_or_else(|p| p.into_inner()).insert((peer, chunk)) {
            self.send_control(peer, K_RKEY_QUERY, chunk, &[])?;
        }
        Ok(())
    }

    fn read_inline(&self, peer: usize, span: Span) -> bool {
        let Ok(chunk) = self.chunk_of(span) else { return false };
        // Known keys mean a connection, but it must be ready here: this thread does not wait.
        let Some(link) = self.conn.slot(peer).filter(|s| s.is_ready()).and_then(links::Slot::link) else {
            return false;
        };
        let local = self.chunks.local[chunk as usize].load(Ordering::Acquire);
        let remote = link.rkeys[chunk as usize].load(Ordering::Acquire);
        if local == 0 || remote & RKEY_VALID == 0 {
            return false;
        }
        let Ok(seq) = self.post_read_keys(peer, span, NO_TOKEN, (local >> 32) as u32, remote as u32) else {
            return false;
        };
        // Completions of one queue pair arrive in order: ours is in once the count passes it.
        let mut spins = 0u32;
        while link.completed.load(Ordering::Acquire) <= seq {
            if link.lost.load(Ordering::Acquire) != 0 {
                return false;
            }
            self.reap_sends();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                // Soft-RoCE does its work in kernel threads of this machine: let them run.
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            } else {
                std::hint::spin_loop();
            }
        }
        // A failed READ marks the link lost (and counts as completed): the service thread reports it.
        link.lost.load(Ordering::Acquire) == 0
    }

    fn poll(&self, timeout: Option<Duration>, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError> {
        let n = self.progress(handler)?;
        if n > 0 || timeout == Some(Duration::ZERO) {
            // Busy: still read the TCP connections now and then, for peers asking for a
            // connection, goodbyes and closed connections.
            let now = self.conn.now();
            if now.saturating_sub(self.tcp_checked.load(Ordering::Relaxed)) > TCP_CHECK_NS {
                self.tcp_checked.store(now, Ordering::Relaxed);
                return Ok(n + self.read_tcp(Some(Duration::ZERO), handler)?);
            }
            return Ok(n);
        }
        self.arm();
        let n = self.progress(handler)?;
        if n > 0 {
            return Ok(n);
        }
        // Sleep until a completion event, a wake-up, or something on TCP.
        let m = self.read_tcp(timeout, handler)?;
        self.drain_channel();
        Ok(m + self.progress(handler)?)
    }

    fn poll_inline(&self, accept: &mut Accept<'_>) -> usize {
        // Finished READs are the service thread's to report: make sure it looks (when in doubt,
        // because another thread holds the queue, too).
        if self.reap_sends() > 0 && self.completions.try_lock().map_or(true, |c| !c.reads_done.is_empty()) {
            self.tcp.wake();
        }
        // A peer asking for a connection is heard even while the service thread is busy.
        let now = self.conn.now();
        if now.saturating_sub(self.tcp_checked.load(Ordering::Relaxed)) > TCP_CHECK_NS {
            self.tcp_checked.store(now, Ordering::Relaxed);
            self.tcp.poll_inline(&mut |from, bytes, _| self.take_setup(from, bytes));
        }
        let Some(mut rx) = self.recv.try_lock() else { return 0 };
        self.take_receives(&mut rx);
        let mut sink = Sink::Inline(accept);
        let mut taken = 0;
        for k in 0..rx.len() {
            let Some((peer, rp)) = rx.nth(k) else { continue };
            if !rp.asm.complete && (!rp.spill.is_empty() || !rp.queue.is_empty()) {
                match self.drain_peer(peer, rp, &mut sink) {
                    Ok(n) => taken += n,
                    // Errors surface in the service thread's next poll (the fragment that failed
                    // was not consumed).
                    Err(_) => self.tcp.wake(),
                }
            }
        }
        taken
    }

    fn wait_for_wake(&self, timeout: Duration) {
        self.tcp.wait_for_wake_consuming(timeout);
    }

    fn wake(&self) {
        self.tcp.wake();
    }

    fn drain_sends(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        for (_, link) in self.conn.links() {
            let posted = link.send.lock().unwrap_or_else(|p| p.into_inner()).posted;
            while link.completed.load(Ordering::Acquire) < posted && Instant::now() < deadline {
                self.reap_sends();
                std::thread::yield_now();
            }
        }
    }

    fn say_goodbye(&self) -> Result<(), TransportError> {
        // By RDMA to the peers with a ready connection (after everything sent there); the others
        // hear it on TCP.
        for peer in self.leave_connections() {
            self.send_control(peer, K_GOODBYE, 0, &[])?;
        }
        // A SEND completes when the peer's NIC has it: wait, so that exiting right after this
        // cannot drop the goodbye (or anything before it) from our send queues.
        let deadline = Instant::now() + Duration::from_secs(5);
        for (peer, link) in self.conn.links() {
            let posted = link.send.lock().unwrap_or_else(|p| p.into_inner()).posted;
            while link.completed.load(Ordering::Acquire) < posted && Instant::now() < deadline {
                self.reap_sends();
                std::thread::yield_now();
            }
            self.check_link(peer, link)?;
        }
        self.tcp.say_goodbye()
    }

    /// Linked on TCP: every peer we are linked to hears our goodbye, by RDMA or TCP.
    fn linked(&self, peer: usize) -> bool {
        Transport::linked(&self.tcp, peer)
    }
}

/// The RDMA implementation of [`Transport`]: a handle on the state its connector thread shares.
pub struct RdmaTransport(Arc<Shared>);

impl RdmaTransport {
    /// Starts the transport's connector thread.
    pub(super) fn start(shared: Shared) -> Result<RdmaTransport, TransportError> {
        let shared = Arc::new(shared);
        shared.start_connector()?;
        Ok(RdmaTransport(shared))
    }

    /// Device, port and GID in use, for the start-up message.
    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// Peers that have their full set of message buffers here.
    pub fn busy_peers(&self) -> Vec<usize> {
        self.0.busy_peers()
    }

    /// Test support, not part of the API: posts an RDMA WRITE of `span` of our view into the same
    /// place of `peer`'s view, with the key `peer` gave us for that chunk (after a read from it;
    /// else `BadSpan`), as a peer that knows the job's secret could. The peer's registrations
    /// grant remote read only, so the write must fail (the connection then fails too): the tests
    /// check that nothing lands.
    #[doc(hidden)]
    pub fn post_write_for_test(&self, peer: usize, span: Span) -> Result<(), TransportError> {
        self.0.post_write_for_test(peer, span)
    }

    /// Bytes of message buffers registered (pinned) here.
    pub fn pinned_buffer_bytes(&self) -> usize {
        self.0.pinned_buffer_bytes()
    }

    /// Peers with a ready connection (connections are made on first use).
    pub fn connected_peers(&self) -> Vec<usize> {
        self.0.connected_peers()
    }

    /// Peers whose first message buffers the completion queues have room for: they grow with the
    /// queue pairs made, not with the job.
    pub fn completion_room(&self) -> usize {
        self.0.cqs.room()
    }
}

impl Transport for RdmaTransport {
    fn close_in_forked_child(&self) {
        self.0.close_in_forked_child()
    }
    fn rank(&self) -> usize {
        self.0.rank
    }
    fn size(&self) -> usize {
        self.0.size
    }
    fn send(&self, peer: usize, msg: &[u8], page: Option<Span>) -> Result<(), TransportError> {
        self.0.send(peer, msg, page)
    }
    fn start_read(&self, peer: usize, span: Span, token: u64) -> Result<(), TransportError> {
        self.0.start_read(peer, span, token)
    }
    fn read_inline(&self, peer: usize, span: Span) -> bool {
        self.0.read_inline(peer, span)
    }
    fn poll(&self, timeout: Option<Duration>, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError> {
        self.0.poll(timeout, handler)
    }
    fn poll_inline(&self, accept: &mut Accept<'_>) -> usize {
        self.0.poll_inline(accept)
    }
    fn wait_for_wake(&self, timeout: Duration) {
        self.0.wait_for_wake(timeout)
    }
    fn wake(&self) {
        self.0.wake()
    }
    fn drain_sends(&self, wait: Duration) {
        self.0.drain_sends(wait)
    }
    fn say_goodbye(&self) -> Result<(), TransportError> {
        self.0.say_goodbye()
    }
    fn one_sided_reads(&self) -> bool {
        true
    }
    fn holes_reach_readers(&self) -> bool {
        self.0.port.on_demand
    }
    fn linked(&self, peer: usize) -> bool {
        self.0.linked(peer)
    }
}

impl Drop for RdmaTransport {
    /// The connector thread holds the shared state: it stops, and the state goes with the handle.
    fn drop(&mut self) {
        self.0.stop_connector();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(head: Head, payload: &[u8]) -> Vec<u8> {
        [head.wire(payload.len()).as_bytes(), payload].concat()
    }

    /// A bounded in-suite fuzz run of the RDMA decoders of peer bytes: a million random and
    /// mutated fragments and endpoint messages. No panic; a fragment is accepted exactly when its
    /// layout rule holds; whatever is accepted is the one encoding of what it decoded.
    #[test]
    fn fuzz_the_fragment_and_endpoint_decoders() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good_frag = fragment(Head { kind: K_MSG, flags: F_LAST, arg: 7 }, b"payload");
        let good_ep = fuzzing::endpoint_round_trip(
            &[
                &b"GR1E"[..],
                &[3; 16],
                &[1, 0],
                &[0x34, 0x12, 0, 0],
                &[7, 0, 0, 0],
                &[0, 4, 0, 0],
                &[0; 8],
                &[0, 0, 0, 0, 4, 0, 0, 0],
            ]
            .concat(),
        )
        .expect("a well-formed endpoint");
        let (mut frags, mut eps) = (0, 0);
        for i in 0..1_000_000u32 {
            let mut b = if i % 2 == 0 { good_frag.clone() } else { good_ep.clone() };
            if i % 4 < 2 {
                let len = (next() % (BUF as u64 + 8)) as usize;
                b = (0..len).map(|_| next() as u8).collect();
                if i % 8 == 0 && b.len() >= HDR {
                    // Often a consistent length and zero spare bytes, so that some are accepted.
                    b[2..4].fill(0);
                    let n = (b.len() - HDR) as u32;
                    b[4..8].copy_from_slice(&n.to_le_bytes());
                }
            } else {
                for _ in 0..=(next() % 3) {
                    let at = (next() % b.len() as u64) as usize;
                    b[at] ^= 1 << (next() % 8);
                }
                if next() % 4 == 0 {
                    b.truncate((next() % b.len() as u64) as usize);
                }
            }
            let rule = b.len() <= fuzzing::FRAGMENT_MAX
                && b.len() >= HDR
                && b[2..4] == [0, 0]
                && u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize == b.len() - HDR;
            match fuzzing::fragment_round_trip(&b) {
                Ok(again) => {
                    assert!(rule, "{b:?}");
                    assert_eq!(again, b);
                    frags += 1;
                }
                Err(_) => assert!(!rule, "{b:?}"),
            }
            if let Some(again) = fuzzing::endpoint_round_trip(&b) {
                assert_eq!(again, b);
                eps += 1;
            }
        }
        assert!(frags > 0 && eps > 0, "{frags} fragments, {eps} endpoints accepted");
    }

    #[test]
    fn fragment_header_round_trips() {
        let head = Head { kind: K_PAGE, flags: F_LAST, arg: 0x1234_5678_9abc };
        let frag = fragment(head, b"page bytes");
        assert_eq!(frag.len(), HDR + 10);
        assert_eq!(&frag[..8], &[K_PAGE, F_LAST, 0, 0, 10, 0, 0, 0]);
        assert_eq!(Head::parse(&frag).unwrap(), (head, &b"page bytes"[..]));
        let empty = Head { kind: K_GOODBYE, flags: F_LAST, arg: 0 };
        assert_eq!(Head::parse(&fragment(empty, &[])).unwrap(), (empty, &[][..]));
        let full = fragment(head, &[7u8; PAYLOAD]);
        assert_eq!(full.len() + TAG_LEN, BUF, "a full fragment and its tag fill a buffer");
        assert_eq!(Head::parse(&full).unwrap(), (head, &[7u8; PAYLOAD][..]));
    }

    #[test]
    fn a_fragment_passes_only_with_the_tag_of_its_turn() {
        let secret = [5u8; 32];
        let mut ours = crate::seal::SessionKeys::derive(&secret, crate::seal::Role::Connector);
        let theirs = crate::seal::SessionKeys::derive(&secret, crate::seal::Role::Acceptor);
        let body = fragment(Head { kind: K_MSG, flags: F_LAST, arg: 0 }, b"hello");
        let tagged = |tag: Tag| [&body[..], &tag].concat();
        let first = tagged(ours.layered_sealer.seal(&[&body]));
        let second = tagged(ours.layered_sealer.seal(&[&body]));
        let mut opener = theirs.layered_opener;
        assert_eq!(authentic(1, Some(&opener), &first).unwrap(), &body[..]);
        assert!(authentic(1, Some(&opener), &second).is_err(), "not its turn yet");
        assert_eq!(authentic(1, Some(&opener), &first).unwrap(), &body[..], "looking again is fine");
        opener.advance();
        assert!(authentic(1, Some(&opener), &first).is_err(), "a replay");
        assert_eq!(authentic(1, Some(&opener), &second).unwrap(), &body[..]);
        let mut changed = second.clone();
        changed[HDR] ^= 1;
        let e = authentic(1, Some(&opener), &changed).unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains("authentication"), "{e}");
        assert!(authentic(1, Some(&opener), &second[..TAG_LEN - 1]).is_err(), "shorter than a tag");
        assert!(authentic(1, None, &second).is_err(), "no keys");
    }

    #[test]
    fn fragment_header_refuses_truncated_and_garbage() {
        let frag = fragment(Head { kind: K_MSG, flags: 0, arg: 0 }, b"hello");
        for n in 0..HDR {
            assert_eq!(Head::parse(&frag[..n]).unwrap_err(), "fragment shorter than its header");
        }
        for n in HDR..frag.len() {
            assert!(Head::parse(&frag[..n]).unwrap_err().contains("length disagrees"), "{n}");
        }
        assert!(Head::parse(&[frag.as_slice(), &[0]].concat()).unwrap_err().contains("length disagrees"));
        let mut spare = frag.clone();
        spare[2] = 1;
        assert!(Head::parse(&spare).unwrap_err().contains("spare"));
        let mut huge = frag.clone();
        huge[4..8].copy_from_slice(&[0xff; 4]);
        assert!(Head::parse(&huge).unwrap_err().contains("length disagrees"));
        assert!(Head::parse(&[0xa5; BUF]).is_err());
    }
}
