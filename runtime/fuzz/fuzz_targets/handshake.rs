//! The start-up handshake (`transport/src/auth.rs`) against a peer that sends arbitrary bytes.
//!
//! First input byte, bit 0: which side we play. 0: the acceptor (`accept`): the rest is the
//! connector's proof (`nonce_c | rank | HMAC`). 1: the connector (`connect`): the rest is the
//! acceptor's hello (`"GLC1" | nonce_s`) and its answer (an HMAC). The peer's bytes are written
//! on a socket whose write side is then closed, so a short message ends in EOF, not a timeout.
//!
//! Beyond "no panic": bytes that do not know the token never authenticate (the nonces are fresh
//! and random, so no input can), the error says why (short read, not gallocy, wrong token), and
//! what our side sent is well formed (the hello's magic; the proof's rank).

#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use gallocy_transport::fuzzing::{accept, connect, is_refusal, SERVER_HELLO_LEN};
use gallocy_transport::TransportError;
use libfuzzer_sys::fuzz_target;

const TOKEN: &[u8] = b"the job's secret";
const PROOF_LEN: usize = 16 + 4 + 32;
const ANSWER_LEN: usize = 32;
const RANK: u32 = 3;

/// What our side wrote. Shut down, not closed: closing a socket with unread input (the peer's
/// surplus bytes) would reset the connection and lose what we sent.
fn sent_by_us(ours: TcpStream, theirs: &mut UnixStream, side: &str) -> Vec<u8> {
    ours.shutdown(Shutdown::Write).expect("shutdown");
    let mut sent = Vec::new();
    theirs.read_to_end(&mut sent).unwrap_or_else(|e| panic!("read what the {side} sent: {e}"));
    sent
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, peer)) = data.split_first() else { return };
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    let mut ours = TcpStream::from(OwnedFd::from(ours));
    theirs.write_all(peer).expect("the socket buffer holds the input");
    theirs.shutdown(Shutdown::Write).expect("shutdown");
    let timeout = Duration::from_secs(5);
    let err = if mode & 1 == 0 {
        let r = accept(&mut ours, TOKEN, timeout);
        let sent = sent_by_us(ours, &mut theirs, "acceptor");
        assert_eq!(sent.len(), SERVER_HELLO_LEN, "the acceptor sent only its hello");
        assert_eq!(&sent[..4], b"GLC1");
        let Err(e) = r else { panic!("forged proof accepted: {peer:?}") };
        let TransportError::Auth(m) = &e else { panic!("{e}") };
        if peer.len() < PROOF_LEN {
            assert!(m.starts_with("read proof"), "{m}");
        } else {
            assert!(is_refusal(&e) && m.contains("does not know the job token"), "{m}");
        }
        e
    } else {
        let r = connect(&mut ours, TOKEN, RANK, timeout);
        let sent = sent_by_us(ours, &mut theirs, "connector");
        let Err(e) = r else { panic!("forged answer accepted: {peer:?}") };
        let TransportError::Auth(m) = &e else { panic!("{e}") };
        if peer.len() < SERVER_HELLO_LEN {
            assert!(m.starts_with("read hello") && sent.is_empty(), "{m}");
        } else if &peer[..4] != b"GLC1" {
            assert!(is_refusal(&e) && m.contains("not a gallocy process") && sent.is_empty(), "{m}");
        } else {
            assert_eq!(sent.len(), PROOF_LEN, "the connector sent its proof");
            assert_eq!(sent[16..20], RANK.to_le_bytes());
            if peer.len() < SERVER_HELLO_LEN + ANSWER_LEN {
                assert!(is_refusal(&e) && m.contains("rejected our token"), "{m}");
            } else {
                assert!(is_refusal(&e) && m.contains("does not know the job token"), "{m}");
            }
        }
        e
    };
    let _ = err.to_string();
});
