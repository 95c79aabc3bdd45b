//! Small system helpers, all async-signal-safe: the monotonic clock, futexes, raw output,
//! the service thread's scheduling.

pub mod clock;
pub mod futex;
pub mod rawio;
pub mod sched;
