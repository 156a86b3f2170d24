#!/usr/bin/env python3
"""Policy server throughput and latency against the null server, measured in one run.

Starts /work/shared/tools/nullpolicy.py (parse and answer DUNNO, no database) and `policyd serve`
on a fresh temporary database seeded with 1,000 verified domains (d0.test .. d999.test, no
limits), then loads both at each connection count with the shared load generator's requests
(tailload.py: policyload's closed loop, keeping every reply's time): every request an outbound
END-OF-MESSAGE, so each policyd reply is the full decision plus one durable counter increment
committed before the reply. Prints each round's latency distribution and a table of medians,
and writes both as JSON. With --trace, policyd runs under tail_trace.py's probes and every
reply over 5 ms is matched with what the server was doing then.

    .venv/bin/python bench/policy_bench.py --duration 5 --out bench/results.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from policyd.store import Store  # noqa: E402
from policyd.store import domains as domain_store  # noqa: E402
from policyd.store import mailboxes as mailbox_store  # noqa: E402
from policyd.store.scope import MASTER  # noqa: E402
from tests.ports import free_port  # noqa: E402  (re-exported: the other benchmarks use it)

TOOLS = Path(os.environ.get("POLICYD_TOOLS", "/work/shared/tools"))
BENCH = Path(__file__).resolve().parent
DOMAINS = 1000
LOGINS = 97  # policyload sends as user{i % 97}@dJ.test: with --senders, each is a mailbox
# [senders] of the senders mode: limits high enough never to refuse (the check still runs),
# the lock on (every login is tracked; the load comes from one client address)
SENDERS = "[senders]\nhourly_limit = 1000000000\ndaily_limit = 1000000000\nlock_distinct_ips = 5\n"
PERCENTILES = ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")


@dataclass(frozen=True)
class Target:
    """One server under test: a label and the command that starts it on a port."""

    label: str
    argv: list[str]
    port: int
    trace: Path | None = None  # where tail_trace.py's probes write, if traced


def _seed_rows(conn: Any, count: int, logins: int) -> int:
    for i in range(count):
        name = f"d{i}.test"
        domain_store.create_domain(conn, MASTER, name, None, "unlimited", (None, None))
        domain_store.set_ses(conn, name, status="success", dkim_status="Success",
                             token="tok", dkim_tokens=("a", "b", "c"))
        for n in range(logins):  # a fixed hash: nobody logs in, the policy only looks it up
            mailbox_store.create_mailbox(conn, MASTER, f"user{n}", name,
                                         {"password_hash": "{BLF-CRYPT}$2b$04$bench"})
    return count


async def seed(db: Path, count: int, logins: int = 0) -> None:
    """Create count verified, unlimited domains (and logins mailboxes in each) in one write
    transaction through the store."""
    store = Store(db)
    await store.open()
    try:
        await store.write(_seed_rows, count, logins)
    finally:
        await store.close()


def write_config(workdir: Path, policy_port: int, log_decisions: bool,
                 name: str = "policyd", extra: str = "", db: Path | None = None) -> Path:
    """A config on db (workdir's policyd.sqlite3 by default); everything else is the built-in
    default but ports (and extra sections)."""
    path = workdir / f"{name}-{'log' if log_decisions else 'nolog'}.ini"
    path.write_text(
        f"[database]\npath = {db or workdir / 'policyd.sqlite3'}\n"
        f"[policy]\nlisten = 127.0.0.1:{policy_port}\n"
        f"log_decisions = {'true' if log_decisions else 'false'}\n"
        f"[api]\nlisten = 127.0.0.1:{free_port()}\n"
        f"[auth]\nmaster_token = {secrets.token_urlsafe(24)}\n"
        # no AWS from a benchmark: SES off, and no scheduler polling it
        "[ses]\nauto_verify = false\nendpoint_url = http://127.0.0.1:9\n"
        "[scheduler]\nenabled = false\n" + extra, encoding="utf-8")
    return path


def serve_argv(config: Path, tree: Path | None, trace: Path | None = None) -> list[str]:
    """`policyd serve` from this checkout, or from another source tree (a baseline); with
    trace, under tail_trace.py's probes, which write that file at exit."""
    if trace is not None:
        return ["env", f"PYTHONPATH={tree or REPO}", sys.executable, str(BENCH / "tail_trace.py"),
                str(trace), "serve", "--config", str(config)]
    if tree is None:
        return [str(Path(sys.executable).with_name("policyd")), "serve", "--config", str(config)]
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "policyd", "serve", "--config",
            str(config)]


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Return once port accepts connections; fail if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


class Running:
    """A started server process, stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, target: Target, log: Path) -> None:
        self.target = target
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(target.argv, stdout=self._log, stderr=self._log,
                                     cwd=log.parent)
        try:
            wait_listening(target.port, self.proc)
        except SystemExit as exc:
            self._log.close()
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SystemExit(f"{exc}; {target.label}'s log ends:\n{tail}") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


SLOW_MS = 5.0  # replies slower than this are listed (and, with --trace, explained)


def load(port: int, connections: int, duration: float, procs: int, domains: int,
         slow_ms: float = SLOW_MS) -> dict[str, Any]:
    """One tailload run (policyload's requests and loop); its JSON summary."""
    argv = [sys.executable, str(BENCH / "tailload.py"), "--port", str(port),
            "--connections", str(connections), "--duration", str(duration),
            "--domains", str(domains), "--state", "END-OF-MESSAGE", "--procs", str(procs),
            "--slow-ms", str(slow_ms)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def procs_for(connections: int, procs_at_100: int) -> int:
    """Client processes: more at high concurrency so the client is not the bottleneck."""
    return procs_at_100 if connections >= 100 else 1


def measure(targets: list[Target], workdir: Path, points: list[int], duration: float,
            procs_at_100: int, rounds: int, domains: int = DOMAINS,
            slow_ms: float = SLOW_MS) -> Iterator[dict[str, Any]]:
    """Each round: for each connection count, load every target in turn (same client
    settings), so noise from the machine falls on all servers alike."""
    running = [Running(t, workdir / f"{t.label}.log") for t in targets]
    try:
        for round_no in range(1, rounds + 1):
            for conns in points:
                for server in running:
                    load_avg = os.getloadavg()[0]
                    result = load(server.target.port, conns, duration,
                                  procs_for(conns, procs_at_100), domains, slow_ms)
                    print(f"  [{round_no}] {server.target.label:>14} @ {conns:>3}: "
                          f"{result['rps']:>8.1f} req/s, us: "
                          + " ".join(f"{k[:-3]} {result[k]}" for k in PERCENTILES)
                          + f", >5ms {result['over_5ms']}, errors {result['errors']}, "
                          f"load {load_avg:.2f}", flush=True)
                    yield {"server": server.target.label, "connections": conns,
                           "round": round_no, "load_average": load_avg, **result}
    finally:
        for server in running:
            server.stop()


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (server, connections): medians over the rounds of req/s, p50, p99, and of
    the ratios to null measured in the same round (paired, so drift in the machine's load
    cancels out); errors summed."""
    null = {(r["round"], r["connections"]): r for r in runs if r["server"] == "null"}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["server"], r["connections"]), []).append(r)
    rows = []
    for (server, conns), group in groups.items():
        pairs = [(r, null[r["round"], conns]) for r in group]
        rows.append({
            "server": server, "connections": conns, "rounds": len(group),
            **{k: statistics.median(r[k] for r in group)
               for k in ("rps", *PERCENTILES, "over_5ms")},
            "max_of_rounds_us": max(r["max_us"] for r in group),
            "errors": sum(r["errors"] for r in group),
            "rps_ratio": round(statistics.median(r["rps"] / n["rps"] for r, n in pairs), 3),
            "p99_ratio": round(statistics.median(r["p99_us"] / n["p99_us"] for r, n in pairs),
                               3),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The table on stdout."""
    print(f"\n{'server':>14} {'conns':>5} {'req/s':>9} "
          + " ".join(f"{k[:-3] + ' us':>8}" for k in PERCENTILES)
          + f" {'>5ms':>5} {'x null':>7} {'p99 x null':>10} {'errors':>6}")
    for r in sorted(rows, key=lambda r: (r["connections"], r["server"] != "null")):
        print(f"{r['server']:>14} {r['connections']:>5} {r['rps']:>9.1f} "
              + " ".join(f"{r[k]:>8.0f}" for k in PERCENTILES)
              + f" {r['over_5ms']:>5.0f} {r['rps_ratio']:>7.3f} {r['p99_ratio']:>10.3f} "
              f"{r['errors']:>6}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    p.add_argument("--domains", type=int, default=DOMAINS,
                   help="senders' domains the load spreads over (all seeded)")
    p.add_argument("--connections", default="1,10,100", help="comma list")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every point; the table shows medians")
    p.add_argument("--procs-at-100", type=int, default=2,
                   help="client processes at >= 100 connections (same for every server)")
    p.add_argument("--log-decisions", choices=["true", "false", "both"], default="both",
                   help="[policy] log_decisions of the policyd run(s)")
    p.add_argument("--baseline", metavar="DIR", action="append", default=[],
                   help="also measure the policyd of another source tree (e.g. an unpacked "
                        "`git archive` of an older commit), same database and settings; "
                        "may be given more than once (labelled by the directory's name)")
    p.add_argument("--senders", action="store_true",
                   help="also measure policyd with [senders] on, every login a mailbox "
                        "(policyd-senders): per-login limits checked and counted, the lock "
                        "tracking addresses")
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--slow-ms", type=float, default=SLOW_MS,
                   help="with --trace: explain the replies slower than this")
    p.add_argument("--trace", action="store_true",
                   help="run policyd under tail_trace.py's probes and attribute every reply "
                        "over 5 ms to what the server was doing (slows policyd a little)")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    try:
        run(a, workdir)
    finally:
        if a.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(a: argparse.Namespace, workdir: Path) -> None:
    """Seed, start the servers, measure, print and write the results."""
    started = time.perf_counter()
    seeded = workdir / "seed.sqlite3"
    logins = LOGINS if a.senders else 0
    asyncio.run(seed(seeded, max(DOMAINS, a.domains), logins))
    print(f"seeded {max(DOMAINS, a.domains)} domains ({logins} mailboxes each) in "
          f"{time.perf_counter() - started:.2f} s", flush=True)
    port = free_port()
    targets = [Target("null", [sys.executable, str(TOOLS / "nullpolicy.py"), "--port",
                               str(port)], port)]
    modes = {"both": [True, False], "true": [True], "false": [False]}[a.log_decisions]
    trees: list[tuple[str, Path | None]] = [("policyd", None)]
    trees += [(Path(d).name if len(a.baseline) > 1 else "base", Path(d)) for d in a.baseline]
    for name, tree in trees:
        for log_decisions in modes:
            port = free_port()
            label = name if log_decisions else f"{name}-nolog"
            # each server its own copy: one's WAL and checkpoints must not become another's
            db = workdir / f"{label}.sqlite3"
            shutil.copyfile(seeded, db)
            config = write_config(workdir, port, log_decisions, name, db=db)
            trace = workdir / f"{label}.trace.json" if a.trace else None
            targets.append(Target(label, serve_argv(config, tree, trace), port, trace))
    if a.senders:
        for log_decisions in modes:
            port = free_port()
            label = "policyd-senders" if log_decisions else "senders-nolog"
            db = workdir / f"{label}.sqlite3"
            shutil.copyfile(seeded, db)
            config = write_config(workdir, port, log_decisions, "senders", SENDERS, db)
            trace = workdir / f"{label}.trace.json" if a.trace else None
            targets.append(Target(label, serve_argv(config, None, trace), port, trace))
    points = [int(c) for c in a.connections.split(",")]
    load_before = os.getloadavg()
    runs = list(measure(targets, workdir, points, a.duration, a.procs_at_100, a.rounds,
                        a.domains, a.slow_ms))
    rows = table(runs)
    print_table(rows)
    causes = attribute_slow(targets, runs, a.slow_ms) if a.trace else {}
    for r in runs:
        if not a.trace:
            r.pop("slow", None)
    Path(a.out).write_text(json.dumps({
        "duration_s": a.duration, "rounds": a.rounds, "domains": a.domains,
        "state": "END-OF-MESSAGE", "procs_at_100": a.procs_at_100, "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "rows": rows, "runs": runs, "slow_reply_causes": causes,
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")


def attribute_slow(targets: list[Target], runs: list[dict[str, Any]],
                   slow_ms: float) -> dict[str, Any]:
    """Per traced server and connection count: its replies over slow_ms by cause (the null
    server's count beside them: what the machine and the client do alone), and the server's
    events during the runs; printed and returned."""
    from tail_trace import attribute, event_stats
    out: dict[str, Any] = {}
    for target in targets:
        if target.trace is None:
            continue
        trace = json.loads(target.trace.read_text(encoding="utf-8"))
        print(f"\n{target.label}: replies over {slow_ms:g} ms by cause; "
              f"counts {trace['counts']}")
        for conns in sorted({r["connections"] for r in runs}):
            mine = [r for r in runs if r["server"] == target.label and r["connections"] == conns]
            null = sum(len(r["slow"]) for r in runs
                       if r["server"] == "null" and r["connections"] == conns)
            slow = [s for r in mine for s in r["slow"]]
            causes = attribute(slow, trace["events"])
            since = min(r["start"] for r in mine)
            until = max(r["start"] + r["seconds"] for r in mine)
            stats = event_stats(trace["events"], since, until)
            print(f"  @ {conns}: {len(slow)} slow (null: {null}): {causes}")
            print(f"    events: {stats}")
            out[f"{target.label}@{conns}"] = {"slow": len(slow), "null_slow": null,
                                              "causes": causes, "events": stats}
    return out


if __name__ == "__main__":
    main()
