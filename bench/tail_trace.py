#!/usr/bin/env python3
"""Where slow policy replies come from: `policyd serve` with timing probes, and the matching.

Run as a launcher, it installs probes and then runs the policyd command line:

    tail_trace.py TRACE.json serve --config policyd.ini

The probes write, when the process exits, the moments (time.perf_counter, the machine's
monotonic clock, which tailload.py also uses) of everything that can hold a reply up:
garbage collections (gc.callbacks), event-loop callbacks over 1 ms, policy batches run on the
loop (over 1 ms) and those the loop could not run (handed to the writer thread), the writer
thread's transactions and the time it held the write connection, each WAL checkpoint pass,
and log lines that took over 0.5 ms to write. attribute() then gives each slow reply (start
and end seen by the client) the cause that overlaps it. policy_bench.py --trace runs both.

Probes cost a little (a timer around each loop callback): compare servers without them.
"""
from __future__ import annotations

import asyncio.events
import atexit
import gc
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

clock = time.perf_counter
EVENTS: list[tuple[str, float, float, Any]] = []  # (kind, start, end, detail)
COUNTS: dict[str, int] = {}
CENSUS: list[dict[str, Any]] = []
SLOW_CALLBACK = 0.001
SLOW_LOG = 0.0005


def _count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


def _probe_gc(census: bool) -> None:
    """Every collection counted, those of generations 1 and 2 (and gen 0 over 0.2 ms) listed;
    with census, the objects each older collection has to look at, by type (the first few)."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        gen = info["generation"]
        if phase == "start":
            if census and gen > 0 and gc.get_freeze_count() and \
                    COUNTS.get(f"census{gen}", 0) < 5:
                _count(f"census{gen}")
                CENSUS.append(_census(gen))
            started[0] = clock()
            return
        end = clock()
        _count(f"gc{gen}")
        if gen > 0 or end - started[0] > 0.0002:
            EVENTS.append((f"gc{gen}", started[0], end, info.get("collected", 0)))
    gc.callbacks.append(callback)


def _census(gen: int) -> dict[str, Any]:
    """The objects a collection of gen will traverse: per generation, and the top types."""
    sizes, types = {}, {}
    for g in range(gen + 1):
        objects = gc.get_objects(g)
        sizes[g] = len(objects)
        for o in objects:
            name = type(o).__qualname__
            types[name] = types.get(name, 0) + 1
        del objects
    top = sorted(types.items(), key=lambda kv: -kv[1])[:15]
    return {"t": clock(), "generation": gen, "sizes": sizes, "top": top,
            "frozen": gc.get_freeze_count()}


def _probe_loop() -> None:
    """Event-loop callbacks over 1 ms."""
    run = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        t0 = clock()
        run(self)
        t1 = clock()
        if t1 - t0 > SLOW_CALLBACK:
            EVENTS.append(("callback", t0, t1, _callback_name(self)))
    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]


def _callback_name(handle: asyncio.events.Handle) -> str:
    cb = getattr(handle, "_callback", None)
    name = getattr(cb, "__qualname__", None) or type(cb).__name__
    owner = getattr(cb, "__self__", None)
    return f"{type(owner).__name__}.{name}" if owner is not None and "." not in name else name


def _probe_store() -> None:
    from policyd.store import commit, writer

    conn_cls = commit.WriteConnection
    try_run, thread_run, held = conn_cls.try_without_waiting, conn_cls.run, conn_cls.held
    state = {"checkpoint": False, "after_checkpoint": False}

    def timed_try(self: Any, jobs: list[Any]) -> Any:
        t0 = clock()
        ran = try_run(self, jobs)
        t1 = clock()
        _count("loop_batches" if ran is not None else "handed_to_thread")
        first = state["after_checkpoint"] and ran is not None
        if first:
            state["after_checkpoint"] = False
        if ran is None:
            EVENTS.append(("not_on_loop", t0, t1, len(jobs)))
        elif t1 - t0 > SLOW_CALLBACK:
            EVENTS.append(("loop_batch" + ("_after_ckpt" if first else ""), t0, t1, len(jobs)))
        return ran

    def timed_thread_run(self: Any, jobs: list[Any]) -> Any:
        t0 = clock()
        out = thread_run(self, jobs)
        EVENTS.append(("thread_batch", t0, clock(), len(jobs)))
        return out

    @contextmanager
    def timed_held(self: Any) -> Iterator[None]:
        asked = clock()
        with held(self):
            got = clock()
            try:
                yield
            finally:
                kind = "held_checkpoint" if state["checkpoint"] else "held_thread"
                EVENTS.append((kind, got, clock(), round((got - asked) * 1e6)))

    init = conn_cls.__init__

    def traced_init(self: Any, *args: Any) -> None:
        init(self, *args)
        self._conn = _TimedStatements(self._conn)

    conn_cls.__init__ = traced_init  # type: ignore[method-assign]
    conn_cls.try_without_waiting = timed_try  # type: ignore[method-assign]
    conn_cls.run = timed_thread_run  # type: ignore[method-assign]
    conn_cls.held = timed_held  # type: ignore[method-assign]

    checkpoint, connect = writer.Writer._checkpoint, writer.connect

    def timed_checkpoint(self: Any, conn: Any) -> None:
        state["checkpoint"] = True
        t0 = clock()
        try:
            checkpoint(self, conn)
        finally:
            state["checkpoint"] = False
            state["after_checkpoint"] = True
            EVENTS.append(("checkpoint", t0, clock(), None))
    writer.Writer._checkpoint = timed_checkpoint  # type: ignore[method-assign]
    writer.connect = lambda *a, **k: _TimedConn(connect(*a, **k))  # the checkpointer's


class _TimedConn:
    """The checkpointer's connection, each statement timed with its result."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        t0, cpu = clock(), time.thread_time()
        rows = self._conn.execute(sql, *args).fetchall()
        cpu_us = round((time.thread_time() - cpu) * 1e6)
        EVENTS.append(("checkpoint_pass", t0, clock(), [*(rows[0] if rows else ()), cpu_us]))
        return _Rows(rows)

    def close(self) -> None:
        self._conn.close()


class _TimedStatements:
    """The write connection, its statements over 0.5 ms listed (a COMMIT that waited for a
    write(2) or an fsync, a BEGIN that waited for the lock)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        t0 = clock()
        cur = self._conn.execute(sql, *args)
        t1 = clock()
        if t1 - t0 > SLOW_LOG:
            EVENTS.append(("statement", t0, t1, sql[:40]))
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


def _probe_log() -> None:
    emit = logging.StreamHandler.emit

    def timed_emit(self: logging.StreamHandler, record: logging.LogRecord) -> None:  # type: ignore[type-arg]
        t0 = clock()
        emit(self, record)
        t1 = clock()
        if t1 - t0 > SLOW_LOG:
            EVENTS.append(("log_write", t0, t1, None))
    logging.StreamHandler.emit = timed_emit  # type: ignore[method-assign]


def _dump(path: Path) -> None:
    path.write_text(json.dumps({"events": EVENTS, "counts": COUNTS, "census": CENSUS}),
                    encoding="utf-8")


def install(path: Path) -> None:
    """Every probe; the trace is written to path at exit. TAIL_TRACE_CENSUS=1 also lists
    what the first older collections traverse (slow: for finding what survives)."""
    _probe_gc(os.environ.get("TAIL_TRACE_CENSUS") == "1")
    _probe_loop()
    _probe_store()
    _probe_log()
    atexit.register(_dump, path)


# --- matching ---------------------------------------------------------------------------
# The kinds of event that can hold a reply up, in the order they are reported.
CAUSES = ("held_checkpoint", "checkpoint_pass", "loop_batch_after_ckpt", "thread_batch",
          "not_on_loop", "statement", "gc2", "gc1", "gc0", "log_write", "loop_batch",
          "callback")


def attribute(slow: list[list[float]], events: list[list[Any]],
              min_overlap: float = 0.001) -> dict[str, int]:
    """Count the slow replies (client start and end) by the kinds of event that overlap each
    by at least min_overlap (or half the event): "a+b" when both did, "unexplained" if none."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, t0, t1, _ in events:
        by_kind.setdefault(kind, []).append((t0, t1))
    causes: dict[str, int] = {}
    for start, end in slow:
        kinds = [kind for kind in CAUSES
                 if any(min(end, t1) - max(start, t0) >= min(min_overlap, (t1 - t0) / 2)
                        for t0, t1 in by_kind.get(kind, ()))]
        key = "+".join(kinds) or "unexplained"
        causes[key] = causes.get(key, 0) + 1
    return dict(sorted(causes.items(), key=lambda kv: -kv[1]))


def event_stats(events: list[list[Any]], since: float, until: float) -> dict[str, Any]:
    """Per kind: how many events in [since, until], their median and longest duration (us)."""
    out: dict[str, Any] = {}
    for kind in sorted({e[0] for e in events}):
        d = sorted(e[2] - e[1] for e in events if e[0] == kind and since <= e[1] <= until)
        if d:
            out[kind] = {"n": len(d), "median_us": round(d[len(d) // 2] * 1e6),
                         "max_us": round(d[-1] * 1e6)}
    return out


def main() -> int:
    trace = Path(sys.argv[1])  # policyd is imported from PYTHONPATH (this tree or a baseline)
    install(trace)
    from policyd.cli import main as policyd_main
    return policyd_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
