//! 2-D Jacobi workload: the demo, test and benchmark program of gallocy.
//!
//! The problem: Laplace's equation on an `n x n` grid of `f64` with a fixed
//! boundary (top edge 1.0, the other edges 0.0), solved by Jacobi sweeps.
//! Every sweep reads grid `src` and writes every interior cell of grid `dst`:
//!
//! ```text
//! dst[i][j] = 0.25 * ((src[i-1][j] + src[i+1][j]) + (src[i][j-1] + src[i][j+1]))
//! ```
//!
//! then the grids swap roles. Each cell depends only on `src`, so the result
//! does not depend on the order cells are computed in: [`reference`] (one
//! thread, plain `Vec`s) and [`distributed`] (all ranks, shared heap) run the
//! same [`sweep_rows`] kernel and agree bit for bit. The grouping
//! `(up + down) + (left + right)` makes the solution exactly mirror-symmetric
//! about the vertical centre line, which the unit tests check.
//!
//! [`distributed`] keeps both grids in the shared heap
//! ([`gallocy::alloc_collective`], same address on every rank) and splits the
//! rows into one contiguous block per rank ([`row_block`]); no other state is
//! shared.

use std::ops::Range;

/// Value of a boundary cell: the top edge (row 0) is hot, the rest is cold.
pub const TOP_EDGE: f64 = 1.0;

/// Result of [`distributed`], identical on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct DistResult {
    /// Copy of the final grid, row-major, `n * n` values.
    pub grid: Vec<f64>,
    /// [`residual`] of the final grid.
    pub residual: f64,
    /// Number of sweeps performed.
    pub iterations: usize,
}

/// Single-process solution: `iters` sweeps on plain `Vec`s; row-major `n * n` grid.
pub fn reference(n: usize, iters: usize) -> Vec<f64> {
    let mut src = vec![0.0; n * n];
    let mut dst = vec![0.0; n * n];
    init_boundary(n, &mut src, 0..n);
    init_boundary(n, &mut dst, 0..n);
    for _ in 0..iters {
        sweep_rows(n, &src, &mut dst, 0..n);
        std::mem::swap(&mut src, &mut dst);
    }
    src
}

/// Distributed solution; call on every rank after [`gallocy::init`] with the same
/// arguments. Each rank sweeps its [`row_block`] with `threads_per_rank` threads
/// (0 is treated as 1); the result is the same on every rank and equals
/// [`reference`]`(n, iters)` bit for bit.
pub fn distributed(n: usize, iters: usize, threads_per_rank: usize) -> DistResult {
    distributed_with_progress(n, iters, threads_per_rank, &mut |_| {})
}

/// [`distributed`] with a hook: `on_iter(k)` runs on every rank after the barrier
/// that completes sweep `k` (1-based), i.e. when all ranks have finished it.
pub fn distributed_with_progress(
    n: usize,
    iters: usize,
    threads_per_rank: usize,
    on_iter: &mut dyn FnMut(usize),
) -> DistResult {
    let cells = n * n;
    if cells == 0 {
        return DistResult { grid: Vec::new(), residual: 0.0, iterations: iters };
    }
    let bytes = cells * std::mem::size_of::<f64>();
    let mut src = SharedGrid::collective(bytes);
    let mut dst = SharedGrid::collective(bytes);
    let rows = row_block(n, gallocy::size(), gallocy::rank());
    let threads = threads_per_rank.max(1);

    // SAFETY: both grids hold `cells` f64 in the shared heap (alloc_collective
    // returns a zero-filled, f64-aligned block); between barriers this rank is
    // the only writer of `rows`, and no thread of this process touches the grids
    // concurrently with these calls.
    unsafe {
        init_boundary(n, src.rows_mut(n, rows.clone()), rows.clone());
        init_boundary(n, dst.rows_mut(n, rows.clone()), rows.clone());
    }
    gallocy::barrier();

    for k in 1..=iters {
        // SAFETY: during a sweep nobody writes `src` (every rank writes only
        // its own rows of `dst`), and the rows of `dst` borrowed here are
        // written only by this rank; the borrows end before the barrier.
        unsafe {
            sweep_block(n, src.all(cells), dst.rows_mut(n, rows.clone()), rows.clone(), threads);
        }
        gallocy::barrier();
        std::mem::swap(&mut src, &mut dst);
        on_iter(k);
    }

    // SAFETY: after the last barrier no rank writes either grid any more.
    let grid = unsafe { src.all(cells) }.to_vec();
    let residual = residual(n, &grid);
    DistResult { grid, residual, iterations: iters }
}

/// Rows `[start, end)` of rank `rank` out of `parts` when `n` rows are split into
/// contiguous blocks whose sizes differ by at most one (earlier ranks get the
/// extra rows). Blocks of consecutive ranks are adjacent and cover `0..n`.
pub fn row_block(n: usize, parts: usize, rank: usize) -> Range<usize> {
    assert!(parts > 0 && rank < parts, "row_block: rank {rank} out of {parts}");
    let base = n / parts;
    let extra = n % parts;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// Set the boundary cells of `rows` (absolute row numbers) in `block`, which
/// holds exactly those rows; interior cells are left alone.
pub fn init_boundary(n: usize, block: &mut [f64], rows: Range<usize>) {
    assert_eq!(block.len(), rows.len() * n, "init_boundary: block does not hold rows {rows:?}");
    if n == 0 {
        return;
    }
    for (i, row) in rows.zip(block.chunks_exact_mut(n)) {
        if i == 0 || i == n - 1 {
            row.fill(boundary_value(i));
        } else {
            row[0] = boundary_value(i);
            row[n - 1] = boundary_value(i);
        }
    }
}

/// Boundary value of row `i`.
fn boundary_value(i: usize) -> f64 {
    if i == 0 {
        TOP_EDGE
    } else {
        0.0
    }
}

/// One Jacobi sweep of the interior cells of `rows`: reads the whole grid `src`
/// (`n * n` values), writes `dst`, which holds exactly `rows` (absolute row
/// numbers, row-major). Boundary cells in `dst` are not touched.
pub fn sweep_rows(n: usize, src: &[f64], dst: &mut [f64], rows: Range<usize>) {
    assert_eq!(src.len(), n * n, "sweep_rows: src is not n*n");
    assert_eq!(dst.len(), rows.len() * n, "sweep_rows: dst does not hold rows {rows:?}");
    if n < 3 {
        return; // no interior cells
    }
    for (i, out) in rows.zip(dst.chunks_exact_mut(n)) {
        if i == 0 || i + 1 >= n {
            continue;
        }
        let up = &src[(i - 1) * n..i * n];
        let mid = &src[i * n..(i + 1) * n];
        let down = &src[(i + 1) * n..(i + 2) * n];
        for j in 1..n - 1 {
            out[j] = stencil(up[j], down[j], mid[j - 1], mid[j + 1]);
        }
    }
}

/// The five-point update; the single definition of the operation order.
#[inline(always)]
fn stencil(up: f64, down: f64, left: f64, right: f64) -> f64 {
    0.25 * ((up + down) + (left + right))
}

/// [`sweep_rows`] of `rows` split among `threads` scoped threads (each gets a
/// contiguous sub-block); `threads <= 1` runs on the calling thread.
pub fn sweep_block(n: usize, src: &[f64], dst: &mut [f64], rows: Range<usize>, threads: usize) {
    let threads = threads.clamp(1, rows.len().max(1));
    if threads == 1 {
        sweep_rows(n, src, dst, rows);
        return;
    }
    std::thread::scope(|scope| {
        let mut rest = dst;
        for t in 0..threads {
            let sub = row_block(rows.len(), threads, t);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(sub.len() * n);
            rest = tail;
            let abs = rows.start + sub.start..rows.start + sub.end;
            scope.spawn(move || sweep_rows(n, src, mine, abs));
        }
    });
}

/// Largest change one more sweep would make: max over interior cells of
/// `|u - stencil(u)|` (0.0 for grids without interior).
pub fn residual(n: usize, grid: &[f64]) -> f64 {
    assert_eq!(grid.len(), n * n, "residual: grid is not n*n");
    let at = |r: usize, c: usize| grid[r * n + c];
    let mut worst = 0.0f64;
    for i in 1..n.saturating_sub(1) {
        for j in 1..n - 1 {
            let next = stencil(at(i - 1, j), at(i + 1, j), at(i, j - 1), at(i, j + 1));
            worst = worst.max((at(i, j) - next).abs());
        }
    }
    worst
}

/// First cell where `a` and `b` differ bit for bit: `(index, a[index], b[index])`.
/// A length difference is reported at the first index past the shorter one,
/// with NaN standing in for the missing value.
pub fn first_mismatch(a: &[f64], b: &[f64]) -> Option<(usize, f64, f64)> {
    let common = a.len().min(b.len());
    if let Some(i) = (0..common).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        return Some((i, a[i], b[i]));
    }
    if a.len() == b.len() {
        return None;
    }
    let get = |v: &[f64]| v.get(common).copied().unwrap_or(f64::NAN);
    Some((common, get(a), get(b)))
}

/// A grid in the shared heap, obtained from [`gallocy::alloc_collective`].
struct SharedGrid(*mut f64);

impl SharedGrid {
    /// Collective: every rank calls it in the same order with the same size.
    fn collective(bytes: usize) -> Self {
        let p = gallocy::alloc_collective(bytes);
        assert!(!p.is_null(), "alloc_collective({bytes}) failed");
        assert_eq!(p.align_offset(std::mem::align_of::<f64>()), 0, "shared grid misaligned");
        SharedGrid(p.cast())
    }

    /// The whole grid.
    ///
    /// # Safety
    /// The grid holds `cells` values and nobody writes it while the slice lives.
    unsafe fn all<'a>(&self, cells: usize) -> &'a [f64] {
        // SAFETY: upheld by the caller (see above).
        unsafe { std::slice::from_raw_parts(self.0, cells) }
    }

    /// Rows `rows` of an `n`-column grid.
    ///
    /// # Safety
    /// The rows are inside the grid and nobody else accesses them while the
    /// slice lives.
    unsafe fn rows_mut<'a>(&mut self, n: usize, rows: Range<usize>) -> &'a mut [f64] {
        // SAFETY: upheld by the caller (see above).
        unsafe { std::slice::from_raw_parts_mut(self.0.add(rows.start * n), rows.len() * n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(grid: &[f64], n: usize, i: usize, j: usize) -> f64 {
        grid[i * n + j]
    }

    #[test]
    fn reference_keeps_boundary_values() {
        let n = 17;
        let g = reference(n, 25);
        for j in 0..n {
            assert_eq!(at(&g, n, 0, j), TOP_EDGE);
            assert_eq!(at(&g, n, n - 1, j), 0.0);
        }
        for i in 1..n - 1 {
            assert_eq!(at(&g, n, i, 0), 0.0);
            assert_eq!(at(&g, n, i, n - 1), 0.0);
        }
    }

    #[test]
    fn reference_is_mirror_symmetric_bit_for_bit() {
        let n = 33;
        let g = reference(n, 60);
        for i in 0..n {
            for j in 0..n {
                assert_eq!(at(&g, n, i, j).to_bits(), at(&g, n, i, n - 1 - j).to_bits(), "({i},{j})");
            }
        }
    }

    #[test]
    fn reference_values_are_bounded_and_decay_away_from_the_hot_edge() {
        let n = 21;
        let g = reference(n, 200);
        assert!(g.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let mid = n / 2;
        for i in 1..n - 2 {
            assert!(at(&g, n, i, mid) > at(&g, n, i + 1, mid), "row {i}");
        }
    }

    #[test]
    fn first_sweep_only_moves_the_row_below_the_hot_edge() {
        let n = 6;
        let g = reference(n, 1);
        for j in 1..n - 1 {
            assert_eq!(at(&g, n, 1, j), 0.25);
        }
        assert!(g[2 * n..(n - 1) * n].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn residual_shrinks_with_more_iterations() {
        let n = 24;
        let r10 = residual(n, &reference(n, 10));
        let r100 = residual(n, &reference(n, 100));
        let r1000 = residual(n, &reference(n, 1000));
        assert!(r10 > r100 && r100 > r1000 && r1000 > 0.0, "{r10} {r100} {r1000}");
    }

    #[test]
    fn tiny_and_empty_grids() {
        assert!(reference(0, 5).is_empty());
        assert_eq!(reference(1, 5), vec![TOP_EDGE]);
        assert_eq!(reference(2, 5), vec![TOP_EDGE, TOP_EDGE, 0.0, 0.0]);
        assert_eq!(residual(2, &reference(2, 5)), 0.0);
        assert_eq!(reference(7, 0)[..7], [TOP_EDGE; 7]);
    }

    #[test]
    fn row_blocks_partition_the_rows() {
        for n in [0, 1, 5, 64, 511, 512] {
            for parts in 1..=9 {
                let blocks: Vec<_> = (0..parts).map(|r| row_block(n, parts, r)).collect();
                assert_eq!(blocks[0].start, 0);
                assert_eq!(blocks[parts - 1].end, n);
                for w in blocks.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }

    /// Simulates `parts` ranks (each with `threads` threads) in one process on
    /// plain memory, mirroring `distributed_with_progress`, and compares with
    /// `reference` bit for bit.
    fn simulated(n: usize, iters: usize, parts: usize, threads: usize) -> Vec<f64> {
        let mut src = vec![0.0; n * n];
        let mut dst = vec![0.0; n * n];
        for r in 0..parts {
            let rows = row_block(n, parts, r);
            init_boundary(n, &mut src[rows.start * n..rows.end * n], rows.clone());
            init_boundary(n, &mut dst[rows.start * n..rows.end * n], rows.clone());
        }
        for _ in 0..iters {
            for r in 0..parts {
                let rows = row_block(n, parts, r);
                let block = &mut dst[rows.start * n..rows.end * n];
                sweep_block(n, &src, block, rows, threads);
            }
            std::mem::swap(&mut src, &mut dst);
        }
        src
    }

    #[test]
    fn block_split_sweeps_match_reference_bit_for_bit() {
        for (n, iters) in [(3, 4), (10, 7), (37, 50), (64, 31)] {
            let expected = reference(n, iters);
            for parts in [1, 2, 3, 4, 7] {
                for threads in [0, 1, 2, 3, 5] {
                    let got = simulated(n, iters, parts, threads);
                    assert_eq!(first_mismatch(&expected, &got), None, "n={n} parts={parts} threads={threads}");
                }
            }
        }
    }

    #[test]
    fn first_mismatch_reports_bits_and_lengths() {
        assert_eq!(first_mismatch(&[1.0, 2.0], &[1.0, 2.0]), None);
        assert_eq!(first_mismatch(&[1.0, 2.0], &[1.0, 3.0]), Some((1, 2.0, 3.0)));
        let (i, a, b) = first_mismatch(&[0.0], &[-0.0]).unwrap();
        assert_eq!((i, a.to_bits(), b.to_bits()), (0, 0.0f64.to_bits(), (-0.0f64).to_bits()));
        let (i, a, b) = first_mismatch(&[1.0], &[1.0, 5.0]).unwrap();
        assert!(i == 1 && a.is_nan() && b == 5.0);
    }
}
