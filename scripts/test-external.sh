#!/usr/bin/env bash
# Starts the real binaries (register, two gateways, two chat workers, the
# web page) and runs the Python websockets suite and the headless Chromium
# test against them. Installs what they need (pip, apt, npm) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ART=${ARTIFACT_DIR:-target/test-artifacts}
mkdir -p "$ART"
BIN=target/debug
SECRET=external-test-secret
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- dependencies -----------------------------------------------------------
if ! python3 -c 'import websockets, pytest, yaml' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check websockets pytest pyyaml
fi

# --- cluster ----------------------------------------------------------------
REG=127.0.0.1:$(port); GW1=$(port); GW2=$(port); WEB=$(port); API=$(port)
API_KEY=external-test-api-key-0123456789
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
export RUST_LOG=${RUST_LOG:-warn}
$BIN/gw-register --listen "$REG" --secret "$SECRET" 2>>"$ART/cluster.log" & pids+=($!)
$BIN/gw-gateway --register "$REG" --secret "$SECRET" --listen "ws://127.0.0.1:$GW1" --internal 127.0.0.1:0 --api "127.0.0.1:$API" --api-key "$API_KEY" 2>>"$ART/cluster.log" & pids+=($!)
$BIN/gw-gateway --register "$REG" --secret "$SECRET" --listen "ws://127.0.0.1:$GW2" --internal 127.0.0.1:0 2>>"$ART/cluster.log" & pids+=($!)
$BIN/gw-chat --register "$REG" --secret "$SECRET" --web "127.0.0.1:$WEB" 2>>"$ART/cluster.log" & pids+=($!)
$BIN/gw-chat --register "$REG" --secret "$SECRET" 2>>"$ART/cluster.log" & pids+=($!)

export GW_WS_URLS="ws://127.0.0.1:$GW1,ws://127.0.0.1:$GW2"
export GW_PAGE_URL="http://127.0.0.1:$WEB/"
export GW_API_URL="http://127.0.0.1:$API" GW_API_KEY="$API_KEY"
# Ready when a client on each gateway gets its welcome.
python3 - <<'PY'
import asyncio, os, time, websockets
async def ready(url):
    deadline = time.time() + 30
    while True:
        try:
            async with websockets.connect(url) as ws:
                await asyncio.wait_for(ws.recv(), 2)
                return
        except Exception:
            if time.time() > deadline:
                raise SystemExit(f"cluster not ready at {url}")
            await asyncio.sleep(0.2)
async def main():
    for u in os.environ["GW_WS_URLS"].split(","):
        await ready(u)
asyncio.run(main())
PY
# Let both workers link to both gateways.
sleep 1

echo "-- python suites: chat protocol (websockets), push API and OpenAPI contract (urllib), push backend example"
python3 -m pytest -q -p no:cacheprovider tests/python

echo "-- headless Chromium"
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || true
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "SKIPPED browser test: chromium could not be installed on this machine"
  exit 0
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi
ARTIFACT_DIR="$ART" CHROMIUM=$(command -v chromium) node tests/browser/chat.spec.mjs
