// The Tide dashboard: draws the view the path names from the head's JSON
// endpoints (/api/list/KIND with the same filters and paging as `tide
// list`, /api/logs), refreshing every 2 s. Plain JS, charts in hand-made
// SVG; no build step, nothing fetched from anywhere but the head.
"use strict";

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");  // from another machine: the head's dashboard.token
const REFRESH_MS = 2000;
const main = document.getElementById("main");
const status = document.getElementById("status");

function api(path, q) {
  const u = new URLSearchParams(q || {});
  if (TOKEN) u.set("token", TOKEN);
  const s = u.toString();
  return fetch(path + (s ? "?" + s : ""), {cache: "no-store"}).then(async (r) => {
    const body = await r.json().catch(() => ({error: "HTTP " + r.status}));
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    return body;
  });
}

function list(kind, filters, limit, offset) {
  const u = new URLSearchParams();
  for (const f of filters || []) u.append("filter", f);
  u.set("limit", String(limit || 100));
  u.set("offset", String(offset || 0));
  if (TOKEN) u.set("token", TOKEN);
  return fetch("/api/list/" + kind + "?" + u.toString(), {cache: "no-store"}).then(async (r) => {
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    return body;
  });
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}

function human(b) {
  if (b === undefined || b === null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(b < 10 ? 2 : 1) : String(b)) + " " + u[i];
}

function cell(v) {
  if (v === undefined || v === null) return "";
  if (typeof v === "object") return JSON.stringify(v);
  if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(3);
  return String(v);
}

// -- Table views ------------------------------------------------------------

const VIEWS = {
  nodes: {title: "Nodes", cols: ["node_id", "name", "address", "state", "workers", "actors", "tasks_running",
    "tasks_queued", "store_used", "store_capacity", "spilled_bytes", "resources", "available"],
    bytes: ["store_used", "store_capacity", "spilled_bytes"]},
  actors: {title: "Actors", cols: ["actor_id", "state", "name", "namespace", "node", "pid", "restarts",
    "queued_calls", "death_reason"]},
  tasks: {title: "Tasks", cols: ["task_id", "state", "type", "name", "method", "node", "pid", "running_s",
    "wait_reason", "error"], detail: (r) => r.traceback || r.wait_reason ?
      [r.error ? "error: " + r.error : null, r.traceback ? "remote traceback:\n" + r.traceback : null,
       r.wait_reason ? "waits: " + r.wait_reason : null].filter(Boolean).join("\n\n") : null},
  objects: {title: "Objects", cols: ["object_id", "state", "size", "where", "node", "refs", "pins"], bytes: ["size"]},
  "placement-groups": {title: "Placement groups", cols: ["pg_id", "name", "state", "strategy", "bundles", "nodes"]},
  jobs: {title: "Jobs", cols: ["id", "status", "pid", "exit_code", "script"], logs: true},
};

const state = {offset: 0, limit: 50, filters: [], open: null, timer: null, log: null};

function tableView(kind) {
  const v = VIEWS[kind];
  const filterBox = el("input", {id: "filter", placeholder: "key=value, key=value (e.g. state=ALIVE)",
    value: state.filters.join(", ")});
  const apply = () => {
    state.filters = filterBox.value.split(",").map((s) => s.trim()).filter(Boolean);
    state.offset = 0;
    refresh();
  };
  filterBox.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
  const info = el("span", {id: "info"});
  const err = el("span", {id: "error", class: "error"});
  const prev = el("button", {id: "prev", onclick: () => { state.offset = Math.max(0, state.offset - state.limit); refresh(); }}, "◀ prev");
  const next = el("button", {id: "next", onclick: () => { state.offset += state.limit; refresh(); }}, "next ▶");
  const thead = el("tr", {}, ...v.cols.map((c) => el("th", {}, c)));
  const tbody = el("tbody", {id: "rows"});
  const logBox = el("div", {id: "logbox"});
  main.replaceChildren(el("h1", {}, v.title),
    el("div", {class: "controls"}, filterBox, el("button", {onclick: apply}, "filter"), prev, next, info, err),
    el("table", {id: "table"}, el("thead", {}, thead), tbody), logBox);

  async function refresh() {
    try {
      const res = await list(kind, state.filters, state.limit, state.offset);
      err.textContent = "";
      const first = res.rows.length ? res.offset + 1 : 0;
      info.replaceChildren("rows ", String(first), "–", String(res.offset + res.rows.length), " of ",
        el("span", {id: "matched"}, String(res.matched)), " matching (", el("span", {id: "total"}, String(res.total)),
        " in all)");
      prev.disabled = res.offset === 0;
      next.disabled = !res.truncated;
      const rows = [];
      for (const r of res.rows) {
        const id = r[v.cols[0]];
        const tr = el("tr", {"data-id": id, class: v.detail || v.logs ? "clickable" : ""},
          ...v.cols.map((c) => {
            let s = v.bytes && v.bytes.includes(c) ? human(r[c]) : cell(r[c]);
            if (s.length > 120) s = s.slice(0, 117) + "...";
            const td = el("td", {class: (c === "state" || c === "status" ? "state-" + r[c] : "") + (c === "error" ? " err" : "")}, s);
            return td;
          }));
        if (v.detail || v.logs) tr.addEventListener("click", () => {
          state.open = state.open === id ? null : id;
          if (v.logs) openLog(kind, id, logBox);
          refresh();
        });
        rows.push(tr);
        if (v.detail && state.open === id) {
          const d = v.detail(r);
          if (d) rows.push(el("tr", {class: "detail"}, el("td", {colspan: String(v.cols.length)}, el("pre", {}, d))));
        }
      }
      tbody.replaceChildren(...rows);
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      err.textContent = String(e.message || e);
    }
  }
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
}

// A job's output, followed while it runs.
function openLog(kind, id, box) {
  if (state.log) clearInterval(state.log);
  if (state.open !== id) { box.replaceChildren(); return; }
  const pre = el("pre", {id: "log"});
  box.replaceChildren(el("h1", {}, "Output of " + id), pre);
  let off = 0;
  const pull = async () => {
    try {
      const r = await api("/api/logs", {kind: kind === "jobs" ? "job" : kind, id: id, offset: String(off)});
      if (r.data) { pre.append(r.data); pre.scrollTop = pre.scrollHeight; }
      off = r.offset;
      if (!r.more && !r.data) clearInterval(state.log);
    } catch (e) { pre.append("\n[" + e.message + "]\n"); clearInterval(state.log); }
  };
  pull();
  state.log = setInterval(pull, 1000);
}

// -- Overview -----------------------------------------------------------------

const history = [];  // {running, queued} per refresh, for the chart

function spark(points, keys, colors, w, h) {
  const max = Math.max(1, ...points.flatMap((p) => keys.map((k) => p[k])));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h + 16);
  svg.setAttribute("id", "chart");
  keys.forEach((k, i) => {
    const pl = document.createElementNS(svg.namespaceURI, "polyline");
    pl.setAttribute("fill", "none");
    pl.setAttribute("stroke", colors[i]);
    pl.setAttribute("stroke-width", "2");
    pl.setAttribute("points", points.map((p, j) =>
      `${(j / Math.max(1, points.length - 1)) * (w - 4) + 2},${h - (p[k] / max) * (h - 4) + 2}`).join(" "));
    svg.append(pl);
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", 4 + i * 110);
    t.setAttribute("y", h + 14);
    t.setAttribute("fill", colors[i]);
    t.textContent = `${k} (max ${max})`;
    svg.append(t);
  });
  return svg;
}

function overview() {
  main.replaceChildren(el("h1", {}, "Cluster"), el("div", {class: "cards", id: "cards"}),
    el("h1", {}, "Tasks over the last minutes"), el("div", {id: "chartbox"}),
    el("h1", {}, "Object store by node"), el("div", {id: "stores"}));
  async function refresh() {
    try {
      const count = async (kind, f) => (await list(kind, f || [], 1, 0)).matched;
      const [nodes, actors, running, queued, waiting, failed, objects, pgs, jobs] = await Promise.all([
        list("nodes", [], 1000, 0), count("actors", ["state=ALIVE"]), count("tasks", ["state=RUNNING"]),
        count("tasks", ["state=QUEUED"]), count("tasks", ["state=WAITING_DEPS"]), count("tasks", ["state=FAILED"]),
        count("objects"), count("placement-groups", ["state=CREATED"]), count("jobs", ["status=RUNNING"])]);
      const card = (id, n, label, href) => el("a", {href: href + (TOKEN ? "?token=" + TOKEN : ""), style: "text-decoration:none;color:inherit"},
        el("div", {class: "card"}, el("div", {class: "n", id: "count-" + id}, String(n)), el("div", {class: "l"}, label)));
      document.getElementById("cards").replaceChildren(
        card("nodes", nodes.matched, "nodes alive", "/nodes"), card("actors", actors, "actors alive", "/actors"),
        card("running", running, "tasks running", "/tasks"), card("queued", queued + waiting, "tasks waiting", "/tasks"),
        card("failed", failed, "tasks failed (kept)", "/tasks"), card("objects", objects, "objects", "/objects"),
        card("pgs", pgs, "placement groups", "/placement-groups"), card("jobs", jobs, "jobs running", "/jobs"));
      history.push({running: running, queued: queued + waiting});
      if (history.length > 150) history.shift();
      document.getElementById("chartbox").replaceChildren(spark(history, ["running", "queued"], ["#17703a", "#9a6700"], 600, 120));
      document.getElementById("stores").replaceChildren(el("table", {}, el("tbody", {},
        ...nodes.rows.map((n) => el("tr", {}, el("td", {}, n.node_id + " " + (n.name || "")),
          el("td", {}, el("span", {class: "bar"}, el("span", {style: `width:${n.store_capacity ? Math.min(100, 100 * n.store_used / n.store_capacity) : 0}%`}))),
          el("td", {}, human(n.store_used) + " / " + human(n.store_capacity) + (n.spilled_bytes ? ", " + human(n.spilled_bytes) + " spilled" : "")))))));
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      status.textContent = "error: " + (e.message || e);
    }
  }
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
}

// -- Routing ------------------------------------------------------------------

const kind = location.pathname.replace(/^\//, "");
for (const a of document.querySelectorAll("#nav a")) {
  if (a.getAttribute("href") === location.pathname) a.classList.add("here");
  if (TOKEN) a.setAttribute("href", a.getAttribute("href") + "?token=" + encodeURIComponent(TOKEN));
}
if (VIEWS[kind]) tableView(kind);
else overview();
