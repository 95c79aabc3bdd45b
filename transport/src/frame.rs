//! Wire frames on a TCP connection: a fixed 32-byte little-endian header ([`WireHeader`]), then
//! `msg_len` bytes of control message (produced by the engine), then `page_len` bytes of page
//! contents (messages and read replies only), then the frame's 16-byte tag ([`crate::seal`]).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::MAX_MESSAGE;

/// The header's layout on the wire.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct WireHeader {
    kind: u8,
    reserved1: [u8; 3],
    msg_len: U32,
    page_len: U32,
    reserved2: [u8; 4],
    offset: U64,
    token: U64,
}

const _: () = assert!(std::mem::size_of::<WireHeader>() == HEADER_LEN);

/// Size of a frame header.
pub const HEADER_LEN: usize = 32;
/// Largest span one frame may carry.
pub const MAX_SPAN: u32 = 1 << 20;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A control message, maybe with a page.
    Message = 1,
    /// "Send me `page_len` bytes at `offset` of your runtime view" (no payload).
    ReadRequest = 2,
    /// The answer to a read request: `page_len` bytes for `offset`.
    ReadReply = 3,
    /// The sender leaves the job; no more frames follow.
    Goodbye = 4,
}

/// What is wrong with a received header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved bytes are not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// The message is longer than allowed.
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE}")]
    MessageTooLong(u32),
    /// The span is longer than allowed.
    #[error("span of {0} bytes exceeds the limit of {MAX_SPAN}")]
    SpanTooLong(u32),
    /// The span lies outside the heap.
    #[error("span {0:#x}+{1} lies outside the heap")]
    OutsideHeap(u64, u32),
    /// Fields that do not fit the kind.
    #[error("malformed {0:?} frame")]
    Malformed(Kind),
    /// The frame's tag is wrong: changed, replayed or injected on the way, or from a party without
    /// the session's keys.
    #[error("a frame failed authentication (changed, replayed or injected on the way)")]
    BadTag,
    /// Page contents this process did not ask for.
    #[error("page contents for {0:#x}+{1} that this process did not ask for")]
    NotOwed(u64, u32),
    /// A read of this process's memory that the protocol does not owe the peer.
    #[error("a read of {0:#x}+{1} that this process does not owe that rank")]
    ReadNotOwed(u64, u32),
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// Control message bytes that follow.
    pub msg_len: u32,
    /// Page bytes that follow (or are requested).
    pub page_len: u32,
    /// Heap offset of the page bytes.
    pub offset: u64,
    /// The reader's token of a read request and its reply.
    pub token: u64,
}

impl Header {
    /// The wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let w = WireHeader {
            kind: self.kind as u8,
            reserved1: [0; 3],
            msg_len: self.msg_len.into(),
            page_len: self.page_len.into(),
            reserved2: [0; 4],
            offset: self.offset.into(),
            token: self.token.into(),
        };
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(w.as_bytes());
        b
    }

    /// Decodes and checks a header against the size of the local heap view.
    pub fn decode(b: &[u8; HEADER_LEN], view_len: usize) -> Result<Header, FrameError> {
        let w = WireHeader::read_from_bytes(b).map_err(|_| FrameError::Reserved)?;
        let kind = match w.kind {
            1 => Kind::Message,
            2 => Kind::ReadRequest,
            3 => Kind::ReadReply,
            4 => Kind::Goodbye,
            k => return Err(FrameError::UnknownKind(k)),
        };
        if w.reserved1 != [0; 3] || w.reserved2 != [0; 4] {
            return Err(FrameError::Reserved);
        }
        let h = Header {
            kind,
            msg_len: w.msg_len.get(),
            page_len: w.page_len.get(),
            offset: w.offset.get(),
            token: w.token.get(),
        };
        if h.msg_len as usize > MAX_MESSAGE {
            return Err(FrameError::MessageTooLong(h.msg_len));
        }
        if h.page_len > MAX_SPAN {
            return Err(FrameError::SpanTooLong(h.page_len));
        }
        if h.offset.checked_add(u64::from(h.page_len)).is_none_or(|end| end > view_len as u64) {
            return Err(FrameError::OutsideHeap(h.offset, h.page_len));
        }
        let shape_ok = match kind {
            Kind::Message => true,
            Kind::ReadRequest => h.msg_len == 0 && h.page_len > 0,
            Kind::ReadReply => h.msg_len == 0 && h.page_len > 0,
            Kind::Goodbye => h.msg_len == 0 && h.page_len == 0,
        };
        if !shape_ok {
            return Err(FrameError::Malformed(kind));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header { kind: Kind::Message, msg_len: 12, page_len: 4096, offset: 8192, token: 7 };
        assert_eq!(Header::decode(&h.encode(), 1 << 20).unwrap(), h);
    }

    /// A bounded in-suite fuzz run: a million random and mutated headers. Decoding never panics,
    /// and an accepted header is the one encoding of what it decoded, inside the heap.
    #[test]
    fn fuzz_the_header() {
        let mut x = 0xd1b5_4a32_d192_ed03u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let view = 1usize << 30;
        let good = Header { kind: Kind::Message, msg_len: 12, page_len: 4096, offset: 8192, token: 7 }.encode();
        let mut accepted = 0;
        for i in 0..1_000_000u32 {
            let mut b = [0u8; HEADER_LEN];
            if i % 2 == 0 {
                b.iter_mut().for_each(|v| *v = next() as u8);
                b[0] %= 6;
            } else {
                b = good;
                for _ in 0..=(next() % 3) {
                    b[(next() % HEADER_LEN as u64) as usize] ^= 1 << (next() % 8);
                }
            }
            if let Ok(h) = Header::decode(&b, view) {
                accepted += 1;
                assert_eq!(h.encode(), b);
                assert!(h.offset + u64::from(h.page_len) <= view as u64 && h.msg_len as usize <= MAX_MESSAGE);
            }
        }
        assert!(accepted > 0);
    }

    #[test]
    fn rejects_bad_frames() {
        let good = Header { kind: Kind::ReadRequest, msg_len: 0, page_len: 4096, offset: 0, token: 1 };
        let mut b = good.encode();
        b[0] = 9;
        assert!(Header::decode(&b, 1 << 20).unwrap_err().to_string().contains("unknown frame kind"));
        let out = Header { offset: 1 << 20, ..good };
        assert!(Header::decode(&out.encode(), 1 << 20).unwrap_err().to_string().contains("outside the heap"));
        let wrap = Header { offset: u64::MAX - 10, ..good };
        assert!(Header::decode(&wrap.encode(), 1 << 20).is_err());
        let big = Header { kind: Kind::Message, msg_len: u32::MAX, ..good };
        assert!(Header::decode(&big.encode(), 1 << 20).unwrap_err().to_string().contains("exceeds"));
        let mut pad = good.encode();
        pad[2] = 1;
        assert!(Header::decode(&pad, 1 << 20).is_err());
        let shape = Header { kind: Kind::Goodbye, ..good };
        assert!(Header::decode(&shape.encode(), 1 << 20).unwrap_err().to_string().contains("malformed"));
    }
}
