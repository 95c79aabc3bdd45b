//! How long a faulting thread spins for the answer to its page request before it sleeps, learnt
//! per thread. Spinning pays when the thread that answers can run meanwhile: a peer's service
//! thread on a free CPU answers within tens of microseconds, and the spin saves the sleep and the
//! wake-up. When every CPU computes (each rank of a job on 2 CPUs reading the other's rows at the
//! same moment), the answer needs a thread that is not running, and the spinning requester only
//! keeps it off a CPU until the spin ends.
//!
//! So each thread keeps a budget, at most `GALLOCY_SPIN_US` (the full spin):
//! - an answer that came while it spun leaves the budget as it is;
//! - an answer that came after it went to sleep, but within the full spin, doubles the budget
//!   (spinning longer would have caught it);
//! - an answer that took longer than the full spin halves it, down to [`FLOOR_SHARE`] of the
//!   full spin (still enough to catch an answer that is already on its way).
//!
//! Async-signal-safe: a `const` thread-local (no lazy initialisation, no destructor) and
//! arithmetic.

use std::cell::Cell;
use std::time::Duration;

/// The smallest budget, as a share of the full spin (1/16).
const FLOOR_SHARE: u64 = 16;

thread_local! {
    /// This thread's budget in ns; `u64::MAX`: the full spin (nothing learnt yet).
    static BUDGET_NS: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// How long this thread spins for its next answer, `full` at most.
pub fn budget(full: Duration) -> Duration {
    let full_ns = full.as_nanos() as u64;
    Duration::from_nanos(BUDGET_NS.with(|b| b.get()).min(full_ns))
}

/// Learns from one wait: the answer took `waited` in all, and came while the thread spun
/// (`in_spin`) or after it went to sleep.
pub fn learn(full: Duration, waited: Duration, in_spin: bool) {
    let full_ns = full.as_nanos() as u64;
    BUDGET_NS.with(|b| b.set(next_budget(full_ns, b.get().min(full_ns), waited.as_nanos() as u64, in_spin)));
}

/// The budget after a wait of `waited_ns` (see the module comment).
fn next_budget(full_ns: u64, budget_ns: u64, waited_ns: u64, in_spin: bool) -> u64 {
    let floor = full_ns / FLOOR_SHARE;
    if in_spin {
        budget_ns
    } else if waited_ns <= full_ns {
        budget_ns.max(floor).saturating_mul(2).min(full_ns)
    } else {
        (budget_ns / 2).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u64 = 100_000;

    #[test]
    fn answers_slower_than_the_full_spin_shrink_it_to_the_floor() {
        let mut b = FULL;
        let mut seen = vec![];
        for _ in 0..6 {
            b = next_budget(FULL, b, 230_000, false);
            seen.push(b);
        }
        assert_eq!(seen, vec![50_000, 25_000, 12_500, 6_250, 6_250, 6_250]);
    }

    #[test]
    fn an_answer_a_longer_spin_would_have_caught_grows_it_back() {
        let b = next_budget(FULL, FULL / FLOOR_SHARE, 40_000, false);
        assert_eq!(b, 12_500);
        assert_eq!(next_budget(FULL, b, 40_000, false), 25_000);
        assert_eq!(next_budget(FULL, 80_000, 40_000, false), FULL, "never past the full spin");
    }

    #[test]
    fn an_answer_caught_while_spinning_keeps_it() {
        assert_eq!(next_budget(FULL, 12_500, 9_000, true), 12_500);
        assert_eq!(next_budget(FULL, FULL, 30_000, true), FULL);
    }

    #[test]
    fn no_spin_configured_stays_no_spin() {
        assert_eq!(next_budget(0, 0, 50_000, false), 0);
        assert_eq!(next_budget(0, 0, 0, false), 0);
    }

    #[test]
    fn a_new_thread_spins_fully_and_learns() {
        let full = Duration::from_nanos(FULL);
        std::thread::spawn(move || {
            assert_eq!(budget(full), full);
            learn(full, Duration::from_micros(300), false);
            assert_eq!(budget(full), full / 2);
            assert_eq!(budget(full / 4), full / 4, "never past the full spin");
        })
        .join()
        .unwrap();
    }
}
