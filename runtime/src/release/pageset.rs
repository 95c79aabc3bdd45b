//! A set of pages that threads add to without locks or allocation (the fault path does) and
//! that one thread at a time drains: a bitmap with one summary bit per word, so a drain reads
//! only the words that hold pages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::Error;
use crate::heap::lazy::LazyArray;

pub struct PageSet {
    words: LazyArray<AtomicU64>,
    /// Bit `w % 64` of `summary[w / 64]`: word `w` may hold pages.
    summary: LazyArray<AtomicU64>,
    summary_len: usize,
    /// Some page may have been added since the last drain.
    any: AtomicBool,
}

impl PageSet {
    pub fn new(pages: usize) -> Result<PageSet, Error> {
        let words = pages.div_ceil(64);
        let summary_len = words.div_ceil(64);
        Ok(PageSet {
            words: LazyArray::new(words)?,
            summary: LazyArray::new(summary_len)?,
            summary_len,
            any: AtomicBool::new(false),
        })
    }

    /// Adds `page`. Async-signal-safe.
    pub fn insert(&self, page: usize) {
        let w = page / 64;
        self.words.get(w).fetch_or(1 << (page % 64), Ordering::AcqRel);
        self.summary.get(w / 64).fetch_or(1 << (w % 64), Ordering::AcqRel);
        self.any.store(true, Ordering::Release);
    }

    /// Removes every page and calls `f` with each, in increasing order. A page added while the
    /// drain runs is either passed to `f` or stays for the next drain.
    pub fn drain(&self, mut f: impl FnMut(usize)) {
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        for s in 0..self.summary_len {
            if self.summary.get(s).load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut words = self.summary.get(s).swap(0, Ordering::AcqRel);
            while words != 0 {
                let w = s * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                let mut bits = self.words.get(w).swap(0, Ordering::AcqRel);
                while bits != 0 {
                    f(w * 64 + bits.trailing_zeros() as usize);
                    bits &= bits - 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_out_once_in_order() {
        let set = PageSet::new(1 << 20).unwrap();
        let pages = [0usize, 1, 63, 64, 4095, 4096, 70_000, (1 << 20) - 1];
        for p in pages.iter().rev() {
            set.insert(*p);
            set.insert(*p);
        }
        let mut out = Vec::new();
        set.drain(|p| out.push(p));
        assert_eq!(out, pages);
        set.drain(|p| panic!("page {p} came out twice"));
    }

    #[test]
    fn concurrent_inserts_are_never_lost() {
        let set = PageSet::new(1 << 16).unwrap();
        let mut seen = vec![0u32; 1 << 16];
        std::thread::scope(|s| {
            for t in 0..2 {
                let set = &set;
                s.spawn(move || {
                    for p in (t..1 << 16).step_by(2) {
                        set.insert(p);
                    }
                });
            }
            for _ in 0..50 {
                set.drain(|p| seen[p] += 1);
            }
        });
        set.drain(|p| seen[p] += 1);
        assert!(seen.iter().all(|n| *n == 1), "every page exactly once");
    }
}
