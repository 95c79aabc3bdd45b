//! `lock_queue`: a work queue of `items` u64 items and a head index in the shared heap,
//! protected by global lock [`LOCK`]. A take pops one item under the lock (reads the head,
//! advances it); then, outside the lock, the rank does `work` mixing rounds on the item and adds
//! the result to its checksum. At the end every rank hands its checksum and its number of takes
//! to rank 0, which checks that all items were taken exactly once (and reports takes per rank).
//! The sequential version pops the same items from a `Vec` with no lock.

use std::ptr::{read_volatile, write_volatile};

use anyhow::Result;

use super::common::{ms, splitmix64, Job, Outcome};
use super::Params;
use crate::net::now_ns;

/// The global lock of the queue.
pub const LOCK: u32 = 7;

/// Item `i` of the queue.
#[inline]
fn item(i: u64) -> u64 {
    splitmix64(i ^ 0x51_7CC1_B727_220A)
}

/// The work done on one item: `rounds` mixing rounds (cannot be shortcut).
#[inline]
fn work(mut x: u64, rounds: u64) -> u64 {
    for _ in 0..rounds {
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 29;
    }
    x
}

pub fn sequential(s: &Params) -> Result<Outcome> {
    let t_setup = now_ns();
    let items: Vec<u64> = (0..s.queue_items).map(item).collect();
    let t0 = now_ns();
    let mut head = 0usize;
    let mut sum = 0u64;
    while head < items.len() {
        let it = items[head];
        head += 1;
        sum = sum.wrapping_add(work(it, s.queue_work));
    }
    let t1 = now_ns();
    Ok(Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum: sum, ..Default::default() })
}

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let job = Job::current();
    let n = s.queue_items;
    job.barrier();
    let t_setup = now_ns();
    let head = job.collective(8)?.cast::<u64>();
    let items = job.collective(n as usize * 8)?.cast::<u64>();
    if job.rank == 0 {
        for i in 0..n {
            // SAFETY: `items` holds n u64 of the shared heap; only rank 0 writes them, before
            // the barrier.
            unsafe { write_volatile(items.add(i as usize), item(i)) };
        }
    }
    job.barrier();
    let t0 = now_ns();
    let (mut sum, mut takes) = (0u64, 0u64);
    loop {
        gallocy::lock(LOCK);
        // SAFETY: the head is one u64 of the shared heap, read and written only under LOCK.
        let h = unsafe { read_volatile(head) };
        if h < n {
            // SAFETY: as above.
            unsafe { write_volatile(head, h + 1) };
        }
        gallocy::unlock(LOCK);
        if h >= n {
            break;
        }
        // SAFETY: h < n; the items are not written after the set-up.
        let it = unsafe { read_volatile(items.add(h as usize)) };
        sum = sum.wrapping_add(work(it, s.queue_work));
        takes += 1;
    }
    job.barrier();
    let t1 = now_ns();
    let all = job.gather(&[sum, takes])?;
    if job.rank != 0 {
        return Ok(None);
    }
    let checksum = all.iter().fold(0u64, |acc, r| acc.wrapping_add(r[0]));
    let total: u64 = all.iter().map(|r| r[1]).sum();
    let mut o = Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() };
    if total != n {
        o.problem = Some(format!("{total} takes for {n} items (an item taken twice or lost)"));
    }
    for (r, v) in all.iter().enumerate() {
        o = o.figure(&format!("takes_rank{r}"), v[1] as f64);
    }
    let min = all.iter().map(|r| r[1]).min().unwrap_or(0);
    Ok(Some(o.figure("min_share", if total > 0 { min as f64 / total as f64 } else { 0.0 })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_deterministic_and_not_trivial() {
        assert_eq!(work(5, 10), work(5, 10));
        assert_ne!(work(5, 10), work(5, 11));
        assert_eq!(work(5, 0), 5);
    }
}
