"""Signed partner notifications, delivered to a real aiohttp receiver on 127.0.0.1."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from policyd.partner_webhook import (
    SIGNATURE_HEADER,
    DeliveryError,
    backoff_delay,
    deliver,
    sign,
)
from policyd.store.outbox import encode_event
from tests.ports import free_port

SECRET = "s3cret-partner-key"


def _signed(body: bytes, header: str) -> bool:
    """What a partner checks (SPEC §5), written here independently of policyd.notify.sign."""
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.encode("utf-8", "surrogateescape"))


@dataclass
class Receiver:
    """A partner endpoint: checks the HMAC, records accepted bodies and headers."""

    url: str = ""
    status: int = 204
    accepted: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    rejected: int = 0
    stall: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.stall:
            await self.release.wait()
        if not _signed(body, request.headers.get(SIGNATURE_HEADER, "")):
            self.rejected += 1
            return web.Response(status=401)
        self.accepted.append(body)
        self.headers.append(dict(request.headers))
        return web.Response(status=self.status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hook", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    recv.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield recv
    finally:
        recv.release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# --- pure parts --------------------------------------------------------------------------------

def test_encode_event_is_compact_and_sorted() -> None:
    body = encode_event("ses_verified", domain="example.com", at=1)
    assert body == b'{"at":1,"domain":"example.com","event":"ses_verified"}'
    assert json.loads(body) == {"event": "ses_verified", "domain": "example.com", "at": 1}


def test_sign_matches_known_hmac_vector() -> None:
    # RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
    assert sign(b"what do ya want for nothing?", "Jefe") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )




def test_backoff_delay_grows_and_is_capped() -> None:
    delays = [backoff_delay(n, base=30.0, cap=3600.0) for n in range(1, 15)]
    assert delays[:4] == [30.0, 60.0, 120.0, 240.0]
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert max(delays) == 3600.0 and delays[-1] == 3600.0
    assert backoff_delay(10_000) == 3600.0  # no overflow for absurd counts


def test_backoff_delay_jitter_stays_within_bounds() -> None:
    for _ in range(50):
        assert 60.0 <= backoff_delay(2, jitter=0.5) <= 90.0
    assert backoff_delay(20, jitter=0.5) == 3600.0


# --- delivery ----------------------------------------------------------------------------------

async def test_good_delivery(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    body = encode_event("ses_verified", domain="example.com")
    await deliver(session, receiver.url, body, SECRET)
    assert receiver.accepted == [body]
    headers = receiver.headers[0]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "policyd"
    assert headers[SIGNATURE_HEADER] == sign(body, SECRET)


async def test_server_error_is_delivery_error(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.status = 500
    body = encode_event("outbound_blocked", domain="x.example")
    with pytest.raises(DeliveryError, match="HTTP 500"):
        await deliver(session, receiver.url, body, SECRET)
    assert len(receiver.accepted) == 1  # it arrived; the receiver answered 500


async def test_wrong_secret_is_rejected(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    body = encode_event("ses_verified", domain="e.example")
    with pytest.raises(DeliveryError, match="HTTP 401") as info:
        await deliver(session, receiver.url, body, "wrong")
    assert receiver.rejected == 1 and receiver.accepted == []
    assert "wrong" not in str(info.value)


async def test_timeout_is_delivery_error(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.stall = True
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="timed out"):
        await deliver(session, receiver.url, encode_event("ses_verified", domain="e.example"),
                      SECRET, timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert receiver.accepted == []


async def test_connection_refused_is_delivery_error(session: aiohttp.ClientSession) -> None:
    port = free_port()  # nobody listens on it
    with pytest.raises(DeliveryError) as info:
        await deliver(session, f"http://user:{SECRET}@127.0.0.1:{port}/hook?token={SECRET}",
                      b"{}", SECRET)
    assert SECRET not in str(info.value)
    assert f"127.0.0.1:{port}/hook" in str(info.value)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "file:///etc/passwd", "example.com/hook", ""]
)
async def test_only_http_urls(url: str, session: aiohttp.ClientSession) -> None:
    with pytest.raises(DeliveryError, match="notify URL"):
        await deliver(session, url, b"{}", SECRET)


async def test_redirect_is_not_followed(session: aiohttp.ClientSession) -> None:
    hits: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_post("/hook", moved)
    app.router.add_route("*", "/elsewhere", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        with pytest.raises(DeliveryError, match="HTTP 302"):
            await deliver(session, url, b"{}", SECRET)
    finally:
        await runner.cleanup()
    assert hits == ["/hook"]
