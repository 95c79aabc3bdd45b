//! `matmul`: C = A×B of n×n f64 matrices, row-major.
//!
//! Gallocy: A, B and C are three collective allocations; rank r owns the rows
//! `jacobi::row_block(n, N, r)` of each and initialises them (so their pages move to it during
//! the set-up), barrier, computes its rows of C (reading all of B), barrier. The values are
//! small multiples of powers of two, so every product and sum is exact: C does not depend on
//! the order of the additions, and the checksum (over C) must equal the sequential one.

use std::ops::Range;

use anyhow::Result;
use gallocy_cli::jacobi::row_block;

use super::common::{checksum_f64, ms, slice, slice_mut, Job, Outcome};
use super::Params;
use crate::net::now_ns;

/// A[i][k] (a multiple of 1/8 in [-1.125, 1.125]).
#[inline]
fn a_at(i: usize, k: usize) -> f64 {
    ((i * 31 + k * 17) % 19) as f64 * 0.125 - 1.125
}

/// B[k][j] (a multiple of 1/16 in [-0.6875, 0.6875]).
#[inline]
fn b_at(k: usize, j: usize) -> f64 {
    ((k * 13 + j * 7) % 23) as f64 * 0.0625 - 0.6875
}

/// Initialises `rows` of A, B and C (each slice holds exactly those rows).
fn init_rows(n: usize, rows: Range<usize>, a: &mut [f64], b: &mut [f64], c: &mut [f64]) {
    for (r, i) in rows.enumerate() {
        for j in 0..n {
            a[r * n + j] = a_at(i, j);
            b[r * n + j] = b_at(i, j);
            c[r * n + j] = 0.0;
        }
    }
}

/// The kernel: `c_rows += a_rows × b` (i-k-j order), `a_rows`/`c_rows` holding the same rows.
fn multiply_rows(n: usize, a_rows: &[f64], b: &[f64], c_rows: &mut [f64]) {
    for (a_row, c_row) in a_rows.chunks_exact(n).zip(c_rows.chunks_exact_mut(n)) {
        for (k, &a) in a_row.iter().enumerate() {
            let b_row = &b[k * n..(k + 1) * n];
            for (c, &b) in c_row.iter_mut().zip(b_row) {
                *c += a * b;
            }
        }
    }
}

pub fn sequential(s: &Params) -> Result<Outcome> {
    let n = s.matmul_n as usize;
    let t_setup = now_ns();
    let (mut a, mut b, mut c) = (vec![0.0; n * n], vec![0.0; n * n], vec![0.0; n * n]);
    init_rows(n, 0..n, &mut a, &mut b, &mut c);
    let t0 = now_ns();
    multiply_rows(n, &a, &b, &mut c);
    let t1 = now_ns();
    Ok(Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum: checksum_f64(0, &c), ..Default::default() })
}

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let n = s.matmul_n as usize;
    let job = Job::current();
    let rows = row_block(n, job.size, job.rank);
    let cells = n * n;
    job.barrier();
    let t_setup = now_ns();
    let a = job.collective(cells * 8)?.cast::<f64>();
    let b = job.collective(cells * 8)?.cast::<f64>();
    let c = job.collective(cells * 8)?.cast::<f64>();
    let first = rows.start * n;
    let len = rows.len() * n;
    // SAFETY: A, B and C hold n*n f64 each (zero-filled, page-aligned blocks of the shared heap);
    // this rank is the only one that touches its rows until the barrier.
    unsafe {
        init_rows(
            n,
            rows.clone(),
            slice_mut(a.add(first), len),
            slice_mut(b.add(first), len),
            slice_mut(c.add(first), len),
        )
    };
    job.barrier();
    let t0 = now_ns();
    // SAFETY: nobody writes A or B any more; this rank alone writes its rows of C.
    unsafe { multiply_rows(n, slice(a.add(first), len), slice(b, cells), slice_mut(c.add(first), len)) };
    job.barrier();
    let t1 = now_ns();
    // SAFETY: after the barrier nobody writes C.
    let part = checksum_f64(first as u64, unsafe { slice(c.add(first), len) });
    let checksum = job.sum(part)?;
    Ok((job.rank == 0).then(|| Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_the_definition() {
        let n = 7;
        let (mut a, mut b, mut c) = (vec![0.0; n * n], vec![0.0; n * n], vec![0.0; n * n]);
        init_rows(n, 0..n, &mut a, &mut b, &mut c);
        multiply_rows(n, &a[2 * n..5 * n], &b, &mut c[2 * n..5 * n]);
        for i in 2..5 {
            for j in 0..n {
                let want: f64 = (0..n).map(|k| a_at(i, k) * b_at(k, j)).sum();
                assert_eq!(c[i * n + j], want);
            }
        }
    }
}
