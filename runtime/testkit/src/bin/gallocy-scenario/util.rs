//! Shared helpers: argument parsing, result reporting, volatile access to shared words.

use std::collections::HashMap;
use std::sync::atomic::{compiler_fence, Ordering};

/// What a scenario returns: `Ok(details)` for the PASS line or `Err(reason)`.
pub type Outcome = Result<String, String>;

/// `--key value` and `--flag` arguments after the scenario name.
pub struct Args {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

/// Flags that take no value.
const BOOL_FLAGS: &[&str] = &["--progress", "--remote", "--expect", "--report-faults", "--own-handler"];

impl Args {
    pub fn parse(argv: &[String]) -> Result<Args, String> {
        let mut values = HashMap::new();
        let mut flags = Vec::new();
        let mut it = argv.iter();
        while let Some(a) = it.next() {
            if !a.starts_with("--") {
                return Err(format!("unexpected argument {a:?}"));
            }
            if BOOL_FLAGS.contains(&a.as_str()) {
                flags.push(a.clone());
            } else {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                values.insert(a.clone(), v.clone());
            }
        }
        Ok(Args { values, flags })
    }

    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    pub fn usize_or(&self, name: &str, default: usize) -> usize {
        match self.values.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| usage_error(&format!("{name} wants a number, got {v:?}"))),
        }
    }

    pub fn str_or(&self, name: &str, default: &str) -> String {
        self.values.get(name).cloned().unwrap_or_else(|| default.to_owned())
    }

    pub fn opt_usize(&self, name: &str) -> Option<usize> {
        self.values.get(name).map(|_| self.usize_or(name, 0))
    }
}

pub fn usage_error(msg: &str) -> ! {
    eprintln!("gallocy-scenario: {msg}\n\n{}", crate::USAGE);
    std::process::exit(2);
}

/// `gallocy::init()`, or print the error and exit 1.
pub fn init_or_exit() {
    if let Err(e) = gallocy::init() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Print the PASS line and finalize, or print the failure and exit 1 without finalizing.
pub fn finish(name: &str, outcome: Outcome) -> ! {
    let rank = gallocy::rank();
    match outcome {
        Ok(details) => {
            if details.is_empty() {
                println!("rank {rank}: {name} ok");
            } else {
                println!("rank {rank}: {name} ok ({details})");
            }
            if let Err(e) = gallocy::finalize() {
                eprintln!("error: rank {rank}: {name}: finalize failed: {e}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
        Err(msg) => {
            eprintln!("error: rank {rank}: {name}: {msg}");
            std::process::exit(1);
        }
    }
}

/// A raw address that may be sent to other threads (the memory behind it is the shared heap).
#[derive(Clone, Copy)]
pub struct Shared(pub usize);

impl Shared {
    pub fn word(self, index: usize) -> *mut u64 {
        (self.0 + index * 8) as *mut u64
    }
    pub fn at(self, offset: usize) -> *mut u64 {
        (self.0 + offset) as *mut u64
    }
}

/// Volatile read of a shared word, fenced against compiler reordering on both sides.
///
/// # Safety
/// `p` must point to a live, aligned u64 (in the shared heap).
#[inline]
pub unsafe fn vread(p: *const u64) -> u64 {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: guaranteed by the caller.
    let v = unsafe { std::ptr::read_volatile(p) };
    compiler_fence(Ordering::SeqCst);
    v
}

/// Volatile write of a shared word, fenced against compiler reordering on both sides.
///
/// # Safety
/// `p` must point to a live, aligned u64 (in the shared heap).
#[inline]
pub unsafe fn vwrite(p: *mut u64, v: u64) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::write_volatile(p, v) };
    compiler_fence(Ordering::SeqCst);
}

/// `alloc_collective(size)` with a null check.
pub fn collective(size: usize) -> Result<Shared, String> {
    let p = gallocy::alloc_collective(size);
    if p.is_null() {
        return Err(format!("alloc_collective({size}) returned null"));
    }
    let (base, len) = (gallocy::heap_base(), gallocy::heap_size());
    let a = p as usize;
    if a < base || a + size > base + len {
        return Err(format!("alloc_collective({size}) returned {a:#x}, outside the heap {base:#x}+{len:#x}"));
    }
    Ok(Shared(a))
}

/// SplitMix64: a cheap, well-mixed function of a word index (fill patterns, delays).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Rank of this process as the runtime will see it, read from the environment before `init()`.
pub fn env_rank() -> usize {
    for var in ["GALLOCY_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"] {
        if let Ok(v) = std::env::var(var) {
            if let Ok(r) = v.trim().parse() {
                return r;
            }
        }
    }
    0
}

/// Parse a size/address like the runtime does: hex (0x...) or decimal, optional K/M/G suffix.
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, shift) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 10),
        'm' | 'M' => (&s[..s.len() - 1], 20),
        'g' | 'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = if let Some(h) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        usize::from_str_radix(&h.replace('_', ""), 16).ok()?
    } else {
        num.replace('_', "").parse().ok()?
    };
    v.checked_mul(1usize << shift)
}
