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

/// A broadcast being received: its announced length and the bytes so far. Memory grows with the
/// bytes that arrived, never with what a peer announces.
struct Incoming {
    total: u64,
    data: Vec<u8>,
}

impl SyncState {
    /// Adds a chunk of broadcast `seq` (announced as `total` bytes). Chunks come from the root in
    /// order, once each (one FIFO link): a chunk anywhere else, or a broadcast that changes its
    /// length, is an error.
    pub fn broadcast_chunk(&self, seq: u64, total: u64, offset: u64, data: &[u8]) -> Result<(), String> {
        if total > (1 << 40) || offset.checked_add(data.len() as u64).is_none_or(|e| e > total) {
            return Err(format!("chunk {offset}+{} outside a broadcast of {total} bytes", data.len()));
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inc = g.broadcasts.entry(seq).or_insert_with(|| Incoming { total, data: Vec::new() });
        if inc.total != total {
            return Err(format!("broadcast {seq} changed its length from {} to {total} bytes", inc.total));
        }
        if offset != inc.data.len() as u64 {
            return Err(format!(
                "broadcast {seq}: a chunk at offset {offset}, where the next one starts at {} (chunks come in order, once)",
                inc.data.len()
            ));
        }
        inc.data.extend_from_slice(data);
        self.cv.notify_all();
        Ok(())
    }

    /// Waits for broadcast `seq` to be complete and takes its bytes.
    pub fn take_broadcast(&self, seq: u64) -> Vec<u8> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(inc) = g.broadcasts.get(&seq) {
                if inc.data.len() as u64 == inc.total {
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

    #[test]
    fn a_broadcast_takes_memory_for_what_arrived_not_for_what_was_announced() {
        let s = SyncState::default();
        // A peer announces a terabyte and sends ten bytes: nothing near a terabyte is allocated.
        s.broadcast_chunk(1, 1 << 40, 0, &[7; 10]).unwrap();
        assert!(s.inner.lock().unwrap().broadcasts[&1].data.capacity() < 1 << 20);
        assert!(s.broadcast_chunk(1, 1 << 40, 0, &[7; 10]).is_err(), "the same chunk twice");
        assert!(s.broadcast_chunk(1, 1 << 40, 20, &[7; 10]).is_err(), "a gap");
        assert!(s.broadcast_chunk(1, 99, 10, &[7; 10]).is_err(), "another length");
        assert!(s.broadcast_chunk(2, 4, 2, &[1, 2, 3]).is_err(), "past the end");
        assert!(s.broadcast_chunk(2, (1 << 40) + 1, 0, &[]).is_err(), "over the limit");
        // A well-formed broadcast in two chunks.
        s.broadcast_chunk(3, 5, 0, &[1, 2]).unwrap();
        s.broadcast_chunk(3, 5, 2, &[3, 4, 5]).unwrap();
        assert_eq!(s.take_broadcast(3), vec![1, 2, 3, 4, 5]);
    }
}
