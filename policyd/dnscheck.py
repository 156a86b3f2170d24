"""DNS check of a hosted domain: MX, SPF, the SES verification TXT and the DKIM CNAMEs.

Every lookup runs concurrently on ``dns.asyncresolver`` (never blocking the event loop),
is bounded by ``DnsSettings.timeout`` and never raises: a failed lookup becomes a check
that is not ok and says why in ``found``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

log = logging.getLogger(__name__)

# SES Easy DKIM: publish <token>._domainkey.<domain> CNAME <token>.dkim.amazonses.com
# (SES API reference, VerifyDomainDkim). SES always issues three tokens.
DKIM_TARGET_DOMAIN = "dkim.amazonses.com"
DKIM_TOKEN_COUNT = 3
TIMEOUT = "timeout"
NO_TOKEN = "no verification token yet (SES verification not started)"
NO_DKIM_TOKEN = "no DKIM token yet (SES verification not started)"


@dataclass(frozen=True)
class DnsSettings:
    """The [dns] config section; empty nameservers means the system resolver."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 3.0
    mx_hosts: tuple[str, ...] = ()
    spf_include: str = "amazonses.com"


@dataclass(frozen=True)
class _Answer:
    """One lookup's result: the record texts, or why there are none."""

    values: tuple[str, ...] = ()
    error: str | None = None

    def found(self) -> list[str] | str:
        """What a check shows as found: the records, or the error text."""
        return self.error if self.error is not None else list(self.values)


def dns_name(domain: str) -> str:
    """A name as DNS gives or takes it, compared as text: lowercase A-labels, no final dot."""
    try:
        text = dns.name.from_text(domain.strip()).to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        text = domain.strip().rstrip(".")
    return text.lower()


def expected_records(
    domain: str, *, ses_token: str | None, dkim_tokens: list[str], region: str
) -> list[dict[str, str]]:
    """The TXT and CNAME records the customer must publish (only those we have tokens for)."""
    # region is accepted for the API's sake: SES Easy DKIM targets are dkim.amazonses.com.
    origin = dns_name(domain)
    records = []
    if ses_token:
        records.append({"type": "TXT", "name": f"_amazonses.{origin}", "value": ses_token})
    for token in dkim_tokens:
        name, target = _dkim_name(token, origin), _dkim_target(token)
        records.append({"type": "CNAME", "name": name, "value": target})
    return records


async def dns_check(
    domain: str,
    *,
    ses_token: str | None,
    dkim_tokens: list[str],
    region: str,
    settings: DnsSettings,
) -> dict[str, Any]:
    """Look up the domain's MX, SPF, _amazonses TXT and DKIM CNAMEs; never raises."""
    origin = dns_name(domain)
    tokens = list(dkim_tokens)[:DKIM_TOKEN_COUNT]
    queries = [(origin, "MX"), (origin, "TXT")]
    if ses_token:
        queries.append((f"_amazonses.{origin}", "TXT"))
    queries += [(_dkim_name(t, origin), "CNAME") for t in tokens]
    answers = dict(zip(queries, await _resolve_all(queries, settings)))
    checks = [
        _mx_check(origin, answers[(origin, "MX")], settings.mx_hosts),
        _spf_check(origin, answers[(origin, "TXT")], settings.spf_include),
        _token_check(origin, ses_token, answers.get((f"_amazonses.{origin}", "TXT"))),
        *[_dkim_check(t, origin, answers[(_dkim_name(t, origin), "CNAME")]) for t in tokens],
        *[_missing_dkim_check() for _ in range(DKIM_TOKEN_COUNT - len(tokens))],
    ]
    ok = all(check["ok"] for check in checks)
    log.info("dns-check %s ok=%s failed=%s", origin, ok, [c["name"] for c in checks if not c["ok"]])
    return {"ok": ok, "checks": checks}


def _dkim_name(token: str, origin: str) -> str:
    """Owner name of one DKIM CNAME."""
    return f"{token}._domainkey.{origin}"


def _dkim_target(token: str) -> str:
    """Target of one DKIM CNAME."""
    return f"{token}.{DKIM_TARGET_DOMAIN}"


async def _resolve_all(queries: list[tuple[str, str]], settings: DnsSettings) -> list[_Answer]:
    """Run every lookup concurrently; one answer per query, in order."""
    try:
        resolver = await _make_resolver(settings)
    except Exception as exc:  # e.g. no /etc/resolv.conf, a bad nameserver address
        log.warning("dns-check: no resolver: %s", exc)
        return [_Answer(error=_error_text(exc))] * len(queries)
    # The resolver's lifetime bounds each lookup; the outer bound is a safety net so a
    # misbehaving backend can never hold an API request for long.
    bound = settings.timeout + min(1.0, settings.timeout / 2)
    lookups = (_lookup(resolver, name, rdtype, bound) for name, rdtype in queries)
    return list(await asyncio.gather(*lookups))


async def _make_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    """A resolver for the configured nameservers, or the system's (read in a thread)."""
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.port = settings.port  # before nameservers: they take the default port
        resolver.nameservers = list(settings.nameservers)
    else:
        # configure=True reads /etc/resolv.conf: file I/O, so off the event loop.
        resolver = await asyncio.to_thread(dns.asyncresolver.Resolver)
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout
    return resolver


async def _lookup(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str, bound: float
) -> _Answer:
    """Resolve one name; NXDOMAIN/NoAnswer give no values, failures give an error text."""
    try:
        async with asyncio.timeout(bound):
            answer = await resolver.resolve(name + ".", rdtype)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return _Answer()
    except (dns.exception.Timeout, TimeoutError):
        return _Answer(error=TIMEOUT)
    except Exception as exc:  # never a 500: the check reports the failure instead
        log.warning("dns-check: %s %s failed: %r", name, rdtype, exc)
        return _Answer(error=_error_text(exc))
    return _Answer(values=tuple(_rdata_text(rdata) for rdata in answer))


def _error_text(exc: BaseException) -> str:
    """The ``found`` text for a failed lookup."""
    return f"error: {type(exc).__name__}"


def _rdata_text(rdata: Any) -> str:
    """MX/CNAME as a normalised host name, TXT as its strings joined (RFC 7208 §3.3)."""
    if hasattr(rdata, "exchange"):
        return _host(rdata.exchange)
    if hasattr(rdata, "target"):
        return _host(rdata.target)
    if hasattr(rdata, "strings"):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()


def _host(name: dns.name.Name) -> str:
    """Lowercase host name without the trailing dot; the root stays '.' (null MX)."""
    return name.to_text(omit_final_dot=True).lower()


def _check(rtype: str, name: str | None, expected: Any, found: Any, ok: bool) -> dict[str, Any]:
    """One entry of the ``checks`` list."""
    return {"type": rtype, "name": name, "expected": expected, "found": found, "ok": ok}


def _mx_check(origin: str, answer: _Answer, mx_hosts: tuple[str, ...]) -> dict[str, Any]:
    """OK when every configured MX host is published, or any real MX when none is configured."""
    wanted = [dns_name(h) for h in mx_hosts]
    hosts = {h for h in answer.values if h != "."}  # "." is a null MX (RFC 7505): no mail
    ok = answer.error is None and (set(wanted) <= hosts if wanted else bool(hosts))
    return _check("MX", origin, wanted, answer.found(), ok)


def _spf_check(origin: str, answer: _Answer, spf_include: str) -> dict[str, Any]:
    """OK only with exactly one v=spf1 record (RFC 7208 §4.5) that includes spf_include."""
    records = [txt for txt in answer.values if _is_spf(txt)]
    include = f"include:{spf_include.lower().rstrip('.')}"
    ok = answer.error is None and len(records) == 1 and _has_term(records[0], include)
    found = answer.error if answer.error is not None else records
    return _check("SPF", origin, f"v=spf1 {include} ~all", found, ok)


def _is_spf(txt: str) -> bool:
    """True for an SPF record: version 'v=spf1' then a space or the end (case-insensitive)."""
    lowered = txt.lower()
    return lowered == "v=spf1" or lowered.startswith("v=spf1 ")


def _has_term(record: str, term: str) -> bool:
    """True if the record has the mechanism with a pass qualifier ('+' or none)."""
    return any(t.lower().removeprefix("+") == term for t in record.split()[1:])


def _token_check(origin: str, ses_token: str | None, answer: _Answer | None) -> dict[str, Any]:
    """OK when the SES verification token is among the _amazonses TXT strings."""
    name = f"_amazonses.{origin}"
    if not ses_token or answer is None:
        return _check("TXT", name, None, NO_TOKEN, False)
    ok = answer.error is None and ses_token in answer.values
    return _check("TXT", name, ses_token, answer.found(), ok)


def _dkim_check(token: str, origin: str, answer: _Answer) -> dict[str, Any]:
    """OK when the CNAME points at the token's SES target (case and final dot ignored)."""
    expected = _dkim_target(token)
    ok = answer.error is None and expected.lower() in answer.values
    return _check("CNAME", _dkim_name(token, origin), expected, answer.found(), ok)


def _missing_dkim_check() -> dict[str, Any]:
    """A DKIM check that cannot run yet because SES has issued no token for it."""
    return _check("CNAME", None, None, NO_DKIM_TOKEN, False)
