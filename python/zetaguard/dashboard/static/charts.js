// Small canvas line charts for the dashboard: no third-party code, so the page works offline
// and the package ships a few kilobytes instead of a charting library.
"use strict";

const ZG_COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2"];

class LineChart {
  // opts: {title, series: [{key, label}], log: bool, thresholds: [{value, label, color}],
  //        statusKey: key of a status string per point (colours the point markers)}
  constructor(canvas, opts) {
    this.canvas = canvas;
    this.opts = opts;
    this.x = [];
    this.ys = opts.series.map(() => []);
    this.status = [];
    this.pending = false;
    window.addEventListener("resize", () => this.draw());
  }

  setThresholds(thresholds) {
    this.opts.thresholds = thresholds;
    this.schedule();
  }

  clear() {
    this.x = [];
    this.ys = this.opts.series.map(() => []);
    this.status = [];
    this.schedule();
  }

  push(points) {
    for (const p of points) {
      this.x.push(p.step);
      this.opts.series.forEach((s, i) => this.ys[i].push(p[s.key]));
      this.status.push(this.opts.statusKey ? p[this.opts.statusKey] : null);
    }
    this.schedule();
  }

  get length() {
    return this.x.length;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  transform(v) {
    if (v === null || v === undefined || !isFinite(v)) return null;
    if (this.opts.log) return v > 0 ? Math.log10(v) : null;
    return v;
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (c.width !== w * dpr || c.height !== h * dpr) {
      c.width = w * dpr;
      c.height = h * dpr;
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const pad = {l: 56, r: 12, t: 22, b: 26};
    g.font = "12px system-ui, sans-serif";
    g.fillStyle = "#334155";
    g.fillText(this.opts.title, pad.l, 14);
    c.dataset.points = String(this.x.length);
    if (this.x.length === 0) {
      g.fillStyle = "#94a3b8";
      g.fillText("waiting for data…", pad.l, h / 2);
      return;
    }
    let ymin = Infinity, ymax = -Infinity;
    for (const ys of this.ys) for (const v of ys) {
      const t = this.transform(v);
      if (t !== null) { ymin = Math.min(ymin, t); ymax = Math.max(ymax, t); }
    }
    for (const th of this.opts.thresholds || []) {
      const t = this.transform(th.value);
      if (t !== null) { ymin = Math.min(ymin, t); ymax = Math.max(ymax, t); }
    }
    if (!isFinite(ymin)) { ymin = 0; ymax = 1; }
    if (ymax - ymin < 1e-12) { ymax += 0.5; ymin -= 0.5; }
    const margin = (ymax - ymin) * 0.06;
    ymin -= margin; ymax += margin;
    const xmin = this.x[0], xmax = Math.max(this.x[this.x.length - 1], xmin + 1);
    const px = (x) => pad.l + (x - xmin) / (xmax - xmin) * (w - pad.l - pad.r);
    const py = (y) => pad.t + (1 - (y - ymin) / (ymax - ymin)) * (h - pad.t - pad.b);

    // axes and ticks
    g.strokeStyle = "#e2e8f0";
    g.fillStyle = "#64748b";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = ymin + (ymax - ymin) * i / 4;
      const yy = py(y);
      g.beginPath(); g.moveTo(pad.l, yy); g.lineTo(w - pad.r, yy); g.stroke();
      const label = this.opts.log ? formatNumber(Math.pow(10, y)) : formatNumber(y);
      g.fillText(label, 4, yy + 4);
    }
    for (let i = 0; i <= 4; i++) {
      const x = xmin + (xmax - xmin) * i / 4;
      g.fillText(String(Math.round(x)), px(x) - 8, h - 8);
    }
    // thresholds
    for (const th of this.opts.thresholds || []) {
      const t = this.transform(th.value);
      if (t === null) continue;
      g.strokeStyle = th.color;
      g.setLineDash([5, 4]);
      g.beginPath(); g.moveTo(pad.l, py(t)); g.lineTo(w - pad.r, py(t)); g.stroke();
      g.setLineDash([]);
      g.fillStyle = th.color;
      g.fillText(th.label, w - pad.r - 60, py(t) - 3);
    }
    // series
    this.ys.forEach((ys, si) => {
      g.strokeStyle = ZG_COLORS[si % ZG_COLORS.length];
      g.lineWidth = 1.5;
      g.beginPath();
      let pen = false;
      for (let i = 0; i < ys.length; i++) {
        const t = this.transform(ys[i]);
        if (t === null) { pen = false; continue; }
        const X = px(this.x[i]), Y = py(t);
        if (pen) g.lineTo(X, Y); else g.moveTo(X, Y);
        pen = true;
      }
      g.stroke();
    });
    // non-STABLE steps as markers on the first series (CRITICAL with no finite value on top)
    if (this.opts.statusKey) {
      for (let i = 0; i < this.status.length; i++) {
        const s = this.status[i];
        if (s !== "DRIFT" && s !== "CRITICAL") continue;
        const t = this.transform(this.ys[0][i]);
        g.fillStyle = s === "CRITICAL" ? "#dc2626" : "#f59e0b";
        g.beginPath();
        g.arc(px(this.x[i]), t === null ? pad.t : py(t), 3, 0, 2 * Math.PI);
        g.fill();
      }
    }
    // legend
    if (this.opts.series.length > 1) {
      let lx = pad.l + 160;
      this.opts.series.forEach((s, si) => {
        g.fillStyle = ZG_COLORS[si % ZG_COLORS.length];
        g.fillRect(lx, 6, 10, 10);
        g.fillStyle = "#334155";
        g.fillText(s.label, lx + 14, 15);
        lx += g.measureText(s.label).width + 32;
      });
    }
  }
}

function formatNumber(v) {
  if (v === Infinity) return "∞";
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(3);
}
