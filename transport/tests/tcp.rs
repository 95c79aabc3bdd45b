//! Two and three TcpTransports in one process (one thread each), on loopback.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use gallocy_transport::coordinator::PortHold;
use gallocy_transport::tcp::{establish, TcpConfig};
use gallocy_transport::{Event, MemoryView, Span, Transport, TransportError};

const VIEW: usize = 1 << 20;

/// Threads a connection keeper asked for (and was refused: see [`pthread_create`]).
static KEEPER_SPAWNS: AtomicUsize = AtomicUsize::new(0);

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type Create =
    unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartRoutine, *mut c_void) -> c_int;

/// Every thread this test binary creates is created here. A connection keeper's thread
/// (`gallocy-keeper`) is refused, with `EAGAIN`, and counted: letting a peer in must never create
/// a thread, because the thread of ours that waits for that peer may hold a lock that thread
/// creation takes (glibc's TLS lock, when a fault comes inside `dlopen`). Every other thread is
/// created by libc's `pthread_create`.
///
/// # Safety
///
/// As `pthread_create`.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into a live buffer of 16.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    if name.starts_with(b"gallocy-keeper\0") {
        KEEPER_SPAWNS.fetch_add(1, Ordering::AcqRel);
        return libc::EAGAIN;
    }
    // SAFETY: a NUL-terminated name; RTLD_NEXT finds libc's definition, past this one.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) };
    assert!(!real.is_null(), "libc's pthread_create not found");
    // SAFETY: libc's pthread_create has this signature.
    let real: Create = unsafe { std::mem::transmute::<*mut c_void, Create>(real) };
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe { real(thread, attr, start, arg) }
}

/// A loopback port held for one job's coordinator (rank 0 joins the hold) until dropped.
fn hold_port() -> PortHold {
    PortHold::loopback().unwrap()
}

fn view() -> MemoryView {
    let mem: &'static mut [u8] = Box::leak(vec![0u8; VIEW].into_boxed_slice());
    MemoryView { base: mem.as_mut_ptr(), len: VIEW }
}

fn config(rank: usize, size: usize, port: u16, token: &str) -> TcpConfig {
    TcpConfig {
        rank,
        size,
        coordinator: format!("127.0.0.1:{port}"),
        coordinator_held: true,
        bind: "127.0.0.1".parse().unwrap(),
        token: token.as_bytes().to_vec(),
        view: view(),
        setup_timeout: Duration::from_secs(5),
        link_timeout: Duration::from_secs(5),
        thread_start: || {},
        owed: None,
        serves: None,
    }
}

/// Starts `size` ranks, each running `body` on its own thread. A rank's transport is dropped
/// only after every rank's body returned (unless the body drops it itself).
fn job<F>(size: usize, body: F)
where
    F: Fn(usize, Box<dyn Transport>, MemoryView) -> Option<Box<dyn Transport>> + Send + Sync + 'static,
{
    let hold = hold_port();
    let port = hold.port();
    let body = Arc::new(body);
    let done = Arc::new(Barrier::new(size));
    let threads: Vec<_> = (0..size)
        .map(|rank| {
            let (body, done) = (body.clone(), done.clone());
            std::thread::spawn(move || {
                let cfg = config(rank, size, port, "secret");
                let t = establish(&cfg, b"hello", &|_| Ok(())).unwrap();
                // A rank that fails still reaches the barrier, so the job fails instead of hanging.
                let kept = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(rank, Box::new(t), cfg.view)));
                done.wait();
                match kept {
                    Ok(kept) => drop(kept),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Polls until `n` events were collected (or panics after 10 s).
fn collect(t: &dyn Transport, n: usize) -> Vec<(usize, Vec<u8>, Option<Span>)> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(std::time::Instant::now() < deadline, "timed out with {} of {n} events", out.len());
        t.poll(Some(Duration::from_millis(10)), &mut |ev| match ev {
            Event::Message { from, bytes, page } => out.push((from, bytes.to_vec(), page)),
            Event::ReadDone { from, token } => out.push((from, token.to_le_bytes().to_vec(), None)),
            Event::PeerLeft { rank } => out.push((rank, b"bye".to_vec(), None)),
        })
        .unwrap();
    }
    out
}

#[test]
fn messages_pages_and_reads_arrive_intact_and_in_order() {
    let sync = Arc::new(Barrier::new(2));
    job(2, move |rank, t, v| {
        // SAFETY: each rank owns its view; offsets are in range.
        let page = |off: usize| unsafe { std::slice::from_raw_parts_mut(v.base.add(off), 4096) };
        if rank == 0 {
            page(8192).fill(0xab);
            page(65536).iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            sync.wait();
            // Many small messages, some with pages, some large enough to cross the staging buffer.
            for i in 0..2000u32 {
                let len = if i % 97 == 0 { 100_000 } else { 8 };
                let msg = vec![(i % 251) as u8; len];
                let attach = (i % 10 == 0).then_some(Span { offset: 8192, len: 4096 });
                t.send(1, &msg, attach).unwrap();
            }
            let got = collect(&*t, 1);
            assert_eq!(got[0].1, b"done");
        } else {
            sync.wait();
            let got = collect(&*t, 2000);
            for (i, (from, bytes, page)) in got.iter().enumerate() {
                assert_eq!(*from, 0);
                let len = if i % 97 == 0 { 100_000 } else { 8 };
                assert_eq!(bytes.len(), len, "message {i}");
                assert!(bytes.iter().all(|b| *b == (i % 251) as u8), "message {i} corrupted");
                assert_eq!(page.is_some(), i % 10 == 0);
            }
            assert!(page(8192).iter().all(|b| *b == 0xab), "attached page landed");
            // One-sided read of rank 0's page at 64 KiB.
            t.start_read(0, Span { offset: 65536, len: 4096 }, 42).unwrap();
            let got = collect(&*t, 1);
            assert_eq!(got[0].1, 42u64.to_le_bytes());
            assert!(page(65536).iter().enumerate().all(|(i, b)| *b == i as u8));
            t.send(0, b"done", None).unwrap();
        }
        Some(t)
    });
}

#[test]
fn batches_of_messages_arrive_sealed_whole_and_in_order_among_single_sends() {
    job(2, |rank, t, _v| {
        // Message k: its number and a length that varies (empty ones included).
        let message = |k: u32| {
            let mut m = k.to_le_bytes().to_vec();
            m.resize(4 + (k as usize * 7) % 61, k as u8);
            m
        };
        let mut k = 0u32;
        if rank == 0 {
            // Batches of every size from 0 to 2.5 times what one write takes, between single sends.
            for size in 0..=gallocy_transport::SEND_BATCH * 5 / 2 {
                let batch: Vec<Vec<u8>> = (0..size as u32).map(|i| message(k + i)).collect();
                let refs: Vec<&[u8]> = batch.iter().map(|m| m.as_slice()).collect();
                t.send_batch(1, &refs).unwrap();
                k += size as u32;
                t.send(1, &message(k), None).unwrap();
                k += 1;
            }
            let too_long = vec![0u8; gallocy_transport::MAX_MESSAGE + 1];
            assert!(matches!(t.send_batch(1, &[b"x", &too_long]), Err(TransportError::MessageTooLong(_))));
            t.send(1, b"end", None).unwrap();
            assert_eq!(collect(&*t, 1)[0].1, b"done");
        } else {
            let total: u32 = (0..=gallocy_transport::SEND_BATCH as u32 * 5 / 2).map(|s| s + 1).sum();
            let got = collect(&*t, total as usize + 1);
            for (i, (from, bytes, page)) in got.iter().enumerate().take(total as usize) {
                assert_eq!((*from, page.is_none()), (0, true));
                assert_eq!(*bytes, message(i as u32), "message {i}");
            }
            assert_eq!(got[total as usize].1, b"end", "nothing of the refused batch was sent");
            t.send(0, b"done", None).unwrap();
        }
        Some(t)
    });
}

#[test]
fn inline_reader_takes_what_it_accepts_and_leaves_the_rest_in_order() {
    job(2, |rank, t, _v| {
        if rank == 0 {
            for m in [&b"take1"[..], b"keep1", b"take2", b"keep2"] {
                t.send(1, m, None).unwrap();
            }
            collect(&*t, 1);
        } else {
            std::thread::sleep(Duration::from_millis(200));
            let mut taken = Vec::new();
            let n = t.poll_inline(&mut |_, b, _| {
                let ok = b.starts_with(b"take");
                if ok {
                    taken.push(b.to_vec());
                }
                ok
            });
            assert_eq!(n, 1, "stops at the first declined message");
            assert_eq!(taken, vec![b"take1".to_vec()]);
            let rest = collect(&*t, 3);
            let rest: Vec<_> = rest.into_iter().map(|e| e.1).collect();
            assert_eq!(rest, vec![b"keep1".to_vec(), b"take2".to_vec(), b"keep2".to_vec()]);
            t.send(0, b"done", None).unwrap();
        }
        Some(t)
    });
}

#[test]
fn a_peer_that_vanishes_is_reported_by_rank() {
    job(3, |rank, t, _v| {
        if rank == 1 {
            // Links to rank 2 (connections are made on first use).
            t.send(2, b"hi", None).unwrap();
        }
        if rank == 2 {
            collect(&*t, 1);
            drop(t); // closes its connections without a goodbye
            return None;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(std::time::Instant::now() < deadline);
            match t.poll(Some(Duration::from_millis(10)), &mut |_| {}) {
                Err(TransportError::PeerLost { rank: 2, .. }) => break,
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => {}
            }
        }
        Some(t)
    });
}

#[test]
fn ranks_link_on_first_use_and_only_to_whom_they_talk() {
    // Every rank looks at its links before rank 3 dials rank 1 (the ranks are threads that
    // start at once).
    let looked = Arc::new(Barrier::new(4));
    job(4, move |rank, t, _v| {
        let linked = |t: &dyn Transport| (0..4).filter(|r| t.linked(*r)).collect::<Vec<_>>();
        let at_start = linked(&*t);
        looked.wait();
        match rank {
            0 => assert_eq!(at_start, vec![1, 2, 3], "rank 0 links everyone at start-up"),
            r => assert_eq!(at_start, vec![0], "rank {r} starts linked to rank 0 only"),
        }
        if rank == 3 {
            t.send(1, b"from 3", None).unwrap();
            assert_eq!(linked(&*t), vec![0, 1]);
            assert_eq!(collect(&*t, 1), vec![(1, b"from 1".to_vec(), None)]);
        }
        if rank == 1 {
            assert_eq!(collect(&*t, 1), vec![(3, b"from 3".to_vec(), None)]);
            assert_eq!(linked(&*t), vec![0, 3], "the link rank 3 made serves rank 1 too");
            t.send(3, b"from 1", None).unwrap();
        }
        if rank == 2 {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(linked(&*t), vec![0], "rank 2 talked to nobody");
        }
        Some(t)
    });
}

/// Peers are let in without a thread being created for them (this binary refuses the keeper
/// any thread: see [`pthread_create`]): ranks 1, 2 and 3 all dial rank 4 at once, and each link
/// carries a message both ways.
#[test]
fn peers_are_let_in_without_creating_a_thread() {
    job(5, |rank, t, _v| {
        if (1..4).contains(&rank) {
            t.send(4, &[rank as u8], None).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert_eq!(collect(&*t, 1), vec![(4, vec![4], None)], "rank {rank}");
        }
        if rank == 4 {
            let mut got: Vec<usize> = collect(&*t, 3)
                .into_iter()
                .map(|(from, bytes, _)| {
                    assert_eq!(bytes, vec![from as u8]);
                    from
                })
                .collect();
            got.sort();
            assert_eq!(got, vec![1, 2, 3]);
            for p in 1..4 {
                t.send(p, &[4], None).unwrap();
            }
            assert_eq!((0..5).filter(|r| t.linked(*r)).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        }
        Some(t)
    });
    assert_eq!(KEEPER_SPAWNS.load(Ordering::Acquire), 0, "a connection keeper asked for a thread");
}

#[test]
fn ranks_that_dial_each_other_at_once_agree_on_one_link() {
    // Every rank but 0 sends to every other at the same moment, from two threads: each pair dials
    // both ways at once. Every message arrives, in order per sender.
    const N: usize = 6;
    const EACH: u32 = 40;
    for _ in 0..3 {
        let start = Arc::new(Barrier::new(N - 1));
        job(N, move |rank, t, _v| {
            if rank == 0 {
                return Some(t);
            }
            let t: Arc<dyn Transport> = Arc::from(t);
            start.wait();
            let senders: Vec<_> = (0..2)
                .map(|half| {
                    let t = t.clone();
                    std::thread::spawn(move || {
                        for to in (1..N).filter(|r| *r != rank && r % 2 == half) {
                            for i in 0..EACH {
                                t.send(to, &i.to_le_bytes(), None).unwrap();
                            }
                        }
                    })
                })
                .collect();
            let got = collect(&*t, (N - 2) * EACH as usize);
            for s in senders {
                s.join().unwrap();
            }
            for from in (1..N).filter(|r| *r != rank) {
                let seq: Vec<u32> = got
                    .iter()
                    .filter(|(f, _, _)| *f == from)
                    .map(|(_, b, _)| u32::from_le_bytes(b[..4].try_into().unwrap()))
                    .collect();
                assert_eq!(seq, (0..EACH).collect::<Vec<_>>(), "rank {rank} from rank {from}");
                assert!(t.linked(from));
            }
            // Keep the transport (and its links) until every rank is done.
            let kept: Box<dyn Transport> = Box::new(Shared(t));
            Some(kept)
        });
    }
}

/// A transport shared with threads that are done with it.
struct Shared(Arc<dyn Transport>);

impl Transport for Shared {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn send(&self, peer: usize, msg: &[u8], page: Option<Span>) -> Result<(), TransportError> {
        self.0.send(peer, msg, page)
    }
    fn start_read(&self, peer: usize, span: Span, token: u64) -> Result<(), TransportError> {
        self.0.start_read(peer, span, token)
    }
    fn poll(&self, timeout: Option<Duration>, handler: &mut dyn FnMut(Event<'_>)) -> Result<usize, TransportError> {
        self.0.poll(timeout, handler)
    }
    fn poll_inline(&self, accept: &mut gallocy_transport::Accept<'_>) -> usize {
        self.0.poll_inline(accept)
    }
    fn wait_for_wake(&self, timeout: Duration) {
        self.0.wait_for_wake(timeout)
    }
    fn wake(&self) {
        self.0.wake()
    }
    fn say_goodbye(&self) -> Result<(), TransportError> {
        self.0.say_goodbye()
    }
}

#[test]
fn a_peer_that_cannot_be_reached_is_lost_with_a_reason() {
    job(3, |rank, t, _v| {
        if rank == 2 {
            drop(t); // gone before anybody linked to it
            return None;
        }
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(100));
            let started = std::time::Instant::now();
            match t.send(2, b"anyone?", None) {
                Err(e @ TransportError::PeerLost { rank: 2, .. }) => {
                    assert!(e.to_string().contains("could not connect to 127.0.0.1:"), "{e}")
                }
                other => panic!("expected rank 2 to be lost, got {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(20));
            assert!(!t.linked(2));
        }
        Some(t)
    });
}

#[test]
fn wrong_token_cannot_join_and_rank_zero_names_who_is_missing() {
    let hold = hold_port();
    let port = hold.port();
    let zero = std::thread::spawn(move || {
        let mut cfg = config(0, 2, port, "secret");
        cfg.setup_timeout = Duration::from_secs(2);
        establish(&cfg, b"", &|_| Ok(())).err().expect("must fail").to_string()
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut cfg = config(1, 2, port, "not-the-secret");
    cfg.setup_timeout = Duration::from_secs(2);
    let e = establish(&cfg, b"", &|_| Ok(())).err().expect("must fail");
    assert!(e.to_string().contains("token") || e.to_string().contains("authentication"), "{e}");
    let msg = zero.join().unwrap();
    assert!(msg.contains("rank 1 did not join"), "{msg}");
}

#[test]
fn rank_zero_can_stop_the_job_with_a_message() {
    let hold = hold_port();
    let port = hold.port();
    let zero = std::thread::spawn(move || {
        let cfg = config(0, 2, port, "s");
        establish(&cfg, b"zero", &|hellos| Err(format!("rank 1 said {:?}", String::from_utf8_lossy(&hellos[1]))))
            .err()
            .expect("must fail")
            .to_string()
    });
    let cfg = config(1, 2, port, "s");
    let e = establish(&cfg, b"bad heap", &|_| Ok(())).err().expect("must fail").to_string();
    assert_eq!(e, "rank 1 said \"bad heap\"");
    assert_eq!(zero.join().unwrap(), "rank 1 said \"bad heap\"");
}

/// Two processes that each write far more than the socket buffers hold to the other before
/// either reads (two service threads flushing big bursts at once): both writes finish, because a
/// writer waiting for room takes in what its peer sends, and everything then arrives intact and
/// in order. Without that, both would wait for room until the send stall ends them (30 s).
#[test]
fn two_ranks_writing_big_bursts_at_each_other_both_finish() {
    const MESSAGES: usize = 96;
    const LEN: usize = 200_000;
    let sync = Arc::new(Barrier::new(2));
    job(2, move |rank, t, _v| {
        let other = 1 - rank;
        sync.wait();
        let started = std::time::Instant::now();
        for i in 0..MESSAGES {
            let msg = vec![(i * 7 + rank) as u8; LEN];
            t.send(other, &msg, None).unwrap_or_else(|e| panic!("rank {rank}: send {i}: {e}"));
        }
        let sent = started.elapsed();
        assert!(sent < Duration::from_secs(20), "rank {rank}: the burst took {sent:?}");
        let got = collect(&*t, MESSAGES);
        for (i, (from, bytes, _)) in got.iter().enumerate() {
            assert_eq!(*from, other);
            assert_eq!(bytes.len(), LEN, "message {i}");
            assert!(bytes.iter().all(|b| *b == (i * 7 + other) as u8), "message {i} corrupted");
        }
        sync.wait();
        Some(t)
    });
}
