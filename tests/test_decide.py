"""The policy decision, one table row per SPEC §6 case, plus counting states and limits."""
from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.policy import (
    Decision,
    DomainFacts,
    Facts,
    Usage,
    decide,
    is_outbound,
    limit_decision,
    message_units,
    over_limit,
    ses_verified,
)
from policyd.protocol import PolicyRequest, to_request

EOM = "END-OF-MESSAGE"


def req(state: str = EOM, sender: str = "a@example.com", rc: int = 1, size: int = 1000,
        sasl: str = "a@example.com", recipient: str = "b@dest.org",
        request: str = "smtpd_access_policy") -> PolicyRequest:
    """A request as Postfix would send it, through the real parser."""
    return to_request({
        "request": request, "protocol_state": state, "sender": sender, "recipient": recipient,
        "recipient_count": str(rc), "size": str(size), "sasl_username": sasl,
        "client_address": "192.0.2.1", "instance": "1.2.3",
    })


def dom(name: str = "example.com", **fields: object) -> DomainFacts:
    """A hosted, active, SES-verified domain of partner 1 with no limits, unless told."""
    base = DomainFacts(name=name, partner_id=1, ses_status="success")
    return replace(base, **fields)


def out(d: DomainFacts | None = None, **fields: object) -> Facts:
    """Facts for an outbound request from domain d (the default hosted one)."""
    return Facts(sender=dom() if d is None else d, **fields)


def check(decision: Decision, action: str, reason: str, count: int = 0, nbytes: int = 0,
          count_domain: str | None = None, limited: bool = False) -> None:
    """Assert every field; action is matched as a prefix, its text must stay one line."""
    assert decision.action.startswith(action), decision.action
    assert "\n" not in decision.action and "\r" not in decision.action
    assert (decision.reason, decision.count, decision.bytes, decision.count_domain,
            refused_by_limit(decision)) == (reason, count, nbytes, count_domain, limited)


def refused_by_limit(decision: Decision) -> bool:
    """A hard limit refused it: a DEFER for a quota or transfer reason."""
    return decision.action.startswith("DEFER") and decision.reason in (
        "quota_daily", "quota_monthly", "transfer")


OUTBOUND_CASES = [
    # (id, request, facts, action, reason, count, bytes, count_domain)
    ("null-sender", req(sender="<>"), out(), "DUNNO", "null_sender", 0, 0, None),
    ("null-sender-empty", req(sender=""), Facts(), "DUNNO", "null_sender", 0, 0, None),
    ("not-hosted", req(), Facts(), "REJECT 5.7.1 Sender domain example.com is not hosted",
     "not_hosted", 0, 0, None),
    ("not-hosted-no-domain", req(sender="postmaster"), Facts(), "REJECT 5.7.1 Sender address",
     "not_hosted", 0, 0, None),
    ("login-other-partner", req(), out(login_partner_known=True, login_partner_id=2),
     "REJECT 5.7.1 Sender domain example.com does not belong", "login_mismatch", 0, 0, None),
    ("login-master-vs-partner", req(), out(login_partner_known=True, login_partner_id=None),
     "REJECT 5.7.1", "login_mismatch", 0, 0, None),
    ("login-same-partner", req(), out(login_partner_known=True, login_partner_id=1),
     "DUNNO", "allowed", 1, 1000, "example.com"),
    ("login-both-master", req(), out(dom(partner_id=None), login_partner_known=True,
                                     login_partner_id=None),
     "DUNNO", "allowed", 1, 1000, "example.com"),
    ("login-domain-not-hosted", req(sasl="a@elsewhere.net"), out(login_partner_known=False),
     "DUNNO", "allowed", 1, 1000, "example.com"),
    ("login-mismatch-before-suspended", req(),
     out(dom(status="suspended"), login_partner_known=True, login_partner_id=2),
     "REJECT 5.7.1", "login_mismatch", 0, 0, None),
    ("suspended", req(), out(dom(status="suspended")),
     "DEFER 4.7.1 Domain example.com is suspended", "suspended", 0, 0, None),
    ("suspended-before-ses", req(), out(dom(status="suspended", ses_status="failed")),
     "DEFER 4.7.1", "suspended", 0, 0, None),
    ("ses-pending", req(), out(dom(ses_status="pending")),
     "REJECT 5.7.1 Sender domain example.com is not verified", "ses_unverified", 0, 0, None),
    ("ses-not-started", req(), out(dom(ses_status="not_started")),
     "REJECT 5.7.1", "ses_unverified", 0, 0, None),
    ("ses-failed", req(), out(dom(ses_status="failed")),
     "REJECT 5.7.1", "ses_unverified", 0, 0, None),
    ("ses-temporary-failure", req(), out(dom(ses_status="temporary_failure")),
     "REJECT 5.7.1", "ses_unverified", 0, 0, None),
    ("ses-inherited-no-parent", req(), out(dom(ses_status="inherited")),
     "REJECT 5.7.1", "ses_unverified", 0, 0, None),
    ("ses-inherited-parent-pending", req(),
     out(dom(ses_status="inherited", parent_ses_status="pending")),
     "REJECT 5.7.1", "ses_unverified", 0, 0, None),
    ("ses-inherited-parent-success", req(sender="a@sub.example.com"),
     out(dom("sub.example.com", ses_status="inherited", parent_ses_status="success")),
     "DUNNO", "allowed", 1, 1000, "sub.example.com"),
    ("ses-own-pending-parent-success", req(),
     out(dom(ses_status="pending", parent_ses_status="success")),
     "DUNNO", "allowed", 1, 1000, "example.com"),
    ("ses-before-blocked", req(), out(dom(ses_status="failed", out_status="blocked")),
     "REJECT 5.7.1", "ses_unverified", 0, 0, None),
    ("out-blocked", req(), out(dom(out_status="blocked")),
     "REJECT 5.7.1 Outbound mail from example.com is blocked", "blocked", 0, 0, None),
    ("out-suspended", req(), out(dom(out_status="suspended")),
     "REJECT 5.7.1 Outbound mail from example.com is suspended", "out_suspended", 0, 0, None),
    ("allowed", req(), out(), "DUNNO", "allowed", 1, 1000, "example.com"),
    ("allowed-many-recipients", req(rc=5), out(), "DUNNO", "allowed", 5, 5000, "example.com"),
    ("allowed-zero-recipients-counts-one", req(rc=0), out(),
     "DUNNO", "allowed", 1, 1000, "example.com"),
    ("allowed-no-size", req(size=0), out(), "DUNNO", "allowed", 1, 0, "example.com"),
    ("not-a-policy-request", req(request="junk"), out(), "DUNNO", "no_rule", 0, 0, None),
    ("state-connect", req(state="CONNECT"), Facts(), "DUNNO", "no_rule", 0, 0, None),
    ("state-vrfy", req(state="VRFY"), Facts(), "DUNNO", "no_rule", 0, 0, None),
    ("state-missing", req(state=""), Facts(), "DUNNO", "no_rule", 0, 0, None),
]


@pytest.mark.parametrize(("request_", "facts", "action", "reason", "count", "nbytes", "domain"),
                         [case[1:] for case in OUTBOUND_CASES],
                         ids=[case[0] for case in OUTBOUND_CASES])
def test_outbound(request_: PolicyRequest, facts: Facts, action: str, reason: str, count: int,
                  nbytes: int, domain: str | None) -> None:
    decision = decide(request_, facts, outbound=True)
    check(decision, action, reason, count, nbytes, domain)


def test_not_hosted_reply_never_echoes_unsafe_text() -> None:
    decision = decide(req(sender="a@ex\x07ample\u00e9" + "x" * 400), Facts(), outbound=True)
    assert decision.action.isascii() and decision.action.isprintable()
    assert len(decision.action) < 320


# Each limit at its boundary: "at" is used + count == limit (allowed), "over" is one more.
LIMITS = {
    "quota_daily": (dict(daily_limit=10), Usage(sent_today=9), Usage(sent_today=10)),
    "quota_monthly": (dict(monthly_limit=100), Usage(sent_month=99), Usage(sent_month=100)),
    "transfer": (dict(transfer_limit_bytes=10_000), Usage(bytes_month=9_000),
                 Usage(bytes_month=9_001)),
}


@pytest.mark.parametrize("enforcement", ["hard", "soft", "off"])
@pytest.mark.parametrize("kind", list(LIMITS))
def test_limit_boundary_is_allowed(kind: str, enforcement: str) -> None:
    limits, at, _ = LIMITS[kind]
    facts = out(dom(enforcement=enforcement, **limits), counters=at)
    check(decide(req(), facts, outbound=True), "DUNNO", "allowed", 1, 1000, "example.com")


@pytest.mark.parametrize(
    ("enforcement", "action", "count", "nbytes", "domain", "limited"),
    [
        ("hard", "DEFER 4.7.1", 0, 0, None, True),
        ("soft", "WARN", 1, 1000, "example.com", False),
        ("off", "DUNNO", 1, 1000, "example.com", False),
    ],
)
@pytest.mark.parametrize("kind", list(LIMITS))
def test_limit_exceeded(kind: str, enforcement: str, action: str, count: int, nbytes: int,
                        domain: str | None, limited: bool) -> None:
    limits, _, over = LIMITS[kind]
    facts = out(dom(enforcement=enforcement, **limits), counters=over)
    decision = decide(req(), facts, outbound=True)
    check(decision, action, kind, count, nbytes, domain, limited)
    if enforcement != "off":
        assert "example.com" in decision.action


def test_limits_are_checked_daily_monthly_transfer_in_that_order() -> None:
    d = dom(daily_limit=1, monthly_limit=1, transfer_limit_bytes=1)
    full = Usage(sent_today=1, sent_month=1, bytes_month=1)
    assert over_limit(full, 1, 1, d) == "quota_daily"
    assert over_limit(full, 1, 1, replace(d, daily_limit=None)) == "quota_monthly"
    assert over_limit(full, 1, 1, replace(d, daily_limit=None, monthly_limit=None)) == "transfer"
    assert over_limit(full, 1, 1, dom()) is None


@pytest.mark.parametrize(
    ("usage", "count", "nbytes", "expected"),
    [
        (Usage(5, 5, 5), 5, 5, None),
        (Usage(5, 5, 5), 6, 0, "quota_daily"),
        (Usage(0, 95, 0), 6, 0, "quota_monthly"),
        (Usage(0, 0, 5), 0, 6, "transfer"),
        (Usage(11, 0, 0), 0, 0, "quota_daily"),  # already over (a lowered limit)
    ],
)
def test_over_limit(usage: Usage, count: int, nbytes: int, expected: str | None) -> None:
    d = dom(daily_limit=10, monthly_limit=100, transfer_limit_bytes=10)
    assert over_limit(usage, count, nbytes, d) == expected


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 5000),
       st.one_of(st.none(), st.integers(0, 50)), st.one_of(st.none(), st.integers(0, 50)),
       st.one_of(st.none(), st.integers(0, 20_000)), st.integers(0, 5), st.integers(0, 1000))
def test_decide_refuses_exactly_when_over_limit(
        sent_today: int, sent_month: int, bytes_month: int, daily: int | None,
        monthly: int | None, transfer: int | None, rc: int, size: int) -> None:
    """The store's conditional increment uses over_limit: decide must agree with it."""
    usage = Usage(sent_today, sent_month, bytes_month)
    d = dom(daily_limit=daily, monthly_limit=monthly, transfer_limit_bytes=transfer)
    request = req(rc=rc, size=size)
    decision = decide(request, out(d, counters=usage), outbound=True)
    reason = over_limit(usage, *message_units(request), d)
    assert refused_by_limit(decision) == (reason is not None)
    assert decision.count == (0 if reason else max(rc, 1))


@pytest.mark.parametrize(
    ("enforcement", "action", "limited"),
    [("hard", "DEFER 4.7.1 Daily sending limit", True),
     ("soft", "WARN Daily sending limit", False),
     ("off", "DUNNO", False)],
)
def test_limit_decision_for_a_lost_race(enforcement: str, action: str, limited: bool) -> None:
    decision = limit_decision("quota_daily", dom(enforcement=enforcement), 0, 0)
    check(decision, action, "quota_daily", limited=limited)


# Counting state x count_at. rc=3, size=100. "at" states count; earlier states ask "would it
# fit if counted now" (1 at RCPT, 3 at DATA/END-OF-MESSAGE, and MAIL asks for 1); later
# states were already counted and are not checked again.
STATE_CASES = [
    # (count_at, state, sent_today, daily_limit, action, reason, count, bytes, domain, limited)
    (EOM, "MAIL", 9, 10, "DUNNO", "allowed", 0, 0, None, False),
    (EOM, "MAIL", 10, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    (EOM, "RCPT", 9, 10, "DUNNO", "allowed", 0, 0, None, False),
    (EOM, "RCPT", 10, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    (EOM, "DATA", 7, 10, "DUNNO", "allowed", 0, 0, None, False),
    (EOM, "DATA", 8, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    (EOM, EOM, 7, 10, "DUNNO", "allowed", 3, 300, "example.com", False),
    (EOM, EOM, 8, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    ("DATA", "RCPT", 9, 10, "DUNNO", "allowed", 0, 0, None, False),
    ("DATA", "DATA", 7, 10, "DUNNO", "allowed", 3, 300, "example.com", False),
    ("DATA", "DATA", 8, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    ("DATA", EOM, 10, 10, "DUNNO", "allowed", 0, 0, None, False),
    ("RCPT", "MAIL", 10, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    ("RCPT", "RCPT", 9, 10, "DUNNO", "allowed", 1, 100, "example.com", False),
    ("RCPT", "RCPT", 10, 10, "DEFER 4.7.1", "quota_daily", 0, 0, None, True),
    ("RCPT", "DATA", 10, 10, "DUNNO", "allowed", 0, 0, None, False),
    ("RCPT", EOM, 10, 10, "DUNNO", "allowed", 0, 0, None, False),
]


@pytest.mark.parametrize(
    ("count_at", "state", "sent", "limit", "action", "reason", "count", "nbytes", "domain",
     "limited"),
    STATE_CASES,
    ids=[f"{c[0]}-at-{c[1]}-{c[2]}of{c[3]}" for c in STATE_CASES],
)
def test_counting_states(count_at: str, state: str, sent: int, limit: int, action: str,
                         reason: str, count: int, nbytes: int, domain: str | None,
                         limited: bool) -> None:
    facts = out(dom(daily_limit=limit), counters=Usage(sent_today=sent))
    decision = decide(req(state=state, rc=3, size=100), facts, count_at=count_at, outbound=True)
    check(decision, action, reason, count, nbytes, domain, limited)


@pytest.mark.parametrize("enforcement", ["soft", "off"])
def test_soft_and_off_over_limit_before_count_at_count_nothing(enforcement: str) -> None:
    facts = out(dom(daily_limit=1, enforcement=enforcement), counters=Usage(sent_today=1))
    decision = decide(req(state="RCPT"), facts, outbound=True)
    assert (decision.reason, decision.count, decision.bytes, decision.count_domain) == (
        "quota_daily", 0, 0, None)


def test_non_quota_checks_still_run_after_count_at() -> None:
    facts = out(dom(ses_status="failed"))
    check(decide(req(state=EOM), facts, count_at="RCPT", outbound=True),
          "REJECT 5.7.1", "ses_unverified")


def test_count_at_must_be_a_counting_state() -> None:
    with pytest.raises(ValueError, match="count_at"):
        decide(req(), out(), count_at="MAIL", outbound=True)


INBOUND = dict(sasl="", sender="someone@external.net", recipient="b@dest.org", size=1000)
INBOUND_CASES = [
    # (id, count_at, state, rc, recipient facts, suspended_inbound, action, reason, bytes, domain)
    ("not-hosted", EOM, EOM, 1, None, "hold", "DUNNO", "no_rule", 0, None),
    ("counted-at-eom", EOM, EOM, 2, dom("dest.org"), "hold", "DUNNO", "inbound", 2000,
     "dest.org"),
    ("zero-recipients-counts-one", EOM, EOM, 0, dom("dest.org"), "hold", "DUNNO", "inbound",
     1000, "dest.org"),
    ("rcpt-before-eom", EOM, "RCPT", 1, dom("dest.org"), "hold", "DUNNO", "inbound", 0, None),
    ("counted-at-data", "DATA", "DATA", 3, dom("dest.org"), "hold", "DUNNO", "inbound", 3000,
     "dest.org"),
    ("eom-after-data", "DATA", EOM, 3, dom("dest.org"), "hold", "DUNNO", "inbound", 0, None),
    ("counted-at-rcpt-declared-size", "RCPT", "RCPT", 3, dom("dest.org"), "hold", "DUNNO",
     "inbound", 1000, "dest.org"),
    ("mail-state", EOM, "MAIL", 0, dom("dest.org"), "hold", "DUNNO", "inbound", 0, None),
    ("suspended-hold", EOM, EOM, 1, dom("dest.org", status="suspended"), "hold",
     "HOLD Domain dest.org is suspended", "inbound_suspended", 0, None),
    ("suspended-hold-at-rcpt", EOM, "RCPT", 1, dom("dest.org", status="suspended"), "hold",
     "HOLD", "inbound_suspended", 0, None),
    ("suspended-defer", EOM, EOM, 1, dom("dest.org", status="suspended"), "defer",
     "DEFER 4.7.1 Domain dest.org is suspended", "inbound_suspended", 0, None),
    ("unverified-and-blocked-ignored", EOM, EOM, 1,
     dom("dest.org", ses_status="failed", out_status="blocked", daily_limit=0), "hold",
     "DUNNO", "inbound", 1000, "dest.org"),
]


@pytest.mark.parametrize(
    ("count_at", "state", "rc", "recipient", "suspended_inbound", "action", "reason", "nbytes",
     "domain"),
    [case[1:] for case in INBOUND_CASES],
    ids=[case[0] for case in INBOUND_CASES],
)
def test_inbound(count_at: str, state: str, rc: int, recipient: DomainFacts | None,
                 suspended_inbound: str, action: str, reason: str, nbytes: int,
                 domain: str | None) -> None:
    request = req(state=state, rc=rc, **INBOUND)
    facts = Facts(sender=None, recipient=recipient)
    decision = decide(request, facts, count_at=count_at, suspended_inbound=suspended_inbound,
                      outbound=False)
    check(decision, action, reason, 0, nbytes, domain)


def test_inbound_bounce_with_null_sender_is_counted() -> None:
    request = req(sender="<>", **{k: v for k, v in INBOUND.items() if k != "sender"})
    decision = decide(request, Facts(recipient=dom("dest.org")), outbound=False)
    check(decision, "DUNNO", "inbound", 0, 1000, "dest.org")


@pytest.mark.parametrize(
    ("own", "parent", "verified"),
    [("success", None, True), ("inherited", "success", True), ("pending", "success", True),
     ("inherited", None, False), ("inherited", "failed", False), ("failed", None, False)],
)
def test_ses_verified(own: str, parent: str | None, verified: bool) -> None:
    assert ses_verified(own, parent) is verified
    assert dom(ses_status=own, parent_ses_status=parent).ses_verified is verified


NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
V6_ONLY = (ipaddress.ip_network("2001:db8::/32"),)


@pytest.mark.parametrize(
    ("sasl", "client", "trusted", "expected"),
    [
        ("a@example.com", "203.0.113.9", (), True),
        ("a@example.com", "garbage", NETS, True),
        ("", "10.1.2.3", (), False),
        ("", "10.1.2.3", NETS, True),
        ("", "192.0.2.1", NETS, False),
        ("", "2001:db8::1", NETS, True),
        ("", "2001:DB8:0:0::25", NETS, True),
        ("", "2001:db9::1", NETS, False),
        ("", "::ffff:10.1.2.3", NETS, True),
        ("", "10.1.2.3", V6_ONLY, False),
        ("", "unknown", NETS, False),
        ("", "", NETS, False),
        ("", "10.0.0.256", NETS, False),
        ("", "[10.0.0.1]", NETS, False),
        ("", "10.0.0.1/8", NETS, False),
    ],
    ids=["sasl", "sasl-garbage-client", "no-trusted", "trusted-v4", "untrusted-v4",
         "trusted-v6", "trusted-v6-uppercase", "untrusted-v6", "v4-mapped", "v4-vs-v6-net",
         "unknown", "empty", "bad-octet", "brackets", "cidr-not-address"],
)
def test_is_outbound(sasl: str, client: str, trusted: tuple, expected: bool) -> None:
    request = to_request({"sasl_username": sasl, "client_address": client})
    assert is_outbound(request, trusted) is expected


@given(st.text(max_size=60))
def test_is_outbound_never_raises(client: str) -> None:
    request = to_request({"client_address": client})
    assert is_outbound(request, NETS) in (True, False)
