//! The fork lock: serializes forks, and forks with joining (a child must get either a private
//! heap or a snapshot of the shared one, never a heap changing hands). Async-signal-safe.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys::futex;

/// 0 free, 1 held, 2 held with waiters (futex word).
static FORK_LOCK: AtomicU32 = AtomicU32::new(0);

/// Serializes forks, and forks with joining (see `job::join`).
pub fn fork_lock() {
    while FORK_LOCK.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
        if FORK_LOCK.swap(2, Ordering::Acquire) == 0 {
            return;
        }
        futex::wait(&FORK_LOCK, 2, None);
    }
}

/// Releases [`fork_lock`].
pub fn fork_unlock() {
    if FORK_LOCK.swap(0, Ordering::Release) == 2 {
        futex::wake(&FORK_LOCK, 1);
    }
}

/// Frees the lock in a just-forked child (its only thread; the holder was the parent's).
pub fn reset_in_child() {
    FORK_LOCK.store(0, Ordering::SeqCst);
}
