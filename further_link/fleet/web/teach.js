// The teacher's page: a grid of the class's devices, fed by /api/events.
// Updates are drawn once per animation frame, however many arrive.
"use strict";

const KEY = new URLSearchParams(location.hash.slice(1)).get("key") || "";
const TILE_LINES = 6;
const TILE_KEEP = 4096;
const WATCH_KEEP = 256 * 1024;
const devices = new Map(); // name -> {snap, out, total, tile, parts, selected}
const dirty = new Set();
let watched = null;
let watchOut = ""; // the watched console's text, as far as kept
let watchNew = ""; // arrived since the last frame: appended, not redrawn
let watchReset = false; // redraw the console from watchOut (opened, or too long)
let frameQueued = false;
let project = null; // {name, files: {path: text}}
let events = null;

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = { headers: { "X-Teach-Key": KEY } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  if (!response.ok) throw new Error(text.trim() || `HTTP ${response.status}`);
  return JSON.parse(text);
}

function notice(text, bad) {
  $("notice").textContent = text;
  $("notice").classList.toggle("bad", Boolean(bad));
}

function selection() {
  if ($("select-all").checked) return null;
  return [...devices.values()].filter((d) => d.selected).map((d) => d.snap.name);
}

async function command(action, extra) {
  const body = Object.assign({ devices: selection() }, extra || {});
  notice(`${action}…`);
  try {
    const answer = await api(`/api/${action}`, body);
    const failed = answer.results.filter((r) => !r.ok);
    const done = answer.results.length - failed.length;
    const summary = `${action}: ${done} of ${answer.results.length} devices in ${answer.seconds.toFixed(2)} s`;
    const problems = failed.map((r) => `${r.name}: ${r.error}`).join("; ");
    notice(problems ? `${summary} — ${problems}` : summary, failed.length > 0);
  } catch (error) {
    notice(`${action} failed: ${error.message}`, true);
  }
}

function makeTile(name) {
  const tile = document.createElement("article");
  tile.className = "tile";
  tile.dataset.name = name;
  tile.setAttribute("aria-label", name);
  const top = document.createElement("div");
  top.className = "top";
  const pick = document.createElement("input");
  pick.type = "checkbox";
  pick.setAttribute("aria-label", `select ${name}`);
  pick.addEventListener("click", (event) => event.stopPropagation());
  pick.addEventListener("change", () => {
    devices.get(name).selected = pick.checked;
    if (pick.checked) $("select-all").checked = false;
  });
  const dot = document.createElement("span");
  dot.className = "dot";
  const title = document.createElement("span");
  title.className = "name";
  title.textContent = name;
  top.append(pick, dot, title);
  const state = document.createElement("div");
  state.className = "state";
  const facts = document.createElement("div");
  facts.className = "facts";
  const error = document.createElement("div");
  error.className = "error";
  const out = document.createElement("pre");
  tile.append(top, state, facts, error, out);
  tile.addEventListener("click", () => openWatch(name));
  return { tile, parts: { state, facts, error, out } };
}

function upsert(snap) {
  let device = devices.get(snap.name);
  if (!device) {
    device = Object.assign({ out: "", total: 0, selected: false }, makeTile(snap.name));
    devices.set(snap.name, device);
    placeTile(device);
  }
  device.snap = snap;
  dirty.add(snap.name);
}

function placeTile(device) {
  const grid = $("grid");
  const after = [...grid.children].find((t) => t.dataset.name > device.tile.dataset.name);
  grid.insertBefore(device.tile, after || null);
}

function appendOutput(name, offset, text) {
  const device = devices.get(name);
  if (!device) return;
  const gap = offset > device.total ? "…\n" : "";
  device.out = (device.out + gap + text).slice(-TILE_KEEP);
  device.total = offset + text.length;
  dirty.add(name);
  if (name === watched) {
    watchOut += gap + text;
    watchNew += gap + text;
    if (watchOut.length > 2 * WATCH_KEEP) {
      watchOut = watchOut.slice(-WATCH_KEEP);
      watchReset = true;
    }
  }
}

function describe(snap) {
  if (snap.online === false) return "offline";
  if (snap.running) return `running ${snap.running}`;
  if (snap.exitCode !== null && snap.exitCode !== undefined) return `exit ${snap.exitCode}`;
  return snap.online ? "idle" : "…";
}

function draw(device) {
  const { snap, tile, parts } = device;
  tile.classList.toggle("online", snap.online === true);
  tile.classList.toggle("offline", snap.online === false);
  tile.classList.toggle("running", Boolean(snap.running));
  tile.classList.toggle("failed", Boolean(snap.error));
  parts.state.textContent = describe(snap);
  const facts = [snap.address];
  if (snap.battery !== null && snap.battery !== undefined) {
    facts.push(`battery ${Math.round(snap.battery)}%${snap.charging ? " ⚡" : ""}`);
  }
  if (snap.temperature !== null && snap.temperature !== undefined) facts.push(`${snap.temperature.toFixed(0)} °C`);
  if (snap.version) facts.push(`v${snap.version}`);
  if (!snap.paired) facts.push("not paired");
  parts.facts.textContent = facts.join(" · ");
  if (snap.locked) {
    const badge = document.createElement("span");
    badge.className = "locked";
    badge.textContent = "locked";
    parts.facts.append(" ", badge);
  }
  parts.error.textContent = snap.error || "";
  parts.error.title = snap.error || "";
  const lines = device.out.split("\n");
  parts.out.textContent = lines.slice(-TILE_LINES - 1).join("\n");
}

function frame() {
  frameQueued = false;
  for (const name of dirty) draw(devices.get(name));
  dirty.clear();
  const online = [...devices.values()].filter((d) => d.snap.online === true).length;
  const running = [...devices.values()].filter((d) => d.snap.running).length;
  $("summary").textContent = `${devices.size} devices · ${online} online · ${running} running`;
  if (watched) {
    const snap = devices.get(watched).snap;
    $("watch-state").textContent = describe(snap);
    if (watchReset || watchNew) {
      // Appending a text node lays out only the new lines; rewriting the whole
      // console every frame would lay out up to WATCH_KEEP characters each time.
      const pre = $("watch-output");
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      if (watchReset) pre.textContent = watchOut;
      else pre.append(watchNew);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
      watchReset = false;
      watchNew = "";
    }
  }
}

function schedule() {
  if (!frameQueued) {
    frameQueued = true;
    requestAnimationFrame(frame);
  }
}

function watch(name) {
  watched = name;
  if (events && events.readyState === WebSocket.OPEN) events.send(JSON.stringify({ watch: name }));
}

function openWatch(name) {
  watch(name);
  watchOut = devices.get(name).out;
  watchNew = "";
  watchReset = true;
  $("watch-name").textContent = name;
  $("watch").showModal();
  $("watch-text").focus();
  schedule();
}

function connect() {
  events = new WebSocket(`ws://${location.host}/api/events?key=${encodeURIComponent(KEY)}`);
  events.addEventListener("open", () => watch(watched));
  events.addEventListener("message", (event) => {
    const update = JSON.parse(event.data);
    for (const snap of update.devices) upsert(snap);
    for (const [name, [offset, text]] of Object.entries(update.output)) appendOutput(name, offset, text);
    schedule();
  });
  events.addEventListener("close", () => {
    $("summary").textContent = "reconnecting to the teacher's tool…";
    setTimeout(connect, 1000);
  });
}

async function chooseFolder(files) {
  const chosen = {};
  let name = null;
  for (const file of files) {
    const parts = file.webkitRelativePath.split("/");
    if (parts.some((p) => p.startsWith(".") || p === "__pycache__")) continue;
    name = name || parts[0];
    chosen[parts.slice(1).join("/")] = await file.text();
  }
  if (!name) {
    notice("the folder holds no files to push", true);
    return;
  }
  project = { name, files: chosen };
  const python = Object.keys(chosen).filter((p) => p.endsWith(".py")).sort();
  const select = $("main");
  select.replaceChildren(...python.map((p) => new Option(p, p, p === "main.py", p === "main.py")));
  select.hidden = python.length === 0;
  $("project").textContent = `${name}: ${Object.keys(chosen).length} files`;
  $("push").disabled = false;
  $("run").disabled = python.length === 0;
}

function wire() {
  $("folder").addEventListener("change", (event) => chooseFolder(event.target.files));
  $("push").addEventListener("click", () => command("push", { project }));
  $("run").addEventListener("click", () => command("run", { project, main: $("main").value }));
  $("stop").addEventListener("click", () => command("stop"));
  $("lock").addEventListener("click", () =>
    command("lock", { message: $("lock-message").value || $("lock-message").placeholder }));
  $("unlock").addEventListener("click", () => command("unlock"));
  $("pair").addEventListener("click", () => command("pair"));
  $("select-all").addEventListener("change", (event) => {
    if (!event.target.checked) return;
    for (const device of devices.values()) {
      device.selected = false;
      device.tile.querySelector("input").checked = false;
    }
  });
  $("watch-close").addEventListener("click", () => $("watch").close());
  $("watch").addEventListener("close", () => watch(null));
  $("watch-stop").addEventListener("click", () => {
    if (watched) api("/api/stop", { devices: [watched] }).catch((e) => notice(e.message, true));
  });
  $("watch-input").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("watch-text").value + "\n";
    $("watch-text").value = "";
    api("/api/stdin", { device: watched, text }).catch((e) => notice(e.message, true));
  });
  if (!KEY) notice("open the address `further-link teach` printed (it carries the key)", true);
  connect();
}

wire();
