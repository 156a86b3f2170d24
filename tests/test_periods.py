"""Period-keyed counters and their resets (SPEC §4 reset/history rows, §6 last paragraph):
period keys in [outbound] timezone, closing ended periods only, history, manual resets, CLI."""
from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from policyd import jobs
from policyd.store import counters
from policyd.store.domains import find_domain
from policyd.timeutil import Periods, add_months, utcnow
from tests.conftest import Daemon, start_daemon

OUT = "/domains/example.com/outbound"
HISTORY = OUT + "/history"
AUCKLAND = {"outbound": {"timezone": "Pacific/Auckland"}}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


async def add_counts(daemon: Daemon, day: str, sent: int, nbytes: int = 0,
                     name: str = "example.com") -> None:
    """Count sent messages into the day `day` and its month, through the store."""
    domain = await daemon.rt.store.read(find_domain, name)
    assert domain is not None
    await daemon.rt.store.write(counters.add, domain.id, day, day[:7], sent, nbytes)


async def day_and_month(daemon: Daemon, day: str, name: str = "example.com") -> tuple[int, int]:
    """(sent in day, sent in day's month) from the counter rows."""
    domain = await daemon.rt.store.read(find_domain, name)
    assert domain is not None
    found = await daemon.rt.store.read(counters.totals, domain.id, day, day[:7])
    return found.sent_today, found.sent_month


async def history(daemon: Daemon, name: str = "example.com") -> list[dict[str, Any]]:
    status, body = await daemon.api("GET", f"/domains/{name}/outbound/history")
    assert status == 200, body
    return body["items"]


def now_keys(daemon: Daemon) -> tuple[str, str]:
    return daemon.rt.periods.keys(utcnow())


# --- period keys -------------------------------------------------------------------------

@pytest.mark.parametrize(("zone", "moment", "keys"), [
    ("UTC", "2026-06-30T23:59:59", ("2026-06-30", "2026-06")),
    ("UTC", "2026-07-01T00:00:00", ("2026-07-01", "2026-07")),
    # NZST (UTC+12) in July: the local day turned at 12:00 UTC, not at UTC midnight.
    ("Pacific/Auckland", "2026-06-30T11:59:59", ("2026-06-30", "2026-06")),
    ("Pacific/Auckland", "2026-06-30T12:00:00", ("2026-07-01", "2026-07")),
    ("Pacific/Auckland", "2026-06-30T23:59:59", ("2026-07-01", "2026-07")),
    ("Pacific/Auckland", "2026-07-01T00:00:00", ("2026-07-01", "2026-07")),
    # NZDT (UTC+13) in summer; New Year arrives at 11:00 UTC on Dec 31.
    ("Pacific/Auckland", "2026-12-31T10:59:59", ("2026-12-31", "2026-12")),
    ("Pacific/Auckland", "2026-12-31T11:00:00", ("2027-01-01", "2027-01")),
    ("America/Los_Angeles", "2026-03-01T07:59:59", ("2026-02-28", "2026-02")),
])
def test_period_keys_follow_the_zone(zone, moment, keys):
    assert Periods(zone).keys(utc(moment)) == keys


def test_naive_times_are_utc_and_aware_times_convert():
    auckland = Periods("Pacific/Auckland")
    assert auckland.keys(datetime(2026, 6, 30, 12)) == ("2026-07-01", "2026-07")
    aware = datetime.fromisoformat("2026-06-30T20:00:00-04:00")  # 2026-07-01T00:00Z
    assert Periods("UTC").keys(aware) == ("2026-07-01", "2026-07")


@pytest.mark.parametrize(("month", "delta", "expected"), [
    ("2026-01", -1, "2025-12"), ("2026-12", 1, "2027-01"), ("2026-03", -24, "2024-03"),
    ("2026-03", 0, "2026-03"), ("2000-01", -13, "1998-12")])
def test_add_months(month, delta, expected):
    assert add_months(month, delta) == expected


async def test_counting_uses_the_configured_zone(make_config):
    daemon = await start_daemon(make_config(**AUCKLAND))
    try:
        await daemon.domain("example.com")
        before = Periods("Pacific/Auckland").keys(utcnow())
        assert (await daemon.api("POST", OUT + "/increment", {"count": 2}))[1]["allowed"]
        after = Periods("Pacific/Auckland").keys(utcnow())
        rows = {key: await day_and_month(daemon, key) for key in {before[0], after[0]}}
        assert (2, 2) in rows.values()  # keyed by the Auckland day (and its month)
    finally:
        await daemon.stop()


# --- closing periods with an injected clock ----------------------------------------------

async def test_monthly_reset_is_idempotent_and_never_touches_the_running_month(make_config):
    daemon = await start_daemon(make_config(**AUCKLAND))
    try:
        await daemon.domain("example.com")
        await add_counts(daemon, "2026-01-31", 7, 700)
        await add_counts(daemon, "2026-02-01", 3)
        early = await jobs.reset(daemon.rt, "month", now=utc("2026-01-31T10:00:00"))
        assert early["frozen_months"] == 0 and await history(daemon) == []
        assert await day_and_month(daemon, "2026-01-31") == (7, 7)
        # 11:30 UTC is 00:30 on February 1 in Auckland (NZDT, UTC+13): January has ended.
        first = await jobs.reset(daemon.rt, "month", now=utc("2026-01-31T11:30:00"))
        assert (first["day"], first["month"], first["frozen_months"]) == (
            "2026-02-01", "2026-02", 1)
        frozen = await history(daemon)
        assert [(h["period"], h["sent"], h["bytes"]) for h in frozen] == [("2026-01", 7, 700)]
        assert frozen[0]["frozen_at"] == "2026-01-31T11:30:00Z"
        assert await day_and_month(daemon, "2026-01-31") == (0, 0)  # rows pruned
        assert await day_and_month(daemon, "2026-02-01") == (3, 3)  # running: untouched
        second = await jobs.reset(daemon.rt, "month", now=utc("2026-01-31T12:00:00"))
        assert second["frozen_months"] == 0 and await history(daemon) == frozen
    finally:
        await daemon.stop()


async def test_daily_reset_closes_ended_days_only(daemon):
    await daemon.domain("example.com")
    await add_counts(daemon, "2026-03-30", 4)
    await add_counts(daemon, "2026-03-31", 5)
    result = await jobs.reset(daemon.rt, "day", now=utc("2026-03-31T23:59:59"))
    assert (result["kind"], result["day"], result["closed_days"]) == ("daily", "2026-03-31", 1)
    assert await day_and_month(daemon, "2026-03-30") == (0, 9)  # month total kept
    assert await day_and_month(daemon, "2026-03-31") == (5, 9)
    again = await jobs.reset(daemon.rt, "day", now=utc("2026-03-31T23:59:59"))
    assert again["closed_days"] == 0
    assert await history(daemon) == []  # the daily reset never freezes months


async def test_history_keeps_history_months_and_prunes_older(make_config):
    daemon = await start_daemon(make_config(outbound={"history_months": "2"}))
    try:
        await daemon.domain("example.com")
        for day, sent in (("2025-12-10", 1), ("2026-01-10", 2), ("2026-02-10", 3),
                          ("2026-03-10", 4)):
            await add_counts(daemon, day, sent)
        result = await jobs.reset(daemon.rt, "month", now=utc("2026-03-15T00:00:00"))
        assert (result["frozen_months"], result["pruned_history"]) == (3, 1)
        assert [(h["period"], h["sent"]) for h in await history(daemon)] == [
            ("2026-02", 3), ("2026-01", 2)]
        assert await day_and_month(daemon, "2026-03-10") == (0, 4)  # ended day closed
        assert await day_and_month(daemon, "2025-12-10") == (0, 0)
    finally:
        await daemon.stop()


# --- the REST resets ---------------------------------------------------------------------

async def test_rest_monthly_reset_freezes_past_months_and_keeps_the_running_one(daemon):
    await daemon.domain("example.com")
    await daemon.domain("other.test")
    assert (await daemon.api("POST", OUT + "/increment", {"count": 2}))[1]["allowed"]
    _, month = now_keys(daemon)
    last, older = add_months(month, -1), add_months(month, -2)
    await add_counts(daemon, f"{last}-05", 10, 1000)
    await add_counts(daemon, f"{older}-05", 20)
    await add_counts(daemon, f"{last}-06", 30, name="other.test")
    status, body = await daemon.api("POST", "/outbound/reset-monthly")
    assert status == 200 and body["kind"] == "monthly" and body["frozen_months"] == 3
    frozen = [(h["period"], h["sent"], h["bytes"]) for h in await history(daemon)]
    assert frozen == [(last, 10, 1000), (older, 20, 0)]
    assert [(h["period"], h["sent"]) for h in await history(daemon, "other.test")] == [(last, 30)]
    _, out = await daemon.api("GET", OUT)
    assert (out["sent_today"], out["sent_month"]) == (2, 2)
    status, body = await daemon.api("POST", "/outbound/reset-monthly", {})
    assert status == 200 and body["frozen_months"] == 0
    assert [(h["period"], h["sent"], h["bytes"]) for h in await history(daemon)] == frozen


async def test_rest_daily_reset_never_zeroes_today(daemon):
    await daemon.domain("example.com")
    await daemon.api("POST", OUT + "/increment", {"count": 3})
    day, _ = now_keys(daemon)
    await add_counts(daemon, "2020-01-01", 9)
    status, body = await daemon.api("POST", "/outbound/reset-daily")
    assert status == 200 and body["kind"] == "daily" and body["closed_days"] == 1
    _, out = await daemon.api("GET", OUT)
    assert (out["sent_today"], out["sent_month"]) == (3, 3)
    assert await day_and_month(daemon, "2020-01-01") == (0, 9)


async def test_current_daily_reset_frees_the_day_and_keeps_the_month(daemon):
    await daemon.domain("example.com")
    await daemon.api("PUT", OUT, {"daily_limit": 2})
    for _ in range(2):
        await daemon.api("POST", OUT + "/increment", {"count": 1})
    assert (await daemon.api("POST", OUT + "/increment", {"count": 1}))[1]["allowed"] is False
    status, body = await daemon.api("POST", "/outbound/reset-daily",
                                    {"domain": "Example.COM", "current": True})
    assert status == 200, body
    assert (body["domain"], body["current"], body["sent_today"], body["sent_month"]) == (
        "example.com", True, 0, 2)
    reply = (await daemon.api("POST", OUT + "/increment", {"count": 1}))[1]
    assert (reply["allowed"], reply["sent_today"], reply["sent_month"]) == (True, 1, 3)
    _, audit = await daemon.api("GET", "/audit?target=example.com")
    entry = audit["items"][-1]
    assert (entry["action"], entry["actor"]) == ("outbound.reset_daily", "master")
    assert entry["before"] == {"period": now_keys(daemon)[0], "sent": 2}
    assert entry["after"] == {"period": now_keys(daemon)[0], "sent": 0}


async def test_current_monthly_reset_zeroes_the_running_month(daemon):
    await daemon.domain("example.com")
    await daemon.domain("other.test")
    await daemon.api("PUT", OUT, {"monthly_limit": 3})
    await daemon.api("POST", OUT + "/increment", {"count": 3})
    await daemon.api("POST", "/domains/other.test/outbound/increment", {"count": 1})
    status, body = await daemon.api("POST", "/outbound/reset-monthly",
                                    {"domain": "example.com", "current": True})
    assert status == 200 and body["period"] == now_keys(daemon)[1] and body["sent_month"] == 0
    assert (await daemon.api("POST", OUT + "/increment", {"count": 3}))[1]["allowed"] is True
    assert (await daemon.api("GET", "/domains/other.test/outbound"))[1]["sent_month"] == 1
    assert await history(daemon) == []


@pytest.mark.parametrize("path", ["/outbound/reset-daily", "/outbound/reset-monthly"])
@pytest.mark.parametrize("body", [None, {"domain": "example.com", "current": True}])
async def test_resets_are_master_only(daemon, path, body):
    partner = await daemon.partner()
    token = await daemon.key(partner["id"])
    await daemon.domain("example.com", token=token)
    await daemon.api("POST", OUT + "/increment", {"count": 1})
    status, reply = await daemon.api("POST", path, body, token=token)
    assert status == 403 and reply["error"]["code"] == "forbidden"
    assert (await daemon.api("GET", OUT))[1]["sent_today"] == 1


@pytest.mark.parametrize(("body", "status"), [
    ({"current": "yes", "domain": "example.com"}, 400), ({"current": 1}, 400),
    ({"domain": "example.com"}, 400), ({"domain": "example.com", "current": False}, 400),
    ({"current": True}, 400), ({"current": True, "domain": 5}, 400),
    ({"current": True, "domain": "not a domain"}, 400), ({"bogus": 1}, 400), ([1], 400),
    ({"current": True, "domain": "missing.test"}, 404),
])
async def test_reset_bad_bodies(daemon, body, status):
    await daemon.domain("example.com")
    await daemon.api("POST", OUT + "/increment", {"count": 1})
    for path in ("/outbound/reset-daily", "/outbound/reset-monthly"):
        got, reply = await daemon.api("POST", path, body)
        assert got == status and "error" in reply, reply
    assert (await daemon.api("GET", OUT))[1]["sent_today"] == 1


async def test_reset_bad_json_is_400(daemon):
    status, reply = await daemon.api("POST", "/outbound/reset-daily", raw=b"{nope",
                                     headers={"Content-Type": "application/json"})
    assert status == 400 and reply["error"]["code"] == "invalid"


# --- the CLI, against the database of a running daemon -----------------------------------

async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the policyd command in a subprocess without blocking the daemon's loop."""
    cli = Path(sys.executable).with_name("policyd")
    proc = await asyncio.create_subprocess_exec(
        str(cli), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_resets_run_beside_a_live_daemon(daemon):
    await daemon.domain("example.com")
    _, month = now_keys(daemon)
    last = add_months(month, -1)
    await add_counts(daemon, f"{last}-02", 6, 60)
    await daemon.api("POST", OUT + "/increment", {"count": 2})
    config = daemon.rt.config.source
    daily, monthly, _ = await asyncio.gather(
        run_cli("reset-daily", "--config", config),
        run_cli("reset-monthly", "--config", config),
        daemon.api("POST", OUT + "/increment", {"count": 1}))
    for code, out, err in (daily, monthly):
        assert code == 0, err
    assert json.loads(daily[1])["kind"] == "daily"
    assert json.loads(monthly[1])["frozen_months"] == 1
    assert [(h["period"], h["sent"], h["bytes"]) for h in await history(daemon)] == [
        (last, 6, 60)]
    _, out = await daemon.api("GET", OUT)
    assert (out["sent_today"], out["sent_month"]) == (3, 3)
    code, out, err = await run_cli("reset-monthly", "--config", config)
    assert code == 0 and json.loads(out)["frozen_months"] == 0, err
    assert len(await history(daemon)) == 1


async def test_a_late_count_for_a_frozen_month_adds_to_its_history(daemon):
    await daemon.domain("example.com")
    await add_counts(daemon, "2026-01-31", 7)
    await jobs.reset(daemon.rt, "month", now=utc("2026-02-01T00:00:05"))
    # A policy request whose keys were taken at 23:59:59 commits after the freeze.
    await add_counts(daemon, "2026-01-31", 2)
    await jobs.reset(daemon.rt, "month", now=utc("2026-02-01T00:10:00"))
    assert [(h["period"], h["sent"]) for h in await history(daemon)] == [("2026-01", 9)]


def test_period_keys_asked_again_and_again_turn_over_at_local_midnight() -> None:
    """Keys are kept per second (the hot path asks for every batch): the same second gives
    the same keys, and the first second of a local day gives the new day's."""
    periods = Periods("Pacific/Auckland")  # UTC+13 in November: midnight is 11:00 UTC
    before = [periods.keys(utc("2026-11-30T10:59:59.100")),
              periods.keys(utc("2026-11-30T10:59:59.900"))]
    assert before == [("2026-11-30", "2026-11")] * 2
    assert periods.keys(utc("2026-11-30T11:00:00.000")) == ("2026-12-01", "2026-12")
    assert periods.keys(utc("2026-11-30T10:59:59.999")) == ("2026-11-30", "2026-11")
    assert periods.keys(datetime(2026, 11, 30, 11, 0, 0, 500)) == ("2026-12-01", "2026-12")
