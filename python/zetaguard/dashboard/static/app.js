// The dashboard page: picks a run, draws its history, then follows it live over SSE.
"use strict";

const $ = (id) => document.getElementById(id);
const RANK = {STABLE: 0, DRIFT: 1, CRITICAL: 2};
const state = {
  run: null, source: null, alerts: [], lastStatus: "STABLE", thresholds: [0.707, 1.414],
  // The last row id of each kind this page has shown: the stream resumes from it, and a row
  // at or below it is never shown again (an update can arrive twice across a reconnect).
  cursor: {steps: 0, incidents: 0, recommendations: 0, recoveries: 0},
  labels: {},  // group name -> "4 (Linear 128->10)"
  events: new Map(),  // "step|actions" -> {incident, recovery, li}: one row per event
};

const charts = {
  zeta: new LineChart($("chart-zeta"), {
    title: "zeta (calibrated score; markers: DRIFT / CRITICAL steps)",
    series: [{key: "zeta", label: "zeta"}],
    statusKey: "status",
    thresholds: [],
  }),
  loss: new LineChart($("chart-loss"), {title: "loss (log scale)", series: [{key: "loss", label: "loss"}], log: true}),
  norms: new LineChart($("chart-norms"), {
    title: "norms (log scale)",
    series: [{key: "update_norm", label: "update"}, {key: "grad_norm", label: "gradient"}, {key: "raw_jar", label: "raw JAR"}],
    log: true,
  }),
};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;  // textContent: run data never becomes markup
  if (cls) e.className = cls;
  return e;
}

async function getJSON(url) {
  const r = await fetch(url, {credentials: "same-origin"});
  if (!r.ok) throw new Error((await r.text()) || r.statusText);
  return r.json();
}

async function loadRuns() {
  const {runs} = await getJSON("/api/runs");
  const select = $("run-select");
  const have = new Set([...select.options].map((o) => o.value));
  for (const run of runs.slice().reverse()) {
    if (have.has(run.name)) continue;
    const opt = el("option", run.name);
    opt.value = run.name;
    select.insertBefore(opt, select.firstChild);
  }
  if (!state.run && runs.length) {
    const wanted = new URLSearchParams(location.search).get("run");
    const pick = runs.find((r) => r.name === wanted) ? wanted : runs[0].name;
    select.value = pick;
    openRun(pick);
  }
  if (!runs.length) $("live").textContent = "no runs yet: waiting for training to write one";
}

function renderAlerts() {
  const body = $("alerts").querySelector("tbody");
  body.replaceChildren();
  for (const a of state.alerts.slice().reverse().slice(0, 50)) {
    const tr = el("tr", undefined, a.status);
    tr.append(el("td", a.start === a.end ? `${a.start}` : `${a.start}–${a.end}`), el("td", a.status), el("td", a.peak === Infinity ? "non-finite" : formatNumber(a.peak)));
    body.append(tr);
  }
  if (!state.alerts.length) {
    const row = el("tr");
    row.append(el("td", "none yet", "empty"));
    body.append(row);
  }
}

function trackAlerts(steps) {
  for (const s of steps) {
    if (s.status === "STABLE") { state.lastStatus = "STABLE"; continue; }
    const zeta = s.zeta === null ? Infinity : s.zeta;
    let cur = state.alerts[state.alerts.length - 1];
    if (state.lastStatus === "STABLE" || !cur) {
      cur = {start: s.step, end: s.step, status: s.status, peak: zeta, steps: 0};
      state.alerts.push(cur);
    }
    cur.end = s.step;
    cur.steps += 1;
    if (RANK[s.status] > RANK[cur.status]) cur.status = s.status;
    cur.peak = Math.max(cur.peak ?? -Infinity, zeta);
    state.lastStatus = s.status;
  }
}

// The rows of `rows` this page has not shown yet, advancing the cursor of `kind`.
function fresh(kind, rows) {
  const out = (rows || []).filter((r) => r.id > state.cursor[kind]);
  for (const r of out) state.cursor[kind] = Math.max(state.cursor[kind], r.id);
  return out;
}

function label(group) {
  return group ? state.labels[group] || group : group;
}

function renderGroups(groups) {
  const box = $("groups");
  for (const [name, g] of Object.entries(groups || {})) if (g.label) state.labels[name] = g.label;
  const entries = Object.entries(groups || {}).sort((a, b) => (b[1].zeta ?? Infinity) - (a[1].zeta ?? Infinity));
  if (!entries.length) return;
  box.replaceChildren();
  const [drift, snap] = state.thresholds;
  for (const [name, g] of entries.slice(0, 30)) {
    const z = g.zeta === null ? Infinity : g.zeta;
    const status = z >= snap ? "CRITICAL" : z >= drift ? "DRIFT" : "STABLE";
    const row = el("div", undefined, "group");
    const bar = el("div", undefined, `bar ${status}`);
    bar.style.width = `${Math.min(100, (z / (snap * 1.5)) * 100)}%`;
    const track = el("div");
    track.append(bar);
    row.append(el("span", label(name), "name"), track, el("span", formatNumber(g.zeta)));
    row.title = `${label(name)}: zeta ${formatNumber(g.zeta)}, raw JAR ${formatNumber(g.raw_jar)}, update/weight ${formatNumber(g.update_ratio)}`;
    box.append(row);
  }
}

function addRecommendations(recs) {
  const list = $("recommendations");
  for (const r of recs) list.prepend(el("li", `step ${r.step} (${r.status}): ${r.text}`));
  while (list.children.length > 40) list.lastChild.remove();
}

// The recovery manager records each event twice over: an incident (the step, its batch, what
// was done) and a recovery (the full report). One row per event shows both.
function addIncidents(incidents, recoveries) {
  const list = $("incidents");
  const eventOf = (key) => {
    let ev = state.events.get(key);
    if (!ev) {
      ev = {li: el("li")};
      state.events.set(key, ev);
      list.prepend(ev.li);
    }
    return ev;
  };
  for (const i of incidents) eventOf(`${i.step}|${i.action}`).incident = i;
  for (const r of recoveries) {
    eventOf(`${r.step}|${r.actions.join(", ")}`).recovery = r;
    if (r.report.restored_step !== null && r.report.restored_step !== undefined) {
      for (const c of Object.values(charts)) c.addRollback(r.step, r.report.restored_step, r.ts);
    }
  }
  for (const ev of state.events.values()) {
    const i = ev.incident, r = ev.recovery;
    const step = (i || r).step;
    const worst = (i || r.report).worst_group;
    const what = [(i || r).status, worst && `worst ${label(worst)}`, i && i.batch_index !== null && `batch ${i.batch_index}`];
    const done = r ? `recovery ${r.actions.join(" → ")}${r.report.message ? ` (${r.report.message})` : ""}` : `action: ${i.action}`;
    ev.li.textContent = `step ${step}: ${what.filter(Boolean).join(", ")}: ${done}`;
  }
  while (list.children.length > 40) {
    const gone = list.lastChild;
    for (const [key, ev] of state.events) if (ev.li === gone) state.events.delete(key);
    gone.remove();
  }
}

function showLatest(steps) {
  if (!steps.length) return;
  const last = steps[steps.length - 1];
  const badge = $("status-badge");
  badge.textContent = last.status;
  badge.className = `badge ${last.status}`;
  $("summary").textContent = `step ${last.step} · zeta ${last.zeta === null ? "non-finite" : formatNumber(last.zeta)} · loss ${formatNumber(last.loss)}${last.worst_group ? ` · worst ${label(last.worst_group)}` : ""}${last.in_warmup ? " · warming up" : ""}`;
}

function apply(update) {
  const steps = fresh("steps", update.steps);
  for (const c of Object.values(charts)) c.push(steps);
  trackAlerts(steps);
  renderAlerts();
  renderGroups(update.groups);
  addRecommendations(fresh("recommendations", update.recommendations));
  addIncidents(fresh("incidents", update.incidents), fresh("recoveries", update.recoveries));
  showLatest(steps);
}

async function openRun(name) {
  if (state.source) state.source.close();
  state.source = null;
  state.run = name;
  $("live").textContent = "connecting…";
  state.alerts = [];
  state.lastStatus = "STABLE";
  state.cursor = {steps: 0, incidents: 0, recommendations: 0, recoveries: 0};
  state.labels = {};
  state.events = new Map();
  for (const c of Object.values(charts)) c.clear();
  $("recommendations").replaceChildren();
  $("incidents").replaceChildren();
  $("groups").replaceChildren(el("span", "waiting for data…", "empty"));
  const snap = await getJSON(`/api/runs/${encodeURIComponent(name)}`);
  if (state.run !== name) return;
  state.thresholds = snap.thresholds;
  charts.zeta.setThresholds([
    {value: snap.thresholds[0], label: "drift", color: "#d97706"},
    {value: snap.thresholds[1], label: "snap", color: "#dc2626"},
  ]);
  renderGroups(snap.groups);  // first: it brings the layer labels the rest uses
  const steps = fresh("steps", snap.steps);
  for (const c of Object.values(charts)) c.push(steps);
  state.alerts = snap.alerts.map((a) => ({...a, peak: a.peak === null ? Infinity : a.peak}));
  if (steps.length) state.lastStatus = steps[steps.length - 1].status;
  renderAlerts();
  addRecommendations(fresh("recommendations", snap.recommendations));
  addIncidents(fresh("incidents", snap.incidents), fresh("recoveries", snap.recoveries));
  showLatest(steps);
  // The snapshot's cursor also covers rows it did not send (steps older than its window).
  for (const k of Object.keys(state.cursor)) state.cursor[k] = Math.max(state.cursor[k], snap.cursor[k] || 0);
  follow(name);
}

// Follow the run over SSE from the page's own cursor. On an error the page reconnects itself
// rather than letting EventSource retry the first URL, whose cursor would replay every update
// since the page opened.
function follow(name) {
  const q = new URLSearchParams(state.cursor).toString();
  const source = new EventSource(`/api/runs/${encodeURIComponent(name)}/stream?${q}`);
  state.source = source;
  source.addEventListener("open", () => { $("live").textContent = "live"; });
  source.addEventListener("error", () => {
    source.close();
    if (state.source !== source) return;
    $("live").textContent = "reconnecting…";
    setTimeout(() => { if (state.source === source && state.run === name) follow(name); }, 2000);
  });
  source.addEventListener("update", (ev) => { if (state.source === source) apply(JSON.parse(ev.data)); });
  source.addEventListener("failure", (ev) => {
    $("live").textContent = `error: ${JSON.parse(ev.data).error}`;
    source.close();
  });
}

$("run-select").addEventListener("change", (ev) => openRun(ev.target.value));
loadRuns().catch((e) => { $("live").textContent = `error: ${e.message}`; });
setInterval(() => loadRuns().catch(() => {}), 5000);
