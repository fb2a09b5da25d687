#!/usr/bin/env bash
# Alternating runs of two builds' daemons under the same generator: the way
# to compare a change on a host whose speed drifts by 10-25 % from one
# hour to the next (docs/benchmarks.md). Each run gets a fresh
# register + gateway + chat worker (GW_THREADS=1 each) of one build; the
# generator is always this checkout's gw-bench. Bounded and loopback-only;
# every daemon is stopped by PID after its run.
#
#   scripts/bench-ab.sh OLD_BIN_DIR NEW_BIN_DIR ROUNDS GW-BENCH-ARGS...
#   scripts/bench-ab.sh ../old/target/release target/release 4 echo --clients 100 --window 8 --messages 2000
#
# Prints one line per run: build, deliveries/s, server CPU %, generator
# CPU %, p99 ms, lost/duplicated/reordered.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 64
fi
OLD=$1 NEW=$2 ROUNDS=$3
shift 3
cargo build --release -p gw-bench --quiet
G=target/release/gw-bench
S=bench-secret-123
REG=127.0.0.1:19236
WS=ws://127.0.0.1:19272
OUT=target/bench/ab
mkdir -p "$OUT"
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
trap stop EXIT
one() {
  local label=$1 bin=$2
  shift 2
  "$bin/gw-register" --listen $REG --secret $S 2>>"$OUT/register.log" & pids+=($!)
  GW_THREADS=1 "$bin/gw-gateway" --register $REG --secret $S --listen $WS --internal 127.0.0.1:19290 --ping-interval-ms 0 2>>"$OUT/gateway.log" & pids+=($!); local gw=$!
  GW_THREADS=1 "$bin/gw-chat" --register $REG --secret $S 2>>"$OUT/chat.log" & pids+=($!); local w=$!
  sleep 1.5
  $G "$@" --url $WS --pid "$gw" --pid "$w" --duration-limit 120 --json "$OUT/run.json" >/dev/null 2>&1 || true
  python3 - "$label" "$OUT/run.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[2]))
print(f"{sys.argv[1]:4} {j['deliveries_per_sec']:>12,.0f}/s  server {j['server_cpu_pct']:5.0f} %  generator {j['generator_cpu_pct']:4.0f} %  "
      f"p99 {j['latency_ms']['p99']:7.2f} ms  lost/dup/reord {j['lost']}/{j['duplicated']}/{j['reordered']}")
PY
  stop
}
for ((r = 1; r <= ROUNDS; r++)); do
  one old "$OLD" "$@"
  one new "$NEW" "$@"
done
