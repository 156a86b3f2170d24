"""A real daemon on a TCP port for a real browser: the daemon and a DNS server run on an event
loop in a background thread (selenium's calls block), data is seeded through the API and the
store, and Chromium is driven headless by selenium with Debian's chromium-driver.

Used by tests/test_portal_browser.py and by hand (``python -m tests.portal_harness``) to look at
the portal with 200 domains of mixed states."""
from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from policyd.config import load_config
from policyd.ses import SesStatus
from policyd.sesflow import _store_status
from policyd.store import counters
from policyd.store import domains as domain_store
from policyd.timeutil import utcnow
from tests.conftest import BASE_SECTIONS, MASTER, Daemon, start_daemon, write_config
from tests.dnsserver import DnsServer

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MX_HOSTS = ("mx1.mail.test", "mx2.mail.test")
PASSWORD = "correct-horse-battery-9"


def dkim_tokens(name: str) -> tuple[str, str, str]:
    """Three DKIM tokens that look like SES's (32 lowercase letters and digits)."""
    base = "".join(c for c in name.encode("idna").decode() if c.isalnum())
    return tuple((f"{i}{base}" * 40)[:32] for i in "abc")  # type: ignore[return-value]


def ses_token(name: str) -> str:
    """A verification token that looks like SES's (44 characters of base64)."""
    base = "".join(c for c in name.encode("idna").decode() if c.isalnum()).upper()
    return (f"{base}x9+Q/" * 20)[:43] + "="


class LoopThread:
    """An asyncio loop in a daemon thread; run() a coroutine on it from the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="portal-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Tenant:
    """A partner, its key and what was made for it."""

    partner_id: int
    token: str
    domains: list[str] = field(default_factory=list)


class Site:
    """The running daemon (API and portal on a TCP port) and its DNS server."""

    def __init__(self, tmp: Path, *, senders: dict[str, str] | None = None) -> None:
        self.loop = LoopThread()
        self.dns = DnsServer()
        self.loop.run(self.dns.start())
        sections = {name: dict(values) for name, values in BASE_SECTIONS.items()}
        sections["database"] = {"path": str(tmp / "policyd.sqlite3")}
        sections["dns"] = {"nameservers": "127.0.0.1", "port": str(self.dns.port),
                           "timeout": "0.5", "mx_hosts": ",".join(MX_HOSTS)}
        if senders:
            sections["senders"] = senders
        config = load_config(write_config(tmp / "policyd.ini", sections))
        self.daemon: Daemon = self.loop.run(start_daemon(config))
        self.url = str(self.daemon.client.make_url("/portal/"))

    def stop(self) -> None:
        self.loop.run(self.daemon.stop())
        self.loop.run(self.dns.stop())
        self.loop.stop()

    # ---- the API and the store, from the test's thread ----------------------------------

    def api(self, method: str, path: str, body: Any = None, *, token: str = MASTER) -> Any:
        status, answer = self.loop.run(self.daemon.api(method, path, body, token=token))
        assert status < 300, (method, path, status, answer)
        return answer

    def status_of(self, method: str, path: str, *, token: str = MASTER) -> int:
        return self.loop.run(self.daemon.api(method, path, token=token))[0]

    def write(self, fn: Callable[..., T], *args: Any) -> T:
        async def on_loop() -> T:  # the store's calls belong on its loop, not this thread
            return await self.daemon.rt.store.write(fn, *args)
        return self.loop.run(on_loop())

    def read(self, fn: Callable[..., T], *args: Any) -> T:
        async def on_loop() -> T:
            return await self.daemon.rt.store.read(fn, *args)
        return self.loop.run(on_loop())

    def partner(self, name: str, **quotas: Any) -> Tenant:
        partner = self.api("POST", "/partners/", {"name": name, **quotas})
        key = self.api("POST", "/api-keys/", {"partner_id": partner["id"], "name": "portal"})
        return Tenant(partner["id"], key["token"])

    def domain(self, tenant: Tenant, name: str, ses: str | None = "success") -> str:
        created = self.api("POST", "/domains/", {"name": name}, token=tenant.token)
        if ses is not None:
            self.ses(created["name"], ses)
        tenant.domains.append(created["name"])
        return created["name"]

    def ses(self, name: str, status: str, dkim: str | None = None) -> None:
        dkim = dkim or {"success": "Success", "failed": "Failed"}.get(status, "Pending")
        self.write(_store_status, name, SesStatus(status, dkim, ses_token(name), dkim_tokens(name)))

    def publish(self, name: str, *, spf: tuple[str, ...] | None = None, ses: bool = True,
                mx: bool = True, dmarc: bool = False) -> None:
        """Put a domain's records in the DNS server (SES ones as seeded by ses())."""
        if mx:
            self.dns.add(name, "MX", *(f"{10 * i} {h}." for i, h in enumerate(MX_HOSTS, 1)))
        self.dns.add(name, "TXT", *(spf if spf is not None
                                    else ("v=spf1 include:amazonses.com ~all",)))
        if ses:
            self.dns.add(f"_amazonses.{name}", "TXT", ses_token(name))
            for token in dkim_tokens(name):
                self.dns.add(f"{token}._domainkey.{name}", "CNAME",
                             f"{token}.dkim.amazonses.com.")
        if dmarc:
            self.dns.add(f"_dmarc.{name}", "TXT", "v=DMARC1; p=none")

    def traffic(self, sent: dict[str, int], feedback: dict[str, tuple[int, int]] | None = None,
                history: dict[str, list[tuple[str, int]]] | None = None) -> None:
        """Counters through the store: sent today, bounces/complaints, past months."""
        day, month = self.daemon.rt.periods.keys(utcnow())

        def seed(conn: sqlite3.Connection) -> None:
            ids = {n: domain_store.find_domain(conn, n).id for n in  # type: ignore[union-attr]
                   {*sent, *(feedback or {}), *(history or {})}}
            counters.add_many(conn, [(ids[n], day, month, c, c * 20_000) for n, c in sent.items()])
            for name, (bounces, complaints) in (feedback or {}).items():
                counters.add_feedback(conn, ids[name], day, month, bounces, complaints)
            for name, months in (history or {}).items():
                for period, count in months:
                    counters.add(conn, ids[name], f"{period}-15", period, count, count * 30_000)
            counters.freeze_months(conn, month, "2026-01-01T00:00:00Z")
        self.write(seed)


# ---- a reseller's world ------------------------------------------------------------------------

IDN = ["bücher.example", "café-paris.example", "münchen-shop.example", "straße.example",
       "東京-store.example", "пример.example", "ελλάδα.example", "smörgås.example",
       "crème-brûlée.example", "dürüm.example"]


@dataclass
class World:
    """The names of the interesting domains seeded by seed_reseller."""

    reseller: Tenant
    other: Tenant
    idn: str = "xn--bcher-kva.example"
    two_spf: str = "double-spf.example"
    parent: str = "brand.example"
    linked: str = "shop.brand.example"
    blocked: str = "blocked.example"
    suspended_platform: str = "frozen.example"
    suspended_self: str = "paused.example"
    pending: str = "pending.example"
    failed: str = "failed.example"
    other_domain: str = "secret-rival.example"


def seed_reseller(site: Site, count: int = 200) -> World:
    """One reseller with `count` domains of mixed states, and another partner with one."""
    reseller = site.partner("Reseller One", max_domains=count + 50, max_mailboxes_per_domain=5,
                            max_aliases_per_mailbox=10)
    other = site.partner("Rival Hosting")
    world = World(reseller, other)
    site.domain(other, world.other_domain)
    for name in IDN:
        site.domain(reseller, name)
    site.publish(world.idn, dmarc=True)
    site.domain(reseller, world.two_spf)
    site.publish(world.two_spf, spf=("v=spf1 include:amazonses.com ~all",
                                     "v=spf1 mx include:_spf.google.com -all"))
    site.domain(reseller, world.parent)
    site.api("PUT", f"/domains/{world.parent}/parent", {"wildcard": True})
    site.publish(world.parent)
    for sub in ("shop", "news", "eu", "us", "help"):
        site.domain(reseller, f"{sub}.{world.parent}", ses=None)
    site.publish(world.linked, ses=False)
    for name, ses in ((world.blocked, "success"), (world.suspended_platform, "success"),
                      (world.suspended_self, "success"), (world.pending, "pending"),
                      (world.failed, "failed")):
        site.domain(reseller, name, ses=ses)
    site.api("PUT", f"/domains/{world.blocked}/outbound", {"status": "blocked"})
    site.api("PUT", f"/domains/{world.suspended_platform}/suspend")
    site.api("PUT", f"/domains/{world.suspended_self}/suspend", token=reseller.token)
    for i in range(3):
        site.domain(reseller, f"waiting-{i}.example", ses="pending")
    site.domain(reseller, "not-started.example", ses=None)
    n = len(reseller.domains)
    for i in range(count - n):
        site.domain(reseller, f"customer-{i:03d}.example")
    sent = {name: (i * 37) % 400 for i, name in enumerate(reseller.domains)}
    sent.update({world.blocked: 150, "customer-007.example": 980, "customer-011.example": 1000})
    site.traffic(sent, feedback={world.blocked: (12, 3), world.idn: (1, 0)},
                 history={world.idn: [("2025-11", 4200), ("2025-12", 5100)]})
    return world


# ---- the browser ----------------------------------------------------------------------------------

def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install .[test])"
    return None


def chromium(profile: Path, width: int = 1280, height: int = 900) -> Any:
    """Headless Chromium through Debian's chromedriver; no Selenium Manager, no downloads."""
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-default-apps", "--disable-extensions", "--lang=en-US",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_window_size(width, height)
    return driver


def main() -> None:
    """Run the seeded site for a person to look at (prints the URL and the keys)."""
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="portal-"))
    site = Site(tmp)
    world = seed_reseller(site)
    print("portal:", site.url)
    print("reseller key:", world.reseller.token)
    print("other key:", world.other.token)
    try:
        threading.Event().wait()
    finally:
        site.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
