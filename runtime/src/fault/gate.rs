//! The heap gate: closed (non-zero) while the heap's mappings change under the application
//! (joining, a fork snapshot); heap faults wait on it until it opens. A fork also waits for
//! every fetch in progress to end. Async-signal-safe.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys::futex;

#[derive(Default)]
pub struct Gate {
    closed: AtomicU32,
    /// Threads inside the fault path's fetch.
    fetching: AtomicU32,
}

impl Gate {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) != 0
    }

    /// Closes the gate: heap faults wait until [`Gate::open`].
    pub fn close(&self) {
        self.closed.store(1, Ordering::SeqCst);
    }

    /// Opens the gate and wakes the threads waiting at it.
    pub fn open(&self) {
        self.closed.store(0, Ordering::SeqCst);
        futex::wake(&self.closed, i32::MAX);
    }

    /// Waits while the gate is closed.
    pub fn wait_open(&self) {
        while self.closed.load(Ordering::SeqCst) != 0 {
            futex::wait(&self.closed, 1, None);
        }
    }

    /// Announces a fetch, waiting at the gate first: a fork closes the gate, then waits for
    /// every announced fetch to end.
    pub fn begin_fetch(&self) {
        self.fetching.fetch_add(1, Ordering::SeqCst);
        while self.is_closed() {
            self.fetching.fetch_sub(1, Ordering::SeqCst);
            self.wait_open();
            self.fetching.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn end_fetch(&self) {
        self.fetching.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a fetch is in progress.
    pub fn fetching(&self) -> bool {
        self.fetching.load(Ordering::SeqCst) != 0
    }
}
