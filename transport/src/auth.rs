//! Connection handshake: both sides prove knowledge of the job's secret with HMAC-SHA256 over
//! fresh nonces, before either side reads or writes anything else.
//!
//! Acceptor sends `ServerHello = MAGIC | nonce_s` (20 bytes). Connector answers
//! `nonce_c | rank | HMAC(token, "c" | nonce_s | nonce_c | rank)`. The acceptor checks it and
//! answers `HMAC(token, "s" | nonce_c | nonce_s | rank)`, which the connector checks. A party that
//! fails closes the connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::TransportError;

const MAGIC: [u8; 4] = *b"GLC1";
const NONCE: usize = 16;
const MAC: usize = 32;
/// Bytes the acceptor sends before the connector has proven anything.
pub const SERVER_HELLO_LEN: usize = MAGIC.len() + NONCE;

type HmacSha256 = Hmac<Sha256>;

fn nonce() -> Result<[u8; NONCE], TransportError> {
    let mut n = [0u8; NONCE];
    getrandom::getrandom(&mut n).map_err(|e| TransportError::Auth(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

fn mac(token: &[u8], role: u8, a: &[u8], b: &[u8], rank: u32) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC accepts any key length");
    m.update(&[role]);
    m.update(a);
    m.update(b);
    m.update(&rank.to_le_bytes());
    m
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> TransportError + '_ {
    move |e| TransportError::Auth(format!("{what}: {e}"))
}

/// Acceptor side. Returns the connector's (authenticated) rank.
pub fn accept(stream: &mut TcpStream, token: &[u8], timeout: Duration) -> Result<u32, TransportError> {
    stream.set_read_timeout(Some(timeout)).map_err(io("set timeout"))?;
    stream.set_write_timeout(Some(timeout)).map_err(io("set timeout"))?;
    let nonce_s = nonce()?;
    let mut hello = [0u8; SERVER_HELLO_LEN];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4..].copy_from_slice(&nonce_s);
    stream.write_all(&hello).map_err(io("send hello"))?;
    let mut reply = [0u8; NONCE + 4 + MAC];
    stream.read_exact(&mut reply).map_err(io("read proof"))?;
    let nonce_c = &reply[..NONCE];
    let rank = u32::from_le_bytes(reply[NONCE..NONCE + 4].try_into().expect("4 bytes"));
    mac(token, b'c', &nonce_s, nonce_c, rank)
        .verify_slice(&reply[NONCE + 4..])
        .map_err(|_| TransportError::Auth("peer does not know the job token".into()))?;
    let answer = mac(token, b's', nonce_c, &nonce_s, rank).finalize().into_bytes();
    stream.write_all(&answer).map_err(io("send proof"))?;
    Ok(rank)
}

/// Connector side: proves `rank` and checks the acceptor knows the token too.
pub fn connect(stream: &mut TcpStream, token: &[u8], rank: u32, timeout: Duration) -> Result<(), TransportError> {
    stream.set_read_timeout(Some(timeout)).map_err(io("set timeout"))?;
    stream.set_write_timeout(Some(timeout)).map_err(io("set timeout"))?;
    let mut hello = [0u8; SERVER_HELLO_LEN];
    stream.read_exact(&mut hello).map_err(io("read hello"))?;
    if hello[..4] != MAGIC {
        return Err(TransportError::Auth("peer is not a gallocy process of this version".into()));
    }
    let nonce_s = &hello[4..];
    let nonce_c = nonce()?;
    let proof = mac(token, b'c', nonce_s, &nonce_c, rank).finalize().into_bytes();
    let mut msg = [0u8; NONCE + 4 + MAC];
    msg[..NONCE].copy_from_slice(&nonce_c);
    msg[NONCE..NONCE + 4].copy_from_slice(&rank.to_le_bytes());
    msg[NONCE + 4..].copy_from_slice(&proof);
    stream.write_all(&msg).map_err(io("send proof"))?;
    let mut answer = [0u8; MAC];
    stream
        .read_exact(&mut answer)
        .map_err(|_| TransportError::Auth("peer rejected our token (GALLOCY_TOKEN differs?)".into()))?;
    mac(token, b's', &nonce_c, nonce_s, rank)
        .verify_slice(&answer)
        .map_err(|_| TransportError::Auth("peer does not know the job token".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server_token: &'static [u8],
        client_token: &'static [u8],
    ) -> (Result<u32, TransportError>, Result<(), TransportError>) {
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
    fn same_token_authenticates_both_ways() {
        let (a, c) = pair(b"secret", b"secret");
        assert_eq!(a.unwrap(), 3);
        c.unwrap();
    }

    #[test]
    fn wrong_token_is_rejected_by_both() {
        let (a, c) = pair(b"secret", b"guess");
        assert!(a.is_err());
        assert!(c.is_err());
    }
}
