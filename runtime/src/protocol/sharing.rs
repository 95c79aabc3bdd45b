//! The home side of release consistency (`GALLOCY_CONSISTENCY=release`): a pure state machine,
//! like [`super::directory`] for the default model.
//!
//! The home keeps the page's master copy; nobody owns a page. A rank with no copy asks the home
//! (`Request`) and gets the master (`Grant Inline`, or `Grant ReadFrom(home)` with one-sided
//! reads); writers change their own copy and send the home their diffs at release. The home
//! records, per page, who holds or held a copy (*sharers*) and who writes it (*writers*): both
//! sets only grow. A sharer must drop its copy at its next acquire once a rank other than itself
//! writes the page (its copy is then *volatile*). Pages that only their single writer uses, and
//! pages nobody writes, keep their copies across synchronization.
//!
//! The home tells a sharer when its copy becomes volatile (`Written`). When a new writer
//! registers (a `Request` for writing), the home holds its grant until every sharer it told has
//! acknowledged (`WrittenAck`): the writer's later release, and whatever acquire follows it,
//! then always find every sharer informed. Requests for a page queue behind such a wait.
//!
//! Checked on receipt: a request names a page of the heap this rank is home of; an
//! acknowledgement comes from a rank the home waits for; a diff comes from a registered writer.

use std::collections::{HashMap, VecDeque};

use super::directory::Send;
use super::msg::{Msg, Page, Rank, Source, Waiter};
use super::placement::Placement;
use super::ranks::RankSet;
use super::violation::Violation;

/// A request at (or being served by) the home.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Req {
    from: Rank,
    waiter: Waiter,
    write: bool,
    /// The home wrote the page before this request came (see [`Sharing::request`]).
    home_writes: bool,
}

/// What the home knows of one page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Entry {
    sharers: RankSet,
    writers: RankSet,
    /// A new writer's grant, held until these ranks acknowledged their `Written`.
    waiting: Option<(Req, RankSet)>,
    queue: VecDeque<Req>,
}

impl Entry {
    /// Whether a rank other than `r` writes the page.
    fn volatile_for(&self, r: Rank) -> bool {
        !self.writers.without(r).is_empty()
    }
}

/// The release-consistency entries of the pages this rank is home of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharing {
    me: Rank,
    placement: Placement,
    one_sided: bool,
    pages: HashMap<Page, Entry>,
}

impl Sharing {
    pub fn new(me: Rank, placement: Placement, one_sided: bool) -> Sharing {
        Sharing { me, placement, one_sided, pages: HashMap::new() }
    }

    /// Rank `from` asks for a copy of `page` (and registers as a writer of it if `write`).
    /// `home_writes`: the home's own fault path already wrote the page without telling us (it
    /// does when nobody shared the page; the engine marks the page shared, then reads that).
    pub fn request(
        &mut self,
        from: Rank,
        page: Page,
        write: bool,
        waiter: Waiter,
        home_writes: bool,
        out: &mut Vec<Send>,
    ) -> Result<(), Violation> {
        self.placement.check_home(self.me, from, page)?;
        let req = Req { from, waiter, write, home_writes };
        let e = self.pages.entry(page).or_default();
        if e.waiting.is_some() {
            e.queue.push_back(req);
            return Ok(());
        }
        self.start(page, req, out);
        Ok(())
    }

    /// Rank `from` read a copy of `page` from our memory by itself (one-sided or same-host):
    /// it is a sharer now, told at once if the page is volatile for it. `home_writes` as for
    /// [`Sharing::request`].
    pub fn share(&mut self, from: Rank, page: Page, home_writes: bool, out: &mut Vec<Send>) -> Result<(), Violation> {
        self.placement.check_home(self.me, from, page)?;
        if from == self.me {
            return Err(Violation::NotHome { from, page });
        }
        let me = self.me;
        let e = self.pages.entry(page).or_default();
        let first_sharer = e.sharers.without(from).is_empty();
        if home_writes && first_sharer {
            // The home wrote the page while nobody shared it (no message): it is a writer.
            e.writers = e.writers.with(me);
        }
        e.sharers = e.sharers.with(from);
        // With earlier sharers, a home that wrote without telling us has its registration on the
        // way (it saw them): that registration tells them, and waits for their answers. This
        // sharer learns now.
        if e.volatile_for(from) || home_writes {
            out.push(Send { to: from, msg: Msg::Written { page, ack: false } });
        }
        Ok(())
    }

    /// Rank `from` acknowledges a `Written` about `page`.
    pub fn written_ack(&mut self, from: Rank, page: Page, out: &mut Vec<Send>) -> Result<(), Violation> {
        let bad = Violation::UnexpectedAck { from, page };
        let e = self.pages.get_mut(&page).ok_or(bad)?;
        let (req, acks) = e.waiting.take().ok_or(bad)?;
        if !acks.contains(from) {
            e.waiting = Some((req, acks));
            return Err(bad);
        }
        let acks = acks.without(from);
        if !acks.is_empty() {
            e.waiting = Some((req, acks));
            return Ok(());
        }
        self.grant(page, req, out);
        // Serve the queue until a request waits again.
        while let Some(next) = self.pages.get_mut(&page).and_then(|e| e.queue.pop_front()) {
            self.start(page, next, out);
            if self.pages.get(&page).is_some_and(|e| e.waiting.is_some()) {
                break;
            }
        }
        Ok(())
    }

    /// Whether `from` may send diffs of `page`: this rank is its home and `from` registered as
    /// one of its writers.
    pub fn check_diff(&self, from: Rank, page: Page) -> Result<(), Violation> {
        self.placement.check_home(self.me, from, page)?;
        match self.pages.get(&page) {
            Some(e) if e.writers.contains(from) => Ok(()),
            _ => Err(Violation::NotAWriter { from, page }),
        }
    }

    fn start(&mut self, page: Page, req: Req, out: &mut Vec<Send>) {
        let me = self.me;
        let e = self.pages.entry(page).or_default();
        if req.from != me {
            e.sharers = e.sharers.with(req.from);
        }
        let mut new_writers = RankSet::empty();
        if req.write {
            new_writers = new_writers.with(req.from);
        }
        if req.home_writes {
            new_writers = new_writers.with(me);
        }
        let mut acks = RankSet::empty();
        if !new_writers.iter().all(|w| e.writers.contains(w)) {
            // Sharers whose copies become volatile now: those for whom nobody else wrote yet.
            let old_writers = e.writers;
            e.writers = e.writers.union(new_writers);
            for s in e.sharers.iter().filter(|s| *s != req.from && *s != me) {
                if old_writers.without(s).is_empty() && e.volatile_for(s) {
                    acks = acks.with(s);
                    out.push(Send { to: s, msg: Msg::Written { page, ack: true } });
                }
            }
        }
        if acks.is_empty() {
            self.grant(page, req, out);
        } else {
            e.waiting = Some((req, acks));
        }
    }

    fn grant(&self, page: Page, req: Req, out: &mut Vec<Send>) {
        let me = self.me;
        let Some(e) = self.pages.get(&page) else { return };
        let source = if req.from == me {
            Source::Valid
        } else {
            // The requester learns first whether its copy is volatile (same connection, in order).
            if e.volatile_for(req.from) {
                out.push(Send { to: req.from, msg: Msg::Written { page, ack: false } });
            }
            if self.one_sided {
                Source::ReadFrom(me as u32)
            } else {
                Source::Inline
            }
        };
        out.push(Send { to: req.from, msg: Msg::Grant { page, waiter: req.waiter, write: false, source } });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Waiter = Waiter { slot: 1, generation: 1 };

    fn home0(one_sided: bool) -> Sharing {
        Sharing::new(0, Placement::new(4, 64, 16).with_owner_as_home(), one_sided)
    }

    fn grant(to: Rank, page: Page, source: Source) -> Send {
        Send { to, msg: Msg::Grant { page, waiter: W, write: false, source } }
    }

    #[test]
    fn readers_get_the_master_and_stay_unaware_while_nobody_writes() {
        let mut h = home0(false);
        let mut out = Vec::new();
        h.request(1, 3, false, W, false, &mut out).unwrap();
        h.request(2, 3, false, W, false, &mut out).unwrap();
        assert_eq!(out, vec![grant(1, 3, Source::Inline), grant(2, 3, Source::Inline)]);
        let mut out = Vec::new();
        home0(true).request(1, 3, false, W, false, &mut out).unwrap();
        assert_eq!(out, vec![grant(1, 3, Source::ReadFrom(0))]);
    }

    #[test]
    fn a_new_writer_waits_until_every_sharer_knows() {
        let mut h = home0(false);
        let mut out = Vec::new();
        h.request(1, 3, false, W, false, &mut out).unwrap();
        h.request(2, 3, false, W, false, &mut out).unwrap();
        out.clear();
        h.request(3, 3, true, W, false, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Send { to: 1, msg: Msg::Written { page: 3, ack: true } },
                Send { to: 2, msg: Msg::Written { page: 3, ack: true } },
            ]
        );
        out.clear();
        // A reader meanwhile queues behind the writer.
        h.request(1, 3, false, W, false, &mut out).unwrap();
        h.written_ack(1, 3, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(h.written_ack(1, 3, &mut out), Err(Violation::UnexpectedAck { from: 1, page: 3 }));
        h.written_ack(2, 3, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                grant(3, 3, Source::Inline),
                Send { to: 1, msg: Msg::Written { page: 3, ack: false } },
                grant(1, 3, Source::Inline),
            ]
        );
        assert_eq!(h.check_diff(3, 3), Ok(()));
        assert_eq!(h.check_diff(1, 3), Err(Violation::NotAWriter { from: 1, page: 3 }));
    }

    #[test]
    fn a_single_writer_keeps_its_copy_and_the_home_writes_without_copies() {
        let mut h = home0(false);
        let mut out = Vec::new();
        h.request(1, 3, true, W, false, &mut out).unwrap();
        assert_eq!(out, vec![grant(1, 3, Source::Inline)], "only writer: not volatile for itself");
        out.clear();
        // The home writes too: rank 1 learns, and the home's own grant needs no copy.
        h.request(0, 3, true, W, false, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 1, msg: Msg::Written { page: 3, ack: true } }]);
        out.clear();
        h.written_ack(1, 3, &mut out).unwrap();
        assert_eq!(out, vec![grant(0, 3, Source::Valid)]);
        out.clear();
        // A second writer: everybody already knows, nobody else is told.
        h.request(2, 3, true, W, false, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 2, msg: Msg::Written { page: 3, ack: false } }, grant(2, 3, Source::Inline)]);
    }

    #[test]
    fn a_home_that_wrote_before_anybody_shared_counts_as_a_writer() {
        let mut h = home0(false);
        let mut out = Vec::new();
        // The home wrote page 3 alone (no message); rank 1 comes: its copy is volatile.
        h.request(1, 3, false, W, true, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 1, msg: Msg::Written { page: 3, ack: false } }, grant(1, 3, Source::Inline)]);
        out.clear();
        // The home's own registration, if it also asked, finds itself a writer already.
        h.request(0, 3, true, W, true, &mut out).unwrap();
        assert_eq!(out, vec![grant(0, 3, Source::Valid)]);
        out.clear();
        // A second reader learns it from the start; rank 1 is not told again.
        h.request(2, 3, false, W, true, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 2, msg: Msg::Written { page: 3, ack: false } }, grant(2, 3, Source::Inline)]);
        // Seen by the home only at a later sharer: the earlier ones are told and acknowledge.
        let mut h = home0(false);
        let mut out = Vec::new();
        h.request(1, 5, false, W, false, &mut out).unwrap();
        out.clear();
        h.request(2, 5, false, W, true, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 1, msg: Msg::Written { page: 5, ack: true } }]);
        out.clear();
        h.written_ack(1, 5, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 2, msg: Msg::Written { page: 5, ack: false } }, grant(2, 5, Source::Inline)]);
    }

    #[test]
    fn a_rank_that_read_by_itself_becomes_a_sharer_and_learns_what_the_home_knows() {
        let mut h = home0(true);
        let mut out = Vec::new();
        h.share(1, 3, false, &mut out).unwrap();
        assert!(out.is_empty(), "nobody writes page 3: nothing to say");
        // A writer registers: the sharer is told, and the writer's grant waits for it.
        h.request(2, 3, true, W, false, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 1, msg: Msg::Written { page: 3, ack: true } }]);
        out.clear();
        // Another rank reads by itself meanwhile: told at once (rank 2 writes).
        h.share(3, 3, false, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 3, msg: Msg::Written { page: 3, ack: false } }]);
        out.clear();
        h.written_ack(1, 3, &mut out).unwrap();
        assert_eq!(out, vec![grant(2, 3, Source::ReadFrom(0))]);
        // The home wrote page 5 alone before its first sharer: a writer from then on.
        out.clear();
        h.share(1, 5, true, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 1, msg: Msg::Written { page: 5, ack: false } }]);
        out.clear();
        h.request(0, 5, true, W, true, &mut out).unwrap();
        assert_eq!(out, vec![grant(0, 5, Source::Valid)]);
        // With an earlier sharer, the home's own registration (on its way) tells the others.
        out.clear();
        h.share(1, 6, false, &mut out).unwrap();
        h.share(2, 6, true, &mut out).unwrap();
        assert_eq!(out, vec![Send { to: 2, msg: Msg::Written { page: 6, ack: false } }]);
        out.clear();
        h.request(0, 6, true, W, true, &mut out).unwrap();
        let told = |r| Send { to: r, msg: Msg::Written { page: 6, ack: true } };
        assert_eq!(out, vec![told(1), told(2)]);
        out.clear();
        h.written_ack(1, 6, &mut out).unwrap();
        h.written_ack(2, 6, &mut out).unwrap();
        assert_eq!(out, vec![grant(0, 6, Source::Valid)]);
        assert_eq!(h.share(0, 6, false, &mut out), Err(Violation::NotHome { from: 0, page: 6 }));
        assert_eq!(h.share(1, 17, false, &mut out), Err(Violation::NotHome { from: 1, page: 17 }));
    }

    #[test]
    fn requests_for_other_homes_and_pages_are_refused() {
        let mut h = home0(false);
        let mut out = Vec::new();
        assert_eq!(h.request(1, 17, false, W, false, &mut out), Err(Violation::NotHome { from: 1, page: 17 }));
        assert_eq!(h.request(1, 64, false, W, false, &mut out), Err(Violation::PageOutOfRange { from: 1, page: 64 }));
        assert_eq!(h.written_ack(1, 3, &mut out), Err(Violation::UnexpectedAck { from: 1, page: 3 }));
        assert_eq!(h.check_diff(1, 3), Err(Violation::NotAWriter { from: 1, page: 3 }));
        assert!(out.is_empty());
    }
}
