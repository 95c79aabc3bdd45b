//! The RDMA transport between two or three ranks of one process (one thread each), the way
//! `tests/tcp.rs` tests TCP: every rank establishes its TCP connections, then upgrades them with
//! `rdma::connect`.
//!
//! Most tests need an RDMA device (`/sys/class/infiniband`): without one they print `SKIP ...` and
//! pass. Run them in the Soft-RoCE guest:
//!
//! ```sh
//! CARGO_TARGET_DIR=target/rdma cargo test --release -p gallocy-transport --features rdma --test rdma --no-run
//! soft-roce-setup/in-guest.sh --timeout 600 -- env CARGO_TARGET_DIR=target/rdma \
//!     cargo test --offline --release -p gallocy-transport --features rdma --test rdma
//! ```
//!
//! The tests that make sense without a device (the TCP fallback of `rdma::connect`, `rdma::open`'s
//! `NoDevice`) run everywhere. No test can hang: every wait has a deadline, a rank that fails
//! releases the others, and the test thread gives up on a job after [`JOB_LIMIT`]. Tests that can
//! leave a thread stuck inside the transport (a peer vanishing under a blocked sender or an inline
//! reader, two ranks blocked sending to each other) run their job in a child process
//! ([`run_in_child`]: the ignored `child_*` tests), which is killed at its time limit.
#![cfg(feature = "rdma")]

use std::any::Any;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gallocy_transport::rdma::{self, Connected, OnDemand, RdmaConfig, RdmaError, RdmaTransport, CHUNK};
use gallocy_transport::tcp::{establish, PageCheck, TcpConfig, TcpTransport};
use gallocy_transport::{frame, Event, MemoryView, Span, Transport, TransportError, MAX_MESSAGE};

/// Each rank's runtime view: 8 chunks of registration.
const VIEW: usize = 16 << 20;
const PAGE: usize = 4096;
/// How long start-up (TCP, then RDMA) may take.
const SETUP: Duration = Duration::from_secs(30);
/// How long making one connection may take.
const LINK: Duration = Duration::from_secs(10);
/// How long a rank waits for the others at a gate.
const GATE: Duration = Duration::from_secs(60);
/// The test thread gives up on a job after this long (the ranks' own deadlines are shorter).
const JOB_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One test at a time: the guest has 2 emulated CPUs, and Soft-RoCE's work runs on them too.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// True if the kernel has an RDMA device (what libibverbs would list).
fn has_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// The first RDMA device's name, if any.
fn first_device() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Prints why a test does nothing here; true if it must skip.
fn skip_without_device(test: &str) -> bool {
    if has_device() {
        return false;
    }
    eprintln!(
        "SKIP {test}: no RDMA device on this machine (run it in the Soft-RoCE guest: soft-roce-setup/in-guest.sh)"
    );
    true
}

/// A loopback port held for one job's coordinator (rank 0 joins the hold) until dropped.
fn hold_port() -> gallocy_transport::coordinator::PortHold {
    gallocy_transport::coordinator::PortHold::loopback().unwrap()
}

/// A fresh zeroed anonymous mapping of `VIEW` bytes (unmapped by [`unmap`]).
fn map_view() -> MemoryView {
    // SAFETY: a new private anonymous mapping; checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            VIEW,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of the test view failed");
    MemoryView { base: p.cast(), len: VIEW }
}

fn unmap(v: MemoryView) {
    // SAFETY: a mapping made by map_view; its transport (and so every registration) is gone.
    unsafe { libc::munmap(v.base.cast(), v.len) };
}

/// The bytes of `span` in `v`.
fn bytes(v: MemoryView, span: Span) -> &'static mut [u8] {
    assert!(span.offset as usize + span.len as usize <= v.len);
    // SAFETY: in range (checked); each test coordinates who touches which bytes.
    unsafe { std::slice::from_raw_parts_mut(v.base.add(span.offset as usize), span.len as usize) }
}

/// Deterministic, position-dependent contents: a shifted or reordered fragment shows.
fn pattern_byte(seed: u64, j: usize) -> u8 {
    let x = (j as u64 ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(seed);
    (x >> 56) as u8
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| pattern_byte(seed, j)).collect()
}

fn fill(v: MemoryView, span: Span, seed: u64) {
    for (j, b) in bytes(v, span).iter_mut().enumerate() {
        *b = pattern_byte(seed, j);
    }
}

fn holds(v: MemoryView, span: Span, seed: u64) -> bool {
    bytes(v, span).iter().enumerate().all(|(j, b)| *b == pattern_byte(seed, j))
}

/// A barrier with a deadline that a failing rank breaks, so no rank waits for a dead one.
struct Gate {
    size: usize,
    state: Mutex<(usize, u64, bool)>, // arrived, generation, broken
    cv: Condvar,
}

impl Gate {
    fn new(size: usize) -> Gate {
        Gate { size, state: Mutex::new((0, 0, false)), cv: Condvar::new() }
    }

    /// Waits for every rank; false if the gate broke or `limit` passed (which breaks it).
    fn wait(&self, limit: Duration) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.2 {
            return false;
        }
        let generation = s.1;
        s.0 += 1;
        if s.0 == self.size {
            s.0 = 0;
            s.1 += 1;
            self.cv.notify_all();
            return true;
        }
        let deadline = Instant::now() + limit;
        while s.1 == generation && !s.2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.2 = true;
                self.cv.notify_all();
                return false;
            }
            s = self.cv.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.1 != generation
    }

    /// Waits for every rank or panics.
    fn sync(&self, rank: usize, what: &str) {
        assert!(self.wait(GATE), "rank {rank}: gate {what:?}: another rank failed or did not arrive in time");
    }

    fn break_all(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.2 = true;
        self.cv.notify_all();
    }
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_else(|| "(panic)".into()),
    }
}

/// Starts `size` ranks, each on its own thread with its own view and established TCP transport,
/// and runs `body` on each. What `body` returns is dropped only after every rank's body returned
/// (a body that wants its transport gone drops it itself). Panics with every failing rank's
/// message.
fn run_ranks<K, F>(size: usize, body: F)
where
    F: Fn(usize, TcpTransport, MemoryView, &Gate) -> K + Send + Sync + 'static,
{
    run_ranks_with(size, None, body)
}

/// Like [`run_ranks`], with the page check `owed` on every rank.
fn run_ranks_with<K, F>(size: usize, owed: Option<PageCheck>, body: F)
where
    F: Fn(usize, TcpTransport, MemoryView, &Gate) -> K + Send + Sync + 'static,
{
    let hold = hold_port();
    let port = hold.port();
    let body = Arc::new(body);
    let gate = Arc::new(Gate::new(size));
    let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let started = Instant::now();
    for rank in 0..size {
        let (body, gate, tx) = (body.clone(), gate.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("rank{rank}"))
            .spawn(move || {
                let view = map_view();
                let cfg = TcpConfig {
                    rank,
                    size,
                    coordinator: format!("127.0.0.1:{port}"),
                    coordinator_held: true,
                    bind: "127.0.0.1".parse().unwrap(),
                    token: b"secret".to_vec(),
                    view,
                    setup_timeout: SETUP,
                    link_timeout: SETUP,
                    thread_start: || {},
                    owed,
                    serves: None,
                };
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let tcp = establish(&cfg, b"hello", &|_| Ok(()))
                        .unwrap_or_else(|e| panic!("rank {rank}: TCP start-up failed: {e}"));
                    body(rank, tcp, view, &gate)
                }));
                let result = match outcome {
                    Ok(kept) => {
                        gate.wait(GATE);
                        drop(kept);
                        Ok(())
                    }
                    Err(p) => {
                        gate.break_all();
                        Err(panic_text(p))
                    }
                };
                unmap(view);
                let _ = tx.send((rank, result));
            })
            .unwrap();
    }
    drop(tx);
    let mut failures = Vec::new();
    let mut finished = HashSet::new();
    while finished.len() < size {
        let left = JOB_LIMIT.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok((rank, r)) => {
                finished.insert(rank);
                if let Err(e) = r {
                    failures.push(format!("rank {rank}: {e}"));
                }
            }
            Err(_) => {
                gate.break_all();
                let missing: Vec<_> = (0..size).filter(|r| !finished.contains(r)).collect();
                failures.push(format!("ranks {missing:?} did not finish within {JOB_LIMIT:?} (left running)"));
                break;
            }
        }
    }
    assert!(failures.is_empty(), "job failed:\n{}", failures.join("\n"));
}

/// Like [`run_ranks`], with every rank on RDMA (`rdma::connect` with `required`) before `body`.
fn rdma_job<F>(size: usize, body: F)
where
    F: Fn(usize, Box<RdmaTransport>, MemoryView, &Gate) -> Option<Box<RdmaTransport>> + Send + Sync + 'static,
{
    rdma_job_with_view(size, VIEW, body);
}

/// Like [`rdma_job`], with the page check `owed` on every rank.
fn rdma_job_owed<F>(size: usize, owed: PageCheck, body: F)
where
    F: Fn(usize, Box<RdmaTransport>, MemoryView, &Gate) -> Option<Box<RdmaTransport>> + Send + Sync + 'static,
{
    run_ranks_with(size, Some(owed), move |rank, tcp, view, gate| {
        let port = rdma::open(&RdmaConfig::default()).unwrap_or_else(|e| panic!("rank {rank}: rdma::open: {e}"));
        let t = match rdma::connect(tcp, view, Ok(port), true, SETUP, LINK) {
            Ok(Connected::Rdma(t)) => t,
            Ok(Connected::Tcp(_, why)) => panic!("rank {rank}: rdma::connect stayed on TCP: {why}"),
            Err(e) => panic!("rank {rank}: rdma::connect: {e}"),
        };
        body(rank, t, view, gate)
    });
}

/// Like [`rdma_job`], with runtime views of `len` (at most [`VIEW`]) bytes.
fn rdma_job_with_view<F>(size: usize, len: usize, body: F)
where
    F: Fn(usize, Box<RdmaTransport>, MemoryView, &Gate) -> Option<Box<RdmaTransport>> + Send + Sync + 'static,
{
    rdma_job_configured(size, len, |_| RdmaConfig::default(), body);
}

/// Like [`rdma_job_with_view`], with each rank's RDMA configuration from `config(rank)`.
fn rdma_job_configured<F>(size: usize, len: usize, config: fn(usize) -> RdmaConfig, body: F)
where
    F: Fn(usize, Box<RdmaTransport>, MemoryView, &Gate) -> Option<Box<RdmaTransport>> + Send + Sync + 'static,
{
    assert!(len <= VIEW);
    run_ranks(size, move |rank, tcp, view, gate| {
        let view = MemoryView { base: view.base, len };
        let port = rdma::open(&config(rank)).unwrap_or_else(|e| panic!("rank {rank}: rdma::open: {e}"));
        let t = match rdma::connect(tcp, view, Ok(port), true, SETUP, LINK) {
            Ok(Connected::Rdma(t)) => t,
            Ok(Connected::Tcp(_, why)) => panic!("rank {rank}: rdma::connect stayed on TCP: {why}"),
            Err(e) => panic!("rank {rank}: rdma::connect: {e}"),
        };
        body(rank, t, view, gate)
    });
}

/// An event, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Msg(usize, Vec<u8>, Option<Span>),
    Read(usize, u64),
    Left(usize),
}

fn own(ev: Event<'_>) -> Ev {
    match ev {
        Event::Message { from, bytes, page } => Ev::Msg(from, bytes.to_vec(), page),
        Event::ReadDone { from, token } => Ev::Read(from, token),
        Event::PeerLeft { rank } => Ev::Left(rank),
    }
}

/// Polls until `n` events were collected; panics after `secs` or on a poll error.
fn collect(t: &dyn Transport, n: usize, secs: u64) -> Vec<Ev> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "rank {}: timed out after {secs} s with {} of {n} events (last: {:?})",
            t.rank(),
            out.len(),
            out.last()
        );
        if let Err(e) = t.poll(Some(Duration::from_millis(10)), &mut |ev| out.push(own(ev))) {
            panic!("rank {}: poll failed with {} of {n} events: {e}", t.rank(), out.len());
        }
    }
    out
}

/// Polls until a message `msg` from `from` arrives (other events are ignored).
fn await_msg(t: &dyn Transport, from: usize, msg: &[u8], secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = false;
    while !seen {
        assert!(Instant::now() < deadline, "rank {}: no {:?} from rank {from} within {secs} s", t.rank(), msg);
        t.poll(Some(Duration::from_millis(10)), &mut |ev| {
            if let Event::Message { from: f, bytes, .. } = ev {
                seen |= f == from && bytes == msg;
            }
        })
        .unwrap_or_else(|e| panic!("rank {}: poll failed waiting for {msg:?}: {e}", t.rank()));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Messages
// ---------------------------------------------------------------------------------------------

/// Around one fragment's payload (1008 B), several fragments, the largest message.
const SIZES: [usize; 8] = [0, 1, 1007, 1008, 1009, 3000, 64 << 10, MAX_MESSAGE];

#[test]
fn messages_of_every_size_arrive_intact_and_in_order_both_ways() {
    let _g = serial();
    if skip_without_device("messages_of_every_size_arrive_intact_and_in_order_both_ways") {
        return;
    }
    const ROUNDS: usize = 3;
    let t0 = Instant::now();
    rdma_job(2, |rank, t, _v, gate| {
        let peer = 1 - rank;
        gate.sync(rank, "up");
        let seed = |from: usize, k: usize| (from as u64) << 32 | k as u64;
        std::thread::scope(|s| {
            let tr = &*t;
            s.spawn(move || {
                for k in 0..ROUNDS * SIZES.len() {
                    let msg = pattern(seed(rank, k), SIZES[k % SIZES.len()]);
                    tr.send(peer, &msg, None).unwrap_or_else(|e| panic!("rank {rank}: send {k}: {e}"));
                }
            });
            let got = collect(tr, ROUNDS * SIZES.len(), 40);
            for (k, ev) in got.iter().enumerate() {
                let Ev::Msg(from, bytes, page) = ev else { panic!("rank {rank}: event {k} is {ev:?}") };
                assert_eq!((*from, *page), (peer, None), "rank {rank}: message {k}");
                assert_eq!(bytes.len(), SIZES[k % SIZES.len()], "rank {rank}: message {k} has the wrong length");
                assert!(*bytes == pattern(seed(peer, k), bytes.len()), "rank {rank}: message {k} corrupted");
            }
        });
        // Arguments the transport refuses, without sending anything.
        let too_long = vec![0u8; MAX_MESSAGE + 1];
        assert!(
            matches!(t.send(peer, &too_long, None), Err(TransportError::MessageTooLong(n)) if n == MAX_MESSAGE + 1)
        );
        assert!(matches!(t.send(rank, b"me", None), Err(TransportError::NoSuchPeer(r)) if r == rank));
        assert!(matches!(t.send(7, b"x", None), Err(TransportError::NoSuchPeer(7))));
        gate.sync(rank, "checked");
        // Nothing else arrived.
        let mut extra = Vec::new();
        t.poll(Some(Duration::from_millis(50)), &mut |ev| extra.push(own(ev))).unwrap();
        assert!(extra.is_empty(), "rank {rank}: unexpected events {extra:?}");
        Some(t)
    });
    eprintln!("messages_of_every_size: {:.1} s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// 2. Attached pages
// ---------------------------------------------------------------------------------------------

/// Spans attached to messages: one page, a span across a 2 MiB chunk boundary, 64 KiB, an
/// unaligned odd length, the largest span.
fn attached_spans() -> Vec<Span> {
    vec![
        Span { offset: 0x1_0000, len: PAGE as u32 },
        Span { offset: (CHUNK - PAGE) as u64, len: 2 * PAGE as u32 },
        Span { offset: 0x30_0000, len: 64 << 10 },
        Span { offset: 0x45_6789, len: 1009 },
        Span { offset: 0x80_0000, len: frame::MAX_SPAN },
        Span { offset: (VIEW - PAGE) as u64, len: PAGE as u32 },
    ]
}

#[test]
fn attached_pages_land_before_their_message_is_seen() {
    let _g = serial();
    if skip_without_device("attached_pages_land_before_their_message_is_seen") {
        return;
    }
    const REPEAT: u64 = 3;
    let t0 = Instant::now();
    rdma_job(2, |rank, t, v, gate| {
        gate.sync(rank, "up");
        let spans = attached_spans();
        if rank == 0 {
            // The same spans again and again with new contents: the receiver must see, when each
            // message arrives, exactly the contents sent with it.
            for rep in 0..REPEAT {
                for (i, span) in spans.iter().enumerate() {
                    let seed = rep * 100 + i as u64;
                    fill(v, *span, seed);
                    t.send(1, &seed.to_le_bytes(), Some(*span)).unwrap_or_else(|e| panic!("send {seed}: {e}"));
                }
            }
            // A message without a page between pages.
            t.send(1, b"no page", None).unwrap();
            // Spans the transport refuses.
            let refused = [
                Span { offset: 0, len: frame::MAX_SPAN + 1 },
                Span { offset: (VIEW - 100) as u64, len: 4096 },
                Span { offset: u64::MAX - 10, len: 4096 },
                Span { offset: 0, len: 0 },
            ];
            for s in refused {
                let r = t.send(1, b"bad", Some(s));
                assert!(matches!(r, Err(TransportError::BadSpan { .. })), "span {s:?} must be refused: {r:?}");
            }
            await_msg(&*t, 1, b"done", 40);
        } else {
            let want = REPEAT as usize * spans.len() + 1;
            let mut problems = Vec::new();
            let mut got = 0usize;
            let deadline = Instant::now() + Duration::from_secs(40);
            while got < want {
                assert!(Instant::now() < deadline, "rank 1: {got} of {want} messages within 40 s");
                t.poll(Some(Duration::from_millis(10)), &mut |ev| {
                    let Event::Message { from: 0, bytes, page } = ev else {
                        problems.push(format!("unexpected event {ev:?}"));
                        return;
                    };
                    if got == want - 1 {
                        if bytes != b"no page" || page.is_some() {
                            problems.push(format!("last message: {bytes:?} {page:?}"));
                        }
                        got += 1;
                        return;
                    }
                    let seed = u64::from_le_bytes(bytes.try_into().unwrap_or([0xff; 8]));
                    let expected = (got as u64 / spans.len() as u64) * 100 + (got % spans.len()) as u64;
                    let span = spans[got % spans.len()];
                    if seed != expected {
                        problems.push(format!("message {got}: seed {seed}, expected {expected}"));
                    } else if page != Some(span) {
                        problems.push(format!("message {got}: page {page:?}, expected {span:?}"));
                    } else if !holds(v, span, seed) {
                        problems.push(format!("message {got}: the page {span:?} is not in the view when seen"));
                    }
                    got += 1;
                })
                .unwrap_or_else(|e| panic!("rank 1: poll: {e}"));
            }
            assert!(problems.is_empty(), "rank 1: {problems:#?}");
            // Bytes next to the spans were not written.
            assert!(bytes(v, Span { offset: 0x1_0000 + PAGE as u64, len: 64 }).iter().all(|b| *b == 0));
            assert!(bytes(v, Span { offset: 0x45_6789 - 64, len: 64 }).iter().all(|b| *b == 0));
            t.send(0, b"done", None).unwrap();
        }
        Some(t)
    });
    eprintln!("attached_pages: {:.1} s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// 3. Reads
// ---------------------------------------------------------------------------------------------

fn page_span(chunk: usize, page: usize) -> Span {
    Span { offset: (chunk * CHUNK + page * PAGE) as u64, len: PAGE as u32 }
}

fn page_seed(chunk: usize, page: usize) -> u64 {
    0xC0DE_0000 + (chunk * 1000 + page) as u64
}

/// A page its owner gives back (`MADV_DONTNEED`: its frame goes back to the kernel, as a hole
/// punched in the runtime's heap memfd does) and then writes again: with the view registered on
/// demand, a peer's READ brings the new bytes. With it pinned (`OnDemand::Off`) the registration
/// still holds the old frame and the READ brings the old bytes, which is why the runtime gives
/// heap memory back over RDMA only with on-demand paging (`Transport::holes_reach_readers`).
#[test]
fn a_page_given_back_and_written_again_is_what_a_read_brings_only_on_demand() {
    let _g = serial();
    let test = "a_page_given_back_and_written_again_is_what_a_read_brings_only_on_demand";
    if skip_without_device(test) {
        return;
    }
    let on_demand = rdma::open(&RdmaConfig::default()).is_ok_and(|p| p.on_demand());
    if !on_demand {
        eprintln!("note: {test}: this device cannot read on-demand-paging memory; only the pinned case runs");
    }
    let on_demand_config: fn(usize) -> RdmaConfig = |_| RdmaConfig::default();
    let pinned_config: fn(usize) -> RdmaConfig = |_| RdmaConfig { on_demand: OnDemand::Off, ..RdmaConfig::default() };
    let cases = [(true, on_demand_config), (false, pinned_config)];
    for (fresh, config) in cases.into_iter().filter(|c| on_demand || !c.0) {
        let span = page_span(2, 5);
        let (old, new) = (0xAAAA, 0xBBBB);
        rdma_job_configured(2, VIEW, config, move |rank, t, v, gate| {
            gate.sync(rank, "up");
            assert_eq!(rdma::open(&config(rank)).map(|p| p.on_demand()).ok(), Some(fresh), "rank {rank}: registration");
            if rank == 0 {
                fill(v, span, old);
                gate.sync(0, "old");
                await_msg(&*t, 1, b"read", 50);
                // SAFETY: one page of this rank's own view, which only this thread touches now.
                let r = unsafe { libc::madvise(v.base.add(span.offset as usize).cast(), PAGE, libc::MADV_DONTNEED) };
                assert_eq!(r, 0, "madvise(MADV_DONTNEED)");
                assert!(bytes(v, span).iter().all(|b| *b == 0), "the page was not given back");
                fill(v, span, new);
                gate.sync(0, "new");
                await_msg(&*t, 1, b"done", 50);
                return Some(t);
            }
            gate.sync(1, "old");
            t.start_read(0, span, 1).unwrap_or_else(|e| panic!("start_read: {e}"));
            assert_eq!(collect(&*t, 1, 30), vec![Ev::Read(0, 1)]);
            let wrong: Vec<usize> = bytes(v, span)
                .iter()
                .enumerate()
                .filter(|(j, b)| **b != pattern_byte(old, *j))
                .map(|(j, _)| j)
                .collect();
            assert!(
                wrong.is_empty(),
                "the first read brought {} wrong bytes, first at {:?}, last at {:?}; zero: {}",
                wrong.len(),
                wrong.first(),
                wrong.last(),
                wrong.iter().filter(|j| bytes(v, span)[**j] == 0).count()
            );
            t.send(0, b"read", None).unwrap();
            gate.sync(1, "new");
            bytes(v, span).fill(0);
            t.start_read(0, span, 2).unwrap_or_else(|e| panic!("start_read: {e}"));
            assert_eq!(collect(&*t, 1, 30), vec![Ev::Read(0, 2)]);
            if fresh {
                assert!(holds(v, span, new), "on demand: the read after the page came back must bring the new bytes");
            } else {
                assert!(holds(v, span, old), "pinned: the registration was expected to keep the old frame");
            }
            t.send(0, b"done", None).unwrap();
            Some(t)
        });
    }
}

/// The heap's registrations and the queue pairs grant remote READ only: a peer that has a chunk's
/// key (it read from the chunk) and posts an RDMA WRITE there with it changes no byte, and its
/// connection fails with the refusal (Soft-RoCE: "remote invalid request", from the queue pair).
#[test]
fn a_peer_cannot_write_into_the_heap_with_its_read_key() {
    let _g = serial();
    if skip_without_device("a_peer_cannot_write_into_the_heap_with_its_read_key") {
        return;
    }
    let span = page_span(1, 9);
    let (theirs, ours) = (0x5151, 0x7777);
    static TRIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    TRIED.store(false, std::sync::atomic::Ordering::SeqCst);
    rdma_job(2, move |rank, t, v, gate| {
        gate.sync(rank, "up");
        if rank == 0 {
            fill(v, span, theirs);
            gate.sync(0, "filled");
            // Serve the key query (poll) until rank 1 has tried; the connection then fails.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !TRIED.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                let _ = t.poll(Some(Duration::from_millis(10)), &mut |_| {});
            }
            assert!(holds(v, span, theirs), "a peer's RDMA WRITE changed this rank's heap");
            return None;
        }
        gate.sync(1, "filled");
        t.start_read(0, span, 1).unwrap_or_else(|e| panic!("start_read: {e}"));
        assert_eq!(collect(&*t, 1, 30), vec![Ev::Read(0, 1)]);
        assert!(holds(v, span, theirs));
        fill(v, span, ours);
        t.post_write_for_test(0, span).unwrap_or_else(|e| panic!("posting the write: {e}"));
        // The write's failed completion breaks the connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        let err = loop {
            if Instant::now() >= deadline {
                TRIED.store(true, std::sync::atomic::Ordering::SeqCst);
                panic!("the refused write was never reported");
            }
            if let Err(e) = t.poll(Some(Duration::from_millis(10)), &mut |_| {}) {
                break e.to_string();
            }
        };
        TRIED.store(true, std::sync::atomic::Ordering::SeqCst);
        // Refused by the peer's queue pair (no remote write: "remote invalid request") or by its
        // registration ("remote access error"), depending on the device.
        assert!(err.contains("remote access error") || err.contains("remote invalid request"), "{err}");
        None
    });
}

/// The network device under an RDMA device (Soft-RoCE's `ndevs`), if sysfs names one.
fn netdev_of(device: &str) -> Option<String> {
    let n = std::fs::read_to_string(format!("/sys/class/infiniband/{device}/ports/1/gid_attrs/ndevs/0")).ok()?;
    Some(n.trim().to_owned()).filter(|n| !n.is_empty())
}

fn set_mtu(netdev: &str, mtu: u32) {
    let ok = std::process::Command::new("ip")
        .args(["link", "set", "dev", netdev, "mtu", &mtu.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip link set dev {netdev} mtu {mtu} failed");
}

/// Soft-RoCE copies on-demand-paging memory from the start of the page whatever a packet's offset
/// in it, so with an RDMA MTU below 4096 (a network MTU of 1500 gives 1024) `auto` keeps the heap
/// pinned and `GALLOCY_RDMA_ODP=on` is refused naming the MTU; with 4096 (network MTU 9000) both
/// register it on demand. Changes the MTU of the device under `rxe0` for the test (root, the
/// Soft-RoCE guest) and puts it back.
#[test]
fn soft_roce_uses_on_demand_paging_only_with_whole_page_packets() {
    let _g = serial();
    let test = "soft_roce_uses_on_demand_paging_only_with_whole_page_packets";
    if skip_without_device(test) {
        return;
    }
    let Some(dev) = first_device().filter(|d| d.starts_with("rxe")) else {
        eprintln!("SKIP {test}: the device here is not Soft-RoCE");
        return;
    };
    let netdev = netdev_of(&dev).unwrap_or_else(|| panic!("no network device under {dev}"));
    let old: u32 = std::fs::read_to_string(format!("/sys/class/net/{netdev}/mtu")).unwrap().trim().parse().unwrap();
    struct Restore(String, u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_mtu(&self.0, self.1);
        }
    }
    let _restore = Restore(netdev.clone(), old);
    let open = |on_demand| rdma::open(&RdmaConfig { on_demand, ..RdmaConfig::default() });
    // The port takes the new MTU at once; wait a little in case it does not.
    let settle = |want_small: bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let small = open(OnDemand::Off).unwrap().describe().contains("MTU 1024");
            if small == want_small {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the RDMA MTU of {dev} did not follow {netdev}'s");
    };
    set_mtu(&netdev, 1500);
    settle(true);
    let auto = open(OnDemand::Auto).unwrap();
    assert!(!auto.on_demand(), "auto with RDMA MTU 1024 must keep the heap pinned: {}", auto.describe());
    assert!(auto.describe().ends_with("heap pinned"), "{}", auto.describe());
    let supports = match open(OnDemand::Required) {
        Err(e @ RdmaError::SoftRoceOnDemandMtu { mtu: 1024, .. }) => {
            assert!(e.to_string().contains("GALLOCY_RDMA_ODP=on") && e.to_string().contains("4200"), "{e}");
            true
        }
        Err(e @ RdmaError::NoOnDemandPaging { .. }) => {
            eprintln!("note: {test}: {dev} has no on-demand paging at all (Linux before 6.14): {e}");
            false
        }
        Err(e) => panic!("GALLOCY_RDMA_ODP=on with RDMA MTU 1024: unexpected error {e}"),
        Ok(p) => panic!("GALLOCY_RDMA_ODP=on with RDMA MTU 1024 must be refused: {}", p.describe()),
    };
    set_mtu(&netdev, 9000);
    settle(false);
    for mode in [OnDemand::Auto, OnDemand::Required] {
        match open(mode) {
            Ok(p) => assert_eq!(p.on_demand(), supports, "{mode:?} with RDMA MTU 4096: {}", p.describe()),
            Err(e) => assert!(!supports && mode == OnDemand::Required, "{mode:?} with RDMA MTU 4096: {e}"),
        }
    }
}

/// Rank 0 fills pages `pages` of every chunk, then serves until rank 1 says "done".
fn serve_pages(t: &RdmaTransport, v: MemoryView, gate: &Gate, pages: &[usize]) {
    for chunk in 0..VIEW / CHUNK {
        for &p in pages {
            fill(v, page_span(chunk, p), page_seed(chunk, p));
        }
    }
    gate.sync(0, "filled");
    await_msg(t, 1, b"done", 50);
}

#[test]
fn reads_across_chunks_complete_with_their_tokens_then_read_inline_works_in_known_chunks() {
    let _g = serial();
    if skip_without_device("reads_across_chunks_complete_with_their_tokens_then_read_inline_works_in_known_chunks") {
        return;
    }
    let t0 = Instant::now();
    rdma_job(2, |rank, t, v, gate| {
        gate.sync(rank, "up");
        if rank == 0 {
            serve_pages(&t, v, gate, &[0, 1, 17, 300, 511]);
            return Some(t);
        }
        gate.sync(1, "filled");
        // Three pages in each of chunks 0..4, all started before any completes.
        let mut expected = HashSet::new();
        for chunk in 0..4 {
            for p in [0, 1, 17] {
                let token = (chunk * 100 + p) as u64;
                t.start_read(0, page_span(chunk, p), token).unwrap_or_else(|e| panic!("start_read {token}: {e}"));
                expected.insert((0usize, token));
            }
        }
        let got = collect(&*t, expected.len(), 30);
        let got_set: HashSet<(usize, u64)> = got
            .iter()
            .map(|e| match e {
                Ev::Read(f, tok) => (*f, *tok),
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        assert_eq!(got.len(), got_set.len(), "a token reported twice: {got:?}");
        assert_eq!(got_set, expected);
        for chunk in 0..4 {
            for p in [0, 1, 17] {
                assert!(holds(v, page_span(chunk, p), page_seed(chunk, p)), "chunk {chunk} page {p} read wrong");
            }
        }
        // The chunks are registered and their keys known: read_inline reads at once.
        for chunk in [0, 3] {
            let s = page_span(chunk, 511);
            assert!(bytes(v, s).iter().all(|b| *b == 0));
            assert!(t.read_inline(0, s), "read_inline in known chunk {chunk} must work");
            assert!(holds(v, s, page_seed(chunk, 511)), "read_inline in chunk {chunk} brought the wrong bytes");
        }
        // A chunk nothing was read from yet: nothing happens.
        let fresh = page_span(6, 0);
        assert!(!t.read_inline(0, fresh), "read_inline in a fresh chunk must decline");
        assert!(bytes(v, fresh).iter().all(|b| *b == 0), "a declined read_inline wrote bytes");
        // Spans read_inline cannot do: across a chunk boundary, outside the view, from ourselves
        // or a rank that does not exist.
        let across = Span { offset: (CHUNK - PAGE / 2) as u64, len: PAGE as u32 };
        assert!(!t.read_inline(0, across));
        assert!(!t.read_inline(0, Span { offset: VIEW as u64, len: PAGE as u32 }));
        assert!(!t.read_inline(1, page_span(0, 300)));
        assert!(!t.read_inline(5, page_span(0, 300)));
        assert!(matches!(t.start_read(0, across, 1), Err(TransportError::BadSpan { .. })));
        assert!(matches!(t.start_read(1, page_span(0, 300), 1), Err(TransportError::NoSuchPeer(1))));
        // After one start_read in chunk 6, read_inline works there too.
        t.start_read(0, page_span(6, 0), 600).unwrap();
        assert_eq!(collect(&*t, 1, 30), vec![Ev::Read(0, 600)]);
        assert!(holds(v, page_span(6, 0), page_seed(6, 0)));
        assert!(t.read_inline(0, page_span(6, 300)));
        assert!(holds(v, page_span(6, 300), page_seed(6, 300)));
        // Many inline reads in a row (send-queue slots are reused).
        for i in 0..300 {
            let p = [1, 17, 300, 511][i % 4];
            bytes(v, page_span(3, p)).fill(0);
            assert!(t.read_inline(0, page_span(3, p)), "inline read {i}");
            assert!(holds(v, page_span(3, p), page_seed(3, p)), "inline read {i} brought the wrong bytes");
        }
        t.send(0, b"done", None).unwrap();
        Some(t)
    });
    eprintln!("reads_across_chunks: {:.1} s", t0.elapsed().as_secs_f64());
}

/// The service thread may start many reads before it polls again (e.g. a burst of grants): every
/// one must be reported, however many completed meanwhile.
#[test]
fn many_reads_started_without_polling_are_all_reported() {
    let _g = serial();
    if skip_without_device("many_reads_started_without_polling_are_all_reported") {
        return;
    }
    const READS: usize = 512; // every page of one chunk; more than 2 peers × 128 send slots
    let t0 = Instant::now();
    rdma_job(2, |rank, t, v, gate| {
        gate.sync(rank, "up");
        if rank == 0 {
            serve_pages(&t, v, gate, &(0..CHUNK / PAGE).collect::<Vec<_>>());
            return Some(t);
        }
        gate.sync(1, "filled");
        // Learn chunk 1's key first, so every read below is posted at once.
        t.start_read(0, page_span(1, 0), 0).unwrap();
        assert_eq!(collect(&*t, 1, 30), vec![Ev::Read(0, 0)]);
        for p in 0..READS {
            t.start_read(0, page_span(1, p), 1000 + p as u64).unwrap_or_else(|e| panic!("start_read {p}: {e}"));
        }
        let mut tokens = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokens.len() < READS && Instant::now() < deadline {
            t.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
                Event::ReadDone { from: 0, token } => assert!(tokens.insert(token), "token {token} twice"),
                other => panic!("unexpected event {other:?}"),
            })
            .unwrap();
        }
        let arrived = (0..READS).filter(|p| holds(v, page_span(1, *p), page_seed(1, *p))).count();
        assert_eq!(
            tokens.len(),
            READS,
            "only {} of {READS} ReadDone events within 20 s, yet {arrived} of the {READS} pages are in the view",
            tokens.len()
        );
        assert_eq!(arrived, READS, "pages read wrong");
        t.send(0, b"done", None).unwrap();
        Some(t)
    });
    eprintln!("many_reads_without_polling: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Every rank reads pages owned by both others while serving their key queries: reads and key
/// queries cross in every direction at once.
#[test]
fn three_ranks_read_from_each_other_at_once() {
    let _g = serial();
    if skip_without_device("three_ranks_read_from_each_other_at_once") {
        return;
    }
    const PAGES: usize = 30; // page p of each chunk belongs to rank p % 3
    const CHUNKS: usize = 4;
    let seed = |chunk: usize, p: usize| 0xAB00_0000 + (chunk * 1000 + p) as u64;
    let t0 = Instant::now();
    rdma_job(3, move |rank, t, v, gate| {
        for chunk in 0..CHUNKS {
            for p in (0..PAGES).filter(|p| p % 3 == rank) {
                fill(v, page_span(chunk, p), seed(chunk, p));
            }
        }
        gate.sync(rank, "filled");
        let mut expected = HashSet::new();
        for chunk in 0..CHUNKS {
            for p in (0..PAGES).filter(|p| p % 3 != rank) {
                let token = (chunk * 100 + p) as u64;
                t.start_read(p % 3, page_span(chunk, p), token)
                    .unwrap_or_else(|e| panic!("rank {rank}: read {token}: {e}"));
                expected.insert((p % 3, token));
            }
        }
        // Poll (and so serve the others' key queries) until our reads are done and both others
        // said they are done with theirs.
        let (mut reads, mut dones) = (HashSet::new(), 0);
        let mut said_done = false;
        let deadline = Instant::now() + Duration::from_secs(40);
        while reads.len() < expected.len() || dones < 2 {
            assert!(
                Instant::now() < deadline,
                "rank {rank}: {} of {} reads and {dones} of 2 peers done within 40 s",
                reads.len(),
                expected.len()
            );
            t.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
                Event::ReadDone { from, token } => assert!(reads.insert((from, token)), "({from}, {token}) twice"),
                Event::Message { bytes: b"done", .. } => dones += 1,
                other => panic!("rank {rank}: unexpected {other:?}"),
            })
            .unwrap_or_else(|e| panic!("rank {rank}: poll: {e}"));
            if !said_done && reads.len() == expected.len() {
                for peer in (0..3).filter(|p| *p != rank) {
                    t.send(peer, b"done", None).unwrap();
                }
                said_done = true;
            }
        }
        assert_eq!(reads, expected, "rank {rank}");
        for chunk in 0..CHUNKS {
            for p in 0..PAGES {
                assert!(holds(v, page_span(chunk, p), seed(chunk, p)), "rank {rank}: chunk {chunk} page {p}");
            }
        }
        // Every key is known now: inline reads from both peers in every chunk, no peer polling.
        for chunk in 0..CHUNKS {
            for p in (0..PAGES).filter(|p| p % 3 != rank).take(4) {
                bytes(v, page_span(chunk, p)).fill(0);
                assert!(t.read_inline(p % 3, page_span(chunk, p)), "rank {rank}: read_inline chunk {chunk} page {p}");
                assert!(holds(v, page_span(chunk, p), seed(chunk, p)), "rank {rank}: inline chunk {chunk} page {p}");
            }
        }
        Some(t)
    });
    eprintln!("three_ranks_read: {:.1} s", t0.elapsed().as_secs_f64());
}

/// A view whose length is not a whole number of 2 MiB chunks: the last, short chunk registers,
/// can be read from and into, and takes attached pages; nothing beyond the view is accepted.
#[test]
fn a_view_that_ends_inside_a_chunk_works_to_its_last_byte() {
    let _g = serial();
    if skip_without_device("a_view_that_ends_inside_a_chunk_works_to_its_last_byte") {
        return;
    }
    const LEN: usize = 2 * CHUNK + 3 * PAGE;
    let last = |i: usize| Span { offset: (LEN - (i + 1) * PAGE) as u64, len: PAGE as u32 };
    rdma_job_with_view(2, LEN, move |rank, t, v, gate| {
        gate.sync(rank, "up");
        if rank == 0 {
            for i in 0..3 {
                fill(v, last(i), 40 + i as u64);
            }
            gate.sync(0, "filled");
            await_msg(&*t, 1, b"read", 20);
            // An attached page at the very end of the view.
            fill(v, last(0), 50);
            t.send(1, b"page", Some(last(0))).unwrap();
            let beyond = Span { offset: LEN as u64, len: PAGE as u32 };
            assert!(matches!(t.send(1, b"x", Some(beyond)), Err(TransportError::BadSpan { .. })));
            await_msg(&*t, 1, b"done", 20);
            return Some(t);
        }
        gate.sync(1, "filled");
        t.start_read(0, last(0), 1).unwrap();
        assert_eq!(collect(&*t, 1, 20), vec![Ev::Read(0, 1)]);
        assert!(holds(v, last(0), 40));
        assert!(t.read_inline(0, last(2)), "read_inline in the short last chunk");
        assert!(holds(v, last(2), 42));
        let beyond = Span { offset: LEN as u64, len: PAGE as u32 };
        assert!(!t.read_inline(0, beyond));
        assert!(matches!(t.start_read(0, beyond, 2), Err(TransportError::BadSpan { .. })));
        let straddling = Span { offset: (LEN - PAGE / 2) as u64, len: PAGE as u32 };
        assert!(matches!(t.start_read(0, straddling, 3), Err(TransportError::BadSpan { .. })));
        t.send(0, b"read", None).unwrap();
        assert_eq!(collect(&*t, 1, 20), vec![Ev::Msg(0, b"page".to_vec(), Some(last(0)))]);
        assert!(holds(v, last(0), 50));
        t.send(0, b"done", None).unwrap();
        Some(t)
    });
}

/// With a page check, attached contents land only once their message passed it; contents nobody
/// asked for never land, and their sender is lost.
#[test]
fn pages_nobody_asked_for_never_land() {
    let _g = serial();
    if skip_without_device("pages_nobody_asked_for_never_land") {
        return;
    }
    rdma_job_owed(
        2,
        |from, msg, _| from == 1 && msg == b"owed",
        |rank, t, v, gate| {
            let span = Span { offset: 0, len: PAGE as u32 };
            gate.sync(rank, "up");
            if rank == 1 {
                fill(v, span, 7);
                t.send(0, b"owed", Some(span)).unwrap();
                gate.sync(1, "first");
                fill(v, span, 8);
                t.send(0, b"stolen", Some(span)).unwrap();
                gate.sync(1, "second");
                return Some(t);
            }
            assert_eq!(collect(&*t, 1, 20), vec![Ev::Msg(1, b"owed".to_vec(), Some(span))]);
            assert!(holds(v, span, 7));
            gate.sync(0, "first");
            let started = Instant::now();
            let e = loop {
                match t.poll(Some(Duration::from_millis(50)), &mut |ev| panic!("delivered {ev:?}")) {
                    Err(e) => break e.to_string(),
                    Ok(_) => {
                        assert!(started.elapsed() < Duration::from_secs(20), "the refused message was never reported")
                    }
                }
            };
            assert!(e.contains("rank 1") && e.contains("did not ask for"), "{e}");
            assert!(holds(v, span, 7), "the refused contents landed");
            gate.sync(0, "second");
            Some(t)
        },
    );
}

/// A job of one process has no queue pairs, yet polls, wakes and refuses peers like any other.
#[test]
fn a_job_of_one_rank_polls_and_wakes() {
    let _g = serial();
    if skip_without_device("a_job_of_one_rank_polls_and_wakes") {
        return;
    }
    rdma_job(1, |_rank, t, _v, _gate| {
        assert_eq!((t.rank(), t.size()), (0, 1));
        assert_eq!(t.poll(Some(Duration::from_millis(50)), &mut |ev| panic!("unexpected {ev:?}")).unwrap(), 0);
        assert!(matches!(t.send(0, b"me", None), Err(TransportError::NoSuchPeer(0))));
        assert!(matches!(t.start_read(1, page_span(0, 0), 1), Err(TransportError::NoSuchPeer(1))));
        t.say_goodbye().unwrap();
        Some(t)
    });
}

/// `wake` from another thread makes a long `poll` (and `wait_for_wake`) return at once.
#[test]
fn wake_ends_a_long_poll_at_once() {
    let _g = serial();
    if skip_without_device("wake_ends_a_long_poll_at_once") {
        return;
    }
    rdma_job(2, |rank, t, _v, gate| {
        gate.sync(rank, "up");
        if rank == 0 {
            let tr = &*t;
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(300));
                    tr.wake();
                });
                let start = Instant::now();
                let n = tr.poll(Some(Duration::from_secs(20)), &mut |ev| panic!("unexpected {ev:?}")).unwrap();
                assert_eq!(n, 0);
                assert!(start.elapsed() < Duration::from_secs(10), "poll woke only after {:?}", start.elapsed());
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(300));
                    tr.wake();
                });
                let start = Instant::now();
                tr.wait_for_wake(Duration::from_secs(20));
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "wait_for_wake woke only after {:?}",
                    start.elapsed()
                );
            });
            // A message ends a long poll too.
            t.send(1, b"ping", None).unwrap();
        } else {
            let start = Instant::now();
            let mut got = Vec::new();
            while got.is_empty() {
                assert!(start.elapsed() < Duration::from_secs(30), "no ping");
                t.poll(Some(Duration::from_secs(20)), &mut |ev| got.push(own(ev))).unwrap();
            }
            assert_eq!(got, vec![Ev::Msg(0, b"ping".to_vec(), None)]);
        }
        gate.sync(rank, "done");
        Some(t)
    });
}

// ---------------------------------------------------------------------------------------------
// 4. One-sided reads
// ---------------------------------------------------------------------------------------------

#[test]
fn rdma_reads_are_one_sided() {
    let _g = serial();
    if skip_without_device("rdma_reads_are_one_sided") {
        return;
    }
    let dev = first_device().expect("a device");
    rdma_job(3, move |rank, t, _v, _gate| {
        assert!(t.one_sided_reads());
        assert_eq!((t.rank(), t.size()), (rank, 3));
        let d = t.describe();
        assert!(d.contains(&dev) && d.contains("port 1"), "describe() = {d:?}");
        Some(t)
    });
}

// ---------------------------------------------------------------------------------------------
// 5. poll_inline
// ---------------------------------------------------------------------------------------------

#[test]
fn inline_reader_takes_what_it_accepts_and_leaves_the_rest_in_order() {
    let _g = serial();
    if skip_without_device("inline_reader_takes_what_it_accepts_and_leaves_the_rest_in_order") {
        return;
    }
    rdma_job(2, |rank, t, v, gate| {
        gate.sync(rank, "up");
        if rank == 0 {
            let span = Span { offset: 0x20_0000, len: PAGE as u32 };
            fill(v, span, 77);
            t.send(1, b"take1", None).unwrap();
            t.send(1, b"keep1", Some(span)).unwrap();
            t.send(1, b"take2", None).unwrap();
            t.send(1, &vec![b'k'; 3000], None).unwrap(); // a declined message of several fragments
            await_msg(&*t, 1, b"done", 30);
            return Some(t);
        }
        // A waiting thread takes only "take..." messages.
        let mut offered: Vec<Vec<u8>> = Vec::new();
        let mut taken = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !offered.iter().any(|m| m.starts_with(b"keep")) {
            assert!(Instant::now() < deadline, "rank 1: keep1 not offered within 20 s (offered {offered:?})");
            taken += t.poll_inline(&mut |from, b, page| {
                assert_eq!(from, 0);
                offered.push(b.to_vec());
                if b.starts_with(b"keep") {
                    assert_eq!(page, Some(Span { offset: 0x20_0000, len: PAGE as u32 }));
                }
                b.starts_with(b"take")
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(taken, 1, "stops at the first declined message");
        assert_eq!(offered, vec![b"take1".to_vec(), b"keep1".to_vec()]);
        // Until the service thread took the declined message, nothing more is offered.
        std::thread::sleep(Duration::from_millis(200));
        let n =
            t.poll_inline(&mut |_, b, _| panic!("offered {:?} behind a declined message", String::from_utf8_lossy(b)));
        assert_eq!(n, 0);
        let rest = collect(&*t, 3, 20);
        assert_eq!(
            rest,
            vec![
                Ev::Msg(0, b"keep1".to_vec(), Some(Span { offset: 0x20_0000, len: PAGE as u32 })),
                Ev::Msg(0, b"take2".to_vec(), None),
                Ev::Msg(0, vec![b'k'; 3000], None),
            ]
        );
        assert!(holds(v, Span { offset: 0x20_0000, len: PAGE as u32 }, 77));
        t.send(0, b"done", None).unwrap();
        Some(t)
    });
}

// ---------------------------------------------------------------------------------------------
// 6. All-to-all storm
// ---------------------------------------------------------------------------------------------

fn storm_len(k: usize) -> usize {
    if k % 100 == 99 {
        2500 // three fragments
    } else {
        8 + k % 29
    }
}

fn storm_seed(from: usize, to: usize, k: usize) -> u64 {
    ((from * 8 + to) as u64) << 40 | k as u64
}

#[test]
fn three_ranks_all_to_all_storm_loses_nothing_and_keeps_order() {
    let _g = serial();
    if skip_without_device("three_ranks_all_to_all_storm_loses_nothing_and_keeps_order") {
        return;
    }
    let t0 = Instant::now();
    rdma_job(STORM_RANKS, storm);
    eprintln!("storm: {:.1} s", t0.elapsed().as_secs_f64());
}

/// The storm again with no peer allowed to get more than its first buffers: every message gets
/// through the narrow windows, in order.
#[test]
fn a_storm_where_no_peer_may_become_busy_loses_nothing_and_keeps_order() {
    let _g = serial();
    if skip_without_device("a_storm_where_no_peer_may_become_busy_loses_nothing_and_keeps_order") {
        return;
    }
    let t0 = Instant::now();
    rdma_job_configured(
        STORM_RANKS,
        VIEW,
        |_| RdmaConfig { busy_peers: Some(0), ..RdmaConfig::default() },
        |rank, t, v, gate| {
            let t = storm(rank, t, v, gate)?;
            assert_eq!(t.busy_peers(), Vec::<usize>::new(), "rank {rank}: busy peers past a limit of 0");
            Some(t)
        },
    );
    eprintln!("storm without busy peers: {:.1} s", t0.elapsed().as_secs_f64());
}

const STORM_RANKS: usize = 3;

/// Every rank sends 2000 messages to every other from a thread per peer, and takes what the
/// others send only after 2 s: all arrive intact and in order.
fn storm(rank: usize, t: Box<RdmaTransport>, _v: MemoryView, gate: &Gate) -> Option<Box<RdmaTransport>> {
    const N: usize = 2000;
    const SIZE: usize = STORM_RANKS;
    gate.sync(rank, "up");
    let tr = &*t;
    std::thread::scope(|s| {
        for peer in (0..SIZE).filter(|p| *p != rank) {
            s.spawn(move || {
                for k in 0..N {
                    let msg = pattern(storm_seed(rank, peer, k), storm_len(k));
                    tr.send(peer, &msg, None).unwrap_or_else(|e| panic!("rank {rank} → {peer}: send {k}: {e}"));
                }
            });
        }
        // Let the senders run into full receive queues and full send queues first.
        std::thread::sleep(Duration::from_secs(2));
        let mut next = [0usize; SIZE];
        let mut problems = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(50);
        while (0..SIZE).any(|p| p != rank && next[p] < N) {
            assert!(Instant::now() < deadline, "rank {rank}: received only {next:?} of {N} each within 50 s");
            tr.poll(Some(Duration::from_millis(10)), &mut |ev| {
                let Event::Message { from, bytes, page: None } = ev else {
                    problems.push(format!("unexpected {ev:?}"));
                    return;
                };
                let k = next[from];
                if k >= N || bytes.len() != storm_len(k) || bytes != pattern(storm_seed(from, rank, k), bytes.len()) {
                    problems.push(format!("message {k} from {from} is not the one sent next ({} bytes)", bytes.len()));
                }
                next[from] += 1;
            })
            .unwrap_or_else(|e| panic!("rank {rank}: poll: {e}"));
            assert!(problems.is_empty(), "rank {rank}: {problems:?}");
        }
    });
    // Everyone has everything: nothing is in flight while the transports go.
    gate.sync(rank, "storm received");
    Some(t)
}

/// Message buffers follow use: of 4 ranks, rank 0 floods ranks 1 and 2 and may make only one
/// peer busy; ranks 1 and 2 make rank 0 busy (its messages pile up while they sleep); rank 3
/// talks to nobody and keeps its first buffers only, as do all for the peers they never heard
/// from. Every message arrives, in order.
#[test]
fn only_peers_in_use_get_the_full_set_of_message_buffers() {
    let _g = serial();
    if skip_without_device("only_peers_in_use_get_the_full_set_of_message_buffers") {
        return;
    }
    const N: usize = 600;
    let pinned = Arc::new(Mutex::new([0usize; 4]));
    let seen = pinned.clone();
    rdma_job_configured(
        4,
        VIEW,
        |rank| RdmaConfig { busy_peers: (rank == 0).then_some(1), ..RdmaConfig::default() },
        move |rank, t, _v, gate| {
            gate.sync(rank, "up");
            let tr = &*t;
            match rank {
                0 => std::thread::scope(|s| {
                    for peer in [1, 2] {
                        s.spawn(move || {
                            for k in 0..N {
                                let msg = pattern(storm_seed(0, peer, k), storm_len(k));
                                tr.send(peer, &msg, None).unwrap_or_else(|e| panic!("0 → {peer}: send {k}: {e}"));
                            }
                        });
                    }
                    let mut done = [false; 3];
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !(done[1] && done[2]) {
                        assert!(Instant::now() < deadline, "rank 0: no word from ranks 1 and 2 within 60 s");
                        tr.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
                            Event::Message { from, bytes: b"all here", page: None } if from == 1 || from == 2 => {
                                done[from] = true
                            }
                            other => panic!("rank 0: unexpected {other:?}"),
                        })
                        .unwrap_or_else(|e| panic!("rank 0: poll: {e}"));
                    }
                    let busy = tr.busy_peers();
                    assert!(busy == [1] || busy == [2], "rank 0 may make one peer busy, and did {busy:?}");
                }),
                1 | 2 => {
                    // Rank 0's messages pile up in the first buffers meanwhile, from the moment
                    // its connection is made. Its request comes on TCP, which no service thread
                    // reads here: a waiting thread's inline poll answers it (declining messages).
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !tr.connected_peers().contains(&0) {
                        assert!(Instant::now() < deadline, "rank {rank}: rank 0 did not connect within 60 s");
                        tr.poll_inline(&mut |_, _, _| false);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    let mut next = 0;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while next < N {
                        assert!(Instant::now() < deadline, "rank {rank}: received only {next} of {N} within 60 s");
                        tr.poll(Some(Duration::from_millis(10)), &mut |ev| {
                            let Event::Message { from: 0, bytes, page: None } = ev else {
                                panic!("rank {rank}: unexpected {ev:?}");
                            };
                            assert!(
                                bytes.len() == storm_len(next)
                                    && bytes == pattern(storm_seed(0, rank, next), bytes.len()),
                                "rank {rank}: message {next} from 0 is not the one sent next"
                            );
                            next += 1;
                        })
                        .unwrap_or_else(|e| panic!("rank {rank}: poll: {e}"));
                    }
                    assert_eq!(tr.busy_peers(), vec![0], "rank {rank}: rank 0 flooded us and is not busy here");
                    tr.send(0, b"all here", None).unwrap();
                }
                _ => {}
            }
            gate.sync(rank, "traffic done");
            seen.lock().unwrap()[rank] = tr.pinned_buffer_bytes();
            if rank == 3 {
                assert_eq!(tr.busy_peers(), Vec::<usize>::new(), "rank 3 talked to nobody");
            }
            gate.sync(rank, "counted");
            Some(t)
        },
    );
    let p = *pinned.lock().unwrap();
    eprintln!("pinned message buffers per rank: {p:?} bytes");
    assert!(p[3] <= 4 * 32 * 1024, "an idle rank of 4 pins {} bytes of message buffers", p[3]);
    for rank in 0..3 {
        assert!(p[rank] >= p[3] + 256 * 1024, "rank {rank} pins {} bytes: no peer got its full set", p[rank]);
        assert!(p[rank] < p[3] + 2 * 256 * 1024, "rank {rank} pins {} bytes: more than one busy peer", p[rank]);
    }
}

/// Two threads of rank 0 send at once (messages of several fragments must not interleave); on
/// rank 1 a waiting thread takes the messages tagged for it through `poll_inline` while the
/// service thread polls: every message is delivered once, in each sender's order, and an
/// attached page is in place whoever sees its message.
#[test]
fn a_waiting_thread_and_the_service_thread_share_the_stream_of_two_senders() {
    let _g = serial();
    if skip_without_device("a_waiting_thread_and_the_service_thread_share_the_stream_of_two_senders") {
        return;
    }
    const PER: usize = 1500; // messages per sending thread
    let len = |k: usize| if k % 50 == 49 { 2500 } else { 12 + k % 17 };
    let span = |th: usize, k: usize| Span { offset: ((1 + th) * CHUNK + (k % 64) * PAGE) as u64, len: PAGE as u32 };
    let seed = |th: usize, k: usize| (th as u64) << 32 | k as u64;
    let message = move |th: usize, k: usize| {
        let mut m = pattern(seed(th, k), len(k));
        m[0] = th as u8;
        m[1..5].copy_from_slice(&(k as u32).to_le_bytes());
        m[5] = if k.is_multiple_of(3) { b'W' } else { b'S' };
        m
    };
    let t0 = Instant::now();
    rdma_job(2, move |rank, t, v, gate| {
        gate.sync(rank, "up");
        let tr = &*t;
        if rank == 0 {
            std::thread::scope(|s| {
                for th in 0..2 {
                    s.spawn(move || {
                        for k in 0..PER {
                            let page = (k % 7 == 0).then(|| span(th, k));
                            if let Some(p) = page {
                                fill(v, p, seed(th, k));
                            }
                            tr.send(1, &message(th, k), page).unwrap_or_else(|e| panic!("thread {th}: send {k}: {e}"));
                        }
                    });
                }
            });
            await_msg(tr, 1, b"done", 50);
            return Some(t);
        }
        // Delivery log, in delivery order: (sender thread, k, taken inline).
        let log: Mutex<Vec<(usize, usize, bool)>> = Mutex::new(Vec::new());
        let problems: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let check = |b: &[u8], page: Option<Span>, inline: bool| {
            let (th, k) = (b[0] as usize, u32::from_le_bytes(b[1..5].try_into().unwrap()) as usize);
            if th > 1 || k >= PER || b != message(th, k).as_slice() {
                problems.lock().unwrap().push(format!("corrupt message ({th}, {k}), {} bytes", b.len()));
                return;
            }
            let want = (k % 7 == 0).then(|| span(th, k));
            if page != want {
                problems.lock().unwrap().push(format!("({th}, {k}): page {page:?}, expected {want:?}"));
            } else if let Some(p) = page {
                if !holds(v, p, seed(th, k)) {
                    problems.lock().unwrap().push(format!("({th}, {k}): page not in place when seen"));
                }
            }
            log.lock().unwrap().push((th, k, inline));
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = tr.poll_inline(&mut |from, b, page| {
                        if from != 0 || b.len() < 6 || b[5] != b'W' {
                            return false;
                        }
                        check(b, page, true);
                        true
                    });
                    if n == 0 {
                        std::thread::yield_now();
                    }
                }
            });
            let deadline = Instant::now() + Duration::from_secs(50);
            while log.lock().unwrap().len() < 2 * PER {
                if Instant::now() > deadline || !problems.lock().unwrap().is_empty() {
                    break;
                }
                if let Err(e) = tr.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
                    Event::Message { from: 0, bytes, page } if bytes.len() >= 6 => check(bytes, page, false),
                    other => problems.lock().unwrap().push(format!("unexpected {other:?}")),
                }) {
                    problems.lock().unwrap().push(format!("poll: {e}"));
                }
                // A slow service thread: the waiting thread gets its chances.
                std::thread::sleep(Duration::from_millis(2));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let problems = problems.into_inner().unwrap();
        assert!(problems.is_empty(), "rank 1: {problems:?}");
        let log = log.into_inner().unwrap();
        assert_eq!(log.len(), 2 * PER, "rank 1: only {} of {} messages within 50 s", log.len(), 2 * PER);
        for th in 0..2 {
            let ks: Vec<usize> = log.iter().filter(|e| e.0 == th).map(|e| e.1).collect();
            assert!(ks.iter().copied().eq(0..PER), "sender thread {th}'s messages out of order or missing");
        }
        let inline = log.iter().filter(|e| e.2).count();
        eprintln!("rank 1: {inline} of {} messages taken by the waiting thread", 2 * PER);
        t.send(0, b"done", None).unwrap();
        Some(t)
    });
    eprintln!("waiting_and_service_threads: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Messages each service thread sends to the other before it polls again.
const MUTUAL: usize = 1000;

/// Two service threads that each send a burst of messages to the other before polling again (as
/// the engine does when it answers a batch of events) both get through: the transport buffers
/// what the peer has not taken yet, as TCP's socket buffers do (see the TCP twin below).
#[test]
fn two_service_threads_sending_bursts_to_each_other_both_get_through() {
    let _g = serial();
    if skip_without_device("two_service_threads_sending_bursts_to_each_other_both_get_through") {
        return;
    }
    run_in_child("child_two_service_threads_sending_bursts_to_each_other", Duration::from_secs(45));
}

#[test]
#[ignore = "run in a child process by two_service_threads_sending_bursts_to_each_other_both_get_through"]
fn child_two_service_threads_sending_bursts_to_each_other() {
    if !in_child("child_two_service_threads_sending_bursts_to_each_other") {
        return;
    }
    // Each rank's progress; a watchdog ends the process if the burst does not get through.
    let progress: Arc<[std::sync::atomic::AtomicUsize; 2]> = Arc::new(Default::default());
    let watched = progress.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let p: Vec<usize> = watched.iter().map(|a| a.load(std::sync::atomic::Ordering::Relaxed)).collect();
        eprintln!(
            "after 20 s the ranks have sent {p:?} of {MUTUAL} messages each: both wait for send-queue room that \
             only the other's polling would free (256 receive buffers + 128 sends in flight per peer)"
        );
        std::process::exit(1);
    });
    rdma_job(2, move |rank, t, _v, gate| {
        mutual_bursts(rank, &*t, gate, &progress[rank]);
        Some(t)
    });
}

/// The same over TCP: runs everywhere.
#[test]
fn tcp_twin_two_service_threads_sending_bursts_to_each_other_both_get_through() {
    let _g = serial();
    let progress: Arc<[std::sync::atomic::AtomicUsize; 2]> = Arc::new(Default::default());
    run_ranks(2, move |rank, t, _v, gate| {
        mutual_bursts(rank, &t, gate, &progress[rank]);
        t
    });
}

/// Sends `MUTUAL` messages to the other rank from the polling thread, then takes the other's.
fn mutual_bursts(rank: usize, t: &dyn Transport, gate: &Gate, progress: &std::sync::atomic::AtomicUsize) {
    let peer = 1 - rank;
    gate.sync(rank, "up");
    for k in 0..MUTUAL {
        let msg = pattern(storm_seed(rank, peer, k), 100);
        t.send(peer, &msg, None).unwrap_or_else(|e| panic!("rank {rank}: send {k}: {e}"));
        progress.store(k + 1, std::sync::atomic::Ordering::Relaxed);
    }
    let got = collect(t, MUTUAL, 30);
    for (k, ev) in got.into_iter().enumerate() {
        assert_eq!(ev, Ev::Msg(peer, pattern(storm_seed(peer, rank, k), 100), None), "rank {rank}: message {k}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Leaving and losing peers
// ---------------------------------------------------------------------------------------------

#[test]
fn a_goodbye_then_exit_is_peer_left_and_no_error() {
    let _g = serial();
    if skip_without_device("a_goodbye_then_exit_is_peer_left_and_no_error") {
        return;
    }
    rdma_job(2, |rank, t, _v, gate| {
        gate.sync(rank, "up");
        if rank == 1 {
            // Messages just before the goodbye must not be lost either.
            t.send(0, &vec![7u8; 5000], None).unwrap();
            t.say_goodbye().unwrap();
            drop(t); // exits at once
            return None;
        }
        let got = collect(&*t, 2, 20);
        assert_eq!(got, vec![Ev::Msg(1, vec![7u8; 5000], None), Ev::Left(1)]);
        // Rank 1's transport is gone: its connection closes, which is no error after a goodbye.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            t.poll(Some(Duration::from_millis(20)), &mut |ev| panic!("unexpected {ev:?}"))
                .unwrap_or_else(|e| panic!("rank 0: error after a goodbye: {e}"));
        }
        Some(t)
    });
}

/// A pair of ranks that never speak has no queue pair, no message buffer and no TCP connection:
/// in a job of 5, ranks 1 and 2 exchange messages, rank 3 sends to 4 once, and rank 0 (linked to
/// everyone by TCP from the start) talks to nobody. Then ranks 1 and 2 ask for their connection
/// at the same moment from both sides, many threads at once, and nothing is lost or reordered.
#[test]
fn connections_are_made_on_first_use_only() {
    let _g = serial();
    if skip_without_device("connections_are_made_on_first_use_only") {
        return;
    }
    rdma_job(5, |rank, t, _v, gate| {
        gate.sync(rank, "up");
        assert_eq!(t.connected_peers(), Vec::<usize>::new(), "rank {rank}: connected before any traffic");
        assert_eq!(t.pinned_buffer_bytes(), 0, "rank {rank}: message buffers before any traffic");
        let tr = &*t;
        match rank {
            1 | 2 => {
                let peer = 3 - rank;
                // Both sides dial at once, from four threads each.
                std::thread::scope(|s| {
                    for th in 0..4u8 {
                        s.spawn(move || {
                            for k in 0..50u8 {
                                tr.send(peer, &[th, k, rank as u8], None)
                                    .unwrap_or_else(|e| panic!("rank {rank} thread {th}: send {k}: {e}"));
                            }
                        });
                    }
                    let mut next = [0u8; 4];
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while next.iter().any(|n| *n < 50) {
                        assert!(Instant::now() < deadline, "rank {rank}: only {next:?} within 30 s");
                        tr.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
                            Event::Message { from, bytes: &[th, k, r], page: None }
                                if from == peer && r == peer as u8 =>
                            {
                                assert_eq!(k, next[th as usize], "rank {rank}: thread {th}'s messages out of order");
                                next[th as usize] += 1;
                            }
                            other => panic!("rank {rank}: unexpected {other:?}"),
                        })
                        .unwrap_or_else(|e| panic!("rank {rank}: poll: {e}"));
                    }
                });
            }
            3 => tr.send(4, b"once", None).unwrap(),
            4 => await_msg(tr, 3, b"once", 20),
            _ => {}
        }
        gate.sync(rank, "traffic done");
        let expect: Vec<usize> = match rank {
            1 => vec![2],
            2 => vec![1],
            3 => vec![4],
            4 => vec![3],
            _ => vec![],
        };
        assert_eq!(tr.connected_peers(), expect, "rank {rank}: RDMA connections");
        for peer in (0..5).filter(|p| *p != rank) {
            let linked = rank == 0 || peer == 0 || expect.contains(&peer);
            assert_eq!(tr.linked(peer), linked, "rank {rank}: TCP link to {peer}");
        }
        // A connected peer's first buffers (24 KiB), and the full set (another 376 KiB) for a busy one.
        let pinned = tr.pinned_buffer_bytes();
        assert_eq!(pinned == 0, expect.is_empty(), "rank {rank}: {pinned} bytes of message buffers");
        assert!(pinned <= expect.len() * 400 * 1024, "rank {rank}: {pinned} bytes of message buffers");
        gate.sync(rank, "counted");
        Some(t)
    });
}

/// The completion queues grow with the queue pairs a rank makes, not with the job: in a job of 10,
/// ranks 1 to 9 all talk to rank 0 and to nobody else. Rank 0 connects to each, then each fills
/// the receive buffers rank 0 gave it while rank 0 does not poll, so that rank 0's receive queue holds a completion for every
/// buffer it posted (queues that did not grow would overflow and lose them); then everyone
/// streams both ways. Rank 0 ends with room for its 9 peers; every other rank keeps the room it
/// started with (4 peers). Every message arrives, in order. No peer may become busy here: with
/// 64 busy peers allowed, the queues of a job this small would have room to spare.
#[test]
fn completion_queues_grow_with_the_connections_made() {
    let _g = serial();
    if skip_without_device("completion_queues_grow_with_the_connections_made") {
        return;
    }
    const N: usize = 10;
    /// A peer's first receive buffers at rank 0.
    const BURST: u16 = 16;
    const MSGS: u16 = 300;
    let no_busy = |_| RdmaConfig { busy_peers: Some(0), ..RdmaConfig::default() };
    rdma_job_configured(N, VIEW, no_busy, |rank, t, _v, gate| {
        gate.sync(rank, "up");
        let first = t.completion_room();
        assert_eq!(first, 4, "rank {rank}: room at start");
        let tr = &*t;
        let partners: Vec<usize> = if rank == 0 { (1..N).collect() } else { vec![0] };
        let numbered = |k: u16| [&k.to_le_bytes()[..], &[rank as u8]].concat();
        let mut next = vec![0u16; N];
        // Rank 0 makes every connection (a rank that does not poll would not hear a peer's offer).
        if rank == 0 {
            for p in 1..N {
                tr.send(p, b"hi", None).unwrap_or_else(|e| panic!("rank 0: hi to {p}: {e}"));
            }
        } else {
            await_msg(tr, 0, b"hi", 20);
        }
        gate.sync(rank, "linked");
        if rank > 0 {
            for k in 0..BURST {
                tr.send(0, &numbered(k), None).unwrap_or_else(|e| panic!("rank {rank}: send {k}: {e}"));
            }
        }
        gate.sync(rank, "burst sent");
        let mut sent = if rank == 0 { 0 } else { BURST };
        let deadline = Instant::now() + Duration::from_secs(30);
        while partners.iter().any(|p| next[*p] < MSGS) || sent < MSGS {
            assert!(Instant::now() < deadline, "rank {rank}: received {next:?}, sent {sent} within 30 s");
            if sent < MSGS {
                for &p in &partners {
                    tr.send(p, &numbered(sent), None)
                        .unwrap_or_else(|e| panic!("rank {rank}: send {sent} to {p}: {e}"));
                }
                sent += 1;
            }
            tr.poll(Some(Duration::from_millis(1)), &mut |ev| match ev {
                Event::Message { from, bytes: &[lo, hi, r], page: None } if r as usize == from => {
                    assert_eq!(u16::from_le_bytes([lo, hi]), next[from], "rank {rank}: from {from} out of order");
                    next[from] += 1;
                }
                other => panic!("rank {rank}: unexpected {other:?}"),
            })
            .unwrap_or_else(|e| panic!("rank {rank}: poll: {e}"));
        }
        gate.sync(rank, "traffic done");
        assert_eq!(tr.connected_peers(), partners, "rank {rank}: RDMA connections");
        let room = tr.completion_room();
        let expect = if rank == 0 { N - 1 } else { first };
        assert_eq!(room, expect, "rank {rank}: completion-queue room after talking to {partners:?}");
        gate.sync(rank, "counted");
        Some(t)
    });
}

/// What `gallocy::finalize` does: everybody says goodbye, waits for everybody's goodbye, exits.
/// Ranks 1 and 2 spoke by RDMA, and say goodbye that way; rank 0, linked to both by TCP only,
/// hears theirs and says its own on TCP.
#[test]
fn everybody_says_goodbye_and_leaves_without_errors() {
    let _g = serial();
    if skip_without_device("everybody_says_goodbye_and_leaves_without_errors") {
        return;
    }
    rdma_job(3, |rank, t, _v, gate| {
        gate.sync(rank, "up");
        if rank > 0 {
            t.send(3 - rank, b"hello", None).unwrap();
            await_msg(&*t, 3 - rank, b"hello", 20);
        }
        gate.sync(rank, "linked");
        let expect: Vec<usize> = if rank == 0 { vec![] } else { vec![3 - rank] };
        assert_eq!(t.connected_peers(), expect, "rank {rank}: RDMA connections");
        t.say_goodbye().unwrap_or_else(|e| panic!("rank {rank}: say_goodbye: {e}"));
        let mut left = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while left.len() < 2 {
            assert!(Instant::now() < deadline, "rank {rank}: only {left:?} said goodbye within 20 s");
            t.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
                Event::PeerLeft { rank: r } => assert!(left.insert(r), "PeerLeft({r}) twice"),
                other => panic!("rank {rank}: unexpected {other:?}"),
            })
            .unwrap_or_else(|e| panic!("rank {rank}: error while leaving: {e}"));
        }
        // Gone at once: the others may still be polling.
        None
    });
}

#[test]
fn a_peer_that_vanishes_is_reported_by_rank() {
    let _g = serial();
    if skip_without_device("a_peer_that_vanishes_is_reported_by_rank") {
        return;
    }
    rdma_job(3, |rank, t, _v, gate| {
        gate.sync(rank, "up");
        // Rank 0 is linked to every rank from the start; ranks 1 and 2 link on first use.
        if rank == 2 {
            t.send(1, b"hello", None).unwrap();
        }
        if rank == 1 {
            await_msg(&*t, 2, b"hello", 20);
        }
        gate.sync(rank, "linked");
        if rank == 2 {
            drop(t); // closes its connections and destroys its queue pairs without a goodbye
            return None;
        }
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "rank {rank}: the loss of rank 2 was not reported in 10 s"
            );
            match t.poll(Some(Duration::from_millis(10)), &mut |ev| panic!("rank {rank}: unexpected {ev:?}")) {
                Err(TransportError::PeerLost { rank: 2, .. }) => break,
                Err(e) => panic!("rank {rank}: unexpected error {e}"),
                Ok(_) => {}
            }
        }
        eprintln!("rank {rank}: loss of rank 2 reported after {:?}", start.elapsed());
        Some(t)
    });
}

/// Set in the child process that runs one of the `child_*` tests (see [`run_in_child`]).
const CHILD_ENV: &str = "GALLOCY_RDMA_TEST_CHILD";

/// Runs the ignored test `name` of this binary alone in a child process, so that a thread it
/// leaves stuck (spinning in the transport) dies with it. Fails if the child fails, or is still
/// running after `limit` (then it is killed).
fn run_in_child(name: &str, limit: Duration) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    // The child's own report, without libtest's frame.
    let report: String = text.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("    | {l}\n")).collect();
    match status {
        Some(s) if s.success() => eprint!("{name} (child process, {:.1} s):\n{report}", start.elapsed().as_secs_f64()),
        Some(s) => panic!("{name} failed in its child process ({s}):\n{report}"),
        None => panic!("{name} still ran after {limit:?} in its child process (killed):\n{report}"),
    }
}

/// True in the child process; otherwise says why the test does nothing.
fn in_child(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    eprintln!("{name} runs only in the child process its parent test starts");
    false
}

/// A sender that waits for send-queue room towards a peer that stopped taking messages learns
/// that the peer is gone soon after the service thread did, long before the send-queue stall
/// limit (60 s).
#[test]
fn a_sender_waiting_on_a_peer_that_vanishes_gets_peer_lost() {
    let _g = serial();
    if skip_without_device("a_sender_waiting_on_a_peer_that_vanishes_gets_peer_lost") {
        return;
    }
    run_in_child("child_sender_waiting_on_a_peer_that_vanishes", Duration::from_secs(45));
}

#[test]
#[ignore = "run in a child process by a_sender_waiting_on_a_peer_that_vanishes_gets_peer_lost"]
fn child_sender_waiting_on_a_peer_that_vanishes() {
    if in_child("child_sender_waiting_on_a_peer_that_vanishes") {
        sender_learns_of_a_vanished_peer(false);
    }
}

/// The same with a peer that takes messages until it vanishes: the sends in flight then are
/// never acknowledged.
#[test]
fn a_sender_streaming_to_a_peer_that_vanishes_gets_peer_lost() {
    let _g = serial();
    if skip_without_device("a_sender_streaming_to_a_peer_that_vanishes_gets_peer_lost") {
        return;
    }
    run_in_child("child_sender_streaming_to_a_peer_that_vanishes", Duration::from_secs(45));
}

#[test]
#[ignore = "run in a child process by a_sender_streaming_to_a_peer_that_vanishes_gets_peer_lost"]
fn child_sender_streaming_to_a_peer_that_vanishes() {
    if in_child("child_sender_streaming_to_a_peer_that_vanishes") {
        sender_learns_of_a_vanished_peer(true);
    }
}

/// How long a thread may still be stuck in the transport after the service thread learned that
/// the peer it deals with is gone.
const AFTER_LOSS: Duration = Duration::from_secs(10);

/// Rank 0's service thread polls until it learns that rank 1 is gone.
fn await_loss_of_rank_1(t: &dyn Transport) {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(10), "rank 0: loss of rank 1 not reported by poll in 10 s");
        match t.poll(Some(Duration::from_millis(10)), &mut |_| {}) {
            Err(TransportError::PeerLost { rank: 1, .. }) => return,
            Err(e) => panic!("rank 0: unexpected error {e}"),
            Ok(_) => {}
        }
    }
}

/// Rank 0 sends to rank 1 from a thread while its service thread polls; after 1 s rank 1 (which
/// polls only if `receiver_takes`) drops its transport without a goodbye. The sender must get
/// PeerLost(1) within [`AFTER_LOSS`] of the service thread.
fn sender_learns_of_a_vanished_peer(receiver_takes: bool) {
    rdma_job(2, move |rank, t, _v, gate| {
        gate.sync(rank, "up");
        if rank == 1 {
            // The connection exists before rank 1 stops taking messages.
            t.send(0, b"hi", None).unwrap();
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                if receiver_takes {
                    t.poll(Some(Duration::from_millis(10)), &mut |_| {}).unwrap();
                } else {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            drop(t);
            return None;
        }
        await_msg(&*t, 1, b"hi", 20);
        // A thread of its own, which this (child) process may leave stuck.
        let t: Arc<RdmaTransport> = Arc::from(t);
        let (tx, rx) = mpsc::channel();
        let sender = t.clone();
        std::thread::spawn(move || {
            for k in 0..200_000usize {
                if let Err(e) = sender.send(1, &[k as u8; 1000], None) {
                    let _ = tx.send((k, Some(e)));
                    return;
                }
            }
            let _ = tx.send((200_000, None));
        });
        await_loss_of_rank_1(&*t);
        match rx.recv_timeout(AFTER_LOSS) {
            Ok((sent, Some(TransportError::PeerLost { rank: 1, reason }))) => {
                eprintln!("rank 0: send {sent} to the vanished rank 1 failed: {reason}");
            }
            Ok((sent, other)) => panic!("rank 0: sending to the vanished rank 1 ended after {sent} with {other:?}"),
            Err(_) => panic!(
                "rank 0: a send to rank 1 is still blocked {AFTER_LOSS:?} after poll reported rank 1 lost \
                 (no failed work completion comes, and the TCP loss does not reach the send path)"
            ),
        }
        None
    });
}

/// A faulting thread's `read_inline` from a peer that has vanished returns (false) instead of
/// spinning for ever on a READ that will never complete.
#[test]
fn read_inline_from_a_vanished_peer_returns() {
    let _g = serial();
    if skip_without_device("read_inline_from_a_vanished_peer_returns") {
        return;
    }
    run_in_child("child_read_inline_from_a_vanished_peer", Duration::from_secs(45));
}

#[test]
#[ignore = "run in a child process by read_inline_from_a_vanished_peer_returns"]
fn child_read_inline_from_a_vanished_peer() {
    if !in_child("child_read_inline_from_a_vanished_peer") {
        return;
    }
    // Set once rank 1's transport is gone entirely (its TCP connections close first, its queue
    // pairs and registrations after).
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone2 = gone.clone();
    rdma_job(2, move |rank, t, v, gate| {
        if rank == 1 {
            fill(v, page_span(0, 1), 5);
            gate.sync(1, "filled");
            await_msg(&*t, 0, b"key known", 20);
            drop(t);
            gone2.store(true, std::sync::atomic::Ordering::Release);
            return None;
        }
        gate.sync(0, "filled");
        t.start_read(1, page_span(0, 1), 9).unwrap();
        assert_eq!(collect(&*t, 1, 20), vec![Ev::Read(1, 9)]);
        assert!(t.read_inline(1, page_span(0, 2)), "read_inline while rank 1 lives");
        t.send(1, b"key known", None).unwrap();
        await_loss_of_rank_1(&*t);
        let since = Instant::now();
        while !gone.load(std::sync::atomic::Ordering::Acquire) {
            assert!(since.elapsed() < Duration::from_secs(10), "rank 1's transport not dropped in 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t: Arc<RdmaTransport> = Arc::from(t);
        let (tx, rx) = mpsc::channel();
        let reader = t.clone();
        std::thread::spawn(move || {
            let _ = tx.send(reader.read_inline(1, page_span(0, 1)));
        });
        match rx.recv_timeout(AFTER_LOSS) {
            Ok(done) => assert!(!done, "read_inline from a vanished peer claims success"),
            Err(_) => panic!(
                "rank 0: read_inline from rank 1 still spins {AFTER_LOSS:?} after poll reported rank 1 lost \
                 (its READ never completes, and the TCP loss does not reach read_inline)"
            ),
        }
        None
    });
}

// ---------------------------------------------------------------------------------------------
// 8. Falling back to TCP
// ---------------------------------------------------------------------------------------------

/// Rank 1 has no device; the others have what this machine has. Returns the rank that all must
/// name and the reason.
fn port_for(rank: usize) -> Result<rdma::Port, RdmaError> {
    if rank == 1 {
        Err(RdmaError::NoDevice)
    } else {
        rdma::open(&RdmaConfig::default())
    }
}

#[test]
fn without_rdma_on_one_rank_every_rank_stays_on_working_tcp() {
    let _g = serial();
    // With a device, rank 1 (the only one without) is named; without one, every rank lacks RDMA
    // and the lowest, rank 0, is named.
    let named = if has_device() { 1 } else { 0 };
    let want = format!("rank {named}: {}", RdmaError::NoDevice);
    let texts = Arc::new(Mutex::new(Vec::new()));
    let texts2 = texts.clone();
    run_ranks(3, move |rank, tcp, _v, gate| {
        let t = match rdma::connect(tcp, _v, port_for(rank), false, SETUP, LINK) {
            Ok(Connected::Tcp(t, why)) => {
                texts2.lock().unwrap().push(why.clone());
                assert_eq!(why, want, "rank {rank}");
                t
            }
            Ok(Connected::Rdma(_)) => panic!("rank {rank}: RDMA although rank 1 has none"),
            Err(e) => panic!("rank {rank}: {e}"),
        };
        assert!(!t.one_sided_reads());
        gate.sync(rank, "decided");
        // The TCP transport works: a message around the ring.
        let msg = format!("hello from {rank}");
        t.send((rank + 1) % 3, msg.as_bytes(), None).unwrap();
        let from = (rank + 2) % 3;
        assert_eq!(collect(&t, 1, 20), vec![Ev::Msg(from, format!("hello from {from}").into_bytes(), None)]);
        t
    });
    assert_eq!(texts.lock().unwrap().len(), 3);
}

#[test]
fn rdma_required_and_one_rank_without_it_fails_everywhere_naming_that_rank() {
    let _g = serial();
    let named = if has_device() { 1 } else { 0 };
    run_ranks(3, move |rank, tcp, v, _gate| match rdma::connect(tcp, v, port_for(rank), true, SETUP, LINK) {
        Ok(Connected::Rdma(_)) | Ok(Connected::Tcp(..)) => panic!("rank {rank}: connect must fail"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("--transport rdma"), "rank {rank}: {text}");
            assert!(text.contains(&format!("rank {named}: no RDMA: no RDMA device found")), "rank {rank}: {text}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 9. rdma::open
// ---------------------------------------------------------------------------------------------

#[test]
fn open_names_the_device_port_or_gid_index_that_is_wrong() {
    let _g = serial();
    let cfg = |device: Option<&str>, port: Option<u8>, gid_index: Option<u32>| RdmaConfig {
        device: device.map(str::to_owned),
        port,
        gid_index,
        busy_peers: None,
        on_demand: OnDemand::Auto,
    };
    let Some(dev) = first_device() else {
        // No device: whatever is asked for, the answer is that there is none.
        for c in [cfg(None, None, None), cfg(Some("gallocy_no_such_device"), None, Some(9))] {
            match rdma::open(&c) {
                Err(e @ RdmaError::NoDevice) => assert!(e.to_string().contains("no RDMA device found"), "{e}"),
                Err(e) => panic!("{c:?}: expected NoDevice, got {e}"),
                Ok(p) => panic!("{c:?}: opened {} without a device", p.describe()),
            }
        }
        eprintln!("SKIP open_names_the_device_port_or_gid_index_that_is_wrong (device part): no RDMA device");
        return;
    };
    match rdma::open(&cfg(Some("gallocy_no_such_device"), None, None)) {
        Err(e @ RdmaError::NoSuchDevice { .. }) => {
            let RdmaError::NoSuchDevice { wanted, have } = &e else { unreachable!() };
            assert_eq!(wanted, "gallocy_no_such_device");
            assert!(have.contains(&dev), "{e}");
            let text = e.to_string();
            assert!(text.contains("\"gallocy_no_such_device\"") && text.contains(&dev), "{text}");
        }
        other => panic!("bad device name: {:?}", other.map(|p| p.describe())),
    }
    match rdma::open(&cfg(Some(&dev), None, Some(9999))) {
        Err(e @ RdmaError::BadGidIndex { .. }) => {
            let RdmaError::BadGidIndex { device, port, index, valid } = &e else { unreachable!() };
            assert_eq!((device.as_str(), *port, *index), (dev.as_str(), 1, 9999));
            assert!(valid.split(", ").any(|i| i == "1"), "{e}");
            let text = e.to_string();
            assert!(text.contains("GID index 9999") && text.contains(&dev), "{text}");
        }
        other => panic!("bad GID index: {:?}", other.map(|p| p.describe())),
    }
    match rdma::open(&cfg(Some(&dev), Some(9), None)) {
        Err(e @ RdmaError::PortDown { .. }) => {
            let text = e.to_string();
            assert!(text.contains("port 9") && text.contains(&dev), "{text}");
        }
        other => panic!("bad port: {:?}", other.map(|p| p.describe())),
    }
    // What works: the defaults, and the guest's IPv4-mapped GID at index 1 named explicitly.
    let p = rdma::open(&cfg(None, None, None)).unwrap_or_else(|e| panic!("defaults: {e}"));
    assert!(p.describe().contains(&dev), "{}", p.describe());
    let p = rdma::open(&cfg(Some(&dev), Some(1), Some(1))).unwrap_or_else(|e| panic!("{dev} port 1 GID 1: {e}"));
    assert!(p.describe().contains("GID index 1"), "{}", p.describe());
}

#[test]
fn rdma_connect_refuses_a_peer_whose_heap_view_differs() {
    let _g = serial();
    if skip_without_device("rdma_connect_refuses_a_peer_whose_heap_view_differs") {
        return;
    }
    run_ranks(2, |rank, tcp, v, _gate| {
        let view = MemoryView { base: v.base, len: if rank == 1 { VIEW / 2 } else { VIEW } };
        let port = rdma::open(&RdmaConfig::default()).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        match rdma::connect(tcp, view, Ok(port), true, SETUP, LINK) {
            Ok(_) => panic!("rank {rank}: connect must fail"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(&format!("rank {rank}: RDMA set-up")), "{text}");
                assert!(text.contains("rank 1 has a heap view of"), "{text}");
            }
        }
    });
}
