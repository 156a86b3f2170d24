"""A partner's notify_url for tests: a real aiohttp server on 127.0.0.1 that checks signatures,
and the daemon's notifier task run as the scheduler runs it.

The receiver answers `status` (settable; `fail_first` answers 500 first), can stall until
released, records every attempt with its arrival time and signature header, and lets a test
wait (bounded) for N signed deliveries.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from policyd.notifier import Notifier
from policyd.partner_webhook import SIGNATURE_HEADER
from policyd.runtime import Runtime


@dataclass
class Attempt:
    """One POST the receiver got: body, signature header and whether it was valid, and when."""

    body: bytes
    signature: str
    signed: bool
    answered: int
    at: float


@dataclass
class HookReceiver:
    """The partner endpoint. Set `secret` to the notify_secret returned by POST /partners/."""

    secret: str = ""
    status: int = 204
    fail_first: int = 0  # answer 500 to this many attempts before `status`
    stall: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    arrived: int = 0  # requests received, answered or not (a stalled one counts at once)
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    @property
    def delivered(self) -> list[dict[str, Any]]:
        """Bodies (parsed) that carried a valid signature and were answered 2xx."""
        return [json.loads(a.body) for a in self.attempts if a.signed and a.answered < 300]

    async def start(self) -> None:
        """Listen on 127.0.0.1, port 0; sets url."""
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        """Release stalled requests and stop listening."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Let stalled requests answer."""
        self._release.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait (bounded) until `count` signed deliveries were accepted; return them."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.delivered) >= count), timeout)
        return self.delivered

    async def wait_attempts(self, count: int, timeout: float = 10.0) -> list[Attempt]:
        """Wait (bounded) until `count` attempts (of any outcome) were answered."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.attempts) >= count), timeout)
        return self.attempts

    async def wait_arrived(self, count: int, timeout: float = 10.0) -> None:
        """Wait (bounded) until `count` requests arrived (stalled ones included)."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.arrived >= count), timeout)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.monotonic()
        self.arrived += 1
        await self._notify()
        if self.stall:
            await self._release.wait()
        signature = request.headers.get(SIGNATURE_HEADER, "")
        signed = self._signed(body, signature)
        answered = self._answer(signed)
        self.attempts.append(Attempt(body, signature, signed, answered, arrived))
        await self._notify()
        return web.Response(status=answered)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _signed(self, body: bytes, signature: str) -> bool:
        """The partner's own check, written from the spec: sha256=<hex HMAC-SHA256(body)>."""
        digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature.encode("utf-8", "surrogateescape"),
                                   f"sha256={digest}".encode())

    def _answer(self, signed: bool) -> int:
        if not signed:
            return 401
        failed = sum(1 for a in self.attempts if a.answered >= 500)
        return 500 if failed < self.fail_first else self.status


@asynccontextmanager
async def notifier_running(rt: Runtime, *, base_delay: float = 0.05, interval: float = 60.0,
                           **options: Any) -> AsyncIterator[Notifier]:
    """Run the daemon's notifier as the scheduler would, with a short retry base delay."""
    notifier = Notifier(rt.store, lambda: rt.http, rt.metrics, base_delay=base_delay,
                        **options)
    rt.notifier = notifier
    task = asyncio.create_task(notifier.run(interval), name="test-notifier")
    try:
        yield notifier
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
