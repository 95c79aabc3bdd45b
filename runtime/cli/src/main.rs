//! `gallocy`: launcher and demo of the gallocy distributed shared memory runtime.
//!
//! ```text
//! gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]
//! gallocy demo [-n N] [--size S] [--iters K] [--threads T] [--grace SECONDS]
//! ```
//!
//! The command line is defined in [`gallocy_cli::cli`], the launcher in [`gallocy_cli::launch`].

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gallocy_cli::cli::{self, CliError, Cmd, Problem, DEMO_RANK};
use gallocy_cli::jacobi;
use gallocy_cli::launch::{self, LaunchSpec};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let code = match cli::parse(&args) {
        Ok(cmd) => execute(cmd),
        Err(CliError::Info(info)) => match info.print() {
            Ok(()) => 0,
            Err(_) => 1,
        },
        Err(CliError::Usage(msg)) => {
            eprintln!("{}", cli::usage_text(&msg));
            2
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn execute(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Run(spec) => launch_job(&spec),
        Cmd::Demo { ranks, problem, grace, transport, consistency } => {
            demo(ranks, problem, grace, transport, consistency)
        }
        Cmd::DemoRank(problem) => demo_rank(problem).unwrap_or_else(|e| {
            eprintln!("gallocy demo: {e:#}");
            1
        }),
    }
}

// ---------------------------------------------------------------- run

fn launch_job(spec: &LaunchSpec) -> i32 {
    match launch::run(spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gallocy run: {e}");
            e.exit_code()
        }
    }
}

// ---------------------------------------------------------------- demo

/// Launches `ranks` copies of this executable as demo ranks.
fn demo(ranks: usize, p: Problem, grace: Duration, transport: String, consistency: String) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("gallocy demo: cannot find my own executable: {e}");
            return 1;
        }
    };
    println!(
        "gallocy demo: {ranks} processes x {} thread(s), Jacobi on a {n}x{n} grid, {} iterations, {consistency} consistency, transport {transport} on 127.0.0.1{}",
        p.threads,
        p.iters,
        match (transport.as_str(), gallocy::RDMA_BUILT) {
            ("auto", true) => " (auto: rank 0 says which one runs)",
            ("auto", false) => " (auto: tcp, the only transport of this build)",
            _ => "",
        },
        n = p.size
    );
    let args = [DEMO_RANK.to_string(), p.size.to_string(), p.iters.to_string(), p.threads.to_string()];
    let mut spec = LaunchSpec::new(ranks, exe, args.iter().map(OsString::from).collect());
    spec.env.push(("GALLOCY_STATS".into(), "1".into()));
    spec.env.push(("GALLOCY_CONSISTENCY".into(), consistency.into()));
    spec.grace = grace;
    spec.transport = transport;
    let code = launch_job(&spec);
    if code == 0 {
        println!("gallocy demo: ok");
    }
    code
}

/// One rank of the demo: solve, verify, report, finalize.
fn demo_rank(p: Problem) -> Result<i32> {
    gallocy::init().context("cannot join the job")?;
    let rank = gallocy::rank();
    let progress_every = (p.iters / 4).max(1);
    let started = Instant::now();
    let result = jacobi::distributed_with_progress(p.size, p.iters, p.threads, &mut |k| {
        if rank == 0 && k % progress_every == 0 && k < p.iters {
            println!("iteration {k}/{}", p.iters);
        }
    });
    let wall = started.elapsed();

    let verdict = verify(rank, p, &result);
    let all_agree = gather_agreement(verdict.same_as_reference);
    if rank == 0 {
        print_summary(p, &result, wall, &verdict, all_agree);
    }
    gallocy::finalize().context("cannot leave the job")?;
    let ok = verdict.same_as_reference && (rank != 0 || all_agree.0 == all_agree.1);
    Ok(if ok { 0 } else { 1 })
}

/// How this rank's result compares with the single-process reference.
struct Verdict {
    same_as_reference: bool,
    /// Rank 0 only: reference time and the first mismatching cell.
    reference_time: Duration,
    mismatch: Option<(usize, f64, f64)>,
}

/// Rank 0 computes the reference and compares cell by cell; it broadcasts the
/// reference's fingerprint, which every rank compares with its own copy.
fn verify(rank: usize, p: Problem, result: &jacobi::DistResult) -> Verdict {
    let mut reference_time = Duration::ZERO;
    let mut mismatch = None;
    let mut digest = [0u8; 8];
    if rank == 0 {
        let started = Instant::now();
        let expected = jacobi::reference(p.size, p.iters);
        reference_time = started.elapsed();
        mismatch = jacobi::first_mismatch(&result.grid, &expected);
        digest = fingerprint(&expected).to_le_bytes();
    }
    gallocy::broadcast(&mut digest, 0);
    let same = fingerprint(&result.grid) == u64::from_le_bytes(digest) && mismatch.is_none();
    if !same && rank != 0 {
        eprintln!("gallocy demo: the final grid read by rank {rank} differs from the single-process result");
    }
    Verdict { same_as_reference: same, reference_time, mismatch }
}

/// Every rank writes its verdict into a shared array; returns (agreeing, ranks).
fn gather_agreement(mine: bool) -> (usize, usize) {
    let ranks = gallocy::size();
    let votes = gallocy::alloc_collective(ranks);
    // SAFETY: `votes` holds `ranks` bytes of shared heap; each rank writes only
    // its own byte before the barrier and all ranks only read after it.
    unsafe { votes.add(gallocy::rank()).write_volatile(u8::from(mine)) };
    gallocy::barrier();
    // SAFETY: as above; nobody writes the array after the barrier.
    let agreeing = (0..ranks).filter(|&r| unsafe { votes.add(r).read_volatile() } == 1).count();
    (agreeing, ranks)
}

/// FNV-1a over the bit patterns of the grid.
fn fingerprint(grid: &[f64]) -> u64 {
    grid.iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn print_summary(p: Problem, r: &jacobi::DistResult, wall: Duration, v: &Verdict, agree: (usize, usize)) {
    let n = p.size;
    println!("Jacobi {n}x{n}, {} iterations, {} processes x {} thread(s)", r.iterations, agree.1, p.threads);
    println!("  distributed wall time:         {:.3} s", wall.as_secs_f64());
    println!("  single-process reference time: {:.3} s", v.reference_time.as_secs_f64());
    let placement = std::env::var("GALLOCY_PLACEMENT").unwrap_or_else(|_| "block".into());
    println!(
        "  speedup against the single-process solve: {:.2}x (grids placed by GALLOCY_PLACEMENT={placement})",
        v.reference_time.as_secs_f64() / wall.as_secs_f64().max(1e-9)
    );
    println!("  residual (max |u - sweep(u)|): {:.6e}", r.residual);
    match v.mismatch {
        None => println!("  matches single-process result: yes (bit for bit, {} values)", r.grid.len()),
        Some((idx, got, want)) => println!(
            "  matches single-process result: NO: first mismatch at row {}, column {}: distributed {got:e} ({:#018x}), reference {want:e} ({:#018x})",
            idx / n,
            idx % n,
            got.to_bits(),
            want.to_bits()
        ),
    }
    let yes = if agree.0 == agree.1 { "yes" } else { "NO" };
    println!("  every rank read the same grid: {yes} ({}/{} ranks)", agree.0, agree.1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_every_bit() {
        assert_ne!(fingerprint(&[0.0]), fingerprint(&[-0.0]));
        assert_eq!(fingerprint(&[1.0, 2.0]), fingerprint(&[1.0, 2.0]));
    }
}
