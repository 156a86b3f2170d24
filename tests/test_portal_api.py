"""What the portal needs from the API: every record a domain needs, and a DNS check that
knows a linked subdomain sends through its parent's SES identity."""
from __future__ import annotations

from typing import AsyncIterator, Callable

import pytest

from policyd.config import Config
from tests.conftest import Daemon, start_daemon
from tests.dnsserver import DnsServer

MX = ("mx1.mail.test", "mx2.mail.test")


@pytest.fixture
async def dns_daemon(make_config: Callable[..., Config],
                     dns_server: DnsServer) -> AsyncIterator[Daemon]:
    """A daemon whose dns-check asks the test DNS server, with platform MX hosts."""
    daemon = await start_daemon(make_config(dns={
        "nameservers": "127.0.0.1", "port": str(dns_server.port), "timeout": "0.3",
        "mx_hosts": ",".join(MX)}))
    yield daemon
    await daemon.stop()


def publish_mail(server: DnsServer, domain: str, *spf: str) -> None:
    """MX and SPF of a domain (SPF: the given records, or the one the platform expects)."""
    server.add(domain, "MX", *(f"{10 * i} {host}." for i, host in enumerate(MX, 1)))
    server.add(domain, "TXT", *(spf or ("v=spf1 include:amazonses.com ~all",)))


def publish_ses(server: DnsServer, domain: str) -> None:
    """The SES TXT and DKIM CNAMEs Daemon.verify gives a domain (token tok-NAME, DKIM a b c)."""
    server.add(f"_amazonses.{domain}", "TXT", f"tok-{domain}")
    for token in "abc":
        server.add(f"{token}._domainkey.{domain}", "CNAME", f"{token}.dkim.amazonses.com.")


async def test_records_list_everything_a_domain_needs_in_order(dns_daemon: Daemon) -> None:
    await dns_daemon.domain("example.com")
    status, body = await dns_daemon.api("GET", "/domains/example.com")
    assert status == 200, body
    rows = [(r["purpose"], r["type"], r["name"], r["value"], r["required"], r["inherited_from"])
            for r in body["records"]]
    assert rows == [
        ("ses", "TXT", "_amazonses.example.com", "tok-example.com", True, None),
        ("dkim", "CNAME", "a._domainkey.example.com", "a.dkim.amazonses.com", True, None),
        ("dkim", "CNAME", "b._domainkey.example.com", "b.dkim.amazonses.com", True, None),
        ("dkim", "CNAME", "c._domainkey.example.com", "c.dkim.amazonses.com", True, None),
        ("mx", "MX", "example.com", "10 mx1.mail.test", True, None),
        ("mx", "MX", "example.com", "20 mx2.mail.test", True, None),
        ("spf", "TXT", "example.com", "v=spf1 include:amazonses.com ~all", True, None),
        ("dmarc", "TXT", "_dmarc.example.com",
         "v=DMARC1; p=none; rua=mailto:postmaster@example.com", False, None),
    ]
    # dns_records keeps its meaning: the SES TXT and DKIM CNAMEs only
    assert [r["type"] for r in body["dns_records"]] == ["TXT", "CNAME", "CNAME", "CNAME"]
    status, listed = await dns_daemon.api("GET", "/domains/")
    assert listed["items"][0]["records"] == body["records"]


async def test_a_domain_without_tokens_lists_only_its_mail_records(dns_daemon: Daemon) -> None:
    await dns_daemon.domain("xn--bcher-kva.example", verified=False)
    _, body = await dns_daemon.api("GET", "/domains/bücher.example")
    assert [r["purpose"] for r in body["records"]] == ["mx", "mx", "spf", "dmarc"]
    assert body["records"][-1]["value"].endswith("@xn--bcher-kva.example")  # ASCII for rua


async def test_a_linked_subdomain_lists_its_parents_ses_records(dns_daemon: Daemon) -> None:
    await dns_daemon.domain("parent.com")
    await dns_daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True})
    await dns_daemon.domain("shop.parent.com", verified=False)
    _, body = await dns_daemon.api("GET", "/domains/shop.parent.com")
    assert (body["parent"], body["ses"]["status"], body["dns_records"]) == (
        "parent.com", "inherited", [])
    ses = [r for r in body["records"] if r["purpose"] in ("ses", "dkim")]
    assert [(r["name"], r["value"], r["inherited_from"]) for r in ses] == [
        ("_amazonses.parent.com", "tok-parent.com", "parent.com"),
        *[(f"{t}._domainkey.parent.com", f"{t}.dkim.amazonses.com", "parent.com") for t in "abc"]]
    own = [(r["purpose"], r["name"]) for r in body["records"] if r["inherited_from"] is None]
    assert own == [("mx", "shop.parent.com"), ("mx", "shop.parent.com"),
                   ("spf", "shop.parent.com"), ("dmarc", "_dmarc.shop.parent.com")]


async def test_dns_check_of_a_linked_subdomain_checks_its_parents_identity(
        dns_daemon: Daemon, dns_server: DnsServer) -> None:
    await dns_daemon.domain("parent.com")
    await dns_daemon.api("PUT", "/domains/parent.com/parent", {"wildcard": True})
    await dns_daemon.domain("shop.parent.com", verified=False)
    publish_ses(dns_server, "parent.com")
    publish_mail(dns_server, "shop.parent.com")
    status, body = await dns_daemon.api("GET", "/domains/shop.parent.com/dns-check")
    assert status == 200, body
    assert body["ok"] is True, body  # not "SES verification not started" six times over
    assert body["inherited_from"] == "parent.com"
    assert [(c["type"], c["name"]) for c in body["checks"]] == [
        ("MX", "shop.parent.com"), ("SPF", "shop.parent.com"), ("TXT", "_amazonses.parent.com"),
        *[("CNAME", f"{t}._domainkey.parent.com") for t in "abc"]]
    # the parent's records gone: the subdomain's check fails on exactly those
    for token in "abc":
        dns_server.records.pop((f"{token}._domainkey.parent.com", "CNAME"))
    _, body = await dns_daemon.api("GET", "/domains/shop.parent.com/dns-check")
    assert [c["ok"] for c in body["checks"]] == [True, True, True, False, False, False]


async def test_dns_check_of_an_unlinked_domain_names_no_parent(
        dns_daemon: Daemon, dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com")
    publish_ses(dns_server, "example.com")
    publish_mail(dns_server, "example.com")
    _, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    assert (body["ok"], body["inherited_from"]) == (True, None)


async def test_dmarc_is_advisory_and_never_changes_ok(dns_daemon: Daemon,
                                                      dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com")
    publish_ses(dns_server, "example.com")
    publish_mail(dns_server, "example.com")
    _, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    (dmarc,) = body["advisory"]
    assert (body["ok"], dmarc["type"], dmarc["name"], dmarc["ok"], dmarc["found"]) == (
        True, "DMARC", "_dmarc.example.com", False, [])
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    _, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    assert body["advisory"][0]["ok"] is True
    assert body["advisory"][0]["found"] == ["v=DMARC1; p=reject"]
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")  # two: no DMARC at all
    _, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    assert (body["ok"], body["advisory"][0]["ok"]) == (True, False)


async def test_two_spf_records_fail_the_check_and_both_are_shown(
        dns_daemon: Daemon, dns_server: DnsServer) -> None:
    await dns_daemon.domain("example.com")
    publish_ses(dns_server, "example.com")
    publish_mail(dns_server, "example.com", "v=spf1 include:amazonses.com ~all",
                 "v=spf1 include:_spf.google.com -all", "google-site-verification=x")
    _, body = await dns_daemon.api("GET", "/domains/example.com/dns-check")
    spf = body["checks"][1]
    assert (body["ok"], spf["type"], spf["ok"]) == (False, "SPF", False)
    assert sorted(spf["found"]) == ["v=spf1 include:_spf.google.com -all",
                                    "v=spf1 include:amazonses.com ~all"]
