//! Prefetch: which pages a read miss also asks for. Each thread remembers its last read miss, the
//! stride between its misses, how many misses in a row kept that stride (its streak) and how many
//! pages its last miss asked for. A miss that lands where the previous one's batch would go next
//! (the previous miss plus the stride times the pages it asked for) extends the streak; from the
//! third miss of a streak on, a miss asks for 2, 4, then [`MAX_BATCH`] pages along the stride.
//! Any other miss starts a new streak (at a small stride from the previous miss) or none. Two
//! misses in a row are not yet a run: a halo of two pages does not drag in the neighbour's next
//! rows, which the neighbour is about to write. Never prefetched: pages another rank's write
//! invalidated here in the last [`CONTENDED_NS`] (they are being written elsewhere: prefetching
//! them would only take them from their writer, as in false sharing), and pages of first-touch
//! ranges (that would take ownership a rank may never use), and pages that a later collective
//! allocation may still place (`Placement::may_still_be_placed`: nobody may ask for those
//! before, since their home may change).
//!
//! A read miss far from the thread's previous one (no run, no stride) that lands in an aligned
//! block of [`BLOCK`] pages where an earlier miss of the thread landed (remembered in a small
//! table, [`RECENT_BLOCKS`]) asks for the rest of that block too: a thread that reads scattered
//! pages of a region (searching a tree another rank built) takes about two misses per block
//! instead of one per page. Not when the missed page itself was taken by another rank's write
//! lately (a block being written elsewhere). The same exclusions apply.
//!
//! A write to a page this process holds read-only (an upgrade: the data is here, only other
//! copies must go) also upgrades the pages right after it that this process holds read-only,
//! wrote before (held write access to) and that no other rank's write invalidated lately, up to
//! [`MAX_BATCH`] in all: a rank rewriting a row its neighbour has read takes the whole row back in
//! one round trip. Never a page it only reads: the neighbour's next row, held read-only because
//! it was read last sweep, is the neighbour's to write; taking it would cost the neighbour a
//! fault, and would make this rank count as one of its writers.
//!
//! Async-signal-safe: a `const` thread-local (no lazy initialisation, no destructor) and
//! arithmetic.

use std::cell::Cell;

use crate::job::runtime::Runtime;

/// Most pages one miss asks for, the faulting page included.
pub const MAX_BATCH: usize = 8;
/// Largest stride (in pages) still taken for a run.
const MAX_STRIDE: i64 = 16;
/// How long a page another rank took from this process counts as contended.
pub const CONTENDED_NS: u64 = 100_000_000;
/// Largest gap between the losses of two pages that still counts as one invalidation. A loss
/// is stamped when its revoke arrives (the engine's `arrived_at`), so one batch of revokes has one
/// stamp; but a batch may arrive in pieces: in the emulated guest, with the host busy, the
/// revokes of one 3-page row came up to several ms apart (at 2 ms, a halo row read every sweep
/// took 1.2-1.6 faults a sweep there; at 10 ms, 1.03-1.2).
const LOST_TOGETHER_NS: u64 = 10_000_000;

/// Whether a page another rank's write took from this process at `lost_at` (0: never) is still
/// contended at `now` (both from [`crate::sys::clock::now_ns`]). Async-signal-safe.
pub fn contended(lost_at: u64, now: u64) -> bool {
    lost_at != 0 && now.saturating_sub(lost_at) < CONTENDED_NS
}

/// This thread's last read miss.
#[derive(Clone, Copy)]
struct Run {
    last: u64,
    stride: i64,
    /// Misses in a row at this stride, this one included.
    streak: u32,
    /// Pages this miss asks for, itself included.
    window: u32,
}

const NO_RUN: Run = Run { last: u64::MAX, stride: 0, streak: 0, window: 1 };

/// Pages in an aligned block (see the module comment).
const BLOCK: u64 = MAX_BATCH as u64;
/// Entries of a thread's table of blocks it missed in: block `b` is remembered in entry
/// `b % RECENT_BLOCKS` until another block takes that entry.
const RECENT_BLOCKS: usize = 64;

/// A thread's blocks with a recent miss (see [`RECENT_BLOCKS`]).
struct RecentBlocks([Cell<u64>; RECENT_BLOCKS]);

impl RecentBlocks {
    const fn new() -> RecentBlocks {
        RecentBlocks([const { Cell::new(u64::MAX) }; RECENT_BLOCKS])
    }

    /// Whether a miss at `page` lands in a block remembered here; remembers its block.
    fn seen(&self, page: u64) -> bool {
        let block = page / BLOCK;
        self.0[(block % RECENT_BLOCKS as u64) as usize].replace(block) == block
    }
}

thread_local! {
    static RUN: Cell<Run> = const { Cell::new(NO_RUN) };
    static BLOCKS: RecentBlocks = const { RecentBlocks::new() };
}

/// The run after a miss at `page` that follows `prev`.
fn next_run(prev: Run, page: u64) -> Run {
    let d = (page as i64).wrapping_sub(prev.last as i64);
    let (stride, streak) = if prev.last == u64::MAX || d == 0 {
        (0, 1)
    } else if prev.stride != 0 && d == prev.stride.wrapping_mul(i64::from(prev.window)) {
        (prev.stride, prev.streak + 1)
    } else if d.abs() <= MAX_STRIDE {
        (d, 2)
    } else {
        (0, 1)
    };
    let window = match streak {
        0..=2 => 1,
        s => (1u32 << (s - 2).min(3)).min(MAX_BATCH as u32),
    };
    Run { last: page, stride, streak, window }
}

/// The pages a read miss at `page` by this thread also asks for: the next ones of its run, or
/// the rest of a block it missed in lately (see the module comment); none when it starts a run
/// in a new block; at most `GALLOCY_PREFETCH` - 1. Only pages in the heap, not in a first-touch
/// range, not still to be placed, and not contended. The caller checks what this process holds.
pub fn next_pages(rt: &Runtime, page: usize) -> impl Iterator<Item = usize> + '_ {
    let run = RUN.with(|r| {
        let run = next_run(r.get(), page as u64);
        r.set(run);
        run
    });
    let seen = BLOCKS.with(|b| b.seen(page as u64));
    let pages = rt.placement().pages() as i64;
    let limit = rt.settings().prefetch as usize;
    let window = run.window.min(limit as u32) as i64;
    let along_run = (1..window).map(move |i| page as i64 + run.stride * i);
    let now = crate::sys::clock::now_ns();
    // Not for a miss near the one before (streak 2 and up): that may be a run forming, whose
    // next misses must land where the run predicts, or a halo of a few pages. Nor for a page
    // another rank's write took from us lately: its block is being written elsewhere (a shared
    // queue's head, say), and its neighbours would only go back and forth with it. (A miss with
    // streak 1 has a window of 1: at most one of `along_run` and `rest_of_block` has pages.)
    let block_wanted = run.streak <= 1 && seen && !contended(rt.pt().lost_at(page), now);
    let block = (page as u64 / BLOCK * BLOCK) as i64;
    let rest_of_block = if block_wanted { block..block + BLOCK as i64 } else { 0..0 };
    along_run
        .chain(rest_of_block.filter(move |&p| p != page as i64).take(limit.saturating_sub(1)))
        .chain(lost_with(rt, page, limit))
        .filter(move |&p| {
            p >= 0
                && p < pages
                && !rt.placement().is_first_touch(p as u64)
                && !rt.placement().may_still_be_placed(p as u64)
                && !contested(rt, p as usize, now)
        })
        .map(|p| p as usize)
}

/// The pages right after `page` that another rank's write took from us together with it (see
/// [`LOST_TOGETHER_NS`]), when `page` is one that others write and we only read: a writer that
/// took a row of pages from us in one go wrote them all, and we held them all because we read
/// them all (a neighbour's halo row, read every sweep). However long ago that was: a sweep may
/// take longer than [`CONTENDED_NS`] (under emulation one took 150 ms, and the rank that read the
/// row a whole sweep after its loss took a fault per page). At most `limit` - 1, up to the first
/// page that does not qualify. Async-signal-safe.
fn lost_with(rt: &Runtime, page: usize, limit: usize) -> impl Iterator<Item = i64> + '_ {
    let lost = rt.pt().lost_at(page);
    let wanted = lost != 0 && !rt.pt().written_here(page);
    let end = (rt.placement().pages() as usize).min(page.saturating_add(limit));
    (page + 1..if wanted { end } else { page + 1 })
        .take_while(move |&p| lost_together(lost, rt.pt().lost_at(p)) && !rt.pt().written_here(p))
        .map(|p| p as i64)
}

/// Whether two pages lost at `a` and `b` (0: never) went in the same invalidation: a writer's
/// batch of revokes arrives at once, or within a few ms under emulation.
fn lost_together(a: u64, b: u64) -> bool {
    a != 0 && b != 0 && a.abs_diff(b) <= LOST_TOGETHER_NS
}

/// Whether `page` goes back and forth between writers, this process one of them: another rank's
/// write took it from us lately ([`contended`]) and we write it too. A page that others write
/// and we only read (a neighbour's halo row, a producer's buffer) is prefetched like any other:
/// what we will read next of it was written at the same time. Async-signal-safe.
fn contested(rt: &Runtime, page: usize, now: u64) -> bool {
    contended(rt.pt().lost_at(page), now) && rt.pt().written_here(page)
}

/// The pages a write upgrade of `page` also upgrades: the run of pages after it held read-only
/// here, written here before and not contended (see the module comment), at most
/// `GALLOCY_PREFETCH` - 1.
pub fn upgrade_run(rt: &Runtime, page: usize) -> impl Iterator<Item = usize> + '_ {
    let pages = rt.placement().pages() as usize;
    let now = crate::sys::clock::now_ns();
    (page + 1..(page + rt.settings().prefetch as usize).min(pages)).take_while(move |&p| {
        rt.pt().access(p) == crate::heap::region::Access::Read
            && rt.pt().written_here(p)
            && !contended(rt.pt().lost_at(p), now)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(misses: &[u64]) -> Vec<(i64, u32)> {
        let mut run = NO_RUN;
        misses
            .iter()
            .map(|&p| {
                run = next_run(run, p);
                (run.stride, run.window)
            })
            .collect()
    }

    #[test]
    fn a_sequential_run_grows_its_window_up_to_the_limit() {
        // Misses at 10, 11, 12, then where each batch ends: 14 (after 12, 13), 18, 26, 34.
        assert_eq!(
            windows(&[10, 11, 12, 14, 18, 26, 34]),
            vec![(0, 1), (1, 1), (1, 2), (1, 4), (1, 8), (1, 8), (1, 8)]
        );
    }

    #[test]
    fn two_misses_in_a_row_are_not_a_run() {
        // A two-page halo read each sweep: never more than the page that faulted.
        assert!(windows(&[40, 41, 40, 41, 40, 41]).iter().all(|&(_, w)| w == 1));
    }

    #[test]
    fn strided_and_backward_runs_are_runs_too() {
        assert_eq!(windows(&[100, 104, 108, 116, 132]), vec![(0, 1), (4, 1), (4, 2), (4, 4), (4, 8)]);
        assert_eq!(windows(&[50, 49, 48, 46]), vec![(0, 1), (-1, 1), (-1, 2), (-1, 4)]);
    }

    #[test]
    fn a_jump_starts_over() {
        assert_eq!(windows(&[10, 11, 12, 14, 5000, 5001]), vec![(0, 1), (1, 1), (1, 2), (1, 4), (0, 1), (1, 1)]);
        assert_eq!(windows(&[7, 7]), vec![(0, 1), (0, 1)], "the same page again is no run");
    }

    #[test]
    fn a_second_miss_in_a_remembered_block_is_seen() {
        let recent = RecentBlocks::new();
        assert!(!recent.seen(3), "the first miss in block 0");
        assert!(recent.seen(6), "block 0 again");
        assert!(!recent.seen(8 * 10), "block 10");
        assert!(recent.seen(8 * 10 + 7), "block 10 again, at its end");
        assert!(recent.seen(1), "block 0 is still remembered");
        assert!(!recent.seen(8 * 64 + 2), "block 64 takes block 0's entry");
        assert!(!recent.seen(5), "so block 0 was forgotten");
        assert!(recent.seen(8 * 10), "block 10 kept its entry");
    }

    #[test]
    fn pages_lost_in_one_invalidation_are_lost_together() {
        let t = 7 * CONTENDED_NS;
        assert!(lost_together(t, t + 3_000), "one batch of revokes");
        assert!(lost_together(t + 3_000, t), "in either order");
        assert!(!lost_together(t, t + LOST_TOGETHER_NS + 1), "another invalidation");
        assert!(!lost_together(t, 0), "never lost");
        assert!(!lost_together(0, 0), "neither lost");
    }

    #[test]
    fn a_page_lost_lately_is_contended_until_the_window_ends() {
        let lost = 5 * CONTENDED_NS;
        assert!(!contended(0, 10), "a page never lost, early in the clock's life");
        assert!(!contended(0, 10 * CONTENDED_NS), "a page never lost");
        assert!(contended(lost, lost), "lost just now");
        assert!(contended(lost, lost + CONTENDED_NS - 1), "lost just inside the window");
        assert!(!contended(lost, lost + CONTENDED_NS), "lost a whole window ago");
        assert!(contended(lost, lost - 1), "a loss stamped by another thread a moment later");
    }
}
