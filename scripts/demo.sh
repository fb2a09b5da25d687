#!/usr/bin/env bash
# Runs the chat demo as separate processes: one register, two gateways, two
# chat workers (the first also serves the web page). Ctrl-C stops them all.
#
#   scripts/demo.sh
#
# Ports (override with env): REGISTER_PORT=1236, GW1_PORT=7272, GW2_PORT=7273,
# WEB_PORT=8080. DEMO_SECRET sets the cluster secret.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTER_PORT=${REGISTER_PORT:-1236}
GW1_PORT=${GW1_PORT:-7272}
GW2_PORT=${GW2_PORT:-7273}
WEB_PORT=${WEB_PORT:-8080}
SECRET=${DEMO_SECRET:-demo-secret-change-me}
GW1_INTERNAL=${GW1_INTERNAL:-2900}
GW2_INTERNAL=${GW2_INTERNAL:-2901}
# Stop by itself after this many seconds when set (used by CI to prove the demo runs).
DEMO_SECONDS=${DEMO_SECONDS:-}
# release (default) or debug (CI reuses the test build).
DEMO_PROFILE=${DEMO_PROFILE:-release}

if [ "$DEMO_PROFILE" = release ]; then
  cargo build --release --workspace --bins
else
  cargo build --workspace --bins
fi
BIN=target/$DEMO_PROFILE
REG=127.0.0.1:$REGISTER_PORT

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping demo (pids ${pids[*]})"
  # Workers first so that they drain, then gateways, then the register.
  local i
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    # Workers drain first, then gateways close their clients, then the register.
    [ "$i" -ge 3 ] && sleep 0.5
  done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

$BIN/gw-register --listen "$REG" --secret "$SECRET" & pids+=($!)
$BIN/gw-gateway --register "$REG" --secret "$SECRET" --listen "ws://127.0.0.1:$GW1_PORT" --internal 127.0.0.1:$GW1_INTERNAL & pids+=($!)
$BIN/gw-gateway --register "$REG" --secret "$SECRET" --listen "ws://127.0.0.1:$GW2_PORT" --internal 127.0.0.1:$GW2_INTERNAL & pids+=($!)
$BIN/gw-chat --register "$REG" --secret "$SECRET" --name chat-1 --web "127.0.0.1:$WEB_PORT" & pids+=($!)
$BIN/gw-chat --register "$REG" --secret "$SECRET" --name chat-2 & pids+=($!)

sleep 1
cat <<MSG

  gateworker chat demo is running.

  Web page:   http://127.0.0.1:$WEB_PORT/?gw=ws://127.0.0.1:$GW1_PORT,ws://127.0.0.1:$GW2_PORT
              (open it twice, pick a different gateway in each, join the same room)
  WebSocket:  ws://127.0.0.1:$GW1_PORT   ws://127.0.0.1:$GW2_PORT
  Register:   $REG

  Press Ctrl-C to stop.
MSG

if [ -n "$DEMO_SECONDS" ]; then
  sleep "$DEMO_SECONDS"
else
  wait
fi
