"""The DNS check against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from policyd.dnscheck import NO_DKIM_TOKEN, NO_TOKEN, DnsSettings, dns_check, expected_records
from tests.dnsserver import DnsServer

DOMAIN = "example.com"
SES_TOKEN = "pmBGN/7MjnfhTKUZ06Enqq1PeGUaOkw8lGhcfwefcHU="
DKIM = [
    "vvjuipp74whm76gqoni7qmwwn4w4qusjiainivf6sf",
    "3frqe7jn4obpuxjpwpolz6ipb3k5nvt2nhjpik2oy",
    "wrqplteh7oodxnad7hsl4mixg2uavzneazxv5sxi2",
]
MX_HOSTS = ("mx1.mail.test", "mx2.mail.test")
SPF = "v=spf1 mx include:amazonses.com -all"
TIMEOUT = 0.3


def publish_all(server: DnsServer, domain: str = DOMAIN) -> None:
    """Publish every record a correctly set up domain has."""
    server.add(domain, "MX", "10 mx1.mail.test.", "20 mx2.mail.test.")
    server.add(domain, "TXT", SPF, "google-site-verification=abc123")
    server.add(f"_amazonses.{domain}", "TXT", SES_TOKEN)
    for token in DKIM:
        server.add(f"{token}._domainkey.{domain}", "CNAME", f"{token}.dkim.amazonses.com.")


def settings_for(server: DnsServer, **overrides: Any) -> DnsSettings:
    """Settings pointing at the test server, with a short timeout."""
    values: dict[str, Any] = {
        "nameservers": ("127.0.0.1",),
        "port": server.port,
        "timeout": TIMEOUT,
        "mx_hosts": MX_HOSTS,
    }
    values.update(overrides)
    return DnsSettings(**values)


async def check(server: DnsServer, domain: str = DOMAIN, **overrides: Any) -> dict[str, Any]:
    """Run the check for ``domain`` with our tokens against the test server."""
    return await dns_check(
        domain,
        ses_token=SES_TOKEN,
        dkim_tokens=DKIM,
        region="us-east-1",
        settings=settings_for(server, **overrides),
    )


def by_type(result: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    """The checks of one type, in order."""
    return [c for c in result["checks"] if c["type"] == rtype]


def dkim_name(token: str) -> str:
    """Owner name of a DKIM CNAME for DOMAIN."""
    return f"{token}._domainkey.{DOMAIN}"


async def test_all_published_is_ok(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    result = await check(dns_server)
    assert result["ok"] is True
    assert [c["type"] for c in result["checks"]] == ["MX", "SPF", "TXT", "CNAME", "CNAME", "CNAME"]
    assert all(c["ok"] for c in result["checks"])
    assert all(set(c) == {"type", "name", "expected", "found", "ok"} for c in result["checks"])
    mx, spf, txt = result["checks"][:3]
    assert sorted(mx["found"]) == list(MX_HOSTS)
    assert spf["found"] == [SPF]  # the non-SPF TXT record is not listed
    assert txt == {
        "type": "TXT",
        "name": f"_amazonses.{DOMAIN}",
        "expected": SES_TOKEN,
        "found": [SES_TOKEN],
        "ok": True,
    }
    assert [c["name"] for c in by_type(result, "CNAME")] == [dkim_name(t) for t in DKIM]
    assert by_type(result, "CNAME")[0]["found"] == [f"{DKIM[0]}.dkim.amazonses.com"]


async def test_missing_dkim_cname(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    del dns_server.records[(dkim_name(DKIM[1]), "CNAME")]
    result = await check(dns_server)
    assert result["ok"] is False
    cnames = by_type(result, "CNAME")
    assert [c["ok"] for c in cnames] == [True, False, True]
    assert cnames[1]["found"] == []
    assert cnames[1]["expected"] == f"{DKIM[1]}.dkim.amazonses.com"


async def test_wrong_cname_target(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.records[(dkim_name(DKIM[2]), "CNAME")] = [f"{DKIM[0]}.dkim.amazonses.com."]
    result = await check(dns_server)
    assert result["ok"] is False
    bad = by_type(result, "CNAME")[2]
    assert bad["ok"] is False
    assert bad["found"] == [f"{DKIM[0]}.dkim.amazonses.com"]


async def test_two_spf_records_are_not_ok(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    second = "v=spf1 include:_spf.google.com ~all"
    dns_server.add(DOMAIN, "TXT", second)
    result = await check(dns_server)
    (spf,) = by_type(result, "SPF")
    assert spf["ok"] is False and result["ok"] is False
    assert sorted(spf["found"]) == sorted([SPF, second])


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 mx -all",
        "v=spf1 -include:amazonses.com ~all",  # a fail qualifier does not authorise SES
        "v=spf1 include:amazonses.com.evil.test ~all",
        "v=spf10 include:amazonses.com ~all",  # not an SPF record at all (RFC 7208 §4.5)
    ],
)
async def test_spf_without_the_include_is_not_ok(dns_server: DnsServer, record: str) -> None:
    publish_all(dns_server)
    dns_server.records[(DOMAIN, "TXT")] = [record]
    result = await check(dns_server)
    (spf,) = by_type(result, "SPF")
    assert spf["ok"] is False and result["ok"] is False


@pytest.mark.parametrize(
    "record",
    [
        "V=SPF1 +include:AmazonSES.com ~all",
        "v=spf1 a include:_spf.example.net include:amazonses.com",
    ],
)
async def test_spf_variants_that_include_are_ok(dns_server: DnsServer, record: str) -> None:
    publish_all(dns_server)
    dns_server.records[(DOMAIN, "TXT")] = [record]
    (spf,) = by_type(await check(dns_server), "SPF")
    assert spf["ok"] is True
    assert spf["found"] == [record]


async def test_spf_include_comes_from_settings(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    (spf,) = by_type(await check(dns_server, spf_include="spf.mail.test"), "SPF")
    assert spf["ok"] is False
    assert "include:spf.mail.test" in spf["expected"]


async def test_mx_missing_a_configured_host(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.records[(DOMAIN, "MX")] = ["10 mx1.mail.test.", "20 mx.elsewhere.test."]
    result = await check(dns_server)
    (mx,) = by_type(result, "MX")
    assert mx["ok"] is False and result["ok"] is False
    assert sorted(mx["found"]) == ["mx.elsewhere.test", "mx1.mail.test"]
    assert mx["expected"] == list(MX_HOSTS)


async def test_mx_any_host_when_none_configured(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.records[(DOMAIN, "MX")] = ["10 mx.elsewhere.test."]
    (mx,) = by_type(await check(dns_server, mx_hosts=()), "MX")
    assert mx["ok"] is True


async def test_null_mx_is_not_a_mail_host(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.records[(DOMAIN, "MX")] = ["0 ."]  # RFC 7505: the domain accepts no mail
    (mx,) = by_type(await check(dns_server, mx_hosts=()), "MX")
    assert mx["ok"] is False
    assert mx["found"] == ["."]


async def test_unknown_domain_finds_nothing(dns_server: DnsServer) -> None:
    result = await check(dns_server)  # empty zone: NXDOMAIN everywhere
    assert result["ok"] is False
    assert len(result["checks"]) == 6
    assert all(c["found"] == [] and c["ok"] is False for c in result["checks"])


async def test_silent_server_times_out_without_blocking(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.silent = True
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    result = await check(dns_server)
    elapsed = time.monotonic() - started
    ticking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticking
    assert result["ok"] is False
    assert len(result["checks"]) == 6
    assert all(c["ok"] is False and "timeout" in c["found"] for c in result["checks"])
    assert elapsed < TIMEOUT * 3
    assert ticks >= 5  # the event loop kept running while every lookup waited
    assert dns_server.queries >= 6


async def test_one_silent_name_only_fails_that_check(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.silent_names.add(f"_amazonses.{DOMAIN}")
    result = await check(dns_server)
    (txt,) = by_type(result, "TXT")
    assert txt["found"] == "timeout" and txt["ok"] is False
    assert [c["ok"] for c in result["checks"] if c is not txt] == [True] * 5


async def test_server_failure_is_reported_not_raised(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    dns_server.servfail_names.add(DOMAIN)
    result = await check(dns_server)
    mx, spf = result["checks"][:2]
    assert mx["found"] == spf["found"] == "error: NoNameservers"
    assert not mx["ok"] and not spf["ok"]
    assert all(c["ok"] for c in result["checks"][2:])


async def test_bad_nameserver_setting_is_reported_not_raised(dns_server: DnsServer) -> None:
    result = await check(dns_server, nameservers=("not-an-address",))
    assert result["ok"] is False
    assert all(c["found"] == "error: ValueError" for c in result["checks"])


async def test_names_are_case_and_dot_insensitive(dns_server: DnsServer) -> None:
    dns_server.add("EXAMPLE.com.", "MX", "10 MX1.Mail.Test.", "20 mx2.MAIL.test.")
    dns_server.add("Example.Com", "TXT", SPF)
    dns_server.add(f"_AMAZONSES.{DOMAIN}.", "TXT", SES_TOKEN)
    for token in DKIM:
        dns_server.add(dkim_name(token).upper(), "CNAME", f"{token.upper()}.DKIM.AmazonSES.com.")
    result = await check(dns_server, "Example.COM.", mx_hosts=("MX1.mail.test.", "mx2.mail.test"))
    assert result["ok"] is True, result
    assert result["checks"][0]["name"] == DOMAIN
    assert result["checks"][0]["expected"] == list(MX_HOSTS)
    assert by_type(result, "CNAME")[0]["name"] == dkim_name(DKIM[0])


async def test_no_tokens_yet(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    result = await dns_check(
        DOMAIN,
        ses_token=None,
        dkim_tokens=[],
        region="us-east-1",
        settings=settings_for(dns_server),
    )
    assert result["ok"] is False
    assert [c["type"] for c in result["checks"]] == ["MX", "SPF", "TXT", "CNAME", "CNAME", "CNAME"]
    txt, *cnames = result["checks"][2:]
    assert txt["found"] == NO_TOKEN and txt["ok"] is False
    assert all(c["found"] == NO_DKIM_TOKEN and c["ok"] is False for c in cnames)
    assert dns_server.queries == 2  # only MX and SPF needed the network


async def test_large_answer_is_retried_over_tcp(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    filler = [f"filler-{i}-" + "x" * 200 for i in range(10)]  # well over 512 bytes
    dns_server.add(DOMAIN, "TXT", *filler)
    (spf,) = by_type(await check(dns_server), "SPF")
    assert spf["ok"] is True
    assert dns_server.tcp_queries >= 1


async def test_long_txt_strings_are_joined(dns_server: DnsServer) -> None:
    publish_all(dns_server)
    long_value = 'note "quoted" é ' + "y" * 300  # over 255 bytes: several strings in one record
    dns_server.add(f"_amazonses.{DOMAIN}", "TXT", long_value)
    (txt,) = by_type(await check(dns_server), "TXT")
    assert txt["ok"] is True
    assert sorted(txt["found"]) == sorted([SES_TOKEN, long_value])


async def test_dns_server_rcodes(dns_server: DnsServer) -> None:
    dns_server.add("known.test", "A", "192.0.2.1")

    async def ask(name: str, rdtype: str) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.udp(query, "127.0.0.1", timeout=2, port=dns_server.port)

    assert (await ask("known.test", "A")).answer[0][0].to_text() == "192.0.2.1"
    empty = await ask("Known.Test.", "MX")
    assert empty.rcode() == dns.rcode.NOERROR and empty.answer == []
    assert (await ask("unknown.test", "A")).rcode() == dns.rcode.NXDOMAIN


def test_expected_records() -> None:
    records = expected_records(
        "Example.COM.", ses_token=SES_TOKEN, dkim_tokens=DKIM, region="us-east-1"
    )
    assert records[0] == {"type": "TXT", "name": "_amazonses.example.com", "value": SES_TOKEN}
    assert records[1:] == [
        {"type": "CNAME", "name": dkim_name(t), "value": f"{t}.dkim.amazonses.com"} for t in DKIM
    ]


def test_expected_records_only_for_tokens_we_have() -> None:
    assert expected_records(DOMAIN, ses_token=None, dkim_tokens=[], region="eu-west-1") == []
    only_txt = expected_records(DOMAIN, ses_token="tok", dkim_tokens=[], region="eu-west-1")
    assert [r["type"] for r in only_txt] == ["TXT"]


def test_expected_records_use_a_labels() -> None:
    (record,) = expected_records(
        "Bücher.example", ses_token="tok", dkim_tokens=[], region="us-east-1"
    )
    assert record["name"] == "_amazonses.xn--bcher-kva.example"
