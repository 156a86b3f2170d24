"""The notification outbox and its notifier, against a real partner endpoint on 127.0.0.1.

A notification is queued in the transaction of its event (here: a domain's SES status turning
to success through the store), delivered signed by the notifier task, retried with exponential
backoff while the partner fails, delivered exactly once, kept across restarts, and never in the
way of an API request or a policy reply.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from policyd.main import build_runtime, services
from policyd.notifier import Notifier
from policyd.store import outbox
from policyd.timeutil import parse_iso, utcnow
from tests.conftest import Daemon, outbound, start_daemon
from tests.hookserver import HookReceiver, notifier_running

BASE = 0.05  # seconds: the first retry delay injected into the notifier


async def partner_with_hook(daemon: Daemon, receiver: HookReceiver) -> dict[str, Any]:
    """A partner whose notify_url is receiver; the receiver learns the secret (shown once)."""
    partner = await daemon.partner("acme", notify_url=receiver.url)
    receiver.secret = partner["notify_secret"]
    return partner


async def verified_event(daemon: Daemon, partner: dict[str, Any], name: str) -> None:
    """Create a domain and let its SES status turn to success (queues `ses_verified`)."""
    await daemon.domain(name, partner_id=partner["id"], verified=False)
    await daemon.verify(name)
    if daemon.rt.notifier is not None:
        daemon.rt.notifier.wake()


async def test_failing_receiver_is_retried_with_backoff_then_delivered_once(
        daemon: Daemon, receiver: HookReceiver) -> None:
    receiver.fail_first = 3
    partner = await partner_with_hook(daemon, receiver)
    async with notifier_running(daemon.rt, base_delay=BASE):
        await verified_event(daemon, partner, "retry.example")
        delivered = await receiver.wait_for(1)
        assert await daemon.rt.notifier.deliver_due() == 0

    assert delivered == [{"event": "ses_verified", "domain": "retry.example"}]
    assert [a.answered for a in receiver.attempts] == [500, 500, 500, 204]
    assert all(a.signed for a in receiver.attempts)
    gaps = [b.at - a.at for a, b in zip(receiver.attempts, receiver.attempts[1:])]
    for n, gap in enumerate(gaps):  # base * 2**n after the (n+1)-th failure
        assert gap >= BASE * 2**n * 0.9, gaps
    [entry] = await daemon.rt.store.read(outbox.entries)
    assert (entry.attempts, entry.last_error) == (4, None) and entry.delivered_at


async def test_gives_up_after_max_attempts_and_keeps_the_row(
        daemon: Daemon, receiver: HookReceiver) -> None:
    receiver.status = 500
    partner = await partner_with_hook(daemon, receiver)
    async with notifier_running(daemon.rt, base_delay=0.01, max_attempts=3):
        await verified_event(daemon, partner, "gone.example")
        await receiver.wait_attempts(3)
        assert await daemon.rt.notifier.deliver_due() == 0

    assert len(receiver.attempts) == 3 and receiver.delivered == []
    [entry] = await daemon.rt.store.read(outbox.entries)
    assert entry.delivered_at is None and "HTTP 500" in (entry.last_error or "")
    next_due = await daemon.rt.store.read(outbox.next_due)
    assert (parse_iso(next_due) - utcnow()).days > 365


async def test_one_round_at_a_time_so_never_sent_twice(
        daemon: Daemon, receiver: HookReceiver) -> None:
    receiver.stall = True
    partner = await partner_with_hook(daemon, receiver)
    await verified_event(daemon, partner, "twice.example")
    rt = daemon.rt
    notifier = Notifier(rt.store, lambda: rt.http, rt.metrics)
    rounds = [asyncio.create_task(notifier.deliver_due()) for _ in range(3)]
    await receiver.wait_arrived(1)
    receiver.release()
    results = await asyncio.wait_for(asyncio.gather(*rounds), 10)

    assert sorted(results) == [0, 0, 1]
    assert len(receiver.attempts) == 1 and len(receiver.delivered) == 1


async def test_a_stalled_partner_never_delays_requests(
        daemon: Daemon, receiver: HookReceiver) -> None:
    receiver.stall = True
    partner = await partner_with_hook(daemon, receiver)
    client = await daemon.policy()
    async with notifier_running(daemon.rt):
        await verified_event(daemon, partner, "stall.example")
        await receiver.wait_arrived(1)  # the notifier is now stuck on the partner
        started = time.monotonic()
        status, _ = await asyncio.wait_for(daemon.api("GET", "/domains/stall.example"), 2)
        action = await asyncio.wait_for(client.ask(**outbound("a@stall.example")), 2)
        elapsed = time.monotonic() - started
        receiver.release()
        await receiver.wait_for(1)
    await client.close()
    assert (status, action) == (200, "DUNNO") and elapsed < 1.0


async def test_outbox_survives_a_restart(
        make_config: Any, receiver: HookReceiver) -> None:
    config = make_config()
    first = await start_daemon(config)
    try:
        partner = await partner_with_hook(first, receiver)
        await verified_event(first, partner, "durable.example")  # no notifier runs here
    finally:
        await first.stop()
    assert receiver.attempts == []

    second = await start_daemon(config)
    try:
        async with notifier_running(second.rt):
            delivered = await receiver.wait_for(1)
    finally:
        await second.stop()
    assert delivered == [{"event": "ses_verified", "domain": "durable.example"}]


async def test_partner_without_notify_url_queues_nothing(daemon: Daemon) -> None:
    partner = await daemon.partner("quiet")
    await verified_event(daemon, partner, "quiet.example")
    assert await daemon.rt.store.read(outbox.entries) == []


async def test_the_daemon_delivers_without_the_scheduler(make_config: Any,
                                                         receiver: HookReceiver) -> None:
    """With systemd timers doing the jobs ([scheduler] enabled = false), a notification queued
    by one of them is still delivered by the running daemon."""
    config = make_config(scheduler={"enabled": "false", "notify_interval": "0.1"})
    rt = build_runtime(config)
    app = create_app(rt, config.auth.master_token, services(rt))
    client = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        daemon = Daemon(rt, client, app)
        partner = await partner_with_hook(daemon, receiver)
        await daemon.domain("timer.example", partner_id=partner["id"], verified=False)
        await daemon.verify("timer.example")  # queued, and nobody wakes the notifier
        assert await receiver.wait_for(1) == [{"event": "ses_verified",
                                               "domain": "timer.example"}]
    finally:
        await client.close()
