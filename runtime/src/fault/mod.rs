//! The fault path: the code that may run inside the SIGSEGV handler, and nothing else but the
//! handler's installation (`handler::install`, `handler::prepare_thread`, run when a process
//! joins or a thread starts, never from the handler). Everything the handler reaches is
//! async-signal-safe: no allocation, no lock that application code may hold, no formatting, no
//! panic; only pre-allocated wait slots, atomics, futexes and raw system calls. Outside this
//! module, the handler reaches only `Runtime`'s accessors, the page table, `Region::protect`,
//! `sys/` and `preload::fault_while_frozen`.
//!
//! - [`access_kind`]: whether a fault was a read or a write, from what the kernel reports.
//! - [`handler`]: installing the handler, telling our faults from foreign ones, chaining.
//! - [`acquire`]: getting a page from its home and waiting for it; answers a waiting thread
//!   takes from the sockets itself.
//! - [`release_miss`]: a miss under release consistency: a copy from the home, a twin before
//!   the first write.
//! - [`prefetch`]: which further pages a read miss asks for (sequential and strided runs).
//! - [`slots`]: the wait slots threads wait in.
//! - [`stacks`]: stacks of our own for faults on threads whose alternate stack is small.
//! - [`gate`]: the gate heap faults wait at while the heap's mappings change.

pub mod access_kind;
pub mod acquire;
pub mod gate;
pub mod handler;
pub mod prefetch;
pub mod release_miss;
pub mod slots;
pub mod stacks;
