// Mailboxes, aliases and senders (SPEC §9) of one domain. Everything goes through the API the
// key may use; nothing is offered that the API would refuse a partner.

import { api, fetchAll, resourcePath } from './api.js';
import { addressToUnicode } from './idn.js';
import { refreshUsage, state } from './state.js';
import { formatCount } from './states.js';
import { announce, badge, el, field, formatBytes, formatTime, formDialog, showMessage } from './ui.js';

const MIB = 1024 * 1024;

function userPath(email, suffix = '') {
  return resourcePath('users', email, suffix);
}

function aliasPath(source) {
  return resourcePath('aliases', source);
}

/** Senders are there only when the server has the §9 API (see /portal/config.json). */
function sendersEnabled() {
  return Boolean(state.config.features?.senders);
}

function quotaText(m) {
  const quota = typeof m.quota_bytes === 'number' ? formatBytes(m.quota_bytes) : 'unlimited';
  return typeof m.used_bytes === 'number' ? `${formatBytes(m.used_bytes)} of ${quota}` : quota;
}

function passwordInput(id) {
  return el('input', { id, type: 'password', autocomplete: 'new-password', minLength: 8, maxLength: 72, required: true, spellcheck: false });
}

function showPasswordToggle(input) {
  const id = `${input.id}-show`;
  const box = el('input', { type: 'checkbox', id });
  box.addEventListener('change', () => { input.type = box.checked ? 'text' : 'password'; });
  return el('div', { className: 'field-check' }, box, el('label', { for: id, className: 'check-label' }, 'Show password'));
}

function checkPassword(value) {
  const bytes = new TextEncoder().encode(value).length;
  if (bytes < 8 || bytes > 72) throw new Error('A password must be 8 to 72 bytes long.');
}

/** Quota text in MiB ('' = unlimited) -> bytes or null; throws on anything else. */
function quotaBytes(text) {
  const trimmed = text.trim();
  if (!trimmed) return null;
  const value = Number(trimmed);
  if (!Number.isFinite(value) || value < 0) throw new Error('Storage is a number of MiB, or empty for unlimited.');
  return Math.round(value * MIB);
}

function actionButton(label, accessible, handler, className = 'button button-small') {
  const button = el('button', { type: 'button', className, 'aria-label': accessible }, label);
  button.addEventListener('click', handler);
  return button;
}

// ---- mailboxes --------------------------------------------------------------------------------

function mailboxLimitText(count) {
  const max = state.usage?.mailboxes?.max_per_domain;
  if (typeof max !== 'number') return `${formatCount(count)} mailbox${count === 1 ? '' : 'es'}.`;
  const left = Math.max(0, max - count);
  return `${formatCount(count)} of ${formatCount(max)} mailboxes your plan allows on this domain (${formatCount(left)} left).`;
}

function mailboxRow(ctx, m, locked) {
  const address = addressToUnicode(m.email);
  const status = [m.active ? badge('Active', 'ok') : badge('Disabled: cannot log in', 'warn')];
  if (locked.has(m.email)) status.push(' ', badge('Sender locked', 'bad'));
  const actions = [
    actionButton('Password', `Change the password of ${address}`, () => changePassword(ctx, m)),
    actionButton('Storage', `Change the storage quota of ${address}`, () => changeQuota(ctx, m)),
    actionButton(m.active ? 'Disable' : 'Enable', `${m.active ? 'Disable' : 'Enable'} ${address}`, () => setActive(ctx, m, !m.active)),
  ];
  if (sendersEnabled()) actions.push(actionButton('Sending', `Sending limits and lock of ${address}`, () => senderDialog(ctx, m.email)));
  actions.push(actionButton('Delete', `Delete ${address}`, () => deleteMailbox(ctx, m), 'button button-small button-danger'));
  return el('tr', { 'data-email': m.email },
    el('th', { scope: 'row', 'data-label': 'Address' }, el('bdi', {}, address)),
    el('td', { 'data-label': 'Name' }, m.name || '—'),
    el('td', { 'data-label': 'Storage' }, quotaText(m)),
    el('td', { 'data-label': 'Status' }, status),
    el('td', { 'data-label': 'Actions' }, el('div', { className: 'actions' }, actions)));
}

async function changePassword(ctx, m) {
  const address = addressToUnicode(m.email);
  const done = await formDialog({
    title: `New password for ${address}`, submitLabel: 'Change password',
    build: (form) => {
      const input = passwordInput('dialog-password');
      const [wrap] = field('New password', input, '8 to 72 bytes. The mailbox user needs it for IMAP and SMTP.');
      form.append(wrap, showPasswordToggle(input));
    },
    submit: async (form) => {
      const value = form.querySelector('#dialog-password').value;
      checkPassword(value);
      await api.put(userPath(m.email), { password: value });
    },
  });
  if (done) announce(`Password of ${address} changed.`);
}

async function changeQuota(ctx, m) {
  const address = addressToUnicode(m.email);
  const done = await formDialog({
    title: `Storage of ${address}`, submitLabel: 'Save',
    build: (form) => {
      const input = el('input', { id: 'dialog-quota', type: 'number', min: 0, step: 'any', inputMode: 'decimal', value: typeof m.quota_bytes === 'number' ? String(Math.round((m.quota_bytes / MIB) * 10) / 10) : '' });
      form.append(field('Quota (MiB)', input, `Empty means unlimited. In use now: ${typeof m.used_bytes === 'number' ? formatBytes(m.used_bytes) : 'unknown'}.`)[0]);
    },
    submit: async (form) => {
      const bytes = quotaBytes(form.querySelector('#dialog-quota').value);
      await api.put(userPath(m.email, '/quota'), { quota_bytes: bytes });
    },
  });
  if (done) {
    announce(`Storage of ${address} saved.`);
    await renderMailboxes(ctx, true);
  }
}

async function setActive(ctx, m, active) {
  try {
    await api.put(userPath(m.email), { active });
    announce(`${addressToUnicode(m.email)} ${active ? 'enabled' : 'disabled'}.`);
  } catch (error) {
    announce(error.message);
  }
  await renderMailboxes(ctx, true);
}

async function deleteMailbox(ctx, m) {
  const address = addressToUnicode(m.email);
  const done = await formDialog({
    title: `Delete ${address}?`, submitLabel: 'Delete mailbox', danger: true,
    build: (form) => form.append(el('p', {}, 'The mailbox and its login go at once; mail that arrives for it afterwards bounces unless an alias or catch-all takes it. Stored messages are not removed from the mail server by this.')),
    submit: () => api.delete(userPath(m.email)),
  });
  if (done) {
    announce(`${address} deleted.`);
    await refreshUsage();
    await renderMailboxes(ctx, true);
  }
}

function createMailboxForm(ctx) {
  const local = el('input', { id: 'new-local', type: 'text', autocomplete: 'off', spellcheck: false, autocapitalize: 'off', required: true });
  const password = passwordInput('new-password');
  const name = el('input', { id: 'new-name', type: 'text', autocomplete: 'off' });
  const quota = el('input', { id: 'new-quota', type: 'number', min: 0, step: 'any', inputMode: 'decimal' });
  const message = el('p', { className: 'message message-error', role: 'alert', hidden: true });
  const domainText = `@${ctx.entry.uname}`;
  const form = el('form', { className: 'stack-form', noValidate: true, 'aria-labelledby': 'new-mailbox-title' },
    el('h4', { id: 'new-mailbox-title' }, 'Add a mailbox'),
    el('div', { className: 'field' }, el('label', { for: 'new-local' }, 'Address'),
      el('div', { className: 'address-input' }, local, el('span', { className: 'address-domain', 'aria-hidden': 'true' }, el('bdi', {}, domainText))),
      el('p', { className: 'field-hint', id: 'new-local-hint' }, `The part before ${domainText}.`)),
    field('Password', password, '8 to 72 bytes.')[0], showPasswordToggle(password),
    field('Name (optional)', name)[0],
    field('Storage quota in MiB (optional)', quota, 'Empty means unlimited.')[0],
    el('button', { type: 'submit', className: 'button' }, 'Create mailbox'), message);
  local.setAttribute('aria-describedby', 'new-local-hint');
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const button = form.querySelector('button[type=submit]');
    showMessage(message, '');
    try {
      const part = local.value.trim();
      if (!part || part.includes('@')) throw Object.assign(new Error('Enter the part of the address before the @.'), { focus: local });
      try {
        checkPassword(password.value);
      } catch (error) {
        error.focus = password;
        throw error;
      }
      const body = { email: `${part}@${ctx.entry.name}`, password: password.value };
      if (name.value.trim()) body.name = name.value.trim();
      const bytes = quotaBytes(quota.value);
      if (bytes !== null) body.quota_bytes = bytes;
      button.disabled = true;
      const created = await api.post('users/', body);
      form.reset();
      announce(`Mailbox ${addressToUnicode(created.email)} created.`);
      await refreshUsage();
      await renderMailboxes(ctx, true);
      ctx.panel.querySelector('#new-local')?.focus();
    } catch (error) {
      showMessage(message, error.code === 'quota_exceeded' ? `${error.message}: your plan allows no more mailboxes on this domain.` : error.message);
      (error.focus || local).focus();
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

async function lockedSenders(ctx) {
  if (!sendersEnabled()) return new Set();
  try {
    const items = await fetchAll(resourcePath('domains', ctx.entry.name, '/senders'));
    return new Set(items.filter((s) => s.status === 'locked').map((s) => s.email));
  } catch {
    return new Set();
  }
}

export async function renderMailboxes(ctx, again = false) {
  const { panel } = ctx;
  if (!again) {
    panel.append(el('h3', { id: 'panel-title' }, 'Mailboxes'),
      el('p', { className: 'hint', role: 'status', id: 'mailbox-status' }, 'Loading mailboxes…'),
      el('div', { id: 'mailbox-table' }), createMailboxForm(ctx));
  }
  const status = panel.querySelector('#mailbox-status');
  const holder = panel.querySelector('#mailbox-table');
  if (!status || !holder) return;
  try {
    const [items, locked] = await Promise.all([
      fetchAll(`users/?domain=${encodeURIComponent(ctx.entry.name)}`), lockedSenders(ctx)]);
    if (!holder.isConnected) return;
    status.textContent = mailboxLimitText(items.length);
    holder.replaceChildren(items.length ? el('div', { className: 'table-wrap' }, el('table', { className: 'records mailboxes' },
      el('caption', { className: 'visually-hidden' }, `Mailboxes of ${ctx.entry.uname}`),
      el('thead', {}, el('tr', {}, ['Address', 'Name', 'Storage', 'Status', 'Actions'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, items.map((m) => mailboxRow(ctx, m, locked)))))
      : el('p', { className: 'hint' }, 'No mailboxes yet.'));
  } catch (error) {
    if (error?.status !== 401 && holder.isConnected) {
      status.textContent = '';
      holder.replaceChildren(el('p', { className: 'message message-error', role: 'alert' }, error.message));
    }
  }
}

// ---- aliases ----------------------------------------------------------------------------------

function aliasRow(ctx, a) {
  const source = a.catch_all ? `Any other address @${ctx.entry.uname}` : addressToUnicode(a.source);
  return el('tr', { 'data-source': a.source },
    el('th', { scope: 'row', 'data-label': 'Address' }, el('bdi', {}, source), a.catch_all ? [' ', badge('Catch-all', 'info')] : null),
    el('td', { 'data-label': 'Delivers to' }, el('ul', { className: 'plain-list' }, (a.destinations || []).map((d) => el('li', {}, el('bdi', {}, addressToUnicode(d)))))),
    el('td', { 'data-label': 'Actions' }, actionButton('Delete', `Delete the alias ${source}`, async () => {
      const done = await formDialog({
        title: `Delete the alias ${source}?`, submitLabel: 'Delete alias', danger: true,
        build: (form) => form.append(el('p', {}, 'Mail to this address is no longer forwarded.')),
        submit: () => api.delete(aliasPath(a.source)),
      });
      if (done) {
        announce(`Alias ${source} deleted.`);
        await refreshUsage();
        await renderAliases(ctx, true);
      }
    }, 'button button-small button-danger')));
}

function createAliasForm(ctx) {
  const local = el('input', { id: 'alias-local', type: 'text', autocomplete: 'off', spellcheck: false, autocapitalize: 'off' });
  const catchAll = el('input', { id: 'alias-catchall', type: 'checkbox' });
  const destinations = el('textarea', { id: 'alias-destinations', rows: 3, spellcheck: false, autocapitalize: 'off' });
  const message = el('p', { className: 'message message-error', role: 'alert', hidden: true });
  const domainText = `@${ctx.entry.uname}`;
  catchAll.addEventListener('change', () => { local.disabled = catchAll.checked; });
  const max = state.usage?.aliases?.max_per_mailbox;
  const form = el('form', { className: 'stack-form', noValidate: true, 'aria-labelledby': 'new-alias-title' },
    el('h4', { id: 'new-alias-title' }, 'Add an alias'),
    el('div', { className: 'field' }, el('label', { for: 'alias-local' }, 'Address'),
      el('div', { className: 'address-input' }, local, el('span', { className: 'address-domain', 'aria-hidden': 'true' }, el('bdi', {}, domainText)))),
    el('div', { className: 'field-check' }, catchAll, el('label', { for: 'alias-catchall', className: 'check-label' }, `Catch-all: every address ${domainText} without a mailbox or alias`)),
    field('Deliver to', destinations, `One address per line (or separated by commas).${typeof max === 'number' ? ` Your plan allows ${formatCount(max)} aliases per mailbox.` : ''}`)[0],
    el('button', { type: 'submit', className: 'button' }, 'Create alias'), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const button = form.querySelector('button[type=submit]');
    showMessage(message, '');
    const part = local.value.trim();
    const targets = destinations.value.split(/[\s,;]+/).map((t) => t.trim()).filter(Boolean);
    if (!catchAll.checked && (!part || part.includes('@'))) {
      showMessage(message, 'Enter the part of the address before the @, or choose catch-all.');
      local.focus();
      return;
    }
    if (!targets.length) {
      showMessage(message, 'Enter at least one address to deliver to.');
      destinations.focus();
      return;
    }
    button.disabled = true;
    try {
      const source = catchAll.checked ? `@${ctx.entry.name}` : `${part}@${ctx.entry.name}`;
      await api.post('aliases/', { source, destinations: targets });
      form.reset();
      local.disabled = false;
      announce('Alias created.');
      await refreshUsage();
      await renderAliases(ctx, true);
    } catch (error) {
      showMessage(message, error.message);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export async function renderAliases(ctx, again = false) {
  const { panel } = ctx;
  if (!again) {
    panel.append(el('h3', { id: 'panel-title' }, 'Aliases'),
      el('p', { className: 'hint' }, 'An alias forwards mail for an address to one or more others; a catch-all takes mail for every address of the domain that has no mailbox or alias.'),
      el('p', { className: 'hint', role: 'status', id: 'alias-status' }, 'Loading aliases…'),
      el('div', { id: 'alias-table' }), createAliasForm(ctx));
  }
  const status = panel.querySelector('#alias-status');
  const holder = panel.querySelector('#alias-table');
  if (!status || !holder) return;
  try {
    const items = await fetchAll(`aliases/?domain=${encodeURIComponent(ctx.entry.name)}`);
    if (!holder.isConnected) return;
    status.textContent = `${formatCount(items.length)} alias${items.length === 1 ? '' : 'es'}.`;
    holder.replaceChildren(items.length ? el('div', { className: 'table-wrap' }, el('table', { className: 'records aliases' },
      el('caption', { className: 'visually-hidden' }, `Aliases of ${ctx.entry.uname}`),
      el('thead', {}, el('tr', {}, ['Address', 'Delivers to', 'Actions'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, items.map((a) => aliasRow(ctx, a))))) : el('p', { className: 'hint' }, 'No aliases yet.'));
  } catch (error) {
    if (error?.status !== 401 && holder.isConnected) {
      status.textContent = '';
      holder.replaceChildren(el('p', { className: 'message message-error', role: 'alert' }, error.message));
    }
  }
}

// ---- senders (SPEC §9) --------------------------------------------------------------------

const LOCK_REASONS = {
  distinct_ips: 'it logged in from more addresses than the platform allows within its time window, which usually means the password was stolen',
  manual: 'it was locked by hand',
};

/** ' of N' after a count when a limit applies; nothing when the sender is unlimited. */
function ofLimit(value) {
  return typeof value === 'number' ? ` of ${formatCount(value)}` : '';
}

/** The sender settings of one mailbox: use, limits, lock; save or unlock (with a new password). */
export async function senderDialog(ctx, email) {
  const address = addressToUnicode(email);
  let current;
  try {
    current = await api.get(userPath(email, '/outbound'));
  } catch (error) {
    announce(error.message);
    return;
  }
  const locked = current.status === 'locked';
  const done = await formDialog({
    title: `Sending of ${address}`, submitLabel: locked ? 'Save and unlock' : 'Save',
    build: (form) => {
      const number = (id, value) => el('input', { id, type: 'number', min: 0, step: 1, inputMode: 'numeric', value: typeof value === 'number' ? String(value) : '' });
      form.append(
        el('p', {}, `Sent this hour: ${formatCount(current.sent_hour)}${ofLimit(current.hourly_limit)}; today: ${formatCount(current.sent_today)}${ofLimit(current.daily_limit)}.`),
        locked ? el('p', { className: 'message message-error' }, `Locked ${formatTime(current.locked_at)}: ${LOCK_REASONS[current.locked_reason] || current.locked_reason || 'no reason given'}. Its mail is refused until it is unlocked. Set a new password below before unlocking if it may be stolen.`) : null,
        field('Hourly limit (messages)', number('sender-hourly', current.hourly_limit), 'Empty: the platform default.')[0],
        field('Daily limit (messages)', number('sender-daily', current.daily_limit), 'Empty: the platform default.')[0]);
      if (locked) {
        const input = passwordInput('sender-password');
        input.required = false;
        form.append(field('New password (recommended)', input, 'Leave empty to keep the current one.')[0]);
      } else {
        const box = el('input', { type: 'checkbox', id: 'sender-lock' });
        form.append(el('div', { className: 'field-check' }, box, el('label', { for: 'sender-lock', className: 'check-label' }, 'Lock this sender now (refuse all its mail)')));
      }
    },
    submit: async (form) => {
      const body = {};
      for (const [id, name] of [['sender-hourly', 'hourly_limit'], ['sender-daily', 'daily_limit']]) {
        const text = form.querySelector(`#${id}`).value.trim();
        const value = text === '' ? null : Number(text);
        if (value !== null && (!Number.isInteger(value) || value < 0)) throw new Error('Limits are whole numbers of messages, or empty.');
        if (value !== current[name]) body[name] = value;
      }
      const password = form.querySelector('#sender-password')?.value ?? '';
      if (password) {
        checkPassword(password);
        await api.put(userPath(email), { password });
      }
      if (locked) body.status = 'active';
      else if (form.querySelector('#sender-lock')?.checked) body.status = 'locked';
      if (Object.keys(body).length) await api.put(userPath(email, '/outbound'), body);
    },
  });
  if (done) {
    announce(`Sending of ${address} saved.`);
    if (ctx.redraw) ctx.redraw();
  }
}

async function setSenderStatus(ctx, email, status) {
  try {
    await api.put(userPath(email, '/outbound'), { status });
    announce(`${addressToUnicode(email)} ${status === 'locked' ? 'locked' : 'unlocked'}.`);
  } catch (error) {
    announce(error.message);
  }
  ctx.redraw();
}

function senderRow(ctx, s, details) {
  const address = addressToUnicode(s.email);
  const detail = details.get(s.email);
  const locked = s.status === 'locked';
  return el('tr', { 'data-email': s.email },
    el('th', { scope: 'row', 'data-label': 'Sender' }, el('bdi', {}, address)),
    el('td', { 'data-label': 'This hour' }, `${formatCount(s.sent_hour)}${ofLimit(detail && detail.hourly_limit)}`),
    el('td', { 'data-label': 'Today' }, `${formatCount(s.sent_today)}${ofLimit(detail && detail.daily_limit)}`),
    el('td', { 'data-label': 'Status' }, locked ? badge('Locked', 'bad') : badge('Active', 'ok'),
      locked && detail ? el('p', { className: 'verdict-text' }, `Since ${formatTime(detail.locked_at)}: ${LOCK_REASONS[detail.locked_reason] || detail.locked_reason}.`) : null),
    el('td', { 'data-label': 'Actions' }, el('div', { className: 'actions' },
      actionButton(locked ? 'Unlock…' : 'Limits…', `${locked ? 'Unlock' : 'Limits of'} ${address}`, () => senderDialog(ctx, s.email)),
      locked ? null : actionButton('Lock', `Lock ${address}`, () => setSenderStatus(ctx, s.email, 'locked'), 'button button-small button-danger'))));
}

export async function renderSenders(ctx) {
  const { panel, entry } = ctx;
  const status = el('p', { className: 'hint', role: 'status' }, 'Loading senders…');
  const holder = el('div', {});
  panel.append(el('h3', { id: 'panel-title' }, 'Senders'),
    el('p', { className: 'hint' }, 'A sender is a mailbox used as the SMTP login. Each has its own hourly and daily limits, and a login used from too many addresses is locked: the usual sign of a stolen password. Listed: the mailboxes that sent today or are locked, most sent first.'),
    status, holder);
  try {
    const items = await fetchAll(resourcePath('domains', entry.name, '/senders'));
    const locked = items.filter((s) => s.status === 'locked');
    const details = new Map(await Promise.all(locked.map(async (s) => [s.email, await api.get(userPath(s.email, '/outbound')).catch(() => null)])));
    if (!holder.isConnected) return;
    status.textContent = items.length
      ? `${formatCount(items.length)} sender${items.length === 1 ? '' : 's'}; ${formatCount(locked.length)} locked.`
      : 'No mailbox of this domain has sent today, and none is locked. Open a mailbox\'s "Sending" settings on the Mailboxes tab to lock it or change its limits.';
    if (locked.length) {
      holder.append(el('p', { className: 'message message-error' }, `${formatCount(locked.length)} sender${locked.length === 1 ? ' is' : 's are'} locked: their mail is refused. Change the password, then unlock.`));
    }
    if (items.length) {
      holder.append(el('div', { className: 'table-wrap' }, el('table', { className: 'records senders' },
        el('caption', { className: 'visually-hidden' }, `Senders of ${entry.uname}`),
        el('thead', {}, el('tr', {}, ['Sender', 'This hour', 'Today', 'Status', 'Actions'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, items.map((s) => senderRow(ctx, s, details))))));
    }
  } catch (error) {
    if (error?.status !== 401 && holder.isConnected) {
      status.textContent = '';
      holder.replaceChildren(el('p', { className: 'message message-error', role: 'alert' }, error.message));
    }
  }
}

