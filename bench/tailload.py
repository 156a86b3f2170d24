#!/usr/bin/env python3
"""The shared load generator's closed loop, keeping the time of every reply.

policyload.py (/work/shared/tools) reports p50/p90/p99 and the maximum but not p99.9, and not
*when* the slow replies came, which is what it takes to match them with what the server was
doing. This client sends the very same requests (policyload's make_request) on N persistent
connections, one request at a time on each, over K processes, and reports throughput, the
latency distribution (p50, p90, p99, p99.9, max, counts over 2/5/10 ms) and every reply over
--slow-ms with its start and end on the monotonic clock (time.perf_counter, which all processes
of the machine share), so a traced server's events can be laid beside them
(tail_trace.py).

    tailload.py --port 10040 --connections 10 --duration 4 --domains 200
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(os.environ.get("POLICYD_TOOLS", "/work/shared/tools"))
sys.path.insert(0, str(TOOLS))
from policyload import make_request  # noqa: E402  (the same requests as the shared tool)

OVER_MS = (2, 5, 10)  # the distribution's tail, counted


async def one_connection(cid: int, a: argparse.Namespace, deadline: float,
                         lat: list[float], slow: list[tuple[float, float]],
                         stats: dict[str, int]) -> None:
    """policyload's closed loop on one connection, noting every slow reply's start and end."""
    try:
        reader, writer = await asyncio.open_connection(a.host, a.port, limit=1 << 20)
    except OSError:
        stats["connect_errors"] += 1
        return
    rnd = random.Random(cid)
    limit = a.slow_ms / 1000
    clock = time.perf_counter
    try:
        while clock() < deadline:
            req = make_request(rnd.randrange(1 << 30), a)
            t0 = clock()
            writer.write(req)
            try:
                reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), a.timeout)
            except asyncio.TimeoutError:
                stats["timeouts"] += 1
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                stats["closed"] += 1
                return
            t1 = clock()
            if not reply.startswith(b"action="):
                stats["bad_replies"] += 1
                continue
            dt = t1 - t0
            lat.append(dt)
            if dt > limit:
                slow.append((t0, t1))
    finally:
        writer.close()


async def run_client(a: argparse.Namespace, conns: list[int]) -> dict[str, Any]:
    """Every connection of one process until the deadline."""
    stats = {"connect_errors": 0, "timeouts": 0, "closed": 0, "bad_replies": 0}
    lat: list[float] = []
    slow: list[tuple[float, float]] = []
    start = time.perf_counter()
    await asyncio.gather(*(one_connection(c, a, start + a.duration, lat, slow, stats)
                           for c in conns))
    return {"lat": lat, "slow": slow, "stats": stats, "start": start,
            "elapsed": time.perf_counter() - start}


def _worker(a: argparse.Namespace, conns: list[int], q: Any) -> None:
    q.put(asyncio.run(run_client(a, conns)))


def pct(ordered: list[float], p: float) -> float:
    """policyload's percentile (the same index rule, so the numbers compare)."""
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def summary(results: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    """One run's numbers from the processes' results."""
    lat = sorted(x for r in results for x in r["lat"])
    elapsed = max(r["elapsed"] for r in results)
    stats = {k: sum(r["stats"][k] for r in results) for k in results[0]["stats"]}
    us = {f"p{str(p).replace('.', '')}_us": round(pct(lat, p) * 1e6)
          for p in (50, 90, 99, 99.9)}
    return {
        "connections": connections, "requests": len(lat), "seconds": round(elapsed, 3),
        "rps": round(len(lat) / elapsed, 1) if elapsed else 0.0, **us,
        "max_us": round((lat[-1] if lat else 0) * 1e6),
        **{f"over_{ms}ms": sum(1 for x in lat if x > ms / 1000) for ms in OVER_MS},
        "errors": sum(stats.values()), **stats,
        "start": min(r["start"] for r in results),
        "slow": sorted((round(t0, 6), round(t1, 6)) for r in results for t0, t1 in r["slow"]),
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Run the load as a.* says; the summary."""
    procs = max(1, min(a.procs, a.connections))
    groups = [list(range(i, a.connections, procs)) for i in range(procs)]
    if procs == 1:
        results = [asyncio.run(run_client(a, groups[0]))]
    else:
        q: Any = mp.Queue()
        workers = [mp.Process(target=_worker, args=(a, g, q)) for g in groups]
        for w in workers:
            w.start()
        results = [q.get() for _ in workers]
        for w in workers:
            w.join()
    return summary(results, a.connections)


def parser() -> argparse.ArgumentParser:
    """The options (policyload's names where they mean the same)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--duration", type=float, default=4.0, help="seconds")
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--domain-prefix", default="d")
    p.add_argument("--state", default="END-OF-MESSAGE",
                   choices=["RCPT", "DATA", "END-OF-MESSAGE"])
    p.add_argument("--no-sasl", dest="sasl", action="store_false")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--procs", type=int, default=1, help="client processes")
    p.add_argument("--slow-ms", type=float, default=5.0,
                   help="replies slower than this are listed with their times")
    return p


def main() -> None:
    out = run(parser().parse_args())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
