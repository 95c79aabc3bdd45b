//! `peterson`: Peterson's mutual exclusion between 2 ranks, through the shared heap.
//!
//! One collective block, laid out as a C program would: `flag[2]`, `turn`, a counter and an
//! occupancy word. For `seconds` each rank enters again and again:
//! `flag[me] = 1; turn = other; fence; while flag[other] == 1 && turn == other {}; fence;`
//! critical section; `fence; flag[me] = 0`. Inside, the rank checks the occupancy word is free,
//! claims it, increments the counter (a volatile read and write, which loses updates if two
//! ranks are ever inside at once), and frees it. At the end rank 0 checks that the counter
//! equals the entries of both ranks and that nobody found the section occupied, and reports
//! entries per rank and the smaller share (min / total, 0.5 is perfectly fair).

use std::ptr::{read_volatile, write_volatile};
use std::sync::atomic::{fence, Ordering::SeqCst};

use anyhow::{bail, Result};

use super::common::{ms, spin_until, Job, Outcome};
use super::Params;
use crate::net::now_ns;

/// Word offsets in the block.
const FLAG: usize = 0;
const TURN: usize = 2;
const COUNTER: usize = 3;
const INSIDE: usize = 4;

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let job = Job::current();
    if job.size != 2 {
        bail!("peterson needs a job of 2 ranks, this one has {}", job.size);
    }
    let (me, other) = (job.rank, 1 - job.rank);
    job.barrier();
    let t_setup = now_ns();
    let p = job.collective(64)?.cast::<u64>();
    let w = |i: usize| p.wrapping_add(i);
    job.barrier();
    let t0 = now_ns();
    let deadline = t0 + (s.peterson_seconds * 1e9) as u64;
    let (mut entries, mut occupied) = (0u64, 0u64);
    while now_ns() < deadline {
        // SAFETY: the five words are in the collective block; the protocol decides who writes
        // what (flag[me] by this rank only, turn by both, the rest inside the section).
        unsafe {
            write_volatile(w(FLAG + me), 1);
            write_volatile(w(TURN), other as u64);
            fence(SeqCst);
            spin_until(
                || read_volatile(w(FLAG + other)) == 0 || read_volatile(w(TURN)) != other as u64,
                || {
                    format!(
                        "rank {me} waits to enter: flag[{other}] = {}, turn = {}",
                        read_volatile(w(FLAG + other)),
                        read_volatile(w(TURN))
                    )
                },
            )?;
            fence(SeqCst);
            // The critical section.
            if read_volatile(w(INSIDE)) != 0 {
                occupied += 1;
            }
            write_volatile(w(INSIDE), me as u64 + 1);
            let c = read_volatile(w(COUNTER));
            write_volatile(w(COUNTER), c + 1);
            if read_volatile(w(INSIDE)) != me as u64 + 1 {
                occupied += 1;
            }
            write_volatile(w(INSIDE), 0);
            fence(SeqCst);
            write_volatile(w(FLAG + me), 0);
        }
        entries += 1;
    }
    job.barrier();
    let t1 = now_ns();
    let all = job.gather(&[entries, occupied])?;
    if job.rank != 0 {
        return Ok(None);
    }
    // SAFETY: after the barrier nobody writes the counter.
    let counter = unsafe { read_volatile(w(COUNTER)) };
    let (e0, e1) = (all[0][0], all[1][0]);
    let total = e0 + e1;
    let seen_occupied = all[0][1] + all[1][1];
    let mut o = Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum: counter, ..Default::default() }
        .figure("entries_rank0", e0 as f64)
        .figure("entries_rank1", e1 as f64)
        .figure("total", total as f64)
        .figure("min_share", if total > 0 { e0.min(e1) as f64 / total as f64 } else { f64::NAN })
        .figure("entries_per_s", total as f64 / s.peterson_seconds);
    if counter != total || seen_occupied > 0 {
        o.problem = Some(format!(
            "mutual exclusion violated: counter {counter} after {total} entries ({e0} + {e1}), section found \
             occupied {seen_occupied} times"
        ));
    }
    Ok(Some(o))
}
