// charts.js — the job page's charts: line charts with Chart.js (Debian's libjs-chart.js, a global
// `Chart` from /vendor/chart.js) and a per-layer knowledge-drift heat map drawn on a plain canvas
// (Chart.js 3 has no matrix chart). Colours come from the CSS palette, so they follow dark mode.
import { el, cssVar, fmtNum } from "./util.js";

// A line chart of step → value series. series: [{label, color: "--c1"}]. The container carries
// data-points (the number of points drawn), which tests and screen readers can read.
export class LineChart {
  constructor(title, series, opts = {}) {
    this.series = series;
    this.canvas = el("canvas", { role: "img", "aria-label": title });
    this.box = el("div.chart-box", { "data-points": 0, "data-chart": opts.id || title, hidden: true }, this.canvas);
    this.empty = el("p.muted", opts.emptyText || "No points yet.");
    this.node = el("div.panel", { id: opts.id }, el("h2", title), this.empty, this.box);
    this.chart = new Chart(this.canvas, {
      type: "line",
      data: { datasets: series.map((s) => ({ label: s.label, data: [], borderWidth: 1.6, tension: 0, pointRadius: 2 })) },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        scales: {
          x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
          y: { type: opts.logY ? "logarithmic" : "linear", ticks: { callback: (v) => fmtNum(v, 3) } },
        },
        plugins: { legend: { display: series.length > 1 },
                   tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${fmtNum(c.parsed.y, 5)}` } } },
      },
    });
    this.applyTheme();
  }

  applyTheme() {
    const grid = cssVar("--chart-grid"), text = cssVar("--chart-text");
    const o = this.chart.options;
    for (const axis of [o.scales.x, o.scales.y]) {
      axis.grid.color = grid;
      axis.ticks.color = text;
      if (axis.title) axis.title.color = text;
    }
    o.plugins.legend.labels.color = text;
    this.chart.data.datasets.forEach((d, i) => {
      const c = cssVar(this.series[i].color);
      d.borderColor = c;
      d.backgroundColor = c;
    });
    this.chart.update("none");
  }

  // data: one [{x, y}] array per series.
  set(data) {
    let n = 0;
    data.forEach((pts, i) => {
      this.chart.data.datasets[i].data = pts;
      // Dots help while there are few points; a long run reads better as a plain line.
      this.chart.data.datasets[i].pointRadius = pts.length > 60 ? 0 : 2;
      n += pts.length;
    });
    this.empty.hidden = n > 0;
    this.box.hidden = n === 0;
    this.box.dataset.points = n;
    this.chart.update("none");
  }

  destroy() { this.chart.destroy(); }
}

// Knowledge drift per layer: one row per layer (q_proj of layer 0 first), one column per measured
// step, colour = drift on a log scale (drift spans orders of magnitude between layers).
export class DriftHeatmap {
  constructor() {
    this.canvas = el("canvas", { role: "img", "aria-label": "Knowledge drift per layer and step" });
    this.caption = el("p.muted", "No drift measured yet (it is reported at evaluation steps).");
    this.ramp = el("canvas.ramp", { width: 140, height: 10 });
    this.lo = el("span");
    this.hi = el("span");
    this.scale = el("div.legend-scale", { hidden: true }, this.lo, this.ramp, this.hi);
    this.box = el("div.heatmap-box", { "data-layers": 0, "data-steps": 0 }, this.canvas);
    this.node = el("div.panel", { id: "chart-drift-layers" },
      el("h2", "Knowledge drift per layer"), this.caption, this.box, this.scale);
    this.layers = [];
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
  }

  set(layers) {
    this.layers = layers;
    this.draw();
  }

  draw() {
    const layers = this.layers;
    const stepSet = new Set();
    for (const l of layers) for (const s of l.points.keys()) stepSet.add(s);
    let steps = [...stepSet].sort((a, b) => a - b);
    const maxCols = 240;
    if (steps.length > maxCols) {
      // Keep evenly spaced columns and always the newest.
      const k = steps.length / maxCols;
      steps = Array.from({ length: maxCols }, (_, i) => steps[Math.min(steps.length - 1, Math.round((i + 1) * k) - 1)]);
    }
    this.box.dataset.layers = layers.length;
    this.box.dataset.steps = steps.length;
    const has = layers.length > 0 && steps.length > 0;
    this.caption.hidden = has;
    this.scale.hidden = !has;
    this.canvas.hidden = !has;
    if (!has) return;

    let lo = Infinity, hi = 0;
    for (const l of layers) for (const v of l.points.values()) if (v > 0) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (!(hi > 0)) { lo = 1e-12; hi = 1; }
    if (hi / lo < 10) lo = hi / 10;
    const llo = Math.log10(lo), lhi = Math.log10(hi);
    const t = (v) => (v > 0 ? Math.min(1, Math.max(0, (Math.log10(v) - llo) / (lhi - llo))) : 0);

    const width = Math.max(280, this.box.clientWidth || 600);
    const labelW = Math.min(190, Math.round(width * 0.34));
    const rowH = layers.length <= 48 ? 12 : Math.max(3, Math.floor(576 / layers.length));
    const colW = Math.max(2, Math.floor((width - labelW) / steps.length));
    const axisH = 18;
    const dpr = window.devicePixelRatio || 1;
    const cssW = labelW + colW * steps.length, cssH = rowH * layers.length + axisH;
    this.canvas.width = Math.round(cssW * dpr);
    this.canvas.height = Math.round(cssH * dpr);
    this.canvas.style.width = `${cssW}px`;
    this.canvas.style.height = `${cssH}px`;
    const g = this.canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, cssW, cssH);
    const text = cssVar("--chart-text");
    g.font = "10px ui-monospace, monospace";
    g.textBaseline = "middle";
    const labelEvery = rowH >= 10 ? 1 : Math.ceil(10 / rowH);
    layers.forEach((l, r) => {
      if (r % labelEvery === 0) {
        g.fillStyle = text;
        g.fillText(shortLayer(l.layer), 2, r * rowH + rowH / 2, labelW - 6);
      }
      steps.forEach((s, c) => {
        const v = l.points.get(s);
        g.fillStyle = v === undefined ? cssVar("--code-bg") : colour(t(v));
        g.fillRect(labelW + c * colW, r * rowH, colW - (colW > 3 ? 1 : 0), rowH - (rowH > 4 ? 1 : 0));
      });
    });
    g.fillStyle = text;
    g.textBaseline = "top";
    g.fillText(`step ${steps[0]}`, labelW, rowH * layers.length + 4);
    const last = `step ${steps[steps.length - 1]}`;
    g.fillText(last, Math.max(labelW + 60, cssW - g.measureText(last).width - 2), rowH * layers.length + 4);
    this.geom = { labelW, rowH, colW, steps };

    const rg = this.ramp.getContext("2d");
    for (let x = 0; x < 140; x++) { rg.fillStyle = colour(x / 139); rg.fillRect(x, 0, 1, 10); }
    this.lo.textContent = fmtNum(lo, 2);
    this.hi.textContent = fmtNum(hi, 2);
  }

  hover(e) {
    if (!this.geom) return;
    const rect = this.canvas.getBoundingClientRect();
    const x = e.clientX - rect.left, y = e.clientY - rect.top;
    const { labelW, rowH, colW, steps } = this.geom;
    const r = Math.floor(y / rowH), c = Math.floor((x - labelW) / colW);
    const l = this.layers[r];
    if (!l || c < 0 || c >= steps.length) { this.canvas.title = ""; return; }
    const v = l.points.get(steps[c]);
    this.canvas.title = `${l.layer} @ step ${steps[c]}: ${v === undefined ? "—" : fmtNum(v, 4)}`;
  }

  destroy() {}
}

function shortLayer(name) {
  return name.replace(/^(base_model\.model\.)?model\.layers\./, "L").replace(/\.(self_attn|mlp)\./, ".");
}

// A perceptually ordered ramp (dark blue → teal → yellow), readable on light and dark panels.
const STOPS = [[48, 18, 95], [40, 95, 142], [31, 150, 139], [110, 206, 88], [253, 231, 37]];
function colour(t) {
  const x = t * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  const c = STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}
