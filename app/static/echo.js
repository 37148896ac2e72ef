// Echo panel: a WebSocket /echo session (docs/echo-protocol.md) that survives reloads and drops.
//
// The session id, token and the stream so far live in sessionStorage, so a reload resumes the
// same session: the server's `seq` says which sent messages it processed, the rest are sent
// again, and the stream continues exactly. Replies come in order, one per message, so each
// answer belongs to the oldest message still pending.
import { drawPlot } from "./echo-plot.js";
import { $, apiKey, askForKey, Backoff, describeClose, setStatus } from "./util.js";

const STORE = "echo-demo";
const KEEP = 400; // points kept for the plot
const MAX_PENDING = 50; // messages in flight before the random stream waits
const TICK_MS = 50;

const panel = $("echo");
const status = $("echo-status");
const errorLine = $("echo-error");
const backoff = new Backoff();
let ws = null;
let retryTimer = null;
let running = false;
let carry = 0;
let lastTick = 0;
let drawQueued = false;
let leaving = false;
let state = load() || fresh();

function fresh(echoStep = 3) {
  return {
    sessionId: null, token: null, echoStep, seq: 0, tail: [], points: [],
    pending: [], sent: 0, scored: 0, correct: 0,
  };
}

function load() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE));
  } catch {
    return null;
  }
}

function save() {
  sessionStorage.setItem(STORE, JSON.stringify(state));
}

function showError(text) {
  errorLine.textContent = text;
  errorLine.hidden = !text;
}

// ---- the connection
function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const q = new URLSearchParams();
  if (state.sessionId) {
    q.set("session_id", state.sessionId);
    q.set("token", state.token);
  }
  if (apiKey()) q.set("access_token", apiKey()); // a browser cannot send headers here
  const url = `${scheme}//${location.host}/echo${q.size ? `?${q}` : ""}`;
  setStatus(status, state.sessionId ? "Resuming the session…" : "Connecting…", "busy");
  panel.dataset.state = "connecting";
  const socket = new WebSocket(url);
  ws = socket;
  socket.onmessage = (event) => onFrame(JSON.parse(event.data));
  socket.onclose = (event) => {
    if (ws !== socket) return;
    ws = null;
    onClose(event.code, event.reason);
  };
}

function onClose(code, reason) {
  panel.dataset.state = "closed";
  if (leaving) return;
  const words = describeClose(code, reason);
  if (reason.startsWith("unauthorized")) {
    askForKey(); // connect again once a key is given
    showError(`Connection refused: ${words}.`);
    setStatus(status, "Not connected: waiting for an API key.", "error");
    return;
  }
  if (code === 1008 && /^(session_not_found|invalid_token|invalid_resume)/.test(reason)) {
    // session_not_found / invalid_token / invalid_resume: that session is gone for good.
    showError(`The server ended the old session: ${words}. Starting a new session.`);
    state = fresh(state.echoStep);
    save();
    redraw();
    connect();
    return;
  }
  const delay = backoff.next();
  showError(`Connection closed: ${words}.`);
  setStatus(status, `Disconnected; reconnecting in ${(delay / 1000).toFixed(1)} s…`, "error");
  retryTimer = setTimeout(connect, delay);
}

function onFrame(frame) {
  if (frame.type === "session") onSession(frame);
  else if (frame.type === "echo") onEcho(frame);
  else if (frame.type === "reset") onReset();
  else if (frame.type === "error") onError(frame);
  redraw();
}

function onSession(frame) {
  backoff.reset();
  const resumed = frame.resumed && frame.session_id === state.sessionId;
  if (!resumed) {
    const dropped = state.pending.length;
    state = fresh(frame.echo_step);
    if (dropped) showError(`${dropped} unanswered message(s) of the old session were dropped.`);
  } else {
    reconcile(frame.seq);
    showError("");
  }
  Object.assign(state, { sessionId: frame.session_id, token: frame.token, echoStep: frame.echo_step });
  for (const id of ["echo-step-text", "echo-step-legend"]) $(id).textContent = frame.echo_step;
  panel.dataset.state = "open";
  const how = resumed ? `resumed at seq ${frame.seq}` : "new session";
  setStatus(status, `Connected (${how}).`);
  for (const message of state.pending) ws.send(JSON.stringify(message));
  save();
}

/** After a resume: the server processed `seq - state.seq` more bits messages than we saw. */
function reconcile(serverSeq) {
  let lost = serverSeq - state.seq;
  while (lost > 0 && state.pending.length) {
    const message = state.pending.shift();
    if (message.type === "reset") {
      applyReset();
      continue;
    }
    for (const bit of message.bits) record(bit, null);
    lost -= 1;
  }
  state.seq = serverSeq;
}

function onEcho(frame) {
  const message = state.pending.shift();
  state.seq = frame.seq;
  if (!message || !message.bits) return; // cannot happen: replies come in order
  message.bits.forEach((bit, i) => record(bit, frame.probabilities[i], frame.bits[i]));
  save();
}

/** One input bit and its prediction (null when the reply was lost) into the stream. */
function record(bit, p, predicted) {
  const { tail, echoStep } = state;
  const target = tail.length >= echoStep ? tail[tail.length - echoStep] : null;
  tail.push(bit);
  if (tail.length > echoStep) tail.shift();
  const point = { x: bit, t: target, p, ok: null, lost: p === null };
  if (p !== null && target !== null) {
    point.ok = predicted === target;
    state.scored += 1;
    state.correct += point.ok ? 1 : 0;
  }
  state.points.push(point);
  if (state.points.length > KEEP) state.points.splice(0, state.points.length - KEEP);
}

function applyReset() {
  state.tail = [];
  state.points.push({ reset: true });
}

function onReset() {
  state.pending.shift();
  applyReset();
  setStatus(status, "The model's state is back to its initial state.");
  save();
}

function onError(frame) {
  const message = state.pending.shift();
  if (message && message.bits) state.sent -= message.bits.length;
  showError(`The server refused a message: ${frame.detail} (${frame.code}).`);
  save();
}

// ---- sending
function send(message) {
  if (state.pending.length >= 4 * MAX_PENDING) {
    showError("Too many messages wait for the server; wait until it answers.");
    return;
  }
  state.pending.push(message);
  if (message.bits) state.sent += message.bits.length;
  if (ws && ws.readyState === WebSocket.OPEN && panel.dataset.state === "open") {
    ws.send(JSON.stringify(message));
  }
  save();
  redraw();
}

function randomBits(n) {
  const bytes = crypto.getRandomValues(new Uint8Array(n));
  return Array.from(bytes, (b) => b & 1);
}

function tick(now) {
  const elapsed = lastTick ? now - lastTick : TICK_MS;
  lastTick = now;
  if (!running || panel.dataset.state !== "open" || state.pending.length >= MAX_PENDING) return;
  carry += (Number($("echo-rate").value) * elapsed) / 1000;
  const n = Math.min(Math.floor(carry), 4096);
  carry -= n;
  if (n > 0) send({ bits: randomBits(n) });
}

function setRunning(on) {
  running = on;
  carry = 0;
  $("echo-start").textContent = on ? "Stop" : "Start";
  $("echo-start").setAttribute("aria-pressed", String(on));
}

// ---- the view: numbers at once (tests and screen readers read them), the plot once per frame
function redraw() {
  const { scored, correct } = state;
  const pct = (100 * correct) / scored;
  $("echo-accuracy").textContent = scored ? `${correct === scored ? 100 : pct.toFixed(1)} %` : "–";
  $("echo-scored").textContent = String(scored);
  $("echo-sent").textContent = String(state.sent);
  $("echo-seq").textContent = String(state.seq);
  $("echo-session").textContent = state.sessionId || "–";
  panel.dataset.pending = String(state.pending.length);
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    drawPlot($("echo-plot"), state.points);
  });
}

$("echo-start").addEventListener("click", () => setRunning(!running));
$("echo-bit-0").addEventListener("click", () => send({ bits: [0] }));
$("echo-bit-1").addEventListener("click", () => send({ bits: [1] }));
$("echo-form").addEventListener("submit", (event) => {
  event.preventDefault();
  // Every digit typed is sent as a number; the server says what it refuses (e.g. a 2).
  const bits = Array.from($("echo-typed").value.replace(/[^0-9]/g, ""), Number);
  send({ bits });
  $("echo-typed").value = "";
});
$("echo-reset").addEventListener("click", () => send({ type: "reset" }));
$("echo-new").addEventListener("click", () => {
  setRunning(false);
  state = fresh(state.echoStep);
  save();
  showError("");
  const old = ws;
  ws = null;
  if (old) old.close(1000, "new session");
  redraw();
  connect();
});
window.addEventListener("pagehide", () => {
  leaving = true;
  save();
  if (ws) ws.close(1000, "page closed");
});
window.addEventListener("pageshow", (event) => {
  if (!event.persisted) return; // restored from the back/forward cache: connect again
  leaving = false;
  connect();
});

window.addEventListener("resize", redraw);
window.addEventListener("api-key", () => {
  if (!ws) connect();
});
setInterval(() => tick(performance.now()), TICK_MS);
redraw();
connect();
