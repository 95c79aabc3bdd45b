//! Collective calls' state shared between the application thread waiting in a barrier or a
//! broadcast and the service thread that receives the messages completing them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::protocol::barrier::Released;

/// Barrier epochs and broadcast sequence numbers of this rank, and what arrived for them.
#[derive(Default)]
pub struct Collectives {
    barrier_epoch: AtomicU64,
    broadcast_seq: AtomicU64,
    sync: SyncState,
}

impl Collectives {
    /// The epoch of this rank's next barrier.
    pub fn next_barrier_epoch(&self) -> u64 {
        self.barrier_epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The sequence number of this rank's next broadcast.
    pub fn next_broadcast_seq(&self) -> u64 {
        self.broadcast_seq.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn sync(&self) -> &SyncState {
        &self.sync
    }
}

/// State shared between application threads waiting in collective calls and the service thread.
#[derive(Default)]
pub struct SyncState {
    inner: Mutex<SyncInner>,
    cv: Condvar,
}

#[derive(Default)]
struct SyncInner {
    /// Barrier epochs that are over.
    released: Released,
    /// The barrier's coordinator left the job: barriers not released yet never will be.
    coordinator_left: bool,
    broadcasts: HashMap<u64, Incoming>,
}

/// The barrier's coordinator left the job before releasing a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordinatorLeft;

struct Incoming {
    data: Vec<u8>,
    received: u64,
}

impl SyncState {
    pub fn barrier_released(&self, epoch: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.released.insert(epoch);
        self.cv.notify_all();
    }

    /// The coordinator said goodbye (its releases came before, on the same link).
    pub fn coordinator_left(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).coordinator_left = true;
        self.cv.notify_all();
    }

    /// Waits until barrier `epoch` is released; `Err` if it never can be (the coordinator left).
    pub fn wait_barrier(&self, epoch: u64) -> Result<(), CoordinatorLeft> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while !g.released.contains(epoch) {
            if g.coordinator_left {
                return Err(CoordinatorLeft);
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    pub fn broadcast_chunk(&self, seq: u64, total: u64, offset: u64, data: &[u8]) -> Result<(), String> {
        if total > (1 << 40) || offset.checked_add(data.len() as u64).is_none_or(|e| e > total) {
            return Err(format!("chunk {offset}+{} outside a broadcast of {total} bytes", data.len()));
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inc = g.broadcasts.entry(seq).or_insert_with(|| Incoming { data: vec![0; total as usize], received: 0 });
        if inc.data.len() as u64 != total {
            return Err(format!("broadcast {seq} changed its length"));
        }
        inc.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        inc.received += data.len() as u64;
        self.cv.notify_all();
        Ok(())
    }

    /// Waits for broadcast `seq` to be complete and takes its bytes.
    pub fn take_broadcast(&self, seq: u64) -> Vec<u8> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(inc) = g.broadcasts.get(&seq) {
                if inc.received >= inc.data.len() as u64 {
                    return g.broadcasts.remove(&seq).expect("present").data;
                }
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_barrier_waits_for_its_own_epoch_even_when_a_later_one_ends_first() {
        let sync = Arc::new(SyncState::default());
        let done = Arc::new(AtomicBool::new(false));
        let (s2, d2) = (sync.clone(), done.clone());
        let waiter = std::thread::spawn(move || {
            s2.wait_barrier(1).unwrap();
            d2.store(true, Ordering::SeqCst);
        });
        sync.barrier_released(2);
        sync.wait_barrier(2).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "epoch 1 is not over because epoch 2 is");
        sync.barrier_released(1);
        waiter.join().unwrap();
        sync.wait_barrier(1).unwrap();
        sync.barrier_released(3);
        sync.wait_barrier(3).unwrap();
        sync.coordinator_left();
        sync.wait_barrier(3).unwrap();
        assert_eq!(sync.wait_barrier(4), Err(CoordinatorLeft), "epoch 4 can never be released");
    }
}
