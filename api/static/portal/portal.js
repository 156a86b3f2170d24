// Partner portal: a partner signs in with an API key and manages its domains.
//
// Hash routes, so links, new tabs and Back work:
//   #/domains?q=&sort=&attention=1&page=N   the list (filter, sort, page kept in the URL)
//   #/domain/NAME[/TAB]                      one domain; TAB: dns, mailboxes, aliases,
//                                            senders, sending

import { broadcastSignOut, cancelHandoff, forgetKey, grantHandoff, onSignedOutElsewhere,
  onUnauthorized, readKey, requestHandoff, storeKey } from './api.js';
import { forgetDomainView, renderDomain, TABS } from './domain.js';
import { forgetRows, renderList } from './list.js';
import { loadConfig, loadDomains, resetState, state } from './state.js';
import { $, announce, el, showMessage } from './ui.js';

const TITLE = 'Partner portal';

// ---- routes -------------------------------------------------------------------------------

function decode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

/** The route the hash names: {view: 'list', params} or {view: 'domain', name, tab}. */
export function parseHash(hash = location.hash) {
  const legacy = /^#domain=(.+)$/.exec(hash); // links from the first portal
  if (legacy) return { view: 'domain', name: decode(legacy[1]), tab: 'dns' };
  const detail = /^#\/domain\/([^/?]+)(?:\/([a-z]+))?\/?$/.exec(hash);
  if (detail) {
    const tab = TABS.some((t) => t.id === detail[2]) ? detail[2] : 'dns';
    return { view: 'domain', name: decode(detail[1]), tab };
  }
  const query = hash.startsWith('#/domains?') ? hash.slice('#/domains?'.length) : '';
  return { view: 'list', params: new URLSearchParams(query) };
}

// ---- scroll kept per history entry, so Back returns to where the reader was -----------------

let scrollTimer = null;

function saveScroll() {
  clearTimeout(scrollTimer);
  scrollTimer = null;
  const current = history.state && typeof history.state === 'object' ? history.state : {};
  if (current.scroll === window.scrollY) return;
  history.replaceState({ ...current, scroll: window.scrollY }, '');
}

function onScroll() {
  if (scrollTimer === null) scrollTimer = setTimeout(saveScroll, 250);
}


// ---- sign-in and sign-out -----------------------------------------------------------------

function showSignedIn(signedIn) {
  $('signin-view').hidden = signedIn;
  $('view').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
}

function showSignIn(message) {
  showSignedIn(false);
  document.title = `Sign in – ${TITLE}`;
  showMessage($('signin-message'), message);
  $('api-key').focus();
}

/** Forget the key and everything shown with it: no domain name stays in the page. */
function signOut(message) {
  forgetKey();
  cancelHandoff();
  resetState();
  forgetRows();
  forgetDomainView();
  for (const dialog of document.querySelectorAll('dialog')) dialog.remove();
  $('view').replaceChildren();
  $('announcer').textContent = '';
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);
  showSignIn(message);
}

async function onSignIn(event) {
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
  resetState();
  route();
}

// ---- the router ---------------------------------------------------------------------------

function loadingView(text) {
  const status = el('p', { className: 'hint', role: 'status' }, text);
  $('view').replaceChildren(el('section', { className: 'loading' }, status));
  return status;
}

function failureView(error) {
  const retry = el('button', { type: 'button', className: 'button' }, 'Try again');
  retry.addEventListener('click', () => route());
  const heading = el('h2', { tabIndex: -1 }, 'The portal could not load your domains');
  $('view').replaceChildren(el('section', {},
    heading, el('p', { className: 'message message-error', role: 'alert' }, error.message || String(error)), retry));
  heading.focus();
}

let previousView = null;

export async function route() {
  if (!readKey()) {
    state.generation += 1;
    showSignIn('');
    return;
  }
  showSignedIn(true);
  const mine = ++state.generation;
  const target = parseHash();
  if (!state.entries) {
    const status = loadingView('Loading your domains…');
    try {
      await loadDomains(false, (count) => {
        if (mine === state.generation) status.textContent = `Loading your domains… (${count})`;
      });
    } catch (error) {
      if (mine === state.generation && error?.status !== 401) failureView(error);
      return;
    }
    if (mine !== state.generation) return;
  }
  if (target.view === 'domain') {
    // a domain opened from the list: "All domains" may then go Back, keeping the list's scroll
    if (previousView === 'list' && !history.state) history.replaceState({ fromList: true }, '');
    previousView = 'domain';
    await renderDomain(target.name, target.tab, mine);
  } else {
    previousView = 'list';
    state.listHash = location.hash.startsWith('#/domains') ? location.hash : '#/domains';
    renderList(target.params);
  }
}

// ---- start --------------------------------------------------------------------------------

/** Internal links opened in a new tab (Ctrl/Cmd/Shift+click, middle click, context menu). */
function watchNewTabGestures() {
  const internal = (event) => event.target instanceof Element
    && event.target.closest('a[href^="#/"]');
  document.addEventListener('click', (event) => {
    if (internal(event)) {
      if (event.ctrlKey || event.metaKey || event.shiftKey) grantHandoff();
      else saveScroll(); // this entry is about to be left
    }
  }, true);
  document.addEventListener('auxclick', (event) => {
    if (event.button === 1 && internal(event)) grantHandoff();
  }, true);
  document.addEventListener('contextmenu', (event) => {
    if (internal(event)) grantHandoff();
  }, true);
}

async function start() {
  history.scrollRestoration = 'manual';
  onUnauthorized((error) => signOut(`Your API key was not accepted: ${error.message}`));
  $('signin-form').addEventListener('submit', onSignIn);
  $('sign-out').addEventListener('click', () => {
    broadcastSignOut(readKey());
    signOut('You are signed out.');
    announce('You are signed out.');
  });
  onSignedOutElsewhere(() => signOut('You signed out in another tab.'));
  window.addEventListener('hashchange', () => route());
  window.addEventListener('scroll', onScroll, { passive: true });
  window.addEventListener('pagehide', saveScroll);
  watchNewTabGestures();
  await loadConfig();
  if (!readKey()) {
    showSignIn('');
    // a tab opened from a signed-in one gets its key; a fresh visit simply stays here
    if (await requestHandoff() && !$('api-key').value) route();
    return;
  }
  route();
}

start();
