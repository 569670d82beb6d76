// A terminal panel: xterm.js, sized to its element, fed at a pace the page
// can keep up with.
//
// Output can arrive far faster than a browser lays out a terminal (a flooding
// program sends megabytes a second). Writing it all to xterm at once would
// queue seconds of work, during which typing and Stop would wait. So output
// waits here and goes to xterm in slices of at most SLICE_CHARS (written as
// pieces of PIECE_CHARS), the next slice only after xterm has parsed the
// previous one and the browser drew a frame; past BACKLOG_MAX_CHARS the
// oldest waiting output is dropped (a terminal keeps only its scrollback
// anyway), and `finish()` after Stop drops all but the tail so the end shows
// at once. Between Stop and the end, `hold()` keeps only that tail and draws
// nothing, so the page reads what the device still sends as fast as it comes.

import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";

const SLICE_CHARS = 131_072;
const PIECE_CHARS = 4_096;
const BACKLOG_MAX_CHARS = 16_000_000;
const FINISH_KEEP_CHARS = 16_384;
const SCROLLBACK_LINES = 5_000;

function themeFromCss() {
  const style = getComputedStyle(document.documentElement);
  const colour = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
  return {
    background: colour("--console-bg", "#10151c"),
    foreground: colour("--console-fg", "#e8eaed"),
    cursor: colour("--console-fg", "#e8eaed"),
    selectionBackground: colour("--selection", "#264f78"),
  };
}

export class TerminalView {
  /**
   * @param {HTMLElement} element where the terminal lives
   * @param {{onData: (text: string) => void, onResize: (size: {rows: number, cols: number}) => void}} handlers
   */
  constructor(element, { onData, onResize, label }) {
    this.element = element;
    this.terminal = new Terminal({
      convertEol: false,
      cursorBlink: false,
      scrollback: SCROLLBACK_LINES,
      fontFamily: getComputedStyle(document.documentElement).getPropertyValue("--code-font"),
      fontSize: this.fontSize(),
      theme: themeFromCss(),
      screenReaderMode: false,
    });
    this.fit = new FitAddon();
    this.terminal.loadAddon(this.fit);
    this.terminal.open(element);
    const textarea = element.querySelector("textarea");
    if (textarea && label) textarea.setAttribute("aria-label", label);
    this.terminal.onData(onData);
    this.onResize = onResize;
    this.backlog = [];
    this.backlogChars = 0;
    this.writing = false;
    this.skipped = 0;
    this.held = false;
    this.written = 0; // characters handed to xterm, for tests and figures
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(element);
  }

  fontSize() {
    const rem = parseFloat(getComputedStyle(document.documentElement).fontSize) || 16;
    return Math.round(rem * 0.85);
  }

  /** Fit to the element (after layout or text size changes); tells `onResize`. */
  resize() {
    if (this.element.hidden || !this.element.offsetWidth) return;
    const size = this.fontSize();
    if (this.terminal.options.fontSize !== size) this.terminal.options.fontSize = size;
    this.fit.fit();
    this.onResize({ rows: this.terminal.rows, cols: this.terminal.cols });
  }

  get size() {
    return { rows: this.terminal.rows, cols: this.terminal.cols };
  }

  write(text) {
    if (!text) return;
    this.backlog.push(text);
    this.backlogChars += text.length;
    const most = this.held ? FINISH_KEEP_CHARS : BACKLOG_MAX_CHARS;
    while (this.backlogChars > most && this.backlog.length > 1) {
      const dropped = this.backlog.shift();
      this.backlogChars -= dropped.length;
      this.skipped += dropped.length;
    }
    this.pump();
  }

  pump() {
    if (this.writing || this.held || !this.backlog.length) return;
    let slice = "";
    if (this.skipped) {
      slice = `\r\n\x1b[2m[… ${this.skipped} characters of output skipped to keep up …]\x1b[0m\r\n`;
      this.skipped = 0;
    }
    while (this.backlog.length && slice.length < SLICE_CHARS) {
      const next = this.backlog[0];
      const room = SLICE_CHARS - slice.length;
      if (next.length <= room) {
        slice += this.backlog.shift();
      } else {
        slice += next.slice(0, room);
        this.backlog[0] = next.slice(room);
      }
    }
    this.backlogChars -= slice.length;
    if (this.backlogChars < 0) this.backlogChars = 0;
    this.writing = true;
    this.written += slice.length;
    // xterm parses each write() whole, but yields to the browser between
    // writes: small pieces keep every task short.
    for (let at = 0; at < slice.length; at += PIECE_CHARS) {
      const last = at + PIECE_CHARS >= slice.length;
      this.terminal.write(slice.slice(at, at + PIECE_CHARS), last ? () => this.drawn() : undefined);
    }
  }

  drawn() {
    // Let the browser paint and handle input between slices.
    requestAnimationFrame(() => {
      this.writing = false;
      this.pump();
    });
  }

  /**
   * Stop was pressed: until `finish`, output is kept (only its tail, which is
   * all `finish` shows) but not drawn. Drawing megabytes of a flood the
   * person asked to stop would delay reading the device's `stopped` behind it.
   */
  hold() {
    this.held = true;
  }

  /**
   * The program ended: write `line` after its output. When `dropBacklog` (the
   * person pressed Stop), only the tail of the waiting output is kept, so the
   * end shows at once.
   */
  finish(line, dropBacklog) {
    this.held = false;
    if (!dropBacklog) {
      this.write(line);
      return;
    }
    let keep = "";
    while (this.backlog.length && keep.length < FINISH_KEEP_CHARS) keep = this.backlog.pop() + keep;
    this.skipped += this.backlogChars - keep.length;
    if (keep.length > FINISH_KEEP_CHARS) {
      this.skipped += keep.length - FINISH_KEEP_CHARS;
      keep = keep.slice(-FINISH_KEEP_CHARS);
    }
    this.backlog = keep ? [keep] : [];
    this.backlogChars = keep.length;
    if (this.skipped < 0) this.skipped = 0;
    this.write(line);
  }

  clear() {
    this.held = false;
    this.backlog = [];
    this.backlogChars = 0;
    this.skipped = 0;
    this.terminal.reset();
  }

  focus() {
    this.terminal.focus();
  }

  /** The scrollback and screen as text, a line the terminal wrapped as one line. */
  text() {
    const buffer = this.terminal.buffer.active;
    const lines = [];
    for (let y = 0; y < buffer.length; y += 1) {
      const line = buffer.getLine(y);
      if (!line) continue;
      if (line.isWrapped && lines.length) {
        lines[lines.length - 1] += line.translateToString(true);
      } else {
        lines.push(line.translateToString(true));
      }
    }
    while (lines.length && !lines[lines.length - 1]) lines.pop();
    return lines.join("\n");
  }
}
