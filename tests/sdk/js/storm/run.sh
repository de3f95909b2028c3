#!/usr/bin/env bash
# Flip storm: many official-SDK streams through one Switchyard while the route flips, rolls
# back and commits about every 2.5 s for 30 s; then checks the drain invariants.
#
#   tests/sdk/js/storm/run.sh PATH/TO/switchyard [OUTDIR] [--load]
#
# Two stubs and one proxy on free loopback ports (38000-38999). Clients: 40 JS listen
# streams (10 of them end and reopen their sessions all the time), 10 JS speak streams (the
# SDK's own reconnect), 10 Python listen streams (the app reconnects on 1012), each sending
# 640-byte chunks every 20 ms and buffering while reconnecting. Changes: flips and rollbacks
# with drain_timeout 0s, 500ms and 1s, flips back inside a drain window (which must cancel
# it), a commit. `STORM=dense` makes about 50 changes 0.3-0.9 s apart; `--load` runs two
# `yes` for 60 s beside it. analyze.py then checks, from the clients' records, the proxy's
# JSON log, /status, /metrics and /history: close codes are 1000 or 1012 only; a 1012 comes
# after the colour's final Results and Metadata (Flushed for speak) and at the deadline; a
# cancelled drain closes nothing; reconnects land on the colour active at their handshake;
# each connection's chunks sent = transcribed + dropped_frames; gauges end at 0; no
# WARN/ERROR. Exits non-zero on any failure. About 50 s; not part of CI (.ci/sdk runs the
# interop checks). Needs tests/sdk/js/node_modules (`npm ci` there) and the Python SDK venv
# (tests/sdk/python/run.sh makes it).
set -uo pipefail
BIN=${1:?usage: run.sh PATH/TO/switchyard [OUTDIR] [--load]}
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
OUT=${2:-$(mktemp -d "${TMPDIR:-/tmp}/sy-storm.XXXXXX")}
[[ "$OUT" == --load ]] && { OUT=$(mktemp -d "${TMPDIR:-/tmp}/sy-storm.XXXXXX"); LOAD=--load; } || LOAD=${3:-}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../../../.." && pwd)
VENV=${SDK_VENV:-target/sdk-py-venv}
[[ "$VENV" = /* ]] || VENV="$REPO_ROOT/$VENV"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "no Python SDK venv at $VENV: run tests/sdk/python/run.sh first" >&2; exit 2; }
[[ -d "$HERE/../node_modules/@deepgram/sdk" ]] || (cd "$HERE/.." && npm ci --no-audit --no-fund --loglevel=error)
echo "== output in $OUT"
rm -rf "$OUT"; mkdir -p "$OUT"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# five free ports in 38000-38999 (bind-tested, random start)
read -r BLUE GREEN PROXY PREVIEW ADMIN < <("$PY" - <<'EOF'
import random, socket
ports = list(range(38000, 39000)); s = random.randrange(1000); out = []
for p in ports[s:] + ports[:s]:
    with socket.socket() as k:
        try: k.bind(("127.0.0.1", p))
        except OSError: continue
    out.append(p)
    if len(out) == 5: break
print(*out)
EOF
)
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$OUT/admin.token"
cat >"$OUT/storm.toml" <<EOF
[listen]
proxy = "127.0.0.1:$PROXY"
preview = "127.0.0.1:$PREVIEW"
admin = "127.0.0.1:$ADMIN"

[pools]
blue = ["http://127.0.0.1:$BLUE"]
green = ["http://127.0.0.1:$GREEN"]

[routing]
initial = "blue"
state_file = "$OUT/route.json"

[drain]
timeout = "30m"
grace = "2s"

[health]
interval = "200ms"
timeout = "1s"
rise = 1
fall = 3

[admin]
token_file = "$OUT/admin.token"
EOF
"$BIN" check --config "$OUT/storm.toml" >/dev/null || { echo "config refused"; exit 2; }
RUST_LOG=info "$BIN" stub-upstream --listen "127.0.0.1:$BLUE" --name blue >"$OUT/stub-blue.log" 2>&1 & PIDS+=($!)
RUST_LOG=info "$BIN" stub-upstream --listen "127.0.0.1:$GREEN" --name green >"$OUT/stub-green.log" 2>&1 & PIDS+=($!)
RUST_LOG=info "$BIN" --log-format json run --config "$OUT/storm.toml" >"$OUT/proxy.log" 2>&1 & PROXY_PID=$!; PIDS+=($PROXY_PID)
echo "== ports blue $BLUE green $GREEN proxy $PROXY admin $ADMIN; proxy pid $PROXY_PID"
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

if [[ "$LOAD" == --load ]]; then
  timeout 60 yes >/dev/null & PIDS+=($!)
  timeout 60 yes >/dev/null & PIDS+=($!)
  echo "== CPU load: two 'yes' for 60 s"
fi

export SY_PROXY="http://127.0.0.1:$PROXY" SY_ADMIN="http://127.0.0.1:$ADMIN" SY_TOKEN_FILE="$OUT/admin.token" SY_OUT="$OUT"
START=$(date +%s)
( cd "$HERE" && timeout 88 node storm.mjs >"$OUT/node.out" 2>&1 ) & NODE_PID=$!; PIDS+=($NODE_PID)
timeout 88 "$PY" -W ignore "$HERE/storm.py" "127.0.0.1:$PROXY" "$OUT" 10 >"$OUT/py.out" 2>&1 & PYPID=$!; PIDS+=($PYPID)
wait $NODE_PID; echo "node exit $?"
wait $PYPID; echo "python exit $?"
echo "== clients took $(( $(date +%s) - START )) s"
# Each stream's end line and close metric are written before it stops counting as open,
# so once both colours are drained the log and /metrics are complete.
for color in blue green; do
  curl -sS "http://127.0.0.1:$ADMIN/drain/wait?color=$color&timeout=10s" >/dev/null
done
curl -sS "http://127.0.0.1:$ADMIN/status" >"$OUT/status.json"
curl -sS "http://127.0.0.1:$ADMIN/metrics" >"$OUT/metrics.txt"
curl -sS "http://127.0.0.1:$ADMIN/history" >"$OUT/history.json"
# stop the proxy first (SIGTERM drain), so its shutdown lines are in the log too
kill -TERM $PROXY_PID; for _ in $(seq 1 50); do kill -0 $PROXY_PID 2>/dev/null || break; sleep 0.1; done
cat "$OUT/node.out" | tail -n 30
cat "$OUT/py.out"
"$PY" "$HERE/analyze.py" "$OUT"
