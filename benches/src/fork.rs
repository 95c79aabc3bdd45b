//! `gallocy-bench fork`: the cost of `fork()` as a function of the heap pages a process holds.
//!
//! In a process that joined its job, the shim gives a forked child a real snapshot of the heap
//! (the child copies every page the parent holds), so a fork costs more the more pages are held.
//! In a one-process job the heap is private memory and the kernel's copy-on-write does it.
//!
//! A child of this executable (hidden subcommand `__fork-child`) holds P pages for each P of
//! `--pages` (growing: 0, 256, 4096, 32768 by default) and times `fork()`, the child's `_exit(0)`
//! and `waitpid()` (hdrhistogram, one sample per fork, until `--iters` forks or `--max-seconds`).
//! Of the P pages, P / `--ro-div` are held read-only and the rest writable:
//! * joined (2-rank job, `LD_PRELOAD=libgallocy.so`, `gallocy_init`): rank 0 mallocs and writes the
//!   writable pages (its own arena); rank 1 mallocs and writes the read-only ones and broadcasts
//!   their address, and rank 0 reads one byte of each (a read copy). Rank 1 waits in a barrier
//!   while rank 0 forks.
//! * 1-process (`LD_PRELOAD`, no job: private heap, plain copy-on-write fork) and glibc (no
//!   preload): the same P pages malloc'ed and written, the "read-only" ones also read.
//!
//! The parent runs every side `--reps` times (rotating which side goes first), takes the median of
//! the per-run p50, and prints µs per fork, the marginal µs per held page ((p50(P) - p50(0)) / P),
//! the joined / 1-process ratio, and, as the last stdout line, one JSON object.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::child::{self, Api, Side};
use crate::malloc::median;
use crate::net::now_ns;
use crate::report::{new_histogram, Fields, ForkLine, Num, Summary};

/// `gallocy-bench fork --help`, after the options.
pub const HELP: &str = "\
--pages: heap pages held when forking (ascending); --ro-div: 1 in N of them held read-only.
--iters / --max-seconds: forks per P and run (at least 5).";

/// Default of `--pages`.
const DEFAULT_PAGES: &str = "0,256,4096,32768";

const SIDES: [(&str, Side); 3] = [("glibc", Side::Glibc), ("solo", Side::Solo), ("joined", Side::Joined)];

/// Fewest forks per P, whatever `--max-seconds` says.
const MIN_FORKS: usize = 5;

fn parse_pages(v: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for p in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(p.parse::<usize>().with_context(|| format!("--pages: not a number: {p}"))?);
    }
    if out.is_empty() || out.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--pages: a non-empty ascending list");
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Child side.

struct ChildOpts {
    pages: Vec<usize>,
    ro_div: usize,
    iters: usize,
    max_seconds: f64,
    joined: bool,
}

/// `__fork-child [--joined] [--pages P,Q] [--ro-div N] [--iters N] [--max-seconds S]`
#[derive(Debug, Clone, Args)]
pub struct ForkChildArgs {
    #[arg(long, default_value = DEFAULT_PAGES)]
    pages: String,
    #[arg(long = "ro-div", default_value_t = 8)]
    ro_div: usize,
    #[arg(long, default_value_t = 200)]
    iters: usize,
    #[arg(long = "max-seconds", default_value_t = 2.0)]
    max_seconds: f64,
    #[arg(long)]
    joined: bool,
}

impl ForkChildArgs {
    fn into_opts(self) -> Result<ChildOpts> {
        let o = ChildOpts {
            pages: parse_pages(&self.pages)?,
            ro_div: self.ro_div,
            iters: self.iters,
            max_seconds: self.max_seconds,
            joined: self.joined,
        };
        if o.ro_div == 0 {
            bail!("--ro-div must be at least 1");
        }
        Ok(o)
    }
}

/// `pages` fresh pages from malloc (page-aligned start), never freed.
fn alloc_pages(pages: usize, page: usize) -> Result<*mut u8> {
    // SAFETY: plain C malloc (whatever this process has).
    let p = unsafe { libc::malloc((pages + 1) * page) } as usize;
    if p == 0 {
        bail!("malloc of {pages} pages failed");
    }
    Ok(child::align_up(p, page) as *mut u8)
}

/// Write one byte in each of `pages` pages at `p`.
fn write_pages(p: *mut u8, pages: usize, page: usize, v: u8) {
    for i in 0..pages {
        // SAFETY: `p` has `pages` pages (alloc_pages).
        unsafe { p.add(i * page).write_volatile(v) };
    }
}

/// Read one byte of each of `pages` pages at `p`.
fn read_pages(p: *const u8, pages: usize, page: usize) -> u64 {
    let mut sum = 0u64;
    for i in 0..pages {
        // SAFETY: `p` has `pages` pages (alloc_pages, maybe another rank's: same address).
        sum += unsafe { p.add(i * page).read_volatile() } as u64;
    }
    sum
}

/// fork + child `_exit(0)` + waitpid, in nanoseconds.
fn one_fork() -> Result<u64> {
    let t0 = now_ns();
    // SAFETY: the child only calls _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: ends the child at once, without exit handlers.
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    let mut status = 0;
    // SAFETY: our own child; status is a valid out-parameter.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    let dt = now_ns() - t0;
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("forked child: waitpid {r}, status {status:#x}");
    }
    Ok(dt)
}

/// `__fork-child [--joined] ...`: print one record per P (rank 0 only when joined).
pub fn child_main(args: ForkChildArgs) -> Result<()> {
    let o = args.into_opts()?;
    let page = child::page_size();
    let api = if o.joined { Some(Api::load()?) } else { None };
    let rank = match &api {
        Some(api) => api.join(2)?,
        None => 0,
    };
    let (mut ro_held, mut rw_held) = (0usize, 0usize);
    let mut check = 0u64;
    for &p in &o.pages {
        let ro = p / o.ro_div;
        let rw = p - ro;
        // Grow the read-only set.
        let add_ro = ro - ro_held;
        if add_ro > 0 {
            match &api {
                Some(api) => {
                    let mut addr = 0u64;
                    if rank == 1 {
                        let q = alloc_pages(add_ro, page)?;
                        write_pages(q, add_ro, page, 7);
                        addr = q as u64;
                    }
                    let addr = api.broadcast_u64(addr, 1);
                    if rank == 0 {
                        check += read_pages(addr as *const u8, add_ro, page);
                    }
                }
                None => {
                    let q = alloc_pages(add_ro, page)?;
                    write_pages(q, add_ro, page, 7);
                    check += read_pages(q, add_ro, page);
                }
            }
            ro_held = ro;
        }
        // Grow the writable set.
        let add_rw = rw - rw_held;
        if add_rw > 0 && rank == 0 {
            let q = alloc_pages(add_rw, page)?;
            write_pages(q, add_rw, page, 9);
        }
        rw_held = rw;
        if rank == 0 {
            if check != 7 * ro_held as u64 {
                bail!("read-only pages: read {check}, expected {}", 7 * ro_held);
            }
            let mut h = new_histogram();
            for _ in 0..2 {
                one_fork()?;
            }
            let start = now_ns();
            let limit = (o.max_seconds * 1e9) as u64;
            while h.len() < MIN_FORKS as u64 || (h.len() < o.iters as u64 && now_ns() - start < limit) {
                h.record(one_fork()?.max(1)).context("histogram")?;
            }
            let s = Summary::from_histogram(&format!("P{p}"), &h, &format!("ro={ro} rw={rw}"));
            println!("{}", s.to_record());
        }
        if let Some(api) = &api {
            api.barrier();
        }
    }
    if let Some(api) = &api {
        api.finalize()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent side.

struct Opts {
    pages: Vec<usize>,
    ro_div: usize,
    iters: usize,
    max_seconds: f64,
    reps: usize,
    lib: Option<PathBuf>,
    sides: Vec<Side>,
    timeout_s: u64,
}

/// `gallocy-bench fork` options.
#[derive(Debug, Clone, Args)]
pub struct ForkArgs {
    /// Heap pages held when forking, ascending, comma-separated
    #[arg(long, value_name = "P,Q", default_value = DEFAULT_PAGES)]
    pages: String,
    /// 1 in N of the held pages is held read-only
    #[arg(long = "ro-div", value_name = "N", default_value_t = 8)]
    ro_div: usize,
    /// Forks per P and run (at least 5, unless --max-seconds ends it first)
    #[arg(long, value_name = "N", default_value_t = 200)]
    iters: usize,
    /// Longest time per P and run, in seconds
    #[arg(long = "max-seconds", value_name = "S", default_value_t = 2.0)]
    max_seconds: f64,
    /// Runs of every side; the table shows the median
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// The library to preload [default: libgallocy.so next to this executable]
    #[arg(long, value_name = "PATH")]
    lib: Option<PathBuf>,
    /// Sides, comma-separated (glibc, solo, joined) [default: all]
    #[arg(long, value_name = "A,B")]
    sides: Option<String>,
    /// Time limit per child (or pair of ranks), in seconds
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 300)]
    timeout_s: u64,
}

impl ForkArgs {
    fn into_opts(self) -> Result<Opts> {
        let o = Opts {
            pages: parse_pages(&self.pages)?,
            ro_div: self.ro_div,
            iters: self.iters,
            max_seconds: self.max_seconds,
            reps: self.reps,
            lib: self.lib,
            sides: match &self.sides {
                Some(v) => child::parse_list(v, "--sides", &SIDES)?,
                None => Side::ALL.to_vec(),
            },
            timeout_s: self.timeout_s,
        };
        if o.reps == 0 || o.ro_div == 0 || o.max_seconds.is_nan() || o.max_seconds <= 0.0 {
            bail!("--reps and --ro-div must be at least 1, --max-seconds > 0");
        }
        Ok(o)
    }
}

#[derive(Default, Clone)]
struct Cell {
    p50: Vec<f64>,
    p99: Vec<f64>,
    count: Vec<f64>,
    error: Option<String>,
}

pub fn cmd_fork(args: ForkArgs) -> Result<()> {
    let o = args.into_opts()?;
    let needs_lib = o.sides.iter().any(|s| *s != Side::Glibc);
    let lib =
        if needs_lib { Some(child::check_lib(&o.lib.clone().map_or_else(child::default_lib, Ok)?)?) } else { None };
    let timeout = Duration::from_secs(o.timeout_s);
    let idle = crate::idle_pct(Duration::from_millis(300));
    let load = crate::load_avg_1m();
    let page = child::page_size();
    println!(
        "gallocy-bench fork: pages={:?} ro_div={} iters={} max_seconds={} reps={} page={} lib={} load_avg_1m={:.2} idle_before={:.0}%",
        o.pages,
        o.ro_div,
        o.iters,
        o.max_seconds,
        o.reps,
        page,
        lib.as_ref().map_or("none".into(), |l| l.display().to_string()),
        load,
        idle
    );
    if idle < 90.0 {
        println!("warning: the machine was only {idle:.0}% idle before the run; expect noisy numbers");
    }
    let pages_s: Vec<String> = o.pages.iter().map(|p| p.to_string()).collect();
    let child_args = vec![
        "__fork-child".to_string(),
        "--pages".into(),
        pages_s.join(","),
        "--ro-div".into(),
        o.ro_div.to_string(),
        "--iters".into(),
        o.iters.to_string(),
        "--max-seconds".into(),
        o.max_seconds.to_string(),
    ];
    // cells[p][side]
    let mut cells: Vec<Vec<Cell>> = o.pages.iter().map(|_| vec![Cell::default(); o.sides.len()]).collect();
    for rep in 0..o.reps {
        for side in child::order(&o.sides, rep) {
            let si = o.sides.iter().position(|s| *s == side).expect("side");
            if cells.iter().all(|row| row[si].error.is_some()) {
                continue;
            }
            let what = format!("{} fork child (rep {})", side.title(), rep + 1);
            match child::run_side(side, &child_args, lib.as_deref(), &what, timeout) {
                Ok(lines) => {
                    for (pi, p) in o.pages.iter().enumerate() {
                        let cell = &mut cells[pi][si];
                        let name = format!("P{p}");
                        match lines.iter().filter_map(|l| Summary::parse_record(l)).find(|s| s.name == name) {
                            Some(s) => {
                                cell.p50.push(s.p50_ns as f64);
                                cell.p99.push(s.p99_ns as f64);
                                cell.count.push(s.count as f64);
                            }
                            None => cell.error = Some(format!("{what}: no result for P={p}")),
                        }
                    }
                }
                Err(e) => {
                    eprintln!("gallocy-bench fork: error: {e:#}");
                    for row in cells.iter_mut() {
                        row[si].error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        }
    }

    let us =
        |c: &Cell, v: &dyn Fn(&Cell) -> &Vec<f64>| if c.error.is_some() { f64::NAN } else { median(v(c)) / 1000.0 };
    let p50 = |pi: usize, si: usize| us(&cells[pi][si], &|c| &c.p50);
    let p99 = |pi: usize, si: usize| us(&cells[pi][si], &|c| &c.p99);
    // Marginal cost per held page, against the smallest P of the list.
    let per_page = |pi: usize, si: usize| {
        let dp = o.pages[pi] as f64 - o.pages[0] as f64;
        if dp > 0.0 {
            (p50(pi, si) - p50(0, si)) / dp
        } else {
            f64::NAN
        }
    };
    let solo_i = o.sides.iter().position(|s| *s == Side::Solo);
    let joined_i = o.sides.iter().position(|s| *s == Side::Joined);
    let fmt = |v: f64, prec: usize| if v.is_finite() { format!("{v:.prec$}") } else { "-".into() };

    println!();
    let mut head = format!("{:>6} {:>5}", "pages", "ro");
    for s in &o.sides {
        head += &format!(" {:>13} {:>9}", format!("{} µs", s.title()), "µs/page");
    }
    if solo_i.is_some() && joined_i.is_some() {
        head += &format!(" {:>14}", "joined/1-proc");
    }
    head += "   p99 µs (per side)";
    println!("{head}");
    let mut j = Fields::new();
    let mut errors = Vec::new();
    for (pi, p) in o.pages.iter().enumerate() {
        let mut line = format!("{:>6} {:>5}", p, p / o.ro_div);
        let mut tail = Vec::new();
        for (si, s) in o.sides.iter().enumerate() {
            line += &format!(" {:>13} {:>9}", fmt(p50(pi, si), 1), fmt(per_page(pi, si), 3));
            tail.push(fmt(p99(pi, si), 1));
            j.num(format!("{}_p{p}_us", s.key()), p50(pi, si))
                .num(format!("{}_p{p}_p99_us", s.key()), p99(pi, si))
                .num(format!("{}_p{p}_us_per_page", s.key()), per_page(pi, si));
            if let Some(e) = &cells[pi][si].error {
                errors.push(format!("P={p} {}: {e}", s.key()));
            }
        }
        if let (Some(a), Some(b)) = (solo_i, joined_i) {
            let r = p50(pi, b) / p50(pi, a);
            line += &format!(" {:>14}", fmt(r, 2));
            j.num(format!("ratio_p{p}"), r);
        }
        line += &format!("   {}", tail.join(" / "));
        println!("{line}");
    }
    println!(
        "µs per fork = p50 of fork + child _exit + waitpid (at least {MIN_FORKS}, up to {} forks or {} s per P), median \
         of {} runs; µs/page = (p50(P) - p50({})) / (P - {})",
        o.iters, o.max_seconds, o.reps, o.pages[0], o.pages[0]
    );
    errors.dedup();
    for e in &errors {
        println!("FAILED: {e}");
    }
    let line = ForkLine {
        bench: "fork",
        pages: o.pages.clone(),
        ro_div: o.ro_div,
        iters: o.iters,
        max_seconds: Num(o.max_seconds),
        reps: o.reps,
        page_size: page,
        lib: lib.as_ref().map(|l| l.display().to_string()),
        load_avg_1m: Num(load),
        idle_before_pct: Num(idle),
        results: j,
        errors: errors.clone(),
    };
    println!("{}", crate::report::to_line(&line));
    if !errors.is_empty() {
        bail!("{} cells failed (see above)", errors.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_opts(args: &[&str]) -> Result<Opts> {
        crate::parse_args::<ForkArgs>(args)?.into_opts()
    }

    #[test]
    fn options() {
        let o = parse_opts(&["--pages", "0,16", "--reps=1", "--sides", "solo"]).unwrap();
        assert_eq!((o.pages.clone(), o.reps, o.sides.len()), (vec![0, 16], 1, 1));
        assert!(parse_opts(&["--pages", "16,0"]).is_err());
        assert!(parse_opts(&["--pages", ""]).is_err());
        assert!(parse_opts(&["--max-seconds", "0"]).is_err());
        let o = parse_opts(&[]).unwrap();
        assert_eq!(
            (o.pages.clone(), o.ro_div, o.iters, o.reps, o.timeout_s),
            (vec![0, 256, 4096, 32768], 8, 200, 3, 300)
        );
        assert_eq!(o.max_seconds, 2.0);
        let c = crate::parse_args::<ForkChildArgs>(&["--joined", "--pages", "0,4", "--max-seconds", "0.5"]).unwrap();
        let c = c.into_opts().unwrap();
        assert!(c.joined && c.pages == [0, 4] && c.max_seconds == 0.5 && c.ro_div == 8);
    }

    #[test]
    fn forks_in_this_process() {
        let q = alloc_pages(4, child::page_size()).unwrap();
        write_pages(q, 4, child::page_size(), 3);
        assert_eq!(read_pages(q, 4, child::page_size()), 12);
        assert!(one_fork().unwrap() > 0);
    }
}
