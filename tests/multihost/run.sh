#!/usr/bin/env bash
# Multi-host cluster test on one machine: every role runs on its own "host"
# (a Linux network namespace with its own address), joined by veth pairs to a
# bridge that lives in a dedicated "switch" namespace, so the root namespace
# is never touched and no namespace has a route anywhere but the test subnet.
#
#   host   address        runs
#   reg    10.213.0.10    gw-register --listen 10.213.0.10:1236
#   gwa    10.213.0.21    gw-gateway --internal 0.0.0.0:2900 --advertise 10.213.0.21:2900 --listen ws://0.0.0.0:7272
#   gwb    10.213.0.22    gw-gateway --internal 0.0.0.0:2900 --advertise 10.213.0.22:2900 --listen ws://0.0.0.0:7272
#   wrk    10.213.0.30    gw-chat x2 (--register 10.213.0.10:1236)
#   cli    10.213.0.40    the Python clients (tests/multihost/clients.py)
#
#   sudo tests/multihost/run.sh
#
# Needs root (namespaces). Without it, or where `ip netns add` fails, prints
# `SKIPPED: <reason>` and exits 0. Otherwise prints PASS/FAIL per check, then
# a last line `N passed, M failed`, and exits non-zero on any failure.
#
# Environment: BIN_DIR (default target/debug), ARTIFACT_DIR (default
# target/test-artifacts; daemon logs go to $ARTIFACT_DIR/multihost/*.log),
# GW_MH_TIMEOUT (overall limit in seconds, default 120), RUST_LOG (default
# info). Every run uses namespaces named gwmh-<random>-*, so runs can go in
# parallel (give each its own ARTIFACT_DIR to keep their logs apart).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD

# --- overall time limit: re-run this script under `timeout` ------------------
if [ -z "${GW_MH_UNDER_TIMEOUT:-}" ]; then
  export GW_MH_UNDER_TIMEOUT=1
  exec timeout --kill-after=20 "${GW_MH_TIMEOUT:-120}" bash "$ROOT/tests/multihost/run.sh" "$@"
fi

BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
ART=${ARTIFACT_DIR:-target/test-artifacts}/multihost
export RUST_LOG=${RUST_LOG:-info}
SUBNET_PREFIX=10.213.0
PREFIX_LEN=24
declare -A ADDR=([reg]=$SUBNET_PREFIX.10 [gwa]=$SUBNET_PREFIX.21 [gwb]=$SUBNET_PREFIX.22 [wrk]=$SUBNET_PREFIX.30 [cli]=$SUBNET_PREFIX.40)
HOSTS=(reg gwa gwb wrk cli)
REG_PORT=1236
INTERNAL_PORT=2900
WS_PORT=7272
SECRET=mh-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

passed=0
failed=0
skipped=""
summary_done=""
pass() { passed=$((passed + 1)); echo "PASS: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
step() { echo "-- $*"; }

# --- resources made by this run (cleanup walks exactly these) ----------------
SUFFIX=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
NSP=gwmh-$SUFFIX
SW=$NSP-sw
declare -A NS
for h in "${HOSTS[@]}"; do NS[$h]=$NSP-$h; done
made_ns=()    # namespaces created (veths die with them: each host end lives in its host namespace)
pids=()       # daemon PIDs started (ip netns exec execs the daemon, so $! is the daemon)
pid_names=()

kill_started() {
  local i pid alive
  # Workers first (they drain), then gateways, then the register: reverse start order.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "note: ${pid_names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 5s; sending SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}

cleanup() {
  local rc=$? ns left
  # Output goes where the script's did, even when a signal arrived inside a
  # redirected command; a second Ctrl-C / TERM must not cut the cleanup short.
  exec >&3 2>&4
  trap '' INT TERM
  trap - EXIT
  kill_started
  # Host namespaces first (deleting one destroys the host end of its veth and
  # with it the switch end), the switch namespace last.
  for ((i = ${#made_ns[@]} - 1; i >= 0; i--)); do
    ns=${made_ns[$i]}
    if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then
      echo "warning: processes still in $ns: $(ip netns pids "$ns" | tr '\n' ' ')"
    fi
    timeout 10 ip netns del "$ns" 2>/dev/null || echo "warning: could not delete namespace $ns"
  done
  left=$(ip netns list 2>/dev/null | grep -c "^$NSP-" || true)
  [ "$left" != 0 ] && echo "warning: $left namespace(s) named $NSP-* remain"
  [ -n "${TMPD:-}" ] && rm -rf "$TMPD"
  if [ -n "$skipped" ]; then
    exit 0
  fi
  if [ -z "$summary_done" ]; then
    [ "$rc" != 0 ] && [ "$failed" = 0 ] && fail "test script ended early (exit code $rc)"
    echo "$passed passed, $failed failed"
  fi
  [ "$failed" = 0 ] && [ "$rc" = 0 ] && exit 0
  exit 1
}
on_signal() {
  trap '' INT TERM
  exec >&3 2>&4
  fail "interrupted by SIG$1 (overall limit GW_MH_TIMEOUT=${GW_MH_TIMEOUT:-120}s, or stopped by hand)"
  exit 1
}
exec 3>&1 4>&2  # the script's own stdout/stderr, for the traps
trap cleanup EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

skip() {
  echo "SKIPPED: $*"
  skipped=1
  exit 0
}

# --- can this machine make namespaces? ----------------------------------------
if [ "$(id -u)" != 0 ]; then
  skip "needs root to create network namespaces (running as uid $(id -u))"
fi
if ! command -v ip >/dev/null 2>&1; then
  step "installing iproute2"
  (timeout 90 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 90 apt-get install -y -qq iproute2) >/dev/null 2>&1 || true
  command -v ip >/dev/null 2>&1 || skip "the \`ip\` command (iproute2) is missing and could not be installed"
fi
if ! err=$(timeout 10 ip netns add "$SW" 2>&1); then
  skip "\`ip netns add\` failed: $err"
fi
made_ns+=("$SW")

# --- prerequisites (failures, not skips) ---------------------------------------
for b in gw-register gw-gateway gw-chat; do
  if [ ! -x "$BIN_DIR/$b" ]; then
    fail "binary $BIN_DIR/$b missing (build with: cargo build --workspace --bins)"
    exit 1
  fi
done
if ! python3 -c 'import websockets' 2>/dev/null; then
  step "installing websockets (pip)"
  timeout 90 python3 -m pip install --quiet --disable-pip-version-check websockets >/dev/null 2>&1 || true
  if ! python3 -c 'import websockets' 2>/dev/null; then
    fail "python3 package websockets missing and pip install failed"
    exit 1
  fi
fi
mkdir -p "$ART" || { fail "cannot create $ART"; exit 1; }
rm -f "$ART"/*.log "$ART"/network.txt
TMPD=$(mktemp -d)

# --- the test network ------------------------------------------------------------
# ipx NS ARGS...: `ip -n NS ARGS` bounded in time; logs the command on failure.
ipx() {
  local ns=$1 out
  shift
  if ! out=$(timeout 10 ip -n "$ns" "$@" 2>&1); then
    echo "  ip -n $ns $* -> $out"
    return 1
  fi
}
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

step "network: switch namespace $SW, hosts ${HOSTS[*]} on $SUBNET_PREFIX.0/$PREFIX_LEN"
net_ok=1
in_ns "$SW" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1 || true
ipx "$SW" link set lo up || net_ok=0
ipx "$SW" link add br0 type bridge || net_ok=0
ipx "$SW" link set br0 up || net_ok=0
for h in "${HOSTS[@]}"; do
  ns=${NS[$h]}
  if ! err=$(timeout 10 ip netns add "$ns" 2>&1); then
    echo "  ip netns add $ns -> $err"
    net_ok=0
    continue
  fi
  made_ns+=("$ns")
  # No IPv6 at all: nothing but the IPv4 test subnet on any link.
  in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1 || true
  ipx "$ns" link set lo up || net_ok=0
  # Both veth ends are created inside test namespaces: v-<host> on the switch, eth0 on the host.
  ipx "$SW" link add "v-$h" type veth peer name eth0 netns "$ns" || { net_ok=0; continue; }
  ipx "$SW" link set "v-$h" master br0 || net_ok=0
  ipx "$SW" link set "v-$h" up || net_ok=0
  ipx "$ns" addr add "${ADDR[$h]}/$PREFIX_LEN" dev eth0 || net_ok=0
  ipx "$ns" link set eth0 up || net_ok=0
done
if [ "$net_ok" = 1 ]; then
  pass "test network built: 5 host namespaces + switch namespace with a bridge (suffix $SUFFIX)"
else
  fail "test network could not be built (see the ip errors above)"
  exit 1
fi
{
  for ns in "${made_ns[@]}"; do
    echo "== $ns"
    ip -n "$ns" -br addr
    ip -n "$ns" route
  done
} >"$ART/network.txt" 2>&1

# Isolation: no namespace may route anywhere but the test subnet.
bad_routes=""
for ns in "${made_ns[@]}"; do
  r=$(ip -n "$ns" -4 route show | grep -v "^$SUBNET_PREFIX.0/$PREFIX_LEN " || true)
  [ -n "$r" ] && bad_routes+="$ns: $r; "
done
if [ -z "$bad_routes" ]; then
  pass "network is test-only: every namespace routes only $SUBNET_PREFIX.0/$PREFIX_LEN (no default route)"
else
  fail "unexpected routes: $bad_routes"
  exit 1
fi

# --- daemons ------------------------------------------------------------------------
# start NAME HOST ARGS...: run a daemon in HOST's namespace, log to $ART/NAME.log.
start() {
  local name=$1 host=$2
  shift 2
  ip netns exec "${NS[$host]}" "$@" >"$ART/$name.log" 2>&1 3>&- 4>&- &
  pids+=($!)
  pid_names+=("$name")
  local shown="${1##*/} ${*:2}"
  echo "  started $name on $host (${ADDR[$host]}), pid $!: ${shown//$SECRET/***}"
}
alive() { kill -0 "$1" 2>/dev/null; }

# wait_until DEADLINE PID DESCRIPTION COMMAND...: poll COMMAND every 0.2 s
# until it succeeds, $SECONDS reaches DEADLINE, or process PID (if not "-") is gone.
wait_until() {
  local deadline=$1 pid=$2 what=$3
  shift 3
  while :; do
    "$@" >/dev/null 2>&1 && return 0
    if [ "$pid" != - ] && ! kill -0 "$pid" 2>/dev/null; then
      echo "  gave up waiting for: $what (pid $pid exited)"
      return 1
    fi
    if [ $SECONDS -ge "$deadline" ]; then
      echo "  timed out waiting for: $what"
      return 1
    fi
    sleep 0.2
  done
}
# wait_for SECONDS PID DESCRIPTION COMMAND...
wait_for() { local secs=$1; shift; wait_until $((SECONDS + secs)) "$@"; }
# listening HOST ADDR:PORT: a TCP listener on exactly that local address in HOST.
listening() {
  local out
  out=$(timeout 5 ip netns exec "${NS[$1]}" ss -Htln "sport = :${2##*:}") || return 1
  awk -v a="$2" '$4 == a { f = 1 } END { exit !f }' <<<"$out"
}
gw_listening() { listening "$1" "0.0.0.0:$INTERNAL_PORT" && listening "$1" "0.0.0.0:$WS_PORT"; }
# linked HOST PID PEER: process PID in HOST has an established TCP connection to PEER (ADDR:PORT).
linked() {
  local out
  out=$(timeout 5 ip netns exec "${NS[$1]}" ss -Htnp state established dst "$3") || return 1
  grep -q "pid=$2," <<<"$out"
}

REG=${ADDR[reg]}:$REG_PORT
step "daemons (logs in $ART/)"
start register reg "$BIN_DIR/gw-register" --listen "$REG" --secret "$SECRET"
REG_PID=${pids[-1]}
if wait_for 15 "$REG_PID" "register listening on $REG" listening reg "$REG"; then
  pass "register listens on its host address $REG"
else
  fail "register not listening on $REG (see $ART/register.log)"
  exit 1
fi

for g in gwa gwb; do
  name=gateway-${g#gw}
  start "$name" "$g" "$BIN_DIR/gw-gateway" --register "$REG" --secret "$SECRET" \
    --listen "ws://0.0.0.0:$WS_PORT" --internal "0.0.0.0:$INTERNAL_PORT" --advertise "${ADDR[$g]}:$INTERNAL_PORT"
done
GWA_PID=${pids[-2]}
GWB_PID=${pids[-1]}
for g in gwa gwb; do
  pid=$GWA_PID
  [ "$g" = gwb ] && pid=$GWB_PID
  if wait_for 15 "$pid" "$g listening on 0.0.0.0:$INTERNAL_PORT and 0.0.0.0:$WS_PORT" gw_listening "$g"; then
    pass "gateway $g binds internal 0.0.0.0:$INTERNAL_PORT and ws 0.0.0.0:$WS_PORT"
  else
    fail "gateway $g not listening (see $ART/gateway-${g#gw}.log)"
  fi
  if wait_for 15 "$pid" "$g linked to the register" linked "$g" "$pid" "$REG"; then
    pass "gateway $g (${ADDR[$g]}) is linked to the register at $REG"
  else
    fail "gateway $g has no connection to the register $REG"
  fi
done

start chat-1 wrk "$BIN_DIR/gw-chat" --register "$REG" --secret "$SECRET" --name chat-1
start chat-2 wrk "$BIN_DIR/gw-chat" --register "$REG" --secret "$SECRET" --name chat-2
W1_PID=${pids[-2]}
W2_PID=${pids[-1]}
# The only way a worker can reach a gateway's internal port is the advertised
# address it got from the register: the gateways bind 0.0.0.0, which is no
# address in the worker's namespace. One 20 s budget for all four links.
links_deadline=$((SECONDS + 20))
for w in "$W1_PID:chat-1" "$W2_PID:chat-2"; do
  pid=${w%%:*}
  name=${w#*:}
  for g in gwa gwb; do
    if wait_until "$links_deadline" "$pid" "$name linked to $g" linked wrk "$pid" "${ADDR[$g]}:$INTERNAL_PORT"; then
      pass "worker $name (wrk ${ADDR[wrk]}) dialed gateway $g at its advertised ${ADDR[$g]}:$INTERNAL_PORT"
    else
      fail "worker $name has no link to gateway $g's advertised ${ADDR[$g]}:$INTERNAL_PORT (see $ART/$name.log)"
    fi
  done
done

for i in "${!pids[@]}"; do
  alive "${pids[$i]}" || fail "${pid_names[$i]} (pid ${pids[$i]}) exited early (see $ART/${pid_names[$i]}.log)"
done
if [ "$failed" != 0 ]; then
  echo "cluster did not come up; not running clients"
  exit 1
fi

# --- clients --------------------------------------------------------------------------
GWA_URL=ws://${ADDR[gwa]}:$WS_PORT
GWB_URL=ws://${ADDR[gwb]}:$WS_PORT
# Ready when a client on each gateway gets its welcome (the TCP links above may
# still be finishing their authenticated handshake).
probe() {
  ip netns exec "${NS[cli]}" timeout 5 env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy -u ALL_PROXY -u all_proxy \
    python3 - "$1" <<'PY'
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], open_timeout=2, close_timeout=1,
                                  **({"proxy": None} if int(websockets.__version__.split(".")[0]) >= 15 else {})) as ws:
        await asyncio.wait_for(ws.recv(), 2)
asyncio.run(main())
PY
}
step "clients in namespace cli (${ADDR[cli]}) -> $GWA_URL, $GWB_URL"
welcome_deadline=$((SECONDS + 20))
if wait_until "$welcome_deadline" - "welcome from $GWA_URL" probe "$GWA_URL" &&
  wait_until "$welcome_deadline" - "welcome from $GWB_URL" probe "$GWB_URL"; then
  pass "a client on each gateway gets a welcome from a worker"
else
  fail "no welcome from the gateways within 20 s (see $ART/chat-*.log and gateway-*.log)"
  exit 1
fi
sleep 0.5

out=$TMPD/clients.out
ip netns exec "${NS[cli]}" timeout -k 5 45 env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy -u ALL_PROXY -u all_proxy \
  GWA_URL="$GWA_URL" GWB_URL="$GWB_URL" GW_CLIENTS_TIMEOUT=40 python3 "$ROOT/tests/multihost/clients.py" >"$out" 2>&1
rc=$?
cp "$out" "$ART/clients.log"
while IFS= read -r line; do
  case $line in
    PASS:*) pass "${line#PASS: }" ;;
    FAIL:*) fail "${line#FAIL: }" ;;
    *) echo "  | $line" ;;
  esac
done <"$out"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  fail "client run timed out (45 s)"
elif [ "$rc" != 0 ] && ! grep -q '^FAIL:' "$out"; then
  fail "client run exited with code $rc and no result"
fi

for i in "${!pids[@]}"; do
  alive "${pids[$i]}" || fail "${pid_names[$i]} (pid ${pids[$i]}) died during the test (see $ART/${pid_names[$i]}.log)"
done

# --- done (cleanup runs on EXIT) --------------------------------------------------------
step "stopping daemons, removing namespaces"
kill_started
summary_done=1
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
