//! Same-host reads: the same-host twin of an RDMA READ. A process on the same host (the same
//! kernel boot) maps a peer's heap memfd read-only, through `/proc/PID/fd/FD`, checked against
//! the device and inode the peer announced, and copies pages straight out of it: no message, no
//! remote CPU. Opening another process's descriptor needs the right to read its /proc entries
//! (the same user); where that fails, or the peer is on another host, the caller asks the peer
//! instead.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of an encoded [`ViewId`].
pub const VIEW_ID_LEN: usize = 48;

/// What a process announces so that processes on its host can map its heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewId {
    /// `/proc/sys/kernel/random/boot_id`: one per kernel boot (one host).
    pub boot: u128,
    /// The process.
    pub pid: u32,
    /// Its descriptor of the memfd.
    pub fd: i32,
    /// The memfd's device and inode, which the opened file must have.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
}

/// This boot's id, or `None` when it cannot be read.
fn boot_id() -> Option<u128> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    (hex.len() == 32).then(|| u128::from_str_radix(&hex, 16).ok()).flatten()
}

impl ViewId {
    /// The id of this process's memfd `fd`; `None` when it cannot be told.
    pub fn of(fd: i32) -> Option<ViewId> {
        // SAFETY: fstat writes one stat through a valid pointer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return None;
        }
        Some(ViewId { boot: boot_id()?, pid: std::process::id(), fd, dev: st.st_dev, ino: st.st_ino })
    }

    /// The fixed little-endian encoding (zero padded).
    pub fn encode(&self) -> [u8; VIEW_ID_LEN] {
        let mut b = [0u8; VIEW_ID_LEN];
        b[..16].copy_from_slice(&self.boot.to_le_bytes());
        b[16..20].copy_from_slice(&self.pid.to_le_bytes());
        b[20..24].copy_from_slice(&self.fd.to_le_bytes());
        b[24..32].copy_from_slice(&self.dev.to_le_bytes());
        b[32..40].copy_from_slice(&self.ino.to_le_bytes());
        b
    }

    /// Decodes an id; all-zero bytes (or a pid of 0) are "no id".
    pub fn decode(b: &[u8; VIEW_ID_LEN]) -> Option<ViewId> {
        let u = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 8];
            a[..r.len()].copy_from_slice(&b[r]);
            u64::from_le_bytes(a)
        };
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&b[..16]);
        let id = ViewId {
            boot: u128::from_le_bytes(boot),
            pid: u(16..20) as u32,
            fd: u(20..24) as u32 as i32,
            dev: u(24..32),
            ino: u(32..40),
        };
        (id.pid != 0 && id.fd >= 0 && b[40..].iter().all(|x| *x == 0)).then_some(id)
    }
}

/// A mapping not made yet.
const UNMAPPED: usize = 0;
/// Mapping failed (or the peer is elsewhere): never tried again.
const UNUSABLE: usize = 1;

/// Read-only mappings of the heaps of the peers on this host, made on first use.
pub struct LocalViews {
    ids: Box<[Option<ViewId>]>,
    maps: Box<[AtomicUsize]>,
    len: usize,
}

impl LocalViews {
    /// `ids[r]`: rank r's announced id; the peers on this boot (other than `me`) become
    /// readable. `len`: bytes of every heap.
    pub fn new(ids: &[Option<ViewId>], me: usize, len: usize) -> LocalViews {
        let mine = ids.get(me).copied().flatten();
        let ids: Box<[Option<ViewId>]> = ids
            .iter()
            .enumerate()
            .map(|(r, id)| id.filter(|id| r != me && mine.is_some_and(|m| m.boot == id.boot && m.pid != id.pid)))
            .collect();
        let maps = ids.iter().map(|id| AtomicUsize::new(if id.is_some() { UNMAPPED } else { UNUSABLE })).collect();
        LocalViews { ids, maps, len }
    }

    /// Whether `peer`'s heap may be readable here (same host; not failed before).
    pub fn may_read(&self, peer: usize) -> bool {
        self.maps.get(peer).is_some_and(|m| m.load(Ordering::Acquire) != UNUSABLE)
    }

    /// Whether `peer`'s heap can be read here: maps it now if it is not yet (and remembers a
    /// failure). Async-signal-safe: raw system calls, no allocation, no lock.
    pub fn readable(&self, peer: usize) -> bool {
        self.mapping(peer).is_some()
    }

    /// Copies `len` bytes at `offset` of `peer`'s heap to `dst`. False when that peer's heap
    /// cannot be read here. Async-signal-safe: raw system calls, no allocation, no lock.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    pub unsafe fn read(&self, peer: usize, offset: u64, dst: *mut u8, len: usize) -> bool {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len as u64) {
            return false;
        }
        let Some(base) = self.mapping(peer) else { return false };
        // SAFETY: [offset, offset + len) lies inside the peer's mapping of `self.len` bytes
        // (checked above); `dst` is the caller's. Under release consistency the peer may write
        // the source meanwhile: the copy is then some mix of old and new bytes, which that
        // protocol allows (under sequential consistency the source holds still until the copy is
        // done: gallocy's docs/protocol.md, "Direct reads").
        unsafe { std::ptr::copy_nonoverlapping((base + offset as usize) as *const u8, dst, len) };
        true
    }

    fn mapping(&self, peer: usize) -> Option<usize> {
        let slot = self.maps.get(peer)?;
        match slot.load(Ordering::Acquire) {
            UNUSABLE => return None,
            UNMAPPED => {}
            base => return Some(base),
        }
        let id = self.ids[peer]?;
        let mapped = map_view(&id, self.len);
        let new = mapped.unwrap_or(UNUSABLE);
        match slot.compare_exchange(UNMAPPED, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => mapped,
            Err(theirs) => {
                if let Some(base) = mapped {
                    // SAFETY: our own fresh mapping, which nobody else saw.
                    unsafe { libc::munmap(base as *mut libc::c_void, self.len) };
                }
                (theirs != UNUSABLE).then_some(theirs)
            }
        }
    }
}

impl Drop for LocalViews {
    fn drop(&mut self) {
        for m in self.maps.iter() {
            let base = m.load(Ordering::Acquire);
            if base != UNMAPPED && base != UNUSABLE {
                // SAFETY: a mapping of `len` bytes this value made.
                unsafe { libc::munmap(base as *mut libc::c_void, self.len) };
            }
        }
    }
}

/// Writes the decimal digits of `n` at `buf[at..]`; returns the new end.
fn put_num(buf: &mut [u8], mut at: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut k = 0;
    let mut v = n;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while k > 0 {
        k -= 1;
        buf[at] = digits[k];
        at += 1;
    }
    at
}

/// Maps the heap `id` names read-only, after checking that the descriptor is that file.
fn map_view(id: &ViewId, len: usize) -> Option<usize> {
    let mut path = [0u8; 64];
    let prefix = b"/proc/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut at = put_num(&mut path, prefix.len(), u64::from(id.pid));
    path[at..at + 4].copy_from_slice(b"/fd/");
    at = put_num(&mut path, at + 4, id.fd as u64);
    path[at] = 0;
    // SAFETY: a NUL-terminated path in a local buffer.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fstat of our fresh descriptor into a local stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let same = unsafe { libc::fstat(fd, &mut st) } == 0
        && st.st_dev == id.dev
        && st.st_ino == id.ino
        && st.st_size as u64 >= len as u64;
    let base = if same {
        // SAFETY: mapping `len` bytes of a file at least that long, read-only and shared.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        if p != libc::MAP_FAILED {
            // A forked child is no member and reads no peer: it must not keep the peer's heap.
            // SAFETY: advice on the mapping just made.
            unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        }
        (p != libc::MAP_FAILED).then_some(p as usize)
    } else {
        None
    };
    // SAFETY: closing our own descriptor (a mapping keeps the file).
    unsafe { libc::close(fd) };
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_zero_is_none() {
        let id = ViewId { boot: 0x1234_5678_9abc_def0_0fed_cba9_8765_4321, pid: 77, fd: 9, dev: 5, ino: 1 << 40 };
        assert_eq!(ViewId::decode(&id.encode()), Some(id));
        assert_eq!(ViewId::decode(&[0; VIEW_ID_LEN]), None);
        let mut bad = id.encode();
        bad[47] = 1;
        assert_eq!(ViewId::decode(&bad), None, "trailing bytes must be zero");
    }

    #[test]
    fn a_memfd_of_this_host_is_read_through_proc_and_others_are_not() {
        const LEN: usize = 1 << 16;
        // SAFETY: creating and sizing a memfd of our own, and writing into it.
        let fd = unsafe { libc::memfd_create(c"local-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ftruncate(fd, LEN as libc::off_t) }, 0);
        let data = [7u8, 8, 9];
        // SAFETY: writing 3 bytes from a local array at offset 4096 of our memfd.
        assert_eq!(unsafe { libc::pwrite(fd, data.as_ptr().cast(), 3, 4096) }, 3);
        let mine = ViewId::of(fd).expect("this process's memfd has an id");
        // Rank 1 is "another process" on this host with that memfd (our own pid is refused as a
        // peer, so announce the memfd under our parent-less id with another pid that maps to us:
        // /proc/self works the same as /proc/<our pid>).
        let peer = ViewId { pid: mine.pid, ..mine };
        let me = ViewId { pid: mine.pid + 1, ..mine };
        let views =
            LocalViews::new(&[Some(me), Some(peer), None, Some(ViewId { boot: mine.boot ^ 1, ..mine })], 0, LEN);
        assert!(views.may_read(1) && !views.may_read(2) && !views.may_read(3) && !views.may_read(0));
        let mut out = [0u8; 3];
        // SAFETY: `out` has 3 bytes.
        assert!(unsafe { views.read(1, 4096, out.as_mut_ptr(), 3) });
        assert_eq!(out, data);
        // SAFETY: as above.
        assert!(!unsafe { views.read(1, LEN as u64 - 1, out.as_mut_ptr(), 3) }, "past the end");
        // SAFETY: as above.
        assert!(!unsafe { views.read(2, 0, out.as_mut_ptr(), 3) }, "another host");
        // An inode that does not match is refused, and not tried again.
        let wrong = LocalViews::new(&[Some(me), Some(ViewId { ino: mine.ino + 1, ..peer })], 0, LEN);
        // SAFETY: as above.
        assert!(!unsafe { wrong.read(1, 0, out.as_mut_ptr(), 3) });
        assert!(!wrong.may_read(1));
        // SAFETY: closing our memfd.
        unsafe { libc::close(fd) };
    }
}
