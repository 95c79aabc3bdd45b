//! The coherence engine: one service thread per process runs it.
//!
//! Protocol (IVY-style write-invalidate, home-based directory): page `p`'s home is rank
//! `p % size`; the home keeps `p`'s owner, whether the owner may write, and the copy set, and it
//! handles one request for `p` at a time (others queue in FIFO order). A requester sends
//! `Request` to the home. The home:
//! - read, owner writable: `Forward` to the owner, which downgrades itself and sends the page
//!   with a `Grant`; the requester installs it and sends `Done` to the home.
//! - read, owner read-only: `Grant` with the page attached if the home holds a copy (complete at
//!   once: later messages from the home to the requester arrive after the grant), else `Grant`
//!   telling the requester to read the owner's runtime view; the requester then sends `Done`.
//! - write: `Revoke` every other copy and wait for every acknowledgement; then `Grant` (page
//!   attached from the home, or no data if the requester holds a valid copy), or `Forward` to the
//!   owner, which invalidates itself and sends the page. The requester becomes the only holder.
//!
//! New contents land in the runtime view first; the application view opens only afterwards, in
//! the service thread, which applies every protection change of this process in message order.
//! A page just installed is not taken away before the thread it was installed for has resumed
//! (at most `MAX_HOLD`), plus an optional fixed window (`GALLOCY_HOLD_US`), so that a thread
//! contending for a page always gets to use it once: no livelock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use gallocy_transport::{Event, Span};

use crate::clock::now_ns;
use crate::region::Access;
use crate::runtime::{fatal, fatal_with, Runtime, EXIT_PEER_LOST, PAUSE, PAUSED, RUN};
use crate::wire::{self, Msg, Source};

/// A request waiting at (or being served by) a home.
#[derive(Clone, Copy, Debug)]
struct Req {
    from: usize,
    slot: u32,
    write: bool,
}

/// What the home does when the last revoke acknowledgement arrives.
#[derive(Clone, Copy, Debug)]
enum AfterAcks {
    /// The requester holds a valid copy: grant write without data.
    GrantValid,
    /// The home holds a valid copy: grant (read or write, as requested) with the page attached.
    GrantInline,
    /// Ask the owner to hand the page over.
    ForwardTo(usize),
}

/// What the home records when the requester's `Done` arrives.
#[derive(Clone, Copy, Debug)]
enum OnDone {
    AddReader,
    NewOwner,
}

#[derive(Clone, Copy, Debug)]
enum Txn {
    AwaitAcks { req: Req, remaining: u32, then: AfterAcks },
    AwaitDone { req: Req, on_done: OnDone },
}

/// The home's record of one page.
struct DirEntry {
    owner: usize,
    /// The owner has (or may have) write access; then nobody else holds a copy.
    writable: bool,
    /// Readers other than the owner.
    copyset: u64,
    txn: Option<Txn>,
    queue: VecDeque<Req>,
}

/// Global lock state at its home.
#[derive(Default)]
struct LockHome {
    holder: Option<(usize, u32)>,
    queue: VecDeque<(usize, u32)>,
}

/// How long after a local thread's last self-served wait the service thread keeps ignoring
/// socket readiness (so it does not wake on, and race for, the answers of the next fault).
const DEAF_LINGER_NS: u64 = 2_000_000;
/// How often a deaf service thread still looks at the sockets.
const DEAF_POLL: Duration = Duration::from_micros(500);

/// Longest a page waits for the thread it was installed for to resume.
const MAX_HOLD_NS: u64 = 5_000_000;

fn bit(rank: usize) -> u64 {
    1u64 << rank
}

/// The service thread's state.
pub struct Engine<'a> {
    rt: &'a Runtime,
    me: usize,
    dir: HashMap<u64, DirEntry>,
    self_queue: VecDeque<Msg>,
    /// Revokes/forwards waiting for a hold to end: (from, message).
    deferred: VecDeque<(usize, Msg)>,
    /// Pages being read from an owner: page -> (slot, write).
    reads: HashMap<u64, (u32, bool)>,
    barrier_arrivals: HashMap<u64, usize>,
    locks: HashMap<u32, LockHome>,
    last_heard: Vec<u64>,
    last_ping: u64,
    departed: Vec<bool>,
    buf: Vec<u8>,
}

impl<'a> Engine<'a> {
    pub fn new(rt: &'a Runtime) -> Engine<'a> {
        let now = now_ns();
        Engine {
            rt,
            me: rt.rank,
            dir: HashMap::new(),
            self_queue: VecDeque::new(),
            deferred: VecDeque::new(),
            reads: HashMap::new(),
            barrier_arrivals: HashMap::new(),
            locks: HashMap::new(),
            last_heard: vec![now; rt.size],
            last_ping: now,
            departed: vec![false; rt.size],
            buf: vec![0u8; wire::LIMIT],
        }
    }

    /// The service loop. Never returns while the job runs; ends after every peer left.
    pub fn run(mut self) {
        let spin_ns = self.rt.settings.spin.as_nanos() as u64;
        let mut last_activity = now_ns();
        let mut idle_spins = 0u32;
        loop {
            if self.rt.service_pause.load(Ordering::Acquire) == PAUSE {
                self.pause_for_fork();
            }
            let mut handled = self.take_local_work();
            handled += self.pump(Duration::ZERO);
            if self.rt.leaving.load(Ordering::Acquire) && self.all_departed() {
                self.rt.all_departed.store(true, Ordering::Release);
                return;
            }
            let now = now_ns();
            if handled > 0 {
                last_activity = now;
                idle_spins = 0;
                continue;
            }
            if now.saturating_sub(last_activity) < spin_ns {
                idle_spins = idle_spins.wrapping_add(1);
                if idle_spins.is_multiple_of(64) {
                    // SAFETY: sched_yield has no preconditions.
                    unsafe { libc::sched_yield() };
                }
                continue;
            }
            self.idle();
        }
    }

    /// Stays still while a local thread forks (see `preload::before_fork`): no page changes
    /// hands here until the child has its snapshot.
    fn pause_for_fork(&mut self) {
        let w = &self.rt.service_pause;
        if w.compare_exchange(PAUSE, PAUSED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            crate::futex::wake(w, i32::MAX);
        }
        while w.load(Ordering::Acquire) == PAUSED {
            crate::futex::wait(w, PAUSED, None);
        }
    }

    /// Blocks until there may be work. While local threads spin for answers they read the
    /// sockets themselves, so we then wait only for their call (or a short timeout) instead of
    /// waking on every frame and competing with them for the two CPUs.
    fn idle(&mut self) {
        let transport = self.rt.transport().expect("a job of several processes has a transport");
        let recent_waits = now_ns().saturating_sub(self.rt.last_wait_end.load(Ordering::Acquire)) < DEAF_LINGER_NS;
        if self.rt.slots.spinners.load(Ordering::Acquire) > 0 || recent_waits {
            // Waiting threads take their answers and signal us for anything else; between
            // their waits we still look every DEAF_POLL.
            self.rt.service_deaf.store(true, Ordering::SeqCst);
            if !self.rt.slots_posted() && !self.rt.has_api_messages() {
                transport.wait_for_wake(DEAF_POLL);
            }
            self.rt.service_deaf.store(false, Ordering::SeqCst);
            return;
        }
        self.rt.service_sleeping.store(true, Ordering::SeqCst);
        // Re-check for work posted just before we announced sleeping.
        if !self.rt.slots_posted() && !self.rt.has_api_messages() && self.rt.service_pause.load(Ordering::SeqCst) == RUN
        {
            let budget = self.sleep_budget();
            self.pump(budget);
        }
        self.rt.service_sleeping.store(false, Ordering::SeqCst);
    }

    /// Polls the transport (waiting at most `timeout`) and handles what arrived.
    fn pump(&mut self, timeout: Duration) -> usize {
        let transport = self.rt.transport().expect("a job of several processes has a transport");
        let mut events: Vec<(usize, Result<Msg, String>, Option<Span>)> = Vec::new();
        let mut reads_done: Vec<(usize, u64)> = Vec::new();
        let mut left: Vec<usize> = Vec::new();
        let r = transport.poll(Some(timeout), &mut |ev| match ev {
            Event::Message { from, bytes, page } => events.push((from, wire::decode(bytes), page)),
            Event::ReadDone { from, token } => reads_done.push((from, token)),
            Event::PeerLeft { rank } => left.push(rank),
        });
        let now = now_ns();
        let mut handled = 0;
        for (from, msg, page) in events {
            self.last_heard[from] = now;
            match msg {
                Ok(m) => self.handle(from, m, page),
                Err(e) => fatal(self.rt, &format!("rank {from} sent a malformed message: {e}")),
            }
            // What we told ourselves (e.g. a home revoking its own copy) follows at once.
            self.drain_self_queue();
            handled += 1;
        }
        for (from, token) in reads_done {
            self.last_heard[from] = now;
            self.read_done(from, token);
            handled += 1;
        }
        for rank in left {
            self.departed[rank] = true;
            handled += 1;
        }
        handled += self.run_deferred(now);
        self.keep_alive(now);
        if let Err(e) = r {
            if self.rt.leaving.load(Ordering::Acquire) && self.all_departed_or(&e) {
                return handled + 1;
            }
            self.transport_failed(&e);
        }
        handled
    }

    fn all_departed(&self) -> bool {
        self.departed.iter().enumerate().all(|(r, d)| *d || r == self.me)
    }

    fn describe_transport_error(&self, e: &gallocy_transport::TransportError) -> String {
        match e {
            gallocy_transport::TransportError::PeerLost { rank, reason } => {
                format!("lost contact with rank {rank}: {reason}")
            }
            other => other.to_string(),
        }
    }

    /// Ends the process after a transport failure, telling the other survivors first which rank
    /// was lost (so that they name it, not us, when we disappear in turn).
    fn transport_failed(&mut self, e: &gallocy_transport::TransportError) -> ! {
        if let gallocy_transport::TransportError::PeerLost { rank, .. } = e {
            self.lost(*rank, &self.describe_transport_error(e));
        }
        fatal_with(self.rt, EXIT_PEER_LOST, &self.describe_transport_error(e))
    }

    /// Tells every other live peer that `rank` is lost, then ends the process with `why`.
    fn lost(&mut self, rank: usize, why: &str) -> ! {
        let transport = self.rt.transport().expect("transport");
        let mut buf = [0u8; 32];
        if let Ok(bytes) = wire::encode(&Msg::Lost { rank: rank as u32 }, &mut buf) {
            for r in (0..self.rt.size).filter(|r| *r != self.me && *r != rank && !self.departed[*r]) {
                let _ = transport.send(r, bytes, None);
            }
        }
        fatal_with(self.rt, EXIT_PEER_LOST, why)
    }

    /// While leaving, a peer that closes without a goodbye after the final barrier is fine.
    fn all_departed_or(&mut self, e: &gallocy_transport::TransportError) -> bool {
        if let gallocy_transport::TransportError::PeerLost { rank, .. } = e {
            self.departed[*rank] = true;
        }
        self.all_departed()
    }

    /// How long the loop may block: until the next deferred revoke or heartbeat.
    fn sleep_budget(&self) -> Duration {
        let now = now_ns();
        if !self.deferred.is_empty() {
            return Duration::from_millis(1);
        }
        let until = self.last_ping + 1_000_000_000;
        Duration::from_nanos(until.saturating_sub(now).clamp(1_000_000, 1_000_000_000))
    }

    /// Local fault requests, messages from application threads, messages to ourselves.
    fn take_local_work(&mut self) -> usize {
        let mut posted = Vec::new();
        let mut n = self.rt.slots.take_posted(|i, s| {
            posted.push((i, s.page.load(Ordering::Acquire), s.write.load(Ordering::Acquire)));
        });
        for (slot, page, write) in posted {
            self.handle(self.me, Msg::Request { page, write, slot }, None);
        }
        for (to, m) in self.rt.take_api_messages() {
            self.send(to, m, None);
            n += 1;
        }
        n + self.drain_self_queue()
    }

    fn drain_self_queue(&mut self) -> usize {
        let mut n = 0;
        while let Some(m) = self.self_queue.pop_front() {
            self.handle(self.me, m, None);
            n += 1;
        }
        n
    }

    fn keep_alive(&mut self, now: u64) {
        if self.rt.leaving.load(Ordering::Acquire) {
            return;
        }
        if now.saturating_sub(self.last_ping) >= 1_000_000_000 {
            self.last_ping = now;
            let peers: Vec<usize> = (0..self.rt.size).filter(|r| *r != self.me && !self.departed[*r]).collect();
            for r in peers {
                self.send(r, Msg::Ping, None);
            }
        }
        let limit = self.rt.settings.peer_timeout.as_nanos() as u64;
        for r in (0..self.rt.size).filter(|r| *r != self.me && !self.departed[*r]) {
            if now.saturating_sub(self.last_heard[r]) > limit {
                let why =
                    format!("lost contact with rank {r}: no word from it for {:?}", self.rt.settings.peer_timeout);
                self.lost(r, &why);
            }
        }
    }

    /// Sends a message; to ourselves it goes through the local queue.
    fn send(&mut self, to: usize, msg: Msg, page: Option<u64>) {
        if to == self.me {
            self.self_queue.push_back(msg);
            return;
        }
        let span = page.map(|p| {
            self.rt.stats.count(&self.rt.stats.bytes_out, self.rt.region.page as u64);
            Span { offset: p * self.rt.region.page as u64, len: self.rt.region.page as u32 }
        });
        let bytes = match wire::encode(&msg, &mut self.buf) {
            Ok(b) => b,
            Err(e) => fatal(self.rt, &format!("cannot encode a message: {e}")),
        };
        let transport = self.rt.transport().expect("transport");
        if let Err(e) = transport.send(to, bytes, span) {
            self.transport_failed(&e);
        }
    }

    fn handle(&mut self, from: usize, msg: Msg, page: Option<Span>) {
        if let Some(span) = page {
            if from != self.me {
                self.rt.stats.count(&self.rt.stats.bytes_in, u64::from(span.len));
            }
        }
        match msg {
            Msg::Request { page, write, slot } => {
                self.check_page(from, page);
                if self.rt.home(page as usize) != self.me {
                    fatal(
                        self.rt,
                        &format!("rank {from} asked rank {} for page {page}, which it is not home of", self.me),
                    );
                }
                self.home_request(page, Req { from, slot, write });
            }
            Msg::Forward { page, .. } | Msg::Revoke { page, .. } if self.held(page) => {
                self.deferred.push_back((from, msg));
            }
            Msg::Forward { page, requester, slot, write } => {
                self.check_page(from, page);
                self.forward(page, requester as usize, slot, write);
            }
            Msg::Revoke { page, to_read } => {
                self.check_page(from, page);
                self.revoke(from, page, to_read);
            }
            Msg::Grant { page, slot, write, source } => {
                self.check_page(from, page);
                self.grant(from, page, slot, write, source);
            }
            Msg::Done { page } => self.home_done(page),
            Msg::RevokeAck { page } => self.home_ack(page),
            Msg::Free { addr } => {
                if let Err(e) = crate::alloc::free_local(self.rt, addr as usize) {
                    fatal(self.rt, &format!("rank {from} freed {addr:#x}: {e}"));
                }
            }
            Msg::BarrierArrive { epoch } => {
                let n = self.barrier_arrivals.entry(epoch).or_insert(0);
                *n += 1;
                if *n == self.rt.size {
                    self.barrier_arrivals.remove(&epoch);
                    for r in 0..self.rt.size {
                        self.send(r, Msg::BarrierRelease { epoch }, None);
                    }
                }
            }
            Msg::BarrierRelease { epoch } => self.rt.sync.barrier_released(epoch),
            Msg::LockAcquire { id, slot } => self.lock_acquire(id, from, slot),
            Msg::LockGranted { slot, .. } => {
                if !self.rt.slots.complete(slot) {
                    fatal(self.rt, &format!("rank {from} granted a lock to slot {slot}, which is not waiting"));
                }
            }
            Msg::LockRelease { id } => self.lock_release(id, from),
            Msg::Broadcast { seq, total, offset, data } => {
                if let Err(e) = self.rt.sync.broadcast_chunk(seq, total, offset, &data) {
                    fatal(self.rt, &format!("bad broadcast from rank {from}: {e}"));
                }
            }
            Msg::SizeQuery { addr, slot } => {
                let size = self.rt.alloc.usable_size(addr as usize).unwrap_or(0) as u64;
                self.send(from, Msg::SizeReply { slot, size }, None);
            }
            Msg::SizeReply { slot, size } => match self.rt.slots.get(slot) {
                Some(s) => {
                    s.result.store(size, Ordering::Release);
                    self.rt.slots.complete(slot);
                }
                None => fatal(self.rt, &format!("rank {from} answered slot {slot}, which does not exist")),
            },
            Msg::Ping => {}
            Msg::Lost { rank } => {
                let why = format!("lost contact with rank {rank} (rank {from} lost it and stopped)");
                fatal_with(self.rt, EXIT_PEER_LOST, &why);
            }
        }
    }

    fn check_page(&self, from: usize, page: u64) {
        if page as usize >= self.rt.region.pages() {
            fatal(self.rt, &format!("rank {from} named page {page}, beyond the heap"));
        }
    }

    /// Whether `page` must stay with us a little longer (see the module comment).
    fn held(&mut self, page: u64) -> bool {
        let age = now_ns().saturating_sub(self.rt.pt.installed_at(page as usize));
        let waiting_thread = self.rt.pt.is_fresh(page as usize) && age < MAX_HOLD_NS;
        waiting_thread || age < self.rt.settings.hold.as_nanos() as u64
    }

    fn run_deferred(&mut self, _now: u64) -> usize {
        let mut n = 0;
        for _ in 0..self.deferred.len() {
            let (from, msg) = self.deferred.pop_front().expect("counted");
            let page = match &msg {
                Msg::Forward { page, .. } | Msg::Revoke { page, .. } => *page,
                _ => unreachable!("only forwards and revokes are deferred"),
            };
            if self.held(page) {
                self.deferred.push_back((from, msg));
            } else {
                self.handle(from, msg, None);
                n += 1;
            }
        }
        n
    }

    // ----- home side -----

    fn entry(&mut self, page: u64) -> &mut DirEntry {
        let owner = self.rt.arena_rank(page as usize);
        self.dir.entry(page).or_insert_with(|| DirEntry {
            owner,
            writable: true,
            copyset: 0,
            txn: None,
            queue: VecDeque::new(),
        })
    }

    fn home_request(&mut self, page: u64, req: Req) {
        let e = self.entry(page);
        if e.txn.is_some() {
            e.queue.push_back(req);
            return;
        }
        self.start(page, req);
    }

    fn start(&mut self, page: u64, req: Req) {
        let me = self.me;
        let e = self.entry(page);
        let holders = e.copyset | bit(e.owner);
        let (owner, writable) = (e.owner, e.writable);
        let r = req.from;
        let (victims, to_read, then) = if !req.write {
            if holders & bit(r) != 0 {
                let write = owner == r && writable;
                self.send(r, Msg::Grant { page, slot: req.slot, write, source: Source::Valid }, None);
                return self.finish(page);
            }
            if holders & bit(me) != 0 && !writable {
                if self.one_sided() {
                    // The requester reads our copy; it stays put until the requester's Done.
                    self.entry(page).txn = Some(Txn::AwaitDone { req, on_done: OnDone::AddReader });
                    let grant = Msg::Grant { page, slot: req.slot, write: false, source: Source::ReadFrom(me as u32) };
                    return self.send(r, grant, None);
                }
                self.entry(page).copyset |= bit(r);
                self.send(r, Msg::Grant { page, slot: req.slot, write: false, source: Source::Inline }, Some(page));
                return self.finish(page);
            }
            if owner == me {
                // We own it writable: downgrade ourselves (a revoke, so the hold rule applies),
                // then send the page with the grant.
                (bit(me), true, AfterAcks::GrantInline)
            } else if writable {
                self.entry(page).txn = Some(Txn::AwaitDone { req, on_done: OnDone::AddReader });
                let fwd = Msg::Forward { page, requester: r as u32, slot: req.slot, write: false };
                return self.send(owner, fwd, None);
            } else {
                self.entry(page).txn = Some(Txn::AwaitDone { req, on_done: OnDone::AddReader });
                let grant = Msg::Grant { page, slot: req.slot, write: false, source: Source::ReadFrom(owner as u32) };
                return self.send(r, grant, None);
            }
        } else if holders & bit(r) != 0 {
            (holders & !bit(r), false, AfterAcks::GrantValid)
        } else if holders & bit(me) != 0 {
            // We hold a copy: invalidate every copy (ours included), then send ours.
            (holders, false, AfterAcks::GrantInline)
        } else if writable {
            self.entry(page).txn = Some(Txn::AwaitDone { req, on_done: OnDone::NewOwner });
            let fwd = Msg::Forward { page, requester: r as u32, slot: req.slot, write: true };
            return self.send(owner, fwd, None);
        } else {
            (holders & !bit(owner), false, AfterAcks::ForwardTo(owner))
        };
        self.entry(page).txn = Some(Txn::AwaitAcks { req, remaining: victims.count_ones(), then });
        if victims == 0 {
            return self.after_acks(page);
        }
        for v in (0..self.rt.size).filter(|v| victims & bit(*v) != 0) {
            if !to_read {
                self.rt.stats.count(&self.rt.stats.invalidations_sent, 1);
            }
            self.send(v, Msg::Revoke { page, to_read }, None);
        }
    }

    fn home_ack(&mut self, page: u64) {
        match self.dir.get_mut(&page).and_then(|e| e.txn.as_mut()) {
            Some(Txn::AwaitAcks { remaining, .. }) if *remaining > 0 => {
                *remaining -= 1;
                if *remaining == 0 {
                    self.after_acks(page);
                }
            }
            _ => fatal(self.rt, &format!("unexpected revoke acknowledgement for page {page}")),
        }
    }

    fn after_acks(&mut self, page: u64) {
        let Some(Txn::AwaitAcks { req, then, .. }) = self.entry(page).txn else {
            fatal(self.rt, "acknowledgements complete without a transaction");
        };
        match then {
            AfterAcks::GrantInline if self.one_sided() => {
                // Our copy (now read-only or invalid for us) is what the requester reads; the
                // directory changes when it says Done.
                let on_done = if req.write { OnDone::NewOwner } else { OnDone::AddReader };
                self.entry(page).txn = Some(Txn::AwaitDone { req, on_done });
                let source = Source::ReadFrom(self.me as u32);
                self.send(req.from, Msg::Grant { page, slot: req.slot, write: req.write, source }, None);
            }
            AfterAcks::GrantValid | AfterAcks::GrantInline => {
                let (source, attach) = match then {
                    AfterAcks::GrantValid => (Source::Valid, None),
                    _ => (Source::Inline, Some(page)),
                };
                let e = self.entry(page);
                if req.write {
                    e.owner = req.from;
                    e.writable = true;
                    e.copyset = 0;
                } else {
                    e.writable = false;
                    e.copyset |= bit(req.from);
                }
                self.send(req.from, Msg::Grant { page, slot: req.slot, write: req.write, source }, attach);
                self.finish(page);
            }
            AfterAcks::ForwardTo(owner) => {
                self.entry(page).txn = Some(Txn::AwaitDone { req, on_done: OnDone::NewOwner });
                self.rt.stats.count(&self.rt.stats.invalidations_sent, 1);
                let fwd = Msg::Forward { page, requester: req.from as u32, slot: req.slot, write: true };
                self.send(owner, fwd, None);
            }
        }
    }

    fn home_done(&mut self, page: u64) {
        let txn = self.dir.get(&page).and_then(|e| e.txn);
        let Some(Txn::AwaitDone { req, on_done }) = txn else {
            fatal(self.rt, &format!("unexpected completion for page {page}"));
        };
        let e = self.entry(page);
        match on_done {
            OnDone::AddReader => {
                e.writable = false;
                e.copyset |= bit(req.from);
                e.copyset &= !bit(e.owner);
            }
            OnDone::NewOwner => {
                e.owner = req.from;
                e.writable = true;
                e.copyset = 0;
            }
        }
        self.finish(page);
    }

    fn finish(&mut self, page: u64) {
        let e = self.entry(page);
        e.txn = None;
        if let Some(next) = e.queue.pop_front() {
            self.start(page, next);
        }
    }

    // ----- holder side -----

    fn set_access(&self, page: u64, access: Access) {
        if self.rt.pt.access(page as usize) == access {
            return;
        }
        if let Err(errno) = self.rt.region.protect(page as usize, 1, access) {
            crate::runtime::protect_failed(self.rt, errno);
        }
        self.rt.pt.set(page as usize, access);
    }

    fn revoke(&mut self, home: usize, page: u64, to_read: bool) {
        if to_read {
            if self.rt.pt.access(page as usize) == Access::Write {
                self.set_access(page, Access::Read);
            }
        } else {
            self.rt.stats.count(&self.rt.stats.invalidations_received, 1);
            self.set_access(page, Access::None);
        }
        self.send(home, Msg::RevokeAck { page }, None);
    }

    fn forward(&mut self, page: u64, requester: usize, slot: u32, write: bool) {
        if write {
            self.rt.stats.count(&self.rt.stats.invalidations_received, 1);
            self.set_access(page, Access::None);
        } else if self.rt.pt.access(page as usize) == Access::Write {
            self.set_access(page, Access::Read);
        }
        if self.one_sided() {
            // The requester reads the page from our runtime view, which keeps it until the home
            // has the requester's Done.
            self.send(requester, Msg::Grant { page, slot, write, source: Source::ReadFrom(self.me as u32) }, None);
        } else {
            self.send(requester, Msg::Grant { page, slot, write, source: Source::Forwarded }, Some(page));
        }
    }

    /// Pages travel by one-sided reads (RDMA) instead of being pushed with the grant.
    fn one_sided(&self) -> bool {
        self.rt.transport().is_some_and(|t| t.one_sided_reads())
    }

    fn grant(&mut self, from: usize, page: u64, slot: u32, write: bool, source: Source) {
        match source {
            Source::Inline | Source::Valid => self.install(page, slot, write, false),
            Source::Forwarded => self.install(page, slot, write, true),
            Source::ReadFrom(owner) => {
                let owner = owner as usize;
                if owner >= self.rt.size || owner == self.me {
                    fatal(self.rt, &format!("rank {from} told us to read page {page} from rank {owner}"));
                }
                self.reads.insert(page, (slot, write));
                let span = Span { offset: page * self.rt.region.page as u64, len: self.rt.region.page as u32 };
                let transport = self.rt.transport().expect("transport");
                if let Err(e) = transport.start_read(owner, span, page) {
                    self.transport_failed(&e);
                }
            }
        }
    }

    fn read_done(&mut self, from: usize, page: u64) {
        let Some((slot, write)) = self.reads.remove(&page) else {
            fatal(self.rt, &format!("rank {from} answered a read of page {page} nobody asked for"));
        };
        self.rt.stats.count(&self.rt.stats.bytes_in, self.rt.region.page as u64);
        // The home waits for our word that the owner's copy is no longer needed.
        self.install(page, slot, write, true);
    }

    /// New contents are in the runtime view: open the application view, tell the home when it
    /// waits for us, wake the waiting thread.
    fn install(&mut self, page: u64, slot: u32, write: bool, notify_home: bool) {
        if !grant_matches(self.rt, page, slot) {
            fatal(self.rt, &format!("grant for page {page} names slot {slot}, which does not wait for it"));
        }
        open_page(self.rt, page, write);
        if notify_home {
            self.send(self.rt.home(page as usize), Msg::Done { page }, None);
        }
        self.rt.slots.complete(slot);
    }

    // ----- global locks (home: id % size) -----

    fn lock_acquire(&mut self, id: u32, from: usize, slot: u32) {
        let l = self.locks.entry(id).or_default();
        if l.holder.is_none() {
            l.holder = Some((from, slot));
            self.send(from, Msg::LockGranted { id, slot }, None);
        } else {
            l.queue.push_back((from, slot));
        }
    }

    fn lock_release(&mut self, id: u32, from: usize) {
        let l = self.locks.entry(id).or_default();
        match l.holder {
            Some((holder, _)) if holder == from => {}
            _ => fatal(self.rt, &format!("rank {from} released global lock {id}, which it does not hold")),
        }
        l.holder = l.queue.pop_front();
        if let Some((next, slot)) = l.holder {
            self.send(next, Msg::LockGranted { id, slot }, None);
        }
    }
}

/// Whether `slot` is a local thread waiting for `page`. Async-signal-safe.
pub fn grant_matches(rt: &Runtime, page: u64, slot: u32) -> bool {
    (page as usize) < rt.region.pages() && rt.slots.get(slot).is_some_and(|s| s.page.load(Ordering::Acquire) == page)
}

/// Opens the application view of `page`, whose new contents are complete in the runtime view,
/// and marks it as just installed. Async-signal-safe.
pub fn open_page(rt: &Runtime, page: u64, write: bool) {
    let access = if write { Access::Write } else { Access::Read };
    if rt.pt.access(page as usize) != access {
        if let Err(errno) = rt.region.protect(page as usize, 1, access) {
            crate::runtime::protect_failed(rt, errno);
        }
        rt.pt.set(page as usize, access);
    }
    rt.pt.mark_installed(page as usize, now_ns());
}
