//! Per-process statistics: fault counts, invalidations, bytes moved, fault latency.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::heap::mappings::MappingStats;

/// Counters and the fault-latency histogram (nanoseconds).
pub struct Stats {
    pub read_faults: AtomicU64,
    pub write_faults: AtomicU64,
    /// Pages asked for by read misses beyond the faulting page (prefetch).
    pub prefetched: AtomicU64,
    /// Global locks taken without a message (this rank kept them since its last use).
    pub locks_local: AtomicU64,
    /// Of those, taken in the grace after the lock's home recalled it.
    pub locks_in_grace: AtomicU64,
    pub invalidations_sent: AtomicU64,
    pub invalidations_received: AtomicU64,
    /// Pages whose memory went back to the system (dropped copies).
    pub pages_released: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Release consistency: diffs sent to homes.
    pub diffs_sent: AtomicU64,
    /// Release consistency: copies of volatile pages dropped at an acquire.
    pub self_invalidations: AtomicU64,
    /// Pages copied straight out of another rank's memory by the rank that needed them: from
    /// the heap of a peer on the same host, or with a one-sided RDMA read.
    pub pages_read_directly: AtomicU64,
    /// Pages a holder sent back to this rank's read request: a grant named a rank whose memory
    /// this rank cannot read itself (TCP to another host), which answers with the page.
    pub pages_read_by_request: AtomicU64,
    /// Revokes and forwards the service thread held back until the thread their page was just
    /// installed for resumed.
    pub held_back: AtomicU64,
    /// Of those, let go only at the service thread's next timed look, although that thread
    /// had already resumed (it should have woken the service thread).
    pub held_past_resume: AtomicU64,
    latency_lock: AtomicBool,
    latency: std::cell::UnsafeCell<Histogram<u64>>,
}

// SAFETY: the histogram is only touched with `latency_lock` held.
unsafe impl Sync for Stats {}

/// A copy of the counters.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub read_faults: u64,
    pub write_faults: u64,
    /// Pages asked for by read misses beyond the faulting page (prefetch).
    pub prefetched: u64,
    /// Global locks taken without a message (this rank kept them since its last use).
    pub locks_local: u64,
    /// Of those, taken in the grace after the lock's home recalled it.
    pub locks_in_grace: u64,
    pub invalidations_sent: u64,
    pub invalidations_received: u64,
    /// Pages whose memory went back to the system (dropped copies).
    pub pages_released: u64,
    /// Page bytes received plus sent.
    pub bytes_moved: u64,
    /// Release consistency: diffs sent to homes.
    pub diffs_sent: u64,
    /// Release consistency: copies of volatile pages dropped at an acquire.
    pub self_invalidations: u64,
    /// Pages copied straight out of another rank's memory by the rank that needed them: from
    /// the heap of a peer on the same host, or with a one-sided RDMA read.
    pub pages_read_directly: u64,
    /// Pages a holder sent back to this rank's read request (see [`Stats`]).
    pub pages_read_by_request: u64,
    /// Revokes and forwards held back until the thread their page was just installed for
    /// resumed.
    pub held_back: u64,
    /// Of those, let go only at the service thread's next timed look, although that thread had
    /// already resumed.
    pub held_past_resume: u64,
    /// Times the heap's application view was closed to stay under `vm.max_map_count`.
    pub view_closes: u64,
    /// Held pages reopened by a fault after such a close (no message).
    pub pages_reopened: u64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            read_faults: AtomicU64::new(0),
            write_faults: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            locks_local: AtomicU64::new(0),
            locks_in_grace: AtomicU64::new(0),
            invalidations_sent: AtomicU64::new(0),
            invalidations_received: AtomicU64::new(0),
            pages_released: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            diffs_sent: AtomicU64::new(0),
            self_invalidations: AtomicU64::new(0),
            pages_read_directly: AtomicU64::new(0),
            pages_read_by_request: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            held_past_resume: AtomicU64::new(0),
            latency_lock: AtomicBool::new(false),
            latency: std::cell::UnsafeCell::new(
                Histogram::new_with_bounds(100, 600_000_000_000, 2).expect("valid histogram bounds"),
            ),
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn count(&self, c: &AtomicU64, n: u64) {
        add(c, n);
    }

    fn with_latency<R>(&self, f: impl FnOnce(&mut Histogram<u64>) -> R) -> R {
        while self.latency_lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        // SAFETY: we hold the lock.
        let r = f(unsafe { &mut *self.latency.get() });
        self.latency_lock.store(false, Ordering::Release);
        r
    }

    /// Records one fault's latency. Allocation-free (the histogram never resizes).
    pub fn record_fault(&self, ns: u64) {
        self.with_latency(|h| h.saturating_record(ns.max(100)));
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (p50, p99) = self.with_latency(|h| {
            if h.is_empty() {
                (0.0, 0.0)
            } else {
                (h.value_at_quantile(0.5) as f64 / 1e3, h.value_at_quantile(0.99) as f64 / 1e3)
            }
        });
        StatsSnapshot {
            read_faults: self.read_faults.load(Ordering::Relaxed),
            write_faults: self.write_faults.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            locks_local: self.locks_local.load(Ordering::Relaxed),
            locks_in_grace: self.locks_in_grace.load(Ordering::Relaxed),
            invalidations_sent: self.invalidations_sent.load(Ordering::Relaxed),
            invalidations_received: self.invalidations_received.load(Ordering::Relaxed),
            pages_released: self.pages_released.load(Ordering::Relaxed),
            bytes_moved: self.bytes_in.load(Ordering::Relaxed) + self.bytes_out.load(Ordering::Relaxed),
            diffs_sent: self.diffs_sent.load(Ordering::Relaxed),
            self_invalidations: self.self_invalidations.load(Ordering::Relaxed),
            pages_read_directly: self.pages_read_directly.load(Ordering::Relaxed),
            pages_read_by_request: self.pages_read_by_request.load(Ordering::Relaxed),
            held_back: self.held_back.load(Ordering::Relaxed),
            held_past_resume: self.held_past_resume.load(Ordering::Relaxed),
            view_closes: 0,
            pages_reopened: 0,
            fault_p50_us: p50,
            fault_p99_us: p99,
        }
    }

    /// The counters, with those of the application view's mappings.
    pub fn snapshot_with(&self, mappings: MappingStats) -> StatsSnapshot {
        StatsSnapshot { view_closes: mappings.closes, pages_reopened: mappings.reopened, ..self.snapshot() }
    }

    /// The report printed by `GALLOCY_STATS=1` at exit.
    pub fn report(&self, rank: usize, mappings: MappingStats) -> String {
        let s = self.snapshot_with(mappings);
        let (n, p90, max) =
            self.with_latency(|h| (h.len(), h.value_at_quantile(0.9) as f64 / 1e3, h.max() as f64 / 1e3));
        format!(
            "gallocy stats rank {rank}: read faults {} | write faults {} | prefetched pages {} | local lock acquires {} (in a grace {}) | invalidations sent {} received {} | \
             pages released {} | diffs sent {} | copies dropped at acquire {} | pages read directly {} | pages read by request {} | held back {} (past a resume {}) | view closes {} | pages reopened {} | bytes moved {} (in {}, out {}) | fault latency us: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} (n={n})",
            s.read_faults,
            s.write_faults,
            s.prefetched,
            s.locks_local,
            s.locks_in_grace,
            s.invalidations_sent,
            s.invalidations_received,
            s.pages_released,
            s.diffs_sent,
            s.self_invalidations,
            s.pages_read_directly,
            s.pages_read_by_request,
            s.held_back,
            s.held_past_resume,
            s.view_closes,
            s.pages_reopened,
            s.bytes_moved,
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
            s.fault_p50_us,
            p90,
            s.fault_p99_us,
            if n == 0 { 0.0 } else { max },
        )
    }
}
