#!/usr/bin/env bash
# Installs libgallocy.so, gallocy.h and gallocy.pc under PREFIX (default /usr/local).
# Run `cargo build --release -p gallocy-shim` first.
set -euo pipefail
prefix=${1:-/usr/local}
here=$(cd "$(dirname "$0")" && pwd)
lib="$here/../target/release/libgallocy.so"
[ -f "$lib" ] || { echo "install.sh: $lib not found: run cargo build --release -p gallocy-shim" >&2; exit 1; }
install -D -m 0755 "$lib" "$prefix/lib/libgallocy.so"
install -D -m 0644 "$here/include/gallocy.h" "$prefix/include/gallocy.h"
mkdir -p "$prefix/lib/pkgconfig"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n1)
cat > "$prefix/lib/pkgconfig/gallocy.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: gallocy
Description: distributed shared memory: malloc, shared heap and C API
Version: ${version:-0.1.0}
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lgallocy
PC
echo "installed libgallocy.so, gallocy.h and gallocy.pc under $prefix"
