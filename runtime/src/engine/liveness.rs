//! Peers' liveness: heartbeats, silence, departures, and ending the process when a peer is lost
//! (after telling the other survivors which rank it was).
//!
//! A peer that dies closes its connections, which every rank linked to it sees at once.
//! Connections are made on first use, so not every rank is linked to every other; but every rank
//! is linked to rank 0, and a rank that stops because a peer was lost first tells every rank it
//! is linked to which rank it was (those do the same): the word reaches every survivor through
//! rank 0 within a few hops. Heartbeats are for the peer that stops without dying (`SIGSTOP`, a hung host): each rank watches only its two
//! neighbours on the ring of live ranks and sends heartbeats only to them, so the cost per
//! process does not grow with the job (two messages a second, not one per peer). A rank that
//! finds a neighbour silent tells every survivor which rank it lost.

use std::time::Duration;

use gallocy_transport::{Event, LostReason, TransportError};

use crate::job::runtime::{fatal_with, Runtime, EXIT_PEER_LOST};
use crate::protocol::{wire, Msg, Rank};

/// How long a process that lost a connection listens for a peer's word of which rank was lost.
const LAST_WORDS: Duration = Duration::from_millis(50);

/// Interval between heartbeats.
const PING_NS: u64 = 1_000_000_000;

pub struct Liveness {
    me: Rank,
    last_heard: Vec<u64>,
    last_ping: u64,
    departed: Vec<bool>,
    /// We have heard from this rank at least once (a rank still joining the job cannot speak yet).
    spoke: Vec<bool>,
    /// The neighbours watched now (successor, predecessor on the ring of live ranks).
    watched: [Option<Rank>; 2],
}

impl Liveness {
    pub fn new(me: Rank, size: usize, now: u64) -> Liveness {
        let mut l = Liveness {
            me,
            last_heard: vec![now; size],
            last_ping: now,
            departed: vec![false; size],
            spoke: vec![false; size],
            watched: [None; 2],
        };
        l.watched = l.neighbours();
        l
    }

    /// The next live rank after us and the last one before us on the ring (`None` when there is
    /// no other live rank; the same rank twice in a job of two).
    fn neighbours(&self) -> [Option<Rank>; 2] {
        let n = self.departed.len();
        let live = |r: &Rank| *r != self.me && !self.departed[*r];
        let next = (1..n).map(|d| (self.me + d) % n).find(live);
        let prev = (1..n).map(|d| (self.me + n - d) % n).find(live);
        [next, prev]
    }

    /// Recomputes the watched neighbours after a departure; a newly watched one gets a full
    /// timeout from now (it may have had no reason to speak to us before).
    fn rewatch(&mut self, now: u64) {
        let fresh = self.neighbours();
        for r in fresh.iter().flatten() {
            if !self.watched.contains(&Some(*r)) {
                self.last_heard[*r] = now;
            }
        }
        self.watched = fresh;
    }

    pub fn heard(&mut self, from: Rank, now: u64) {
        self.last_heard[from] = now;
        self.spoke[from] = true;
    }

    /// `rank` left the job (said goodbye).
    pub fn departed(&mut self, rank: Rank) {
        self.departed[rank] = true;
        self.rewatch(crate::sys::clock::now_ns());
    }

    /// Every peer we are linked to said goodbye (a peer we never talked to says none).
    pub fn all_departed(&self, rt: &Runtime) -> bool {
        let linked = |r: Rank| rt.transport().is_some_and(|t| t.linked(r));
        self.departed.iter().enumerate().all(|(r, d)| *d || r == self.me || !linked(r))
    }

    /// While leaving, a peer that closes without a goodbye after the final barrier is fine.
    pub fn all_departed_or(&mut self, rt: &Runtime, e: &TransportError) -> bool {
        if let TransportError::PeerLost { rank, .. } = e {
            self.departed[*rank] = true;
        }
        self.all_departed(rt)
    }

    /// The live peers we are linked to: those who hear from us directly.
    fn live_linked_peers<'a>(&'a self, rt: &'a Runtime) -> impl Iterator<Item = Rank> + 'a {
        let linked = move |r: &Rank| rt.transport().is_some_and(|t| t.linked(*r));
        (0..self.departed.len()).filter(move |r| *r != self.me && !self.departed[*r]).filter(linked)
    }

    /// How long the service loop may block: until the next deferred revoke or heartbeat.
    pub fn sleep_budget(&self, now: u64, deferred: bool) -> Duration {
        if deferred {
            return Duration::from_millis(1);
        }
        let until = self.last_ping + PING_NS;
        Duration::from_nanos(until.saturating_sub(now).clamp(1_000_000, PING_NS))
    }

    /// The ranks we send heartbeats to and watch: our two neighbours (once each).
    fn watched(&self) -> impl Iterator<Item = Rank> + '_ {
        let [next, prev] = self.watched;
        next.into_iter().chain(prev.filter(|p| Some(*p) != next))
    }

    /// The watched neighbours we ping and check for silence. Once peers leave (the job ends), a
    /// neighbour we were never connected to is left alone: it is leaving too, and a new
    /// connection to it would only be refused.
    fn heartbeat_peers<'a>(&'a self, linked: &'a dyn Fn(Rank) -> bool) -> impl Iterator<Item = Rank> + 'a {
        let ending = self.departed.iter().any(|d| *d);
        self.watched().filter(move |r| !ending || linked(*r))
    }

    /// Sends heartbeats to our neighbours when due; ends the process if a neighbour has been
    /// silent too long.
    pub fn keep_alive(&mut self, rt: &Runtime, now: u64) {
        let transport = rt.transport().expect("a job of several processes has a transport");
        if now.saturating_sub(self.last_ping) >= PING_NS {
            self.last_ping = now;
            let mut buf = [0u8; 16];
            let ping = wire::encode(&Msg::Ping, &[], &mut buf).expect("a ping always encodes");
            let mut failed = None;
            let mut left = Vec::new();
            let linked = |r: Rank| transport.linked(r);
            for r in self.heartbeat_peers(&linked) {
                match transport.send(r, ping, None) {
                    Ok(()) => {}
                    Err(TransportError::Left) => {}
                    // A neighbour we never talked to left the job: watch the next one.
                    Err(TransportError::PeerLeft { rank }) => left.push(rank),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                self.transport_failed(rt, &e);
            }
            for rank in left {
                self.departed(rank);
                rt.collectives().board().departed(rt.slots(), rank);
            }
        }
        let limit = rt.settings().peer_timeout.as_nanos() as u64;
        // A neighbour that never spoke may still be making its connections to the rest of the
        // job (a large job's last ranks take a while): it gets the start-up timeout on top.
        let joining = rt.settings().setup_timeout.as_nanos() as u64;
        let linked = |r: Rank| transport.linked(r);
        let silent = self.heartbeat_peers(&linked).find(|r| {
            let allowed = if self.spoke[*r] { limit } else { limit.saturating_add(joining) };
            now.saturating_sub(self.last_heard[*r]) > allowed
        });
        if let Some(r) = silent {
            let why = format!("lost contact with rank {r}: no word from it for {:?}", rt.settings().peer_timeout);
            self.lost(rt, r, &why);
        }
    }

    /// A peer told us it lost `rank` and stops: we pass the word on to the peers we are linked
    /// to (some may not be linked to the rank that told us), then stop too.
    pub fn told_lost(&self, rt: &Runtime, from: Rank, rank: u32) -> ! {
        let why = format!("lost contact with rank {rank} (rank {from} lost it and stopped)");
        self.tell_lost(rt, rank as Rank, Some(from));
        fatal_with(rt, EXIT_PEER_LOST, &why)
    }

    /// Ends the process after a transport failure, telling the other survivors first which rank
    /// was lost (so that they name it, not us, when we disappear in turn).
    pub fn transport_failed(&self, rt: &Runtime, e: &TransportError) -> ! {
        // A connection that closed may be a survivor leaving because another peer told it which
        // rank was lost: that word may be on its way to us too. Listen briefly for it, so that
        // every survivor names the same lost rank.
        if let TransportError::PeerLost { reason: LostReason::Closed | LostReason::Io(_), .. } = e {
            if let Some((from, rank)) = Self::word_of_a_loss(rt, LAST_WORDS) {
                self.told_lost(rt, from, rank);
            }
        }
        let why = match e {
            TransportError::PeerLost { rank, reason } => format!("lost contact with rank {rank}: {reason}"),
            other => other.to_string(),
        };
        if let TransportError::PeerLost { rank, .. } = e {
            self.lost(rt, *rank, &why);
        }
        fatal_with(rt, EXIT_PEER_LOST, &why)
    }

    /// Polls the transport for up to `wait` for a peer's message that a rank was lost: (sender,
    /// lost rank). Other failures meanwhile are ignored (peers are leaving).
    fn word_of_a_loss(rt: &Runtime, wait: Duration) -> Option<(Rank, u32)> {
        let transport = rt.transport()?;
        let until = std::time::Instant::now() + wait;
        let mut found = None;
        while found.is_none() && std::time::Instant::now() < until {
            let _ = transport.poll(Some(Duration::from_millis(5)), &mut |ev| {
                if let Event::Message { from, bytes, .. } = ev {
                    if let Ok((Msg::Lost { rank }, _)) = wire::decode(bytes) {
                        found.get_or_insert((from, rank));
                    }
                }
            });
        }
        found
    }

    /// Tells every other live peer we are linked to that `rank` is lost, then ends the process
    /// with `why`.
    fn lost(&self, rt: &Runtime, rank: Rank, why: &str) -> ! {
        self.tell_lost(rt, rank, None);
        fatal_with(rt, EXIT_PEER_LOST, why)
    }

    /// Tells the live peers we are linked to (but `rank` and `told_by`) that `rank` is lost.
    fn tell_lost(&self, rt: &Runtime, rank: Rank, told_by: Option<Rank>) {
        let Some(transport) = rt.transport() else { return };
        let mut buf = [0u8; 32];
        if let Ok(bytes) = wire::encode(&Msg::Lost { rank: rank as u32 }, &[], &mut buf) {
            for r in self.live_linked_peers(rt).filter(|r| *r != rank && Some(*r) != told_by) {
                let _ = transport.send(r, bytes, None);
            }
            // Our word must leave before we do (over RDMA, sends still queued die with us).
            transport.drain_sends(LAST_WORDS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_watches_its_two_live_neighbours_on_the_ring() {
        let l = Liveness::new(2, 5, 0);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![3, 1]);
        let l = Liveness::new(0, 5, 0);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![1, 4]);
        let l = Liveness::new(1, 2, 0);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![0], "a job of two: the other rank, once");
        let l = Liveness::new(0, 1, 0);
        assert_eq!(l.watched().count(), 0, "a job of one watches nobody");
        // 1024 ranks: still two.
        let l = Liveness::new(1023, 1024, 0);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![0, 1022]);
    }

    #[test]
    fn once_peers_leave_only_connected_neighbours_get_heartbeats() {
        let mut l = Liveness::new(2, 6, 0);
        let linked = |r: Rank| r == 1 || r == 3;
        assert_eq!(l.heartbeat_peers(&linked).collect::<Vec<_>>(), vec![3, 1]);
        let only_one = |r: Rank| r == 1;
        assert_eq!(
            l.heartbeat_peers(&only_one).collect::<Vec<_>>(),
            vec![3, 1],
            "while the job runs, new links are made"
        );
        l.departed[3] = true;
        l.rewatch(100);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![4, 1]);
        assert_eq!(
            l.heartbeat_peers(&linked).collect::<Vec<_>>(),
            vec![1],
            "rank 4, never connected, is leaving too: no new connection to it"
        );
    }

    #[test]
    fn a_departure_moves_the_watch_on_with_a_fresh_timeout() {
        let mut l = Liveness::new(2, 6, 0);
        l.last_heard = vec![5; 6];
        l.departed[3] = true;
        l.rewatch(100);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![4, 1]);
        assert_eq!(l.last_heard[4], 100, "the new neighbour gets a full timeout");
        assert_eq!(l.last_heard[1], 5, "the old one keeps its record");
        l.departed[4] = true;
        l.departed[5] = true;
        l.departed[0] = true;
        l.rewatch(200);
        assert_eq!(l.watched().collect::<Vec<_>>(), vec![1], "only rank 1 is left");
        l.departed[1] = true;
        l.rewatch(300);
        assert_eq!(l.watched().count(), 0);
    }
}
