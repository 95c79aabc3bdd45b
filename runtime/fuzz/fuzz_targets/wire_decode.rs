//! `gallocy::protocol::wire::decode` on arbitrary bytes (one message as a peer sends it).
//!
//! Beyond "no panic": whatever decodes is the one encoding of what it decoded (`wire::encode`
//! of the message and its payload gives back exactly the input, and needs every byte of it),
//! only a broadcast (at most `BROADCAST_CHUNK` bytes) or a diff (1 to `DIFF_LIMIT` bytes) carries
//! a payload, and nothing accepted exceeds `wire::LIMIT`.

#![no_main]

use gallocy::protocol::msg::Msg;
use gallocy::protocol::wire::{
    decode, encode, EncodeError, BARRIER_NOTICE_TAG, BROADCAST_CHUNK, DIFF_LIMIT, GRANT_TAG, LIMIT, LOCK_GRANTED_TAG,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((msg, payload)) = decode(data) else { return };
    assert!(data.len() <= LIMIT, "{msg:?}: accepted {} bytes", data.len());
    assert!(data.ends_with(payload), "the payload is the message's tail");
    match msg {
        Msg::Broadcast { .. } => assert!(payload.len() <= BROADCAST_CHUNK, "{msg:?}: {} bytes", payload.len()),
        Msg::Diff { .. } => assert!((1..=DIFF_LIMIT).contains(&payload.len()), "{msg:?}: {} bytes", payload.len()),
        _ => assert!(payload.is_empty(), "{msg:?} came with a payload"),
    }
    match msg {
        Msg::Grant { .. } => assert_eq!(data[0], GRANT_TAG),
        Msg::BarrierNotice { .. } => assert_eq!(data[0], BARRIER_NOTICE_TAG),
        Msg::LockGranted { .. } => assert_eq!(data[0], LOCK_GRANTED_TAG),
        _ => {}
    }
    // One message, one encoding: re-encoding fills a buffer of exactly the input's length with
    // exactly the input, and a byte less is too small.
    let mut buf = vec![0u8; data.len()];
    let again = encode(&msg, payload, &mut buf).expect("what decodes, encodes");
    assert_eq!(again, data, "{msg:?} has another encoding");
    let short = encode(&msg, payload, &mut buf[..data.len() - 1]);
    assert!(matches!(short, Err(EncodeError::BufferTooSmall { .. })), "{msg:?}: {short:?}");
});
