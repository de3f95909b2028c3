"""Interop check: the official Python Deepgram SDK through Switchyard to its stub upstreams.

Run by run.sh, which starts the processes (two stubs named blue and green, proxy A without
client auth and with a preview listener, proxy B with [client_auth]) and passes their
addresses. Every wait here is on a signal (a message, a close, an HTTP answer) with a timeout,
or a bounded poll where no signal exists (readiness, log lines being written).

Scenarios (PASS/FAIL lines per check, a summary line at the end, exit 1 on any failure):
  S1 pre-recorded  listen.v1.media.transcribe_file / transcribe_url, proxy and preview
  S2 live STT      listen.v1.connect: audio, KeepAlive, Finalize, CloseStream, Metadata, 1000
  S3 TTS           speak.v1.audio.generate (streamed) and speak.v1.connect: Speak/Flush/Clear/Close
  S4 drain         flip blue -> green with drain_timeout 1s under live STT and TTS streams:
                   final Results + Metadata (STT) / Flushed (TTS) from blue, close 1012,
                   reconnect lands on green
  S5 client auth   listed keys (Token and bearer) pass, an unlisted key gets 401; no secret logged
  S6 session id    the SDK's x-deepgram-session-id appears on the stream's log lines, both colours
                   (S2, S3, S4, S7 and S8 streams)
  S7 Flux          listen.v2.connect: Connected, TurnInfo, CloseStream -> last TurnInfo and a close
                   without status code (1005); drain: blue's remaining TurnInfos (sequence_ids
                   unbroken), close 1012, reconnect lands on green
  S8 Agent         agent.v1.connect: Welcome, Settings -> echo + SettingsApplied, audio echoed, client
                   close 1000; drain: echoes until the deadline, then 1012 (not before), reconnect
                   lands on green
S4, S7 and S8 flip proxy A to green; S7 and S8 put it back on blue before and after.
NOTE lines record SDK or stub behaviour worth knowing that is not a Switchyard failure.
"""

import hashlib
import json
import logging
import sys
import threading
import time
import uuid

import websockets.exceptions as wsx
from deepgram import DeepgramClient
from deepgram.agent.v1.types import AgentV1Settings, AgentV1SettingsApplied, AgentV1Welcome
from deepgram.core.api_error import ApiError
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results
from deepgram.listen.v2.types import ListenV2Connected, ListenV2TurnInfo
from deepgram.speak.v1.types import SpeakV1Cleared, SpeakV1Flushed, SpeakV1Metadata, SpeakV1Text
from deepgram.types.listen_v1response import ListenV1Response
from harness import (
    AUDIO_BYTES_PER_SECOND,
    BYTES_PER_RESULT,
    DRAIN_GRACE,
    DRAIN_TIMEOUT,
    HTTP_TIMEOUT,
    NOTES,
    SPEAK_CHUNK,
    TTS_FRAME,
    audio,
    check,
    flip_to_green,
    http_json,
    note,
    reset_to_blue,
    scenario,
    start,
    summary,
    wait_drained,
)

RECV_TIMEOUT = 5.0  # seconds for any single WebSocket message
FLUX_WINDOW = BYTES_PER_RESULT / AUDIO_BYTES_PER_SECOND  # one full Flux TurnInfo update, seconds

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


class Tap:
    """Wraps the SDK's websockets connection: records raw frames so each message the SDK parsed
    can also be validated strictly, and bounds every receive with RECV_TIMEOUT."""

    def __init__(self, ws):
        self.ws = ws
        self.raw = []

    def recv(self, timeout=None, decode=None):
        kw = {} if decode is None else {"decode": decode}
        msg = self.ws.recv(timeout=RECV_TIMEOUT if timeout is None else timeout, **kw)
        self.raw.append(msg)
        return msg

    def __iter__(self):
        # Same contract as websockets' sync Connection.__iter__: a normal close ends the
        # iteration, an abnormal one raises ConnectionClosedError.
        try:
            while True:
                yield self.recv()
        except wsx.ConnectionClosedOK:
            return

    def __getattr__(self, name):
        return getattr(self.ws, name)


def tap(sock):
    sock._websocket = Tap(sock._websocket)
    return sock._websocket


def strict(model_cls, raw):
    """Validates a raw JSON frame strictly against the SDK type (the SDK itself only
    constructs, without validation)."""
    return model_cls.model_validate(json.loads(raw))


def env_for(addr):
    return DeepgramClientEnvironment(
        base=f"http://{addr}", production=f"ws://{addr}", agent=f"ws://{addr}", agent_rest=f"http://{addr}"
    )


def new_session(sessions, key):
    """A fresh x-deepgram-session-id for scenario `key`, recorded for the log checks."""
    sid = f"sdk-py-{key}-{uuid.uuid4()}"
    sessions[key] = sid
    return sid


def audio_until_message(s):
    """Receives audio frames until a message comes: their sizes, and the message."""
    frames = []
    while isinstance(m := s.recv(), bytes):
        frames.append(len(m))
    return frames, m


def paced_audio(sock, seed, stop, errors, sent=None):
    """Starts a thread that sends 640-byte audio chunks every 20 ms (400 at most) until
    `stop` is set or a send fails (the error goes to `errors`); counts them in
    sent["chunks"] when given."""

    def run():
        for i in range(400):
            if stop.is_set():
                return
            try:
                sock.send_media(audio(640, seed=seed + i))
                if sent is not None:
                    sent["chunks"] += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def client(addr, session_id=None, **kw):
    if "api_key" not in kw and "access_token" not in kw:
        kw["api_key"] = "sdk-py-interop-anykey"
    return DeepgramClient(environment=env_for(addr), session_id=session_id, timeout=HTTP_TIMEOUT, **kw)


def hdr(ws, name):
    return ws.response.headers.get(name)


# ------------------------------------------------------------------------------------------
# S1 pre-recorded
# ------------------------------------------------------------------------------------------
@scenario("S1")
def s1_prerecorded(a):
    tag = "S1"
    for listener, addr, colour in (("proxy", a.proxy_a, "blue"), ("preview", a.preview_a, "green")):
        dg = client(addr, session_id=f"sdk-py-s1-{listener}-{uuid.uuid4()}")
        body = audio(256 * 1024, seed=1)
        r = dg.listen.v1.media.with_raw_response.transcribe_file(
            request=body, model="nova-3", smart_format=True, punctuate=True
        )
        check(tag, f"transcribe_file via {listener}: 200", r.status_code == 200, str(r.status_code))
        check(
            tag,
            f"transcribe_file via {listener}: x-switchyard-color={colour}",
            r.headers.get("x-switchyard-color") == colour,
            str(r.headers.get("x-switchyard-color")),
        )
        check(tag, f"transcribe_file via {listener}: x-stub-name={colour}", r.headers.get("x-stub-name") == colour)
        check(tag, f"transcribe_file via {listener}: parsed as ListenV1Response", isinstance(r.data, ListenV1Response))
        v = strict(ListenV1Response, r._response.content)
        md = v.metadata.model_extra or {}
        check(tag, f"transcribe_file via {listener}: metadata names stub {colour}", md.get("stub") == colour, str(md))
        check(
            tag,
            f"transcribe_file via {listener}: body arrived intact (sha256, {len(body)} bytes)",
            v.metadata.sha256 == hashlib.sha256(body).hexdigest() and md.get("bytes") == len(body),
        )
        check(
            tag,
            f"transcribe_file via {listener}: transcript and dg-request-id",
            v.results.channels[0].alternatives[0].transcript == f"{colour} heard {len(body)} bytes"
            and r.headers.get("dg-request-id") == v.metadata.request_id,
        )
        url = "https://example.com/sdk-interop.wav"
        r = dg.listen.v1.media.with_raw_response.transcribe_url(url=url, model="nova-3")
        v = strict(ListenV1Response, r._response.content)
        md = v.metadata.model_extra or {}
        check(
            tag,
            f"transcribe_url via {listener}: 200 from {colour}, parsed",
            r.status_code == 200
            and r.headers.get("x-switchyard-color") == colour
            and md.get("stub") == colour
            and isinstance(r.data, ListenV1Response)
            and md.get("bytes", 0) > len(url),
            f"{r.status_code} {r.headers.get('x-switchyard-color')} {md}",
        )
    # The plain (non-raw) call returns the parsed type directly.
    data = client(a.proxy_a).listen.v1.media.transcribe_file(request=audio(1000, seed=2))
    check(
        tag,
        "transcribe_file (plain client) returns ListenV1Response from blue",
        isinstance(data, ListenV1Response) and (data.metadata.model_extra or {}).get("stub") == "blue",
    )


# ------------------------------------------------------------------------------------------
# S2 live STT
# ------------------------------------------------------------------------------------------
def live_stt_session(tag, addr, colour, label):
    sid = f"sdk-py-s2-{label}-{uuid.uuid4()}"
    dg = client(addr, session_id=sid)
    sent = bytearray()
    with dg.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000, interim_results="true") as s:
        ws = tap(s)
        check(
            tag,
            f"{label}: 101 via {colour} (x-switchyard-color, x-stub-name)",
            hdr(ws, "x-switchyard-color") == colour and hdr(ws, "x-stub-name") == colour,
            f"{hdr(ws, 'x-switchyard-color')} / {hdr(ws, 'x-stub-name')}",
        )
        check(
            tag,
            f"{label}: no extension negotiated with the SDK (it offers permessage-deflate)",
            hdr(ws, "sec-websocket-extensions") is None,
            str(hdr(ws, "sec-websocket-extensions")),
        )
        request_id = hdr(ws, "dg-request-id")
        for i in range(10):  # 10 x 640 bytes = 2 Results
            chunk = audio(640, seed=100 + i)
            sent += chunk
            s.send_media(chunk)
        got = [s.recv(), s.recv()]
        ok = all(isinstance(m, ListenV1Results) for m in got)
        for raw in ws.raw[-2:]:
            strict(ListenV1Results, raw)
        check(
            tag,
            f"{label}: Results parsed as ListenV1Results (and validate strictly)",
            ok and [m.channel.alternatives[0].transcript for m in got] == [f"{colour} 1", f"{colour} 2"],
            str([type(m).__name__ for m in got]),
        )
        check(
            tag,
            f"{label}: Results carry is_final and the 101's request_id",
            all(m.is_final is True and m.metadata.request_id == request_id for m in got),
        )
        # websockets (the SDK's transport) pings every 20 s and fails the connection with 1011
        # when no pong comes back within 20 s: pongs must make it through.
        check(tag, f"{label}: WebSocket ping answered by a pong through the proxy", ws.ping().wait(2.0))
        s.send_keep_alive()
        tail = audio(1000, seed=200)
        sent += tail
        s.send_media(tail)
        s.send_finalize()
        m = s.recv()
        strict(ListenV1Results, ws.raw[-1])
        check(
            tag,
            f"{label}: KeepAlive accepted, Finalize -> Results from_finalize=true",
            isinstance(m, ListenV1Results) and m.from_finalize is True and abs(m.duration - 1000 / 32000) < 1e-9,
            f"{type(m).__name__} from_finalize={getattr(m, 'from_finalize', None)}",
        )
        last = audio(500, seed=300)
        sent += last
        s.send_media(last)
        s.send_close_stream()
        after = list(s)  # ends on a normal close (ConnectionClosedOK), raises otherwise
        types = [type(m).__name__ for m in after]
        check(tag, f"{label}: CloseStream -> final Results then Metadata", types == ["ListenV1Results", "ListenV1Metadata"], str(types))
        if types == ["ListenV1Results", "ListenV1Metadata"]:
            if after[0].from_finalize:
                note(
                    "stub: the final Results after CloseStream has from_finalize=true; Deepgram documents "
                    "from_finalize for Finalize only (harmless for the SDK)."
                )
            meta = strict(ListenV1Metadata, ws.raw[-1])
            extra = meta.model_extra or {}
            check(
                tag,
                f"{label}: Metadata names {colour}, request_id matches, sha256 covers every audio byte in order",
                extra.get("stub") == colour
                and meta.request_id == request_id
                and meta.sha256 == hashlib.sha256(bytes(sent)).hexdigest()
                and abs(meta.duration - len(sent) / AUDIO_BYTES_PER_SECOND) < 1e-9,
                f"stub={extra.get('stub')} duration={meta.duration}",
            )
        check(
            tag,
            f"{label}: clean close 1000",
            ws.close_code == 1000,
            f"close_code={ws.close_code} reason={ws.close_reason!r}",
        )
    return sid


@scenario("S2")
def s2_live(a, sessions):
    sessions["s2"] = live_stt_session("S2", a.proxy_a, "blue", "live STT via proxy")
    sessions["s2-preview"] = live_stt_session("S2", a.preview_a, "green", "live STT via preview")
    # An app that leaves the connect() block without CloseStream: websockets sends close 1000,
    # which must travel through and be answered.
    sid = new_session(sessions, "s2-client-close")
    with client(a.proxy_a, session_id=sid).listen.v1.connect(model="nova-3") as s:
        ws = tap(s)
        s.send_media(audio(BYTES_PER_RESULT, seed=400))
        s.recv()
    check(
        "S2",
        "client-initiated close (leaving connect() without CloseStream): close 1000 answered",
        ws.close_code == 1000 and ws.ws.protocol.close_rcvd is not None and ws.ws.protocol.close_rcvd.code == 1000,
        f"close_code={ws.close_code} rcvd={ws.ws.protocol.close_rcvd}",
    )


# ------------------------------------------------------------------------------------------
# S3 TTS
# ------------------------------------------------------------------------------------------
@scenario("S3")
def s3_tts(a, sessions):
    tag = "S3"
    sid = new_session(sessions, "s3")
    dg = client(a.proxy_a, session_id=sid)
    text = "Hello from the Python SDK interop check."
    chunks = 25
    with dg.speak.v1.audio.with_raw_response.generate(
        text=text, model="aura-2-thalia-en", request_options={"additional_query_parameters": {"chunks": chunks}}
    ) as r:
        arrivals = []
        total = 0
        for chunk in r.data:
            arrivals.append(time.monotonic())
            total += len(chunk)
        check(
            tag,
            "speak.v1.audio.generate: 200 audio/mpeg from blue, dg-char-count passed through",
            r.status_code == 200
            and r.headers.get("content-type") == "audio/mpeg"
            and r.headers.get("x-switchyard-color") == "blue"
            and r.headers.get("dg-char-count") == str(len(text)),
            f"{r.status_code} {r.headers.get('content-type')} {r.headers.get('x-switchyard-color')} "
            f"{r.headers.get('dg-char-count')}",
        )
        check(tag, "speak.v1.audio.generate: every byte arrived", total == chunks * SPEAK_CHUNK, f"{total}")
        spread = arrivals[-1] - arrivals[0] if arrivals else 0
        # The stub trickles one chunk every 20 ms (~0.48 s for 25); a buffering proxy would
        # deliver them all at once.
        check(tag, "speak.v1.audio.generate: streamed progressively, not buffered", spread > 0.25, f"spread {spread:.3f}s")
    plain = sum(len(c) for c in dg.speak.v1.audio.generate(text="hi"))
    check(tag, "speak.v1.audio.generate (plain iterator) yields the audio", plain == 8 * SPEAK_CHUNK, str(plain))

    with dg.speak.v1.connect(model="aura-2-thalia-en", encoding="linear16", sample_rate=24000) as s:
        ws = tap(s)
        check(tag, "speak WS: 101 via blue", hdr(ws, "x-switchyard-color") == "blue", str(hdr(ws, "x-switchyard-color")))
        m = s.recv()
        check(
            tag,
            "speak WS: Metadata greeting parsed as SpeakV1Metadata",
            isinstance(m, SpeakV1Metadata) and strict(SpeakV1Metadata, ws.raw[-1]).request_id == hdr(ws, "dg-request-id"),
            type(m).__name__,
        )
        s.send_text(SpeakV1Text(type="Speak", text="x" * 35))
        s.send_flush()
        frames, m = audio_until_message(s)
        check(
            tag,
            "speak WS: Speak -> binary audio frames, Flush -> Flushed after them",
            frames == [TTS_FRAME] * 4 and isinstance(m, SpeakV1Flushed) and m.type == "Flushed" and m.sequence_id == 0,
            f"frames={frames} then {type(m).__name__}({getattr(m, 'type', None)})",
        )
        strict(SpeakV1Flushed, ws.raw[-1])
        s.send_text(SpeakV1Text(type="Speak", text="y" * 10))
        s.send_clear()
        frames, m = audio_until_message(s)
        check(
            tag,
            "speak WS: Clear -> Cleared",
            getattr(m, "type", None) == "Cleared" and m.sequence_id == 0,
            f"{type(m).__name__}(type={getattr(m, 'type', None)})",
        )
        strict(SpeakV1Cleared, ws.raw[-1])
        if not isinstance(m, SpeakV1Cleared):
            note(
                f"SDK: a Cleared message is parsed into {type(m).__name__} (type='Cleared'), not "
                "SpeakV1Cleared: SpeakV1FlushedType is Literal['Flushed','Cleared'] | Any and the "
                "response union is undiscriminated; apps must test .type, not isinstance."
            )
        s.send_close()
        rest = list(s)
        check(
            tag,
            "speak WS: Close -> clean close 1000",
            ws.close_code == 1000 and all(isinstance(x, bytes) for x in rest),
            f"close_code={ws.close_code} after {[type(x).__name__ for x in rest]}",
        )


# ------------------------------------------------------------------------------------------
# S4 drain
# ------------------------------------------------------------------------------------------
@scenario("S4")
def s4_drain(a, sessions):
    tag = "S4"
    stt_sid = new_session(sessions, "s4-stt")
    tts_sid = new_session(sessions, "s4-tts")
    stt_client = client(a.proxy_a, session_id=stt_sid)
    tts_client = client(a.proxy_a, session_id=tts_sid)

    with stt_client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000) as stt, \
            tts_client.speak.v1.connect(model="aura-2-thalia-en") as tts:
        sws = tap(stt)
        tws = tap(tts)
        check(
            tag,
            "both streams open on blue",
            hdr(sws, "x-switchyard-color") == "blue" and hdr(tws, "x-switchyard-color") == "blue",
        )
        # The TTS stream is consumed the event-emitter way (start_listening), to record what
        # that API surfaces on a drain close.
        tts_events = []
        tts.on(EventType.OPEN, lambda _: tts_events.append(("open", None)))
        tts.on(EventType.MESSAGE, lambda m: tts_events.append(("message", m)))
        tts.on(EventType.ERROR, lambda e: tts_events.append(("error", e)))
        tts.on(EventType.CLOSE, lambda _: tts_events.append(("close", None)))
        tts_thread = threading.Thread(target=tts.start_listening, daemon=True)
        tts_thread.start()

        # The STT client streams 20 ms of audio every 20 ms from a thread until the socket
        # closes (bounded: 400 chunks = 8 s).
        stop = threading.Event()
        send_errors = []
        sent = {"chunks": 0}

        sender_thread = paced_audio(stt, 1000, stop, send_errors, sent)
        first = stt.recv()
        check(tag, "STT stream produces Results on blue before the flip", isinstance(first, ListenV1Results) and first.channel.alternatives[0].transcript == "blue 1")
        tts.send_text(SpeakV1Text(type="Speak", text="z" * 20))

        t_flip = flip_to_green(tag, a, "sdk-py interop", streams=2)
        tts.send_text(SpeakV1Text(type="Speak", text="w" * 20))  # still served by blue while draining

        msgs = []
        closed = None
        try:
            while True:
                m = stt.recv()
                msgs.append((time.monotonic() - t_flip, m))
        except wsx.ConnectionClosed as exc:
            closed = exc
        t_close = time.monotonic() - t_flip
        stop.set()
        sender_thread.join(5)
        tts_thread.join(DRAIN_TIMEOUT + DRAIN_GRACE + 5)
        t_tts = time.monotonic() - t_flip

        kinds = [type(m).__name__ for _, m in msgs]
        check(
            tag,
            "STT: Results keep flowing from blue while draining",
            kinds.count("ListenV1Results") >= 3
            and all(m.channel.alternatives[0].transcript.startswith("blue ") for _, m in msgs if isinstance(m, ListenV1Results)),
            f"{kinds.count('ListenV1Results')} Results",
        )
        check(
            tag,
            "STT: last messages are the final Results (from_finalize) then Metadata from blue",
            len(msgs) >= 2
            and isinstance(msgs[-2][1], ListenV1Results)
            and msgs[-2][1].from_finalize is True
            and isinstance(msgs[-1][1], ListenV1Metadata)
            and (msgs[-1][1].model_extra or {}).get("stub") == "blue",
            str(kinds[-3:]),
        )
        if msgs:
            strict(ListenV1Metadata, sws.raw[-1])
        check(
            tag,
            "STT: the SDK surfaces the drain close as websockets ConnectionClosedError, code 1012",
            isinstance(closed, wsx.ConnectionClosedError) and closed.rcvd is not None and closed.rcvd.code == 1012,
            f"{type(closed).__name__}: rcvd={getattr(closed, 'rcvd', None)} sent={getattr(closed, 'sent', None)}",
        )
        if closed is not None and closed.rcvd is not None:
            note(
                f"SDK surfaces the drain close via recv() as websockets.exceptions.{type(closed).__name__} "
                f"(rcvd code {closed.rcvd.code}, reason {closed.rcvd.reason!r}); the SDK has no reconnect "
                "layer, the app must reconnect itself."
            )
        check(
            tag,
            f"STT: closed at the drain deadline (~{DRAIN_TIMEOUT:.0f}s after the flip), well inside the grace",
            DRAIN_TIMEOUT - 0.2 <= t_close <= DRAIN_TIMEOUT + DRAIN_GRACE,
            f"{t_close:.3f}s",
        )
        if send_errors:
            note(
                f"SDK: send_media after the drain close raises websockets.exceptions.{type(send_errors[0]).__name__} "
                f"({send_errors[0]})"
            )

        # TTS side.
        tts_audio = [m for k, m in tts_events if k == "message" and isinstance(m, bytes)]
        tts_json = [m for k, m in tts_events if k == "message" and not isinstance(m, bytes)]
        errors = [e for k, e in tts_events if k == "error"]
        check(tag, "TTS: listener thread ended by the drain", not tts_thread.is_alive(), f"{t_tts:.3f}s")
        check(
            tag,
            "TTS: audio from both Speaks, then Flushed (answer to the injected Flush)",
            len(tts_audio) == 4
            and tts_json
            and isinstance(tts_json[0], SpeakV1Metadata)
            and getattr(tts_json[-1], "type", None) == "Flushed",
            f"{len(tts_audio)} audio frames, messages {[getattr(m, 'type', type(m).__name__) for m in tts_json]}",
        )
        check(
            tag,
            "TTS: event API emits ERROR(ConnectionClosedError 1012) then CLOSE; socket close code 1012",
            len(errors) == 1
            and isinstance(errors[0], wsx.ConnectionClosedError)
            and errors[0].rcvd is not None
            and errors[0].rcvd.code == 1012
            and tts_events[-1][0] == "close"
            and tws.close_code == 1012,
            f"errors={[repr(e) for e in errors]} last={tts_events[-1][0] if tts_events else None} close_code={tws.close_code}",
        )
        if errors:
            note(
                "SDK event API (start_listening) on a drain close: EventType.ERROR with "
                f"websockets.exceptions.{type(errors[0]).__name__} ({errors[0]}), then EventType.CLOSE with "
                "payload None; the close code is only on the exception / socket._websocket.close_code. "
                "A 1000 close emits no ERROR, only CLOSE."
            )

    code, body = http_json("GET", f"http://{a.admin_a}/drain/wait?color=blue&timeout=5s", timeout=10)
    check(tag, "drain/wait: blue drained", code == 200 and body.get("drained") is True, f"{code} {body}")

    # The app reconnects (same client, same session id) and lands on green.
    with stt_client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000) as s:
        ws = tap(s)
        s.send_media(audio(BYTES_PER_RESULT, seed=5000))
        first = s.recv()
        s.send_close_stream()
        after = list(s)
        meta = after[-1] if after else None
        check(
            tag,
            "STT reconnect lands on green (header, Results, Metadata) and ends 1000",
            hdr(ws, "x-switchyard-color") == "green"
            and isinstance(first, ListenV1Results)
            and first.channel.alternatives[0].transcript == "green 1"
            and isinstance(meta, ListenV1Metadata)
            and (meta.model_extra or {}).get("stub") == "green"
            and ws.close_code == 1000,
            f"{hdr(ws, 'x-switchyard-color')} {[type(m).__name__ for m in after]} close={ws.close_code}",
        )
    with tts_client.speak.v1.connect(model="aura-2-thalia-en") as s:
        ws = tap(s)
        greeting = s.recv()
        s.send_text(SpeakV1Text(type="Speak", text="again"))
        s.send_flush()
        got = [s.recv(), s.recv()]
        s.send_close()
        list(s)
        check(
            tag,
            "TTS reconnect lands on green and works (audio, Flushed, close 1000)",
            hdr(ws, "x-switchyard-color") == "green"
            and hdr(ws, "x-stub-name") == "green"
            and isinstance(greeting, SpeakV1Metadata)
            and isinstance(got[0], bytes)
            and getattr(got[1], "type", None) == "Flushed"
            and ws.close_code == 1000,
            f"{hdr(ws, 'x-switchyard-color')} close={ws.close_code}",
        )


# ------------------------------------------------------------------------------------------
# S5 client auth
# ------------------------------------------------------------------------------------------
@scenario("S5")
def s5_auth(a, sessions):
    tag = "S5"
    sid = new_session(sessions, "s5")
    for label, kw in (
        ("api_key (Authorization: Token <key>)", {"api_key": a.key_good_1}),
        ("access_token (Authorization: bearer <key>)", {"access_token": a.key_good_2}),
    ):
        dg = client(a.proxy_b, session_id=sid, **kw)
        r = dg.listen.v1.media.with_raw_response.transcribe_file(request=audio(100, seed=7))
        check(tag, f"listed key via {label}: REST 200 via blue", r.status_code == 200 and r.headers.get("x-switchyard-color") == "blue")
        with dg.listen.v1.connect(model="nova-3") as s:
            ws = tap(s)
            s.send_media(audio(BYTES_PER_RESULT, seed=8))
            m = s.recv()
            s.send_close_stream()
            list(s)
            check(
                tag,
                f"listed key via {label}: WS 101, Results, close 1000",
                hdr(ws, "x-switchyard-color") == "blue" and isinstance(m, ListenV1Results) and ws.close_code == 1000,
            )

    for label, kw in (
        ("api_key", {"api_key": a.key_bad}),
        ("access_token", {"access_token": a.key_bad}),
    ):
        dg = client(a.proxy_b, session_id=sid, **kw)
        t0 = time.monotonic()
        try:
            dg.listen.v1.media.transcribe_file(request=audio(100, seed=9))
            check(tag, f"unlisted key via {label}: REST refused", False, "request succeeded")
        except ApiError as exc:
            took = time.monotonic() - t0
            body = exc.body if isinstance(exc.body, dict) else {}
            check(
                tag,
                f"unlisted key via {label}: REST -> SDK ApiError 401 with Switchyard's JSON, not retried, no colour header",
                exc.status_code == 401
                and body.get("error") == "unauthorized"
                and "x-switchyard-color" not in (exc.headers or {})
                and took < 1.0,
                f"status={exc.status_code} body={exc.body} took={took:.3f}s",
            )
        try:
            with dg.listen.v1.connect(model="nova-3"):
                check(tag, f"unlisted key via {label}: WS refused", False, "handshake succeeded")
        except ApiError as exc:
            check(tag, f"unlisted key via {label}: WS handshake -> ApiError 401", exc.status_code == 401, str(exc))
        except wsx.InvalidStatus as exc:
            resp = exc.response
            check(
                tag,
                f"unlisted key via {label}: WS handshake refused with 401 (Switchyard JSON body, no colour header)",
                resp.status_code == 401
                and json.loads(bytes(resp.body)).get("error") == "unauthorized"
                and resp.headers.get("x-switchyard-color") is None,
                f"{resp.status_code} {bytes(resp.body)!r}",
            )
            if not any("InvalidStatus" in n for n in NOTES):
                note(
                    "SDK bug: a refused WS handshake escapes as raw websockets.exceptions.InvalidStatus "
                    f"({exc}), not ApiError: deepgram/core/websocket_compat.py imports the deprecated "
                    "legacy alias websockets.exceptions.InvalidStatusCode, which websockets>=14's sync "
                    "client never raises, so the SDK's `except InvalidWebSocketStatus` never matches."
                )


# ------------------------------------------------------------------------------------------
# Colour resets (proxy A), shared by S7 and S8
# ------------------------------------------------------------------------------------------


def close_rcvd(ws):
    rcvd = ws.ws.protocol.close_rcvd
    return None if rcvd is None else rcvd.code


# ------------------------------------------------------------------------------------------
# S7 Flux (/v2/listen)
# ------------------------------------------------------------------------------------------
def flux_connect(dg):
    return dg.listen.v2.connect(model="flux-general-en", encoding="linear16", sample_rate=16000)


def turn_desc(m):
    if isinstance(m, ListenV2TurnInfo):
        return f"TurnInfo(seq={m.sequence_id}, {m.transcript!r}, {m.audio_window_start:.5f}-{m.audio_window_end:.5f})"
    return f"{type(m).__name__}(seq={getattr(m, 'sequence_id', None)})"


@scenario("S7")
def s7_flux(a, sessions):
    tag = "S7"
    reset_to_blue(tag, a)

    sid = new_session(sessions, "s7")
    with flux_connect(client(a.proxy_a, session_id=sid)) as s:
        ws = tap(s)
        check(
            tag,
            "Flux: 101 via blue (x-switchyard-color, x-stub-name)",
            hdr(ws, "x-switchyard-color") == "blue" and hdr(ws, "x-stub-name") == "blue",
            f"{hdr(ws, 'x-switchyard-color')} / {hdr(ws, 'x-stub-name')}",
        )
        first = s.recv()
        connected = strict(ListenV2Connected, ws.raw[-1])
        check(
            tag,
            "Flux: first message parsed as ListenV2Connected (sequence_id 0, the 101's request_id)",
            isinstance(first, ListenV2Connected) and connected.sequence_id == 0 and connected.request_id == hdr(ws, "dg-request-id"),
            f"{type(first).__name__} seq={connected.sequence_id} request_id={connected.request_id}",
        )
        s.send_media(audio(2 * BYTES_PER_RESULT, seed=700))
        got = [s.recv(), s.recv()]
        for raw in ws.raw[-2:]:
            strict(ListenV2TurnInfo, raw)
        check(
            tag,
            "Flux: audio -> TurnInfo updates parsed as ListenV2TurnInfo (and validate strictly)",
            all(isinstance(m, ListenV2TurnInfo) and m.event == "Update" for m in got)
            and [m.transcript for m in got] == ["blue 1", "blue 2"]
            and [m.sequence_id for m in got] == [1, 2],
            str([turn_desc(m) for m in got]),
        )
        tail = 1000
        s.send_media(audio(tail, seed=701))
        s.send_close_stream()
        rest, exc = [], None
        try:
            rest = list(s)  # ends on a normal close (ConnectionClosedOK: 1000, 1001 or 1005)
        except Exception as e:  # noqa: BLE001 - recorded and checked
            exc = e
        check(
            tag,
            "Flux: CloseStream -> the last TurnInfo (the partial window) from blue",
            len(rest) == 1
            and isinstance(rest[0], ListenV2TurnInfo)
            and rest[0].transcript == "blue 3"
            and rest[0].sequence_id == 3
            and abs(rest[0].audio_window_end - rest[0].audio_window_start - tail / AUDIO_BYTES_PER_SECOND) < 1e-9,
            str([turn_desc(m) for m in rest]),
        )
        check(
            tag,
            "Flux: then a close without status code (1005), a normal end for the SDK (no exception)",
            exc is None and ws.close_code == 1005 and close_rcvd(ws) == 1005,
            f"exc={exc!r} close_code={ws.close_code} rcvd={ws.ws.protocol.close_rcvd}",
        )

    # Drain: a Flux stream streaming on blue when proxy A flips to green.
    wait_drained(tag, a, "blue")
    sid = new_session(sessions, "s7-drain")
    dg = client(a.proxy_a, session_id=sid)
    with flux_connect(dg) as s:
        ws = tap(s)
        check(tag, "drain: Flux stream open on blue", hdr(ws, "x-switchyard-color") == "blue", str(hdr(ws, "x-switchyard-color")))
        msgs = [(0.0, s.recv())]

        # 20 ms of audio every 20 ms from a thread until the socket closes (bounded: 400 chunks).
        stop = threading.Event()
        send_errors = []

        sender_thread = paced_audio(s, 7000, stop, send_errors)
        while len(msgs) < 3:  # Connected and two updates before the flip
            msgs.append((0.0, s.recv()))

        t_flip = flip_to_green(tag, a, "sdk-py interop flux")
        closed = None
        try:
            while True:
                m = s.recv()
                msgs.append((time.monotonic() - t_flip, m))
        except (wsx.ConnectionClosed, TimeoutError) as exc:
            closed = exc
        t_close = time.monotonic() - t_flip
        stop.set()
        sender_thread.join(5)

        turns = [m for _, m in msgs if isinstance(m, ListenV2TurnInfo)]
        during = [t for t, m in msgs if isinstance(m, ListenV2TurnInfo) and 0 < t < DRAIN_TIMEOUT]
        seqs = [getattr(m, "sequence_id", None) for _, m in msgs]
        check(
            tag,
            "drain: first message Connected, then only TurnInfo, all from blue",
            isinstance(msgs[0][1], ListenV2Connected)
            and len(turns) == len(msgs) - 1
            and all(m.transcript.startswith("blue ") for m in turns),
            str([type(m).__name__ for _, m in msgs[:2]]) + f" ... {len(turns)} TurnInfo",
        )
        check(tag, "drain: TurnInfo keep flowing from blue while draining", len(during) >= 3, f"{len(during)} before the deadline")
        check(
            tag,
            "drain: nothing lost: sequence_ids 0..N unbroken, transcripts blue 1..N, audio windows contiguous",
            seqs == list(range(len(msgs)))
            and [m.transcript for m in turns] == [f"blue {i}" for i in range(1, len(turns) + 1)]
            and all(abs(x.audio_window_end - y.audio_window_start) < 1e-9 for x, y in zip(turns, turns[1:]))
            and bool(turns) and turns[0].audio_window_start == 0,
            f"seq {seqs[:3]}..{seqs[-3:]}",
        )
        last = turns[-1] if turns else None
        check(
            tag,
            "drain: the last message is the answer to the injected CloseStream (a partial-window TurnInfo)",
            last is not None and msgs[-1][1] is last and last.audio_window_end - last.audio_window_start < FLUX_WINDOW - 1e-9,
            turn_desc(msgs[-1][1]) if msgs else "none",
        )
        check(
            tag,
            "drain: the SDK surfaces the close as ConnectionClosedError 1012 (not Flux's 1005), at the deadline",
            isinstance(closed, wsx.ConnectionClosedError)
            and closed.rcvd is not None
            and closed.rcvd.code == 1012
            and DRAIN_TIMEOUT - 0.1 <= t_close <= DRAIN_TIMEOUT + DRAIN_GRACE,
            f"{type(closed).__name__}: rcvd={getattr(closed, 'rcvd', None)} after {t_close:.3f}s",
        )

    wait_drained(tag, a, "blue")
    # The app reconnects (the Python SDK has no reconnect layer; same client, same session id).
    with flux_connect(dg) as s:
        ws = tap(s)
        first = s.recv()
        s.send_media(audio(BYTES_PER_RESULT, seed=7500))
        turn = s.recv()
        s.send_close_stream()
        rest = list(s)
        check(
            tag,
            "drain: reconnect lands on green (headers, new Connected, green's TurnInfo) and ends 1005",
            hdr(ws, "x-switchyard-color") == "green"
            and hdr(ws, "x-stub-name") == "green"
            and isinstance(first, ListenV2Connected)
            and first.sequence_id == 0
            and isinstance(turn, ListenV2TurnInfo)
            and turn.transcript == "green 1"
            and len(rest) == 1
            and ws.close_code == 1005,
            f"{hdr(ws, 'x-switchyard-color')} {turn_desc(first)} {turn_desc(turn)} close={ws.close_code}",
        )
    reset_to_blue(tag, a)


# ------------------------------------------------------------------------------------------
# S8 Voice Agent (/v1/agent/converse)
# ------------------------------------------------------------------------------------------
AGENT_SETTINGS = {
    "type": "Settings",
    "audio": {
        "input": {"encoding": "linear16", "sample_rate": 16000},
        "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"},
    },
    "agent": {
        "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
        "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": "You are a test."},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
        "greeting": "hello",
    },
}


def agent_hello(tag, label, s, ws, colour):
    """Welcome, then Settings -> the stub's echo of it, then SettingsApplied."""
    welcome = s.recv()
    check(
        tag,
        f"{label}: Welcome parsed as AgentV1Welcome from {colour}, with the 101's request_id",
        isinstance(welcome, AgentV1Welcome)
        and hdr(ws, "x-switchyard-color") == colour
        and hdr(ws, "x-stub-name") == colour
        and strict(AgentV1Welcome, ws.raw[-1]).request_id == hdr(ws, "dg-request-id"),
        f"{type(welcome).__name__} via {hdr(ws, 'x-switchyard-color')} / {hdr(ws, 'x-stub-name')}",
    )
    s.send_settings(AgentV1Settings.model_validate(AGENT_SETTINGS))
    echo = s.recv()
    echo_raw = json.loads(ws.raw[-1])
    applied = s.recv()
    strict(AgentV1SettingsApplied, ws.raw[-1])
    check(
        tag,
        f"{label}: Settings -> echoed Settings, then SettingsApplied (AgentV1SettingsApplied)",
        echo_raw.get("type") == "Settings"
        and echo_raw.get("agent", {}).get("think", {}).get("prompt") == "You are a test."
        and isinstance(applied, AgentV1SettingsApplied),
        f"{type(echo).__name__}({echo_raw.get('type')}) then {type(applied).__name__}",
    )
    if isinstance(echo, dict):
        note(
            "stub: the Agent echoes every client text message (Settings, KeepAlive); the SDK's response "
            "union has no Settings/KeepAlive type, so it yields those echoes as plain dicts "
            "(Deepgram itself does not echo them)."
        )


@scenario("S8")
def s8_agent(a, sessions):
    tag = "S8"
    reset_to_blue(tag, a)

    sid = new_session(sessions, "s8")
    with client(a.proxy_a, session_id=sid).agent.v1.connect() as s:
        ws = tap(s)
        agent_hello(tag, "Agent", s, ws, "blue")
        chunk = audio(960, seed=800)
        s.send_media(chunk)
        echoed = s.recv()
        check(tag, "Agent: binary audio echoed intact", echoed == chunk, f"{type(echoed).__name__} {len(echoed) if isinstance(echoed, bytes) else ''}")
        s.send_keep_alive()
        m = s.recv()
        keep = {} if isinstance(m, bytes) else json.loads(ws.raw[-1])
        check(tag, "Agent: KeepAlive passes through (the stub echoes it)", keep.get("type") == "KeepAlive", str(keep))
    # Leaving connect() closes with 1000, which must travel through and be answered.
    check(
        tag,
        "Agent: client close 1000 answered with 1000",
        ws.close_code == 1000 and close_rcvd(ws) == 1000,
        f"close_code={ws.close_code} rcvd={ws.ws.protocol.close_rcvd}",
    )

    # Drain: the conversation cannot survive a reconnect, so it runs until the deadline.
    wait_drained(tag, a, "blue")
    sid = new_session(sessions, "s8-drain")
    dg = client(a.proxy_a, session_id=sid)
    with dg.agent.v1.connect() as s:
        ws = tap(s)
        agent_hello(tag, "drain", s, ws, "blue")
        t_flip = flip_to_green(tag, a, "sdk-py interop agent")
        echoes, mismatched, closed = [], 0, None
        try:
            # Send 10 ms of audio, wait for its echo, every 50 ms (bounded: 200 rounds = 10+ s).
            for i in range(200):
                chunk = audio(320, seed=8000 + i)
                s.send_media(chunk)
                m = s.recv()
                echoes.append(time.monotonic() - t_flip)
                mismatched += m != chunk
                time.sleep(0.05)
        except (wsx.ConnectionClosed, TimeoutError) as exc:
            closed = exc
        t_close = time.monotonic() - t_flip
        last_echo = echoes[-1] if echoes else -1.0
        check(
            tag,
            f"drain: echoes keep flowing from blue until the deadline (~{DRAIN_TIMEOUT:.0f}s)",
            len(echoes) >= 10 and last_echo >= DRAIN_TIMEOUT - 0.15 and mismatched == 0,
            f"{len(echoes)} echoes, last at {last_echo:.3f}s, {mismatched} mismatched",
        )
        check(
            tag,
            "drain: closed 1012 at the deadline, not before (>= 0.9 s after the flip) and without waiting out the grace",
            isinstance(closed, wsx.ConnectionClosedError)
            and closed.rcvd is not None
            and closed.rcvd.code == 1012
            and DRAIN_TIMEOUT - 0.1 <= t_close <= DRAIN_TIMEOUT + 0.5,
            f"{type(closed).__name__}: rcvd={getattr(closed, 'rcvd', None)} after {t_close:.3f}s",
        )

    wait_drained(tag, a, "blue")
    with dg.agent.v1.connect() as s:  # the app reconnects: a new conversation on green
        ws = tap(s)
        agent_hello(tag, "drain: reconnect", s, ws, "green")
        chunk = audio(640, seed=8500)
        s.send_media(chunk)
        check(tag, "drain: reconnect on green echoes audio", s.recv() == chunk)
    check(tag, "drain: reconnect closes 1000", ws.close_code == 1000 and close_rcvd(ws) == 1000, f"close_code={ws.close_code}")
    reset_to_blue(tag, a)


# ------------------------------------------------------------------------------------------
# Log checks: S5 secrets, S6 session ids
# ------------------------------------------------------------------------------------------
def read_log_lines(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def stream_lines(lines, session):
    """The parsed JSON log lines whose span names `session`."""
    out = []
    for line in lines:
        if session not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            out.append({"raw": line})
            continue
        spans = [rec.get("span") or {}] + list(rec.get("spans") or [])
        span = next((sp for sp in spans if sp.get("session") == session), None)
        if span is not None:
            out.append({**rec, "_span": span})
    return out


def wait_for_lines(path, pred, deadline_s=5.0):
    """Bounded poll: log lines are written as streams end, after the client saw the close."""
    end = time.monotonic() + deadline_s
    while True:
        lines = read_log_lines(path)
        if pred(lines) or time.monotonic() >= end:
            return lines
        time.sleep(0.1)


@scenario("S6")
def s6_sessions(a, sessions):
    tag = "S6"

    def ended(lines, sid, colour, path):
        return [
            r for r in stream_lines(lines, sid)
            if r.get("_span", {}).get("color") == colour
            and r.get("_span", {}).get("path") == path
            and r.get("message") == "stream ended"
        ]

    wanted = [
        ("s2", "blue", "/v1/listen", None),
        ("s2-preview", "green", "/v1/listen", None),
        ("s2-client-close", "blue", "/v1/listen", None),
        ("s3", "blue", "/v1/speak", None),
        ("s4-stt", "blue", "/v1/listen", "drain_graceful"),
        ("s4-stt", "green", "/v1/listen", None),
        ("s4-tts", "blue", "/v1/speak", "drain_graceful"),
        ("s4-tts", "green", "/v1/speak", None),
        ("s7", "blue", "/v2/listen", None),
        ("s7-drain", "blue", "/v2/listen", "drain_graceful"),
        ("s7-drain", "green", "/v2/listen", None),
        ("s8", "blue", "/v1/agent/converse", None),
        ("s8-drain", "blue", "/v1/agent/converse", "drain_forced"),
        ("s8-drain", "green", "/v1/agent/converse", None),
    ]
    lines = wait_for_lines(
        a.log_a,
        lambda ls: all(key not in sessions or ended(ls, sessions[key], c, p) for key, c, p, _ in wanted),
    )
    for key, colour, path, reason in wanted:
        if key not in sessions:
            check(tag, f"session {key}: scenario did not run", False)
            continue
        recs = ended(lines, sessions[key], colour, path)
        detail = ""
        ok = bool(recs)
        if recs and reason:
            ok = any(r.get("reason") == reason and r.get("close_code") == 1012 for r in recs)
            detail = str([(r.get("reason"), r.get("close_code")) for r in recs])
        check(tag, f"stream log line carries session id: {key} {colour} {path}" + (f" ({reason}, 1012)" if reason else ""), ok, detail)
    dup = []
    for line in lines:
        if not line.startswith("{"):
            continue

        def hook(pairs):
            keys = [k for k, _ in pairs]
            if len(keys) != len(set(keys)):
                dup.append(line)
            return dict(pairs)

        try:
            json.loads(line, object_pairs_hook=hook)
        except ValueError:
            pass
    if dup:
        note(
            f"switchyard bug: {len(dup)} JSON log line(s) repeat a key, so JSON parsers keep only the last "
            f"value (e.g. the drain-injection line's two \"message\" keys): {dup[0][:300]}"
        )
    # REST requests from the SDK carry x-deepgram-session-id too; say whether the access log has it.
    s1 = [l for l in lines if "sdk-py-s1-" in l]
    if not s1:
        note(
            "Switchyard's HTTP access log lines do not carry the SDK's x-deepgram-session-id (the SPEC only "
            "requires it on streams; the Python SDK sends it on every REST request too)."
        )


@scenario("S5")
def s5_secrets_in_logs(a):
    tag = "S5"
    token = open(a.admin_token_file).read().strip()
    for path in (a.log_a, a.log_b):
        text = "\n".join(read_log_lines(path))
        for label, secret in (
            ("listed key 1", a.key_good_1),
            ("listed key 2", a.key_good_2),
            ("unlisted key", a.key_bad),
            ("admin token", token),
            ("proxy A's api_key", "sdk-py-interop-anykey"),
        ):
            check(tag, f"{label} never appears in {path.rsplit('/', 1)[-1]}", secret not in text)


def main():
    ready = start("sdk-python", ("deepgram-sdk", "websockets", "httpx", "pydantic"))
    if ready is None:
        return 1
    a, started = ready

    sessions = {}
    s1_prerecorded(a)
    s2_live(a, sessions)
    s3_tts(a, sessions)
    s4_drain(a, sessions)
    s5_auth(a, sessions)
    s7_flux(a, sessions)
    s8_agent(a, sessions)
    s6_sessions(a, sessions)
    s5_secrets_in_logs(a)

    return summary("sdk-python", started)


if __name__ == "__main__":
    sys.exit(main())
