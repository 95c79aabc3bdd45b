//! The coordinator's port: rank 0 listening on it, and a launcher holding it for a job from before
//! the job's ranks start.
//!
//! A launcher on rank 0's host picks a free port, hands it to every rank, and starts them; rank 0
//! listens there when it joins, which is later. A port that was merely free when the launcher
//! looked can be taken in between by any socket of the host: the local port of an outgoing
//! connection and the port of a listener bound to port 0 both come from the same ephemeral range,
//! and on a busy host one of them sooner or later lands on it (rank 0 then fails with "Address
//! already in use").
//!
//! [`PortHold`] closes that gap. It is a socket bound to the port with `SO_REUSEPORT` that never
//! listens, kept by the launcher for the life of the job. While it is bound, the kernel gives the
//! port to no automatic choice (neither `connect` nor a bind to port 0 picks a bound port), and a
//! socket that asks for it explicitly without `SO_REUSEPORT` is refused. Rank 0, told that the
//! port is held ([`listen`] with `held`), binds it with `SO_REUSEPORT` as well (the kernel allows
//! that to sockets of the same user) and is the only one that listens, so every connection to the
//! port reaches rank 0.
//!
//! Without a hold rank 0 binds without `SO_REUSEPORT`: a second job given the same address then
//! fails at once instead of sharing the port.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections a start-up listener queues before it accepts them (the kernel caps it at
/// `net.core.somaxconn`). Every other rank connects to rank 0 at once, and any peer may dial a rank
/// on first use: a short queue drops their SYNs, and each drop costs a retransmission (1 s and
/// more).
const BACKLOG: i32 = 4096;

/// A loopback port held for one job's coordinator until this is dropped (see the module docs).
#[derive(Debug)]
pub struct PortHold {
    /// Bound, never listening; closed on drop.
    _socket: Socket,
    addr: SocketAddr,
}

impl PortHold {
    /// Holds a port on 127.0.0.1 that the kernel picks among the free ones.
    pub fn loopback() -> io::Result<PortHold> {
        PortHold::at(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Holds `addr` (port 0: one the kernel picks).
    pub fn at(addr: SocketAddr) -> io::Result<PortHold> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
        // Not SO_REUSEADDR: with it, any other socket that sets it (as every std listener does)
        // could bind the port while this one is not listening.
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a TCP socket without an IP address"))?;
        Ok(PortHold { _socket: socket, addr })
    }

    /// The address held: what rank 0 listens on (`GALLOCY_COORDINATOR`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port held.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A listener on `addr` (rank 0's for start-up, every other rank's for connections on first use);
/// `held`: the port is held for this job by a [`PortHold`] (the launcher's), which this
/// listener joins.
pub fn listen(addr: SocketAddr, held: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    // As std's listeners do: a restarted job may bind while old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if held {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn a_held_port_is_refused_to_others_and_given_to_rank_0() {
        let hold = PortHold::loopback().unwrap();
        assert_ne!(hold.port(), 0);
        assert!(hold.addr().ip().is_loopback());
        // Nobody listens yet: nothing connects.
        assert!(TcpStream::connect(hold.addr()).is_err(), "a held port must not accept connections");
        // A listener that does not join the hold (a second job, any other program) is refused.
        let e = listen(hold.addr(), false).expect_err("a plain bind of a held port must fail");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        // Rank 0 joins it and gets every connection.
        let rank0 = listen(hold.addr(), true).expect("rank 0 binds the held port");
        for i in 0..20u8 {
            let mut c = TcpStream::connect(hold.addr()).unwrap();
            c.write_all(&[i]).unwrap();
            let (mut s, _) = rank0.accept().unwrap();
            let mut b = [0u8];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
        }
        drop(rank0);
        // Still held after rank 0 is gone (the launcher drops it when the job ends).
        assert_eq!(listen(hold.addr(), false).expect_err("still held").kind(), io::ErrorKind::AddrInUse);
        let addr = hold.addr();
        drop(hold);
        drop(listen(addr, false).expect("free again once the hold is dropped"));
    }

    #[test]
    fn no_automatic_port_choice_takes_a_held_port() {
        let holds: Vec<PortHold> = (0..64).map(|_| PortHold::loopback().unwrap()).collect();
        let held: std::collections::HashSet<u16> = holds.iter().map(PortHold::port).collect();
        assert_eq!(held.len(), holds.len(), "every hold has a port of its own");
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut keep = Vec::new();
        for _ in 0..256 {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            assert!(!held.contains(&l.local_addr().unwrap().port()), "bind to port 0 chose a held port");
            let c = TcpStream::connect(server.local_addr().unwrap()).unwrap();
            assert!(!held.contains(&c.local_addr().unwrap().port()), "connect chose a held port");
            let (s, _) = server.accept().unwrap();
            keep.push((l, c, s));
        }
    }
}
