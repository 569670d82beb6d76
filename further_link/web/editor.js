// A small Python editor: a transparent <textarea> over a highlighted <pre>,
// with line numbers and the indentation keys a learner expects. No framework.

const INDENT = "    ";

const KEYWORDS = new Set(
  (
    "and as assert async await break class continue def del elif else except " +
    "finally for from global if import in is lambda nonlocal not or pass raise " +
    "return try while with yield"
  ).split(" "),
);

const CONSTANTS = new Set(["True", "False", "None", "NotImplemented", "Ellipsis", "__debug__"]);

const BUILTINS = new Set(
  (
    "abs aiter all anext any ascii bin bool breakpoint bytearray bytes callable chr " +
    "classmethod compile complex delattr dict dir divmod enumerate eval exec exit filter " +
    "float format frozenset getattr globals hasattr hash help hex id input int isinstance " +
    "issubclass iter len list locals map max memoryview min next object oct open ord pow " +
    "print property quit range repr reversed round set setattr slice sorted staticmethod " +
    "str sum super tuple type vars zip __import__ __name__ __file__ self cls " +
    "BaseException Exception ArithmeticError AssertionError AttributeError EOFError " +
    "FileExistsError FileNotFoundError ImportError IndexError KeyError KeyboardInterrupt " +
    "LookupError MemoryError ModuleNotFoundError NameError NotImplementedError OSError " +
    "OverflowError PermissionError RecursionError RuntimeError StopIteration SyntaxError " +
    "SystemExit TimeoutError TypeError UnicodeError ValueError ZeroDivisionError"
  ).split(" "),
);

// Statements after which the next line is usually one level less indented.
const DEDENT_AFTER = /^\s*(return\b.*|pass|break|continue|raise\b.*)$/;

const IDENTIFIER = /[A-Za-z_\u00C0-\uFFFF][\w\u00C0-\uFFFF]*/y;
const NUMBER =
  /(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?[jJ]?)/y;
const STRING_PREFIX = /^(?:[rRbBuUfF]|[rR][bBfF]|[bBfF][rR])$/;
const INTERESTING = /[#'"0-9.A-Za-z_@\u00C0-\uFFFF]/;

function matchAt(pattern, text, index) {
  pattern.lastIndex = index;
  const found = pattern.exec(text);
  return found ? found[0] : null;
}

// The end of the string literal whose opening quote is at `quoteAt`.
// Unterminated strings run to the end of the line (or of the text, when
// triple-quoted), as Python's tokenizer sees them while you type.
function stringEnd(text, quoteAt) {
  const quote = text[quoteAt];
  const triple = text.startsWith(quote.repeat(3), quoteAt);
  let i = quoteAt + (triple ? 3 : 1);
  while (i < text.length) {
    const c = text[i];
    if (c === "\\") {
      i += 2;
    } else if (triple && text.startsWith(quote.repeat(3), i)) {
      return i + 3;
    } else if (!triple && c === quote) {
      return i + 1;
    } else if (!triple && c === "\n") {
      return i;
    } else {
      i += 1;
    }
  }
  return text.length;
}

function onlySpaceBefore(text, index) {
  for (let i = index - 1; i >= 0 && text[i] !== "\n"; i -= 1) {
    if (text[i] !== " " && text[i] !== "\t") return false;
  }
  return true;
}

function previousNonSpace(text, index) {
  let i = index - 1;
  while (i >= 0 && (text[i] === " " || text[i] === "\t")) i -= 1;
  return i >= 0 ? text[i] : "";
}

/** Split Python source into [kind, text] pieces; kind is null for plain text. */
export function tokenizePython(text) {
  const tokens = [];
  let plainStart = 0;
  let nameFollows = false; // after `def` / `class`
  let i = 0;
  const emit = (kind, end) => {
    if (plainStart < i) tokens.push([null, text.slice(plainStart, i)]);
    tokens.push([kind, text.slice(i, end)]);
    i = end;
    plainStart = end;
  };
  while (i < text.length) {
    const c = text[i];
    if (!INTERESTING.test(c)) {
      i += 1;
      continue;
    }
    if (c === "#") {
      const newline = text.indexOf("\n", i);
      emit("comment", newline === -1 ? text.length : newline);
    } else if (c === "'" || c === '"') {
      emit("string", stringEnd(text, i));
    } else if (c === "@" && onlySpaceBefore(text, i)) {
      const name = matchAt(/@[\w.\u00C0-\uFFFF]*/y, text, i);
      emit("decorator", i + name.length);
    } else if (/[0-9]/.test(c) || (c === "." && /[0-9]/.test(text[i + 1] || ""))) {
      emit("number", i + matchAt(NUMBER, text, i).length);
    } else if (c === "." || c === "@") {
      i += 1;
    } else {
      const word = matchAt(IDENTIFIER, text, i);
      const next = text[i + word.length];
      if ((next === "'" || next === '"') && STRING_PREFIX.test(word)) {
        emit("string", stringEnd(text, i + word.length));
        continue;
      }
      const attribute = previousNonSpace(text, i) === ".";
      let kind = null;
      if (nameFollows) kind = "def";
      else if (KEYWORDS.has(word) && !attribute) kind = "keyword";
      else if (CONSTANTS.has(word) && !attribute) kind = "constant";
      else if (BUILTINS.has(word) && !attribute) kind = "builtin";
      nameFollows = word === "def" || word === "class";
      if (kind) emit(kind, i + word.length);
      else i += word.length;
    }
  }
  if (plainStart < text.length) tokens.push([null, text.slice(plainStart)]);
  return tokens;
}

/** The highlighted source as DOM nodes: text nodes and <span class="tok-KIND">. */
export function highlightPython(text) {
  const fragment = document.createDocumentFragment();
  for (const [kind, piece] of tokenizePython(text)) {
    if (kind === null) {
      fragment.append(piece);
    } else {
      const span = document.createElement("span");
      span.className = `tok-${kind}`;
      span.textContent = piece;
      fragment.append(span);
    }
  }
  return fragment;
}

// The indentation for a new line typed after `lineBefore` (text from the start
// of the line to the caret).
export function nextIndent(lineBefore) {
  let indent = lineBefore.match(/^[ \t]*/)[0];
  const code = tokenizePython(lineBefore)
    .filter(([kind]) => kind !== "comment")
    .map(([, piece]) => piece)
    .join("")
    .trimEnd();
  if (code.endsWith(":")) indent += INDENT;
  else if (DEDENT_AFTER.test(code)) indent = indent.slice(0, Math.max(0, indent.length - 4));
  return indent;
}

/**
 * Make an editor inside `container`.
 * options: value, label (accessible name), onChange(text), onRun()
 */
export function createEditor(container, options = {}) {
  const scroller = document.createElement("div");
  scroller.className = "editor-scroll";
  const gutter = document.createElement("div");
  gutter.className = "editor-gutter";
  gutter.setAttribute("aria-hidden", "true");
  const area = document.createElement("div");
  area.className = "editor-code";
  const pre = document.createElement("pre");
  pre.className = "editor-highlight";
  pre.setAttribute("aria-hidden", "true");
  const code = document.createElement("code");
  pre.append(code);
  const textarea = document.createElement("textarea");
  textarea.className = "editor-input";
  textarea.spellcheck = false;
  textarea.wrap = "off";
  textarea.setAttribute("autocapitalize", "off");
  textarea.setAttribute("autocomplete", "off");
  textarea.setAttribute("autocorrect", "off");
  textarea.setAttribute("aria-label", options.label || "Python program");
  textarea.setAttribute("aria-multiline", "true");
  area.append(pre, textarea);
  scroller.append(gutter, area);
  container.append(scroller);

  let lineCount = 0;
  let escapePressed = false;

  function render() {
    const text = textarea.value;
    // The extra line keeps room below the last one, so the caret never
    // makes the textarea scroll inside itself.
    code.replaceChildren(highlightPython(text), "\n ");
    const lines = text.split("\n").length;
    if (lines !== lineCount) {
      lineCount = lines;
      const numbers = [];
      for (let n = 1; n <= lines; n += 1) numbers.push(n);
      gutter.textContent = `${numbers.join("\n")}\n `; // as tall as the code
    }
    textarea.scrollTop = 0;
    textarea.scrollLeft = 0;
  }

  // Keep the caret in sight of the scroller (the textarea itself never scrolls).
  function revealCaret() {
    const style = getComputedStyle(pre);
    const lineHeight = parseFloat(style.lineHeight) || 20;
    const charWidth = measureCharWidth(style);
    const before = textarea.value.slice(0, textarea.selectionEnd);
    const line = before.split("\n").length - 1;
    const column = before.length - before.lastIndexOf("\n") - 1;
    const top = parseFloat(style.paddingTop) + line * lineHeight;
    const left = parseFloat(style.paddingLeft) + column * charWidth + gutter.offsetWidth;
    if (top < scroller.scrollTop) scroller.scrollTop = top;
    else if (top + lineHeight * 2 > scroller.scrollTop + scroller.clientHeight) {
      scroller.scrollTop = top + lineHeight * 2 - scroller.clientHeight;
    }
    const visibleLeft = scroller.scrollLeft + gutter.offsetWidth;
    if (left < visibleLeft + charWidth) {
      scroller.scrollLeft = Math.max(0, left - gutter.offsetWidth - charWidth * 4);
    } else if (left + charWidth * 2 > scroller.scrollLeft + scroller.clientWidth) {
      scroller.scrollLeft = left + charWidth * 4 - scroller.clientWidth;
    }
  }

  let measured = { font: "", width: 0 };
  function measureCharWidth(style) {
    if (measured.font !== style.font || !measured.width) {
      const probe = document.createElement("span");
      probe.textContent = "0".repeat(50);
      probe.className = "editor-probe";
      pre.append(probe);
      measured = { font: style.font, width: probe.getBoundingClientRect().width / 50 };
      probe.remove();
    }
    return measured.width;
  }

  // Replace [start, end) with `text` as if typed, so undo still works.
  function replaceRange(start, end, text, selectStart, selectEnd = selectStart) {
    textarea.setSelectionRange(start, end);
    let typed = false;
    try {
      typed = document.execCommand("insertText", false, text);
    } catch {
      typed = false;
    }
    if (!typed || textarea.value.slice(start, start + text.length) !== text) {
      textarea.setRangeText(text, start, end, "end");
      textarea.dispatchEvent(new Event("input", { bubbles: true }));
    }
    textarea.setSelectionRange(selectStart, selectEnd);
    revealCaret();
  }

  // The whole lines touched by the selection: [start, end) of the text.
  function selectedLines() {
    const { selectionStart: start, selectionEnd: end, value } = textarea;
    const lineStart = value.lastIndexOf("\n", start - 1) + 1;
    let last = end;
    if (end > start && value[end - 1] === "\n") last = end - 1;
    let lineEnd = value.indexOf("\n", last);
    if (lineEnd === -1) lineEnd = value.length;
    return [lineStart, lineEnd];
  }

  function indent() {
    const { selectionStart: start, selectionEnd: end, value } = textarea;
    if (!value.slice(start, end).includes("\n")) {
      replaceRange(start, end, INDENT, start + INDENT.length);
      return;
    }
    const [lineStart, lineEnd] = selectedLines();
    const block = value
      .slice(lineStart, lineEnd)
      .split("\n")
      .map((line) => (line.trim() ? INDENT + line : line))
      .join("\n");
    replaceRange(lineStart, lineEnd, block, lineStart, lineStart + block.length);
  }

  function dedent() {
    const { selectionStart: start, selectionEnd: end, value } = textarea;
    const [lineStart, lineEnd] = selectedLines();
    const lines = value.slice(lineStart, lineEnd).split("\n");
    const removed = lines.map((line) => {
      if (line.startsWith("\t")) return 1;
      return line.match(/^ {0,4}/)[0].length;
    });
    if (!removed.some(Boolean)) return;
    const block = lines.map((line, n) => line.slice(removed[n])).join("\n");
    if (start === end || !value.slice(start, end).includes("\n")) {
      const caret = Math.max(lineStart, start - removed[0]);
      replaceRange(lineStart, lineEnd, block, caret, Math.max(caret, end - removed[0]));
    } else {
      replaceRange(lineStart, lineEnd, block, lineStart, lineStart + block.length);
    }
  }

  function newline() {
    const { selectionStart: start, selectionEnd: end, value } = textarea;
    const lineStart = value.lastIndexOf("\n", start - 1) + 1;
    const text = `\n${nextIndent(value.slice(lineStart, start))}`;
    replaceRange(start, end, text, start + text.length);
  }

  // Backspace in leading spaces goes back one indentation level.
  function backspace(event) {
    const { selectionStart: start, selectionEnd: end, value } = textarea;
    if (start !== end) return;
    const lineStart = value.lastIndexOf("\n", start - 1) + 1;
    const before = value.slice(lineStart, start);
    if (before.length < 2 || /[^ ]/.test(before)) return;
    event.preventDefault();
    const width = ((before.length - 1) % 4) + 1;
    replaceRange(start - width, start, "", start - width);
  }

  textarea.addEventListener("keydown", (event) => {
    if (event.isComposing) return;
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (options.onRun) options.onRun();
      return;
    }
    if (event.key === "Escape") {
      escapePressed = true; // the next Tab leaves the editor
      return;
    }
    const wasEscaped = escapePressed;
    escapePressed = false;
    if (event.key === "Tab" && !event.ctrlKey && !event.altKey && !event.metaKey) {
      if (wasEscaped) return;
      event.preventDefault();
      if (event.shiftKey) dedent();
      else indent();
    } else if (event.key === "Enter" && !event.shiftKey && !event.altKey) {
      event.preventDefault();
      newline();
    } else if (event.key === "Backspace" && !event.ctrlKey && !event.altKey && !event.metaKey) {
      backspace(event);
    }
  });

  textarea.addEventListener("input", () => {
    render();
    revealCaret();
    if (options.onChange) options.onChange(textarea.value);
  });
  textarea.addEventListener("scroll", () => {
    textarea.scrollTop = 0;
    textarea.scrollLeft = 0;
  });
  for (const type of ["keyup", "click"]) textarea.addEventListener(type, revealCaret);
  // A click below the last line still puts the caret in the program.
  scroller.addEventListener("mousedown", (event) => {
    if (event.target === scroller || event.target === gutter) {
      event.preventDefault();
      textarea.focus();
    }
  });

  textarea.value = options.value || "";
  render();

  return {
    textarea,
    getValue: () => textarea.value,
    setValue(text) {
      textarea.value = text;
      render();
    },
    focus: () => textarea.focus(),
    refresh: render,
  };
}
