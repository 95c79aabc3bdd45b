//! `jacobi`: sweeps of the 2-D Jacobi kernel of `gallocy_cli::jacobi` (`sweep_rows`,
//! `init_boundary`, `row_block`) on an n×n f64 grid.
//!
//! Gallocy: two grids in collective allocations; rank r owns rows `row_block(n, N, r)` of both
//! and initialises them (the whole rows, so their pages move to it during the set-up); each
//! sweep reads the source grid and writes the own rows of the other, then a barrier, then the
//! grids swap. Each cell depends only on the source grid, so the result equals the sequential
//! one bit for bit. Checksum: over the final grid.

use anyhow::Result;
use gallocy_cli::jacobi::{init_boundary, row_block, sweep_rows};

use super::common::{checksum_f64, ms, slice, slice_mut, Job, Outcome};
use super::Params;
use crate::net::now_ns;

/// Zero rows `rows` of a grid (held by `block`) and set their boundary cells.
fn init_rows(n: usize, block: &mut [f64], rows: std::ops::Range<usize>) {
    block.fill(0.0);
    init_boundary(n, block, rows);
}

pub fn sequential(s: &Params) -> Result<Outcome> {
    let n = s.jacobi_n as usize;
    let t_setup = now_ns();
    let mut src = vec![0.0; n * n];
    let mut dst = vec![0.0; n * n];
    init_rows(n, &mut src, 0..n);
    init_rows(n, &mut dst, 0..n);
    let t0 = now_ns();
    for _ in 0..s.jacobi_iters {
        sweep_rows(n, &src, &mut dst, 0..n);
        std::mem::swap(&mut src, &mut dst);
    }
    let t1 = now_ns();
    Ok(Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum: checksum_f64(0, &src), ..Default::default() })
}

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let n = s.jacobi_n as usize;
    let job = Job::current();
    let rows = row_block(n, job.size, job.rank);
    let cells = n * n;
    let (first, len) = (rows.start * n, rows.len() * n);
    job.barrier();
    let t_setup = now_ns();
    let mut src = job.collective(cells * 8)?.cast::<f64>();
    let mut dst = job.collective(cells * 8)?.cast::<f64>();
    // SAFETY: both grids hold n*n f64 (zero-filled blocks of the shared heap); this rank alone
    // touches its rows until the barrier.
    unsafe {
        init_rows(n, slice_mut(src.add(first), len), rows.clone());
        init_rows(n, slice_mut(dst.add(first), len), rows.clone());
    }
    job.barrier();
    let t0 = now_ns();
    for _ in 0..s.jacobi_iters {
        // SAFETY: during a sweep nobody writes `src`, and this rank alone writes its rows of
        // `dst`; the slices end before the barrier.
        unsafe { sweep_rows(n, slice(src, cells), slice_mut(dst.add(first), len), rows.clone()) };
        job.barrier();
        std::mem::swap(&mut src, &mut dst);
    }
    let t1 = now_ns();
    // SAFETY: after the last barrier nobody writes the grids.
    let part = checksum_f64(first as u64, unsafe { slice(src.add(first), len) });
    let checksum = job.sum(part)?;
    Ok((job.rank == 0).then(|| Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() }))
}
