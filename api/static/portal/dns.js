// DNS records for people: which check says what about which record, advice in words, and a
// zone-file snippet. Pure functions over the API's `records` and dns-check answers.

export const PURPOSE_LABELS = {
  ses: 'SES verification',
  dkim: 'DKIM signing',
  mx: 'Incoming mail (MX)',
  spf: 'SPF',
  dmarc: 'DMARC',
};

const TTL = 3600;

function norm(name) {
  return String(name ?? '').toLowerCase().replace(/\.$/, '');
}

/** A name relative to a zone, as zone files and most DNS providers' forms want it. */
export function relativeName(name, zone) {
  const n = norm(name);
  const z = norm(zone);
  if (n === z) return '@';
  if (z && n.endsWith(`.${z}`)) return n.slice(0, -(z.length + 1));
  return `${n}.`;
}

/** A TXT value in presentation format: quoted strings of at most 255 bytes (RFC 1035 §3.3.14). */
export function quoteTxt(value) {
  const bytes = new TextEncoder().encode(String(value ?? ''));
  const chunks = [];
  for (let start = 0; start < bytes.length || chunks.length === 0; start += 255) {
    let text = '';
    for (const byte of bytes.slice(start, start + 255)) {
      const char = String.fromCharCode(byte);
      if (char === '"' || char === '\\') text += `\\${char}`;
      else if (byte < 0x20 || byte > 0x7e) text += `\\${String(byte).padStart(3, '0')}`;
      else text += char;
    }
    chunks.push(`"${text}"`);
    if (bytes.length === 0) break;
  }
  return chunks.join(' ');
}

/** The record data of one record in zone-file form (absolute host names end with a dot). */
export function rdata(record) {
  const value = String(record.value ?? '');
  if (record.type === 'TXT') return quoteTxt(value);
  if (record.type === 'CNAME') return `${norm(value)}.`;
  if (record.type === 'MX') {
    const [preference, host] = value.split(/\s+/, 2);
    return `${preference} ${norm(host)}.`;
  }
  return value;
}

/** A zone-file snippet of the records, names relative to `zone` ($ORIGIN says which). */
export function zoneSnippet(records, zone) {
  const origin = `${norm(zone)}.`;
  const rows = records.map((r) => [relativeName(r.name, zone), String(TTL), 'IN', r.type, rdata(r)]);
  const width = Math.max(1, ...rows.map((row) => row[0].length));
  const lines = rows.map(([name, ...rest]) => `${name.padEnd(width)} ${rest.join(' ')}`);
  return [`$ORIGIN ${origin}`, ...lines].join('\n') + '\n';
}

// ---- SPF: one record per domain (RFC 7208 §3.2), with the platform's include in it ----------

function spfTerms(record) {
  return String(record).trim().split(/\s+/).slice(1);
}

function isAll(term) {
  return /^[+?~-]?all$/i.test(term);
}

/** The record to publish instead of `found` SPF records so there is one, with `include`. */
export function spfFix(found, expected) {
  const include = spfTerms(expected).find((t) => /^\+?include:/i.test(t)) || '';
  if (!Array.isArray(found) || found.length === 0) return expected;
  const terms = [];
  const seen = new Set();
  let allTerm = null;
  // DNS answers come in any order: merge in a fixed one, so the advice is the same each time
  for (const record of [...found].sort()) {
    for (const term of spfTerms(record)) {
      if (isAll(term)) {
        // the most lenient of the records' endings: merging must not start rejecting mail
        if (allTerm === null || term.startsWith('~') || term.startsWith('?')) allTerm = term;
        continue;
      }
      if (/^redirect=/i.test(term) && found.length > 1) continue; // ignored once an all exists
      const key = term.toLowerCase().replace(/^\+/, '');
      if (!seen.has(key)) {
        seen.add(key);
        terms.push(term);
      }
    }
  }
  if (include && !seen.has(include.toLowerCase().replace(/^\+/, ''))) terms.push(include);
  if (allTerm === null && !terms.some((t) => /^redirect=/i.test(t))) allTerm = '~all';
  return ['v=spf1', ...terms, ...(allTerm ? [allTerm] : [])].join(' ');
}

// ---- which check is about which record ----------------------------------------------------

const CHECK_TYPE = { ses: 'TXT', dkim: 'CNAME', mx: 'MX', spf: 'SPF', dmarc: 'DMARC' };

/** The check (of dns-check's checks and advisory lists) about one record, or null. */
export function checkFor(record, result) {
  if (!result) return null;
  const all = [...(result.checks || []), ...(result.advisory || [])];
  const type = CHECK_TYPE[record.purpose];
  return all.find((c) => c.type === type && norm(c.name) === norm(record.name)) || null;
}

function foundList(check) {
  return Array.isArray(check.found) ? check.found.map(String) : [];
}

function lookupFailed(check) {
  return typeof check.found === 'string';
}

function lookupText(check) {
  return check.found === 'timeout'
    ? 'The DNS lookup timed out. Try the check again in a minute.'
    : `The DNS lookup failed (${check.found}). Try the check again in a minute.`;
}

/**
 * The verdict on one record: {ok, text, fix?}. `fix` is a record value to publish instead
 * (an SPF record merged or completed). Null when there is no check for it.
 */
export function verdict(record, check) {
  if (!check) return null;
  if (lookupFailed(check) && record.purpose !== 'ses' && record.purpose !== 'dkim') {
    return { ok: false, text: lookupText(check) };
  }
  switch (record.purpose) {
    case 'mx': return mxVerdict(record, check);
    case 'spf': return spfVerdict(check);
    case 'dmarc': return dmarcVerdict(check);
    default: return tokenVerdict(record, check);
  }
}

function mxVerdict(record, check) {
  const host = norm(String(record.value ?? '').split(/\s+/)[1]);
  const hosts = foundList(check).map(norm);
  if (hosts.includes(host)) return { ok: true, text: 'Published.' };
  if (hosts.length === 0) return { ok: false, text: 'No MX record found: mail to this domain cannot be delivered.' };
  return { ok: false, text: `Missing. The domain's MX records point at ${hosts.join(', ')} instead.` };
}

function spfVerdict(check) {
  const found = foundList(check);
  if (check.ok) return { ok: true, text: 'Published: one SPF record, with the include.' };
  const fix = spfFix(found, String(check.expected ?? ''));
  if (found.length > 1) {
    return {
      ok: false, fix,
      text: `${found.length} SPF records found. A domain may have only one (RFC 7208): with more, receivers treat SPF as an error. Replace them all with the one merged record shown as the value.`,
    };
  }
  if (found.length === 1) {
    return { ok: false, fix, text: 'Your SPF record lacks the platform\'s include. Change that record to the value shown; do not add a second one.' };
  }
  return { ok: false, text: 'No SPF record found. Publish the record shown.' };
}

function dmarcVerdict(check) {
  const found = foundList(check);
  if (check.ok) return { ok: true, text: `Published: ${found[0]}` };
  if (found.length > 1) return { ok: false, text: `${found.length} DMARC records found; receivers ignore them all. Keep one.` };
  if (lookupFailed(check)) return { ok: false, text: lookupText(check) };
  return { ok: false, text: 'No DMARC record. Optional, but receivers trust mail more with one.' };
}

function tokenVerdict(record, check) {
  if (check.ok) return { ok: true, text: 'Published.' };
  if (lookupFailed(check) && !String(check.found).includes('not started')) {
    return { ok: false, text: lookupText(check) };
  }
  const found = foundList(check);
  if (found.length === 0) return { ok: false, text: 'Not found in DNS yet. Publish it exactly as shown (changes can take an hour to appear).' };
  return { ok: false, text: `DNS has ${found.join(', ')} instead of the value shown.` };
}

/** Checks no record stands for (e.g. MX when the platform names no MX hosts). */
export function unmatchedChecks(records, result) {
  if (!result) return [];
  const used = new Set(records.map((r) => checkFor(r, result)).filter(Boolean));
  return (result.checks || []).filter((c) => !used.has(c) && c.name);
}
