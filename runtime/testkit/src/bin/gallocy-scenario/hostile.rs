//! hostile --what W: rank 1 knows the job's token (it is a member) but sends rank 0 one
//! well-formed, authenticated message that the protocol does not allow. Rank 0 must end with one
//! clear line naming rank 1, with the page it holds intact until then; nobody may hang.
//!
//! W (the message rank 1 sends):
//! - `contents`: a grant with page contents for a page rank 0 holds and did not ask for;
//! - `forward`: a forward of a page whose home is rank 0;
//! - `revoke-ack`: an acknowledgement of a revoke rank 0 never sent;
//! - `stale-grant`: a grant of a page homed at rank 1 to a wait that does not exist;
//! - `lock-release`: a release of a global lock homed at rank 0 that rank 1 does not hold;
//! - `barrier`: a barrier notice for a barrier far ahead;
//! - `free`: a free of an address that is no block of rank 0's arena;
//! - `broadcast`: a broadcast chunk that announces a terabyte and starts in the middle;
//! - `size-reply`: an answer to a size query nobody asked;
//! - `diff`: changes to rank 0's page from a rank that never registered to write it (under
//!   release consistency; under sequential consistency no diff is allowed at all);
//! - `written`: a notice that others write rank 0's own page (only a home sends those);
//! - `revoke-past`, `forward-past`: a revoke or a forward of a page past the end of the heap
//!   (once checked only after it was used: the service thread panicked);
//! - `read`: a read of rank 0's page, which rank 0 holds writable, that no grant sent it for
//!   (over TCP rank 0 answered any read of its heap; over RDMA a READ needs nobody, see the test).

use std::time::{Duration, Instant};

use gallocy::protocol::{Msg, Source, Waiter};

use crate::util::{Args, Outcome};

/// Bytes of the collective allocation: block placement gives its first half rank 0 as home, its
/// second half rank 1.
const BYTES: usize = 16 * 4096;
const PATTERN: u8 = 0xab;
/// A page number past the end of any heap (2^40 pages of 4 KiB: 4 PiB).
const PAST_THE_HEAP: u64 = 1 << 40;

pub fn hostile(args: &Args) -> Outcome {
    let what = args.str_or("--what", "");
    let rank = gallocy::rank();
    if gallocy::size() != 2 {
        return Err("hostile runs on 2 ranks".into());
    }
    let heap = gallocy::alloc_collective(BYTES);
    // SAFETY: a collective allocation of BYTES bytes, the same on both ranks.
    let mem = unsafe { std::slice::from_raw_parts_mut(heap, BYTES) };
    if rank == 0 {
        mem[..4096].fill(PATTERN);
    }
    gallocy::barrier();
    let victim_page = mem.as_ptr() as usize;
    let (page, home) = gallocy::hostile::page_of(victim_page);
    let (other_page, other_home) = gallocy::hostile::page_of(victim_page + BYTES - 4096);
    if home != 0 || other_home != 1 {
        return Err(format!("homes {home}/{other_home}: run with GALLOCY_PLACEMENT=block"));
    }
    if rank == 1 {
        let nobody = Waiter { slot: 0, generation: 12345 };
        if what == "diff" {
            // One run: byte 0 of the page becomes 0.
            let diff = [0u8, 0, 1, 0, 0];
            gallocy::hostile::send_with_payload(0, &Msg::Diff { page }, &diff)?;
            std::thread::sleep(Duration::from_secs(30));
            return Err(format!("hostile {what}: rank 0 went on after the message"));
        }
        if what == "read" {
            gallocy::hostile::read(0, page)?;
            std::thread::sleep(Duration::from_secs(30));
            return Err(format!("hostile {what}: rank 0 went on after the read"));
        }
        let (msg, with_page) = match what.as_str() {
            "contents" => (Msg::Grant { page, waiter: nobody, write: true, source: Source::Inline }, true),
            "forward" => (Msg::Forward { page, requester: 1, waiter: nobody, write: true }, false),
            "revoke-ack" => (Msg::RevokeAck { page }, false),
            "stale-grant" => {
                (Msg::Grant { page: other_page, waiter: nobody, write: true, source: Source::Valid }, false)
            }
            "lock-release" => (Msg::LockRelease { id: 2 }, false),
            "barrier" => (Msg::BarrierNotice { epoch: 1000, round: 0 }, false),
            "free" => (Msg::Free { addr: 0x1234 }, false),
            "broadcast" => (Msg::Broadcast { seq: 99, total: 1 << 40, offset: 4096 }, false),
            "size-reply" => (Msg::SizeReply { waiter: nobody, size: 1 }, false),
            "written" => (Msg::Written { page, ack: true }, false),
            "revoke-past" => (Msg::Revoke { page: PAST_THE_HEAP, to_read: false }, false),
            "forward-past" => (Msg::Forward { page: PAST_THE_HEAP, requester: 1, waiter: nobody, write: true }, false),
            other => return Err(format!("unknown hostile message {other:?}")),
        };
        gallocy::hostile::send(0, &msg, with_page)?;
        // Rank 0 stops; we then lose it and stop too. Going on is a failure.
        std::thread::sleep(Duration::from_secs(30));
        return Err(format!("hostile {what}: rank 0 went on after the message"));
    }
    // Rank 0 watches its page until the message ends it.
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        // SAFETY: reading bytes of our own allocation; volatile so that each pass reads memory.
        let changed = mem[..4096].iter().any(|b| unsafe { std::ptr::read_volatile(b) } != PATTERN);
        if changed {
            eprintln!("CORRUPTED: rank 0's page changed under it");
            gallocy::exit_now(3);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!("hostile {what}: rank 0 went on; the message was not caught"))
}
