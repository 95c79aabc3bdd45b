//! Was a fault a read or a write? What the kernel tells the handler, per architecture.
//!
//! - x86-64: the page-fault error code in `REG_ERR`, bit 1 ("write").
//! - aarch64: the ESR record the kernel appends to the signal frame (`esr_context` in the
//!   `__reserved` area of `mcontext_t`): a data abort's WnR bit says "write".
//! - Anywhere the kernel says nothing: unknown. The handler then takes a fault on a page it
//!   holds readable as a write (a read there could not have faulted), see [`write_or_infer`].

// The ESR reader is compiled (and unit-tested) everywhere, and used on aarch64 only.
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

/// `ESR_MAGIC` of `<asm/sigcontext.h>`: the record holding the exception syndrome register.
const ESR_MAGIC: u32 = 0x4553_5201;
/// Exception classes of a data abort (from a lower exception level, and from the same one).
const EC_DATA_ABORT_LOWER: u64 = 0x24;
const EC_DATA_ABORT_SAME: u64 = 0x25;
/// ISS bit 6 of a data abort: the access was a write.
const ESR_WNR: u64 = 1 << 6;
/// Size of the record header (`struct _aarch64_ctx`: magic and size, 32 bits each).
const RECORD_HEADER: usize = 8;

/// Reads the write bit of a data abort from the records of an aarch64 signal frame's
/// `__reserved` area. `None` if there is no ESR record, or it is not a data abort. Stops at the
/// end record, at a malformed size, or at the end of `reserved`; never reads outside it.
pub fn esr_write_bit(reserved: &[u8]) -> Option<bool> {
    let mut at = 0usize;
    while at + RECORD_HEADER <= reserved.len() {
        let magic = u32::from_ne_bytes(reserved[at..at + 4].try_into().ok()?);
        let size = u32::from_ne_bytes(reserved[at + 4..at + 8].try_into().ok()?) as usize;
        if magic == 0 || size < RECORD_HEADER || size > reserved.len() - at {
            return None;
        }
        if magic == ESR_MAGIC {
            let esr_bytes = reserved.get(at + RECORD_HEADER..at + RECORD_HEADER + 8)?;
            let esr = u64::from_ne_bytes(esr_bytes.try_into().ok()?);
            let class = esr >> 26;
            return (class == EC_DATA_ABORT_LOWER || class == EC_DATA_ABORT_SAME).then_some(esr & ESR_WNR != 0);
        }
        at += size;
    }
    None
}

/// The kernel's answer if it gave one; otherwise a fault on a page held readable (`readable`,
/// asked only then) was a write, since a read of it could not have faulted.
pub fn write_or_infer(reported: Option<bool>, readable: impl FnOnce() -> bool) -> bool {
    reported.unwrap_or_else(readable)
}

/// What the kernel reported about the fault whose context is `ctx`.
#[cfg(target_arch = "x86_64")]
pub fn reported_write(ctx: *mut libc::c_void) -> Option<bool> {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; on x86-64 the page
    // fault error code is saved in REG_ERR and bit 1 means "write".
    let err = unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_ERR as usize] };
    Some(err & 2 != 0)
}

/// What the kernel reported about the fault whose context is `ctx`.
#[cfg(target_arch = "aarch64")]
pub fn reported_write(ctx: *mut libc::c_void) -> Option<bool> {
    /// `__reserved` is the last member of `mcontext_t` (`struct sigcontext`), 4096 bytes.
    const RESERVED: usize = 4096;
    let uc = ctx as *const libc::ucontext_t;
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; its mcontext_t
    // ends with the 4096-byte `__reserved` record area, which the kernel filled for this frame.
    let reserved = unsafe {
        let mc = std::ptr::addr_of!((*uc).uc_mcontext).cast::<u8>();
        std::slice::from_raw_parts(mc.add(std::mem::size_of::<libc::mcontext_t>() - RESERVED), RESERVED)
    };
    esr_write_bit(reserved)
}

/// What the kernel reported about the fault whose context is `ctx`: nothing we can read here.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn reported_write(_ctx: *mut libc::c_void) -> Option<bool> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(magic: u32, payload: &[u8], size: usize) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&magic.to_ne_bytes());
        r.extend_from_slice(&(size as u32).to_ne_bytes());
        r.extend_from_slice(payload);
        r.resize(size, 0);
        r
    }

    fn frame(esr: u64) -> Vec<u8> {
        // An FPSIMD record (magic 0x46508001, 528 bytes) first, as the kernel writes it, then ESR,
        // then the end record.
        let mut f = record(0x4650_8001, &[0xAA; 16], 528);
        f.extend(record(ESR_MAGIC, &esr.to_ne_bytes(), 16));
        f.extend(record(0, &[], 8));
        f.resize(4096, 0);
        f
    }

    #[test]
    fn a_data_abort_reports_its_write_bit() {
        let write = (EC_DATA_ABORT_LOWER << 26) | ESR_WNR | 0x0f;
        let read = EC_DATA_ABORT_LOWER << 26 | 0x0f;
        assert_eq!(esr_write_bit(&frame(write)), Some(true));
        assert_eq!(esr_write_bit(&frame(read)), Some(false));
        assert_eq!(esr_write_bit(&frame((EC_DATA_ABORT_SAME << 26) | ESR_WNR)), Some(true));
    }

    #[test]
    fn other_exceptions_and_missing_records_report_nothing() {
        // An instruction abort (class 0x20) says nothing about writes.
        assert_eq!(esr_write_bit(&frame((0x20 << 26) | ESR_WNR)), None);
        let mut no_esr = record(0x4650_8001, &[], 528);
        no_esr.extend(record(0, &[], 8));
        no_esr.resize(4096, 0);
        assert_eq!(esr_write_bit(&no_esr), None);
    }

    #[test]
    fn malformed_records_stop_the_walk_inside_the_area() {
        // A size of zero would loop forever; a size past the end would read outside.
        assert_eq!(esr_write_bit(&record(0x1234, &[], 8)[..4]), None);
        let mut zero = record(0x1234, &[], 8);
        zero[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(esr_write_bit(&zero), None);
        let mut huge = record(0x1234, &[], 16);
        huge[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(esr_write_bit(&huge), None);
        // An ESR record cut short.
        let short = record(ESR_MAGIC, &[1, 2, 3], 12);
        assert_eq!(esr_write_bit(&short), None);
    }

    #[test]
    fn without_a_report_a_fault_on_a_readable_page_is_a_write() {
        assert!(write_or_infer(None, || true));
        assert!(!write_or_infer(None, || false));
        assert!(!write_or_infer(Some(false), || true));
        assert!(write_or_infer(Some(true), || false));
    }
}
