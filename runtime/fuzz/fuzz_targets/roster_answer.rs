//! Rank 0's start-up answer as a joining rank reads it (`decode_answer`, after `read_record`):
//! `O` and the roster, one `host:port` line per rank, or `A` and the reason the job stopped.
//!
//! The first input byte is the job size the reader believes in (0 to 15), the rest is the answer.
//! Beyond "no panic": the decoder's verdict matches the format stated again here; an accepted
//! roster has exactly that many addresses, each `host:port` by the rule stated here, and is the
//! one encoding of itself (`encode_roster` gives it back).

#![no_main]

use gallocy_transport::fuzzing::{decode_answer, encode_roster, Answer, AnswerError};
use libfuzzer_sys::fuzz_target;

/// `host:port`, stated again: the last colon splits a non-empty host of visible ASCII from a
/// port of decimal digits (leading zeros allowed, as in `GALLOCY_COORDINATOR=host:07000`) whose
/// value is 1 to 65535.
fn host_port(addr: &str) -> bool {
    let Some(colon) = addr.rfind(':') else { return false };
    let (host, port) = (&addr[..colon], &addr[colon + 1..]);
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    !host.is_empty()
        && host.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && digits
        && (1..=65535).contains(&port.parse::<u32>().unwrap_or(0))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, answer)) = data.split_first() else { return };
    let size = usize::from(first & 0x0f);
    let verdict = decode_answer(answer, size);
    match answer.split_first() {
        None => assert_eq!(verdict, Err(AnswerError::Malformed)),
        Some((b'A', reason)) => {
            assert_eq!(verdict, Ok(Answer::Aborted(String::from_utf8_lossy(reason).into_owned())))
        }
        Some((b'O', lines)) => match std::str::from_utf8(lines) {
            Err(_) => assert_eq!(verdict, Err(AnswerError::NotUtf8)),
            Ok(text) => {
                let addrs: Vec<&str> = text.split('\n').collect();
                if addrs.len() != size {
                    assert_eq!(verdict, Err(AnswerError::WrongLength { got: addrs.len(), size }));
                } else if let Some(rank) = addrs.iter().position(|a| !host_port(a)) {
                    assert_eq!(verdict, Err(AnswerError::BadAddress { rank, addr: addrs[rank].to_owned() }));
                } else {
                    let Ok(Answer::Roster(roster)) = verdict else { panic!("{answer:?} refused: {verdict:?}") };
                    assert_eq!(roster, addrs);
                    assert_eq!(encode_roster(&roster), answer, "another encoding of {roster:?}");
                }
            }
        },
        Some(_) => assert_eq!(verdict, Err(AnswerError::Malformed)),
    }
});
