//! The home side: one directory entry per page, a state machine driven by three events
//! (`Request`, `RevokeAck`, `Done`) whose actions are messages to send.
//!
//! A home serves one request per page at a time; others queue in arrival order. For a request
//! from rank `r` (the entry says who owns the page, whether the owner may write, and who else
//! holds a read copy):
//! - nobody holds the page yet (a first-touch page, see [`super::placement`]): `r` becomes its
//!   writable owner, `Grant { Valid, write }` at once (its own copy of a fresh page is zero).
//! - `r` already holds what it needs: `Grant { Valid }` at once.
//! - read, the home holds a read-only copy: `Grant { Inline }` with the page attached, or, when
//!   `r` reads the home's memory itself (its request says `direct`): on the same host (a job
//!   without one-sided reads) `Grant { HostCopy }`, which `r` copies as it handles the grant, so
//!   the home is done at once, as for `Inline`; with one-sided reads `Grant { ReadFrom(home) }`
//!   and wait for `Done` (the read completes later, while other messages from the home may
//!   already be handled).
//! - read, the home owns it writable: revoke its own copy down to read, then as above.
//! - read, another rank owns it writable: `Forward` to the owner, which downgrades itself and
//!   grants; wait for the requester's `Done`.
//! - read, another rank owns it read-only: `Grant { ReadFrom(owner) }`; wait for `Done`.
//! - write: `Revoke` every other copy and wait for each acknowledgement (from exactly the
//!   revoked ranks), then grant (no data if `r` holds a valid copy; the home's copy as for a read
//!   if the home holds one), or `Forward` to the owner, which invalidates itself and grants; wait
//!   for `Done`.
//!
//! Checked on receipt: a request must name a page of the heap that this rank is home of; an
//! acknowledgement must come from a rank still to acknowledge; `Done` must come from the
//! requester the entry waits for.

use std::collections::{BTreeMap, VecDeque};

use super::msg::{Msg, Page, Rank, Source, Waiter};
use super::placement::Placement;
use super::ranks::RankSet;
use super::violation::Violation;

/// A message the state machine wants sent (with the page attached when
/// [`Msg::attaches_page`]). Messages to this rank itself go through the engine's local queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Send {
    pub to: Rank,
    pub msg: Msg,
}

/// A request at (or being served by) the home.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Req {
    from: Rank,
    waiter: Waiter,
    write: bool,
    /// The requester reads our memory itself.
    direct: bool,
}

/// What the home does once every revoke is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum AfterAcks {
    /// The requester holds a valid copy: grant write without data.
    GrantValid,
    /// The home holds a valid copy: grant with the page attached (or read from the home).
    GrantFromHome,
    /// Ask the owner to hand the page over.
    ForwardTo(Rank),
}

/// What the home records when the requester's `Done` arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum OnDone {
    AddReader,
    NewOwner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Txn {
    AwaitAcks { req: Req, pending: RankSet, then: AfterAcks },
    AwaitDone { req: Req, on_done: OnDone },
}

/// The home's record of one page.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Entry {
    /// Nobody holds the page yet (then `owner` means nothing).
    unowned: bool,
    owner: Rank,
    /// The owner has (or may have) write access; then nobody else holds a copy.
    writable: bool,
    /// Readers other than the owner.
    copyset: RankSet,
    txn: Option<Txn>,
    queue: VecDeque<Req>,
}

/// What the directory says about a page (for checks and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRecord {
    /// The owner (meaningless when `holders` is empty: nobody holds the page yet).
    pub owner: Rank,
    pub writable: bool,
    /// Every rank that holds a copy, the owner included.
    pub holders: RankSet,
    /// A request is being served.
    pub busy: bool,
}

/// The directory entries of the pages this rank is home of.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Directory {
    me: Rank,
    placement: Placement,
    /// A direct requester copies out of our heap on our host as it handles the grant (no
    /// one-sided reads in this job), rather than reading it one-sidedly later.
    host_copies: bool,
    entries: BTreeMap<Page, Entry>,
    #[cfg(test)]
    broken: Option<Broken>,
}

/// Deliberate bugs, for showing that the model check finds them.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Broken {
    /// A write is granted as soon as the revokes are sent, before they are acknowledged.
    GrantBeforeAcks,
}

impl Directory {
    /// The directory of rank `me`; `one_sided`: direct requesters read one-sidedly (RDMA), else
    /// they are on our host and copy out of our heap.
    pub fn new(me: Rank, placement: Placement, one_sided: bool) -> Directory {
        Directory {
            me,
            placement,
            host_copies: !one_sided,
            entries: BTreeMap::new(),
            #[cfg(test)]
            broken: None,
        }
    }

    #[cfg(test)]
    pub fn break_with(&mut self, b: Broken) {
        self.broken = Some(b);
    }

    /// What the directory records for `page` (its first owner if never requested).
    pub fn record(&self, page: Page) -> PageRecord {
        match self.entries.get(&page) {
            Some(e) if e.unowned => {
                PageRecord { owner: e.owner, writable: false, holders: RankSet::empty(), busy: e.txn.is_some() }
            }
            Some(e) => PageRecord {
                owner: e.owner,
                writable: e.writable,
                holders: e.copyset.with(e.owner),
                busy: e.txn.is_some(),
            },
            None => match self.placement.first_owner(page) {
                Some(owner) => PageRecord { owner, writable: true, holders: RankSet::only(owner), busy: false },
                None => PageRecord { owner: self.me, writable: false, holders: RankSet::empty(), busy: false },
            },
        }
    }

    /// Rank `from` asks for `page` (`direct`: it reads our memory itself).
    pub fn request(
        &mut self,
        from: Rank,
        page: Page,
        write: bool,
        waiter: Waiter,
        direct: bool,
        out: &mut Vec<Send>,
    ) -> Result<(), Violation> {
        self.placement.check_home(self.me, from, page)?;
        let req = Req { from, waiter, write, direct };
        let e = self.entry(page);
        if e.txn.is_some() {
            e.queue.push_back(req);
            return Ok(());
        }
        self.start(page, req, out);
        Ok(())
    }

    /// Rank `from` acknowledges a revoke of `page`.
    pub fn revoke_ack(&mut self, from: Rank, page: Page, out: &mut Vec<Send>) -> Result<(), Violation> {
        let bad = Violation::UnexpectedAck { from, page };
        #[cfg(test)]
        if self.broken == Some(Broken::GrantBeforeAcks) {
            // The broken home no longer waits for acknowledgements; it drops them.
            return Ok(());
        }
        let Some(e) = self.entries.get_mut(&page) else { return Err(bad) };
        match &mut e.txn {
            Some(Txn::AwaitAcks { pending, .. }) if pending.contains(from) => {
                *pending = pending.without(from);
                if pending.is_empty() {
                    self.after_acks(page, out);
                }
                Ok(())
            }
            _ => Err(bad),
        }
    }

    /// Rank `from` has installed a grant of `page` that the home waits for.
    pub fn done(&mut self, from: Rank, page: Page, out: &mut Vec<Send>) -> Result<(), Violation> {
        let txn = self.entries.get(&page).and_then(|e| e.txn);
        let Some(Txn::AwaitDone { req, on_done }) = txn else {
            return Err(Violation::UnexpectedDone { from, page });
        };
        if req.from != from {
            return Err(Violation::UnexpectedDone { from, page });
        }
        let e = self.entry(page);
        match on_done {
            OnDone::AddReader => {
                e.writable = false;
                e.copyset = e.copyset.with(req.from).without(e.owner);
            }
            OnDone::NewOwner => {
                e.owner = req.from;
                e.writable = true;
                e.copyset = RankSet::empty();
            }
        }
        self.finish(page, out);
        Ok(())
    }

    fn entry(&mut self, page: Page) -> &mut Entry {
        let first = self.placement.first_owner(page);
        let me = self.me;
        self.entries.entry(page).or_insert_with(|| Entry {
            unowned: first.is_none(),
            owner: first.unwrap_or(me),
            writable: first.is_some(),
            copyset: RankSet::empty(),
            txn: None,
            queue: VecDeque::new(),
        })
    }

    fn grant(req: Req, page: Page, write: bool, source: Source) -> Send {
        Send { to: req.from, msg: Msg::Grant { page, waiter: req.waiter, write, source } }
    }

    fn start(&mut self, page: Page, req: Req, out: &mut Vec<Send>) {
        let me = self.me;
        let direct = req.direct;
        let host_copies = self.host_copies;
        let e = self.entry(page);
        let r = req.from;
        if e.unowned {
            // First touch: the requester's own (zero) copy is the page.
            e.unowned = false;
            e.owner = r;
            e.writable = true;
            out.push(Self::grant(req, page, true, Source::Valid));
            return self.finish(page, out);
        }
        let holders = e.copyset.with(e.owner);
        let (owner, writable) = (e.owner, e.writable);
        let (victims, to_read, then) = if !req.write {
            if holders.contains(r) {
                out.push(Self::grant(req, page, owner == r && writable, Source::Valid));
                return self.finish(page, out);
            }
            if holders.contains(me) && !writable {
                if direct && host_copies {
                    // The requester copies ours as it handles the grant: done, as for Inline.
                    e.copyset = e.copyset.with(r);
                    out.push(Self::grant(req, page, false, Source::HostCopy));
                    return self.finish(page, out);
                }
                if direct {
                    // The requester reads our copy; it stays put until the requester's Done.
                    e.txn = Some(Txn::AwaitDone { req, on_done: OnDone::AddReader });
                    return out.push(Self::grant(req, page, false, Source::ReadFrom(me as u32)));
                }
                e.copyset = e.copyset.with(r);
                out.push(Self::grant(req, page, false, Source::Inline));
                return self.finish(page, out);
            }
            if owner == me {
                // We own it writable: downgrade ourselves (a revoke, so the engine's hold rule
                // applies), then grant our copy.
                (RankSet::only(me), true, AfterAcks::GrantFromHome)
            } else if writable {
                e.txn = Some(Txn::AwaitDone { req, on_done: OnDone::AddReader });
                let fwd = Msg::Forward { page, requester: r as u32, waiter: req.waiter, write: false };
                return out.push(Send { to: owner, msg: fwd });
            } else {
                e.txn = Some(Txn::AwaitDone { req, on_done: OnDone::AddReader });
                return out.push(Self::grant(req, page, false, Source::ReadFrom(owner as u32)));
            }
        } else if holders.contains(r) {
            (holders.without(r), false, AfterAcks::GrantValid)
        } else if holders.contains(me) {
            // We hold a copy: invalidate every copy (ours included), then grant ours.
            (holders, false, AfterAcks::GrantFromHome)
        } else if writable {
            e.txn = Some(Txn::AwaitDone { req, on_done: OnDone::NewOwner });
            let fwd = Msg::Forward { page, requester: r as u32, waiter: req.waiter, write: true };
            return out.push(Send { to: owner, msg: fwd });
        } else {
            (holders.without(owner), false, AfterAcks::ForwardTo(owner))
        };
        e.txn = Some(Txn::AwaitAcks { req, pending: victims, then });
        for v in victims.iter() {
            out.push(Send { to: v, msg: Msg::Revoke { page, to_read } });
        }
        #[cfg(test)]
        if self.broken == Some(Broken::GrantBeforeAcks) {
            // The bug: go on as if every acknowledgement were already in.
            return self.after_acks(page, out);
        }
        if victims.is_empty() {
            self.after_acks(page, out);
        }
    }

    fn after_acks(&mut self, page: Page, out: &mut Vec<Send>) {
        let me = self.me;
        let host_copies = self.host_copies;
        let e = self.entry(page);
        let Some(Txn::AwaitAcks { req, then, .. }) = e.txn else {
            unreachable!("after_acks runs only for a transaction awaiting acknowledgements");
        };
        match then {
            AfterAcks::GrantFromHome if req.direct && !host_copies => {
                // Our copy (now read-only or invalid for us) is what the requester reads
                // one-sidedly; the directory changes when it says Done.
                let on_done = if req.write { OnDone::NewOwner } else { OnDone::AddReader };
                e.txn = Some(Txn::AwaitDone { req, on_done });
                out.push(Self::grant(req, page, req.write, Source::ReadFrom(me as u32)));
            }
            AfterAcks::GrantValid | AfterAcks::GrantFromHome => {
                let source = match then {
                    AfterAcks::GrantValid => Source::Valid,
                    // Copied as the requester handles the grant (see `start`).
                    _ if req.direct => Source::HostCopy,
                    _ => Source::Inline,
                };
                if req.write {
                    e.owner = req.from;
                    e.writable = true;
                    e.copyset = RankSet::empty();
                } else {
                    e.writable = false;
                    e.copyset = e.copyset.with(req.from);
                }
                out.push(Self::grant(req, page, req.write, source));
                self.finish(page, out);
            }
            AfterAcks::ForwardTo(owner) => {
                e.txn = Some(Txn::AwaitDone { req, on_done: OnDone::NewOwner });
                let fwd = Msg::Forward { page, requester: req.from as u32, waiter: req.waiter, write: true };
                out.push(Send { to: owner, msg: fwd });
            }
        }
    }

    fn finish(&mut self, page: Page, out: &mut Vec<Send>) {
        let e = self.entry(page);
        e.txn = None;
        if let Some(next) = e.queue.pop_front() {
            self.start(page, next, out);
        }
    }
}
