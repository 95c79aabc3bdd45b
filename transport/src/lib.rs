//! Byte movers for gallocy.
//!
//! A [`Transport`] carries opaque control messages between the processes of a job and moves page
//! contents between their *runtime views* (the always-writable mapping of the shared heap). It knows
//! nothing of coherence: the engine in `gallocy` decides what to send; a transport only moves bytes.
//!
//! Two data paths exist so that an RDMA implementation can map them onto one-sided verbs:
//! - [`Transport::send`] with an attached page: the page lands in the receiver's runtime view at the
//!   same heap offset *before* the receiver sees the message (RDMA: WRITE followed by SEND on one
//!   reliable-connected QP; TCP: one frame carrying both).
//! - [`Transport::start_read`]: copy bytes at heap offset X of process P into my runtime view
//!   (RDMA: READ from P's registered memory; TCP: the owner's transport answers from its view).

#![deny(missing_docs)]

mod auth;
pub mod coordinator;
pub mod frame;
pub mod local;
#[cfg(feature = "rdma")]
pub mod rdma;
mod seal;
mod sys;
pub mod tcp;

use std::time::Duration;

/// The decoders of peer bytes that are private to their modules, for the fuzz targets in
/// `runtime/fuzz`: not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::auth::{accept, connect, is_refusal, SERVER_HELLO_LEN};
    #[cfg(feature = "rdma")]
    pub use crate::rdma::fuzzing::{endpoint_round_trip, fragment_round_trip, FRAGMENT_MAX};
    pub use crate::tcp::fuzzing::{
        decode_answer, decode_join, encode_join, encode_roster, read_record, sealed_record, Answer, AnswerError,
    };
}

/// Errors of the transport layer. Each variant's message names the peer involved.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The connection to a peer is gone.
    #[error("connection to rank {rank} lost: {reason}")]
    PeerLost {
        /// The peer's rank.
        rank: usize,
        /// Why.
        reason: LostReason,
    },
    /// The peer left the job (said goodbye) before we ever talked to it: nothing more can be
    /// sent to it.
    #[error("rank {rank} has left the job")]
    PeerLeft {
        /// The peer's rank.
        rank: usize,
    },
    /// This process said goodbye: it makes no new connection.
    #[error("this process has left the job")]
    Left,
    /// There is no connection to that rank (it is us, or out of range).
    #[error("no connection to rank {0}")]
    NoSuchPeer(usize),
    /// A span outside the local heap view, or larger than one frame carries.
    #[error("span {offset:#x}+{len} lies outside the heap or is too large")]
    BadSpan {
        /// Offset from the heap base.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// A control message longer than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is too long")]
    MessageTooLong(usize),
    /// A peer did not prove knowledge of the job's secret (or we could not prove ours).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Setting up the job failed: the text says which rank and why.
    #[error("{0}")]
    Bootstrap(String),
    /// Rank 0 stopped the job during start-up.
    #[error("{0}")]
    JobAborted(String),
    /// RDMA cannot be used, or a verbs call failed: the text says what is missing.
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] rdma::RdmaError),
    /// A caller passed an argument outside what the transport supports.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Why a peer's connection is considered lost. Building one never allocates, so the fault path
/// can report it from a signal handler.
#[derive(Debug)]
pub enum LostReason {
    /// The peer closed the connection without saying goodbye.
    Closed,
    /// A socket call failed.
    Io(std::io::Error),
    /// The peer sent a frame that breaks the protocol.
    Protocol(frame::FrameError),
    /// An RDMA verbs call failed, or the peer sent something the RDMA transport cannot take.
    Verbs(&'static str),
    /// An RDMA work completion to or from this peer failed with this `ibv_wc_status`.
    Completion(u32),
    /// A connection to the peer could not be made (connections are made on first use).
    NoLink {
        /// Where the peer said it listens, once known.
        addr: Option<std::net::SocketAddr>,
        /// Why not.
        error: std::io::Error,
    },
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Closed => write!(f, "connection closed"),
            LostReason::Io(e) => write!(f, "{e}"),
            LostReason::Protocol(e) => write!(f, "protocol error: {e}"),
            LostReason::Verbs(what) => write!(f, "RDMA: {what}"),
            LostReason::NoLink { addr: Some(a), error } => write!(f, "could not connect to {a}: {error}"),
            LostReason::NoLink { addr: None, error } => write!(f, "could not connect: {error}"),
            LostReason::Completion(status) => write!(f, "RDMA work completion failed: {}", wc_status_name(*status)),
        }
    }
}

/// The name of an `ibv_wc_status` value (from `<infiniband/verbs.h>`).
fn wc_status_name(status: u32) -> &'static str {
    const NAMES: [&str; 23] = [
        "success",
        "local length error",
        "local QP operation error",
        "local EE context operation error",
        "local protection error",
        "work request flushed",
        "memory window bind error",
        "bad response",
        "local access error",
        "remote invalid request",
        "remote access error",
        "remote operation error",
        "transport retry counter exceeded (the peer is gone or unreachable)",
        "RNR retry counter exceeded",
        "local RDD violation",
        "remote invalid RD request",
        "remote aborted",
        "invalid EE context number",
        "invalid EE context state",
        "fatal error",
        "response timeout",
        "general error",
        "tag matching error",
    ];
    NAMES.get(status as usize).copied().unwrap_or("unknown status")
}

impl TransportError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::Io { what: what.into(), source }
    }
}

/// The local process's runtime view of the heap: always readable and writable, the source of
/// every page another process reads from us and the destination of every page we receive.
#[derive(Clone, Copy, Debug)]
pub struct MemoryView {
    /// First byte of the view.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: the view is a fixed mapping that outlives the transport; callers coordinate access
// to individual pages through the coherence protocol.
unsafe impl Send for MemoryView {}
// SAFETY: as above.
unsafe impl Sync for MemoryView {}

impl MemoryView {
    /// Checks that `span` is non-empty, at most `max_len` bytes and lies inside the view.
    pub fn check(&self, span: Span, max_len: u32) -> Result<(), TransportError> {
        let end = span.offset.checked_add(u64::from(span.len));
        if span.len == 0 || span.len > max_len || end.is_none_or(|e| e > self.len as u64) {
            return Err(TransportError::BadSpan { offset: span.offset, len: span.len });
        }
        Ok(())
    }
}

/// A page (or byte range) of the heap, by offset from the heap base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Offset from the heap base.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Something that happened, reported by [`Transport::poll`].
#[derive(Debug)]
pub enum Event<'a> {
    /// A control message from `from`. If it carried a page, the page's bytes are already in the
    /// local runtime view at `page.offset`.
    Message {
        /// Sender's rank.
        from: usize,
        /// The message bytes (valid during the callback only).
        bytes: &'a [u8],
        /// The page that came with it, if any.
        page: Option<Span>,
    },
    /// A read started by [`Transport::start_read`] is complete: the bytes are in the local view.
    ReadDone {
        /// The rank read from.
        from: usize,
        /// The caller's token.
        token: u64,
    },
    /// A peer said goodbye; its connection will close.
    PeerLeft {
        /// The peer's rank.
        rank: usize,
    },
}

/// Moves bytes between the processes of one job.
///
/// `send`, `start_read` and `wake` may be called from any thread, including from a signal handler
/// (they allocate nothing and take only the transport's own locks, never held by application
/// code). `poll` is called by a single service thread.
pub trait Transport: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of processes in the job.
    fn size(&self) -> usize;
    /// Sends a control message (at most [`MAX_MESSAGE`] bytes) to `peer`, optionally with a span of
    /// the local runtime view that lands at the same offset in the peer's runtime view before the
    /// peer is told about the message.
    fn send(&self, peer: usize, msg: &[u8], page: Option<Span>) -> Result<(), TransportError>;
    /// Sends several control messages to `peer`, in order, as that many [`Transport::send`]s
    /// without pages would, in as few system calls as the transport can (TCP: one `sendmsg` for
    /// up to [`SEND_BATCH`] of them). Async-signal-safe when `send` is.
    fn send_batch(&self, peer: usize, msgs: &[&[u8]]) -> Result<(), TransportError> {
        msgs.iter().try_for_each(|m| self.send(peer, m, None))
    }
    /// Starts copying `span` of `peer`'s runtime view into the same place of ours. Completion is
    /// reported by `poll` as [`Event::ReadDone`] with `token`. Called by the polling (service)
    /// thread only: an RDMA transport may register memory here, which allocates.
    fn start_read(&self, peer: usize, span: Span, token: u64) -> Result<(), TransportError>;
    /// Waits up to `timeout` (`None`: forever, `Some(ZERO)`: do not wait) for events and hands
    /// each to `handler`. Returns how many events were handled. May return at once (with 0)
    /// while a waiting thread reads the connections ([`Transport::poll_inline`]); the next call
    /// then does not wait.
    fn poll(&self, timeout: Option<Duration>, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError>;
    /// Lets a thread that waits for an answer read incoming frames itself, so no thread hand-off
    /// sits on the fault path. Each complete control message is offered to `accept`; if it
    /// returns false, the message stays queued for the next `poll` (and nothing after it on that
    /// connection is read before), and the poller is woken. Returns how many messages were
    /// taken. Never blocks; returns 0 at once if another thread is receiving. Async-signal-safe
    /// (allocation-free), provided `accept` is.
    fn poll_inline(&self, accept: &mut Accept<'_>) -> usize;
    /// Blocks until `wake` is called or `timeout` passes, ignoring the peers' connections. The
    /// wake-up may stay for the next `poll` to consume.
    fn wait_for_wake(&self, timeout: Duration);
    /// Makes the current or next `poll` (or `wait_for_wake`) return promptly. Async-signal-safe.
    fn wake(&self);
    /// Says goodbye to every peer: after this, their closing connections are expected.
    fn say_goodbye(&self) -> Result<(), TransportError>;
    /// Copies `span` of `peer`'s runtime view into ours right now, if that needs no allocation
    /// (RDMA: the memory is registered and the peer's key is known), and returns true once the
    /// bytes are in. Returns false, having done nothing, when it cannot: then use `start_read`.
    /// Async-signal-safe: a faulting thread reads its page itself.
    fn read_inline(&self, peer: usize, span: Span) -> bool {
        let _ = (peer, span);
        false
    }
    /// In a child that a member forked (which is not a member of the job): closes this
    /// transport's descriptors without a word to anybody, so that the child holds no
    /// connection of its parent open (a parent that dies is then noticed as before). The child
    /// never uses the transport afterwards. Called from the child's only thread right after
    /// `fork`: async-signal-safe.
    fn close_in_forked_child(&self) {}
    /// Waits at most `wait` until what was sent has left this process, so that exiting right
    /// after cannot drop it (RDMA: sends still in the send queue die with the process; TCP: the
    /// kernel delivers what was written, so nothing to wait for). Errors are ignored.
    fn drain_sends(&self, _wait: Duration) {}
    /// Whether a connection to `peer` exists now. Connections may be made on first use (TCP), so
    /// a peer this process never talked to has none: it expects no goodbye, and only peers
    /// linked to us learn of a loss from us directly.
    fn linked(&self, peer: usize) -> bool {
        peer != self.rank() && peer < self.size()
    }
    /// True when [`Transport::start_read`] is one-sided (RDMA READ: the peer's CPU does nothing),
    /// so that the engine should let requesters read pages rather than push them with `send`.
    fn one_sided_reads(&self) -> bool {
        false
    }
    /// True when a hole punched in the heap's memfd reaches every reader of this process's
    /// memory: what a peer reads of a page afterwards is the page there now (TCP copies out of the
    /// mapping; RDMA only when the heap is registered with on-demand paging). Only then may the
    /// runtime give memory of the heap back to the system: a pinned registration stays on the old
    /// physical page, and a peer would read stale contents there.
    fn holes_reach_readers(&self) -> bool {
        true
    }
}

/// What a waiting thread does with an incoming message in [`Transport::poll_inline`]:
/// `(sender, message, attached page) -> taken?`.
pub type Accept<'a> = dyn FnMut(usize, &[u8], Option<Span>) -> bool + 'a;

/// Most messages one [`Transport::send_batch`] hands to the kernel at once.
pub const SEND_BATCH: usize = 16;

/// Largest control message a transport must carry.
pub const MAX_MESSAGE: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_reasons_name_rdma_failures() {
        assert_eq!(LostReason::Verbs("ibv_post_send failed").to_string(), "RDMA: ibv_post_send failed");
        let retry = LostReason::Completion(12).to_string();
        assert!(retry.contains("retry counter exceeded"), "{retry}");
        assert!(LostReason::Completion(999).to_string().contains("unknown status"));
    }
}
