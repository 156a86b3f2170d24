"""Delivery of the notification outbox: signed POSTs, retried with backoff, never blocking.

The outbox row is written in the transaction that causes the event (policyd.store.outbox);
this task delivers it later, so a slow or failing partner endpoint never delays an API request
or a policy reply, and nothing is lost across restarts.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

import aiohttp

from policyd.metrics import Metrics
from policyd.partner_webhook import DeliveryError, backoff_delay, deliver
from policyd.store import Store
from policyd.store import outbox
from policyd.timeutil import iso, iso_precise, parse_iso, utcnow

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 20
BATCH = 100
NEVER = timedelta(days=3650)  # a given-up notification stays in the outbox for operators
JOB = "notify"  # the delivery rounds' name in the policyd_job_* metrics

SessionFactory = Callable[[], aiohttp.ClientSession]


class Notifier:
    """Sends due notifications; wake() asks for a run as soon as possible."""

    def __init__(self, store: Store, session_factory: SessionFactory, metrics: Metrics, *,
                 base_delay: float = 30.0, timeout: float = 10.0,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self._store = store
        self._session_factory = session_factory
        self._metrics = metrics
        self._base_delay = base_delay
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._wakeup = asyncio.Event()
        self._round = asyncio.Lock()

    def wake(self) -> None:
        """Deliver soon (called after a transaction queued a notification)."""
        self._wakeup.set()

    async def run(self, interval: float) -> None:
        """Deliver until cancelled: when woken, when a retry falls due, at least every interval."""
        self._metrics.jobs_scheduled([JOB])
        while True:
            await self._sleep(interval)
            try:
                await self.deliver_due()
            except Exception as exc:  # keep the loop alive; the next round retries
                self._metrics.job_failed(JOB)
                log.error("notification delivery round failed: %r", exc)
            else:  # a round whose deliveries failed still ran: those count per outcome
                self._metrics.job_succeeded(JOB)

    async def _sleep(self, interval: float) -> None:
        """Wait for a wake-up, the next due retry, or interval, whichever comes first."""
        timeout = await self._until_next_due(interval)
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def _until_next_due(self, interval: float) -> float:
        """Seconds until the earliest undelivered notification is due, at most interval."""
        try:
            next_at = await self._store.read(outbox.next_due)
        except Exception as exc:  # the database is down: try again after interval
            log.warning("notification outbox unreadable: %r", exc)
            return interval
        if next_at is None:
            return interval
        return min(interval, max(0.0, (parse_iso(next_at) - utcnow()).total_seconds()))

    async def deliver_due(self) -> int:
        """One delivery round; returns how many were delivered."""
        # One round at a time, so no notification is ever in flight twice.
        async with self._round:
            pending = await self._store.read(outbox.due, iso_precise(utcnow()), BATCH)
            if not pending:
                return 0
            session = self._session_factory()
            results = await asyncio.gather(*(self._one(session, item) for item in pending))
        if len(pending) == BATCH:
            self.wake()  # more may be waiting
        return sum(results)

    async def _one(self, session: aiohttp.ClientSession, item: outbox.Pending) -> bool:
        """Deliver one notification and record the outcome."""
        if not item.url:
            await self._record_failure(item, "partner has no notify_url", give_up=True)
            return False
        try:
            await deliver(session, item.url, item.body, item.secret, timeout=self._timeout)
        except DeliveryError as exc:
            await self._record_failure(item, str(exc))
            return False
        await self._store.write(outbox.delivered, item.id, iso(utcnow()))
        self._metrics.notifications.labels("delivered").inc()
        log.info("notification %d (%s) delivered after %d attempt(s)", item.id, item.event,
                 item.attempts + 1)
        return True

    async def _record_failure(self, item: outbox.Pending, error: str, *,
                              give_up: bool = False) -> None:
        """Store a failed attempt with its next attempt time (exponential backoff)."""
        attempt = item.attempts + 1
        if give_up or attempt >= self._max_attempts:
            retry_in = NEVER
            log.error("notification %d (%s) given up after %d attempt(s): %s", item.id,
                      item.event, attempt, error)
        else:
            retry_in = timedelta(seconds=backoff_delay(attempt, base=self._base_delay))
            log.warning("notification %d (%s) failed (attempt %d), retry in %.2f s: %s",
                        item.id, item.event, attempt, retry_in.total_seconds(), error)
        await self._store.write(outbox.failed, item.id, iso_precise(utcnow() + retry_in), error)
        self._metrics.notifications.labels("gave_up" if retry_in == NEVER else "failed").inc()
