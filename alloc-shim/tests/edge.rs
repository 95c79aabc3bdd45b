//! Edge cases of the preloaded malloc: threads racing the allocator's start, thread-exit
//! destructors that allocate, fork (one-process job and job member), dlopen, the whole malloc
//! family and its error cases. The C program is tests/c/edge.c.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use gallocy_testkit::*;

/// Compiles tests/c/edge.c into `dir` (a directory of its own per test: tests run in parallel).
fn build_edge(dir: &TempDir) -> PathBuf {
    let src = workspace().join("alloc-shim/tests/c/edge.c");
    let out = dir.join("edge");
    let mut cmd = Command::new(require_tool("cc", "gcc"));
    cmd.args(["-O2", "-pthread", "-w"]).arg(&src).arg("-o").arg(&out).arg("-ldl");
    run("cc -O2 -pthread edge.c -ldl", &mut cmd, Duration::from_secs(60)).assert_success();
    out
}

#[test]
fn edge_cases_in_a_one_process_job() {
    let dir = TempDir::new("edge-solo");
    let edge = build_edge(&dir);
    let mut cmd = Command::new(&edge);
    clean_env(&mut cmd).env("LD_PRELOAD", libgallocy()).env("GALLOCY_STATS", "1");
    let out = run("LD_PRELOAD=libgallocy.so edge", &mut cmd, Duration::from_secs(60));
    assert!(out.success() && out.stdout.contains("edge ok"), "{}", out.report());
    assert!(
        out.stderr.contains("gallocy stats rank 0"),
        "the preloaded library must have served the process\n{}",
        out.report()
    );
}

#[test]
fn edge_cases_in_every_member_of_a_two_process_job() {
    let dir = TempDir::new("edge-job");
    let edge = build_edge(&dir);
    let mut cmd = Command::new(launcher());
    clean_env(&mut cmd).env("GALLOCY_PRELOAD_LIB", libgallocy()).args(["run", "-n", "2", "--preload", "--"]).arg(&edge);
    let out = run("gallocy run -n 2 --preload -- edge", &mut cmd, Duration::from_secs(120));
    assert!(
        out.success() && out.stdout.contains("[rank 0] edge ok") && out.stdout.contains("[rank 1] edge ok"),
        "{}",
        out.report()
    );
}
