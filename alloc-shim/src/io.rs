//! System calls on shared-heap buffers.
//!
//! The kernel's own accesses to user memory do not fault into gallocy: a `read` into a heap
//! page this process holds read-only, or a `write` from one it does not hold, would fail with
//! EFAULT. And a page can be taken away by another rank at any moment, also in the middle of a
//! call that blocks: a datagram socket would drop the datagram whose copy faulted, a stream or
//! a pipe would return a short count. So in a process that joined its job, the kernel never
//! touches a heap page: each wrapper moves the bytes through a private bounce buffer, and the
//! copy between the bounce buffer and the heap is an ordinary user-space copy, which faults
//! into gallocy like any access (the pages are fetched first, so it rarely does). Into the
//! buffer: the call fills the bounce buffer, then the bytes it returned are copied into the
//! heap. Out of the buffer: the heap bytes are copied into the bounce buffer, then the call
//! sends them. `iovec` arrays and `msghdr`s that live in the heap are copied too (and the
//! fields the kernel writes back are copied back). Each call is made exactly once, with the
//! semantics it has on private memory.
//!
//! Bounce buffers up to [`STACK_BOUNCE`] bytes live on the stack; larger ones are fresh
//! anonymous mappings (no allocator, so the wrappers stay async-signal-safe). Outside the heap,
//! and in a process that has not joined, each wrapper costs a few loads and a compare.
//!
//! The real functions are looked up with `dlsym(RTLD_NEXT)` in the library's constructor;
//! a call made before that uses the raw system call.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

use gallocy_rt as g;
use libc::{c_int, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};

/// Bounce buffers up to this size live on the stack (of the slow paths only: the wrappers'
/// own frames stay small, since gallocy's transport calls them from its signal handler's
/// alternate stack).
const STACK_BOUNCE: usize = 8 * 1024;
/// Socket addresses and control data up to this size are copied on the stack.
const STACK_SIDE: usize = 512;
/// iovec arrays up to this length are copied on the stack.
const STACK_IOV: usize = 64;

/// Whether `[addr, addr + len)` overlaps the heap of a process that joined its job.
#[inline]
fn in_heap(addr: *const c_void, len: usize) -> bool {
    g::preload::shared_range(addr as usize, len)
}

/// Private memory for a call's bytes: on the stack when small, else a fresh mapping.
struct Bounce<'a> {
    ptr: *mut u8,
    len: usize,
    mapped: bool,
    _stack: std::marker::PhantomData<&'a mut [MaybeUninit<u8>]>,
}

impl<'a> Bounce<'a> {
    /// `len` bytes, from `stack` if they fit. None if the mapping fails (the caller reports
    /// ENOMEM, as the kernel would for a buffer it cannot allocate).
    fn new(len: usize, stack: &'a mut [MaybeUninit<u8>; STACK_BOUNCE]) -> Option<Bounce<'a>> {
        Bounce::new_in(len, stack)
    }

    /// `len` bytes, from `stack` if they fit, else a fresh mapping.
    fn new_in(len: usize, stack: &'a mut [MaybeUninit<u8>]) -> Option<Bounce<'a>> {
        if len <= stack.len() {
            return Some(Bounce {
                ptr: stack.as_mut_ptr().cast(),
                len,
                mapped: false,
                _stack: std::marker::PhantomData,
            });
        }
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Bounce { ptr: p.cast(), len, mapped: true, _stack: std::marker::PhantomData })
    }
}

impl Drop for Bounce<'_> {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: our own mapping of `len` bytes.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// Copies `len` heap bytes at `src` into private memory at `dst`, fetching the pages first.
///
/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap.
unsafe fn copy_from_heap(dst: *mut u8, src: *const u8, len: usize) {
    g::preload::before_kernel_access(src as usize, len, false);
    // SAFETY: caller contract; a page taken away meanwhile faults and is fetched again.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Copies `len` private bytes at `src` into the heap at `dst`, fetching the pages first.
///
/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap.
unsafe fn copy_to_heap(dst: *mut u8, src: *const u8, len: usize) {
    g::preload::before_kernel_access(dst as usize, len, true);
    // SAFETY: caller contract; a page taken away meanwhile faults and is fetched again.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

fn set_errno(e: c_int) {
    // SAFETY: errno is thread-local and always writable.
    unsafe { *libc::__errno_location() = e };
}

/// A call on one buffer that the kernel fills (`read`, `recv`, ...), through a bounce buffer
/// when the buffer lies in the heap.
///
/// # Safety
/// `buf` is valid for `n` bytes; `call` is the real function applied to its argument buffer.
#[inline(never)]
#[cold]
unsafe fn into_buffer_slow(
    buf: *mut c_void,
    n: size_t,
    prefill: bool,
    call: impl FnOnce(*mut c_void) -> ssize_t,
) -> ssize_t {
    let mut stack = [MaybeUninit::<u8>::uninit(); STACK_BOUNCE];
    let Some(b) = Bounce::new(n, &mut stack) else {
        set_errno(libc::ENOMEM);
        return -1;
    };
    if prefill {
        // The call may report bytes it did not store (MSG_TRUNC on a stream discards them):
        // what is copied back must then be the buffer's own bytes.
        // SAFETY: `buf` holds `n` bytes, the bounce buffer too.
        unsafe { copy_from_heap(b.ptr, buf.cast(), n) };
    }
    let r = call(b.ptr.cast());
    if r > 0 {
        // A datagram received with MSG_TRUNC returns its whole length, which may exceed `n`.
        let stored = (r as usize).min(n);
        // SAFETY: the call stored `stored` <= `n` bytes in the bounce buffer; `buf` holds `n`.
        unsafe { copy_to_heap(buf.cast(), b.ptr, stored) };
    }
    r
}

/// A call on one buffer that the kernel reads (`write`, `send`, ...), through a bounce buffer
/// when the buffer lies in the heap.
///
/// # Safety
/// `buf` is valid for `n` bytes; `call` is the real function applied to its argument buffer.
#[inline(never)]
#[cold]
unsafe fn out_of_buffer_slow(buf: *const c_void, n: size_t, call: impl FnOnce(*const c_void) -> ssize_t) -> ssize_t {
    let mut stack = [MaybeUninit::<u8>::uninit(); STACK_BOUNCE];
    let Some(b) = Bounce::new(n, &mut stack) else {
        set_errno(libc::ENOMEM);
        return -1;
    };
    // SAFETY: `buf` holds `n` bytes, the bounce buffer too.
    unsafe { copy_from_heap(b.ptr, buf.cast(), n) };
    call(b.ptr.cast())
}

/// [`into_buffer_slow`] when the buffer lies in the heap, else the call as it is (a small frame).
///
/// # Safety
/// As for [`into_buffer_slow`].
#[inline(always)]
unsafe fn into_buffer(
    buf: *mut c_void,
    n: size_t,
    prefill: bool,
    call: impl FnOnce(*mut c_void) -> ssize_t,
) -> ssize_t {
    if !in_heap(buf, n) {
        return call(buf);
    }
    // SAFETY: forwarded contract.
    unsafe { into_buffer_slow(buf, n, prefill, call) }
}

/// [`out_of_buffer_slow`] when the buffer lies in the heap, else the call as it is.
///
/// # Safety
/// As for [`out_of_buffer_slow`].
#[inline(always)]
unsafe fn out_of_buffer(buf: *const c_void, n: size_t, call: impl FnOnce(*const c_void) -> ssize_t) -> ssize_t {
    if !in_heap(buf, n) {
        return call(buf);
    }
    // SAFETY: forwarded contract.
    unsafe { out_of_buffer_slow(buf, n, call) }
}

/// Whether any part of an `iovec` array (the array or a buffer) lies in the heap of a joined
/// process. Reads the array as the kernel would.
///
/// # Safety
/// `iov` points at `n` valid iovecs.
#[inline]
unsafe fn iov_in_heap(iov: *const iovec, n: c_int) -> bool {
    if iov.is_null() || n <= 0 || n as usize > IOV_MAX || !g::preload::joined_job() {
        return false;
    }
    in_heap(iov.cast(), n as usize * std::mem::size_of::<iovec>())
        // SAFETY: caller contract.
        || (0..n as usize).any(|i| unsafe { in_heap((*iov.add(i)).iov_base, (*iov.add(i)).iov_len) })
}

/// Whether any part of a `msghdr` lies in the heap of a joined process.
///
/// # Safety
/// `msg` points at a valid `msghdr`.
#[inline]
unsafe fn msg_in_heap(msg: *const msghdr) -> bool {
    if msg.is_null() || !g::preload::joined_job() {
        return false;
    }
    if in_heap(msg.cast(), std::mem::size_of::<msghdr>()) {
        return true;
    }
    // SAFETY: caller contract.
    let m = unsafe { &*msg };
    in_heap(m.msg_name, m.msg_namelen as usize)
        || in_heap(m.msg_control, m.msg_controllen)
        // SAFETY: caller contract: the iovecs the kernel would read.
        || unsafe { iov_in_heap(m.msg_iov, m.msg_iovlen as c_int) }
}

/// An `iovec` array made safe for the kernel. The caller's array is read once, into `copy`;
/// `kernel` is what the call gets: the same entries, with the heap buffers pointing into one
/// bounce buffer. Both arrays live on the stack up to [`STACK_IOV`] entries, else in a mapping.
struct Iov<'a> {
    n: usize,
    copy: *mut iovec,
    kernel: *mut iovec,
    mapped: bool,
    bounce: Option<Bounce<'a>>,
}

/// The kernel's limit on iovecs per call: a longer array is the kernel's to refuse (EINVAL).
const IOV_MAX: usize = 1024;

impl<'a> Iov<'a> {
    /// None: nothing of the array lies in the heap, or the kernel will refuse it (use it as it
    /// is). Err: out of memory, or lengths that overflow.
    ///
    /// # Safety
    /// `user` points at `n` valid iovecs (the kernel would read them anyway).
    unsafe fn new(
        user: *const iovec,
        n: c_int,
        stack_iov: &'a mut [iovec; STACK_IOV],
        stack: &'a mut [MaybeUninit<u8>; STACK_BOUNCE],
    ) -> Option<Result<Iov<'a>, ()>> {
        if user.is_null() || n <= 0 || n as usize > IOV_MAX {
            return None;
        }
        let n = n as usize;
        let bytes = n * std::mem::size_of::<iovec>();
        let array_in_heap = in_heap(user.cast(), bytes);
        let (copy, kernel, mapped) = if 2 * n <= STACK_IOV {
            let base = stack_iov.as_mut_ptr();
            // SAFETY: the stack array holds STACK_IOV >= 2n iovecs.
            (base, unsafe { base.add(n) }, false)
        } else {
            // SAFETY: a fresh private anonymous mapping for both arrays.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    2 * bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Some(Err(()));
            }
            let base: *mut iovec = p.cast();
            // SAFETY: the mapping holds 2n iovecs.
            (base, unsafe { base.add(n) }, true)
        };
        let mut iov = Iov { n, copy, kernel, mapped, bounce: None };
        // SAFETY: the caller's array holds `n` iovecs; `copy` has room for them.
        unsafe { copy_from_heap(copy.cast(), user.cast(), bytes) };
        let mut total = 0usize;
        for v in iov.entries() {
            if in_heap(v.iov_base, v.iov_len) {
                let Some(t) = total.checked_add(v.iov_len) else { return Some(Err(())) };
                total = t;
            }
        }
        if !array_in_heap && total == 0 {
            return None;
        }
        if total > 0 {
            match Bounce::new(total, stack) {
                Some(b) => iov.bounce = Some(b),
                None => return Some(Err(())),
            }
        }
        let mut at = 0;
        for i in 0..n {
            // SAFETY: `copy` holds `n` iovecs.
            let mut v = unsafe { *copy.add(i) };
            if let Some(b) = iov.bounce.as_ref().filter(|_| in_heap(v.iov_base, v.iov_len)) {
                // SAFETY: the bounce buffer holds `total` bytes, the sum of these lengths.
                v.iov_base = unsafe { b.ptr.add(at) }.cast();
                at += v.iov_len;
            }
            // SAFETY: `kernel` holds `n` iovecs.
            unsafe { kernel.add(i).write(v) };
        }
        Some(Ok(iov))
    }

    /// The caller's entries, as read once.
    fn entries(&self) -> impl Iterator<Item = iovec> + '_ {
        // SAFETY: `copy` holds `n` iovecs.
        (0..self.n).map(move |i| unsafe { *self.copy.add(i) })
    }

    fn as_ptr(&self) -> *const iovec {
        self.kernel
    }

    /// Fills the bounce buffer from the heap buffers (before a call that sends).
    fn gather(&self) {
        self.each_heap_part(usize::MAX, |user, bounce, len| {
            // SAFETY: `user` is a heap buffer of at least `len` bytes, `bounce` its slice.
            unsafe { copy_from_heap(bounce as *mut u8, user, len) }
        });
    }

    /// Copies the first `got` bytes the call stored back into the heap buffers.
    fn scatter(&self, got: usize) {
        self.each_heap_part(got, |user, bounce, len| {
            // SAFETY: `bounce` holds what the call stored; `user` is the heap buffer it stands for.
            unsafe { copy_to_heap(user as *mut u8, bounce, len) }
        });
    }

    /// Runs `f(user buffer, bounce slice, length)` for the heap entries, in order, over the
    /// first `limit` bytes of the whole array.
    fn each_heap_part(&self, limit: usize, mut f: impl FnMut(*const u8, *const u8, usize)) {
        let mut left = limit;
        for i in 0..self.n {
            if left == 0 {
                break;
            }
            // SAFETY: both arrays hold `n` iovecs.
            let (user, kernel) = unsafe { (*self.copy.add(i), *self.kernel.add(i)) };
            let len = user.iov_len.min(left);
            if kernel.iov_base != user.iov_base && len > 0 {
                f(user.iov_base as *const u8, kernel.iov_base as *const u8, len);
            }
            left -= len;
        }
    }
}

impl Drop for Iov<'_> {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: our own mapping of 2n iovecs.
            unsafe { libc::munmap(self.copy.cast(), 2 * self.n * std::mem::size_of::<iovec>()) };
        }
    }
}

fn empty_iovs() -> [iovec; STACK_IOV] {
    [iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; STACK_IOV]
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

/// A small private copy of something of the heap the kernel reads or writes (a socket
/// address, its length, control data, a `msghdr`).
struct Side<'a> {
    user: *mut u8,
    len: usize,
    bounce: Option<Bounce<'a>>,
}

impl<'a> Side<'a> {
    /// The pointer to give the kernel: `user` itself outside the heap, else a private copy
    /// (filled from the heap when `fill`). Err: out of memory.
    fn new(
        user: *mut u8,
        len: usize,
        fill: bool,
        stack: &'a mut [MaybeUninit<u8>; STACK_SIDE],
    ) -> Result<Side<'a>, ()> {
        if user.is_null() || !in_heap(user.cast(), len) {
            return Ok(Side { user, len, bounce: None });
        }
        let b = Bounce::new_in(len, stack).ok_or(())?;
        if fill {
            // SAFETY: `user` holds `len` bytes, the bounce buffer too.
            unsafe { copy_from_heap(b.ptr, user, len) };
        }
        Ok(Side { user, len, bounce: Some(b) })
    }

    fn ptr(&self) -> *mut u8 {
        self.bounce.as_ref().map_or(self.user, |b| b.ptr)
    }

    /// Copies the first `len` bytes the kernel stored back into the heap.
    fn store(&self, len: usize) {
        if let Some(b) = &self.bounce {
            // SAFETY: the kernel stored at most `self.len` bytes; `user` holds `self.len`.
            unsafe { copy_to_heap(self.user, b.ptr, len.min(self.len)) };
        }
    }
}

// ----- into the buffer -----

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments; the buffer given to the call holds `n` bytes.
    unsafe { into_buffer(buf, n, false, |b| call::READ(fd, b, n)) }
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as read.
    unsafe { read(fd, buf, n) }
}

/// The slow path of [`readv`]: parts of the call lie in the heap.
#[inline(never)]
#[cold]
unsafe fn readv_slow(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    let (mut si, mut sb) = (empty_iovs(), [MaybeUninit::<u8>::uninit(); STACK_BOUNCE]);
    // SAFETY: the caller passes `n` valid iovecs.
    let prepared = unsafe { Iov::new(iov, n, &mut si, &mut sb) };
    match prepared {
        // SAFETY: the caller's arguments, passed on unchanged.
        None => unsafe { call::READV(fd, iov, n) },
        Some(Err(())) => {
            set_errno(libc::ENOMEM);
            -1
        }
        Some(Ok(v)) => {
            // SAFETY: a private copy of the caller's iovecs, with private buffers for the heap.
            let r = unsafe { call::READV(fd, v.as_ptr(), n) };
            if r > 0 {
                v.scatter(r as usize);
            }
            r
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: the caller's arguments; the buffer given to the call holds `n` bytes.
    unsafe { into_buffer(buf, n, false, |b| call::PREAD(fd, b, n, off)) }
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
    // SAFETY: the caller's arguments; the buffer given to the call holds `n` bytes.
    unsafe { into_buffer(buf, n, flags & libc::MSG_TRUNC != 0, |b| call::RECV(fd, b, n, flags)) }
}

#[no_mangle]
pub unsafe extern "C" fn __recv_chk(fd: c_int, buf: *mut c_void, n: size_t, buflen: size_t, flags: c_int) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as recv.
    unsafe { recv(fd, buf, n, flags) }
}

/// The slow path of [`recvfrom`]: parts of the call lie in the heap.
#[inline(never)]
#[cold]
unsafe fn recvfrom_slow(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    let in_len = !len.is_null() && in_heap(len.cast(), std::mem::size_of::<socklen_t>());
    let mut addr_len: socklen_t = 0;
    if !len.is_null() {
        // SAFETY: the caller passes a valid length when it passes one.
        unsafe {
            copy_from_heap((&mut addr_len as *mut socklen_t).cast(), len.cast(), std::mem::size_of::<socklen_t>())
        };
    }
    let mut sa = [MaybeUninit::<u8>::uninit(); STACK_SIDE];
    let Ok(side) = Side::new(addr.cast(), if addr.is_null() { 0 } else { addr_len as usize }, false, &mut sa) else {
        set_errno(libc::ENOMEM);
        return -1;
    };
    let len_arg = if in_len { &mut addr_len as *mut socklen_t } else { len };
    // SAFETY: the caller's arguments, with private copies of whatever of them lies in the heap.
    let r = unsafe {
        into_buffer(buf, n, flags & libc::MSG_TRUNC != 0, |b| {
            call::RECVFROM(fd, b, n, flags, side.ptr().cast(), len_arg)
        })
    };
    if r >= 0 && !addr.is_null() && !len.is_null() {
        // SAFETY: `len_arg` is the length the kernel wrote back.
        side.store(unsafe { *len_arg } as usize);
        if in_len {
            // SAFETY: `len` is a valid socklen_t of the heap.
            unsafe {
                copy_to_heap(len.cast(), (&addr_len as *const socklen_t).cast(), std::mem::size_of::<socklen_t>())
            };
        }
    }
    r
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

/// A private copy of a `msghdr` whose parts lie in the heap: the header, the address, the
/// control data and the iovecs.
struct Msg<'a> {
    user: *mut msghdr,
    local: msghdr,
    name: Side<'a>,
    control: Side<'a>,
    iov: Option<Iov<'a>>,
}

/// Buffers a [`Msg`] may use on the stack.
struct MsgStack {
    name: [MaybeUninit<u8>; STACK_SIDE],
    control: [MaybeUninit<u8>; STACK_SIDE],
    iov: [iovec; STACK_IOV],
    data: [MaybeUninit<u8>; STACK_BOUNCE],
}

impl MsgStack {
    fn new() -> MsgStack {
        MsgStack {
            name: [MaybeUninit::uninit(); STACK_SIDE],
            control: [MaybeUninit::uninit(); STACK_SIDE],
            iov: empty_iovs(),
            data: [MaybeUninit::uninit(); STACK_BOUNCE],
        }
    }
}

impl<'a> Msg<'a> {
    /// None: nothing of it lies in the heap. Err: out of memory. `sending`: the kernel reads
    /// the address and control data (else it writes them).
    ///
    /// # Safety
    /// `user` points at a valid `msghdr` (the kernel would read it anyway).
    unsafe fn new(user: *mut msghdr, sending: bool, st: &'a mut MsgStack) -> Option<Result<Msg<'a>, ()>> {
        if user.is_null() {
            return None;
        }
        let mut local = std::mem::MaybeUninit::<msghdr>::uninit();
        // SAFETY: caller contract.
        unsafe { copy_from_heap(local.as_mut_ptr().cast(), user.cast(), std::mem::size_of::<msghdr>()) };
        // SAFETY: fully copied above.
        let mut local = unsafe { local.assume_init() };
        let name_len = if local.msg_name.is_null() { 0 } else { local.msg_namelen as usize };
        let parts_in_heap = in_heap(user.cast(), std::mem::size_of::<msghdr>())
            || in_heap(local.msg_name, name_len)
            || in_heap(local.msg_control, local.msg_controllen);
        let MsgStack { name, control, iov: stack_iov, data } = st;
        // SAFETY: the iovecs the kernel would read.
        let iov = match unsafe { Iov::new(local.msg_iov, local.msg_iovlen as c_int, stack_iov, data) } {
            Some(Err(())) => return Some(Err(())),
            Some(Ok(v)) => Some(v),
            None if !parts_in_heap => return None,
            None => None,
        };
        let Ok(name) = Side::new(local.msg_name.cast(), name_len, sending, name) else { return Some(Err(())) };
        let Ok(control) = Side::new(local.msg_control.cast(), local.msg_controllen, sending, control) else {
            return Some(Err(()));
        };
        if !local.msg_name.is_null() {
            local.msg_name = name.ptr().cast();
        }
        if !local.msg_control.is_null() {
            local.msg_control = control.ptr().cast();
        }
        if let Some(v) = &iov {
            local.msg_iov = v.as_ptr() as *mut iovec;
        }
        Some(Ok(Msg { user, local, name, control, iov }))
    }

    /// After a receive of `got` bytes: copies what the kernel stored back to the caller's
    /// buffers and header fields.
    fn store(&self, got: usize) {
        if let Some(v) = &self.iov {
            v.scatter(got);
        }
        self.name.store(self.local.msg_namelen as usize);
        self.control.store(self.local.msg_controllen);
        let mut user = std::mem::MaybeUninit::<msghdr>::uninit();
        // SAFETY: the caller's msghdr, read and written back whole with the three fields the
        // kernel sets on a receive.
        unsafe {
            copy_from_heap(user.as_mut_ptr().cast(), self.user.cast(), std::mem::size_of::<msghdr>());
            let mut u = user.assume_init();
            u.msg_namelen = self.local.msg_namelen;
            u.msg_controllen = self.local.msg_controllen;
            u.msg_flags = self.local.msg_flags;
            copy_to_heap(self.user.cast(), (&u as *const msghdr).cast(), std::mem::size_of::<msghdr>());
        }
    }
}

/// The slow path of [`recvmsg`]: parts of the call lie in the heap.
#[inline(never)]
#[cold]
unsafe fn recvmsg_slow(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let mut st = MsgStack::new();
    // SAFETY: the caller passes a valid msghdr.
    let prepared = unsafe { Msg::new(msg, false, &mut st) };
    match prepared {
        // SAFETY: the caller's arguments, passed on unchanged.
        None => unsafe { call::RECVMSG(fd, msg, flags) },
        Some(Err(())) => {
            set_errno(libc::ENOMEM);
            -1
        }
        Some(Ok(mut m)) => {
            if flags & libc::MSG_TRUNC != 0 {
                // The call may report bytes it did not store: copy back the buffers' own.
                if let Some(v) = &m.iov {
                    v.gather();
                }
            }
            // SAFETY: a private copy of the caller's msghdr with private buffers.
            let r = unsafe { call::RECVMSG(fd, &mut m.local, flags) };
            if r >= 0 {
                m.store(r as usize);
            }
            r
        }
    }
}

// ----- out of the buffer -----

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments; the buffer given to the call holds the same `n` bytes.
    unsafe { out_of_buffer(buf, n, |b| call::WRITE(fd, b, n)) }
}

/// The slow path of [`writev`]: parts of the call lie in the heap.
#[inline(never)]
#[cold]
unsafe fn writev_slow(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    let (mut si, mut sb) = (empty_iovs(), [MaybeUninit::<u8>::uninit(); STACK_BOUNCE]);
    // SAFETY: the caller passes `n` valid iovecs.
    let prepared = unsafe { Iov::new(iov, n, &mut si, &mut sb) };
    match prepared {
        // SAFETY: the caller's arguments, passed on unchanged.
        None => unsafe { call::WRITEV(fd, iov, n) },
        Some(Err(())) => {
            set_errno(libc::ENOMEM);
            -1
        }
        Some(Ok(v)) => {
            v.gather();
            // SAFETY: a private copy of the caller's iovecs and bytes.
            unsafe { call::WRITEV(fd, v.as_ptr(), n) }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: the caller's arguments; the buffer given to the call holds the same `n` bytes.
    unsafe { out_of_buffer(buf, n, |b| call::PWRITE(fd, b, n, off)) }
}

#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: libc::off_t) -> ssize_t {
    // SAFETY: same contract (on 64-bit Linux pwrite is pwrite64).
    unsafe { pwrite64(fd, buf, n, off) }
}

#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments; the buffer given to the call holds the same `n` bytes.
    unsafe { out_of_buffer(buf, n, |b| call::SEND(fd, b, n, flags)) }
}

/// The slow path of [`sendto`]: parts of the call lie in the heap.
#[inline(never)]
#[cold]
unsafe fn sendto_slow(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    let mut sa = [MaybeUninit::<u8>::uninit(); STACK_SIDE];
    let Ok(side) = Side::new(addr as *mut u8, if addr.is_null() { 0 } else { len as usize }, true, &mut sa) else {
        set_errno(libc::ENOMEM);
        return -1;
    };
    // SAFETY: the caller's arguments, with private copies of what lies in the heap.
    unsafe { out_of_buffer(buf, n, |b| call::SENDTO(fd, b, n, flags, side.ptr().cast(), len)) }
}

/// The slow path of [`sendmsg`]: parts of the call lie in the heap.
#[inline(never)]
#[cold]
unsafe fn sendmsg_slow(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    let mut st = MsgStack::new();
    // SAFETY: the caller passes a valid msghdr; sending, the kernel only reads it.
    let prepared = unsafe { Msg::new(msg as *mut msghdr, true, &mut st) };
    match prepared {
        // SAFETY: the caller's arguments, passed on unchanged.
        None => unsafe { call::SENDMSG(fd, msg, flags) },
        Some(Err(())) => {
            set_errno(libc::ENOMEM);
            -1
        }
        Some(Ok(m)) => {
            if let Some(v) = &m.iov {
                v.gather();
            }
            // SAFETY: a private copy of the caller's msghdr with private copies of its bytes.
            unsafe { call::SENDMSG(fd, &m.local, flags) }
        }
    }
}

// ----- the exported wrappers with more than one buffer: a quick look, then the slow path -----

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: the caller passes `n` valid iovecs; its arguments are passed on unchanged.
    unsafe {
        if iov_in_heap(iov, n) {
            readv_slow(fd, iov, n)
        } else {
            call::READV(fd, iov, n)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: the caller passes `n` valid iovecs; its arguments are passed on unchanged.
    unsafe {
        if iov_in_heap(iov, n) {
            writev_slow(fd, iov, n)
        } else {
            call::WRITEV(fd, iov, n)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller passes a valid msghdr; its arguments are passed on unchanged.
    unsafe {
        if msg_in_heap(msg) {
            recvmsg_slow(fd, msg, flags)
        } else {
            call::RECVMSG(fd, msg, flags)
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller passes a valid msghdr; its arguments are passed on unchanged.
    unsafe {
        if msg_in_heap(msg) {
            sendmsg_slow(fd, msg, flags)
        } else {
            call::SENDMSG(fd, msg, flags)
        }
    }
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
    let heap = g::preload::joined_job()
        && (in_heap(buf, n)
            || in_heap(len.cast(), std::mem::size_of::<socklen_t>())
            // SAFETY: the caller passes a valid length with an address.
            || (!addr.is_null() && !len.is_null() && in_heap(addr.cast(), unsafe { *len } as usize)));
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe {
        if heap {
            recvfrom_slow(fd, buf, n, flags, addr, len)
        } else {
            call::RECVFROM(fd, buf, n, flags, addr, len)
        }
    }
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
    let heap = g::preload::joined_job() && (in_heap(buf, n) || in_heap(addr.cast(), len as usize));
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe {
        if heap {
            sendto_slow(fd, buf, n, flags, addr, len)
        } else {
            call::SENDTO(fd, buf, n, flags, addr, len)
        }
    }
}
