"""The portal in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven
by selenium, against a real daemon on a TCP port with 200 domains of mixed states.

Every test ends with the browser console free of errors (network errors included: a 401 for a
favicon, a 404 for a missing API would show there), except what the test says it expects."""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterator

import idna
import pytest

from api.app import routes
from tests.conftest import password_hash_of
from tests.portal_harness import (PASSWORD, Site, World, browser_missing, chromium, dkim_tokens,
                                  seed_reseller, ses_token)

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
SENDERS_API = any(r.path == "/domains/{name}/senders" for r in routes())  # type: ignore[attr-defined]
WAIT = 15  # seconds: a deadline for conditions, never a sleep
MIB = 1024 * 1024


class Page:
    """The portal in one browser, with waits on conditions and a console check."""

    def __init__(self, driver: Any, site: Site) -> None:
        self.driver, self.site = driver, site
        self.expected_errors: list[str] = []

    # ---- driving ----------------------------------------------------------------------------

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        """Poll condition until it is truthy; fail naming what was awaited."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except Exception:  # the page is between states (stale element, not yet there)
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page says: "
                                     f"{self.text('main')[:600]!r}")
            time.sleep(0.03)  # the polling step of a deadline, not a wait for time to pass

    def text(self, selector: str) -> str:
        return self.js("const n = document.querySelector(arguments[0]);"
                       "return n ? n.innerText : '';", selector)

    def texts(self, selector: str) -> list[str]:
        return self.js("return [...document.querySelectorAll(arguments[0])]"
                       ".map((n) => n.innerText.trim());", selector)

    def click(self, selector: str) -> None:
        self.wait(lambda: self._click(selector, None), f"a clickable {selector}")

    def click_text(self, selector: str, text: str) -> None:
        """Click the element matching selector whose text contains text."""
        self.wait(lambda: self._click(selector, text), f"a clickable {selector} with {text!r}")

    def _click(self, selector: str, text: str | None) -> bool:
        for element in self.driver.find_elements("css selector", selector):
            if text is None or text in element.text:
                element.click()  # a stale element raises: wait() tries again
                return True
        return False

    def fill(self, selector: str, value: str) -> None:
        element = self.driver.find_element("css selector", selector)
        element.clear()
        element.send_keys(value)

    def open(self, route: str = "") -> None:
        self.driver.get(self.site.url + route)

    def fresh(self) -> None:
        """A signed-out tab on the sign-in page."""
        self.open()
        self.js("sessionStorage.clear()")
        self.open()
        self.wait(lambda: self.js("return !document.getElementById('signin-view').hidden"),
                  "the sign-in form")

    def sign_in(self, token: str, route: str = "") -> None:
        self.fresh()
        if route:
            self.open(route)
        self.fill("#api-key", token)
        self.click("#signin-form button[type=submit]")
        self.wait(lambda: self.js("return !document.getElementById('view').hidden && "
                                  "!document.querySelector('#view .loading')"), "signed in")

    def list_status(self) -> str:
        return self.wait(lambda: self.text("#domains-status"), "the list status")

    def open_domain(self, name: str, tab: str = "") -> None:
        self.js("location.hash = arguments[0]", f"#/domain/{name}" + (f"/{tab}" if tab else ""))
        self.wait(lambda: self.js("return document.querySelector('.domain-view[data-fresh]') "
                                  "&& location.hash.includes(arguments[0])", name),
                  f"the page of {name}")

    def dns_checked(self) -> str:
        return self.wait(lambda: re.search(r"Checked at .*", self.text(".check-bar")),
                         "the DNS check")[0]

    def clipboard(self) -> str:
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.clipboard.readText().then(done, (e) => done('ERROR ' + e));")

    # ---- the console ------------------------------------------------------------------------

    def expect_console_error(self, fragment: str) -> None:
        self.expected_errors.append(fragment)

    def console_errors(self) -> list[str]:
        logs = self.driver.get_log("browser")
        return [e["message"] for e in logs if e["level"] == "SEVERE"
                and not any(f in e["message"] for f in self.expected_errors)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, World]]:
    site = Site(tmp_path_factory.mktemp("portal-site"))
    try:
        yield site, seed_reseller(site, count=200)
    finally:
        site.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    browser = chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(driver: Any, world: tuple[Site, World]) -> Iterator[Page]:
    site, _ = world
    origin = site.url.split("/portal/")[0]
    driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    driver.set_window_size(1280, 900)
    page = Page(driver, site)
    page.fresh()
    driver.get_log("browser")  # from here on, this test's console
    yield page
    for handle in driver.window_handles[1:]:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(driver.window_handles[0])
    errors = page.console_errors()
    assert not errors, errors


def names_in_page(page: Page) -> str:
    """Everything the page holds, visible or not (the DOM as HTML)."""
    return page.js("return document.documentElement.outerHTML")


# ---- sign-in and the list ------------------------------------------------------------------------


def test_sign_in_lists_200_domains_in_pages_with_the_partners_quotas(
        page: Page, world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.reseller.token)
    assert page.list_status() == "Showing 1–50 of 200 domains."
    assert len(page.texts("#domain-list > li")) == 50
    quota = page.text(".quota-list")
    assert "200 of 250" in quota and "at most 5 per domain" in quota
    page.click_text(".pager button", "Next")
    page.wait(lambda: page.text("#domains-status").startswith("Showing 51–100"), "page 2")
    assert page.js("return location.hash") == "#/domains?page=2"
    assert page.js("return sessionStorage.length") == 1  # the key, in this tab only
    assert page.js("return localStorage.length + document.cookie.length") == 0
    assert page.console_errors() == []


def test_a_wrong_key_is_refused_with_a_message(page: Page) -> None:
    page.expect_console_error("401")  # the one refused request
    page.fill("#api-key", "pd_not-a-key")
    page.click("#signin-form button[type=submit]")
    message = page.wait(lambda: page.text("#signin-message"), "the refusal")
    assert "Your API key was not accepted" in message
    assert page.js("return sessionStorage.length") == 0


def test_idn_names_show_as_written_and_the_filter_finds_either_form(
        page: Page, world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.reseller.token)
    page.list_status()
    for typed, shown in (("Bücher", "bücher.example"), ("xn--bcher", "bücher.example"),
                         ("東京", "東京-store.example"), ("ПРИМЕР", "пример.example")):
        page.fill("#domain-filter", typed)
        rows = page.wait(lambda: [t for t in page.texts("#domain-list > li")
                                  if len(page.texts("#domain-list > li")) == 1],
                         f"one row for {typed!r}")
        assert rows[0].startswith(shown), rows
    row = page.texts("#domain-list > li")[0]
    assert "(xn--e1afmkfd.example)" in row  # the A-label beside the U-label
    assert "q=%D0%BF%D1%80%D0%B8%D0%BC%D0%B5%D1%80" in page.js("return location.hash").lower() \
        or "q=" in page.js("return location.hash")


def test_sort_needs_attention_and_back_keep_the_lists_state(
        page: Page, world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.reseller.token)
    page.list_status()
    page.click("#domain-attention")
    page.wait(lambda: page.text("#domains-status").startswith("Showing 1–11 of 11"),
              "11 domains needing attention")
    shown = " ".join(page.texts("#domain-list > li"))
    for name in (w.blocked, w.suspended_platform, w.suspended_self, w.pending, w.failed,
                 "customer-011.example"):
        assert name in shown
    assert w.idn not in shown and w.linked not in shown  # verified, inherited: nothing to do
    page.click("#domain-attention")
    page.driver.find_element("css selector", "#domain-sort option[value=today]").click()
    page.wait(lambda: page.texts("#domain-list > li")[0].startswith("customer-011.example"),
              "the busiest domain first")
    page.click_text(".pager button", "Next")
    page.wait(lambda: "page=2" in page.js("return location.hash"), "page 2 in the URL")
    page.js("window.scrollTo(0, 900)")
    page.wait(lambda: page.js("return history.state && history.state.scroll") == 900,
              "the scroll position saved")
    target = page.driver.find_elements("css selector", "#domain-list a.row-link")[20]
    name = target.text.split(" ")[0]
    target.click()
    page.wait(lambda: page.text("#domain-title").startswith(name), f"the page of {name}")
    page.driver.back()
    page.wait(lambda: page.js("return window.scrollY") == 900, "the list where it was")
    assert page.js("return location.hash") == "#/domains?sort=today&page=2"
    assert page.js("return document.getElementById('domain-sort').value") == "today"
    assert page.text("#domains-status").startswith("Showing 51–100 of 200")


# ---- records ---------------------------------------------------------------------------------------


def record_rows(page: Page) -> list[dict[str, Any]]:
    return page.js("""
      return [...document.querySelectorAll('table.records tbody tr[data-purpose]')].map((tr) => ({
        purpose: tr.dataset.purpose, name: tr.dataset.name,
        copies: [...tr.querySelectorAll('button.copy')].map((b) => b.dataset.copy),
        labels: [...tr.querySelectorAll('button.copy')].map((b) => b.getAttribute('aria-label')),
        check: tr.querySelector('.record-check').innerText.trim(),
        group: tr.closest('table').querySelector('caption').innerText,
      }));""")


def test_every_record_has_its_exact_value_a_copy_control_and_a_verdict(
        page: Page, world: tuple[Site, World]) -> None:
    site, w = world
    page.sign_in(w.reseller.token)
    page.open_domain(w.idn)
    assert page.text("#domain-title") == "bücher.example (xn--bcher-kva.example)"
    assert "all 7 required records are published" in page.dns_checked()
    rows = record_rows(page)
    api_records = site.api("GET", f"/domains/{w.idn}", token=w.reseller.token)["records"]
    assert [r["purpose"] for r in rows] == ["ses", "dkim", "dkim", "dkim", "mx", "mx", "spf",
                                           "dmarc"]
    assert [r["copies"] for r in rows] == [[r["name"], r["value"]] for r in api_records]
    assert rows[0]["copies"] == [f"_amazonses.{w.idn}", ses_token(w.idn)]
    assert rows[1]["copies"][1] == f"{dkim_tokens(w.idn)[0]}.dkim.amazonses.com"
    assert all(r["check"].startswith("✓") for r in rows), [r["check"] for r in rows]
    assert rows[1]["labels"] == ["Copy name of the DKIM signing 1 of 3 record",
                                 "Copy value of the DKIM signing 1 of 3 record"]
    page.driver.find_elements("css selector", "tr[data-purpose=dkim] button.copy")[1].click()
    page.wait(lambda: page.clipboard() == rows[1]["copies"][1], "the DKIM target copied")
    snippet = page.text("#zone-snippet")
    assert snippet.startswith(f"$ORIGIN {w.idn}.\n")
    assert re.search(rf'^_amazonses +3600 IN TXT "{re.escape(ses_token(w.idn))}"$', snippet, re.M)
    assert re.search(rf"^{dkim_tokens(w.idn)[2]}\._domainkey +3600 IN CNAME "
                     rf"{dkim_tokens(w.idn)[2]}\.dkim\.amazonses\.com\.$", snippet, re.M)
    assert re.search(r"^@ +3600 IN MX 20 mx2\.mail\.test\.$", snippet, re.M)
    assert re.search(r'^@ +3600 IN TXT "v=spf1 include:amazonses\.com ~all"$', snippet, re.M)
    assert re.search(r'^_dmarc +3600 IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@'
                     r'xn--bcher-kva\.example"$', snippet, re.M)
    page.click_text(".snippet button", "Copy snippet")
    page.wait(lambda: page.clipboard() == snippet.rstrip("\n") + "\n"
              or page.clipboard() == snippet, "the snippet copied")


def test_two_spf_records_are_marked_and_merged_into_one(
        page: Page, world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.reseller.token)
    page.open_domain(w.two_spf)
    assert "1 of 7 required records need fixing" in page.dns_checked()
    checks = {r["purpose"]: r["check"] for r in record_rows(page)}
    assert checks["ses"].startswith("✓") and checks["mx"].startswith("✓")
    assert checks["spf"].startswith("✗ Needs fixing")
    assert "2 SPF records found" in checks["spf"] and "one merged record" in checks["spf"]
    merged = "v=spf1 include:amazonses.com mx include:_spf.google.com ~all"
    spf = [r for r in record_rows(page) if r["purpose"] == "spf"][0]
    assert spf["copies"] == [w.two_spf, merged]  # the value to publish is the merged one
    assert f'@ 3600 IN TXT "{merged}"' in re.sub(" +", " ", page.text("#zone-snippet"))
    assert checks["dmarc"].startswith("○ Not published (optional)")


def test_a_linked_subdomain_uses_its_parents_records_and_links_to_it(
        page: Page, world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.reseller.token)
    page.open_domain(w.linked)
    states = page.text(".states")
    assert "Verified through brand.example" in states and "not started" not in states.lower()
    assert "Sends under" in page.text(".summary")
    assert "all 7 required records are published" in page.dns_checked()
    rows = record_rows(page)
    inherited = [r for r in rows if "brand.example uses" not in r["group"]
                 and r["name"].endswith(f".{w.parent}") and r["name"] != w.linked]
    assert [r["purpose"] for r in rows if r["group"].startswith("Records shop.brand.example "
                                                                "uses from")] == [
        "ses", "dkim", "dkim", "dkim"]
    assert all(r["check"].startswith("✓") for r in rows if r["purpose"] != "dmarc"), rows
    assert inherited and all(r["name"].endswith(w.parent) for r in inherited)
    assert page.text("#zone-snippet").startswith(f"$ORIGIN {w.parent}.\nshop ")
    page.click_text(".states a", "Open brand.example")
    page.wait(lambda: page.text("#domain-title") == "brand.example", "the parent's page")
    assert "Wildcard parent" in page.text(".states")
    assert "shop.brand.example" in page.text(".states")


# ---- states ------------------------------------------------------------------------------------


def test_each_state_is_explained_in_words(page: Page, world: tuple[Site, World]) -> None:
    site, w = world
    page.sign_in(w.reseller.token)
    page.open_domain(w.blocked)
    states = page.text(".states")
    assert "Sending blocked" in states
    assert "150 sent, 12 bounced (8%), 3 complaints (2%)" in states
    assert "only the platform can" in states
    page.open_domain(w.suspended_platform)
    assert "Suspended by the platform" in page.text(".states")
    assert "Held (domain suspended)" in page.text(".summary")  # not "active"
    page.open_domain(w.pending)
    assert "SES verification pending" in page.text(".states")
    assert "Publish the SES TXT record" in page.text(".states")
    page.open_domain(w.failed)
    assert "SES verification failed" in page.text(".states")
    page.open_domain("not-started.example")
    assert "SES verification not started" in page.text(".states")
    page.open_domain(w.suspended_self)
    assert "Suspended by you" in page.text(".states")
    page.click_text(".states button", "Activate the domain")
    page.wait(lambda: "Suspended" not in page.text(".states"), "the domain active again")
    assert site.api("GET", f"/domains/{w.suspended_self}")["status"] == "active"
    site.api("PUT", f"/domains/{w.suspended_self}/suspend", token=w.reseller.token)


# ---- mailboxes and aliases ---------------------------------------------------------------------


def dialog_submit(page: Page, fields: dict[str, str]) -> None:
    page.wait(lambda: page.js("return document.querySelector('dialog[open]')"), "a dialog")
    for selector, value in fields.items():
        page.fill(f"dialog[open] {selector}", value)
    page.click("dialog[open] button[type=submit]")
    page.wait(lambda: not page.js("return document.querySelector('dialog[open]')"),
              "the dialog closed")


def test_mailboxes_and_aliases_are_managed_from_the_portal(
        page: Page, world: tuple[Site, World]) -> None:
    site, w = world
    domain = "customer-001.example"
    page.sign_in(w.reseller.token)
    page.open_domain(domain, "mailboxes")
    page.wait(lambda: "0 of 5 mailboxes" in page.text("#mailbox-status"), "no mailboxes yet")
    page.fill("#new-local", "alice")
    page.fill("#new-password", PASSWORD)
    page.fill("#new-name", "Alice Example")
    page.fill("#new-quota", "100")
    page.click(".stack-form button[type=submit]")
    page.wait(lambda: "1 of 5 mailboxes" in page.text("#mailbox-status"), "alice created")
    email = f"alice@{domain}"
    created = site.api("GET", f"/users/{email}", token=w.reseller.token)
    assert (created["name"], created["quota_bytes"]) == ("Alice Example", 100 * MIB)
    before = site.read(password_hash_of, email)
    page.click(f'tr[data-email="{email}"] button[aria-label^="Change the password"]')
    dialog_submit(page, {"#dialog-password": "another-secret-42"})
    page.wait(lambda: site.read(password_hash_of, email) != before, "a new hash")
    page.click(f'tr[data-email="{email}"] button[aria-label^="Change the storage"]')
    dialog_submit(page, {"#dialog-quota": "512"})
    page.wait(lambda: site.api("GET", f"/users/{email}/quota",
                               token=w.reseller.token)["quota_bytes"] == 512 * MIB, "512 MiB")
    page.wait(lambda: "512 MiB" in page.text(f'tr[data-email="{email}"]'), "the new quota shown")
    page.click(f'tr[data-email="{email}"] button[aria-label^="Disable"]')
    page.wait(lambda: "Disabled" in page.text(f'tr[data-email="{email}"]'), "alice disabled")
    assert site.api("GET", f"/users/{email}", token=w.reseller.token)["active"] is False

    page.click('.tabs a[data-tab="aliases"]')
    page.wait(lambda: "0 aliases" in page.text("#alias-status"), "the aliases tab")
    page.fill("#alias-local", "sales")
    page.fill("#alias-destinations", f"{email}\nboss@bücher.example")
    page.click(".stack-form button[type=submit]")
    page.wait(lambda: "1 alias" in page.text("#alias-status"), "the alias created")
    alias = site.api("GET", f"/aliases/sales@{domain}", token=w.reseller.token)
    assert alias["destinations"] == [email, "boss@xn--bcher-kva.example"]
    assert "boss@bücher.example" in page.text("table.aliases")  # shown as written
    page.click(f'tr[data-source="sales@{domain}"] button')
    dialog_submit(page, {})
    page.wait(lambda: "0 aliases" in page.text("#alias-status"), "the alias deleted")

    page.click('.tabs a[data-tab="mailboxes"]')
    page.wait(lambda: page.js(f"return document.querySelector('tr[data-email=\"{email}\"]')"),
              "alice listed")
    page.click(f'tr[data-email="{email}"] button[aria-label^="Delete"]')
    dialog_submit(page, {})
    page.wait(lambda: "0 of 5 mailboxes" in page.text("#mailbox-status"), "alice deleted")
    assert site.status_of("GET", f"/users/{email}", token=w.reseller.token) == 404


def test_a_new_domain_is_added_and_its_records_shown(page: Page,
                                                    world: tuple[Site, World]) -> None:
    site, _ = world
    newcomer = site.partner("Newcomer", max_domains=1)
    page.sign_in(newcomer.token)
    assert page.list_status() == "No domains yet. Add your first one above."
    page.click(".add-domain summary")
    page.fill("#new-domain", "Neu-Kunde.Example")
    page.click(".add-domain button[type=submit]")
    page.wait(lambda: page.text("#domain-title") == "neu-kunde.example", "the new domain's page")
    assert "SES verification not started" in page.text(".states")
    page.dns_checked()
    assert [r["purpose"] for r in record_rows(page)] == ["mx", "mx", "spf", "dmarc"]
    assert "SES verification TXT record and the three DKIM" in page.text("#domain-panel")
    page.open("#/domains")
    page.wait(lambda: "1 of 1" in page.text(".quota-list"), "the quota used")
    assert "domain quota" in page.text(".quota")


# ---- isolation, tabs, sign-out ------------------------------------------------------------------


def test_one_partner_never_sees_anothers_domains(page: Page, world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.other.token)
    assert page.list_status() == "Showing 1–1 of 1 domains."
    assert page.texts("#domain-list > li")[0].startswith(w.other_domain)
    page.open(f"#/domain/{w.idn}")
    page.wait(lambda: page.text("#view h2") == "Domain not found", "not found")
    html = names_in_page(page)
    assert "bücher.example" in html  # the name typed into the URL, said back: nothing else
    for secret in (ses_token(w.idn), "customer-0", w.blocked, "Reseller One"):
        assert secret not in html
    page.sign_in(w.reseller.token, f"#/domain/{w.other_domain}")
    page.wait(lambda: page.text("#view h2") == "Domain not found", "not found for the reseller")
    assert ses_token(w.other_domain) not in names_in_page(page)


def test_ctrl_click_opens_a_signed_in_tab_and_sign_out_forgets_everywhere(
        page: Page, world: tuple[Site, World]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _, w = world
    driver = page.driver
    page.sign_in(w.reseller.token)
    page.fill("#domain-filter", "bücher")
    page.wait(lambda: len(page.texts("#domain-list > li")) == 1, "bücher alone")
    first = driver.current_window_handle
    link = driver.find_element("css selector", "#domain-list a.row-link")
    ActionChains(driver).key_down(Keys.CONTROL).click(link).key_up(Keys.CONTROL).perform()
    page.wait(lambda: len(driver.window_handles) == 2, "a new tab")
    driver.switch_to.window([h for h in driver.window_handles if h != first][0])
    page.wait(lambda: page.text("#domain-title").startswith("bücher.example"),
              "the new tab signed in, on the domain")
    assert page.js("return sessionStorage.length") == 1
    # a tab the user did not open from a signed-in one gets nothing
    driver.switch_to.new_window("tab")
    page.open(f"#/domain/{w.idn}")
    page.wait(lambda: page.js("return !document.getElementById('signin-view').hidden"),
              "the sign-in form")
    page.wait(lambda: page.js("return performance.now() > 2500"), "the handoff window over")
    assert page.js("return sessionStorage.length") == 0
    assert "bücher" not in page.text("main")
    driver.close()
    driver.switch_to.window(first)
    page.click("#sign-out")
    page.wait(lambda: page.js("return !document.getElementById('signin-view').hidden"),
              "signed out")
    html = names_in_page(page)
    for trace in ("bücher", "xn--bcher", "customer-0", "brand.example", ses_token(w.idn)):
        assert trace not in html, trace
    assert page.js("return sessionStorage.length + localStorage.length") == 0
    assert page.js("return location.hash") == ""
    # the tab that got the key from this one forgot it too
    driver.switch_to.window([h for h in driver.window_handles if h != first][0])
    page.wait(lambda: page.js("return !document.getElementById('signin-view').hidden"),
              "the other tab signed out")
    assert page.js("return sessionStorage.length") == 0
    assert "xn--bcher" not in names_in_page(page)


# ---- layout, keyboard, accessibility ------------------------------------------------------------

A11Y_PROBLEMS = """
  const problems = [];
  for (const c of document.querySelectorAll('input, select, textarea')) {
    if (c.type === 'hidden' || c.closest('[hidden]')) continue;
    if (!c.labels?.length && !c.getAttribute('aria-label')) problems.push('unlabelled ' + (c.id || c.outerHTML));
  }
  for (const b of document.querySelectorAll('button, a[href]')) {
    if (b.closest('[hidden]')) continue;
    if (!(b.getAttribute('aria-label') || b.textContent.trim())) problems.push('nameless ' + b.outerHTML);
  }
  const ids = [...document.querySelectorAll('[id]')].map((n) => n.id);
  for (const id of ids) if (ids.indexOf(id) !== ids.lastIndexOf(id)) problems.push('duplicate id ' + id);
  return [...new Set(problems)];
"""


def test_keyboard_only_finds_and_opens_a_domain(page: Page, world: tuple[Site, World]) -> None:
    from selenium.webdriver.common.keys import Keys

    _, w = world
    page.sign_in(w.reseller.token)
    page.list_status()
    assert page.js(A11Y_PROBLEMS) == []
    active = page.driver.switch_to.active_element
    assert active.get_attribute("id") == "domains-title"  # focus moved to the new view
    for _ in range(20):  # Tab to the filter
        page.driver.switch_to.active_element.send_keys(Keys.TAB)
        if page.js("return document.activeElement.id") == "domain-filter":
            break
    page.driver.switch_to.active_element.send_keys("smörgås")
    page.wait(lambda: len(page.texts("#domain-list > li")) == 1, "one match")
    for _ in range(10):
        page.driver.switch_to.active_element.send_keys(Keys.TAB)
        if page.js("return document.activeElement.classList.contains('row-link')"):
            break
    page.driver.switch_to.active_element.send_keys(Keys.ENTER)
    page.wait(lambda: page.js("return document.activeElement.id") == "domain-title",
              "the domain page, its title focused")
    assert page.text("#domain-title").startswith("smörgås.example")
    page.dns_checked()
    assert page.js(A11Y_PROBLEMS) == []
    page.click('.tabs a[data-tab="mailboxes"]')
    page.wait(lambda: page.text("#mailbox-status") != "Loading mailboxes…", "mailboxes")
    assert page.js(A11Y_PROBLEMS) == []


@pytest.mark.parametrize("route,ready", [
    ("", "#domain-list > li"),
    ("#/domain/shop.brand.example", ".check-bar"),
    ("#/domain/blocked.example/sending", "table.history, #domain-panel p.hint"),
    ("#/domain/customer-002.example/mailboxes", "#mailbox-status"),
])
def test_390_pixels_wide_nothing_scrolls_sideways(page: Page, world: tuple[Site, World],
                                                  route: str, ready: str) -> None:
    _, w = world
    page.driver.set_window_size(390, 844)
    page.wait(lambda: page.js("return window.innerWidth") <= 390, "a narrow window")
    page.sign_in(w.reseller.token, route)
    page.wait(lambda: page.js("return document.querySelector(arguments[0])", ready), ready)
    if route == "#/domain/shop.brand.example":
        page.dns_checked()
    overflow = page.js("return document.documentElement.scrollWidth - window.innerWidth")
    wide = page.js("""return [...document.querySelectorAll('main *')]
        .filter((n) => n.getBoundingClientRect().right > window.innerWidth + 1
                       && !n.closest('.table-wrap, pre'))
        .slice(0, 5).map((n) => n.tagName + '.' + n.className);""")
    assert overflow <= 0 and wide == [], (overflow, wide)


def test_the_punycode_decoder_agrees_with_python(page: Page) -> None:
    names = ["bücher", "東京-store", "пример", "ελλάδα", "crème-brûlée", "straße", "ﻢﺛﺎﻟ",
             "ابجد", "日本語", "😀", "ab--c", "a-b-c-ü", "ü" * 20]
    labels = [f"xn--{n.encode('punycode').decode()}" if not n.isascii() else n for n in names]
    assert idna.encode("bücher.example").decode() == f"{labels[0]}.example"  # same algorithm
    decoded = page.driver.execute_async_script(
        "const [labels, done] = arguments;"
        "import('./idn.js').then((m) => done(labels.map((l) => m.toUnicode(l + '.example'))));",
        labels)
    assert decoded == [f"{n}.example" for n in names]
    # not Punycode, or decoding to what must not be shown (a bidi override, a zero-width space,
    # a control character): such labels are shown as their A-labels
    unsafe = [f"xn--{t.encode('punycode').decode()}" for t in ("pay\u202elap", "a\u200bb", "a\x07b")]
    kept = ["xn--99999999999", "xn--", "xn--ab_c", *unsafe]
    shown = page.driver.execute_async_script(
        "const [labels, done] = arguments;"
        "import('./idn.js').then((m) => done(labels.map((l) => m.toUnicode(l + '.x'))));", kept)
    assert shown == [f"{label}.x" for label in kept]


# ---- senders (SPEC §9) -------------------------------------------------------------------------


@pytest.mark.skipif(not SENDERS_API, reason="needs the §9 senders API (GET /domains/{name}/senders)")
def test_senders_show_locks_and_limits_and_unlock(page: Page, world: tuple[Site, World]) -> None:
    site, w = world
    domain = "customer-003.example"
    email = f"bob@{domain}"
    site.api("POST", "/users/", {"email": email, "password": PASSWORD}, token=w.reseller.token)
    site.api("PUT", f"/users/{email}/outbound", {"status": "locked"}, token=w.reseller.token)
    page.sign_in(w.reseller.token)
    page.open_domain(domain, "senders")
    page.wait(lambda: "1 locked" in page.text("#domain-panel"), "the locked sender")
    page.wait(lambda: "1 sender locked" in page.text(".states"), "the state says so")
    row = page.text(f'tr[data-email="{email}"]')
    assert "locked by hand" in row
    assert "unlimited" not in row  # counts stand alone where no limit applies ("0", not "0 of unlimited")
    page.click(f'tr[data-email="{email}"] button[aria-label^="Unlock"]')
    dialog_submit(page, {"#sender-daily": "50", "#sender-password": "a-new-password-7"})
    state = site.api("GET", f"/users/{email}/outbound", token=w.reseller.token)
    assert (state["status"], state["daily_limit"]) == ("active", 50)
    site.api("DELETE", f"/users/{email}", token=w.reseller.token)


def test_without_the_senders_api_the_view_is_hidden_quietly(page: Page,
                                                            world: tuple[Site, World]) -> None:
    _, w = world
    page.sign_in(w.reseller.token)
    page.open_domain(w.idn)
    tabs = page.texts(".tabs a")
    assert ("Senders" in tabs) == SENDERS_API
    assert page.console_errors() == []  # no 404 for a route the server lacks
