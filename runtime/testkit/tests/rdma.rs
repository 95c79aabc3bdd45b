//! Start-up of the RDMA transport: `--transport rdma` without what it needs fails at once with a
//! message naming what is missing; `auto` says which transport it chose.
//!
//! These run against the real verbs stack. On a machine without an RDMA device (the CI host) the
//! no-device cases run; with one (the Soft-RoCE guest `.ci/run` boots) the cases that need a
//! device run. Each test prints when it skips part of itself for lack of a device.
//!
//! They need a build with the RDMA transport (`--features gallocy/rdma`, or this package's
//! feature `rdma`); in a build without it (`gallocy::RDMA_BUILT` is false) each says so and
//! passes.

use gallocy_testkit::*;
use std::os::unix::process::CommandExt;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// True if the kernel has an RDMA device (what libibverbs would list).
fn has_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// True (after printing why `test` skips) if this build has no RDMA transport.
fn not_built(test: &str) -> bool {
    if !gallocy::RDMA_BUILT {
        eprintln!("SKIP {test}: this build has no RDMA transport (build with `--features gallocy/rdma`)");
    }
    !gallocy::RDMA_BUILT
}

fn skip(what: &str) {
    eprintln!("SKIP {what}: no RDMA device on this machine (run it in the Soft-RoCE guest, see .ci/run)");
}

/// Runs a 2-rank fill64 job whose ranks get `env` (per rank) and expects every rank to fail with
/// a message containing each of `needles`.
fn expect_job_fails(what: &str, env: &[(usize, &str, &str)], needles: &[&str]) {
    let mut b = Job::builder(2);
    for (r, k, v) in env {
        b = b.env(*r, k, v);
    }
    let mut job = b.spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail(what, T);
    for r in 0..2 {
        assert!(job.ranks[r].status().is_some_and(|s| !s.success()), "{what}: rank {r} must fail\n{}", job.report());
        let err = job.ranks[r].stderr();
        for n in needles {
            assert!(err.contains(n), "{what}: rank {r}'s error must contain {n:?}\n{}", job.report());
        }
    }
}

fn both(key: &'static str, value: &'static str) -> [(usize, &'static str, &'static str); 2] {
    [(0, key, value), (1, key, value)]
}

#[test]
fn rdma_without_a_device_names_what_is_missing() {
    if not_built("rdma_without_a_device_names_what_is_missing") {
        return;
    }
    let _g = serial();
    let transport = both("GALLOCY_TRANSPORT", "rdma");
    if has_device() {
        let mut env = transport.to_vec();
        env.extend(both("GALLOCY_RDMA_DEVICE", "gallocy_no_such_device"));
        expect_job_fails(
            "GALLOCY_RDMA_DEVICE=gallocy_no_such_device",
            &env,
            &["--transport rdma", "no device named \"gallocy_no_such_device\"", "rank 0", "rank 1"],
        );
    } else {
        expect_job_fails(
            "GALLOCY_TRANSPORT=rdma without a device",
            &transport,
            &["--transport rdma", "no RDMA device found", "rank 0"],
        );
    }
}

#[test]
fn auto_says_which_transport_it_chose() {
    if not_built("auto_says_which_transport_it_chose") {
        return;
    }
    let _g = serial();
    let mut job = Job::builder(2).env_all("GALLOCY_TRANSPORT", "auto").spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("GALLOCY_TRANSPORT=auto", T);
    job.assert_all_ok("GALLOCY_TRANSPORT=auto", "fill64");
    let err = job.ranks[0].stderr();
    let want =
        if has_device() { "gallocy: transport: rdma (" } else { "gallocy: transport: tcp (auto: rank 0: no RDMA" };
    assert!(err.contains(want), "rank 0 must say {want:?}\n{}", job.report());
    assert!(!job.ranks[1].stderr().contains("gallocy: transport:"), "only rank 0 says it\n{}", job.report());
}

#[test]
fn auto_falls_back_to_tcp_when_one_rank_has_no_rdma() {
    if not_built("auto_falls_back_to_tcp_when_one_rank_has_no_rdma") {
        return;
    }
    if !has_device() {
        return skip("auto_falls_back_to_tcp_when_one_rank_has_no_rdma");
    }
    let _g = serial();
    let mut job = Job::builder(3)
        .env_all("GALLOCY_TRANSPORT", "auto")
        .env(2, "GALLOCY_RDMA_DEVICE", "gallocy_no_such_device")
        .spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("auto with rank 2 lacking RDMA", T);
    job.assert_all_ok("auto with rank 2 lacking RDMA", "fill64");
    let err = job.ranks[0].stderr();
    assert!(
        err.contains("gallocy: transport: tcp (auto: rank 2: no RDMA: no device named"),
        "rank 0 must say the job runs on TCP because of rank 2\n{}",
        job.report()
    );
}

#[test]
fn wrong_gid_index_is_named() {
    if not_built("wrong_gid_index_is_named") {
        return;
    }
    if !has_device() {
        return skip("wrong_gid_index_is_named");
    }
    let _g = serial();
    let mut env = both("GALLOCY_TRANSPORT", "rdma").to_vec();
    env.extend(both("GALLOCY_RDMA_GID_INDEX", "99"));
    expect_job_fails("GALLOCY_RDMA_GID_INDEX=99", &env, &["GID index 99 is not valid", "GALLOCY_RDMA_GID_INDEX"]);
}

#[test]
fn bad_rdma_port_is_a_configuration_error() {
    if not_built("bad_rdma_port_is_a_configuration_error") {
        return;
    }
    let _g = serial();
    let mut env = both("GALLOCY_TRANSPORT", "rdma").to_vec();
    env.extend(both("GALLOCY_RDMA_PORT", "0"));
    expect_job_fails("GALLOCY_RDMA_PORT=0", &env, &["GALLOCY_RDMA_PORT"]);
}

/// Starts a 2-rank job over RDMA whose ranks run `args` with RLIMIT_MEMLOCK at `kib` KiB and
/// without CAP_IPC_LOCK (root would lock memory regardless of the limit), the heap registered as
/// `GALLOCY_RDMA_ODP=odp` says.
fn job_with_memlock_limit(kib: u64, odp: &str, args: &[&str]) -> Job {
    let b = Job::builder(2).env_all("GALLOCY_TRANSPORT", "rdma").env_all("GALLOCY_RDMA_ODP", odp);
    let mut ranks = Vec::new();
    for r in 0..2 {
        let mut cmd = b.command(r, args);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Give up CAP_IPC_LOCK for good (bounding and inheritable sets), then set the limit.
                const CAP_IPC_LOCK: libc::c_ulong = 14;
                libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0);
                drop_inheritable_caps();
                let lim = libc::rlimit { rlim_cur: kib << 10, rlim_max: kib << 10 };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        ranks.push(Proc::spawn(format!("rank {r}"), &mut cmd));
    }
    b.job(ranks)
}

fn says_raise_ulimit(err: &str) -> bool {
    err.contains("RLIMIT_MEMLOCK") && err.contains("raise `ulimit -l`")
}

#[test]
fn memlock_limit_too_low_says_raise_ulimit() {
    if not_built("memlock_limit_too_low_says_raise_ulimit") {
        return;
    }
    if !has_device() {
        return skip("memlock_limit_too_low_says_raise_ulimit");
    }
    let _g = serial();
    // Below the first message buffers (24 KiB), which are pinned however the heap is registered.
    let mut job = job_with_memlock_limit(16, "auto", &["fill64", "--mib", "1"]);
    job.wait_or_fail("RLIMIT_MEMLOCK of 16 KiB", T);
    for r in 0..2 {
        assert!(job.ranks[r].status().is_some_and(|s| !s.success()), "rank {r} must fail\n{}", job.report());
        assert!(says_raise_ulimit(&job.ranks[r].stderr()), "rank {r} must say to raise ulimit -l\n{}", job.report());
    }
}

/// The limit admits the start (message buffers and one heap chunk) but not the heap a 16 MiB
/// fill pins as it is read (`GALLOCY_RDMA_ODP=off`: pinned): the rank whose registration is
/// refused names the limit, the other learns that it left, and neither hangs.
#[test]
fn memlock_limit_reached_as_the_heap_grows_ends_the_job_naming_the_limit() {
    if not_built("memlock_limit_reached_as_the_heap_grows_ends_the_job_naming_the_limit") {
        return;
    }
    if !has_device() {
        return skip("memlock_limit_reached_as_the_heap_grows_ends_the_job_naming_the_limit");
    }
    let _g = serial();
    let mut job = job_with_memlock_limit(4096, "off", &["fill64", "--mib", "16"]);
    job.wait_or_fail("RLIMIT_MEMLOCK of 4 MiB, 16 MiB read", T);
    let report = job.report();
    assert!(report.contains("gallocy: transport: rdma ("), "the job must start on RDMA\n{report}");
    assert!(report.contains("heap pinned)"), "GALLOCY_RDMA_ODP=off must pin the heap\n{report}");
    for r in 0..2 {
        assert!(job.ranks[r].status().is_some_and(|s| !s.success()), "rank {r} must fail\n{report}");
        assert!(job.ranks[r].stderr().contains("fatal"), "rank {r} must end with a fatal line\n{report}");
    }
    assert!(
        (0..2).any(|r| says_raise_ulimit(&job.ranks[r].stderr())),
        "a rank must name RLIMIT_MEMLOCK and say to raise ulimit -l\n{report}"
    );
}

/// With on-demand paging (the default where the device reads such memory) the heap pins nothing:
/// the same 4 MiB limit that stops a pinned 16 MiB fill above lets it run to its checked end.
/// Where the device cannot, `GALLOCY_RDMA_ODP=on` is refused at start-up, naming the variable.
#[test]
fn with_on_demand_paging_the_memlock_limit_does_not_cap_the_heap() {
    let what = "with_on_demand_paging_the_memlock_limit_does_not_cap_the_heap";
    if not_built(what) {
        return;
    }
    if !has_device() {
        return skip(what);
    }
    let _g = serial();
    if !rdma_on_demand_reads() {
        eprintln!("note: {what}: this device cannot read on-demand-paging memory: checking that GALLOCY_RDMA_ODP=on is refused");
        expect_job_fails(
            "GALLOCY_RDMA_ODP=on without on-demand paging",
            &[both("GALLOCY_TRANSPORT", "rdma"), both("GALLOCY_RDMA_ODP", "on")].concat(),
            &["GALLOCY_RDMA_ODP=on"],
        );
        return;
    }
    for odp in ["auto", "on"] {
        let label = format!("GALLOCY_RDMA_ODP={odp}, RLIMIT_MEMLOCK of 4 MiB, 16 MiB read");
        let mut job = job_with_memlock_limit(4096, odp, &["fill64", "--mib", "16"]);
        job.wait_or_fail(&label, T);
        job.assert_all_ok(&label, "fill64");
        let report = job.report();
        assert!(report.contains("heap on-demand paging)"), "{label}: the heap must be on demand\n{report}");
    }
}

/// Clears the inheritable capability set (capset(2), version 3). Async-signal-safe.
unsafe fn drop_inheritable_caps() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header { version: 0x2008_0522, pid: 0 };
    let mut d = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: valid header and a two-element data array, as version 3 requires.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) == 0 {
            d[0].inheritable = 0;
            d[1].inheritable = 0;
            libc::syscall(libc::SYS_capset, &mut h, d.as_ptr());
        }
    }
}

#[test]
fn rdma_job_runs_on_rdma_and_moves_pages() {
    if not_built("rdma_job_runs_on_rdma_and_moves_pages") {
        return;
    }
    if !has_device() {
        return skip("rdma_job_runs_on_rdma_and_moves_pages");
    }
    let _g = serial();
    let mut job = Job::builder(3).env_all("GALLOCY_TRANSPORT", "rdma").spawn(&["fill64", "--mib", "2"]);
    job.wait_or_fail("GALLOCY_TRANSPORT=rdma fill64", T);
    job.assert_all_ok("GALLOCY_TRANSPORT=rdma fill64", "fill64");
    assert!(job.ranks[0].stderr().contains("gallocy: transport: rdma (rxe"), "{}", job.report());
}

/// With `GALLOCY_RDMA_BUSY_PEERS=0` no peer gets more than its first message buffers: a job of
/// lock, barrier and page traffic still runs to its checked end over the narrow windows.
#[test]
fn a_job_where_no_peer_may_become_busy_runs_over_rdma() {
    if not_built("a_job_where_no_peer_may_become_busy_runs_over_rdma") {
        return;
    }
    if !has_device() {
        return skip("a_job_where_no_peer_may_become_busy_runs_over_rdma");
    }
    let _g = serial();
    let what = "GALLOCY_RDMA_BUSY_PEERS=0 counter";
    let mut job = Job::builder(3)
        .env_all("GALLOCY_TRANSPORT", "rdma")
        .env_all("GALLOCY_RDMA_BUSY_PEERS", "0")
        .spawn(&["counter", "--total", "3000", "--threads", "2"]);
    job.wait_or_fail(what, T);
    job.assert_all_ok(what, "counter");
    assert!(job.ranks[0].stderr().contains("gallocy: transport: rdma (rxe"), "{}", job.report());
}
