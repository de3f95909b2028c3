"""Interop check: the last 4.x Python Deepgram SDK (deepgram-sdk 4.8.1) through Switchyard to its
stub upstreams.

The 4.x SDK is a different code base from the current one (interop.py): DeepgramClientOptions,
versioned sub-clients (`listen.rest.v("1")`, `listen.websocket.v("1")`, `speak.rest.v("1")`,
`speak.websocket.v("1")`), WebSockets consumed by an SDK thread that emits events to callbacks,
and REST errors raised as DeepgramApiError carrying the body's `err_msg`. It is still widely
deployed, so Switchyard must work with it too.

Run by `run.sh PATH/TO/switchyard v4`, which starts the processes (two stubs named blue and green,
proxy A without client auth and with a preview listener, proxy B with [client_auth]) and passes
their addresses, exactly as for interop.py. Every wait here is on a signal (an SDK event, a
close, an HTTP answer) with a timeout, or a bounded poll where no signal exists (readiness, log
lines being written).

Scenarios (PASS/FAIL lines per check, a summary line at the end, exit 1 on any failure):
  S1 pre-recorded  listen.rest.v("1").transcribe_file / transcribe_url via proxy A (blue) and the
                   preview listener (green); response headers seen through the SDK's `transport`
                   keyword (an httpx transport that records them)
  S2 live STT      listen.websocket.v("1"): audio -> Results, keep_alive(), finalize() ->
                   from_finalize Results, finish() -> final Results + Metadata, close 1000
  S3 TTS           speak.rest.v("1").stream_memory (audio, model_name/model_uuid, characters) and
                   speak.websocket.v("1"): Speak -> audio, Flush -> Flushed, Clear -> Cleared
  S4 drain         live STT and speak streams on blue, flip to green with drain_timeout 1s: final
                   Results + Metadata (STT) / Flushed (TTS) from blue, then the SDK reports the
                   1012 close (an Error event naming 1012, then Close); reconnects land on green;
                   proxy A is put back on blue at the end
  S5 client auth   proxy B: listed keys (api_key: Token, access_token: Bearer) pass; an unlisted
                   key -> DeepgramApiError 401 with Switchyard's err_msg (REST), refused handshake
                   (WS); no key or token appears in either proxy's log
NOTE lines record SDK or stub behaviour worth knowing that is not a Switchyard failure.
"""

import hashlib
import json
import logging
import sys
import threading
import time

import httpx
import websockets.exceptions as wsx
from deepgram import (
    DeepgramApiError,
    DeepgramClient,
    DeepgramClientOptions,
    LiveOptions,
    LiveResultResponse,
    LiveTranscriptionEvents,
    PrerecordedOptions,
    PrerecordedResponse,
    SpeakOptions,
    SpeakWebSocketEvents,
    SpeakWSOptions,
)
from harness import (
    AUDIO_BYTES_PER_SECOND,
    BYTES_PER_RESULT,
    DRAIN_GRACE,
    DRAIN_TIMEOUT,
    SPEAK_CHUNK,
    TTS_FRAME,
    audio,
    check,
    flip_to_green,
    note,
    reset_to_blue,
    scenario,
    start,
    summary,
    wait_drained,
)

EVENT_TIMEOUT = 5.0  # seconds for any single awaited SDK event
FINISH_TIMEOUT = 5.0  # the SDK's finish() sleeps 0.5 s and joins its threads
SPEAK_DEFAULT_CHUNKS = 8  # the stub's REST TTS chunk count without ?chunks=
ANY_KEY = "sdk-py-interop-anykey"  # the key used against proxy A (no client auth)
# The SDK logs every close other than 1000/1001 (the drain's 1012 included) at ERROR on its own
# stream handler; the events carry the same facts, so keep its output quiet.
SDK_LOG_LEVEL = logging.CRITICAL

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def client(addr, api_key=ANY_KEY, access_token="", **options):
    """A 4.x client for http://addr; `options` go to DeepgramClientOptions.options."""
    config = DeepgramClientOptions(url=f"http://{addr}", verbose=SDK_LOG_LEVEL, options=options)
    if access_token:
        return DeepgramClient(access_token=access_token, config=config)
    return DeepgramClient(api_key, config)


class HeaderTap(httpx.HTTPTransport):
    """An httpx transport that records the last response's status and headers. The 4.x REST
    clients hand a `transport` keyword to their httpx.Client, which is the only way to see the
    headers of a transcribe/speak answer (the SDK returns the parsed body only). One per call:
    the SDK closes it with its httpx.Client."""

    def __init__(self):
        super().__init__()
        self.status = None
        self.headers = {}

    def handle_request(self, request):
        response = super().handle_request(request)
        self.status = response.status_code
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        return response


class Events:
    """Records an SDK WebSocket client's events in order, for waiting on them (bounded)."""

    def __init__(self):
        self.cv = threading.Condition()
        self.items = []  # (monotonic time, kind, payload)

    def handler(self, kind):
        # The SDK emits some events with a keyword payload (result=, metadata=, flushed=, ...)
        # and others positionally (Open, Close and the Error of a failed receive).
        def on_event(_client, *args, **kw):
            payload = args[0] if args else (next(iter(kw.values())) if kw else None)
            with self.cv:
                self.items.append((time.monotonic(), kind, payload))
                self.cv.notify_all()

        return on_event

    def wait(self, pred, timeout=EVENT_TIMEOUT):
        with self.cv:
            return self.cv.wait_for(lambda: pred(self), timeout)

    def snapshot(self):
        with self.cv:
            return list(self.items)

    def of(self, kind):
        return [p for _, k, p in self.snapshot() if k == kind]

    def count(self, kind):
        return len(self.of(kind))

    def kinds(self, skip=("AudioData",)):
        return [k for _, k, _ in self.snapshot() if k not in skip]


def subscribe(conn, enum, events):
    for kind in enum.__members__.values():
        conn.on(kind, events.handler(str(kind)))


def ws_headers(sock):
    return sock.response.headers if sock is not None else {}


def close_code(sock):
    """The code of the close frame the client received (None if none)."""
    rcvd = getattr(getattr(sock, "protocol", None), "close_rcvd", None)
    return rcvd.code if rcvd is not None else None


def live_start(dg, events, **extra):
    """Starts listen.websocket.v("1") with the interop options; returns (conn, socket).
    The socket is kept because the SDK drops its reference when the stream ends."""
    conn = dg.listen.websocket.v("1")
    subscribe(conn, LiveTranscriptionEvents, events)
    opts = LiveOptions(model="nova-3", encoding="linear16", sample_rate=16000, interim_results=True, **extra)
    if not conn.start(opts):
        raise RuntimeError(f"listen.websocket start() returned False; events {events.kinds()}")
    return conn, conn._socket


def speak_start(dg, events):
    conn = dg.speak.websocket.v("1")
    subscribe(conn, SpeakWebSocketEvents, events)
    if not conn.start(SpeakWSOptions(model="aura-asteria-en", encoding="linear16", sample_rate=24000)):
        raise RuntimeError(f"speak.websocket start() returned False; events {events.kinds()}")
    return conn, conn._socket


def finish(conn, timeout=FINISH_TIMEOUT):
    """conn.finish() (joins the SDK's threads without a timeout), bounded."""
    t = threading.Thread(target=conn.finish, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def transcript(result):
    """A live Results event's transcript."""
    return result.channel.alternatives[0].transcript


def rest_transcript(response):
    """A pre-recorded answer's transcript."""
    return response.results.channels[0].alternatives[0].transcript


# ------------------------------------------------------------------------------------------
# S1 pre-recorded
# ------------------------------------------------------------------------------------------
@scenario("S1")
def s1_prerecorded(a):
    tag = "S1"
    for listener, addr, colour in (("proxy", a.proxy_a, "blue"), ("preview", a.preview_a, "green")):
        rest = client(addr).listen.rest.v("1")
        body = audio(256 * 1024, seed=1)
        tap = HeaderTap()
        r = rest.transcribe_file(
            {"buffer": body}, PrerecordedOptions(model="nova-3", smart_format=True, punctuate=True), transport=tap
        )
        check(
            tag,
            f"transcribe_file via {listener}: 200, x-switchyard-color={colour}, x-stub-name={colour}",
            tap.status == 200 and tap.headers.get("x-switchyard-color") == colour and tap.headers.get("x-stub-name") == colour,
            f"{tap.status} {tap.headers.get('x-switchyard-color')} / {tap.headers.get('x-stub-name')}",
        )
        check(
            tag,
            f"transcribe_file via {listener}: PrerecordedResponse, transcript names {colour}",
            isinstance(r, PrerecordedResponse) and rest_transcript(r) == f"{colour} heard {len(body)} bytes",
            f"{type(r).__name__} {rest_transcript(r)!r}",
        )
        check(
            tag,
            f"transcribe_file via {listener}: body arrived intact (sha256), request_id = dg-request-id",
            r.metadata.sha256 == hashlib.sha256(body).hexdigest()
            and r.metadata.request_id
            and r.metadata.request_id == tap.headers.get("dg-request-id"),
            f"request_id={r.metadata.request_id} header={tap.headers.get('dg-request-id')}",
        )
        url = "https://example.com/sdk-interop.wav"
        tap = HeaderTap()
        r = rest.transcribe_url({"url": url}, PrerecordedOptions(model="nova-3"), transport=tap)
        check(
            tag,
            f"transcribe_url via {listener}: 200 from {colour}, parsed",
            tap.status == 200
            and tap.headers.get("x-switchyard-color") == colour
            and isinstance(r, PrerecordedResponse)
            and rest_transcript(r).startswith(f"{colour} heard "),
            f"{tap.status} {tap.headers.get('x-switchyard-color')} {rest_transcript(r)!r}",
        )


# ------------------------------------------------------------------------------------------
# S2 live STT
# ------------------------------------------------------------------------------------------
@scenario("S2")
def s2_live(a):
    tag = "S2"
    ev = Events()
    conn, sock = live_start(client(a.proxy_a), ev)
    h = ws_headers(sock)
    check(
        tag,
        "start(): 101 via blue (x-switchyard-color, x-stub-name)",
        h.get("x-switchyard-color") == "blue" and h.get("x-stub-name") == "blue",
        f"{h.get('x-switchyard-color')} / {h.get('x-stub-name')}",
    )
    request_id = h.get("dg-request-id")
    sent = bytearray()
    sends = []
    for i in range(10):  # 10 x 640 bytes = 2 Results
        chunk = audio(640, seed=100 + i)
        sent += chunk
        sends.append(conn.send(chunk))
    ev.wait(lambda e: e.count("Results") >= 2)
    got = ev.of("Results")
    check(
        tag,
        "audio -> Results events (LiveResultResponse, is_final, the 101's request_id)",
        all(sends)
        and [transcript(m) for m in got] == ["blue 1", "blue 2"]
        and all(isinstance(m, LiveResultResponse) and m.is_final and m.metadata.request_id == request_id for m in got),
        f"{[transcript(m) for m in got]}",
    )
    check(tag, "keep_alive() sent", conn.keep_alive())
    tail = audio(1000, seed=200)
    sent += tail
    conn.send(tail)
    fin = conn.finalize()
    ev.wait(lambda e: e.count("Results") >= 3)
    got = ev.of("Results")
    m = got[2] if len(got) >= 3 else None
    check(
        tag,
        "KeepAlive accepted, finalize() -> Results from_finalize=true covering the tail",
        fin and m is not None and m.from_finalize is True and abs(m.duration - 1000 / AUDIO_BYTES_PER_SECOND) < 1e-9,
        f"{len(got)} Results, from_finalize={getattr(m, 'from_finalize', None)} duration={getattr(m, 'duration', None)}",
    )
    last = audio(500, seed=300)
    sent += last
    conn.send(last)
    n_before = len(ev.snapshot())
    finished = finish(conn)
    ev.wait(lambda e: "Metadata" in e.kinds() and "Close" in e.kinds())
    after = [k for k in ev.kinds()[n_before:] if k != "Close"]
    check(tag, "finish() (CloseStream) -> final Results then Metadata", finished and after == ["Results", "Metadata"], str(ev.kinds()[n_before:]))
    metas = ev.of("Metadata")
    meta = metas[-1] if metas else None
    check(
        tag,
        "Metadata: request_id matches, sha256 covers every audio byte in order, duration right",
        meta is not None
        and meta.request_id == request_id
        and meta.sha256 == hashlib.sha256(bytes(sent)).hexdigest()
        and abs(meta.duration - len(sent) / AUDIO_BYTES_PER_SECOND) < 1e-9,
        f"{getattr(meta, 'request_id', None)} duration={getattr(meta, 'duration', None)}",
    )
    check(
        tag,
        "clean close 1000: Close event, no Error event",
        close_code(sock) == 1000 and ev.count("Close") >= 1 and ev.count("Error") == 0,
        f"close_code={close_code(sock)} errors={[str(e) for e in ev.of('Error')]}",
    )
    kinds = ev.kinds()
    if "Close" in kinds and "Metadata" in kinds and kinds.index("Close") < kinds.index("Metadata"):
        note(
            "SDK 4.x: finish() emits the Close event as soon as it has sent CloseStream, before the "
            "final Results and Metadata arrive (they are still delivered; finish() waits 0.5 s)."
        )


# ------------------------------------------------------------------------------------------
# S3 TTS
# ------------------------------------------------------------------------------------------
@scenario("S3")
def s3_tts(a):
    tag = "S3"
    dg = client(a.proxy_a)
    text = "Hello from the Python SDK 4.x interop check."
    tap = HeaderTap()
    try:
        r = dg.speak.rest.v("1").stream_memory({"text": text}, SpeakOptions(model="aura-asteria-en"), transport=tap)
    except KeyError as exc:
        check(
            tag,
            "speak.rest stream_memory: answer has every header the SDK reads (model name/uuid, char count)",
            False,
            f"KeyError {exc}: the SDK reads dg-{exc.args[0]}; response headers {sorted(tap.headers)}",
        )
        r = None
    if r is not None:
        data = r.stream_memory.getvalue()
        check(
            tag,
            "speak.rest stream_memory: 200 audio/mpeg from blue, every byte in memory",
            tap.status == 200
            and tap.headers.get("x-switchyard-color") == "blue"
            and r.content_type == "audio/mpeg"
            and len(data) == SPEAK_DEFAULT_CHUNKS * SPEAK_CHUNK,
            f"{tap.status} {tap.headers.get('x-switchyard-color')} {r.content_type} {len(data)} bytes",
        )
        check(
            tag,
            "speak.rest stream_memory: model_name and model_uuid present (from dg-model-name/-uuid)",
            r.model_name not in ("", "None")
            and r.model_uuid not in ("", "None")
            and r.model_name == tap.headers.get("dg-model-name")
            and r.model_uuid == tap.headers.get("dg-model-uuid"),
            f"model_name={r.model_name!r} model_uuid={r.model_uuid!r}",
        )
        check(
            tag,
            "speak.rest stream_memory: characters = len(text), request_id = dg-request-id",
            r.characters == len(text) and r.request_id not in ("", "None") and r.request_id == tap.headers.get("dg-request-id"),
            f"characters={r.characters} request_id={r.request_id}",
        )

    ev = Events()
    conn, sock = speak_start(dg, ev)
    h = ws_headers(sock)
    check(tag, "speak WS: 101 via blue", h.get("x-switchyard-color") == "blue" and h.get("x-stub-name") == "blue", str(h.get("x-switchyard-color")))
    ev.wait(lambda e: e.count("Metadata") >= 1)
    metas = ev.of("Metadata")
    check(
        tag,
        "speak WS: Metadata event with the 101's request_id",
        len(metas) == 1 and metas[0].request_id == h.get("dg-request-id"),
        str(ev.kinds()),
    )
    sent_text = conn.send_text("x" * 35)
    flushed = conn.flush()
    ev.wait(lambda e: e.count("Flushed") >= 1)
    items = ev.snapshot()
    frames = [len(p) for _, k, p in items if k == "AudioData"]
    fl = ev.of("Flushed")
    flushed_at = next((i for i, (_, k, _) in enumerate(items) if k == "Flushed"), -1)
    last_audio = max((i for i, (_, k, _) in enumerate(items) if k == "AudioData"), default=-1)
    check(
        tag,
        "speak WS: send_text -> AudioData frames, flush() -> Flushed after them",
        sent_text and flushed and frames == [TTS_FRAME] * 4 and len(fl) == 1 and fl[0].sequence_id == 0 and last_audio < flushed_at,
        f"frames={frames} then {ev.kinds()}",
    )
    conn.send_text("y" * 10)
    cleared = conn.clear()
    ev.wait(lambda e: e.count("Cleared") >= 1)
    cl = ev.of("Cleared")
    check(tag, "speak WS: clear() -> Cleared", cleared and len(cl) == 1 and cl[0].sequence_id == 0, str(ev.kinds()))
    finished = finish(conn)
    ev.wait(lambda e: "Close" in e.kinds())
    check(
        tag,
        "speak WS: finish() (Close) -> clean close 1000, Close event, no Error event",
        finished and close_code(sock) == 1000 and ev.count("Close") >= 1 and ev.count("Error") == 0,
        f"close_code={close_code(sock)} errors={[str(e) for e in ev.of('Error')]}",
    )


# ------------------------------------------------------------------------------------------
# S4 drain
# ------------------------------------------------------------------------------------------
def paced_audio(conn, seed, stop):
    """Starts a thread sending 640-byte chunks every 20 ms (400 at most) until `stop` is set or
    the SDK's send() returns False (it does once the stream has ended)."""
    sent = {"ok": 0, "refused": 0}

    def run():
        for i in range(400):
            if stop.is_set():
                return
            if conn.send(audio(640, seed=seed + i)):
                sent["ok"] += 1
            else:
                sent["refused"] += 1
                return
            stop.wait(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, sent


def error_text(err):
    return f"{getattr(err, 'description', '')} {getattr(err, 'message', '')} {getattr(err, 'variant', '') or ''} {err}"


@scenario("S4")
def s4_drain(a):
    tag = "S4"
    reset_to_blue(tag, a)
    stt_ev, tts_ev = Events(), Events()
    stt, ssock = live_start(client(a.proxy_a), stt_ev)
    tts, tsock = speak_start(client(a.proxy_a), tts_ev)
    stt_rid = ws_headers(ssock).get("dg-request-id")
    check(
        tag,
        "both streams open on blue",
        ws_headers(ssock).get("x-switchyard-color") == "blue" and ws_headers(tsock).get("x-switchyard-color") == "blue",
    )
    stop = threading.Event()
    sender, sent = paced_audio(stt, 1000, stop)
    stt_ev.wait(lambda e: e.count("Results") >= 1)
    first = stt_ev.of("Results")
    check(tag, "STT stream produces Results on blue before the flip", first and transcript(first[0]) == "blue 1")
    tts.send_text("z" * 20)

    n_results_at_flip = stt_ev.count("Results")
    t_flip = flip_to_green(tag, a, "sdk-py4 interop", streams=2)
    tts.send_text("w" * 20)  # still served by blue while draining

    bound = DRAIN_TIMEOUT + DRAIN_GRACE + 3
    stt_ev.wait(lambda e: "Close" in e.kinds(), bound)
    tts_ev.wait(lambda e: "Close" in e.kinds(), bound)
    stop.set()
    sender.join(5)

    # STT side.
    items = [(t - t_flip, k, p) for t, k, p in stt_ev.snapshot()]
    kinds = [k for _, k, _ in items]
    results = [p for _, k, p in items if k == "Results"]
    check(
        tag,
        "STT: Results keep flowing from blue while draining",
        len(results) - n_results_at_flip >= 3 and all(transcript(m).startswith("blue ") for m in results),
        f"{len(results) - n_results_at_flip} Results after the flip",
    )
    meta_at = kinds.index("Metadata") if "Metadata" in kinds else -1
    meta = items[meta_at][2] if meta_at >= 0 else None
    check(
        tag,
        "STT: the last data events are the final Results then Metadata from blue (its request_id)",
        meta_at > 0
        and kinds[meta_at - 1] == "Results"
        and "Results" not in kinds[meta_at:]
        and meta.request_id == stt_rid,
        f"... {kinds[-5:]}",
    )
    errors = [(t, p) for t, k, p in items if k == "Error"]
    closes = [t for t, k, _ in items if k == "Close"]
    t_err = errors[0][0] if errors else -1.0
    check(
        tag,
        "STT: the SDK reports the drain close: an Error event naming 1012, then Close; socket got 1012",
        len(errors) == 1
        and "1012" in error_text(errors[0][1])
        and closes
        and kinds.index("Error") < kinds.index("Close")
        and meta_at < kinds.index("Error")
        and close_code(ssock) == 1012,
        f"errors={[error_text(p) for _, p in errors]} close_code={close_code(ssock)} tail={kinds[-4:]}",
    )
    check(
        tag,
        f"STT: closed at the drain deadline (~{DRAIN_TIMEOUT:.0f}s after the flip), inside the grace",
        DRAIN_TIMEOUT - 0.2 <= t_err <= DRAIN_TIMEOUT + DRAIN_GRACE,
        f"{t_err:.3f}s",
    )
    if errors:
        note(
            "SDK 4.x on a drain close (1012): the listen thread emits an Error event (ErrorResponse "
            f"description={errors[0][1].description!r}, message={errors[0][1].message!r}), then Close "
            "(no code on it); 1012 is only in the Error's message text. Expected: 4.x treats any "
            "close other than 1000/1001 as an error, and has no reconnect; the app must reconnect."
        )
    if sent["refused"]:
        note("SDK 4.x: send() after the drain close returns False (no exception).")

    # TTS side.
    items = [(t - t_flip, k, p) for t, k, p in tts_ev.snapshot()]
    kinds = [k for _, k, _ in items if k != "AudioData"]
    frames = [len(p) for _, k, p in items if k == "AudioData"]
    terrors = [p for _, k, p in items if k == "Error"]
    check(
        tag,
        "TTS: audio from both Speaks, then Flushed (answer to the injected Flush)",
        frames == [TTS_FRAME] * 4
        and "Flushed" in kinds
        and kinds[kinds.index("Flushed") + 1:][:1] == ["Error"]
        and set(kinds[kinds.index("Flushed") + 1:]) == {"Error", "Close"},
        f"frames={frames} events={kinds}",
    )
    check(
        tag,
        "TTS: the SDK reports the drain close: an Error event naming 1012, then Close; socket got 1012",
        len(terrors) == 1 and "1012" in error_text(terrors[0]) and close_code(tsock) == 1012,
        f"errors={[error_text(p) for p in terrors]} close_code={close_code(tsock)}",
    )
    check(tag, "both SDK clients finish() after the drain close", finish(stt) and finish(tts))
    wait_drained(tag, a, "blue")

    # The app reconnects (same code path, new client objects) and lands on green.
    ev = Events()
    conn, sock = live_start(client(a.proxy_a), ev)
    conn.send(audio(BYTES_PER_RESULT, seed=5000))
    ev.wait(lambda e: e.count("Results") >= 1)
    got = ev.of("Results")
    finished = finish(conn)
    ev.wait(lambda e: "Metadata" in e.kinds())
    check(
        tag,
        "STT reconnect lands on green (header, Results, Metadata) and ends 1000",
        ws_headers(sock).get("x-switchyard-color") == "green"
        and ws_headers(sock).get("x-stub-name") == "green"
        and [transcript(m) for m in got][:1] == ["green 1"]
        and ev.count("Metadata") == 1
        and finished
        and close_code(sock) == 1000
        and ev.count("Error") == 0,
        f"{ws_headers(sock).get('x-switchyard-color')} {ev.kinds()} close={close_code(sock)}",
    )
    ev = Events()
    conn, sock = speak_start(client(a.proxy_a), ev)
    conn.send_text("again")
    conn.flush()
    ev.wait(lambda e: e.count("Flushed") >= 1)
    finished = finish(conn)
    check(
        tag,
        "TTS reconnect lands on green and works (audio, Flushed, close 1000)",
        ws_headers(sock).get("x-switchyard-color") == "green"
        and ev.count("AudioData") >= 1
        and ev.count("Flushed") == 1
        and finished
        and close_code(sock) == 1000
        and ev.count("Error") == 0,
        f"{ws_headers(sock).get('x-switchyard-color')} {ev.kinds()} close={close_code(sock)}",
    )
    reset_to_blue(tag, a)


# ------------------------------------------------------------------------------------------
# S5 client auth
# ------------------------------------------------------------------------------------------
@scenario("S5")
def s5_auth(a):
    tag = "S5"
    for label, dg in (
        ("api_key (Authorization: Token <key>)", client(a.proxy_b, api_key=a.key_good_1)),
        ("access_token (Authorization: Bearer <key>)", client(a.proxy_b, access_token=a.key_good_2)),
    ):
        tap = HeaderTap()
        r = dg.listen.rest.v("1").transcribe_file({"buffer": audio(100, seed=7)}, PrerecordedOptions(model="nova-3"), transport=tap)
        check(
            tag,
            f"listed key via {label}: REST 200 via blue",
            tap.status == 200 and tap.headers.get("x-switchyard-color") == "blue" and rest_transcript(r) == "blue heard 100 bytes",
            f"{tap.status} {tap.headers.get('x-switchyard-color')}",
        )
        ev = Events()
        conn, sock = live_start(dg, ev)
        conn.send(audio(BYTES_PER_RESULT, seed=8))
        ev.wait(lambda e: e.count("Results") >= 1)
        finished = finish(conn)
        check(
            tag,
            f"listed key via {label}: WS 101 via blue, Results, close 1000",
            ws_headers(sock).get("x-switchyard-color") == "blue" and ev.count("Results") >= 1 and finished and close_code(sock) == 1000,
            f"{ev.kinds()} close={close_code(sock)}",
        )

    for label, kw in (("api_key", {"api_key": a.key_bad}), ("access_token", {"access_token": a.key_bad})):
        dg = client(a.proxy_b, **kw)
        tap = HeaderTap()
        t0 = time.monotonic()
        try:
            dg.listen.rest.v("1").transcribe_file({"buffer": audio(100, seed=9)}, PrerecordedOptions(model="nova-3"), transport=tap)
            check(tag, f"unlisted key via {label}: REST refused", False, "request succeeded")
        except DeepgramApiError as exc:
            took = time.monotonic() - t0
            try:
                body = json.loads(exc.original_error or "null") or {}
            except ValueError:
                body = {}
            check(
                tag,
                f"unlisted key via {label}: REST -> DeepgramApiError 401, message = Switchyard's err_msg, no colour header",
                str(exc.status) == "401"
                and isinstance(exc.message, str)
                and exc.message not in ("", "None")
                and exc.message == body.get("err_msg")
                and body.get("err_code") == "unauthorized"
                and "x-switchyard-color" not in tap.headers
                and took < 1.0,
                f"{type(exc).__name__} status={exc.status} message={exc.message!r} body={body} took={took:.3f}s ({exc})",
            )
        ev = Events()
        conn = dg.listen.websocket.v("1")
        subscribe(conn, LiveTranscriptionEvents, ev)
        ok = conn.start(LiveOptions(model="nova-3"))
        check(tag, f"unlisted key via {label}: WS start() returns False (the SDK swallows the refusal)", ok is False, f"start()={ok}")
        # With termination_exception_connect the SDK re-raises what websockets raised.
        conn = client(a.proxy_b, termination_exception_connect=True, **kw).listen.websocket.v("1")
        try:
            conn.start(LiveOptions(model="nova-3"))
            check(tag, f"unlisted key via {label}: WS refused", False, "handshake succeeded")
            finish(conn)
        except wsx.InvalidStatus as exc:
            resp = exc.response
            try:
                body = json.loads(bytes(resp.body))
            except ValueError:
                body = {}
            check(
                tag,
                f"unlisted key via {label}: WS handshake refused with 401 (err_msg, no colour header)",
                resp.status_code == 401
                and body.get("err_code") == "unauthorized"
                and body.get("err_msg")
                and resp.headers.get("x-switchyard-color") is None,
                f"{resp.status_code} {bytes(resp.body)!r}",
            )


def read_log(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@scenario("S5")
def s5_secrets_in_logs(a):
    tag = "S5"
    # Bounded poll: wait until proxy B has logged the refused keys, so that a key in that line
    # would be seen. A client-key 401 has no access line, only a rate-limited warning, from
    # the proxy listener and naming the path.
    def logged_401():
        for line in read_log(a.log_b).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("level") == "WARN" and rec.get("listener") == "proxy" and "path" in rec:
                return True
        return False

    end = time.monotonic() + 5.0
    while not logged_401() and time.monotonic() < end:
        time.sleep(0.1)
    check(tag, "proxy B logged the refused keys' 401s", logged_401())
    token = open(a.admin_token_file).read().strip()
    for path in (a.log_a, a.log_b):
        text = read_log(path)
        for label, secret in (
            ("listed key 1", a.key_good_1),
            ("listed key 2", a.key_good_2),
            ("unlisted key", a.key_bad),
            ("admin token", token),
            ("proxy A's api_key", ANY_KEY),
        ):
            check(tag, f"{label} never appears in {path.rsplit('/', 1)[-1]}", secret not in text)


def main():
    ready = start("sdk-python-v4", ("deepgram-sdk", "websockets", "httpx", "dataclasses-json"))
    if ready is None:
        return 1
    a, started = ready

    s1_prerecorded(a)
    s2_live(a)
    s3_tts(a)
    s4_drain(a)
    s5_auth(a)
    s5_secrets_in_logs(a)

    return summary("sdk-python-v4", started)


if __name__ == "__main__":
    sys.exit(main())
