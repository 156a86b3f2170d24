"""The writer thread: runs the batches the event loop hands over (those that may wait for
the database), and checkpoints the WAL."""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any

from policyd.store.commit import WriteConnection
from policyd.store.connection import connect
from policyd.store.jobs import Job, resolve

log = logging.getLogger(__name__)
MAX_BATCH = 512  # jobs in one transaction


class Writer:
    """A thread that takes batches from a queue; None in the queue stops it."""

    def __init__(self, path: Path, options: dict[str, Any], writes: WriteConnection,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._path, self._options = path, options
        self._writes = writes
        self._loop = loop
        self._queue: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="db-write", daemon=True)
        self.checkpoints = 0

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def put(self, jobs: list[Job]) -> None:
        """Queue jobs for one transaction ([] only wakes the thread, to checkpoint)."""
        self._queue.put(jobs)

    async def stop(self) -> None:
        """Finish what is queued, then stop the thread and close the write connection."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _main(self) -> None:
        writes = self._writes
        # Checkpoints use a connection of their own: a PASSIVE checkpoint never takes the
        # write lock, so writes (on the loop) go on while it copies most pages and fsyncs
        # (see _checkpoint for the short part that does hold the write connection).
        checkpointer = connect(self._path, **self._options)
        try:
            stop = False
            while not stop:
                batch, stop = self._next_batch()
                if batch:
                    self._answer(writes.run(batch))
                if writes.commits >= writes.checkpoint_every:
                    self._checkpoint(checkpointer)
        finally:
            checkpointer.close()
            writes.close()

    def _next_batch(self) -> tuple[list[Job], bool]:
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

    def _answer(self, outcomes: list[Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(resolve, outcomes)
        except RuntimeError:  # loop closed during shutdown: nobody is waiting any more
            pass

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL back into the database, so that the next write starts it over.

        SQLite only rewinds the WAL when a write begins with every frame copied back. A
        checkpoint running beside the writes (PASSIVE, on its own connection) never gets there
        under steady load: frames are appended while it copies, and the WAL, and with it the
        cost of every page lookup, grows without end. So: first the bulk, beside the writes;
        then, holding the write connection (our writes wait, for about one fsync), the few
        frames written meanwhile. Both are PASSIVE: they never wait for readers (a long
        reader, or Litestream's, only leaves frames for the next round).
        """
        writes = self._writes
        with writes.held():
            writes.commits = 0
            writes.checkpoint_asked = False
            self.checkpoints += 1
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the bulk, beside the writes
            with writes.held():  # the rest: the next write then starts the WAL over
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next round tries again
            log.warning("WAL checkpoint failed: %s", exc)
