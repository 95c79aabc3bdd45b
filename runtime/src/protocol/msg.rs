//! The messages engines exchange. Pages are named by index from the heap base; a thread that
//! waits for an answer is named by a [`Waiter`] (its wait slot and the slot's generation).

/// A rank of the job.
pub type Rank = usize;
/// A page of the heap, by index from the heap base.
pub type Page = u64;

/// A thread waiting for an answer: its wait slot, and which use of that slot (slots are reused,
/// so an answer meant for an earlier wait must not complete a later one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Waiter {
    pub slot: u32,
    pub generation: u32,
}

/// Where a granted page's contents come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Attached by the home, which is done with the request.
    Inline,
    /// Attached by the owner on the home's behalf: tell the home when installed.
    Forwarded,
    /// The requester still holds a valid copy.
    Valid,
    /// Read it from this rank's runtime view (one-sided read), then tell the home.
    ReadFrom(u32),
    /// Copy it out of the sender's heap, on this host, while handling the grant; the sender is
    /// the home, which is done with the request. Its copy holds still until the requester has
    /// handled the grant, because anything that changes it first asks the requester on the same
    /// link (a revoke, a forward), and links are FIFO.
    HostCopy,
}

impl Source {
    /// Whether the message carries the page's contents.
    pub fn attaches_page(self) -> bool {
        matches!(self, Source::Inline | Source::Forwarded)
    }

    /// Whether the requester tells the home (`Done`) once the page is installed.
    pub fn needs_done(self) -> bool {
        matches!(self, Source::Forwarded | Source::ReadFrom(_))
    }
}

/// A message between engines. `Copy`, and free of heap data: a broadcast's bytes and a diff travel
/// as the frame's payload next to the message (see [`super::wire`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// Requester -> home: I need `page` (for writing if `write`). `direct`: I can read your memory
    /// myself (a one-sided read, or your heap on our shared host), so a copy you hold comes as
    /// `ReadFrom(you)` (one-sided) or `HostCopy` (our host) instead of attached.
    Request { page: Page, write: bool, waiter: Waiter, direct: bool },
    /// Home -> owner: give `page` to `requester` (downgrade to read, or invalidate if `write`).
    Forward { page: Page, requester: u32, waiter: Waiter, write: bool },
    /// -> requester: access granted.
    Grant { page: Page, waiter: Waiter, write: bool, source: Source },
    /// Requester -> home: a grant that needed it (see [`Source::needs_done`]) is installed.
    Done { page: Page },
    /// Home -> holder: downgrade to read-only (`to_read`) or drop your copy.
    Revoke { page: Page, to_read: bool },
    /// Holder -> home: done.
    RevokeAck { page: Page },
    /// Free this block of your arena (allocated by you, freed elsewhere).
    Free { addr: u64 },
    /// -> the next rank of a dissemination barrier's round: I (and whoever I heard from) reached
    /// round `round` of barrier `epoch` (see [`super::barrier`]).
    BarrierNotice { epoch: u64, round: u32 },
    /// -> lock home: queue me for lock `id`.
    LockAcquire { id: u32, waiter: Waiter },
    /// Lock home -> waiter: you hold lock `id`.
    LockGranted { id: u32, waiter: Waiter },
    /// -> lock home: I release lock `id` (give its token back).
    LockRelease { id: u32 },
    /// Lock home -> holder: give lock `id` back when no thread of yours holds it.
    LockRecall { id: u32 },
    /// Root -> all: the payload is bytes `offset..` of broadcast `seq` (of `total` bytes).
    Broadcast { seq: u64, total: u64, offset: u64 },
    /// -> owner of a block: how large is the block at `addr`?
    SizeQuery { addr: u64, waiter: Waiter },
    /// Owner -> asker: the usable size (0: not a live block).
    SizeReply { waiter: Waiter, size: u64 },
    /// Release consistency, home -> a rank that holds or held a copy of `page`: ranks other than
    /// you now write this page; drop your copy at your next acquire. `ack`: answer with
    /// [`Msg::WrittenAck`] (the home holds a new writer's grant until every such rank knows).
    Written { page: Page, ack: bool },
    /// Release consistency, -> home: I know that others write `page`.
    WrittenAck { page: Page },
    /// Release consistency, -> home: I read a copy of `page` straight from your memory (a
    /// one-sided or same-host read): count me a sharer. No answer, unless the page is volatile
    /// for me (`Written`); my next acquire fences you before it uses what it knows.
    Share { page: Page },
    /// Release consistency, writer -> home: my changes to `page` since my last release; the
    /// payload holds them ([`super::diff`]).
    Diff { page: Page },
    /// Release consistency, writer -> home: answer once every diff I sent before is applied.
    Fence { waiter: Waiter },
    /// Home -> writer: every diff you sent before your fence is applied.
    Fenced { waiter: Waiter },
    /// Liveness.
    Ping,
    /// The sender lost contact with `rank` and stops; so does the job.
    Lost { rank: u32 },
}

impl Msg {
    /// The page a coherence message is about.
    pub fn page(&self) -> Option<Page> {
        match *self {
            Msg::Request { page, .. }
            | Msg::Forward { page, .. }
            | Msg::Grant { page, .. }
            | Msg::Done { page }
            | Msg::Revoke { page, .. }
            | Msg::RevokeAck { page }
            | Msg::Written { page, .. }
            | Msg::WrittenAck { page }
            | Msg::Share { page }
            | Msg::Diff { page } => Some(page),
            _ => None,
        }
    }

    /// Whether this message travels with the contents of [`Msg::page`] attached.
    pub fn attaches_page(&self) -> bool {
        matches!(self, Msg::Grant { source, .. } if source.attaches_page())
    }
}
