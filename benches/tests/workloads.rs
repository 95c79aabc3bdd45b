//! End-to-end runs of `gallocy-bench workloads` with tiny sizes (the whole file takes a few
//! seconds): every workload at N = 1, 2, checksums, the JSON line and the SVG plot.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const WORKLOADS: [&str; 7] = ["matmul", "jacobi", "false_sharing", "lock_queue", "pointer_chase", "flag", "peterson"];
const WITH_BASELINE: [&str; 5] = ["matmul", "jacobi", "false_sharing", "lock_queue", "pointer_chase"];

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gallocy-bench"))
}

/// A fresh SVG path for this test.
fn svg_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gallocy-bench-workloads-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.svg"));
    let _ = std::fs::remove_file(&p);
    p
}

/// Tiny sizes for every workload.
const TINY: [&str; 22] = [
    "--matmul-n",
    "48",
    "--jacobi-n",
    "40",
    "--jacobi-iters",
    "4",
    "--fs-rounds",
    "2",
    "--fs-passes",
    "5",
    "--queue-items",
    "300",
    "--tree-nodes",
    "2000",
    "--tree-lookups",
    "3000",
    "--flag-rounds",
    "30",
    "--peterson-seconds",
    "0.3",
    "--timeout-s",
    "120",
];

fn run(args: &[&str]) -> Output {
    bench().arg("workloads").args(args).output().unwrap()
}

fn describe(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The last stdout line, parsed.
fn json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}\n{}", describe(out)))
}

#[test]
fn every_workload_at_one_and_two_ranks() {
    let svg = svg_path("all");
    let mut args = vec!["--reps", "1", "--ranks", "1,2", "--svg", svg.to_str().unwrap()];
    args.extend_from_slice(&TINY);
    let out = run(&args);
    assert!(out.status.success(), "{}", describe(&out));
    let j = json(&out);
    assert_eq!(j["bench"], "workloads");
    assert_eq!(j["workloads"].as_array().unwrap().len(), WORKLOADS.len(), "{j}");
    assert!(j["errors"].as_array().unwrap().is_empty(), "{j}");

    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), WITH_BASELINE.len() * 2, "{j}");
    for w in WITH_BASELINE {
        for n in [1, 2] {
            let r = results.iter().find(|r| r["workload"] == w && r["n"] == n).unwrap_or_else(|| panic!("{w} N={n}"));
            assert_eq!(r["checksum_ok"], true, "{r}");
            assert_eq!(r["checksum"], r["sequential_checksum"], "{r}");
            assert!(r["gallocy_ms"].as_f64().is_some() && r["sequential_ms"].as_f64().is_some(), "{r}");
            assert!(r["speedup"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    let flag = &j["flag"][0];
    assert_eq!(flag["checksum_ok"], true, "{flag}");
    assert!(flag["one_way_p50_us"].as_f64().unwrap() > 0.0, "{flag}");
    assert!(flag["one_way_p99_us"].as_f64().unwrap() >= flag["one_way_p50_us"].as_f64().unwrap(), "{flag}");
    let pet = &j["peterson"][0];
    assert_eq!(pet["checksum_ok"], true, "{pet}");
    let total = pet["total"].as_f64().unwrap();
    assert!(total > 0.0, "{pet}");
    assert_eq!(pet["entries_rank0"].as_f64().unwrap() + pet["entries_rank1"].as_f64().unwrap(), total);
    assert!((0.0..=0.5).contains(&pet["min_share"].as_f64().unwrap()), "{pet}");

    let stdout = String::from_utf8_lossy(&out.stdout);
    for w in WORKLOADS {
        assert!(stdout.contains(w), "{w} missing from the table:\n{stdout}");
    }
    let text = std::fs::read_to_string(&svg).unwrap_or_else(|e| panic!("{}: {e}\n{}", svg.display(), describe(&out)));
    assert!(text.starts_with("<svg"), "{text}");
    assert!(text.trim_end().ends_with("</svg>"), "{text}");
    assert_eq!(text.matches("<polyline").count(), WITH_BASELINE.len(), "{text}");
    for w in WITH_BASELINE {
        assert!(text.contains(&format!("<title>{w}</title>")), "{w} has no polyline: {text}");
    }
    assert!(text.contains("stroke-dasharray"), "no dashed line at 1.0: {text}");
    assert!(stdout.contains(&format!("written to {}", std::fs::canonicalize(&svg).unwrap().display())));
}

/// Consistency modes are rows, and release consistency gives the sequential checksum.
#[test]
fn consistency_modes_are_rows() {
    let svg = svg_path("modes");
    let mut args = vec![
        "--workloads",
        "matmul",
        "--reps",
        "1",
        "--ranks",
        "2",
        "--consistency",
        "sequential,release",
        "--svg",
        svg.to_str().unwrap(),
    ];
    args.extend_from_slice(&TINY);
    let out = run(&args);
    let j = json(&out);
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{j}");
    let seq = results.iter().find(|r| r["consistency"] == "sequential").unwrap();
    assert_eq!(seq["checksum_ok"], true, "{seq}");
    let rel = results.iter().find(|r| r["consistency"] == "release").unwrap();
    assert_eq!(rel["checksum_ok"], true, "{rel}");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read_to_string(&svg).unwrap().matches("<polyline").count(), 2);
}

#[test]
fn bad_workload_name_is_a_usage_error() {
    let out = run(&["--workloads", "matmul,nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'nope'") && stderr.contains("--workloads"), "{stderr}");
    assert!(stderr.contains("pointer_chase"), "the known names are listed: {stderr}");
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    for bad in [&["--ranks", "0"][..], &["--consistency", "weak"], &["--reps", "x"]] {
        assert_eq!(run(bad).status.code(), Some(2), "{bad:?}");
    }
}
