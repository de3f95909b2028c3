#!/usr/bin/env bash
# User and system CPU time per proxied HTTP/1.1 request, for Switchyard, nginx and HAProxy
# in alternating rounds: how much of each proxy's cost is its own code and how much the
# kernel's. Pinned as in run.sh (proxies and the stub origin on core 0, wrk on core 1; one
# worker each, nginx as one process); `wrk -t1 -c64 -d8s` per proxy and round; times from
# utime and stime in /proc/PID/stat.
#
#   benches/load/cpu_split.sh [rounds]        (default 2; needs nginx, haproxy and wrk)
#
# SY=path measures that switchyard binary instead of building one; ORIGIN_SY=path runs the
# stub origins from another binary.
#
# Loopback only; every process it starts is stopped by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${1:-2}
for tool in nginx haproxy wrk; do
    command -v $tool >/dev/null || { echo "needs $tool (apt-get install nginx haproxy wrk)" >&2; exit 2; }
done
if [[ -z ${SY:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin switchyard)
    SY=${CARGO_TARGET_DIR:-$ROOT/target}/release/switchyard
fi
DIR=$(mktemp -d /tmp/switchyard-cpu-split.XXXXXX)
# Below the ephemeral range (32768+), so no outgoing connection holds one of them.
BASE=$((26000 + (RANDOM % 40) * 20))
source "$ROOT/benches/load/common.sh"
set_ports $BASE
source "$ROOT/benches/load/configs.sh"
start_switchyard $BASE
mkdir -p "$DIR/nginx/tmp"
nginx_conf "$DIR/nginx" off >"$DIR/nginx.conf"
taskset -c 0 nginx -c "$DIR/nginx.conf" -p "$DIR/nginx" >"$DIR/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=($NGINX_PID)
haproxy_conf >"$DIR/haproxy.cfg"
taskset -c 0 haproxy -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)
for port in $P_NGINX $P_HAPROXY; do wait_port $port; done

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
printf '%-6s %-10s %9s %14s %14s %14s\n' round proxy requests "user µs/req" "system µs/req" "total µs/req"
for round in $(seq "$ROUNDS"); do
    for target in "switchyard $SY_PID $P_SY" "nginx $NGINX_PID $P_NGINX" "haproxy $HAPROXY_PID $P_HAPROXY"; do
        read -r name pid port <<<"$target"
        sleep 3
        read -r u0 s0 < <(cpu "$pid")
        taskset -c 1 wrk -t1 -c64 -d8s "http://127.0.0.1:$port/v1/status" >"$DIR/wrk.txt" 2>&1
        read -r u1 s1 < <(cpu "$pid")
        n=$(awk '/requests in/ { print $1 }' "$DIR/wrk.txt")
        [[ ${n:-0} -gt 0 ]] || { echo "wrk completed no requests through $name" >&2; exit 1; }
        awk -v r="$round" -v name="$name" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$ticks" 'BEGIN {
            printf "%-6d %-10s %9d %14.1f %14.1f %14.1f\n", r, name, n, u / t / n * 1e6, s / t / n * 1e6, (u + s) / t / n * 1e6
        }'
    done
done
