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
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT
rss() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
wait_port() {
    local i
    for i in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1 after 30 s" >&2
    exit 1
}

for i in 0 1; do
    TOKIO_WORKER_THREADS=1 taskset -c 0 "$SY" stub-upstream --listen "127.0.0.1:$((BASE + i))" \
        --name "stub$i" >"$DIR/stub$i.log" 2>&1 &
    PIDS+=($!)
done
head -c 32 /dev/urandom | base64 >"$DIR/admin.token"
cat >"$DIR/switchyard.toml" <<TOML
[listen]
proxy = "127.0.0.1:$((BASE + 2))"
admin = "127.0.0.1:$((BASE + 3))"

[pools]
blue = ["http://127.0.0.1:$BASE"]
green = ["http://127.0.0.1:$((BASE + 1))"]

[routing]
state_file = "$DIR/route.json"

[admin]
token_file = "$DIR/admin.token"
TOML
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$SY" run --config "$DIR/switchyard.toml" \
    >"$DIR/switchyard.log" 2>&1 &
SY_PID=$!
PIDS+=($SY_PID)
wait_port $((BASE + 2))
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
