// What a domain's states mean, in words, and what to do about them. Pure functions over the
// API's domain resource (and, for a linked subdomain, its parent's).

import { toUnicode } from './idn.js';

const numberFormat = new Intl.NumberFormat('en');
const percentFormat = new Intl.NumberFormat('en', { style: 'percent', maximumFractionDigits: 1 });

export function formatCount(value) {
  return typeof value === 'number' ? numberFormat.format(value) : '—';
}

export function formatPercent(value) {
  return typeof value === 'number' ? percentFormat.format(value) : '—';
}

const SES_WORDS = {
  success: 'Verified', inherited: 'Verified through parent', pending: 'Pending',
  not_started: 'Not started', failed: 'Failed', temporary_failure: 'Temporary failure',
};

export function sesWords(status) {
  return SES_WORDS[status] || 'Unknown';
}

function dkimKey(status) {
  return String(status ?? '').toLowerCase().replace(/[\s_]/g, '');
}

/** The DKIM state in words: its own, or its parent's for a subdomain that inherits. */
export function dkimWords(domain, parent) {
  if (domain.ses?.status === 'inherited' || (domain.parent && !domain.ses?.dkim_status)) {
    const p = parent?.ses?.dkim_status;
    return { tone: dkimKey(p) === 'success' ? 'ok' : 'neutral', text: p ? `${dkimWordsOf(p)} (parent's)` : 'Signed as the parent' };
  }
  const status = domain.ses?.dkim_status;
  if (!status) return { tone: 'warn', text: 'Not set up yet' };
  const tone = { success: 'ok', failed: 'bad' }[dkimKey(status)] || 'warn';
  return { tone, text: dkimWordsOf(status) };
}

function dkimWordsOf(status) {
  return { success: 'Verified', pending: 'Pending', failed: 'Failed', notstarted: 'Not started',
    temporaryfailure: 'Temporary failure' }[dkimKey(status)] || String(status);
}

function verified(domain) {
  const s = domain.ses?.status;
  return s === 'success' || s === 'inherited';
}

/** Sending as it really is: a suspended domain sends nothing whatever outbound.status says. */
export function sendingState(domain, parent) {
  const out = domain.outbound || {};
  if (domain.status === 'suspended') return { tone: 'bad', text: 'Held (domain suspended)' };
  if (out.status === 'blocked') return { tone: 'bad', text: 'Blocked' };
  if (out.status === 'suspended') return { tone: 'bad', text: 'Suspended' };
  if (!verified(domain) && parent?.ses?.status !== 'success') return { tone: 'warn', text: 'Not verified yet' };
  const limit = limitReached(out);
  if (limit && out.enforcement === 'hard') return { tone: 'bad', text: `${limit} limit reached` };
  return { tone: 'ok', text: 'Sending' };
}

function limitReached(out) {
  if (typeof out.daily_limit === 'number' && out.sent_today >= out.daily_limit) return 'Daily';
  if (typeof out.monthly_limit === 'number' && out.sent_month >= out.monthly_limit) return 'Monthly';
  return null;
}

function share(used, limit) {
  return typeof limit === 'number' && limit > 0 && typeof used === 'number' ? used / limit : null;
}

/** The highest use of a limit, 0..1+ (for sorting), or 0 when unlimited. */
export function limitUse(domain) {
  const out = domain.outbound || {};
  return Math.max(share(out.sent_today, out.daily_limit) ?? 0, share(out.sent_month, out.monthly_limit) ?? 0);
}

const ENFORCEMENT_WORDS = {
  hard: 'further mail is deferred (senders retry) until the period ends',
  soft: 'mail still goes out, with a warning in the mail log',
  off: 'mail is only counted, never limited',
};

export function enforcementWords(enforcement) {
  return ENFORCEMENT_WORDS[enforcement] || 'unknown enforcement';
}

/**
 * Every state worth saying of a domain, most serious first:
 * [{key, tone: 'bad'|'warn'|'info'|'ok', title, text, action?}]; action is 'activate',
 * 'parent' or 'senders', for the view to turn into a control.
 */
export function explain(domain, parent, children = []) {
  const states = [
    ...suspension(domain),
    ...outboundStates(domain),
    ...sesStates(domain, parent),
    ...limitStates(domain),
    ...transferStates(domain),
    ...linkStates(domain, parent, children),
  ];
  const rank = { bad: 0, warn: 1, info: 2, ok: 3 };
  return states.sort((a, b) => rank[a.tone] - rank[b.tone]);
}

/** True when something about the domain is wrong or about to be. */
export function needsAttention(domain, parent) {
  return explain(domain, parent).some((s) => s.tone === 'bad' || s.tone === 'warn');
}

function suspension(domain) {
  if (domain.status !== 'suspended') return [];
  if (domain.suspended_by === 'master') {
    return [{
      key: 'suspended', tone: 'bad', title: 'Suspended by the platform',
      text: 'All mail of this domain is frozen: incoming mail is held or deferred (never bounced) and outgoing mail is not sent. Nothing is deleted. Only the platform can lift this suspension; contact its support.',
    }];
  }
  return [{
    key: 'suspended', tone: 'warn', title: 'Suspended by you',
    text: 'All mail of this domain is frozen: incoming mail is held or deferred (never bounced) and outgoing mail is not sent. Nothing is deleted. Activate the domain to let mail flow again.',
    action: 'activate',
  }];
}

function feedbackText(out) {
  return `This month: ${formatCount(out.sent_month)} sent, ${formatCount(out.bounces)} bounced `
    + `(${formatPercent(out.bounce_rate)}), ${formatCount(out.complaints)} complaints `
    + `(${formatPercent(out.complaint_rate)}).`;
}

function outboundStates(domain) {
  const out = domain.outbound || {};
  if (out.status === 'blocked') {
    return [{
      key: 'blocked', tone: 'bad', title: 'Sending blocked',
      text: `${feedbackText(out)} The platform blocks a domain's outgoing mail when its bounce rate reaches the platform's limit (or by hand), to protect every sender's reputation; outgoing mail is rejected, incoming mail is unaffected. Remove the addresses that bounced or complained from your lists, then ask the platform to unblock it: only the platform can.`,
    }];
  }
  if (out.status === 'suspended') {
    return [{
      key: 'outbound-suspended', tone: 'bad', title: 'Sending suspended by the platform',
      text: 'Outgoing mail is rejected; incoming mail is unaffected. Only the platform can lift this; contact its support.',
    }];
  }
  return [];
}

function sesStates(domain, parent) {
  const status = domain.ses?.status;
  const parentName = domain.parent ? toUnicode(domain.parent) : '';
  if (status === 'inherited' || (domain.parent && parent?.ses?.status === 'success' && status !== 'success')) {
    return [{
      key: 'inherited', tone: 'ok', title: `Verified through ${parentName}`,
      text: `This subdomain sends under its parent ${parentName}, which is verified with Amazon SES: it needs no SES or DKIM records of its own (they are ${parentName}'s, shown below), and it shares its parent's sending tier and limits but has its own counters. Publish only its MX and SPF records.`,
      action: 'parent',
    }];
  }
  if (domain.parent && status === 'not_started') {
    return [{
      key: 'waiting-parent', tone: 'warn', title: `Waiting for ${parentName}`,
      text: `This subdomain sends under ${parentName}, which is not verified yet (${sesWords(parent?.ses?.status).toLowerCase()}). Finish ${parentName}'s DNS records; this domain is verified as soon as its parent is.`,
      action: 'parent',
    }];
  }
  const dkim = dkimKey(domain.ses?.dkim_status);
  switch (status) {
    case 'success':
      if (dkim === 'failed' || dkim === 'pending' || dkim === 'temporaryfailure') {
        return [{
          key: 'dkim', tone: 'warn', title: `Verified, but DKIM ${dkimWordsOf(domain.ses.dkim_status).toLowerCase()}`,
          text: 'Amazon SES signs mail only once it finds the three DKIM CNAME records. Publish them exactly as shown; without DKIM, receivers are likelier to file mail as spam.',
        }];
      }
      return [{ key: 'verified', tone: 'ok', title: 'Verified with Amazon SES', text: 'The domain may send mail.' }];
    case 'pending':
      return [{
        key: 'pending', tone: 'warn', title: 'SES verification pending',
        text: 'Outgoing mail is refused until Amazon SES verifies the domain. Publish the SES TXT record and the three DKIM CNAME records below exactly as shown; SES looks for them for up to 72 hours and this page shows the result.',
      }];
    case 'failed':
      return [{
        key: 'failed', tone: 'bad', title: 'SES verification failed',
        text: 'Amazon SES did not find the TXT record within 72 hours, so outgoing mail is refused. Publish the records below, run the DNS check until every record has a tick, then ask the platform to restart verification.',
      }];
    case 'temporary_failure':
      return [{
        key: 'temporary', tone: 'warn', title: 'SES could not check the domain',
        text: 'A temporary error at Amazon SES; it tries again by itself. Check that the records below are published.',
      }];
    default:
      return [{
        key: 'not-started', tone: 'warn', title: 'SES verification not started',
        text: 'The platform has not started verification with Amazon SES yet; it retries by itself. The SES and DKIM records appear here as soon as SES issues them; the MX and SPF records can be published now.',
      }];
  }
}

function limitStates(domain) {
  const out = domain.outbound || {};
  const states = [];
  for (const [label, sent, limit] of [['daily', out.sent_today, out.daily_limit], ['monthly', out.sent_month, out.monthly_limit]]) {
    const used = share(sent, limit);
    if (used === null || used < 0.9) continue;
    const reached = used >= 1;
    states.push({
      key: `limit-${label}`, tone: reached && out.enforcement === 'hard' ? 'bad' : 'warn',
      title: reached ? `The ${label} limit is reached` : `Close to the ${label} limit`,
      text: `${formatCount(sent)} of ${formatCount(limit)} messages (${formatPercent(used)}). At the limit ${enforcementWords(out.enforcement)}.`,
    });
  }
  return states;
}

function transferStates(domain) {
  const t = domain.transfer || {};
  const used = share(t.used_bytes, t.monthly_limit_bytes);
  if (used === null || used < 0.9) return [];
  return [{
    key: 'transfer', tone: used >= 1 ? 'bad' : 'warn',
    title: used >= 1 ? 'Monthly transfer limit reached' : 'Close to the monthly transfer limit',
    text: `${formatPercent(used)} of this month's transfer is used; at the limit outgoing mail is limited as the sending limits are.`,
  }];
}

function linkStates(domain, parent, children) {
  if (!domain.wildcard) return [];
  const names = children.map((c) => toUnicode(c.name));
  const list = names.length ? ` Linked now: ${names.slice(0, 5).join(', ')}${names.length > 5 ? ` and ${names.length - 5} more` : ''}.` : '';
  return [{
    key: 'wildcard', tone: 'info', title: 'Wildcard parent',
    text: `Subdomains of ${toUnicode(domain.name)} added to your account are linked to it automatically: they send under its verification and share its tier and limits.${list}`,
  }];
}

/** The state of a domain's locked senders (SPEC §9), from its senders list. */
export function lockedSendersState(emails) {
  if (!emails.length) return [];
  const who = emails.length === 1 ? `${emails[0]} is` : `${emails.length} senders are`;
  return [{
    key: 'sender-locked', tone: 'bad',
    title: `${emails.length} sender${emails.length === 1 ? '' : 's'} locked`,
    text: `${who} locked: their mail is refused, other mailboxes are not affected. A login is locked when it is used from more addresses than the platform allows (usually a stolen password), or by hand. Change the password, then unlock it on the Senders tab.`,
    action: 'senders',
  }];
}
