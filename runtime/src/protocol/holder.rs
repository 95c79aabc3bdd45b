//! The holder side: what a rank does with its own copy of a page when its home revokes it or
//! forwards a request to it, and which grants it accepts.
//!
//! A rank's copy of a page is described by its [`Access`]. New contents always land in the
//! runtime view before the access opens (the engine and the fault path do that); these
//! functions only decide the transitions and check who may send what.

use super::directory::Send;
use super::msg::{Msg, Page, Rank, Source, Waiter};
use super::placement::Placement;
use super::violation::{Attached, Violation};

/// A rank's access to one page of the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    None,
    Read,
    Write,
}

impl Access {
    /// Whether this access allows a read, or a write if `write`.
    pub fn permits(self, write: bool) -> bool {
        match self {
            Access::Write => true,
            Access::Read => !write,
            Access::None => false,
        }
    }

    /// The access a grant gives.
    pub fn granted(write: bool) -> Access {
        if write {
            Access::Write
        } else {
            Access::Read
        }
    }
}

/// The access a holder keeps after its home revokes its copy (down to read-only if `to_read`);
/// it then acknowledges with `RevokeAck`.
pub fn after_revoke(current: Access, to_read: bool) -> Access {
    match (to_read, current) {
        (true, Access::Write) => Access::Read,
        (true, other) => other,
        (false, _) => Access::None,
    }
}

/// The owner's move when its home forwards a request: the access it keeps, and its grant to the
/// requester (the page attached, or, when the requester reads our memory itself (`direct`: reads
/// are one-sided), an invitation to read it from us; the copy then stays put until the home has
/// the requester's `Done`).
pub fn forward(
    me: Rank,
    direct: bool,
    current: Access,
    page: Page,
    requester: Rank,
    waiter: Waiter,
    write: bool,
) -> (Access, Send) {
    let keep = if write { Access::None } else { after_revoke(current, true) };
    let source = if direct { Source::ReadFrom(me as u32) } else { Source::Forwarded };
    (keep, Send { to: requester, msg: Msg::Grant { page, waiter, write, source } })
}

/// Whether the page contents that arrive with `msg`, `len` bytes at heap offset `offset`, are owed
/// to this rank and may land in its runtime view: only a grant that carries its page brings
/// contents, for exactly that page, to a thread that `waits` for it. Anything else (a grant
/// nobody asked for, contents for another page) is refused before a byte lands.
pub fn owes_contents(msg: &Msg, offset: u64, len: u32, page_size: u64, waits: impl Fn(Waiter, Page) -> bool) -> bool {
    match *msg {
        Msg::Grant { page, waiter, .. } if msg.attaches_page() => {
            page.checked_mul(page_size) == Some(offset) && u64::from(len) == page_size && waits(waiter, page)
        }
        _ => false,
    }
}

/// Checks who sent a coherence message and what came attached to it: revokes and forwards come
/// from the page's home; a grant comes from the home, or from the owner the home forwarded to;
/// a grant that says it carries the page carries exactly that page, and nothing else carries one.
pub fn check_received(
    placement: &Placement,
    me: Rank,
    from: Rank,
    msg: &Msg,
    attached: Attached,
) -> Result<(), Violation> {
    if let Some(page) = msg.page() {
        if !placement.contains(page) {
            return Err(Violation::PageOutOfRange { from, page });
        }
        let expected = if msg.attaches_page() { Attached::Page(page) } else { Attached::Nothing };
        if attached != expected {
            return Err(Violation::WrongAttachment { from, page, attached, expected });
        }
    } else if attached != Attached::Nothing {
        return Err(Violation::WrongAttachment { from, page: 0, attached, expected: Attached::Nothing });
    }
    let from_home = |page: Page, what: &'static str| {
        let home = placement.home(page);
        if from == home {
            Ok(())
        } else {
            Err(Violation::NotFromHome { from, page, home, what })
        }
    };
    match *msg {
        Msg::Revoke { page, .. } => from_home(page, "a revoke"),
        Msg::Written { page, .. } => from_home(page, "a notice that others write"),
        Msg::Forward { page, requester, .. } => {
            from_home(page, "a forward")?;
            if requester as usize >= placement.ranks() || requester as usize == me {
                return Err(Violation::BadReadSource { from, page, owner: requester });
            }
            Ok(())
        }
        Msg::Grant { page, source, .. } => match source {
            Source::Inline | Source::Valid | Source::HostCopy => from_home(page, "this grant"),
            // From the owner, which only the home knows.
            Source::Forwarded => Ok(()),
            Source::ReadFrom(owner) => {
                let o = owner as usize;
                if o >= placement.ranks() || o == me || (from != o && from != placement.home(page)) {
                    return Err(Violation::BadReadSource { from, page, owner });
                }
                Ok(())
            }
        },
        Msg::LockGranted { id, .. } | Msg::LockRecall { id } if from != id as usize % placement.ranks() => {
            Err(Violation::LockNotFromHome { from, id })
        }
        Msg::LockAcquire { id, .. } | Msg::LockRelease { id } if id as usize % placement.ranks() != me => {
            Err(Violation::NotLockHome { from, id })
        }
        _ => Ok(()),
    }
}

/// Whether a peer may read `len` bytes at heap offset `offset` of this rank's memory, two-sided
/// (a TCP read request). Only a `ReadFrom` grant sends a reader here, and without one-sided
/// reads that names an owner holding a read-only copy, which stays put until the home has the
/// reader's `Done`. So: exactly one page of the heap, which this rank holds read-only (`access`:
/// this rank's access to a page, `None` for a page outside the heap). A page this rank may write
/// is changing under the reader; one it does not hold is not its to give.
pub fn owes_read(offset: u64, len: u32, page_size: u64, access: impl Fn(Page) -> Option<Access>) -> bool {
    u64::from(len) == page_size && offset.is_multiple_of(page_size) && access(offset / page_size) == Some(Access::Read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_land_only_for_a_waiting_grant_of_that_page() {
        let w = Waiter { slot: 3, generation: 9 };
        let waits = |x: Waiter, p: Page| x == w && p == 5;
        let grant = |source| Msg::Grant { page: 5, waiter: w, write: false, source };
        assert!(owes_contents(&grant(Source::Inline), 5 * 4096, 4096, 4096, waits));
        assert!(owes_contents(&grant(Source::Forwarded), 5 * 4096, 4096, 4096, waits));
        assert!(!owes_contents(&grant(Source::Valid), 5 * 4096, 4096, 4096, waits), "a grant without contents");
        assert!(!owes_contents(&grant(Source::Inline), 6 * 4096, 4096, 4096, waits), "another page's contents");
        assert!(!owes_contents(&grant(Source::Inline), 5 * 4096, 8192, 4096, waits), "more than the page");
        let stale =
            Msg::Grant { page: 5, waiter: Waiter { slot: 3, generation: 8 }, write: false, source: Source::Inline };
        assert!(!owes_contents(&stale, 5 * 4096, 4096, 4096, waits), "nobody waits for it");
        let huge = Msg::Grant { page: u64::MAX, waiter: w, write: false, source: Source::Inline };
        assert!(!owes_contents(&huge, 0, 4096, 4096, |_, _| true), "an offset that overflows");
        assert!(!owes_contents(&Msg::Ping, 5 * 4096, 4096, 4096, waits), "not a grant");
    }

    #[test]
    fn a_peer_may_read_one_whole_page_held_read_only_and_nothing_else() {
        let access = |p: Page| match p {
            5 => Some(Access::Read),
            6 => Some(Access::Write),
            7 => Some(Access::None),
            p if p < 16 => Some(Access::Read),
            _ => None,
        };
        assert!(owes_read(5 * 4096, 4096, 4096, access));
        assert!(!owes_read(6 * 4096, 4096, 4096, access), "a page this rank may write");
        assert!(!owes_read(7 * 4096, 4096, 4096, access), "a page this rank does not hold");
        assert!(!owes_read(16 * 4096, 4096, 4096, access), "past the heap");
        assert!(!owes_read(5 * 4096 + 8, 4096, 4096, access), "not page-aligned");
        assert!(!owes_read(5 * 4096, 2048, 4096, access), "part of a page");
        assert!(!owes_read(4 * 4096, 8192, 4096, access), "two pages held read-only");
        assert!(!owes_read(u64::MAX - 4095, 4096, 4096, access), "an offset near the end of the address space");
    }

    const W: Waiter = Waiter { slot: 3, generation: 9 };

    #[test]
    fn revokes_downgrade_or_invalidate() {
        assert_eq!(after_revoke(Access::Write, true), Access::Read);
        assert_eq!(after_revoke(Access::Read, true), Access::Read);
        assert_eq!(after_revoke(Access::None, true), Access::None);
        for a in [Access::None, Access::Read, Access::Write] {
            assert_eq!(after_revoke(a, false), Access::None);
        }
    }

    #[test]
    fn forwards_hand_the_page_over() {
        let (keep, send) = forward(2, false, Access::Write, 7, 1, W, false);
        assert_eq!(keep, Access::Read);
        assert_eq!(
            send,
            Send { to: 1, msg: Msg::Grant { page: 7, waiter: W, write: false, source: Source::Forwarded } }
        );
        let (keep, send) = forward(2, true, Access::Write, 7, 1, W, true);
        assert_eq!(keep, Access::None);
        assert_eq!(send.msg, Msg::Grant { page: 7, waiter: W, write: true, source: Source::ReadFrom(2) });
    }

    #[test]
    fn receivers_check_senders_and_attachments() {
        let p = Placement::new(3, 30, 10);
        let grant = |source| Msg::Grant { page: 4, waiter: W, write: false, source };
        // Page 4's home is rank 1.
        assert!(check_received(&p, 0, 1, &grant(Source::Inline), Attached::Page(4)).is_ok());
        assert_eq!(
            check_received(&p, 0, 1, &grant(Source::Inline), Attached::Page(5)),
            Err(Violation::WrongAttachment {
                from: 1,
                page: 4,
                attached: Attached::Page(5),
                expected: Attached::Page(4)
            })
        );
        assert!(check_received(&p, 0, 1, &grant(Source::Inline), Attached::Nothing).is_err());
        assert!(check_received(&p, 0, 1, &grant(Source::Valid), Attached::Page(4)).is_err());
        assert!(matches!(
            check_received(&p, 0, 2, &grant(Source::Inline), Attached::Page(4)),
            Err(Violation::NotFromHome { from: 2, home: 1, .. })
        ));
        assert!(check_received(&p, 0, 2, &grant(Source::Forwarded), Attached::Page(4)).is_ok());
        assert!(check_received(&p, 0, 2, &grant(Source::ReadFrom(2)), Attached::Nothing).is_ok());
        assert!(check_received(&p, 0, 1, &grant(Source::ReadFrom(2)), Attached::Nothing).is_ok());
        assert!(check_received(&p, 0, 2, &grant(Source::ReadFrom(1)), Attached::Nothing).is_err());
        assert!(
            check_received(&p, 0, 1, &grant(Source::ReadFrom(0)), Attached::Nothing).is_err(),
            "not from ourselves"
        );
        assert!(check_received(&p, 0, 1, &grant(Source::ReadFrom(3)), Attached::Nothing).is_err(), "no rank 3");
        let revoke = Msg::Revoke { page: 4, to_read: false };
        assert!(check_received(&p, 0, 1, &revoke, Attached::Nothing).is_ok());
        assert!(check_received(&p, 0, 2, &revoke, Attached::Nothing).is_err());
        assert!(check_received(&p, 0, 1, &Msg::Revoke { page: 30, to_read: false }, Attached::Nothing).is_err());
        let fwd = Msg::Forward { page: 4, requester: 2, waiter: W, write: true };
        assert!(check_received(&p, 0, 1, &fwd, Attached::Nothing).is_ok());
        assert!(check_received(
            &p,
            0,
            1,
            &Msg::Forward { page: 4, requester: 0, waiter: W, write: true },
            Attached::Nothing
        )
        .is_err());
        assert!(check_received(&p, 0, 2, &Msg::Ping, Attached::Page(1)).is_err());
        // Lock messages: grants and recalls from the lock's home (id % 3), requests to it.
        assert!(check_received(&p, 0, 1, &Msg::LockRecall { id: 4 }, Attached::Nothing).is_ok());
        assert!(check_received(&p, 0, 2, &Msg::LockRecall { id: 4 }, Attached::Nothing).is_err());
        assert!(check_received(&p, 0, 2, &Msg::LockGranted { id: 4, waiter: W }, Attached::Nothing).is_err());
        assert!(check_received(&p, 0, 2, &Msg::LockRelease { id: 3 }, Attached::Nothing).is_ok());
        assert!(check_received(&p, 0, 2, &Msg::LockAcquire { id: 4, waiter: W }, Attached::Nothing).is_err());
    }
}
