//! The RDMA transport's decoders of peer bytes: a fragment received in an RDMA receive buffer
//! (`Head::parse`: a 16-byte header, kind, flags, two zero spare bytes, the payload length, an
//! argument, then the payload) and the endpoint message of the RDMA start-up exchange
//! (`Endpoint::decode`: a 4-byte tag and fixed fields). Built with the cargo feature `rdma`
//! (`cargo fuzz run --features rdma rdma_decode`), which needs libibverbs-dev to build, not a
//! device.
//!
//! First input byte, bit 0: which decoder gets the rest. Beyond "no panic": a fragment is accepted
//! exactly when its layout rule holds, and an accepted fragment or endpoint is the one encoding of
//! what it decoded.

#![no_main]

use gallocy_transport::fuzzing::{endpoint_round_trip, fragment_round_trip, FRAGMENT_MAX};
use libfuzzer_sys::fuzz_target;

/// Bytes of a fragment header and of an endpoint message.
const HDR: usize = 16;
const ENDPOINT: usize = 4 + 16 + 2 + 4 + 4 + 4 + 8 + 8;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    if which & 1 == 0 {
        let got = fragment_round_trip(rest);
        // The layout rule, stated again.
        let expected = rest.len() <= FRAGMENT_MAX
            && rest.len() >= HDR
            && rest[2..4] == [0, 0]
            && u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize == rest.len() - HDR;
        assert_eq!(got.is_ok(), expected, "{rest:?}: {got:?}");
        if let Ok(again) = got {
            assert_eq!(again, rest, "an accepted fragment has another encoding");
        }
    } else {
        let got = endpoint_round_trip(rest);
        assert_eq!(got.is_some(), rest.len() == ENDPOINT && rest[..4] == *b"GR1E", "{rest:?}");
        if let Some(again) = got {
            assert_eq!(again, rest, "an accepted endpoint has another encoding");
        }
    }
});
