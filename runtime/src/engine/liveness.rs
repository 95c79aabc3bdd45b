//! Peers' liveness: heartbeats, silence, departures, and ending the process when a peer is lost
//! (after telling the other survivors which rank it was).

use std::time::Duration;

use gallocy_transport::TransportError;

use crate::job::runtime::{fatal_with, Runtime, EXIT_PEER_LOST};
use crate::protocol::{wire, Msg, Rank};

/// Interval between heartbeats.
const PING_NS: u64 = 1_000_000_000;

pub struct Liveness {
    me: Rank,
    last_heard: Vec<u64>,
    last_ping: u64,
    departed: Vec<bool>,
}

impl Liveness {
    pub fn new(me: Rank, size: usize, now: u64) -> Liveness {
        Liveness { me, last_heard: vec![now; size], last_ping: now, departed: vec![false; size] }
    }

    pub fn heard(&mut self, from: Rank, now: u64) {
        self.last_heard[from] = now;
    }

    /// `rank` left the job (said goodbye).
    pub fn departed(&mut self, rank: Rank) {
        self.departed[rank] = true;
    }

    pub fn all_departed(&self) -> bool {
        self.departed.iter().enumerate().all(|(r, d)| *d || r == self.me)
    }

    /// While leaving, a peer that closes without a goodbye after the final barrier is fine.
    pub fn all_departed_or(&mut self, e: &TransportError) -> bool {
        if let TransportError::PeerLost { rank, .. } = e {
            self.departed[*rank] = true;
        }
        self.all_departed()
    }

    fn live_peers(&self) -> impl Iterator<Item = Rank> + '_ {
        (0..self.departed.len()).filter(|r| *r != self.me && !self.departed[*r])
    }

    /// How long the service loop may block: until the next deferred revoke or heartbeat.
    pub fn sleep_budget(&self, now: u64, deferred: bool) -> Duration {
        if deferred {
            return Duration::from_millis(1);
        }
        let until = self.last_ping + PING_NS;
        Duration::from_nanos(until.saturating_sub(now).clamp(1_000_000, PING_NS))
    }

    /// Sends heartbeats when due; ends the process if a peer has been silent too long.
    pub fn keep_alive(&mut self, rt: &Runtime, now: u64) {
        let transport = rt.transport().expect("a job of several processes has a transport");
        if now.saturating_sub(self.last_ping) >= PING_NS {
            self.last_ping = now;
            let mut buf = [0u8; 16];
            let ping = wire::encode(&Msg::Ping, &[], &mut buf).expect("a ping always encodes");
            let mut failed = None;
            for r in self.live_peers() {
                if let Err(e) = transport.send(r, ping, None) {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                self.transport_failed(rt, &e);
            }
        }
        let limit = rt.settings().peer_timeout.as_nanos() as u64;
        let silent = self.live_peers().find(|r| now.saturating_sub(self.last_heard[*r]) > limit);
        if let Some(r) = silent {
            let why = format!("lost contact with rank {r}: no word from it for {:?}", rt.settings().peer_timeout);
            self.lost(rt, r, &why);
        }
    }

    /// A peer told us it lost `rank` and stops.
    pub fn told_lost(&self, rt: &Runtime, from: Rank, rank: u32) -> ! {
        let why = format!("lost contact with rank {rank} (rank {from} lost it and stopped)");
        fatal_with(rt, EXIT_PEER_LOST, &why)
    }

    /// Ends the process after a transport failure, telling the other survivors first which rank
    /// was lost (so that they name it, not us, when we disappear in turn).
    pub fn transport_failed(&self, rt: &Runtime, e: &TransportError) -> ! {
        let why = match e {
            TransportError::PeerLost { rank, reason } => format!("lost contact with rank {rank}: {reason}"),
            other => other.to_string(),
        };
        if let TransportError::PeerLost { rank, .. } = e {
            self.lost(rt, *rank, &why);
        }
        fatal_with(rt, EXIT_PEER_LOST, &why)
    }

    /// Tells every other live peer that `rank` is lost, then ends the process with `why`.
    fn lost(&self, rt: &Runtime, rank: Rank, why: &str) -> ! {
        if let Some(transport) = rt.transport() {
            let mut buf = [0u8; 32];
            if let Ok(bytes) = wire::encode(&Msg::Lost { rank: rank as u32 }, &[], &mut buf) {
                for r in self.live_peers().filter(|r| *r != rank) {
                    let _ = transport.send(r, bytes, None);
                }
            }
        }
        fatal_with(rt, EXIT_PEER_LOST, why)
    }
}
