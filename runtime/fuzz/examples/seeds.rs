//! Writes the seed corpora (`seeds/<target>/`): valid encodings made with the real encoders.
//! Run from `runtime/fuzz`: `cargo run --example seeds`.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use gallocy::fuzzing::Hello;
use gallocy::protocol::msg::{Msg, Source, Waiter};
use gallocy::protocol::wire;
use gallocy_transport::frame::{Header, Kind};
use gallocy_transport::fuzzing::{encode_join, encode_roster};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let w = Waiter { slot: 511, generation: 7 };
    let messages = [
        ("request", Msg::Request { page: 1 << 20, write: true, waiter: w, direct: true }),
        ("forward", Msg::Forward { page: 3, requester: 2, waiter: w, write: false }),
        ("grant_inline", Msg::Grant { page: 3, waiter: w, write: false, source: Source::Inline }),
        ("grant_forwarded", Msg::Grant { page: 3, waiter: w, write: true, source: Source::Forwarded }),
        ("grant_valid", Msg::Grant { page: 3, waiter: w, write: true, source: Source::Valid }),
        ("grant_read_from", Msg::Grant { page: 3, waiter: w, write: false, source: Source::ReadFrom(7) }),
        ("grant_host_copy", Msg::Grant { page: 3, waiter: w, write: false, source: Source::HostCopy }),
        ("done", Msg::Done { page: 9 }),
        ("revoke", Msg::Revoke { page: 9, to_read: true }),
        ("revoke_ack", Msg::RevokeAck { page: 9 }),
        ("free", Msg::Free { addr: 0x7f00_0000_1000 }),
        ("barrier_notice", Msg::BarrierNotice { epoch: 4, round: 2 }),
        ("lock_acquire", Msg::LockAcquire { id: 1, waiter: w }),
        ("lock_granted", Msg::LockGranted { id: 1, waiter: w }),
        ("lock_release", Msg::LockRelease { id: 1 }),
        ("lock_recall", Msg::LockRecall { id: 12 }),
        ("size_query", Msg::SizeQuery { addr: 64, waiter: w }),
        ("size_reply", Msg::SizeReply { waiter: w, size: 48 }),
        ("ping", Msg::Ping),
        ("lost", Msg::Lost { rank: 3 }),
    ];
    let mut buf = vec![0u8; wire::LIMIT];
    for (name, m) in messages {
        write("wire_decode", name, wire::encode(&m, &[], &mut buf).unwrap());
    }
    let b = Msg::Broadcast { seq: 1, total: 9, offset: 2 };
    write("wire_decode", "broadcast", wire::encode(&b, b"payload", &mut buf).unwrap());
    write("wire_decode", "broadcast_empty", wire::encode(&b, &[], &mut buf).unwrap());
    // The largest message: a byte more is refused (run this target with -max_len above 65562).
    let full = vec![0u8; wire::BROADCAST_CHUNK];
    let largest = wire::encode(&b, &full, &mut buf).unwrap().to_vec();
    write("wire_decode", "broadcast_full", &largest);
    write("wire_decode", "broadcast_too_long", &[&largest[..], &[0]].concat());

    let view = (1u64 << 30).to_le_bytes();
    let frames = [
        ("message", Header { kind: Kind::Message, msg_len: 34, page_len: 4096, offset: 8192, token: 0 }),
        ("read_request", Header { kind: Kind::ReadRequest, msg_len: 0, page_len: 4096, offset: 0, token: 5 }),
        ("read_reply", Header { kind: Kind::ReadReply, msg_len: 0, page_len: 65536, offset: 1 << 20, token: 5 }),
        ("goodbye", Header { kind: Kind::Goodbye, msg_len: 0, page_len: 0, offset: 0, token: 0 }),
    ];
    for (name, h) in frames {
        write("frame_header", name, &[&h.encode()[..], &view].concat());
    }

    let mut hello = Hello::new(None, None, None);
    hello.host = "node1".into();
    hello.pid = 1234;
    let report = hello.encode();
    let v4: SocketAddr = "10.1.2.3:4567".parse().unwrap();
    let v6: SocketAddr = "[fe80::1%2]:9".parse().unwrap();
    let join = encode_join(4, &v4, &report);
    let framed = |v: &[u8]| [&(v.len() as u32).to_le_bytes()[..], v].concat();
    write("join_record", "join_v4", &join);
    write("join_record", "record_join_v4", &framed(&join));
    write("join_record", "record_join_v6_empty_hello", &framed(&encode_join(2, &v6, &[])));
    write("join_record", "record_empty", &framed(&[]));

    // Handshake: mode byte, then the peer's bytes (see fuzz_targets/handshake.rs).
    let proof = [&[0xa5u8; 16][..], &3u32.to_le_bytes(), &[0x5a; 32]].concat();
    write("handshake", "accept_proof", &[&[0u8][..], &proof].concat());
    let server = [&b"GLC1"[..], &[0x11; 16], &[0x22; 32]].concat();
    write("handshake", "connect_hello_answer", &[&[1u8][..], &server].concat());
    write("handshake", "connect_hello_only", &[&[1u8][..], &server[..20]].concat());

    // Hello: reports separated by NUL bytes; rank 0's own comes from the target.
    write("hello", "agrees", &report);
    let mut problem = hello.clone();
    problem.problem = Some("heap range occupied".into());
    write("hello", "problem", &problem.encode());
    let mut other = hello.clone();
    other.heap_base ^= 1 << 40;
    other.transport = "rdma".into();
    write("hello", "two_ranks_one_disagrees", &[&report[..], &[0], &other.encode()].concat());

    // Roster answer: the job size (low 4 bits), then rank 0's answer.
    let roster: Vec<String> = ["node0:7000", "127.0.0.1:40001", "[::1]:40002"].map(String::from).to_vec();
    write("roster_answer", "roster_three", &[&[3u8][..], &encode_roster(&roster)].concat());
    let reason = b"Arank 1 believes the job has 3 processes, rank 0 believes 2";
    write("roster_answer", "aborted", &[&[2u8][..], reason].concat());
    write("roster_answer", "port_zero", &[&[1u8][..], &encode_roster(&["127.0.0.1:0".into()])].concat());
    write("roster_answer", "not_utf8", b"\x02Oa:1\n\xff:2");
}
