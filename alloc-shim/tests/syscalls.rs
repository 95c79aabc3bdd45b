//! System calls whose buffers live in the shared heap: read, readv, pread, pread64, recv,
//! recvfrom, recvmsg (into the buffer) and write, writev, pwrite, pwrite64, send, sendto, sendmsg
//! (out of the buffer) must move their bytes into and out of heap pages in any coherence state
//! (held writable, held read-only, not held, and buffers spanning pages in different states) as
//! they do on private memory: no EFAULT, no short transfer, every byte right, the bytes around the
//! buffer untouched, and the other rank sees afterwards what a read() put into the shared buffer.
//!
//! The C program is tests/c/syscalls.c (its header describes the cases). It runs
//! * with glibc alone (no gallocy: checks the program itself), as a one-process job with the shim
//!   preloaded (with and without gallocy_init) and linked with `-lgallocy`;
//! * as a 2-rank job: built plainly and run by `gallocy run -n 2 --preload`, and built with
//!   `cc ... $(pkg-config --cflags --libs gallocy)` and run by `gallocy run -n 2` (no preload);
//! * in two more 2-rank modes: the calls' own structures (iovec array, msghdr, socket address and
//!   its length) in shared pages not held / held read-only ("meta"), and calls that block while
//!   the other rank takes the buffer's page away by writing next to it ("blocking").
//!
//! Every run has a hard timeout, and the program's watchdog ends a rank whose case step makes no
//! progress for 15 s, naming the case and the step ("HANG ...").
//!
//! Needs cc and pkg-config (Debian packages gcc, pkg-config) and the artifacts of
//! `cargo build --release --workspace`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use gallocy_testkit::*;

/// Per run: the 2-rank core mode takes a few seconds; leave room for a busy machine.
const JOB_TIMEOUT: Duration = Duration::from_secs(100);

/// Heap range of a job with the default configuration.
const HEAP_BASE: u64 = 0x2000_0000_0000;
const HEAP_SIZE: u64 = 16 << 30;

fn source() -> PathBuf {
    workspace().join("alloc-shim/tests/c/syscalls.c")
}

/// Compile syscalls.c into `dir`: plainly (the gallocy API, when present, comes from the preloaded
/// library), or linked with libgallocy the documented way.
fn build(dir: &TempDir, linked: bool) -> PathBuf {
    let cc = require_tool("cc", "gcc");
    let bin = dir.join(if linked { "syscalls-linked" } else { "syscalls" });
    let mut cmd = Command::new(&cc);
    clean_env(&mut cmd).args(["-O2", "-pthread", "-Wall", "-Wextra", "-o"]).arg(&bin).arg(source());
    let label = if linked {
        let flags = pkg_config_flags();
        cmd.arg("-DGALLOCY_LINKED").args(&flags);
        format!("cc -O2 -pthread -DGALLOCY_LINKED -o syscalls-linked syscalls.c {}", flags.join(" "))
    } else {
        cmd.arg("-I").arg(workspace().join("alloc-shim/include"));
        "cc -O2 -pthread -I alloc-shim/include -o syscalls syscalls.c".to_string()
    };
    let f = run(&label, &mut cmd, Duration::from_secs(60));
    assert!(f.success(), "{label}: compilation failed\n{}", f.report());
    bin
}

/// How the program is run.
enum How {
    /// One process, nothing preloaded (glibc, or the library it is linked with).
    Solo,
    /// One process with `LD_PRELOAD=libgallocy.so` and no job variables.
    SoloPreloaded,
    /// `gallocy run -n 2 [--preload]`.
    Job { preload: bool },
}

/// Lines worth putting first in a failure message.
fn failure_lines(f: &Finished) -> String {
    let all = format!("{}\n{}", f.stdout, f.stderr);
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("FAIL") || l.contains("HANG") || l.contains("FATAL") || l.contains("fatal"))
        .collect();
    let mut s = lines.iter().take(40).copied().collect::<Vec<_>>().join("\n");
    if lines.len() > 40 {
        s.push_str(&format!("\n[... {} more lines]", lines.len() - 40));
    }
    s
}

/// Run `bin` with `args` (plus `--dir` in a scratch directory) and require exit 0 and, from every
/// rank, "rank R: syscalls ok (MODE)". Returns the run.
fn run_ok(name: &str, bin: &PathBuf, how: How, args: &[&str]) -> Finished {
    let scratch = TempDir::new(&format!("syscalls-{name}"));
    let dir = scratch.path().to_string_lossy().into_owned();
    let mode = args.windows(2).find(|w| w[0] == "--mode").map_or("core", |w| w[1]);
    let (mut cmd, ranks, line) = match how {
        How::Solo | How::SoloPreloaded => {
            let mut c = Command::new(bin);
            clean_env_with_transport(&mut c);
            let mut line = String::new();
            if let How::SoloPreloaded = how {
                c.env("LD_PRELOAD", libgallocy());
                line.push_str(&format!("LD_PRELOAD={} ", libgallocy().display()));
            }
            c.args(args).arg("--dir").arg(&dir);
            line.push_str(&format!("{} {} --dir DIR", bin.display(), args.join(" ")));
            (c, 1, line)
        }
        How::Job { preload } => {
            let launcher = launcher();
            let mut c = Command::new(&launcher);
            clean_env_with_transport(&mut c).args(["run", "-n", "2"]);
            // The cases set every page's state exactly: no prefetch or write-upgrade runs that
            // would also move a case's neighbouring pages.
            c.env("GALLOCY_PREFETCH", "1");
            if preload {
                c.arg("--preload");
            }
            c.arg("--").arg(bin).args(args).arg("--dir").arg(&dir);
            let line = format!(
                "{} run -n 2{} -- {} {} --dir DIR",
                launcher.display(),
                if preload { " --preload" } else { "" },
                bin.display(),
                args.join(" ")
            );
            (c, 2, line)
        }
    };
    let f = {
        let _serial = serial();
        run(&line, &mut cmd, JOB_TIMEOUT)
    };
    let all = format!("{}\n{}", f.stdout, f.stderr);
    let oks = (0..ranks).filter(|r| all.contains(&format!("rank {r}: syscalls ok ({mode})"))).count();
    assert!(
        f.success() && oks == ranks,
        "{name}: expected exit 0 and \"syscalls ok ({mode})\" from every rank of\n  {line}\n\
         (DIR: a scratch directory)\n--- failures:\n{}\n{}",
        failure_lines(&f),
        f.report()
    );
    f
}

/// The address of the buffers' block, as the program prints it.
fn pool_address(f: &Finished) -> u64 {
    let all = format!("{}\n{}", f.stdout, f.stderr);
    let line = all.lines().find(|l| l.contains("buffers: pool at 0x")).unwrap_or_else(|| {
        panic!("no \"buffers: pool at 0x...\" line\n{}", f.report());
    });
    let hex = line.split("pool at 0x").nth(1).unwrap().split(|c: char| !c.is_ascii_hexdigit()).next().unwrap();
    u64::from_str_radix(hex, 16).unwrap()
}

fn assert_in_heap(f: &Finished, yes: bool) {
    let a = pool_address(f);
    let inside = (HEAP_BASE..HEAP_BASE + HEAP_SIZE).contains(&a);
    assert_eq!(
        inside,
        yes,
        "{}: the buffers are at {a:#x}, {} gallocy's heap {HEAP_BASE:#x}..{:#x}\n{}",
        f.label,
        if inside { "inside" } else { "outside" },
        HEAP_BASE + HEAP_SIZE,
        f.report()
    );
}

// ------------------------------------------------------------------------------ one process

#[test]
fn the_program_passes_with_glibc_alone() {
    // The program's own checks, on private memory and glibc's malloc.
    let dir = TempDir::new("syscalls-glibc");
    let bin = build(&dir, false);
    let f = run_ok("glibc", &bin, How::Solo, &["--quiet"]);
    assert_in_heap(&f, false);
}

#[test]
fn one_process_job_preloaded() {
    let dir = TempDir::new("syscalls-solo");
    let bin = build(&dir, false);
    let f = run_ok("solo-preload", &bin, How::SoloPreloaded, &["--quiet"]);
    assert_in_heap(&f, true);
    // Without any gallocy_* call: the library is only the program's malloc.
    let f = run_ok("solo-preload-no-init", &bin, How::SoloPreloaded, &["--quiet", "--no-init"]);
    assert_in_heap(&f, true);
}

#[test]
fn one_process_job_linked() {
    let dir = TempDir::new("syscalls-solo-linked");
    let bin = build(&dir, true);
    let f = run_ok("solo-linked", &bin, How::Solo, &["--quiet"]);
    assert_in_heap(&f, true);
}

// ---------------------------------------------------------------------------------- 2 ranks

#[test]
fn two_ranks_preloaded_every_call_every_page_state() {
    let dir = TempDir::new("syscalls-job");
    let bin = build(&dir, false);
    let f = run_ok("job-preload", &bin, How::Job { preload: true }, &["--quiet"]);
    assert_in_heap(&f, true);
}

#[test]
fn two_ranks_linked_without_preload_every_call_every_page_state() {
    let dir = TempDir::new("syscalls-job-linked");
    let bin = build(&dir, true);
    let f = run_ok("job-linked", &bin, How::Job { preload: false }, &["--quiet"]);
    assert_in_heap(&f, true);
}

#[test]
fn two_ranks_iovecs_msghdr_and_addresses_in_shared_pages() {
    let dir = TempDir::new("syscalls-meta");
    let bin = build(&dir, false);
    run_ok("job-meta", &bin, How::Job { preload: true }, &["--quiet", "--mode", "meta"]);
}

#[test]
fn two_ranks_blocked_calls_while_the_other_rank_takes_the_page() {
    let dir = TempDir::new("syscalls-blocking");
    let bin = build(&dir, false);
    run_ok("job-blocking", &bin, How::Job { preload: true }, &["--quiet", "--mode", "blocking"]);
}
