//! End-to-end runs of `gallocy-bench malloc` that do not need libgallocy.so (`--glibc-only`
//! runs both columns on glibc), plus its error paths.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gallocy-bench"))
}

fn show(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string()
}

const QUICK: [&str; 7] = ["malloc", "--glibc-only", "--seconds", "0.1", "--warmup-s", "0.02", "--reps=1"];

#[test]
fn glibc_only_prints_table_and_json() {
    let out = bench().args(QUICK).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for w in ["small_1t", "mixed_1t", "small_2t", "mixed_2t"] {
        assert!(stdout.lines().any(|l| l.starts_with(w)), "{w} row missing\n{stdout}");
    }
    assert!(stdout.contains("libc.so"), "{stdout}");
    let json = last_line(&out);
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    for key in [
        "small_1t_ratio",
        "mixed_1t_ratio",
        "small_2t_ratio",
        "mixed_2t_ratio",
        "small_1t_glibc_ops",
        "mixed_2t_gallocy_ops",
    ] {
        assert!(json.contains(&format!("\"{key}\":")), "{key} missing in {json}");
    }
    assert!(json.contains("\"errors\":[]") && !json.contains(":null,\"small"), "{json}");
}

#[test]
fn missing_library_is_a_clear_error() {
    let start = Instant::now();
    let out = bench().args(["malloc", "--lib", "/nonexistent/libgallocy.so", "--seconds", "0.1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(start.elapsed() < Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/libgallocy.so") && err.contains("not found"), "{err}");
}

#[test]
fn crashing_child_is_reported() {
    let out = bench().args(QUICK).args(["--workloads", "small_1t", "--inject", "crash"]).output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SIGSEGV") && err.contains("small_1t"), "{err}");
    let json = last_line(&out);
    assert!(json.contains("\"small_1t_ratio\":null") && json.contains("SIGSEGV"), "{json}");
}

#[test]
fn hanging_child_times_out() {
    let start = Instant::now();
    let out =
        bench().args(QUICK).args(["--workloads", "mixed_1t", "--inject", "hang", "--timeout-s", "1"]).output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"), "{}", show(&out));
}
