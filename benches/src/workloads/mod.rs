//! `gallocy-bench workloads`: small application kernels on gallocy at N ranks, each next to a
//! sequential version of the same kernel on private memory, in the same run.
//!
//! Workloads with a sequential baseline (one module each):
//! * [`matmul`]: C = A×B of `--matmul-n` square f64 matrices, row blocks per rank;
//! * [`jacobi`]: `--jacobi-iters` Jacobi sweeps of a `--jacobi-n` grid (the kernel of
//!   `gallocy_cli::jacobi`), row blocks, a barrier per sweep;
//! * [`false_sharing`]: interleaved slots of one 32 KiB array, `--fs-rounds` × `--fs-passes`;
//! * [`lock_queue`]: `--queue-items` items taken one at a time from a queue under a global lock;
//! * [`pointer_chase`]: `--tree-lookups` searches in a binary search tree of `--tree-nodes` nodes
//!   that rank 0 built with gallocy's `malloc`.
//!
//! Flags and fairness (2 ranks, no baseline): [`flag`] (message passing through a data word and a
//! flag word: the one-way visibility latency) and [`peterson`] (Peterson's mutual exclusion for
//! `--peterson-seconds`: entries per rank and the smaller share).
//!
//! Every workload computes a u64 checksum; the gallocy run's must equal the sequential run's.
//! Each job is started by [`driver`] as copies of this executable (hidden subcommand
//! `__workloads-rank`): one process for the sequential side, a job of N ranks
//! (`gallocy_cli::launch`) for the gallocy side. [`report`] prints the table and the JSON line,
//! [`svg`] draws the speedups.

mod common;
mod driver;
mod false_sharing;
mod flag;
mod jacobi;
mod lock_queue;
mod matmul;
mod peterson;
mod pointer_chase;
mod report;
mod svg;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

pub use driver::cmd;

/// `gallocy-bench workloads --help`, after the options.
pub const HELP: &str = "\
Each workload runs sequentially (one process, plain memory) and on gallocy at every N of --ranks,
interleaved, --reps times; the table shows medians, ratio = gallocy / sequential and
speedup = sequential / gallocy. flag and peterson always run on 2 ranks and have no baseline.
The ranks inherit the environment (GALLOCY_TRANSPORT, GALLOCY_PLACEMENT, GALLOCY_SPIN_US, ...);
--consistency sets GALLOCY_CONSISTENCY for them (flag and peterson, racy by design, run under
sequential consistency only). A checksum that differs from the sequential
one, or a job that fails, is an error: the exit status is then 1 (after the table and JSON).
The last line of stdout is one JSON object.";

/// The workloads, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Workload {
    #[value(name = "matmul")]
    Matmul,
    #[value(name = "jacobi")]
    Jacobi,
    #[value(name = "false_sharing")]
    FalseSharing,
    #[value(name = "lock_queue")]
    LockQueue,
    #[value(name = "pointer_chase")]
    PointerChase,
    #[value(name = "flag")]
    Flag,
    #[value(name = "peterson")]
    Peterson,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Matmul,
        Workload::Jacobi,
        Workload::FalseSharing,
        Workload::LockQueue,
        Workload::PointerChase,
        Workload::Flag,
        Workload::Peterson,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Matmul => "matmul",
            Workload::Jacobi => "jacobi",
            Workload::FalseSharing => "false_sharing",
            Workload::LockQueue => "lock_queue",
            Workload::PointerChase => "pointer_chase",
            Workload::Flag => "flag",
            Workload::Peterson => "peterson",
        }
    }

    /// True for the workloads compared with a sequential version (not flag, peterson).
    pub fn has_baseline(self) -> bool {
        !matches!(self, Workload::Flag | Workload::Peterson)
    }
}

/// A value of `GALLOCY_CONSISTENCY` for the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    #[value(name = "sequential")]
    Sequential,
    #[value(name = "release")]
    Release,
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Sequential => "sequential",
            Consistency::Release => "release",
        }
    }
}

/// Problem sizes and rank options, shared by the command and its ranks (every rank gets the same
/// values).
#[derive(Debug, Clone, Args, Serialize)]
pub struct Params {
    /// matmul: the matrices are N×N f64
    #[arg(long = "matmul-n", value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=16384))]
    pub matmul_n: u64,
    /// jacobi: the grid is N×N f64
    #[arg(long = "jacobi-n", value_name = "N", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(3..=32768))]
    pub jacobi_n: u64,
    /// jacobi: sweeps
    #[arg(long = "jacobi-iters", value_name = "N", default_value_t = 100)]
    pub jacobi_iters: u64,
    /// false_sharing: u64 slots of the shared array (4096 = 32 KiB)
    #[arg(long = "fs-slots", value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub fs_slots: u64,
    /// false_sharing: rounds (a barrier after each)
    #[arg(long = "fs-rounds", value_name = "N", default_value_t = 20)]
    pub fs_rounds: u64,
    /// false_sharing: passes over the own slots per round
    #[arg(long = "fs-passes", value_name = "N", default_value_t = 1000)]
    pub fs_passes: u64,
    /// lock_queue: items in the queue
    #[arg(long = "queue-items", value_name = "N", default_value_t = 20000)]
    pub queue_items: u64,
    /// lock_queue: mixing rounds of work per item
    #[arg(long = "queue-work", value_name = "N", default_value_t = 200)]
    pub queue_work: u64,
    /// pointer_chase: nodes of the tree
    #[arg(long = "tree-nodes", value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub tree_nodes: u64,
    /// pointer_chase: lookups in all (split among the ranks)
    #[arg(long = "tree-lookups", value_name = "N", default_value_t = 200_000)]
    pub tree_lookups: u64,
    /// flag: timed ping-pong rounds
    #[arg(long = "flag-rounds", value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub flag_rounds: u64,
    /// peterson: seconds each rank keeps entering
    #[arg(long = "peterson-seconds", value_name = "S", default_value_t = 3.0, value_parser = seconds)]
    pub peterson_seconds: f64,
    /// flag, peterson: yield the CPU (sched_yield) in every iteration of a spin wait, instead of
    /// only spinning
    #[arg(long = "spin-yield")]
    pub spin_yield: bool,
}

impl Params {
    /// The same values as command-line arguments of a rank.
    fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut put = |k: &str, val: String| {
            v.push(format!("--{k}"));
            v.push(val);
        };
        put("matmul-n", self.matmul_n.to_string());
        put("jacobi-n", self.jacobi_n.to_string());
        put("jacobi-iters", self.jacobi_iters.to_string());
        put("fs-slots", self.fs_slots.to_string());
        put("fs-rounds", self.fs_rounds.to_string());
        put("fs-passes", self.fs_passes.to_string());
        put("queue-items", self.queue_items.to_string());
        put("queue-work", self.queue_work.to_string());
        put("tree-nodes", self.tree_nodes.to_string());
        put("tree-lookups", self.tree_lookups.to_string());
        put("flag-rounds", self.flag_rounds.to_string());
        put("peterson-seconds", self.peterson_seconds.to_string());
        if self.spin_yield {
            v.push("--spin-yield".into());
        }
        v
    }
}

/// A duration in seconds: finite, 0 < s <= 3600.
fn seconds(v: &str) -> Result<f64, String> {
    let s: f64 = v.trim().parse().map_err(|_| format!("not a number of seconds: {v}"))?;
    if !(s > 0.0 && s <= 3600.0) {
        return Err(format!("{v}: must be more than 0 and at most 3600"));
    }
    Ok(s)
}

/// `gallocy-bench workloads` options.
#[derive(Debug, Clone, Args)]
pub struct WorkloadsArgs {
    /// Workloads, comma-separated [default: all]
    #[arg(long, value_name = "A,B", value_delimiter = ',', value_enum)]
    pub workloads: Vec<Workload>,
    /// Ranks of the gallocy jobs, comma-separated (flag and peterson always use 2)
    #[arg(long, value_name = "N,M", value_delimiter = ',', default_value = "1,2,4",
          value_parser = clap::value_parser!(u64).range(1..=gallocy::MAX_PROCESSES as u64))]
    pub ranks: Vec<u64>,
    /// Runs of every (workload, N); the table shows the median
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub reps: u64,
    /// Runs of the gallocy jobs whose N exceeds the CPUs available (oversubscribed), and of
    /// their sequential runs [default: --reps]
    #[arg(long = "reps-oversubscribed", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub reps_oversubscribed: Option<u64>,
    /// GALLOCY_CONSISTENCY of the ranks, comma-separated: one row per value
    #[arg(long, value_name = "A,B", value_delimiter = ',', value_enum, default_value = "sequential")]
    pub consistency: Vec<Consistency>,
    /// Where to write the SVG plot of speedup against N [default: workloads.svg in the target
    /// directory of this executable]
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// Time limit of each job (one sequential process or the N ranks of one run), in seconds
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,
    #[command(flatten)]
    pub params: Params,
}

/// `__workloads-rank --workload W [--sequential] SIZES`: one rank of a gallocy job (or, with
/// `--sequential`, the sequential version in this process, without joining any job).
#[derive(Debug, Clone, Args)]
pub struct RankArgs {
    #[arg(long, value_enum)]
    workload: Workload,
    #[arg(long)]
    sequential: bool,
    #[command(flatten)]
    params: Params,
}

/// Prefix of the result line a rank hands to the driver.
pub const RECORD_PREFIX: &str = "@@wl ";

/// Arguments of a `__workloads-rank` child.
fn rank_args(w: Workload, sequential: bool, params: &Params) -> Vec<String> {
    let mut v = vec!["__workloads-rank".to_string(), "--workload".into(), w.name().into()];
    if sequential {
        v.push("--sequential".into());
    }
    v.extend(params.to_args());
    v
}

/// Body of `__workloads-rank`: runs the workload, and rank 0 (or the sequential process) prints
/// one record line ([`RECORD_PREFIX`] + JSON of [`Outcome`]).
pub fn rank_main(a: RankArgs) -> Result<()> {
    let s = &a.params;
    common::set_spin_yield(s.spin_yield);
    if a.sequential {
        let o = match a.workload {
            Workload::Matmul => matmul::sequential(s),
            Workload::Jacobi => jacobi::sequential(s),
            Workload::FalseSharing => false_sharing::sequential(s),
            Workload::LockQueue => lock_queue::sequential(s),
            Workload::PointerChase => pointer_chase::sequential(s),
            Workload::Flag | Workload::Peterson => bail!("{} has no sequential version", a.workload.name()),
        }?;
        println!("{RECORD_PREFIX}{}", o.to_json());
        return Ok(());
    }
    gallocy::init().map_err(|e| anyhow::anyhow!("gallocy::init: {e}"))?;
    let o = match a.workload {
        Workload::Matmul => matmul::distributed(s),
        Workload::Jacobi => jacobi::distributed(s),
        Workload::FalseSharing => false_sharing::distributed(s),
        Workload::LockQueue => lock_queue::distributed(s),
        Workload::PointerChase => pointer_chase::distributed(s),
        Workload::Flag => flag::distributed(s),
        Workload::Peterson => peterson::distributed(s),
    }?;
    if let Some(o) = o {
        println!("{RECORD_PREFIX}{}", o.to_json());
    }
    gallocy::finalize().map_err(|e| anyhow::anyhow!("gallocy::finalize: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_round_trip() {
        let a = crate::parse_args::<WorkloadsArgs>(&[]).unwrap();
        assert!(a.workloads.is_empty());
        assert_eq!(a.ranks, [1, 2, 4]);
        assert_eq!((a.reps, a.timeout_s, a.params.matmul_n, a.params.jacobi_n), (3, 1800, 1024, 2048));
        assert_eq!(a.consistency, [Consistency::Sequential]);
        let a = crate::parse_args::<WorkloadsArgs>(&[
            "--workloads",
            "flag,matmul",
            "--ranks=2",
            "--consistency",
            "sequential,release",
            "--matmul-n",
            "8",
            "--peterson-seconds",
            "0.5",
        ])
        .unwrap();
        assert_eq!(a.workloads, [Workload::Flag, Workload::Matmul]);
        assert_eq!(a.consistency.len(), 2);
        for bad in [
            &["--workloads", "nope"][..],
            &["--ranks", "0"],
            &["--ranks", "1025"],
            &["--reps", "0"],
            &["--consistency", "weak"],
            &["--peterson-seconds", "0"],
            &["--jacobi-n", "2"],
        ] {
            assert!(crate::parse_args::<WorkloadsArgs>(bad).is_err(), "{bad:?}");
        }
        let args = rank_args(Workload::Jacobi, true, &a.params);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let back = crate::parse_args::<RankArgs>(&args[1..]).unwrap();
        assert!(back.sequential && back.workload == Workload::Jacobi);
        assert_eq!(back.params.matmul_n, 8);
        assert_eq!(back.params.peterson_seconds, 0.5);
    }
}
