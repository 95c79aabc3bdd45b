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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// What each side saw in one round of [`no_round_loses_its_wake_up`].
    #[derive(Default)]
    struct Seen {
        /// The poster saw the service thread asleep (so it would wake it).
        asleep: AtomicBool,
        /// The service thread saw the message (so it would not sleep).
        posted: AtomicBool,
    }

    /// Spins until `word` is not `old` any more; yields now and then, in case the other side
    /// waits for this CPU. Returns the new value.
    fn await_change(word: &AtomicUsize, old: usize) -> usize {
        let mut turns = 0u32;
        loop {
            let now = word.load(Ordering::Acquire);
            if now != old {
                return now;
            }
            turns += 1;
            if turns.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// The wake-up handshake of `Runtime::post` and `Engine::idle`: a poster queues its message,
    /// then looks whether the service thread sleeps (and wakes it if so); the service thread says
    /// it sleeps, then looks for posted messages (and sleeps only if none). Each side stores,
    /// then loads what the other stores, so with anything weaker than a total order between
    /// them (say a release store and an acquire load, which x86's store buffer reorders) both
    /// may miss the other: the message waits in the queue while the service thread sleeps.
    /// Both sides start each round together, from a spin on a shared round number, so that
    /// their stores and loads overlap; no round may end with both looks missing. Up to 1,000,000
    /// rounds or 3 s (on an idle 2-CPU machine the million take under 1 s). With both stores
    /// weakened to release, it failed 8 runs of 8 there, finding 2 to 30 such rounds; on a busy
    /// machine the two sides seldom run at the same time, and the test then finds less.
    #[test]
    fn no_round_loses_its_wake_up() {
        const ROUNDS: usize = 1_000_000;
        const STOP: usize = usize::MAX;
        let budget = Duration::from_secs(3);
        let link = ServiceLink::default();
        let round = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let seen: Vec<Seen> = (0..ROUNDS).map(|_| Seen::default()).collect();
        let start = Instant::now();
        let mut ran = 0;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut at = 0;
                loop {
                    at = await_change(&round, at);
                    if at == STOP {
                        return;
                    }
                    link.post(0, Msg::Ping);
                    seen[at - 1].asleep.store(link.sleeping(), Ordering::Relaxed);
                    done.store(at, Ordering::Release);
                }
            });
            while ran < ROUNDS && start.elapsed() < budget {
                let seen = &seen[ran];
                round.store(ran + 1, Ordering::Release);
                link.set_sleeping(true);
                seen.posted.store(link.has_posted(), Ordering::Relaxed);
                await_change(&done, ran);
                link.set_sleeping(false);
                assert_eq!(link.take_posted().len(), 1, "round {ran}: the message is queued");
                ran += 1;
            }
            round.store(STOP, Ordering::Release);
        });
        let lost = seen[..ran]
            .iter()
            .filter(|s| !s.asleep.load(Ordering::Relaxed) && !s.posted.load(Ordering::Relaxed))
            .count();
        assert_eq!(lost, 0, "rounds of {ran} in which neither side saw the other: a lost wake-up");
    }
}
