//! `gallocy`: launcher and demo of the gallocy distributed shared memory runtime.
//!
//! ```text
//! gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]
//! gallocy demo [-n N] [--size S] [--iters K] [--threads T]
//! ```

use std::ffi::OsString;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gallocy::jacobi;
use gallocy::launch::{self, LaunchSpec, MAX_RANKS};

const SYNOPSIS: &str = "\
usage:
  gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]
  gallocy demo [-n N] [--size S] [--iters K] [--threads T]
  gallocy --help | --version
";

const DETAILS: &str = "
commands:
  run    start N ranks of PROGRAM on this machine (rank 0 coordinates on a free
         127.0.0.1 port); every output line is prefixed with \"[rank i] \".
         When a rank fails, the others get --grace seconds (default 5) to exit,
         then are killed. Exit code: 0 if all ranks exited 0, otherwise that of
         the first rank that failed (128+signal if it was killed).
  demo   run a distributed Jacobi solve on a grid in the shared heap and check
         it bit for bit against a single-process solve; prints runtime
         statistics (GALLOCY_STATS=1).

options:
  -n, --nprocs N      number of ranks, 1..=64 (demo default: 4)
  --preload           run PROGRAM with LD_PRELOAD=libgallocy.so (every malloc in
                      the shared heap; GALLOCY_PRELOAD_LIB overrides the path)
  --transport NAME    auto (default: RDMA if every rank has a usable device, else
                      TCP; says which at start-up), tcp, or rdma (needs the
                      cargo feature `rdma`; fails at start without a device).
                      Default: GALLOCY_TRANSPORT, else auto
  --grace SECONDS     time the other ranks get after one failed (default 5)
  --size S            demo grid is S x S (default 512)
  --iters K           demo Jacobi iterations (default 200)
  --threads T         demo threads per rank (default 1)
";

const DEMO_RANK: &str = "__demo-rank";
const DEMO_DEFAULT_RANKS: usize = 4;
const DEMO_DEFAULT_SIZE: usize = 512;
const DEMO_DEFAULT_ITERS: usize = 200;
const DEMO_MAX_SIZE: usize = 8192;
const DEMO_MAX_ITERS: usize = 1_000_000;
const MAX_THREADS: usize = 64;

/// A command-line mistake: reported with the usage text, exit code 2.
#[derive(Debug)]
struct Usage(String);

/// What the command line asks for.
#[derive(Debug)]
enum Cmd {
    Help,
    Version,
    Run(LaunchSpec),
    Demo { ranks: usize, problem: Problem, grace: Duration },
    DemoRank(Problem),
}

/// Size of the demo problem.
#[derive(Debug, Clone, Copy)]
struct Problem {
    size: usize,
    iters: usize,
    threads: usize,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let code = match parse(&args) {
        Ok(cmd) => execute(cmd),
        Err(Usage(msg)) => {
            eprintln!("gallocy: {msg}\n\n{SYNOPSIS}\nRun 'gallocy --help' for details.");
            2
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn execute(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Help => {
            print!("{SYNOPSIS}{DETAILS}");
            0
        }
        Cmd::Version => {
            println!("gallocy {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Cmd::Run(spec) => launch_job(&spec),
        Cmd::Demo { ranks, problem, grace } => demo(ranks, problem, grace),
        Cmd::DemoRank(problem) => demo_rank(problem).unwrap_or_else(|e| {
            eprintln!("gallocy demo: {e:#}");
            1
        }),
    }
}

// ---------------------------------------------------------------- parsing

fn parse(args: &[OsString]) -> Result<Cmd, Usage> {
    let Some(first) = args.first() else {
        return Err(Usage("missing command".into()));
    };
    let rest = &args[1..];
    match utf8(first)? {
        "-h" | "--help" | "help" => Ok(Cmd::Help),
        "-V" | "--version" => Ok(Cmd::Version),
        "run" => parse_run(rest),
        "demo" => parse_demo(rest),
        DEMO_RANK => parse_demo_rank(rest),
        other => Err(Usage(format!("unknown command \"{other}\""))),
    }
}

/// The `libgallocy.so` that `--preload` puts in `LD_PRELOAD`: `$GALLOCY_PRELOAD_LIB`, else the
/// one next to this executable (where cargo builds both), else `../lib/libgallocy.so` (an
/// installed prefix).
fn preload_library() -> Result<std::path::PathBuf, Usage> {
    if let Some(p) = std::env::var_os("GALLOCY_PRELOAD_LIB") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| Usage(format!("run --preload: cannot find this executable: {e}")))?;
    let dir = exe.parent().unwrap_or(std::path::Path::new("."));
    let candidates = [dir.join("libgallocy.so"), dir.join("../lib/libgallocy.so")];
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        Usage(format!(
            "run --preload: libgallocy.so not found next to {} (build it with `cargo build --release -p gallocy-shim`, or set GALLOCY_PRELOAD_LIB)",
            exe.display()
        ))
    })
}

fn parse_run(args: &[OsString]) -> Result<Cmd, Usage> {
    let mut nprocs = None;
    let mut transport = launch::default_transport();
    let mut grace = launch::DEFAULT_GRACE;
    let mut preload = false;
    let mut i = 0;
    while i < args.len() {
        let arg = utf8_or_program(&args[i]);
        let (flag, inline) = split_flag(arg);
        match flag {
            "--" => {
                i += 1;
                break;
            }
            "-h" | "--help" => return Ok(Cmd::Help),
            "-n" | "--nprocs" | "-np" => nprocs = Some(parse_num(flag, value(args, &mut i, inline)?)?),
            "--preload" => preload = true,
            "--transport" => transport = value(args, &mut i, inline)?.to_string(),
            "--grace" => grace = parse_seconds(flag, value(args, &mut i, inline)?)?,
            f if f.starts_with('-') && f.len() > 1 => return Err(Usage(format!("unknown option \"{f}\""))),
            _ => break, // first word of the program
        }
        i += 1;
    }
    let nprocs = nprocs.ok_or_else(|| Usage("run: missing -n N".into()))?;
    let (program, program_args) = args[i..].split_first().ok_or_else(|| Usage("run: missing PROGRAM".into()))?;
    let mut spec = LaunchSpec::new(nprocs, program.clone(), program_args.to_vec());
    spec.transport = transport;
    spec.grace = grace;
    if preload {
        spec.env.push(("LD_PRELOAD".into(), preload_library()?.into()));
    }
    spec.validate().map_err(|e| Usage(format!("run: {e}")))?;
    Ok(Cmd::Run(spec))
}

fn parse_demo(args: &[OsString]) -> Result<Cmd, Usage> {
    let mut ranks = DEMO_DEFAULT_RANKS;
    let mut problem = Problem { size: DEMO_DEFAULT_SIZE, iters: DEMO_DEFAULT_ITERS, threads: 1 };
    let mut grace = launch::DEFAULT_GRACE;
    let mut i = 0;
    while i < args.len() {
        let (flag, inline) = split_flag(utf8(&args[i])?);
        match flag {
            "-h" | "--help" => return Ok(Cmd::Help),
            "-n" | "--nprocs" | "-np" => ranks = parse_num(flag, value(args, &mut i, inline)?)?,
            "--size" => problem.size = parse_num(flag, value(args, &mut i, inline)?)?,
            "--iters" => problem.iters = parse_num(flag, value(args, &mut i, inline)?)?,
            "--threads" => problem.threads = parse_num(flag, value(args, &mut i, inline)?)?,
            "--grace" => grace = parse_seconds(flag, value(args, &mut i, inline)?)?,
            other => return Err(Usage(format!("demo: unexpected argument \"{other}\""))),
        }
        i += 1;
    }
    if !(1..=MAX_RANKS).contains(&ranks) {
        return Err(Usage(format!("demo: -n must be between 1 and {MAX_RANKS}, not {ranks}")));
    }
    check_problem(problem)?;
    Ok(Cmd::Demo { ranks, problem, grace })
}

fn parse_demo_rank(args: &[OsString]) -> Result<Cmd, Usage> {
    let [size, iters, threads] = args else {
        return Err(Usage(format!("{DEMO_RANK} takes SIZE ITERS THREADS")));
    };
    let problem = Problem {
        size: parse_num("SIZE", utf8(size)?)?,
        iters: parse_num("ITERS", utf8(iters)?)?,
        threads: parse_num("THREADS", utf8(threads)?)?,
    };
    check_problem(problem)?;
    Ok(Cmd::DemoRank(problem))
}

fn check_problem(p: Problem) -> Result<(), Usage> {
    if !(3..=DEMO_MAX_SIZE).contains(&p.size) {
        return Err(Usage(format!("demo: --size must be between 3 and {DEMO_MAX_SIZE}, not {}", p.size)));
    }
    if !(1..=DEMO_MAX_ITERS).contains(&p.iters) {
        return Err(Usage(format!("demo: --iters must be between 1 and {DEMO_MAX_ITERS}, not {}", p.iters)));
    }
    if !(1..=MAX_THREADS).contains(&p.threads) {
        return Err(Usage(format!("demo: --threads must be between 1 and {MAX_THREADS}, not {}", p.threads)));
    }
    Ok(())
}

/// `--flag=value` -> ("--flag", Some("value")); anything else -> (arg, None).
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    match arg.split_once('=') {
        Some((flag, v)) if flag.starts_with("--") => (flag, Some(v)),
        _ => (arg, None),
    }
}

/// The value of the option at `args[*i]`: inline (`--x=v`) or the next argument.
fn value<'a>(args: &'a [OsString], i: &mut usize, inline: Option<&'a str>) -> Result<&'a str, Usage> {
    if let Some(v) = inline {
        return Ok(v);
    }
    let flag = utf8(&args[*i])?;
    *i += 1;
    let v = args.get(*i).ok_or_else(|| Usage(format!("{flag} needs a value")))?;
    utf8(v)
}

fn utf8(arg: &OsString) -> Result<&str, Usage> {
    arg.to_str().ok_or_else(|| Usage(format!("argument {arg:?} is not valid UTF-8")))
}

/// Options are UTF-8; anything else can only be the program name.
fn utf8_or_program(arg: &OsString) -> &str {
    arg.to_str().unwrap_or("")
}

fn parse_num<T: FromStr>(flag: &str, v: &str) -> Result<T, Usage> {
    v.parse().map_err(|_| Usage(format!("{flag}: \"{v}\" is not a valid number")))
}

fn parse_seconds(flag: &str, v: &str) -> Result<Duration, Usage> {
    let secs: f64 = parse_num(flag, v)?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(86_400))
        .ok_or_else(|| Usage(format!("{flag}: \"{v}\" is not a number of seconds between 0 and 86400")))
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
fn demo(ranks: usize, p: Problem, grace: Duration) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("gallocy demo: cannot find my own executable: {e}");
            return 1;
        }
    };
    println!(
        "gallocy demo: {ranks} processes x {} thread(s), Jacobi on a {n}x{n} grid, {} iterations, tcp on 127.0.0.1",
        p.threads,
        p.iters,
        n = p.size
    );
    let args = [DEMO_RANK.to_string(), p.size.to_string(), p.iters.to_string(), p.threads.to_string()];
    let mut spec = LaunchSpec::new(ranks, exe, args.iter().map(OsString::from).collect());
    spec.env.push(("GALLOCY_STATS".into(), "1".into()));
    spec.grace = grace;
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

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn run_parses_options_and_program() {
        let Ok(Cmd::Run(spec)) = parse(&args(&["run", "-n", "3", "--grace=0.5", "--", "prog", "-x", "--y"])) else {
            panic!("not a run command")
        };
        assert_eq!(spec.nprocs, 3);
        assert_eq!(spec.grace, Duration::from_millis(500));
        assert_eq!(spec.program, "prog");
        assert_eq!(spec.args, args(&["-x", "--y"]));
        let Ok(Cmd::Run(spec)) = parse(&args(&["run", "--nprocs=2", "prog"])) else { panic!() };
        assert_eq!((spec.nprocs, spec.program.as_os_str()), (2, "prog".as_ref()));
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &[][..],
            &["bogus"],
            &["run", "-n", "2"],
            &["run", "-n", "2", "--"],
            &["run", "--", "prog"],
            &["run", "-n", "0", "prog"],
            &["run", "-n", "65", "prog"],
            &["run", "-n", "x", "prog"],
            &["run", "-n"],
            #[cfg(not(feature = "rdma"))]
            &["run", "-n", "2", "--transport", "rdma", "prog"],
            &["run", "-n", "2", "--transport", "udp", "prog"],
            &["run", "-n", "2", "--grace", "-1", "prog"],
            &["run", "-n", "2", "--frobnicate", "prog"],
            &["demo", "--size", "2"],
            &["demo", "-n", "0"],
            &["demo", "extra"],
            &["__demo-rank", "10"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} should be a usage error");
        }
    }

    #[test]
    fn demo_defaults() {
        let Ok(Cmd::Demo { ranks, problem, .. }) = parse(&args(&["demo"])) else { panic!() };
        assert_eq!((ranks, problem.size, problem.iters, problem.threads), (4, 512, 200, 1));
    }

    #[test]
    fn fingerprint_sees_every_bit() {
        assert_ne!(fingerprint(&[0.0]), fingerprint(&[-0.0]));
        assert_eq!(fingerprint(&[1.0, 2.0]), fingerprint(&[1.0, 2.0]));
    }
}
