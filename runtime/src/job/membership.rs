//! Where this process stands in its job: its phase (local, joining, joined), whether it is a
//! forked child of a member, and how far it is in leaving. Every query is async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use crate::sys::futex;

/// Phases of a process in its job: not joined yet (the heap is private memory) ...
pub const LOCAL: u32 = 0;
/// ... joining (the heap becomes shared, the transport connects) ...
pub const JOINING: u32 = 1;
/// ... joined.
pub const JOINED: u32 = 2;

/// This process's membership of the job.
#[derive(Default)]
pub struct Membership {
    /// [`LOCAL`], [`JOINING`] or [`JOINED`] (a futex word).
    phase: AtomicU32,
    /// The process that joined the job (a forked child, even a `vfork` one, has another pid).
    member_pid: AtomicI32,
    /// This process is a forked child of a job member (see `preload::after_fork_child`).
    forked: AtomicBool,
    /// `finalize` started: peers' departures are expected.
    leaving: AtomicBool,
    /// Every peer has left (the service thread then ends).
    all_departed: AtomicBool,
    /// `finalize` is complete.
    finalized: AtomicBool,
    /// The process is ending (`exit`, `_exit`): a thread that touches a page it does not hold
    /// after the job was left waits for the end instead of failing the process.
    exiting: AtomicBool,
}

impl Membership {
    pub fn phase(&self) -> u32 {
        self.phase.load(Ordering::Acquire)
    }

    /// Moves to `phase` and wakes the threads waiting for the phase to change.
    pub fn set_phase(&self, phase: u32) {
        self.phase.store(phase, Ordering::SeqCst);
        futex::wake(&self.phase, i32::MAX);
    }

    /// Waits while the phase is `phase`.
    pub fn wait_while(&self, phase: u32) {
        futex::wait(&self.phase, phase, None);
    }

    /// Whether this process has joined the job (and so may fault on, and serve, shared pages).
    #[inline]
    pub fn joined(&self) -> bool {
        self.phase() == JOINED
    }

    /// Records the calling process as the one that joined.
    pub fn record_member_pid(&self) {
        // SAFETY: getpid has no preconditions.
        self.member_pid.store(unsafe { libc::getpid() }, Ordering::Release);
    }

    /// Whether the calling process is the one that joined the job (not a child of it, not a
    /// process that never joined).
    pub fn is_joined_member(&self) -> bool {
        // SAFETY: getpid has no preconditions (a raw system call, correct in a vfork child).
        self.joined() && self.member_pid.load(Ordering::Acquire) == unsafe { libc::syscall(libc::SYS_getpid) } as i32
    }

    pub fn forked(&self) -> bool {
        self.forked.load(Ordering::Acquire)
    }

    pub fn set_forked(&self) {
        self.forked.store(true, Ordering::Release);
    }

    pub fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    pub fn set_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    pub fn all_departed(&self) -> bool {
        self.all_departed.load(Ordering::Acquire)
    }

    pub fn set_all_departed(&self) {
        self.all_departed.store(true, Ordering::Release);
    }

    pub fn finalized(&self) -> bool {
        self.finalized.load(Ordering::Acquire)
    }

    pub fn set_finalized(&self) {
        self.finalized.store(true, Ordering::Release);
    }

    pub fn exiting(&self) -> bool {
        self.exiting.load(Ordering::Acquire)
    }

    pub fn set_exiting(&self) {
        self.exiting.store(true, Ordering::Release);
    }
}
