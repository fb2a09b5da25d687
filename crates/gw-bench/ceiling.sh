#!/usr/bin/env bash
# Measure gw-bench's own ceiling: the generator against `gw-bench serve`
# (a server that does almost nothing), both one-threaded, on loopback.
# Every run is bounded (--duration-limit) and the server stops by itself
# even if this script is killed.
#
#   BIN=path/to/gw-bench RUNS=3 OUT=/tmp/gw-bench-ceiling ./ceiling.sh
set -euo pipefail

BIN=${BIN:-target/release/gw-bench}
PORT=${PORT:-18282}
RUNS=${RUNS:-3}
OUT=${OUT:-/tmp/gw-bench-ceiling}
URL=ws://127.0.0.1:$PORT
mkdir -p "$OUT"

SERVER=
start_server() {
    "$BIN" serve --listen "127.0.0.1:$PORT" --threads 1 --duration-limit 900 >"$OUT/serve.out" 2>&1 &
    SERVER=$!
    for _ in $(seq 50); do
        grep -q listening "$OUT/serve.out" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server did not start" >&2
    exit 2
}
stop_server() {
    if [ -n "$SERVER" ]; then
        kill "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=
    fi
}
trap stop_server EXIT

# run NAME ARGS...: RUNS repetitions, one JSON report and one table each.
run() {
    local name=$1
    shift
    for i in $(seq "$RUNS"); do
        "$BIN" "$@" --url "$URL" --pid "$SERVER" --duration-limit 120 \
            --json "$OUT/$name-$i.json" >"$OUT/$name-$i.txt"
        printf '%-16s run %d: %s | %s | gen cpu %s%%\n' "$name" "$i" \
            "$(grep -E '^(deliveries/s|connects/s)' "$OUT/$name-$i.txt" | tr -s ' ')" \
            "$(grep -E '^(latency ms|connect ms)' "$OUT/$name-$i.txt" | tr -s ' ')" \
            "$(grep -E '^generator cpu' "$OUT/$name-$i.txt" | awk '{print $NF}')"
    done
}

start_server
run fanout-10x100 fanout --rooms 10 --members 100 --senders 2 --messages 200 --window 16
run fanout-1x1000 fanout --rooms 1 --members 1000 --senders 1 --messages 300 --window 8
run echo-100 echo --clients 100 --window 8
run whisper-200 whisper --clients 200 --messages 100 --window 16
stop_server

# A fresh server, so its RSS growth is not hidden by memory it kept from
# the runs above.
start_server
RUNS=1 run conns-10000 conns --count 10000 --rate 2000 --hold 5
stop_server
echo "reports in $OUT"
