#!/usr/bin/env bash
# Pushes a message to every connection of a uid through the gateway's plain
# TCP `text` listener: one JSON line per message, as Yii/Laravel console jobs
# do with GatewayWorker's internal text gateway. Uses only bash.
#
#   examples/push-text/push.sh 127.0.0.1 7273 alice '"your report is ready"'
#
# The gateway must listen with --listen text://127.0.0.1:7273 (keep it on an
# internal address: the chat worker accepts `push` only from local text
# clients). The reply line says how many connections received it.
set -euo pipefail
host=$1 port=$2 uid=$3 text=${4:-'"ping"'}
exec 3<>"/dev/tcp/$host/$port"
read -r welcome <&3            # {"type":"welcome","client_id":...}
printf '{"type":"push","uid":"%s","text":%s}\n' "$uid" "$text" >&3
read -r reply <&3              # {"type":"pushed","uid":...,"delivered":N}
echo "$reply"
exec 3<&-
