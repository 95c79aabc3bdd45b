//! soak: minutes of mixed lock, barrier, page and allocator traffic, sampled per time window.
//!
//! Every rank runs rounds in lockstep (one barrier per round) until rank 0's clock passes
//! `--secs`. A round, on every rank:
//!
//! - every 8th round: `alloc_collective` of a sub-page block (allocator path, no placement) that
//!   rank 0 fills, everybody verifies after the barrier and one rank, changing every time, frees
//!   in the next round (mostly a remote free);
//! - lock sections: `LOCK_OPS` sections under global locks `LOCK_BASE..LOCK_BASE + NLOCKS` (one
//!   home each), each adding 1 and a per-section value to that lock's counter page, and 1 to this
//!   rank's own word of it, which must equal this rank's own tally (a lost update shows at once);
//! - private churn: `CHURN_OPS` mallocs or frees (verified pattern) of blocks kept only here,
//!   mostly small, one in 16 of 16-256 KiB (at most 64 small and 4 large ones live);
//! - shared blocks: `SHARED_PER_ROUND` blocks malloc'ed and filled here, published in a
//!   collective table, then verified and freed by the next rank after the barrier (remote frees);
//! - page traffic: this rank writes whole pages (`--pages-per-round`) of one chunk of a
//!   `--mib` MiB collective buffer; after the barrier it verifies the pages the next rank wrote.
//!   The chunk moves through the buffer and the slice of a chunk each rank writes rotates, so pages
//!   change owner and read copies get invalidated all the time, in every direction (every rank
//!   reads the whole buffer once before the clock starts: all of it is resident from then on);
//! - rank 0 publishes "stop" (in a word chosen by the round's parity, so a late reader of the
//!   previous round cannot see it early), read by everybody after the barrier: all ranks leave
//!   after the same round.
//!
//! At every `--window-secs` boundary a rank prints one line
//! `rank R: soak window K secs T rounds N ops N faults N rss_kib X anon_kib A shmem_kib S fds Y`:
//! the window's length, rounds and operations (lock sections + mallocs + frees + pages written +
//! pages verified), the page faults taken in it, and at its end VmRSS, RssAnon and RssShmem
//! (/proc/self/status) and the number of open file descriptors (entries of /proc/self/fd). `runtime/testkit/tests/soak.rs` checks them.
//!
//! At the end every rank publishes its tallies and checks every counter page bit for bit against
//! the sum of all ranks' tallies.

use crate::util::{collective, mix, vread, vwrite, Args, Outcome, Shared};
use std::time::{Duration, Instant};

/// Global locks used (ids `LOCK_BASE..LOCK_BASE + NLOCKS`), each guarding one counter page.
const LOCK_BASE: u32 = 100;
const NLOCKS: usize = 4;
/// Lock sections per rank per round.
const LOCK_OPS: usize = 6;
/// Private malloc/free operations per rank per round, and the most small and large private
/// blocks kept live.
const CHURN_OPS: usize = 16;
const CHURN_SMALL_LIVE: usize = 64;
const CHURN_LARGE_LIVE: usize = 4;
/// Blocks each rank hands to the next one per round.
const SHARED_PER_ROUND: usize = 2;
/// A collective allocation every this many rounds.
const COLLECTIVE_EVERY: u64 = 8;

/// This rank's sums of what it added to each counter page.
#[derive(Clone, Copy, Default)]
struct Tally {
    count: u64,
    sum: u64,
}

fn byte_at(seed: u64, i: usize) -> u8 {
    (seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9)) >> 24) as u8 ^ (i as u8)
}

/// Fill `len` bytes at `p` with the pattern of `seed`.
///
/// # Safety
/// `p..p+len` must be a live block the caller may write.
unsafe fn fill(p: usize, len: usize, seed: u64) {
    // SAFETY: guaranteed by the caller.
    let s = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = byte_at(seed, i);
    }
}

/// Check the pattern of `seed` in `len` bytes at `p`.
///
/// # Safety
/// `p..p+len` must be a live block.
unsafe fn check(what: &str, p: usize, len: usize, seed: u64) -> Result<(), String> {
    // SAFETY: guaranteed by the caller.
    let s = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    match (0..len).find(|&i| s[i] != byte_at(seed, i)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte {i} of the {len}-byte block at {p:#x} is {:#04x}, expected {:#04x}",
            s[i],
            byte_at(seed, i)
        )),
    }
}

/// `gallocy::malloc(len)` filled with the pattern of `seed`.
fn malloc_filled(what: &str, len: usize, seed: u64) -> Result<usize, String> {
    let p = gallocy::malloc(len);
    if p.is_null() {
        return Err(format!("{what}: malloc({len}) returned null"));
    }
    // SAFETY: fresh block of at least `len` bytes.
    unsafe { fill(p as usize, len, seed) };
    Ok(p as usize)
}

/// This process's resident memory in KiB: all of it (VmRSS), its private part (RssAnon: the
/// runtime's own memory, the transport's buffers, the program's) and its shared part (RssShmem:
/// the pages of the heap's memfd mapped here, in the program's view and the runtime's).
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    anon: u64,
    shmem: u64,
}

fn memory() -> Result<Memory, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} line in /proc/self/status"))
    };
    Ok(Memory { rss: field("VmRSS:")?, anon: field("RssAnon:")?, shmem: field("RssShmem:")? })
}

/// Open file descriptors of this process (the directory's own descriptor included: a constant).
fn fd_count() -> Result<usize, String> {
    Ok(std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?.count())
}

fn faults() -> u64 {
    let s = gallocy::stats();
    s.read_faults + s.write_faults
}

/// The value of word `w` of buffer page `page` written in round `round`.
fn page_word(round: u64, page: usize, w: usize) -> u64 {
    mix((round << 24) ^ page as u64) ^ w as u64
}

/// This rank's private blocks, small and large: (address, length, pattern seed).
struct Churn {
    small: Vec<(usize, usize, u64)>,
    large: Vec<(usize, usize, u64)>,
    seq: u64,
}

impl Churn {
    /// `CHURN_OPS` mallocs or frees; returns the number of operations. One in 16 is on a large
    /// block (16-256 KiB: slabs of the big classes and page runs), the others on small ones
    /// (1-2048 bytes). Each kind's live blocks are capped, so this rank's footprint in its arena
    /// is bounded: once the allocator has served the largest mix, RSS stops growing.
    fn round(&mut self, rank: usize) -> Result<u64, String> {
        for _ in 0..CHURN_OPS {
            let h = mix(((rank as u64) << 56) ^ self.seq);
            self.seq += 1;
            let (live, cap, len) = if h % 16 == 0 {
                (&mut self.large, CHURN_LARGE_LIVE, (16 << 10) + (h >> 16) as usize % (240 << 10))
            } else {
                (&mut self.small, CHURN_SMALL_LIVE, 1 + (h >> 16) as usize % 2048)
            };
            if live.len() >= cap || (!live.is_empty() && (h >> 4) % 2 == 0) {
                let (p, len, seed) = live.swap_remove((h >> 8) as usize % live.len());
                // SAFETY: a live private block of `len` bytes, freed once here.
                unsafe {
                    check("private block", p, len, seed)?;
                    gallocy::free(p as *mut u8);
                }
            } else {
                let p = malloc_filled("private block", len, h)?;
                live.push((p, len, h));
            }
        }
        Ok(CHURN_OPS as u64)
    }

    fn free_all(&mut self) -> Result<(), String> {
        for (p, len, seed) in self.small.drain(..).chain(self.large.drain(..)) {
            // SAFETY: a live private block, freed once.
            unsafe {
                check("private block", p, len, seed)?;
                gallocy::free(p as *mut u8);
            }
        }
        Ok(())
    }
}

fn shared_len(round: u64, rank: usize, j: usize) -> usize {
    16 + (mix((round << 16) ^ ((rank as u64) << 8) ^ j as u64) % 8192) as usize
}

fn shared_seed(round: u64, rank: usize, j: usize) -> u64 {
    mix(0x5EED ^ (round << 20) ^ ((rank as u64) << 8) ^ j as u64)
}

pub fn soak(args: &Args) -> Outcome {
    let secs = args.usize_or("--secs", 180) as u64;
    let window = Duration::from_secs(args.usize_or("--window-secs", 10).max(1) as u64);
    let mib = args.usize_or("--mib", 4).max(1);
    let per = args.usize_or("--pages-per-round", 8).max(1);
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let page = gallocy::page_size();
    let page_words = page / 8;
    if size + 2 > page_words {
        return Err(format!("{size} ranks do not fit a counter page of {page_words} words"));
    }
    let buf_pages = (mib << 20) / page;
    let chunk_pages = size * per;
    let chunks = buf_pages / chunk_pages;
    if chunks < 2 {
        return Err(format!("{mib} MiB hold {chunks} chunks of {size} ranks x {per} pages; need at least 2"));
    }

    let buf = collective(buf_pages * page)?;
    let counters = collective(NLOCKS * page)?;
    let control = collective(page)?;
    let slots = collective(2 * size * SHARED_PER_ROUND * 8)?;
    let slot = |parity: u64, r: usize, j: usize| slots.word((parity as usize * size + r) * SHARED_PER_ROUND + j);

    let mut tally = [Tally::default(); NLOCKS];
    let mut churn = Churn { small: Vec::new(), large: Vec::new(), seq: 0 };
    // The collective block awaiting its free: (address, length, round it was made in).
    let mut pending: Option<(Shared, usize, u64)> = None;
    let (next, prev) = ((rank + 1) % size, (rank + size - 1) % size);

    let (mem0, fds0) = (memory()?, fd_count()?);
    // Read the whole buffer once (it is zero): every page of it is then resident here before the
    // clock starts, so RSS does not grow later as the writes reach pages not seen yet.
    // SAFETY: the live buffer; nobody writes it before the barrier.
    let zero = unsafe { std::slice::from_raw_parts(buf.0 as *const u64, buf_pages * page_words) };
    if let Some(w) = zero.iter().position(|&x| x != 0) {
        return Err(format!("word {w} of the fresh collective buffer is {:#x}, not zero", zero[w]));
    }
    gallocy::barrier();
    let t0 = Instant::now();
    let (mut k, mut ops_total) = (0u64, 0u64);
    let (mut win, mut win_start, mut win_rounds, mut win_ops, mut win_faults) = (0u32, t0, 0u64, 0u64, faults());
    let mut last = (mem0, fds0);
    loop {
        let mut ops = 0u64;

        // A collective block (every rank calls alloc_collective in the same rounds).
        let made = if k % COLLECTIVE_EVERY == 0 {
            let len = 256 + ((k / COLLECTIVE_EVERY) % 8) as usize * 448;
            let p = collective(len)?;
            if rank == 0 {
                // SAFETY: a live collective block of `len` bytes; only rank 0 writes it.
                unsafe { fill(p.0, len, k) };
            }
            ops += 1;
            Some((p, len, k))
        } else {
            None
        };

        // Lock sections.
        for j in 0..LOCK_OPS {
            let idx = (k as usize * LOCK_OPS + j + rank) % NLOCKS;
            let cp = Shared(counters.0 + idx * page);
            let v = mix(((rank as u64) << 48) ^ (k << 8) ^ j as u64);
            gallocy::lock(LOCK_BASE + idx as u32);
            // SAFETY: words of the live counter page `idx`; global lock `LOCK_BASE + idx`
            // serialises every access to it across the job.
            let mine = unsafe {
                vwrite(cp.word(0), vread(cp.word(0)) + 1);
                vwrite(cp.word(1), vread(cp.word(1)).wrapping_add(v));
                let mine = vread(cp.word(2 + rank));
                vwrite(cp.word(2 + rank), mine + 1);
                mine
            };
            gallocy::unlock(LOCK_BASE + idx as u32);
            if mine != tally[idx].count {
                return Err(format!(
                    "round {k}: under lock {}, this rank's word of counter {idx} is {mine}, but it added {} to it: an update was lost",
                    LOCK_BASE + idx as u32,
                    tally[idx].count
                ));
            }
            tally[idx].count += 1;
            tally[idx].sum = tally[idx].sum.wrapping_add(v);
        }
        ops += LOCK_OPS as u64;

        // Private churn.
        ops += churn.round(rank)?;

        // Blocks for the next rank.
        for j in 0..SHARED_PER_ROUND {
            let p = malloc_filled("shared block", shared_len(k, rank, j), shared_seed(k, rank, j))?;
            // SAFETY: a word of the live slot table; only this rank writes its slots, and the
            // parity keeps the next rank's read of the previous round apart from this write.
            unsafe { vwrite(slot(k % 2, rank, j), p as u64) };
        }
        ops += SHARED_PER_ROUND as u64;

        // Page writes: this rank's slice of this round's chunk.
        let chunk = (k as usize % chunks) * chunk_pages;
        // Which slice of the chunk a rank writes changes every round and, for a given chunk,
        // every pass through the buffer: each page gets every rank as its writer in turn.
        let slice_of = |r: usize| chunk + ((r + k as usize + k as usize / chunks) % size) * per;
        for i in 0..per {
            let pg = slice_of(rank) + i;
            // SAFETY: page `pg` < buf_pages of the live buffer; in this round only this rank
            // touches it before the barrier.
            let s = unsafe { std::slice::from_raw_parts_mut((buf.0 + pg * page) as *mut u64, page_words) };
            for (w, x) in s.iter_mut().enumerate() {
                *x = page_word(k, pg, w);
            }
        }
        ops += per as u64;

        if rank == 0 && t0.elapsed() >= Duration::from_secs(secs) {
            // SAFETY: a word of the live control page, only written by rank 0.
            unsafe { vwrite(control.word((k % 2) as usize), 1) };
        }

        gallocy::barrier();

        // Verify the next rank's pages.
        for i in 0..per {
            let pg = slice_of(next) + i;
            // SAFETY: as above; rank `next` wrote it before the barrier and nobody writes this
            // chunk again before everybody has passed the next barrier.
            let s = unsafe { std::slice::from_raw_parts((buf.0 + pg * page) as *const u64, page_words) };
            for (w, &got) in s.iter().enumerate() {
                let want = page_word(k, pg, w);
                if got != want {
                    return Err(format!(
                        "round {k}: word {w} of buffer page {pg} (written by rank {next}) is {got:#x}, expected {want:#x}"
                    ));
                }
            }
        }
        ops += per as u64;

        // The previous rank's blocks: verify and free them here.
        for j in 0..SHARED_PER_ROUND {
            // SAFETY: rank `prev` wrote the slot before the barrier.
            let p = unsafe { vread(slot(k % 2, prev, j)) } as usize;
            let (len, seed) = (shared_len(k, prev, j), shared_seed(k, prev, j));
            // SAFETY: rank `prev` handed this live block over; it is freed once, here.
            unsafe {
                check(&format!("round {k}: block of rank {prev}"), p, len, seed)?;
                gallocy::free(p as *mut u8);
            }
        }
        ops += SHARED_PER_ROUND as u64;

        // Collective blocks: free the previous one (everybody verified it before this round's
        // barrier), verify this round's.
        if let Some((p, _, made_in)) = pending.take() {
            if rank == (made_in / COLLECTIVE_EVERY) as usize % size {
                // SAFETY: the collective block is live and no rank uses it any more.
                unsafe { gallocy::free(p.0 as *mut u8) };
                ops += 1;
            }
        }
        if let Some((p, len, made_in)) = made {
            // SAFETY: a live collective block rank 0 filled before the barrier.
            unsafe { check(&format!("round {k}: collective block"), p.0, len, made_in)? };
            pending = made;
        }

        // SAFETY: a word of the live control page; see the write above.
        let stop = unsafe { vread(control.word((k % 2) as usize)) } == 1;
        k += 1;
        ops_total += ops;
        win_rounds += 1;
        win_ops += ops;

        let now = Instant::now();
        if now >= t0 + window * (win + 1) || stop {
            let f = faults();
            last = (memory()?, fd_count()?);
            println!(
                "rank {rank}: soak window {win} secs {:.2} rounds {win_rounds} ops {win_ops} faults {} rss_kib {} anon_kib {} shmem_kib {} fds {}",
                (now - win_start).as_secs_f64(),
                f - win_faults,
                last.0.rss,
                last.0.anon,
                last.0.shmem,
                last.1
            );
            (win, win_start, win_rounds, win_ops, win_faults) = (win + 1, now, 0, 0, f);
        }
        if stop {
            break;
        }
    }
    let elapsed = t0.elapsed();

    // Everybody is done with the last round: free what is left, then check the counters.
    gallocy::barrier();
    if let Some((p, _, made_in)) = pending.take() {
        if rank == (made_in / COLLECTIVE_EVERY) as usize % size {
            // SAFETY: as above.
            unsafe { gallocy::free(p.0 as *mut u8) };
        }
    }
    churn.free_all()?;
    let table = collective(size * NLOCKS * 2 * 8)?;
    for (i, t) in tally.iter().enumerate() {
        // SAFETY: words of the live table; only this rank writes its own.
        unsafe {
            vwrite(table.word((rank * NLOCKS + i) * 2), t.count);
            vwrite(table.word((rank * NLOCKS + i) * 2 + 1), t.sum);
        }
    }
    gallocy::barrier();
    let mut sections = 0;
    for i in 0..NLOCKS {
        let cp = Shared(counters.0 + i * page);
        let (mut count, mut sum) = (0u64, 0u64);
        for r in 0..size {
            // SAFETY: the table and the counter pages are live; nobody writes them any more.
            let (c, s, word) = unsafe {
                (
                    vread(table.word((r * NLOCKS + i) * 2)),
                    vread(table.word((r * NLOCKS + i) * 2 + 1)),
                    vread(cp.word(2 + r)),
                )
            };
            if word != c {
                return Err(format!("counter {i}: rank {r}'s word is {word}, but rank {r} added {c}"));
            }
            count += c;
            sum = sum.wrapping_add(s);
        }
        // SAFETY: as above.
        let (got_count, got_sum) = unsafe { (vread(cp.word(0)), vread(cp.word(1))) };
        if (got_count, got_sum) != (count, sum) {
            return Err(format!(
                "counter {i} (lock {}) is count {got_count} sum {got_sum:#x}; the ranks added count {count} sum {sum:#x}",
                LOCK_BASE + i as u32
            ));
        }
        sections += count;
    }
    gallocy::barrier();
    if rank == 0 {
        // SAFETY: the table came from the allocator (rank 0's arena); every rank has read it.
        unsafe { gallocy::free(table.0 as *mut u8) };
    }
    Ok(format!(
        "{k} rounds in {:.1} s, {ops_total} ops here; {sections} lock sections of {size} ranks exact; rss_kib {} -> {}, fds {fds0} -> {}",
        elapsed.as_secs_f64(),
        mem0.rss,
        last.0.rss,
        last.1
    ))
}
