//! A large job on one host: 128 ranks started by `gallocy run`, every kind of traffic once
//! (`gallocy-scenario scale`), checked bit-exact. Prints the start-up time (launch to the last
//! rank out of `init`).
//!
//! Over RDMA (CI's run in the Soft-RoCE guest) the job has 16 ranks: the emulated guest has
//! neither the memory nor the CPUs for 128 processes with their RDMA threads and registrations.

use gallocy_testkit::*;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[test]
fn a_job_of_128_ranks_runs_on_one_host() {
    let _g = serial();
    let rdma = transport().is_some_and(|t| t == "rdma");
    let n: usize = if rdma { 16 } else { 128 };
    let n_s = n.to_string();
    let mut cmd = Command::new(launcher());
    clean_env_with_transport(&mut cmd).args(["run", "-n", &n_s, "--", scenario().to_str().unwrap(), "scale"]);
    let started_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    let r = run(&format!("gallocy run -n {n} -- gallocy-scenario scale"), &mut cmd, limit(Duration::from_secs(300)));
    let report = r.report();
    assert_eq!(r.code(), Some(0), "the job must succeed\n{}", tail(&report, 8000));
    let ok = r.stdout.lines().filter(|l| l.contains(": scale ok (")).count();
    assert_eq!(ok, n, "every rank must pass\n{}", tail(&report, 8000));
    let joined: Vec<u128> =
        r.stdout.lines().filter_map(|l| l.split_once("joined_ms ").and_then(|(_, t)| t.trim().parse().ok())).collect();
    assert_eq!(joined.len(), n, "every rank must say when it joined\n{}", tail(&report, 8000));
    // Start-up's handshake threads are gone: the program's thread and the service thread remain,
    // on every rank but 0 (which links everyone at start-up) the connection keeper and the
    // dialer, and over RDMA the connector, which makes queue pairs on first use.
    let (rank0, others) = if rdma { ("threads 3,", "threads 5,") } else { ("threads 2,", "threads 4,") };
    let extra: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.contains(": scale ok ("))
        .filter(|l| !l.contains(if l.contains("rank 0: scale ok") { rank0 } else { others }))
        .collect();
    assert!(
        extra.is_empty(),
        "ranks kept threads beyond the program's, the service thread, the keeper, the dialer (and the \
         RDMA connector):\n{}",
        extra.join("\n")
    );
    if !rdma {
        // Connections are made on first use: a rank holds those to rank 0, its two heartbeat
        // neighbours, its barrier partners (2 per round, 7 rounds) and the few peers whose
        // pages, lock and broadcast it used, not one per peer.
        let sockets: Vec<usize> = r
            .stdout
            .lines()
            .filter(|l| !l.contains("rank 0: scale ok"))
            .filter_map(|l| l.split_once("sockets ").and_then(|(_, t)| t.trim_end_matches(')').trim().parse().ok()))
            .collect();
        assert_eq!(sockets.len(), n - 1, "every rank but 0 must count its sockets\n{}", tail(&report, 8000));
        let mut sorted = sockets.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        // (The home of the shared counter page hears from every rank: it may hold one per peer.)
        assert!(median <= 32, "the median rank of {n} holds {median} sockets: connections are not made on first use");
        eprintln!("sockets per rank (but 0): median {median}, most {}", sorted.last().unwrap());
    }
    let last = joined.iter().max().unwrap();
    // Each rank's `NAME N kB`, sorted.
    let sorted_kib = |name: &str| {
        let mut v: Vec<u64> = r
            .stdout
            .lines()
            .filter_map(|l| l.split_once(name).and_then(|(_, t)| t.split_whitespace().next()?.parse().ok()))
            .collect();
        v.sort_unstable();
        v
    };
    let (rss_kib, pinned_kib) = (sorted_kib("rss "), sorted_kib("pinned "));
    eprintln!(
        "{n} ranks: start-up {:.2} s (launch to the last rank out of init), whole job {:.2} s; \
         RSS per rank at the end: min {} KiB, median {} KiB, max {} KiB; pinned: median {} KiB, max {} KiB",
        (*last as f64 - started_ms as f64) / 1e3,
        r.elapsed.as_secs_f64(),
        rss_kib.first().unwrap_or(&0),
        rss_kib.get(rss_kib.len() / 2).unwrap_or(&0),
        rss_kib.last().unwrap_or(&0),
        pinned_kib.get(pinned_kib.len() / 2).unwrap_or(&0),
        pinned_kib.last().unwrap_or(&0),
    );
}
