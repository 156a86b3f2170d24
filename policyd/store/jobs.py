"""The job model of every write: a function to run in the write transaction, its callback,
and the time budget after which a job that has not started is abandoned."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)
Done = Callable[[Any, BaseException | None], None]  # done(result, error), called once
Outcome = tuple["Job", Any, BaseException | None]


class Job:
    """One write: fn(conn, *args) in a savepoint, or (batched) one argument of a run of
    submissions that fn receives together."""

    __slots__ = ("fn", "args", "done", "batched", "abandoned", "started", "finished",
                 "deadline")

    def __init__(self, fn: Callable[..., Any], args: Any, done: Done, batched: bool) -> None:
        self.fn, self.args, self.done, self.batched = fn, args, done, batched
        # Under the store's claim lock: one of the two is set, never both.
        self.abandoned = False  # its budget ran out before it started: it never runs
        self.started = False  # its transaction has begun: it is answered when that ends
        self.finished = False  # done() was called (loop thread only)
        self.deadline = 0.0

    def group_key(self) -> tuple[Callable[..., Any], bool]:
        """Consecutive jobs with the same key run together."""
        return self.fn, self.batched


def finish(job: Job, result: Any, error: BaseException | None) -> None:
    """Call a job's done() once, on the loop thread; a failing one harms no other job."""
    if job.finished:
        return
    job.finished = True
    done, job.done, job.args = job.done, _nothing, None  # let go of the request at once
    try:
        done(result, error)
    except Exception:
        log.exception("callback of a database job failed")


def resolve(outcomes: list[Outcome]) -> None:
    """Answer every job of a finished transaction (on the loop thread)."""
    for job, result, error in outcomes:
        finish(job, result, error)


def _nothing(result: Any, error: BaseException | None) -> None:
    """The callback of a job already answered."""


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """A Done that resolves a future."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def claim(jobs: list[Job], claims: threading.Lock) -> list[Job]:
    """The jobs whose budget has not run out, marked started (their budget no longer
    applies: they are answered when this transaction ends)."""
    with claims:
        live = [job for job in jobs if not job.abandoned]
        for job in live:
            job.started = True
    return live


class Budget:
    """Expires the jobs of one time budget with one timer in all, not a timer per job.

    Jobs are queued in submission order, so their deadlines are in order: the timer only ever
    waits for the oldest job still unanswered, and answered ones are dropped as it passes.
    A job that has not started when its time is up is abandoned: its caller gets
    TimeoutError and it never runs, so an answer given without it is never contradicted by an
    effect committed later. One whose transaction has begun is answered when that commits,
    however late: answering it "try again later" while its increment is being committed would
    count the message twice once Postfix retries it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float,
                 claims: threading.Lock) -> None:
        self._loop, self._seconds, self._claims = loop, seconds, claims
        self._jobs: deque[Job] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, job: Job) -> None:
        """Start the clock of a job."""
        job.deadline = self._loop.time() + self._seconds
        jobs = self._jobs
        while jobs and jobs[0].finished:  # answered: keep nothing alive until the timer
            jobs.popleft()
        jobs.append(job)
        if self._timer is None:
            self._timer = self._loop.call_at(job.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now, jobs = self._loop.time(), self._jobs
        while jobs:
            job = jobs[0]
            if not job.finished:
                if job.deadline > now:
                    self._timer = self._loop.call_at(job.deadline, self._expire)
                    return
                with self._claims:  # against the writer thread starting it right now
                    job.abandoned = not job.started
                if job.abandoned:
                    finish(job, None, TimeoutError("over the time budget"))
            jobs.popleft()

    def cancel(self) -> None:
        """Stop the timer (the store is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
