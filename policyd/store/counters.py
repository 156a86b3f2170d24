"""Period-keyed counters: the policy hot path, resets, history, bounces and the guillotine.

Every function here runs inside the writer's `BEGIN IMMEDIATE` transaction (Store.write), so a
check made from the facts read here and the increment that follows are one atomic step: no other
writer, in this process or another, can move a counter in between.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

from policyd.policy import COUNTER_MAX, DomainFacts, Sending, Usage, inherited

# What the policy hot path reads of a domain: field name -> SQL expression. The SELECT is
# built from this one table and rows are read back by these names, never by position.
_FACT_COLUMNS = {
    "id": "d.id", "name": "d.name", "partner_id": "d.partner_id", "status": "d.status",
    "out_status": "d.out_status", "ses_status": "d.ses_status",
    "transfer_limit_bytes": "d.transfer_limit_bytes",
    "tier": "d.out_tier", "daily_limit": "d.out_daily_limit",
    "monthly_limit": "d.out_monthly_limit", "enforcement": "d.out_enforcement",
    "parent_id": "p.id", "parent_ses_status": "p.ses_status", "parent_tier": "p.out_tier",
    "parent_daily_limit": "p.out_daily_limit", "parent_monthly_limit": "p.out_monthly_limit",
    "parent_enforcement": "p.out_enforcement",
    "sent_today": "coalesce(cd.sent, 0)", "sent_month": "coalesce(cm.sent, 0)",
    "bytes_month": "coalesce(cm.bytes, 0)",
}
_FACTS_SELECT = "SELECT " + ", ".join(_FACT_COLUMNS.values()) + " "
_FACTS_JOINS = (
    "LEFT JOIN domains p ON p.id = d.parent_id "
    "LEFT JOIN counters cd ON cd.domain_id = d.id AND cd.kind = 'day' AND cd.period = ?1 "
    "LEFT JOIN counters cm ON cm.domain_id = d.id AND cm.kind = 'month' AND cm.period = ?2 ")
_FACTS = _FACTS_SELECT + "FROM domains d " + _FACTS_JOINS + "WHERE d.name = ?3"
# One statement for any number of names: they come as one JSON array (a fixed SQL text, so
# the prepared statement is reused whatever the batch size).
_FACTS_MANY = (_FACTS_SELECT + "FROM json_each(?3) AS names "
               "JOIN domains d ON d.name = names.value " + _FACTS_JOINS)

Found = tuple[int, DomainFacts, Usage]


def _found(r: tuple[Any, ...]) -> Found:
    f = dict(zip(_FACT_COLUMNS, r))
    parent = None if f["parent_id"] is None else Sending(
        f["parent_tier"], f["parent_daily_limit"], f["parent_monthly_limit"],
        f["parent_enforcement"])
    sending = inherited(Sending(f["tier"], f["daily_limit"], f["monthly_limit"],
                                f["enforcement"]), parent)
    facts = DomainFacts(
        name=f["name"], partner_id=f["partner_id"], status=f["status"],
        out_status=f["out_status"], ses_status=f["ses_status"],
        parent_ses_status=f["parent_ses_status"], daily_limit=sending.daily_limit,
        monthly_limit=sending.monthly_limit, transfer_limit_bytes=f["transfer_limit_bytes"],
        enforcement=sending.enforcement)
    return f["id"], facts, Usage(f["sent_today"], f["sent_month"], f["bytes_month"])


def domain_facts(conn: sqlite3.Connection, name: str, day: str, month: str) -> Found | None:
    """(domain id, facts, current usage) of a hosted domain, or None when not hosted."""
    r = conn.execute(_FACTS, (day, month, name)).fetchone()
    return None if r is None else _found(r)


def domains_facts(conn: sqlite3.Connection, names: Iterable[str], day: str,
                  month: str) -> dict[str, Found]:
    """domain_facts of several names in one query; names not hosted are left out."""
    names = list(names)
    if len(names) == 1:  # the common case at low load: the plain query is cheaper than JSON
        found = domain_facts(conn, names[0], day, month)
        return {} if found is None else {names[0]: found}
    rows = conn.execute(_FACTS_MANY, (day, month, json.dumps(names))).fetchall()
    return {found[1].name: found for found in map(_found, rows)}


def saturating_sum(a: str, b: str) -> str:
    """SQL for a + b of two non-negative counters, held at COUNTER_MAX: past 2^63 - 1 SQLite
    turns the sum into a REAL, which a STRICT INTEGER column refuses, failing the statement
    and with it every request of the batch (a domain wedged for good)."""
    return f"CASE WHEN {a} > {COUNTER_MAX} - {b} THEN {COUNTER_MAX} ELSE {a} + {b} END"


_UPSERT = ("ON CONFLICT (domain_id, kind, period) DO UPDATE SET "
           f"sent = {saturating_sum('sent', 'excluded.sent')}, "
           f"bytes = {saturating_sum('bytes', 'excluded.bytes')}")
_ADD_JSON = (
    "INSERT INTO counters (domain_id, kind, period, sent, bytes) "
    "SELECT row.value ->> 0, kind.name, row.value ->> (1 + kind.n), row.value ->> 3, "
    "row.value ->> 4 FROM json_each(?) AS row, "
    "(SELECT 'day' AS name, 0 AS n UNION ALL SELECT 'month', 1) AS kind "
    "WHERE true " + _UPSERT)  # "WHERE true": SQLite's upsert-after-SELECT parsing rule
MAX_VALUES_ROWS = 256  # more domains than this in one batch: the (slower) JSON statement


@lru_cache(maxsize=MAX_VALUES_ROWS)
def _add_values(domains: int) -> str:
    rows = ", ".join(["(?, 'day', ?, ?, ?), (?, 'month', ?, ?, ?)"] * domains)
    return f"INSERT INTO counters (domain_id, kind, period, sent, bytes) VALUES {rows} {_UPSERT}"


def add(conn: sqlite3.Connection, domain_id: int, day: str, month: str, sent: int,
        nbytes: int) -> None:
    """Add to the day and month counters of one domain in one statement."""
    add_many(conn, [(domain_id, day, month, sent, nbytes)])


def add_many(conn: sqlite3.Connection, counts: list[tuple[int, str, str, int, int]]) -> None:
    """Add (domain id, day, month, sent, bytes) to the day and month counters of several
    domains in one statement, so it is all or nothing."""
    if len(counts) > MAX_VALUES_ROWS:
        conn.execute(_ADD_JSON, (json.dumps([(d, day, month, min(sent, COUNTER_MAX),
                                              min(nbytes, COUNTER_MAX))
                                             for d, day, month, sent, nbytes in counts]),))
    elif counts:
        params: list[Any] = []
        for domain_id, day, month, sent, nbytes in counts:
            sent, nbytes = min(sent, COUNTER_MAX), min(nbytes, COUNTER_MAX)
            params += (domain_id, day, sent, nbytes, domain_id, month, sent, nbytes)
        conn.execute(_add_values(len(counts)), params)


@dataclass(frozen=True, slots=True)
class Totals:
    sent_today: int
    sent_month: int
    bytes_month: int
    bounces: int
    complaints: int


def totals(conn: sqlite3.Connection, domain_id: int, day: str, month: str) -> Totals:
    """The running day's and month's counters of a domain."""
    d = conn.execute("SELECT sent FROM counters WHERE domain_id = ? AND kind = 'day' AND "
                     "period = ?", (domain_id, day)).fetchone()
    m = conn.execute("SELECT sent, bytes, bounces, complaints FROM counters WHERE domain_id = ? "
                     "AND kind = 'month' AND period = ?", (domain_id, month)).fetchone()
    m = m or (0, 0, 0, 0)
    return Totals(d[0] if d else 0, m[0], m[1], m[2], m[3])


def bounced_active(conn: sqlite3.Connection, day: str, month: str) -> list[tuple[str, Totals]]:
    """Domains still sending with bounces this month, and their totals (guillotine sweep)."""
    rows = conn.execute(
        "SELECT d.name, d.id FROM counters c JOIN domains d ON d.id = c.domain_id "
        "WHERE c.kind = 'month' AND c.period = ? AND c.bounces > 0 AND d.out_status = 'active' "
        "ORDER BY d.name", (month,)).fetchall()
    return [(name, totals(conn, domain_id, day, month)) for name, domain_id in rows]


def zero_current(conn: sqlite3.Connection, domain_id: int, kind: str, period: str) -> None:
    """Zero the running period of one domain (a manual reset)."""
    conn.execute("UPDATE counters SET sent = 0, bytes = 0, bounces = 0, complaints = 0 "
                 "WHERE domain_id = ? AND kind = ? AND period = ?", (domain_id, kind, period))


def close_days(conn: sqlite3.Connection, today: str) -> int:
    """Delete the rows of ended days (their sums live on in the month rows)."""
    return conn.execute("DELETE FROM counters WHERE kind = 'day' AND period < ?",
                        (today,)).rowcount


def freeze_months(conn: sqlite3.Connection, this_month: str, now: str) -> int:
    """Move every ended month's totals into history, then drop those rows. Idempotent.

    A month frozen before can get a late count (a request that took its period keys just
    before midnight, a CLI job beside the daemon): that row is added to the history, never
    written over it. The rows are deleted in the same transaction, so nothing counts twice.
    """
    frozen = conn.execute(
        "INSERT INTO monthly_history (domain_id, period, sent, bytes, bounces, complaints, "
        "frozen_at) SELECT domain_id, period, sent, bytes, bounces, complaints, ? "
        "FROM counters WHERE kind = 'month' AND period < ? "
        "ON CONFLICT (domain_id, period) DO UPDATE SET "
        f"sent = {saturating_sum('monthly_history.sent', 'excluded.sent')}, "
        f"bytes = {saturating_sum('monthly_history.bytes', 'excluded.bytes')}, "
        f"bounces = {saturating_sum('monthly_history.bounces', 'excluded.bounces')}, "
        f"complaints = {saturating_sum('monthly_history.complaints', 'excluded.complaints')}, "
        "frozen_at = excluded.frozen_at",
        (now, this_month)).rowcount
    conn.execute("DELETE FROM counters WHERE kind = 'month' AND period < ?", (this_month,))
    return frozen


def prune_history(conn: sqlite3.Connection, oldest_kept: str) -> int:
    """Drop history rows older than the month oldest_kept ('YYYY-MM')."""
    return conn.execute("DELETE FROM monthly_history WHERE period < ?", (oldest_kept,)).rowcount


def history(conn: sqlite3.Connection, domain_id: int) -> list[dict[str, Any]]:
    """Frozen months of a domain, newest first."""
    rows = conn.execute("SELECT period, sent, bytes, bounces, complaints, frozen_at "
                        "FROM monthly_history WHERE domain_id = ? ORDER BY period DESC",
                        (domain_id,)).fetchall()
    keys = ("period", "sent", "bytes", "bounces", "complaints", "frozen_at")
    return [dict(zip(keys, r)) for r in rows]


def add_feedback(conn: sqlite3.Connection, domain_id: int, day: str, month: str,
                 bounces: int, complaints: int) -> Totals:
    """Count permanent bounces and complaints; returns the month's totals."""
    conn.execute(
        "INSERT INTO counters (domain_id, kind, period, bounces, complaints) VALUES "
        "(?1, 'day', ?2, ?4, ?5), (?1, 'month', ?3, ?4, ?5) "
        "ON CONFLICT (domain_id, kind, period) DO UPDATE SET "
        f"bounces = {saturating_sum('bounces', 'excluded.bounces')}, "
        f"complaints = {saturating_sum('complaints', 'excluded.complaints')}",
        (domain_id, day, month, bounces, complaints))
    return totals(conn, domain_id, day, month)


def seen_message(conn: sqlite3.Connection, message_id: str, now: str) -> bool:
    """Record an SNS MessageId; True when it was already seen (count it once)."""
    cur = conn.execute("INSERT INTO sns_messages (message_id, received_at) VALUES (?, ?) "
                       "ON CONFLICT DO NOTHING", (message_id, now))
    return cur.rowcount == 0


def prune_seen(conn: sqlite3.Connection, before: str) -> int:
    """Forget SNS message ids older than before (SNS retries for hours, not weeks)."""
    return conn.execute("DELETE FROM sns_messages WHERE received_at < ?", (before,)).rowcount
