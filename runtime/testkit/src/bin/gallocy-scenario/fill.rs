//! fill64: rank 0 fills a large collective buffer, every rank verifies every byte.

use crate::util::{collective, mix, Args, Outcome};
use std::time::Instant;

/// The pattern word at word index `w`: depends on the offset, differs from zero almost always.
fn pattern(w: usize) -> u64 {
    mix(w as u64 ^ 0x0067_616c_6c6f_6379)
}

pub fn fill64(args: &Args) -> Outcome {
    let mib = args.usize_or("--mib", 64);
    let len = mib << 20;
    let words = len / 8;
    let rank = gallocy::rank();
    let buf = collective(len)?;
    let t0 = Instant::now();
    if rank == 0 {
        // SAFETY: `buf` is a collective allocation of `len` bytes, 8-aligned (page-aligned in
        // practice; checked below), and no other rank touches it before the barrier.
        let s = unsafe { std::slice::from_raw_parts_mut(buf.0 as *mut u64, words) };
        for (w, v) in s.iter_mut().enumerate() {
            *v = pattern(w);
        }
    }
    let filled = t0.elapsed();
    gallocy::barrier();
    if buf.0 % 8 != 0 {
        return Err(format!("collective buffer {:#x} is not 8-aligned", buf.0));
    }
    let t1 = Instant::now();
    // SAFETY: as above; after the barrier every rank only reads.
    let s = unsafe { std::slice::from_raw_parts(buf.0 as *const u64, words) };
    for (w, &v) in s.iter().enumerate() {
        let want = pattern(w);
        if v != want {
            // Name the first wrong byte.
            let (got_b, want_b) = (v.to_le_bytes(), want.to_le_bytes());
            let i = (0..8).find(|&i| got_b[i] != want_b[i]).unwrap_or(0);
            return Err(format!(
                "byte at offset {:#x} (address {:#x}) is {:#04x}, expected {:#04x}",
                w * 8 + i,
                buf.0 + w * 8 + i,
                got_b[i],
                want_b[i]
            ));
        }
    }
    let verified = t1.elapsed();
    // Keep the buffer alive until everybody has verified.
    gallocy::barrier();
    let st = gallocy::stats();
    Ok(format!(
        "{mib} MiB verified; fill {:.0} ms, verify {:.0} ms, read faults {}, prefetched pages {}, bytes moved {}",
        filled.as_secs_f64() * 1e3,
        verified.as_secs_f64() * 1e3,
        st.read_faults,
        st.prefetched,
        st.bytes_moved
    ))
}
