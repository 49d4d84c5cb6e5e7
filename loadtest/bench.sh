#!/usr/bin/env bash
# Runs the benchmark set behind docs/benchmarks.md against fresh loopback servers, one per
# group (so each RSS baseline is clean). Every run is bounded and stops by itself.
# Run from the repository root:
#   loadtest/bench.sh [OUT_DIR] [all|memory|fanout|connections|sale|redis|smoke]
# Build first:
#   CARGO_TARGET_DIR=/work/target-loadtest cargo build --release -j 2 -p livedrop -p livedrop-loadtest
# The node reference peer needs `npm ci` in loadtest/peers/node-ws-room (done here if missing).
#
# Sets:
#   memory       /healthz reference vs memory-engine claims (HTTP and WS, max speed and open loop)
#   fanout       5 000 viewers, publisher at 5, 10, 15, 20, 30, 50, 75, 100, 150 msg/s (the highest
#                rate with p99 < 100 ms, for each server), livedrop vs the node ws peer, with
#                RSS per idle viewer (and 1 000 viewers at 5/20/50 msg/s, for p99 context), and
#                a saturation run (200 msg/s: delivered frames/s when nobody keeps up)
#   connections  as many idle viewers as file descriptors allow, over several source addresses,
#                livedrop vs the node peer, RSS per connection
#   sale         5 000 viewers, stock 1 000, 20 000 HTTP claimers, chat during the rush;
#                then 2 000 group buys of 5 filling at once (+2 extra joiners per group)
#   redis        redis-engine claims + redis-benchmark on claim.lua via EVALSHA (50 clients,
#                unpipelined and -P 16)
#   smoke        every set at a tiny scale (200 viewers, 2 s runs): proves the tool works
#   all          memory fanout connections sale redis
# Every run writes OUT/NAME.txt, OUT/NAME.json and OUT/NAME.html (charts + summary) and the
# tool's stderr to OUT/NAME.err (quoted into NAME.txt when the run fails); each
# NAME.txt ends with the CPU seconds the server (and Redis, in the redis set) and the load
# generator used during the run, so every ratio can be read as CPU per answer too.
set -euo pipefail
OUT=${1:-/tmp/livedrop-bench}
WHICH=${2:-all}
BIN=${CARGO_TARGET_DIR:-target}/release
SERVER_BIN=${SERVER_BIN:-$BIN/livedrop}
SECRET=bench-secret-0123456789abcdef
PORT=18181
PEER_PORT=18182
REDIS_PORT=16389
TARGET=http://127.0.0.1:$PORT
PEER_TARGET=http://127.0.0.1:$PEER_PORT
PEER_DIR=loadtest/peers/node-ws-room
LT=("$BIN/livedrop-loadtest")
mkdir -p "$OUT"
for tool in bc /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench.sh needs $tool (apt-get install bc time)" >&2; exit 2; }
done
# Room for many sockets: both the server and the load tool inherit this.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)

# Scale (the smoke set shrinks these).
FANOUT_VIEWERS=5000
FANOUT_SMALL=1000
FANOUT_RATES="5 10 15 20 30 50 75 100 150"
FANOUT_SMALL_RATES="5 20 50"
FANOUT_SECS=10
SATURATION_RATE=200
CONN_MAX=${CONN_MAX:-100000}
SALE_VIEWERS=5000
SALE_STOCK=1000
SALE_CLAIMERS=20000
CLAIMS_SECS=10
GROUP_BUYS=2000
RB_REQUESTS=200000
if [ "$WHICH" = smoke ] || [ "${SMOKE:-}" = 1 ]; then  # SMOKE=1: any set, tiny
  FANOUT_VIEWERS=200; FANOUT_SMALL=100; FANOUT_RATES="5 20"; FANOUT_SMALL_RATES="5"
  FANOUT_SECS=2
  CONN_MAX=2000; SALE_VIEWERS=200; SALE_STOCK=100; SALE_CLAIMERS=1000; CLAIMS_SECS=2
  GROUP_BUYS=50; RB_REQUESTS=5000
fi

SERVER_PID=
PEER_PID=
REDIS_PID=
stop_pid() { [ -n "$1" ] && kill "$1" 2>/dev/null && wait "$1" 2>/dev/null || true; }
stop_server() { stop_pid "$SERVER_PID"; SERVER_PID=; }
stop_peer() { stop_pid "$PEER_PID"; PEER_PID=; }
stop_all() { stop_server; stop_peer; stop_pid "$REDIS_PID"; REDIS_PID=; }
trap stop_all EXIT

wait_port() { # PORT LOG
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; cat "$2" >&2; exit 1
}

# The load generator's own addresses (127.0.0.1 ..= 127.0.0.20: viewers spread over them) are
# exempt from the per-IP and per-user rate limits and connection caps, where the server has
# them: the benchmark measures the server's capacity, not its abuse limits.
EXEMPT=()
if "$SERVER_BIN" serve --help 2>/dev/null | grep -q -- --limit-exempt; then
  EXEMPT=(--limit-exempt "$(seq -s, -f '127.0.0.%g' 1 20)")
fi

start_server() { # [extra serve flags…]
  stop_server
  "$SERVER_BIN" serve --listen 127.0.0.1:$PORT --jwt-secret "$SECRET" --no-demo "${EXEMPT[@]}" "$@" \
    >"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  wait_port $PORT "$OUT/server.log"
}

start_peer() {
  stop_peer
  if [ ! -d "$PEER_DIR/node_modules" ]; then (cd "$PEER_DIR" && npm ci --silent); fi
  # node itself (not a wrapper shell) gets the pid, so --pid reads the peer's own RSS.
  node "$PEER_DIR/server.js" $PEER_PORT 127.0.0.1 >"$OUT/peer.log" 2>&1 &
  PEER_PID=$!
  wait_port $PEER_PORT "$OUT/peer.log"
}

# CPU seconds (user+sys) a process has used so far.
cpu_s() { # PID
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"
}

run() { # NAME TARGET ARGS…
  local name=$1 target=$2; shift 2
  local target_pid=${PEER_PID:-$SERVER_PID}
  [ "$target" = "$TARGET" ] && target_pid=$SERVER_PID
  local s0 r0; s0=$(cpu_s "$target_pid"); r0=$(cpu_s "$REDIS_PID")
  echo "== $name: livedrop-loadtest $*" | tee "$OUT/$name.txt"
  /usr/bin/time -o "$OUT/$name.time" -f "%U %S" \
    timeout 600 "${LT[@]}" "$@" --target "$target" --jwt-secret "$SECRET" --quiet \
    --json "$OUT/$name.json" --report "$OUT/$name.html" 2>"$OUT/$name.err" | tee -a "$OUT/$name.txt" ||
    { echo "!! $name exited non-zero:"; tail -20 "$OUT/$name.err"; } | tee -a "$OUT/$name.txt"
  local s1 r1; s1=$(cpu_s "$target_pid"); r1=$(cpu_s "$REDIS_PID")
  # The last line: a failed command's first line says how it exited.
  read -r lu ls < <(tail -1 "$OUT/$name.time") || true
  echo "cpu: server $(echo "$s1 - $s0" | bc) s, redis $(echo "$r1 - $r0" | bc) s, load generator $(echo "${lu:-0} + ${ls:-0}" | bc) s" |
    tee -a "$OUT/$name.txt"
}

claims_set() { # PREFIX
  local p=$1 d=$CLAIMS_SECS
  # 50 connections: as many as the redis-benchmark reference's clients (and /healthz's).
  run "$p-http-claims" $TARGET claims --transport http --users 1000 --stock 10000000 \
    --per-user-limit 1000 --concurrency 50 --duration "$d"
  run "$p-http-claims-rate" $TARGET claims --transport http --users 1000 --stock 10000000 \
    --per-user-limit 1000 --concurrency 64 --rate 10000 --duration "$d"
  run "$p-http-soldout" $TARGET claims --transport http --users 10000 --stock 1000 \
    --per-user-limit 1 --concurrency 32 --duration "$d"
  run "$p-ws-claims" $TARGET claims --transport ws --users 256 --stock 10000000 \
    --per-user-limit 1000 --concurrency 256 --pipeline 16 --requests 250000 --duration "$((d * 2))"
  run "$p-ws-claims-rate" $TARGET claims --transport ws --users 256 --stock 10000000 \
    --per-user-limit 1000 --concurrency 256 --rate 10000 --duration "$d"
}

memory_set() {
  start_server
  run mem-healthz $TARGET claims --endpoint healthz --concurrency 50 --duration "$CLAIMS_SECS"
  claims_set mem
  stop_server
}

# Fan-out: a fresh process per run, so RSS per idle viewer is measured from a clean baseline.
fanout_set() {
  local n rate rates
  for n in $FANOUT_VIEWERS $FANOUT_SMALL; do
    rates=$FANOUT_RATES
    [ "$n" = "$FANOUT_SMALL" ] && rates=$FANOUT_SMALL_RATES
    for rate in $rates; do
      start_server
      run "fanout-livedrop-$n-r$rate" $TARGET viewers --viewers "$n" --rate "$rate" \
        --duration "$FANOUT_SECS" --pid "$SERVER_PID"
      stop_server
      start_peer
      run "fanout-node-$n-r$rate" $PEER_TARGET viewers --peer plain --viewers "$n" \
        --rate "$rate" --duration "$FANOUT_SECS" --pid "$PEER_PID"
      stop_peer
    done
  done
  # Saturation: publish faster than anyone can deliver (200 msg/s × 5 000 viewers = 1 M
  # deliveries/s wanted) and count what arrives; a long drain lets queued frames land.
  start_server
  run "fanout-livedrop-$FANOUT_VIEWERS-saturation" $TARGET viewers --viewers "$FANOUT_VIEWERS" \
    --rate "$SATURATION_RATE" --duration "$FANOUT_SECS" --drain 10 --pid "$SERVER_PID"
  stop_server
  start_peer
  run "fanout-node-$FANOUT_VIEWERS-saturation" $PEER_TARGET viewers --peer plain \
    --viewers "$FANOUT_VIEWERS" --rate "$SATURATION_RATE" --duration "$FANOUT_SECS" --drain 10 \
    --pid "$PEER_PID"
  stop_peer
}

# Connections: as many idle viewers as the fd limit allows (both processes hold one fd per
# socket), spread over one source address per 10 000, one message at the end to prove them live.
connections_set() {
  local n=$(( FDS - 2000 ))
  [ "$n" -gt "$CONN_MAX" ] && n=$CONN_MAX
  echo "connections: fd limit $FDS -> $n viewers" | tee "$OUT/connections.txt"
  start_server
  run "connections-livedrop-$n" $TARGET viewers --viewers "$n" --rate 1 --duration 2 \
    --connect-concurrency 256 --pid "$SERVER_PID"
  stop_server
  start_peer
  run "connections-node-$n" $PEER_TARGET viewers --peer plain --viewers "$n" --rate 1 \
    --duration 2 --connect-concurrency 256 --pid "$PEER_PID"
  stop_peer
}

sale_set() {
  start_server
  run "sale-$SALE_VIEWERS-$SALE_STOCK-$SALE_CLAIMERS" $TARGET sale --viewers "$SALE_VIEWERS" \
    --stock "$SALE_STOCK" --claimers "$SALE_CLAIMERS" --http-concurrency 64 --chat-rate 20 \
    --timeout 60
  stop_server
  start_server
  run "groups-${GROUP_BUYS}x5" $TARGET groups --groups "$GROUP_BUYS" --group-size 5 --extra-joiners 2 \
    --concurrency 32 --timeout 60
  stop_server
}

redis_set() {
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  wait_port $REDIS_PORT "$OUT/redis.log"
  start_server --redis-url redis://127.0.0.1:$REDIS_PORT
  claims_set redis
  # Reference: redis-benchmark running the server's own claim script (EVALSHA, a batch of
  # one claim) on a fresh drop, with a fresh user and idempotency key per call.
  local drop sha now exp k c
  drop=$(timeout 60 "${LT[@]}" claims --target "$TARGET" --jwt-secret "$SECRET" --quiet \
    --users 10 --stock 10000000 --per-user-limit 1000 --concurrency 2 --requests 10 |
    head -1 | sed 's/.*drop //')
  sha=$( (printf '#!lua\n'; cat src/store/lua/common.lua src/store/lua/claim.lua) | sha1sum | cut -d' ' -f1)
  now=$(date +%s%3N); exp=$((now + 86400000)); k="ld:{drop:$drop}"
  for c in "-c 50" "-c 50 -P 16" "-c 1"; do
    local tag=${c// /}
    echo "== redis-benchmark claim.lua $c" | tee "$OUT/redis-benchmark-claim$tag.csv"
    # shellcheck disable=SC2086
    timeout 120 redis-benchmark -p $REDIS_PORT $c -n "$RB_REQUESTS" -r 100000000 --csv \
      evalsha "$sha" 7 "$k:meta" "$k:claims" "$k:holds" "$k:users" "$k:idem" "$k:uclaims" \
      "$k:ledger" "$drop" 200 rb__rand_int__ "14:rb__rand_int__:k__rand_int__" 1 "$now" "$exp" | sed 's/^"evalsha[^"]*"/"evalsha claim.lua"/' |
      tee -a "$OUT/redis-benchmark-claim$tag.csv"
    # Proof the script ran (a NOSCRIPT or Lua error would still print a rate): the drop's
    # reserved units grow by about the request count.
    curl -s "$TARGET/api/drops/$drop" | grep -o '"remaining":[0-9]*,"reserved":[0-9]*' |
      tee -a "$OUT/redis-benchmark-claim$tag.csv"
  done
  echo "== redis-benchmark set,get -c 50" | tee "$OUT/redis-benchmark-setget.csv"
  timeout 60 redis-benchmark -p $REDIS_PORT -c 50 -n "$RB_REQUESTS" --csv -t set,get |
    tee -a "$OUT/redis-benchmark-setget.csv"
  stop_server
  stop_pid "$REDIS_PID"; REDIS_PID=
}

smoke_set() {
  start_server
  run smoke-healthz $TARGET claims --endpoint healthz --concurrency 8 --duration 2
  run smoke-http-claims $TARGET claims --transport http --users 200 --stock 100000 \
    --per-user-limit 1000 --concurrency 8 --duration 2
  run smoke-ws-claims $TARGET claims --transport ws --users 32 --stock 100000 \
    --per-user-limit 1000 --concurrency 32 --duration 2
  stop_server
  fanout_set
  connections_set
  sale_set
  if command -v redis-server >/dev/null; then redis_set; fi
}

case "$WHICH" in
  memory) memory_set ;;
  fanout) fanout_set ;;
  connections) connections_set ;;
  sale) sale_set ;;
  redis) redis_set ;;
  smoke) smoke_set ;;
  all) memory_set; fanout_set; connections_set; sale_set; redis_set ;;
  *) echo "unknown set $WHICH" >&2; exit 2 ;;
esac
echo "results in $OUT"
