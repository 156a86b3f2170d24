// The domain list: filter (U-label or A-label), sort, "needs attention", pages of 50. Rows are
// built once per domain and reused, so typing in the filter only re-slices an array.

import { api } from './api.js';
import { searchText } from './idn.js';
import { loadDomains, state } from './state.js';
import { formatCount } from './states.js';
import { $, announce, badge, el, nameNode, restoreScroll, showMessage } from './ui.js';

const PAGE = 50;
const SORTS = {
  name: { label: 'Name (A–Z)', compare: (a, b) => a.sortName.localeCompare(b.sortName) },
  attention: { label: 'Most serious first', compare: (a, b) => b.severity - a.severity || a.sortName.localeCompare(b.sortName) },
  today: { label: 'Most sent today', compare: (a, b) => (b.data.outbound?.sent_today ?? 0) - (a.data.outbound?.sent_today ?? 0) || a.sortName.localeCompare(b.sortName) },
  month: { label: 'Most sent this month', compare: (a, b) => (b.data.outbound?.sent_month ?? 0) - (a.data.outbound?.sent_month ?? 0) || a.sortName.localeCompare(b.sortName) },
  use: { label: 'Closest to a limit', compare: (a, b) => b.use - a.use || a.sortName.localeCompare(b.sortName) },
  newest: { label: 'Newest first', compare: (a, b) => String(b.data.created_at).localeCompare(String(a.data.created_at)) || a.sortName.localeCompare(b.sortName) },
};

const rows = new Map(); // entry -> <li>, rebuilt only when the entry object changes
let rowsVersion = -1;
let sorted = { key: null, version: -1, list: [] };
let view = null; // the mounted list's controls

function chips(entry) {
  const d = entry.data;
  const list = [badge(entry.sending.text, entry.sending.tone)];
  if (d.status === 'suspended') list.push(badge(d.suspended_by === 'master' ? 'Suspended by the platform' : 'Suspended by you', 'bad'));
  const ses = d.ses?.status;
  if (ses === 'pending') list.push(badge('SES pending', 'warn'));
  else if (ses === 'failed') list.push(badge('SES failed', 'bad'));
  else if (ses === 'not_started' && !d.parent) list.push(badge('SES not started', 'warn'));
  if (d.parent) list.push(badge(`Linked to ${state.byName.get(d.parent)?.uname ?? d.parent}`, ses === 'inherited' ? 'info' : 'warn'));
  if (d.wildcard) list.push(badge('Wildcard parent', 'info'));
  if (entry.use >= 0.9 && !entry.sending.text.includes('limit')) list.push(badge(`${Math.round(entry.use * 100)}% of a limit`, entry.use >= 1 ? 'bad' : 'warn'));
  return list;
}

function use(entry) {
  const out = entry.data.outbound || {};
  const limit = (v) => (typeof v === 'number' ? formatCount(v) : 'unlimited');
  return el('p', { className: 'row-use' },
    el('span', {}, `Today ${formatCount(out.sent_today)} / ${limit(out.daily_limit)}`),
    el('span', {}, `Month ${formatCount(out.sent_month)} / ${limit(out.monthly_limit)}`));
}

function row(entry) {
  let node = rows.get(entry);
  if (node) return node;
  const link = el('a', { href: `#/domain/${encodeURIComponent(entry.name)}`, className: 'row-link' },
    nameNode(entry.uname, entry.name));
  node = el('li', { className: `domain-row${entry.attention ? ' needs-attention' : ''}` },
    el('div', { className: 'row-main' }, el('h3', { className: 'row-title' }, link),
      el('div', { className: 'chips' }, chips(entry))),
    use(entry));
  rows.set(entry, node);
  return node;
}

function sortedEntries(key) {
  if (sorted.key !== key || sorted.version !== state.version) {
    sorted = { key, version: state.version, list: [...state.entries].sort(SORTS[key].compare) };
  }
  return sorted.list;
}

function readParams(params) {
  const sort = SORTS[params.get('sort')] ? params.get('sort') : 'name';
  const page = Math.max(1, Number.parseInt(params.get('page') || '1', 10) || 1);
  return { q: params.get('q') || '', sort, attention: params.get('attention') === '1', page };
}

function hashOf(p) {
  const params = new URLSearchParams();
  if (p.q) params.set('q', p.q);
  if (p.sort !== 'name') params.set('sort', p.sort);
  if (p.attention) params.set('attention', '1');
  if (p.page > 1) params.set('page', String(p.page));
  const query = params.toString();
  return query ? `#/domains?${query}` : '#/domains';
}

function quotaSummary() {
  const u = state.usage;
  if (!u) return null;
  const max = (v) => (typeof v === 'number' ? formatCount(v) : 'unlimited');
  const items = [
    ['Domains', `${formatCount(u.domains?.used)} of ${max(u.domains?.max)}`],
    ['Mailboxes', `${formatCount(u.mailboxes?.used)} (at most ${max(u.mailboxes?.max_per_domain)} per domain)`],
    ['Aliases', `${formatCount(u.aliases?.used)} (at most ${max(u.aliases?.max_per_mailbox)} per mailbox)`],
  ];
  const full = typeof u.domains?.max === 'number' && u.domains.used >= u.domains.max;
  return el('section', { className: 'quota', 'aria-labelledby': 'quota-title' },
    el('h3', { id: 'quota-title', className: 'visually-hidden' }, 'Your quotas'),
    el('dl', { className: 'quota-list' }, items.map(([term, value]) => el('div', {}, el('dt', {}, term), el('dd', {}, value)))),
    full ? el('p', { className: 'message message-warn' }, 'You have reached your domain quota: ask the platform for more before adding domains.') : null);
}

function addDomainForm() {
  const input = el('input', { id: 'new-domain', name: 'domain', type: 'text', autocomplete: 'off', spellcheck: false, autocapitalize: 'off', required: true, placeholder: 'example.com' });
  const message = el('p', { className: 'message message-error', role: 'alert', hidden: true });
  const form = el('form', { className: 'inline-form', noValidate: true },
    el('div', { className: 'field' }, el('label', { for: 'new-domain' }, 'Domain name'), input),
    el('button', { type: 'submit', className: 'button' }, 'Add domain'), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const name = input.value.trim();
    if (!name) {
      showMessage(message, 'Enter a domain name, e.g. example.com or bücher.example.');
      input.focus();
      return;
    }
    const button = form.querySelector('button');
    button.disabled = true;
    try {
      const created = await api.post('domains/', { name });
      await loadDomains(true);
      announce(`Added ${name}.`);
      location.hash = `#/domain/${encodeURIComponent(created.name)}`;
    } catch (error) {
      showMessage(message, error.message);
      button.disabled = false;
      input.focus();
    }
  });
  return el('details', { className: 'add-domain' }, el('summary', {}, 'Add a domain'),
    el('p', { className: 'hint' }, 'Type it as people write it; internationalised names are fine. Its DNS records to publish are shown next.'), form);
}

function mount(p) {
  const heading = el('h2', { id: 'domains-title', tabIndex: -1 }, 'Your domains');
  const refresh = el('button', { type: 'button', className: 'button button-quiet' }, 'Refresh');
  const filter = el('input', { id: 'domain-filter', type: 'search', autocomplete: 'off', spellcheck: false, value: p.q, 'aria-describedby': 'filter-hint' });
  const sort = el('select', { id: 'domain-sort' },
    Object.entries(SORTS).map(([key, s]) => el('option', { value: key, selected: key === p.sort }, s.label)));
  const attention = el('input', { id: 'domain-attention', type: 'checkbox', checked: p.attention });
  const attentionLabel = el('label', { for: 'domain-attention', className: 'check-label' }, 'Only domains that need attention');
  const status = el('p', { id: 'domains-status', className: 'hint', role: 'status' });
  const message = el('p', { className: 'message message-error', role: 'alert', hidden: true });
  const list = el('ol', { id: 'domain-list', className: 'domain-rows', 'aria-labelledby': 'domains-title' });
  const pager = el('nav', { className: 'pager', 'aria-label': 'Pages of domains' });
  const root = el('section', { className: 'list-view', 'aria-labelledby': 'domains-title' },
    el('div', { className: 'view-head' }, heading, refresh),
    quotaSummary(), addDomainForm(),
    el('form', { className: 'controls', role: 'search', 'aria-label': 'Find domains', on: { submit: (e) => e.preventDefault() } },
      el('div', { className: 'field field-filter' }, el('label', { for: 'domain-filter' }, 'Find a domain'), filter,
        el('p', { id: 'filter-hint', className: 'field-hint' }, 'Any part of the name, as written (bücher) or in punycode (xn--bcher).')),
      el('div', { className: 'field' }, el('label', { for: 'domain-sort' }, 'Sort by'), sort),
      el('div', { className: 'field field-check' }, attention, attentionLabel)),
    status, message, list, pager);
  view = { root, filter, sort, attention, status, list, pager, message, attentionLabel, p };

  let announceTimer = null;
  const changed = (resetPage) => {
    if (resetPage) view.p.page = 1;
    view.p.q = filter.value;
    view.p.sort = sort.value;
    view.p.attention = attention.checked;
    history.replaceState({ scroll: 0 }, '', hashOf(view.p));
    state.listHash = hashOf(view.p);
    draw();
    clearTimeout(announceTimer);
    announceTimer = setTimeout(() => announce(status.textContent), 700);
  };
  filter.addEventListener('input', () => changed(true));
  sort.addEventListener('change', () => changed(true));
  attention.addEventListener('change', () => changed(true));
  refresh.addEventListener('click', async () => {
    refresh.disabled = true;
    status.textContent = 'Refreshing…';
    try {
      await loadDomains(true);
      rows.clear();
      draw();
      announce(status.textContent);
    } catch (error) {
      if (error?.status !== 401) showMessage(message, error.message);
    } finally {
      refresh.disabled = false;
    }
  });
  $('view').replaceChildren(root);
  return heading;
}

function pagerButton(label, page, disabled, ariaLabel) {
  const button = el('button', { type: 'button', className: 'button button-quiet', disabled, 'aria-label': ariaLabel }, label);
  button.addEventListener('click', () => {
    view.p.page = page;
    history.replaceState({ scroll: 0 }, '', hashOf(view.p));
    state.listHash = hashOf(view.p);
    draw();
    view.list.scrollIntoView({ block: 'start' });
    announce(view.status.textContent);
  });
  return button;
}

/** Show the current slice of the filtered, sorted domains; nothing else is rebuilt. */
function draw() {
  if (rowsVersion !== state.version) {
    // entries were replaced (a reload or one domain's update): their old rows are stale
    for (const entry of rows.keys()) if (state.byName.get(entry.name) !== entry) rows.delete(entry);
    rowsVersion = state.version;
  }
  const { p } = view;
  const q = searchText(p.q);
  const all = sortedEntries(p.sort);
  const attentionCount = state.entries.reduce((n, e) => n + (e.attention ? 1 : 0), 0);
  view.attentionLabel.textContent = `Only domains that need attention (${attentionCount})`;
  const shown = all.filter((e) => (!q || e.search.includes(q)) && (!p.attention || e.attention));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  p.page = Math.min(p.page, pages);
  const start = (p.page - 1) * PAGE;
  const slice = shown.slice(start, start + PAGE);
  view.list.replaceChildren(...slice.map(row));
  const total = state.entries.length;
  let text;
  if (total === 0) text = 'No domains yet. Add your first one above.';
  else if (shown.length === 0) text = `No domain matches (of ${formatCount(total)}).`;
  else {
    text = `Showing ${formatCount(start + 1)}–${formatCount(start + slice.length)} of ${formatCount(shown.length)}`;
    text += shown.length === total ? ' domains.' : ` matching domains (${formatCount(total)} in all).`;
  }
  view.status.textContent = text;
  view.pager.hidden = pages <= 1;
  view.pager.replaceChildren(
    pagerButton('← Previous', p.page - 1, p.page <= 1, 'Previous page'),
    el('span', { className: 'pager-text', 'aria-current': 'page' }, `Page ${p.page} of ${pages}`),
    pagerButton('Next →', p.page + 1, p.page >= pages, 'Next page'));
}

export function renderList(params) {
  const p = readParams(params);
  const heading = mount(p);
  document.title = 'Your domains – Partner portal';
  draw();
  restoreScroll();
  heading.focus({ preventScroll: true });
}

/** Forget the built rows (after sign-out nothing of them may stay in memory or the page). */
export function forgetRows() {
  rows.clear();
  sorted = { key: null, version: -1, list: [] };
  view = null;
}
