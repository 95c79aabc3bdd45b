//! Thin wrappers over the Linux calls the TCP transport needs (epoll, eventfd, writev, poll).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An epoll instance.
pub struct Epoll(pub RawFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall with a flag argument.
        check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(Epoll)
    }

    pub fn add(&self, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: key };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        check(unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    pub fn del(&self, fd: RawFd) {
        // SAFETY: removing an fd; a null event pointer is allowed for EPOLL_CTL_DEL.
        unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Waits for readiness; stores the keys of ready fds in `keys` and returns how many.
    pub fn wait(&self, keys: &mut [u64; 32], timeout_ms: i32) -> io::Result<usize> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 32];
        // SAFETY: `evs` is a writable array of the length passed.
        let n = unsafe { libc::epoll_wait(self.0, evs.as_mut_ptr(), evs.len() as i32, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        for (k, e) in keys.iter_mut().zip(&evs[..n as usize]) {
            *k = e.u64;
        }
        Ok(n as usize)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// An eventfd used to wake the poller.
pub struct EventFd(pub RawFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) }).map(EventFd)
    }

    /// Async-signal-safe.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64; nonblocking.
        unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout` (a wake, a change or a signal ends
/// it sooner). Async-signal-safe.
pub fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a live, aligned 32-bit word with a valid relative timeout; the
    // kernel only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes every thread sleeping in [`futex_wait`] on `word`.
pub fn futex_wake_all(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live, aligned 32-bit word.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, i32::MAX) };
}

/// How long a write may wait without making room or taking in what the peer sends: then the
/// peer counts as lost (it neither reads nor lives).
const SEND_STALL_MS: u32 = 30_000;

/// Writes all of `parts` to a non-blocking socket, waiting for room when the socket buffer is
/// full. While it waits and the peer's data arrives on the same socket, it calls `absorb`, which
/// takes that data in (into a backlog the reader consumes first) and returns how many bytes it
/// took: two processes that write more than the socket buffers hold at each other, neither
/// reading, then both go on instead of waiting for each other forever. Allocation-free and
/// async-signal-safe if `absorb` is.
pub fn write_all_vectored(
    fd: RawFd,
    parts: &mut [libc::iovec],
    absorb: &mut dyn FnMut() -> io::Result<usize>,
) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        if parts[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let rest = &parts[first..];
        // SAFETY: every iovec points at memory valid for reading for its length.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = rest.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = rest.len();
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    wait_for_room(fd, absorb)?;
                    continue;
                }
                _ => return Err(e),
            }
        }
        let mut n = n as usize;
        while n > 0 && first < parts.len() {
            let take = n.min(parts[first].iov_len);
            parts[first].iov_base = (parts[first].iov_base as usize + take) as *mut libc::c_void;
            parts[first].iov_len -= take;
            n -= take;
            if parts[first].iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(())
}

/// One `poll` of `fd` for `events`, at most `ms` milliseconds: the events that came.
fn poll_once(fd: RawFd, events: libc::c_short, ms: libc::c_int) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        r if r >= 0 => Ok(p.revents),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            }
        }
    }
}

/// Waits at most `ms` milliseconds (-1: no limit) for input on any of `fds` (a negative entry
/// is skipped). Returns which became readable or hung up; none when a signal interrupted.
pub fn poll_readable<const N: usize>(fds: [RawFd; N], ms: libc::c_int) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    poll_in(&mut p, ms)?;
    Ok(p.map(|p| p.revents != 0))
}

/// Like [`poll_readable`], for a number of descriptors known only at run time (a negative one is
/// ignored). Allocates.
pub fn poll_readable_all(fds: &[RawFd], ms: libc::c_int) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    poll_in(&mut p, ms)?;
    Ok(p.iter().map(|p| p.revents != 0).collect())
}

/// `poll` over `p`; an interrupted call counts as nothing ready.
fn poll_in(p: &mut [libc::pollfd], ms: libc::c_int) -> io::Result<()> {
    // SAFETY: `p.len()` valid pollfds in a live slice.
    if unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        p.iter_mut().for_each(|p| p.revents = 0);
    }
    Ok(())
}

/// Waits until `fd` has room to write, taking in the peer's data meanwhile (see
/// [`write_all_vectored`]). Fails after [`SEND_STALL_MS`] without progress either way.
fn wait_for_room(fd: RawFd, absorb: &mut dyn FnMut() -> io::Result<usize>) -> io::Result<()> {
    let mut stalled_ms = 0;
    while stalled_ms < SEND_STALL_MS {
        let ev = poll_once(fd, libc::POLLOUT | libc::POLLIN, 10)?;
        if ev & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
            return Ok(());
        }
        if ev & libc::POLLIN == 0 {
            stalled_ms += 10;
        } else if absorb()? > 0 {
            stalled_ms = 0;
        } else {
            // Data waits, but another thread is reading this connection (or the backlog is
            // full): wait for room alone for a moment.
            if poll_once(fd, libc::POLLOUT, 1)? != 0 {
                return Ok(());
            }
            stalled_ms += 1;
        }
    }
    // A raw OS error: building it allocates nothing (this runs in signal handlers).
    Err(io::Error::from_raw_os_error(libc::ETIMEDOUT))
}

/// Bytes received but not yet read by the connection's reader, in arrival order: what a writer
/// took in while it waited for room (see [`write_all_vectored`]). A ring on a [`LazyBuf`], so it
/// costs memory only once used; each time it empties it starts over at its first byte and gives
/// back the memory of a burst.
#[derive(Default)]
pub struct Backlog {
    buf: LazyBuf,
    head: usize,
    len: usize,
    high: HighWater,
}

/// What a [`Backlog`] keeps resident when it empties.
const BACKLOG_KEEP: usize = 256 << 10;

impl Backlog {
    /// A backlog of at most `cap` bytes.
    pub fn new(cap: usize) -> io::Result<Backlog> {
        Ok(Backlog { buf: LazyBuf::new(cap)?, head: 0, len: 0, high: HighWater::new(BACKLOG_KEEP) })
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Receives what `fd` has into the free space (one contiguous part of it): the bytes taken.
    /// 0 when full, or at the end of the stream (the reader finds that on the socket itself).
    pub fn fill_from(&mut self, fd: RawFd) -> io::Result<usize> {
        let cap = self.buf.len();
        if self.len == cap {
            return Ok(0);
        }
        let tail = (self.head + self.len) % cap;
        let room = if tail >= self.head { cap - tail } else { self.head - tail };
        // SAFETY: `tail..tail + room` lies inside the buffer and holds no unread bytes.
        match unsafe { read_into(fd, self.buf.as_mut_ptr().add(tail), room) } {
            Ok(n) => {
                self.len += n;
                self.high.wrote(tail + n);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Moves up to `want` of the oldest bytes to `dst`: how many.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `want` bytes and not overlap the backlog.
    pub unsafe fn take(&mut self, dst: *mut u8, want: usize) -> usize {
        let cap = self.buf.len();
        let n = want.min(self.len).min(cap - self.head);
        // SAFETY: `head..head + n` holds unread bytes; the caller vouches for `dst`.
        unsafe { std::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.head), dst, n) };
        self.head = (self.head + n) % cap.max(1);
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
            self.high.drained(&mut self.buf);
        }
        n
    }
}

/// Non-blocking read into raw memory. Ok(0) means end of stream.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
pub unsafe fn read_into(fd: RawFd, dst: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees `dst..dst+len` is writable.
        let n = unsafe { libc::recv(fd, dst.cast(), len, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A buffer the kernel backs only where it is touched (an anonymous private mapping): a
/// connection's receive stage costs memory only once that connection carries data.
pub struct LazyBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &self/&mut self.
unsafe impl Send for LazyBuf {}
// SAFETY: as above.
unsafe impl Sync for LazyBuf {}

impl LazyBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> io::Result<LazyBuf> {
        // Read the page size now, so that `release`, which may run in a signal handler, finds it.
        page_size();
        // SAFETY: a fresh anonymous mapping; no address hint, no file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // No transparent huge pages: where they are always on, the first byte written would make
        // 2 MiB resident, and a release would keep what shares a huge page with the bytes kept.
        // Advice only: a kernel without them refuses it (EINVAL), which changes nothing.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Ok(LazyBuf { ptr: p.cast(), len })
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The buffer as bytes.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping is `len` readable bytes owned by this value, alive while it is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer as mutable bytes.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Gives the memory of the pages from the first that starts at or after byte `from` to the
    /// one that holds byte `to - 1` back to the kernel (so a page partly before `from` is kept,
    /// one partly after `to` is not); they read as zero afterwards, and cost memory again only
    /// once written. A raw system call: safe in a signal handler.
    pub fn release(&mut self, from: usize, to: usize) {
        let page = page_size();
        let start = from.next_multiple_of(page);
        let end = to.next_multiple_of(page).min(self.len);
        if end > start {
            // SAFETY: `start..end` lies inside this value's private anonymous mapping, whose
            // contents nobody else refers to (`&mut self`).
            unsafe { libc::madvise(self.ptr.add(start).cast(), end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// The system's page size (the runtime's page), read once; [`LazyBuf::new`] reads it first, before
/// any signal handler needs it.
pub fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    match PAGE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf has no preconditions.
            let p = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096);
            PAGE.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// A ring that drains now and then: the bytes it wrote beyond the first `keep` since it last
/// gave memory back (`high`, the highest offset written), given back once it is empty, so that a
/// burst costs memory only while it lasts.
#[derive(Default)]
pub struct HighWater {
    keep: usize,
    high: usize,
}

impl HighWater {
    /// Keeps the first `keep` bytes resident.
    pub fn new(keep: usize) -> HighWater {
        HighWater { keep, high: 0 }
    }

    /// Bytes up to `end` were written.
    pub fn wrote(&mut self, end: usize) {
        self.high = self.high.max(end);
    }

    /// The ring `buf` is empty: give back what lies beyond `keep`.
    pub fn drained(&mut self, buf: &mut LazyBuf) {
        if self.high > self.keep {
            buf.release(self.keep, self.high);
            self.high = self.keep;
        }
    }
}

impl Default for LazyBuf {
    /// An empty buffer (no mapping).
    fn default() -> LazyBuf {
        LazyBuf { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0 }
    }
}

impl Drop for LazyBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping the mapping this value made, once.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// How many pages of `buf` are resident (mincore), for tests.
#[cfg(test)]
pub fn resident_pages(buf: &LazyBuf) -> usize {
    let pages = buf.len().div_ceil(page_size());
    let mut v = vec![0u8; pages];
    // SAFETY: the range is this buffer's own mapping; `v` has a byte per page.
    let r = unsafe { libc::mincore(buf.as_ptr() as *mut libc::c_void, buf.len(), v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
    v.iter().filter(|b| *b & 1 == 1).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_readable_reports_which_descriptor_has_input_and_skips_negative_ones() {
        let (quiet, ready) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        assert_eq!(poll_readable([quiet.0, ready.0], 0).unwrap(), [false, false]);
        ready.signal();
        assert_eq!(poll_readable([quiet.0, ready.0, -1], 0).unwrap(), [false, true, false]);
        assert_eq!(poll_readable([quiet.0, -1], 20).unwrap(), [false, false], "times out");
    }

    /// A backlog that took in a burst gives the memory back once it is read empty, all but its
    /// first [`BACKLOG_KEEP`] bytes, and starts over at its first byte (a ring that went round
    /// would make the whole of its 32 MiB resident in time).
    #[test]
    fn a_drained_backlog_gives_its_burst_back() {
        let page = page_size();
        let mut b = Backlog::new(8 << 20).unwrap();
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
        let made =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(made, 0, "socketpair: {}", io::Error::last_os_error());
        let chunk = vec![0xa5u8; 64 << 10];
        let mut sent = 0;
        while sent < (2 << 20) {
            // SAFETY: writing from a live buffer to our own socket.
            let n = unsafe { libc::write(fds[1], chunk.as_ptr().cast(), chunk.len()) };
            assert!(n > 0);
            sent += n as usize;
            while b.fill_from(fds[0]).unwrap() > 0 {}
        }
        assert_eq!(b.len, sent);
        let touched = resident_pages(&b.buf);
        assert!(touched * page >= sent, "the burst is resident: {touched} pages for {sent} bytes");
        let mut out = vec![0u8; sent];
        let mut got = 0;
        while got < sent {
            // SAFETY: `out[got..]` is writable and not part of the backlog.
            got += unsafe { b.take(out.as_mut_ptr().add(got), sent - got) };
        }
        assert!(out.iter().all(|x| *x == 0xa5), "the bytes come out as they went in");
        assert_eq!((b.head, b.len), (0, 0), "an empty backlog starts over at its first byte");
        let left = resident_pages(&b.buf);
        assert!(
            left * page <= BACKLOG_KEEP,
            "{left} pages still resident after draining, more than {BACKLOG_KEEP} bytes"
        );
        for fd in fds {
            // SAFETY: closing the pair made above, once.
            unsafe { libc::close(fd) };
        }
    }
}
