// The program editor: CodeMirror 6 with Python, one editor state per file so
// that every file keeps its own undo history, selection and scroll position.

import { EditorView, basicSetup } from "codemirror";
import { EditorState } from "@codemirror/state";
import { keymap } from "@codemirror/view";
import { indentWithTab } from "@codemirror/commands";
import { HighlightStyle, indentUnit, syntaxHighlighting } from "@codemirror/language";
import { tags } from "@lezer/highlight";
import { python } from "@codemirror/lang-python";
import { nonce } from "./csp.js";

/**
 * An editor in `parent`: `onRun()` on Ctrl/Cmd+Enter, `onChange(name, text)`
 * after every edit of the file `name`.
 */
// The page's own colours (style.css, light and dark), not CodeMirror's light-only defaults.
const highlight = HighlightStyle.define([
  { tag: [tags.keyword, tags.controlKeyword, tags.operatorKeyword, tags.moduleKeyword], color: "var(--tok-keyword)" },
  { tag: [tags.string, tags.special(tags.string)], color: "var(--tok-string)" },
  { tag: tags.comment, color: "var(--tok-comment)", fontStyle: "italic" },
  { tag: tags.number, color: "var(--tok-number)" },
  { tag: [tags.bool, tags.null, tags.self], color: "var(--tok-constant)" },
  { tag: [tags.function(tags.definition(tags.variableName)), tags.definition(tags.className)], color: "var(--tok-def)" },
  { tag: tags.standard(tags.variableName), color: "var(--tok-builtin)" },
  { tag: tags.meta, color: "var(--tok-decorator)" },
  { tag: tags.invalid, color: "var(--error-fg)" },
]);

export function createCodeEditor(parent, { label, onRun, onChange }) {
  const states = new Map(); // file name -> EditorState
  let current = null;

  const extensions = (name) => [
    keymap.of([
      {
        key: "Mod-Enter",
        run: () => {
          onRun();
          return true;
        },
      },
    ]),
    syntaxHighlighting(highlight),
    basicSetup,
    keymap.of([indentWithTab]),
    indentUnit.of("    "),
    EditorState.tabSize.of(4),
    name.endsWith(".py") || !name.includes(".") ? python() : [],
    EditorView.contentAttributes.of({ "aria-label": `${label}: ${name}` }),
    EditorView.cspNonce.of(nonce),
    EditorView.updateListener.of((update) => {
      if (update.docChanged) onChange(name, update.state.doc.toString());
    }),
  ];

  const view = new EditorView({ parent, state: EditorState.create({ doc: "" }) });

  return {
    view,
    /** Show `name`, creating its state from `text` the first time. */
    open(name, text = "") {
      if (current !== null && states.has(current)) states.set(current, view.state);
      if (!states.has(name)) {
        states.set(name, EditorState.create({ doc: text, extensions: extensions(name) }));
      }
      current = name;
      view.setState(states.get(name));
    },
    /** Replace a file's text (e.g. opened again from the device): its history starts anew. */
    reset(name, text) {
      states.set(name, EditorState.create({ doc: text, extensions: extensions(name) }));
      if (current === name) view.setState(states.get(name));
    },
    text(name) {
      if (name === current) return view.state.doc.toString();
      const state = states.get(name);
      return state ? state.doc.toString() : null;
    },
    rename(from, to) {
      const text = this.text(from);
      states.delete(from);
      if (current === from) current = null;
      states.set(to, EditorState.create({ doc: text ?? "", extensions: extensions(to) }));
    },
    forget(name) {
      states.delete(name);
      if (current === name) current = null;
    },
    clear() {
      states.clear();
      current = null;
    },
    focus() {
      view.focus();
    },
  };
}
