// Flip storm, JS side: N_LISTEN listen v1 streams + N_SPEAK speak v1 streams (official
// @deepgram/sdk, SDK reconnect), and the admin driver (flips / rollbacks / commit).
// Writes $SY_OUT/node.json. Every wait is bounded; a watchdog ends the process.
import http from "node:http";
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { WebSocket as WS } from "ws";

const E = {
  proxy: process.env.SY_PROXY,
  admin: process.env.SY_ADMIN,
  token: readFileSync(process.env.SY_TOKEN_FILE, "utf8").trim(),
  out: process.env.SY_OUT,
  nListen: Number(process.env.N_LISTEN ?? 40),
  nSpeak: Number(process.env.N_SPEAK ?? 10),
  nChurn: Number(process.env.N_CHURN ?? 10),
};
const OVERALL_MS = 85_000;
const T0 = Date.now();
const rel = (t) => t - T0;
const log = (s) => console.log(`[node +${rel(Date.now())}ms] ${s}`);

// ---- observation hooks (record only) --------------------------------------------------------
const origRequest = http.request;
http.request = function (...args) {
  const req = origRequest.apply(this, args);
  req._syStart = Date.now();
  return req;
};
const origEmit = WS.prototype.emit;
WS.prototype.emit = function (event, ...args) {
  if (event === "upgrade") {
    this._syUpgrade = { start: this._req?._syStart, at: Date.now(), status: args[0].statusCode, headers: { ...args[0].headers } };
  } else if (event === "unexpected-response") {
    this._syRefused = { start: this._req?._syStart, at: Date.now(), status: args[1].statusCode };
  }
  return origEmit.call(this, event, ...args);
};

const { DeepgramClient } = await import("@deepgram/sdk");

const admin = [];
const samples = [];
const errors = [];
async function adminCall(method, path, body, label) {
  const ev = { label, method, path, body: body ?? null, sent: Date.now() };
  try {
    const res = await fetch(E.admin + path, {
      method,
      headers: { authorization: `Bearer ${E.token}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(5000),
    });
    ev.status = res.status;
    const text = await res.text();
    try { ev.json = JSON.parse(text); } catch { ev.json = text; }
  } catch (e) {
    ev.error = String(e?.message ?? e);
  }
  ev.recv = Date.now();
  if (method !== "GET") admin.push(ev);
  return ev;
}

const CHUNK = Buffer.alloc(640, 9);
let stopping = false;

// Hands an SDK socket's events to its owner (onOpen, onMessage, onClose; errors collected),
// then connects it.
function wire(owner) {
  owner.sock.on("open", () => owner.onOpen());
  owner.sock.on("message", (m) => owner.onMessage(m));
  owner.sock.on("close", (ev) => owner.onClose(ev));
  owner.sock.on("error", (e) => owner.errors.push({ t: Date.now(), e: String(e?.message ?? e) }));
  owner.sock.connect();
}

// Records the close of the owner's current connection: that connection, or null (and an
// error) when none was open.
function recordClose(owner, ev) {
  const c = owner.cur;
  if (!c) {
    owner.errors.push({ t: Date.now(), e: `close ${ev?.code} with no open connection` });
    return null;
  }
  c.close = { code: ev?.code, reason: ev?.reason, t: Date.now() };
  owner.cur = null;
  return c;
}

class ListenStream {
  constructor(i, churn = false) {
    this.i = i;
    this.churn = churn;
    this.kind = "listen";
    this.dg = new DeepgramClient({ apiKey: "storm-not-checked", baseUrl: E.proxy });
    this.session = this.dg.sessionId;
    this.conns = [];
    this.cur = null;
    this.pending = 0;
    this.generated = 0;
    this.errors = [];
    this.done = false;
    this.cycles = 0;
  }
  async start() {
    this.sock = await this.dg.listen.v1.connect({ model: "nova-3", encoding: "linear16", sample_rate: 16000 });
    wire(this);
  }
  // churn: end the session on our own after a short random lifetime, then open a new one
  churnTick() {
    const c = this.cur;
    if (!this.churn || stopping || !c || c.closing || this.sock.readyState !== 1) return;
    if (Date.now() - c.open_at < c.lifetime) return;
    this.flush();
    c.sent_before_closestream = c.sent;
    c.closing = true;
    try { this.sock.sendCloseStream({ type: "CloseStream" }); } catch (e) { this.errors.push({ t: Date.now(), e: "churn CloseStream: " + e }); return; }
    c.closestream_at = Date.now();
  }
  onOpen() {
    const ws = this.sock.socket?._ws;
    const up = ws?._syUpgrade;
    this.cur = {
      idx: this.conns.length, hs_start: up?.start, hs_end: up?.at, open_at: Date.now(),
      color: up?.headers?.["x-switchyard-color"], stub_hdr: up?.headers?.["x-stub-name"],
      lifetime: 300 + Math.random() * 1200, closing: false,
      sent: 0, sent_before_closestream: null, results: 0, results_dur: 0, ff: 0, meta: null, close: null, msgs: [],
    };
    this.conns.push(this.cur);
    this.flush();
  }
  flush() {
    if (!this.cur || this.cur.closing || this.sock.readyState !== 1) return;
    while (this.pending > 0) {
      try {
        this.sock.sendMedia(CHUNK);
      } catch (e) {
        this.errors.push({ t: Date.now(), e: "sendMedia: " + String(e?.message ?? e) });
        return;
      }
      this.pending--;
      this.cur.sent++;
    }
  }
  tick() {
    if (stopping) return;
    this.pending++;
    this.generated++;
    this.flush();
  }
  onMessage(m) {
    const c = this.cur;
    if (!c) { this.errors.push({ t: Date.now(), e: "message with no open connection: " + m?.type }); return; }
    const t = Date.now();
    if (m?.type === "Results") {
      c.results++;
      c.results_dur += m.duration ?? 0;
      if (m.from_finalize) c.ff++;
      c.msgs.push(["Results" + (m.from_finalize ? "ff" : ""), t]);
      if (c.msgs.length > 6) c.msgs.splice(0, c.msgs.length - 6);
    } else {
      if (m?.type === "Metadata") c.meta = { duration: m.duration, stub: m.stub, t };
      c.msgs.push([m?.type ?? typeof m, t]);
      if (c.msgs.length > 6) c.msgs.splice(0, c.msgs.length - 6);
    }
  }
  onClose(ev) {
    const c = recordClose(this, ev);
    if (!c) return;
    if (this.churn && c.closing && ev?.code === 1000 && this.cycles++ < 200) {
      // a new connection for the same session, after a short pause
      setTimeout(() => { this.start().catch((e) => this.errors.push({ t: Date.now(), e: "churn start: " + e })); }, Math.random() * 100);
    }
  }
  async finish() {
    for (let round = 0; round < 3; round++) {
      // wait (bounded) for an open connection
      for (let k = 0; k < 400 && !(this.cur && this.sock.readyState === 1); k++) await sleep(50);
      if (!(this.cur && this.sock.readyState === 1)) { this.errors.push({ t: Date.now(), e: "finish: never open again" }); break; }
      const c = this.cur;
      if (c.closing) { for (let k = 0; k < 160 && !c.close; k++) await sleep(50); continue; }
      this.flush();
      c.sent_before_closestream = c.sent;
      try { this.sock.sendCloseStream({ type: "CloseStream" }); } catch (e) { this.errors.push({ t: Date.now(), e: "CloseStream: " + e }); }
      c.closestream_at = Date.now();
      for (let k = 0; k < 160 && !c.close; k++) await sleep(50);
      if (!c.close) { this.errors.push({ t: Date.now(), e: "finish: no close within 8 s after CloseStream" }); break; }
      if (c.close.code === 1000) break;
    }
    this.done = true;
  }
  summary() {
    return { kind: this.kind, churn: this.churn, i: this.i, session: this.session, generated: this.generated, pending_left: this.pending, errors: this.errors, conns: this.conns };
  }
}

class SpeakStream {
  constructor(i) {
    this.i = i;
    this.kind = "speak";
    this.dg = new DeepgramClient({ apiKey: "storm-not-checked", baseUrl: E.proxy });
    this.session = this.dg.sessionId;
    this.conns = [];
    this.cur = null;
    this.errors = [];
  }
  async start() {
    this.sock = await this.dg.speak.v1.connect({ model: "aura-2-thalia-en", encoding: "linear16", sample_rate: 24000 });
    wire(this);
  }
  onOpen() {
    const ws = this.sock.socket?._ws;
    const up = ws?._syUpgrade;
    this.cur = {
      idx: this.conns.length, hs_start: up?.start, hs_end: up?.at, open_at: Date.now(),
      color: up?.headers?.["x-switchyard-color"], stub_hdr: up?.headers?.["x-stub-name"],
      greeting: null, speaks: 0, flushes: 0, audio: 0, flushed: 0, close: null, msgs: [],
    };
    this.conns.push(this.cur);
  }
  tick() {
    if (stopping || !this.cur || this.sock.readyState !== 1) return;
    try {
      this.sock.sendText({ type: "Speak", text: "storm speak text 20" }); // 19 chars -> 2 frames
      this.cur.speaks++;
    } catch (e) {
      this.errors.push({ t: Date.now(), e: "sendText: " + e });
    }
  }
  onMessage(m) {
    const c = this.cur;
    if (!c) { this.errors.push({ t: Date.now(), e: "message with no open connection" }); return; }
    const t = Date.now();
    let kind;
    if ((typeof Blob !== "undefined" && m instanceof Blob) || m instanceof ArrayBuffer || ArrayBuffer.isView(m)) {
      c.audio++;
      kind = "audio";
    } else {
      kind = m?.type ?? typeof m;
      if (m?.type === "Metadata") c.greeting = { stub: m.stub, t };
      if (m?.type === "Flushed") c.flushed++;
    }
    if (c.msgs.length && c.msgs[c.msgs.length - 1][0] === kind && kind === "audio") c.msgs[c.msgs.length - 1][2]++;
    else c.msgs.push([kind, t, 1]);
    if (c.msgs.length > 6) c.msgs.splice(0, c.msgs.length - 6);
  }
  onClose(ev) {
    recordClose(this, ev);
  }
  async finish() {
    for (let round = 0; round < 3; round++) {
      for (let k = 0; k < 400 && !(this.cur && this.sock.readyState === 1); k++) await sleep(50);
      if (!(this.cur && this.sock.readyState === 1)) { this.errors.push({ t: Date.now(), e: "finish: never open again" }); break; }
      const c = this.cur;
      const f0 = c.flushed;
      try { this.sock.sendFlush({ type: "Flush" }); c.flushes++; } catch (e) { this.errors.push({ t: Date.now(), e: "Flush: " + e }); }
      for (let k = 0; k < 100 && c.flushed === f0 && !c.close; k++) await sleep(50);
      if (c.close) continue;
      try { this.sock.sendClose({ type: "Close" }); } catch (e) { this.errors.push({ t: Date.now(), e: "Close: " + e }); }
      c.close_sent_at = Date.now();
      for (let k = 0; k < 160 && !c.close; k++) await sleep(50);
      if (!c.close) { this.errors.push({ t: Date.now(), e: "finish: no close within 8 s after Close" }); break; }
      if (c.close.code === 1000) break;
    }
  }
  summary() {
    return { kind: this.kind, churn: this.churn, i: this.i, session: this.session, errors: this.errors, conns: this.conns };
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The schedule: [seconds after start, action, body]. Alternating flips and rollbacks with
// 0s / 500ms / 1s drains; "cancel" entries come back to a colour inside its drain window.
const SCHEDULE = [
  [0.0, "flip", { to: "green", drain_timeout: "1s" }],
  [2.5, "rollback", { drain_timeout: "1s" }],
  [3.0, "flip", { to: "green", drain_timeout: "500ms" }], // cancels green's drain (deadline +3.5)
  [5.5, "rollback", { drain_timeout: "0s" }],
  [8.0, "flip", { to: "green", drain_timeout: "500ms" }],
  [8.3, "rollback", { drain_timeout: "1s" }], // cancels blue's drain (deadline 8.5)
  [10.5, "commit", {}],
  [10.8, "rollback-expect-409", { drain_timeout: "0s" }],
  [11.0, "flip", { to: "green", drain_timeout: "0s" }],
  [13.5, "rollback", { drain_timeout: "1s" }],
  [16.0, "flip", { to: "green", drain_timeout: "500ms" }],
  [16.4, "flip", { to: "blue", drain_timeout: "1s" }], // explicit flip back: cancels blue's drain
  [19.0, "flip", { drain_timeout: "0s" }], // to defaults to standby (green)
  [19.3, "flip-noop", { to: "green", drain_timeout: "0s" }], // already active: changed false
  [21.5, "rollback", { drain_timeout: "1s" }], // green drains, deadline 22.5
  [21.7, "flip", { to: "green", drain_timeout: "1s" }], // cancels it; blue deadline 22.7
  [21.9, "rollback", { drain_timeout: "1s" }], // cancels blue's; green drains again, deadline 22.9 (not 22.5)
  [24.0, "flip", { to: "green", drain_timeout: "1s" }],
  [24.6, "rollback", { drain_timeout: "1s" }], // cancels blue's drain (deadline 25.0)
  [27.0, "flip", { to: "green", drain_timeout: "0s" }],
  [29.5, "rollback", { drain_timeout: "500ms" }],
  [32.0, "flip", { to: "green", drain_timeout: "1s" }],
];

if (process.env.STORM === "dense") {
  // ~30 s of changes every 0.3-0.9 s, alternating, random drains; a commit in the middle
  SCHEDULE.length = 0;
  let t = 0, active = "blue", committed = false, k = 0;
  const drains = ["0s", "500ms", "1s"];
  while (t < 30 && k++ < 80) {
    const d = drains[Math.floor(Math.random() * 3)];
    if (!committed && t > 15) { SCHEDULE.push([t, "commit", {}]); committed = true; t += 0.3; }
    const other = active === "blue" ? "green" : "blue";
    if (committed || k === 1 || Math.random() < 0.5) SCHEDULE.push([t, "flip", { to: other, drain_timeout: d }]);
    else SCHEDULE.push([t, "rollback", { drain_timeout: d }]);
    active = other;
    t += 0.3 + Math.random() * 0.6;
  }
}

async function main() {
  const watchdog = setTimeout(() => {
    log("FAIL: watchdog fired");
    dump("watchdog");
    process.exit(3);
  }, OVERALL_MS);
  // readiness (bounded)
  for (let k = 0; k < 200; k++) {
    try {
      const s = await (await fetch(E.admin + "/status", { signal: AbortSignal.timeout(1000) })).json();
      if (["blue", "green"].every((c) => s.colors[c].upstreams.every((u) => u.healthy))) break;
    } catch {}
    await sleep(50);
  }
  const status0 = await adminCall("GET", "/status");
  log(`initial active=${status0.json?.active} generation=${status0.json?.generation}`);

  const listens = Array.from({ length: E.nListen }, (_, i) => new ListenStream(i, i < E.nChurn));
  const speaks = Array.from({ length: E.nSpeak }, (_, i) => new SpeakStream(i));
  const all = [...listens, ...speaks];
  state = { listens, speaks, status0 };
  for (const s of all) { await s.start(); await sleep(15); }
  let ticks = 0;
  const audioPump = setInterval(() => {
    if (++ticks > 4500) return clearInterval(audioPump); // bounded: 90 s
    for (const s of listens) { s.tick(); s.churnTick(); }
  }, 20);
  let sticks = 0;
  const speakPump = setInterval(() => {
    if (++sticks > 400) return clearInterval(speakPump);
    for (const s of speaks) s.tick();
  }, 250);
  // all open (bounded), and the Python side ready (bounded)
  for (let k = 0; k < 200 && all.some((s) => !s.conns.length); k++) await sleep(50);
  log(`js streams open: ${all.filter((s) => s.conns.length).length}/${all.length}`);
  for (let k = 0; k < 300 && !existsSync(E.out + "/py-ready"); k++) await sleep(50);
  log(`python ready: ${existsSync(E.out + "/py-ready")}`);
  await sleep(1500);

  const start = Date.now();
  writeFileSync(E.out + "/storm-start", String(start));
  // sampler: /status + /metrics every 100 ms while the storm runs (bounded)
  let sampling = true;
  const sampler = (async () => {
    for (let k = 0; k < 800 && sampling; k++) {
      const t0 = Date.now();
      try {
        const [st, mt] = await Promise.all([
          fetch(E.admin + "/status", { signal: AbortSignal.timeout(2000) }).then((r) => r.json()),
          fetch(E.admin + "/metrics", { signal: AbortSignal.timeout(2000) }).then((r) => r.text()),
        ]);
        const t1 = Date.now();
        const m = {};
        for (const line of mt.split("\n")) {
          const mm = /^switchyard_(draining_streams|open_streams)\{color="(\w+)"(?:,endpoint="(\w+)")?\} (\S+)$/.exec(line);
          if (mm) { const key = `${mm[1]}:${mm[2]}`; m[key] = (m[key] ?? 0) + Number(mm[4]); }
        }
        samples.push({ t0, t1, active: st.active, generation: st.generation,
          colors: Object.fromEntries(["blue", "green"].map((c) => [c, { state: st.colors[c].state, open: st.colors[c].open_streams, deadline: st.colors[c].drain_deadline }])), m });
      } catch (e) { samples.push({ t0, error: String(e) }); }
      await sleep(100);
    }
  })();
  for (const [at, action, body] of SCHEDULE) {
    const wait = start + at * 1000 - Date.now();
    if (wait > 0) await sleep(wait);
    const reason = `storm ${action} @${at}`;
    let ev;
    if (action === "flip" || action === "flip-noop") ev = await adminCall("POST", "/flip", { ...body, reason }, action);
    else if (action === "rollback" || action === "rollback-expect-409") ev = await adminCall("POST", "/rollback", { ...body, reason }, action);
    else if (action === "commit") ev = await adminCall("POST", "/commit", { reason }, action);
    ev.at = at;
    log(`${action} ${JSON.stringify(body)} -> ${ev.status} active=${ev.json?.active} gen=${ev.json?.generation} changed=${ev.json?.changed} err=${ev.json?.error ?? ev.error ?? ""} (${ev.recv - ev.sent} ms)`);
  }
  await sleep(4000);
  sampling = false;
  await sampler;
  // settle: let the last drain finish and the SDK reconnects land (max delay 10 s)
  const last = admin[admin.length - 1];
  await sleep(1000 + 2000 + 500);
  for (let k = 0; k < 240 && all.some((s) => !s.cur); k++) await sleep(50);
  log(`after settle: ${all.filter((s) => s.cur).length}/${all.length} js streams open`);
  stopping = true;
  writeFileSync(E.out + "/stop", String(Date.now()));
  clearInterval(audioPump);
  clearInterval(speakPump);
  await Promise.all(all.map((s) => s.finish()));
  log("js streams finished");
  clearTimeout(watchdog);
  dump("ok", { listens, speaks, status0 });
  process.exit(0);
}

let state = {};
function dump(outcome, st = state) {
  const { listens = [], speaks = [], status0 } = st;
  writeFileSync(
    E.out + "/node.json",
    JSON.stringify({ outcome, T0, status0: status0?.json, admin, samples, streams: [...listens, ...speaks].map((s) => s.summary()) }, null, 1),
  );
}

main().catch((e) => {
  log("FAIL: " + (e?.stack ?? e));
  dump("crash");
  process.exit(2);
});
