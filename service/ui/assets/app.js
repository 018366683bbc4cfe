// The drmerge job page: recent jobs, live progress from each job's event stream, events,
// warnings and result files. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The API key is pasted once and kept in sessionStorage (this tab only, gone when it
// closes); every request sends it as `Authorization: Bearer`, never in a URL. That is why
// the event stream is read with fetch() and not EventSource, which cannot send headers.
"use strict";

const API = new URL("../v1/", document.baseURI);
const KEY = "drmerge.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MAX_STREAMS = 4;      // open event streams at once (a browser allows ~6 connections per host)
const LIST_EVERY_MS = 3000; // the list is re-read this often (ETag: unchanged pages cost a 304)

const $ = (id) => document.getElementById(id);
const state = { jobs: new Map(), streams: new Map(), selected: null, listTimer: null };

function apiKey() { return sessionStorage.getItem(KEY); }

async function api(path, options = {}) {
  const headers = Object.assign({ "Accept": "application/json", "Authorization": "Bearer " + apiKey() },
                                options.headers || {});
  const resp = await fetch(new URL(path, API), Object.assign({}, options, { headers, cache: "no-cache" }));
  if (resp.status === 401) { forgetKey("That API key was refused: " + await problem(resp)); throw new Error("401"); }
  return resp;
}

async function problem(resp) {
  try { const p = await resp.json(); return p.detail || p.title || resp.statusText; } catch { return resp.statusText; }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function notice(text) { const n = $("notice"); n.textContent = text || ""; n.hidden = !text; }

function pct(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return 100;
  if (!p.tensors_total) return 0;
  return Math.min(99, Math.floor(100 * (p.fraction || 0)));  // 100% only once it has succeeded
}

function bar(job, big) {
  const inner = el("div", { "class": job.status, role: "progressbar" });
  inner.setAttribute("aria-valuemin", "0"); inner.setAttribute("aria-valuemax", "100");
  setBar(inner, job);
  return el("div", { "class": big ? "bar big" : "bar" }, inner);
}

function setBar(inner, job) {
  const v = pct(job);
  inner.style.width = v + "%";
  inner.className = job.status;
  inner.setAttribute("aria-valuenow", String(v));
}

function pctText(job) {
  return job.status === "succeeded" || (job.progress || {}).tensors_total ? pct(job) + "%" : "-";
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : "-"; }

// --- the list ---------------------------------------------------------------------------

async function loadList() {
  const status = $("status-filter").value;
  const q = new URLSearchParams({ limit: "50" });
  if (status) q.set("status", status);
  try {
    const resp = await api("merges?" + q);
    if (!resp.ok) { notice("Could not list jobs: " + await problem(resp)); return; }
    const page = await resp.json();
    notice("");
    renderList(page.data);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e.message !== "401") notice("The API does not answer: " + e.message);
  }
}

function renderList(jobs) {
  const body = $("jobs");
  body.replaceChildren();
  for (const job of jobs) {
    const known = state.jobs.get(job.id);
    if (known && known.live) job = Object.assign({}, job, { progress: known.progress, status: known.status });
    state.jobs.set(job.id, Object.assign(known || {}, job));
    body.append(row(job));
    if (!TERMINAL.has(job.status)) follow(job.id);
  }
  $("empty").hidden = jobs.length > 0;
}

function row(job) {
  const tr = el("tr", { "data-job-id": job.id, "data-status": job.status },
    el("td", { "class": "id", title: job.id }, job.id),
    el("td", {}, el("span", { "class": "badge " + job.status }, job.status)),
    el("td", {}, bar(job, false), " ", el("span", { "class": "muted pct" }, pctText(job))),
    el("td", {}, when(job.created_at)),
    el("td", { "class": "mono", title: (job.spec || {}).output || "" }, (job.spec || {}).output || ""));
  if (job.id === state.selected) tr.classList.add("selected");
  tr.addEventListener("click", () => select(job.id));
  return tr;
}

function updateRow(job) {
  const tr = document.querySelector(`tr[data-job-id="${job.id}"]`);
  if (!tr) return;
  tr.dataset.status = job.status;
  const badge = tr.querySelector(".badge");
  badge.textContent = job.status; badge.className = "badge " + job.status;
  setBar(tr.querySelector("[role=progressbar]"), job);
  tr.querySelector(".pct").textContent = pctText(job);
}

// --- live: one event stream per active job ------------------------------------------------

function follow(id) {
  if (state.streams.has(id) || state.streams.size >= MAX_STREAMS) return;
  const ctl = new AbortController();
  state.streams.set(id, ctl);
  stream(id, ctl.signal).finally(() => { state.streams.delete(id); });
}

async function stream(id, signal) {
  let last = null;
  for (let attempt = 0; attempt < 20 && !signal.aborted; attempt++) {
    const headers = { "Accept": "text/event-stream" };
    if (last !== null) headers["Last-Event-ID"] = last;
    try {
      const resp = await api(`merges/${id}/events`, { headers, signal });
      if (!resp.ok) return;
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const msg = parseMessage(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
          if (!msg) continue;
          if (msg.id !== null) last = msg.id;
          if (onMessage(id, msg)) return;  // the job ended
        }
      }
    } catch (e) {
      if (signal.aborted || e.message === "401") return;
    }
    await new Promise((r) => setTimeout(r, 1000));  // the stream broke: resume after the last event
  }
}

function parseMessage(text) {
  let event = "message", data = [], id = null;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const name = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (name === "event") event = value; else if (name === "data") data.push(value); else if (name === "id") id = value;
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")), id } : null;
}

function onMessage(id, msg) {
  const job = state.jobs.get(id) || { id };
  if (msg.event === "progress") {
    Object.assign(job, msg.data, { live: true });
  } else if (msg.event === "end") {
    Object.assign(job, msg.data, { live: false });
  } else {
    (job.events = job.events || new Map()).set(msg.data.id, msg.data);
  }
  state.jobs.set(id, job);
  updateRow(job);
  if (id === state.selected) renderDetail(job);
  if (msg.event === "end") { if (id === state.selected) loadFiles(job); return true; }
  return false;
}

// --- one job --------------------------------------------------------------------------------

async function select(id) {
  state.selected = id;
  document.querySelectorAll("tr.selected").forEach((tr) => tr.classList.remove("selected"));
  const tr = document.querySelector(`tr[data-job-id="${id}"]`);
  if (tr) tr.classList.add("selected");
  const resp = await api(`merges/${id}`);
  if (!resp.ok) { notice(await problem(resp)); return; }
  const job = Object.assign(state.jobs.get(id) || {}, await resp.json());
  state.jobs.set(id, job);
  if (TERMINAL.has(job.status)) {
    const ev = await api(`merges/${id}/events?limit=1000`);
    if (ev.ok) job.events = new Map((await ev.json()).data.map((e) => [e.id, e]));
    loadFiles(job);
  } else {
    follow(id);
  }
  renderDetail(job);
}

function renderDetail(job) {
  $("detail").hidden = false;
  $("detail").dataset.jobId = job.id;
  $("detail").dataset.status = job.status;
  $("d-id").textContent = job.id;
  const s = $("d-status"); s.textContent = job.status; s.className = "badge " + job.status;
  const p = job.progress || {};
  $("d-stage").textContent = p.stage || "";
  setBar($("d-bar"), job);
  $("d-progress").textContent = p.tensors_total
    ? `${pct(job)}%  ${p.tensors_done}/${p.tensors_total} tensors` +
      (job.status === "running" && p.eta_seconds != null ? `  about ${Math.round(p.eta_seconds)} s left` : "")
    : "";
  const spec = job.spec || {};
  $("d-method").textContent = spec.method ? `${spec.method}, ${(spec.models || []).length} models` : "";
  $("d-output").textContent = spec.output || "";
  $("d-created").textContent = when(job.created_at);
  $("d-metadata").textContent = Object.entries(job.metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "-";
  const err = $("d-error");
  err.hidden = !job.error;
  err.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  const events = [...(job.events || new Map()).values()].sort((a, b) => a.id - b.id);
  const warnings = events.filter((e) => e.type === "warning");
  $("d-warnings").replaceChildren(...(warnings.length ? warnings.map((w) => el("li", {}, w.message))
                                                      : [el("li", { "class": "muted" }, "none")]));
  $("d-events").replaceChildren(...events.map((e) => el("li", { "data-type": e.type },
    el("span", { "class": "t" }, new Date(e.at).toLocaleTimeString()), " ",
    e.type === "warning" ? "warning: " + e.message : e.message)));
}

async function loadFiles(job) {
  const list = $("d-files");
  if (job.status !== "succeeded") {
    list.replaceChildren(el("li", { "class": "muted" }, job.status === "failed" || job.status === "cancelled"
      ? "none: the merge did not succeed" : "once it has succeeded"));
    return;
  }
  const resp = await api(`merges/${job.id}/files`);
  if (!resp.ok) {
    const files = (job.result || {}).files || [];
    list.replaceChildren(...files.map((f) => el("li", { "class": "mono" }, `${f.name}  (${f.size} bytes)`)),
                         el("li", { "class": "muted" }, "no download links: " + await problem(resp)));
    return;
  }
  const links = (await resp.json()).data;
  list.replaceChildren(...links.map((f) => el("li", { "class": "mono", "data-name": f.name },
    el("a", { href: f.url, rel: "noreferrer", download: f.name }, f.name), `  ${f.size} bytes  sha256 ${f.sha256.slice(0, 12)}…`)));
}

// --- the key --------------------------------------------------------------------------------

function showKeyState() {
  const key = apiKey();
  $("key-form").hidden = !!key;
  $("key-set").hidden = !key;
  $("main").hidden = !key;
  if (key) $("key-label").textContent = "key " + key.slice(0, 8) + "…";
}

function forgetKey(message) {
  sessionStorage.removeItem(KEY);
  for (const ctl of state.streams.values()) ctl.abort();
  state.streams.clear();
  clearInterval(state.listTimer);
  showKeyState();
  notice(message || "");
}

function start() {
  showKeyState();
  if (!apiKey()) return;
  loadList();
  clearInterval(state.listTimer);
  state.listTimer = setInterval(loadList, LIST_EVERY_MS);
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  notice("");
  start();
});
$("forget-key").addEventListener("click", () => forgetKey("Key forgotten."));
$("status-filter").addEventListener("change", loadList);
start();
