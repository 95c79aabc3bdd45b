//! Synchronization across the job: barriers, global locks, broadcasts, collective allocations.

use std::sync::Mutex;

use crate::fault::acquire::wait_for;
use crate::heap::alloc::RuntimeScope;
use crate::heap::region::Access;
use crate::job::runtime::{fatal, Runtime};
use crate::protocol::locks::LocalTake;
use crate::protocol::placement::Policy;
use crate::protocol::{wire, Msg};
use crate::release;

use super::member;

/// Waits until every process of the job has called `barrier` (one thread per process calls it).
/// Under release consistency a barrier is a release, then an acquire: afterwards every rank sees
/// every write made anywhere before the barrier.
pub fn barrier() {
    let rt = member("gallocy::barrier");
    if rt.size() == 1 {
        return;
    }
    let _s = RuntimeScope::enter();
    release::release(rt);
    crate::job::barrier::wait_for_all(rt);
    release::acquire(rt);
}

/// Global locks this process holds: (lock id, the thread that took it).
static HELD_LOCKS: Mutex<Vec<(u32, libc::pid_t)>> = Mutex::new(Vec::new());

fn this_thread() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Acquires global lock `id`: at most one thread in the whole job holds it; waiters are served
/// in arrival order at the lock's home. A rank keeps a lock it released until another rank asks
/// for it, so taking it again on the same rank costs no message. A thread that asks again for a
/// lock it holds would wait for itself forever: that ends the process with a clear message
/// instead.
pub fn lock(id: u32) {
    let rt = member("gallocy::lock");
    let _s = RuntimeScope::enter();
    let me = this_thread();
    if HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner()).contains(&(id, me)) {
        fatal(rt, &format!("lock({id}) by a thread that already holds global lock {id} (it would wait for itself)"));
    }
    if rt.size() > 1 {
        let local = rt.lock_cache().try_local(id, crate::sys::clock::now_ns());
        if let Some(take) = local {
            rt.stats().count(&rt.stats().locks_local, 1);
            if take == LocalTake::InGrace {
                rt.stats().count(&rt.stats().locks_in_grace, 1);
            }
        } else {
            let waiter = rt.slots().claim_dependent();
            rt.send_from_app(id as usize % rt.size(), Msg::LockAcquire { id, waiter });
            wait_for(rt, waiter);
            rt.lock_cache().granted(id);
            // The lock comes from another rank: see what its holders wrote (release consistency;
            // a lock kept here since our own release brings nothing new).
            release::acquire(rt);
        }
        HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner()).push((id, me));
        return;
    }
    // One process: the table is the lock (checked and taken under one acquisition).
    loop {
        {
            let mut held = HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
            if !held.iter().any(|(h, _)| *h == id) {
                held.push((id, me));
                return;
            }
        }
        std::thread::yield_now();
    }
}

/// Releases global lock `id`. Releasing a lock this process does not hold ends the process with a
/// clear message.
pub fn unlock(id: u32) {
    let rt = member("gallocy::unlock");
    let _s = RuntimeScope::enter();
    {
        let me = this_thread();
        let mut held = HELD_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
        // The thread's own hold first; another thread of the process may also release it.
        let mine = held.iter().position(|h| *h == (id, me));
        match mine.or_else(|| held.iter().position(|(h, _)| *h == id)) {
            Some(i) => {
                held.swap_remove(i);
            }
            None => fatal(rt, &format!("unlock({id}), but this process does not hold global lock {id}")),
        }
    }
    if rt.size() > 1 {
        // Our writes reach their homes before anybody can take the lock after us.
        release::release(rt);
        let (release, grace) = {
            let mut cache = rt.lock_cache();
            let now = crate::sys::clock::now_ns();
            let release = cache.release(id, now);
            let grace = cache.next_grace_end(now);
            rt.service().set_grace_end(grace);
            (release, grace)
        };
        if let Some(msg) = release {
            rt.send_from_app(id as usize % rt.size(), msg);
        } else if grace.is_some() && (rt.service().sleeping() || rt.service().deaf()) {
            // The service thread gives the lock back when the grace ends: it must not sleep
            // past that.
            if let Some(t) = rt.transport() {
                t.wake();
            }
        }
    }
}

/// Gives every global lock this rank keeps unused back to its home (a rank leaving the job).
pub(crate) fn give_back_locks(rt: &Runtime) {
    let releases = rt.lock_cache().give_back_all();
    for msg in releases {
        if let Msg::LockRelease { id } = msg {
            rt.send_from_app(id as usize % rt.size(), msg);
        }
    }
}

/// Every rank calls this with the same `size`; every rank gets the same pointer to `size`
/// zero-filled bytes of the shared heap (allocated in rank 0's arena).
/// A rank that passes another size than rank 0 ends with a clear message.
///
/// Allocations of a page or more are placed by `GALLOCY_PLACEMENT` (see
/// [`crate::protocol::placement`]): by default (`block`) the pages are split into one block per
/// rank, in rank order, and each rank is home and owner of its block from the start.
pub fn alloc_collective(size: usize) -> *mut u8 {
    let rt = member("gallocy::alloc_collective");
    let policy = rt.placement().policy();
    let wants_placing = rt.size() > 1 && policy != Policy::Cyclic && size >= rt.region().page;
    let (p, placed) = if rt.rank() != 0 {
        (0, false)
    } else if wants_placing {
        // Fresh pages: zero everywhere and never asked for, so their homes may still change.
        match rt.alloc().alloc_fresh(size) {
            Ok(a) => (a as u64, true),
            Err(_) => (super::memory::calloc(1, size) as u64, false),
        }
    } else {
        (super::memory::calloc(1, size) as u64, false)
    };
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&p.to_le_bytes());
    bytes[8..16].copy_from_slice(&(size as u64).to_le_bytes());
    bytes[16..].copy_from_slice(&u64::from(placed).to_le_bytes());
    broadcast(&mut bytes, 0);
    let (p, root_size, placed) = (read_u64(&bytes[..8]), read_u64(&bytes[8..16]), read_u64(&bytes[16..]) == 1);
    if root_size != size as u64 {
        fatal(rt, &format!("alloc_collective({size}) on this rank, but rank 0 called alloc_collective({root_size})"));
    }
    if placed {
        place(rt, p as usize, size);
    }
    p as *mut u8
}

/// Places the fresh pages of the collective allocation `[addr, addr + size)` by the job's policy
/// on this rank: records the range, and opens the pages this rank now owns and closes the others
/// (rank 0's arena held them all). Every rank does this before any leaves the closing barrier,
/// so nobody asks a home about these pages before the home knows it is theirs.
fn place(rt: &Runtime, addr: usize, size: usize) {
    let first = rt.page_of(addr);
    let pages = size.div_ceil(rt.region().page);
    if rt.placement().place_collective(first as u64, pages as u64) {
        let me = rt.rank();
        // Under release consistency the owner is the block's home, whose first write to each page
        // registers it as a writer: the block opens read-only.
        let owned = if rt.release().is_some() { Access::Read } else { Access::Write };
        let access_of = |p: usize| match rt.placement().first_owner(p as u64) {
            Some(o) if o == me => owned,
            _ => Access::None,
        };
        let mut run = first;
        while run < first + pages {
            let access = access_of(run);
            let end = (run..first + pages).find(|p| access_of(*p) != access).unwrap_or(first + pages);
            if rt.pt().access(run) != access || (run..end).any(|p| rt.pt().access(p) != access) {
                rt.set_access(run, end - run, access);
            }
            run = end;
        }
    }
    barrier();
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// The ranks a broadcast from `root` goes on to from `rank`, in a binomial tree over the ranks
/// numbered from the root: rank `v` (so numbered) passes it to `v + 2^j` for every `2^j > v`
/// below the job size, and hears it from `v` without its highest bit. Depth ceil(log2 N); the
/// root sends ceil(log2 N) copies instead of N - 1.
fn broadcast_children(rank: usize, root: usize, size: usize) -> impl Iterator<Item = usize> {
    let v = (rank + size - root) % size;
    let first = if v == 0 { 0 } else { usize::BITS - v.leading_zeros() };
    (first..usize::BITS)
        .map(move |j| 1usize << j)
        .take_while(move |step| v + step < size)
        .map(move |step| (v + step + root) % size)
}

/// Copies `buf` of rank `root` into `buf` of every other rank. Every rank calls it, in the same
/// order, with buffers of the same length. The data goes down a binomial tree
/// ([`broadcast_children`]): each rank passes on what it received.
pub fn broadcast(buf: &mut [u8], root: usize) {
    let rt = member("gallocy::broadcast");
    if root >= rt.size() {
        fatal(rt, &format!("broadcast root {root} is not a rank of a {}-process job", rt.size()));
    }
    if rt.size() == 1 {
        return;
    }
    let _s = RuntimeScope::enter();
    let seq = rt.collectives().next_broadcast_seq();
    if rt.rank() != root {
        let data = rt.collectives().sync().take_broadcast(seq);
        if data.len() != buf.len() {
            fatal(
                rt,
                &format!(
                    "broadcast length mismatch: root {root} sent {} bytes, this rank passed a buffer of {}",
                    data.len(),
                    buf.len()
                ),
            );
        }
        buf.copy_from_slice(&data);
    }
    let total = buf.len() as u64;
    for to in broadcast_children(rt.rank(), root, rt.size()) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_tree_reaches_every_rank_once() {
        for size in [1usize, 2, 3, 5, 8, 13, 128, 1000, 1024] {
            for root in [0, size / 2, size - 1] {
                let mut heard = vec![0u32; size];
                let mut depth = vec![0u32; size];
                let mut todo = vec![root];
                heard[root] = 1;
                while let Some(r) = todo.pop() {
                    for c in broadcast_children(r, root, size) {
                        heard[c] += 1;
                        depth[c] = depth[r] + 1;
                        todo.push(c);
                    }
                }
                assert!(heard.iter().all(|h| *h == 1), "size {size} root {root}: {heard:?}");
                let levels = usize::BITS - (size - 1).leading_zeros();
                assert!(depth.iter().all(|d| *d <= levels), "size {size}: depth beyond log2");
                assert!(broadcast_children(root, root, size).count() <= levels as usize);
            }
        }
        assert_eq!(broadcast_children(0, 0, 8).collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(broadcast_children(1, 0, 8).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(broadcast_children(3, 0, 8).collect::<Vec<_>>(), vec![7]);
        assert_eq!(broadcast_children(2, 2, 8).collect::<Vec<_>>(), vec![3, 4, 6]);
    }
}
