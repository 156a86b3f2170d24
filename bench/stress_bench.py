#!/usr/bin/env python3
"""Policy latency while the API does slow work: bcrypt hashing and SES calls.

Starts `policyd serve` on a seeded database (1,000 verified domains, see policy_bench.py) with
SES pointed at a moto server on loopback and auto-verification on, then offers the policy port
a fixed load (open loop, so queueing delay counts) twice: once quiet, once while API clients
create mailboxes (bcrypt, cost 12) and domains (each an SES VerifyDomainIdentity +
VerifyDomainDkim through boto3). Prints p50/p99/max of both phases and their ratio.

    .venv/bin/python bench/stress_bench.py --rate 1000 --duration 10 --workers 2,8
    .venv/bin/python bench/stress_bench.py --rate 1000 --duration 10 --workers 2 --api-rate 10

Without --api-rate the API clients call as fast as replies come (a saturating load: on a
2-core machine they, the moto server and the load generator take every core); with it they
pace themselves to that many calls a second in all. --mix picks what they do: half of them
hash passwords and half create domains (both, the default), or all of them one of the two.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from moto.server import ThreadedMotoServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_bench import DOMAINS, TOOLS, Running, Target, free_port, seed  # noqa: E402


def write_config(workdir: Path, policy_port: int, api_port: int, ses_url: str,
                 token: str) -> Path:
    """Defaults but ports, with SES on a local moto server and auto-verification on."""
    path = workdir / "stress.ini"
    path.write_text(
        f"[database]\npath = {workdir / 'policyd.sqlite3'}\n"
        f"[policy]\nlisten = 127.0.0.1:{policy_port}\n"
        f"[api]\nlisten = 127.0.0.1:{api_port}\n"
        f"[auth]\nmaster_token = {token}\n"
        f"[ses]\nendpoint_url = {ses_url}\nauto_verify = true\n"
        "[scheduler]\nenabled = false\n", encoding="utf-8")
    return path


def offered_load(port: int, rate: float, duration: float, label: str) -> subprocess.Popen[str]:
    """Start policyload at a fixed offered rate on 10 connections (returns the process)."""
    argv = [sys.executable, str(TOOLS / "policyload.py"), "--port", str(port),
            "--connections", "10", "--rate", str(rate), "--duration", str(duration),
            "--domains", str(DOMAINS), "--state", "END-OF-MESSAGE", "--label", label]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON summary line of a finished policyload run."""
    out, _ = proc.communicate()
    return json.loads(out.strip().splitlines()[-1])


async def api_work(api: str, token: str, stop_at: float, workers: int,
                   api_rate: float = 0, mix: str = "both", tag: str = "") -> dict[str, int]:
    """Create mailboxes (bcrypt) and domains (SES) until stop_at, each worker at
    api_rate / workers calls a second (0: back to back); counts of each."""
    headers = {"Authorization": f"Bearer {token}"}
    done = {"mailboxes": 0, "domains": 0, "errors": 0}
    async with aiohttp.ClientSession(api, headers=headers) as http:
        async def worker(n: int) -> None:
            i = 0
            interval = workers / api_rate if api_rate else 0.0
            next_at = time.monotonic() + interval * n / workers
            while time.monotonic() < stop_at:
                if interval:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += interval
                i += 1
                if mix == "ses" or (mix == "both" and n % 2):
                    body = {"name": f"s{tag}{workers}-{n}-{i}.stress.test"}
                    path, kind = "/domains/", "domains"
                else:
                    body = {"email": f"u{tag}{workers}-{n}-{i}@d{n}.test",
                            "password": "correct horse staple"}
                    path, kind = "/users/", "mailboxes"
                async with http.post(path, json=body) as resp:
                    done[kind if resp.status == 201 else "errors"] += 1
        await asyncio.gather(*(worker(n) for n in range(workers)))
    return done


def phase(port: int, api: str, token: str, rate: float, duration: float,
          workers: int, api_rate: float, mix: str, target: str = "policyd") -> dict[str, Any]:
    """One measured phase, quiet or with API work running for its whole duration (the API
    is always policyd's; the policy load goes to port, policyd's or the null server's)."""
    label = f"busy({workers})" if workers else "quiet"
    proc = offered_load(port, rate, duration, label)
    work = (asyncio.run(api_work(api, token, time.monotonic() + duration, workers, api_rate,
                                  mix, tag=target))
            if workers else {})
    return {"phase": label, "target": target, **result_of(proc), "api": work}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=1000, help="offered policy requests/s")
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--workers", default="2,8",
                   help="API clients per busy phase (half hash passwords, half create "
                        "domains through SES), comma list")
    p.add_argument("--api-rate", type=float, default=0,
                   help="API calls per second over all clients (0: back to back)")
    p.add_argument("--mix", choices=("both", "hash", "ses"), default="both",
                   help="what the API clients do: half each, or all hash, or all SES")
    p.add_argument("--null", action="store_true",
                   help="then the same phases with the policy load on the null server (the "
                        "API work still on policyd): what the machine alone does to latency")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    with tempfile.TemporaryDirectory(prefix="policyd-stress-") as tmp:
        workdir = Path(tmp)
        asyncio.run(seed(workdir / "policyd.sqlite3", DOMAINS))
        policy_port, api_port, token = free_port(), free_port(), secrets.token_urlsafe(24)
        config = write_config(workdir, policy_port, api_port,
                              "http://%s:%d" % moto.get_host_and_port(), token)
        argv = [str(Path(sys.executable).with_name("policyd")), "serve", "--config", str(config)]
        server = Running(Target("policyd", argv, policy_port), workdir / "policyd.log")
        null_port = free_port()
        null = (Running(Target("null", [sys.executable, str(TOOLS / "nullpolicy.py"), "--port",
                                        str(null_port)], null_port), workdir / "null.log")
                if a.null else None)
        try:
            api = f"http://127.0.0.1:{api_port}"
            levels = [0] + [int(w) for w in a.workers.split(",")]
            runs = [phase(policy_port, api, token, a.rate, a.duration, workers, a.api_rate,
                          a.mix)
                    for workers in levels]
            if null is not None:
                runs += [phase(null_port, api, token, a.rate, a.duration, workers, a.api_rate,
                               a.mix, "null") for workers in levels]
        finally:
            server.stop()
            if null is not None:
                null.stop()
            moto.stop()
    report(runs, a.out)


def report(runs: list[dict[str, Any]], out: Path | None) -> None:
    """Print every phase with its p99 as a ratio of the same server's quiet phase."""
    quiet = {r["target"]: r["p99_us"] or float("nan") for r in runs if r["phase"] == "quiet"}
    for r in runs:
        r["p99_x_quiet"] = round(r["p99_us"] / quiet[r["target"]], 2)
        print(f"{r['target']:>7} {r['phase']:>9}: {r['rps']} req/s, p50 {r['p50_us']} us, "
              f"p99 {r['p99_us']} us ({r['p99_x_quiet']}x quiet), "
              f"max {r['max_us'] / 1000:.1f} ms, errors {r['errors']} {r['api']}")
    print("targets: p99 within 1.2x of quiet; every reply under 250 ms (SPEC §8)")
    if out:
        out.write_text(json.dumps({"runs": runs}, indent=2))

if __name__ == "__main__":
    main()
