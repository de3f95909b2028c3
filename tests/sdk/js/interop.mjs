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
    if (d?.type) return `(${d.type}${d.stub ? " " + d.stub : ""})`;
    return `(${typeof d})`;
  }
  if (e.kind === "bin") return `(${e.data} B)`;
  if (e.kind === "close") return `(${e.data.code} ${e.data.reason ?? ""})`;
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
