//! TCP transport: one connection per pair of processes, `TCP_NODELAY`, length-prefixed frames.
//!
//! Start-up ([`establish`]): every rank authenticates to rank 0 (the coordinator) and sends a
//! join record with an opaque hello (the runtime's configuration report). Rank 0 checks all hellos
//! with the caller's function and either sends every rank the roster of listening addresses or
//! stops the job with a message. Ranks then connect downwards (rank r connects to ranks 1..r and
//! accepts from ranks above it, from the moment it starts: an acceptor thread lets them in while
//! it connects down), authenticating each connection; the join connections serve as the links to
//! rank 0. After start-up, listeners accept and immediately close anything that connects.
//!
//! Every record and frame after a connection's handshake carries a tag under that connection's
//! keys ([`crate::seal`]); one that fails it loses the peer. Page contents land in the runtime view
//! only when they are owed: a reply to a read this process started, or what the runtime's
//! [`PageCheck`] accepts; nothing else lands, not even in part.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::frame::{FrameError, Header, Kind, HEADER_LEN};
use crate::seal::{Opener, Sealer, SessionKeys, Tag, TAG_LEN};
use crate::sys::{self, Backlog, Epoll, EventFd, LazyBuf};
use crate::{auth, Accept, Event, LostReason, MemoryView, Span, Transport, TransportError};

/// Rank 0's judgement of every rank's hello (indexed by rank): `Err` stops the job with that text.
pub type Judge = dyn Fn(&[Vec<u8>]) -> Result<(), String>;

/// Start-up parameters.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub size: usize,
    /// `host:port` where rank 0 listens.
    pub coordinator: String,
    /// The coordinator's port is held for this job by its launcher ([`crate::coordinator::PortHold`]):
    /// rank 0's listener joins the hold.
    pub coordinator_held: bool,
    /// Address ranks other than 0 bind their listeners to, and are reached at. The unspecified
    /// address (`0.0.0.0`, `::`) listens on every interface and advertises this host's address on
    /// its connection to rank 0. Rank 0 listens on `coordinator` and ignores it.
    pub bind: IpAddr,
    /// The job's secret.
    pub token: Vec<u8>,
    /// The local runtime view of the heap.
    pub view: MemoryView,
    /// How long start-up may take before it fails.
    pub setup_timeout: Duration,
    /// Which page contents this process is owed: the page of a message lands in the runtime view
    /// only if this says yes (`None`: every page in the view).
    pub owed: Option<PageCheck>,
}

/// Whether the page contents (`span`) that come with message `msg` from rank `from` are owed to
/// this process. Called on the thread that reads the connection, which may be a thread waiting in
/// the page-fault handler: it must be async-signal-safe.
pub type PageCheck = fn(from: usize, msg: &[u8], span: Span) -> bool;

/// Reads of our view a peer asked for that we have not answered yet are not tracked; reads we
/// asked for are: at most this many per peer at a time.
const READS_IN_FLIGHT: usize = 64;

const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
const KEY_WAKE: u64 = u64::MAX;
const KEY_LISTENER: u64 = u64::MAX - 1;
/// An fd another transport layered on this one waits on (see [`TcpTransport::watch_fd`]).
const KEY_EXTERNAL: u64 = u64::MAX - 2;
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Receive staging buffer per connection.
const STAGE: usize = 64 * 1024;
/// Most bytes a writer that waits for room takes in from the same peer (address space; memory
/// only once used).
const BACKLOG: usize = 32 << 20;

/// A connection to one peer.
struct Peer {
    stream: TcpStream,
    /// Serializes whole frames from the many threads that send, and seals them in the order they
    /// go on the wire.
    out: Mutex<Outgoing>,
    /// The peer said goodbye.
    left: AtomicBool,
}

/// What one connection's senders share, under its lock.
struct Outgoing {
    sealer: Sealer,
    /// The page of the frame being sent, copied from the view: the tag and the bytes on the wire
    /// are of one snapshot even while a thread of this process writes the page (a home writes its
    /// master copy in place under release consistency).
    page: Vec<u8>,
}

/// An authenticated connection during start-up: the stream and its keys.
struct Conn {
    stream: TcpStream,
    keys: SessionKeys,
}

/// Receive-side state of one connection; touched only by the polling thread.
#[derive(Default)]
struct Inbox {
    header_bytes: [u8; HEADER_LEN],
    header_got: usize,
    header: Option<Header>,
    msg: Vec<u8>,
    msg_got: usize,
    page_got: usize,
    /// The frame's tag, last on the wire.
    tag: Tag,
    tag_got: usize,
    /// Checks every frame from this peer.
    opener: Option<Opener>,
    /// What this peer did wrong, found where it could not be reported (a waiting thread's read):
    /// the service thread reports it.
    broken: Option<FrameError>,
    closed: bool,
    /// A complete frame waits for the service thread.
    pending: bool,
    /// Received bytes not yet parsed: `stage[stage_start..stage_end]` (memory only once the
    /// connection carries data: most peers of a large job never send us anything).
    stage: LazyBuf,
    stage_start: usize,
    stage_end: usize,
    /// What writers to this peer took in while they waited for room: read before the socket.
    backlog: Backlog,
}

impl Inbox {
    fn new(opener: Option<Opener>) -> std::io::Result<Inbox> {
        // Room for the largest message up front: the inline path must never allocate.
        Ok(Inbox {
            opener,
            msg: Vec::with_capacity(crate::MAX_MESSAGE),
            stage: LazyBuf::new(STAGE)?,
            backlog: Backlog::new(BACKLOG)?,
            ..Inbox::default()
        })
    }

    /// Forgets the current frame (it was delivered or consumed).
    fn reset(&mut self) {
        self.header = None;
        self.header_got = 0;
        self.msg_got = 0;
        self.page_got = 0;
        self.tag_got = 0;
        self.msg.clear();
    }
}

/// Who takes complete frames.
enum Sink<'a> {
    /// The service thread: every frame becomes an event.
    Service(&'a mut dyn for<'e> FnMut(Event<'e>)),
    /// A waiting thread: takes the messages it can handle, leaves the rest.
    Inline(&'a mut Accept<'a>),
}

struct Receiver {
    inboxes: Vec<Inbox>,
}

/// The TCP implementation of [`Transport`].
pub struct TcpTransport {
    rank: usize,
    size: usize,
    view: MemoryView,
    owed: Option<PageCheck>,
    /// Per peer, the keys of a transport layered on its connection, until that transport takes
    /// them ([`TcpTransport::take_layered_keys`]).
    layered: Mutex<Vec<Option<(Sealer, Opener)>>>,
    /// Per peer, [`READS_IN_FLIGHT`] slots of reads we asked it for: `offset + 1` of each, 0 when
    /// free. Only a reply to one of them may land.
    reads: Box<[AtomicU64]>,
    peers: Vec<Option<Peer>>,
    listener: TcpListener,
    epoll: Epoll,
    waker: EventFd,
    receiver: Mutex<Receiver>,
}

fn setup_err(cfg: &TcpConfig, what: impl std::fmt::Display) -> TransportError {
    TransportError::Bootstrap(format!("rank {}: {what}", cfg.rank))
}

fn invalid(what: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// A start-up record: a little-endian u32 length, that many bytes, and their tag.
fn write_record(c: &mut Conn, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("record too long"))?;
    let len = U32::new(len);
    let tag = c.keys.sealer.seal(&[len.as_bytes(), bytes]);
    c.stream.write_all(&[len.as_bytes(), bytes, &tag].concat())
}

fn read_record(c: &mut Conn, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = U32::ZERO;
    c.stream.read_exact(len.as_mut_bytes())?;
    let n = usize::try_from(len.get()).map_err(|_| invalid("record too long"))?;
    if n > limit {
        return Err(invalid("record too long"));
    }
    let mut v = vec![0u8; n];
    c.stream.read_exact(&mut v)?;
    let mut tag = [0u8; TAG_LEN];
    c.stream.read_exact(&mut tag)?;
    if !c.keys.opener.open(&[len.as_bytes(), &v], &tag) {
        return Err(invalid("record failed authentication"));
    }
    Ok(v)
}

/// The fixed start of a join record; `addr_len` bytes of listening address (UTF-8 `host:port`)
/// and the hello follow.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct JoinHead {
    /// The job size the joining rank believes in.
    size: U32,
    addr_len: U32,
}

/// A decoded join record.
#[derive(Debug, PartialEq, Eq)]
struct Join {
    size: usize,
    addr: String,
    hello: Vec<u8>,
}

/// Join record a rank sends rank 0: size it believes in, its listening address, its hello.
fn encode_join(size: usize, listen: &SocketAddr, hello: &[u8]) -> Vec<u8> {
    let addr = listen.to_string();
    // A job size beyond u32 cannot be real; saturating makes rank 0 report the mismatch.
    let head = JoinHead {
        size: U32::new(u32::try_from(size).unwrap_or(u32::MAX)),
        // A socket address's text is a few dozen bytes.
        addr_len: U32::new(addr.len() as u32),
    };
    [head.as_bytes(), addr.as_bytes(), hello].concat()
}

fn decode_join(v: &[u8]) -> Option<Join> {
    let (head, rest) = JoinHead::ref_from_prefix(v).ok()?;
    let (addr, hello) = rest.split_at_checked(usize::try_from(head.addr_len.get()).ok()?)?;
    Some(Join {
        size: usize::try_from(head.size.get()).ok()?,
        addr: std::str::from_utf8(addr).ok()?.to_owned(),
        hello: hello.to_vec(),
    })
}

/// The join record's codec and record reader for the fuzz targets in `runtime/fuzz`: not part of
/// the API (re-exported by `crate::fuzzing`).
#[doc(hidden)]
pub mod fuzzing {
    /// `decode_join`: `(size, listening address, hello)`.
    pub fn decode_join(v: &[u8]) -> Option<(usize, String, Vec<u8>)> {
        super::decode_join(v).map(|j| (j.size, j.addr, j.hello))
    }

    /// `encode_join`.
    pub fn encode_join(size: usize, listen: &std::net::SocketAddr, hello: &[u8]) -> Vec<u8> {
        super::encode_join(size, listen, hello)
    }

    use crate::seal::{Role, SessionKeys};

    /// `read_record` on a connection whose session secret is empty (the fuzz target's).
    pub fn read_record(s: &mut std::net::TcpStream, limit: usize) -> std::io::Result<Vec<u8>> {
        let stream = s.try_clone()?;
        super::read_record(&mut super::Conn { stream, keys: SessionKeys::derive(&[], Role::Acceptor) }, limit)
    }

    /// What `write_record` sends for `bytes`, as the first record of a connection whose session
    /// secret is empty.
    pub fn sealed_record(bytes: &[u8]) -> Vec<u8> {
        let mut keys = SessionKeys::derive(&[], Role::Connector);
        let len = zerocopy::little_endian::U32::new(bytes.len() as u32);
        let tag = keys.sealer.seal(&[zerocopy::IntoBytes::as_bytes(&len), bytes]);
        [zerocopy::IntoBytes::as_bytes(&len), bytes, &tag].concat()
    }
}

/// Rank 0's answer: b'O' + roster lines, or b'A' + reason.
fn encode_roster(addrs: &[String]) -> Vec<u8> {
    let mut v = vec![b'O'];
    v.extend_from_slice(addrs.join("\n").as_bytes());
    v
}

/// The address `addr` (`host:port`) stands for: the first the resolver gives, as everywhere in
/// start-up (so every caller means the same one).
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// This host's address on its route to `to`: the source address the kernel would give a packet
/// sent there. Found by `connect`ing a UDP socket (which only looks the route up; no packet is
/// sent) and reading its local address. Fails (e.g. `ENETUNREACH`) when there is no route.
pub fn route_source(to: &SocketAddr) -> std::io::Result<IpAddr> {
    let any: IpAddr = match to {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let probe = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    probe.connect(to)?;
    Ok(probe.local_addr()?.ip())
}

/// Most handshakes served at once during start-up; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 64;

/// What the doorman hands over: a connection that proved the token and the rank it proved, or
/// why it cannot go on.
type Passed = Result<(Conn, usize), String>;

/// Serves the start-up handshakes of whoever connects, from the moment it exists: an acceptor
/// thread takes every connection as it arrives and gives each its own short-lived handshake
/// thread, so that a stranger that connects and says nothing (or slowly) delays nobody, and a
/// rank busy connecting to others still lets the ranks that connect to it in. The acceptor
/// sleeps in `poll` until a connection comes or the doorman ends (while every handshake slot
/// is taken, it looks again every 5 ms for one that came free).
struct Doorman {
    passed: mpsc::Receiver<Passed>,
    /// Signalled when the doorman ends: the acceptor then stops.
    stop: Arc<EventFd>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Doorman {
    fn new(listener: &TcpListener, token: &[u8]) -> Result<Doorman, String> {
        let listener = listener.try_clone().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(EventFd::new().map_err(|e| e.to_string())?);
        let (pass, passed) = mpsc::channel();
        let (token, stopped) = (token.to_vec(), stop.clone());
        let acceptor = std::thread::Builder::new()
            .name("gallocy-doorman".into())
            .spawn(move || accept_all(&listener, &stopped, &token, &pass))
            .map_err(|e| format!("starting the start-up acceptor thread: {e}"))?;
        Ok(Doorman { passed, stop, acceptor: Some(acceptor) })
    }

    /// The next connection that proves the job's token, before `deadline`, with the rank it
    /// proved. Connections that fail the handshake are closed without a byte of heap.
    fn next(&self, deadline: Instant) -> Result<(Conn, usize), String> {
        match self.passed.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => Err("timed out".into()),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the start-up acceptor thread ended".into()),
        }
    }
}

impl Drop for Doorman {
    fn drop(&mut self) {
        self.stop.signal();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// The acceptor thread of a [`Doorman`]: accepts until `stop` is signalled, and starts a
/// handshake thread per connection (at most [`MAX_HANDSHAKES`] at once; the rest wait in the
/// listen queue). An error that ends it goes to `pass`.
fn accept_all(listener: &TcpListener, stop: &EventFd, token: &[u8], pass: &mpsc::Sender<Passed>) {
    if let Err(e) = accept_until_stopped(listener, stop, token, pass) {
        let _ = pass.send(Err(e));
    }
}

fn accept_until_stopped(
    listener: &TcpListener,
    stop: &EventFd,
    token: &[u8],
    pass: &mpsc::Sender<Passed>,
) -> Result<(), String> {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let full = busy.load(Ordering::Acquire) >= MAX_HANDSHAKES;
        let (listen_fd, timeout) = if full { (-1, 5) } else { (listener.as_raw_fd(), -1) };
        let [stopped, _] =
            sys::poll_readable([stop.0, listen_fd], timeout).map_err(|e| format!("waiting for connections: {e}"))?;
        if stopped {
            return Ok(());
        }
        while busy.load(Ordering::Acquire) < MAX_HANDSHAKES {
            match listener.accept() {
                Ok((s, _)) => greet(s, token, pass, &busy)?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of descriptors, typically: the job cannot start, and says why.
                Err(e) => return Err(format!("accepting a connection: {e}")),
            }
        }
    }
}

/// Runs the handshake of `s` on a thread of its own; a connection that proves the token goes to
/// `pass`.
fn greet(mut s: TcpStream, token: &[u8], pass: &mpsc::Sender<Passed>, busy: &Arc<AtomicUsize>) -> Result<(), String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    let (token, pass, done) = (token.to_vec(), pass.clone(), busy.clone());
    busy.fetch_add(1, Ordering::AcqRel);
    let started = std::thread::Builder::new().name("gallocy-handshake".into()).spawn(move || {
        if let Ok((rank, keys)) = auth::accept(&mut s, &token, AUTH_TIMEOUT) {
            // The doorman may be gone (start-up ended): the stream then just closes.
            let _ = pass.send(Ok((Conn { stream: s, keys }, rank as usize)));
        }
        done.fetch_sub(1, Ordering::AcqRel);
    });
    started.map(|_| ()).map_err(|e| {
        busy.fetch_sub(1, Ordering::AcqRel);
        format!("starting a handshake thread: {e}")
    })
}

fn connect_authenticated(addr: &SocketAddr, cfg: &TcpConfig, deadline: Instant) -> Result<Conn, TransportError> {
    loop {
        match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
            Ok(mut s) => match auth::connect(&mut s, &cfg.token, cfg.rank as u32, AUTH_TIMEOUT) {
                Ok(keys) => return Ok(Conn { stream: s, keys }),
                // The peer said no to our token, or is not gallocy: trying again cannot help.
                Err(e) if auth::is_refusal(&e) || Instant::now() >= deadline => {
                    return Err(setup_err(cfg, format!("connecting to {addr}: {e}")))
                }
                // A handshake that did not finish (the peer was busy, the connection dropped):
                // try again with a new connection.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            },
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(setup_err(cfg, format!("cannot reach {addr}: {e}"))),
        }
    }
}

/// Sets up the job's connections. `hello` is this rank's report; on rank 0, `check` judges all
/// reports (indexed by rank) and may stop the job with a message.
pub fn establish(cfg: &TcpConfig, hello: &[u8], check: &Judge) -> Result<TcpTransport, TransportError> {
    if cfg.size == 0 || cfg.rank >= cfg.size {
        return Err(TransportError::Invalid(format!("rank {} of {}", cfg.rank, cfg.size)));
    }
    let deadline = Instant::now() + cfg.setup_timeout;
    let coordinator = resolve(&cfg.coordinator).map_err(|e| setup_err(cfg, format!("GALLOCY_COORDINATOR: {e}")))?;
    let mut peers: Vec<Option<Conn>> = (0..cfg.size).map(|_| None).collect();
    let listener;
    if cfg.rank == 0 {
        listener = crate::coordinator::listen(coordinator, cfg.coordinator_held).map_err(|e| {
            let held = if cfg.coordinator_held { " (held for this job by its launcher)" } else { "" };
            setup_err(cfg, format!("cannot listen on coordinator address {coordinator}{held}: {e}"))
        })?;
        coordinate(cfg, &listener, hello, check, deadline, &mut peers)?;
    } else {
        listener = crate::coordinator::listen(SocketAddr::new(cfg.bind, 0), false)
            .map_err(|e| setup_err(cfg, format!("cannot listen on {}: {e}", cfg.bind)))?;
        join(cfg, &listener, &coordinator, hello, deadline, &mut peers)?;
    }
    TcpTransport::new(cfg, listener, peers)
}

fn coordinate(
    cfg: &TcpConfig,
    listener: &TcpListener,
    hello: &[u8],
    check: &Judge,
    deadline: Instant,
    peers: &mut [Option<Conn>],
) -> Result<(), TransportError> {
    let mut hellos: Vec<Option<Vec<u8>>> = vec![None; cfg.size];
    let mut addrs = vec![String::new(); cfg.size];
    hellos[0] = Some(hello.to_vec());
    addrs[0] = cfg.coordinator.clone();
    let mut problem: Option<String> = None;
    let doorman = Doorman::new(listener, &cfg.token).map_err(|e| setup_err(cfg, e))?;
    while hellos.iter().any(Option::is_none) {
        let (mut s, rank) = match doorman.next(deadline) {
            Ok(x) => x,
            Err(why) => {
                let missing: Vec<String> =
                    (0..cfg.size).filter(|r| hellos[*r].is_none()).map(|r| r.to_string()).collect();
                let mut msg = format!(
                    "{} {} did not join within {:?} (not started, wrong GALLOCY_TOKEN or GALLOCY_COORDINATOR?)",
                    if missing.len() == 1 { "rank" } else { "ranks" },
                    missing.join(", "),
                    cfg.setup_timeout
                );
                if why != "timed out" {
                    msg = format!("{msg}; rank 0 stopped taking connections: {why}");
                }
                abort_all(peers, &msg);
                return Err(TransportError::Bootstrap(msg));
            }
        };
        let join = s.stream.set_read_timeout(Some(AUTH_TIMEOUT)).and_then(|_| read_record(&mut s, 1 << 20));
        let Some(Join { size, addr, hello: their_hello }) = join.ok().as_deref().and_then(decode_join) else {
            continue;
        };
        if rank == 0 || rank >= cfg.size {
            let msg = format!("a process claims rank {rank}, but the job has ranks 0..{}", cfg.size - 1);
            let _ = write_record(&mut s, &[&b"A"[..], msg.as_bytes()].concat());
            problem.get_or_insert(msg);
            continue;
        }
        if hellos[rank].is_some() {
            let msg = format!("two processes claim rank {rank}");
            let _ = write_record(&mut s, &[&b"A"[..], msg.as_bytes()].concat());
            problem.get_or_insert(msg);
            continue;
        }
        if size != cfg.size {
            problem.get_or_insert(format!(
                "rank {rank} believes the job has {size} processes, rank 0 believes {}",
                cfg.size
            ));
        }
        hellos[rank] = Some(their_hello);
        addrs[rank] = addr;
        peers[rank] = Some(s);
    }
    let hellos: Vec<Vec<u8>> = hellos.into_iter().map(|h| h.expect("all joined")).collect();
    if let Some(msg) = problem.or_else(|| check(&hellos).err()) {
        abort_all(peers, &msg);
        return Err(TransportError::JobAborted(msg));
    }
    let roster = encode_roster(&addrs);
    for (rank, p) in peers.iter_mut().enumerate() {
        if let Some(s) = p {
            write_record(s, &roster).map_err(|e| setup_err(cfg, format!("sending roster to rank {rank}: {e}")))?;
        }
    }
    Ok(())
}

fn abort_all(peers: &mut [Option<Conn>], msg: &str) {
    let record = [&b"A"[..], msg.as_bytes()].concat();
    for s in peers.iter_mut().flatten() {
        let _ = write_record(s, &record);
    }
}

fn join(
    cfg: &TcpConfig,
    listener: &TcpListener,
    coordinator: &SocketAddr,
    hello: &[u8],
    deadline: Instant,
    peers: &mut [Option<Conn>],
) -> Result<(), TransportError> {
    // Higher ranks may connect as soon as they have the roster, while this rank still connects
    // to the lower ones: let them in from the start.
    let doorman = Doorman::new(listener, &cfg.token).map_err(|e| setup_err(cfg, e))?;
    let mut to_zero = connect_authenticated(coordinator, cfg, deadline)?;
    let local_ip = to_zero.stream.local_addr().map_err(|e| setup_err(cfg, e))?.ip();
    let port = listener.local_addr().map_err(|e| setup_err(cfg, e))?.port();
    let advertised = SocketAddr::new(if cfg.bind.is_unspecified() { local_ip } else { cfg.bind }, port);
    write_record(&mut to_zero, &encode_join(cfg.size, &advertised, hello))
        .map_err(|e| setup_err(cfg, format!("sending join to rank 0: {e}")))?;
    to_zero.stream.set_read_timeout(Some(cfg.setup_timeout + AUTH_TIMEOUT)).map_err(|e| setup_err(cfg, e))?;
    let answer = read_record(&mut to_zero, 1 << 20)
        .map_err(|e| setup_err(cfg, format!("no answer from rank 0 during start-up: {e}")))?;
    match answer.first() {
        Some(b'O') => {}
        Some(b'A') => return Err(TransportError::JobAborted(String::from_utf8_lossy(&answer[1..]).into_owned())),
        _ => return Err(setup_err(cfg, "malformed start-up answer from rank 0")),
    }
    let roster: Vec<String> = String::from_utf8_lossy(&answer[1..]).split('\n').map(str::to_owned).collect();
    if roster.len() != cfg.size {
        return Err(setup_err(cfg, "roster from rank 0 has the wrong length"));
    }
    peers[0] = Some(to_zero);
    for (j, addr) in roster.iter().enumerate().take(cfg.rank).skip(1) {
        let a = resolve(addr).map_err(|e| setup_err(cfg, e))?;
        peers[j] = Some(connect_authenticated(&a, cfg, deadline)?);
    }
    while peers.iter().skip(cfg.rank + 1).any(Option::is_none) {
        let (s, rank) =
            doorman.next(deadline).map_err(|e| setup_err(cfg, format!("waiting for higher ranks to connect: {e}")))?;
        if rank > cfg.rank && rank < cfg.size && peers[rank].is_none() {
            peers[rank] = Some(s);
        }
    }
    Ok(())
}

fn set_socket_options(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nonblocking(true)?;
    // Large buffers make a writer wait for room less often. The kernel caps them
    // (`net.core.wmem_max`, `rmem_max`) without failing; nothing depends on their size (a writer
    // that waits for room takes in what its peer sends), but a refusal is an error.
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setting an int socket option from a valid pointer.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl TcpTransport {
    fn new(cfg: &TcpConfig, listener: TcpListener, streams: Vec<Option<Conn>>) -> Result<TcpTransport, TransportError> {
        let epoll = Epoll::new().map_err(|e| TransportError::io("epoll_create1", e))?;
        let waker = EventFd::new().map_err(|e| TransportError::io("eventfd", e))?;
        epoll.add(waker.0, KEY_WAKE).map_err(|e| TransportError::io("epoll_ctl", e))?;
        listener.set_nonblocking(true).map_err(|e| TransportError::io("listener", e))?;
        epoll.add(listener.as_raw_fd(), KEY_LISTENER).map_err(|e| TransportError::io("epoll_ctl", e))?;
        let mut peers = Vec::with_capacity(cfg.size);
        let mut inboxes = Vec::with_capacity(cfg.size);
        let mut layered = Vec::with_capacity(cfg.size);
        for (rank, c) in streams.into_iter().enumerate() {
            match c {
                Some(Conn { stream: s, keys }) => {
                    set_socket_options(&s).map_err(|e| TransportError::io(format!("socket to rank {rank}"), e))?;
                    epoll.add(s.as_raw_fd(), rank as u64).map_err(|e| TransportError::io("epoll_ctl", e))?;
                    peers.push(Some(Peer {
                        stream: s,
                        out: Mutex::new(Outgoing { sealer: keys.sealer, page: Vec::new() }),
                        left: AtomicBool::new(false),
                    }));
                    layered.push(Some((keys.layered_sealer, keys.layered_opener)));
                    inboxes.push(Inbox::new(Some(keys.opener)).map_err(|e| TransportError::io("receive buffer", e))?);
                }
                None if rank == cfg.rank => {
                    peers.push(None);
                    layered.push(None);
                    inboxes.push(Inbox::default());
                }
                None => {
                    return Err(TransportError::Bootstrap(format!("rank {}: no connection to rank {rank}", cfg.rank)))
                }
            }
        }
        Ok(TcpTransport {
            rank: cfg.rank,
            size: cfg.size,
            view: cfg.view,
            owed: cfg.owed,
            layered: Mutex::new(layered),
            reads: (0..cfg.size * READS_IN_FLIGHT).map(|_| AtomicU64::new(0)).collect(),
            peers,
            listener,
            epoll,
            waker,
            receiver: Mutex::new(Receiver { inboxes }),
        })
    }

    fn peer(&self, rank: usize) -> Result<&Peer, TransportError> {
        match self.peers.get(rank) {
            Some(Some(p)) => Ok(p),
            _ => Err(TransportError::NoSuchPeer(rank)),
        }
    }

    fn check_span(&self, span: Span) -> Result<(), TransportError> {
        self.view.check(span, crate::frame::MAX_SPAN)
    }

    /// The `len` bytes of the local view at `offset` (checked by the caller to lie inside it).
    /// Bytes of the local view that just landed (nobody writes a page while it arrives).
    fn view_bytes(&self, offset: u64, len: usize) -> &[u8] {
        if len == 0 {
            return &[];
        }
        // SAFETY: the span was checked to lie inside the view, which stays mapped as long as the
        // transport lives. A page arrives only for a thread of this process that waits for it,
        // with the page closed in the application view: nobody writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.view.base.add(offset as usize), len) }
    }

    /// Copies `dst.len()` bytes at `offset` of the local view into `dst`.
    fn copy_from_view(&self, offset: u64, dst: &mut [u8]) {
        if dst.is_empty() {
            return;
        }
        // SAFETY: the span was checked to lie inside the view, which stays mapped as long as the
        // transport lives; `dst` is private memory. Another thread may write the source bytes
        // meanwhile (release consistency): the copy is then of some mix of old and new bytes,
        // which is all a data-race-free program may rely on.
        unsafe { std::ptr::copy_nonoverlapping(self.view.base.add(offset as usize), dst.as_mut_ptr(), dst.len()) };
    }

    /// Writes one frame: header, message, `page` bytes taken from the local view (when the kind
    /// carries them), then the frame's tag. While it waits for room it takes in what the peer
    /// sends (see [`sys::write_all_vectored`]), if no other thread is reading.
    fn write_frame(&self, rank: usize, header: Header, msg: &[u8]) -> Result<(), TransportError> {
        let fd = self.peer(rank)?.stream.as_raw_fd();
        self.write_frame_absorbing(rank, header, msg, &mut || match self.receiver.try_lock() {
            Ok(mut rx) => self.absorb(fd, &mut rx.inboxes[rank]),
            Err(_) => Ok(0),
        })
    }

    /// Takes in what `fd` has for `inbox` (a writer waiting for room does this).
    fn absorb(&self, fd: RawFd, inbox: &mut Inbox) -> std::io::Result<usize> {
        let n = inbox.backlog.fill_from(fd)?;
        if n > 0 {
            // The service thread reads the backlog (no epoll event will say it is there).
            self.waker.signal();
        }
        Ok(n)
    }

    fn write_frame_absorbing(
        &self,
        rank: usize,
        header: Header,
        msg: &[u8],
        absorb: &mut dyn FnMut() -> std::io::Result<usize>,
    ) -> Result<(), TransportError> {
        let peer = self.peer(rank)?;
        let head = header.encode();
        let page_len =
            if matches!(header.kind, Kind::Message | Kind::ReadReply) { header.page_len as usize } else { 0 };
        let mut out = peer.out.lock().unwrap_or_else(|p| p.into_inner());
        let Outgoing { sealer, page: copy } = &mut *out;
        if copy.len() < page_len {
            // Once per connection (page-sized); never on the fault path, which attaches no page.
            copy.resize(page_len, 0);
        }
        let page = &mut copy[..page_len];
        self.copy_from_view(header.offset, page);
        let page = &*page;
        let tag = sealer.seal(&[&head, msg, page]);
        let mut parts = [
            libc::iovec { iov_base: head.as_ptr() as *mut libc::c_void, iov_len: HEADER_LEN },
            libc::iovec { iov_base: msg.as_ptr() as *mut libc::c_void, iov_len: msg.len() },
            libc::iovec { iov_base: page.as_ptr() as *mut libc::c_void, iov_len: page.len() },
            libc::iovec { iov_base: tag.as_ptr() as *mut libc::c_void, iov_len: TAG_LEN },
        ];
        let written = sys::write_all_vectored(peer.stream.as_raw_fd(), &mut parts, absorb);
        drop(out);
        written.map_err(|e| TransportError::PeerLost { rank, reason: LostReason::Io(e) })
    }

    /// Reads everything available on one connection, handing complete frames to `sink`.
    /// A frame the inline sink declines stays pending for the service thread, and nothing more
    /// is read from that connection until the service thread has taken it.
    ///
    /// Bytes are read into a staging buffer, so one `recv` usually brings a whole frame (header,
    /// message and page); a large page remainder is read straight into the runtime view.
    fn drain(&self, rank: usize, inbox: &mut Inbox, sink: &mut Sink<'_>) -> Result<usize, TransportError> {
        let fd: RawFd = self.peer(rank)?.stream.as_raw_fd();
        if let Some(e) = inbox.broken {
            return Err(TransportError::PeerLost { rank, reason: LostReason::Protocol(e) });
        }
        let mut delivered = 0;
        // A short read means the socket is empty for now: stop there instead of paying for
        // another `recv` that would only say so (epoll reports whatever comes next).
        let mut maybe_more = true;
        if inbox.pending {
            match sink {
                Sink::Inline(_) => return Ok(0),
                Sink::Service(handler) => {
                    inbox.pending = false;
                    delivered += self.deliver(rank, inbox, &mut **handler)?;
                }
            }
        }
        loop {
            while inbox.stage_start < inbox.stage_end {
                let (dst, want) = self.next_read(inbox);
                let take = want.min(inbox.stage_end - inbox.stage_start);
                // SAFETY: the source is initialized stage bytes, the destination has `want` bytes
                // of room (see next_read); the two never overlap.
                unsafe { std::ptr::copy_nonoverlapping(inbox.stage.as_ptr().add(inbox.stage_start), dst, take) };
                inbox.stage_start += take;
                if self.advance(rank, inbox, take)? && !self.complete(rank, inbox, sink, &mut delivered)? {
                    return Ok(delivered);
                }
            }
            inbox.stage_start = 0;
            inbox.stage_end = 0;
            if !maybe_more {
                return Ok(delivered);
            }
            let (dst, want) = self.next_read(inbox);
            let direct = inbox.header.is_some_and(|h| inbox.msg_got == h.msg_len as usize) && want >= 1024;
            let (ptr, len) = if direct { (dst, want) } else { (inbox.stage.as_mut_ptr(), inbox.stage.len()) };
            // SAFETY: `ptr` has `len` writable bytes: the stage, or the rest of a validated page;
            // neither overlaps the backlog.
            let input = unsafe {
                if inbox.backlog.is_empty() {
                    sys::read_into(fd, ptr, len)
                } else {
                    Ok(inbox.backlog.take(ptr, len))
                }
            };
            let n = match input {
                Ok(n) if n > 0 => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(delivered),
                // End of stream or an error: the service thread reports it.
                _ if matches!(sink, Sink::Inline(_)) => return Ok(delivered),
                Ok(_) => return self.closed(rank, inbox, LostReason::Closed).map(|_| delivered),
                Err(e) => return self.closed(rank, inbox, LostReason::Io(e)).map(|_| delivered),
            };
            maybe_more = n == len || !inbox.backlog.is_empty();
            if !direct {
                inbox.stage_end = n;
            } else if self.advance(rank, inbox, n)? && !self.complete(rank, inbox, sink, &mut delivered)? {
                return Ok(delivered);
            }
        }
    }

    /// Hands a complete frame to `sink`. Returns false when reading must stop (a pending frame).
    fn complete(
        &self,
        rank: usize,
        inbox: &mut Inbox,
        sink: &mut Sink<'_>,
        delivered: &mut usize,
    ) -> Result<bool, TransportError> {
        match sink {
            Sink::Service(handler) => *delivered += self.deliver(rank, inbox, &mut **handler)?,
            Sink::Inline(accept) => {
                let h = inbox.header.expect("a complete frame has a header");
                let taken = match h.kind {
                    Kind::Message => {
                        let page = (h.page_len > 0).then_some(Span { offset: h.offset, len: h.page_len });
                        accept(rank, &inbox.msg, page)
                    }
                    Kind::ReadRequest => {
                        self.deliver(rank, inbox, &mut |_| {})?;
                        return Ok(true);
                    }
                    Kind::ReadReply | Kind::Goodbye => false,
                };
                if !taken {
                    inbox.pending = true;
                    self.waker.signal();
                    return Ok(false);
                }
                inbox.reset();
                *delivered += 1;
            }
        }
        Ok(!inbox.closed)
    }

    /// Where the next bytes of this connection go, and how many are wanted.
    fn next_read(&self, inbox: &mut Inbox) -> (*mut u8, usize) {
        match inbox.header {
            None => (
                // SAFETY: header_got < HEADER_LEN while no header is decoded.
                unsafe { inbox.header_bytes.as_mut_ptr().add(inbox.header_got) },
                HEADER_LEN - inbox.header_got,
            ),
            Some(h) if inbox.msg_got < h.msg_len as usize => (
                // SAFETY: msg was sized to msg_len when the header was decoded.
                unsafe { inbox.msg.as_mut_ptr().add(inbox.msg_got) },
                h.msg_len as usize - inbox.msg_got,
            ),
            Some(h) if inbox.page_got < h.page_len as usize => (
                // SAFETY: the header was validated to lie within the view.
                unsafe { self.view.base.add(h.offset as usize + inbox.page_got) },
                h.page_len as usize - inbox.page_got,
            ),
            // SAFETY: tag_got < TAG_LEN until the frame is complete.
            Some(_) => (unsafe { inbox.tag.as_mut_ptr().add(inbox.tag_got) }, TAG_LEN - inbox.tag_got),
        }
    }

    /// Whether the page that follows header `h` (and message `msg`) from `rank` may land in our
    /// view: a reply to a read we asked that peer for (the slot is freed), or a page the runtime
    /// says it is owed.
    fn may_land(&self, rank: usize, h: &Header, msg: &[u8]) -> bool {
        let span = Span { offset: h.offset, len: h.page_len };
        match h.kind {
            Kind::ReadReply => self.reads[rank * READS_IN_FLIGHT..(rank + 1) * READS_IN_FLIGHT]
                .iter()
                .any(|s| s.compare_exchange(h.offset + 1, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok()),
            _ => self.owed.is_none_or(|owed| owed(rank, msg, span)),
        }
    }

    /// Records what `rank` did wrong, so that whichever thread reads its connection next
    /// reports it, and returns the error.
    fn broken(&self, rank: usize, inbox: &mut Inbox, e: FrameError) -> TransportError {
        inbox.broken = Some(e);
        // A waiting thread found it: the service thread must hear of it even if nothing more
        // arrives.
        self.waker.signal();
        TransportError::PeerLost { rank, reason: LostReason::Protocol(e) }
    }

    /// Accounts for `n` received bytes; returns true when a whole frame is in.
    fn advance(&self, rank: usize, inbox: &mut Inbox, n: usize) -> Result<bool, TransportError> {
        match inbox.header {
            None => {
                inbox.header_got += n;
                if inbox.header_got < HEADER_LEN {
                    return Ok(false);
                }
                let h = match Header::decode(&inbox.header_bytes, self.view.len) {
                    Ok(h) => h,
                    Err(e) => return Err(self.broken(rank, inbox, e)),
                };
                inbox.msg.resize(h.msg_len as usize, 0);
                let carries_page = matches!(h.kind, Kind::Message | Kind::ReadReply);
                inbox.header = Some(Header { page_len: if carries_page { h.page_len } else { 0 }, ..h });
                if h.kind == Kind::ReadRequest {
                    // Nothing follows but the tag.
                    inbox.header = Some(h);
                    inbox.page_got = h.page_len as usize;
                } else if carries_page && h.page_len > 0 && h.msg_len == 0 && !self.may_land(rank, &h, &[]) {
                    return Err(self.broken(rank, inbox, FrameError::NotOwed(h.offset, h.page_len)));
                }
                Ok(false)
            }
            Some(h) if inbox.msg_got < h.msg_len as usize => {
                inbox.msg_got += n;
                if inbox.msg_got == h.msg_len as usize && h.page_len > 0 && !self.may_land(rank, &h, &inbox.msg) {
                    return Err(self.broken(rank, inbox, FrameError::NotOwed(h.offset, h.page_len)));
                }
                Ok(false)
            }
            Some(h) if inbox.page_got < h.page_len as usize => {
                inbox.page_got += n;
                Ok(false)
            }
            Some(h) => {
                inbox.tag_got += n;
                if inbox.tag_got < TAG_LEN {
                    return Ok(false);
                }
                let page = if h.kind == Kind::ReadRequest { 0 } else { h.page_len as usize };
                let page = self.view_bytes(h.offset, page);
                let opener = inbox.opener.as_mut().expect("a connection to a peer has keys");
                if !opener.open(&[&inbox.header_bytes, &inbox.msg, page], &inbox.tag) {
                    return Err(self.broken(rank, inbox, FrameError::BadTag));
                }
                Ok(true)
            }
        }
    }

    fn deliver(
        &self,
        rank: usize,
        inbox: &mut Inbox,
        handler: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, TransportError> {
        let h = inbox.header.expect("a complete frame has a header");
        if h.kind == Kind::ReadRequest {
            // Answered at once. We hold this connection's reader, so while the answer waits
            // for room we take in what the peer sends ourselves.
            inbox.reset();
            let fd = self.peer(rank)?.stream.as_raw_fd();
            let reply = Header { kind: Kind::ReadReply, msg_len: 0, ..h };
            self.write_frame_absorbing(rank, reply, &[], &mut || self.absorb(fd, inbox))?;
            return Ok(0);
        }
        let delivered = self.deliver_frame(rank, h, &inbox.msg, handler);
        inbox.reset();
        delivered
    }

    fn deliver_frame(
        &self,
        rank: usize,
        h: Header,
        msg: &[u8],
        handler: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, TransportError> {
        let span = Span { offset: h.offset, len: h.page_len };
        match h.kind {
            Kind::Message => {
                let page = (h.page_len > 0).then_some(span);
                handler(Event::Message { from: rank, bytes: msg, page });
            }
            // Answered in `deliver`, which never passes one on.
            Kind::ReadRequest => return Ok(0),
            Kind::ReadReply => handler(Event::ReadDone { from: rank, token: h.token }),
            Kind::Goodbye => {
                self.peer(rank)?.left.store(true, Ordering::Release);
                handler(Event::PeerLeft { rank });
            }
        }
        Ok(1)
    }

    fn closed(&self, rank: usize, inbox: &mut Inbox, why: LostReason) -> Result<(), TransportError> {
        inbox.closed = true;
        let peer = self.peer(rank)?;
        self.epoll.del(peer.stream.as_raw_fd());
        if peer.left.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(TransportError::PeerLost { rank, reason: why })
        }
    }

    /// The keys for a transport layered on the connection to `peer` (RDMA): its own sealer and
    /// opener, from this connection's handshake. Given out once.
    pub fn take_layered_keys(&self, peer: usize) -> Option<(Sealer, Opener)> {
        self.layered.lock().unwrap_or_else(|p| p.into_inner()).get_mut(peer)?.take()
    }

    /// The page check this transport was set up with (a transport layered on it uses it too).
    pub fn owed(&self) -> Option<PageCheck> {
        self.owed
    }

    /// Makes [`Transport::poll`] also return when `fd` becomes readable (it reports no event
    /// for it; the caller drains `fd` itself). Used by the RDMA transport, which keeps these
    /// connections to learn of peers that die and waits on its completion channel here.
    pub fn watch_fd(&self, fd: RawFd) -> Result<(), TransportError> {
        self.epoll.add(fd, KEY_EXTERNAL).map_err(|e| TransportError::io("epoll_ctl", e))
    }

    /// After start-up nobody may connect: accept and close at once.
    fn refuse_latecomers(&self) {
        while let Ok((s, _)) = self.listener.accept() {
            drop(s);
        }
    }
}

impl Transport for TcpTransport {
    fn close_in_forked_child(&self) {
        let fds = self.peers.iter().flatten().map(|p| p.stream.as_raw_fd());
        for fd in fds.chain([self.listener.as_raw_fd(), self.epoll.0, self.waker.0]) {
            // SAFETY: closing descriptors this (forked) process inherited and never uses again;
            // the transport lives in a static that is never dropped, so nothing closes them twice.
            unsafe { libc::close(fd) };
        }
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, peer: usize, msg: &[u8], page: Option<Span>) -> Result<(), TransportError> {
        if msg.len() > crate::MAX_MESSAGE {
            return Err(TransportError::MessageTooLong(msg.len()));
        }
        let span = page.unwrap_or(Span { offset: 0, len: 0 });
        if page.is_some() {
            self.check_span(span)?;
        }
        let h = Header {
            kind: Kind::Message,
            msg_len: msg.len() as u32,
            page_len: span.len,
            offset: span.offset,
            token: 0,
        };
        self.write_frame(peer, h, msg)
    }

    fn start_read(&self, peer: usize, span: Span, token: u64) -> Result<(), TransportError> {
        self.check_span(span)?;
        let h = Header { kind: Kind::ReadRequest, msg_len: 0, page_len: span.len, offset: span.offset, token };
        self.peer(peer)?;
        let slots = &self.reads[peer * READS_IN_FLIGHT..(peer + 1) * READS_IN_FLIGHT];
        let free =
            slots.iter().find(|s| s.compare_exchange(0, span.offset + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok());
        if free.is_none() {
            return Err(TransportError::Invalid(format!("more than {READS_IN_FLIGHT} reads from rank {peer} at once")));
        }
        // The request carries no payload: the header and its tag.
        self.write_frame(peer, h, &[])
    }

    fn poll(&self, timeout: Option<Duration>, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError> {
        let ms = match timeout {
            None => -1,
            Some(d) => d.as_millis().min(i32::MAX as u128) as i32,
        };
        // Wait without the receiver lock, so a waiting thread can read meanwhile.
        let mut keys = [0u64; 32];
        let n = self.epoll.wait(&mut keys, ms).map_err(|e| TransportError::io("epoll_wait", e))?;
        let mut rx = self.receiver.lock().unwrap_or_else(|p| p.into_inner());
        let mut handled = 0;
        let mut sink = Sink::Service(handler);
        // A lost connection is reported after everything else that arrived: another peer's
        // message may explain it (a survivor saying which rank was lost, before the rank that
        // heard it first closed its connections too).
        let mut first_error = None;
        let mut drain = |rank: usize, inbox: &mut Inbox, sink: &mut Sink<'_>| match self.drain(rank, inbox, sink) {
            Ok(n) => handled += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        };
        for rank in 0..self.size {
            let inbox = &rx.inboxes[rank];
            if inbox.pending || inbox.broken.is_some() || (!inbox.closed && !inbox.backlog.is_empty()) {
                drain(rank, &mut rx.inboxes[rank], &mut sink);
            }
        }
        for &key in &keys[..n] {
            match key {
                KEY_WAKE => self.waker.drain(),
                KEY_LISTENER => self.refuse_latecomers(),
                KEY_EXTERNAL => {}
                rank if !rx.inboxes[rank as usize].closed => {
                    drain(rank as usize, &mut rx.inboxes[rank as usize], &mut sink)
                }
                _ => {}
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(handled),
        }
    }

    fn poll_inline(&self, accept: &mut Accept<'_>) -> usize {
        let mut keys = [0u64; 32];
        let Ok(n) = self.epoll.wait(&mut keys, 0) else { return 0 };
        if !keys[..n].iter().any(|k| (*k as usize) < self.size) {
            return 0;
        }
        let Ok(mut rx) = self.receiver.try_lock() else { return 0 };
        let mut sink = Sink::Inline(accept);
        let mut taken = 0;
        for &key in &keys[..n] {
            match key {
                // Level-triggered: the service thread still sees these.
                KEY_WAKE | KEY_LISTENER | KEY_EXTERNAL => {}
                rank => {
                    let inbox = &mut rx.inboxes[rank as usize];
                    if !inbox.closed && !inbox.pending {
                        taken += self.drain(rank as usize, inbox, &mut sink).unwrap_or(0);
                    }
                }
            }
        }
        taken
    }

    fn wait_for_wake(&self, timeout: Duration) {
        let mut p = libc::pollfd { fd: self.waker.0, events: libc::POLLIN, revents: 0 };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd and a valid timespec.
        if unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) } > 0 {
            self.waker.drain();
        }
    }

    fn wake(&self) {
        self.waker.signal();
    }

    fn say_goodbye(&self) -> Result<(), TransportError> {
        let bye = Header { kind: Kind::Goodbye, msg_len: 0, page_len: 0, offset: 0, token: 0 };
        for rank in (0..self.size).filter(|r| *r != self.rank) {
            self.write_frame(rank, bye, &[])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_record_round_trips() {
        let listen: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let v = encode_join(5, &listen, b"hello bytes");
        assert_eq!(&v[..8], &[5, 0, 0, 0, 13, 0, 0, 0]);
        assert_eq!(&v[8..21], b"10.1.2.3:4567");
        let j = decode_join(&v).unwrap();
        assert_eq!(j, Join { size: 5, addr: "10.1.2.3:4567".into(), hello: b"hello bytes".to_vec() });
        let empty = decode_join(&encode_join(2, &"[::1]:9".parse().unwrap(), &[])).unwrap();
        assert_eq!((empty.size, empty.addr.as_str(), empty.hello.len()), (2, "[::1]:9", 0));
    }

    #[test]
    fn join_record_refuses_truncated_and_garbage() {
        let listen: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let v = encode_join(5, &listen, &[]);
        for n in 0..v.len() {
            assert!(decode_join(&v[..n]).is_none(), "truncated to {n}");
        }
        let mut long = v.clone();
        long[4..8].copy_from_slice(&[0xff; 4]);
        assert!(decode_join(&long).is_none(), "address length beyond the record");
        let mut utf8 = v.clone();
        utf8[8] = 0xff;
        assert!(decode_join(&utf8).is_none(), "address not UTF-8");
        for garbage in [&[0xa5u8; 64][..], &[0xff; 8], &[]] {
            assert!(decode_join(garbage).is_none());
        }
    }

    /// A bounded in-suite fuzz run of the join record: a million random and mutated records,
    /// no panic, and an accepted record never claims more bytes than it has.
    #[test]
    fn fuzz_the_join_record() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = encode_join(7, &"127.0.0.1:40000".parse().unwrap(), b"hello");
        for _ in 0..500_000 {
            let len = (next() % 40) as usize;
            let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(j) = decode_join(&random) {
                assert!(j.addr.len() + j.hello.len() + 8 == random.len());
            }
            let mut m = valid.clone();
            for _ in 0..=(next() % 3) {
                let at = (next() % m.len() as u64) as usize;
                m[at] ^= 1 << (next() % 8);
            }
            if next() % 4 == 0 {
                m.truncate((next() % m.len() as u64) as usize);
            }
            if let Some(j) = decode_join(&m) {
                assert!(j.addr.len() + j.hello.len() + 8 == m.len());
            }
        }
    }

    fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// Two ends of one connection with the keys of one session.
    fn conn_pair() -> (Conn, Conn) {
        let (a, b) = socket_pair();
        let secret = [7u8; 32];
        (
            Conn { stream: a, keys: SessionKeys::derive(&secret, crate::seal::Role::Connector) },
            Conn { stream: b, keys: SessionKeys::derive(&secret, crate::seal::Role::Acceptor) },
        )
    }

    #[test]
    fn records_round_trip_and_refuse_bad_lengths_and_tags() {
        let (mut a, mut b) = conn_pair();
        write_record(&mut a, b"abc").unwrap();
        write_record(&mut a, &[]).unwrap();
        assert_eq!(read_record(&mut b, 3).unwrap(), b"abc");
        assert_eq!(read_record(&mut b, 3).unwrap(), b"");
        write_record(&mut a, b"abcd").unwrap();
        assert_eq!(read_record(&mut b, 3).unwrap_err().kind(), std::io::ErrorKind::InvalidData);

        // A record changed on the way, or not from the session's other end.
        let (mut a, mut b) = conn_pair();
        let mut changed = fuzzing::sealed_record(b"abc");
        changed[5] ^= 1;
        a.stream.write_all(&changed).unwrap();
        let e = read_record(&mut b, 100).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");

        let (mut a, mut b) = conn_pair();
        a.stream.write_all(&[10, 0, 0, 0, 1, 2]).unwrap();
        drop(a);
        assert_eq!(read_record(&mut b, 100).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        let (mut a, mut b) = conn_pair();
        a.stream.write_all(&[10, 0]).unwrap();
        drop(a);
        assert_eq!(read_record(&mut b, 100).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }

    const VIEW: usize = 1 << 16;

    /// Rank 0 of a two-rank job whose link to rank 1 is `ours`, with a view of [`VIEW`] bytes
    /// (zero) and the page check `owed`.
    fn rank0(ours: Conn, owed: Option<PageCheck>) -> (TcpTransport, &'static mut [u8]) {
        let mem: &'static mut [u8] = Box::leak(vec![0u8; VIEW].into_boxed_slice());
        let cfg = TcpConfig {
            rank: 0,
            size: 2,
            coordinator: "127.0.0.1:0".into(),
            coordinator_held: false,
            bind: "127.0.0.1".parse().unwrap(),
            token: b"secret".to_vec(),
            view: MemoryView { base: mem.as_mut_ptr(), len: VIEW },
            setup_timeout: Duration::from_secs(5),
            owed,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (TcpTransport::new(&cfg, listener, vec![None, Some(ours)]).unwrap(), mem)
    }

    /// A frame as rank 1 would send it: header, message, page bytes, then the tag `theirs` gives.
    fn frame(theirs: &mut Conn, h: Header, msg: &[u8], page: &[u8]) -> Vec<u8> {
        let head = h.encode();
        let tag = theirs.keys.sealer.seal(&[&head, msg, page]);
        [&head[..], msg, page, &tag].concat()
    }

    /// A delivered message and the page that came with it.
    type Delivered = (Vec<u8>, Option<Span>);

    /// Polls rank 0 until it has delivered something or failed: the messages it delivered.
    fn poll_rank0(t: &TcpTransport) -> Result<Vec<Delivered>, TransportError> {
        let mut got = Vec::new();
        for _ in 0..100 {
            t.poll(Some(Duration::from_millis(20)), &mut |ev| {
                if let Event::Message { bytes, page, .. } = ev {
                    got.push((bytes.to_vec(), page));
                }
            })?;
            if !got.is_empty() {
                break;
            }
        }
        Ok(got)
    }

    fn message(page: u32) -> Header {
        Header { kind: Kind::Message, msg_len: 3, page_len: page, offset: 4096, token: 0 }
    }

    #[test]
    fn authentic_frames_arrive_with_their_pages() {
        let (ours, mut theirs) = conn_pair();
        let (t, view) = rank0(ours, Some(|from, msg, span| from == 1 && msg == b"abc" && span.offset == 4096));
        let bytes =
            [frame(&mut theirs, message(0), b"abc", &[]), frame(&mut theirs, message(4096), b"abc", &[9; 4096])];
        theirs.stream.write_all(&bytes.concat()).unwrap();
        let mut got = poll_rank0(&t).unwrap();
        if got.len() < 2 {
            got.extend(poll_rank0(&t).unwrap());
        }
        assert_eq!(got, vec![(b"abc".to_vec(), None), (b"abc".to_vec(), Some(Span { offset: 4096, len: 4096 }))]);
        assert!(view[4096..8192].iter().all(|b| *b == 9));
    }

    #[test]
    fn a_changed_or_replayed_frame_loses_the_peer() {
        for change in [Some(3), Some(HEADER_LEN + 1), Some(HEADER_LEN + 3 + TAG_LEN - 1), None] {
            let (ours, mut theirs) = conn_pair();
            let (t, _) = rank0(ours, None);
            let good = frame(&mut theirs, message(0), b"abc", &[]);
            let mut bad = good.clone();
            match change {
                Some(i) => bad[i] ^= 0x10,
                // The same frame twice: the second is a replay.
                None => {
                    theirs.stream.write_all(&good).unwrap();
                    assert_eq!(poll_rank0(&t).unwrap().len(), 1, "the first copy is authentic");
                }
            }
            theirs.stream.write_all(&bad).unwrap();
            let e = poll_rank0(&t).unwrap_err().to_string();
            // A change in the header may also make it malformed; one in the tag or body fails it.
            assert!(
                e.contains("rank 1") && (e.contains("authentication") || e.contains("reserved")),
                "{change:?}: {e}"
            );
        }
    }

    #[test]
    fn pages_nobody_asked_for_never_land() {
        let (ours, mut theirs) = conn_pair();
        let (t, view) = rank0(ours, Some(|_, _, _| false));
        let f = frame(&mut theirs, message(4096), b"abc", &[9; 4096]);
        theirs.stream.write_all(&f).unwrap();
        let e = poll_rank0(&t).unwrap_err().to_string();
        assert!(e.contains("did not ask for"), "{e}");
        assert!(view.iter().all(|b| *b == 0), "not a byte landed");
        // The connection stays broken for whoever reads it next.
        assert!(poll_rank0(&t).is_err());

        // A read reply to a read this rank never started.
        let (ours, mut theirs) = conn_pair();
        let (t, view) = rank0(ours, None);
        let reply = Header { kind: Kind::ReadReply, msg_len: 0, page_len: 4096, offset: 8192, token: 5 };
        let f = frame(&mut theirs, reply, &[], &[9; 4096]);
        theirs.stream.write_all(&f).unwrap();
        let e = poll_rank0(&t).unwrap_err().to_string();
        assert!(e.contains("did not ask for"), "{e}");
        assert!(view.iter().all(|b| *b == 0), "not a byte landed");
    }
}
