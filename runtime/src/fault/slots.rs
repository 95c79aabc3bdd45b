//! Pre-allocated wait slots: a thread that waits for an answer (a page grant, a lock grant, a
//! size) claims a slot, names it in its request as a [`Waiter`] (the slot and its generation,
//! which changes with every claim, so a late answer to an earlier wait is recognised), and spins,
//! then sleeps on it. Everything here is allocation-free and async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::Waiter;
use crate::sys::futex;

/// Number of slots: the most concurrent waits one process can have.
pub const SLOTS: usize = 512;
/// Slots only page faults may use: waits that depend on other threads (a lock held by another
/// thread) never take the last ones, so the thread holding the lock can always fetch a page.
pub const FAULT_RESERVE: usize = 64;

const WAITING: u32 = 1;
const SLEEPING: u32 = 2;
const DONE: u32 = 3;

/// One wait.
pub struct Slot {
    claimed: AtomicBool,
    /// Changes with every claim.
    generation: AtomicU32,
    state: AtomicU32,
    /// A fault request for the local home is posted in this slot.
    local: AtomicBool,
    /// Claimed by [`Slots::claim_dependent`].
    dependent: AtomicBool,
    page: AtomicU64,
    write: AtomicBool,
    /// A value the completer hands the waiter.
    result: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            claimed: AtomicBool::new(false),
            generation: AtomicU32::new(0),
            state: AtomicU32::new(0),
            local: AtomicBool::new(false),
            dependent: AtomicBool::new(false),
            page: AtomicU64::new(0),
            write: AtomicBool::new(false),
            result: AtomicU64::new(0),
        }
    }
}

/// The slot table.
pub struct Slots {
    slots: Box<[Slot]>,
    /// Number of slots with a posted local request.
    posted: AtomicU32,
    /// Number of threads currently spinning on a slot (the service thread spins too meanwhile).
    spinners: AtomicU32,
    /// Slots held by waits that may depend on other threads (see [`Slots::claim_dependent`]).
    dependent: AtomicU32,
    /// Slots claimed now.
    claimed: AtomicU32,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            posted: AtomicU32::new(0),
            spinners: AtomicU32::new(0),
            dependent: AtomicU32::new(0),
            claimed: AtomicU32::new(0),
        }
    }
}

impl Slots {
    /// Claims a free slot, marked waiting, for a wait for `page` (for writing if `write`; 0 and
    /// false for waits that are not for a page).
    pub fn claim_for(&self, page: u64, write: bool) -> Waiter {
        let w = self.claim_any(false);
        let s = &self.slots[w.slot as usize];
        s.page.store(page, Ordering::Release);
        s.write.store(write, Ordering::Release);
        w
    }

    /// Claims a free slot, marked waiting, for a wait that may depend on other threads of this
    /// process (a global lock, whose holder may be a local thread that must fault a page before
    /// it releases it). Such waits never hold more than `SLOTS - FAULT_RESERVE` slots: the
    /// caller waits for one of them to end first.
    pub fn claim_dependent(&self) -> Waiter {
        let limit = (SLOTS - FAULT_RESERVE) as u32;
        loop {
            let n = self.dependent.load(Ordering::Acquire);
            if n < limit && self.dependent.compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return self.claim_any(true);
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    fn claim_any(&self, dependent: bool) -> Waiter {
        let start = (crate::sys::clock::now_ns() as usize / 64) % SLOTS;
        loop {
            for k in 0..SLOTS {
                let i = (start + k) % SLOTS;
                let s = &self.slots[i];
                if !s.claimed.load(Ordering::Relaxed)
                    && s.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()
                {
                    self.claimed.fetch_add(1, Ordering::AcqRel);
                    let generation = s.generation.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
                    s.dependent.store(dependent, Ordering::Release);
                    s.state.store(WAITING, Ordering::Release);
                    return Waiter { slot: i as u32, generation };
                }
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// The slot of `w`, if `w` is a wait in progress.
    fn live(&self, w: Waiter) -> Option<&Slot> {
        let s = self.slots.get(w.slot as usize)?;
        // A slot is live from the moment its claim published the new generation and the waiting
        // state (`claim` stores the state last), until its waiter releases it.
        let live = s.claimed.load(Ordering::Acquire)
            && s.state.load(Ordering::Acquire) != 0
            && s.generation.load(Ordering::Acquire) == w.generation;
        live.then_some(s)
    }

    /// Whether `w` is a wait in progress for `page`.
    pub fn waits_for_page(&self, w: Waiter, page: u64) -> bool {
        self.live(w).is_some_and(|s| s.page.load(Ordering::Acquire) == page)
    }

    /// Posts the request of `w` for the local service thread.
    pub fn post_local(&self, w: Waiter) {
        self.slots[w.slot as usize].local.store(true, Ordering::Release);
        self.posted.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a prefetch may take a slot: it leaves at least [`FAULT_RESERVE`] free for faults.
    pub fn has_room_for_prefetch(&self) -> bool {
        (self.claimed.load(Ordering::Acquire) as usize) < SLOTS - FAULT_RESERVE
    }

    /// Number of threads spinning on a slot now.
    pub fn spinners(&self) -> u32 {
        self.spinners.load(Ordering::Acquire)
    }

    /// Whether a local request is posted.
    pub fn has_posted(&self) -> bool {
        self.posted.load(Ordering::Acquire) > 0
    }

    /// Takes every posted local request, calling `f(waiter, page, write)` for each.
    pub fn take_posted(&self, mut f: impl FnMut(Waiter, u64, bool)) -> usize {
        if self.posted.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.local.load(Ordering::Acquire) && s.local.swap(false, Ordering::AcqRel) {
                self.posted.fetch_sub(1, Ordering::AcqRel);
                let w = Waiter { slot: i as u32, generation: s.generation.load(Ordering::Acquire) };
                f(w, s.page.load(Ordering::Acquire), s.write.load(Ordering::Acquire));
                n += 1;
            }
        }
        n
    }

    /// Hands `value` to the waiter `w` and completes its wait. Returns false if `w` is not
    /// waiting.
    pub fn complete_with(&self, w: Waiter, value: u64) -> bool {
        let Some(s) = self.live(w) else { return false };
        s.result.store(value, Ordering::Release);
        self.complete(w)
    }

    /// Marks the wait `w` done and wakes its waiter. Returns false if `w` is not waiting.
    pub fn complete(&self, w: Waiter) -> bool {
        let Some(s) = self.live(w) else { return false };
        if s.state.swap(DONE, Ordering::AcqRel) == SLEEPING {
            futex::wake(&s.state, 1);
        }
        true
    }

    /// Waits until slot `i` is done (spinning for `spin` first, calling `drive` meanwhile so the
    /// waiter can make progress itself; `after_spin(done)` runs when it stops spinning), then frees it.
    /// Returns the slot's `result`.
    pub fn wait_and_release(
        &self,
        w: Waiter,
        spin: Duration,
        drive: &mut dyn FnMut(),
        after_spin: &mut dyn FnMut(bool),
    ) -> u64 {
        let s = &self.slots[w.slot as usize];
        self.spinners.fetch_add(1, Ordering::AcqRel);
        let done = futex::spin_until(spin, || {
            drive();
            s.state.load(Ordering::Acquire) == DONE
        });
        self.spinners.fetch_sub(1, Ordering::AcqRel);
        after_spin(done);
        if !done {
            loop {
                match s.state.compare_exchange(WAITING, SLEEPING, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) | Err(SLEEPING) => futex::wait(&s.state, SLEEPING, None),
                    Err(_) => {}
                }
                if s.state.load(Ordering::Acquire) == DONE {
                    break;
                }
            }
        }
        let result = s.result.swap(0, Ordering::AcqRel);
        let dependent = s.dependent.swap(false, Ordering::AcqRel);
        s.state.store(0, Ordering::Release);
        s.claimed.store(false, Ordering::Release);
        self.claimed.fetch_sub(1, Ordering::AcqRel);
        if dependent {
            self.dependent.fetch_sub(1, Ordering::AcqRel);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn completion_wakes_a_sleeping_waiter() {
        let slots = Arc::new(Slots::default());
        let i = slots.claim_dependent();
        let s2 = slots.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(s2.complete(i));
        });
        slots.wait_and_release(i, Duration::from_micros(10), &mut || {}, &mut |_| {});
        t.join().unwrap();
        assert!(!slots.complete(i), "a released slot is not waiting");
        let again = slots.claim_for(5, true);
        let stale = Waiter { slot: again.slot, generation: again.generation.wrapping_sub(1) };
        assert!(!slots.complete(stale), "an answer to an earlier use of the slot is refused");
        assert!(!slots.waits_for_page(stale, 5));
        assert!(slots.waits_for_page(again, 5) && !slots.waits_for_page(again, 6));
        assert!(slots.complete_with(again, 42));
        assert_eq!(slots.wait_and_release(again, Duration::ZERO, &mut || {}, &mut |_| {}), 42);
    }

    #[test]
    fn waits_that_depend_on_other_threads_leave_slots_for_faults() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Waiter> = (0..SLOTS - FAULT_RESERVE).map(|_| slots.claim_dependent()).collect();
        // One more dependent wait has to wait for one of these to end ...
        let s2 = slots.clone();
        let late = std::thread::spawn(move || s2.claim_dependent());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!late.is_finished(), "a dependent wait took a slot kept for faults");
        // ... while every fault still gets a slot.
        let faults: Vec<Waiter> = (0..FAULT_RESERVE).map(|p| slots.claim_for(p as u64, false)).collect();
        for w in faults {
            assert!(slots.complete(w));
            slots.wait_and_release(w, Duration::ZERO, &mut || {}, &mut |_| {});
        }
        assert!(slots.complete(held[0]));
        slots.wait_and_release(held[0], Duration::ZERO, &mut || {}, &mut |_| {});
        let w = late.join().unwrap();
        assert!(slots.complete(w));
    }

    #[test]
    fn posted_requests_are_taken_once() {
        let slots = Slots::default();
        let a = slots.claim_for(77, true);
        slots.post_local(a);
        let mut seen = Vec::new();
        assert_eq!(slots.take_posted(|w, page, write| seen.push((w, page, write))), 1);
        assert_eq!(seen, vec![(a, 77, true)]);
        assert_eq!(slots.take_posted(|_, _, _| panic!("taken twice")), 0);
    }
}
