//! rc-drf: data-race-free programs under release consistency (`GALLOCY_CONSISTENCY=release`),
//! checked bit for bit.

use crate::util::{collective, mix, vread, vwrite, Args, Outcome};

/// Every rank runs four data-race-free phases and checks every byte it reads:
///
/// 0. **Read first, written later.** Every rank reads every page of an array (one page homed
///    at each rank) before anybody writes it; then each home writes its page; after a barrier
///    every rank sees every page's new value (a copy read straight from the home's memory is
///    registered, and dropped at the acquire once its home writes it).
/// 1. **Several writers per page.** `--rounds` rounds over a `--pages`-page array (placed by
///    blocks, so every page has one home that also writes it): in round k, rank r writes the bytes
///    `i` with `i % N == r` to `f(k, i)`; after a barrier every rank checks every byte. Writers of
///    neighbouring bytes never overwrite each other (diffs are exact), and every rank sees every
///    other rank's bytes after the barrier (self-invalidation).
/// 2. **Locks.** Every rank adds to one counter per page of the array under lock 7, `--rounds`
///    times; the totals are exact after a barrier.
/// 3. **Copies that stay.** A page nobody writes, and a page only this rank writes (homed at
///    another rank), survive barriers: reading them again takes no fault.
pub fn rc_drf(args: &Args) -> Outcome {
    let rounds = args.usize_or("--rounds", 20) as u64;
    let pages = args.usize_or("--pages", 3).max(1);
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let page = gallocy::page_size();
    let len = pages * page;
    let shared = collective(len)?;
    let bytes = shared.0 as *mut u8;
    let value = |k: u64, i: usize| (mix(k * 1_000_003 + i as u64) as u8) | 1;

    // 0. Read first, written later.
    let late = collective(size * page)?;
    for round in 1..=3u64 {
        for r in 0..size {
            // SAFETY: a word of page r of `late`; its home writes it only between the barriers.
            let got = unsafe { vread(late.at(r * page)) };
            let want = if round == 1 { 0 } else { (round - 1) * 1000 + r as u64 };
            if got != want {
                return Err(format!("round {round}: page {r} of the late array reads {got}, expected {want}"));
            }
        }
        gallocy::barrier();
        // SAFETY: page `rank` of `late` is ours (block placement makes us its home).
        unsafe { vwrite(late.at(rank * page), round * 1000 + rank as u64) };
        gallocy::barrier();
    }

    // 1. Interleaved bytes.
    for k in 0..rounds {
        for i in (rank..len).step_by(size) {
            // SAFETY: inside the collective allocation; byte i is written by rank i % N alone in
            // this round, and read only after the barrier.
            unsafe { bytes.add(i).write_volatile(value(k, i)) };
        }
        gallocy::barrier();
        for i in 0..len {
            // SAFETY: as above; nobody writes before the next barrier.
            let got = unsafe { bytes.add(i).read_volatile() };
            if got != value(k, i) {
                return Err(format!(
                    "round {k}: byte {i} (written by rank {}) is {got:#04x}, expected {:#04x}",
                    i % size,
                    value(k, i)
                ));
            }
        }
        gallocy::barrier();
    }

    // 2. Counters under a lock.
    for _ in 0..rounds {
        gallocy::lock(7);
        for p in 0..pages {
            // SAFETY: a word of the array; lock 7 orders every access to these words.
            unsafe { vwrite(shared.at(p * page), vread(shared.at(p * page)).wrapping_add(rank as u64 + 1)) };
        }
        gallocy::unlock(7);
    }
    gallocy::barrier();
    // The last round of phase 1 left (value of byte 0..8 of each page) in the words.
    let expected_add = rounds * (size as u64 * (size as u64 + 1) / 2);
    for p in 0..pages {
        let mut start = [0u8; 8];
        for (j, b) in start.iter_mut().enumerate() {
            *b = value(rounds - 1, p * page + j);
        }
        let want = u64::from_ne_bytes(start).wrapping_add(expected_add);
        // SAFETY: as above; nobody writes after the barrier.
        let got = unsafe { vread(shared.at(p * page)) };
        if got != want {
            return Err(format!("page {p}: counter {got:#x}, expected {want:#x} after {rounds} locked rounds"));
        }
    }
    gallocy::barrier();

    // 3. Copies that stay: page 0 of `quiet` is never written; rank r alone writes the last page
    // homed at rank r + 1 (mod N).
    let n = 2 * size;
    let quiet = collective(n * page)?;
    let next = (rank + 1) % size;
    let Some(p) = (1..n).rev().find(|p| gallocy::home_of(quiet.0 + p * page) == next) else {
        return Err(format!("no page of a {n}-page collective allocation is homed at rank {next}"));
    };
    let mine = quiet.at(p * page);
    // SAFETY: that page of `quiet` is this rank's alone.
    unsafe { vwrite(mine, 41 + rank as u64) };
    gallocy::barrier();
    // SAFETY: reading a word nobody writes, and our own word.
    let _ = unsafe { (vread(quiet.at(0)), vread(mine)) };
    let before = gallocy::stats();
    for _ in 0..3 {
        gallocy::barrier();
        // SAFETY: as above.
        let (z, m) = unsafe { (vread(quiet.at(0)), vread(mine)) };
        if z != 0 || m != 41 + rank as u64 {
            return Err(format!("quiet pages read {z} and {m}, expected 0 and {}", 41 + rank as u64));
        }
    }
    let after = gallocy::stats();
    if after.read_faults != before.read_faults {
        return Err(format!(
            "reading a page nobody writes and a page only this rank writes took {} read faults after barriers (expected none)",
            after.read_faults - before.read_faults
        ));
    }
    Ok(format!(
        "{rounds} rounds on {pages} pages: {} diffs sent, {} copies dropped at acquires",
        after.diffs_sent, after.self_invalidations
    ))
}

/// rc-random: a randomized data-race-free program under release consistency, checked against
/// the values every rank can compute. `--epochs` epochs over a `--pages`-page array, `--threads`
/// threads per rank. In epoch e, byte i belongs to rank `owner(e, i)` and is written (by one of
/// that rank's threads, chosen by i) when `writes(e, i)`; every thread also reads bytes no rank
/// writes in this epoch, and its own bytes. A barrier ends each epoch; then every thread checks
/// a random sample of bytes and one thread checks all of them. Every epoch also adds to one
/// counter per rank under a global lock.
pub fn rc_random(args: &Args) -> Outcome {
    let epochs = args.usize_or("--epochs", 30) as u64;
    let pages = args.usize_or("--pages", 6).max(1);
    let threads = args.usize_or("--threads", 2).max(1);
    let seed = args.usize_or("--seed", 1) as u64;
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let page = gallocy::page_size();
    let len = pages * page;
    let shared = collective(len)?;
    let counters = collective(page)?;
    let h = move |e: u64, i: usize, salt: u64| mix(seed ^ mix(e * 0x1_0000_0001 + i as u64 * 7919 + salt));
    // Who owns byte i in epoch e, whether it is written then, and its value after epoch e.
    let owner = move |e: u64, i: usize| {
        // Runs of bytes share an owner, so pages are shared by ranks in pieces of every size.
        let run = 1 + (h(e, 0, 9) % 64) as usize;
        (h(e, i / run, 1) % size as u64) as usize
    };
    let writes = move |e: u64, i: usize| h(e, i, 2) % 3 != 0;
    let value_after =
        move |e: u64, i: usize| -> u8 { (0..=e).rev().find(|k| writes(*k, i)).map_or(0, |k| (h(k, i, 3) as u8) | 1) };
    let base = shared.0;
    let failures = std::sync::atomic::AtomicU64::new(0);
    let first_failure = std::sync::Mutex::new(None::<String>);
    for e in 0..epochs {
        std::thread::scope(|s| {
            for t in 0..threads {
                let (failures, first_failure) = (&failures, &first_failure);
                s.spawn(move || {
                    let fail = |msg: String| {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        first_failure.lock().unwrap().get_or_insert(msg);
                    };
                    for i in (0..len).filter(|i| owner(e, *i) == rank && i % threads == t) {
                        let p = (base + i) as *mut u8;
                        if writes(e, i) {
                            // SAFETY: byte i of the array: this thread alone writes it this epoch.
                            unsafe { p.write_volatile((h(e, i, 3) as u8) | 1) };
                        } else {
                            // SAFETY: nobody writes byte i this epoch.
                            let got = unsafe { p.read_volatile() };
                            let want = if e == 0 { 0 } else { value_after(e - 1, i) };
                            if got != want {
                                fail(format!(
                                    "epoch {e}: own unwritten byte {i} reads {got:#04x}, expected {want:#04x}"
                                ));
                            }
                        }
                    }
                    // Reads of bytes nobody writes this epoch, anywhere in the array.
                    for k in 0..256 {
                        let i = (h(e, k, 4 + t as u64 + 16 * rank as u64) % len as u64) as usize;
                        if !writes(e, i) {
                            // SAFETY: nobody writes byte i this epoch.
                            let got = unsafe { ((base + i) as *const u8).read_volatile() };
                            let want = if e == 0 { 0 } else { value_after(e - 1, i) };
                            if got != want {
                                fail(format!(
                                    "epoch {e}: byte {i} (nobody writes it now) reads {got:#04x}, expected {want:#04x}"
                                ));
                            }
                        }
                    }
                });
            }
        });
        gallocy::lock(3);
        // SAFETY: word `rank` of the counter page; lock 3 orders every access to these words.
        unsafe { vwrite(counters.word(rank), vread(counters.word(rank)) + 1) };
        gallocy::unlock(3);
        gallocy::barrier();
        // Everything written in epoch e is visible now.
        for i in 0..len {
            // SAFETY: nobody writes before the next epoch starts after this check (the writes of
            // epoch e + 1 come after the barrier below).
            let got = unsafe { ((base + i) as *const u8).read_volatile() };
            let want = value_after(e, i);
            if got != want {
                return Err(format!(
                    "after epoch {e}: byte {i} (owner rank {}) reads {got:#04x}, expected {want:#04x}",
                    owner(e, i)
                ));
            }
        }
        gallocy::barrier();
    }
    if let Some(msg) = first_failure.into_inner().unwrap() {
        return Err(format!("{} bad reads; first: {msg}", failures.into_inner()));
    }
    for r in 0..size {
        // SAFETY: after the barriers nobody writes the counters.
        let got = unsafe { vread(counters.word(r)) };
        if got != epochs {
            return Err(format!("rank {r}'s locked counter is {got}, expected {epochs}"));
        }
    }
    let st = gallocy::stats();
    Ok(format!(
        "{epochs} epochs on {pages} pages, {threads} threads: {} diffs, {} copies dropped, {} pages read directly",
        st.diffs_sent, st.self_invalidations, st.pages_read_directly
    ))
}
