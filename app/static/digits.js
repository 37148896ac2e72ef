// Digits panel: draw on a 280×280 canvas, get POST /predict/digit's answer while drawing.
//
// By default the drawing is scaled in the page the way MNIST was made (crop to the ink, fit into
// 20×20 by area averaging, centre by mass in 28×28) and sent as 784 JSON pixels; "PNG upload"
// sends the canvas itself through the server's photo preprocessing instead. bench/page_digits.py
// compared the two on real MNIST digits traced onto the canvas (docs/benchmark.md, Smaller measurements).
import {
  $,
  askForKey,
  authHeaders,
  describeHttpError,
  describeNetworkError,
  jsonOrNull,
  setStatus,
} from "./util.js";

const SIDE = 280;
const BRUSH = 22; // px on the 280-px canvas: ~2.2 MNIST pixels, MNIST's typical stroke
const INK = 0.15; // ink level that counts towards the bounding box (as the server's)
const BOX = 20;
const FRAME = 28;
const CENTER = 14;
const DELAY_MS = 120; // debounce: at most one request per this while drawing

const canvas = $("digit-canvas");
const ctx = canvas.getContext("2d", { willReadFrequently: true });
const result = $("digit-result");
const confidence = $("digit-confidence");
const status = $("digit-status");
let drawSeq = 0;
let last = null;
let timer = null;
let inFlight = false;
let dirty = false;

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, SIDE, SIDE);
  changed(false);
  showResult(null, drawSeq);
  setStatus(status, "");
}

function changed(predictSoon = true) {
  drawSeq += 1;
  canvas.dataset.seq = String(drawSeq);
  if (predictSoon) schedule(DELAY_MS);
}

// ---- drawing with pointer events (mouse, touch and pen alike)
function point(event) {
  const rect = canvas.getBoundingClientRect();
  return [
    ((event.clientX - rect.left) * SIDE) / rect.width,
    ((event.clientY - rect.top) * SIDE) / rect.height,
  ];
}

function stroke(from, to) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);
  ctx.stroke();
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  canvas.setPointerCapture(event.pointerId);
  last = point(event);
  stroke(last, last);
  changed();
  event.preventDefault();
});
canvas.addEventListener("pointermove", (event) => {
  if (!last) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    stroke(last, p);
    last = p;
  }
  changed();
});
for (const type of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(type, () => {
    if (last) schedule(0);
    last = null;
  });
}
canvas.addEventListener("keydown", (event) => {
  if (event.key === "Delete" || event.key === "Backspace" || event.key === "Escape") {
    clearCanvas();
    event.preventDefault();
  }
});

// ---- MNIST-style scaling of the drawing
/** Area-averaging taps: for each of `m` output cells, [[source index, weight], ...]. */
function areaTaps(n, m) {
  const ratio = n / m;
  const taps = [];
  for (let o = 0; o < m; o++) {
    const a = o * ratio;
    const b = a + ratio;
    const row = [];
    for (let i = Math.floor(a); i < Math.min(n, Math.ceil(b)); i++) {
      const w = Math.min(b, i + 1) - Math.max(a, i);
      if (w > 0) row.push([i, w / ratio]);
    }
    taps.push(row);
  }
  return taps;
}

/** The canvas as 784 MNIST-style pixels (0–255, white on black), or null when blank. */
export function mnistPixels() {
  const rgba = ctx.getImageData(0, 0, SIDE, SIDE).data;
  const ink = new Float32Array(SIDE * SIDE);
  let [x0, y0, x1, y1] = [SIDE, SIDE, -1, -1];
  for (let i = 0; i < ink.length; i++) {
    ink[i] = rgba[4 * i] / 255;
    if (ink[i] > INK) {
      const x = i % SIDE;
      const y = (i - x) / SIDE;
      [x0, y0, x1, y1] = [Math.min(x0, x), Math.min(y0, y), Math.max(x1, x), Math.max(y1, y)];
    }
  }
  if (x1 < 0) return null;
  const [w, h] = [x1 - x0 + 1, y1 - y0 + 1];
  const scale = BOX / Math.max(w, h);
  const [tw, th] = [Math.max(1, Math.round(w * scale)), Math.max(1, Math.round(h * scale))];
  const [tapsX, tapsY] = [areaTaps(w, tw), areaTaps(h, th)];
  const patch = new Float32Array(tw * th);
  let peak = 0;
  for (let oy = 0; oy < th; oy++) {
    for (let ox = 0; ox < tw; ox++) {
      let v = 0;
      for (const [sy, wy] of tapsY[oy]) {
        for (const [sx, wx] of tapsX[ox]) v += wy * wx * ink[(y0 + sy) * SIDE + x0 + sx];
      }
      patch[oy * tw + ox] = v;
      peak = Math.max(peak, v);
    }
  }
  let [mass, my, mx] = [0, 0, 0];
  for (let y = 0; y < th; y++) {
    for (let x = 0; x < tw; x++) {
      const v = patch[y * tw + x] / peak;
      patch[y * tw + x] = v;
      [mass, my, mx] = [mass + v, my + v * y, mx + v * x];
    }
  }
  const top = Math.min(Math.max(Math.round(CENTER - my / mass), 0), FRAME - th);
  const left = Math.min(Math.max(Math.round(CENTER - mx / mass), 0), FRAME - tw);
  const pixels = new Array(FRAME * FRAME).fill(0);
  for (let y = 0; y < th; y++) {
    for (let x = 0; x < tw; x++) {
      pixels[(top + y) * FRAME + left + x] = Math.round(255 * patch[y * tw + x]);
    }
  }
  return pixels;
}

// ---- prediction requests, at most one in flight
function schedule(delay) {
  if (timer === null) timer = setTimeout(run, delay);
}

async function run() {
  timer = null;
  if (inFlight) {
    dirty = true;
    return;
  }
  inFlight = true;
  try {
    await predictDrawing();
  } finally {
    inFlight = false;
    if (dirty) {
      dirty = false;
      schedule(0);
    }
  }
}

async function predictDrawing() {
  const seq = drawSeq;
  const pixels = mnistPixels();
  if (!pixels) {
    showResult(null, seq);
    return;
  }
  let init;
  if ($("digit-mode").value === "png") {
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("file", blob, "drawing.png");
    init = { method: "POST", body: form };
  } else {
    const body = JSON.stringify({ image: pixels });
    init = { method: "POST", headers: { "content-type": "application/json" }, body };
  }
  await request(init, seq);
}

async function request(init, seq) {
  let response;
  try {
    const headers = { ...init.headers, ...authHeaders() };
    response = await fetch("/predict/digit", { ...init, headers });
  } catch {
    setStatus(status, describeNetworkError(), "error");
    result.dataset.error = "network";
    return;
  }
  const body = await jsonOrNull(response);
  if (!response.ok || !body) {
    if (response.status === 401) askForKey();
    setStatus(status, describeHttpError(response.status, body), "error");
    result.dataset.error = String(response.status);
    return;
  }
  if (seq === drawSeq || seq === "photo") showResult(body, seq);
  setStatus(status, `Answered by ${body.model.name} v${body.model.version}.`);
}

// ---- the answer: digit, confidence and a bar per digit
const bars = [];
for (let d = 0; d < 10; d++) {
  const row = document.createElement("div");
  row.className = "bar-row";
  row.setAttribute("role", "listitem");
  row.innerHTML = `<span class="bar-label">${d}</span><span class="bar"><span></span></span><span class="bar-value"></span>`;
  $("digit-bars").append(row);
  bars.push(row);
}

function showResult(body, seq) {
  result.dataset.seq = String(seq);
  delete result.dataset.error;
  const probs = body ? body.probabilities : new Array(10).fill(0);
  result.textContent = body ? String(body.digit) : "–";
  confidence.textContent = body
    ? `${(100 * probs[body.digit]).toFixed(1)} % sure.`
    : "Draw to get a prediction.";
  probs.forEach((p, d) => {
    const pct = 100 * p;
    bars[d].querySelector(".bar span").style.width = `${pct}%`;
    bars[d].querySelector(".bar-value").textContent = `${pct.toFixed(1)} %`;
    bars[d].classList.toggle("top", Boolean(body) && d === body.digit);
    bars[d].setAttribute("aria-label", `${d}: ${pct.toFixed(1)} %`);
  });
}

// ---- clear, photo upload, model name
$("digit-clear").addEventListener("click", clearCanvas);
$("digit-mode").addEventListener("change", () => changed());
$("digit-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const photo = $("digit-photo");
  if (photo.src) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file);
  photo.hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  setStatus(status, "Uploading the photo…", "busy");
  await request({ method: "POST", body: form }, "photo");
});

function showModel() {
  fetch("/v1/models", { headers: authHeaders() })
    .then((r) => (r.ok ? r.json() : null))
    .then((body) => {
      const model = body && body.models.find((m) => m.name === "mnist_lstm");
      const acc = model && model.metrics.test_accuracy;
      if (model) {
        const text = `${model.name} v${model.version}`;
        $("digit-model").textContent = acc
          ? `${text}, ${(100 * acc).toFixed(2)} % on MNIST's test set`
          : text;
      }
    })
    .catch(() => {});
}

window.addEventListener("api-key", () => {
  showModel();
  changed();
});
showModel();
clearCanvas();
