//! The parent of `gallocy-bench workloads`: starts every job, collects what the ranks report,
//! compares checksums, and hands the medians to [`super::report`] and [`super::svg`].
//!
//! Each run is one job of copies of this executable (`__workloads-rank`): one process for the
//! sequential side, N ranks on loopback for the gallocy side (`gallocy_cli::launch`, the
//! coordinator and token of a fresh [`LocalJob`]). The ranks inherit this process's
//! environment, plus `GALLOCY_CONSISTENCY`. Their stdout records and stderr lines are collected;
//! a job that fails is reported with its runtime's error line, and its cell is not run again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use gallocy_cli::launch::{self, GroupOptions, Lines, LocalJob};

use super::common::Outcome;
use super::report::{self, Cell, Plan};
use super::{rank_args, Consistency, Params, Workload, WorkloadsArgs, RECORD_PREFIX};
use crate::child::copy_of_self;
use crate::net::now_ns;

/// Where one run happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sequential,
    Gallocy(Consistency),
}

/// A run that did not produce a result.
#[derive(Debug, Clone)]
struct JobError {
    /// How the job ended (which member failed and how, or the time-out).
    how: String,
    /// The line of the ranks' stderr that most likely says why (a runtime error).
    line: Option<String>,
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.line {
            Some(l) => write!(f, "{}: {l}", self.how),
            None => write!(f, "{}", self.how),
        }
    }
}

/// The default SVG path: `workloads.svg` in the target directory this executable was built into
/// (`target/` for `target/release/gallocy-bench`), else `target/workloads.svg`.
fn default_svg() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if matches!(profile, "release" | "debug") {
                if let Some(target) = dir.parent() {
                    return target.join("workloads.svg");
                }
            }
        }
    }
    PathBuf::from("target/workloads.svg")
}

/// True for the stdout lines a rank hands to the driver.
fn is_record(line: &str) -> bool {
    line.starts_with(RECORD_PREFIX)
}

/// The stderr line that best explains a failure: the first that reads like an error, else the
/// last one.
fn pick_error_line(lines: &[String]) -> Option<String> {
    let looks_bad = |l: &&String| {
        let l = l.to_ascii_lowercase();
        l.contains("fatal") || l.contains("error") || l.contains("panicked") || l.contains("gallocy_")
    };
    lines.iter().find(looks_bad).or(lines.last()).map(|l| l.trim().to_string())
}

/// Runs one job: the sequential process (`ranks` None) or the N ranks of a gallocy run.
/// Returns rank 0's outcome and the runtime's transport line, if it printed one.
fn run_job(
    w: Workload,
    params: &Params,
    side: Side,
    ranks: usize,
    timeout: Duration,
) -> Result<(Outcome, Option<String>), JobError> {
    let err = |how: String| JobError { how, line: None };
    let args = rank_args(w, side == Side::Sequential, params);
    let members = match side {
        Side::Sequential => vec![copy_of_self("sequential", &args).map_err(|e| err(format!("{e:#}")))?],
        Side::Gallocy(mode) => {
            let job = LocalJob::new().map_err(|e| err(e.to_string()))?;
            (0..ranks)
                .map(|r| {
                    Ok(copy_of_self(format!("rank {r}"), &args)?
                        .envs(job.rank_env(r, ranks))
                        .env("GALLOCY_CONSISTENCY", mode.name()))
                })
                .collect::<Result<Vec<_>>>()
                .map_err(|e| err(format!("{e:#}")))?
        }
    };
    let labels: Vec<String> = members.iter().map(|m| m.label.clone()).collect();
    let opts = GroupOptions {
        stdout: Lines::Collect(is_record),
        stderr: Lines::Collect(|_| true),
        grace: Duration::ZERO,
        timeout: Some(timeout),
        ..GroupOptions::default()
    };
    let mut report = launch::run_group(members, &opts, &mut |_| {}).map_err(|e| err(e.to_string()))?;
    let mut record = None;
    let mut stderr: Vec<(usize, String)> = Vec::new();
    let mut transport = None;
    for (i, line) in std::mem::take(&mut report.collected) {
        if let Some(json) = line.strip_prefix(RECORD_PREFIX) {
            if i == 0 {
                record = Some(json.to_string());
            }
        } else if line.starts_with("gallocy: transport:") {
            transport = Some(line);
        } else {
            stderr.push((i, line));
        }
    }
    // The ranks' stderr, as it would have appeared.
    for (i, line) in &stderr {
        eprintln!("[{} {}] {line}", w.name(), labels[*i]);
    }
    if !report.success() {
        let how = match report.first_failure {
            Some(i) if !report.timed_out || report.outcomes[i] != launch::RankOutcome::StoppedByLauncher => {
                report.outcomes[i].describe_as(&labels[i])
            }
            _ => format!("timed out after {} s (killed; a hang?)", timeout.as_secs()),
        };
        let lines: Vec<String> = stderr.into_iter().map(|(_, l)| l).collect();
        return Err(JobError { how, line: pick_error_line(&lines) });
    }
    let Some(json) = record else {
        return Err(err(format!("{} printed no result", labels[0])));
    };
    let o: Outcome = serde_json::from_str(&json).map_err(|e| err(format!("bad result record {json}: {e}")))?;
    Ok((o, transport))
}

/// Number of the CPUs this process may run on.
fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn cmd(a: WorkloadsArgs) -> Result<()> {
    let started = now_ns();
    let mut workloads = if a.workloads.is_empty() { Workload::ALL.to_vec() } else { a.workloads.clone() };
    workloads.sort();
    workloads.dedup();
    let mut ranks: Vec<usize> = a.ranks.iter().map(|&n| n as usize).collect();
    ranks.sort();
    ranks.dedup();
    let mut modes = a.consistency.clone();
    modes.dedup();
    let nproc = nproc();
    let reps = a.reps as usize;
    let reps_over = a.reps_oversubscribed.map_or(reps, |r| r as usize);
    let timeout = Duration::from_secs(a.timeout_s);
    let svg_path = a.svg.clone().unwrap_or_else(default_svg);
    let idle = crate::idle_pct(Duration::from_millis(300));
    let load = crate::load_avg_1m();
    let plan = Plan {
        workloads: workloads.clone(),
        ranks: ranks.clone(),
        modes: modes.clone(),
        reps,
        reps_oversubscribed: reps_over,
        nproc,
        transport: crate::transport_from_env(),
        placement: std::env::var("GALLOCY_PLACEMENT").ok().filter(|v| !v.trim().is_empty()).unwrap_or("default".into()),
        load_avg_1m: load,
        idle_before_pct: idle,
        params: a.params.clone(),
    };
    println!(
        "gallocy-bench workloads: {} ranks={} reps={}{} consistency={} transport={} placement={} nproc={} load_avg_1m={:.2} idle_before={:.0}%",
        workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(","),
        ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        reps,
        if reps_over != reps { format!(" (N > {nproc}: {reps_over})") } else { String::new() },
        modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
        plan.transport,
        plan.placement,
        nproc,
        load,
        idle
    );
    let s = &a.params;
    println!(
        "sizes: matmul {0}x{0}, jacobi {1}x{1} x {2} sweeps, false_sharing {3} slots x {4} rounds x {5} passes, \
         lock_queue {6} items x {7} rounds, pointer_chase {8} nodes / {9} lookups, flag {10} rounds, peterson {11} s",
        s.matmul_n,
        s.jacobi_n,
        s.jacobi_iters,
        s.fs_slots,
        s.fs_rounds,
        s.fs_passes,
        s.queue_items,
        s.queue_work,
        s.tree_nodes,
        s.tree_lookups,
        s.flag_rounds,
        s.peterson_seconds
    );
    if idle < 90.0 {
        println!("warning: the machine was only {idle:.0}% idle before the run; expect noisy numbers");
    }

    // cells[(workload, N, side)]
    let mut cells: BTreeMap<(Workload, usize, Option<usize>), Cell> = BTreeMap::new();
    // A mode the runtime refused: its error line.
    let mut rejected: Vec<Option<String>> = vec![None; modes.len()];
    let mut transport_line: Option<String> = None;
    let max_reps = reps.max(reps_over);
    for rep in 0..max_reps {
        for &w in &workloads {
            let ns: Vec<usize> = if w.has_baseline() { ranks.clone() } else { vec![2] };
            for &n in &ns {
                let wanted = if n > nproc { reps_over } else { reps };
                if rep >= wanted {
                    continue;
                }
                let mut sides: Vec<Side> = Vec::new();
                if w.has_baseline() {
                    sides.push(Side::Sequential);
                }
                // flag and peterson spin on shared words: racy by design, so undefined under release
                // consistency (a spinner may never see the other's write). They run under
                // sequential consistency only.
                sides.extend(
                    modes.iter().filter(|m| w.has_baseline() || **m != Consistency::Release).map(|&m| Side::Gallocy(m)),
                );
                if sides.is_empty() {
                    continue;
                }
                let len = sides.len();
                sides.rotate_left(rep % len);
                for side in sides {
                    let mi = match side {
                        Side::Sequential => None,
                        Side::Gallocy(m) => Some(modes.iter().position(|x| *x == m).expect("mode")),
                    };
                    let cell = cells.entry((w, n, mi)).or_default();
                    if cell.error.is_some() {
                        continue;
                    }
                    if let Some(line) = mi.and_then(|i| rejected[i].as_ref()) {
                        cell.error = Some(format!("not run: the runtime refused this GALLOCY_CONSISTENCY ({line})"));
                        continue;
                    }
                    let what = match side {
                        Side::Sequential => format!("{} sequential (for N={n})", w.name()),
                        Side::Gallocy(m) => format!("{} N={n} gallocy ({})", w.name(), m.name()),
                    };
                    match run_job(w, &a.params, side, n, timeout) {
                        Ok((o, t)) => {
                            println!(
                                "  rep {}/{wanted}: {what}: {:.1} ms (setup {:.1} ms) checksum {:#018x}{}",
                                rep + 1,
                                o.ms,
                                o.setup_ms,
                                o.checksum,
                                o.problem.as_ref().map(|p| format!(" PROBLEM: {p}")).unwrap_or_default()
                            );
                            if transport_line.is_none() {
                                transport_line = t;
                            }
                            cell.add(o);
                        }
                        Err(e) => {
                            println!("  rep {}/{wanted}: {what}: FAILED: {e}", rep + 1);
                            if let (Some(i), Some(line)) = (mi, &e.line) {
                                if line.contains("GALLOCY_CONSISTENCY") {
                                    rejected[i] = Some(line.clone());
                                }
                            }
                            cell.error = Some(e.to_string());
                        }
                    }
                }
            }
        }
    }

    let results = report::evaluate(&plan, &cells);
    println!();
    print!("{}", report::table(&plan, &results));
    let svg_written = match std::fs::create_dir_all(svg_path.parent().unwrap_or(std::path::Path::new(".")))
        .and_then(|()| std::fs::write(&svg_path, super::svg::render(&plan, &results)))
    {
        Ok(()) => {
            let shown = std::fs::canonicalize(&svg_path).unwrap_or(svg_path.clone());
            println!("plot of speedup against N written to {}", shown.display());
            Some(shown.display().to_string())
        }
        Err(e) => {
            println!("FAILED to write the plot to {}: {e}", svg_path.display());
            None
        }
    };
    let mut errors = results.errors.clone();
    if svg_written.is_none() {
        errors.push(format!("cannot write {}", svg_path.display()));
    }
    let seconds = (now_ns() - started) as f64 / 1e9;
    let line = report::json_line(&plan, &results, transport_line, svg_written, seconds, &errors);
    println!("{line}");
    if !errors.is_empty() {
        bail!("{} problem(s): see the FAILED lines above", errors.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_is_the_runtime_error() {
        let lines = vec![
            "some chatter".to_string(),
            "gallocy: rank 1: fatal: GALLOCY_CONSISTENCY=release is not supported".to_string(),
            "more".to_string(),
        ];
        assert_eq!(pick_error_line(&lines).unwrap(), lines[1]);
        assert_eq!(pick_error_line(&lines[2..]).unwrap(), "more");
        assert_eq!(pick_error_line(&[]), None);
        assert!(default_svg().ends_with("workloads.svg"));
    }
}
