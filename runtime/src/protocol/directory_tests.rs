//! One test per transition of the home's state machine.

use super::directory::{Directory, PageRecord, Send};
use super::msg::{Msg, Page, Source, Waiter};
use super::placement::Placement;
use super::ranks::RankSet;
use super::violation::Violation;

/// 3 ranks, 30 pages, arenas of 10: page 3's home is rank 0 and its first owner rank 0; page 12's
/// home is rank 0 and its first owner rank 1; page 21's home is 0 and first owner 2.
fn home0() -> Directory {
    Directory::new(0, Placement::new(3, 30, 10), false)
}

/// [`home0`] in a job whose direct requesters read one-sidedly (RDMA).
fn home0_one_sided() -> Directory {
    Directory::new(0, Placement::new(3, 30, 10), true)
}

fn w(slot: u32) -> Waiter {
    Waiter { slot, generation: 7 }
}

fn req(d: &mut Directory, from: usize, page: Page, write: bool, slot: u32) -> Vec<Send> {
    let mut out = Vec::new();
    d.request(from, page, write, w(slot), false, &mut out).unwrap();
    out
}

/// A request from a rank that reads the home's memory itself (one-sided, or on its host).
fn req_direct(d: &mut Directory, from: usize, page: Page, write: bool, slot: u32) -> Vec<Send> {
    let mut out = Vec::new();
    d.request(from, page, write, w(slot), true, &mut out).unwrap();
    out
}

fn ack(d: &mut Directory, from: usize, page: Page) -> Vec<Send> {
    let mut out = Vec::new();
    d.revoke_ack(from, page, &mut out).unwrap();
    out
}

fn done(d: &mut Directory, from: usize, page: Page) -> Vec<Send> {
    let mut out = Vec::new();
    d.done(from, page, &mut out).unwrap();
    out
}

fn grant(to: usize, page: Page, slot: u32, write: bool, source: Source) -> Send {
    Send { to, msg: Msg::Grant { page, waiter: w(slot), write, source } }
}

fn revoke(to: usize, page: Page, to_read: bool) -> Send {
    Send { to, msg: Msg::Revoke { page, to_read } }
}

fn rec(owner: usize, writable: bool, holders: &[usize], busy: bool) -> PageRecord {
    PageRecord { owner, writable, holders: holders.iter().fold(RankSet::empty(), |s, r| s.with(*r)), busy }
}

#[test]
fn a_holder_asking_again_gets_a_grant_at_once() {
    let mut d = home0();
    // The writable owner asking to read keeps its write access.
    assert_eq!(req(&mut d, 1, 12, false, 1), vec![grant(1, 12, 1, true, Source::Valid)]);
    assert_eq!(req(&mut d, 1, 12, true, 2), vec![grant(1, 12, 2, true, Source::Valid)], "the owner may write");
    assert_eq!(d.record(12), rec(1, true, &[1], false));
}

#[test]
fn a_read_of_a_page_the_home_owns_writable_downgrades_the_home_first() {
    let mut d = home0();
    assert_eq!(req(&mut d, 1, 3, false, 1), vec![revoke(0, 3, true)]);
    assert!(d.record(3).busy);
    assert_eq!(ack(&mut d, 0, 3), vec![grant(1, 3, 1, false, Source::Inline)]);
    assert_eq!(d.record(3), rec(0, false, &[0, 1], false));
    // Now the home holds a read-only copy: the next reader gets it attached at once.
    assert_eq!(req(&mut d, 2, 3, false, 2), vec![grant(2, 3, 2, false, Source::Inline)]);
    assert_eq!(d.record(3), rec(0, false, &[0, 1, 2], false));
}

#[test]
fn with_one_sided_reads_the_requester_reads_the_homes_copy_and_says_done() {
    let mut d = home0_one_sided();
    assert_eq!(req_direct(&mut d, 1, 3, false, 1), vec![revoke(0, 3, true)]);
    assert_eq!(ack(&mut d, 0, 3), vec![grant(1, 3, 1, false, Source::ReadFrom(0))]);
    assert!(d.record(3).busy, "the home's copy stays put until Done");
    let mut out = Vec::new();
    assert_eq!(d.done(2, 3, &mut out), Err(Violation::UnexpectedDone { from: 2, page: 3 }), "only the requester");
    assert!(done(&mut d, 1, 3).is_empty());
    assert_eq!(d.record(3), rec(0, false, &[0, 1], false));
    assert_eq!(req_direct(&mut d, 2, 3, false, 2), vec![grant(2, 3, 2, false, Source::ReadFrom(0))]);
    assert!(done(&mut d, 2, 3).is_empty());
    assert_eq!(d.record(3), rec(0, false, &[0, 1, 2], false));
}

#[test]
fn a_requester_on_the_homes_host_copies_the_homes_copy_and_one_elsewhere_gets_it_attached() {
    let mut d = home0();
    // Rank 1 shares our host (it maps our heap); rank 2 does not.
    assert_eq!(req_direct(&mut d, 1, 3, false, 1), vec![revoke(0, 3, true)]);
    assert_eq!(ack(&mut d, 0, 3), vec![grant(1, 3, 1, false, Source::HostCopy)]);
    // Copied as rank 1 handles the grant, before anything we send it later: no Done.
    assert_eq!(d.record(3), rec(0, false, &[0, 1], false));
    let mut out = Vec::new();
    assert!(matches!(d.done(1, 3, &mut out), Err(Violation::UnexpectedDone { .. })), "no Done is owed");
    assert_eq!(req(&mut d, 2, 3, false, 2), vec![grant(2, 3, 2, false, Source::Inline)]);
    assert_eq!(d.record(3), rec(0, false, &[0, 1, 2], false));
    // The home's own read-only copy, asked for again by a same-host rank: copied at once.
    assert_eq!(req_direct(&mut d, 1, 0, false, 3), vec![revoke(0, 0, true)]);
    assert_eq!(ack(&mut d, 0, 0), vec![grant(1, 0, 3, false, Source::HostCopy)]);
    // A write by the rank elsewhere of a page the home holds: the home's copy, attached.
    assert_eq!(req(&mut d, 2, 6, true, 4), vec![revoke(0, 6, false)]);
    assert_eq!(ack(&mut d, 0, 6), vec![grant(2, 6, 4, true, Source::Inline)]);
    assert_eq!(d.record(6), rec(2, true, &[2], false));
    // A write by the same-host rank of a page the home holds: it copies the home's (now invalid
    // for the home, but unchanged) copy and is the owner at once.
    assert_eq!(req_direct(&mut d, 1, 9, true, 5), vec![revoke(0, 9, false)]);
    assert_eq!(ack(&mut d, 0, 9), vec![grant(1, 9, 5, true, Source::HostCopy)]);
    assert_eq!(d.record(9), rec(1, true, &[1], false));
}

#[test]
fn a_one_sided_reader_waits_its_turn_behind_another_and_a_one_sided_writer_says_done() {
    let mut d = home0_one_sided();
    assert_eq!(req_direct(&mut d, 1, 0, false, 3), vec![revoke(0, 0, true)]);
    assert_eq!(ack(&mut d, 0, 0), vec![grant(1, 0, 3, false, Source::ReadFrom(0))]);
    assert!(done(&mut d, 1, 0).is_empty());
    assert_eq!(req_direct(&mut d, 2, 0, false, 6), vec![grant(2, 0, 6, false, Source::ReadFrom(0))]);
    assert!(d.record(0).busy);
    assert_eq!(req(&mut d, 2, 0, false, 7), Vec::new(), "the next request waits its turn");
    assert_eq!(done(&mut d, 2, 0), vec![grant(2, 0, 7, false, Source::Valid)]);
    // A write by a direct requester of a page the home holds: the owner when done.
    assert_eq!(req_direct(&mut d, 1, 9, true, 4), vec![revoke(0, 9, false)]);
    assert_eq!(ack(&mut d, 0, 9), vec![grant(1, 9, 4, true, Source::ReadFrom(0))]);
    assert!(d.record(9).busy);
    assert!(done(&mut d, 1, 9).is_empty());
    assert_eq!(d.record(9), rec(1, true, &[1], false));
}

#[test]
fn a_read_of_a_page_another_rank_owns_writable_is_forwarded() {
    let mut d = home0();
    let fwd = Send { to: 1, msg: Msg::Forward { page: 12, requester: 2, waiter: w(5), write: false } };
    assert_eq!(req(&mut d, 2, 12, false, 5), vec![fwd]);
    assert!(done(&mut d, 2, 12).is_empty());
    assert_eq!(d.record(12), rec(1, false, &[1, 2], false));
    // Read-only at its owner now, and the home holds no copy: read it from the owner.
    assert_eq!(req(&mut d, 0, 12, false, 6), vec![grant(0, 12, 6, false, Source::ReadFrom(1))]);
    assert!(done(&mut d, 0, 12).is_empty());
    assert_eq!(d.record(12), rec(1, false, &[0, 1, 2], false));
}

#[test]
fn a_write_by_a_reader_revokes_every_other_copy_and_grants_without_data() {
    let mut d = home0();
    req(&mut d, 2, 12, false, 1);
    done(&mut d, 2, 12);
    req(&mut d, 0, 12, false, 2);
    done(&mut d, 0, 12);
    let out = req(&mut d, 2, 12, true, 3);
    assert_eq!(out, vec![revoke(0, 12, false), revoke(1, 12, false)]);
    let mut none = Vec::new();
    assert_eq!(
        d.revoke_ack(2, 12, &mut none),
        Err(Violation::UnexpectedAck { from: 2, page: 12 }),
        "2 was not revoked"
    );
    assert!(ack(&mut d, 1, 12).is_empty());
    assert_eq!(
        d.revoke_ack(1, 12, &mut none),
        Err(Violation::UnexpectedAck { from: 1, page: 12 }),
        "1 acknowledged already"
    );
    assert_eq!(ack(&mut d, 0, 12), vec![grant(2, 12, 3, true, Source::Valid)]);
    assert_eq!(d.record(12), rec(2, true, &[2], false));
}

#[test]
fn a_write_when_the_home_holds_a_copy_invalidates_all_and_sends_the_homes() {
    let mut d = home0();
    req(&mut d, 1, 3, false, 1);
    ack(&mut d, 0, 3); // 0 owns read-only, 1 reads
    assert_eq!(req(&mut d, 2, 3, true, 2), vec![revoke(0, 3, false), revoke(1, 3, false)]);
    ack(&mut d, 1, 3);
    assert_eq!(ack(&mut d, 0, 3), vec![grant(2, 3, 2, true, Source::Inline)]);
    assert_eq!(d.record(3), rec(2, true, &[2], false));
}

#[test]
fn a_write_of_a_page_another_rank_owns_writable_is_forwarded_and_changes_owner_on_done() {
    let mut d = home0();
    let fwd = Send { to: 2, msg: Msg::Forward { page: 21, requester: 1, waiter: w(4), write: true } };
    assert_eq!(req(&mut d, 1, 21, true, 4), vec![fwd]);
    assert_eq!(d.record(21), rec(2, true, &[2], true));
    assert!(done(&mut d, 1, 21).is_empty());
    assert_eq!(d.record(21), rec(1, true, &[1], false));
}

#[test]
fn a_write_of_a_read_only_page_revokes_the_readers_then_forwards_to_the_owner() {
    let mut d = home0();
    req(&mut d, 1, 21, false, 1); // forward to owner 2
    done(&mut d, 1, 21); // 2 owns read-only, 1 reads
    let out = req(&mut d, 0, 21, true, 2);
    assert_eq!(out, vec![revoke(1, 21, false)], "the owner is not revoked: it hands the page over");
    let fwd = Send { to: 2, msg: Msg::Forward { page: 21, requester: 0, waiter: w(2), write: true } };
    assert_eq!(ack(&mut d, 1, 21), vec![fwd]);
    done(&mut d, 0, 21);
    assert_eq!(d.record(21), rec(0, true, &[0], false));
}

#[test]
fn requests_for_a_busy_page_wait_their_turn() {
    let mut d = home0();
    let first = req(&mut d, 1, 21, true, 1);
    assert_eq!(first.len(), 1, "forward to the owner");
    assert!(req(&mut d, 2, 21, false, 2).is_empty(), "queued");
    assert!(req(&mut d, 0, 21, true, 3).is_empty(), "queued");
    // Done of the first starts the second: 1 now owns it writable, so forward to 1.
    let fwd = Send { to: 1, msg: Msg::Forward { page: 21, requester: 2, waiter: w(2), write: false } };
    assert_eq!(done(&mut d, 1, 21), vec![fwd]);
    // Then the third: readers 1 and 2, the home holds nothing, owner 1 read-only.
    assert_eq!(done(&mut d, 2, 21), vec![revoke(2, 21, false)]);
    let fwd = Send { to: 1, msg: Msg::Forward { page: 21, requester: 0, waiter: w(3), write: true } };
    assert_eq!(ack(&mut d, 2, 21), vec![fwd]);
    assert!(done(&mut d, 0, 21).is_empty());
    assert_eq!(d.record(21), rec(0, true, &[0], false));
}

#[test]
fn misdirected_and_unexpected_messages_are_refused() {
    let mut d = home0();
    let mut out = Vec::new();
    assert_eq!(d.request(1, 4, false, w(1), false, &mut out), Err(Violation::NotHome { from: 1, page: 4 }));
    assert_eq!(d.request(1, 30, false, w(1), false, &mut out), Err(Violation::PageOutOfRange { from: 1, page: 30 }));
    assert_eq!(d.revoke_ack(1, 3, &mut out), Err(Violation::UnexpectedAck { from: 1, page: 3 }));
    assert_eq!(d.done(1, 3, &mut out), Err(Violation::UnexpectedDone { from: 1, page: 3 }));
    // Done while acknowledgements are awaited is also refused.
    req(&mut d, 1, 3, false, 1);
    assert_eq!(d.done(1, 3, &mut out), Err(Violation::UnexpectedDone { from: 1, page: 3 }));
    assert!(out.is_empty());
}

#[test]
fn placed_collective_pages_follow_their_policy() {
    use super::placement::{Policy, Ranges};
    let ranges: &'static Ranges = Box::leak(Box::default());
    // Pages 3..9: first touch (cyclic homes, no owner); pages 12..15: block (ranks 0, 0, 1, 2).
    assert!(ranges.add(3, 6, Policy::FirstTouch));
    assert!(ranges.add(12, 4, Policy::Block));
    let mut d = Directory::new(0, Placement::new(3, 30, 10).with_ranges(Policy::Block, ranges), false);
    assert_eq!(d.record(3).holders, RankSet::empty(), "nobody holds a first-touch page");
    // The first to touch it, even by reading, owns it writable; nothing moves.
    assert_eq!(req(&mut d, 2, 3, false, 1), vec![grant(2, 3, 1, true, Source::Valid)]);
    assert_eq!(d.record(3), rec(2, true, &[2], false));
    // From then on, the ordinary protocol.
    assert_eq!(
        req(&mut d, 1, 3, false, 2),
        vec![Send { to: 2, msg: Msg::Forward { page: 3, requester: 1, waiter: w(2), write: false } }]
    );
    // A block page's home and first owner is its block's rank.
    assert_eq!(d.record(12), rec(0, true, &[0], false));
    assert_eq!(d.record(13), rec(0, true, &[0], false));
    let mut out = Vec::new();
    assert_eq!(
        d.request(1, 14, false, w(3), false, &mut out),
        Err(Violation::NotHome { from: 1, page: 14 }),
        "page 14's home is rank 1"
    );
    assert_eq!(req(&mut d, 1, 13, false, 4), vec![revoke(0, 13, true)], "the home, its owner, downgrades itself");
}
