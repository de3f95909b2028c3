#!/usr/bin/env bash
# Interop check: the official Deepgram JavaScript SDK (@deepgram/sdk, pinned in package.json)
# through Switchyard against Switchyard's own Deepgram-compatible stub.
#
#   tests/sdk/js/run.sh /path/to/switchyard
#
# Starts two stubs (blue, green) and two proxies (one open, one with [client_auth]) on free
# loopback ports in 28000-28999, runs interop.mjs against them, and stops every process it
# started (by PID, from a trap). Exits non-zero, naming the failure, if anything fails.
set -euo pipefail

BIN=${1:-}
if [[ -z "$BIN" ]]; then
  echo "usage: $0 /path/to/switchyard" >&2
  exit 2
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
if [[ ! -x "$BIN" ]]; then
  echo "FAIL: $BIN is not an executable switchyard binary" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"

if ! command -v node >/dev/null; then
  echo "FAIL: node is not installed (Node 18+ needed)" >&2
  exit 2
fi
if [[ ! -d node_modules/@deepgram/sdk || ! -d node_modules/ws ]]; then
  echo "== npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sy-sdk-js.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    # bounded: 50 x 0.1 s, then SIGKILL
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 ]]; then
    echo "== logs kept in $WORK" >&2
    for f in "$WORK"/*.log; do
      [[ -f "$f" ]] || continue
      echo "---- $(basename "$f") (last 40 lines)" >&2
      tail -n 40 "$f" >&2
    done
  elif [[ -z "${KEEP_LOGS:-}" ]]; then
    rm -rf "$WORK"
  else
    echo "== logs kept in $WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ten free loopback ports in 28000-28999 (bind-tested; start offset random to avoid clashes
# between concurrent runs).
read -r -a PORTS <<<"$(node --input-type=module -e '
import net from "node:net";
const want = 10, out = [];
const start = 28000 + Math.floor(Math.random() * 900);
const free = (p) => new Promise((res) => {
  const s = net.createServer();
  s.once("error", () => res(false));
  s.listen(p, "127.0.0.1", () => s.close(() => res(true)));
});
for (let i = 0; i < 1000 && out.length < want; i++) {
  const p = 28000 + ((start - 28000 + i) % 1000);
  if (await free(p)) out.push(p);
}
if (out.length < want) { console.error("no free ports in 28000-28999"); process.exit(1); }
console.log(out.join(" "));
')"
BLUE=${PORTS[0]} GREEN=${PORTS[1]}
PROXY=${PORTS[2]} PREVIEW=${PORTS[3]} ADMIN=${PORTS[4]}
APROXY=${PORTS[5]} APREVIEW=${PORTS[6]} AADMIN=${PORTS[7]}

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/admin.token"
# A listed key, and one that is not listed (the check greps the logs for both).
GOOD_KEY="sdkjs$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
BAD_KEY="sdkjsbad$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$GOOD_KEY" >"$WORK/client-keys"

write_config() { # file proxy preview admin state [auth]
  cat >"$1" <<EOF
[listen]
proxy = "127.0.0.1:$2"
preview = "127.0.0.1:$3"
admin = "127.0.0.1:$4"

[pools]
blue = ["http://127.0.0.1:$BLUE"]
green = ["http://127.0.0.1:$GREEN"]

[routing]
initial = "blue"
state_file = "$WORK/$5"

[drain]
timeout = "30m"
grace = "2s"

[health]
interval = "200ms"
timeout = "1s"
rise = 1
fall = 3

[admin]
token_file = "$WORK/admin.token"
EOF
  if [[ "${6:-}" == auth ]]; then
    printf '\n[client_auth]\nkeys_file = "%s"\n' "$WORK/client-keys" >>"$1"
  fi
}
write_config "$WORK/open.toml" "$PROXY" "$PREVIEW" "$ADMIN" open-route.json
write_config "$WORK/auth.toml" "$APROXY" "$APREVIEW" "$AADMIN" auth-route.json auth

"$BIN" check --config "$WORK/open.toml" >/dev/null
"$BIN" check --config "$WORK/auth.toml" >/dev/null

echo "== starting stubs (blue :$BLUE, green :$GREEN) and proxies (:$PROXY/:$PREVIEW admin :$ADMIN; auth :$APROXY/:$APREVIEW admin :$AADMIN)"
RUST_LOG=info "$BIN" stub-upstream --listen "127.0.0.1:$BLUE" --name blue >"$WORK/stub-blue.log" 2>&1 &
PIDS+=($!)
RUST_LOG=info "$BIN" stub-upstream --listen "127.0.0.1:$GREEN" --name green >"$WORK/stub-green.log" 2>&1 &
PIDS+=($!)
RUST_LOG=info "$BIN" run --config "$WORK/open.toml" >"$WORK/proxy-open.log" 2>&1 &
PIDS+=($!)
RUST_LOG=info "$BIN" run --config "$WORK/auth.toml" >"$WORK/proxy-auth.log" 2>&1 &
PIDS+=($!)

export SY_BIN="$BIN" SY_WORK="$WORK" SY_PIDS="${PIDS[*]}"
export SY_BLUE="http://127.0.0.1:$BLUE" SY_GREEN="http://127.0.0.1:$GREEN"
export SY_PROXY="http://127.0.0.1:$PROXY" SY_PREVIEW="http://127.0.0.1:$PREVIEW" SY_ADMIN="http://127.0.0.1:$ADMIN"
export SY_APROXY="http://127.0.0.1:$APROXY" SY_APREVIEW="http://127.0.0.1:$APREVIEW" SY_AADMIN="http://127.0.0.1:$AADMIN"
export SY_TOKEN_FILE="$WORK/admin.token" SY_GOOD_KEY="$GOOD_KEY" SY_BAD_KEY="$BAD_KEY"
export SY_LOG_OPEN="$WORK/proxy-open.log" SY_LOG_AUTH="$WORK/proxy-auth.log"

# interop.mjs waits for /readyz itself (bounded) and has its own overall deadline.
node interop.mjs
