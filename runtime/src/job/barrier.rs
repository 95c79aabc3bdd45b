//! The job-wide barrier as this process runs it: the dissemination schedule of
//! [`crate::protocol::barrier`], the notices heard so far ([`BarrierBoard`]), and the wait of one
//! application thread ([`wait_for_all`]).
//!
//! A notice is recorded by whichever thread reads it: the waiting thread itself while it spins
//! on the sockets (no hand-off to the service thread on the path), another waiting thread, or
//! the service thread. The board is atomics only, so the fault path may record notices too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::fault::acquire::wait_for;
use crate::fault::slots::Slots;
use crate::job::runtime::{fatal, Runtime};
use crate::protocol::barrier::Dissemination;
use crate::protocol::{Msg, Rank, Violation, Waiter};

/// How long a waiter whose sender left looks again for a notice another thread may have read
/// but not yet recorded (notices come before the sender's goodbye on its link).
const GRACE: Duration = Duration::from_millis(20);

/// The barrier notices this rank heard, and who waits for which.
pub struct BarrierBoard {
    schedule: Dissemination,
    /// Per cell (round, epoch modulo the window): the last epoch heard.
    heard: Box<[AtomicU64]>,
    /// Per cell: the waiter for it (`slot << 32 | generation`, plus one; 0: none).
    waiting: Box<[AtomicU64]>,
    /// Ranks that left the job (they send no more notices).
    departed: Box<[AtomicBool]>,
}

fn pack(w: Waiter) -> u64 {
    ((u64::from(w.slot) << 32) | u64::from(w.generation)) + 1
}

fn unpack(v: u64) -> Waiter {
    let v = v - 1;
    Waiter { slot: (v >> 32) as u32, generation: v as u32 }
}

impl BarrierBoard {
    pub fn new(rank: Rank, ranks: usize) -> BarrierBoard {
        let schedule = Dissemination::new(rank, ranks);
        let cells = schedule.cells();
        BarrierBoard {
            schedule,
            heard: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            waiting: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            departed: (0..ranks).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Records a notice from `from` and wakes its waiter. Refuses (records nothing) a notice the
    /// schedule does not expect. Allocation-free and async-signal-safe.
    pub fn record(&self, slots: &Slots, from: Rank, epoch: u64, round: u32) -> Result<(), Violation> {
        let bad = Violation::UnexpectedBarrier { from, epoch, round };
        if round >= self.schedule.rounds() {
            return Err(bad);
        }
        let cell = self.schedule.cell(round, epoch);
        let last = self.heard[cell].load(Ordering::SeqCst);
        self.schedule.check(from, round, epoch, last)?;
        // Two readers of one duplicated notice: only one records it.
        self.heard[cell].compare_exchange(last, epoch, Ordering::SeqCst, Ordering::SeqCst).map_err(|_| bad)?;
        let w = self.waiting[cell].swap(0, Ordering::SeqCst);
        if w != 0 {
            slots.complete(unpack(w));
        }
        Ok(())
    }

    /// Rank `rank` left the job: wakes whoever waits for its notices.
    pub fn departed(&self, slots: &Slots, rank: Rank) {
        let Some(d) = self.departed.get(rank) else { return };
        d.store(true, Ordering::SeqCst);
        for round in self.schedule.rounds_waiting_for(rank) {
            for epoch in 0..crate::protocol::barrier::WINDOW {
                let w = self.waiting[self.schedule.cell(round, epoch)].swap(0, Ordering::SeqCst);
                if w != 0 {
                    slots.complete(unpack(w));
                }
            }
        }
    }

    fn has_departed(&self, rank: Rank) -> bool {
        self.departed.get(rank).is_some_and(|d| d.load(Ordering::SeqCst))
    }

    fn heard(&self, round: u32, epoch: u64) -> bool {
        self.heard[self.schedule.cell(round, epoch)].load(Ordering::SeqCst) >= epoch
    }
}

/// Waits until every rank of the job has reached this barrier.
pub fn wait_for_all(rt: &Runtime) {
    let epoch = rt.collectives().next_barrier_epoch();
    let board = rt.collectives().board();
    let schedule = board.schedule;
    for round in 0..schedule.rounds() {
        let to = schedule.to(round);
        if board.has_departed(to) {
            left(rt, to, epoch);
        }
        rt.send_from_app(to, Msg::BarrierNotice { epoch, round });
        let from = schedule.from(round);
        while !board.heard(round, epoch) {
            if board.has_departed(from) {
                std::thread::sleep(GRACE);
                if !board.heard(round, epoch) {
                    left(rt, from, epoch);
                }
                break;
            }
            let waiter = rt.slots().claim_dependent();
            let cell = schedule.cell(round, epoch);
            board.waiting[cell].store(pack(waiter), Ordering::SeqCst);
            // A notice (or a goodbye) recorded before we registered finds no waiter: look again.
            if board.heard(round, epoch) || board.has_departed(from) {
                let _ = board.waiting[cell].compare_exchange(pack(waiter), 0, Ordering::SeqCst, Ordering::SeqCst);
                rt.slots().complete(waiter);
            }
            wait_for(rt, waiter);
        }
    }
}

/// Ends the process: `rank` left the job, so barrier `epoch` can never complete.
fn left(rt: &Runtime, rank: Rank, epoch: u64) -> ! {
    fatal(
        rt,
        &format!(
            "rank {rank} left the job (gallocy_finalize) while this rank waits for it in barrier {epoch}: every rank must call gallocy_barrier equally often"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_wakes_its_waiter_once_and_only_from_its_sender() {
        let slots = Slots::default();
        let board = BarrierBoard::new(1, 3); // round 0 from rank 0, round 1 from rank 2
        let w = slots.claim_dependent();
        let cell = board.schedule.cell(0, 1);
        board.waiting[cell].store(pack(w), Ordering::SeqCst);
        assert!(board.record(&slots, 2, 1, 0).is_err(), "rank 2 does not tell rank 1 in round 0");
        assert!(!board.heard(0, 1));
        board.record(&slots, 0, 1, 0).unwrap();
        assert!(board.heard(0, 1) && !board.heard(0, 2) && !board.heard(1, 1));
        assert!(!slots.complete(Waiter { slot: w.slot, generation: w.generation + 1 }));
        slots.wait_and_release(w, Duration::ZERO, &mut || {}, &mut |_| {});
        assert_eq!(
            board.record(&slots, 0, 1, 0),
            Err(Violation::UnexpectedBarrier { from: 0, epoch: 1, round: 0 }),
            "a notice heard twice"
        );
        assert!(board.record(&slots, 2, 7, 1).is_ok(), "a later epoch may come first");
        assert!(board.record(&slots, 0, 1, 2).is_err(), "no round 2 in a 3-rank job");
    }

    #[test]
    fn a_departure_wakes_who_waits_for_the_departed() {
        let slots = Slots::default();
        let board = BarrierBoard::new(0, 2);
        let w = slots.claim_dependent();
        board.waiting[board.schedule.cell(0, 5)].store(pack(w), Ordering::SeqCst);
        board.departed(&slots, 1);
        assert!(board.has_departed(1) && !board.has_departed(0));
        slots.wait_and_release(w, Duration::ZERO, &mut || {}, &mut |_| {});
        assert!(!board.heard(0, 5));
        assert_eq!(unpack(pack(w)), w);
    }
}
