// A project: the files of one directory in the device's work dir, named by
// the learner. Text files are edited in the page; other files (pictures,
// sounds, spreadsheets) travel as the upload's `base64` kind.
//
// Saving is the v5 `POST /upload` with the version the page opened; the
// device refuses (409) when the project changed since, e.g. in another tab,
// instead of one tab silently replacing the other's files.

const PROJECT_NAME = /^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}$/;
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

export function untitledName() {
  const bytes = crypto.getRandomValues(new Uint8Array(2));
  return `untitled-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** A name the device accepts as a project directory, or an explanation. */
export function validProjectName(name) {
  if (PROJECT_NAME.test(name) && !name.endsWith(".") && !name.endsWith(" ")) return null;
  return "A project name has letters, digits, spaces, dots, dashes or underscores (up to 64), and starts with a letter or digit.";
}

/** A relative path inside the project, or an explanation. */
export function validFileName(name) {
  const parts = name.split("/");
  if (!name || name.length > 255 || parts.some((part) => !part || part === "." || part === "..")) {
    return "A file name may not be empty, start with /, or contain . or .. as a folder.";
  }
  if (parts.some((part) => part.startsWith(".") || /[\0\\]/.test(part))) {
    return "A file name may not start with a dot or contain a backslash.";
  }
  return null;
}

function toBase64(bytes) {
  let binary = "";
  for (let at = 0; at < bytes.length; at += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(at, at + 0x8000));
  }
  return btoa(binary);
}

function base64Size(data) {
  const padding = data.endsWith("==") ? 2 : data.endsWith("=") ? 1 : 0;
  return Math.floor((data.length * 3) / 4) - padding;
}

/** A picked file's bytes as a project entry: text when it is UTF-8 without NULs. */
export function fileEntryFromBytes(bytes) {
  if (!bytes.includes(0)) {
    try {
      return { kind: "text", text: strictUtf8.decode(bytes) };
    } catch {
      // not UTF-8: binary
    }
  }
  return { kind: "base64", data: toBase64(bytes), size: bytes.length };
}

export class Project {
  constructor(name) {
    this.name = name;
    this.version = null; // the device's version when opened or last saved
    this.files = new Map(); // name -> {kind: "text"} | {kind: "base64", data, size}
    this.saved = false; // the device has exactly these files
    // Each file as the device had it when last opened or saved ("text:..." or
    // "data:..."): tells a change made elsewhere from one made here.
    this.base = new Map();
  }

  /** Remember `files` (upload shape) as what the device now has. */
  setBase(files) {
    this.base = new Map(Object.entries(files).map(([name, file]) => [name, fileKey(file)]));
  }

  /** The upload's files, text taken from `textOf(name)`. */
  uploadFiles(textOf) {
    const files = {};
    for (const [name, entry] of this.files) {
      files[name] =
        entry.kind === "text"
          ? { type: "text", content: { text: textOf(name) ?? "" } }
          : { type: "base64", content: { data: entry.data } };
    }
    return files;
  }

  /** The program to run: the open Python file, else main.py, else the first one. */
  entryPoint(active) {
    if (active && active.endsWith(".py")) return active;
    if (this.files.has("main.py")) return "main.py";
    return [...this.files.keys()].find((name) => name.endsWith(".py")) ?? null;
  }
}

/** A comparable key of an upload-shaped file. */
export function fileKey(file) {
  return file.type === "text" ? `text:${file.content?.text ?? ""}` : `data:${file.content?.data ?? ""}`;
}

/**
 * After the device refused a save (409), which files changed elsewhere?
 * `mine` and `theirs` are upload-shaped {name: file}; `base` is the project's
 * base. Returns {adopt: {name: file} (new on the device only, e.g. written by
 * the program), conflicts: [name]}.
 */
export function reconcile(base, mine, theirs) {
  const adopt = {};
  const conflicts = [];
  for (const [name, file] of Object.entries(theirs)) {
    const device = fileKey(file);
    const before = base.get(name);
    if (!(name in mine)) {
      if (before === undefined) adopt[name] = file;
      else if (before !== device) conflicts.push(name);
    } else if (before === undefined ? device !== fileKey(mine[name]) : device !== before) {
      conflicts.push(name);
    }
  }
  return { adopt, conflicts: conflicts.sort() };
}

export class SaveConflict extends Error {}

async function answerError(response) {
  const body = await response.json().catch(() => ({}));
  const reason = body.error || body.reason || body.message || `${response.status} ${response.statusText}`;
  return String(reason);
}

/**
 * Save `files` as the project `name`. Returns the new version (or null when
 * the device does not version projects). Throws SaveConflict (409) or Error.
 */
export async function saveProject(name, files, version) {
  const body = { name, files };
  if (version) body.version = version;
  const response = await fetch("/upload", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 409) throw new SaveConflict(await answerError(response));
  if (!response.ok) throw new Error(await answerError(response));
  const answer = await response.json().catch(() => ({}));
  return typeof answer.version === "string" ? answer.version : null;
}

/** The device's projects: [{name, modified, size, files}], or null when it cannot list them. */
export async function listProjects() {
  try {
    const response = await fetch("/projects", { cache: "no-store" });
    if (!response.ok) return null;
    const body = await response.json();
    return Array.isArray(body.projects) ? body.projects : null;
  } catch {
    return null;
  }
}

/** One project from the device as a Project and its texts, or null when it has none. */
export async function fetchProject(name) {
  let response;
  try {
    response = await fetch(`/projects/${encodeURIComponent(name)}`, { cache: "no-store" });
  } catch {
    return null;
  }
  if (!response.ok) return null;
  const body = await response.json().catch(() => null);
  if (!body || typeof body.files !== "object") return null;
  const project = new Project(name);
  project.version = typeof body.version === "string" ? body.version : null;
  project.saved = true;
  const texts = new Map();
  project.setBase(body.files);
  for (const [path, file] of Object.entries(body.files)) {
    if (file.type === "text") {
      project.files.set(path, { kind: "text" });
      texts.set(path, String(file.content?.text ?? ""));
    } else if (file.type === "base64") {
      const data = String(file.content?.data ?? "");
      project.files.set(path, { kind: "base64", data, size: base64Size(data) });
    }
  }
  return { project, texts, files: body.files };
}
