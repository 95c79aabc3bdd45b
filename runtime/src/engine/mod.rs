//! The engine: one service thread per process drives the protocol (`crate::protocol`). It feeds
//! the state machines what arrives (from peers, from local threads, from itself) and carries out
//! what they decide: sending messages, changing this process's page protections, starting
//! one-sided reads, waking waiting threads.
//!
//! New contents land in the runtime view first; the application view opens only afterwards, in
//! the service thread or in the waiting thread itself (`fault::acquire`). A page just installed
//! is not taken away before the thread it was installed for has resumed (at most
//! [`MAX_HOLD_NS`]), plus an optional fixed window (`GALLOCY_HOLD_US`), so that a thread
//! contending for a page always gets to use it once: no livelock.

mod coalesce;
pub mod link;
mod liveness;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use gallocy_transport::{Event, Span, TransportError};

use crate::fault::acquire::{attached, open_page, read_from_host_peer};
use crate::fault::prefetch::contended;
use crate::heap::region::Access;
use crate::job::runtime::{fatal, Runtime};
use crate::protocol::holder::{self, check_received};
use crate::protocol::locks::Locks;
use crate::protocol::sharing::Sharing;
use crate::protocol::{wire, Attached, Directory, Msg, Page, Rank, Send, Source, Violation, Waiter};
use crate::sys::clock::now_ns;
use crate::sys::sched::RunQueue;
use coalesce::Coalescer;
use liveness::Liveness;

/// How often a deaf service thread still looks at the sockets.
const DEAF_POLL: Duration = Duration::from_micros(500);

/// Idle turns of the service thread's spin between two looks at whether a CPU is still free.
const SPINS_PER_CPU_CHECK: u32 = 16;

/// Longest a page waits for the thread it was installed for to resume.
pub const MAX_HOLD_NS: u64 = 5_000_000;

/// A message as it arrived: who sent it, what it says, a broadcast's payload, what came attached.
struct Arrival {
    from: Rank,
    msg: Msg,
    payload: Vec<u8>,
    attached: Attached,
}

/// The service thread's state.
pub struct Engine<'a> {
    rt: &'a Runtime,
    me: Rank,
    one_sided: bool,
    /// Memory of the heap may go back to the system ([`gallocy_transport::Transport::holes_reach_readers`]).
    may_release: bool,
    dir: Directory,
    /// The home side of release consistency (`None` under sequential consistency).
    sharing: Option<Sharing>,
    locks: Locks,
    /// Messages to ourselves, handled right after the message that caused them.
    self_queue: VecDeque<Msg>,
    /// Revokes/forwards waiting for a hold to end: (from, message, when it arrived).
    deferred: VecDeque<(Rank, Msg, u64)>,
    /// When the messages being handled arrived from peers (0: they did not; now is meant). A
    /// copy they drop was lost then: a writer's batch of revokes arrives at once, however long
    /// handling them takes (a `mprotect` and a hole punched per page, slow under emulation) or
    /// however long one of them waits for a hold, so the pages keep the same time
    /// ([`crate::fault::prefetch`] brings back together what was lost together).
    arrived_at: u64,
    /// Pages being read from an owner: page -> (waiter, write).
    reads: HashMap<Page, (Waiter, bool)>,
    liveness: Liveness,
    /// What the state machines want sent (reused).
    out: Vec<Send>,
    buf: Vec<u8>,
    /// Says whether a CPU is free to spin on.
    run_queue: RunQueue,
    /// Downgrades and messages held back while one batch of arrivals is handled.
    batch: Coalescer,
    /// The last wait ended by its timeout, with no message (for
    /// [`Stats::held_past_resume`](crate::stats::Stats)) ...
    timed_look: bool,
    /// ... and the wake-ups from resumed threads counted when it began: a held-back message let
    /// go after it, with none since, waited for the timeout although its thread had resumed.
    look_wakes: u64,
}

/// The transport's check of arriving page contents ([`gallocy_transport::tcp::PageCheck`]): they
/// land only with a grant of that page to a thread of ours that waits for it. Runs on whichever
/// thread reads the connection (a faulting thread too): decodes without allocating, reads atomics.
pub fn contents_owed(_from: usize, msg: &[u8], span: Span) -> bool {
    let Some(rt) = crate::job::runtime::RUNTIME.get() else { return false };
    let Ok((msg, _)) = wire::decode(msg) else { return false };
    let page_size = rt.region().page as u64;
    holder::owes_contents(&msg, span.offset, span.len, page_size, |w, p| rt.slots().waits_for_page(w, p))
}

/// The transport's check of a peer's read of our memory ([`gallocy_transport::tcp::ReadCheck`]):
/// one whole page this rank holds read-only, where a `ReadFrom` grant sends readers. Runs on
/// whichever thread reads the connection (a faulting thread too): reads atomics only.
pub fn read_owed(_from: usize, span: Span) -> bool {
    let Some(rt) = crate::job::runtime::RUNTIME.get() else { return false };
    let page_size = rt.region().page as u64;
    holder::owes_read(span.offset, span.len, page_size, |page| {
        rt.placement().contains(page).then(|| rt.pt().access(page as usize))
    })
}

/// Release consistency: another rank shares `page` of ours from now on. Marks it shared, then
/// says whether this rank (the home) already wrote it alone: paired with the home's fault path
/// (`fault::release_miss`), which marks itself a writer, then looks for sharers.
fn mark_shared(rt: &Runtime, from: Rank, page: Page) -> bool {
    let shared_page = from != rt.rank() && rt.placement().contains(page) && rt.home(page as usize) == rt.rank();
    if shared_page {
        rt.pt().mark_has_sharers(page as usize);
    }
    shared_page && rt.pt().is_writer(page as usize)
}

impl<'a> Engine<'a> {
    pub fn new(rt: &'a Runtime) -> Engine<'a> {
        let one_sided = rt.transport().is_some_and(|t| t.one_sided_reads());
        Engine {
            rt,
            me: rt.rank(),
            one_sided,
            may_release: rt.transport().is_none_or(|t| t.holes_reach_readers()),
            dir: Directory::new(rt.rank(), *rt.placement(), one_sided),
            sharing: rt.release().map(|_| Sharing::new(rt.rank(), *rt.placement(), one_sided)),
            locks: Locks::default(),
            self_queue: VecDeque::new(),
            deferred: VecDeque::new(),
            arrived_at: 0,
            reads: HashMap::new(),
            liveness: Liveness::new(rt.rank(), rt.size(), now_ns()),
            out: Vec::new(),
            buf: vec![0u8; wire::LIMIT],
            run_queue: RunQueue::open(),
            batch: Coalescer::default(),
            timed_look: false,
            look_wakes: 0,
        }
    }

    /// The service loop. Never returns while the job runs; ends after every peer left.
    pub fn run(mut self) {
        let spin_ns = self.rt.settings().spin.as_nanos() as u64;
        let mut last_activity = now_ns();
        let mut idle_spins = 0u32;
        loop {
            self.rt.service().pause_if_asked();
            let mut handled = self.take_local_work();
            handled += self.pump(Duration::ZERO);
            handled += self.end_graces();
            if self.rt.membership().leaving() && self.liveness.all_departed(self.rt) {
                self.rt.membership().set_all_departed();
                return;
            }
            let now = now_ns();
            if handled > 0 {
                last_activity = now;
                idle_spins = 0;
                continue;
            }
            // Spin only while no local thread reads the sockets itself (a thread waiting for an
            // answer takes it, and the spin would only take a CPU from it or from the peer that
            // answers), and only while a CPU is free: a thread that computes or spins on a
            // shared flag needs it more.
            if now.saturating_sub(last_activity) < spin_ns && self.rt.slots().spinners() == 0 {
                idle_spins = idle_spins.wrapping_add(1);
                if idle_spins.is_multiple_of(SPINS_PER_CPU_CHECK) && !self.run_queue.cpu_free() {
                    last_activity = 0;
                }
                continue;
            }
            if self.idle() > 0 && self.run_queue.cpu_free() {
                // What woke us is activity too: spin for the next message as after any other.
                last_activity = now_ns();
                idle_spins = 0;
            }
        }
    }

    /// Gives back the recalled locks whose grace is over and that no thread holds; returns how
    /// many went.
    fn end_graces(&mut self) -> usize {
        let Some(end) = self.rt.service().grace_end() else { return 0 };
        let now = now_ns();
        if now < end {
            return 0;
        }
        let releases = {
            let mut cache = self.rt.lock_cache();
            let releases = cache.expired(now);
            self.rt.service().set_grace_end(cache.next_grace_end(now));
            releases
        };
        let n = releases.len();
        for msg in releases {
            if let Msg::LockRelease { id } = msg {
                self.send(id as usize % self.rt.size(), msg);
            }
        }
        n
    }

    /// How long the service thread may block at most: until the next grace ends, capped at
    /// `cap`.
    fn until_grace_end(&self, cap: Duration) -> Duration {
        match self.rt.service().grace_end() {
            Some(end) => cap.min(Duration::from_nanos(end.saturating_sub(now_ns()))),
            None => cap,
        }
    }

    /// Blocks until there may be work. While local threads spin for answers they read the
    /// sockets themselves, so we then wait only for their call (or a short timeout) instead of
    /// waking on every frame and competing with them for the two CPUs. Returns how many events
    /// it handled.
    fn idle(&mut self) -> usize {
        let rt = self.rt;
        let transport = rt.transport().expect("a job of several processes has a transport");
        // Only while a thread spins: a thread spinning in application code (on a shared flag, or
        // computing) reads no socket, and a revoke or forward for its process must not wait.
        if rt.slots().spinners() > 0 {
            // Waiting threads take their answers and signal us for anything else; between
            // their waits we still look every DEAF_POLL.
            rt.service().set_deaf(true);
            if !rt.slots().has_posted() && !rt.service().has_posted() && !self.deferred_ready() {
                let (wait, from, wakes) = (self.until_grace_end(DEAF_POLL), now_ns(), rt.service().resume_wakes());
                transport.wait_for_wake(wait);
                self.note_wait(wait, from, wakes, true);
            }
            rt.service().set_deaf(false);
            return 0;
        }
        rt.service().set_sleeping(true);
        let mut handled = 0;
        // Re-check for work posted just before we announced sleeping.
        if !rt.slots().has_posted()
            && !rt.service().has_posted()
            && rt.service().pause_state() == link::RUN
            && !self.deferred_ready()
        {
            let budget = self.liveness.sleep_budget(now_ns(), !self.deferred.is_empty());
            handled = self.pump(self.until_grace_end(budget));
        }
        rt.service().set_sleeping(false);
        handled
    }

    /// Polls the transport (waiting at most `timeout`) and handles what arrived.
    fn pump(&mut self, timeout: Duration) -> usize {
        let rt = self.rt;
        let transport = rt.transport().expect("a job of several processes has a transport");
        let mut arrivals: Vec<Arrival> = Vec::new();
        let mut reads_done: Vec<(Rank, u64)> = Vec::new();
        let mut left: Vec<Rank> = Vec::new();
        let (from, wakes) = (now_ns(), rt.service().resume_wakes());
        let r = transport.poll(Some(timeout), &mut |ev| match ev {
            Event::Message { from, bytes, page } => match wire::decode(bytes) {
                Ok((msg, payload)) => {
                    arrivals.push(Arrival { from, msg, payload: payload.to_vec(), attached: attached(rt, page) })
                }
                Err(e) => fatal(rt, &format!("rank {from} sent a malformed message: {e}")),
            },
            Event::ReadDone { from, token } => reads_done.push((from, token)),
            Event::PeerLeft { rank } => left.push(rank),
        });
        let now = now_ns();
        if !timeout.is_zero() {
            self.note_wait(timeout, from, wakes, arrivals.is_empty() && reads_done.is_empty() && left.is_empty());
        }
        let mut handled = 0;
        self.arrived_at = now;
        self.batch.begin();
        for a in arrivals {
            self.liveness.heard(a.from, now);
            if a.from != self.me {
                if let Attached::Page(_) = a.attached {
                    rt.stats().count(&rt.stats().bytes_in, rt.region().page as u64);
                }
            }
            self.handle(a.from, a.msg, &a.payload, a.attached);
            // What we told ourselves (e.g. a home revoking its own copy) follows at once.
            self.drain_self_queue();
            handled += 1;
        }
        self.end_batch();
        self.arrived_at = 0;
        for (from, token) in reads_done {
            self.liveness.heard(from, now);
            self.read_done(from, token);
            handled += 1;
        }
        for rank in left {
            self.peer_left(rank);
            handled += 1;
        }
        handled += self.run_deferred();
        if !rt.membership().leaving() {
            self.liveness.keep_alive(rt, now);
        }
        if let Err(e) = r {
            if rt.membership().leaving() && self.liveness.all_departed_or(rt, &e) {
                return handled + 1;
            }
            self.liveness.transport_failed(rt, &e);
        }
        handled
    }

    /// Local fault requests, messages from application threads, messages to ourselves.
    fn take_local_work(&mut self) -> usize {
        let mut posted = Vec::new();
        let mut n = self.rt.slots().take_posted(|waiter, page, write| posted.push((waiter, page, write)));
        for (waiter, page, write) in posted {
            self.handle(self.me, Msg::Request { page, write, waiter, direct: false }, &[], Attached::Nothing);
        }
        for (to, m) in self.rt.service().take_posted() {
            if to == self.me {
                self.handle(self.me, m, &[], Attached::Nothing);
            } else {
                self.send(to, m);
            }
            n += 1;
        }
        n + self.drain_self_queue()
    }

    fn drain_self_queue(&mut self) -> usize {
        let mut n = 0;
        while let Some(m) = self.self_queue.pop_front() {
            let attached = if m.attaches_page() { Attached::Page(m.page().unwrap_or(0)) } else { Attached::Nothing };
            self.handle(self.me, m, &[], attached);
            n += 1;
        }
        n
    }

    /// Sends a message (with its page attached when it carries one); to ourselves it goes
    /// through the local queue.
    fn send(&mut self, to: Rank, msg: Msg) {
        if to == self.me {
            self.self_queue.push_back(msg);
            return;
        }
        if self.batch.holds_sends() {
            self.batch.hold_send(to, msg);
            return;
        }
        self.apply_downgrades();
        let rt = self.rt;
        let span = msg.attaches_page().then(|| {
            rt.stats().count(&rt.stats().bytes_out, rt.region().page as u64);
            let len = rt.region().page as u32;
            Span { offset: msg.page().unwrap_or(0) * u64::from(len), len }
        });
        let bytes = match wire::encode(&msg, &[], &mut self.buf) {
            Ok(b) => b,
            Err(e) => fatal(rt, &format!("cannot encode a message: {e}")),
        };
        let transport = rt.transport().expect("a job of several processes has a transport");
        let result = transport.send(to, bytes, span);
        self.sent(result);
    }

    /// Sends messages that attach no page to `to`, in order, in as few system calls as the
    /// transport can.
    fn send_batch(&mut self, to: Rank, msgs: &[Msg]) {
        let rt = self.rt;
        let mut arena = Vec::with_capacity(msgs.len() * 64);
        let mut ends = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match wire::encode(msg, &[], &mut self.buf) {
                Ok(b) => arena.extend_from_slice(b),
                Err(e) => fatal(rt, &format!("cannot encode a message: {e}")),
            }
            ends.push(arena.len());
        }
        let mut start = 0;
        let frames: Vec<&[u8]> = ends
            .iter()
            .map(|&end| {
                let frame = &arena[start..end];
                start = end;
                frame
            })
            .collect();
        let transport = rt.transport().expect("a job of several processes has a transport");
        let result = transport.send_batch(to, &frames);
        self.sent(result);
    }

    /// Acts on how a send to a peer went.
    fn sent(&mut self, result: Result<(), TransportError>) {
        match result {
            Ok(()) => {}
            // It left before we ever talked to it: like a message to a peer after its goodbye,
            // this one goes nowhere.
            Err(TransportError::PeerLeft { rank }) => self.peer_left(rank),
            // We said goodbye: nobody expects anything new from us.
            Err(TransportError::Left) => {}
            Err(e) => self.liveness.transport_failed(self.rt, &e),
        }
    }

    /// `rank` left the job (its goodbye came, or it refused a connection because it is leaving).
    fn peer_left(&mut self, rank: Rank) {
        self.liveness.departed(rank);
        // Its barrier notices came before its goodbye: a thread still waiting for one (or
        // waiting for one later) ends the process with a clear message.
        self.rt.collectives().board().departed(self.rt.slots(), rank);
    }

    /// Sends what the state machines decided.
    fn flush(&mut self) {
        let out = std::mem::take(&mut self.out);
        for s in &out {
            if matches!(s.msg, Msg::Revoke { to_read: false, .. } | Msg::Forward { write: true, .. }) {
                self.rt.stats().count(&self.rt.stats().invalidations_sent, 1);
            }
            self.send(s.to, s.msg);
        }
        self.out = out;
        self.out.clear();
    }

    /// Ends the process on a protocol violation.
    fn violated(&self, v: Violation) -> ! {
        fatal(self.rt, &format!("protocol violation: {v}"))
    }

    fn handle(&mut self, from: Rank, msg: Msg, payload: &[u8], attached: Attached) {
        let rt = self.rt;
        if let Err(v) = check_received(rt.placement(), self.me, from, &msg, attached) {
            self.violated(v);
        }
        if let Err(v) = self.check_model(from, &msg) {
            self.violated(v);
        }
        let mut out = std::mem::take(&mut self.out);
        let result = match msg {
            Msg::Request { page, write, waiter, direct } => match &mut self.sharing {
                Some(sharing) => {
                    let home_writes = mark_shared(rt, from, page);
                    sharing.request(from, page, write, waiter, home_writes, &mut out)
                }
                None => self.dir.request(from, page, write, waiter, direct, &mut out),
            },
            Msg::Written { page, ack } => {
                if let Some(rc) = rt.release() {
                    rc.became_volatile(rt, page as usize);
                }
                if ack {
                    out.push(Send { to: from, msg: Msg::WrittenAck { page } });
                }
                Ok(())
            }
            Msg::Share { page } => match &mut self.sharing {
                Some(sharing) => {
                    let home_writes = mark_shared(rt, from, page);
                    sharing.share(from, page, home_writes, &mut out)
                }
                None => Ok(()),
            },
            Msg::WrittenAck { page } => match &mut self.sharing {
                Some(sharing) => sharing.written_ack(from, page, &mut out),
                None => Ok(()),
            },
            Msg::Diff { page } => self.apply_diff(from, page, payload),
            Msg::Fence { waiter } => {
                out.push(Send { to: from, msg: Msg::Fenced { waiter } });
                Ok(())
            }
            Msg::Fenced { waiter } => self.complete(from, waiter, 0),
            Msg::Done { page } => self.dir.done(from, page, &mut out),
            Msg::RevokeAck { page } => self.dir.revoke_ack(from, page, &mut out),
            Msg::Forward { page, .. } | Msg::Revoke { page, .. } if self.held(page) => {
                self.deferred.push_back((from, msg, self.arrival_time()));
                rt.service().set_deferred(true);
                rt.stats().count(&rt.stats().held_back, 1);
                Ok(())
            }
            Msg::Forward { page, requester, waiter, write } => {
                let current = rt.pt().access(page as usize);
                if write {
                    rt.stats().count(&rt.stats().invalidations_received, 1);
                }
                // The requester's request said whether it reads the home's memory, not ours: a
                // forwarded page comes attached unless reads are one-sided.
                let (keep, grant) =
                    holder::forward(self.me, self.one_sided, current, page, requester as usize, waiter, write);
                self.set_access(page, keep);
                out.push(grant);
                Ok(())
            }
            Msg::Revoke { page, to_read } => {
                let keep = holder::after_revoke(rt.pt().access(page as usize), to_read);
                if !to_read {
                    rt.stats().count(&rt.stats().invalidations_received, 1);
                }
                let lost_before = rt.pt().lost_at(page as usize);
                self.set_access(page, keep);
                // A home revoking its own copy sends it to the requester next: only a copy that
                // another rank's revoke dropped is dead. Our acknowledgement goes out after
                // this, so no new contents of the page can arrive before the release.
                if from != self.me {
                    self.release_if_dropped(page, keep, lost_before);
                }
                out.push(Send { to: from, msg: Msg::RevokeAck { page } });
                Ok(())
            }
            Msg::Grant { page, waiter, write, source } => self.grant(from, page, waiter, write, source),
            Msg::Free { addr } => {
                if let Err(e) = rt.alloc().free_remote(addr as usize) {
                    fatal(rt, &format!("rank {from} freed {addr:#x}: {e}"));
                }
                Ok(())
            }
            Msg::BarrierNotice { epoch, round } => rt.collectives().board().record(rt.slots(), from, epoch, round),
            Msg::LockAcquire { id, waiter } => {
                self.locks.acquire(from, id, waiter, &mut out);
                Ok(())
            }
            Msg::LockGranted { waiter, .. } => self.complete(from, waiter, 0),
            Msg::LockRelease { id } => self.locks.release(from, id, &mut out),
            Msg::LockRecall { id } => {
                let mut cache = rt.lock_cache();
                let now = now_ns();
                if let Some(release) = cache.recall(id, now) {
                    out.push(Send { to: from, msg: release });
                }
                rt.service().set_grace_end(cache.next_grace_end(now));
                Ok(())
            }
            Msg::Broadcast { seq, total, offset } => {
                if let Err(e) = rt.collectives().sync().broadcast_chunk(seq, total, offset, payload) {
                    fatal(rt, &format!("bad broadcast from rank {from}: {e}"));
                }
                Ok(())
            }
            Msg::SizeQuery { addr, waiter } => {
                let size = rt.alloc().usable_size(addr as usize).unwrap_or(0) as u64;
                out.push(Send { to: from, msg: Msg::SizeReply { waiter, size } });
                Ok(())
            }
            Msg::SizeReply { waiter, size } => self.complete(from, waiter, size),
            Msg::Ping => Ok(()),
            Msg::Lost { rank } => self.liveness.told_lost(rt, from, rank),
        };
        // Actions of the holder side (`install`) went to `self.out` meanwhile; keep both.
        let mut extra = std::mem::replace(&mut self.out, out);
        self.out.append(&mut extra);
        if let Err(v) = result {
            self.violated(v);
        }
        self.flush();
    }

    /// Refuses a message the job's memory model does not use.
    fn check_model(&self, from: Rank, msg: &Msg) -> Result<(), Violation> {
        let release = self.sharing.is_some();
        let what = match msg {
            Msg::Forward { .. } if release => "a forward",
            Msg::Revoke { .. } if release => "a revoke",
            Msg::RevokeAck { .. } if release => "a revoke acknowledgement",
            Msg::Done { .. } if release => "a completion",
            Msg::Written { .. } if !release => "a notice that others write",
            Msg::WrittenAck { .. } if !release => "a written acknowledgement",
            Msg::Share { .. } if !release => "a notice of a copy read directly",
            Msg::Diff { .. } if !release => "a diff",
            Msg::Fence { .. } if !release => "a fence",
            Msg::Fenced { .. } if !release => "a fence answer",
            _ => return Ok(()),
        };
        let model = if release { "release" } else { "sequential" };
        Err(Violation::WrongModel { from, what, model })
    }

    /// Applies a writer's diff to our master copy of `page` (release consistency).
    fn apply_diff(&self, from: Rank, page: Page, payload: &[u8]) -> Result<(), Violation> {
        let Some(sharing) = &self.sharing else { return Ok(()) };
        sharing.check_diff(from, page)?;
        let rt = self.rt;
        let base = rt.region().runtime_page(page as usize);
        crate::protocol::diff::apply_with(payload, rt.region().page, |offset, bytes| {
            // SAFETY: the run lies inside the page (checked by `apply_with`), which lies in the
            // runtime view (checked against the heap on receipt); a diff never overlaps the
            // message it arrived in.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(offset), bytes.len()) };
        })
        .map_err(|why| Violation::BadDiff { from, page, why })?;
        rt.stats().count(&rt.stats().bytes_in, payload.len() as u64);
        Ok(())
    }

    /// Gives the memory of a copy that its home's revoke dropped (`keep` is none) back to the
    /// system, before the acknowledgement goes out. Not a copy this process forwards or a home's
    /// own copy (their contents are about to be sent), and not where a hole would not reach this
    /// process's readers (RDMA registrations that pin the heap's pages; with on-demand paging
    /// they follow the page tables, and the memory goes back as over TCP).
    ///
    /// Nor a copy still [`contended`]: another rank's write took it from us (at `lost_before`)
    /// less than `CONTENDED_NS` ago. A page that goes back and forth between writers comes back
    /// soon, and keeps its memory for that. Releasing it on every round would
    /// cost a hole punched and a fresh, zeroed page per fault; and on the kernels of our CI
    /// machines (Linux 6.18, 2 vCPUs), 4 ranks doing that thousands of times a second ended with
    /// bits 0x20 and 0x40 set in the first word of a page now and then (a wrong checksum in
    /// `false_sharing` at N=4, in 10 of 16 runs), which never happened without the release (0 of 7).
    fn release_if_dropped(&self, page: Page, keep: Access, lost_before: u64) {
        if keep != Access::None || !self.may_release || contended(lost_before, now_ns()) {
            return;
        }
        // A failure only keeps the memory: the copy is dead either way.
        if self.rt.region().release(page as usize, 1).is_ok() {
            self.rt.stats().count(&self.rt.stats().pages_released, 1);
        }
    }

    fn complete(&self, from: Rank, waiter: Waiter, value: u64) -> Result<(), Violation> {
        if self.rt.slots().complete_with(waiter, value) {
            Ok(())
        } else {
            Err(Violation::StaleWaiter { from, waiter })
        }
    }

    /// Whether `page` must stay with us a little longer (see the module comment).
    fn held(&self, page: Page) -> bool {
        let pt = self.rt.pt();
        let age = now_ns().saturating_sub(pt.installed_at(page as usize));
        let waiting_thread = pt.is_fresh(page as usize) && age < MAX_HOLD_NS;
        waiting_thread || age < self.rt.settings().hold.as_nanos() as u64
    }

    fn run_deferred(&mut self) -> usize {
        let mut n = 0;
        for _ in 0..self.deferred.len() {
            let Some((from, msg, arrived)) = self.deferred.pop_front() else { break };
            if msg.page().is_some_and(|p| self.held(p)) {
                self.deferred.push_back((from, msg, arrived));
            } else {
                let resumed = msg.page().is_some_and(|p| !self.rt.pt().is_fresh(p as usize));
                let no_wake = self.rt.service().resume_wakes() == self.look_wakes;
                if self.timed_look && no_wake && resumed && self.rt.settings().hold.is_zero() {
                    self.rt.stats().count(&self.rt.stats().held_past_resume, 1);
                }
                self.arrived_at = arrived;
                self.handle(from, msg, &[], Attached::Nothing);
                self.arrived_at = 0;
                n += 1;
            }
        }
        self.timed_look = false;
        self.rt.service().set_deferred(!self.deferred.is_empty());
        n
    }

    /// Records how a wait of at most `wait` that began at `from`, with `wakes` wake-ups from
    /// resumed threads counted then, ended: by its timeout with nothing to handle (`quiet`), or
    /// not (for [`Stats::held_past_resume`](crate::stats::Stats)).
    fn note_wait(&mut self, wait: Duration, from: u64, wakes: u64, quiet: bool) {
        self.timed_look = quiet && !wait.is_zero() && now_ns().saturating_sub(from) >= wait.as_nanos() as u64;
        self.look_wakes = wakes;
    }

    /// Whether a message held back can go now: the thread its page was installed for resumed
    /// (or the hold is over). Called after marking that we wait (sleeping or deaf), paired with
    /// [`Runtime::page_resumed`]: either we see the page resumed here, or that thread sees the
    /// mark and wakes us.
    fn deferred_ready(&self) -> bool {
        if self.deferred.is_empty() {
            return false;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.deferred.iter().any(|(_, msg, _)| msg.page().is_some_and(|p| !self.held(p)))
    }

    /// When the message being handled arrived (now, for one that did not come from a peer).
    fn arrival_time(&self) -> u64 {
        if self.arrived_at != 0 {
            self.arrived_at
        } else {
            now_ns()
        }
    }

    fn set_access(&mut self, page: Page, access: Access) {
        let rt = self.rt;
        let current = rt.pt().access(page as usize);
        if current == access {
            return;
        }
        if self.batch.active() && current == Access::Write && access == Access::Read {
            // Applied with its neighbours at the end of the batch, before anything is sent.
            rt.pt().set(page as usize, Access::Read);
            self.batch.hold_downgrade(page);
            return;
        }
        self.apply_downgrades();
        if access == Access::None {
            // Invalidated for another rank's write (a downgrade to read is not a loss).
            rt.pt().mark_lost(page as usize, self.arrival_time());
        }
        rt.set_access(page as usize, 1, access);
    }

    /// Makes the pages whose downgrade to read-only was held back read-only, one `mprotect` per
    /// run of consecutive pages (see [`coalesce`]).
    fn apply_downgrades(&mut self) {
        if !self.batch.has_downgrades() {
            return;
        }
        let pt = self.rt.pt();
        for (first, count) in self.batch.take_downgrades(|p| pt.access(p as usize) == Access::Read) {
            self.rt.set_access(first as usize, count, Access::Read);
        }
    }

    /// Ends a batch of arrivals: applies the downgrades held back, then sends the messages, those
    /// in a row to one peer that attach no page together (one `sendmsg` on TCP: a miss with
    /// prefetch gets its grants at once).
    fn end_batch(&mut self) {
        self.apply_downgrades();
        let held = self.batch.end();
        let mut rest = held.as_slice();
        while let Some(&(to, first)) = rest.first() {
            let together = rest
                .iter()
                .take_while(|(peer, msg)| *peer == to && !msg.attaches_page() && !first.attaches_page())
                .count();
            if together <= 1 {
                self.send(to, first);
                rest = &rest[1..];
                continue;
            }
            let msgs: Vec<Msg> = rest[..together].iter().map(|(_, m)| *m).collect();
            self.send_batch(to, &msgs);
            rest = &rest[together..];
        }
    }

    fn grant(&mut self, from: Rank, page: Page, waiter: Waiter, write: bool, source: Source) -> Result<(), Violation> {
        if !self.rt.slots().waits_for_page(waiter, page) || self.reads.contains_key(&page) {
            return Err(Violation::StaleWaiter { from, waiter });
        }
        match source {
            Source::Inline | Source::Valid | Source::Forwarded => {
                self.install(page, waiter, write, source.needs_done() && self.sharing.is_none());
                Ok(())
            }
            Source::HostCopy => {
                // The home is done with the request: the copy cannot wait, nor fall back to a
                // read over the transport (it would complete after the home's later messages).
                if self.one_sided || !read_from_host_peer(self.rt, from, page) {
                    return Err(Violation::HostCopyUnreadable { from, page });
                }
                self.rt.stats().count(&self.rt.stats().bytes_in, self.rt.region().page as u64);
                self.install(page, waiter, write, false);
                Ok(())
            }
            Source::ReadFrom(owner) => {
                if !self.one_sided && read_from_host_peer(self.rt, owner as usize, page) {
                    self.rt.stats().count(&self.rt.stats().bytes_in, self.rt.region().page as u64);
                    self.install(page, waiter, write, self.sharing.is_none());
                    return Ok(());
                }
                self.reads.insert(page, (waiter, write));
                let len = self.rt.region().page as u32;
                let span = Span { offset: page * u64::from(len), len };
                let transport = self.rt.transport().expect("a job of several processes has a transport");
                if let Err(e) = transport.start_read(owner as usize, span, page) {
                    self.liveness.transport_failed(self.rt, &e);
                }
                Ok(())
            }
        }
    }

    fn read_done(&mut self, from: Rank, page: Page) {
        let Some((waiter, write)) = self.reads.remove(&page) else {
            self.violated(Violation::UnexpectedRead { from, page });
        };
        self.rt.stats().count(&self.rt.stats().bytes_in, self.rt.region().page as u64);
        let read =
            if self.one_sided { &self.rt.stats().pages_read_directly } else { &self.rt.stats().pages_read_by_request };
        self.rt.stats().count(read, 1);
        // The home waits for our word that the owner's copy is no longer needed (not under
        // release consistency, where the home's master copy never moves).
        self.install(page, waiter, write, self.sharing.is_none());
        self.flush();
    }

    /// New contents are in the runtime view: open the application view, tell the home when it
    /// waits for us, wake the waiting thread.
    fn install(&mut self, page: Page, waiter: Waiter, write: bool, notify_home: bool) {
        open_page(self.rt, page, write);
        if notify_home {
            self.out.push(Send { to: self.rt.home(page as usize), msg: Msg::Done { page } });
        }
        self.rt.slots().complete(waiter);
    }
}
