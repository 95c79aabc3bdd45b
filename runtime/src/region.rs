//! The heap region: one memfd mapped twice.
//!
//! The *application view* sits at the fixed heap base in every process; its per-page protections
//! follow the coherence state. The *runtime view* is mapped anywhere, always read-write: incoming
//! page contents land there (so the application never sees a half-copied page), and it is what
//! peers read from (and what an RDMA NIC registers).

use std::io::BufRead;

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

/// Page access an application view can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    None,
    Read,
    Write,
}

impl Access {
    fn prot(self) -> libc::c_int {
        match self {
            Access::None => libc::PROT_NONE,
            Access::Read => libc::PROT_READ,
            Access::Write => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// The mapped heap.
pub struct Region {
    pub base: usize,
    pub size: usize,
    pub page: usize,
    /// Start of the runtime view.
    pub runtime_base: usize,
    memfd: libc::c_int,
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
        Ok(Region { base, size, page: page_size(), runtime_base: base, memfd: -1 })
    }

    /// In a forked child of a multi-process job: turns the shared mappings of the heap into
    /// private copy-on-write ones with the same protections, so the child's writes never reach
    /// the parent's memory. Pages the child does not write may still show the parent's later
    /// writes. Returns false if /proc/self/maps could not be read.
    pub fn privatize(&self) -> bool {
        if self.memfd < 0 {
            return true;
        }
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return false };
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else { continue };
            let Some((a, b)) = range.split_once('-') else { continue };
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else { continue };
            if a < self.base || b > self.base + self.size {
                continue;
            }
            let mut prot = 0;
            if perms.starts_with('r') {
                prot |= libc::PROT_READ;
            }
            if perms.as_bytes().get(1) == Some(&b'w') {
                prot |= libc::PROT_WRITE;
            }
            // SAFETY: replacing part of our own application view with a private mapping of the
            // same file range.
            unsafe {
                libc::mmap(
                    a as *mut libc::c_void,
                    b - a,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    self.memfd,
                    (a - self.base) as libc::off_t,
                );
            }
        }
        true
    }

    /// Creates the memfd and maps both views; the application view starts with no access.
    pub fn reserve(base: usize, size: usize) -> Result<Region, Error> {
        let page = page_size();
        // SAFETY: the name is a valid C string; flags are valid.
        let memfd = unsafe { libc::memfd_create(c"gallocy-heap".as_ptr(), libc::MFD_CLOEXEC) };
        if memfd < 0 {
            return Err(Error::os("memfd_create"));
        }
        // SAFETY: memfd is ours.
        if unsafe { libc::ftruncate(memfd, size as libc::off_t) } != 0 {
            let e = Error::os(format!("sizing the heap memfd to {size} bytes"));
            // SAFETY: closing our fd.
            unsafe { libc::close(memfd) };
            return Err(e);
        }
        // SAFETY: mapping our memfd at a fixed address that must be free (NOREPLACE).
        let app = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
                memfd,
                0,
            )
        };
        if let Err(e) = check_placement(app, base, size) {
            // SAFETY: closing our fd.
            unsafe { libc::close(memfd) };
            return Err(e);
        }
        // SAFETY: mapping our memfd anywhere, shared, read-write.
        let rt = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                memfd,
                0,
            )
        };
        if rt == libc::MAP_FAILED {
            let e = Error::os("mapping the heap's runtime view");
            // SAFETY: undoing our own mapping and fd.
            unsafe {
                libc::munmap(app, size);
                libc::close(memfd);
            }
            return Err(e);
        }
        Ok(Region { base, size, page, runtime_base: rt as usize, memfd })
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
        // SAFETY: the range lies inside our application view.
        let r = unsafe { libc::mprotect(addr as *mut libc::c_void, count * self.page, access.prot()) };
        if r == 0 {
            Ok(())
        } else {
            // SAFETY: reading errno right after the failing call.
            Err(unsafe { *libc::__errno_location() })
        }
    }

    /// Pointer to a page in the runtime view.
    #[cfg(test)]
    pub fn runtime_page(&self, page: usize) -> *mut u8 {
        (self.runtime_base + page * self.page) as *mut u8
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own views and closing our fd.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size);
            if self.memfd >= 0 {
                libc::munmap(self.runtime_base as *mut libc::c_void, self.size);
                libc::close(self.memfd);
            }
        }
    }
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
        let r = Region::reserve(base, 16 << 20).unwrap();
        r.protect(0, 1, Access::Write).unwrap();
        // SAFETY: page 0 of both views is mapped; the app view is writable now.
        unsafe {
            *(base as *mut u64) = 42;
            assert_eq!(*(r.runtime_page(0) as *const u64), 42);
            *(r.runtime_page(1) as *mut u64) = 7;
        }
        r.protect(1, 1, Access::Read).unwrap();
        // SAFETY: page 1 is readable now.
        assert_eq!(unsafe { *((base + r.page) as *const u64) }, 7);
        match Region::reserve(base + (1 << 20), 16 << 20) {
            Err(Error::Occupied { mapping, .. }) => {
                assert!(mapping.contains("gallocy-heap"), "{mapping}")
            }
            other => panic!("expected Occupied, got {:?}", other.err()),
        }
    }
}
