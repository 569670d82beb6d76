// further-link's own page: pair with the device, edit a Python program, run it
// over /run-py and show what it prints and the pictures it sends.

import { createEditor } from "./editor.js";

// The device token never lives in this page's storage or in a URL: pairing
// sets an HttpOnly cookie that only the device can read. The page remembers
// only that it paired.
const KEYS = {
  paired: "further-link:paired",
  oldToken: "further-link:token", // kept by older versions; removed on load
  program: "further-link:program",
  uploadDir: "further-link:upload-dir",
  textSize: "further-link:text-size",
  // "Unpair" pressed: ask for a code even if the pairing cookie would let us in.
  unpaired: "further-link:unpaired",
};
const CONSOLE_MAX_CHARS = 2_000_000; // keep the last ~2 MB of output
const CHUNK_CHARS = 32_768;
const RETRY_DELAYS = [1, 2, 4, 8, 15, 30]; // seconds
// While a program runs, a ping every few seconds also tells the server we are
// alive when its own heartbeat waits behind a flood of output.
const PING_SECONDS = { idle: 20, running: 2 };
const SILENT_SECONDS = 50; // no message at all for this long: the link is dead
const MAX_MESSAGE_BYTES = 15 * 1024 * 1024; // below the server's default 16 MiB
const TEXT_SIZES = [14, 16, 18, 20, 24, 28, 32, 40];
const DEFAULT_TEXT_SIZE = window.matchMedia("(max-width: 600px)").matches ? 16 : 18;
const WELCOME = `# Write Python here and press Run (Ctrl+Enter).
name = input("What is your name? ")
print(f"Hello, {name}!")
`;

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------ storage

const storage = {
  get(key) {
    try {
      return localStorage.getItem(key);
    } catch {
      return null;
    }
  },
  set(key, value) {
    try {
      if (value === null) localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch {
      // private mode: the page still works, it just forgets on reload
    }
  },
};

// Older versions kept the token in storage and in addresses: forget both
// (an old bookmark's ?token= leaves the address bar and history).
function forgetStoredToken() {
  storage.set(KEYS.oldToken, null);
  const url = new URL(window.location.href);
  if (url.searchParams.get("token") === null) return;
  url.searchParams.delete("token");
  window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
}

// ------------------------------------------------------------ console

/**
 * The output panel, fast with any amount of output: text is queued and added
 * once per frame, into blocks of whole lines (so the browser lays out only the
 * newest block again), and the oldest blocks go beyond CONSOLE_MAX_CHARS.
 */
class OutputConsole {
  constructor(element) {
    this.element = element;
    this.stick = true; // follow new output while scrolled to the bottom
    // Only the person scrolling decides whether to follow: heights of blocks not
    // yet laid out are estimates, so the page's own scrolls can land short.
    this.userScrollUntil = 0;
    const userScrolls = () => {
      this.userScrollUntil = performance.now() + 400;
    };
    for (const kind of ["wheel", "touchstart", "touchmove", "pointerdown", "keydown"]) {
      element.addEventListener(kind, userScrolls, { passive: true });
    }
    element.addEventListener(
      "scroll",
      () => {
        const atBottom = element.scrollHeight - element.scrollTop - element.clientHeight < 24;
        if (performance.now() < this.userScrollUntil) {
          this.stick = atBottom;
        } else if (this.stick && !atBottom) {
          element.scrollTop = element.scrollHeight; // the layout grew under us: follow it
        }
      },
      { passive: true },
    );
    this.clear();
  }

  write(kind, text) {
    if (!text) return;
    this.pending.push([kind, text]);
    this.pendingSize += text.length;
    // A hidden tab gets no animation frames: never queue more than we keep.
    while (this.pendingSize > CONSOLE_MAX_CHARS && this.pending.length > 1) {
      this.pendingSize -= this.pending.shift()[1].length;
      this.showTrimmed();
    }
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => this.flush());
    }
  }

  /** A line of its own (exit code, errors): starts on a fresh line. */
  line(kind, text) {
    const last = this.pending[this.pending.length - 1];
    const block = this.blocks[this.blocks.length - 1];
    const fresh = last ? last[1].endsWith("\n") : !block || block.endsWithNewline;
    this.write(kind, `${fresh ? "" : "\n"}${text}\n`);
  }

  flush() {
    this.scheduled = false;
    for (const [kind, text] of this.pending) this.append(kind, text);
    this.pending = [];
    this.pendingSize = 0;
    const last = this.blocks[this.blocks.length - 1];
    if (last) estimateHeight(last);
    while (this.size > CONSOLE_MAX_CHARS && this.blocks.length > 1) {
      const oldest = this.blocks.shift();
      oldest.node.remove();
      this.size -= oldest.size;
      this.showTrimmed();
    }
    if (this.stick) this.element.scrollTop = this.element.scrollHeight;
  }

  append(kind, text) {
    let at = 0;
    while (at < text.length) {
      let block = this.blocks[this.blocks.length - 1];
      const full = block && block.size >= CHUNK_CHARS;
      if (!block || (full && (block.endsWithNewline || block.size >= CHUNK_CHARS * 4))) {
        block = this.newBlock();
      }
      // Fill the block to CHUNK_CHARS and then to the end of that line; a
      // line longer than a few blocks is split anyway.
      const room = Math.max(0, CHUNK_CHARS - block.size);
      const newline = text.indexOf("\n", at + Math.max(0, room - 1));
      let end = newline === -1 ? text.length : newline + 1;
      end = Math.min(end, at + CHUNK_CHARS * 4 - block.size);
      this.addToBlock(block, kind, text.slice(at, end));
      at = end;
    }
  }

  newBlock() {
    const previous = this.blocks[this.blocks.length - 1];
    if (previous) estimateHeight(previous);
    const node = document.createElement("div");
    node.className = "out-block";
    this.element.append(node);
    const block = { node, size: 0, lines: 0, endsWithNewline: true, kind: null, text: null };
    this.blocks.push(block);
    return block;
  }

  addToBlock(block, kind, piece) {
    if (block.kind === kind) {
      block.text.appendData(piece);
    } else {
      const span = document.createElement("span");
      span.className = `out-${kind}`;
      block.text = document.createTextNode(piece);
      span.append(block.text);
      block.node.append(span);
      block.kind = kind;
    }
    block.size += piece.length;
    for (let at = piece.indexOf("\n"); at !== -1; at = piece.indexOf("\n", at + 1)) {
      block.lines += 1;
    }
    block.endsWithNewline = piece.endsWith("\n");
    this.size += piece.length;
  }

  showTrimmed() {
    if (this.trimNotice) return;
    this.trimNotice = document.createElement("div");
    this.trimNotice.className = "out-notice";
    this.trimNotice.textContent = "Earlier output was removed to keep the page fast.";
    this.element.prepend(this.trimNotice);
  }

  clear() {
    this.element.replaceChildren();
    this.blocks = []; // {node, size, lines, endsWithNewline, kind, text}
    this.size = 0;
    this.pending = [];
    this.pendingSize = 0;
    this.scheduled = false;
    this.trimNotice = null;
    this.stick = true;
  }
}

// Blocks out of sight are not laid out (content-visibility: auto); until one
// has been seen, its line count stands in for its height.
function estimateHeight(block) {
  block.node.style.containIntrinsicSize = `auto ${block.lines + 1}lh`;
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
  run: $("run"),
  stop: $("stop"),
  runState: $("run-state"),
  clear: $("clear-output"),
  console: $("console"),
  stdinForm: $("stdin-form"),
  stdin: $("stdin"),
  sendStdin: $("send-stdin"),
  cameraPanel: $("camera-panel"),
  frame: $("frame"),
  dropZone: $("drop-zone"),
  pickFiles: $("pick-files"),
  pickFolder: $("pick-folder"),
  filesStatus: $("files-status"),
  fileList: $("file-list"),
  clearFiles: $("clear-files"),
  smaller: $("smaller-text"),
  larger: $("larger-text"),
  deviceName: $("device-name"),
};

const output = new OutputConsole(ui.console);

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

const run = {
  state: "idle", // idle | starting | running | stopping
};

const uploads = {
  files: new Map(), // alias -> text
  directory: null,
  ready: false, // the device has the current set of files
  pending: false,
  note: "", // what went wrong with the last files added, until the next ones
};

let pendingFrame = null;

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

function updateControls() {
  const connected = link.opened;
  const busy = run.state !== "idle";
  ui.run.disabled = !connected || busy || uploads.pending;
  ui.stop.disabled = !connected || (run.state !== "running" && run.state !== "starting");
  ui.stdin.disabled = !connected || run.state !== "running";
  ui.sendStdin.disabled = ui.stdin.disabled;
  ui.runState.textContent =
    { idle: "", starting: "starting…", running: "running…", stopping: "stopping…" }[run.state] ||
    "";
  if (uploads.pending) ui.run.title = "waiting for the files to upload";
  else ui.run.removeAttribute("title");
}

function exitText(code) {
  return code < 0 ? `stopped (signal ${-code})` : `exited with code ${code}`;
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
    connect();
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
  return `${scheme}//${window.location.host}/run-py`;
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
    if (uploads.files.size && !uploads.ready) sendUpload();
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
  const every = PING_SECONDS[run.state === "idle" ? "idle" : "running"];
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
  if (run.state !== "idle") {
    output.line("system", "Connection lost: the device ended the program.");
    run.state = "idle";
  }
  uploads.pending = false;
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

function handleMessage(message) {
  const data = message.data || {};
  switch (message.type) {
    case "started":
      run.state = run.state === "stopping" ? "stopping" : "running";
      updateControls();
      if (document.activeElement !== ui.stop) ui.stdin.focus();
      break;
    case "stdout":
    case "stderr":
      output.write(message.type, String(data.output ?? ""));
      break;
    case "video":
      showFrame(String(data.output ?? ""));
      break;
    case "stopped":
      output.line("exit", exitText(Number(data.exitCode)));
      run.state = "idle";
      updateControls();
      break;
    case "uploaded":
      uploads.pending = false;
      uploads.ready = true;
      renderFiles();
      updateControls();
      break;
    case "pong":
      break;
    case "error":
      serverError(String(data.message ?? "unknown error"));
      break;
    default:
      break;
  }
}

function serverError(text) {
  showBanner(`The device says: ${text}`);
  output.line("error", `Error: ${text}`);
  if (uploads.pending) {
    uploads.pending = false;
    uploads.ready = false;
    uploads.note = `The files were not uploaded: ${text}`;
    renderFiles();
  }
  if (run.state === "starting") run.state = "idle";
  updateControls();
}

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

// ------------------------------------------------------------ running

function startProgram() {
  if (!link.opened || run.state !== "idle" || uploads.pending) return;
  const data = { sourceScript: editor.getValue() };
  if (uploads.ready && uploads.files.size) data.directoryName = uploads.directory;
  output.clear();
  hideBanner();
  ui.cameraPanel.hidden = true;
  ui.frame.removeAttribute("src");
  pendingFrame = null;
  if (send({ type: "start", data })) {
    run.state = "starting";
    updateControls();
  }
}

function stopProgram() {
  if (send({ type: "stop" })) {
    run.state = "stopping";
    updateControls();
  }
}

function sendInput(event) {
  event.preventDefault();
  if (run.state !== "running") return;
  const text = `${ui.stdin.value}\n`;
  if (send({ type: "stdin", data: { input: text } })) {
    output.write("stdin", text);
    ui.stdin.value = "";
  }
}

// ------------------------------------------------------------ uploads

function uploadDirectory() {
  let name = storage.get(KEYS.uploadDir);
  if (!name) {
    const bytes = crypto.getRandomValues(new Uint8Array(4));
    name = `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
    storage.set(KEYS.uploadDir, name);
  }
  return name;
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

async function readText(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  if (bytes.includes(0)) return null;
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return null;
  }
}

// Drop or pick: [{alias, file}] -> read as text, refuse binary files clearly.
async function addFiles(entries) {
  if (!entries.length) return;
  const refused = [];
  for (const { alias, file } of entries) {
    const text = await readText(file);
    if (text === null) refused.push(alias);
    else uploads.files.set(alias, text);
  }
  uploads.note = "";
  if (refused.length) {
    uploads.note =
      `Not uploaded: ${refused.join(", ")}. ` +
      "This page can send text files only (such as .py, .txt, .csv, .json); " +
      `${refused.length === 1 ? "that file is" : "those files are"} binary.`;
  }
  if (entries.length > refused.length) sendUpload();
  else renderFiles();
}

function sendUpload() {
  const files = {};
  for (const [alias, text] of uploads.files) {
    files[alias] = { type: "text", content: { text } };
  }
  const message = {
    type: "upload",
    data: { directory: { name: uploads.directory, files } },
  };
  const json = JSON.stringify(message);
  const bytes = new Blob([json]).size;
  if (bytes > MAX_MESSAGE_BYTES) {
    uploads.note =
      `These files are too big to send at once (${formatSize(bytes)}; the limit is ` +
      `${formatSize(MAX_MESSAGE_BYTES)}). Remove some and try again.`;
    uploads.ready = false;
    renderFiles();
    return;
  }
  uploads.ready = false;
  if (link.opened) {
    link.socket.send(json);
    uploads.pending = true;
  }
  renderFiles();
  updateControls();
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function renderFiles() {
  const note = uploads.note;
  const items = [];
  for (const [alias, text] of [...uploads.files].sort(([a], [b]) => a.localeCompare(b))) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "file-name";
    name.textContent = alias;
    const size = document.createElement("span");
    size.className = "file-size";
    size.textContent = formatSize(new Blob([text]).size);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "file-remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${alias}`);
    remove.addEventListener("click", () => {
      uploads.files.delete(alias);
      uploads.note = "";
      sendUpload();
    });
    item.append(name, size, remove);
    items.push(item);
  }
  ui.fileList.replaceChildren(...items);
  ui.clearFiles.hidden = uploads.files.size === 0;
  const count = uploads.files.size;
  const plural = count === 1 ? "file" : "files";
  let status = "";
  if (uploads.pending) status = `Uploading ${count} ${plural}…`;
  else if (count && uploads.ready) status = `${count} ${plural} on the device, next to your program:`;
  else if (count && link.opened) status = `${count} ${plural} not on the device yet.`;
  else if (count) status = `${count} ${plural} waiting to upload (not connected).`;
  ui.filesStatus.textContent = [status, note].filter(Boolean).join(" ");
  ui.filesStatus.dataset.kind = note ? "warning" : "";
  ui.filesStatus.title = `in the folder ${uploads.directory} of further-link's work dir`;
}

function pickedFiles(input) {
  const files = Array.from(input.files || []);
  input.value = "";
  const entries = files.map((file) => ({
    alias: withoutTopFolder(file.webkitRelativePath || file.name),
    file,
  }));
  return entries.filter(({ alias }) => !hiddenPath(alias));
}

// A picked folder's own name is not part of the paths inside it.
function withoutTopFolder(path) {
  const slash = path.indexOf("/");
  return slash === -1 ? path : path.slice(slash + 1);
}

function hiddenPath(alias) {
  return alias.split("/").some((part) => part.startsWith(".") || part === "__pycache__");
}

// Files and folders dropped on the page, folders walked recursively.
async function droppedFiles(dataTransfer) {
  const roots = Array.from(dataTransfer.items || [])
    .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
    .filter(Boolean);
  if (!roots.length) {
    return Array.from(dataTransfer.files || []).map((file) => ({ alias: file.name, file }));
  }
  const singleFolder = roots.length === 1 && roots[0].isDirectory;
  const entries = [];
  const walk = async (entry) => {
    if (entry.name.startsWith(".") || entry.name === "__pycache__") return;
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      const path = entry.fullPath.replace(/^\//, "");
      entries.push({ alias: singleFolder ? withoutTopFolder(path) : path, file });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  };
  for (const root of roots) await walk(root);
  return entries;
}

function setUpDropping() {
  let depth = 0;
  const dragging = (on) => ui.dropZone.classList.toggle("dragging", on);
  document.addEventListener("dragenter", (event) => {
    if (ui.workspace.hidden) return;
    event.preventDefault();
    depth += 1;
    dragging(true);
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) dragging(false);
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", async (event) => {
    event.preventDefault();
    depth = 0;
    dragging(false);
    if (ui.workspace.hidden || !event.dataTransfer) return;
    try {
      await addFiles(await droppedFiles(event.dataTransfer));
    } catch (error) {
      uploads.note = `Could not read the dropped files: ${error.message}`;
      renderFiles();
    }
  });
}

// ------------------------------------------------------------ text size

function applyTextSize(size) {
  document.documentElement.style.fontSize = `${size}px`;
  storage.set(KEYS.textSize, String(size));
  ui.smaller.disabled = size <= TEXT_SIZES[0];
  ui.larger.disabled = size >= TEXT_SIZES[TEXT_SIZES.length - 1];
}

function stepTextSize(step) {
  const current = Number(storage.get(KEYS.textSize)) || DEFAULT_TEXT_SIZE;
  let index = TEXT_SIZES.findIndex((size) => size >= current);
  if (index === -1) index = TEXT_SIZES.length - 1;
  index = Math.min(TEXT_SIZES.length - 1, Math.max(0, index + step));
  applyTextSize(TEXT_SIZES[index]);
}

// ------------------------------------------------------------ start

let saveTimer = null;
const editor = createEditor($("editor"), {
  value: storage.get(KEYS.program) ?? WELCOME,
  label: "Python program",
  onRun: startProgram,
  onChange(text) {
    clearTimeout(saveTimer);
    saveTimer = setTimeout(() => storage.set(KEYS.program, text), 300);
  },
});

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
ui.run.addEventListener("click", startProgram);
ui.stop.addEventListener("click", stopProgram);
ui.clear.addEventListener("click", () => output.clear());
ui.stdinForm.addEventListener("submit", sendInput);
ui.pickFiles.addEventListener("change", () => addFiles(pickedFiles(ui.pickFiles)));
ui.pickFolder.addEventListener("change", () => addFiles(pickedFiles(ui.pickFolder)));
ui.clearFiles.addEventListener("click", () => {
  uploads.files.clear();
  uploads.note = "";
  sendUpload();
});
ui.smaller.addEventListener("click", () => stepTextSize(-1));
ui.larger.addEventListener("click", () => stepTextSize(1));
document.addEventListener("keydown", (event) => {
  const inEditor = event.target === editor.textarea; // the editor handles its own
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !inEditor) {
    if (!ui.workspace.hidden) {
      event.preventDefault();
      startProgram();
    }
  }
});
window.addEventListener("pagehide", () => storage.set(KEYS.program, editor.getValue()));

uploads.directory = uploadDirectory();
ui.deviceName.textContent = window.location.host;
applyTextSize(Number(storage.get(KEYS.textSize)) || DEFAULT_TEXT_SIZE);
setUpDropping();
renderFiles();
forgetStoredToken();
if (storage.get(KEYS.paired)) {
  connect();
} else if (storage.get(KEYS.unpaired)) {
  showPairing();
} else {
  // Not paired in this browser: the pairing cookie or FURTHER_LINK_AUTH=off
  // may still let us in; otherwise pair first.
  setConnection("connecting", "Connecting…");
  accessStatus().then((status) => (status === 401 ? showPairing() : connect()));
}
