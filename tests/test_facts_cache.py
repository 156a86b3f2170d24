"""The hot path keeps domain facts between batches only while nothing else writes.

The store's side of it (the `continued` flag a batch function gets) is in test_store.py. Here:
the policy batch reads facts once, its kept usage never drifts from the database, and through
the real daemon a decision made after an API write, another connection's write or a reset
sees it, never the facts kept from before.
"""
from __future__ import annotations

import asyncio
import sqlite3

from policyd.protocol import to_request
from policyd.service import JobOptions, PolicyBatch, PolicyJob
from policyd.store import Store, connect, counters
from policyd.store import domains as domain_store
from policyd.store.scope import MASTER as MASTER_SCOPE
from policyd.timeutil import Periods
from tests.conftest import Daemon, outbound, submit_batched

DOMAIN = "cached.example"


async def test_facts_are_read_once_while_only_the_hot_path_writes(store: Store) -> None:
    day = await store.write(_verified_domain, 0)
    batch = PolicyBatch()
    options = JobOptions("END-OF-MESSAGE", "hold", Periods("UTC"))
    job = PolicyJob(to_request(outbound(f"a@{DOMAIN}", protocol_state="END-OF-MESSAGE",
                                        recipient_count="2", size="10",
                                        request="smtpd_access_policy")), True, options)
    for _ in range(5):
        assert (await submit_batched(store, batch, job)).action == "DUNNO"
    assert batch.reads == 1
    totals = await store.read(counters.totals, 1, *day)
    assert (totals.sent_today, totals.sent_month, totals.bytes_month) == (10, 10, 100)
    await store.write(counters.seen_message, "other", "now")  # any other write
    assert (await submit_batched(store, batch, job)).action == "DUNNO"
    assert batch.reads == 2


async def test_kept_usage_matches_the_database_under_concurrency(store: Store) -> None:
    """Many requests in overlapping batches with a limit: the kept counts never drift from
    what was committed, so exactly the limit is allowed."""
    await store.write(_verified_domain, 37)
    batch = PolicyBatch()
    options = JobOptions("END-OF-MESSAGE", "hold", Periods("UTC"))
    job = PolicyJob(to_request(outbound(f"a@{DOMAIN}", protocol_state="END-OF-MESSAGE",
                                        request="smtpd_access_policy")), True, options)
    replies = []
    for _ in range(10):
        replies += await asyncio.gather(*(submit_batched(store, batch, job) for _ in range(7)))
        await asyncio.sleep(0)
    assert sum(r.action == "DUNNO" for r in replies) == 37
    day, month = Periods("UTC").keys(options.now())
    assert (await store.read(counters.totals, 1, day, month)).sent_today == 37


def _verified_domain(conn: sqlite3.Connection, daily: int) -> tuple[str, str]:
    domain_store.create_domain(conn, MASTER_SCOPE, DOMAIN, None, "standard",
                               (daily or None, None))
    domain_store.set_ses(conn, DOMAIN, status="success", dkim_status="Success", token="t",
                         dkim_tokens=("a", "b", "c"))
    return Periods("UTC").keys(JobOptions("", "", Periods("UTC")).now())


# --- through the daemon -------------------------------------------------------------------

async def limited(d: Daemon, daily_limit: int) -> None:
    await d.domain(DOMAIN)
    status, body = await d.api("PUT", f"/domains/{DOMAIN}/outbound",
                               {"daily_limit": daily_limit})
    assert status == 200, body


async def test_decisions_follow_api_writes(daemon: Daemon) -> None:
    await limited(daemon, 2)
    client = await daemon.policy()
    ask = lambda: client.ask(**outbound(f"a@{DOMAIN}"))  # noqa: E731
    assert [await ask(), await ask()] == ["DUNNO", "DUNNO"]
    assert (await ask()).startswith("DEFER 4.7.1")
    status, body = await daemon.api("POST", "/outbound/reset-daily",
                                    {"domain": DOMAIN, "current": True})
    assert status == 200, body
    assert await ask() == "DUNNO"  # the reset is seen: not the 2 counted before it
    status, _ = await daemon.api("PUT", f"/domains/{DOMAIN}/outbound", {"daily_limit": 10})
    assert status == 200
    assert await ask() == "DUNNO"
    status, _ = await daemon.api("PUT", f"/domains/{DOMAIN}/suspend")
    assert status == 200
    assert (await ask()).startswith("DEFER 4.7.1")
    status, _ = await daemon.api("PUT", f"/domains/{DOMAIN}/activate")
    assert status == 200
    assert await ask() == "DUNNO"
    status, stats = await daemon.api("GET", f"/domains/{DOMAIN}/outbound")
    assert stats["sent_today"] == 3
    await client.close()


async def test_decisions_follow_writes_of_another_process(daemon: Daemon) -> None:
    await limited(daemon, 5)
    client = await daemon.policy()
    ask = lambda: client.ask(**outbound(f"a@{DOMAIN}"))  # noqa: E731
    assert await ask() == "DUNNO"
    outside = connect(daemon.rt.store.path)  # e.g. a `policyd` CLI command, or sqlite3
    try:
        outside.execute("UPDATE domains SET out_status = 'blocked' WHERE name = ?", (DOMAIN,))
        action = await ask()
        assert action.startswith("REJECT 5.7.1") and "blocked" in action
        outside.execute("UPDATE domains SET out_status = 'active' WHERE name = ?", (DOMAIN,))
        assert await ask() == "DUNNO"
        outside.execute("UPDATE counters SET sent = 5 WHERE kind = 'day'")
        assert (await ask()).startswith("DEFER 4.7.1")
    finally:
        outside.close()
    await client.close()
