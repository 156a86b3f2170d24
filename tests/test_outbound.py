"""Outbound control through the API: tiers, client permissions, audit, wildcard inheritance,
REST increments (SPEC §2 [outbound]/[tiers], §3, §4 outbound rows, §6)."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Daemon, start_daemon

OUT = "/domains/example.com/outbound"
INC = "/domains/example.com/outbound/increment"


async def client_of(daemon: Daemon, *domains: str) -> str:
    """A partner's key owning the given (verified) domains."""
    partner = await daemon.partner()
    token = await daemon.key(partner["id"])
    for name in domains:
        await daemon.domain(name, token=token)
    return token


async def put(daemon: Daemon, body: Any, token: str | None = None,
              path: str = OUT) -> tuple[int, Any]:
    """PUT the outbound resource as the master (or token)."""
    if token is None:
        return await daemon.api("PUT", path, body)
    return await daemon.api("PUT", path, body, token=token)


async def audited(daemon: Daemon, action: str | None = None,
                  target: str = "example.com") -> list[dict[str, Any]]:
    """GET /audit?target=: the entries of target (optionally of one action), oldest first."""
    status, body = await daemon.api("GET", f"/audit?target={target}&limit=1000")
    assert status == 200, body
    return [e for e in body["items"] if action is None or e["action"] == action]


def limits(body: dict[str, Any]) -> tuple[Any, Any, Any]:
    return body["tier"], body["daily_limit"], body["monthly_limit"]


# --- tiers -------------------------------------------------------------------------------

@pytest.mark.parametrize(("tier", "daily", "monthly"), [
    ("trial", 100, 1000), ("standard", 1000, 30000), ("pro", 10000, 300000),
    ("unlimited", None, None)])
async def test_setting_a_builtin_tier_sets_its_limits(daemon, tier, daily, monthly):
    await daemon.domain("example.com")
    await put(daemon, {"daily_limit": 7, "monthly_limit": 8})
    status, body = await put(daemon, {"tier": tier})
    assert status == 200, body
    assert limits(body) == (tier, daily, monthly)
    assert limits((await daemon.api("GET", OUT))[1]) == (tier, daily, monthly)


async def test_new_domain_gets_standard_and_the_full_resource(daemon):
    await daemon.domain("example.com")
    status, body = await daemon.api("GET", OUT)
    assert status == 200
    assert body | {"bounce_rate": 0.0} == {
        "domain": "example.com", "tier": "standard", "daily_limit": 1000,
        "monthly_limit": 30000, "enforcement": "hard", "status": "active", "sent_today": 0,
        "sent_month": 0, "bytes_month": 0, "bounces": 0, "complaints": 0, "bounce_rate": 0.0,
        "complaint_rate": 0.0, "inherited_from": None}
    assert (await daemon.api("GET", "/domains/example.com"))[1]["outbound"]["tier"] == "standard"


async def test_limits_in_the_same_request_apply_after_the_tier(daemon):
    await daemon.domain("example.com")
    status, body = await put(daemon, {"daily_limit": 5, "tier": "pro"})
    assert status == 200 and limits(body) == ("pro", 5, 300000)
    status, body = await put(daemon, {"tier": "trial", "monthly_limit": None})
    assert limits(body) == ("trial", 100, None)


async def test_config_tiers_add_and_override_and_default_tier(make_config):
    config = make_config(tiers={"gold": "5000/-", "standard": "2000/40000"},
                         outbound={"default_tier": "gold"})
    daemon = await start_daemon(config)
    try:
        await daemon.domain("example.com")
        assert limits((await daemon.api("GET", OUT))[1]) == ("gold", 5000, None)
        assert limits((await put(daemon, {"tier": "standard"}))[1]) == ("standard", 2000, 40000)
        assert limits((await put(daemon, {"tier": "trial"}))[1]) == ("trial", 100, 1000)
        status, body = await put(daemon, {"tier": "platinum"})
        assert status == 400 and body["error"]["code"] == "invalid"
    finally:
        await daemon.stop()


# --- master validation and audit ---------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"tier": "nope"}, {"tier": 12345}, {"tier": ["pro"]}, {"tier": {"a": 1}}, {"tier": None},
    {"daily_limit": -1}, {"daily_limit": "10"}, {"daily_limit": 1.5}, {"daily_limit": True},
    {"monthly_limit": 2**63}, {"monthly_limit": [1]}, {"enforcement": "strict"},
    {"enforcement": None}, {"enforcement": ["hard"]}, {"status": "deleted"}, {"status": 1},
    {"status": {"x": 1}}, {"bogus": 1}, [1, 2],
])
async def test_master_invalid_values_are_400_and_change_nothing(daemon, body):
    await daemon.domain("example.com")
    before = (await daemon.api("GET", OUT))[1]
    status, reply = await put(daemon, body)
    assert status == 400 and reply["error"]["code"] == "invalid", reply
    assert (await daemon.api("GET", OUT))[1] == before


async def test_master_may_set_any_limit_and_changes_are_audited(daemon):
    await daemon.domain("example.com")
    status, body = await put(daemon, {"daily_limit": 999999, "enforcement": "soft"})
    assert status == 200 and body["daily_limit"] == 999999 and body["enforcement"] == "soft"
    [entry] = await audited(daemon, "outbound.update")
    assert entry["actor"] == "master" and entry["target"] == "example.com"
    assert entry["before"] == {"out_daily_limit": 1000, "out_enforcement": "hard"}
    assert entry["after"] == {"out_daily_limit": 999999, "out_enforcement": "soft"}


async def test_audit_endpoint_shows_outbound_changes(daemon):
    await daemon.domain("example.com")
    await put(daemon, {"tier": "pro"})
    status, audit = await daemon.api("GET", "/audit?target=example.com")
    assert status == 200, audit
    entry = [e for e in audit["items"] if e["action"] == "outbound.update"][-1]
    assert entry["before"]["out_tier"] == "standard" and entry["after"]["out_tier"] == "pro"


async def test_an_unchanged_put_writes_no_audit_entry(daemon):
    await daemon.domain("example.com")
    _, body = await daemon.api("GET", OUT)
    assert (await put(daemon, body))[0] == 200
    assert await audited(daemon, "outbound.update") == []


# --- client permissions ------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"tier": "pro"}, {"tier": 12345}, {"tier": ["pro"]}, {"enforcement": "off"},
    {"enforcement": 7}, {"status": "active", "enforcement": "soft"}, {"status": "blocked"},
    {"daily_limit": 1001}, {"monthly_limit": 30001}, {"daily_limit": None},
    {"monthly_limit": None}, {"daily_limit": 2**70}, {"daily_limit": "x", "tier": "pro"},
    {"daily_limit": "x", "monthly_limit": 10**6},
])
async def test_client_forbidden_changes_are_403_before_validation(daemon, body):
    token = await client_of(daemon, "example.com")
    before = (await daemon.api("GET", OUT))[1]
    status, reply = await put(daemon, body, token)
    assert status == 403 and reply["error"]["code"] == "forbidden", reply
    assert (await daemon.api("GET", OUT))[1] == before


@pytest.mark.parametrize("body", [{"daily_limit": -1}, {"daily_limit": "10"},
                                  {"monthly_limit": 1.0}, {"daily_limit": True}, {"x": 1}])
async def test_client_invalid_limits_are_400(daemon, body):
    token = await client_of(daemon, "example.com")
    status, reply = await put(daemon, body, token)
    assert status == 400 and reply["error"]["code"] == "invalid", reply


async def test_client_may_put_back_what_it_read_and_lower_limits(daemon):
    token = await client_of(daemon, "example.com")
    await daemon.api("POST", INC, {"count": 3})
    _, read = await daemon.api("GET", OUT, token=token)
    status, body = await put(daemon, read, token)
    assert status == 200 and body == read
    status, body = await put(daemon, {"daily_limit": 1000, "monthly_limit": 10}, token)
    assert status == 200 and limits(body) == ("standard", 1000, 10)
    assert await audited(daemon, "outbound.update") == []


async def test_client_keeps_a_master_limit_above_its_tier_only_unchanged(daemon):
    token = await client_of(daemon, "example.com")
    await put(daemon, {"daily_limit": 5000})
    assert (await put(daemon, {"daily_limit": 5000, "tier": "standard"}, token))[0] == 200
    assert (await put(daemon, {"daily_limit": 4000}, token))[0] == 403
    assert (await put(daemon, {"daily_limit": 900}, token))[0] == 200


async def test_client_resending_its_tier_does_not_reset_master_limits(daemon):
    token = await client_of(daemon, "example.com")
    await put(daemon, {"daily_limit": 10})
    status, body = await put(daemon, {"tier": "standard", "status": "active"}, token)
    assert status == 200 and limits(body) == ("standard", 10, 30000)


async def test_client_ceilings_follow_the_current_tier(daemon):
    token = await client_of(daemon, "example.com")
    await put(daemon, {"tier": "unlimited"})
    status, body = await put(daemon, {"daily_limit": 10**7, "monthly_limit": None}, token)
    assert status == 200 and limits(body) == ("unlimited", 10**7, None)
    await put(daemon, {"tier": "trial"})
    assert (await put(daemon, {"daily_limit": 100}, token))[0] == 200
    assert (await put(daemon, {"daily_limit": 101}, token))[0] == 403


async def test_only_the_master_unblocks(daemon):
    token = await client_of(daemon, "example.com")
    assert (await put(daemon, {"status": "blocked"}))[1]["status"] == "blocked"
    status, _ = await put(daemon, {"status": "active"}, token)
    assert status == 403
    assert (await daemon.api("GET", OUT))[1]["status"] == "blocked"
    assert (await put(daemon, {"status": "blocked"}, token))[0] == 200  # unchanged: allowed
    assert (await put(daemon, {"status": "active"}))[1]["status"] == "active"
    changes = [(e["before"], e["after"]) for e in await audited(daemon, "outbound.update")]
    assert changes == [({"out_status": "active"}, {"out_status": "blocked"}),
                       ({"out_status": "blocked"}, {"out_status": "active"})]


async def test_other_partners_domain_is_404(daemon):
    await daemon.domain("example.com")
    token = await client_of(daemon, "mine.test")
    for method, path, body in (("GET", OUT, None), ("PUT", OUT, {"daily_limit": 1}),
                               ("GET", OUT + "/history", None)):
        status, reply = await daemon.api(method, path, body, token=token)
        assert status == 404 and reply["error"]["code"] == "not_found"


# --- wildcard subdomains -----------------------------------------------------------------

async def wildcard_pair(daemon: Daemon, token: str | None = None) -> None:
    """example.com (wildcard) and its linked sub.example.com."""
    kwargs = {} if token is None else {"token": token}
    await daemon.domain("example.com", **kwargs)
    status, _ = await daemon.api("PUT", "/domains/example.com/parent", {"wildcard": True})
    assert status == 200
    await daemon.domain("sub.example.com", **kwargs)


async def test_linked_subdomain_shows_and_uses_the_parents_settings(daemon):
    await wildcard_pair(daemon)
    sub = "/domains/sub.example.com/outbound"
    await put(daemon, {"tier": "trial", "daily_limit": 2, "enforcement": "hard"})
    status, body = await daemon.api("GET", sub)
    assert status == 200 and body["inherited_from"] == "example.com"
    assert (limits(body), body["enforcement"]) == (("trial", 2, 1000), "hard")
    replies = [(await daemon.api("POST", sub + "/increment", {"count": 1}))[1]["allowed"]
               for _ in range(3)]
    assert replies == [True, True, False]
    assert (await daemon.api("GET", OUT))[1]["sent_today"] == 0  # its own counters
    await put(daemon, {"enforcement": "soft"})
    assert (await daemon.api("GET", sub))[1]["enforcement"] == "soft"
    assert (await daemon.api("GET", "/domains/sub.example.com"))[1]["outbound"]["tier"] == "trial"


async def test_linked_subdomain_refuses_own_limits_but_takes_its_own_status(daemon):
    token = await client_of(daemon)
    await wildcard_pair(daemon, token)
    sub = "/domains/sub.example.com/outbound"
    _, read = await daemon.api("GET", sub, token=token)
    assert (await put(daemon, read, token, sub))[0] == 200
    assert (await put(daemon, read, None, sub))[0] == 200
    status, body = await put(daemon, {"daily_limit": 5}, None, sub)
    assert status == 400 and "example.com" in body["error"]["message"]
    assert (await put(daemon, {"tier": "pro"}, token, sub))[0] == 403
    status, body = await put(daemon, {"status": "suspended"}, None, sub)
    assert status == 200 and body["status"] == "suspended"
    assert (await daemon.api("GET", OUT))[1]["status"] == "active"


# --- REST increments ---------------------------------------------------------------------

async def increment(daemon: Daemon, count: int, **extra: Any) -> dict[str, Any]:
    status, body = await daemon.api("POST", INC, {"count": count, **extra})
    assert status == 200, body
    return body


async def test_increment_counts_and_hard_refusal_changes_nothing(daemon):
    await daemon.domain("example.com")
    await put(daemon, {"daily_limit": 5, "monthly_limit": 100})
    assert await increment(daemon, 3, bytes=300) == {
        "allowed": True, "sent_today": 3, "sent_month": 3}
    assert await increment(daemon, 3) == {"allowed": False, "sent_today": 3, "sent_month": 3,
                                          "reason": "quota_daily"}
    assert (await increment(daemon, 2))["allowed"] is True
    _, out = await daemon.api("GET", OUT)
    assert (out["sent_today"], out["sent_month"], out["bytes_month"]) == (5, 5, 300)


async def test_increment_monthly_and_transfer_limits(daemon):
    await daemon.domain("example.com")
    await put(daemon, {"daily_limit": None, "monthly_limit": 4})
    assert (await increment(daemon, 5))["reason"] == "quota_monthly"
    await put(daemon, {"monthly_limit": None})
    await daemon.api("PUT", "/domains/example.com/transfer", {"monthly_limit_bytes": 100})
    assert (await increment(daemon, 1, bytes=101)) == {
        "allowed": False, "sent_today": 0, "sent_month": 0, "reason": "transfer"}
    assert (await increment(daemon, 1, bytes=100))["allowed"] is True


@pytest.mark.parametrize("enforcement", ["soft", "off"])
async def test_soft_and_off_count_over_the_limit_with_a_reason(daemon, enforcement):
    await daemon.domain("example.com")
    await put(daemon, {"daily_limit": 1, "enforcement": enforcement})
    assert await increment(daemon, 2) == {"allowed": True, "sent_today": 2, "sent_month": 2,
                                          "reason": "quota_daily"}


@pytest.mark.parametrize(("setup", "reason"), [
    ("unverified", "ses_unverified"), ("suspended", "suspended"),
    ("blocked", "blocked"), ("out_suspended", "out_suspended")])
async def test_domains_that_may_not_send_are_refused_with_a_reason(daemon, setup, reason):
    await daemon.domain("example.com", verified=setup != "unverified")
    if setup == "suspended":
        assert (await daemon.api("PUT", "/domains/example.com/suspend"))[0] == 200
    elif setup in ("blocked", "out_suspended"):
        await put(daemon, {"status": "blocked" if setup == "blocked" else "suspended"})
    assert await increment(daemon, 1) == {"allowed": False, "sent_today": 0, "sent_month": 0,
                                          "reason": reason}


@pytest.mark.parametrize("body", [
    {"count": 0}, {"count": -1}, {"count": True}, {"count": "1"}, {"count": 1.0},
    {"count": 10**9 + 1}, {"count": 10**30}, {"count": None}, {}, {"count": 1, "bytes": -1},
    {"count": 1, "bytes": "9"}, {"count": 1, "bytes": 2**80}, {"count": 1, "bytes": False},
    {"count": 1, "extra": 1}, [1],
])
async def test_increment_bad_input_is_400_and_counts_nothing(daemon, body):
    await daemon.domain("example.com")
    status, reply = await daemon.api("POST", INC, body)
    assert status == 400 and reply["error"]["code"] == "invalid", reply
    assert (await daemon.api("GET", OUT))[1]["sent_today"] == 0


async def test_increment_is_master_only_and_404_for_unknown_domains(daemon):
    token = await client_of(daemon, "example.com")
    status, reply = await daemon.api("POST", INC, {"count": 1}, token=token)
    assert status == 403 and reply["error"]["code"] == "forbidden"
    status, _ = await daemon.api("POST", "/domains/missing.test/outbound/increment", {"count": 1})
    assert status == 404
    assert (await daemon.api("GET", OUT))[1]["sent_today"] == 0


async def test_rest_increments_are_never_audited(daemon):
    await daemon.domain("example.com")
    before = await audited(daemon)  # the master's domain creation is audited
    await increment(daemon, 1)
    assert await audited(daemon) == before


async def test_concurrent_increments_never_overshoot(daemon):
    await daemon.domain("example.com")
    await put(daemon, {"daily_limit": 37})
    replies = await asyncio.gather(*(daemon.api("POST", INC, {"count": 1}) for _ in range(60)))
    assert sum(body["allowed"] for _, body in replies) == 37
    assert (await daemon.api("GET", OUT))[1]["sent_today"] == 37
