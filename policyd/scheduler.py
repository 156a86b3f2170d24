"""The in-process scheduler: SES polling, period closing, retention purge, housekeeping.

Each job is idempotent and also runs from the CLI (systemd timers), so a missed or doubled
run is harmless. Jobs never overlap themselves; a failing round is logged and retried later.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from policyd import jobs
from policyd.runtime import Runtime

log = logging.getLogger(__name__)


class Scheduler:
    """Runs the periodic jobs of one process as tracked tasks."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every periodic job."""
        rt, cfg = self._rt, self._rt.config
        plan: list[tuple[str, float, Callable[[], Awaitable[object]]]] = [
            ("ses-poll", cfg.ses.poll_interval, lambda: jobs.ses_poll(rt)),
            ("reset-daily", cfg.scheduler.reset_interval, lambda: jobs.reset(rt, "day")),
            ("reset-monthly", cfg.scheduler.reset_interval, lambda: jobs.reset(rt, "month")),
            ("purge-retention", cfg.scheduler.purge_interval, lambda: jobs.purge_retention(rt)),
            ("housekeeping", cfg.scheduler.purge_interval, lambda: jobs.housekeeping(rt)),
            ("guillotine-sweep", cfg.scheduler.sweep_interval, lambda: jobs.guillotine_sweep(rt)),
        ]
        rt.metrics.jobs_scheduled(name for name, _, _ in plan)
        for name, interval, job in plan:
            self._tasks.append(asyncio.create_task(self._every(name, interval, job), name=name))

    async def _every(self, name: str, interval: float,
                     job: Callable[[], Awaitable[object]]) -> None:
        await asyncio.sleep(min(interval, 5.0))  # let the process settle before the first run
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._rt.metrics.job_failed(name)
                log.error("scheduled job %s failed (retried in %.0f s): %r", name, interval, exc)
            else:
                self._rt.metrics.job_succeeded(name)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """Cancel every job and wait for them."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
