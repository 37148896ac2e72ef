// The echo panel's scrolling picture, like the seed tutorial's: three strips of bars, newest on
// the right: the input bits, the target (the input `echo_step` bits earlier) and the predicted
// probability of a 1 (red where the predicted bit is wrong). A dashed line marks a reset.

const COLORS = {
  input: "#3b82f6",
  target: "#f59e0b",
  pred: "#22c55e",
  wrong: "#ef4444",
  grid: "#d1d5db",
  text: "#374151",
  lost: "#9ca3af",
};
const LABEL_W = 56;
const COLUMN = 8; // px per bit

/** Draw `points` ({x, t, p, ok, reset, lost}) onto the 2D context of `canvas`. */
export function drawPlot(canvas, points) {
  const ctx = canvas.getContext("2d");
  // Draw at the displayed size (CSS pixels × device pixels), so text stays readable on phones.
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const strip = height / 3;
  const bar = strip - 14;
  ctx.clearRect(0, 0, width, height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  const labels = ["input", "target", "P(1)"];
  for (let s = 0; s < 3; s++) {
    const base = (s + 1) * strip - 4;
    ctx.fillStyle = COLORS.text;
    ctx.fillText(labels[s], 4, base - bar / 2);
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(LABEL_W, base + 0.5);
    ctx.lineTo(width, base + 0.5);
    ctx.stroke();
  }
  const columns = Math.floor((width - LABEL_W) / COLUMN);
  const shown = points.slice(-columns);
  const offset = width - shown.length * COLUMN;
  shown.forEach((pt, i) => {
    const x = offset + i * COLUMN;
    if (pt.reset) {
      ctx.strokeStyle = COLORS.text;
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(x + 0.5, 0);
      ctx.lineTo(x + 0.5, height);
      ctx.stroke();
      ctx.setLineDash([]);
      return;
    }
    const values = [
      [pt.x, COLORS.input],
      [pt.t, COLORS.target],
      [pt.lost ? 0.15 : pt.p, pt.lost ? COLORS.lost : pt.ok === false ? COLORS.wrong : COLORS.pred],
    ];
    values.forEach(([v, color], s) => {
      if (v === null || v === undefined) return;
      const base = (s + 1) * strip - 4;
      const h = Math.max(v * bar, v > 0 ? 1 : 0);
      ctx.fillStyle = color;
      ctx.fillRect(x + 1, base - h, COLUMN - 2, h);
    });
  });
}
