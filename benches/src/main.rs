//! gallocy-bench: latency benchmarks for gallocy on local processes.
//!
//! ```text
//! gallocy-bench fault [--procs 5] [--iters 5000] [--spin-us N] [--warmup N] [--timeout-s 600] [--no-pin]
//!                    [--cases read_home_owner,read_third_owner,...]
//! gallocy-bench floor [--iters 5000] [--spin-us N] [--warmup N] [--no-pin]
//! gallocy-bench malloc [--seconds 1.0] [--lib PATH] [--reps 3] [--workloads a,b] [--glibc-only]
//! gallocy-bench syscalls [--iters 200000] [--batch 50] [--reps 3] [--lib PATH] [--workloads a,b] [--sides a,b]
//! gallocy-bench fork [--pages 0,256,4096,32768] [--ro-div 8] [--iters 200] [--max-seconds 2] [--reps 3] [--sides a,b]
//! gallocy-bench preload-fault [--iters 1000] [--pages 256] [--lib PATH]
//! gallocy-bench workloads [--workloads a,b] [--ranks 1,2,4] [--reps 3] [--consistency sequential] [--svg PATH]
//! ```
//!
//! `fault` first measures the floor (two helper processes: a TCP server and a client that also
//! does the SIGSEGV measurements), then starts `--procs` ranks of a gallocy job and has rank 0
//! time remote read and write faults. It prints a table and, as the last line of stdout, one
//! JSON object. `floor` runs only the first part (it does not need the runtime). `malloc` compares
//! the malloc fast path of glibc and of `libgallocy.so` (LD_PRELOAD) in child processes (see
//! [`malloc`]). `syscalls` measures the shim's system-call wrappers next to glibc (see
//! [`syscalls`]), `fork` the cost of fork against the heap pages a joined process holds (see
//! [`fork`]), `preload-fault` the remote read fault of a preloaded program (see [`preload_fault`]),
//! `workloads` application kernels on 1, 2, 4 ranks against sequential versions of them (see
//! [`workloads`]).
//!
//! The command line is clap's ([`Cli`]); result lines are serde_json's ([`report`]); the
//! children are started with `gallocy_cli::launch` ([`child::run_copies`]).
//!
//! Hidden subcommands (used by the launcher): `__floor-server ADDR`, `__floor-client ADDR`,
//! `__fault-rank`, `__malloc-child`, `__syscalls-child`, `__fork-child`,
//! `__preload-fault-child`, `__workloads-rank`.

mod cases;
mod child;
mod floor;
mod fork;
mod malloc;
mod net;
mod preload_fault;
mod report;
mod syscalls;
mod workloads;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use gallocy_cli::launch;
use gallocy_transport::coordinator::PortHold;

use report::{FaultLine, Fields, FloorLine, Num, Summary, SummaryJson};

const USAGE: &str = "\
gallocy-bench fault [--procs 5] [--iters 5000] [--spin-us N] [--warmup N] [--timeout-s 600] [--no-pin]
                           [--cases read_home_owner,read_third_owner,write_0,write_1,write_3,read_refetch]
       gallocy-bench floor [--iters 5000] [--spin-us N] [--warmup N] [--no-pin]
       gallocy-bench malloc [--seconds 1.0] [--lib PATH] [--reps 3] [--warmup-s 0.25]
                            [--workloads small_1t,mixed_1t,small_2t,mixed_2t] [--timeout-s N] [--glibc-only]
       gallocy-bench syscalls [--iters 200000] [--batch 50] [--warmup 20000] [--reps 3] [--lib PATH]
                              [--workloads read_zero,pread_file,write_null] [--sides glibc,solo,joined] [--timeout-s 120]
       gallocy-bench fork [--pages 0,256,4096,32768] [--ro-div 8] [--iters 200] [--max-seconds 2] [--reps 3]
                          [--lib PATH] [--sides glibc,solo,joined] [--timeout-s 300]
       gallocy-bench preload-fault [--iters 1000] [--pages 256] [--lib PATH] [--timeout-s 600]
       gallocy-bench workloads [--workloads matmul,jacobi,false_sharing,lock_queue,pointer_chase,flag,peterson]
                               [--ranks 1,2,4] [--reps 3] [--consistency sequential,release] [--svg PATH]
                               [--matmul-n 1024] [--jacobi-n 2048] [--jacobi-iters 100] [--timeout-s 1800] [SIZES]";

const NOTES: &str = "\
--no-pin: do not pin the two floor processes to different CPUs (the ranks are never pinned).
--cases: run only these fault cases (default: all); JSON keys of cases not run are null.
GALLOCY_SPIN_US (default: the runtime's, gallocy::DEFAULT_SPIN_US) is used when --spin-us
is not given; the value is passed to every child.
Every subcommand prints a table and, as the last line of stdout, one JSON object.";

/// `gallocy-bench`: the command line.
#[derive(Debug, Parser)]
#[command(
    name = "gallocy-bench",
    about = "Latency and workload benchmarks for gallocy on local processes",
    override_usage = USAGE,
    after_help = NOTES,
    subcommand_required = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The floor, then remote read and write faults timed by rank 0 of a job of --procs ranks
    #[command(args_override_self = true, after_help = NOTES)]
    Fault(LatencyArgs),
    /// Only the floor (TCP round trip and SIGSEGV + mprotect, two processes; no runtime)
    #[command(args_override_self = true, after_help = NOTES)]
    Floor(LatencyArgs),
    /// The malloc fast path of libgallocy.so (LD_PRELOAD) against glibc
    #[command(args_override_self = true, after_help = malloc::HELP)]
    Malloc(malloc::MallocArgs),
    /// The shim's system-call wrappers next to glibc (glibc, 1-process and joined sides)
    #[command(args_override_self = true, after_help = syscalls::HELP)]
    Syscalls(syscalls::SyscallsArgs),
    /// The cost of fork against the heap pages a process holds (glibc, 1-process and joined sides)
    #[command(args_override_self = true, after_help = fork::HELP)]
    Fork(fork::ForkArgs),
    /// The remote read fault of a program under LD_PRELOAD=libgallocy.so (2 ranks)
    #[command(args_override_self = true, after_help = preload_fault::HELP)]
    PreloadFault(preload_fault::PreloadFaultArgs),
    /// Application workloads on gallocy at N ranks against sequential versions, flags and fairness
    #[command(args_override_self = true, after_help = workloads::HELP)]
    Workloads(workloads::WorkloadsArgs),
    /// Floor phase: the TCP server (ADDR)
    #[command(name = "__floor-server", hide = true)]
    FloorServer(LatencyArgs),
    /// Floor phase: the client, which also does the SIGSEGV measurements (ADDR)
    #[command(name = "__floor-client", hide = true)]
    FloorClient(LatencyArgs),
    /// One rank of the fault job
    #[command(name = "__fault-rank", hide = true)]
    FaultRank(LatencyArgs),
    #[command(name = "__malloc-child", hide = true)]
    MallocChild(malloc::MallocChildArgs),
    #[command(name = "__syscalls-child", hide = true)]
    SyscallsChild(syscalls::SyscallsChildArgs),
    #[command(name = "__fork-child", hide = true)]
    ForkChild(fork::ForkChildArgs),
    #[command(name = "__preload-fault-child", hide = true)]
    PreloadFaultChild(preload_fault::PreloadFaultChildArgs),
    #[command(name = "__workloads-rank", hide = true)]
    WorkloadsRank(workloads::RankArgs),
}

/// Options of `fault` and `floor` (and of their hidden children).
#[derive(Debug, Clone, Args)]
struct LatencyArgs {
    /// Ranks of the fault job (at least 2; `fault` only)
    #[arg(long, value_name = "N", default_value_t = 5)]
    procs: usize,
    /// Timed samples per case
    #[arg(long, value_name = "N", default_value_t = 5000)]
    iters: usize,
    /// Untimed samples before them [default: min(iters / 10, 200)]
    #[arg(long, value_name = "N")]
    warmup: Option<usize>,
    /// How long every process spins before it sleeps, in µs [default: GALLOCY_SPIN_US, else the
    /// runtime's]
    #[arg(long = "spin-us", value_name = "N")]
    spin_us: Option<u64>,
    /// Time limit of each group of processes, in seconds
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 600)]
    timeout_s: u64,
    /// Do not pin the two floor processes to different CPUs (the ranks are never pinned)
    #[arg(long = "no-pin")]
    no_pin: bool,
    /// Run only these fault cases (comma-separated: read_home_owner, read_third_owner, write_0,
    /// write_1, write_3, read_refetch) [default: all]
    #[arg(long, value_name = "A,B")]
    cases: Option<String>,
    /// The address (hidden subcommands)
    #[arg(hide = true)]
    positional: Vec<String>,
}

impl LatencyArgs {
    fn into_opts(self) -> Result<Opts> {
        if self.iters == 0 {
            bail!("--iters must be at least 1");
        }
        Ok(Opts {
            procs: self.procs,
            iters: self.iters,
            warmup: self.warmup,
            spin_us: self.spin_us.unwrap_or_else(net::spin_us_from_env),
            timeout_s: self.timeout_s,
            pin: !self.no_pin,
            cases: self.cases.as_deref().map(parse_cases).transpose()?,
            positional: self.positional,
        })
    }
}

/// Options common to `fault` and `floor`.
#[derive(Debug, Clone)]
struct Opts {
    procs: usize,
    iters: usize,
    /// None = min(iters / 10, 200).
    warmup: Option<usize>,
    spin_us: u64,
    timeout_s: u64,
    /// Pin the floor server and client to different CPUs (default on).
    pin: bool,
    /// Fault cases to run (`--cases`); None = all of [`cases::CASES`].
    cases: Option<Vec<String>>,
    /// Positional arguments (hidden subcommands take an address).
    positional: Vec<String>,
}

impl Opts {
    fn warmup(&self) -> usize {
        self.warmup.unwrap_or((self.iters / 10).min(200))
    }

    /// The fault cases selected by `--cases` (all when not given), in [`cases::CASES`] order.
    fn selected_cases(&self) -> Vec<&'static cases::Case> {
        cases::CASES.iter().filter(|c| self.cases.as_ref().is_none_or(|sel| sel.iter().any(|n| n == c.name))).collect()
    }
}

/// `--cases a,b`: known case names, at least one.
fn parse_cases(v: &str) -> Result<Vec<String>> {
    let names: Vec<String> = v.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
    if names.is_empty() {
        bail!("--cases needs at least one case name");
    }
    for n in &names {
        if !cases::CASES.iter().any(|c| c.name == n) {
            let known: Vec<&str> = cases::CASES.iter().map(|c| c.name).collect();
            bail!("--cases: unknown case {n} (known: {})", known.join(","));
        }
    }
    Ok(names)
}

fn main() {
    // The subcommand as given, for messages.
    let name = std::env::args().nth(1).unwrap_or_default();
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(&name, e));
    let result = match cli.cmd {
        Cmd::Fault(a) => a.into_opts().and_then(|o| cmd_fault(&o)),
        Cmd::Floor(a) => a.into_opts().and_then(|o| cmd_floor(&o)),
        Cmd::Malloc(a) => malloc::cmd_malloc(a),
        Cmd::Syscalls(a) => syscalls::cmd_syscalls(a),
        Cmd::Fork(a) => fork::cmd_fork(a),
        Cmd::PreloadFault(a) => preload_fault::cmd(a),
        Cmd::Workloads(a) => workloads::cmd(a),
        Cmd::FloorServer(a) => {
            a.into_opts().and_then(|o| pin_from_env().and_then(|()| floor::serve_addr(addr_arg(&o)?, o.spin_us * 1000)))
        }
        Cmd::FloorClient(a) => a.into_opts().and_then(|o| pin_from_env().and_then(|()| child_floor_client(&o))),
        Cmd::FaultRank(a) => a.into_opts().and_then(|o| cases::run_rank(&o.selected_cases(), o.iters, o.warmup())),
        Cmd::MallocChild(a) => malloc::child_main(a),
        Cmd::SyscallsChild(a) => syscalls::child_main(a),
        Cmd::ForkChild(a) => fork::child_main(a),
        Cmd::PreloadFaultChild(a) => preload_fault::child_main(a),
        Cmd::WorkloadsRank(a) => workloads::rank_main(a),
    };
    if let Err(e) = result {
        eprintln!("gallocy-bench {name}: error: {e:#}");
        std::process::exit(1);
    }
}

/// A command line clap rejected: `--help` prints and exits 0; no subcommand prints the help to
/// stderr and exits 2; any other mistake is an error of the subcommand (exit 1; `workloads`:
/// exit 2, as clap's own usage errors).
fn usage_error(name: &str, e: clap::Error) -> ! {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => e.exit(),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", Cli::command().render_help());
            std::process::exit(2);
        }
        _ => {
            let text = e.render().to_string();
            eprint!("gallocy-bench {name}: {text}");
            std::process::exit(if name == "workloads" { 2 } else { 1 });
        }
    }
}

/// Parses `args` (no program name) into one of the [`Args`] structs (tests).
#[cfg(test)]
fn parse_args<A: Args>(args: &[&str]) -> Result<A> {
    let cmd = A::augment_args(clap::Command::new("test").no_binary_name(true));
    let matches = cmd.try_get_matches_from(args)?;
    Ok(A::from_arg_matches(&matches)?)
}

fn addr_arg(o: &Opts) -> Result<SocketAddr> {
    let a = o.positional.first().context("missing address argument")?;
    a.parse().with_context(|| format!("bad address {a}"))
}

/// Arguments passed down to children so they use the same iteration counts.
fn child_args(sub: &str, o: &Opts, extra: &[String]) -> Vec<String> {
    let mut v = vec![sub.to_string(), "--iters".into(), o.iters.to_string(), "--warmup".into(), o.warmup().to_string()];
    if let Some(sel) = &o.cases {
        v.push("--cases".into());
        v.push(sel.join(","));
    }
    v.extend_from_slice(extra);
    v
}

fn child_floor_client(o: &Opts) -> Result<()> {
    let rows = floor::run_client(addr_arg(o)?, o.iters, o.warmup(), o.spin_us * 1000)?;
    for r in rows {
        println!("{}", r.to_record());
    }
    Ok(())
}

/// Env variable that tells a floor child which CPU to pin itself to.
const PIN_ENV: &str = "GALLOCY_BENCH_PIN_CPU";

/// Pin the calling process to the CPU named by [`PIN_ENV`], if set.
fn pin_from_env() -> Result<()> {
    let Ok(v) = std::env::var(PIN_ENV) else {
        return Ok(());
    };
    let cpu: usize = v.parse().with_context(|| format!("{PIN_ENV}={v}"))?;
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, CPU_SET stays in bounds for
    // cpu < CPU_SETSIZE (checked), and sched_setaffinity(0, ..) affects only this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("{PIN_ENV}={cpu} out of range");
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity({cpu}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: zeroed cpu_set_t is valid; sched_getaffinity fills it; CPU_ISSET reads in bounds.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Floor phase: a server process and a client process on a fresh loopback port. With `pin`
/// and at least two CPUs they run on different CPUs: with both on one CPU, each side's spin
/// keeps the other off the CPU and a round trip costs about two spin periods, which is a
/// scheduling accident, not a floor.
fn run_floor_phase(o: &Opts) -> Result<Vec<Summary>> {
    // Held until the server listens on it (it joins the hold), so that nothing else takes it.
    let hold = PortHold::loopback().context("a loopback port for the floor server")?;
    let addr = hold.addr().to_string();
    let spin = ("GALLOCY_SPIN_US".to_string(), o.spin_us.to_string());
    let cpus = allowed_cpus();
    let (mut server_env, mut client_env) = (vec![spin.clone()], vec![spin]);
    if o.pin && cpus.len() >= 2 {
        client_env.push((PIN_ENV.into(), cpus[0].to_string()));
        server_env.push((PIN_ENV.into(), cpus[1].to_string()));
    }
    let members = vec![
        child::copy_of_self("floor-server", &child_args("__floor-server", o, std::slice::from_ref(&addr)))?
            .envs(server_env),
        child::copy_of_self("floor-client", &child_args("__floor-client", o, &[addr]))?.envs(client_env),
    ];
    let recs = child::run_copies(members, Duration::from_secs(o.timeout_s))?;
    let rows: Vec<Summary> = recs.iter().filter_map(|l| Summary::parse_record(l)).collect();
    if rows.len() != 3 {
        bail!("floor phase reported {} results, expected 3", rows.len());
    }
    Ok(rows)
}

/// Share of CPU time the whole machine spent idle over `window` (0..100), from /proc/stat;
/// NaN if unknown. Taken before a run: other work on this 2-core machine skews every number.
fn idle_pct(window: Duration) -> f64 {
    fn sample() -> Option<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let line = s.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((idle, v.iter().sum()))
    }
    let Some((i0, t0)) = sample() else {
        return f64::NAN;
    };
    std::thread::sleep(window);
    let Some((i1, t1)) = sample() else {
        return f64::NAN;
    };
    if t1 <= t0 {
        return f64::NAN;
    }
    100.0 * (i1 - i0) as f64 / (t1 - t0) as f64
}

/// 1-minute load average (other work on this 2-core machine skews the numbers); NaN if unknown.
fn load_avg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn find<'a>(rows: &'a [Summary], name: &str) -> Option<&'a Summary> {
    rows.iter().find(|r| r.name == name)
}

fn cmd_floor(o: &Opts) -> Result<()> {
    let rows = run_floor_phase(o)?;
    print!("{}", report::table(&rows));
    let line = FloorLine {
        bench: "floor",
        iters: o.iters,
        spin_us: o.spin_us,
        load_avg_1m: Num(load_avg_1m()),
        floor_pinned: o.pin,
        floor: floor_fields(&rows),
    };
    println!("{}", report::to_line(&line));
    Ok(())
}

/// `floor_p50_us`, `floor_p99_us`, `floor_tcp_rtt_p50_us`, ... of the floor rows present.
fn floor_fields(rows: &[Summary]) -> Fields {
    let mut j = Fields::new();
    for (key, name) in [("floor", "floor"), ("floor_tcp_rtt", "floor.tcp_rtt"), ("floor_segv", "floor.segv_mprotect")] {
        if let Some(r) = find(rows, name) {
            j.num(format!("{key}_p50_us"), r.p50_us()).num(format!("{key}_p99_us"), r.p99_us());
        }
    }
    j
}

/// The transport the ranks are asked for (they inherit `GALLOCY_TRANSPORT`); `auto` if unset.
fn transport_from_env() -> String {
    match std::env::var("GALLOCY_TRANSPORT") {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => "auto".to_string(),
    }
}

fn cmd_fault(o: &Opts) -> Result<()> {
    if o.procs < 2 {
        bail!("--procs must be at least 2 (rank 0 times faults on pages another rank owns)");
    }
    let idle = idle_pct(Duration::from_millis(300));
    println!(
        "gallocy-bench fault: procs={} iters={} warmup={} spin_us={} load_avg_1m={:.2} idle_before={:.0}%",
        o.procs,
        o.iters,
        o.warmup(),
        o.spin_us,
        load_avg_1m(),
        idle
    );
    if idle < 90.0 {
        println!("warning: the machine was only {idle:.0}% idle before the run; expect inflated numbers");
    }
    let floor_rows = run_floor_phase(o)?;

    let job = launch::LocalJob::new()?;
    let members = (0..o.procs)
        .map(|r| {
            Ok(child::copy_of_self(format!("rank {r}"), &child_args("__fault-rank", o, &[]))?
                .envs(job.rank_env(r, o.procs))
                .env("GALLOCY_SPIN_US", o.spin_us.to_string())
                // Each timed access is one miss: no prefetch.
                .env("GALLOCY_PREFETCH", "1"))
        })
        .collect::<Result<Vec<_>>>()?;
    let recs = child::run_copies(members, Duration::from_secs(o.timeout_s))?;
    let mut case_rows = Vec::new();
    let mut skipped = Vec::new();
    for line in &recs {
        if let Some(s) = Summary::parse_record(line) {
            case_rows.push(s);
        } else if let Some(rest) = line.strip_prefix(report::SKIP_PREFIX) {
            skipped.push(rest.to_string());
        }
    }

    let mut all = floor_rows.clone();
    all.extend(case_rows.iter().cloned());
    println!();
    print!("{}", report::table(&all));
    for s in &skipped {
        println!("skipped: {s}");
    }

    let floor = find(&floor_rows, "floor").context("no floor result")?;
    // Every selected case the job is big enough for, and that the memory model runs, must have
    // reported.
    for c in o.selected_cases() {
        let skipped_by_model = skipped.iter().any(|s| s.split_whitespace().next() == Some(c.name));
        if c.min_procs() <= o.procs && !skipped_by_model && find(&case_rows, c.name).is_none() {
            bail!("no {} result", c.name);
        }
    }
    // Cases not selected with --cases: their keys are null.
    let p50_p99 = |name: &str| find(&case_rows, name).map_or((f64::NAN, f64::NAN), |r| (r.p50_us(), r.p99_us()));
    let (read_p50, read_p99) = p50_p99("read_home_owner");
    let (write_p50, write_p99) = p50_p99("write_0");
    let mut results = floor_fields(&floor_rows);
    results.num("ratio", read_p50 / floor.p50_us()).num("write_ratio", write_p50 / floor.p50_us());
    for r in &case_rows {
        results.num(format!("{}_p50_us", r.name), r.p50_us()).num(format!("{}_p99_us", r.name), r.p99_us());
    }
    let mut cases = Fields::new();
    for r in all.iter() {
        cases.insert(r.name.clone(), SummaryJson::from(r));
    }
    let line = FaultLine {
        bench: "fault",
        procs: o.procs,
        iters: o.iters,
        spin_us: o.spin_us,
        transport: transport_from_env(),
        load_avg_1m: Num(load_avg_1m()),
        idle_before_pct: Num(idle),
        floor_pinned: o.pin,
        read_fault_p50_us: Num(read_p50),
        read_fault_p99_us: Num(read_p99),
        write_fault_p50_us: Num(write_p50),
        write_fault_p99_us: Num(write_p99),
        results,
        cases,
    };
    println!("{}", report::to_line(&line));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_opts(args: &[&str]) -> Result<Opts> {
        parse_args::<LatencyArgs>(args)?.into_opts()
    }

    #[test]
    fn parses_options() {
        let o = parse_opts(&["--procs", "3", "--iters=100", "--spin-us", "7", "x"]).unwrap();
        assert_eq!((o.procs, o.iters, o.spin_us, o.warmup()), (3, 100, 7, 10));
        assert_eq!(o.positional, ["x"]);
        assert_eq!(parse_opts(&[]).unwrap().warmup(), 200);
        assert!(parse_opts(&["--bogus"]).is_err());
        assert!(parse_opts(&["--iters"]).is_err());
        assert!(parse_opts(&["--iters", "0"]).is_err());
        assert!(parse_opts(&["--iters", "x"]).is_err());
        assert!(!parse_opts(&["--no-pin", "--timeout-s=9"]).unwrap().pin);
    }

    #[test]
    fn parses_cases() {
        let all = parse_opts(&[]).unwrap();
        assert_eq!(all.selected_cases().len(), cases::CASES.len());
        assert!(!child_args("__fault-rank", &all, &[]).contains(&"--cases".to_string()));
        let o = parse_opts(&["--cases", "read_third_owner,read_home_owner", "--iters", "10"]).unwrap();
        let names: Vec<&str> = o.selected_cases().iter().map(|c| c.name).collect();
        assert_eq!(names, ["read_home_owner", "read_third_owner"]);
        let args = child_args("__fault-rank", &o, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let back = parse_opts(&args[1..]).unwrap();
        assert_eq!(back.cases, o.cases);
        assert_eq!(parse_opts(&["--cases=write_0"]).unwrap().selected_cases().len(), 1);
        assert!(parse_opts(&["--cases", "nope"]).is_err());
        assert!(parse_opts(&["--cases", ","]).is_err());
        assert!(parse_opts(&["--cases"]).is_err());
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["gallocy-bench", "floor", "--iters", "5", "--iters", "7"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Floor(LatencyArgs { iters: 7, .. })), "the last value wins");
        let cli = Cli::try_parse_from(["gallocy-bench", "preload-fault", "--iters", "5"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::PreloadFault(_)));
        for bad in [&["gallocy-bench", "nope"][..], &["gallocy-bench", "floor", "--iters", "x"]] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
