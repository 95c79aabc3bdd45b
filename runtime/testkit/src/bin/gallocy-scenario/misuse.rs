//! misuse --what W: API misuse on rank `--rank R` (default 1), which must end that process with one
//! clear line (no panic, no hang) and its peers with "lost contact".
//!
//! W: unlock-unheld, relock, bad-root, broadcast-length, collective-size, extra-barrier (rank R
//! calls one barrier more than the others, which then leave the job).

use crate::util::{Args, Outcome};

pub fn misuse(args: &Args) -> Outcome {
    let what = args.str_or("--what", "");
    let culprit = args.usize_or("--rank", 1);
    let rank = gallocy::rank();
    gallocy::barrier();
    let me = rank == culprit;
    match what.as_str() {
        "unlock-unheld" if me => gallocy::unlock(7),
        "relock" if me => {
            gallocy::lock(7);
            gallocy::lock(7);
        }
        "bad-root" => {
            let mut b = [0u8; 8];
            gallocy::broadcast(&mut b, if me { gallocy::size() } else { 0 });
        }
        "broadcast-length" => {
            let mut b = vec![0u8; if me { 16 } else { 8 }];
            gallocy::broadcast(&mut b, 0);
        }
        "collective-size" => {
            let _ = gallocy::alloc_collective(if me { 8192 } else { 4096 });
        }
        "extra-barrier" => {
            if me {
                gallocy::barrier();
            }
            // `finalize` starts with a barrier: the culprit's is one too many.
            gallocy::finalize().map_err(|e| e.to_string())?;
            return Ok(format!("misuse {what}: rank {rank} left"));
        }
        "unlock-unheld" | "relock" => {}
        other => return Err(format!("unknown misuse {other:?}")),
    }
    // Everybody but the culprit waits here until the culprit's end makes them stop.
    gallocy::barrier();
    Err(format!("misuse {what}: rank {rank} went on; the misuse was not caught"))
}
