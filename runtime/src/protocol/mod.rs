//! The coherence protocol, free of I/O: pure state machines from (state, event) to (state,
//! messages to send). No sockets, no mappings, no signals here; the engine (`crate::engine`)
//! feeds them what arrives and carries out what they decide, and the transports only move the
//! bytes [`wire`] makes of their messages. `docs/protocol.md` describes the whole protocol.
//!
//! - [`directory`]: the home side of every page (who owns it, who holds copies, the request
//!   being served and the queue behind it).
//! - [`holder`]: what a rank does with its own copy, and which messages it accepts from whom.
//! - [`locks`], [`barrier`]: global locks at their homes, the dissemination barrier.
//! - [`sharing`], [`diff`]: the home side of release consistency (`GALLOCY_CONSISTENCY=release`):
//!   who shares and who writes each page; the diffs writers send at release.
//! - [`placement`]: which rank is a page's home, and its first owner.
//! - [`msg`], [`wire`]: the messages and their encoding.
//!
//! Every receiver checks the protocol's invariants and reports a [`Violation`] instead of acting
//! on a message that breaks them.

pub mod barrier;
pub mod diff;
pub mod directory;
pub mod holder;
pub mod locks;
pub mod msg;
pub mod placement;
pub mod ranks;
pub mod sharing;
pub mod violation;
pub mod wire;

#[cfg(test)]
mod directory_tests;
#[cfg(test)]
mod model;

pub use directory::{Directory, Send};
pub use holder::Access;
pub use msg::{Msg, Page, Rank, Source, Waiter};
pub use placement::Placement;
pub use violation::{Attached, Violation};
