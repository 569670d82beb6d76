// The page's Content-Security-Policy allows no inline styles except those that
// carry this answer's nonce. CodeMirror and xterm.js add <style> elements at
// run time; every <style> this page creates gets the nonce, so theirs apply
// and nobody else's would.

const meta = document.querySelector('meta[name="csp-nonce"]');
export const nonce = meta ? meta.getAttribute("content") : "";
if (meta) meta.remove(); // read once; no reason to keep it in the document

const createElement = Document.prototype.createElement;
Document.prototype.createElement = function createElementWithNonce(name, options) {
  const element = createElement.call(this, name, options);
  if (nonce && String(name).toLowerCase() === "style") element.nonce = nonce;
  return element;
};
