// What the portal knows in this tab: the partner's domains (fetched once, kept in memory),
// derived once per domain so filtering and sorting 1,000 of them costs nothing per key.

import { api, fetchAll, fetchConfig, resourcePath } from './api.js';
import { searchText, toUnicode } from './idn.js';
import { explain, limitUse, needsAttention, sendingState } from './states.js';

export const state = {
  config: { features: {} },
  entries: null, // [entry] by name, or null until loaded
  byName: new Map(), // A-label name -> entry
  usage: null, // the partner's quota use, or null when not known
  loading: null, // the promise of a running load
  generation: 0, // bumped on every navigation: late answers of an old view are dropped
  listHash: '#/domains',
  version: 0, // bumped whenever entries change, so views can drop derived caches
};

/** One domain as the list needs it: the API resource plus what is derived from it. */
function makeEntry(domain) {
  const name = String(domain.name ?? '');
  const uname = toUnicode(name);
  return {
    name,
    uname,
    data: domain,
    search: `${searchText(uname)}\n${name.toLowerCase()}`,
    sortName: uname.normalize('NFC').toLowerCase(),
  };
}

/** Derive what depends on other domains (parents) once all entries are known. */
function deriveAll() {
  for (const entry of state.entries) {
    const parent = entry.data.parent ? state.byName.get(entry.data.parent)?.data : null;
    entry.attention = needsAttention(entry.data, parent);
    entry.severity = severity(entry.data, parent);
    entry.sending = sendingState(entry.data, parent);
    entry.use = limitUse(entry.data);
    entry.children = [];
  }
  for (const entry of state.entries) {
    const parent = entry.data.parent ? state.byName.get(entry.data.parent) : null;
    if (parent) parent.children.push(entry);
  }
  state.version += 1;
}

function severity(domain, parent) {
  const states = explain(domain, parent);
  if (states.some((s) => s.tone === 'bad')) return 2;
  if (states.some((s) => s.tone === 'warn')) return 1;
  return 0;
}

function setEntries(domains) {
  state.entries = domains.map(makeEntry);
  state.byName = new Map(state.entries.map((e) => [e.name, e]));
  deriveAll();
}

/** Load every domain (once; again with reload). */
export function loadDomains(reload = false, onProgress = () => {}) {
  if (state.entries && !reload) return Promise.resolve(state.entries);
  if (state.loading && !reload) return state.loading;
  const loading = (async () => {
    const [domains] = await Promise.all([fetchAll('domains/', onProgress), loadUsage()]);
    if (state.loading === loading) setEntries(domains);
    return state.entries;
  })();
  state.loading = loading;
  const done = () => { if (state.loading === loading) state.loading = null; };
  loading.then(done, done); // handled here; the caller handles the failure itself
  return loading;
}

/** The partner's use against its quotas; null for a master token or on any doubt. */
async function loadUsage() {
  try {
    const keys = await api.get('api-keys/?limit=100');
    const items = Array.isArray(keys?.items) ? keys.items : [];
    const partners = new Set(items.map((k) => k.partner_id));
    if (items.length === 0 || partners.size !== 1) {
      state.usage = null;
      return;
    }
    const body = await api.get(`${resourcePath('api-keys', items[0].id, '/usage')}?limit=1`);
    state.usage = body?.usage ?? null;
  } catch (error) {
    if (error?.status === 401) throw error;
    state.usage = null;
  }
}

/** Read the partner's quota use again (after creating or deleting something). */
export async function refreshUsage() {
  await loadUsage();
}

/** Replace one domain with a fresher copy from the API (after a change or a detail load). */
export function updateDomain(domain) {
  const entry = makeEntry(domain);
  const at = state.entries.findIndex((e) => e.name === entry.name);
  if (at < 0) state.entries.push(entry);
  else state.entries[at] = entry;
  state.byName.set(entry.name, entry);
  deriveAll();
  return entry;
}

/** The entry for a name as typed in a URL: A-label, U-label, any case. */
export function findEntry(name) {
  const wanted = String(name ?? '').normalize('NFC').toLowerCase().replace(/\.$/, '');
  return state.byName.get(wanted)
    || state.entries?.find((e) => e.sortName === wanted) || null;
}

export async function loadConfig() {
  state.config = await fetchConfig();
  if (!state.config || typeof state.config.features !== 'object') state.config = { features: {} };
}

/** Forget everything the key showed. */
export function resetState() {
  state.entries = null;
  state.byName = new Map();
  state.usage = null;
  state.loading = null;
  state.generation += 1;
  state.listHash = '#/domains';
  state.version += 1;
}
