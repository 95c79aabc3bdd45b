//! Authentication of every frame after the handshake.
//!
//! The handshake ([`crate::auth`]) gives both ends of a connection a session secret that only
//! holders of the job's token can compute (it covers both fresh nonces). From it each direction
//! gets its own key. Every frame then carries a 16-byte tag: BLAKE3 in keyed mode over the
//! frame's sequence number in that direction and its bytes. A frame that was changed, dropped,
//! replayed, reordered or injected by anyone without the session secret fails its tag, and the
//! receiver drops the connection (its peer is then lost, and the job ends with a clear error).
//!
//! Sealing and opening allocate nothing and take no lock: the fault path may run them.

/// Bytes of a frame's tag.
pub const TAG_LEN: usize = 16;

/// A frame's tag.
pub type Tag = [u8; TAG_LEN];

const KEY_LEN: usize = 32;

/// Key-derivation contexts: one per direction, so a frame can never be reflected back to its
/// sender.
const FROM_CONNECTOR: &str = "gallocy 2026-12 frame key, connector to acceptor";
const FROM_ACCEPTOR: &str = "gallocy 2026-12 frame key, acceptor to connector";
/// The same for a transport layered on the connection (RDMA's queue pairs).
const LAYERED_FROM_CONNECTOR: &str = "gallocy 2026-12 layered key, connector to acceptor";
const LAYERED_FROM_ACCEPTOR: &str = "gallocy 2026-12 layered key, acceptor to connector";

/// Which end of a connection we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We connected.
    Connector,
    /// We accepted.
    Acceptor,
}

/// Tags what one end sends: a key and the number of frames sealed so far.
pub struct Sealer {
    key: [u8; KEY_LEN],
    seq: u64,
}

/// Checks what one end receives: the peer's sending key and the number of frames opened so far.
pub struct Opener {
    key: [u8; KEY_LEN],
    seq: u64,
}

/// Both directions of one connection, and of a transport layered on it.
pub struct SessionKeys {
    /// For what we send.
    pub sealer: Sealer,
    /// For what we receive.
    pub opener: Opener,
    /// For what we send on a transport layered on this connection (its own sequence).
    pub layered_sealer: Sealer,
    /// For what we receive on it.
    pub layered_opener: Opener,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.write_str("SessionKeys { .. }")
    }
}

impl SessionKeys {
    /// The two directions' keys for `role`, from the handshake's session secret.
    pub fn derive(secret: &[u8], role: Role) -> SessionKeys {
        let pair = |from_connector: &str, from_acceptor: &str| {
            let connector = blake3::derive_key(from_connector, secret);
            let acceptor = blake3::derive_key(from_acceptor, secret);
            let (send, receive) = match role {
                Role::Connector => (connector, acceptor),
                Role::Acceptor => (acceptor, connector),
            };
            (Sealer { key: send, seq: 0 }, Opener { key: receive, seq: 0 })
        };
        let (sealer, opener) = pair(FROM_CONNECTOR, FROM_ACCEPTOR);
        let (layered_sealer, layered_opener) = pair(LAYERED_FROM_CONNECTOR, LAYERED_FROM_ACCEPTOR);
        SessionKeys { sealer, opener, layered_sealer, layered_opener }
    }
}

/// Most parts a frame is tagged in (header, message, page).
const MAX_PARTS: usize = 3;

/// The tag of frame `seq` made of `parts`: `BLAKE3_k(seq | BLAKE3_k(part 1) | ...)`, keyed BLAKE3
/// in one-shot form throughout. One-shot hashing keeps the stack small: this runs in the page-fault
/// handler, on whatever alternate signal stack the faulting thread has, and a streaming hasher
/// alone takes about 2 KiB.
fn tag(key: &[u8; KEY_LEN], seq: u64, parts: &[&[u8]]) -> Tag {
    let mut outer = [0u8; 8 + 32 * MAX_PARTS];
    outer[..8].copy_from_slice(&seq.to_le_bytes());
    let mut len = 8;
    for p in parts.iter().take(MAX_PARTS) {
        outer[len..len + 32].copy_from_slice(blake3::keyed_hash(key, p).as_bytes());
        len += 32;
    }
    // Frames have at most MAX_PARTS parts; any more are folded into the last digest, so the tag
    // still covers every byte (without allocating).
    for p in parts.iter().skip(MAX_PARTS) {
        let mut pair = [0u8; 64];
        pair[..32].copy_from_slice(&outer[len - 32..len]);
        pair[32..].copy_from_slice(blake3::keyed_hash(key, p).as_bytes());
        outer[len - 32..len].copy_from_slice(blake3::keyed_hash(key, &pair).as_bytes());
    }
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&blake3::keyed_hash(key, &outer[..len]).as_bytes()[..TAG_LEN]);
    t
}

impl Sealer {
    /// The tag of the next frame, whose bytes are `parts` in order. Frames must go on the wire in
    /// the order they were sealed.
    pub fn seal(&mut self, parts: &[&[u8]]) -> Tag {
        let t = tag(&self.key, self.seq, parts);
        self.seq += 1;
        t
    }
}

impl Opener {
    /// Whether `received` is the tag of the next frame from the peer, whose bytes are `parts`.
    /// The comparison takes the same time wherever the tags differ.
    pub fn open(&mut self, parts: &[&[u8]], received: &Tag) -> bool {
        let ok = self.check(parts, received);
        self.advance();
        ok
    }

    /// Whether `received` is the tag of the next frame, without moving on: for a receiver that
    /// may look at a frame again before it takes it ([`Opener::advance`] then).
    pub fn check(&self, parts: &[&[u8]], received: &Tag) -> bool {
        let expected = tag(&self.key, self.seq, parts);
        expected.iter().zip(received).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }

    /// Moves on to the next frame.
    pub fn advance(&mut self) {
        self.seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        (SessionKeys::derive(b"secret", Role::Connector), SessionKeys::derive(b"secret", Role::Acceptor))
    }

    #[test]
    fn what_one_end_seals_the_other_opens_in_order() {
        let (mut c, mut a) = pair();
        let t1 = c.sealer.seal(&[b"head", b"body"]);
        let t2 = c.sealer.seal(&[b"second"]);
        assert!(a.opener.open(&[b"head", b"body"], &t1));
        assert!(a.opener.open(&[b"second"], &t2));
        let back = a.sealer.seal(&[b"answer"]);
        assert!(c.opener.open(&[b"answer"], &back));
    }

    #[test]
    fn a_tag_covers_every_part_and_where_it_ends() {
        let k = [9u8; KEY_LEN];
        let t = tag(&k, 1, &[b"ab", b"c"]);
        assert_ne!(t, tag(&k, 1, &[b"a", b"bc"]), "the boundary between parts counts");
        assert_ne!(t, tag(&k, 2, &[b"ab", b"c"]), "the sequence number counts");
        assert_ne!(t, tag(&[8u8; KEY_LEN], 1, &[b"ab", b"c"]), "the key counts");
        let five: [&[u8]; 5] = [b"1", b"2", b"3", b"4", b"5"];
        let other: [&[u8]; 5] = [b"1", b"2", b"3", b"4", b"6"];
        assert_ne!(tag(&k, 0, &five), tag(&k, 0, &other), "parts beyond three count too");
        assert_eq!(tag(&k, 0, &five), tag(&k, 0, &five));
    }

    #[test]
    fn a_layered_transport_has_keys_of_its_own_and_may_look_twice() {
        let (mut c, mut a) = pair();
        let t = c.layered_sealer.seal(&[b"fragment"]);
        assert!(!a.opener.check(&[b"fragment"], &t), "not the connection's key");
        assert!(a.layered_opener.check(&[b"fragment"], &t));
        assert!(a.layered_opener.check(&[b"fragment"], &t), "checking does not move on");
        a.layered_opener.advance();
        assert!(!a.layered_opener.check(&[b"fragment"], &t), "taken: a replay fails");
    }

    #[test]
    fn a_changed_replayed_reflected_or_foreign_frame_fails() {
        let (mut c, mut a) = pair();
        let t = c.sealer.seal(&[b"frame"]);
        assert!(!a.opener.open(&[b"frame!"], &t), "changed bytes");
        let (mut c, mut a) = pair();
        let t = c.sealer.seal(&[b"frame"]);
        assert!(a.opener.open(&[b"frame"], &t));
        assert!(!a.opener.open(&[b"frame"], &t), "the same frame again");
        let (mut c, _) = pair();
        let t = c.sealer.seal(&[b"frame"]);
        assert!(!c.opener.open(&[b"frame"], &t), "our own frame sent back to us");
        let (mut c, _) = pair();
        let mut other = SessionKeys::derive(b"other session", Role::Acceptor);
        let t = c.sealer.seal(&[b"frame"]);
        assert!(!other.opener.open(&[b"frame"], &t), "another session's key");
        let (mut c, mut a) = pair();
        let mut t = c.sealer.seal(&[b"frame"]);
        t[TAG_LEN - 1] ^= 1;
        assert!(!a.opener.open(&[b"frame"], &t), "a flipped tag bit");
    }
}
