//! Small, allocation-free socket helpers shared by the floor client, the floor server and the
//! SIGSEGV handler of the combined floor measurement.
//!
//! Everything here only calls async-signal-safe functions (`send`, `recv`, `poll`,
//! `clock_gettime`) and never allocates, so it may run inside a signal handler.

use std::os::fd::RawFd;

/// Default of `GALLOCY_SPIN_US` when the variable is unset: the runtime's own default, so the
/// floor and the runtime always spin for the same time.
pub const DEFAULT_SPIN_US: u64 = gallocy::DEFAULT_SPIN_US;

/// Error of the helpers below: an errno value, or [`EOF`] when the peer closed the connection.
pub type Errno = i32;
/// Pseudo-errno for an orderly shutdown by the peer.
pub const EOF: Errno = -1;

/// `GALLOCY_SPIN_US` read the way the runtime reads it (unset means [`DEFAULT_SPIN_US`]; the
/// runtime rejects an unparsable value, we fall back to the default).
pub fn spin_us_from_env() -> u64 {
    std::env::var("GALLOCY_SPIN_US").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_SPIN_US)
}

/// Monotonic clock in nanoseconds (`CLOCK_MONOTONIC`, served by the vDSO).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[inline]
fn errno() -> Errno {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// Send all of `buf` on the blocking-mode socket `fd` (MSG_NOSIGNAL: a dead peer is an error,
/// not a SIGPIPE).
pub fn send_all(fd: RawFd, buf: &[u8]) -> Result<(), Errno> {
    let mut sent = 0;
    while sent < buf.len() {
        // SAFETY: the pointer/length pair describes the live tail of `buf`.
        let r = unsafe { libc::send(fd, buf[sent..].as_ptr().cast(), buf.len() - sent, libc::MSG_NOSIGNAL) };
        if r > 0 {
            sent += r as usize;
        } else if r < 0 && errno() == libc::EINTR {
            continue;
        } else if r < 0 && errno() == libc::EAGAIN {
            wait_fd(fd, libc::POLLOUT)?;
        } else {
            return Err(if r == 0 { EOF } else { errno() });
        }
    }
    Ok(())
}

/// Block in `poll()` until `fd` reports `events` (or an error/hang-up, which the next
/// send/recv will surface).
fn wait_fd(fd: RawFd, events: libc::c_short) -> Result<(), Errno> {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    loop {
        // SAFETY: one valid pollfd, infinite timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r >= 0 {
            return Ok(());
        }
        if errno() != libc::EINTR {
            return Err(errno());
        }
    }
}

/// Fill `buf` from `fd`: poll with non-blocking `recv(MSG_DONTWAIT)` for up to `spin_ns`
/// nanoseconds, then block in `poll()`; repeat until `buf` is full. The spin budget restarts
/// after every chunk that arrives (the rest of a message usually follows at once).
pub fn recv_exact_spin(fd: RawFd, buf: &mut [u8], spin_ns: u64) -> Result<(), Errno> {
    let mut got = 0;
    let mut deadline = now_ns() + spin_ns;
    while got < buf.len() {
        // SAFETY: the pointer/length pair describes the unfilled, writable tail of `buf`.
        let r = unsafe { libc::recv(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got, libc::MSG_DONTWAIT) };
        if r > 0 {
            got += r as usize;
            deadline = now_ns() + spin_ns;
            continue;
        }
        if r == 0 {
            return Err(EOF);
        }
        match errno() {
            libc::EINTR => continue,
            e if e == libc::EAGAIN || e == libc::EWOULDBLOCK => {
                if now_ns() < deadline {
                    std::hint::spin_loop();
                } else {
                    wait_fd(fd, libc::POLLIN)?;
                }
            }
            e => return Err(e),
        }
    }
    Ok(())
}

/// Human text of an [`Errno`].
pub fn describe(e: Errno) -> String {
    if e == EOF {
        "connection closed by peer".to_string()
    } else {
        std::io::Error::from_raw_os_error(e).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn spin_recv_gets_split_message_and_eof() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&[1, 2, 3]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            s.write_all(&[4, 5]).unwrap();
        });
        let (s, _) = l.accept().unwrap();
        let mut buf = [0u8; 5];
        recv_exact_spin(s.as_raw_fd(), &mut buf, 1_000).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 5]);
        t.join().unwrap();
        let mut one = [0u8; 1];
        assert_eq!(recv_exact_spin(s.as_raw_fd(), &mut one, 0), Err(EOF));
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
