//! stack [--pages P]: how much of a thread's alternate signal stack the fault path uses.
//!
//! Rank 0 writes P pages of a collective allocation it is home of; rank 1 reads them from a thread
//! the runtime did not prepare, whose alternate signal stack (16 KiB, painted) it set itself, as a
//! program's own threads have (std gives its threads a small one). Every read is a remote fault
//! served on that stack, waiting threads reading the socket themselves (authenticating each frame)
//! included. Rank 1 prints the deepest use: `altstack used N bytes`.

use crate::util::{collective, vread, vwrite, Args, Outcome};

const ALT: usize = 16 * 1024;
const PAINT: u8 = 0xa5;

pub fn stack(args: &Args) -> Outcome {
    let pages = args.usize_or("--pages", 2000);
    let rank = gallocy::rank();
    let page = gallocy::page_size();
    let buf = collective(2 * pages * page)?;
    if rank == 0 {
        for p in 0..pages {
            // SAFETY: the first word of page p of the first half, which rank 0 alone writes.
            unsafe { vwrite(buf.at(p * page), p as u64) };
        }
    }
    gallocy::barrier();
    let mut used = 0;
    if rank == 1 {
        used = std::thread::spawn(move || -> Result<usize, String> {
            let mut std_alt = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: 0, ss_size: 0 };
            // SAFETY: querying this thread's alternate stack.
            unsafe { libc::sigaltstack(std::ptr::null(), &mut std_alt) };
            println!(
                "rank 1: the thread's own alternate stack: {} bytes (flags {})",
                std_alt.ss_size, std_alt.ss_flags
            );
            let mut alt = vec![PAINT; ALT];
            let st = libc::stack_t { ss_sp: alt.as_mut_ptr().cast(), ss_flags: 0, ss_size: ALT };
            // SAFETY: the stack lives until after it is disabled below; this thread only.
            if unsafe { libc::sigaltstack(&st, std::ptr::null_mut()) } != 0 {
                return Err("sigaltstack failed".into());
            }
            for p in 0..pages {
                // SAFETY: as above; rank 0 wrote it before the barrier.
                let got = unsafe { vread(buf.at(p * page)) };
                if got != p as u64 {
                    return Err(format!("page {p}: {got}"));
                }
            }
            let off = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
            // SAFETY: disabling this thread's alternate stack.
            unsafe { libc::sigaltstack(&off, std::ptr::null_mut()) };
            // The stack grows down: the lowest byte that changed marks the deepest use.
            Ok(ALT - alt.iter().position(|b| *b != PAINT).unwrap_or(ALT))
        })
        .join()
        .map_err(|_| "the reading thread panicked".to_string())??;
        println!("rank 1: altstack used {used} bytes");
    }
    gallocy::barrier();
    Ok(format!("{pages} remote faults; altstack used {used} bytes"))
}
