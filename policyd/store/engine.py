"""The Store: the one handle on the database that the API, the policy server and the jobs
share. It queues writes per turn of the event loop and decides who runs each batch: the loop
itself (the policy hot path, when nothing can make it wait) or the writer thread. See
policyd/store/README.md for the design and why."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, TypeVar

from policyd.store.commit import WriteConnection
from policyd.store.connection import StoreError, open_and_migrate
from policyd.store.jobs import Budget, Job, resolve, settle
from policyd.store.reads import ReadPool
from policyd.store.writer import MAX_BATCH, Writer

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
CHECKPOINT_EVERY = 1000  # commits between WAL checkpoints (SQLite's default: 1000 pages)


class Store:
    """The database handle shared by the API, the policy server and the scheduler."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL",
                 busy_timeout: float = 5.0, readers: int = 2, write_on_loop: bool = True,
                 checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        self.path = Path(path).expanduser()
        self._options: dict[str, Any] = {"synchronous": synchronous,
                                         "busy_timeout": busy_timeout}
        self._readers = readers
        self._checkpoint_every = checkpoint_every
        # batches of submit_batched() may run on the loop; FULL fsyncs every commit: never
        self._on_loop = write_on_loop and synchronous != "FULL"
        self._pending: list[Job] = []  # submitted in this turn of the loop, not handed over
        self._linger = False  # the hot path is busy: let the next batch wait one more turn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writes: WriteConnection | None = None
        self._writer: Writer | None = None
        self._reads: ReadPool | None = None
        self._budgets: dict[float, Budget] = {}
        self._closed = False

    @property
    def write_on_loop(self) -> bool:
        """Whether batches of submit_batched() may run on the event loop."""
        return self._on_loop

    @property
    def batches(self) -> int:
        """Committed transactions."""
        return self._writes.batches if self._writes else 0

    @property
    def jobs(self) -> int:
        """Jobs committed."""
        return self._writes.jobs if self._writes else 0

    @property
    def checkpoint_every(self) -> int:
        """Commits between WAL checkpoints."""
        return self._writes.checkpoint_every if self._writes else self._checkpoint_every

    @checkpoint_every.setter
    def checkpoint_every(self, commits: int) -> None:
        self._checkpoint_every = commits
        if self._writes is not None:
            self._writes.checkpoint_every = commits

    @property
    def checkpoints(self) -> int:
        """WAL checkpoints run."""
        return self._writer.checkpoints if self._writer else 0

    async def open(self) -> None:
        """Create/migrate the schema, open the write connection, start the writer thread."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(open_and_migrate, self.path, **self._options)
        self._writes = await asyncio.to_thread(WriteConnection, self.path, self._options,
                                               self._checkpoint_every)
        self._writer = Writer(self.path, self._options, self._writes, self._loop)
        self._writer.start()
        self._reads = ReadPool(self.path, self._options, self._readers)

    async def close(self) -> None:
        """Finish queued writes, then close every connection."""
        if self._closed:
            return
        self._closed = True
        for budget in self._budgets.values():
            budget.cancel()
        if self._writer is not None:
            self._hand_over()
            self._on_loop = False
            await self._writer.stop()
        log.info("store closed: %d write jobs in %d transactions", self.jobs, self.batches)
        if self._reads is not None:
            self._reads.close()

    def write(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(conn, *args) to run atomically in a write transaction (in its own
        savepoint); the future resolves to its result once that transaction has committed."""
        if self._loop is None:
            raise StoreError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._enqueue(Job(fn, args, lambda r, e: settle(future, r, e), False), None)
        return future

    def submit_batched(self, fn: Callable[[Any, list[A], bool], list[T | Exception]], arg: A,
                       done: Callable[[T | None, BaseException | None], None], *,
                       budget: float | None = None) -> None:
        """Queue arg for fn, which is called once for a run of such submissions as
        fn(conn, [arg, ...], continued) -> [result, ...]; done(result, None) or
        done(None, error) is then called on the loop once the batch has committed (or failed,
        or its budget in seconds ran out). A result that is an Exception is that submission's
        error. fn reads first and writes with one statement, its last (if that fails, SQLite
        undoes it and fn may write again, piece by piece): if fn raises, every submission of
        the run fails. continued is True when the last write to the database was fn's own
        previous run and it committed: nothing else (no other job, connection or process) has
        written since. fn is compared by identity."""
        self._enqueue(Job(fn, arg, done, True), budget)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) on a read-only connection in one read transaction."""
        if self._closed or self._reads is None:
            raise StoreError("store is closed")
        return await self._reads.read(fn, *args)

    def _enqueue(self, job: Job, budget: float | None) -> None:
        loop = self._loop
        if self._closed or loop is None:
            raise StoreError("store is closed")
        if budget is not None:
            timer = self._budgets.get(budget)
            if timer is None:
                assert self._writes is not None
                timer = self._budgets[budget] = Budget(loop, budget, self._writes.claims)
            timer.add(job)
        pending = self._pending
        pending.append(job)
        if len(pending) == 1:
            loop.call_soon(self._turn_over)

    def _turn_over(self) -> None:
        """The turn that queued the first pending job is over: hand the jobs over, or, when
        the hot path is busy, wait one more turn for the requests it is about to read."""
        if self._linger and len(self._pending) < MAX_BATCH:
            self._linger = False
            assert self._loop is not None
            self._loop.call_soon(self._hand_over)
        else:
            self._hand_over()

    def _hand_over(self) -> None:
        """Run or queue every job submitted in one turn of the loop: one commit for all."""
        jobs, self._pending = self._pending, []
        batched = [job for job in jobs if job.batched]
        self._linger = len(batched) > 1 and len(batched) == len(jobs)
        if self._on_loop and batched and self._run_on_loop(batched):
            jobs = [job for job in jobs if not job.batched]
        if jobs:
            assert self._writer is not None
            self._writer.put(jobs)

    def _run_on_loop(self, jobs: list[Job]) -> bool:
        """Run a batch right here if nothing would make the loop wait; False if not run."""
        assert self._writes is not None and self._writer is not None
        ran = self._writes.try_without_waiting(jobs)
        if ran is None:
            return False
        outcomes, checkpoint_due = ran
        resolve(outcomes)
        if checkpoint_due:
            self._writer.put([])  # wakes the writer thread, which checkpoints
        return True
