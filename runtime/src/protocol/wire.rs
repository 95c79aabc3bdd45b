//! The encoding of [`Msg`]: one tag byte, then the variant's fields in a fixed little-endian
//! layout ([`zerocopy`] structs), then, for a broadcast or a diff only, its payload. Encoding and decoding
//! never allocate, so the fault path can use both.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::msg::{Msg, Source, Waiter};

/// Largest encoded message (a broadcast chunk and its header).
pub const LIMIT: usize = 128 * 1024;
/// Payload bytes of one broadcast message.
pub const BROADCAST_CHUNK: usize = 64 * 1024;
/// Most payload bytes of one diff (see [`super::diff::MAX_ENCODED`]).
pub const DIFF_LIMIT: usize = 64 * 1024;

/// First byte of every encoded [`Msg::Grant`]: lets a waiting thread skip other messages
/// without decoding them.
pub const GRANT_TAG: u8 = Tag::Grant as u8;
/// First byte of every encoded [`Msg::BarrierNotice`].
pub const BARRIER_NOTICE_TAG: u8 = Tag::BarrierNotice as u8;
/// First byte of every encoded [`Msg::LockGranted`].
pub const LOCK_GRANTED_TAG: u8 = Tag::LockGranted as u8;

/// Why bytes are not a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// an empty message
    #[error("an empty message")]
    Empty,
    /// unknown message type {0}
    #[error("unknown message type {0}")]
    UnknownTag(u8),
    /// a message of type {tag} has {len} bytes, not {expected}
    #[error("a message of type {tag} has {len} bytes, not {expected}")]
    Length { tag: u8, len: usize, expected: usize },
    /// a field holds an impossible value
    #[error("message type {tag}: field `{field}` holds an impossible value")]
    BadField { tag: u8, field: &'static str },
}

/// Why a message cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// the buffer of {have} bytes is too small for a message of {need}
    #[error("the buffer of {have} bytes is too small for a message of {need}")]
    BufferTooSmall { have: usize, need: usize },
    /// a payload goes only with a broadcast or a diff, and a diff always has one
    #[error(
        "only a broadcast (at most {BROADCAST_CHUNK} bytes) or a diff (1 to {DIFF_LIMIT} bytes) carries a payload"
    )]
    BadPayload,
}

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Request = 0,
    Forward = 1,
    Grant = 2,
    Done = 3,
    Revoke = 4,
    RevokeAck = 5,
    Free = 6,
    BarrierNotice = 7,
    LockAcquire = 8,
    LockGranted = 9,
    LockRelease = 10,
    Broadcast = 11,
    SizeQuery = 12,
    SizeReply = 13,
    Ping = 14,
    Lost = 15,
    LockRecall = 16,
    Written = 17,
    WrittenAck = 18,
    Diff = 19,
    Fence = 20,
    Fenced = 21,
    Share = 22,
}

/// Number of message types (tags `0..TAGS`).
pub const TAGS: u8 = 23;

impl Tag {
    fn of(b: u8) -> Option<Tag> {
        use Tag::*;
        const ALL: [Tag; TAGS as usize] = [
            Request,
            Forward,
            Grant,
            Done,
            Revoke,
            RevokeAck,
            Free,
            BarrierNotice,
            LockAcquire,
            LockGranted,
            LockRelease,
            Broadcast,
            SizeQuery,
            SizeReply,
            Ping,
            Lost,
            LockRecall,
            Written,
            WrittenAck,
            Diff,
            Fence,
            Fenced,
            Share,
        ];
        ALL.get(b as usize).copied()
    }
}

/// A waiter on the wire.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct WaiterW {
    slot: U32,
    generation: U32,
}

/// Page, waiter and flags: the body of requests, forwards and grants.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PageWaiter {
    page: U64,
    waiter: WaiterW,
    /// Bit 0: write.
    flags: u8,
    /// Forward: the requester. Grant: the source kind (low byte) ...
    a: U32,
    /// ... Grant with `ReadFrom`: the rank to read from.
    b: U32,
}

/// Page and one flag: done, revoke, revoke acknowledgement.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct PageFlag {
    page: U64,
    flag: u8,
}

/// A number and a waiter: locks, size queries and replies.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct NumWaiter {
    num: U64,
    waiter: WaiterW,
}

/// A barrier notice.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct BarrierW {
    epoch: U64,
    round: U32,
}

/// One number: frees, lock releases, lost ranks.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct Num {
    num: U64,
}

/// A broadcast chunk's header (its payload follows).
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct BroadcastW {
    seq: U64,
    total: U64,
    offset: U64,
}

const SRC_INLINE: u32 = 0;
const SRC_FORWARDED: u32 = 1;
const SRC_VALID: u32 = 2;
const SRC_READ_FROM: u32 = 3;
const SRC_HOST_COPY: u32 = 4;

fn waiter_w(w: Waiter) -> WaiterW {
    WaiterW { slot: w.slot.into(), generation: w.generation.into() }
}

fn waiter(w: WaiterW) -> Waiter {
    Waiter { slot: w.slot.get(), generation: w.generation.get() }
}

fn put<'a>(buf: &'a mut [u8], tag: Tag, body: &[u8], payload: &[u8]) -> Result<&'a [u8], EncodeError> {
    let need = 1 + body.len() + payload.len();
    if buf.len() < need {
        return Err(EncodeError::BufferTooSmall { have: buf.len(), need });
    }
    buf[0] = tag as u8;
    buf[1..1 + body.len()].copy_from_slice(body);
    buf[1 + body.len()..need].copy_from_slice(payload);
    Ok(&buf[..need])
}

/// Encodes `msg` (and a broadcast's or a diff's `payload`; empty for every other message) into `buf`,
/// returning the used prefix.
pub fn encode<'a>(msg: &Msg, payload: &[u8], buf: &'a mut [u8]) -> Result<&'a [u8], EncodeError> {
    let payload_limit = match msg {
        Msg::Broadcast { .. } => BROADCAST_CHUNK,
        Msg::Diff { .. } => DIFF_LIMIT,
        _ => 0,
    };
    // A diff without changes is never sent, and `decode` refuses one.
    let empty_diff = matches!(msg, Msg::Diff { .. }) && payload.is_empty();
    if payload.len() > payload_limit || empty_diff {
        return Err(EncodeError::BadPayload);
    }
    let pw = |page: u64, w: Waiter, write: bool, a: u32, b: u32| PageWaiter {
        page: page.into(),
        waiter: waiter_w(w),
        flags: u8::from(write),
        a: a.into(),
        b: b.into(),
    };
    let pf = |page: u64, flag: bool| PageFlag { page: page.into(), flag: u8::from(flag) };
    let nw = |num: u64, w: Waiter| NumWaiter { num: num.into(), waiter: waiter_w(w) };
    let n = |num: u64| Num { num: num.into() };
    match *msg {
        Msg::Request { page, write, waiter, direct } => {
            put(buf, Tag::Request, pw(page, waiter, write, u32::from(direct), 0).as_bytes(), &[])
        }
        Msg::Forward { page, requester, waiter, write } => {
            put(buf, Tag::Forward, pw(page, waiter, write, requester, 0).as_bytes(), &[])
        }
        Msg::Grant { page, waiter, write, source } => {
            let (a, b) = match source {
                Source::Inline => (SRC_INLINE, 0),
                Source::Forwarded => (SRC_FORWARDED, 0),
                Source::Valid => (SRC_VALID, 0),
                Source::ReadFrom(r) => (SRC_READ_FROM, r),
                Source::HostCopy => (SRC_HOST_COPY, 0),
            };
            put(buf, Tag::Grant, pw(page, waiter, write, a, b).as_bytes(), &[])
        }
        Msg::Done { page } => put(buf, Tag::Done, pf(page, false).as_bytes(), &[]),
        Msg::Revoke { page, to_read } => put(buf, Tag::Revoke, pf(page, to_read).as_bytes(), &[]),
        Msg::RevokeAck { page } => put(buf, Tag::RevokeAck, pf(page, false).as_bytes(), &[]),
        Msg::Free { addr } => put(buf, Tag::Free, n(addr).as_bytes(), &[]),
        Msg::BarrierNotice { epoch, round } => {
            put(buf, Tag::BarrierNotice, BarrierW { epoch: epoch.into(), round: round.into() }.as_bytes(), &[])
        }
        Msg::LockAcquire { id, waiter } => put(buf, Tag::LockAcquire, nw(id.into(), waiter).as_bytes(), &[]),
        Msg::LockGranted { id, waiter } => put(buf, Tag::LockGranted, nw(id.into(), waiter).as_bytes(), &[]),
        Msg::LockRelease { id } => put(buf, Tag::LockRelease, n(id.into()).as_bytes(), &[]),
        Msg::LockRecall { id } => put(buf, Tag::LockRecall, n(id.into()).as_bytes(), &[]),
        Msg::Broadcast { seq, total, offset } => {
            let h = BroadcastW { seq: seq.into(), total: total.into(), offset: offset.into() };
            put(buf, Tag::Broadcast, h.as_bytes(), payload)
        }
        Msg::SizeQuery { addr, waiter } => put(buf, Tag::SizeQuery, nw(addr, waiter).as_bytes(), &[]),
        Msg::SizeReply { waiter, size } => put(buf, Tag::SizeReply, nw(size, waiter).as_bytes(), &[]),
        Msg::Written { page, ack } => put(buf, Tag::Written, pf(page, ack).as_bytes(), &[]),
        Msg::WrittenAck { page } => put(buf, Tag::WrittenAck, pf(page, false).as_bytes(), &[]),
        Msg::Share { page } => put(buf, Tag::Share, pf(page, false).as_bytes(), &[]),
        Msg::Diff { page } => put(buf, Tag::Diff, n(page).as_bytes(), payload),
        Msg::Fence { waiter } => put(buf, Tag::Fence, nw(0, waiter).as_bytes(), &[]),
        Msg::Fenced { waiter } => put(buf, Tag::Fenced, nw(0, waiter).as_bytes(), &[]),
        Msg::Ping => put(buf, Tag::Ping, &[], &[]),
        Msg::Lost { rank } => put(buf, Tag::Lost, n(rank.into()).as_bytes(), &[]),
    }
}

/// Reads the fixed body of a `tag` message: exactly `size_of::<T>()` bytes unless `rest` is
/// allowed (a broadcast's or a diff's payload).
fn body<T: FromBytes + KnownLayout + Immutable + Unaligned + Copy>(
    tag: u8,
    bytes: &[u8],
    rest: bool,
) -> Result<(T, &[u8]), DecodeError> {
    let expected = std::mem::size_of::<T>();
    if bytes.len() < expected || (!rest && bytes.len() != expected) {
        return Err(DecodeError::Length { tag, len: bytes.len() + 1, expected: expected + 1 });
    }
    let (t, rest) = T::read_from_prefix(bytes).map_err(|_| DecodeError::Length {
        tag,
        len: bytes.len() + 1,
        expected: expected + 1,
    })?;
    Ok((t, rest))
}

fn flag(tag: u8, v: u8) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::BadField { tag, field: "flag" }),
    }
}

fn small(tag: u8, v: u64, field: &'static str) -> Result<u32, DecodeError> {
    u32::try_from(v).map_err(|_| DecodeError::BadField { tag, field })
}

/// Decodes one whole message, and a broadcast's or a diff's payload (empty for every other message).
pub fn decode(bytes: &[u8]) -> Result<(Msg, &[u8]), DecodeError> {
    let (&t, b) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let tag = Tag::of(t).ok_or(DecodeError::UnknownTag(t))?;
    let none: &[u8] = &[];
    let msg = match tag {
        Tag::Request | Tag::Forward | Tag::Grant => {
            let (m, _) = body::<PageWaiter>(t, b, false)?;
            let (page, waiter, write) = (m.page.get(), waiter(m.waiter), flag(t, m.flags)?);
            // Fields a message does not use must be zero: one message, one encoding.
            let unused =
                |v: U32| if v.get() == 0 { Ok(()) } else { Err(DecodeError::BadField { tag: t, field: "unused" }) };
            match tag {
                Tag::Request => {
                    unused(m.b)?;
                    let direct = match m.a.get() {
                        0 => false,
                        1 => true,
                        _ => return Err(DecodeError::BadField { tag: t, field: "direct" }),
                    };
                    Msg::Request { page, write, waiter, direct }
                }
                Tag::Forward => {
                    unused(m.b)?;
                    Msg::Forward { page, requester: m.a.get(), waiter, write }
                }
                _ => {
                    let source = match (m.a.get(), m.b.get()) {
                        (SRC_INLINE, 0) => Source::Inline,
                        (SRC_FORWARDED, 0) => Source::Forwarded,
                        (SRC_VALID, 0) => Source::Valid,
                        (SRC_READ_FROM, r) => Source::ReadFrom(r),
                        (SRC_HOST_COPY, 0) => Source::HostCopy,
                        _ => return Err(DecodeError::BadField { tag: t, field: "source" }),
                    };
                    Msg::Grant { page, waiter, write, source }
                }
            }
        }
        Tag::Done | Tag::Revoke | Tag::RevokeAck | Tag::Written | Tag::WrittenAck | Tag::Share => {
            let (m, _) = body::<PageFlag>(t, b, false)?;
            let (page, f) = (m.page.get(), flag(t, m.flag)?);
            match tag {
                Tag::Revoke => Msg::Revoke { page, to_read: f },
                Tag::Written => Msg::Written { page, ack: f },
                _ if f => return Err(DecodeError::BadField { tag: t, field: "flag" }),
                Tag::Done => Msg::Done { page },
                Tag::WrittenAck => Msg::WrittenAck { page },
                Tag::Share => Msg::Share { page },
                _ => Msg::RevokeAck { page },
            }
        }
        Tag::BarrierNotice => {
            let (m, _) = body::<BarrierW>(t, b, false)?;
            Msg::BarrierNotice { epoch: m.epoch.get(), round: m.round.get() }
        }
        Tag::Free | Tag::LockRelease | Tag::LockRecall | Tag::Lost => {
            let (m, _) = body::<Num>(t, b, false)?;
            let v = m.num.get();
            match tag {
                Tag::Free => Msg::Free { addr: v },
                Tag::LockRelease => Msg::LockRelease { id: small(t, v, "id")? },
                Tag::LockRecall => Msg::LockRecall { id: small(t, v, "id")? },
                _ => Msg::Lost { rank: small(t, v, "rank")? },
            }
        }
        Tag::LockAcquire | Tag::LockGranted | Tag::SizeQuery | Tag::SizeReply | Tag::Fence | Tag::Fenced => {
            let (m, _) = body::<NumWaiter>(t, b, false)?;
            let (v, waiter) = (m.num.get(), waiter(m.waiter));
            match tag {
                Tag::Fence | Tag::Fenced if v != 0 => return Err(DecodeError::BadField { tag: t, field: "unused" }),
                Tag::Fence => Msg::Fence { waiter },
                Tag::Fenced => Msg::Fenced { waiter },
                Tag::LockAcquire => Msg::LockAcquire { id: small(t, v, "id")?, waiter },
                Tag::LockGranted => Msg::LockGranted { id: small(t, v, "id")?, waiter },
                Tag::SizeQuery => Msg::SizeQuery { addr: v, waiter },
                _ => Msg::SizeReply { waiter, size: v },
            }
        }
        Tag::Diff => {
            let (m, payload) = body::<Num>(t, b, true)?;
            if payload.is_empty() || payload.len() > DIFF_LIMIT {
                return Err(DecodeError::Length { tag: t, len: bytes.len(), expected: 1 + 8 + DIFF_LIMIT });
            }
            return Ok((Msg::Diff { page: m.num.get() }, payload));
        }
        Tag::Broadcast => {
            let (m, payload) = body::<BroadcastW>(t, b, true)?;
            if payload.len() > BROADCAST_CHUNK {
                return Err(DecodeError::Length { tag: t, len: bytes.len(), expected: 1 + 24 + BROADCAST_CHUNK });
            }
            return Ok((Msg::Broadcast { seq: m.seq.get(), total: m.total.get(), offset: m.offset.get() }, payload));
        }
        Tag::Ping => {
            if !b.is_empty() {
                return Err(DecodeError::Length { tag: t, len: bytes.len(), expected: 1 });
            }
            Msg::Ping
        }
    };
    Ok((msg, none))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Msg> {
        let w = Waiter { slot: 511, generation: u32::MAX };
        vec![
            Msg::Request { page: 1 << 40, write: true, waiter: w, direct: true },
            Msg::Request { page: 3, write: false, waiter: w, direct: false },
            Msg::Forward { page: 3, requester: 2, waiter: w, write: false },
            Msg::Grant { page: 3, waiter: w, write: false, source: Source::Inline },
            Msg::Grant { page: 3, waiter: w, write: true, source: Source::Forwarded },
            Msg::Grant { page: 3, waiter: w, write: true, source: Source::Valid },
            Msg::Grant { page: 3, waiter: w, write: false, source: Source::ReadFrom(7) },
            Msg::Grant { page: 3, waiter: w, write: true, source: Source::HostCopy },
            Msg::Done { page: 9 },
            Msg::Revoke { page: 9, to_read: true },
            Msg::Revoke { page: 9, to_read: false },
            Msg::RevokeAck { page: u64::MAX },
            Msg::Free { addr: 0xdead_beef },
            Msg::BarrierNotice { epoch: 4, round: 9 },
            Msg::LockAcquire { id: 1, waiter: w },
            Msg::LockGranted { id: 1, waiter: w },
            Msg::LockRelease { id: u32::MAX },
            Msg::LockRecall { id: 12 },
            Msg::SizeQuery { addr: 64, waiter: w },
            Msg::SizeReply { waiter: w, size: 48 },
            Msg::Written { page: 4, ack: true },
            Msg::Written { page: 4, ack: false },
            Msg::WrittenAck { page: 4 },
            Msg::Share { page: 6 },
            Msg::Fence { waiter: w },
            Msg::Fenced { waiter: w },
            Msg::Ping,
            Msg::Lost { rank: 3 },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let mut buf = [0u8; 64];
        for m in every_message() {
            let b = encode(&m, &[], &mut buf).unwrap().to_vec();
            assert_eq!(decode(&b).unwrap(), (m, &[][..]), "{m:?}");
            // Every strict prefix and every extension is refused.
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(decode(&longer).is_err(), "{m:?} with a trailing byte");
        }
        let g = encode(
            &Msg::Grant { page: 1, waiter: Waiter { slot: 1, generation: 1 }, write: true, source: Source::Valid },
            &[],
            &mut buf,
        )
        .unwrap();
        assert_eq!(g[0], GRANT_TAG);
        let l = encode(&Msg::LockGranted { id: 1, waiter: Waiter { slot: 1, generation: 1 } }, &[], &mut buf).unwrap();
        assert_eq!(l[0], LOCK_GRANTED_TAG);
    }

    #[test]
    fn broadcasts_carry_their_payload() {
        let mut buf = vec![0u8; LIMIT];
        let m = Msg::Broadcast { seq: 2, total: 10, offset: 4 };
        let b = encode(&m, b"abcdef", &mut buf).unwrap().to_vec();
        assert_eq!(decode(&b).unwrap(), (m, &b"abcdef"[..]));
        assert_eq!(encode(&Msg::Ping, b"x", &mut buf), Err(EncodeError::BadPayload));
        let d = Msg::Diff { page: 7 };
        let b = encode(&d, b"\x00\x00\x01\x00z", &mut buf).unwrap().to_vec();
        assert_eq!(decode(&b).unwrap(), (d, &b"\x00\x00\x01\x00z"[..]));
        assert!(decode(&b[..9]).is_err(), "a diff without changes is refused");
        assert_eq!(encode(&d, &[], &mut buf), Err(EncodeError::BadPayload), "and never encoded");
        assert_eq!(encode(&d, &vec![0; DIFF_LIMIT + 1], &mut buf), Err(EncodeError::BadPayload));
        assert_eq!(encode(&m, &vec![0; BROADCAST_CHUNK + 1], &mut buf), Err(EncodeError::BadPayload));
        let mut small = [0u8; 8];
        assert!(matches!(encode(&m, b"abc", &mut small), Err(EncodeError::BufferTooSmall { .. })));
    }

    /// A bounded in-suite fuzz run: millions of random and mutated byte strings. The decoder
    /// never panics, and whatever it accepts is the one encoding of what it decoded.
    #[test]
    fn fuzz_the_decoder_with_millions_of_random_and_mutated_messages() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: Vec<Vec<u8>> = every_message()
            .iter()
            .map(|m| encode(m, &[], &mut [0u8; 64]).unwrap().to_vec())
            .chain(std::iter::once({
                let mut buf = vec![0u8; 128];
                encode(&Msg::Broadcast { seq: 1, total: 9, offset: 2 }, b"payload", &mut buf).unwrap().to_vec()
            }))
            .chain(std::iter::once({
                let mut buf = vec![0u8; 128];
                encode(&Msg::Diff { page: 3 }, b"\x10\x00\x02\x00ab", &mut buf).unwrap().to_vec()
            }))
            .collect();
        let mut accepted = 0u64;
        let mut reencoded = vec![0u8; LIMIT];
        let mut check = |bytes: &[u8]| {
            if let Ok((m, payload)) = decode(bytes) {
                accepted += 1;
                let again = encode(&m, payload, &mut reencoded).expect("what decodes, encodes");
                assert_eq!(again, bytes, "{m:?} has another encoding");
            }
        };
        let rounds = 1_000_000;
        for i in 0..rounds {
            // Random bytes, often with a valid tag in front.
            let len = (next() % 48) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 {
                if let Some(b) = bytes.first_mut() {
                    *b %= TAGS;
                }
            }
            check(&bytes);
            // A valid message with one to three bytes changed, or cut, or extended.
            let mut m = valid[(next() % valid.len() as u64) as usize].clone();
            match next() % 4 {
                0 => m.truncate((next() % m.len() as u64) as usize),
                1 => m.push(next() as u8),
                _ => {
                    for _ in 0..=(next() % 3) {
                        let at = (next() % m.len() as u64) as usize;
                        m[at] ^= 1 << (next() % 8);
                    }
                }
            }
            check(&m);
        }
        assert!(accepted > 0, "some mutations are valid messages");
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&[200]), Err(DecodeError::UnknownTag(200)));
        let mut buf = [0u8; 64];
        let b = encode(&Msg::Revoke { page: 1, to_read: true }, &[], &mut buf).unwrap().to_vec();
        let mut bad = b.clone();
        *bad.last_mut().unwrap() = 2;
        assert!(matches!(decode(&bad), Err(DecodeError::BadField { .. })));
        let mut ack = encode(&Msg::RevokeAck { page: 1 }, &[], &mut buf).unwrap().to_vec();
        *ack.last_mut().unwrap() = 1;
        assert!(decode(&ack).is_err());
        let mut req = encode(
            &Msg::Request { page: 1, write: false, waiter: Waiter { slot: 1, generation: 1 }, direct: false },
            &[],
            &mut buf,
        )
        .unwrap()
        .to_vec();
        *req.last_mut().unwrap() = 1;
        assert!(matches!(decode(&req), Err(DecodeError::BadField { field: "unused", .. })));
        let lock = encode(&Msg::LockRelease { id: 1 }, &[], &mut buf).unwrap().to_vec();
        let mut big_id = lock.clone();
        big_id[5] = 1;
        assert!(matches!(decode(&big_id), Err(DecodeError::BadField { field: "id", .. })));
        // A pseudo-random stream of byte strings never panics.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 48) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let _ = decode(&bytes);
            if let Some(first) = bytes.first() {
                let mut v = bytes.clone();
                v[0] = first % TAGS;
                let _ = decode(&v);
            }
        }
    }
}
