"""The long-lived services of one process, built once by the composition root (policyd.main)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Coroutine

from policyd.config import Config
from policyd.metrics import Metrics
from policyd.store import Store
from policyd.timeutil import Periods

if TYPE_CHECKING:  # built by policyd.main, which imports them all; no import cycle at run time
    import aiohttp

    from policyd.notifier import Notifier
    from policyd.policyserver import PolicyServer
    from policyd.replication import ReplicationMonitor
    from policyd.ses import SesClient
    from policyd.sns import SnsVerifier

log = logging.getLogger(__name__)


class TaskGroup:
    """Background tasks with a kept reference, logged failures and a clean cancel on stop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start coro as a tracked task."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %r", task.get_name(), task.exception())

    async def drain(self, timeout: float) -> None:
        """Wait up to timeout for running tasks, then cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Runtime:
    """Everything a handler or job needs: config, store, clients, metrics, tasks."""

    config: Config
    store: Store
    metrics: Metrics = field(default_factory=Metrics)
    tasks: TaskGroup = field(default_factory=TaskGroup)
    ses: SesClient | None = None  # None: SES is not configured
    sns: SnsVerifier | None = None
    notifier: Notifier | None = None  # None in one-shot commands
    http: aiohttp.ClientSession | None = None  # outgoing calls (partner webhooks)
    policy_server: PolicyServer | None = None  # once started
    replication: ReplicationMonitor | None = None  # when [replication] is set

    def __post_init__(self) -> None:
        self.periods = Periods(self.config.outbound.timezone)
