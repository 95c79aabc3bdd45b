//! What a receiver refuses: a message that breaks the protocol. Each is fatal for the job; the
//! engine stops with the message below instead of acting on it.

use super::msg::{Page, Rank, Waiter};

/// A protocol violation by rank `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// rank {from} named page {page}, beyond the heap
    #[error("rank {from} named page {page}, beyond the heap")]
    PageOutOfRange { from: Rank, page: Page },
    /// rank {from} asked about page {page}, which this rank is not home of
    #[error("rank {from} asked about page {page}, which this rank is not home of")]
    NotHome { from: Rank, page: Page },
    /// rank {from} sent {what} for page {page}, which only its home {home} may send
    #[error("rank {from} sent {what} for page {page}, which only its home (rank {home}) may send")]
    NotFromHome { from: Rank, page: Page, home: Rank, what: &'static str },
    /// rank {from} acknowledged a revoke of page {page} it was not asked for
    #[error("rank {from} acknowledged a revoke of page {page} it was not asked for")]
    UnexpectedAck { from: Rank, page: Page },
    /// rank {from} reported a grant of page {page} installed that was not its to install
    #[error("rank {from} reported a grant of page {page} installed that was not its to install")]
    UnexpectedDone { from: Rank, page: Page },
    /// rank {from}'s grant of page {page} came with the wrong contents attached
    #[error("rank {from} sent a message about page {page} with {attached} attached (expected {expected})")]
    WrongAttachment { from: Rank, page: Page, attached: Attached, expected: Attached },
    /// rank {from} told this rank to read page {page} from rank {owner}
    #[error("rank {from} told this rank to read page {page} from rank {owner}")]
    BadReadSource { from: Rank, page: Page, owner: u32 },
    /// rank {from} granted page {page} to be copied out of its heap, which this rank cannot read
    #[error("rank {from} granted page {page} to be copied out of its heap on this host, which this rank cannot read")]
    HostCopyUnreadable { from: Rank, page: Page },
    /// rank {from} answered a wait that is not waiting for that answer
    #[error("rank {from} answered wait slot {} (generation {}), which is not waiting for that answer", waiter.slot, waiter.generation)]
    StaleWaiter { from: Rank, waiter: Waiter },
    /// rank {from} answered a one-sided read of page {page} nobody started
    #[error("rank {from} completed a read of page {page} nobody started")]
    UnexpectedRead { from: Rank, page: Page },
    /// rank {from} sent a grant or recall of global lock {id}, which only its home may send
    #[error("rank {from} sent a grant or recall of global lock {id}, which only its home may send")]
    LockNotFromHome { from: Rank, id: u32 },
    /// rank {from} asked this rank about global lock {id}, which this rank is not home of
    #[error("rank {from} asked this rank about global lock {id}, which this rank is not home of")]
    NotLockHome { from: Rank, id: u32 },
    /// rank {from} released global lock {id}, which it does not hold
    #[error("rank {from} released global lock {id}, which it does not hold")]
    LockNotHeld { from: Rank, id: u32 },
    /// rank {from} sent changes to page {page}, which it never registered to write
    #[error("rank {from} sent changes to page {page}, which it never registered to write")]
    NotAWriter { from: Rank, page: Page },
    /// rank {from} sent a diff of page {page} this rank cannot apply
    #[error("rank {from} sent a malformed diff of page {page}: {why}")]
    BadDiff { from: Rank, page: Page, why: super::diff::DiffError },
    /// rank {from} sent {what}, which the job's memory model does not use
    #[error("rank {from} sent {what}, which {model} consistency does not use")]
    WrongModel { from: Rank, what: &'static str, model: &'static str },
    /// rank {from} sent a barrier notice this rank does not expect from it
    #[error("rank {from} sent an unexpected barrier notice (barrier {epoch}, round {round})")]
    UnexpectedBarrier { from: Rank, epoch: u64, round: u32 },
}

/// What came attached to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Nothing,
    /// The contents of this page.
    Page(Page),
    /// Bytes that are not one whole page.
    Other,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attached::Nothing => write!(f, "nothing"),
            Attached::Page(p) => write!(f, "page {p}"),
            Attached::Other => write!(f, "bytes that are not one page"),
        }
    }
}
