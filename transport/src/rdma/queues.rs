//! The completion queues, sized for the queue pairs made rather than for the job: room for the
//! first buffers of a few peers at start, doubled (`ibv_resize_cq`, by the connector thread)
//! when a new queue pair would not fit, plus room for every peer that may become busy. A device
//! that cannot resize gets queues for every peer at start.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdma_mummy_sys::ibv_resize_cq;
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};

use super::buffers::{RECV_DEPTH, RECV_FIRST, SEND_DEPTH, SEND_FIRST};
use super::device::{Port, RdmaError};

/// Peers whose first buffers the queues have room for at start.
const FIRST_ROOM: usize = 4;

/// The send and receive completion queues, and the room they have.
pub(super) struct CompletionQueues {
    send: Arc<BasicCompletionQueue>,
    recv: Arc<BasicCompletionQueue>,
    /// Peers whose first buffers fit (at most `peers`).
    room: AtomicUsize,
    /// Queue pairs made so far (each may hold its first buffers' entries).
    made: Mutex<usize>,
    /// Every other rank of the job: the most queue pairs there can be.
    peers: usize,
    /// Peers that may become busy: their full sets always fit.
    busy: usize,
}

/// Send-queue entries for `room` peers' first buffers and `busy` peers' full sets.
fn send_entries(room: usize, busy: usize) -> usize {
    room * SEND_FIRST + busy * (SEND_DEPTH - SEND_FIRST)
}

/// Receive-queue entries for the same.
fn recv_entries(room: usize, busy: usize) -> usize {
    room * RECV_FIRST + busy * (RECV_DEPTH - RECV_FIRST)
}

/// The room to grow to when queue pair number `wanted` does not fit in `room`.
fn grown(room: usize, wanted: usize, peers: usize) -> usize {
    (room * 2).max(wanted).min(peers)
}

/// Resizes `cq` to at least `entries`; the verbs error code on failure.
fn resize(cq: &BasicCompletionQueue, entries: usize) -> Result<(), i32> {
    let entries = i32::try_from(entries).map_err(|_| libc::EINVAL)?;
    // SAFETY: the CQ is live; providers take the CQ's own lock against concurrent polling.
    match unsafe { ibv_resize_cq(cq.cq().as_ptr(), entries) } {
        0 => Ok(()),
        rc => Err(rc.abs()),
    }
}

impl CompletionQueues {
    /// Creates the queues for a job of `size` ranks, of which `busy` peers may become busy.
    pub(super) fn create(
        port: &Port,
        channel: &Arc<CompletionChannel>,
        size: usize,
        busy: usize,
    ) -> Result<CompletionQueues, RdmaError> {
        let peers = size.saturating_sub(1).max(1);
        let cq = |n: usize| {
            port.ctx
                .create_cq_builder()
                .setup_cqe(n as u32)
                .setup_comp_channel(channel, 0)
                .build()
                .map_err(|e| RdmaError::verbs("ibv_create_cq", std::io::Error::other(e.to_string())))
        };
        let room = FIRST_ROOM.min(peers);
        let (send, recv) = (cq(send_entries(room, busy))?, cq(recv_entries(room, busy))?);
        // A device whose queues cannot grow gets room for every peer now.
        let (send, recv, room) = if room == peers || resize(&send, send_entries(room, busy)).is_ok() {
            (send, recv, room)
        } else {
            drop((send, recv));
            (cq(send_entries(peers, busy))?, cq(recv_entries(peers, busy))?, peers)
        };
        Ok(CompletionQueues { send, recv, room: AtomicUsize::new(room), made: Mutex::new(0), peers, busy })
    }

    pub(super) fn send(&self) -> &Arc<BasicCompletionQueue> {
        &self.send
    }

    pub(super) fn recv(&self) -> &Arc<BasicCompletionQueue> {
        &self.recv
    }

    /// Sends and READs that can be in flight at once, all peers together.
    pub(super) fn send_capacity(&self) -> usize {
        send_entries(self.room.load(Ordering::Acquire), self.busy)
    }

    /// Peers whose first buffers the queues have room for now.
    pub(super) fn room(&self) -> usize {
        self.room.load(Ordering::Acquire)
    }

    /// Makes room for one more queue pair, growing the queues if it would not fit. Connector
    /// thread only (it may block in the kernel).
    pub(super) fn make_room_for_one_more(&self) -> Result<(), RdmaError> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.room.load(Ordering::Acquire);
        if *made + 1 > room {
            if room >= self.peers {
                return Err(RdmaError::verbs(
                    "making a queue pair",
                    std::io::Error::other("more queue pairs than peers"),
                ));
            }
            let to = grown(room, *made + 1, self.peers);
            let failed =
                |what: &'static str| move |rc: i32| RdmaError::verbs(what, std::io::Error::from_raw_os_error(rc));
            // Receives first: a receive queue entry is never posted without room for its
            // completion; sends are only posted once the queue pair is connected.
            resize(&self.recv, recv_entries(to, self.busy)).map_err(failed("ibv_resize_cq (receive)"))?;
            resize(&self.send, send_entries(to, self.busy)).map_err(failed("ibv_resize_cq (send)"))?;
            self.room.store(to, Ordering::Release);
        }
        *made += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_doubles_up_to_every_peer() {
        assert_eq!(grown(16, 17, 1023), 32);
        assert_eq!(grown(512, 513, 1023), 1023);
        assert_eq!(grown(1, 5, 1023), 5, "never less than wanted");
        assert_eq!(grown(16, 17, 20), 20);
        let mut room = FIRST_ROOM;
        let mut steps = 0;
        while room < 1023 {
            room = grown(room, room + 1, 1023);
            steps += 1;
        }
        assert_eq!(steps, 8, "4 → 1023 in eight resizes");
    }

    #[test]
    fn entries_cover_first_buffers_and_busy_peers() {
        assert_eq!(send_entries(16, 64), 16 * 8 + 64 * 120);
        assert_eq!(recv_entries(16, 64), 16 * 16 + 64 * 240);
        assert_eq!(recv_entries(0, 0), 0);
    }
}
