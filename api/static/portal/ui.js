// Small DOM helpers. API data reaches the page only as text nodes and properties, never as
// HTML: domain names, addresses and DNS answers are chosen by outsiders.

export const $ = (id) => document.getElementById(id);

/** An element with properties set and children (nodes or strings, added as text) appended. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('aria-') || name.startsWith('data-') || name === 'role' || name === 'for') {
      node.setAttribute(name, value === true ? 'true' : String(value));
    } else if (name === 'on') {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else {
      node[name] = value;
    }
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(typeof child === 'string' || typeof child === 'number' ? String(child) : child);
  }
}

let uniqueCounter = 0;
/** A fresh id for label/aria wiring. */
export function uid(prefix) {
  uniqueCounter += 1;
  return `${prefix}-${uniqueCounter}`;
}

export function showMessage(node, text, tone = 'error') {
  node.textContent = text || '';
  node.hidden = !text;
  node.className = `message message-${tone}`;
}

let announceTimer = null;
/** Say something to screen readers (the live region), once, politely. */
export function announce(text) {
  const region = $('announcer');
  clearTimeout(announceTimer);
  region.textContent = '';
  // a fresh text node after clearing makes screen readers speak a repeated message again
  announceTimer = setTimeout(() => { region.textContent = text; }, 60);
}

export function badge(text, tone = 'neutral') {
  return el('span', { className: `badge badge-${tone}` }, text);
}

/** A domain name shown as people write it, isolated from surrounding bidi text. */
export function nameNode(unicode, ascii, className = '') {
  const parts = [el('bdi', { className: 'uname' }, unicode)];
  if (ascii && ascii !== unicode) {
    parts.push(' ', el('span', { className: 'aname' }, '(', el('bdi', {}, ascii), ')'));
  }
  return el('span', { className: `domain-name ${className}`.trim() }, ...parts);
}

/** A verdict: ok true (✓), false (✗), or 'optional' (○, something optional is missing). */
export function tick(ok, label) {
  const [tone, mark] = ok === 'optional' ? ['warn', '○'] : ok ? ['ok', '✓'] : ['bad', '✗'];
  return el('span', { className: `result result-${tone}` },
    el('span', { 'aria-hidden': 'true' }, mark), ' ',
    el('span', { className: 'result-label' }, label ?? (ok ? 'OK' : 'Not OK')));
}

const byteUnits = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
export function formatBytes(value) {
  if (typeof value !== 'number') return '—';
  let n = value;
  let unit = 0;
  while (n >= 1024 && unit < byteUnits.length - 1) {
    n /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || n >= 100 ? 0 : 1;
  return `${n.toFixed(digits)} ${byteUnits[unit]}`;
}

export function formatTime(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

/** A labelled meter with "used / limit (n%)" text; unlimited shows no meter. */
export function usageMeter(label, used, limit, format = (v) => String(v)) {
  const limited = typeof limit === 'number';
  let text = `${format(used)} of ${limited ? format(limit) : 'unlimited'}`;
  if (limited && typeof used === 'number' && limit > 0) text += ` (${Math.round((used / limit) * 100)}%)`;
  const id = uid('usage');
  const block = el('div', { className: 'usage' },
    el('span', { className: 'usage-label', id }, label),
    el('span', { className: 'usage-text' }, text));
  if (limited) {
    const max = Math.max(limit, 1);
    block.append(el('meter', {
      min: 0, max, value: Math.min(Number(used) || 0, max), low: max * 0.8, high: max * 0.95,
      optimum: 0, 'aria-labelledby': id,
    }));
  }
  return block;
}

// ---- copying ------------------------------------------------------------------------------

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // refused (no permission, no focus): try the old way below
    }
  }
  // plain http on a LAN address has no Clipboard API; a selected textarea still copies
  const focused = document.activeElement;
  const area = el('textarea', { value: text, readOnly: true, className: 'copy-buffer', 'aria-hidden': 'true', tabIndex: -1 });
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand('copy');
  } catch {
    copied = false;
  }
  area.remove();
  if (focused instanceof HTMLElement) focused.focus();
  return copied;
}

/** A "Copy" button whose accessible name says what it copies. */
export function copyButton(text, what, label = 'Copy') {
  const button = el('button', {
    type: 'button', className: 'button button-small copy', 'aria-label': `Copy ${what}`,
    'data-copy': text,
  }, label);
  let timer = null;
  button.addEventListener('click', async () => {
    const copied = await copyText(text);
    button.textContent = copied ? 'Copied' : 'Copy failed';
    announce(copied ? `Copied ${what}.` : `Could not copy ${what}; select the text and copy it by hand.`);
    clearTimeout(timer);
    timer = setTimeout(() => { button.textContent = label; }, 2000);
  });
  return button;
}

/** Code text with its copy button beside it. */
export function copyable(text, what) {
  return el('div', { className: 'copyable' }, el('code', {}, text), copyButton(text, what));
}

// ---- dialogs ------------------------------------------------------------------------------

/**
 * A modal dialog with a form; resolves with the submit handler's result, or null when cancelled.
 * `build(form)` adds the fields; `submit(form)` returns a promise, throws to show an error.
 */
export function formDialog({ title, build, submit, submitLabel = 'Save', danger = false }) {
  return new Promise((resolve) => {
    const returnFocus = document.activeElement;
    const titleId = uid('dialog-title');
    const message = el('p', { className: 'message message-error', role: 'alert', hidden: true });
    const form = el('form', { method: 'dialog', className: 'dialog-form', noValidate: true });
    const submitButton = el('button', { type: 'submit', className: `button${danger ? ' button-danger' : ''}` }, submitLabel);
    const cancel = el('button', { type: 'button', className: 'button button-quiet' }, 'Cancel');
    const dialog = el('dialog', { className: 'dialog', 'aria-labelledby': titleId },
      el('h2', { id: titleId, className: 'dialog-title' }, title), form);
    build(form);
    form.append(message, el('div', { className: 'dialog-actions' }, submitButton, cancel));
    let result = null;
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => {
      dialog.remove();
      if (returnFocus instanceof HTMLElement && returnFocus.isConnected) returnFocus.focus();
      resolve(result);
    });
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      submitButton.disabled = true;
      showMessage(message, '');
      try {
        result = (await submit(form)) ?? true;
        dialog.close();
      } catch (error) {
        showMessage(message, error?.message || String(error));
        submitButton.disabled = false;
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    const first = form.querySelector('input, select, textarea, button');
    if (first) first.focus();
  });
}

/** A labelled input (or select/textarea) in a field wrapper; returns [wrapper, control]. */
export function field(label, control, hint) {
  const id = control.id || uid('field');
  control.id = id;
  const parts = [el('label', { for: id }, label), control];
  if (hint) {
    const hintId = `${id}-hint`;
    control.setAttribute('aria-describedby', hintId);
    parts.push(el('p', { className: 'field-hint', id: hintId }, hint));
  }
  return [el('div', { className: 'field' }, ...parts), control];
}

/** After a view rendered: back to the saved position (Back), or the top (a new page). */
export function restoreScroll() {
  const saved = history.state?.scroll;
  window.scrollTo(0, typeof saved === 'number' ? saved : 0);
}
