//! The results of `gallocy-bench workloads`: medians and checksum verdicts per row, the table,
//! and the JSON line (`{"bench":"workloads",...}`, serde_json).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::json;

use super::common::Outcome;
use super::{Consistency, Params, Workload};
use crate::malloc::median;
use crate::report::{to_line, Fields, Num};

/// What the run was asked to do, and where it ran.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workloads: Vec<Workload>,
    pub ranks: Vec<usize>,
    pub modes: Vec<Consistency>,
    pub reps: usize,
    pub reps_oversubscribed: usize,
    pub nproc: usize,
    pub transport: String,
    pub placement: String,
    pub load_avg_1m: f64,
    pub idle_before_pct: f64,
    pub params: Params,
}

/// The runs of one (workload, N, side).
#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub runs: Vec<Outcome>,
    /// Why it stopped running (a job failed), if it did.
    pub error: Option<String>,
}

impl Cell {
    pub fn add(&mut self, o: Outcome) {
        self.runs.push(o);
    }

    fn ms(&self) -> Vec<f64> {
        self.runs.iter().map(|o| o.ms).collect()
    }

    fn setup_ms(&self) -> Vec<f64> {
        self.runs.iter().map(|o| o.setup_ms).collect()
    }

    /// Median of every figure the runs reported.
    fn figures(&self) -> Vec<(String, f64)> {
        let keys: BTreeSet<&String> = self.runs.iter().flat_map(|o| o.figures.keys()).collect();
        keys.into_iter()
            .map(|k| {
                let v: Vec<f64> = self.runs.iter().filter_map(|o| o.figures.get(k).copied()).collect();
                (k.clone(), median(&v))
            })
            .collect()
    }
}

/// One row of the table: a workload at N ranks in one consistency mode.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: Workload,
    pub n: usize,
    pub mode: Consistency,
    pub seq_ms: f64,
    pub gal_ms: f64,
    pub seq_setup_ms: f64,
    pub gal_setup_ms: f64,
    pub seq_runs: Vec<f64>,
    pub gal_runs: Vec<f64>,
    pub seq_checksum: Option<u64>,
    pub checksum: Option<u64>,
    pub checksum_ok: bool,
    pub oversubscribed: bool,
    pub figures: Vec<(String, f64)>,
    /// Everything that went wrong in this row.
    pub error: Option<String>,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.gal_ms / self.seq_ms
    }

    pub fn speedup(&self) -> f64 {
        self.seq_ms / self.gal_ms
    }

    pub fn figure(&self, k: &str) -> f64 {
        self.figures.iter().find(|(n, _)| n == k).map_or(f64::NAN, |(_, v)| *v)
    }

    /// "matmul N=2 (sequential)", for messages.
    pub fn what(&self) -> String {
        format!("{} N={} ({})", self.workload.name(), self.n, self.mode.name())
    }
}

/// Every row, and every problem found.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    pub errors: Vec<String>,
}

type Cells = BTreeMap<(Workload, usize, Option<usize>), Cell>;

/// The rows of the table, from the runs.
pub fn evaluate(plan: &Plan, cells: &Cells) -> Results {
    let empty = Cell::default();
    let mut res = Results::default();
    for &w in &plan.workloads {
        let ns = if w.has_baseline() { plan.ranks.clone() } else { vec![2] };
        for &n in &ns {
            for (mi, &mode) in plan.modes.iter().enumerate() {
                if !w.has_baseline() && mode == Consistency::Release {
                    // flag and peterson are racy by design: not run under release consistency.
                    continue;
                }
                let seq = if w.has_baseline() { cells.get(&(w, n, None)) } else { None };
                let gal = cells.get(&(w, n, Some(mi))).unwrap_or(&empty);
                let row = row(w, n, mode, plan.nproc, seq, gal);
                if let Some(e) = &row.error {
                    res.errors.push(format!("{}: {e}", row.what()));
                }
                res.rows.push(row);
            }
        }
    }
    res
}

fn row(w: Workload, n: usize, mode: Consistency, nproc: usize, seq: Option<&Cell>, gal: &Cell) -> Row {
    let mut problems: Vec<String> = Vec::new();
    if let Some(e) = seq.and_then(|s| s.error.as_ref()) {
        problems.push(format!("sequential run failed: {e}"));
    }
    if let Some(e) = &gal.error {
        problems.push(format!("gallocy run failed: {e}"));
    }
    for o in seq.iter().flat_map(|s| s.runs.iter()).chain(&gal.runs) {
        if let Some(p) = &o.problem {
            problems.push(p.clone());
        }
    }
    let seq_sums: BTreeSet<u64> = seq.iter().flat_map(|s| s.runs.iter()).map(|o| o.checksum).collect();
    let gal_sums: Vec<u64> = gal.runs.iter().map(|o| o.checksum).collect();
    if seq_sums.len() > 1 {
        problems.push(format!("the sequential checksums differ between runs: {seq_sums:x?}"));
    }
    let seq_checksum = seq_sums.iter().next().copied();
    let mut checksum_ok = problems.is_empty() && !gal.runs.is_empty();
    if w.has_baseline() {
        match seq_checksum {
            Some(want) => {
                let bad: Vec<String> = gal_sums
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c != want)
                    .map(|(i, c)| format!("run {}: {c:#018x}", i + 1))
                    .collect();
                if !bad.is_empty() {
                    problems.push(format!("checksum MISMATCH: gallocy {} != sequential {want:#018x}", bad.join(", ")));
                    checksum_ok = false;
                }
            }
            None => checksum_ok = false,
        }
    }
    Row {
        workload: w,
        n,
        mode,
        seq_ms: seq.map_or(f64::NAN, |s| median(&s.ms())),
        gal_ms: median(&gal.ms()),
        seq_setup_ms: seq.map_or(f64::NAN, |s| median(&s.setup_ms())),
        gal_setup_ms: median(&gal.setup_ms()),
        seq_runs: seq.map_or(Vec::new(), Cell::ms),
        gal_runs: gal.ms(),
        seq_checksum,
        checksum: gal_sums.first().copied(),
        checksum_ok,
        oversubscribed: n > nproc,
        figures: gal.figures(),
        error: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

fn f(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "-".into()
    }
}

fn verdict(r: &Row) -> &'static str {
    if r.checksum_ok {
        "ok"
    } else if r.error.as_deref().is_some_and(|e| e.contains("MISMATCH")) {
        "MISMATCH"
    } else if r.error.as_deref().is_some_and(|e| e.contains("failed")) {
        "FAILED"
    } else {
        "BAD"
    }
}

/// The human table (and the notes under it).
pub fn table(plan: &Plan, res: &Results) -> String {
    let mut s = String::new();
    let base: Vec<&Row> = res.rows.iter().filter(|r| r.workload.has_baseline()).collect();
    if !base.is_empty() {
        s += &format!(
            "{:<14} {:>3} {:<11} {:>10} {:>11} {:>7} {:>8} {:>9} {:>9}  {}\n",
            "workload",
            "N",
            "consistency",
            "seq ms",
            "gallocy ms",
            "ratio",
            "speedup",
            "seq setup",
            "gal setup",
            "checksum"
        );
        for r in &base {
            s += &format!(
                "{:<14} {:>3} {:<11} {:>10} {:>11} {:>7} {:>8} {:>9} {:>9}  {}\n",
                r.workload.name(),
                format!("{}{}", r.n, if r.oversubscribed { "*" } else { "" }),
                r.mode.name(),
                f(r.seq_ms, 1),
                f(r.gal_ms, 1),
                f(r.ratio(), 2),
                f(r.speedup(), 2),
                f(r.seq_setup_ms, 1),
                f(r.gal_setup_ms, 1),
                verdict(r)
            );
        }
        let over: Vec<usize> = plan.ranks.iter().copied().filter(|&n| n > plan.nproc).collect();
        s += &format!(
            "ms: the timed phase (barrier to barrier on rank 0), median of {} runs{}; ratio = gallocy / sequential; \
             speedup = sequential / gallocy;\n    setup: allocation and the owners' initialisation (sequential: the same \
             in private memory).\n",
            plan.reps,
            if plan.reps_oversubscribed != plan.reps {
                format!(" ({} for N > {})", plan.reps_oversubscribed, plan.nproc)
            } else {
                String::new()
            }
        );
        if !over.is_empty() {
            s += &format!(
                "note: * N={} on this {}-CPU machine (nproc = {}) is oversubscribed: the ranks (and their service \
                 threads) share CPUs, so these rows measure time slicing as much as gallocy.\n",
                over.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
                plan.nproc,
                plan.nproc
            );
        }
        for r in base.iter().filter(|r| r.workload == Workload::LockQueue && r.n > 1 && !r.gal_runs.is_empty()) {
            let takes: Vec<String> = (0..r.n).map(|k| f(r.figure(&format!("takes_rank{k}")), 0)).collect();
            s += &format!(
                "lock_queue N={} ({}): takes per rank {} (median), smaller share x N = {}\n",
                r.n,
                r.mode.name(),
                takes.join(" / "),
                f(r.figure("min_share") * r.n as f64, 2)
            );
        }
    }
    let flag: Vec<&Row> = res.rows.iter().filter(|r| r.workload == Workload::Flag).collect();
    if !flag.is_empty() {
        s += if s.is_empty() { "" } else { "\n" };
        s += &format!(
            "{:<20} {:<11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  {}\n",
            "flag (2 ranks)",
            "consistency",
            "1way p50",
            "1way p99",
            "0->1 p50",
            "1->0 p50",
            "rtt p50",
            "rtt p99",
            "data"
        );
        for r in flag {
            s += &format!(
                "{:<20} {:<11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  {}\n",
                format!("{} rounds", f(r.figure("rounds"), 0)),
                r.mode.name(),
                f(r.figure("one_way_p50_us"), 1),
                f(r.figure("one_way_p99_us"), 1),
                f(r.figure("one_way_0to1_p50_us"), 1),
                f(r.figure("one_way_1to0_p50_us"), 1),
                f(r.figure("rtt_p50_us"), 1),
                f(r.figure("rtt_p99_us"), 1),
                verdict(r)
            );
        }
        s += "flag: µs from the writer's clock reading (just before data, fence, flag) to the reader seeing the flag; \
              medians of the runs' percentiles.\n";
    }
    let pet: Vec<&Row> = res.rows.iter().filter(|r| r.workload == Workload::Peterson).collect();
    if !pet.is_empty() {
        s += if s.is_empty() { "" } else { "\n" };
        s += &format!(
            "{:<20} {:<11} {:>10} {:>10} {:>10} {:>10} {:>9}  {}\n",
            "peterson (2 ranks)", "consistency", "rank 0", "rank 1", "total", "entries/s", "min share", "mutex"
        );
        for r in pet {
            s += &format!(
                "{:<20} {:<11} {:>10} {:>10} {:>10} {:>10} {:>9}  {}\n",
                format!("{} s", plan.params.peterson_seconds),
                r.mode.name(),
                f(r.figure("entries_rank0"), 0),
                f(r.figure("entries_rank1"), 0),
                f(r.figure("total"), 0),
                f(r.figure("entries_per_s"), 0),
                f(r.figure("min_share"), 3),
                verdict(r)
            );
        }
        s += "peterson: entries into the critical section (median of the runs); min share = min / total (0.5 is fair).\n";
    }
    for e in &res.errors {
        s += &format!("FAILED: {e}\n");
    }
    s
}

/// One row in the JSON line.
#[derive(Debug, Clone, Serialize)]
struct RowJson {
    workload: &'static str,
    n: usize,
    consistency: &'static str,
    sequential_ms: Num,
    gallocy_ms: Num,
    ratio: Num,
    speedup: Num,
    sequential_setup_ms: Num,
    gallocy_setup_ms: Num,
    sequential_runs_ms: Vec<Num>,
    gallocy_runs_ms: Vec<Num>,
    sequential_checksum: Option<String>,
    checksum: Option<String>,
    checksum_ok: bool,
    oversubscribed: bool,
    #[serde(flatten)]
    figures: Fields,
    error: Option<String>,
}

impl From<&Row> for RowJson {
    fn from(r: &Row) -> Self {
        let mut figures = Fields::new();
        for (k, v) in &r.figures {
            figures.num(k.clone(), *v);
        }
        RowJson {
            workload: r.workload.name(),
            n: r.n,
            consistency: r.mode.name(),
            sequential_ms: Num(r.seq_ms),
            gallocy_ms: Num(r.gal_ms),
            ratio: Num(r.ratio()),
            speedup: Num(r.speedup()),
            sequential_setup_ms: Num(r.seq_setup_ms),
            gallocy_setup_ms: Num(r.gal_setup_ms),
            sequential_runs_ms: r.seq_runs.iter().map(|&v| Num(v)).collect(),
            gallocy_runs_ms: r.gal_runs.iter().map(|&v| Num(v)).collect(),
            sequential_checksum: r.seq_checksum.map(|c| format!("{c:#018x}")),
            checksum: r.checksum.map(|c| format!("{c:#018x}")),
            checksum_ok: r.checksum_ok,
            oversubscribed: r.oversubscribed,
            figures,
            error: r.error.clone(),
        }
    }
}

/// The JSON line: header, `results` (workloads with a baseline), `flag`, `peterson`.
#[derive(Debug, Clone, Serialize)]
struct Line<'a> {
    bench: &'static str,
    workloads: Vec<&'static str>,
    ranks: &'a [usize],
    consistency: Vec<&'static str>,
    reps: usize,
    reps_oversubscribed: usize,
    nproc: usize,
    transport: &'a str,
    /// The transport the jobs ran on: from the runtime's `gallocy: transport:` line, else `tcp`
    /// for a build without RDMA.
    transport_effective: Option<String>,
    transport_line: Option<String>,
    placement: &'a str,
    env: Fields,
    load_avg_1m: Num,
    idle_before_pct: Num,
    params: &'a Params,
    results: Vec<RowJson>,
    flag: Vec<RowJson>,
    peterson: Vec<RowJson>,
    svg: Option<String>,
    seconds: Num,
    errors: &'a [String],
}

/// The `GALLOCY_*` variables the ranks inherit (the job's own, and the token, left out).
fn passed_env() -> Fields {
    let mut v: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("GALLOCY_")
                && !matches!(
                    k.as_str(),
                    "GALLOCY_TOKEN" | "GALLOCY_RANK" | "GALLOCY_SIZE" | "GALLOCY_COORDINATOR" | "GALLOCY_CONSISTENCY"
                )
        })
        .collect();
    v.sort();
    let mut f = Fields::new();
    for (k, val) in v {
        f.insert(k, json!(val));
    }
    f
}

/// `rdma` or `tcp`, from the line rank 0 prints on an RDMA build (`gallocy: transport: tcp (auto:
/// ...)`); a build without RDMA always runs TCP.
fn effective_transport(line: Option<&str>) -> Option<String> {
    match line.and_then(|l| l.strip_prefix("gallocy: transport:")) {
        Some(rest) => rest.split_whitespace().next().map(str::to_string),
        None if !gallocy::RDMA_BUILT => Some("tcp".into()),
        None => None,
    }
}

pub fn json_line(
    plan: &Plan,
    res: &Results,
    transport_line: Option<String>,
    svg: Option<String>,
    seconds: f64,
    errors: &[String],
) -> String {
    let pick = |f: &dyn Fn(&Row) -> bool| res.rows.iter().filter(|r| f(r)).map(RowJson::from).collect::<Vec<_>>();
    let line = Line {
        bench: "workloads",
        workloads: plan.workloads.iter().map(|w| w.name()).collect(),
        ranks: &plan.ranks,
        consistency: plan.modes.iter().map(|m| m.name()).collect(),
        reps: plan.reps,
        reps_oversubscribed: plan.reps_oversubscribed,
        nproc: plan.nproc,
        transport: &plan.transport,
        transport_effective: effective_transport(transport_line.as_deref()),
        transport_line,
        placement: &plan.placement,
        env: passed_env(),
        load_avg_1m: Num(plan.load_avg_1m),
        idle_before_pct: Num(plan.idle_before_pct),
        params: &plan.params,
        results: pick(&|r| r.workload.has_baseline()),
        flag: pick(&|r| r.workload == Workload::Flag),
        peterson: pick(&|r| r.workload == Workload::Peterson),
        svg,
        seconds: Num(seconds),
        errors,
    };
    to_line(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ms: f64, checksum: u64) -> Outcome {
        Outcome { ms, setup_ms: 1.0, checksum, ..Default::default() }
    }

    #[test]
    fn rows_compare_checksums() {
        let seq = Cell { runs: vec![outcome(10.0, 7), outcome(12.0, 7)], error: None };
        let good = Cell { runs: vec![outcome(5.0, 7), outcome(6.0, 7)], error: None };
        let r = row(Workload::Matmul, 2, Consistency::Sequential, 2, Some(&seq), &good);
        assert!(r.checksum_ok && r.error.is_none(), "{r:?}");
        assert_eq!((r.seq_ms, r.gal_ms, r.speedup()), (11.0, 5.5, 2.0));
        let bad = Cell { runs: vec![outcome(5.0, 7), outcome(6.0, 8)], error: None };
        let r = row(Workload::Matmul, 4, Consistency::Sequential, 2, Some(&seq), &bad);
        assert!(!r.checksum_ok && r.oversubscribed);
        assert!(r.error.as_deref().unwrap().contains("MISMATCH"), "{r:?}");
        assert_eq!(verdict(&r), "MISMATCH");
        let failed = Cell { runs: vec![], error: Some("rank 1 exited with 1".into()) };
        let r = row(Workload::Matmul, 2, Consistency::Release, 2, Some(&seq), &failed);
        assert!(!r.checksum_ok && verdict(&r) == "FAILED");
        let flag = Cell { runs: vec![outcome(1.0, 0).figure("one_way_p50_us", 3.0)], error: None };
        let r = row(Workload::Flag, 2, Consistency::Sequential, 2, None, &flag);
        assert!(r.checksum_ok && r.figure("one_way_p50_us") == 3.0);
        assert_eq!(effective_transport(Some("gallocy: transport: rdma (rxe0 port 1)")).unwrap(), "rdma");
    }
}
