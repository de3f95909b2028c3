"""What the Python SDK interop checks share (interop.py for the current SDK, interop_v4.py for the
last 4.x): the PASS/FAIL bookkeeping, the stub's fixed facts, admin API calls, readiness waits and
the summary. run.sh starts the processes and passes their addresses to either script alike.

Every wait here is on an HTTP answer with a timeout, or a bounded poll where no signal exists
(readiness).
"""

import argparse
import hashlib
import json
import sys
import time
import traceback
import urllib.error
import urllib.request

HTTP_TIMEOUT = 10.0
DRAIN_TIMEOUT = 1.0  # the flip's drain_timeout
DRAIN_GRACE = 2.0  # drain.grace in run.sh's config
BYTES_PER_RESULT = 3200  # the stub answers one Results per 3200 audio bytes
AUDIO_BYTES_PER_SECOND = 32000.0  # the stub's notion of audio duration
SPEAK_CHUNK = 4096  # the stub's REST TTS chunk
TTS_FRAME = 1920  # the stub's WS TTS frame, one per 10 characters

RESULTS = []  # (scenario, check, ok, detail)
NOTES = []
PIDS = []  # run.sh's processes, watched while waiting for readiness


def check(scenario, name, ok, detail=""):
    RESULTS.append((scenario, name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'} [{scenario}] {name}{(': ' + detail) if detail else ''}", flush=True)
    return bool(ok)


def note(text):
    if text in NOTES:
        return
    NOTES.append(text)
    print(f"NOTE {text}", flush=True)


def scenario(tag):
    """Runs a scenario function; an exception fails the scenario with its traceback."""

    def wrap(fn):
        def run(*a, **kw):
            try:
                fn(*a, **kw)
            except Exception as exc:  # noqa: BLE001 - any error is a failed check
                tb = traceback.format_exc(limit=6)
                check(tag, f"{fn.__name__} raised {type(exc).__module__}.{type(exc).__name__}", False, f"{exc}\n{tb}")

        return run

    return wrap


def audio(n, seed=0):
    """Deterministic non-trivial bytes (never empty frames: Switchyard must not send one and
    neither should we)."""
    out = bytearray()
    block = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{block}".encode()).digest()
        block += 1
    return bytes(out[:n])


def http_json(method, url, token=None, body=None, timeout=HTTP_TIMEOUT):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def dead_processes():
    """The started processes (run.sh's PIDs) that have exited (gone or zombie)."""
    dead = []
    for pid in PIDS:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                dead.append(pid)
        except OSError:
            dead.append(pid)
    return dead


def fail_if_dead():
    dead = dead_processes()
    if dead:
        raise RuntimeError(f"process(es) {dead} exited during start-up (see the logs run.sh prints)")


def wait_ready(admin, deadline_s=20.0):
    """Bounded poll: /readyz 200 and both colours' upstreams healthy in /status."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        fail_if_dead()
        try:
            code, _ = http_json("GET", f"http://{admin}/readyz", timeout=1)
            if code == 200:
                code, status = http_json("GET", f"http://{admin}/status", timeout=1)
                last = status
                ups = [u for c in ("blue", "green") for u in status["colors"][c]["upstreams"]]
                if ups and all(u.get("healthy") for u in ups):
                    return status
        except (OSError, ValueError, KeyError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{admin} not ready with both colours healthy within {deadline_s}s: {last}")


def wait_url(url, deadline_s=10.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        fail_if_dead()
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {deadline_s}s")


def wait_drained(tag, a, colour):
    """Waits (bounded, server side) until `colour` holds no open streams on proxy A."""
    code, body = http_json("GET", f"http://{a.admin_a}/drain/wait?color={colour}&timeout=5s", timeout=10)
    return check(tag, f"{colour} holds no open streams", code == 200 and body.get("drained") is True, f"{code} {body}")


def reset_to_blue(tag, a):
    """Puts proxy A back on blue (the drains leave it on green), with green's leftover streams,
    if any, closed at once, and waits for green to be empty."""
    token = open(a.admin_token_file).read().strip()
    _, status = http_json("GET", f"http://{a.admin_a}/status")
    if status.get("active") != "blue":
        code, body = http_json(
            "POST", f"http://{a.admin_a}/flip", token, {"to": "blue", "drain_timeout": "0s", "reason": "sdk interop reset"}
        )
        check(
            tag,
            "reset: proxy A flipped back to blue",
            code == 200 and body.get("active") == "blue",
            f"{code} active={body.get('active')} generation={body.get('generation')}",
        )
    wait_drained(tag, a, "green")


def flip_to_green(tag, a, reason, streams=1):
    """Flips proxy A to green with drain_timeout DRAIN_TIMEOUT, and checks that blue then drains
    `streams` open streams; returns the monotonic time taken just before the request (the
    server's deadline is later than t + DRAIN_TIMEOUT)."""
    token = open(a.admin_token_file).read().strip()
    t_flip = time.monotonic()
    code, body = http_json(
        "POST", f"http://{a.admin_a}/flip", token, {"to": "green", "drain_timeout": f"{DRAIN_TIMEOUT:.0f}s", "reason": reason}
    )
    check(
        tag,
        "flip to green: 200 changed",
        code == 200 and body.get("active") == "green" and body.get("changed") is True,
        f"{code} active={body.get('active')} changed={body.get('changed')} error={body.get('error')}",
    )
    _, status = http_json("GET", f"http://{a.admin_a}/status")
    blue = status["colors"]["blue"]
    check(
        tag,
        f"status right after the flip: blue draining with {streams} open stream{'' if streams == 1 else 's'}",
        blue["state"] == "draining" and blue["open_streams"] == streams,
        f"state={blue['state']} open_streams={blue['open_streams']}",
    )
    return t_flip


def start(label, packages):
    """Reads run.sh's arguments, prints the versions of `packages`, and waits until the stubs
    and both proxies are ready. Returns (arguments, start time), or None after printing why
    set-up failed."""
    p = argparse.ArgumentParser()
    for name in (
        "blue", "green", "proxy-a", "preview-a", "admin-a", "proxy-b", "admin-b", "admin-token-file",
        "key-good-1", "key-good-2", "key-bad", "log-a", "log-b",
    ):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--pids", default="")
    a = p.parse_args()
    PIDS.extend(int(x) for x in a.pids.split())

    from importlib import metadata

    versions = {pkg: metadata.version(pkg) for pkg in packages}
    print(f"{label}: {versions}, python {sys.version.split()[0]}", flush=True)
    started = time.monotonic()

    try:
        wait_url(f"http://{a.blue}/v1/status")
        wait_url(f"http://{a.green}/v1/status")
        wait_ready(a.admin_a)
        wait_ready(a.admin_b)
    except RuntimeError as exc:
        print(f"FAILED [setup] {exc}")
        print("0 passed, 1 failed")
        return None
    print(f"{label}: stubs and proxies ready in {time.monotonic() - started:.2f}s", flush=True)
    return a, started


def summary(label, started):
    """Prints the scenarios' verdicts and every failed check; the exit status."""
    failed = [r for r in RESULTS if not r[2]]
    passed = len(RESULTS) - len(failed)
    by_scenario = {}
    for sc, _, ok, _ in RESULTS:
        by_scenario[sc] = by_scenario.get(sc, True) and ok
    print()
    print(f"{label} scenarios: " + ", ".join(f"{sc} {'PASS' if ok else 'FAIL'}" for sc, ok in sorted(by_scenario.items())))
    for sc, name, _, detail in failed:
        print(f"FAILED [{sc}] {name}: {detail}")
    print(f"{label}: {len(NOTES)} notes, {time.monotonic() - started:.1f}s")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed or not RESULTS else 0
