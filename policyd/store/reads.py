"""Reads: a small pool of read-only connections, one per worker thread (WAL readers never
block the writer)."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from policyd.store.connection import connect

T = TypeVar("T")


class ReadPool:
    """Runs fn(conn, *args) in one read transaction on a worker thread."""

    def __init__(self, path: Path, options: dict[str, Any], workers: int) -> None:
        self._path, self._options = path, options
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db-read")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn's result, from a consistent snapshot."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._read,
                                                                fn, args)

    def close(self) -> None:
        """Wait for running reads, then close every connection."""
        self._executor.shutdown(wait=True)
        for conn in self._conns:
            conn.close()

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, readonly=True, **self._options)
            self._local.conn = conn
            self._conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(conn, *args)
        finally:
            conn.execute("COMMIT")
