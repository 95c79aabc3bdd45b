//! Synchronization across the job: barriers, global locks, broadcasts, collective allocations.

use std::sync::Mutex;

use crate::fault::acquire::wait_for;
use crate::heap::alloc::RuntimeScope;
use crate::protocol::{wire, Msg};

use super::member;

/// Waits until every process of the job has called `barrier` (one thread per process calls it).
pub fn barrier() {
    let rt = member("gallocy::barrier");
    if rt.size() == 1 {
        return;
    }
    let _s = RuntimeScope::enter();
    crate::job::barrier::wait_for_all(rt);
}

static HELD_LOCKS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Acquires global lock `id`: at most one thread in the whole job holds it; waiters are served
/// in arrival order at the lock's home.
pub fn lock(id: u32) {
    let rt = member("gallocy::lock");
    let _s = RuntimeScope::enter();
    if rt.size() > 1 {
        let waiter = rt.slots().claim();
        rt.send_from_app(id as usize % rt.size(), Msg::LockAcquire { id, waiter });
        wait_for(rt, waiter);
    } else {
        while HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner()).contains(&id) {
            std::thread::yield_now();
        }
    }
    HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner()).push(id);
}

/// Releases global lock `id`. Panics if this process does not hold it.
pub fn unlock(id: u32) {
    let rt = member("gallocy::unlock");
    let _s = RuntimeScope::enter();
    {
        let mut held = HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
        match held.iter().position(|h| *h == id) {
            Some(i) => {
                held.swap_remove(i);
            }
            None => panic!("gallocy: rank {}: unlock({id}) but this process does not hold global lock {id}", rt.rank()),
        }
    }
    if rt.size() > 1 {
        rt.send_from_app(id as usize % rt.size(), Msg::LockRelease { id });
    }
}

/// Every rank calls this with the same `size`; every rank gets the same pointer to `size`
/// zero-filled bytes of the shared heap (allocated in rank 0's arena).
pub fn alloc_collective(size: usize) -> *mut u8 {
    let rt = member("gallocy::alloc_collective");
    let mut p = if rt.rank() == 0 { super::memory::calloc(1, size) as u64 } else { 0 };
    let mut bytes = p.to_le_bytes();
    broadcast(&mut bytes, 0);
    p = u64::from_le_bytes(bytes);
    p as *mut u8
}

/// Copies `buf` of rank `root` into `buf` of every other rank. Every rank calls it, in the same
/// order, with buffers of the same length.
pub fn broadcast(buf: &mut [u8], root: usize) {
    let rt = member("gallocy::broadcast");
    assert!(root < rt.size(), "gallocy: broadcast root {root} is not a rank of a {}-process job", rt.size());
    if rt.size() == 1 {
        return;
    }
    let _s = RuntimeScope::enter();
    let seq = rt.collectives().next_broadcast_seq();
    if rt.rank() == root {
        let total = buf.len() as u64;
        for to in (0..rt.size()).filter(|r| *r != root) {
            let mut offset = 0;
            loop {
                let end = (offset + wire::BROADCAST_CHUNK).min(buf.len());
                rt.send_with_payload(to, Msg::Broadcast { seq, total, offset: offset as u64 }, &buf[offset..end]);
                offset = end;
                if offset >= buf.len() {
                    break;
                }
            }
        }
    } else {
        let data = rt.collectives().sync().take_broadcast(seq);
        assert_eq!(
            data.len(),
            buf.len(),
            "gallocy: rank {}: broadcast length mismatch: root {root} sent {} bytes, this rank passed a buffer of {}",
            rt.rank(),
            data.len(),
            buf.len()
        );
        buf.copy_from_slice(&data);
    }
}
