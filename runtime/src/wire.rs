//! Messages between the coherence engines of a job (bincode 2, standard configuration with a
//! size limit). Every message names pages by index from the heap base.

use bincode::{Decode, Encode};

/// Where a granted page's contents come from.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Attached by the home, which is done with the request.
    Inline,
    /// Attached by the owner on the home's behalf: tell the home when installed.
    Forwarded,
    /// The requester still holds a valid copy.
    Valid,
    /// Read it from this rank's runtime view (one-sided read).
    ReadFrom(u32),
}

/// A message between engines.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Requester -> home: I need `page` (for writing if `write`). `slot` identifies my waiter.
    Request { page: u64, write: bool, slot: u32 },
    /// Home -> owner: give `page` to `requester` (downgrade to read, or invalidate if `write`).
    Forward { page: u64, requester: u32, slot: u32, write: bool },
    /// -> requester: access granted.
    Grant { page: u64, slot: u32, write: bool, source: Source },
    /// Requester -> home: a grant that did not come from the home is installed.
    Done { page: u64 },
    /// Home -> holder: downgrade to read-only (`to_read`) or drop your copy.
    Revoke { page: u64, to_read: bool },
    /// Holder -> home: done.
    RevokeAck { page: u64 },
    /// Free this block of your arena (allocated by you, freed elsewhere).
    Free { addr: u64 },
    /// -> rank 0: I reached barrier `epoch`.
    BarrierArrive { epoch: u64 },
    /// Rank 0 -> all: barrier `epoch` is complete.
    BarrierRelease { epoch: u64 },
    /// -> lock home: queue me for lock `id`.
    LockAcquire { id: u32, slot: u32 },
    /// Lock home -> waiter: you hold lock `id`.
    LockGranted { id: u32, slot: u32 },
    /// -> lock home: I release lock `id`.
    LockRelease { id: u32 },
    /// Root -> all: bytes `offset..offset+data.len()` of broadcast `seq` (of `total` bytes).
    Broadcast { seq: u64, total: u64, offset: u64, data: Vec<u8> },
    /// -> owner of a block: how large is the block at `addr`? Answer to `slot`.
    SizeQuery { addr: u64, slot: u32 },
    /// Owner -> asker: the usable size (0: not a live block).
    SizeReply { slot: u32, size: u64 },
    /// Liveness.
    Ping,
    /// The sender lost contact with `rank` and stops; so does the job.
    Lost { rank: u32 },
}

/// Largest encoded message we accept.
pub const LIMIT: usize = 128 * 1024;
/// Chunk size for broadcasts.
pub const BROADCAST_CHUNK: usize = 64 * 1024;

/// First byte of every encoded `Msg::Grant` (its variant index): lets a waiting thread skip
/// other messages without decoding them.
pub const GRANT_TAG: u8 = 2;
/// First byte of every encoded `Msg::LockGranted`.
pub const LOCK_GRANTED_TAG: u8 = 10;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes into `buf`, returning the used prefix. Allocation-free for all but `Broadcast`.
pub fn encode<'a>(msg: &Msg, buf: &'a mut [u8]) -> Result<&'a [u8], String> {
    let n = bincode::encode_into_slice(msg, buf, config()).map_err(|e| e.to_string())?;
    Ok(&buf[..n])
}

/// Decodes one whole message.
pub fn decode(bytes: &[u8]) -> Result<Msg, String> {
    let (msg, used): (Msg, usize) = bincode::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes after a message", bytes.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let mut buf = [0u8; 64];
        for m in [
            Msg::Request { page: 1 << 40, write: true, slot: 511 },
            Msg::Grant { page: 3, slot: 2, write: false, source: Source::ReadFrom(7) },
            Msg::Revoke { page: 9, to_read: true },
        ] {
            let b = encode(&m, &mut buf).unwrap().to_vec();
            assert_eq!(decode(&b).unwrap(), m);
        }
        let g = encode(&Msg::Grant { page: 1, slot: 1, write: true, source: Source::Valid }, &mut buf).unwrap();
        assert_eq!(g[0], GRANT_TAG);
        let l = encode(&Msg::LockGranted { id: 1, slot: 1 }, &mut buf).unwrap();
        assert_eq!(l[0], LOCK_GRANTED_TAG);
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        let mut b = encode(&Msg::Ping, &mut buf).unwrap().to_vec();
        b.push(0);
        assert!(decode(&b).unwrap_err().contains("trailing"));
        // A broadcast claiming a huge payload is refused without allocating it.
        let mut big = vec![13u8];
        big.extend_from_slice(&[0, 0, 0, 0xfc, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode(&big).is_err());
    }
}
