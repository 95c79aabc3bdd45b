//! What arrives from each peer: the fragments waiting to be consumed, the message being put
//! together, and the spill area of a sender that waits for room. Made for a peer together with
//! its queue pair ([`Receivers::add`], by the connector thread, which never waits for the
//! receive lock), so that a process holds this only for the peers it talks to.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::buffers::{BUF, RECV_DEPTH};
use crate::seal::Opener;
use crate::sys::{HighWater, LazyBuf};
use crate::{Span, TransportError};

/// The receive state of every peer we have a queue pair with, behind the receive lock.
pub(super) struct Receivers {
    /// By peer: made once, by the connector, before the peer's queue pair can receive.
    by_peer: Box<[OnceLock<Box<UnsafeCell<RecvPeer>>>]>,
    /// The peers that have one, in the order they were made (the first `count`).
    order: Box<[AtomicU32]>,
    count: AtomicUsize,
    /// The receive lock: held to touch any peer's state.
    lock: Mutex<()>,
}

// SAFETY: a peer's state is only reached through a `Held`, which holds `lock`; `add` only
// publishes a state nobody else can reach yet.
unsafe impl Sync for Receivers {}

impl Receivers {
    pub(super) fn new(size: usize) -> Receivers {
        Receivers {
            by_peer: (0..size).map(|_| OnceLock::new()).collect(),
            order: (0..size).map(|_| AtomicU32::new(0)).collect(),
            count: AtomicUsize::new(0),
            lock: Mutex::new(()),
        }
    }

    /// Adds `peer`'s state unless it has one. Needs no lock: only the connector thread adds.
    pub(super) fn add(&self, peer: usize, state: RecvPeer) {
        let Some(cell) = self.by_peer.get(peer) else { return };
        if cell.set(Box::new(UnsafeCell::new(state))).is_ok() {
            let n = self.count.load(Ordering::Acquire);
            self.order[n].store(peer as u32, Ordering::Release);
            self.count.store(n + 1, Ordering::Release);
        }
    }

    /// Takes the receive lock. Blocking: not for a signal handler.
    pub(super) fn lock(&self) -> Held<'_> {
        Held { _guard: self.lock.lock().unwrap_or_else(|p| p.into_inner()), all: self }
    }

    /// Takes the receive lock if it is free. Async-signal-safe.
    pub(super) fn try_lock(&self) -> Option<Held<'_>> {
        match self.lock.try_lock() {
            Ok(guard) => Some(Held { _guard: guard, all: self }),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(Held { _guard: p.into_inner(), all: self }),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The receive lock, held: the peers' states may be changed.
pub(super) struct Held<'a> {
    _guard: MutexGuard<'a, ()>,
    all: &'a Receivers,
}

impl Held<'_> {
    /// `peer`'s state, if it has a queue pair. Async-signal-safe.
    pub(super) fn get_mut(&mut self, peer: usize) -> Option<&mut RecvPeer> {
        let cell = self.all.by_peer.get(peer)?.get()?;
        // SAFETY: we hold the receive lock, and `&mut self` keeps this the only reference made
        // through it.
        Some(unsafe { &mut *cell.get() })
    }

    /// How many peers have a state; [`Held::nth`] takes 0 to this.
    pub(super) fn len(&self) -> usize {
        self.all.count.load(Ordering::Acquire)
    }

    /// The `k`-th peer with a state, in the order they were made, and its state.
    pub(super) fn nth(&mut self, k: usize) -> Option<(usize, &mut RecvPeer)> {
        if k >= self.len() {
            return None;
        }
        let peer = self.all.order[k].load(Ordering::Acquire) as usize;
        self.get_mut(peer).map(|s| (peer, s))
    }
}

/// Receive-side state of one peer.
pub(super) struct RecvPeer {
    /// Completed receive buffers not consumed yet: (buffer index, bytes).
    pub(super) queue: VecDeque<(u32, u32)>,
    /// Fragments moved out of receive buffers (older than everything in `queue`).
    pub(super) spill: Spill,
    /// The message being put together.
    pub(super) asm: Assembly,
    /// Checks each fragment's tag (none for ourselves).
    pub(super) opener: Option<Opener>,
}

/// The message being put together from fragments.
pub(super) struct Assembly {
    /// The message so far (capacity MAX_MESSAGE, never reallocated).
    pub(super) msg: Vec<u8>,
    /// The page that came with it.
    pub(super) page: Option<Span>,
    /// Its contents while a page check is set: they land in the view only once the message says
    /// they are owed (capacity one page, never reallocated).
    pub(super) staged: Vec<u8>,
    /// The staged contents passed the check and landed.
    pub(super) landed: bool,
    /// `msg` holds a whole message a waiting thread declined: the service thread delivers it.
    pub(super) complete: bool,
}

/// Where a sender that waits for room moves the fragments its peer sent it, so that their receive
/// buffers can be posted again: two processes that send each other more than their queues hold
/// without polling in between (TCP's socket buffers absorb that) would otherwise wait for each
/// other for ever. Fixed slots, allocated up front (lazily backed by the kernel), used in order
/// from the first one each time the area empties.
pub(super) struct Spill {
    data: LazyBuf,
    lens: Box<[u32]>,
    head: usize,
    count: usize,
    high: HighWater,
}

/// Fragments one peer's spill area holds (1 KiB each).
const SPILL_SLOTS: usize = 4096;

/// Slots whose memory a spill area keeps when it empties (the rest is given back).
const SPILL_KEEP: usize = 64;

impl Spill {
    fn new() -> Result<Spill, TransportError> {
        Ok(Spill {
            data: LazyBuf::new(SPILL_SLOTS * BUF)
                .map_err(|source| TransportError::Io { what: "mapping a spill area".into(), source })?,
            lens: vec![0; SPILL_SLOTS].into(),
            head: 0,
            count: 0,
            high: HighWater::new(SPILL_KEEP * BUF),
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(super) fn front(&self) -> Option<&[u8]> {
        (self.count > 0)
            .then(|| &self.data.as_slice()[self.head * BUF..self.head * BUF + self.lens[self.head] as usize])
    }

    pub(super) fn pop(&mut self) {
        self.count -= 1;
        if self.count == 0 {
            // Empty again: start over at slot 0, and give back the memory of a burst, so that the
            // area costs memory only while a burst lasts, not the whole of it as the ring goes
            // round.
            self.head = 0;
            self.high.drained(&mut self.data);
        } else {
            self.head = (self.head + 1) % SPILL_SLOTS;
        }
    }

    /// Appends a fragment; false when full.
    pub(super) fn push(&mut self, frag: &[u8]) -> bool {
        if self.count == SPILL_SLOTS {
            return false;
        }
        let i = (self.head + self.count) % SPILL_SLOTS;
        self.data.as_mut_slice()[i * BUF..i * BUF + frag.len()].copy_from_slice(frag);
        self.high.wrote(i * BUF + frag.len());
        self.lens[i] = frag.len() as u32;
        self.count += 1;
        true
    }
}

impl RecvPeer {
    pub(super) fn new(staging: usize, opener: Option<Opener>) -> Result<RecvPeer, TransportError> {
        Ok(RecvPeer {
            opener,
            queue: VecDeque::with_capacity(RECV_DEPTH),
            spill: Spill::new()?,
            asm: Assembly {
                msg: Vec::with_capacity(crate::MAX_MESSAGE),
                page: None,
                staged: Vec::with_capacity(staging),
                landed: false,
                complete: false,
            },
        })
    }

    /// Something waits to be consumed or delivered.
    pub(super) fn has_work(&self) -> bool {
        self.asm.complete || !self.spill.is_empty() || !self.queue.is_empty()
    }
}

impl Assembly {
    pub(super) fn reset(&mut self) {
        self.msg.clear();
        self.page = None;
        self.staged.clear();
        self.landed = false;
        self.complete = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spill area writes only as many slots as were in use at once, however many fragments
    /// pass through it: the rest of its 4 MiB never becomes resident (the soak test's flat RSS).
    #[test]
    fn the_spill_area_reuses_its_first_slots() {
        let mut spill = Spill::new().unwrap();
        let mut highest = 0;
        for round in 0..3 * SPILL_SLOTS {
            let burst = 1 + round % 3;
            for k in 0..burst {
                assert!(spill.push(&[(round + k) as u8; 5]));
                highest = highest.max(spill.head + spill.count);
            }
            for k in 0..burst {
                assert_eq!(spill.front(), Some(&[(round + k) as u8; 5][..]), "round {round}: fragments in order");
                spill.pop();
            }
            assert_eq!(spill.front(), None);
        }
        assert_eq!(highest, 3, "slots written beyond the three in use at once");
        // A burst of most of the area, drained: its memory goes back, all but the first slots.
        let page = crate::sys::page_size();
        for i in 0..SPILL_SLOTS - 1 {
            assert!(spill.push(&[i as u8; BUF]));
        }
        assert!(crate::sys::resident_pages(&spill.data) * page >= (SPILL_SLOTS - 1) * BUF);
        for _ in 0..SPILL_SLOTS - 1 {
            spill.pop();
        }
        let left = crate::sys::resident_pages(&spill.data) * page;
        assert!(left <= SPILL_KEEP * BUF, "{left} bytes of the spill area still resident after it drained");
        // Still a ring while it is not empty: it fills to the last slot and wraps.
        for i in 0..SPILL_SLOTS {
            assert!(spill.push(&(i as u32).to_le_bytes()));
        }
        assert!(!spill.push(b"full"));
        spill.pop();
        assert!(spill.push(b"wraps"));
        for i in 1..SPILL_SLOTS {
            assert_eq!(spill.front(), Some(&(i as u32).to_le_bytes()[..]));
            spill.pop();
        }
        assert_eq!(spill.front(), Some(&b"wraps"[..]));
    }
}
