// The API and the key. The key lives only in this tab's sessionStorage (never localStorage, a
// cookie or the URL); a tab the user opens from this one (Ctrl+click, middle click, "open in new
// tab") gets it over a same-origin BroadcastChannel, and only within seconds of that gesture.

const KEY_STORAGE = 'policyd.portal.apiKey';
const PAGE_SIZE = 500;
const MAX_PAGES = 1000; // a guard against a server whose `next` never ends
const HANDOFF_WINDOW_MS = 15000;
const HANDOFF_WAIT_MS = 1500;
export const API_BASE = new URL('../', document.baseURI); // the portal is served at <api>/portal/

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- the key ------------------------------------------------------------------------------

export function readKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

export function storeKey(key) {
  try {
    sessionStorage.setItem(KEY_STORAGE, key);
    return true;
  } catch {
    return false;
  }
}

export function forgetKey() {
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // nothing stored, nothing to forget
  }
}

// ---- handing the key to a tab opened from this one ----------------------------------------

const channel = 'BroadcastChannel' in window ? new BroadcastChannel('policyd.portal') : null;
const grants = []; // expiry times: one new tab may ask per gesture
let waiting = null; // {id, resolve} while this tab asks for a key
let signedOutElsewhere = () => {};

/** A key's SHA-256 in hex: how tabs tell each other which key signed out, without sending it. */
async function digest(key) {
  const bytes = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(key));
  return [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** Called when another tab signed out with the key this tab holds. */
export function onSignedOutElsewhere(handler) {
  signedOutElsewhere = handler;
}

/** Tell the other tabs holding this key that it signed out (they forget it too). */
export async function broadcastSignOut(key) {
  if (!channel || !key || !crypto.subtle) return; // no SubtleCrypto on plain-http LAN addresses
  channel.postMessage({ type: 'signed-out', digest: await digest(key) });
}

/** The user opened a link in a new tab: let one tab that asks soon have the key. */
export function grantHandoff() {
  if (readKey()) grants.push(Date.now() + HANDOFF_WINDOW_MS);
}

function onChannelMessage(event) {
  const message = event.data;
  if (!message || typeof message !== 'object') return;
  if (message.type === 'want-key' && typeof message.id === 'string') {
    while (grants.length && grants[0] < Date.now()) grants.shift();
    const key = readKey();
    if (key && grants.length) {
      grants.shift();
      channel.postMessage({ type: 'key', to: message.id, key });
    }
  } else if (message.type === 'signed-out' && typeof message.digest === 'string') {
    const key = readKey();
    if (key && crypto.subtle) {
      digest(key).then((mine) => { if (mine === message.digest && readKey() === key) signedOutElsewhere(); });
    }
  } else if (message.type === 'key' && waiting && message.to === waiting.id
             && typeof message.key === 'string' && message.key) {
    const { resolve } = waiting;
    waiting = null;
    resolve(storeKey(message.key));
  }
}

if (channel) channel.addEventListener('message', onChannelMessage);

/** Ask the tab this one was opened from for the key; resolves true once stored. */
export function requestHandoff() {
  if (!channel || readKey()) return Promise.resolve(Boolean(readKey()));
  return new Promise((resolve) => {
    const id = crypto.getRandomValues(new Uint32Array(4)).join('-');
    waiting = { id, resolve };
    channel.postMessage({ type: 'want-key', id });
    setTimeout(() => {
      if (waiting && waiting.id === id) {
        waiting = null;
        resolve(false);
      }
    }, HANDOFF_WAIT_MS);
  });
}

export function cancelHandoff() {
  grants.length = 0;
  if (waiting) {
    const { resolve } = waiting;
    waiting = null;
    resolve(false);
  }
}

// ---- requests -----------------------------------------------------------------------------

let unauthorizedHandler = () => {};
/** Called with the ApiError when a key stops working (401). */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

async function request(method, path, body) {
  const key = readKey();
  if (!key) throw new ApiError(401, 'unauthorized', 'Please sign in.');
  const headers = { Authorization: `Bearer ${key}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(new URL(path, API_BASE), {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit', cache: 'no-store', referrerPolicy: 'no-referrer',
    });
  } catch {
    throw new ApiError(0, 'network', 'Could not reach the API. Check the connection and try again.');
  }
  if (response.status === 204) return null;
  const parsed = await response.json().catch(() => null);
  if (response.ok && parsed !== null) return parsed;
  const error = parsed && typeof parsed.error === 'object' && parsed.error ? parsed.error : {};
  const message = typeof error.message === 'string' && error.message
    ? error.message : `The API answered with HTTP ${response.status}.`;
  const failure = new ApiError(response.status, error.code || 'http_error', message);
  if (response.status === 401) unauthorizedHandler(failure);
  throw failure;
}

export const api = {
  get: (path) => request('GET', path),
  put: (path, body = {}) => request('PUT', path, body),
  post: (path, body = {}) => request('POST', path, body),
  delete: (path) => request('DELETE', path),
};

/** The API path of one resource, its name escaped as a single path segment. */
export function resourcePath(collection, name, suffix = '') {
  const text = String(name ?? '');
  if (!text || text === '.' || text === '..') throw new ApiError(0, 'invalid', 'Not a valid name.');
  return `${collection}/${encodeURIComponent(text)}${suffix}`;
}

/** Every item of a list, following `next` page after page. */
export async function fetchAll(path, onProgress = () => {}) {
  const items = [];
  const seen = new Set();
  const sep = path.includes('?') ? '&' : '?';
  let offset = '0';
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const body = await api.get(`${path}${sep}limit=${PAGE_SIZE}&offset=${encodeURIComponent(offset)}`);
    if (!Array.isArray(body?.items)) throw new ApiError(0, 'invalid', 'Unexpected answer from the API.');
    items.push(...body.items);
    onProgress(items.length);
    if (body.next === null || body.next === undefined) break;
    offset = String(body.next);
    if (seen.has(offset)) break; // a repeated cursor would loop for ever
    seen.add(offset);
  }
  return items;
}

/** What this server's portal may use ({"features": {"senders": bool}}); no key needed. */
export async function fetchConfig() {
  try {
    const response = await fetch(new URL('config.json', document.baseURI), { cache: 'no-store', credentials: 'omit' });
    if (response.ok) return await response.json();
  } catch {
    // an older server: no optional features
  }
  return { features: {} };
}
