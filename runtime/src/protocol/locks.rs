//! Global locks at their home (lock `id`'s home is rank `id % ranks`): one holder, waiters
//! served in arrival order.

use std::collections::{BTreeMap, VecDeque};

use super::directory::Send;
use super::msg::{Msg, Rank, Waiter};
use super::violation::Violation;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct LockHome {
    holder: Option<Rank>,
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
        if l.holder.is_none() {
            l.holder = Some(from);
            out.push(Send { to: from, msg: Msg::LockGranted { id, waiter } });
        } else {
            l.queue.push_back((from, waiter));
        }
    }

    /// Rank `from` releases lock `id`; the next waiter gets it.
    pub fn release(&mut self, from: Rank, id: u32, out: &mut Vec<Send>) -> Result<(), Violation> {
        let l = self.locks.entry(id).or_default();
        if l.holder != Some(from) {
            return Err(Violation::LockNotHeld { from, id });
        }
        l.holder = None;
        if let Some((next, waiter)) = l.queue.pop_front() {
            l.holder = Some(next);
            out.push(Send { to: next, msg: Msg::LockGranted { id, waiter } });
        }
        Ok(())
    }

    /// The rank holding lock `id`.
    pub fn holder(&self, id: u32) -> Option<Rank> {
        self.locks.get(&id).and_then(|l| l.holder)
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
        l.acquire(0, 5, w(3), &mut out);
        assert!(out.is_empty(), "held: the others wait");
        assert_eq!(l.release(2, 5, &mut out), Err(Violation::LockNotHeld { from: 2, id: 5 }));
        l.release(1, 5, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 2, msg: Msg::LockGranted { id: 5, waiter: w(2) } }]);
        out.clear();
        l.release(2, 5, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 0, msg: Msg::LockGranted { id: 5, waiter: w(3) } }]);
        out.clear();
        l.release(0, 5, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(l.holder(5), None);
        assert_eq!(l.release(0, 5, &mut out), Err(Violation::LockNotHeld { from: 0, id: 5 }));
    }
}
