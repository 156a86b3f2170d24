"""The notification outbox: written in the transaction that causes the event."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from policyd.notify import encode_event
from policyd.timeutil import iso, utcnow


def enqueue(conn: sqlite3.Connection, partner_id: int | None, event: str, **fields: object) -> bool:
    """Queue a signed notification for a partner with a notify_url; False when none is due."""
    if partner_id is None:
        return False
    row = conn.execute("SELECT notify_url FROM partners WHERE id = ?", (partner_id,)).fetchone()
    if row is None or not row[0]:
        return False
    now = iso(utcnow())
    body = encode_event(event, **fields).decode("utf-8")
    conn.execute("INSERT INTO notifications (partner_id, event, body, next_attempt_at, "
                 "created_at) VALUES (?, ?, ?, ?, ?)", (partner_id, event, body, now, now))
    return True


@dataclass(frozen=True, slots=True)
class Pending:
    id: int
    event: str
    body: bytes
    attempts: int
    url: str | None
    secret: str


def due(conn: sqlite3.Connection, now: str, limit: int) -> list[Pending]:
    """Undelivered notifications whose next attempt is due."""
    rows = conn.execute(
        "SELECT n.id, n.event, n.body, n.attempts, p.notify_url, p.notify_secret "
        "FROM notifications n JOIN partners p ON p.id = n.partner_id "
        "WHERE n.delivered_at IS NULL AND n.next_attempt_at <= ? ORDER BY n.id LIMIT ?",
        (now, limit)).fetchall()
    return [Pending(r[0], r[1], r[2].encode("utf-8"), r[3], r[4], r[5]) for r in rows]


def delivered(conn: sqlite3.Connection, notification_id: int, now: str) -> None:
    """Mark a notification delivered."""
    conn.execute("UPDATE notifications SET delivered_at = ?, attempts = attempts + 1, "
                 "last_error = NULL WHERE id = ?", (now, notification_id))


def failed(conn: sqlite3.Connection, notification_id: int, next_at: str, error: str) -> None:
    """Record a failed attempt and when to try again."""
    conn.execute("UPDATE notifications SET attempts = attempts + 1, next_attempt_at = ?, "
                 "last_error = ? WHERE id = ?", (next_at, error[:500], notification_id))


def prune_delivered(conn: sqlite3.Connection, before: str) -> int:
    """Drop delivered notifications older than before."""
    return conn.execute("DELETE FROM notifications WHERE delivered_at IS NOT NULL AND "
                        "delivered_at < ?", (before,)).rowcount
