#!/usr/bin/env bash
# User and system CPU time per proxied HTTP/1.1 request, or per relayed WebSocket frame,
# for Switchyard, nginx and HAProxy in alternating rounds: how much of each proxy's cost is
# its own code and how much the kernel's. Pinned as in run.sh (proxies and the stub origin
# on core 0, the load generator on core 1; one worker each, nginx as one process); times
# from utime and stime in /proc/PID/stat. Beside them, per request or frame: the context
# switches of all the proxy's threads (/proc/PID/task/*/status; involuntary ones are
# preemptions by the origin sharing its core), and the system calls it made (`perf stat -e
# raw_syscalls:sys_enter`, "-" where perf cannot count them).
#
#   benches/load/cpu_split.sh [rounds] [http|ws]     (default 2 http; needs nginx and haproxy, and wrk for http)
#
# http: `wrk -t1 -c64 -d8s` of /v1/status per proxy and round, per request.
# ws: examples/ws_load, 200 streams of 640-byte binary frames every 20 ms to the stub's echo
# for 8 s, per relayed frame (one frame through the proxy in one direction; each echo is two).
#
# SY=path measures that switchyard binary (and ws uses the ws_load example beside it)
# instead of building them; ORIGIN_SY=path runs the stub origins from another binary.
#
# Loopback only; every process it starts is stopped by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${1:-2}
MODE=${2:-http}
if ! [[ $ROUNDS =~ ^[1-9][0-9]*$ && $MODE =~ ^(http|ws)$ ]]; then
    echo "usage: $0 [rounds] [http|ws]" >&2
    exit 2
fi
tools="nginx haproxy"
[[ $MODE == http ]] && tools+=" wrk"
for tool in $tools; do
    command -v $tool >/dev/null || { echo "needs $tool (apt-get install $tools)" >&2; exit 2; }
done
if [[ -z ${SY:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin switchyard --example ws_load)
    SY=${CARGO_TARGET_DIR:-$ROOT/target}/release/switchyard
fi
WS_LOAD=$(dirname "$SY")/examples/ws_load
if [[ $MODE == ws && ! -x $WS_LOAD ]]; then
    echo "no ws_load example beside $SY (cargo build --release --example ws_load)" >&2
    exit 2
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

# load PID PORT: runs the mode's load through the proxy on PORT (process PID, whose system
# calls perf counts for as long as the load runs, where it can) and prints how many requests
# or relayed frames it made.
load() {
    local pid=$1 port=$2
    local -a count=()
    if ((perf_ok)); then count=(perf stat -e raw_syscalls:sys_enter -p "$pid" -o "$DIR/perf.txt" --); fi
    if [[ $MODE == http ]]; then
        "${count[@]}" taskset -c 1 wrk -t1 -c64 -d8s "http://127.0.0.1:$port/v1/status" \
            >"$DIR/load.txt" 2>&1 || true
        awk '/requests in/ { print $1 }' "$DIR/load.txt"
    else
        "${count[@]}" taskset -c 1 timeout 70 "$WS_LOAD" --url "ws://127.0.0.1:$port/v1/agent/converse" \
            --streams 200 --duration 8 >"$DIR/load.txt" 2>&1 || true
        awk '/^streams=/ {
            for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            if (f["errors"] == 0) print f["sent"] + f["received"]
        }' "$DIR/load.txt"
    fi
}

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ { v += $2 } /^nonvoluntary_ctxt/ { n += $2 } END { print v, n }'; }
perf_ok=0
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -o /dev/null -- true 2>/dev/null; then perf_ok=1; fi
unit=$([[ $MODE == http ]] && echo requests || echo frames)
printf '%-6s %-10s %9s %8s %8s %8s %9s %9s %9s\n' round proxy "$unit" "user µs" "sys µs" "total µs" "vol. cs" "invol. cs" syscalls
for round in $(seq "$ROUNDS"); do
    for target in "switchyard $SY_PID $P_SY" "nginx $NGINX_PID $P_NGINX" "haproxy $HAPROXY_PID $P_HAPROXY"; do
        read -r name pid port <<<"$target"
        sleep 3
        rm -f "$DIR/perf.txt"
        read -r u0 s0 < <(cpu "$pid")
        read -r v0 i0 < <(switches "$pid")
        n=$(load "$pid" "$port")
        read -r u1 s1 < <(cpu "$pid")
        read -r v1 i1 < <(switches "$pid")
        calls=$(awk '/sys_enter/ { gsub(",", "", $1); print $1 }' "$DIR/perf.txt" 2>/dev/null || true)
        [[ ${n:-0} -gt 0 ]] || { echo "the load through $name failed:" >&2; cat "$DIR/load.txt" >&2; exit 1; }
        awk -v r="$round" -v name="$name" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$ticks" \
            -v v=$((v1 - v0)) -v i=$((i1 - i0)) -v calls="${calls:--}" 'BEGIN {
            printf "%-6d %-10s %9d %8.2f %8.2f %8.2f %9.3f %9.3f %9s\n", r, name, n, u / t / n * 1e6, s / t / n * 1e6,
                (u + s) / t / n * 1e6, v / n, i / n, calls == "-" ? "-" : sprintf("%.2f", calls / n)
        }'
    done
done
