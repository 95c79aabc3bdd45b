//! End-to-end runs of the gallocy-bench binary.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gallocy-bench"))
}

/// The last stdout line is one JSON object; return it.
fn last_line(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().unwrap_or_default().to_string()
}

#[test]
fn floor_prints_table_and_json() {
    let out = bench().args(["floor", "--iters", "300", "--spin-us", "20"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["floor ", "floor.tcp_rtt", "floor.segv_mprotect"] {
        assert!(stdout.contains(name), "{stdout}");
    }
    let json = last_line(&out);
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    for key in ["\"floor_p50_us\":", "\"floor_tcp_rtt_p50_us\":", "\"floor_segv_p50_us\":", "\"spin_us\":20"] {
        assert!(json.contains(key), "{key} missing in {json}");
    }
}

#[test]
fn bad_arguments_fail() {
    assert!(!bench().args(["fault", "--procs", "1"]).status().unwrap().success());
    assert!(!bench().args(["nope"]).status().unwrap().success());
    assert!(!bench().args(["floor", "--iters", "x"]).status().unwrap().success());
}

/// Full fault benchmark on 5 small processes: needs the runtime.
#[test]
fn fault_prints_every_case_and_json() {
    let out = bench().args(["fault", "--procs", "5", "--iters", "200", "--timeout-s", "120"]).output().unwrap();
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = last_line(&out);
    for key in [
        "read_fault_p50_us",
        "read_fault_p99_us",
        "write_fault_p50_us",
        "floor_p50_us",
        "ratio",
        "read_home_owner_p50_us",
        "read_third_owner_p50_us",
        "write_0_p50_us",
        "write_1_p50_us",
        "write_3_p99_us",
        "spin_us",
    ] {
        assert!(json.contains(&format!("\"{key}\":")), "{key} missing in {json}");
    }
}

/// Under release consistency the refetch case runs (a read of a page whose copy a barrier
/// dropped) and reports its figures; under sequential consistency it is skipped, and says so.
#[test]
fn the_refetch_case_runs_under_release_consistency_only() {
    let run = |mode: &str| {
        let out = bench()
            .env("GALLOCY_CONSISTENCY", mode)
            .args([
                "fault",
                "--procs",
                "2",
                "--iters",
                "200",
                "--cases",
                "read_home_owner,read_refetch",
                "--timeout-s",
                "120",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        (last_line(&out), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (release, _) = run("release");
    assert!(
        release.contains("\"read_refetch_p50_us\":") && !release.contains("\"read_refetch_p50_us\":null"),
        "{release}"
    );
    assert!(!release.contains("\"read_home_owner_p50_us\":null"), "{release}");
    let (sequential, table) = run("sequential");
    assert!(!sequential.contains("\"read_refetch_p50_us\""), "{sequential}");
    assert!(table.contains("skipped: read_refetch needs GALLOCY_CONSISTENCY=release"), "{table}");
}
