//! System calls on shared-heap buffers.
//!
//! The kernel's own accesses to user memory do not fault into gallocy: a `read` into a heap
//! page this process holds read-only, or a `write` from one it does not hold, would fail with
//! EFAULT. These wrappers make the pages of every buffer present with the access the call
//! needs (`write` access for the bytes the kernel stores, `read` for those it loads, including
//! `iovec` arrays and `msghdr`s that live in the heap), exactly as a user-space access would,
//! then call glibc's function. Another rank may take a page away between the two; the call
//! then fails with EFAULT before it moved a byte (pipes, sockets and files copy nothing on a
//! fault), and is simply made again. Outside the heap, and in a process that has not joined
//! its job, each wrapper costs a few loads and a compare.
//!
//! The real functions are looked up with `dlsym(RTLD_NEXT)` in the library's constructor;
//! a call made before that uses the raw system call.

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

use gallocy_rt as g;
use libc::{c_int, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};

/// How often a call that failed with EFAULT on a heap buffer is made again.
const RETRIES: u32 = 1000;

/// Whether `[addr, addr + len)` needs preparing before the kernel touches it.
#[inline]
fn in_heap(addr: *const c_void, len: usize) -> bool {
    g::preload::shared_range(addr as usize, len)
}

/// Makes the pages of `[addr, addr + len)` present with the access the kernel needs.
#[inline]
fn prepare(addr: *const c_void, len: usize, kernel_writes: bool) {
    g::preload::before_kernel_access(addr as usize, len, kernel_writes);
}

/// Prepares the buffers of an `iovec` array (and the array itself).
///
/// # Safety
/// `iov` points at `n` valid iovecs.
unsafe fn prepare_iov(iov: *const iovec, n: c_int, kernel_writes: bool) {
    if iov.is_null() || n <= 0 {
        return;
    }
    prepare(iov.cast(), n as usize * std::mem::size_of::<iovec>(), false);
    for i in 0..n as usize {
        // SAFETY: caller contract: `n` valid iovecs.
        let v = unsafe { &*iov.add(i) };
        prepare(v.iov_base, v.iov_len, kernel_writes);
    }
}

/// Whether any buffer of an `iovec` array (or the array) lies in the heap.
///
/// # Safety
/// `iov` points at `n` valid iovecs (the kernel would read them anyway).
unsafe fn iov_in_heap(iov: *const iovec, n: c_int) -> bool {
    if iov.is_null() || n <= 0 {
        return false;
    }
    if in_heap(iov.cast(), n as usize * std::mem::size_of::<iovec>()) {
        return true;
    }
    // SAFETY: caller contract.
    (0..n as usize).any(|i| unsafe { in_heap((*iov.add(i)).iov_base, (*iov.add(i)).iov_len) })
}

/// Prepares what the kernel reads or writes of a `msghdr`.
///
/// # Safety
/// `msg` points at a valid `msghdr` (the kernel would read it anyway).
unsafe fn prepare_msg(msg: *const msghdr, kernel_writes: bool) {
    if msg.is_null() {
        return;
    }
    // recvmsg writes back msg_namelen, msg_controllen and msg_flags.
    prepare(msg.cast(), std::mem::size_of::<msghdr>(), kernel_writes);
    // SAFETY: caller contract.
    let m = unsafe { &*msg };
    prepare(m.msg_name, m.msg_namelen as usize, kernel_writes);
    prepare(m.msg_control, m.msg_controllen, kernel_writes);
    // SAFETY: the kernel reads the same iovecs.
    unsafe { prepare_iov(m.msg_iov, m.msg_iovlen as c_int, kernel_writes) };
}

/// # Safety
/// `msg` points at a valid `msghdr`.
unsafe fn msg_in_heap(msg: *const msghdr) -> bool {
    if msg.is_null() {
        return false;
    }
    // SAFETY: caller contract.
    let m = unsafe { &*msg };
    in_heap(msg.cast(), std::mem::size_of::<msghdr>())
        || in_heap(m.msg_name, m.msg_namelen as usize)
        || in_heap(m.msg_control, m.msg_controllen)
        // SAFETY: the kernel reads the same iovecs.
        || unsafe { iov_in_heap(m.msg_iov, m.msg_iovlen as c_int) }
}

fn errno() -> c_int {
    // SAFETY: errno is thread-local and always readable.
    unsafe { *libc::__errno_location() }
}

/// Runs `call` after `prep`; when the buffers lie in the heap and the call fails with EFAULT
/// (a page was taken away in between), prepares and calls again.
#[inline]
fn with_heap(touches_heap: bool, prep: impl Fn(), call: impl Fn() -> ssize_t) -> ssize_t {
    if !touches_heap {
        return call();
    }
    for _ in 0..RETRIES {
        prep();
        let r = call();
        if r >= 0 || errno() != libc::EFAULT {
            return r;
        }
    }
    call()
}

/// Declares the real functions: a pointer resolved by [`resolve`], and a raw system call to
/// use before that.
macro_rules! real {
    ($( $name:ident : fn($($arg:ident : $ty:ty),*) -> $ret:ty = $sym:literal, $fallback:expr; )*) => {
        mod slot {
            use super::*;
            $( pub static $name: AtomicUsize = AtomicUsize::new(0); )*
        }

        /// Resolves the real functions (the library's constructor calls this).
        pub fn resolve() {
            $(
                // SAFETY: looking up the next definition of a libc symbol; the name is a valid
                // C string.
                let f = unsafe { libc::dlsym(libc::RTLD_NEXT, $sym.as_ptr()) };
                slot::$name.store(f as usize, Ordering::Release);
            )*
        }

        mod call {
            use super::*;
            $(
                #[allow(non_snake_case, clippy::too_many_arguments)]
                #[inline]
                pub unsafe fn $name($($arg: $ty),*) -> $ret {
                    let f = slot::$name.load(Ordering::Acquire);
                    if f == 0 {
                        // SAFETY: the raw system call with the caller's arguments.
                        return unsafe { $fallback };
                    }
                    // SAFETY: `f` is libc's function of exactly this signature.
                    unsafe {
                        let f: unsafe extern "C" fn($($ty),*) -> $ret = std::mem::transmute(f);
                        f($($arg),*)
                    }
                }
            )*
        }
    };
}

fn chk_fail() -> ! {
    // SAFETY: glibc's fortify failure: prints "buffer overflow detected" and aborts.
    unsafe {
        extern "C" {
            fn __chk_fail() -> !;
        }
        __chk_fail()
    }
}

real! {
    READ: fn(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t = c"read",
        libc::syscall(libc::SYS_read, fd, buf, n) as ssize_t;
    READV: fn(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t = c"readv",
        libc::syscall(libc::SYS_readv, fd, iov, n) as ssize_t;
    PREAD: fn(fd: c_int, buf: *mut c_void, n: size_t, off: libc::off_t) -> ssize_t = c"pread64",
        libc::syscall(libc::SYS_pread64, fd, buf, n, off) as ssize_t;
    RECV: fn(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t = c"recv",
        libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, 0usize, 0usize) as ssize_t;
    RECVFROM: fn(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t = c"recvfrom",
        libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, addr, len) as ssize_t;
    RECVMSG: fn(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t = c"recvmsg",
        libc::syscall(libc::SYS_recvmsg, fd, msg, flags) as ssize_t;
    WRITE: fn(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t = c"write",
        libc::syscall(libc::SYS_write, fd, buf, n) as ssize_t;
    WRITEV: fn(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t = c"writev",
        libc::syscall(libc::SYS_writev, fd, iov, n) as ssize_t;
    PWRITE: fn(fd: c_int, buf: *const c_void, n: size_t, off: libc::off_t) -> ssize_t = c"pwrite64",
        libc::syscall(libc::SYS_pwrite64, fd, buf, n, off) as ssize_t;
    SEND: fn(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t = c"send",
        libc::syscall(libc::SYS_sendto, fd, buf, n, flags, 0usize, 0usize) as ssize_t;
    SENDTO: fn(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t = c"sendto",
        libc::syscall(libc::SYS_sendto, fd, buf, n, flags, addr, len) as ssize_t;
    SENDMSG: fn(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t = c"sendmsg",
        libc::syscall(libc::SYS_sendmsg, fd, msg, flags) as ssize_t;
}

// ----- into the buffer -----

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY (each call below): the caller's arguments, passed on unchanged.
    with_heap(in_heap(buf, n), || prepare(buf, n, true), || unsafe { call::READ(fd, buf, n) })
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as read.
    unsafe { read(fd, buf, n) }
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: the caller passes `n` valid iovecs.
    let heap = unsafe { iov_in_heap(iov, n) };
    // SAFETY: as above; the caller's arguments, passed on unchanged.
    with_heap(heap, || unsafe { prepare_iov(iov, n, true) }, || unsafe { call::READV(fd, iov, n) })
}

#[no_mangle]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(in_heap(buf, n), || prepare(buf, n, true), || unsafe { call::PREAD(fd, buf, n, off) })
}

#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: same contract (on 64-bit Linux pread is pread64).
    unsafe { pread64(fd, buf, n, off) }
}

#[no_mangle]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: libc::off_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as pread64.
    unsafe { pread64(fd, buf, n, off) }
}

#[no_mangle]
pub unsafe extern "C" fn __pread_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: libc::off_t,
    buflen: size_t,
) -> ssize_t {
    // SAFETY: same contract.
    unsafe { __pread64_chk(fd, buf, n, off, buflen) }
}

#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(in_heap(buf, n), || prepare(buf, n, true), || unsafe { call::RECV(fd, buf, n, flags) })
}

#[no_mangle]
pub unsafe extern "C" fn __recv_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as recv.
    unsafe { recv(fd, buf, n, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    let addr_len = || if addr.is_null() || len.is_null() { 0 } else { unsafe { *len as usize } };
    let heap =
        in_heap(buf, n) || in_heap(addr.cast(), addr_len()) || in_heap(len.cast(), std::mem::size_of::<socklen_t>());
    let prep = || {
        prepare(len.cast(), std::mem::size_of::<socklen_t>(), true);
        prepare(addr.cast(), addr_len(), true);
        prepare(buf, n, true);
    };
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(heap, prep, || unsafe { call::RECVFROM(fd, buf, n, flags, addr, len) })
}

#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as recvfrom.
    unsafe { recvfrom(fd, buf, n, flags, addr, len) }
}

#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller passes a valid msghdr.
    let heap = unsafe { msg_in_heap(msg) };
    // SAFETY: as above; the caller's arguments, passed on unchanged.
    with_heap(heap, || unsafe { prepare_msg(msg, true) }, || unsafe { call::RECVMSG(fd, msg, flags) })
}

// ----- out of the buffer -----

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(in_heap(buf, n), || prepare(buf, n, false), || unsafe { call::WRITE(fd, buf, n) })
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: the caller passes `n` valid iovecs.
    let heap = unsafe { iov_in_heap(iov, n) };
    // SAFETY: as above; the caller's arguments, passed on unchanged.
    with_heap(heap, || unsafe { prepare_iov(iov, n, false) }, || unsafe { call::WRITEV(fd, iov, n) })
}

#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(in_heap(buf, n), || prepare(buf, n, false), || unsafe { call::PWRITE(fd, buf, n, off) })
}

#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: same contract (on 64-bit Linux pwrite is pwrite64).
    unsafe { pwrite64(fd, buf, n, off) }
}

#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(in_heap(buf, n), || prepare(buf, n, false), || unsafe { call::SEND(fd, buf, n, flags) })
}

#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    let heap = in_heap(buf, n) || in_heap(addr.cast(), len as usize);
    let prep = || {
        prepare(addr.cast(), len as usize, false);
        prepare(buf, n, false);
    };
    // SAFETY: the caller's arguments, passed on unchanged.
    with_heap(heap, prep, || unsafe { call::SENDTO(fd, buf, n, flags, addr, len) })
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller passes a valid msghdr.
    let heap = unsafe { msg_in_heap(msg) };
    // SAFETY: as above; the caller's arguments, passed on unchanged.
    with_heap(heap, || unsafe { prepare_msg(msg, false) }, || unsafe { call::SENDMSG(fd, msg, flags) })
}
