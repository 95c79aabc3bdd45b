//! What application threads and the service thread tell each other: messages posted for the
//! engine, whether the service thread sleeps (and must be woken) or is deaf to the sockets
//! (local threads read them), and the pause for a fork snapshot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::{Msg, Rank};
use crate::sys::futex;

/// Service thread pause states (a futex word): running ...
pub const RUN: u32 = 0;
/// ... asked to pause ...
pub const PAUSE: u32 = 1;
/// ... paused.
pub const PAUSED: u32 = 2;

#[derive(Default)]
pub struct ServiceLink {
    posted: Mutex<VecDeque<(Rank, Msg)>>,
    has_posted: AtomicBool,
    sleeping: AtomicBool,
    deaf: AtomicBool,
    /// The service thread holds back a revoke or forward until a local thread resumes.
    deferred: AtomicBool,
    /// Wake-ups sent by threads that resumed while messages were held back.
    resume_wakes: AtomicU64,
    pause: AtomicU32,
    /// When the earliest grace of a recalled lock this rank keeps ends (ns; 0: none): then the
    /// service thread gives back what nobody holds (see [`crate::protocol::locks`]). Written
    /// under the lock cache's mutex, by whoever changed the cache.
    grace_end: AtomicU64,
}

impl ServiceLink {
    /// Queues a message for the service thread to handle (to this rank) or send.
    pub fn post(&self, to: Rank, msg: Msg) {
        self.posted.lock().unwrap_or_else(|p| p.into_inner()).push_back((to, msg));
        // SeqCst pairs with the service thread's store of `sleeping` and its load of
        // `has_posted`: either it sees this message, or the poster sees it sleeping and wakes it.
        self.has_posted.store(true, Ordering::SeqCst);
    }

    pub fn has_posted(&self) -> bool {
        self.has_posted.load(Ordering::SeqCst)
    }

    pub fn take_posted(&self) -> Vec<(Rank, Msg)> {
        if !self.has_posted.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        self.posted.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    /// Records when the earliest lock grace ends (`None`: no grace runs). Call with the lock
    /// cache's mutex held, with what the cache says.
    pub fn set_grace_end(&self, end: Option<u64>) {
        self.grace_end.store(end.unwrap_or(0), Ordering::SeqCst);
    }

    /// When the earliest lock grace ends, if one runs.
    pub fn grace_end(&self) -> Option<u64> {
        Some(self.grace_end.load(Ordering::SeqCst)).filter(|&t| t != 0)
    }

    /// Whether the service thread sleeps in the transport and needs a wake-up. Async-signal-safe.
    pub fn sleeping(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }

    pub fn set_sleeping(&self, v: bool) {
        self.sleeping.store(v, Ordering::SeqCst);
    }

    /// Whether the service thread ignores socket readiness (local threads read the sockets).
    pub fn deaf(&self) -> bool {
        self.deaf.load(Ordering::SeqCst)
    }

    pub fn set_deaf(&self, v: bool) {
        self.deaf.store(v, Ordering::SeqCst);
    }

    /// Whether the service thread holds back a revoke or forward for a page until the thread
    /// it was installed for resumes (and then wants a wake-up). Async-signal-safe.
    pub fn has_deferred(&self) -> bool {
        self.deferred.load(Ordering::SeqCst)
    }

    pub fn set_deferred(&self, v: bool) {
        self.deferred.store(v, Ordering::SeqCst);
    }

    /// Counts a wake-up sent by a thread that resumed. Async-signal-safe.
    pub fn note_resume_wake(&self) {
        self.resume_wakes.fetch_add(1, Ordering::SeqCst);
    }

    /// How many wake-ups threads that resumed have sent.
    pub fn resume_wakes(&self) -> u64 {
        self.resume_wakes.load(Ordering::SeqCst)
    }

    /// [`RUN`], [`PAUSE`] or [`PAUSED`].
    pub fn pause_state(&self) -> u32 {
        self.pause.load(Ordering::SeqCst)
    }

    /// Asks the service thread to pause (a fork takes its snapshot).
    pub fn request_pause(&self) {
        self.pause.store(PAUSE, Ordering::SeqCst);
    }

    /// Lets the service thread run again.
    pub fn resume(&self) {
        self.pause.store(RUN, Ordering::SeqCst);
        futex::wake(&self.pause, i32::MAX);
    }

    /// Waits (at most `timeout`) while the pause was asked for and not yet taken.
    pub fn wait_paused(&self, timeout: Duration) {
        futex::wait(&self.pause, PAUSE, Some(timeout));
    }

    /// The service thread's side: if a pause was asked for, says so and stays paused until
    /// [`ServiceLink::resume`].
    pub fn pause_if_asked(&self) {
        if self.pause.load(Ordering::Acquire) != PAUSE {
            return;
        }
        if self.pause.compare_exchange(PAUSE, PAUSED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            futex::wake(&self.pause, i32::MAX);
        }
        while self.pause.load(Ordering::Acquire) == PAUSED {
            futex::wait(&self.pause, PAUSED, None);
        }
    }
}
