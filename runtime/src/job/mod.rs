//! The job: configuration from the environment ([`config`]), joining it ([`join`], with the
//! start-up handshake in [`bootstrap`]), this process's membership ([`membership`]), the runtime
//! that holds every part ([`runtime`]) and the state of collective calls ([`collectives`]).

pub mod barrier;
pub mod bootstrap;
pub mod collectives;
pub mod config;
pub mod forklock;
pub mod join;
pub mod membership;
pub mod panics;
pub mod runtime;
