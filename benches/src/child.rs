//! Shared by `gallocy-bench syscalls` and `gallocy-bench fork`: children of this executable run
//! on one of three sides, and the gallocy C API looked up at run time in the preloaded library.
//!
//! * [`Side::Glibc`]: no library, no job variables (glibc's malloc and system calls);
//! * [`Side::Solo`]: `LD_PRELOAD=libgallocy.so`, no job variables: a one-process job that never
//!   joins (its heap is private memory, as for any unmodified program under the shim);
//! * [`Side::Joined`]: `LD_PRELOAD=libgallocy.so` in a 2-rank job on loopback TCP; the children
//!   call `gallocy_init` (found with `dlsym`), so their heap is the job's shared heap.
//!
//! Children print result records ([`crate::report::RECORD_PREFIX`]); the parent collects them.

use std::ffi::{c_void, CStr};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gallocy_cli::launch::{self, GroupOptions, Lines, Member, RankOutcome};

use crate::report::{RECORD_PREFIX, SKIP_PREFIX};

/// Where a child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Glibc,
    Solo,
    Joined,
}

impl Side {
    pub const ALL: [Side; 3] = [Side::Glibc, Side::Solo, Side::Joined];

    /// Column / JSON key name.
    pub fn key(self) -> &'static str {
        match self {
            Side::Glibc => "glibc",
            Side::Solo => "solo",
            Side::Joined => "joined",
        }
    }

    /// Human name.
    pub fn title(self) -> &'static str {
        match self {
            Side::Glibc => "glibc",
            Side::Solo => "1-process",
            Side::Joined => "joined",
        }
    }
}

/// The default library: libgallocy.so next to this executable.
pub fn default_lib() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    Ok(exe.parent().context("executable has no parent directory")?.join("libgallocy.so"))
}

/// Check that `lib` exists and is an ELF file; return its canonical path.
pub fn check_lib(lib: &Path) -> Result<PathBuf> {
    let canon = std::fs::canonicalize(lib).with_context(|| {
        format!(
            "library {} not found (build it with `cargo build --release -p gallocy-shim`, or pass --lib PATH)",
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

/// The object that defines the C symbol `name` in this process (what LD_PRELOAD changed or not).
pub fn provider(name: &CStr) -> String {
    // SAFETY: dlsym/dladdr with a valid C string and an out-parameter on our stack; dli_fname is
    // a NUL-terminated string owned by the loader.
    unsafe {
        let sym = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        if sym.is_null() {
            return "?".into();
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(sym, &mut info) == 0 || info.dli_fname.is_null() {
            return "?".into();
        }
        CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()
    }
}

/// The gallocy C API of the preloaded library (`gallocy.h`).
pub struct Api {
    pub init: unsafe extern "C" fn() -> i32,
    pub rank: unsafe extern "C" fn() -> i32,
    pub size: unsafe extern "C" fn() -> i32,
    pub barrier: unsafe extern "C" fn(),
    pub alloc_collective: unsafe extern "C" fn(usize) -> *mut c_void,
    pub broadcast: unsafe extern "C" fn(*mut c_void, usize, i32),
    pub finalize: unsafe extern "C" fn() -> i32,
}

fn sym(name: &CStr) -> Result<*mut c_void> {
    // SAFETY: dlsym with a valid C string.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if p.is_null() {
        bail!("{} not found: the child must run with LD_PRELOAD=libgallocy.so", name.to_string_lossy());
    }
    Ok(p)
}

impl Api {
    /// Look the API up (fails without the preloaded library).
    pub fn load() -> Result<Api> {
        // SAFETY: each symbol is the gallocy.h function of exactly this signature.
        unsafe {
            Ok(Api {
                init: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> i32>(sym(c"gallocy_init")?),
                rank: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> i32>(sym(c"gallocy_rank")?),
                size: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> i32>(sym(c"gallocy_size")?),
                barrier: std::mem::transmute::<*mut c_void, unsafe extern "C" fn()>(sym(c"gallocy_barrier")?),
                alloc_collective: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(usize) -> *mut c_void>(sym(
                    c"gallocy_alloc_collective",
                )?),
                broadcast: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void, usize, i32)>(sym(
                    c"gallocy_broadcast",
                )?),
                finalize: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> i32>(sym(c"gallocy_finalize")?),
            })
        }
    }

    /// Join the 2-rank job; returns this rank.
    pub fn join(&self, want_size: i32) -> Result<i32> {
        // SAFETY: plain calls into the preloaded library.
        let (e, rank, size) = unsafe { ((self.init)(), (self.rank)(), (self.size)()) };
        if e != 0 {
            bail!("gallocy_init returned {e}");
        }
        if size != want_size {
            bail!("this job has {size} processes, expected {want_size}");
        }
        Ok(rank)
    }

    pub fn barrier(&self) {
        // SAFETY: plain call into the preloaded library.
        unsafe { (self.barrier)() }
    }

    /// Share a u64 from `root`.
    pub fn broadcast_u64(&self, v: u64, root: i32) -> u64 {
        let mut b = v.to_le_bytes();
        // SAFETY: `b` is 8 writable bytes; every rank calls it with the same length.
        unsafe { (self.broadcast)(b.as_mut_ptr().cast(), b.len(), root) };
        u64::from_le_bytes(b)
    }

    pub fn finalize(&self) -> Result<()> {
        // SAFETY: plain call into the preloaded library.
        let e = unsafe { (self.finalize)() };
        if e != 0 {
            bail!("gallocy_finalize returned {e}");
        }
        Ok(())
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

fn last_lines(s: &str, n: usize) -> String {
    let t = s.trim();
    if t.is_empty() {
        return String::new();
    }
    let v: Vec<&str> = t.lines().collect();
    format!("; stderr: {}", v[v.len().saturating_sub(n)..].join(" | "))
}

/// One process of this executable with `args`: glibc (no preload) or `lib` preloaded; no
/// GALLOCY_* variable either way. Returns its record lines.
fn run_solo(args: &[String], lib: Option<&Path>, what: &str, timeout: Duration) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut cmd = Command::new(&exe);
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GALLOCY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("LD_PRELOAD");
    if let Some(lib) = lib {
        cmd.env("LD_PRELOAD", lib);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let out = read_tail(child.stdout.take().expect("piped"), 256 * 1024);
    let err = read_tail(child.stderr.take().expect("piped"), 8 * 1024);
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
    let st = status.map_err(|e| anyhow::anyhow!("{what}: {e}{}", last_lines(&stderr, 8)))?;
    if !st.success() {
        bail!("{what}: {st}{}", last_lines(&stderr, 8));
    }
    Ok(stdout
        .lines()
        .filter(|l| l.starts_with(RECORD_PREFIX) || l.starts_with(SKIP_PREFIX))
        .map(str::to_string)
        .collect())
}

/// A copy of this executable named `label` (in messages and as the `[label] ` prefix of its
/// lines), running `args`.
pub fn copy_of_self(label: impl Into<String>, args: &[String]) -> Result<Member> {
    let exe = std::env::current_exe().context("current_exe")?;
    Ok(Member::new(label, exe, args))
}

/// True for the lines a child hands to its parent ([`RECORD_PREFIX`], [`SKIP_PREFIX`]).
fn is_record(line: &str) -> bool {
    line.starts_with(RECORD_PREFIX) || line.starts_with(SKIP_PREFIX)
}

/// Runs `members` as one group (`gallocy_cli::launch::run_group`): their human stdout lines are
/// relayed with a `[label] ` prefix as they arrive, their record lines are kept, their stderr is
/// left alone. Fails, after killing the others at once, as soon as one member fails or when
/// `timeout` passes. Returns the record lines in arrival order.
pub fn run_copies(members: Vec<Member>, timeout: Duration) -> Result<Vec<String>> {
    let labels: Vec<String> = members.iter().map(|m| m.label.clone()).collect();
    let opts = GroupOptions {
        stdout: Lines::Collect(is_record),
        stderr: Lines::Inherit,
        grace: Duration::ZERO,
        timeout: Some(timeout),
        ..GroupOptions::default()
    };
    let report = launch::run_group(members, &opts, &mut |_| {})?;
    let stopped_by_timeout = |i: usize| report.outcomes[i] == RankOutcome::StoppedByLauncher;
    if report.timed_out && report.first_failure.is_none_or(stopped_by_timeout) {
        bail!("timed out after {} s", timeout.as_secs());
    }
    if let Some(i) = report.first_failure {
        bail!("{}", report.outcomes[i].describe_as(&labels[i]));
    }
    Ok(report.collected.into_iter().map(|(_, line)| line).collect())
}

/// Run `args` (a hidden subcommand of this executable) on `side`. For [`Side::Joined`] two ranks
/// are started, both with `args` plus `--joined` and without prefetch (`GALLOCY_PREFETCH=1`); the
/// records of both are returned.
pub fn run_side(side: Side, args: &[String], lib: Option<&Path>, what: &str, timeout: Duration) -> Result<Vec<String>> {
    match side {
        Side::Glibc => run_solo(args, None, what, timeout),
        Side::Solo => run_solo(args, Some(lib.context("the 1-process side needs the library")?), what, timeout),
        Side::Joined => {
            let lib = lib.context("the joined side needs the library")?;
            let job = launch::LocalJob::new()?;
            let mut a = args.to_vec();
            a.push("--joined".into());
            let members = (0..2)
                .map(|r| {
                    Ok(copy_of_self(format!("{what} rank {r}"), &a)?
                        .env("LD_PRELOAD", lib)
                        .envs(job.rank_env(r, 2))
                        // Every measurement here is per page: a miss must not bring its
                        // neighbours along (prefetch), or the next pages are not misses.
                        .env("GALLOCY_PREFETCH", "1"))
                })
                .collect::<Result<Vec<_>>>()?;
            run_copies(members, timeout).with_context(|| what.to_string())
        }
    }
}

/// The order of the sides in repetition `rep`: rotated, so that no side always runs first.
pub fn order(sides: &[Side], rep: usize) -> Vec<Side> {
    let mut v = sides.to_vec();
    if !v.is_empty() {
        v.rotate_left(rep % sides.len());
    }
    v
}

/// A page-aligned range of `pages` pages inside a block of `bytes` bytes at `p`.
pub fn align_up(p: usize, page: usize) -> usize {
    (p + page - 1) & !(page - 1)
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// Parse "a,b,c" of known names.
pub fn parse_list<T: Copy>(v: &str, what: &str, known: &[(&str, T)]) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match known.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => out.push(*t),
            None => {
                let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
                bail!("{what}: unknown {name} (known: {})", names.join(","));
            }
        }
    }
    if out.is_empty() {
        bail!("{what}: empty list");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_rotates_and_list_parses() {
        assert_eq!(order(&Side::ALL, 0), Side::ALL.to_vec());
        assert_eq!(order(&Side::ALL, 1), vec![Side::Solo, Side::Joined, Side::Glibc]);
        assert_eq!(order(&Side::ALL, 3), Side::ALL.to_vec());
        let known = [("a", 1), ("b", 2)];
        assert_eq!(parse_list("b,a", "x", &known).unwrap(), vec![2, 1]);
        assert!(parse_list("c", "x", &known).is_err());
        assert!(parse_list(",", "x", &known).is_err());
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_up(8192, 4096), 8192);
    }

    #[test]
    fn no_api_without_the_library() {
        if std::env::var_os("LD_PRELOAD").is_none() {
            assert!(Api::load().is_err());
            assert!(provider(c"read").contains("libc.so"), "{}", provider(c"read"));
        }
    }
}
