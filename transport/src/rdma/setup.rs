//! Bringing up the RDMA transport over the start-up TCP connections: every rank tells rank 0
//! whether it has RDMA, and rank 0 tells every rank what the job runs on. With `--transport auto`
//! every process so picks the same. Queue pairs are made later, on first use ([`super::links`]);
//! here are the pieces they are made of.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::CompletionChannel;
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{QueuePair, QueuePairAttribute, QueuePairState, QueuePairType};
use sideway::ibverbs::AccessFlags;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::device::{check_memlock, Port, RdmaError};
use super::links::{Connector, TAG_ENDPOINT};
use super::queues::CompletionQueues;
use super::{
    Buffers, Chunks, Completions, Link, RdmaTransport, Receivers, SendRing, Shared, CHUNK, RECV_DEPTH, RECV_FIRST,
    SEND_DEPTH,
};
use crate::tcp::TcpTransport;
use crate::{MemoryView, Transport, TransportError};

/// "I have RDMA", then the length of our heap view (u64, little-endian; to rank 0).
const TAG_HAVE: &[u8; 4] = b"GR1H";
/// "I have no RDMA", then why (to rank 0).
const TAG_NONE: &[u8; 4] = b"GR1N";
/// Rank 0's verdict: then 0 (RDMA), 1 and which rank has none and why (TCP, or the end of a
/// job that requires RDMA), or 2 and why the job cannot start.
const TAG_VERDICT: &[u8; 4] = b"GR1V";

/// The outcome of [`connect`].
pub enum Connected {
    /// Every process has RDMA: the transport is up (its connections are made on first use).
    Rdma(Box<RdmaTransport>),
    /// Some process has no RDMA (only with `required == false`): stay on TCP. The text names the
    /// rank and the reason.
    Tcp(TcpTransport, String),
}

/// What one process tells another about its end of their queue pair.
#[derive(Clone, Copy, Debug)]
pub(super) struct Endpoint {
    gid: [u8; 16],
    lid: u16,
    qpn: u32,
    psn: u32,
    mtu: u32,
    view_base: u64,
    pub(super) view_len: u64,
}

/// An [`Endpoint`] message's layout: the tag, then the fields.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct WireEndpoint {
    tag: [u8; 4],
    gid: [u8; 16],
    lid: U16,
    qpn: U32,
    psn: U32,
    mtu: U32,
    view_base: U64,
    view_len: U64,
}

const _: () = assert!(std::mem::size_of::<WireEndpoint>() == 4 + 16 + 2 + 4 + 4 + 4 + 8 + 8);

impl Endpoint {
    pub(super) fn encode(&self) -> Vec<u8> {
        let w = WireEndpoint {
            tag: *TAG_ENDPOINT,
            gid: self.gid,
            lid: self.lid.into(),
            qpn: self.qpn.into(),
            psn: self.psn.into(),
            mtu: self.mtu.into(),
            view_base: self.view_base.into(),
            view_len: self.view_len.into(),
        };
        w.as_bytes().to_vec()
    }

    /// The endpoint in `b`, or `None` if `b` is not exactly one endpoint message.
    pub(super) fn decode(b: &[u8]) -> Option<Endpoint> {
        let w = WireEndpoint::ref_from_bytes(b).ok()?;
        if w.tag != *TAG_ENDPOINT {
            return None;
        }
        Some(Endpoint {
            gid: w.gid,
            lid: w.lid.get(),
            qpn: w.qpn.get(),
            psn: w.psn.get(),
            mtu: w.mtu.get(),
            view_base: w.view_base.get(),
            view_len: w.view_len.get(),
        })
    }
}

/// The endpoint message's codec for the fuzz targets in `runtime/fuzz`: not part of the API
/// (re-exported by `crate::fuzzing`).
#[doc(hidden)]
pub mod fuzzing {
    /// `Endpoint::decode`, then `Endpoint::encode` of what it decoded: the bytes an accepted
    /// message stands for.
    pub fn endpoint_round_trip(b: &[u8]) -> Option<Vec<u8>> {
        super::Endpoint::decode(b).map(|e| e.encode())
    }
}

fn setup_err(rank: usize, what: impl std::fmt::Display) -> TransportError {
    TransportError::Bootstrap(format!("rank {rank}: RDMA set-up: {what}"))
}

/// Waits until `until` for one message of each rank in `from` that `take` recognizes (others stay
/// queued for the service thread: a peer that has already decided may be sending the engine's
/// first messages).
fn gather<T>(
    tcp: &TcpTransport,
    from: &[usize],
    until: Instant,
    take: &dyn Fn(&[u8]) -> Option<T>,
) -> Result<Vec<(usize, T)>, TransportError> {
    let me = tcp.rank();
    let mut got: Vec<Option<T>> = (0..tcp.size()).map(|_| None).collect();
    while from.iter().any(|r| got[*r].is_none()) {
        if Instant::now() >= until {
            let missing: Vec<String> = from.iter().filter(|r| got[**r].is_none()).map(|r| r.to_string()).collect();
            return Err(setup_err(me, format!("no answer from rank(s) {} in time", missing.join(", "))));
        }
        let taken = tcp.poll_inline(&mut |peer, bytes, _| {
            if !from.contains(&peer) || got[peer].is_some() {
                return false;
            }
            match take(bytes) {
                Some(t) => {
                    got[peer] = Some(t);
                    true
                }
                None => false,
            }
        });
        if taken == 0 {
            // (A peer that dies here shows as missing at the deadline.)
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(got.into_iter().enumerate().filter_map(|(r, t)| Some((r, t?))).collect())
}

/// What a rank told rank 0.
enum Have {
    /// RDMA, with a heap view of this many bytes.
    Rdma(u64),
    /// No RDMA, and why.
    None(String),
}

/// Everything of the transport but the connections, created before we know whether the peers
/// have RDMA.
struct Parts {
    port: Port,
    pd: Arc<ProtectionDomain>,
    channel: Arc<CompletionChannel>,
    cqs: CompletionQueues,
    bufs: Buffers,
    /// Peers that may become busy (at most every peer).
    busy_limit: usize,
}

/// Brings up RDMA on top of the start-up connections. `port` is this process's opened port, or
/// why it has none. With `required`, any process without RDMA fails the job with that process's
/// reason; otherwise the job stays on TCP. `link_timeout` bounds the making of one connection.
pub fn connect(
    tcp: TcpTransport,
    view: MemoryView,
    port: Result<Port, RdmaError>,
    required: bool,
    timeout: Duration,
    link_timeout: Duration,
) -> Result<Connected, TransportError> {
    let (me, size) = (tcp.rank(), tcp.size());
    let deadline = Instant::now() + timeout;
    // Resources first: a failure here is this rank's reason for having no RDMA.
    let parts: Result<Parts, String> = match port {
        Ok(p) => prepare(p, size).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    // Rank 0 hears every rank, and tells every rank the verdict: the first rank without RDMA.
    let verdict: Option<String> = if me == 0 {
        let others: Vec<usize> = (1..size).collect();
        let said = gather(&tcp, &others, deadline, &|b| {
            if let Some(len) = b.strip_prefix(TAG_HAVE) {
                Some(Have::Rdma(u64::from_le_bytes(len.try_into().ok()?)))
            } else {
                b.strip_prefix(TAG_NONE).map(|why| Have::None(String::from_utf8_lossy(why).into_owned()))
            }
        })?;
        // Queue pairs connect only ranks whose heap views are alike: a difference fails the job.
        let differs = said.iter().find_map(|(r, h)| match h {
            Have::Rdma(len) if *len != view.len as u64 => {
                Some(format!("rank {r} has a heap view of {len} bytes, rank 0 of {}", view.len))
            }
            _ => None,
        });
        let ours = parts.as_ref().err().map(|why| (0, why.clone()));
        let theirs = said.into_iter().filter_map(|(r, h)| match h {
            Have::None(why) => Some((r, why)),
            Have::Rdma(_) => None,
        });
        let verdict = ours.into_iter().chain(theirs).min_by_key(|m| m.0).map(|(r, why)| format!("rank {r}: {why}"));
        let msg = match (&differs, &verdict) {
            (Some(text), _) => [&TAG_VERDICT[..], &[2], text.as_bytes()].concat(),
            (None, None) => [&TAG_VERDICT[..], &[0]].concat(),
            (None, Some(text)) => [&TAG_VERDICT[..], &[1], text.as_bytes()].concat(),
        };
        for peer in 1..size {
            tcp.send(peer, &msg, None)?;
        }
        if let Some(text) = differs {
            return Err(setup_err(me, text));
        }
        verdict
    } else {
        let msg = match &parts {
            Ok(_) => [&TAG_HAVE[..], &(view.len as u64).to_le_bytes()].concat(),
            Err(why) => [&TAG_NONE[..], why.as_bytes()].concat(),
        };
        tcp.send(0, &msg, None)?;
        let said = gather(&tcp, &[0], deadline, &|b| match b.strip_prefix(TAG_VERDICT)? {
            [0] => Some(Ok(None)),
            [1, text @ ..] => Some(Ok(Some(String::from_utf8_lossy(text).into_owned()))),
            [2, text @ ..] => Some(Err(String::from_utf8_lossy(text).into_owned())),
            _ => None,
        })?;
        match said.into_iter().next() {
            Some((_, Ok(verdict))) => verdict,
            Some((_, Err(text))) => return Err(setup_err(me, text)),
            None => return Err(setup_err(me, "no verdict from rank 0")),
        }
    };
    if let Some(text) = verdict {
        if required {
            return Err(TransportError::Bootstrap(format!("--transport rdma: {text}")));
        }
        return Ok(Connected::Tcp(tcp, text));
    }
    let parts = parts.map_err(|why| setup_err(me, format!("rank 0 chose RDMA, but we have none: {why}")))?;
    tcp.watch_fd(parts.channel.as_raw_fd())?;
    let count = view.len.div_ceil(CHUNK);
    // With a page check, page contents wait in a staging buffer of one page until their message
    // has been checked.
    let staging = if tcp.owed().is_some() { crate::sys::page_size() } else { 0 };
    let shared = Shared {
        rank: me,
        size,
        view,
        owed: tcp.owed(),
        tcp,
        port: parts.port,
        pd: parts.pd,
        channel: parts.channel,
        cqs: parts.cqs,
        conn: Connector::new(size, link_timeout),
        bufs: parts.bufs,
        recv: Receivers::new(size),
        staging,
        completions: Mutex::new(Completions { reads_done: VecDeque::new() }),
        service_reads: AtomicU64::new(0),
        chunks: Chunks {
            local: zeroed_atomics(count),
            count,
            regions: Mutex::new(Vec::new()),
            waiting: Mutex::new(Vec::new()),
            asked: Mutex::new(std::collections::HashSet::new()),
        },
        busy_wanted: AtomicBool::new(false),
        busy_limit: parts.busy_limit,
        busy_count: AtomicUsize::new(0),
        busy_refused: AtomicBool::new(false),
        tcp_checked: AtomicU64::new(0),
    };
    Ok(Connected::Rdma(Box::new(RdmaTransport::start(shared)?)))
}

/// `n` atomics at 0, in memory the kernel zeroes lazily (a large heap has thousands of chunks).
fn zeroed_atomics(n: usize) -> Box<[AtomicU64]> {
    // SAFETY: all-zero bytes are a valid AtomicU64.
    unsafe { Box::<[AtomicU64]>::new_zeroed_slice(n).assume_init() }
}

/// A start packet sequence number for the queue pair from `from` to `to` (any 24-bit value works).
fn psn(from: usize, to: usize) -> u32 {
    ((from as u32).wrapping_mul(2_654_435_761) ^ (to as u32).wrapping_mul(40_503)) & 0x00ff_ffff
}

fn verbs<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> RdmaError {
    move |e| RdmaError::verbs(what, std::io::Error::other(e.to_string()))
}

/// Creates the protection domain and the completion queues (which grow with the queue pairs made:
/// see [`CompletionQueues`]).
fn prepare(port: Port, size: usize) -> Result<Parts, RdmaError> {
    let busy_limit = port.busy_peers.min(size.saturating_sub(1));
    // The first message buffers and, unless the heap is registered on demand (not pinned), its
    // first chunk.
    check_memlock(Buffers::FIRST_LEN + if port.on_demand { 0 } else { CHUNK })?;
    let pd = port.ctx.alloc_pd().map_err(verbs("ibv_alloc_pd"))?;
    let channel = port.ctx.create_comp_channel().map_err(verbs("ibv_create_comp_channel"))?;
    let fd = channel.as_raw_fd();
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
    let cqs = CompletionQueues::create(&port, &channel, size, busy_limit)?;
    Ok(Parts { port, pd, channel, cqs, bufs: Buffers::new(size), busy_limit })
}

/// A queue pair to `peer` in INIT, its first receives posted (its first buffers exist).
pub(super) fn new_link(
    pd: &Arc<ProtectionDomain>,
    port: &Port,
    cqs: &CompletionQueues,
    bufs: &Buffers,
    peer: usize,
    chunks: usize,
) -> Result<Link, RdmaError> {
    let mut qp = pd
        .create_qp_builder()
        .setup_qp_type(QueuePairType::ReliableConnection)
        .setup_max_send_wr(SEND_DEPTH as u32)
        .setup_max_recv_wr(RECV_DEPTH as u32)
        .setup_max_send_sge(1)
        .setup_max_recv_sge(1)
        .setup_send_cq(cqs.send().clone())
        .setup_recv_cq(cqs.recv().clone())
        .build()
        .map_err(verbs("ibv_create_qp"))?;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init)
        .setup_pkey_index(0)
        .setup_port(port.port)
        // Reads and sends only: a peer may not write into this process.
        .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteRead);
    qp.modify(&attr).map_err(verbs("moving a queue pair to INIT"))?;
    let link = Link {
        qp,
        send: Mutex::new(SendRing { posted: 0, sealer: None, wide: false }),
        completed: AtomicU64::new(0),
        tokens: (0..SEND_DEPTH).map(|_| AtomicU64::new(super::NO_TOKEN)).collect(),
        remote_base: AtomicU64::new(0),
        rkeys: zeroed_atomics(chunks),
        left: AtomicBool::new(false),
        lost: AtomicU32::new(0),
        wants_busy: AtomicBool::new(false),
        peer_busy: AtomicBool::new(false),
        widened: AtomicBool::new(false),
    };
    for i in 0..RECV_FIRST {
        // Nobody else knows this queue pair yet: no receive lock needed.
        super::post_recv_raw(link.raw_qp(), bufs, peer, i)
            .map_err(|rc| RdmaError::verbs("ibv_post_recv", std::io::Error::from_raw_os_error(rc)))?;
    }
    Ok(link)
}

/// What we tell `peer` about our end of the queue pair `link`.
pub(super) fn endpoint_of(port: &Port, link: &Link, me: usize, peer: usize, view: MemoryView) -> Endpoint {
    Endpoint {
        gid: port.gid.raw,
        lid: port.lid,
        qpn: link.qp.qp_number(),
        psn: psn(me, peer),
        mtu: port.mtu as u32,
        view_base: view.base as u64,
        view_len: view.len as u64,
    }
}

/// Moves the queue pair `link` to `peer` through RTR to RTS.
pub(super) fn connect_qp(port: &Port, link: &mut Link, me: usize, peer: usize, ep: &Endpoint) -> Result<(), RdmaError> {
    link.remote_base.store(ep.view_base, std::sync::atomic::Ordering::Release);
    let mtu = Mtu::from(ep.mtu.min(port.mtu as u32));
    let mut av = AddressHandleAttribute::new();
    av.setup_port(port.port).setup_service_level(0);
    if port.ethernet {
        av.setup_grh(&Gid { raw: ep.gid }, 0, port.gid_index as u8, 1, 0);
    } else {
        av.setup_dest_lid(ep.lid);
    }
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToReceive)
        .setup_path_mtu(mtu)
        .setup_dest_qp_num(ep.qpn)
        .setup_rq_psn(ep.psn)
        .setup_max_dest_read_atomic(port.max_rd_atomic)
        .setup_min_rnr_timer(1)
        .setup_address_vector(&av);
    link.qp.modify(&attr).map_err(verbs("moving a queue pair to RTR"))?;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToSend)
        .setup_sq_psn(psn(me, peer))
        // ~0.5 s per try (4.096 us << 17), 6 retries: a busy (or emulated) peer is not declared dead;
        // a dead one is noticed sooner anyway, by its TCP connection closing.
        .setup_timeout(17)
        // Not 7: Soft-RoCE (rxe_comp.c) takes 7 as "retry for ever", and a dead peer would
        // never fail a SEND or READ.
        .setup_retry_cnt(6)
        .setup_rnr_retry(7)
        .setup_max_read_atomic(port.max_rd_atomic);
    link.qp.modify(&attr).map_err(verbs("moving a queue pair to RTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_and_rejects_garbage() {
        let ep = Endpoint {
            gid: [7; 16],
            lid: 3,
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            mtu: 3,
            view_base: 0x7f00_0000_0000,
            view_len: 16 << 30,
        };
        let bytes = ep.encode();
        let back = Endpoint::decode(&bytes).expect("decodes");
        assert_eq!((back.gid, back.lid, back.qpn, back.psn), (ep.gid, ep.lid, ep.qpn, ep.psn));
        assert_eq!((back.mtu, back.view_base, back.view_len), (ep.mtu, ep.view_base, ep.view_len));
        assert!(Endpoint::decode(&bytes[..bytes.len() - 1]).is_none(), "short");
        assert!(Endpoint::decode(&[bytes.as_slice(), &[0]].concat()).is_none(), "long");
        assert!(Endpoint::decode(super::super::links::TAG_READY).is_none());
        let mut wrong_tag = bytes.clone();
        wrong_tag[0] = b'X';
        assert!(Endpoint::decode(&wrong_tag).is_none());
        for n in 0..bytes.len() {
            assert!(Endpoint::decode(&bytes[..n]).is_none(), "truncated to {n}");
        }
        assert!(Endpoint::decode(&[0xa5; 50]).is_none(), "garbage");
        // The layout: tag, gid, then little-endian fields, unpadded.
        assert_eq!(bytes.len(), 50);
        assert_eq!(&bytes[..4], TAG_ENDPOINT);
        assert_eq!(&bytes[4..20], &[7; 16]);
        assert_eq!(&bytes[20..26], &[3, 0, 0x56, 0x34, 0x12, 0]);
        assert_eq!(&bytes[46..50], &[4, 0, 0, 0]);
    }

    #[test]
    fn packet_sequence_numbers_are_24_bits_and_differ_by_direction() {
        for from in 0..64 {
            for to in 0..64 {
                assert!(psn(from, to) <= 0x00ff_ffff);
            }
        }
        assert_ne!(psn(0, 1), psn(1, 0));
    }
}
