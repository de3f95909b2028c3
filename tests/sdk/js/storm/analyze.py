"""Checks the flip-storm invariants from node.json, py.json, proxy.log, status/metrics/history."""

import collections
import json
import os
import re
import sys

OUT = sys.argv[1]
GRACE_MS = 2000
SLACK_MS = int(os.environ.get("SLACK_MS", "400"))  # scheduling slack for "closed at the deadline"

node = json.load(open(os.path.join(OUT, "node.json")))
py = json.load(open(os.path.join(OUT, "py.json")))
status = json.load(open(os.path.join(OUT, "status.json")))
history = json.load(open(os.path.join(OUT, "history.json")))
metrics = open(os.path.join(OUT, "metrics.txt")).read()
log_lines = open(os.path.join(OUT, "proxy.log")).read().splitlines()

recs = []
for line in log_lines:
    try:
        recs.append(json.loads(line))
    except ValueError:
        recs.append({"raw": line, "level": "RAW"})

streams = []
for s in node["streams"]:
    s.setdefault("lang", "js")
    streams.append(s)
streams.extend(py["streams"])

results = {}
details = collections.defaultdict(list)


def fail(inv, msg):
    details[inv].append(msg)


def sid(s):
    return f"{s['lang']}-{s['kind']}#{s['i']}"


# ---- the route timeline from the admin calls ---------------------------------------------------
def dur_ms(v):
    if v is None:
        return None
    m = re.fullmatch(r"(\d+)(ms|s)", v)
    return int(m.group(1)) * (1 if m.group(2) == "ms" else 1000)


initial = node["status0"]["active"]
T0 = node["T0"]
changes = []
for ev in node["admin"]:
    j = ev.get("json") if isinstance(ev.get("json"), dict) else {}
    if ev.get("status") == 200 and j.get("changed") and ev["path"] in ("/flip", "/rollback"):
        prev = changes[-1]["to"] if changes else initial
        changes.append({"sent": ev["sent"], "recv": ev["recv"], "from": prev, "to": j["active"],
                        "gen": j["generation"], "timeout": dur_ms(ev["body"].get("drain_timeout")),
                        "label": f"{ev['label']}@{ev.get('at')}", "at": ev.get("at")})
    elif ev["path"] == "/commit" and ev.get("status") != 200:
        fail("admin", f"commit answered {ev.get('status')} {ev.get('json')}")
    elif ev["label"] == "rollback-expect-409" and not (ev.get("status") == 409 and j.get("error") == "no_rollback_target"):
        fail("admin", f"rollback after commit: expected 409 no_rollback_target, got {ev.get('status')} {j}")
    elif ev["label"] == "flip-noop":
        if not (ev.get("status") == 200 and j.get("changed") is False and j.get("generation") == (changes[-1]["gen"] if changes else None)):
            fail("admin", f"no-op flip: expected 200 changed=false same generation, got {ev.get('status')} {j.get('changed')} {j.get('generation')}")
    elif ev["label"] in ("flip", "rollback") and not (ev.get("status") == 200 and j.get("changed")):
        fail("admin", f"{ev['label']} {ev['body']} answered {ev.get('status')} {j}")
for a, b in zip(changes, changes[1:]):
    if b["from"] != a["to"] or b["gen"] <= a["gen"]:
        fail("admin", f"timeline inconsistent: {a} then {b}")


def possible_colors(t0, t1):
    """Colours that may have been active at some instant of [t0, t1]."""
    out = set()
    cur = initial
    for c in changes:
        if c["recv"] < t0:
            cur = c["to"]
    out.add(cur)
    for c in changes:
        if c["sent"] <= t1 and c["recv"] >= t0:
            out.add(c["from"])
            out.add(c["to"])
        if t0 <= c["recv"] <= t1:
            out.add(c["to"])
    return out


def expected_drain(conn, color):
    """Drain windows for a connection on `color` opened in [hs_start, hs_end].
    Returns (definite, maybes): definite = (window, change) the stream must be closed in; maybes =
    windows in which a 1012 is acceptable (ambiguous coverage or cancellation)."""
    maybes = []
    hs0, hs1 = conn["hs_start"], conn["hs_end"]
    for k, c in enumerate(changes):
        if c["from"] != color or c["recv"] < hs0:
            continue
        covered = "yes" if hs1 < c["sent"] else "maybe"
        to = c["timeout"]
        nxt = changes[k + 1] if k + 1 < len(changes) else None
        if nxt is None:
            cancel = "no"
        elif nxt["recv"] < c["sent"] + to:
            cancel = "yes"
        elif nxt["sent"] > c["recv"] + to:
            cancel = "no"
        else:
            cancel = "maybe"
        window = (c["sent"] + to, c["recv"] + to + GRACE_MS + SLACK_MS, c)
        if cancel == "yes":
            continue
        if covered == "yes" and cancel == "no":
            return window, maybes
        maybes.append(window)
    return None, maybes


# ---- per-connection checks (invariants 1, 2, 3) -----------------------------------------------
n_conns = 0
codes = collections.Counter()
latencies = []
cancel_protected = 0  # connections that survived a cancelled drain
for s in streams:
    for e in s["errors"]:
        fail("1", f"{sid(s)} client error: {e}")
    for conn in s["conns"]:
        n_conns += 1
        cl = conn.get("close") or {}
        code = cl.get("code")
        codes[(s["lang"], s["kind"], code)] += 1
        tag = f"{sid(s)} conn{conn['idx']} ({conn.get('color')}, {s['session'][:18]})"
        own_close = conn.get("closestream_at") or conn.get("close_sent_at") or conn.get("sent_before_closestream") is not None
        # 1: close codes
        if code == 1000:
            if not own_close:
                fail("1", f"{tag}: 1000 without the client's CloseStream/Close")
        elif code == 1012:
            pass
        else:
            fail("1", f"{tag}: close code {code} {cl}")
        # 3: colour
        color = conn.get("color")
        if conn.get("hs_start") is None or conn.get("hs_end") is None:
            fail("3", f"{tag}: handshake times missing {conn.get('hs_start')} {conn.get('hs_end')}")
        else:
            ok = possible_colors(conn["hs_start"], conn["hs_end"])
            if color not in ok:
                fail("3", f"{tag}: landed on {color} but {sorted(ok)} active during handshake [{conn['hs_start']},{conn['hs_end']}]")
        if conn.get("stub_hdr") != color:
            fail("3", f"{tag}: x-stub-name {conn.get('stub_hdr')} != x-switchyard-color {color}")
        if s["kind"] == "listen" and conn.get("meta") and conn["meta"].get("stub") != color:
            fail("3", f"{tag}: Metadata.stub {conn['meta'].get('stub')} != {color}")
        if s["kind"] == "speak" and conn.get("greeting") and conn["greeting"].get("stub") != color:
            fail("3", f"{tag}: speak greeting stub {conn['greeting'].get('stub')} != {color}")
        # 2: what came before a 1012, and whether a 1012 was due
        kinds = [m[0] for m in conn.get("msgs", [])]
        if code == 1012:
            if s["kind"] == "listen":
                meta = conn.get("meta")
                if not meta:
                    fail("2", f"{tag}: 1012 without Metadata; last msgs {kinds}")
                elif conn.get("ff", 0) < 1:
                    fail("2", f"{tag}: 1012 without a from_finalize Results; last msgs {kinds}")
                elif kinds[-2:] != ["Resultsff", "Metadata"]:
                    fail("2", f"{tag}: last messages before 1012 are {kinds}")
            else:
                if conn.get("flushed", 0) < 1 or not kinds or kinds[-1] != "Flushed":
                    fail("2", f"{tag}: 1012 without Flushed last; msgs {conn.get('msgs')}")
        if conn.get("hs_start") is None or code is None:
            continue
        definite, maybes = expected_drain(conn, color)
        t = cl["t"]
        windows = ([definite] if definite else []) + maybes
        if code == 1012:
            hit = [w for w in windows if w[0] - 50 <= t <= w[1]]
            if not hit:
                near = ", ".join(f"{w[2]['label']} [{w[0]-node['T0']},{w[1]-node['T0']}]" for w in windows) or "none"
                fail("2", f"{tag}: 1012 at +{t - node['T0']} ms matches no uncancelled drain deadline (opened +{conn['hs_start']-node['T0']}; candidate windows: {near})")
            else:
                latencies.append(t - hit[0][0])
        elif code == 1000 and definite and definite[0] < t and not (
                (conn.get("closestream_at") or conn.get("close_sent_at") or 1e18) <= definite[2]["recv"] + definite[2]["timeout"] + 50):
            fail("2", f"{tag}: never drained: due at +{definite[0]-node['T0']} ms ({definite[2]['label']}), closed 1000 at +{t-node['T0']} ms")
        # survived a cancelled drain?
        for k, c in enumerate(changes):
            if c["from"] == color and conn["hs_end"] < c["sent"] and k + 1 < len(changes):
                nxt = changes[k + 1]
                if nxt["recv"] < c["sent"] + c["timeout"] and t > c["recv"] + c["timeout"] + GRACE_MS:
                    cancel_protected += 1
                    break

# ---- invariant 4: audio accounting against the proxy's "stream ended" lines ----------------------
ended = collections.defaultdict(list)
drain_lines = collections.defaultdict(list)
for r in recs:
    span = r.get("span") or {}
    if r.get("message") == "stream ended":
        ended[span.get("session")].append(r)
    elif r.get("message") == "drain deadline: ending the stream":
        drain_lines[span.get("session")].append(r)
acct_ok = acct_n = dropped_total = 0
for s in streams:
    lines = [r for r in ended.get(s["session"], [])]
    path = "/v1/listen" if s["kind"] == "listen" else "/v1/speak"
    lines = [r for r in lines if r["span"].get("path") == path]
    if len(lines) != len(s["conns"]):
        fail("4", f"{sid(s)}: {len(s['conns'])} connections but {len(lines)} 'stream ended' lines")
    for conn, r in zip(s["conns"], lines):
        tag = f"{sid(s)} conn{conn['idx']} ({conn.get('color')})"
        if r["span"].get("color") != conn.get("color"):
            fail("4", f"{tag}: log line colour {r['span'].get('color')} (order mismatch?)")
        code = (conn.get("close") or {}).get("code")
        if r.get("close_code") != code and not (code == 1000 and r.get("reason") == "upstream"):
            fail("4", f"{tag}: log close_code {r.get('close_code')} reason {r.get('reason')} vs client {code}")
        if code == 1012 and r.get("reason") != "drain_graceful":
            fail("4", f"{tag}: 1012 with reason {r.get('reason')}")
        if s["kind"] != "listen":
            continue
        acct_n += 1
        meta = conn.get("meta")
        transcribed = round(meta["duration"] * 50) if meta else None
        dropped = r.get("dropped_frames")
        dropped_total += dropped or 0
        sent = conn["sent"]
        if transcribed is None:
            fail("4", f"{tag}: no Metadata, cannot account (sent {sent}, dropped {dropped})")
            continue
        if sent != transcribed + dropped:
            own_cs = conn.get("closestream_at") is not None and code == 1012
            hint = " [client's own CloseStream raced the drain: swallowed, counted in dropped_frames, answered 1012]" if own_cs and transcribed + dropped == sent + 1 else ""
            fail("4", f"{tag}: sent {sent} != transcribed {transcribed} + dropped {dropped} (close {code}, bytes_to_upstream {r.get('bytes_to_upstream')}, own CloseStream at +{(conn.get('closestream_at') or T0) - T0}, closed +{(conn.get('close') or {}).get('t', T0) - T0}){hint}")
        else:
            acct_ok += 1
        text = r.get("bytes_to_upstream", 0) - (sent - dropped) * 640
        if text not in (0, 22, 23):
            fail("4", f"{tag}: bytes_to_upstream {r.get('bytes_to_upstream')} != (sent-dropped)*640 + CloseStream ({text} left)")

# ---- invariant 5: end state --------------------------------------------------------------------
for c in ("blue", "green"):
    col = status["colors"][c]
    if col["open_streams"] or col["in_flight"]:
        fail("5", f"/status {c}: open_streams {col['open_streams']} in_flight {col['in_flight']}")
    for u in col["upstreams"]:
        if u["open_streams"] or u["in_flight"]:
            fail("5", f"/status {c} upstream {u['url']}: {u}")
mvals = collections.defaultdict(dict)
for line in metrics.splitlines():
    m = re.match(r"^(switchyard_\w+)(\{[^}]*\})?\s+(\S+)$", line)
    if m:
        mvals[m.group(1)][m.group(2) or ""] = float(m.group(3))
for name in ("switchyard_open_streams", "switchyard_draining_streams"):
    for lab, v in mvals[name].items():
        if v != 0:
            fail("5", f"{name}{lab} = {v}")
closes = mvals["switchyard_stream_closes_total"]
close_sum = sum(closes.values())
by_reason = collections.Counter()
for lab, v in closes.items():
    by_reason[re.search(r'reason="(\w+)"', lab).group(1)] += v
if close_sum != n_conns:
    fail("5", f"stream_closes_total sums to {close_sum}, clients saw {n_conns} connections ({dict(by_reason)})")
if by_reason.get("error"):
    fail("5", f"stream_closes_total reason=error: {by_reason['error']}")
n_ended_lines = sum(len(v) for v in ended.values())
if n_ended_lines != n_conns:
    fail("5", f"{n_ended_lines} 'stream ended' lines vs {n_conns} connections")
for lab, v in mvals["switchyard_requests_total"].items():
    if 'code="5xx"' in lab and v:
        fail("5", f"requests_total{lab} = {v}")
ws101 = sum(v for lab, v in mvals["switchyard_requests_total"].items() if 'protocol="websocket"' in lab and 'code="1xx"' in lab)
if ws101 != n_conns:
    fail("5", f"requests_total websocket 1xx = {ws101}, clients saw {n_conns} connections")
hist = history["history"]
gens = [h["generation"] for h in hist]
if gens != list(range(gens[0], gens[0] + len(gens))):
    fail("admin", f"history generations not consecutive: {gens}")

# ---- invariant 5m: mid-storm /status + metrics samples -------------------------------------------
n_samples = 0
for sm in node.get("samples", []):
    if "error" in sm:
        fail("5m", f"sample at +{sm['t0']-T0}: {sm['error']}")
        continue
    n_samples += 1
    prev = [c for c in changes if c["recv"] < sm["t0"]]
    if any(c["sent"] <= sm["t1"] and c["recv"] >= sm["t0"] for c in changes):
        continue  # a change in flight while sampling
    k = prev[-1] if prev else None
    active = k["to"] if k else initial
    if sm["active"] != active:
        fail("5m", f"sample +{sm['t0']-T0}: /status active {sm['active']} but the last change made {active}")
    if k is None:
        continue
    standby = k["from"]
    dr = lambda c: sm["m"].get(f"draining_streams:{c}", 0)
    op = lambda c: sm["m"].get(f"open_streams:{c}", 0)
    at = f"sample +{sm['t0']-T0} ms after {k['label']} (+{k['recv']-T0})"
    if sm["t0"] > k["recv"] + 100 and dr(active) != 0:
        fail("5m", f"{at}: draining_streams{{{active}}} = {dr(active)} on the active colour")
    if sm["t0"] > k["recv"] + k["timeout"] + GRACE_MS + 500:
        if sm["colors"][standby]["open"] or op(standby) or dr(standby) or sm["colors"][standby]["state"] != "standby":
            fail("5m", f"{at}: standby {standby} past deadline+grace still has open {sm['colors'][standby]['open']} (metric {op(standby)}), draining {dr(standby)}, state {sm['colors'][standby]['state']}")
    elif sm["t0"] > k["recv"] + 100 and sm["t1"] < k["sent"] + k["timeout"] - 50:
        # inside the drain window: every stream on the standby colour is covered
        if dr(standby) != op(standby):
            fail("5m", f"{at}: inside the drain window draining_streams{{{standby}}} = {dr(standby)} but open_streams = {op(standby)}")
        if op(standby) and sm["colors"][standby]["state"] != "draining":
            fail("5m", f"{at}: {standby} has {op(standby)} streams in its drain window but state {sm['colors'][standby]['state']}")

# ---- invariant 6: log levels, panics ------------------------------------------------------------
levels = collections.Counter(r.get("level") for r in recs)
for r in recs:
    if r.get("level") not in ("INFO", "DEBUG", "TRACE"):
        fail("6", f"proxy log: {json.dumps(r)[:400]}")
for f in ("stub-blue.log", "stub-green.log", "node.out", "py.out"):
    text = open(os.path.join(OUT, f)).read()
    for line in text.splitlines():
        if re.search(r"panic|ERROR|WARN|Traceback", line):
            fail("6", f"{f}: {line[:300]}")
if any("panic" in l for l in log_lines):
    fail("6", "panic in proxy log")

# ---- report --------------------------------------------------------------------------------------
print(f"\n== {OUT}")
print(f"connections: {n_conns}  codes: {dict(codes)}")
print(f"route changes: {len(changes)} (+commit); history entries {len(hist)}; final /status active={status['active']} gen={status['generation']}")
print(f"stream_closes_total by reason: {dict(by_reason)}; 'stream ended' lines: {n_ended_lines}; drain-injection lines: {sum(len(v) for v in drain_lines.values())}")
if latencies:
    latencies.sort()
    print(f"1012 close latency after the drain deadline (ms): min {latencies[0]} p50 {latencies[len(latencies)//2]} max {latencies[-1]}  (n={len(latencies)})")
print(f"connections that outlived a cancelled drain deadline (by > grace): {cancel_protected}")
print(f"audio accounting: {acct_ok}/{acct_n} listen connections exact; total dropped_frames {dropped_total}")
print(f"mid-storm samples: {n_samples}")
print(f"proxy log levels: {dict(levels)}")
names = {"admin": "admin API / timeline", "1": "close codes 1000/1012 only", "2": "finals before 1012; drains at the deadline; cancelled drains close nothing",
         "3": "reconnect lands on the active colour", "4": "audio accounting", "5": "end state: status + metrics", "5m": "mid-storm samples: gauges/status agree with the drain state", "6": "no unexplained WARN/ERROR/panic"}
bad = 0
for k, name in names.items():
    d = details.get(k, [])
    print(f"{'PASS' if not d else 'FAIL'} [{k}] {name}" + (f": {len(d)} problem(s)" if d else ""))
    for m in d[:15]:
        print(f"     - {m}")
    if len(d) > 15:
        print(f"     ... {len(d) - 15} more")
    bad += bool(d)
sys.exit(1 if bad else 0)
