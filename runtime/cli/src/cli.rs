//! The `gallocy` command line: its clap definitions ([`Cli`]) and their translation into what
//! to do ([`parse`] → [`Cmd`]).
//!
//! ```text
//! gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]
//! gallocy demo [-n N] [--size S] [--iters K] [--threads T] [--transport auto|tcp|rdma] [--consistency sequential|release] [--grace SECONDS]
//! gallocy --help | --version
//! ```
//!
//! Usage errors are [`CliError::Usage`]: the `gallocy` binary prints them with [`SYNOPSIS`] and
//! exits with code 2.

use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand};

use crate::launch::{self, LaunchSpec, MAX_RANKS};

/// The short usage printed with every usage error.
pub const SYNOPSIS: &str = "\
usage:
  gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]
  gallocy demo [-n N] [--size S] [--iters K] [--threads T] [--transport auto|tcp|rdma] [--consistency sequential|release] [--grace SECONDS]
  gallocy --help | --version
";

const USAGE: &str = "\
gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]
       gallocy demo [-n N] [--size S] [--iters K] [--threads T] [--transport auto|tcp|rdma] [--consistency sequential|release] [--grace SECONDS]
       gallocy --help | --version";

const DETAILS: &str = "\
Commands in detail:
  run    start N ranks of PROGRAM on this machine (rank 0 coordinates on a free
         127.0.0.1 port); every output line is prefixed with \"[rank i] \".
         When a rank fails, the others get --grace seconds (default 5) to exit,
         then are killed. Exit code: 0 if all ranks exited 0, otherwise that of
         the first rank that failed (128+signal if it was killed).
  demo   run a distributed Jacobi solve on a grid in the shared heap and check
         it bit for bit against a single-process solve; prints runtime
         statistics (GALLOCY_STATS=1).

Options in detail:
  -n, --nprocs N      number of ranks, 1..=1024 (demo default: 4; -np N works too)
  --preload           run PROGRAM with LD_PRELOAD=libgallocy.so (every malloc in
                      the shared heap; GALLOCY_PRELOAD_LIB overrides the path)
  --transport NAME    auto (default: RDMA if every rank has a usable device, else
                      TCP; says which at start-up), tcp, or rdma (needs the
                      cargo feature `rdma`; fails at start without a device).
                      Default: GALLOCY_TRANSPORT, else auto (run and demo)
  --grace SECONDS     time the other ranks get after one failed (default 5)
  --size S            demo grid is S x S (default 512)
  --iters K           demo Jacobi iterations (default 200)
  --threads T         demo threads per rank (default 1)

Usage errors exit with code 2; see 'gallocy run --help' and 'gallocy demo --help'.";

const RUN_DETAILS: &str = "\
Rank 0 coordinates on a free 127.0.0.1 port, which the launcher holds for the job (no other
socket can take it before rank 0 listens); every rank gets GALLOCY_RANK, GALLOCY_SIZE,
GALLOCY_COORDINATOR, GALLOCY_COORDINATOR_HELD=1, GALLOCY_TOKEN (the launcher's own GALLOCY_TOKEN,
else a fresh one) and GALLOCY_TRANSPORT. Every output line of a rank is prefixed with \"[rank i] \". When a rank fails,
the others get --grace seconds to exit, then are killed.

Exit code: 0 if all ranks exited 0, otherwise that of the first rank that failed (128+signal if
it was killed); 2 for usage errors, 127 if PROGRAM does not exist, 126 if it cannot be executed.";

const DEMO_DETAILS: &str = "\
The ranks are copies of this executable on this machine (TCP on 127.0.0.1, with
GALLOCY_STATS=1); rank 0 prints the progress, the timings and the verdict. Exit code: 0 if every
rank read the same grid as the single-process solve, else non-zero.";

/// Hidden subcommand: one rank of the demo (`__demo-rank SIZE ITERS THREADS`).
pub const DEMO_RANK: &str = "__demo-rank";
pub const DEMO_DEFAULT_RANKS: usize = 4;
pub const DEMO_DEFAULT_SIZE: usize = 512;
pub const DEMO_DEFAULT_ITERS: usize = 200;
pub const DEMO_MAX_SIZE: usize = 8192;
pub const DEMO_MAX_ITERS: usize = 1_000_000;
pub const MAX_THREADS: usize = 64;

/// `gallocy`: launcher and demo of the gallocy distributed shared memory runtime.
#[derive(Debug, Parser)]
#[command(
    name = "gallocy",
    version,
    about = "Launcher and demo of the gallocy distributed shared memory runtime",
    override_usage = USAGE,
    after_help = DETAILS,
    subcommand_required = true,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start N ranks of PROGRAM on this machine, each line of their output prefixed with "[rank i] "
    #[command(
        override_usage = "gallocy run -n N [--preload] [--transport auto|tcp|rdma] [--grace SECONDS] [--] PROGRAM [ARGS...]",
        after_help = RUN_DETAILS,
        args_override_self = true
    )]
    Run(RunArgs),
    /// Run a distributed Jacobi solve on a grid in the shared heap and check it bit for bit
    /// against a single-process solve; prints runtime statistics (GALLOCY_STATS=1)
    #[command(
        override_usage = "gallocy demo [-n N] [--size S] [--iters K] [--threads T] [--transport auto|tcp|rdma] [--consistency sequential|release] [--grace SECONDS]",
        after_help = DEMO_DETAILS,
        args_override_self = true
    )]
    Demo(DemoArgs),
    /// One rank of the demo (started by `gallocy demo`)
    #[command(name = DEMO_RANK, hide = true)]
    DemoRank(DemoRankArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of ranks, 1..=1024 (`-np N` works too)
    #[arg(short = 'n', long = "nprocs", value_name = "N", value_parser = number::<usize>)]
    pub nprocs: Option<usize>,
    /// Run PROGRAM with LD_PRELOAD=libgallocy.so (every malloc in the shared heap; the library next
    /// to this executable, or GALLOCY_PRELOAD_LIB)
    #[arg(long)]
    pub preload: bool,
    /// auto (RDMA if every rank has a usable device, else TCP; says which at start-up), tcp, or
    /// rdma (needs the cargo feature `rdma`; fails at start without a device) [default:
    /// GALLOCY_TRANSPORT, else auto]
    #[arg(long, value_name = "NAME")]
    pub transport: Option<String>,
    /// Time the other ranks get to exit after one failed, 0..=86400 [default: 5]
    #[arg(long, value_name = "SECONDS", value_parser = seconds, allow_negative_numbers = true)]
    pub grace: Option<Duration>,
    /// The program every rank runs (looked up in PATH), then its arguments (which may start with
    /// '-'); `--` before PROGRAM is optional
    #[arg(value_name = "PROGRAM", trailing_var_arg = true, num_args = 1.., value_parser = clap::value_parser!(OsString))]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of ranks, 1..=1024 (`-np N` works too)
    #[arg(short = 'n', long = "nprocs", value_name = "N", default_value_t = DEMO_DEFAULT_RANKS, value_parser = number::<usize>)]
    pub nprocs: usize,
    /// The grid is S x S, 3..=8192
    #[arg(long, value_name = "S", default_value_t = DEMO_DEFAULT_SIZE, value_parser = number::<usize>)]
    pub size: usize,
    /// Jacobi iterations, 1..=1000000
    #[arg(long, value_name = "K", default_value_t = DEMO_DEFAULT_ITERS, value_parser = number::<usize>)]
    pub iters: usize,
    /// Threads per rank, 1..=64
    #[arg(long, value_name = "T", default_value_t = 1, value_parser = number::<usize>)]
    pub threads: usize,
    /// auto, tcp or rdma, as for `run` [default: GALLOCY_TRANSPORT, else auto]
    #[arg(long, value_name = "NAME")]
    pub transport: Option<String>,
    /// The memory model of the ranks: sequential or release (GALLOCY_CONSISTENCY) [default:
    /// GALLOCY_CONSISTENCY, else sequential]
    #[arg(long, value_name = "MODEL")]
    pub consistency: Option<String>,
    /// Time the other ranks get to exit after one failed, 0..=86400 [default: 5]
    #[arg(long, value_name = "SECONDS", value_parser = seconds, allow_negative_numbers = true)]
    pub grace: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct DemoRankArgs {
    #[arg(value_name = "SIZE", value_parser = number::<usize>)]
    pub size: usize,
    #[arg(value_name = "ITERS", value_parser = number::<usize>)]
    pub iters: usize,
    #[arg(value_name = "THREADS", value_parser = number::<usize>)]
    pub threads: usize,
}

/// Size of the demo problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub size: usize,
    pub iters: usize,
    pub threads: usize,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Cmd {
    Run(LaunchSpec),
    Demo { ranks: usize, problem: Problem, grace: Duration, transport: String, consistency: String },
    DemoRank(Problem),
}

/// Why the command line did not give a [`Cmd`].
#[derive(Debug)]
pub enum CliError {
    /// A mistake: reported with [`SYNOPSIS`], exit code 2.
    Usage(String),
    /// `--help`, `help` or `--version`: print it ([`clap::Error::print`]) and exit 0.
    Info(clap::Error),
}

fn usage<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError::Usage(msg.into()))
}

/// Parses the arguments (without the program name).
pub fn parse(args: &[OsString]) -> Result<Cmd, CliError> {
    let args = spell_np(args);
    let sub = args.first().and_then(|a| a.to_str()).unwrap_or("").to_string();
    let cli =
        Cli::try_parse_from(std::iter::once(OsString::from("gallocy")).chain(args)).map_err(|e| clap_error(&sub, e))?;
    match cli.command {
        Command::Run(a) => run_cmd(a),
        Command::Demo(a) => demo_cmd(a),
        Command::DemoRank(a) => {
            let problem = Problem { size: a.size, iters: a.iters, threads: a.threads };
            check_problem(problem)?;
            Ok(Cmd::DemoRank(problem))
        }
    }
}

fn run_cmd(a: RunArgs) -> Result<Cmd, CliError> {
    let Some(nprocs) = a.nprocs else {
        return usage("run: missing -n N");
    };
    let Some((program, program_args)) = a.command.split_first() else {
        return usage("run: missing PROGRAM");
    };
    let mut spec = LaunchSpec::new(nprocs, program.clone(), program_args.to_vec());
    if let Some(transport) = a.transport {
        spec.transport = transport;
    }
    if let Some(grace) = a.grace {
        spec.grace = grace;
    }
    if a.preload {
        spec.env.push(("LD_PRELOAD".into(), preload_library()?.into()));
    }
    if let Err(e) = spec.validate() {
        return usage(format!("run: {e}"));
    }
    Ok(Cmd::Run(spec))
}

fn demo_cmd(a: DemoArgs) -> Result<Cmd, CliError> {
    let ranks = a.nprocs;
    if !(1..=MAX_RANKS).contains(&ranks) {
        return usage(format!("demo: -n must be between 1 and {MAX_RANKS}, not {ranks}"));
    }
    let problem = Problem { size: a.size, iters: a.iters, threads: a.threads };
    check_problem(problem)?;
    let transport = a.transport.unwrap_or_else(launch::default_transport);
    if let Err(e) = launch::check_transport(&transport) {
        return usage(format!("demo: {e}"));
    }
    let consistency = a
        .consistency
        .or_else(|| std::env::var("GALLOCY_CONSISTENCY").ok())
        .map_or_else(|| "sequential".to_owned(), |c| c.trim().to_owned());
    if !matches!(consistency.as_str(), "sequential" | "release") {
        return usage(format!("demo: unknown consistency {consistency:?} (sequential or release)"));
    }
    Ok(Cmd::Demo { ranks, problem, grace: a.grace.unwrap_or(launch::DEFAULT_GRACE), transport, consistency })
}

/// Checks the demo problem's bounds.
pub fn check_problem(p: Problem) -> Result<(), CliError> {
    if !(3..=DEMO_MAX_SIZE).contains(&p.size) {
        return usage(format!("demo: --size must be between 3 and {DEMO_MAX_SIZE}, not {}", p.size));
    }
    if !(1..=DEMO_MAX_ITERS).contains(&p.iters) {
        return usage(format!("demo: --iters must be between 1 and {DEMO_MAX_ITERS}, not {}", p.iters));
    }
    if !(1..=MAX_THREADS).contains(&p.threads) {
        return usage(format!("demo: --threads must be between 1 and {MAX_THREADS}, not {}", p.threads));
    }
    Ok(())
}

/// The `libgallocy.so` that `--preload` puts in `LD_PRELOAD`: `$GALLOCY_PRELOAD_LIB`, else the
/// one next to this executable (where cargo builds both), else `../lib/libgallocy.so` (an
/// installed prefix).
fn preload_library() -> Result<PathBuf, CliError> {
    if let Some(p) = std::env::var_os("GALLOCY_PRELOAD_LIB") {
        // A list like LD_PRELOAD's (colons or spaces between libraries). ld.so would only warn
        // about a library it cannot load and run the program without it: every rank would run
        // as an independent process.
        let list = p.to_string_lossy().into_owned();
        let missing = list.split([':', ' ']).filter(|l| !l.is_empty()).find(|l| !std::path::Path::new(l).is_file());
        if let Some(lib) = missing {
            return usage(format!("run --preload: GALLOCY_PRELOAD_LIB names {lib}, which is not a file"));
        }
        if list.trim().is_empty() {
            return usage("run --preload: GALLOCY_PRELOAD_LIB is empty");
        }
        return Ok(p.into());
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return usage(format!("run --preload: cannot find this executable: {e}")),
    };
    let dir = exe.parent().unwrap_or(std::path::Path::new("."));
    let candidates = [dir.join("libgallocy.so"), dir.join("../lib/libgallocy.so")];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => usage(format!(
            "run --preload: libgallocy.so not found next to {} (build it with `cargo build --release -p gallocy-shim`, or set GALLOCY_PRELOAD_LIB)",
            exe.display()
        )),
    }
}

/// `-np N` (mpirun's spelling) is `--nprocs N`: rewritten among the options of `run` (up to
/// PROGRAM or `--`) and of `demo`.
fn spell_np(args: &[OsString]) -> Vec<OsString> {
    let mut out = args.to_vec();
    let sub = args.first().and_then(|a| a.to_str());
    if !matches!(sub, Some("run") | Some("demo")) {
        return out;
    }
    let mut i = 1;
    while i < out.len() {
        let arg = out[i].to_str().unwrap_or("");
        match arg {
            "-np" => {
                out[i] = "--nprocs".into();
                i += 2;
            }
            "--" => break,
            "-n" | "--nprocs" | "--transport" | "--consistency" | "--grace" | "--size" | "--iters" | "--threads" => {
                i += 2
            }
            a if a.starts_with('-') && a.len() > 1 => i += 1,
            _ if sub == Some("run") => break, // PROGRAM
            _ => i += 1,
        }
    }
    out
}

/// A number: `"x" is not a valid number` otherwise.
fn number<T: FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("\"{v}\" is not a valid number"))
}

/// Seconds (fractions allowed), at most a day.
fn seconds(v: &str) -> Result<Duration, String> {
    let secs: f64 = number(v)?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(86_400))
        .ok_or_else(|| format!("\"{v}\" is not a number of seconds between 0 and 86400"))
}

/// A clap error in our words: "unknown option", "missing command", "-n: ... is not a valid
/// number" and so on; `--help` and `--version` pass through.
fn clap_error(sub: &str, e: clap::Error) -> CliError {
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(", "),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    // The option as the user wrote its name ("--nprocs <N>" -> "--nprocs").
    let flag = || context(ContextKind::InvalidArg).split([' ', '=']).next().unwrap_or_default().to_string();
    let prefix = match sub {
        "run" | "demo" => format!("{sub}: "),
        _ => String::new(),
    };
    let msg = match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => return CliError::Info(e),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            "missing command".to_string()
        }
        _ if sub == DEMO_RANK => format!("{DEMO_RANK} takes SIZE ITERS THREADS"),
        ErrorKind::InvalidSubcommand => format!("unknown command \"{}\"", context(ContextKind::InvalidSubcommand)),
        ErrorKind::UnknownArgument => {
            let arg = context(ContextKind::InvalidArg);
            if arg.starts_with('-') {
                format!("{prefix}unknown option \"{arg}\"")
            } else {
                format!("{prefix}unexpected argument \"{arg}\"")
            }
        }
        ErrorKind::ValueValidation => {
            let why = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
            format!("{prefix}{}: {why}", flag())
        }
        ErrorKind::InvalidValue if context(ContextKind::InvalidValue).is_empty() => {
            format!("{prefix}{} needs a value", flag())
        }
        _ => {
            // clap's own sentence, without its "error: " and its usage.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            format!("{prefix}{}", first.strip_prefix("error: ").unwrap_or(first))
        }
    };
    CliError::Usage(msg)
}

/// The message of a usage error as the binary prints it (with [`SYNOPSIS`]).
pub fn usage_text(msg: &str) -> String {
    format!("gallocy: {msg}\n\n{SYNOPSIS}\nRun 'gallocy --help' for details.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn usage_error(list: &[&str]) -> String {
        match parse(&args(list)) {
            Err(CliError::Usage(msg)) => msg,
            other => panic!("{list:?} should be a usage error, not {other:?}"),
        }
    }

    #[test]
    fn clap_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
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
    fn run_program_may_follow_options_without_double_dash() {
        let Ok(Cmd::Run(spec)) =
            parse(&args(&["run", "-np", "2", "--transport", "tcp", "sh", "-c", "echo $0", "-n", "--", "x"]))
        else {
            panic!()
        };
        assert_eq!((spec.nprocs, spec.transport.as_str(), spec.program.as_os_str()), (2, "tcp", "sh".as_ref()));
        assert_eq!(spec.args, args(&["-c", "echo $0", "-n", "--", "x"]));
        let Ok(Cmd::Run(spec)) = parse(&args(&["run", "-n", "1", "-n", "4", "--", "-weird"])) else { panic!() };
        assert_eq!((spec.nprocs, spec.program.as_os_str()), (4, "-weird".as_ref()), "the last -n wins");
        let Ok(Cmd::Run(spec)) = parse(&args(&["run", "--grace", "0", "-n2", "prog"])) else { panic!() };
        assert_eq!((spec.nprocs, spec.grace), (2, Duration::ZERO));
    }

    #[test]
    fn usage_errors() {
        for (bad, message) in [
            (&[][..], "missing command"),
            (&["bogus"], "unknown command \"bogus\""),
            (&["run", "-n", "2"], "run: missing PROGRAM"),
            (&["run", "-n", "2", "--"], "run: missing PROGRAM"),
            (&["run", "--", "prog"], "run: missing -n N"),
            (&["run", "-n", "0", "prog"], "between 1 and 1024"),
            (&["run", "-n", "1025", "prog"], "between 1 and 1024"),
            (&["run", "-n", "x", "prog"], "run: --nprocs: \"x\" is not a valid number"),
            (&["run", "-n"], "run: --nprocs needs a value"),
            (&["run", "-n", "2", "--transport", "udp", "prog"], "unknown transport"),
            (&["run", "-n", "2", "--grace", "-1", "prog"], "between 0 and 86400"),
            (&["run", "-n", "2", "--grace", "soon", "prog"], "not a valid number"),
            (&["run", "-n", "2", "--frobnicate", "prog"], "run: unknown option \"--frobnicate\""),
            (&["demo", "--size", "2"], "demo: --size must be between 3 and 8192, not 2"),
            (&["demo", "-n", "0"], "demo: -n must be between 1 and 1024, not 0"),
            (&["demo", "-np", "2000"], "between 1 and 1024"),
            (&["demo", "extra"], "demo: unexpected argument \"extra\""),
            (&["__demo-rank", "10"], "__demo-rank takes SIZE ITERS THREADS"),
            (&["__demo-rank", "2", "1", "1"], "--size must be between 3"),
        ] {
            let msg = usage_error(bad);
            assert!(msg.contains(message), "{bad:?}: expected {message:?} in {msg:?}");
        }
        let rdma = parse(&args(&["run", "-n", "2", "--transport", "rdma", "prog"]));
        if gallocy::RDMA_BUILT {
            assert!(matches!(rdma, Ok(Cmd::Run(_))), "{rdma:?}");
        } else {
            assert!(matches!(&rdma, Err(CliError::Usage(m)) if m.contains("not built in this build")), "{rdma:?}");
        }
    }

    #[test]
    fn help_and_version_are_info() {
        for list in [&["--help"][..], &["-h"], &["help"], &["--version"], &["run", "--help"], &["demo", "-h"]] {
            assert!(matches!(parse(&args(list)), Err(CliError::Info(_))), "{list:?}");
        }
        let Err(CliError::Info(help)) = parse(&args(&["--help"])) else { panic!() };
        let text = help.to_string();
        assert!(text.contains("gallocy run -n N") && text.contains("gallocy demo"), "{text}");
        assert!(text.contains("--preload") && text.contains("GALLOCY_TRANSPORT"), "{text}");
        assert!(!text.contains(DEMO_RANK), "{text}");
    }

    #[test]
    fn demo_defaults() {
        let Ok(Cmd::Demo { ranks, problem, grace, .. }) = parse(&args(&["demo"])) else { panic!() };
        assert_eq!((ranks, problem.size, problem.iters, problem.threads), (4, 512, 200, 1));
        assert_eq!(grace, launch::DEFAULT_GRACE);
        let Ok(Cmd::Demo { ranks, problem, .. }) =
            parse(&args(&["demo", "-n", "2", "--size=64", "--iters", "10", "--threads", "2"]))
        else {
            panic!()
        };
        assert_eq!((ranks, problem.size, problem.iters, problem.threads), (2, 64, 10, 2));
        let Ok(Cmd::DemoRank(p)) = parse(&args(&[DEMO_RANK, "64", "10", "2"])) else { panic!() };
        assert_eq!(p, problem);
        let Ok(Cmd::Demo { consistency, .. }) = parse(&args(&["demo", "--consistency", "release"])) else { panic!() };
        assert_eq!(consistency, "release");
        assert!(matches!(parse(&args(&["demo", "--consistency", "weak"])), Err(CliError::Usage(_))));
    }
}
