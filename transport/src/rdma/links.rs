//! RDMA connections made on first use: no queue pair, no registered buffer and no TCP connection
//! for a pair of ranks that never speak.
//!
//! A sender that finds no connection to a peer asks this process's connector thread for one and
//! sleeps on a futex (allocation-free, so a faulting thread may do it). The connector creates a
//! queue pair and the peer's first buffers, and sends its [`Endpoint`] on the TCP connection to
//! the peer (made on first use too). The peer's connector, told by whichever of its threads reads
//! that message, does the same and connects its queue pair to ours; each side, once its queue
//! pair is connected, says `READY` on TCP, and a connection is ready when we connected ours and
//! heard the peer's `READY` (so the peer's queue pair accepts what we send). Both ranks may start
//! at once: each has one queue pair per peer, so both simply connect it to the other's.
//!
//! Leaving: a peer's goodbye comes by RDMA on a ready connection (after everything it sent there),
//! else by TCP. A peer that said `READY` on TCP but leaves before its side is ready says so
//! (`BYE_BY_TCP`), so that the receiver never waits for an RDMA goodbye that will not come; a
//! leaving rank asked for a new connection answers `LEFT`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::receivers::RecvPeer;
use super::setup::{self, Endpoint};
use super::{lost, Link, Shared};
use crate::sys::{futex_wait, futex_wake_all};
use crate::{LostReason, Transport, TransportError};

/// This side offers: here is our queue pair.
pub(super) const TAG_ENDPOINT: &[u8; 4] = b"GR1E";
/// Our queue pair is connected to yours.
pub(super) const TAG_READY: &[u8; 4] = b"GR1R";
/// We said `READY` but leave before the connection was ready on our side: our goodbye comes by
/// TCP, not RDMA.
pub(super) const TAG_BYE_BY_TCP: &[u8; 4] = b"GR1X";
/// We are leaving the job: no new connection.
pub(super) const TAG_LEFT: &[u8; 4] = b"GR1L";

/// Connection states (a futex word per peer).
const IDLE: u32 = 0;
/// Our queue pair exists and its endpoint was sent.
const OFFERED: u32 = 1;
/// Our queue pair is connected to the peer's, and we said `READY`.
const CONNECTED: u32 = 2;
/// The peer said `READY` too: messages may go.
const READY: u32 = 3;
const FAILED: u32 = 4;

/// Why a connection failed (`Slot::failure`).
const WHY_TIMEOUT: u32 = 1;
const WHY_VERBS: u32 = 2;
const WHY_PEER_LEFT: u32 = 3;
const WHY_WE_LEFT: u32 = 4;
const WHY_TCP: u32 = 5;
const WHY_VIEW: u32 = 6;
const WHY_CLOSED: u32 = 7;

/// Why a connection failed when a TCP send to its peer did.
fn why_tcp_failed(e: &TransportError) -> u32 {
    match e {
        TransportError::PeerLeft { .. } => WHY_PEER_LEFT,
        TransportError::Left => WHY_WE_LEFT,
        _ => WHY_TCP,
    }
}

/// One peer's connection and what the peer said about it.
pub(super) struct Slot {
    state: AtomicU32,
    /// Our queue pair until it is connected (moving it through its states needs it alone).
    pending: Mutex<Option<Box<Link>>>,
    /// Our queue pair once connected.
    link: OnceLock<Box<Link>>,
    /// A sender here wants this connection.
    wanted: AtomicBool,
    /// The peer's endpoint, once it sent it.
    endpoint: Mutex<Option<Endpoint>>,
    heard_ready: AtomicBool,
    /// The peer leaves with its goodbye on TCP only.
    bye_by_tcp: AtomicBool,
    failure: AtomicU32,
    /// When the attempt started (nanoseconds since `Connector::epoch`).
    since: AtomicU64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: AtomicU32::new(IDLE),
            pending: Mutex::new(None),
            link: OnceLock::new(),
            wanted: AtomicBool::new(false),
            endpoint: Mutex::new(None),
            heard_ready: AtomicBool::new(false),
            bye_by_tcp: AtomicBool::new(false),
            failure: AtomicU32::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// The queue pair, once connected (it may not be ready yet). Async-signal-safe.
    pub(super) fn link(&self) -> Option<&Link> {
        self.link.get().map(|l| &**l)
    }

    /// Messages may go to the peer. Async-signal-safe.
    pub(super) fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    fn fail(&self, why: u32) {
        if self.state.load(Ordering::Acquire) != READY {
            self.failure.store(why, Ordering::Release);
            self.state.store(FAILED, Ordering::Release);
            futex_wake_all(&self.state);
        }
    }
}

/// The connector thread's state.
pub(super) struct Connector {
    slots: Box<[Slot]>,
    /// Bumped (and woken) when there is work for the connector.
    work: AtomicU32,
    stop: AtomicBool,
    /// We are leaving: no new connections.
    leaving: AtomicBool,
    timeout: Duration,
    epoch: Instant,
    /// Held by the connector through each pass over the connections.
    pass: Mutex<()>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Connector {
    pub(super) fn new(size: usize, timeout: Duration) -> Connector {
        Connector {
            slots: (0..size).map(|_| Slot::new()).collect(),
            work: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            timeout,
            epoch: Instant::now(),
            pass: Mutex::new(()),
            thread: Mutex::new(None),
        }
    }

    pub(super) fn slot(&self, peer: usize) -> Option<&Slot> {
        self.slots.get(peer)
    }

    /// The queue pairs made so far, by peer.
    pub(super) fn links(&self) -> impl Iterator<Item = (usize, &Link)> {
        self.slots.iter().enumerate().filter_map(|(p, s)| Some((p, s.link()?)))
    }

    /// Wakes the connector. Async-signal-safe.
    fn poke(&self) {
        self.work.fetch_add(1, Ordering::AcqRel);
        futex_wake_all(&self.work);
    }

    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

impl Shared {
    /// Starts the connector thread, which holds the state until [`Shared::stop_connector`].
    pub(super) fn start_connector(self: &Arc<Shared>) -> Result<(), TransportError> {
        let shared = self.clone();
        let thread_start = self.tcp.thread_start();
        let handle = std::thread::Builder::new()
            .name("gallocy-rdma-connect".into())
            .spawn(move || {
                thread_start();
                shared.run_connector();
            })
            .map_err(|e| TransportError::io("starting the RDMA connector thread", e))?;
        *self.conn.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Stops and joins the connector thread.
    pub(super) fn stop_connector(&self) {
        self.conn.stop.store(true, Ordering::Release);
        self.conn.poke();
        if let Some(h) = self.conn.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }

    fn run_connector(&self) {
        loop {
            let seen = self.conn.work.load(Ordering::Acquire);
            if self.conn.stop.load(Ordering::Acquire) {
                return;
            }
            let busy = {
                let _pass = self.conn.pass.lock().unwrap_or_else(|p| p.into_inner());
                self.advance_connections()
            };
            if busy {
                // Read the answers ourselves: the service thread may be busy, or be the sender
                // waiting for this connection.
                self.tcp.poll_inline(&mut |from, bytes, _| self.take_setup(from, bytes));
            }
            let nap = if busy { Duration::from_millis(1) } else { Duration::from_secs(1) };
            futex_wait(&self.conn.work, seen, nap);
        }
    }

    /// A connection message from `peer` read on TCP by any thread: noted for the connector.
    /// False for any other message. Async-signal-safe.
    pub(super) fn take_setup(&self, peer: usize, bytes: &[u8]) -> bool {
        let Some(slot) = self.conn.slot(peer).filter(|_| peer != self.rank) else { return false };
        if let Some(ep) = Endpoint::decode(bytes) {
            let mut theirs = slot.endpoint.lock().unwrap_or_else(|p| p.into_inner());
            // A second endpoint is ignored: one queue pair per pair of ranks.
            if theirs.is_none() {
                *theirs = Some(ep);
            }
        } else if bytes == TAG_READY {
            slot.heard_ready.store(true, Ordering::Release);
        } else if bytes == TAG_BYE_BY_TCP {
            slot.bye_by_tcp.store(true, Ordering::Release);
        } else if bytes == TAG_LEFT {
            slot.fail(WHY_PEER_LEFT);
        } else {
            return false;
        }
        self.conn.poke();
        true
    }

    /// The peer said goodbye on TCP: whether its goodbye comes only that way (else it comes by
    /// RDMA, after everything it sent there). Marks the connection as done either way.
    pub(super) fn goodbye_by_tcp(&self, peer: usize) -> bool {
        let Some(slot) = self.conn.slot(peer) else { return false };
        if let Some(link) = slot.link() {
            link.left.store(true, Ordering::Release);
        }
        let by_tcp = !slot.heard_ready.load(Ordering::Acquire) || slot.bye_by_tcp.load(Ordering::Acquire);
        if by_tcp {
            slot.fail(WHY_PEER_LEFT);
        }
        by_tcp
    }

    /// The TCP connection to `peer` closed without a goodbye: a connection under way fails.
    pub(super) fn tcp_closed(&self, peer: usize) {
        if let Some(slot) = self.conn.slot(peer) {
            slot.fail(WHY_CLOSED);
        }
    }

    /// The connection to `peer`, made now if there is none (see the module documentation).
    /// Allocation-free and async-signal-safe.
    pub(super) fn ready_link(&self, peer: usize) -> Result<&Link, TransportError> {
        let slot = match self.conn.slot(peer) {
            Some(s) if peer != self.rank => s,
            _ => return Err(TransportError::NoSuchPeer(peer)),
        };
        if slot.is_ready() {
            if let Some(link) = slot.link() {
                return Ok(link);
            }
        }
        if !slot.wanted.swap(true, Ordering::AcqRel) {
            self.conn.poke();
        }
        // The connector gives up after the timeout; we wait a little longer.
        let deadline = Instant::now() + self.conn.timeout + Duration::from_millis(500);
        loop {
            match slot.state.load(Ordering::Acquire) {
                READY => return slot.link().ok_or(TransportError::NoSuchPeer(peer)),
                FAILED => return Err(self.failure(peer, slot)),
                s => {
                    if self.tcp.peer_said_goodbye(peer) {
                        return Err(TransportError::PeerLeft { rank: peer });
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(lost(peer, LostReason::Verbs("no RDMA connection in time")));
                    }
                    futex_wait(&slot.state, s, left.min(Duration::from_millis(50)));
                }
            }
        }
    }

    /// The error for a failed connection. Allocation-free.
    fn failure(&self, peer: usize, slot: &Slot) -> TransportError {
        match slot.failure.load(Ordering::Acquire) {
            WHY_PEER_LEFT => TransportError::PeerLeft { rank: peer },
            WHY_WE_LEFT => TransportError::Left,
            WHY_TIMEOUT => lost(peer, LostReason::Verbs("no RDMA connection in time")),
            WHY_VIEW => lost(peer, LostReason::Verbs("the peer's heap view differs from ours")),
            WHY_CLOSED => lost(peer, LostReason::Closed),
            WHY_TCP => match self.tcp.link_to(peer) {
                Err(e) => e,
                Ok(()) => lost(peer, LostReason::Verbs("the queue-pair address could not be sent")),
            },
            _ => lost(peer, LostReason::Verbs("setting up a queue pair failed")),
        }
    }

    /// Moves every connection on as far as it can go now; true while one is under way.
    fn advance_connections(&self) -> bool {
        let leaving = self.conn.leaving.load(Ordering::Acquire);
        let now = self.conn.now();
        let timeout = self.conn.timeout.as_nanos() as u64;
        let mut busy = false;
        for (peer, slot) in self.conn.slots.iter().enumerate() {
            if peer == self.rank {
                continue;
            }
            if let Err(why) = self.advance(peer, slot, leaving) {
                slot.fail(why);
            }
            if matches!(slot.state.load(Ordering::Acquire), OFFERED | CONNECTED) {
                if now.saturating_sub(slot.since.load(Ordering::Acquire)) > timeout {
                    slot.fail(WHY_TIMEOUT);
                } else {
                    busy = true;
                }
            }
        }
        busy
    }

    fn advance(&self, peer: usize, slot: &Slot, leaving: bool) -> Result<(), u32> {
        let mut state = slot.state.load(Ordering::Acquire);
        if state == IDLE {
            let offered_to_us = slot.endpoint.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            if !offered_to_us && !slot.wanted.load(Ordering::Acquire) {
                return Ok(());
            }
            if leaving {
                if offered_to_us {
                    let _ = self.tcp.send(peer, TAG_LEFT, None);
                }
                return Err(WHY_WE_LEFT);
            }
            self.offer(peer, slot)?;
            state = OFFERED;
        }
        if state == OFFERED {
            if leaving {
                // Saying READY now could promise the peer an RDMA goodbye it would not get.
                return Err(WHY_WE_LEFT);
            }
            let Some(ep) = *slot.endpoint.lock().unwrap_or_else(|p| p.into_inner()) else { return Ok(()) };
            self.connect_to(peer, slot, &ep)?;
            state = CONNECTED;
        }
        if state == CONNECTED && slot.heard_ready.load(Ordering::Acquire) {
            slot.state.store(READY, Ordering::Release);
            futex_wake_all(&slot.state);
        }
        Ok(())
    }

    /// Creates our queue pair and first buffers for `peer`, and sends the peer our endpoint.
    fn offer(&self, peer: usize, slot: &Slot) -> Result<(), u32> {
        slot.since.store(self.conn.now(), Ordering::Release);
        self.bufs.make_first(&self.pd, peer).map_err(|_| WHY_VERBS)?;
        self.cqs.make_room_for_one_more().map_err(|_| WHY_VERBS)?;
        let link = setup::new_link(&self.pd, &self.port, &self.cqs, &self.bufs, peer, self.chunks.count)
            .map_err(|_| WHY_VERBS)?;
        let mut link = link;
        let ep = setup::endpoint_of(&self.port, &link, self.rank, peer, self.view);
        self.tcp.send(peer, &ep.encode(), None).map_err(|e| why_tcp_failed(&e))?;
        // The TCP connection exists now, and with it the keys of ours.
        let (sealer, opener) = self.tcp.take_layered_keys(peer).ok_or(WHY_TCP)?;
        link.send.get_mut().unwrap_or_else(|p| p.into_inner()).sealer = Some(sealer);
        // What the peer sends can arrive once it has our endpoint and we said READY: its
        // receive state exists before that.
        self.recv.add(peer, RecvPeer::new(self.staging, Some(opener)).map_err(|_| WHY_VERBS)?);
        *slot.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(link));
        slot.state.store(OFFERED, Ordering::Release);
        Ok(())
    }

    /// Connects our queue pair to the peer's and says `READY`.
    fn connect_to(&self, peer: usize, slot: &Slot, ep: &Endpoint) -> Result<(), u32> {
        if ep.view_len != self.view.len as u64 {
            return Err(WHY_VIEW);
        }
        let mut link = slot.pending.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or(WHY_VERBS)?;
        setup::connect_qp(&self.port, &mut link, self.rank, peer, ep).map_err(|_| WHY_VERBS)?;
        if slot.link.set(link).is_err() {
            return Err(WHY_VERBS);
        }
        slot.state.store(CONNECTED, Ordering::Release);
        self.tcp.send(peer, TAG_READY, None).map_err(|e| why_tcp_failed(&e))
    }

    /// We leave: no new connections; a connection under way gets its last step (bounded), and
    /// the peers of connections that are not ready learn that our goodbye comes by TCP.
    /// Returns the peers to say goodbye to by RDMA.
    pub(super) fn leave_connections(&self) -> Vec<usize> {
        self.conn.leaving.store(true, Ordering::Release);
        // Once a pass that began before is over, no connection becomes CONNECTED any more.
        drop(self.conn.pass.lock().unwrap_or_else(|p| p.into_inner()));
        self.conn.poke();
        let deadline = Instant::now() + self.conn.timeout.min(Duration::from_secs(2));
        let connecting = || self.conn.slots.iter().any(|s| s.state.load(Ordering::Acquire) == CONNECTED);
        while connecting() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut by_rdma = Vec::new();
        for (peer, slot) in self.conn.slots.iter().enumerate() {
            match slot.state.load(Ordering::Acquire) {
                READY => by_rdma.push(peer),
                CONNECTED => {
                    let _ = self.tcp.send(peer, TAG_BYE_BY_TCP, None);
                }
                _ => {}
            }
        }
        by_rdma
    }

    /// Peers with a ready connection.
    pub fn connected_peers(&self) -> Vec<usize> {
        (0..self.size).filter(|p| self.conn.slot(*p).is_some_and(Slot::is_ready)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_sticks_but_never_undoes_a_ready_connection() {
        let s = Slot::new();
        s.fail(WHY_TIMEOUT);
        assert_eq!(s.state.load(Ordering::Acquire), FAILED);
        assert_eq!(s.failure.load(Ordering::Acquire), WHY_TIMEOUT);
        let r = Slot::new();
        r.state.store(READY, Ordering::Release);
        r.fail(WHY_PEER_LEFT);
        assert!(r.is_ready(), "a ready connection stays ready; its loss shows on the queue pair");
    }
}
