// Small canvas line charts for the dashboard: no third-party code, so the page works offline
// and the package ships a few kilobytes instead of a charting library.
"use strict";

const ZG_COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2"];

class LineChart {
  // opts: {title, series: [{key, label}], log: bool, thresholds: [{value, label, color}],
  //        statusKey: key of a status string per point (colours the point markers)}
  //
  // The line holds one point per step, in step order. Rows arrive in commit order, so a step
  // number that comes again (a loop that rewound its step count after a rollback, or a run
  // name reused by an older zetaguard) starts a new branch: the points it replaces move to
  // `abandoned` and are drawn faded. A rollback the guard reported (`addRollback`) fades the
  // stretch it undid, and every rollback gets a marker.
  constructor(canvas, opts) {
    this.canvas = canvas;
    this.opts = opts;
    this.pending = false;
    this.clear();
    window.addEventListener("resize", () => this.draw());
  }

  setThresholds(thresholds) {
    this.opts.thresholds = thresholds;
    this.schedule();
  }

  clear() {
    this.points = [];  // {id, step, ts, ys, status}, steps strictly increasing
    this.abandoned = [];  // arrays of points a later branch replaced
    this.rollbacks = new Map();  // step rolled back at -> {at, to, ts}
    this.lastId = 0;
    this.schedule();
  }

  push(points) {
    for (const p of points) {
      if (p.id !== undefined) {
        if (p.id <= this.lastId) continue;  // already drawn (a replayed update)
        this.lastId = p.id;
      }
      const pt = {id: p.id, step: p.step, ts: p.ts, ys: this.opts.series.map((s) => p[s.key]),
        status: this.opts.statusKey ? p[this.opts.statusKey] : null};
      const last = this.points[this.points.length - 1];
      if (last && p.step <= last.step) {
        let k = this.points.length;
        while (k > 0 && this.points[k - 1].step >= p.step) k--;
        this.abandoned.push(this.points.splice(k));
        if (!this.rollbacks.has(last.step)) {
          this.rollbacks.set(last.step, {at: last.step, to: p.step - 1, ts: p.ts});
        }
      }
      this.points.push(pt);
    }
    this.schedule();
  }

  // A rollback the guard reported: at step `at` the weights went back to step `to`'s.
  addRollback(at, to, ts) {
    this.rollbacks.set(at, {at, to, ts});
    this.schedule();
  }

  // Whether a point on the line belongs to a stretch a rollback undid (committed before it).
  isAbandoned(p) {
    for (const r of this.rollbacks.values()) {
      if (p.step > r.to && p.step <= r.at && (r.ts === undefined || p.ts === undefined || p.ts <= r.ts)) return true;
    }
    return false;
  }

  get length() {
    return this.points.length;
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
    const pts = this.points;
    const faded = pts.map((p) => this.isAbandoned(p));
    // What a test (or a curious user) can read back from the page.
    c.dataset.points = String(pts.length);
    c.dataset.steps = pts.map((p) => p.step).join(",");
    c.dataset.abandoned = String(faded.filter(Boolean).length + this.abandoned.reduce((n, a) => n + a.length, 0));
    c.dataset.rollbacks = [...this.rollbacks.values()].map((r) => `${r.at}>${r.to}`).join(",");
    if (pts.length === 0) {
      g.fillStyle = "#94a3b8";
      g.fillText("waiting for data…", pad.l, h / 2);
      return;
    }
    const all = [pts, ...this.abandoned];
    let ymin = Infinity, ymax = -Infinity, xmin = Infinity, xmax = -Infinity;
    for (const branch of all) for (const p of branch) {
      xmin = Math.min(xmin, p.step); xmax = Math.max(xmax, p.step);
      for (const v of p.ys) {
        const t = this.transform(v);
        if (t !== null) { ymin = Math.min(ymin, t); ymax = Math.max(ymax, t); }
      }
    }
    for (const th of this.opts.thresholds || []) {
      const t = this.transform(th.value);
      if (t !== null) { ymin = Math.min(ymin, t); ymax = Math.max(ymax, t); }
    }
    if (!isFinite(ymin)) { ymin = 0; ymax = 1; }
    if (ymax - ymin < 1e-12) { ymax += 0.5; ymin -= 0.5; }
    const margin = (ymax - ymin) * 0.06;
    ymin -= margin; ymax += margin;
    xmax = Math.max(xmax, xmin + 1);
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
    // rollbacks: the undone stretch shaded, a dashed line where the guard went back
    for (const r of this.rollbacks.values()) {
      const x0 = px(Math.max(r.to, xmin)), x1 = px(r.at);
      g.fillStyle = "rgba(124, 58, 237, 0.08)";
      g.fillRect(x0, pad.t, Math.max(x1 - x0, 1), h - pad.t - pad.b);
      g.strokeStyle = "#7c3aed";
      g.setLineDash([3, 3]);
      g.beginPath(); g.moveTo(x1, pad.t); g.lineTo(x1, h - pad.b); g.stroke();
      g.setLineDash([]);
      g.fillStyle = "#7c3aed";
      g.fillText(`rollback ${r.at}→${r.to}`, Math.min(x1 + 3, w - pad.r - 90), pad.t + 10);
    }
    // series: abandoned branches and undone stretches faded, the kept line solid (it joins
    // the step rolled back to with the steps trained from it)
    const line = (branch, si, keep) => {
      g.beginPath();
      let pen = false;
      for (let i = 0; i < branch.length; i++) {
        if (!keep(i)) continue;
        const t = this.transform(branch[i].ys[si]);
        if (t === null) { pen = false; continue; }
        const X = px(branch[i].step), Y = py(t);
        if (pen) g.lineTo(X, Y); else g.moveTo(X, Y);
        pen = true;
      }
      g.stroke();
    };
    this.opts.series.forEach((s, si) => {
      g.strokeStyle = ZG_COLORS[si % ZG_COLORS.length];
      g.lineWidth = 1.5;
      g.globalAlpha = 0.25;
      for (const branch of this.abandoned) line(branch, si, () => true);
      // the undone stretch, from the step rolled back to through the step rolled back at
      line(pts, si, (i) => faded[i] || (i + 1 < pts.length && faded[i + 1]));
      g.globalAlpha = 1;
      line(pts, si, (i) => !faded[i]);
    });
    // non-STABLE steps as markers on the first series (CRITICAL with no finite value on top)
    if (this.opts.statusKey) {
      for (const branch of all) for (const p of branch) {
        const s = p.status;
        if (s !== "DRIFT" && s !== "CRITICAL") continue;
        const t = this.transform(p.ys[0]);
        g.fillStyle = s === "CRITICAL" ? "#dc2626" : "#f59e0b";
        g.beginPath();
        g.arc(px(p.step), t === null ? pad.t : py(t), 3, 0, 2 * Math.PI);
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
