//! Who is connected to whom: connections made on first use.
//!
//! At start-up a rank holds one connection, to rank 0 (the one it joined through; rank 0 holds
//! one to every rank). Any other pair of ranks connects the first time one of them sends to the
//! other, so a rank of a large job holds connections only to the peers it talks to: rank 0, its
//! neighbours on the heartbeat ring, its barrier partners, and the homes and owners of the pages
//! it uses.
//!
//! A sender that finds no connection marks the peer *wanted*, wakes this process's dialer thread
//! and sleeps on a futex until the link is ready or has failed. Nothing of that allocates or
//! takes a lock, so a page fault may be the first use. The dialer (started with the transport:
//! no thread is created on the way to a link, since the waiting thread may hold a libc lock that
//! thread creation takes) dials the wanted peers one at a time. The *keeper* thread accepts the
//! connections peers make to us and serves all their handshakes at once, each a few bytes each
//! way on a non-blocking socket, so a stranger that connects and says nothing delays nobody, no
//! dial waits for a thread that itself waits for a dial (two ranks may dial each other at the
//! same moment), and letting a peer in never creates a thread either: a thread of ours that
//! faults while holding a lock thread creation takes (glibc's TLS lock, inside `dlopen`) may be
//! waiting for exactly that peer.
//!
//! They then agree on one connection. The acceptor answers every authenticated dial with a
//! sealed one-byte record: `Y` (this connection is the link), `N` (we keep another: our own
//! dial when our rank is the lower, or a link that exists), or `L` (we are leaving the job). A
//! dialer told `N` drops its connection; the link it waits for is the one the peer dials.
//!
//! Rank 0 never dials (it holds a link to everyone from start-up): its keeper exists only during
//! start-up, to take the joins.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use super::startup::{read_record, resolve, write_record};
use super::{errno_of, set_socket_options, Conn, Inbox, Peer, Receiver, AUTH_TIMEOUT};
use crate::seal::{Opener, Sealer};
use crate::sys::{self, Epoll, EventFd};
use crate::{auth, LostReason, TransportError};

/// Most handshakes under way at once; more connections wait in the listen queue.
const MAX_HANDSHAKES: usize = 64;

/// Link states (a futex word per peer).
const IDLE: u32 = 0;
/// A sender asked the dialer for this link.
const WANTED: u32 = 1;
/// The dialer is connecting.
const DIALING: u32 = 2;
/// The link is installed: [`Links::linked`] returns it.
const READY: u32 = 3;
/// Dialing failed; the reason is in `failure`.
const FAILED: u32 = 4;

/// The failure of a dial the peer answered with [`LEAVING`] (not an errno).
const PEER_LEFT: i32 = -1;
/// The failure of a link wanted when we said goodbye (not an errno).
const WE_LEFT: i32 = -2;

/// The acceptor's answers to a dial.
const TAKEN: &[u8] = b"Y";
const DECLINED: &[u8] = b"N";
const LEAVING: &[u8] = b"L";

/// The connections of one process, shared by the transport and the threads that make them.
pub(super) struct Links {
    rank: usize,
    size: usize,
    token: Vec<u8>,
    /// How long a sender waits for a link before the peer counts as lost.
    link_timeout: Duration,
    /// Runs first on every thread we start.
    thread_start: fn(),
    /// Listening addresses of every rank, once rank 0 sent them.
    roster: OnceLock<Vec<String>>,
    /// Per peer, the address we dial (for the error when it cannot be reached).
    addrs: Box<[OnceLock<SocketAddr>]>,
    peers: Box<[OnceLock<Peer>]>,
    state: Box<[AtomicU32]>,
    /// Why dialing a peer failed (an errno), when its state is `FAILED`.
    failure: Box<[AtomicI32]>,
    /// Serializes the decisions about links (which connection becomes a peer's link). Taken
    /// only by start-up and by the keeper's threads, never by a sender.
    decide: Mutex<()>,
    /// We said goodbye: no new links.
    leaving: AtomicBool,
    /// The dialer is dialing.
    dialing: AtomicBool,
    /// Wakes the dialer: a link is wanted.
    wanted: EventFd,
    pub(super) receiver: Mutex<Receiver>,
    /// A waiting thread left a frame (or a broken connection) for the service thread since the
    /// service thread last took the receiver lock: set under that lock.
    pub(super) left_for_service: AtomicBool,
    /// The service thread found the receiver lock taken and sleeps until it is let go (see
    /// [`Links::receiver_for_service`]).
    service_waits: AtomicBool,
    pub(super) epoll: Epoll,
    pub(super) waker: EventFd,
    /// Per peer, the keys of a transport layered on its connection, until that transport takes
    /// them.
    pub(super) layered: Mutex<Vec<Option<(Sealer, Opener)>>>,
}

impl Links {
    pub(super) fn new(
        rank: usize,
        size: usize,
        token: &[u8],
        link_timeout: Duration,
        thread_start: fn(),
        epoll: Epoll,
        waker: EventFd,
    ) -> std::io::Result<Links> {
        Ok(Links {
            rank,
            size,
            token: token.to_vec(),
            link_timeout,
            thread_start,
            roster: OnceLock::new(),
            addrs: (0..size).map(|_| OnceLock::new()).collect(),
            peers: (0..size).map(|_| OnceLock::new()).collect(),
            state: (0..size).map(|_| AtomicU32::new(IDLE)).collect(),
            failure: (0..size).map(|_| AtomicI32::new(0)).collect(),
            decide: Mutex::new(()),
            leaving: AtomicBool::new(false),
            dialing: AtomicBool::new(false),
            wanted: EventFd::new()?,
            receiver: Mutex::new(Receiver { inboxes: (0..size).map(|_| Inbox::default()).collect() }),
            left_for_service: AtomicBool::new(false),
            service_waits: AtomicBool::new(false),
            epoll,
            waker,
            layered: Mutex::new((0..size).map(|_| None).collect()),
        })
    }

    /// The receiver lock for a thread other than the service thread, if nobody holds it. Give it
    /// back with [`Links::let_go`].
    pub(super) fn try_receiver(&self) -> Option<MutexGuard<'_, Receiver>> {
        self.receiver.try_lock().ok()
    }

    /// Gives back the receiver lock that a thread other than the service thread held, and wakes
    /// the service thread if it waits for the lock or the holder left something for it.
    pub(super) fn let_go(&self, rx: MutexGuard<'_, Receiver>) {
        drop(rx);
        // Pairs with the fence in `receiver_for_service`: either the service thread's second
        // try finds the lock free, or we see that it waits.
        fence(Ordering::SeqCst);
        if self.left_for_service.load(Ordering::Relaxed) || self.service_waits.load(Ordering::Relaxed) {
            self.waker.signal();
        }
    }

    /// The receiver lock for the service thread, which never sleeps on it: the holder may be a
    /// thread on its fault path, whose unlock must not have to wake anyone. When another thread
    /// holds it, the service thread's wake-up is consumed and the holder signals again when it
    /// lets go ([`Links::let_go`]); until then the service thread sleeps, instead of finding
    /// the wake-up again and again. (Spinning so, with a short slice, on the CPU of a holder it
    /// had preempted, it kept that holder from running for milliseconds.)
    pub(super) fn receiver_for_service(&self) -> Option<MutexGuard<'_, Receiver>> {
        let take = || match self.receiver.try_lock() {
            Ok(rx) => Some(rx),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let rx = take().or_else(|| {
            self.service_waits.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            self.waker.drain();
            // The holder may have let go before it could see that we wait.
            take()
        })?;
        self.service_waits.store(false, Ordering::Relaxed);
        Some(rx)
    }

    /// What runs first on every thread we start.
    pub(super) fn thread_start(&self) -> fn() {
        self.thread_start
    }

    /// The link to `rank`, if there is one. Async-signal-safe.
    pub(super) fn linked(&self, rank: usize) -> Option<&Peer> {
        self.peers.get(rank).and_then(OnceLock::get)
    }

    /// Every link there is now.
    pub(super) fn all_linked(&self) -> impl Iterator<Item = (usize, &Peer)> {
        self.peers.iter().enumerate().filter_map(|(r, p)| Some((r, p.get()?)))
    }

    /// The descriptor that wakes the dialer (closed in a forked child).
    pub(super) fn wanted_fd(&self) -> std::os::fd::RawFd {
        self.wanted.0
    }

    pub(super) fn set_roster(&self, roster: Vec<String>) {
        let _ = self.roster.set(roster);
    }

    /// The link to `rank`, made now if there is none: asks the dialer and sleeps until the link
    /// is ready, or fails (the peer is then lost: it cannot be reached, or we are leaving).
    /// Allocation-free and async-signal-safe.
    pub(super) fn link(&self, rank: usize) -> Result<&Peer, TransportError> {
        if let Some(p) = self.linked(rank) {
            return Ok(p);
        }
        if rank >= self.size || rank == self.rank {
            return Err(TransportError::NoSuchPeer(rank));
        }
        let lost = |errno| TransportError::PeerLost {
            rank,
            reason: LostReason::NoLink {
                addr: self.addrs[rank].get().copied(),
                error: std::io::Error::from_raw_os_error(errno),
            },
        };
        if self.leaving.load(Ordering::Acquire) {
            return Err(TransportError::Left);
        }
        let state = &self.state[rank];
        if state.compare_exchange(IDLE, WANTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.wanted.signal();
        }
        // The dialer gives up after the link timeout and one handshake; we wait a little longer.
        let deadline = Instant::now() + self.link_timeout + 2 * AUTH_TIMEOUT;
        loop {
            match state.load(Ordering::Acquire) {
                READY => return self.linked(rank).ok_or(TransportError::NoSuchPeer(rank)),
                FAILED => {
                    return Err(match self.failure[rank].load(Ordering::Acquire) {
                        PEER_LEFT => TransportError::PeerLeft { rank },
                        WE_LEFT => TransportError::Left,
                        errno => lost(errno),
                    })
                }
                s => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(lost(libc::ETIMEDOUT));
                    }
                    sys::futex_wait(state, s, left.min(Duration::from_millis(100)));
                }
            }
        }
    }

    /// Makes `conn` the link to `rank` (the caller holds `decide`, or is start-up).
    pub(super) fn install(&self, rank: usize, conn: Conn) -> std::io::Result<()> {
        let Conn { stream, keys } = conn;
        set_socket_options(&stream)?;
        let inbox = Inbox::new(Some(keys.opener))?;
        self.layered.lock().unwrap_or_else(|p| p.into_inner())[rank] = Some((keys.layered_sealer, keys.layered_opener));
        // Nobody holds the receiver while waiting for a link: the frames it reads come from
        // linked peers, and their answers go back on the same links.
        let mut rx = self.receiver.lock().unwrap_or_else(|p| p.into_inner());
        rx.inboxes[rank] = inbox;
        self.let_go(rx);
        let fd = stream.as_raw_fd();
        if self.peers[rank].set(Peer::new(stream, keys.sealer)).is_err() {
            return Err(std::io::Error::other(format!("a second link to rank {rank}")));
        }
        self.epoll.add(fd, rank as u64)?;
        self.state[rank].store(READY, Ordering::Release);
        sys::futex_wake_all(&self.state[rank]);
        Ok(())
    }

    /// No new links from now on (we are saying goodbye). Returns once no decision and no dial
    /// is under way: a dial the peer took meanwhile is then among the links, and gets its
    /// goodbye with the others.
    pub(super) fn leave(&self) {
        {
            let _d = self.decide.lock().unwrap_or_else(|p| p.into_inner());
            self.leaving.store(true, Ordering::Release);
        }
        let give_up = Instant::now() + self.link_timeout + 2 * AUTH_TIMEOUT;
        while self.dialing.load(Ordering::Acquire) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Dialing `rank` failed with `errno`: its senders stop waiting and report it lost.
    fn fail(&self, rank: usize, errno: i32) {
        let _d = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        if self.state[rank].load(Ordering::Acquire) != READY {
            self.failure[rank].store(errno, Ordering::Release);
            self.state[rank].store(FAILED, Ordering::Release);
            sys::futex_wake_all(&self.state[rank]);
        }
    }

    /// A peer proved it is `rank` on `conn`, which it dialed: decide whether it becomes the link,
    /// tell the peer, and install it.
    fn take_incoming(&self, rank: usize, mut conn: Conn) {
        if rank >= self.size || rank == self.rank {
            return;
        }
        let _d = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.state[rank].load(Ordering::Acquire);
        let answer = if self.leaving.load(Ordering::Acquire) {
            LEAVING
        } else {
            match state {
                IDLE | WANTED | FAILED => TAKEN,
                // Both dial at once: the lower rank's dial becomes the link.
                DIALING if rank < self.rank => TAKEN,
                _ => DECLINED,
            }
        };
        if write_record(&mut conn, answer).is_err() || answer != TAKEN {
            return;
        }
        if let Err(e) = self.install(rank, conn) {
            drop(_d);
            self.fail(rank, errno_of(&e));
        }
    }

    /// The dialer thread: dials the wanted peers, one at a time, until `stop` is signalled.
    fn dial_until_stopped(&self, stop: &EventFd) {
        loop {
            match sys::poll_readable([stop.0, self.wanted.0], -1) {
                Ok([true, _]) => return,
                Ok(_) => {}
                Err(_) => {
                    // Cannot wait: nobody will dial, so every wanted link fails now and later.
                    for rank in (0..self.size).filter(|r| *r != self.rank) {
                        self.fail(rank, libc::EIO);
                    }
                    return;
                }
            }
            self.wanted.drain();
            for rank in 0..self.size {
                self.dialing.store(true, Ordering::Release);
                if self.leaving.load(Ordering::Acquire) {
                    if self.state[rank].load(Ordering::Acquire) == WANTED {
                        self.fail(rank, WE_LEFT);
                    }
                } else if self.claim_dial(rank) {
                    self.dial(rank);
                }
                self.dialing.store(false, Ordering::Release);
            }
        }
    }

    /// Moves a wanted link to DIALING. Under `decide`, so that the keeper's answer to the peer's
    /// own dial and the link it installs are never based on a state this changes in between
    /// (taking the peer's dial while we start ours would leave each side with a different link).
    fn claim_dial(&self, rank: usize) -> bool {
        let _d = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        self.state[rank].compare_exchange(WANTED, DIALING, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Connects to `rank`, proves our rank, and installs the link if the peer takes it.
    fn dial(&self, rank: usize) {
        if let Err(errno) = self.try_dial(rank) {
            self.fail(rank, errno);
        }
    }

    fn try_dial(&self, rank: usize) -> Result<(), i32> {
        let addr = self.roster.get().and_then(|r| r.get(rank)).ok_or(libc::EHOSTUNREACH)?;
        let addr = resolve(addr).map_err(|_| libc::EHOSTUNREACH)?;
        let _ = self.addrs[rank].set(addr);
        let deadline = Instant::now() + self.link_timeout;
        let mut conn = connect_authenticated(&addr, &self.token, self.rank, deadline, false).map_err(|e| match e {
            TransportError::Auth(_) => libc::EACCES,
            TransportError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::ECONNREFUSED),
            _ => libc::ECONNREFUSED,
        })?;
        conn.stream.set_read_timeout(Some(AUTH_TIMEOUT)).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let answer = read_record(&mut conn, 1).map_err(|e| e.raw_os_error().unwrap_or(libc::EPROTO))?;
        let _d = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.state[rank].load(Ordering::Acquire);
        match answer.as_slice() {
            // (Also while we leave: the peer holds this link now, and it gets our goodbye.)
            TAKEN if state == DIALING => self.install(rank, conn).map_err(|e| errno_of(&e)),
            // The peer dials us too, and its dial wins (or we have its link already): it
            // arrives as an incoming connection.
            DECLINED => Ok(()),
            LEAVING => Err(PEER_LEFT),
            _ => Err(libc::EPROTO),
        }
    }
}

/// What the keeper hands over during rank 0's start-up: a connection that proved the token and
/// the rank it proved, or why it cannot go on.
pub(super) type Passed = Result<(Conn, usize), String>;

/// What becomes of the connections that prove the token.
#[derive(Clone)]
enum Arrivals {
    /// Rank 0 during start-up: they are joins, handed to start-up.
    Joins(mpsc::Sender<Passed>),
    /// Every other rank: they are dials, which may become links.
    Links(Arc<Links>),
}

/// Lets peers in and makes the links senders ask for: an acceptor thread, from the moment it
/// exists, takes every connection as it arrives and serves the handshakes of all of them at once
/// ([`Arriving`]), so that a stranger that connects and says nothing (or slowly) delays nobody,
/// and a rank busy connecting to others still lets the ranks that connect to it in. It sleeps in
/// `poll` until a connection or a handshake's next bytes come, a handshake runs out of time, or
/// the keeper ends.
pub(super) struct Keeper {
    passed: Option<Mutex<mpsc::Receiver<Passed>>>,
    /// Signalled when the keeper ends: its threads then stop.
    stop: Arc<EventFd>,
    acceptor: Option<std::thread::JoinHandle<()>>,
    dialer: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Rank 0's start-up keeper: takes joins, for [`Keeper::next`].
    pub(super) fn for_joins(listener: &TcpListener, token: &[u8], thread_start: fn()) -> Result<Keeper, String> {
        let (pass, passed) = mpsc::channel();
        let mut k = Keeper::start(listener, token, Arrivals::Joins(pass), thread_start)?;
        k.passed = Some(Mutex::new(passed));
        Ok(k)
    }

    /// The keeper of every other rank: for as long as it lives, links whoever dials us and
    /// dials whoever is wanted.
    pub(super) fn for_links(listener: &TcpListener, token: &[u8], links: Arc<Links>) -> Result<Keeper, String> {
        let thread_start = links.thread_start;
        let mut k = Keeper::start(listener, token, Arrivals::Links(links.clone()), thread_start)?;
        // Dialing needs no thread of its own per link: the thread that waits for a link may be
        // one that holds a libc lock thread creation takes.
        let stop = k.stop.clone();
        let dialer = std::thread::Builder::new()
            .name("gallocy-dialer".into())
            .spawn(move || {
                thread_start();
                links.dial_until_stopped(&stop)
            })
            .map_err(|e| format!("starting the connection dialer thread: {e}"))?;
        k.dialer = Some(dialer);
        Ok(k)
    }

    fn start(listener: &TcpListener, token: &[u8], arrivals: Arrivals, thread_start: fn()) -> Result<Keeper, String> {
        let listener = listener.try_clone().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(EventFd::new().map_err(|e| e.to_string())?);
        let (token, stopped) = (token.to_vec(), stop.clone());
        let acceptor = std::thread::Builder::new()
            .name("gallocy-keeper".into())
            .spawn(move || {
                thread_start();
                keep(&listener, &stopped, &token, &arrivals)
            })
            .map_err(|e| format!("starting the connection keeper thread: {e}"))?;
        Ok(Keeper { passed: None, stop, acceptor: Some(acceptor), dialer: None })
    }

    /// The next join that proves the job's token, before `deadline`, with the rank it proved.
    /// Connections that fail the handshake are closed without a byte of heap.
    pub(super) fn next(&self, deadline: Instant) -> Result<(Conn, usize), String> {
        let passed = self.passed.as_ref().ok_or("this keeper takes no joins")?;
        let passed = passed.lock().unwrap_or_else(|p| p.into_inner());
        match passed.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => Err("timed out".into()),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the connection keeper thread ended".into()),
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.signal();
        for t in [self.acceptor.take(), self.dialer.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

/// The keeper's thread: accepts until `stop` is signalled, serving the handshakes of the
/// connections (at most [`MAX_HANDSHAKES`] at once; the rest wait in the listen queue). An error
/// that ends it goes to start-up (rank 0), or ends the process's links: senders then find their
/// peers unreachable.
fn keep(listener: &TcpListener, stop: &EventFd, token: &[u8], arrivals: &Arrivals) {
    if let Err(e) = accept_until_stopped(listener, stop, token, arrivals) {
        match arrivals {
            Arrivals::Joins(pass) => {
                let _ = pass.send(Err(e));
            }
            Arrivals::Links(links) => {
                for rank in 0..links.size {
                    if links.linked(rank).is_none() && rank != links.rank {
                        links.fail(rank, libc::EMFILE);
                    }
                }
            }
        }
    }
}

fn accept_until_stopped(
    listener: &TcpListener,
    stop: &EventFd,
    token: &[u8],
    arrivals: &Arrivals,
) -> Result<(), String> {
    let mut arriving: Vec<Arriving> = Vec::new();
    loop {
        let now = Instant::now();
        arriving.retain(|a| a.deadline > now);
        let room = arriving.len() < MAX_HANDSHAKES;
        let mut fds = vec![stop.0, if room { listener.as_raw_fd() } else { -1 }];
        fds.extend(arriving.iter().map(|a| a.stream.as_raw_fd()));
        let timeout = arriving
            .iter()
            .map(|a| a.deadline)
            .min()
            .map_or(-1, |d| d.saturating_duration_since(now).as_millis().min(i32::MAX as u128) as libc::c_int + 1);
        let ready = sys::poll_readable_all(&fds, timeout).map_err(|e| format!("waiting for connections: {e}"))?;
        if ready[0] {
            return Ok(());
        }
        let before = std::mem::take(&mut arriving);
        for (a, readable) in before.into_iter().zip(&ready[2..]) {
            if !readable {
                arriving.push(a);
                continue;
            }
            match a.progress(token) {
                Progress::Waiting(a) => arriving.push(a),
                Progress::Done(conn, rank) => match arrivals {
                    // Start-up may be over: the stream then just closes.
                    Arrivals::Joins(pass) => {
                        let _ = pass.send(Ok((conn, rank)));
                    }
                    Arrivals::Links(links) => links.take_incoming(rank, conn),
                },
                Progress::Dropped => {}
            }
        }
        while ready[1] && arriving.len() < MAX_HANDSHAKES {
            match listener.accept() {
                Ok((s, _)) => arriving.extend(Arriving::greet(s)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of descriptors, typically: the job cannot start, and says why.
                Err(e) => return Err(format!("accepting a connection: {e}")),
            }
        }
    }
}

/// A connection whose handshake is under way: our hello went out, and its proof comes in, on a
/// non-blocking socket. A connection that fails the handshake, or does not finish it within
/// [`AUTH_TIMEOUT`], is closed without a byte of heap.
struct Arriving {
    stream: TcpStream,
    acceptance: auth::Acceptance,
    proof: [u8; auth::CLIENT_PROOF_LEN],
    got: usize,
    deadline: Instant,
}

/// Where a handshake stands after the bytes that came.
enum Progress {
    Waiting(Arriving),
    /// Proven: the connection and the rank it proved.
    Done(Conn, usize),
    Dropped,
}

impl Arriving {
    /// Sends a new connection our hello; `None` if it cannot take it.
    fn greet(stream: TcpStream) -> Option<Arriving> {
        stream.set_nonblocking(true).ok()?;
        let acceptance = auth::Acceptance::new().ok()?;
        // A new connection's send buffer takes these few bytes at once.
        let hello = acceptance.hello();
        if (&stream).write(&hello).ok()? != hello.len() {
            return None;
        }
        let deadline = Instant::now() + AUTH_TIMEOUT;
        Some(Arriving { stream, acceptance, proof: [0; auth::CLIENT_PROOF_LEN], got: 0, deadline })
    }

    /// Reads what came; once the proof is whole, checks it and answers.
    fn progress(mut self, token: &[u8]) -> Progress {
        while self.got < self.proof.len() {
            match (&self.stream).read(&mut self.proof[self.got..]) {
                Ok(0) => return Progress::Dropped,
                Ok(n) => self.got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Progress::Waiting(self),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Dropped,
            }
        }
        let Ok((rank, answer, keys)) = self.acceptance.check(token, &self.proof) else { return Progress::Dropped };
        if !matches!((&self.stream).write(&answer), Ok(n) if n == answer.len()) {
            return Progress::Dropped;
        }
        // As a blocking handshake leaves it: whoever takes the connection sets it up for itself.
        let blocking = self.stream.set_nonblocking(false).is_ok()
            && self.stream.set_read_timeout(Some(AUTH_TIMEOUT)).is_ok()
            && self.stream.set_write_timeout(Some(AUTH_TIMEOUT)).is_ok();
        if !blocking {
            return Progress::Dropped;
        }
        Progress::Done(Conn { stream: self.stream, keys }, rank as usize)
    }
}

/// Connects to `addr` and proves we are `rank`, trying again until `deadline` while the peer
/// cannot be reached or the handshake does not finish. A refused connection (or an address that
/// cannot be reached from here) is final unless `refused_may_pass` (rank 0 may not listen yet
/// when a rank joins; a peer in the roster listened before it joined, so a refusal means it is
/// gone or its address is wrong).
pub(super) fn connect_authenticated(
    addr: &SocketAddr,
    token: &[u8],
    rank: usize,
    deadline: Instant,
    refused_may_pass: bool,
) -> Result<Conn, TransportError> {
    loop {
        match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
            Ok(mut s) => match auth::connect(&mut s, token, rank as u32, AUTH_TIMEOUT) {
                Ok(keys) => return Ok(Conn { stream: s, keys }),
                // The peer said no to our token, or is not gallocy: trying again cannot help.
                Err(e) if auth::is_refusal(&e) || Instant::now() >= deadline => return Err(e),
                // A handshake that did not finish (the peer was busy, the connection dropped):
                // try again with a new connection.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            },
            Err(e) if !refused_may_pass && is_final(&e) => {
                return Err(TransportError::io(format!("cannot reach {addr}"), e))
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(TransportError::io(format!("cannot reach {addr}"), e)),
        }
    }
}

/// Whether a failed `connect` cannot succeed by trying again: the address refuses, or is not
/// reachable from this host.
fn is_final(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL))
}
