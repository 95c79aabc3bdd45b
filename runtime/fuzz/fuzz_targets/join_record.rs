//! The start-up join record a rank sends rank 0, as rank 0 reads it: `read_record` (a
//! little-endian u32 length, at most 1 MiB, that many bytes, then their 16-byte tag) from the
//! connection, then `decode_join` (size, address length, UTF-8 address, hello).
//!
//! The input is what the peer writes on the connection, once as it is (its tag is then almost
//! never right: the record must be refused unless it is) and once sealed as the session's other
//! end would; `decode_join` also runs on the input itself. Beyond "no panic": the record reader takes exactly the declared bytes or fails, the
//! join decoder accepts exactly the records its layout allows, an accepted record is the one
//! encoding of what it decoded (and `encode_join` gives it back whenever the address is a
//! socket address in its canonical spelling).

#![no_main]

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use gallocy_transport::fuzzing::{decode_join, encode_join, read_record, sealed_record};
use libfuzzer_sys::fuzz_target;

/// The limit rank 0 reads join records with.
const LIMIT: usize = 1 << 20;

fn check_join(v: &[u8]) {
    let decoded = decode_join(v);
    // The layout, stated again: size(4) addr_len(4) addr(addr_len, UTF-8) hello(rest).
    let expected = (|| {
        let head = v.get(..8)?;
        let addr_len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let addr = v.get(8..8usize.checked_add(addr_len)?)?;
        std::str::from_utf8(addr).ok()?;
        Some(())
    })();
    assert_eq!(decoded.is_some(), expected.is_some(), "{v:?}: {decoded:?}");
    let Some((size, addr, hello)) = decoded else { return };
    let again =
        [&(size as u32).to_le_bytes()[..], &(addr.len() as u32).to_le_bytes(), addr.as_bytes(), &hello].concat();
    assert_eq!(again, v, "({size}, {addr:?}, {hello:?}) has another encoding");
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        if sa.to_string() == addr {
            assert_eq!(encode_join(size, &sa, &hello), v);
        }
    }
}

/// What `read_record` makes of `bytes` written on a connection whose write side then closes.
fn read_from_wire(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    let mut ours = TcpStream::from(OwnedFd::from(ours));
    theirs.write_all(bytes).expect("the socket buffer holds the input");
    theirs.shutdown(Shutdown::Write).expect("shutdown");
    read_record(&mut ours, LIMIT)
}

fuzz_target!(|data: &[u8]| {
    check_join(data);

    // The bytes as they are: accepted only as a whole record with its right tag.
    if let Ok(v) = read_from_wire(data) {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        assert!(len <= LIMIT && 4 + len + 16 <= data.len());
        assert_eq!(v, data[4..4 + len]);
        assert_eq!(sealed_record(&v), data[..4 + len + 16], "accepted a record with a wrong tag");
        check_join(&v);
    }

    // The bytes sealed by the session's other end: they come back whole (up to the limit).
    if data.len() <= 64 << 10 {
        let got = read_from_wire(&sealed_record(data)).expect("a sealed record is read back");
        assert_eq!(got, data);
    }
});
