//! `gallocy_transport::frame::Header::decode`: the 32-byte header of every TCP frame, checked
//! against the size of the local heap view.
//!
//! Input: 32 header bytes, then (optionally) up to 8 little-endian bytes of the view's length
//! (default 1 GiB). Beyond "no panic": the decoder agrees with an independent statement of the
//! rules (known kind, zero reserved bytes, lengths within their limits, the span inside the
//! view without overflow, the kind's shape), and an accepted header is the one encoding of what
//! it decoded.

#![no_main]

use gallocy_transport::frame::{FrameError, Header, Kind, HEADER_LEN, MAX_SPAN};
use gallocy_transport::MAX_MESSAGE;
use libfuzzer_sys::fuzz_target;

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<HEADER_LEN>() else { return };
    let view_len = if rest.is_empty() {
        1usize << 30
    } else {
        let mut v = [0u8; 8];
        let n = rest.len().min(8);
        v[..n].copy_from_slice(&rest[..n]);
        u64::from_le_bytes(v) as usize
    };
    let got = Header::decode(head, view_len);

    // The rules, stated again from the layout: kind(1) reserved(3) msg_len(4) page_len(4)
    // reserved(4) offset(8) token(8).
    let kind = match head[0] {
        1 => Some(Kind::Message),
        2 => Some(Kind::ReadRequest),
        3 => Some(Kind::ReadReply),
        4 => Some(Kind::Goodbye),
        _ => None,
    };
    let msg_len = le32(&head[4..8]);
    let page_len = le32(&head[8..12]);
    let offset = u64::from_le_bytes(head[16..24].try_into().unwrap());
    let reserved_zero = head[1..4] == [0; 3] && head[12..16] == [0; 4];
    let inside = u128::from(offset) + u128::from(page_len) <= view_len as u128;
    let shape = match kind {
        Some(Kind::Message) => true,
        Some(Kind::ReadRequest | Kind::ReadReply) => msg_len == 0 && page_len > 0,
        Some(Kind::Goodbye) => msg_len == 0 && page_len == 0,
        None => false,
    };
    let valid =
        kind.is_some() && reserved_zero && msg_len as usize <= MAX_MESSAGE && page_len <= MAX_SPAN && inside && shape;

    match got {
        Ok(h) => {
            assert!(valid, "accepted a header the rules refuse: {h:?} (view {view_len})");
            assert_eq!(Some(h.kind), kind);
            assert_eq!(&h.encode(), head, "{h:?} has another encoding");
            assert_eq!(Header::decode(&h.encode(), view_len), Ok(h));
        }
        Err(e) => {
            assert!(!valid, "refused a valid header ({e}): {head:?} (view {view_len})");
            // The first rule broken is the one reported, in the decoder's order.
            let expected = if kind.is_none() {
                FrameError::UnknownKind(head[0])
            } else if !reserved_zero {
                FrameError::Reserved
            } else if msg_len as usize > MAX_MESSAGE {
                FrameError::MessageTooLong(msg_len)
            } else if page_len > MAX_SPAN {
                FrameError::SpanTooLong(page_len)
            } else if !inside {
                FrameError::OutsideHeap(offset, page_len)
            } else {
                FrameError::Malformed(kind.unwrap())
            };
            assert_eq!(e, expected);
        }
    }
});
