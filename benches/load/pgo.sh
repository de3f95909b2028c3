#!/usr/bin/env bash
# A release build of Switchyard optimised with the profile of its own hot paths (PGO):
# build an instrumented binary, run it as a proxy under the load `run.sh` measures (HTTP/1.1,
# h2c, an HTTP/1.1 upload, WebSocket frames, flips), merge what it recorded, and build again
# with that profile.
#
#   benches/load/pgo.sh        → target/pgo/release/switchyard (and examples/ws_load beside it)
#   FEATURES=etcd benches/load/pgo.sh      the same with cargo features (both builds)
#
# Needs llvm-profdata matching rustc's LLVM (`rustup component add llvm-tools`), wrk and
# h2load (Debian: wrk, nghttp2-client). Two full release builds and a minute of load:
# about 10 min on 2 cores.
# The stub origins (and `ctl`) run from the instrumented binary too, but only the proxy's
# profile is merged. Loopback only; every process it starts is stopped by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECONDS_EACH=${SECONDS_EACH:-8}
FEATURES=${FEATURES:-}
for tool in wrk h2load curl; do
    command -v $tool >/dev/null || { echo "needs $tool (apt-get install wrk nghttp2-client curl)" >&2; exit 2; }
done
PROFDATA=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f | head -1)
[[ -x $PROFDATA ]] || { echo "needs llvm-profdata: rustup component add llvm-tools" >&2; exit 2; }

DIR=$(mktemp -d /tmp/switchyard-pgo.XXXXXX)
# RUSTFLAGS replaces the rustflags of .cargo/config.toml, so both builds repeat them. The
# instrumented build's own profile path is fixed (LLVM_PROFILE_FILE overrides it at run
# time), so running this again does not rebuild it.
CFG="--cfg tokio_unstable"
echo "pgo: instrumented build in $TARGET/pgo-gen" >&2
(cd "$ROOT" && RUSTFLAGS="$CFG -Cprofile-generate=$TARGET/pgo-gen/profile" CARGO_TARGET_DIR="$TARGET/pgo-gen" \
    cargo build --release --quiet --features "$FEATURES" --bin switchyard --example ws_load)
SY=$TARGET/pgo-gen/release/switchyard
WS_LOAD=$TARGET/pgo-gen/release/examples/ws_load

BASE=$((24000 + (RANDOM % 40) * 20))
source "$ROOT/benches/load/common.sh"
# Each process writes its profile under its PID; only the proxy's is merged.
export LLVM_PROFILE_FILE="$DIR/profile/%p.profraw"
start_switchyard $BASE
URL=http://127.0.0.1:$((BASE + 2))

echo "pgo: training, ${SECONDS_EACH}s per load" >&2
wrk -t1 -c64 -d"${SECONDS_EACH}s" "$URL/v1/status" >"$DIR/wrk.txt"
h2load -t1 -c16 -m10 -D"$SECONDS_EACH" "$URL/v1/status" >"$DIR/h2load.txt"
head -c 65536 /dev/urandom >"$DIR/audio.bin"
h2load --h1 -t1 -c8 -n 4000 -d "$DIR/audio.bin" -H 'content-type: audio/wav' "$URL/v1/listen" >"$DIR/upload.txt"
"$WS_LOAD" --url "ws://127.0.0.1:$((BASE + 2))/v1/agent/converse" --streams 200 \
    --duration "$SECONDS_EACH" >"$DIR/ws.txt"
for _ in 1 2 3 4; do
    "$SY" ctl --admin "http://127.0.0.1:$((BASE + 3))" --token-file "$DIR/admin.token" flip --force >/dev/null
    curl -fsS -o /dev/null "$URL/v1/status"
done
curl -fsS -o /dev/null "http://127.0.0.1:$((BASE + 3))/metrics"
grep -h 'requests in\|requests: \|^streams=' "$DIR"/wrk.txt "$DIR"/h2load.txt "$DIR"/upload.txt "$DIR"/ws.txt >&2
# The profile is written when the process exits; SIGTERM drains and exits 0.
kill -TERM "$SY_PID"
wait "$SY_PID"
"$PROFDATA" merge -o "$DIR/merged.profdata" "$DIR/profile/$SY_PID.profraw"

echo "pgo: optimised build in $TARGET/pgo" >&2
(cd "$ROOT" && RUSTFLAGS="$CFG -Cprofile-use=$DIR/merged.profdata" CARGO_TARGET_DIR="$TARGET/pgo" \
    cargo build --release --quiet --features "$FEATURES" --bin switchyard --example ws_load)
echo "$TARGET/pgo/release/switchyard"
