"""The hot path keeps domain facts between batches only while nothing else writes.

Part one is the store's contract (the `continued` flag a batch function gets); part two drives
the real daemon: a decision made after an API write, another connection's write or a reset
must see it, never the facts kept from before.
"""
from __future__ import annotations

import asyncio
import sqlite3
import struct
from pathlib import Path

import pytest

from policyd.protocol import to_request
from policyd.service import JobOptions, PolicyBatch, PolicyJob
from policyd.store import Store, connect, counters
from policyd.store import domains as domain_store
from policyd.store.scope import MASTER as MASTER_SCOPE
from policyd.timeutil import Periods
from tests.conftest import Daemon, outbound, submit_batched

DOMAIN = "cached.example"


class Recorder:
    """A batch function that records the `continued` flag of each run (and writes a row)."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[bool] = []
        self.fail = fail

    def __call__(self, conn: sqlite3.Connection, args: list[str],
                 continued: bool) -> list[str]:
        self.seen.append(continued)
        if self.fail:
            raise ValueError("refused")
        for value in args:
            counters.seen_message(conn, value, "now")
        return args


def _plain_write(conn: sqlite3.Connection, value: str) -> None:
    counters.seen_message(conn, value, "now")


async def test_continued_only_while_nothing_else_writes(store: Store) -> None:
    fn, other, failing = Recorder(), Recorder(), Recorder(fail=True)
    await submit_batched(store, fn, "a")
    await submit_batched(store, fn, "b")
    await store.write(_plain_write, "c")  # any other job on the write connection
    await submit_batched(store, fn, "d")
    await submit_batched(store, other, "e")  # another batch function
    await submit_batched(store, fn, "f")
    await submit_batched(store, fn, "g")
    with sqlite3.connect(store.path) as outside:  # another connection (another process)
        outside.execute("INSERT INTO sns_messages (message_id, received_at) VALUES ('x', 'now')")
    outside.close()
    await submit_batched(store, fn, "h")
    await submit_batched(store, fn, "i")
    with pytest.raises(ValueError):
        await submit_batched(store, failing, "j")
    await submit_batched(store, fn, "k")
    assert fn.seen == [False, True, False, False, True, False, True, False]
    assert other.seen == [False]


async def test_a_failed_run_is_not_continued(store: Store) -> None:
    failing = Recorder(fail=True)
    for _ in range(2):
        with pytest.raises(ValueError):
            await submit_batched(store, failing, "x")
    assert failing.seen == [False, False]


def _lose_the_batch(conn: sqlite3.Connection, args: list[str], continued: bool) -> list[str]:
    """A batch function whose failure takes the whole transaction with it (as SQLITE_FULL or
    an I/O error would)."""
    conn.execute("ROLLBACK")
    raise sqlite3.OperationalError("disk I/O error")


async def test_not_continued_after_its_transaction_was_lost(store: Store) -> None:
    fn = Recorder()
    await submit_batched(store, fn, "a")
    await submit_batched(store, fn, "b")
    # one turn, one transaction: fn's run succeeds, then the transaction is lost
    both = [submit_batched(store, fn, "c"),
            submit_batched(store, _lose_the_batch, "x")]
    results = await asyncio.gather(*both, return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    await submit_batched(store, fn, "d")  # c was never committed: what fn kept from it is void
    assert fn.seen == [False, True, True, False]


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
    await store.write(_plain_write, "other")
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


async def test_wal_starts_over_under_steady_writes(store: Store) -> None:
    """Checkpoints run beside a steady stream of hot-path commits, and the WAL still starts
    over after them (its header's checkpoint sequence moves on), so it does not grow with
    every commit, as it did when checkpoints only ran beside the writes."""
    store.checkpoint_every = 5
    wal = Path(str(store.path) + "-wal")
    fn, restarts, stop = Recorder(), set(), False

    def sequence() -> int | None:
        try:
            with open(wal, "rb") as f:  # WAL header: magic, version, page size, sequence
                header = f.read(16)
        except FileNotFoundError:
            return None
        return struct.unpack(">I", header[12:16])[0] if len(header) == 16 else None

    async def writer(n: int) -> None:
        # until enough checkpoints ran (a busy machine makes bigger batches, fewer commits)
        i = 0
        while store.checkpoints < 8 and i < 5000:
            await submit_batched(store, fn, f"{n}.{i}.{'x' * 200}")
            i += 1

    async def watch() -> None:
        while not stop:
            restarts.add(sequence())
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(writer(n) for n in range(20)))
    stop = True
    await watcher
    assert store.checkpoints >= 6, store.checkpoints
    # one sequence number per start of the WAL: the first, and one after most checkpoints
    # (beside the writes alone: one or two in all)
    assert len(restarts - {None}) > store.checkpoints // 2 + 1, (restarts, store.checkpoints)
