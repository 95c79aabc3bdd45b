//! Connection handshake: both sides prove knowledge of the job's secret with HMAC-SHA256 over
//! fresh nonces, before either side reads or writes anything else.
//!
//! Acceptor sends `ServerHello = MAGIC | nonce_s` (20 bytes). Connector answers
//! `nonce_c | rank | HMAC(token, "c" | nonce_s | nonce_c | rank)`. The acceptor checks it and
//! answers `HMAC(token, "s" | nonce_c | nonce_s | rank)`, which the connector checks. A party that
//! fails closes the connection.
//!
//! Both then hold the session secret `HMAC(token, "k" | nonce_s | nonce_c | rank)`, from which
//! [`SessionKeys`] authenticate every later frame of the connection ([`crate::seal`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::seal::{Role, SessionKeys};
use crate::TransportError;

const MAGIC: [u8; 4] = *b"GLC1";
const NONCE: usize = 16;
const MAC: usize = 32;

type Nonce = [u8; NONCE];

/// The acceptor's first message.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ServerHello {
    magic: [u8; 4],
    nonce_s: Nonce,
}

/// The connector's answer to [`ServerHello`].
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct ClientProof {
    nonce_c: Nonce,
    rank: U32,
    mac: [u8; MAC],
}

/// What a MAC covers: `role | first | second | rank`, the two nonces in the order the role
/// gives them.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct MacInput {
    role: u8,
    first: Nonce,
    second: Nonce,
    rank: U32,
}

/// Bytes the acceptor sends before the connector has proven anything.
pub const SERVER_HELLO_LEN: usize = MAGIC.len() + NONCE;

const _: () = assert!(std::mem::size_of::<ServerHello>() == SERVER_HELLO_LEN);
const _: () = assert!(std::mem::size_of::<ClientProof>() == NONCE + 4 + MAC);
const _: () = assert!(std::mem::size_of::<MacInput>() == 1 + 2 * NONCE + 4);

type HmacSha256 = Hmac<Sha256>;

fn nonce() -> Result<Nonce, TransportError> {
    let mut n = [0u8; NONCE];
    getrandom::getrandom(&mut n).map_err(|e| TransportError::Auth(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

/// The MAC of role `role` (`b'c'`: the connector's proof, `first` = the acceptor's nonce;
/// `b's'`: the acceptor's, `first` = the connector's nonce) for `rank`.
fn mac(token: &[u8], role: u8, first: &Nonce, second: &Nonce, rank: U32) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC accepts any key length");
    m.update(MacInput { role, first: *first, second: *second, rank }.as_bytes());
    m
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
    move |e| TransportError::Auth(format!("{what}: {e}"))
}

const NO_TOKEN: &str = "peer does not know the job token";
const NOT_GALLOCY: &str = "peer is not a gallocy process of this version";
const REJECTED: &str = "peer rejected our token (GALLOCY_TOKEN differs?)";

fn no_token() -> TransportError {
    TransportError::Auth(NO_TOKEN.into())
}

/// Whether an error of [`connect`] means the peer refused us (another token, not gallocy), as
/// opposed to a handshake that did not finish (which a new connection may complete).
pub fn is_refusal(e: &TransportError) -> bool {
    matches!(e, TransportError::Auth(m) if m == NO_TOKEN || m == NOT_GALLOCY || m == REJECTED)
}

/// The keys of a connection whose handshake had nonces `nonce_s` (acceptor) and `nonce_c`
/// (connector) and the connector's `rank`, for our `role`.
fn session(token: &[u8], nonce_s: &Nonce, nonce_c: &Nonce, rank: U32, role: Role) -> SessionKeys {
    let secret = mac(token, b'k', nonce_s, nonce_c, rank).finalize().into_bytes();
    SessionKeys::derive(&secret, role)
}

/// Bytes of the connector's answer to the acceptor's hello.
pub const CLIENT_PROOF_LEN: usize = std::mem::size_of::<ClientProof>();

/// Bytes of the acceptor's answer to a good proof.
pub const SERVER_PROOF_LEN: usize = MAC;

/// The acceptor's side of one handshake, for a caller that does its own I/O (one thread may
/// then serve many handshakes at once): send [`Acceptance::hello`], read
/// [`CLIENT_PROOF_LEN`] bytes, and give them to [`Acceptance::check`].
pub struct Acceptance {
    nonce_s: Nonce,
}

impl Acceptance {
    pub fn new() -> Result<Acceptance, TransportError> {
        Ok(Acceptance { nonce_s: nonce()? })
    }

    /// What the acceptor sends first.
    pub fn hello(&self) -> [u8; SERVER_HELLO_LEN] {
        let mut out = [0u8; SERVER_HELLO_LEN];
        out.copy_from_slice(ServerHello { magic: MAGIC, nonce_s: self.nonce_s }.as_bytes());
        out
    }

    /// Checks the connector's proof. Returns its (authenticated) rank, the answer to send it,
    /// and the connection's keys.
    pub fn check(
        &self,
        token: &[u8],
        proof: &[u8; CLIENT_PROOF_LEN],
    ) -> Result<(u32, [u8; SERVER_PROOF_LEN], SessionKeys), TransportError> {
        let proof = ClientProof::read_from_bytes(proof).map_err(|_| no_token())?;
        mac(token, b'c', &self.nonce_s, &proof.nonce_c, proof.rank).verify_slice(&proof.mac).map_err(|_| no_token())?;
        let answer = mac(token, b's', &proof.nonce_c, &self.nonce_s, proof.rank).finalize().into_bytes().into();
        let keys = session(token, &self.nonce_s, &proof.nonce_c, proof.rank, Role::Acceptor);
        Ok((proof.rank.get(), answer, keys))
    }
}

/// Acceptor side, blocking. Returns the connector's (authenticated) rank and the connection's
/// keys.
pub fn accept(stream: &mut TcpStream, token: &[u8], timeout: Duration) -> Result<(u32, SessionKeys), TransportError> {
    stream.set_read_timeout(Some(timeout)).map_err(io("set timeout"))?;
    stream.set_write_timeout(Some(timeout)).map_err(io("set timeout"))?;
    let acceptance = Acceptance::new()?;
    stream.write_all(&acceptance.hello()).map_err(io("send hello"))?;
    let mut proof = [0u8; CLIENT_PROOF_LEN];
    stream.read_exact(&mut proof).map_err(io("read proof"))?;
    let (rank, answer, keys) = acceptance.check(token, &proof)?;
    stream.write_all(&answer).map_err(io("send proof"))?;
    Ok((rank, keys))
}

/// Connector side: proves `rank` and checks the acceptor knows the token too. Returns the
/// connection's keys.
pub fn connect(
    stream: &mut TcpStream,
    token: &[u8],
    rank: u32,
    timeout: Duration,
) -> Result<SessionKeys, TransportError> {
    stream.set_read_timeout(Some(timeout)).map_err(io("set timeout"))?;
    stream.set_write_timeout(Some(timeout)).map_err(io("set timeout"))?;
    let mut hello = ServerHello::new_zeroed();
    stream.read_exact(hello.as_mut_bytes()).map_err(io("read hello"))?;
    if hello.magic != MAGIC {
        return Err(TransportError::Auth(NOT_GALLOCY.into()));
    }
    let nonce_c = nonce()?;
    let rank = U32::new(rank);
    let mut proof = ClientProof { nonce_c, rank, mac: [0; MAC] };
    proof.mac = mac(token, b'c', &hello.nonce_s, &nonce_c, rank).finalize().into_bytes().into();
    stream.write_all(proof.as_bytes()).map_err(io("send proof"))?;
    let mut answer = [0u8; MAC];
    stream.read_exact(&mut answer).map_err(|_| TransportError::Auth(REJECTED.into()))?;
    mac(token, b's', &nonce_c, &hello.nonce_s, rank).verify_slice(&answer).map_err(|_| no_token())?;
    Ok(session(token, &hello.nonce_s, &nonce_c, rank, Role::Connector))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server_token: &'static [u8],
        client_token: &'static [u8],
    ) -> (Result<(u32, SessionKeys), TransportError>, Result<SessionKeys, TransportError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            connect(&mut s, client_token, 3, Duration::from_secs(2))
        });
        let (mut s, _) = l.accept().unwrap();
        let r = accept(&mut s, server_token, Duration::from_secs(2));
        drop(s);
        (r, t.join().unwrap())
    }

    #[test]
    fn same_token_authenticates_both_ways_and_agrees_on_keys() {
        let (a, c) = pair(b"secret", b"secret");
        let (rank, mut a) = a.unwrap();
        assert_eq!(rank, 3);
        let mut c = c.unwrap();
        let t = c.sealer.seal(&[b"frame"]);
        assert!(a.opener.open(&[b"frame"], &t));
        let t = a.sealer.seal(&[b"reply"]);
        assert!(c.opener.open(&[b"reply"], &t));
        // Another connection of the same job has other keys (fresh nonces).
        let (other, _) = pair(b"secret", b"secret");
        let (_, mut other) = other.unwrap();
        let t = c.sealer.seal(&[b"frame"]);
        assert!(!other.opener.open(&[b"frame"], &t));
    }

    #[test]
    fn wrong_token_is_rejected_by_both() {
        let (a, c) = pair(b"secret", b"guess");
        assert!(a.is_err());
        assert!(c.is_err());
    }

    #[test]
    fn layouts_round_trip_and_refuse_short_input() {
        let hello = ServerHello { magic: MAGIC, nonce_s: [9; NONCE] };
        let bytes = hello.as_bytes();
        assert_eq!(bytes.len(), SERVER_HELLO_LEN);
        assert_eq!((&bytes[..4], &bytes[4..]), (&MAGIC[..], &[9; NONCE][..]));
        let back = ServerHello::read_from_bytes(bytes).unwrap();
        assert_eq!((back.magic, back.nonce_s), (MAGIC, [9; NONCE]));
        assert!(ServerHello::read_from_bytes(&bytes[..SERVER_HELLO_LEN - 1]).is_err());

        let proof = ClientProof { nonce_c: [1; NONCE], rank: U32::new(0x0102_0304), mac: [2; MAC] };
        let bytes = proof.as_bytes();
        assert_eq!(bytes.len(), NONCE + 4 + MAC);
        assert_eq!(&bytes[..NONCE], &[1; NONCE]);
        assert_eq!(&bytes[NONCE..NONCE + 4], &[4, 3, 2, 1]);
        assert_eq!(&bytes[NONCE + 4..], &[2; MAC]);
        let back = ClientProof::read_from_bytes(bytes).unwrap();
        assert_eq!((back.nonce_c, back.rank.get(), back.mac), ([1; NONCE], 0x0102_0304, [2; MAC]));
        assert!(ClientProof::read_from_bytes(&bytes[1..]).is_err());
        assert!(ClientProof::read_from_bytes(&[bytes, &[0]].concat()).is_err());
    }

    #[test]
    fn mac_covers_role_nonces_and_rank_in_order() {
        let (a, b) = ([1u8; NONCE], [2u8; NONCE]);
        let mut expected = HmacSha256::new_from_slice(b"secret").unwrap();
        expected.update(b"c");
        expected.update(&a);
        expected.update(&b);
        expected.update(&7u32.to_le_bytes());
        let expected = expected.finalize().into_bytes();
        assert_eq!(mac(b"secret", b'c', &a, &b, U32::new(7)).finalize().into_bytes(), expected);
        for other in [
            mac(b"secret", b's', &a, &b, U32::new(7)),
            mac(b"secret", b'c', &b, &a, U32::new(7)),
            mac(b"secret", b'c', &a, &b, U32::new(8)),
            mac(b"guess", b'c', &a, &b, U32::new(7)),
        ] {
            assert_ne!(other.finalize().into_bytes(), expected);
        }
    }

    /// Runs `accept` against a raw client that reads the hello, then writes `reply` and closes.
    fn accept_raw(reply: &'static [u8]) -> Result<(u32, SessionKeys), TransportError> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut hello = [0u8; SERVER_HELLO_LEN];
            s.read_exact(&mut hello).unwrap();
            s.write_all(reply).unwrap();
        });
        let (mut s, _) = l.accept().unwrap();
        let r = accept(&mut s, b"secret", Duration::from_secs(2));
        t.join().unwrap();
        r
    }

    /// Runs `connect` against a raw acceptor that writes `hello` and nothing more.
    fn connect_raw(hello: &'static [u8]) -> Result<SessionKeys, TransportError> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(hello).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            // Let the connector send its proof before the socket closes.
            let mut proof = [0u8; NONCE + 4 + MAC];
            let _ = s.read_exact(&mut proof);
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let r = connect(&mut s, b"secret", 3, Duration::from_secs(2));
        drop(s);
        t.join().unwrap();
        r
    }

    #[test]
    fn truncated_or_garbage_proof_is_refused() {
        let short = accept_raw(&[0xa5; NONCE + 4]).unwrap_err().to_string();
        assert!(short.contains("read proof"), "{short}");
        let garbage = accept_raw(&[0xa5; NONCE + 4 + MAC]).unwrap_err().to_string();
        assert!(garbage.contains("does not know the job token"), "{garbage}");
    }

    #[test]
    fn truncated_or_garbage_hello_is_refused() {
        let short = connect_raw(b"GLC1short").unwrap_err().to_string();
        assert!(short.contains("read hello"), "{short}");
        let garbage = connect_raw(&[0xa5; SERVER_HELLO_LEN]).unwrap_err().to_string();
        assert!(garbage.contains("not a gallocy process"), "{garbage}");
        // A well-formed hello from a party without the token: its answer never comes.
        let silent = connect_raw(b"GLC1abcdefghijklmnop").unwrap_err().to_string();
        assert!(silent.contains("rejected our token"), "{silent}");
    }
}
