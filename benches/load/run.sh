#!/usr/bin/env bash
# Load benchmarks: Switchyard against nginx and HAProxy on one machine, loopback only.
#
#   benches/load/run.sh [sections...]     sections: http1 h2c latency ws idle flip (default: all)
#
# Environment:
#   ROUNDS=3        interleaved rounds per target (http1)
#   WS_ROUNDS=3     interleaved rounds per target and stream count (ws); default ROUNDS
#   DURATION=10     seconds per wrk/h2load/oha run
#   CONNS=64        client connections
#   WS_STREAMS="200 1000"   WebSocket stream counts
#   IDLE_STREAMS=10000
#   QUIET_LOAD=0.7  wait before each measured round until the 1-minute load is below this ...
#   QUIET_MAX=600   ... for at most this many seconds (then go on and say so)
#   SKIP_INSTALL=1  do not apt-get install
#   OUT=dir         where logs and results go (default: a new temp dir)
#   SY=path         the switchyard binary to measure (default: build the release one), with
#                   examples/ws_load beside it; ORIGIN_SY=path runs the stub origin from
#                   another binary (default: SY), e.g. to compare builds on the same origin
#   SY_PGO=path     also measure this binary (benches/load/pgo.sh builds it) as the target
#                   `switchyard-pgo`, in the same interleaved rounds (not in idle and flip)
#
# Pinning: the load generator runs on core 1, the proxy and the origin share core 0.
# Every process this script starts is killed by PID when it exits. Every load run is
# bounded in time.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${ROUNDS:-3}
WS_ROUNDS=${WS_ROUNDS:-$ROUNDS}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
WS_STREAMS=${WS_STREAMS:-"200 1000"}
IDLE_STREAMS=${IDLE_STREAMS:-10000}
IDLE_NOTE=
QUIET_LOAD=${QUIET_LOAD:-0.7}
QUIET_MAX=${QUIET_MAX:-600}
OUT=${OUT:-$(mktemp -d /tmp/switchyard-bench.XXXXXX)}
SECTIONS=${*:-"http1 h2c latency ws idle flip"}
LOADGEN_CPU=1
SERVER_CPU=0
mkdir -p "$OUT"
RESULTS="$OUT/results.md"
: >"$RESULTS"

# Ports: one random block so several copies (or other agents' runs) do not collide.
# Below the ephemeral range (32768+), so no outgoing connection holds one of them.
BASE=${BASE:-$((20000 + (RANDOM % 120) * 100))}
P_ORIGIN=$BASE
P_ORIGIN2=$((BASE + 1))
P_SY=$((BASE + 10))
P_SY_ADMIN=$((BASE + 11))
P_SY_PGO=$((BASE + 12))
P_SY_PGO_ADMIN=$((BASE + 13))
P_NGINX=$((BASE + 20))
P_NGINX_H2=$((BASE + 21))
P_HAPROXY=$((BASE + 30))
PATH_HTTP=/v1/status
PATH_WS=/v1/agent/converse
PROXIES="switchyard${SY_PGO:+ switchyard-pgo} nginx haproxy"
TARGETS="direct $PROXIES"
# nginx_conf and haproxy_conf: the two proxies' configurations.
source "$ROOT/benches/load/configs.sh"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
say() { printf '%s\n' "$*" | tee -a "$RESULTS"; }

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    sleep 0.5
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
# Tools

install_tools() {
    [[ ${SKIP_INSTALL:-0} == 1 ]] && return
    log "installing nginx, haproxy, wrk, h2load from Debian"
    # Keep the packages' services from starting: this script runs its own instances.
    local guard=/usr/sbin/policy-rc.d had_guard=0
    [[ -e $guard ]] && had_guard=1
    if [[ $had_guard == 0 ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$guard"
        chmod +x "$guard"
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nginx haproxy wrk nghttp2-client >/dev/null
    [[ $had_guard == 0 ]] && rm -f "$guard"
}

build_switchyard() {
    if [[ -n ${SY:-} ]]; then
        log "using SY=$SY (and the ws_load example beside it)"
    else
        log "building switchyard (release) and the ws_load example"
        (cd "$ROOT" && cargo build --release --quiet --bin switchyard --example ws_load)
        SY=${CARGO_TARGET_DIR:-$ROOT/target}/release/switchyard
    fi
    WS_LOAD=$(dirname "$SY")/examples/ws_load
    ORIGIN_SY=${ORIGIN_SY:-$SY}
}

find_oha() {
    OHA=$(command -v oha || true)
    [[ -z $OHA && -x $HOME/.cargo/bin/oha ]] && OHA=$HOME/.cargo/bin/oha
    if [[ -z $OHA && ${SKIP_INSTALL:-0} != 1 ]]; then
        log "cargo install oha --locked (the open-loop generator for the latency run)"
        if timeout 900 cargo install oha --locked --quiet >"$OUT/oha-install.log" 2>&1; then
            OHA=$HOME/.cargo/bin/oha
        fi
    fi
    true
}

# ---------------------------------------------------------------------------------------
# Process helpers

wait_port() {
    local port=$1 i
    for i in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.05
    done
    log "port $port never opened"
    return 1
}

# The 1-minute load average must fall below QUIET_LOAD before a measured round.
wait_quiet() {
    local waited=0 load
    while :; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        if awk -v l="$load" -v q="$QUIET_LOAD" 'BEGIN { exit !(l < q) }'; then
            log "quiet (load $load after ${waited}s)"
            QUIET_NOTE="load $load after waiting ${waited}s"
            return
        fi
        if ((waited >= QUIET_MAX)); then
            log "never quiet: load $load after ${waited}s; measuring anyway"
            QUIET_NOTE="NOT QUIET: load $load after waiting ${waited}s"
            NOT_QUIET=$((NOT_QUIET + 1))
            return
        fi
        sleep 10
        waited=$((waited + 10))
    done
}
NOT_QUIET=0

# Total CPU ticks (utime + stime) of a process and its direct children (nginx workers).
cpu_ticks() {
    local pids=("$1") p total=0
    mapfile -t -O 1 pids < <(pgrep -P "$1" || true)
    for p in "${pids[@]}"; do
        [[ -r /proc/$p/stat ]] || continue
        # Fields 14 and 15 of /proc/PID/stat, read after the ")" ending the command name.
        total=$((total + $(sed 's/.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

start_origin() {
    local port=$1 name=$2
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c $SERVER_CPU \
        "$ORIGIN_SY" stub-upstream --listen "127.0.0.1:$port" --name "$name" \
        >"$OUT/stub-$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=($STARTED_PID)
    wait_port "$port"
}

# start_switchyard NAME BINARY PORT ADMIN_PORT: sets STARTED_PID.
start_switchyard() {
    local name=$1 bin=$2 port=$3 admin=$4
    local dir=$OUT/$name
    mkdir -p "$dir"
    printf 'bench-token' >"$dir/admin.token"
    rm -f "$dir/route.json"
    cat >"$dir/switchyard.toml" <<EOF
[listen]
proxy = "127.0.0.1:$port"
admin = "127.0.0.1:$admin"

[pools]
blue = ["http://127.0.0.1:$P_ORIGIN"]
green = ["http://127.0.0.1:$P_ORIGIN2"]

[routing]
state_file = "$dir/route.json"

[admin]
token_file = "$dir/admin.token"
EOF
    # One worker thread: the same one core nginx (worker_processes 1) and HAProxy
    # (nbthread 1) get.
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c $SERVER_CPU \
        "$bin" run --config "$dir/switchyard.toml" >"$OUT/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=($STARTED_PID)
    wait_port "$port"
}

start_nginx() {
    local dir=$OUT/nginx
    mkdir -p "$dir/tmp"
    nginx_conf "$dir" on >"$dir/nginx.conf"
    taskset -c $SERVER_CPU nginx -c "$dir/nginx.conf" -p "$dir" >"$OUT/nginx.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=($NGINX_PID)
    wait_port $P_NGINX
}

start_haproxy() {
    local dir=$OUT/haproxy
    mkdir -p "$dir"
    haproxy_conf >"$dir/haproxy.cfg"
    taskset -c $SERVER_CPU haproxy -db -f "$dir/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=($HAPROXY_PID)
    wait_port $P_HAPROXY
}

# ---------------------------------------------------------------------------------------
# Measurements

target_url() {
    case $1 in
    direct) echo "http://127.0.0.1:$P_ORIGIN" ;;
    switchyard) echo "http://127.0.0.1:$P_SY" ;;
    switchyard-pgo) echo "http://127.0.0.1:$P_SY_PGO" ;;
    nginx) echo "http://127.0.0.1:$P_NGINX" ;;
    haproxy) echo "http://127.0.0.1:$P_HAPROXY" ;;
    esac
}
target_pid() {
    case $1 in
    direct) echo "$ORIGIN_PID" ;;
    switchyard) echo "$SY_PID" ;;
    switchyard-pgo) echo "$SY_PGO_PID" ;;
    nginx) echo "$NGINX_PID" ;;
    haproxy) echo "$HAPROXY_PID" ;;
    esac
}

# wrk → "rps p99_us requests errors cpu_us_per_request"
wrk_run() {
    local name=$1 round=$2 url pid before after file
    url=$(target_url "$name")$PATH_HTTP
    pid=$(target_pid "$name")
    file=$OUT/wrk-$name-$round.txt
    before=$(cpu_ticks "$pid")
    taskset -c $LOADGEN_CPU wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 5s --latency "$url" >"$file" 2>&1
    after=$(cpu_ticks "$pid")
    awk -v ticks=$((after - before)) -v hz="$CLK_TCK" -v self="$name" '
        function us(v) {
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return (v + 0) * 1000
            if (v ~ /s$/) return (v + 0) * 1000000
            return v
        }
        /requests in/ { reqs = $1 }
        /Requests\/sec/ { rps = $2 }
        /^ +99%/ { p99 = us($2) }
        /Non-2xx/ { errs += $NF }
        /Socket errors/ { gsub(/,/, ""); errs += $4 + $6 + $8 + $10 }
        END {
            cpu = (self == "direct" || reqs == 0) ? 0 : ticks / hz * 1e6 / reqs
            printf "%s %s %d %d %.2f\n", rps, p99, reqs, errs, cpu
        }' "$file"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
minmax() { sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "–" hi }'; }
# col FILE NAME FIELD: field FIELD of NAME's lines in FILE (one per round), "-" skipped.
col() { awk -v n="$2" -v f="$3" '$1 == n && $f != "-" { print $f }' "$1"; }
# ratio A B: A/B as "1.23×", or "-" when either is missing.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f×", a / b }'; }

section_http1() {
    say ""
    say "## Load: HTTP/1.1"
    say ""
    say "wrk -t1 -c$CONNS -d${DURATION}s --latency, GET $PATH_HTTP on the stub origin; $ROUNDS interleaved rounds."
    local round name
    for round in $(seq 1 "$ROUNDS"); do
        wait_quiet
        say "- round $round: $QUIET_NOTE"
        for name in $TARGETS; do
            log "http1 round $round: $name"
            echo "$name $(wrk_run "$name" "$round")" >>"$OUT/http1.raw"
        done
    done
    say ""
    say "| target | req/s median | req/s min–max | p99 median (µs) | CPU µs/request median | errors | vs direct | vs nginx |"
    say "| --- | --- | --- | --- | --- | --- | --- | --- |"
    local nginx_rps direct_rps
    nginx_rps=$(col "$OUT/http1.raw" nginx 2 | median)
    direct_rps=$(col "$OUT/http1.raw" direct 2 | median)
    for name in $TARGETS; do
        local rps range p99 cpu errs
        rps=$(col "$OUT/http1.raw" "$name" 2 | median)
        range=$(col "$OUT/http1.raw" "$name" 2 | minmax)
        p99=$(col "$OUT/http1.raw" "$name" 3 | median)
        cpu=$(col "$OUT/http1.raw" "$name" 6 | median)
        errs=$(awk -v n=$name '$1 == n { s += $5 } END { print s + 0 }' "$OUT/http1.raw")
        say "| $name | $rps | $range | $p99 | $([[ $name == direct ]] && echo - || echo "$cpu") | $errs | $(ratio "$rps" "$direct_rps") | $(ratio "$rps" "$nginx_rps") |"
    done
    local ncpu
    ncpu=$(col "$OUT/http1.raw" nginx 6 | median)
    for name in ${PROXIES/nginx /}; do
        local cpu
        cpu=$(col "$OUT/http1.raw" "$name" 6 | median)
        say ""
        say "- $name CPU per request vs nginx: $(ratio "$cpu" "$ncpu")"
    done
}

section_h2c() {
    say ""
    say "## Load: h2c"
    say ""
    say "h2load -t1 -c16 -m10 -D$DURATION (prior knowledge), GET $PATH_HTTP; the proxies speak HTTP/1.1 to the origin."
    say ""
    wait_quiet
    say "- $QUIET_NOTE"
    say ""
    say "| target | req/s | mean request time (h2load reports no p99) | CPU µs/request | failed/errored |"
    say "| --- | --- | --- | --- | --- |"
    local name url pid before after file
    for name in $PROXIES; do
        url=$(target_url "$name")$PATH_HTTP
        pid=$(target_pid "$name")
        [[ $name == nginx ]] && url=http://127.0.0.1:$P_NGINX_H2$PATH_HTTP
        file=$OUT/h2load-$name.txt
        log "h2c: $name"
        before=$(cpu_ticks "$pid")
        taskset -c $LOADGEN_CPU timeout $((DURATION + 30)) h2load -t1 -c16 -m10 -D"$DURATION" "$url" >"$file" 2>&1 || true
        after=$(cpu_ticks "$pid")
        awk -v ticks=$((after - before)) -v hz="$CLK_TCK" -v n=$name '
            /^finished in/ { rps = $4 }
            /^requests:/ { done = $8; failed = $10; errored = $12 }
            /^time for request:/ { mean = $6 }
            END { printf "| %s | %s | %s | %.2f | %s/%s |\n", n, rps, mean, (done ? ticks / hz * 1e6 / done : 0), failed, errored }' "$file" | tee -a "$RESULTS"
    done
}

section_latency() {
    say ""
    say "## Latency at 5,000 req/s"
    say ""
    find_oha
    if [[ -z ${OHA:-} ]]; then
        latency_h2load
        return
    fi
    say "$($OHA --version 2>&1 | head -1), open loop: oha -z ${DURATION}s -q 5000 -c $CONNS --latency-correction --disable-keepalive off (keep-alive on)"
    say ""
    wait_quiet
    say "- $QUIET_NOTE"
    say ""
    say "| target | p50 (ms) | p99 (ms) | p99.9 (ms) | req/s | CPU µs/request |"
    say "| --- | --- | --- | --- | --- | --- |"
    local name url pid before after file
    for name in $TARGETS; do
        url=$(target_url "$name")$PATH_HTTP
        pid=$(target_pid "$name")
        file=$OUT/oha-$name.json
        log "latency: $name"
        before=$(cpu_ticks "$pid")
        taskset -c $LOADGEN_CPU timeout $((DURATION + 30)) "$OHA" -z "${DURATION}s" -q 5000 -c "$CONNS" \
            --latency-correction --no-tui --output-format json "$url" >"$file" 2>"$file.err" || true
        after=$(cpu_ticks "$pid")
        python3 - "$file" "$name" $((after - before)) "$CLK_TCK" <<'PY' | tee -a "$RESULTS"
import json, sys
path, name, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
d = json.load(open(path))
s, p = d["summary"], d["latencyPercentiles"]
total = sum(v for k, v in d.get("statusCodeDistribution", {}).items())
cpu = "-" if name == "direct" or not total else f"{ticks / hz * 1e6 / total:.2f}"
print(f"| {name} | {p['p50'] * 1e3:.3f} | {p['p99'] * 1e3:.3f} | {p['p99.9'] * 1e3:.3f} | {s['requestsPerSec']:.0f} | {cpu} |")
PY
    done
}

# Without oha: h2load over HTTP/1.1 at a fixed rate per connection (50 × 100 req/s). Each
# connection still waits for its answer (closed loop per connection), and h2load gives no
# percentiles: mean, sd and max only.
latency_h2load() {
    wait_quiet
    say "- $QUIET_NOTE"
    say "oha is not available (see $OUT/oha-install.log) and wrk2 is not in Debian. Approximation: h2load --h1 -t1 -c50 --rps=100 -D$DURATION (5,000 req/s offered, closed loop per connection, no percentiles)."
    say ""
    say "| target | req/s | latency min | mean | sd | max | CPU µs/request |"
    say "| --- | --- | --- | --- | --- | --- | --- |"
    local name url pid before after file
    for name in $TARGETS; do
        url=$(target_url "$name")$PATH_HTTP
        pid=$(target_pid "$name")
        file=$OUT/h2load-rate-$name.txt
        log "latency (h2load --rps): $name"
        before=$(cpu_ticks "$pid")
        taskset -c $LOADGEN_CPU timeout $((DURATION + 30)) h2load --h1 -t1 -c50 --rps=100 -D"$DURATION" "$url" >"$file" 2>&1 || true
        after=$(cpu_ticks "$pid")
        awk -v ticks=$((after - before)) -v hz="$CLK_TCK" -v n=$name '
            /^finished in/ { rps = $4 }
            /^requests:/ { done = $8 }
            /^time for request:/ { min = $4; max = $5; mean = $6; sd = $7 }
            END { printf "| %s | %s | %s | %s | %s | %s | %s |\n", n, rps, min, mean, sd, max, (n == "direct" || !done) ? "-" : sprintf("%.2f", ticks / hz * 1e6 / done) }' "$file" | tee -a "$RESULTS"
    done
}

section_ws() {
    say ""
    say "## Load: WebSocket"
    say ""
    say "examples/ws_load.rs: N streams to $PATH_WS on the stub (echo), 640-byte binary frames every 20 ms per stream, ${DURATION}s after all are open; $WS_ROUNDS interleaved rounds, medians (a round's p99 moves by tens of per cent)."
    say ""
    local n name url pid before after file round raw
    for n in $WS_STREAMS; do
        raw=$OUT/ws-$n.raw
        : >"$raw"
        for round in $(seq 1 "$WS_ROUNDS"); do
            wait_quiet
            say "- $n streams, round $round: $QUIET_NOTE"
            for name in $TARGETS; do
                url=$(target_url "$name" | sed 's/^http/ws/')$PATH_WS
                pid=$(target_pid "$name")
                file=$OUT/ws-$name-$n-$round.txt
                log "ws $n round $round: $name"
                before=$(cpu_ticks "$pid")
                taskset -c $LOADGEN_CPU timeout $((DURATION + 60)) "$WS_LOAD" --url "$url" --streams "$n" --duration "$DURATION" >"$file" 2>&1 || true
                after=$(cpu_ticks "$pid")
                # One line per run: name, p50, p99, CPU µs per relayed frame (one frame
                # through the proxy in one direction; each echo is two), sent, echoed,
                # errors. A run that printed no summary counts as all errors.
                awk -v ticks=$((after - before)) -v hz="$CLK_TCK" -v n=$name -v streams="$n" '
                    /^streams=/ {
                        for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
                        frames = f["sent"] + f["received"]
                        cpu = (n == "direct" || !frames) ? "-" : sprintf("%.2f", ticks / hz * 1e6 / frames)
                        print n, f["rtt_p50_us"], f["rtt_p99_us"], cpu, f["sent"], f["received"], f["errors"]
                        seen = 1
                    }
                    END { if (!seen) print n, "-", "-", "-", 0, 0, streams }' "$file" >>"$raw"
                sleep 2
            done
        done
        say ""
        say "$n streams:"
        say ""
        say "| target | frames sent | echoed | errors | RTT p50 (µs) median | RTT p99 (µs) median | p99 min–max | CPU µs/relayed frame median | p99 vs nginx | CPU vs nginx |"
        say "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        local np99 ncpu
        np99=$(col "$raw" nginx 3 | median)
        ncpu=$(col "$raw" nginx 4 | median)
        for name in $TARGETS; do
            local p50 p99 range cpu totals
            p50=$(col "$raw" "$name" 2 | median)
            p99=$(col "$raw" "$name" 3 | median)
            range=$(col "$raw" "$name" 3 | minmax)
            cpu=$(col "$raw" "$name" 4 | median)
            totals=$(awk -v n=$name '$1 == n { s += $5; r += $6; e += $7 } END { printf "%d | %d | %d", s, r, e }' "$raw")
            say "| $name | $totals | $p50 | $p99 | $range | ${cpu:--} | $(ratio "$p99" "$np99") | $([[ $name == direct ]] && echo - || ratio "$cpu" "$ncpu") |"
        done
        say ""
    done
}

section_idle() {
    say ""
    say "## Idle WebSocket streams: memory"
    say ""
    wait_quiet
    say "- $QUIET_NOTE"
    local before after settled peak file opened
    file=$OUT/ws-idle.txt
    before=$(rss_kib "$SY_PID")
    peak=$before
    log "idle: $IDLE_STREAMS streams through switchyard"
    taskset -c $LOADGEN_CPU timeout 300 "$WS_LOAD" --url "ws://127.0.0.1:$P_SY$PATH_WS" --streams "$IDLE_STREAMS" --duration 30 --idle >"$file" 2>&1 &
    local client=$!
    PIDS+=($client)
    # RSS each second: its peak while the streams open, 3 s after the last one opened (the
    # figure of the runs before 2026-12-06), and 15 s after, when jemalloc's purging thread
    # has given back what the burst of handshakes freed (the client holds them 30 s from then).
    local i rss
    for i in $(seq 1 240); do
        rss=$(rss_kib "$SY_PID")
        ((rss > peak)) && peak=$rss
        grep -q '^opened=' "$file" && break
        sleep 1
    done
    for i in $(seq 1 15); do
        sleep 1
        rss=$(rss_kib "$SY_PID")
        ((rss > peak)) && peak=$rss
        ((i == 3)) && after=$rss
    done
    settled=$rss
    # The reading counts only while the streams are still open: say how many were.
    local open_then
    open_then=$(curl -fsS -m 5 "http://127.0.0.1:$P_SY_ADMIN/status" 2>/dev/null | python3 -c \
        'import json, sys; print(sum(c["open_streams"] for c in json.load(sys.stdin)["colors"].values()))' \
        2>/dev/null || echo "?")
    opened=$(sed -n 's/^opened=\([0-9]*\).*/\1/p' "$file")
    local stub_rss
    stub_rss=$(rss_kib "$ORIGIN_PID")
    wait "$client" || true
    per() { awk -v a="$1" -v b="$before" -v n="${opened:-0}" 'BEGIN { printf "%.1f", n ? (a - b) / n : 0 }'; }
    say "switchyard VmRSS: ${before} KiB before, ${after} KiB with ${opened:-0} of $IDLE_STREAMS streams open → $(per "$after") KiB per stream 3 s after the last opened (client and upstream side together) ${IDLE_NOTE:-}; ${settled} KiB → **$(per "$settled") KiB per stream** 15 s after, with $open_then streams open; peak ${peak} KiB while they opened. Stub origin RSS at the time: $stub_rss KiB. Client: $(tail -1 "$file")"
}

section_flip() {
    say ""
    say "## Flips under load"
    say ""
    wait_quiet
    say "- $QUIET_NOTE"
    local file=$OUT/wrk-flip.txt flips=0 failed=0
    log "flip: wrk 30s through switchyard, a flip every second"
    taskset -c $LOADGEN_CPU wrk -t1 -c"$CONNS" -d30s --timeout 5s --latency "http://127.0.0.1:$P_SY$PATH_HTTP" >"$file" 2>&1 &
    local wrk_pid=$!
    PIDS+=($wrk_pid)
    local end=$((SECONDS + 29))
    while ((SECONDS < end)); do
        sleep 1
        if taskset -c $LOADGEN_CPU "$SY" ctl --admin "http://127.0.0.1:$P_SY_ADMIN" \
            --token-file "$OUT/switchyard/admin.token" flip --force >>"$OUT/flips.log" 2>&1; then
            flips=$((flips + 1))
        else
            failed=$((failed + 1))
        fi
    done
    wait "$wrk_pid" || true
    local errs
    errs=$(awk '/Non-2xx/ { e += $NF } /Socket errors/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 } END { print e + 0 }' "$file")
    say "wrk -t1 -c$CONNS -d30s through switchyard with \`switchyard ctl flip --force\` every second: $flips flips ($failed refused), $(awk '/requests in/ { print $1 }' "$file") requests, $(awk '/Requests\/sec/ { print $2 }' "$file") req/s, **$errs non-2xx/socket errors**."
}

# ---------------------------------------------------------------------------------------

# Each proxied stream holds two descriptors; without CAP_SYS_RESOURCE the hard limit caps it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FD_LIMIT=$(ulimit -n)
if ((IDLE_STREAMS * 2 + 200 > FD_LIMIT)); then
    log "open-file limit $FD_LIMIT: idle streams lowered from $IDLE_STREAMS"
    IDLE_NOTE="(lowered from $IDLE_STREAMS: the open-file hard limit is $FD_LIMIT and each proxied stream holds two descriptors)"
    IDLE_STREAMS=$(((FD_LIMIT - 200) / 2))
fi
install_tools
build_switchyard

say "# Switchyard load benchmarks ($(date -u +%FT%TZ))"
say ""
say "- machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), $(uname -r)"
[[ -n ${SY_PGO:-} ]] && say "- switchyard: $SY; switchyard-pgo: $SY_PGO; the stub origin: $ORIGIN_SY"
say "- $(rustc --version); $(nginx -v 2>&1); $(haproxy -v | head -1); $(wrk -v 2>&1 | head -1); $(h2load --version 2>&1 | head -1)"
say "- pinning: load generator on core $LOADGEN_CPU; proxy and origin on core $SERVER_CPU; switchyard and the stub with TOKIO_WORKER_THREADS=1"
say "- raw output: $OUT"

start_origin $P_ORIGIN blue
ORIGIN_PID=$STARTED_PID
start_origin $P_ORIGIN2 green
start_switchyard switchyard "$SY" $P_SY $P_SY_ADMIN
SY_PID=$STARTED_PID
if [[ -n ${SY_PGO:-} ]]; then
    start_switchyard switchyard-pgo "$SY_PGO" $P_SY_PGO $P_SY_PGO_ADMIN
    SY_PGO_PID=$STARTED_PID
fi
start_nginx
start_haproxy
log "all up: origin $ORIGIN_PID switchyard $SY_PID nginx $NGINX_PID haproxy $HAPROXY_PID (ports from $BASE)"
# Warm every path once so the first measured run does not pay for connection set-up.
for name in $TARGETS; do
    curl -fsS -m 10 -o /dev/null "$(target_url $name)$PATH_HTTP"
done

for s in $SECTIONS; do
    "section_$s"
done
((NOT_QUIET > 0)) && say "" && say "**Note:** $NOT_QUIET measured round(s) started on a machine that never got quiet (1-minute load ≥ $QUIET_LOAD after ${QUIET_MAX}s)."
log "done: $RESULTS"
