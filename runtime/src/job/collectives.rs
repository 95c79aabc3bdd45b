//! Collective calls' state shared between the application thread waiting in a barrier or a
//! broadcast and the threads that receive the messages completing them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::job::barrier::BarrierBoard;

/// Barrier epochs and broadcast sequence numbers of this rank, and what arrived for them.
pub struct Collectives {
    barrier_epoch: AtomicU64,
    broadcast_seq: AtomicU64,
    board: BarrierBoard,
    sync: SyncState,
}

impl Collectives {
    /// The collectives of rank `rank` of a job of `ranks`.
    pub fn new(rank: usize, ranks: usize) -> Collectives {
        Collectives {
            barrier_epoch: AtomicU64::new(0),
            broadcast_seq: AtomicU64::new(0),
            board: BarrierBoard::new(rank, ranks),
            sync: SyncState::default(),
        }
    }

    /// The barrier notices this rank heard.
    pub fn board(&self) -> &BarrierBoard {
        &self.board
    }

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

/// Broadcasts: state shared between application threads waiting for one and the service thread.
#[derive(Default)]
pub struct SyncState {
    inner: Mutex<SyncInner>,
    cv: Condvar,
}

#[derive(Default)]
struct SyncInner {
    broadcasts: HashMap<u64, Incoming>,
}

struct Incoming {
    data: Vec<u8>,
    received: u64,
}

impl SyncState {
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
