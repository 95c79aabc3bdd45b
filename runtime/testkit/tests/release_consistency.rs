//! `GALLOCY_CONSISTENCY=release`: data-race-free programs give bit-exact results on 2 to 4
//! ranks, with locks and barriers, several writers per page, and copies that survive
//! synchronization when nobody else writes them. The same tests run over RDMA in CI's guest
//! (`GALLOCY_TRANSPORT=rdma`). Run in release mode; the timeouts are hard limits, not targets.

use gallocy_testkit::*;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// `gallocy run -n N -- gallocy-scenario ARGS` under release consistency: every rank passes.
fn release_ok(n: usize, args: &[&str], timeout: Duration) -> Finished {
    let label = format!("GALLOCY_CONSISTENCY=release gallocy run -n {n} -- gallocy-scenario {}", args.join(" "));
    let mut cmd = launcher_cmd(n, args);
    cmd.env("GALLOCY_CONSISTENCY", "release");
    let p = run(&label, &mut cmd, timeout);
    assert!(p.success(), "{label}: expected exit 0, got {}\n{}", describe(p.status), p.report());
    let all = format!("{}{}", p.stdout, p.stderr);
    for r in 0..n {
        let pass = format!("rank {r}: {} ok", args[0]);
        assert!(all.contains(&pass), "{label}: no {pass:?} line\n{}", p.report());
    }
    p
}

/// The number just before `what` in rank `r`'s PASS line of `name`.
fn number_before(p: &Finished, r: usize, name: &str, what: &str) -> u64 {
    let all = format!("{}{}", p.stdout, p.stderr);
    let pass = format!("rank {r}: {name} ok");
    let line = all.lines().find(|l| l.contains(&pass)).expect("checked by release_ok");
    let at = line.find(what).unwrap_or_else(|| panic!("no {what:?} in {line:?}"));
    line[..at].split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no number in {line:?}"))
}

#[test]
fn several_writers_per_page_locks_and_quiet_pages_are_exact_on_2_to_4_ranks() {
    let _g = serial();
    for n in [2, 3, 4] {
        let rounds = count(30, 8);
        let p = release_ok(n, &["rc-drf", "--rounds", &rounds, "--pages", "5"], limit(3 * MIN));
        for r in 0..n {
            // Every rank writes pages homed elsewhere (diffs) and drops copies others write.
            assert!(number_before(&p, r, "rc-drf", "diffs sent") > 0, "rank {r} sent no diff\n{}", p.report());
            assert!(number_before(&p, r, "rc-drf", "copies dropped") > 0, "rank {r} dropped no copy\n{}", p.report());
        }
    }
}

/// A randomized data-race-free program (owners of runs of bytes change every epoch; two threads
/// per rank; a locked counter per rank), every byte checked after every epoch, on 2 to 4 ranks
/// and under each placement of the array.
#[test]
fn a_randomized_data_race_free_program_is_exact() {
    let _g = serial();
    let epochs = count(40, 10);
    for (n, seed) in [(2, "1"), (3, "2"), (4, "3")] {
        let p = release_ok(n, &["rc-random", "--epochs", &epochs, "--seed", seed, "--threads", "2"], limit(3 * MIN));
        for r in 0..n {
            assert!(number_before(&p, r, "rc-random", "copies dropped") > 0, "rank {r}\n{}", p.report());
        }
    }
    for placement in ["first-touch", "cyclic"] {
        let label = format!(
            "GALLOCY_PLACEMENT={placement} GALLOCY_CONSISTENCY=release gallocy run -n 3 -- gallocy-scenario rc-random"
        );
        let mut cmd = launcher_cmd(3, &["rc-random", "--epochs", &epochs, "--seed", "4"]);
        cmd.env("GALLOCY_CONSISTENCY", "release").env("GALLOCY_PLACEMENT", placement);
        let p = run(&label, &mut cmd, limit(3 * MIN));
        assert!(p.success(), "{label}: expected exit 0, got {}\n{}", describe(p.status), p.report());
    }
}

#[test]
fn a_locked_counter_is_exact_under_release_consistency() {
    let _g = serial();
    let total = count(20_000, 2_000);
    release_ok(4, &["counter", "--total", &total, "--threads", "2"], limit(4 * MIN));
}

#[test]
fn jacobi_is_bit_exact_under_release_consistency() {
    let _g = serial();
    // Two threads per rank: a rank's threads share its copies and its releases.
    let p = release_ok(3, &["jacobi", "--n", "96", "--iters", "60", "--threads", "2"], limit(3 * MIN));
    assert!(p.stdout.contains("identical to the sequential reference bit for bit") || p.stderr.contains("bit for bit"));
}

#[test]
fn a_fill_read_by_every_rank_is_exact_under_release_consistency() {
    let _g = serial();
    release_ok(3, &["fill64", "--mib", "16"], limit(3 * MIN));
}

#[test]
fn ranks_must_agree_on_the_memory_model() {
    let _g = serial();
    let mut job = Job::builder(2).env(1, "GALLOCY_CONSISTENCY", "release").spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("GALLOCY_CONSISTENCY=release on rank 1 only", limit(MIN));
    for r in 0..2 {
        assert!(job.ranks[r].status().is_some_and(|s| !s.success()), "rank {r} must fail\n{}", job.report());
        assert!(
            job.ranks[r].stderr().contains("GALLOCY_CONSISTENCY"),
            "rank {r}'s error names the variable\n{}",
            job.report()
        );
    }
}
