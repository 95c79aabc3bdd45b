//! The `gallocy` command line: the local launcher (`gallocy run`, [`launch`]), its command-line
//! definitions ([`cli`]) and the demo's workload ([`jacobi`]), on top of the runtime's public API
//! (the `gallocy` crate).

pub mod cli;
pub mod jacobi;
pub mod launch;
