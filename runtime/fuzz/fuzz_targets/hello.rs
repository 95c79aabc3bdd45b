//! Rank 0's reading of the peers' start-up reports (`Hello`, JSON; `judge` in
//! `runtime/src/job/bootstrap.rs`).
//!
//! Input: the peers' reports, separated by NUL bytes (which JSON text cannot hold), at most 8;
//! rank 0's own report (a real one) comes first, as in `coordinate`. Beyond "no panic": the job
//! may go on exactly when every report reads and agrees with rank 0's and none has a problem;
//! a report that does not read is named by its rank; what reads survives a re-encoding.

#![no_main]

use std::sync::OnceLock;

use gallocy::fuzzing::{judge, Hello};
use libfuzzer_sys::fuzz_target;

fn own() -> &'static (Hello, Vec<u8>) {
    static OWN: OnceLock<(Hello, Vec<u8>)> = OnceLock::new();
    OWN.get_or_init(|| {
        let h = Hello::new(None, None, None);
        let bytes = h.encode();
        (h, bytes)
    })
}

fuzz_target!(|data: &[u8]| {
    let (zero, zero_bytes) = own();
    let mut hellos = vec![zero_bytes.clone()];
    hellos.extend(data.split(|&b| b == 0).take(8).map(<[u8]>::to_vec));
    let verdict = judge(&hellos);

    // Every report is read before any is judged: the first that does not read stops the job.
    let mut read = Vec::new();
    for (rank, bytes) in hellos.iter().enumerate().skip(1) {
        match serde_json::from_slice::<Hello>(bytes) {
            Ok(h) => read.push((rank, h)),
            Err(_) => {
                let e = verdict.as_ref().expect_err("an unreadable report passed");
                let unreadable = format!("rank {rank} sent an unreadable report");
                assert!(e.starts_with(&unreadable), "{e}");
                return;
            }
        }
    }
    let mut all_agree = true;
    for (rank, h) in read {
        let again: Hello = serde_json::from_slice(&h.encode()).expect("re-encoded report reads");
        assert_eq!(again, h);
        let agrees = h.problem.is_none()
            && h.protocol == zero.protocol
            && h.heap_base == zero.heap_base
            && h.heap_size == zero.heap_size
            && h.page_size == zero.page_size
            && h.transport == zero.transport
            && h.consistency == zero.consistency
            && h.placement == zero.placement;
        if !agrees {
            let e = verdict.as_ref().expect_err("a disagreeing report passed");
            assert!(e.contains(&format!("rank {rank} ")), "{e}");
        }
        all_agree &= agrees;
    }
    assert_eq!(verdict.is_ok(), all_agree, "{verdict:?}");
});
