#!/usr/bin/env bash
# 100,000 idle WebSocket connections held on this machine.
#
# One process may hold at most `ulimit -n` sockets (20,000 on the CI
# machine kind, and the hard limit cannot be raised there), so the
# connections are spread over GATEWAYS gateway processes (the cluster
# scales out anyway) and as many gw-bench processes, each connecting to
# every gateway round-robin from 8 source addresses (6 processes picking
# ports independently fill 4 addresses to ~90 % and collide). One chat worker
# serves all gateways. Memory is the summed VmRSS of every gateway and the
# worker while all connections are held.
#
#   scripts/bench-100k.sh            # TOTAL=100000 GATEWAYS=6 by default
#
# Bounded: every process is stopped by PID at the end (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${TOTAL:-100000}
GATEWAYS=${GATEWAYS:-6}
HOLD=${HOLD:-25}
cargo build --release --workspace --bins --quiet
B=target/release
OUT=target/bench
mkdir -p "$OUT"
S=bench-secret-123
REG=127.0.0.1:19336
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

$B/gw-register --listen $REG --secret $S 2>"$OUT/100k-register.log" & pids+=($!)
urls=()
apis=()
servers=()
for i in $(seq 1 "$GATEWAYS"); do
  ws=127.0.0.1:$((19400 + i)); internal=127.0.0.1:$((19500 + i)); api=127.0.0.1:$((19600 + i))
  $B/gw-gateway --register $REG --secret $S --listen "ws://$ws" --internal "$internal" \
    --api "$api" --api-key bench-key-0123456789 --ping-interval-ms 0 2>"$OUT/100k-gateway-$i.log" &
  pids+=($!); servers+=($!)
  urls+=(--url "ws://$ws"); apis+=("$api")
done
$B/gw-chat --register $REG --secret $S 2>"$OUT/100k-chat.log" & pids+=($!); servers+=($!)
sleep 2
before=0; for p in "${servers[@]}"; do before=$((before + $(rss "$p"))); done

per=$(( (TOTAL + GATEWAYS - 1) / GATEWAYS ))
gens=()
for i in $(seq 1 "$GATEWAYS"); do
  $B/gw-bench conns "${urls[@]}" --source-ips 8 --count "$per" --rate 2500 --hold "$HOLD" \
    --duration-limit $((HOLD + 60)) --json "$OUT/100k-gen-$i.json" >"$OUT/100k-gen-$i.txt" 2>&1 &
  pids+=($!); gens+=($!)
done

# Wait until every connection is open (or give up after 60 s).
open=0
for _ in $(seq 1 120); do
  sleep 0.5
  open=0
  for a in "${apis[@]}"; do
    n=$(curl -s "http://$a/metrics" | awk '$1 == "gateworker_gateway_connections" {print $2}')
    open=$((open + ${n:-0}))
  done
  [[ $open -ge $TOTAL ]] && break
done
sleep 2
after=0; for p in "${servers[@]}"; do after=$((after + $(rss "$p"))); done
echo "connections open        $open (target $TOTAL, $GATEWAYS gateways + 1 worker)"
echo "server rss KiB          $before -> $after (all gateways + worker)"
awk -v b="$before" -v a="$after" -v n="$open" 'BEGIN { printf "server KiB/conn         %.2f\n", (a - b) / n }'
awk -v b="$before" -v a="$after" -v n="$open" 'BEGIN { printf "{\"connections\": %d, \"server_kib_per_conn\": %.2f}\n", n, (a - b) / n }' >"$OUT/100k-summary.json"
fail=0
for g in "${gens[@]}"; do wait "$g" || fail=1; done
grep -h "^result" "$OUT"/100k-gen-*.txt | sort | uniq -c
[[ $open -ge $TOTAL && $fail -eq 0 ]] && echo "result                  OK" || { echo "result                  FAILED"; exit 1; }
