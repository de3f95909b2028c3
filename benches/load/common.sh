# Helpers for callgrind.sh, burst_rss.sh, cpu_split.sh and pgo.sh, sourced. They read SY (a
# switchyard binary; ORIGIN_SY, if set, runs the stub origins) and DIR (a scratch
# directory, removed at exit if set), and stop what they start by PID at exit.

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n ${DIR:-} ]]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT

# wait_port PORT [SECONDS]: until something listens on PORT (30 s at most, or SECONDS).
wait_port() {
    local port=$1 seconds=${2:-30} i
    for i in $(seq $((seconds * 10))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $port after $seconds s" >&2
    exit 1
}

# set_ports BASE: the ports configs.sh reads, from BASE up (the origin on BASE, Switchyard
# on BASE+2, nginx on BASE+4 and BASE+5, HAProxy on BASE+6), and the open-file limit.
set_ports() {
    P_ORIGIN=$1
    P_SY=$(($1 + 2))
    P_NGINX=$(($1 + 4))
    P_NGINX_H2=$(($1 + 5))
    P_HAPROXY=$(($1 + 6))
    FD_LIMIT=$(ulimit -n)
}

# start_switchyard BASE: two stub origins on BASE and BASE+1 (blue and green), and
# `switchyard run` with its proxy listener on BASE+2 and admin on BASE+3, all on core 0
# with one worker each, as in run.sh. Sets SY_PID.
start_switchyard() {
    local base=$1 i
    for i in 0 1; do
        TOKIO_WORKER_THREADS=1 taskset -c 0 "${ORIGIN_SY:-$SY}" stub-upstream \
            --listen "127.0.0.1:$((base + i))" --name "stub$i" >"$DIR/stub$i.log" 2>&1 &
        PIDS+=($!)
    done
    head -c 32 /dev/urandom | base64 >"$DIR/admin.token"
    cat >"$DIR/switchyard.toml" <<TOML
[listen]
proxy = "127.0.0.1:$((base + 2))"
admin = "127.0.0.1:$((base + 3))"

[pools]
blue = ["http://127.0.0.1:$base"]
green = ["http://127.0.0.1:$((base + 1))"]

[routing]
state_file = "$DIR/route.json"

[admin]
token_file = "$DIR/admin.token"
TOML
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 "$SY" run \
        --config "$DIR/switchyard.toml" >"$DIR/switchyard.log" 2>&1 &
    SY_PID=$!
    PIDS+=($SY_PID)
    for i in 0 1 2; do wait_port $((base + i)); done
}
