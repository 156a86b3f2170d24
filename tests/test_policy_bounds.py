"""Policy numbers are bounded, and one bad request never fails another (SPEC §8).

`size` over 2^40 or `recipient_count` over 10^6 make a request malformed; counters are held at
SQLite's largest integer instead of failing the statement (which failed every request of the
batch, for good); and a request whose counting fails fails alone.
"""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from policyd.policy import COUNTER_MAX
from policyd.protocol import MAX_RECIPIENTS, MAX_SIZE, to_request
from policyd.batch import JobOptions, PolicyBatch, PolicyJob
from policyd.store import Store, StoreError, counters
from policyd.store import domains as domain_store
from policyd.store.scope import MASTER as MASTER_SCOPE
from policyd.timeutil import Periods
from tests.conftest import (Daemon, outbound, reply_until_closed, request_bytes,
                            submit_batched)

OPTIONS = JobOptions("END-OF-MESSAGE", "hold", Periods("UTC"))


@pytest.mark.parametrize("attrs,answered", [
    ({"size": str(MAX_SIZE)}, True),
    ({"size": str(MAX_SIZE + 1)}, False),
    ({"size": "999999999999999999"}, False),
    ({"size": "9" * 5000}, False),  # more digits than int() takes
    ({"recipient_count": str(MAX_RECIPIENTS)}, True),
    ({"recipient_count": str(MAX_RECIPIENTS + 1)}, False),
    ({"size": "00000000000000000001"}, True),  # leading zeros are still 1
])
async def test_numbers_past_their_bound_are_malformed(daemon: Daemon, attrs: dict[str, str],
                                                      answered: bool) -> None:
    await daemon.domain("bounds.example")
    # half-close after the request: a good one is answered, then the server closes too
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.policy_port)
    writer.write(request_bytes(**outbound("a@bounds.example", **attrs)))
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"action=") is answered, reply
    if not answered:
        assert reply == b""  # malformed: no reply, the connection closed


async def test_a_malformed_number_fails_no_other_request(daemon: Daemon) -> None:
    await daemon.domain("bounds.example")
    good = [await daemon.policy() for _ in range(8)]
    bad = request_bytes(**outbound("a@bounds.example", size="999999999999999999",
                                   recipient_count="999"))
    replies = await asyncio.gather(
        *(c.ask(**outbound("a@bounds.example")) for c in good),
        reply_until_closed(daemon.policy_port, bad))
    assert replies[:-1] == ["DUNNO"] * 8
    assert replies[-1] == b""
    _, stats = await daemon.api("GET", "/domains/bounds.example/outbound")
    assert stats["sent_today"] == 8
    for client in good:
        await client.close()


def _domain(conn: sqlite3.Connection, name: str, daily: int | None = None) -> int:
    domain_store.create_domain(conn, MASTER_SCOPE, name, None, "custom", (daily, None))
    domain_store.set_ses(conn, name, status="success", dkim_status="Success", token="t",
                         dkim_tokens=("a", "b", "c"))
    found = domain_store.find_domain(conn, name)
    assert found is not None
    return found.id


def _job(sender: str, **attrs: str) -> PolicyJob:
    return PolicyJob(to_request(outbound(sender, request="smtpd_access_policy",
                                         protocol_state="END-OF-MESSAGE", **attrs)),
                     True, OPTIONS)


async def test_counters_near_the_64_bit_limit_never_wedge_a_domain(store: Store) -> None:
    full = await store.write(_domain, "full.example")
    await store.write(_domain, "other.example")
    day, month = OPTIONS.periods.keys(OPTIONS.now())
    await store.write(counters.add, full, day, month, COUNTER_MAX - 5, COUNTER_MAX - 5)
    batch = PolicyBatch()
    big = _job("a@full.example", size=str(MAX_SIZE), recipient_count=str(MAX_RECIPIENTS))
    # one batch: the biggest message the protocol allows, many times over, beside another
    # domain's mail; before, the sum past 2^63 failed the upsert and every request with it
    results = await asyncio.gather(*(submit_batched(store, batch, job) for job in
                                     [big] * 20 + [_job("b@other.example")]))
    assert [r.action for r in results] == ["DUNNO"] * 21
    totals = await store.read(counters.totals, full, day, month)
    assert (totals.sent_today, totals.sent_month, totals.bytes_month) == (COUNTER_MAX,) * 3
    # and the next batches still answer, from the kept facts and from fresh ones
    assert (await submit_batched(store, batch, big)).action == "DUNNO"
    assert (await submit_batched(store, PolicyBatch(), big)).action == "DUNNO"


async def test_a_full_counter_under_a_hard_limit_defers(store: Store) -> None:
    full = await store.write(_domain, "hard.example", 1000)
    day, month = OPTIONS.periods.keys(OPTIONS.now())
    await store.write(counters.add, full, day, month, COUNTER_MAX, COUNTER_MAX)
    result = await submit_batched(store, PolicyBatch(), _job("a@hard.example"))
    assert result.action.startswith("DEFER 4.7.1 Daily sending limit")


def _fail_counting_for(conn: sqlite3.Connection, domain_id: int) -> None:
    """A real SQLite failure of the counter upsert for one domain only (fault injection)."""
    conn.execute(f"CREATE TRIGGER fail_insert BEFORE INSERT ON counters "
                 f"WHEN NEW.domain_id = {domain_id} BEGIN SELECT RAISE(ABORT, 'refused'); END")


async def test_a_request_whose_counting_fails_fails_alone(store: Store) -> None:
    broken = await store.write(_domain, "broken.example")
    fine = await store.write(_domain, "fine.example")
    await store.write(_fail_counting_for, broken)
    batch = PolicyBatch()
    jobs = [_job("a@fine.example"), _job("a@broken.example"), _job("b@fine.example"),
            _job("b@broken.example"), _job("c@fine.example")]
    results = await asyncio.gather(*(submit_batched(store, batch, job) for job in jobs),
                                   return_exceptions=True)
    assert [getattr(r, "action", None) for r in results[0::2]] == ["DUNNO"] * 3
    assert all(isinstance(r, StoreError) for r in results[1::2]), results
    day, month = OPTIONS.periods.keys(OPTIONS.now())
    assert (await store.read(counters.totals, fine, day, month)).sent_today == 3
    assert (await store.read(counters.totals, broken, day, month)).sent_today == 0
    # what the batch keeps is what was committed: the next run counts on from 3, not 5
    assert (await submit_batched(store, batch, _job("a@fine.example"))).action == "DUNNO"
    assert (await store.read(counters.totals, fine, day, month)).sent_today == 4
    assert batch.reads == 1


async def test_a_request_whose_decision_raises_fails_alone(store: Store) -> None:
    fine = await store.write(_domain, "fine.example")
    broken = JobOptions("NOT-A-STATE", "hold", Periods("UTC"))  # decide() raises ValueError
    bad = PolicyJob(_job("x@fine.example").req, True, broken)
    jobs = [_job("a@fine.example"), bad, _job("b@fine.example")]
    batch = PolicyBatch()  # one batch function: the three run in one call
    results = await asyncio.gather(*(submit_batched(store, batch, job) for job in jobs),
                                   return_exceptions=True)
    assert isinstance(results[1], ValueError), results
    assert [r.action for r in (results[0], results[2])] == ["DUNNO", "DUNNO"]  # type: ignore
    day, month = OPTIONS.periods.keys(OPTIONS.now())
    assert (await store.read(counters.totals, fine, day, month)).sent_today == 2
