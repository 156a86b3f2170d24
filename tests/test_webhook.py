"""POST /webhooks/ses end to end: signed SNS messages from tests/snsfake.py, the signing
certificate served over http on loopback, bounces and complaints counted against the sending
domain, and the guillotine: blocked in the same transaction, audited, the partner notified
(signed), the policy server rejecting at once, and only the master lifting it.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from policyd import jobs
from policyd.store import outbox
from tests.conftest import MASTER, Daemon, outbound, start_daemon
from tests.hookserver import HookReceiver, notifier_running
from tests.snsfake import (
    TOPIC_ARN,
    CertServer,
    bounce_message,
    complaint_message,
    encode,
    make_message,
    new_identity,
)

DOMAIN = "acme.example"
SENDER = f"news@{DOMAIN}"


@dataclass
class World:
    """A daemon with one partner (client token, notify_url) and its SES-verified domain."""

    daemon: Daemon
    certs: CertServer
    hook: HookReceiver
    token: str

    def message(self, inner: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """A correctly signed SNS Notification carrying an SES body."""
        kwargs.setdefault("cert_url", self.certs.base_url + "/cert.pem")
        return make_message(message=inner, **kwargs)

    def bounce(self, *recipients: str, bounce_type: str = "Permanent",
               **kwargs: Any) -> dict[str, Any]:
        """A signed SES Bounce from SENDER."""
        return self.message(bounce_message(SENDER, list(recipients), bounce_type), **kwargs)

    async def post(self, msg: dict[str, Any] | bytes) -> tuple[int, Any]:
        """POST to the webhook as SNS does: no token, text/plain JSON."""
        raw = msg if isinstance(msg, bytes) else encode(msg)
        kind = "" if isinstance(msg, bytes) else msg.get("Type", "")
        return await self.daemon.api("POST", "/webhooks/ses", raw=raw, token=None, headers={
            "Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": kind})

    async def outbound(self) -> dict[str, Any]:
        """GET /domains/{DOMAIN}/outbound."""
        status, body = await self.daemon.api("GET", f"/domains/{DOMAIN}/outbound")
        assert status == 200, body
        return body

    async def send(self, count: int) -> None:
        """Count sent mail through the master's REST increment."""
        status, body = await self.daemon.api("POST", f"/domains/{DOMAIN}/outbound/increment",
                                             {"count": count})
        assert status == 200 and body["allowed"], body


def sns_config(make_config: Callable[..., Any], certs: CertServer) -> Any:
    """Accept SNS certificates from the loopback CertServer, one allowed topic."""
    return make_config(
        sns={"allowed_topic_arns": TOPIC_ARN, "cert_host_pattern": "127.0.0.1:*",
             "insecure_http_certs": "true"},
        outbound={"bounce_rate_limit": "0.03", "bounce_min_sent": "100"})


@pytest.fixture
async def world(make_config: Callable[..., Any], cert_server: CertServer,
                receiver: HookReceiver) -> AsyncIterator[World]:
    """The running daemon, its notifier task, a partner listening on receiver."""
    daemon = await start_daemon(sns_config(make_config, cert_server))
    try:
        partner = await daemon.partner("acme")
        token = await daemon.key(partner["id"])
        await daemon.domain(DOMAIN, token=token)
        status, body = await daemon.api("PUT", f"/partners/{partner['id']}",
                                        {"notify_url": receiver.url})
        assert status == 200, body
        receiver.secret = partner["notify_secret"]
        async with notifier_running(daemon.rt):
            yield World(daemon, cert_server, receiver, token)
    finally:
        await daemon.stop()


async def rcpt_check(world: World) -> str:
    """The policy answer for SENDER at RCPT (a check that counts nothing)."""
    client = await world.daemon.policy()
    try:
        return await client.ask(**outbound(SENDER, protocol_state="RCPT"))
    finally:
        await client.close()


async def audit_of(world: World) -> list[dict[str, Any]]:
    """The audit entries about DOMAIN."""
    status, body = await world.daemon.api("GET", f"/audit?target={DOMAIN}")
    assert status == 200, body
    return body["items"]


# --- signatures -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1", "2"])
async def test_signature_versions_are_accepted(world: World, version: str) -> None:
    status, body = await world.post(world.bounce("a@x.org", version=version))
    assert (status, body["status"], body["counted"]) == (200, "ok", 1)
    assert (await world.outbound())["bounces"] == 1


def _tampered(world: World) -> dict[str, Any]:
    msg = world.bounce("a@x.org")
    msg["Message"] = json.dumps(bounce_message(SENDER, ["a@x.org", "b@x.org", "c@x.org"]))
    return msg


def _unsigned(world: World) -> dict[str, Any]:
    msg = world.bounce("a@x.org")
    for key in ("Signature", "SignatureVersion", "SigningCertURL"):
        del msg[key]
    return msg


def _wrong_host(world: World) -> dict[str, Any]:
    port = world.certs.base_url.rsplit(":", 1)[1]
    return world.bounce("a@x.org", cert_url=f"http://localhost:{port}/cert.pem")


REFUSED: dict[str, Callable[[World], dict[str, Any]]] = {
    "tampered": _tampered,
    "unsigned": _unsigned,
    "wrong_topic": lambda w: w.bounce("a@x.org", topic_arn=TOPIC_ARN + "-other"),
    "wrong_cert_host": _wrong_host,
    "other_key": lambda w: w.bounce("a@x.org", identity=new_identity()),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_refused_messages_are_403_and_count_nothing(world: World, case: str) -> None:
    forged = REFUSED[case](world)
    status, body = await world.post(forged)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    out = await world.outbound()
    assert (out["bounces"], out["complaints"]) == (0, 0)
    if case in ("wrong_topic", "wrong_cert_host"):
        assert world.certs.cert_hits == 0  # refused before any fetch
    # A refused message leaves no trace: the genuine one with its MessageId still counts.
    genuine = world.bounce("a@x.org", message_id=forged["MessageId"])
    status, body = await world.post(genuine)
    assert (status, body["counted"]) == (200, 1)


async def test_unfetchable_certificate_is_503_so_sns_retries(world: World) -> None:
    """SNS redelivers only on 5xx: a certificate we could not fetch must not drop a bounce."""
    msg = world.bounce("a@x.org", cert_url=world.certs.base_url + "/missing.pem")
    status, body = await world.post(msg)
    assert (status, body["error"]["code"]) == (503, "unavailable")
    assert (await world.outbound())["bounces"] == 0


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b'{"Type": "Nope"}'])
async def test_malformed_bodies_are_400(world: World, raw: bytes) -> None:
    status, body = await world.post(raw)
    assert (status, body["error"]["code"]) == (400, "invalid")


# --- subscription ---------------------------------------------------------------------------

def subscription(world: World, **kwargs: Any) -> dict[str, Any]:
    """A signed SubscriptionConfirmation whose SubscribeURL is the CertServer's /confirm."""
    kwargs.setdefault("subscribe_url", world.certs.base_url + "/confirm?Token=tok-1")
    return make_message("SubscriptionConfirmation", message="confirm me",
                        cert_url=world.certs.base_url + "/cert.pem", **kwargs)


async def test_subscription_confirmation_gets_subscribe_url(world: World) -> None:
    status, body = await world.post(subscription(world))
    assert (status, body) == (200, {"status": "confirmed"})
    assert world.certs.confirm_hits == [{"Token": "tok-1"}]


@pytest.mark.parametrize("kwargs", [
    {"subscribe_url": "http://evil.example/confirm?Token=tok-1"},
    {"topic_arn": TOPIC_ARN + "-other"},
])
async def test_subscription_elsewhere_is_refused_without_a_get(
        world: World, kwargs: dict[str, Any]) -> None:
    status, _ = await world.post(subscription(world, **kwargs))
    assert status == 403
    assert world.certs.confirm_hits == []


# --- counting -------------------------------------------------------------------------------

async def test_replayed_message_id_is_counted_once(world: World) -> None:
    msg = world.bounce("a@x.org", "b@x.org")
    first = await world.post(msg)
    replays = await asyncio.gather(*(world.post(msg) for _ in range(4)))
    assert first == (200, {"status": "ok", "counted": 2, "blocked": []})
    assert all(status == 200 and body["status"] == "duplicate" for status, body in replays)
    assert (await world.outbound())["bounces"] == 2


async def test_permanent_bounces_and_complaints_count_transient_ones_do_not(
        world: World) -> None:
    await world.send(200)
    results = [
        await world.post(world.bounce("t@x.org", bounce_type="Transient")),
        await world.post(world.bounce("a@x.org", "b@x.org", "c@x.org")),
        await world.post(world.message(complaint_message("News@ACME.Example",
                                                         ["a@x.org", "d@y.org"]))),
        await world.post(world.message(bounce_message("x@not-hosted.example", ["a@x.org"]))),
    ]
    assert [(status, body["counted"]) for status, body in results] == [
        (200, 0), (200, 3), (200, 2), (200, 0)]
    out = await world.outbound()
    assert (out["bounces"], out["complaints"]) == (3, 2)
    assert (out["bounce_rate"], out["complaint_rate"]) == (0.015, 0.01)


# --- the guillotine -------------------------------------------------------------------------

async def test_guillotine_blocks_at_exactly_the_limit(world: World) -> None:
    await world.send(100)
    for n in (1, 2):
        status, body = await world.post(world.bounce(f"b{n}@x.org"))
        assert (status, body["blocked"]) == (200, [])
        assert (await world.outbound())["status"] == "active"
        assert await rcpt_check(world) == "DUNNO"

    status, body = await world.post(world.bounce("b3@x.org"))

    assert (status, body["blocked"]) == (200, [DOMAIN])
    out = await world.outbound()
    assert (out["status"], out["bounces"], out["sent_month"]) == ("blocked", 3, 100)
    assert out["bounce_rate"] == 0.03
    assert (await rcpt_check(world)).startswith("REJECT 5.7.1")
    [entry] = [e for e in await audit_of(world) if e["action"] == "outbound.guillotine"]
    assert entry["actor"] == "system:guillotine"
    assert (entry["before"], entry["after"]) == ({"out_status": "active"},
                                                 {"out_status": "blocked"})
    delivered = await world.hook.wait_for(1)
    assert delivered == [{"event": "outbound_blocked", "domain": DOMAIN, "bounce_rate": 0.03,
                          "bounces": 3, "sent": 100}]
    assert world.hook.attempts[0].signed


async def test_only_the_master_lifts_the_block(world: World) -> None:
    await world.send(100)
    await world.post(world.bounce("a@x.org", "b@x.org", "c@x.org"))
    assert (await world.outbound())["status"] == "blocked"
    status, body = await world.post(world.bounce("d@x.org"))  # already blocked: no news
    assert (status, body["blocked"]) == (200, [])

    status, body = await world.daemon.api("PUT", f"/domains/{DOMAIN}/outbound",
                                          {"status": "active"}, token=world.token)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert (await rcpt_check(world)).startswith("REJECT 5.7.1")

    status, body = await world.daemon.api("PUT", f"/domains/{DOMAIN}/outbound",
                                          {"status": "active"}, token=MASTER)
    assert (status, body["status"]) == (200, "active")
    assert await rcpt_check(world) == "DUNNO"
    actions = [(e["actor"], e["action"]) for e in await audit_of(world)]
    assert actions[-2:] == [("system:guillotine", "outbound.guillotine"),
                            ("master", "outbound.update")]
    await world.hook.wait_for(1)
    entries = await world.daemon.rt.store.read(outbox.entries)
    assert [e.event for e in entries] == ["outbound_blocked"]


async def test_guillotine_counts_mail_sent_through_the_policy_port(world: World) -> None:
    client = await world.daemon.policy()
    answers = {await client.ask(**outbound(SENDER)) for _ in range(100)}
    await client.close()
    assert answers == {"DUNNO"} and (await world.outbound())["sent_month"] == 100

    status, body = await world.post(world.bounce("a@x.org", "b@x.org", "c@x.org"))

    assert body["blocked"] == [DOMAIN]
    client = await world.daemon.policy()
    assert (await client.ask(**outbound(SENDER))).startswith("REJECT 5.7.1")
    await client.close()
    assert (await world.outbound())["sent_month"] == 100  # the rejected one was not counted


async def test_below_minimum_volume_never_blocks(world: World) -> None:
    await world.send(50)
    status, body = await world.post(world.bounce(*(f"r{i}@x.org" for i in range(10))))
    assert (status, body["counted"], body["blocked"]) == (200, 10, [])
    out = await world.outbound()
    assert (out["status"], out["bounce_rate"]) == ("active", 0.2)
    assert await rcpt_check(world) == "DUNNO"
    assert await world.daemon.rt.store.read(outbox.entries) == []
    assert [e for e in await audit_of(world) if e["action"] == "outbound.guillotine"] == []


async def test_crossing_the_minimum_volume_later_blocks(world: World) -> None:
    """Bounces that came while the domain sent too little count once its volume is enough."""
    await world.send(50)
    await world.post(world.bounce(*(f"r{i}@x.org" for i in range(10))))
    assert (await world.outbound())["status"] == "active"
    await world.send(50)  # the master's REST increment: 100 sent, 10% bounced
    assert (await world.outbound())["status"] == "blocked"
    assert (await rcpt_check(world)).startswith("REJECT 5.7.1")


async def test_the_sweep_blocks_mail_counted_through_the_policy_port(world: World) -> None:
    await world.send(50)
    await world.post(world.bounce(*(f"r{i}@x.org" for i in range(10))))
    client = await world.daemon.policy()
    for _ in range(50):  # counted by the policy server, which does not judge bounce rates
        assert await client.ask(**outbound(SENDER)) == "DUNNO"
    await client.close()
    assert (await world.outbound())["status"] == "active"
    assert await jobs.guillotine_sweep(world.daemon.rt) == [DOMAIN]
    assert (await world.outbound())["status"] == "blocked"
    assert await jobs.guillotine_sweep(world.daemon.rt) == []  # already blocked: once


async def test_a_stalled_partner_never_delays_the_webhook(world: World) -> None:
    world.hook.stall = True
    await world.send(100)
    started = time.monotonic()
    status, body = await asyncio.wait_for(
        world.post(world.bounce("a@x.org", "b@x.org", "c@x.org")), 5)
    await world.hook.wait_arrived(1)  # the notifier is now held by the partner
    assert (await rcpt_check(world)).startswith("REJECT 5.7.1")
    assert (status, body["blocked"]) == (200, [DOMAIN])
    assert time.monotonic() - started < 2.0
    world.hook.release()
    assert [d["event"] for d in await world.hook.wait_for(1)] == ["outbound_blocked"]


async def test_sns_settings_are_read_from_config(make_config: Callable[..., Any],
                                                 cert_server: CertServer) -> None:
    """Without insecure_http_certs the loopback certificate is refused: the default is https."""
    daemon = await start_daemon(make_config(sns={"cert_host_pattern": "127.0.0.1:*"}))
    try:
        world = World(daemon, cert_server, HookReceiver(), "")
        await daemon.domain(DOMAIN)
        status, _ = await world.post(world.bounce("a@x.org"))
        assert status == 403 and cert_server.cert_hits == 0
    finally:
        await daemon.stop()


# --- the SNS defaults (SPEC §2, §8) ---------------------------------------------------------

async def test_an_empty_topic_list_accepts_no_topic(make_config: Callable[..., Any],
                                                    cert_server: CertServer) -> None:
    config = make_config(sns={"cert_host_pattern": "127.0.0.1:*",
                              "insecure_http_certs": "true"})  # allowed_topic_arns unset
    daemon = await start_daemon(config)
    try:
        await daemon.domain(DOMAIN)
        msg = make_message(message=bounce_message(SENDER, ["a@x.org"]),
                           cert_url=cert_server.base_url + "/cert.pem")
        status, body = await daemon.api("POST", "/webhooks/ses", token=None,
                                        raw=json.dumps(msg).encode())
        assert status == 403 and body["error"]["code"] == "forbidden", body
        _, stats = await daemon.api("GET", f"/domains/{DOMAIN}/outbound")
        assert stats["bounces"] == 0
    finally:
        await daemon.stop()


async def test_a_replayed_old_message_is_refused_and_not_counted(world: World) -> None:
    old = (datetime.now(timezone.utc) - timedelta(days=15)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    msg = make_message(message=bounce_message(SENDER, ["a@x.org"]),
                       cert_url=world.certs.base_url + "/cert.pem", timestamp=old)
    status, body = await world.post(msg)
    assert status == 403, body
    assert (await world.outbound())["bounces"] == 0


async def test_the_source_domain_is_normalised(world: World) -> None:
    msg = world.message(bounce_message(SENDER.upper() + ".", ["a@x.org"]))
    status, body = await world.post(msg)
    assert (status, body["counted"]) == (200, 1), body
    assert (await world.outbound())["bounces"] == 1
