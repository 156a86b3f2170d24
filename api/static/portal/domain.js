// One domain: its states in words, and tabs for DNS records, mailboxes, aliases, senders and
// sending. The header is drawn from the list's copy at once, then from a fresh GET.

import { api, fetchAll, resourcePath } from './api.js';
import { checkFor, PURPOSE_LABELS, relativeName, unmatchedChecks, verdict, zoneSnippet } from './dns.js';
import { renderAliases, renderMailboxes, renderSenders } from './mail.js';
import { findEntry, state, updateDomain } from './state.js';
import { dkimWords, enforcementWords, explain, formatCount, formatPercent, lockedSendersState,
  sendingState, sesWords } from './states.js';
import { addressToUnicode, toUnicode } from './idn.js';
import { $, announce, badge, copyable, copyButton, el, field, formatBytes, formDialog, nameNode,
  restoreScroll, showMessage, tick, usageMeter } from './ui.js';

export const TABS = [
  { id: 'dns', label: 'DNS records' },
  { id: 'mailboxes', label: 'Mailboxes' },
  { id: 'aliases', label: 'Aliases' },
  { id: 'senders', label: 'Senders', feature: 'senders' },
  { id: 'sending', label: 'Sending & limits' },
];

let mounted = null; // {name, root, head, nav, panel}
const lockedSenders = new Map(); // domain name -> its locked senders' addresses (SPEC §9)

function domainHash(name, tab = 'dns') {
  return `#/domain/${encodeURIComponent(name)}${tab === 'dns' ? '' : `/${tab}`}`;
}

function parentOf(entry) {
  return entry.data.parent ? state.byName.get(entry.data.parent) ?? null : null;
}

function tabsFor() {
  return TABS.filter((t) => !t.feature || state.config.features?.[t.feature]);
}

// ---- the header: name, summary, states ------------------------------------------------------

function parentLink(name) {
  const entry = state.byName.get(name);
  return entry
    ? el('a', { href: domainHash(name) }, nameNode(entry.uname, entry.name))
    : nameNode(toUnicode(name), name);
}

function summary(entry) {
  const d = entry.data;
  const parent = parentOf(entry)?.data;
  const sending = sendingState(d, parent);
  const dkim = dkimWords(d, parent);
  const sesTone = { success: 'ok', inherited: 'ok', failed: 'bad' }[d.ses?.status] || 'warn';
  const item = (term, ...value) => el('div', {}, el('dt', {}, term), el('dd', {}, ...value));
  const items = [
    item('Domain', d.status === 'suspended' ? badge('Suspended', 'bad') : badge('Active', 'ok')),
    item('SES', badge(sesWords(d.ses?.status), sesTone)),
    item('DKIM', badge(dkim.text, dkim.tone)),
    item('Sending', badge(sending.text, sending.tone)),
  ];
  if (d.parent) items.push(item(d.ses?.status === 'inherited' ? 'Sends under' : 'Linked to', parentLink(d.parent)));
  if (d.wildcard) items.push(item('Subdomains', badge(`Wildcard parent (${entry.children.length} linked)`, 'info')));
  return el('dl', { className: 'summary' }, items);
}

async function setSuspended(entry, suspend) {
  const path = resourcePath('domains', entry.name, suspend ? '/suspend' : '/activate');
  const fresh = await api.put(path);
  updateDomain(fresh);
  announce(suspend ? `${entry.uname} is suspended.` : `${entry.uname} is active again.`);
  redraw(entry.name);
}

function stateAction(entry, s) {
  if (s.action === 'activate') {
    const button = el('button', { type: 'button', className: 'button' }, 'Activate the domain');
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        await setSuspended(entry, false);
      } catch (error) {
        button.disabled = false;
        announce(error.message);
      }
    });
    return button;
  }
  if (s.action === 'senders') {
    return el('a', { href: domainHash(entry.name, 'senders'), className: 'button button-quiet' }, 'Open the Senders tab');
  }
  if (s.action === 'parent' && entry.data.parent && state.byName.has(entry.data.parent)) {
    return el('a', { href: domainHash(entry.data.parent), className: 'button button-quiet' },
      `Open ${toUnicode(entry.data.parent)}`);
  }
  return null;
}

function statesSection(entry) {
  const states = [
    ...lockedSendersState((lockedSenders.get(entry.name) || []).map(addressToUnicode)),
    ...explain(entry.data, parentOf(entry)?.data, entry.children)];
  const icon = { bad: '✗', warn: '!', info: 'i', ok: '✓' };
  const words = { bad: 'Problem', warn: 'Needs attention', info: 'Note', ok: 'OK' };
  return el('section', { className: 'states', 'aria-labelledby': 'states-title' },
    el('h3', { id: 'states-title' }, 'State'),
    el('ul', { className: 'state-list' }, states.map((s) => el('li', { className: `state state-${s.tone}`, 'data-state': s.key },
      el('span', { className: 'state-icon', 'aria-hidden': 'true' }, icon[s.tone]),
      el('div', { className: 'state-body' },
        el('p', { className: 'state-title' }, el('span', { className: 'visually-hidden' }, `${words[s.tone]}: `), s.title),
        el('p', { className: 'state-text' }, s.text),
        stateAction(entry, s))))));
}

function backLink() {
  const link = el('a', { href: state.listHash, className: 'back-link' }, '← All domains');
  link.addEventListener('click', (event) => {
    if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
    if (history.state?.fromList) { // the list is the entry before this one: Back keeps its scroll
      event.preventDefault();
      history.back();
    }
  });
  return link;
}

function headDetails(entry) {
  return el('div', { className: 'head-details' }, summary(entry), statesSection(entry));
}

function header(entry) {
  const title = el('h2', { id: 'domain-title', className: 'domain-title', tabIndex: -1 },
    nameNode(entry.uname, entry.name));
  return el('div', { className: 'domain-head' }, el('p', {}, backLink()), title, headDetails(entry));
}

function tabNav(name, current) {
  return el('nav', { className: 'tabs', 'aria-label': 'Sections of this domain' },
    el('ul', {}, tabsFor().map((t) => {
      const link = el('a', { href: domainHash(name, t.id), 'data-tab': t.id, 'aria-current': t.id === current ? 'page' : null }, t.label);
      link.addEventListener('click', (event) => {
        if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
        event.preventDefault(); // a tab replaces this history entry: Back leaves the domain
        history.replaceState({ ...(history.state || {}), scroll: window.scrollY }, '', domainHash(name, t.id));
        selectTab(t.id, ++state.generation);
        link.focus();
      });
      return el('li', {}, link);
    })));
}

// ---- mounting and tabs --------------------------------------------------------------------

function notFound(name) {
  const heading = el('h2', { tabIndex: -1 }, 'Domain not found');
  $('view').replaceChildren(el('section', {}, heading,
    el('p', { className: 'message message-error', role: 'alert' },
      `Your account has no domain called ${toUnicode(name ?? '')}.`),
    el('p', {}, el('a', { href: '#/domains' }, '← All domains'))));
  document.title = 'Domain not found – Partner portal';
  heading.focus();
  mounted = null;
}

function mount(entry, tab) {
  const panel = el('section', { id: 'domain-panel', className: 'panel-body', 'aria-live': 'off' });
  const head = header(entry);
  const nav = tabNav(entry.name, tab);
  const root = el('article', { className: 'domain-view', 'aria-labelledby': 'domain-title' }, head, nav, panel);
  $('view').replaceChildren(root);
  mounted = { name: entry.name, root, head, nav, panel, tab };
  document.title = `${entry.uname} – Partner portal`;
}

/** Draw the summary and states again from the cached domain; the tab too unless `headOnly`. */
function redraw(name, headOnly = false, generation = null) {
  const entry = state.byName.get(name);
  if (!mounted || mounted.name !== name || !entry) return;
  const old = mounted.head.querySelector('.head-details');
  const hadFocus = old.contains(document.activeElement);
  old.replaceWith(headDetails(entry));
  if (hadFocus) $('domain-title').focus({ preventScroll: true }); // its control is gone
  if (!headOnly) selectTab(mounted.tab, generation ?? ++state.generation);
}

export function selectTab(tab, generation) {
  const entry = state.byName.get(mounted.name);
  mounted.tab = tab;
  for (const link of mounted.nav.querySelectorAll('a[data-tab]')) {
    if (link.dataset.tab === tab) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const ctx = { entry, generation, panel: mounted.panel, refresh: () => refresh(entry.name, generation), redraw: () => redraw(entry.name) };
  const renderers = { dns: renderDns, mailboxes: renderMailboxes, aliases: renderAliases, senders: renderSenders, sending: renderSending };
  mounted.panel.replaceChildren();
  return renderers[tab](ctx);
}

async function refresh(name, generation) {
  const fresh = await api.get(resourcePath('domains', name));
  if (generation !== state.generation) return null;
  return updateDomain(fresh);
}

export async function renderDomain(name, tab, generation) {
  const entry = findEntry(name);
  if (!entry) {
    notFound(name);
    return;
  }
  const available = tabsFor().some((t) => t.id === tab) ? tab : 'dns';
  if (mounted && mounted.name === entry.name && mounted.root.isConnected) {
    await selectTab(available, generation);
    return;
  }
  mount(entry, available);
  const title = $('domain-title');
  title.focus({ preventScroll: true });
  const drawing = selectTab(available, generation);
  try {
    const before = JSON.stringify(entry.data);
    const fresh = await refresh(entry.name, generation); // the list's copy may be minutes old
    if (fresh && generation === state.generation) {
      // the open tab is drawn again only if what it shows changed (a DNS check is not cheap)
      const same = JSON.stringify(fresh.data) === before;
      const recordsSame = JSON.stringify(fresh.data.records) === JSON.stringify(entry.data.records);
      redraw(entry.name, same || (available === 'dns' && recordsSame), generation);
      mounted.root.dataset.fresh = 'true';
    }
  } catch (error) {
    if (error?.status !== 401 && generation === state.generation) {
      mounted.head.append(el('p', { className: 'message message-error', role: 'alert' }, error.message));
    }
  }
  await loadLockedSenders(entry.name, generation);
  await drawing;
  if (generation === state.generation) restoreScroll();
}

/** Say in the states when senders of the domain are locked (only where the server has §9). */
async function loadLockedSenders(name, generation) {
  if (!state.config.features?.senders) return;
  try {
    const items = await fetchAll(resourcePath('domains', name, '/senders'));
    const locked = items.filter((s) => s.status === 'locked').map((s) => String(s.email));
    const before = JSON.stringify(lockedSenders.get(name) || []);
    lockedSenders.set(name, locked);
    if (generation === state.generation && JSON.stringify(locked) !== before) redraw(name, true);
  } catch (error) {
    if (error?.status === 401) throw error;
  }
}

/** Forget what was shown (sign-out). */
export function forgetDomainView() {
  lockedSenders.clear();
  mounted = null;
}

// ---- DNS records ----------------------------------------------------------------------------

function recordLabel(record, index, records) {
  const label = PURPOSE_LABELS[record.purpose] || record.purpose;
  if (record.purpose === 'dkim') {
    const dkims = records.filter((r) => r.purpose === 'dkim');
    return `${label} ${dkims.indexOf(record) + 1} of ${dkims.length}`;
  }
  if (record.purpose === 'mx') {
    const mxs = records.filter((r) => r.purpose === 'mx');
    return mxs.length > 1 ? `${label} ${mxs.indexOf(record) + 1} of ${mxs.length}` : label;
  }
  return label;
}

function verdictCell(record, v, checking) {
  if (checking) return el('span', { className: 'hint' }, 'Checking…');
  if (!v) return el('span', { className: 'hint' }, 'Not checked');
  const optional = !record.required && !v.ok;
  const label = optional ? 'Not published (optional)' : (v.ok ? 'OK' : 'Needs fixing');
  return el('div', { className: 'verdict' }, tick(optional ? 'optional' : v.ok, label),
    el('p', { className: 'verdict-text' }, v.text));
}

/** The value to publish: the record's, or the fix a check found (an SPF record merged). */
function publishValue(record, v) {
  return v?.fix ?? String(record.value ?? '');
}

function recordRow(record, index, records, zone, result, checking) {
  const label = recordLabel(record, index, records);
  const v = result ? verdict(record, checkFor(record, result)) : null;
  const value = publishValue(record, v);
  const host = relativeName(record.name, zone);
  return el('tr', { 'data-purpose': record.purpose, 'data-name': record.name },
    el('th', { scope: 'row', 'data-label': 'Record' }, label, record.required ? null : el('span', { className: 'hint' }, ' (optional)')),
    el('td', { 'data-label': 'Type' }, record.type),
    el('td', { 'data-label': 'Name' }, copyable(String(record.name), `name of the ${label} record`),
      host.endsWith('.') ? null : el('span', { className: 'host' }, `Host in the ${toUnicode(zone)} zone: `, el('code', {}, host))),
    el('td', { 'data-label': 'Value' }, copyable(value, `value of the ${label} record`),
      v?.fix ? el('span', { className: 'host' }, 'Adjusted to the SPF records you have now.') : null),
    el('td', { 'data-label': 'Check', className: 'record-check' }, verdictCell(record, v, checking)));
}

function extraCheckRow(check) {
  const found = Array.isArray(check.found) ? (check.found.join(', ') || 'nothing') : String(check.found);
  const expected = Array.isArray(check.expected) ? check.expected.join(', ') : check.expected;
  let text = `Found: ${found}.`;
  if (check.type === 'MX' && Array.isArray(check.expected) && check.expected.length === 0) {
    text = check.ok ? `Points at ${found}.` : 'No MX record: point the domain at your mail host.';
  }
  return el('tr', { 'data-check': check.type },
    el('th', { scope: 'row', 'data-label': 'Record' }, check.type === 'MX' ? PURPOSE_LABELS.mx : check.type),
    el('td', { 'data-label': 'Type' }, check.type === 'SPF' ? 'TXT' : check.type),
    el('td', { 'data-label': 'Name' }, el('code', {}, String(check.name))),
    el('td', { 'data-label': 'Value' }, expected ? el('code', {}, String(expected)) : el('span', { className: 'hint' }, 'any mail host (the platform names none)')),
    el('td', { 'data-label': 'Check' }, el('div', { className: 'verdict' }, tick(check.ok === true, check.ok ? 'OK' : 'Needs fixing'), el('p', { className: 'verdict-text' }, text))));
}

function recordsTable(caption, records, zone, result, checking, extra = []) {
  return el('div', { className: 'table-wrap' }, el('table', { className: 'records' },
    el('caption', {}, caption),
    el('thead', {}, el('tr', {}, ['Record', 'Type', 'Name', 'Value', 'Check'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, records.map((r, i) => recordRow(r, i, records, zone, result, checking)), extra)));
}

function zoneOf(entry) {
  const inherited = (entry.data.records || []).find((r) => r.inherited_from);
  return inherited ? inherited.inherited_from : entry.name;
}

function renderDns(ctx) {
  const { entry, panel } = ctx;
  const records = Array.isArray(entry.data.records) ? entry.data.records : [];
  const own = records.filter((r) => !r.inherited_from);
  const inherited = records.filter((r) => r.inherited_from);
  const zone = zoneOf(entry);
  const status = el('p', { className: 'hint', role: 'status' });
  const message = el('p', { className: 'message message-error', role: 'alert', hidden: true });
  const button = el('button', { type: 'button', className: 'button' }, 'Check DNS again');
  const body = el('div', {});
  const snippetHolder = el('div', { className: 'snippet' });
  const sesMissing = !inherited.length && !own.some((r) => r.purpose === 'ses');

  const drawSnippet = (result) => {
    // with a check's fixes applied (one merged SPF record), so the snippet is what to publish
    const publish = own.map((r) => ({ ...r, value: publishValue(r, result ? verdict(r, checkFor(r, result)) : null) }));
    const snippet = zoneSnippet(publish, zone);
    snippetHolder.replaceChildren(
      el('pre', { id: 'zone-snippet', tabIndex: 0, 'aria-label': 'Zone file snippet' }, el('code', {}, snippet)),
      copyButton(snippet, 'zone file snippet', 'Copy snippet'));
  };

  const draw = (result, checking) => {
    const parts = [];
    drawSnippet(result);
    parts.push(recordsTable(`Records for ${entry.uname}`, own, zone, result, checking,
      result ? unmatchedChecks(records, result).filter((c) => c.type === 'MX').map(extraCheckRow) : []));
    if (sesMissing) {
      parts.push(el('p', { className: 'message message-warn' },
        'The SES verification TXT record and the three DKIM CNAME records are not listed yet: Amazon SES issues their values when verification starts (see State above).'));
    }
    if (inherited.length) {
      const parent = toUnicode(inherited[0].inherited_from);
      parts.push(el('h4', {}, `Sending records of ${parent}`),
        el('p', { className: 'hint' }, `${entry.uname} sends under ${parent}, so these belong in ${parent}'s DNS, not this domain's. They are checked here because this domain depends on them.`,
          state.byName.has(inherited[0].inherited_from) ? [' ', el('a', { href: domainHash(inherited[0].inherited_from) }, `Open ${parent}`)] : null),
        recordsTable(`Records ${entry.uname} uses from ${parent}`, inherited, inherited[0].inherited_from, result, checking));
    }
    body.replaceChildren(...parts);
  };

  const check = async () => {
    button.disabled = true;
    showMessage(message, '');
    status.textContent = 'Checking DNS…';
    draw(null, true);
    try {
      const result = await api.get(resourcePath('domains', entry.name, '/dns-check'));
      if (ctx.generation !== state.generation) return;
      draw(result, false);
      const relevant = records.map((r) => verdict(r, checkFor(r, result))).filter(Boolean);
      const required = records.filter((r) => r.required).map((r) => verdict(r, checkFor(r, result))).filter(Boolean);
      const failing = required.filter((v) => !v.ok).length;
      const time = new Date().toLocaleTimeString();
      status.textContent = failing
        ? `Checked at ${time}: ${failing} of ${required.length} required records need fixing.`
        : `Checked at ${time}: all ${required.length} required records are published.`;
      if (relevant.length > required.length && !relevant.every((v) => v.ok)) status.textContent += ' DMARC is missing (optional).';
      announce(status.textContent);
    } catch (error) {
      if (ctx.generation !== state.generation) return;
      draw(null, false);
      status.textContent = '';
      if (error?.status !== 401) showMessage(message, error.message);
    } finally {
      button.disabled = false;
    }
  };
  button.addEventListener('click', check);

  panel.append(
    el('h3', { id: 'panel-title' }, 'DNS records'),
    el('p', {}, `Publish these records at the DNS provider of ${toUnicode(zone)}, exactly as shown. The check column says what DNS serves right now; changes can take up to an hour to show.`),
    el('div', { className: 'check-bar' }, button, status), message, body,
    el('h4', {}, 'Zone file snippet'),
    el('p', { className: 'hint' }, `This domain's own records in zone-file form, names relative to the zone ${toUnicode(zone)} ($ORIGIN). Paste it into a zone file or a DNS provider's import.`),
    snippetHolder);
  draw(null, false);
  return check();
}

// ---- sending, limits, history -----------------------------------------------------------------

function limitForm(ctx) {
  const { entry } = ctx;
  const out = entry.data.outbound || {};
  if (entry.data.parent) {
    return el('p', { className: 'hint' }, `Tier, limits and enforcement are ${toUnicode(entry.data.parent)}'s: change them there.`);
  }
  const number = (id, value) => el('input', { id, type: 'number', min: 0, step: 1, inputMode: 'numeric', value: typeof value === 'number' ? String(value) : '' });
  const [dailyField, daily] = field('Daily limit (messages)', number('limit-daily', out.daily_limit));
  const [monthlyField, monthly] = field('Monthly limit (messages)', number('limit-monthly', out.monthly_limit));
  const message = el('p', { className: 'message', role: 'status', hidden: true });
  const form = el('form', { className: 'inline-form', noValidate: true, 'aria-labelledby': 'limits-title' },
    dailyField, monthlyField, el('button', { type: 'submit', className: 'button' }, 'Save limits'), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const body = {};
    for (const [input, name] of [[daily, 'daily_limit'], [monthly, 'monthly_limit']]) {
      const text = input.value.trim();
      if (text === '') continue;
      const value = Number(text);
      if (!Number.isInteger(value) || value < 0) {
        showMessage(message, 'Limits are whole numbers of messages, 0 or more.');
        input.focus();
        return;
      }
      if (value !== out[name]) body[name] = value;
    }
    if (!Object.keys(body).length) {
      showMessage(message, 'Nothing changed.', 'info');
      return;
    }
    try {
      await api.put(resourcePath('domains', entry.name, '/outbound'), body);
      await ctx.refresh();
      announce('Limits saved.');
      ctx.redraw();
    } catch (error) {
      showMessage(message, error.code === 'forbidden'
        ? `${error.message} (a partner may lower its limits, up to its tier's).` : error.message);
    }
  });
  return el('div', {}, el('h4', { id: 'limits-title' }, 'Your limits'),
    el('p', { className: 'hint' }, `You may set the daily and monthly limits at or below your ${out.tier} tier's; the platform sets the tier and enforcement.`), form);
}

function suspendControl(ctx) {
  const { entry } = ctx;
  const d = entry.data;
  if (d.status === 'suspended' && d.suspended_by === 'master') {
    return el('p', {}, 'The platform suspended this domain; only the platform can activate it.');
  }
  const suspended = d.status === 'suspended';
  const button = el('button', { type: 'button', className: suspended ? 'button' : 'button button-danger' },
    suspended ? 'Activate the domain' : 'Suspend the domain…');
  button.addEventListener('click', async () => {
    if (suspended) {
      await setSuspended(entry, false).catch((e) => announce(e.message));
      return;
    }
    await formDialog({
      title: `Suspend ${entry.uname}?`, submitLabel: 'Suspend', danger: true,
      build: (form) => form.append(el('p', {}, 'All its mail is frozen: incoming mail is held or deferred (not bounced), outgoing mail is not sent. Nothing is deleted, and you can activate it again at any time.')),
      submit: () => setSuspended(entry, true),
    });
  });
  return el('div', {}, el('p', { className: 'hint' }, suspended
    ? 'You suspended this domain: its mail is frozen.'
    : 'Suspending freezes all mail of the domain without deleting anything.'), button);
}

async function historyTable(ctx, holder) {
  try {
    const body = await api.get(resourcePath('domains', ctx.entry.name, '/outbound/history'));
    if (ctx.generation !== state.generation) return;
    const items = Array.isArray(body?.items) ? body.items : [];
    if (!items.length) {
      holder.replaceChildren(el('p', { className: 'hint' }, 'No finished months yet: each month is recorded here when it ends.'));
      return;
    }
    holder.replaceChildren(el('div', { className: 'table-wrap' }, el('table', { className: 'records history' },
      el('caption', { className: 'visually-hidden' }, 'Sent mail per month'),
      el('thead', {}, el('tr', {}, ['Month', 'Sent', 'Data', 'Bounces', 'Complaints'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, items.map((m) => el('tr', {},
        el('th', { scope: 'row', 'data-label': 'Month' }, String(m.period)),
        el('td', { 'data-label': 'Sent' }, formatCount(m.sent)),
        el('td', { 'data-label': 'Data' }, formatBytes(m.bytes)),
        el('td', { 'data-label': 'Bounces' }, formatCount(m.bounces)),
        el('td', { 'data-label': 'Complaints' }, formatCount(m.complaints))))))));
  } catch (error) {
    if (error?.status !== 401) holder.replaceChildren(el('p', { className: 'message message-error' }, error.message));
  }
}

function renderSending(ctx) {
  const { entry, panel } = ctx;
  const d = entry.data;
  const out = d.outbound || {};
  const sending = sendingState(d, parentOf(entry)?.data);
  const item = (term, ...value) => el('div', {}, el('dt', {}, term), el('dd', {}, ...value));
  const history = el('div', {}, el('p', { className: 'hint' }, 'Loading history…'));
  const inherited = d.parent ? ` (from ${toUnicode(d.parent)})` : '';
  panel.append(
    el('h3', { id: 'panel-title' }, 'Sending & limits'),
    el('dl', { className: 'summary' },
      item('Sending now', badge(sending.text, sending.tone)),
      item('Tier', `${out.tier ?? '—'}${inherited}`),
      item('Enforcement', out.enforcement ?? '—'),
      item('Bounces this month', `${formatCount(out.bounces)} (${formatPercent(out.bounce_rate)})`),
      item('Complaints this month', `${formatCount(out.complaints)} (${formatPercent(out.complaint_rate)})`)),
    el('p', {}, `At a limit, ${enforcementWords(out.enforcement)}.`),
    el('div', { className: 'usages' },
      usageMeter('Sent today', out.sent_today, out.daily_limit, formatCount),
      usageMeter('Sent this month', out.sent_month, out.monthly_limit, formatCount),
      usageMeter('Transfer this month', d.transfer?.used_bytes, d.transfer?.monthly_limit_bytes, formatBytes)),
    el('p', {}, el('strong', {}, 'Retention: '), typeof d.retention_days === 'number'
      ? `messages older than ${formatCount(d.retention_days)} days are deleted from every mailbox of the domain each night.`
      : 'messages are kept until deleted (the platform set no retention period).'),
    limitForm(ctx),
    el('h4', {}, 'Monthly history'), history,
    el('h4', {}, 'Suspend or activate'), suspendControl(ctx));
  return historyTable(ctx, history);
}

