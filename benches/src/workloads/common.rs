//! What every workload shares: the record a rank hands to the driver, checksum hashing, the
//! job's shape and collective helpers, and a bounded spin wait.

use std::collections::BTreeMap;
use std::ptr::{read_volatile, write_volatile};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::net::now_ns;

/// The result of one run, printed by rank 0 (or the sequential process) as one JSON record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Set-up time (allocation and initialisation, up to the barrier before the timed phase), ms.
    pub setup_ms: f64,
    /// The timed phase, barrier to barrier on rank 0, ms.
    pub ms: f64,
    /// The workload's checksum (compared with the sequential run's).
    pub checksum: u64,
    /// A problem the run found itself (lost updates, a broken invariant, wrong data), if any.
    pub problem: Option<String>,
    /// Other figures (flag latencies, peterson entries, takes per rank, ...).
    pub figures: BTreeMap<String, f64>,
}

impl Outcome {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("outcome serializes")
    }

    pub fn figure(mut self, key: &str, v: f64) -> Self {
        self.figures.insert(key.to_string(), v);
        self
    }
}

/// Milliseconds between two [`now_ns`] readings.
pub fn ms(t0: u64, t1: u64) -> f64 {
    t1.saturating_sub(t0) as f64 / 1e6
}

/// SplitMix64: a deterministic pseudo-random u64 from any u64.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The checksum term of value `bits` at index `idx`; terms are summed with wrapping adds, so a
/// checksum does not depend on the order (or the rank) in which its terms are added.
#[inline]
pub fn term(idx: u64, bits: u64) -> u64 {
    splitmix64(idx.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ bits)
}

/// Checksum of `vals`, whose first element has index `first`.
pub fn checksum_f64(first: u64, vals: &[f64]) -> u64 {
    vals.iter().enumerate().fold(0u64, |acc, (i, v)| acc.wrapping_add(term(first + i as u64, v.to_bits())))
}

/// The job this rank is in (after `gallocy::init`).
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub rank: usize,
    pub size: usize,
    pub page: usize,
}

impl Job {
    pub fn current() -> Job {
        Job { rank: gallocy::rank(), size: gallocy::size(), page: gallocy::page_size() }
    }

    pub fn barrier(&self) {
        gallocy::barrier();
    }

    /// A collective allocation of at least `bytes`, in whole pages, starting on a page boundary
    /// (every rank calls it, in the same order, with the same size). Zero-filled; where its
    /// pages live at first is the runtime's placement (`GALLOCY_PLACEMENT`).
    pub fn collective(&self, bytes: usize) -> Result<*mut u8> {
        let size = bytes.max(1).next_multiple_of(self.page);
        let p = gallocy::alloc_collective(size);
        if p.is_null() {
            bail!("alloc_collective({size}) failed");
        }
        if (p as usize).is_multiple_of(self.page) {
            return Ok(p);
        }
        // Not page-aligned (the same pointer on every rank, so every rank gets here): a page more.
        let q = gallocy::alloc_collective(size + self.page);
        if q.is_null() {
            bail!("alloc_collective({}) failed", size + self.page);
        }
        Ok((q as usize).next_multiple_of(self.page) as *mut u8)
    }

    /// Collective: every rank contributes `vals` (same length everywhere); rank 0 gets every
    /// rank's values (in rank order), the others an empty vector.
    pub fn gather(&self, vals: &[u64]) -> Result<Vec<Vec<u64>>> {
        let k = vals.len();
        let base = self.collective(self.size * k * 8)?.cast::<u64>();
        for (i, v) in vals.iter().enumerate() {
            // SAFETY: `base` holds size * k u64 in the shared heap; this rank writes only its own
            // k slots.
            unsafe { write_volatile(base.add(self.rank * k + i), *v) };
        }
        self.barrier();
        if self.rank != 0 {
            return Ok(Vec::new());
        }
        // SAFETY: every rank wrote its slots before the barrier; nobody writes them any more.
        Ok((0..self.size).map(|r| (0..k).map(|i| unsafe { read_volatile(base.add(r * k + i)) }).collect()).collect())
    }

    /// Collective: the wrapping sum of every rank's `v` (on rank 0; 0 elsewhere).
    pub fn sum(&self, v: u64) -> Result<u64> {
        Ok(self.gather(&[v])?.iter().fold(0u64, |acc, r| acc.wrapping_add(r[0])))
    }
}

/// How long a spin wait may see no progress before it is reported as a hang.
pub const HANG: Duration = Duration::from_secs(60);

/// `--spin-yield`: [`spin_until`] yields the CPU in every iteration.
static SPIN_YIELD: AtomicBool = AtomicBool::new(false);

pub fn set_spin_yield(on: bool) {
    SPIN_YIELD.store(on, Ordering::Relaxed);
}

/// Spins until `done()` (yielding the CPU each time with `--spin-yield`); after [`HANG`]
/// without it, fails with `what()`.
#[inline]
pub fn spin_until(mut done: impl FnMut() -> bool, what: impl Fn() -> String) -> Result<()> {
    let mut n = 0u32;
    let mut start = 0u64;
    let yield_cpu = SPIN_YIELD.load(Ordering::Relaxed);
    while !done() {
        if yield_cpu {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            let now = now_ns();
            if start == 0 {
                start = now;
            } else if now - start > HANG.as_nanos() as u64 {
                bail!("no progress for {} s: {}", HANG.as_secs(), what());
            }
        }
    }
    Ok(())
}

/// A slice of `len` values at `p` (shared heap or private memory).
///
/// # Safety
/// `p` points at `len` initialised values, and nobody writes them while the slice lives.
pub unsafe fn slice<'a, T>(p: *const T, len: usize) -> &'a [T] {
    // SAFETY: upheld by the caller.
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// A mutable slice of `len` values at `p`.
///
/// # Safety
/// `p` points at `len` initialised values that nobody else accesses while the slice lives.
pub unsafe fn slice_mut<'a, T>(p: *mut T, len: usize) -> &'a mut [T] {
    // SAFETY: upheld by the caller.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_do_not_depend_on_order() {
        let v: Vec<f64> = (0..100).map(|i| i as f64 * 0.5).collect();
        let whole = checksum_f64(0, &v);
        let split = checksum_f64(0, &v[..37]).wrapping_add(checksum_f64(37, &v[37..]));
        assert_eq!(whole, split);
        assert_ne!(whole, checksum_f64(1, &v));
        assert_ne!(splitmix64(1), splitmix64(2));
    }

    #[test]
    fn outcome_round_trips() {
        let o = Outcome { setup_ms: 1.5, ms: 2.0, checksum: u64::MAX, problem: None, ..Default::default() }
            .figure("x", 3.0);
        let back: Outcome = serde_json::from_str(&o.to_json()).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn spin_until_returns() {
        let mut n = 0;
        spin_until(
            || {
                n += 1;
                n > 10
            },
            String::new,
        )
        .unwrap();
    }
}
