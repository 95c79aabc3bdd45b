//! nullderef and occupy: scenarios that are expected to fail in a specific way.

use crate::util::{env_rank, init_or_exit, parse_size, Args};

/// After init, rank `--rank` (default: the last rank) reads address 0 and must die by SIGSEGV
/// exactly as it would without the runtime. The other ranks wait in a barrier (and so learn of
/// its death as a lost peer).
pub fn nullderef(args: &Args) -> ! {
    init_or_exit();
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let victim = args.usize_or("--rank", size - 1);
    if rank == victim {
        eprintln!("rank {rank}: nullderef: reading address 0 now");
        let p = std::hint::black_box(std::ptr::null::<u64>());
        // SAFETY: deliberately not safe: the whole point is to fault on address 0 and die.
        let v = unsafe { std::ptr::read_volatile(p) };
        eprintln!("error: rank {rank}: nullderef: reading address 0 returned {v:#x} instead of faulting");
        std::process::exit(1);
    }
    gallocy::barrier();
    eprintln!("error: rank {rank}: nullderef: the barrier completed although rank {victim} should have crashed");
    std::process::exit(1);
}

/// On the rank named by `SCENARIO_OCCUPY_RANK`, map an anonymous page at heap base + 1 MiB
/// before `init()`; the runtime must then refuse to start on every rank. This scenario always
/// exits non-zero: with the runtime's error when init fails (expected), with its own message
/// when init succeeds (a runtime bug).
pub fn occupy(_args: &Args) -> ! {
    let rank = env_rank();
    let occupier: Option<usize> = std::env::var("SCENARIO_OCCUPY_RANK").ok().and_then(|v| v.parse().ok());
    let base =
        std::env::var("GALLOCY_HEAP_BASE").ok().and_then(|v| parse_size(&v)).unwrap_or(gallocy::DEFAULT_HEAP_BASE);
    if occupier == Some(rank) {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let want = base + (1 << 20);
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a fresh anonymous
        // page at an address nothing else uses.
        let got = unsafe {
            libc::mmap(
                want as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if got == libc::MAP_FAILED || got as usize != want {
            eprintln!(
                "scenario setup failed: could not map a page at heap base + 1 MiB: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(3);
        }
        // Touch it so it is a real, resident mapping.
        // SAFETY: the page was just mapped readable and writable.
        unsafe { std::ptr::write_volatile(got as *mut u8, 1) };
        eprintln!("occupy: this process mapped one page at heap base + 1 MiB before init");
    }
    match gallocy::init() {
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        Ok(()) => {
            // Leave cleanly so peers do not report a lost rank, then fail.
            let _ = gallocy::finalize();
            eprintln!(
                "error: occupy: init() returned Ok here although part of the heap range was occupied before init"
            );
            std::process::exit(1);
        }
    }
}
