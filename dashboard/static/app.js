// The operators' dashboard: reads the JSON under api/ (relative, so the
// page may live under any prefix) and draws charts with uPlot. No inline
// script or style: the page's Content-Security-Policy forbids them.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
const state = { range: "24h", split: "tier", page: 1, currency: "", tiers: [] };
// The charts drawn, by name: the tests read their data through it.
window.dash = { charts: {} };

const palette = ["#3559e0", "#12a150", "#e07b00", "#b42bd6", "#d92d20", "#0e9384", "#667085", "#c11574"];

// colorOf gives each label (a reason, an outcome, a tier, a model) one
// colour on every chart: served is green, the rest by a hash of their name.
function colorOf(label) {
  if (label === "served") return "#12a150";
  let h = 0;
  for (const c of label) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return palette[h % palette.length];
}

async function api(path, options = {}) {
  const headers = { "X-CSRF-Token": csrf };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch("api/" + path, {
    method: options.method || "GET", headers, credentials: "same-origin",
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || res.status + " " + res.statusText);
  return data;
}

function showError(err) {
  const el = $("error");
  el.textContent = err ? String(err.message || err) : "";
  el.hidden = !err;
}

function fmt(n) { return Number(n).toLocaleString("en-US"); }
function money(micros) { return (micros / 1e6).toFixed(micros && micros < 10000 ? 6 : 2); }
function when(t) { return t ? new Date(t).toLocaleString() : "never"; }
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function fill(tbody, items, render) {
  tbody.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    render(tr, item);
    tbody.appendChild(tr);
  }
}

// draw (re)makes the chart name in el: x is unix seconds, series is
// {label: values}, drawn in opts.order if given, else sorted by label.
// With opts.stack each series is drawn on top of the ones before it:
// the chart's data are the running sums, its legend and raw the values.
function draw(name, el, x, series, opts = {}) {
  let labels = (opts.order || []).filter((l) => l in series);
  if (!labels.length) labels = Object.keys(series).sort();
  let data = [x, ...labels.map((l) => series[l])];
  if (opts.stack) {
    const sum = x.map(() => 0);
    data = [x, ...labels.map((l) => series[l].map((v, i) => (sum[i] += v)))];
  }
  const old = window.dash.charts[name];
  if (old) old.destroy();
  el.replaceChildren();
  const width = Math.max(el.clientWidth, 300);
  const show = (v) => v == null ? "–" : (opts.money ? money(v) : fmt(v));
  // A stack is painted from its top down, each series filled to zero
  // over the ones above it.
  const order = labels.map((l, i) => i);
  if (opts.stack) order.reverse();
  const u = new uPlot({
    width, height: 220,
    scales: { x: { time: true } },
    // Room for the longest tick label (amounts under 0.01 print six
    // decimals, counts grow to millions), which a fixed width would cut.
    axes: [{}, { size: (u, ticks) => 18 + 7.5 * Math.max(3, ...(ticks || []).map((t) => t.length)),
      values: (u, vals) => vals.map(opts.money ? money : fmt) }],
    series: [{}, ...order.map((i) => ({
      label: labels[i], stroke: colorOf(labels[i]), width: opts.stack ? 1 : 2,
      fill: opts.fill === false ? undefined : colorOf(labels[i]) + (opts.stack ? "" : "22"),
      paths: opts.bars ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined,
      value: (u, v, si, at) => opts.stack ? (at == null ? "–" : show(series[labels[i]][at])) : show(v),
    }))],
  }, [x, ...order.map((i) => data[i + 1])], el);
  u.raw = series;
  window.dash.charts[name] = u;
}

// byLabel turns a series of the API into uPlot's: the total when no
// label splits it.
function byLabel(s) {
  return Object.keys(s.by).length ? s.by : { total: s.total };
}

// split is a usage series of the API by the label chosen on the page:
// tier or model.
function split(s) {
  return state.split === "model" ? (s.by_model && Object.keys(s.by_model).length ? s.by_model : { total: s.total }) : byLabel(s);
}

// outcomeOrder puts served first, then the refusals' reasons.
function outcomeOrder(s) {
  return ["served", ...Object.keys(s.by).filter((l) => l !== "served").sort()];
}

async function loadOverview() {
  const o = await api("overview?range=" + state.range);
  state.currency = o.currency || "";
  state.tiers = o.tiers || [];
  const c = o.chart;
  const bars = state.range === "30d";
  for (const el of document.querySelectorAll(".split-label")) el.textContent = state.split;
  draw("requests", $("chart-requests"), c.times, split(c.requests), { bars });
  draw("tokens", $("chart-tokens"), c.times, split(c.tokens), { bars });
  draw("outcomes", $("chart-outcomes"), c.times, byLabel(c.outcomes), { bars, stack: true, order: outcomeOrder(c.outcomes) });
  draw("refused", $("chart-refused"), c.times, byLabel(c.refused), { bars });
  $("cost-figure").hidden = !state.currency;
  if (state.currency) {
    $("cost-currency").textContent = state.currency;
    draw("cost", $("chart-cost"), c.times, split(c.cost), { bars, money: true });
  }
  fill($("models").tBodies[0], o.models, (tr, m) => {
    cell(tr, m.model); cell(tr, fmt(m.requests), "num"); cell(tr, fmt(m.tokens), "num");
    cell(tr, state.currency ? money(m.cost) : "–", "num");
  });
  fill($("top").tBodies[0], o.top, (tr, k) => {
    const td = cell(tr, k.id.startsWith("key_") ? "" : k.id);
    if (k.id.startsWith("key_")) {
      const a = document.createElement("a");
      a.href = "#key/" + encodeURIComponent(k.id);
      a.textContent = k.name || k.id;
      td.appendChild(a);
    }
    cell(tr, k.tier || "–"); cell(tr, fmt(k.requests), "num"); cell(tr, fmt(k.tokens), "num");
    cell(tr, state.currency ? money(k.cost) : "–", "num");
  });
}

async function loadLive() {
  const l = await api("live");
  const last = l.points[l.points.length - 1];
  $("live-rps").textContent = last ? last.requests_per_s.toFixed(1) : "0.0";
  $("live-refused").textContent = last ? last.refused_per_s.toFixed(1) : "0.0";
  $("live-streams").textContent = fmt(l.streams);
  $("live-queued").textContent = fmt(l.queued);
  $("live-wait").textContent = last && last.queue_wait_s > 0 ? (last.queue_wait_s * 1000).toFixed(0) + " ms" : "–";
  fill($("refusals").tBodies[0], Object.entries(l.refused).sort((a, b) => b[1] - a[1]), (tr, [reason, n]) => {
    cell(tr, reason); cell(tr, fmt(n), "num");
  });
  if (!$("view-overview").hidden && l.points.length > 1) {
    const x = l.points.map((p) => p.t);
    const series = { "requests/s": l.points.map((p) => p.requests_per_s), "refused/s": l.points.map((p) => p.refused_per_s) };
    const u = window.dash.charts.live;
    if (u) u.setData([x, series["refused/s"], series["requests/s"]]);
    else draw("live", $("chart-live"), x, series, { fill: false });
  }
}

function limitsText(l) {
  if (!l) return "tier not configured";
  const parts = [];
  const rate = (r) => fmt(r.n) + "/" + r.window;
  if (l.requests) parts.push(rate(l.requests) + " req");
  if (l.tokens) parts.push(rate(l.tokens) + " tok");
  if (l.concurrent) parts.push(l.concurrent + " at once");
  if (l.quota) parts.push(fmt(l.quota.n) + " tok/" + l.quota.period);
  if (l.budget) parts.push(money(l.budget.n) + " " + (state.currency || "") + "/" + l.budget.period);
  if (l.max_tokens) parts.push("max_tokens " + fmt(l.max_tokens));
  return parts.join(", ") || "unlimited";
}

function usageBar(td, s, isMoney) {
  const wrap = document.createElement("div");
  const label = document.createElement("div");
  const frac = s.limit > 0 ? Math.min(s.used / s.limit, 1) : 0;
  wrap.className = "usage" + (frac >= 0.9 ? " high" : "");
  const bar = document.createElement("div");
  bar.style.width = (frac * 100).toFixed(1) + "%";
  wrap.appendChild(bar);
  label.className = "muted";
  label.textContent = (isMoney ? money(s.used) + " / " + money(s.limit) : fmt(s.used) + " / " + fmt(s.limit)) + " per " + s.period;
  td.append(wrap, label);
}

async function loadKeys() {
  const params = new URLSearchParams({ q: $("q").value, tier: $("tier-filter").value, sort: $("sort").value, page: state.page });
  if ($("desc").checked) params.set("desc", "1");
  const r = await api("keys?" + params);
  state.currency = r.currency || "";
  setTiers(r.tiers);
  $("keys-total").textContent = fmt(r.total) + " keys";
  const pages = Math.max(1, Math.ceil(r.total / r.page_size));
  $("page").textContent = "page " + r.page + " of " + pages;
  $("prev").disabled = r.page <= 1;
  $("next").disabled = r.page >= pages;
  fill($("keys").tBodies[0], r.keys, (tr, k) => {
    tr.dataset.id = k.id;
    const name = cell(tr, "");
    const a = document.createElement("a");
    a.href = "#key/" + encodeURIComponent(k.id);
    a.textContent = k.name;
    const id = document.createElement("div");
    id.className = "muted";
    id.textContent = k.id;
    name.append(a, id);
    const tier = cell(tr, k.tier);
    if (k.mint && k.mint.length) {
      const mint = document.createElement("div");
      mint.className = "mint";
      mint.textContent = "mints " + k.mint.join(", ");
      tier.append(mint);
    }
    cell(tr, k.state, "state-" + k.state);
    cell(tr, limitsText(k.limits));
    cell(tr, when(k.last_used));
    cell(tr, fmt(k.month.tokens) + " tok" + (state.currency ? ", " + money(k.month.cost) + " " + state.currency : ""), "num");
    const bars = cell(tr, "");
    if (k.quota) usageBar(bars, k.quota, false);
    if (k.budget) usageBar(bars, k.budget, true);
    const actions = cell(tr, "");
    if (k.state !== "revoked") {
      button(actions, "Rotate", () => change(k, "rotate"));
      button(actions, "Revoke", () => change(k, "revoke")).classList.add("danger");
    }
  });
}

function button(parent, text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.dataset.action = text.toLowerCase();
  b.addEventListener("click", onClick);
  parent.appendChild(b);
  return b;
}

function setTiers(tiers) {
  for (const sel of [$("tier-filter"), $("new-tier")]) {
    const keep = sel.value;
    const first = sel.id === "tier-filter" ? [["", "All tiers"]] : [];
    sel.replaceChildren(...first.concat(tiers.map((t) => [t, t])).map(([v, t]) => new Option(t, v)));
    sel.value = keep || (sel.id === "new-tier" ? tiers[0] || "" : "");
  }
}

function showSecret(k) {
  $("secret-id").textContent = k.name + " (" + k.id + ")";
  $("secret-value").textContent = k.secret;
  $("secret").hidden = false;
}

async function change(k, what) {
  if (!confirm(what === "revoke" ? "Revoke " + k.name + "? Its callers are refused within a second." : "Rotate " + k.name + "? Its current secret stops working.")) return;
  try {
    const out = what === "revoke"
      ? await api("keys/" + encodeURIComponent(k.id), { method: "DELETE" })
      : await api("keys/" + encodeURIComponent(k.id) + "/rotate", { method: "POST", body: {} });
    if (out.secret) showSecret(out);
    showError(null);
    await loadKeys();
  } catch (err) { showError(err); }
}

async function loadKey(id) {
  const k = await api("keys/" + encodeURIComponent(id));
  state.currency = k.currency || "";
  $("key-title").textContent = k.name + " (" + k.tier + ")";
  $("key-meta").textContent = k.id + " · " + k.state + " · created " + when(k.created) + " · last used " + when(k.last_used);
  draw("key-recent", $("chart-key-recent"), k.recent.times, byLabel(k.recent.tokens), { bars: true });
  draw("key-outcomes", $("chart-key-outcomes"), k.recent.times, byLabel(k.recent.outcomes), { stack: true, order: outcomeOrder(k.recent.outcomes) });
  draw("key-days", $("chart-key-days"), k.days.times, byLabel(k.days.tokens), { bars: true });
  draw("key-refused", $("chart-key-refused"), k.days.times, byLabel(k.days.refused), { bars: true });
  fill($("key-refusals").tBodies[0], k.refusals, (tr, r) => { cell(tr, r.reason); cell(tr, fmt(r.count), "num"); });
  fill($("key-models").tBodies[0], k.models, (tr, m) => {
    cell(tr, m.model); cell(tr, fmt(m.requests), "num"); cell(tr, fmt(m.tokens), "num");
    cell(tr, state.currency ? money(m.cost) : "–", "num");
  });
  $("key-limits").textContent = limitsText(k.limits) + (k.settings ? "\nown settings: " + JSON.stringify(k.settings) : "");
  $("settings-json").value = JSON.stringify(k.settings || {}, null, 0);
  $("settings").dataset.id = k.id;
}

// route shows the view the location's hash names.
async function route() {
  const hash = location.hash.slice(1) || "overview";
  const [view, id] = hash.split("/");
  for (const v of ["overview", "keys", "key"]) $("view-" + v).hidden = v !== view;
  try {
    if (view === "overview") await loadOverview();
    else if (view === "keys") await loadKeys();
    else if (view === "key") await loadKey(decodeURIComponent(id));
    showError(null);
  } catch (err) { showError(err); }
}

function wire() {
  for (const b of document.querySelectorAll(".toggle button")) {
    b.addEventListener("click", () => {
      const group = b.closest(".toggle");
      if (b.dataset.range) state.range = b.dataset.range;
      if (b.dataset.split) state.split = b.dataset.split;
      for (const o of group.querySelectorAll("button")) o.classList.toggle("on", o === b);
      loadOverview().catch(showError);
    });
  }
  let timer;
  $("q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { state.page = 1; loadKeys().catch(showError); }, 200); });
  for (const id of ["tier-filter", "sort", "desc"]) $(id).addEventListener("change", () => { state.page = 1; loadKeys().catch(showError); });
  $("search").addEventListener("submit", (e) => e.preventDefault());
  $("prev").addEventListener("click", () => { state.page--; loadKeys().catch(showError); });
  $("next").addEventListener("click", () => { state.page++; loadKeys().catch(showError); });
  $("create").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const k = await api("keys", { method: "POST", body: { name: $("new-name").value, tier: $("new-tier").value, expires: $("new-expires").value } });
      showSecret(k);
      $("new-name").value = "";
      showError(null);
      await loadKeys();
    } catch (err) { showError(err); }
  });
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("secret-value").textContent).then(() => { $("copy").textContent = "Copied"; }, showError));
  $("secret-done").addEventListener("click", () => { $("secret-value").textContent = ""; $("secret").hidden = true; $("copy").textContent = "Copy"; });
  $("settings").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("keys/" + encodeURIComponent($("settings").dataset.id), { method: "PATCH", body: JSON.parse($("settings-json").value || "{}") });
      await loadKey($("settings").dataset.id);
      showError(null);
    } catch (err) { showError(err); }
  });
  window.addEventListener("hashchange", route);
}

wire();
route();
loadLive().catch(showError);
setInterval(() => loadLive().catch(showError), 2000);
