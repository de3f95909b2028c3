// Interop check: the official Deepgram JS SDK through Switchyard against its own stub.
//
// Run by run.sh, which starts the processes and passes their addresses in SY_* variables.
// Every wait is on an event (a message, an open, a close) or a bounded poll, each with its
// own timeout; a watchdog ends the run after OVERALL_MS whatever happens.
//
// With `--browser-sim URL KEY` the script instead runs one listen stream with the SDK in its
// browser code path (key and session id in Sec-WebSocket-Protocol, no custom headers) and
// prints a JSON summary; the main run spawns it that way for scenario 5.

import { spawn } from "node:child_process";
import { readFileSync, writeFileSync, createReadStream } from "node:fs";
import { join } from "node:path";
import { WebSocket as WS } from "ws";

const OVERALL_MS = 55_000;
const T0 = performance.now();
const now = () => Math.round(performance.now() - T0);

// ---- observation hook: the 101 / refused-handshake headers of every ws client socket ------
// The SDK never exposes the handshake response; the interop check needs it to see
// x-switchyard-color on each (re)connection. This only records, it changes no behaviour.
const origEmit = WS.prototype.emit;
WS.prototype.emit = function (event, ...args) {
  if (event === "upgrade") {
    this._syUpgrade = { at: now(), status: args[0].statusCode, headers: { ...args[0].headers } };
  } else if (event === "unexpected-response") {
    this._syRefused = { at: now(), status: args[1].statusCode, headers: { ...args[1].headers } };
  }
  return origEmit.call(this, event, ...args);
};

const BROWSER_SIM = process.argv[2] === "--browser-sim";
const SDK_VERSION = JSON.parse(
  readFileSync(new URL("./node_modules/@deepgram/sdk/package.json", import.meta.url)),
).version;
// The browser simulation must set its globals before the SDK is first imported (the SDK
// decides its runtime at import), so the main run imports it in main().
let DeepgramClient, DeepgramError;

const env = (k) => {
  if (BROWSER_SIM) return "";
  const v = process.env[k];
  if (!v) {
    console.error(`FAIL: ${k} is not set (run interop.mjs through run.sh)`);
    process.exit(2);
  }
  return v;
};
const E = {
  proxy: env("SY_PROXY"),
  preview: env("SY_PREVIEW"),
  admin: env("SY_ADMIN"),
  aproxy: env("SY_APROXY"),
  apreview: env("SY_APREVIEW"),
  aadmin: env("SY_AADMIN"),
  token: BROWSER_SIM ? "" : readFileSync(env("SY_TOKEN_FILE"), "utf8").trim(),
  goodKey: env("SY_GOOD_KEY"),
  badKey: env("SY_BAD_KEY"),
  logOpen: env("SY_LOG_OPEN"),
  logAuth: env("SY_LOG_AUTH"),
  work: env("SY_WORK"),
};

const watchdog = BROWSER_SIM ? undefined : setTimeout(() => {
  console.error(`FAIL: overall deadline of ${OVERALL_MS} ms passed; results so far:`);
  report();
  process.exit(1);
}, OVERALL_MS);

// ---- results ------------------------------------------------------------------------------
const results = []; // {id, name, ok, notes[]}
const notes = []; // observations printed at the end (timings, oddities)
function note(s) {
  notes.push(`[${now()} ms] ${s}`);
  if (process.env.SY_VERBOSE) console.log(`  . ${s}`);
}
async function scenario(id, name, fn) {
  const started = now();
  process.stdout.write(`-- ${id} ${name} ... `);
  try {
    await fn();
    results.push({ id, name, ok: true });
    console.log(`PASS (${now() - started} ms)`);
  } catch (e) {
    results.push({ id, name, ok: false, why: e?.stack || String(e) });
    console.log(`FAIL (${now() - started} ms)\n     ${String(e?.message || e).split("\n").join("\n     ")}`);
  }
}
function report() {
  console.log("\n== observations");
  for (const n of notes) console.log(`  ${n}`);
  const passed = results.filter((r) => r.ok).length;
  const failed = results.length - passed;
  console.log(`\n== @deepgram/sdk ${SDK_VERSION ?? "?"} through Switchyard`);
  for (const r of results) console.log(`  ${r.ok ? "PASS" : "FAIL"}  ${r.id} ${r.name}`);
  console.log(`${passed} passed, ${failed} failed`);
  return failed;
}
function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}
function eq(actual, expected, what) {
  if (actual !== expected) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

// ---- event recorder: wait for events without sleeping ---------------------------------------
class Rec {
  constructor(name) {
    this.name = name;
    this.events = [];
    this.waiters = new Set();
  }
  push(kind, data) {
    const e = { i: this.events.length, t: now(), kind, data };
    this.events.push(e);
    for (const w of [...this.waiters]) {
      if (e.i >= w.from && w.pred(e)) {
        this.waiters.delete(w);
        clearTimeout(w.timer);
        w.resolve(e);
      }
    }
    return e;
  }
  /** The first event at index >= from matching pred, waiting up to ms for it. */
  wait(pred, ms, what, from = 0) {
    const found = this.events.find((e) => e.i >= from && pred(e));
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const w = { pred, from, resolve };
      w.timer = setTimeout(() => {
        this.waiters.delete(w);
        reject(new Error(`${this.name}: no ${what} within ${ms} ms; saw ${this.summary(from)}`));
      }, ms);
      this.waiters.add(w);
    });
  }
  summary(from = 0) {
    const tail = this.events.filter((e) => e.i >= from).slice(-14);
    return JSON.stringify(tail.map((e) => `${e.t}:${e.kind}${describe(e)}`));
  }
}
function describe(e) {
  if (e.kind === "msg") {
    const d = e.data;
    if (d?.type === "Results") return `(Results ${d.channel?.alternatives?.[0]?.transcript}${d.from_finalize ? " ff" : ""})`;
    if (d?.type === "TurnInfo") return `(TurnInfo#${d.sequence_id} ${d.transcript})`;
    if (d?.type === "Connected") return `(Connected#${d.sequence_id})`;
    if (d?.type) return `(${d.type}${d.stub ? " " + d.stub : ""})`;
    return `(${typeof d})`;
  }
  if (e.kind === "bin") return `(${e.data} B)`;
  if (e.kind === "close" || e.kind === "wire-close") return `(${e.data.code} ${e.data.reason ?? ""})`;
  if (e.kind === "open") return `(${e.data.color ?? "?"})`;
  if (e.kind === "error") return `(${e.data})`;
  return "";
}
const isMsg = (type) => (e) => e.kind === "msg" && e.data?.type === type;
const isKind = (kind) => (e) => e.kind === kind;

/** Wires an SDK socket to a recorder; returns the recorder. */
function record(sock, name, opts = {}) {
  const rec = new Rec(name);
  sock.on("open", () => {
    const ws = sock.socket?._ws;
    const up = ws?._syUpgrade;
    rec.push("open", {
      color: up?.headers?.["x-switchyard-color"],
      stub: up?.headers?.["x-stub-name"],
      protocol: ws?.protocol,
      extensions: ws?.extensions,
      headers: up?.headers,
    });
    // An app's own open handler (the SDK's `on` keeps one handler per event, so it goes here):
    // e.g. the Agent's Settings, which the SDK does not resend after a reconnect.
    if (opts.onOpen) opts.onOpen();
  });
  sock.on("message", (m) => {
    if (typeof Blob !== "undefined" && m instanceof Blob) rec.push("bin", m.size);
    else if (m instanceof ArrayBuffer || ArrayBuffer.isView(m)) rec.push("bin", m.byteLength);
    else rec.push("msg", m);
  });
  if (!opts.noClose) sock.on("close", (ev) => rec.push("close", { code: ev?.code, reason: ev?.reason }));
  sock.on("error", (err) => rec.push("error", String(err?.message ?? err)));
  return rec;
}

// ---- helpers --------------------------------------------------------------------------------
const AUDIO = Buffer.alloc(3200, 7); // 0.1 s of 16 kHz linear16: one stub Results per frame
const MODEL = "nova-3";

function client(baseUrl, opts = {}) {
  return new DeepgramClient({ apiKey: "interop-not-checked", baseUrl, ...opts });
}

async function admin(method, path, body, base = E.admin) {
  const res = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${E.token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: res.status, json };
}

async function waitReady(base, what) {
  const deadline = Date.now() + 15_000;
  let last = "no answer";
  for (let i = 0; i < 300 && Date.now() < deadline; i++) {
    try {
      const r = await fetch(base + "/readyz", { signal: AbortSignal.timeout(1000) });
      if (r.status === 200) {
        // both colours healthy, so the preview listener (standby) can be used at once
        const s = await admin("GET", "/status", undefined, base);
        const h = (c) => s.json?.colors?.[c]?.upstreams?.every((u) => u.healthy);
        if (h("blue") && h("green")) return;
        last = "a colour is not healthy yet";
      } else last = `readyz ${r.status}`;
    } catch (e) {
      last = String(e.message);
    }
    await new Promise((r) => setTimeout(r, 50)); // bounded poll: 300 x 50 ms
  }
  throw new Error(`${what} not ready within 15 s (${last})`);
}

function logText(file) {
  return readFileSync(file, "utf8");
}

async function connected(sock, rec, ms = 5000) {
  sock.connect();
  await rec.wait(isKind("open"), ms, "open");
  return rec.events.find(isKind("open")).data;
}

/** Runs a session end to end: CloseStream → final Results, Metadata, close 1000, no reconnect. */
async function closeListen(sock, rec, expectStub) {
  const from = rec.events.length;
  sock.sendCloseStream({ type: "CloseStream" });
  const fin = await rec.wait((e) => isMsg("Results")(e) && e.data.from_finalize === true, 5000, "final Results (from_finalize) after CloseStream", from);
  
  const meta = await rec.wait(isMsg("Metadata"), 5000, "Metadata after CloseStream", from);
  eq(meta.data.stub, expectStub, "Metadata.stub after CloseStream");
  assert(typeof meta.data.request_id === "string" && meta.data.request_id, "Metadata.request_id missing");
  const close = await rec.wait(isKind("close"), 5000, "close after Metadata", from);
  eq(close.data.code, 1000, "close code after CloseStream");
  assert(close.i > meta.i, "close arrived before Metadata");
  eq(sock.socket._shouldReconnect, false, "SDK reconnect armed after a 1000 close");
  return { fin, meta, close };
}

// =============================================================================================
async function main() {
  ({ DeepgramClient, DeepgramError } = await import("@deepgram/sdk"));
  console.log(`== @deepgram/sdk ${SDK_VERSION}, node ${process.version}`);
  await waitReady(E.admin, "proxy (open)");
  await waitReady(E.aadmin, "proxy (client_auth)");

  // ---- 1. pre-recorded ----------------------------------------------------------------------
  await scenario("1a", "pre-recorded transcribeFile (Buffer + file stream) via proxy -> blue", async () => {
    const dg = client(E.proxy);
    const audio = Buffer.alloc(32000, 3);
    const { data, rawResponse } = await dg.listen.v1.media
      .transcribeFile(audio, { model: MODEL, smart_format: true })
      .withRawResponse();
    eq(data.metadata?.stub, "blue", "metadata.stub");
    eq(data.metadata?.bytes, 32000, "metadata.bytes (body arrived whole)");
    eq(data.results?.channels?.[0]?.alternatives?.[0]?.transcript, "blue heard 32000 bytes", "transcript");
    eq(rawResponse.headers.get("x-switchyard-color"), "blue", "x-switchyard-color");
    eq(rawResponse.headers.get("x-stub-name"), "blue", "x-stub-name");
    assert(rawResponse.headers.get("dg-request-id"), "dg-request-id not passed through");
    const file = join(E.work, "upload.raw");
    writeFileSync(file, Buffer.alloc(64000, 5));
    const r2 = await dg.listen.v1.media.transcribeFile(createReadStream(file), { model: MODEL });
    eq(r2.metadata?.bytes, 64000, "file stream: metadata.bytes");
    eq(r2.metadata?.stub, "blue", "file stream: metadata.stub");
  });

  await scenario("1b", "pre-recorded transcribeUrl via proxy -> blue", async () => {
    const dg = client(E.proxy);
    const { data, rawResponse } = await dg.listen.v1.media
      .transcribeUrl({ url: "https://example.invalid/audio.wav", model: MODEL })
      .withRawResponse();
    eq(data.metadata?.stub, "blue", "metadata.stub");
    assert(data.metadata.bytes > 0, "stub saw no JSON body");
    eq(rawResponse.headers.get("x-switchyard-color"), "blue", "x-switchyard-color");
  });

  await scenario("1c", "pre-recorded file + URL via preview -> green (standby)", async () => {
    const dg = client(E.preview);
    const a = await dg.listen.v1.media.transcribeFile(Buffer.alloc(1000, 1), { model: MODEL }).withRawResponse();
    eq(a.data.metadata?.stub, "green", "file: metadata.stub");
    eq(a.rawResponse.headers.get("x-switchyard-color"), "green", "file: x-switchyard-color");
    const b = await dg.listen.v1.media.transcribeUrl({ url: "https://example.invalid/b.wav" });
    eq(b.metadata?.stub, "green", "url: metadata.stub");
  });

  // ---- 2. live STT ----------------------------------------------------------------------------
  const liveStt = (base, color) => async () => {
    const dg = client(base);
    const sock = await dg.listen.v1.connect({
      model: MODEL,
      encoding: "linear16",
      sample_rate: 16000,
      channels: 1,
      interim_results: "true",
      reconnectAttempts: 3,
    });
    const rec = record(sock, `listen@${color}`);
    const open = await connected(sock, rec);
    eq(open.color, color, "101 x-switchyard-color");
    eq(open.stub, color, "101 x-stub-name");
    eq(open.extensions, "", "negotiated extensions (permessage-deflate must not be accepted)");
    sock.sendMedia(Buffer.concat([AUDIO, AUDIO]));
    const r2 = await rec.wait(
      (e) => isMsg("Results")(e) && e.data.channel.alternatives[0].transcript === `${color} 2`,
      5000,
      "2nd Results",
    );
    eq(r2.data.is_final, true, "Results.is_final");
    sock.sendKeepAlive({ type: "KeepAlive" });
    sock.sendMedia(AUDIO.subarray(0, 1000));
    const from = rec.events.length;
    sock.sendFinalize({ type: "Finalize" });
    const ff = await rec.wait(isMsg("Results"), 5000, "Results after Finalize", from);
    eq(ff.data.from_finalize, true, "Finalize: from_finalize");
    eq(ff.data.channel.alternatives[0].transcript, `${color} 3`, "Finalize transcript");
    const { meta } = await closeListen(sock, rec, color);
    note(`2 listen@${color}: Results x3, Finalize, CloseStream -> Metadata(stub=${meta.data.stub}) -> close 1000; SDK did not reconnect`);
  };
  await scenario("2a", "live STT (listen v1 WS) via proxy -> blue", liveStt(E.proxy, "blue"));
  await scenario("2b", "live STT (listen v1 WS) via preview -> green", liveStt(E.preview, "green"));

  // ---- 3. TTS -----------------------------------------------------------------------------------
  await scenario("3a", "TTS REST speak (streamed audio) via proxy -> blue", async () => {
    const dg = client(E.proxy);
    const { data, rawResponse } = await dg.speak.v1.audio
      .generate({ text: "Hello from the interop check.", model: "aura-2-thalia-en" })
      .withRawResponse();
    eq(rawResponse.headers.get("x-switchyard-color"), "blue", "x-switchyard-color");
    assert(/^audio\//.test(rawResponse.headers.get("content-type") ?? ""), "content-type is not audio/*");
    let bytes = 0,
      chunks = 0;
    for await (const c of data.stream()) {
      bytes += c.byteLength;
      chunks++;
    }
    eq(bytes, 8 * 4096, "audio bytes");
    note(`3a speak REST: ${bytes} B in ${chunks} reads, dg-char-count=${rawResponse.headers.get("dg-char-count")}`);
  });

  const speakWs = (base, color) => async () => {
    const dg = client(base);
    const sock = await dg.speak.v1.connect({ model: "aura-2-thalia-en", encoding: "linear16", sample_rate: 24000, reconnectAttempts: 3 });
    const rec = record(sock, `speak@${color}`);
    const open = await connected(sock, rec);
    eq(open.color, color, "101 x-switchyard-color");
    await rec.wait(isMsg("Metadata"), 5000, "Metadata greeting");
    let from = rec.events.length;
    sock.sendText({ type: "Speak", text: "Hello there, friend." }); // 20 chars -> 2 frames
    sock.sendFlush({ type: "Flush" });
    const fl = await rec.wait(isMsg("Flushed"), 5000, "Flushed", from);
    const audio = rec.events.filter((e) => e.i >= from && e.i < fl.i && e.kind === "bin");
    eq(audio.length, 2, "binary audio frames before Flushed");
    from = rec.events.length;
    sock.sendClear({ type: "Clear" });
    await rec.wait(isMsg("Cleared"), 5000, "Cleared", from);
    from = rec.events.length;
    sock.sendClose({ type: "Close" });
    const close = await rec.wait(isKind("close"), 5000, "close after Close", from);
    eq(close.data.code, 1000, "close code after Close");
    eq(sock.socket._shouldReconnect, false, "SDK reconnect armed after a 1000 close");
  };
  await scenario("3b", "TTS speak v1 WS (Speak/Flush/Clear/Close) via proxy -> blue", speakWs(E.proxy, "blue"));
  await scenario("3c", "TTS speak v1 WS via preview -> green", speakWs(E.preview, "green"));

  // ---- 4. drain ----------------------------------------------------------------------------------
  let drainSession = null;
  await scenario("4", "drain: flip blue->green (drain_timeout 1s, grace 2s) with live STT + speak WS open", async () => {
    const dg = client(E.proxy);
    drainSession = dg.sessionId;
    const listen = await dg.listen.v1.connect({ model: MODEL, encoding: "linear16", sample_rate: 16000 });
    const lrec = record(listen, "drain-listen", { noClose: true });
    const speak = await dg.speak.v1.connect({ model: "aura-2-thalia-en", encoding: "linear16" });
    const srec = record(speak, "drain-speak");
    eq((await connected(listen, lrec)).color, "blue", "listen: first 101 colour");
    eq((await connected(speak, srec)).color, "blue", "speak: first 101 colour");
    await srec.wait(isMsg("Metadata"), 5000, "speak Metadata greeting");

    // The app's audio pump: 20 ms of audio (640 B) every 20 ms, buffered while the socket is not
    // open (sendMedia throws "Socket is not open." while the SDK reconnects: the app must buffer).
    const CHUNK = Buffer.alloc(640, 9);
    const perSecond = 50;
    const pending = [];
    let sentBlue = 0,
      sentTotal = 0,
      buffered = 0,
      ticks = 0,
      sentAtClose = -1;
    listen.on("close", (ev) => {
      lrec.push("close", { code: ev?.code, reason: ev?.reason });
      if (sentAtClose < 0) sentAtClose = sentTotal;
    });
    const pump = setInterval(() => {
      if (++ticks > 2000) return clearInterval(pump); // bounded: 40 s at most
      pending.push(CHUNK);
      if (listen.readyState !== 1) {
        buffered++;
        return;
      }
      while (pending.length) {
        listen.sendMedia(pending.shift());
        sentTotal++;
      }
    }, 20);
    try {
      await lrec.wait((e) => isMsg("Results")(e) && e.data.channel.alternatives[0].transcript === "blue 3", 5000, "blue Results 3");
      sentBlue = sentTotal;

      const st = await admin("GET", "/status");
      eq(st.json.colors.blue.open_streams, 2, "status: blue open_streams before flip");
      const flipAt = now();
      const flip = await admin("POST", "/flip", { to: "green", drain_timeout: "1s", reason: "sdk-js interop" });
      eq(flip.status, 200, `flip status (${JSON.stringify(flip.json)})`);
      note(`4 flip answered after ${now() - flipAt} ms: active=${flip.json.active} blue.state=${flip.json.colors?.blue?.state} deadline=${flip.json.colors?.blue?.drain_deadline}`);
      const lFrom = lrec.events.length;
      const sFrom = srec.events.length;

      // listen: final Results (from_finalize) + Metadata from blue, then 1012, then reconnect
      const lClose = await lrec.wait((e) => e.kind === "close", 8000, "listen close after the drain deadline", lFrom);
      const finals = lrec.events.filter((e) => e.i >= lFrom && e.i < lClose.i && isMsg("Results")(e));
      const meta = lrec.events.find((e) => e.i >= lFrom && e.i < lClose.i && isMsg("Metadata")(e));
      const lastFinal = finals[finals.length - 1];
      assert(lastFinal && lastFinal.data.from_finalize === true, `no final Results(from_finalize) from blue before the close; saw ${lrec.summary(lFrom)}`);
      assert(lastFinal.data.channel.alternatives[0].transcript.startsWith("blue "), "final Results not from blue");
      assert(meta, `no Metadata before the close; saw ${lrec.summary(lFrom)}`);
      eq(meta.data.stub, "blue", "drain Metadata.stub");
      assert(meta.i > lastFinal.i, "Metadata came before the final Results");
      eq(lClose.data.code, 1012, "listen close code at the drain");
      assert(lClose.t - flipAt >= 950, `listen closed ${lClose.t - flipAt} ms after the flip, before the 1 s drain deadline`);
      assert(lClose.t - meta.t < 1000, `1012 came ${lClose.t - meta.t} ms after blue's Metadata: Switchyard waited out grace instead of closing when the upstream closed`);
      // Audio accounting: blue transcribed what it got before the injected CloseStream; the
      // chunks the app sent after it are lost, and Switchyard must count them (dropped_frames).
      const blueChunks = Math.round(meta.data.duration * perSecond);
      const lost = sentAtClose - blueChunks;
      note(`4 listen: app sent ${sentAtClose} chunks on blue, blue transcribed ${blueChunks}, so ${lost} were lost in the CloseStream window`);
      note(`4 listen: final Results "${lastFinal.data.channel.alternatives[0].transcript}" at +${lastFinal.t - flipAt} ms, Metadata(stub=blue, duration=${meta.data.duration}) at +${meta.t - flipAt} ms, close ${lClose.data.code} "${lClose.data.reason}" at +${lClose.t - flipAt} ms after the flip`);
      const lOpen2 = await lrec.wait(isKind("open"), 12_000, "listen reconnect (open)", lClose.i);
      eq(lOpen2.data.color, "green", "listen: reconnect 101 colour");
      eq(lOpen2.data.stub, "green", "listen: reconnect 101 x-stub-name");
      note(`4 listen: SDK reconnected ${lOpen2.t - lClose.t} ms after the 1012 (retryCount=${listen.socket.retryCount}), landed on ${lOpen2.data.color}; ${buffered} audio chunks had been buffered by the app while closed`);
      const g1 = await lrec.wait((e) => isMsg("Results")(e) && e.data.channel.alternatives[0].transcript.startsWith("green "), 5000, "Results from green after reconnect", lOpen2.i);
      note(`4 listen: first green Results at +${g1.t - lOpen2.t} ms after reopen`);

      // speak: Flushed from blue, then 1012, reconnect to green (Metadata greeting again)
      const sClose = await srec.wait(isKind("close"), 8000, "speak close after the drain deadline", sFrom);
      const flushed = srec.events.find((e) => e.i >= sFrom && e.i < sClose.i && isMsg("Flushed")(e));
      assert(flushed, `speak: no Flushed before the close (the drain's injected Flush); saw ${srec.summary(sFrom)}`);
      eq(sClose.data.code, 1012, "speak close code at the drain");
      assert(sClose.t - flushed.t < 1000, `speak 1012 came ${sClose.t - flushed.t} ms after Flushed: grace waited out needlessly`);
      note(`4 speak: Flushed at +${flushed.t - flipAt} ms, close ${sClose.data.code} "${sClose.data.reason}" at +${sClose.t - flipAt} ms after the flip`);
      const sOpen2 = await srec.wait(isKind("open"), 12_000, "speak reconnect (open)", sClose.i);
      eq(sOpen2.data.color, "green", "speak: reconnect 101 colour");
      await srec.wait(isMsg("Metadata"), 5000, "speak Metadata greeting after reconnect", sOpen2.i);
      note(`4 speak: SDK reconnected ${sOpen2.t - sClose.t} ms after the 1012, landed on ${sOpen2.data.color} (x-stub-name=${sOpen2.data.stub})`);
      const sFrom2 = srec.events.length;
      speak.sendText({ type: "Speak", text: "after the flip" });
      speak.sendFlush({ type: "Flush" });
      await srec.wait(isMsg("Flushed"), 5000, "Flushed from green", sFrom2);
      assert(srec.events.some((e) => e.i >= sFrom2 && e.kind === "bin"), "no audio from green");

      const st2 = await admin("GET", "/status");
      eq(st2.json.colors.green.open_streams, 2, "status: green open_streams after reconnects");
      eq(st2.json.colors.blue.open_streams, 0, "status: blue open_streams after drain");

      clearInterval(pump);
      const cs = await closeListen(listen, lrec, "green");
      const greenChunks = Math.round(cs.meta.data.duration * perSecond);
      note(`4 listen: green session ended cleanly, Metadata(duration=${cs.meta.data.duration}); app sent ${sentTotal} chunks in total (${sentBlue} before the flip, ${sentTotal - sentAtClose} after the 1012 incl. ${buffered} buffered while reconnecting)`);
      eq(greenChunks, sentTotal - sentAtClose, "green transcribed every chunk sent (and buffered) after the reconnect");
      // the stream's end line on blue must count the lost chunks
      const endLine = logText(E.logOpen)
        .split("\n")
        .find((l) => l.includes(drainSession) && /color=blue/.test(l) && /path=\/v1\/listen/.test(l) && /stream ended/.test(l));
      assert(endLine, "no 'stream ended' log line for the drained blue listen stream");
      const dropped = Number(/dropped_frames=(\d+)/.exec(endLine)?.[1]);
      note(`4 listen: blue end line: ${endLine.replace(/^.*stream ended/, "stream ended")}`);
      // Exact: every chunk the app sent on blue either reached blue before the injected
      // CloseStream or is counted, including those read while Switchyard waited for the
      // client's answer to its 1012.
      const lostOnBlue = sentAtClose - blueChunks;
      eq(dropped, lostOnBlue, "dropped_frames on blue's end line = chunks sent on blue and never transcribed");
      const sFrom3 = srec.events.length;
      speak.sendClose({ type: "Close" });
      eq((await srec.wait(isKind("close"), 5000, "speak close", sFrom3)).data.code, 1000, "speak final close code");
    } finally {
      clearInterval(pump);
      try { listen.close(); } catch {}
      try { speak.close(); } catch {}
    }
  });

  // ---- 6. session id in the logs -------------------------------------------------------------
  await scenario("6", "x-deepgram-session-id on the proxy's stream log lines (both colours)", async () => {
    assert(drainSession, "scenario 4 did not run");
    const lines = logText(E.logOpen).split("\n").filter((l) => l.includes(drainSession));
    assert(lines.length > 0, `no proxy log line carries session ${drainSession}`);
    assert(lines.some((l) => /color[=":\s]+blue/.test(l)), "no blue line carries the session id");
    assert(lines.some((l) => /color[=":\s]+green/.test(l)), "no green line carries the session id");
    assert(lines.some((l) => /drain/.test(l)), "no drain line carries the session id");
    note(`6 ${lines.length} proxy log lines carry session ${drainSession}; e.g.\n      ${lines.slice(0, 4).join("\n      ")}`);
    const endLines = lines.filter((l) => /dropped|frames/.test(l));
    if (endLines.length) note(`6 stream end lines: \n      ${endLines.join("\n      ")}`);
  });

  // ---- 5. client auth ---------------------------------------------------------------------------
  await scenario("5a", "client_auth: listed key (Authorization: Token) REST + live STT via SDK", async () => {
    const dg = client(E.aproxy, { apiKey: E.goodKey });
    const { data, rawResponse } = await dg.listen.v1.media.transcribeFile(Buffer.alloc(3200, 1), { model: MODEL }).withRawResponse();
    eq(data.metadata?.stub, "blue", "metadata.stub");
    eq(rawResponse.headers.get("x-switchyard-color"), "blue", "x-switchyard-color");
    const sock = await dg.listen.v1.connect({ model: MODEL, encoding: "linear16", sample_rate: 16000 });
    const rec = record(sock, "auth-listen");
    eq((await connected(sock, rec)).color, "blue", "101 colour");
    sock.sendMedia(AUDIO);
    await rec.wait(isMsg("Results"), 5000, "Results");
    await closeListen(sock, rec, "blue");
    // accessToken -> Authorization: Bearer <key>
    const dgb = client(E.aproxy, { accessToken: E.goodKey });
    const b = await dgb.listen.v1.media.transcribeUrl({ url: "https://example.invalid/c.wav" });
    eq(b.metadata?.stub, "blue", "Bearer: metadata.stub");
    // preview listener enforces it too
    const p = await client(E.apreview, { apiKey: E.goodKey }).listen.v1.media.transcribeFile(Buffer.alloc(10, 1), {});
    eq(p.metadata?.stub, "green", "preview with key: metadata.stub");
  });

  await scenario("5b", "client_auth: unlisted key -> 401 (REST) / refused handshake (WS), clean SDK errors", async () => {
    const dg = client(E.aproxy, { apiKey: E.badKey });
    let err;
    try {
      await dg.listen.v1.media.transcribeFile(Buffer.alloc(100, 1), { model: MODEL });
    } catch (e) {
      err = e;
    }
    assert(err, "REST with an unlisted key succeeded");
    assert(err instanceof DeepgramError, `REST error is not a DeepgramError: ${err}`);
    eq(err.statusCode, 401, "REST status");
    eq(err.rawResponse?.headers?.get?.("x-switchyard-color") ?? null, null, "401 must carry no x-switchyard-color");
    assert(typeof err.body === "object" && err.body.error, `401 body is not Switchyard's JSON error: ${JSON.stringify(err.body)}`);
    note(`5b REST unlisted key: ${err.constructor.name} statusCode=${err.statusCode} body=${JSON.stringify(err.body)}`);

    const sock = await dg.listen.v1.connect({ model: MODEL, encoding: "linear16", sample_rate: 16000, reconnectAttempts: 2 });
    const rec = record(sock, "auth-listen-bad");
    const openWait = sock.waitForOpen().then(
      () => "opened",
      (e) => `rejected: ${e?.message ?? e}`,
    );
    sock.connect();
    const errEv = await rec.wait(isKind("error"), 5000, "error event for the refused handshake");
    const closeEv = await rec.wait(isKind("close"), 5000, "close event for the refused handshake");
    const outcome = await openWait;
    assert(!rec.events.some(isKind("open")), "socket opened with an unlisted key");
    assert(/401/.test(errEv.data), `error does not name the 401: ${errEv.data}`);
    const refused = sock.socket._ws?._syRefused;
    eq(refused?.status, 401, "handshake status");
    eq(refused?.headers?.["x-switchyard-color"], undefined, "401 handshake must carry no x-switchyard-color");
    note(`5b WS unlisted key: SDK error "${errEv.data}", then close code ${closeEv.data.code}; waitForOpen ${outcome}; reconnect armed afterwards: ${sock.socket._shouldReconnect}`);
    // the SDK's own retries must stop: no second handshake
    eq(sock.socket._shouldReconnect, false, "SDK keeps reconnecting after a refused handshake");
  });

  await scenario("5c", "client_auth: Sec-WebSocket-Protocol `token, <key>` (raw ws + SDK browser path)", async () => {
    // raw ws, as a browser would send it
    const url = E.aproxy.replace("http", "ws") + "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000";
    const good = await rawWs(url, ["token", E.goodKey]);
    eq(good.outcome, "open", `raw ws listed key outcome (${good.detail})`);
    eq(good.protocol, "token", "101 Sec-WebSocket-Protocol (a browser needs one echoed)");
    eq(good.color, "blue", "101 colour");
    eq(good.firstTranscript, "blue 1", "Results through the subprotocol-authenticated stream");
    const bearer = await rawWs(url, ["bearer", E.goodKey]);
    eq(bearer.outcome, "open", `raw ws "bearer, <key>" outcome (${bearer.detail})`);
    eq(bearer.protocol, "bearer", "101 Sec-WebSocket-Protocol for bearer");
    const bad = await rawWs(url, ["token", E.badKey]);
    eq(bad.outcome, "refused", `raw ws unlisted key outcome (${bad.detail})`);
    eq(bad.status, 401, "raw ws unlisted key status");
    eq(bad.color, undefined, "401 handshake must carry no x-switchyard-color");
    // the SDK's browser code path: ["token", KEY, "x-deepgram-session-id", uuid], no headers
    const sim = await runBrowserSim(E.aproxy, E.goodKey);
    eq(sim.outcome, "ok", `SDK browser path with listed key (${JSON.stringify(sim)})`);
    eq(sim.protocol, "token", "SDK browser path: chosen subprotocol");
    note(`5c SDK browser path offered ${JSON.stringify(sim.offered)} (key redacted); 101 chose "${sim.protocol}", colour ${sim.color}; Metadata stub=${sim.stub}`);
    const simBad = await runBrowserSim(E.aproxy, E.badKey);
    eq(simBad.outcome, "refused", `SDK browser path with unlisted key (${JSON.stringify(simBad)})`);
    note(`5c SDK browser path, unlisted key: ${JSON.stringify(simBad)}`);
    const simSession = sim.session;
    const lines = logText(E.logAuth).split("\n").filter((l) => simSession && l.includes(simSession));
    assert(lines.length > 0, `session id ${simSession}, sent only in Sec-WebSocket-Protocol, is on no proxy log line`);
    note(`5c browser-path session id (sent only in Sec-WebSocket-Protocol) is on the stream's log line: ${lines[0].replace(/^.*INFO /, "")}`);
  });

  await scenario("5d", "no client key (listed or not) appears in Switchyard's logs", async () => {
    for (const f of [E.logOpen, E.logAuth]) {
      const t = logText(f);
      assert(!t.includes(E.goodKey), `listed key found in ${f}`);
      assert(!t.includes(E.badKey), `unlisted key found in ${f}`);
      assert(!t.includes(E.token), `admin token found in ${f}`);
    }
  });

  // ---- 7/8. Flux and the Voice Agent -------------------------------------------------------------
  const FLUX = { model: "flux-general-en", encoding: "linear16", sample_rate: 16000 };
  const AGENT_SETTINGS = {
    type: "Settings",
    audio: {
      input: { encoding: "linear16", sample_rate: 16000 },
      output: { encoding: "linear16", sample_rate: 24000, container: "none" },
    },
    agent: {
      language: "en",
      listen: { provider: { type: "deepgram", model: "nova-3" } },
      think: { provider: { type: "open_ai", model: "gpt-4o-mini" }, prompt: "You are the Switchyard interop check." },
      speak: { provider: { type: "deepgram", model: "aura-2-thalia-en" } },
      greeting: "Hello from the interop check.",
    },
  };
  /** Blue active again (scenario 4 leaves green active); a no-op flip answers changed=false. */
  async function routeToBlue(why) {
    const r = await admin("POST", "/flip", { to: "blue", drain_timeout: "0s", reason: `sdk-js interop: ${why}` });
    eq(r.status, 200, `flip back to blue (${JSON.stringify(r.json)})`);
    eq(r.json.active, "blue", "active colour after the flip back to blue");
  }
  /** The proxy holds no stream or request on `color` any more (its own bounded wait). */
  async function drainedOf(color, what) {
    const r = await admin("GET", `/drain/wait?color=${color}&timeout=3s`);
    eq(r.json?.drained, true, `${what}: ${color} drained (${JSON.stringify(r.json)})`);
  }
  /** The proxy's "stream ended" line of one stream; a bounded poll (the line follows the close). */
  async function endLineOf(session, color, path) {
    const re = new RegExp(`color=${color} path=${path.replaceAll("/", "\\/")} session="${session}".*stream ended`);
    for (let i = 0; i < 60; i++) {
      const line = logText(E.logOpen).split("\n").find((l) => re.test(l));
      if (line) return line;
      await new Promise((r) => setTimeout(r, 50)); // bounded poll: 60 x 50 ms
    }
    throw new Error(`no 'stream ended' line for ${color} ${path} session ${session} within 3 s`);
  }
  /** One Flux session's messages (after the `open` event, before `close`): sequence_id 0, 1, 2, ... unbroken. */
  function fluxSession(rec, open, close) {
    const msgs = rec.events.filter((e) => e.kind === "msg" && e.i > open.i && (!close || e.i < close.i));
    msgs.forEach((m, k) => eq(m.data.sequence_id, k, `${rec.name}: sequence_id of message ${k} (${m.data.type}); saw ${rec.summary(open.i)}`));
    assert(msgs.length > 0 && isMsg("Connected")(msgs[0]), `${rec.name}: first message is not Connected; saw ${rec.summary(open.i)}`);
    return msgs;
  }
  const FLUX_BPS = 16000 * 2; // linear16 mono 16 kHz: audio_window_end * FLUX_BPS = bytes the stub got

  await scenario("7a", "Flux (listen v2 WS) via proxy -> blue: Connected, TurnInfo, CloseStream -> close 1005, no reconnect", async () => {
    await routeToBlue("reset before Flux/Agent"); // scenario 4 left green active
    const dg = client(E.proxy);
    const flux = await dg.listen.v2.connect({ ...FLUX, reconnectAttempts: 3 });
    const rec = record(flux, "flux@blue");
    const open = await connected(flux, rec);
    eq(open.color, "blue", "101 x-switchyard-color");
    eq(open.stub, "blue", "101 x-stub-name");
    eq(open.extensions, "", "negotiated extensions (permessage-deflate must not be accepted)");
    const openEv = rec.events.find(isKind("open"));
    const hello = await rec.wait(isMsg("Connected"), 5000, "Connected");
    eq(hello.data.sequence_id, 0, "Connected.sequence_id");
    assert(typeof hello.data.request_id === "string" && hello.data.request_id, "Connected.request_id missing");
    flux.sendMedia(Buffer.concat([AUDIO, AUDIO]));
    const t2 = await rec.wait((e) => isMsg("TurnInfo")(e) && e.data.transcript === "blue 2", 5000, "2nd TurnInfo");
    eq(t2.data.event, "Update", "TurnInfo.event");
    flux.sendMedia(AUDIO.subarray(0, 1000));
    const from = rec.events.length;
    flux.sendCloseStream({ type: "CloseStream" });
    const close = await rec.wait(isKind("close"), 5000, "close after CloseStream", from);
    const msgs = fluxSession(rec, openEv, close);
    const last = msgs[msgs.length - 1];
    assert(isMsg("TurnInfo")(last) && last.i >= from, `no TurnInfo after CloseStream before the close; saw ${rec.summary(from)}`);
    eq(last.data.transcript, "blue 3", "last TurnInfo (CloseStream flushes the 1000 B left over)");
    eq(Math.round(last.data.audio_window_end * FLUX_BPS), 2 * AUDIO.length + 1000, "last TurnInfo.audio_window_end (all audio arrived)");
    eq(msgs.length, 4, "messages on the Flux stream (Connected + 3 TurnInfo)");
    eq(close.data.code, 1005, "close code after CloseStream (Flux closes without a status code)");
    assert(!rec.events.some(isKind("error")), `error event on a normal Flux end; saw ${rec.summary()}`);
    eq(flux.socket._shouldReconnect, false, "SDK reconnect armed after the status-less close that followed CloseStream");
    await drainedOf("blue", "after the Flux close");
    const endLine = await endLineOf(dg.sessionId, "blue", "/v2/listen");
    note(`7a flux@blue: Connected#0, TurnInfo x3 (last "${last.data.transcript}" after CloseStream), close ${close.data.code}; no error event, SDK did not reconnect; ${endLine.replace(/^.*stream ended/, "stream ended")}`);
  });

  await scenario("8a", "Voice Agent (agent v1 WS) via proxy -> blue: Welcome, Settings -> SettingsApplied, audio echo, close 1000", async () => {
    const dg = client(E.proxy);
    const agent = await dg.agent.v1.connect({ reconnectAttempts: 3 });
    const rec = record(agent, "agent@blue", { onOpen: () => agent.sendSettings(AGENT_SETTINGS) });
    const open = await connected(agent, rec);
    eq(open.color, "blue", "101 x-switchyard-color");
    eq(open.stub, "blue", "101 x-stub-name");
    const welcome = await rec.wait(isMsg("Welcome"), 5000, "Welcome");
    eq(rec.events.find(isKind("msg")).i, welcome.i, "Welcome is the first message");
    assert(typeof welcome.data.request_id === "string" && welcome.data.request_id, "Welcome.request_id missing");
    const echoed = await rec.wait(isMsg("Settings"), 5000, "Settings echo");
    eq(JSON.stringify(echoed.data), JSON.stringify(AGENT_SETTINGS), "echoed Settings (text relayed verbatim)");
    const applied = await rec.wait(isMsg("SettingsApplied"), 5000, "SettingsApplied");
    assert(applied.i > echoed.i, "SettingsApplied came before the Settings echo");
    let from = rec.events.length;
    agent.sendMedia(Buffer.alloc(1234, 3));
    eq((await rec.wait(isKind("bin"), 5000, "binary echo", from)).data, 1234, "echoed audio frame size");
    from = rec.events.length;
    agent.sendKeepAlive({ type: "KeepAlive" });
    await rec.wait(isMsg("KeepAlive"), 5000, "KeepAlive echo", from);
    // The app ends the conversation. The SDK's close() reports a close 1000 at once, by itself;
    // the code the server side answered with is read from the underlying ws socket.
    from = rec.events.length;
    const raw = agent.socket._ws;
    raw.once("close", (code, reason) => rec.push("wire-close", { code, reason: String(reason) }));
    agent.close();
    const wire = await rec.wait(isKind("wire-close"), 5000, "close handshake answered", from);
    eq(wire.data.code, 1000, "close code answered through the proxy");
    eq(rec.events.filter((e) => e.i >= from && e.kind === "close").map((e) => e.data.code).join(), "1000", "SDK close events after close()");
    assert(!rec.events.some(isKind("error")), `error event on a normal Agent end; saw ${rec.summary()}`);
    eq(agent.socket._shouldReconnect, false, "SDK reconnect armed after the app's close");
    await drainedOf("blue", "after the Agent close");
    const endLine = await endLineOf(dg.sessionId, "blue", "/v1/agent/converse");
    assert(/close_code=1000/.test(endLine), `Agent end line does not carry close_code=1000: ${endLine}`);
    note(`8a agent@blue: Welcome, Settings echoed, SettingsApplied, 1234 B echoed, KeepAlive echoed, client close -> ${wire.data.code}; SDK did not reconnect; ${endLine.replace(/^.*stream ended/, "stream ended")}`);
  });

  // One flip drains a Flux and an Agent stream together, so the SDK's reconnect delay (1-5 s,
  // drawn once per process) is paid once: 7b opens both on blue, flips and checks the Flux side;
  // 8b checks the Agent side of the same flip, then puts the route back on blue.
  let fa = null;
  await scenario("7b", "drain: flip blue->green (drain_timeout 1s) with a Flux and an Agent stream open: Flux side", async () => {
    const dg = client(E.proxy);
    fa = { session: dg.sessionId, flipAt: null };
    const flux = await dg.listen.v2.connect(FLUX);
    const frec = record(flux, "drain-flux", { noClose: true });
    // The Agent app sends Settings on every open (the SDK does not resend them after a
    // reconnect) and audio frames of varying size (320..416 B), so that the echoed sizes show
    // order and completeness; while the socket is closed it sends nothing (a conversation does
    // not survive a reconnect, so there is nothing worth buffering).
    const agent = await dg.agent.v1.connect();
    const agentSent = []; // {session, size, t}
    let agentSession = -1;
    const arec = record(agent, "drain-agent", {
      onOpen: () => {
        agentSession++;
        agent.sendSettings(AGENT_SETTINGS);
      },
    });
    Object.assign(fa, { flux, frec, agent, arec, agentSent });

    // The Flux app's audio pump, as in 4: 640 B every 20 ms, buffered while the socket is not open.
    const CHUNK = Buffer.alloc(640, 9);
    const pending = [];
    let sent = 0,
      buffered = 0,
      ticks = 0,
      sentAtClose = -1;
    flux.on("close", (ev) => {
      frec.push("close", { code: ev?.code, reason: ev?.reason });
      if (sentAtClose < 0) sentAtClose = sent;
    });
    try {
      eq((await connected(flux, frec)).color, "blue", "Flux: first 101 colour");
      const fOpenEv = frec.events.find(isKind("open"));
      fa.fluxPump = setInterval(() => {
        if (++ticks > 1500) return clearInterval(fa.fluxPump); // bounded: 30 s at most
        pending.push(CHUNK);
        if (flux.readyState !== 1) {
          buffered++;
          return;
        }
        while (pending.length) {
          flux.sendMedia(pending.shift());
          sent++;
        }
      }, 20);
      const hello = await frec.wait(isMsg("Connected"), 5000, "Connected from blue");
      await frec.wait((e) => isMsg("TurnInfo")(e) && e.data.transcript === "blue 3", 5000, "blue TurnInfo 3");

      eq((await connected(agent, arec)).color, "blue", "Agent: first 101 colour");
      fa.aOpen = arec.events.find(isKind("open"));
      fa.welcome = await arec.wait(isMsg("Welcome"), 5000, "Agent Welcome from blue");
      await arec.wait(isMsg("SettingsApplied"), 5000, "Agent SettingsApplied from blue");
      let aTicks = 0;
      fa.agentPump = setInterval(() => {
        if (++aTicks > 1500) return clearInterval(fa.agentPump); // bounded: 30 s at most
        if (agent.readyState !== 1) return;
        const size = 320 + (agentSent.length % 97);
        agent.sendMedia(Buffer.alloc(size, 5));
        agentSent.push({ session: agentSession, size, t: now() });
      }, 20);
      await arec.wait((e) => e.kind === "bin" && e.i > fa.aOpen.i, 5000, "Agent audio echo from blue");

      const st = await admin("GET", "/status");
      eq(st.json.colors.blue.open_streams, 2, "status: blue open_streams before the flip (Flux + Agent)");
      const flipAt = now();
      const fFrom = frec.events.length;
      fa.aFrom = arec.events.length;
      const flip = await admin("POST", "/flip", { to: "green", drain_timeout: "1s", reason: "sdk-js interop flux+agent" });
      eq(flip.status, 200, `flip status (${JSON.stringify(flip.json)})`);
      eq(flip.json.active, "green", "active after the flip");
      fa.flipAt = flipAt;
      note(`7b flip answered after ${now() - flipAt} ms: blue.state=${flip.json.colors?.blue?.state} deadline=${flip.json.colors?.blue?.drain_deadline}`);

      // blue's messages keep coming until the deadline; the injected CloseStream's last
      // TurnInfo, then 1012 (not Flux's status-less close: the SDK must reconnect)
      const fClose = await frec.wait(isKind("close"), 8000, "Flux close after the drain deadline", fFrom);
      const blue = fluxSession(frec, fOpenEv, fClose);
      eq(blue[0].data.request_id, hello.data.request_id, "Flux: blue session's Connected");
      const last = blue[blue.length - 1];
      assert(isMsg("TurnInfo")(last) && last.data.transcript.startsWith("blue "), `last message before the close is not blue's TurnInfo; saw ${frec.summary(fFrom)}`);
      const during = blue.filter((e) => e.i >= fFrom);
      assert(during.length >= 2, `Flux: only ${during.length} blue messages after the flip; saw ${frec.summary(fFrom)}`);
      eq(fClose.data.code, 1012, "Flux close code at the drain");
      assert(fClose.t - flipAt >= 950, `Flux closed ${fClose.t - flipAt} ms after the flip, before the 1 s drain deadline`);
      assert(last.t - flipAt >= 900, `blue's last TurnInfo came ${last.t - flipAt} ms after the flip: messages stopped before the deadline`);
      assert(fClose.t - last.t < 1000, `1012 came ${fClose.t - last.t} ms after blue's last TurnInfo: Switchyard waited out grace instead of closing when the upstream closed`);
      assert(!frec.events.some((e) => e.i < fClose.i && e.kind === "error"), `Flux: error event before the 1012; saw ${frec.summary()}`);
      const blueChunks = Math.round((last.data.audio_window_end * FLUX_BPS) / CHUNK.length);
      note(`7b flux: ${blue.length} blue messages (sequence_id 0..${blue.length - 1}, ${during.length} after the flip), last "${last.data.transcript}" at +${last.t - flipAt} ms, close ${fClose.data.code} "${fClose.data.reason}" at +${fClose.t - flipAt} ms after the flip; app sent ${sentAtClose} chunks on blue, blue got ${blueChunks}`);

      const fOpen2 = await frec.wait(isKind("open"), 12_000, "Flux reconnect (open)", fClose.i);
      eq(fOpen2.data.color, "green", "Flux: reconnect 101 colour");
      eq(fOpen2.data.stub, "green", "Flux: reconnect 101 x-stub-name");
      const hello2 = await frec.wait(isMsg("Connected"), 5000, "Connected from green", fOpen2.i);
      assert(hello2.data.request_id !== hello.data.request_id, "green's Connected repeats blue's request_id");
      const g1 = await frec.wait((e) => isMsg("TurnInfo")(e) && e.data.transcript.startsWith("green "), 5000, "TurnInfo from green", fOpen2.i);
      note(`7b flux: SDK reconnected ${fOpen2.t - fClose.t} ms after the 1012 (retryCount=${flux.socket.retryCount}), landed on ${fOpen2.data.color}; Connected#${hello2.data.sequence_id}, first "${g1.data.transcript}" +${g1.t - fOpen2.t} ms after reopen; ${buffered} chunks buffered by the app while closed`);

      // the green session ends as a Flux session does: CloseStream -> status-less close, no reconnect
      clearInterval(fa.fluxPump);
      const gFrom = frec.events.length;
      flux.sendCloseStream({ type: "CloseStream" });
      const gClose = await frec.wait(isKind("close"), 5000, "close after CloseStream on green", gFrom);
      eq(gClose.data.code, 1005, "Flux close code after CloseStream on green");
      const green = fluxSession(frec, fOpen2, gClose);
      const gLast = green[green.length - 1];
      eq(Math.round((gLast.data.audio_window_end * FLUX_BPS) / CHUNK.length), sent - sentAtClose, "green got every chunk sent (and buffered) after the reconnect");
      eq(flux.socket._shouldReconnect, false, "SDK reconnect armed after CloseStream on green");
      assert(!frec.events.some(isKind("error")), `Flux: error event; saw ${frec.summary()}`);
      // the audio sent on blue after the injected CloseStream is lost, and counted
      const endLine = await endLineOf(fa.session, "blue", "/v2/listen");
      note(`7b flux: blue end line: ${endLine.replace(/^.*stream ended/, "stream ended")}`);
      eq(Number(/dropped_frames=(\d+)/.exec(endLine)?.[1]), sentAtClose - blueChunks, "dropped_frames on blue's Flux end line = chunks sent on blue and never transcribed");
      assert(/close_code=1012/.test(endLine), `blue Flux end line does not carry close_code=1012: ${endLine}`);
    } finally {
      clearInterval(fa.fluxPump);
      try { flux.close(); } catch {}
    }
  });

  await scenario("8b", "drain: the same flip, Agent side: echoes until the deadline, 1012 at it, SDK reconnects to green", async () => {
    try {
      assert(fa?.flipAt != null, "scenario 7b did not open the Agent stream and flip");
      const { agent, arec, agentSent, flipAt, aOpen, aFrom, welcome } = fa;
      const aClose = await arec.wait(isKind("close"), 8000, "Agent close after the drain deadline", aFrom);
      eq(aClose.data.code, 1012, "Agent close code at the drain");
      assert(aClose.t - flipAt >= 900, `Agent closed ${aClose.t - flipAt} ms after the flip, before the 1 s drain deadline`);
      assert(aClose.t - flipAt < 2500, `Agent closed ${aClose.t - flipAt} ms after the flip: later than the deadline (an Agent stream has no grace)`);
      const echoes = arec.events.filter((e) => e.kind === "bin" && e.i > aOpen.i && e.i < aClose.i);
      const sentBlue = agentSent.filter((s) => s.session === 0).map((s) => s.size);
      eq(echoes.map((e) => e.data).join(), sentBlue.slice(0, echoes.length).join(), "blue echoed the audio frames in order, none missing");
      const after = echoes.filter((e) => e.i >= aFrom);
      assert(after.length >= 5, `only ${after.length} echoes after the flip: the drain did not keep the conversation going`);
      const lastEcho = echoes[echoes.length - 1];
      assert(aClose.t - lastEcho.t < 400, `last blue echo ${aClose.t - lastEcho.t} ms before the 1012: echoes stopped before the deadline`);
      assert(!arec.events.some((e) => e.i < aClose.i && e.kind === "error"), `Agent: error event before the 1012; saw ${arec.summary()}`);
      note(`7b/8b agent: ${echoes.length} echoes on blue (${after.length} after the flip, last ${aClose.t - lastEcho.t} ms before the close), ${sentBlue.length - echoes.length} frames in flight at the close; close ${aClose.data.code} "${aClose.data.reason}" at +${aClose.t - flipAt} ms after the flip`);

      const aOpen2 = await arec.wait(isKind("open"), 12_000, "Agent reconnect (open)", aClose.i);
      eq(aOpen2.data.color, "green", "Agent: reconnect 101 colour");
      eq(aOpen2.data.stub, "green", "Agent: reconnect 101 x-stub-name");
      const w2 = await arec.wait(isMsg("Welcome"), 5000, "Welcome from green", aOpen2.i);
      assert(w2.data.request_id !== welcome.data.request_id, "green's Welcome repeats blue's request_id");
      const s2 = await arec.wait(isMsg("SettingsApplied"), 5000, "SettingsApplied from green (Settings resent on open)", aOpen2.i);
      await arec.wait((e) => e.kind === "bin" && e.i > s2.i, 5000, "audio echo from green", aOpen2.i);
      const gEchoes = arec.events.filter((e) => e.kind === "bin" && e.i > aOpen2.i).map((e) => e.data);
      const sentGreen = agentSent.filter((s) => s.session === 1).map((s) => s.size);
      eq(gEchoes.join(), sentGreen.slice(0, gEchoes.length).join(), "green echoed the audio frames in order");
      note(`8b agent: SDK reconnected ${aOpen2.t - aClose.t} ms after the 1012 (retryCount=${agent.socket.retryCount}), landed on ${aOpen2.data.color}; Welcome +${w2.t - aOpen2.t} ms, SettingsApplied +${s2.t - aOpen2.t} ms after reopen`);
      const endLine = await endLineOf(fa.session, "blue", "/v1/agent/converse");
      assert(/close_code=1012/.test(endLine), `blue Agent end line does not carry close_code=1012: ${endLine}`);
      note(`8b agent: blue end line: ${endLine.replace(/^.*stream ended/, "stream ended")}`);

      clearInterval(fa.agentPump);
      const from = arec.events.length;
      agent.socket._ws.once("close", (code, reason) => arec.push("wire-close", { code, reason: String(reason) }));
      agent.close();
      eq((await arec.wait(isKind("wire-close"), 5000, "close handshake answered on green", from)).data.code, 1000, "Agent close code on green");
      eq(agent.socket._shouldReconnect, false, "SDK reconnect armed after the app's close");
      await drainedOf("green", "after the Flux and Agent sessions on green ended");
      await routeToBlue("reset after Flux/Agent drain");
    } finally {
      clearInterval(fa?.agentPump);
      clearInterval(fa?.fluxPump);
      try { fa?.agent?.close(); } catch {}
    }
  });
}

// ---- raw ws client (subprotocol auth as a browser sends it) -----------------------------------
function rawWs(url, protocols) {
  return new Promise((resolve) => {
    const ws = new WS(url, protocols);
    const done = (r) => {
      clearTimeout(timer);
      try { ws.terminate(); } catch {}
      resolve(r);
    };
    const timer = setTimeout(() => done({ outcome: "timeout", detail: "no answer in 5 s" }), 5000);
    ws.on("open", () => {
      ws.send(AUDIO);
      ws.once("message", (m) => {
        const d = JSON.parse(m.toString());
        ws.close(1000);
        done({ outcome: "open", protocol: ws.protocol, color: ws._syUpgrade?.headers["x-switchyard-color"], firstTranscript: d.channel?.alternatives?.[0]?.transcript, detail: "" });
      });
    });
    ws.on("unexpected-response", (req, res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => done({ outcome: "refused", status: res.statusCode, color: res.headers["x-switchyard-color"], detail: body }));
    });
    ws.on("error", (e) => done({ outcome: "error", detail: e.message }));
  });
}

function runBrowserSim(base, key) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [new URL(import.meta.url).pathname, "--browser-sim", base, key], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "",
      err = "";
    child.stdout.on("data", (c) => (out += c));
    child.stderr.on("data", (c) => (err += c));
    const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
    child.on("close", (code) => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(out.trim().split("\n").pop()));
      } catch {
        resolve({ outcome: "crashed", code, out, err });
      }
    });
  });
}

async function browserSim(base, key) {
  // Make the SDK take its browser branch: RUNTIME.type === "browser" needs window.document.
  // A browser's WebSocket cannot send custom headers, so the stand-in drops them.
  globalThis.window = { document: {}, navigator: { userAgent: "switchyard-interop simulated browser" } };
  let offered = null;
  globalThis.WebSocket = class BrowserLikeWebSocket extends WS {
    constructor(url, protocols /* , headers ignored like a browser */) {
      super(url, protocols);
      offered = protocols;
    }
  };
  const sdk = await import("@deepgram/sdk");
  const dg = new sdk.DeepgramClient({ apiKey: key, baseUrl: base });
  const sock = await dg.listen.v1.connect({ model: "nova-3", encoding: "linear16", sample_rate: 16000, reconnectAttempts: 1 });
  const out = (o) => {
    const red = offered ? offered.map((p) => (p === key ? "<key>" : p)) : offered;
    console.log(JSON.stringify({ ...o, offered: red, session: dg.sessionId }));
  };
  const result = await new Promise((resolve) => {
    const timer = setTimeout(() => resolve({ outcome: "timeout" }), 8000);
    let color, protocol, stub;
    sock.on("open", () => {
      const ws = sock.socket._ws;
      protocol = ws?.protocol;
      color = ws?._syUpgrade?.headers["x-switchyard-color"];
      sock.sendMedia(AUDIO);
      sock.sendCloseStream({ type: "CloseStream" });
    });
    sock.on("message", (m) => {
      if (m?.type === "Metadata") stub = m.stub;
    });
    sock.on("error", (e) => {
      clearTimeout(timer);
      resolve({ outcome: /401/.test(String(e?.message)) ? "refused" : "error", error: String(e?.message ?? e) });
    });
    sock.on("close", (ev) => {
      if (color) {
        clearTimeout(timer);
        resolve({ outcome: ev.code === 1000 && stub ? "ok" : "bad-close", code: ev.code, color, protocol, stub });
      }
    });
    sock.connect();
  });
  try { sock.close(); } catch {}
  out(result);
}

if (BROWSER_SIM) {
  await browserSim(process.argv[3], process.argv[4]);
  process.exit(0);
}
try {
  await main();
} catch (e) {
  results.push({ id: "setup", name: "harness", ok: false, why: String(e?.stack ?? e) });
  console.log(`FAIL: harness: ${e?.stack ?? e}`);
}
clearTimeout(watchdog);
const failed = report();
for (const r of results.filter((r) => !r.ok)) console.log(`\n-- ${r.id} ${r.name}\n${r.why}`);
process.exit(failed ? 1 : 0);
