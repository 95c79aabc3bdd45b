//! A Rust program whose global allocator is gallocy's: after `init`, every `Box`, `Vec` and
//! `String` lives in the shared heap, so rank 0 can build a `Vec` and every rank can read it
//! through the pointer alone. Meanwhile all ranks churn through their own collections on several
//! threads, which also exercises the runtime's own allocations (service thread, messages), which
//! must keep using the system allocator. Prints "rank R: global-alloc ok" on success.

use std::collections::HashMap;

#[global_allocator]
static ALLOC: gallocy::GallocyAlloc = gallocy::GallocyAlloc;

fn main() {
    if let Err(e) = gallocy::init() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let rank = gallocy::rank();
    let heap = gallocy::heap_base()..gallocy::heap_base() + gallocy::heap_size();

    // Rank 0 builds a vector; everybody gets its pointer and length.
    let n = 100_000usize;
    let mut shared = [0u8; 16];
    let keep = (rank == 0).then(|| {
        let v: Vec<u64> = (1..=n as u64).collect();
        assert!(heap.contains(&(v.as_ptr() as usize)), "a Vec made after init must live in the shared heap");
        shared[..8].copy_from_slice(&(v.as_ptr() as u64).to_le_bytes());
        shared[8..].copy_from_slice(&(v.len() as u64).to_le_bytes());
        v
    });
    gallocy::broadcast(&mut shared, 0);
    let ptr = u64::from_le_bytes(shared[..8].try_into().expect("8 bytes")) as *const u64;
    let len = u64::from_le_bytes(shared[8..].try_into().expect("8 bytes")) as usize;
    // SAFETY: rank 0 keeps the vector alive until after the final barrier (finalize), and the
    // shared heap is mapped at the same address here.
    let sum: u64 = unsafe { std::slice::from_raw_parts(ptr, len) }.iter().sum();
    if sum != (n as u64) * (n as u64 + 1) / 2 {
        eprintln!("error: rank {rank}: global-alloc: sum of rank 0's Vec is {sum}");
        std::process::exit(1);
    }

    // Every rank, several threads: ordinary Rust collections, all in the shared heap.
    let totals: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|t| {
                s.spawn(move || {
                    let mut m: HashMap<String, Vec<u32>> = HashMap::new();
                    for i in 0..20_000u32 {
                        let key = format!("r{rank}t{t}k{}", i % 997);
                        m.entry(key).or_default().push(i);
                        if i % 5 == 0 {
                            m.remove(&format!("r{rank}t{t}k{}", (i * 7) % 997));
                        }
                    }
                    m.values().map(Vec::len).sum::<usize>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).collect()
    });
    let boxed = Box::new(format!("rank {rank} says hello"));
    assert!(heap.contains(&(boxed.as_ptr() as usize)), "a String made after init must live in the shared heap");

    gallocy::barrier();
    drop(keep);
    if let Err(e) = gallocy::finalize() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("rank {rank}: global-alloc ok (sum {sum}, {} entries kept by the workers)", totals.iter().sum::<usize>());
}
