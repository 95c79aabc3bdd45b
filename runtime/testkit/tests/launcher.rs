//! Launcher tests with real child processes (`sh`), through the library
//! (`gallocy_cli::launch::run`) and through the `gallocy` command line.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gallocy_cli::launch::{self, LaunchError, LaunchSpec};
use gallocy_testkit::{launcher, run, Finished};

/// A hung launcher is killed after this long (and the test fails).
const WATCHDOG: Duration = Duration::from_secs(60);

fn gallocy(args: &[&str]) -> Finished {
    gallocy_env(args, &[])
}

/// Runs the CLI (in this test's environment) with extra environment, killing it if it outlives
/// WATCHDOG.
fn gallocy_env(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = Command::new(launcher());
    cmd.args(args).envs(env.iter().copied());
    run(&format!("gallocy {}", args.join(" ")), &mut cmd, WATCHDOG)
}

/// `gallocy run -n N [extra...] -- sh -c SCRIPT`
fn run_sh(n: usize, extra: &[&str], script: &str) -> Finished {
    let n = n.to_string();
    let mut args = vec!["run", "-n", &n];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    gallocy(&args)
}

fn launcher_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("gallocy run: ")).collect()
}

fn sh_spec(n: usize, script: &str) -> LaunchSpec {
    let args = ["-c", script].iter().map(OsString::from).collect();
    LaunchSpec::new(n, "sh", args)
}

// ------------------------------------------------------------ library API

#[test]
fn library_run_returns_exit_codes() {
    assert_eq!(launch::run(&sh_spec(3, "exit 0")).unwrap(), 0);
    assert_eq!(launch::run(&sh_spec(2, r#"[ "$GALLOCY_RANK" = 1 ] && exit 7; exit 0"#)).unwrap(), 7);
    let mut spec = sh_spec(2, r#"[ "$FOO" = bar ] && [ "$GALLOCY_SIZE" = 2 ]"#);
    spec.env.push(("FOO".into(), "bar".into()));
    assert_eq!(launch::run(&spec).unwrap(), 0, "spec.env and GALLOCY_SIZE reach the ranks");
}

#[test]
fn library_run_reports_spawn_and_spec_errors() {
    let missing = LaunchSpec::new(2, "/nonexistent/gallocy-test-program", vec![]);
    let err = launch::run(&missing).unwrap_err();
    assert!(matches!(err, LaunchError::Spawn { rank: 0, .. }), "{err:?}");
    assert_eq!(err.exit_code(), 127);
    let err = launch::run(&sh_spec(0, "true")).unwrap_err();
    assert!(err.is_usage() && err.exit_code() == 2, "{err:?}");
}

// ------------------------------------------------------------ environment

#[test]
fn ranks_get_the_environment_contract() {
    let r = run_sh(
        3,
        &[],
        r#"echo "env $GALLOCY_RANK $GALLOCY_SIZE $GALLOCY_COORDINATOR $GALLOCY_TOKEN $GALLOCY_TRANSPORT""#,
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    // No --transport: the launcher passes on its own GALLOCY_TRANSPORT (inherited from this
    // test), else `auto`.
    let inherited = std::env::var("GALLOCY_TRANSPORT").map(|t| t.trim().to_owned()).unwrap_or_default();
    let default_transport = if inherited.is_empty() { "auto" } else { inherited.as_str() };
    let mut ranks = HashSet::new();
    let mut shared = HashSet::new();
    for line in r.stdout.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 8, "{line}");
        assert_eq!(f[0..2].join(" "), format!("[rank {}]", f[3]), "prefix names the rank: {line}");
        ranks.insert(f[3].to_string());
        assert_eq!(f[4], "3");
        let port: u16 = f[5].strip_prefix("127.0.0.1:").expect("loopback coordinator").parse().unwrap();
        assert_ne!(port, 0);
        assert!(f[6].len() == 32 && f[6].bytes().all(|b| b.is_ascii_hexdigit()), "token {}", f[6]);
        assert_eq!(f[7], default_transport, "GALLOCY_TRANSPORT is the launcher's default transport: {line}");
        shared.insert((f[5].to_string(), f[6].to_string()));
    }
    assert_eq!(ranks, ["0", "1", "2"].iter().map(|s| s.to_string()).collect());
    assert_eq!(shared.len(), 1, "all ranks share coordinator and token");
}

#[test]
fn token_is_passed_through_and_contract_overrides_inherited_values() {
    let r = gallocy_env(
        &["run", "-n", "2", "--", "sh", "-c", r#"echo "$GALLOCY_TOKEN $GALLOCY_RANK $GALLOCY_SIZE""#],
        &[("GALLOCY_TOKEN", "secret-from-env"), ("GALLOCY_RANK", "99"), ("GALLOCY_SIZE", "99")],
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let mut lines: Vec<&str> = r.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["[rank 0] secret-from-env 0 2", "[rank 1] secret-from-env 1 2"]);
}

// ------------------------------------------------------------ output

#[test]
fn output_is_prefixed_per_stream_and_nothing_extra_on_success() {
    let r = run_sh(2, &[], r#"echo "out $GALLOCY_RANK"; echo "err $GALLOCY_RANK" >&2; printf 'tail'"#);
    assert_eq!(r.code(), Some(0));
    for rank in 0..2 {
        assert!(r.stdout.contains(&format!("[rank {rank}] out {rank}\n")), "{}", r.stdout);
        assert!(r.stdout.contains(&format!("[rank {rank}] tail\n")), "{}", r.stdout);
        assert!(r.stderr.contains(&format!("[rank {rank}] err {rank}\n")), "{}", r.stderr);
    }
    assert!(!r.stdout.contains("err"));
    assert!(launcher_lines(&r.stderr).is_empty(), "{}", r.stderr);
}

#[test]
fn lines_are_never_mixed_and_all_output_is_drained() {
    const LINES: usize = 2000;
    let pad = "x".repeat(300);
    let script = format!(
        r#"i=0; while [ $i -lt {LINES} ]; do echo "$GALLOCY_RANK:$i:{pad}"; echo "$GALLOCY_RANK:$i:{pad}" >&2; i=$((i+1)); done"#
    );
    let r = run_sh(4, &[], &script);
    assert_eq!(r.code(), Some(0), "{}", &r.stderr[..r.stderr.len().min(2000)]);
    for stream in [&r.stdout, &r.stderr] {
        let mut next = [0usize; 4];
        for line in stream.lines() {
            let (prefix, body) = line.split_at(9);
            let rank: usize = prefix.trim_start_matches("[rank ").trim_end_matches("] ").parse().expect(line);
            assert_eq!(body, format!("{rank}:{}:{pad}", next[rank]), "mixed or reordered line");
            next[rank] += 1;
        }
        assert_eq!(next, [LINES; 4], "every line of every rank arrives");
    }
}

#[test]
fn a_long_line_stays_one_line() {
    let r = run_sh(1, &[], "head -c 200000 /dev/zero | tr '\\0' a; echo");
    assert_eq!(r.code(), Some(0));
    assert_eq!(r.stdout, format!("[rank 0] {}\n", "a".repeat(200_000)));
}

// ------------------------------------------------------------ failures

#[test]
fn nonzero_exit_is_reported_and_returned() {
    let r = run_sh(3, &[], r#"[ "$GALLOCY_RANK" = 1 ] && exit 3; exit 0"#);
    assert_eq!(r.code(), Some(3));
    let lines = launcher_lines(&r.stderr);
    assert!(lines.contains(&"gallocy run: rank 1 exited with code 3"), "{}", r.stderr);
    assert!(lines.iter().all(|l| l.contains("rank 1 ")), "only rank 1 failed: {}", r.stderr);
}

#[test]
fn death_by_signal_is_reported_as_128_plus_signal() {
    let r = run_sh(2, &[], r#"[ "$GALLOCY_RANK" = 0 ] && kill -SEGV $$; exit 0"#);
    assert_eq!(r.code(), Some(128 + 11));
    assert!(r.stderr.contains("gallocy run: rank 0 was killed by signal 11 (SIGSEGV)"), "{}", r.stderr);
}

#[test]
fn survivors_that_exit_within_grace_are_not_killed() {
    let script = r#"[ "$GALLOCY_RANK" = 0 ] && exit 4; sleep 0.3; echo "rank $GALLOCY_RANK: lost peer" >&2; exit 1"#;
    let r = run_sh(3, &[], script);
    assert_eq!(r.code(), Some(4), "the first failure decides: {}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(4), "did not wait for the full grace: {:?}", r.elapsed);
    assert!(!r.stderr.contains("stopping rank"), "{}", r.stderr);
    for expected in ["rank 0 exited with code 4", "rank 1 exited with code 1", "rank 2 exited with code 1"] {
        assert!(r.stderr.contains(&format!("gallocy run: {expected}\n")), "{}", r.stderr);
    }
    assert!(r.stderr.contains("[rank 2] rank 2: lost peer"));
}

#[test]
fn stragglers_are_killed_after_grace() {
    let script = r#"if [ "$GALLOCY_RANK" = 0 ]; then exit 1; fi; exec sleep 30"#;
    let r = run_sh(3, &["--grace", "0.3"], script);
    assert_eq!(r.code(), Some(1));
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    for rank in [1, 2] {
        assert!(r.stderr.contains(&format!("gallocy run: stopping rank {rank}\n")), "{}", r.stderr);
        let stopped = format!("gallocy run: rank {rank} was stopped by the launcher\n");
        assert!(r.stderr.contains(&stopped), "{}", r.stderr);
    }
    let first = r.stderr.find("rank 0 exited with code 1").unwrap();
    assert!(first < r.stderr.find("stopping rank").unwrap(), "failure reported before stopping");
}

#[test]
fn output_held_open_by_a_grandchild_does_not_hang_the_launcher() {
    let r = run_sh(1, &[], "sleep 8 & echo started");
    assert_eq!(r.code(), Some(0));
    assert!(r.stdout.contains("[rank 0] started"));
    assert!(r.elapsed < Duration::from_secs(6), "{:?}", r.elapsed);
}

#[test]
fn missing_program_exits_127() {
    let r = gallocy(&["run", "-n", "2", "--", "/nonexistent/gallocy-test-program"]);
    assert_eq!(r.code(), Some(127));
    assert!(r.stderr.contains("cannot start rank 0"), "{}", r.stderr);
}

#[test]
fn ranks_die_when_the_launcher_is_killed() {
    let mut launcher = Command::new(launcher())
        .args(["run", "-n", "2", "--", "sh", "-c", "echo pid $$; exec sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = Vec::new();
    let mut reader = BufReader::new(launcher.stdout.take().unwrap());
    let mut line = String::new();
    while pids.len() < 2 && reader.read_line(&mut line).unwrap() > 0 {
        let pid: i32 = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
        pids.push(pid);
        line.clear();
    }
    assert_eq!(pids.len(), 2);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        while is_alive(pid) {
            assert!(Instant::now() < deadline, "rank process {pid} survived the launcher");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True if `pid` exists and is not a zombie.
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

// ------------------------------------------------------------ command line

#[test]
fn help_prints_usage() {
    let r = gallocy(&["--help"]);
    assert_eq!(r.code(), Some(0));
    assert!(r.stdout.contains("gallocy run -n N"), "{}", r.stdout);
    assert!(r.stdout.contains("gallocy demo"), "{}", r.stdout);
}

#[test]
fn usage_errors_exit_2() {
    let mut cases: Vec<(&[&str], &str)> = vec![
        (&[], "missing command"),
        (&["frobnicate"], "unknown command"),
        (&["run", "-n", "2"], "missing PROGRAM"),
        (&["run", "-n", "2", "--"], "missing PROGRAM"),
        (&["run", "--", "true"], "missing -n"),
        (&["run", "-n", "0", "--", "true"], "between 1 and 1024"),
        (&["run", "-n", "1025", "--", "true"], "between 1 and 1024"),
        (&["run", "-n", "two", "--", "true"], "not a valid number"),
        (&["run", "-n", "2", "--transport", "carrier-pigeon", "--", "true"], "unknown transport"),
        (&["run", "-n", "2", "--grace", "soon", "--", "true"], "not a valid number"),
        (&["run", "-n", "2", "--bogus", "--", "true"], "unknown option"),
        (&["demo", "--size", "1"], "--size"),
        (&["demo", "-n", "2000"], "between 1 and 1024"),
    ];
    if !gallocy::RDMA_BUILT {
        cases.push((&["run", "-n", "2", "--transport", "rdma", "--", "true"], "not built in this build"));
    }
    for (args, message) in cases {
        let r = gallocy(args);
        assert_eq!(r.code(), Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(message), "{args:?}: expected {message:?} in {}", r.stderr);
        assert!(r.stderr.contains("usage:"), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn program_may_follow_options_without_double_dash() {
    let r = gallocy(&["run", "-n", "1", "sh", "-c", "echo $0 ok", "named"]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "[rank 0] named ok\n");
}

#[test]
fn a_preload_library_that_does_not_exist_is_refused() {
    // ld.so would warn and run every rank without gallocy, as independent processes.
    let r = gallocy_env(&["run", "-n", "2", "--preload", "--", "true"], &[("GALLOCY_PRELOAD_LIB", "/nonexistent.so")]);
    assert_eq!(r.status.and_then(|s| s.code()), Some(2), "{}", r.report());
    assert!(r.stderr.contains("GALLOCY_PRELOAD_LIB names /nonexistent.so, which is not a file"), "{}", r.report());
    // One missing library in a list is refused too.
    let lib = std::env::current_exe().unwrap();
    let list = format!("{}:/nonexistent.so", lib.display());
    let r = gallocy_env(&["run", "-n", "2", "--preload", "--", "true"], &[("GALLOCY_PRELOAD_LIB", &list)]);
    assert_eq!(r.status.and_then(|s| s.code()), Some(2), "{}", r.report());
    assert!(r.stderr.contains("names /nonexistent.so"), "{}", r.report());
}

#[test]
fn each_failed_rank_is_reported_once() {
    let r = run_sh(2, &[], r#"if [ "$GALLOCY_RANK" = 1 ]; then kill -9 $$; fi; sleep 30"#);
    assert_eq!(r.status.and_then(|s| s.code()), Some(128 + 9), "{}", r.report());
    let lines = launcher_lines(&r.stderr);
    assert_eq!(
        lines.iter().filter(|l| l.contains("rank 1 was killed by signal 9")).count(),
        1,
        "one line for rank 1's death\n{}",
        r.report()
    );
}

#[test]
fn sigint_to_the_launcher_alone_stops_the_job_even_when_inherited_ignored() {
    use std::os::unix::process::CommandExt;
    let dir = std::env::temp_dir().join(format!("gallocy-test-sigint-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let pids = dir.join("pids");
    let script = format!("echo $$ >> {}; exec sleep 60", pids.display());
    let mut cmd = Command::new(launcher());
    cmd.args(["run", "-n", "2", "--", "sh", "-c", &script]).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only signal() (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Like a background job of a shell script: SIGINT ignored.
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start gallocy");
    let start = Instant::now();
    while std::fs::read_to_string(&pids).map_or(0, |s| s.lines().count()) < 2 {
        assert!(start.elapsed() < WATCHDOG, "the ranks never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let sent = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the launcher ignored SIGINT for 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{err}");
    assert!(err.contains("gallocy run: stopped by signal 2 (SIGINT): every rank was stopped"), "{err}");
    let ranks: Vec<i32> = std::fs::read_to_string(&pids).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    for pid in ranks {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "rank process {pid} still runs after the launcher stopped\n{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_takes_a_transport_and_names_it() {
    let r = gallocy(&["demo", "-n", "2", "--size", "32", "--iters", "5", "--transport", "tcp"]);
    assert_eq!(r.status.and_then(|s| s.code()), Some(0), "{}", r.report());
    assert!(
        r.stdout.contains("iterations, sequential consistency, transport tcp on 127.0.0.1")
            && r.stdout.contains("gallocy demo: ok"),
        "{}",
        r.report()
    );
    let bad = gallocy(&["demo", "--transport", "udp"]);
    assert_eq!(bad.status.and_then(|s| s.code()), Some(2), "{}", bad.report());
    assert!(bad.stderr.contains("udp"), "{}", bad.report());
}

#[test]
fn demo_runs_under_release_consistency_and_says_so() {
    let r = gallocy(&["demo", "-n", "3", "--size", "64", "--iters", "20", "--consistency", "release"]);
    assert_eq!(r.status.and_then(|s| s.code()), Some(0), "{}", r.report());
    assert!(r.stdout.contains("iterations, release consistency,"), "{}", r.report());
    assert!(r.stdout.contains("matches single-process result: yes"), "{}", r.report());
    assert!(r.stdout.contains("speedup against the single-process solve"), "{}", r.report());
    // Its statistics show the release consistency machinery at work: ranks drop the copies of
    // their neighbours' rows at each barrier.
    let dropped: u64 = format!("{}{}", r.stdout, r.stderr)
        .lines()
        .filter_map(|l| l.split("copies dropped at acquire ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    assert!(dropped > 0, "no copy dropped at an acquire\n{}", r.report());
    let bad = gallocy(&["demo", "--consistency", "weak"]);
    assert_eq!(bad.status.and_then(|s| s.code()), Some(2), "{}", bad.report());
}
