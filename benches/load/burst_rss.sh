#!/usr/bin/env bash
# Does Switchyard give memory back after a burst? RSS of `switchyard run` before, at the
# peak of, and 10 and 30 s after a burst of WebSocket streams (STREAMS=1000 echo streams of
# examples/ws_load, 640-byte frames every 20 ms, for 10 s), pinned as in run.sh: the stub
# origins and the proxy on core 0, the load generator on core 1.
#
#   benches/load/burst_rss.sh [path to a switchyard binary]   (default: build one)
#
# Loopback only; every process it starts is stopped by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STREAMS=${STREAMS:-1000}
if [[ -n ${1:-} ]]; then
    SY=$1
    WS_LOAD=$(dirname "$SY")/examples/ws_load
else
    (cd "$ROOT" && cargo build --release --quiet --bin switchyard --example ws_load)
    SY=${CARGO_TARGET_DIR:-$ROOT/target}/release/switchyard
    WS_LOAD=$(dirname "$SY")/examples/ws_load
fi
[[ -x $WS_LOAD ]] || { echo "needs $WS_LOAD (cargo build --release --example ws_load)" >&2; exit 2; }
DIR=$(mktemp -d /tmp/switchyard-burst.XXXXXX)
# Below the ephemeral range (32768+), so no outgoing connection holds one of them.
BASE=$((25000 + (RANDOM % 50) * 20))
source "$ROOT/benches/load/common.sh"
rss() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
start_switchyard $BASE
sleep 3
echo "RSS before: $(rss $SY_PID) KiB"
taskset -c 1 timeout 120 "$WS_LOAD" --url "ws://127.0.0.1:$((BASE + 2))/v1/agent/converse" \
    --streams "$STREAMS" --duration 10 >"$DIR/ws_load.txt" 2>&1 &
CLIENT=$!
PIDS+=($CLIENT)
peak=0
while kill -0 "$CLIENT" 2>/dev/null; do
    now=$(rss $SY_PID)
    ((now > peak)) && peak=$now
    sleep 0.5
done
echo "RSS peak: $peak KiB; at the end: $(rss $SY_PID) KiB ($(tail -1 "$DIR/ws_load.txt" | cut -d' ' -f1-5))"
sleep 10
echo "RSS 10 s later: $(rss $SY_PID) KiB"
sleep 20
echo "RSS 30 s later: $(rss $SY_PID) KiB"
