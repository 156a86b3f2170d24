"""The store: one SQLite file (WAL), one write connection, a few read connections.

Writes go through the one write connection, used by whoever holds its lock. Jobs submitted in
one turn of the event loop are handed over together and run in one `BEGIN IMMEDIATE`
transaction, each inside its own SAVEPOINT (a failing job rolls back alone), and the whole batch
is committed before any caller is answered: group commit. A policy reply therefore never goes
out before its increment is durable. Reads run on a small pool of read-only connections (WAL
readers never block the writer).

Who runs a batch: a writer thread, except for the hot path. Handing a batch to a thread and
the result back costs two thread wake-ups (tens of microseconds each, more than the work
itself), so batches of policy jobs (submit_batched) run right on the event loop when that is
sure not to block it: the lock is free (no write in progress, and the writer thread is not
waiting for it), the database's write lock is
free (busy_timeout 0 on this path: if another process holds it, the batch goes to the writer
thread, which waits under the caller's time budget), a commit does not fsync (synchronous
NORMAL; FULL always uses the thread), and no checkpoint runs on the loop (automatic checkpoints
are off; the writer thread checkpoints every CHECKPOINT_EVERY commits). What remains on the
loop is a few tens of microseconds of SQLite work per batch.

submit_batched() is the hot path's other half: consecutive submissions of one batch function
are run by a single call that gets all their arguments (one fact query and one counter upsert
for a burst of policy requests), and whether nothing but that function's own committed runs has
written to the database since its last run (so what it read then, plus what it wrote, is still
true: a cache it may keep), without a savepoint (its one write is one statement, its last:
SQLite undoes a failed statement by itself), and it answers through a callback called on the
loop as soon as the batch commits, not a future (a future's waiter only runs one loop turn
later). To make batches bigger than one turn's worth, a turn that ends with only jobs of a
busy hot path (the last batch had several) lingers for one more turn: requests read in that
turn join the batch, for one more epoll call (a few microseconds) instead of one more commit.
A job submitted with a budget that has not started when the budget runs out is
abandoned: its caller gets TimeoutError and it never runs, so an answer given without it is
never contradicted by an effect committed later. A job whose transaction has begun is
answered when that commits, however late: answering it "try again later" while its increment
is being committed would count the message twice once Postfix retries it.

SQL lives in the modules of this package; callers pass one of their functions, which receives
a sqlite3.Connection.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from policyd.store.schema import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
Done = Callable[[Any, BaseException | None], None]  # done(result, error), called once
Outcome = tuple["_Job", Any, BaseException | None]
BatchFn = Callable[[sqlite3.Connection, list[Any], bool], list[Any]]
MAX_BATCH = 512
CHECKPOINT_EVERY = 1000  # commits between WAL checkpoints (SQLite's default: 1000 pages)
JOURNAL_SIZE_LIMIT = 64 << 20  # bytes of WAL file kept after it starts over


class StoreError(RuntimeError):
    """The database failed or is closed."""


def connect(path: str | Path, *, synchronous: str = "NORMAL", busy_timeout: float = 5.0,
            readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the pragmas every connection needs."""
    # cached_statements: the hot path's batch statements vary with the batch size
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=busy_timeout, cached_statements=512)
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
    __slots__ = ("fn", "args", "done", "batched", "abandoned", "started", "finished",
                 "deadline")

    def __init__(self, fn: Callable[..., Any], args: Any, done: Done, batched: bool) -> None:
        self.fn, self.args, self.done, self.batched = fn, args, done, batched
        # Under the store's claim lock: one of the two is set, never both.
        self.abandoned = False  # its budget ran out before it started: it never runs
        self.started = False  # its transaction has begun: it is answered when that ends
        self.finished = False  # done() was called (loop thread only)
        self.deadline = 0.0


def _finish(job: _Job, result: Any, error: BaseException | None) -> None:
    """Call a job's done() once, on the loop thread; a failing one harms no other job."""
    if job.finished:
        return
    job.finished = True
    done, job.done, job.args = job.done, _nothing, None  # let go of the request at once
    try:
        done(result, error)
    except Exception:
        log.exception("callback of a database job failed")


def _nothing(result: Any, error: BaseException | None) -> None:
    """The callback of a job already answered."""


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _group_key(job: _Job) -> tuple[Callable[..., Any], bool]:
    return job.fn, job.batched


class _Budget:
    """Expires the jobs of one time budget with one timer in all, not a timer per job.

    Jobs are queued in submission order, so their deadlines are in order: the timer only ever
    waits for the oldest job still unanswered, and answered ones are dropped as it passes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float,
                 claims: threading.Lock) -> None:
        self._loop, self._seconds, self._claims = loop, seconds, claims
        self._jobs: deque[_Job] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, job: _Job) -> None:
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
                    _finish(job, None, TimeoutError("over the time budget"))
            jobs.popleft()

    def cancel(self) -> None:
        """Stop the timer (the store is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _BatchLost(Exception):
    """A failing statement rolled back the whole transaction, not only itself."""


class Store:
    """The database handle shared by the API, the policy server and the scheduler."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL",
                 busy_timeout: float = 5.0, readers: int = 2, write_on_loop: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._options = {"synchronous": synchronous, "busy_timeout": busy_timeout}
        self._busy_ms = int(busy_timeout * 1000)
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._pending: list[_Job] = []  # submitted in this turn of the loop, not yet handed over
        self._linger = False  # the hot path is busy: let the next batch wait one more turn
        # The batch function whose committed run is the last write to the database (nothing
        # else since, in this process or another: see PRAGMA data_version), else None.
        self._last_writer: BatchFn | None = None
        self._data_version: int | None = None
        self._conn: sqlite3.Connection | None = None  # the write connection
        self._lock = threading.Lock()  # held by whoever uses the write connection
        # The writer thread waits for _lock: the loop leaves it alone meanwhile (a Lock is not
        # fair, and a busy loop taking it without blocking would starve the thread).
        self._thread_waiting = False
        self._claims = threading.Lock()  # a job is started or abandoned, never both
        # batches of submit_batched() run on the loop (see above); FULL fsyncs every commit
        self._on_loop = write_on_loop and synchronous != "FULL"
        self._commits = 0  # since the last checkpoint (under _lock)
        self._checkpoint_asked = False
        self._writer: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="db-read")
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._budgets: dict[float, _Budget] = {}
        self._closed = False
        self.batches = 0  # committed transactions
        self.jobs = 0
        self.checkpoints = 0

    @property
    def write_on_loop(self) -> bool:
        """Whether batches of submit_batched() may run on the event loop."""
        return self._on_loop

    async def open(self) -> None:
        """Create/migrate the schema, open the write connection, start the writer thread."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(open_and_migrate, self.path, **self._options)
        self._conn = await asyncio.to_thread(self._connect_writer)
        self._writer = threading.Thread(target=self._writer_main, name="db-write", daemon=True)
        self._writer.start()

    def _connect_writer(self) -> sqlite3.Connection:
        conn = connect(self.path, **self._options)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the writer thread checkpoints, never the loop
        # a WAL that did grow (a long reader, a burst) is cut back when it starts over
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA busy_timeout=0")  # the loop never waits; the thread sets its own
        return conn

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
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
        log.info("store closed: %d write jobs in %d transactions", self.jobs, self.batches)
        self._readers.shutdown(wait=True)
        for conn in self._read_conns:
            conn.close()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(conn, *args) for the writer; the future resolves after the commit."""
        if self._loop is None:
            raise StoreError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._enqueue(_Job(fn, args, lambda r, e: _settle(future, r, e), False), None)
        return future

    def submit_batched(self, fn: Callable[[sqlite3.Connection, list[A], bool], list[T]],
                       arg: A, done: Callable[[T | None, BaseException | None], None], *,
                       budget: float | None = None) -> None:
        """Queue arg for fn, which is called once for a run of such submissions as
        fn(conn, [arg, ...], continued) -> [result, ...]; done(result, None) or
        done(None, error) is then called on the loop once the batch has committed (or failed,
        or its budget in seconds ran out). A result that is an Exception is that submission's
        error. fn reads first and writes with one statement, its last (if that fails, SQLite
        undoes it and fn may write again, piece by piece): if fn raises, every submission of
        the run fails. continued is True when the
        last write to the database was fn's own previous run and it committed: nothing else
        (no other job, connection or process) has written since. fn is compared by identity."""
        self._enqueue(_Job(fn, arg, done, True), budget)

    def _enqueue(self, job: _Job, budget: float | None) -> None:
        loop = self._loop
        if self._closed or loop is None:
            raise StoreError("store is closed")
        if budget is not None:
            timer = self._budgets.get(budget)
            if timer is None:
                timer = self._budgets[budget] = _Budget(loop, budget, self._claims)
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
        if self._on_loop:
            if batched and self._run_on_loop(batched):
                jobs = [job for job in jobs if not job.batched]
        if jobs:
            self._queue.put(jobs)

    def _run_on_loop(self, jobs: list[_Job]) -> bool:
        """Run a batch right here if nothing would make the loop wait; False if not run."""
        if self._thread_waiting or not self._lock.acquire(blocking=False):
            return False  # the writer thread is in a transaction, or about to be
        try:
            conn = self._conn
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:
                return False  # another process holds the write lock: the thread waits for it
            outcomes = self._commit(conn, jobs)
            checkpoint = self._commits >= CHECKPOINT_EVERY and not self._checkpoint_asked
            self._checkpoint_asked |= checkpoint
        finally:
            self._lock.release()
        _resolve(outcomes)
        if checkpoint:
            self._queue.put([])  # wakes the writer thread, which checkpoints
        return True

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

    # --- the write transaction, on the loop or in the writer thread ---------------------
    def _claim(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs whose budget has not run out, marked started (their budget no longer
        applies: they are answered when this transaction ends)."""
        with self._claims:
            live = [job for job in jobs if not job.abandoned]
            for job in live:
                job.started = True
        return live

    def _commit(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[Outcome]:
        """Run jobs in the open transaction and commit; if that fails, all of them fail."""
        try:
            # None until this commit is known to have happened (a failure leaves it so)
            last_writer, self._last_writer = self._last_writer, None
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:  # another connection wrote
                self._data_version, last_writer = version, None
            outcomes, last_writer = _run_jobs(conn, self._claim(jobs), last_writer)
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
        self._commits += 1
        return outcomes

    # --- the writer thread -------------------------------------------------------------
    def _writer_main(self) -> None:
        conn = self._conn
        assert conn is not None
        # Checkpoints use a connection of their own: a PASSIVE checkpoint never takes the
        # write lock, so writes (on the loop) go on while it copies most pages and fsyncs
        # (see _checkpoint for the short part that does hold the write connection).
        checkpointer = connect(self.path, **self._options)
        try:
            stop = False
            while not stop:
                batch, stop = self._next_batch()
                if batch:
                    self._run_batch(conn, batch)
                if self._commits >= CHECKPOINT_EVERY:
                    self._checkpoint(checkpointer)
        finally:
            checkpointer.close()
            with self._held():
                conn.close()

    def _next_batch(self) -> tuple[list[_Job], bool]:
        """Wait for jobs, then take whatever else is queued (up to MAX_BATCH); True = stop."""
        jobs = self._queue.get()
        if jobs is None:
            return [], True
        batch = list(jobs)
        while len(batch) < MAX_BATCH:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch += more
        return batch, False

    @contextmanager
    def _held(self) -> Iterator[None]:
        """The write connection's lock, taken in the writer thread: the loop stops taking it
        (and hands its batches over) until the thread has it."""
        self._thread_waiting = True
        try:
            self._lock.acquire()
        finally:
            self._thread_waiting = False
        try:
            yield
        finally:
            self._lock.release()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        with self._held():
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")  # here waiting is fine
            try:
                conn.execute("BEGIN IMMEDIATE")
                outcomes = self._commit(conn, batch)
            except sqlite3.Error as exc:  # BEGIN failed: e.g. locked past busy_timeout
                log.error("database write failed: %s", exc)
                outcomes = _failed(batch, exc)
            finally:
                conn.execute("PRAGMA busy_timeout=0")
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, outcomes)
        except RuntimeError:  # loop closed during shutdown: nobody is waiting any more
            pass

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL back into the database, so that the next write starts it over.

        SQLite only rewinds the WAL when a write begins with every frame copied back. A
        checkpoint running beside the writes (PASSIVE, on its own connection) never gets there
        under steady load: frames are appended while it copies, and the WAL, and with it the
        cost of every page lookup, grows without end (880 MB in a minute of the benchmark).
        So: first the bulk, beside the writes; then, holding the write connection (our writes
        wait, for about one fsync), the few frames written meanwhile.
        """
        with self._held():
            self._commits = 0
            self._checkpoint_asked = False
            self.checkpoints += 1
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the bulk, beside the writes
            with self._held():  # the rest: the next write then starts the WAL over
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next round tries again
            log.warning("WAL checkpoint failed: %s", exc)


def _run_jobs(conn: sqlite3.Connection, jobs: list[_Job],
              last_writer: BatchFn | None) -> tuple[list[Outcome], BatchFn | None]:
    """Run jobs in order; also return the batch function that wrote last (None when
    anything else wrote after it, or it failed)."""
    outcomes: list[Outcome] = []
    for (fn, batched), group in groupby(jobs, key=_group_key):
        if batched:
            ran, ok = _run_batched(conn, fn, list(group), fn is last_writer)
            last_writer = fn if ok else None
            outcomes += ran
        else:
            outcomes += [_run_job(conn, job) for job in group]
            last_writer = None
    return outcomes, last_writer


def _failed(jobs: list[_Job], exc: BaseException) -> list[Outcome]:
    error = StoreError(f"database write failed: {exc}")
    return [(job, None, error) for job in jobs]


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:  # the next BEGIN will tell whether the database is usable
        log.error("database rollback failed: %s", exc)


def _run_job(conn: sqlite3.Connection, job: _Job) -> Outcome:
    conn.execute("SAVEPOINT job")
    try:
        result = job.fn(conn, *job.args)
    except Exception as exc:  # this job alone is undone; the batch goes on
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return job, None, exc
    conn.execute("RELEASE job")
    return job, result, None


def _run_batched(conn: sqlite3.Connection, fn: BatchFn, jobs: list[_Job],
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


def _resolve(outcomes: list[Outcome]) -> None:
    for job, result, error in outcomes:
        _finish(job, result, error)
