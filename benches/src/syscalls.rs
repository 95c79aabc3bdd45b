//! `gallocy-bench syscalls`: the cost of the shim's system-call wrappers, next to glibc in the
//! same run.
//!
//! A child process (this executable, hidden subcommand `__syscalls-child`) makes one call on a
//! 4 KiB page-aligned buffer many times, timing batches of calls (hdrhistogram of ns per call,
//! one sample per batch), for each workload:
//! * `read_zero`: `read(2)` of 4 KiB from /dev/zero (the kernel writes the whole buffer);
//! * `pread_file`: `pread(2)` of 4 KiB from a 1 MiB file in the page cache, cycling offsets;
//! * `write_null`: `write(2)` of 4 KiB to /dev/null (the wrapper's cost; the kernel reads nothing).
//!
//! on three sides ([`crate::child::Side`]): glibc (no preload); `LD_PRELOAD=libgallocy.so` as a
//! one-process job (the buffer is a heap block, private memory); and a joined 2-rank job where
//! rank 0's buffer is a page of a `gallocy_alloc_collective` block that rank 0 holds writable
//! (rank 1 waits in a barrier). The child calls the C symbols (`read`, `pread`, `write`), so it
//! measures whatever the process ended up with, and reports which object defines `read`.
//!
//! The parent runs every side `--reps` times (rotating which side goes first), takes the median of
//! the per-run p50, prints a table (ns per call and the ratio to glibc) and, as the last stdout
//! line, one JSON object.

use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::child::{self, Api, Side};
use crate::malloc::median;
use crate::net::now_ns;
use crate::report::{new_histogram, Fields, Num, Summary, SyscallsLine};

/// `gallocy-bench syscalls --help`, after the options.
pub const HELP: &str = "\
--iters: calls per workload and run; --batch: calls timed together (one histogram sample, ns per call).
--sides: glibc = no preload; solo = LD_PRELOAD, one-process job; joined = LD_PRELOAD, 2-rank job,
         buffer in a shared-heap page held writable.";

/// One measured call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    ReadZero,
    PreadFile,
    WriteNull,
}

const WORKLOADS: [(&str, Workload); 3] =
    [("read_zero", Workload::ReadZero), ("pread_file", Workload::PreadFile), ("write_null", Workload::WriteNull)];

impl Workload {
    fn name(self) -> &'static str {
        WORKLOADS.iter().find(|(_, w)| *w == self).map(|(n, _)| *n).unwrap_or("?")
    }
}

const SIDES: [(&str, Side); 3] = [("glibc", Side::Glibc), ("solo", Side::Solo), ("joined", Side::Joined)];

/// Size of one call's transfer.
const LEN: usize = 4096;
/// The pread file: 256 pages.
const FILE_PAGES: usize = 256;

// ---------------------------------------------------------------------------------------------
// Child side.

struct ChildOpts {
    workloads: Vec<Workload>,
    iters: usize,
    batch: usize,
    warmup: usize,
    joined: bool,
    file: PathBuf,
}

/// `__syscalls-child [--joined] [--workloads a,b] [--iters N] [--batch N] [--warmup N] [--file PATH]`
#[derive(Debug, Clone, Args)]
pub struct SyscallsChildArgs {
    #[arg(long)]
    workloads: Option<String>,
    #[arg(long, default_value_t = 200_000)]
    iters: usize,
    #[arg(long, default_value_t = 50)]
    batch: usize,
    #[arg(long, default_value_t = 20_000)]
    warmup: usize,
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long)]
    joined: bool,
}

impl SyscallsChildArgs {
    fn into_opts(self) -> Result<ChildOpts> {
        let o = ChildOpts {
            workloads: match &self.workloads {
                Some(v) => child::parse_list(v, "--workloads", &WORKLOADS)?,
                None => WORKLOADS.iter().map(|(_, w)| *w).collect(),
            },
            iters: self.iters,
            batch: self.batch,
            warmup: self.warmup,
            joined: self.joined,
            file: self
                .file
                .unwrap_or_else(|| std::env::temp_dir().join(format!("gallocy-bench-syscalls-{}", std::process::id()))),
        };
        if o.batch == 0 || o.iters < o.batch {
            bail!("--iters must be at least --batch, and --batch at least 1");
        }
        Ok(o)
    }
}

fn errno() -> i32 {
    // SAFETY: errno is thread-local and always readable.
    unsafe { *libc::__errno_location() }
}

fn open(path: &str, flags: i32) -> Result<i32> {
    let c = CString::new(path)?;
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        bail!("open {path}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// One call of `w` on `fd` into/out of `buf` (iteration `i`); must move LEN bytes.
#[inline(always)]
fn call(w: Workload, fd: i32, buf: *mut u8, i: usize) -> isize {
    // SAFETY: `buf` is LEN writable bytes; the C symbols are whatever this process resolved
    // (glibc's or the preloaded library's wrappers).
    unsafe {
        match w {
            Workload::ReadZero => libc::read(fd, buf.cast(), LEN),
            Workload::PreadFile => libc::pread(fd, buf.cast(), LEN, ((i % FILE_PAGES) * LEN) as libc::off_t),
            Workload::WriteNull => libc::write(fd, buf.cast(), LEN),
        }
    }
}

fn measure(w: Workload, buf: *mut u8, o: &ChildOpts) -> Result<Summary> {
    let fd = match w {
        Workload::ReadZero => open("/dev/zero", libc::O_RDONLY)?,
        Workload::WriteNull => open("/dev/null", libc::O_WRONLY)?,
        Workload::PreadFile => {
            let path = o.file.to_string_lossy().into_owned();
            let fd = open(&path, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)?;
            let _ = std::fs::remove_file(&o.file);
            let page = vec![0x5Au8; LEN];
            for i in 0..FILE_PAGES {
                // SAFETY: `page` is LEN readable bytes (private memory).
                let n = unsafe { libc::pwrite(fd, page.as_ptr().cast(), LEN, (i * LEN) as libc::off_t) };
                if n != LEN as isize {
                    bail!("writing the pread file: {}", std::io::Error::last_os_error());
                }
            }
            fd
        }
    };
    let mut h = new_histogram();
    for i in 0..o.warmup {
        if call(w, fd, buf, i) != LEN as isize {
            bail!("{}: warm-up call failed: errno {}", w.name(), errno());
        }
    }
    let batches = o.iters / o.batch;
    for b in 0..batches {
        let t0 = now_ns();
        for k in 0..o.batch {
            let r = call(w, fd, buf, b * o.batch + k);
            if r != LEN as isize {
                bail!("{}: call {} returned {r} (errno {})", w.name(), b * o.batch + k, errno());
            }
        }
        let dt = now_ns() - t0;
        h.record((dt / o.batch as u64).max(1)).context("histogram")?;
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    let note = format!("read_from={}", child::provider(c"read"));
    Ok(Summary::from_histogram(w.name(), &h, &note))
}

/// `__syscalls-child [--joined] ...`: print one record per workload (rank 0 only when joined).
pub fn child_main(args: SyscallsChildArgs) -> Result<()> {
    let o = args.into_opts()?;
    let page = child::page_size();
    let api = if o.joined { Some(Api::load()?) } else { None };
    let rank = match &api {
        Some(api) => api.join(2)?,
        None => 0,
    };
    // The buffer: one page. Joined: a page of a collective block (rank 0 made it with calloc in
    // its own arena, so it holds it writable). Otherwise: a heap block from whatever malloc the
    // process has (the shim's private heap under LD_PRELOAD, glibc's without).
    let buf: *mut u8 = match &api {
        Some(api) => {
            // SAFETY: collective call, same size on both ranks.
            let p = unsafe { (api.alloc_collective)(3 * page) } as usize;
            if p == 0 {
                bail!("gallocy_alloc_collective returned NULL");
            }
            child::align_up(p, page) as *mut u8
        }
        None => {
            let mut p: *mut libc::c_void = std::ptr::null_mut();
            // SAFETY: out-parameter on our stack; page is a power of two.
            if unsafe { libc::posix_memalign(&mut p, page, page) } != 0 {
                bail!("posix_memalign failed");
            }
            p.cast()
        }
    };
    if rank == 0 {
        // SAFETY: `buf` is `page` writable bytes (held writable from here on when joined).
        unsafe { std::ptr::write_bytes(buf, 1, page) };
        for &w in &o.workloads {
            let s = measure(w, buf, &o)?;
            println!("{}", s.to_record());
        }
    }
    if let Some(api) = &api {
        api.barrier();
        api.finalize()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent side.

struct Opts {
    iters: usize,
    batch: usize,
    warmup: usize,
    reps: usize,
    lib: Option<PathBuf>,
    workloads: Vec<Workload>,
    sides: Vec<Side>,
    timeout_s: u64,
}

/// `gallocy-bench syscalls` options.
#[derive(Debug, Clone, Args)]
pub struct SyscallsArgs {
    /// Calls per workload and run
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    iters: usize,
    /// Calls timed together (one histogram sample, ns per call)
    #[arg(long, value_name = "N", default_value_t = 50)]
    batch: usize,
    /// Untimed calls before
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    warmup: usize,
    /// Runs of every side; the table shows the median
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// The library to preload [default: libgallocy.so next to this executable]
    #[arg(long, value_name = "PATH")]
    lib: Option<PathBuf>,
    /// Workloads, comma-separated (read_zero, pread_file, write_null) [default: all]
    #[arg(long, value_name = "A,B")]
    workloads: Option<String>,
    /// Sides, comma-separated (glibc, solo, joined) [default: all]
    #[arg(long, value_name = "A,B")]
    sides: Option<String>,
    /// Time limit per child (or pair of ranks), in seconds
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 120)]
    timeout_s: u64,
}

impl SyscallsArgs {
    fn into_opts(self) -> Result<Opts> {
        let o = Opts {
            iters: self.iters,
            batch: self.batch,
            warmup: self.warmup,
            reps: self.reps,
            lib: self.lib,
            workloads: match &self.workloads {
                Some(v) => child::parse_list(v, "--workloads", &WORKLOADS)?,
                None => WORKLOADS.iter().map(|(_, w)| *w).collect(),
            },
            sides: match &self.sides {
                Some(v) => child::parse_list(v, "--sides", &SIDES)?,
                None => Side::ALL.to_vec(),
            },
            timeout_s: self.timeout_s,
        };
        if o.reps == 0 || o.batch == 0 || o.iters < o.batch {
            bail!("--reps and --batch must be at least 1, --iters at least --batch");
        }
        Ok(o)
    }
}

#[derive(Default)]
struct Cell {
    p50: Vec<f64>,
    p99: Vec<f64>,
    mean: Vec<f64>,
    from: String,
    error: Option<String>,
}

pub fn cmd_syscalls(args: SyscallsArgs) -> Result<()> {
    let o = args.into_opts()?;
    let needs_lib = o.sides.iter().any(|s| *s != Side::Glibc);
    let lib =
        if needs_lib { Some(child::check_lib(&o.lib.clone().map_or_else(child::default_lib, Ok)?)?) } else { None };
    let timeout = Duration::from_secs(o.timeout_s);
    let idle = crate::idle_pct(Duration::from_millis(300));
    let load = crate::load_avg_1m();
    println!(
        "gallocy-bench syscalls: iters={} batch={} warmup={} reps={} len={} lib={} load_avg_1m={:.2} idle_before={:.0}%",
        o.iters,
        o.batch,
        o.warmup,
        o.reps,
        LEN,
        lib.as_ref().map_or("none".into(), |l| l.display().to_string()),
        load,
        idle
    );
    if idle < 90.0 {
        println!("warning: the machine was only {idle:.0}% idle before the run; expect noisy numbers");
    }
    let names: Vec<&str> = o.workloads.iter().map(|w| w.name()).collect();
    let child_args = vec![
        "__syscalls-child".to_string(),
        "--workloads".into(),
        names.join(","),
        "--iters".into(),
        o.iters.to_string(),
        "--batch".into(),
        o.batch.to_string(),
        "--warmup".into(),
        o.warmup.to_string(),
    ];
    // cells[workload][side]
    let mut cells: Vec<Vec<Cell>> =
        o.workloads.iter().map(|_| o.sides.iter().map(|_| Cell::default()).collect()).collect();
    for rep in 0..o.reps {
        for side in child::order(&o.sides, rep) {
            let si = o.sides.iter().position(|s| *s == side).expect("side");
            if cells.iter().all(|row| row[si].error.is_some()) {
                continue;
            }
            let what = format!("{} child (rep {})", side.title(), rep + 1);
            match child::run_side(side, &child_args, lib.as_deref(), &what, timeout) {
                Ok(lines) => {
                    for (wi, w) in o.workloads.iter().enumerate() {
                        let cell = &mut cells[wi][si];
                        match lines.iter().filter_map(|l| Summary::parse_record(l)).find(|s| s.name == w.name()) {
                            Some(s) => {
                                cell.p50.push(s.p50_ns as f64);
                                cell.p99.push(s.p99_ns as f64);
                                cell.mean.push(s.mean_ns as f64);
                                cell.from = s.note.strip_prefix("read_from=").unwrap_or(&s.note).to_string();
                            }
                            None => cell.error = Some(format!("{what}: no result for {}", w.name())),
                        }
                    }
                }
                Err(e) => {
                    eprintln!("gallocy-bench syscalls: error: {e:#}");
                    for row in cells.iter_mut() {
                        row[si].error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        }
    }

    // The preload must have taken effect where it should, and only there.
    let mut errors = Vec::new();
    for (wi, w) in o.workloads.iter().enumerate() {
        for (si, side) in o.sides.iter().enumerate() {
            let c = &mut cells[wi][si];
            if c.error.is_none() && *side != Side::Glibc && !c.from.contains("libgallocy") {
                c.error = Some(format!("read() resolved to {} (LD_PRELOAD did not take effect)", c.from));
            }
            if let Some(e) = &c.error {
                errors.push(format!("{} {}: {e}", w.name(), side.key()));
            }
        }
    }

    let glibc_i = o.sides.iter().position(|s| *s == Side::Glibc);
    let fmt = |v: f64, prec: usize| if v.is_finite() { format!("{v:.prec$}") } else { "-".into() };
    println!();
    let mut head = format!("{:<11}", "workload");
    for s in &o.sides {
        head += &format!(" {:>12}", format!("{} ns", s.title()));
        if *s != Side::Glibc && glibc_i.is_some() {
            head += &format!(" {:>6}", "ratio");
        }
    }
    head += &format!("   {}", "p99 ns (per side)");
    println!("{head}");
    let mut j = Fields::new();
    for (wi, w) in o.workloads.iter().enumerate() {
        let row = &cells[wi];
        let p50 = |si: usize| if row[si].error.is_some() { f64::NAN } else { median(&row[si].p50) };
        let p99 = |si: usize| if row[si].error.is_some() { f64::NAN } else { median(&row[si].p99) };
        let base = glibc_i.map_or(f64::NAN, p50);
        let mut line = format!("{:<11}", w.name());
        let mut tail = Vec::new();
        for (si, s) in o.sides.iter().enumerate() {
            line += &format!(" {:>12}", fmt(p50(si), 0));
            j.num(format!("{}_{}_ns", w.name(), s.key()), p50(si))
                .num(format!("{}_{}_p99_ns", w.name(), s.key()), p99(si));
            if *s != Side::Glibc && glibc_i.is_some() {
                line += &format!(" {:>6}", fmt(p50(si) / base, 2));
                j.num(format!("{}_{}_ratio", w.name(), s.key()), p50(si) / base);
            }
            tail.push(fmt(p99(si), 0));
        }
        line += &format!("   {}", tail.join(" / "));
        println!("{line}");
    }
    println!(
        "ns per call: p50 of per-batch averages ({} calls per batch), median of {} runs; ratio = side / glibc",
        o.batch, o.reps
    );
    if let Some(wi) = (0..o.workloads.len()).next() {
        for (si, s) in o.sides.iter().enumerate() {
            if cells[wi][si].error.is_none() {
                println!("read() from, {}: {}", s.title(), cells[wi][si].from);
            }
        }
    }
    for e in &errors {
        println!("FAILED: {e}");
    }
    let line = SyscallsLine {
        bench: "syscalls",
        iters: o.iters,
        batch: o.batch,
        warmup: o.warmup,
        reps: o.reps,
        len: LEN,
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
        crate::parse_args::<SyscallsArgs>(args)?.into_opts()
    }

    fn parse_child(args: &[&str]) -> Result<ChildOpts> {
        crate::parse_args::<SyscallsChildArgs>(args)?.into_opts()
    }

    #[test]
    fn options() {
        let o = parse_opts(&["--iters", "1000", "--batch=10", "--sides", "glibc,joined", "--workloads", "write_null"])
            .unwrap();
        assert_eq!((o.iters, o.batch, o.sides.len(), o.workloads.len()), (1000, 10, 2, 1));
        assert!(parse_opts(&["--iters", "5", "--batch", "10"]).is_err());
        assert!(parse_opts(&["--sides", "nope"]).is_err());
        assert!(parse_opts(&["--bogus"]).is_err());
        let o = parse_opts(&[]).unwrap();
        assert_eq!((o.iters, o.batch, o.warmup, o.reps, o.timeout_s, o.sides.len()), (200_000, 50, 20_000, 3, 120, 3));
        let c = parse_child(&["--joined", "--workloads", "read_zero", "--iters", "100", "--batch", "10"]).unwrap();
        assert!(c.joined && c.workloads == [Workload::ReadZero] && c.iters == 100);
        assert!(parse_child(&["--iters", "5", "--batch", "10"]).is_err());
    }

    #[test]
    fn child_measures_with_glibc() {
        // In the test process itself: glibc (no preload), tiny counts.
        let o = parse_child(&["--iters", "200", "--batch", "10", "--warmup", "10"]).unwrap();
        let mut buf = vec![0u8; LEN];
        for &w in &o.workloads {
            let r = measure(w, buf.as_mut_ptr(), &o).unwrap();
            assert_eq!(r.count, 20, "{r:?}");
            assert!(r.p50_ns > 0);
        }
    }
}
