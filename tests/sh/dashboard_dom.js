// The dashboard's app.js in Node, for tests/sh/dashboard_test.sh where
// Chromium is not installed: a minimal DOM (what app.js calls on the
// training and data pages), fetch against the live head, then the page's
// HTML after its first refresh on stdout.
//   node tests/sh/dashboard_dom.js http://127.0.0.1:PORT /training [WAIT_MS]
"use strict";
const fs = require("fs");
const path = require("path");
const vm = require("vm");

const [base, page, waitArg] = process.argv.slice(2);
const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

class Text {
  constructor(s) { this.data = s; }
  get textContent() { return this.data; }
  get outerHTML() { return esc(this.data); }
}

class Element {
  constructor(tag) {
    this.tagName = tag;
    this.attrs = new Map();
    this.children = [];
    this.classList = {add: (c) => this.attrs.set("class", ((this.attrs.get("class") || "") + " " + c).trim())};
  }
  setAttribute(k, v) { this.attrs.set(k, String(v)); }
  getAttribute(k) { return this.attrs.has(k) ? this.attrs.get(k) : null; }
  set className(v) { this.attrs.set("class", v); }
  get className() { return this.attrs.get("class") || ""; }
  addEventListener() {}
  append(...kids) { for (const k of kids) this.children.push(k instanceof Element ? k : new Text(String(k))); }
  replaceChildren(...kids) { this.children = []; this.append(...kids); }
  set textContent(v) { this.children = [new Text(String(v))]; }
  get textContent() { return this.children.map((c) => c.textContent).join(""); }
  get outerHTML() {
    const a = [...this.attrs].map(([k, v]) => ` ${k}="${esc(v)}"`).join("");
    return `<${this.tagName}${a}>${this.children.map((c) => c.outerHTML).join("")}</${this.tagName}>`;
  }
  find(id) {
    if (this.attrs.get("id") === id) return this;
    for (const c of this.children) {
      const r = c instanceof Element && c.find(id);
      if (r) return r;
    }
    return null;
  }
}

const body = new Element("body");
const main = new Element("main");
main.setAttribute("id", "main");
const status = new Element("span");
status.setAttribute("id", "status");
body.append(status, main);
const document = {
  createElement: (t) => new Element(t),
  createElementNS: (ns, t) => new Element(t),
  getElementById: (id) => body.find(id),
  querySelectorAll: () => [],
};
const url = new URL(page, base);
const ctx = vm.createContext({
  document, Node: Element, URLSearchParams, console, setTimeout, clearInterval,
  setInterval: () => 0,
  location: {pathname: url.pathname, search: url.search},
  fetch: (p, o) => fetch(new URL(p, base), o),
});
vm.runInContext(fs.readFileSync(path.join(__dirname, "../../stdlib/tide/dashboard/app.js"), "utf8"), ctx);
setTimeout(() => { process.stdout.write(body.outerHTML + "\n"); process.exit(0); }, Number(waitArg || 1500));
