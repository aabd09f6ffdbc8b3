// galaxalign-batch label: the page. Plain JS, no build step, no external resources.
// Everything shown comes from the JSON API and goes into the DOM as text (never as HTML).
"use strict";

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token") || "";
const N_AHEAD = 6;  // the current galaxy + 5 upcoming thumbnails

function newSession() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
// one session per tab, kept across reloads of that tab (undo works after a reload)
const SESSION = sessionStorage.getItem("galaxalign-label-session") || newSession();
sessionStorage.setItem("galaxalign-label-session", SESSION);

const state = { classes: [], marks: [], items: [], busy: false, rankedBy: -1, headVersion: -1 };

function $(id) { return document.getElementById(id); }
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}
async function api(path, body) {
  const opts = { headers: {}, cache: "no-store" };
  if (TOKEN) opts.headers["X-Token"] = TOKEN;
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
  return data;
}
function cutoutURL(row) { return withToken("/api/cutout?row=" + encodeURIComponent(Number(row))); }
function say(text, isError) {
  const m = $("message");
  m.textContent = text || "";
  m.className = isError ? "error" : "";
}
function fmt(x, digits) { return (typeof x === "number" && isFinite(x)) ? x.toFixed(digits) : "–"; }

// ---- rendering ---------------------------------------------------------------------------------------------
function renderButtons() {
  const box = $("buttons");
  box.replaceChildren();
  state.classes.forEach((c, i) => {
    const b = el("button", null, "class");
    b.type = "button";
    b.dataset.label = c;
    if (i < 9) { b.append(el("kbd", String(i + 1)), " "); }
    b.append(c);
    b.addEventListener("click", () => give({ label: c }));
    box.append(b);
  });
}

function renderCurrent() {
  const cur = state.items[0];
  const img = $("cutout");
  if (!cur) {
    img.removeAttribute("src");
    $("object-id").textContent = "nothing left to label";
    $("position").textContent = "";
    $("extra").textContent = "";
  } else {
    img.src = cutoutURL(cur.row);
    img.alt = "cutout of " + cur.object_id;
    $("object-id").textContent = cur.object_id;
    $("position").textContent = "RA " + fmt(cur.ra, 5) + "°  Dec " + fmt(cur.dec, 5) + "°";
    const extra = ["tile " + cur.tile, "row " + cur.row];
    if (cur.masked_fraction > 0) extra.push("masked " + Math.round(cur.masked_fraction * 100) + "%");
    $("extra").textContent = extra.join(" · ");
  }
  document.querySelectorAll("#buttons button, #actions button[data-mark]").forEach((b) => { b.disabled = !cur || state.busy; });
  $("btn-undo").disabled = state.busy;
  const up = $("upcoming");
  up.replaceChildren();
  for (const it of state.items.slice(1)) {
    const f = el("figure");
    const i = el("img");
    i.src = cutoutURL(it.row);
    i.alt = "upcoming " + it.object_id;
    i.width = 96; i.height = 96;
    f.append(i, el("figcaption", it.object_id));
    up.append(f);
  }
}

function renderState(s) {
  $("task").textContent = "task: " + s.task;
  $("store").textContent = s.store + " · " + s.rows + " rows" + (s.model ? " · " + s.model : "");
  document.title = s.task + " · galaxalign-batch label";
  // counts
  const body = $("counts").tBodies[0];
  body.replaceChildren();
  const max = Math.max(1, ...Object.values(s.counts));
  const addRow = (name, n, cls) => {
    const tr = el("tr", null, cls);
    tr.dataset.name = name;
    const bar = el("td", null, "bar");
    const span = el("span");
    span.style.width = (100 * n / max).toFixed(1) + "%";
    bar.append(span);
    tr.append(el("td", name), el("td", n, "n"), bar);
    body.append(tr);
  };
  s.classes.forEach((c) => addRow(c, s.counts[c] || 0, "class"));
  s.marks.forEach((m) => addRow(m, s.counts[m] || 0, "mark"));
  $("totals").textContent = s.labelled + " labelled, " + s.marked + " marked, " + s.remaining + " of " + s.rows + " rows left";
  // head
  const h = s.head;
  const dl = $("head");
  dl.replaceChildren();
  const add = (k, v) => dl.append(el("dt", k), el("dd", v));
  add("version", h.version ? "v" + h.version + " (" + h.n_labels + " labels)" : "none yet");
  add("state", h.state + (h.pending ? " · " + h.pending + " new label(s)" : ""));
  const v = h.validation;
  if (v) {
    if (v.accuracy !== undefined) add("accuracy", fmt(v.accuracy, 3));
    if (v.auc !== undefined && v.auc !== null) add("AUC", fmt(v.auc, 3));
    add("validated", (v.method || "") + (v.n !== undefined ? " on " + v.n : ""));
  } else {
    add("validation", h.version ? "too few labels to estimate" : "–");
  }
  add("queue", h.ranked_by ? "uncertainty (head v" + h.ranked_by + ")" : "first round: embedding clusters");
  const st = $("head-status");
  st.className = "status " + h.state;
  st.textContent = h.error ? "retraining failed: " + h.error
    : h.message ? h.message
    : h.state === "training" ? "retraining the head…"
    : h.state === "scoring" ? "re-ranking the queue…"
    : h.version ? "head v" + h.version + " ready; retrains every " + h.every + " labels" : "retrains every " + h.every + " labels";
  // recent labels
  const ol = $("recent");
  ol.replaceChildren();
  for (const r of s.recent) {
    const li = el("li");
    li.dataset.objectId = r.object_id;
    li.append(el("span", r.object_id, "mono"), el("span", r.kind === "class" ? r.label : r.kind));
    ol.append(li);
  }
  $("export").href = withToken("/api/export.csv");
  const reranked = state.headVersion !== -1 && h.ranked_by !== state.headVersion;
  state.headVersion = h.ranked_by;
  if (reranked && !state.busy) loadNext().catch((e) => say(e.message, true));  // refresh the upcoming galaxies
}

// ---- actions -----------------------------------------------------------------------------------------------
async function loadState() {
  try { renderState(await api("/api/state")); } catch (e) { say("cannot reach the server: " + e.message, true); }
}
async function loadNext() {
  const r = await api("/api/next", { session: SESSION, n: N_AHEAD });  // POST: it leases rows
  state.items = r.items;
  renderCurrent();
}
async function give(choice) {
  const cur = state.items[0];
  if (!cur || state.busy) return;
  state.busy = true;
  renderCurrent();
  try {
    const r = await api("/api/label", Object.assign({ session: SESSION, object_id: cur.object_id }, choice));
    say("saved: " + cur.object_id + " → " + (r.label.kind === "class" ? r.label.label : r.label.kind));
    state.items.shift();
    await loadNext();
  } catch (e) {
    say("not saved: " + e.message, true);
  } finally {
    state.busy = false;
    renderCurrent();
    loadState();
  }
}
async function undo() {
  if (state.busy) return;
  state.busy = true;
  renderCurrent();
  try {
    const r = await api("/api/undo", { session: SESSION });
    say(r.undone ? "undone: " + r.undone.object_id : "nothing to undo in this tab");
    await loadNext();
  } catch (e) {
    say("undo failed: " + e.message, true);
  } finally {
    state.busy = false;
    renderCurrent();
    loadState();
  }
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
  const k = ev.key;
  if (k >= "1" && k <= "9") {
    const c = state.classes[Number(k) - 1];
    if (c !== undefined) { ev.preventDefault(); give({ label: c }); }
  } else if (k === "n" || k === "N") { ev.preventDefault(); give({ mark: "not-sure" }); }
  else if (k === "a" || k === "A") { ev.preventDefault(); give({ mark: "artefact" }); }
  else if (k === "u" || k === "U" || k === "Backspace") { ev.preventDefault(); undo(); }
}

async function start() {
  try {
    const s = await api("/api/state");
    state.classes = s.classes;
    state.marks = s.marks;
    renderButtons();
    renderState(s);
    await loadNext();
    say("ready");
  } catch (e) {
    say("cannot start: " + e.message, true);
    return;
  }
  document.addEventListener("keydown", onKey);
  document.querySelectorAll("#actions button[data-mark]").forEach((b) => b.addEventListener("click", () => give({ mark: b.dataset.mark })));
  $("btn-undo").addEventListener("click", undo);
  setInterval(loadState, 2000);
}

document.addEventListener("DOMContentLoaded", start);
