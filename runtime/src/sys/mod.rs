//! Small system helpers, all async-signal-safe: the monotonic clock, futexes, raw output.

pub mod clock;
pub mod futex;
pub mod rawio;
