#!/usr/bin/env bash
# Interop check: the official Python Deepgram SDK (deepgram-sdk, pinned below) against
# Switchyard in front of Switchyard's own Deepgram-compatible stub upstreams.
#
#   tests/sdk/python/run.sh PATH/TO/switchyard [v4]
#
# Starts two stubs (blue, green) and two proxies (A: no client auth, with a preview listener;
# B: [client_auth] keys_file) on free loopback ports, runs interop.py, and stops every process
# it started by PID. Exits non-zero, naming the failed checks, on any failure.
#
# Flavour (second argument, or SDK_FLAVOUR; the argument wins): empty (the default) is the
# current SDK above with interop.py; `v4` is the last 4.x SDK (deepgram-sdk 4.8.1, the
# event-callback API still widely deployed) with interop_v4.py, in its own venv (default
# target/sdk-py4-venv). Same processes, configs and script arguments either way.
#
# Environment:
#   SDK_FLAVOUR    the flavour when no second argument is given (default: empty)
#   SDK_VENV       the virtualenv to create or reuse (default target/sdk-py-venv, or
#                  target/sdk-py4-venv for v4; relative to the repo root)
#   SDK_PORT_MIN / SDK_PORT_MAX   the loopback port range to pick from (default 18000-18999)
#   SDK_KEEP_LOGS=1   keep the temp dir with configs and logs even on success
set -euo pipefail

SDK_VERSION="7.17.0"
SDK_VERSION_V4="4.8.1"

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 PATH/TO/switchyard [v4]" >&2
    exit 2
fi
FLAVOUR="${2:-${SDK_FLAVOUR:-}}"
case "$FLAVOUR" in
    "")
        LABEL="sdk-python"; SCRIPT="interop.py"; DEFAULT_VENV="target/sdk-py-venv" ;;
    v4)
        LABEL="sdk-python-v4"; SCRIPT="interop_v4.py"; DEFAULT_VENV="target/sdk-py4-venv"
        SDK_VERSION="$SDK_VERSION_V4" ;;
    *)
        echo "$0: unknown flavour '$FLAVOUR' (expected nothing or v4)" >&2
        exit 2 ;;
esac
BIN="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
if [[ ! -x "$BIN" ]]; then
    echo "$LABEL: $BIN is not an executable switchyard binary" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="${SDK_VENV:-$DEFAULT_VENV}"
[[ "$VENV" = /* ]] || VENV="$REPO_ROOT/$VENV"
PY="$VENV/bin/python"

# --- the virtualenv, with the pinned SDK ---------------------------------------------------
have_version() {
    [[ -x "$PY" ]] && "$PY" - "$SDK_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
sys.exit(0 if metadata.version("deepgram-sdk") == sys.argv[1] else 1)
EOF
}
if ! have_version; then
    echo "$LABEL: installing deepgram-sdk==$SDK_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "deepgram-sdk==$SDK_VERSION"
    have_version || { echo "$LABEL: deepgram-sdk==$SDK_VERSION did not install" >&2; exit 1; }
fi

# --- processes, stopped by PID whatever happens --------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sdk-py-interop.XXXXXX")"
PIDS=()
STATUS=1
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded: 50 x 0.1 s, then SIGKILL.
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $STATUS -ne 0 || "${SDK_KEEP_LOGS:-0}" = 1 ]]; then
        echo "$LABEL: configs and logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Eight free loopback ports from the range, starting at a random offset.
read -r P_BLUE P_GREEN P_A P_A_PREVIEW P_A_ADMIN P_B P_B_PREVIEW P_B_ADMIN < <(
    "$PY" - "${SDK_PORT_MIN:-18000}" "${SDK_PORT_MAX:-18999}" <<'EOF'
import random, socket, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
ports = list(range(lo, hi + 1))
start = random.randrange(len(ports))
found = []
for port in ports[start:] + ports[:start]:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    found.append(port)
    if len(found) == 8:
        break
if len(found) < 8:
    sys.exit(f"only {len(found)} free ports in {lo}-{hi}")
print(*found)
EOF
)

ADMIN_TOKEN="admin-$("$PY" -c 'import secrets; print(secrets.token_hex(12))')"
KEY_GOOD_1="sdkpy-good1-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')"
KEY_GOOD_2="sdkpy-good2-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')"
KEY_BAD="sdkpy-unlisted-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')"
printf '%s\n' "$ADMIN_TOKEN" > "$WORK/admin.token"
printf '# client keys for the interop check\n%s\n%s\n' "$KEY_GOOD_1" "$KEY_GOOD_2" > "$WORK/client-keys"

write_config() { # name proxy preview admin [client_auth]
    {
        printf '[listen]\nproxy = "127.0.0.1:%s"\npreview = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\n\n' "$2" "$3" "$4"
        printf '[pools]\nblue = ["http://127.0.0.1:%s"]\ngreen = ["http://127.0.0.1:%s"]\n\n' "$P_BLUE" "$P_GREEN"
        printf '[routing]\ninitial = "blue"\nstate_file = "%s/state-%s/route.json"\n\n' "$WORK" "$1"
        printf '[drain]\ntimeout = "30m"\ngrace = "2s"\n\n'
        printf '[health]\ninterval = "200ms"\ntimeout = "1s"\nrise = 1\nfall = 3\n\n'
        printf '[admin]\ntoken_file = "%s/admin.token"\n' "$WORK"
        if [[ "${5:-}" = auth ]]; then
            printf '\n[client_auth]\nkeys_file = "%s/client-keys"\n' "$WORK"
        fi
    } > "$WORK/$1.toml"
}
write_config a "$P_A" "$P_A_PREVIEW" "$P_A_ADMIN"
write_config b "$P_B" "$P_B_PREVIEW" "$P_B_ADMIN" auth

"$BIN" stub-upstream --listen "127.0.0.1:$P_BLUE" --name blue > "$WORK/stub-blue.log" 2>&1 &
PIDS+=($!)
"$BIN" stub-upstream --listen "127.0.0.1:$P_GREEN" --name green > "$WORK/stub-green.log" 2>&1 &
PIDS+=($!)
# Debug level and JSON lines: the widest surface for the secret check, parseable for the
# session-id check.
RUST_LOG=debug "$BIN" --log-format json run --config "$WORK/a.toml" > "$WORK/proxy-a.log" 2>&1 &
PIDS+=($!)
RUST_LOG=debug "$BIN" --log-format json run --config "$WORK/b.toml" > "$WORK/proxy-b.log" 2>&1 &
PIDS+=($!)

set +e
timeout --signal=TERM 120 "$PY" -W ignore::DeprecationWarning "$HERE/$SCRIPT" \
    --blue "127.0.0.1:$P_BLUE" --green "127.0.0.1:$P_GREEN" \
    --proxy-a "127.0.0.1:$P_A" --preview-a "127.0.0.1:$P_A_PREVIEW" --admin-a "127.0.0.1:$P_A_ADMIN" \
    --proxy-b "127.0.0.1:$P_B" --admin-b "127.0.0.1:$P_B_ADMIN" \
    --admin-token-file "$WORK/admin.token" \
    --key-good-1 "$KEY_GOOD_1" --key-good-2 "$KEY_GOOD_2" --key-bad "$KEY_BAD" \
    --log-a "$WORK/proxy-a.log" --log-b "$WORK/proxy-b.log" \
    --pids "${PIDS[*]}"
STATUS=$?
set -e
if [[ $STATUS -ne 0 ]]; then
    for log in proxy-a proxy-b stub-blue stub-green; do
        echo "--- last lines of $log.log (without health-probe noise) ---" >&2
        grep -v 'hyper_util::client::legacy' "$WORK/$log.log" | tail -n 15 >&2 || true
    done
    [[ $STATUS -eq 124 ]] && echo "$LABEL: FAILED: $SCRIPT timed out after 120 s" >&2
    echo "$LABEL: FAILED (exit $STATUS)" >&2
fi
exit "$STATUS"
