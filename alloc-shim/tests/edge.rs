//! Edge cases of the preloaded malloc: threads racing the allocator's start, thread-exit
//! destructors that allocate, fork (one-process job and job member), dlopen, the whole malloc
//! family and its error cases. The C program is tests/c/edge.c.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// target/<profile>, derived from this test executable (target/<profile>/deps/edge-...).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps").to_path_buf()
}

fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Compiles tests/c/edge.c to a file of its own per test (`tag`): tests run in parallel.
fn build_edge(tag: &str) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/edge.c");
    let out = std::env::temp_dir().join(format!("gallocy-edge-{}-{tag}", std::process::id()));
    let st = Command::new("cc")
        .args(["-O2", "-pthread", "-w"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg("-ldl")
        .status()
        .expect("cc must be installed (Debian: gcc)");
    assert!(st.success(), "compiling {}", src.display());
    out
}

fn lib() -> PathBuf {
    let lib = target_dir().join("libgallocy.so");
    assert!(lib.is_file(), "{} missing: build with cargo build -p gallocy-shim", lib.display());
    lib
}

fn clean(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GALLOCY_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn edge_cases_in_a_one_process_job() {
    let edge = build_edge("solo");
    let out = run(
        clean(&mut Command::new(&edge)).env("LD_PRELOAD", lib()).env("GALLOCY_STATS", "1"),
        Duration::from_secs(60),
    );
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("edge ok"),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stderr.contains("gallocy stats rank 0"), "the preloaded library must have served the process\n{stderr}");
    let _ = std::fs::remove_file(edge);
}

#[test]
fn edge_cases_in_every_member_of_a_two_process_job() {
    let edge = build_edge("job");
    let gallocy = target_dir().join("gallocy");
    let out = run(
        clean(&mut Command::new(&gallocy))
            .env("GALLOCY_PRELOAD_LIB", lib())
            .args(["run", "-n", "2", "--preload", "--"])
            .arg(&edge),
        Duration::from_secs(120),
    );
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("[rank 0] edge ok") && stdout.contains("[rank 1] edge ok"),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let _ = std::fs::remove_file(edge);
}
