//! One batch of arrivals handled together. While the service thread handles the messages that
//! one poll brought, it holds back the downgrades of pages from read-write to read-only (a home
//! that owns a reader's run of pages gives up write access to each) and every message to a
//! peer; at the end of the batch it makes each run of consecutive pages read-only with one
//! `mprotect`, then sends the messages, in the order they were decided.
//!
//! Each `mprotect` that takes access away costs a TLB shootdown on every other CPU that runs a
//! thread of the process (an IPI, and in a VM an exit). A read miss with prefetch asks for up to
//! [`MAX_BATCH`](crate::fault::prefetch::MAX_BATCH) pages in one go; before, the owner paid one
//! shootdown per page while its own threads computed on the other CPU.
//!
//! Messages are held only from the first downgrade held back on (before it, they go at once).
//!
//! Safe because nothing leaves before the protection is applied: the page table says read-only at
//! once (the engine's later decisions in the batch see it), local threads may still write the
//! page until the batch ends, exactly as if the request had arrived a moment later, and no peer
//! can see the page (a grant, an attached copy, a one-sided read after the grant) before the
//! messages go out. Invalidations (access taken away entirely) are applied at once: a dropped
//! copy's memory is released right after.

use crate::protocol::{Msg, Page, Rank};

/// What one batch holds back (see the module comment).
#[derive(Debug, Default)]
pub(super) struct Coalescer {
    active: bool,
    downgrades: Vec<Page>,
    sends: Vec<(Rank, Msg)>,
}

impl Coalescer {
    /// Starts holding back.
    pub(super) fn begin(&mut self) {
        self.active = true;
    }

    /// Whether a batch is under way.
    pub(super) fn active(&self) -> bool {
        self.active
    }

    /// Holds back making `page` read-only (its page table entry already says so).
    pub(super) fn hold_downgrade(&mut self, page: Page) {
        debug_assert!(self.active);
        self.downgrades.push(page);
    }

    /// Holds back a message to a peer.
    pub(super) fn hold_send(&mut self, to: Rank, msg: Msg) {
        debug_assert!(self.active);
        self.sends.push((to, msg));
    }

    /// Whether downgrades wait to be applied.
    pub(super) fn has_downgrades(&self) -> bool {
        !self.downgrades.is_empty()
    }

    /// Whether a message to a peer must wait for the end of the batch: a downgrade it may depend
    /// on waits, or messages before it do (they keep their order). Otherwise it goes at once, as
    /// outside a batch: a page that goes back and forth between writers (no downgrade to
    /// read-only) is not delayed.
    pub(super) fn holds_sends(&self) -> bool {
        self.active && (!self.downgrades.is_empty() || !self.sends.is_empty())
    }

    /// The downgrades held back, as runs of consecutive pages `(first, count)`, keeping only the
    /// pages `still_read` says are still read-only (a later decision may have changed one).
    pub(super) fn take_downgrades(&mut self, still_read: impl Fn(Page) -> bool) -> Vec<(Page, usize)> {
        let runs = runs(&mut self.downgrades, still_read);
        self.downgrades.clear();
        runs
    }

    /// Ends the batch: stops holding back, and returns the messages held, in order. The caller
    /// applies the downgrades first ([`Self::take_downgrades`]).
    pub(super) fn end(&mut self) -> Vec<(Rank, Msg)> {
        debug_assert!(self.downgrades.is_empty(), "downgrades are applied before the sends");
        self.active = false;
        std::mem::take(&mut self.sends)
    }
}

/// Sorts `pages`, drops duplicates and the pages `keep` refuses, and returns the runs of
/// consecutive pages as `(first, count)`.
fn runs(pages: &mut Vec<Page>, keep: impl Fn(Page) -> bool) -> Vec<(Page, usize)> {
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<(Page, usize)> = Vec::new();
    for &p in pages.iter().filter(|&&p| keep(p)) {
        match out.last_mut() {
            Some((first, count)) if *first + *count as Page == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pages_make_one_run_whatever_the_order_they_came_in() {
        let mut c = Coalescer::default();
        c.begin();
        for p in [12, 10, 11, 13, 11, 20, 21, 30] {
            c.hold_downgrade(p);
        }
        assert!(c.has_downgrades());
        assert_eq!(c.take_downgrades(|_| true), vec![(10, 4), (20, 2), (30, 1)]);
        assert!(!c.has_downgrades());
    }

    #[test]
    fn a_page_no_longer_read_only_splits_its_run() {
        let mut c = Coalescer::default();
        c.begin();
        for p in 40..48 {
            c.hold_downgrade(p);
        }
        assert_eq!(c.take_downgrades(|p| p != 43), vec![(40, 3), (44, 4)]);
    }

    #[test]
    fn messages_wait_only_behind_a_downgrade_or_a_held_message() {
        let mut c = Coalescer::default();
        assert!(!c.holds_sends(), "no batch");
        c.begin();
        assert!(!c.holds_sends(), "nothing to wait for: a message goes at once");
        c.hold_downgrade(3);
        assert!(c.holds_sends(), "it may depend on the downgrade");
        assert_eq!(c.take_downgrades(|_| true), vec![(3, 1)]);
        assert!(!c.holds_sends(), "downgrade applied");
        c.hold_downgrade(4);
        c.hold_send(1, Msg::Done { page: 4 });
        assert_eq!(c.take_downgrades(|_| true), vec![(4, 1)]);
        assert!(c.holds_sends(), "a message held before it: order");
        assert_eq!(c.end().len(), 1);
        assert!(!c.holds_sends());
    }

    #[test]
    fn messages_wait_for_the_end_of_the_batch_and_keep_their_order() {
        let mut c = Coalescer::default();
        assert!(!c.active());
        c.begin();
        assert!(c.active());
        c.hold_send(1, Msg::Done { page: 5 });
        c.hold_send(2, Msg::RevokeAck { page: 6 });
        c.hold_send(1, Msg::Done { page: 7 });
        let sent = c.end();
        assert!(!c.active());
        assert_eq!(sent.len(), 3);
        assert!(matches!(sent[0], (1, Msg::Done { page: 5 })));
        assert!(matches!(sent[1], (2, Msg::RevokeAck { page: 6 })));
        assert!(matches!(sent[2], (1, Msg::Done { page: 7 })));
        assert!(c.end().is_empty(), "a batch's messages go once");
    }
}
