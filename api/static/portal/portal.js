// Partner portal: a partner signs in with an API key and sees its domains.
//
// Two rules hold throughout:
// - the key lives only in this tab's sessionStorage (never localStorage, a cookie or the URL);
// - API data reaches the page only through textContent and DOM nodes, never innerHTML:
//   domain names and DNS answers are chosen by outsiders.

const KEY_STORAGE = 'policyd.portal.apiKey';
const PAGE_SIZE = 100;
const MAX_PAGES = 1000; // a guard against a server whose `next` never ends
const API_BASE = new URL('../', document.baseURI); // the portal is served at <api>/portal/

const BADGE_TONES = {
  active: 'ok', success: 'ok', inherited: 'ok',
  pending: 'warn', not_started: 'warn', temporary_failure: 'warn',
  suspended: 'bad', failed: 'bad', blocked: 'bad',
};
const BADGE_LABELS = {
  not_started: 'not started', temporary_failure: 'temporary failure',
};

const $ = (id) => document.getElementById(id);
const numberFormat = new Intl.NumberFormat();

let domains = null; // the last list fetched, or null when it must be (re)loaded
let generation = 0; // bumped on every navigation so late answers of an old view are dropped

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- the key ------------------------------------------------------------------------------

function readKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

function storeKey(key) {
  try {
    sessionStorage.setItem(KEY_STORAGE, key);
    return true;
  } catch {
    return false;
  }
}

function forgetKey() {
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // nothing stored, nothing to forget
  }
}

// ---- the API ------------------------------------------------------------------------------

/** GET a path relative to the API root; resolve to the JSON body or throw an ApiError. */
async function apiGet(path) {
  const key = readKey();
  if (!key) throw new ApiError(401, 'unauthorized', 'Please sign in.');
  let response;
  try {
    response = await fetch(new URL(path, API_BASE), {
      headers: { Authorization: `Bearer ${key}`, Accept: 'application/json' },
      credentials: 'omit',
      cache: 'no-store',
      referrerPolicy: 'no-referrer',
    });
  } catch {
    throw new ApiError(0, 'network', 'Could not reach the API. Check the connection and try again.');
  }
  const body = await response.json().catch(() => null);
  if (response.ok && body !== null) return body;
  const error = body && typeof body.error === 'object' && body.error ? body.error : {};
  const message = typeof error.message === 'string' && error.message
    ? error.message
    : `The API answered with HTTP ${response.status}.`;
  throw new ApiError(response.status, error.code || 'http_error', message);
}

/** The API path of one domain, its name escaped as a single path segment. */
function domainPath(name, suffix = '') {
  if (name === '.' || name === '..') throw new ApiError(0, 'invalid', 'Not a domain name.');
  return `domains/${encodeURIComponent(name)}${suffix}`;
}

/** Every domain the key may see, following `next` page after page. */
async function fetchAllDomains(onProgress) {
  const items = [];
  const seen = new Set();
  let offset = '0';
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const body = await apiGet(`domains/?limit=${PAGE_SIZE}&offset=${encodeURIComponent(offset)}`);
    if (!Array.isArray(body.items)) throw new ApiError(0, 'invalid', 'Unexpected answer from the API.');
    items.push(...body.items);
    onProgress(items.length);
    if (body.next === null || body.next === undefined) break;
    offset = String(body.next);
    if (seen.has(offset)) break; // a repeated cursor would loop for ever
    seen.add(offset);
  }
  return items;
}

// ---- small DOM helpers --------------------------------------------------------------------

/** An element with properties set and children (nodes or strings, added as text) appended. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name.startsWith('aria-') || name.startsWith('data-')) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

function showMessage(node, text) {
  node.textContent = text || '';
  node.hidden = !text;
}

function announce(text) {
  const announcer = $('announcer');
  announcer.textContent = '';
  // a fresh text node after clearing makes screen readers speak a repeated message again
  setTimeout(() => { announcer.textContent = text; }, 50);
}

function badge(value) {
  const text = value === null || value === undefined || value === '' ? 'unknown' : String(value);
  const tone = BADGE_TONES[text] || 'neutral';
  return el('span', { className: `badge badge-${tone}` }, BADGE_LABELS[text] || text);
}

function formatCount(value) {
  return typeof value === 'number' ? numberFormat.format(value) : '—';
}

/** "120 / 1,000 (12%)" with a small bar, or "120 / unlimited" without one. */
function usage(label, sent, limit) {
  const limited = typeof limit === 'number';
  let text = `${formatCount(sent)} / ${limited ? formatCount(limit) : 'unlimited'}`;
  if (limited && typeof sent === 'number' && limit > 0) {
    text += ` (${Math.round((sent / limit) * 100)}%)`;
  }
  const block = el('div', { className: 'usage' },
    el('span', { className: 'usage-label' }, label),
    el('span', { className: 'usage-text' }, text));
  if (limited) {
    const max = Math.max(limit, 1);
    const meter = el('meter', {
      min: 0, max, value: Math.min(Number(sent) || 0, max),
      low: max * 0.8, high: max * 0.95, optimum: 0, 'aria-hidden': 'true',
    });
    block.append(meter);
  }
  return block;
}

function outboundUsage(outbound) {
  const out = outbound || {};
  return el('div', { className: 'usages' },
    usage('Sent today', out.sent_today, out.daily_limit),
    usage('Sent this month', out.sent_month, out.monthly_limit));
}

function valueText(value) {
  if (value === null || value === undefined || value === '') return '(nothing)';
  if (Array.isArray(value)) return value.length ? value.map(valueText).join('\n') : '(nothing)';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

function tickOrCross(ok) {
  return el('span', { className: ok ? 'result result-ok' : 'result result-bad' },
    el('span', { 'aria-hidden': 'true' }, ok ? '✓' : '✗'),
    el('span', { className: 'visually-hidden' }, ok ? 'passed' : 'failed'));
}

// ---- copying ------------------------------------------------------------------------------

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // permission refused: try the old way below
    }
  }
  // plain http on a LAN address has no Clipboard API; a selected textarea still copies
  const focused = document.activeElement;
  const area = el('textarea', { value: text, readOnly: true, className: 'copy-buffer' });
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand('copy');
  } catch {
    copied = false;
  }
  area.remove();
  if (focused) focused.focus();
  return copied;
}

function copyButton(text, what) {
  const button = el('button', { type: 'button', className: 'button button-small', 'aria-label': `Copy ${what}` }, 'Copy');
  button.addEventListener('click', async () => {
    const copied = await copyText(text);
    button.textContent = copied ? 'Copied' : 'Copy failed';
    announce(copied ? `Copied ${what}.` : `Could not copy ${what}; select the text and copy it by hand.`);
    setTimeout(() => { button.textContent = 'Copy'; }, 2000);
  });
  return button;
}

// ---- views --------------------------------------------------------------------------------

function showView(name) {
  for (const view of ['signin', 'domains', 'detail']) $(`${view}-view`).hidden = view !== name;
  $('sign-out').hidden = name === 'signin';
}

function focusHeading(id) {
  const heading = $(id);
  if (heading) heading.focus({ preventScroll: false });
}

function showSignIn(message) {
  showView('signin');
  showMessage($('signin-message'), message);
  $('api-key').focus();
}

/** Forget the key and everything shown with it. */
function signOut(message) {
  forgetKey();
  generation += 1;
  domains = null;
  $('domain-list').replaceChildren();
  $('domain-filter').value = '';
  clearDetail();
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);
  showSignIn(message);
}

/** Common error handling: a 401 ends the session, anything else is shown in `target`. */
function handleError(error, target) {
  if (error instanceof ApiError && error.status === 401) {
    signOut(`Your API key was not accepted: ${error.message}`);
    return;
  }
  showMessage(target, error instanceof ApiError ? error.message : `Something went wrong: ${error}`);
}

// ---- the domain list ----------------------------------------------------------------------

function domainCard(domain) {
  const name = String(domain.name ?? '');
  const out = domain.outbound || {};
  const link = el('a', { href: `#domain=${encodeURIComponent(name)}`, className: 'domain-name' }, name);
  return el('li', { className: 'card' },
    el('h3', { className: 'card-title' }, link),
    el('dl', { className: 'badges' },
      el('div', {}, el('dt', {}, 'Status'), el('dd', {}, badge(domain.status))),
      el('div', {}, el('dt', {}, 'SES'), el('dd', {}, badge(domain.ses?.status))),
      el('div', {}, el('dt', {}, 'Outbound'), el('dd', {}, badge(out.status)))),
    outboundUsage(out));
}

function renderDomains() {
  const filter = $('domain-filter').value.trim().toLowerCase();
  const shown = domains.filter((d) => String(d.name ?? '').toLowerCase().includes(filter));
  $('domain-list').replaceChildren(...shown.map(domainCard));
  const total = `${domains.length} domain${domains.length === 1 ? '' : 's'}`;
  let status = filter ? `${shown.length} of ${total} shown.` : `${total}.`;
  if (domains.length === 0) status = 'No domains yet.';
  $('domains-status').textContent = status;
}

async function showDomains(reload = false) {
  const mine = ++generation;
  showView('domains');
  showMessage($('domains-message'), '');
  if (!reload) focusHeading('domains-title');
  if (domains && !reload) {
    renderDomains();
    return;
  }
  $('domains-status').textContent = 'Loading domains…';
  $('domains-view').setAttribute('aria-busy', 'true');
  try {
    const items = await fetchAllDomains((count) => {
      if (mine === generation) $('domains-status').textContent = `Loading domains… (${count})`;
    });
    if (mine !== generation) return;
    domains = items;
    renderDomains();
  } catch (error) {
    if (mine === generation) {
      $('domains-status').textContent = '';
      handleError(error, $('domains-message'));
    }
  } finally {
    $('domains-view').removeAttribute('aria-busy');
  }
}

// ---- one domain ---------------------------------------------------------------------------

function clearDetail() {
  $('detail-title').textContent = '';
  $('detail-status').textContent = '';
  showMessage($('detail-message'), '');
  $('detail-body').hidden = true;
  $('detail-summary').replaceChildren();
  $('records-body').replaceChildren();
  clearCheck();
}

function clearCheck() {
  $('check-status').textContent = '';
  showMessage($('check-message'), '');
  $('check-body').replaceChildren();
  $('check-table').hidden = true;
  $('check-dns').disabled = false;
}

function summaryItem(term, ...values) {
  return el('div', {}, el('dt', {}, term), el('dd', {}, ...values));
}

function renderSummary(domain) {
  const out = domain.outbound || {};
  const items = [
    summaryItem('Status', badge(domain.status)),
    summaryItem('SES verification', badge(domain.ses?.status)),
    summaryItem('DKIM', badge(domain.ses?.dkim_status)),
    summaryItem('Outbound', badge(out.status)),
    summaryItem('Tier', String(out.tier ?? '—'), out.enforcement ? ` (enforcement: ${out.enforcement})` : ''),
    summaryItem('Use', outboundUsage(out)),
  ];
  if (domain.parent) {
    items.splice(1, 0, summaryItem('Parent', String(domain.parent), domain.wildcard ? ' (wildcard)' : ''));
  }
  $('detail-summary').replaceChildren(...items);
}

function sameType(a, b) {
  return String(a ?? '').toUpperCase() === String(b ?? '').toUpperCase();
}

/** Record names compare without case or a trailing dot, as DNS does. */
function sameName(a, b) {
  const norm = (n) => String(n ?? '').toLowerCase().replace(/\.$/, '');
  return norm(a) === norm(b);
}

function renderRecords(records) {
  const rows = records.map((record) => {
    const name = valueText(record.name);
    const value = valueText(record.value);
    const row = el('tr', {},
      el('td', { 'data-label': 'Type' }, valueText(record.type)),
      el('td', { 'data-label': 'Name' }, el('div', { className: 'copyable' },
        el('code', {}, name), copyButton(name, `name of the ${record.type} record ${name}`))),
      el('td', { 'data-label': 'Value' }, el('div', { className: 'copyable' },
        el('code', {}, value), copyButton(value, `value of the ${record.type} record ${name}`))),
      el('td', { 'data-label': 'DNS', className: 'record-check' }, '—'));
    row.record = record;
    return row;
  });
  $('records-body').replaceChildren(...rows);
  $('records-table').hidden = rows.length === 0;
  $('records-empty').hidden = rows.length !== 0;
}

async function showDetail(name) {
  const mine = ++generation;
  showView('detail');
  clearDetail();
  $('detail-title').textContent = name;
  $('detail-status').textContent = 'Loading…';
  focusHeading('detail-title');
  try {
    const domain = await apiGet(domainPath(name));
    if (mine !== generation) return;
    $('detail-status').textContent = '';
    $('detail-title').textContent = String(domain.name ?? name);
    renderSummary(domain);
    renderRecords(Array.isArray(domain.dns_records) ? domain.dns_records : []);
    $('check-dns').dataset.domain = String(domain.name ?? name);
    $('detail-body').hidden = false;
  } catch (error) {
    if (mine !== generation) return;
    $('detail-status').textContent = '';
    handleError(error, $('detail-message'));
  }
}

function renderCheck(result) {
  const checks = Array.isArray(result.checks) ? result.checks : [];
  $('check-body').replaceChildren(...checks.map((check) => el('tr', {},
    el('td', { 'data-label': 'Result' }, tickOrCross(check.ok === true)),
    el('td', { 'data-label': 'Type' }, valueText(check.type)),
    el('td', { 'data-label': 'Name' }, el('code', {}, valueText(check.name))),
    el('td', { 'data-label': 'Expected' }, el('code', {}, valueText(check.expected))),
    el('td', { 'data-label': 'Found' }, el('code', {}, valueText(check.found))))));
  $('check-table').hidden = checks.length === 0;

  // mark each record to publish with the check of the same type and name
  for (const row of $('records-body').children) {
    const match = checks.find((c) => sameType(c.type, row.record.type) && sameName(c.name, row.record.name));
    row.lastElementChild.replaceChildren(match ? tickOrCross(match.ok === true) : '—');
  }
  const failed = checks.filter((c) => c.ok !== true).length;
  const time = new Date().toLocaleTimeString();
  $('check-status').textContent = result.ok === true
    ? `All ${checks.length} checks passed (${time}).`
    : `${failed} of ${checks.length} checks failed (${time}).`;
}

async function checkDns() {
  const mine = generation;
  const button = $('check-dns');
  clearCheck();
  button.disabled = true;
  $('check-status').textContent = 'Checking DNS…';
  try {
    const result = await apiGet(domainPath(button.dataset.domain, '/dns-check'));
    if (mine === generation) renderCheck(result);
  } catch (error) {
    if (mine !== generation) return;
    $('check-status').textContent = '';
    handleError(error, $('check-message'));
  } finally {
    if (mine === generation) button.disabled = false;
  }
}

// ---- routing ------------------------------------------------------------------------------

/** The domain named in the hash (#domain=NAME), or null for the list. */
function domainFromHash() {
  const match = /^#domain=(.+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function route() {
  if (!readKey()) {
    generation += 1;
    showSignIn('');
    return;
  }
  const name = domainFromHash();
  if (name) {
    showDetail(name);
  } else {
    showDomains();
  }
}

function onSignIn(event) {
  event.preventDefault();
  const input = $('api-key');
  const key = input.value.trim();
  if (!key) {
    showMessage($('signin-message'), 'Enter your API key.');
    input.focus();
    return;
  }
  if (!storeKey(key)) {
    showMessage($('signin-message'), 'This browser blocks session storage, which the portal needs.');
    return;
  }
  input.value = '';
  showMessage($('signin-message'), '');
  domains = null;
  route();
}

function start() {
  $('signin-form').addEventListener('submit', onSignIn);
  $('sign-out').addEventListener('click', () => signOut('You are signed out.'));
  $('refresh').addEventListener('click', () => showDomains(true));
  $('domain-filter').addEventListener('input', () => { if (domains) renderDomains(); });
  $('check-dns').addEventListener('click', checkDns);
  window.addEventListener('hashchange', route);
  route();
}

start();
