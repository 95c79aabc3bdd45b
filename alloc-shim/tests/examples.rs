//! The C examples (`examples/*.c`) built the documented way, with
//! `cc ... $(pkg-config --cflags --libs gallocy)` and `PKG_CONFIG_PATH=target/<profile>/pkgconfig`
//! (no LD_LIBRARY_PATH: the library is found through the rpath the .pc file adds), and run as
//! multi-process jobs by the launcher with `--preload`. Every run has a hard timeout.
//!
//! Needs cc and pkg-config (Debian packages gcc, pkg-config) and the artifacts of
//! `cargo build --release -p gallocy-shim -p gallocy-cli`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use gallocy_testkit::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Compile `examples/<name>.c` into `dir/<name>`.
fn build_example(name: &str, dir: &TempDir) -> PathBuf {
    let cc = require_tool("cc", "gcc");
    // Both fail with a build hint if `cargo build` has not made them yet.
    libgallocy();
    launcher();
    let flags = pkg_config_flags();
    let src = workspace().join("examples").join(format!("{name}.c"));
    let bin = dir.join(name);
    let mut cmd = Command::new(&cc);
    clean_env(&mut cmd).args(["-O2", "-Wall", "-Wextra", "-o"]).arg(&bin).arg(&src).args(&flags);
    let label = format!("cc -O2 -o {name} examples/{name}.c {}", flags.join(" "));
    let f = run(&label, &mut cmd, Duration::from_secs(60));
    assert!(f.success(), "{label}: compilation failed\n{}", f.report());
    bin
}

/// `gallocy run -n N [--preload] -- BIN ARGS...` with a clean environment; requires exit 0 and,
/// for every rank r, a line starting with `[rank r] ` followed by `expect(r)`.
fn launch_ok(n: usize, preload: bool, bin: &PathBuf, args: &[&str], expect: &dyn Fn(usize) -> String) -> Finished {
    let launcher = launcher();
    let mut cmd = Command::new(&launcher);
    clean_env_with_transport(&mut cmd).arg("run").arg("-n").arg(n.to_string());
    if preload {
        cmd.arg("--preload");
    }
    cmd.arg("--").arg(bin).args(args);
    let line = format!(
        "{} run -n {n}{} -- {} {}",
        launcher.display(),
        if preload { " --preload" } else { "" },
        bin.display(),
        args.join(" ")
    );
    let _serial = serial();
    let f = run(&line, &mut cmd, JOB_TIMEOUT);
    assert!(f.success(), "expected exit 0 from\n  {line}\n{}", f.report());
    let all = format!("{}\n{}", f.stdout, f.stderr);
    for r in 0..n {
        let want = format!("[rank {r}] {}", expect(r));
        assert!(
            all.lines().any(|l| l.starts_with(&want)),
            "no line starting with {want:?} in the output of\n  {line}\n{}",
            f.report()
        );
    }
    f
}

// ------------------------------------------------------------------------------------ linked_list

#[test]
fn linked_list_built_by_rank_0_is_walked_by_4_ranks() {
    let dir = TempDir::new("linked-list");
    let bin = build_example("linked_list", &dir);
    // 100,000 nodes: sum 100000 * 100001 / 2.
    launch_ok(4, true, &bin, &[], &|r| format!("rank {r}: sum 5000050000 ok"));
}

#[test]
fn linked_list_as_a_one_process_job() {
    // The same binary with the shim preloaded and no launcher: a one-process job.
    let dir = TempDir::new("linked-list-1");
    let bin = build_example("linked_list", &dir);
    let mut cmd = Command::new(&bin);
    clean_env_with_transport(&mut cmd).env("LD_PRELOAD", libgallocy()).env("GALLOCY_STATS", "1").arg("1000");
    let f = {
        let _serial = serial();
        run("LD_PRELOAD=libgallocy.so linked_list 1000", &mut cmd, Duration::from_secs(60))
    };
    f.assert_success();
    assert_eq!(f.stdout, "rank 0: sum 500500 ok\n", "{}", f.report());
    assert!(f.stderr.contains("gallocy stats"), "no statistics line with GALLOCY_STATS=1\n{}", f.report());
}

// -------------------------------------------------------------------------------------- histogram

#[test]
fn histogram_with_shared_bins_under_locks_on_4_ranks() {
    let dir = TempDir::new("histogram");
    let bin = build_example("histogram", &dir);
    launch_ok(4, true, &bin, &[], &|r| format!("rank {r}: histogram ok: 1000000 items in 64 bins"));
}

#[test]
fn histogram_taking_a_lock_for_every_item() {
    // BATCH 1: one lock/unlock (and, usually, a page moving between ranks) per item.
    let dir = TempDir::new("histogram-1");
    let bin = build_example("histogram", &dir);
    launch_ok(4, true, &bin, &["8000", "1"], &|r| format!("rank {r}: histogram ok: 8000 items in 64 bins"));
}

// ------------------------------------------------------------ unmodified programs as job ranks

/// Compile `examples/<name>.c` without gallocy (`cc -O2 -pthread`) and run it once with glibc's
/// malloc; returns the binary and its stdout (one line).
fn build_plain(name: &str, dir: &TempDir, args: &[&str]) -> (PathBuf, String) {
    let cc = require_tool("cc", "gcc");
    let bin = dir.join(name);
    let mut cmd = Command::new(&cc);
    clean_env(&mut cmd)
        .args(["-O2", "-pthread", "-Wall", "-o"])
        .arg(&bin)
        .arg(workspace().join(format!("examples/{name}.c")));
    run(&format!("cc -O2 -pthread {name}.c"), &mut cmd, Duration::from_secs(60)).assert_success();
    let mut plain = Command::new(&bin);
    clean_env(&mut plain).args(args);
    let f = run(&format!("{name} (glibc malloc)"), &mut plain, Duration::from_secs(60));
    f.assert_success();
    let line = f.stdout.lines().next().unwrap_or_default().to_string();
    assert!(!line.is_empty(), "{name} printed nothing\n{}", f.report());
    (bin, line)
}

#[test]
fn multithreaded_program_as_2_ranks() {
    // Each rank is an unmodified 4-thread malloc/free stress program whose every block comes
    // from its own arena of the job's shared heap; each must print what it prints with glibc.
    let dir = TempDir::new("mt-ranks");
    let (bin, line) = build_plain("mt_malloc", &dir, &["2000000", "4"]);
    launch_ok(2, true, &bin, &["2000000", "4"], &|_| line.clone());
}

#[test]
fn forking_program_as_2_ranks() {
    // Each rank forks 20 children (some with grandchildren) while 2 threads allocate; the
    // children are not members of the job, and must not disturb it.
    let dir = TempDir::new("fork-ranks");
    let (bin, line) = build_plain("fork_malloc", &dir, &["20"]);
    launch_ok(2, true, &bin, &["20"], &|_| line.clone());
}
