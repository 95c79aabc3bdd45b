//! Bad configuration: clear errors, every rank exits non-zero, nothing hangs.

use gallocy_testkit::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn exit_nonzero(job: &Job, r: usize) -> bool {
    job.ranks[r].status().is_some_and(|s| !s.success())
}

#[test]
fn heap_size_banana_is_a_clear_error() {
    let _g = serial();
    // One-process job.
    let mut cmd = Command::new(scenario());
    clean_env(&mut cmd).env("GALLOCY_HEAP_SIZE", "banana").args(["fill64", "--mib", "1"]);
    let p = run("GALLOCY_HEAP_SIZE=banana gallocy-scenario fill64", &mut cmd, T);
    assert!(!p.status.unwrap().success(), "must fail\n{}", p.report());
    let err = &p.stderr;
    assert!(
        err.contains("GALLOCY_HEAP_SIZE") && err.contains("banana"),
        "the error must name GALLOCY_HEAP_SIZE and its value\n{}",
        p.report()
    );

    // Four ranks, all misconfigured.
    let mut job = Job::builder(4).env_all("GALLOCY_HEAP_SIZE", "banana").spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("GALLOCY_HEAP_SIZE=banana on every rank", T);
    for r in 0..4 {
        assert!(exit_nonzero(&job, r), "rank {r} must exit non-zero\n{}", job.report());
        assert!(
            job.ranks[r].stderr().contains("GALLOCY_HEAP_SIZE"),
            "rank {r}'s error must name GALLOCY_HEAP_SIZE\n{}",
            job.report()
        );
    }
}

#[test]
fn heap_size_banana_on_one_rank_stops_every_rank() {
    let _g = serial();
    // GALLOCY_SETUP_TIMEOUT bounds how long the others wait if rank 2 never shows up.
    let mut job = Job::builder(4)
        .env_all("GALLOCY_SETUP_TIMEOUT", "10")
        .env(2, "GALLOCY_HEAP_SIZE", "banana")
        .spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("GALLOCY_HEAP_SIZE=banana on rank 2 only", T);
    for r in 0..4 {
        assert!(exit_nonzero(&job, r), "rank {r} must exit non-zero\n{}", job.report());
    }
    assert!(
        job.ranks[2].stderr().contains("GALLOCY_HEAP_SIZE"),
        "rank 2's error must name GALLOCY_HEAP_SIZE\n{}",
        job.report()
    );
    for r in [0, 1, 3] {
        assert!(job.ranks[r].stderr().contains("rank 2"), "rank {r}'s error must name rank 2\n{}", job.report());
    }
}

#[test]
fn rank_out_of_range_is_a_clear_error() {
    let _g = serial();
    let mut cmd = Command::new(scenario());
    clean_env(&mut cmd)
        .env("GALLOCY_RANK", "7")
        .env("GALLOCY_SIZE", "4")
        .env("GALLOCY_COORDINATOR", format!("127.0.0.1:{}", free_port()))
        .env("GALLOCY_TOKEN", token())
        .args(["fill64", "--mib", "1"]);
    let p = run("GALLOCY_RANK=7 GALLOCY_SIZE=4 gallocy-scenario fill64", &mut cmd, T);
    assert!(!p.status.unwrap().success(), "must fail\n{}", p.report());
    let err = &p.stderr;
    assert!(
        err.contains("error:")
            && err.contains('7')
            && err.contains('4')
            && (err.contains("GALLOCY_RANK") || err.contains("GALLOCY_SIZE")),
        "the error must name GALLOCY_RANK/GALLOCY_SIZE and the values 7 and 4\n{}",
        p.report()
    );
}

#[test]
fn heap_size_mismatch_names_the_rank_everywhere() {
    let _g = serial();
    let mut job = Job::builder(4).env(2, "GALLOCY_HEAP_SIZE", "8G").spawn(&["fill64", "--mib", "1"]);
    job.wait_or_fail("GALLOCY_HEAP_SIZE=8G on rank 2 only", T);
    for r in 0..4 {
        assert!(exit_nonzero(&job, r), "rank {r} must exit non-zero\n{}", job.report());
        let err = job.ranks[r].stderr();
        assert!(
            err.to_lowercase().contains("heap"),
            "rank {r}'s error must say what differs (heap size)\n{}",
            job.report()
        );
        if r != 2 {
            assert!(err.contains("rank 2"), "rank {r}'s error must name rank 2\n{}", job.report());
        }
    }
}

#[test]
fn occupied_heap_range_names_the_rank_and_mapping() {
    let _g = serial();
    let mut job = Job::builder(4).env_all("SCENARIO_OCCUPY_RANK", "1").spawn(&["occupy"]);
    job.wait_or_fail("heap range occupied on rank 1", T);
    let addr = format!("{:x}-", gallocy::DEFAULT_HEAP_BASE + (1 << 20));
    assert_ne!(job.ranks[1].status().and_then(|s| s.code()), Some(3), "scenario setup failed\n{}", job.report());
    for r in 0..4 {
        assert!(exit_nonzero(&job, r), "rank {r} must exit non-zero\n{}", job.report());
        if r != 1 {
            assert!(job.ranks[r].stderr().contains("rank 1"), "rank {r}'s error must name rank 1\n{}", job.report());
        }
    }
    assert!(
        job.ranks[0].stderr().contains(&addr),
        "rank 0's error must quote the conflicting mapping (a /proc/<pid>/maps line starting {addr})\n{}",
        job.report()
    );
}

#[test]
fn absurd_values_are_refused_naming_the_variable() {
    let _g = serial();
    let max = "18446744073709551615";
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GALLOCY_HOLD_US", max)], "GALLOCY_HOLD_US"),
        (&[("GALLOCY_SPIN_US", "99999999999")], "GALLOCY_SPIN_US"),
        (&[("GALLOCY_SETUP_TIMEOUT", max)], "GALLOCY_SETUP_TIMEOUT"),
        (&[("GALLOCY_PEER_TIMEOUT", max)], "GALLOCY_PEER_TIMEOUT"),
        (&[("GALLOCY_PEER_TIMEOUT", "0")], "GALLOCY_PEER_TIMEOUT"),
        (&[("GALLOCY_PLACEMENT", "round-robin")], "GALLOCY_PLACEMENT"),
        (&[("GALLOCY_CONSISTENCY", "weak")], "GALLOCY_CONSISTENCY"),
        (&[("GALLOCY_SERVICE_SLICE_US", "50")], "GALLOCY_SERVICE_SLICE_US"),
        (&[("GALLOCY_SERVICE_SLICE_US", "100001")], "GALLOCY_SERVICE_SLICE_US"),
        (&[("GALLOCY_SERVICE_SLICE_US", "fast")], "GALLOCY_SERVICE_SLICE_US"),
        (&[("GALLOCY_SERVICE_NICE", "-21")], "GALLOCY_SERVICE_NICE"),
        (&[("GALLOCY_SERVICE_NICE", "high")], "GALLOCY_SERVICE_NICE"),
        (&[("GALLOCY_HEAP_MAPPINGS", "63")], "GALLOCY_HEAP_MAPPINGS"),
        (&[("GALLOCY_HEAP_MAPPINGS", "many")], "GALLOCY_HEAP_MAPPINGS"),
        // More than the kernel allows a process (vm.max_map_count).
        (&[("GALLOCY_HEAP_MAPPINGS", "100000000000")], "GALLOCY_HEAP_MAPPINGS"),
        (&[("GALLOCY_RDMA_BUSY_PEERS", "1024")], "GALLOCY_RDMA_BUSY_PEERS"),
        (&[("GALLOCY_RDMA_BUSY_PEERS", "some")], "GALLOCY_RDMA_BUSY_PEERS"),
        (&[("GALLOCY_RDMA_ODP", "yes")], "GALLOCY_RDMA_ODP"),
        // A coordinator that is not on loopback: the job may span hosts, so it needs a secret.
        (&[("GALLOCY_RANK", "1"), ("GALLOCY_SIZE", "2"), ("GALLOCY_COORDINATOR", "10.213.8.1:7000")], "GALLOCY_TOKEN"),
        (&[("GALLOCY_CONSISTENCY", "Release")], "GALLOCY_CONSISTENCY"),
        (
            &[
                ("GALLOCY_RANK", "0"),
                ("GALLOCY_SIZE", "2"),
                ("GALLOCY_COORDINATOR", "127.0.0.1:7000"),
                ("GALLOCY_COORDINATOR_HELD", "yes"),
            ],
            "GALLOCY_COORDINATOR_HELD",
        ),
        (&[("GALLOCY_HEAP_BASE", "0x7fff_0000_0000")], "GALLOCY_HEAP_BASE"),
        (&[("GALLOCY_HEAP_BASE", "0x7000_0000_0000"), ("GALLOCY_HEAP_SIZE", "64T")], "GALLOCY_HEAP_SIZE"),
        (
            &[("GALLOCY_RANK", "0"), ("GALLOCY_SIZE", "2"), ("GALLOCY_COORDINATOR", "127.0.0.1:0")],
            "GALLOCY_COORDINATOR",
        ),
        // What every rank would refuse in rank 0's roster, whose first entry is this text.
        (
            &[("GALLOCY_RANK", "0"), ("GALLOCY_SIZE", "2"), ("GALLOCY_COORDINATOR", "127.0.0.1:+7000")],
            "GALLOCY_COORDINATOR",
        ),
        (
            &[("GALLOCY_RANK", "0"), ("GALLOCY_SIZE", "2"), ("GALLOCY_COORDINATOR", " 127.0.0.1:7000")],
            "GALLOCY_COORDINATOR",
        ),
    ];
    for (env, var) in cases {
        let label = format!("{env:?} gallocy-scenario fill64");
        let mut cmd = Command::new(scenario());
        clean_env(&mut cmd).envs(env.iter().copied()).args(["fill64", "--mib", "1"]);
        let p = run(&label, &mut cmd, T);
        assert!(!p.status.unwrap().success(), "{label}: must fail\n{}", p.report());
        let lines: Vec<&str> = p.stderr.lines().filter(|l| l.contains(var)).collect();
        assert!(!lines.is_empty(), "{label}: the error must name {var}\n{}", p.report());
        assert!(
            !p.stderr.contains("panicked") && !p.stderr.contains("RUST_BACKTRACE"),
            "{label}: no panic\n{}",
            p.report()
        );
        assert!(p.elapsed < Duration::from_secs(10), "{label}: must fail at once\n{}", p.report());
        assert!(
            !lines.iter().any(|l| l.matches("rank 0:").count() > 1),
            "{label}: the prefix must not repeat\n{}",
            p.report()
        );
    }
}
