//! API misuse ends the misusing process with one clear line (no panic, no backtrace, no hang),
//! and its peers stop too, naming it.

use gallocy_testkit::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn misuse_stops_the_job(what: &str, expect: &str) {
    let _g = serial();
    let mut job = Job::builder(2).spawn(&["misuse", "--what", what, "--rank", "1"]);
    job.wait_or_fail(&format!("misuse {what}"), T);
    let report = job.report();
    let culprit = job.ranks[1].stderr();
    assert!(job.ranks[1].status().is_some_and(|s| s.code() == Some(1)), "misuse {what}: rank 1 must exit 1\n{report}");
    let fatal: Vec<&str> = culprit.lines().filter(|l| l.starts_with("gallocy: rank 1: fatal: ")).collect();
    assert_eq!(fatal.len(), 1, "misuse {what}: rank 1 must print one fatal line\n{report}");
    assert!(fatal[0].contains(expect), "misuse {what}: the line must say {expect:?}\n{report}");
    assert!(!culprit.contains("panicked") && !culprit.contains("backtrace"), "misuse {what}: no panic\n{report}");
    assert!(job.ranks[0].status().is_some_and(|s| !s.success()), "misuse {what}: rank 0 must fail too\n{report}");
    assert!(!job.ranks[0].stdout().contains("went on"), "misuse {what}: rank 0 must not go on\n{report}");
}

#[test]
fn unlocking_a_lock_not_held_is_a_clear_error() {
    misuse_stops_the_job("unlock-unheld", "unlock(7), but this process does not hold global lock 7");
}

#[test]
fn relocking_a_held_lock_is_a_clear_error() {
    misuse_stops_the_job("relock", "lock(7) by a thread that already holds global lock 7");
}

#[test]
fn a_broadcast_root_out_of_range_is_a_clear_error() {
    misuse_stops_the_job("bad-root", "broadcast root 2 is not a rank of a 2-process job");
}

#[test]
fn a_broadcast_length_mismatch_is_a_clear_error() {
    misuse_stops_the_job(
        "broadcast-length",
        "broadcast length mismatch: root 0 sent 8 bytes, this rank passed a buffer of 16",
    );
}

#[test]
fn collective_allocations_of_different_sizes_are_a_clear_error() {
    misuse_stops_the_job(
        "collective-size",
        "alloc_collective(8192) on this rank, but rank 0 called alloc_collective(4096)",
    );
}

/// One rank calls one barrier more than the others, which leave the job: it must not wait
/// forever. Returns the job after checking that it ended.
fn extra_barrier(n: usize, culprit: usize) -> Job {
    let _g = serial();
    let culprit_s = culprit.to_string();
    let mut job = Job::builder(n).spawn(&["misuse", "--what", "extra-barrier", "--rank", &culprit_s]);
    job.wait_or_fail(&format!("{n} ranks, rank {culprit} calls one barrier more"), T);
    let report = job.report();
    assert!(job.ranks[culprit].status().is_some_and(|s| !s.success()), "the culprit must fail\n{report}");
    job
}

#[test]
fn an_extra_barrier_after_the_other_rank_left_is_a_clear_error() {
    let job = extra_barrier(2, 1);
    let report = job.report();
    assert!(
        job.ranks[1]
            .stderr()
            .contains("fatal: rank 0 left the job (gallocy_finalize) while this rank waits for it in barrier"),
        "{report}"
    );
}

#[test]
fn an_extra_barrier_after_another_rank_left_is_a_clear_error() {
    let job = extra_barrier(3, 2);
    let report = job.report();
    // Rank 2 waits for (or would tell) a rank that left: it says which, at once.
    let e = job.ranks[2].stderr();
    let said = (0..2).any(|r| {
        e.contains(&format!("fatal: rank {r} left the job (gallocy_finalize) while this rank waits for it in barrier"))
    });
    assert!(said, "the culprit must say which rank left while its barrier waits for it\n{report}");
}
