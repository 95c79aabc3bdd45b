//! Global locks. At its home (lock `id`'s home is rank `id % ranks`, [`Locks`]): one holder rank,
//! waiters served in arrival order. At each rank ([`LockCache`]): a rank keeps a lock it released
//! (its *token*) until the home recalls it, so the next acquire by a thread of the same rank is
//! local, with no message at all.
//!
//! The home recalls a lock from its holder (`LockRecall`) as soon as another request queues
//! behind it, once per tenure (a tenure begins with a grant). The holder gives the token back
//! (`LockRelease`) when no thread of it holds the lock, with one exception that keeps a busy lock
//! from moving on every use: a lock in use when the recall comes (held, or released less than
//! [`GRACE_NS`] before) gets a grace of [`GRACE_NS`] (from the recall, or from the release that
//! ends the hold), in which threads of this rank may take it again up to [`GRACE_USES`] times;
//! it goes at the first release after the grace or those uses, or when the grace ends with
//! nobody holding it ([`LockCache::expired`], called by the service thread). So a rank that
//! waits for a lock waits at most the critical section under way, the grace and the sections
//! in it.
//! A recall can overtake the grant it follows (a waiting thread may read the grant itself while
//! the service thread reads the recall): the cache then remembers it for the grant.

use std::collections::{BTreeMap, VecDeque};

use super::directory::Send;
use super::msg::{Msg, Rank, Waiter};
use super::violation::Violation;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct LockHome {
    holder: Option<Rank>,
    /// The holder has been asked to give the lock back (this tenure).
    recalled: bool,
    queue: VecDeque<(Rank, Waiter)>,
}

/// The locks this rank is home of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locks {
    locks: BTreeMap<u32, LockHome>,
}

impl Locks {
    /// Rank `from`'s thread `waiter` asks for lock `id`.
    pub fn acquire(&mut self, from: Rank, id: u32, waiter: Waiter, out: &mut Vec<Send>) {
        let l = self.locks.entry(id).or_default();
        match l.holder {
            None => {
                l.holder = Some(from);
                out.push(Send { to: from, msg: Msg::LockGranted { id, waiter } });
            }
            Some(holder) => {
                l.queue.push_back((from, waiter));
                if !l.recalled {
                    l.recalled = true;
                    out.push(Send { to: holder, msg: Msg::LockRecall { id } });
                }
            }
        }
    }

    /// Rank `from` releases lock `id`; the next waiter gets it.
    pub fn release(&mut self, from: Rank, id: u32, out: &mut Vec<Send>) -> Result<(), Violation> {
        let l = self.locks.entry(id).or_default();
        if l.holder != Some(from) {
            return Err(Violation::LockNotHeld { from, id });
        }
        l.holder = None;
        l.recalled = false;
        if let Some((next, waiter)) = l.queue.pop_front() {
            l.holder = Some(next);
            out.push(Send { to: next, msg: Msg::LockGranted { id, waiter } });
            if !l.queue.is_empty() {
                // Others wait already: the new holder gives it back after one use.
                l.recalled = true;
                out.push(Send { to: next, msg: Msg::LockRecall { id } });
            }
        }
        Ok(())
    }

    /// The rank holding lock `id`.
    pub fn holder(&self, id: u32) -> Option<Rank> {
        self.locks.get(&id).and_then(|l| l.holder)
    }
}

/// How long a rank keeps a recalled lock that it used recently, in ns: its threads may take it
/// again meanwhile (see the module comment).
pub const GRACE_NS: u64 = 50_000;
/// How many times a rank's threads may take a recalled lock again in its grace.
pub const GRACE_USES: u32 = 16;

/// A rank's view of one lock whose token it has or expects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Local {
    /// This rank holds the lock's token (the home's holder is this rank).
    token: bool,
    /// A thread of this rank holds the lock now.
    held: bool,
    /// The home asked for the token back: it goes at the next release (or when the grace ends).
    recalled: bool,
    /// When a thread of this rank last released it (ns, the caller's clock).
    released_at: Option<u64>,
    /// The end of the grace after a recall (0: none).
    grace_until: u64,
    /// Recalled while held: the grace starts at the release.
    grace_at_release: bool,
    /// Takes since the recall.
    grace_uses: u32,
}

impl Local {
    /// In its grace, with takes left, at `now`.
    fn in_grace(&self, now: u64) -> bool {
        self.recalled && now < self.grace_until && self.grace_uses < GRACE_USES
    }
}

/// How a thread took a lock its rank keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalTake {
    /// Nobody asked for it since this rank's last use.
    Kept,
    /// Its home recalled it; this take is one of the grace's.
    InGrace,
}

/// The locks this rank holds or keeps (see the module comment). Times are the caller's clock in
/// ns (the model checker passes one time throughout, so every recall after a use starts a grace
/// that only [`LockCache::expired`] with a later time ends).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LockCache {
    locks: BTreeMap<u32, Local>,
}

impl LockCache {
    /// A thread of this rank wants lock `id`: takes it at once if this rank keeps it unused (and,
    /// if it was recalled, in its grace). Otherwise the thread asks the home (`LockAcquire`) and
    /// waits for its grant.
    pub fn try_local(&mut self, id: u32, now: u64) -> Option<LocalTake> {
        match self.locks.get_mut(&id) {
            Some(l) if l.token && !l.held && (!l.recalled || l.in_grace(now)) => {
                l.held = true;
                if l.recalled {
                    l.grace_uses += 1;
                    return Some(LocalTake::InGrace);
                }
                Some(LocalTake::Kept)
            }
            _ => None,
        }
    }

    /// The home granted lock `id` to a thread of this rank, which holds it now.
    pub fn granted(&mut self, id: u32) {
        let l = self.locks.entry(id).or_default();
        l.token = true;
        l.held = true;
    }

    /// A thread of this rank releases lock `id` at `now`: the release to send to the home, if it
    /// was recalled and its grace is over (else the rank keeps the lock).
    pub fn release(&mut self, id: u32, now: u64) -> Option<Msg> {
        let l = self.locks.get_mut(&id)?;
        l.held = false;
        l.released_at = Some(now);
        if l.grace_at_release {
            l.grace_at_release = false;
            l.grace_until = now.saturating_add(GRACE_NS);
        }
        if l.recalled && !l.in_grace(now) {
            self.locks.remove(&id);
            return Some(Msg::LockRelease { id });
        }
        None
    }

    /// The home recalls lock `id` at `now`: the release to send now, if no thread holds it and
    /// this rank did not use it in the last [`GRACE_NS`] (else it goes at a release or when the
    /// grace ends; and a recall that overtook its grant waits for the grant, with no grace).
    pub fn recall(&mut self, id: u32, now: u64) -> Option<Msg> {
        let l = self.locks.entry(id).or_default();
        let recently_used = l.token && l.released_at.is_some_and(|t| now.saturating_sub(t) < GRACE_NS);
        if l.token && !l.held && !recently_used {
            self.locks.remove(&id);
            return Some(Msg::LockRelease { id });
        }
        l.recalled = true;
        l.grace_uses = 0;
        if l.token && l.held {
            l.grace_at_release = true;
        } else if recently_used {
            l.grace_until = now.saturating_add(GRACE_NS);
        }
        None
    }

    /// The releases of recalled locks whose grace is over at `now` and that no thread holds.
    pub fn expired(&mut self, now: u64) -> Vec<Msg> {
        let over: Vec<u32> = self
            .locks
            .iter()
            .filter(|(_, l)| l.token && !l.held && l.recalled && !l.in_grace(now))
            .map(|(id, _)| *id)
            .collect();
        over.into_iter()
            .map(|id| {
                self.locks.remove(&id);
                Msg::LockRelease { id }
            })
            .collect()
    }

    /// The earliest end of a grace that [`LockCache::expired`] still has to act on (`None`:
    /// none): every grace of a lock nobody holds, even one that ended already (it is still
    /// kept), and the graces after `now` of held locks (a held lock whose grace ended goes at
    /// its release).
    pub fn next_grace_end(&self, now: u64) -> Option<u64> {
        self.locks
            .values()
            .filter(|l| l.token && l.recalled && l.grace_until != 0 && (!l.held || l.grace_until > now))
            .map(|l| l.grace_until)
            .min()
    }

    /// Gives back every lock this rank keeps unused (a rank leaving the job).
    pub fn give_back_all(&mut self) -> Vec<Msg> {
        let unused: Vec<u32> = self.locks.iter().filter(|(_, l)| l.token && !l.held).map(|(id, _)| *id).collect();
        unused
            .into_iter()
            .map(|id| {
                self.locks.remove(&id);
                Msg::LockRelease { id }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(slot: u32) -> Waiter {
        Waiter { slot, generation: 1 }
    }

    #[test]
    fn one_holder_and_waiters_in_order() {
        let mut l = Locks::default();
        let mut out = Vec::new();
        l.acquire(1, 5, w(1), &mut out);
        assert_eq!(out, vec![Send { to: 1, msg: Msg::LockGranted { id: 5, waiter: w(1) } }]);
        out.clear();
        l.acquire(2, 5, w(2), &mut out);
        assert_eq!(out, vec![Send { to: 1, msg: Msg::LockRecall { id: 5 } }], "the holder is asked to give it back");
        out.clear();
        l.acquire(0, 5, w(3), &mut out);
        assert!(out.is_empty(), "held and recalled already: the others wait");
        assert_eq!(l.release(2, 5, &mut out), Err(Violation::LockNotHeld { from: 2, id: 5 }));
        l.release(1, 5, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Send { to: 2, msg: Msg::LockGranted { id: 5, waiter: w(2) } },
                Send { to: 2, msg: Msg::LockRecall { id: 5 } }
            ],
            "rank 0 still waits: the new holder gives it back after one use"
        );
        out.clear();
        l.release(2, 5, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 0, msg: Msg::LockGranted { id: 5, waiter: w(3) } }]);
        out.clear();
        l.release(0, 5, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(l.holder(5), None);
        assert_eq!(l.release(0, 5, &mut out), Err(Violation::LockNotHeld { from: 0, id: 5 }));
    }

    #[test]
    fn a_rank_keeps_a_released_lock_until_it_is_recalled() {
        // Times far apart: no recall comes within the grace of a use.
        let far = 10 * GRACE_NS;
        let mut c = LockCache::default();
        assert!(c.try_local(5, 0).is_none(), "not ours yet: ask the home");
        c.granted(5);
        assert!(c.try_local(5, 0).is_none(), "held by a thread");
        assert_eq!(c.release(5, 0), None, "kept");
        assert_eq!(c.try_local(5, far), Some(LocalTake::Kept), "re-acquired locally");
        assert_eq!(c.recall(5, 2 * far), None, "held: it does not go now");
        assert!(c.try_local(5, 2 * far).is_none());
        assert_eq!(c.release(5, 2 * far), None, "held at the recall: a grace from the release");
        assert_eq!(c.next_grace_end(2 * far), Some(2 * far + GRACE_NS));
        assert_eq!(c.expired(2 * far + GRACE_NS), vec![Msg::LockRelease { id: 5 }]);
        assert!(c.try_local(5, 3 * far).is_none(), "given back");
        // Kept unused since long: a recall gives it back at once.
        c.granted(6);
        assert_eq!(c.release(6, 0), None);
        assert_eq!(c.recall(6, far), Some(Msg::LockRelease { id: 6 }));
        // A recall that overtakes its grant waits for it.
        assert_eq!(c.recall(7, 0), None);
        c.granted(7);
        assert_eq!(c.release(7, 0), Some(Msg::LockRelease { id: 7 }));
        // Leaving gives back what is kept.
        c.granted(8);
        c.release(8, 0);
        c.granted(9);
        assert_eq!(c.give_back_all(), vec![Msg::LockRelease { id: 8 }]);
        assert_eq!(c.next_grace_end(0), None, "no recall came within a grace");
    }

    #[test]
    fn a_lock_used_just_before_its_recall_stays_for_a_bounded_grace() {
        let mut c = LockCache::default();
        c.granted(5);
        assert_eq!(c.release(5, 1_000), None);
        // Recalled 10 µs after a use: kept for the grace.
        assert_eq!(c.recall(5, 11_000), None, "used just now: a grace");
        let end = 11_000 + GRACE_NS;
        assert_eq!(c.next_grace_end(11_000), Some(end));
        for k in 1..GRACE_USES {
            assert_eq!(c.try_local(5, 12_000), Some(LocalTake::InGrace), "take {k} in the grace is local");
            assert_eq!(c.release(5, 12_000), None, "and kept after it");
        }
        assert_eq!(c.expired(12_000), vec![], "the grace still runs");
        assert!(c.try_local(5, 12_000).is_some(), "the last take of the grace");
        assert_eq!(c.release(5, 12_000), Some(Msg::LockRelease { id: 5 }), "no more than GRACE_USES takes");
        assert!(c.try_local(5, 12_000).is_none(), "given back");
        assert_eq!(c.expired(end), vec![]);

        // Nobody takes it again: the grace's end gives it back.
        c.granted(4);
        assert_eq!(c.release(4, 1_000), None);
        assert_eq!(c.recall(4, 2_000), None);
        assert_eq!(c.expired(2_000 + GRACE_NS - 1), vec![], "the grace still runs");
        assert_eq!(c.expired(2_000 + GRACE_NS), vec![Msg::LockRelease { id: 4 }], "its end gives the lock back");
        assert_eq!(c.next_grace_end(2_000 + GRACE_NS), None);

        // A release after the grace's end gives it back.
        c.granted(6);
        assert_eq!(c.release(6, 1_000), None);
        assert_eq!(c.recall(6, 2_000), None);
        assert!(c.try_local(6, 3_000).is_some());
        assert_eq!(c.release(6, 2_000 + GRACE_NS), Some(Msg::LockRelease { id: 6 }));

        // Held when its grace ends: the end gives nothing back, the release does.
        c.granted(7);
        assert_eq!(c.release(7, 1_000), None);
        assert_eq!(c.recall(7, 2_000), None);
        assert!(c.try_local(7, 3_000).is_some());
        assert_eq!(c.next_grace_end(3_000), Some(2_000 + GRACE_NS), "a grace from the recall");
        assert_eq!(c.expired(2_000 + GRACE_NS), vec![], "held");
        assert_eq!(c.next_grace_end(2_000 + GRACE_NS), None, "no grace left to wait for");
        assert!(c.try_local(7, 2_000 + GRACE_NS).is_none());
        assert_eq!(c.release(7, 2_000 + GRACE_NS), Some(Msg::LockRelease { id: 7 }));
        assert!(c.try_local(7, 2_000 + GRACE_NS).is_none(), "given back");

        // Recalled while a long hold runs: the grace starts at its release.
        c.granted(8);
        assert_eq!(c.recall(8, 1_000), None);
        let released = 1_000 + 10 * GRACE_NS;
        assert_eq!(c.release(8, released), None, "kept for a grace from the release");
        assert!(c.try_local(8, released + 1).is_some(), "taken again in it");
        assert_eq!(c.release(8, released + GRACE_NS), Some(Msg::LockRelease { id: 8 }), "goes after it");

        // A grace that ended while another lock's recall came in is still due: the service
        // thread must learn of it (it recomputes the next end after every recall).
        c.granted(10);
        c.granted(11);
        assert_eq!(c.release(10, 1_000), None);
        assert_eq!(c.release(11, 1_000), None);
        assert_eq!(c.recall(10, 2_000), None, "a grace for lock 10");
        let late = 2_000 + 2 * GRACE_NS;
        assert_eq!(c.recall(11, late), Some(Msg::LockRelease { id: 11 }), "lock 11 unused for long");
        assert_eq!(c.next_grace_end(late), Some(2_000 + GRACE_NS), "lock 10's grace is over but not acted on");
        assert_eq!(c.expired(late), vec![Msg::LockRelease { id: 10 }]);
        assert_eq!(c.next_grace_end(late), None);

        // A recall that overtook its grant gives no grace.
        assert_eq!(c.recall(9, 0), None);
        c.granted(9);
        assert_eq!(c.release(9, 1), Some(Msg::LockRelease { id: 9 }));
    }
}
