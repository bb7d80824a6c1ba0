// The Tide dashboard: draws the view the path names from the head's JSON
// endpoints (/api/list/KIND with the same filters and paging as `tide
// list`, /api/logs, /api/series for training runs and data pipelines,
// /api/serve for serve deployments),
// refreshing every 2 s. Plain JS, charts in hand-made
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
  if (typeof v === "object") return plain(v);
  if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(3);
  return String(v);
}

// Resources, bundles and lists as a person reads them: "CPU 2, GPU 0,
// memory 16.5 GiB" rather than JSON with memory as a float of bytes.
const BYTE_KEYS = new Set(["memory", "object_store_memory"]);
function plain(v) {
  if (Array.isArray(v)) return v.map((x) => typeof x === "object" && x !== null ? "{" + plain(x) + "}" : cell(x)).join(", ");
  return Object.keys(v).sort().map((k) => {
    const x = v[k];
    if (typeof x === "number" && BYTE_KEYS.has(k)) return k + " " + human(Math.round(x));
    if (typeof x === "number") return k + " " + (Number.isInteger(x) ? String(x) : String(+x.toFixed(2)));
    return k + " " + (typeof x === "object" && x !== null ? "{" + plain(x) + "}" : String(x));
  }).join(", ");
}

// -- Table views ------------------------------------------------------------

const VIEWS = {
  nodes: {title: "Nodes", cols: ["node_id", "name", "address", "state", "workers", "actors", "tasks_running",
    "tasks_queued", "store_used", "store_capacity", "spilled_bytes", "resources", "available"],
    bytes: ["store_used", "store_capacity", "spilled_bytes"]},
  actors: {title: "Actors", cols: ["actor_id", "state", "name", "namespace", "node", "pid", "restarts",
    "queued_calls", "death_reason"], logs: true},
  tasks: {title: "Tasks", cols: ["task_id", "state", "type", "name", "method", "node", "pid", "running_s",
    "wait_reason", "error"], detail: (r) => r.traceback || r.wait_reason || r.error ?
      [r.error ? "error: " + r.error : null, r.traceback ? "remote traceback:\n" + r.traceback : null,
       r.wait_reason ? "waits: " + r.wait_reason : null].filter(Boolean).join("\n\n") : null, logs: true},
  objects: {title: "Objects", cols: ["object_id", "state", "size", "where", "node", "refs", "pins", "fetched"], bytes: ["size", "fetched"]},
  "placement-groups": {title: "Placement groups", cols: ["pg_id", "name", "state", "strategy", "bundles", "nodes"]},
  jobs: {title: "Jobs", cols: ["id", "status", "pid", "exit_code", "script"], logs: true},
};

// Columns of free text, which may wrap; the others stay on one line.
const WRAP = new Set(["wait_reason", "error", "death_reason", "script", "resources", "available", "bundles"]);

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
  const thead = el("tr", {}, ...v.cols.map((c) => el("th", {}, c.replace(/_/g, " "))));
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
            const cls = [c === "state" || c === "status" ? "state-" + r[c] : "", c === "error" ? "err" : "",
              WRAP.has(c) ? "wrap" : ""].filter(Boolean).join(" ");
            return el("td", {class: cls}, s);
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

// What /api/logs calls each table's rows: a task's or actor's output is
// only its own prints (sliced from its worker's log), a job's all of it.
const LOG_KINDS = {jobs: "job", tasks: "task", actors: "actor"};

// A job's, task's or actor's output, followed while it runs.
function openLog(kind, id, box) {
  if (state.log) clearInterval(state.log);
  if (state.open !== id) { box.replaceChildren(); return; }
  const pre = el("pre", {id: "log"});
  box.replaceChildren(el("h1", {}, "Output of " + id), pre);
  let off = 0;
  const pull = async () => {
    try {
      const r = await api("/api/logs", {kind: LOG_KINDS[kind], id: id, offset: String(off)});
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

// The overview's chart: one line per key over the refreshes so far, a dot
// on each line's last point (the only one, just after the page opened),
// and a legend with each key's value now.
function spark(points, keys, colors, w, h) {
  const max = Math.max(1, ...points.flatMap((p) => keys.map((k) => p[k])));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h + 16);
  svg.setAttribute("id", "chart");
  const x = (j) => (j / Math.max(1, points.length - 1)) * (w - 8) + 4;
  const y = (v) => h - (v / max) * (h - 8) - 4;
  const frame = document.createElementNS(svg.namespaceURI, "rect");
  for (const [k, v] of Object.entries({x: 0.5, y: 0.5, width: w - 1, height: h - 1, fill: "#fff", stroke: "#d8dee6"})) {
    frame.setAttribute(k, v);
  }
  svg.append(frame);
  keys.forEach((k, i) => {
    const pl = document.createElementNS(svg.namespaceURI, "polyline");
    pl.setAttribute("fill", "none");
    pl.setAttribute("stroke", colors[i]);
    pl.setAttribute("stroke-width", "2");
    pl.setAttribute("points", points.map((p, j) => `${x(j)},${y(p[k])}`).join(" "));
    svg.append(pl);
    const lastP = points[points.length - 1];
    if (lastP) {
      const dot = document.createElementNS(svg.namespaceURI, "circle");
      dot.setAttribute("cx", x(points.length - 1));
      dot.setAttribute("cy", y(lastP[k]));
      dot.setAttribute("r", "3");
      dot.setAttribute("fill", colors[i]);
      svg.append(dot);
    }
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", 4 + i * 110);
    t.setAttribute("y", h + 14);
    t.setAttribute("fill", colors[i]);
    t.textContent = `${k} ${lastP ? lastP[k] : 0}`;
    svg.append(t);
  });
  const top = document.createElementNS(svg.namespaceURI, "text");
  top.setAttribute("x", w - 4);
  top.setAttribute("y", h + 14);
  top.setAttribute("text-anchor", "end");
  top.textContent = `top of the chart: ${max}`;
  svg.append(top);
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
      history.push({running: running, waiting: queued + waiting});
      if (history.length > 150) history.shift();
      document.getElementById("chartbox").replaceChildren(spark(history, ["running", "waiting"], ["#17703a", "#9a6700"], 600, 120));
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

// -- Training runs and data pipelines (the head's tide_train_* / tide_data_* history) --

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#3b82c4", "#17703a", "#9a6700", "#a4161a", "#6f42c1", "#0f7b8a", "#c2410c", "#4b5563"];

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function short(v) {
  if (v === undefined || v === null) return "";
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(2) : v.toFixed(a >= 100 ? 1 : 4);
}

// A chart of lines over time: lines = [{label, points: [[t, v], ...]}];
// zero: the axis starts at 0 (rates, counts).
function timeChart(id, lines, w, h, zero) {
  const pts = lines.flatMap((l) => l.points.filter((p) => typeof p[1] === "number"));
  const svg = svgEl("svg", {id: id, width: w, height: h + 18 * Math.ceil(lines.length / 3) + 4, class: "timechart"});
  if (!pts.length) return svg;
  const t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(...pts.map((p) => p[0]));
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  if (zero && lo > 0) lo = 0;
  if (hi === lo) { hi += 1; lo -= lo > 0 ? Math.min(1, lo) : 1; }
  const L = 64, R = 8, T = 6, B = 18;
  const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (w - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (h - T - B);
  svg.append(svgEl("rect", {x: L, y: T, width: w - L - R, height: h - T - B, fill: "#fff", stroke: "#d8dee6"}));
  svg.append(svgEl("text", {x: L - 4, y: T + 9, "text-anchor": "end"}, short(hi)));
  svg.append(svgEl("text", {x: L - 4, y: h - B, "text-anchor": "end"}, short(lo)));
  svg.append(svgEl("text", {x: L, y: h - 4}, new Date(t0 * 1000).toLocaleTimeString()));
  svg.append(svgEl("text", {x: w - R, y: h - 4, "text-anchor": "end"}, new Date(t1 * 1000).toLocaleTimeString()));
  lines.forEach((l, i) => {
    const c = COLORS[i % COLORS.length];
    const ps = l.points.filter((p) => typeof p[1] === "number");
    svg.append(svgEl("polyline", {fill: "none", stroke: c, "stroke-width": "2",
      points: ps.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}));
    if (ps.length === 1) svg.append(svgEl("circle", {cx: x(ps[0][0]), cy: y(ps[0][1]), r: 3, fill: c}));
    // style, not fill: the stylesheet's svg text colour would win over the attribute.
    svg.append(svgEl("text", {x: L + (i % 3) * ((w - L) / 3), y: h + 14 + 18 * Math.floor(i / 3), style: "fill:" + c},
      l.label));
  });
  return svg;
}

// A page of the series whose names start with prefix (/api/series), drawn by
// draw(box, response), or the empty text while there are none.
function seriesView(prefix, title, empty, draw) {
  const box = el("div", {id: "series"});
  const err = el("span", {id: "error", class: "error"});
  main.replaceChildren(el("h1", {}, title), err, box);
  async function refresh() {
    try {
      const res = await api("/api/series", {prefix: prefix, points: "300"});
      err.textContent = "";
      if (!res.series.length) box.replaceChildren(el("p", {id: "empty", class: "empty"}, empty));
      else draw(box, res);
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      err.textContent = String(e.message || e);
    }
  }
  refresh();
  state.timer = setInterval(refresh, REFRESH_MS);
}

const last = (s) => s && s.points.length ? s.points[s.points.length - 1][1] : null;
const lastT = (s) => s && s.points.length ? s.points[s.points.length - 1][0] : 0;
const fixed0 = (v) => typeof v === "number" ? v.toFixed(0) : "";
const ago = (now, t) => t ? Math.max(0, Math.round(now - t)) + " s ago" : "";

// Groups series by one label: Map(label value -> {name or name/key -> series}).
function groupBy(series, label, sub) {
  const g = new Map();
  for (const s of series) {
    const k = s.labels[label];
    if (k === undefined) continue;
    if (!g.has(k)) g.set(k, {});
    g.get(k)[s.name + (sub && s.labels[sub] !== undefined ? "/" + s.labels[sub] : "")] = s;
  }
  return g;
}

function trainingView() {
  seriesView("tide_train_", "Training runs",
    "No training run has reported to this head yet: runs report when train.fit runs in a driver attached with --address.",
    (box, res) => {
      const runs = groupBy(res.series, "run", "key");
      const keys = new Set();
      for (const m of runs.values()) for (const k of Object.keys(m)) {
        if (k.startsWith("tide_train_metric/") && k !== "tide_train_metric/step") keys.add(k.slice(18));
      }
      const metricKeys = [...keys].sort();
      const order = [...runs.keys()].sort((a, b) => Math.max(...Object.values(runs.get(b)).map(lastT)) -
        Math.max(...Object.values(runs.get(a)).map(lastT)));
      const head = el("tr", {}, ...["run", "state", "step", ...metricKeys, "tokens/s", "workers", "updated"].map((c) => el("th", {}, c)));
      const rows = order.map((run) => {
        const m = runs.get(run);
        const running = last(m.tide_train_running);
        const t = Math.max(...Object.values(m).map(lastT));
        return el("tr", {"data-id": run},
          el("td", {class: "run"}, run),
          el("td", {class: running ? "state-RUNNING" : "state-SUCCEEDED"}, running ? "running" : "ended"),
          el("td", {class: "step"}, cell(last(m.tide_train_step))),
          ...metricKeys.map((k) => el("td", {class: "metric", "data-key": k}, short(last(m["tide_train_metric/" + k])))),
          el("td", {class: "tps"}, fixed0(last(m.tide_train_tokens_per_second))),
          el("td", {}, cell(last(m.tide_train_workers))),
          el("td", {title: new Date(t * 1000).toLocaleString()}, ago(res.now, t)));
      });
      const key = metricKeys.includes("loss") ? "loss" : metricKeys[0];
      const parts = [el("table", {id: "table"}, el("thead", {}, head), el("tbody", {id: "rows"}, ...rows))];
      if (key) {
        parts.push(el("h1", {}, key + " over time"), timeChart("loss-chart",
          order.filter((r) => runs.get(r)["tide_train_metric/" + key]).slice(0, 8)
            .map((r) => ({label: r, points: runs.get(r)["tide_train_metric/" + key].points})), 900, 240));
      }
      box.replaceChildren(...parts);
    });
}

function dataView() {
  seriesView("tide_data_", "Data pipelines",
    "No data pipeline has reported to this head yet: pipelines report when a tide.data pipeline runs in a driver attached with --address.",
    (box, res) => {
      const pipes = groupBy(res.series, "pipeline", "stage");
      const order = [...pipes.keys()].sort((a, b) => Math.max(...Object.values(pipes.get(b)).map(lastT)) -
        Math.max(...Object.values(pipes.get(a)).map(lastT)));
      const parts = [];
      for (const p of order.slice(0, 20)) {
        const m = pipes.get(p);
        const running = last(m.tide_data_running);
        const stages = Object.keys(m).filter((k) => k.startsWith("tide_data_rows_out/")).map((k) => k.slice(19))
          .sort((a, b) => parseInt(a) - parseInt(b));
        const t = Math.max(...Object.values(m).map(lastT));
        parts.push(el("h1", {}, el("span", {class: "pipeline"}, p), " ",
          el("span", {class: running ? "state-RUNNING" : "state-SUCCEEDED"}, running ? "running" : "ended"),
          el("span", {class: "l"}, " updated " + ago(res.now, t))));
        const head = el("tr", {}, ...["stage", "rows out", "rows/s", "in flight"].map((c) => el("th", {}, c)));
        parts.push(el("table", {class: "stages", "data-id": p}, el("thead", {}, head), el("tbody", {},
          ...stages.map((st) => el("tr", {"data-stage": st},
            el("td", {class: "stage"}, st),
            el("td", {class: "rows"}, cell(last(m["tide_data_rows_out/" + st]))),
            el("td", {class: "rate"}, fixed0(last(m["tide_data_rows_per_second/" + st]))),
            el("td", {class: "inflight"}, cell(last(m["tide_data_in_flight/" + st]))))))));
        parts.push(timeChart("rate-chart-" + order.indexOf(p), stages.map((st) => ({label: st + " rows/s",
          points: (m["tide_data_rows_per_second/" + st] || {points: []}).points})), 900, 160));
      }
      box.replaceChildren(...parts);
    });
}

// -- Serve deployments (/api/serve: the ingress a `tide serve run --address` runs in this head,
// and those on other nodes, which send their stats to it) --

const serveHistory = new Map();  // deployment -> [[t, req/s], ...] since the page opened

// A deployment's key: its name on this node, node/name on another.
const serveKey = (d) => !d.node || d.node === "node-0" ? d.name : d.node + "/" + d.name;

function serveRow(d) {
  const ms = (v) => typeof v === "number" ? v.toFixed(1) : "";
  const codes = d.codes ? Object.keys(d.codes).sort().map((c) => c + ": " + d.codes[c]).join(", ") : "";
  const answered = d.codes ? Object.values(d.codes).reduce((a, b) => a + b, 0) : 0;
  return el("tr", {"data-id": serveKey(d)},
    el("td", {class: "name"}, d.name), el("td", {class: "route"}, d.route),
    el("td", {class: "replicas"}, cell(d.replicas)), el("td", {class: "rate"}, d.rate.toFixed(1)),
    el("td", {class: "p50"}, ms(d.p50_ms)), el("td", {class: "p99"}, ms(d.p99_ms)),
    el("td", {class: "ongoing"}, cell(d.ongoing)), el("td", {class: "queued"}, cell(d.queued)),
    el("td", {class: "answered"}, String(answered)), el("td", {class: "errors"}, cell(d.errors)),
    el("td", {class: "rejected"}, cell(d.rejected)), el("td", {class: "codes"}, codes),
    el("td", {class: "node"}, d.node || ""));
}

function serveView() {
  const box = el("div", {id: "serve"});
  const err = el("span", {id: "error", class: "error"});
  main.replaceChildren(el("h1", {}, "Serve deployments"), err, box);
  async function refresh() {
    try {
      const res = await api("/api/serve");
      err.textContent = "";
      if (!res.deployments.length) {
        box.replaceChildren(el("p", {id: "empty", class: "empty"},
          "No serve application runs in this cluster: start one attached to a node with tide serve run --address."));
        return;
      }
      const now = Date.now() / 1000;
      for (const d of res.deployments) {
        if (!serveHistory.has(serveKey(d))) serveHistory.set(serveKey(d), []);
        const h = serveHistory.get(serveKey(d));
        h.push([now, d.rate]);
        if (h.length > 300) h.shift();
      }
      const cols = ["deployment", "route", "replicas", "req/s", "p50 ms", "p99 ms", "ongoing", "queued",
        "answered", "errors", "rejected", "by status", "node"];
      box.replaceChildren(
        el("table", {id: "table"}, el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", {}, c)))),
          el("tbody", {id: "rows"}, ...res.deployments.map(serveRow))),
        el("h1", {}, "Requests per second"),
        timeChart("rate-chart", res.deployments.slice(0, 8).map((d) => ({label: serveKey(d), points: serveHistory.get(serveKey(d))})),
          900, 200, true));
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      err.textContent = String(e.message || e);
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
else if (kind === "training") trainingView();
else if (kind === "data") dataView();
else if (kind === "serve") serveView();
else overview();
