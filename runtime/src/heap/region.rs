//! The heap region: one memfd mapped twice.
//!
//! The *application view* sits at the fixed heap base in every process; its per-page protections
//! follow the coherence state. The *runtime view* is mapped anywhere, always read-write: incoming
//! page contents land there (so the application never sees a half-copied page), and it is what
//! peers read from (and what an RDMA NIC registers).

use std::io::BufRead;
use std::sync::OnceLock;

use gallocy_transport::MemoryView;

use crate::error::Error;

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

pub use crate::protocol::Access;

/// The protection that gives the application view `access`.
fn prot(access: Access) -> libc::c_int {
    match access {
        Access::None => libc::PROT_NONE,
        Access::Read => libc::PROT_READ,
        Access::Write => libc::PROT_READ | libc::PROT_WRITE,
    }
}

/// This thread's errno. Async-signal-safe.
fn errno() -> i32 {
    // SAFETY: errno is thread-local and always readable.
    unsafe { *libc::__errno_location() }
}

/// The mapped heap.
///
/// A heap starts as private anonymous memory (a one-process job, or a job member that has not
/// joined yet: `fork` then gives a plain copy-on-write snapshot). [`Region::share`] turns it into
/// the memfd with its two views when the process joins the job.
pub struct Region {
    pub base: usize,
    pub size: usize,
    pub page: usize,
    shared: OnceLock<Shared>,
}

/// The memfd behind a shared heap and its runtime view.
struct Shared {
    memfd: libc::c_int,
    runtime_base: usize,
}

/// A readable run of the application view: `[start, end)` with its protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readable {
    pub start: usize,
    pub end: usize,
    pub writable: bool,
}

/// Finds the /proc/self/maps line overlapping [start, end).
fn conflicting_mapping(start: usize, end: usize) -> String {
    let Ok(f) = std::fs::File::open("/proc/self/maps") else {
        return "unknown".into();
    };
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        let Some((range, _)) = line.split_once(' ') else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if a < end && start < b {
            return line.split_whitespace().collect::<Vec<_>>().join(" ");
        }
    }
    "unknown".into()
}

/// Checks that an `mmap(base, size, MAP_FIXED_NOREPLACE)` landed at `base`; on failure undoes a
/// misplaced mapping (old kernels treat NOREPLACE as a hint) and names what is in the way.
fn check_placement(p: *mut libc::c_void, base: usize, size: usize) -> Result<(), Error> {
    if p != libc::MAP_FAILED && p as usize == base {
        return Ok(());
    }
    let errno = std::io::Error::last_os_error();
    if p != libc::MAP_FAILED {
        // SAFETY: unmapping the misplaced mapping we just made.
        unsafe { libc::munmap(p, size) };
    }
    if p != libc::MAP_FAILED || errno.raw_os_error() == Some(libc::EEXIST) {
        return Err(Error::Occupied { start: base, end: base + size, mapping: conflicting_mapping(base, base + size) });
    }
    Err(Error::Os { what: format!("mapping the heap at {base:#x}"), source: errno })
}

impl Region {
    /// Maps a private anonymous heap for a one-process job (no runtime view, nothing to share);
    /// it starts with no access.
    pub fn reserve_private(base: usize, size: usize) -> Result<Region, Error> {
        // SAFETY: a fresh anonymous mapping at an address that must be free (NOREPLACE).
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        check_placement(p, base, size)?;
        Ok(Region { base, size, page: page_size(), shared: OnceLock::new() })
    }

    /// Turns the private heap into a shared one when the process joins the job: creates the memfd,
    /// maps the runtime view, copies the pages `[first, end)` that hold data into it, and maps the
    /// memfd over the whole application view with no access (the caller opens what it holds).
    /// The caller keeps every thread from writing those pages meanwhile (it write-protects them).
    pub fn share(&self, first: usize, end: usize) -> Result<MemoryView, Error> {
        if let Some(s) = self.shared.get() {
            return Ok(MemoryView { base: s.runtime_base as *mut u8, len: self.size });
        }
        // SAFETY: the name is a valid C string; flags are valid.
        let memfd = unsafe { libc::memfd_create(c"gallocy-heap".as_ptr(), libc::MFD_CLOEXEC) };
        if memfd < 0 {
            return Err(Error::os("memfd_create"));
        }
        let fail = |e: Error, rt: *mut libc::c_void| {
            // SAFETY: undoing our own mapping and fd.
            unsafe {
                if !rt.is_null() && rt != libc::MAP_FAILED {
                    libc::munmap(rt, self.size);
                }
                libc::close(memfd);
            }
            Err(e)
        };
        // SAFETY: memfd is ours.
        if unsafe { libc::ftruncate(memfd, self.size as libc::off_t) } != 0 {
            return fail(Error::os(format!("sizing the heap memfd to {} bytes", self.size)), std::ptr::null_mut());
        }
        // SAFETY: mapping our memfd anywhere, shared, read-write.
        let rt = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                memfd,
                0,
            )
        };
        if rt == libc::MAP_FAILED {
            return fail(Error::os("mapping the heap's runtime view"), rt);
        }
        // A child never uses the runtime view (it copies its snapshot through the memfd, see
        // `snapshot_in_child`): keep it out of children, so that `fork` leaves the parent's
        // registered RDMA memory alone on every kernel, and a child cannot write to it.
        // SAFETY: advice on the mapping made above.
        if unsafe { libc::madvise(rt, self.size, libc::MADV_DONTFORK) } != 0 {
            return fail(Error::os("madvise(MADV_DONTFORK) on the heap's runtime view"), rt);
        }
        for page in first..end {
            let off = page * self.page;
            // SAFETY: pages [first, end) of the application view are readable (the caller's
            // arena), the runtime view is a fresh read-write mapping of the same size.
            unsafe {
                let src = std::slice::from_raw_parts((self.base + off) as *const u8, self.page);
                if src.iter().any(|b| *b != 0) {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), (rt as *mut u8).add(off), self.page);
                }
            }
        }
        // SAFETY: replaces our own private application view, in place, by the memfd.
        let app = unsafe {
            libc::mmap(
                self.base as *mut libc::c_void,
                self.size,
                libc::PROT_NONE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                memfd,
                0,
            )
        };
        if app == libc::MAP_FAILED {
            return fail(Error::os("mapping the shared heap"), rt);
        }
        // A child gets the heap as it was at the fork, as a private copy it makes while the
        // parent waits (`snapshot_in_child`), never this shared mapping: through it the child
        // would see the parent's later writes, and its writes would reach the parent and the job.
        // SAFETY: advice on the mapping made above.
        if unsafe { libc::madvise(app, self.size, libc::MADV_DONTFORK) } != 0 {
            return fail(Error::os("madvise(MADV_DONTFORK) on the shared heap"), rt);
        }
        let _ = self.shared.set(Shared { memfd, runtime_base: rt as usize });
        Ok(MemoryView { base: rt as *mut u8, len: self.size })
    }

    /// The readable runs of the application view, from /proc/self/maps (allocates).
    pub fn readable_runs(&self) -> Result<Vec<Readable>, Error> {
        let maps = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| Error::Os { what: "reading /proc/self/maps".into(), source: e })?;
        let mut runs = Vec::new();
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else { continue };
            let Some((a, b)) = range.split_once('-') else { continue };
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else { continue };
            if a < self.base || b > self.base + self.size || !perms.starts_with('r') {
                continue;
            }
            runs.push(Readable { start: a, end: b, writable: perms.as_bytes().get(1) == Some(&b'w') });
        }
        Ok(runs)
    }

    /// In a forked child of a job member: replaces the application view, which the child does
    /// not have (it is `MADV_DONTFORK`, see [`Region::share`]), by a private copy of `runs` (the
    /// parent's pages, which the parent keeps frozen until this returns), readable and writable
    /// (the copy is the child's own); everything else has no access. The child's heap is then
    /// exactly the parent's at `fork`, and nothing either side writes reaches the other.
    /// Async-signal-safe (no allocation). On failure returns the errno.
    pub fn snapshot_in_child(&self, runs: &[Readable]) -> Result<(), i32> {
        let Some(shared) = self.shared.get() else { return Ok(()) };
        // SAFETY: creating a memfd of our own, closed below (the mapping keeps its own reference).
        let copy = unsafe { libc::memfd_create(c"gallocy-fork-copy".as_ptr(), libc::MFD_CLOEXEC) };
        if copy < 0 {
            return Err(errno());
        }
        let done = self.copy_runs(shared.memfd, copy, runs).and_then(|()| self.install_snapshot(copy, runs));
        // SAFETY: our own descriptors: the copy's, and the heap's memfd, which the child no
        // longer uses (the runtime view is not in the child either: MADV_DONTFORK, see `share`).
        unsafe {
            libc::close(copy);
            libc::close(shared.memfd);
        }
        done
    }

    /// Fills `copy`, a fresh memfd, with `runs` of the heap read from its memfd `heap`, at their
    /// offsets, holes elsewhere. The kernel copies file to file (`copy_file_range`), so no page
    /// is copied through a mapping. Async-signal-safe (no allocation). On failure returns the
    /// errno.
    fn copy_runs(&self, heap: i32, copy: i32, runs: &[Readable]) -> Result<(), i32> {
        // SAFETY: sizing our own memfd.
        if unsafe { libc::ftruncate(copy, self.size as libc::off_t) } != 0 {
            return Err(errno());
        }
        let copy_range = |from: libc::off_t, to: libc::off_t| -> Result<(), i32> {
            let (mut off_in, mut off_out) = (from, from);
            while off_in < to {
                // SAFETY: both descriptors are ours; the offsets are valid pointers to locals.
                let n =
                    unsafe { libc::copy_file_range(heap, &mut off_in, copy, &mut off_out, (to - off_in) as usize, 0) };
                if n < 0 && errno() == libc::EINTR {
                    continue;
                }
                if n < 0 && matches!(errno(), libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) {
                    return self.copy_through_buffer(heap, copy, off_in, to);
                }
                if n <= 0 {
                    return Err(if n < 0 { errno() } else { libc::EIO });
                }
            }
            Ok(())
        };
        // Of a large run, only the parts of the memfd that hold data: holes stay holes, which
        // read as zeros (a rank's arena is one large writable run, mostly never touched). A
        // small run is copied whole (a view that closed to save mappings gives many runs of a
        // page or two, and seeking costs more than copying them).
        for r in runs {
            let (start, end) = ((r.start - self.base) as libc::off_t, (r.end - self.base) as libc::off_t);
            if end - start < SEEK_HOLES_FROM {
                copy_range(start, end)?;
                continue;
            }
            let mut at = start;
            while at < end {
                // SAFETY: seeking in our own memfd.
                let data = unsafe { libc::lseek(heap, at, libc::SEEK_DATA) };
                if data < 0 || data >= end {
                    break;
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(heap, data, libc::SEEK_HOLE) };
                let hole = if hole <= data { end } else { hole.min(end) };
                copy_range(data, hole)?;
                at = hole;
            }
        }
        Ok(())
    }

    /// Copies `[from, to)` of file `src` to the same offsets of `dst` through a buffer on the
    /// stack: where `copy_file_range` cannot. Async-signal-safe. On failure returns the errno.
    fn copy_through_buffer(&self, src: i32, dst: i32, from: libc::off_t, to: libc::off_t) -> Result<(), i32> {
        let mut buf = [0u8; 16 * 1024];
        let mut off = from;
        while off < to {
            let want = ((to - off) as usize).min(buf.len());
            // SAFETY: reading into our own stack buffer of at least `want` bytes.
            let n = unsafe { libc::pread(src, buf.as_mut_ptr().cast(), want, off) };
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                return Err(if n < 0 { errno() } else { libc::EIO });
            }
            let mut done = 0;
            while done < n as usize {
                // SAFETY: writing bytes of our own stack buffer that pread filled.
                let w = unsafe {
                    libc::pwrite(dst, buf[done..].as_ptr().cast(), n as usize - done, off + done as libc::off_t)
                };
                if w < 0 && errno() == libc::EINTR {
                    continue;
                }
                if w <= 0 {
                    return Err(if w < 0 { errno() } else { libc::EIO });
                }
                done += w as usize;
            }
            off += n as libc::off_t;
        }
        Ok(())
    }

    /// Maps `copy` (of `runs`) private (copy-on-write: the child's writes stay its own, and its
    /// own children get copy-on-write snapshots of it) at the heap's address, where a forked
    /// child has no mapping; the runs become readable and writable, the rest has no access.
    /// Async-signal-safe. On failure returns the errno.
    fn install_snapshot(&self, copy: i32, runs: &[Readable]) -> Result<(), i32> {
        // SAFETY: maps our own copy at the heap's address range, which holds no mapping in a
        // forked child (MAP_FIXED_NOREPLACE fails rather than replace anything), then sets the
        // protections of that range.
        unsafe {
            let mapped = libc::mmap(
                self.base as *mut libc::c_void,
                self.size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
                copy,
                0,
            );
            if mapped == libc::MAP_FAILED {
                return Err(errno());
            }
            if mapped as usize != self.base {
                // An old kernel took NOREPLACE as a hint: something holds the heap's range.
                libc::munmap(mapped, self.size);
                return Err(libc::EEXIST);
            }
            // Every page the child has a copy of is its own now, to read and to write. If that
            // takes more mappings than the kernel allows, the view stays closed, and the child's
            // fault handler opens the pages it holds as they are touched.
            for (start, end) in spans(runs) {
                if libc::mprotect(start as *mut libc::c_void, end - start, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                    if errno() != libc::ENOMEM {
                        return Err(errno());
                    }
                    if libc::mprotect(self.base as *mut libc::c_void, self.size, libc::PROT_NONE) != 0 {
                        return Err(errno());
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Sets the protection of `[start, end)` of the application view (inside the heap).
    /// Async-signal-safe. On failure returns the errno.
    pub fn protect_range(&self, start: usize, end: usize, access: Access) -> Result<(), i32> {
        debug_assert!(start >= self.base && end <= self.base + self.size);
        // SAFETY: the range lies inside our application view.
        let r = unsafe { libc::mprotect(start as *mut libc::c_void, end - start, prot(access)) };
        if r == 0 {
            Ok(())
        } else {
            // SAFETY: reading errno right after the failing call.
            Err(unsafe { *libc::__errno_location() })
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.size / self.page
    }

    /// Whether `addr` lies in the application view.
    #[inline]
    pub fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.base) < self.size
    }

    /// Sets the application view's access for `count` pages starting at `page`.
    /// Async-signal-safe. On failure returns the errno.
    pub fn protect(&self, page: usize, count: usize, access: Access) -> Result<(), i32> {
        let addr = self.base + page * self.page;
        self.protect_range(addr, addr + count * self.page, access)
    }

    /// Gives the memory of `count` pages starting at `page` back to the system: their contents
    /// become zeros in both views (a hole in the memfd). For pages whose contents this process no
    /// longer needs (an invalidated copy). On failure returns the errno.
    pub fn release(&self, page: usize, count: usize) -> Result<(), i32> {
        let Some(shared) = self.shared.get() else { return Ok(()) };
        // SAFETY: punching a hole in our own memfd, inside its size.
        let r = unsafe {
            libc::fallocate(
                shared.memfd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (page * self.page) as libc::off_t,
                (count * self.page) as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
        }
    }

    /// The memfd behind the shared heap (once shared).
    pub fn memfd(&self) -> Option<libc::c_int> {
        self.shared.get().map(|s| s.memfd)
    }

    /// Pointer to a page in the runtime view (always read-write) of a shared region.
    pub fn runtime_page(&self, page: usize) -> *mut u8 {
        (self.shared.get().expect("shared").runtime_base + page * self.page) as *mut u8
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own views and closing our fd.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size);
            if let Some(s) = self.shared.get() {
                libc::munmap(s.runtime_base as *mut libc::c_void, self.size);
                libc::close(s.memfd);
            }
        }
    }
}

/// Runs of a fork snapshot at least this long (bytes) are copied without their holes.
const SEEK_HOLES_FROM: libc::off_t = 1 << 20;

/// The maximal spans `[start, end)` of adjacent runs (one `mprotect` each instead of one per
/// run). Allocation-free.
pub fn spans(runs: &[Readable]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = runs.get(i)?;
        let mut end = first.end;
        i += 1;
        while let Some(next) = runs.get(i).filter(|r| r.start == end) {
            end = next.end;
            i += 1;
        }
        Some((first.start, end))
    })
}

/// The kernel's limit on mappings per process (each protection change can split one).
pub fn max_map_count() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_memory_and_occupied_range_is_reported() {
        let base = 0x3100_0000_0000;
        let r = Region::reserve_private(base, 16 << 20).unwrap();
        r.protect(0, 2, Access::Write).unwrap();
        // SAFETY: page 0 is writable private memory.
        unsafe { *((base + 8) as *mut u64) = 9 };
        r.share(0, 2).unwrap();
        r.protect(0, 1, Access::Write).unwrap();
        // SAFETY: the private page's contents moved into the shared heap.
        assert_eq!(unsafe { *((base + 8) as *const u64) }, 9);
        // SAFETY: page 0 of both views is mapped; the app view is writable now.
        unsafe {
            *(base as *mut u64) = 42;
            assert_eq!(*(r.runtime_page(0) as *const u64), 42);
            *(r.runtime_page(1) as *mut u64) = 7;
        }
        r.protect(1, 1, Access::Read).unwrap();
        // SAFETY: page 1 is readable now.
        assert_eq!(unsafe { *((base + r.page) as *const u64) }, 7);
        match Region::reserve_private(base + (1 << 20), 16 << 20) {
            Err(Error::Occupied { mapping, .. }) => {
                assert!(mapping.contains("gallocy-heap"), "{mapping}")
            }
            other => panic!("expected Occupied, got {:?}", other.err()),
        }
    }
}
