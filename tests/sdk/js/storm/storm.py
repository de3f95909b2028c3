"""Flip storm, Python side: N live STT streams through the official deepgram-sdk 7.17 (no SDK
reconnect: this app reconnects itself on 1012). Writes $OUT/py.json. Everything bounded."""

import json
import os
import random
import sys
import threading
import time
import traceback
import uuid

import websockets.exceptions as wsx
from deepgram import DeepgramClient
from deepgram.environment import DeepgramClientEnvironment

ADDR = sys.argv[1]  # host:port of the proxy listener
OUT = sys.argv[2]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 10
CHUNK = bytes([9]) * 640
STOP = threading.Event()
T_END = time.monotonic() + 85.0


def now_ms():
    return int(time.time() * 1000)


def env_for(addr):
    return DeepgramClientEnvironment(base=f"http://{addr}", production=f"ws://{addr}", agent=f"ws://{addr}", agent_rest=f"http://{addr}")


class Stream:
    def __init__(self, i):
        self.i = i
        self.session = f"storm-py-{i}-{uuid.uuid4()}"
        self.dg = DeepgramClient(environment=env_for(ADDR), session_id=self.session, api_key="storm-py-any", timeout=10.0)
        self.conns = []
        self.errors = []
        self.pending = 0
        self.generated = 0
        self.lock = threading.Lock()
        self.cur = None  # (record, socket)
        self.finished = False
        self.closing_sent = False

    # ---- sender thread: 640 B every 20 ms, buffered while disconnected ----
    def flush_locked(self):
        if self.cur is None:
            return
        rec, s = self.cur
        while self.pending > 0:
            try:
                s.send_media(CHUNK)
            except wsx.ConnectionClosed:
                return
            except Exception as exc:  # noqa: BLE001
                self.errors.append({"t": now_ms(), "e": f"send_media: {exc!r}"})
                return
            self.pending -= 1
            rec["sent"] += 1

    def sender(self):
        next_t = time.monotonic()
        while not self.finished and time.monotonic() < T_END:
            next_t += 0.02
            with self.lock:
                if not STOP.is_set():
                    self.pending += 1
                    self.generated += 1
                    self.flush_locked()
                elif self.cur is not None and not self.closing_sent:
                    self.flush_locked()
                    rec, s = self.cur
                    if self.pending == 0:
                        rec["sent_before_closestream"] = rec["sent"]
                        try:
                            s.send_close_stream()
                            rec["closestream_at"] = now_ms()
                            self.closing_sent = True
                        except Exception as exc:  # noqa: BLE001
                            self.errors.append({"t": now_ms(), "e": f"CloseStream: {exc!r}"})
            time.sleep(max(0.0, next_t - time.monotonic()))

    # ---- receiver / connection loop ----
    def run(self):
        rounds = 0
        while not self.finished and time.monotonic() < T_END and rounds < 80:
            rounds += 1
            rec = {"idx": len(self.conns), "hs_start": now_ms(), "sent": 0, "sent_before_closestream": None,
                   "results": 0, "results_dur": 0.0, "ff": 0, "meta": None, "close": None, "msgs": []}
            try:
                with self.dg.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000") as s:
                    ws = s._websocket
                    rec["hs_end"] = now_ms()
                    rec["open_at"] = rec["hs_end"]
                    rec["color"] = ws.response.headers.get("x-switchyard-color")
                    rec["stub_hdr"] = ws.response.headers.get("x-stub-name")
                    self.conns.append(rec)
                    with self.lock:
                        self.cur = (rec, s)
                        self.closing_sent = False
                        self.flush_locked()
                    while True:
                        try:
                            m = s.recv()
                        except wsx.ConnectionClosed as exc:
                            rcvd = exc.rcvd
                            rec["close"] = {"code": rcvd.code if rcvd else None, "reason": rcvd.reason if rcvd else None,
                                            "t": now_ms(), "exc": type(exc).__name__}
                            break
                        t = now_ms()
                        typ = getattr(m, "type", None)
                        if typ == "Results":
                            rec["results"] += 1
                            rec["results_dur"] += float(getattr(m, "duration", 0) or 0)
                            ff = bool(getattr(m, "from_finalize", False))
                            if ff:
                                rec["ff"] += 1
                            rec["msgs"].append(["Resultsff" if ff else "Results", t])
                        else:
                            if typ == "Metadata":
                                rec["meta"] = {"duration": m.duration, "stub": (m.model_extra or {}).get("stub"), "t": t}
                            rec["msgs"].append([str(typ), t])
                        del rec["msgs"][:-6]
                    with self.lock:
                        self.cur = None
            except Exception as exc:  # noqa: BLE001
                with self.lock:
                    self.cur = None
                self.errors.append({"t": now_ms(), "e": f"connect/recv: {exc!r}"})
                if rec.get("hs_end") is None:
                    rec["connect_error"] = repr(exc)
                time.sleep(0.5)
                continue
            code = rec["close"]["code"] if rec["close"] else None
            if self.closing_sent and code == 1000:
                self.finished = True
                break
            if code == 1012:
                time.sleep(random.uniform(0.05, 2.0))  # the app's reconnect delay
                continue
            self.errors.append({"t": now_ms(), "e": f"unexpected close {rec['close']}"})
            time.sleep(1.0)
        self.finished = True

    def summary(self):
        return {"kind": "listen", "lang": "py", "i": self.i, "session": self.session, "generated": self.generated,
                "pending_left": self.pending, "errors": self.errors, "conns": self.conns}


def main():
    streams = [Stream(i) for i in range(N)]
    threads = []
    for st in streams:
        for fn in (st.run, st.sender):
            th = threading.Thread(target=fn, daemon=True)
            th.start()
            threads.append(th)
        time.sleep(0.02)
    for _ in range(300):
        if all(st.conns for st in streams):
            break
        time.sleep(0.05)
    open(os.path.join(OUT, "py-ready"), "w").write(str(now_ms()))
    print(f"[py] {sum(1 for st in streams if st.conns)}/{N} streams open", flush=True)
    for _ in range(900):  # bounded: 90 s
        if os.path.exists(os.path.join(OUT, "stop")) or time.monotonic() > T_END - 15:
            break
        time.sleep(0.1)
    STOP.set()
    print("[py] stop", flush=True)
    for th in threads:
        th.join(max(0.1, T_END - time.monotonic()))
    with open(os.path.join(OUT, "py.json"), "w") as f:
        json.dump({"streams": [st.summary() for st in streams]}, f, indent=1)
    print(f"[py] done: {sum(1 for st in streams if st.finished)}/{N} finished", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
