//! Diffs (release consistency): what a writer changed in a page since it took the page's twin,
//! as the exact runs of changed bytes, so that writers of different bytes of one page never
//! overwrite each other at the page's home.
//!
//! Encoding: a sequence of runs, each `offset: u16 LE | len: u16 LE | len bytes`, in increasing,
//! non-overlapping, non-adjacent order, every run inside the page and at least one byte long.
//! Encoding and applying never allocate.

/// Why a diff is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// the diff ends inside a run header or a run's bytes
    #[error("the diff ends inside a run")]
    Truncated,
    /// a run is empty, leaves the page, overlaps or touches the previous run
    #[error("a run at offset {offset} of {len} bytes is empty, out of order or outside the page")]
    BadRun { offset: usize, len: usize },
    /// the diff is empty
    #[error("the diff holds no run")]
    Empty,
}

/// Bytes of a run header.
const RUN_HEADER: usize = 4;

/// Most bytes the diff of one page of `page_size` bytes can take: every other byte changed.
pub const fn max_encoded(page_size: usize) -> usize {
    page_size.div_ceil(2) * (RUN_HEADER + 1)
}

/// Writes the runs where `now` differs from `twin` (equal lengths, at most 64 KiB) into `out`,
/// which holds at least [`max_encoded`] bytes; returns the bytes written (0: no change).
pub fn encode(now: &[u8], twin: &[u8], out: &mut [u8]) -> usize {
    assert!(now.len() == twin.len() && now.len() < 1 << 16, "a diff compares two copies of one page");
    let n = now.len();
    let mut w = 0;
    let mut i = 0;
    while i < n {
        // Skip equal words quickly, then equal bytes.
        if i % 8 == 0 && i + 8 <= n && now[i..i + 8] == twin[i..i + 8] {
            i += 8;
            continue;
        }
        if now[i] == twin[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && now[i] != twin[i] {
            i += 1;
        }
        let len = i - start;
        out[w..w + 2].copy_from_slice(&(start as u16).to_le_bytes());
        out[w + 2..w + 4].copy_from_slice(&(len as u16).to_le_bytes());
        out[w + RUN_HEADER..w + RUN_HEADER + len].copy_from_slice(&now[start..i]);
        w += RUN_HEADER + len;
    }
    w
}

/// The runs of `diff` as `(offset, bytes)`, checked against a page of `page_size` bytes.
fn runs(diff: &[u8], page_size: usize) -> impl Iterator<Item = Result<(usize, &[u8]), DiffError>> {
    let mut at = 0;
    let mut next_free = 0;
    std::iter::from_fn(move || {
        if at == diff.len() {
            return None;
        }
        if diff.len() - at < RUN_HEADER {
            at = diff.len();
            return Some(Err(DiffError::Truncated));
        }
        let offset = u16::from_le_bytes([diff[at], diff[at + 1]]) as usize;
        let len = u16::from_le_bytes([diff[at + 2], diff[at + 3]]) as usize;
        let body = at + RUN_HEADER;
        let bad = len == 0 || offset < next_free || offset + len > page_size;
        if bad || diff.len() - body < len {
            at = diff.len();
            return Some(Err(if bad { DiffError::BadRun { offset, len } } else { DiffError::Truncated }));
        }
        // Runs of one diff are separated by at least one unchanged byte.
        next_free = offset + len + 1;
        at = body + len;
        Some(Ok((offset, &diff[body..at])))
    })
}

/// Checks a whole diff for a page of `page_size` bytes without applying it.
pub fn check(diff: &[u8], page_size: usize) -> Result<(), DiffError> {
    if diff.is_empty() {
        return Err(DiffError::Empty);
    }
    runs(diff, page_size).try_for_each(|r| r.map(|_| ()))
}

/// Applies a diff to a page of `page_size` bytes by calling `write(offset, bytes)` for each run
/// (every run lies inside the page): all of it, or (when it is malformed) none of it.
pub fn apply_with(diff: &[u8], page_size: usize, mut write: impl FnMut(usize, &[u8])) -> Result<(), DiffError> {
    check(diff, page_size)?;
    for run in runs(diff, page_size) {
        let (offset, bytes) = run?;
        write(offset, bytes);
    }
    Ok(())
}

/// Applies a diff to `page`: all of it, or (when it is malformed) none of it.
pub fn apply(diff: &[u8], page: &mut [u8]) -> Result<(), DiffError> {
    let len = page.len();
    apply_with(diff, len, |offset, bytes| page[offset..offset + bytes.len()].copy_from_slice(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    #[test]
    fn a_diff_carries_exactly_the_changed_bytes() {
        let twin = vec![7u8; PAGE];
        let mut now = twin.clone();
        now[0] = 1;
        now[9..20].fill(3);
        now[PAGE - 1] = 9;
        let mut out = vec![0u8; max_encoded(PAGE)];
        let n = encode(&now, &twin, &mut out);
        assert_eq!(n, 3 * RUN_HEADER + 1 + 11 + 1);
        // Applied to a page another writer changed elsewhere, it keeps that writer's bytes.
        let mut home = twin.clone();
        home[4] = 42;
        apply(&out[..n], &mut home).unwrap();
        assert_eq!(home[4], 42);
        assert_eq!(home[0], 1);
        assert!(home[9..20].iter().all(|b| *b == 3));
        assert_eq!(home[PAGE - 1], 9);
        assert_eq!(encode(&twin, &twin, &mut out), 0);
    }

    #[test]
    fn the_worst_case_fits_its_bound() {
        let twin = vec![0u8; PAGE];
        let now: Vec<u8> = (0..PAGE).map(|i| (i % 2) as u8 * 5 + (1 - (i % 2) as u8)).collect();
        let alternating: Vec<u8> = (0..PAGE).map(|i| if i % 2 == 0 { 1 } else { 0 }).collect();
        let mut out = vec![0u8; max_encoded(PAGE)];
        assert_eq!(encode(&alternating, &twin, &mut out), max_encoded(PAGE));
        let n = encode(&now, &twin, &mut out);
        assert_eq!(n, RUN_HEADER + PAGE, "one run of the whole page");
        let mut home = twin.clone();
        apply(&out[..n], &mut home).unwrap();
        assert_eq!(home, now);
    }

    #[test]
    fn malformed_diffs_change_nothing() {
        let mut page = vec![0u8; PAGE];
        let run = |offset: u16, len: u16, fill: u8| {
            let mut v = offset.to_le_bytes().to_vec();
            v.extend_from_slice(&len.to_le_bytes());
            v.extend(std::iter::repeat_n(fill, len as usize));
            v
        };
        let good = run(10, 2, 1);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            good[..3].to_vec(),
            good[..5].to_vec(),
            run(4095, 2, 1),
            run(5, 0, 1),
            [run(10, 2, 1), run(11, 1, 1)].concat(),
            [run(10, 2, 1), run(12, 1, 1)].concat(),
            [run(10, 2, 1), run(4, 1, 1)].concat(),
            [run(0, 1, 1), run(100, 3, 1), vec![0]].concat(),
        ];
        for c in cases {
            assert!(apply(&c, &mut page).is_err(), "{c:?}");
            assert!(page.iter().all(|b| *b == 0), "a refused diff changed the page: {c:?}");
        }
        apply(&[run(0, 1, 1), run(2, 1, 1)].concat(), &mut page).unwrap();
        assert_eq!(&page[..3], &[1, 0, 1]);
    }

    #[test]
    fn random_pages_round_trip() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = vec![0u8; max_encoded(PAGE)];
        for _ in 0..2000 {
            let twin: Vec<u8> = (0..PAGE).map(|_| next() as u8).collect();
            let mut now = twin.clone();
            for _ in 0..(next() % 64) {
                let at = (next() % PAGE as u64) as usize;
                let len = ((next() % 32) as usize).min(PAGE - at);
                for b in &mut now[at..at + len] {
                    *b = next() as u8;
                }
            }
            let n = encode(&now, &twin, &mut out);
            let mut home = twin.clone();
            if n > 0 {
                apply(&out[..n], &mut home).unwrap();
            }
            assert_eq!(home, now);
            // Random garbage never panics.
            let garbage: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            let _ = apply(&garbage, &mut home);
        }
    }
}
