//! Crashes and kills: a null dereference stays a SIGSEGV, and a rank killed with SIGKILL
//! takes the job down promptly with messages that name it.

use gallocy_testkit::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn nullderef_through_launcher_is_sigsegv() {
    let _g = serial();
    let label = "gallocy run -n 4 -- gallocy-scenario nullderef";
    let p = run(label, &mut launcher_cmd(4, &["nullderef"]), Duration::from_secs(60));
    assert!(!p.status.unwrap().success(), "{label}: must fail\n{}", p.report());
    let err = &p.stderr;
    assert!(
        err.contains("rank 3 was killed by signal 11") && err.contains("SIGSEGV"),
        "{label}: stderr must say rank 3 was killed by signal 11 (SIGSEGV)\n{}",
        p.report()
    );
}

#[test]
fn nullderef_one_process_dies_by_sigsegv() {
    let _g = serial();
    let mut cmd = Command::new(scenario());
    clean_env(&mut cmd).arg("nullderef");
    let p = run("gallocy-scenario nullderef (no GALLOCY_* variables)", &mut cmd, Duration::from_secs(30));
    let st = p.status.unwrap();
    assert_eq!(
        st.signal(),
        Some(libc::SIGSEGV),
        "a null dereference must kill the process with SIGSEGV, got {}\n{}",
        describe(Some(st)),
        p.report()
    );
}

/// A program that installed its own SIGSEGV handler before joining keeps it for its own faults:
/// gallocy resolves the heap misses (rank 1 reads pages rank 0 wrote) and hands the null
/// dereference to the handler it found, which exits with 42.
#[test]
fn a_foreign_fault_reaches_the_programs_own_handler() {
    let _g = serial();
    let label = "gallocy run -n 2 -- gallocy-scenario nullderef --own-handler";
    let p = run(label, &mut launcher_cmd(2, &["nullderef", "--own-handler"]), Duration::from_secs(60));
    assert!(!p.status.unwrap().success(), "{label}: must fail\n{}", p.report());
    let err = &p.stderr;
    assert!(
        err.contains("rank 1: nullderef: read 4 pages rank 0 wrote, with the program's own handler installed"),
        "{label}: rank 1 must read the pages first\n{}",
        p.report()
    );
    assert!(
        err.contains("[rank 1] nullderef: the program's own handler ran for address 0")
            && err.contains("rank 1 exited with code 42"),
        "{label}: rank 1's own handler must take the null dereference and exit 42\n{}",
        p.report()
    );
}

const JACOBI_LONG: &[&str] = &["jacobi", "--n", "64", "--iters", "100000", "--progress", "--slow-ms", "20"];

#[test]
fn kill9_of_one_rank_stops_the_others() {
    let _g = serial();
    let mut job = Job::builder(4).spawn(JACOBI_LONG);
    let started = job.ranks[2].wait_for_stdout(Duration::from_secs(60), |o| count_lines(o, "iteration ") >= 3);
    if !started {
        let msg = format!("rank 2 never printed 3 iteration lines\n{}", job.report());
        drop(job);
        panic!("{msg}");
    }
    job.ranks[2].kill();
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(10);
    let _ = job.ranks[2].wait_until(Instant::now() + Duration::from_secs(5));
    let mut failures = Vec::new();
    for r in [0, 1, 3] {
        match job.ranks[r].wait_until(deadline) {
            None => failures.push(format!("rank {r} still running 10 s after rank 2 was killed")),
            Some(s) if s.success() => failures.push(format!("rank {r} exited 0 after rank 2 was killed")),
            Some(_) => {
                let err = job.ranks[r].stderr();
                if !err.contains("rank 2") {
                    failures.push(format!("rank {r}'s stderr does not name rank 2"));
                }
            }
        }
    }
    eprintln!("survivors finished {:.2} s after the kill", killed_at.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), job.report());
}

/// Connections are made on first use, so in a job of 16 a rank is connected only to rank 0, its
/// barrier partners (r ± 1, 2, 4, 8), its heartbeat neighbours and its halo neighbours. When rank
/// 9 stops (SIGSTOP), only its heartbeat neighbours 8 and 10 find it silent; ranks 1, 3, 5, 13
/// and 15 are connected to none of 9, 8 and 10. They learn which rank was lost from the ranks
/// that stop because of it, which pass the word on before they go: every survivor names rank 9.
#[test]
fn the_word_of_a_lost_rank_reaches_the_ranks_not_connected_to_its_watchers() {
    let _g = serial();
    if transport().is_some_and(|t| t == "rdma") {
        // Over RDMA every pair of ranks is connected from start-up: nothing to pass on.
        eprintln!("skipped over RDMA: every pair of ranks is connected there");
        return;
    }
    let mut job = Job::builder(16).env_all("GALLOCY_PEER_TIMEOUT", "2").spawn(JACOBI_LONG);
    let started = job.ranks[9].wait_for_stdout(Duration::from_secs(60), |o| count_lines(o, "iteration ") >= 3);
    if !started {
        let msg = format!("rank 9 never printed 3 iteration lines\n{}", job.report());
        drop(job);
        panic!("{msg}");
    }
    let pid = job.ranks[9].pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let stopped_at = Instant::now();
    let deadline = stopped_at + limit(Duration::from_secs(20));
    let mut failures = Vec::new();
    for r in (0..16).filter(|r| *r != 9) {
        match job.ranks[r].wait_until(deadline) {
            None => failures.push(format!("rank {r} still running 20 s after rank 9 stopped")),
            Some(s) if s.success() => failures.push(format!("rank {r} exited 0 after rank 9 stopped")),
            Some(_) if !job.ranks[r].stderr().contains("lost contact with rank 9") => {
                failures.push(format!("rank {r} does not name rank 9"))
            }
            Some(_) => {}
        }
    }
    eprintln!("survivors finished {:.2} s after the stop", stopped_at.elapsed().as_secs_f64());
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let _ = job.ranks[9].wait_until(Instant::now() + Duration::from_secs(5));
    // (Rarely, a survivor sees another close its connection before that one's word arrives.)
    assert!(failures.len() <= 1, "{}\n{}", failures.join("\n"), job.report());
}

/// A rank that stops without dying (SIGSTOP) keeps its connections open: its ring neighbours
/// (ranks 1 and 3 of 4 for rank 2), the only ranks that watch it, find it silent after
/// `GALLOCY_PEER_TIMEOUT` and tell everyone, so every survivor stops and names rank 2; rank 0,
/// which does not watch rank 2, learns it from them.
#[test]
fn a_stopped_rank_is_found_by_its_neighbours_and_stops_the_job() {
    let _g = serial();
    let mut job = Job::builder(6).env_all("GALLOCY_PEER_TIMEOUT", "2").spawn(JACOBI_LONG);
    let started = job.ranks[2].wait_for_stdout(Duration::from_secs(60), |o| count_lines(o, "iteration ") >= 3);
    if !started {
        let msg = format!("rank 2 never printed 3 iteration lines\n{}", job.report());
        drop(job);
        panic!("{msg}");
    }
    let pid = job.ranks[2].pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let stopped_at = Instant::now();
    let deadline = stopped_at + limit(Duration::from_secs(15));
    let mut failures = Vec::new();
    let mut named = 0;
    for r in [0, 1, 3, 4, 5] {
        match job.ranks[r].wait_until(deadline) {
            None => failures.push(format!("rank {r} still running 15 s after rank 2 stopped")),
            Some(s) if s.success() => failures.push(format!("rank {r} exited 0 after rank 2 stopped")),
            Some(_) if job.ranks[r].stderr().contains("lost contact with rank 2") => named += 1,
            // The watchers must name rank 2 themselves. Another survivor may, rarely, see a
            // survivor that already stopped close its connection before that survivor's word
            // reaches it (it listens 50 ms for it): it still stops, naming that one.
            Some(_) if r == 1 || r == 3 => failures.push(format!("rank {r} (a watcher) does not name rank 2")),
            Some(_) if !job.ranks[r].stderr().contains("lost contact with rank") => {
                failures.push(format!("rank {r} does not say it lost contact"))
            }
            Some(_) => {}
        }
    }
    assert!(named >= 3, "most survivors must name rank 2 ({named} of 5 did)\n{}", job.report());
    let watchers_noticed = [1, 3].iter().any(|r| job.ranks[*r].stderr().contains("no word from it"));
    eprintln!("survivors finished {:.2} s after the stop", stopped_at.elapsed().as_secs_f64());
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let _ = job.ranks[2].wait_until(Instant::now() + Duration::from_secs(5));
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), job.report());
    assert!(watchers_noticed, "rank 1 or 3 must report rank 2 silent\n{}", job.report());
}

#[test]
fn kill9_of_one_rank_under_launcher() {
    let _g = serial();
    let label = "gallocy run -n 4 -- gallocy-scenario jacobi --progress --slow-ms 20 (rank 2 gets SIGKILL)";
    let mut p = Proc::spawn(label, &mut launcher_cmd(4, JACOBI_LONG));
    let ready = p.wait_for_stdout(Duration::from_secs(60), |o| {
        o.contains("[rank 2] pid=") && count_lines(o, "[rank 2] iteration ") >= 3
    });
    assert!(ready, "{label}: rank 2 never printed its pid and 3 iteration lines\n{}", p.report());
    let out = p.stdout();
    let pid: i32 = out
        .lines()
        .find_map(|l| l.strip_prefix("[rank 2] pid="))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{label}: cannot parse rank 2's pid\n{}", p.report()));
    // SAFETY: kill(2) has no memory-safety preconditions; pid is rank 2's process.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill({pid}, SIGKILL) failed: {}", std::io::Error::last_os_error());
    if !p.wait_or_kill(Duration::from_secs(15)) {
        panic!("{label}: the launcher did not exit within 15 s of the kill\n{}", p.report());
    }
    assert!(!p.status().unwrap().success(), "{label}: the launcher must exit non-zero\n{}", p.report());
    assert!(
        p.stderr().contains("rank 2 was killed by signal 9"),
        "{label}: stderr must report rank 2 killed by signal 9\n{}",
        p.report()
    );
    assert!(!p.stragglers, "{label}: the launcher left processes behind\n{}", p.report());
}

/// A program that takes all but 64 of its process's mappings (`vm.max_map_count`) still gets
/// its pages: each received page needs its own protection, and when the kernel refuses one the
/// runtime closes its view of the heap (one mapping) and reopens pages as they are touched.
/// Before, rank 1 stopped with "mprotect failed ... vm.max_map_count".
#[test]
fn a_program_that_takes_almost_every_mapping_still_gets_its_pages() {
    let _g = serial();
    let p = launch_ok(2, &["map-count"], limit(Duration::from_secs(120)));
    assert!(p.stdout.contains("rank 1: map-count ok (read 4096 scattered pages"), "{}", p.report());
}
