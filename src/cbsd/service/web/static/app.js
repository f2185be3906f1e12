// cbsd's web UI: one page, plain ES modules, no build step. It talks to the service's REST API
// (docs/api.md) with the session cookie POST /1.0/login set, sends the CSRF token on every
// state-changing request, follows /1.0/events for live status and operation progress, and
// opens the serial console (xterm.js) and the VNC display (noVNC) over WebSockets.
import { Terminal } from "/ui/xterm/xterm/lib/xterm.mjs";

const main = document.getElementById("main");
const session = { user: null, csrf: null };
const listeners = new Set(); // (event) => void, fed by the event stream
let events = null;
let leaving = []; // what the current page closes when another is shown

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : String(c));
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (session.csrf && method !== "GET") headers["X-CSRF-Token"] = session.csrf;
  const r = await fetch(path, { method, headers, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (r.status === 401 && path !== "/1.0/login") { showLogin("Your session ended: log in again."); }
  if (!r.ok) throw new ApiError(r.status, data?.error ?? `${r.status} ${r.statusText}`);
  return data;
}

// ---- the event stream: live status and operation progress --------------------------------
function openEvents() {
  if (events) return;
  events = new EventSource("/1.0/events");
  events.onmessage = (m) => {
    const event = JSON.parse(m.data);
    if (event.type === "operation") remember(event.metadata);
    for (const fn of listeners) fn(event);
  };
}

// Until the page changes (call after show(), which ends the previous page's listeners).
// The latest report of recent operations, kept from the stream: an operation's first progress
// may arrive before the answer that starts it does (follow() then catches up from here).
const reports = new Map();
function remember(op) {
  const before = reports.get(op.id);
  reports.delete(op.id);
  reports.set(op.id, { ...op, progressed: before?.progressed || isProgress(op) });
  if (reports.size > 200) reports.delete(reports.keys().next().value);
}
function isProgress(op) { return op.status === "Running" && !!op.progress; }

function listen(fn) { listeners.add(fn); leaving.push(() => listeners.delete(fn)); }

// An operation (the 202 answer of a state change, checkpoint, ...) shown as a progress bar in
// *where* until it ends; resolves with its final object, rejects with its error.
function follow(op, where) {
  const bar = el("progress", { max: 100, "data-op": op.id });
  const text = el("span", { class: "op-text" }, `${op.description}…`);
  const row = el("div", { class: "operation", "data-op": op.id }, bar, " ", text);
  where.replaceChildren(row);
  return new Promise((resolve, reject) => {
    let done = false;
    const show = (o) => {
      if (done) return;
      if (o.progress) { bar.value = o.progress.percent; }
      // the bar was moved by the operation's own progress reports while it ran
      if (isProgress(o) || o.progressed) row.dataset.progressed = "true";
      if (o.status === "Running") return;
      done = true;
      listeners.delete(onEvent);
      bar.value = 100;
      text.textContent = `${o.description}: ${o.status}${o.err ? " — " + o.err : ""}`;
      text.className = o.status === "Success" ? "op-text ok" : "op-text error";
      (o.status === "Success" ? resolve : reject)(o);
    };
    const onEvent = (e) => { if (e.type === "operation" && e.metadata.id === op.id) show(e.metadata); };
    listeners.add(onEvent);
    show(op);
    if (reports.has(op.id)) show(reports.get(op.id));
    // The stream may have missed the end (it reconnects): ask the operation itself too.
    (async () => {
      while (!done) {
        try { show(await api("GET", `/1.0/operations/${op.id}/wait?timeout=30`)); }
        catch (e) { if (!done) { done = true; reject({ err: e.message }); } }
      }
    })();
  });
}

async function act(where, method, path, body) {
  try {
    const op = await api(method, path, body);
    if (op && op.id && op.status) return await follow(op, where);
    where.replaceChildren(el("span", { class: "ok" }, "done"));
    return op;
  } catch (e) {
    where.replaceChildren(el("span", { class: "error" }, e.message ?? e.err ?? String(e)));
    return null;
  }
}

// ---- pages -----------------------------------------------------------------------------------
function showLogin(message) {
  session.user = session.csrf = null;
  if (events) { events.close(); events = null; }
  document.getElementById("who").textContent = "";
  document.getElementById("logout").hidden = true;
  show(() => {
    const token = el("input", { type: "password", id: "token", autocomplete: "off", size: 50,
                                placeholder: "a token from: cbsd token mode=add name=NAME" });
    const note = el("p", { id: "login-error", class: "error" }, message ?? "");
    const form = el("form", { id: "login", on: { submit: async (ev) => {
      ev.preventDefault();
      try {
        const s = await api("POST", "/1.0/login", { token: token.value });
        loggedIn(s);
        location.hash = "#/";
        route();
      } catch (e) { note.textContent = e.message; }
    } } }, el("label", {}, "API token ", token), " ", el("button", { type: "submit" }, "Log in"));
    return el("section", {}, el("h2", {}, "Log in"), form, note);
  });
}

function loggedIn(s) {
  session.user = s.owner;
  session.csrf = s.csrf_token;
  document.getElementById("who").textContent = `logged in: ${s.owner}`;
  document.getElementById("logout").hidden = false;
  openEvents();
}

function show(build) {
  for (const fn of leaving) fn();
  leaving = [];
  main.replaceChildren(build());
}

const ACTIONS = { Off: ["start"], On: ["stop", "pause", "hibernate"], Paused: ["resume", "stop"],
                  Suspended: ["start"] };

function stateButtons(name, status, where) {
  const all = ["start", "stop", "pause", "resume", "hibernate"];
  const allowed = ACTIONS[status] ?? [];
  return all.map((action) => el("button", {
    class: `action-${action}`, disabled: !allowed.includes(action),
    on: { click: () => act(where, "PUT", `/1.0/instances/${encodeURIComponent(name)}/state`,
                           action === "stop" ? { action, noacpi: true } : { action }) },
  }, action));
}

async function listPage() {
  const body = el("tbody");
  const ops = el("div", { id: "operations" });
  const table = el("table", { id: "vms" }, el("thead", {}, el("tr", {},
    ...["name", "status", "CPUs", "RAM (MiB)", "OS", "actions"].map((h) => el("th", {}, h)))), body);
  const render = (rows) => body.replaceChildren(...rows.filter((r) => r.jname).map((r) => el("tr",
    { "data-vm": r.jname },
    el("td", {}, el("a", { href: `#/vm/${encodeURIComponent(r.jname)}` }, r.jname)),
    el("td", { class: `status ${r.status}` }, r.status),
    el("td", {}, r.vm_cpus), el("td", {}, r.vm_ram), el("td", {}, r.vm_os_type),
    el("td", {}, stateButtons(r.jname, r.status, ops)))));
  const refresh = async () => render(await api("GET", "/1.0/instances"));
  show(() => el("div", {}, el("section", {}, el("h2", {}, "Virtual machines"), table, ops),
                createForm(refresh)));
  listen((e) => { if (e.type === "lifecycle") refresh(); });
  await refresh();
}

function createForm(refresh) {
  const name = el("input", { id: "new-name", required: true, pattern: "[A-Za-z0-9_][A-Za-z0-9_.-]*" });
  const image = el("select", { id: "new-image" });
  const ram = el("input", { id: "new-ram", value: "64m", size: 6 });
  const cpus = el("input", { id: "new-cpus", type: "number", value: 1, min: 1, max: 64 });
  const vnc = el("input", { id: "new-vnc", type: "checkbox" });
  const start = el("input", { id: "new-start", type: "checkbox", checked: true });
  const out = el("div", { id: "create-result" });
  api("GET", "/ui/images").then((images) => image.replaceChildren(
    ...images.map((p) => el("option", { value: p }, p)))).catch((e) => { out.textContent = e.message; });
  const form = el("form", { id: "create", class: "inline", on: { submit: async (ev) => {
    ev.preventDefault();
    const keys = { jname: name.value, image: image.value, vm_ram: ram.value,
                   vm_cpus: Number(cpus.value), vm_os_type: "other", vnc: vnc.checked,
                   runasap: start.checked };
    if (await act(out, "POST", "/1.0/instances", keys)) refresh();
  } } },
  el("label", {}, "name", name), el("label", {}, "image (from the pool)", image),
  el("label", {}, "RAM", ram), el("label", {}, "CPUs", cpus), el("label", {}, "VNC", vnc),
  el("label", {}, "start now", start), el("button", { type: "submit" }, "Create"));
  return el("section", {}, el("h2", {}, "Create a VM from an image"), form, out);
}

function when(created) {
  if (created === null || created === undefined) return "damaged";
  const d = new Date(typeof created === "number" ? created * 1000 : created);
  return isNaN(d) ? String(created) : d.toLocaleString();
}

// The checkpoints as a tree: each under its parent (a checkpoint whose parent is gone is a root).
function drawTree(list, current, buttons) {
  const byName = new Map(list.map((c) => [c.name, c]));
  const kids = new Map();
  for (const c of list) {
    const p = c.parent && byName.has(c.parent) ? c.parent : null;
    if (!kids.has(p)) kids.set(p, []);
    kids.get(p).push(c);
  }
  const branch = (parent) => el("ul", { class: parent === null ? "tree" : null },
    ...(kids.get(parent) ?? []).sort((a, b) => (a.created ?? 0) - (b.created ?? 0)).map((c) =>
      el("li", { "data-checkpoint": c.name },
        el("span", { class: `node${c.name === current ? " current" : ""}` },
          el("span", { class: "cp-name" }, c.name),
          el("small", {}, when(c.created)),
          buttons(c)),
        kids.has(c.name) ? branch(c.name) : "")));
  return branch(null);
}

async function vmPage(name) {
  const path = `/1.0/instances/${encodeURIComponent(name)}`;
  const ops = el("div", { id: "operations" });
  const status = el("span", { id: "vm-status", class: "status" });
  const buttons = el("span", { id: "vm-actions" });
  const tree = el("div", { id: "checkpoints" });
  const refresh = async () => {
    const vm = await api("GET", path);
    status.textContent = vm.status;
    status.className = `status ${vm.status}`;
    buttons.replaceChildren(...stateButtons(name, vm.status, ops));
    let cps;
    try { cps = await api("GET", `${path}/checkpoints`); }
    catch (e) { tree.replaceChildren(el("p", { class: "error" }, e.message)); return; }
    const list = Array.isArray(cps) ? cps : (cps.checkpoints ?? []);
    const current = Array.isArray(cps) ? null : cps.current;
    tree.replaceChildren(list.length ? drawTree(list, current, (c) => [
      el("button", { class: "cp-restore", on: { click: async () => {
        // As on the command line: a running VM is powered off first (bstop noacpi=1, then
        // bstart checkpoint=); the checkpoint holds the whole state it returns to.
        if (["On", "Paused"].includes(status.textContent)
            && !await act(ops, "PUT", `${path}/state`, { action: "stop", noacpi: true })) return;
        if (await act(ops, "POST", `${path}/checkpoints/${encodeURIComponent(c.name)}/restore`, {})) refresh();
      } } }, "restore"),
      el("button", { class: "cp-verify", on: { click: () =>
        act(ops, "POST", `${path}/checkpoints/${encodeURIComponent(c.name)}/verify`, {}) } }, "verify"),
      el("button", { class: "cp-destroy", on: { click: async () => {
        if (confirm(`Destroy checkpoint ${c.name}?`)
            && await act(ops, "DELETE", `${path}/checkpoints/${encodeURIComponent(c.name)}`)) refresh();
      } } }, "destroy"),
    ]) : el("p", {}, "No checkpoints."));
  };
  const cpName = el("input", { id: "cp-name", required: true, pattern: "[A-Za-z0-9_][A-Za-z0-9_.-]*" });
  const live = el("input", { id: "cp-live", type: "checkbox" });
  const cpForm = el("form", { id: "cp-create", class: "inline", on: { submit: async (ev) => {
    ev.preventDefault();
    if (await act(ops, "POST", `${path}/checkpoints`, { name: cpName.value, live: live.checked })) refresh();
  } } }, el("label", {}, "name", cpName), el("label", {}, "live", live),
  el("button", { type: "submit" }, "Create checkpoint"));
  const termBox = el("div", { id: "terminal" });
  const consoleState = el("span", { id: "console-state" }, "connecting…");
  const vncBox = el("div", { id: "vnc-screen" });
  const vncState = el("span", { id: "vnc-state" }, "");
  const vncButton = el("button", { id: "vnc-open", on: { click: () => openVnc(name, vncBox, vncState) } },
                       "Show the display");
  show(() => el("div", {},
    el("section", {}, el("h2", {}, name, " ", status), buttons, ops),
    el("section", {}, el("h2", {}, "Checkpoints"), cpForm, tree),
    el("section", {}, el("h2", {}, "Serial console ", consoleState), termBox),
    el("section", {}, el("h2", {}, "Display (VNC) ", vncState), vncButton, vncBox)));
  listen((e) => { if (e.type === "lifecycle" && e.metadata.name === name) refresh(); });
  openConsole(name, termBox, consoleState);
  await refresh();
}

function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;
}

// The serial console in xterm.js; reconnects while the page is shown (a restore or a restart
// starts a new QEMU, whose console is a new socket).
function openConsole(name, box, state) {
  const term = new Terminal({ convertEol: false, rows: 24, cols: 100, scrollback: 1000 });
  term.open(box);
  box.terminal = term; // its scrollback, for whoever reads the page (the browser tests)
  let ws = null;
  let closed = false;
  const encoder = new TextEncoder();
  term.onData((d) => { if (ws?.readyState === WebSocket.OPEN) ws.send(encoder.encode(d)); });
  const connect = () => {
    ws = new WebSocket(wsUrl(`/1.0/instances/${encodeURIComponent(name)}/console`));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      // A line of the page's own between QEMUs: what follows is the new one's output.
      term.write(`\r\n\x1b[2m[cbsd: connected to ${name}'s console]\x1b[0m\r\n`);
      state.dataset.connections = String(Number(state.dataset.connections ?? 0) + 1);
      state.textContent = "connected";
      state.className = "ok";
    };
    ws.onmessage = (m) => term.write(new Uint8Array(m.data));
    ws.onclose = (ev) => {
      state.textContent = ev.reason ? `closed: ${ev.reason}` : "disconnected";
      state.className = "error";
      if (!closed) setTimeout(() => { if (!closed) connect(); }, 1000);
    };
  };
  connect();
  leaving.push(() => { closed = true; ws?.close(); term.dispose(); });
}

async function openVnc(name, box, state) {
  const { default: RFB } = await import("/ui/novnc/core/rfb.js");
  const rfb = new RFB(box, wsUrl(`/1.0/instances/${encodeURIComponent(name)}/vnc`),
                      { wsProtocols: ["binary"] });
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => { state.textContent = "connected"; state.className = "ok"; });
  rfb.addEventListener("disconnect", (e) => {
    state.textContent = e.detail.clean ? "disconnected" : "connection failed";
    state.className = "error";
  });
  rfb.addEventListener("credentialsrequired", () => {
    const pw = prompt("VNC password (vnc_password)");
    if (pw !== null) rfb.sendCredentials({ password: pw });
  });
  leaving.push(() => rfb.disconnect());
}

function route() {
  if (!session.user) return;
  const m = location.hash.match(/^#\/vm\/(.+)$/);
  (m ? vmPage(decodeURIComponent(m[1])) : listPage()).catch((e) => {
    if (e.status !== 401) main.replaceChildren(el("p", { class: "error" }, e.message));
  });
}

window.addEventListener("hashchange", route);
document.getElementById("logout").addEventListener("click", async () => {
  await api("POST", "/1.0/logout").catch(() => null);
  showLogin("Logged out.");
});

api("GET", "/ui/session").then((s) => { loggedIn(s); route(); }).catch(() => showLogin());
