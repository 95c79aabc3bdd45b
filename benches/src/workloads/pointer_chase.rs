//! `pointer_chase`: lookups in a binary search tree.
//!
//! Rank 0 builds the tree: `nodes` nodes, each `malloc`ed in the shared heap with gallocy's
//! allocator (`gallocy::malloc`), keys inserted in a deterministic pseudo-random order; it
//! broadcasts the root pointer, barrier. Then each rank does its block of the `lookups`
//! searches (half for keys in the tree, half for keys that are almost surely not), adding up
//! the values it finds; the other ranks take read copies of the tree's pages as they walk it.
//! The sequential version builds the same tree from `Box`es. Checksum: the values found and
//! their number.

use std::ptr::null_mut;

use anyhow::{bail, Result};
use gallocy_cli::jacobi::row_block;

use super::common::{ms, splitmix64, Job, Outcome};
use super::Params;
use crate::net::now_ns;

#[repr(C)]
struct Node {
    key: u64,
    val: u64,
    left: *mut Node,
    right: *mut Node,
}

/// Key of the i-th inserted node.
#[inline]
fn key_of(i: u64) -> u64 {
    splitmix64(i.wrapping_mul(2).wrapping_add(1))
}

#[inline]
fn val_of(key: u64) -> u64 {
    splitmix64(key ^ 0x2545_F491_4F6C_DD1D)
}

/// The key of lookup `q`: even lookups ask for an inserted key, odd ones for a random key.
#[inline]
fn query(q: u64, nodes: u64) -> u64 {
    if q.is_multiple_of(2) {
        key_of(splitmix64(q) % nodes)
    } else {
        splitmix64(q ^ 0x6A09_E667_F3BC_C909)
    }
}

/// Inserts `nodes` keys; `alloc` gives room for one node. Returns the root.
///
/// # Safety
/// `alloc` returns valid, writable, suitably aligned room for a [`Node`], that only this thread
/// uses while the tree is built.
unsafe fn build(nodes: u64, alloc: &mut dyn FnMut() -> Result<*mut Node>) -> Result<*mut Node> {
    let mut root: *mut Node = null_mut();
    'insert: for i in 0..nodes {
        let key = key_of(i);
        let mut link: *mut *mut Node = &mut root;
        // SAFETY: `link` points at `root` or at a child field of a node built here.
        unsafe {
            while !(*link).is_null() {
                let n = *link;
                if key < (*n).key {
                    link = &mut (*n).left;
                } else if key > (*n).key {
                    link = &mut (*n).right;
                } else {
                    continue 'insert; // a duplicate key (never with 64-bit keys in practice)
                }
            }
            let n = alloc()?;
            n.write(Node { key, val: val_of(key), left: null_mut(), right: null_mut() });
            *link = n;
        }
    }
    Ok(root)
}

/// The value of `key`, if it is in the tree.
///
/// # Safety
/// `root` is null or a tree made by [`build`] that nobody writes meanwhile.
#[inline]
unsafe fn search(mut n: *const Node, key: u64) -> Option<u64> {
    // SAFETY: every non-null link points at a node of the tree.
    unsafe {
        while !n.is_null() {
            if key < (*n).key {
                n = (*n).left;
            } else if key > (*n).key {
                n = (*n).right;
            } else {
                return Some((*n).val);
            }
        }
    }
    None
}

/// Lookups `qs`; the checksum part of what they found.
///
/// # Safety
/// As for [`search`].
unsafe fn lookups(root: *const Node, qs: std::ops::Range<u64>, nodes: u64) -> u64 {
    let (mut sum, mut found) = (0u64, 0u64);
    for q in qs {
        // SAFETY: upheld by the caller.
        if let Some(v) = unsafe { search(root, query(q, nodes)) } {
            sum = sum.wrapping_add(v);
            found += 1;
        }
    }
    sum.wrapping_add(found.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

pub fn sequential(s: &Params) -> Result<Outcome> {
    let t_setup = now_ns();
    let mut alloc = || -> Result<*mut Node> {
        Ok(Box::into_raw(Box::new(Node { key: 0, val: 0, left: null_mut(), right: null_mut() })))
    };
    // SAFETY: `alloc` gives fresh boxes. The tree is left to the end of the process.
    let root = unsafe { build(s.tree_nodes, &mut alloc)? };
    let t0 = now_ns();
    // SAFETY: the tree is complete and nobody writes it.
    let checksum = unsafe { lookups(root, 0..s.tree_lookups, s.tree_nodes) };
    let t1 = now_ns();
    Ok(Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() })
}

pub fn distributed(s: &Params) -> Result<Option<Outcome>> {
    let job = Job::current();
    job.barrier();
    let t_setup = now_ns();
    let mut root = 0u64;
    if job.rank == 0 {
        let mut alloc = || -> Result<*mut Node> {
            let p = gallocy::malloc(std::mem::size_of::<Node>());
            if p.is_null() {
                bail!("gallocy::malloc of a tree node returned NULL");
            }
            Ok(p.cast())
        };
        // SAFETY: gallocy::malloc returns 16-byte aligned blocks of the shared heap that only
        // this rank touches until the barrier below.
        root = unsafe { build(s.tree_nodes, &mut alloc)? } as u64;
    }
    let mut b = root.to_le_bytes();
    gallocy::broadcast(&mut b, 0);
    let root = u64::from_le_bytes(b) as *const Node;
    job.barrier();
    let t0 = now_ns();
    let mine = row_block(s.tree_lookups as usize, job.size, job.rank);
    // SAFETY: the tree is complete (built before the barrier) and nobody writes it.
    let part = unsafe { lookups(root, mine.start as u64..mine.end as u64, s.tree_nodes) };
    job.barrier();
    let t1 = now_ns();
    let checksum = job.sum(part)?;
    Ok((job.rank == 0).then(|| Outcome { setup_ms: ms(t_setup, t0), ms: ms(t0, t1), checksum, ..Default::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_finds_what_was_inserted() {
        let mut alloc = || -> Result<*mut Node> {
            Ok(Box::into_raw(Box::new(Node { key: 0, val: 0, left: null_mut(), right: null_mut() })))
        };
        // SAFETY: fresh boxes; the tree is leaked at the end of the test.
        let root = unsafe { build(500, &mut alloc).unwrap() };
        for i in 0..500 {
            // SAFETY: complete tree.
            assert_eq!(unsafe { search(root, key_of(i)) }, Some(val_of(key_of(i))));
        }
        // SAFETY: complete tree.
        assert_eq!(unsafe { search(root, 12345) }, None);
        // The checksum does not depend on how the lookups are split.
        // SAFETY: complete tree.
        let (all, a, b) =
            unsafe { (lookups(root, 0..1000, 500), lookups(root, 0..400, 500), lookups(root, 400..1000, 500)) };
        assert_eq!(all, a.wrapping_add(b));
    }
}
