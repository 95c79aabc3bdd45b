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
//! ```
//!
//! `fault` first measures the floor (two helper processes: a TCP server and a client that also
//! does the SIGSEGV measurements), then starts `--procs` ranks of a gallocy job and has rank 0
//! time remote read and write faults. It prints a table and, as the last line of stdout, one
//! JSON object. `floor` runs only the first part (it does not need the runtime). `malloc` compares
//! the malloc fast path of glibc and of `libgallocy.so` (LD_PRELOAD) in child processes (see
//! [`malloc`]). `syscalls` measures the shim's system-call wrappers next to glibc (see
//! [`syscalls`]), `fork` the cost of fork against the heap pages a joined process holds (see
//! [`fork`]), `preload-fault` the remote read fault of a preloaded program (see [`preload_fault`]).
//!
//! Hidden subcommands (used by the launcher): `__floor-server ADDR`, `__floor-client ADDR`,
//! `__fault-rank`, `__malloc-child`, `__syscalls-child`, `__fork-child`,
//! `__preload-fault-child`.

mod cases;
mod child;
mod floor;
mod fork;
mod launch;
mod malloc;
mod net;
mod preload_fault;
mod report;
mod syscalls;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use report::{JsonObject, Summary};

const USAGE: &str = "usage:
  gallocy-bench fault [--procs 5] [--iters 5000] [--spin-us N] [--warmup N] [--timeout-s 600] [--no-pin]
                      [--cases read_home_owner,read_third_owner,write_0,write_1,write_3]
  gallocy-bench floor [--iters 5000] [--spin-us N] [--warmup N] [--no-pin]
  gallocy-bench malloc [--seconds 1.0] [--lib PATH] [--reps 3] [--warmup-s 0.25]
                       [--workloads small_1t,mixed_1t,small_2t,mixed_2t] [--timeout-s N] [--glibc-only]
  gallocy-bench syscalls [--iters 200000] [--batch 50] [--warmup 20000] [--reps 3] [--lib PATH]
                         [--workloads read_zero,pread_file,write_null] [--sides glibc,solo,joined] [--timeout-s 120]
  gallocy-bench fork [--pages 0,256,4096,32768] [--ro-div 8] [--iters 200] [--max-seconds 2] [--reps 3]
                     [--lib PATH] [--sides glibc,solo,joined] [--timeout-s 300]
  gallocy-bench preload-fault [--iters 1000] [--pages 256] [--lib PATH] [--timeout-s 600]
--no-pin: do not pin the two floor processes to different CPUs (the ranks are never pinned).
--cases: run only these fault cases (default: all); JSON keys of cases not run are null.
GALLOCY_SPIN_US (default: the runtime's, gallocy::DEFAULT_SPIN_US) is used when --spin-us\nis not given; the value is passed to every child.";

/// Options common to all subcommands.
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

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        procs: 5,
        iters: 5000,
        warmup: None,
        spin_us: net::spin_us_from_env(),
        timeout_s: 600,
        pin: true,
        cases: None,
        positional: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut text = |name: &str| -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => Ok(it.next().with_context(|| format!("{name} needs a value"))?.clone()),
            }
        };
        if key == "--cases" {
            o.cases = Some(parse_cases(&text(key)?)?);
            continue;
        }
        let mut value = |name: &str| -> Result<u64> {
            let v = text(name)?;
            v.parse().with_context(|| format!("{name}: not a number: {v}"))
        };
        match key {
            "--procs" => o.procs = value(key)? as usize,
            "--iters" => o.iters = value(key)? as usize,
            "--warmup" => o.warmup = Some(value(key)? as usize),
            "--spin-us" => o.spin_us = value(key)?,
            "--timeout-s" => o.timeout_s = value(key)?,
            "--no-pin" => o.pin = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            k if k.starts_with('-') => bail!("unknown option {k}\n{USAGE}"),
            _ => o.positional.push(a.clone()),
        }
    }
    if o.iters == 0 {
        bail!("--iters must be at least 1");
    }
    Ok(o)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let result = match cmd.as_str() {
        // Own option sets (fractional seconds, a path).
        "malloc" => malloc::cmd_malloc(&args[1..]),
        "__malloc-child" => malloc::child_main(&args[1..]),
        "syscalls" => syscalls::cmd_syscalls(&args[1..]),
        "__syscalls-child" => syscalls::child_main(&args[1..]),
        "fork" => fork::cmd_fork(&args[1..]),
        "__fork-child" => fork::child_main(&args[1..]),
        "preload-fault" => preload_fault::cmd(&args[1..]),
        "__preload-fault-child" => preload_fault::child_main(&args[1..]),
        _ => run_latency_cmd(cmd, &args[1..]),
    };
    if let Err(e) = result {
        eprintln!("gallocy-bench {cmd}: error: {e:#}");
        std::process::exit(1);
    }
}

fn run_latency_cmd(cmd: &str, args: &[String]) -> Result<()> {
    parse_opts(args).and_then(|o| match cmd {
        "fault" => cmd_fault(&o),
        "floor" => cmd_floor(&o),
        "__floor-server" => pin_from_env().and_then(|()| floor::serve_addr(addr_arg(&o)?, o.spin_us * 1000)),
        "__floor-client" => pin_from_env().and_then(|()| child_floor_client(&o)),
        "__fault-rank" => cases::run_rank(&o.selected_cases(), o.iters, o.warmup()),
        other => bail!("unknown subcommand {other}\n{USAGE}"),
    })
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
    let addr = format!("127.0.0.1:{}", launch::free_port()?);
    let env = vec![("GALLOCY_SPIN_US".to_string(), o.spin_us.to_string())];
    let cpus = allowed_cpus();
    let (mut server_env, mut client_env) = (env.clone(), env);
    if o.pin && cpus.len() >= 2 {
        client_env.push((PIN_ENV.into(), cpus[0].to_string()));
        server_env.push((PIN_ENV.into(), cpus[1].to_string()));
    }
    let specs = vec![
        launch::Spec {
            label: "floor-server".into(),
            args: child_args("__floor-server", o, std::slice::from_ref(&addr)),
            env: server_env,
        },
        launch::Spec { label: "floor-client".into(), args: child_args("__floor-client", o, &[addr]), env: client_env },
    ];
    let recs = launch::run_group(specs, Duration::from_secs(o.timeout_s))?;
    let rows: Vec<Summary> = recs.iter().filter_map(|(_, l)| Summary::parse_record(l)).collect();
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
    let mut j = JsonObject::new();
    j.str("bench", "floor")
        .int("iters", o.iters as u64)
        .int("spin_us", o.spin_us)
        .num("load_avg_1m", load_avg_1m())
        .raw("floor_pinned", o.pin.to_string());
    add_floor_json(&mut j, &rows);
    println!("{}", j.render());
    Ok(())
}

fn add_floor_json(j: &mut JsonObject, rows: &[Summary]) {
    for (key, name) in [("floor", "floor"), ("floor_tcp_rtt", "floor.tcp_rtt"), ("floor_segv", "floor.segv_mprotect")] {
        if let Some(r) = find(rows, name) {
            j.num(&format!("{key}_p50_us"), r.p50_us()).num(&format!("{key}_p99_us"), r.p99_us());
        }
    }
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

    let coordinator = format!("127.0.0.1:{}", launch::free_port()?);
    let token = launch::token();
    let specs = (0..o.procs)
        .map(|r| launch::Spec {
            label: format!("rank {r}"),
            args: child_args("__fault-rank", o, &[]),
            env: vec![
                ("GALLOCY_RANK".into(), r.to_string()),
                ("GALLOCY_SIZE".into(), o.procs.to_string()),
                ("GALLOCY_COORDINATOR".into(), coordinator.clone()),
                ("GALLOCY_TOKEN".into(), token.clone()),
                ("GALLOCY_SPIN_US".into(), o.spin_us.to_string()),
            ],
        })
        .collect();
    let recs = launch::run_group(specs, Duration::from_secs(o.timeout_s))?;
    let mut case_rows = Vec::new();
    let mut skipped = Vec::new();
    for (_, line) in &recs {
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
    // Every selected case the job is big enough for must have reported.
    for c in o.selected_cases() {
        if c.min_procs() <= o.procs && find(&case_rows, c.name).is_none() {
            bail!("no {} result", c.name);
        }
    }
    // Cases not selected with --cases: their keys are null.
    let p50_p99 = |name: &str| find(&case_rows, name).map_or((f64::NAN, f64::NAN), |r| (r.p50_us(), r.p99_us()));
    let (read_p50, read_p99) = p50_p99("read_home_owner");
    let (write_p50, write_p99) = p50_p99("write_0");
    let mut j = JsonObject::new();
    j.str("bench", "fault")
        .int("procs", o.procs as u64)
        .int("iters", o.iters as u64)
        .int("spin_us", o.spin_us)
        .str("transport", &transport_from_env())
        .num("load_avg_1m", load_avg_1m())
        .num("idle_before_pct", idle)
        .raw("floor_pinned", o.pin.to_string())
        .num("read_fault_p50_us", read_p50)
        .num("read_fault_p99_us", read_p99)
        .num("write_fault_p50_us", write_p50)
        .num("write_fault_p99_us", write_p99);
    add_floor_json(&mut j, &floor_rows);
    j.num("ratio", read_p50 / floor.p50_us()).num("write_ratio", write_p50 / floor.p50_us());
    for r in &case_rows {
        j.num(&format!("{}_p50_us", r.name), r.p50_us()).num(&format!("{}_p99_us", r.name), r.p99_us());
    }
    let mut cases = JsonObject::new();
    for r in all.iter() {
        cases.raw(&r.name, report::summary_json(r));
    }
    j.raw("cases", cases.render());
    println!("{}", j.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        let o = parse_opts(&s(&["--procs", "3", "--iters=100", "--spin-us", "7", "x"])).unwrap();
        assert_eq!((o.procs, o.iters, o.spin_us, o.warmup()), (3, 100, 7, 10));
        assert_eq!(o.positional, ["x"]);
        assert_eq!(parse_opts(&s(&[])).unwrap().warmup(), 200);
        assert!(parse_opts(&s(&["--bogus"])).is_err());
        assert!(parse_opts(&s(&["--iters"])).is_err());
    }

    #[test]
    fn parses_cases() {
        let all = parse_opts(&s(&[])).unwrap();
        assert_eq!(all.selected_cases().len(), cases::CASES.len());
        assert!(!child_args("__fault-rank", &all, &[]).contains(&"--cases".to_string()));
        let o = parse_opts(&s(&["--cases", "read_third_owner,read_home_owner", "--iters", "10"])).unwrap();
        let names: Vec<&str> = o.selected_cases().iter().map(|c| c.name).collect();
        assert_eq!(names, ["read_home_owner", "read_third_owner"]);
        let args = child_args("__fault-rank", &o, &[]);
        let back = parse_opts(&args[1..]).unwrap();
        assert_eq!(back.cases, o.cases);
        assert_eq!(parse_opts(&s(&["--cases=write_0"])).unwrap().selected_cases().len(), 1);
        assert!(parse_opts(&s(&["--cases", "nope"])).is_err());
        assert!(parse_opts(&s(&["--cases", ","])).is_err());
        assert!(parse_opts(&s(&["--cases"])).is_err());
    }
}
