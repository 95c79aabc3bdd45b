//! TCP transport: a connection per pair of processes that talk, `TCP_NODELAY`, length-prefixed
//! frames.
//!
//! - [`startup`]: joining the job through rank 0, which hands out the roster.
//! - [`links`]: connections between other ranks, made on first use.
//! - this module: frames on those connections.
//!
//! Every record and frame after a connection's handshake carries a tag under that connection's
//! keys ([`crate::seal`]); one that fails it loses the peer. Page contents land in the runtime view
//! only when they are owed: a reply to a read this process started, or what the runtime's
//! [`PageCheck`] accepts; nothing else lands, not even in part. A peer's read of this process's
//! view is answered only when the runtime's [`ReadCheck`] says the protocol owes it.

mod links;
mod startup;

use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::frame::{FrameError, Header, Kind, HEADER_LEN};
use crate::seal::{Opener, Sealer, SessionKeys, Tag, TAG_LEN};
use crate::sys::{self, Backlog, LazyBuf};
use crate::{Accept, Event, LostReason, MemoryView, Span, Transport, TransportError};

use links::{Keeper, Links};
#[doc(hidden)]
pub use startup::fuzzing;
pub use startup::{establish, is_host_port, resolve, route_source};

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
    /// How long a sender waits for a connection made on first use before the peer counts as
    /// lost.
    pub link_timeout: Duration,
    /// Which page contents this process is owed: the page of a message lands in the runtime view
    /// only if this says yes (`None`: every page in the view).
    pub owed: Option<PageCheck>,
    /// Which reads of the view this process answers: a peer's read request is answered only if
    /// this says yes; anything else loses that peer (`None`: any span in the view).
    pub serves: Option<ReadCheck>,
    /// Runs first on every thread the transport starts (its connection keeper, handshake and
    /// dial threads): the runtime marks them as its own, so that their allocations never come
    /// from the shared heap.
    pub thread_start: fn(),
}

/// Whether the page contents (`span`) that come with message `msg` from rank `from` are owed to
/// this process. Called on the thread that reads the connection, which may be a thread waiting in
/// the page-fault handler: it must be async-signal-safe.
pub type PageCheck = fn(from: usize, msg: &[u8], span: Span) -> bool;

/// Whether rank `from` may read `span` of this process's view now: the protocol told it to read
/// those bytes here. Called on the thread that reads the connection, which may be a thread
/// waiting in the page-fault handler: it must be async-signal-safe.
pub type ReadCheck = fn(from: usize, span: Span) -> bool;

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

impl Peer {
    fn new(stream: TcpStream, sealer: Sealer) -> Peer {
        Peer { stream, out: Mutex::new(Outgoing { sealer, page: Vec::new() }), left: AtomicBool::new(false) }
    }
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
    serves: Option<ReadCheck>,
    /// Per peer, [`READS_IN_FLIGHT`] slots of reads we asked it for: `offset + 1` of each, 0 when
    /// free. Only a reply to one of them may land.
    reads: Box<[AtomicU64]>,
    links: Arc<Links>,
    /// Lets peers in and dials on first use (every rank but 0, which links everyone at
    /// start-up and whose listener then refuses latecomers).
    keeper: Option<Keeper>,
    listener: TcpListener,
}

/// The kernel refused a socket option a link needs.
#[derive(Debug, thiserror::Error)]
#[error("setting {name} to {SOCKET_BUFFER} bytes on the link: {source}")]
pub(crate) struct SocketOptionRefused {
    name: &'static str,
    source: std::io::Error,
}

/// The errno behind an error in setting up a link (`EPROTO` when it has none).
pub(crate) fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .or_else(|| {
            e.get_ref().and_then(|i| i.downcast_ref::<SocketOptionRefused>()).and_then(|r| r.source.raw_os_error())
        })
        .unwrap_or(libc::EPROTO)
}

fn set_socket_options(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nonblocking(true)?;
    // Large buffers make a writer wait for room less often. The kernel caps them
    // (`net.core.wmem_max`, `rmem_max`) without failing; nothing depends on their size (a writer
    // that waits for room takes in what its peer sends), but a refusal is an error.
    for (opt, name) in [(libc::SO_SNDBUF, "SO_SNDBUF"), (libc::SO_RCVBUF, "SO_RCVBUF")] {
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
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), SocketOptionRefused { name, source: e }));
        }
    }
    Ok(())
}

impl TcpTransport {
    fn new(
        cfg: &TcpConfig,
        listener: TcpListener,
        links: Arc<Links>,
        keeper: Option<Keeper>,
    ) -> Result<TcpTransport, TransportError> {
        links.epoll.add(links.waker.0, KEY_WAKE).map_err(|e| TransportError::io("epoll_ctl", e))?;
        if keeper.is_none() {
            listener.set_nonblocking(true).map_err(|e| TransportError::io("listener", e))?;
            links.epoll.add(listener.as_raw_fd(), KEY_LISTENER).map_err(|e| TransportError::io("epoll_ctl", e))?;
        }
        Ok(TcpTransport {
            rank: cfg.rank,
            size: cfg.size,
            view: cfg.view,
            owed: cfg.owed,
            serves: cfg.serves,
            reads: (0..cfg.size * READS_IN_FLIGHT).map(|_| AtomicU64::new(0)).collect(),
            links,
            keeper,
            listener,
        })
    }

    /// The link to `rank`, made now if there is none (see [`links`]). Async-signal-safe.
    fn peer(&self, rank: usize) -> Result<&Peer, TransportError> {
        self.links.link(rank)
    }

    /// The link to `rank`, which a frame came on.
    fn linked(&self, rank: usize) -> Result<&Peer, TransportError> {
        self.links.linked(rank).ok_or(TransportError::NoSuchPeer(rank))
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
        self.write_frame_absorbing(rank, header, msg, &mut || match self.links.try_receiver() {
            Some(mut rx) => {
                let n = self.absorb(fd, &mut rx.inboxes[rank]);
                self.links.let_go(rx);
                n
            }
            None => Ok(0),
        })
    }

    /// Writes up to [`crate::SEND_BATCH`] message frames (no pages) to `rank` with one vectored
    /// write, each sealed as [`Self::write_frame`] seals it. Allocation-free.
    fn write_frames(&self, rank: usize, msgs: &[&[u8]]) -> Result<(), TransportError> {
        debug_assert!(msgs.len() <= crate::SEND_BATCH);
        let peer = self.peer(rank)?;
        let fd = peer.stream.as_raw_fd();
        let mut heads = [[0u8; HEADER_LEN]; crate::SEND_BATCH];
        let mut tags = [[0u8; TAG_LEN]; crate::SEND_BATCH];
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        let mut parts = [empty; 3 * crate::SEND_BATCH];
        let mut out = peer.out.lock().unwrap_or_else(|p| p.into_inner());
        for (i, msg) in msgs.iter().enumerate() {
            let h = Header { kind: Kind::Message, msg_len: msg.len() as u32, page_len: 0, offset: 0, token: 0 };
            heads[i] = h.encode();
            tags[i] = out.sealer.seal(&[&heads[i], msg, &[]]);
        }
        for (i, msg) in msgs.iter().enumerate() {
            parts[3 * i] = libc::iovec { iov_base: heads[i].as_ptr() as *mut libc::c_void, iov_len: HEADER_LEN };
            parts[3 * i + 1] = libc::iovec { iov_base: msg.as_ptr() as *mut libc::c_void, iov_len: msg.len() };
            parts[3 * i + 2] = libc::iovec { iov_base: tags[i].as_ptr() as *mut libc::c_void, iov_len: TAG_LEN };
        }
        let written =
            sys::write_all_vectored(fd, &mut parts[..3 * msgs.len()], &mut || match self.links.try_receiver() {
                Some(mut rx) => {
                    let n = self.absorb(fd, &mut rx.inboxes[rank]);
                    self.links.let_go(rx);
                    n
                }
                None => Ok(0),
            });
        drop(out);
        written.map_err(|e| TransportError::PeerLost { rank, reason: LostReason::Io(e) })
    }

    /// Takes in what `fd` has for `inbox` (a writer waiting for room does this).
    fn absorb(&self, fd: RawFd, inbox: &mut Inbox) -> std::io::Result<usize> {
        let n = inbox.backlog.fill_from(fd)?;
        if n > 0 {
            // The service thread reads the backlog (no epoll event will say it is there).
            self.links.waker.signal();
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
        let peer = self.linked(rank)?;
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
        let fd: RawFd = self.linked(rank)?.stream.as_raw_fd();
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
                    Kind::ReadReply => false,
                    Kind::Goodbye => {
                        // Left for the service thread to deliver, but known from now on.
                        self.linked(rank)?.left.store(true, Ordering::Release);
                        false
                    }
                };
                if !taken {
                    inbox.pending = true;
                    self.links.left_for_service.store(true, Ordering::Relaxed);
                    self.links.waker.signal();
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
        self.links.left_for_service.store(true, Ordering::Relaxed);
        // A waiting thread found it: the service thread must hear of it even if nothing more
        // arrives.
        self.links.waker.signal();
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
            let span = Span { offset: h.offset, len: h.page_len };
            if !self.serves.is_none_or(|serves| serves(rank, span)) {
                return Err(self.broken(rank, inbox, FrameError::ReadNotOwed(h.offset, h.page_len)));
            }
            // Answered at once. We hold this connection's reader, so while the answer waits
            // for room we take in what the peer sends ourselves.
            inbox.reset();
            let fd = self.linked(rank)?.stream.as_raw_fd();
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
                self.linked(rank)?.left.store(true, Ordering::Release);
                handler(Event::PeerLeft { rank });
            }
        }
        Ok(1)
    }

    fn closed(&self, rank: usize, inbox: &mut Inbox, why: LostReason) -> Result<(), TransportError> {
        inbox.closed = true;
        let peer = self.linked(rank)?;
        self.links.epoll.del(peer.stream.as_raw_fd());
        if peer.left.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(TransportError::PeerLost { rank, reason: why })
        }
    }

    /// The keys for a transport layered on the connection to `peer` (RDMA): its own sealer and
    /// opener, from this connection's handshake. Given out once.
    pub fn take_layered_keys(&self, peer: usize) -> Option<(Sealer, Opener)> {
        self.links.layered.lock().unwrap_or_else(|p| p.into_inner()).get_mut(peer)?.take()
    }

    /// Blocks until the waker is signalled or `timeout` passes; returns whether it was.
    fn wait_for_waker(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd { fd: self.links.waker.0, events: libc::POLLIN, revents: 0 };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd and a valid timespec.
        unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) > 0 }
    }

    /// [`Transport::wait_for_wake`] that also consumes the wake-up, for a transport layered on
    /// this one (RDMA), whose polls read these connections only now and then.
    pub fn wait_for_wake_consuming(&self, timeout: Duration) {
        if self.wait_for_waker(timeout) {
            self.links.waker.drain();
        }
    }

    /// Makes the connection to `peer` now if there is none, and waits for it (see
    /// [`Transport::send`]). A transport layered on these connections (RDMA) uses this to learn
    /// why a peer cannot be reached. Allocation-free and async-signal-safe.
    pub fn link_to(&self, peer: usize) -> Result<(), TransportError> {
        self.links.link(peer).map(drop)
    }

    /// `peer` said goodbye on its connection (read by any thread, delivered or not).
    /// Async-signal-safe.
    pub fn peer_said_goodbye(&self, peer: usize) -> bool {
        self.links.linked(peer).is_some_and(|p| p.left.load(Ordering::Acquire))
    }

    /// What runs first on every thread the transport starts ([`TcpConfig::thread_start`]): a
    /// transport layered on this one runs it on its own threads too.
    pub fn thread_start(&self) -> fn() {
        self.links.thread_start()
    }

    /// The page check this transport was set up with (a transport layered on it uses it too).
    pub fn owed(&self) -> Option<PageCheck> {
        self.owed
    }

    /// Makes [`Transport::poll`] also return when `fd` becomes readable (it reports no event
    /// for it; the caller drains `fd` itself). Used by the RDMA transport, which keeps these
    /// connections to learn of peers that die and waits on its completion channel here.
    pub fn watch_fd(&self, fd: RawFd) -> Result<(), TransportError> {
        self.links.epoll.add(fd, KEY_EXTERNAL).map_err(|e| TransportError::io("epoll_ctl", e))
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
        let fds = self.links.all_linked().map(|(_, p)| p.stream.as_raw_fd());
        let ours = [self.listener.as_raw_fd(), self.links.epoll.0, self.links.waker.0, self.links.wanted_fd()];
        for fd in fds.chain(ours) {
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

    fn send_batch(&self, peer: usize, msgs: &[&[u8]]) -> Result<(), TransportError> {
        if let Some(m) = msgs.iter().find(|m| m.len() > crate::MAX_MESSAGE) {
            return Err(TransportError::MessageTooLong(m.len()));
        }
        msgs.chunks(crate::SEND_BATCH).try_for_each(|chunk| self.write_frames(peer, chunk))
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
        let n = self.links.epoll.wait(&mut keys, ms).map_err(|e| TransportError::io("epoll_wait", e))?;
        // A waiting thread that reads the connections itself holds the lock only while it drains
        // them; it tells us when it lets go (see `Links::receiver_for_service`).
        let Some(mut rx) = self.links.receiver_for_service() else { return Ok(0) };
        // Everything left for us is handled below, under the lock.
        self.links.left_for_service.store(false, Ordering::Relaxed);
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
                KEY_WAKE => self.links.waker.drain(),
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
        let Ok(n) = self.links.epoll.wait(&mut keys, 0) else { return 0 };
        if !keys[..n].iter().any(|k| (*k as usize) < self.size) {
            return 0;
        }
        let Some(mut rx) = self.links.try_receiver() else { return 0 };
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
        // The service thread may have found the lock taken after our signal (it does not wait
        // for the lock): while something waits for it, it hears again now that the lock is free.
        // (It clears the marks under the lock, so this may only say it once too often.)
        self.links.let_go(rx);
        taken
    }

    fn wait_for_wake(&self, timeout: Duration) {
        // The wake-up stays for the next `poll`, which consumes it under the receiver lock: a
        // wake-up consumed here could be the one that says a waiting thread left a frame for
        // the service thread, whose next `poll` may then find the lock taken by another thread
        // and return; nothing would remind it (see `poll`).
        self.wait_for_waker(timeout);
    }

    fn wake(&self) {
        self.links.waker.signal();
    }

    fn say_goodbye(&self) -> Result<(), TransportError> {
        let bye = Header { kind: Kind::Goodbye, msg_len: 0, page_len: 0, offset: 0, token: 0 };
        // Peers we never talked to expect no goodbye, and none may link to us from now on.
        self.links.leave();
        for (rank, _) in self.links.all_linked() {
            self.write_frame(rank, bye, &[])?;
        }
        Ok(())
    }

    fn linked(&self, peer: usize) -> bool {
        peer != self.rank && self.links.linked(peer).is_some()
    }
}

impl Drop for TcpTransport {
    /// Ends every connection now: the keeper's threads that may still hold the links (a
    /// handshake or a dial under way) must not keep them open.
    fn drop(&mut self) {
        self.keeper.take();
        self.links.leave();
        for (_, p) in self.links.all_linked() {
            let _ = p.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Epoll, EventFd};
    use startup::tests::conn_pair;
    use std::io::Write;

    const VIEW: usize = 1 << 16;

    /// Rank 0 of a two-rank job whose link to rank 1 is `ours`, with a view of [`VIEW`] bytes
    /// (zero) and the page check `owed`.
    fn rank0(ours: Conn, owed: Option<PageCheck>) -> (TcpTransport, &'static mut [u8]) {
        rank0_serving(ours, owed, None)
    }

    /// [`rank0`] that answers the reads `serves` allows.
    fn rank0_serving(
        ours: Conn,
        owed: Option<PageCheck>,
        serves: Option<ReadCheck>,
    ) -> (TcpTransport, &'static mut [u8]) {
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
            link_timeout: Duration::from_secs(5),
            owed,
            serves,
            thread_start: || {},
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let links = Links::new(
            0,
            2,
            &cfg.token,
            cfg.link_timeout,
            cfg.thread_start,
            Epoll::new().unwrap(),
            EventFd::new().unwrap(),
        );
        let links = Arc::new(links.unwrap());
        links.install(1, ours).unwrap();
        (TcpTransport::new(&cfg, listener, links, None).unwrap(), mem)
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

    /// How long `f` takes.
    fn timed(f: impl FnOnce()) -> Duration {
        let start = std::time::Instant::now();
        f();
        start.elapsed()
    }

    #[test]
    fn a_wake_up_that_ends_a_wait_is_left_for_the_next_poll() {
        // A waiting thread may leave a frame for the service thread and signal it; the service
        // thread's wait must not eat that signal, or its next poll (which may find the receiver
        // lock taken and return) sleeps with the frame unread.
        let (ours, _theirs) = conn_pair();
        let (t, _) = rank0(ours, None);
        t.wake();
        assert!(
            timed(|| t.wait_for_wake(Duration::from_secs(5))) < Duration::from_secs(2),
            "the wake-up ends the wait"
        );
        let poll = |timeout| {
            timed(|| {
                t.poll(Some(timeout), &mut |_| {}).unwrap();
            })
        };
        assert!(poll(Duration::from_secs(5)) < Duration::from_secs(2), "the next poll still sees the wake-up");
        assert!(poll(Duration::from_millis(300)) >= Duration::from_millis(250), "that poll consumed it");
    }

    #[test]
    fn the_service_thread_sleeps_while_another_thread_holds_the_receiver_until_it_lets_go() {
        // A waiting thread holds the receiver lock and has signalled the service thread. The
        // service thread's poll cannot take the lock; its next wait must sleep until the holder
        // lets go, not find the same wake-up again and spin (which, on the holder's CPU, kept
        // the holder from running for milliseconds).
        let (ours, _theirs) = conn_pair();
        let (t, _) = rank0(ours, None);
        let t = &t;
        let held = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                let rx = t.links.try_receiver().expect("the receiver is free");
                t.wake();
                held.wait();
                std::thread::sleep(Duration::from_millis(400));
                t.links.let_go(rx);
            });
            held.wait();
            assert_eq!(t.poll(Some(Duration::ZERO), &mut |_| {}).unwrap(), 0, "the lock is taken");
            let waited = timed(|| t.wait_for_wake(Duration::from_secs(10)));
            assert!(waited >= Duration::from_millis(200), "the wait found the consumed wake-up again ({waited:?})");
            assert!(waited < Duration::from_secs(5), "letting go did not wake the service thread ({waited:?})");
        });
        // Now the lock is free: the next poll takes it and consumes the holder's signal.
        t.poll(Some(Duration::ZERO), &mut |_| {}).unwrap();
        let waited = timed(|| t.wait_for_wake(Duration::from_millis(300)));
        assert!(waited >= Duration::from_millis(250), "a wake-up was left over ({waited:?})");
    }

    #[test]
    fn a_consuming_wait_takes_the_wake_up() {
        // What RDMA's `wait_for_wake` uses: its polls read these links only now and then.
        let (ours, _theirs) = conn_pair();
        let (t, _) = rank0(ours, None);
        t.wake();
        assert!(timed(|| t.wait_for_wake_consuming(Duration::from_secs(5))) < Duration::from_secs(2));
        let waited = timed(|| {
            t.poll(Some(Duration::from_millis(300)), &mut |_| {}).unwrap();
        });
        assert!(waited >= Duration::from_millis(250), "the wake-up was consumed, yet poll returned after {waited:?}");
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
    fn a_peer_reads_only_what_the_protocol_owes_it() {
        let (ours, mut theirs) = conn_pair();
        let (t, view) = rank0_serving(ours, None, Some(|from, span| from == 1 && span.offset == 8192));
        view[8192..12288].fill(7);
        let read = |offset| Header { kind: Kind::ReadRequest, msg_len: 0, page_len: 4096, offset, token: 3 };

        // An owed read is answered with the bytes.
        let f = frame(&mut theirs, read(8192), &[], &[]);
        theirs.stream.write_all(&f).unwrap();
        theirs.stream.set_nonblocking(true).unwrap();
        let mut reply = vec![0u8; HEADER_LEN + 4096 + TAG_LEN];
        let mut got = 0;
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while got < reply.len() && std::time::Instant::now() < until {
            t.poll(Some(Duration::from_millis(20)), &mut |_| {}).unwrap();
            match std::io::Read::read(&mut theirs.stream, &mut reply[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the reply: {e}"),
            }
        }
        assert_eq!(got, reply.len(), "the owed read was answered");
        let h = Header::decode(reply[..HEADER_LEN].try_into().unwrap(), VIEW).unwrap();
        assert_eq!((h.kind, h.offset, h.page_len, h.token), (Kind::ReadReply, 8192, 4096, 3));
        assert!(reply[HEADER_LEN..HEADER_LEN + 4096].iter().all(|b| *b == 7), "the reply carries the page");

        // One it is not owed loses the peer, without a byte sent.
        view[4096..8192].fill(5);
        let f = frame(&mut theirs, read(4096), &[], &[]);
        theirs.stream.write_all(&f).unwrap();
        let e = poll_rank0(&t).unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains("does not owe"), "{e}");
        std::thread::sleep(Duration::from_millis(50));
        let mut rest = [0u8; 64];
        assert!(!matches!(std::io::Read::read(&mut theirs.stream, &mut rest), Ok(n) if n > 0), "nothing was sent back");
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
