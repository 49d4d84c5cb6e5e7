#!/usr/bin/env bash
# Runs the benchmark set behind docs/benchmarks.md against fresh loopback servers, one per
# group (so each RSS baseline is clean). Every run is bounded (≤ 30 s) and stops by itself.
# Run from the repository root. Usage: loadtest/bench.sh [OUT_DIR] [memory|redis|all]   (build first:
#   CARGO_TARGET_DIR=/work/target-loadtest cargo build --release -j 2 -p livedrop -p livedrop-loadtest)
set -euo pipefail
OUT=${1:-/tmp/livedrop-bench}
WHICH=${2:-all}
BIN=${CARGO_TARGET_DIR:-target}/release
SECRET=bench-secret-0123456789abcdef
PORT=18181
REDIS_PORT=16389
TARGET=http://127.0.0.1:$PORT
LT=("$BIN/livedrop-loadtest")
mkdir -p "$OUT"
ulimit -n 20000

SERVER_PID=
REDIS_PID=
stop_all() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null || true
  REDIS_PID=
}
trap stop_all EXIT

start_server() { # [extra serve flags…]
  stop_all_server
  "$BIN/livedrop" serve --listen 127.0.0.1:$PORT --jwt-secret "$SECRET" --no-demo "$@" \
    >"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 50); do curl -sf "$TARGET/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server did not start" >&2; cat "$OUT/server.log" >&2; exit 1
}
stop_all_server() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

run() { # NAME ARGS…
  local name=$1; shift
  echo "== $name: livedrop-loadtest $*" | tee "$OUT/$name.txt"
  timeout 120 "${LT[@]}" "$@" --target "$TARGET" --jwt-secret "$SECRET" --quiet \
    --json "$OUT/$name.json" | tee -a "$OUT/$name.txt" ||
    echo "!! $name exited non-zero" | tee -a "$OUT/$name.txt"
}

claims_set() { # PREFIX
  local p=$1
  run "$p-http-claims" claims --transport http --users 1000 --stock 10000000 \
    --per-user-limit 1000 --concurrency 32 --duration 10
  run "$p-http-claims-rate" claims --transport http --users 1000 --stock 10000000 \
    --per-user-limit 1000 --concurrency 64 --rate 10000 --duration 10
  run "$p-http-soldout" claims --transport http --users 10000 --stock 1000 \
    --per-user-limit 1 --concurrency 32 --duration 10
  run "$p-ws-claims" claims --transport ws --users 256 --stock 10000000 \
    --per-user-limit 1000 --concurrency 256 --pipeline 16 --requests 250000 --duration 20
  run "$p-ws-claims-rate" claims --transport ws --users 256 --stock 10000000 \
    --per-user-limit 1000 --concurrency 256 --rate 10000 --duration 10
}

if [ "$WHICH" = memory ] || [ "$WHICH" = all ]; then
  start_server
  run mem-healthz claims --endpoint healthz --concurrency 32 --duration 10
  claims_set mem
  start_server
  run mem-viewers-1000 viewers --viewers 1000 --rate 20 --duration 10 --pid "$SERVER_PID"
  start_server
  run mem-viewers-5000 viewers --viewers 5000 --rate 5 --duration 10 --pid "$SERVER_PID"
  stop_all_server
fi

if [ "$WHICH" = redis ] || [ "$WHICH" = all ]; then
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  sleep 0.5
  start_server --redis-url redis://127.0.0.1:$REDIS_PORT
  claims_set redis
  # Reference: redis-benchmark running the server's own claim script (EVALSHA, no
  # pipelining) on a fresh drop, with a fresh user and idempotency key per call.
  drop=$(timeout 60 "${LT[@]}" claims --target "$TARGET" --jwt-secret "$SECRET" --quiet \
    --users 10 --stock 10000000 --per-user-limit 1000 --concurrency 2 --requests 10 |
    head -1 | sed 's/.*drop //')
  sha=$( (printf '#!lua\n'; cat src/store/lua/common.lua src/store/lua/claim.lua) | sha1sum | cut -d' ' -f1)
  now=$(date +%s%3N); exp=$((now + 86400000)); k="ld:{drop:$drop}"
  for c in 32 1; do
    echo "== redis-benchmark claim.lua -c $c" | tee "$OUT/redis-benchmark-claim-c$c.csv"
    timeout 60 redis-benchmark -p $REDIS_PORT -c $c -n 100000 -r 100000000 --csv \
      evalsha "$sha" 6 "$k:meta" "$k:claims" "$k:holds" "$k:users" \
      "$k:idem:5:rb__rand_int__:k__rand_int__" "$k:ledger" "$drop" rb__rand_int__ 1 \
      "$now" "$exp" 86400000 | sed 's/^"evalsha[^"]*"/"evalsha claim.lua"/' |
      tee -a "$OUT/redis-benchmark-claim-c$c.csv"
  done
  echo "== redis-benchmark set,get -c 32" | tee "$OUT/redis-benchmark-setget.csv"
  timeout 60 redis-benchmark -p $REDIS_PORT -c 32 -n 200000 --csv -t set,get |
    tee -a "$OUT/redis-benchmark-setget.csv"
fi
echo "results in $OUT"
