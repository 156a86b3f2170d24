"""Senders (SPEC §9): per-login hourly and daily limits and the stolen-password lock, through
the real policy port and API on a real SQLite file; the pure decision's rules in a table."""
from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from policyd import passwords
from policyd.config import Config
from policyd.policy import DomainFacts, Facts, SenderFacts, Usage, decide
from policyd.protocol import to_request
from policyd.senders import AddressTracker, address_group
from policyd.store import connect
from tests.conftest import MASTER, Daemon, PolicyClient, outbound, start_daemon
from tests.hookserver import HookReceiver, notifier_running

DOMAIN = "send.example"
BOB, EVE = f"bob@{DOMAIN}", f"eve@{DOMAIN}"


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passwords, "ROUNDS", 4)


# --- the decision, pure -----------------------------------------------------------------

HOSTED = DomainFacts(name=DOMAIN, partner_id=1, ses_status="success")


def _decide(login: SenderFacts | None, *, state: str = "END-OF-MESSAGE", rcpt: int = 1,
            domain: DomainFacts = HOSTED, usage: Usage = Usage(),
            locked_reply: str = "reject") -> Any:
    req = to_request({"request": "smtpd_access_policy", "protocol_state": state,
                      "sender": BOB, "sasl_username": BOB, "recipient_count": str(rcpt),
                      "size": "100"})
    facts = Facts(sender=domain, login_partner_known=True, login_partner_id=1,
                  counters=usage, login=login)
    return decide(req, facts, locked_reply=locked_reply, outbound=True)


@pytest.mark.parametrize(("login", "kw", "action", "reason", "count"), [
    (None, {}, "DUNNO", "allowed", 1),
    (SenderFacts(BOB, 3, None, sent_hour=2), {}, "DUNNO", "allowed", 1),
    (SenderFacts(BOB, 3, None, sent_hour=3), {}, "DEFER 4.7.1 Hourly sending limit of 3",
     "sender_hourly", 0),
    (SenderFacts(BOB, None, 10, sent_today=8), {"rcpt": 3}, "DEFER 4.7.1 Daily sending "
     "limit of 10", "sender_daily", 0),
    (SenderFacts(BOB, None, 10, sent_today=7), {"rcpt": 3}, "DUNNO", "allowed", 3),
    # whatever the domain's enforcement: soft would pass over its own quota, not the login's
    (SenderFacts(BOB, 1, None, sent_hour=1), {"domain": replace(HOSTED, enforcement="soft")},
     "DEFER 4.7.1 Hourly", "sender_hourly", 0),
    # the same "would it fit" question before the counting state, counting nothing
    (SenderFacts(BOB, 1, None, sent_hour=1), {"state": "RCPT"}, "DEFER 4.7.1 Hourly",
     "sender_hourly", 0),
    (SenderFacts(BOB, 1, None, sent_hour=0), {"state": "RCPT"}, "DUNNO", "allowed", 0),
    (SenderFacts(BOB, locked=True), {}, "REJECT 5.7.1 Sender bob@send.example is locked",
     "sender_locked", 0),
    (SenderFacts(BOB, locked=True), {"locked_reply": "hold"}, "HOLD Sender", "sender_locked",
     0),
    (SenderFacts(BOB, locked=True), {"state": "RCPT"}, "REJECT 5.7.1", "sender_locked", 0),
    # a locked login first, whatever its domain's state; then the domain's own checks ...
    (SenderFacts(BOB, 0, None, locked=True), {"domain": replace(HOSTED, status="suspended")},
     "REJECT 5.7.1 Sender", "sender_locked", 0),
    (SenderFacts(BOB, 0, None), {"domain": replace(HOSTED, status="suspended")},
     "DEFER 4.7.1 Domain", "suspended", 0),
    (SenderFacts(BOB, 0, None), {"domain": replace(HOSTED, ses_status="pending")},
     "REJECT 5.7.1 Sender domain", "ses_unverified", 0),
    # ... and the login's limits before the domain's quota
    (SenderFacts(BOB, 0, None), {"domain": replace(HOSTED, daily_limit=0)},
     "DEFER 4.7.1 Hourly", "sender_hourly", 0),
    (SenderFacts(BOB, 5, None), {"domain": replace(HOSTED, daily_limit=0)},
     "DEFER 4.7.1 Daily sending limit reached for send.example", "quota_daily", 0),
])
def test_decision(login: SenderFacts | None, kw: dict[str, Any], action: str, reason: str,
                  count: int) -> None:
    decision = _decide(login, **kw)
    assert decision.action.startswith(action), decision.action
    assert (decision.reason, decision.count) == (reason, count)


def test_address_groups() -> None:
    assert address_group("192.0.2.7") == "192.0.2.7"
    assert address_group("2001:db8:1:2::1") == address_group("2001:db8:1:2:ffff::9")
    assert address_group("2001:db8:1:2::1") != address_group("2001:db8:1:3::1")
    assert address_group("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_group("unknown") is None and address_group("") is None


def test_the_address_memory_is_bounded_whatever_the_traffic() -> None:
    tracker = AddressTracker(threshold=3, window=3600, max_logins=1000)
    for login in range(20_000):  # a flood of logins, each from a few addresses
        for host in range(3):
            assert tracker.observe(login, "", f"10.0.{login % 200}.{host}", float(login)) is None
    assert len(tracker) == 1000 and tracker.addresses() <= 1000 * 4
    for host in range(100_000):  # a flood of addresses for one login: locked at the 4th
        seen = tracker.observe(7, "e", f"10.1.{host >> 8 & 255}.{host & 255}", 1e6)
        if seen is not None:
            assert (host, seen) == (3, 4)
            break
    assert tracker.addresses() <= 1000 * 4


def test_addresses_outside_the_window_do_not_count() -> None:
    tracker = AddressTracker(threshold=2, window=60)
    assert tracker.observe(1, "", "a", 0.0) is None
    assert tracker.observe(1, "", "b", 30.0) is None
    assert tracker.observe(1, "", "c", 70.0) is None  # "a" is 70 s old: 2 within the window
    assert tracker.observe(1, "", "d", 75.0) == 3
    assert tracker.observe(2, "", "a", 0.0) is None
    assert tracker.observe(2, "", "b", 0.0) is None
    assert tracker.observe(2, "new epoch", "c", 0.0) is None  # an unlock forgets


# --- through the daemon -----------------------------------------------------------------

World = tuple[Daemon, str]  # the daemon, a client token of the domain's partner
SECRETS: dict[int, str] = {}  # partner id -> notify_secret (shown once, at creation)


async def _world(make_config: Callable[..., Config], **senders: str) -> World:
    daemon = await start_daemon(make_config(senders=senders))
    partner = await daemon.partner("acme", max_domains=5)
    SECRETS[partner["id"]] = partner["notify_secret"]
    token = await daemon.key(partner["id"])
    await daemon.domain(DOMAIN, token=token)
    for email in (BOB, EVE):
        status, body = await daemon.api("POST", "/users/", {"email": email,
                                                            "password": "correct-horse-1"})
        assert status == 201, body
    return daemon, token


@pytest.fixture
async def limited(make_config: Callable[..., Config]) -> AsyncIterator[World]:
    world = await _world(make_config, hourly_limit="3", daily_limit="5")
    yield world
    await world[0].stop()


@pytest.fixture
async def locking(make_config: Callable[..., Config]) -> AsyncIterator[World]:
    world = await _world(make_config, lock_distinct_ips="3", lock_window="600")
    yield world
    await world[0].stop()


async def _send(client: PolicyClient, login: str = BOB, **attrs: Any) -> str:
    return await client.ask(**outbound(login, **attrs))


async def _sender(daemon: Daemon, email: str = BOB, token: str = MASTER) -> dict[str, Any]:
    status, body = await daemon.api("GET", f"/users/{email}/outbound", token=token)
    assert status == 200, body
    return body


async def _domain_sent(daemon: Daemon) -> int:
    _, body = await daemon.api("GET", f"/domains/{DOMAIN}/outbound")
    return int(body["sent_today"])


async def test_hourly_limit_defers_naming_it_and_counts_nothing(limited: World) -> None:
    daemon, _ = limited
    client = await daemon.policy()
    assert [await _send(client) for _ in range(3)] == ["DUNNO"] * 3
    refused = await _send(client)
    assert refused.startswith("DEFER 4.7.1 Hourly sending limit of 3 messages reached for "
                              f"sender {BOB}"), refused
    assert await _send(client, EVE) == "DUNNO"  # another login of the domain is not affected
    sender = await _sender(daemon)
    assert (sender["sent_hour"], sender["sent_today"]) == (3, 3)
    assert (sender["hourly_limit"], sender["daily_limit"]) == (3, 5)
    assert await _domain_sent(daemon) == 4  # bob's 3 and eve's 1: the refused one not
    await client.close()


async def test_the_same_n_as_the_domain_is_counted(limited: World) -> None:
    daemon, _ = limited
    client = await daemon.policy()
    assert await _send(client, recipient_count="2") == "DUNNO"
    assert (await _send(client, recipient_count="2")).startswith("DEFER 4.7.1 Hourly")
    assert await _send(client, recipient_count="1") == "DUNNO"
    assert (await _sender(daemon))["sent_hour"] == 3 == await _domain_sent(daemon)
    # at RCPT (count_at END-OF-MESSAGE) the question is asked, nothing counted
    assert (await _send(client, protocol_state="RCPT")).startswith("DEFER 4.7.1 Hourly")
    await client.close()


async def test_logins_that_are_no_hosted_mailbox_have_no_sender_limits(limited: World) -> None:
    daemon, _ = limited
    client = await daemon.policy()
    # the login is on a hosted domain but names no mailbox: the domain's rules only
    assert [await _send(client, f"nobody@{DOMAIN}") for _ in range(6)] == ["DUNNO"] * 6
    await client.close()


async def test_n_connections_m_messages_give_exactly_the_limit(
        make_config: Callable[..., Config]) -> None:
    daemon, _ = await _world(make_config, hourly_limit="137")
    clients = [await daemon.policy() for _ in range(20)]
    try:
        async def many(client: PolicyClient) -> list[str]:
            return [await _send(client) for _ in range(15)]

        replies = [r for rs in await asyncio.gather(*map(many, clients)) for r in rs]
        assert replies.count("DUNNO") == 137
        assert all(r.startswith("DEFER 4.7.1 Hourly") for r in replies if r != "DUNNO")
        sender = await _sender(daemon)
        assert sender["sent_hour"] == sender["sent_today"] == 137 == await _domain_sent(daemon)
    finally:
        for client in clients:
            await client.close()
        await daemon.stop()


async def test_sender_and_domain_counts_move_together_or_not_at_all(limited: World) -> None:
    daemon, _ = limited
    client = await daemon.policy()
    assert await _send(client) == "DUNNO"
    outside = connect(daemon.rt.store.path)  # a real SQLite failure for the sender's counts
    outside.execute("CREATE TRIGGER refuse BEFORE UPDATE ON sender_counters "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    outside.close()
    assert (await _send(client)).startswith("DEFER_IF_PERMIT 4.3.0")  # on_error: nothing lost
    assert await _send(client, EVE) == "DUNNO"  # eve's first count is an insert: it goes in
    assert await _domain_sent(daemon) == 2  # bob's second message counted to neither
    assert (await _sender(daemon))["sent_today"] == 1
    await client.close()


async def test_put_limits_with_the_rights_of_each_token(limited: World) -> None:
    daemon, token = limited
    status, body = await daemon.api("PUT", f"/users/{BOB}/outbound", {"hourly_limit": 1})
    assert (status, body["hourly_limit"], body["daily_limit"]) == (200, 1, 5), body
    client = await daemon.policy()
    assert await _send(client) == "DUNNO"
    assert (await _send(client)).startswith("DEFER 4.7.1 Hourly sending limit of 1")
    status, body = await daemon.api("PUT", f"/users/{BOB}/outbound", {"hourly_limit": None})
    assert body["hourly_limit"] == 3  # back to the [senders] default
    assert await _send(client) == "DUNNO"
    # a client: at or below a limited default, never above it
    status, body = await daemon.api("PUT", f"/users/{EVE}/outbound",
                                    {"daily_limit": 6}, token=token)
    assert (status, body["error"]["code"]) == (403, "forbidden"), body
    status, body = await daemon.api("PUT", f"/users/{EVE}/outbound",
                                    {"daily_limit": 5, "hourly_limit": 0}, token=token)
    assert (status, body["daily_limit"], body["hourly_limit"]) == (200, 5, 0), body
    assert (await _send(client, EVE)).startswith("DEFER 4.7.1 Hourly sending limit of 0")
    # what GET shows may be PUT back
    status, _ = await daemon.api("PUT", f"/users/{EVE}/outbound",
                                 await _sender(daemon, EVE, token), token=token)
    assert status == 200
    await client.close()


@pytest.mark.parametrize("body", [
    {"hourly_limit": -1}, {"hourly_limit": "5"}, {"daily_limit": True}, {"daily_limit": 1.5},
    {"hourly_limit": 10**10}, {"status": "frozen"}, {"status": None}, {"limit": 5},
])
async def test_bad_values_are_400(limited: World, body: dict[str, Any]) -> None:
    daemon, _ = limited
    status, reply = await daemon.api("PUT", f"/users/{BOB}/outbound", body)
    assert (status, reply["error"]["code"]) == (400, "invalid"), reply
    assert (await _sender(daemon))["hourly_limit"] == 3


async def test_another_partners_sender_is_404(limited: World) -> None:
    daemon, _ = limited
    other = await daemon.partner("other")
    stranger = await daemon.key(other["id"])
    for method, path, body in (("GET", f"/users/{BOB}/outbound", None),
                               ("PUT", f"/users/{BOB}/outbound", {"status": "active"}),
                               ("PUT", f"/users/{BOB}/outbound", {"hourly_limit": 10**6}),
                               ("GET", f"/domains/{DOMAIN}/senders", None)):
        status, reply = await daemon.api(method, path, body, token=stranger)
        assert (status, reply["error"]["code"]) == (404, "not_found"), (path, reply)


async def _from(client: PolicyClient, address: str, login: str = BOB) -> str:
    return await _send(client, login, client_address=address)


async def test_a_login_seen_from_too_many_addresses_is_locked(
        locking: World, receiver: HookReceiver) -> None:
    daemon, token = locking
    partner_id = (await daemon.api("GET", "/partners/"))[1]["items"][0]["id"]
    status, _ = await daemon.api("PUT", f"/partners/{partner_id}", {"notify_url": receiver.url})
    assert status == 200
    receiver.secret = SECRETS[partner_id]
    client = await daemon.policy()
    async with notifier_running(daemon.rt):
        # one IPv6 /64 is one place: these three count as one
        for address in ("2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff::3"):
            assert await _from(client, address) == "DUNNO"
        assert await _from(client, "192.0.2.1") == "DUNNO"
        assert await _from(client, "192.0.2.2") == "DUNNO"  # 3 distinct: at the limit
        locked = await _from(client, "198.51.100.9")  # the 4th: locked at once
        assert locked.startswith(f"REJECT 5.7.1 Sender {BOB} is locked"), locked
        assert (await _from(client, "192.0.2.1")).startswith("REJECT 5.7.1")
        assert await _from(client, "203.0.113.5", EVE) == "DUNNO"  # no other sender
        delivered = await receiver.wait_for(1)
    event = delivered[0]
    assert {k: event[k] for k in ("event", "email", "domain", "reason")} == {
        "event": "sender_locked", "email": BOB, "domain": DOMAIN, "reason": "distinct_ips"}
    assert event["at"].endswith("Z")
    sender = await _sender(daemon, BOB, token)
    assert (sender["status"], sender["locked_reason"]) == ("locked", "distinct_ips")
    assert sender["sent_today"] == 5  # the locked one and after: nothing counted
    status, listed = await daemon.api("GET", f"/domains/{DOMAIN}/senders", token=token)
    assert listed["items"] == [
        {"email": BOB, "sent_hour": 5, "sent_today": 5, "status": "locked"},
        {"email": EVE, "sent_hour": 1, "sent_today": 1, "status": "active"}]
    _, audit = await daemon.api("GET", f"/audit?target={BOB}")
    assert [(e["actor"], e["action"]) for e in audit["items"]
            if e["action"].startswith("sender.")] == [("system:senders", "sender.lock")]
    _, metrics = await daemon.api("GET", "/metrics")
    assert 'policyd_sender_locks_total{reason="distinct_ips"} 1.0' in metrics
    assert 'policyd_sender_locks_total{reason="manual"} 0.0' in metrics
    await client.close()


async def test_unlocking_forgets_the_addresses_seen(locking: World) -> None:
    daemon, token = locking
    client = await daemon.policy()
    for n in range(4):
        await _from(client, f"192.0.2.{n}")
    assert (await _sender(daemon))["status"] == "locked"
    status, body = await daemon.api("PUT", f"/users/{BOB}/outbound", {"status": "active"},
                                    token=token)
    assert (status, body["status"], body["locked_reason"]) == (200, "active", None)
    # the addresses seen before the unlock are forgotten: three new ones are fine again
    for n in range(10, 13):
        assert await _from(client, f"192.0.2.{n}") == "DUNNO"
    assert (await _from(client, "192.0.2.99")).startswith("REJECT 5.7.1")
    await client.close()


async def test_locks_by_hand_and_who_may_lift_them(locking: World) -> None:
    daemon, token = locking
    client = await daemon.policy()
    status, body = await daemon.api("PUT", f"/users/{EVE}/outbound", {"status": "locked"},
                                    token=token)
    assert (status, body["status"], body["locked_reason"]) == (200, "locked", "manual")
    assert (await _send(client, EVE)).startswith("REJECT 5.7.1")
    status, _ = await daemon.api("PUT", f"/users/{EVE}/outbound", {"status": "active"},
                                 token=token)
    assert status == 200  # a client lifts its own lock
    status, _ = await daemon.api("PUT", f"/users/{EVE}/outbound", {"status": "locked"})
    status, body = await daemon.api("PUT", f"/users/{EVE}/outbound", {"status": "active"},
                                    token=token)
    assert (status, body["error"]["code"]) == (403, "forbidden")  # the master's: only it lifts
    _, audit = await daemon.api("GET", f"/audit?target={EVE}")
    assert [e["action"] for e in audit["items"] if e["action"].startswith("sender.")] == [
        "sender.lock", "sender.unlock", "sender.lock"]
    _, metrics = await daemon.api("GET", "/metrics")
    assert 'policyd_sender_locks_total{reason="manual"} 2.0' in metrics
    _, usage = await daemon.api("GET", "/api-keys/", token=token)
    key_id = usage["items"][0]["id"]
    _, feed = await daemon.api("GET", f"/api-keys/{key_id}/usage", token=token)
    assert {"op": "updated", "kind": "mailbox", "key": EVE} in [
        {k: c[k] for k in ("op", "kind", "key")} for c in feed["changes"]]
    await client.close()


async def test_hold_instead_of_reject(make_config: Callable[..., Config]) -> None:
    daemon, _ = await _world(make_config, lock_distinct_ips="1", locked_reply="hold")
    client = await daemon.policy()
    assert await _from(client, "192.0.2.1") == "DUNNO"
    assert (await _from(client, "192.0.2.2")).startswith(f"HOLD Sender {BOB} is locked")
    await client.close()
    await daemon.stop()


async def test_a_restart_keeps_locks(make_config: Callable[..., Config]) -> None:
    daemon, _ = await _world(make_config, lock_distinct_ips="1")
    client = await daemon.policy()
    await _from(client, "192.0.2.1")
    assert (await _from(client, "192.0.2.2")).startswith("REJECT 5.7.1")
    await client.close()
    await daemon.stop()
    again = await start_daemon(make_config(senders={"lock_distinct_ips": "1"}))
    try:
        client = await again.policy()
        assert (await _from(client, "192.0.2.1")).startswith("REJECT 5.7.1")
        assert (await _sender(again))["status"] == "locked"
        await client.close()
    finally:
        await again.stop()


async def test_deleting_a_mailbox_deletes_its_sender_state(limited: World) -> None:
    daemon, _ = limited
    client = await daemon.policy()
    assert await _send(client) == "DUNNO"
    await daemon.api("PUT", f"/users/{BOB}/outbound", {"status": "locked", "hourly_limit": 1})
    assert (await daemon.api("DELETE", f"/users/{BOB}"))[0] == 204
    status, _ = await daemon.api("GET", f"/users/{BOB}/outbound")
    assert status == 404
    status, body = await daemon.api("POST", "/users/", {"email": BOB,
                                                        "password": "correct-horse-2"})
    assert status == 201, body
    fresh = await _sender(daemon)
    assert {k: fresh[k] for k in ("status", "sent_hour", "sent_today", "hourly_limit",
                                  "locked_reason")} == {
        "status": "active", "sent_hour": 0, "sent_today": 0, "hourly_limit": 3,
        "locked_reason": None}
    assert await _send(client) == "DUNNO"
    rows = sqlite3.connect(daemon.rt.store.path).execute(
        "SELECT count(*) FROM senders").fetchone()
    assert rows == (0,)  # the old mailbox's row went with it; the new one has none yet
    await client.close()


async def test_the_senders_list_pages(limited: World, tmp_path: Path) -> None:
    daemon, token = limited
    client = await daemon.policy()
    await _send(client, EVE)
    await _send(client)
    await _send(client)
    status, first = await daemon.api("GET", f"/domains/{DOMAIN}/senders?limit=1",
                                     token=token)
    assert (status, [i["email"] for i in first["items"]], first["next"]) == (200, [BOB], 1)
    status, second = await daemon.api("GET", f"/domains/{DOMAIN}/senders?limit=1&offset=1",
                                      token=token)
    assert ([i["email"] for i in second["items"]], second["next"]) == ([EVE], None)
    await client.close()
