"""The dashboard's page: one HTML file with its CSS and JavaScript inline, reading `data.js` beside it.

Nothing is loaded from anywhere else (no fonts, no CDN), so it works from file:// and on the Hub. Kept
here as a string so the package needs no package-data configuration. Text from the data (tokens, hook
and model names) only ever goes into the page through `textContent`, never as HTML.
"""

from __future__ import annotations

import html

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --accent: #e8590c; --bg: #fafbfc; --sel: #fff4e6; }
* { box-sizing: border-box; }
body { margin: 0; height: 100vh; display: flex; flex-direction: column; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { padding: 12px 20px; border-bottom: 1px solid var(--line); background: #fff; }
h1 { font-size: 18px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 0 0 6px; }
h3 { font-size: 13px; margin: 18px 0 6px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
#summary { margin: 0; color: var(--muted); }
main { display: grid; grid-template-columns: minmax(380px, 44%) 1fr; flex: 1; min-height: 0; }
#list-pane { border-right: 1px solid var(--line); display: flex; flex-direction: column; min-height: 0; background: #fff; }
#controls { padding: 10px 12px; display: flex; gap: 10px; align-items: center; border-bottom: 1px solid var(--line); }
#search { flex: 1; padding: 6px 9px; border: 1px solid #cfd4dc; border-radius: 6px; font: inherit; }
#count { color: var(--muted); white-space: nowrap; }
#table-wrap { overflow: auto; flex: 1; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 4px 8px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { position: sticky; top: 0; background: #f2f4f7; cursor: pointer; user-select: none; font-weight: 600; }
th.sorted::after { content: " \25BC"; font-size: 10px; }
th.sorted.asc::after { content: " \25B2"; }
td.tops, th.tops { text-align: left; white-space: normal; }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #f5f7fa; }
tbody tr.sel { background: var(--sel); }
.chip { display: inline-block; white-space: pre; background: #eef1f5; border-radius: 4px; padding: 0 4px; margin: 1px 2px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
#pager { padding: 8px 12px; display: flex; gap: 10px; align-items: center; border-top: 1px solid var(--line); }
button { font: inherit; padding: 3px 10px; border: 1px solid #cfd4dc; border-radius: 6px; background: #fff; cursor: pointer; }
button:disabled { opacity: .4; cursor: default; }
#detail { padding: 14px 22px; overflow: auto; }
.hint, .muted { color: var(--muted); }
.stats { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 4px 0; }
.stats b { font-weight: 600; }
.bar-row { display: grid; grid-template-columns: minmax(120px, 260px) 1fr 54px; gap: 8px; align-items: center; margin: 2px 0; }
.bar-label { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-size: 12px; }
.bar-track { background: #eef1f5; height: 12px; border-radius: 3px; }
.bar-fill { background: var(--accent); height: 12px; border-radius: 3px; }
.bar-value { text-align: right; font-size: 12px; }
svg text { font-size: 10px; fill: var(--muted); }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; padding: 5px 8px; border: 1px solid var(--line); border-radius: 6px; margin: 4px 0; background: #fff; line-height: 1.9; }
.ctx .val { color: var(--muted); margin-right: 8px; font-size: 11px; }
.tok { white-space: pre; border-radius: 2px; padding: 1px 0; margin-right: 1px; box-shadow: inset 0 0 0 1px #edf0f3; }
.tok.peak { box-shadow: inset 0 -2px 0 var(--fg); }
.promoted { display: flex; flex-wrap: wrap; gap: 4px; }
</style>
</head>
<body>
<header><h1 id="title"></h1><p id="summary"></p></header>
<main>
<section id="list-pane">
  <div id="controls"><input id="search" type="search" placeholder="Search: latent index or top token" autocomplete="off"><span id="count"></span></div>
  <div id="table-wrap"><table id="latents"><thead><tr></tr></thead><tbody></tbody></table></div>
  <div id="pager"><button id="prev">&#8249; prev</button><span id="page"></span><button id="next">next &#8250;</button></div>
</section>
<section id="detail"><p class="hint">Click a latent to see its contexts.</p></section>
</main>
<script src="data.js"></script>
<script>
(function () {
"use strict";
const D = window.DASHBOARD_DATA;
if (!D) { document.getElementById("detail").textContent = "data.js is missing: keep it next to index.html."; return; }
const C = D.columns, N = C.density.length, PAGE = 200;
const state = { key: "density", dir: -1, query: "", page: 0, rows: [], current: null };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 0.001 && a < 1e4 ? String(+x.toPrecision(3)) : x.toExponential(2);
}
const pct = (x) => (100 * x).toFixed(1) + "%";
const tops = (i) => D.top_tokens[i] || [];

const COLS = [["index", "latent"], ["density", "density"], ["max", "max act"], ["span", "layer span"]];
if (C.model_share) D.model_names.forEach((m, j) => COLS.push(["share" + j, "share " + m]));

function value(i, key) {
  if (key === "index") return i;
  if (key.startsWith("share")) return C.model_share[+key.slice(5)][i];
  return C[key][i];
}
function matches(i, q) {
  if (!q) return true;
  if (/^\d+$/.test(q) && String(i) === q) return true;
  return tops(i).some((t) => t.toLowerCase().includes(q));
}

function header() {
  const tr = document.querySelector("#latents thead tr");
  for (const [key, label] of COLS) {
    const th = el("th", null, label);
    th.dataset.key = key;
    th.addEventListener("click", () => {
      state.dir = state.key === key ? -state.dir : (key === "index" ? 1 : -1);
      state.key = key;
      state.page = 0;
      refresh();
    });
    tr.append(th);
  }
  tr.append(el("th", "tops", "top tokens"));
}

function refresh() {
  const q = state.query.trim().toLowerCase();
  const rows = [];
  for (let i = 0; i < N; i++) if (matches(i, q)) rows.push(i);
  rows.sort((a, b) => (value(a, state.key) - value(b, state.key)) * state.dir || a - b);
  state.rows = rows;
  state.page = Math.min(state.page, Math.max(0, Math.ceil(rows.length / PAGE) - 1));
  renderList();
}

function renderList() {
  const body = document.querySelector("#latents tbody");
  const start = state.page * PAGE, frag = document.createDocumentFragment();
  for (const i of state.rows.slice(start, start + PAGE)) {
    const tr = el("tr");
    tr.dataset.latent = i;
    tr.append(el("td", null, String(i)), el("td", null, fmt(C.density[i])), el("td", null, fmt(C.max[i])),
              el("td", null, String(C.span[i])));
    if (C.model_share) C.model_share.forEach((col) => tr.append(el("td", null, pct(col[i]))));
    const td = el("td", "tops");
    for (const t of tops(i)) td.append(el("span", "chip", t));
    tr.append(td);
    if (String(i) === state.current) tr.classList.add("sel");
    frag.append(tr);
  }
  body.replaceChildren(frag);
  document.getElementById("count").textContent = state.rows.length + " of " + N + " latents";
  const pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
  document.getElementById("page").textContent = "page " + (state.page + 1) + " / " + pages;
  document.getElementById("prev").disabled = state.page === 0;
  document.getElementById("next").disabled = state.page >= pages - 1;
  document.querySelectorAll("#latents th[data-key]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === state.key);
    th.classList.toggle("asc", th.dataset.key === state.key && state.dir > 0);
  });
}

function bars(parent, labels, values) {
  labels.forEach((label, j) => {
    const row = el("div", "bar-row"), track = el("div", "bar-track"), fill = el("div", "bar-fill");
    fill.style.width = (100 * Math.max(0, Math.min(1, values[j]))).toFixed(1) + "%";
    track.append(fill);
    const name = el("span", "bar-label", label);
    name.title = label;
    row.append(name, track, el("span", "bar-value", pct(values[j])));
    parent.append(row);
  });
}

function histogram(parent, hist) {
  const NS = "http://www.w3.org/2000/svg", W = 420, H = 130, pad = 18;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + pad);
  svg.setAttribute("id", "histogram");
  // bins past the last nonzero one are left out: the range is a power of two above the max
  let n = hist.counts.length;
  while (n > 1 && hist.counts[n - 1] === 0) n--;
  const counts = hist.counts.slice(0, n), step = hist.hi / hist.counts.length, hi = step * n;
  const top = Math.max(1, ...counts), bw = W / n;
  counts.forEach((c, j) => {
    const r = document.createElementNS(NS, "rect"), h = (H - 4) * c / top;
    r.setAttribute("x", j * bw + 0.5); r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("y", H - h); r.setAttribute("height", h); r.setAttribute("fill", "#e8590c");
    const t = document.createElementNS(NS, "title");
    t.textContent = c + " tokens in [" + fmt(step * j) + ", " + fmt(step * (j + 1)) + ")";
    r.append(t);
    svg.append(r);
  });
  [[0, "0", "start"], [W, fmt(hi), "end"]].forEach(([x, label, anchor]) => {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 13); t.setAttribute("text-anchor", anchor);
    t.textContent = label;
    svg.append(t);
  });
  parent.append(svg);
}

function contexts(parent, list, peak) {
  for (const c of list) {
    const div = el("div", "ctx");
    div.append(el("span", "val", fmt(c.v)));
    c.t.forEach((id, j) => {
      const span = el("span", "tok", D.vocab[id]);
      const alpha = peak > 0 ? Math.max(0, Math.min(1, c.a[j] / peak)) : 0;
      span.style.background = "rgba(232, 89, 12, " + alpha.toFixed(3) + ")";
      span.dataset.act = c.a[j];
      span.title = "activation " + fmt(c.a[j]);
      if (j === c.at) span.classList.add("peak");
      div.append(span);
    });
    div.title = "sequence " + c.seq + ", position " + c.pos;
    parent.append(div);
  }
}

function renderDetail(i) {
  const pane = document.getElementById("detail");
  pane.replaceChildren();
  if (!(i >= 0 && i < N)) { pane.append(el("p", "hint", "Click a latent to see its contexts.")); return; }
  pane.append(el("h2", null, "Latent " + i));
  const stats = el("div", "stats");
  [["density", pct(C.density[i])], ["max activation", fmt(C.max[i])], ["mean when active", fmt(C.mean[i])],
   ["layer span", String(C.span[i])]].forEach(([k, v]) => {
    const s = el("span", null, k + " "); s.append(el("b", null, v)); stats.append(s);
  });
  pane.append(stats);
  const d = D.details[i];
  if (!d) {
    pane.append(el("p", "muted", C.density[i] === 0 ? "This latent never fired on the eval tokens." :
      "Details are kept for the " + Object.keys(D.details).length + " most frequent latents; this one is not among them."));
    return;
  }
  pane.append(el("h3", null, "Decoder norm share per output hook"));
  bars(pane, D.hooks_out, d.shares);
  if (C.model_share) {
    pane.append(el("h3", null, "Decoder norm share per model"));
    bars(pane, D.model_names, C.model_share.map((col) => col[i]));
  }
  pane.append(el("h3", null, "Activation histogram (tokens where it fired)"));
  histogram(pane, d.hist);
  if (d.promoted) {
    pane.append(el("h3", null, "Tokens its decoder promotes (W_dec \u00b7 W_U at " + D.promoted_hook + ")"));
    const box = el("div", "promoted");
    box.id = "promoted";
    for (const [id, v] of d.promoted) {
      const chip = el("span", "chip", D.vocab[id]);
      chip.title = "logit " + fmt(v);
      box.append(chip);
    }
    pane.append(box);
  }
  pane.append(el("h3", null, "Top activations (" + d.contexts.length + ")"));
  const box = el("div"); box.id = "contexts";
  contexts(box, d.contexts, C.max[i]);
  pane.append(box);
}

function route() {
  const m = /latent=(\d+)/.exec(location.hash);
  state.current = m ? m[1] : null;
  renderDetail(m ? +m[1] : -1);
  document.querySelectorAll("#latents tbody tr").forEach((tr) => tr.classList.toggle("sel", tr.dataset.latent === state.current));
}

document.getElementById("title").textContent = D.title;
document.getElementById("summary").textContent = D.d_sae + " latents \u00b7 " + D.n_tokens +
  " eval tokens \u00b7 output hooks: " + D.hooks_out.join(", ");
header();
document.getElementById("search").addEventListener("input", (e) => { state.query = e.target.value; state.page = 0; refresh(); });
document.getElementById("prev").addEventListener("click", () => { state.page--; renderList(); });
document.getElementById("next").addEventListener("click", () => { state.page++; renderList(); });
document.querySelector("#latents tbody").addEventListener("click", (e) => {
  const tr = e.target.closest("tr");
  if (tr) location.hash = "latent=" + tr.dataset.latent;
});
window.addEventListener("hashchange", route);
refresh();
route();
})();
</script>
</body>
</html>
"""


def render_page(title: str) -> str:
    """index.html with `title` (escaped) in its <title>; the rest of the page comes from data.js."""
    return PAGE.replace("__TITLE__", html.escape(title))
