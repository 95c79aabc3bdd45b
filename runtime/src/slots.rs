//! Pre-allocated wait slots: a thread that waits for an answer from the service thread (a page
//! grant, a lock grant) claims a slot, names it in its request, and spins, then sleeps on it.
//! Everything here is allocation-free and async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::futex;

/// Number of slots: the most concurrent waits one process can have.
pub const SLOTS: usize = 512;

const WAITING: u32 = 1;
const SLEEPING: u32 = 2;
const DONE: u32 = 3;

/// One wait.
pub struct Slot {
    claimed: AtomicBool,
    state: AtomicU32,
    /// A fault request for the local home is posted in this slot.
    local: AtomicBool,
    pub page: AtomicU64,
    pub write: AtomicBool,
    /// A value the completer hands the waiter.
    pub result: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            claimed: AtomicBool::new(false),
            state: AtomicU32::new(0),
            local: AtomicBool::new(false),
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
    pub spinners: AtomicU32,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            posted: AtomicU32::new(0),
            spinners: AtomicU32::new(0),
        }
    }
}

impl Slots {
    /// Claims a free slot, marked waiting.
    pub fn claim(&self) -> u32 {
        let start = (crate::clock::now_ns() as usize / 64) % SLOTS;
        loop {
            for k in 0..SLOTS {
                let i = (start + k) % SLOTS;
                let s = &self.slots[i];
                if !s.claimed.load(Ordering::Relaxed)
                    && s.claimed.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()
                {
                    s.state.store(WAITING, Ordering::Release);
                    return i as u32;
                }
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// The slot with index `i`, if valid.
    pub fn get(&self, i: u32) -> Option<&Slot> {
        self.slots.get(i as usize)
    }

    /// Posts a request for the local service thread in slot `i`.
    pub fn post_local(&self, i: u32) {
        self.slots[i as usize].local.store(true, Ordering::Release);
        self.posted.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a local request is posted.
    pub fn has_posted(&self) -> bool {
        self.posted.load(Ordering::Acquire) > 0
    }

    /// Takes every posted local request, calling `f(slot index)` for each.
    pub fn take_posted(&self, mut f: impl FnMut(u32, &Slot)) -> usize {
        if self.posted.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.local.load(Ordering::Acquire) && s.local.swap(false, Ordering::AcqRel) {
                self.posted.fetch_sub(1, Ordering::AcqRel);
                f(i as u32, s);
                n += 1;
            }
        }
        n
    }

    /// Marks slot `i` done and wakes its waiter. Returns false if the slot was not waiting.
    pub fn complete(&self, i: u32) -> bool {
        let Some(s) = self.get(i) else { return false };
        if !s.claimed.load(Ordering::Acquire) {
            return false;
        }
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
        i: u32,
        spin: Duration,
        drive: &mut dyn FnMut(),
        after_spin: &mut dyn FnMut(bool),
    ) -> u64 {
        let s = &self.slots[i as usize];
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
        s.state.store(0, Ordering::Release);
        s.claimed.store(false, Ordering::Release);
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
        let i = slots.claim();
        let s2 = slots.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(s2.complete(i));
        });
        slots.wait_and_release(i, Duration::from_micros(10), &mut || {}, &mut |_| {});
        t.join().unwrap();
        assert!(!slots.complete(i), "a released slot is not waiting");
    }

    #[test]
    fn posted_requests_are_taken_once() {
        let slots = Slots::default();
        let a = slots.claim();
        slots.get(a).unwrap().page.store(77, Ordering::Relaxed);
        slots.post_local(a);
        let mut seen = Vec::new();
        assert_eq!(slots.take_posted(|i, s| seen.push((i, s.page.load(Ordering::Relaxed)))), 1);
        assert_eq!(seen, vec![(a, 77)]);
        assert_eq!(slots.take_posted(|_, _| panic!("taken twice")), 0);
    }
}
