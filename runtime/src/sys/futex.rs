//! Futex wait/wake on 32-bit atomics (async-signal-safe raw syscalls).

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout`.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout
        .map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as libc::c_long });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned 32-bit atomic; the timespec outlives the call.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, expected, tsp);
    }
}

/// Wakes up to `n` threads sleeping on `word`.
pub fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a valid, aligned 32-bit atomic.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, n);
    }
}

/// Spins (yielding now and then) until `done()` or `spin` elapsed. Returns whether `done()` held.
#[inline]
pub fn spin_until(spin: Duration, mut done: impl FnMut() -> bool) -> bool {
    if done() {
        return true;
    }
    let start = crate::sys::clock::now_ns();
    let limit = spin.as_nanos() as u64;
    let mut i = 0u32;
    loop {
        for _ in 0..32 {
            std::hint::spin_loop();
        }
        if done() {
            return true;
        }
        i = i.wrapping_add(1);
        if i.is_multiple_of(16) {
            if crate::sys::clock::now_ns().saturating_sub(start) >= limit {
                return false;
            }
            // Two cores: let the thread that will answer us run.
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
}
