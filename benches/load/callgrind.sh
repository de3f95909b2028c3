#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable to about 1 % whatever
# else the machine is doing, so it shows changes of a few percent that wall-clock runs on
# a shared 2-core box cannot.
#
#   benches/load/callgrind.sh [h1|h2c] [binary]
#
# Switchyard runs under valgrind twice, serving LOW and then HIGH requests from h2load
# (16 connections; h2c with 10 streams each); the difference of the two totals divided by
# HIGH - LOW is the cost of one request with start-up and shutdown taken out. It prints
# that and the functions that cost most per request (self cost).
#
# Environment: LOW=1000 HIGH=6000 TOP=30 OUT=dir (default: a new temp dir).
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client). Loopback only; every
# process it starts is stopped by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODE=${1:-h1}
LOW=${LOW:-1000}
HIGH=${HIGH:-6000}
TOP=${TOP:-30}
OUT=${OUT:-$(mktemp -d /tmp/switchyard-callgrind.XXXXXX)}
case $MODE in h1 | h2c) ;; *) echo "mode: h1 or h2c" >&2; exit 2 ;; esac
for tool in valgrind callgrind_annotate h2load; do
    command -v $tool >/dev/null || { echo "needs $tool (apt-get install valgrind nghttp2-client)" >&2; exit 2; }
done
if [[ -n ${2:-} ]]; then
    SY=$2
else
    (cd "$ROOT" && cargo build --release --quiet --bin switchyard)
    SY=${CARGO_TARGET_DIR:-$ROOT/target}/release/switchyard
fi

# Below the ephemeral range (32768+), so no outgoing connection holds one of them.
BASE=$((20000 + (RANDOM % 120) * 100))
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_port() {
    local i
    for i in $(seq 1200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1 after 120 s" >&2
    exit 1
}

for i in 0 1; do
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$SY" stub-upstream \
        --listen "127.0.0.1:$((BASE + i))" --name "stub$i" >"$OUT/stub$i.log" 2>&1 &
    PIDS+=($!)
    wait_port $((BASE + i))
done
printf 'callgrind-token' >"$OUT/admin.token"
cat >"$OUT/switchyard.toml" <<EOF
[listen]
proxy = "127.0.0.1:$((BASE + 2))"
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

# Runs Switchyard under callgrind for $1 requests; the profile goes to $2.
count() {
    local n=$1 profile=$2 url=http://127.0.0.1:$((BASE + 2))/v1/status pid
    rm -f "$OUT/route.json"
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn valgrind --tool=callgrind \
        --callgrind-out-file="$profile" "$SY" run --config "$OUT/switchyard.toml" \
        >"$OUT/switchyard.log" 2>&1 &
    pid=$!
    PIDS+=($pid)
    wait_port $((BASE + 2))
    if [[ $MODE == h1 ]]; then
        timeout 600 h2load --h1 -n "$n" -c 16 -m 1 "$url" >"$OUT/h2load-$n.log"
    else
        timeout 600 h2load -n "$n" -c 16 -m 10 "$url" >"$OUT/h2load-$n.log"
    fi
    grep -q "$n succeeded" "$OUT/h2load-$n.log" || {
        echo "not all $n requests succeeded: $OUT/h2load-$n.log" >&2
        exit 1
    }
    kill -INT $pid
    wait $pid || true
}

count "$LOW" "$OUT/low.out"
count "$HIGH" "$OUT/high.out"

python3 - "$OUT/low.out" "$OUT/high.out" $((HIGH - LOW)) "$TOP" "$MODE" <<'PY'
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
n, top, mode = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = sorted(((high.get(k, 0) - low.get(k, 0)) / n, k) for k in set(low) | set(high))
rows.reverse()
print(f"{mode}: instructions per request, {n} requests (a difference of two runs)")
for per_request, name in rows[: top + 1]:
    print(f"{per_request:9.0f}  {name[:140]}")
PY
echo "profiles: $OUT/low.out $OUT/high.out"
