// The imago console: plain JavaScript, no framework. Every datum comes from /v1 on this
// origin; live updates arrive over /v1/events/stream (read with fetch, so that the token can go
// in the Authorization header: EventSource cannot send one, and no cookie is ever used).
"use strict";

const state = { overview: [], events: [], info: { read_only: true }, live: false };
const view = document.getElementById("view");

function token() { return sessionStorage.getItem("imago-token") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}
async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) throw new Error("the API wants its token (enter it above)");
  if (response.status === 429) throw new Error("too many failed attempts; wait a minute");
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) throw new Error((body && body.error) || response.status + " " + response.statusText);
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
// replaceChildren would show a null as the text "null": conditional parts are left out instead.
function show(where, ...nodes) { where.replaceChildren(...nodes.flat().filter(n => n !== null && n !== undefined && n !== false)); }
function cell(label, ...content) { return el("td", { "data-label": label }, ...content); }
function short(digest) { return digest ? String(digest).replace("sha256:", "").slice(0, 12) : ""; }
function when(ms) { return ms ? new Date(ms).toLocaleString() : ""; }
function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}
function statePill(text) {
  const cls = text === "complete" ? "ok" : text === "rolling out" ? "warn"
    : /fail|rolled back/.test(text) ? "bad" : "";
  return el("span", { class: "pill " + cls }, text);
}
function showError(where, error) {
  where.replaceChildren(el("p", { class: "error", role: "alert" }, String(error.message || error)));
}

// ---- views -----------------------------------------------------------------------------------

function renderOverview() {
  const rows = state.overview.map(s => el("tr", {},
    cell("Service", el("a", { href: "#/service/" + encodeURIComponent(s.name) }, s.name),
      s.target ? el("span", { class: "muted" }, " on " + s.target) : null),
    cell("Release", s.release === null ? "" : "#" + s.release, " ",
      el("code", { title: s.digest || "" }, short(s.digest))),
    cell("State", statePill(s.state), s.paused ? [" ", el("span", { class: "pill warn" }, "paused")] : null,
      s.fault ? el("div", { class: "error" }, s.fault) : null),
    cell("Ready", el("div", { class: "num" }, s.ready + " / " + s.desired),
      el("div", { class: "bar", role: "progressbar", "aria-valuenow": s.ready, "aria-valuemax": s.desired },
        el("span", { style: "width:" + (s.desired ? Math.min(100, 100 * s.ready / s.desired) : 0) + "%" }))),
    cell("Last event", s.last_event ? [el("span", { class: "muted" }, ago(s.last_event.at_ms) + " ago: "),
      s.last_event.message] : ""),
    cell("Drift", el("span", { class: s.drift_events ? "pill bad" : "pill" }, String(s.drift_events)))));
  show(view,
    el("h1", {}, "Services"),
    state.overview.length === 0 ? el("p", { class: "muted" }, "No service is deployed yet.") :
      el("table", { class: "responsive", id: "overview" },
        el("thead", {}, el("tr", {}, ["Service", "Release", "State", "Ready", "Last event", "Drift"]
          .map(h => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows)));
}

function diffLines(a, b) {
  // A line diff of two small texts (a longest common subsequence): enough for configurations.
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length;
  const table = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    table[i][j] = x[i] === y[j] ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && x[i] === y[j]) { out.push(el("div", {}, "  " + x[i])); i++; j++; }
    else if (j < m && (i === n || table[i][j + 1] >= table[i + 1][j])) { out.push(el("div", { class: "add" }, "+ " + y[j])); j++; }
    else { out.push(el("div", { class: "del" }, "- " + x[i])); i++; }
  }
  return out;
}

async function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  dialog.showModal();
  document.getElementById("confirm-ok").focus();
  return new Promise(resolve => dialog.addEventListener("close",
    () => resolve(dialog.returnValue === "ok"), { once: true }));
}

// The answer to the last action on the service page: kept here, because the page is drawn
// anew on every live update.
let actionNotice = null;
function notify(service, node) {
  actionNotice = { service, node };
  const where = document.getElementById("action-result");
  if (where) where.replaceChildren(node);
}

async function rollback(service, to) {
  const what = to ? "release #" + to : "the last completed release";
  if (!(await confirmAction("Roll " + service + " back to " + what + "? A new release is made and rolled out."))) return;
  try {
    const body = await api("/v1/services/" + encodeURIComponent(service) + "/rollback", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(to ? { to } : {}),
    });
    notify(service, el("p", { role: "status" },
      "Release #" + body.release + " restores #" + body.restores + "; the controller rolls it out."));
    refreshService(service);
  } catch (e) { notify(service, el("p", { class: "error", role: "alert" }, String(e.message || e))); }
}

// Restart, pause and resume: the same confirmation and answer as a rollback.
const ACTIONS = {
  restart: { question: s => "Restart " + s + "? New instances of the current release replace every instance, rolled out like an update.",
    done: b => "Release #" + b.release + " restarts every instance; the controller rolls it out." },
  pause: { question: s => "Pause the rollouts of " + s + "? Nothing is launched or retired until you resume.",
    done: b => b.changed ? "Rollouts paused." : "Rollouts were paused already." },
  resume: { question: s => "Resume the rollouts of " + s + "?",
    done: b => b.changed ? "Rollouts resumed." : "Rollouts were running already." },
};
async function serviceAction(service, action) {
  const spec = ACTIONS[action];
  if (!(await confirmAction(spec.question(service)))) return;
  try {
    const body = await api("/v1/services/" + encodeURIComponent(service) + "/" + action, { method: "POST" });
    notify(service, el("p", { role: "status" }, spec.done(body)));
    refreshService(service);
  } catch (e) { notify(service, el("p", { class: "error", role: "alert" }, String(e.message || e))); }
}

let serviceData = null;
async function refreshService(name) {
  try {
    const [status, releases, instances, events] = await Promise.all([
      api("/v1/services/" + encodeURIComponent(name)),
      api("/v1/services/" + encodeURIComponent(name) + "/releases"),
      api("/v1/services/" + encodeURIComponent(name) + "/instances"),
      api("/v1/events?service=" + encodeURIComponent(name) + "&limit=2000"),
    ]);
    serviceData = { name, status, releases, instances, events };
    renderService();
  } catch (e) {
    // A request the browser aborted (a network change, a restarting controller): keep what is
    // shown and ask again, rather than replace the page with an error.
    if (serviceData && serviceData.name === name && !/token|too many/.test(String(e.message))) {
      clearTimeout(refreshTimer); refreshTimer = setTimeout(() => refreshService(name), 1000);
    } else showError(view, e);
  }
}

function renderService() {
  const { name, status, releases, instances, events } = serviceData;
  const readOnly = state.info.read_only;
  const current = status.desired ? status.desired.number : null;
  const row = state.overview.find(s => s.name === name);
  const timeline = releases.slice().reverse().map(r => {
    const outcome = r.outcome ? r.outcome.outcome : (r.number === current ? "rolling out" : "superseded");
    const took = r.outcome ? ((r.outcome.at_ms - r.created_ms) / 1000).toFixed(1) + " s" : "";
    return el("tr", { class: r.number === current ? "current" : null },
      cell("Release", "#" + r.number, r.number === current ? el("span", { class: "muted" }, " (desired)") : null),
      cell("Image", el("code", { title: r.image_digest }, short(r.image_digest))),
      cell("Config", el("code", { title: r.config_hash }, short(r.config_hash))),
      cell("Outcome", statePill(outcome), r.outcome && r.outcome.detail ? el("div", { class: "muted" }, r.outcome.detail) : null),
      cell("Reason", r.reason),
      cell("Created", when(r.created_ms)),
      cell("Took", took),
      cell("Action", r.number === current ? "" : el("button", {
        class: "danger", disabled: readOnly, title: readOnly ? "the API is read-only" : null,
        onclick: () => rollback(name, r.number),
      }, "Roll back to #" + r.number)));
  });
  const instanceRows = instances.map(i => el("tr", {},
    cell("Instance", el("code", {}, i.id)),
    cell("Release", i.release === null ? "?" : "#" + i.release),
    cell("Status", i.status),
    cell("Health", i.ready_since_ms ? el("span", { class: "pill ok" }, "ready " + ago(i.ready_since_ms)) : el("span", { class: "pill" }, "not ready")),
    cell("Address", i.address || ""),
    cell("Uptime", i.started_ms ? ago(i.started_ms) : ""),
    cell("Engine", i.engine),
    cell("Logs", el("button", { onclick: () => showLogs(i.id) }, "Logs"))));
  const options = releases.map(r => el("option", { value: r.number }, "#" + r.number));
  const from = el("select", { id: "diff-from", "aria-label": "from release" }, options.map(o => o.cloneNode(true)));
  const to = el("select", { id: "diff-to", "aria-label": "to release" }, options);
  if (releases.length > 1) from.value = releases[releases.length - 2].number;
  if (releases.length) to.value = releases[releases.length - 1].number;
  const diffOut = el("pre", { class: "diff", id: "diff" });
  const showDiff = () => {
    const a = releases.find(r => String(r.number) === from.value);
    const b = releases.find(r => String(r.number) === to.value);
    if (a && b) diffOut.replaceChildren(...diffLines(JSON.stringify(a.spec, null, 2), JSON.stringify(b.spec, null, 2)));
  };
  from.addEventListener("change", showDiff); to.addEventListener("change", showDiff);
  show(view,
    el("h1", {}, "Service " + name, " ", row ? statePill(row.state) : null,
      status.paused ? [" ", el("span", { class: "pill warn", id: "paused" }, "paused")] : null),
    row ? el("p", { id: "summary" }, "Ready " + row.ready + " of " + row.desired + "; " + row.running + " instances alive.") : null,
    status.paused ? el("p", { class: "muted" }, "Rollouts paused by " + status.paused.actor + " " + ago(status.paused.since_ms) +
      " ago: nothing is launched or retired until they are resumed.") : null,
    el("div", { id: "action-result" }, actionNotice && actionNotice.service === name ? actionNotice.node : null),
    el("div", { class: "actions" },
      el("button", { class: "danger", disabled: readOnly || releases.length < 2, onclick: () => rollback(name, null) }, "Roll back"),
      el("button", { disabled: readOnly || !current, onclick: () => serviceAction(name, "restart") }, "Restart"),
      status.paused
        ? el("button", { disabled: readOnly, onclick: () => serviceAction(name, "resume") }, "Resume rollouts")
        : el("button", { disabled: readOnly || !current, onclick: () => serviceAction(name, "pause") }, "Pause rollouts")),
    readOnly ? el("span", { class: "muted" }, " actions are off: the API is read-only") : null,
    current === null ? null : [el("h2", {}, "Rollout of release #" + current), rolloutFigure(events, current, instances)],
    el("h2", {}, "Instances"),
    el("table", { class: "responsive" }, el("thead", {}, el("tr", {},
      ["Instance", "Release", "Status", "Health", "Address", "Uptime", "Engine", "Logs"].map(h => el("th", { scope: "col" }, h)))),
      el("tbody", {}, instanceRows)),
    el("pre", { id: "logs", hidden: true }),
    el("h2", {}, "Releases"),
    el("table", { class: "responsive", id: "releases" }, el("thead", {}, el("tr", {},
      ["Release", "Image", "Config", "Outcome", "Reason", "Created", "Took", "Action"].map(h => el("th", { scope: "col" }, h)))),
      el("tbody", {}, timeline)),
    el("h2", {}, "Configuration diff"),
    el("div", { class: "filters" }, el("label", {}, "From", from), el("label", {}, "To", to)),
    diffOut,
    el("h2", {}, "Recent events"),
    eventTable(state.events.filter(e => e.service === name).slice(-20)));
  showDiff();
}

// ---- the rollout over time ------------------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// What the events say about each instance during the current release's rollout: launched,
// ready, retired, stopped, and every health flip. Instances of older releases that ran when it
// began come from the instance list (they were launched before the window).
function rolloutLanes(events, current, instances, now) {
  const started = events.filter(e => e.kind === "release" && e.message.startsWith("release " + current + ":")).pop();
  if (!started) return null;
  const start = started.at_ms;
  const ended = events.find(e => e.at_ms >= start && /^(complete|failed)$/.test(e.kind) && e.message.startsWith("release " + current + ":"));
  const end = ended ? ended.at_ms : now;
  const lanes = new Map();
  const lane = (id, release) => {
    if (!lanes.has(id)) lanes.set(id, { id, release: null, launched: null, ready: null, retired: null, stopped: null, flips: [] });
    const l = lanes.get(id);
    if (release !== undefined && release !== null) l.release = Number(release);
    return l;
  };
  const launches = [];
  for (const e of events) {
    if (e.at_ms < start) continue;
    let m;
    if (e.kind === "launch" && (m = e.message.match(/^instance (\S+) launched for release (\d+)/))) {
      lane(m[1], m[2]).launched = e.at_ms; launches.push(e.at_ms);
    } else if (e.kind === "ready" && (m = e.message.match(/^instance (\S+) \(release (\d+)\)/))) {
      const l = lane(m[1], m[2]);
      if (l.ready === null) l.ready = e.at_ms; else l.flips.push({ at: e.at_ms, ok: true });
    } else if (e.kind === "retire" && (m = e.message.match(/^instance (\S+) \(release (\d+)\)/))) {
      lane(m[1], m[2]).retired = e.at_ms;
    } else if (e.kind === "unhealthy" && (m = e.message.match(/^instance (\S+) is unhealthy/))) {
      lane(m[1]).flips.push({ at: e.at_ms, ok: false });
    } else if ((e.kind === "stop" || e.kind === "drift") && (m = e.message.match(/^instance (\S+) /))) {
      if (lanes.has(m[1]) || e.kind === "stop") lane(m[1]).stopped = e.at_ms;
    }
  }
  for (const i of instances) {
    if (!lanes.has(i.id) && i.created_ms <= start) lane(i.id, i.release);
  }
  // An instance that ran before the window served from its start (its launch and readiness are
  // older events), unless a health check of it failed since.
  for (const l of lanes.values()) {
    if (l.launched === null && l.ready === null) l.ready = start;
  }
  // Waves: launches less than a second apart belong to one.
  const waves = [];
  for (const at of launches.sort((a, b) => a - b)) {
    if (!waves.length || at - waves[waves.length - 1].last > 1000) waves.push({ at, last: at });
    else waves[waves.length - 1].last = at;
  }
  const ordered = [...lanes.values()].sort((a, b) =>
    ((a.release === current) - (b.release === current)) || ((a.launched || 0) - (b.launched || 0)) || a.id.localeCompare(b.id));
  return { start, end, done: ended ? ended.kind : null, lanes: ordered, waves };
}

function rolloutChart(data, current) {
  const W = 1000, left = 170, right = 12, top = 26, laneH = 24;
  const span = Math.max(1, data.end - data.start);
  const x = t => left + Math.max(0, Math.min(1, (t - data.start) / span)) * (W - left - right);
  const H = top + data.lanes.length * laneH + 22;
  const seconds = ms => (ms / 1000).toFixed(1) + " s";
  const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, class: "rollout-chart", role: "list",
    "aria-label": "rollout of release #" + current + " over " + seconds(span) + ": " + data.lanes.length + " instances, " + data.waves.length + " waves" });
  data.waves.forEach((w, i) => chart.append(
    svg("line", { x1: x(w.at), x2: x(w.at), y1: top - 6, y2: H - 20, class: "wave" }),
    svg("text", { x: x(w.at) + 3, y: top - 10, class: "wave-label" }, "wave " + (i + 1))));
  data.lanes.forEach((l, i) => {
    const y = top + i * laneH;
    const isNew = l.release === current;
    const from = l.launched === null ? data.start : l.launched;
    const until = l.stopped === null ? data.end : l.stopped;
    const parts = [];
    const bar = (a, b, cls) => { if (b > a) parts.push(svg("rect", { x: x(a), y: y + 5, width: Math.max(1, x(b) - x(a)), height: laneH - 10, rx: 3, class: cls })); };
    const readyAt = l.ready === null ? until : Math.max(from, l.ready);
    bar(from, Math.min(readyAt, until), "seg starting");
    bar(Math.min(readyAt, until), l.retired === null ? until : Math.min(l.retired, until), "seg " + (isNew ? "new" : "old"));
    if (l.retired !== null) bar(Math.max(l.retired, from), until, "seg draining");
    for (const f of l.flips) parts.push(svg("circle", { cx: x(f.at), cy: y + laneH / 2, r: 5, class: f.ok ? "flip ok" : "flip bad" }));
    const describe = [
      "instance " + l.id + " of release #" + (l.release === null ? "?" : l.release) + (isNew ? " (new)" : " (old)"),
      l.launched === null ? "running when the rollout began" : "launched at +" + seconds(l.launched - data.start),
      l.ready === null ? "not ready" : "ready at +" + seconds(Math.max(0, l.ready - data.start)),
      l.retired === null ? null : "retired at +" + seconds(l.retired - data.start),
      l.stopped === null ? null : "stopped at +" + seconds(l.stopped - data.start),
      l.flips.length ? l.flips.length + " health flips" : null,
    ].filter(Boolean).join(", ");
    chart.append(svg("g", { class: "lane " + (isNew ? "lane-new" : "lane-old"), tabindex: "0", role: "listitem", "aria-label": describe, "data-instance": l.id },
      svg("title", {}, describe),
      svg("rect", { x: 0, y, width: W, height: laneH, class: "lane-bg" }),
      svg("text", { x: 4, y: y + laneH / 2 + 4, class: "lane-label" }, l.id.slice(0, 12) + " #" + (l.release === null ? "?" : l.release)),
      parts));
  });
  chart.append(svg("text", { x: left, y: H - 4, class: "axis" }, "0 s"),
    svg("text", { x: W - right, y: H - 4, class: "axis end" }, seconds(span) + (data.done ? " (" + data.done + ")" : " (now)")));
  return chart;
}

function rolloutFigure(events, current, instances) {
  const data = rolloutLanes(events, current, instances, Date.now());
  if (!data || !data.lanes.length) return el("p", { class: "muted" }, "No rollout of the current release is in the event log.");
  return el("figure", { id: "rollout" }, rolloutChart(data, current),
    el("figcaption", { class: "legend" },
      el("span", { class: "key starting" }, "starting"), el("span", { class: "key new" }, "new, ready"),
      el("span", { class: "key old" }, "old"), el("span", { class: "key draining" }, "draining"),
      el("span", { class: "key flip-bad" }, "health check failed"), el("span", { class: "key flip-ok" }, "healthy again"),
      el("span", { class: "muted" }, " Tab moves through the instances; each says what happened to it.")));
}

async function showLogs(id) {
  const pre = document.getElementById("logs");
  pre.hidden = false;
  try { pre.textContent = (await api("/v1/instances/" + encodeURIComponent(id) + "/logs?lines=200")) || "(no output)"; }
  catch (e) { pre.textContent = String(e.message); }
}

function eventTable(events) {
  return el("table", { class: "responsive events" },
    el("thead", {}, el("tr", {}, ["#", "Time", "Service", "Kind", "Message", "By"].map(h => el("th", { scope: "col" }, h)))),
    el("tbody", {}, events.slice().reverse().map(e => el("tr", { class: e.kind === "drift" ? "drift" : null },
      cell("#", e.seq), cell("Time", when(e.at_ms)), cell("Service", e.service || ""),
      cell("Kind", e.kind), cell("Message", e.message), cell("By", e.actor)))));
}

const filters = { service: "", kind: "", text: "" };
function renderEvents() {
  const services = [...new Set(state.events.map(e => e.service).filter(Boolean))].sort();
  const kinds = [...new Set(state.events.map(e => e.kind))].sort();
  const select = (key, values, label) => {
    const s = el("select", { "aria-label": label }, el("option", { value: "" }, "any"), values.map(v => el("option", { value: v }, v)));
    s.value = filters[key];
    s.addEventListener("change", () => { filters[key] = s.value; renderEvents(); });
    return el("label", {}, label, s);
  };
  const text = el("input", { type: "search", value: filters.text, "aria-label": "text" });
  text.addEventListener("input", () => { filters.text = text.value; renderList(); });
  const list = el("div", { id: "event-list" });
  const renderList = () => list.replaceChildren(eventTable(state.events.filter(e =>
    (!filters.service || e.service === filters.service) && (!filters.kind || e.kind === filters.kind) &&
    (!filters.text || e.message.toLowerCase().includes(filters.text.toLowerCase()))).slice(-500)));
  show(view, el("h1", {}, "Events"),
    el("div", { class: "filters" }, select("service", services, "Service"), select("kind", kinds, "Kind"),
      el("label", {}, "Message contains", text)), list);
  renderList();
}

// ---- routing and live updates -----------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/service\/(.+)$/);
  if (match) return { page: "service", name: decodeURIComponent(match[1]) };
  if (hash === "#/events") return { page: "events" };
  return { page: "overview" };
}
function render() {
  const r = route();
  if (r.page === "service") {
    if (serviceData && serviceData.name === r.name) renderService();
    refreshService(r.name);
  } else if (r.page === "events") renderEvents();
  else renderOverview();
}

function setLive(live) {
  state.live = live;
  const pill = document.getElementById("live");
  pill.textContent = live ? "live" : "offline";
  pill.className = "pill " + (live ? "ok" : "bad");
}

let refreshTimer = null;
function onMessage(kind, data) {
  if (kind === "overview") {
    state.overview = JSON.parse(data);
    const r = route();
    if (r.page === "overview") renderOverview();
    else if (r.page === "service") { clearTimeout(refreshTimer); refreshTimer = setTimeout(() => refreshService(r.name), 100); }
  } else if (kind === "event") {
    state.events.push(JSON.parse(data));
    if (state.events.length > 5000) state.events.splice(0, state.events.length - 5000);
    const r = route();
    if (r.page === "events") renderEvents();
    else if (r.page === "service") { clearTimeout(refreshTimer); refreshTimer = setTimeout(() => refreshService(r.name), 100); }
  }
}

let streamAbort = null;
async function stream() {
  if (streamAbort) streamAbort.abort();
  streamAbort = new AbortController();
  const since = state.events.length ? state.events[state.events.length - 1].seq : 0;
  const query = since ? "?since=" + since : "?limit=1000";
  try {
    const response = await fetch("/v1/events/stream" + query, { headers: headers(), signal: streamAbort.signal });
    if (!response.ok) throw new Error(response.status === 401 ? "the API wants its token (enter it above)" : String(response.status));
    setLive(true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        let kind = "message"; const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onMessage(kind, data.join("\n"));
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return;
    if (route().page === "overview" && !state.overview.length) showError(view, e);
  }
  setLive(false);
  setTimeout(stream, 2000);
}

async function start() {
  try { state.info = await api("/v1/info"); } catch (e) { showError(view, e); }
  render();
  stream();
}

document.getElementById("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem("imago-token", input.value.trim());
  input.value = "";
  start();
});
window.addEventListener("hashchange", () => { render(); view.focus(); });
start();
