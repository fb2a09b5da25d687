#!/usr/bin/env bash
# Runs the issue-5 scenarios with gw-bench against a release cluster of
# 1 register + 1 gateway + 1 chat worker on loopback, one-threaded
# generator. Every run is bounded; the cluster is stopped by PID at the end.
#
#   scripts/bench.sh            # figures as tables; JSON in target/bench/
#   scripts/bench.sh echo       # only the scenarios whose name matches
#   RUNS=3 scripts/bench.sh     # each scenario 3 times; medians in summary.json
#   GWT= WT= scripts/bench.sh   # gateway / worker with one thread per core
#
# The gateway and the worker run with one runtime thread each by default
# (GWT / WT set GW_THREADS): on this 2-core box they share the cores with
# the generator, and one thread per process avoids cross-thread wake-ups
# that cost more than they parallelise (docs/benchmarks.md has both).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
B=target/release
OUT=target/bench
mkdir -p "$OUT"
S=bench-secret-123
REG=127.0.0.1:19236
WS=ws://127.0.0.1:19272
GWT=${GWT-1}
WT=${WT-1}
RUNS=${RUNS:-1}
pids=()
stop_cluster() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
trap stop_cluster EXIT
# A fresh cluster for every run: no state (allocator high-water marks,
# sockets in TIME_WAIT, grown tables) carries from one figure to the next.
start_cluster() {
  $B/gw-register --listen $REG --secret $S 2>>"$OUT/register.log" & pids+=($!)
  GW_THREADS=$GWT $B/gw-gateway --register $REG --secret $S --listen $WS --internal 127.0.0.1:19290 --ping-interval-ms 0 2>>"$OUT/gateway.log" & pids+=($!); GW=$!
  GW_THREADS=$WT $B/gw-chat --register $REG --secret $S 2>>"$OUT/chat.log" & pids+=($!); W=$!
  sleep 1.5
}
ONLY=${1:-}
run() {
  local name=$1; shift
  if [[ -n "$ONLY" && "$name" != *"$ONLY"* ]]; then return 0; fi
  local r
  for ((r = 1; r <= RUNS; r++)); do
    start_cluster
    echo "== $name (run $r/$RUNS, GW_THREADS gateway=${GWT:-cores} worker=${WT:-cores}): gw-bench $*"
    $B/gw-bench "$@" --url $WS --pid $GW --pid $W --duration-limit 120 --json "$OUT/$name.r$r.json" 2>&1 \
      | grep -E "deliveries/s|connects|latency|connect ms|KiB|lost|duplicated|reordered|cpu|result" || true
    stop_cluster
  done
}
run conns-10k      conns --count 10000 --rate 5000 --hold 3
run fanout-10x100  fanout --rooms 10 --members 100 --senders 2 --messages 200 --window 16
run fanout-1x1000  fanout --rooms 1 --members 1000 --senders 1 --messages 300 --window 8
run fanout-light   fanout --rooms 10 --members 100 --senders 1 --messages 100 --window 1
run echo-100       echo --clients 100 --window 8 --messages 2000
run echo-light     echo --clients 10 --window 1 --messages 2000
run whisper-200    whisper --clients 200 --messages 100 --window 16
# Growth: the same ~1,000 members split into rooms of 10, 100 and 1,000,
# then one room of 10,000; one sender per room, window 8, 1M deliveries
# each (so the 10,000 room gets 100 messages, not a window's worth).
for size in 10 100 1000 10000; do
  rooms=$(( size >= 1000 ? 1 : 1000 / size ))
  run "growth-room-$size" fanout --rooms "$rooms" --members "$size" --senders 1 --messages $((1000000 / (rooms * size))) --window 8
done
python3 scripts/bench_summary.py "$OUT" "$RUNS"
