//! nullderef and occupy: scenarios that are expected to fail in a specific way.

use crate::util::{collective, env_rank, init_or_exit, parse_size, vread, vwrite, Args, Outcome};

/// After init, rank `--rank` (default: the last rank) reads address 0 and must die by SIGSEGV
/// exactly as it would without the runtime. The other ranks wait in a barrier (and so learn of
/// its death as a lost peer).
///
/// With `--own-handler` the program installs a SIGSEGV handler of its own before `init()`, as a
/// runtime or a crash reporter would. Heap misses must still be ours (rank 0 writes a page, the
/// victim reads it), and the null dereference must reach the program's handler, which prints
/// `nullderef: the program's own handler ran for address 0` and exits with code 42.
pub fn nullderef(args: &Args) -> ! {
    if args.flag("--own-handler") {
        install_own_handler();
    }
    init_or_exit();
    let (rank, size) = (gallocy::rank(), gallocy::size());
    let victim = args.usize_or("--rank", size - 1);
    if args.flag("--own-handler") {
        heap_traffic_before_the_crash(rank, victim);
    }
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

/// Code the program's own SIGSEGV handler exits with (`nullderef --own-handler`).
const OWN_HANDLER_EXIT: i32 = 42;

/// The program's own SIGSEGV handler: it reports the faulting address (0, or "not 0") and ends
/// the process. Async-signal-safe: static strings, `write`, `_exit`.
extern "C" fn own_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel (or gallocy's handler, chaining) passes a valid siginfo_t.
    let addr = unsafe { (*info).si_addr() } as usize;
    let line: &[u8] = if addr == 0 {
        b"nullderef: the program's own handler ran for address 0\n"
    } else {
        b"error: nullderef: the program's own handler ran for an address that is not 0\n"
    };
    // SAFETY: write and _exit are async-signal-safe; the buffer is static.
    unsafe {
        libc::write(2, line.as_ptr().cast(), line.len());
        libc::_exit(if addr == 0 { OWN_HANDLER_EXIT } else { 1 });
    }
}

fn install_own_handler() {
    // SAFETY: installing a handler with SA_SIGINFO whose signature matches; a zeroed sigaction
    // with an empty mask is valid.
    let ok = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = own_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()) == 0
    };
    if !ok {
        eprintln!("error: nullderef: cannot install the program's own SIGSEGV handler");
        std::process::exit(1);
    }
}

/// Rank 0 writes a page of a collective allocation, the victim reads it: a heap miss on every
/// rank, which gallocy's handler must resolve without the program's handler seeing it.
fn heap_traffic_before_the_crash(rank: usize, victim: usize) {
    let page = gallocy::page_size();
    let buf = match collective(4 * page) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: rank {rank}: nullderef: {e}");
            std::process::exit(1);
        }
    };
    let want = 0x6e75_6c6c_6465_7266u64;
    if rank == 0 {
        for i in 0..4 {
            // SAFETY: inside the collective block; only rank 0 writes, before the barrier.
            unsafe { vwrite(buf.at(i * page), want + i as u64) };
        }
    }
    gallocy::barrier();
    if rank == victim {
        for i in 0..4 {
            // SAFETY: inside the collective block; nobody writes after the barrier.
            let got = unsafe { vread(buf.at(i * page)) };
            if got != want + i as u64 {
                eprintln!("error: rank {rank}: nullderef: page {i} holds {got:#x}, expected {:#x}", want + i as u64);
                std::process::exit(1);
            }
        }
        eprintln!("rank {rank}: nullderef: read 4 pages rank 0 wrote, with the program's own handler installed");
    }
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

/// `map-count`: rank 1 takes all but 64 of its process's mappings (`vm.max_map_count`) with
/// small mappings of its own, then reads scattered pages that rank 0 wrote. Every page it
/// receives needs its own protection, i.e. a mapping split: the runtime must keep working in
/// what is left (closing its view of the heap when the kernel refuses), and every page must
/// read what rank 0 wrote.
pub fn map_count(_args: &Args) -> Outcome {
    let rank = gallocy::rank();
    let pages = 4096usize;
    let page = gallocy::page_size();
    let buf = gallocy::alloc_collective(pages * 2 * page);
    if rank == 0 {
        for i in 0..pages {
            // SAFETY: inside the collective block, which rank 0 allocated and holds.
            unsafe { std::ptr::write_volatile(buf.add(2 * i * page) as *mut u64, i as u64 + 1) };
        }
    }
    gallocy::barrier();
    let mut details = String::new();
    if rank == 1 {
        let eaten = eat_mappings(page);
        let mut sum = 0u64;
        for i in 0..pages {
            // SAFETY: inside the collective block; a read fault fetches the page.
            sum += unsafe { std::ptr::read_volatile(buf.add(2 * i * page) as *const u64) };
        }
        let kept = eaten.len();
        for p in eaten {
            // SAFETY: unmapping a mapping `eat_mappings` made.
            unsafe { libc::munmap(p, page) };
        }
        let want = (pages as u64) * (pages as u64 + 1) / 2;
        if sum != want {
            return Err(format!("read {pages} scattered pages: sum {sum}, expected {want}"));
        }
        let s = gallocy::stats();
        if s.view_closes == 0 {
            return Err(format!("read {pages} scattered pages with only 64 mappings free and never closed the view"));
        }
        details = format!(
            "read {pages} scattered pages with {kept} mappings taken, view closes {}, pages reopened {}",
            s.view_closes, s.pages_reopened
        );
    }
    gallocy::barrier();
    Ok(details)
}

/// Maps single pages with alternating protections (so they cannot merge) until the kernel
/// refuses, then gives back 64 so that the runtime has a little room. Returns the rest.
fn eat_mappings(page: usize) -> Vec<*mut libc::c_void> {
    let mut maps = Vec::new();
    loop {
        let prot = if maps.len() % 2 == 0 { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: a fresh private anonymous mapping; never touched.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), page, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            break;
        }
        maps.push(p);
        if maps.len() > 10_000_000 {
            break;
        }
    }
    for p in maps.drain(maps.len().saturating_sub(64)..) {
        // SAFETY: unmapping a mapping made above.
        unsafe { libc::munmap(p, page) };
    }
    maps
}
