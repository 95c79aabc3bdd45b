//! The heap: its address range and two views ([`region`]), the per-page access table
//! ([`pagetable`]), the application view's kernel mappings ([`mappings`]), the split into
//! per-rank arenas ([`layout`]) and the allocator that hands out blocks of this rank's arena
//! ([`alloc`]).

pub mod alloc;
pub mod layout;
pub mod lazy;
pub mod mappings;
pub mod pagetable;
pub mod region;
