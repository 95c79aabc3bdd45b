//! Large arrays in private anonymous memory, touched lazily (address space, not memory).

use crate::error::Error;

/// A private anonymous array of `T` (all-zero is a valid `T`).
pub struct LazyArray<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the array holds atomics only; the mapping lives as long as the value.
unsafe impl<T: Sync> Sync for LazyArray<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for LazyArray<T> {}

impl<T> LazyArray<T> {
    pub fn new(len: usize) -> Result<Self, Error> {
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::os("mapping the page table"));
        }
        Ok(LazyArray { ptr: p.cast(), len })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Pointer to elements `[i, i + n)`.
    pub fn run_ptr(&self, i: usize, n: usize) -> *mut T {
        assert!(i.checked_add(n).is_some_and(|end| end <= self.len), "range out of the array");
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.ptr.add(i) }
    }

    #[inline]
    pub fn get(&self, i: usize) -> &T {
        assert!(i < self.len, "page index out of range");
        // SAFETY: in bounds; zeroed memory is a valid T (atomics).
        unsafe { &*self.ptr.add(i) }
    }
}

impl<T> Drop for LazyArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), (self.len * std::mem::size_of::<T>()).max(1)) };
    }
}
