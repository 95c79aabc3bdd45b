#![deny(warnings)]
#![allow(non_snake_case, non_camel_case_types, non_upper_case_globals)]
#![allow(
    clippy::missing_safety_doc,
    clippy::too_many_arguments,
    clippy::non_canonical_clone_impl
)]
#![allow(unnecessary_transmutes)]

use libc::*;

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

mod mlx5dv;
mod opcode;
mod types;
mod verbs;

pub use self::mlx5dv::*;
pub use self::opcode::*;
pub use self::types::*;
pub use self::verbs::*;

// gallocy patch: the C shims no longer load their libraries from ELF constructors (which ran
// `dlopen` while the dynamic loader held its lock, before `main`, in every process that loaded
// the crate's code); a program loads them explicitly, once, before its first verbs call.
extern "C" {
    fn rdma_mummy_load_ibverbs() -> c_int;
    fn rdma_mummy_load_rdmacm() -> c_int;
    fn rdma_mummy_load_mlx5() -> c_int;
}

/// Loads `libibverbs.so.1` and resolves the `ibv_*` entry points, once (later calls return the
/// first result). Every `ibv_*` function fails with `EOPNOTSUPP` until this returned `true`.
pub fn load_ibverbs() -> bool {
    // SAFETY: the C function takes no arguments and is serialised by pthread_once.
    unsafe { rdma_mummy_load_ibverbs() == 0 }
}

/// Loads `librdmacm.so.1` and resolves the `rdma_*` entry points, once; see [`load_ibverbs`].
pub fn load_rdmacm() -> bool {
    // SAFETY: as in `load_ibverbs`.
    unsafe { rdma_mummy_load_rdmacm() == 0 }
}

/// Loads `libmlx5.so.1` and resolves the `mlx5dv_*` entry points, once; see [`load_ibverbs`].
pub fn load_mlx5() -> bool {
    // SAFETY: as in `load_ibverbs`.
    unsafe { rdma_mummy_load_mlx5() == 0 }
}
