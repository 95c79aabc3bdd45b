//! A malicious peer: a member of the job (it knows the token, its frames are authenticated)
//! that sends a well-formed message the protocol forbids. The rank it targets ends with one clear
//! line naming it, nothing it holds changes first, and no process hangs.

use gallocy_testkit::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn hostile_message_stops_the_job(what: &str, expect: &str) {
    hostile_message_stops_the_job_in(what, expect, "sequential");
}

fn hostile_message_stops_the_job_in(what: &str, expect: &str, consistency: &str) {
    let _g = serial();
    let mut job = Job::builder(2)
        .env_all("GALLOCY_PLACEMENT", "block")
        .env_all("GALLOCY_CONSISTENCY", consistency)
        .spawn(&["hostile", "--what", what]);
    job.wait_or_fail(&format!("hostile {what}"), T);
    let report = job.report();
    let victim = job.ranks[0].stderr();
    assert!(!victim.contains("CORRUPTED"), "hostile {what}: rank 0's page changed\n{report}");
    assert!(!victim.contains("went on"), "hostile {what}: rank 0 went on\n{report}");
    let fatal: Vec<&str> = victim.lines().filter(|l| l.starts_with("gallocy: rank 0: fatal: ")).collect();
    assert_eq!(fatal.len(), 1, "hostile {what}: rank 0 must print one fatal line\n{report}");
    assert!(fatal[0].contains("rank 1"), "hostile {what}: the line must name rank 1\n{report}");
    assert!(fatal[0].contains(expect), "hostile {what}: the line must say {expect:?}\n{report}");
    assert!(!victim.contains("panicked"), "hostile {what}: no panic\n{report}");
    for r in 0..2 {
        assert!(job.ranks[r].status().is_some_and(|s| !s.success()), "hostile {what}: rank {r} must fail\n{report}");
    }
    assert!(!job.ranks[1].stderr().contains("went on"), "hostile {what}: rank 1 must stop\n{report}");
}

#[test]
fn page_contents_nobody_asked_for_never_land() {
    hostile_message_stops_the_job("contents", "did not ask for");
}

#[test]
fn a_forward_not_from_the_home_is_refused() {
    hostile_message_stops_the_job("forward", "which only its home (rank 0) may send");
}

#[test]
fn an_acknowledgement_of_no_revoke_is_refused() {
    hostile_message_stops_the_job("revoke-ack", "acknowledged a revoke");
}

#[test]
fn a_grant_to_no_waiting_thread_is_refused() {
    hostile_message_stops_the_job("stale-grant", "which is not waiting for that answer");
}

#[test]
fn a_revoke_of_a_page_past_the_heap_is_refused() {
    hostile_message_stops_the_job("revoke-past", "beyond the heap");
}

#[test]
fn a_forward_of_a_page_past_the_heap_is_refused() {
    hostile_message_stops_the_job("forward-past", "beyond the heap");
}

/// A member reads a page of rank 0's that no grant sent it for (rank 0 holds it writable). Over
/// TCP rank 0 answers only the reads the protocol owes: one whole page it holds read-only, where a
/// `ReadFrom` grant sends readers (`a_page_owned_read_only_elsewhere_is_read_from_its_owner_by_request`
/// in scenarios.rs checks that those are answered). Over RDMA a READ needs no CPU of rank 0 and
/// cannot be refused: the README says that a member can read the whole heap there.
#[test]
fn a_read_that_no_grant_sent_the_reader_for_is_refused() {
    if transport().as_deref() == Some("rdma") {
        eprintln!("skipped over RDMA: a one-sided READ of the heap needs nobody's consent");
        return;
    }
    hostile_message_stops_the_job("read", "does not owe");
}

#[test]
fn releasing_a_lock_not_held_is_refused() {
    hostile_message_stops_the_job("lock-release", "released global lock 2, which it does not hold");
}

#[test]
fn a_barrier_notice_out_of_turn_is_refused() {
    hostile_message_stops_the_job("barrier", "unexpected barrier notice");
}

#[test]
fn freeing_what_is_no_block_is_refused() {
    hostile_message_stops_the_job("free", "freed 0x1234");
}

#[test]
fn a_broadcast_that_starts_in_the_middle_is_refused() {
    hostile_message_stops_the_job("broadcast", "bad broadcast from rank 1");
}

#[test]
fn an_answer_to_no_question_is_refused() {
    hostile_message_stops_the_job("size-reply", "which is not waiting for that answer");
}

#[test]
fn a_diff_from_a_rank_that_never_wrote_the_page_is_refused() {
    hostile_message_stops_the_job_in("diff", "which it never registered to write", "release");
}

#[test]
fn a_diff_under_sequential_consistency_is_refused() {
    hostile_message_stops_the_job("diff", "which sequential consistency does not use");
}

#[test]
fn a_written_notice_not_from_the_home_is_refused() {
    hostile_message_stops_the_job_in("written", "which only its home (rank 0) may send", "release");
}

#[test]
fn a_revoke_under_release_consistency_is_refused() {
    hostile_message_stops_the_job_in("revoke-ack", "which release consistency does not use", "release");
}
