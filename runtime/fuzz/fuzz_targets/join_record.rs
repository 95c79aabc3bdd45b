//! The start-up join record a rank sends rank 0, as rank 0 reads it: `read_record` (a
//! little-endian u32 length, at most 1 MiB, then that many bytes) from the connection, then
//! `decode_join` (size, address length, UTF-8 address, hello).
//!
//! The input is what the peer writes on the connection; `decode_join` also runs on the input
//! itself. Beyond "no panic": the record reader takes exactly the declared bytes or fails, the
//! join decoder accepts exactly the records its layout allows, an accepted record is the one
//! encoding of what it decoded (and `encode_join` gives it back whenever the address is a
//! socket address in its canonical spelling).

#![no_main]

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use gallocy_transport::fuzzing::{decode_join, encode_join, read_record};
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

fuzz_target!(|data: &[u8]| {
    check_join(data);

    // The same bytes as a peer's connection: everything written, then the write side closed.
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    let mut ours = TcpStream::from(OwnedFd::from(ours));
    theirs.write_all(data).expect("the socket buffer holds the input");
    theirs.shutdown(Shutdown::Write).expect("shutdown");
    let got = read_record(&mut ours, LIMIT);
    let declared = data.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    match (declared, got) {
        (Some(len), Ok(v)) => {
            assert!(len <= LIMIT && 4 + len <= data.len());
            assert_eq!(v, data[4..4 + len]);
            check_join(&v);
        }
        (Some(len), Err(_)) => assert!(len > LIMIT || 4 + len > data.len(), "refused a whole record"),
        (None, got) => assert!(got.is_err(), "a record without its length"),
    }
});
