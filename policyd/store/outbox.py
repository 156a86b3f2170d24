"""The notification outbox: written in the transaction that causes the event."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from policyd.timeutil import iso, iso_precise, utcnow


def encode_event(event: str, **fields: Any) -> bytes:
    """The body a partner receives: compact, key-sorted JSON {"event": event, ...fields}."""
    payload = {"event": event, **fields}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# next_attempt_at is written and compared with microseconds (iso_precise), so a retry due in
# 0.3 s is not taken as due at once; every writer and reader of it must use the same format.


def enqueue(conn: sqlite3.Connection, partner_id: int | None, event: str, **fields: object) -> bool:
    """Queue a signed notification for a partner with a notify_url; False when none is due."""
    if partner_id is None:
        return False
    row = conn.execute("SELECT notify_url FROM partners WHERE id = ?", (partner_id,)).fetchone()
    if row is None or not row[0]:
        return False
    now = utcnow()
    body = encode_event(event, **fields).decode("utf-8")
    conn.execute("INSERT INTO notifications (partner_id, event, body, next_attempt_at, "
                 "created_at) VALUES (?, ?, ?, ?, ?)",
                 (partner_id, event, body, iso_precise(now), iso(now)))
    return True


@dataclass(frozen=True, slots=True)
class Pending:
    """A notification due for delivery, with its partner's URL and signing secret."""

    id: int
    event: str
    body: bytes
    attempts: int
    url: str | None
    secret: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox row as stored (for operators and tests)."""

    id: int
    partner_id: int
    event: str
    body: str
    attempts: int
    delivered_at: str | None
    last_error: str | None


def due(conn: sqlite3.Connection, now: str, limit: int) -> list[Pending]:
    """Undelivered notifications whose next attempt is due (now: iso_precise)."""
    rows = conn.execute(
        "SELECT n.id, n.event, n.body, n.attempts, p.notify_url, p.notify_secret "
        "FROM notifications n JOIN partners p ON p.id = n.partner_id "
        "WHERE n.delivered_at IS NULL AND n.next_attempt_at <= ? ORDER BY n.id LIMIT ?",
        (now, limit)).fetchall()
    return [Pending(r[0], r[1], r[2].encode("utf-8"), r[3], r[4], r[5]) for r in rows]


def next_due(conn: sqlite3.Connection) -> str | None:
    """When the earliest undelivered notification is due (iso_precise), or None."""
    row = conn.execute("SELECT min(next_attempt_at) FROM notifications "
                       "WHERE delivered_at IS NULL").fetchone()
    return row[0]


def entries(conn: sqlite3.Connection, partner_id: int | None = None) -> list[Entry]:
    """Every outbox row (of one partner, if given), oldest first."""
    sql = ("SELECT id, partner_id, event, body, attempts, delivered_at, last_error "
           "FROM notifications")
    params: tuple[object, ...] = ()
    if partner_id is not None:
        sql, params = sql + " WHERE partner_id = ?", (partner_id,)
    return [Entry(*row) for row in conn.execute(sql + " ORDER BY id", params).fetchall()]


def delivered(conn: sqlite3.Connection, notification_id: int, now: str) -> None:
    """Mark a notification delivered."""
    conn.execute("UPDATE notifications SET delivered_at = ?, attempts = attempts + 1, "
                 "last_error = NULL WHERE id = ?", (now, notification_id))


def failed(conn: sqlite3.Connection, notification_id: int, next_at: str, error: str) -> None:
    """Record a failed attempt and when to try again (next_at: iso_precise)."""
    conn.execute("UPDATE notifications SET attempts = attempts + 1, next_attempt_at = ?, "
                 "last_error = ? WHERE id = ?", (next_at, error[:500], notification_id))


def prune_delivered(conn: sqlite3.Connection, before: str) -> int:
    """Drop delivered notifications older than before."""
    return conn.execute("DELETE FROM notifications WHERE delivered_at IS NOT NULL AND "
                        "delivered_at < ?", (before,)).rowcount
