//! Global locks. At its home (lock `id`'s home is rank `id % ranks`, [`Locks`]): one holder rank,
//! waiters served in arrival order. At each rank ([`LockCache`]): a rank keeps a lock it released
//! (its *token*) until the home recalls it, so the next acquire by a thread of the same rank is
//! local, with no message at all.
//!
//! The home recalls a lock from its holder (`LockRecall`) as soon as another request queues
//! behind it, once per tenure (a tenure begins with a grant). The holder gives the token back
//! (`LockRelease`) at once if no thread of it holds the lock, else when that thread releases it.
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

/// A rank's view of one lock whose token it has or expects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Local {
    /// This rank holds the lock's token (the home's holder is this rank).
    token: bool,
    /// A thread of this rank holds the lock now.
    held: bool,
    /// The home asked for the token back: it goes at the next release.
    recalled: bool,
}

/// The locks this rank holds or keeps (see the module comment).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LockCache {
    locks: BTreeMap<u32, Local>,
}

impl LockCache {
    /// A thread of this rank wants lock `id`: takes it at once if this rank keeps it unused.
    /// Otherwise the thread asks the home (`LockAcquire`) and waits for its grant.
    pub fn try_local(&mut self, id: u32) -> bool {
        match self.locks.get_mut(&id) {
            Some(l) if l.token && !l.held => {
                l.held = true;
                true
            }
            _ => false,
        }
    }

    /// The home granted lock `id` to a thread of this rank, which holds it now.
    pub fn granted(&mut self, id: u32) {
        let l = self.locks.entry(id).or_default();
        l.token = true;
        l.held = true;
    }

    /// A thread of this rank releases lock `id`: the release to send to the home, if it was
    /// recalled (else the rank keeps the lock).
    pub fn release(&mut self, id: u32) -> Option<Msg> {
        let l = self.locks.get_mut(&id)?;
        l.held = false;
        if l.recalled {
            self.locks.remove(&id);
            return Some(Msg::LockRelease { id });
        }
        None
    }

    /// The home recalls lock `id`: the release to send now, if no thread holds it (else it goes
    /// at the release; and a recall that overtook its grant waits for the grant).
    pub fn recall(&mut self, id: u32) -> Option<Msg> {
        let l = self.locks.entry(id).or_default();
        if l.token && !l.held {
            self.locks.remove(&id);
            return Some(Msg::LockRelease { id });
        }
        l.recalled = true;
        None
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
        let mut c = LockCache::default();
        assert!(!c.try_local(5), "not ours yet: ask the home");
        c.granted(5);
        assert!(!c.try_local(5), "held by a thread");
        assert_eq!(c.release(5), None, "kept");
        assert!(c.try_local(5), "re-acquired locally");
        assert_eq!(c.recall(5), None, "held: it goes at the release");
        assert!(!c.try_local(5));
        assert_eq!(c.release(5), Some(Msg::LockRelease { id: 5 }));
        assert!(!c.try_local(5), "given back");
        // Kept unused: a recall gives it back at once.
        c.granted(6);
        assert_eq!(c.release(6), None);
        assert_eq!(c.recall(6), Some(Msg::LockRelease { id: 6 }));
        // A recall that overtakes its grant waits for it.
        assert_eq!(c.recall(7), None);
        c.granted(7);
        assert_eq!(c.release(7), Some(Msg::LockRelease { id: 7 }));
        // Leaving gives back what is kept.
        c.granted(8);
        c.release(8);
        c.granted(9);
        assert_eq!(c.give_back_all(), vec![Msg::LockRelease { id: 8 }]);
    }
}
