//! counter, pingpong, disjoint: writes to shared words from several processes.

use crate::util::{collective, mix, vread, vwrite, Args, Outcome};
use std::time::{Duration, Instant};

/// N processes x T threads add 1 to one shared counter under `gallocy::lock(1)`; the job as a
/// whole does exactly `--total` increments (default 50,000); every rank checks the final value.
pub fn counter(args: &Args) -> Outcome {
    let total = args.usize_or("--total", 50_000) as u64;
    let threads = args.usize_or("--threads", 2).max(1);
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let cell = collective(gallocy::page_size())?;
    let ctr = cell.word(0);
    let workers = (size * threads) as u64;
    gallocy::barrier();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            // Global worker index: spreads the remainder so the job total is exactly `total`.
            let g = (rank * threads + t) as u64;
            let n = total / workers + u64::from(g < total % workers);
            s.spawn(move || {
                let ctr = cell.word(0);
                for _ in 0..n {
                    gallocy::lock(1);
                    // SAFETY: `ctr` is the first word of a live collective page; the global lock
                    // serialises every read-modify-write of it across threads and processes.
                    unsafe { vwrite(ctr, vread(ctr) + 1) };
                    gallocy::unlock(1);
                }
            });
        }
    });
    let elapsed = t0.elapsed();
    gallocy::barrier();
    // SAFETY: as above; after the barrier nobody writes any more.
    let got = unsafe { vread(ctr) };
    gallocy::barrier();
    if got != total {
        return Err(format!(
            "counter is {got} after the barrier, expected exactly {total} ({size} processes x {threads} threads); lost {} increments",
            total as i128 - got as i128
        ));
    }
    Ok(format!(
        "total {got} = {size} processes x {threads} threads; {:.0} ms, {:.1} us per increment",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / total.max(1) as f64
    ))
}

/// relock: rank 0 takes and releases lock 1 (whose home is rank 1) `--times` times in a row
/// while the others wait: every acquire after the first is local (no message). Then every rank
/// takes it `--times` times, interleaved, adding to a shared counter: the lock moves between the
/// ranks on demand and no increment is lost.
pub fn relock(args: &Args) -> Outcome {
    let times = args.usize_or("--times", 1000) as u64;
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let cell = collective(gallocy::page_size())?;
    let ctr = cell.word(0);
    gallocy::barrier();
    let before = gallocy::stats().locks_local;
    if rank == 0 {
        for _ in 0..times {
            gallocy::lock(1);
            gallocy::unlock(1);
        }
        let local = gallocy::stats().locks_local - before;
        if local + 1 < times {
            return Err(format!("{local} of {times} acquires in a row by one rank were local, expected {}", times - 1));
        }
    }
    gallocy::barrier();
    for _ in 0..times {
        gallocy::lock(1);
        // SAFETY: `ctr` is the first word of a live collective page; the global lock serialises
        // every read-modify-write of it.
        unsafe { vwrite(ctr, vread(ctr) + 1) };
        gallocy::unlock(1);
    }
    gallocy::barrier();
    // SAFETY: as above; after the barrier nobody writes any more.
    let got = unsafe { vread(ctr) };
    gallocy::barrier();
    if got != times * size as u64 {
        return Err(format!("counter is {got}, expected {}", times * size as u64));
    }
    Ok(format!("{times} acquires in a row, {} of them local; counter {got}", gallocy::stats().locks_local - before))
}

/// lockbatch: every rank takes lock 1 `--times` times (default 2000), adding to a shared
/// counter, with `--work` mixing rounds (default 50) outside the lock, while the others do the
/// same. A rank that uses the lock when its home recalls it keeps it for a short grace: the job
/// fails if no acquire anywhere was one of a grace's, or if fewer than `--min-local-pct` percent
/// (default 0) of its acquires were local, or if an increment was lost.
pub fn lockbatch(args: &Args) -> Outcome {
    let times = args.usize_or("--times", 2000) as u64;
    let work = args.usize_or("--work", 50) as u64;
    let min_pct = args.usize_or("--min-local-pct", 0) as u64;
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let cell = collective(gallocy::page_size())?;
    let ctr = cell.word(0);
    gallocy::barrier();
    let (before, grace_before) = (gallocy::stats().locks_local, gallocy::stats().locks_in_grace);
    let mut x = rank as u64;
    for _ in 0..times {
        gallocy::lock(1);
        // SAFETY: `ctr` is the first word of a live collective page; the global lock serialises
        // every read-modify-write of it.
        unsafe { vwrite(ctr, vread(ctr) + 1) };
        gallocy::unlock(1);
        for _ in 0..work {
            x = mix(x);
        }
    }
    let local = gallocy::stats().locks_local - before;
    let in_grace = gallocy::stats().locks_in_grace - grace_before;
    // SAFETY: words 1 + rank and 1 + size + rank of the live collective page are this rank's own.
    unsafe {
        vwrite(cell.word(1 + rank), local);
        vwrite(cell.word(1 + size + rank), in_grace);
    }
    gallocy::barrier();
    // SAFETY: as above; after the barrier nobody writes any more.
    let got = unsafe { vread(ctr) };
    // SAFETY: as above.
    let locals: Vec<u64> = (0..size).map(|r| unsafe { vread(cell.word(1 + r)) }).collect();
    // SAFETY: as above.
    let graces: Vec<u64> = (0..size).map(|r| unsafe { vread(cell.word(1 + size + r)) }).collect();
    gallocy::barrier();
    let total = times * size as u64;
    if got != total {
        return Err(format!("counter is {got}, expected {total}"));
    }
    let all_local: u64 = locals.iter().sum();
    if graces.iter().sum::<u64>() == 0 {
        return Err(format!("no acquire was taken in a grace (local per rank {locals:?})"));
    }
    if all_local * 100 < min_pct * total {
        return Err(format!(
            "{all_local} of the job's {total} acquires were local (per rank {locals:?}), expected at least {min_pct}%"
        ));
    }
    Ok(format!(
        "counter {got}; {all_local} of {total} acquires local (per rank {locals:?}; in a grace {graces:?}); mix {:x}",
        x & 0xf
    ))
}

/// Spin (yielding) until `cond` holds; gives up after `limit`.
fn spin_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    let mut n = 0u32;
    loop {
        if cond() {
            return true;
        }
        n = n.wrapping_add(1);
        if n % 64 == 0 && t0.elapsed() > limit {
            return false;
        }
        std::thread::yield_now();
    }
}

/// Ranks 0 and 1 write the same page alternately `--rounds` times (default 10,000) in total.
/// Word 0 is the turn (whose move it is), word 1 the value (number of moves made so far).
/// Before each move a rank checks it sees the other's last write; ranks >= 2 only watch.
pub fn pingpong(args: &Args) -> Outcome {
    let rounds = args.usize_or("--rounds", 10_000) as u64;
    let (rank, size) = (gallocy::rank(), gallocy::size());
    if size < 2 {
        return Err(format!("pingpong needs at least 2 ranks, job has {size}"));
    }
    let page = collective(gallocy::page_size())?;
    let (turn, value) = (page.word(0), page.word(1));
    gallocy::barrier();
    let t0 = Instant::now();
    let mut moves = 0u64;
    if rank < 2 {
        let me = rank as u64;
        // Rank 0 makes moves 0, 2, 4, ...; rank 1 makes moves 1, 3, 5, ...
        let mut k = me;
        while k < rounds {
            // SAFETY: `turn` and `value` are words of a live collective page.
            let ok = spin_until(Duration::from_secs(60), || unsafe { vread(turn) } == me);
            if !ok {
                // SAFETY: as above.
                let (t, v) = unsafe { (vread(turn), vread(value)) };
                return Err(format!("stuck before move {k}: turn word stays {t} (want {me}), value word is {v}"));
            }
            // SAFETY: as above.
            let v = unsafe { vread(value) };
            if v != k {
                return Err(format!(
                    "move {k}: turn is mine but the value word is {v}, expected {k} (the other rank's last write was lost or is stale)"
                ));
            }
            // SAFETY: as above. Value first, then hand the turn over.
            unsafe {
                vwrite(value, k + 1);
                vwrite(turn, 1 - me);
            }
            moves += 1;
            k += 2;
        }
    }
    let elapsed = t0.elapsed();
    gallocy::barrier();
    // SAFETY: as above; nobody writes after the barrier.
    let v = unsafe { vread(value) };
    gallocy::barrier();
    if v != rounds {
        return Err(format!("after the game the value word is {v}, expected {rounds}"));
    }
    let st = gallocy::stats();
    Ok(format!(
        "{moves} of {rounds} moves made here; {:.0} ms, {:.1} us per move; held back {} (past a resume {})",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / rounds.max(1) as f64,
        st.held_back,
        st.held_past_resume
    ))
}

/// Every rank writes its own `--words` words (default 100) of ONE shared page with
/// round-dependent values, concurrently, `--rounds` times (default 200); after each barrier every
/// rank checks every word of every rank.
pub fn disjoint(args: &Args) -> Outcome {
    let rounds = args.usize_or("--rounds", 200) as u64;
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let page_words = gallocy::page_size() / 8;
    let words = args.usize_or("--words", 100).min(page_words / size);
    if words == 0 {
        return Err(format!("a page of {page_words} words cannot be split among {size} ranks"));
    }
    let page = collective(gallocy::page_size())?;
    let val = |round: u64, r: usize, i: usize| mix((round << 32) ^ ((r as u64) << 16) ^ i as u64);
    gallocy::barrier();
    let t0 = Instant::now();
    for round in 0..rounds {
        for i in 0..words {
            // SAFETY: word `rank*words + i` < page_words lies in the live collective page.
            unsafe { vwrite(page.word(rank * words + i), val(round, rank, i)) };
        }
        gallocy::barrier();
        for r in 0..size {
            for i in 0..words {
                // SAFETY: as above.
                let got = unsafe { vread(page.word(r * words + i)) };
                let want = val(round, r, i);
                if got != want {
                    return Err(format!(
                        "round {round}: word {i} of rank {r} (address {:#x}) is {got:#x}, expected {want:#x}: a write was lost",
                        page.word(r * words + i) as usize
                    ));
                }
            }
        }
        gallocy::barrier();
    }
    let elapsed = t0.elapsed();
    Ok(format!("{rounds} rounds x {size} ranks x {words} words; {:.0} ms", elapsed.as_secs_f64() * 1e3))
}

/// `contend`: every thread of every rank increments its own word of ONE shared page with plain
/// (non-atomic) reads and writes, no lock and no barrier, so all writers fight over the page at
/// once. Each thread counts its increments privately; afterwards its word must equal that count
/// (no update lost), and the job must get there (no deadlock or livelock).
///
/// Contention is proven, not hoped for: between two of its own increments a writer looks at the
/// other ranks' words, and a word that changed means the page went away and came back. A writer
/// stops once `--ms` have passed and every writer of the job has seen that `--changes` times
/// (each raises a flag word in the same page); a writer that cannot see it within `--cap-ms`
/// fails the run. A fixed time window alone was not a proof: on an emulated, oversubscribed guest
/// a rank's writers could run while the others' were descheduled and see 3 transfers in 2 s.
pub fn contend(args: &Args) -> Outcome {
    let run_for = Duration::from_millis(args.usize_or("--ms", 300) as u64);
    let cap = Duration::from_millis(args.usize_or("--cap-ms", 120_000) as u64).max(run_for);
    let threads = args.usize_or("--threads", 2).max(1);
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let need = if size > 1 { args.usize_or("--changes", 10) as u64 } else { 0 };
    let writers = size * threads;
    if 2 * writers > gallocy::page_size() / 8 {
        return Err(format!("{size} ranks x {threads} threads do not fit one page of words and flags"));
    }
    let page = collective(gallocy::page_size())?;
    gallocy::barrier();
    let before = gallocy::stats();
    let flag = move |writer: usize| page.word(writers + writer);
    let results: Vec<Result<(u64, u64), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let me = rank * threads + t;
                let others: Vec<usize> = (0..writers).filter(|w| w / threads != rank).collect();
                s.spawn(move || {
                    let t0 = Instant::now();
                    let mut last = vec![0u64; others.len()];
                    let (mut n, mut changes, mut raised) = (0u64, 0u64, false);
                    loop {
                        // SAFETY: the words lie in the live collective page; only this thread
                        // writes word `me` and flag `me` (the same holds for every access below).
                        unsafe {
                            let v = vread(page.word(me));
                            vwrite(page.word(me), v + 1);
                        }
                        n += 1;
                        for (seen, &w) in last.iter_mut().zip(&others) {
                            // SAFETY: as above.
                            let v = unsafe { vread(page.word(w)) };
                            if v != *seen {
                                *seen = v;
                                changes += 1;
                            }
                        }
                        if !raised && changes >= need {
                            // SAFETY: as above.
                            unsafe { vwrite(flag(me), 1) };
                            raised = true;
                        }
                        let elapsed = t0.elapsed();
                        // SAFETY: as above.
                        if elapsed >= run_for && (0..writers).all(|w| unsafe { vread(flag(w)) } == 1) {
                            return Ok((n, changes));
                        }
                        if elapsed >= cap {
                            return Err(format!(
                                "writer {t} saw the other ranks' words change {changes} times in {:.1} s \
                                 ({need} needed by every writer): the writers did not contend",
                                elapsed.as_secs_f64()
                            ));
                        }
                        for _ in 0..64 {
                            std::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("writer thread")).collect()
    });
    let after = gallocy::stats();
    gallocy::barrier();
    let mut counts = Vec::with_capacity(threads);
    for r in results {
        counts.push(r?);
    }
    for (t, (n, _)) in counts.iter().enumerate() {
        // SAFETY: as above; every writer finished before the barrier.
        let got = unsafe { vread(page.word(rank * threads + t)) };
        if got != *n {
            return Err(format!("thread {t} made {n} increments but its word is {got}: updates were lost"));
        }
    }
    let faults = (after.read_faults + after.write_faults) - (before.read_faults + before.write_faults);
    Ok(format!(
        "{writers} writers on one page for at least {} ms, {} increments here, {} changes seen here, {faults} faults here, none lost",
        run_for.as_millis(),
        counts.iter().map(|c| c.0).sum::<u64>(),
        counts.iter().map(|c| c.1).sum::<u64>(),
    ))
}

/// Reports the nice value and the time slice of this process's service thread, as the kernel
/// shows them (`/proc/self/task/TID/stat` and `se.slice` in `.../sched`; "none" where the kernel
/// shows no slice): `service nice N, service slice S`. The thread names itself and asks for both
/// when it first runs, which may come after the barrier (waiting threads take barrier notices
/// themselves): this waits up to 10 s for the slice asked for (unless `GALLOCY_SERVICE_SLICE_US`
/// is 0) and for the nice value asked for (`GALLOCY_SERVICE_NICE`; unset, the process's own)
/// where this process may take it (root).
pub fn service_slice(_args: &Args) -> Outcome {
    gallocy::barrier();
    // Unset: the runtime's default of 100 µs; 0: the kernel's own, whatever it is.
    let wanted = match std::env::var("GALLOCY_SERVICE_SLICE_US").ok().map(|v| v.trim().parse::<u64>().ok()) {
        None => Some("100000".to_string()),
        Some(Some(0)) => None,
        Some(us) => us.map(|us| (us * 1000).to_string()),
    };
    // SAFETY: getpriority has no memory arguments (the process's own nice value, which the
    // service thread keeps when the variable is unset).
    let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let nice: i32 = std::env::var("GALLOCY_SERVICE_NICE").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(own);
    // SAFETY: geteuid has no arguments.
    let may_take = nice >= 0 || unsafe { libc::geteuid() } == 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = service_thread_slice()?;
        let settled = match (&seen, &wanted) {
            (None, _) => false,
            (Some((s, _)), Some(w)) => s == w || s == "none",
            (Some(_), None) => true,
        } && seen.as_ref().is_some_and(|(_, n)| !may_take || *n == nice);
        if settled || Instant::now() >= deadline {
            gallocy::barrier();
            return match seen {
                Some((s, n)) => Ok(format!("service nice {n}, service slice {s}")),
                None => Err("no thread named gallocy-service".into()),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `se.slice` ("none" if the kernel shows none) and the nice value of the thread named
/// gallocy-service, or `None` while there is no such thread.
fn service_thread_slice() -> Result<Option<(String, i32)>, String> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|e| format!("reading /proc/self/task: {e}"))?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "gallocy-service" {
            continue;
        }
        let sched = std::fs::read_to_string(task.path().join("sched")).unwrap_or_default();
        let slice = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1))
            .map_or("none".to_string(), |v| v.trim().to_string());
        // stat: "pid (comm) state ..."; nice is the 19th field, the 17th after the comm.
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no nice value in {stat:?}"))?;
        return Ok(Some((slice, nice)));
    }
    Ok(None)
}
