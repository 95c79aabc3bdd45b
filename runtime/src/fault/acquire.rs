//! Getting a page: a thread that lacks access asks the page's home and waits until the page is
//! installed. While it waits it reads the sockets itself and takes the answers it can complete
//! (page grants, lock grants) without a hand-off to the service thread. Async-signal-safe.

use std::time::Duration;

use gallocy_transport::Span;

use crate::heap::region::Access;
use crate::job::runtime::{Runtime, EXIT_PEER_LOST};
use crate::protocol::holder::check_received;
use crate::protocol::wire::{self, BARRIER_NOTICE_TAG, GRANT_TAG, LOCK_GRANTED_TAG};
use crate::protocol::{Attached, Msg, Source, Waiter};

use super::prefetch;
use crate::sys::clock::now_ns;
use crate::sys::rawio::{exit_now, write_stderr, RawWriter};

/// Makes `page` accessible (for writing if `write`) to this process: fetches it from its home
/// unless it already is. Called by the fault handler and before system calls on heap buffers.
/// The process must have joined. A read miss in a run of sequential or strided misses of this
/// thread also asks for the next pages of the run (see [`super::prefetch`]), in the same round
/// trip.
pub fn acquire(rt: &Runtime, page: usize, write: bool) {
    rt.gate().begin_fetch();
    let start = now_ns();
    loop {
        if rt.pt().permits(page, write) {
            break;
        }
        if !rt.pt().try_claim(page) {
            rt.pt().wait_unclaimed(page, rt.settings().spin);
            continue;
        }
        if rt.pt().permits(page, write) {
            rt.pt().release(page);
            break;
        }
        // The application touched it: it was handed out (prefetch may take the pages below it).
        rt.placement().note_in_use(page as u64);
        let counter = if write { &rt.stats().write_faults } else { &rt.stats().read_faults };
        rt.stats().count(counter, 1);
        if let Some(rc) = rt.release() {
            super::release_miss::resolve(rt, rc, page, write);
            rt.stats().record_fault(now_ns() - start);
            break;
        }
        let mut batch = Batch::default();
        let upgrade = write && rt.pt().access(page) == Access::Read;
        batch.ask(rt, page, write);
        if upgrade {
            for extra in prefetch::upgrade_run(rt, page) {
                if rt.slots().has_room_for_prefetch() && rt.pt().try_claim(extra) {
                    if rt.pt().access(extra) == Access::Read {
                        batch.ask(rt, extra, true);
                    } else {
                        rt.pt().release(extra);
                    }
                }
            }
            rt.stats().count(&rt.stats().prefetched, batch.len() as u64 - 1);
        } else if !write {
            batch.prefetch_after(rt, page);
            rt.stats().count(&rt.stats().prefetched, batch.len() as u64 - 1);
        }
        batch.wait(rt);
        rt.stats().record_fault(now_ns() - start);
        break;
    }
    rt.gate().end_fetch();
}

/// Fills arrays of messages before they are set.
const NO_MSG: Msg = Msg::Done { page: 0 };

/// The pages one miss asks for (the faulting page first), each with its wait slot, and the
/// requests to other ranks not sent yet: they go together, one `sendmsg` per home on TCP
/// ([`Batch::send_requests`]).
#[derive(Default)]
pub(super) struct Batch {
    pages: [(usize, Option<Waiter>); prefetch::MAX_BATCH],
    len: usize,
    unsent: [Option<(usize, Msg)>; prefetch::MAX_BATCH],
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Asks the home of `page` (claimed by this thread) for it; a request to another rank waits
    /// for [`Batch::send_requests`] (or [`Batch::wait`]).
    pub(super) fn ask(&mut self, rt: &Runtime, page: usize, write: bool) {
        let (waiter, remote) = prepare_request(rt, page, write);
        self.unsent[self.len] = remote;
        self.pages[self.len] = (page, Some(waiter));
        self.len += 1;
    }

    /// Sends the requests asked for and not sent yet: those to one home in one batch.
    /// Async-signal-safe.
    pub(super) fn send_requests(&mut self, rt: &Runtime) {
        for first in 0..self.len {
            let Some((home, _)) = self.unsent[first] else { continue };
            let mut msgs = [NO_MSG; prefetch::MAX_BATCH];
            let mut n = 0;
            for unsent in &mut self.unsent[first..self.len] {
                if let Some((h, msg)) = *unsent {
                    if h == home {
                        *unsent = None;
                        msgs[n] = msg;
                        n += 1;
                    }
                }
            }
            send_raw_batch(rt, home, &msgs[..n], "cannot send a page request to rank ");
        }
    }

    /// Also asks for the pages that follow a read miss of `page` in this thread's run (see
    /// [`prefetch::next_pages`]).
    pub(super) fn prefetch_after(&mut self, rt: &Runtime, page: usize) {
        for extra in prefetch::next_pages(rt, page) {
            // Only pages nobody here holds or fetches; their wait slots come from the ones
            // kept for faults, never all of them.
            if self.len < prefetch::MAX_BATCH
                && !rt.pt().permits(extra, false)
                && rt.slots().has_room_for_prefetch()
                && rt.pt().try_claim(extra)
            {
                if rt.pt().permits(extra, false) {
                    rt.pt().release(extra);
                } else {
                    self.ask(rt, extra, false);
                }
            }
        }
    }

    /// Waits for every page asked for; then the service thread may let them go again, and the
    /// other local threads waiting for them go on.
    pub(super) fn wait(&mut self, rt: &Runtime) {
        self.send_requests(rt);
        for (page, waiter) in &mut self.pages[..self.len] {
            if let Some(w) = waiter.take() {
                let home_here = rt.home(*page) == rt.rank();
                wait_with_spin(rt, w, spin_for(home_here, rt.pt().lost_at(*page), now_ns(), rt.settings().spin));
            }
            rt.page_resumed(*page);
            rt.pt().release(*page);
        }
    }
}

/// Makes `[addr, addr + len)` accessible to the kernel on this process's behalf (for writing
/// into it if `write`): a system call that copies into or out of heap pages this process does
/// not hold (or holds read-only) would otherwise fail with EFAULT, since the kernel's own
/// accesses do not fault into gallocy. A no-op outside the heap, before joining, in a forked
/// child and after leaving the job.
pub fn prepare_kernel_access(rt: &Runtime, addr: usize, len: usize, write: bool) {
    let m = rt.membership();
    if len == 0 || !m.joined() || m.forked() || m.leaving() {
        return;
    }
    let heap_end = rt.region().base + rt.region().size;
    let start = addr.max(rt.region().base);
    let end = addr.saturating_add(len).min(heap_end);
    if start >= end {
        return;
    }
    for page in rt.page_of(start)..=rt.page_of(end - 1) {
        if !rt.pt().permits(page, write) {
            acquire(rt, page, write);
        }
    }
}

/// Parks a thread that touched a page it no longer holds while the process exits; returns (and
/// the caller ends the process) if the exit does not come within the peer timeout.
pub fn wait_for_exit(rt: &Runtime) {
    let never = std::sync::atomic::AtomicU32::new(0);
    let deadline = now_ns().saturating_add(rt.settings().peer_timeout.as_nanos() as u64);
    loop {
        let now = now_ns();
        if now >= deadline {
            return;
        }
        crate::sys::futex::wait(&never, 0, Some(std::time::Duration::from_nanos(deadline - now)));
    }
}

/// Asks the home for `page` (for writing if `write`); returns the wait slot its grant completes.
pub(super) fn request(rt: &Runtime, page: usize, write: bool) -> Waiter {
    let (waiter, remote) = prepare_request(rt, page, write);
    if let Some((home, msg)) = remote {
        send_raw(rt, home, &msg, "cannot send a page request to rank ");
    }
    waiter
}

/// Claims the wait slot for a request of `page`. This rank's own service thread gets the
/// request at once; a request to another home is returned, to be sent: `(home, request)`.
fn prepare_request(rt: &Runtime, page: usize, write: bool) -> (Waiter, Option<(usize, Msg)>) {
    let waiter = rt.slots().claim_for(page as u64, write);
    let home = rt.home(page);
    if home == rt.rank() {
        rt.slots().post_local(waiter);
        if let Some(t) = rt.transport() {
            t.wake();
        }
        return (waiter, None);
    }
    let direct =
        rt.transport().is_some_and(|t| t.one_sided_reads()) || rt.local_views().is_some_and(|v| v.readable(home));
    // No need to wake the service thread: we read the answer ourselves.
    (waiter, Some((home, Msg::Request { page: page as u64, write, waiter, direct })))
}

/// Sends small messages (at most [`prefetch::MAX_BATCH`], none attaching a page) to `to` from the
/// fault path, in order, in one batch (one `sendmsg` on TCP); failure is fatal.
fn send_raw_batch(rt: &Runtime, to: usize, msgs: &[Msg], what: &str) {
    const FRAME: usize = 64;
    let mut bufs = [[0u8; FRAME]; prefetch::MAX_BATCH];
    let mut lens = [0usize; prefetch::MAX_BATCH];
    for ((msg, buf), len) in msgs.iter().zip(bufs.iter_mut()).zip(lens.iter_mut()) {
        match wire::encode(msg, &[], buf) {
            Ok(bytes) => *len = bytes.len(),
            Err(_) => fatal_raw(rt, what, to),
        }
    }
    let mut frames: [&[u8]; prefetch::MAX_BATCH] = [&[]; prefetch::MAX_BATCH];
    for ((frame, buf), &len) in frames.iter_mut().zip(&bufs).zip(&lens) {
        *frame = &buf[..len];
    }
    let n = msgs.len().min(prefetch::MAX_BATCH);
    if rt.transport().is_none_or(|t| t.send_batch(to, &frames[..n]).is_err()) {
        fatal_raw(rt, what, to);
    }
}

/// Sends a small message from the fault path; failure is fatal.
pub(super) fn send_raw(rt: &Runtime, to: usize, msg: &Msg, what: &str) {
    let mut buf = [0u8; 64];
    let sent =
        wire::encode(msg, &[], &mut buf).ok().and_then(|bytes| rt.transport().map(|t| t.send(to, bytes, None).is_ok()));
    if sent != Some(true) {
        fatal_raw(rt, what, to);
    }
}

/// Waits for `waiter`'s answer: spins reading incoming answers itself (so no hand-off to the
/// service thread sits on the path), then sleeps. Returns the value the answer carried.
pub fn wait_for(rt: &Runtime, waiter: Waiter) -> u64 {
    wait_with_spin(rt, waiter, rt.settings().spin)
}

/// How long a thread spins for the answer to a page request (`GALLOCY_SPIN_US`, `spin`) before
/// it sleeps. None when this rank is the page's home and another rank's write took the page from
/// it lately (at `lost_at`, see [`prefetch::contended`]): the ranks hand the page back and forth,
/// the CPUs are busy, and this rank's own service thread must run before any answer can come;
/// spinning only keeps it, or the other rank, from a CPU. On 2 vCPUs, 2 ranks, alternating runs:
/// a Peterson lock's smaller share went from a median of 0.13 to 0.29 (eight runs each) and
/// `false_sharing` from 978 to 590 ms; Jacobi, `lock_queue` and the flag hand-off did not move.
/// (With no spin for every request whose home is here, Jacobi was 7% slower: its own rows come
/// back from a read copy, never lost.)
fn spin_for(home_here: bool, lost_at: u64, now: u64, spin: Duration) -> Duration {
    if home_here && prefetch::contended(lost_at, now) {
        Duration::ZERO
    } else {
        spin
    }
}

/// [`wait_for`], spinning for `spin` before it sleeps.
fn wait_with_spin(rt: &Runtime, waiter: Waiter, spin: Duration) -> u64 {
    let mut drive = || {
        if let Some(t) = rt.transport() {
            let mut done = DoneNotes::default();
            t.poll_inline(&mut |from, bytes, page| take_answer(rt, from, bytes, page, &mut done));
            done.send(rt);
        }
    };
    // When we stop reading the sockets ourselves without an answer, make sure the service
    // thread does.
    let mut after_spin = |done: bool| {
        if !done && rt.service().deaf() {
            if let Some(t) = rt.transport() {
                t.wake();
            }
        }
    };
    rt.slots().wait_and_release(waiter, spin, &mut drive, &mut after_spin)
}

/// What came attached to a message, as the protocol names it.
pub fn attached(rt: &Runtime, span: Option<Span>) -> Attached {
    let page = rt.region().page as u64;
    match span {
        None => Attached::Nothing,
        Some(s) if u64::from(s.len) == page && s.offset % page == 0 => Attached::Page(s.offset / page),
        Some(_) => Attached::Other,
    }
}

/// Handles an answer read by a waiting thread itself (for any local thread): page grants, lock
/// grants and barrier notices it can complete on the spot. Declines (returns false) everything else, and anything
/// that is not exactly as the protocol expects: the service thread then handles it, and stops
/// the process with a clear message if it is wrong.
fn take_answer(rt: &Runtime, from: usize, bytes: &[u8], span: Option<Span>, done: &mut DoneNotes) -> bool {
    match bytes.first() {
        Some(&GRANT_TAG) | Some(&LOCK_GRANTED_TAG) | Some(&BARRIER_NOTICE_TAG) => {}
        _ => return false,
    }
    let Ok((msg, _)) = wire::decode(bytes) else { return false };
    if let Msg::BarrierNotice { epoch, round } = msg {
        return span.is_none() && rt.collectives().board().record(rt.slots(), from, epoch, round).is_ok();
    }
    if check_received(rt.placement(), rt.rank(), from, &msg, attached(rt, span)).is_err() {
        return false;
    }
    let (page, waiter, write, source) = match msg {
        Msg::LockGranted { waiter, .. } => return rt.slots().complete(waiter),
        Msg::Grant { page, waiter, write, source } => (page, waiter, write, source),
        _ => return false,
    };
    let home = rt.home(page as usize);
    if (source.needs_done() && home == rt.rank()) || !rt.slots().waits_for_page(waiter, page) {
        return false;
    }
    if source == Source::HostCopy {
        // Copied now, before any later message from the home is handled (see `Source`); a job
        // with one-sided reads gets no such grant (the service thread reports it).
        if rt.transport().is_none_or(|t| t.one_sided_reads()) || !read_from_host_peer(rt, from, page) {
            return false;
        }
        rt.stats().count(&rt.stats().bytes_in, u64::from(rt.region().page as u32));
    }
    if let Source::ReadFrom(owner) = source {
        // One-sided read by this thread when the transport can do it without allocating (the
        // service thread does the first read of each chunk, which registers memory), or a copy
        // out of the owner's heap when it runs on this host.
        let len = rt.region().page as u32;
        let span = Span { offset: page * u64::from(len), len };
        let read = match rt.transport() {
            Some(t) if t.one_sided_reads() => {
                let read = t.read_inline(owner as usize, span);
                if read {
                    rt.stats().count(&rt.stats().pages_read_directly, 1);
                }
                read
            }
            Some(_) => read_from_host_peer(rt, owner as usize, page),
            None => false,
        };
        if !read {
            return false;
        }
        rt.stats().count(&rt.stats().bytes_in, u64::from(span.len));
    }
    if let Some(span) = span {
        rt.stats().count(&rt.stats().bytes_in, u64::from(span.len));
    }
    open_page(rt, page, write);
    // Release consistency's homes need no word back (their master copy never moves).
    if source.needs_done() && rt.release().is_none() {
        done.note(rt, home, page);
    }
    rt.slots().complete(waiter);
    true
}

/// The completions (`Done`) a waiting thread owes homes for the grants it took in one look at
/// the sockets: sent together after the look, one batch per home (the grants of a miss with
/// prefetch come together). Async-signal-safe.
#[derive(Default)]
struct DoneNotes {
    notes: [(usize, u64); prefetch::MAX_BATCH],
    len: usize,
}

impl DoneNotes {
    /// Notes that `home` is owed the completion of `page` (sending what is noted when full).
    fn note(&mut self, rt: &Runtime, home: usize, page: u64) {
        if self.len == self.notes.len() {
            self.send(rt);
        }
        self.notes[self.len] = (home, page);
        self.len += 1;
    }

    /// Sends what is noted, in order, one batch per home.
    fn send(&mut self, rt: &Runtime) {
        let mut sent = [false; prefetch::MAX_BATCH];
        for first in 0..self.len {
            if sent[first] {
                continue;
            }
            let home = self.notes[first].0;
            let mut msgs = [NO_MSG; prefetch::MAX_BATCH];
            let mut n = 0;
            for (&(h, page), sent) in self.notes[first..self.len].iter().zip(&mut sent[first..]) {
                if h == home {
                    *sent = true;
                    msgs[n] = Msg::Done { page };
                    n += 1;
                }
            }
            send_raw_batch(rt, home, &msgs[..n], "cannot send a completion to rank ");
        }
        self.len = 0;
    }
}

/// Copies `page` from the heap of `peer`, a process on this host, into our runtime view (see
/// `gallocy_transport::local`). False when that heap cannot be read here (the caller then asks
/// over the transport; for a `HostCopy` grant, which allows no later read, it leaves the grant to
/// the service thread, which reports it). The page must be claimed and closed in our application view.
/// Async-signal-safe.
pub fn read_from_host_peer(rt: &Runtime, peer: usize, page: u64) -> bool {
    let len = rt.region().page;
    rt.local_views().is_some_and(|v| {
        // SAFETY: the runtime view's page has `len` writable bytes, and nobody else writes it
        // now: the page is claimed and closed in the application view.
        v.may_read(peer) && unsafe { v.read(peer, page * len as u64, rt.region().runtime_page(page as usize), len) }
    }) && {
        rt.stats().count(&rt.stats().pages_read_directly, 1);
        true
    }
}

/// Opens the application view of `page`, whose new contents are complete in the runtime view,
/// and marks it as just installed.
pub fn open_page(rt: &Runtime, page: u64, write: bool) {
    let access = Access::granted(write);
    // `PageTable::set` marks a page given write access as written here; one already held with
    // this access needs no change.
    if rt.pt().access(page as usize) != access {
        rt.set_access(page as usize, 1, access);
    }
    rt.pt().mark_installed(page as usize, now_ns());
    if let Some(rc) = rt.release() {
        rc.installed(rt, page as usize);
    }
}

/// Writes "gallocy: rank R: fatal: WHAT N" and ends the process.
pub fn fatal_raw(rt: &Runtime, what: &str, n: usize) -> ! {
    let mut buf = [0u8; 256];
    let mut w = RawWriter::new(&mut buf);
    w.str("gallocy: rank ").num(rt.rank() as u64).str(": fatal: ").str(what).num(n as u64).str("\n");
    write_stderr(w.as_bytes());
    exit_now(EXIT_PEER_LOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_to_this_rank_for_a_page_another_rank_took_lately_does_not_spin() {
        let (spin, now) = (Duration::from_micros(100), 10 * prefetch::CONTENDED_NS);
        let lately = now - prefetch::CONTENDED_NS / 10;
        assert_eq!(spin_for(true, lately, now, spin), Duration::ZERO);
        assert_eq!(spin_for(false, lately, now, spin), spin, "another home answers: spin");
        assert_eq!(spin_for(true, 0, now, spin), spin, "never taken");
        assert_eq!(spin_for(true, now - 2 * prefetch::CONTENDED_NS, now, spin), spin, "taken long ago");
    }
}
