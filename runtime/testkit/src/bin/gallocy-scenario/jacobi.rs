//! jacobi: the distributed Jacobi solver on the job, compared bit for bit with the sequential
//! reference on rank 0.

use crate::util::{Args, Outcome};
use std::io::Write;
use std::time::{Duration, Instant};

pub fn jacobi(args: &Args) -> Outcome {
    let n = args.usize_or("--n", 128);
    let iters = args.usize_or("--iters", 100);
    let threads = args.usize_or("--threads", 2);
    let progress = args.flag("--progress");
    let slow = args.opt_usize("--slow-ms").map(|ms| Duration::from_millis(ms as u64));
    // The read faults of sweeps 3 to `iters` (after two sweeps every rank holds what it keeps;
    // the final gather of the grid is not counted).
    let report_faults = args.flag("--report-faults");
    let rank = gallocy::rank();
    let (mut before, mut after) = (0, 0);
    let t0 = Instant::now();
    let res = if progress || slow.is_some() || report_faults {
        let mut cb = |k: usize| {
            if k == 2 {
                before = gallocy::stats().read_faults;
            }
            if k == iters {
                after = gallocy::stats().read_faults;
            }
            if progress {
                println!("iteration {k}");
                let _ = std::io::stdout().flush();
            }
            if let Some(d) = slow {
                std::thread::sleep(d);
            }
        };
        gallocy_cli::jacobi::distributed_with_progress(n, iters, threads, &mut cb)
    } else {
        gallocy_cli::jacobi::distributed(n, iters, threads)
    };
    let elapsed = t0.elapsed();
    if res.iterations != iters {
        return Err(format!("ran {} iterations, asked for {iters}", res.iterations));
    }
    if !res.residual.is_finite() {
        return Err(format!("residual is {}", res.residual));
    }
    let mut detail = format!(
        "n={n} iters={iters} threads/rank={threads} residual={:e}; {:.0} ms",
        res.residual,
        elapsed.as_secs_f64() * 1e3
    );
    if report_faults {
        detail.push_str(&format!("; read faults in sweeps 3 to {iters}: {}", after.saturating_sub(before)));
    }
    if rank == 0 {
        let want = gallocy_cli::jacobi::reference(n, iters);
        if want.len() != res.grid.len() {
            return Err(format!("grid has {} cells, the reference {}", res.grid.len(), want.len()));
        }
        if let Some(i) = (0..want.len()).find(|&i| want[i].to_bits() != res.grid[i].to_bits()) {
            let bad = (0..want.len()).filter(|&i| want[i].to_bits() != res.grid[i].to_bits()).count();
            return Err(format!(
                "grid differs from the reference in {bad} cells; first at index {i} (row {}, col {}): {:e} vs reference {:e}",
                i / n.max(1),
                i % n.max(1),
                res.grid[i],
                want[i]
            ));
        }
        detail.push_str("; identical to the sequential reference bit for bit");
    }
    Ok(detail)
}
