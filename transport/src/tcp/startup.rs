//! Start-up ([`establish`]): every rank authenticates to rank 0 (the coordinator) and sends a
//! join record with an opaque hello (the runtime's configuration report). Rank 0 checks all
//! hellos with the caller's function and either sends every rank the roster of listening
//! addresses or stops the job with a message. The join connections become the links to rank 0;
//! every other link is made on first use ([`super::links`]), and each rank's keeper lets peers
//! in from before it joins. After start-up, rank 0's listener accepts and closes at once
//! anything that connects.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::links::{connect_authenticated, Keeper, Links};
use super::{Conn, Judge, TcpConfig, TcpTransport, AUTH_TIMEOUT};
use crate::seal::TAG_LEN;
use crate::sys::{Epoll, EventFd};
use crate::TransportError;

fn setup_err(cfg: &TcpConfig, what: impl std::fmt::Display) -> TransportError {
    TransportError::Bootstrap(format!("rank {}: {what}", cfg.rank))
}

fn invalid(what: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// A start-up record: a little-endian u32 length, that many bytes, and their tag.
pub(super) fn write_record(c: &mut Conn, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("record too long"))?;
    let len = U32::new(len);
    let tag = c.keys.sealer.seal(&[len.as_bytes(), bytes]);
    c.stream.write_all(&[len.as_bytes(), bytes, &tag].concat())
}

pub(super) fn read_record(c: &mut Conn, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut len = U32::ZERO;
    c.stream.read_exact(len.as_mut_bytes())?;
    let n = usize::try_from(len.get()).map_err(|_| invalid("record too long"))?;
    if n > limit {
        return Err(invalid("record too long"));
    }
    let mut v = vec![0u8; n];
    c.stream.read_exact(&mut v)?;
    let mut tag = [0u8; TAG_LEN];
    c.stream.read_exact(&mut tag)?;
    if !c.keys.opener.open(&[len.as_bytes(), &v], &tag) {
        return Err(invalid("record failed authentication"));
    }
    Ok(v)
}

/// The fixed start of a join record; `addr_len` bytes of listening address (UTF-8 `host:port`)
/// and the hello follow.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct JoinHead {
    /// The job size the joining rank believes in.
    size: U32,
    addr_len: U32,
}

/// A decoded join record.
#[derive(Debug, PartialEq, Eq)]
struct Join {
    size: usize,
    addr: String,
    hello: Vec<u8>,
}

/// Join record a rank sends rank 0: size it believes in, its listening address, its hello.
fn encode_join(size: usize, listen: &SocketAddr, hello: &[u8]) -> Vec<u8> {
    let addr = listen.to_string();
    // A job size beyond u32 cannot be real; saturating makes rank 0 report the mismatch.
    let head = JoinHead {
        size: U32::new(u32::try_from(size).unwrap_or(u32::MAX)),
        // A socket address's text is a few dozen bytes.
        addr_len: U32::new(addr.len() as u32),
    };
    [head.as_bytes(), addr.as_bytes(), hello].concat()
}

fn decode_join(v: &[u8]) -> Option<Join> {
    let (head, rest) = JoinHead::ref_from_prefix(v).ok()?;
    let (addr, hello) = rest.split_at_checked(usize::try_from(head.addr_len.get()).ok()?)?;
    Some(Join {
        size: usize::try_from(head.size.get()).ok()?,
        addr: std::str::from_utf8(addr).ok()?.to_owned(),
        hello: hello.to_vec(),
    })
}

/// The join record's codec and record reader for the fuzz targets in `runtime/fuzz`: not part of
/// the API (re-exported by `crate::fuzzing`).
#[doc(hidden)]
pub mod fuzzing {
    /// `decode_join`: `(size, listening address, hello)`.
    pub fn decode_join(v: &[u8]) -> Option<(usize, String, Vec<u8>)> {
        super::decode_join(v).map(|j| (j.size, j.addr, j.hello))
    }

    pub use super::{decode_answer, Answer, AnswerError};

    /// The roster answer rank 0 sends every rank (`encode_roster`).
    pub fn encode_roster(addrs: &[String]) -> Vec<u8> {
        super::encode_roster(addrs)
    }

    /// `encode_join`.
    pub fn encode_join(size: usize, listen: &std::net::SocketAddr, hello: &[u8]) -> Vec<u8> {
        super::encode_join(size, listen, hello)
    }

    use crate::seal::{Role, SessionKeys};

    /// `read_record` on a connection whose session secret is empty (the fuzz target's).
    pub fn read_record(s: &mut std::net::TcpStream, limit: usize) -> std::io::Result<Vec<u8>> {
        let stream = s.try_clone()?;
        super::read_record(&mut super::Conn { stream, keys: SessionKeys::derive(&[], Role::Acceptor) }, limit)
    }

    /// What `write_record` sends for `bytes`, as the first record of a connection whose session
    /// secret is empty.
    pub fn sealed_record(bytes: &[u8]) -> Vec<u8> {
        let mut keys = SessionKeys::derive(&[], Role::Connector);
        let len = zerocopy::little_endian::U32::new(bytes.len() as u32);
        let tag = keys.sealer.seal(&[zerocopy::IntoBytes::as_bytes(&len), bytes]);
        [zerocopy::IntoBytes::as_bytes(&len), bytes, &tag].concat()
    }
}

/// Rank 0's answer: b'O' + roster lines, or b'A' + reason.
fn encode_roster(addrs: &[String]) -> Vec<u8> {
    let mut v = vec![b'O'];
    v.extend_from_slice(addrs.join("\n").as_bytes());
    v
}

/// Rank 0's start-up answer, as a joining rank reads it ([`decode_answer`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The job goes on: every rank's listening address (`host:port`), by rank.
    Roster(Vec<String>),
    /// Rank 0 stopped the job, for this reason.
    Aborted(String),
}

/// Why rank 0's start-up answer cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// malformed start-up answer from rank 0
    #[error("malformed start-up answer from rank 0")]
    Malformed,
    /// roster from rank 0 is not UTF-8
    #[error("roster from rank 0 is not UTF-8")]
    NotUtf8,
    /// roster from rank 0 has {got} addresses for a job of {size}
    #[error("roster from rank 0 has {got} addresses for a job of {size}")]
    WrongLength {
        /// Addresses in the roster.
        got: usize,
        /// Ranks in the job.
        size: usize,
    },
    /// roster from rank 0 gives rank {rank} the address {addr:?}, which is not host:port
    #[error("roster from rank 0 gives rank {rank} the address {addr:?}, which is not host:port")]
    BadAddress {
        /// The first rank whose address is wrong.
        rank: usize,
        /// That address.
        addr: String,
    },
}

/// Whether `addr` reads as `host:port`: a host of visible ASCII and a port of decimal digits
/// from 1 to 65535 (a name is resolved only when it is dialled). The one rule for every address
/// of a job: `GALLOCY_COORDINATOR` as the configuration reads it, and every roster entry, rank
/// 0's being that same text.
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_graphic())
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// Decodes rank 0's answer to a join in a job of `size` ranks: a roster of exactly `size`
/// addresses, each `host:port`, or the reason the job stopped.
pub fn decode_answer(v: &[u8], size: usize) -> Result<Answer, AnswerError> {
    match v.split_first() {
        Some((b'A', reason)) => Ok(Answer::Aborted(String::from_utf8_lossy(reason).into_owned())),
        Some((b'O', lines)) => {
            let lines = std::str::from_utf8(lines).map_err(|_| AnswerError::NotUtf8)?;
            // Counted before anything is collected: a hostile roster allocates no more than `size` entries.
            let got = lines.split('\n').count();
            if got != size {
                return Err(AnswerError::WrongLength { got, size });
            }
            let roster: Vec<String> = lines.split('\n').map(str::to_owned).collect();
            match roster.iter().position(|a| !is_host_port(a)) {
                Some(rank) => Err(AnswerError::BadAddress { rank, addr: roster[rank].clone() }),
                None => Ok(Answer::Roster(roster)),
            }
        }
        _ => Err(AnswerError::Malformed),
    }
}

/// The address `addr` (`host:port`) stands for: the first the resolver gives, as everywhere in
/// start-up (so every caller means the same one).
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// This host's address on its route to `to`: the source address the kernel would give a packet
/// sent there. Found by `connect`ing a UDP socket (which only looks the route up; no packet is
/// sent) and reading its local address. Fails (e.g. `ENETUNREACH`) when there is no route.
pub fn route_source(to: &SocketAddr) -> std::io::Result<IpAddr> {
    let any: IpAddr = match to {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let probe = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    probe.connect(to)?;
    Ok(probe.local_addr()?.ip())
}

/// Sets up the job's connections. `hello` is this rank's report; on rank 0, `check` judges all
/// reports (indexed by rank) and may stop the job with a message.
pub fn establish(cfg: &TcpConfig, hello: &[u8], check: &Judge) -> Result<TcpTransport, TransportError> {
    if cfg.size == 0 || cfg.rank >= cfg.size {
        return Err(TransportError::Invalid(format!("rank {} of {}", cfg.rank, cfg.size)));
    }
    let deadline = Instant::now() + cfg.setup_timeout;
    let coordinator = resolve(&cfg.coordinator).map_err(|e| setup_err(cfg, format!("GALLOCY_COORDINATOR: {e}")))?;
    let epoll = Epoll::new().map_err(|e| TransportError::io("epoll_create1", e))?;
    let waker = EventFd::new().map_err(|e| TransportError::io("eventfd", e))?;
    let links = Links::new(cfg.rank, cfg.size, &cfg.token, cfg.link_timeout, cfg.thread_start, epoll, waker)
        .map_err(|e| TransportError::io("eventfd", e))?;
    let links = Arc::new(links);
    let install = |rank: usize, conn: Conn| {
        links.install(rank, conn).map_err(|e| setup_err(cfg, format!("connection to rank {rank}: {e}")))
    };
    if cfg.rank == 0 {
        let listener = crate::coordinator::listen(coordinator, cfg.coordinator_held).map_err(|e| {
            let held = if cfg.coordinator_held { " (held for this job by its launcher)" } else { "" };
            setup_err(cfg, format!("cannot listen on coordinator address {coordinator}{held}: {e}"))
        })?;
        let mut peers: Vec<Option<Conn>> = (0..cfg.size).map(|_| None).collect();
        coordinate(cfg, &listener, hello, check, deadline, &mut peers)?;
        for (rank, conn) in peers.into_iter().enumerate() {
            if let Some(conn) = conn {
                install(rank, conn)?;
            }
        }
        TcpTransport::new(cfg, listener, links, None)
    } else {
        let listener = crate::coordinator::listen(SocketAddr::new(cfg.bind, 0), false)
            .map_err(|e| setup_err(cfg, format!("cannot listen on {}: {e}", cfg.bind)))?;
        // Ranks that have the roster may dial us before we do: let them in from the start.
        let keeper = Keeper::for_links(&listener, &cfg.token, links.clone()).map_err(|e| setup_err(cfg, e))?;
        let (to_zero, roster) = join(cfg, &listener, &coordinator, hello, deadline)?;
        links.set_roster(roster);
        install(0, to_zero)?;
        TcpTransport::new(cfg, listener, links, Some(keeper))
    }
}

fn coordinate(
    cfg: &TcpConfig,
    listener: &TcpListener,
    hello: &[u8],
    check: &Judge,
    deadline: Instant,
    peers: &mut [Option<Conn>],
) -> Result<(), TransportError> {
    let mut hellos: Vec<Option<Vec<u8>>> = vec![None; cfg.size];
    let mut addrs = vec![String::new(); cfg.size];
    hellos[0] = Some(hello.to_vec());
    addrs[0] = cfg.coordinator.clone();
    let mut problem: Option<String> = None;
    let doorman = Keeper::for_joins(listener, &cfg.token, cfg.thread_start).map_err(|e| setup_err(cfg, e))?;
    while hellos.iter().any(Option::is_none) {
        let (mut s, rank) = match doorman.next(deadline) {
            Ok(x) => x,
            Err(why) => {
                let missing: Vec<String> =
                    (0..cfg.size).filter(|r| hellos[*r].is_none()).map(|r| r.to_string()).collect();
                let mut msg = format!(
                    "{} {} did not join within {:?} (not started, wrong GALLOCY_TOKEN or GALLOCY_COORDINATOR?)",
                    if missing.len() == 1 { "rank" } else { "ranks" },
                    missing.join(", "),
                    cfg.setup_timeout
                );
                if why != "timed out" {
                    msg = format!("{msg}; rank 0 stopped taking connections: {why}");
                }
                abort_all(peers, &msg);
                return Err(TransportError::Bootstrap(msg));
            }
        };
        let join = s.stream.set_read_timeout(Some(AUTH_TIMEOUT)).and_then(|_| read_record(&mut s, 1 << 20));
        let Some(Join { size, addr, hello: their_hello }) = join.ok().as_deref().and_then(decode_join) else {
            continue;
        };
        if rank == 0 || rank >= cfg.size {
            let msg = format!("a process claims rank {rank}, but the job has ranks 0..{}", cfg.size - 1);
            let _ = write_record(&mut s, &[&b"A"[..], msg.as_bytes()].concat());
            problem.get_or_insert(msg);
            continue;
        }
        if hellos[rank].is_some() {
            let msg = format!("two processes claim rank {rank}");
            let _ = write_record(&mut s, &[&b"A"[..], msg.as_bytes()].concat());
            problem.get_or_insert(msg);
            continue;
        }
        if size != cfg.size {
            problem.get_or_insert(format!(
                "rank {rank} believes the job has {size} processes, rank 0 believes {}",
                cfg.size
            ));
        }
        hellos[rank] = Some(their_hello);
        addrs[rank] = addr;
        peers[rank] = Some(s);
    }
    let hellos: Vec<Vec<u8>> = hellos.into_iter().map(|h| h.expect("all joined")).collect();
    if let Some(msg) = problem.or_else(|| check(&hellos).err()) {
        abort_all(peers, &msg);
        return Err(TransportError::JobAborted(msg));
    }
    let roster = encode_roster(&addrs);
    for (rank, p) in peers.iter_mut().enumerate() {
        if let Some(s) = p {
            write_record(s, &roster).map_err(|e| setup_err(cfg, format!("sending roster to rank {rank}: {e}")))?;
        }
    }
    Ok(())
}

fn abort_all(peers: &mut [Option<Conn>], msg: &str) {
    let record = [&b"A"[..], msg.as_bytes()].concat();
    for s in peers.iter_mut().flatten() {
        let _ = write_record(s, &record);
    }
}

/// Joins through rank 0: returns the connection to it and the roster of listening addresses.
fn join(
    cfg: &TcpConfig,
    listener: &TcpListener,
    coordinator: &SocketAddr,
    hello: &[u8],
    deadline: Instant,
) -> Result<(Conn, Vec<String>), TransportError> {
    let mut to_zero =
        connect_authenticated(coordinator, &cfg.token, cfg.rank, deadline, true).map_err(|e| match e {
            e @ TransportError::Io { .. } => setup_err(cfg, e),
            e => setup_err(cfg, format!("connecting to {coordinator}: {e}")),
        })?;
    let local_ip = to_zero.stream.local_addr().map_err(|e| setup_err(cfg, e))?.ip();
    let port = listener.local_addr().map_err(|e| setup_err(cfg, e))?.port();
    let advertised = SocketAddr::new(if cfg.bind.is_unspecified() { local_ip } else { cfg.bind }, port);
    write_record(&mut to_zero, &encode_join(cfg.size, &advertised, hello))
        .map_err(|e| setup_err(cfg, format!("sending join to rank 0: {e}")))?;
    to_zero.stream.set_read_timeout(Some(cfg.setup_timeout + AUTH_TIMEOUT)).map_err(|e| setup_err(cfg, e))?;
    let answer = read_record(&mut to_zero, 1 << 20)
        .map_err(|e| setup_err(cfg, format!("no answer from rank 0 during start-up: {e}")))?;
    match decode_answer(&answer, cfg.size).map_err(|e| setup_err(cfg, e))? {
        Answer::Aborted(reason) => Err(TransportError::JobAborted(reason)),
        Answer::Roster(roster) if roster[cfg.rank] != advertised.to_string() => Err(setup_err(
            cfg,
            format!(
                "roster from rank 0 gives this rank the address {:?}, but it listens on {advertised}",
                roster[cfg.rank]
            ),
        )),
        Answer::Roster(roster) => Ok((to_zero, roster)),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::seal::SessionKeys;
    use std::net::TcpStream;

    #[test]
    fn join_record_round_trips() {
        let listen: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let v = encode_join(5, &listen, b"hello bytes");
        assert_eq!(&v[..8], &[5, 0, 0, 0, 13, 0, 0, 0]);
        assert_eq!(&v[8..21], b"10.1.2.3:4567");
        let j = decode_join(&v).unwrap();
        assert_eq!(j, Join { size: 5, addr: "10.1.2.3:4567".into(), hello: b"hello bytes".to_vec() });
        let empty = decode_join(&encode_join(2, &"[::1]:9".parse().unwrap(), &[])).unwrap();
        assert_eq!((empty.size, empty.addr.as_str(), empty.hello.len()), (2, "[::1]:9", 0));
    }

    #[test]
    fn join_record_refuses_truncated_and_garbage() {
        let listen: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let v = encode_join(5, &listen, &[]);
        for n in 0..v.len() {
            assert!(decode_join(&v[..n]).is_none(), "truncated to {n}");
        }
        let mut long = v.clone();
        long[4..8].copy_from_slice(&[0xff; 4]);
        assert!(decode_join(&long).is_none(), "address length beyond the record");
        let mut utf8 = v.clone();
        utf8[8] = 0xff;
        assert!(decode_join(&utf8).is_none(), "address not UTF-8");
        for garbage in [&[0xa5u8; 64][..], &[0xff; 8], &[]] {
            assert!(decode_join(garbage).is_none());
        }
    }

    /// A xorshift64 generator: the bounded in-suite fuzz runs' randomness, the same every run.
    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// `valid` with one to three bits flipped, and one time in four cut short.
    fn mutated(valid: &[u8], next: &mut impl FnMut() -> u64) -> Vec<u8> {
        let mut m = valid.to_vec();
        for _ in 0..=(next() % 3) {
            let at = (next() % m.len() as u64) as usize;
            m[at] ^= 1 << (next() % 8);
        }
        if next().is_multiple_of(4) {
            m.truncate((next() % m.len() as u64) as usize);
        }
        m
    }

    /// A bounded in-suite fuzz run of the join record: a million random and mutated records,
    /// no panic, and an accepted record never claims more bytes than it has.
    #[test]
    fn fuzz_the_join_record() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let valid = encode_join(7, &"127.0.0.1:40000".parse().unwrap(), b"hello");
        for _ in 0..500_000 {
            let len = (next() % 40) as usize;
            let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(j) = decode_join(&random) {
                assert!(j.addr.len() + j.hello.len() + 8 == random.len());
            }
            let m = mutated(&valid, &mut next);
            if let Some(j) = decode_join(&m) {
                assert!(j.addr.len() + j.hello.len() + 8 == m.len());
            }
        }
    }

    fn roster(addrs: &[&str]) -> Vec<String> {
        addrs.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn roster_answers_round_trip() {
        let addrs = roster(&["head-node:7000", "10.0.0.2:41000", "[fd00::3]:9"]);
        assert_eq!(decode_answer(&encode_roster(&addrs), 3), Ok(Answer::Roster(addrs)));
        assert_eq!(decode_answer(b"Ano room", 3), Ok(Answer::Aborted("no room".into())));
        assert_eq!(decode_answer(b"A\xffx", 3), Ok(Answer::Aborted("\u{fffd}x".into())), "a reason is only shown");
    }

    #[test]
    fn roster_answers_that_cannot_be_used_are_refused_by_name() {
        let three = encode_roster(&roster(&["a:1", "b:2", "c:3"]));
        assert_eq!(decode_answer(&three, 4), Err(AnswerError::WrongLength { got: 3, size: 4 }));
        assert_eq!(decode_answer(&three, 2), Err(AnswerError::WrongLength { got: 3, size: 2 }));
        assert_eq!(decode_answer(b"", 1), Err(AnswerError::Malformed));
        assert_eq!(decode_answer(b"Xa:1", 1), Err(AnswerError::Malformed));
        assert_eq!(decode_answer(b"Oa:\xff", 1), Err(AnswerError::NotUtf8));
        for bad in ["", "a", "a:", ":1", "a:0", "a:65536", "a:+1", "a b:1", "a:1 ", "a\t:1"] {
            let v = encode_roster(&roster(&["a:1", bad]));
            assert_eq!(
                decode_answer(&v, 2),
                Err(AnswerError::BadAddress { rank: 1, addr: bad.into() }),
                "{bad:?} is not host:port"
            );
        }
        let msg = decode_answer(&encode_roster(&roster(&["a:1", "b:0"])), 2).unwrap_err().to_string();
        assert_eq!(msg, r#"roster from rank 0 gives rank 1 the address "b:0", which is not host:port"#);
    }

    /// A bounded in-suite fuzz run of the roster answer: random and mutated answers never panic,
    /// and what is accepted has exactly the ranks asked for and is the one encoding of itself.
    #[test]
    fn fuzz_the_roster_answer() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let valid = encode_roster(&roster(&["node0:7000", "127.0.0.1:40001", "[::1]:40002"]));
        let check = |v: &[u8], size: usize| match decode_answer(v, size) {
            Ok(Answer::Roster(r)) => {
                assert_eq!(r.len(), size);
                assert_eq!(encode_roster(&r), v);
            }
            Ok(Answer::Aborted(_)) => assert_eq!(v[0], b'A'),
            Err(_) => {}
        };
        for _ in 0..300_000 {
            let len = (next() % 24) as usize;
            let mut random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = random.first_mut() {
                *first = [b'O', b'A', next() as u8][(next() % 3) as usize];
            }
            check(&random, (next() % 4) as usize);
            check(&mutated(&valid, &mut next), 3);
        }
    }

    /// A rank whose rank 0 answers `answer` (with the secret `secret`): what its start-up says.
    fn join_answered_with(answer: impl FnOnce(SocketAddr) -> Vec<u8> + Send + 'static) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let coordinator = listener.local_addr().unwrap();
        let token = b"roster-test".to_vec();
        let fake_rank0 = {
            let token = token.clone();
            std::thread::spawn(move || {
                let doorman = Keeper::for_joins(&listener, &token, || {}).unwrap();
                let (mut conn, rank) = doorman.next(Instant::now() + std::time::Duration::from_secs(10)).unwrap();
                assert_eq!(rank, 1);
                let join = decode_join(&read_record(&mut conn, 1 << 20).unwrap()).unwrap();
                write_record(&mut conn, &answer(join.addr.parse().unwrap())).unwrap();
                // Held open until the joining rank has read the answer and given up.
                let _ = conn.stream.read(&mut [0u8; 1]);
            })
        };
        let mem: &'static mut [u8] = Box::leak(vec![0u8; 4096].into_boxed_slice());
        let cfg = TcpConfig {
            rank: 1,
            size: 2,
            coordinator: coordinator.to_string(),
            coordinator_held: false,
            bind: "127.0.0.1".parse().unwrap(),
            token,
            view: crate::MemoryView { base: mem.as_mut_ptr(), len: mem.len() },
            setup_timeout: std::time::Duration::from_secs(10),
            link_timeout: std::time::Duration::from_secs(5),
            owed: None,
            serves: None,
            thread_start: || {},
        };
        let err = match establish(&cfg, b"hello", &|_: &[Vec<u8>]| Ok(())) {
            Ok(_) => panic!("start-up went on with a roster it should refuse"),
            Err(e) => e.to_string(),
        };
        fake_rank0.join().unwrap();
        err
    }

    #[test]
    fn a_roster_that_is_wrong_for_this_rank_stops_its_start_up_with_a_clear_error() {
        let err = join_answered_with(|_| encode_roster(&roster(&["a:1", "b:2", "c:3"])));
        assert!(err.contains("rank 1: roster from rank 0 has 3 addresses for a job of 2"), "{err}");
        let err = join_answered_with(|_| encode_roster(&roster(&["a:1", "127.0.0.1:9"])));
        assert!(
            err.contains(
                r#"rank 1: roster from rank 0 gives this rank the address "127.0.0.1:9", but it listens on 127.0.0.1:"#
            ),
            "{err}"
        );
        let err = join_answered_with(|ours| [&b"O"[..], format!("a:1\n{ours}").as_bytes(), b"\n"].concat());
        assert!(err.contains("roster from rank 0 has 3 addresses"), "{err}");
        let err = join_answered_with(|_| b"Arank 0 says no".to_vec());
        assert!(err.contains("rank 0 says no"), "{err}");
    }

    fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// Two ends of one connection with the keys of one session.
    pub(in crate::tcp) fn conn_pair() -> (Conn, Conn) {
        let (a, b) = socket_pair();
        let secret = [7u8; 32];
        (
            Conn { stream: a, keys: SessionKeys::derive(&secret, crate::seal::Role::Connector) },
            Conn { stream: b, keys: SessionKeys::derive(&secret, crate::seal::Role::Acceptor) },
        )
    }

    #[test]
    fn records_round_trip_and_refuse_bad_lengths_and_tags() {
        let (mut a, mut b) = conn_pair();
        write_record(&mut a, b"abc").unwrap();
        write_record(&mut a, &[]).unwrap();
        assert_eq!(read_record(&mut b, 3).unwrap(), b"abc");
        assert_eq!(read_record(&mut b, 3).unwrap(), b"");
        write_record(&mut a, b"abcd").unwrap();
        assert_eq!(read_record(&mut b, 3).unwrap_err().kind(), std::io::ErrorKind::InvalidData);

        // A record changed on the way, or not from the session's other end.
        let (mut a, mut b) = conn_pair();
        let mut changed = fuzzing::sealed_record(b"abc");
        changed[5] ^= 1;
        a.stream.write_all(&changed).unwrap();
        let e = read_record(&mut b, 100).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");

        let (mut a, mut b) = conn_pair();
        a.stream.write_all(&[10, 0, 0, 0, 1, 2]).unwrap();
        drop(a);
        assert_eq!(read_record(&mut b, 100).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        let (mut a, mut b) = conn_pair();
        a.stream.write_all(&[10, 0]).unwrap();
        drop(a);
        assert_eq!(read_record(&mut b, 100).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
