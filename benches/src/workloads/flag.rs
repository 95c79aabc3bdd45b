//! `flag`: message passing through the shared heap, 2 ranks.
//!
//! Four pages of a collective allocation: `data0`, `flag0` (rank 0 → rank 1) and `data1`,
//! `flag1` (rank 1 → rank 0), each on its own page. Round r: rank 0 writes r and the time into
//! `data0`, a SeqCst fence, then r into `flag0`; rank 1 spins on `flag0` (volatile reads) until
//! it reads r, fences, reads the time and checks `data0` (it must hold r: the flag must not be
//! visible before the data), then answers the same way through `data1`/`flag1`. The one-way
//! visibility latency of a message is the time from its writer's clock reading to the moment
//! the reader saw the flag (both processes read the same CLOCK_MONOTONIC); both directions go
//! into one histogram. Rank 0 also records the round trip.

use std::ptr::{read_volatile, write_volatile};
use std::sync::atomic::{fence, Ordering::SeqCst};

use anyhow::{bail, Result};

use super::common::{ms, spin_until, Job, Outcome};
use super::Params;
use crate::net::now_ns;
use crate::report::new_histogram;

/// Untimed rounds before the timed ones.
const WARMUP: u64 = 20;

/// One direction: the data page (value, time) and the flag page.
#[derive(Clone, Copy)]
struct Channel {
    data: *mut u64,
    flag: *mut u64,
}

impl Channel {
    /// Sends round `r`: the time, then data, fence, flag.
    ///
    /// # Safety
    /// The channel's pages are shared-heap pages only this rank writes.
    unsafe fn send(self, r: u64) {
        let t = now_ns();
        // SAFETY: upheld by the caller.
        unsafe {
            write_volatile(self.data, r);
            write_volatile(self.data.add(1), t);
            fence(SeqCst);
            write_volatile(self.flag, r);
        }
    }

    /// Waits for round `r`; returns (data value, writer's time, time seen).
    ///
    /// # Safety
    /// The channel's pages are shared-heap pages the other rank writes.
    unsafe fn receive(self, r: u64, who: &str) -> Result<(u64, u64, u64)> {
        // SAFETY: upheld by the caller (volatile reads of the shared heap).
        unsafe {
            spin_until(
                || read_volatile(self.flag) >= r,
                || format!("{who} waits for flag {r}, reads {}", read_volatile(self.flag)),
            )?;
            fence(SeqCst);
            let seen = now_ns();
            Ok((read_volatile(self.data), read_volatile(self.data.add(1)), seen))
        }
    }
}

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let job = Job::current();
    if job.size != 2 {
        bail!("flag needs a job of 2 ranks, this one has {}", job.size);
    }
    let rounds = s.flag_rounds;
    job.barrier();
    let t_setup = now_ns();
    let base = job.collective(4 * job.page)?;
    let at = |i: usize| base.wrapping_add(i * job.page).cast::<u64>();
    let (to1, to0) = (Channel { data: at(0), flag: at(1) }, Channel { data: at(2), flag: at(3) });
    let (out, inp) = if job.rank == 0 { (to1, to0) } else { (to0, to1) };
    // Each rank starts as the holder of the pages it writes.
    // SAFETY: the four pages are in the collective block; each rank writes only its `out`.
    unsafe {
        write_volatile(out.data, 0);
        write_volatile(out.flag, 0);
    }
    job.barrier();
    let t0 = now_ns();
    let mut one_way = Vec::with_capacity(rounds as usize);
    let mut rtt = Vec::with_capacity(rounds as usize);
    let mut bad = 0u64;
    let mut first_bad = None;
    let who = format!("rank {}", job.rank);
    for r in 1..=WARMUP + rounds {
        let timed = r > WARMUP;
        if job.rank == 0 {
            let t = now_ns();
            // SAFETY: `out`/`inp` are this rank's channels (see above).
            let (d, ts, seen) = unsafe {
                out.send(r);
                inp.receive(r, &who)?
            };
            if timed {
                one_way.push(seen.saturating_sub(ts));
                rtt.push(seen - t);
            }
            if d != r {
                bad += 1;
                first_bad.get_or_insert(format!("rank 0, round {r}: flag seen but data holds {d}"));
            }
        } else {
            // SAFETY: as above.
            let (d, ts, seen) = unsafe { inp.receive(r, &who)? };
            if timed {
                one_way.push(seen.saturating_sub(ts));
            }
            if d != r {
                bad += 1;
                first_bad.get_or_insert(format!("rank 1, round {r}: flag seen but data holds {d}"));
            }
            // SAFETY: as above.
            unsafe { out.send(r) };
        }
    }
    job.barrier();
    let t1 = now_ns();
    let mut mine = vec![bad];
    mine.extend_from_slice(&one_way);
    let all = job.gather(&mine)?;
    if job.rank != 0 {
        if let Some(p) = first_bad {
            eprintln!("flag: {p}");
        }
        return Ok(None);
    }
    let (mut h_all, mut h_rtt) = (new_histogram(), new_histogram());
    let mut h_dir = [new_histogram(), new_histogram()];
    for (r, v) in all.iter().enumerate() {
        for &x in &v[1..] {
            h_all.record(x.max(1))?;
            // Rank 1's samples are messages 0 -> 1.
            h_dir[1 - r].record(x.max(1))?;
        }
    }
    for &x in &rtt {
        h_rtt.record(x.max(1))?;
    }
    let total_bad: u64 = all.iter().map(|v| v[0]).sum();
    let us = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut o = Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum: total_bad, ..Default::default() }
        .figure("rounds", rounds as f64)
        .figure("one_way_p50_us", us(&h_all, 0.5))
        .figure("one_way_p99_us", us(&h_all, 0.99))
        .figure("one_way_0to1_p50_us", us(&h_dir[0], 0.5))
        .figure("one_way_1to0_p50_us", us(&h_dir[1], 0.5))
        .figure("rtt_p50_us", us(&h_rtt, 0.5))
        .figure("rtt_p99_us", us(&h_rtt, 0.99));
    if total_bad > 0 {
        o.problem = Some(format!(
            "{total_bad} messages whose flag was visible before their data ({})",
            first_bad.unwrap_or_else(|| "first seen on rank 1".into())
        ));
    }
    Ok(Some(o))
}
