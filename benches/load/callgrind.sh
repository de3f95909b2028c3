#!/usr/bin/env bash
# Instructions per proxied request (or relayed WebSocket frame), counted by callgrind:
# repeatable to about 1 % whatever else the machine is doing, so it shows changes of a few
# percent that wall-clock runs on a shared 2-core box cannot, and it compares proxies by the
# user-space work they do (system calls are the same for all three: strace -c).
#
#   benches/load/callgrind.sh [h1|h2c|ws] [switchyard|nginx|haproxy]
#
# The proxy runs under valgrind twice, with a LOW and then a HIGH amount of load; the
# difference of the two totals divided by the difference in work is the cost of one request
# (one frame) with start-up and shutdown taken out. It prints that and the functions that
# cost most per unit (self cost).
#   h1, h2c  LOW and HIGH requests from h2load (16 connections; h2c with 10 streams each)
#   ws       WS_STREAMS echo streams from examples/ws_load for WS_LOW and then WS_HIGH
#            seconds (640-byte frames every 20 ms); the unit is a relayed frame, one frame
#            through the proxy in one direction (each echo is two), as in run.sh
# nginx and HAProxy run with run.sh's configurations (configs.sh), as one process.
#
# Environment: LOW=1000 HIGH=6000 WS_STREAMS=20 WS_LOW=5 WS_HIGH=15 TOP=30
# OUT=dir (default: a new temp dir) SY=path (a switchyard binary; default: build one);
# ORIGIN_SY=path runs the stub origins from another binary (default: SY).
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client), and nginx or haproxy to
# measure those. Loopback only; every process it starts is stopped by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODE=${1:-h1}
PROXY=${2:-switchyard}
LOW=${LOW:-1000}
HIGH=${HIGH:-6000}
WS_STREAMS=${WS_STREAMS:-20}
WS_LOW=${WS_LOW:-5}
WS_HIGH=${WS_HIGH:-15}
TOP=${TOP:-30}
OUT=${OUT:-$(mktemp -d /tmp/switchyard-callgrind.XXXXXX)}
mkdir -p "$OUT"
case $MODE in h1 | h2c | ws) ;; *) echo "mode: h1, h2c or ws" >&2; exit 2 ;; esac
case $PROXY in switchyard | nginx | haproxy) ;; *) echo "proxy: switchyard, nginx or haproxy" >&2; exit 2 ;; esac
for tool in valgrind callgrind_annotate h2load; do
    command -v $tool >/dev/null || { echo "needs $tool (apt-get install valgrind nghttp2-client)" >&2; exit 2; }
done
[[ $PROXY == switchyard ]] || command -v "$PROXY" >/dev/null || { echo "needs $PROXY" >&2; exit 2; }
if [[ -z ${SY:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin switchyard --example ws_load)
    SY=${CARGO_TARGET_DIR:-$ROOT/target}/release/switchyard
fi
WS_LOAD=$(dirname "$SY")/examples/ws_load
[[ $MODE != ws || -x $WS_LOAD ]] || { echo "needs $WS_LOAD (cargo build --release --example ws_load)" >&2; exit 2; }

# Below the ephemeral range (32768+), so no outgoing connection holds one of them.
BASE=$((20000 + (RANDOM % 120) * 100))
source "$ROOT/benches/load/common.sh"
set_ports $BASE
source "$ROOT/benches/load/configs.sh"

for i in 0 1; do
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn "${ORIGIN_SY:-$SY}" stub-upstream \
        --listen "127.0.0.1:$((BASE + i))" --name "stub$i" >"$OUT/stub$i.log" 2>&1 &
    PIDS+=($!)
    wait_port $((BASE + i)) 120
done
printf 'callgrind-token' >"$OUT/admin.token"
cat >"$OUT/switchyard.toml" <<EOF
[listen]
proxy = "127.0.0.1:$P_SY"
admin = "127.0.0.1:$((BASE + 3))"

[pools]
blue = ["http://127.0.0.1:$BASE"]
green = ["http://127.0.0.1:$((BASE + 1))"]

[routing]
state_file = "$OUT/route.json"

[admin]
token_file = "$OUT/admin.token"

# Probes would add their own instructions to the count.
[health]
interval = "1h"
EOF
mkdir -p "$OUT/nginx/tmp"
nginx_conf "$OUT/nginx" off >"$OUT/nginx/nginx.conf"
haproxy_conf >"$OUT/haproxy.cfg"

case $PROXY in
switchyard) PORT=$P_SY PORT_H2=$P_SY ;;
nginx) PORT=$P_NGINX PORT_H2=$P_NGINX_H2 ;;
haproxy) PORT=$P_HAPROXY PORT_H2=$P_HAPROXY ;;
esac

# Starts the proxy under callgrind, writing its profile to $1; sets PROXY_PID.
start_proxy() {
    local profile=$1
    local cmd
    case $PROXY in
    switchyard)
        rm -f "$OUT/route.json"
        cmd=("$SY" run --config "$OUT/switchyard.toml")
        ;;
    nginx) cmd=(nginx -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx") ;;
    haproxy) cmd=(haproxy -db -f "$OUT/haproxy.cfg") ;;
    esac
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind \
        --callgrind-out-file="$profile" "${cmd[@]}" >"$OUT/$PROXY.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=($PROXY_PID)
    wait_port $PORT 120
}

# Stops the proxy; callgrind writes the profile as it exits. HAProxy's soft stop (SIGINT,
# SIGUSR1) waits for its kept connections; SIGTERM ends it at once.
stop_proxy() {
    local signal=INT
    [[ $PROXY == haproxy ]] && signal=TERM
    kill -$signal "$PROXY_PID"
    wait "$PROXY_PID" || true
}

# Runs $1 requests (h1, h2c) through the proxy under callgrind; the profile goes to $2.
# Sets COUNTED to the requests. (Not printed: in a $(...) subshell the proxy's PID would
# not reach PIDS, and a failed run would leave it running.)
count_requests() {
    local n=$1 profile=$2
    start_proxy "$profile"
    if [[ $MODE == h1 ]]; then
        timeout 600 h2load --h1 -n "$n" -c 16 -m 1 "http://127.0.0.1:$PORT/v1/status" >"$OUT/h2load-$n.log"
    else
        timeout 600 h2load -n "$n" -c 16 -m 10 "http://127.0.0.1:$PORT_H2/v1/status" >"$OUT/h2load-$n.log"
    fi
    grep -q "$n succeeded" "$OUT/h2load-$n.log" || {
        echo "not all $n requests succeeded: $OUT/h2load-$n.log" >&2
        exit 1
    }
    stop_proxy
    COUNTED=$n
}

# Runs the echo streams for $1 seconds through the proxy under callgrind; the profile goes
# to $2. Sets COUNTED to the frames relayed (sent and echoed).
count_frames() {
    local seconds=$1 profile=$2 log=$OUT/ws_load-$1.log
    start_proxy "$profile"
    timeout $((seconds + 120)) "$WS_LOAD" --url "ws://127.0.0.1:$PORT/v1/agent/converse" \
        --streams "$WS_STREAMS" --duration "$seconds" >"$log" 2>&1
    stop_proxy
    COUNTED=$(awk '/^streams=/ {
        for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        if (f["errors"] != 0) { print "ws_load reported errors" > "/dev/stderr"; exit 1 }
        print f["sent"] + f["received"]
    }' "$log")
}

if [[ $MODE == ws ]]; then
    count_frames "$WS_LOW" "$OUT/low.out"
    low=$COUNTED
    count_frames "$WS_HIGH" "$OUT/high.out"
    high=$COUNTED
    UNIT="relayed frame"
else
    count_requests "$LOW" "$OUT/low.out"
    low=$COUNTED
    count_requests "$HIGH" "$OUT/high.out"
    high=$COUNTED
    UNIT=request
fi
[[ -n $low && -n $high ]] && ((high > low)) || { echo "no more work in the long run ($low, $high)" >&2; exit 1; }

python3 - "$OUT/low.out" "$OUT/high.out" $((high - low)) "$TOP" "$MODE $PROXY" "$UNIT" <<'PY'
import re, subprocess, sys

def self_costs(profile):
    text = subprocess.run(["callgrind_annotate", "--threshold=100", profile],
                          capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in text.splitlines():
        # Drop the file prefix (`???:` or `path.c:`), not the `::` of a Rust path.
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(?:[^:\s]*:(?!:))?(.*)$", line)
        if m:
            name = m.group(2)
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs

low, high = self_costs(sys.argv[1]), self_costs(sys.argv[2])
n, top, what, unit = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
rows = sorted(((high.get(k, 0) - low.get(k, 0)) / n, k) for k in set(low) | set(high))
rows.reverse()
print(f"{what}: instructions per {unit}, {n} of them (the difference of two runs)")
for per_unit, name in rows[: top + 1]:
    print(f"{per_unit:9.0f}  {name[:140]}")
PY
echo "profiles: $OUT/low.out $OUT/high.out"
