"""The store: one SQLite file (WAL), one write path, a few read connections.

All writes go through a single writer thread that owns the only write connection. Jobs queued
while it works are run together in one `BEGIN IMMEDIATE` transaction, each inside its own
SAVEPOINT (a failing job rolls back alone), and the whole batch is committed before any caller
is answered: group commit. A policy reply therefore never goes out before its increment is
durable, and a burst of requests shares one commit and one thread hop. Reads run on a small pool
of read-only connections (WAL readers never block the writer).

SQL lives in the modules of this package; callers pass one of their functions, which receives
a sqlite3.Connection.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from policyd.store.schema import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BATCH = 512


class StoreError(RuntimeError):
    """The database failed or is closed."""


def connect(path: str | Path, *, synchronous: str = "NORMAL", busy_timeout: float = 5.0,
            readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the pragmas every connection needs."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    else:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def open_and_migrate(path: str | Path, **options: Any) -> None:
    """Create the database file if needed and bring its schema up to date."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, **options)
    try:
        migrate(conn)
    finally:
        conn.close()


class _Job:
    __slots__ = ("fn", "args", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 future: asyncio.Future[Any]) -> None:
        self.fn, self.args, self.future = fn, args, future


class Store:
    """The database handle shared by the API, the policy server and the scheduler."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL",
                 busy_timeout: float = 5.0, readers: int = 2) -> None:
        self.path = Path(path).expanduser()
        self._options = {"synchronous": synchronous, "busy_timeout": busy_timeout}
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="db-read")
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.batches = 0
        self.jobs = 0

    async def open(self) -> None:
        """Create/migrate the schema and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(open_and_migrate, self.path, **self._options)
        ready = threading.Event()
        self._writer = threading.Thread(target=self._writer_main, args=(ready,),
                                        name="db-write", daemon=True)
        self._writer.start()
        await asyncio.to_thread(ready.wait)

    async def close(self) -> None:
        """Finish queued writes, then close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
        self._readers.shutdown(wait=True)
        for conn in self._read_conns:
            conn.close()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(conn, *args) for the writer; the future resolves after the commit."""
        if self._closed or self._loop is None:
            raise StoreError("store is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Job(fn, args, future))
        return future

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) atomically in the write transaction and return its result."""
        return await self.submit(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) on a read-only connection in one read transaction."""
        if self._closed or self._loop is None:
            raise StoreError("store is closed")
        return await self._loop.run_in_executor(self._readers, self._read, fn, args)

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True, **self._options)
            self._local.conn = conn
            self._read_conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(conn, *args)
        finally:
            conn.execute("COMMIT")

    # --- the writer thread -------------------------------------------------------------
    def _writer_main(self, ready: threading.Event) -> None:
        conn = connect(self.path, **self._options)
        ready.set()
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                batch = [job]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [self._run_job(conn, job) for job in batch]
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("database write failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"database write failed: {exc}")
            outcomes = [(job.future, None, error) for job in batch]
        self.batches += 1
        self.jobs += len(batch)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, outcomes)
        except RuntimeError:  # loop closed during shutdown: nobody is waiting any more
            pass

    @staticmethod
    def _run_job(conn: sqlite3.Connection,
                 job: _Job) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
        conn.execute("SAVEPOINT job")
        try:
            result = job.fn(conn, *job.args)
        except Exception as exc:  # this job alone is undone; the batch goes on
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            return job.future, None, exc
        conn.execute("RELEASE job")
        return job.future, result, None


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
