//! `gallocy-bench malloc`: the malloc fast path of `libgallocy.so` (LD_PRELOAD) against glibc,
//! measured in the same run.
//!
//! Every workload runs in a child process (this executable, hidden subcommand
//! `__malloc-child`), once plain (glibc) and once with `LD_PRELOAD=<libgallocy.so>`. Children
//! call the C symbols `malloc`/`free` (so they measure whatever allocator the process ended up
//! with), and print one record line ([`CHILD_PREFIX`]). The parent interleaves the two kinds
//! (ABBA order per repetition, so neither side always runs first), takes the median of the
//! repetitions, prints a table and, as the last stdout line, one JSON object.
//!
//! Workloads (one op = one `free` + one `malloc`, each new block touched at its first and last
//! byte; every thread owns a ring of [`SLOTS`] live blocks and replaces a random one per op, so
//! frees are not LIFO-only; before freeing a block its two tag bytes are checked, which catches
//! an allocator handing out overlapping blocks):
//! * `small_1t` / `small_2t`: sizes uniform in 16..=512 B, 1 / 2 threads;
//! * `mixed_1t` / `mixed_2t`: sizes 16 B..64 KiB, log-distributed (uniform octave, then
//!   uniform inside it), 1 / 2 threads.
//!
//! Two-thread rates are the sum of the per-thread rates. Blocks are freed by the thread that
//! allocated them.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::report::{Fields, MallocLine, Num};

/// Prefix of a child's result line.
pub const CHILD_PREFIX: &str = "@@malloc ";
/// Live blocks per thread (power of two).
pub const SLOTS: usize = 1024;
/// Ops between two clock reads.
const BATCH: u64 = 256;
/// Exit code of a child that found a corrupted block or got NULL from malloc.
const EXIT_CHECK_FAILED: i32 = 3;

/// `gallocy-bench malloc --help`, after the options.
pub const HELP: &str = "\
Every workload runs in child processes, once with glibc and once with LD_PRELOAD=<--lib>
(ABBA order per repetition); the table shows the median of the repetitions (Mops/s), and the
last line of stdout is one JSON object.";

/// The four workloads, in table order.
pub const WORKLOADS: [Workload; 4] = [
    Workload { name: "small_1t", sizes: Sizes::Small, threads: 1 },
    Workload { name: "mixed_1t", sizes: Sizes::Mixed, threads: 1 },
    Workload { name: "small_2t", sizes: Sizes::Small, threads: 2 },
    Workload { name: "mixed_2t", sizes: Sizes::Mixed, threads: 2 },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizes {
    /// 16..=512 B, uniform.
    Small,
    /// 16 B .. 64 KiB: octave 2^4..2^15 uniform, then uniform inside the octave.
    Mixed,
}

impl Sizes {
    /// A block size from 32 random bits.
    #[inline(always)]
    pub fn pick(self, r: u32) -> usize {
        match self {
            Sizes::Small => 16 + (r % 497) as usize,
            Sizes::Mixed => {
                let e = 4 + (r & 0xff) % 12; // 4..=15
                let base = 1usize << e;
                base + ((r >> 8) as usize & (base - 1))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub name: &'static str,
    pub sizes: Sizes,
    pub threads: usize,
}

fn workload(name: &str) -> Result<Workload> {
    WORKLOADS.iter().copied().find(|w| w.name == name).with_context(|| {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        format!("unknown workload {name} (known: {})", names.join(", "))
    })
}

// ---------------------------------------------------------------------------------------------
// Child side.

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[inline(always)]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Clone, Copy)]
struct Slot {
    ptr: *mut u8,
    size: usize,
    tag: u8,
}

/// What went wrong in a worker's loop.
#[derive(Debug)]
enum CheckError {
    Null { size: usize },
    Corrupt { slot: usize, ptr: usize, size: usize, want: u8, first: u8, last: u8 },
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::Null { size } => write!(f, "malloc({size}) returned NULL"),
            CheckError::Corrupt { slot, ptr, size, want, first, last } => write!(
                f,
                "heap corruption: slot {slot} block {ptr:#x} size {size}: tag {want:#04x}, found first \
                 {first:#04x} last {last:#04x} (overlapping blocks?)"
            ),
        }
    }
}

/// malloc + touch (first and last byte = tag).
///
/// # Safety
/// `size >= 1`.
#[inline(always)]
unsafe fn alloc_touch(size: usize, tag: u8) -> Result<Slot, CheckError> {
    // SAFETY: plain C malloc.
    let p = unsafe { libc::malloc(size) } as *mut u8;
    if p.is_null() {
        return Err(CheckError::Null { size });
    }
    // SAFETY: p points to at least `size >= 1` writable bytes.
    unsafe {
        p.write_volatile(tag);
        p.add(size - 1).write_volatile(tag);
    }
    Ok(Slot { ptr: p, size, tag })
}

/// Check a slot's tags, then free it.
///
/// # Safety
/// `s` came from [`alloc_touch`] and was not freed.
#[inline(always)]
unsafe fn check_free(i: usize, s: Slot) -> Result<(), CheckError> {
    // SAFETY: the block is live and `size` bytes long.
    let (first, last) = unsafe { (s.ptr.read_volatile(), s.ptr.add(s.size - 1).read_volatile()) };
    if first != s.tag || last != s.tag {
        return Err(CheckError::Corrupt { slot: i, ptr: s.ptr as usize, size: s.size, want: s.tag, first, last });
    }
    // SAFETY: live block from malloc.
    unsafe { libc::free(s.ptr as *mut libc::c_void) };
    Ok(())
}

/// A thread's ring of live blocks.
struct Ring {
    slots: Vec<Slot>,
    sizes: Sizes,
    rng: Rng,
}

impl Ring {
    fn new(sizes: Sizes, seed: u64) -> Result<Self, CheckError> {
        let mut rng = Rng::new(seed);
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            let r = rng.next();
            // SAFETY: pick() returns >= 16.
            slots.push(unsafe { alloc_touch(sizes.pick((r >> 32) as u32), r as u8) }?);
        }
        Ok(Ring { slots, sizes, rng })
    }

    /// `n` ops: replace a random slot each.
    #[inline(never)]
    fn run(&mut self, n: u64) -> Result<(), CheckError> {
        for _ in 0..n {
            let r = self.rng.next();
            let i = (r as usize >> 8) & (SLOTS - 1);
            let size = self.sizes.pick((r >> 32) as u32);
            // SAFETY: every slot holds a live block from alloc_touch; it is replaced right away.
            unsafe {
                check_free(i, self.slots[i])?;
                *self.slots.get_unchecked_mut(i) = alloc_touch(size, r as u8)?;
            }
        }
        Ok(())
    }

    /// Run batches until `d` has passed; returns (ops, elapsed).
    fn run_for(&mut self, d: Duration) -> Result<(u64, Duration), CheckError> {
        let start = Instant::now();
        let mut ops = 0;
        loop {
            self.run(BATCH)?;
            ops += BATCH;
            let el = start.elapsed();
            if el >= d {
                return Ok((ops, el));
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for s in self.slots.drain(..) {
            // SAFETY: live blocks from malloc.
            unsafe { libc::free(s.ptr as *mut libc::c_void) };
        }
    }
}

/// One worker: fill its ring, warm up, wait for the others, measure.
fn worker(
    sizes: Sizes,
    seed: u64,
    warmup: Duration,
    measure: Duration,
    start: &Barrier,
) -> Result<(u64, Duration), String> {
    let ring = Ring::new(sizes, seed);
    let res = ring.and_then(|mut ring| {
        ring.run_for(warmup)?;
        Ok(ring)
    });
    // Everyone reaches the barrier, even after an error, so nobody waits forever.
    start.wait();
    let mut ring = res.map_err(|e| e.to_string())?;
    ring.run_for(measure).map_err(|e| e.to_string())
}

/// Path of the object that defines the process's `malloc` (what LD_PRELOAD changed or not).
pub fn malloc_provider() -> String {
    // SAFETY: dlsym/dladdr with a valid C string and an out-parameter on our stack; dli_fname
    // is a NUL-terminated string owned by the loader.
    unsafe {
        let sym = libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr());
        if sym.is_null() {
            return "?".into();
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(sym, &mut info) == 0 || info.dli_fname.is_null() {
            return "?".into();
        }
        std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()
    }
}

fn max_rss_kb() -> u64 {
    // SAFETY: getrusage fills the zeroed struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return 0;
        }
        ru.ru_maxrss.max(0) as u64
    }
}

/// `__malloc-child --workload W --seconds S --warmup-s S --seed N [--inject crash|hang|fail]`
#[derive(Debug, Clone, Args)]
pub struct MallocChildArgs {
    #[arg(long)]
    workload: String,
    #[arg(long, default_value_t = 1.0, value_parser = secs)]
    seconds: f64,
    #[arg(long = "warmup-s", default_value_t = 0.25, value_parser = secs)]
    warmup_s: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    inject: Option<String>,
}

/// One child: run the workload, print one [`CHILD_PREFIX`] record.
pub fn child_main(c: MallocChildArgs) -> Result<()> {
    let w = workload(&c.workload)?;
    match c.inject.as_deref() {
        None => {}
        Some("crash") => {
            // SAFETY: test hook for the parent's error path: die of SIGSEGV like a crashing
            // allocator would (std's SIGSEGV handler would just return from a raise()).
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            bail!("raise(SIGSEGV) returned");
        }
        Some("hang") => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Some("fail") => {
            eprintln!("injected failure");
            std::process::exit(EXIT_CHECK_FAILED);
        }
        Some(x) => bail!("unknown --inject {x}"),
    }

    let warmup = Duration::from_secs_f64(c.warmup_s);
    let measure = Duration::from_secs_f64(c.seconds);
    let barrier = Arc::new(Barrier::new(w.threads));
    let handles: Vec<_> = (0..w.threads)
        .map(|t| {
            let b = barrier.clone();
            let seed = c.seed.wrapping_mul(1000).wrapping_add(t as u64 + 1);
            std::thread::spawn(move || worker(w.sizes, seed, warmup, measure, &b))
        })
        .collect();
    let (mut ops, mut rate, mut max_ns) = (0u64, 0.0f64, 0u128);
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok((n, el))) => {
                ops += n;
                rate += n as f64 / el.as_secs_f64();
                max_ns = max_ns.max(el.as_nanos());
            }
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("worker panicked".into()),
        }
    }
    if !errors.is_empty() {
        eprintln!("__malloc-child {}: {}", w.name, errors.join("; "));
        std::process::exit(EXIT_CHECK_FAILED);
    }
    println!(
        "{CHILD_PREFIX}workload={} threads={} ops={} ns={} rate={:.0} maxrss_kb={} malloc_from={}",
        w.name,
        w.threads,
        ops,
        max_ns,
        rate,
        max_rss_kb(),
        malloc_provider()
    );
    Ok(())
}

/// Seconds, 0 <= s < 1e6.
fn secs(v: &str) -> Result<f64, String> {
    let s: f64 = v.parse().map_err(|_| format!("not a number: {v}"))?;
    if !(0.0..1e6).contains(&s) {
        return Err(format!("out of range: {v}"));
    }
    Ok(s)
}

/// A parsed child record.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildResult {
    pub workload: String,
    pub threads: usize,
    pub ops: u64,
    pub ns: u64,
    /// Ops per second (sum over threads).
    pub rate: f64,
    pub maxrss_kb: u64,
    pub malloc_from: String,
}

impl ChildResult {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(CHILD_PREFIX)?;
        // malloc_from is last and may contain spaces.
        let (head, from) = rest.split_once(" malloc_from=")?;
        let mut r = ChildResult {
            workload: String::new(),
            threads: 0,
            ops: 0,
            ns: 0,
            rate: f64::NAN,
            maxrss_kb: 0,
            malloc_from: from.to_string(),
        };
        for kv in head.split(' ') {
            let (k, v) = kv.split_once('=')?;
            match k {
                "workload" => r.workload = v.to_string(),
                "threads" => r.threads = v.parse().ok()?,
                "ops" => r.ops = v.parse().ok()?,
                "ns" => r.ns = v.parse().ok()?,
                "rate" => r.rate = v.parse().ok()?,
                "maxrss_kb" => r.maxrss_kb = v.parse().ok()?,
                _ => {}
            }
        }
        (!r.workload.is_empty() && r.rate.is_finite()).then_some(r)
    }
}

// ---------------------------------------------------------------------------------------------
// Parent side.

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    seconds: f64,
    warmup_s: f64,
    reps: usize,
    lib: Option<PathBuf>,
    glibc_only: bool,
    workloads: Vec<Workload>,
    timeout_s: Option<f64>,
    inject: Option<String>,
}

/// `gallocy-bench malloc` options.
#[derive(Debug, Clone, Args)]
pub struct MallocArgs {
    /// Measured seconds per child
    #[arg(long, value_name = "S", default_value_t = 1.0, value_parser = secs)]
    seconds: f64,
    /// Unmeasured seconds before
    #[arg(long = "warmup-s", value_name = "S", default_value_t = 0.25, value_parser = secs)]
    warmup_s: f64,
    /// Repetitions; the table shows their median
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// The allocator to preload [default: libgallocy.so next to this executable]
    #[arg(long, value_name = "PATH")]
    lib: Option<PathBuf>,
    /// Workloads to run, comma-separated (small_1t, mixed_1t, small_2t, mixed_2t) [default: all]
    #[arg(long, value_name = "A,B")]
    workloads: Option<String>,
    /// Time limit per child, in seconds [default: warmup + seconds + 30]
    #[arg(long = "timeout-s", value_name = "S", value_parser = secs)]
    timeout_s: Option<f64>,
    /// Run the 'gallocy' column plain too (an A/A check of the noise; no library needed)
    #[arg(long = "glibc-only")]
    glibc_only: bool,
    /// Test hook: every child crashes, hangs or fails (crash|hang|fail)
    #[arg(long, hide = true)]
    inject: Option<String>,
}

impl MallocArgs {
    fn into_opts(self) -> Result<Opts> {
        let workloads = match &self.workloads {
            Some(v) => v.split(',').filter(|s| !s.is_empty()).map(workload).collect::<Result<_>>()?,
            None => WORKLOADS.to_vec(),
        };
        let o = Opts {
            seconds: self.seconds,
            warmup_s: self.warmup_s,
            reps: self.reps,
            lib: self.lib,
            glibc_only: self.glibc_only,
            workloads,
            timeout_s: self.timeout_s,
            inject: self.inject,
        };
        if o.seconds <= 0.0 {
            bail!("--seconds must be > 0");
        }
        if o.reps == 0 {
            bail!("--reps must be at least 1");
        }
        if o.workloads.is_empty() {
            bail!("--workloads: empty list");
        }
        if o.glibc_only && o.lib.is_some() {
            bail!("--glibc-only and --lib exclude each other");
        }
        Ok(o)
    }
}

/// Which allocator a child runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Glibc,
    Gallocy,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Glibc => "glibc",
            Side::Gallocy => "gallocy",
        }
    }
}

/// The default library: libgallocy.so next to this executable.
fn default_lib() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    Ok(exe.parent().context("executable has no parent directory")?.join("libgallocy.so"))
}

/// Check that `lib` exists and looks like an ELF file; return its canonical path.
fn check_lib(lib: &Path) -> Result<PathBuf> {
    let canon = std::fs::canonicalize(lib).with_context(|| {
        format!(
            "allocator library {} not found (build it with `cargo build --release -p gallocy-shim`, \
             pass --lib PATH, or use --glibc-only)",
            lib.display()
        )
    })?;
    let mut magic = [0u8; 4];
    std::fs::File::open(&canon)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("cannot read {}", canon.display()))?;
    if magic != *b"\x7fELF" {
        bail!("{} is not an ELF shared object", canon.display());
    }
    Ok(canon)
}

/// Human description of a child's exit status.
fn describe_status(st: std::process::ExitStatus) -> String {
    if let Some(sig) = st.signal() {
        let name = match sig {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            libc::SIGKILL => "SIGKILL",
            libc::SIGTERM => "SIGTERM",
            _ => "",
        };
        let core = if st.core_dumped() { ", core dumped" } else { "" };
        format!("killed by signal {sig} {name}{core}")
    } else {
        match st.code() {
            Some(EXIT_CHECK_FAILED) => format!("exit code {EXIT_CHECK_FAILED} (NULL from malloc or heap corruption)"),
            Some(c) => format!("exit code {c}"),
            None => format!("{st}"),
        }
    }
}

/// Keep the last `max` bytes of a child's stream.
fn read_tail(mut r: impl Read + Send + 'static, max: usize) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 2 * max {
                        buf.drain(..buf.len() - max);
                    }
                }
            }
        }
        if buf.len() > max {
            buf.drain(..buf.len() - max);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Run one child; Ok(result) or Err(clear description of what went wrong).
fn run_child(
    o: &Opts,
    w: Workload,
    side: Side,
    lib: Option<&Path>,
    rep: usize,
    timeout: Duration,
) -> Result<ChildResult> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut cmd = Command::new(&exe);
    cmd.arg("__malloc-child")
        .args(["--workload", w.name])
        .args(["--seconds", &o.seconds.to_string()])
        .args(["--warmup-s", &o.warmup_s.to_string()])
        .args(["--seed", &(rep as u64 + 1).to_string()]);
    if let Some(i) = &o.inject {
        cmd.args(["--inject", i]);
    }
    // A one-process job: no GALLOCY_* at all, and no inherited preload.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GALLOCY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("LD_PRELOAD");
    if let (Side::Gallocy, Some(lib)) = (side, lib) {
        cmd.env("LD_PRELOAD", lib);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("{} child ({}, rep {})", side.name(), w.name, rep + 1);
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let out = read_tail(child.stdout.take().expect("piped"), 64 * 1024);
    let err = read_tail(child.stderr.take().expect("piped"), 4 * 1024);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if start.elapsed() > timeout => {
                // Our own child, by pid.
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {:.0} s (killed)", timeout.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("wait: {e}"));
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let tail = |s: &str| {
        let t = s.trim();
        if t.is_empty() {
            String::new()
        } else {
            format!(
                "; stderr: {}",
                t.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
    };
    let st = status.map_err(|e| anyhow::anyhow!("{what}: {e}{}", tail(&stderr)))?;
    if !st.success() {
        bail!("{what}: {}{}", describe_status(st), tail(&stderr));
    }
    let res = stdout
        .lines()
        .find_map(ChildResult::parse)
        .with_context(|| format!("{what}: exited 0 but printed no result line{}", tail(&stderr)))?;
    // The preload must have taken effect (ld.so only warns about a library it cannot load).
    if let (Side::Gallocy, Some(lib)) = (side, lib) {
        let from = std::fs::canonicalize(&res.malloc_from).unwrap_or_else(|_| PathBuf::from(&res.malloc_from));
        if from != lib {
            bail!(
                "{what}: malloc resolved to {} instead of {} (LD_PRELOAD did not take effect){}",
                res.malloc_from,
                lib.display(),
                tail(&stderr)
            );
        }
    }
    Ok(res)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// (max - min) / median, in percent.
fn spread_pct(v: &[f64]) -> f64 {
    let m = median(v);
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    let min = v.iter().copied().fold(f64::NAN, f64::min);
    100.0 * (max - min) / m
}

#[derive(Default)]
struct Cell {
    rates: Vec<f64>,
    rss_kb: Vec<f64>,
    from: String,
    error: Option<String>,
}

pub fn cmd_malloc(args: MallocArgs) -> Result<()> {
    let o = args.into_opts()?;
    let lib = if o.glibc_only { None } else { Some(check_lib(&o.lib.clone().map_or_else(default_lib, Ok)?)?) };
    let timeout = Duration::from_secs_f64(o.timeout_s.unwrap_or(o.warmup_s + o.seconds + 30.0));
    let idle = crate::idle_pct(Duration::from_millis(300));
    let load = crate::load_avg_1m();
    println!(
        "gallocy-bench malloc: seconds={} warmup_s={} reps={} slots={} lib={} load_avg_1m={:.2} idle_before={:.0}%",
        o.seconds,
        o.warmup_s,
        o.reps,
        SLOTS,
        lib.as_ref().map_or("none (--glibc-only: both columns are glibc)".into(), |l| l.display().to_string()),
        load,
        idle
    );
    if idle < 90.0 {
        println!("warning: the machine was only {idle:.0}% idle before the run; expect noisy numbers");
    }

    // cells[w][side]
    let mut cells: Vec<[Cell; 2]> = o.workloads.iter().map(|_| Default::default()).collect();
    for rep in 0..o.reps {
        // ABBA: the first side alternates between repetitions.
        let order = if rep % 2 == 0 { [Side::Glibc, Side::Gallocy] } else { [Side::Gallocy, Side::Glibc] };
        for (wi, w) in o.workloads.iter().enumerate() {
            for side in order {
                let cell = &mut cells[wi][side as usize];
                if cell.error.is_some() {
                    continue;
                }
                match run_child(&o, *w, side, lib.as_deref(), rep, timeout) {
                    Ok(r) => {
                        cell.rates.push(r.rate);
                        cell.rss_kb.push(r.maxrss_kb as f64);
                        cell.from = r.malloc_from;
                    }
                    Err(e) => {
                        eprintln!("gallocy-bench malloc: error: {e:#}");
                        cell.error = Some(format!("{e:#}"));
                    }
                }
            }
        }
    }

    let mops = |c: &Cell| if c.error.is_some() { f64::NAN } else { median(&c.rates) / 1e6 };
    let fmt = |v: f64, prec: usize| if v.is_finite() { format!("{v:.prec$}") } else { "failed".into() };
    println!();
    println!(
        "{:<9} {:>12} {:>14} {:>7} {:>11} {:>13} {:>10} {:>12}",
        "workload",
        "glibc Mops/s",
        "gallocy Mops/s",
        "ratio",
        "glibc sprd%",
        "gallocy sprd%",
        "glibc RSS",
        "gallocy RSS"
    );
    let mut j = Fields::new();
    let mut errors = Vec::new();
    let mut min_ratio = f64::INFINITY;
    for (w, [g, a]) in o.workloads.iter().zip(&cells) {
        let (gm, am) = (mops(g), mops(a));
        let ratio = am / gm;
        min_ratio = min_ratio.min(if ratio.is_finite() { ratio } else { f64::NEG_INFINITY });
        let rss = |c: &Cell| if c.error.is_some() { "-".into() } else { format!("{:.1}M", median(&c.rss_kb) / 1024.0) };
        println!(
            "{:<9} {:>12} {:>14} {:>7} {:>11} {:>13} {:>10} {:>12}",
            w.name,
            fmt(gm, 2),
            fmt(am, 2),
            fmt(ratio, 3),
            fmt(if g.error.is_some() { f64::NAN } else { spread_pct(&g.rates) }, 1),
            fmt(if a.error.is_some() { f64::NAN } else { spread_pct(&a.rates) }, 1),
            rss(g),
            rss(a)
        );
        // Whole numbers (ops per second, KiB), null for a failed side.
        let whole = |c: &Cell, v: &[f64]| if c.error.is_some() { None } else { Some(median(v).round() as u64) };
        j.int(format!("{}_glibc_ops", w.name), whole(g, &g.rates))
            .int(format!("{}_gallocy_ops", w.name), whole(a, &a.rates))
            .num(format!("{}_ratio", w.name), ratio)
            .int(format!("{}_glibc_maxrss_kb", w.name), whole(g, &g.rss_kb))
            .int(format!("{}_gallocy_maxrss_kb", w.name), whole(a, &a.rss_kb));
        for (side, c) in [(Side::Glibc, g), (Side::Gallocy, a)] {
            if let Some(e) = &c.error {
                errors.push(format!("{} {}: {e}", w.name, side.name()));
            }
        }
    }
    if let Some([g, a]) = cells.iter().find(|[g, a]| g.error.is_none() && a.error.is_none()) {
        println!("malloc from: glibc column = {}, gallocy column = {}", g.from, a.from);
    }
    println!("one op = free + malloc (+ touch first/last byte); median of {} runs; sprd = (max-min)/median", o.reps);
    for e in &errors {
        println!("FAILED: {e}");
    }
    let line = MallocLine {
        bench: "malloc",
        seconds: Num(o.seconds),
        warmup_s: Num(o.warmup_s),
        reps: o.reps,
        slots: SLOTS,
        lib: lib.as_ref().map(|l| l.display().to_string()),
        glibc_only: o.glibc_only,
        load_avg_1m: Num(load),
        idle_before_pct: Num(idle),
        workloads: j,
        min_ratio: Num(if min_ratio.is_finite() { min_ratio } else { f64::NAN }),
        errors: errors.clone(),
    };
    println!("{}", crate::report::to_line(&line));
    if !errors.is_empty() {
        bail!("{} of {} cells failed (see above)", errors.len(), 2 * o.workloads.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_opts(args: &[&str]) -> Result<Opts> {
        crate::parse_args::<MallocArgs>(args)?.into_opts()
    }

    #[test]
    fn sizes_stay_in_range() {
        let mut rng = Rng::new(7);
        let (mut lo, mut hi) = (usize::MAX, 0);
        let mut octaves = [0u32; 17];
        for _ in 0..200_000 {
            let r = (rng.next() >> 32) as u32;
            let a = Sizes::Small.pick(r);
            assert!((16..=512).contains(&a), "{a}");
            let b = Sizes::Mixed.pick(r);
            assert!((16..65536).contains(&b), "{b}");
            lo = lo.min(b);
            hi = hi.max(b);
            octaves[b.ilog2() as usize] += 1;
        }
        assert!(lo < 20 && hi > 60000, "{lo} {hi}");
        for (e, &count) in octaves.iter().enumerate().take(16).skip(4) {
            assert!(count > 200_000 / 12 * 8 / 10, "octave {e}: {count}");
        }
    }

    #[test]
    fn ring_runs_and_frees() {
        let mut ring = Ring::new(Sizes::Mixed, 3).unwrap();
        ring.run(10_000).unwrap();
        let (ops, el) = ring.run_for(Duration::from_millis(5)).unwrap();
        assert!(ops >= BATCH && el >= Duration::from_millis(5));
    }

    #[test]
    fn record_parses() {
        let line = "@@malloc workload=small_1t threads=1 ops=100 ns=5 rate=12.5 maxrss_kb=9 malloc_from=/a b/libc.so.6";
        let r = ChildResult::parse(line).unwrap();
        assert_eq!((r.workload.as_str(), r.threads, r.ops, r.rate, r.maxrss_kb), ("small_1t", 1, 100, 12.5, 9));
        assert_eq!(r.malloc_from, "/a b/libc.so.6");
        assert!(ChildResult::parse("@@malloc workload=x").is_none());
    }

    #[test]
    fn options_and_median() {
        let o = parse_opts(&["--seconds", "0.5", "--reps=5", "--workloads", "mixed_2t,small_1t"]).unwrap();
        assert_eq!((o.seconds, o.reps), (0.5, 5));
        assert_eq!(o.workloads.iter().map(|w| w.name).collect::<Vec<_>>(), ["mixed_2t", "small_1t"]);
        assert!(parse_opts(&["--workloads", "nope"]).is_err());
        assert!(parse_opts(&["--seconds", "0"]).is_err());
        assert!(parse_opts(&["--seconds", "x"]).is_err());
        assert!(parse_opts(&["--glibc-only", "--lib", "x"]).is_err());
        let o = parse_opts(&[]).unwrap();
        assert_eq!((o.seconds, o.warmup_s, o.reps, o.workloads.len(), o.timeout_s), (1.0, 0.25, 3, 4, None));
        let c = crate::parse_args::<MallocChildArgs>(&["--workload", "small_1t", "--seed", "4"]).unwrap();
        assert_eq!((c.workload.as_str(), c.seed, c.seconds), ("small_1t", 4, 1.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn provider_is_libc_without_preload() {
        if std::env::var_os("LD_PRELOAD").is_none() {
            assert!(malloc_provider().contains("libc.so"), "{}", malloc_provider());
        }
    }
}
