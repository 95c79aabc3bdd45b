//! Writes `target/<profile>/pkgconfig/gallocy.pc` for the in-tree library and header, so that
//! `PKG_CONFIG_PATH=target/release/pkgconfig cc prog.c $(pkg-config --cflags --libs gallocy)`
//! works straight after `cargo build --release`. `install.sh` writes one for a system prefix.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out.
    let profile_dir = out.ancestors().nth(3).expect("OUT_DIR is inside target/<profile>").to_path_buf();
    let include = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("include");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets it");
    let pc = format!(
        "libdir={lib}\nincludedir={inc}\n\nName: gallocy\nDescription: distributed shared memory: malloc, shared heap and C API\n\
         Version: {version}\nCflags: -I${{includedir}}\nLibs: -L${{libdir}} -Wl,-rpath,${{libdir}} -lgallocy\n",
        lib = profile_dir.display(),
        inc = include.display(),
    );
    let dir = profile_dir.join("pkgconfig");
    std::fs::create_dir_all(&dir).expect("create pkgconfig dir");
    std::fs::write(dir.join("gallocy.pc"), pc).expect("write gallocy.pc");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=include/gallocy.h");
}
