//! What runs when `libgallocy.so` is loaded: its `.init_array` holds only gallocy's own
//! constructor and what every Rust or C library has, never a constructor that loads a library.
//!
//! A preloaded malloc's constructors run under the dynamic loader's lock, before the program's
//! `main`; one that `dlopen`s there (as upstream rdma-mummy-sys's `ibverbs_init` and
//! `rdmacm_init` do) can deadlock the program, and one that allocates re-enters the allocator
//! being set up. With the `rdma` feature the verbs loader runs only when the transport starts, on
//! the thread that joins the job (the patched copy in transport/vendor/rdma-mummy-sys).
//!
//! Checks the library of the build that made this test: `target/release` on the host,
//! `target/rdma/release` (built with `--features gallocy/rdma`) in the Soft-RoCE guest.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// The constructors a library may have, by (demangled) name.
fn allowed(name: &str) -> bool {
    // gcc's crtbegin.o (registers the frame tables); gallocy's own (alloc-shim/src/lib.rs);
    // Rust's std, which records argc/argv for std::env::args (a static store, nothing more).
    name == "frame_dummy" || name == "gallocy::constructor" || name.contains("ARGV_INIT_ARRAY")
}

/// Demangles the Rust names we look for, without a demangler: `_ZN7gallocy11constructor17h..E`
/// becomes `gallocy::constructor`.
fn readable(mangled: &str) -> String {
    let Some(mut rest) = mangled.strip_prefix("_ZN") else { return mangled.to_string() };
    let mut parts = Vec::new();
    while let Some(len_end) = rest.find(|c: char| !c.is_ascii_digit()) {
        if len_end == 0 {
            break;
        }
        let Ok(n) = rest[..len_end].parse::<usize>() else { break };
        let part = &rest[len_end..len_end + n.min(rest.len() - len_end)];
        rest = &rest[len_end + part.len()..];
        // The trailing hash (`h` + 16 hex digits) is not part of the path.
        if part.len() == 17 && part.starts_with('h') && part[1..].chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        parts.push(part.to_string());
    }
    parts.join("::")
}

/// The functions `.init_array` points at: each slot's relocation gives the address, the symbol
/// table the name.
fn constructors(data: &[u8]) -> Vec<String> {
    let file = object::File::parse(data).expect("libgallocy.so is an ELF file");
    let Some(init) = file.section_by_name(".init_array") else { return Vec::new() };
    let (start, end) = (init.address(), init.address() + init.size());
    let mut targets = Vec::new();
    for (offset, reloc) in file.dynamic_relocations().expect("a shared library has dynamic relocations") {
        if !(start..end).contains(&offset) {
            continue;
        }
        let addr = match reloc.target() {
            // R_X86_64_RELATIVE: the addend is the function's address.
            RelocationTarget::Absolute => reloc.addend() as u64,
            RelocationTarget::Symbol(i) => file.symbol_by_index(i).map(|s| s.address()).unwrap_or(0),
            _ => 0,
        };
        targets.push(addr);
    }
    assert_eq!(
        targets.len() as u64,
        init.size() / 8,
        "every .init_array slot of a shared library is filled by a dynamic relocation"
    );
    targets
        .into_iter()
        .map(|addr| {
            file.symbols()
                .find(|s| s.address() == addr && s.kind() == object::SymbolKind::Text && s.name().is_ok())
                .map(|s| readable(s.name().expect("checked")))
                .unwrap_or_else(|| format!("<no symbol at {addr:#x}>"))
        })
        .collect()
}

#[test]
fn libgallocy_has_no_constructor_but_its_own() {
    let lib = gallocy_testkit::libgallocy();
    let data = std::fs::read(&lib).unwrap_or_else(|e| panic!("reading {}: {e}", lib.display()));
    let file = object::File::parse(&*data).expect("ELF");
    let rdma = file.symbols().chain(file.dynamic_symbols()).any(|s| s.name() == Ok("rdma_mummy_load_ibverbs"));
    assert!(file.section_by_name(".preinit_array").is_none(), "a shared library has no .preinit_array");
    assert!(file.section_by_name(".ctors").is_none(), "{}: old-style .ctors section", lib.display());
    let ctors = constructors(&data);
    eprintln!("{} ({} build): .init_array = {ctors:?}", lib.display(), if rdma { "RDMA" } else { "TCP-only" });
    let foreign: Vec<&String> = ctors.iter().filter(|c| !allowed(c)).collect();
    assert!(
        foreign.is_empty(),
        "{}: constructors besides gallocy's own: {foreign:?} (all: {ctors:?}); a constructor in a preloaded \
         malloc runs under the loader's lock before main, and must not load libraries or allocate",
        lib.display()
    );
    assert!(ctors.iter().any(|c| c == "gallocy::constructor"), "gallocy's constructor is missing: {ctors:?}");
}

#[test]
fn the_rdma_build_loads_verbs_only_when_asked() {
    let lib = gallocy_testkit::libgallocy();
    let data = std::fs::read(&lib).unwrap_or_else(|e| panic!("reading {}: {e}", lib.display()));
    let file = object::File::parse(&*data).expect("ELF");
    let names: Vec<String> = file.symbols().filter_map(|s| s.name().ok().map(str::to_string)).collect();
    if !names.iter().any(|n| n == "rdma_mummy_load_ibverbs") {
        eprintln!("SKIPPED the_rdma_build_loads_verbs_only_when_asked: {} is a TCP-only build", lib.display());
        return;
    }
    // Upstream's constructors would be local text symbols of these names.
    for ctor in ["ibverbs_init", "rdmacm_init", "mlx5_init", "ibumad_init"] {
        assert!(
            !names.iter().any(|n| n == ctor),
            "{}: upstream rdma-mummy-sys constructor {ctor} is linked in",
            lib.display()
        );
    }
    // The verbs entry points are there, behind the explicit loader.
    assert!(names.iter().any(|n| n == "ibv_get_device_list"), "the RDMA build has the verbs shim");
}
