//! The job secret: a stranger connecting to the coordinator learns nothing and cannot disturb
//! the job; a rank with the wrong GALLOCY_TOKEN cannot join.

use gallocy_testkit::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connect to `addr`, send garbage, read until the peer closes. Returns the bytes received, or
/// None if the connection was refused (nobody listening any more). Fails if the connection is
/// still open after 10 s.
fn garbage_probe(addr: &str) -> Option<Vec<u8>> {
    let mut s = match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return None,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    let mut garbage = b"GET / HTTP/1.1\r\nHost: gallocy\r\n\r\n".to_vec();
    garbage.extend((0..1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    // The peer may close before reading everything: errors here are fine.
    let _ = s.write_all(&garbage);
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "the coordinator kept a connection that sent garbage open for 10 s ({} bytes received)",
                    got.len()
                );
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
                ) =>
            {
                break
            }
            Err(e) => panic!("reading from {addr}: {e}"),
        }
    }
    Some(got)
}

/// True once a socket listens on TCP `port` (IPv4), read from /proc/net/tcp: connecting to find out
/// would itself be a stranger's connection.
fn listening(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // f[1]: local address (hex ip:port), f[3]: state (0A = LISTEN).
            f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A"
        })
    })
}

#[test]
fn garbage_connection_is_closed_and_job_survives() {
    let _g = serial();
    let args = &["jacobi", "--n", "64", "--iters", "80", "--progress", "--slow-ms", "30"];
    let b = Job::builder(4);
    // Ranks 0..=2 first: the coordinator is certainly accepting while it waits for rank 3, once it
    // listens (a fixed pause was too short where start-up is slow: an emulated guest, RDMA set-up).
    let mut ranks: Vec<Proc> = (0..3).map(|r| b.spawn_rank(r, args)).collect();
    let port: u16 = b.coordinator.rsplit(':').next().unwrap().parse().unwrap();
    let t0 = Instant::now();
    while !listening(port) {
        if t0.elapsed() > Duration::from_secs(60) || ranks[0].poll().is_some() {
            let job = b.job(ranks);
            panic!("rank 0 never listened on {} (waited {:?})\n{}", b.coordinator, t0.elapsed(), job.report());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let during_startup = garbage_probe(&b.coordinator);
    ranks.push(b.spawn_rank(3, args));
    let mut job = b.job(ranks);
    let running = job.ranks[0].wait_for_stdout(Duration::from_secs(60), |o| count_lines(o, "iteration ") >= 2);
    assert!(running, "the job did not start iterating\n{}", job.report());
    let while_running = garbage_probe(&b.coordinator);
    job.wait_or_fail("job probed with garbage", Duration::from_secs(120));
    let got = during_startup.unwrap_or_else(|| {
        panic!("connection to the coordinator {} refused while it waited for rank 3\n{}", b.coordinator, job.report())
    });
    assert!(
        got.len() <= 64,
        "a stranger received {} bytes during start-up (at most the 64-byte hello allowed): {:02x?}",
        got.len(),
        got
    );
    if let Some(got) = &while_running {
        assert!(got.len() <= 64, "a stranger received {} bytes while the job ran: {:02x?}", got.len(), got);
    }
    eprintln!(
        "probe during start-up: {} bytes before close; while running: {}",
        got.len(),
        while_running.map_or("refused".to_string(), |g| format!("{} bytes before close", g.len()))
    );
    job.assert_all_ok("job probed with garbage", "jacobi");
}

#[test]
fn rank_with_wrong_token_cannot_join() {
    let _g = serial();
    // GALLOCY_SETUP_TIMEOUT bounds how long the others wait for the rank that never joins.
    let mut job = Job::builder(4)
        .env_all("GALLOCY_SETUP_TIMEOUT", "10")
        .env(3, "GALLOCY_TOKEN", "not-the-job-secret")
        .spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("rank 3 with a wrong GALLOCY_TOKEN", Duration::from_secs(60));
    let report = job.report();
    for r in 0..4 {
        assert!(
            job.ranks[r].status().is_some_and(|s| !s.success()),
            "rank {r} must exit non-zero when rank 3 cannot join\n{report}"
        );
    }
    let err = job.ranks[3].stderr().to_lowercase();
    assert!(
        err.contains("token") || err.contains("auth"),
        "rank 3's error does not say the token / authentication failed\n{report}"
    );
    // "rank 3" or, in a list of missing ranks, "ranks 3".
    let e0 = job.ranks[0].stderr();
    assert!(e0.contains("rank 3") || e0.contains("ranks 3"), "rank 0's error must name rank 3\n{report}");
}

#[test]
fn idle_strangers_at_start_up_delay_nobody() {
    let _g = serial();
    let args = &["fill64", "--mib", "1"];
    let b = Job::builder(3);
    let mut ranks: Vec<Proc> = vec![b.spawn_rank(0, args)];
    let port: u16 = b.coordinator.rsplit(':').next().unwrap().parse().unwrap();
    let t0 = Instant::now();
    while !listening(port) {
        if t0.elapsed() > Duration::from_secs(60) || ranks[0].poll().is_some() {
            let job = b.job(ranks);
            panic!("rank 0 never listened on {}\n{}", b.coordinator, job.report());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ten connections that never say a word, held open while the other ranks join.
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect_timeout(&b.coordinator.parse().unwrap(), Duration::from_secs(5)).unwrap())
        .collect();
    let joined_at = Instant::now();
    ranks.push(b.spawn_rank(1, args));
    ranks.push(b.spawn_rank(2, args));
    let mut job = b.job(ranks);
    job.wait_or_fail("a job with 10 idle strangers connected to its coordinator", Duration::from_secs(120));
    let took = joined_at.elapsed();
    drop(idle);
    job.assert_all_ok("a job with 10 idle strangers connected to its coordinator", "fill64");
    // Before, each stranger held the door for its 5 s handshake timeout, one after the other.
    assert!(took < limit(Duration::from_secs(8)), "the job took {took:?} with 10 idle strangers\n{}", job.report());
    eprintln!("3 ranks joined and ran past 10 idle strangers in {took:?}");
}
