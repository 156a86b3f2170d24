"""Quotas under concurrency (SPEC §8): many clients at once never overshoot a limit.

Correctness tests, not benchmarks: they count replies and read the counters, never the clock.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from policyd.protocol import to_request
from policyd.service import JobOptions, PolicyBatch, PolicyJob
from policyd.store import connect, counters, open_and_migrate
from policyd.store import domains as domain_store
from policyd.store.scope import MASTER as MASTER_SCOPE
from policyd.timeutil import Periods
from tests.conftest import Daemon, PolicyClient, outbound

pytestmark = pytest.mark.slow  # a stress test: `pytest -m "not slow"` skips it

DOMAIN = "busy.example"


async def limited_domain(d: Daemon, daily_limit: int) -> None:
    """A verified domain with only a daily limit."""
    await d.domain(DOMAIN)
    status, body = await d.api("PUT", f"/domains/{DOMAIN}/outbound",
                               {"daily_limit": daily_limit, "monthly_limit": None})
    assert status == 200 and body["daily_limit"] == daily_limit, body


async def policy_worker(d: Daemon, requests: int, connected: asyncio.Barrier) -> Counter[str]:
    """One persistent connection sending requests one at a time; the reply verbs it got."""
    client = await PolicyClient.connect(d.policy_port)
    await connected.wait()  # every connection is open before anyone sends: real contention
    verbs: Counter[str] = Counter()
    try:
        for _ in range(requests):
            verbs[(await client.ask(**outbound(f"user@{DOMAIN}"))).split(" ", 1)[0]] += 1
    finally:
        await client.close()
    return verbs


async def rest_worker(d: Daemon, increments: int) -> Counter[str]:
    """POST .../outbound/increment one at a time; counts allowed and refused."""
    results: Counter[str] = Counter()
    for _ in range(increments):
        status, body = await d.api("POST", f"/domains/{DOMAIN}/outbound/increment",
                                   {"count": 1})
        assert status == 200, body
        results["allowed" if body["allowed"] else "refused"] += 1
    return results


async def sent_today(d: Daemon) -> int:
    status, body = await d.api("GET", f"/domains/{DOMAIN}/outbound")
    assert status == 200, body
    return body["sent_today"]


async def test_100_connections_never_overshoot_the_daily_limit(daemon: Daemon) -> None:
    await limited_domain(daemon, 1500)
    connected = asyncio.Barrier(100)
    results = await asyncio.gather(*(policy_worker(daemon, 20, connected)
                                     for _ in range(100)))
    verbs = sum(results, Counter())
    assert verbs == {"DUNNO": 1500, "DEFER": 500}
    assert await sent_today(daemon) == 1500


async def test_policy_and_rest_increments_share_the_limit_exactly(daemon: Daemon) -> None:
    limit = 400
    await limited_domain(daemon, limit)
    connected = asyncio.Barrier(30)
    policy = [policy_worker(daemon, 20, connected) for _ in range(30)]  # 600 requests
    rest = [rest_worker(daemon, 30) for _ in range(10)]  # 300 increments
    results = await asyncio.gather(*policy, *rest)
    totals = sum(results, Counter())
    assert totals["DUNNO"] > 0 and totals["allowed"] > 0  # both paths took part
    assert totals["DUNNO"] + totals["allowed"] == limit
    assert totals["DEFER"] + totals["refused"] == 600 + 300 - limit
    assert await sent_today(daemon) == limit


def test_one_batch_decides_in_order_and_counts_in_its_own_period(tmp_path: Path) -> None:
    """Requests decided in one store batch see what the earlier ones counted (no overshoot),
    and the batch counts in the day of the moment it runs."""
    path = tmp_path / "batch.sqlite3"
    open_and_migrate(path)
    conn = connect(path)
    domain = domain_store.create_domain(conn, MASTER_SCOPE, DOMAIN, None, "standard", (3, None))
    domain_store.set_ses(conn, DOMAIN, status="success", dkim_status="Success", token="t",
                         dkim_tokens=("a", "b", "c"))
    moment = datetime(2026, 11, 30, 23, 59, 59, tzinfo=timezone.utc)
    options = JobOptions("END-OF-MESSAGE", "hold", Periods("UTC"), now=lambda: moment)
    request = to_request(outbound(f"user@{DOMAIN}", request="smtpd_access_policy",
                                  protocol_state="END-OF-MESSAGE", recipient_count="1",
                                  size="100"))
    conn.execute("BEGIN IMMEDIATE")
    decisions = PolicyBatch()(conn, [PolicyJob(request, True, options) for _ in range(5)])
    conn.execute("COMMIT")
    assert [d.action.split(" ")[0] for d in decisions] == ["DUNNO"] * 3 + ["DEFER"] * 2
    assert counters.totals(conn, domain.id, "2026-11-30", "2026-11") == counters.Totals(
        sent_today=3, sent_month=3, bytes_month=300, bounces=0, complaints=0)
    conn.close()
