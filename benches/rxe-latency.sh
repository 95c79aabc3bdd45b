#!/usr/bin/env bash
# rxe-latency.sh: gallocy's remote read-fault latency next to `ib_read_lat -s 4096`, both measured
# in ONE run of a Soft-RoCE (rxe0) QEMU guest (soft-roce-setup/in-guest.sh).
#
#   benches/rxe-latency.sh [--transport rdma|tcp] [--iters N] [--procs N] [--target-dir DIR]
#                          [--ib-iters N] [--mtu M] [--timeout S] [--build]
#
# On the host: finds (or, when missing or with --build, builds) DIR/release/gallocy-bench, with the
# `rdma` feature when the transport is rdma; then boots the guest once and, in it:
#   1. ib_read_lat -d rxe0 -x 1 -s 4096 -n IB_ITERS, server and client on rxe0 (10.9.0.1);
#   2. GALLOCY_TRANSPORT=T gallocy-bench fault --procs P --iters N
#        --cases read_home_owner,read_third_owner
#   2b. the same under GALLOCY_CONSISTENCY=release with --procs 2 --cases read_refetch: a read of a
#        page whose copy the last barrier dropped (over RDMA: a one-sided READ of the home's master,
#        no message);
#   3. GALLOCY_TRANSPORT=T gallocy-bench preload-fault --iters N: the same read fault (the page's
#      home owns it) taken by a 2-rank program under LD_PRELOAD=libgallocy.so (DIR/release/) that
#      uses the C API
# Back on the host it parses the outputs and prints a table (ib_read_lat t_typical, which is
# perftest's median, and its 99th percentile; gallocy's read-fault p50/p99, linked and preloaded;
# the ratios fault_read_p50 / ib_read_lat_typical) and, as the last line of stdout, one JSON object.
# The guest is TCG-emulated: absolute numbers are meaningless, only the ratio means anything.
#
# Defaults: --transport rdma, --iters 1000, --procs 3 (the third-owner case needs 3),
# --ib-iters 1000, --timeout 1200 (whole guest run, seconds), --mtu: in-guest.sh's (1500),
# --target-dir: target/rdma for rdma, target for tcp (relative to the repository root).
# GALLOCY_* variables of the caller (e.g. GALLOCY_SPIN_US) reach the benchmark in the guest.
# Raw outputs are kept in target/rxe-latency/<date-time>/ (ib_read_lat.{client,server}.txt,
# gallocy-bench.txt, preload-fault.txt, guest.txt).
#
# Exit status: 0 on success; 2 for bad usage; 1 when any step fails (the message says which).
#
# Internal: `rxe-latency.sh --in-guest ...` is the part that runs inside the guest.
set -euo pipefail

PROG=rxe-latency
say() { echo "$PROG: $*" >&2; }
die() { say "error: $*"; exit 1; }
USAGE="usage: benches/rxe-latency.sh [--transport rdma|tcp] [--iters N] [--procs N] [--target-dir DIR]
                              [--ib-iters N] [--mtu M] [--timeout S] [--build]"
usage_error() { say "$*"; echo "$USAGE" >&2; exit 2; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]] && (( 10#$1 > 0 )); }

CASES=read_home_owner,read_third_owner
IB_PORT=18515

# --------------------------------------------------------------------------------------------
# Inside the guest.
# --------------------------------------------------------------------------------------------

# Is something listening on TCP port $1 (IPv4 or IPv6)? Reads /proc, needs no tools.
listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == p && $4 == "0A" { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# One ib_read_lat server and client pair in the guest; the client's output goes to
# LOGDIR/ib_read_lat.client.txt. Dies when either fails.
ib_read_lat_once() {
    local ib_iters=$1 logdir=$2
    ib_read_lat -d rxe0 -x 1 -s 4096 -n "$ib_iters" -p "$IB_PORT" >"$logdir/ib_read_lat.server.txt" 2>&1 &
    local server=$! waited=0
    until listening "$IB_PORT"; do
        if ! kill -0 "$server" 2>/dev/null; then
            cat "$logdir/ib_read_lat.server.txt" >&2 || true
            die "ib_read_lat server exited before listening on port $IB_PORT (output above)"
        fi
        ((waited++ < 300)) || { kill "$server" 2>/dev/null || true; die "ib_read_lat server not listening on port $IB_PORT after 30 s"; }
        sleep 0.1
    done
    local rc=0
    timeout 300 ib_read_lat -d rxe0 -x 1 -s 4096 -n "$ib_iters" -p "$IB_PORT" 10.9.0.1 \
        >"$logdir/ib_read_lat.client.txt" 2>&1 || rc=$?
    cat "$logdir/ib_read_lat.client.txt"
    # The server finishes right after the client; give it 30 s, then stop it (by its pid).
    local i
    for ((i = 0; i < 300; i++)); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$server" 2>/dev/null; then
        kill "$server" 2>/dev/null || true
        say "warning: ib_read_lat server still running 30 s after the client; stopped it"
    fi
    local src=0
    wait "$server" || src=$?
    if ((rc != 0)); then
        say "ib_read_lat server output:"; cat "$logdir/ib_read_lat.server.txt" >&2 || true
        ((rc != 124)) || die "ib_read_lat client timed out after 300 s"
        die "ib_read_lat client failed (exit $rc, output above)"
    fi
    ((src == 0)) || say "warning: ib_read_lat server exited with $src (the client's results are used)"
}

in_guest() {
    local transport="" iters="" procs="" ib_iters="" bin="" logdir="" bench_timeout=""
    while (($#)); do
        case $1 in
            --transport) transport=$2 ;;
            --iters) iters=$2 ;;
            --procs) procs=$2 ;;
            --ib-iters) ib_iters=$2 ;;
            --bin) bin=$2 ;;
            --log-dir) logdir=$2 ;;
            --bench-timeout) bench_timeout=$2 ;;
            *) die "in-guest: unknown argument $1" ;;
        esac
        shift 2
    done
    [[ -x $bin ]] || die "in the guest: $bin is not an executable"
    [[ -d $logdir ]] || die "in the guest: log directory $logdir is missing"
    command -v ib_read_lat >/dev/null || die "in the guest: ib_read_lat not found (apt-get install perftest on the host)"

    local t0 t1 t2 t3
    t0=$(date +%s)
    say "step 1/3: ib_read_lat -d rxe0 -x 1 -s 4096 -n $ib_iters (server and client on rxe0, 10.9.0.1)"
    # perftest times with the CPU's cycle counter, whose rate it estimates first; under emulation
    # that estimate fails now and then ("Correlation coefficient r^2 < 0.9") and every time reads
    # "inf". Such a run is repeated, up to 3 times.
    local attempt
    for attempt in 1 2 3; do
        ib_read_lat_once "$ib_iters" "$logdir"
        grep -Eq '^ *4096 +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ ' "$logdir/ib_read_lat.client.txt" && break
        ((attempt < 3)) || die "ib_read_lat gave no finite times in 3 runs (perftest's CPU clock estimate failed; output above)"
        say "ib_read_lat gave no finite times (perftest's CPU clock estimate failed): running it again"
    done

    t1=$(date +%s)
    say "step 2/3: GALLOCY_TRANSPORT=$transport gallocy-bench fault --procs $procs --iters $iters --cases $CASES"
    rc=0
    env GALLOCY_TRANSPORT="$transport" "$bin" fault --procs "$procs" --iters "$iters" --cases "$CASES" \
        --timeout-s "$bench_timeout" 2>&1 | tee "$logdir/gallocy-bench.txt" || rc=$?
    ((rc == 0)) || die "gallocy-bench fault over $transport failed (exit $rc)"
    say "step 2b/3: GALLOCY_CONSISTENCY=release GALLOCY_TRANSPORT=$transport gallocy-bench fault --procs 2 --iters $iters --cases read_refetch"
    rc=0
    env GALLOCY_TRANSPORT="$transport" GALLOCY_CONSISTENCY=release "$bin" fault --procs 2 --iters "$iters" \
        --cases read_refetch --timeout-s "$bench_timeout" 2>&1 | tee "$logdir/gallocy-bench-release.txt" || rc=$?
    ((rc == 0)) || die "gallocy-bench fault under release consistency over $transport failed (exit $rc)"
    t2=$(date +%s)
    local lib
    lib=$(dirname "$bin")/libgallocy.so
    say "step 3/3: GALLOCY_TRANSPORT=$transport gallocy-bench preload-fault --iters $iters --lib $lib"
    rc=0
    env GALLOCY_TRANSPORT="$transport" "$bin" preload-fault --iters "$iters" --lib "$lib" \
        --timeout-s "$bench_timeout" 2>&1 | tee "$logdir/preload-fault.txt" || rc=$?
    ((rc == 0)) || die "gallocy-bench preload-fault over $transport failed (exit $rc)"
    t3=$(date +%s)
    echo "ib_read_lat_seconds=$((t1 - t0)) fault_seconds=$((t2 - t1)) preload_fault_seconds=$((t3 - t2))" >"$logdir/steps.txt"
    say "in-guest steps done: ib_read_lat $((t1 - t0)) s, gallocy-bench fault $((t2 - t1)) s, preload-fault $((t3 - t2)) s"
}

if [[ ${1:-} == --in-guest ]]; then
    shift
    in_guest "$@"
    exit 0
fi

# --------------------------------------------------------------------------------------------
# Parsing (host).
# --------------------------------------------------------------------------------------------

# perftest's result table -> "name=value" lines (typical, p99, p999, avg, min, max, stdev,
# iters, bytes). Columns are found by header name, so reordering or extra columns do not matter;
# the header's "99% percentile[usec]" (two words) becomes one column.
parse_perftest() {
    awk '
        function num(s) { return s ~ /^[0-9]+(\.[0-9]+)?$/ }
        !have && /t_typical/ {
            n = 0
            for (i = 1; i <= NF; i++) {
                t = $i
                if (t ~ /^[0-9.]+%$/ && (i + 1) <= NF && $(i + 1) ~ /^percentile/) { t = t "percentile"; i++ }
                col[++n] = t
            }
            have = 1; next
        }
        have && !done && NF >= n && num($1) {
            for (i = 1; i <= n; i++) {
                c = col[i]; v = $i
                if (!num(v)) continue
                if (c == "#bytes") print "bytes=" v
                else if (c == "#iterations") print "iters=" v
                else if (c ~ /^t_typical/) print "typical=" v
                else if (c ~ /^t_avg/) print "avg=" v
                else if (c ~ /^t_min/) print "min=" v
                else if (c ~ /^t_max/) print "max=" v
                else if (c ~ /^t_stdev/) print "stdev=" v
                else if (c == "99%percentile") print "p99=" v
                else if (c == "99.9%percentile") print "p999=" v
            }
            done = 1
        }
        END { exit !done }' "$1"
}

# Value of "key=value" in a block of lines ($2), or empty.
kv() { sed -n "s/^$1=//p" <<<"$2" | head -n1; }

# Numeric value of a flat JSON key in one line of JSON; empty when missing or null.
json_num() {
    grep -o "\"$1\":[-+0-9.eE]*" <<<"$2" | head -n1 | sed 's/^[^:]*://' || true
}

# a / b with 3 decimals; empty if b is 0 or either is empty.
ratio() {
    [[ -n $1 && -n $2 ]] || return 0
    awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.3f", a / b }'
}

# JSON value: the number, or null when empty.
jn() { if [[ -n $1 ]]; then printf '%s' "$1"; else printf null; fi; }

# --------------------------------------------------------------------------------------------
# Host.
# --------------------------------------------------------------------------------------------

TRANSPORT=rdma ITERS=1000 PROCS=3 IB_ITERS=1000 TIMEOUT=1200 MTU="" TARGET_DIR="" BUILD=0
while (($#)); do
    opt=$1 val=""
    case $opt in
        --transport=* | --iters=* | --procs=* | --ib-iters=* | --timeout=* | --mtu=* | --target-dir=*)
            val=${opt#*=} opt=${opt%%=*} ;;
        --transport | --iters | --procs | --ib-iters | --timeout | --mtu | --target-dir)
            (($# >= 2)) || usage_error "$opt needs a value"
            val=$2; shift ;;
    esac
    case $opt in
        --transport) TRANSPORT=$val ;;
        --iters) ITERS=$val ;;
        --procs) PROCS=$val ;;
        --ib-iters) IB_ITERS=$val ;;
        --timeout) TIMEOUT=$val ;;
        --mtu) MTU=$val ;;
        --target-dir) TARGET_DIR=$val ;;
        --build) BUILD=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown argument $opt" ;;
    esac
    shift
done
case $TRANSPORT in rdma | tcp) ;; *) usage_error "--transport must be rdma or tcp, not '$TRANSPORT'" ;; esac
is_uint "$ITERS" || usage_error "--iters must be a positive integer"
is_uint "$IB_ITERS" || usage_error "--ib-iters must be a positive integer"
is_uint "$TIMEOUT" || usage_error "--timeout must be a positive number of seconds"
((TIMEOUT >= 120)) || usage_error "--timeout must be at least 120 s (the guest alone needs ~10 s)"
{ is_uint "$PROCS" && ((PROCS >= 2 && PROCS <= 64)); } || usage_error "--procs must be 2..64 (3 or more for the third-owner case)"
[[ -z $MTU ]] || is_uint "$MTU" || usage_error "--mtu must be a positive integer"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SELF=benches/rxe-latency.sh
IN_GUEST=soft-roce-setup/in-guest.sh
[[ -x $IN_GUEST ]] || die "$ROOT/$IN_GUEST not found"

if [[ -z $TARGET_DIR ]]; then
    if [[ $TRANSPORT == rdma ]]; then TARGET_DIR=target/rdma; else TARGET_DIR=target; fi
fi
TARGET_DIR=$(realpath -m -- "$TARGET_DIR")
# The guest sees this checkout (in-guest.sh shares the working directory at the same path, even
# under /tmp), but has its own /tmp, /run, /var/tmp and /dev/shm otherwise.
case $TARGET_DIR/ in
    "$ROOT"/*) ;;
    /tmp/* | /run/* | /var/tmp/* | /dev/shm/*)
        die "--target-dir $TARGET_DIR: the guest has its own /tmp, /run, /var/tmp and /dev/shm and would not see the binaries there; use another directory" ;;
esac
BIN=$TARGET_DIR/release/gallocy-bench
mkdir -p "$TARGET_DIR" || die "cannot create $TARGET_DIR"

command -v ib_read_lat >/dev/null || die "ib_read_lat not found: apt-get install perftest (the guest uses the host's)"

FEATURES=()
[[ $TRANSPORT == rdma ]] && FEATURES=(--features gallocy/rdma)
LIB=$TARGET_DIR/release/libgallocy.so
if ((BUILD)) || [[ ! -x $BIN || ! -f $LIB ]]; then
    if ((BUILD)); then say "building gallocy-bench and libgallocy.so into $TARGET_DIR"; else say "$BIN or $LIB is missing: building them"; fi
    command -v cargo >/dev/null || die "cargo not found"
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --workspace "${FEATURES[@]}" \
        || die "cargo build --release --workspace ${FEATURES[*]} (CARGO_TARGET_DIR=$TARGET_DIR) failed"
    [[ -x $BIN && -f $LIB ]] || die "the build did not produce $BIN and $LIB"
else
    say "using $BIN (built $(date -r "$BIN" '+%F %T'); --build rebuilds it)"
fi
BIN_USAGE=$("$BIN" fault --help 2>&1 || true)
[[ $BIN_USAGE == *--cases* ]] || die "$BIN has no 'fault --cases' option (too old?): rerun with --build"
[[ $("$BIN" preload-fault --help 2>&1 || true) == *--pages* ]] \
    || die "$BIN has no 'preload-fault' subcommand (too old?): rerun with --build"
if [[ $TRANSPORT == rdma ]] && ! grep -q rdma_mummy_load_ibverbs "$LIB"; then
    die "$LIB is built without RDMA: rerun with --build (or build with --features gallocy/rdma)"
fi

LOGDIR=$ROOT/target/rxe-latency/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$LOGDIR"
BENCH_TIMEOUT=$((TIMEOUT - 60))

GUEST_ARGS=(--timeout "$TIMEOUT")
[[ -n $MTU ]] && GUEST_ARGS+=(--mtu "$MTU")
say "one guest run ($IN_GUEST ${GUEST_ARGS[*]}): ib_read_lat, then gallocy-bench fault and preload-fault over $TRANSPORT; logs in ${LOGDIR#"$ROOT"/}"
START=$(date +%s)
rc=0
"$IN_GUEST" "${GUEST_ARGS[@]}" -- bash "$SELF" --in-guest \
    --transport "$TRANSPORT" --iters "$ITERS" --procs "$PROCS" --ib-iters "$IB_ITERS" \
    --bin "$BIN" --log-dir "$LOGDIR" --bench-timeout "$BENCH_TIMEOUT" \
    2>&1 | tee "$LOGDIR/guest.txt" || rc=$?
GUEST_S=$(($(date +%s) - START))
case $rc in
    0) ;;
    124) die "the guest run timed out after $TIMEOUT s (--timeout); logs in $LOGDIR" ;;
    125) die "the guest or its rxe0 setup failed (in-guest.sh exit 125, see above); logs in $LOGDIR" ;;
    *) die "a step in the guest failed (exit $rc, see the message above); logs in $LOGDIR" ;;
esac
say "guest run took $GUEST_S s"

# ib_read_lat
IB=$(parse_perftest "$LOGDIR/ib_read_lat.client.txt") \
    || die "could not find ib_read_lat's result line (t_typical) in $LOGDIR/ib_read_lat.client.txt"
IB_TYP=$(kv typical "$IB") IB_P99=$(kv p99 "$IB") IB_AVG=$(kv avg "$IB") IB_N=$(kv iters "$IB")
[[ -n $IB_TYP ]] || die "ib_read_lat output has no t_typical value ($LOGDIR/ib_read_lat.client.txt)"

# gallocy-bench: its last JSON line.
FJ=$(grep '^{"bench":"fault"' "$LOGDIR/gallocy-bench.txt" | tail -n1 || true)
[[ -n $FJ ]] || die "no JSON result line from gallocy-bench in $LOGDIR/gallocy-bench.txt"
R_P50=$(json_num read_home_owner_p50_us "$FJ") R_P99=$(json_num read_home_owner_p99_us "$FJ")
T_P50=$(json_num read_third_owner_p50_us "$FJ") T_P99=$(json_num read_third_owner_p99_us "$FJ")
FLOOR_P50=$(json_num floor_p50_us "$FJ")
[[ -n $R_P50 ]] || die "gallocy-bench reported no read_home_owner result ($LOGDIR/gallocy-bench.txt)"
RJ=$(grep '^{"bench":"fault"' "$LOGDIR/gallocy-bench-release.txt" | tail -n1 || true)
[[ -n $RJ ]] || die "no JSON result line from gallocy-bench in $LOGDIR/gallocy-bench-release.txt"
RC_P50=$(json_num read_refetch_p50_us "$RJ") RC_P99=$(json_num read_refetch_p99_us "$RJ")
[[ -n $RC_P50 ]] || die "gallocy-bench reported no read_refetch result ($LOGDIR/gallocy-bench-release.txt)"
PJ=$(grep '^{"bench":"preload-fault"' "$LOGDIR/preload-fault.txt" | tail -n1 || true)
[[ -n $PJ ]] || die "no JSON result line from gallocy-bench preload-fault in $LOGDIR/preload-fault.txt"
P_P50=$(json_num read_p50_us "$PJ") P_P99=$(json_num read_p99_us "$PJ")
[[ -n $P_P50 ]] || die "gallocy-bench preload-fault reported no read result ($LOGDIR/preload-fault.txt)"
RATIO=$(ratio "$R_P50" "$IB_TYP")
RATIO_P=$(ratio "$P_P50" "$IB_TYP")
RATIO_T=$(ratio "$T_P50" "$IB_TYP")
RATIO_RC=$(ratio "$RC_P50" "$IB_TYP")
[[ -n $RATIO ]] || die "cannot form the ratio ($R_P50 / $IB_TYP)"
STEPS=$(cat "$LOGDIR/steps.txt" 2>/dev/null || true)
IB_S=$(kv ib_read_lat_seconds "$(tr ' ' '\n' <<<"$STEPS")") F_S=$(kv fault_seconds "$(tr ' ' '\n' <<<"$STEPS")")
PF_S=$(kv preload_fault_seconds "$(tr ' ' '\n' <<<"$STEPS")")

# A table row; numbers with 2 decimals, n/a when missing.
row() {
    local a=${2:-n/a} b=${3:-n/a}
    [[ $a == n/a || $a == *[!0-9.]* ]] || a=$(printf '%.2f' "$a")
    [[ $b == n/a || $b == *[!0-9.]* ]] || b=$(printf '%.2f' "$b")
    printf '%-44s %12s %12s\n' "$1" "$a" "$b"
}
echo
echo "rxe-latency: transport=$TRANSPORT procs=$PROCS iters=$ITERS ib_iters=${IB_N:-$IB_ITERS} mtu=${MTU:-1500} guest=${GUEST_S}s"
echo "(TCG-emulated guest: the absolute numbers mean nothing, only the ratio does)"
row "measurement (µs)" "p50/typical" "p99"
row "ib_read_lat -s 4096 (t_typical = median)" "$IB_TYP" "$IB_P99"
row "gallocy read fault, home is the owner" "$R_P50" "$R_P99"
row "gallocy read fault, third owner" "$T_P50" "$T_P99"
row "gallocy read fault, preloaded program" "$P_P50" "$P_P99"
row "gallocy read fault, release consistency refetch" "$RC_P50" "$RC_P99"
echo "ratio fault_read_p50 / ib_read_lat_typical: $RATIO (third owner: ${RATIO_T:-n/a}; preloaded program: $RATIO_P; release consistency refetch: ${RATIO_RC:-n/a})"
printf '{"bench":"rxe-latency","transport":"%s","procs":%s,"iters":%s,"ib_iters":%s,"mtu":%s,' \
    "$TRANSPORT" "$PROCS" "$ITERS" "$(jn "$IB_N")" "${MTU:-1500}"
printf '"ib_read_lat_typical_us":%s,"ib_read_lat_p99_us":%s,"ib_read_lat_avg_us":%s,' \
    "$(jn "$IB_TYP")" "$(jn "$IB_P99")" "$(jn "$IB_AVG")"
printf '"fault_read_p50_us":%s,"fault_read_p99_us":%s,"fault_read_third_p50_us":%s,"fault_read_third_p99_us":%s,' \
    "$(jn "$R_P50")" "$(jn "$R_P99")" "$(jn "$T_P50")" "$(jn "$T_P99")"
printf '"preload_fault_read_p50_us":%s,"preload_fault_read_p99_us":%s,"ratio_preload":%s,' \
    "$(jn "$P_P50")" "$(jn "$P_P99")" "$(jn "$RATIO_P")"
printf '"release_refetch_p50_us":%s,"release_refetch_p99_us":%s,"ratio_release_refetch":%s,' \
    "$(jn "$RC_P50")" "$(jn "$RC_P99")" "$(jn "$RATIO_RC")"
printf '"tcp_floor_p50_us":%s,"ratio":%s,"ratio_third":%s,"guest_seconds":%s,"ib_read_lat_seconds":%s,"fault_seconds":%s,"preload_fault_seconds":%s}\n' \
    "$(jn "$FLOOR_P50")" "$RATIO" "$(jn "$RATIO_T")" "$GUEST_S" "$(jn "$IB_S")" "$(jn "$F_S")" "$(jn "$PF_S")"
