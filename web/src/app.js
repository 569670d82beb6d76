// further-link's own page: pair with the device, edit a project of files in
// CodeMirror, save it to the device, run it over the v5 /run websocket in a
// pseudo-terminal shown by xterm.js, and show what else the program sends
// (camera frames, plots, controls, a GUI window through noVNC).

import "./csp.js";
import RFB from "@novnc/novnc";
import { createCodeEditor } from "./code.js";
import { TerminalView } from "./terminal.js";
import {
  Project,
  SaveConflict,
  fileKey,
  fetchProject,
  fileEntryFromBytes,
  listProjects,
  reconcile,
  saveProject,
  untitledName,
  validFileName,
  validProjectName,
} from "./project.js";

// The device token never lives in this page's storage or in a URL: pairing
// sets an HttpOnly cookie that only the device can read. The page remembers
// only that it paired, and (per tab) which project is open.
const KEYS = {
  paired: "further-link:paired",
  oldToken: "further-link:token", // kept by older versions; removed on load
  textSize: "further-link:text-size",
  // "Unpair" pressed: ask for a code even if the pairing cookie would let us in.
  unpaired: "further-link:unpaired",
  project: "further-link:project", // sessionStorage: this tab's open project
};
const RETRY_DELAYS = [1, 2, 4, 8, 15, 30]; // seconds
// While a program runs, a ping every few seconds also tells the server we are
// alive when its own heartbeat waits behind a flood of output.
const PING_SECONDS = { idle: 20, running: 2 };
const SILENT_SECONDS = 50; // no message at all for this long: the link is dead
const KEEP_ALIVE_SECONDS = 30; // a run outlives a dropped connection this long (attach)
const TEXT_SIZES = [14, 16, 18, 20, 24, 28, 32, 40];
const DEFAULT_TEXT_SIZE = window.matchMedia("(max-width: 600px)").matches ? 16 : 18;
const GUI_SIZE = { width: 640, height: 480 };
const GUI_MODULES = /^\s*(?:import|from)\s+(?:turtle|tkinter|pygame|pyglet|guizero)\b/m;
const WELCOME = `# Write Python here and press Run (Ctrl+Enter).
name = input("What is your name? ")
print(f"Hello, {name}!")
`;

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------ storage

function makeStorage(area) {
  return {
    get(key) {
      try {
        return area().getItem(key);
      } catch {
        return null;
      }
    },
    set(key, value) {
      try {
        if (value === null) area().removeItem(key);
        else area().setItem(key, value);
      } catch {
        // private mode: the page still works, it just forgets on reload
      }
    },
  };
}
const storage = makeStorage(() => localStorage);
const tabStorage = makeStorage(() => sessionStorage);

// Older versions kept the token in storage and in addresses: forget both
// (an old bookmark's ?token= leaves the address bar and history).
function forgetStoredToken() {
  storage.set(KEYS.oldToken, null);
  const url = new URL(window.location.href);
  if (url.searchParams.get("token") === null) return;
  url.searchParams.delete("token");
  window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
}

// ------------------------------------------------------------ the page

const ui = {
  pairing: $("pairing"),
  workspace: $("workspace"),
  pairForm: $("pair-form"),
  pairCode: $("pair-code"),
  pairButton: $("pair-button"),
  pairMessage: $("pair-message"),
  connection: $("connection"),
  connectionText: $("connection-text"),
  retryNow: $("retry-now"),
  unpair: $("unpair"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  bannerClose: $("banner-close"),
  projectName: $("project-name"),
  save: $("save"),
  saveStatus: $("save-status"),
  projectList: $("project-list"),
  newProject: $("new-project"),
  run: $("run"),
  stop: $("stop"),
  runState: $("run-state"),
  clear: $("clear-output"),
  fileTabs: $("file-tabs"),
  newFile: $("new-file"),
  renameFile: $("rename-file"),
  deleteFile: $("delete-file"),
  pickFiles: $("pick-files"),
  filesStatus: $("files-status"),
  editor: $("editor"),
  binaryView: $("binary-view"),
  binaryText: $("binary-text"),
  binaryImage: $("binary-image"),
  tabOutput: $("tab-output"),
  tabShell: $("tab-shell"),
  terminal: $("terminal"),
  shellTerminal: $("shell-terminal"),
  queued: $("queued"),
  keys: $("keys"),
  cameraPanel: $("camera-panel"),
  frame: $("frame"),
  plotPanel: $("plot-panel"),
  plots: $("plots"),
  controlsPanel: $("controls-panel"),
  controls: $("controls"),
  guiPanel: $("gui-panel"),
  guiScreen: $("gui-screen"),
  smaller: $("smaller-text"),
  larger: $("larger-text"),
  deviceName: $("device-name"),
};

const link = {
  socket: null,
  opened: false,
  retries: 0,
  retryAt: 0,
  countdownTimer: null,
  pingTimer: null,
  lastHeard: 0,
  lastPing: 0,
};

let processCount = 0;
const nextProcessId = (kind) => `${kind}-${++processCount}`;

/** A program run or a shell: one process id on the /run socket, one terminal. */
function makeRun(kind, terminal) {
  return {
    kind,
    terminal,
    id: null,
    state: "idle", // idle | saving | starting | running | stopping | detached
    stopPressed: false,
    runId: null, // from `started`: lets a new connection attach to the run
    keys: new Set(),
    gui: false, // a `novnc` window came with this run
    stoppedAt: 0,
  };
}

let program = null;
let shell = null;
let project = null;
let activeFile = null;
let pendingFrame = null;
let rfb = null;

const editor = createCodeEditor(ui.editor, {
  label: "Python program",
  onRun: () => startProgram(),
  onChange: () => {
    if (project) {
      project.saved = false;
      saveDraftSoon();
      renderSaveStatus();
    }
  },
});

// ------------------------------------------------------------ messages to the person

function showBanner(text) {
  ui.bannerText.textContent = text;
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
  ui.bannerText.textContent = "";
}

function setConnection(state, text) {
  ui.connection.dataset.state = state;
  ui.connectionText.textContent = text;
  ui.retryNow.hidden = state !== "waiting";
  updateControls();
}

const RUN_STATE_TEXT = {
  idle: "",
  saving: "Saving…",
  starting: "Starting…",
  running: "Running",
  stopping: "Stopping…",
  detached: "Reconnecting to the program…",
};

function updateControls() {
  const connected = link.opened;
  ui.run.disabled = !connected || program.state !== "idle";
  ui.stop.disabled =
    !connected || !["starting", "running", "detached"].includes(program.state);
  if (program.state !== "idle") ui.runState.textContent = RUN_STATE_TEXT[program.state];
  ui.runState.dataset.state = program.state;
}

/** How a run ended, in words. `exitCode` as /run reports it: minus the signal when one ended it. */
function exitWords(exitCode, stopPressed) {
  if (exitCode === 0) return "Finished";
  if (exitCode === -9) return stopPressed ? "Stopped (forced)" : "Stopped by the device (it used too much)";
  if (exitCode === -15 || (stopPressed && exitCode < 0)) return "Stopped";
  if (exitCode === -2) return "Interrupted (Ctrl+C)";
  if (exitCode < 0) return `Ended by signal ${-exitCode}`;
  return `Finished with an error (exit code ${exitCode})`;
}

// ------------------------------------------------------------ screens

function showPairing(message) {
  closeSocket();
  clearRetry();
  ui.workspace.hidden = true;
  ui.pairing.hidden = false;
  ui.unpair.hidden = true;
  ui.pairMessage.textContent = message || "";
  ui.pairMessage.dataset.kind = message ? "warning" : "";
  setConnection("unpaired", "Not paired");
  ui.pairCode.focus();
}

function showWorkspace() {
  ui.pairing.hidden = true;
  ui.workspace.hidden = false;
  ui.unpair.hidden = false;
  program.terminal.resize();
}

// ------------------------------------------------------------ pairing

let pairLockTimer = null;

async function pair(event) {
  event.preventDefault();
  const typed = ui.pairCode.value.trim();
  const code = typed.replace(/[\s-]+/g, "");
  // The person at the device may paste the token `further-link token` prints.
  const isToken = code.length >= 20 && !/^\d+$/.test(code);
  if (!isToken && !/^\d{9}$/.test(code)) {
    pairMessage("error", "The pairing code is 9 digits: type the number the device shows.");
    return;
  }
  ui.pairButton.disabled = true;
  pairMessage("", "Pairing…");
  let response;
  let body = {};
  try {
    response = await fetch("/pair", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(isToken ? { token: typed } : { code }),
      cache: "no-store",
    });
    body = await response.json().catch(() => ({}));
  } catch (error) {
    ui.pairButton.disabled = false;
    pairMessage("error", `Cannot reach the device (${error.message}). Is further-link running?`);
    return;
  }
  ui.pairButton.disabled = false;
  if (response.ok) {
    storage.set(KEYS.paired, "yes");
    storage.set(KEYS.unpaired, null);
    ui.pairCode.value = "";
    pairMessage("", "");
    showWorkspace();
    begin();
    return;
  }
  const reason = body.error || `the device answered ${response.status} ${response.statusText}`;
  if (response.status === 429) {
    lockPairing(Number(response.headers.get("Retry-After")) || 60);
  } else {
    pairMessage("error", sentence(reason));
    ui.pairCode.select();
  }
}

function pairMessage(kind, text) {
  ui.pairMessage.dataset.kind = kind;
  ui.pairMessage.textContent = text;
}

// The device said (429) to wait: count down its Retry-After.
function lockPairing(seconds) {
  clearInterval(pairLockTimer);
  const until = Date.now() + seconds * 1000;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(pairLockTimer);
      ui.pairButton.disabled = false;
      pairMessage("", "You can try again now.");
      return;
    }
    ui.pairButton.disabled = true;
    pairMessage("error", `Too many wrong codes: pairing is locked. Try again in ${left} s.`);
  };
  tick();
  pairLockTimer = setInterval(tick, 1000);
}

// "wrong pairing code" -> "Wrong pairing code."
function sentence(text) {
  if (!text) return text;
  const capital = text[0].toUpperCase() + text.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

// ------------------------------------------------------------ the websocket

function socketUrl() {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}/run?pty=true`;
}

function connect() {
  clearRetry();
  closeSocket();
  showWorkspace();
  setConnection("connecting", "Connecting…");
  let socket;
  try {
    socket = new WebSocket(socketUrl());
  } catch (error) {
    showBanner(`Cannot open a connection: ${error.message}`);
    scheduleRetry();
    return;
  }
  link.socket = socket;
  link.opened = false;
  socket.addEventListener("open", () => {
    if (link.socket !== socket) return;
    link.opened = true;
    link.retries = 0;
    link.lastHeard = Date.now();
    hideBanner();
    setConnection("connected", "Connected");
    link.lastPing = Date.now();
    link.pingTimer = setInterval(keepAlive, 1000);
    reattach();
    refreshProjectList();
  });
  socket.addEventListener("message", (event) => {
    if (link.socket !== socket) return;
    link.lastHeard = Date.now();
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      showBanner("The device sent a message this page does not understand.");
      return;
    }
    handleMessage(message);
  });
  socket.addEventListener("close", (event) => {
    if (link.socket !== socket) return;
    const wasOpen = link.opened;
    link.socket = null;
    link.opened = false;
    clearInterval(link.pingTimer);
    if (wasOpen) connectionLost(event);
    else explainRefusal();
  });
}

function closeSocket() {
  const socket = link.socket;
  link.socket = null;
  link.opened = false;
  clearInterval(link.pingTimer);
  if (socket) socket.close(1000, "page closed the connection");
}

function keepAlive() {
  if (!link.socket || !link.opened) return;
  if (Date.now() - link.lastHeard > SILENT_SECONDS * 1000) {
    // A dead link may never finish a closing handshake: give up on it now.
    closeSocket();
    connectionLost({ code: 4000 });
    return;
  }
  const every = PING_SECONDS[program.state === "idle" ? "idle" : "running"];
  if (Date.now() - link.lastPing >= every * 1000) {
    link.lastPing = Date.now();
    send({ type: "ping" });
  }
}

function send(message) {
  if (!link.socket || !link.opened) return false;
  link.socket.send(JSON.stringify(message));
  return true;
}

function connectionLost(event) {
  for (const run of [program, shell]) {
    if (run.state === "idle") continue;
    if (run.runId && run.state !== "stopping") {
      // The device keeps the run for a while: attach to it again on reconnect.
      run.state = "detached";
    } else {
      runEnded(run, "Connection lost: the device ended the program.");
    }
  }
  updateControls();
  if (event.code === 1009) {
    showBanner(
      "The last message was larger than the device accepts (its FURTHER_LINK_MAX_MESSAGE_BYTES).",
    );
  } else if (event.code === 1001) {
    showBanner("The device's further-link server stopped.");
  }
  scheduleRetry();
}

// Browsers don't say why a websocket upgrade failed, so ask the same URL over
// plain HTTP: 401 means no token or a refused one, 403 a refused page address,
// 0 no answer; anything else (400: "not a websocket request") means come in.
async function accessStatus() {
  try {
    const response = await fetch(socketUrl().replace(/^ws/, "http"), { cache: "no-store" });
    return response.status;
  } catch {
    return 0;
  }
}

async function explainRefusal() {
  const status = await accessStatus();
  if (link.socket) return; // "Retry now" was pressed meanwhile
  if (status === 401) {
    const hadPaired = Boolean(storage.get(KEYS.paired));
    storage.set(KEYS.paired, null);
    showPairing(
      hadPaired
        ? "This device no longer accepts the pairing saved in this browser. " +
            "Type the code the device shows now to pair again."
        : "",
    );
    return;
  }
  if (status === 403) {
    showBanner(
      `The device refuses connections from this page's address (${window.location.origin}).`,
    );
  }
  scheduleRetry();
}

function scheduleRetry() {
  clearRetry();
  const delay = RETRY_DELAYS[Math.min(link.retries, RETRY_DELAYS.length - 1)];
  link.retries += 1;
  link.retryAt = Date.now() + delay * 1000;
  const tick = () => {
    const left = Math.ceil((link.retryAt - Date.now()) / 1000);
    if (left <= 0) {
      connect();
      return;
    }
    setConnection("waiting", `Disconnected, retrying in ${left} s`);
  };
  tick();
  link.countdownTimer = setInterval(tick, 250);
}

function clearRetry() {
  clearInterval(link.countdownTimer);
  link.countdownTimer = null;
}

// ------------------------------------------------------------ protocol events

function runFor(processId) {
  if (processId && program.id === processId) return program;
  if (processId && shell.id === processId) return shell;
  return null;
}

function handleMessage(message) {
  const data = message.data || {};
  const run = runFor(message.process);
  switch (message.type) {
    case "started":
      if (!run) break;
      if (run.state !== "stopping") run.state = "running";
      if (typeof data.runId === "string") run.runId = data.runId;
      ui.queued.hidden = true;
      sendResize(run, run.terminal.size);
      if (run === program) updateControls();
      if (document.activeElement !== ui.stop && isShown(run)) run.terminal.focus();
      break;
    case "stdout":
    case "stderr":
      if (!run) break;
      if (run.state === "detached") {
        // Attached again: the device replays the run's kept output from its
        // start, then the live output; shown once, it replaces what was here.
        run.terminal.clear();
        run.state = "running";
        updateControls();
      }
      run.terminal.write(String(data.output ?? ""));
      break;
    case "stopped":
      if (run) runEnded(run, exitWords(Number(data.exitCode), run.stopPressed));
      break;
    case "keylisten":
      if (run) {
        run.keys.add(String(data.output ?? ""));
        renderKeys();
      }
      break;
    case "video":
      // After a GUI window, the device sends its last screen as a frame: it
      // stays in the window's panel.
      if (run === program && program.gui) showGuiFrame(String(data.output ?? ""));
      else if (run === program) showFrame(String(data.output ?? ""));
      break;
    case "plot":
      if (run === program || !message.process) showPlot(data);
      break;
    case "controls":
      if (run === program || !message.process) showControls(data.controls);
      break;
    case "queued":
      showQueued(data);
      break;
    case "novnc":
      if (run === program) showGui(data);
      break;
    case "pong":
      break;
    case "error":
      serverError(String(data.message ?? "unknown error"), run);
      break;
    default:
      break; // newer devices may say more: ignored, as Further does
  }
}

function serverError(text, run) {
  showBanner(`The device says: ${text}`);
  if (run && ["starting", "detached"].includes(run.state)) {
    runEnded(run, run.state === "detached" ? "Connection lost: the device ended the program." : "Did not start");
  } else if (run) {
    run.terminal.write(`\r\n\x1b[31mError: ${text}\x1b[0m\r\n`);
  }
}

function runEnded(run, words) {
  run.state = "idle";
  run.runId = null;
  run.stoppedAt = performance.now();
  run.terminal.finish(`\r\n\x1b[1;36m── ${words} ──\x1b[0m\r\n`, run.stopPressed);
  run.stopPressed = false;
  run.keys.clear();
  renderKeys();
  ui.queued.hidden = true;
  if (run === program) {
    ui.runState.textContent = words;
    ui.runState.dataset.state = "idle";
    updateControls();
  }
  if (run === shell) ui.tabShell.textContent = "Shell";
}

function sendResize(run, size) {
  if (!run.id || !["running", "stopping"].includes(run.state)) return;
  send({ type: "resize", process: run.id, data: { rows: size.rows, cols: size.cols } });
}

function sendInput(run, text) {
  if (run.state !== "running") return;
  send({ type: "stdin", process: run.id, data: { input: text } });
}

// Ask for runs the device kept while the connection was away; each stays
// "detached" until its output or `stopped` comes, or an error says it is gone.
function reattach() {
  for (const run of [program, shell]) {
    if (run.state === "detached" && run.runId) {
      send({ type: "attach", process: run.id, data: { runId: run.runId } });
    }
  }
  updateControls();
}

// ------------------------------------------------------------ what programs show besides text

function showFrame(base64) {
  const first = pendingFrame === null && !ui.frame.src;
  pendingFrame = base64;
  ui.cameraPanel.hidden = false;
  if (first) {
    ui.frame.src = `data:image/jpeg;base64,${pendingFrame}`;
    pendingFrame = null;
    return;
  }
  // At most one new picture per screen refresh, however fast they come.
  requestAnimationFrame(() => {
    if (pendingFrame === null) return;
    ui.frame.src = `data:image/jpeg;base64,${pendingFrame}`;
    pendingFrame = null;
  });
}

function showPlot({ figure, png, width, height }) {
  const id = `plot-${Number(figure) || 0}`;
  let image = ui.plots.querySelector(`[data-figure="${id}"]`);
  if (!image) {
    image = document.createElement("img");
    image.dataset.figure = id;
    image.alt = `Figure ${Number(figure) || 0} drawn by the program`;
    ui.plots.append(image);
  }
  if (width) image.width = Number(width);
  if (height) image.height = Number(height);
  image.src = `data:image/png;base64,${String(png ?? "")}`;
  ui.plotPanel.hidden = false;
}

function showControls(controls) {
  const list = Array.isArray(controls) ? controls : [];
  const items = list.map((control) => {
    const id = String(control.id ?? "");
    const label = String(control.label ?? id);
    if (control.kind === "slider") {
      const wrap = document.createElement("label");
      wrap.className = "control-slider";
      const name = document.createElement("span");
      const value = document.createElement("output");
      const input = document.createElement("input");
      input.type = "range";
      for (const key of ["min", "max", "step", "value"]) {
        if (control[key] !== undefined) input[key] = String(control[key]);
      }
      name.textContent = label;
      value.textContent = input.value;
      input.addEventListener("input", () => {
        value.textContent = input.value;
        send({ type: "control", process: program.id, data: { id, value: Number(input.value) } });
      });
      wrap.append(name, input, value);
      return wrap;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", () => send({ type: "control", process: program.id, data: { id } }));
    return button;
  });
  ui.controls.replaceChildren(...items);
  ui.controlsPanel.hidden = items.length === 0;
}

function showQueued({ resource, position }) {
  const place = Number(position) === 1 ? "you are next" : `${Number(position) - 1} before you`;
  ui.queued.textContent = resource
    ? `Waiting for ${resource}: ${place}`
    : `Waiting for the device: ${place}`;
  ui.queued.hidden = false;
}

function showGui({ port, path }) {
  closeGui();
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const route = String(path || "/websockify");
  const url = `${scheme}//${window.location.hostname}:${Number(port)}${route.startsWith("/") ? route : `/${route}`}`;
  program.gui = true;
  ui.guiPanel.hidden = false;
  ui.guiScreen.replaceChildren();
  try {
    rfb = new RFB(ui.guiScreen, url);
    rfb.scaleViewport = true;
    rfb.viewOnly = false;
    rfb.addEventListener("disconnect", () => {
      rfb = null;
    });
  } catch (error) {
    showBanner(`Cannot show the program's window: ${error.message}`);
  }
}

function showGuiFrame(base64) {
  closeGui();
  const image = document.createElement("img");
  image.alt = "The program's window as it last looked";
  image.src = `data:image/jpeg;base64,${base64}`;
  ui.guiScreen.replaceChildren(image);
  ui.guiPanel.hidden = false;
}

function closeGui() {
  if (rfb) {
    try {
      rfb.disconnect();
    } catch {
      // already gone
    }
    rfb = null;
  }
}

function renderKeys() {
  const keys = [...program.keys].filter(Boolean);
  ui.keys.hidden = keys.length === 0;
  ui.keys.textContent = keys.length
    ? `This program listens to keys: ${keys.map((key) => (key === " " ? "Space" : key)).join(", ")}. Click the output and press them.`
    : "";
}

// Keys the program listens to go to it as key events, not to its input.
function keyHandler(run) {
  return (event) => {
    if (run.state !== "running" || !run.keys.has(event.key)) return true;
    if (event.type === "keydown" && !event.repeat) {
      send({ type: "keyevent", process: run.id, data: { key: event.key, event: "keydown" } });
    } else if (event.type === "keyup") {
      send({ type: "keyevent", process: run.id, data: { key: event.key, event: "keyup" } });
    }
    event.preventDefault();
    return false;
  };
}

// ------------------------------------------------------------ running

function isShown(run) {
  return run === program ? !ui.terminal.hidden : !ui.shellTerminal.hidden;
}

async function startProgram() {
  if (!link.opened || program.state !== "idle") return;
  const entry = project.entryPoint(activeFile);
  if (!entry) {
    showBanner("The project has no Python file to run: add one ending in .py.");
    return;
  }
  showTerminal("output");
  hideBanner();
  program.state = "saving";
  updateControls();
  if (!(await save())) {
    program.state = "idle";
    ui.runState.textContent = "Not started: the project could not be saved";
    updateControls();
    return;
  }
  program.terminal.clear();
  program.keys.clear();
  renderKeys();
  ui.cameraPanel.hidden = true;
  ui.frame.removeAttribute("src");
  pendingFrame = null;
  ui.plots.replaceChildren();
  ui.plotPanel.hidden = true;
  showControls([]);
  closeGui();
  program.gui = false;
  ui.guiPanel.hidden = true;
  program.id = nextProcessId("run");
  program.runId = null;
  const data = {
    runner: "python3",
    path: `${project.name}/${entry}`,
    keepAlive: KEEP_ALIVE_SECONDS,
  };
  if (usesGui()) data.novncOptions = { enabled: true, ...GUI_SIZE };
  if (send({ type: "start", process: program.id, data })) {
    program.state = "starting";
  } else {
    program.state = "idle";
  }
  updateControls();
}

function usesGui() {
  for (const [name, entry] of project.files) {
    if (entry.kind === "text" && name.endsWith(".py") && GUI_MODULES.test(editor.text(name) ?? "")) {
      return true;
    }
  }
  return false;
}

function stopProgram() {
  if (!program.id) return;
  program.stopPressed = true;
  if (program.state === "detached" && !link.opened) {
    // The device ends a kept run itself when no one attaches in time.
    runEnded(program, "Stopped");
    return;
  }
  if (send({ type: "stop", process: program.id })) {
    program.terminal.hold();
    program.state = "stopping";
    updateControls();
  }
}

function startShell() {
  if (!link.opened || shell.state !== "idle") return;
  shell.id = nextProcessId("shell");
  shell.terminal.clear();
  const data = { runner: "shell", path: project.name, keepAlive: KEEP_ALIVE_SECONDS };
  if (send({ type: "start", process: shell.id, data })) {
    shell.state = "starting";
    ui.tabShell.textContent = "Shell (running)";
  }
}

function showTerminal(which) {
  const output = which === "output";
  ui.terminal.hidden = !output;
  ui.shellTerminal.hidden = output;
  ui.tabOutput.setAttribute("aria-selected", String(output));
  ui.tabShell.setAttribute("aria-selected", String(!output));
  const run = output ? program : shell;
  run.terminal.resize();
  if (!output && shell.state === "idle") startShell();
  run.terminal.focus();
}

// ------------------------------------------------------------ the project

const DRAFT_PREFIX = "further-link:draft:";
let draftTimer = null;

function saveDraftSoon() {
  clearTimeout(draftTimer);
  draftTimer = setTimeout(saveDraft, 300);
}

// Unsaved edits survive a reload even when the device is away.
function saveDraft() {
  if (!project) return;
  const files = {};
  for (const [name, entry] of project.files) {
    files[name] = entry.kind === "text" ? { text: editor.text(name) ?? "" } : { data: entry.data };
  }
  const draft = JSON.stringify({
    files,
    active: activeFile,
    version: project.version,
    saved: project.saved,
    base: [...project.base],
  });
  try {
    localStorage.setItem(DRAFT_PREFIX + project.name, draft);
  } catch {
    // too big for this browser's storage: the device has the saved copy
  }
}

function loadDraft(name) {
  try {
    const draft = JSON.parse(storage.get(DRAFT_PREFIX + name) || "null");
    if (!draft || typeof draft.files !== "object") return null;
    const loaded = new Project(name);
    loaded.version = typeof draft.version === "string" ? draft.version : null;
    loaded.saved = Boolean(draft.saved);
    if (Array.isArray(draft.base)) loaded.base = new Map(draft.base);
    const texts = new Map();
    for (const [path, file] of Object.entries(draft.files)) {
      if (typeof file.text === "string") {
        loaded.files.set(path, { kind: "text" });
        texts.set(path, file.text);
      } else if (typeof file.data === "string") {
        loaded.files.set(path, { kind: "base64", data: file.data, size: Math.floor((file.data.length * 3) / 4) });
      }
    }
    return { project: loaded, texts, active: draft.active };
  } catch {
    return null;
  }
}

function localProjectNames() {
  const names = [];
  try {
    for (let at = 0; at < localStorage.length; at += 1) {
      const key = localStorage.key(at);
      if (key && key.startsWith(DRAFT_PREFIX)) names.push(key.slice(DRAFT_PREFIX.length));
    }
  } catch {
    // no storage
  }
  return names;
}

function useProject(loaded, texts, active) {
  project = loaded;
  editor.clear();
  for (const [name, text] of texts) editor.reset(name, text);
  tabStorage.set(KEYS.project, project.name);
  ui.projectName.value = project.name;
  const names = [...project.files.keys()];
  openFile(active && project.files.has(active) ? active : project.entryPoint(null) ?? names[0] ?? null);
  renderSaveStatus();
}

function newProject() {
  const fresh = new Project(untitledName());
  fresh.files.set("main.py", { kind: "text" });
  useProject(fresh, new Map([["main.py", WELCOME]]), "main.py");
  saveDraft();
}

async function openProject(name) {
  const fromDevice = await fetchProject(name);
  const draft = loadDraft(name);
  // Unsaved edits of this browser are kept; saving them then finds out what
  // changed on the device meanwhile (catchUp).
  if (draft && !draft.project.saved) {
    useProject(draft.project, draft.texts, draft.active);
  } else if (fromDevice) {
    useProject(fromDevice.project, fromDevice.texts, draft?.active);
  } else if (draft) {
    useProject(draft.project, draft.texts, draft.active);
  } else {
    return false;
  }
  return true;
}

async function save() {
  ui.saveStatus.textContent = "Saving…";
  try {
    await saveOnce();
  } catch (error) {
    if (!(error instanceof SaveConflict) || !(await catchUp())) {
      notSaved(error);
      return false;
    }
    try {
      await saveOnce();
    } catch (again) {
      notSaved(again);
      return false;
    }
  }
  renderSaveStatus();
  refreshProjectList();
  return true;
}

async function saveOnce() {
  const files = project.uploadFiles((name) => editor.text(name));
  project.version = await saveProject(project.name, files, project.version);
  project.saved = true;
  project.setBase(files);
  saveDraft();
}

// The device's copy changed since this page opened or saved it. Files only the
// device has (a program wrote them, another tab added them) join the project;
// a file changed there and here, or there and deleted here, is a conflict.
async function catchUp() {
  const device = await fetchProject(project.name);
  if (!device) return false;
  const mine = project.uploadFiles((name) => editor.text(name));
  const { adopt, conflicts } = reconcile(project.base, mine, device.files);
  if (conflicts.length) {
    showBanner(
      `Not saved: ${conflicts.join(", ")} changed on the device since this page opened ` +
        `${project.name} (perhaps in another tab). Open the project again to see those ` +
        "changes, or save under a new name.",
    );
    return false;
  }
  for (const [name, file] of Object.entries(adopt)) {
    if (file.type === "text") {
      project.files.set(name, { kind: "text" });
      editor.reset(name, device.texts.get(name) ?? "");
    } else {
      project.files.set(name, device.project.files.get(name));
    }
  }
  project.version = device.project.version;
  for (const [name, file] of Object.entries(device.files)) project.base.set(name, fileKey(file));
  renderTabs();
  return true;
}

function notSaved(error) {
  const conflict = error instanceof SaveConflict;
  ui.saveStatus.textContent = conflict ? "Not saved: changed elsewhere" : "Not saved";
  if (conflict && !ui.banner.hidden) return; // catchUp said which files
  showBanner(
    conflict
      ? `Not saved: the project ${project.name} changed on the device since this page opened it ` +
          "(perhaps in another tab). Open it again to see those changes, or save under a new name."
      : `Not saved: ${error.message}`,
  );
}

function renderSaveStatus() {
  if (!project) return;
  ui.saveStatus.textContent = project.saved ? "Saved on the device" : "Not saved yet";
}

async function refreshProjectList() {
  const onDevice = await listProjects();
  const names = new Set(localProjectNames());
  for (const item of onDevice ?? []) names.add(String(item.name));
  const options = [...names].sort().map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    return option;
  });
  const first = document.createElement("option");
  first.value = "";
  first.textContent = "Open a project…";
  ui.projectList.replaceChildren(first, ...options);
}

async function renameProject() {
  const name = ui.projectName.value.trim();
  if (name === project.name) return;
  const problem = validProjectName(name);
  if (problem) {
    showBanner(problem);
    ui.projectName.value = project.name;
    return;
  }
  // Saving under the name of another project would replace its files.
  const onDevice = await listProjects();
  if (onDevice && onDevice.some((item) => item.name === name)) {
    showBanner(
      `The device already has a project called ${name}: open it with "Open a project…", ` +
        "or choose another name.",
    );
    ui.projectName.value = project.name;
    return;
  }
  // The same files under a new name: a new directory on the device at the next save.
  project.name = name;
  project.version = null;
  project.saved = false;
  tabStorage.set(KEYS.project, name);
  saveDraft();
  renderSaveStatus();
  renderTabs();
}

// ------------------------------------------------------------ files of the project

function openFile(name) {
  activeFile = name;
  const entry = name ? project.files.get(name) : null;
  const text = entry?.kind === "text";
  ui.editor.hidden = !text;
  ui.binaryView.hidden = text || !entry;
  if (text) {
    editor.open(name);
  } else if (entry) {
    ui.binaryText.textContent = `${name}: ${formatSize(entry.size)}, not text; your program can open it.`;
    const type = imageType(name);
    ui.binaryImage.hidden = !type;
    if (type) {
      ui.binaryImage.src = `data:${type};base64,${entry.data}`;
      ui.binaryImage.alt = name;
    }
  }
  renderTabs();
  saveDraftSoon();
}

function imageType(name) {
  const extension = name.split(".").pop().toLowerCase();
  return { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp" }[extension];
}

function renderTabs() {
  const names = [...project.files.keys()].sort((a, b) => a.localeCompare(b));
  ui.fileTabs.replaceChildren(
    ...names.map((name) => {
      const tab = document.createElement("button");
      tab.type = "button";
      tab.setAttribute("role", "tab");
      tab.setAttribute("aria-selected", String(name === activeFile));
      tab.tabIndex = name === activeFile ? 0 : -1;
      tab.textContent = name;
      tab.addEventListener("click", () => openFile(name));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!step) return;
        const next = names[(names.indexOf(name) + step + names.length) % names.length];
        openFile(next);
        ui.fileTabs.querySelector('[aria-selected="true"]')?.focus();
      });
      return tab;
    }),
  );
  ui.renameFile.disabled = !activeFile;
  ui.deleteFile.disabled = !activeFile;
  const count = project.files.size;
  ui.filesStatus.textContent = `${count} ${count === 1 ? "file" : "files"} in ${project.name}`;
}

function askFileName(question, suggestion) {
  const name = window.prompt(question, suggestion);
  if (name === null) return null;
  const trimmed = name.trim();
  const problem = validFileName(trimmed);
  if (problem) {
    showBanner(problem);
    return null;
  }
  if (project.files.has(trimmed)) {
    showBanner(`The project already has a file called ${trimmed}.`);
    return null;
  }
  return trimmed;
}

function newFile() {
  const name = askFileName("Name of the new file (e.g. helper.py or data.csv):", "");
  if (!name) return;
  project.files.set(name, { kind: "text" });
  editor.reset(name, "");
  project.saved = false;
  openFile(name);
  renderSaveStatus();
  if (!ui.editor.hidden) editor.focus();
}

function renameFile() {
  if (!activeFile) return;
  const name = askFileName(`New name for ${activeFile}:`, activeFile);
  if (!name) return;
  const entry = project.files.get(activeFile);
  if (entry.kind === "text") editor.rename(activeFile, name);
  project.files.delete(activeFile);
  project.files.set(name, entry);
  project.saved = false;
  openFile(name);
  renderSaveStatus();
}

function deleteFile() {
  if (!activeFile || !window.confirm(`Delete ${activeFile} from the project?`)) return;
  project.files.delete(activeFile);
  editor.forget(activeFile);
  project.saved = false;
  openFile(project.entryPoint(null) ?? [...project.files.keys()][0] ?? null);
  renderSaveStatus();
}

async function addFiles(input) {
  const files = Array.from(input.files || []);
  input.value = "";
  let last = null;
  for (const file of files) {
    const name = file.name;
    if (validFileName(name)) continue;
    const entry = fileEntryFromBytes(new Uint8Array(await file.arrayBuffer()));
    if (entry.kind === "text") {
      project.files.set(name, { kind: "text" });
      editor.reset(name, entry.text);
    } else {
      project.files.set(name, entry);
    }
    last = name;
  }
  if (!last) return;
  project.saved = false;
  openFile(last);
  renderSaveStatus();
  await save();
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

// ------------------------------------------------------------ text size

function applyTextSize(size) {
  document.documentElement.style.fontSize = `${size}px`;
  storage.set(KEYS.textSize, String(size));
  ui.smaller.disabled = size <= TEXT_SIZES[0];
  ui.larger.disabled = size >= TEXT_SIZES[TEXT_SIZES.length - 1];
  if (program) program.terminal.resize();
  if (shell) shell.terminal.resize();
}

function stepTextSize(step) {
  const current = Number(storage.get(KEYS.textSize)) || DEFAULT_TEXT_SIZE;
  let index = TEXT_SIZES.findIndex((size) => size >= current);
  if (index === -1) index = TEXT_SIZES.length - 1;
  index = Math.min(TEXT_SIZES.length - 1, Math.max(0, index + step));
  applyTextSize(TEXT_SIZES[index]);
}

// ------------------------------------------------------------ start

program = makeRun(
  "program",
  new TerminalView(ui.terminal, {
    label: "Program output: type here when your program asks",
    onData: (text) => sendInput(program, text),
    onResize: (size) => sendResize(program, size),
  }),
);
shell = makeRun(
  "shell",
  new TerminalView(ui.shellTerminal, {
    label: "Shell on the device",
    onData: (text) => {
      if (shell.state === "idle" && text === "\r") startShell();
      else sendInput(shell, text);
    },
    onResize: (size) => sendResize(shell, size),
  }),
);
program.terminal.terminal.attachCustomKeyEventHandler(keyHandler(program));
// For tests and figures: what the terminals show, and how much went to them.
window.furtherLink = { program, shell, editor };

ui.pairForm.addEventListener("submit", pair);
ui.retryNow.addEventListener("click", connect);
ui.unpair.addEventListener("click", () => {
  storage.set(KEYS.paired, null);
  storage.set(KEYS.unpaired, "yes");
  // The pairing cookie is HttpOnly: ask the device to clear it.
  fetch("/pair", { method: "DELETE" }).catch(() => {});
  showPairing("This browser forgot the device. Type the pairing code to pair again.");
});
ui.bannerClose.addEventListener("click", hideBanner);
ui.run.addEventListener("click", () => startProgram());
ui.stop.addEventListener("click", stopProgram);
ui.clear.addEventListener("click", () => (ui.terminal.hidden ? shell : program).terminal.clear());
ui.save.addEventListener("click", () => save());
ui.projectName.addEventListener("change", renameProject);
ui.projectName.addEventListener("keydown", (event) => {
  if (event.key === "Enter") renameProject();
});
ui.newProject.addEventListener("click", newProject);
ui.projectList.addEventListener("change", async () => {
  const name = ui.projectList.value;
  ui.projectList.value = "";
  if (name && !(await openProject(name))) showBanner(`The project ${name} is not on the device.`);
});
ui.newFile.addEventListener("click", newFile);
ui.renameFile.addEventListener("click", renameFile);
ui.deleteFile.addEventListener("click", deleteFile);
ui.pickFiles.addEventListener("change", () => addFiles(ui.pickFiles));
ui.tabOutput.addEventListener("click", () => showTerminal("output"));
ui.tabShell.addEventListener("click", () => showTerminal("shell"));
ui.smaller.addEventListener("click", () => stepTextSize(-1));
ui.larger.addEventListener("click", () => stepTextSize(1));
document.addEventListener("keydown", (event) => {
  // The editor runs on Ctrl+Enter itself; elsewhere on the page too.
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !ui.editor.contains(event.target)) {
    if (!ui.workspace.hidden) {
      event.preventDefault();
      startProgram();
    }
  }
});
window.addEventListener("pagehide", saveDraft);

ui.deviceName.textContent = window.location.host;
applyTextSize(Number(storage.get(KEYS.textSize)) || DEFAULT_TEXT_SIZE);
forgetStoredToken();
const remembered = tabStorage.get(KEYS.project);
const draft = remembered ? loadDraft(remembered) : null;
if (draft) useProject(draft.project, draft.texts, draft.active);
else newProject();

function begin() {
  if (remembered) {
    // The device's copy, when this tab's draft has no unsaved edits.
    openProject(remembered).catch(() => {});
  }
  connect();
}

if (storage.get(KEYS.paired)) {
  begin();
} else if (storage.get(KEYS.unpaired)) {
  showPairing();
} else {
  // Not paired in this browser: the pairing cookie or FURTHER_LINK_AUTH=off
  // may still let us in; otherwise pair first.
  setConnection("connecting", "Connecting…");
  accessStatus().then((status) => (status === 401 ? showPairing() : begin()));
}
