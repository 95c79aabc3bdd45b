//! `false_sharing`: one array of u64 slots (4096 = 32 KiB, 8 pages) in a collective allocation;
//! rank r owns the slots i with i % N == r (interleaved, so every page is written by every
//! rank). Each round is `passes` passes; a pass adds `inc(i)` to every own slot (volatile
//! read and write, so no pass is folded into another); a barrier ends each round. The
//! sequential version does every slot in one process. Checksum: over the final array.
//!
//! Both versions run the same machine code for a pass: [`pass`] is not inlined and its stride
//! is a run-time value in both (in the distributed version it is the job size). Inlined with
//! the constant stride 1, the sequential loop alone would be compiled into a faster,
//! specialised loop (about 0.6 to 0.8 of the time here), and the comparison would measure the
//! compiler instead of the runtime.

use std::hint::black_box;
use std::ptr::{read_volatile, write_volatile};

use anyhow::Result;

use super::common::{ms, term, Job, Outcome};
use super::Params;
use crate::net::now_ns;

/// What a pass adds to slot `i`.
#[inline]
fn inc(i: usize) -> u64 {
    1 + (i % 7) as u64
}

/// One pass over the slots `first, first + step, ...` of the `slots` at `p`.
///
/// # Safety
/// `p` holds `slots` u64 and no other thread of this process touches them meanwhile.
#[inline(never)]
unsafe fn pass(p: *mut u64, slots: usize, first: usize, step: usize) {
    let mut i = first;
    while i < slots {
        // SAFETY: i < slots (upheld by the caller for `p`).
        unsafe { write_volatile(p.add(i), read_volatile(p.add(i)).wrapping_add(inc(i))) };
        i += step;
    }
}

/// Checksum of the array.
///
/// # Safety
/// `p` holds `slots` u64 that nobody writes meanwhile.
unsafe fn checksum(p: *const u64, slots: usize) -> u64 {
    // SAFETY: upheld by the caller.
    (0..slots).fold(0u64, |acc, i| acc.wrapping_add(term(i as u64, unsafe { read_volatile(p.add(i)) })))
}

/// Writes to stderr which slots do not hold what `adds` passes give them (a wrong checksum then
/// says whether single increments or whole pages went missing).
///
/// # Safety
/// `p` points at `slots` readable u64s that nobody writes meanwhile.
unsafe fn report_wrong_slots(p: *const u64, slots: usize, adds: u64, ranks: usize) {
    let page = 4096 / 8;
    let mut wrong = 0usize;
    let mut shown = 0usize;
    for i in 0..slots {
        let want = adds.wrapping_mul(inc(i));
        // SAFETY: `i < slots` (the caller's promise).
        let got = unsafe { read_volatile(p.add(i)) };
        if got != want {
            wrong += 1;
            if shown < 8 {
                shown += 1;
                eprintln!(
                    "false_sharing: slot {i} (page {}, rank {}) holds {got} = {} increments of {}, want {}",
                    i / page,
                    i % ranks,
                    got / inc(i),
                    inc(i),
                    adds
                );
            }
        }
    }
    if wrong > 0 {
        eprintln!("false_sharing: {wrong} of {slots} slots wrong");
    }
}

pub fn sequential(s: &Params) -> Result<Outcome> {
    let slots = s.fs_slots as usize;
    let t_setup = now_ns();
    let mut v = vec![0u64; slots];
    let p = v.as_mut_ptr();
    let t0 = now_ns();
    for _ in 0..s.fs_rounds {
        for _ in 0..s.fs_passes {
            // SAFETY: `v` holds `slots` u64, only this thread uses it.
            unsafe { pass(p, slots, black_box(0), black_box(1)) };
        }
    }
    let t1 = now_ns();
    // SAFETY: as above.
    let checksum = unsafe { checksum(p, slots) };
    Ok(Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() })
}

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let slots = s.fs_slots as usize;
    let job = Job::current();
    job.barrier();
    let t_setup = now_ns();
    let p = job.collective(slots * 8)?.cast::<u64>();
    // The owners initialise their slots.
    let mut i = job.rank;
    while i < slots {
        // SAFETY: `p` holds `slots` u64 of the shared heap; this rank writes only its own slots.
        unsafe { write_volatile(p.add(i), 0) };
        i += job.size;
    }
    job.barrier();
    let t0 = now_ns();
    for _ in 0..s.fs_rounds {
        for _ in 0..s.fs_passes {
            // SAFETY: as above (own slots only).
            unsafe { pass(p, slots, job.rank, job.size) };
        }
        job.barrier();
    }
    let t1 = now_ns();
    // SAFETY: after the last barrier nobody writes the array.
    let checksum = if job.rank == 0 { unsafe { checksum(p, slots) } } else { 0 };
    if job.rank == 0 {
        // SAFETY: as above; after the last barrier nobody writes any more.
        unsafe { report_wrong_slots(p, slots, s.fs_rounds * s.fs_passes, job.size) };
    }
    job.barrier();
    Ok((job.rank == 0).then(|| Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() }))
}
