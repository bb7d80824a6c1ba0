// Loads dashboard pages in one headless Chromium, driven over the DevTools
// protocol on a pipe (--remote-debugging-pipe: no port, no WebSocket
// library), and keeps for each page its DOM once the page's scripts have
// drawn it and a PNG screenshot. One browser for every page, as starting
// Chromium costs seconds on a small machine (tests/sh/dashboard_test.sh,
// scripts/dashboard-shots.sh).
//
//   node tests/sh/dashboard_browser.js CHROME BASE_URL SPEC OUT_DIR
//        [--width W] [--height H] [--settle MS] [--timeout MS] [--parallel N]
//
// SPEC is a file with one page a line, fields separated by tabs:
//   NAME  PATH  [CLICK_SELECTOR  [UNTIL_SELECTOR]]
// After the page has drawn (its #status or #error has text, or it shows its
// #empty text), CLICK_SELECTOR
// is clicked and the page is given until UNTIL_SELECTOR matches; then
// --settle MS more (more refreshes, for charts). Writes OUT_DIR/NAME.html
// (the DOM), OUT_DIR/dashboard-NAME.png, and OUT_DIR/NAME.errors (the
// page's uncaught exceptions and console errors, one a line; empty when
// none). OUT_DIR/chrome.pid holds the browser's process group while it
// runs, so a caller can end it if this script is killed. Exits 1 when a
// page could not be loaded, drawn or captured (each said on stderr).
"use strict";
const {spawn} = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

function usage(msg) {
  process.stderr.write(`dashboard_browser: ${msg}\nusage: node dashboard_browser.js CHROME BASE_URL SPEC OUT_DIR ` +
    "[--width W] [--height H] [--settle MS] [--timeout MS] [--parallel N]\n");
  process.exit(2);
}

function parseArgs(argv) {
  const pos = [];
  const o = {width: 1280, height: 900, settle: 0, timeout: 20000, parallel: 3};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--")) { pos.push(a); continue; }
    const k = a.slice(2);
    if (!(k in o)) usage(`unknown option ${a}`);
    const v = Number(argv[++i]);
    if (!Number.isInteger(v) || v < 0) usage(`${a} needs a whole number, not ${argv[i]}`);
    o[k] = v;
  }
  if (pos.length !== 4) usage("needs CHROME BASE_URL SPEC OUT_DIR");
  [o.chrome, o.base, o.spec, o.out] = pos;
  o.pages = fs.readFileSync(o.spec, "utf8").split("\n").filter((l) => l.trim()).map((l) => {
    const [name, p, click, until] = l.split("\t");
    if (!name || !p || !p.startsWith("/")) usage(`bad line in ${o.spec}: ${JSON.stringify(l)} (NAME<tab>/PATH...)`);
    return {name, path: p, click, until};
  });
  return o;
}

// -- The browser and its protocol ---------------------------------------------

// Starts Chromium in its own process group; returns {call, on, close}.
// Messages are JSON, each ended by a NUL byte, on fds 3 (to it) and 4
// (from it).
function launch(o) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "tide-chromium-"));
  const args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
    `--user-data-dir=${profile}`, "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--force-device-scale-factor=1", "about:blank"];
  const child = spawn(o.chrome, args, {stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"], detached: true});
  fs.writeFileSync(path.join(o.out, "chrome.pid"), String(child.pid) + "\n");
  let stderr = "";
  child.stdio[2].on("data", (d) => { stderr = (stderr + d).slice(-4000); });
  const pending = new Map();
  const listeners = [];
  let next = 1, buf = "", exited = false;
  child.stdio[4].on("data", (d) => {
    buf += d.toString("utf8");
    let i;
    while ((i = buf.indexOf("\0")) >= 0) {
      const m = JSON.parse(buf.slice(0, i));
      buf = buf.slice(i + 1);
      if (m.id && pending.has(m.id)) {
        const p = pending.get(m.id);
        pending.delete(m.id);
        if (m.error) p.reject(new Error(`${p.method}: ${m.error.message}`));
        else p.resolve(m.result);
      } else if (m.method) {
        for (const l of listeners) l(m);
      }
    }
  });
  const dead = new Promise((resolve) => child.on("exit", () => { exited = true; resolve(); }));
  dead.then(() => {
    for (const p of pending.values()) p.reject(new Error(`Chromium exited; its stderr: ${stderr.trim()}`));
    pending.clear();
  });
  child.stdio[3].on("error", () => {});
  function call(method, params, sessionId) {
    if (exited) return Promise.reject(new Error(`Chromium exited; its stderr: ${stderr.trim()}`));
    const id = next++;
    const msg = {id, method, params: params || {}};
    if (sessionId) msg.sessionId = sessionId;
    child.stdio[3].write(JSON.stringify(msg) + "\0");
    return new Promise((resolve, reject) => pending.set(id, {resolve, reject, method}));
  }
  // Closes the browser, then makes sure no process of its group is left.
  async function close() {
    if (!exited) {
      call("Browser.close").catch(() => {});
      await Promise.race([dead, sleep(3000)]);
    }
    try { process.kill(-child.pid, "SIGKILL"); } catch (e) { /* the group is gone already */ }
    fs.rmSync(profile, {recursive: true, force: true});
  }
  return {call, on: (f) => listeners.push(f), close};
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// -- One page -----------------------------------------------------------------

const DRAWN = `(() => { const s = document.getElementById("status"), e = document.getElementById("error");
  return !!((s && s.textContent) || (e && e.textContent) || document.getElementById("empty")); })()`;

async function evaluate(b, sid, expression) {
  const r = await b.call("Runtime.evaluate", {expression, returnByValue: true}, sid);
  if (r.exceptionDetails) throw new Error(`${expression.slice(0, 60)}: ${r.exceptionDetails.text}`);
  return r.result.value;
}

// Polls expression until it is true, or throws after ms. An evaluation that
// fails (the page is still being replaced by the one navigated to) counts
// as not yet.
async function until(b, sid, expression, ms, what) {
  const t0 = Date.now();
  let last = "";
  for (;;) {
    try {
      if (await evaluate(b, sid, expression)) return;
    } catch (e) {
      last = ` (last: ${e.message})`;
    }
    if (Date.now() - t0 > ms) throw new Error(`${what} not within ${ms} ms${last}`);
    await sleep(100);
  }
}

// Clicks page.click, then waits until page.until matches.
async function click(b, sid, o, page) {
  const q = JSON.stringify(page.click);
  const hit = await evaluate(b, sid, `(() => { const e = document.querySelector(${q}); if (e) e.click(); return !!e; })()`);
  if (!hit) throw new Error(`nothing matches ${page.click} to click`);
  if (page.until) {
    await until(b, sid, `!!document.querySelector(${JSON.stringify(page.until)})`, o.timeout,
      `${page.until} after clicking ${page.click}`);
  }
}

async function visit(b, o, page, errors) {
  const {targetId} = await b.call("Target.createTarget", {url: "about:blank"});
  const {sessionId: sid} = await b.call("Target.attachToTarget", {targetId, flatten: true});
  errors.set(sid, []);
  try {
    await b.call("Runtime.enable", {}, sid);
    await b.call("Emulation.setDeviceMetricsOverride",
      {width: o.width, height: o.height, deviceScaleFactor: 1, mobile: false}, sid);
    const nav = await b.call("Page.navigate", {url: o.base + page.path}, sid);
    if (nav.errorText) throw new Error(`cannot load ${o.base + page.path}: ${nav.errorText}`);
    let failure = null;
    try {
      await until(b, sid, DRAWN, o.timeout, "the page drawn (#status, #error or #empty)");
      if (page.click) await click(b, sid, o, page);
      if (o.settle) await sleep(o.settle);
    } catch (e) {
      failure = e; // the page as it is is kept all the same, to see why
    }
    fs.writeFileSync(path.join(o.out, page.name + ".html"),
      await evaluate(b, sid, "document.documentElement.outerHTML"));
    const shot = await b.call("Page.captureScreenshot", {format: "png"}, sid);
    fs.writeFileSync(path.join(o.out, `dashboard-${page.name}.png`), Buffer.from(shot.data, "base64"));
    if (failure) throw failure;
  } finally {
    fs.writeFileSync(path.join(o.out, page.name + ".errors"), errors.get(sid).map((e) => e + "\n").join(""));
    await b.call("Target.closeTarget", {targetId}).catch(() => {});
  }
}

// The page's uncaught exceptions and console errors, by session.
function collectErrors(b) {
  const errors = new Map();
  b.on((m) => {
    const list = m.sessionId && errors.get(m.sessionId);
    if (!list) return;
    if (m.method === "Runtime.exceptionThrown") {
      const d = m.params.exceptionDetails;
      list.push(`exception: ${(d.exception && d.exception.description) || d.text}`.replace(/\n/g, " | "));
    } else if (m.method === "Runtime.consoleAPICalled" && m.params.type === "error") {
      list.push("console.error: " + m.params.args.map((a) => a.value !== undefined ? a.value : a.description).join(" "));
    }
  });
  return errors;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  fs.mkdirSync(o.out, {recursive: true});
  const b = launch(o);
  let failed = 0;
  const cleanup = () => b.close().then(() => process.exit(130));
  process.on("SIGTERM", cleanup);
  process.on("SIGINT", cleanup);
  try {
    await b.call("Browser.getVersion");
    const errors = collectErrors(b);
    const queue = o.pages.slice();
    const worker = async () => {
      for (let p = queue.shift(); p; p = queue.shift()) {
        const t0 = Date.now();
        try {
          await visit(b, o, p, errors);
          process.stderr.write(`dashboard_browser: ${p.name} (${p.path}) in ${Date.now() - t0} ms\n`);
        } catch (e) {
          failed++;
          process.stderr.write(`dashboard_browser: ${p.name} (${p.path}): ${e.message}\n`);
        }
      }
    };
    await Promise.all(Array.from({length: Math.max(1, o.parallel)}, worker));
  } catch (e) {
    failed++;
    process.stderr.write(`dashboard_browser: ${e.message}\n`);
  } finally {
    await b.close();
  }
  process.exit(failed ? 1 : 0);
}

main();
