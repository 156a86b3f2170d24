"""Delivery of the notification outbox: signed POSTs, retried with backoff, never blocking."""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import aiohttp

from policyd.metrics import Metrics
from policyd.notify import DeliveryError, backoff_delay, deliver
from policyd.store import Store
from policyd.store import notifications as outbox
from policyd.timeutil import iso, utcnow

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 20


class Notifier:
    """Sends due notifications; wake() asks for a run as soon as possible."""

    def __init__(self, store: Store, session_factory, metrics: Metrics, *,  # type: ignore[no-untyped-def]
                 base_delay: float = 30.0, timeout: float = 10.0) -> None:
        self._store = store
        self._session_factory = session_factory
        self._metrics = metrics
        self._base_delay = base_delay
        self._timeout = timeout
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Deliver soon (called after a transaction queued a notification)."""
        self._wakeup.set()

    async def run(self, interval: float) -> None:
        """Deliver due notifications forever, every interval or when woken."""
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), interval)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self.deliver_due()
            except Exception as exc:  # keep the loop alive; the next round retries
                log.error("notification delivery round failed: %r", exc)

    async def deliver_due(self) -> int:
        """One delivery round; returns how many were delivered."""
        pending = await self._store.read(outbox.due, iso(utcnow()), 100)
        if not pending:
            return 0
        session: aiohttp.ClientSession = self._session_factory()
        results = await asyncio.gather(*(self._one(session, item) for item in pending))
        return sum(results)

    async def _one(self, session: aiohttp.ClientSession, item: outbox.Pending) -> bool:
        if not item.url:
            await self._store.write(outbox.failed, item.id, iso(utcnow() + timedelta(days=3650)),
                                    "partner has no notify_url")
            return False
        try:
            await deliver(session, item.url, item.body, item.secret, timeout=self._timeout)
        except DeliveryError as exc:
            delay = backoff_delay(item.attempts + 1, base=self._base_delay)
            if item.attempts + 1 >= MAX_ATTEMPTS:
                delay = 3650 * 86400.0
                log.error("notification %d (%s) given up after %d attempts: %s", item.id,
                          item.event, MAX_ATTEMPTS, exc)
            else:
                log.warning("notification %d (%s) failed (attempt %d), retry in %.0f s: %s",
                            item.id, item.event, item.attempts + 1, delay, exc)
            await self._store.write(outbox.failed, item.id,
                                    iso(utcnow() + timedelta(seconds=delay)), str(exc))
            self._metrics.notifications.labels("failed").inc()
            self.schedule(delay)
            return False
        await self._store.write(outbox.delivered, item.id, iso(utcnow()))
        self._metrics.notifications.labels("delivered").inc()
        log.info("notification %d (%s) delivered", item.id, item.event)
        return True

    def schedule(self, delay: float) -> None:
        """Wake the loop after delay seconds (short retries do not wait a whole interval)."""
        asyncio.get_running_loop().call_later(delay, self._wakeup.set)
