//! The floor: what a remote page fault cannot beat on this machine with these socket settings.
//!
//! * `floor.tcp_rtt`: loopback TCP round trip, 8-byte request, 4096-byte reply, TCP_NODELAY,
//!   both sides waiting with "spin on non-blocking recv for GALLOCY_SPIN_US, then poll()".
//! * `floor.segv_mprotect`: touch a PROT_NONE page of a private anonymous mapping; our SIGSEGV
//!   handler mprotects it READ|WRITE and returns; the access is retried and completes.
//! * `floor` (combined): touch a PROT_NONE page; the handler sends the 8-byte request, receives
//!   the 4096-byte reply into a scratch buffer, mprotects the page READ|WRITE, copies the reply
//!   into it and returns. This is the minimum a DSM read fault over TCP has to do.
//!
//! The server ([`serve`]) runs in one process, the client ([`run_client`]) in another; neither
//! calls `gallocy::init()`. The SIGSEGV handler is installed only for the two fault
//! measurements and the previous action is restored afterwards ([`SegvGuard`]).

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{compiler_fence, AtomicI32, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::net::{self, now_ns};
use crate::report::{new_histogram, Summary};

/// Request and reply sizes of the floor protocol.
pub const REQ_LEN: usize = 8;
pub const REPLY_LEN: usize = 4096;

/// Serve one client on `listener`: for every 8-byte request, send 4096 bytes whose first 8 bytes
/// echo the request. Returns when the client closes the connection.
pub fn serve(listener: TcpListener, spin_ns: u64) -> Result<()> {
    let (stream, _) = listener.accept().context("floor server: accept")?;
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    let mut req = [0u8; REQ_LEN];
    let mut reply = vec![0u8; REPLY_LEN];
    for (i, b) in reply.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    loop {
        match net::recv_exact_spin(fd, &mut req, spin_ns) {
            Ok(()) => {}
            Err(net::EOF) => return Ok(()),
            Err(e) => bail!("floor server: recv: {}", net::describe(e)),
        }
        reply[..REQ_LEN].copy_from_slice(&req);
        net::send_all(fd, &reply).map_err(|e| anyhow::anyhow!("floor server: send: {}", net::describe(e)))?;
    }
}

/// Bind `addr` and [`serve`] one client.
pub fn serve_addr(addr: SocketAddr, spin_ns: u64) -> Result<()> {
    let listener = gallocy_transport::coordinator::listen(addr, true)
        .with_context(|| format!("floor server: bind {addr} (held by the bench)"))?;
    serve(listener, spin_ns)
}

/// Connect to the floor server, retrying while it starts (up to 10 s).
fn connect_retry(addr: SocketAddr) -> Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).with_context(|| format!("floor client: connect {addr}")),
        }
    }
}

/// Run the three floor measurements against the server at `addr`; `warmup` extra iterations
/// of each are run first and discarded.
pub fn run_client(addr: SocketAddr, iters: usize, warmup: usize, spin_ns: u64) -> Result<Vec<Summary>> {
    let stream = connect_retry(addr)?;
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    let tcp = measure_tcp(fd, iters, warmup, spin_ns)?;
    let segv = measure_fault(None, iters, warmup, spin_ns)?;
    let combined = measure_fault(Some(fd), iters, warmup, spin_ns)?;
    drop(stream);
    Ok(vec![combined, tcp, segv])
}

fn measure_tcp(fd: RawFd, iters: usize, warmup: usize, spin_ns: u64) -> Result<Summary> {
    let mut h = new_histogram();
    let mut reply = vec![0u8; REPLY_LEN];
    for i in 0..(warmup + iters) as u64 {
        let req = i.to_le_bytes();
        let t0 = now_ns();
        net::send_all(fd, &req)
            .and_then(|()| net::recv_exact_spin(fd, &mut reply, spin_ns))
            .map_err(|e| anyhow::anyhow!("floor tcp round trip: {}", net::describe(e)))?;
        let t1 = now_ns();
        if reply[..REQ_LEN] != req {
            bail!("floor tcp round trip: reply {i} does not echo its request");
        }
        if i as usize >= warmup {
            h.saturating_record((t1 - t0).max(1));
        }
    }
    Ok(Summary::from_histogram("floor.tcp_rtt", &h, "8 B req / 4 KiB reply, TCP_NODELAY"))
}

// ---------------------------------------------------------------------------------------------
// SIGSEGV measurement

const MODE_MPROTECT: u8 = 0;
const MODE_FETCH: u8 = 1;

/// Faulting region the handler is responsible for (any other address goes to the old action).
static REGION_START: AtomicUsize = AtomicUsize::new(0);
static REGION_LEN: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static MODE: AtomicU8 = AtomicU8::new(MODE_MPROTECT);
static FETCH_FD: AtomicI32 = AtomicI32::new(-1);
static SPIN_NS: AtomicU64 = AtomicU64::new(0);
static SCRATCH: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// First error seen inside the handler (errno, or net::EOF); 0 = none.
static HANDLER_ERR: AtomicI32 = AtomicI32::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// The action that was installed before ours; written before our handler is installed, read by
/// the handler only for faults outside our region.
struct OldAction(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: written only by `SegvGuard::install` before the sigaction() call that makes our handler
// visible, and restored by `Drop` after ours is removed; the handler only reads it in between.
unsafe impl Sync for OldAction {}
static OLD_ACTION: OldAction = OldAction(UnsafeCell::new(MaybeUninit::uninit()));

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; si_addr is the
    // faulting address for SIGSEGV.
    let addr = unsafe { (*info).si_addr() } as usize;
    let start = REGION_START.load(Relaxed);
    let len = REGION_LEN.load(Relaxed);
    if addr < start || addr >= start + len {
        // Not ours: put the previous action back and return; the access faults again and the
        // previous handler (or the default action) deals with it.
        // SAFETY: OLD_ACTION was filled by install() before this handler could run.
        unsafe { libc::sigaction(libc::SIGSEGV, (*OLD_ACTION.0.get()).as_ptr(), std::ptr::null_mut()) };
        return;
    }
    let page_size = PAGE.load(Relaxed);
    let page = addr & !(page_size - 1);
    HANDLED.fetch_add(1, Relaxed);
    if MODE.load(Relaxed) == MODE_FETCH {
        let fd = FETCH_FD.load(Relaxed);
        let scratch = SCRATCH.load(Relaxed);
        let req = (((page - start) / page_size) as u64).to_le_bytes();
        // SAFETY: SCRATCH points to a live REPLY_LEN-byte buffer for as long as MODE_FETCH is
        // set (see measure_fault), and nothing else touches it while the handler runs.
        let buf = unsafe { std::slice::from_raw_parts_mut(scratch, REPLY_LEN) };
        let r = net::send_all(fd, &req).and_then(|()| net::recv_exact_spin(fd, buf, SPIN_NS.load(Relaxed)));
        // SAFETY: `page` is a page of our own mapping (checked against the region above).
        let rc = unsafe { libc::mprotect(page as *mut libc::c_void, page_size, libc::PROT_READ | libc::PROT_WRITE) };
        match r {
            // SAFETY: the page was just made writable, is REPLY_LEN (= page size) bytes long and
            // does not overlap the scratch buffer.
            Ok(()) if rc == 0 => unsafe { std::ptr::copy_nonoverlapping(scratch, page as *mut u8, REPLY_LEN) },
            Ok(()) => {
                // SAFETY: reading this thread's errno.
                let _ = HANDLER_ERR.compare_exchange(0, unsafe { *libc::__errno_location() }, Relaxed, Relaxed);
            }
            Err(e) => {
                let _ = HANDLER_ERR.compare_exchange(0, e, Relaxed, Relaxed);
            }
        }
        if rc != 0 {
            // Cannot make progress on this page: restore the old action so the retry dies
            // loudly instead of looping forever.
            // SAFETY: as above.
            unsafe { libc::sigaction(libc::SIGSEGV, (*OLD_ACTION.0.get()).as_ptr(), std::ptr::null_mut()) };
        }
    } else {
        // SAFETY: `page` is a page of our own mapping.
        let rc = unsafe { libc::mprotect(page as *mut libc::c_void, page_size, libc::PROT_READ | libc::PROT_WRITE) };
        if rc != 0 {
            // SAFETY: as above.
            unsafe { libc::sigaction(libc::SIGSEGV, (*OLD_ACTION.0.get()).as_ptr(), std::ptr::null_mut()) };
        }
    }
}

/// Our SIGSEGV handler, installed for the lifetime of the guard; the previous action (which
/// may be the gallocy runtime's, or Rust's stack-overflow handler) is restored on drop.
struct SegvGuard;

impl SegvGuard {
    fn install() -> Result<Self> {
        // SAFETY: zeroed sigaction is a valid "no flags, empty mask" value; we fill the fields
        // we need. OLD_ACTION is not yet visible to any handler (ours is not installed).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_segv as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            let old = (*OLD_ACTION.0.get()).as_mut_ptr();
            if libc::sigaction(libc::SIGSEGV, &sa, old) != 0 {
                bail!("sigaction(SIGSEGV): {}", std::io::Error::last_os_error());
            }
        }
        Ok(SegvGuard)
    }
}

impl Drop for SegvGuard {
    fn drop(&mut self) {
        // SAFETY: OLD_ACTION was filled by install().
        unsafe { libc::sigaction(libc::SIGSEGV, (*OLD_ACTION.0.get()).as_ptr(), std::ptr::null_mut()) };
        REGION_LEN.store(0, SeqCst);
    }
}

/// Private anonymous mapping of `pages` pages, each pre-faulted with its index at offset 0,
/// then made PROT_NONE: the measured fault is a pure protection fault (no page allocation).
struct Region {
    base: *mut u8,
    len: usize,
}

impl Region {
    fn new(pages: usize, page_size: usize) -> Result<Self> {
        let len = pages * page_size;
        // SAFETY: fresh anonymous mapping, no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap {len} bytes: {}", std::io::Error::last_os_error());
        }
        let base = p as *mut u8;
        for i in 0..pages {
            // SAFETY: inside the fresh RW mapping, 8-byte aligned (page start).
            unsafe { (base.add(i * page_size) as *mut u64).write(i as u64) };
        }
        // SAFETY: exactly the mapping created above.
        if unsafe { libc::mprotect(p, len, libc::PROT_NONE) } != 0 {
            bail!("mprotect PROT_NONE: {}", std::io::Error::last_os_error());
        }
        Ok(Region { base, len })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly our own mapping; no references into it survive.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Touch one fresh PROT_NONE page per iteration and time the access. `fetch_fd = None`
/// measures SIGSEGV + mprotect; `Some(fd)` the combined fetch over TCP.
fn measure_fault(fetch_fd: Option<RawFd>, iters: usize, warmup: usize, spin_ns: u64) -> Result<Summary> {
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    assert!(page_size >= REPLY_LEN, "floor assumes 4 KiB replies fit in one page");
    let n = warmup + iters;
    let region = Region::new(n, page_size)?;
    let mut scratch = vec![0u8; REPLY_LEN];

    PAGE.store(page_size, Relaxed);
    SPIN_NS.store(spin_ns, Relaxed);
    SCRATCH.store(scratch.as_mut_ptr(), Relaxed);
    FETCH_FD.store(fetch_fd.unwrap_or(-1), Relaxed);
    MODE.store(if fetch_fd.is_some() { MODE_FETCH } else { MODE_MPROTECT }, Relaxed);
    HANDLER_ERR.store(0, Relaxed);
    HANDLED.store(0, Relaxed);
    REGION_START.store(region.base as usize, Relaxed);
    REGION_LEN.store(region.len, SeqCst);

    let guard = SegvGuard::install()?;
    let mut h = new_histogram();
    let mut bad = None;
    for i in 0..n {
        // SAFETY: inside our mapping; the access faults into on_segv, which makes the page
        // accessible (and, in fetch mode, fills it) before the access is retried.
        let p = unsafe { region.base.add(i * page_size) } as *const u64;
        compiler_fence(SeqCst);
        let t0 = now_ns();
        compiler_fence(SeqCst);
        // SAFETY: see above; volatile so the access is neither elided nor moved.
        let v = unsafe { std::ptr::read_volatile(p) };
        compiler_fence(SeqCst);
        let t1 = now_ns();
        compiler_fence(SeqCst);
        let err = HANDLER_ERR.load(Relaxed);
        if err != 0 {
            drop(guard);
            bail!("floor fault handler: {}", net::describe(err));
        }
        // Fetch mode: the server echoes the request (= page index) in the first 8 bytes.
        // mprotect mode: the pre-faulted content (= page index) is still there.
        if v != i as u64 && bad.is_none() {
            bad = Some((i, v));
        }
        if i >= warmup {
            h.saturating_record((t1 - t0).max(1));
        }
    }
    drop(guard);
    MODE.store(MODE_MPROTECT, Relaxed);
    SCRATCH.store(std::ptr::null_mut(), Relaxed);
    drop(scratch);
    let handled = HANDLED.load(Relaxed);
    if handled != n as u64 {
        bail!("floor: expected {n} faults, handler saw {handled}");
    }
    if let Some((i, v)) = bad {
        bail!("floor: page {i} holds {v:#x} after the fault");
    }
    Ok(match fetch_fd {
        None => Summary::from_histogram("floor.segv_mprotect", &h, "SIGSEGV -> mprotect(RW) -> resume"),
        Some(_) => {
            Summary::from_histogram("floor", &h, "SIGSEGV -> 8 B/4 KiB TCP round trip -> mprotect -> copy -> resume")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All three measurements against an in-process server thread (the handler runs on the
    /// test thread only; faults elsewhere would go to the previous action).
    #[test]
    fn floor_measures_all_three() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(listener, 20_000));
        let rows = run_client(addr, 300, 20, 20_000).unwrap();
        server.join().unwrap().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["floor", "floor.tcp_rtt", "floor.segv_mprotect"]);
        for r in &rows {
            assert_eq!(r.count, 300, "{r:?}");
            assert!(r.p50_ns > 0 && r.p50_ns <= r.p99_ns && r.p99_ns <= r.max_ns, "{r:?}");
        }
    }
}
