//! Jobs across hosts with default settings: three ranks, each in its own network namespace (its
//! "host"), joined by a bridge in a fourth one, started with nothing but GALLOCY_COORDINATOR
//! (rank 0's address), GALLOCY_RANK, GALLOCY_SIZE and GALLOCY_TOKEN, as `mpirun`/`srun` start
//! them. No rank can reach another's loopback, so a job only assembles if every rank listens on,
//! and tells its peers, an address they can reach (`listen_address` in
//! runtime/src/job/bootstrap.rs).
//!
//! - a linked program (the runtime's `gallocy-scenario jacobi`, checked bit for bit against the
//!   sequential reference), with an IPv4 and with an IPv6 coordinator;
//! - a C program under `LD_PRELOAD=libgallocy.so` (rank 0 fills a `gallocy_alloc_collective`
//!   buffer and shares a `malloc`ed string, the others check both);
//! - `GALLOCY_BIND` still overrides the default (an address, the wildcard, and loopback, which
//!   then fails as it must), and a host without a route to the coordinator gets an error naming
//!   GALLOCY_COORDINATOR.
//!
//! Needs root and `ip` (iproute2) with network namespaces; without them each test prints why it
//! skips and passes. Traffic stays inside the namespaces: their addresses (10.213.7.0/24,
//! fd21:3:7::/64) exist only there, and the host's own network namespace is never changed. Every
//! test removes its namespaces when it ends, also when it fails (a Drop guard); their names carry
//! this process's pid, so parallel runs do not clash, and namespaces that a killed run left behind
//! (their pid is gone) are removed by the next run. Every process has a hard timeout. The C
//! program needs cc (Debian: gcc) and `libgallocy.so` from `cargo build --workspace --release`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gallocy_testkit::*;

/// One job, start to finish.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);
/// One `ip` or `cc` command.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// Rank 0's port: the namespaces are fresh, so any port is free there.
const PORT: u16 = 7411;
/// Prefix of every namespace these tests create: `gallocy-mh<pid>-<test>-<host>`.
const PREFIX: &str = "gallocy-mh";
/// Hosts (ranks) of every job.
const HOSTS: usize = 3;

/// The address of host `k` (0-based; rank k runs on host k).
fn v4(k: usize) -> String {
    format!("10.213.7.{}", k + 1)
}

fn v6(k: usize) -> String {
    format!("fd21:3:7::{}", k + 1)
}

/// Runs a tool to completion with a hard timeout; `Err` (with its output) if it fails.
fn tool(label: &str, cmd: &mut Command) -> Result<(), String> {
    let mut p = Proc::spawn(label, cmd);
    if !p.wait_or_kill(TOOL_TIMEOUT) {
        return Err(format!("{label}: did not finish within {TOOL_TIMEOUT:?}; killed\n{}", p.report()));
    }
    if p.status().is_some_and(|s| s.success()) {
        Ok(())
    } else {
        Err(format!("{label}: {}: {}", describe(p.status()), p.stderr().trim()))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    tool(&format!("ip {}", args.join(" ")), &mut cmd)
}

/// Three "hosts" (network namespaces) on one bridge (in a fourth). Dropping it removes them all.
struct Hosts {
    hosts: Vec<String>,
    /// Every namespace created so far (the hosts and the bridge's), removed on drop.
    created: Vec<String>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("multihost: warning: cannot remove network namespace {ns}: {e}");
            }
        }
    }
}

impl Hosts {
    /// Host `k`'s namespace.
    fn ns(&self, k: usize) -> &str {
        &self.hosts[k]
    }

    /// `cmd` to be run in host `k`'s network namespace (the child enters it before `exec`).
    fn command(&self, k: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let path = format!("/run/netns/{}", self.ns(k));
        let ns = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        let mut cmd = Command::new(program);
        clean_env(&mut cmd);
        // SAFETY: the closure runs in the forked child before exec and only makes the setns(2)
        // system call on a file descriptor it owns (moved into the closure, kept open until
        // then); it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// Removes namespaces left by runs of this test that were killed (their pid no longer exists).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    let me = std::process::id().to_string();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

/// Builds the hosts of test `tag`, or says why this machine cannot (not root, no `ip`, no
/// network namespaces, no IPv6). Another failure after the first namespace exists fails the test.
fn hosts(tag: &str, with_v6: bool) -> Result<Hosts, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (creating network namespaces needs root)".into());
    }
    if find_in_path("ip").is_none() {
        return Err("`ip` not found in PATH (Debian: apt-get install iproute2)".into());
    }
    if let Some(t) = transport().filter(|t| t != "tcp") {
        return Err(format!(
            "GALLOCY_TRANSPORT={t}: the namespaces have no RDMA device of their own; this test is about TCP addresses"
        ));
    }
    remove_stale();
    let base = format!("{PREFIX}{}-{tag}", std::process::id());
    let mut h = Hosts { hosts: Vec::new(), created: Vec::new() };
    let bridge = format!("{base}-br");
    if let Err(e) = ip(&["netns", "add", &bridge]) {
        return Err(format!("`ip netns` is unavailable here: {e}"));
    }
    h.created.push(bridge.clone());
    let must = |r: Result<(), String>| r.unwrap_or_else(|e| panic!("setting up the test's network namespaces: {e}"));
    for k in 0..HOSTS {
        let ns = format!("{base}-{k}");
        must(ip(&["netns", "add", &ns]));
        h.created.push(ns.clone());
        h.hosts.push(ns);
    }
    // mcast_snooping 0: the bridge floods IPv6 neighbour discovery without waiting for MLD.
    must(ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]));
    must(ip(&["-n", &bridge, "link", "set", "br0", "up"]));
    for k in 0..HOSTS {
        let ns = h.hosts[k].clone();
        let port = format!("host{k}");
        // The veth pair is made in the bridge's namespace with its other end straight in the
        // host's: no interface ever exists in the test machine's own namespace.
        must(ip(&["-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]));
        must(ip(&["-n", &bridge, "link", "set", &port, "master", "br0"]));
        must(ip(&["-n", &bridge, "link", "set", &port, "up"]));
        must(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        must(ip(&["-n", &ns, "addr", "add", &format!("{}/24", v4(k)), "dev", "eth0"]));
        if with_v6 {
            // nodad: usable at once, without duplicate address detection's delay.
            if let Err(e) = ip(&["-n", &ns, "addr", "add", &format!("{}/64", v6(k)), "dev", "eth0", "nodad"]) {
                return Err(format!("no IPv6 in this kernel: {e}"));
            }
        }
        must(ip(&["-n", &ns, "link", "set", "eth0", "up"]));
    }
    Ok(h)
}

/// The hosts, or `None` after printing why the test skips.
fn hosts_or_skip(test: &str, tag: &str, with_v6: bool) -> Option<Hosts> {
    match hosts(tag, with_v6) {
        Ok(h) => Some(h),
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

/// The four variables `mpirun`/`srun` users set (rank and size as GALLOCY_*), for rank `r` of a
/// job whose rank 0 listens at `coordinator`.
fn job_env(cmd: &mut Command, r: usize, coordinator: &str, token: &str) {
    cmd.env("GALLOCY_COORDINATOR", coordinator)
        .env("GALLOCY_RANK", r.to_string())
        .env("GALLOCY_SIZE", HOSTS.to_string())
        .env("GALLOCY_TOKEN", token);
    if gallocy::RDMA_BUILT {
        // A build with RDMA would try it (`auto`); the devices of the test machine are not the
        // namespaces' own. Without the feature, `auto` is TCP and nothing is added.
        cmd.env("GALLOCY_TRANSPORT", "tcp");
    }
}

/// Starts rank k on host k with `make(k)`'s command, one per host.
fn spawn_job(coordinator: &str, token: &str, make: &dyn Fn(usize) -> Command) -> Job {
    let ranks = (0..HOSTS)
        .map(|k| {
            let mut cmd = make(k);
            job_env(&mut cmd, k, coordinator, token);
            Proc::spawn(format!("rank {k} (host {k})"), &mut cmd)
        })
        .collect();
    Job::of(ranks, coordinator, token)
}

const JACOBI: [&str; 7] = ["jacobi", "--n", "64", "--iters", "30", "--threads", "1"];

/// The linked program on the three hosts, rank 0's address as the coordinator.
fn linked_job(test: &str, hosts: &Hosts, coordinator: &str) {
    let what = format!("{test}: gallocy-scenario jacobi on 3 hosts, GALLOCY_COORDINATOR={coordinator}");
    let mut job = spawn_job(coordinator, &token(), &|k| {
        let mut cmd = hosts.command(k, scenario());
        cmd.args(JACOBI);
        cmd
    });
    job.wait_or_fail(&what, limit(JOB_TIMEOUT));
    job.assert_all_ok(&what, "jacobi");
    assert!(
        job.ranks[0].stdout().contains("identical to the sequential reference"),
        "{what}: rank 0 did not compare with the reference\n{}",
        job.report()
    );
}

#[test]
fn linked_program_on_three_hosts_with_only_the_coordinator() {
    let test = "linked_program_on_three_hosts_with_only_the_coordinator";
    let _g = serial();
    let Some(hosts) = hosts_or_skip(test, "a", false) else { return };
    linked_job(test, &hosts, &format!("{}:{PORT}", v4(0)));
}

#[test]
fn linked_program_on_three_hosts_with_an_ipv6_coordinator() {
    let test = "linked_program_on_three_hosts_with_an_ipv6_coordinator";
    let _g = serial();
    let Some(hosts) = hosts_or_skip(test, "b", true) else { return };
    linked_job(test, &hosts, &format!("[{}]:{PORT}", v6(0)));
}

/// The preloaded program: gallocy's C API through weak references (resolved by the preloaded
/// library, as in an unmodified program that only gains a few calls), so without the library it
/// stops with exit code 2 instead of passing.
const PRELOAD_C: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gallocy.h"

#pragma weak gallocy_rank
#pragma weak gallocy_size
#pragma weak gallocy_barrier
#pragma weak gallocy_alloc_collective
#pragma weak gallocy_broadcast
#pragma weak gallocy_finalize

#define WORDS ((4u << 20) / 8) /* 4 MiB: 1024 pages, whose homes are on every rank */

static uint64_t pattern(uint64_t i) { return (i + 1) * 0x9e3779b97f4a7c15ull ^ 0x5a5a5a5a; }

static int rank = -1;

static void fail(const char *what, unsigned long long at) {
    fprintf(stderr, "multihost: rank %d: FAIL: %s (%llu)\n", rank, what, at);
    exit(1);
}

int main(void) {
    if (!gallocy_rank || !gallocy_size || !gallocy_alloc_collective || !gallocy_broadcast || !gallocy_barrier ||
        !gallocy_finalize) {
        fprintf(stderr, "multihost: FAIL: gallocy's C API is not resolved: libgallocy.so is not loaded\n");
        return 2;
    }
    rank = gallocy_rank();
    if (gallocy_size() != 3)
        fail("gallocy_size() is not 3", (unsigned long long)gallocy_size());
    uint64_t *data = gallocy_alloc_collective(WORDS * sizeof(uint64_t));
    if (!data)
        fail("gallocy_alloc_collective returned NULL", 0);
    char *greeting = NULL;
    if (rank == 0) {
        for (uint64_t i = 0; i < WORDS; i++)
            data[i] = pattern(i);
        greeting = malloc(64); /* the preloaded malloc: a block of the shared heap */
        if (!greeting)
            fail("malloc returned NULL", 0);
        strcpy(greeting, "written by rank 0 on its host");
    }
    gallocy_broadcast(&greeting, sizeof greeting, 0);
    gallocy_barrier();
    for (uint64_t i = 0; i < WORDS; i++)
        if (data[i] != pattern(i))
            fail("wrong word in rank 0's collective buffer at index", (unsigned long long)i);
    if (strcmp(greeting, "written by rank 0 on its host") != 0)
        fail("rank 0's malloc'ed string reads wrong", 0);
    gallocy_barrier();
    printf("rank %d: preload ok (%u words and a malloc'ed string from rank 0)\n", rank, WORDS);
    fflush(stdout);
    return gallocy_finalize() == 0 ? 0 : 1;
}
"#;

#[test]
fn preloaded_c_program_on_three_hosts_with_only_the_coordinator() {
    let test = "preloaded_c_program_on_three_hosts_with_only_the_coordinator";
    let _g = serial();
    let Some(hosts) = hosts_or_skip(test, "c", false) else { return };
    let lib = libgallocy();
    let cc = require_tool("cc", "gcc");
    let scratch = TempDir::new("multihost");
    let src = scratch.join("multihost.c");
    let bin = scratch.join("multihost");
    std::fs::write(&src, PRELOAD_C).expect("write multihost.c");
    let include = workspace().join("alloc-shim/include");
    let mut cc_cmd = Command::new(&cc);
    clean_env(&mut cc_cmd).args(["-O2", "-Wall", "-Wextra", "-I"]).arg(&include).arg("-o").arg(&bin).arg(&src);
    tool("cc multihost.c", &mut cc_cmd).unwrap_or_else(|e| panic!("{test}: compilation failed: {e}"));

    let coordinator = format!("{}:{PORT}", v4(0));
    let what = format!("{test}: LD_PRELOAD=libgallocy.so multihost on 3 hosts, GALLOCY_COORDINATOR={coordinator}");
    let mut job = spawn_job(&coordinator, &token(), &|k| {
        let mut cmd = hosts.command(k, &bin);
        cmd.env("LD_PRELOAD", &lib);
        cmd
    });
    job.wait_or_fail(&what, limit(JOB_TIMEOUT));
    job.assert_all_ok(&what, "preload");
}

#[test]
fn gallocy_bind_still_overrides_and_no_route_names_the_coordinator() {
    let test = "gallocy_bind_still_overrides_and_no_route_names_the_coordinator";
    let _g = serial();
    let Some(hosts) = hosts_or_skip(test, "d", false) else { return };
    let coordinator = format!("{}:{PORT}", v4(0));

    // An explicit address (rank 1) and the wildcard (rank 2, reached at the address of its
    // connection to rank 0): as documented, and the job runs.
    let what = format!("{test}: GALLOCY_BIND={} on rank 1, 0.0.0.0 on rank 2", v4(1));
    let mut job = spawn_job(&coordinator, &token(), &|k| {
        let mut cmd = hosts.command(k, scenario());
        cmd.args(JACOBI);
        if k == 1 {
            cmd.env("GALLOCY_BIND", v4(1));
        } else if k == 2 {
            cmd.env("GALLOCY_BIND", "0.0.0.0");
        }
        cmd
    });
    job.wait_or_fail(&what, limit(JOB_TIMEOUT));
    job.assert_all_ok(&what, "jacobi");

    // GALLOCY_BIND=127.0.0.1 on rank 2 is obeyed: rank 1, on another host, cannot reach it there.
    // Connections are made on first use: rank 1 is the first to need rank 2 (in the barrier that
    // ends init, it sends to rank 2 first), and it fails naming the address rank 2 gave.
    let what = format!("{test}: GALLOCY_BIND=127.0.0.1 on rank 2 of 3 hosts");
    let mut job = spawn_job(&coordinator, &token(), &|k| {
        let mut cmd = hosts.command(k, scenario());
        cmd.args(JACOBI).env("GALLOCY_SETUP_TIMEOUT", "5");
        if k == 2 {
            cmd.env("GALLOCY_BIND", "127.0.0.1");
        }
        cmd
    });
    job.wait_or_fail(&what, limit(JOB_TIMEOUT));
    for (r, p) in job.ranks.iter().enumerate() {
        assert!(p.status().is_some_and(|s| !s.success()), "{what}: rank {r} must fail\n{}", job.report());
    }
    assert!(
        job.ranks[1].stderr().contains("could not connect to 127.0.0.1:"),
        "{what}: rank 1's error must name the address rank 2 advertised, 127.0.0.1\n{}",
        job.report()
    );

    // A host with no route to the coordinator (10.213.8.0/24 is on no interface): a prompt error
    // naming GALLOCY_COORDINATOR, not a wait for the set-up timeout.
    let unreachable = format!("10.213.8.1:{PORT}");
    let what = format!("{test}: GALLOCY_COORDINATOR={unreachable}, to which host 1 has no route");
    let mut cmd = hosts.command(1, scenario());
    cmd.args(JACOBI);
    job_env(&mut cmd, 1, &unreachable, &token());
    let t0 = Instant::now();
    let mut p = Proc::spawn("rank 1 (host 1)", &mut cmd);
    if !p.wait_or_kill(limit(JOB_TIMEOUT)) {
        panic!("{what}: still running after {:?} (killed)\n{}", limit(JOB_TIMEOUT), p.report());
    }
    assert!(p.status().is_some_and(|s| !s.success()), "{what}: rank 1 must fail\n{}", p.report());
    let err = p.stderr();
    assert!(
        err.contains("GALLOCY_COORDINATOR") && err.contains("10.213.8.1") && err.contains("no route"),
        "{what}: the error must name GALLOCY_COORDINATOR, its address and that there is no route\n{}",
        p.report()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "{what}: took {:.1} s; a missing route is known at once\n{}",
        t0.elapsed().as_secs_f64(),
        p.report()
    );
}
