//! scale: every rank of a large job (128 ranks in the suite) joins, says when (`joined_ms`, Unix
//! time in ms, after `init`), and then takes part in every kind of traffic once:
//! - each rank writes its own page of a collective allocation (block placement: it is the page's
//!   home and owner), then reads its right neighbour's page and rank 0's (remote read faults);
//! - each rank adds its rank + 1 to a counter under a global lock;
//! - rank 0 broadcasts a word, and barriers separate the steps.
//!
//! Everything is checked bit-exact. At the end each rank reports its memory (resident, and pinned
//! for RDMA), threads and sockets (connections are made on first use: a rank holds only those to
//! the peers it talked to).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::util::{collective, vread, vwrite, Args, Outcome};

pub fn scale(_args: &Args) -> Outcome {
    let joined_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_millis();
    let (rank, size) = (gallocy::rank(), gallocy::size());
    println!("rank {rank}: joined_ms {joined_ms}");
    let page = gallocy::page_size();
    let pages = collective(size * page)?;
    let counter = collective(page)?;
    let word = |r: usize| pages.at(r * page);
    let stamp = |r: usize| 0x0005_ca1e_0000_0000 | r as u64;
    // SAFETY: word(r) is the first word of rank r's page of a live collective allocation; each
    // rank writes only its own page before the barrier, and nobody writes after it.
    unsafe { vwrite(word(rank), stamp(rank)) };
    gallocy::barrier();
    for r in [(rank + 1) % size, 0] {
        // SAFETY: as above.
        let got = unsafe { vread(word(r)) };
        if got != stamp(r) {
            return Err(format!("rank {r}'s page holds {got:#x}, expected {:#x}", stamp(r)));
        }
    }
    gallocy::lock(1);
    // SAFETY: the counter's first word; the global lock serialises every read-modify-write.
    unsafe { vwrite(counter.word(0), vread(counter.word(0)) + rank as u64 + 1) };
    gallocy::unlock(1);
    let mut b = if rank == 0 { 0xb0a1_u64.to_le_bytes() } else { [0; 8] };
    gallocy::broadcast(&mut b, 0);
    if u64::from_le_bytes(b) != 0xb0a1 {
        return Err(format!("broadcast gave {:#x}", u64::from_le_bytes(b)));
    }
    gallocy::barrier();
    // SAFETY: after the barrier nobody writes the counter any more.
    let sum = unsafe { vread(counter.word(0)) };
    let expected = (size * (size + 1) / 2) as u64;
    if sum != expected {
        return Err(format!("counter is {sum}, expected {expected}"));
    }
    gallocy::barrier();
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map_or("?".to_string(), |v| v.trim().to_string())
    };
    // Connections are made on first use: count the sockets this rank holds.
    let sockets = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| e.to_string())?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count();
    Ok(format!(
        "{size} ranks: pages, lock, broadcast and barriers checked; rss {}, threads {}, pinned {}, sockets {sockets}",
        field("VmRSS:"),
        field("Threads:"),
        // Memory registered for RDMA (message buffers, heap chunks).
        field("VmPin:")
    ))
}
