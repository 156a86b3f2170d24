"""Group commit on the one write connection: the jobs handed over together run in one
`BEGIN IMMEDIATE` transaction, each in its own SAVEPOINT (a failing job rolls back alone), or,
for a run of batched submissions, in one call of their batch function; then one COMMIT, and
only then is anyone answered.

The connection is used by whoever holds its lock: the writer thread (which may wait for the
database), or the event loop for a batch that can run without waiting (`try_without_waiting`).
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator

from policyd.store.connection import StoreError, connect_writer
from policyd.store.jobs import Job, Outcome, claim

log = logging.getLogger(__name__)
BatchFn = Callable[[sqlite3.Connection, list[Any], bool], list[Any]]


class _BatchLost(Exception):
    """A failing statement rolled back the whole transaction, not only itself."""


class WriteConnection:
    """The write connection, its lock, and what group commit remembers between batches."""

    def __init__(self, path: Path, options: dict[str, Any], checkpoint_every: int) -> None:
        self._conn = connect_writer(path, **options)
        self._busy_ms = int(options.get("busy_timeout", 5.0) * 1000)
        self._lock = threading.Lock()  # held by whoever uses the connection
        # The writer thread waits for _lock: the loop leaves it alone meanwhile (a Lock is not
        # fair, and a busy loop taking it without blocking would starve the thread).
        self._thread_waiting = False
        self.claims = threading.Lock()  # a job is started or abandoned, never both
        # The batch function whose committed run is the last write to the database (nothing
        # else since, in this process or another: see PRAGMA data_version), else None.
        self._last_writer: BatchFn | None = None
        self._data_version: int | None = None
        self.checkpoint_every = checkpoint_every
        self.commits = 0  # since the last checkpoint (under the lock)
        self.checkpoint_asked = False
        self.batches = 0  # committed transactions
        self.jobs = 0

    def try_without_waiting(self, jobs: list[Job]) -> tuple[list[Outcome], bool] | None:
        """Run jobs right here if nothing would make the caller wait: the lock is free (and
        the writer thread is not waiting for it) and so is the database's write lock
        (busy_timeout 0). None if not run; else the outcomes, and whether a checkpoint is
        now due (the caller wakes the writer thread for it)."""
        if self._thread_waiting or not self._lock.acquire(blocking=False):
            return None  # the writer thread is in a transaction, or about to be
        try:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:
                return None  # another process holds the write lock: the thread waits for it
            outcomes = self._commit(jobs)
            due = self.commits >= self.checkpoint_every and not self.checkpoint_asked
            self.checkpoint_asked |= due
        finally:
            self._lock.release()
        return outcomes, due

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Run jobs, waiting for the lock and the database (up to busy_timeout): the writer
        thread's way."""
        conn = self._conn
        with self.held():
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")  # here waiting is fine
            try:
                conn.execute("BEGIN IMMEDIATE")
                return self._commit(jobs)
            except sqlite3.Error as exc:  # BEGIN failed: e.g. locked past busy_timeout
                log.error("database write failed: %s", exc)
                return _failed(jobs, exc)
            finally:
                conn.execute("PRAGMA busy_timeout=0")

    @contextmanager
    def held(self) -> Iterator[None]:
        """The lock, taken in the writer thread: the loop stops taking it (and hands its
        batches over) until the thread has it."""
        self._thread_waiting = True
        try:
            self._lock.acquire()
        finally:
            self._thread_waiting = False
        try:
            yield
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the connection (once nothing uses it)."""
        with self.held():
            self._conn.close()

    def _commit(self, jobs: list[Job]) -> list[Outcome]:
        """Run jobs in the open transaction and commit; if that fails, all of them fail."""
        conn = self._conn
        try:
            # None until this commit is known to have happened (a failure leaves it so)
            last_writer, self._last_writer = self._last_writer, None
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:  # another connection wrote
                self._data_version, last_writer = version, None
            outcomes, last_writer = _run_jobs(conn, claim(jobs, self.claims), last_writer)
            conn.execute("COMMIT")
            self._last_writer = last_writer
        except Exception as exc:  # the whole batch failed: nothing of it was committed
            if isinstance(exc, (sqlite3.Error, _BatchLost)):
                log.error("database write failed: %s", exc)
            else:  # a bug, not the database: logged in full, and the writer lives on
                log.exception("database write batch failed")
            _rollback(conn)
            return _failed(jobs, exc)
        self.batches += 1
        self.jobs += len(jobs)
        self.commits += 1
        return outcomes


def _run_jobs(conn: sqlite3.Connection, jobs: list[Job],
              last_writer: BatchFn | None) -> tuple[list[Outcome], BatchFn | None]:
    """Run jobs in order; also return the batch function that wrote last (None when
    anything else wrote after it, or it failed)."""
    outcomes: list[Outcome] = []
    for (fn, batched), group in groupby(jobs, key=Job.group_key):
        if batched:
            ran, ok = _run_batched(conn, fn, list(group), fn is last_writer)
            last_writer = fn if ok else None
            outcomes += ran
        else:
            outcomes += [_run_job(conn, job) for job in group]
            last_writer = None
    return outcomes, last_writer


def _failed(jobs: list[Job], exc: BaseException) -> list[Outcome]:
    error = StoreError(f"database write failed: {exc}")
    return [(job, None, error) for job in jobs]


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:  # the next BEGIN will tell whether the database is usable
        log.error("database rollback failed: %s", exc)


def _run_job(conn: sqlite3.Connection, job: Job) -> Outcome:
    conn.execute("SAVEPOINT job")
    try:
        result = job.fn(conn, *job.args)
    except Exception as exc:  # this job alone is undone; the batch goes on
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return job, None, exc
    conn.execute("RELEASE job")
    return job, result, None


def _run_batched(conn: sqlite3.Connection, fn: BatchFn, jobs: list[Job],
                 continued: bool) -> tuple[list[Outcome], bool]:
    """One call of a batch function for a run of its submissions (no savepoint needed);
    also whether the call itself succeeded. A result that is an Exception fails its own
    submission alone."""
    try:
        results = fn(conn, [job.args for job in jobs], continued)
        if len(results) != len(jobs):
            raise RuntimeError(f"{len(results)} results for {len(jobs)} jobs")
    except Exception as exc:
        # It wrote nothing, or its one failed statement was undone by SQLite; unless the
        # error (SQLITE_FULL, IOERR...) rolled back the whole batch: then all of it failed.
        if not conn.in_transaction:
            raise _BatchLost(str(exc)) from exc
        return [(job, None, exc) for job in jobs], False
    return [(job, None, result) if isinstance(result, Exception) else (job, result, None)
            for job, result in zip(jobs, results)], True
